"""The shared schedule in symbolic mode (graphc.backends.schedule.plan, dims=None), as cuda renders it:
built once, sizes are expressions over the dims, views instead of copies, the arena placed per binding
by the shared planner; results checked against the NumPy backend for several batch sizes."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

import graphc as gc
from graphc.backends.schedule.plan import Schedule
from graphc.backends.schedule.steps import LoopStep
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def _emulated():
    backend_or_skip("cuda-emulated")


def _both(inputs, outputs):
    return gc.function(inputs, outputs, backend="cuda-emulated"), gc.function(inputs, outputs)


def test_symbolic_sizes_and_one_arena_per_binding():
    x = gc.placeholder("x", (None, 8))
    W = gc.parameter("W", np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    f, ref = _both([x], gc.sum(gc.tanh(x @ W) * gc.exp(x @ W), axis=1))
    s = f.program.info["plan"]
    assert isinstance(s, Schedule) and s.symbolic
    arena = [b for b in s.buffers if b.kind == "arena" and b.last >= 0]
    assert arena and all(isinstance(b.nbytes, sympy.Basic) for b in arena)   # N * 32 bytes, not a number
    for n in (1, 7, 33):
        a = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
        np.testing.assert_allclose(f(a), ref(a), rtol=1e-5, atol=1e-6)
    totals = {lay.dims["N"]: lay.total for lay in s.layouts}
    assert totals[1] <= totals[7] < totals[33]
    assert s.layout({"N": 7}) is s.layout({"N": 7})   # cached per binding


def test_movement_ops_are_views_read_by_the_consumer_kernel():
    """transpose and a slice with a negative start on the symbolic dim: no copy kernel, the consumer
    reads through the view (its start computed per call: max(0, N - 3))."""
    x = gc.placeholder("x", (None, 5))
    f, ref = _both([x], gc.exp(gc.transpose(x[-3:])) * 2.0)
    kinds = list(f.program.info["kernels"].values())
    assert kinds == ["fused"], kinds   # exp and mul in one kernel, no copy for the transpose or the slice
    for n in (1, 2, 3, 6):
        a = np.random.default_rng(n).standard_normal((n, 5)).astype(np.float32)
        got = f(a)
        assert got.shape == (5, min(n, 3))
        np.testing.assert_allclose(got, ref(a), rtol=1e-6)


def test_scan_is_a_shared_loop_step_over_a_symbolic_length():
    x = gc.placeholder("x", (None, 3))     # the scan runs over the batch dim: its length is N
    h0 = gc.placeholder("h0", (3,))

    def step(h, xt):
        h2 = gc.tanh(h * 0.5 + xt)
        return h2, h2 * h2
    h, ys = gc.scan(step, h0, x)
    f, ref = _both([x, h0], [h, ys])
    s = f.program.info["plan"]
    (loop,) = [st for st in s.steps if isinstance(st, LoopStep)]
    assert isinstance(loop.length, sympy.Basic) and f.program.info["fallback_ops"] == []
    for n in (1, 4, 9):
        a = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
        b = np.random.default_rng(n + 1).standard_normal(3).astype(np.float32)
        for got, want in zip(f(a, b), ref(a, b)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
