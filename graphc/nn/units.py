"""Units of the course notes that torch has no layer for: Gaussian radial basis units (`RBF`), p-norm
units over groups (`PNormPool`) and highway layers (`Highway`). All are compositions of existing
differentiable ops, so they compile and differentiate on every backend."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from graphc import ops as F
from .. import init as _init
from ..errors import GraphcError, ShapeError
from ..ops import nn_ops as N
from .layers import Dense, _at
from .module import Module

__all__ = ["RBF", "PNormPool", "Highway", "highway"]


def _positive_int(owner: str, what: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise GraphcError(f"{owner}: {what} must be a positive int, got {v!r}")
    return int(v)


class RBF(Module):
    """Gaussian radial basis units: ``y_j = exp(-gamma_j * ||x - c_j||^2)`` with learnable centres c_j
    and widths sigma_j (gamma_j = 1 / sigma_j^2), for x of shape (..., in_features) -> (..., out_features).

    Parameters (the layout of the common PyTorch RBF layer, torch_rbf): `centres` (out_features,
    in_features), initialised N(0, 1), and `log_sigmas` (out_features,), initialised log(sigma). The
    widths are learnt through their logarithm, so they stay positive."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 1.0, dtype="float32",
                 seed: int | None = None):
        super().__init__()
        self.in_features = _positive_int("RBF", "in_features", in_features)
        self.out_features = _positive_int("RBF", "out_features", out_features)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)) \
                or not sigma > 0 or not math.isfinite(sigma):
            raise GraphcError(f"RBF: sigma (the initial width) must be a number > 0, got {sigma!r}")
        rng = np.random.default_rng(seed) if seed is not None else None
        self.centres = self.add_param("centres", _init.normal((self.out_features, self.in_features), 1.0,
                                                              dtype=dtype, rng=rng), dtype)
        self.log_sigmas = self.add_param("log_sigmas", np.full(self.out_features, math.log(sigma)), dtype)

    def gamma(self):
        """The widths as gamma_j = 1 / sigma_j^2 (a tensor)."""
        return F.exp(-2.0 * self.log_sigmas)

    def forward(self, x, training):
        x = F.as_tensor(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"RBF({self.in_features}, {self.out_features}): input {x.label} has shape "
                             f"{x.shape}, last dim should be {self.in_features}" + _at())
        return N.rbf(x, self.centres, self.gamma())

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}"


class PNormPool(Module):
    """p-norm units: groups of `group_size` consecutive features along `axis` (default 1, the feature
    or channel axis) each give ``(sum |x_i|^p)^(1/p)`` (Gulcehre et al.'s Lp units with a fixed p,
    a smooth relative of maxout: p -> inf is max |x_i|). See `gc.pnorm_pool`."""

    def __init__(self, group_size: int, p: float = 2.0, axis: int = 1):
        super().__init__()
        N.pnorm_args(group_size, p, "PNormPool")   # check the arguments now, not at the first call
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise GraphcError(f"PNormPool: axis must be an int, got {axis!r}")
        self.group_size, self.p, self.axis = int(group_size), float(p), int(axis)

    def forward(self, x, training):
        return N.pnorm_pool(x, self.group_size, self.p, self.axis)

    def extra_repr(self):
        return f"group_size={self.group_size}, p={self.p}, axis={self.axis}"


def highway(x, transform_weight, transform_bias, gate_weight, gate_bias, activation: Callable = F.relu):
    """The highway layer as a function of its weights (torch's Linear layout, (out, in)):
    ``T * H + (1 - T) * x`` with H = activation(x W_H^T + b_H), T = sigmoid(x W_T^T + b_T)."""
    x = F.as_tensor(x)

    def lin(w, b):
        y = F.matmul(x, F.transpose(F.as_tensor(w)))
        return y if b is None else y + b
    h = activation(lin(transform_weight, transform_bias))
    t = F.sigmoid(lin(gate_weight, gate_bias))
    return x + t * (h - x)


_ACTS = {"relu": F.relu, "tanh": F.tanh, "sigmoid": F.sigmoid, "gelu": N.gelu, "elu": N.elu}


class Highway(Module):
    """A highway layer (Srivastava, Greff & Schmidhuber 2015): ``y = T * H(x) + (1 - T) * x`` with the
    transform ``H(x) = activation(transform(x))`` and the gate ``T = sigmoid(gate(x))``, both
    Dense(features, features). The gate's bias starts at `gate_bias` (negative, -2 by default) so the
    layer begins close to the identity and deep stacks train. State-dict keys: `transform.weight`,
    `transform.bias`, `gate.weight`, `gate.bias`."""

    def __init__(self, features: int, activation: str | Callable = "relu", gate_bias: float = -2.0,
                 dtype="float32", seed: int | None = None):
        super().__init__()
        self.features = _positive_int("Highway", "features", features)
        if isinstance(activation, str):
            if activation not in _ACTS:
                raise GraphcError(f"Highway: activation must be one of {', '.join(_ACTS)} or a function of a "
                                  f"tensor, got {activation!r}")
            self.act_name, act = activation, _ACTS[activation]
        elif callable(activation):
            self.act_name, act = getattr(activation, "__name__", "custom"), activation
        else:
            raise GraphcError(f"Highway: activation must be a name or a function of a tensor, got "
                              f"{type(activation).__name__}")
        if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float, np.integer, np.floating)):
            raise GraphcError(f"Highway: gate_bias must be a number, got {gate_bias!r}")
        self.transform = Dense(self.features, self.features, dtype=dtype, seed=seed)
        self.gate = Dense(self.features, self.features, dtype=dtype, seed=None if seed is None else seed + 1)
        self.gate.bias.set_value(np.full(self.features, float(gate_bias), dtype))
        self.activation = act

    def forward(self, x, training):
        x = F.as_tensor(x)
        if x.ndim < 1 or x.shape[-1] != self.features:
            raise ShapeError(f"Highway({self.features}): input {x.label} has shape {x.shape}, last dim should "
                             f"be {self.features}" + _at())
        return highway(x, self.transform.weight, self.transform.bias, self.gate.weight, self.gate.bias,
                       self.activation)

    def extra_repr(self):
        return f"{self.features}, activation={self.act_name}"
