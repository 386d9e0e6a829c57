"""Winograd F(2x2,3x3) / F(4x4,3x3) convolutions on llvm (backends/llvm/winograd.py), against independent
references: the transform matrices against exact 1-D correlation (Fractions), the kernels against a NumPy
float64 direct sum over taps on odd sizes (H, W in 1, 3, 5, 17; channels 1, 3, 17, 65; batch 1 and 3;
padding 0 and 1), both vector ISAs (GRAPHC_LLVM_ISA), one and two threads, both kernel forms (staged and
fused), float32 and float64; the weights' transform as a prologue that follows set_value; gradients of a
trained convolution by float64 finite differences; and the rule that picks the path."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from test_llvm_conv_speedpaths import _conv_reference

TOL = {"float32": {2: 2e-5, 4: 2e-4}, "float64": {2: 1e-12, 4: 1e-11}}

#: (N, C, H, W, O, pad): every H, W in (1, 3, 5, 17), channels in (1, 3, 17, 65), batch 1 and 3
CASES = [
    (1, 1, 1, 1, 1, 1),
    (3, 3, 5, 17, 17, 1),
    (1, 17, 17, 3, 3, 0),
    (3, 65, 3, 5, 1, 1),
    (1, 3, 17, 17, 65, 0),
    (3, 17, 5, 3, 17, 0),
]


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _winograd(m):
    from graphc.backends.llvm import winograd
    return winograd.MATRICES[m]


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_give_exact_correlation(m):
    """A^T [(G g) * (B^T d)] = the valid correlation of d (m + 2) with g (3), exactly (1-D; the 2-D form
    is the product of two 1-D ones)."""
    bt, g, at = _winograd(m)
    a = m + 2
    rng = np.random.default_rng(m)
    for _ in range(5):
        d = [Fraction(int(v)) for v in rng.integers(-9, 10, a)]
        k = [Fraction(int(v)) for v in rng.integers(-9, 10, 3)]
        u = [sum(g[i][j] * k[j] for j in range(3)) for i in range(a)]
        v = [sum(bt[i][j] * d[j] for j in range(a)) for i in range(a)]
        y = [sum(at[i][j] * u[j] * v[j] for j in range(a)) for i in range(m)]
        assert y == [sum(d[i + j] * k[j] for j in range(3)) for i in range(m)]


def _check(monkeypatch, cases, m, mode, dtype, rng, isa="avx2", threads=1):
    import graphc.backends.llvm.conv as conv
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", str(m))
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_MODE", mode)
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)   # two threads split even these small convolutions
    for n, c, h, w, o, pad in cases:
        if h + 2 * pad < 3 or w + 2 * pad < 3:
            continue
        x = gc.placeholder("x", (n, c, h, w), dtype)
        wt = gc.placeholder("w", (o, c, 3, 3), dtype)
        f = gc.function([x, wt], gc.conv2d(x, wt, padding=pad), backend="llvm")
        assert "winograd" in f.source and f.program.info["fallback_ops"] == []
        if threads == 2 and n * -(-(h + 2 * pad - 2) // m) >= 2:
            assert "_thunk" in f.source   # split across the pool
        xs, ws = rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((o, c, 3, 3)).astype(dtype)
        want = _conv_reference(xs, ws, (1, 1), ((pad, pad), (pad, pad)), (1, 1), 1)
        got = f(xs, ws)
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(got, want, rtol=TOL[dtype][m], atol=TOL[dtype][m] * scale,
                                   err_msg=str((n, c, h, w, o, pad, m, mode, dtype, isa, threads)))


@pytest.mark.parametrize("m, isa, threads", [(2, "avx2", 1), (2, "avx2", 2), (2, "avx512", 2), (4, "avx2", 2),
                                              (4, "avx512", 2)])
def test_winograd_matches_direct_sum_on_odd_sizes(m, isa, threads, monkeypatch, rng):
    """Every case in one form per target, the other form on the next target: both forms, both dtypes."""
    turn = (isa == "avx512") + threads
    for k, (mode, dtype) in enumerate([("staged", "float32"), ("fused", "float64")]):
        _check(monkeypatch, CASES[(k + turn) % 2::2], m, mode, dtype, rng, isa, threads)


def test_without_blas_the_micro_kernel_computes_the_products(monkeypatch, rng):
    """No BLAS (jit.blas() None): the register-blocked micro-kernel runs the alpha^2 products."""
    from graphc.backends.llvm import jit
    monkeypatch.setattr(jit, "blas", lambda: None)
    for mode in ("staged", "fused"):
        _check(monkeypatch, [CASES[5]], 2, mode, "float32", rng, threads=2)


def test_blas_products_and_strided_asymmetric_padding(monkeypatch, rng):
    """GRAPHC_LLVM_SMALL_GEMM=0: the alpha^2 products as one-thread BLAS calls (the path for wide products);
    the input a transposed view, padding asymmetric and wider than the kernel's reach."""
    from graphc.ir import apply
    from graphc.ops import nn_ops as NN
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    for m, mode, pads in ((2, "staged", ((2, 0), (0, 3))), (4, "fused", ((0, 1), (3, 3)))):
        monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", str(m))
        monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_MODE", mode)
        x = gc.placeholder("x", (2, 3, 6, 5), "float32")
        wt = gc.placeholder("w", (17, 3, 3, 3), "float32")
        y = apply(NN.Conv2d, gc.transpose(x, (0, 1, 3, 2)), wt, stride=(1, 1), pads=pads, dilation=(1, 1), groups=1)
        f = gc.function([x, wt], y, backend="llvm")
        assert "call void @gc_cblas_sgemm" in f.source and "winograd" in f.source
        xs = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
        ws = rng.standard_normal((17, 3, 3, 3)).astype(np.float32)
        want = _conv_reference(xs.transpose(0, 1, 3, 2), ws, (1, 1), pads, (1, 1), 1)
        np.testing.assert_allclose(f(xs, ws), want, rtol=TOL["float32"][m], atol=TOL["float32"][m] * np.abs(want).max())


def test_weight_transform_is_a_prologue_step_that_follows_set_value(monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", "2")
    x = gc.placeholder("x", (2, 5, 7, 6), "float32")
    w = gc.parameter("w", rng.standard_normal((4, 5, 3, 3)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(4).astype(np.float32))
    f = gc.function([x], gc.relu(gc.conv2d(x, w, b, padding=1)), backend="llvm")
    xs = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)

    def ref():
        y = _conv_reference(xs, w.value, (1, 1), ((1, 1), (1, 1)), (1, 1), 1) + b.value[:, None, None]
        return np.maximum(y, 0)
    np.testing.assert_allclose(f(xs), ref(), rtol=1e-5, atol=1e-5)
    plan = f.program._specs[()].plan
    assert any(getattr(st, "name", "") == "winograd_weights" for st in plan.steps[:plan.prologue])
    for _ in range(2):   # a new weight: the transform runs again before the next call
        w.set_value(rng.standard_normal((4, 5, 3, 3)).astype(np.float32))
        np.testing.assert_allclose(f(xs), ref(), rtol=1e-5, atol=1e-5)


def test_gradients_through_a_winograd_forward(monkeypatch):
    """A convolution trained on llvm with the forward through Winograd: gradients by finite differences."""
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", "2")
    rng = np.random.default_rng(3)
    gc.verify_grad(lambda x, w: gc.tanh(gc.conv2d(x, w, padding=1)),
                   [rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 3, 3))],
                   backend="llvm", rtol=1e-5, atol=1e-7)


def test_the_rule_takes_resnet_3x3_layers_and_leaves_the_rest_direct(monkeypatch):
    from graphc.backends.llvm import winograd
    from graphc.backends.schedule.views import View, contig_strides
    monkeypatch.delenv("GRAPHC_LLVM_WINOGRAD", raising=False)

    def pick(n, c, hw, o, k=3, stride=1, groups=1, dtype="float32"):
        x = View(None, 0, (n, c, hw, hw), contig_strides((n, c, hw, hw)), dtype)
        w = View(None, 0, (o, c // groups, k, k), contig_strides((o, c // groups, k, k)), dtype)
        oh = (hw + 2 - k) // stride + 1
        return winograd.tile_size(x, w, (stride, stride), (1, 1), groups, (oh, oh))
    for n in (1, 8):
        for c, hw in ((64, 56), (128, 28), (256, 14)):
            assert pick(n, c, hw, c) == 4
    assert pick(8, 512, 7, 512) == 2 and pick(3, 32, 12, 32) == 2   # small images: 2x2 tiles
    assert pick(1, 512, 7, 512) == 2 and pick(1, 64, 5, 64) is None   # 16 tiles and up (9: direct)
    assert pick(1, 3, 56, 64) is None and pick(1, 64, 56, 8) is None   # few channels
    assert pick(1, 64, 56, 64, stride=2) is None and pick(1, 64, 56, 64, k=1) is None
    assert pick(1, 64, 56, 64, groups=2) is None and pick(1, 64, 56, 64, dtype="int32") is None
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", "0")
    assert pick(8, 64, 56, 64) is None
    # the form: fused while the transformed weights fit the cache, staged for wide channels
    assert not winograd.staged_rule(8, 64, 64, (56, 56), 4, "float32")
    assert not winograd.staged_rule(1, 128, 128, (28, 28), 4, "float32")
    assert winograd.staged_rule(1, 256, 256, (14, 14), 4, "float32")
    assert winograd.staged_rule(8, 512, 512, (7, 7), 2, "float32")


def test_both_forms_under_bounds_checking(monkeypatch, rng):
    """sanitize="bounds" checks every vector access and product span of both forms: none is out of bounds."""
    for m, mode in (("4", "staged"), ("4", "fused"), ("2", "staged")):   # (F(2x2) staged: a channel a vector)
        monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", m)
        monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_MODE", mode)
        x = gc.placeholder("x", (2, 5, 9, 7), "float64")
        wt = gc.placeholder("w", (3, 5, 3, 3), "float64")
        f = gc.function([x, wt], gc.conv2d(x, wt, padding=1), backend="llvm", sanitize="bounds")
        xs, ws = rng.standard_normal((2, 5, 9, 7)), rng.standard_normal((3, 5, 3, 3))
        np.testing.assert_allclose(f(xs, ws), _conv_reference(xs, ws, (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
                                   rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_seven_wide_outputs_use_quarter_vectors(isa, monkeypatch, rng):
    """7x7 outputs (ResNet's last stage) in F(2x2): 4 tiles a row, so AVX-512's 16 lanes are cut to 4
    (QUARTER_MAX; AVX2's 8 to 4) and the products' columns are not padded to twice the tiles; both forms and
    dtypes match the direct sum, split or not."""
    from graphc.backends.llvm import winograd
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    geo = winograd.geometry(1, 5, 9, (7, 7), 2, "float32")
    assert (geo["L"], geo["twp"]) == (4, 4)
    for threads in (1, 2):
        for mode, dtype in (("staged", "float32"), ("fused", "float64")):
            _check(monkeypatch, [(1, 5, 7, 7, 9, 1), (2, 3, 7, 9, 4, 1)], 2, mode, dtype, rng, isa, threads)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
def _checked_7x7_conv(rng):
    """A batch-1 7x7 convolution (9 -> 20 channels), compiled and checked against the direct sum."""
    x = gc.placeholder("x", (1, 9, 7, 7), "float32")
    w = gc.parameter("w", rng.standard_normal((20, 9, 3, 3)).astype(np.float32))
    f = gc.function([x], gc.conv2d(x, w, padding=1), backend="llvm")
    xv = rng.standard_normal((1, 9, 7, 7)).astype(np.float32)
    want = _conv_reference(xv, w.value, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    np.testing.assert_allclose(f(xv), want, rtol=TOL["float32"][2], atol=TOL["float32"][2] * np.abs(want).max())
    return f


def test_turned_staged_products_match_direct_sum(isa, threads, monkeypatch, rng):
    """Staged products of few tiles turned round (transposed_rule: V^T @ U^T over U^T packed in the
    prologue, then copied into M's layout): odd channels (a partial panel of O), both tile sizes, both
    dtypes, split over slots or not, against the direct sum; the rule takes batch 1's narrow products."""
    from graphc.backends.llvm import winograd
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_TURN", "1")
    cases = [(1, 5, 7, 7, 17, 1), (1, 17, 9, 9, 65, 1), (2, 3, 5, 6, 33, 0)]
    for m, dtype in ((2, "float32"), (4, "float64"), (4, "float32")):
        _check(monkeypatch, cases, m, "staged", dtype, rng, isa, threads)
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", "2")
    f = _checked_7x7_conv(rng)
    plan = list(f.program._specs.values())[0].plan
    # the weights' transform writes U[xi]^T straight into the panels: one prologue step, no packing, no U
    assert [s.name for s in plan.steps[:plan.prologue]] == ["winograd_weights"]
    # the rule: few tiles only, and not with the micro-kernel or BLAS forced
    monkeypatch.delenv("GRAPHC_LLVM_WINOGRAD_TURN")
    assert winograd.transposed_rule(16, 512) and not winograd.transposed_rule(128, 512)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    assert not winograd.transposed_rule(16, 512)


def test_turned_products_prefetch_their_streamed_panels_into_l2(monkeypatch, rng):
    """The turned staged products read each U[xi]^T once a call (streamed from memory): besides the L1
    prefetch of every few-row packed product, their panels are prefetched PREFETCH_L2_AHEAD rows ahead into
    L2 (hint 2); a plain packed product of as few rows is not (its weight stays in cache), nor with the
    setting at 0. The answers are the same."""
    from graphc.backends.llvm import gemm
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_TURN", "1")
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD_MODE", "staged")
    monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", "2")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    l2 = ", i32 0, i32 2, i32 1)"
    for ahead in (gemm.PREFETCH_L2_AHEAD, 0):
        monkeypatch.setattr(gemm, "PREFETCH_L2_AHEAD", ahead)
        f = _checked_7x7_conv(rng)
        ir = "\n".join(s.ir for s in f.program._specs.values())
        assert (l2 in ir) == bool(ahead) and ", i32 0, i32 3, i32 1)" in ir
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    monkeypatch.setattr(gemm, "PREFETCH_L2_AHEAD", 48)
    a = gc.placeholder("a", (16, 63), "float32")
    b = gc.parameter("b", rng.standard_normal((63, 130)).astype(np.float32))
    f = gc.function([a], a @ b, backend="llvm")
    ir = "\n".join(s.ir for s in f.program._specs.values())
    assert ", i32 0, i32 3, i32 1)" in ir and l2 not in ir


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_staged_input_transform_a_channel_at_a_time(isa, dtype, monkeypatch, rng):
    """The staged form's input transform over a channel's tile rows as one vector (winograd.WHOLE_CHANNEL,
    ResNet-18's 14x14 and 7x7 stages at batch 1) gives the direct sum, and the same values as a tile row at
    a time; images whose tile rows outgrow WHOLE_LANES keep the row-by-row transform. Rows narrower than
    COPY_VECTOR_LANES (63 wide: the last that is) are copied into the scratch as vectors, 64 element by element."""
    from graphc.backends.llvm import winograd
    cases = [(1, 5, 7, 7, 3, 1), (1, 3, 14, 14, 5, 1), (2, 3, 9, 6, 4, 1), (1, 2, 40, 40, 3, 1), (1, 17, 3, 3, 2, 0),
             (1, 2, 9, 63, 3, 1), (1, 2, 5, 64, 2, 1)]
    got = {}
    for whole in (True, False):
        monkeypatch.setattr(winograd, "WHOLE_CHANNEL", whole)
        r = np.random.default_rng(7)
        _check(monkeypatch, cases, 2, "staged", dtype, r, isa, 2)
        x = gc.placeholder("x", (1, 6, 7, 7), dtype)
        wt = gc.placeholder("w", (4, 6, 3, 3), dtype)
        f = gc.function([x, wt], gc.conv2d(x, wt, padding=1), backend="llvm")
        got[whole] = f(r.standard_normal((1, 6, 7, 7)).astype(dtype), r.standard_normal((4, 6, 3, 3)).astype(dtype))
    np.testing.assert_array_equal(got[True], got[False])


def test_fused_items_are_balanced_over_the_slots():
    """geometry: a fused convolution split over threads has a multiple of the slots' count of items where
    the tile rows allow it, and item_rows gives every image's blocks heights within one row of each other
    that cover its tile rows exactly once."""
    from graphc.backends.llvm import winograd
    for n, hw, m in [(1, 56, 4), (1, 20, 2), (3, 17, 2), (1, 28, 4), (2, 9, 4), (8, 56, 4), (1, 7, 2)]:
        geo = winograd.geometry(n, 64, 64, (hw, hw), m, "float32")
        th, blocks, R = geo["th"], geo["blocks"], geo["R"]
        if geo["slots"] > 1 and any((n * b) % (2 * winograd.threads()) == 0 for b in range(blocks, th + 1)):
            assert geo["items"] % geo["slots"] == 0, (n, hw, m, geo)
        starts = [b * th // blocks for b in range(blocks + 1)] if th % blocks else [b * R for b in range(blocks + 1)]
        heights = [b - a for a, b in zip(starts, starts[1:])]
        assert sum(heights) == th and max(heights) <= R and max(heights) - min(heights) <= 1, (n, hw, m, geo)


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("isa, threads, blas", [("avx2", 1, True), ("avx2", 2, False), ("avx512", 2, True),
                                                ("avx512", 1, False)])
def test_fused_items_of_two_heights_match_direct_sum(balanced, isa, threads, blas, monkeypatch, rng):
    """Items of two heights (10 tile rows over 4 items of 2 or 3, at one or two threads), with
    BLAS products (one body per height) and the micro-kernel (the height a run-time value); the old cut
    (blocks of R and a shorter last one) too."""
    from graphc.backends.llvm import winograd
    monkeypatch.setattr(winograd, "BALANCED_ITEMS", balanced)
    # three tile rows an item (F(2x2): 16 products; 12 tiles a row padded from 10; 5 + 7 channels)
    monkeypatch.setattr(winograd, "BLOCK_BYTES", 3 * 16 * 12 * (5 + 7) * 4)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0" if blas else "1")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    _check(monkeypatch, [(1, 5, 20, 20, 7, 1), (2, 5, 19, 20, 7, 1)], 2, "fused", "float32", rng, isa, threads)
