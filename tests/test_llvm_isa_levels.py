"""The llvm backend at each vector ISA level it generates code for: GRAPHC_LLVM_ISA=avx2 / avx / sse turns
the wider ISAs' features off in the target machine (jit.cpu_features), so a host with wider vectors runs
that level's machine code. On this (AVX2) machine the AVX (no FMA, no F16C) and SSE fallbacks run for
real: their machine code is checked (no ymm/zmm or VEX instructions for SSE, no FMA or F16C for AVX) and
their results against NumPy references at odd sizes, on one and two threads. Without F16C, LLVM turns
half-precision conversions into calls of compiler-rt routines this process lacks (an unresolved call:
a segfault); graphc defines them (jit.RUNTIME_IR), checked here bit for bit against NumPy, exhaustively
for float16 -> float32. That an AVX-512 host forced to avx2 gets AVX2 code is checked on Sapphire
Rapids' machine code (compiled, not run).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from test_llvm_math_speedpaths import OPS, _asm_for, _check, _inputs

pytestmark = pytest.mark.usefixtures("llvm")

SIZES = (1, 3, 17, 63, 65, 257)


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _jit():
    from graphc.backends.llvm import jit
    return jit


def _host_has(feature: str) -> bool:
    jit = _jit()
    jit.target_machine()
    return jit.has_feature(jit._state["host_features"], feature)


@pytest.fixture(params=["avx", "sse"])
def level(request, monkeypatch):
    """A level narrower than this host's vectors (its machine code runs here)."""
    if request.param == "avx" and not _host_has("avx"):
        pytest.skip("the host has no AVX")
    monkeypatch.setenv("GRAPHC_LLVM_ISA", request.param)
    return request.param


# ---- which features each level leaves on -------------------------------------------------------------

SPR = ("+sse2,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi2,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd,"
       "+avx512vnni,+avx512bf16,+avx512fp16,+amx-tile,+avxvnni,+evex512,+vaes,+vpclmulqdq,-xop")


def _on(features: str) -> set[str]:
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def test_levels_turn_wider_features_off():
    jit = _jit()
    on = {lv: _on(jit.narrowed(SPR, lv)) for lv in ("avx512", "avx2+fma", "avx", "sse")}
    assert on["avx512"] == _on(SPR)
    assert not {f for f in on["avx2+fma"] if f.startswith(("avx512", "amx", "avxvnni", "evex"))}
    assert {"avx2", "fma", "f16c", "avx", "vaes"} <= on["avx2+fma"]
    assert on["avx"] == {"sse2", "sse4.2", "popcnt", "avx", "bmi2"}
    assert on["sse"] == {"sse2", "sse4.2", "popcnt", "bmi2"}
    assert "-avx512f" in jit.narrowed(SPR, "avx2+fma").split(",")   # turned off, not just left out
    assert jit.narrowed(SPR, "") == SPR.strip(",") and jit.narrowed(SPR, "neon") == SPR


def test_avx512_host_forced_to_avx2_gets_avx2_machine_code():
    """Sapphire Rapids' code for a W2-like loop: zmm registers with its own features, none (nor the
    EVEX-only registers ymm16-31 or mask registers) once narrowed to avx2+fma, FMA kept."""
    jit = _jit()
    p = gc.placeholder("x", (4099,), "float32")
    f = gc.function([p], gc.tanh(p * 0.7 + 0.1) * gc.sigmoid(p) + gc.exp(-p * p), backend="llvm")
    src = f.source.replace('"prefer-vector-width"="256"', '"prefer-vector-width"="512"') \
        .replace('"min-legal-vector-width"="256"', '"min-legal-vector-width"="512"')
    wide = _asm_for(src, "sapphirerapids", SPR)
    narrow = _asm_for(src, "sapphirerapids", jit.narrowed(SPR, "avx2+fma"))
    assert "%zmm" in wide
    assert "%zmm" not in narrow and not re.search(r"%ymm(1[6-9]|2\d|3[01])\b|%k[1-7]\b", narrow)
    assert "%ymm" in narrow and "vfmadd" in narrow


def test_unknown_level_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "avx3")
    p = gc.placeholder("x", (5,), "float32")
    with pytest.raises(gc.GraphcError, match=r"^GRAPHC_LLVM_ISA='avx3' is not an ISA level; use one of "
                                             r"avx512, avx2, avx, sse") as e:
        gc.function([p], gc.exp(p), backend="llvm")
    assert not isinstance(e.value, gc.errors.BackendUnavailable)   # a setting to fix, not a missing backend
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "AVX2")   # any case, as tune.isa reads it
    np.testing.assert_allclose(gc.function([p], gc.exp(p), backend="llvm")(np.ones(5, np.float32)), np.e, rtol=1e-6)


# ---- the machine code each level runs here ------------------------------------------------------------

def _w2_half(n):
    p = gc.placeholder("x", (n,), "float32")
    y = gc.tanh(p * 0.7 + 0.1) * gc.sigmoid(p) + gc.exp(-p * p)
    return p, [y, gc.cast(y, "float16")]


def _instructions(asm: str) -> list[str]:
    return [ln.split()[0] for ln in asm.splitlines()
            if ln.startswith("\t") and not ln.lstrip().startswith((".", "#")) and ln.split()]


def test_level_machine_code(level):
    jit = _jit()
    ids = {jit.target_id()}
    p, outs = _w2_half(4099)
    f = gc.function([p], outs, backend="llvm")
    x = np.random.default_rng(0).standard_normal(4099).astype(np.float32)
    y, h = f(x)
    np.testing.assert_array_equal(h, y.astype(np.float16))
    ins = _instructions(f.asm)
    assert ins and not [i for i in ins if i.startswith("vcvtps2ph") or i.startswith("vfmadd")]
    if level == "sse":
        assert "%ymm" not in f.asm and "%zmm" not in f.asm
        vex = [i for i in ins if re.match(r"v(mov|add|sub|mul|div|max|min|and|or|xor|broadcast|blend|perm)", i)]
        assert not vex, vex[:5]
        assert any(i in ("mulps", "addps", "movups", "movaps") for i in ins)
    else:
        assert "%ymm" in f.asm and "%zmm" not in f.asm
    assert "__truncsfhf2" in f.asm    # the conversion is the runtime routine's, not F16C's
    for other in ("avx2", ""):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GRAPHC_LLVM_ISA", other)
            ids.add(jit.target_id())
    assert len(ids) == (3 if _host_has("avx512f") else 2)   # cached code is per level


# ---- results at each level ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPS))
def test_transcendentals(level, threads, rng, name):
    x = _inputs(name, rng, n_random=500)
    f = gc.function([p := gc.placeholder("x", x.shape, "float32")], OPS[name](p), backend="llvm")
    _check(name, x, f(x))


def _half_cases(rng):
    """float32 values around every float16 boundary: ties, subnormals, the overflow edge, NaN, inf."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    mid = h[np.isfinite(h)].astype(np.float32)
    nxt = np.nextafter(mid, np.float32(np.inf))
    with np.errstate(over="ignore"):
        up = np.nextafter(mid.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    ties = (mid.astype(np.float64) + up) / 2
    ties = ties[np.isfinite(ties)].astype(np.float32)
    edge = np.float32([65504, 65519, 65519.996, 65520, 65536, 1e6, 3e38, np.inf, -np.inf, np.nan,
                       2 ** -24, 2 ** -25, 2 ** -25 * 1.0001, 2 ** -26, 1e-30, 0.0, -0.0, 6.1e-5, 6.0976e-05])
    rnd = (rng.standard_normal(4000) * np.float32(10.0) ** rng.integers(-9, 5, 4000)).astype(np.float32)
    return np.concatenate([mid, nxt, ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(1e9)),
                           edge, -edge, rnd])


def _same_half(got, want):
    assert got.dtype == np.float16 and got.shape == want.shape
    gb, wb = got.view(np.uint16), want.view(np.uint16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    bad = np.flatnonzero((gb != wb) & ~nan)
    assert bad.size == 0, [(hex(gb[i]), hex(wb[i])) for i in bad[:5]]


def test_half_conversions(level, threads, rng):
    """float16 -> float32 for all 65,536 bit patterns; float32 and float64 -> float16 around every
    boundary, bit for bit with NumPy (the NaNs as NaNs): the runtime routines on SSE/AVX."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    ph = gc.placeholder("h", h.shape, "float16")
    f = gc.function([ph], [gc.cast(ph, "float32"), gc.cast(ph, "float64")], backend="llvm")
    s, d = f(h)
    fin = ~np.isnan(h)
    np.testing.assert_array_equal(s[fin], h[fin].astype(np.float32))
    np.testing.assert_array_equal(d[fin], h[fin].astype(np.float64))
    assert np.isnan(s[~fin]).all() and np.isnan(d[~fin]).all()
    x = _half_cases(rng)
    px = gc.placeholder("x", x.shape, "float32")
    g = gc.function([px], gc.cast(px, "float16"), backend="llvm")
    with np.errstate(over="ignore"):
        _same_half(g(x), x.astype(np.float16))
    # float64 just off the float16 ties by less than float32 resolves: rounding through float32 would tie
    t = x[np.isfinite(x)].astype(np.float64)
    x64 = np.concatenate([t, t * (1 + 2.0 ** -40), t * (1 - 2.0 ** -40), t + 2.0 ** -60])
    pd = gc.placeholder("x", x64.shape, "float64")
    k = gc.function([pd], gc.cast(pd, "float16"), backend="llvm")
    with np.errstate(over="ignore"):
        _same_half(k(x64), x64.astype(np.float16))


def test_half_arithmetic(level, threads, rng):
    """float16 elementwise math (float registers, each result rounded to float16) at odd sizes."""
    for n in SIZES:
        a = (rng.standard_normal(n) * 3).astype(np.float16)
        b = (rng.standard_normal(n) * 3).astype(np.float16)
        pa, pb = gc.placeholder("a", (n,), "float16"), gc.placeholder("b", (n,), "float16")
        f = gc.function([pa, pb], [pa * pb + pa, gc.exp(pa) / (pb * pb + 1)], backend="llvm")
        r1, r2 = f(a, b)
        _same_half(r1, a * b + a)
        want = np.exp(a) / (b * b + np.float16(1))   # NumPy's float16: each result rounded to float16
        ulps = np.abs(r2.astype(np.float32) - want.astype(np.float32)) / np.spacing(np.abs(want)).astype(np.float32)
        assert ulps.max() <= 1, ulps.max()    # exp's float32 result may round to the other neighbour


def _mlp_ref(x, w1, b1, w2, b2):
    h = np.maximum(x.astype(np.float64) @ w1 + b1, 0)
    z = h @ w2 + b2
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("n", [1, 17, 65])
def test_products_and_rows(level, threads, rng, n):
    """Matrix-vector (batch 1), micro-kernel and BLAS products with their bias/ReLU, softmax rows and a
    LayerNorm, at this level's vector shapes."""
    k, m, c = 63, 257, 17
    x = rng.standard_normal((n, k)).astype(np.float32)
    w1 = (rng.standard_normal((k, m)) / 8).astype(np.float32)
    b1 = rng.standard_normal(m).astype(np.float32)
    w2 = (rng.standard_normal((m, c)) / 16).astype(np.float32)
    b2 = rng.standard_normal(c).astype(np.float32)
    px = gc.placeholder("x", (n, k), "float32")
    h = gc.relu(px @ gc.parameter("w1", w1) + gc.parameter("b1", b1))
    z = h @ gc.parameter("w2", w2) + gc.parameter("b2", b2)
    f = gc.function([px], [gc.softmax(z, axis=-1), gc.layer_norm(h, (m,))], backend="llvm")
    got, ln = f(x)
    np.testing.assert_allclose(got, _mlp_ref(x, w1, b1, w2, b2), rtol=2e-5, atol=1e-6)
    hh = np.maximum(x.astype(np.float64) @ w1 + b1, 0)
    want = (hh - hh.mean(-1, keepdims=True)) / np.sqrt(hh.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln, want, rtol=1e-4, atol=1e-4)


def test_lenet_training_step(level, threads, rng):
    """Convolution, pooling, their gradients and an SGD step (W8's kernels, small): the gradients against
    finite differences in float64, the float32 step against the float64 graph."""
    n = 3

    def build(dt):
        px = gc.placeholder("x", (n, 1, 12, 12), dt)
        w = gc.parameter("w", (rng.standard_normal((4, 1, 5, 5)) / 5).astype(dt))
        v = gc.parameter("v", (rng.standard_normal((4 * 4 * 4, 5)) / 8).astype(dt))
        y = gc.max_pool2d(gc.relu(gc.conv2d(px, w, padding=0)), 2)
        loss = gc.sum(gc.tanh(gc.reshape(y, (n, 64)) @ v))
        gw, gv = gc.grad(loss, [w, v])
        return px, w, v, loss, gw, gv
    state = rng.bit_generator.state
    px, w, v, loss, gw, gv = build("float64")
    f64 = gc.function([px], [loss, gw, gv], backend="llvm")
    x = rng.standard_normal((n, 1, 12, 12))
    l0, g_w, g_v = f64(x)
    w0 = w.get_value()
    eps, idx = 1e-6, [(0, 0, 0, 0), (3, 0, 4, 2), (1, 0, 2, 3)]
    for i in idx:
        wp = w0.copy()
        wp[i] += eps
        w.set_value(wp)
        up = f64(x)[0]
        wp[i] -= 2 * eps
        w.set_value(wp)
        down = f64(x)[0]
        assert abs((up - down) / (2 * eps) - g_w[i]) < 1e-6 * max(1.0, abs(g_w[i]))
    w.set_value(w0)
    rng.bit_generator.state = state
    qx, w32, v32, _, gw32, gv32 = build("float32")
    step = gc.function([qx], [gw32, gv32], updates=[(w32, w32 - 0.1 * gw32), (v32, v32 - 0.1 * gv32)],
                       backend="llvm")
    a, b = step(x.astype(np.float32))
    np.testing.assert_allclose(a, g_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, g_v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w32.get_value(), w0 - 0.1 * g_w, rtol=1e-4, atol=1e-5)


def test_lstm_and_attention(level, threads, rng):
    """An LSTM's scan (fused gates, the step split over threads) and fused attention at odd sizes."""
    lstm = gc.nn.LSTM(5, 7, seed=3)
    px = gc.placeholder("x", (3, 9, 5), "float32")
    out = lstm(px)
    hseq = out[0] if isinstance(out, (tuple, list)) else out
    f = gc.function([px], hseq, backend="llvm")
    ref = gc.function([px], hseq, backend="numpy")
    x = rng.standard_normal((3, 9, 5)).astype(np.float32)
    np.testing.assert_allclose(f(x), ref(x), rtol=1e-5, atol=1e-5)
    q, k_, v = (rng.standard_normal((2, 3, 17, 9)).astype(np.float32) for _ in range(3))
    pq, pk, pv = (gc.placeholder(nm, (2, 3, 17, 9), "float32") for nm in "qkv")
    a = gc.function([pq, pk, pv], gc.scaled_dot_product_attention(pq, pk, pv), backend="llvm")
    s = np.einsum("bhtd,bhsd->bhts", q.astype(np.float64), k_) / 3.0
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(a(q, k_, v), want, rtol=2e-5, atol=2e-5)
