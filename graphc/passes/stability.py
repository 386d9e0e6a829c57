"""Numerical-stability rewrites (Theano's stabilize phase): forms that overflow or lose all digits
are replaced by the stable op computing the same function. One `pattern >> replacement` rule each
(graphc/passes/pattern.py):

    log(softmax(x))          -> log_softmax(x)      (also through a gather/slice: cross-entropy)
    log(sigmoid(x))          -> -softplus(-x)
    log(1 - sigmoid(x))      -> -softplus(x)
    log(1 + x)               -> log1p(x)
    log(sum(exp(x), axes))   -> logsumexp(x, axes)
    log1p(exp(x))            -> softplus(x)
    exp(x) - 1               -> expm1(x)
    (a / y) * y              -> a                   (the gradient of log(softmax): y underflows to 0)
    y * (a / y - s)          -> a - y * s
"""
from __future__ import annotations

from graphc import ops as F
from ..dtypes import is_float
from ..ir import Graph, Trait, apply
from ..ops.reduce import Softmax, Sum
from ..ops.shape_ops import Take
from .pattern import Const, P, Rules, V, lazy
from .rewrite import rebuild

x, y, a, s = V("x"), V("y"), V("a"), V("s")
xf = V("x", dtype=is_float)  # where the rewritten op would compute in another dtype than the original
neg, softplus, log1p, expm1 = lazy(F.neg), lazy(F.softplus), lazy(F.log1p), lazy(F.expm1)
log_softmax, logsumexp = lazy(F.log_softmax), lazy(F.logsumexp)
sm, sm_sum = V("sm"), V("sm_sum")


def gathers(t) -> bool:
    """Picks or rearranges elements without arithmetic (log commutes with it): a movement op or take."""
    return t.node.op.has(Trait.MOVEMENT) or t.node.op is Take


def log_softmax_through_gathers(g):
    """log(g(softmax(x))) -> g(log_softmax(x)) for g a chain of gathers (x[range, labels] etc.)."""
    chain, t = [], g
    while gathers(t):
        chain.append(t.node)
        t = t.node.inputs[0]
    if t.node.op is not Softmax:
        return None
    out = F.log_softmax(t.node.inputs[0], t.node.attrs["axis"])
    for n in reversed(chain):
        out = apply(n.op, out, *n.inputs[1:], **n.attrs)
    return out


RULES = Rules([
    P(F.log, P(Softmax, x, name="sm")) >> log_softmax(x, sm.attr("axis")),
    P(F.log, V("g", where=gathers)) >> log_softmax_through_gathers,
    P(F.log, P(F.sigmoid, x)) >> neg(softplus(neg(x))),
    P(F.log, P(F.sub, Const(1), P(F.sigmoid, x))) >> neg(softplus(x)),
    P(F.log, P(F.add, Const(1), xf)) >> log1p(x),
    P(F.log, P(Sum, P(F.exp, x), name="sm_sum")) >> logsumexp(x, sm_sum.attr("axis"), sm_sum.attr("keepdims")),
    P(F.log1p, P(F.exp, xf)) >> softplus(x),
    P(F.sub, P(F.exp, x), Const(1)) >> expm1(x),
    P(F.mul, P(F.div, a, y), y) >> a,
    P(F.mul, P(F.sub, P(F.div, a, y), s), y) >> a - y * s,
])


def stability(graph: Graph, log) -> Graph:
    return rebuild(graph, RULES, log, "stabilised")
