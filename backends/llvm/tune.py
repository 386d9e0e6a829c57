"""Host-aware choices for the llvm backend and a small tuner.

What the generated code is built for (`target_info`, shown as `f.program.info["target"]`): the CPU,
its ISA features (AVX-512 with VNNI/BF16 where present, AVX2+FMA, SSE), the vector width the
micro-kernels use, their tile shapes, and the thread split per kernel kind.

The thread split of a GEMM. OpenBLAS hands a multi-threaded sgemm to its own pool of worker threads,
which spin and yield while they wait: on a busy machine (more runnable threads than cores) a hand-off
can wait for a whole scheduler slice. Measured on a shared 2-core AMD EPYC (Zen 2) at load 3-4:
(64 x 256) @ (256 x 1024) took 0.3-0.4 ms on one thread or on two when quiet, but a median of 16-40 ms
on OpenBLAS's two threads under load. So every BLAS call the generated code makes sets OpenBLAS's
thread count for that call (`openblas_set_num_threads_local`, ~0.1 us) to `blas_threads(flops)`: one
thread below `BLAS_PARALLEL_FLOPS`, all of graphc's threads above. A batch-1 GEMV never goes to BLAS
(gemm.gemv: graphc's own loop, split across graphc's threads only above `GEMV_PARALLEL_FLOPS`).

The tuner (GRAPHC_TUNE=off|quick|full, quick by default). The first time a product shape is planned
on a CPU model, `blas_threads_for` times the BLAS product on one thread and on all threads (the same
OpenBLAS library NumPy uses, so no code is compiled for it) and keeps the faster; the winner is stored
in the on-disk cache (graphc.backends.schedule.cache, sub "tune"), keyed by the CPU model (name and
features), the product's shape and dtype and the thread count, and reused by every later process on
that CPU model. Tuning a graph stops when its budget is spent (quick: 0.5 s, full: 2 s; the rest of
its products get the size rule). off: the size rule only, nothing measured or read.
"""
from __future__ import annotations

import json
import os
import time
import weakref

import numpy as np

from . import jit

#: BLAS products below this many flops run OpenBLAS on one thread (see the module docstring)
BLAS_PARALLEL_FLOPS = 1 << 28
#: batch-1 GEMVs of at least this many flops split their columns across graphc's threads
#: (thread start-up is ~10-30 us; a (1 x 784) @ (784 x 512) GEMV takes ~10-20 us on one thread)
GEMV_PARALLEL_FLOPS = 1 << 23
#: the tuner gives a BLAS product more than one thread only when one thread takes at least this long and
#: the threads are at least PARALLEL_GAIN times faster
MIN_PARALLEL_SECONDS, PARALLEL_GAIN = 2e-3, 1.3
#: tuning budget per graph (seconds) by GRAPHC_TUNE mode
BUDGET = {"off": 0.0, "quick": 0.5, "full": 2.0}
#: timed calls per candidate by mode (the median is compared)
REPEATS = {"quick": 7, "full": 21}
CACHE_SUB = "tune"


def mode() -> str:
    m = os.environ.get("GRAPHC_TUNE", "quick").strip().lower()
    return m if m in BUDGET else "quick"


# ---- the host -----------------------------------------------------------------------------------------

def features() -> set[str]:
    return {f[1:] for f in jit.cpu_features().split(",") if f.startswith("+")}


#: GRAPHC_LLVM_ISA=avx2 (or avx512, sse) forces the micro-kernels' vector shapes for that ISA: AVX2's on an
#: AVX-512 host; AVX-512's on a smaller one (LLVM splits each 512-bit vector into two or four: slower, same
#: results; the tests use it to run the AVX-512 code path on an AVX2 machine)
ISA_CHOICES = ("avx512", "avx2+fma", "avx", "sse")


def isa() -> str:
    """The widest vector ISA the code generator targets on this host (or GRAPHC_LLVM_ISA's)."""
    forced = os.environ.get("GRAPHC_LLVM_ISA", "").strip().lower()
    if forced:
        forced = "avx2+fma" if forced == "avx2" else forced
        if forced in ISA_CHOICES:
            return forced
    f = features()
    if "avx512f" in f:
        return "avx512"
    if "avx2" in f and "fma" in f:
        return "avx2+fma"
    if "avx" in f:
        return "avx"
    return "sse"


def vector_bits() -> int:
    return {"avx512": 512, "avx2+fma": 256, "avx": 256}.get(isa(), 128)


def cpu_model() -> str:
    """CPU name and the ISA features that change generated code (the tuner's cache key)."""
    jit.target_machine()
    f = sorted(x for x in features() if x.startswith(("avx", "fma", "sse4", "f16c", "amx")))
    return f"{jit._state['cpu']}|{'/'.join(f)}"


def threads() -> int:
    from .program import num_threads
    return num_threads()


def blas_default_threads() -> int:
    """OpenBLAS's own thread count (OPENBLAS_NUM_THREADS or its default), 1 when unknown or no BLAS."""
    b = jit.blas()
    if b is None:
        return 1
    lib = b["lib"]
    for sym in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
                "openblas_get_num_threads"):
        fn = getattr(lib, sym, None)
        if fn is not None:
            fn.restype = _c_int()
            if "blas_default" not in _state:
                _state["blas_default"] = max(1, int(fn()))
            return _state["blas_default"]
    return 1


def _c_int():
    import ctypes
    return ctypes.c_int


_state: dict = {}


def set_threads_symbol():
    """(symbol bound for the JIT as gc_blas_set_threads, returns previous count) or None: OpenBLAS's
    openblas_set_num_threads_local (int -> previous int), resolved once."""
    if "set_sym" in _state:
        return _state["set_sym"]
    import ctypes
    import llvmlite.binding as llvm
    b, found = jit.blas(), None
    if b is not None:
        fn = getattr(b["lib"], "openblas_set_num_threads_local", None)
        if fn is not None:
            llvm.add_symbol("gc_blas_set_threads", ctypes.cast(fn, ctypes.c_void_p).value)
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
            found = fn
    _state["set_sym"] = found
    return found


def max_blas_threads() -> int:
    return max(1, min(threads(), blas_default_threads()))


def blas_threads(flops: int) -> int:
    """The size rule: one thread below BLAS_PARALLEL_FLOPS, else every thread graphc and OpenBLAS allow."""
    return 1 if flops < BLAS_PARALLEL_FLOPS else max_blas_threads()


# ---- the tuner --------------------------------------------------------------------------------------------

_spent: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # plan -> tuning seconds spent on it
_memo: dict = {}      # (kind, key) -> decision, this process
log: list = []        # (kind, shape, decision, source) of decisions made in this process (tests, info)
_products: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # graph -> its BLAS products' choices


def products(graph) -> list:
    """The BLAS products planned for `graph` so far: "n x k x m dtype: T threads (source)" (a live list)."""
    return _products.setdefault(graph, [])


def _record(owner, n, k, m, dtype, threads, source):
    g = getattr(owner, "graph", None)
    if g is not None:
        try:
            products(g).append(f"{n}x{k}x{m} {dtype}: {threads} thread{'s' * (threads > 1)} ({source})")
        except TypeError:
            pass


def _cache_name(*parts) -> str:
    from graphc.backends.schedule import cache
    return cache.key("tune v2", cpu_model(), *map(str, parts)) + ".json"


def _load(name: str):
    from graphc.backends.schedule import cache
    blob = cache.load_blob(CACHE_SUB, name)
    if blob is None:
        return None
    try:
        return json.loads(blob.decode())
    except ValueError:
        return None


def _store(name: str, value) -> None:
    from graphc.backends.schedule import cache
    from graphc.errors import GraphcError
    try:
        cache.store_blob(CACHE_SUB, name, json.dumps(value).encode())
    except GraphcError:
        pass   # nowhere to write: the decision holds for this process only


def _median_time(fn, repeats: int) -> float:
    fn()   # warm-up (pages, caches, worker threads)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def blas_threads_for(owner, n: int, k: int, m: int, dtype: str) -> tuple[int, str]:
    """(threads, source) for a BLAS product (n x k) @ (k x m) (see _blas_threads_for), recorded for the
    graph's info["target"]."""
    t, src = _blas_threads_for(owner, n, k, m, dtype)
    _record(owner, n, k, m, dtype, t, src)
    return t, src


def _blas_threads_for(owner, n: int, k: int, m: int, dtype: str) -> tuple[int, str]:
    """(threads, source) for a BLAS product (n x k) @ (k x m): the tuned choice ("cache", "tuned") or the
    size rule ("rule": tuner off, budget spent, nothing to choose). `owner` (the plan) carries the budget."""
    flops = 2 * n * k * m
    top = max_blas_threads()
    rule = blas_threads(flops)
    md = mode()
    if md == "off" or top == 1 or set_threads_symbol() is None or flops < (1 << 20):
        return rule, "rule"
    key = ("blas", n, k, m, dtype, top, md)
    if key in _memo:
        return _memo[key], "cache"
    name = _cache_name(*key)
    hit = _load(name)
    if isinstance(hit, dict) and hit.get("threads") in (1, top):
        _memo[key] = int(hit["threads"])
        log.append(("blas", (n, k, m, dtype), _memo[key], "cache"))
        return _memo[key], "cache"
    spent = _spent.get(owner, 0.0) if owner is not None else 0.0
    if spent >= BUDGET[md]:
        return rule, "rule"
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal((k, m)).astype(dtype)
    c = np.empty((n, m), dtype)
    fn = set_threads_symbol()
    reps = REPEATS[md]
    # a product too slow to time `reps` times within what is left of the budget is timed fewer times
    est = flops / 20e9
    reps = int(max(3, min(reps, (BUDGET[md] - spent) / max(est * 2 * top, 1e-6))))
    times = {}
    prev = fn(1)
    try:
        for t in (1, top):
            fn(t)
            times[t] = _median_time(lambda: np.matmul(a, b, out=c), reps)
    finally:
        fn(prev)
    # more threads only where they pay clearly and a stalled hand-off (a scheduler slice, ~ms) is small
    # against the product: a quiet moment's 1.5x on a 0.4 ms product is not worth a 40 ms stall under load
    best = top if (times[1] >= MIN_PARALLEL_SECONDS and times[top] * PARALLEL_GAIN <= times[1]) else 1
    if owner is not None:
        _spent[owner] = spent + time.perf_counter() - t0
    _memo[key] = best
    _store(name, {"threads": best, "seconds": {str(t): s for t, s in times.items()}})
    log.append(("blas", (n, k, m, dtype), best, "tuned"))
    return best, "tuned"


def spent(owner) -> float:
    return _spent.get(owner, 0.0)


# ---- what f.program.info["target"] shows -------------------------------------------------------------------

def target_info(graph=None) -> dict:
    """The host and the code-generation choices made for it (f.program.info["target"]; with `graph`, its
    BLAS products' thread counts as they are planned)."""
    from . import gemm, kernels
    f = features()
    lanes32, nv, rows = gemm.vector_shape("float32")
    b = jit.blas()
    return {
        "cpu": jit._state.get("cpu") or (jit.target_machine() and jit._state["cpu"]),
        "isa": isa(),
        "features": sorted(x for x in f if x.startswith(("avx512", "avx2", "fma", "avxvnni", "f16c", "amx"))),
        "vector_bits": vector_bits(),
        "threads": threads(),
        "gemm": {"micro_kernel": f"{rows[0]} rows x {nv} vectors of {lanes32} float32 (row tiles {list(rows)})",
                 "small_macs": gemm.SMALL_MACS,
                 "blas": None if b is None else os.path.basename(b["library"]),
                 "blas_threads": f"1 below {BLAS_PARALLEL_FLOPS:.3g} flops, else {max_blas_threads()} "
                                 f"(per call; tuned per shape: GRAPHC_TUNE={mode()})"
                                 if set_threads_symbol() else "OpenBLAS's own choice",
                 "products": [] if graph is None else products(graph),
                 "gemv": f"graphc's loop (batch 1), split over {threads()} threads from "
                         f"{GEMV_PARALLEL_FLOPS:.3g} flops"},
        "elementwise": {"vector_bits": vector_bits(), "parallel_min_elements": kernels.PARALLEL_MIN},
        "tune": {"mode": mode(), "budget_s": BUDGET[mode()]},
    }
