"""Native llvm kernels for training CNNs: grouped conv2d, conv2d_grad_input (GEMM + col2im),
conv2d_grad_weight (GEMM over patch rows), max_pool2d_grad and max_pool2d_select, each against the
NumPy reference (float32 and float64; strides, pads, dilation, groups, odd sizes), through the
micro-kernel and the BLAS paths, under sanitize="bounds", and in verify_grad."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ir import apply
from graphc.ops import nn_ops as NN

from conftest import backend_or_skip

TOL = {"float32": 3e-5, "float64": 1e-12}

#: (N, C, H, W, O, (KH, KW), stride, pads, dilation, groups)
CONV = [
    (2, 3, 7, 6, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    (3, 4, 9, 8, 6, (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2), 2),
    (1, 6, 5, 7, 6, (3, 3), (1, 2), ((1, 1), (0, 1)), (2, 1), 6),          # depthwise
    (2, 4, 8, 8, 8, (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1), 4),
    (5, 2, 11, 13, 3, (5, 3), (3, 2), ((2, 2), (1, 1)), (1, 1), 1),
    (2, 6, 6, 5, 4, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 2),
]


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


@pytest.fixture(params=["auto", "tiles", "blas"])
def gemm_mode(request, monkeypatch):
    """The same graphs through the micro-kernel (per image), BLAS (batched + col2im) and the default."""
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", {"auto": "auto", "tiles": "1", "blas": "0"}[request.param])
    return request.param


def _close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _conv_graph(cfg, dtype):
    n, c, h, w, o, k, s, p, d, g = cfg
    x = gc.placeholder("x", (n, c, h, w), dtype)
    wt = gc.placeholder("w", (o, c // g) + k, dtype)
    a = dict(stride=s, pads=p, dilation=d, groups=g)
    y = apply(NN.Conv2d, x, wt, **a)
    gy = gc.placeholder("gy", y.shape, dtype)
    gx = apply(NN.Conv2dGradInput, gy, wt, x_hw=(h, w), **a)
    gw = apply(NN.Conv2dGradWeight, x, gy, kernel=k, **a)
    return [x, wt, gy], [y, gx, gw], a


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", CONV, ids=[f"conv{i}" for i in range(len(CONV))])
def test_conv_and_both_gradients_match_numpy(cfg, dtype, gemm_mode, rng):
    ins, outs, a = _conv_graph(cfg, dtype)
    f = gc.function(ins, outs, backend="llvm")
    xs = [rng.standard_normal(t.shape).astype(dtype) for t in ins]
    got = f(*xs)
    assert f.program.info["fallback_ops"] == []
    x, w, gy = xs
    _close(got[0], NN.conv2d_ref(x, w, **a), dtype)
    _close(got[1], NN.conv2d_grad_input_ref(gy, w, x.shape[2:], **a), dtype)
    _close(got[2], NN.conv2d_grad_weight_ref(x, gy, w.shape[2:], **a), dtype)


@pytest.mark.parametrize("cfg", CONV[:3], ids=[f"conv{i}" for i in range(3)])
def test_conv_gradients_under_bounds_checking(cfg, gemm_mode, rng):
    ins, outs, a = _conv_graph(cfg, "float64")
    f = gc.function(ins, outs, backend="llvm", sanitize="bounds")
    xs = [rng.standard_normal(t.shape) for t in ins]
    got = f(*xs)
    _close(got[1], NN.conv2d_grad_input_ref(xs[2], xs[1], xs[0].shape[2:], **a), "float64")
    _close(got[2], NN.conv2d_grad_weight_ref(xs[0], xs[2], xs[1].shape[2:], **a), "float64")


def test_large_col2im_and_pool_grad_split_across_threads_and_match(monkeypatch, rng):
    """conv2d_grad_input (product + col2im per image) and max_pool2d_grad large enough to split by image
    across threads give the same sums (each image's planes belong to one thread: race-free)."""
    from graphc.backends.llvm import conv, kernels, program
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "3")
    monkeypatch.setattr(kernels, "PARALLEL_MIN", 64)
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    assert program.num_threads() == 3
    cfg = (7, 3, 9, 9, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    ins, outs, a = _conv_graph(cfg, "float64")
    f = gc.function(ins, outs[1], backend="llvm")
    assert "conv2d_grad_input_thunk" in f.source
    xs = [rng.standard_normal(t.shape) for t in ins]
    _close(f(*xs), NN.conv2d_grad_input_ref(xs[2], xs[1], (9, 9), **a), "float64")
    ins, outs, a = _pool_graph((5, 2, 7, 7, (3, 3), (1, 1), ((1, 1), (1, 1))), "float64")
    f = gc.function(ins[:2], outs[0], backend="llvm")
    assert "max_pool2d_grad_thunk" in f.source
    x, gy = (rng.integers(-2, 3, t.shape).astype("float64") for t in ins[:2])
    _close(f(x, gy), NN.max_pool2d_grad_ref(x, gy, **a), "float64")


def test_a_broken_col2im_window_is_caught_under_bounds(monkeypatch, rng):
    """The plane-by-plane col2im (column stride 2; unit column strides take the by-row path, whose loads
    are clamped to the row) with a window range that ignores the padding reads outside the columns."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    monkeypatch.setattr(conv, "_valid", lambda size, out, k, stride, dil, pad: (0, out))
    gy, w = gc.placeholder("gy", (1, 2, 5, 3), "float64"), gc.placeholder("w", (2, 1, 3, 3), "float64")
    gx = apply(NN.Conv2dGradInput, gy, w, x_hw=(5, 5), stride=(1, 2), pads=((1, 1), (1, 1)), dilation=(1, 1),
               groups=1)
    f = gc.function([gy, w], gx, backend="llvm", sanitize="bounds")
    with pytest.raises(gc.GraphcError, match=r"out-of-bounds memory access in the llvm conv2d_grad_input kernel"):
        f(rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((2, 1, 3, 3)))


#: (N, C, H, W, kernel, stride, pads)
POOL = [
    (2, 3, 6, 6, (2, 2), (2, 2), ((0, 0), (0, 0))),
    (1, 2, 7, 5, (3, 3), (2, 1), ((1, 1), (1, 1))),     # overlapping windows, padding
    (3, 1, 5, 8, (2, 3), (1, 3), ((1, 0), (0, 1))),
]


def _pool_graph(cfg, dtype):
    n, c, h, w, k, s, p = cfg
    a = dict(kernel=k, stride=s, pads=p)
    x = gc.placeholder("x", (n, c, h, w), dtype)
    y = apply(NN.MaxPool2d, x, **a)
    gy = gc.placeholder("gy", y.shape, dtype)
    g = gc.placeholder("g", x.shape, dtype)
    return [x, gy, g], [apply(NN.MaxPool2dGrad, x, gy, **a), apply(NN.MaxPool2dSelect, x, g, **a)], a


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bounds", [False, True], ids=["plain", "bounds"])
@pytest.mark.parametrize("cfg", POOL, ids=[f"pool{i}" for i in range(len(POOL))])
def test_max_pool_grad_and_select_match_numpy_with_ties_nan_and_inf(cfg, dtype, bounds, rng):
    ins, outs, a = _pool_graph(cfg, dtype)
    f = gc.function(ins, outs, backend="llvm", **({"sanitize": "bounds"} if bounds else {}))
    x = rng.integers(-2, 3, ins[0].shape).astype(dtype)       # small integers: many ties (first max wins)
    x.reshape(-1)[::7] = np.nan
    x.reshape(-1)[3::11] = -np.inf
    gy, g = (rng.standard_normal(t.shape).astype(dtype) for t in ins[1:])
    got = f(x, gy, g)
    assert f.program.info["fallback_ops"] == []
    _close(got[0], NN.max_pool2d_grad_ref(x, gy, **a), dtype)
    _close(got[1], NN.max_pool2d_select_ref(x, g, **a), dtype)
    xa = np.full(ins[0].shape, -np.inf, dtype)                # all -inf: the first tap (maybe padding) wins
    got = f(xa, gy, g)
    _close(got[0], NN.max_pool2d_grad_ref(xa, gy, **a), dtype)
    _close(got[1], NN.max_pool2d_select_ref(xa, g, **a), dtype)


def test_gradients_through_the_native_kernels_pass_verify_grad(rng):
    """float64 finite differences on llvm through grouped conv, both conv adjoints and the pooling ops
    (second derivatives reach conv2d_grad_* and max_pool2d_select)."""
    w0 = rng.standard_normal((4, 2, 3, 2))

    def net(x, w):
        y = gc.conv2d(x, w, stride=(1, 2), padding=((1, 1), (0, 1)), dilation=(2, 1), groups=2)
        y = gc.max_pool2d(gc.tanh(y), 2, stride=1, padding=1)
        return gc.avg_pool2d(y, 2)
    gc.verify_grad(net, [rng.standard_normal((2, 4, 7, 6)), w0], backend="llvm", rtol=1e-5, atol=1e-8)

    def second(x, w):      # d/dx of <grad_w, r>: conv2d_grad_weight's and max_pool2d_grad's adjoints
        y = gc.max_pool2d(gc.conv2d(x, w, padding=1, groups=2), 2)
        (gw,) = gc.grad(gc.sum(y * y), [w])
        return gw
    gc.verify_grad(second, [rng.standard_normal((1, 4, 5, 5)), w0[:, :, :, :2]], backend="llvm", rtol=1e-5,
                   atol=1e-8)
