"""gc.random: in-graph random numbers from a counter-based generator whose state lives in the graph.

    g = gc.random.Generator(seed=0)
    eps = gc.random.normal((None, 16), generator=g)   # (N, 16): a fresh draw on every call, reproducible

A draw is a pure function of a key tensor (int64 [seed, counter]) and the draw's stream number, so
every backend gives the same numbers. A Generator's key is a parameter that every compiled function
computing one of its draws advances by one per call (an implicit update, graphc.ops.state). A
constant key (`key=gc.random.key(3)`) gives the same draw on every call (JAX-style, no state).
"""
from __future__ import annotations

import itertools

import numpy as np

from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, GraphcError, ShapeError
from ..ir import Op, Tensor, Trait, apply, register
from .core import as_tensor, constant, parameter
from .shape_ops import eval_shape
from .state import add_implicit_update

_gen_ids = itertools.count()


class Generator:
    """A seeded random stream: its state is the parameter `state` = int64 [seed, counter]."""

    def __init__(self, seed: int = 0, name: str | None = None):
        self.state = parameter(name or f"rng_state{next(_gen_ids)}", np.array([int(seed), 0], np.int64))
        self._streams = itertools.count()
        self._advance = None

    def seed(self, seed: int) -> None:
        """Restart the stream: the draws repeat those after Generator(seed) was built."""
        self.state.set_value(np.array([int(seed), 0], np.int64))

    def next_stream(self) -> int:
        return next(self._streams)

    def advance(self) -> Tensor:
        """The new state after one call (one tensor shared by all draws of this generator)."""
        if self._advance is None:
            self._advance = self.state + constant(np.array([0, 1], np.int64))
        return self._advance


_default: Generator | None = None


def default_generator() -> Generator:
    global _default
    if _default is None:
        _default = Generator(0, "rng_default")
    return _default


def seed(s: int) -> None:
    """Reseed the default generator."""
    default_generator().seed(s)


def key(seed: int) -> Tensor:
    """A constant key: draws made with it are the same on every call."""
    return constant(np.array([int(seed), 0], np.int64))


class _Random(Op):
    """A draw of `shape` from the key input; pure in (key, stream), so no input is differentiable."""
    traits = Trait.RANDOM | Trait.IMPURE
    differentiable = False
    needs_dims = True
    pure = False  # never merged or folded: two draws with the same key and stream are kept apart anyway

    def infer(self, inputs, shape, dtype, stream):
        k = inputs[0]
        if k.dtype != "int64" or k.shape != (2,):
            raise DTypeError(f"{self.name}: key must be int64 of shape (2,), got {k.type_str}")
        if not _dt.is_float(dtype):
            raise DTypeError(f"{self.name}: dtype must be float, got {dtype}")
        return [(shape, dtype)]

    def _rng(self, k, stream):
        s, c = (int(v) for v in k)
        return np.random.default_rng([s & 0xFFFFFFFFFFFFFFFF, c & 0xFFFFFFFFFFFFFFFF, stream])

    def vjp(self, node, gouts):
        return [None]


@register
class RandomUniform(_Random):
    name = "random_uniform"

    def impl(self, k, shape, dtype, stream, dims=None):
        return self._rng(k, stream).random(eval_shape(shape, dims), dtype=np.dtype(dtype))


@register
class RandomNormal(_Random):
    name = "random_normal"

    def impl(self, k, shape, dtype, stream, dims=None):
        return self._rng(k, stream).standard_normal(eval_shape(shape, dims), dtype=np.dtype(dtype))


def _draw(op, shape, dtype, generator, key_, seed_) -> Tensor:
    if sum(x is not None for x in (generator, key_, seed_)) > 1:
        raise GraphcError("give at most one of generator=, key=, seed=")
    if isinstance(shape, Tensor):
        shape = shape.shape
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if any(d is None for d in shape[1:]):
        raise ShapeError(f"random draw of shape {shape}: only axis 0 may be None (the batch N)")
    shape = _sh.canon_shape(("N" if shape and shape[0] is None else shape[0],) + shape[1:] if shape else ())
    if key_ is not None:
        k = as_tensor(key_)
        stream = 0
        return apply(op, k, shape=shape, dtype=_dt.as_dtype(dtype), stream=stream)
    gen = Generator(seed_) if seed_ is not None else (generator or default_generator())
    out = apply(op, gen.state, shape=shape, dtype=_dt.as_dtype(dtype), stream=gen.next_stream())
    add_implicit_update(out, gen.state, gen.advance())
    return out


def uniform(shape, low=0.0, high=1.0, dtype="float32", generator=None, key=None, seed=None) -> Tensor:
    """U[low, high) of `shape` (dims may be symbolic, or pass a tensor to copy its shape);
    low/high may be tensors (differentiable: low + (high - low) * u)."""
    u = _draw(RandomUniform, shape, dtype, generator, key, seed)
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and (low, high) == (0.0, 1.0):
        return u
    return low + (high - low) * u


def normal(shape, mean=0.0, std=1.0, dtype="float32", generator=None, key=None, seed=None) -> Tensor:
    """N(mean, std^2) of `shape`; mean/std may be tensors and get gradients (reparameterisation
    mean + std * eps, eps ~ N(0, 1) drawn in the graph)."""
    eps = _draw(RandomNormal, shape, dtype, generator, key, seed)
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)) and (mean, std) == (0.0, 1.0):
        return eps
    return mean + std * eps


def bernoulli(p, shape=None, dtype="float32", generator=None, key=None, seed=None) -> Tensor:
    """1.0 with probability p, else 0.0 (p a float or tensor; shape defaults to p's)."""
    if shape is None:
        if not isinstance(p, Tensor):
            raise ShapeError("bernoulli: give shape= when p is a number")
        shape = p.shape
    u = _draw(RandomUniform, shape, dtype, generator, key, seed)
    from .elementwise import less
    from .core import cast
    return cast(less(u, p), dtype)
