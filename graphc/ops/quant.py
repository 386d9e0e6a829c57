"""Quantised inference ops: integer products with int32 accumulation and the requantising epilogue.

Primitives (each with its NumPy reference; llvm lowers them in backends/llvm/qgemm.py with an int8 GEMM
on AVX512-VNNI `vpdpbusd` or AVX2 `vpmaddubsw`+`vpmaddwd`; cuda refuses the 8-bit dtypes):

  quantize_linear(x, scale, zero_point)  elementwise: saturate(rint(x / scale) + zero_point), in float32,
                                          rounded half to even; NaN saturates to the top of the range;
                                          output dtype = zero_point's (uint8 / int8)
  matmul_integer(a, b)                    a (..., n, k) @ b (..., k, m) on int8/uint8, exact int32 result
  qlinear_matmul(a, b, offset, mult, bias, relu, out_dtype, out_zero_point)
                                          a (..., n, k) int8/uint8 @ b (k, m) int8/uint8, then per column j
                                            acc = sum_k a*b + offset[j]                 (int32, exact)
                                            r   = float32(acc) * mult[j] + bias[j]       (two float32 roundings)
                                            r   = max(r, 0) if relu
                                            out = r (float32), or saturate(rint(r) + out_zero_point)
                                          (the scale of the output is folded into mult and bias)
  conv_integer(x, w, ...)                 NCHW cross-correlation on int8/uint8, int32 result; padding
                                          reads `pad_value` (the input's zero point)
  qlinear_conv2d(x, w, offset, mult, bias, ...)
                                          conv_integer + the same epilogue per output channel

Compositions (native everywhere by construction): dequantize_linear, the zero-point algebra
(`zero_point_offset`), dynamic_quantize_linear. Quantised ops have no gradient (inference only).
"""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, ShapeError
from ..ir import Op, Trait, apply, register
from .core import as_tensor, cast, constant
from .nn_ops import _conv_out_shape, _tuple, _windows, resolve_padding

QTYPES = ("uint8", "int8")
#: what quantize_linear may produce (ONNX also quantises to 16 bits); the integer products take QTYPES
QUANT_OUT = QTYPES + ("uint16", "int16")
OUT_DTYPES = ("float32", "uint8", "int8")


def qrange(dtype: str) -> tuple[int, int]:
    """(lowest, highest) integer of a quantised dtype."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def saturate_round(r: np.ndarray, zero_point, dtype: str) -> np.ndarray:
    """The requantisation step in float32: saturate(rint(r) + zero_point) as `dtype` (NaN -> the top)."""
    lo, hi = qrange(dtype)
    v = np.rint(np.asarray(r, np.float32)) + np.asarray(zero_point, np.float32)
    return np.fmax(np.fmin(v, np.float32(hi)), np.float32(lo)).astype(dtype)


def _check_q(name, t, what):
    if t.dtype not in QTYPES:
        raise DTypeError(f"{name}: {what} {t.label} must be uint8 or int8, got {t.dtype}")


# ---- quantize_linear: a primitive elementwise op ----------------------------------------------------

@register
class QuantizeLinear(Op):
    """saturate(rint(x / scale) + zero_point); scale and zero_point broadcast against x."""
    traits = Trait.ELEMENTWISE | Trait.FRESH
    name = "quantize_linear"
    differentiable = False

    def infer(self, inputs):
        x, s, z = inputs
        if not _dt.is_float(x.dtype) or not _dt.is_float(s.dtype):
            raise DTypeError(f"quantize_linear: x and scale must be float, got {x.dtype} and {s.dtype}")
        if z.dtype not in QUANT_OUT:
            raise DTypeError(f"quantize_linear: zero_point {z.label} must be one of {', '.join(QUANT_OUT)}, got {z.dtype}")
        shape = _sh.broadcast_shapes(x.shape, s.shape, z.shape, op="quantize_linear")
        if tuple(shape) != tuple(x.shape):
            raise ShapeError(f"quantize_linear: scale {s.shape} and zero_point {z.shape} must broadcast to x "
                             f"{x.shape}")
        return [(x.shape, z.dtype)]

    def impl(self, x, s, z):
        ct = np.float64 if np.asarray(x).dtype == np.float64 or np.asarray(s).dtype == np.float64 else np.float32
        q = np.asarray(x, ct) / np.asarray(s, ct)
        lo, hi = qrange(z.dtype.name)
        v = np.rint(q) + np.asarray(z, ct)
        return np.fmax(np.fmin(v, ct(hi)), ct(lo)).astype(z.dtype)


def _axis_shape(ndim: int, axis: int | None, n: int) -> tuple:
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis % ndim] = n
    return tuple(shape)


def _per_axis(v, x, axis, dtype=None):
    """A scale or zero point (scalar or 1-D along `axis` of x) shaped to broadcast against x."""
    v = as_tensor(v) if dtype is None else cast(as_tensor(v), dtype)
    if v.ndim == 0 or axis is None:
        return v
    if v.ndim != 1:
        raise ShapeError(f"quantisation parameters must be scalars or 1-D along the axis, got shape {v.shape}")
    return F.reshape(v, _axis_shape(x.ndim, axis, v.shape[0]))


def quantize_linear(x, scale, zero_point=None, axis: int | None = None, dtype: str = "uint8"):
    """Quantise floats to uint8/int8: saturate(rint(x / scale) + zero_point) (ONNX QuantizeLinear; rint
    rounds half to even). `scale`/`zero_point` are scalars, or 1-D along `axis` (per-channel); a missing
    zero_point is 0 of `dtype`."""
    x = as_tensor(x)
    if zero_point is None:
        zero_point = constant(np.zeros((), dtype))
    z = as_tensor(zero_point)
    if z.dtype not in QUANT_OUT:   # a Python int zero point: in the requested dtype
        z = constant(np.asarray(constant_or(z), dtype))
    s = _per_axis(scale, x, axis)
    if not _dt.is_float(s.dtype):
        raise DTypeError(f"quantize_linear: scale must be float, got {s.dtype}")
    if s.dtype != x.dtype and _dt.is_float(x.dtype):
        s = cast(s, _dt.promote(x.dtype, s.dtype) if x.dtype == "float64" else "float32")
    if _dt.is_half(x.dtype):
        x = cast(x, "float32")
    return apply(QuantizeLinear, x, s, _per_axis(z, x, axis))


def constant_or(t):
    from ..ir import constant_value
    v = constant_value(t)
    if v is None:
        raise DTypeError("quantize_linear: an integer zero point must be uint8/int8 or a constant")
    return v


def dequantize_linear(x, scale, zero_point=None, axis: int | None = None, dtype: str = "float32"):
    """(x - zero_point) * scale as floats (ONNX DequantizeLinear): the subtraction is exact in int32."""
    x = as_tensor(x)
    d = cast(x, "int32")
    if zero_point is not None:
        d = d - _per_axis(zero_point, x, axis, "int32")
    return cast(d, dtype) * _per_axis(scale, x, axis, dtype)


def dynamic_quantize_linear(x):
    """ONNX DynamicQuantizeLinear: (y uint8, y_scale, y_zero_point) with the range of x widened to
    include 0: scale = (max(x, 0) - min(x, 0)) / 255, zero_point = saturate(rint(-min / scale))."""
    x = cast(as_tensor(x), "float32")
    lo = F.minimum(F.min(x), 0.0)
    hi = F.maximum(F.max(x), 0.0)
    scale = (hi - lo) / 255.0
    safe = F.where(F.equal(scale, 0.0), F.ones_like(scale), scale)
    zp = apply(QuantizeLinear, -lo, safe, constant(np.zeros((), "uint8")))
    y = apply(QuantizeLinear, x, safe, zp)
    return y, scale, zp


# ---- integer products ------------------------------------------------------------------------------

def _int_matmul(a, b):
    return np.matmul(np.asarray(a, np.int32), np.asarray(b, np.int32))


@register
class MatMulInteger(Op):
    """a @ b on int8/uint8 operands, exact int32 result (batch dims broadcast as matmul's)."""
    traits = Trait.CONTRACTION | Trait.FRESH
    name = "matmul_integer"
    differentiable = False

    def infer(self, inputs):
        a, b = inputs
        _check_q("matmul_integer", a, "a")
        _check_q("matmul_integer", b, "b")
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeError("matmul_integer needs rank >= 2 operands")
        if not _sh.dims_equal(a.shape[-1], b.shape[-2]):
            raise ShapeError(f"matmul_integer: contraction dims differ: {_sh.fmt_shape(a.shape)} @ "
                             f"{_sh.fmt_shape(b.shape)}")
        batch = _sh.broadcast_shapes(a.shape[:-2], b.shape[:-2], op="matmul_integer")
        return [(batch + (a.shape[-2], b.shape[-1]), "int32")]

    def impl(self, a, b):
        return _int_matmul(a, b)


def _epilogue_ref(acc, offset, mult, bias, relu, out_dtype, out_zero_point, axis):
    """The requantising epilogue on an int32 accumulator (per-channel vectors along `axis`)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    acc = acc + np.asarray(offset, np.int32).reshape(shape)
    r = acc.astype(np.float32) * np.asarray(mult, np.float32).reshape(shape)
    r = r + np.asarray(bias, np.float32).reshape(shape)
    if relu:
        r = np.maximum(r, np.float32(0))
    if out_dtype == "float32":
        return r
    return saturate_round(r, out_zero_point, out_dtype)


def _check_epilogue(name, inputs, m, relu, out_dtype, out_zero_point):
    offset, mult, bias = inputs
    if offset.dtype != "int32" or mult.dtype != "float32" or bias.dtype != "float32":
        raise DTypeError(f"{name}: offset must be int32 and mult, bias float32, got {offset.dtype}, {mult.dtype}, "
                         f"{bias.dtype}")
    for t in inputs:
        if t.ndim != 1 or not _sh.dims_equal(t.shape[0], m):
            raise ShapeError(f"{name}: offset, mult and bias must be ({m},), got {_sh.fmt_shape(t.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise DTypeError(f"{name}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    if not isinstance(relu, bool) or not isinstance(out_zero_point, int):
        raise DTypeError(f"{name}: relu must be a bool and out_zero_point an int")
    if out_dtype != "float32":
        lo, hi = qrange(out_dtype)
        if not lo <= out_zero_point <= hi:
            raise DTypeError(f"{name}: out_zero_point {out_zero_point} is outside {out_dtype}")


@register
class QLinearMatMul(Op):
    """a (..., n, k) @ b (k, m) on int8/uint8 with the requantising epilogue per column (module docstring)."""
    traits = Trait.CONTRACTION | Trait.FRESH
    name = "qlinear_matmul"
    differentiable = False

    def infer(self, inputs, relu, out_dtype, out_zero_point):
        a, b = inputs[:2]
        _check_q("qlinear_matmul", a, "a")
        _check_q("qlinear_matmul", b, "b")
        if a.ndim < 2 or b.ndim != 2:
            raise ShapeError(f"qlinear_matmul needs a (..., n, k) and b (k, m), got {_sh.fmt_shape(a.shape)} and "
                             f"{_sh.fmt_shape(b.shape)}")
        if not _sh.dims_equal(a.shape[-1], b.shape[0]):
            raise ShapeError(f"qlinear_matmul: contraction dims differ: {_sh.fmt_shape(a.shape)} @ "
                             f"{_sh.fmt_shape(b.shape)}")
        _check_epilogue("qlinear_matmul", inputs[2:], b.shape[1], relu, out_dtype, out_zero_point)
        return [(tuple(a.shape[:-1]) + (b.shape[1],), out_dtype)]

    def impl(self, a, b, offset, mult, bias, relu, out_dtype, out_zero_point):
        return _epilogue_ref(_int_matmul(a, b), offset, mult, bias, relu, out_dtype, out_zero_point, -1)


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    """(a - a_zero_point) @ (b - b_zero_point) on int8/uint8 as int32 (ONNX MatMulInteger): one exact
    integer product, the zero points applied as int32 corrections (row and column sums).
    b_zero_point may be per column (1-D of length m)."""
    a, b = as_tensor(a), as_tensor(b)
    acc = apply(MatMulInteger, a, b) if a.ndim >= 2 and b.ndim >= 2 else None
    if acc is None:
        a2 = F.expand_dims(a, 0) if a.ndim == 1 else a
        b2 = F.expand_dims(b, -1) if b.ndim == 1 else b
        out = matmul_integer(a2, b2, a_zero_point, b_zero_point)
        out = F.squeeze(out, -2) if a.ndim == 1 else out
        return F.squeeze(out, -1) if b.ndim == 1 else out
    k = a.shape[-1]
    if a_zero_point is not None:
        za = cast(as_tensor(a_zero_point), "int32")
        acc = acc - za * cast(F.sum(cast(b, "int32"), axis=-2, keepdims=True), "int32")
    if b_zero_point is not None:
        zb = cast(as_tensor(b_zero_point), "int32")
        acc = acc - cast(F.sum(cast(a, "int32"), axis=-1, keepdims=True), "int32") * zb
        if a_zero_point is not None:
            acc = acc + za * zb * k
    return acc


def qlinear_matmul(a, b, offset, mult, bias, relu: bool = False, out_dtype: str = "float32",
                   out_zero_point: int = 0):
    """The requantising integer GEMM (module docstring); `offset` (m,) int32, `mult`, `bias` (m,) float32."""
    return apply(QLinearMatMul, as_tensor(a), as_tensor(b), cast(as_tensor(offset), "int32"),
                 cast(as_tensor(mult), "float32"), cast(as_tensor(bias), "float32"), relu=bool(relu),
                 out_dtype=out_dtype, out_zero_point=int(out_zero_point))


# ---- integer convolution ----------------------------------------------------------------------------

def conv_integer_ref(x, w, stride, pads, dilation, groups, pad_value):
    """int32 NCHW cross-correlation of int8/uint8 x and w, padding read as pad_value."""
    xp = np.pad(np.asarray(x), ((0, 0), (0, 0)) + tuple(pads), constant_values=pad_value)
    kh, kw = w.shape[2:]
    ohw = [(xp.shape[2 + i] - dilation[i] * ((kh, kw)[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    win = _windows(xp, ohw, (kh, kw), stride, dilation)      # N C OH OW KH KW
    n, c = x.shape[:2]
    o = w.shape[0]
    cg, og = c // groups, o // groups
    outs = []
    for g in range(groups):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n * ohw[0] * ohw[1], -1)
        wm = np.asarray(w[g * og:(g + 1) * og], np.int32).reshape(og, -1)
        outs.append((cols.astype(np.int32) @ wm.T).reshape(n, ohw[0], ohw[1], og).transpose(0, 3, 1, 2))
    return np.ascontiguousarray(np.concatenate(outs, axis=1))


def _conv_infer(name, x, w, stride, pads, dilation, groups, pad_value):
    _check_q(name, x, "x")
    _check_q(name, w, "w")
    if x.ndim != 4 or w.ndim != 4:
        raise ShapeError(f"{name}: x must be (N, C, H, W) and w (O, C/groups, KH, KW), got {_sh.fmt_shape(x.shape)} "
                         f"and {_sh.fmt_shape(w.shape)}")
    if not _sh.is_static(w.shape) or not isinstance(x.shape[1], int):
        raise ShapeError(f"{name}: channels and kernel sizes must be static")
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ShapeError(f"{name}: input has {x.shape[1]} channels, weight expects {w.shape[1]} x groups {groups}")
    lo, hi = qrange(x.dtype)
    if not isinstance(pad_value, int) or not lo <= pad_value <= hi:
        raise DTypeError(f"{name}: pad_value must be an int in {x.dtype}'s range, got {pad_value!r}")
    return _conv_out_shape(x.shape, w.shape[2:], w.shape[0], stride, pads, dilation)


@register
class ConvInteger(Op):
    """int32 NCHW cross-correlation of int8/uint8 tensors (padding reads attrs pad_value)."""
    traits = Trait.CONTRACTION | Trait.FRESH
    name = "conv_integer"
    differentiable = False

    def infer(self, inputs, stride, pads, dilation, groups, pad_value):
        return [(_conv_infer("conv_integer", *inputs, stride, pads, dilation, groups, pad_value), "int32")]

    def impl(self, x, w, stride, pads, dilation, groups, pad_value):
        return conv_integer_ref(x, w, stride, pads, dilation, groups, pad_value)


@register
class QLinearConv2d(Op):
    """conv_integer followed by the requantising epilogue per output channel."""
    traits = Trait.CONTRACTION | Trait.FRESH
    name = "qlinear_conv2d"
    differentiable = False

    def infer(self, inputs, stride, pads, dilation, groups, pad_value, relu, out_dtype, out_zero_point):
        x, w = inputs[:2]
        shape = _conv_infer("qlinear_conv2d", x, w, stride, pads, dilation, groups, pad_value)
        _check_epilogue("qlinear_conv2d", inputs[2:], w.shape[0], relu, out_dtype, out_zero_point)
        return [(shape, out_dtype)]

    def impl(self, x, w, offset, mult, bias, stride, pads, dilation, groups, pad_value, relu, out_dtype,
             out_zero_point):
        acc = conv_integer_ref(x, w, stride, pads, dilation, groups, pad_value)
        return _epilogue_ref(acc, offset, mult, bias, relu, out_dtype, out_zero_point, 1)


def _conv_attrs(x, w, stride, padding, dilation):
    stride, dilation = _tuple(stride, 2, "stride"), _tuple(dilation, 2, "dilation")
    pads = resolve_padding(padding, x.shape[2:], tuple(w.shape[2:]), stride, dilation)
    return dict(stride=stride, pads=pads, dilation=dilation)


def conv_integer(x, w, x_zero_point=None, w_zero_point=None, stride=1, padding=0, dilation=1, groups: int = 1):
    """sum (x - x_zero_point) * (w - w_zero_point) over NCHW windows as int32 (ONNX ConvInteger); padding
    counts as x_zero_point (contributes 0). x_zero_point must be a constant scalar; w_zero_point a scalar
    or per output channel."""
    from ..ir import constant_value
    x, w = as_tensor(x), as_tensor(w)
    zx = 0
    if x_zero_point is not None:
        v = constant_value(as_tensor(x_zero_point))
        if v is None or np.asarray(v).size != 1:
            raise DTypeError("conv_integer: x_zero_point must be a constant scalar")
        zx = int(np.asarray(v).reshape(-1)[0])
    attrs = _conv_attrs(x, w, stride, padding, dilation)
    acc = apply(ConvInteger, x, w, groups=int(groups), pad_value=zx, **attrs)
    if zx:
        acc = acc - zx * F.reshape(cast(F.sum(cast(w, "int32"), axis=(1, 2, 3)), "int32"), (1, -1, 1, 1))
    if w_zero_point is not None:
        if groups != 1:
            raise ShapeError("conv_integer: a weight zero point needs groups=1")
        zw = cast(as_tensor(w_zero_point), "int32")
        zw = F.reshape(zw, (1, -1, 1, 1)) if zw.ndim == 1 else zw
        # the window sums of (x - zx): x against one all-ones filter, minus zx * the window size
        ones = constant(np.ones((1,) + tuple(w.shape[1:]), "int8"))
        wsum = apply(ConvInteger, x, ones, groups=1, pad_value=zx, **attrs) - zx * int(np.prod(w.shape[1:]))
        acc = acc - wsum * zw
    return acc


def qlinear_conv2d(x, w, offset, mult, bias, stride=1, padding=0, dilation=1, groups: int = 1,
                   pad_value: int = 0, relu: bool = False, out_dtype: str = "float32", out_zero_point: int = 0):
    """conv_integer (padding reads pad_value) + the requantising epilogue per output channel."""
    x, w = as_tensor(x), as_tensor(w)
    return apply(QLinearConv2d, x, w, cast(as_tensor(offset), "int32"), cast(as_tensor(mult), "float32"),
                 cast(as_tensor(bias), "float32"), groups=int(groups), pad_value=int(pad_value), relu=bool(relu),
                 out_dtype=out_dtype, out_zero_point=int(out_zero_point), **_conv_attrs(x, w, stride, padding,
                                                                                      dilation))


def quantize_weights(w: np.ndarray, axis: int = 0, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 quantisation of float weights along `axis` (the output channels):
    (int8 weights, float32 scales) with w ~ q * scale; `bits=7` keeps |q| <= 63 (no vpmaddubsw
    saturation on AVX2 hosts)."""
    w = np.asarray(w, np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.max(np.abs(w), axis=other) if other else np.abs(w)
    qmax = (1 << (bits - 1)) - 1
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale
