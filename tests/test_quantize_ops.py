"""Quantised-inference ops (graphc/ops/quant.py) against independent NumPy integer references, on numpy
and llvm (the int8 GEMM of backends/llvm/qgemm.py: bit-exact), its VNNI flavour at the assembly level,
and cuda's refusal."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ops import quant as Q

BACKENDS = ("numpy", "llvm")


def _ints(rng, dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    return rng.integers(info.min if lo is None else lo, (info.max if hi is None else hi) + 1, shape).astype(dtype)


def _quantize_ref(x, scale, zp, dtype):
    """ONNX QuantizeLinear in float32, round half to even; NaN saturates high (np.fmin/np.fmax)."""
    info = np.iinfo(dtype)
    v = np.rint(np.float32(x) / np.float32(scale)) + np.float32(zp)
    return np.fmax(np.fmin(v, np.float32(info.max)), np.float32(info.min)).astype(dtype)


def _epilogue(acc, offset, mult, bias, relu, out_dtype, zp, axis):
    shape = [1] * acc.ndim
    shape[axis] = -1
    r = (acc + offset.reshape(shape)).astype(np.float32) * mult.reshape(shape) + bias.reshape(shape)
    if relu:
        r = np.where(r < 0, np.float32(0), r)
    if out_dtype == "float32":
        return r
    info = np.iinfo(out_dtype)
    return np.clip(np.rint(r) + np.float32(zp), info.min, info.max).astype(out_dtype)


# ---- integer GEMM ---------------------------------------------------------------------------------------

CASES = [  # a dtype, b dtype, n, k, m, b constant?, weight limit (64: AVX2's vpmaddubsw path)
    ("uint8", "int8", 5, 13, 19, True, None), ("uint8", "int8", 9, 64, 40, True, 64),
    ("int8", "int8", 7, 16, 17, False, None), ("uint8", "uint8", 3, 9, 40, True, None),
    ("int8", "uint8", 13, 33, 5, False, None), ("uint8", "int8", 6, 3, 1, False, 64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adt,bdt,n,k,m,const,lim", CASES)
def test_matmul_integer_is_exact(backend, adt, bdt, n, k, m, const, lim):
    rng = np.random.default_rng(n * k + m)
    bv = _ints(rng, bdt, (k, m), *((-lim, lim) if lim else ()))
    a = gc.placeholder("a", (None, k), adt)
    b = gc.constant(bv) if const else gc.parameter("b", bv)
    f = gc.function([a], gc.matmul_integer(a, b), backend=backend)
    A = _ints(rng, adt, (n, k))
    got = f(A)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, A.astype(np.int64) @ bv.astype(np.int64))
    if backend == "llvm":
        assert not f.program.info["fallback_ops"]
        if not const:   # a parameter is packed each call: a new value is used at once
            b.set_value(_ints(rng, bdt, (k, m)))
            np.testing.assert_array_equal(f(A), A.astype(np.int64) @ b.value.astype(np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_integer_zero_points_and_batch(backend):
    rng = np.random.default_rng(3)
    A, B = _ints(rng, "uint8", (2, 3, 4, 10)), _ints(rng, "uint8", (10, 6))
    za, zb = np.uint8(7), _ints(rng, "uint8", (6,))
    a = gc.placeholder("a", (None, 3, 4, 10), "uint8")
    f = gc.function([a], gc.matmul_integer(a, B, za, zb), backend=backend)
    ref = (A.astype(np.int64) - 7) @ (B.astype(np.int64) - zb.astype(np.int64))
    np.testing.assert_array_equal(f(A), ref)


def test_split_across_threads_is_exact(monkeypatch):
    """Column panels split over threads (GRAPHC_QGEMM_PARALLEL_FLOPS), tail panel included."""
    monkeypatch.setenv("GRAPHC_QGEMM_PARALLEL_FLOPS", "1000")
    rng = np.random.default_rng(6)
    A, B = _ints(rng, "uint8", (9, 40)), _ints(rng, "int8", (40, 75), -64, 64)
    a = gc.placeholder("a", (None, 40), "uint8")
    f = gc.function([a], gc.matmul_integer(a, gc.constant(B)), backend="llvm")
    np.testing.assert_array_equal(f(A), A.astype(np.int64) @ B.astype(np.int64))


def test_kernels_pass_the_bounds_sanitizer():
    """sanitize="bounds" checks every access of the pack, GEMM and convolution kernels."""
    rng = np.random.default_rng(9)
    X, W, B = _ints(rng, "uint8", (2, 3, 6, 6)), _ints(rng, "int8", (4, 3, 3, 3)), _ints(rng, "int8", (64, 7))
    x = gc.placeholder("x", (None, 3, 6, 6), "uint8")
    h = gc.conv_integer(x, gc.constant(W), padding=1)                       # (N, 4, 6, 6) int32
    y = gc.matmul_integer(x[:, 0].reshape((-1, 36))[:, :36], gc.parameter("b", B[:36]))
    f = gc.function([x], [h, y], backend="llvm", sanitize="bounds")
    got_h, got_y = f(X)
    np.testing.assert_array_equal(got_h, _conv_ref(X, W, 1, 1, 0))
    np.testing.assert_array_equal(got_y, X[:, 0].reshape(-1, 36).astype(np.int64) @ B[:36].astype(np.int64))


def test_generic_flavour_is_exact(monkeypatch):
    """The portable flavour (no x86 intrinsics) on every dtype pair, forced by GRAPHC_QGEMM_ISA."""
    monkeypatch.setenv("GRAPHC_QGEMM_ISA", "generic")
    rng = np.random.default_rng(5)
    for adt, bdt in (("uint8", "int8"), ("int8", "uint8")):
        A, B = _ints(rng, adt, (7, 21)), _ints(rng, bdt, (21, 18))
        a = gc.placeholder("a", (None, 21), adt)
        f = gc.function([a], gc.matmul_integer(a, gc.parameter("b", B)), backend="llvm")
        np.testing.assert_array_equal(f(A), A.astype(np.int64) @ B.astype(np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adt,out_dtype,relu,lim", [("uint8", "uint8", True, 64), ("int8", "int8", False, None),
                                                    ("uint8", "float32", True, None), ("int8", "uint8", True, 64)])
def test_qlinear_matmul_epilogue_is_exact(backend, adt, out_dtype, relu, lim):
    rng = np.random.default_rng(11)
    n, k, m = 11, 37, 21
    bv = _ints(rng, "int8", (k, m), *((-lim, lim) if lim else ()))
    off = rng.integers(-5000, 5000, m).astype(np.int32)
    mult = (rng.random(m) * 0.01).astype(np.float32)
    bias = (rng.standard_normal(m) * 3).astype(np.float32)
    zp = 0 if out_dtype == "float32" else 7
    a = gc.placeholder("a", (None, k), adt)
    y = gc.qlinear_matmul(a, gc.constant(bv), off, mult, bias, relu=relu, out_dtype=out_dtype, out_zero_point=zp)
    A = _ints(rng, adt, (n, k))
    ref = _epilogue(A.astype(np.int32) @ bv.astype(np.int32), off, mult, bias, relu, out_dtype, zp, -1)
    got = gc.function([a], y, backend=backend)(A)
    assert got.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(got, ref)


# ---- integer convolution ----------------------------------------------------------------------------------

def _conv_ref(x, w, stride, pad, pad_value):
    """Direct loops over output positions in int64 (independent of the im2col references)."""
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=pad_value)
    n, c, h, wd = xp.shape
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.einsum("nckl,ockl->no", win, w.astype(np.int64))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt,wdt,pad,stride,zx", [("uint8", "int8", 1, 1, 3), ("int8", "int8", 0, 2, -5),
                                                   ("uint8", "uint8", 2, 1, 0)])
def test_integer_convolutions_are_exact(backend, xdt, wdt, pad, stride, zx):
    rng = np.random.default_rng(pad + stride)
    X, W = _ints(rng, xdt, (2, 3, 9, 8)), _ints(rng, wdt, (5, 3, 3, 3))
    off = rng.integers(-500, 500, 5).astype(np.int32)
    mult = (rng.random(5) * 0.01).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    x = gc.placeholder("x", (None, 3, 9, 8), xdt)
    raw = gc.conv_integer(x, gc.constant(W), np.asarray(zx, xdt), stride=stride, padding=pad)
    q = gc.qlinear_conv2d(x, gc.constant(W), off, mult, bias, stride=stride, padding=pad, pad_value=zx, relu=True,
                          out_dtype="uint8", out_zero_point=2)
    f = gc.function([x], [raw, q], backend=backend)
    got_raw, got_q = f(X)
    acc = _conv_ref(X, W, stride, pad, zx)
    np.testing.assert_array_equal(got_raw, acc - zx * W.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1))
    np.testing.assert_array_equal(got_q, _epilogue(acc.astype(np.int32), off, mult, bias, True, "uint8", 2, 1))
    if backend == "llvm":
        assert not f.program.info["fallback_ops"]


@pytest.mark.parametrize("xdt", ["uint8", "int8"])
def test_convolution_with_seven_bit_weights_takes_the_fast_path_exactly(xdt):
    """|w| <= 64: AVX2's vpmaddubsw cannot saturate, so the kernel uses it (the flag in the pack)."""
    from graphc.backends.llvm import qgemm
    rng = np.random.default_rng(21)
    X, W = _ints(rng, xdt, (3, 4, 7, 7)), _ints(rng, "int8", (6, 4, 3, 3), -64, 64)
    assert qgemm.pack_rows(W.reshape(6, -1), 0)[-1] == 1
    x = gc.placeholder("x", (None, 4, 7, 7), xdt)
    f = gc.function([x], gc.conv_integer(x, gc.constant(W), padding=1), backend="llvm")
    np.testing.assert_array_equal(f(X), _conv_ref(X, W, 1, 1, 0))


def test_conv_integer_weight_zero_point():
    rng = np.random.default_rng(8)
    X, W = _ints(rng, "uint8", (1, 2, 5, 5)), _ints(rng, "uint8", (3, 2, 2, 2))
    x = gc.placeholder("x", (None, 2, 5, 5), "uint8")
    f = gc.function([x], gc.conv_integer(x, W, np.uint8(9), np.uint8(100), padding=1), backend="llvm")
    ref = _conv_ref(X.astype(np.int64) - 9, W.astype(np.int64) - 100, 1, 1, 0)
    np.testing.assert_array_equal(f(X), ref)


# ---- quantize / dequantize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_quantize_linear_rounds_half_even_and_saturates_in_a_fused_loop(backend, dtype):
    rng = np.random.default_rng(2)
    X = np.concatenate([rng.standard_normal((40, 6)) * 2,
                        [[0.01, 0.03, -0.05, np.nan, 1e9, -1e9], [0.25, 0.75, -0.25, 2.5, 0.0, -0.0]]]).astype(np.float32)
    x = gc.placeholder("x", (None, 6))
    f = gc.function([x], gc.quantize_linear(x * 2.0, np.float32(0.02), np.asarray(3, dtype)), backend=backend)
    np.testing.assert_array_equal(f(X), _quantize_ref(X * np.float32(2), 0.02, 3, dtype))
    if backend == "llvm":   # an elementwise op like the others: fused with its producer
        assert any("quantize_linear" in name and "mul" in name for name in f.graph.op_names())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_channel_quantize_and_dequantize(backend):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((3, 4, 5)).astype(np.float32)
    s = np.array([0.01, 0.02, 0.05, 0.1], np.float32)
    z = np.array([0, 10, 128, 255], np.uint8)
    x = gc.placeholder("x", (None, 4, 5))
    q = gc.quantize_linear(x, s, z, axis=1)
    d = gc.dequantize_linear(q, s, z, axis=1)
    got_q, got_d = gc.function([x], [q, d], backend=backend)(X)
    ref_q = _quantize_ref(X, s.reshape(1, 4, 1), z.reshape(1, 4, 1), "uint8")
    np.testing.assert_array_equal(got_q, ref_q)
    np.testing.assert_array_equal(got_d, (ref_q.astype(np.int32) - z.reshape(1, 4, 1)).astype(np.float32)
                                  * s.reshape(1, 4, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_quantize_linear(backend):
    X = np.array([[-1.5, 0.0, 2.25], [3.0, -0.25, 1.0]], np.float32)
    x = gc.placeholder("x", (2, 3))
    y, s, z = gc.function([x], list(gc.dynamic_quantize_linear(x)), backend=backend)(X)
    scale = np.float32((3.0 + 1.5) / 255)
    zp = np.uint8(np.rint(1.5 / scale))
    assert s == scale and z == zp
    np.testing.assert_array_equal(y, _quantize_ref(X, scale, zp, "uint8"))


def test_quantize_weights_per_channel():
    w = np.array([[0.5, -2.0], [0.25, 1.0], [-0.5, 0.0]], np.float32)   # (k=3, m=2): channels are columns
    q, s = Q.quantize_weights(w, axis=1)
    np.testing.assert_allclose(s, [0.5 / 127, 2.0 / 127])
    np.testing.assert_array_equal(q[:, 0], [127, 64, -127])
    q7, _ = Q.quantize_weights(w, axis=1, bits=7)
    assert np.abs(q7).max() == 63


def test_bad_calls_raise_graphc_errors():
    a = gc.placeholder("a", (None, 4), "float32")
    with pytest.raises(gc.DTypeError, match="must be uint8 or int8"):
        gc.matmul_integer(a, np.zeros((4, 2), np.int8))
    q = gc.placeholder("q", (None, 4), "uint8")
    with pytest.raises(gc.ShapeError, match="offset, mult and bias"):
        gc.qlinear_matmul(q, np.zeros((4, 2), np.int8), np.zeros(3, np.int32), np.ones(2, np.float32),
                          np.zeros(2, np.float32))
    with pytest.raises(gc.DTypeError, match="out_zero_point"):
        gc.qlinear_matmul(q, np.zeros((4, 2), np.int8), np.zeros(2, np.int32), np.ones(2, np.float32),
                          np.zeros(2, np.float32), out_dtype="int8", out_zero_point=200)


# ---- VNNI at the assembly level; cuda's refusal ---------------------------------------------------------------

@pytest.mark.parametrize("flavour,insn", [("vnni512", "vpdpbusd"), ("vnni256", "vpdpbusd"),
                                          ("avx2", "vpmaddubsw")])
def test_each_flavour_compiles_to_its_instruction(flavour, insn):
    """Compile only, for a CPU that has the features (the VNNI kernel is never run on a host without them)."""
    from graphc.backends.llvm import qgemm
    vnni = flavour.startswith("vnni")
    asm = qgemm.assembly(flavour, 12, 64, 70, cpu="icelake-server" if vnni else "znver2",
                         features="+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2" if vnni else "+avx2,+fma")
    ops = [ln.split()[0] for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".", "#"))]
    lanes, nv, mr = qgemm.ISAS[flavour]
    assert ops.count(insn) >= nv * mr   # the unrolled tile: one per accumulator at least
    if vnni:
        assert "vpmaddubsw" not in ops and ("zmm" in asm) == (flavour == "vnni512")
    else:
        assert "vpmaddwd" in ops and "vpdpbusd" not in ops


def test_host_flavour_matches_cpu_features():
    from graphc.backends.llvm import jit, qgemm
    f = jit.cpu_features()
    expect = "vnni512" if "+avx512vnni" in f and "+avx512bw" in f else "vnni256" if "+avxvnni" in f else \
        "avx2" if "+avx2" in f else "generic"
    assert qgemm.isa() == expect


def test_cuda_refuses_the_integer_dtypes():
    from graphc.backends.cuda.lower import lower
    q = gc.placeholder("q", (None, 4), "uint8")
    y = gc.matmul_integer(q, np.zeros((4, 2), np.int8))
    with pytest.raises(gc.DTypeError, match="cuda"):
        lower(gc.Graph([q], [y]))


@pytest.mark.parametrize("zd", ["uint8", "int8", "int16", "uint16"])
@pytest.mark.parametrize("xd", ["float32", "float64"])
def test_quantize_linear_on_cuda_emulated_matches_numpy_bit_for_bit(zd, xd):
    """quantize_linear is a pointwise C spelling on cuda (fused, no host step); ties round to even."""
    backend_or_skip_cuda = pytest.importorskip("graphc.backends.cuda_emulated")  # noqa: F841
    from graphc.ops import quant as Q
    rng = np.random.default_rng(1)
    x = gc.placeholder("x", (5, 7), xd)
    sv = np.asarray(rng.uniform(0.01, 0.1, 7), xd)
    y = Q.quantize_linear(x * 1.5, gc.constant(sv), gc.constant(np.asarray(rng.integers(0, 5, 7), zd)))
    xv = (rng.normal(size=(5, 7)) * 20).astype(xd)
    xv[0, :3] = np.array([0.5, 1.5, 2.5], xd) * sv[:3] / np.asarray(1.5, xd)   # ties
    want = gc.function([x], y, backend="numpy")(xv)
    f = gc.function([x], y, backend="cuda-emulated")
    got = f(xv)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert f.program.info["fallback_ops"] == []
