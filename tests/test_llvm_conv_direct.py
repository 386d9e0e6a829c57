"""The direct convolution over phase planes (backends/llvm/direct.py) against an independent NumPy reference
(a sum over taps in float64): odd sizes, strides 1 to 3 (unequal ones too), even and odd kernels, asymmetric
padding, 1x1 stride 2, both vector ISAs, one and two threads, float32 and float64, items cut into single
rows and channel blocks; with its fused epilogue (bias, ReLU, residual add; fused only where nothing reads
the convolution's own output later), and under bounds checking. Then the rule that picks it."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip, plan_steps
from test_llvm_conv_speedpaths import _conv_reference

#: (N, C, H, W, O, (KH, KW), stride, pads)
CONFIGS = [
    (1, 3, 33, 33, 17, (7, 7), (2, 2), ((3, 3), (3, 3))),      # a stem: 7x7 stride 2
    (2, 5, 17, 17, 9, (3, 3), (1, 1), ((1, 1), (1, 1))),       # stride 1: one plane
    (3, 4, 19, 19, 13, (5, 5), (3, 3), ((2, 1), (0, 2))),      # stride 3, asymmetric padding
    (1, 17, 9, 9, 33, (1, 1), (2, 2), ((0, 0), (0, 0))),       # 1x1 stride 2: one of four planes read
    (1, 1, 1, 1, 1, (1, 1), (1, 1), ((0, 0), (0, 0))),         # one element
    (1, 3, 17, 3, 65, (3, 3), (2, 1), ((1, 1), (1, 1))),       # unequal strides, 3 columns, 65 filters
    (2, 3, 6, 11, 5, (4, 2), (2, 3), ((0, 1), (1, 0))),        # even kernel sides
    (1, 63, 15, 15, 257, (3, 3), (2, 2), ((1, 1), (1, 1))),    # 257 filters: partial tiles and blocks
]
TOL = {"float32": 3e-5, "float64": 1e-12}


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


@pytest.fixture(params=[("avx2", "1"), ("avx2", "2"), ("avx512", "1"), ("avx512", "2")],
                ids=["avx2-1t", "avx2-2t", "avx512-1t", "avx512-2t"])
def target(request, monkeypatch):
    """Both ISAs' tiles, one or two threads (every split threshold at 0), the direct path forced."""
    import graphc.backends.llvm.conv as conv
    isa, threads = request.param
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "1")
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    return request.param


def _close(got, want, dtype, k):
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, k ** 0.5))


def _one(r):
    return r[0] if isinstance(r, (list, tuple)) else r


def _steps(f):
    return [getattr(st, "name", "") for st in plan_steps(f)]


def _build(cfg, dtype, rng, epilogue: str):
    n, c, h, w, o, k, s, p = cfg
    x = gc.placeholder("x", (n, c, h, w), dtype)
    wt = gc.parameter("w", rng.standard_normal((o, c) + k).astype(dtype))
    b = gc.parameter("b", rng.standard_normal(o).astype(dtype))
    y = gc.conv2d(x, wt, stride=s, padding=p)
    if epilogue == "none":
        return [x], [y], wt, b, None
    z = y + gc.reshape(b, (1, o, 1, 1))
    if epilogue == "residual":
        r = gc.placeholder("r", tuple(y.shape), dtype)
        return [x, r], [gc.relu(z + r)], wt, b, r
    if epilogue == "twice":      # the region reads the convolution's value twice
        return [x], [gc.relu(z) * y], wt, b, None
    return [x], [gc.relu(z)], wt, b, None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("out_bytes", [None, 64], ids=["blocks", "single-rows"])
def test_direct_matches_numpy(target, dtype, out_bytes, monkeypatch):
    from graphc.backends.llvm import direct
    if out_bytes is not None:   # one output row per item: many items, a short last row block
        monkeypatch.setattr(direct, "OUT_BYTES", out_bytes)
    rng = np.random.default_rng(18)
    for i, cfg in enumerate(CONFIGS):
        epilogue = ("relu", "none", "residual", "twice")[i % 4]
        ins, outs, wt, b, r = _build(cfg, dtype, rng, epilogue)
        f = gc.function(ins, outs, backend="llvm")
        assert "conv2d_direct" in _steps(f), (cfg, _steps(f))
        assert f.program.info["fallback_ops"] == []
        xv = rng.standard_normal(ins[0].shape).astype(dtype)
        args = [xv] + ([rng.standard_normal(r.shape).astype(dtype)] if r is not None else [])
        got = f(*args)
        got = got if isinstance(got, (list, tuple)) else [got]
        n, c, h, w, o, k, s, p = cfg
        conv = _conv_reference(xv, wt.value, s, p, (1, 1), 1)
        kk = c * k[0] * k[1]
        if epilogue == "none":
            _close(got[0], conv, dtype, kk)
            continue
        z = conv + b.value.astype(np.float64)[None, :, None, None]
        if epilogue == "residual":
            z = z + args[1]
        _close(got[0], np.maximum(z, 0) * (conv if epilogue == "twice" else 1), dtype, kk)


def test_direct_under_bounds_checking(monkeypatch):
    import graphc.backends.llvm.conv as conv
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "1")
    rng = np.random.default_rng(3)
    for cfg in (CONFIGS[0], CONFIGS[2], CONFIGS[6]):
        ins, outs, wt, b, _ = _build(cfg, "float64", rng, "relu")
        f = gc.function(ins, outs, backend="llvm", sanitize="bounds")
        xv = rng.standard_normal(ins[0].shape)
        n, c, h, w, o, k, s, p = cfg
        want = np.maximum(_conv_reference(xv, wt.value, s, p, (1, 1), 1) + b.value[None, :, None, None], 0)
        _close(_one(f(xv)), want, "float64", c * k[0] * k[1])


def test_new_weights_are_permuted_again(monkeypatch):
    """A strided convolution's weights are permuted into the taps' order once (a prologue step): a new
    value of the parameter is permuted again, never stale."""
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "1")
    rng = np.random.default_rng(4)
    cfg = CONFIGS[0]
    ins, outs, wt, b, _ = _build(cfg, "float64", rng, "none")
    f = gc.function(ins, outs, backend="llvm")
    xv = rng.standard_normal(ins[0].shape)
    n, c, h, w, o, k, s, p = cfg
    _close(_one(f(xv)), _conv_reference(xv, wt.value, s, p, (1, 1), 1), "float64", 147)
    wt.set_value(rng.standard_normal(wt.value.shape))
    _close(_one(f(xv)), _conv_reference(xv, wt.value, s, p, (1, 1), 1), "float64", 147)


def _view(shape, dtype="float32"):
    from graphc.backends.schedule.views import View, contig_strides
    return View(0, 0, tuple(shape), contig_strides(tuple(shape)), dtype)


@pytest.mark.parametrize("case, expected", [
    (((1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (1, 1), 1, (112, 112), "float32"), True),    # ResNet's stem
    (((8, 64, 56, 56), (128, 64, 1, 1), (2, 2), (1, 1), 1, (28, 28), "float32"), True),     # a 1x1 stride 2
    (((1, 128, 28, 28), (256, 128, 3, 3), (2, 2), (1, 1), 1, (14, 14), "float64"), True),  # 3x3 to 14x14
    (((1, 256, 14, 14), (512, 256, 3, 3), (2, 2), (1, 1), 1, (7, 7), "float32"), True),    # 8 columns, 1 padding
    (((1, 256, 7, 7), (512, 256, 5, 5), (1, 1), (1, 1), 1, (7, 7), "float32"), False),     # 11 columns, 4 padding
    (((1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (2, 2), 1, (109, 109), "float32"), False),  # dilation
    (((1, 4, 224, 224), (64, 2, 7, 7), (2, 2), (1, 1), 2, (112, 112), "float32"), False),  # groups
    (((1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (1, 1), 1, (112, 112), "float16"), False),  # not float32/64
    (((1, 1, 8, 8), (2, 1, 3, 3), (1, 1), (1, 1), 1, (8, 8), "float32"), False),            # too small
])
def test_rule(case, expected, monkeypatch):
    from graphc.backends.llvm import direct
    xs, ws, stride, dilation, groups, out_hw, dtype = case
    monkeypatch.delenv("GRAPHC_LLVM_CONV_DIRECT", raising=False)
    assert direct.rule(_view(xs, dtype), _view(ws, dtype), stride, dilation, groups, out_hw) is expected
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "0")
    assert direct.rule(_view(xs, dtype), _view(ws, dtype), stride, dilation, groups, out_hw) is False


def test_auto_takes_the_stem_and_off_does_not(monkeypatch):
    """Without the setting a stem-sized convolution runs direct; GRAPHC_LLVM_CONV_DIRECT=0 keeps the
    im2col path. Both give NumPy's answer."""
    rng = np.random.default_rng(7)
    cfg = (1, 3, 96, 96, 32, (7, 7), (2, 2), ((3, 3), (3, 3)))
    res = {}
    for env in ("auto", "0"):
        monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", env)
        ins, outs, wt, b, _ = _build(cfg, "float32", np.random.default_rng(7), "relu")
        f = gc.function(ins, outs, backend="llvm")
        assert ("conv2d_direct" in _steps(f)) == (env == "auto"), _steps(f)
        xv = rng.standard_normal(ins[0].shape).astype(np.float32) if not res else res["x"]
        res["x"] = xv
        want = np.maximum(_conv_reference(xv, wt.value, (2, 2), ((3, 3), (3, 3)), (1, 1), 1)
                          + b.value[None, :, None, None], 0)
        _close(_one(f(xv)), want, "float32", 147)


@pytest.mark.parametrize("live", ["none-after", "read-after", "unknown"])
def test_region_fuses_only_where_the_convolutions_output_is_not_read_after(live, monkeypatch):
    """The fused copy-out runs the region from the product's block and never writes the convolution's own
    output, so the planner fuses only where nothing reads that output after the region (`live`, the buffers
    read later: unknown or holding it, the region runs as its own pass). NumPy's answer either way."""
    from graphc.backends.llvm import conv as conv_mod
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "1")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")   # (a warm start would not plan at all)
    real = conv_mod.fuse_conv_epilogue
    seen = []

    def fuse(plan, outs, ins, compute, full_shape, live_=None):
        seen.append(live_)
        bufs = {v.buf for v in ins}
        return real(plan, outs, ins, compute, full_shape,
                    {"none-after": set(), "read-after": bufs, "unknown": None}[live])
    monkeypatch.setattr(conv_mod, "fuse_conv_epilogue", fuse)
    rng = np.random.default_rng(9)
    cfg = CONFIGS[2]
    ins, outs, wt, b, r = _build(cfg, "float64", rng, "residual")
    f = gc.function(ins, outs, backend="llvm")
    assert seen and all(isinstance(x, set) for x in seen)
    fused = [getattr(st, "fused_epilogue", False) for st in plan_steps(f) if st.name == "conv2d_direct"]
    assert fused == [live == "none-after"]
    xv, rv = rng.standard_normal(ins[0].shape), rng.standard_normal(r.shape)
    n, c, h, w, o, k, s, p = cfg
    want = np.maximum(_conv_reference(xv, wt.value, s, p, (1, 1), 1) + b.value[None, :, None, None] + rv, 0)
    _close(_one(f(xv, rv)), want, "float64", c * k[0] * k[1])


#: (N, C, H, W, O, (KH, KW), stride, pads) whose rule cut leaves a one-vector last column block and which
#: direct._best_cut cuts otherwise on at least one ISA (whole images, fewer channels an item)
CUT_CONFIGS = [
    (1, 3, 56, 56, 128, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (1, 5, 56, 56, 128, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (2, 3, 57, 57, 128, (3, 3), (2, 2), ((1, 1), (0, 1))),
    (1, 3, 56, 56, 100, (3, 3), (2, 2), ((1, 1), (1, 1))),   # a partial last channel block (AVX2)
]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_searched_cuts_match_numpy(isa, monkeypatch):
    """direct.geometry's search over cuts (SEARCH_CUTS): where it takes another cut than OUT_BYTES' rule, the
    items still cover every row and channel once (bias + ReLU in the copy-out, two threads, float32), each
    wide block within WIDE_BYTES, as many items as the rule's; and the search changes some cut here."""
    import graphc.backends.llvm.conv as conv
    from graphc.backends.llvm import direct
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_CONV_DIRECT", "1")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    rng = np.random.default_rng(23)
    changed = 0
    for cfg in CUT_CONFIGS:
        n, c, h, w, o, k, s, p = cfg
        oh, ow = (h + sum(p[0]) - k[0]) // s[0] + 1, (w + sum(p[1]) - k[1]) // s[1] + 1
        cuts = []
        for search in (False, True):
            monkeypatch.setattr(direct, "SEARCH_CUTS", search)
            g = direct.geometry((n, c, h, w), o, k, s, p, (oh, ow), "float32", 2)
            assert g["R"] * g["rb"] >= oh and g["OB"] * g["nob"] >= o > g["OB"] * (g["nob"] - 1)
            cuts.append(g)
        rule, cut = cuts
        if (rule["R"], rule["OB"]) != (cut["R"], cut["OB"]):
            changed += 1
            assert cut["OB"] * cut["m"] * 4 <= direct.WIDE_BYTES and cut["items"] >= min(rule["items"], 4)
        ins, outs, wt, b, _ = _build(cfg, "float32", rng, "relu")
        f = gc.function(ins, outs, backend="llvm")
        assert "conv2d_direct" in _steps(f)
        xv = rng.standard_normal(ins[0].shape).astype(np.float32)
        want = np.maximum(_conv_reference(xv, wt.value, s, p, (1, 1), 1) + b.value[None, :, None, None], 0)
        _close(_one(f(xv)), want, "float32", c * k[0] * k[1])
    assert changed >= 2
