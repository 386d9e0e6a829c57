"""python -m benchmarks.compile_time [--cases mlp5,chain2k,...] [--backends numpy,llvm] [--timeout S]

Cold compile times of graphs whose size grows while their distinct kernels do not: an Adam training
step of an MLP of width 64 (5, 20 and 80 layers), a chain of elementwise nodes (2,000 and 20,000:
sin, *0.9, +0.1, tanh repeated), the W5 step (benchmarks/workloads.py, SGD) and a 12-layer torch
`nn.TransformerEncoder` (te12: d_model 256, 4 heads, torch's default FFN 2048, ReLU, post-LN, eval;
batch 2, sequence 64) exported to ONNX by torch.onnx.export and imported with gc.load_onnx (te2: the
same with 2 layers). For te*, "cold" includes gc.load_onnx (what a user deploying the file waits for)
and ONNX Runtime's session creation and time per call (min of 20) are printed beside graphc's. Each (case, backend)
runs in a fresh process with an empty on-disk cache (cold), then once more in another fresh process
over the cache the first one filled (warm: the code comes from the cache; on llvm a hit of the warm-start
cache skips the passes, the plan and the IR as well: "warm-cache hit"). Imports and the backend's
start-up are warmed first; the graph is built before the clock starts.

Columns: cold / warm = wall seconds of gc.function plus what the first call costs over a second one
(a graph with symbolic dims is specialised at its first call); cold cpu = this process's CPU seconds
over gc.function and the first call (all its threads: BLAS threads count; on a loaded machine closer
to what an idle one would take than the wall time); then seconds per phase as the backend reports
them in `f.program.info["compile_time"]` (passes, plan, lowering, llvm_opt, machine_code, load;
numpy: memory_plan, codegen, python_compile); kernels = distinct llvm kernel functions / kernel
steps. The first call's result is checked against NumPy. No assertion on the figures: they depend on
the machine (its CPU and load are printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

#: the repository root: `python benchmarks/compile_time.py` (a script, not -m) finds the package and its
#: per-case processes (`-m benchmarks.compile_time`) find it too
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, "") and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

CASES = ("mlp5", "mlp20", "mlp80", "chain2k", "chain20k", "w5", "te12")
#: accepted by --cases besides CASES (not run by default)
EXTRA_CASES = ("te2",)
BACKENDS = ("numpy", "llvm")


# ---- the graphs --------------------------------------------------------------------------------------

def mlp_adam(gc, layers: int, width: int = 64, batch: int = 32):
    """One Adam step of a `layers`-deep ReLU MLP of width `width` on a squared error; returns
    (function, args, reference check)."""
    rng = np.random.default_rng(0)
    ws = [gc.parameter(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32))
          for i in range(layers)]
    bs = [gc.parameter(f"b{i}", np.zeros(width, np.float32)) for i in range(layers)]
    x = gc.placeholder("x", (batch, width))
    y = gc.placeholder("y", (batch, width))
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = h @ w + b
        if i < layers - 1:
            h = gc.relu(h)
    loss = gc.mean((h - y) * (h - y))
    params = ws + bs
    upd = gc.optim.Adam(lr=1e-3).updates(loss, params)
    xs = rng.standard_normal((batch, width)).astype(np.float32)
    ys = rng.standard_normal((batch, width)).astype(np.float32)
    w0 = [p.value.copy() for p in ws]
    b0 = [p.value.copy() for p in bs]

    def expected():
        a = xs.astype(np.float64)
        for i, (w, b) in enumerate(zip(w0, b0)):
            a = a @ w + b
            if i < layers - 1:
                a = np.maximum(a, 0)
        return np.mean((a - ys) ** 2)
    return (lambda **kw: gc.function([x, y], loss, updates=upd, **kw)), (xs, ys), expected


#: the chain's repeating pattern: a few different elementwise ops that no rule removes
_CHAIN = ("sin", "mul", "add", "tanh")


def chain(gc, n: int, size: int = 257):
    """y = f_n(...f_1(x)), n elementwise nodes cycling through sin, *0.9, +0.1, tanh."""
    x = gc.placeholder("x", (size,))
    y = x
    for i in range(n):
        k = _CHAIN[i % 4]
        y = gc.sin(y) if k == "sin" else y * 0.9 if k == "mul" else y + 0.1 if k == "add" else gc.tanh(y)
    xs = np.random.default_rng(1).standard_normal(size).astype(np.float32)

    def expected():
        v = xs.astype(np.float64)
        for i in range(n):
            k = _CHAIN[i % 4]
            v = np.sin(v) if k == "sin" else v * 0.9 if k == "mul" else v + 0.1 if k == "add" else np.tanh(v)
        return v
    return (lambda **kw: gc.function([x], y, **kw)), (xs,), expected


def w5(gc):
    """The W5 step as benchmarks/systems.py builds it (MLP 784-512-256-10, cross-entropy, SGD), the
    graph built here so that only gc.function and the first call are timed."""
    from . import workloads as W
    wl = W.w5("full")
    d = wl.data
    ps = {k: gc.parameter(k, d[k].copy()) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    x = gc.placeholder("x", (None, d["x"].shape[1]))
    t = gc.placeholder("t", (None, d["t"].shape[1]))
    h = gc.relu(x @ ps["w0"] + ps["b0"])
    h = gc.relu(h @ ps["w1"] + ps["b1"])
    z = h @ ps["w2"] + ps["b2"]
    loss = -gc.mean(gc.sum(t * gc.log_softmax(z, axis=1), axis=1))
    names = sorted(ps)
    grads = gc.grad(loss, [ps[k] for k in names])
    upd = [(ps[k], ps[k] - 0.1 * g) for k, g in zip(names, grads)]

    def make(**kw):
        f = gc.function([x, t], loss, updates=upd, **kw)
        f.check = lambda: np.allclose(np.concatenate([ps[k].value.ravel() for k in names]), wl.reference,
                                      rtol=2e-3, atol=1e-4)
        return f
    return make, (d["x"], d["t"]), None


def transformer_encoder(gc, layers: int, batch: int = 2, seq: int = 64, d_model: int = 256, heads: int = 4):
    """A torch nn.TransformerEncoder (eval mode) exported to ONNX, as a user deploying it would (the
    exporter of benchmarks/workloads.export_onnx: TorchScript, opset 17). The graph is imported inside
    the timed `make` (gc.load_onnx is part of what the user waits for); the reference is torch's output."""
    import torch

    from .workloads import export_onnx

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(d_model, heads, batch_first=True)
            # no nested-tensor fast path (eval mode would take it; the exporter cannot trace it)
            self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x, is_causal=False)   # explicit: torch 2.13's tracer fails on the default

    torch.manual_seed(0)
    model = Encoder().eval()
    xs = np.random.default_rng(2).standard_normal((batch, seq, d_model)).astype(np.float32)
    onnx_bytes = export_onnx(torch, model, xs)
    with torch.no_grad():
        ref = model(torch.from_numpy(xs)).numpy()

    def make(**kw):
        t0 = time.perf_counter()
        g = gc.load_onnx(onnx_bytes)
        t_load = time.perf_counter() - t0
        f = gc.function(g, **kw)
        f.onnx_load_s = t_load
        f.onnx = onnx_bytes
        return f
    return make, (xs,), lambda: ref


def _ort(onnx_bytes: bytes, args) -> dict:
    """ONNX Runtime's session creation (seconds) and time per call (min of 20) on the same model."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    t0 = time.perf_counter()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    feeds = {i.name: a for i, a in zip(sess.get_inputs(), args)}
    sess.run(None, feeds)
    return {"session_s": t1 - t0, "call_s": _min_call(lambda: sess.run(None, feeds))}


def _min_call(fn, n: int = 20) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def build_case(gc, case: str):
    if case == "w5":
        return w5(gc)
    if case.startswith("te"):
        return transformer_encoder(gc, int(case[2:]))
    if case.startswith("mlp"):
        return mlp_adam(gc, int(case[3:]))
    if case.startswith("chain"):
        return chain(gc, int(case[5:].replace("k", "000")))
    raise ValueError(case)


# ---- one measurement, in its own process ---------------------------------------------------------------

def _warm_up(gc, backend: str) -> None:
    """Imports and the backend's start-up (LLVM target, BLAS binding) are not the graph's compile time."""
    x = gc.placeholder("x", (None, 3))
    w = gc.parameter("w", np.ones((3, 3), np.float32))
    loss = gc.mean(gc.log_softmax(gc.exp(x @ w) * 2.0 + 1.0, axis=1))
    gc.function([x], loss, updates=[(w, w - gc.grad(loss, [w])[0])], backend=backend)(np.ones((2, 3), np.float32))
    _ = gc.optim, gc.nn


def _one(case: str, backend: str, profile: str | None) -> dict:
    sys.setrecursionlimit(1000)   # Python's default: a deep graph must not need more
    import graphc as gc
    _warm_up(gc, backend)
    if case.startswith("te"):   # the ONNX importer's modules (ONNX Runtime's import is not timed either)
        import graphc.frontends.onnx_import as onnx_import
        onnx_import._converter(type("N", (), {"domain": "", "op_type": "Relu"})())
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    make, args, expected = build_case(gc, case)
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    f = make(backend=backend)
    t1 = time.perf_counter()
    out = f(*args)
    t2, c2 = time.perf_counter(), time.process_time()
    if prof:
        prof.disable()
    ok = f.check() if expected is None else bool(
        np.allclose(np.asarray(out, np.float64), expected(), rtol=1e-3, atol=1e-4))
    f(*args)
    t3 = time.perf_counter()
    nodes = len(f.user_graph.nodes)
    info = f.program.info
    if prof:
        prof.dump_stats(profile)
    ct = info.get("compile_time") or {}
    # compile time: gc.function plus what the first call costs over a second one (a graph with symbolic
    # dims is specialised at its first call)
    res = {"case": case, "backend": backend, "nodes": nodes, "ops": len(f.graph.compute_nodes()) if f else 0,
           "build_s": (t1 - t0) + max(0.0, (t2 - t1) - (t3 - t2)), "call_s": t3 - t2, "ok": ok,
           # CPU seconds of this process over gc.function and the first call (less sensitive to other
           # processes on a loaded machine than the wall time; includes the first call's run time)
           "cpu_s": c2 - c0, "phases": {k: v for k, v in ct.items() if isinstance(v, (int, float))}}
    for k in ("kernels", "kernel_functions", "warm_hit"):
        if k in info:
            res[k] = info[k]
    if hasattr(f, "onnx_load_s"):   # te*: gc.load_onnx is part of the cold time; ONNX Runtime beside it
        res["build_s"] += f.onnx_load_s
        res["phases"] = {"onnx_load": f.onnx_load_s, **res["phases"]}
        res["call_s"] = _min_call(lambda: f(*args))
        res["ort"] = _ort(f.onnx, args)
    return res


def run_case(case: str, backend: str, cache: str, timeout: float) -> dict:
    path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, GRAPHC_CACHE_DIR=cache, PYTHONPATH=path)
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--one", case, "--backends", backend]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "backend": backend, "status": f"> {timeout:.0f} s (timed out)"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"case": case, "backend": backend, "status": f"failed: {tail[:120]}",
                "wall_s": time.perf_counter() - t0}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["status"] = "ok" if res["ok"] else "WRONG RESULT"
    return res


# ---- the report ---------------------------------------------------------------------------------------------

PHASE_ORDER = ("onnx_load", "passes", "plan", "lowering", "codegen", "llvm_opt", "machine_code", "load", "python_compile")


def _fmt(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def report(rows: list[dict]) -> str:
    phases = [p for p in PHASE_ORDER if any(p in r.get("phases", {}) for r in rows)]
    phases += sorted({p for r in rows for p in r.get("phases", {})} - set(phases))
    head = ["case", "backend", "nodes", "ops", "cold", "cold cpu", "warm", *phases, "kernels", "status"]
    lines = [head]
    for r in rows:
        ph = r.get("phases", {})
        kern = f"{r['kernel_functions']}/{r['kernels']}" if "kernels" in r and "kernel_functions" in r else "-"
        lines.append([r["case"], r["backend"], str(r.get("nodes", "-")), str(r.get("ops", "-")), _fmt(r.get("build_s")),
                      _fmt(r.get("cpu_s")),
                      _fmt(r.get("warm_s")), *[_fmt(ph.get(p)) for p in phases], kern, r["status"]])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    for r in rows:
        if r.get("ort"):
            o = r["ort"]
            out.append(f"{r['case']} {r['backend']}: per call {r['call_s'] * 1e3:.1f} ms; ONNX Runtime: session "
                       f"{_fmt(o['session_s'])}, per call {o['call_s'] * 1e3:.1f} ms")
    return "\n".join(out)


def _machine() -> str:
    from benchmarks.harness import _cpu_name
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return f"{_cpu_name()}, {os.cpu_count()} cores, load average {load}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--timeout", type=float, default=600, help="seconds per (case, backend) process")
    p.add_argument("--no-warm", action="store_true", help="skip the warm (cached) run")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    p.add_argument("--profile", default="", help="(with --one) write cProfile stats of the build here")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if args.one:
        print(json.dumps(_one(args.one, backends[0], args.profile or None)))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES + EXTRA_CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; cases are {', '.join(CASES)}")
    print(f"machine: {_machine()}", flush=True)
    rows = []
    for case in cases:
        for be in backends:
            cache = tempfile.mkdtemp(prefix="graphc-compile-time-")
            r = run_case(case, be, cache, args.timeout)
            if r["status"] == "ok" and not args.no_warm:
                w = run_case(case, be, cache, args.timeout)
                r["warm_s"], r["warm_hit"] = w.get("build_s"), w.get("warm_hit")
            rows.append(r)
            hit = {True: " (warm-cache hit)", False: " (warm-cache miss)"}.get(r.get("warm_hit"), "")
            print(f"  {case:9s} {be:6s} cold {_fmt(r.get('build_s')):>8s}  warm {_fmt(r.get('warm_s')):>8s}{hit}  "
                  f"{r['status']}", file=sys.stderr, flush=True)
    print(report(rows))
    print(f"machine after: {_machine()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": _machine(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
