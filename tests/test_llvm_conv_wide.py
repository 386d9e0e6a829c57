"""The wide-grid convolution (backends/llvm/conv.py: wide_grid, _conv_wide): a stride-1 micro-kernel
convolution reads its taps from a zero-bordered copy of each image (the micro-kernel's b rows overlap:
gemm_tiles' ktaps) instead of writing im2col columns, computes Wp columns per output row and copies the
ow it keeps out. Against a direct NumPy sum over taps in float64 on odd sizes, asymmetric padding,
dilation, groups and batches of 1 and 3, both ISAs' vector shapes and one or two threads (slots), with
its bias + ReLU epilogue fused; under bounds checking (the last wide row reads past its plane into the
zeroed slack); and the cost model's choices for LeNet's two layers."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip, plan_steps
from test_llvm_conv_speedpaths import _conv_reference, _close

#: (N, C, H, W, O, (KH, KW), pads, dilation, groups)
CASES = [
    (3, 1, 17, 17, 6, (5, 5), ((2, 2), (2, 2)), (1, 1), 1),     # LeNet's first layer at odd sizes
    (1, 3, 1, 17, 5, (1, 3), ((0, 0), (1, 0)), (1, 1), 1),      # one row, padding on one side
    (3, 4, 9, 11, 6, (3, 2), ((1, 0), (2, 1)), (2, 2), 2),      # groups, dilation 2, asymmetric padding
    (1, 2, 3, 65, 17, (3, 3), ((1, 1), (1, 1)), (1, 1), 1),     # 17 filters, 65-wide rows (masked tails)
    (3, 5, 7, 1, 3, (1, 1), ((0, 0), (0, 0)), (1, 1), 1),       # 1x1 over one-column images
    (1, 1, 63, 3, 2, (3, 3), ((1, 1), (1, 1)), (1, 1), 1),      # tall and narrow
]


@pytest.fixture(autouse=True)
def llvm(monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")   # the micro-kernel path (the wide grid is one of its forms)


def _wide_steps(f) -> list:
    return [s for s in plan_steps(f) if getattr(s, "conv_tiles", None) is not None and s.conv_tiles[4][-1]]


def _layer(cfg, dtype, rng):
    n, c, h, w, o, k, pads, dil, g = cfg
    xv = rng.standard_normal((n, c, h, w)).astype(dtype)
    wv = rng.standard_normal((o, c // g) + k).astype(dtype)
    bv = rng.standard_normal(o).astype(dtype)
    x = gc.placeholder("x", xv.shape, dtype)
    pad = (pads[0], pads[1]) if pads[0][0] != pads[0][1] or pads[1][0] != pads[1][1] else (pads[0][0], pads[1][0])
    y = gc.relu(gc.conv2d(x, gc.parameter("w", wv), gc.parameter("b", bv), padding=pad, dilation=dil, groups=g))
    want = np.maximum(_conv_reference(xv, wv, (1, 1), pads, dil, g) + bv[:, None, None], 0)
    return x, y, xv, want


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_wide_grid_matches_a_direct_sum_over_taps(cfg, dtype, isa, threads, monkeypatch, rng):
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)   # two threads: every batch of 2+ images in slots
    monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", "all")
    x, y, xv, want = _layer(cfg, dtype, rng)
    f = gc.function([x], y, backend="llvm")
    got = f(xv)
    _close(got, want, dtype)
    wide = _wide_steps(f)
    assert len(wide) == 1, [s.name for s in plan_steps(f)]
    assert getattr(wide[0], "fused_epilogue", False), "the bias + ReLU should run per image inside the kernel"
    if threads == 2 and cfg[0] >= 2:
        assert wide[0].split, "two threads and 2+ images: the images in slots across the pool"
    _close(f(xv), got, dtype)   # again: the zeroed borders and slack are re-zeroed per call, same answer


def test_wide_grid_runs_clean_under_bounds_checks(monkeypatch, rng):
    """Every load and store checked against its buffer: the product's last wide row reads dw * (kw - 1)
    elements past the last plane (the zeroed slack), and the masked tail vectors stay inside."""
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", "all")
    for cfg in CASES:
        x, y, xv, want = _layer(cfg, "float32", rng)
        f = gc.function([x], y, backend="llvm", sanitize="bounds")
        _close(f(xv), want, "float32")
        assert _wide_steps(f)


def test_the_switch_gives_the_same_answers_and_nan_stays_in_its_window(monkeypatch, rng):
    """"0" plans im2col, "all" the wide grid: equal results; a NaN in the input reaches exactly the outputs
    whose windows hold it (the wide rows' dropped columns read across rows, but are never kept)."""
    cfg = (2, 2, 9, 10, 4, (3, 3), ((1, 1), (1, 1)), (1, 1), 1)
    res = {}
    for mode in ("0", "all"):
        monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", mode)
        x, y, xv, want = _layer(cfg, "float64", np.random.default_rng(3))
        xv[1, 0, 4, 9] = np.nan   # the last column: the wide grid's dropped columns read next to it
        f = gc.function([x], gc.conv2d(x, gc.parameter("w", np.ones((4, 2, 3, 3))), padding=1), backend="llvm")
        assert bool(_wide_steps(f)) == (mode == "all")
        res[mode] = f(xv)
    np.testing.assert_array_equal(np.isnan(res["0"]), np.isnan(res["all"]))
    nan_at = np.argwhere(np.isnan(res["all"]))
    assert {tuple(i) for i in nan_at[:, [0, 2, 3]]} == {(1, r, c) for r in (3, 4, 5) for c in (8, 9)}
    np.testing.assert_allclose(np.nan_to_num(res["all"]), np.nan_to_num(res["0"]), rtol=1e-12, atol=1e-12)


def test_the_cost_model_takes_the_wide_grid_for_lenets_first_layer_only(monkeypatch, rng):
    """LeNet (W3): 1 -> 6 channels 5x5 over 28x28 padded by 2 (rows of 32 for 28 kept: im2col's 25 x 28
    short row copies an image cost more) takes the wide grid; 6 -> 16 over 14x14 unpadded (rows of 14 for
    10: 40% more product) keeps im2col; stride 2 never applies."""
    from graphc.backends.llvm import conv
    monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", "1")
    # the model's figures for AVX2's 8 lanes (the choice is ISA-dependent: with AVX-512's 16 the wide grid's
    # extra columns cost half as many cycles and the second layer's grid pays too)
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "avx2")
    first = conv.wide_grid((64, 1, 28, 28), (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), (28, 28))
    assert first == {"Hp": 32, "Wp": 32, "plane": 1024, "pad": 4, "image": 1028, "wide": 896}
    assert conv.wide_pays(first, (64, 1, 28, 28), 6, 25, (28, 28), "float32")
    second = conv.wide_grid((64, 6, 14, 14), (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), (10, 10))
    assert second is not None and not conv.wide_pays(second, (64, 6, 14, 14), 16, 150, (10, 10), "float32")
    assert conv.wide_grid((64, 1, 28, 28), (5, 5), (2, 2), ((2, 2), (2, 2)), (1, 1), (14, 14)) is None
    monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", "0")
    assert conv.wide_grid((64, 1, 28, 28), (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), (28, 28)) is None
    monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", "1")
    x = gc.placeholder("x", (None, 1, 28, 28))
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, gc.parameter("w1", rng.standard_normal((6, 1, 5, 5)).astype("float32")),
                                        padding=2)), 2)
    y = gc.relu(gc.conv2d(h, gc.parameter("w2", rng.standard_normal((16, 6, 5, 5)).astype("float32"))))
    f = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((4, 1, 28, 28)).astype("float32")
    f(xv)
    convs = [s for s in plan_steps(f) if getattr(s, "conv_tiles", None) is not None]
    assert [s.conv_tiles[4][-1] for s in convs] == [True, False]
