"""Host-aware choices for the llvm backend and a small tuner.

What the generated code is built for (`target_info`, shown as `f.program.info["target"]`): the CPU,
its ISA features (AVX-512 with VNNI/BF16 where present, AVX2+FMA, SSE), the vector width the
micro-kernels use, their tile shapes, and the thread split per kernel kind.

Threads. Split kernels run on graphc's persistent native pool (pool.py: workers created once, woken by
a generation counter, chunks claimed dynamically by the caller and the workers, so a descheduled worker
costs nothing but its share). OpenBLAS's own threads are not used: they hand work over by spinning and
yielding, and on a busy machine a hand-off waited a whole scheduler slice (a shared 2-core AMD EPYC Zen 2
at load 3-4: (64 x 256) @ (256 x 1024) took 0.3-0.4 ms on one thread but 16-40 ms on OpenBLAS's two).
Instead a BLAS product split over T threads is cut into T blocks of rows or columns (gemm.split_blocks),
each one OpenBLAS call on one thread (`openblas_set_num_threads_local(1)`, set around the dispatch),
and the blocks run on the pool. `blas_threads(flops)` is the size rule: one thread below
`BLAS_PARALLEL_FLOPS`, the pool above. A batch-1 GEMV (gemm.gemv: graphc's own loop) splits its output
blocks over the pool from `GEMV_PARALLEL_FLOPS`, a micro-kernel product (gemm.gemm_tiles) its column
blocks from `TILES_PARALLEL_FLOPS`. OpenBLAS's idle threads busy-wait ~0.1 s after each threaded call
(a user's NumPy product): a dispatch stops them first when it is safe (pool.py, `quiet_openblas`), and
graphc's own thread-count pinning goes through the pool's wrapper (`gc_pool_blas_threads`), which does
not re-create them.

The tuner (GRAPHC_TUNE=off|quick|full, quick by default). The first time a BLAS product shape is planned
on a CPU model, `blas_threads_for` compiles the product's kernel as the plan would (one BLAS call on one
thread, and the same kernel split over the pool), times both (the minimum of interleaved runs) and
keeps the faster (the split unless one thread wins by more than SPLIT_MARGIN); the winner is stored in
the on-disk cache (graphc.backends.schedule.cache, sub "tune"), keyed by the CPU model (name and
features), the product's shape and dtype and the thread count, and reused by every later process on
that CPU model (a decision timed while the load average exceeds the cores is kept for this process
only). The same way, `kernel_for` chooses between the vector micro-kernel and BLAS for a single product
the size rule gives the micro-kernel (outside loops, from KERNEL_TUNE_FLOPS): on a 2-core EPYC Zen 1,
OpenBLAS wins on narrow outputs ((256 x 256) @ (256 x 10): 59-69 against 108 us). Tuning a graph stops
when its budget is
spent (quick: 0.5 s, full: 2 s; the rest of its products get the size rule). off: the size rule only,
nothing measured or read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import weakref

import numpy as np

from . import jit

#: BLAS products of at least this many flops split over the pool (the size rule; ~40 us on one core against
#: a dispatch of ~1 us to an awake worker; a worker that sleeps or is descheduled leaves its block to the caller)
BLAS_PARALLEL_FLOPS = 1 << 22
#: batch-1 GEMVs of at least this many flops split their output blocks over the pool
#: (a (1 x 256) @ (256 x 512) GEMV reads 0.5 MB of weights: ~10 us on one core)
GEMV_PARALLEL_FLOPS = 1 << 18
#: one micro-kernel product (no batch) of at least this many flops splits its column blocks over the pool
#: (the LSTM step's (16 x 128) @ (128 x 512): 2 MFLOP, ~30 us on one core)
TILES_PARALLEL_FLOPS = 1 << 20
#: the tuner keeps one thread only when the split's time exceeds one thread's by more than this factor
SPLIT_MARGIN = 1.1
#: ... and stores that choice in the on-disk cache only when the split is slower by this factor (a narrower
#: win holds for this process only: seen on the 2-core Zen 1 VM in a phase where the second vCPU gained
#: nothing, 1.63 against 1.80 ms for W1 b256's product, which splits to nearly half in a calm minute)
PERSIST_MARGIN = 1.3
#: BLAS products of at least this many flops split without timing: each thread's block is a millisecond or
#: more of OpenBLAS (the dispatch is microseconds), so the split wins wherever the second core runs at all
#: (1.2-1.4x on the 2-core Zen 1 VM in a slow phase, 128x256x2048 to 1024^3), while the probe itself
#: (compile, warm-up and three rounds of both) costs 40 ms at 134 MFLOP and 0.4 s at 1024^3, a cold
#: compile's largest part (W6; te12's FFN products)
TUNE_MAX_FLOPS = 1 << 26
#: tuning budget per graph (seconds) by GRAPHC_TUNE mode
BUDGET = {"off": 0.0, "quick": 0.5, "full": 2.0}
#: timed calls per candidate by mode (the median is compared)
REPEATS = {"quick": 7, "full": 21}
CACHE_SUB = "tune"


def mode() -> str:
    m = os.environ.get("GRAPHC_TUNE", "quick").strip().lower()
    return m if m in BUDGET else "quick"


# ---- the host -----------------------------------------------------------------------------------------

def features() -> frozenset[str]:
    """The host's enabled LLVM features (parsed once per feature string: the planner asks per kernel)."""
    s = jit.cpu_features()
    got = _state.get("features")
    if got is None or got[0] is not s:
        got = _state["features"] = (s, frozenset(f[1:] for f in s.split(",") if f.startswith("+")))
    return got[1]


#: GRAPHC_LLVM_ISA=avx2 (or avx512, avx, sse) builds the code for that ISA level: on a host that has wider
#: vectors, its machine code (jit.cpu_features turns the wider ISAs' features off: an AVX-512 host runs AVX2
#: code, any host the SSE fallback) and its micro-kernels' vector shapes; on a host without the level
#: (avx512 on an AVX2 machine) the vector shapes only (LLVM splits each 512-bit vector into two or four:
#: slower, same results; the tests use it to run the AVX-512 code path on an AVX2 machine)
ISA_CHOICES = tuple(lv for lv, _ in jit.ISA_LEVELS)


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
            # the pool's wrapper where it has OpenBLAS's server bound: the same call, except while the pool
            # has stopped OpenBLAS's spinning threads (pool.py), where it sets the count without re-creating them
            from . import pool
            addr = pool.blas_threads_symbol() or ctypes.cast(fn, ctypes.c_void_p).value
            llvm.add_symbol("gc_blas_set_threads", addr)
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
            found = fn
    _state["set_sym"] = found
    return found


def max_blas_threads() -> int:
    """Threads a BLAS product may be split over: graphc's (its pool), when OpenBLAS can be held to one
    thread per call; else 1 (OpenBLAS then makes its own choice)."""
    return threads() if set_threads_symbol() is not None else 1


def blas_threads(flops: int) -> int:
    """The size rule: one thread below BLAS_PARALLEL_FLOPS, else split over every thread graphc has."""
    return 1 if flops < BLAS_PARALLEL_FLOPS else max_blas_threads()


# ---- the tuner --------------------------------------------------------------------------------------------

_spent: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # plan -> tuning seconds spent on it
_memo: dict = {}      # (kind, key) -> decision, this process
log: list = []        # (kind, shape, decision, source) of decisions made in this process (tests, info)
_products: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # graph -> its BLAS products' choices


def products(graph) -> list:
    """The BLAS products planned for `graph` so far: "n x k x m dtype: T threads (source)" (a live list)."""
    return _products.setdefault(graph, [])


def _note(owner, line: str) -> None:
    """Add a product's choice to its graph's info["target"]["gemm"]["products"] (when the owner has a graph)."""
    g = getattr(owner, "graph", None)
    if g is not None:
        try:
            products(g).append(line)
        except TypeError:
            pass


def _record(owner, n, k, m, dtype, threads, source):
    _note(owner, f"{n}x{k}x{m} {dtype}: {threads} thread{'s' * (threads > 1)} ({source})")


def _cache_name(*parts) -> str:
    from graphc.backends.schedule import cache
    return cache.key("tune v4 prefaulted blas buffers", cpu_model(), *map(str, parts)) + ".json"


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


#: owner (a plan) -> [(n, k, m, dtype, threads)] of every BLAS product it asked about (the warm-start
#: cache records them with the program and checks them with `decided` before reusing it)
decisions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def blas_threads_for(owner, n: int, k: int, m: int, dtype: str) -> tuple[int, str]:
    """(threads, source) for a BLAS product (n x k) @ (k x m) (see _blas_threads_for), recorded for the
    graph's info["target"]."""
    t, src = _blas_threads_for(owner, n, k, m, dtype)
    _record(owner, n, k, m, dtype, t, src)
    if owner is not None:
        decisions.setdefault(owner, []).append((n, k, m, dtype, t))
    return t, src


def decided(n: int, k: int, m: int, dtype: str) -> tuple[int, str] | None:
    """(threads, source) for a BLAS product when it needs no timing (the size rule where nothing is
    tuned, a decision of this process or of the on-disk cache), else None (_blas_threads_for times it).
    A kernel choice (`kernel_for`) is asked with dtype "kernel:<dtype>" and answered 0 (the micro-kernel) or
    1 (BLAS)."""
    if dtype.startswith(KERNEL_TAG):
        return _kernel_decided(n, k, m, dtype[len(KERNEL_TAG):])
    if dtype.startswith(PACKED_TAG):
        return _packed_decided(n, k, m, dtype[len(PACKED_TAG):])
    if dtype.startswith(PACKED_T_TAG):
        return _packed_decided(n, k, m, dtype[len(PACKED_T_TAG):], transposed=True)
    flops = 2 * n * k * m
    top = max_blas_threads()
    rule = blas_threads(flops)
    md = mode()
    if md == "off" or top == 1 or set_threads_symbol() is None or not (1 << 20) <= flops < TUNE_MAX_FLOPS:
        return rule, "rule"
    from .gemm import split_blocks
    if split_blocks(n, m, top, dtype) is None or n == 1 or m == 1:   # nothing to split: nothing to time
        return rule, "rule"
    key = ("blas", n, k, m, dtype, top, md)
    if key in _memo:
        return _memo[key], "cache"
    hit = _load(_cache_name(*key))
    if isinstance(hit, dict) and hit.get("threads") in (1, top):
        _memo[key] = int(hit["threads"])
        log.append(("blas", (n, k, m, dtype), _memo[key], "cache"))
        return _memo[key], "cache"
    return None


def _blas_threads_for(owner, n: int, k: int, m: int, dtype: str) -> tuple[int, str]:
    """(threads, source) for a BLAS product (n x k) @ (k x m): the tuned choice ("cache", "tuned") or the
    size rule ("rule": tuner off, budget spent, nothing to choose). `owner` (the plan) carries the budget."""
    known = decided(n, k, m, dtype)
    if known is not None:
        return known
    flops = 2 * n * k * m
    top = max_blas_threads()
    rule = blas_threads(flops)
    md = mode()
    key = ("blas", n, k, m, dtype, top, md)
    name = _cache_name(*key)
    spent = _spent.get(owner, 0.0) if owner is not None else 0.0
    if spent >= BUDGET[md]:
        return rule, "rule"
    t0 = time.perf_counter()
    reps = REPEATS[md]
    # a product too slow to time `reps` times within what is left of the budget is timed fewer times
    est = flops / 50e9
    reps = int(max(3, min(reps, (BUDGET[md] - spent) / max(est * 2, 1e-6))))
    try:
        times = _time_split(n, k, m, dtype, top, reps)
    except Exception:   # noqa: BLE001 -- a probe that cannot be built or run: the size rule decides
        return rule, "rule"
    # the pool split unless one thread is clearly faster: a late or descheduled worker costs the split
    # little (its blocks fall to the caller), so a close call (timing noise on a busy machine) goes to it
    best = 1 if times[1] * SPLIT_MARGIN < times[top] else top
    if owner is not None:
        _spent[owner] = spent + time.perf_counter() - t0
    _memo[key] = best
    # a one-thread decision is kept on disk only when timed on a quiet machine and won by PERSIST_MARGIN:
    # a shared VM has phases of minutes where its second core gains nothing (the split 1.1x slower than one
    # thread), and a one-thread decision stored then would halve the product's speed in every later
    # process. The split is kept even when timed on a busy machine: load slows the split (its second
    # thread shares a core), so a split that wins under load wins on a quiet machine too (and a later
    # process, its warm start, need not time it again)
    if best == top or (not _busy() and times[top] >= PERSIST_MARGIN * times[1]):
        _store(name, {"threads": best, "seconds": {str(t): s for t, s in times.items()}})
    log.append(("blas", (n, k, m, dtype), best, "tuned"))
    return best, "tuned"


_probes: dict = {}

# ---- micro-kernel or BLAS for a small product ----------------------------------------------------------------

#: the decisions list's (and the warm-start cache's) dtype for a kernel choice: "kernel:float32"
KERNEL_TAG = "kernel:"
#: the micro-kernel is kept unless BLAS is faster by more than this factor
KERNEL_MARGIN = 1.1
#: products of fewer flops keep the micro-kernel untimed (a few microseconds: the choice matters little and
#: every distinct shape would cost two probe compiles)
KERNEL_TUNE_FLOPS = 1 << 17


def _kernel_key(n, k, m, dtype):
    # the ISA the micro-kernel is generated for (GRAPHC_LLVM_ISA may force another than the host's): an
    # AVX-512 micro-kernel on an AVX2 host is split in halves and loses to BLAS where the AVX2 one wins
    return ("kernel", n, k, m, dtype, max_blas_threads(), mode(), isa())


def _kernel_decided(n: int, k: int, m: int, dtype: str) -> tuple[int, str] | None:
    """(0 micro-kernel | 1 BLAS, source) when known without timing: the size rule's micro-kernel when nothing
    is tuned, else this process's or the on-disk cache's decision; None: it would be timed."""
    if mode() == "off" or jit.blas() is None or 2 * n * k * m < KERNEL_TUNE_FLOPS:
        return 0, "rule"
    return _known_choice(_kernel_key(n, k, m, dtype), "blas")


def _known_choice(key: tuple, field: str) -> tuple[int, str] | None:
    """A two-way choice (0 or 1) this process or the on-disk cache (stored as {field: choice}) already holds."""
    if key in _memo:
        return _memo[key], "cache"
    hit = _load(_cache_name(*key))
    if isinstance(hit, dict) and hit.get(field) in (0, 1):
        _memo[key] = int(hit[field])
        return _memo[key], "cache"
    return None


def _timed_choice(owner, kind: str, shape: tuple, key: tuple, field: str, timer, pick) -> tuple[int, str]:
    """A two-way choice the tuner does not know yet: within the owner's tuning budget, timer(mode, spent)
    times both ways ({name: seconds}), pick(times) gives 0 or 1, kept in this process and (timed on a
    quiet machine) on disk as {field: choice}; (choice, "tuned"), or (0, "rule") when the budget is spent
    or the probe cannot be built or run."""
    md = mode()
    spent = _spent.get(owner, 0.0) if owner is not None else 0.0
    if spent >= BUDGET[md]:
        return 0, "rule"
    t0 = time.perf_counter()
    try:
        times = timer(md, spent)
    except Exception:   # noqa: BLE001 -- a probe that cannot be built or run: the rule decides
        times = None
    if owner is not None:
        _spent[owner] = spent + time.perf_counter() - t0
    if times is None:
        return 0, "rule"
    best = pick(times)
    _memo[key] = best
    if not _busy():
        _store(_cache_name(*key), {field: best, "seconds": times})
    log.append((kind, shape, best, "tuned"))
    return best, "tuned"


def kernel_for(owner, n: int, k: int, m: int, dtype: str) -> tuple[str, str]:
    """("tiles" | "blas", source) for a single (n x k) @ (k x m) product the size rule gives the vector
    micro-kernel (gemm.small): the first time the shape is planned on a CPU model, both are compiled as
    the plan would run them (the micro-kernel's column blocks and BLAS's row or column blocks on the pool
    where their size rules split them), timed interleaved (minimum of REPEATS), and BLAS taken only when
    faster by more than KERNEL_MARGIN; kept like the thread decisions (on-disk, keyed by the CPU model;
    not stored when timed on a busy machine), within the graph's tuning budget. Measured on a 2-core
    EPYC Zen 1 (one thread): (256 x 256) @ (256 x 10) 108 us with the micro-kernel (a 16-column tile, 10
    live) against 59-69 us in OpenBLAS; (64 x 400) @ (400 x 120) 178 against 190 us."""
    known = _kernel_decided(n, k, m, dtype)
    if known is None:
        known = _timed_choice(owner, "kernel", (n, k, m, dtype), _kernel_key(n, k, m, dtype), "blas",
                              lambda md, spent: _time_kernels(n, k, m, dtype, REPEATS[md]),
                              lambda times: 1 if times["blas"] * KERNEL_MARGIN < times["tiles"] else 0)
    choice = "blas" if known[0] else "tiles"
    _note(owner, f"{n}x{k}x{m} {dtype}: {'BLAS' if known[0] else 'micro-kernel'} ({known[1]})")
    if owner is not None:
        decisions.setdefault(owner, []).append((n, k, m, KERNEL_TAG + dtype, known[0]))
    return choice, known[1]


# ---- a large product's right operand packed every call, or BLAS ---------------------------------------------

#: the decisions list's dtype for a per-call packing choice: "packed:float32"
PACKED_TAG = "packed:"
#: ... and for a product whose b is W^T (packed by shuffled blocks): "packed^T:float32"
PACKED_T_TAG = "packed^T:"
#: products of at least this many flops (that the size rules give to BLAS) may instead pack their right
#: operand each call (gemm.pack_panels, split over the pool) and run the micro-kernel over the panels:
#: timed the first time the shape is planned on a CPU model. Below it the packing's share of the time, and
#: the probe's compile, are not worth it. On the Intel Xeon (AVX-512, 2 cores) 1024^3 ran 6.1 ms packed
#: against OpenBLAS's 6.8 ms (MKL, torch's: 6.2); on the Zen 1 VM BLAS was as fast or faster from 1024 rows.
#: From 1 << 24 (was 1 << 26) a training step's weight products are timed too: W5's x @ W (64 x 784 x 512,
#: 64 x 512 x 256; W updated every call, so never packed once) and its SGD updates W - lr * (X^T @ dY), whose
#: region then folds into the tiles (epilogue.fold): on the Intel Xeon (in-process A/B, 15 interleaved rounds)
#: W5 1,108 -> 1,015 us a step; W8 and W9 even
PACKED_CALL_FLOPS = 1 << 24
#: ... and at least this many rows (the packing, O(k m), is repaid over the n rows)
PACKED_CALL_ROWS = 64
#: the packed product is taken only when faster than BLAS by more than this factor
PACKED_MARGIN = 1.03


def _packed_key(n, k, m, dtype, transposed: bool = False):
    return ("packcall aligned", n, k, m, dtype, threads(), max_blas_threads(), mode(), isa()) + \
        (("b transposed",) if transposed else ())


def _packed_decided(n: int, k: int, m: int, dtype: str, transposed: bool = False) -> tuple[int, str] | None:
    """(1 packed | 0 BLAS, source) when known without timing (BLAS when nothing is tuned), else None."""
    if mode() == "off" or jit.blas() is None:
        return 0, "rule"
    return _known_choice(_packed_key(n, k, m, dtype, transposed), "packed")


def packed_for(owner, n: int, k: int, m: int, dtype: str, transposed: bool = False) -> tuple[bool, str]:
    """(pack b every call?, source) for a single (n x k) @ (k x m) product that would call BLAS: the first
    time the shape is planned on a CPU model (within the graph's tuning budget), the packing and the
    micro-kernel over its panels are compiled and run as the plan would run them (both split over the pool),
    timed interleaved with the product as BLAS runs it (split as blas_threads_for's rule splits it), the
    minimum of a few runs each (fewer for products of milliseconds), and the packed product kept when faster
    by more than PACKED_MARGIN; the decision is stored like the others (on disk, by CPU model; not when
    timed on a busy machine). With the tuner off, or its budget spent: BLAS, as before the tuner.
    `transposed`: b is W^T of a row-major W (b's columns contiguous; gemm.TRANSPOSED_PACK), timed so."""
    known = _packed_decided(n, k, m, dtype, transposed)
    if known is None:
        def timer(md, spent):   # a product of milliseconds is timed fewer times within what is left
            est = 2 * n * k * m / 50e9
            return _time_packed(n, k, m, dtype,
                                int(max(3, min(REPEATS[md], (BUDGET[md] - spent) / max(est * 2, 1e-6)))),
                                transposed)
        known = _timed_choice(owner, "packcall", (n, k, m, dtype) + (("b^T",) if transposed else ()),
                              _packed_key(n, k, m, dtype, transposed), "packed", timer,
                              lambda times: 1 if times["packed"] * PACKED_MARGIN < times["blas"] else 0)
    if owner is not None:
        decisions.setdefault(owner, []).append((n, k, m, (PACKED_T_TAG if transposed else PACKED_TAG) + dtype,
                                                known[0]))
    return bool(known[0]), known[1]


def _time_packed(n: int, k: int, m: int, dtype: str, reps: int, transposed: bool = False) -> dict:
    """{"packed": seconds, "blas": seconds}: the minimum over `reps` interleaved runs of the product with b
    packed (the packing and the micro-kernel, each split as the plan splits it; one kernel with
    gemm.PACK_INSIDE) and of the BLAS product
    (split by the size rule); both checked against a float64 product. `transposed`: b is the transpose of
    a row-major (m, k) array."""
    import ctypes
    from graphc._aligned import aligned_bytes
    from . import gemm
    from ..schedule.views import View
    t = threads()
    inside = gemm.packs_inside(n, k, m, dtype, t)   # the packing inside the product kernel where the plan
    # packs it there (matmul's `pack`)
    key = ("packcall", n, k, m, dtype, t, inside, transposed)
    if key not in _probes:
        out, a, b = (View(i, 0, sh, (sh[1], 1), dtype) for i, sh in enumerate([(n, m), (n, k), (k, m)]))
        if transposed:
            b = View(2, 0, (k, m), (1, k), dtype)
        nr = gemm.panel_width(n, dtype)
        pk = View(3, 0, (gemm.packed_size(k, m, nr),), (1,), dtype)
        bp = View(3, 0, (k, m), (nr, 1), dtype)
        packing = gemm.pack_panels(pk, b, nr, split=True)
        _probes[key] = (gemm.packed_size(k, m, nr), {
            **({} if inside else {"pack": _probe(packing, 4, (t,))}),
            "tiles": _probe(gemm.matmul(out, a, bp, blas="tiles", packed=True, pack=packing if inside else None),
                            4, (t,)),
            "blas": _probe(gemm.matmul(out, a, b, blas=True, threads=blas_threads(2 * n * k * m)), 4, (t,),
                           glue=True)})
    size, probes = _probes[key]
    fns = {name: fn[t] for name, (_, fn) in probes.items()}
    arrays = _operands(n, k, m, dtype)
    if transposed:   # the same values, b held as its transpose's rows (the table points at that array)
        arrays[2] = np.ascontiguousarray(arrays[2].T).T
    # the panels on a cache line, as the arena's buffers are (a NumPy array's 16 bytes off one would split
    # every vector load of the panels in two: 7.5 ms for 1024^3 on the Intel Xeon against the plan's 6.1)
    packed = aligned_bytes(size * np.dtype(dtype).itemsize).view(dtype)
    table = (ctypes.c_void_p * 4)(*[x.ctypes.data for x in arrays + [packed]])
    addr = ctypes.addressof(table)
    runs = {"packed": (lambda: fns["tiles"](addr)) if inside else (lambda: (fns["pack"](addr), fns["tiles"](addr))),
            "blas": lambda: fns["blas"](addr)}
    times = {name: float("inf") for name in runs}
    for name, run in runs.items():
        arrays[0][...] = 0
        run()   # warm-up, and checked
        if not _rows_right(arrays):
            raise RuntimeError(f"the {name} probe computed a wrong result")
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def _probe(kern, nviews: int, counts, glue: bool = False) -> tuple:
    """(the compiled module, {thread count: callable}) running kernel `kern` (its views numbered 0 ..
    nviews-1) as a program step would for each of `counts`: split over the pool (program._parallel_call)
    when it splits and the count is above one, else whole; a callable takes the address of a table of
    pointers. One module for all the counts; glue: compiled without optimisation (pool.compile_uncached),
    for a kernel whose time is its BLAS calls."""
    import ctypes
    from . import gemm, pool, program
    from .irtext import Emitter
    counts = tuple(dict.fromkeys(counts))
    em = Emitter()
    kern.emit(em, {i: f"%b{i}" for i in range(nviews)}, "%lo", "%hi")
    args = ", ".join(f"ptr noalias %b{i}" for i in range(nviews))
    defs = [em.function(f"define void @probe_k({args}, i64 %lo, i64 %hi) nounwind noinline"
                        f"{getattr(kern, 'fn_attrs', '')}")]
    split = [t for t in counts if kern.split and t > 1]
    for t in counts:
        e = Emitter()
        ptrs = [e(f"load ptr, ptr {e(f'getelementptr ptr, ptr %t, i64 {i}')}") for i in range(nviews)]
        if t in split:
            program._parallel_call(e, "probe_k", kern, ptrs, t)
        else:
            e.raw(f"call void @probe_k({', '.join(f'ptr {p}' for p in ptrs)}, i64 0, i64 {kern.outer})")
        defs.append(e.function(f"define void @probe_{t}(ptr %t) nounwind"))
    if split:
        defs.append(program._thunk("probe_k", nviews))
    head = gemm.declarations() + pool.declarations(max(counts))
    c = pool.compile_uncached(head + "\n".join(defs), [f"probe_{t}" for t in counts], glue)
    return c, {t: ctypes.CFUNCTYPE(None, ctypes.c_void_p)(c.addresses[f"probe_{t}"]) for t in counts}


def _time_kernels(n: int, k: int, m: int, dtype: str, reps: int) -> dict:
    """{"tiles": seconds, "blas": seconds}: the minimum over `reps` interleaved runs of the product as the
    plan would run it with the micro-kernel and with BLAS (each checked against a float64 product)."""
    import ctypes
    from . import gemm
    from ..schedule.views import View
    key = ("kernels", n, k, m, dtype, threads())
    if key not in _probes:
        out, a, b = (View(i, 0, sh, (sh[1], 1), dtype) for i, sh in enumerate([(n, m), (n, k), (k, m)]))
        t = threads()
        _probes[key] = {name: _probe(gemm.matmul(out, a, b, blas=how), 3, (t,))
                        for name, how in (("tiles", "tiles"), ("blas", True))}
    fns = {name: fn[threads()] for name, (_, fn) in _probes[key].items()}
    arrays = _operands(n, k, m, dtype)
    table = (ctypes.c_void_p * 3)(*[x.ctypes.data for x in arrays])
    addr = ctypes.addressof(table)
    times = {name: float("inf") for name in fns}
    for name, fn in fns.items():
        arrays[0][...] = 0
        fn(addr)   # warm-up, and checked
        if not _rows_right(arrays):
            raise RuntimeError(f"the {name} probe computed a wrong result")
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(addr)
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


#: the split timing stops after DECISIVE_REPS rounds when one count is faster by more than this factor
DECISIVE, DECISIVE_REPS = 1.15, 3


def _operands(n: int, k: int, m: int, dtype: str) -> list:
    """A probe's output (zeros) and operands: uniform in [-0.5, 0.5), drawn in `dtype` directly (the
    normal draw and conversion of a 2048 x 256 operand took 20 ms of a 0.5 s budget)."""
    rng = np.random.default_rng(0)
    return [np.zeros((n, m), dtype), rng.random((n, k), dtype=dtype) - np.asarray(0.5, dtype),
            rng.random((k, m), dtype=dtype) - np.asarray(0.5, dtype)]


def _rows_right(arrays: list) -> bool:
    """Whether a probe's output (arrays: out, a, b of _operands) holds a @ b on its first, middle and last
    rows, computed in float64 without BLAS (einsum: a NumPy product would wake OpenBLAS's threads)."""
    out, a, b = arrays
    rows = sorted({0, out.shape[0] // 2, out.shape[0] - 1})
    want = np.einsum("rk,km->rm", a[rows].astype(np.float64), b.astype(np.float64))
    return bool(np.allclose(out[rows], want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max()))))


def _busy() -> bool:
    """More runnable work than cores (the 1-minute load average): timings say little about a quiet run."""
    try:
        return os.getloadavg()[0] > len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return False


def _time_split(n: int, k: int, m: int, dtype: str, top: int, reps: int) -> dict:
    """{1: seconds, top: seconds}: the minimum over `reps` interleaved runs of the product's kernel as the
    plan generates it (gemm.matmul on contiguous operands), run whole on this thread and split over the
    pool for `top` threads (program._parallel_call)."""
    import ctypes
    from . import gemm
    from ..schedule.views import View
    key = (n, k, m, dtype, top)
    if key not in _probes:
        out, a, b = (View(i, 0, sh, (sh[1], 1), dtype) for i, sh in enumerate([(n, m), (n, k), (k, m)]))
        # (its time is OpenBLAS's: the loop over blocks and the dispatch around them need no optimising)
        _probes[key] = _probe(gemm.matmul(out, a, b, blas=True, threads=top), 3, (1, top), glue=True)
    _, fns = _probes[key]
    arrays = _operands(n, k, m, dtype)
    table = (ctypes.c_void_p * 3)(*[x.ctypes.data for x in arrays])
    addr = ctypes.addressof(table)
    times = {1: float("inf"), top: float("inf")}
    for t in times:
        fns[t](addr)   # warm-up (pages, caches, the pool's workers)
    for r in range(reps):
        for t, fn in fns.items():
            t0 = time.perf_counter()
            fn(addr)
            times[t] = min(times[t], time.perf_counter() - t0)
        if r + 1 >= DECISIVE_REPS and max(times.values()) > DECISIVE * min(times.values()):
            break   # a clear winner: more runs would not change the choice
    # checked on three rows without BLAS: any NumPy product of this size (even 3 rows, above OpenBLAS's
    # threading threshold) wakes OpenBLAS's own threads, which then spin for ~0.1 s sharing the cores with
    # the pool and slow the first calls after compiling (W1 b256 on a 2-core Zen 2: 2.9 ms instead of 1.7)
    if not _rows_right(arrays):
        raise RuntimeError("the split product's probe computed a wrong result")
    return times


# ---- elementwise vector width ------------------------------------------------------------------------

#: elementwise kernels of at least this much work (elements x IR instructions an element: W2's chain is
#: ~4M x 110) have their vector width tuned: the host's (512 bits with AVX-512, 256 with AVX2) against half
#: of it. Wide vectors are not always the faster: some AVX-512 cores lower their clock under 512-bit FP
#: work or split it in two 256-bit halves (Zen 4), Zen 1 splits 256-bit ones in 128-bit halves, and a
#: register-hungry transcendental body spills more at the wider width
WIDTH_TUNE_WORK = 1 << 24
#: the narrower width is kept only when faster by more than this factor (equal code stays at the host's)
WIDTH_MARGIN = 1.05
#: a width probe runs a prefix of the kernel's outer loop of about this many elements
WIDTH_PROBE_ELEMENTS = 1 << 20
_widths: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # graph -> its width decisions


def widths(graph) -> list:
    """The elementwise kernels whose vector width was tuned for `graph`: "ops: N bits (source)"."""
    return _widths.setdefault(graph, [])


def width_for(owner, kern, outs, ins, compute, hot: bool = False) -> tuple[int, str] | None:
    """Choose the vector width of elementwise kernel `kern` (kernels.elementwise(outs, ins, compute, hot))
    when its work reaches WIDTH_TUNE_WORK: the first time its code (the kernel's text: body, shapes, dtypes)
    is planned on a CPU model, it is compiled at the host's width and at half of it, both run over the same
    prefix of the outer loop as the plan would run them (split over the pool when the kernel splits), their
    outputs compared, and the faster kept (the narrower only by more than WIDTH_MARGIN); stored like the
    BLAS decisions (on-disk, keyed by the CPU model; not when timed on a busy machine), within the graph's
    tuning budget. Sets kern.fn_attrs; returns (bits, source), or None when the kernel is not tuned."""
    from . import kernels as K
    from ..schedule.views import View, is_int
    from .irtext import Emitter
    md, wide = mode(), vector_bits()
    narrow = wide // 2
    f = features()
    native = 512 if "avx512f" in f else 256 if "avx" in f else 128
    if md == "off" or wide <= 128 or wide > native or kern.key is None or kern.name != "elementwise":
        return None   # (wide > native: a level forced beyond the host, e.g. AVX-512's shapes on AVX2, untimed)
    views = list(outs) + list(ins)
    if not all(is_int(d) for v in views for d in v.shape) or not kern.outer:
        return None
    size = int(outs[0].size)
    if size * K.body_cost(compute, ins) < WIDTH_TUNE_WORK:
        return None
    bufs = list(dict.fromkeys(v.buf for v in views if v.literal is None and v.buf is not None))
    num = {b: i for i, b in enumerate(bufs)}

    def renum(v):
        return v if v.buf is None or v.literal is not None else View(num[v.buf], v.offset, v.shape, v.strides,
                                                                      v.dtype, v.literal)
    probe = K.elementwise([renum(v) for v in outs], [renum(v) for v in ins], compute, hot)
    em = Emitter()
    probe.emit(em, {i: f"%b{i}" for i in range(len(bufs))}, "%lo", "%hi")
    text = "\n".join(em.lines)   # the body's code; the shapes and split too (the loop bounds are passed in)
    key = ("width", wide, threads(), md, kern.desc, kern.outer, kern.split,
           hashlib.sha256(text.encode()).hexdigest()[:24])
    source = "cache"
    bits = _memo.get(key)
    if bits is None:
        hit = _load(_cache_name(*key))
        if isinstance(hit, dict) and hit.get("bits") in (wide, narrow):
            bits = _memo[key] = int(hit["bits"])
    if bits is None:
        spent = _spent.get(owner, 0.0) if owner is not None else 0.0
        if spent >= BUDGET[md]:
            return None
        t0 = time.perf_counter()
        try:
            sub = max(1, min(kern.outer, math.ceil(WIDTH_PROBE_ELEMENTS * kern.outer / size)))
            times = _time_widths(probe, views, len(outs), num, sub, (wide, narrow), REPEATS[md])
        except Exception:   # noqa: BLE001 -- a probe that cannot be built or run: the host's width
            times = None
        if owner is not None:
            _spent[owner] = spent + time.perf_counter() - t0
        if times is None:
            return None
        bits = narrow if times[narrow] * WIDTH_MARGIN < times[wide] else wide
        _memo[key] = bits
        if not _busy():
            _store(_cache_name(*key), {"bits": bits, "seconds": {str(b): t for b, t in times.items()}})
        log.append(("width", size, bits, "tuned"))
        source = "tuned"
    kern.fn_attrs = K.vector_attrs(bits)
    g = getattr(owner, "graph", None)
    if g is not None:
        try:
            widths(g).append(f"{kern.desc}: {bits} bits ({source})")
        except TypeError:
            pass
    return bits, source


def _time_widths(probe, views, n_outs: int, num, sub: int, candidates, reps: int) -> dict:
    """{bits: seconds}: the minimum over `reps` interleaved runs of elementwise kernel `probe` (its views,
    the first n_outs its outputs, with buffers numbered by `num`) over the first `sub` iterations of its
    outer loop, compiled at each width (their outputs checked equal)."""
    import copy
    import ctypes
    from . import kernels as K
    rng = np.random.default_rng(0)
    extent = {}
    for v in views:
        if v.literal is None and v.buf is not None:
            n = int(v.offset) + sum((int(d) - 1) * abs(int(st)) for d, st in zip(v.shape, v.strides)) + 1
            extent[num[v.buf]] = max(extent.get(num[v.buf], 0), n), v.dtype
    outs = {num[v.buf] for v in views[:n_outs]}
    arrays = []
    for i in range(len(num)):
        n, dt = extent[i]
        a = np.zeros(n, dt)    # (calloc: pages the prefix does not touch are never made)
        if i not in outs:
            m = min(n, math.ceil(n * sub / probe.outer) + 1024)
            a[:m] = (rng.random(m) + 0.5).astype(dt)
        arrays.append(a)
    table = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
    addr = ctypes.addressof(table)
    t = threads()
    fns, modules = {}, []
    for bits in candidates:
        k = copy.copy(probe)
        k.fn_attrs = K.vector_attrs(bits)
        k.outer, k.split = sub, (sub if probe.split else None)
        c, fn = _probe(k, len(arrays), (t,))
        modules.append(c)    # (the code lives as long as its module)
        fns[bits] = fn[t]
    results = {}
    for bits, fn in fns.items():
        fn(addr)   # warm-up, and the outputs compared
        results[bits] = [a.copy() for i, a in enumerate(arrays) if i in outs]
    first, *rest = results.values()
    for r in rest:
        if not all(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc") for x, y in zip(first, r)):
            raise RuntimeError("the width probes computed different results")
    times = {bits: float("inf") for bits in fns}
    for _ in range(reps):
        for bits, fn in fns.items():
            t0 = time.perf_counter()
            fn(addr)
            times[bits] = min(times[bits], time.perf_counter() - t0)
    return times


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
                 "blas_threads": f"1 below {BLAS_PARALLEL_FLOPS:.3g} flops, else split in blocks of rows or "
                                 f"columns over {max_blas_threads()} threads of graphc's pool, OpenBLAS on one "
                                 f"thread per block (tuned per shape up to "
                                 f"{TUNE_MAX_FLOPS:.3g} flops: GRAPHC_TUNE={mode()})"
                                 if set_threads_symbol() else "OpenBLAS's own choice",
                 "tiles_threads": f"column blocks split over {threads()} threads from "
                                  f"{TILES_PARALLEL_FLOPS:.3g} flops",
                 "products": [] if graph is None else products(graph),
                 "gemv": f"graphc's loop (batch 1), split over {threads()} threads of the pool from "
                         f"{GEMV_PARALLEL_FLOPS:.3g} flops"},
        "elementwise": {"vector_bits": vector_bits(), "parallel_min_elements": kernels.PARALLEL_MIN,
                        "width_tuned_from": f"{WIDTH_TUNE_WORK:.3g} elements x IR instructions (GRAPHC_TUNE={mode()}): "
                                            f"{vector_bits()} or {vector_bits() // 2} bits",
                        "widths": [] if graph is None else widths(graph)},
        "tune": {"mode": mode(), "budget_s": BUDGET[mode()]},
    }
