"""Layers with PyTorch's signatures: Dense, Conv1D/Conv2D, pooling (1-D, 2-D, global), BatchNorm,
LayerNorm, Dropout, Embedding, Flatten, activations (PReLU with learnable slopes), and a ResNet basic
block. Weights use PyTorch's shapes and default initialisation (so torch state dicts load), seeded
through graphc.init."""
from __future__ import annotations

import difflib
import math
from typing import Callable

import numpy as np

from graphc import ops as F
from .. import init as _init
from ..errors import GraphcError, ShapeError
from ..ir import fmt_loc, user_frame
from ..ops import nn_ops as N
from ..ops.random import Generator
from .module import Module, Residual, Sequential


def _at() -> str:
    """Where the user called the layer (for error messages)."""
    return f"\n  called at {fmt_loc(user_frame())}"


def _torch_default(shape, fan_in, dtype, rng):
    """PyTorch's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    b = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return _init.uniform(shape, -b, b, dtype, rng)


#: initialiser names a layer's init= accepts (functions of graphc.init)
INITS = ("zeros", "ones", "normal", "uniform", "xavier_uniform", "xavier_normal", "glorot_uniform",
         "glorot_normal", "kaiming_uniform", "kaiming_normal", "he_uniform", "he_normal", "orthogonal")


def _weight(shape, init, dtype, rng, owner: str = "layer"):
    if init is None:
        return _torch_default(shape, _init.fans(shape)[0], dtype, rng)
    if isinstance(init, str):
        if init not in INITS:
            near = difflib.get_close_matches(init, INITS, n=1)
            raise GraphcError(f"{owner}: unknown init={init!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; expected None (PyTorch's default), one of {', '.join(INITS)}, "
                              "or a function (shape, dtype=, rng=) -> array")
        init = getattr(_init, init)
    if not callable(init):
        raise GraphcError(f"{owner}: init must be None, an initialiser name or a function (shape, dtype=, rng=) "
                          f"-> array, got {type(init).__name__}")
    w = np.asarray(init(shape, dtype=dtype, rng=rng))
    if w.shape != tuple(shape):
        raise ShapeError(f"{owner}: init returned shape {w.shape}, expected {tuple(shape)}")
    return w


class Dense(Module):
    """y = x @ W.T + b with W of shape (out_features, in_features) (torch.nn.Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init=None, dtype="float32",
                 seed: int | None = None):
        super().__init__()
        rng = np.random.default_rng(seed) if seed is not None else None
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.add_param("weight", _weight((out_features, in_features), init, dtype, rng,
                                                       f"Dense({in_features}, {out_features})"), dtype)
        self.bias = self.add_param("bias", _torch_default((out_features,), in_features, dtype, rng), dtype) \
            if bias else None

    def forward(self, x, training):
        x = F.as_tensor(x)
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"Dense({self.in_features}, {self.out_features}): input {x.label} has shape "
                             f"{x.shape}, last dim should be {self.in_features}" + _at())
        y = F.matmul(x, F.transpose(self.weight))
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


Linear = Dense


class _ConvND(Module):
    nd = 2
    fn = staticmethod(N.conv2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, init=None, dtype="float32", seed: int | None = None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ShapeError(f"{type(self).__name__}: channels {in_channels}->{out_channels} must divide by "
                             f"groups={groups}")
        rng = np.random.default_rng(seed) if seed is not None else None
        k = N._tuple(kernel_size, self.nd, "kernel_size")
        self.cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        shape = (out_channels, in_channels // groups) + k
        self.weight = self.add_param("weight", _weight(shape, init, dtype, rng, type(self).__name__), dtype)
        self.bias = self.add_param("bias", _torch_default((out_channels,), _init.fans(shape)[0], dtype, rng),
                                   dtype) if bias else None

    def forward(self, x, training):
        return self.fn(x, self.weight, self.bias, **self.cfg)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " + \
            ", ".join(f"{k}={v}" for k, v in self.cfg.items())


class Conv2D(_ConvND):
    """2-D convolution on NCHW (torch.nn.Conv2d)."""


class Conv1D(_ConvND):
    """1-D convolution on (N, C, L) (torch.nn.Conv1d)."""
    nd = 1
    fn = staticmethod(N.conv1d)


class MaxPool2D(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = (kernel_size, stride, padding)

    def forward(self, x, training):
        return N.max_pool2d(x, *self.args)


class AvgPool2D(Module):
    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__()
        self.args = (kernel_size, stride, padding, count_include_pad)

    def forward(self, x, training):
        return N.avg_pool2d(x, *self.args)


class MaxPool1D(Module):
    """Max over windows of (N, C, L) (torch.nn.MaxPool1d; stride defaults to the kernel)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = (kernel_size, stride, padding)

    def forward(self, x, training):
        return N.max_pool1d(x, *self.args)


class AvgPool1D(Module):
    """Mean over windows of (N, C, L) (torch.nn.AvgPool1d)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__()
        self.args = (kernel_size, stride, padding, count_include_pad)

    def forward(self, x, training):
        return N.avg_pool1d(x, *self.args)


class GlobalAvgPool2D(Module):
    """Mean over H and W of NCHW: (N, C), or (N, C, 1, 1) with keepdims=True (torch's
    AdaptiveAvgPool2d(1))."""

    def __init__(self, keepdims: bool = False):
        super().__init__()
        self.keepdims = bool(keepdims)

    def forward(self, x, training):
        return N.global_avg_pool2d(x, self.keepdims)

    def extra_repr(self):
        return f"keepdims={self.keepdims}"


class LPPool2D(Module):
    """p-norm pooling over windows."""

    def __init__(self, norm_type: float, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = (norm_type, kernel_size, stride, padding)

    def forward(self, x, training):
        return N.lp_pool2d(x, *self.args)


class BatchNorm(Module):
    """Batch normalisation over axis 1 of (N, C) or (N, C, ...) input (torch's BatchNorm1d/2d).

    Training: batch statistics; the running averages advance as implicit updates of every function
    that computes a training-mode output. Inference: the running statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 dtype="float32"):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = self.add_param("weight", np.ones(num_features), dtype) if affine else None
        self.bias = self.add_param("bias", np.zeros(num_features), dtype) if affine else None
        self.running_mean = self.add_buffer("running_mean", np.zeros(num_features), dtype)
        self.running_var = self.add_buffer("running_var", np.ones(num_features), dtype)

    def forward(self, x, training):
        x = F.as_tensor(x)
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ShapeError(f"BatchNorm({self.num_features}): input {x.label} has shape {x.shape}, "
                             f"axis 1 should be {self.num_features}" + _at())
        return N.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training,
                            self.momentum, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


BatchNorm1D = BatchNorm2D = BatchNorm


class LayerNorm(Module):
    """Normalisation over the trailing `shape` axes with elementwise affine parameters."""

    def __init__(self, shape, eps: float = 1e-5, elementwise_affine: bool = True, dtype="float32"):
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.weight = self.add_param("weight", np.ones(self.shape), dtype) if elementwise_affine else None
        self.bias = self.add_param("bias", np.zeros(self.shape), dtype) if elementwise_affine else None

    def forward(self, x, training):
        return N.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    """torch.nn.RMSNorm: x / sqrt(mean(x^2) + eps) over the trailing `normalized_shape` axes, times an
    elementwise `weight` (ones at first); eps=None is the machine epsilon of the input's dtype."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 dtype="float32"):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = self.add_param("weight", np.ones(self.normalized_shape), dtype) if elementwise_affine else None

    def forward(self, x, training):
        return N.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout with probability p in training; the identity at inference. Its generator's
    state is graph state: every training-mode call of a compiled function draws a fresh mask."""

    def __init__(self, p: float = 0.5, seed: int | None = None, generator: Generator | None = None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise GraphcError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
        self.p = p
        self.generator = generator or (Generator(seed, f"{self.prefix}.rng") if seed is not None else None)

    def forward(self, x, training):
        return N.dropout(x, self.p, training, generator=self.generator)

    def extra_repr(self):
        return f"p={self.p}"


class NoisyReLU(Module):
    """max(0, x + e) in training, e ~ N(0, sigmoid(x)) (Nair & Hinton) or N(0, std^2) when std is given;
    plain relu at inference (`.eval()` or training=False). A fresh draw every training-mode call."""

    def __init__(self, std: float | None = None, seed: int | None = None, generator: Generator | None = None):
        super().__init__()
        if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0):
            raise GraphcError(f"NoisyReLU: std must be None or a number >= 0, got {std!r}")
        self.std = std
        self.generator = generator or (Generator(seed, f"{self.prefix}.rng") if seed is not None else None)

    def forward(self, x, training):
        return N.noisy_relu(x, training, std=self.std, generator=self.generator)

    def extra_repr(self):
        return "" if self.std is None else f"std={self.std}"


class Embedding(Module):
    """A (num, dim) table indexed by integer tensors (torch.nn.Embedding: N(0, 1) init)."""

    def __init__(self, num: int, dim: int, dtype="float32", seed: int | None = None):
        super().__init__()
        rng = np.random.default_rng(seed) if seed is not None else None
        self.weight = self.add_param("weight", _init.normal((num, dim), 1.0, dtype=dtype, rng=rng), dtype)

    def forward(self, idx, training):
        return N.embedding(idx, self.weight)


class Flatten(Module):
    """Collapse the axes from `start_dim` on (default 1, keeping the batch axis)."""

    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x, training):
        return F.flatten(x, self.start_dim)


class Lambda(Module):
    """A plain function as a layer."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x, training):
        return self.fn(x)


def _activation(name: str, fn: Callable, doc: str):
    def __init__(self, *args, **kwargs):
        Module.__init__(self)
        self.args, self.kwargs = args, kwargs

    def forward(self, x, training):
        return fn(x, *self.args, **self.kwargs)
    return type(name, (Module,), {"__init__": __init__, "forward": forward, "__doc__": doc})


ReLU = _activation("ReLU", F.relu, "max(x, 0)")
Tanh = _activation("Tanh", F.tanh, "tanh(x)")
Sigmoid = _activation("Sigmoid", F.sigmoid, "1 / (1 + exp(-x))")
Softplus = _activation("Softplus", F.softplus, "log(1 + exp(x))")
LeakyReLU = _activation("LeakyReLU", F.leaky_relu, "max(x, alpha x)")
ELU = _activation("ELU", N.elu, "x, or alpha (exp(x) - 1) for x <= 0")
SELU = _activation("SELU", N.selu, "scaled ELU")
GELU = _activation("GELU", N.gelu, "x Phi(x)")
Maxout = _activation("Maxout", N.maxout, "max over groups of k features")
Softmax = _activation("Softmax", F.softmax, "softmax over an axis (default last)")
Softsign = _activation("Softsign", N.softsign, "``x / (1 + |x|)``")


class Hardtanh(Module):
    """x clipped to [min_val, max_val] (torch.nn.Hardtanh)."""

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0):
        super().__init__()
        N.hardtanh(0.0, min_val, max_val)   # check the arguments now, not at the first call
        self.min_val, self.max_val = min_val, max_val

    def forward(self, x, training):
        return N.hardtanh(x, self.min_val, self.max_val)

    def extra_repr(self):
        return f"min_val={self.min_val}, max_val={self.max_val}"


class PReLU(Module):
    """max(0, x) + a * min(0, x) with learnable slopes a (torch.nn.PReLU): `weight` of shape
    (num_parameters,), all `init`; num_parameters=1 shares one slope, otherwise one per channel (axis 1)."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, dtype="float32"):
        super().__init__()
        if isinstance(num_parameters, bool) or not isinstance(num_parameters, (int, np.integer)) \
                or num_parameters < 1:
            raise GraphcError(f"PReLU: num_parameters must be an integer >= 1, got {num_parameters!r}")
        if isinstance(init, bool) or not isinstance(init, (int, float, np.integer, np.floating)):
            raise GraphcError(f"PReLU: init must be a number (the initial slope), got {init!r}")
        self.num_parameters = int(num_parameters)
        self.weight = self.add_param("weight", np.full(self.num_parameters, float(init)), dtype)

    def forward(self, x, training):
        return N.prelu(x, self.weight)

    def extra_repr(self):
        return f"num_parameters={self.num_parameters}"


def BasicBlock(in_channels: int, out_channels: int, stride: int = 1, seed: int | None = None) -> Residual:
    """ResNet's basic block: conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the
    shape changes), then ReLU."""
    s = (lambda k: None if seed is None else seed + k)
    body = Sequential(Conv2D(in_channels, out_channels, 3, stride, 1, bias=False, seed=s(0)),
                      BatchNorm(out_channels), F.relu,
                      Conv2D(out_channels, out_channels, 3, 1, 1, bias=False, seed=s(1)), BatchNorm(out_channels))
    short = None
    if stride != 1 or in_channels != out_channels:
        short = Sequential(Conv2D(in_channels, out_channels, 1, stride, bias=False, seed=s(2)),
                           BatchNorm(out_channels))
    return Residual(body, short, F.relu)
