"""llvm convolution kernels kept small (backends/llvm/conv.py, winograd.py): the im2col taps of large kernels
as run-time loops (UNROLL_TAPS; a 7x7 stem's kernel was 160 KB of IR and 9 s of LLVM), one im2col for an
item's rows whatever its height, the Winograd products as one loop over the alpha^2 points, the staged
Winograd transforms by blocks of channels, max pooling split by plane, and the output-channel blocks of
short batches. Each against an independent NumPy float64 reference on odd sizes (spatial 1, 3, 17;
channels 1, 3, 17, 65), strides, paddings, dilations, batch 1 and 3, one and two threads, with both the
unrolled and the looped taps; the gradients of the looped paths as well."""
from __future__ import annotations

import re

import numpy as np
import pytest

import graphc as gc
from graphc.ir import apply
from graphc.ops import nn_ops as NN

from conftest import backend_or_skip
from test_llvm_conv_grads import _conv_graph
from test_llvm_conv_speedpaths import _close, _conv_reference, _pool_reference

#: (N, C, H, W, O, (KH, KW), stride, pads, dilation, groups): kernels of more than 9 taps (the loops) and a
#: few small ones (unrolled), on odd sizes
BIG = [
    (1, 3, 17, 17, 65, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),     # a ResNet stem, small
    (3, 1, 3, 17, 17, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),      # padding taller than the image
    (1, 3, 1, 1, 3, (7, 7), (1, 1), ((3, 3), (3, 3)), (1, 1), 1),        # spatial 1: one real tap
    (3, 17, 17, 3, 3, (1, 11), (1, 1), ((0, 0), (12, 7)), (1, 2), 1),    # one row of taps, dilated
    (1, 4, 17, 17, 34, (5, 3), (3, 2), ((2, 1), (0, 2)), (2, 1), 2),     # groups, asymmetric everything
    (3, 3, 17, 17, 17, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),     # 9 taps: unrolled by default
]


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


@pytest.fixture(params=[1, 2], ids=["1t", "2t"])
def threads(request, monkeypatch):
    import graphc.backends.llvm.conv as conv
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(request.param))
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)   # two threads split even these small convolutions
    return request.param


@pytest.mark.parametrize("unroll", [0, 9, 1000], ids=["loops", "default", "unrolled"])
@pytest.mark.parametrize("gemm_mode", ["1", "0"], ids=["tiles", "blas"])
def test_large_kernels_forward_and_gradients_match_numpy(unroll, gemm_mode, threads, monkeypatch, rng):
    """Forward, data and weight gradients of every configuration with the taps looped, unrolled, or by the
    default rule, through the micro-kernel and the BLAS paths (rows and channel blocks)."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "UNROLL_TAPS", unroll)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", gemm_mode)
    for cfg in BIG:
        ins, outs, a = _conv_graph(cfg, "float64")
        f = gc.function(ins, outs, backend="llvm")
        assert f.program.info["fallback_ops"] == []
        x, w, gy = (rng.standard_normal(t.shape) for t in ins)
        y, gx, gw = f(x, w, gy)
        _close(y, _conv_reference(x, w, **a), "float64")
        _close(gx, NN.conv2d_grad_input_ref(gy, w, x.shape[2:], **a), "float64")
        _close(gw, NN.conv2d_grad_weight_ref(x, gy, w.shape[2:], **a), "float64")


@pytest.mark.parametrize("n", [1, 3])
def test_float32_stem_through_the_blas_row_blocks(n, threads, monkeypatch, rng):
    """A stem-like 7x7 stride-2 convolution in float32 whose row blocks end in a shorter one (the run-time
    row count of the shared im2col), under bounds checking as well."""
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "TILE_ELEMS", 3 * 49 * 9 * 4)   # 4 of the 9 output rows a block (2 with 2 threads)
    how = conv.blas_conv_plan(n, 3, 65, 147, (9, 9), 1, 2 * 65 * 147 * 81 * n)
    assert how["mode"] == "rows" and 9 % how["rows"]          # the last block is shorter
    x = gc.placeholder("x", (n, 3, 17, 17))
    w = gc.parameter("w", rng.standard_normal((65, 3, 7, 7)).astype(np.float32))
    xs = rng.standard_normal((n, 3, 17, 17)).astype(np.float32)
    want = _conv_reference(xs, w.value, (2, 2), ((3, 3), (3, 3)), (1, 1), 1)
    for bounds in (False, True):
        f = gc.function([x], gc.conv2d(x, w, stride=2, padding=3), backend="llvm",
                        **({"sanitize": "bounds"} if bounds else {}))
        _close(f(xs), want, "float32")


def _kernel_sizes(source: str) -> dict:
    """{kernel function name: characters of its definition} of a program's LLVM IR."""
    out = {}
    for m in re.finditer(r"^define [^@]*@(k_\w+)\(.*?^}", source, re.S | re.M):
        out[m.group(1)] = len(m.group(0))
    return out


def test_stem_and_winograd_kernels_stay_small(monkeypatch):
    """The IR of ResNet-18's stem convolution (3 -> 64, 7x7 stride 2 on 224x224) and of a fused Winograd
    layer (64 channels, 56x56) is a few tens of KB: loops, not unrolled taps or products (they were 160 KB
    and 800 KB; LLVM's time grows faster than their size); the direct stem's (direct.py) a few hundred KB.
    Sizes only, no timing."""
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_MODE", "fused")
    x = gc.placeholder("x", (1, 3, 224, 224))
    w = gc.parameter("w", np.zeros((64, 3, 7, 7), np.float32))
    sizes = _kernel_sizes(gc.function([x], gc.conv2d(x, w, stride=2, padding=3), backend="llvm").source)
    conv = [v for k, v in sizes.items() if k.endswith("_conv2d_direct")]
    assert conv and max(conv) < 400_000, sizes     # (direct.py: its tap rows unrolled, 3 to 4 taps each)
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "0")
    sizes = _kernel_sizes(gc.function([x], gc.conv2d(x, w, stride=2, padding=3), backend="llvm").source)
    conv = [v for k, v in sizes.items() if k.endswith("_conv2d")]
    assert conv and max(conv) < 40_000, sizes
    x = gc.placeholder("x", (1, 64, 56, 56))
    w = gc.parameter("w", np.zeros((64, 64, 3, 3), np.float32))
    sizes = _kernel_sizes(gc.function([x], gc.conv2d(x, w, padding=1), backend="llvm").source)
    wino = [v for k, v in sizes.items() if k.endswith("conv2d_winograd")]
    assert wino and max(wino) < 400_000, sizes


@pytest.mark.parametrize("n", [1, 3])
def test_staged_winograd_transforms_by_channel_blocks(n, threads, monkeypatch, rng):
    """The staged form's transforms run by blocks of channels (every tile row of an image in one item):
    channel counts that do not divide into the blocks, spatial 1, 3 and 17, both tile sizes."""
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_MODE", "staged")
    from graphc.backends.llvm import winograd
    for m in (2, 4):
        monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", str(m))
        for c, h, o in ((17, 17, 65), (65, 3, 17), (3, 1, 1), (1, 17, 3)):
            pad = 1
            x = gc.placeholder("x", (n, c, h, h))
            w = gc.placeholder("w", (o, c, 3, 3))
            f = gc.function([x, w], gc.conv2d(x, w, padding=pad), backend="llvm")
            assert "winograd_input" in f.source and "winograd_output" in f.source
            if threads == 2:
                assert winograd.staged_blocks(n, c, 1 << 30)[0] * n >= min(4, n * c)
            xs = rng.standard_normal((n, c, h, h)).astype(np.float32)
            ws = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
            want = _conv_reference(xs, ws, (1, 1), ((pad, pad), (pad, pad)), (1, 1), 1)
            np.testing.assert_allclose(f(xs, ws), want, rtol=2e-4, atol=2e-4 * max(1.0, float(np.abs(want).max())),
                                       err_msg=str((n, c, h, o, m)))


def test_staged_blocks_cover_every_channel_once():
    from graphc.backends.llvm import winograd
    for n in (1, 2, 3, 8):
        for chans in (1, 3, 17, 65, 256):
            blocks, cs, slots = winograd.staged_blocks(n, chans, 1 << 30)
            assert 1 <= blocks <= chans and (blocks - 1) * cs < chans <= blocks * cs
            assert 1 <= slots <= n * blocks


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_max_pool_split_by_plane_matches_numpy(dtype, threads, monkeypatch, rng):
    """Max pooling split across threads by (image, channel) plane (forced: PARALLEL_MIN 0) on padded windows
    (ResNet's stem pool; a row of several whole vectors, their run-time loop) and windows inside the plane,
    NaN and inf included."""
    from graphc.backends.llvm import kernels
    monkeypatch.setattr(kernels, "PARALLEL_MIN", 0)
    for n, c, h, w, k, s, p in [(1, 3, 17, 17, (3, 3), (2, 2), ((1, 1), (1, 1))),
                                (3, 17, 3, 17, (2, 2), (1, 2), ((0, 0), (0, 0))),
                                (3, 1, 1, 3, (1, 3), (1, 1), ((0, 0), (1, 1))),
                                (1, 2, 5, 71, (3, 3), (2, 2), ((1, 1), (1, 1)))]:   # a loop of whole vectors
        x = gc.placeholder("x", (n, c, h, w), dtype)
        f = gc.function([x], apply(NN.MaxPool2d, x, kernel=k, stride=s, pads=p), backend="llvm")
        assert ("max_pool2d_thunk" in f.source) == (threads == 2 and n * c >= 2)
        xv = rng.integers(-2, 3, (n, c, h, w)).astype(dtype)
        xv.reshape(-1)[::7] = np.nan
        xv.reshape(-1)[3::11] = -np.inf
        np.testing.assert_array_equal(f(xv), _pool_reference(xv, k, s, p))


def test_short_batches_get_one_channel_block_per_thread(monkeypatch):
    """conv_blas's channel blocks where the batch is short: a whole number of items per thread, and no
    more blocks than that (each block im2cols its whole image)."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "threads", lambda: 2)
    for n, per in ((1, 2), (2, 1), (3, 2), (4, 1), (8, 1)):
        how = conv.blas_conv_plan(n, 256, 512, 2304, (7, 7), 1, 1 << 30)
        assert how["mode"] == "channels"
        assert -(-512 // how["oblock"]) == per, (n, how)
    how = conv.blas_conv_plan(1, 256, 512, 2304, (7, 7), 1, 1 << 10)   # too small to split: one block
    assert how["oblock"] == 512 and how["slots"] == 1


@pytest.mark.parametrize("unroll", [0, 1000], ids=["loops", "unrolled"])
def test_integer_convolution_with_a_large_kernel_pads_with_the_zero_point(unroll, threads, monkeypatch):
    """conv_integer's im2col (qgemm) with looped or unrolled taps: padding reads the input zero point,
    exactly (int64 reference by direct loops)."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "UNROLL_TAPS", unroll)
    rng = np.random.default_rng(7)
    X = rng.integers(0, 256, (3, 3, 17, 9)).astype(np.uint8)
    W = rng.integers(-128, 128, (17, 3, 7, 7)).astype(np.int8)
    zx, stride, pad = 3, 2, 3
    x = gc.placeholder("x", (3, 3, 17, 9), "uint8")
    f = gc.function([x], gc.conv_integer(x, gc.constant(W), np.asarray(zx, np.uint8), stride=stride, padding=pad),
                    backend="llvm")
    assert not f.program.info["fallback_ops"]
    xp = np.pad(X.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=zx)
    oh, ow = (xp.shape[2] - 7) // stride + 1, (xp.shape[3] - 7) // stride + 1
    acc = np.zeros((3, 17, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * stride:i * stride + 7, j * stride:j * stride + 7]
            acc[:, :, i, j] = np.einsum("nckl,ockl->no", win, W.astype(np.int64))
    want = acc - zx * W.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(f(X), want)
