"""Property tests: broadcasting, reductions and shape ops against NumPy on generated shapes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import graphc as gc

SETTINGS = settings(max_examples=60, deadline=None)
BINARY = [("add", gc.add, np.add), ("mul", gc.mul, np.multiply), ("maximum", gc.maximum, np.maximum),
          ("where_gt", lambda a, b: gc.where(a > b, a, b), lambda a, b: np.where(a > b, a, b))]


@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=0, max_side=3),
       which=st.sampled_from(range(len(BINARY))), dtype=st.sampled_from(["float32", "float64", "int32"]))
def test_binary_broadcasting(shapes, which, dtype):
    name, f, ref = BINARY[which]
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shapes.input_shapes[0]) * 3).astype(dtype)
    b = (rng.standard_normal(shapes.input_shapes[1]) * 3).astype(dtype)
    x, y = gc.placeholder("x", a.shape, dtype), gc.placeholder("y", b.shape, dtype)
    out = f(x, y)
    want = ref(a, b)
    assert out.shape == want.shape and out.dtype == want.dtype.name
    np.testing.assert_array_equal(gc.function([x, y], out)(a, b), want)


@SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), data=st.data())
def test_reductions_any_axes(shape, data):
    axes = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), unique_by=lambda a: a % len(shape),
                              max_size=len(shape)))
    axis = tuple(axes) if axes else None
    keepdims = data.draw(st.booleans())
    a = np.random.default_rng(1).standard_normal(shape)
    x = gc.placeholder("x", shape, "float64")
    outs = [gc.sum(x, axis, keepdims), gc.max(x, axis, keepdims), gc.mean(x, axis, keepdims),
            gc.logsumexp(x, axis, keepdims)]
    got = gc.function([x], outs)(a)
    m = np.max(a, axis=axis, keepdims=True)
    lse = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    want = [np.sum(a, axis, keepdims=keepdims), np.max(a, axis, keepdims=keepdims),
            np.mean(a, axis, keepdims=keepdims), lse if keepdims else np.squeeze(lse, axis)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4), data=st.data())
def test_transpose_reshape_roundtrip(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    x = gc.placeholder("x", shape, "float64")
    y = gc.transpose(x, perm).reshape(-1) if a.size else gc.transpose(x, perm)
    want = a.transpose(perm).reshape(-1) if a.size else a.transpose(perm)
    np.testing.assert_array_equal(gc.function([x], y)(a), want)


@pytest.mark.parametrize("idx", [(slice(1, None),), (slice(None, -1), 0), (Ellipsis, slice(None, None, 2)),
                                 (None, 1), (-1, slice(0, 0))])
def test_getitem_symbolic_batch(idx):
    x = gc.placeholder("x", (None, 4), "float64")
    f = gc.function([x], x[idx])
    for n in (2, 5):
        a = np.random.default_rng(n).standard_normal((n, 4))
        np.testing.assert_array_equal(f(a), a[idx])
