"""A micro-kernel convolution's elementwise epilogue (bias, activation, residual add) runs on each image
right after its product (backends/llvm/conv.py `fuse_conv_epilogue`): same answers as NumPy's float64
reference for bias + ReLU, a residual add, several outputs, grouped convolutions, float64, batch sizes 1,
3 and 17 and both thread counts; not fused where the region does not read the convolution as written."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _conv_ref(x, w, pad, groups=1):
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = x[:, g * cg:(g + 1) * cg, i:i + oh, j:j + ow]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_bias_relu_and_residual_epilogues_match_numpy(threads, dtype, n, monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    c, o, hw, k = 3, 8, 13, 3
    xv = rng.standard_normal((n, c, hw, hw)).astype(dtype)
    wv = rng.standard_normal((o, c, k, k)).astype(dtype)
    bv = rng.standard_normal(o).astype(dtype)
    rv = rng.standard_normal((n, o, hw - k + 1, hw - k + 1)).astype(dtype)
    x, r = gc.placeholder("x", xv.shape, dtype), gc.placeholder("r", rv.shape, dtype)
    w, b = gc.parameter("w", wv), gc.parameter("b", bv)
    z = gc.conv2d(x, w) + gc.reshape(b, (1, o, 1, 1))
    y1 = gc.relu(z)
    y2 = gc.relu(gc.conv2d(x, w) + r) * 0.5
    f = gc.function([x, r], [y1, y2, z], backend="llvm")
    ref = _conv_ref(xv, wv, 0)
    tol = 1e-4 if dtype == "float32" else 1e-10
    g1, g2, gz = f(xv, rv)
    np.testing.assert_allclose(g1, np.maximum(ref + bv[None, :, None, None], 0), rtol=tol, atol=tol)
    np.testing.assert_allclose(g2, np.maximum(ref + rv, 0) * 0.5, rtol=tol, atol=tol)
    np.testing.assert_allclose(gz, ref + bv[None, :, None, None], rtol=tol, atol=tol)


def test_lenet_layer_is_fused_and_grouped_convolutions_match(rng):
    xv = rng.standard_normal((5, 4, 12, 12)).astype("float32")
    wv = rng.standard_normal((6, 2, 5, 5)).astype("float32")
    bv = rng.standard_normal(6).astype("float32")
    x, w, b = gc.placeholder("x", xv.shape), gc.parameter("w", wv), gc.parameter("b", bv)
    y = gc.max_pool2d(gc.relu(gc.conv2d(x, w, padding=2, groups=2) + gc.reshape(b, (1, 6, 1, 1))), 2)
    f = gc.function([x], y, backend="llvm")
    want = np.maximum(_conv_ref(xv, wv, 2, groups=2) + bv[None, :, None, None], 0)
    want = want.reshape(5, 6, 6, 2, 6, 2).max(axis=(3, 5))
    np.testing.assert_allclose(f(xv), want, rtol=1e-4, atol=1e-4)
    steps = [s for sp in f.program.info["specialisations"].values() for s in sp.plan.steps]
    assert any(getattr(s, "fused_epilogue", False) for s in steps)
    assert not any(getattr(s, "name", "") == "elementwise" for s in steps)


def test_a_region_reading_the_convolution_transposed_is_not_fused(rng):
    xv = rng.standard_normal((2, 3, 9, 9)).astype("float32")
    wv = rng.standard_normal((4, 3, 3, 3)).astype("float32")
    x, w = gc.placeholder("x", xv.shape), gc.parameter("w", wv)
    c = gc.conv2d(x, w)
    y = gc.relu(c + gc.transpose(c, (0, 1, 3, 2)))
    f = gc.function([x], y, backend="llvm")
    ref = _conv_ref(xv, wv, 0)
    np.testing.assert_allclose(f(xv), np.maximum(ref + ref.transpose(0, 1, 3, 2), 0), rtol=1e-4, atol=1e-4)
