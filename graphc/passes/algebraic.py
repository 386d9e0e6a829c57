"""Algebraic simplification: a table of `pattern >> replacement` rules (graphc/passes/pattern.py).

Every rule keeps the output's shape and dtype exactly (the pattern language checks it: x*1 with a
larger 1 broadcasting x is left alone). Ops with Trait.COMMUTATIVE match their inputs in either order.
"""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import shapes as _sh
from ..dtypes import is_float
from ..ir import Graph, Trait
from ..ops.shape_ops import BroadcastTo, Reshape, Take, Transpose
from .pattern import Const, P, Rules, V, lazy
from .rewrite import clone, rebuild

x, y = V("x"), V("y")
neg, sqrt = lazy(F.neg), lazy(F.sqrt)
reshape, broadcast_to = lazy(F.reshape), lazy(F.broadcast_to)


def zeros(x):
    """Zeros of x's type: a folded constant when small and static, else zeros_like(x)."""
    if _sh.is_static(x.shape) and _sh.size(x.shape) <= 1 << 16:
        return F.constant(np.zeros(x.shape, x.dtype))
    return F.zeros_like(x)


def transpose_of_transpose(x, t, node):
    """transpose(transpose(x, inner), outer) -> transpose(x, inner[outer])."""
    inner, outer = t.node.attrs["axes"], node.attrs["axes"]
    return F.transpose(x, tuple(inner[a] for a in outer))


def drop_broadcasts(node, ins):
    """An elementwise op broadcasts by itself: read broadcast_to(y)'s y directly (scalars stay scalars)."""
    if not any(t.node.op is BroadcastTo for t in ins):
        return None
    new = [t.node.inputs[0] if t.node.op is BroadcastTo else t for t in ins]
    try:
        shape = _sh.broadcast_shapes(*[t.shape for t in new])
    except Exception:
        return None
    out = node.outputs[0]
    if len(shape) != out.ndim or not all(_sh.dims_equal(a, b) for a, b in zip(shape, out.shape)):
        return None
    return list(clone(node, new))


def take_as_view(x, i, node):
    """take(x, constant indices, axis) -> x[..., i] (a scalar index) or x[..., a:b:s] (indices a, a+s, ...,
    s > 0): basic indexing, a view of x where take copies (ONNX exporters write q, k, v = qkv[0], qkv[1],
    qkv[2] as Gathers). Indices are normalised against the axis' static size; anything out of range, a
    symbolic axis or an index pattern that is no slice stays a take (its bounds check is the take's)."""
    if not i.node.op.has(Trait.CONST) or i.ndim > 1:
        return None
    axis, d = node.attrs["axis"], x.shape[node.attrs["axis"]]
    v = np.asarray(i.node.attrs["value"]).astype(np.int64)
    if not isinstance(d, int) or v.size == 0 or (v < -d).any() or (v >= d).any():
        return None
    v = np.where(v < 0, v + d, v)
    lead = (slice(None),) * axis
    if v.ndim == 0:
        return F.getitem(x, lead + (int(v),))
    step = int(v[1] - v[0]) if v.size > 1 else 1
    if step <= 0 or not np.array_equal(v, v[0] + step * np.arange(v.size)):
        return None
    return F.getitem(x, lead + (slice(int(v[0]), int(v[-1]) + 1, step),))


def _factors(xshape, steps):
    """The chain `steps` (("reshape", shape) / ("transpose", axes), applied in order to a tensor of
    xshape) as factors: each axis of x cut into pieces (outer first) and each output axis a group of
    pieces. Returns (sizes, x's pieces per axis, the output's groups), or None when a reshape cuts a
    piece into parts that do not divide it."""
    sizes, xaxes, groups = [], [], []
    for n in xshape:
        xaxes.append([len(sizes)])
        groups.append([len(sizes)])
        sizes.append(n)
    for kind, arg in steps:
        if kind == "transpose":
            groups = [groups[a] for a in arg]
            continue
        flat = [f for g in groups for f in g if sizes[f] != 1]
        new, i = [], 0
        for n in arg:
            g, need = [], n
            while need > 1:
                if i >= len(flat):
                    return None
                f = flat[i]
                if sizes[f] <= need:
                    if need % sizes[f]:
                        return None
                    need //= sizes[f]
                else:                        # cut piece f: its outer `need` here, the rest next
                    if sizes[f] % need:
                        return None
                    inner = len(sizes)
                    sizes.append(sizes[f] // need)
                    sizes[f] = need
                    ax = next(a for a in xaxes if f in a)
                    ax.insert(ax.index(f) + 1, inner)
                    flat.insert(i + 1, inner)
                    need = 1
                g.append(f)
                i += 1
            new.append(g)
        if i != len(flat):
            return None
        groups = new
    return sizes, xaxes, groups


#: reshapes/transposes layout_chain looks back through (a longer chain is composed from its last ones)
MAX_CHAIN = 8


def layout_chain(node, ins):
    """A chain of three or more reshapes and transposes -> reshape(x, pieces), transpose, reshape: x's axes
    cut into the pieces the chain moves (a split, always a view), the pieces permuted (a view), and pieces
    merged back only where they were neighbours in x (a view of a contiguous x). A torch-exported attention
    splits its heads as reshape (L, B, H*D) -> (L, B*H, D), transpose, reshape (B, H, L, D): the middle
    shape merges B with H, which no strides can express, so a backend copied every Q, K and V; the
    composed form (L, B, H, D) transposed to (B, H, L, D) copies nothing. Static shapes only."""
    steps, t = [], node.outputs[0]
    cur = node
    while cur.op in (Reshape, Transpose) and len(steps) < MAX_CHAIN:   # bounded: linear in the graph
        steps.append(("transpose", tuple(cur.attrs["axes"])) if cur.op is Transpose
                     else ("reshape", tuple(cur.outputs[0].shape)))
        src = ins[0] if cur is node else cur.inputs[0]
        cur = src.node
    if len(steps) < 3 or 0 in src.shape or not all(
            isinstance(d, int) for d in (*src.shape, *[d for k, a in steps if k == "reshape" for d in a])):
        return None
    got = _factors(tuple(src.shape), steps[::-1])
    if got is None:
        return None
    sizes, xaxes, groups = got
    order = [f for ax in xaxes for f in ax if sizes[f] != 1]
    pos = {f: i for i, f in enumerate(order)}
    for g in groups:                         # merged pieces must be neighbours of x, in order
        if any(pos[b] != pos[a] + 1 for a, b in zip(g, g[1:])):
            return None
    out_order = [f for g in groups for f in g]
    pieces = tuple(sizes[f] for f in order)
    perm = tuple(pos[f] for f in out_order)
    n_ops = (pieces != tuple(src.shape)) + (perm != tuple(range(len(perm)))) + (
        tuple(sizes[f] for f in out_order) != tuple(t.shape))
    if n_ops >= len(steps):
        return None
    y = src if pieces == tuple(src.shape) else F.reshape(src, pieces)
    if perm != tuple(range(len(perm))):
        y = F.transpose(y, perm)
    return [y if tuple(y.shape) == tuple(t.shape) else F.reshape(y, tuple(t.shape))]


RULES = Rules([
    P(F.add, x, Const(0)) >> x,                      # and 0 + x (add is commutative)
    P(F.add, x, P(F.neg, y)) >> x - y,               # and (-y) + x
    P(F.sub, x, Const(0)) >> x,
    P(F.sub, x, x) >> zeros,                         # assumes finite x, as every algebraic compiler does
    P(F.sub, Const(0), y) >> neg(y),
    P(F.sub, x, P(F.neg, y)) >> x + y,
    P(F.mul, x, Const(1)) >> x,
    P(F.mul, x, Const(-1)) >> neg(x),
    P(F.div, x, Const(1)) >> x,
    P(F.pow, x, Const(1)) >> x,
    P(F.pow, x, Const(2)) >> x * x,
    P(F.pow, V("x", dtype=is_float), Const(0.5)) >> sqrt(x),
    P(F.neg, P(F.neg, x)) >> x,
    P(F.exp, P(F.log, x)) >> x,
    P(F.log, P(F.exp, x)) >> x,
    P(Transpose, P(Transpose, x, name="t")) >> transpose_of_transpose,
    P(Reshape, P(Reshape, x), name="r") >> reshape(x, V("r").shape),
    P(BroadcastTo, P(BroadcastTo, x), name="b") >> broadcast_to(x, V("b").shape),
    P(Reshape) >> layout_chain,
    P(Transpose) >> layout_chain,
    P(Trait.MONOID, x, attrs={"axis": ()}) >> x,     # a reduction over no axes
    P(Take, x, V("i")) >> take_as_view,              # constant indices forming a slice: a view
    P(Trait.ELEMENTWISE) >> drop_broadcasts,
])


def algebraic(graph: Graph, log) -> Graph:
    return rebuild(graph, RULES, log, "simplified")
