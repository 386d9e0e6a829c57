"""python -m benchmarks [--quick] [--only W1,W2] [--systems S1,S2] [--json out.json] [--png out.png] [--save]

Runs W1-W10 (benchmarks/WORKLOADS.md) on graphc (numpy O0/O2, llvm) and the installed peers, checks
every output against a float64 reference before timing, and prints a table (median (min) per call),
compile times and the BLAS/thread set-up. Nothing is written unless asked: --json/--png name files,
--save writes benchmarks/results/<cpu>.json and .png (one pair per CPU model, kept in the repository).
--quick leaves W10 (ResNet-18) out unless --only names it. Unless --keep-env,
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed for this process only (it re-executes itself and
says so), so OpenBLAS picks its kernels for this CPU.
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

from . import harness, peers, systems
from . import workloads as W

SYSTEMS = {
    "numpy": systems.numpy_build,
    "graphc-numpy O0": systems.graphc_builder("numpy", 0),
    "graphc-numpy O2": systems.graphc_builder("numpy", 2),
    "graphc-llvm": systems.graphc_builder("llvm", 2),
    "torch": peers.torch_builder(False),
    "torch.compile": peers.torch_builder(True),
    "onnxruntime": peers.ort_build,
    "jax": peers.jax_build,
    "pytensor": peers.pytensor_build,
}
_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: workload ids for --only, in order (W.BUILDERS builds each one's data only when it is selected)
WORKLOAD_IDS = tuple(W.BUILDERS)
#: workloads --quick leaves out unless --only names them (slow to build and to run)
SLOW = ("W10",)
#: where --save writes (GRAPHC_BENCH_RESULTS_DIR overrides it, for tests)
RESULTS_DIR = os.environ.get("GRAPHC_BENCH_RESULTS_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                         "results")
#: --systems groups: a name that stands for several systems
GROUPS = {"graphc": [s for s in SYSTEMS if s.startswith("graphc")], "peers": [
    s for s in SYSTEMS if s != "numpy" and not s.startswith("graphc")]}


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interleave", action="store_true",
                   help="time the systems of a workload in rounds, one sample of each per round (after a pause "
                        "for the previous system's spinning threads), instead of one after another")
    p.add_argument("--quick", action="store_true", help="fewer samples; skips torch.compile unless --systems")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the smoke test): checks, no meaningful times")
    p.add_argument("--only", default="", help=f"comma-separated workload ids: {', '.join(WORKLOAD_IDS)} "
                   "(default: all)")
    p.add_argument("--systems", default="", help="comma-separated systems (default: all): " +
                   ", ".join(repr(s) for s in SYSTEMS) + "; groups: " +
                   ", ".join(f"{g!r} ({', '.join(m)})" for g, m in GROUPS.items()))
    p.add_argument("--json", default="", help="also write the results as JSON to this file (default: none)")
    p.add_argument("--png", default="", help="also write a matplotlib chart of the ratios here")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/<cpu>.json and <cpu>.png (the per-CPU results kept in the "
                        "repository)")
    p.add_argument("--keep-env", action="store_true", help="keep OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE")
    p.add_argument("--threads", type=int, default=0,
                   help="limit every system to N threads (BLAS via threadpoolctl, torch, ONNX Runtime, graphc); "
                        "0 = each system's default")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workload_ids = _parse_only(p, args.only)
    args.system_names = _parse_systems(p, args.systems)
    return args


def _parse_only(p: argparse.ArgumentParser, only: str) -> set[str]:
    """The workload ids of --only (W1 or a full id such as 'W1 MLP b1'); an unknown one is a usage error."""
    keep = {s.strip() for s in only.split(",") if s.strip()}
    bad = sorted(k for k in keep if k.split()[0] not in WORKLOAD_IDS)
    if bad:
        p.error(f"--only: unknown workload {', '.join(bad)}; workloads are {', '.join(WORKLOAD_IDS)}")
    return keep


def _parse_systems(p: argparse.ArgumentParser, systems_arg: str) -> list[str]:
    """The system names of --systems, groups expanded, in the given order; an unknown one is a usage error."""
    out = []
    for s in (s.strip() for s in systems_arg.split(",")):
        if not s:
            continue
        names = [s] if s in SYSTEMS else GROUPS.get(s)
        if names is None:
            import difflib
            near = difflib.get_close_matches(s, list(SYSTEMS) + list(GROUPS), n=1, cutoff=0.5)
            p.error(f"--systems: unknown system {s!r}" + (f" (did you mean {near[0]!r}?)" if near else "") +
                    f"; systems are {', '.join(repr(k) for k in SYSTEMS)}; groups: {', '.join(map(repr, GROUPS))}")
        out += [n for n in names if n not in out]
    return out


def _reexec_without_openblas_env(args, argv) -> None:
    found = {k: os.environ[k] for k in _ENV_VARS if k in os.environ}
    if found and not args.keep_env and not args.compile_probe:
        shown = " ".join(f"{k}={v}" for k, v in found.items())
        print(f"note: unsetting {shown} for this benchmark process only (re-exec; --keep-env keeps them)",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
        env["GRAPHC_BENCH_UNSET"] = shown
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], env)


def _selected(args):
    size = "tiny" if args.tiny else "full"
    keep = args.workload_ids
    if not keep and args.quick:
        keep = {k for k in WORKLOAD_IDS if k not in SLOW}
    wls = W.selected_workloads(size, keep)
    names = args.system_names or [s for s in SYSTEMS if not (args.quick and s == "torch.compile")]
    return wls, names


def _compile_probe(args) -> None:
    """In a fresh process: gc.function time for graphc-llvm per workload (warm on-disk cache)."""
    out = {}
    import graphc as gc   # imports and LLVM start-up are not compile time: warm them first
    x = gc.placeholder("x", (2,))
    gc.function([x], gc.exp(x) @ x, backend="llvm")(np.ones(2, np.float32))
    _ = gc.nn
    for wl in _selected(args)[0]:
        t0 = time.perf_counter()
        try:
            SYSTEMS["graphc-llvm"](wl)()
        except systems.Missing:
            continue
        out[wl.id] = time.perf_counter() - t0
    print(json.dumps(out))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    _reexec_without_openblas_env(args, argv)
    if args.threads:
        _limit_threads(args.threads)
    if args.compile_probe:
        _compile_probe(args)
        return 0
    cache = tempfile.mkdtemp(prefix="graphc-bench-cache-")
    os.environ["GRAPHC_CACHE_DIR"] = cache   # cold compiles: an empty cache
    wls, names = _selected(args)
    env = harness.environment()
    env["unset_for_this_run"] = os.environ.get("GRAPHC_BENCH_UNSET")
    results = {}
    quick = args.quick or args.tiny
    for wl in wls:
        row, fns = {}, {}
        for s in names:   # --interleave: build and check every system, then time them in rounds
            if s == "torch.compile" and wl.id.startswith("W10") and s not in args.system_names:
                row[s] = {"status": "skipped (compiles for minutes; --systems torch.compile runs it)"}
            elif args.interleave:
                row[s], fn = harness.prepare(s, SYSTEMS[s], wl)
                if fn is not None:
                    fns[s] = fn
                continue
            else:
                row[s] = harness.measure(s, SYSTEMS[s], wl, quick)
            print(f"  {wl.id:8s} {s:16s} {_short(row[s])}", file=sys.stderr, flush=True)
        if args.interleave:
            for s, timing in harness.time_interleaved(fns, quick).items():
                row[s].update(timing)
            fns.clear()
            for s in names:
                print(f"  {wl.id:8s} {s:16s} {_short(row[s])}", file=sys.stderr, flush=True)
        results[wl.id] = row
    probe = _warm_probe(argv, cache) if "graphc-llvm" in names else {}
    bw = harness.copy_bandwidth()
    _report(args, env, results, names, probe, bw)
    return 0


def _limit_threads(n: int) -> None:
    os.environ["GRAPHC_NUM_THREADS"] = str(n)
    os.environ["GRAPHC_BENCH_THREADS"] = str(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        print("note: threadpoolctl not installed; BLAS threads not limited", file=sys.stderr)


def _short(r) -> str:
    return harness.fmt_time(r["median"]) if r.get("status") == "ok" else r.get("status", "")


def _warm_probe(argv, cache) -> dict:
    env = dict(os.environ, GRAPHC_CACHE_DIR=cache)
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--compile-probe", *argv], env=env,
                       capture_output=True, text=True, timeout=600)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}


def _report(args, env, results, names, probe, bw) -> None:
    print(f"\nmachine: {env['processor']}, {env['cores']} cores usable, load average {env['loadavg']}")
    if env.get("unset_for_this_run"):
        print(f"unset for this run: {env['unset_for_this_run']}")
    for p in env["threadpools"] if isinstance(env["threadpools"], list) else []:
        print(f"threads: {p['internal_api']} {p.get('version')} {p.get('architecture')}: {p['num_threads']} threads")
    print(f"thread limit: {env['thread_limit']}")
    print(f"llvm: {env['llvm']}")
    print(f"copy bandwidth (1 thread, 16 MiB): {bw / 1e9:.1f} GB/s; W2 bound (read x + write y): "
          f"{harness.fmt_time(2 * 4 * 4_194_304 / bw)}")
    call_s = harness.call_overhead() if "graphc-llvm" in names else None
    if call_s is not None:
        print(f"call overhead: graphc-llvm {call_s * 1e6:.2f} us (4-element function)")
    print()
    print(harness.table(results, names))
    print()
    print(harness.compile_table(results, probe))
    payload = {"environment": env, "results": results, "warm_compile_s": probe, "copy_bandwidth_Bps": bw,
               "call_overhead_s": call_s,
               "quick": args.quick, "tiny": args.tiny}
    if args.json:
        harness.write_json(args.json, payload)
        print(f"\nJSON: {args.json}")
    if args.png:
        why = harness.plot(args.png, results, names)
        print(f"plot: {args.png}" if why is None else f"plot skipped: {why}")
    if args.save:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        base = os.path.join(RESULTS_DIR, harness.cpu_slug(env["processor"]))
        payload, names_all = _merge_saved(base + ".json", payload, names)
        harness.write_json(base + ".json", payload)
        why = harness.plot(base + ".png", payload["results"], names_all)
        print(f"\nsaved: {base}.json" + (f", {base}.png" if why is None else f" (plot skipped: {why})"))


def _merge_saved(path: str, payload: dict, names: list[str]) -> tuple[dict, list[str]]:
    """The payload --save writes: this run's, plus the workloads of the file already saved for this CPU
    that this run left out (a `--only W10` run keeps the others' figures). Each kept workload is listed
    under "kept_from_earlier_run" with that run's load average, so the file says which run measured it."""
    try:
        with open(path) as fh:
            old = json.load(fh)
        old_results = old["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return payload, names
    kept = {wl: row for wl, row in old_results.items() if wl not in payload["results"]}
    if not kept:
        return payload, names
    earlier = old.get("kept_from_earlier_run", {})
    # each kept workload keeps the figures its ratios were read against: the earlier run's load average,
    # copy bandwidth (W2's bound) and call overhead
    why = {wl: earlier.get(wl, {"loadavg": old.get("environment", {}).get("loadavg"),
                                "copy_bandwidth_Bps": old.get("copy_bandwidth_Bps"),
                                "call_overhead_s": old.get("call_overhead_s")}) for wl in kept}
    rows = list({**kept, **payload["results"]})
    order = sorted(rows, key=lambda wl: (int(wl[1:].split()[0]) if wl[1:].split()[0].isdigit() else 99,
                                         rows.index(wl)))
    merged = {wl: payload["results"].get(wl, kept.get(wl)) for wl in order}
    names_all = list(names) + [s for row in kept.values() for s in row if s not in names]
    names_all = list(dict.fromkeys(names_all))
    return {**payload, "results": merged, "kept_from_earlier_run": why}, names_all


if __name__ == "__main__":
    sys.exit(main())
