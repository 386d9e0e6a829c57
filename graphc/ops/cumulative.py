"""Running sums along an axis (np.cumsum; ONNX CumSum with its exclusive/reverse attributes).

`cumsum` is one primitive, `CumSum(x, axis, exclusive, reverse)`, whose output has x's shape and dtype:
element j is the sum of x's elements before j (exclusive) or up to j (inclusive) along `axis`, counted
from the end when `reverse`. Its gradient is the same running sum of the cotangent in the other
direction (the transpose of a triangular matrix), so it differentiates to any order. float16/bfloat16
accumulate in float32 and round each output once (as the reductions do). The public `cumsum` casts the
input to NumPy's accumulator dtype first (bool and narrow signed integers to int64, narrow unsigned to
uint64), as np.cumsum does; integer sums wrap.
"""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError
from ..ir import Op, Trait, apply, register
from .core import as_tensor


def _np_cumsum(x: np.ndarray, axis: int, exclusive: bool, reverse: bool) -> np.ndarray:
    if reverse:
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=x.dtype)
    if exclusive:
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)), np.take(y, np.arange(y.shape[axis] - 1),
                                                                            axis=axis)], axis=axis) \
            if y.shape[axis] else y
    return np.ascontiguousarray(np.flip(y, axis) if reverse else y)


@register
class CumSum(Op):
    name = "cumsum"
    traits = Trait.NORMALIZATION | Trait.FRESH   # same shape out, a running reduction along attrs["axis"]

    def infer(self, inputs, axis, exclusive, reverse):
        x = inputs[0]
        if x.dtype == "bool":
            raise DTypeError("cumsum: a bool input must be cast to an integer dtype first (gc.cumsum does)")
        return [(x.shape, x.dtype)]

    @_dt.via_float32   # float16/bfloat16 accumulate in float32, each output rounded once
    def impl(self, x, axis, exclusive, reverse):
        return _np_cumsum(np.asarray(x), axis, exclusive, reverse)

    def vjp(self, node, gouts):
        a = node.attrs
        return [apply(CumSum, gouts[0], axis=a["axis"], exclusive=a["exclusive"], reverse=not a["reverse"])]

    def jvp(self, node, tangents):
        t = tangents[0]
        return [None if t is None else apply(CumSum, t, **node.attrs)]


def cumsum(x, axis=None, dtype=None, exclusive: bool = False, reverse: bool = False):
    """Running sum along `axis` (np.cumsum; axis=None: over the flattened array). `dtype` is the
    accumulator and result dtype (default NumPy's: bool and narrow signed integers sum in int64, narrow
    unsigned ones in uint64, others in their own dtype). `exclusive=True` leaves each element out of
    its own sum (the first is 0); `reverse=True` sums from the end of the axis (ONNX CumSum's attributes)."""
    x = as_tensor(x)
    if axis is None:
        x = F.reshape(x, (-1,))
        axis = 0
    axis = _sh.normalize_axis(axis, x.ndim, "cumsum")
    acc = _dt.as_dtype(dtype) if dtype is not None else _dt.sum_dtype(x.dtype)
    if acc == "bool":
        raise DTypeError("cumsum: dtype bool is not an accumulator (NumPy gives int64 for bool inputs)")
    if x.dtype != acc:
        x = F.cast(x, acc)
    return apply(CumSum, x, axis=axis, exclusive=bool(exclusive), reverse=bool(reverse))


cumsum.op = CumSum
