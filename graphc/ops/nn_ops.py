"""Neural-network ops: convolution (with its two backward ops), max pooling (with its backward and
select ops), and composites of existing ops (pooling by convolution, normalisation, activations,
dropout, embedding, one_hot). NCHW layout throughout; conv1d is conv2d on a height-1 image.

Convolution: y = conv2d(x, w) is bilinear, so its backward ops are the two adjoints
  conv2d_grad_input(gy, w) = d<gy, conv2d(x, w)>/dx   and   conv2d_grad_weight(x, gy) = .../dw,
and the set {conv2d, conv2d_grad_input, conv2d_grad_weight} is closed under vjp (double backprop).

Node contract (what backends may rely on; attrs are plain tuples of ints):
  conv2d(x (N,C,H,W), w (O,C/g,KH,KW))        stride (sh, sw), pads ((top, bottom), (left, right)),
                                               dilation (dh, dw), groups g  -> (N, O, OH, OW)
  conv2d_grad_input(gy (N,O,OH,OW), w)         same attrs + x_hw (H, W) (dims may be symbolic)
  conv2d_grad_weight(x, gy)                    same attrs + kernel (KH, KW)
  max_pool2d(x) / max_pool2d_select(x, g)      kernel, stride, pads (padding reads as -inf; ties: the
  max_pool2d_grad(x, gy)                       first maximum in row-major window order, like PyTorch)
Everything else here is a composite of existing ops (avg/lp pooling are depthwise conv2d with ones).
"""
from __future__ import annotations

import builtins

import numpy as np
import sympy
from numpy.lib.stride_tricks import as_strided

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, GraphcError, ShapeError
from ..ir import Op, Tensor, Trait, apply, register
from .core import as_tensor, cast, constant
from .shape_ops import eval_shape


def _tuple(v, n: int, what: str) -> tuple:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(e) for e in v)
    if len(v) != n:
        raise ShapeError(f"{what} must be an int or {n} ints, got {v}")
    return v


def out_dim(size, k: int, s: int, d: int, lo: int, hi: int):
    """Output length of a window of size k, stride s, dilation d over size + lo + hi (may be symbolic)."""
    num = size + lo + hi - d * (k - 1) - 1
    if isinstance(num, int):
        if num < 0:
            raise ShapeError(f"window {d * (k - 1) + 1} (kernel {k}, dilation {d}) is larger than the padded "
                             f"input {size + lo + hi}")
        return num // s + 1
    return _sh.canon_dim(sympy.floor(num / s) + 1 if s != 1 else num + 1)


def resolve_padding(padding, spatial, kernel, stride, dilation) -> tuple:
    """((lo, hi) per spatial axis) from an int, ints, pairs, 'valid' or 'same'."""
    n = len(kernel)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        pads = []
        for size, k, s, d in zip(spatial, kernel, stride, dilation):
            if s == 1:
                total = d * (k - 1)
            elif isinstance(size, int):  # TensorFlow's rule: output ceil(size / s)
                total = builtins.max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
            else:
                raise ShapeError("padding='same' with stride > 1 needs static spatial dims")
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, str):
        raise ShapeError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * n
    padding = tuple(padding)
    if len(padding) != n:
        raise ShapeError(f"padding must have {n} entries, got {padding}")
    return tuple((p, p) if isinstance(p, (int, np.integer)) else (int(p[0]), int(p[1])) for p in padding)


# ---- NumPy references (vectorised: strided windows and one matmul per group) ----------------------

def _windows(xp, out_hw, kernel, stride, dilation):
    """(N, C, OH, OW, KH, KW) read-only view of the padded input's windows."""
    n, c = xp.shape[:2]
    s_n, s_c, s_h, s_w = xp.strides
    shape = (n, c) + tuple(out_hw) + tuple(kernel)
    strides = (s_n, s_c, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1])
    return as_strided(xp, shape, strides, writeable=False)


def _pad(x, pads, value=0.0):
    return np.pad(x, ((0, 0), (0, 0)) + tuple(pads), constant_values=value)


def _im2col(x, kernel, stride, pads, dilation, groups):
    """(groups, N*OH*OW, Cg*KH*KW) patches and (OH, OW)."""
    xp = _pad(x, pads)
    ohw = [(xp.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    win = _windows(xp, ohw, kernel, stride, dilation)
    n, c = x.shape[:2]
    cg = c // groups
    win = win.reshape(n, groups, cg, ohw[0], ohw[1], kernel[0], kernel[1])
    cols = win.transpose(1, 0, 3, 4, 2, 5, 6).reshape(groups, n * ohw[0] * ohw[1], cg * kernel[0] * kernel[1])
    return cols, ohw


def _gy_matrix(gy, groups):
    """gy (N, O, OH, OW) -> (groups, N*OH*OW, Og)."""
    n, o, oh, ow = gy.shape
    return gy.reshape(n, groups, o // groups, oh, ow).transpose(1, 0, 3, 4, 2).reshape(groups, n * oh * ow, o // groups)


def _bmm(a, b):
    """Per-group 2-D matmuls (BLAS even for transposed views, which batched np.matmul copies slowly)."""
    if a.shape[0] == 1:
        return (a[0] @ b[0])[None]
    return np.stack([a[i] @ b[i] for i in range(a.shape[0])])


def conv2d_ref(x, w, stride, pads, dilation, groups):
    cols, (oh, ow) = _im2col(x, w.shape[2:], stride, pads, dilation, groups)
    o = w.shape[0]
    wm = w.reshape(groups, o // groups, -1)
    y = _bmm(cols, wm.transpose(0, 2, 1))  # (g, N*P, Og)
    n = x.shape[0]
    y = y.reshape(groups, n, oh, ow, o // groups).transpose(1, 0, 4, 2, 3)
    return np.ascontiguousarray(y.reshape(n, o, oh, ow))


def conv2d_grad_weight_ref(x, gy, kernel, stride, pads, dilation, groups):
    cols, _ = _im2col(x, kernel, stride, pads, dilation, groups)
    gw = _bmm(_gy_matrix(gy, groups).transpose(0, 2, 1), cols)  # (g, Og, Cg*K)
    return gw.reshape((gy.shape[1], x.shape[1] // groups) + tuple(kernel))


def conv2d_grad_input_ref(gy, w, x_hw, stride, pads, dilation, groups):
    n, o, oh, ow = gy.shape
    cg, kh, kw = w.shape[1:]
    cols = _bmm(_gy_matrix(gy, groups), w.reshape(groups, o // groups, -1))  # (g, N*P, Cg*K)
    cols = cols.reshape(groups, n, oh, ow, cg, kh, kw).transpose(1, 0, 4, 5, 6, 2, 3)
    cols = cols.reshape(n, groups * cg, kh, kw, oh, ow)
    h, wd = x_hw
    xp = np.zeros((n, groups * cg, h + pads[0][0] + pads[0][1], wd + pads[1][0] + pads[1][1]), gy.dtype)
    for i in range(kh):  # col2im: one strided add per kernel offset (overlaps accumulate)
        for j in range(kw):
            r, c = i * dilation[0], j * dilation[1]
            rows = slice(r, r + stride[0] * (oh - 1) + 1, stride[0])
            xp[:, :, rows, c:c + stride[1] * (ow - 1) + 1:stride[1]] += cols[:, :, i, j]
    return xp[:, :, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd]


# ---- conv2d and its adjoints --------------------------------------------------------------------

def _check_float(name, *ts):
    for t in ts:
        if not _dt.is_float(t.dtype):
            raise DTypeError(f"{name}: {t.label} must be float, got {t.dtype}")
    if len({t.dtype for t in ts}) > 1:
        raise DTypeError(f"{name}: dtypes differ: {', '.join(t.dtype for t in ts)}")


def _conv_out_shape(x_shape, kernel, o, stride, pads, dilation):
    return (x_shape[0], o) + tuple(out_dim(x_shape[2 + i], kernel[i], stride[i], dilation[i], *pads[i])
                                   for i in range(2))


class _ConvBase(Op):
    traits = Trait.CONTRACTION | Trait.FRESH
    def _attrs(self, node):
        return {k: node.attrs[k] for k in ("stride", "pads", "dilation", "groups")}


@register
class Conv2d(_ConvBase):
    name = "conv2d"

    def infer(self, inputs, stride, pads, dilation, groups):
        x, w = inputs
        if x.ndim != 4 or w.ndim != 4:
            raise ShapeError(f"conv2d: input must be (N, C, H, W) and weight (O, C/groups, KH, KW), got "
                             f"{_sh.fmt_shape(x.shape)} and {_sh.fmt_shape(w.shape)}")
        _check_float("conv2d", x, w)
        if not _sh.is_static(w.shape) or not isinstance(x.shape[1], int):
            raise ShapeError("conv2d: channels and kernel sizes must be static")
        if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
            raise ShapeError(f"conv2d: input has {x.shape[1]} channels, weight expects {w.shape[1]} x groups "
                             f"{groups}; out channels {w.shape[0]} must divide by groups")
        return [(_conv_out_shape(x.shape, w.shape[2:], w.shape[0], stride, pads, dilation), x.dtype)]

    def impl(self, x, w, stride, pads, dilation, groups):
        return conv2d_ref(x, w, stride, pads, dilation, groups)

    def vjp(self, node, gouts):
        x, w = node.inputs
        a = self._attrs(node)
        return [apply(Conv2dGradInput, gouts[0], w, x_hw=x.shape[2:], **a),
                apply(Conv2dGradWeight, x, gouts[0], kernel=w.shape[2:], **a)]


@register
class Conv2dGradInput(_ConvBase):
    """The adjoint of conv2d in x: the gradient of the input (a transposed convolution)."""
    name = "conv2d_grad_input"
    needs_dims = True

    def infer(self, inputs, x_hw, stride, pads, dilation, groups):
        gy, w = inputs
        _check_float(self.name, gy, w)
        return [((gy.shape[0], w.shape[1] * groups) + tuple(x_hw), gy.dtype)]

    def impl(self, gy, w, x_hw, stride, pads, dilation, groups, dims=None):
        return conv2d_grad_input_ref(gy, w, eval_shape(x_hw, dims), stride, pads, dilation, groups)

    def vjp(self, node, gouts):
        gy, w = node.inputs
        a = self._attrs(node)
        return [apply(Conv2d, gouts[0], w, **a),
                apply(Conv2dGradWeight, gouts[0], gy, kernel=w.shape[2:], **a)]


@register
class Conv2dGradWeight(_ConvBase):
    """The adjoint of conv2d in w: the gradient of the filters."""
    name = "conv2d_grad_weight"

    def infer(self, inputs, kernel, stride, pads, dilation, groups):
        x, gy = inputs
        _check_float(self.name, x, gy)
        return [((gy.shape[1], x.shape[1] // groups) + tuple(kernel), x.dtype)]

    def impl(self, x, gy, kernel, stride, pads, dilation, groups):
        return conv2d_grad_weight_ref(x, gy, kernel, stride, pads, dilation, groups)

    def vjp(self, node, gouts):
        x, gy = node.inputs
        a = self._attrs(node)
        return [apply(Conv2dGradInput, gy, gouts[0], x_hw=x.shape[2:], **a),
                apply(Conv2d, x, gouts[0], **a)]


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """2-D cross-correlation on NCHW input with (O, C/groups, KH, KW) filters (torch.nn.functional.conv2d);
    padding: int, (ph, pw), ((top, bottom), (left, right)), 'same' or 'valid'."""
    x, w = as_tensor(x), as_tensor(w)
    if w.ndim != 4:
        raise ShapeError(f"conv2d: weight must be (O, C/groups, KH, KW), got {_sh.fmt_shape(w.shape)}")
    stride, dilation = _tuple(stride, 2, "stride"), _tuple(dilation, 2, "dilation")
    pads = resolve_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    y = apply(Conv2d, x, w, stride=stride, pads=pads, dilation=dilation, groups=int(groups))
    if bias is not None:
        y = y + F.reshape(as_tensor(bias), (-1, 1, 1))
    return y


def conv1d(x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """1-D convolution on (N, C, L) with (O, C/groups, K) filters: conv2d on a height-1 image."""
    x, w = as_tensor(x), as_tensor(w)
    if x.ndim != 3 or w.ndim != 3:
        raise ShapeError(f"conv1d: input must be (N, C, L) and weight (O, C/groups, K), got "
                         f"{_sh.fmt_shape(x.shape)} and {_sh.fmt_shape(w.shape)}")
    if not isinstance(padding, str):
        p = resolve_padding(padding, x.shape[2:], w.shape[2:], (1,), (1,))[0]
        padding = ((0, 0), p)
    y = conv2d(F.expand_dims(x, 2), F.expand_dims(w, 2), None, (1, _tuple(stride, 1, "stride")[0]), padding,
               (1, _tuple(dilation, 1, "dilation")[0]), groups)
    y = F.squeeze(y, 2)
    return y if bias is None else y + F.reshape(as_tensor(bias), (-1, 1))


# ---- max pooling: forward, backward (route to the window's argmax) and its adjoint (select) -------

def _pool_windows(x, kernel, stride, pads, fill):
    xp = _pad(x, pads, fill)
    ohw = [(xp.shape[2 + i] - kernel[i]) // stride[i] + 1 for i in range(2)]
    win = _windows(xp, ohw, kernel, stride, (1, 1))
    return win.reshape(win.shape[:4] + (-1,)), ohw


def _argmax_windows(x, kernel, stride, pads):
    win, ohw = _pool_windows(x, kernel, stride, pads, -np.inf)
    return np.argmax(win, axis=-1), ohw  # first maximum wins (PyTorch's choice on ties)


def max_pool2d_grad_ref(x, gy, kernel, stride, pads):
    arg, (oh, ow) = _argmax_windows(x, kernel, stride, pads)
    n, c, h, w = x.shape
    gp = np.zeros((n, c, h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]), gy.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            hit = np.where(arg == i * kernel[1] + j, gy, 0)
            gp[:, :, i:i + stride[0] * (oh - 1) + 1:stride[0], j:j + stride[1] * (ow - 1) + 1:stride[1]] += hit
    return gp[:, :, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w]


def max_pool2d_select_ref(x, g, kernel, stride, pads):
    arg, _ = _argmax_windows(x, kernel, stride, pads)
    win, _ = _pool_windows(g, kernel, stride, pads, 0)
    return np.take_along_axis(win, arg[..., None], -1)[..., 0]


class _PoolBase(Op):
    traits = Trait.WINDOW | Trait.FRESH
    def _attrs(self, node):
        return {k: node.attrs[k] for k in ("kernel", "stride", "pads")}


def _pool_shape(x, kernel, stride, pads, name):
    if x.ndim != 4:
        raise ShapeError(f"{name}: input must be (N, C, H, W), got {_sh.fmt_shape(x.shape)}")
    if not _dt.is_float(x.dtype):
        raise DTypeError(f"{name}: input must be float, got {x.dtype}")
    for k, (lo, hi) in zip(kernel, pads):
        if builtins.max(lo, hi) > k // 2:
            raise ShapeError(f"{name}: padding {pads} must be at most half the kernel {kernel}")
    return x.shape[:2] + tuple(out_dim(x.shape[2 + i], kernel[i], stride[i], 1, *pads[i]) for i in range(2))


@register
class MaxPool2d(_PoolBase):
    name = "max_pool2d"

    def infer(self, inputs, kernel, stride, pads):
        return [(_pool_shape(inputs[0], kernel, stride, pads, self.name), inputs[0].dtype)]

    def impl(self, x, kernel, stride, pads):
        win, _ = _pool_windows(x, kernel, stride, pads, -np.inf)
        return np.ascontiguousarray(win.max(axis=-1))

    def vjp(self, node, gouts):
        return [apply(MaxPool2dGrad, node.inputs[0], gouts[0], **self._attrs(node))]


@register
class MaxPool2dGrad(_PoolBase):
    """gy routed to each window's (first) maximum of x, overlapping windows accumulating."""
    name = "max_pool2d_grad"

    def infer(self, inputs, kernel, stride, pads):
        return [(inputs[0].shape, inputs[1].dtype)]

    def impl(self, x, gy, kernel, stride, pads):
        return max_pool2d_grad_ref(x, gy, kernel, stride, pads)

    def vjp(self, node, gouts):  # linear in gy; piecewise constant in x
        return [None, apply(MaxPool2dSelect, node.inputs[0], gouts[0], **self._attrs(node))]


@register
class MaxPool2dSelect(_PoolBase):
    """g read at each window's (first) maximum of x: the adjoint of max_pool2d_grad in gy."""
    name = "max_pool2d_select"

    def infer(self, inputs, kernel, stride, pads):
        return [(_pool_shape(inputs[0], kernel, stride, pads, self.name), inputs[1].dtype)]

    def impl(self, x, g, kernel, stride, pads):
        return max_pool2d_select_ref(x, g, kernel, stride, pads)

    def vjp(self, node, gouts):
        return [None, apply(MaxPool2dGrad, node.inputs[0], gouts[0], **self._attrs(node))]


def _pool_args(kernel_size, stride, padding):
    kernel = _tuple(kernel_size, 2, "kernel_size")
    stride = kernel if stride is None else _tuple(stride, 2, "stride")
    pads = tuple((p, p) for p in _tuple(padding, 2, "padding"))
    return kernel, stride, pads


def max_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Max over kernel windows (stride defaults to the kernel; overlapping windows allowed;
    padding counts as -inf)."""
    kernel, stride, pads = _pool_args(kernel_size, stride, padding)
    return apply(MaxPool2d, as_tensor(x), kernel=kernel, stride=stride, pads=pads)


def _box_sum(x, kernel, stride, pads):
    """Window sums as a depthwise convolution with ones (exact, and differentiable for free)."""
    c = x.shape[1]
    if not isinstance(c, int):
        raise ShapeError("pooling needs a static channel count")
    ones = constant(np.ones((c, 1) + kernel, x.dtype))
    return apply(Conv2d, x, ones, stride=stride, pads=pads, dilation=(1, 1), groups=c)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> Tensor:
    """Mean over kernel windows (torch.nn.functional.avg_pool2d semantics)."""
    x = as_tensor(x)
    kernel, stride, pads = _pool_args(kernel_size, stride, padding)
    _pool_shape(x, kernel, stride, pads, "avg_pool2d")
    s = _box_sum(x, kernel, stride, pads)
    if count_include_pad or not any(builtins.max(p) for p in pads):
        return s / float(kernel[0] * kernel[1])
    if not _sh.is_static(x.shape[2:]):
        raise ShapeError("avg_pool2d(count_include_pad=False) needs static spatial dims")
    ones = np.ones((1, 1) + tuple(x.shape[2:]), x.dtype)
    count = conv2d_ref(ones, np.ones((1, 1) + kernel, x.dtype), stride, pads, (1, 1), 1)  # cells per window
    return s / constant(count[0, 0])


def lp_pool2d(x, p: float, kernel_size, stride=None, padding=0) -> Tensor:
    """p-norm pooling: ``(sum over the window of |x|^p)^(1/p)``."""
    x = as_tensor(x)
    kernel, stride, pads = _pool_args(kernel_size, stride, padding)
    _pool_shape(x, kernel, stride, pads, "lp_pool2d")
    return _box_sum(F.abs(x) ** float(p), kernel, stride, pads) ** (1.0 / float(p))


def _pool1d_args(x, kernel_size, stride, padding, name):
    """(N, C, L) input and 1-D window arguments as the 2-D pools' (height-1 windows)."""
    x = as_tensor(x)
    if x.ndim != 3:
        raise ShapeError(f"{name}: input must be (N, C, L), got {_sh.fmt_shape(x.shape)}")
    k = _tuple(kernel_size, 1, "kernel_size")[0]
    s = k if stride is None else _tuple(stride, 1, "stride")[0]
    p = _tuple(padding, 1, "padding")[0]
    return F.expand_dims(x, 2), (1, k), (1, s), (0, p)


def max_pool1d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Max over windows of (N, C, L) (torch.nn.functional.max_pool1d): max_pool2d on a height-1 image."""
    x4, k, s, p = _pool1d_args(x, kernel_size, stride, padding, "max_pool1d")
    return F.squeeze(max_pool2d(x4, k, s, p), 2)


def avg_pool1d(x, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> Tensor:
    """Mean over windows of (N, C, L) (torch.nn.functional.avg_pool1d): avg_pool2d on a height-1 image."""
    x4, k, s, p = _pool1d_args(x, kernel_size, stride, padding, "avg_pool1d")
    return F.squeeze(avg_pool2d(x4, k, s, p, count_include_pad), 2)


def global_avg_pool2d(x, keepdims: bool = False) -> Tensor:
    """Mean over the spatial axes of NCHW: (N, C) (Keras' GlobalAveragePooling2D), or (N, C, 1, 1) with
    keepdims=True (torch's adaptive_avg_pool2d(x, 1))."""
    x = as_tensor(x)
    if x.ndim != 4:
        raise ShapeError(f"global_avg_pool2d: input must be (N, C, H, W), got {_sh.fmt_shape(x.shape)}")
    return F.mean(x, (2, 3), keepdims=keepdims)


# ---- activations (composites: exact, and their gradients come from the parts) ------------------

def hardtanh(x, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    """x clipped to [min_val, max_val] (torch.nn.functional.hardtanh)."""
    for v, what in ((min_val, "min_val"), (max_val, "max_val")):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise GraphcError(f"hardtanh: {what} must be a number, got {v!r}")
    if min_val > max_val:
        raise GraphcError(f"hardtanh: min_val must be <= max_val, got min_val={min_val}, max_val={max_val}")
    return F.clip(as_tensor(x), float(min_val), float(max_val))


def prelu(x, weight) -> Tensor:
    """max(0, x) + weight * min(0, x) (torch.nn.functional.prelu): `weight` has one slope, or one per
    channel (axis 1 of an input of 2 or more dims)."""
    x, weight = as_tensor(x), as_tensor(weight)
    if weight.ndim != 1:
        raise ShapeError(f"prelu: weight must be 1-D (one slope or one per channel), got {weight.type_str}")
    c = weight.shape[0]
    if c != 1:
        if x.ndim < 2 or not _sh.dims_equal(x.shape[1], c):
            raise ShapeError(f"prelu: {c} slopes need an input with {c} channels on axis 1, got "
                             f"{_sh.fmt_shape(x.shape)}")
        weight = F.reshape(weight, (c,) + (1,) * (x.ndim - 2))
    elif x.ndim == 0:
        weight = F.reshape(weight, ())
    return F.relu(x) + weight * F.minimum(x, 0.0)


def heaviside(x, value_at_zero: float = 0.0) -> Tensor:
    """Step function: 1 for x > 0, 0 for x < 0, `value_at_zero` at 0 (gradient 0)."""
    x = as_tensor(x)
    return F.where(x > 0, 1.0, F.where(F.equal(x, 0), value_at_zero, F.zeros_like(x)))


def elu(x, alpha: float = 1.0) -> Tensor:
    """x for x > 0, alpha * (exp(x) - 1) otherwise."""
    x = as_tensor(x)
    return F.where(x > 0, x, alpha * F.expm1(F.minimum(x, 0.0)))


SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def selu(x) -> Tensor:
    """Self-normalising ELU: scale * elu(x, alpha) with the constants of Klambauer et al."""
    return SELU_SCALE * elu(x, SELU_ALPHA)


def softsign(x) -> Tensor:
    """``x / (1 + |x|)``: a composition of existing ops (its gradient and native kernels come from its parts)."""
    x = as_tensor(x)
    return x / (1.0 + F.abs(x))


def gelu(x, approximate: str = "none") -> Tensor:
    """x * Phi(x) (exact, via erf) or the tanh approximation (approximate='tanh')."""
    x = as_tensor(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + F.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    if approximate != "none":
        raise GraphcError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return 0.5 * x * (1.0 + F.erf(x * 0.7071067811865476))


def noisy_relu(x, training: bool = True, std=None, generator=None, key=None) -> Tensor:
    """max(0, x + e), e ~ N(0, sigmoid(x)) (Nair & Hinton) or N(0, std^2) when given; relu at inference."""
    x = as_tensor(x)
    if not training:
        return F.relu(x)
    from .random import normal
    eps = normal(x.shape, dtype=x.dtype, generator=generator, key=key)
    scale = F.sqrt(F.sigmoid(x)) if std is None else std
    return F.relu(x + scale * eps)


def _pieces(x, pieces: int, axis: int):
    x = as_tensor(x)
    axis = _sh.normalize_axis(axis, x.ndim, "maxout")
    c = x.shape[axis]
    if not isinstance(c, int) or c % pieces:
        raise ShapeError(f"maxout: axis {axis} has size {c}, not a multiple of pieces={pieces}")
    return F.reshape(x, x.shape[:axis] + (c // pieces, pieces) + x.shape[axis + 1:]), axis + 1


def maxout(x, pieces: int, axis: int = 1) -> Tensor:
    """Max over groups of `pieces` consecutive features along `axis` (size C -> C / pieces)."""
    y, ax = _pieces(x, pieces, axis)
    return F.max(y, ax)


def soft_maxout(x, pieces: int, axis: int = 1) -> Tensor:
    """Smooth maxout: logsumexp over groups of `pieces` consecutive features."""
    y, ax = _pieces(x, pieces, axis)
    return F.logsumexp(y, ax)


# ---- normalisation, dropout, embedding, one_hot --------------------------------------------------

def _stat_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _channel(t, x):
    return F.reshape(t, (-1,) + (1,) * (x.ndim - 2))


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalise over every axis but the channel axis 1 (torch.nn.functional.batch_norm). Training:
    batch statistics, and (when running_mean/var are parameters) their moving averages are
    implicit updates of every function computing the output; inference: the running statistics."""
    from .state import add_implicit_update
    x = as_tensor(x)
    axes = _stat_axes(x)
    if training:
        mean = F.mean(x, axes)
        var = F.var(x, axes)
    else:
        mean, var = as_tensor(running_mean), as_tensor(running_var)
    y = (x - _channel(mean, x)) * _channel(F.rsqrt(var + eps), x)
    if weight is not None:
        y = y * _channel(weight, x)
    if bias is not None:
        y = y + _channel(bias, x)
    if training and running_mean is not None:
        n = F.size_of(x, axes, x.dtype)
        unbiased = var * (n / F.maximum(n - 1, 1))  # PyTorch keeps the unbiased variance
        add_implicit_update(y, running_mean, (1 - momentum) * running_mean + momentum * F.stop_gradient(mean))
        add_implicit_update(y, running_var, (1 - momentum) * running_var + momentum * F.stop_gradient(unbiased))
    return y


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalise over the trailing `normalized_shape` axes (torch.nn.functional.layer_norm)."""
    x = as_tensor(x)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    mean = F.mean(x, axes, keepdims=True)
    d = x - mean
    y = d * F.rsqrt(F.mean(d * d, axes, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def dropout(x, p: float = 0.5, training: bool = True, generator=None, key=None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout);
    the identity at inference. A fresh mask every call (the generator advances in the graph)."""
    x = as_tensor(x)
    if not 0 <= p < 1:
        raise GraphcError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    from .random import uniform
    keep = uniform(x.shape, dtype=x.dtype if _dt.is_float(x.dtype) else "float32", generator=generator, key=key)
    return F.where(keep >= p, x * (1.0 / (1.0 - p)), F.zeros_like(x))


def embedding(idx, weight) -> Tensor:
    """Rows of `weight` (num, dim) at integer indices (any shape); gradient: scatter-add."""
    return F.take(as_tensor(weight), as_tensor(idx), axis=0)


def one_hot(labels, num_classes: int, dtype: str = "float32") -> Tensor:
    """(..., num_classes) with 1 at each label (labels outside [0, num_classes) give all zeros)."""
    labels = as_tensor(labels)
    if not _dt.is_int(labels.dtype):
        raise DTypeError(f"one_hot: labels must be integers, got {labels.dtype}")
    classes = constant(np.arange(num_classes, dtype=labels.dtype))
    return cast(F.equal(F.expand_dims(labels, -1), classes), dtype)
