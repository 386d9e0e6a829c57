"""Weight initialisers (NumPy arrays, seeded): zeros, ones, normal, uniform, Xavier/Glorot,
He/Kaiming, orthogonal. Fans follow PyTorch: for a weight (out, in, *kernel), fan_in = in * prod(kernel)
and fan_out = out * prod(kernel)."""
from __future__ import annotations

import math

import numpy as np

_rng = np.random.default_rng(0)


def seed(s: int) -> None:
    """Reseed the module's default generator (used when no rng/seed is given)."""
    global _rng
    _rng = np.random.default_rng(s)


def _gen(rng=None, seed: int | None = None) -> np.random.Generator:
    if seed is not None:
        return np.random.default_rng(seed)
    return rng if rng is not None else _rng


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight shape, PyTorch's convention."""
    shape = tuple(shape)
    if len(shape) < 2:
        n = shape[0] if shape else 1
        return n, n
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def zeros(shape, dtype="float32", **_) -> np.ndarray:
    return np.zeros(shape, dtype)


def ones(shape, dtype="float32", **_) -> np.ndarray:
    return np.ones(shape, dtype)


def normal(shape, std: float = 0.01, mean: float = 0.0, dtype="float32", rng=None, seed=None) -> np.ndarray:
    return (mean + std * _gen(rng, seed).standard_normal(shape)).astype(dtype)


def uniform(shape, low: float = -0.05, high: float = 0.05, dtype="float32", rng=None, seed=None) -> np.ndarray:
    return _gen(rng, seed).uniform(low, high, shape).astype(dtype)


def xavier_uniform(shape, gain: float = 1.0, dtype="float32", rng=None, seed=None) -> np.ndarray:
    """U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio)."""
    fi, fo = fans(shape)
    a = gain * math.sqrt(6.0 / (fi + fo))
    return uniform(shape, -a, a, dtype, rng, seed)


def xavier_normal(shape, gain: float = 1.0, dtype="float32", rng=None, seed=None) -> np.ndarray:
    """N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    fi, fo = fans(shape)
    return normal(shape, gain * math.sqrt(2.0 / (fi + fo)), 0.0, dtype, rng, seed)


def kaiming_uniform(shape, gain: float = math.sqrt(2.0), mode: str = "fan_in", dtype="float32", rng=None,
                    seed=None) -> np.ndarray:
    """U(-b, b), b = gain * sqrt(3 / fan) (He et al.; gain sqrt(2) suits ReLU)."""
    fan = fans(shape)[0 if mode == "fan_in" else 1]
    b = gain * math.sqrt(3.0 / fan)
    return uniform(shape, -b, b, dtype, rng, seed)


def kaiming_normal(shape, gain: float = math.sqrt(2.0), mode: str = "fan_in", dtype="float32", rng=None,
                   seed=None) -> np.ndarray:
    """N(0, std^2), std = gain / sqrt(fan)."""
    fan = fans(shape)[0 if mode == "fan_in" else 1]
    return normal(shape, gain / math.sqrt(fan), 0.0, dtype, rng, seed)


def orthogonal(shape, gain: float = 1.0, dtype="float32", rng=None, seed=None) -> np.ndarray:
    """A (semi-)orthogonal matrix of shape (rows, prod(rest)) reshaped to `shape` (Saxe et al.)."""
    shape = tuple(shape)
    rows, cols = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
    a = _gen(rng, seed).standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # makes the distribution uniform (Haar)
    q = q if rows >= cols else q.T
    return (gain * q[:rows, :cols]).reshape(shape).astype(dtype)


glorot_uniform, glorot_normal = xavier_uniform, xavier_normal
he_uniform, he_normal = kaiming_uniform, kaiming_normal
