"""Dead-code elimination: drop nodes nothing needs, and identities (stop_gradient after
differentiation, casts to the same dtype, reshapes/broadcasts to the same shape, identity transposes,
full slices), written as pattern rules (graphc/passes/pattern.py): each applies only where the
result keeps the node's type, so `cast(x) -> x` fires exactly for a cast to x's own dtype."""
from __future__ import annotations

from ..ir import Graph
from ..ops.core import Cast, StopGradient
from ..ops.shape_ops import BroadcastTo, GetItem, Reshape, Transpose
from .pattern import P, Rules, V
from .rewrite import rebuild

x = V("x")


def _identity_axes(axes) -> bool:
    return tuple(axes) == tuple(range(len(axes)))


def _full_slices(index) -> bool:
    return all(isinstance(i, slice) and i == slice(None) for i in index)


RULES = Rules([
    P(StopGradient, x) >> x,  # the gradient is already built: it is a plain identity now
    P({Cast, Reshape, BroadcastTo}, x) >> x,
    P(Transpose, x, attrs={"axes": _identity_axes}) >> x,
    P(GetItem, x, attrs={"index": _full_slices}) >> x,
])


def dce(graph: Graph, log) -> Graph:
    """Rebuild from the outputs and updates (unreachable nodes vanish), skipping identity nodes."""
    return rebuild(graph, RULES, log, "identity removed")
