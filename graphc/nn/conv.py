"""Volumetric and transposed convolution layers and 3-D pooling with PyTorch's signatures and weight
layouts (so torch state dicts load): Conv3D, ConvTranspose2D, MaxPool3D, AvgPool3D. The functions
behind them (graphc.ops.nn_ops.conv3d, conv_transpose2d, max_pool3d, avg_pool3d) are compositions
of the 2-D ops, so every backend runs them natively."""
from __future__ import annotations

import numpy as np

from .. import init as _init
from ..errors import ShapeError
from ..ops import nn_ops as N
from .layers import _ConvND, _torch_default, _weight
from .module import Module


class Conv3D(_ConvND):
    """3-D convolution on (N, C, D, H, W) (torch.nn.Conv3d): weight (out, in/groups, KD, KH, KW);
    padding an int, 3 ints, 'same', 'valid' or 'full'."""
    nd = 3
    fn = staticmethod(N.conv3d)


class ConvTranspose2D(Module):
    """Transposed 2-D convolution on NCHW (torch.nn.ConvTranspose2d): weight (in, out/groups, KH, KW),
    output size (H-1)*stride - 2*padding + dilation*(K-1) + output_padding + 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, init=None, dtype="float32",
                 seed: int | None = None):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ShapeError(f"ConvTranspose2D: channels {in_channels}->{out_channels} must divide by "
                             f"groups={groups}")
        rng = np.random.default_rng(seed) if seed is not None else None
        k = N._tuple(kernel_size, 2, "kernel_size")
        self.cfg = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                        dilation=dilation)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        shape = (in_channels, out_channels // groups) + k
        # torch's fan_in for this layout is dim 1 x kernel (out/groups x KH x KW), for weight and bias
        self.weight = self.add_param("weight", _weight(shape, init, dtype, rng, "ConvTranspose2D"), dtype)
        self.bias = self.add_param("bias", _torch_default((out_channels,), _init.fans(shape)[0], dtype, rng),
                                   dtype) if bias else None

    def forward(self, x, training):
        return N.conv_transpose2d(x, self.weight, self.bias, **self.cfg)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " + \
            ", ".join(f"{k}={v}" for k, v in self.cfg.items())


class MaxPool3D(Module):
    """Max over (KD, KH, KW) windows of (N, C, D, H, W) (torch.nn.MaxPool3d; stride defaults to the
    kernel)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = (kernel_size, stride, padding)

    def forward(self, x, training):
        return N.max_pool3d(x, *self.args)


class AvgPool3D(Module):
    """Mean over (KD, KH, KW) windows of (N, C, D, H, W) (torch.nn.AvgPool3d)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__()
        self.args = (kernel_size, stride, padding, count_include_pad)

    def forward(self, x, training):
        return N.avg_pool3d(x, *self.args)
