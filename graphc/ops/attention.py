"""Scaled dot-product attention as one primitive: softmax(Q K^T * scale [+ mask]) V.

`scaled_dot_product_attention` (gc.scaled_dot_product_attention, torch's signature) builds it; the
optimiser's attention pass (graphc/passes/attention.py) also finds the same computation written out of
matmul / softmax ops (gc.nn.MultiheadAttention, an imported ONNX model) and replaces it with this op,
so a native backend can run it as one kernel that never materialises the (L, S) scores (llvm:
backends/llvm/attention.py). `composition` is the same computation out of existing ops: the gradient,
and what a backend without a fused kernel plans instead (cuda)."""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, GraphcError, ShapeError
from ..ir import Graph, Op, Tensor, Trait, apply, register
from .core import PlaceholderOp, _leaf, as_tensor


def _bshape(*shapes):
    return _sh.broadcast_shapes(*shapes, op="scaled_dot_product_attention")


@register
class ScaledDotProductAttention(Op):
    """inputs q (..., L, E), k (..., S, E), v (..., S, Ev) and optionally an additive float mask that
    broadcasts to (..., L, S); attr `scale` (a float). Output (..., L, Ev); batch dims broadcast."""
    name = "scaled_dot_product_attention"
    traits = Trait.CONTRACTION | Trait.FRESH

    def infer(self, inputs, scale):
        if len(inputs) not in (3, 4):
            raise GraphcError(f"scaled_dot_product_attention takes q, k, v and an optional mask, got "
                              f"{len(inputs)} inputs")
        q, k, v = inputs[:3]
        for t in inputs:
            if not _dt.is_float(t.dtype) or t.dtype != q.dtype:
                raise DTypeError("scaled_dot_product_attention: q, k, v (and mask) must share one float dtype, "
                                 f"got {', '.join(t.dtype for t in inputs)}")
        if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
            raise ShapeError("scaled_dot_product_attention: q, k, v must have rank >= 2 (..., seq, features)")
        if not _sh.dims_equal(q.shape[-1], k.shape[-1]):
            raise ShapeError(f"scaled_dot_product_attention: q {_sh.fmt_shape(q.shape)} and k "
                             f"{_sh.fmt_shape(k.shape)} differ in their feature dim")
        if not _sh.dims_equal(k.shape[-2], v.shape[-2]):
            raise ShapeError(f"scaled_dot_product_attention: k {_sh.fmt_shape(k.shape)} and v "
                             f"{_sh.fmt_shape(v.shape)} differ in their sequence dim")
        batch = _bshape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        scores = batch + (q.shape[-2], k.shape[-2])
        if len(inputs) == 4:
            m = inputs[3]
            if m.ndim > len(scores) or not all(_sh.dims_equal(a, 1) or _sh.dims_equal(a, b)
                                               for a, b in zip(m.shape[::-1], scores[::-1])):
                raise ShapeError(f"scaled_dot_product_attention: mask {_sh.fmt_shape(m.shape)} does not broadcast "
                                 f"to the scores {_sh.fmt_shape(scores)}")
        return [(batch + (q.shape[-2], v.shape[-1]), q.dtype)]

    @_dt.via_float32
    def impl(self, q, k, v, *mask, scale):
        # the scale applied to q first, as gc.nn.MultiheadAttention writes it (the pass's replacement of that
        # graph then computes bit for bit what the graph did)
        s = np.matmul(q * np.asarray(scale, q.dtype), np.swapaxes(k, -1, -2))
        if mask:
            s = s + mask[0]
        e = np.exp(s - np.max(s, axis=-1, keepdims=True))
        return np.matmul(e / np.sum(e, axis=-1, keepdims=True), v).astype(q.dtype, copy=False)

    def vjp(self, node, gouts):
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) == 4 else None
        g, c = gouts[0], node.attrs["scale"]
        p = F.softmax(_scores(q, k, mask, c), -1)                # recomputed, (..., L, S)
        gv = F.matmul(F.swapaxes(p, -1, -2), g)
        gp = F.matmul(g, F.swapaxes(v, -1, -2))
        gs = p * (gp - F.sum(gp * p, -1, keepdims=True))         # softmax's vjp
        gq = F.matmul(gs, k) * c
        gk = F.matmul(F.swapaxes(gs, -1, -2), q) * c
        out = [F.sum_to(gq, q.shape), F.sum_to(gk, k.shape), F.sum_to(gv, v.shape)]
        if mask is not None:
            out.append(F.sum_to(gs, mask.shape))
        return out


def _scores(q, k, mask, scale):
    s = F.matmul(q * F.constant(np.asarray(scale, q.dtype), q.dtype), F.swapaxes(k, -1, -2))
    return s if mask is None else s + mask


def composition(q, k, v, mask=None, scale=1.0) -> Tensor:
    """The same result out of matmul / softmax (no attention op): what a backend without a fused kernel
    runs, and the reference of the tests."""
    return F.matmul(F.softmax(_scores(q, k, mask, scale), -1), v)


def composition_body(node) -> Graph:
    """A Graph computing `node` (a scaled_dot_product_attention) by `composition`, its placeholders standing
    for node.inputs (same shapes and dtypes): a backend plans it node by node (Schedule.walk_body)."""
    phs = [_leaf(PlaceholderOp, t.shape, t.dtype, f"sdpa_in{i}") for i, t in enumerate(node.inputs)]
    out = composition(*phs[:3], phs[3] if len(phs) == 4 else None, node.attrs["scale"])
    return Graph(phs, [out], name="scaled_dot_product_attention")


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention (no dropout): softmax(q k^T * scale + mask) v.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev); batch dims broadcast. scale
    defaults to 1/sqrt(E). attn_mask broadcasts to (..., L, S): a bool mask (True = may attend, torch's
    convention) or a float mask added to the scores. is_causal=True masks key j > query i (no attn_mask
    then). One op: native backends run it as one fused kernel."""
    q, k, v = as_tensor(query), as_tensor(key), as_tensor(value)
    if q.ndim < 2:
        raise ShapeError(f"scaled_dot_product_attention: query {q.label} must be (..., L, E), got "
                         f"{_sh.fmt_shape(q.shape)}")
    E = q.shape[-1]
    if scale is None:
        if not isinstance(E, (int, np.integer)):
            raise ShapeError("scaled_dot_product_attention: give scale= for a symbolic feature dim")
        scale = 1.0 / float(np.sqrt(E))
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise GraphcError(f"scaled_dot_product_attention: scale must be a number, got {scale!r}")
    dtype = q.dtype
    mask = None
    if is_causal:
        if attn_mask is not None:
            raise GraphcError("scaled_dot_product_attention: give attn_mask or is_causal=True, not both")
        L, S = q.shape[-2], k.shape[-2]
        if not all(isinstance(d, (int, np.integer)) for d in (L, S)):
            raise ShapeError("scaled_dot_product_attention: is_causal needs static sequence lengths")
        keep = np.tril(np.ones((int(L), int(S)), bool))
        mask = F.constant(np.where(keep, 0, -np.inf).astype(_dt.np_dtype(dtype)), dtype)
    elif attn_mask is not None:
        m = as_tensor(attn_mask if isinstance(attn_mask, Tensor) else np.asarray(attn_mask))
        if m.dtype == "bool":
            mask = F.where(m, F.constant(np.asarray(0, _dt.np_dtype(dtype)), dtype),
                           F.constant(np.asarray(-np.inf, _dt.np_dtype(dtype)), dtype))
        elif _dt.is_float(m.dtype):
            mask = m if m.dtype == dtype else F.cast(m, dtype)
        else:
            raise DTypeError(f"scaled_dot_product_attention: attn_mask must be bool (True = may attend) or float, "
                             f"got {m.dtype}")
    ins = (q, k, v) if mask is None else (q, k, v, mask)
    return apply(ScaledDotProductAttention, *ins, scale=float(scale))
