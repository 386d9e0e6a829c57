"""The fused op: a subgraph of elementwise ops (optionally ending in one reduction) run as one kernel.

Built by the optimiser (graphc.passes.fusion) after differentiation. Contract for backends:
  node.inputs            the external tensors the group reads
  node.attrs["body"]     a gc.Graph whose inputs are placeholders standing for node.inputs (same
                         order, same shapes/dtypes) and whose outputs are the group's results
  node.outputs           one tensor per body output (same shapes/dtypes)
A backend that cannot compile a body as one loop may run the body op by op; NumPy evaluates it with
the reference evaluator, so semantics never depend on the backend.
"""
from __future__ import annotations

from ..errors import GradientError
from ..ir import Graph, Node, Op, Tensor, register


@register
class Fused(Op):
    name = "fused"
    n_outputs = -1  # variable: one per body output
    differentiable = False  # built after differentiation (see vjp)

    def infer(self, inputs, body: Graph):
        return [(o.shape, o.dtype) for o in body.outputs]

    def impl(self, *args, body: Graph, dims=None):
        from ..reference import evaluate
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
