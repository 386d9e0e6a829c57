"""OpenBLAS's work buffers are mapped in ahead (backends/llvm/jit.py `prefault_blas_buffers`; pool.py maps
in again the slots OpenBLAS's server threads held, after the pool first stops them): in a virtual machine
its sgemm kernel's prefetches past the packed data into never-touched pages made a (256 x 784) @ (784 x 256)
3x slower. Checked in a fresh interpreter with mincore(2): the pages are resident (the zero page) in the
buffers the next concurrent calls get, before and after the quieting; products stay NumPy's (float64
reference). No timing is asserted."""
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


_SCRIPT = r'''
import os, sys, ctypes, signal, threading
signal.alarm(120)
os.environ["GRAPHC_NUM_THREADS"] = "2"
os.environ["GRAPHC_TUNE"] = "off"
os.environ["GRAPHC_LLVM_SMALL_GEMM"] = "0"
import numpy as np
case = sys.argv[1]
rng = np.random.default_rng(0)
if case == "held":   # a threaded NumPy product first: OpenBLAS's server threads take (and hold) slots
    a = rng.standard_normal((512, 512)); a @ a
import graphc as gc
from graphc.backends.llvm import jit, pool, tune
tune.BLAS_PARALLEL_FLOPS = 0
lib = jit.blas()["lib"]
if not hasattr(lib, "blas_memory_alloc"):
    print("SKIP"); sys.exit(0)
libc = ctypes.CDLL(None)
lib.blas_memory_alloc.restype = ctypes.c_void_p
lib.blas_memory_alloc.argtypes = [ctypes.c_int]
lib.blas_memory_free.argtypes = [ctypes.c_void_p]
def resident_share(count):
    """Share of resident pages in the first BLAS_PREFAULT_BYTES of the first `count` free buffers."""
    held = [lib.blas_memory_alloc(0) for _ in range(count)]
    n = jit.BLAS_PREFAULT_BYTES // 4096
    shares = []
    for p in held:
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(ctypes.c_void_p(p), ctypes.c_size_t(n * 4096), vec) == 0
        shares.append(sum(v & 1 for v in vec) / n)
    for p in held:
        lib.blas_memory_free(p)
    return shares
pf = jit.blas()["prefault"]
if case == "off":
    assert pf is None, pf
else:
    assert pf["count"] == 2 and pf["buffers"] == 2, pf
    assert pf["bytes"] == jit.BLAS_PREFAULT_BYTES
    assert min(resident_share(pf["count"])) == 1.0, resident_share(pf["count"])
a, b = gc.placeholder("a", (96, 64)), gc.placeholder("b", (64, 80))
f = gc.function([a, b], a @ b, backend="llvm")
assert "call void @gc_pool_run" in f.source
for _ in range(3):
    av = rng.standard_normal((96, 64)).astype(np.float32)
    bv = rng.standard_normal((64, 80)).astype(np.float32)
    np.testing.assert_allclose(f(av, bv), av.astype(np.float64) @ bv.astype(np.float64), rtol=1e-4, atol=1e-4)
st = pool.stats()
if case == "held":
    assert st["openblas_quieted"] >= 1, st
    # the slots the server's threads held are free now, and mapped in too
    assert min(resident_share(pf["count"])) == 1.0, resident_share(pf["count"])
print("OK")
'''


def _run(case, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), case], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    if r.stdout.strip().endswith("SKIP"):
        pytest.skip("the bound BLAS has no OpenBLAS work-buffer allocator")
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and MADV_POPULATE_READ: Linux")
@pytest.mark.parametrize("case", ["fresh", "held"])
def test_openblas_buffers_are_mapped_in(case):
    from graphc.backends.llvm import jit
    if jit.blas() is None:
        pytest.skip("no BLAS bound")
    _run(case)


def test_prefault_can_be_turned_off():
    from graphc.backends.llvm import jit
    if jit.blas() is None:
        pytest.skip("no BLAS bound")
    _run("off", {"GRAPHC_BLAS_PREFAULT": "0"})


def test_prefault_without_openblas_allocator_does_nothing():
    from graphc.backends.llvm import jit

    class NotOpenBLAS:   # another BLAS: no blas_memory_alloc
        pass
    assert jit.prefault_blas_buffers(NotOpenBLAS(), 2) is None
