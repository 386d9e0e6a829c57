"""ONNX Attention (opset 23+): scaled dot-product attention with masks, causal/sliding windows,
KV cache, grouped-query heads and soft-capping, composed from graphc ops.

The additive bias (mask, causal frontier, window, padding) is built as a constant wherever it
depends only on shapes and attributes; a fed mask joins it as a tensor. Fully masked query rows
give zero output, never NaN (the spec's rule).
"""
from __future__ import annotations

import numpy as np

import graphc as gc
from .onnx_ops import op
from .onnx_shape_ops import pad_axis


def _heads(x, n_heads):
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hd = x.shape
    return gc.transpose(gc.reshape(x, (b, s, n_heads, hd // n_heads)), (0, 2, 1, 3))


def _repeat_heads(x, reps):
    """np.repeat(x, reps, axis=1) for (B, H, S, D)."""
    if reps == 1:
        return x
    b, h, s, d = x.shape
    return gc.reshape(gc.broadcast_to(gc.reshape(x, (b, h, 1, s, d)), (b, h, reps, s, d)), (b, h * reps, s, d))


def _neg_inf_where_false(allowed: np.ndarray, dtype) -> np.ndarray:
    return np.where(allowed, dtype.type(0), dtype.type(-np.inf))


def _geometry_bias(q, kv, offset, causal, left, right, nonpad, dtype):
    """Constant bias from causal frontier, sliding window and key padding ((q,kv) or (B,1,q,kv))."""
    i = np.arange(q).reshape(q, 1)
    j = np.arange(kv).reshape(1, kv)
    off = np.reshape(offset, (-1, 1, 1)) if np.ndim(offset) else offset
    diff = i + off - j
    allowed = np.ones(np.shape(diff), bool)
    if causal:
        allowed &= diff >= 0
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    bias = _neg_inf_where_false(allowed, dtype)
    if np.ndim(offset):
        bias = bias.reshape(bias.shape[0], 1, q, kv)
    if nonpad is not None:
        pad = _neg_inf_where_false(np.arange(kv) < nonpad[:, None], dtype).reshape(len(nonpad), 1, 1, kv)
        bias = bias + pad
    return bias


def _mask_bias(cx, mask, kv, dtype):
    """A fed attn_mask as an additive bias, its key axis padded to the full key length."""
    width = kv - mask.shape[-1]
    if width > 0:
        fill = False if mask.dtype == "bool" else -np.inf
        mask = pad_axis(cx, mask, mask.ndim - 1, 0, width, "constant", fill)
    if mask.dtype == "bool":
        return gc.where(mask, gc.constant(np.zeros((), dtype)), gc.constant(np.asarray(-np.inf, dtype)))
    return mask


def _safe_softmax(x):
    """Softmax whose fully -inf rows give zeros (not NaN)."""
    m = gc.max(x, -1, keepdims=True)
    m = gc.where(gc.equal(m, -np.inf), gc.zeros_like(m), m)
    e = gc.exp(x - m)
    s = gc.sum(e, -1, keepdims=True)
    return e / gc.where(gc.equal(s, 0.0), gc.ones_like(s), s)


@op("Attention")
def _attention(cx, ins, a):
    ins = list(ins) + [None] * (7 - len(ins))
    Q, K, V, mask, past_k, past_v, nonpad_t = ins
    rank3 = Q.ndim == 3
    if rank3:
        Q, K, V = _heads(Q, a["q_num_heads"]), _heads(K, a["kv_num_heads"]), _heads(V, a["kv_num_heads"])
    dtype = np.dtype(Q.dtype)
    scale = a.get("scale", 1 / np.sqrt(Q.shape[3]))
    s = dtype.type(np.sqrt(scale))
    if past_k is not None:
        K, V = gc.concatenate([past_k, K], 2), gc.concatenate([past_v, V], 2)
    present_k, present_v = K, V
    q, kv = Q.shape[2], K.shape[2]
    nonpad = cx.const(nonpad_t, "nonpad_kv_seqlen").reshape(-1) if nonpad_t is not None else None
    offset = past_k.shape[2] if past_k is not None else (nonpad - q if nonpad is not None else 0)
    left, right, causal = a.get("left_window_size", -1), a.get("right_window_size", -1), a.get("is_causal", 0)
    bias_np = _geometry_bias(q, kv, offset, causal, left, right, nonpad, dtype)
    bias = gc.constant(bias_np)
    if mask is not None:
        bias = bias + _mask_bias(cx, mask, kv, dtype)
    reps = Q.shape[1] // K.shape[1]
    K, V = _repeat_heads(K, reps), _repeat_heads(V, reps)
    qk = gc.matmul(Q * s, gc.transpose(K, (0, 1, 3, 2)) * s)
    cap = a.get("softcap", 0.0)
    if cap and cap > 0:
        qk = gc.tanh(qk / cap) * cap
    qk_bias = qk + bias
    mode = a.get("qk_matmul_output_mode", 0)
    p = _safe_softmax(qk_bias)
    row_masked = gc.equal(gc.max(bias, -1, keepdims=True), -np.inf)
    p = gc.where(row_masked, gc.zeros_like(p), p)
    qk_out = {2: qk_bias, 3: p}.get(mode, qk)
    y = gc.matmul(p, V)
    if rank3:
        b, h, sq, d = y.shape
        y = gc.reshape(gc.transpose(y, (0, 2, 1, 3)), (b, sq, h * d))
    return [y, present_k, present_v, qk_out][:cx.n_out]


@op("RotaryEmbedding")
def _rotary(cx, ins, a):
    """RoPE: rotate pairs (halves, or interleaved neighbours) of each head by position angles."""
    x, cos, sin = ins[:3]
    pos = ins[3] if len(ins) > 3 else None
    shape4 = x.ndim == 4
    t = gc.transpose(x, (0, 2, 1, 3)) if shape4 else x          # (B, S, H, D) or (B, S, hidden)
    if not shape4:
        b, s, hidden = t.shape
        t = gc.reshape(t, (b, s, a["num_heads"], hidden // a["num_heads"]))
    d = t.shape[3]
    rd = a.get("rotary_embedding_dim", 0) or d
    if pos is not None:
        cos, sin = gc.take(cos, pos, 0), gc.take(sin, pos, 0)
    cos, sin = gc.expand_dims(cos, 2), gc.expand_dims(sin, 2)  # (B, S, 1, rd/2)
    rot, keep = t[:, :, :, :rd], t[:, :, :, rd:]
    if a.get("interleaved", 0):
        x1, x2 = rot[:, :, :, 0::2], rot[:, :, :, 1::2]
    else:
        x1, x2 = rot[:, :, :, :rd // 2], rot[:, :, :, rd // 2:]
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if a.get("interleaved", 0):
        rot = gc.reshape(gc.stack([real, imag], -1), rot.shape)
    else:
        rot = gc.concatenate([real, imag], -1)
    out = gc.concatenate([rot, keep], -1) if rd < d else rot
    return gc.transpose(out, (0, 2, 1, 3)) if shape4 else gc.reshape(out, x.shape)
