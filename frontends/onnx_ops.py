"""ONNX op converters: elementwise, reductions, matrix products, softmax family.

A converter is `fn(cx, ins, attrs) -> Tensor | list[Tensor]`: `ins` are graphc tensors (None for
an omitted optional input), `attrs` the decoded ONNX attributes. Ops without a graphc counterpart
are composed from graphc ops. The other onnx_*.py modules (imported at the end) add shape ops,
neural-net ops, recurrent/control flow, attention, resize and scatter/gather converters.
"""
from __future__ import annotations

import math

import numpy as np

import graphc as gc
from graphc import dtypes as _dt
from graphc import shapes as _sh

CONVERTERS: dict = {}


def op(*names):
    """Register a converter under one or more ONNX op types."""
    def deco(fn):
        for n in names:
            CONVERTERS[n] = fn
        return fn
    return deco


def _like(v, x) -> gc.Tensor:
    """A scalar constant of x's dtype."""
    return gc.constant(np.asarray(v, dtype=x.dtype))


# ---- elementwise -------------------------------------------------------------------------------

_UNARY = {"Abs": gc.abs, "Neg": gc.neg, "Exp": gc.exp, "Log": gc.log, "Sqrt": gc.sqrt, "Sin": gc.sin,
          "Cos": gc.cos, "Tanh": gc.tanh, "Sigmoid": gc.sigmoid, "Erf": gc.erf, "Floor": gc.floor,
          "Sign": gc.sign, "Relu": gc.relu, "Softplus": gc.softplus, "Reciprocal": gc.reciprocal,
          "Atan": gc.atan, "Tan": gc.tan, "Asin": gc.asin, "Acos": gc.acos, "Sinh": gc.sinh, "Cosh": gc.cosh,
          "Asinh": gc.asinh, "Acosh": gc.acosh, "Atanh": gc.atanh, "Ceil": gc.ceil, "Round": gc.round,
          "BitwiseNot": gc.bitwise_not, "IsNaN": gc.isnan}
_BINARY = {"Add": gc.add, "Sub": gc.sub, "Mul": gc.mul, "Equal": gc.equal, "Less": gc.less,
           "LessOrEqual": gc.less_equal, "Greater": gc.greater, "GreaterOrEqual": gc.greater_equal,
           "And": gc.logical_and, "Or": gc.logical_or, "Xor": gc.not_equal,
           "BitwiseAnd": gc.bitwise_and, "BitwiseOr": gc.bitwise_or, "BitwiseXor": gc.bitwise_xor}


def _unary(fn):
    return lambda cx, ins, a: gc.cast(fn(ins[0]), ins[0].dtype) if ins[0].dtype != "bool" else fn(ins[0])


def _binary(fn):
    return lambda cx, ins, a: fn(ins[0], ins[1])


for _n, _f in _UNARY.items():
    CONVERTERS[_n] = _unary(_f)
for _n, _f in _BINARY.items():
    CONVERTERS[_n] = _binary(_f)


@op("Identity")
def _identity(cx, ins, a):
    return ins[0]


@op("Div")
def _div(cx, ins, a):
    x, y = ins
    if _dt.is_unsigned(x.dtype):
        return gc.floor_divide(x, y)
    if _dt.is_int(x.dtype):  # C-style division, truncating toward zero: x - fmod(x, y) is an exact multiple
        return gc.floor_divide(x - gc.fmod(x, y), y)
    return gc.div(x, y)


@op("Pow")
def _pow(cx, ins, a):
    x, y = ins
    if x.dtype == y.dtype:
        return gc.pow(x, y)
    dt = _dt.promote(x.dtype, y.dtype)
    return gc.cast(gc.pow(gc.cast(x, dt), gc.cast(y, dt)), x.dtype)


@op("Mod")
def _mod(cx, ins, a):
    """fmod=0: the divisor's sign (np.mod, Python's %); fmod=1: the dividend's (np.fmod, C's fmod)."""
    return (gc.fmod if a.get("fmod", 0) else gc.mod)(ins[0], ins[1])


@op("BitShift")
def _bit_shift(cx, ins, a):
    direction = a.get("direction", "")
    if direction not in ("LEFT", "RIGHT"):
        raise cx.unsupported(f"direction {direction!r} (LEFT or RIGHT)")
    return (gc.left_shift if direction == "LEFT" else gc.right_shift)(ins[0], ins[1])


@op("Not")
def _not(cx, ins, a):
    return gc.equal(ins[0], gc.constant(np.asarray(False)))


def _variadic(fn):
    def conv(cx, ins, a):
        out = ins[0]
        for t in ins[1:]:
            out = fn(out, t)
        return out
    return conv


CONVERTERS["Max"] = _variadic(gc.maximum)
CONVERTERS["Min"] = _variadic(gc.minimum)
CONVERTERS["Sum"] = _variadic(gc.add)


@op("Mean")
def _mean(cx, ins, a):
    return gc.cast(_variadic(gc.add)(cx, ins, a) / float(len(ins)), ins[0].dtype)


@op("Where")
def _where(cx, ins, a):
    return gc.where(ins[0], ins[1], ins[2])


@op("Softsign")
def _softsign(cx, ins, a):
    return gc.softsign(ins[0])


@op("Elu")
def _elu(cx, ins, a):
    x = ins[0]
    return gc.where(gc.greater(x, 0.0), x, (gc.exp(x) - 1.0) * a.get("alpha", 1.0))


@op("Selu")
def _selu(cx, ins, a):
    x = ins[0]
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return gc.where(gc.greater(x, 0.0), x, (gc.exp(x) - 1.0) * alpha) * gamma


@op("Celu")
def _celu(cx, ins, a):
    x, alpha = ins[0], a.get("alpha", 1.0)
    return gc.maximum(x, 0.0) + gc.minimum((gc.exp(x / alpha) - 1.0) * alpha, 0.0)


@op("LeakyRelu")
def _leaky(cx, ins, a):
    x = ins[0]
    return gc.where(gc.greater_equal(x, 0.0), x, x * a.get("alpha", 0.01))


@op("ThresholdedRelu")
def _trelu(cx, ins, a):
    x = ins[0]
    return gc.where(gc.greater(x, a.get("alpha", 1.0)), x, 0.0)


@op("PRelu")
def _prelu(cx, ins, a):
    x, slope = ins
    if slope.ndim == 1 and x.ndim > 2 and slope.shape[0] == x.shape[1] != x.shape[-1]:
        slope = gc.reshape(slope, (slope.shape[0],) + (1,) * (x.ndim - 2))  # old opsets: per channel
    return gc.where(gc.less(x, _like(0, x)), x * slope, x)


def hard_sigmoid(x, alpha: float, beta: float):
    return gc.clip(x * alpha + beta, 0.0, 1.0)


@op("HardSigmoid")
def _hsig(cx, ins, a):
    return hard_sigmoid(ins[0], a.get("alpha", 0.2), a.get("beta", 0.5))


@op("HardSwish")
def _hswish(cx, ins, a):
    return ins[0] * hard_sigmoid(ins[0], 1 / 6, 0.5)


@op("Mish")
def _mish(cx, ins, a):
    return ins[0] * gc.tanh(gc.softplus(ins[0]))


@op("Swish")
def _swish(cx, ins, a):
    return ins[0] * gc.sigmoid(ins[0] * a.get("alpha", 1.0))


@op("Gelu")
def _gelu(cx, ins, a):
    x = ins[0]
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x * (1.0 + gc.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + gc.erf(x * (1 / math.sqrt(2))))


@op("Shrink")
def _shrink(cx, ins, a):
    x, lambd, bias = ins[0], a.get("lambd", 0.5), a.get("bias", 0.0)
    return gc.where(gc.less(x, -lambd), x + bias, gc.where(gc.greater(x, lambd), x - bias, 0.0))


@op("IsInf")
def _isinf(cx, ins, a):
    x = ins[0]
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    out = gc.equal(x, _like(np.inf, x)) if pos else None
    if neg:
        m = gc.equal(x, _like(-np.inf, x))
        out = m if out is None else gc.logical_or(out, m)
    return out if out is not None else gc.not_equal(x, x) & gc.equal(x, x)


@op("Clip")
def _clip(cx, ins, a):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if cx.opset < 11:
        lo, hi = _like(a.get("min", -np.inf), x), _like(a.get("max", np.inf), x)
    if lo is not None:
        x = gc.maximum(x, lo)
    if hi is not None:
        x = gc.minimum(x, hi)
    return x


@op("Cast")
def _cast(cx, ins, a):
    from .onnx_import import onnx_dtype
    return gc.cast(ins[0], onnx_dtype(a["to"]))


@op("CastLike")
def _castlike(cx, ins, a):
    return gc.cast(ins[0], ins[1].dtype)


# ---- matrix products ---------------------------------------------------------------------------

@op("MatMul")
def _matmul(cx, ins, a):
    return gc.matmul(ins[0], ins[1])


@op("Gemm")
def _gemm(cx, ins, a):
    A, B = ins[0], ins[1]
    C = ins[2] if len(ins) > 2 else None
    if a.get("transA", 0):
        A = gc.transpose(A)
    if a.get("transB", 0):
        B = gc.transpose(B)
    y = gc.matmul(A, B)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if C is not None:
        y = y + (C * beta if beta != 1.0 else C)
    return y


# ---- reductions --------------------------------------------------------------------------------

def reduce_axes(cx, ins, a, since: int):
    """(axes or None for all, keepdims) from the `axes` attribute (old opsets) or input 1 (new)."""
    axes = a.get("axes") if cx.opset < since else cx.ints(ins[1] if len(ins) > 1 else None, "axes")
    return axes


def _reduction(fn, since=18, empty=0.0, cast_back=True):
    def conv(cx, ins, a):
        x = ins[0]
        axes = reduce_axes(cx, ins, a, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        axes = _sh.normalize_axes(tuple(axes), x.ndim, "reduce")
        if any(isinstance(x.shape[i], int) and x.shape[i] == 0 for i in axes):  # empty set: the identity
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
            if x.dtype == "bool":
                return gc.broadcast_to(gc.constant(np.asarray(empty > 0)), shape)
            return gc.broadcast_to(_like(empty, x), shape)
        y = fn(x, axes, keep)
        return gc.cast(y, x.dtype) if cast_back else y
    return conv


CONVERTERS["ReduceSum"] = _reduction(lambda x, ax, k: gc.sum(x, ax, k), since=13)
CONVERTERS["ReduceMean"] = _reduction(lambda x, ax, k: gc.mean(x, ax, k), empty=np.nan)
CONVERTERS["ReduceMax"] = _reduction(lambda x, ax, k: gc.max(x, ax, k), empty=-np.inf)
CONVERTERS["ReduceMin"] = _reduction(lambda x, ax, k: gc.min(x, ax, k), empty=np.inf)
CONVERTERS["ReduceProd"] = _reduction(lambda x, ax, k: gc.prod(x, ax, k), empty=1)
CONVERTERS["ReduceL1"] = _reduction(lambda x, ax, k: gc.sum(gc.abs(x), ax, k))
CONVERTERS["ReduceL2"] = _reduction(lambda x, ax, k: gc.sqrt(gc.sum(x * x, ax, k)))
CONVERTERS["ReduceSumSquare"] = _reduction(lambda x, ax, k: gc.sum(x * x, ax, k))
CONVERTERS["ReduceLogSum"] = _reduction(lambda x, ax, k: gc.log(gc.sum(x, ax, k)), empty=-np.inf)
CONVERTERS["ReduceLogSumExp"] = _reduction(lambda x, ax, k: gc.logsumexp(x, ax, k), empty=-np.inf)


def _argreduce(fn, flip_fn):
    def conv(cx, ins, a):
        x = ins[0]
        axis = _sh.normalize_axis(a.get("axis", 0), x.ndim, "argmax")
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):  # first index in the reversed axis, mapped back
            n = x.shape[axis]
            rev = x[(slice(None),) * axis + (slice(None, None, -1),)]
            return (n - 1) - fn(rev, axis, keep)
        return fn(x, axis, keep)
    return conv


CONVERTERS["ArgMax"] = _argreduce(gc.argmax, None)
CONVERTERS["ArgMin"] = _argreduce(gc.argmin, None)


# ---- softmax family ----------------------------------------------------------------------------

def _softmax_like(fn):
    def conv(cx, ins, a):
        x = ins[0]
        if cx.opset >= 13:
            return fn(x, a.get("axis", -1))
        axis = _sh.normalize_axis(a.get("axis", 1), x.ndim, "softmax")  # old opsets: 2-D coercion
        flat = gc.reshape(x, (_sh.size(x.shape[:axis]), _sh.size(x.shape[axis:])))
        return gc.reshape(fn(flat, 1), x.shape)
    return conv


def _hardmax(x, axis):
    axis = _sh.normalize_axis(axis, x.ndim, "hardmax")
    idx = gc.argmax(x, axis, keepdims=True)
    n = x.shape[axis]
    iota = gc.constant(np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (x.ndim - axis - 1)))
    return gc.cast(gc.equal(idx, iota), x.dtype)


CONVERTERS["Softmax"] = _softmax_like(gc.softmax)
CONVERTERS["LogSoftmax"] = _softmax_like(gc.log_softmax)
CONVERTERS["Hardmax"] = _softmax_like(_hardmax)


@op("ai.onnx.preview.training.Gradient")
def _gradient(cx, ins, a):
    """ONNX's Gradient op is graphc's reverse mode: d sum(y) / d x for each named x."""
    from .onnx_import import OnnxImportError
    try:
        y, xs = cx.env[a["y"]], [cx.env[n] for n in a["xs"]]
    except KeyError as e:
        raise OnnxImportError(f"Gradient: tensor {e.args[0]!r} is not defined before it") from None
    return gc.grad(gc.sum(y), xs)


_gradient.reads_env = True  # reads tensors by name: never folded at import time


from . import onnx_shape_ops  # noqa: E402,F401  (registers shape-op converters)
from . import onnx_nn_ops  # noqa: E402,F401  (conv, pooling, normalisations, losses)
from . import onnx_rnn_ops  # noqa: E402,F401  (RNN/GRU/LSTM, Scan, Loop, If)
from . import onnx_attention  # noqa: E402,F401  (Attention, RotaryEmbedding)
from . import onnx_resize  # noqa: E402,F401  (Resize, Upsample)
from . import onnx_scatter  # noqa: E402,F401  (TopK, GatherND, scatters)

