"""ONNX quantisation converters: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger,
ConvInteger, QLinearMatMul, QLinearConv, onto graphc/ops/quant.py (the int8 GEMM on llvm).

QDQ models (QuantizeLinear -> DequantizeLinear -> float MatMul/Conv) import as the float graph between
quantise/dequantise pairs (exactly ONNX's semantics); QOperator models (QLinearMatMul/QLinearConv) map to
one `qlinear_matmul` / `qlinear_conv2d` each when the weight is a constant with zero point 0 (the
requantisation in the GEMM's epilogue), else to the exact integer product followed by the float
requantisation. Scales and zero points must be constants (initialisers).
"""
from __future__ import annotations

import numpy as np

import graphc as gc
from graphc.ir import constant_value
from graphc.ops import quant as Q
from .onnx_nn_ops import _window_geometry
from .onnx_ops import op


def _qdtype(cx, z, default="uint8", allowed=Q.QTYPES) -> str:
    if z is None:
        return default
    if z.dtype not in allowed:
        raise cx.unsupported(f"zero point of dtype {z.dtype} (graphc quantises to uint8/int8)")
    return z.dtype


def _axis_of(cx, scale_value, x, a) -> int | None:
    """None for a per-tensor scale, else the (normalised) axis of a per-axis one."""
    if np.asarray(scale_value).size <= 1 and np.asarray(scale_value).ndim <= 1:
        return None
    if a.get("block_size", 0):
        raise cx.unsupported("blocked quantisation (block_size)")
    return a.get("axis", 1) % x.ndim


def _scalar_or_vector(v):
    v = np.asarray(v)
    return v.reshape(()) if v.size == 1 else v.reshape(-1)


def _computed_scalar(t) -> bool:
    """A per-tensor scale or zero point computed in the graph (DynamicQuantizeLinear written out)."""
    return t is not None and constant_value(t) is None and t.node.op.name != "parameter" and \
        all(d == 1 for d in t.shape)


@op("QuantizeLinear")
def _quantize_linear(cx, ins, a):
    x, s = ins[0], ins[1]
    z = ins[2] if len(ins) > 2 else None
    dtype = _qdtype(cx, z, {3: "int8", 2: "uint8", 4: "uint16", 5: "int16"}.get(a.get("output_dtype", 2), "?"),
                    Q.QUANT_OUT)
    if dtype == "?":
        raise cx.unsupported(f"output_dtype {a.get('output_dtype')}")
    if a.get("block_size", 0):
        raise cx.unsupported("blocked quantisation (block_size)")
    if _computed_scalar(s) and (z is None or _computed_scalar(z) or constant_value(z) is not None):
        zt = gc.constant(np.zeros((), dtype)) if z is None else gc.reshape(z, ())
        return gc.quantize_linear(x, gc.reshape(s, ()), zt)
    sv = cx.const(s, "y_scale")
    axis = _axis_of(cx, sv, x, a)
    zv = np.zeros(np.asarray(sv).shape, dtype) if z is None else cx.const(z, "y_zero_point")
    return gc.quantize_linear(x, _scalar_or_vector(sv).astype(sv.dtype), _scalar_or_vector(zv).astype(dtype), axis=axis)


@op("DequantizeLinear")
def _dequantize_linear(cx, ins, a):
    x, s = ins[0], ins[1]
    z = ins[2] if len(ins) > 2 else None
    if x.dtype not in Q.QUANT_OUT + ("int32",):
        raise cx.unsupported(f"DequantizeLinear of {x.dtype}")
    sv = cx.const(s, "x_scale")
    axis = _axis_of(cx, sv, x, a)
    zv = None if z is None else _scalar_or_vector(cx.const(z, "x_zero_point"))
    _record_dequantized(cx, x, sv, zv, axis)
    y = gc.dequantize_linear(x, _scalar_or_vector(sv).astype(np.float32), zv, axis=axis)
    return y if s.dtype == "float32" else gc.cast(y, s.dtype)


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(cx, ins, a):
    return gc.dynamic_quantize_linear(ins[0])


def _zero(v) -> bool:
    return v is None or not np.any(np.asarray(v))


def _opt(cx, ins, i, what):
    return None if len(ins) <= i or ins[i] is None else cx.const(ins[i], what)


@op("MatMulInteger")
def _matmul_integer(cx, ins, a):
    za, zb = _opt(cx, ins, 2, "a_zero_point"), _opt(cx, ins, 3, "b_zero_point")
    if za is not None and za.size > 1:
        za = za.reshape(-1, 1)   # per row of A
    return gc.matmul_integer(ins[0], ins[1], None if _zero(za) else za, None if _zero(zb) else _scalar_or_vector(zb))


def _requantise(acc, mult, y_scale, y_zp, axis):
    """float(acc) * mult (per tensor or per channel along axis), quantised with (y_scale, y_zp)."""
    mult = np.asarray(mult, np.float32)
    if mult.size > 1:
        shape = [1] * acc.ndim
        shape[axis] = -1
        mult = mult.reshape(shape)
    return gc.quantize_linear(gc.cast(acc, "float32") * mult.reshape(mult.shape if mult.size > 1 else ()),
                              np.float32(y_scale), np.asarray(y_zp))


@op("QLinearMatMul")
def _qlinear_matmul(cx, ins, a):
    qa, sa, za, qb, sb, zb, sy, zy = ins
    sa, za, sb, zb = (cx.const(t, w) for t, w in ((sa, "a_scale"), (za, "a_zero_point"), (sb, "b_scale"),
                                                   (zb, "b_zero_point")))
    sy, zy = cx.const(sy, "y_scale"), cx.const(zy, "y_zero_point")
    out_dtype = _qdtype(cx, gc.constant(zy))
    if sa.size != 1 or za.size != 1 or sy.size != 1 or zy.size != 1:
        raise cx.unsupported("QLinearMatMul with per-row A or output quantisation")
    # the multiplier in float32, as ONNX Runtime computes it: a_scale * b_scale / y_scale
    mult = (np.float32(sa.reshape(())) * np.asarray(sb, np.float32).reshape(-1)) / np.float32(sy.reshape(()))
    bconst = constant_value(qb)
    if bconst is not None and qb.ndim == 2 and _zero(zb) and qa.ndim >= 2:
        m = qb.shape[1]
        offset = (-int(za.reshape(())) * np.asarray(bconst, np.int64).sum(0)).astype(np.int32)
        return gc.qlinear_matmul(qa, qb, offset, np.broadcast_to(mult, (m,)).astype(np.float32),
                                 np.zeros(m, np.float32), out_dtype=out_dtype, out_zero_point=int(zy.reshape(())))
    acc = gc.matmul_integer(qa, qb, za.reshape(()), None if _zero(zb) else _scalar_or_vector(zb))
    return _requantise(acc, mult, 1.0, zy.reshape(()).astype(out_dtype), -1)


def _conv_geometry(cx, x, w, a):
    kernel = list(a.get("kernel_shape") or w.shape[2:])
    lo, hi, outs, strides, dil = _window_geometry(cx, x, kernel, a)
    return dict(stride=tuple(strides), padding=tuple(zip(lo, hi)), dilation=tuple(dil)), a.get("group", 1)


def _as_2d(x, w):
    """1-D convolutions as height-1 images."""
    if x.ndim == 3:
        return gc.expand_dims(x, 2), gc.expand_dims(w, 2), True
    return x, w, False


def _geom_2d(cx, x, w, a, one_d):
    if not one_d:
        return _conv_geometry(cx, x, w, a)
    a2 = dict(a)
    for k, fill in (("kernel_shape", None), ("strides", 1), ("dilations", 1)):
        if a.get(k):
            a2[k] = [1 if fill is None else fill] + list(a[k])
    if a.get("pads"):
        p = a["pads"]
        a2["pads"] = [0, p[0], 0, p[1]]
    return _conv_geometry(cx, x, w, a2)


@op("ConvInteger")
def _conv_integer(cx, ins, a):
    x, w = ins[0], ins[1]
    zx, zw = _opt(cx, ins, 2, "x_zero_point"), _opt(cx, ins, 3, "w_zero_point")
    x2, w2, one_d = _as_2d(x, w)
    if x2.ndim != 4:
        raise cx.unsupported(f"ConvInteger on rank {x.ndim}")
    geom, g = _geom_2d(cx, x2, w2, a, one_d)
    y = gc.conv_integer(x2, w2, None if _zero(zx) else np.asarray(zx).reshape(()).astype(x.dtype),
                        None if _zero(zw) else _scalar_or_vector(zw), groups=g, **geom)
    return gc.squeeze(y, 2) if one_d else y


@op("QLinearConv")
def _qlinear_conv(cx, ins, a):
    x, sx, zx, w, sw, zw, sy, zy = ins[:8]
    bias = ins[8] if len(ins) > 8 else None
    sx, zx, sw, zw, sy, zy = (cx.const(t, n) for t, n in ((sx, "x_scale"), (zx, "x_zero_point"), (sw, "w_scale"),
                                                          (zw, "w_zero_point"), (sy, "y_scale"), (zy, "y_zero_point")))
    out_dtype = _qdtype(cx, gc.constant(zy))
    x2, w2, one_d = _as_2d(x, w)
    if x2.ndim != 4:
        raise cx.unsupported(f"QLinearConv on rank {x.ndim}")
    geom, g = _geom_2d(cx, x2, w2, a, one_d)
    o = w.shape[0]
    mult = (np.float32(sx.reshape(())) * np.asarray(sw, np.float32).reshape(-1)) / np.float32(sy.reshape(()))
    bv = np.zeros(o, np.int64) if bias is None else np.asarray(cx.const(bias, "B"), np.int64).reshape(-1)
    zxi = int(np.asarray(zx).reshape(()))
    wv = constant_value(w)
    if wv is not None and g == 1 and _zero(zw):
        wsum = np.asarray(wv, np.int64).reshape(o, -1).sum(1)
        offset = (bv - zxi * wsum).astype(np.int32)
        y = gc.qlinear_conv2d(x2, w2, offset, np.broadcast_to(mult, (o,)).astype(np.float32), np.zeros(o, np.float32),
                              pad_value=zxi, groups=1, out_dtype=out_dtype, out_zero_point=int(zy.reshape(())), **geom)
    else:
        acc = gc.conv_integer(x2, w2, np.asarray(zxi).astype(x.dtype) if zxi else None,
                              None if _zero(zw) else _scalar_or_vector(zw), groups=g, **geom)
        if bias is not None:
            acc = acc + gc.reshape(gc.constant(bv.astype(np.int32)), (1, o, 1, 1))
        y = _requantise(acc, mult, 1.0, zy.reshape(()).astype(out_dtype), 1)
    return gc.squeeze(y, 2) if one_d else y


# ---- QDQ: a float MatMul/Conv between DequantizeLinear nodes runs on the int8 GEMM ------------------------

def _record_dequantized(cx, x, sv, zv, axis) -> None:
    """Remember what a DequantizeLinear output is (by ONNX name): the MatMul/Conv reading it may run as an
    integer product (its folded float value would hide the int8 weights)."""
    if x.dtype in Q.QTYPES:
        cx.__dict__.setdefault("qdq", {})[cx.node.output[0]] = (x, np.asarray(sv, np.float32),
                                                                 None if zv is None else np.asarray(zv), axis)


def _dq(cx, i, name_axis=None):
    """(quantised tensor, scale, zero point, axis) of input i when a DequantizeLinear made it."""
    names = list(cx.node.input)
    return getattr(cx, "qdq", {}).get(names[i]) if i < len(names) else None


def _weight_int8(w, axis_ok):
    """The int8 values of a constant weight with zero point 0 and a per-tensor or per-`axis_ok` scale."""
    wq, sw, zw, axis = w
    v = constant_value(wq)
    if v is None or wq.dtype != "int8" or not _zero(zw) or (sw.size > 1 and axis != axis_ok):
        return None
    return np.asarray(v), sw.reshape(-1)


def _activation(x):
    xq, sx, zx, axis = x
    if sx.size != 1 or (zx is not None and np.asarray(zx).size != 1):
        return None
    return xq, np.float32(sx.reshape(())), 0 if zx is None else int(np.asarray(zx).reshape(()))


def _wrap(name, fast):
    from .onnx_ops import CONVERTERS
    plain = CONVERTERS[name]

    @op(name)
    def converter(cx, ins, a):
        out = fast(cx, ins, a)
        return plain(cx, ins, a) if out is None else out
    converter.__doc__ = f"{name}: the int8 GEMM when both operands come from DequantizeLinear, else {plain.__name__}"
    return converter


def _matmul_qdq(cx, ins, a):
    x, w = _dq(cx, 0), _dq(cx, 1)
    if x is None or w is None or ins[1].ndim != 2 or ins[0].ndim < 2:
        return None
    act, wt = _activation(x), _weight_int8(w, 1)
    if act is None or wt is None:
        return None
    (xq, sx, zx), (wv, sw) = act, wt
    m = wv.shape[1]
    offset = (-zx * wv.astype(np.int64).sum(0)).astype(np.int32)
    mult = np.broadcast_to(sx * sw.astype(np.float32), (m,)).astype(np.float32)
    return gc.qlinear_matmul(xq, gc.constant(wv), offset, mult, np.zeros(m, np.float32))


def _gemm_qdq(cx, ins, a):
    """Gemm(DQ(x), DQ(w), C) with transA 0 and alpha = beta = 1: the int8 GEMM plus C as its bias."""
    x, w = _dq(cx, 0), _dq(cx, 1)
    if x is None or w is None or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        return None
    trans = bool(a.get("transB", 0))
    act, wt = _activation(x), _weight_int8(w, 0 if trans else 1)
    if act is None or wt is None or ins[0].ndim != 2:
        return None
    (xq, sx, zx), (wv, sw) = act, wt
    wv = np.ascontiguousarray(wv.T) if trans else wv
    m = wv.shape[1]
    bias = np.zeros(m, np.float32)
    if len(ins) > 2 and ins[2] is not None:
        if ins[2].dtype != "float32" or ins[2].size != m:
            return None
        bias = gc.reshape(ins[2], (m,))
    offset = (-zx * wv.astype(np.int64).sum(0)).astype(np.int32)
    mult = np.broadcast_to(sx * sw.astype(np.float32), (m,)).astype(np.float32)
    return gc.qlinear_matmul(xq, gc.constant(wv), offset, mult, bias)


def _conv_qdq(cx, ins, a):
    x, w = _dq(cx, 0), _dq(cx, 1)
    if x is None or w is None or ins[0].ndim != 4 or a.get("group", 1) != 1:
        return None
    act, wt = _activation(x), _weight_int8(w, 0)
    if act is None or wt is None:
        return None
    (xq, sx, zx), (wv, sw) = act, wt
    o = wv.shape[0]
    bias = np.zeros(o, np.float32)
    if len(ins) > 2 and ins[2] is not None:   # a float bias (often DequantizeLinear of an int32 one)
        if ins[2].dtype != "float32" or ins[2].size != o:
            return None
        bias = gc.reshape(ins[2], (o,))
    geom, _ = _conv_geometry(cx, ins[0], ins[1], a)
    offset = (-zx * wv.astype(np.int64).reshape(o, -1).sum(1)).astype(np.int32)
    mult = np.broadcast_to(sx * sw.astype(np.float32), (o,)).astype(np.float32)
    return gc.qlinear_conv2d(xq, gc.constant(wv), offset, mult, bias, pad_value=zx, **geom)


_wrap("MatMul", _matmul_qdq)
_wrap("Conv", _conv_qdq)
_wrap("Gemm", _gemm_qdq)
