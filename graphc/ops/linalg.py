"""Matrix products: batched matmul with NumPy's broadcasting of the batch dims; dot."""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, ShapeError
from ..ir import Op, Trait, apply, register
from .core import as_tensor


@register
class MatMul(Op):
    """a @ b for a (..., n, k) and b (..., k, m); batch dims broadcast (1-D cases handled by matmul())."""
    traits = Trait.CONTRACTION | Trait.FRESH | Trait.WRITES_INTO
    name = "matmul"

    def infer(self, inputs):
        a, b = inputs
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeError("matmul op needs rank >= 2 operands")
        if "bool" in (a.dtype, b.dtype):
            raise DTypeError(f"matmul of bool tensors ({a.dtype}, {b.dtype})")
        if not _sh.dims_equal(a.shape[-1], b.shape[-2]):
            raise ShapeError(f"matmul: contraction dims differ: {_sh.fmt_shape(a.shape)} @ {_sh.fmt_shape(b.shape)} "
                             f"({a.shape[-1]} vs {b.shape[-2]})")
        batch = _sh.broadcast_shapes(a.shape[:-2], b.shape[:-2], op="matmul")
        return [(batch + (a.shape[-2], b.shape[-1]), _dt.promote(a.dtype, b.dtype))]

    @_dt.via_float32   # float16/bfloat16 products accumulate in float32
    def impl(self, a, b):
        return np.matmul(a, b)

    def vjp(self, node, gouts):
        a, b = node.inputs
        g = gouts[0]
        ga = F.sum_to(matmul(g, F.swapaxes(b, -1, -2)), a.shape) if _dt.is_float(a.dtype) else None
        gb = F.sum_to(matmul(F.swapaxes(a, -1, -2), g), b.shape) if _dt.is_float(b.dtype) else None
        return [None if ga is None else F.cast(ga, a.dtype), None if gb is None else F.cast(gb, b.dtype)]

    def jvp(self, node, tangents):
        a, b = node.inputs
        ta, tb = tangents
        out = None
        if ta is not None:
            out = matmul(ta, b)
        if tb is not None:
            out = matmul(a, tb) if out is None else out + matmul(a, tb)
        return [None if out is None else F.cast(out, node.outputs[0].dtype)]


def matmul(a, b):
    """NumPy matmul: 1-D operands are promoted to matrices and the added axis removed afterwards."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must not be scalars, got shapes {_sh.fmt_shape(a.shape)} and "
                         f"{_sh.fmt_shape(b.shape)}")
    va, vb = a.ndim == 1, b.ndim == 1
    if va:
        a = F.expand_dims(a, 0)
    if vb:
        b = F.expand_dims(b, -1)
    out = apply(MatMul, a, b)
    if va:
        out = F.squeeze(out, -2)
    if vb:
        out = F.squeeze(out, -1)
    return out


def dot(a, b):
    """np.dot for operands of rank <= 2 (scalars multiply); use matmul for batches."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        return F.mul(a, b)
    if a.ndim > 2 or b.ndim > 2:
        raise ShapeError("dot supports rank <= 2 operands; use gc.matmul for batched products")
    return matmul(a, b)
