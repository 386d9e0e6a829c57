"""Attention: softmax((Q @ K^T) * s [+ mask]) @ V, written out of matmul / softmax ops, becomes one
scaled_dot_product_attention node (graphc/ops/attention.py), which native backends run as one fused
kernel that never materialises the (L, S) scores.

The pattern, in any graph (gc.nn.MultiheadAttention, an ONNX model's MatMul/Mul/Div/Add/Softmax/MatMul):
    matmul(softmax(X, axis=last), V)          the softmax read by nothing else
    X = scores [+ mask [+ mask ...]]           masks: float, broadcasting to the scores' shape
    scores = matmul(A, B) [* c | / c ...]      c: scalar constants (also on A = Q * c and B = K^T * c)
    B = K^T: any tensor; K is B with its last two axes swapped (a transpose feeding B is composed away)
All operands share one float dtype and the batch dims broadcast as matmul's do. Anything else (another
softmax axis, a mask that would enlarge the scores, a scale that is no constant, a scaled sum of
scores and mask, the weights also used elsewhere) is left as it is."""
from __future__ import annotations

from graphc import ops as F
from .. import shapes as _sh
from ..ir import Graph
from ..ops.attention import ScaledDotProductAttention
from ..ops.elementwise import add, div, mul
from ..ops.linalg import MatMul
from ..ops.reduce import Softmax
from ..ops.shape_ops import Transpose
from .rewrite import const_scalar, rebuild, unchanged, users


def _strip_scale(t):
    """(t without scalar-constant multiplications/divisions, their product)."""
    scale = 1.0
    while t.node.op in (mul.op, div.op):
        a, b = t.node.inputs
        c = const_scalar(b)
        if c is None and t.node.op is mul.op:
            a, b = b, a
            c = const_scalar(b)
        if c is None or not isinstance(c, (int, float)) or (t.node.op is div.op and c == 0) \
                or not _same_shape(a, t):
            break
        scale = scale * c if t.node.op is mul.op else scale / c
        t = a
    return t, scale


def _same_shape(a, b) -> bool:
    return a.ndim == b.ndim and all(_sh.dims_equal(x, y) for x, y in zip(a.shape, b.shape))


def _fits(mask, scores) -> bool:
    """mask broadcasts to the scores' shape without enlarging it."""
    return mask.ndim <= scores.ndim and all(
        _sh.dims_equal(m, 1) or _sh.dims_equal(m, s) for m, s in zip(mask.shape[::-1], scores.shape[::-1]))


def _scores(x):
    """(matmul output, scale, masks) when x is matmul(..)[*c] [+ mask ...], else None."""
    masks = []
    while x.node.op is add.op:
        a, b = x.node.inputs
        if _scores(a) is None:
            a, b = b, a
        if not _fits(b, x) or not _same_shape(a, x):
            return None
        masks.append(b)
        x = a
    mm, scale = _strip_scale(x)
    if mm.node.op is not MatMul:
        return None
    return mm, scale, masks[::-1]


def _swap_last(t):
    """t with its last two axes swapped (a transpose feeding t is composed with the swap)."""
    axes = list(range(t.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    if t.node.op is Transpose:
        inner = t.node.attrs["axes"]
        return F.transpose(t.node.inputs[0], tuple(inner[a] for a in axes))
    return F.transpose(t, tuple(axes))


def match(node, ins, readers=None, roots=frozenset()):
    """The scaled_dot_product_attention replacing matmul `node` (inputs `ins`), or None."""
    if node.op is not MatMul:
        return None
    p, v = ins
    sm = p.node
    if sm.op is not Softmax or sm.attrs["axis"] != p.ndim - 1 or p.ndim != v.ndim:
        return None
    if readers is not None and (id(node.inputs[0]) in roots or len(readers.get(id(node.inputs[0]), ())) != 1):
        return None   # the weights are also read elsewhere: computing them once stays cheaper
    found = _scores(sm.inputs[0])
    if found is None:
        return None
    mm, scale, masks = found
    q, sq = _strip_scale(mm.node.inputs[0])
    kt, sk = _strip_scale(mm.node.inputs[1])
    if q.ndim != kt.ndim or q.ndim != v.ndim:
        return None
    k = _swap_last(kt)
    dtype = v.dtype
    if any(t.dtype != dtype for t in [q, k, p, *masks]):
        return None
    mask = None
    for m in masks:
        mask = m if mask is None else mask + m
    scale = float(scale * sq * sk)
    from ..ir import apply
    ins = (q, k, v) if mask is None else (q, k, v, mask)
    try:
        out = apply(ScaledDotProductAttention, *ins, scale=scale)
    except Exception:   # shapes that only matmul's broadcasting accepts: leave the pattern
        return None
    return [out]


def attention(graph: Graph, log) -> Graph:
    """Replace each attention pattern (module docstring) by one scaled_dot_product_attention node."""
    if not any(n.op is Softmax for n in graph.nodes):   # every pattern reads a softmax
        return unchanged(graph)
    readers = users(graph)
    roots = frozenset(id(t) for t in graph.roots)

    def rule(node, ins):
        return match(node, ins, readers, roots)
    return rebuild(graph, rule, log, "attention fused")
