"""The quantised-inference ops (graphc/ops/quant.py) on cuda: `quantize_linear` is a pointwise C
spelling (it fuses like any elementwise op); the integer GEMM/convolution ops are refused with a clear
DTypeError at compile time (no int8 GEMM kernel on cuda yet): the int8 GEMM runs on llvm
(AVX512-VNNI / AVX2) and numpy."""
from __future__ import annotations

from graphc.errors import DTypeError
from graphc.ir import fmt_loc
from graphc.ops import quant as Q

from .lower import C_CODE, lowers
from .prelude import VALUE_TYPES


def _quantize_linear(schedule, nd, vals) -> str:
    """saturate(rint(x / scale) + zero_point) in float (double when x or scale is float64), as the
    op's NumPy reference computes it; rint rounds half to even in the default rounding mode."""
    x, s, z = nd.inputs
    out = nd.outputs[0].dtype
    ct = "float64" if "float64" in (x.dtype, s.dtype) else "float32"
    c = "double" if ct == "float64" else "float"
    xv, sv, zv = (schedule._value(t, vals, ct) for t in (x, s, z))
    lo, hi = Q.qrange(out)
    return f"(({VALUE_TYPES[out]})fmax(fmin(rint(({c})({xv}) / ({c})({sv})) + ({c})({zv}), ({c}){hi}), ({c}){lo}))"


C_CODE[Q.QuantizeLinear] = _quantize_linear


@lowers(Q.MatMulInteger, Q.QLinearMatMul, Q.ConvInteger, Q.QLinearConv2d)
def _refuse(schedule, node, ins):
    raise DTypeError(f"backend 'cuda' has no int8 kernels yet ({node.op.name}, built at {fmt_loc(node.loc)}): "
                     f"compile quantised functions with backend='llvm' or 'numpy'")
