"""Reductions (sum mean max min prod argmax var) and the softmax family (numerically stable)."""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, ShapeError
from ..ir import Op, Trait, apply, register
from .core import as_tensor, constant


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _sum_dtype(d):
    return _dt.sum_dtype(d)   # NumPy: bool and narrow signed ints sum to int64, narrow unsigned to uint64


class Reduce(Op):
    """A reduction over `axis` (a sorted tuple of non-negative axes) with `keepdims`."""
    traits = Trait.REDUCTION | Trait.FRESH
    fn = None           # the NumPy reduction (np.sum, ...)
    identity_ok = True  # False: reducing over a size-0 axis is an error (max, min)

    def out_dtype(self, d):
        return d

    def infer(self, inputs, axis, keepdims):
        x = inputs[0]
        if not self.identity_ok and any(isinstance(x.shape[a], int) and x.shape[a] == 0 for a in axis):
            raise ShapeError(f"{self.name}: reduction over a size-0 axis has no identity")
        return [(_reduced_shape(x.shape, axis, keepdims), self.out_dtype(x.dtype))]

    @_dt.via_float32   # float16/bfloat16 accumulate in float32, rounded once
    def impl(self, x, axis, keepdims):
        return np.asarray(self.fn(x, axis=axis, keepdims=keepdims))

    def _expand(self, node, t):
        """`t` (shaped like the output) reshaped to keepdims form, broadcastable against the input."""
        x = node.inputs[0]
        if not node.attrs["keepdims"]:
            t = F.reshape(t, _reduced_shape(x.shape, node.attrs["axis"], True))
        return t


def reduction(op, x, axis=None, keepdims=False, **extra):
    x = as_tensor(x)
    axes = _sh.normalize_axes(axis, x.ndim, op.name)
    return apply(op, x, axis=axes, keepdims=bool(keepdims), **extra)


@register
class Sum(Reduce):
    traits = Trait.REDUCTION | Trait.MONOID | Trait.FRESH
    name = "sum"
    fn = staticmethod(np.sum)

    def out_dtype(self, d):
        return _sum_dtype(d)

    def vjp(self, node, gouts):
        x = node.inputs[0]
        if not _dt.is_float(x.dtype):
            return [None]
        return [F.broadcast_to(self._expand(node, gouts[0]), x.shape)]

    def jvp(self, node, tangents):
        return [None if tangents[0] is None else F.sum(tangents[0], node.attrs["axis"], node.attrs["keepdims"])]


@register
class Prod(Reduce):
    traits = Trait.REDUCTION | Trait.MONOID | Trait.FRESH
    name = "prod"
    fn = staticmethod(np.prod)

    def out_dtype(self, d):
        return _sum_dtype(d)

    def vjp(self, node, gouts):
        x, y = node.inputs[0], node.outputs[0]
        if not _dt.is_float(x.dtype):
            return [None]
        # d prod / d x_i = prod_{j != i} x_j, computed as y / x_i where x_i != 0, else by the
        # product of the other entries (exact with at most one zero in the reduced slice)
        yb = self._expand(node, y)
        nz = F.where(F.equal(x, 0), 1, x)
        prod_nz = F.prod(nz, node.attrs["axis"], keepdims=True)
        others = F.where(F.equal(x, 0), prod_nz, yb / nz)
        return [F.broadcast_to(self._expand(node, gouts[0]), x.shape) * others]


class _MaxMin(Reduce):
    traits = Trait.REDUCTION | Trait.MONOID | Trait.FRESH
    identity_ok = False

    def vjp(self, node, gouts):
        x, y = node.inputs[0], node.outputs[0]
        if not _dt.is_float(x.dtype):
            return [None]
        mask = F.cast(F.equal(x, self._expand(node, y)), x.dtype)
        count = F.sum(mask, node.attrs["axis"], keepdims=True)  # ties share the gradient
        return [mask * (self._expand(node, gouts[0]) / count)]


@register
class Max(_MaxMin):
    name = "max"
    fn = staticmethod(np.max)


@register
class Min(_MaxMin):
    name = "min"
    fn = staticmethod(np.min)


class _ArgReduce(Op):
    traits = Trait.REDUCTION | Trait.FRESH
    differentiable = False
    fn = None

    def infer(self, inputs, axis, keepdims):
        x = inputs[0]
        if axis is None:
            if any(isinstance(d, int) and d == 0 for d in x.shape):
                raise ShapeError("argmax of an empty tensor")
            return [((1,) * x.ndim if keepdims else (), "int64")]
        if isinstance(x.shape[axis], int) and x.shape[axis] == 0:
            raise ShapeError(f"argmax over a size-0 axis {axis}")
        return [(_reduced_shape(x.shape, (axis,), keepdims), "int64")]

    @_dt.via_float32
    def impl(self, x, axis, keepdims):
        return np.asarray(self.fn(x, axis=axis, keepdims=keepdims)).astype(np.int64)

    def vjp(self, node, gouts):
        return [None]


@register
class ArgMax(_ArgReduce):
    name = "argmax"
    fn = staticmethod(np.argmax)


@register
class ArgMin(_ArgReduce):
    name = "argmin"
    fn = staticmethod(np.argmin)


def _argop(op, x, axis, keepdims):
    x = as_tensor(x)
    if axis is not None:
        axis = _sh.normalize_axis(axis, x.ndim, op.name)
    return apply(op, x, axis=axis, keepdims=bool(keepdims))


def _count(x, axes):
    """Number of elements over `axes` as a tensor (a constant when the dims are static)."""
    dims = [x.shape[a] for a in axes]
    n = _sh.size(dims)
    if isinstance(n, int):
        return constant(n, _dt.float_of(x.dtype))
    return F.size_of(x, axes, _dt.float_of(x.dtype))


def sum(x, axis=None, keepdims=False):
    """Sum over axis (None: all), NumPy dtype rules (bool/int32 sum to int64)."""
    return reduction(Sum, x, axis, keepdims)


def prod(x, axis=None, keepdims=False):
    return reduction(Prod, x, axis, keepdims)


def max(x, axis=None, keepdims=False):
    return reduction(Max, x, axis, keepdims)


def min(x, axis=None, keepdims=False):
    return reduction(Min, x, axis, keepdims)


def argmax(x, axis=None, keepdims=False):
    return _argop(ArgMax, x, axis, keepdims)


def argmin(x, axis=None, keepdims=False):
    return _argop(ArgMin, x, axis, keepdims)


def mean(x, axis=None, keepdims=False):
    """Arithmetic mean (float result; float32 stays float32)."""
    x = as_tensor(x)
    axes = _sh.normalize_axes(axis, x.ndim, "mean")
    fx = F.cast(x, _dt.float_of(x.dtype))
    return F.div(sum(fx, axes, keepdims), _count(x, axes))


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance with NumPy's ddof convention (two-pass, so no catastrophic cancellation)."""
    x = as_tensor(x)
    axes = _sh.normalize_axes(axis, x.ndim, "var")
    fx = F.cast(x, _dt.float_of(x.dtype))
    d = fx - mean(fx, axes, keepdims=True)
    n = _count(x, axes)
    return sum(d * d, axes, keepdims) / (n - ddof if ddof else n)


def std(x, axis=None, keepdims=False, ddof=0):
    return F.sqrt(var(x, axis, keepdims, ddof))


# ---- softmax family --------------------------------------------------------------------------

class _SoftmaxLike(Op):
    traits = Trait.NORMALIZATION | Trait.FRESH

    def infer(self, inputs, axis):
        x = inputs[0]
        if not _dt.is_float(x.dtype):
            raise DTypeError(f"{self.name} needs a float input, got {x.dtype}")
        return [(x.shape, x.dtype)]


def _np_softmax(x, axis):
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def _np_log_softmax(x, axis):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def _np_logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # initial: a size-0 axis gives log(0) = -inf
    m = np.where(np.isfinite(m), m, np.zeros((), x.dtype))
    r = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return r if keepdims else np.squeeze(r, axis=axis)


@register
class Softmax(_SoftmaxLike):
    name = "softmax"

    @_dt.via_float32
    def impl(self, x, axis):
        return _np_softmax(x, axis)

    def vjp(self, node, gouts):
        y, g, ax = node.outputs[0], gouts[0], node.attrs["axis"]
        return [y * (g - F.sum(g * y, ax, keepdims=True))]


@register
class LogSoftmax(_SoftmaxLike):
    name = "log_softmax"

    @_dt.via_float32
    def impl(self, x, axis):
        return _np_log_softmax(x, axis)

    def vjp(self, node, gouts):
        y, g, ax = node.outputs[0], gouts[0], node.attrs["axis"]
        return [g - F.exp(y) * F.sum(g, ax, keepdims=True)]


@register
class LogSumExp(Reduce):
    name = "logsumexp"

    def infer(self, inputs, axis, keepdims):
        if not _dt.is_float(inputs[0].dtype):
            raise DTypeError(f"logsumexp needs a float input, got {inputs[0].dtype}")
        return super().infer(inputs, axis, keepdims)

    @_dt.via_float32
    def impl(self, x, axis, keepdims):
        return np.asarray(_np_logsumexp(x, axis, keepdims))

    def vjp(self, node, gouts):
        x, y = node.inputs[0], node.outputs[0]
        return [self._expand(node, gouts[0]) * F.exp(x - self._expand(node, y))]


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along axis, computed as exp(x - max) (never overflows)."""
    x = as_tensor(x)
    return apply(Softmax, x, axis=_sh.normalize_axis(axis, x.ndim, "softmax"))


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along axis (stable)."""
    x = as_tensor(x)
    return apply(LogSoftmax, x, axis=_sh.normalize_axis(axis, x.ndim, "log_softmax"))


def logsumexp(x, axis=None, keepdims=False):
    """log(sum(exp(x))) computed with the max subtracted first (stable)."""
    return reduction(LogSumExp, x, axis, keepdims)
