"""The quantised-inference ops (graphc/ops/quant.py) on cuda: refused. Their tensors are uint8/int8,
which cuda's C rows do not have yet (`refuse_dtypes` raises first, at compile time, naming the tensor);
these rows make the refusal explicit should a graph reach the planner anyway. The int8 GEMM runs on
llvm (AVX512-VNNI / AVX2) and numpy."""
from __future__ import annotations

from graphc.errors import DTypeError
from graphc.ir import fmt_loc
from graphc.ops import quant as Q

from .lower import lowers


@lowers(Q.QuantizeLinear, Q.MatMulInteger, Q.QLinearMatMul, Q.ConvInteger, Q.QLinearConv2d)
def _refuse(schedule, node, ins):
    raise DTypeError(f"backend 'cuda' has no int8 kernels yet ({node.op.name}, built at {fmt_loc(node.loc)}): "
                     f"compile quantised functions with backend='llvm' or 'numpy'")
