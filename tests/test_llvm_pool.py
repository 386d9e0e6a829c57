"""graphc's persistent native thread pool (backends/llvm/pool.py) and the kernels split over it, against
NumPy (float64 references): every chunk of a dispatch runs exactly once (odd chunk counts, many
dispatches, four Python threads dispatching at once, after a fork), a worker really runs chunks, split
elementwise kernels, BLAS products cut into blocks of rows or columns (plain and transposed operands, a
batch), the micro-kernel's column blocks (AVX2's and AVX-512's vector shapes forced) also inside a scan,
on 1 and 2 threads; the tuner's probe of a split product; and, in fresh interpreters, that a worker woken
from its futex sleep is steered off the caller's CPU (and gets its own mask back), and that an idle worker
sleeps (its CPU time stays near zero). No timing is asserted."""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")

SIZES = (1, 3, 17, 63, 65, 257)
TOL = {"float32": 3e-5, "float64": 1e-12}


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _dispatches(src: str) -> int:
    return src.count("call void @gc_pool_run")


# ---- the pool itself ----------------------------------------------------------------------------------

_PROBE = """
define internal void @count(ptr %a, i64 %c) nounwind {
entry:
  %p = getelementptr i64, ptr %a, i64 %c
  %old = atomicrmw add ptr %p, i64 1 monotonic
  ret void
}
; chunk 0 waits (up to ~2^33 time-stamp ticks) until chunk 1 has run: only another thread can run it then
define internal void @handoff(ptr %a, i64 %c) nounwind {
entry:
  %flag = getelementptr i64, ptr %a, i64 1
  %first = icmp eq i64 %c, 0
  br i1 %first, label %wait, label %mark
mark:
  store atomic i64 1, ptr %flag release, align 8
  ret void
wait:
  %t0 = call i64 @llvm.readcyclecounter()
  br label %spin
spin:
  %v = load atomic i64, ptr %flag acquire, align 8
  %done = icmp ne i64 %v, 0
  br i1 %done, label %out, label %more
more:
  %t = call i64 @llvm.readcyclecounter()
  %dt = sub i64 %t, %t0
  %late = icmp ugt i64 %dt, 8589934592
  br i1 %late, label %out, label %spin
out:
  %r = getelementptr i64, ptr %a, i64 0
  store i64 %v, ptr %r
  ret void
}
declare i64 @llvm.readcyclecounter()
define void @run_count(ptr %a, i64 %n) nounwind {
entry:
  call void @gc_pool_run(ptr @count, ptr %a, i64 %n)
  ret void
}
define void @run_handoff(ptr %a) nounwind {
entry:
  call void @gc_pool_run(ptr @handoff, ptr %a, i64 2)
  ret void
}
"""


@pytest.fixture(scope="module")
def probe():
    from graphc.backends.llvm import pool
    pool.ensure_workers(1)
    c = pool.compile_uncached(pool.DECLARATIONS + _PROBE, ["run_count", "run_handoff"])
    count = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(c.addresses["run_count"])
    handoff = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(c.addresses["run_handoff"])
    return c, count, handoff


@pytest.mark.parametrize("n", (0,) + SIZES)
def test_every_chunk_runs_exactly_once(probe, n):
    _, count, _ = probe
    a = np.zeros(260, np.int64)
    for _ in range(200):
        count(a.ctypes.data, n)
    want = np.zeros(260, np.int64)
    want[:n] = 200
    np.testing.assert_array_equal(a, want)


def test_a_worker_runs_chunks(probe):
    """Chunk 0 waits for chunk 1: the caller runs chunk 0 first, so chunk 1 must run on a worker."""
    from graphc.backends.llvm import pool
    _, _, handoff = probe
    before = pool.stats()["worker_chunks"]
    a = np.zeros(2, np.int64)
    handoff(a.ctypes.data)
    assert a[0] == 1, "chunk 1 never ran while chunk 0 waited: no worker took it"
    assert pool.stats()["worker_chunks"] > before and pool.stats()["workers"] >= 1


def test_four_python_threads_dispatch_at_once(probe):
    """ctypes drops the GIL: the dispatches overlap; the try-lock runs the losers' chunks inline."""
    _, count, _ = probe
    arrays = [np.zeros(70, np.int64) for _ in range(4)]
    errors = []

    def go(a, n):
        try:
            for _ in range(300):
                count(a.ctypes.data, n)
        except Exception as e:   # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=go, args=(a, n)) for a, n in zip(arrays, (3, 17, 63, 65))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, n in zip(arrays, (3, 17, 63, 65)):
        want = np.zeros(70, np.int64)
        want[:n] = 300
        np.testing.assert_array_equal(a, want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_the_pool_works_after_fork(probe):
    _, count, handoff = probe
    a = np.zeros(20, np.int64)
    count(a.ctypes.data, 17)   # workers exist in the parent
    pid = os.fork()
    if pid == 0:   # the child: no workers until the pool starts them again
        code = 1
        try:
            import signal
            signal.alarm(60)
            b = np.zeros(20, np.int64)
            for _ in range(50):
                count(b.ctypes.data, 17)
            h = np.zeros(2, np.int64)
            handoff(h.ctypes.data)
            code = 0 if (b[:17] == 50).all() and (b[17:] == 0).all() and h[0] == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# ---- kernels split over the pool ----------------------------------------------------------------------

@pytest.mark.parametrize("threads", ["1", "2"])
def test_split_elementwise_kernels(rng, monkeypatch, threads):
    from graphc.backends.llvm import kernels
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setattr(kernels, "PARALLEL_MIN", 1)
    for n in SIZES:
        x = gc.placeholder("x", (n, 5))
        f = gc.function([x], gc.tanh(x * 1.5 + 0.5) * gc.exp(-x * x), backend="llvm")
        a = rng.standard_normal((n, 5)).astype(np.float32)
        _close(f(a), np.tanh(a * 1.5 + 0.5) * np.exp(-a.astype(np.float64) ** 2), "float32")
        assert (_dispatches(f.source) > 0) == (threads == "2"), n   # (n, 5) collapses to n * 5 >= 2 rows


_SHAPES = [(3, 17, 63), (65, 257, 17), (257, 63, 65), (17, 3, 257), (63, 65, 3), (2, 1, 257)]


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blas_products_split_in_blocks(rng, monkeypatch, threads, dtype):
    """Every BLAS product split (BLAS_PARALLEL_FLOPS = 0): rows (n >= m) or columns, with each operand
    as it is or transposed (the block's pointer moves by the leading dimension or by one)."""
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None:
        pytest.skip("no BLAS")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    monkeypatch.setattr(tune, "BLAS_PARALLEL_FLOPS", 0)
    for n, k, m in _SHAPES:
        av = rng.standard_normal((n, k)).astype(dtype)
        bv = rng.standard_normal((k, m)).astype(dtype)
        for ta in (False, True):
            for tb in (False, True):
                a = gc.placeholder("a", (k, n) if ta else (n, k), dtype)
                b = gc.placeholder("b", (m, k) if tb else (k, m), dtype)
                f = gc.function([a, b], (a.T if ta else a) @ (b.T if tb else b), backend="llvm")
                got = f(np.ascontiguousarray(av.T) if ta else av, np.ascontiguousarray(bv.T) if tb else bv)
                _close(got, av.astype(np.float64) @ bv, dtype)
                split = threads == "2" and tune.set_threads_symbol() is not None and min(n, m) > 1
                assert (_dispatches(f.source) > 0) == split, (n, k, m, ta, tb)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_batched_blas_products_split_their_batch(rng, monkeypatch, threads):
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None:
        pytest.skip("no BLAS")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    monkeypatch.setattr(tune, "BLAS_PARALLEL_FLOPS", 0)
    for batch, n, k, m in [((3,), 17, 63, 65), ((5,), 3, 17, 2), ((2,), 65, 3, 17), ((1, 3), 17, 5, 63)]:
        a, b = gc.placeholder("a", batch + (n, k)), gc.placeholder("b", batch + (k, m))
        f = gc.function([a, b], a @ b, backend="llvm")
        av, bv = rng.standard_normal(batch + (n, k)).astype("f4"), rng.standard_normal(batch + (k, m)).astype("f4")
        _close(f(av, bv), av.astype(np.float64) @ bv, "float32")
        assert (_dispatches(f.source) > 0) == (threads == "2" and tune.set_threads_symbol() is not None)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_micro_kernel_column_blocks_split(rng, monkeypatch, isa, threads):
    """The micro-kernel's column blocks over the pool (TILES_PARALLEL_FLOPS = 0): a partial last block,
    m below one block (nothing to split), both ISAs' vector shapes, float32 and float64."""
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)
    for n, k, m in [(3, 17, 63), (17, 65, 257), (65, 3, 17), (2, 257, 65), (63, 1, 3)]:
        for dtype in ("float32", "float64"):
            a, b = gc.placeholder("a", (n, k), dtype), gc.placeholder("b", (k, m), dtype)
            f = gc.function([a, b], a @ b, backend="llvm")
            av, bv = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
            _close(f(av, bv), av.astype(np.float64) @ bv, dtype)
            split = threads == "2" and gemm.tile_blocks(m, dtype) >= 2
            assert (_dispatches(f.source) > 0) == split, (n, k, m, dtype)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_split_products_inside_a_scan(rng, monkeypatch, threads):
    """A recurrent step h = tanh(x_t @ U + h @ W): the loop body's product split over the pool each step."""
    from graphc.backends.llvm import tune
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)
    T, n, k, m = 7, 17, 5, 65
    xs = gc.placeholder("xs", (T, n, k))
    h0 = gc.placeholder("h0", (n, m))
    U = gc.parameter("U", rng.standard_normal((k, m)).astype("f4") * 0.3)
    W = gc.parameter("W", rng.standard_normal((m, m)).astype("f4") * 0.1)
    (h, _) = gc.scan(lambda h, x: (gc.tanh(x @ U + h @ W), None), h0, xs)
    f = gc.function([xs, h0], h, backend="llvm")
    xv, hv = rng.standard_normal((T, n, k)).astype("f4"), rng.standard_normal((n, m)).astype("f4")
    want = hv.astype(np.float64)
    for t in range(T):
        want = np.tanh(xv[t] @ U.value.astype(np.float64) + want @ W.value)
    _close(f(xv, hv), want, "float32")
    assert (_dispatches(f.source) > 0) == (threads == "2")


def test_compiled_functions_called_from_four_python_threads(rng, monkeypatch):
    """Split GEMMs and elementwise kernels from four threads at once: each thread its own results."""
    from graphc.backends.llvm import kernels, tune
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    monkeypatch.setattr(tune, "BLAS_PARALLEL_FLOPS", 0)
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)
    monkeypatch.setattr(kernels, "PARALLEL_MIN", 1)
    a, b = gc.placeholder("a", (65, 63)), gc.placeholder("b", (63, 257))
    f = gc.function([a, b], gc.tanh(a @ b) * 2.0, backend="llvm")
    c = gc.placeholder("c", (257, 300))
    g = gc.function([c], gc.exp(c * 0.5), backend="llvm")
    inputs = [(rng.standard_normal((65, 63)).astype("f4"), rng.standard_normal((63, 257)).astype("f4"),
               rng.standard_normal((257, 300)).astype("f4")) for _ in range(4)]
    errors = []

    def go(i):
        av, bv, cv = inputs[i]
        want_f = np.tanh(av.astype(np.float64) @ bv) * 2.0
        want_g = np.exp(cv.astype(np.float64) * 0.5)
        try:
            for _ in range(40):
                _close(f(av, bv), want_f, "float32")
                _close(g(cv), want_g, "float32")
        except Exception as e:   # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_tuner_probe_times_both_choices():
    """The tuner's probe: the product's kernel whole on one thread and split over the pool, both checked
    against NumPy inside (a wrong result raises)."""
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None or tune.set_threads_symbol() is None:
        pytest.skip("no OpenBLAS with openblas_set_num_threads_local")
    times = tune._time_split(65, 257, 63, "float32", 2, 3)
    assert set(times) == {1, 2} and all(0 < t < 1 for t in times.values())


@pytest.mark.parametrize("one, split, stored", [(1.0, 0.6, True), (0.6, 1.0, False)])
def test_a_busy_machine_stores_only_a_split(rng, monkeypatch, tmp_path, one, split, stored):
    """Timed on a busy machine, a split that won is kept on disk (load slows the split, so it wins on a
    quiet machine too); a one-thread win is kept for this process only (a later quiet one times again)."""
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None or tune.set_threads_symbol() is None or tune.max_blas_threads() < 2:
        pytest.skip("nothing to tune: one BLAS thread")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.setattr(tune, "_memo", {})
    monkeypatch.setattr(tune, "log", [])
    monkeypatch.setattr(tune, "_busy", lambda: True)
    monkeypatch.setattr(tune, "_time_split", lambda n, k, m, dtype, top, reps: {1: one, top: split})
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "0")   # the BLAS product's split is tuned, not a packed weight's
    a, w = gc.placeholder("a", (64, 256)), gc.parameter("w", rng.standard_normal((256, 320)).astype("f4"))
    f = gc.function([a], a @ w, backend="llvm")
    av = rng.standard_normal((64, 256)).astype("f4")
    _close(f(av), av.astype(np.float64) @ w.value, "float32")
    chosen = 1 if one < split else tune.max_blas_threads()
    assert [e[2:] for e in tune.log] == [(chosen, "tuned")]
    assert ("call void @gc_pool_run" in f.source) == (chosen > 1)
    kept = (tmp_path / "tune").exists() and list((tmp_path / "tune").iterdir())
    assert bool(kept) is stored
    monkeypatch.setattr(tune, "_memo", {})          # a later process: the stored split is read, not timed
    assert tune.decided(64, 256, 320, "float32") == ((chosen, "cache") if stored else None)


# ---- waking and sleeping (fresh interpreters: they pin the calling thread and read the workers' CPU time) ----

_WAKE_SCRIPT = r'''
import ctypes, os, signal, sys, threading, time
signal.alarm(120)
import numpy as np
from graphc.backends.llvm import pool
PROBE = """
declare i32 @sched_getcpu()
declare i64 @syscall(i64, ...)
declare i64 @llvm.readcyclecounter()
; a[0]: 1 once either chunk ran second; a[2 + c]: chunk c's CPU; a[4 + c]: its thread id. The first chunk to
; start waits (up to ~2^33 ticks) for the other: with the caller inside it only a worker can run that one.
define internal void @where(ptr %a, i64 %c) nounwind {
entry:
  %cpu = call i32 @sched_getcpu()
  %cpu64 = sext i32 %cpu to i64
  %tid = call i64 (i64, ...) @syscall(i64 186)
  %i2 = add i64 %c, 2
  %i4 = add i64 %c, 4
  %p2 = getelementptr i64, ptr %a, i64 %i2
  %p4 = getelementptr i64, ptr %a, i64 %i4
  store i64 %cpu64, ptr %p2
  store i64 %tid, ptr %p4
  %flag = getelementptr i64, ptr %a, i64 1
  %old = atomicrmw add ptr %flag, i64 1 acq_rel
  %second = icmp ne i64 %old, 0
  br i1 %second, label %mark, label %wait
mark:
  store atomic i64 1, ptr %a release, align 8
  ret void
wait:
  %t0 = call i64 @llvm.readcyclecounter()
  br label %spin
spin:
  %v = load atomic i64, ptr %a acquire, align 8
  %done = icmp ne i64 %v, 0
  br i1 %done, label %out, label %more
more:
  %t = call i64 @llvm.readcyclecounter()
  %dt = sub i64 %t, %t0
  %late = icmp ugt i64 %dt, 8589934592
  br i1 %late, label %out, label %spin
out:
  ret void
}
define void @run_where(ptr %a) nounwind {
entry:
  call void @gc_pool_run(ptr @where, ptr %a, i64 2)
  ret void
}
"""
def task_cpu_ticks(tid):
    with open(f"/proc/self/task/{tid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
pool.ensure_workers(1)
c = pool.compile_uncached(pool.DECLARATIONS + PROBE, ["run_where"])
run = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(c.addresses["run_where"])
a = np.zeros(8, np.int64)
run(a.ctypes.data)                                   # starts the worker, with the process's mask
main = threading.get_native_id()
(worker,) = [int(t) for t in os.listdir("/proc/self/task") if int(t) != main]
full = os.sched_getaffinity(0)
case = sys.argv[1]
if case == "steer":
    mine = min(full)
    os.sched_setaffinity(0, {mine})                  # the caller on one CPU; the worker keeps its own mask
    x = np.random.default_rng(0).standard_normal((400, 400))
    steered = 0
    for i in range(24):
        if i % 2:
            x @ x                                    # OpenBLAS's threads run (and spin after it)
        else:
            time.sleep(0.02)                         # the worker spins ~0.1 ms, then sleeps on its futex
        before = pool.stats()["steered"]
        a[:] = 0
        run(a.ctypes.data)
        on_worker = [ch for ch in (0, 1) if a[4 + ch] == worker]
        assert a[0] == 1 and len(on_worker) == 1, ("a chunk waited for the other in vain: no worker ran it", a)
        if pool.stats()["steered"] > before:
            steered += 1
            assert a[2 + on_worker[0]] != mine, ("a steered worker ran on the caller's CPU", a)
    assert steered >= 1, pool.stats()                # asleep at least once in 24 dispatches
    os.sched_setaffinity(0, full)
    t_end = time.monotonic() + 30                    # the worker gives itself its own mask back after its job
    while os.sched_getaffinity(worker) != full and time.monotonic() < t_end:
        time.sleep(0.01)
    assert os.sched_getaffinity(worker) == full, (os.sched_getaffinity(worker), full)
elif case == "idle":
    x = np.random.default_rng(0).standard_normal((400, 400))
    for i in range(50):
        a[:] = 0
        run(a.ctypes.data)
        if i % 5 == 0:
            x @ x
    before = task_cpu_ticks(worker)
    time.sleep(1.0)
    used = task_cpu_ticks(worker) - before           # clock ticks (1/100 s): a spinning worker uses ~100
    assert used <= 5, ("the idle worker kept running", used)
print("OK", pool.stats())
'''


def _run_wake(case: str):
    import subprocess
    import sys
    import textwrap
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_WAKE_SCRIPT), case], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs and CPU masks")
def test_a_woken_worker_is_steered_off_the_callers_cpu():
    """A dispatch that wakes a sleeping worker (after a pause, or after a NumPy product whose OpenBLAS
    threads ran) takes the caller's CPU out of its mask first: its chunk runs on another CPU (the caller
    pinned to one CPU here, so this is deterministic), and after its job the worker has its own mask back."""
    _run_wake("steer")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_the_worker_sleeps_when_idle():
    """After dispatches alternating with NumPy products, an idle second costs the worker (almost) no CPU
    time: it spins a bounded time, then sleeps on its futex."""
    _run_wake("idle")
