"""Algebraic simplification as a table of pattern rewrites: {op name: [rule, ...]}.

A rule gets the node and its rewritten inputs and returns replacement tensors or None. Rules keep
the output's shape and dtype exactly (a broadcasting identity like x*1 with a larger 1 is left alone).
"""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import shapes as _sh
from ..ir import Graph
from .rewrite import const_scalar, is_const, rebuild, same_type, table_rule


def _unit(value, *, swap=True):
    """x op c -> x where c == value (and c op x -> x when `swap`), if x already has the result's type."""
    def rule(node, ins):
        a, b = ins
        out = node.outputs[0]
        if is_const(b, value) and same_type(a, out):
            return [a]
        if swap and is_const(a, value) and same_type(b, out):
            return [b]
        return None
    return rule


def _neg_one_mul(node, ins):
    a, b = ins
    for x, c in ((a, b), (b, a)):
        if is_const(c, -1) and same_type(x, node.outputs[0]):
            return [F.neg(x)]
    return None


def _add_neg(node, ins):
    """x + (-y) -> x - y; (-x) + y -> y - x."""
    a, b = ins
    if b.node.op.name == "neg":
        return [F.sub(a, b.node.inputs[0])]
    if a.node.op.name == "neg":
        return [F.sub(b, a.node.inputs[0])]
    return None


def _sub_rules(node, ins):
    a, b = ins
    out = node.outputs[0]
    if a is b and same_type(a, out):  # x - x (assumes finite x, as every algebraic compiler does)
        if _sh.is_static(out.shape) and _sh.size(out.shape) <= 1 << 16:
            return [F.constant(np.zeros(out.shape, out.dtype))]
        return [F.zeros_like(a)]
    if is_const(a, 0) and same_type(b, out):
        return [F.neg(b)]
    if b.node.op.name == "neg":
        return [F.add(a, b.node.inputs[0])]
    return None


def _inverse(of: str):
    """f(g(x)) -> x where g is the inverse of f (neg(neg x), exp(log x), log(exp x))."""
    def rule(node, ins):
        x = ins[0]
        if x.node.op.name == of and same_type(x.node.inputs[0], node.outputs[0]):
            return [x.node.inputs[0]]
        return None
    return rule


def _transpose_chain(node, ins):
    x = ins[0]
    if x.node.op.name != "transpose":
        return None
    inner, outer = x.node.attrs["axes"], node.attrs["axes"]
    return [F.transpose(x.node.inputs[0], tuple(inner[a] for a in outer))]


def _reshape_chain(node, ins):
    x = ins[0]
    if x.node.op.name != "reshape":
        return None
    return [F.reshape(x.node.inputs[0], node.outputs[0].shape)]


def _broadcast_chain(node, ins):
    x = ins[0]
    if x.node.op.name != "broadcast_to":
        return None
    return [F.broadcast_to(x.node.inputs[0], node.outputs[0].shape)]


def _pow_const(node, ins):
    a, b = ins
    c, out = const_scalar(b), node.outputs[0]
    if c is None or not same_type(a, out):
        return None
    if c == 1:
        return [a]
    if c == 2:
        return [F.mul(a, a)]
    if c == 0.5 and a.dtype in ("float32", "float64"):
        return [F.sqrt(a)]
    return None


def _drop_broadcasts(node, ins):
    """An elementwise op broadcasts by itself: read broadcast_to(y)'s y directly (scalars stay scalars)."""
    if not node.op.elementwise or not any(t.node.op.name == "broadcast_to" for t in ins):
        return None
    new = [t.node.inputs[0] if t.node.op.name == "broadcast_to" else t for t in ins]
    try:
        shape = _sh.broadcast_shapes(*[t.shape for t in new])
    except Exception:
        return None
    out = node.outputs[0]
    if len(shape) != out.ndim or not all(_sh.dims_equal(a, b) for a, b in zip(shape, out.shape)):
        return None
    from .rewrite import clone
    return list(clone(node, new))


def _empty_reduce(node, ins):
    if node.attrs.get("axis") == () and same_type(ins[0], node.outputs[0]):
        return [ins[0]]
    return None


RULES = {
    "add": [_unit(0), _add_neg],
    "sub": [_unit(0, swap=False), _sub_rules],
    "mul": [_unit(1), _neg_one_mul],
    "div": [_unit(1, swap=False)],
    "pow": [_pow_const],
    "neg": [_inverse("neg")],
    "exp": [_inverse("log")],
    "log": [_inverse("exp")],
    "transpose": [_transpose_chain],
    "reshape": [_reshape_chain],
    "broadcast_to": [_broadcast_chain],
    "sum": [_empty_reduce], "max": [_empty_reduce], "min": [_empty_reduce], "prod": [_empty_reduce],
}


def algebraic(graph: Graph, log) -> Graph:
    return rebuild(graph, table_rule(RULES, [_drop_broadcasts]), log, "simplified")
