"""ONNX neural-net converters: convolution (also deformable, and transposed/Col2Im in any number of
spatial dims), pooling (MaxPool's Indices, MaxUnpool), normalisations, dropout, losses, GridSample,
AffineGrid, RoiAlign.

Convolution and pooling are composed from strided slices (one per kernel offset) and a matmul or
an elementwise reduction; recurrent layers are unrolled over the (static) sequence length.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

import graphc as gc
from graphc import shapes as _sh
from .onnx_ops import op
from .onnx_shape_ops import pad_axis


# ---- windows (conv and pooling) ------------------------------------------------------------------

def _window_geometry(cx, x, kernel, a, ceil_mode=False):
    """(pads_begin, pads_end, out_sizes, strides, dilations) for the spatial axes of x (N, C, ...)."""
    nsp = len(kernel)
    strides = a.get("strides") or [1] * nsp
    dil = a.get("dilations") or [1] * nsp
    spatial = x.shape[2:]
    if not all(isinstance(d, int) for d in spatial):
        raise cx.unsupported(f"symbolic spatial dims {_sh.fmt_shape(x.shape)}")
    auto = a.get("auto_pad", "NOTSET")
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        outs = [-(-n // s) for n, s in zip(spatial, strides)]
        total = [max((o - 1) * s + e - n, 0) for o, s, e, n in zip(outs, strides, ext, spatial)]
        lo = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        return lo, [t - b for t, b in zip(total, lo)], outs, strides, dil
    pads = a.get("pads") or [0] * (2 * nsp) if auto != "VALID" else [0] * (2 * nsp)
    lo, hi = list(pads[:nsp]), list(pads[nsp:])
    outs = []
    for i, (n, s, e) in enumerate(zip(spatial, strides, ext)):
        span = n + lo[i] + hi[i] - e
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= n + lo[i]:
            o -= 1  # the last window must start inside the input or the left padding
        outs.append(o)
    return lo, hi, outs, strides, dil


def _pad_spatial(cx, x, lo, hi, value, outs, strides, ext):
    """Pad each spatial axis so exactly the windows needed fit (cropping padding no window reaches)."""
    for i in range(len(lo)):
        end = (outs[i] - 1) * strides[i] + ext[i] - x.shape[2 + i] - lo[i]
        x = pad_axis(cx, x, 2 + i, lo[i], end, "constant", value)
    return x


def _patches(x, kernel, outs, strides, dil):
    """One strided view of x (N, C, *outs) per kernel offset, in row-major kernel order."""
    res = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        idx = [slice(None), slice(None)]
        for o, d, s, n in zip(offs, dil, strides, outs):
            idx.append(slice(o * d, o * d + s * (n - 1) + 1, s))
        res.append(x[tuple(idx)])
    return res


@op("Conv")
def _conv(cx, ins, a):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    kernel = list(a.get("kernel_shape") or w.shape[2:])
    lo, hi, outs, strides, dil = _window_geometry(cx, x, kernel, a)
    if x.ndim == 4 and "conv2d" in gc.OPS and x.dtype.startswith("float") and w.dtype == x.dtype:
        return gc.conv2d(x, w, b, tuple(strides), ((lo[0], hi[0]), (lo[1], hi[1])), tuple(dil), a.get("group", 1))
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    xp = _pad_spatial(cx, x, lo, hi, 0.0, outs, strides, ext)
    n, c = x.shape[:2]
    m, g = w.shape[0], a.get("group", 1)
    P, K = math.prod(outs), math.prod(kernel)
    cols = [gc.reshape(p, (n, c, 1, P)) for p in _patches(xp, kernel, outs, strides, dil)]
    col = gc.concatenate(cols, 2) if len(cols) > 1 else cols[0]      # (N, C, K, P)
    col = gc.reshape(col, (n, g, (c // g) * K, P))
    wr = gc.reshape(w, (g, m // g, (c // g) * K))
    y = gc.reshape(gc.matmul(wr, col), (n, m) + tuple(outs))
    if b is not None:
        y = y + gc.reshape(b, (m,) + (1,) * len(outs))
    return y


@op("ConvTranspose")
def _conv_transpose(cx, ins, a):
    """The adjoint of a convolution: graphc's conv2d_grad_input (1-D as a height-1 image)."""
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    one_d = x.ndim == 3
    if one_d:
        x, w = gc.expand_dims(x, 2), gc.expand_dims(w, 2)
    if x.ndim != 4 or "conv2d_grad_input" not in gc.OPS:
        return _conv_transpose_nd(cx, x, w, b, a)
    expand = (lambda v, fill: [fill] + list(v)) if one_d else (lambda v, fill: list(v))
    kernel = list(w.shape[2:])
    strides = expand(a.get("strides") or [1] * (2 - one_d), 1)
    dil = expand(a.get("dilations") or [1] * (2 - one_d), 1)
    opad = expand(a.get("output_padding") or [0] * (2 - one_d), 0)
    spatial = _static_shape(cx, x)[2:]
    full = [s * (n - 1) + o + (k - 1) * d + 1 for s, n, o, k, d in zip(strides, spatial, opad, kernel, dil)]
    auto = a.get("auto_pad", "NOTSET")
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = expand(a["output_shape"][-(2 - one_d):], 1) if "output_shape" in a else \
            [n * s for n, s in zip(spatial, strides)]
        total = [f - o for f, o in zip(full, want)]
        lo = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        pads = [(p, t - p) for p, t in zip(lo, total)]
    else:
        raw = a.get("pads") or [0] * (2 * (2 - one_d))
        k2 = len(raw) // 2
        pads = [(0, 0)] * one_d + [(raw[i], raw[i + k2]) for i in range(k2)]
    out_hw = tuple(f - p - q for f, (p, q) in zip(full, pads))
    if any(q < 0 for _, q in pads):  # an output_shape beyond the full result: trailing zeros
        pads = [(p, max(q, 0)) for p, q in pads]
    y = gc.ir.apply(gc.OPS["conv2d_grad_input"], x, w, x_hw=out_hw, stride=tuple(strides), pads=tuple(pads),
                    dilation=tuple(dil), groups=a.get("group", 1))
    if one_d:
        y = gc.squeeze(y, 2)
    if b is not None:
        y = y + gc.reshape(b, (b.shape[0],) + (1,) * (y.ndim - 2))
    return y


def col2im_nd(cols, image, block, strides, dil, lo, hi, outs=None):
    """Col2Im in any number of spatial dims: cols (N, C*K, L), K = prod(block), L the block
    positions; each column entry is added to the image pixel it covers (entries falling in the
    padding are dropped). One scatter-add with constant indices."""
    n, ck, length = cols.shape
    k = int(np.prod(block))
    c = ck // k
    if outs is None:   # block positions per axis
        outs = [(image[i] + lo[i] + hi[i] - dil[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in range(len(image))]
    size = int(np.prod(image))
    idx = np.full((c, k, length), c * size, np.int64)                    # c * size: the dump slot
    for j, offs in enumerate(itertools.product(*[range(b) for b in block])):
        for l_, pos in enumerate(itertools.product(*[range(o) for o in outs])):
            at = [p * s + o * d - q for p, s, o, d, q in zip(pos, strides, offs, dil, lo)]
            if all(0 <= v < sz for v, sz in zip(at, image)):
                idx[:, j, l_] = np.arange(c) * size + int(np.ravel_multi_index(at, image))
    flat_idx = (idx.reshape(1, -1) + np.arange(n).reshape(n, 1) * (c * size + 1)).reshape(-1)
    flat = gc.ir.apply(gc.OPS["take_grad"], gc.reshape(cols, (-1,)), gc.constant(np.zeros(n * (c * size + 1), cols.dtype)),
                       gc.constant(flat_idx), axis=0)
    return gc.reshape(gc.reshape(flat, (n, c * size + 1))[:, :c * size], (n, c) + tuple(image))


def _conv_transpose_nd(cx, x, w, b, a):
    """Transposed convolution in any number of spatial dims: the weights spread each input pixel
    into columns (a grouped matmul), which Col2Im adds into the output."""
    n, c = x.shape[:2]
    spatial = list(_static_shape(cx, x)[2:])
    nsp = len(spatial)
    kernel = list(w.shape[2:])
    g = a.get("group", 1)
    og = w.shape[1]
    strides, dil = a.get("strides") or [1] * nsp, a.get("dilations") or [1] * nsp
    opad = a.get("output_padding") or [0] * nsp
    full = [s * (m - 1) + o + (k - 1) * d + 1 for s, m, o, k, d in zip(strides, spatial, opad, kernel, dil)]
    auto = a.get("auto_pad", "NOTSET")
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(a["output_shape"][-nsp:]) if "output_shape" in a else [m * s for m, s in zip(spatial, strides)]
        total = [f - o for f, o in zip(full, want)]
        lo = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        hi = [t - p for t, p in zip(total, lo)]
    else:
        raw = a.get("pads") or [0] * (2 * nsp)
        lo, hi = list(raw[:nsp]), list(raw[nsp:])
    image = [f - p - q for f, p, q in zip(full, lo, hi)]
    k = int(np.prod(kernel))
    length = int(np.prod(spatial))
    xg = gc.reshape(x, (n, g, c // g, length))
    wg = gc.transpose(gc.reshape(w, (g, c // g, og * k)), (0, 2, 1))                  # (g, og*K, C/g)
    cols = gc.reshape(gc.matmul(wg, xg), (n, g * og * k, length))
    y = col2im_nd(cols, image, kernel, strides, dil, lo, hi, outs=spatial)
    if b is not None:
        y = y + gc.reshape(b, (b.shape[0],) + (1,) * nsp)
    return y


@op("Col2Im")
def _col2im(cx, ins, a):
    """Col2Im is a transposed convolution of the columns with a one-hot (C*K, C, kh, kw) kernel."""
    cols = ins[0]
    image, block = cx.ints(ins[1], "image_shape"), cx.ints(ins[2], "block_shape")
    if len(image) != 2 or "conv2d_grad_input" not in gc.OPS:
        nsp = len(image)
        raw = a.get("pads") or [0] * (2 * nsp)
        return col2im_nd(cols, image, block, a.get("strides") or [1] * nsp, a.get("dilations") or [1] * nsp,
                         raw[:nsp], raw[nsp:])
    n, ck, length = cols.shape
    k = block[0] * block[1]
    c = ck // k
    strides, dil = a.get("strides") or [1, 1], a.get("dilations") or [1, 1]
    raw = a.get("pads") or [0, 0, 0, 0]
    pads = ((raw[0], raw[2]), (raw[1], raw[3]))
    outs = [(image[i] + sum(pads[i]) - dil[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in range(2)]
    w = np.zeros((c * k, c) + tuple(block), cols.dtype)
    for ch in range(c):
        for j in range(k):
            w[ch * k + j, ch].flat[j] = 1.0
    gy = gc.reshape(cols, (n, ck, outs[0], outs[1]))
    return gc.ir.apply(gc.OPS["conv2d_grad_input"], gy, gc.constant(w), x_hw=tuple(image), stride=tuple(strides),
                       pads=pads, dilation=tuple(dil), groups=1)


def _pool(kind):
    def conv(cx, ins, a):
        x = ins[0]
        kernel = list(a["kernel_shape"])
        lo, hi, outs, strides, dil = _window_geometry(cx, x, kernel, a, bool(a.get("ceil_mode", 0)))
        ext = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
        if kind == "max" and cx.n_out > 1:
            return _max_pool_with_indices(cx, x, kernel, lo, hi, outs, strides, dil, ext, a)
        if kind == "max" and _native_max_pool(x, kernel, lo, hi, dil, a):
            return gc.ir.apply(gc.OPS["max_pool2d"], x, kernel=tuple(kernel), stride=tuple(strides),
                               pads=((lo[0], hi[0]), (lo[1], hi[1])))
        if kind == "max":
            fill = -np.inf if x.dtype.startswith("float") else np.iinfo(x.dtype).min
            xp = _pad_spatial(cx, x, lo, hi, fill, outs, strides, ext)
            return _separable(xp, kernel, outs, strides, dil, gc.maximum)
        xp = _pad_spatial(cx, x, lo, hi, 0.0, outs, strides, ext)
        if kind == "lp":
            pw = float(a.get("p", 2))
            return _separable(gc.abs(xp) ** pw, kernel, outs, strides, dil, gc.add) ** (1.0 / pw)
        total = _separable(xp, kernel, outs, strides, dil, gc.add)
        return total / gc.constant(_avg_count(x, kernel, lo, hi, outs, strides, dil, ext, a))
    return conv


def _max_pool_with_indices(cx, x, kernel, lo, hi, outs, strides, dil, ext, a):
    """MaxPool's (values, Indices): the first maximum of each window in row-major window order, its
    index flattened over the whole input (row-major spatial, or column-major with storage_order=1)."""
    spatial = _static_shape(cx, x)[2:]
    n, c = x.shape[:2]
    fill = -np.inf if x.dtype.startswith("float") else np.iinfo(x.dtype).min
    xp = _pad_spatial(cx, x, lo, hi, fill, outs, strides, ext)
    order = spatial[::-1] if a.get("storage_order", 0) else spatial
    steps = [int(np.prod(order[i + 1:])) for i in range(len(order))]
    steps = steps[::-1] if a.get("storage_order", 0) else steps
    grids = np.meshgrid(*[np.arange(o) * s for o, s in zip(outs, strides)], indexing="ij")
    best, where = None, None
    for offs, p in zip(itertools.product(*[range(k) for k in kernel]), _patches(xp, kernel, outs, strides, dil)):
        pos = [g + o * d - l for g, o, d, l in zip(grids, offs, dil, lo)]
        idx = sum(q * st for q, st in zip(pos, steps)).astype(np.int64)
        inside = np.logical_and.reduce([(q >= 0) & (q < sz) for q, sz in zip(pos, spatial)])
        idx_t = gc.constant(np.where(inside, idx, -1))
        if best is None:
            best, where = p, gc.broadcast_to(idx_t, p.shape)
            continue
        better = gc.greater(p, best)
        best, where = gc.where(better, p, best), gc.where(better, idx_t, where)
    base = gc.constant((np.arange(n * c, dtype=np.int64) * int(np.prod(spatial))).reshape((n, c) + (1,) * len(outs)))
    return [best, where + base]


def _native_max_pool(x, kernel, lo, hi, dil, a) -> bool:
    """graphc's max_pool2d op covers 2-D float pooling without dilation or ceil mode, pads <= k/2."""
    return ("max_pool2d" in gc.OPS and x.ndim == 4 and x.dtype.startswith("float") and dil == [1, 1]
            and not a.get("ceil_mode", 0) and all(max(p, q) <= k // 2 for p, q, k in zip(lo, hi, kernel)))


def _separable(x, kernel, outs, strides, dil, combine):
    """A rectangular-window max or sum, one spatial axis at a time (kh + kw slices, not kh * kw)."""
    for i, (k, n, s, d) in enumerate(zip(kernel, outs, strides, dil)):
        lead = (slice(None),) * (2 + i)
        y = None
        for o in range(k):
            p = x[lead + (slice(o * d, o * d + s * (n - 1) + 1, s),)]
            y = p if y is None else combine(y, p)
        x = y
    return x


def _add_all(ts):
    y = ts[0]
    for t in ts[1:]:
        y = y + t
    return y


def _avg_count(x, kernel, lo, hi, outs, strides, dil, ext, a):
    """Per-window divisor: window elements inside the input (plus explicit padding if counted)."""
    spatial = x.shape[2:]
    counts = np.zeros(outs, dtype=x.dtype)
    include = bool(a.get("count_include_pad", 0))
    for pos in itertools.product(*[range(o) for o in outs]):
        c = 1
        for i, p in enumerate(pos):
            taps = np.arange(kernel[i]) * dil[i] + p * strides[i] - lo[i]
            lim_lo, lim_hi = (-lo[i], spatial[i] + hi[i]) if include else (0, spatial[i])
            c *= int(np.sum((taps >= lim_lo) & (taps < lim_hi)))
        counts[pos] = c
    return counts


CONVERTERS_POOL = {"MaxPool": _pool("max"), "AveragePool": _pool("avg"), "LpPool": _pool("lp")}
for _n, _f in CONVERTERS_POOL.items():
    op(_n)(_f)


@op("GlobalAveragePool")
def _gap(cx, ins, a):
    return gc.mean(ins[0], tuple(range(2, ins[0].ndim)), keepdims=True)


@op("GlobalMaxPool")
def _gmp(cx, ins, a):
    return gc.max(ins[0], tuple(range(2, ins[0].ndim)), keepdims=True)


@op("GlobalLpPool")
def _glp(cx, ins, a):
    p = float(a.get("p", 2))
    return gc.sum(gc.abs(ins[0]) ** p, tuple(range(2, ins[0].ndim)), keepdims=True) ** (1.0 / p)


# ---- normalisations ------------------------------------------------------------------------------

def _per_channel(t, ndim):
    """A (C,) tensor shaped to broadcast along axis 1 of a rank-`ndim` tensor."""
    return gc.reshape(t, (t.shape[0],) + (1,) * (ndim - 2))


@op("BatchNormalization")
def _batch_norm(cx, ins, a):
    x, scale, bias, mean, var = ins[:5]
    eps = a.get("epsilon", 1e-5)
    training = a.get("training_mode", 0)
    if training:
        axes = (0,) + tuple(range(2, x.ndim))
        bm, bv = gc.mean(x, axes), gc.var(x, axes)
        mom = a.get("momentum", 0.9)
        y = (x - _per_channel(bm, x.ndim)) * gc.rsqrt(_per_channel(bv, x.ndim) + eps)
        y = y * _per_channel(scale, x.ndim) + _per_channel(bias, x.ndim)
        outs = [y, mean * mom + bm * (1 - mom), var * mom + bv * (1 - mom)]
        return outs[:cx.n_out]
    inv = gc.rsqrt(var + eps) * scale
    return x * _per_channel(inv, x.ndim) + _per_channel(bias - mean * inv, x.ndim)


@op("InstanceNormalization")
def _instance_norm(cx, ins, a):
    x, scale, bias = ins
    axes = tuple(range(2, x.ndim))
    m = gc.mean(x, axes, keepdims=True)
    v = gc.var(x, axes, keepdims=True)
    y = (x - m) * gc.rsqrt(v + a.get("epsilon", 1e-5))
    return y * _per_channel(scale, x.ndim) + _per_channel(bias, x.ndim)


@op("LayerNormalization")
def _layer_norm(cx, ins, a):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = _sh.normalize_axis(a.get("axis", -1), x.ndim, "layer_norm")
    axes = tuple(range(axis, x.ndim))
    if cx.n_out == 1 and x.dtype in ("float32", "float64"):
        # the output only, no cast: one layer_norm op where scale/bias have the normalised shape
        return [gc.nn_ops.layer_norm(x, tuple(x.shape[axis:]), scale, bias, a.get("epsilon", 1e-5))]
    xf = gc.cast(x, "float32") if a.get("stash_type", 1) == 1 and x.dtype != "float64" else x
    m = gc.mean(xf, axes, keepdims=True)
    d = xf - m
    inv = gc.rsqrt(gc.mean(d * d, axes, keepdims=True) + a.get("epsilon", 1e-5))
    y = gc.cast(d * inv, x.dtype) * scale
    if bias is not None:
        y = y + bias
    return [y, m, inv][:cx.n_out]


@op("RMSNormalization")
def _rms_norm(cx, ins, a):
    x, scale = ins[0], ins[1]
    axis = _sh.normalize_axis(a.get("axis", -1), x.ndim, "rms_norm")
    return gc.nn_ops.rms_norm(x, tuple(x.shape[axis:]), scale, a.get("epsilon", 1e-5))


@op("GroupNormalization")
def _group_norm(cx, ins, a):
    x, scale, bias = ins
    g = a["num_groups"]
    n, c = x.shape[:2]
    xg = gc.reshape(x, (n, g, -1))
    m = gc.mean(xg, 2, keepdims=True)
    d = xg - m
    y = gc.reshape(d * gc.rsqrt(gc.mean(d * d, 2, keepdims=True) + a.get("epsilon", 1e-5)), x.shape)
    if scale.shape[0] != c:  # opset 18: one scale per group
        scale = gc.reshape(gc.broadcast_to(gc.reshape(scale, (g, 1)), (g, c // g)), (c,))
        bias = gc.reshape(gc.broadcast_to(gc.reshape(bias, (g, 1)), (g, c // g)), (c,))
    return y * _per_channel(scale, x.ndim) + _per_channel(bias, x.ndim)


@op("MeanVarianceNormalization")
def _mvn(cx, ins, a):
    x = ins[0]
    axes = tuple(a.get("axes", [0, 2, 3]))
    m = gc.mean(x, axes, keepdims=True)
    std = gc.sqrt(gc.mean(x * x, axes, keepdims=True) - m * m)
    return (x - m) / (std + 1e-9)


@op("LpNormalization")
def _lp_norm(cx, ins, a):
    x = ins[0]
    axis, p = a.get("axis", -1), a.get("p", 2)
    norm = gc.sum(gc.abs(x), axis, keepdims=True) if p == 1 else gc.sqrt(gc.sum(x * x, axis, keepdims=True))
    return gc.where(gc.equal(norm, 0.0), 0.0, x / norm)


@op("LRN")
def _lrn(cx, ins, a):
    x = ins[0]
    size = a["size"]
    sq = pad_axis(cx, x * x, 1, (size - 1) // 2, size // 2, "constant", 0.0)
    c = x.shape[1]
    total = _add_all([sq[:, k:k + c] for k in range(size)])
    base = total * (a.get("alpha", 1e-4) / size) + a.get("bias", 1.0)
    return x / base ** a.get("beta", 0.75)


@op("Dropout")
def _dropout(cx, ins, a):
    x = ins[0]
    if len(ins) > 2 and ins[2] is not None and bool(cx.const(ins[2], "training_mode").reshape(-1)[0]):
        ratio = float(cx.const(ins[1], "ratio").reshape(-1)[0]) if ins[1] is not None else 0.5
        if ratio > 0:
            raise cx.unsupported("training-mode dropout (random) is not imported; export in eval mode")
    outs = [x]
    if cx.n_out > 1:
        outs.append(gc.constant(np.ones(_static_shape(cx, x), bool)))
    return outs


def _static_shape(cx, x):
    if not _sh.is_static(x.shape):
        raise cx.unsupported("the mask output of Dropout for a symbolic shape")
    return tuple(x.shape)




# ---- losses ------------------------------------------------------------------------------------

def nll_loss(cx, logp, target, weight, a):
    """NegativeLogLikelihoodLoss via a one-hot of the target along the class axis (ignored labels,
    which may lie outside [0, C), select nothing and weigh nothing)."""
    c = logp.shape[1]
    t = gc.cast(target, "int64")
    iota = gc.constant(np.arange(c, dtype=np.int64).reshape((1, c) + (1,) * (logp.ndim - 2)))
    onehot = gc.cast(gc.equal(gc.expand_dims(t, 1), iota), logp.dtype)
    picked = gc.sum(logp * onehot, 1)
    w = gc.sum(onehot * _per_channel(weight, logp.ndim), 1) if weight is not None else gc.ones_like(picked)
    if "ignore_index" in a:
        w = w * gc.cast(gc.not_equal(t, gc.constant(np.int64(a["ignore_index"]))), logp.dtype)
    loss = -picked * w
    red = a.get("reduction", "mean")
    if red == "none":
        return loss
    if red == "sum":
        return gc.sum(loss)
    return gc.sum(loss) / gc.sum(w)


@op("NegativeLogLikelihoodLoss")
def _nll(cx, ins, a):
    return nll_loss(cx, ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)


@op("SoftmaxCrossEntropyLoss")
def _sce(cx, ins, a):
    logp = gc.log_softmax(ins[0], 1)
    loss = nll_loss(cx, logp, ins[1], ins[2] if len(ins) > 2 else None, a)
    return [loss, logp][:cx.n_out]


# ---- sampling ------------------------------------------------------------------------------------

@op("GridSample")
def _grid_sample(cx, ins, a):
    x, grid = ins[0], ins[1]
    if grid.dtype != x.dtype:
        grid = gc.cast(grid, x.dtype)
    return gc.nn_ops.grid_sample(x, grid, a.get("mode", "linear" if cx.opset >= 20 else "bilinear"),
                                 a.get("padding_mode", "zeros"), bool(a.get("align_corners", 0)))


@op("AffineGrid")
def _affine_grid(cx, ins, a):
    return gc.nn_ops.affine_grid(ins[0], cx.ints(ins[1], "size"), bool(a.get("align_corners", 0)))



@op("DeformConv")
def _deform_conv(cx, ins, a):
    """Deformable 2-D convolution: every kernel tap reads the input bilinearly (zeros outside) at its
    grid position plus a learned offset (per offset group), optionally scaled by a mask; then the
    columns meet the weights in a grouped matmul."""
    ins = list(ins) + [None] * (5 - len(ins))
    x, w, offset, bias, mask = ins[:5]
    if x.ndim != 4:
        raise cx.unsupported(f"{x.ndim - 2}-D DeformConv")
    n, c, h, wd = _static_shape(cx, x)
    oc, cpg, kh, kw = w.shape
    g, og = a.get("group", 1), a.get("offset_group", 1)
    sh, sw = a.get("strides") or [1, 1]
    dh, dw = a.get("dilations") or [1, 1]
    pads = a.get("pads") or [0, 0, 0, 0]
    oh, ow = offset.shape[2:]
    k, p = kh * kw, oh * ow
    dt = x.dtype
    base_h = (np.arange(oh) * sh - pads[0]).reshape(1, 1, oh, 1) + (np.arange(kh) * dh).reshape(kh, 1, 1, 1)
    base_w = (np.arange(ow) * sw - pads[1]).reshape(1, 1, 1, ow) + (np.arange(kw) * dw).reshape(1, kw, 1, 1)
    off = gc.reshape(offset, (n, og, kh, kw, 2, oh, ow))
    cd = gc.dtypes.compute_dtype(dt)
    coords = [gc.reshape(gc.cast(off[:, :, :, :, 0], cd) + gc.constant(np.broadcast_to(base_h, (kh, kw, oh, ow)).astype(cd)),
                         (n * og, k * p)),
              gc.reshape(gc.cast(off[:, :, :, :, 1], cd) + gc.constant(np.broadcast_to(base_w, (kh, kw, oh, ow)).astype(cd)),
                         (n * og, k * p))]
    cols = gc.nn_ops.sample_at(gc.reshape(x, (n * og, c // og, h, wd)), coords, "bilinear", "zeros")
    cols = gc.reshape(cols, (n, og, c // og, k, p))
    if mask is not None:
        cols = cols * gc.reshape(mask, (n, og, 1, k, p))
    cols = gc.reshape(cols, (n, g, cpg * k, p))
    y = gc.reshape(gc.matmul(gc.reshape(w, (g, oc // g, cpg * k)), cols), (n, oc, oh, ow))
    if bias is not None:
        y = y + gc.reshape(bias, (oc, 1, 1))
    return y


@op("RoiAlign")
def _roi_align(cx, ins, a):
    """Average (or max) of bilinear samples on a regular grid in each output bin of each region
    (sampling_ratio samples per bin and axis; 0 means adaptive, which needs the regions as constants)."""
    x, rois, bidx = ins[:3]
    n, c, h, w = _static_shape(cx, x)
    oh, ow = a.get("output_height", 1), a.get("output_width", 1)
    ratio, scale = a.get("sampling_ratio", 0), a.get("spatial_scale", 1.0)
    half = a.get("coordinate_transformation_mode", "half_pixel") == "half_pixel"
    mode = a.get("mode", "avg")
    if ratio > 0:
        return _roi_align_block(x, rois, bidx, oh, ow, ratio, ratio, scale, half, mode)
    boxes = cx.const(rois, "rois (adaptive sampling_ratio=0)")
    outs = []
    for r in range(boxes.shape[0]):
        b = boxes[r].astype(np.float64) * scale - (0.5 if half else 0.0)
        rh, rw = b[3] - b[1], b[2] - b[0]
        if not half:
            rh, rw = max(rh, 1.0), max(rw, 1.0)
        gh, gw = int(np.ceil(rh / oh)), int(np.ceil(rw / ow))
        outs.append(_roi_align_block(x, rois[r:r + 1], bidx[r:r + 1], oh, ow, gh, gw, scale, half, mode))
    return gc.concatenate(outs, 0)


def _roi_align_block(x, rois, bidx, oh, ow, gh, gw, scale, half, mode):
    n, c, h, w = x.shape
    r = rois.shape[0]
    cd = gc.dtypes.compute_dtype(x.dtype)
    b = gc.cast(rois, cd) * scale - (0.5 if half else 0.0)
    x0, y0 = b[:, 0:1], b[:, 1:2]
    rw, rh = b[:, 2:3] - x0, b[:, 3:4] - y0
    if not half:
        rw, rh = gc.maximum(rw, 1.0), gc.maximum(rh, 1.0)
    # sample offsets in units of the bin size: (bin + (i + 0.5) / g) along each axis, (oh*gh) and (ow*gw)
    fy = ((np.arange(oh).reshape(oh, 1) + (np.arange(gh) + 0.5).reshape(1, gh) / gh) / oh).reshape(1, oh, gh, 1, 1)
    fx = ((np.arange(ow).reshape(ow, 1) + (np.arange(gw) + 0.5).reshape(1, gw) / gw) / ow).reshape(1, 1, 1, ow, gw)
    shape5 = (r, 1, 1, 1, 1)
    yy = gc.reshape(y0, shape5) + gc.reshape(rh, shape5) * gc.constant(fy.astype(cd))
    xx = gc.reshape(x0, shape5) + gc.reshape(rw, shape5) * gc.constant(fx.astype(cd))
    yy, xx = yy + gc.zeros_like(xx), xx + gc.zeros_like(yy)                 # (R, oh, gh, ow, gw)
    valid = gc.logical_and(gc.logical_and(gc.greater_equal(yy, -1.0), gc.less_equal(yy, float(h))),
                           gc.logical_and(gc.greater_equal(xx, -1.0), gc.less_equal(xx, float(w))))

    def axis(u, size):
        u = gc.maximum(u, 0.0)
        lo = gc.floor(u)
        top = gc.greater_equal(lo, float(size - 1))
        lo = gc.where(top, float(size - 1), lo)
        u = gc.where(top, lo, u)
        hi = gc.where(top, lo, lo + 1)
        return lo, hi, u - lo
    ylo, yhi, ly = axis(yy, h)
    xlo, xhi, lx = axis(xx, w)
    zero = gc.zeros_like(ly)
    taps = [(ylo, xlo, (1 - ly) * (1 - lx)), (ylo, xhi, (1 - ly) * lx), (yhi, xlo, ly * (1 - lx)), (yhi, xhi, ly * lx)]
    base = gc.reshape(gc.cast(bidx, "int64") * (c * h * w), (r, 1, 1)) + \
        gc.constant((np.arange(c, dtype=np.int64) * h * w).reshape(1, c, 1))           # (R, C, 1)
    flat_x = gc.reshape(x, (n * c * h * w,))
    vals = []
    for yi, xi, wt in taps:
        pos = gc.cast(gc.stop_gradient(yi), "int64") * w + gc.cast(gc.stop_gradient(xi), "int64")
        v = gc.take(flat_x, base + gc.reshape(pos, (r, 1, -1)), 0)                   # (R, C, S)
        vals.append(gc.cast(v, cd) * gc.reshape(gc.where(valid, wt, zero), (r, 1, -1)))
    s5 = (r, c, oh, gh, ow, gw)
    if mode == "max":
        m = vals[0]
        for v in vals[1:]:
            m = gc.maximum(m, v)
        y = gc.max(gc.reshape(m, s5), (3, 5))
    else:
        y = gc.mean(gc.reshape(vals[0] + vals[1] + vals[2] + vals[3], s5), (3, 5))
    return gc.cast(y, x.dtype)


@op("MaxUnpool")
def _max_unpool(cx, ins, a):
    """Scatter each value to its flattened index (MaxPool's Indices) in a zero tensor of the
    inferred (or given, zero-padded) output shape."""
    x, idx = ins[0], ins[1]
    kernel = a["kernel_shape"]
    nsp = len(kernel)
    strides, pads = a.get("strides") or [1] * nsp, a.get("pads") or [0] * (2 * nsp)
    n, c = _static_shape(cx, x)[:2]
    inferred = (n, c) + tuple((x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[nsp + i] + kernel[i]
                              for i in range(nsp))
    total = int(np.prod(inferred))
    flat = gc.ir.apply(gc.OPS["take_grad"], gc.reshape(x, (-1,)), gc.constant(np.zeros(total, x.dtype)),
                       gc.reshape(gc.cast(idx, "int64"), (-1,)), axis=0)
    y = gc.reshape(flat, inferred)
    if len(ins) > 2 and ins[2] is not None:
        want = cx.ints(ins[2], "output_shape")
        for ax in range(2, len(want)):
            if want[ax] > inferred[ax]:
                y = pad_axis(cx, y, ax, 0, want[ax] - inferred[ax], "constant", 0.0)
    return y


from . import onnx_signal  # noqa: E402,F401  (DFT, STFT, windows, MelWeightMatrix)
from . import onnx_select  # noqa: E402,F401  (Compress, ReverseSequence, Det)
