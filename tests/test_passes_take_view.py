"""algebraic's take_as_view: take(x, constant indices, axis) becomes basic indexing (a view) when the
indices are one int or a slice's (a, a+s, ...); anything else stays a take. Checked against NumPy's
np.take on every backend the table runs, plus the gradient."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ops.shape_ops import GetItem, Take
from graphc.passes import optimize

X = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)

CASES = [  # (indices, axis, becomes a view)
    (np.int64(1), 0, True),
    (np.int64(-1), 1, True),            # negative: counts from the end
    (np.int32(3), 2, True),
    (np.array([1, 2, 3]), 1, True),     # a slice 1:4
    (np.array([0, 2, 4]), 1, True),     # a stepped slice 0:5:2
    (np.array([-2, -1]), 2, True),      # 2:4
    (np.array([2]), 0, True),
    (np.array([2, 0]), 1, False),       # no slice: stays a take
    (np.array([1, 1]), 2, False),       # repeated
    (np.array([[0, 1], [2, 3]]), 1, False),   # 2-D indices
]


def _ops(graph):
    return {n.op for n in graph.compute_nodes()}


@pytest.mark.parametrize("idx,axis,view", CASES)
def test_take_of_constant_indices(idx, axis, view):
    x = gc.placeholder("x", X.shape)
    y = gc.exp(gc.take(x, gc.constant(np.asarray(idx)), axis))
    g = optimize(gc.Graph([x], [y]))
    assert (Take not in _ops(g)) == view
    assert (GetItem in _ops(g)) == view
    want = np.exp(np.take(X, idx, axis=axis))
    for be in gc.available_backends():
        if be.startswith("cuda"):
            continue
        got = gc.function([x], y, backend=be)(X)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=be)


def test_take_out_of_range_stays_a_take():
    x = gc.placeholder("x", (4, 3))
    y = gc.take(x, gc.constant(np.array([1, 4])), 0) * 2.0
    assert Take in _ops(optimize(gc.Graph([x], [y])))


def test_take_on_symbolic_axis_stays_a_take():
    x = gc.placeholder("x", (None, 3))
    y = gc.take(x, gc.constant(np.int64(0)), 0) * 2.0
    assert Take in _ops(optimize(gc.Graph([x], [y])))
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(gc.function([x], y, backend="numpy")(a), a[0] * 2)


def test_gradient_through_the_view():
    gc.verify_grad(lambda x: gc.tanh(gc.take(x, gc.constant(np.array([0, 2])), 1)) * 3.0,
                   [np.random.default_rng(1).standard_normal((2, 4))])
