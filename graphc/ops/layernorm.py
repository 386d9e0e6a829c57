"""Layer normalisation as one primitive: (x - mean) / sqrt(var + eps) [* weight] [+ bias] over trailing axes
(torch.nn.functional.layer_norm, ONNX LayerNormalization).

`layer_norm` (graphc/ops/nn_ops.py, gc.nn.LayerNorm, ONNX import) builds it for float32/float64 inputs whose
weight and bias have exactly the normalised shape; anything else is built as `composition` (means, rsqrt,
products: the same arithmetic out of existing ops). As one op a native backend runs it as one kernel per
row (llvm: backends/llvm/layernorm.py: the mean, the variance of the centred row and the affine output in
three passes over a row that stays in cache) instead of six (two sums, two divisions, the centring and
the output); a backend without a kernel plans `composition_body` (cuda). The gradient is written out of
existing ops (so it is differentiated again, compiled and fused like any other graph)."""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from .. import shapes as _sh
from ..errors import DTypeError, GraphcError, ShapeError
from ..ir import Graph, Op, Trait, apply, register
from .core import PlaceholderOp, _leaf

#: dtypes the op takes (the rest are built as the composition)
DTYPES = ("float32", "float64")


@register
class LayerNorm(Op):
    """inputs x (..., *S), then weight (S) when attr `weight`, then bias (S) when attr `bias`; attrs `axis`
    (the trailing axes S spans, a tuple of ints: a NORMALIZATION op reduces along attrs["axis"] inside),
    `eps` (a float). Output like x."""
    name = "layer_norm"
    traits = Trait.NORMALIZATION | Trait.FRESH

    def infer(self, inputs, axis, eps, weight, bias):
        if len(inputs) != 1 + bool(weight) + bool(bias):
            raise GraphcError(f"layer_norm takes x{', weight' * bool(weight)}{', bias' * bool(bias)}, got "
                              f"{len(inputs)} inputs")
        x = inputs[0]
        naxes = len(axis) if isinstance(axis, tuple) else 0
        if not 1 <= naxes <= x.ndim or axis != tuple(range(x.ndim - naxes, x.ndim)):
            raise ShapeError(f"layer_norm: axis must be trailing axes of x {_sh.fmt_shape(x.shape)}, got {axis!r}")
        if x.dtype not in DTYPES:
            raise DTypeError(f"layer_norm: x must be float32 or float64, got {x.dtype}")
        for t in inputs[1:]:
            if t.dtype != x.dtype or t.ndim != naxes or not all(
                    _sh.dims_equal(a, b) for a, b in zip(t.shape, x.shape[x.ndim - naxes:])):
                raise ShapeError(f"layer_norm: weight and bias must be {x.dtype} of shape "
                                 f"{_sh.fmt_shape(x.shape[x.ndim - naxes:])}, got {t.type_str}")
        return [(x.shape, x.dtype)]

    def impl(self, x, *wb, axis, eps, weight, bias):
        d = x - np.mean(x, axis, keepdims=True)
        y = d * (1.0 / np.sqrt(np.mean(d * d, axis, keepdims=True) + np.asarray(eps, x.dtype)))
        if weight:
            y = y * wb[0]
        if bias:
            y = y + wb[-1]
        return y.astype(x.dtype, copy=False)

    def vjp(self, node, gouts):
        x, a = node.inputs[0], node.attrs
        g = gouts[0]
        axes = a["axis"]
        d, rstd = _centred(x, axes, a["eps"])
        xhat = d * rstd
        gh = g * node.inputs[1] if a["weight"] else g           # d loss / d xhat
        gx = rstd * (gh - F.mean(gh, axes, keepdims=True) - xhat * F.mean(gh * xhat, axes, keepdims=True))
        out = [gx]
        if a["weight"]:
            out.append(F.sum_to(g * xhat, node.inputs[1].shape))
        if a["bias"]:
            out.append(F.sum_to(g, node.inputs[-1].shape))
        return out


def _centred(x, axes, eps: float):
    """(x - mean, 1 / sqrt(var + eps)) over `axes` (kept as size-1 dims), out of existing ops."""
    d = x - F.mean(x, axes, keepdims=True)
    return d, F.rsqrt(F.mean(d * d, axes, keepdims=True) + eps)


def composition(x, weight=None, bias=None, naxes: int = 1, eps: float = 1e-5):
    """The same result out of existing ops (means, rsqrt, products): what a backend without a layer-norm
    kernel runs, and what layer_norm builds for inputs the op does not take."""
    d, rstd = _centred(x, tuple(range(x.ndim - naxes, x.ndim)), eps)
    y = d * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def composition_body(node) -> Graph:
    """A Graph computing `node` (a layer_norm) by `composition`, its placeholders standing for node.inputs."""
    a = node.attrs
    phs = [_leaf(PlaceholderOp, t.shape, t.dtype, f"layer_norm_in{i}") for i, t in enumerate(node.inputs)]
    w = phs[1] if a["weight"] else None
    b = phs[-1] if a["bias"] else None
    return Graph(phs, [composition(phs[0], w, b, len(a["axis"]), a["eps"])], name="layer_norm")


def build(x, weight, bias, naxes: int, eps: float):
    """The layer_norm op when it takes these inputs (float32/float64, weight and bias of exactly the
    normalised shape and x's dtype), else None."""
    norm = x.shape[x.ndim - naxes:]
    for t in (weight, bias):
        if t is not None and (t.dtype != x.dtype or t.ndim != naxes
                              or not all(_sh.dims_equal(a, b) for a, b in zip(t.shape, norm))):
            return None
    if x.dtype not in DTYPES or not 1 <= naxes <= x.ndim:
        return None
    ins = [x] + [t for t in (weight, bias) if t is not None]
    return apply(LayerNorm, *ins, axis=tuple(range(x.ndim - naxes, x.ndim)), eps=float(eps),
                 weight=weight is not None, bias=bias is not None)
