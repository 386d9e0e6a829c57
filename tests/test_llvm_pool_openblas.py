"""The pool stops OpenBLAS's spinning server threads before split work (backends/llvm/pool.py,
`quiet_openblas`): results stay those of NumPy (float64 references) for graphc's split BLAS products and
for NumPy's own products after OpenBLAS re-creates its threads; it is refused while another thread exists
(a Python thread running NumPy products at the same time: no lost job, no hang); it survives a fork; and
the pool's wrapper of openblas_set_num_threads_local keeps the count right while the server is down.
The process-wide checks run in a fresh interpreter (no thread but the main one); no timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _openblas_or_skip():
    from graphc.backends.llvm import pool, tune
    if not pool.bind()["openblas"] or tune.set_threads_symbol() is None:
        pytest.skip("no OpenBLAS with a thread server bound")


# the script run in a fresh process: `case` picks what it checks; it prints OK on success
_SCRIPT = r'''
import os, sys, threading, ctypes, signal
signal.alarm(120)   # a lost OpenBLAS job would hang: fail instead
os.environ["GRAPHC_NUM_THREADS"] = "2"
os.environ["GRAPHC_TUNE"] = "off"
os.environ["GRAPHC_LLVM_SMALL_GEMM"] = "0"
import numpy as np
import graphc as gc
from graphc.backends.llvm import pool, tune, jit
tune.BLAS_PARALLEL_FLOPS = 0
case = sys.argv[1]
pool.quiet_openblas(case != "off")
lib = jit.blas()["lib"]
avail = ctypes.c_int.in_dll(lib, "blas_server_avail")
cpus = ctypes.c_int.in_dll(lib, "blas_cpu_number")
rng = np.random.default_rng(0)
fns = {}
def product(dtype, n, k, m):
    key = (dtype, n, k, m)
    if key not in fns:
        a, b = gc.placeholder("a", (n, k), dtype), gc.placeholder("b", (k, m), dtype)
        fns[key] = gc.function([a, b], gc.relu(a @ b), backend="llvm")
        assert "call void @gc_pool_run" in fns[key].source
    return fns[key]
def check(dtype, n, k, m):
    av = rng.standard_normal((n, k)).astype(dtype); bv = rng.standard_normal((k, m)).astype(dtype)
    got = product(dtype, n, k, m)(av, bv)
    want = np.maximum(av.astype(np.float64) @ bv.astype(np.float64), 0)
    tol = 3e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))
def numpy_product(n=300):   # above OpenBLAS's threading threshold: it runs (and re-creates) its threads
    x = rng.standard_normal((n, n))
    y = rng.standard_normal((n, n))
    got = x @ y
    want = np.einsum("ik,kj->ij", x, y)   # no BLAS
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
default = cpus.value
shapes = [("float64", 65, 17, 257), ("float32", 257, 63, 3), ("float64", 3, 65, 17), ("float32", 63, 1, 65)]
if case in ("on", "off"):
    for i in range(12):
        numpy_product()
        assert avail.value == 1 or default == 1
        for s in shapes:
            check(*s)
        assert cpus.value == default, (cpus.value, default)     # the user's count is back after each call
    st = pool.stats()
    if case == "on" and default > 1:
        assert st["openblas_quieted"] >= 12 and avail.value == 0, st
        numpy_product()
        assert avail.value == 1   # re-created by OpenBLAS at its next threaded call
    if case == "off":
        assert st["openblas_quieted"] == 0 and st["openblas_left"] == 0, st
elif case == "thread":
    # a second Python thread runs threaded NumPy products all the while: never quieted, nothing lost
    stop, errors = threading.Event(), []
    def other():
        try:
            while not stop.is_set():
                numpy_product(200)
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=other)
    t.start()
    try:
        for i in range(30):
            for s in shapes:
                check(*s)
    finally:
        stop.set(); t.join()
    assert not errors, errors
    st = pool.stats()
    assert st["openblas_quieted"] == 0 and (0 < st["openblas_left"] < 60 or default == 1), st  # looked rarely
    assert cpus.value == default
elif case == "fork":
    numpy_product()
    check(*shapes[0])
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for i in range(5):
                numpy_product()
                for s in shapes:
                    check(*s)
            code = 0 if cpus.value == default else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    numpy_product()
    check(*shapes[1])
print("OK", pool.stats())
'''


def _run(case: str):
    env = dict(os.environ)
    env.pop("GRAPHC_QUIET_BLAS", None)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), case], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("case", ["on", "off"])
def test_split_products_and_numpy_products_after_quieting(case):
    """NumPy product (OpenBLAS's threads wake and spin), then graphc's split products, repeated: graphc's
    results match NumPy with the quieting forced on and off; NumPy's own stay right after its threads
    were stopped and re-created; the thread count the user had is back after each call."""
    _openblas_or_skip()
    _run(case)


def test_quieting_is_refused_while_another_thread_runs_numpy():
    _openblas_or_skip()
    _run("thread")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_quieting_and_fork():
    _openblas_or_skip()
    _run("fork")


def test_blas_threads_wrapper_sets_the_count_while_the_server_is_down():
    """gc_pool_blas_threads (bound as gc_blas_set_threads): the previous count back, the new one set, with
    OpenBLAS's server up (its own call) and down (set directly, nothing re-created)."""
    _openblas_or_skip()
    import ctypes
    from graphc.backends.llvm import jit, pool
    lib = jit.blas()["lib"]
    cpus = ctypes.c_int.in_dll(lib, "blas_cpu_number")
    avail = ctypes.c_int.in_dll(lib, "blas_server_avail")
    nmax = ctypes.c_int.in_dll(lib, "blas_num_threads").value
    wrap = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)(pool.blas_threads_symbol())
    before = cpus.value
    prev = wrap(1)
    assert prev == before and cpus.value == 1
    assert wrap(prev) == 1 and cpus.value == before
    if avail.value == 0:   # down already (an earlier dispatch quieted it): the direct path was taken
        assert wrap(max(1, nmax)) == before and avail.value == 0 and wrap(before) == max(1, nmax)
    assert cpus.value == before
