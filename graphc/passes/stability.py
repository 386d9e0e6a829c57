"""Numerical-stability rewrites (Theano's stabilize phase): forms that overflow or lose all digits
are replaced by the stable op computing the same function.

    log(softmax(x))          -> log_softmax(x)      (also through a gather/slice: cross-entropy)
    log(sigmoid(x))          -> -softplus(-x)
    log(1 - sigmoid(x))      -> -softplus(x)
    log(1 + x)               -> log1p(x)
    log1p(exp(x))            -> softplus(x)
    exp(x) - 1               -> expm1(x)
    log(sum(exp(x), axes))   -> logsumexp(x, axes)
    (a / y) * y              -> a                   (the gradient of log(softmax): y underflows to 0)
    y * (a / y - s)          -> a - y * s
"""
from __future__ import annotations

from graphc import ops as F
from ..ir import Graph, apply
from .rewrite import is_const, rebuild, same_type, table_rule

#: ops that pick or rearrange elements without arithmetic: log commutes with them
_GATHERS = ("getitem", "take", "reshape", "transpose", "broadcast_to")


def _log_softmax(node, ins):
    """log(g(softmax(x))) -> g(log_softmax(x)) for g a chain of gathers (x[range, labels] etc.)."""
    chain, t = [], ins[0]
    while t.node.op.name in _GATHERS:
        chain.append(t.node)
        t = t.node.inputs[0]
    if t.node.op.name != "softmax":
        return None
    out = F.log_softmax(t.node.inputs[0], t.node.attrs["axis"])
    for g in reversed(chain):
        out = apply(g.op, out, *g.inputs[1:], **g.attrs)
    return [out]


def _log_sigmoid(node, ins):
    x = ins[0]
    if x.node.op.name == "sigmoid":
        return [F.neg(F.softplus(F.neg(x.node.inputs[0])))]
    if x.node.op.name == "sub" and is_const(x.node.inputs[0], 1):  # log(1 - sigmoid(z))
        s = x.node.inputs[1]
        if s.node.op.name == "sigmoid" and same_type(s, node.outputs[0]):
            return [F.neg(F.softplus(s.node.inputs[0]))]
    return None


def _log1p(node, ins):
    x = ins[0]
    if x.node.op.name != "add":
        return None
    a, b = x.node.inputs
    for one, y in ((a, b), (b, a)):
        if is_const(one, 1) and same_type(y, node.outputs[0]):
            return [F.log1p(y)]
    return None


def _softplus(node, ins):
    x = ins[0]
    if x.node.op.name == "exp" and same_type(x.node.inputs[0], node.outputs[0]):
        return [F.softplus(x.node.inputs[0])]
    return None


def _expm1(node, ins):
    a, b = ins
    if a.node.op.name == "exp" and is_const(b, 1) and same_type(a, node.outputs[0]):
        return [F.expm1(a.node.inputs[0])]
    return None


def _logsumexp(node, ins):
    s = ins[0]
    if s.node.op.name != "sum" or s.node.inputs[0].node.op.name != "exp":
        return None
    x = s.node.inputs[0].node.inputs[0]
    if x.dtype != node.outputs[0].dtype:
        return None
    return [F.logsumexp(x, s.node.attrs["axis"], s.node.attrs["keepdims"])]


def _div_then_mul(node, ins):
    """(a / y) * y -> a and y * (a / y - s) -> a - y * s: a gradient of log(y) meeting y again."""
    for q, y in (ins, ins[::-1]):
        if q.node.op.name == "div" and q.node.inputs[1] is y and same_type(q.node.inputs[0], node.outputs[0]):
            return [q.node.inputs[0]]
        if q.node.op.name == "sub" and q.node.inputs[0].node.op.name == "div":
            d, s = q.node.inputs[0], q.node.inputs[1]
            a = d.node.inputs[0]
            if d.node.inputs[1] is y and same_type(a, node.outputs[0]):
                return [F.sub(a, F.mul(y, s))]
    return None


RULES = {"log": [_log_softmax, _log_sigmoid, _log1p, _logsumexp], "log1p": [_softplus], "sub": [_expm1],
         "mul": [_div_then_mul]}


def stability(graph: Graph, log) -> Graph:
    return rebuild(graph, table_rule(RULES), log, "stabilised")
