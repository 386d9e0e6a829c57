"""A micro-kernel product's region of adds and a closing ReLU folded into its tiles (epilogue.fold,
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
