"""The fused op: a group of ops the optimiser (graphc.passes.fusion) runs as one kernel.

Contract for backends:
  node.inputs          the distinct external tensors the group reads (any may broadcast against the
                       loop shape)
  node.attrs["body"]   a gc.Graph whose inputs are placeholders standing for node.inputs (same order,
                       shapes, dtypes); scalar constants appear inside the body as constant leaves
                       (immediates), larger constants are node inputs
  node.outputs         one tensor per body output (same shapes/dtypes): the group's results that are
                       read outside the group
Body shapes, in body.compute_nodes() order (the schedule inside the kernel):
  1. elementwise group: every compute node is elementwise (op.elementwise, or cast) and has the loop
     shape (the shape of every output); inputs broadcast NumPy-style. One loop over the loop shape.
  2. elementwise group + trailing reduction: as 1, then ONE reduction (sum/max/min/prod, attrs axis and
     keepdims) of the last elementwise value; the body then has exactly one output, the reduction's.
  3. GEMM/conv epilogue: the first compute node is a matmul (or conv2d) whose inputs are body
     placeholders read by nothing else in the body; every later node is elementwise with the matmul's
     output shape (bias add,
     activation, an optimiser update). Outputs are among the elementwise results (never the matmul's
     own result). Compile as: GEMM into the output buffer, then the elementwise loop over it in place.
A backend that cannot compile a body as one loop may run the body op by op (Fused.impl evaluates it
with the reference evaluator), so semantics never depend on the backend. `display_name` gives
`fused[mul,add,tanh]` (members in body order) for op_names(), dprint and pictures.
"""
from __future__ import annotations

from ..errors import GradientError
from ..ir import Graph, Node, Op, Tensor, Trait, register
from ..reference import evaluate


@register
class Fused(Op):
    traits = Trait.CONTROL | Trait.FRESH | Trait.WRITES_INTO | Trait.NO_FOLD
    name = "fused"
    n_outputs = -1  # variable: one per body output
    differentiable = False  # built after differentiation (see vjp)

    def infer(self, inputs, body: Graph):
        return [(o.shape, o.dtype) for o in body.outputs]

    def impl(self, *args, body: Graph, dims=None):
        return tuple(evaluate(body.outputs, dict(zip(body.inputs, args)), dims))

    needs_dims = True

    def vjp(self, node, gouts):
        raise GradientError("fused nodes are built by the optimiser after differentiation; "
                            "differentiate the unoptimised graph")

    @staticmethod
    def display_name(node: Node) -> str:
        members = [n.op.name for n in node.attrs["body"].compute_nodes()]
        return f"fused[{','.join(members)}]"


def fused(inputs: list[Tensor], body: Graph) -> tuple[Tensor, ...]:
    """Build a fused node over `inputs` computing `body` (see the module docstring)."""
    from ..ir import make_node
    node = make_node(Fused, inputs, {"body": body})
    return node.outputs
