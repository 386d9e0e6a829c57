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
import itertools

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
    """((lo, hi) per spatial axis) from an int, ints, pairs, 'valid', 'same' or 'full' (kernel - 1 on each
    side, dilated)."""
    n = len(kernel)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "full":  # Theano's border mode: every partial overlap, output size + d(k-1)
        return tuple((d * (k - 1), d * (k - 1)) for k, d in zip(kernel, dilation))
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
        raise ShapeError(f"padding must be an int, a tuple, 'same', 'valid' or 'full', got {padding!r}")
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

    @_dt.via_float32   # float16/bfloat16 computed in float32
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

    @_dt.via_float32   # float16/bfloat16 computed in float32
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

    @_dt.via_float32   # float16/bfloat16 computed in float32
    def impl(self, x, gy, kernel, stride, pads, dilation, groups):
        return conv2d_grad_weight_ref(x, gy, kernel, stride, pads, dilation, groups)

    def vjp(self, node, gouts):
        x, gy = node.inputs
        a = self._attrs(node)
        return [apply(Conv2dGradInput, gy, gouts[0], x_hw=x.shape[2:], **a),
                apply(Conv2d, x, gouts[0], **a)]


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """2-D cross-correlation on NCHW input with (O, C/groups, KH, KW) filters (torch.nn.functional.conv2d);
    padding: int, (ph, pw), ((top, bottom), (left, right)), 'same', 'valid' or 'full'."""
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

    @_dt.via_float32   # float16/bfloat16 computed in float32
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

    @_dt.via_float32   # float16/bfloat16 computed in float32
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

    @_dt.via_float32   # float16/bfloat16 computed in float32
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


# ---- 3-D convolution, transposed convolution, 3-D pooling: compositions of the 2-D ops ------------
# (native on every backend by construction; gradients by autodiff of the parts)

def _zeros_along(x, axis: int, n: int):
    """Zeros shaped like x with `n` entries on `axis` (symbolic dims kept)."""
    z = F.zeros_like(F.getitem(x, (slice(None),) * axis + (slice(0, 1),)))
    return F.broadcast_to(z, x.shape[:axis] + (n,) + x.shape[axis + 1:])


def _pad_axis(x, axis: int, lo: int, hi: int):
    """Zero padding of one axis by concatenation."""
    parts = ([_zeros_along(x, axis, lo)] if lo else []) + [x] + ([_zeros_along(x, axis, hi)] if hi else [])
    return F.concatenate(parts, axis) if len(parts) > 1 else x


def _static(name, what, *dims):
    for d in dims:
        if not isinstance(d, int):
            raise ShapeError(f"{name}: {what} must be static, got {d}")


def conv3d(x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """3-D cross-correlation on (N, C, D, H, W) with (O, C/groups, KD, KH, KW) filters
    (torch.nn.functional.conv3d); padding: int, 3 ints, 3 (lo, hi) pairs, 'same', 'valid' or 'full'.

    Composition: the KD depth taps of each output depth are stacked into the channel axis and the
    output depths folded into the batch, so it is ONE conv2d over (N*OD, KD*C, H, W) with
    (O, KD*C/groups, KH, KW) filters (memory: KD/stride_d copies of the input)."""
    x, w = as_tensor(x), as_tensor(w)
    if x.ndim != 5 or w.ndim != 5:
        raise ShapeError(f"conv3d: input must be (N, C, D, H, W) and weight (O, C/groups, KD, KH, KW), got "
                         f"{_sh.fmt_shape(x.shape)} and {_sh.fmt_shape(w.shape)}")
    _check_float("conv3d", x, w)
    _static("conv3d", "channels, depth and kernel sizes", x.shape[1], x.shape[2], *w.shape)
    groups = int(groups)
    o, cg, kd = w.shape[:3]
    c = x.shape[1]
    if groups < 1 or c != cg * groups or o % groups:
        raise ShapeError(f"conv3d: input has {c} channels, weight expects {cg} x groups {groups}; out channels "
                         f"{o} must divide by groups")
    stride, dilation = _tuple(stride, 3, "stride"), _tuple(dilation, 3, "dilation")
    pads = resolve_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    od = out_dim(x.shape[2], kd, stride[0], dilation[0], *pads[0])
    xt = _pad_axis(F.transpose(x, (0, 2, 1, 3, 4)), 1, *pads[0])     # (N, Dp, C, H, W)
    n, h, wd = x.shape[0], x.shape[3], x.shape[4]
    taps = [F.getitem(xt, (slice(None), slice(k * dilation[0], k * dilation[0] + stride[0] * (od - 1) + 1,
                                                 stride[0]))) for k in range(kd)]
    s = F.stack(taps, 2) if kd > 1 else F.expand_dims(taps[0], 2)  # (N, OD, KD, C, H, W)
    if groups > 1 and kd > 1:  # channel order (group, tap, channel-in-group): groups stay contiguous
        s = F.transpose(F.reshape(s, (-1, kd, groups, cg * h * wd)), (0, 2, 1, 3))
    x2 = F.reshape(s, (-1, kd * c, h, wd))                           # (N*OD, KD*C, H, W)
    w2 = F.reshape(F.transpose(w, (0, 2, 1, 3, 4)), (o, kd * cg) + tuple(w.shape[3:]))
    y = conv2d(x2, w2, None, stride[1:], pads[1:], dilation[1:], groups)  # (N*OD, O, OH, OW)
    y = F.transpose(F.reshape(y, (n, od) + tuple(y.shape[1:])), (0, 2, 1, 3, 4))
    return y if bias is None else y + F.reshape(as_tensor(bias), (-1, 1, 1, 1))


def conv_transpose2d(x, w, bias=None, stride=1, padding=0, output_padding=0, groups: int = 1,
                     dilation=1) -> Tensor:
    """Transposed 2-D convolution (torch.nn.functional.conv_transpose2d): x (N, Cin, H, W), weight in
    torch's layout (Cin, Cout/groups, KH, KW), output size (H-1)*s - 2p + d*(k-1) + output_padding + 1.

    It is the adjoint of conv2d in its input, i.e. the conv2d_grad_input op with the weight read as a
    conv2d weight (O=Cin, C/groups=Cout/groups): native on every backend."""
    x, w = as_tensor(x), as_tensor(w)
    if x.ndim != 4 or w.ndim != 4:
        raise ShapeError(f"conv_transpose2d: input must be (N, Cin, H, W) and weight (Cin, Cout/groups, KH, KW), "
                         f"got {_sh.fmt_shape(x.shape)} and {_sh.fmt_shape(w.shape)}")
    _check_float("conv_transpose2d", x, w)
    _static("conv_transpose2d", "channels and kernel sizes", x.shape[1], *w.shape)
    groups = int(groups)
    if groups < 1 or x.shape[1] != w.shape[0] or w.shape[0] % groups:
        raise ShapeError(f"conv_transpose2d: input has {x.shape[1]} channels, weight {_sh.fmt_shape(w.shape)} "
                         f"expects {w.shape[0]} (divisible by groups={groups})")
    stride, dilation = _tuple(stride, 2, "stride"), _tuple(dilation, 2, "dilation")
    pad, opad = _tuple(padding, 2, "padding"), _tuple(output_padding, 2, "output_padding")
    hw, pads, extra = [], [], []
    for i in range(2):
        s, d, p, op, k = stride[i], dilation[i], pad[i], opad[i], w.shape[2 + i]
        if min(s, d) < 1 or p < 0 or not 0 <= op < max(s, d):
            raise ShapeError(f"conv_transpose2d: stride {stride} and dilation {dilation} must be >= 1, padding "
                             f"{pad} >= 0 and output_padding {opad} below max(stride, dilation)")
        size = (x.shape[2 + i] - 1) * s - 2 * p + d * (k - 1) + op + 1
        # the conv2d whose input gradient this is: pads (p, p - op) make its output exactly x's size;
        # rows past the full scatter (op > p) are zeros, appended after
        e = builtins.max(op - p, 0)
        size_in = size - e
        if isinstance(size_in, int) and size_in < 1:
            raise ShapeError(f"conv_transpose2d: output size {size} along axis {2 + i} is not positive "
                             f"(input {x.shape[2 + i]}, kernel {k}, stride {s}, padding {p})")
        hw.append(_sh.canon_dim(size_in))
        pads.append((p, builtins.max(p - op, 0)))
        extra.append(e)
    y = apply(Conv2dGradInput, x, w, x_hw=tuple(hw), stride=stride, pads=tuple(pads), dilation=dilation,
              groups=groups)
    for i, e in enumerate(extra):
        y = _pad_axis(y, 2 + i, 0, e)
    return y if bias is None else y + F.reshape(as_tensor(bias), (-1, 1, 1))


def _pool3d_args(x, kernel_size, stride, padding, name):
    x = as_tensor(x)
    if x.ndim != 5:
        raise ShapeError(f"{name}: input must be (N, C, D, H, W), got {_sh.fmt_shape(x.shape)}")
    if not _dt.is_float(x.dtype):
        raise DTypeError(f"{name}: input must be float, got {x.dtype}")
    _static(name, "channels and depth", x.shape[1], x.shape[2])
    kernel = _tuple(kernel_size, 3, "kernel_size")
    stride = kernel if stride is None else _tuple(stride, 3, "stride")
    pad = _tuple(padding, 3, "padding")
    if any(p < 0 or p > k // 2 for k, p in zip(kernel, pad)) or min(kernel + stride) < 1:
        raise ShapeError(f"{name}: kernel {kernel} and stride {stride} must be >= 1 and padding {pad} at most half "
                         "the kernel")
    return x, kernel, stride, pad


def _pool3d(x, kernel, stride, pad, pool2d):
    """A 3-D pool as two 2-D pools (max and window means are separable): over (H, W) with depth folded
    into the channels, then over depth with (N*C, 1, D, OH*OW) images and (KD, 1) windows. Only
    reshapes between them, no copies."""
    n, c, d = x.shape[:3]
    y = pool2d(F.reshape(x, (-1, c * d) + tuple(x.shape[3:])), kernel[1:], stride[1:], pad[1:])
    oh, ow = y.shape[2:]
    y = pool2d(F.reshape(y, (-1, 1, d, oh * ow)), (kernel[0], 1), (stride[0], 1), (pad[0], 0))
    return F.reshape(y, (n, c, y.shape[2], oh, ow))


def max_pool3d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Max over (KD, KH, KW) windows of (N, C, D, H, W) (torch.nn.functional.max_pool3d; stride defaults
    to the kernel; padding counts as -inf, at most half the kernel)."""
    x, kernel, stride, pad = _pool3d_args(x, kernel_size, stride, padding, "max_pool3d")
    return _pool3d(x, kernel, stride, pad, max_pool2d)


def avg_pool3d(x, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> Tensor:
    """Mean over (KD, KH, KW) windows of (N, C, D, H, W) (torch.nn.functional.avg_pool3d). Without
    count_include_pad the divisor is the number of real cells, a product over the axes, so the two
    2-D means compose exactly."""
    x, kernel, stride, pad = _pool3d_args(x, kernel_size, stride, padding, "avg_pool3d")
    if not count_include_pad and any(pad) and not _sh.is_static(x.shape[3:]):
        raise ShapeError("avg_pool3d(count_include_pad=False) with padding needs static spatial dims")
    return _pool3d(x, kernel, stride, pad,
                   lambda t, k, s, p: avg_pool2d(t, k, s, p, count_include_pad=count_include_pad))


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


def pnorm_args(group_size, p, owner: str = "pnorm_pool") -> None:
    """Check pnorm_pool's group_size (an int >= 1) and p (a finite number >= 1)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise GraphcError(f"{owner}: group_size must be an integer >= 1, got {group_size!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not p >= 1 \
            or not np.isfinite(p):
        raise GraphcError(f"{owner}: p must be a finite number >= 1, got {p!r}")


def pnorm_pool(x, group_size: int, p: float = 2.0, axis: int = 1) -> Tensor:
    """p-norm units (Gulcehre et al.'s learned-norm pooling with a fixed p; Kaldi's p-norm): the
    features along `axis` in groups of `group_size` consecutive units, each group reduced to
    ``(sum |x_i|^p)^(1/p)`` (size C -> C / group_size). A group of zeros gives 0 with gradient 0 (the
    subgradient; the plain formula would give 0 * inf)."""
    pnorm_args(group_size, p)
    x = as_tensor(x)
    if not _dt.is_float(x.dtype):
        raise DTypeError(f"pnorm_pool: {x.label} must be floating point, got {x.dtype}")
    axis = _sh.normalize_axis(axis, x.ndim, "pnorm_pool")
    c = x.shape[axis]
    if not isinstance(c, int) or c % int(group_size):
        raise ShapeError(f"pnorm_pool: axis {axis} of {x.label} {_sh.fmt_shape(x.shape)} has size {c}, not a "
                         f"multiple of group_size={group_size}")
    g = int(group_size)
    y = F.reshape(x, x.shape[:axis] + (c // g, g) + x.shape[axis + 1:])
    p = float(p)
    s = F.sum(y * y if p == 2.0 else F.abs(y) ** p, axis + 1)
    pos = s > 0
    safe = F.where(pos, s, F.ones_like(s))
    return F.where(pos, F.sqrt(safe) if p == 2.0 else safe ** (1.0 / p), F.zeros_like(s))


def rbf(x, centres, gamma) -> Tensor:
    """Gaussian radial basis units: ``exp(-gamma_j * ||x - c_j||^2)`` for x (..., in), centres
    (out, in) and gamma a scalar or (out,) (one width per unit); returns (..., out)."""
    x, centres, gamma = as_tensor(x), as_tensor(centres), as_tensor(gamma)
    if centres.ndim != 2:
        raise ShapeError(f"rbf: centres must be (out_features, in_features), got {centres.type_str}")
    if x.ndim < 1 or not _sh.dims_equal(x.shape[-1], centres.shape[1]):
        raise ShapeError(f"rbf: input {x.label} has shape {_sh.fmt_shape(x.shape)}, its last dim should be "
                         f"in_features={centres.shape[1]} (centres {_sh.fmt_shape(centres.shape)})")
    if gamma.ndim > 1 or (gamma.ndim == 1 and not _sh.dims_equal(gamma.shape[0], centres.shape[0])):
        raise ShapeError(f"rbf: gamma must be a scalar or one width per unit ({centres.shape[0]},), got "
                         f"{_sh.fmt_shape(gamma.shape)}")
    d = F.expand_dims(x, -2) - centres
    return F.exp(-(gamma * F.sum(d * d, -1)))


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
    """Normalise over the trailing `normalized_shape` axes (torch.nn.functional.layer_norm): one layer_norm
    op (graphc/ops/layernorm.py) for float32/float64 with weight and bias of the normalised shape."""
    from . import layernorm
    x = as_tensor(x)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    trailing = x.shape[x.ndim - len(shape):]
    if not 1 <= len(shape) <= x.ndim or not all(_sh.dims_equal(a, b) for a, b in zip(shape, trailing)):
        raise ShapeError(f"layer_norm: normalized_shape {shape} must be the trailing dims of x "
                         f"{_sh.fmt_shape(x.shape)}")
    weight = None if weight is None else as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    # one op (one kernel on llvm) where it takes these inputs, else the same arithmetic out of existing ops
    y = layernorm.build(x, weight, bias, len(shape), eps)
    return y if y is not None else layernorm.composition(x, weight, bias, len(shape), eps)


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


# ---- RMS normalisation, rotary position embedding, grid sampling ---------------------------------

def rms_norm(x, normalized_shape, weight=None, eps: float | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the trailing `normalized_shape` axes, times `weight`
    (torch.nn.functional.rms_norm; eps=None is the machine epsilon of x's dtype, as in torch).
    float16/bfloat16 inputs are normalised in float32 and rounded once."""
    x = as_tensor(x)
    if not _dt.is_float(x.dtype):
        raise DTypeError(f"rms_norm: x must be floating point, got {x.dtype}")
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if len(shape) > x.ndim or tuple(x.shape[x.ndim - len(shape):]) != tuple(shape):
        raise ShapeError(f"rms_norm: normalized_shape {shape} must be the trailing dims of x {x.label} "
                         f"of shape {_sh.fmt_shape(x.shape)}")
    if eps is None:
        eps = float(np.finfo(_dt.np_dtype(x.dtype)).eps)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    xf = cast(x, _dt.compute_dtype(x.dtype))
    y = cast(xf * F.rsqrt(F.mean(xf * xf, axes, keepdims=True) + eps), x.dtype)
    return y * weight if weight is not None else y


def rotary_embedding(x, cos, sin, position_ids=None, interleaved: bool = False, rotary_dim: int | None = None,
                     num_heads: int | None = None) -> Tensor:
    """Rotary position embedding (RoPE), the ONNX RotaryEmbedding op.

    x: (B, H, S, D), or (B, S, H*D) with `num_heads`; cos, sin: (max_position, R/2) gathered at the
    integer `position_ids` (B, S), or already (B, S, R/2) when position_ids is None. The first R =
    `rotary_dim` (default D) features of each head rotate in pairs: halves (x[i], x[i + R/2]) or, with
    `interleaved`, neighbours (x[2i], x[2i + 1]); the rest pass through."""
    x, cos, sin = as_tensor(x), as_tensor(cos), as_tensor(sin)
    if x.ndim == 3:
        if not num_heads:
            raise ShapeError(f"rotary_embedding: a 3-D x {x.label} of shape {_sh.fmt_shape(x.shape)} needs num_heads")
        b, s, hidden = x.shape
        t = F.reshape(x, (b, s, num_heads, hidden // num_heads))
    elif x.ndim == 4:
        t = F.transpose(x, (0, 2, 1, 3))                                  # (B, S, H, D)
    else:
        raise ShapeError(f"rotary_embedding: x must be (B, H, S, D) or (B, S, H*D), got {_sh.fmt_shape(x.shape)}")
    d = t.shape[3]
    rd = int(rotary_dim or d)
    if rd % 2 or rd > d:
        raise ShapeError(f"rotary_embedding: rotary_dim {rd} must be even and at most the head size {d}")
    if position_ids is not None:
        position_ids = as_tensor(position_ids)
        cos, sin = F.take(cos, position_ids, 0), F.take(sin, position_ids, 0)
    cos, sin = F.expand_dims(cos[..., :rd // 2], 2), F.expand_dims(sin[..., :rd // 2], 2)   # (B, S, 1, R/2)
    rot, keep = t[:, :, :, :rd], t[:, :, :, rd:]
    if interleaved:
        x1, x2 = rot[:, :, :, 0::2], rot[:, :, :, 1::2]
    else:
        x1, x2 = rot[:, :, :, :rd // 2], rot[:, :, :, rd // 2:]
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    rot = F.reshape(F.stack([real, imag], -1), rot.shape) if interleaved else F.concatenate([real, imag], -1)
    out = F.concatenate([rot, keep], -1) if rd < d else rot
    out = cast(out, x.dtype)
    return F.transpose(out, (0, 2, 1, 3)) if x.ndim == 4 else F.reshape(out, x.shape)


def _unnormalize(g, size: int, align_corners: bool):
    return (g + 1) * ((size - 1) / 2) if align_corners else ((g + 1) * size - 1) / 2


def _reflect(u, twice_lo: float, twice_hi: float):
    """torch's reflect_coordinates: fold u into [lo, hi] by reflecting at both ends."""
    if twice_lo == twice_hi:
        return F.zeros_like(u)
    lo, span = twice_lo / 2, (twice_hi - twice_lo) / 2
    a = F.abs(u - lo)
    flips = F.floor(a / span)
    extra = a - flips * span
    even = F.equal(flips - F.floor(flips / 2) * 2, 0.0)
    return F.where(even, extra + lo, span - extra + lo)


def _pad_coord(u, size: int, padding_mode: str, align_corners: bool):
    """Source coordinate after border/reflection padding (torch's compute_coordinates)."""
    if padding_mode == "border":
        return F.clip(u, 0.0, float(size - 1))
    if padding_mode == "reflection":
        u = _reflect(u, 0.0, 2.0 * (size - 1)) if align_corners else _reflect(u, -1.0, 2.0 * size - 1)
        return F.clip(u, 0.0, float(size - 1))
    return u


def _round_half_even(u):
    r = F.floor(u + 0.5)
    odd = F.equal(r - F.floor(r / 2) * 2, 1.0)
    return F.where(F.logical_and(F.equal(r - u, 0.5), odd), r - 1, r)


def _cubic_weights(t, a: float = -0.75):
    """Keys' cubic convolution weights of the taps at -1, 0, 1, 2 for a fraction t in [0, 1)."""
    def near(z):   # |z| <= 1
        return ((a + 2) * z - (a + 3)) * z * z + 1

    def far(z):    # 1 < |z| < 2
        return ((a * z - 5 * a) * z + 8 * a) * z - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}


def grid_sample(x, grid, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False) -> Tensor:
    """Sample x (N, C, *spatial) at the normalised coordinates grid (N, *out, k), k = len(spatial),
    grid[..., 0] indexing the last spatial axis (torch.nn.functional.grid_sample, any number of
    spatial axes). mode: bilinear (linear), nearest (ties to even) or bicubic (Keys, a = -0.75);
    padding_mode: zeros, border or reflection. -> (N, C, *out). Gradients reach x (scatter-add) and
    the grid (through the interpolation weights)."""
    x, grid = as_tensor(x), as_tensor(grid)
    mode_ = _GRID_MODES.get(mode)
    if mode_ is None:
        raise GraphcError(f"grid_sample: mode must be one of bilinear, nearest, bicubic, got {mode!r}")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise GraphcError(f"grid_sample: padding_mode must be zeros, border or reflection, got {padding_mode!r}")
    _check_float("grid_sample", x)
    _check_float("grid_sample", grid)
    k = x.ndim - 2
    if k < 1 or grid.ndim != k + 2 or grid.shape[-1] != k:
        raise ShapeError(f"grid_sample: x {x.label} of shape {_sh.fmt_shape(x.shape)} needs a grid of shape "
                         f"(N, *out, {k}) (rank {k + 2}), got {_sh.fmt_shape(grid.shape)}")
    _static("grid_sample", "x's channel and spatial dims", *x.shape[1:])
    n, spatial = x.shape[0], tuple(x.shape[2:])
    if not _sh.dims_equal(grid.shape[0], n):
        grid = F.broadcast_to(grid, (n,) + tuple(grid.shape[1:]))
    out = tuple(grid.shape[1:-1])
    _static("grid_sample", "the grid's dims", *out)
    m = int(np.prod(out, dtype=np.int64))
    g = F.reshape(cast(grid, _dt.compute_dtype(grid.dtype)), (n, m, k))
    coords = [_unnormalize(g[:, :, k - 1 - i], size, align_corners) for i, size in enumerate(spatial)]
    if isinstance(n, int):
        y = sample_at(x, coords, mode_, padding_mode, align_corners)
    else:   # a symbolic batch: one image per step of a loop (the gather's batch offsets need N)
        from .scan import scan

        def step(carry, item):
            xi, *ci = item
            return carry, sample_at(F.expand_dims(xi, 0), [F.expand_dims(u, 0) for u in ci], mode_,
                                    padding_mode, align_corners)[0]
        _, y = scan(step, None, (x, *coords))
    return F.reshape(y, (n, x.shape[1]) + out)


def sample_at(x, coords, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False) -> Tensor:
    """x (N, C, *spatial) read at pixel coordinates: coords[i] (N, M) is the (fractional) index along
    spatial axis i. -> (N, C, M) in x's dtype. The interpolation and padding rules of grid_sample
    (align_corners only decides where reflection folds). One gather of every tap, weights summed."""
    n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    k = len(spatial)
    strides = [int(np.prod(spatial[i + 1:], dtype=np.int64)) for i in range(k)]
    taps = []        # per spatial axis: list of (index (N, M) float, weight (N, M) or None)
    for i, size in enumerate(spatial):
        u = coords[i]
        if mode == "nearest":
            taps.append([(_round_half_even(_pad_coord(u, size, padding_mode, align_corners)), None)])
        elif mode == "bilinear":
            u = _pad_coord(u, size, padding_mode, align_corners)
            i0 = F.floor(u)
            t = u - i0
            taps.append([(i0, 1 - t), (i0 + 1, t)])
        else:
            i0 = F.floor(u)
            ws = _cubic_weights(u - i0)
            axis_taps = []
            for o, w in zip((-1, 0, 1, 2), ws):
                j = i0 + o
                if padding_mode != "zeros":   # each tap index folded back inside (torch's get_value_bounded)
                    j = F.floor(_pad_coord(j, size, padding_mode, align_corners))
                axis_taps.append((j, w))
            taps.append(axis_taps)
    idx_all, w_all = [], []
    for combo in itertools.product(*taps):
        flat, weight, valid = None, None, None
        for i, (j, w) in enumerate(combo):
            inside = F.logical_and(F.greater_equal(j, 0.0), F.less_equal(j, float(spatial[i] - 1)))
            valid = inside if valid is None else F.logical_and(valid, inside)
            ji = cast(F.clip(F.stop_gradient(j), 0.0, float(spatial[i] - 1)), "int64")
            term = ji * strides[i] if strides[i] != 1 else ji
            flat = term if flat is None else flat + term
            if w is not None:
                weight = w if weight is None else weight * w
        if weight is None:
            weight = F.ones_like(coords[0])
        idx_all.append(flat)
        w_all.append(F.where(valid, weight, 0.0))
    p = int(np.prod(spatial, dtype=np.int64))
    idx = F.stack(idx_all, 1)                                            # (N, T, M)
    base = constant((np.arange(n * c, dtype=np.int64) * p).reshape(n, c, 1, 1))
    vals = F.take(F.reshape(x, (n * c * p,)), base + F.expand_dims(idx, 1), 0)   # (N, C, T, M)
    w = F.expand_dims(F.stack(w_all, 1), 1)                              # (N, 1, T, M)
    y = F.sum(cast(vals, w.dtype) * w, 2)
    return cast(y, x.dtype)


def affine_grid(theta, size, align_corners: bool = False) -> Tensor:
    """The sampling grid of an affine map (torch.nn.functional.affine_grid): theta (N, 2, 3) with size
    (N, C, H, W) gives (N, H, W, 2); theta (N, 3, 4) with size (N, C, D, H, W) gives (N, D, H, W, 3)."""
    theta = as_tensor(theta)
    size = tuple(int(s) for s in size)
    k = len(size) - 2
    if k < 1 or theta.ndim != 3 or tuple(theta.shape[1:]) != (k, k + 1):
        raise ShapeError(f"affine_grid: size {size} needs theta of shape (N, {k}, {k + 1}), "
                         f"got {_sh.fmt_shape(theta.shape)}")

    def lin(s):
        v = np.linspace(-1.0, 1.0, s) if s > 1 else np.zeros(s)
        return v if align_corners else v * (s - 1) / s
    spatial = size[2:]
    axes = np.meshgrid(*[lin(s) for s in spatial], indexing="ij")     # one array per spatial axis
    base = np.stack([a.reshape(-1) for a in reversed(axes)] + [np.ones(int(np.prod(spatial)))], -1)
    cd = _dt.compute_dtype(theta.dtype)
    b = constant(base.astype(_dt.np_dtype(cd)))                       # (P, k + 1)
    grid = F.matmul(b, F.transpose(cast(theta, cd), (0, 2, 1)))        # (N, P, k)
    return cast(F.reshape(grid, (theta.shape[0],) + spatial + (k,)), theta.dtype)
