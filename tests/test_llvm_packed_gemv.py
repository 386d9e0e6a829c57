"""Batch-1 products over a weight packed in the GEMV's column blocks (backends/llvm/plan.py `_packed_gemv`):
x @ W with W a parameter, split over the pool, reads W from pack_panels' panels as wide as its blocks (each
thread's block one contiguous run), packed in the prologue and again on a new array. Answers stay NumPy's
(float64 reference) on odd sizes, both ISAs, both thread counts; not packed where nothing splits, for W.T,
for a weight the step's updates replace, inside loops, or with GRAPHC_LLVM_PACK=0."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, plan_steps
from test_llvm_packed_weights import _spec_plan


@pytest.fixture(autouse=True)
def llvm(monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.delenv("GRAPHC_LLVM_SMALL_GEMM", raising=False)
    monkeypatch.delenv("GRAPHC_LLVM_PACK", raising=False)
    monkeypatch.delenv("GRAPHC_LLVM_GEMV", raising=False)
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")


def _packed_gemv(f) -> bool:
    """A packing in the prologue and a GEMV over the panels among the call's steps."""
    plan = _spec_plan(f)
    pro = [getattr(s, "name", "") for s in plan.steps[:plan.prologue]]
    return "pack_panels" in pro and any(getattr(s, "name", "") == "gemv" and getattr(s, "packed", False)
                                        for s in plan_steps(f))


def _tol(dtype):
    return (2e-5, 2e-5) if dtype == "float32" else (1e-11, 1e-11)


def _layer(rng, k, m, dtype, transposed=False):
    wv = rng.standard_normal((m, k) if transposed else (k, m)).astype(dtype)
    w, bias = gc.parameter("w", wv), gc.parameter("b", rng.standard_normal(m).astype(dtype))
    x = gc.placeholder("x", (None, k), dtype)
    return x, w, bias, gc.relu(x @ (gc.transpose(w) if transposed else w) + bias)


def _ref(xv, w, bias, transposed=False):
    wv = w.value.T if transposed else w.value
    return np.maximum(xv.astype(np.float64) @ wv.astype(np.float64) + bias.value, 0)


#: (k, m): from 2 * k * m >= GEMV_PARALLEL_FLOPS (2^18) the GEMV splits (packed with two threads); odd widths
#: leave a short last block (its panel zero-padded)
SIZES = [(784, 512), (257, 513), (65, 2049), (1000, 257), (3, 65537), (17, 63)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("km", SIZES, ids=["x".join(map(str, s)) for s in SIZES])
def test_packed_gemv_matches_numpy(km, dtype, isa, threads, rng):
    from graphc.backends.llvm import gemm
    k, m = km
    x, w, bias, y = _layer(rng, k, m, dtype)
    f = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((1, k)).astype(dtype)
    rtol, atol = _tol(dtype)
    np.testing.assert_allclose(f(xv), _ref(xv, w, bias), rtol=rtol, atol=atol * k)
    assert _packed_gemv(f) == gemm.gemv_split(1, k, m), (km, threads)
    # a batch of rows (another specialisation) is right too
    xb = rng.standard_normal((3, k)).astype(dtype)
    np.testing.assert_allclose(f(xb), _ref(xb, w, bias), rtol=rtol, atol=atol * k)


def test_a_new_weight_is_repacked(rng, monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    x, w, bias, y = _layer(rng, 300, 700, "float32")
    f = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((1, 300)).astype(np.float32)
    np.testing.assert_allclose(f(xv), _ref(xv, w, bias), rtol=2e-5, atol=1e-3)
    assert _packed_gemv(f)
    w.set_value(rng.standard_normal((300, 700)).astype(np.float32))
    np.testing.assert_allclose(f(xv), _ref(xv, w, bias), rtol=2e-5, atol=1e-3)


def test_not_packed(rng, monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    xv = rng.standard_normal((1, 300)).astype(np.float32)
    # W.T: a dot-form GEMV (each output one contiguous dot product), nothing to pack
    x, w, bias, y = _layer(rng, 300, 700, "float32", transposed=True)
    f = gc.function([x], y, backend="llvm")
    np.testing.assert_allclose(f(xv), _ref(xv, w, bias, True), rtol=2e-5, atol=1e-3)
    assert not _packed_gemv(f)
    # the switch
    x, w, bias, y = _layer(rng, 300, 700, "float32")
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "0")
    f = gc.function([x], y, backend="llvm")
    np.testing.assert_allclose(f(xv), _ref(xv, w, bias), rtol=2e-5, atol=1e-3)
    assert not _packed_gemv(f)
    monkeypatch.delenv("GRAPHC_LLVM_PACK")
    # a weight the function's updates replace: read in place, every call sees the new value
    lr = np.float32(0.01)
    f = gc.function([x], y, updates=[(w, w - lr * w)], backend="llvm")
    want = _ref(xv, w, bias)
    np.testing.assert_allclose(f(xv), want, rtol=2e-5, atol=1e-3)
    assert not _packed_gemv(f)
    want = _ref(xv, w, bias)   # (the value the update left: the next call reads it)
    np.testing.assert_allclose(f(xv), want, rtol=2e-5, atol=1e-3)
