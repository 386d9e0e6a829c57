"""Reshapes and transposes that need no copy.

- schedule.views.view_reshape: a reshape of a strided view (a transpose, a slice) is a view whenever the
  axes it merges are walked contiguously (NumPy's no-copy rule); checked against NumPy on random views.
- algebraic's layout_chain: a chain of three or more reshapes/transposes becomes reshape (cut x's axes),
  transpose, reshape (merge only neighbours), so torch's head split (L, B, H*D) -> (L, B*H, D) -> T ->
  (B, H, L, D) is a view; chains whose pieces cannot be regrouped so are left alone.
- the llvm attention kernel writes its output in the order its one transposing reader wants (torch's
  sequence-first merge of the heads), so that transpose and the reshape after it are views too.
Values are compared with NumPy on the numpy and llvm backends, the gradient with NumPy's transposes."""
from __future__ import annotations

import random

import numpy as np
import pytest

import graphc as gc
from graphc.backends.schedule.views import View, view_reshape
from graphc.ops.shape_ops import Reshape, Transpose
from graphc.passes import optimize


def _numpy_view(v: View, base: np.ndarray) -> np.ndarray:
    return np.lib.stride_tricks.as_strided(base[v.offset:], v.shape, [s * base.itemsize for s in v.strides])


def test_view_reshape_agrees_with_numpy():
    """A view exactly where NumPy reshapes without a copy, and the same elements in the same order."""
    rng = random.Random(0)
    views = 0
    for _ in range(1500):
        nd = rng.randint(1, 4)
        full = [rng.choice([1, 2, 3, 4, 6]) for _ in range(nd)]
        base = np.arange(int(np.prod(full)), dtype=np.float32)
        perm = list(range(nd))
        rng.shuffle(perm)
        a = base.reshape(full).transpose(perm)[tuple(slice(None, None, rng.choice([1, 1, 2])) for _ in range(nd))]
        off = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 4
        v = View(0, off, a.shape, tuple(s // 4 for s in a.strides), "float32")
        shape, rest = [], a.size
        for d in (2, 3, 1, 4, 6, 2, 5):
            if rest % d == 0 and rng.random() < 0.5:
                shape.append(d)
                rest //= d
        shape.append(rest)
        rng.shuffle(shape)
        if rng.random() < 0.3:
            shape.insert(rng.randint(0, len(shape)), 1)
        w = view_reshape(v, tuple(shape))
        try:
            b = a.view()
            b.shape = shape          # NumPy's own no-copy reshape (raises where a copy is needed)
            numpy_can = True
        except AttributeError:
            numpy_can = False
        assert (w is not None) == numpy_can, (a.shape, a.strides, shape)
        if w is not None:
            views += 1
            np.testing.assert_array_equal(_numpy_view(w, base), a.reshape(shape))
    assert views > 500


def test_view_reshape_leaves_symbolic_and_literal_views():
    import sympy
    n = sympy.Symbol("n", positive=True, integer=True)
    assert view_reshape(View(0, 0, (n, 4), (8, 2), "float32"), (n, 2, 2)) is None
    assert view_reshape(View(0, 0, (2, 3), (0, 0), "float32", literal=1.0), (3, 2)) is None


# ---- the graph rule -----------------------------------------------------------------------------------

L, B, H, D = 5, 3, 2, 7
E = H * D


def _head_split(x):
    """torch's MultiheadAttention export: (L, B, E) -> (L, B*H, D) -> (B*H, L, D) -> (B, H, L, D)."""
    return gc.reshape(gc.transpose(gc.reshape(x, (L, B * H, D)), (1, 0, 2)), (B, H, L, D))


def _np_head_split(x):
    return x.reshape(L, B * H, D).transpose(1, 0, 2).reshape(B, H, L, D)


CHAINS = [   # (input shape, build, numpy, composed into fewer ops)
    ((L, B, E), _head_split, _np_head_split, True),
    ((B, H, L, D), lambda x: gc.reshape(gc.transpose(gc.reshape(x, (B * H, L, D)), (1, 0, 2)), (L, B, H, D)),
     lambda x: x.reshape(B * H, L, D).transpose(1, 0, 2).reshape(L, B, H, D), True),
    # ... merged to (L, B, H*D): H and D are not neighbours in x, so a copy stays (and the chain too)
    ((B, H, L, D), lambda x: gc.reshape(gc.transpose(gc.reshape(x, (B * H, L, D)), (1, 0, 2)), (L, B, E)),
     lambda x: x.reshape(B * H, L, D).transpose(1, 0, 2).reshape(L, B, E), False),
    ((6, 10), lambda x: gc.transpose(gc.reshape(gc.transpose(x, (1, 0)), (5, 2, 6)), (2, 0, 1)),
     lambda x: x.T.reshape(5, 2, 6).transpose(2, 0, 1), True),
    # (4, 6) -> (6, 4) -> T -> (24,): the merge is of pieces that are not neighbours in x: left alone
    ((4, 6), lambda x: gc.reshape(gc.transpose(gc.reshape(x, (6, 4)), (1, 0)), (24,)),
     lambda x: x.reshape(6, 4).T.reshape(24), False),
]


def _layout_ops(graph):
    return sum(n.op in (Reshape, Transpose) for n in graph.compute_nodes())


@pytest.mark.parametrize("shape, build, ref, composed", CHAINS)
def test_layout_chain(shape, build, ref, composed):
    x = gc.placeholder("x", shape)
    y = build(x)
    before = _layout_ops(gc.Graph([x], [y]))
    g = optimize(gc.Graph([x], [gc.exp(y)]), level=1)
    assert (_layout_ops(g) < before) == composed
    xv = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = np.exp(ref(xv))
    for be in ("numpy", "llvm"):
        np.testing.assert_allclose(gc.function([x], gc.exp(y), backend=be)(xv), want, rtol=1e-6, err_msg=be)


def test_layout_chain_gradient():
    x = gc.placeholder("x", (L, B, E), dtype="float64")
    w = np.random.default_rng(2).standard_normal((B, H, L, D))
    loss = gc.sum(_head_split(x) * gc.constant(w))
    (gx,) = gc.grad(loss, [x])
    xv = np.random.default_rng(3).standard_normal((L, B, E))
    want = w.reshape(B * H, L, D).transpose(1, 0, 2).reshape(L, B, E)   # the split's inverse applied to w
    for be in ("numpy", "llvm"):
        np.testing.assert_allclose(gc.function([x], gx, backend=be)(xv), want, rtol=1e-12, err_msg=be)


def test_symbolic_chain_is_left_alone():
    x = gc.placeholder("x", (None, B, E))
    y = gc.reshape(gc.transpose(gc.reshape(x, (-1, B * H, D)), (1, 0, 2)), (B, H, -1, D))
    g = optimize(gc.Graph([x], [gc.exp(y)]), level=1)
    assert _layout_ops(g) == 3
    xv = np.random.default_rng(4).standard_normal((L, B, E)).astype(np.float32)
    np.testing.assert_allclose(gc.function([x], gc.exp(y), backend="numpy")(xv), np.exp(_np_head_split(xv)),
                               rtol=1e-6)


def test_torch_style_attention_copies_nothing_on_llvm():
    """QKV projection, head split, attention, sequence-first merge and output projection: the llvm plan
    is the two products (with their bias epilogues) and the attention kernel, no copy between them."""
    rng = np.random.default_rng(5)
    x = gc.placeholder("x", (L, B, E))
    wqkv, wo = rng.standard_normal((E, 3 * E)).astype("f4") / 4, rng.standard_normal((E, E)).astype("f4") / 4
    bqkv = rng.standard_normal(3 * E).astype("f4")
    qkv = gc.transpose(gc.reshape(x @ gc.constant(wqkv) + gc.constant(bqkv), (L, B, 3, E)), (2, 0, 1, 3))
    q, k, v = (_head_split(qkv[i]) for i in range(3))
    a = gc.scaled_dot_product_attention(q, k, v)                       # (B, H, L, D)
    y = gc.reshape(gc.transpose(a, (2, 0, 1, 3)), (L * B, E)) @ gc.constant(wo)
    f = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((L, B, E)).astype("f4")

    qkv_v = (xv.astype(np.float64) @ wqkv + bqkv).reshape(L, B, 3, E).transpose(2, 0, 1, 3)
    qv, kv, vv = (_np_head_split(qkv_v[i]) for i in range(3))
    s = qv @ kv.transpose(0, 1, 3, 2) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    av = (p / p.sum(-1, keepdims=True)) @ vv
    want = av.transpose(2, 0, 1, 3).reshape(L * B, E) @ wo
    np.testing.assert_allclose(f(xv), want, rtol=2e-4, atol=2e-5)
    kinds = [r.kernel for r in f.explain(xv).rows]
    assert kinds.count("attention") == 1 and kinds.count("matmul") == 2
    assert all(r.ops != ["reshape"] and r.ops != ["transpose"] for r in f.explain(xv).rows), kinds
