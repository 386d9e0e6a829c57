"""ONNX Resize (nearest, linear, cubic, antialiased; every coordinate transformation) as one matmul per axis.

Interpolation along one axis is linear in the input, so it is a constant (out, in) matrix built
at import time from the spec's rules (coordinate transform, neighbour choice, coefficients, edge
clamping, exclude_outside); tf_crop_and_resize's extrapolated positions add a constant.
"""
from __future__ import annotations

import math

import numpy as np

import graphc as gc
from graphc import shapes as _sh
from .onnx_ops import op


def _x_original(x, n_in, scale, n_out, mode, roi):
    width = scale * n_in
    if mode == "align_corners":
        return 0.0 if width == 1 else x * (n_in - 1) / (width - 1)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_crop_and_resize":
        if width == 1:
            return (roi[1] - roi[0]) * (n_in - 1) / 2 + roi[0] * (n_in - 1)
        return x * (roi[1] - roi[0]) * (n_in - 1) / (width - 1) + roi[0] * (n_in - 1)
    if mode == "pytorch_half_pixel":
        return -0.5 if width == 1 else (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / width)
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel


def _antialias_coeffs(ratio, scale, mode, a):
    """Downsampling with antialias: the linear/cubic kernel stretched by 1/scale (wider footprint),
    renormalised to sum 1 (the spec's rule; upsampling keeps the plain kernel)."""
    s = min(scale, 1.0)
    if mode == "linear":
        start = math.floor(-1 / s) + 1
        z = (np.arange(start, 2 - start) - ratio) * s
        c = np.clip(1 - np.abs(z), 0, 1)
    else:
        A = a.get("cubic_coeff_a", -0.75)
        start = math.floor(-2 / s) + 1
        z = np.abs((np.arange(start, 2 - start) - ratio) * s)
        c = np.where(z <= 1, ((A + 2) * z - (A + 3)) * z * z + 1,
                     np.where(z < 2, ((A * z - 5 * A) * z + 8 * A) * z - 4 * A, 0.0))
    return c / c.sum()


def _coeffs(ratio, mode, a, scale=1.0):
    if a.get("antialias", 0) and mode in ("linear", "cubic"):
        return _antialias_coeffs(ratio, scale, mode, a)
    if mode == "nearest":
        if float(ratio).is_integer():
            return np.array([0.0, 1.0])
        rule = a.get("nearest_mode", "round_prefer_floor")
        below = {"round_prefer_floor": ratio <= 0.5, "round_prefer_ceil": ratio < 0.5,
                 "floor": True, "ceil": False}[rule]
        return np.array([float(below), float(not below)])
    if mode == "linear":
        return np.array([1 - ratio, ratio])
    A = a.get("cubic_coeff_a", -0.75)
    r, s = ratio, 1 - ratio
    return np.array([((A * (r + 1) - 5 * A) * (r + 1) + 8 * A) * (r + 1) - 4 * A,
                     ((A + 2) * r - (A + 3)) * r * r + 1,
                     ((A + 2) * s - (A + 3)) * s * s + 1,
                     ((A * (s + 1) - 5 * A) * (s + 1) + 8 * A) * (s + 1) - 4 * A])


def resize_matrix(n_in: int, n_out: int, scale: float, a: dict, roi=None):
    """(W (n_out, n_in), extra (n_out,)): one axis of Resize is y = W @ x + extra."""
    mode, ctm = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    W, extra = np.zeros((n_out, n_in)), np.zeros(n_out)
    for x in range(n_out):
        xo = _x_original(x, n_in, scale, n_out, ctm, roi)
        if ctm == "tf_crop_and_resize" and (xo < 0 or xo > n_in - 1):
            extra[x] = a.get("extrapolation_value", 0.0)
            continue
        base = math.floor(xo)
        c = _coeffs(1.0 if float(xo).is_integer() else xo - base, mode, a, scale)
        k, pad = len(c), math.ceil(len(c) / 2)
        cands = range(max(-pad, base - k), min(n_in + pad, base + k + 2))
        idx = sorted(sorted(cands, key=lambda i: (abs(xo - i), i))[:k])  # nearest k, lower index first
        if a.get("exclude_outside", 0):
            c = np.where([0 <= i < n_in for i in idx], c, 0.0)
            c = c / c.sum()
        for coef, i in zip(c, idx):
            W[x, min(max(i, 0), n_in - 1)] += coef
    return W, extra


def _targets(cx, x, ins, a):
    """Per-axis (output size, scale) following the spec (scales or sizes, axes, aspect policy)."""
    axes = [_sh.normalize_axis(v, x.ndim, "resize") for v in a.get("axes", range(x.ndim))]
    shape = [x.shape[i] for i in axes]
    scales = cx.const(ins[2], "scales") if len(ins) > 2 and ins[2] is not None else None
    sizes = cx.ints(ins[3], "sizes") if len(ins) > 3 and ins[3] is not None else None
    if scales is not None and scales.size:
        sc = [float(v) for v in scales.reshape(-1)]
        return axes, [int(s * n) for s, n in zip(sc, shape)], sc
    sc = [o / n for o, n in zip(sizes, shape)]
    policy = a.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        s = min(sc) if policy == "not_larger" else max(sc)
        return axes, [int(s * n + 0.5) for n in shape], [s] * len(axes)
    return axes, list(sizes), sc


@op("Resize")
def _resize(cx, ins, a):
    x = ins[0]
    if cx.opset < 11:
        ins = [x, None, ins[1]]
    if not _sh.is_static(x.shape):
        raise cx.unsupported("resize of a tensor with symbolic dims")
    axes, outs, scales = _targets(cx, x, ins, a)
    roi = cx.const(ins[1], "roi").reshape(-1) if len(ins) > 1 and ins[1] is not None else None
    y = x if x.dtype.startswith("float") else gc.cast(x, "float64")
    for k, (ax, n_out, s) in enumerate(zip(axes, outs, scales)):
        n_in = x.shape[ax]
        box = None if roi is None or not roi.size else (roi[k], roi[k + len(axes)])
        if math.isclose(s, 1.0) and n_out == n_in and (box is None or (box[0] == 0 and box[1] == 1)):
            continue
        W, extra = resize_matrix(n_in, n_out, s, a, box)
        perm = [i for i in range(x.ndim) if i != ax] + [ax]
        t = gc.matmul(gc.transpose(y, tuple(perm)), gc.constant(W.T.astype(y.dtype)))
        if extra.any():
            t = t + gc.constant(extra.astype(y.dtype))
        y = gc.transpose(t, tuple(int(p) for p in np.argsort(perm)))
    return gc.cast(y, x.dtype)


@op("Upsample")
def _upsample(cx, ins, a):
    """The deprecated Upsample: Resize with asymmetric coordinates (nearest rounds down)."""
    scales = ins[1] if len(ins) > 1 else gc.constant(np.asarray(a["scales"], np.float32))
    attrs = {"mode": a.get("mode", "nearest"), "coordinate_transformation_mode": "asymmetric",
             "nearest_mode": "floor"}
    return _resize(cx, [ins[0], scales] if cx.opset < 11 else [ins[0], None, scales], attrs)
