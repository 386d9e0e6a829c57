"""Attention with PyTorch's signatures and weight layouts: `multi_head_attention` (the functional form,
weights as arguments), `MultiheadAttention` and `TransformerEncoderLayer`.

Both modules load a torch `state_dict()` unchanged (`in_proj_weight` (3E, E), `in_proj_bias` (3E,),
`out_proj.weight/bias`, or `q_proj_weight`/`k_proj_weight`/`v_proj_weight` when kdim/vdim differ from
embed_dim; the encoder layer adds `self_attn.*`, `linear1`, `linear2`, `norm1`, `norm2`; the encoder stacks
them as `layers.0.*`, `layers.1.*`, ... and an optional final `norm.*`) and compute what torch computes: scaled dot-product attention per head, boolean masks (True = may
not attend) or float masks (added to the scores), dropout on the attention weights in training.
Everything is built from differentiable graphc ops, so it compiles on every backend."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from graphc import ops as F
from .. import init as _init
from ..errors import DTypeError, GraphcError, ShapeError
from ..ir import Tensor
from ..ops import nn_ops as N
from ..ops.random import Generator
from .layers import Dense, Dropout, LayerNorm, _at
from .module import Module, ModuleList, _is_layer, call_layer

__all__ = ["multi_head_attention", "MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder"]


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _same(a, b) -> bool:
    """Two dims may be equal: concrete dims must match; a symbolic one (the batch) is checked when the
    function is called (graphc unifies it with the other dim when they meet in an op)."""
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(a) == int(b)
    return True


def _each_once(fn, ts) -> list:
    """fn of each tensor, computed once per distinct tensor (self-attention's q, k, v stay one tensor, so
    multi_head_attention can project them with one packed GEMM)."""
    done = {}
    return [done[id(t)] if id(t) in done else done.setdefault(id(t), fn(t)) for t in ts]


def _additive_mask(mask, dtype: str, what: str) -> Tensor:
    """A boolean mask (True = masked) as 0 / -inf, or a float mask as is, in the scores' dtype."""
    if not isinstance(mask, Tensor):
        mask = np.asarray(mask)
        mask = mask.astype(dtype) if mask.dtype.kind == "f" else mask
    m = F.as_tensor(mask)
    if m.dtype == "bool":
        return F.where(m, F.constant(np.asarray(-np.inf, dtype), dtype), F.constant(np.asarray(0, dtype), dtype))
    if m.dtype in ("float32", "float64"):
        return m if m.dtype == dtype else F.cast(m, dtype)
    raise DTypeError(f"multi_head_attention: {what} must be a bool mask (True = not attended) or a float mask "
                     f"(added to the scores), got dtype {m.dtype}" + _at())


def _add_mask(scores, m, what: str, expected: str, shown=None) -> Tensor:
    try:
        return scores + m
    except ShapeError:
        raise ShapeError(f"multi_head_attention: {what} has shape {_fmt(shown or m.shape)}, expected {expected}; "
                         "(a mask with a fixed batch fixes a symbolic batch to that size, checked at call time; "
                         "a mask with another symbolic batch does not broadcast)"
                         + _at()) from None


def multi_head_attention(query, key, value, num_heads: int, in_proj_weight, in_proj_bias=None,
                         out_proj_weight=None, out_proj_bias=None, key_padding_mask=None, attn_mask=None,
                         need_weights: bool = True, average_attn_weights: bool = True, dropout_p: float = 0.0,
                         training: bool = False, generator: Generator | None = None, q_proj_weight=None,
                         k_proj_weight=None, v_proj_weight=None):
    """torch.nn.functional.multi_head_attention_forward in batch-first layout.

    query (N, L, E), key (N, S, E), value (N, S, E); in_proj_weight (3E, E) stacks W_q, W_k, W_v
    (in_proj_bias (3E,)); out_proj_weight (E, E). With in_proj_weight=None the projections are separate
    (torch's use_separate_proj_weight): q_proj_weight (E, E), k_proj_weight (E, kdim) for a key
    (N, S, kdim), v_proj_weight (E, vdim) for a value (N, S, vdim). key_padding_mask (N, S) and attn_mask (L, S) or
    (N * num_heads, L, S): bool (True = not attended) or float (added to the scores). Returns
    (out (N, L, E), weights): weights are (N, L, S) averaged over heads, (N, num_heads, L, S) with
    average_attn_weights=False, or None with need_weights=False."""
    q, k, v = F.as_tensor(query), F.as_tensor(key), F.as_tensor(value)
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.ndim != 3:
            raise ShapeError(f"multi_head_attention: {name} {t.label} has shape {_fmt(t.shape)}, expected "
                             "(batch, seq, embed_dim)" + _at())
    E = q.shape[-1]
    separate = in_proj_weight is None
    if separate:
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise GraphcError("multi_head_attention: give in_proj_weight, or all of q_proj_weight, k_proj_weight "
                              "and v_proj_weight (separate projections)" + _at())
        w_sep = [F.as_tensor(w) for w in (q_proj_weight, k_proj_weight, v_proj_weight)]
        for name, w, t in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), w_sep, (q, k, v)):
            if w.ndim != 2 or not _same(w.shape[0], E) or not _same(w.shape[1], t.shape[-1]):
                raise ShapeError(f"multi_head_attention: {name} has shape {_fmt(w.shape)}, expected (embed_dim, "
                                 f"{name[0]}dim) = ({E}, {t.shape[-1]}) for a {dict(q='query', k='key', v='value')[name[0]]}"
                                 f" of shape {_fmt(t.shape)}" + _at())
    else:
        if q_proj_weight is not None or k_proj_weight is not None or v_proj_weight is not None:
            raise GraphcError("multi_head_attention: give in_proj_weight or the separate q/k/v_proj_weight, "
                              "not both" + _at())
        w_in = F.as_tensor(in_proj_weight)
        if w_in.ndim != 2 or not _same(w_in.shape[1], E) or not _same(w_in.shape[0], 3 * E):
            raise ShapeError(f"multi_head_attention: in_proj_weight has shape {_fmt(w_in.shape)}, expected "
                             f"(3 * embed_dim, embed_dim) = ({3 * E}, {E})" + _at())
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or E % num_heads:
        raise GraphcError(f"multi_head_attention: num_heads must be a positive int dividing embed_dim={E}, "
                          f"got {num_heads!r}" + _at())
    for name, t in (("key", k), ("value", v)):
        if not separate and not _same(t.shape[-1], E):
            raise ShapeError(f"multi_head_attention: {name} {t.label} has shape {_fmt(t.shape)}, last dim should "
                             f"be embed_dim={E} (a {name} of another size needs separate projection weights: "
                             f"MultiheadAttention(..., {name[0]}dim=))" + _at())
        if not _same(t.shape[0], q.shape[0]):
            raise ShapeError(f"multi_head_attention: {name} {t.label} has batch {t.shape[0]}, query has "
                             f"{q.shape[0]}" + _at())
    if not _same(k.shape[1], v.shape[1]):
        raise ShapeError(f"multi_head_attention: key has {k.shape[1]} positions and value {v.shape[1]}; "
                         "they must match" + _at())
    H, hd = num_heads, E // num_heads
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    dtype = q.dtype
    b_in = None if in_proj_bias is None else F.as_tensor(in_proj_bias)

    def proj(x, i):
        w = w_sep[i] if separate else w_in[i * E:(i + 1) * E]
        y = F.matmul(x, F.transpose(w))
        if b_in is not None:
            y = y + b_in[i * E:(i + 1) * E]
        return y

    def heads(x, n):   # (B, n, E) -> (B, H, n, hd)
        return F.transpose(F.reshape(x, (B, n, H, hd)), (0, 2, 1, 3))

    if not separate and q is k and k is v:
        # self-attention: one packed (B, L, 3E) projection, q/k/v its views (no slicing of the weight, no copies)
        qkv = F.matmul(q, F.transpose(w_in))
        if b_in is not None:
            qkv = qkv + b_in
        qkv = F.reshape(qkv, (B, L, 3, H, hd))
        qh, kh, vh = (F.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))
        qh = qh * (1.0 / math.sqrt(hd))
    else:
        qh = heads(proj(q, 0), L) * (1.0 / math.sqrt(hd))
        kh, vh = heads(proj(k, 1), S), heads(proj(v, 2), S)
    scores = F.matmul(qh, F.swapaxes(kh, -1, -2))        # (B, H, L, S)

    if attn_mask is not None:
        m = _additive_mask(attn_mask, dtype, "attn_mask")
        if m.ndim == 2:
            if not (_same(m.shape[0], L) and _same(m.shape[1], S)):
                raise ShapeError(f"multi_head_attention: attn_mask has shape {_fmt(m.shape)}, expected (L, S) = "
                                 f"({L}, {S}) or (batch * num_heads, L, S)" + _at())
        elif m.ndim == 3:
            if not (_same(m.shape[1], L) and _same(m.shape[2], S)):
                raise ShapeError(f"multi_head_attention: attn_mask has shape {_fmt(m.shape)}, expected "
                                 f"(batch * num_heads, L, S) = (N * {H}, {L}, {S}) or (L, S)" + _at())
            m = F.reshape(m, (-1, H, L, S))
        else:
            raise ShapeError(f"multi_head_attention: attn_mask has shape {_fmt(m.shape)}, expected (L, S) or "
                             "(batch * num_heads, L, S)" + _at())
        scores = _add_mask(scores, m, "attn_mask", f"(L, S) = ({L}, {S}) or (batch * num_heads, L, S)")
    if key_padding_mask is not None:
        m = _additive_mask(key_padding_mask, dtype, "key_padding_mask")
        if m.ndim != 2 or not _same(m.shape[1], S) or not _same(m.shape[0], B):
            raise ShapeError(f"multi_head_attention: key_padding_mask has shape {_fmt(m.shape)}, expected "
                             f"(batch, S) = ({B}, {S})" + _at())
        scores = _add_mask(scores, F.reshape(m, (m.shape[0], 1, 1, m.shape[1])), "key_padding_mask",
                           f"(batch, S) = ({B}, {S})", m.shape)

    attn = F.softmax(scores, -1)
    if dropout_p and training:
        attn = N.dropout(attn, dropout_p, True, generator=generator)
    out = F.matmul(attn, vh)                              # (B, H, L, hd)
    out = F.reshape(F.transpose(out, (0, 2, 1, 3)), (-1, L, E))   # a mask may have fixed a symbolic batch
    if out_proj_weight is not None:
        out = F.matmul(out, F.transpose(F.as_tensor(out_proj_weight)))
    if out_proj_bias is not None:
        out = out + out_proj_bias
    if not need_weights:
        return out, None
    return out, (F.mean(attn, axis=1) if average_attn_weights else attn)


class MultiheadAttention(Module):
    """torch.nn.MultiheadAttention: `out, weights = mha(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, training=None)`.

    batch_first=True (graphc's default; torch's is False) takes (N, L, E); False takes (L, N, E).
    An unbatched (L, E) query works too. key and value default to the query (self-attention), so the
    layer also works inside Sequential (which keeps `out`). Parameters: `in_proj_weight` (3E, E),
    `in_proj_bias` (3E,), `out_proj.weight` (E, E), `out_proj.bias` (E,), torch's initialisation.
    kdim / vdim (the key's and value's feature sizes, embed_dim by default) other than embed_dim give
    torch's separate projections instead of `in_proj_weight`: `q_proj_weight` (E, E), `k_proj_weight`
    (E, kdim), `v_proj_weight` (E, vdim)."""

    #: returns (out, weights); Sequential passes `out` on
    returns_state = True

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, dtype="float32", seed: int | None = None,
                 generator: Generator | None = None, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise GraphcError(f"MultiheadAttention: {name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise GraphcError(f"MultiheadAttention: embed_dim={embed_dim} must be divisible by "
                              f"num_heads={num_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise GraphcError(f"MultiheadAttention: dropout must be a probability in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        rng = np.random.default_rng(seed) if seed is not None else None
        E = self.embed_dim
        self.kdim, self.vdim = int(kdim), int(vdim)
        self.separate = self.kdim != E or self.vdim != E       # torch: not _qkv_same_embed_dim
        if self.separate:
            self.in_proj_weight = None
            for name, d in (("q_proj_weight", E), ("k_proj_weight", self.kdim), ("v_proj_weight", self.vdim)):
                setattr(self, name, self.add_param(name, _init.xavier_uniform((E, d), dtype=dtype, rng=rng), dtype))
        else:
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
            self.in_proj_weight = self.add_param("in_proj_weight",
                                                 _init.xavier_uniform((3 * E, E), dtype=dtype, rng=rng), dtype)
        self.in_proj_bias = self.add_param("in_proj_bias", np.zeros(3 * E), dtype) if bias else None
        self.out_proj = Dense(E, E, bias=bias, dtype=dtype, seed=None if seed is None else seed + 1)
        if bias:
            self.out_proj.bias.set_value(np.zeros(E, dtype))
        self.generator = generator or (Generator(seed, f"{self.prefix}.rng") if seed is not None else None)

    def __call__(self, query, key=None, value=None, key_padding_mask=None, need_weights: bool = True,
                 attn_mask=None, average_attn_weights: bool = True, training: bool | None = None):
        return self.forward(query, self.training if training is None else bool(training), key, value,
                            key_padding_mask, need_weights, attn_mask, average_attn_weights)

    def forward(self, query, training, key=None, value=None, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True):
        q = F.as_tensor(query)
        k = q if key is None else F.as_tensor(key)
        v = k if value is None else F.as_tensor(value)
        unbatched = q.ndim == 2
        if unbatched:
            if k.ndim != 2 or v.ndim != 2:
                raise ShapeError(f"MultiheadAttention: an unbatched (L, E) query needs unbatched key and value, got "
                                 f"{_fmt(k.shape)} and {_fmt(v.shape)}" + _at())
            q, k, v = _each_once(lambda t: F.expand_dims(t, 0), (q, k, v))
            if key_padding_mask is not None:
                key_padding_mask = F.expand_dims(F.as_tensor(key_padding_mask), 0)
        elif q.ndim != 3:
            raise ShapeError(f"MultiheadAttention({self.embed_dim}, {self.num_heads}): query {q.label} has shape "
                             f"{_fmt(q.shape)}, expected " + ("(batch, seq, embed_dim)" if self.batch_first
                                                               else "(seq, batch, embed_dim)") + _at())
        elif not self.batch_first:
            q, k, v = _each_once(lambda t: F.swapaxes(t, 0, 1) if t.ndim == 3 else t, (q, k, v))
        if not _same(q.shape[-1], self.embed_dim):
            raise ShapeError(f"MultiheadAttention({self.embed_dim}, {self.num_heads}): query {q.label} has shape "
                             f"{_fmt(F.as_tensor(query).shape)}, last dim should be embed_dim={self.embed_dim}"
                             + _at())
        out, w = multi_head_attention(q, k, v, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                                      self.out_proj.weight, self.out_proj.bias, key_padding_mask, attn_mask,
                                      need_weights, average_attn_weights, self.dropout, training, self.generator,
                                      self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        if unbatched:
            out = F.squeeze(out, 0)
            w = None if w is None else F.squeeze(w, 0)
        elif not self.batch_first:
            out = F.swapaxes(out, 0, 1)
        return out, w

    def extra_repr(self):
        return (f"{self.embed_dim}, {self.num_heads}, dropout={self.dropout}, bias={self.in_proj_bias is not None}, "
                f"batch_first={self.batch_first}" + (f", kdim={self.kdim}, vdim={self.vdim}" if self.separate else ""))


_ACTIVATIONS = {"relu": F.relu, "gelu": N.gelu}


class TransformerEncoderLayer(Module):
    """torch.nn.TransformerEncoderLayer: self-attention and a feed-forward block, each with a residual
    connection and layer norm (post-norm, or pre-norm with norm_first=True).

    Called like every graphc layer, `layer(x, training=None)`, plus torch's optional `src_mask` (L, S)
    and `src_key_padding_mask` (N, S). State-dict keys are torch's: `self_attn.in_proj_weight`,
    `self_attn.in_proj_bias`, `self_attn.out_proj.*`, `linear1.*`, `linear2.*`, `norm1.*`, `norm2.*`."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, dtype="float32", seed: int | None = None):
        super().__init__()
        # what TransformerEncoder needs to make copies (torch deep-copies the layer)
        self.config = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                           activation=activation, layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                           norm_first=norm_first, bias=bias, dtype=dtype, seed=seed)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise GraphcError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' or a function of a "
                                  f"tensor, got {activation!r}")
            act = _ACTIVATIONS[activation]
        elif callable(activation):
            act = activation
        else:
            raise GraphcError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' or a function of a tensor, "
                              f"got {type(activation).__name__}")
        if isinstance(dim_feedforward, bool) or not isinstance(dim_feedforward, (int, np.integer)) \
                or dim_feedforward < 1:
            raise GraphcError(f"TransformerEncoderLayer: dim_feedforward must be a positive int, got "
                              f"{dim_feedforward!r}")
        s = (lambda i: None if seed is None else seed + 10 * i)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            dtype=dtype, seed=s(1))
        self.linear1 = Dense(d_model, dim_feedforward, bias=bias, dtype=dtype, seed=s(2))
        self.dropout = Dropout(dropout, seed=s(3))
        self.linear2 = Dense(dim_feedforward, d_model, bias=bias, dtype=dtype, seed=s(4))
        self.norm_first = bool(norm_first)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, dtype=dtype)
        if not bias:   # torch: LayerNorm(bias=False)
            self.norm1.bias = None
            self.norm2.bias = None
        self.dropout1 = Dropout(dropout, seed=s(5))
        self.dropout2 = Dropout(dropout, seed=s(6))
        self.activation = act
        self.d_model, self.nhead, self.dim_feedforward = d_model, nhead, dim_feedforward

    def __call__(self, src, src_mask=None, src_key_padding_mask=None, training: bool | None = None):
        return self.forward(src, self.training if training is None else bool(training), src_mask,
                            src_key_padding_mask)

    def forward(self, x, training, src_mask=None, src_key_padding_mask=None):
        x = F.as_tensor(x)

        def sa(h):
            out, _ = self.self_attn(h, h, h, key_padding_mask=src_key_padding_mask, need_weights=False,
                                    attn_mask=src_mask, training=training)
            return self.dropout1(out, training=training)

        def ff(h):
            h = self.dropout(self.activation(self.linear1(h, training=training)), training=training)
            return self.dropout2(self.linear2(h, training=training), training=training)

        if self.norm_first:
            x = x + sa(self.norm1(x, training=training))
            return x + ff(self.norm2(x, training=training))
        x = self.norm1(x + sa(x), training=training)
        return self.norm2(x + ff(x), training=training)

    def extra_repr(self):
        return (f"{self.d_model}, {self.nhead}, dim_feedforward={self.dim_feedforward}, "
                f"norm_first={self.norm_first}")


class TransformerEncoder(Module):
    """torch.nn.TransformerEncoder: `num_layers` copies of `encoder_layer` (same initial weights, as
    torch's deep copies), applied in order, then the optional final `norm` (e.g. gc.nn.LayerNorm(d)).

    Called like every graphc layer, `enc(src, mask=None, src_key_padding_mask=None, training=None)`
    (torch's `mask` (L, L) and `src_key_padding_mask` (N, L) reach every layer). State-dict keys are
    torch's: `layers.0.self_attn.in_proj_weight`, ..., `layers.{num_layers-1}.norm2.bias`, `norm.weight`,
    `norm.bias`, so a torch encoder's `state_dict()` loads unchanged."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm=None):
        super().__init__()
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise GraphcError(f"TransformerEncoder: encoder_layer must be a gc.nn.TransformerEncoderLayer (it is "
                              f"copied num_layers times), got {type(encoder_layer).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
            raise GraphcError(f"TransformerEncoder: num_layers must be a positive int, got {num_layers!r}")
        if norm is not None and not _is_layer(norm) and not callable(norm):
            raise GraphcError(f"TransformerEncoder: norm must be None or a layer (e.g. gc.nn.LayerNorm(d_model)), "
                              f"got {type(norm).__name__}")
        state = encoder_layer.state_dict()
        layers = []
        for i in range(int(num_layers)):
            cfg = dict(encoder_layer.config)
            if cfg["seed"] is not None:     # independent dropout streams per copy
                cfg["seed"] = cfg["seed"] + 1000 * (i + 1)
            layer = TransformerEncoderLayer(**cfg)
            layer.load_state_dict(state)
            layer.activation = encoder_layer.activation
            layer.train(encoder_layer.training)
            layers.append(layer)
        self.layers = ModuleList(layers)
        self.num_layers = int(num_layers)
        self.norm = norm

    def __call__(self, src, mask=None, src_key_padding_mask=None, training: bool | None = None):
        return self.forward(src, self.training if training is None else bool(training), mask, src_key_padding_mask)

    def forward(self, x, training, mask=None, src_key_padding_mask=None):
        out = F.as_tensor(x)
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, training=training)
        return out if self.norm is None else call_layer(self.norm, out, training)

    def extra_repr(self):
        return f"num_layers={self.num_layers}"
