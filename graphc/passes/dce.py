"""Dead-code elimination: drop nodes nothing needs, and identities (stop_gradient after
differentiation, casts to the same dtype, reshapes/broadcasts to the same shape, identity transposes,
full slices)."""
from __future__ import annotations

from ..ir import Graph
from .rewrite import rebuild, same_type


def _is_identity(node, ins) -> bool:
    name, x = node.op.name, ins[0] if ins else None
    if name == "stop_gradient":  # the gradient is already built: it is a plain identity now
        return True
    if name in ("cast", "reshape", "broadcast_to"):
        return same_type(x, node.outputs[0])
    if name == "transpose":
        return tuple(node.attrs["axes"]) == tuple(range(x.ndim))
    if name == "getitem":
        idx = node.attrs["index"]
        return all(isinstance(i, slice) and i == slice(None) for i in idx) and same_type(x, node.outputs[0])
    return False


def _rule(node, ins):
    if _is_identity(node, ins):
        return [ins[0]]
    return None


def dce(graph: Graph, log) -> Graph:
    """Rebuild from the outputs and updates (unreachable nodes vanish), skipping identity nodes."""
    return rebuild(graph, _rule, log, "identity removed")
