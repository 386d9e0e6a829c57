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
    return gc.nn_ops.rotary_embedding(x, cos, sin, pos, bool(a.get("interleaved", 0)),
                                      a.get("rotary_embedding_dim", 0) or None, a.get("num_heads"))


def _f32(t):
    """Half-precision tensors computed in float32 (as the ONNX reference does), others as they are."""
    return gc.cast(t, "float32") if t is not None and t.dtype in ("float16", "bfloat16") else t


@op("ai.onnx.preview.FlexAttention")
def _flex_attention(cx, ins, a):
    """softmax(score_mod(scale * Q K^T)) -> prob_mod -> @ V, K/V heads shared by query-head groups."""
    from .onnx_import import import_subgraph
    Q, K, V = ins[:3]
    reps = Q.shape[1] // K.shape[1]
    K, V = _repeat_heads(K, reps), _repeat_heads(V, reps)
    prec = "float64" if Q.dtype == "float64" else "float32"
    if a.get("softmax_precision"):
        from .onnx_import import onnx_dtype
        prec = onnx_dtype(a["softmax_precision"])
    scale = a.get("scale", 1 / np.sqrt(Q.shape[3]))
    s = np.sqrt(scale)
    scores = gc.cast(gc.matmul(Q * s, gc.transpose(K * s, (0, 1, 3, 2))), prec)
    if "score_mod" in a:
        scores = import_subgraph(cx, a["score_mod"], [scores])[0]
    p = _safe_softmax(scores)
    if "prob_mod" in a:
        p = import_subgraph(cx, a["prob_mod"], [p])[0]
    return gc.matmul(gc.cast(p, Q.dtype), V)


@op("LinearAttention")
def _linear_attention(cx, ins, a):
    """Recurrent linear attention, unrolled over the (static) sequence: per step the state
    S (B, Hkv, Dk, Dv) decays by exp(g) (gated), is corrected towards v by beta (delta rule),
    takes k (x) v, and is read by the scaled query (K/V heads shared by query-head groups)."""
    ins = list(ins) + [None] * (6 - len(ins))
    q, k, v, past, decay, beta = ins[:6]
    hq, hkv = a["q_num_heads"], a["kv_num_heads"]
    rule = a.get("update_rule", "gated_delta")
    out_dtype, state_dtype = q.dtype, (past.dtype if past is not None else q.dtype)
    q4, k4, v4 = (_f32(_heads(t, h)) for t, h in ((q, hq), (k, hkv), (v, hkv)))
    b, _, t_len, dk = k4.shape
    dv = v4.shape[3]
    if decay is not None:
        decay = _f32(decay)
        decay = _heads(decay, hkv) if decay.shape[2] == hkv * dk else \
            gc.transpose(gc.reshape(decay, (b, t_len, hkv, 1)), (0, 2, 1, 3))
    if beta is not None:
        beta = gc.transpose(gc.reshape(_f32(beta), (b, t_len, beta.shape[2], 1)), (0, 2, 1, 3))
    state = _f32(past) if past is not None else gc.constant(np.zeros((b, hkv, dk, dv), np.float32))
    scale = a.get("scale", 0.0) or 1 / np.sqrt(q4.shape[3])
    group = hq // hkv
    outs = []
    for i in range(t_len):
        k_t, v_t = k4[:, :, i, :], v4[:, :, i, :]                       # (B, Hkv, Dk), (B, Hkv, Dv)
        if rule in ("gated", "gated_delta"):
            state = state * gc.expand_dims(gc.exp(decay[:, :, i, :]), -1)
        if rule in ("delta", "gated_delta"):
            retrieved = gc.squeeze(gc.matmul(gc.expand_dims(k_t, 2), state), 2)   # (B, Hkv, Dv)
            v_t = beta[:, :, i, :] * (v_t - retrieved)
        state = state + gc.expand_dims(k_t, -1) * gc.expand_dims(v_t, 2)
        read = _repeat_heads(state, group)                                # (B, Hq, Dk, Dv)
        outs.append(gc.squeeze(gc.matmul(gc.expand_dims(q4[:, :, i, :], 2), read), 2) * scale)
    y = gc.stack(outs, 2)                                                 # (B, Hq, T, Dv)
    y = gc.reshape(gc.transpose(y, (0, 2, 1, 3)), (b, t_len, hq * dv))
    return [gc.cast(y, out_dtype), gc.cast(state, state_dtype)][:cx.n_out]


@op("CausalConvWithState")
def _causal_conv_with_state(cx, ins, a):
    """Depthwise causal 1-D convolution over [past_state, input] (kernel k), optional SiLU; the
    last k - 1 positions of that padded input are the present state."""
    ins = list(ins) + [None] * (4 - len(ins))
    x, w, bias, past = ins[:4]
    b, c, length = x.shape
    k = w.shape[2]
    if past is None:
        past = gc.constant(np.zeros((b, c, k - 1), x.dtype))
    padded = gc.concatenate([past, x], 2) if k > 1 else x
    xf, wf = _f32(padded), _f32(w)
    y = None
    for j in range(k):
        term = xf[:, :, j:j + length] * gc.reshape(wf[:, 0, j], (c, 1))
        y = term if y is None else y + term
    if bias is not None:
        y = y + gc.reshape(_f32(bias), (c, 1))
    y = gc.cast(y, x.dtype)
    if a.get("activation", "none") in ("silu", "swish"):
        yf = _f32(y)
        y = gc.cast(yf * gc.sigmoid(yf), x.dtype)
    present = padded[:, :, padded.shape[2] - (k - 1):] if k > 1 else gc.constant(np.zeros((b, c, 0), x.dtype))
    return [y, present][:cx.n_out]


@op("SwiGLU")
def _swiglu(cx, ins, a):
    """a * sigmoid(alpha * a) * b (the sigmoid rounded to the input dtype, as the reference does)."""
    x, y = ins[:2]
    alpha = a.get("alpha", 1.0)
    gate = gc.cast(gc.sigmoid(_f32(x) * alpha), x.dtype)
    return x * gate * y


@op("TensorScatter")
def _tensor_scatter(cx, ins, a):
    """KV-cache write: present[b, ..., write_indices[b] + j (mod max_len if circular), ...] = update[b, ..., j, ...]."""
    past, update = ins[0], ins[1]
    idx = ins[2] if len(ins) > 2 else None
    axis = a.get("axis", -2) % past.ndim
    max_len, seq = past.shape[axis], update.shape[axis]
    if idx is None:
        idx = gc.constant(np.zeros((past.shape[0],), np.int64))
    idx = gc.cast(idx, "int64")
    shape = [1] * past.ndim
    shape[0] = past.shape[0]
    start = gc.reshape(idx, tuple(shape) + (1,))                          # (B, 1.., 1) + update axis
    pos_shape = [1] * (past.ndim + 1)
    pos_shape[axis] = max_len
    src_shape = [1] * (past.ndim + 1)
    src_shape[-1] = seq
    pos = gc.constant(np.arange(max_len, dtype=np.int64).reshape(pos_shape))
    j = gc.constant(np.arange(seq, dtype=np.int64).reshape(src_shape))
    target = start + j
    if a.get("mode", "linear") == "circular":
        target = gc.where(gc.greater_equal(target, max_len), target - max_len, target)
    hit = gc.equal(pos, target)                                           # (..., max_len at axis, ..., seq)
    upd = gc.expand_dims(gc.transpose(update, tuple(i for i in range(update.ndim) if i != axis) + (axis,)), axis)
    written = gc.sum(gc.where(hit, upd, gc.zeros_like(upd)), -1)
    any_hit = gc.max(gc.cast(hit, "int32"), -1)
    return gc.where(gc.greater(any_hit, 0), gc.cast(written, past.dtype), past)
