"""ONNX shape-op converters: reshape, transpose, slicing, gather, concat/split, pad, tile, constants."""
from __future__ import annotations

import numpy as np

import graphc as gc
from graphc import shapes as _sh
from .onnx_ops import op


def _static(cx, t, what="input"):
    if not _sh.is_static(t.shape):
        raise cx.unsupported(f"{what} needs a static shape, got {_sh.fmt_shape(t.shape)}")
    return tuple(t.shape)


def _axes_input(cx, ins, a, idx, since=13):
    if cx.opset < since:
        return a.get("axes")
    return cx.ints(ins[idx] if len(ins) > idx else None, "axes")


@op("Constant")
def _constant(cx, ins, a):
    for k in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if k in a:
            v = np.asarray(a[k])
            if k in ("value_float", "value_floats"):
                v = v.astype(np.float32)
            elif k in ("value_int", "value_ints"):
                v = v.astype(np.int64)
            from .onnx_import import SUPPORTED_DTYPES
            if v.dtype.name not in SUPPORTED_DTYPES:
                raise cx.unsupported(f"constant of dtype {v.dtype.name}")
            return gc.constant(v, v.dtype.name)
    raise cx.unsupported(f"constant given as {sorted(a)}")


@op("ConstantOfShape")
def _constant_of_shape(cx, ins, a):
    shape = tuple(cx.ints(ins[0], "shape"))
    v = np.asarray(a.get("value", np.zeros(1, np.float32))).reshape(-1)[0]
    from .onnx_import import SUPPORTED_DTYPES
    if v.dtype.name not in SUPPORTED_DTYPES:
        raise cx.unsupported(f"value of dtype {v.dtype.name}")
    if not _sh.is_static(shape) or _sh.size(shape) > 1 << 22:  # large: never materialised at import
        return gc.broadcast_to(gc.constant(v, v.dtype.name), shape)
    return gc.constant(np.full(shape, v, dtype=v.dtype), v.dtype.name)


@op("Shape")
def _shape(cx, ins, a):
    x = ins[0]
    dims = list(x.shape)[slice(a.get("start", 0), a.get("end", None))]
    if not all(isinstance(d, int) for d in dims):
        from .onnx_import import SymVal
        return SymVal(dims)
    return gc.constant(np.asarray(dims, dtype=np.int64))


@op("Size")
def _size(cx, ins, a):
    n = _sh.size(ins[0].shape)
    if not isinstance(n, int):
        from .onnx_import import SymVal
        return SymVal(n)
    return gc.constant(np.asarray(n, dtype=np.int64))


@op("Range")
def _range(cx, ins, a):
    start, limit, delta = (cx.const(t, "range bound") for t in ins)
    dt = start.dtype
    start, limit, delta = (v.reshape(-1)[0] for v in (start, limit, delta))
    return gc.constant(np.arange(start, limit, delta, dtype=dt), dt.name)


@op("Reshape")
def _reshape(cx, ins, a):
    x = ins[0]
    shape = cx.ints(ins[1], "shape") if cx.opset >= 5 else list(a["shape"])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return gc.reshape(x, tuple(shape))


@op("Flatten")
def _flatten(cx, ins, a):
    x = ins[0]
    axis = a.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return gc.reshape(x, (_sh.size(x.shape[:axis]), _sh.size(x.shape[axis:])))


@op("Transpose")
def _transpose(cx, ins, a):
    perm = a.get("perm")
    return gc.transpose(ins[0], tuple(perm) if perm is not None else None)


@op("Squeeze")
def _squeeze(cx, ins, a):
    axes = _axes_input(cx, ins, a, 1)
    return gc.squeeze(ins[0], tuple(axes) if axes else None)


@op("Unsqueeze")
def _unsqueeze(cx, ins, a):
    x = ins[0]
    axes = _axes_input(cx, ins, a, 1)
    rank = x.ndim + len(axes)
    axes = sorted(_sh.normalize_axis(ax, rank, "unsqueeze") for ax in axes)
    shape = list(x.shape)
    for ax in axes:
        shape.insert(ax, 1)
    return gc.reshape(x, tuple(shape))


@op("Concat")
def _concat(cx, ins, a):
    ts = [t for t in ins if t is not None]
    return gc.concatenate(ts, a.get("axis", 0))


def _slice_along(x, axis, start, stop, step=1):
    return x[(slice(None),) * axis + (slice(start, stop, step),)]


@op("Split")
def _split(cx, ins, a):
    x = ins[0]
    axis = _sh.normalize_axis(a.get("axis", 0), x.ndim, "split")
    sizes = a.get("split") if cx.opset < 13 else cx.ints(ins[1] if len(ins) > 1 else None, "split")
    n = x.shape[axis]
    if not isinstance(n, int):
        raise cx.unsupported("split along a symbolic axis")
    if not sizes:
        k = a.get("num_outputs", cx.n_out)
        chunk = -(-n // k)
        sizes = [min(chunk, n - i * chunk) for i in range(k)]
    outs, start = [], 0
    for s in sizes:
        outs.append(_slice_along(x, axis, start, start + s))
        start += s
    return outs


@op("Slice")
def _slice(cx, ins, a):
    x = ins[0]
    if cx.opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = cx.ints(ins[1], "starts"), cx.ints(ins[2], "ends")
        axes = cx.ints(ins[3], "axes") if len(ins) > 3 else None
        steps = cx.ints(ins[4], "steps") if len(ins) > 4 else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = _sh.normalize_axis(ax, x.ndim, "slice")
        index[ax] = slice(s, e, st)
    return x[tuple(index)]


@op("Gather")
def _gather(cx, ins, a):
    return gc.take(ins[0], ins[1], a.get("axis", 0))


def _coords(shape, axis):
    """Constant index grid along `axis` for a static shape, broadcastable against `shape`."""
    n = shape[axis]
    return np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (len(shape) - axis - 1))


@op("GatherElements")
def _gather_elements(cx, ins, a):
    x, idx = ins
    xs, ishape = _static(cx, x, "data"), _static(cx, idx, "indices")
    axis = _sh.normalize_axis(a.get("axis", 0), x.ndim, "gather_elements")
    idx = gc.cast(idx, "int64")
    idx = gc.where(gc.less(idx, 0), idx + xs[axis], idx)
    strides = np.cumprod((xs[1:] + (1,))[::-1])[::-1]
    flat = idx * int(strides[axis])
    for k in range(x.ndim):
        if k != axis:
            flat = flat + gc.constant(_coords(ishape, k) * int(strides[k]))
    return gc.take(gc.reshape(x, (-1,)), flat, 0)


@op("Expand")
def _expand(cx, ins, a):
    x = ins[0]
    shape = tuple(cx.ints(ins[1], "shape"))
    return gc.broadcast_to(x, _sh.broadcast_shapes(x.shape, shape, op="Expand"))


@op("Tile")
def _tile(cx, ins, a):
    x = ins[0]
    reps = cx.ints(ins[1], "repeats")
    inter, bshape, final = [], [], []
    for d, r in zip(x.shape, reps):
        inter += [1, d]
        bshape += [r, d]
        final.append(r * d)
    return gc.reshape(gc.broadcast_to(gc.reshape(x, tuple(inter)), tuple(bshape)), tuple(final))


@op("Pad")
def _pad(cx, ins, a):
    x = ins[0]
    mode = a.get("mode", "constant")
    if cx.opset < 11:
        pads, value, axes = a["pads"], a.get("value", 0.0), None
    else:
        pads = cx.ints(ins[1], "pads")
        cv = cx.const(ins[2], "constant_value") if len(ins) > 2 and ins[2] is not None else None
        value = 0 if cv is None else cv.reshape(-1)[0].item()
        axes = cx.ints(ins[3], "axes") if len(ins) > 3 else None
    axes = [_sh.normalize_axis(ax, x.ndim, "pad") for ax in (axes if axes is not None else range(x.ndim))]
    k = len(axes)
    for ax, lo, hi in zip(axes, pads[:k], pads[k:]):
        x = pad_axis(cx, x, ax, lo, hi, mode, value)
    return x


def pad_axis(cx, x, ax, lo, hi, mode="constant", value=0.0):
    """x padded on axis `ax` by lo/hi elements (negative values crop)."""
    n = x.shape[ax]
    if lo < 0 or hi < 0:
        x = _slice_along(x, ax, max(-lo, 0), n - max(-hi, 0) if isinstance(n, int) else None)
        lo, hi, n = max(lo, 0), max(hi, 0), x.shape[ax]
    if lo == 0 and hi == 0:
        return x
    parts = []
    for count, left in ((lo, True), (hi, False)):
        if count == 0:
            parts.append(None)
        elif mode == "constant":
            shape = x.shape[:ax] + (count,) + x.shape[ax + 1:]
            parts.append(gc.broadcast_to(gc.constant(np.asarray(value, dtype=x.dtype)), shape))
        elif mode == "edge":
            edge = _slice_along(x, ax, 0, 1) if left else _slice_along(x, ax, n - 1, n)
            parts.append(gc.broadcast_to(edge, x.shape[:ax] + (count,) + x.shape[ax + 1:]))
        elif mode == "reflect":
            parts.append(_slice_along(x, ax, count, 0, -1) if left else
                         _slice_along(x, ax, n - 2, (n - 2 - count) if n - 2 - count >= 0 else None, -1))
        elif mode == "wrap":
            parts.append(_slice_along(x, ax, n - count, n) if left else _slice_along(x, ax, 0, count))
        else:
            raise cx.unsupported(f"pad mode {mode!r}")
    return gc.concatenate([p for p in (parts[0], x, parts[1]) if p is not None], ax)


@op("DepthToSpace")
def _depth_to_space(cx, ins, a):
    x = ins[0]
    b = a["blocksize"]
    n, c, h, w = x.shape
    if a.get("mode", "DCR") == "DCR":
        t = gc.transpose(gc.reshape(x, (n, b, b, c // (b * b), h, w)), (0, 3, 4, 1, 5, 2))
    else:
        t = gc.transpose(gc.reshape(x, (n, c // (b * b), b, b, h, w)), (0, 1, 4, 2, 5, 3))
    return gc.reshape(t, (n, c // (b * b), h * b, w * b))


@op("SpaceToDepth")
def _space_to_depth(cx, ins, a):
    x = ins[0]
    b = a["blocksize"]
    n, c, h, w = x.shape
    perm = (0, 3, 5, 1, 2, 4) if a.get("mode", "DCR") == "DCR" else (0, 1, 3, 5, 2, 4)
    t = gc.transpose(gc.reshape(x, (n, c, h // b, b, w // b, b)), perm)
    return gc.reshape(t, (n, c * b * b, h // b, w // b))


@op("Trilu")
def _trilu(cx, ins, a):
    x = ins[0]
    k = int(cx.const(ins[1], "k").reshape(-1)[0]) if len(ins) > 1 and ins[1] is not None else 0
    r, c = _static(cx, x)[-2:]
    mask = np.triu(np.ones((r, c), bool), k) if a.get("upper", 1) else np.tril(np.ones((r, c), bool), k)
    return gc.where(gc.constant(mask), x, gc.constant(np.zeros((), x.dtype)))


@op("EyeLike")
def _eye_like(cx, ins, a):
    from .onnx_import import onnx_dtype
    x = ins[0]
    r, c = _static(cx, x)
    dt = onnx_dtype(a["dtype"]) if "dtype" in a else x.dtype
    return gc.constant(np.eye(r, c, a.get("k", 0), dtype=dt), dt)


@op("OneHot")
def _one_hot(cx, ins, a):
    idx, depth_t, values = ins
    depth = int(cx.const(depth_t, "depth").reshape(-1)[0])
    axis = _sh.normalize_axis(a.get("axis", -1), idx.ndim + 1, "one_hot")
    idx = gc.cast(idx, "int64")
    idx = gc.where(gc.less(idx, 0), idx + depth, idx)
    iota = gc.constant(np.arange(depth, dtype=np.int64).reshape((depth,) + (1,) * (idx.ndim - axis)))
    hit = gc.equal(gc.expand_dims(idx, axis), iota)
    return gc.where(hit, values[1], values[0])


@op("CumSum")
def _cumsum(cx, ins, a):
    x = ins[0]
    axis = _sh.normalize_axis(int(cx.const(ins[1], "axis").reshape(-1)[0]), x.ndim, "cumsum")
    return gc.cumsum(x, axis, dtype=x.dtype, exclusive=bool(a.get("exclusive", 0)), reverse=bool(a.get("reverse", 0)))


@op("CumProd")
def _cumprod(cx, ins, a):
    """Inclusive/exclusive, forward/reverse running product: log2(n) doubling steps."""
    x = ins[0]
    axis = _sh.normalize_axis(int(cx.const(ins[1], "axis").reshape(-1)[0]), x.ndim, "cumprod")
    n = x.shape[axis]
    if not isinstance(n, int):
        raise cx.unsupported("cumprod along a symbolic axis")
    rev = bool(a.get("reverse", 0))
    y = _slice_along(x, axis, None, None, -1) if rev else x
    ones = lambda k: gc.broadcast_to(gc.constant(np.ones((), x.dtype)), y.shape[:axis] + (k,) + y.shape[axis + 1:])
    if a.get("exclusive", 0) and n:
        y = gc.concatenate([ones(1), _slice_along(y, axis, 0, n - 1)], axis) if n > 1 else ones(1)
    d = 1
    while d < n:
        y = y * gc.concatenate([ones(d), _slice_along(y, axis, 0, n - d)], axis)
        d *= 2
    return _slice_along(y, axis, None, None, -1) if rev else y


@op("Einsum")
def _einsum(cx, ins, a):
    return gc.einsum(a["equation"], *ins)


@op("CenterCropPad")
def _center_crop_pad(cx, ins, a):
    """Crop or zero-pad each axis to the target size, keeping the centre."""
    x = ins[0]
    target = cx.ints(ins[1], "shape")
    axes = [_sh.normalize_axis(ax, x.ndim, "center_crop_pad") for ax in a.get("axes", range(x.ndim))]
    for ax, want in zip(axes, target):
        have = x.shape[ax]
        if not isinstance(have, int):
            raise cx.unsupported("center crop/pad of a symbolic axis")
        if have > want:
            start = (have - want) // 2
            x = _slice_along(x, ax, start, start + want)
        elif have < want:
            lo = (want - have) // 2
            x = pad_axis(cx, x, ax, lo, want - have - lo, "constant", 0)
    return x
