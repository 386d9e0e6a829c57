"""A micro-kernel product's region of adds and a closing ReLU, or of literal scales, subtractions and adds after the
sum (an SGD update), folded into its tiles (epilogue.fold,
gemm_tiles' fold): x @ W + b, relu(x @ W + b), x @ W + b + r and batched (b, T, k) @ (k, m) forms against
NumPy in float64, on odd sizes, both vector ISAs, one and two threads, float32 and float64; one step where
it folds; never where the product itself is read after the region (a ReLU's gradient reads its sign), where
an addend's columns are strided or the region holds another op, or with GRAPHC_LLVM_FOLD=0."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip, plan_steps

TOL = {"float32": 2e-5, "float64": 1e-12}


@pytest.fixture(autouse=True)
def llvm(monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")


def _names(f):
    return [getattr(st, "name", "") for st in plan_steps(f)]


def _folded(f) -> bool:
    return any(getattr(st, "folded", False) for st in plan_steps(f))


def _close(got, want, dtype, k):
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, k ** 0.5) * 4)


def _region(kind, p, b, r):
    return {"bias": lambda: p + b, "relu": lambda: gc.relu(p + b), "residual": lambda: r + (b + p),
            "residual-relu": lambda: gc.relu(p + b + r)}[kind]()


def _ref(kind, p, b, r):
    y = p + b
    if kind.startswith("residual"):
        y = y + r
    return np.maximum(y, 0) if kind.endswith("relu") else y


@pytest.mark.parametrize("isa, threads", [("avx2", "1"), ("avx2", "2"), ("avx512", "1"), ("avx512", "2")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_folded_regions_match_numpy(isa, threads, dtype, monkeypatch):
    from graphc.backends.llvm import tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")       # the micro-kernel for every size here
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)    # split over the pool by column blocks
    rng = np.random.default_rng(31)
    shapes = [((2, 3), 17), ((17, 63), 65), ((65, 257), 17), ((3, 5, 17), 63), ((257, 1), 17), ((300, 257), 70)]
    for i, (xs, m) in enumerate(shapes):
        kind = ("bias", "relu", "residual", "residual-relu", "relu", "residual")[i]
        k = xs[-1]
        x = gc.placeholder("x", xs, dtype)
        r = gc.placeholder("r", xs[:-1] + (m,), dtype)
        w = gc.parameter("w", rng.standard_normal((k, m)).astype(dtype))
        b = gc.parameter("b", rng.standard_normal(m).astype(dtype))
        f = gc.function([x, r], _region(kind, x @ w, b, r), backend="llvm")
        assert f.program.info["fallback_ops"] == []
        assert _folded(f) and "elementwise" not in _names(f), (xs, m, kind, _names(f))
        xv, rv = rng.standard_normal(xs).astype(dtype), rng.standard_normal(xs[:-1] + (m,)).astype(dtype)
        got = f(xv, rv)
        got = got[0] if isinstance(got, (list, tuple)) else got
        _close(got, _ref(kind, xv.astype(np.float64) @ w.value, b.value, rv), dtype, k)


def test_relu_keeps_nan_and_negative_zero_goes_to_zero(monkeypatch):
    """The folded ReLU is lower._relu's: x < 0 ? 0 : x (a NaN stays NaN, as NumPy's maximum)."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 1 << 30)
    x = gc.placeholder("x", (6, 4))
    w = gc.parameter("w", np.eye(4, 20, dtype=np.float32))
    b = gc.parameter("b", np.array([np.nan] + [0.0] * 19, np.float32))
    f = gc.function([x], gc.relu(x @ w + b), backend="llvm")
    assert _folded(f)
    xv = np.array([[3, -1, 2, -0.0]] * 6, np.float32)
    got = f(xv)
    got = got[0] if isinstance(got, (list, tuple)) else got
    want = np.maximum(xv @ w.value + b.value, 0)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[:, 0]).all() and (got[:, 1] == 0).all()


def test_not_folded_where_it_would_change_meaning(monkeypatch):
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 1 << 30)
    rng = np.random.default_rng(5)
    x = gc.placeholder("x", (17, 33))
    w = gc.parameter("w", rng.standard_normal((33, 40)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(40).astype(np.float32))
    bt = gc.parameter("bt", rng.standard_normal((40, 17)).astype(np.float32))
    p = x @ w
    xv = rng.standard_normal((17, 33)).astype(np.float32)
    pv = xv.astype(np.float64) @ w.value
    cases = [
        ("the product read again", [gc.relu(p + b), p], [np.maximum(pv + b.value, 0), pv]),
        ("an addend read down its columns", [p + gc.transpose(bt)], [pv + bt.value.T]),
        ("another op in the region", [gc.sigmoid(p + b)], [1 / (1 + np.exp(-(pv + b.value)))]),
    ]
    for why, outs, wants in cases:
        f = gc.function([x], outs, backend="llvm")
        assert not _folded(f), (why, _names(f))
        got = f(xv)
        got = got if isinstance(got, (list, tuple)) else [got]
        for g, want in zip(got, wants):
            _close(g, want, "float32", 33)
    assert _folded(gc.function([x], gc.relu(p + b), backend="llvm"))
    monkeypatch.setenv("GRAPHC_LLVM_FOLD", "0")
    assert not _folded(gc.function([x], gc.relu(p + b), backend="llvm"))


def test_training_step_keeps_the_product_for_the_relu_gradient(monkeypatch):
    """In a training step the ReLU's gradient reads the product: nothing folds there and the gradients
    match finite differences of the float64 loss."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 1 << 30)
    rng = np.random.default_rng(8)
    x = gc.placeholder("x", (9, 7), "float64")
    w = gc.parameter("w", rng.standard_normal((7, 5)))
    b = gc.parameter("b", rng.standard_normal(5))
    loss = gc.sum(gc.relu(x @ w + b) ** 2)
    gw, gb = gc.grad(loss, [w, b])
    f = gc.function([x], [loss, gw, gb], backend="llvm")
    xv = rng.standard_normal((9, 7))
    assert not _folded(f)
    lv, gwv, gbv = f(xv)

    def loss_np(wv, bv):
        return float(np.sum(np.maximum(xv @ wv + bv, 0) ** 2))
    eps = 1e-6
    num = np.zeros_like(w.value)
    for i in range(7):
        for j in range(5):
            d = np.zeros_like(w.value)
            d[i, j] = eps
            num[i, j] = (loss_np(w.value + d, b.value) - loss_np(w.value - d, b.value)) / (2 * eps)
    np.testing.assert_allclose(lv, loss_np(w.value, b.value), rtol=1e-12)
    np.testing.assert_allclose(gwv, num, rtol=1e-6, atol=1e-6)


def _post_region(kind, p, r, b):
    """Regions whose operations after the product are not (only) adds: gemm_tiles' fold[2]."""
    return {"sgd": lambda: r - 0.1 * p, "scaled-add": lambda: p * 0.25 + r, "first-scale": lambda: 3.0 * p,
            "relu-scale": lambda: gc.relu(p) * 0.5 + r, "rsub": lambda: r - p, "sub": lambda: p - r,
            "bias-scale-relu": lambda: gc.relu((p + b) * -2.0), "sub-add": lambda: (p - r) + b}[kind]()


def _post_ref(kind, p, r, b):
    return {"sgd": lambda: r - 0.1 * p, "scaled-add": lambda: p * 0.25 + r, "first-scale": lambda: 3.0 * p,
            "relu-scale": lambda: np.maximum(p, 0) * 0.5 + r, "rsub": lambda: r - p, "sub": lambda: p - r,
            "bias-scale-relu": lambda: np.maximum((p + b) * -2.0, 0), "sub-add": lambda: (p - r) + b}[kind]()


POST_KINDS = ["sgd", "scaled-add", "first-scale", "relu-scale", "rsub", "sub", "bias-scale-relu", "sub-add"]


@pytest.mark.parametrize("isa, threads", [("avx2", "1"), ("avx2", "2"), ("avx512", "1"), ("avx512", "2")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scaled_and_subtracted_regions_fold(isa, threads, dtype, monkeypatch):
    """A region that scales the product by a literal, subtracts it or subtracts from it (an SGD step's
    W - lr * (X^T @ dY)) folds as operations on each stored vector, in the region's order, on odd sizes."""
    from graphc.backends.llvm import tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)
    rng = np.random.default_rng(37)
    shapes = [(1, 3, 17), (17, 63, 65), (65, 1, 257), (63, 17, 3), (257, 65, 63), (3, 257, 16), (17, 5, 8),
              (64, 33, 100)]
    for kind, (n, k, m) in zip(POST_KINDS, shapes):
        x = gc.placeholder("x", (k, n), dtype)   # the product reads x down its columns: x^T @ g
        g = gc.placeholder("g", (k, m), dtype)
        r = gc.placeholder("r", (n, m), dtype)
        b = gc.parameter("b", rng.standard_normal(m).astype(dtype))
        f = gc.function([x, g, r], _post_region(kind, gc.transpose(x) @ g, r, b), backend="llvm")
        assert _folded(f) and "elementwise" not in _names(f), (kind, n, k, m, _names(f))
        xv, gv, rv = (rng.standard_normal(s).astype(dtype) for s in [(k, n), (k, m), (n, m)])
        got = f(xv, gv, rv)
        got = got[0] if isinstance(got, (list, tuple)) else got
        _close(got, _post_ref(kind, xv.T.astype(np.float64) @ gv, rv, b.value), dtype, k)


@pytest.mark.parametrize("pack", ["always", "1"])
def test_sgd_steps_fold_their_update(pack, monkeypatch):
    """An MLP's SGD step on the micro-kernel: each weight's update W - lr * (X^T @ dY) folds into its
    product's tiles (packed every call with GRAPHC_LLVM_PACK=always); three steps match NumPy's."""
    from graphc.backends.llvm import gemm
    monkeypatch.setenv("GRAPHC_LLVM_PACK", pack)
    monkeypatch.setattr(gemm, "SMALL_MACS", 1 << 30)
    rng = np.random.default_rng(12)
    w0v, w1v = rng.standard_normal((33, 65)) * 0.2, rng.standard_normal((65, 17)) * 0.2
    x = gc.placeholder("x", (None, 33), "float64")
    w0, w1 = gc.parameter("w0", w0v), gc.parameter("w1", w1v)
    y = gc.tanh(x @ w0) @ w1
    loss = gc.sum(y * y) * 0.5
    g0, g1 = gc.grad(loss, [w0, w1])
    f = gc.function([x], loss, updates=[(w0, w0 - 0.05 * g0), (w1, w1 - 0.05 * g1)], backend="llvm")
    xv = rng.standard_normal((70, 33))
    for _ in range(3):
        f(xv)
        h = np.tanh(xv @ w0v)
        dy = h @ w1v
        g1v = h.T @ dy
        g0v = xv.T @ ((dy @ w1v.T) * (1 - h * h))
        w0v, w1v = w0v - 0.05 * g0v, w1v - 0.05 * g1v
    assert sum(getattr(st, "folded", False) for st in plan_steps(f)) == 2, _names(f)
    np.testing.assert_allclose(w0.value, w0v, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(w1.value, w1v, rtol=1e-10, atol=1e-10)


def test_scaled_region_not_folded_where_it_would_change_meaning(monkeypatch):
    """A product scaled by another tensor (not a literal), or a region reading another operand the product
    does not feed, keeps its own pass."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 1 << 30)
    rng = np.random.default_rng(6)
    x = gc.placeholder("x", (17, 33))
    r = gc.placeholder("r", (17, 40))
    w = gc.parameter("w", rng.standard_normal((33, 40)).astype(np.float32))
    p = x @ w
    xv, rv = rng.standard_normal((17, 33)).astype(np.float32), rng.standard_normal((17, 40)).astype(np.float32)
    pv = xv.astype(np.float64) @ w.value
    for why, out, want in [("scaled by a tensor", p * r, pv * rv), ("an op off the chain", p - r * 2.0, pv - rv * 2.0),
                           ("divided", p / 3.0 - r, pv / 3.0 - rv)]:
        f = gc.function([x, r], out, backend="llvm")
        got = f(xv, rv)
        got = got[0] if isinstance(got, (list, tuple)) else got
        _close(got, want, "float32", 33)
        if why != "divided":   # (x / 3 may be rewritten as x * (1/3), a literal scale: then it folds)
            assert not _folded(f), (why, _names(f))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_sgd_update_folds_into_a_product_split_by_rows(isa, monkeypatch):
    """A weight gradient with many rows and few column blocks, packed every call and split by parts of its
    rows (gemm.row_parts), folds its update: each part's rows read the weight from their own row on."""
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)
    rng = np.random.default_rng(41)
    n, k, m = 403, 9, 70
    assert gemm.row_parts(n, m, "float32", 2) is not None
    w = gc.parameter("w", rng.standard_normal((n, m)).astype(np.float32))
    x, g = gc.placeholder("x", (k, n)), gc.placeholder("g", (k, m))
    f = gc.function([x, g], [], updates=[(w, w - 0.125 * (gc.transpose(x) @ g))], backend="llvm")
    steps = plan_steps(f)
    assert any(getattr(s, "folded", False) for s in steps) and "pack_panels" in _names(f), _names(f)
    want = w.value.astype(np.float64)
    for _ in range(2):
        xv, gv = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal((k, m)).astype(np.float32)
        f(xv, gv)
        want = want - 0.125 * (xv.T.astype(np.float64) @ gv)
        _close(w.value, want, "float32", k)
