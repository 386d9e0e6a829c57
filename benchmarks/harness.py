"""Timing, output checks, environment facts, and the table / JSON / PNG reports."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np

from .systems import Missing

GRAPHC_SYSTEMS = ("graphc-numpy O0", "graphc-numpy O2", "graphc-llvm")


def fmt_time(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us" if s >= 1e-5 else f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def check(out, ref, wl_id) -> str | None:
    """None if `out` matches the float64 reference to float32 accuracy, else what differs."""
    out = np.asarray(out)
    if out.shape != ref.shape:
        return f"shape {out.shape} != {ref.shape}"
    tol = 2e-3 if wl_id.startswith(("W4", "W5", "W7", "W8", "W9", "W10")) else 1e-3
    # relative error, with entries near zero judged against 1% of the output's largest magnitude
    scale = 1e-2 * float(np.max(np.abs(ref))) if ref.size else 0.0
    err = np.abs(out.astype(np.float64) - ref) / (np.abs(ref) + scale + 1e-6)
    if not np.all(np.isfinite(out)) or err.max() > tol:
        return f"max relative error {err.max():.2e}"
    return None


#: seconds of back-to-back calls before a system's samples (quick, full): its thread pool awake, its data
#: in cache and the cores out of their idle states, as in the samples that follow (a quick run's 7 samples
#: of 2 ms each are otherwise short enough to time a system's first calls after its build). On the 2-core
#: Zen 1 VM this did not remove the larger swings: graphc's W1 b1 reads 33-37 us and 45-60 us in phases
#: seconds apart, in one process, with the same kernels (a VM's neighbours), whatever the warm-up
WARMUP_S = (0.2, 0.5)


def _calls_per_sample(fn, quick: bool) -> int:
    """How many calls of fn one sample times (a sample lasts a few ms), after WARMUP_S of back-to-back calls
    (at least two; the median of their times sets the count)."""
    end = time.perf_counter() + WARMUP_S[0 if quick else 1]
    times = []
    while len(times) < 2 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    one = max(statistics.median(times[1:]), 1e-7)
    return max(1, min(10000, int((2e-3 if quick else 5e-3) / one)))


def _samples_and_budget(quick: bool) -> tuple[int, float]:
    """(samples per system, seconds after which timing stops once there are three)."""
    return (7, 3.0) if quick else (25, 20.0)


def _sample(fn, number: int) -> float:
    """Seconds per call over `number` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _summary(per: list, number: int) -> dict:
    return {"min": min(per), "median": statistics.median(per), "calls": number * len(per)}


def time_calls(fn, quick: bool) -> dict:
    """min and median seconds per call: samples of `number` calls each (a sample lasts >= a few ms)."""
    number = _calls_per_sample(fn, quick)
    samples, budget = _samples_and_budget(quick)
    per = []
    start = time.perf_counter()
    for _ in range(samples):
        per.append(_sample(fn, number))
        if time.perf_counter() - start > budget and len(per) >= 3:
            break
    return _summary(per, number)


def measure(system: str, build, wl, quick: bool) -> dict:
    res, fn = prepare(system, build, wl)
    if fn is not None:
        res.update(time_calls(fn, quick))
    return res


def prepare(system: str, build, wl) -> tuple[dict, object]:
    """Build `system`'s callable for `wl`, run it once and check the output: (result so far, callable or
    None when it is missing or wrong)."""
    t0 = time.perf_counter()
    try:
        fn = build(wl)
    except Missing as e:
        return {"status": str(e)}, None
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn()
    first_s = time.perf_counter() - t0
    bad = check(out, wl.reference, wl.id)
    if bad:
        return {"status": f"WRONG ({bad})", "compile_s": compile_s}, None
    return {"status": "ok", "compile_s": compile_s, "first_call_s": first_s}, fn


#: pause before each system's sample in an interleaved round (the previous system's spinning threads:
#: OpenBLAS's workers busy-wait ~2^28 cycles after a call before they sleep). With 20 ms, graphc's
#: threaded kernels ran beside NumPy's spinning OpenBLAS threads (W6 57 ms instead of 31 on the 2-core
#: Zen 1 VM); with 250 ms every system there came back slower and noisier from the pause (the VM's vCPUs
#: idle), so the default remains timing the systems one after another (`--interleave` asks for rounds)
GAP_S = 0.25


def time_interleaved(fns: dict, quick: bool) -> dict:
    """{name: min and median seconds per call} for callables timed in rounds, one sample of each per
    round (each sample: an untimed call, then `number` timed calls lasting a few ms): on a shared host
    whose speed changes from minute to minute (a VM whose cores are moved, a neighbour's load), every
    system sees the same phases, so the ratios compare like with like where timing the systems one
    after another compared a fast phase with a slow one."""
    samples, budget = _samples_and_budget(quick)
    budget *= max(1, len(fns))
    number = {name: _calls_per_sample(fn, quick) for name, fn in fns.items()}
    per: dict = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(samples):
        for name, fn in fns.items():
            time.sleep(GAP_S)
            fn()
            per[name].append(_sample(fn, number[name]))
        if time.perf_counter() - start > budget and len(per[name]) >= 3:
            break
    return {name: _summary(ts, number[name]) for name, ts in per.items()}


def environment() -> dict:
    info = {"machine": platform.machine(), "processor": _cpu_name(), "python": platform.python_version(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
            "thread_limit": os.environ.get("GRAPHC_BENCH_THREADS") or "system defaults"}
    try:
        from threadpoolctl import threadpool_info
        info["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version",
                                                      "architecture", "filepath")} for p in threadpool_info()]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    try:
        from graphc.backends.llvm import jit
        jit.target_machine()
        b = jit.blas()
        info["llvm"] = {"cpu": jit._state["cpu"], "blas": None if b is None else
                        {"library": b["library"], "symbols": b["symbols"], "ilp64": b["ilp64"],
                         "prefault": b.get("prefault")}}
    except Exception as e:   # the report says why instead of failing
        info["llvm"] = f"unavailable: {e}"
    return info


def _cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with its family and model numbers (virtual machines often
    report only 'AMD EPYC'): 'AMD EPYC (family 23 model 49)'."""
    from graphc.explain import cpu_model
    return cpu_model()


def cpu_slug(name: str) -> str:
    """A file name for a CPU model: 'AMD EPYC 7B12 64-Core Processor' -> 'amd-epyc-7b12-64-core-processor'."""
    import re
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-cpu"


def copy_bandwidth() -> float:
    """Bytes per second of a single-threaded NumPy copy of 16 MiB (read + write counted)."""
    x = np.ones(4_194_304, np.float32)
    y = np.empty_like(x)
    best = min(_t(lambda: np.copyto(y, x)) for _ in range(20))
    return 2 * x.nbytes / best


def call_overhead(backend: str = "llvm") -> float | None:
    """Seconds per call of a compiled 4-element function (x * w + 1.0, float32) called with a ready
    array: the Python-to-native call's cost (min over repeats of timeit); None if the backend is unusable."""
    import timeit
    import graphc as gc
    try:
        x = gc.placeholder("x", (4,), "float32")
        w = gc.parameter("w", np.arange(4, dtype=np.float32))
        f = gc.function([x], x * w + 1.0, backend=backend)
    except gc.GraphcError:
        return None
    a = np.ones(4, np.float32)
    f(a)
    n = 5_000
    return min(timeit.repeat(lambda: f(a), number=n, repeat=20)) / n


def _t(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_peer(row: dict) -> tuple[str | None, float | None]:
    peers = [(r["median"], s) for s, r in row.items() if s not in GRAPHC_SYSTEMS and r.get("status") == "ok"]
    if not peers:
        return None, None
    m, s = min(peers)
    return s, m


def table(results: dict, systems: list[str]) -> str:
    """Plain-text table: median (min) per call; the last columns compare graphc-llvm with the best peer."""
    head = ["workload"] + systems + ["best peer", "llvm / best"]
    rows = [head]
    for wl_id, row in results.items():
        cells = [wl_id]
        for s in systems:
            r = row.get(s, {})
            if r.get("status") == "ok":
                cells.append(f"{fmt_time(r['median'])} ({fmt_time(r['min'])})")
            else:
                cells.append(r.get("status", "-"))
        peer, m = best_peer(row)
        llvm = row.get("graphc-llvm", {})
        cells.append(f"{peer} {fmt_time(m)}" if peer else "-")
        cells.append(f"{llvm['median'] / m:.2f}x" if peer and llvm.get("status") == "ok" else "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compile_table(results: dict, probe: dict) -> str:
    lines = ["compile times (build + first call: graph passes, codegen, specialisation for the batch size; "
             "graphc-llvm cold = empty cache, warm = a new process reusing the on-disk cache)"]
    for wl_id, row in results.items():
        parts = []
        for s in GRAPHC_SYSTEMS:
            r = row.get(s, {})
            if r.get("status") == "ok":
                parts.append(f"{s} {fmt_time(r['compile_s'] + r['first_call_s'])}")
        if wl_id in probe:
            parts.append(f"graphc-llvm warm {fmt_time(probe[wl_id])}")
        for s in ("torch.compile", "onnxruntime", "jax"):
            r = row.get(s, {})
            if r.get("status") == "ok":
                parts.append(f"{s} {fmt_time(r['compile_s'] + r['first_call_s'])}")
        lines.append(f"  {wl_id:8s} " + ", ".join(parts))
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)


def plot(path: str, results: dict, systems: list[str]) -> str | None:
    """A bar chart of each system's median relative to the best peer (log scale); None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    wls = list(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(wls)), 4.5))
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        ys = []
        for w in wls:
            _, m = best_peer(results[w])
            r = results[w].get(s, {})
            ys.append(r["median"] / m if m and r.get("status") == "ok" else np.nan)
        ax.bar(np.arange(len(wls)) + i * width, ys, width, label=s)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(wls)) + 0.4 - width / 2)
    ax.set_xticklabels(wls)
    ax.set_ylabel("median time / best peer's")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
