"""The `graphc` command: show, draw, convert and run models (.onnx or .graphc); bench.

    graphc show model.onnx
    graphc draw model.graphc -o graph.svg
    graphc draw model.onnx -o model.html       # the interactive viewer, one self-contained page
    graphc view model.onnx [--port 8000]       # serve that page on http://127.0.0.1:8000/
    graphc convert model.onnx model.graphc
    graphc run model.onnx --input x.npy --backend llvm -o outputs.npz
    graphc explain model.onnx --shape x=8,3,224,224 [--backend llvm]   # time per kernel vs the roofline
    graphc bench [benchmark options]
    graphc launch -n 4 python train.py --epochs 3   # N processes under MPI (graphc.distributed)

Errors print one line (`graphc: error: ...`) and exit with status 1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter

import numpy as np


class CliError(Exception):
    """A user-facing failure of the command (printed as one line)."""


def load_model(path: str):
    """A gc.Graph from an .onnx or .graphc file (graphc.serialize.load_model)."""
    from graphc.serialize import load_model as load
    return load(path)


def _fmt_shape(t) -> str:
    from graphc.shapes import fmt_shape
    return fmt_shape(t.shape)


def cmd_show(args) -> None:
    g = load_model(args.model)
    params = g.parameters
    n_values = sum(int(np.prod(p.shape)) for p in params)
    n_bytes = sum(p.value.nbytes for p in params)
    print(f"{args.model}: graph {g.name!r}")
    print("inputs:")
    for t in g.inputs:
        print(f"  {t.name:<24} {t.dtype:<8} {_fmt_shape(t)}")
    print("outputs:")
    for i, t in enumerate(g.outputs):
        print(f"  {t.name or f'output_{i}':<24} {t.dtype:<8} {_fmt_shape(t)}")
    print(f"parameters: {len(params)} tensors, {n_values:,} values, {n_bytes / 1e6:.2f} MB")
    if g.updates:
        print(f"updates: {len(g.updates)} parameters are updated on each call")
    hist = Counter(n.op.name for n in g.compute_nodes())
    print(f"ops: {sum(hist.values())} nodes")
    for op, k in hist.most_common():
        print(f"  {op:<24} {k}")


def cmd_draw(args) -> None:
    import graphc as gc
    g = load_model(args.model)
    obj = gc.function(g, optimize=args.optimize) if args.optimize else g
    if args.output.lower().endswith((".html", ".htm")):
        out = gc.draw(obj, args.output)
    else:
        out = gc.draw(obj, args.output, collapse=True if args.collapse else None)
    print(f"wrote {out}")


def cmd_view(args) -> None:
    import graphc as gc
    from graphc import viewer
    g = load_model(args.model)
    obj = gc.function(g, optimize=args.optimize) if args.optimize else g

    def ready(url):
        print(f"graphc viewer for {args.model}: {url}  (Ctrl-C stops)", flush=True)
    viewer.serve(obj, port=args.port, host=args.host, title=os.path.basename(args.model), ready=ready)


def cmd_convert(args) -> None:
    import graphc as gc
    g = load_model(args.src)
    if args.dst.endswith(".onnx"):
        gc.export_onnx(g, args.dst)
    elif args.dst.endswith(".graphc"):
        gc.save(g, args.dst)
    else:
        raise CliError(f"unknown output format for {args.dst!r}: use a .onnx or .graphc suffix")
    print(f"wrote {args.dst}")


def _read_inputs(g, specs: list[str]) -> list[np.ndarray]:
    """`x.npy` (positional, in input order) or `name=x.npy`; an .npz supplies inputs by name."""
    by_name, positional = {}, []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CliError(f"cannot read input {path}: {e}") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            by_name.update({k: data[k] for k in data.files})
        elif name:
            by_name[name] = data
        else:
            positional.append(data)
    values = []
    for t in g.inputs:
        if t.name in by_name:
            values.append(by_name.pop(t.name))
        elif positional:
            values.append(positional.pop(0))
        else:
            raise CliError(f"no value for input {t.name!r} {t.dtype}{_fmt_shape(t)}; pass --input {t.name}=file.npy")
    if positional or by_name:
        raise CliError(f"unused inputs: {sorted(by_name) + ['(positional)'] * len(positional)}")
    return values


def cmd_run(args) -> None:
    import graphc as gc
    g = load_model(args.model)
    values = _read_inputs(g, args.input or [])
    fn = gc.function(g, backend=args.backend)
    outs = fn(*values)
    if isinstance(outs, np.ndarray):  # a graph saved from a one-output function returns one array
        outs = [outs]
    names = [t.name or f"output_{i}" for i, t in enumerate(g.outputs)]
    for name, v in zip(names, outs):
        stats = f"min {v.min():.6g} max {v.max():.6g} mean {v.mean():.6g}" if v.size and v.dtype.kind in "fi" else ""
        print(f"{name}: {v.dtype}{v.shape} {stats}")
    if args.output:
        np.savez(args.output, **dict(zip(names, outs)))
        print(f"wrote {args.output}")


def _parse_shapes(specs: list[str]) -> dict:
    """--shape x=8,3,224,224 (repeatable) -> {'x': (8, 3, 224, 224)}."""
    out = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            out[name] = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise CliError(f"--shape {spec!r}: expected NAME=D0,D1,... (e.g. x=8,3,224,224)") from None
        if not name or not out[name]:
            raise CliError(f"--shape {spec!r}: expected NAME=D0,D1,... (e.g. x=8,3,224,224)")
    return out


def cmd_explain(args) -> None:
    """Compile a model and print f.explain(): per kernel, its ops, FLOPs, bytes, roofline and measured time."""
    import graphc as gc
    from graphc.explain import example_inputs
    g = load_model(args.model)
    fn = gc.function(g, backend=args.backend, optimize=args.optimize)
    if args.input:
        values = _read_inputs(g, args.input)
    else:
        shapes = _parse_shapes(args.shape or [])
        unknown = sorted(set(shapes) - {t.name for t in g.inputs})
        if unknown:
            raise CliError(f"--shape names {unknown}, which are not inputs; inputs: "
                           + ", ".join(f"{t.name} {t.dtype}{_fmt_shape(t)}" for t in g.inputs))
        dims = {}   # symbolic dims given by a --shape (N from x=8,...) apply to every input
        for t in g.inputs:
            if t.name in shapes and len(shapes[t.name]) == len(t.shape):
                dims.update({str(d): v for d, v in zip(t.shape, shapes[t.name]) if not isinstance(d, int)})
        values = example_inputs(fn, dims)
        rng = np.random.default_rng(0)
        for i, t in enumerate(g.inputs):
            if t.name in shapes:
                values[i] = (rng.standard_normal(shapes[t.name]) if np.dtype(t.dtype).kind == "f" else
                             np.zeros(shapes[t.name])).astype(t.dtype)
    print(fn.explain(*values, repeat=args.repeat))


def cmd_bench(args, rest: list[str]) -> int:
    """Delegates to `python -m benchmarks` (the benchmark table) from the source checkout."""
    import importlib.util
    import graphc
    root = os.path.dirname(os.path.dirname(os.path.abspath(graphc.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if importlib.util.find_spec("benchmarks") is None and not os.path.isdir(os.path.join(root, "benchmarks")):
        print("graphc: error: `graphc bench` needs the benchmarks package of a graphc source checkout",
              file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, "-m", "benchmarks", *rest], env=env)


def cmd_launch(args) -> int:
    """Start N processes of COMMAND with the installed MPI runtime (graphc.distributed.launch)."""
    from graphc.distributed.launch import launch
    if args.n is None:
        raise CliError("launch: give the number of processes with -n N")
    return launch(args.n, args.cmdline, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphc", description="graphc: inspect, draw, convert and run models")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="summary: inputs, outputs, parameters, op histogram")
    s.add_argument("model")
    s = sub.add_parser("draw", help="render the graph with Graphviz (.svg, .png, .pdf, .dot) or as the "
                                    "interactive viewer page (.html)")
    s.add_argument("model")
    s.add_argument("-o", "--output", default="graph.svg")
    s.add_argument("-O", "--optimize", type=int, default=0, help="draw the graph optimised at this level")
    s.add_argument("--collapse", action="store_true", help="merge repeated layers")
    s = sub.add_parser("view", help="serve the interactive viewer page for the model and print its URL")
    s.add_argument("model")
    s.add_argument("-p", "--port", type=int, default=8000, help="port (0: any free port)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("-O", "--optimize", type=int, default=2,
                   help="show the graph compiled at this level (fused kernels, memory plan); 0: as loaded")
    s = sub.add_parser("convert", help="convert between .onnx and .graphc")
    s.add_argument("src")
    s.add_argument("dst")
    s = sub.add_parser("run", help="run a model on .npy inputs")
    s.add_argument("model")
    s.add_argument("-i", "--input", action="append", help="x.npy, name=x.npy or inputs.npz (repeatable)")
    s.add_argument("-b", "--backend", default="numpy")
    s.add_argument("-o", "--output", help="write the outputs to this .npz")
    s = sub.add_parser("explain", help="compile the model and print where a call's time goes: per kernel, the "
                                       "ops fused, FLOPs, bytes, roofline vs measured time, what bounds it")
    s.add_argument("model")
    s.add_argument("-s", "--shape", action="append", metavar="NAME=D0,D1,...",
                   help="run on random data of this shape (repeatable; binds symbolic dims such as the batch; "
                        "inputs not named: their own shape, free dims 1)")
    s.add_argument("-i", "--input", action="append", help="x.npy, name=x.npy or inputs.npz (instead of --shape)")
    s.add_argument("-b", "--backend", default="llvm")
    s.add_argument("-O", "--optimize", type=int, default=2)
    s.add_argument("-r", "--repeat", type=int, default=10, help="profiled runs (the medians are shown)")
    sub.add_parser("bench", help="the benchmark table (python -m benchmarks)", add_help=False)
    s = sub.add_parser("launch", help="run COMMAND on N processes under MPI, like mpiexec (a COMMAND ending in "
                                      ".py, or python, runs with this interpreter)")
    s.add_argument("-n", "--np", dest="n", type=int, help="number of processes")
    s.add_argument("--timeout", type=float, default=None, help="stop the whole job after this many seconds")
    s.add_argument("cmdline", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    from graphc.errors import GraphcError
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(None, argv[1:])
    args = build_parser().parse_args(argv)
    handler = {"show": cmd_show, "draw": cmd_draw, "view": cmd_view, "convert": cmd_convert,
               "run": cmd_run, "launch": cmd_launch, "explain": cmd_explain}[args.command]
    try:
        rc = handler(args)
        if args.command == "launch":
            return rc
    except BrokenPipeError:  # output piped into `head`
        return 0
    except (CliError, GraphcError, OSError) as e:
        msg = " ".join(str(e).split("\n")[0].split())
        print(f"graphc: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
