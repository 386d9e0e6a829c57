"""ONNX TopK, GatherND, ScatterElements/Scatter and ScatterND composed from graphc ops.

Scatters match each update's target index against an index grid (a one-hot mask), so they need
static shapes; TopK selects the k extremes one at a time (k is small in practice).
"""
from __future__ import annotations

import numpy as np

import graphc as gc
from graphc import shapes as _sh
from .onnx_ops import op


def _static(cx, t, what):
    if not _sh.is_static(t.shape):
        raise cx.unsupported(f"{what} needs static shapes, got {_sh.fmt_shape(t.shape)}")
    return tuple(t.shape)


def _extreme(dtype: str, largest: bool):
    if dtype.startswith("float"):
        return -np.inf if largest else np.inf
    info = np.iinfo(dtype)
    return info.min if largest else info.max


@op("TopK")
def _topk(cx, ins, a):
    x = ins[0]
    k = int(cx.const(ins[1], "k").reshape(-1)[0]) if cx.opset >= 10 else a["k"]
    axis = _sh.normalize_axis(a.get("axis", -1), x.ndim, "topk")
    largest = bool(a.get("largest", 1))
    n = _static(cx, x, "TopK")[axis]
    pick, reduce = (gc.argmax, gc.max) if largest else (gc.argmin, gc.min)
    iota = gc.constant(np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (x.ndim - axis - 1)))
    fill = gc.constant(np.asarray(_extreme(x.dtype, largest), x.dtype))
    vals, idxs, cur = [], [], x
    for _ in range(k):  # ties: the lower index first (argmax/argmin return the first)
        i = pick(cur, axis, keepdims=True)
        vals.append(reduce(cur, axis, keepdims=True))
        idxs.append(i)
        cur = gc.where(gc.equal(iota, i), fill, cur)
    if k == 0:
        shape = x.shape[:axis] + (0,) + x.shape[axis + 1:]
        return [gc.constant(np.zeros(shape, x.dtype)), gc.constant(np.zeros(shape, np.int64))]
    return [gc.concatenate(vals, axis), gc.concatenate(idxs, axis)]


def _linear_index(cx, idx, dims):
    """Row-major flat index from the last axis of `idx` (negative entries count from the end)."""
    k = idx.shape[-1]
    strides = np.cumprod((tuple(dims[1:k]) + (1,))[::-1])[::-1]
    idx = gc.cast(idx, "int64")
    idx = gc.where(gc.less(idx, 0), idx + gc.constant(np.asarray(dims[:k], np.int64)), idx)
    return gc.sum(idx * gc.constant(strides.astype(np.int64)), -1)


@op("GatherND")
def _gather_nd(cx, ins, a):
    data, idx = ins
    if a.get("batch_dims", 0):
        raise cx.unsupported("GatherND with batch_dims")
    dims = _static(cx, data, "GatherND")
    k = idx.shape[-1]
    flat = gc.reshape(data, (int(np.prod(dims[:k])),) + dims[k:])
    return gc.take(flat, _linear_index(cx, idx, dims), 0)


def _pad_to(t, shape, value):
    for ax, (have, want) in enumerate(zip(t.shape, shape)):
        if have != want:
            shape = t.shape[:ax] + (want - have,) + t.shape[ax + 1:]
            fill = gc.broadcast_to(gc.constant(np.asarray(value, t.dtype)), shape)
            t = gc.concatenate([t, fill], ax)
    return t


@op("ScatterElements", "Scatter")
def _scatter_elements(cx, ins, a):
    data, idx, upd = ins
    dims = _static(cx, data, "ScatterElements")
    _static(cx, idx, "ScatterElements")
    axis = _sh.normalize_axis(a.get("axis", 0), data.ndim, "scatter")
    idx = gc.cast(idx, "int64")
    idx = gc.where(gc.less(idx, 0), idx + dims[axis], idx)
    n = dims[axis]
    iota = gc.constant(np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (data.ndim - axis - 1)))
    hit = gc.equal(gc.expand_dims(idx, axis + 1), iota)          # S[:a+1] + (n,) + S[a+1:]
    u = gc.expand_dims(upd, axis + 1)
    red = a.get("reduction", "none")
    any_hit = _pad_to(gc.max(gc.cast(hit, "int32"), axis), dims, 0) > 0
    if red in ("none", "add"):
        contrib = _pad_to(gc.sum(gc.where(hit, u, gc.zeros_like(u)), axis), dims, 0)
        return data + gc.cast(contrib, data.dtype) if red == "add" else gc.where(any_hit, contrib, data)
    if red == "mul":
        return data * _pad_to(gc.prod(gc.where(hit, u, gc.ones_like(u)), axis), dims, 1)
    fill = gc.constant(np.asarray(_extreme(data.dtype, red == "max"), data.dtype))
    ext = _pad_to((gc.max if red == "max" else gc.min)(gc.where(hit, u, fill), axis), dims, 0)
    return gc.where(any_hit, (gc.maximum if red == "max" else gc.minimum)(data, ext), data)


@op("ScatterND")
def _scatter_nd(cx, ins, a):
    data, idx, upd = ins
    dims = _static(cx, data, "ScatterND")
    _static(cx, idx, "ScatterND")
    red = a.get("reduction", "none")
    k = idx.shape[-1]
    p, rest = int(np.prod(dims[:k])), dims[k:]
    q = int(np.prod(idx.shape[:-1]))
    lin = gc.reshape(_linear_index(cx, idx, dims), (q, 1))
    hit = gc.cast(gc.equal(lin, gc.constant(np.arange(p, dtype=np.int64).reshape(1, p))), data.dtype)  # (Q, P)
    u = gc.reshape(upd, (q, int(np.prod(rest))))
    if red in ("mul", "max", "min"):  # combine per target over a (Q, P, R) mask
        m3 = gc.expand_dims(gc.cast(hit, "bool"), 2)
        u3 = gc.expand_dims(u, 1)
        flat = gc.reshape(data, (p, int(np.prod(rest))))
        if red == "mul":
            return gc.reshape(flat * gc.prod(gc.where(m3, u3, gc.ones_like(u3)), 0), dims)
        fill = gc.constant(np.asarray(_extreme(data.dtype, red == "max"), data.dtype))
        ext = (gc.max if red == "max" else gc.min)(gc.where(m3, u3, fill), 0)
        return gc.reshape((gc.maximum if red == "max" else gc.minimum)(flat, ext), dims)
    contrib = gc.reshape(gc.matmul(gc.transpose(hit), u), dims)
    if red == "add":
        return data + contrib
    touched = gc.reshape(gc.sum(hit, 0), (p,) + (1,) * len(rest)) > 0
    return gc.where(gc.broadcast_to(gc.reshape(touched, dims[:k] + (1,) * len(rest)), dims), contrib, data)
