"""The llvm call path: a native wrapper reads the data pointers of the input, parameter and output
arrays (program.DATA_OFFSET); these cases would break if it read the wrong field or a stale array."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphc as gc
from graphc.backends.llvm import program
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def test_the_data_offset_is_found_and_used():
    x = gc.placeholder("x", (3,), "float64")
    f = gc.function([x], x * 2.0, backend="llvm")
    assert program.DATA_OFFSET is not None
    spec = f.program._last   # graphc_call: a METH_FASTCALL built-in where this Python allows, else ctypes
    assert (spec.fastcall or spec.call is not None) and "@graphc_call(" in f.source
    assert spec.fastcall == (program.NEW_BUILTIN is not None)


def test_unusual_arrays_and_swapped_parameters(rng):
    x = gc.placeholder("x", (None, 4), "float64")
    w = gc.parameter("w", rng.standard_normal(4))
    f = gc.function([x], [x * w, (x + w).sum(axis=1)], backend="llvm")

    def check(a):
        got = f(a)
        np.testing.assert_allclose(got[0], a * w.value, rtol=1e-15)
        np.testing.assert_allclose(got[1], (a + w.value).sum(axis=1), rtol=1e-15)
    a = rng.standard_normal((5, 4))
    ro = a.copy()
    ro.flags.writeable = False
    check(ro)                                            # read-only input
    check(a[::2].copy()[:, :])                           # a view whose base is another array
    check(np.empty((0, 4)))                              # size 0
    check(a.view(type("Sub", (np.ndarray,), {})))        # an ndarray subclass
    check(np.asfortranarray(a))                          # copied to C order first
    for _ in range(3):                                   # set_value swaps the parameter's array
        w.set_value(rng.standard_normal(4))
        check(a)


def test_outputs_are_fresh_and_owned_by_the_caller(rng):
    x = gc.placeholder("x", (3,), "float64")
    f = gc.function([x], [x + 1.0, x + 1.0, x], backend="llvm")
    a = rng.standard_normal(3)
    o1, o2, o3 = f(a)
    assert o1 is not o2 and o3 is not a and not np.shares_memory(o3, a)
    o1[:] = 0
    np.testing.assert_allclose(f(a)[0], a + 1.0)


def test_threads_calling_at_once_each_get_their_own_results(rng):
    x = gc.placeholder("x", (64,), "float64")
    f = gc.function([x], gc.exp(x) * 3.0, backend="llvm")
    inputs = [rng.standard_normal(64) for _ in range(8)]
    bad = []

    def work(a):
        for _ in range(300):
            if not np.allclose(f(a), np.exp(a) * 3.0, rtol=1e-14):
                bad.append(1)
    ts = [threading.Thread(target=work, args=(a,)) for a in inputs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_kernels_stay_separate_functions():
    """Kernels are functions of their own (each compiled as its own module): O3 on one huge inlined entry
    made compile time grow super-linearly."""
    x = gc.placeholder("x", (8,), "float64")
    f = gc.function([x], gc.exp(x).sum() * x, backend="llvm", disable=["fusion"])
    kernels = [ln for ln in f.source.splitlines() if ln.startswith("define void @k_")]
    assert len(kernels) >= 2 and all("noinline" in ln for ln in kernels)
