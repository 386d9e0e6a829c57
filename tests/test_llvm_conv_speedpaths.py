"""The llvm convolution kernels built for speed (backends/llvm/conv.py), each against an independent NumPy
reference on odd sizes, through every path, on both vector ISAs (GRAPHC_LLVM_ISA forces AVX2's or AVX-512's
shapes) and one or two threads:

- conv2d: the micro-kernel image by image, one-thread BLAS calls over blocks of output rows or channels;
- conv2d_grad_input: the product per image into a slot's tile, col2im by output row (unit column stride)
  or plane by plane (strided columns);
- conv2d_grad_weight: the dot-product form (few output channels) and the GEMM form (a vector or more of
  them per group), each slot's partial sums then added;
- max pooling: the vector path for padded windows (forward) and for tiling windows (backward);
- the work split into slots across threads (forced with SPLIT_FLOPS = 0), and float64 finite differences."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ir import apply
from graphc.ops import nn_ops as NN

from test_llvm_conv_grads import _conv_graph
from conftest import backend_or_skip, plan_steps

TOL = {"float32": 3e-5, "float64": 1e-12}

#: (N, C, H, W, O, (KH, KW), stride, pads, dilation, groups)
CONV = [
    (1, 1, 17, 17, 3, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1),       # LeNet's first layer, batch 1
    (3, 3, 17, 3, 17, (3, 3), (2, 1), ((1, 1), (0, 2)), (1, 1), 1),       # 17 filters: grad_weight's GEMM form
    (3, 17, 3, 17, 9, (1, 3), (1, 2), ((0, 0), (1, 1)), (1, 2), 1),       # strided columns: plane col2im
    (1, 3, 1, 17, 3, (1, 5), (1, 1), ((0, 0), (2, 2)), (1, 1), 3),        # one row, depthwise
    (3, 4, 9, 9, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), (2, 2), 2),        # groups, dilation 2, 8 filters a group
    (3, 17, 5, 5, 3, (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),        # 1x1 output (blocks of channels)
    (3, 3, 3, 3, 5, (3, 3), (2, 2), ((2, 1), (1, 2)), (1, 1), 1),         # asymmetric padding, stride 2
]


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


@pytest.fixture(params=[("avx2", 1), ("avx2", 2), ("avx512", 2)], ids=["avx2-1t", "avx2-2t", "avx512-2t"])
def target(request, monkeypatch):
    """Both ISAs' vector shapes and one or two threads; every split threshold at 0 so two threads split."""
    import graphc.backends.llvm.conv as conv
    isa, threads = request.param
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    return request.param


@pytest.fixture(params=["tiles", "blas"])
def gemm_mode(request, monkeypatch):
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", {"tiles": "1", "blas": "0"}[request.param])
    return request.param


def _close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _conv_reference(x, w, stride, pads, dilation, groups):
    """conv2d by a direct sum over taps (NumPy, float64): independent of im2col."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0)) + tuple(pads))
    oh = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    og = o // groups
    y = np.zeros((n, o, oh, ow))
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation[0]:i * dilation[0] + stride[0] * (oh - 1) + 1:stride[0],
                           j * dilation[1]:j * dilation[1] + stride[1] * (ow - 1) + 1:stride[1]]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return y


_graph = _conv_graph   # forward, data and weight gradients of one configuration


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_forward_and_both_gradients_on_every_path(target, gemm_mode, dtype, rng):
    for cfg in CONV:
        ins, outs, a = _graph(cfg, dtype)
        f = gc.function(ins, outs, backend="llvm")
        assert f.program.info["fallback_ops"] == []
        x, w, gy = (rng.standard_normal(t.shape).astype(dtype) for t in ins)
        y, gx, gw = f(x, w, gy)
        _close(y, _conv_reference(x, w, **a), dtype)
        _close(y, NN.conv2d_ref(x, w, **a), dtype)
        _close(gx, NN.conv2d_grad_input_ref(gy, w, x.shape[2:], **a), dtype)
        _close(gw, NN.conv2d_grad_weight_ref(x, gy, w.shape[2:], **a), dtype)
        # the adjoint identities, independently of the references: <conv(x), gy> = <x, gx> = <w, gw>
        lhs = float(np.sum(y.astype(np.float64) * gy))
        for u, v in ((x, gx), (w, gw)):
            np.testing.assert_allclose(float(np.sum(u.astype(np.float64) * v)), lhs,
                                       rtol=100 * TOL[dtype], atol=100 * TOL[dtype] * max(1.0, abs(lhs)))


def test_two_threads_split_into_slots_and_match_one_thread(monkeypatch, rng):
    """With two threads every convolution kernel runs as pool chunks (slots), and gives what one thread
    gives up to the slots' summation order."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    cfg = (5, 6, 9, 7, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    res = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
        for mode in ("1", "0"):
            monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", mode)
            ins, outs, a = _graph(cfg, "float64")
            f = gc.function(ins, outs, backend="llvm")
            split = "conv2d_thunk" in f.source and "conv2d_grad_input_thunk" in f.source
            assert split == (threads == "2"), f.source.count("_thunk")
            assert ("conv2d_grad_weight_thunk" in f.source) == (threads == "2")
            xs = [np.random.default_rng(1).standard_normal(t.shape) for t in ins]
            res[threads, mode] = f(*xs)
    for key, got in res.items():
        for g, w in zip(got, res["1", "1"]):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_conv_kernels_under_bounds_checking(monkeypatch, rng):
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    for mode in ("1", "0"):
        monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", mode)
        for cfg in (CONV[1], CONV[2], CONV[5]):
            ins, outs, a = _graph(cfg, "float64")
            f = gc.function(ins, outs, backend="llvm", sanitize="bounds")
            x, w, gy = (rng.standard_normal(t.shape) for t in ins)
            y, gx, gw = f(x, w, gy)
            _close(y, _conv_reference(x, w, **a), "float64")
            _close(gx, NN.conv2d_grad_input_ref(gy, w, x.shape[2:], **a), "float64")
            _close(gw, NN.conv2d_grad_weight_ref(x, gy, w.shape[2:], **a), "float64")


def test_blas_forward_blocks_of_rows_and_of_channels():
    """conv_blas's plan: blocks of output rows where an image's columns outweigh the weights, blocks of
    output channels (several per image when the batch is small) where the weights do."""
    import graphc.backends.llvm.conv as conv
    rows = conv.blas_conv_plan(1, 64, 64, 576, (56, 56), 1, 1 << 30)
    assert rows["mode"] == "rows" and 1 <= rows["rows"] < 56
    assert rows["tile"] <= max(conv.TILE_ELEMS, 576 * 56)
    chans = conv.blas_conv_plan(1, 512, 512, 4608, (7, 7), 1, 1 << 30)
    assert chans["mode"] == "channels" and chans["oblock"] <= 512


# ---- max pooling ---------------------------------------------------------------------------------------------

def _pool_reference(x, kernel, stride, pads):
    """max over each window, padding -inf, NaN propagating (np.max)."""
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(pads), constant_values=-np.inf)
    oh = (xp.shape[2] - kernel[0]) // stride[0] + 1
    ow = (xp.shape[3] - kernel[1]) // stride[1] + 1
    taps = [xp[:, :, i:i + stride[0] * (oh - 1) + 1:stride[0], j:j + stride[1] * (ow - 1) + 1:stride[1]]
            for i in range(kernel[0]) for j in range(kernel[1])]
    return np.max(np.stack(taps), axis=0)


#: (N, C, H, W, kernel, stride, pads): padded windows (the forward's vector path)
POOL_PADDED = [
    (1, 3, 17, 17, (3, 3), (2, 2), ((1, 1), (1, 1))),       # ResNet's stem pool
    (3, 1, 3, 17, (2, 2), (1, 1), ((1, 1), (1, 1))),
    (1, 17, 17, 3, (3, 2), (1, 2), ((1, 0), (1, 1))),
    (3, 3, 1, 17, (1, 3), (1, 1), ((0, 0), (1, 0))),
]
#: windows that tile the plane (the backward's vector path), with rows and columns left over
POOL_TILING = [
    (3, 3, 17, 17, (2, 2), (2, 2)),
    (1, 17, 3, 17, (1, 2), (1, 2)),
    (3, 1, 17, 3, (3, 1), (3, 1)),
    (1, 3, 1, 1, (1, 1), (1, 1)),
    (3, 3, 17, 35, (2, 2), (2, 2)),                          # more than one vector of windows a row
]


def _special(x):
    x.reshape(-1)[::7] = np.nan
    x.reshape(-1)[3::11] = -np.inf
    x.reshape(-1)[5::13] = np.inf
    return x


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_padded_max_pool_forward_matches_numpy_with_nan_and_inf(isa, dtype, monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    for n, c, h, w, k, s, p in POOL_PADDED:
        x = gc.placeholder("x", (n, c, h, w), dtype)
        for bounds in (False, True):
            f = gc.function([x], apply(NN.MaxPool2d, x, kernel=k, stride=s, pads=p), backend="llvm",
                            **({"sanitize": "bounds"} if bounds else {}))
            xv = _special(rng.integers(-2, 3, (n, c, h, w)).astype(dtype))
            np.testing.assert_array_equal(f(xv), _pool_reference(xv, k, s, p))
            xa = np.full((n, c, h, w), -np.inf, dtype)
            np.testing.assert_array_equal(f(xa), _pool_reference(xa, k, s, p))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiling_max_pool_grad_matches_numpy_with_ties_nan_and_inf(isa, dtype, monkeypatch, rng):
    """Each gradient lands on its window's first maximum (ties: the first tap; a NaN: the first NaN), every
    other input (and the rows and columns no window covers) gets 0."""
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    for n, c, h, w, k, s in POOL_TILING:
        a = dict(kernel=k, stride=s, pads=((0, 0), (0, 0)))
        x = gc.placeholder("x", (n, c, h, w), dtype)
        gy = gc.placeholder("gy", apply(NN.MaxPool2d, x, **a).shape, dtype)
        for bounds in (False, True):
            f = gc.function([x, gy], apply(NN.MaxPool2dGrad, x, gy, **a), backend="llvm",
                            **({"sanitize": "bounds"} if bounds else {}))
            assert f.program.info["fallback_ops"] == []
            xv = _special(rng.integers(-2, 3, (n, c, h, w)).astype(dtype))
            g = rng.standard_normal(gy.shape).astype(dtype)
            np.testing.assert_array_equal(f(xv, g), NN.max_pool2d_grad_ref(xv, g, **a))
            xa = np.full((n, c, h, w), -np.inf, dtype)
            np.testing.assert_array_equal(f(xa, g), NN.max_pool2d_grad_ref(xa, g, **a))


def test_tiling_max_pool_grad_is_the_vector_kernel():
    """The tiling case is planned as the vector kernel (its interleaving shuffle is in the source); an
    overlapping window is not."""
    x = gc.placeholder("x", (2, 3, 8, 8))
    a = dict(kernel=(2, 2), stride=(2, 2), pads=((0, 0), (0, 0)))
    gy = gc.placeholder("gy", (2, 3, 4, 4))
    src = gc.function([x, gy], apply(NN.MaxPool2dGrad, x, gy, **a), backend="llvm").source
    assert "shufflevector" in src
    a = dict(kernel=(3, 3), stride=(2, 2), pads=((0, 0), (0, 0)))
    gy = gc.placeholder("gy", (2, 3, 3, 3))
    src = gc.function([x, gy], apply(NN.MaxPool2dGrad, x, gy, **a), backend="llvm").source
    assert "shufflevector" not in src


def test_lenet_like_training_gradients_pass_finite_differences(monkeypatch, rng):
    """float64 finite differences through conv (both adjoints, split into slots on two threads), ReLU,
    the tiling max pool gradient and a strided, padded second convolution."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")

    def net(x, w1, w2):
        h = gc.max_pool2d(gc.relu(gc.conv2d(x, w1, padding=2)), 2)
        return gc.sum(gc.tanh(gc.conv2d(h, w2, stride=2, padding=1)))
    args = [rng.standard_normal((3, 1, 9, 9)), rng.standard_normal((4, 1, 5, 5)) * 0.3,
            rng.standard_normal((9, 4, 3, 3)) * 0.3]
    gc.verify_grad(net, args, backend="llvm", rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_batch1_narrow_convolutions_run_turned(isa, threads, monkeypatch):
    """conv.turned_rule: a batch-1 convolution with few output pixels that the size rule gives to BLAS runs
    as out^T = cols^T @ W^T over W^T packed in the prologue, then transposed into out: NumPy's answer on
    odd sizes (stride 2 and 1x1, padded, a partial panel of filters), float32 and float64; not for a batch of
    two or with GRAPHC_LLVM_CONV_TURN=0 (BLAS there)."""
    backend_or_skip("llvm")
    from graphc.backends.llvm import conv, jit
    jit.target_machine()
    if jit.blas() is None:
        pytest.skip("no BLAS bound: such convolutions take the micro-kernel anyway")
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)   # (these sizes would take the micro-kernel image by image)
    rng = np.random.default_rng(5)
    for (c, h, o, k, s, p), dtype in [((33, 13, 70, 3, 2, 1), "float32"), ((40, 7, 17, 1, 1, 0), "float64"),
                                      ((19, 15, 33, 3, 2, 0), "float32")]:
        for n, env, turned in [(1, None, True), (2, None, False), (1, "0", False)]:
            if env is None:
                monkeypatch.delenv("GRAPHC_LLVM_CONV_TURN", raising=False)
            else:
                monkeypatch.setenv("GRAPHC_LLVM_CONV_TURN", env)
            monkeypatch.setattr(conv, "TURNED_HW", 64)
            x = gc.placeholder("x", (n, c, h, h), dtype)
            w = gc.parameter("w", rng.standard_normal((o, c, k, k)).astype(dtype))
            f = gc.function([x], gc.conv2d(x, w, stride=s, padding=p), backend="llvm")
            xv = rng.standard_normal((n, c, h, h)).astype(dtype)
            want = _conv_reference(xv, w.value, (s, s), ((p, p), (p, p)), (1, 1), 1)
            tol = 2e-5 if dtype == "float32" else 1e-11
            np.testing.assert_allclose(f(xv), want, rtol=tol, atol=tol * c * k * k)
            steps = [getattr(st, "name", "") for st in plan_steps(f)]
            assert ("copy" in steps and any(getattr(st, "packed", False) for st in plan_steps(f))) == turned, \
                (c, h, o, n, env, steps)
