"""solve(a, b): the solution x of a @ x = b (used by damped Newton steps in gc.optim)."""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, ShapeError
from ..ir import Op, Trait, apply, register
from .core import as_tensor


@register
class Solve(Op):
    traits = Trait.CONTRACTION
    host_only = "LU factorisation with pivoting (LAPACK gesv through numpy.linalg.solve); no native kernel"
    name = "solve"

    def infer(self, inputs):
        a, b = inputs
        if a.ndim != 2 or not _sh.dims_equal(a.shape[0], a.shape[1]) or b.ndim not in (1, 2) \
                or not _sh.dims_equal(b.shape[0], a.shape[0]):
            raise ShapeError(f"solve: a must be square (n, n) and b (n,) or (n, k), got {_sh.fmt_shape(a.shape)} "
                             f"and {_sh.fmt_shape(b.shape)}")
        if not (_dt.is_float(a.dtype) and a.dtype == b.dtype):
            raise DTypeError(f"solve: a and b must be floats of one dtype, got {a.dtype}, {b.dtype}")
        return [(b.shape, b.dtype)]

    @_dt.via_float32   # LAPACK has no float16/bfloat16 routines
    def impl(self, a, b):
        return np.linalg.solve(a, b)

    def vjp(self, node, gouts):
        a, _ = node.inputs
        x = node.outputs[0]
        gb = solve(F.transpose(a), gouts[0])
        ga = -(F.expand_dims(gb, 1) * F.expand_dims(x, 0)) if x.ndim == 1 else -F.matmul(gb, F.transpose(x))
        return [ga, gb]


def solve(a, b):
    """x with a @ x = b for a square a (b a vector or a matrix of right-hand sides)."""
    return apply(Solve, as_tensor(a), as_tensor(b))
