"""A product's elementwise region (bias, activation) runs on each block of the product right after the
block is written (backends/llvm/epilogue.py): same answers as NumPy's float64 reference through every
product path (one OpenBLAS call, OpenBLAS calls split by rows or by columns, the micro-kernel whole or
split by column blocks, the matrix-vector loop in both forms, whole or split), odd sizes, float32 and
float64, both ISAs' vector shapes and both thread counts; the pre-activation product still complete for
a later reader; a float64 gradient through fused layers against finite differences; not fused where the
region does not read the product element for element."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, plan_steps


@pytest.fixture(autouse=True)
def llvm(monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_TUNE", "off")   # the size rules choose the path: each case takes the one it names
    monkeypatch.setenv("GRAPHC_LLVM_FOLD", "0")   # (a bias + ReLU after the micro-kernel folds into its tiles
    # first: tests/test_llvm_product_fold.py; here the region run on the blocks is under test)


def _fused(f) -> list:
    return [s for s in plan_steps(f) if getattr(s, "epilogue", False)]


# (path, n, k, m, GRAPHC_LLVM_SMALL_GEMM, weight transposed): each names the product kernel it should get
CASES = [
    ("blas-whole", 17, 63, 65, "0", False),
    ("blas-rows", 257, 129, 65, "0", False),
    ("blas-cols", 65, 129, 257, "0", False),
    ("blas-rows-wt", 257, 129, 65, "0", True),
    ("tiles-whole", 3, 17, 63, "1", False),
    ("tiles-cols", 65, 65, 129, "1", False),
    ("gemv-axpy", 1, 63, 65, "auto", False),
    ("gemv-axpy-split", 1, 257, 1025, "auto", False),
    ("gemv-dot", 1, 65, 17, "auto", True),
    ("gemv-dot-split", 1, 257, 1025, "auto", True),
    ("gemv-column", 257, 63, 1, "auto", False),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense_layers_match_numpy_on_every_product_path(case, dtype, isa, threads, monkeypatch, rng):
    path, n, k, m, small, wt = case
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", small)
    monkeypatch.setenv("GRAPHC_LLVM_PRODUCT_EPILOGUE", "all")   # split products too (not fused by default)
    xv = rng.standard_normal((n, k)).astype(dtype)
    wv = (rng.standard_normal((m, k) if wt else (k, m)) / np.sqrt(k)).astype(dtype)
    bv = rng.standard_normal(m).astype(dtype)
    rv = rng.standard_normal((n, m)).astype(dtype)
    x, r = gc.placeholder("x", (n, k), dtype), gc.placeholder("r", (n, m), dtype)
    w, b = gc.parameter("w", wv), gc.parameter("b", bv)
    z = gc.matmul(x, gc.transpose(w) if wt else w)
    y1 = gc.relu(z + b)
    y2 = gc.tanh(z * 0.5 + r) - gc.sigmoid(z)
    f = gc.function([x, r], [y1, y2, z], backend="llvm")
    g1, g2, gz = f(xv, rv)
    ref = xv.astype(np.float64) @ (wv.T if wt else wv).astype(np.float64)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gz, ref, **tol)
    np.testing.assert_allclose(g1, np.maximum(ref + bv, 0), **tol)
    np.testing.assert_allclose(g2, np.tanh(ref * 0.5 + rv) - 1 / (1 + np.exp(-ref)), **tol)
    fused = _fused(f)
    assert fused, f"{path}: the region was planned as its own kernel: {[s.name for s in plan_steps(f)]}"
    kinds = {s.name for s in fused}
    assert kinds == ({"gemv"} if path.startswith("gemv") else {"matmul"}), kinds
    if path.endswith("split") or path in ("blas-rows", "blas-cols", "blas-rows-wt", "tiles-cols"):
        assert threads == 1 or all(s.split for s in fused), f"{path}: expected a product split over the pool"


def test_an_mlp_keeps_no_epilogue_kernel_and_its_float64_gradient_matches_finite_differences(rng):
    xv = rng.standard_normal((9, 7))
    w1v, b1v = rng.standard_normal((7, 11)), rng.standard_normal(11)
    w2v, b2v = rng.standard_normal((11, 5)), rng.standard_normal(5)
    x = gc.placeholder("x", (None, 7), "float64")
    w1, b1, w2, b2 = (gc.parameter(nm, v) for nm, v in (("w1", w1v), ("b1", b1v), ("w2", w2v), ("b2", b2v)))
    h = gc.tanh(gc.matmul(x, w1) + b1)
    loss = gc.sum(gc.sigmoid(gc.matmul(h, w2) + b2) ** 2)
    grads = gc.grad(loss, [w1, b1])
    f = gc.function([x], [loss] + grads, backend="llvm")
    got = f(xv)
    assert _fused(f)

    def loss_np(w1_, b1_):
        hh = np.tanh(xv @ w1_ + b1_)
        return np.sum((1 / (1 + np.exp(-(hh @ w2v + b2v)))) ** 2)
    np.testing.assert_allclose(got[0], loss_np(w1v, b1v), rtol=1e-12)
    eps = 1e-6
    for gi, (base, other) in enumerate(((w1v, b1v), (b1v, w1v))):
        num = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            up, dn = base.copy(), base.copy()
            up[idx] += eps
            dn[idx] -= eps
            args_up = (up, other) if gi == 0 else (other, up)
            args_dn = (dn, other) if gi == 0 else (other, dn)
            num[idx] = (loss_np(*args_up) - loss_np(*args_dn)) / (2 * eps)
        np.testing.assert_allclose(got[1 + gi], num, rtol=1e-6, atol=1e-8)


def test_regions_not_reading_the_product_element_for_element_stay_apart(rng, monkeypatch):
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    xv = rng.standard_normal((33, 17)).astype("float32")
    wv = rng.standard_normal((17, 33)).astype("float32")
    x, w = gc.placeholder("x", xv.shape), gc.parameter("w", wv)
    z = gc.matmul(x, w)
    f = gc.function([x], gc.relu(z + gc.transpose(z)), backend="llvm")   # reads P transposed
    p = xv.astype(np.float64) @ wv
    np.testing.assert_allclose(f(xv), np.maximum(p + p.T, 0), rtol=1e-4, atol=1e-4)
    assert not _fused(f)
    f2 = gc.function([x], gc.reshape(z, (33, 33, 1)) * gc.constant(np.ones((1, 1, 3), "float32")),
                     backend="llvm")   # a region larger than the product
    np.testing.assert_allclose(f2(xv), np.repeat(p[:, :, None], 3, axis=2), rtol=1e-4, atol=1e-4)
    assert not _fused(f2)


def test_the_switch_plans_two_kernels_with_the_same_answer(rng, monkeypatch):
    xv = rng.standard_normal((65, 63)).astype("float32")
    wv = rng.standard_normal((63, 17)).astype("float32")
    bv = rng.standard_normal(17).astype("float32")

    def build():
        x, w, b = gc.placeholder("x", xv.shape), gc.parameter("w", wv), gc.parameter("b", bv)
        return gc.function([x], gc.relu(gc.matmul(x, w) + b), backend="llvm")
    fused = build()
    assert _fused(fused)   # (its plan asked for before the switch changes: a warm start makes it when asked)
    monkeypatch.setenv("GRAPHC_LLVM_PRODUCT_EPILOGUE", "0")
    apart = build()
    assert not _fused(apart)
    assert any(s.name == "elementwise" for s in plan_steps(apart))
    np.testing.assert_array_equal(fused(xv), apart(xv))


def test_by_default_split_products_keep_their_region_apart_and_matrix_vector_products_fuse(rng, monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    xv = rng.standard_normal((257, 129)).astype("float32")
    wv = rng.standard_normal((129, 65)).astype("float32")
    x, w = gc.placeholder("x", (None, 129)), gc.parameter("w", wv)
    f = gc.function([x], gc.relu(gc.matmul(x, w)), backend="llvm")
    np.testing.assert_allclose(f(xv), np.maximum(xv.astype(np.float64) @ wv, 0), rtol=1e-4, atol=1e-4)
    assert not _fused(f) and any(s.name == "matmul" and s.split for s in plan_steps(f))
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "auto")
    g = gc.function([x], gc.relu(gc.matmul(x, w)), backend="llvm")
    np.testing.assert_allclose(g(xv[:1]), np.maximum(xv[:1].astype(np.float64) @ wv, 0), rtol=1e-4, atol=1e-4)
    assert [s.name for s in _fused(g)] == ["gemv"]


@pytest.mark.parametrize("small", ["0", "1"])
def test_by_default_a_split_product_whose_region_streams_memory_fuses_it(small, rng, monkeypatch):
    """An SGD step's weight update W - lr * (A^T @ D): the inner dimension is the batch (64), and the region
    reads the product and W and writes the new W (12 bytes an element against 128 FLOPs): fused by default
    into the product split over the pool (OpenBLAS blocks or the micro-kernel's), with NumPy's answer; the
    same update after a product of inner dimension 513 keeps its region apart (epilogue.streams)."""
    from graphc.backends.llvm import epilogue
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", small)
    for k, fuses in ((64, True), (513, False)):
        av = rng.standard_normal((k, 515)).astype("float32")
        dv = rng.standard_normal((k, 257)).astype("float32")
        wv = rng.standard_normal((515, 257)).astype("float32")
        a, d = gc.placeholder("a", av.shape), gc.placeholder("d", dv.shape)
        w = gc.parameter("w", wv.copy())
        f = gc.function([a, d], gc.sum(d), updates=[(w, w - 0.1 * gc.matmul(gc.transpose(a), d))], backend="llvm")
        f(av, dv)
        want = wv.astype(np.float64) - 0.1 * (av.T.astype(np.float64) @ dv)
        np.testing.assert_allclose(w.value, want, rtol=2e-4, atol=2e-4 * np.sqrt(k))
        split = [s for s in plan_steps(f) if s.name == "matmul" and s.split]
        assert split, f"k={k}: expected the product split over the pool: {[s.name for s in plan_steps(f)]}"
        assert bool(_fused(f)) == fuses, (k, [(s.name, getattr(s, "epilogue", False)) for s in plan_steps(f)])
    # the rule itself: bytes of whole operands only (a broadcast bias costs nothing per element)
    full = (8, 8)
    whole = epilogue.View(0, 0, full, (8, 1), "float32")
    bias = epilogue.View(1, 0, (8,), (1,), "float32")
    assert epilogue.streams(64, [whole], [whole, whole], full)        # 12 bytes: 60 >= 25.6
    assert epilogue.streams(100, [whole], [whole, bias], full)        # 8 bytes: 40 >= 40
    assert not epilogue.streams(101, [whole], [whole, bias], full)
    assert not epilogue.streams(151, [whole], [whole, whole], full)   # 60 < 60.4


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_fused_path_runs_clean_under_bounds_checks(case, monkeypatch, rng):
    """sanitize="bounds": every load and store of the fused region is checked against its buffer (a
    region run on the wrong rows or columns of a block would be reported)."""
    path, n, k, m, small, wt = case
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", small)
    monkeypatch.setenv("GRAPHC_LLVM_PRODUCT_EPILOGUE", "all")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    xv = rng.standard_normal((n, k)).astype("float32")
    wv = rng.standard_normal((m, k) if wt else (k, m)).astype("float32")
    bv = rng.standard_normal(m).astype("float32")
    x, w, b = gc.placeholder("x", (n, k)), gc.parameter("w", wv), gc.parameter("b", bv)
    y = gc.relu(gc.matmul(x, gc.transpose(w) if wt else w) + b)
    f = gc.function([x], y, backend="llvm", sanitize="bounds")
    want = np.maximum(xv.astype(np.float64) @ (wv.T if wt else wv) + bv, 0)
    np.testing.assert_allclose(f(xv), want, rtol=2e-4, atol=2e-4)
    assert _fused(f)


@pytest.mark.parametrize("rows", [256, 40])
def test_the_region_of_a_split_product_kept_apart_splits_too(rows, threads, monkeypatch, rng):
    """plan.PRODUCT_REGION_PARALLEL_MIN: an elementwise region after a product split over the pool, not fused
    into it, splits over the pool from that many elements (below kernels.PARALLEL_MIN); answers unchanged."""
    from graphc.backends.llvm import plan as P, tune
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    x, y = gc.placeholder("x", (rows, 512), "float32"), gc.placeholder("y", (512, 300), "float32")
    bias = gc.placeholder("b", (300,), "float32")
    f = gc.function([x, y, bias], gc.relu(x @ y + bias), backend="llvm")
    xv, yv, bv = (rng.standard_normal(s).astype(np.float32) for s in ((rows, 512), (512, 300), (300,)))
    np.testing.assert_allclose(f(xv, yv, bv), np.maximum(xv.astype(np.float64) @ yv + bv, 0), rtol=2e-5, atol=2e-3)
    steps = plan_steps(f)
    if tune.threads() == 1:   # the product written whole by one call: its region runs inside it
        assert all(s.split is None for s in steps if hasattr(s, "split"))
        return
    prod = [s for s in steps if getattr(s, "product", None) is not None]
    regions = [s for s in steps if getattr(s, "name", "") == "elementwise"]
    assert len(prod) == 1 and prod[0].split is not None
    assert len(regions) == 1, "the region was expected apart (epilogue.py's rule for split products)"
    assert (regions[0].split is not None) == (rows * 300 >= P.PRODUCT_REGION_PARALLEL_MIN)
