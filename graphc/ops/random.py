"""gc.random: in-graph random numbers from a counter-based generator whose state lives in the graph.

    g = gc.random.Generator(seed=0)
    eps = gc.random.normal((None, 16), generator=g)   # (N, 16): a fresh draw on every call, reproducible

A draw is a pure function of a key tensor (int64 [seed, counter]) and the draw's stream number, so
every backend gives the same numbers: the generator is counter-based (below), computed by the NumPy
reference here and by the native kernels (graphc.backends.llvm.random, graphc.backends.cuda.lower_random)
with the same 64-bit integer arithmetic, so uniform draws are bit-exact everywhere (normal draws up to
libm's last bits). A Generator's key is a parameter that every compiled function computing one of
its draws advances by one per call (an implicit update, graphc.ops.state). A constant key
(`key=gc.random.key(3)`) gives the same draw on every call (JAX-style, no state).
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


# ---- the counter-based generator ------------------------------------------------------------------
# Every element is a hash of (seed, counter, stream word, element index), all uint64 with wrap-around:
#   mix(z)    = splitmix64's finaliser: z ^= z >> 30; z *= MIX1; z ^= z >> 27; z *= MIX2; z ^= z >> 31
#   base      = mix(mix(mix(seed ^ SEED_SALT) ^ counter ^ COUNTER_SALT) ^ word ^ WORD_SALT)
#               word = 2 * stream + kind (kind 0: uniform, 1: normal), so every (key, stream, op) differs
#   bits(j)   = mix(base + (j + 1) * GAMMA)          (splitmix64's j-th output from state `base`)
# uniform element j: (bits(j) >> (64 - p)) * 2**-p with p the dtype's significand bits (UNIFORM_BITS:
#   float64 53, float32 24, float16 11, bfloat16 8), exact in the dtype and in [0, 1) (never rounds to 1);
# normal element j (Box-Muller, in float64, then rounded to the dtype):
#   u1 = ((bits(2j) >> 11) + 1) * 2**-53 in (0, 1] (never log(0)), u2 = (bits(2j+1) >> 11) * 2**-53,
#   z  = sqrt(-2 * log(u1)) * cos(TWO_PI * u2)
# Mix and bit extraction are exact integer operations; the scalings are exact (powers of two), so the
# only backend differences are libm's log/cos/sqrt in the normal draw (a few ulp at most).
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
GAMMA = 0x9E3779B97F4A7C15
SEED_SALT, COUNTER_SALT, WORD_SALT = 0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0
TWO_PI = 6.283185307179586   # float64 nearest 2 pi (the literal the kernels spell)
MASK = (1 << 64) - 1
UNIFORM_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}


def mix(z: int) -> int:
    """splitmix64's finaliser on a Python int (uint64 arithmetic)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * MIX1) & MASK
    z = ((z ^ (z >> 27)) * MIX2) & MASK
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """mix() on a uint64 array, in place (wrap-around products)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return z


def base_key(seed: int, counter: int, word: int) -> int:
    """The per-draw state `base` (see above) of key [seed, counter] and stream word."""
    h = mix(int(seed) ^ SEED_SALT)
    h = mix(h ^ (int(counter) & MASK) ^ COUNTER_SALT)
    return mix(h ^ int(word) ^ WORD_SALT)


def bits(base: int, index: np.ndarray) -> np.ndarray:
    """uint64 bits of the draw with state `base` at element indices `index` (uint64 array)."""
    z = index + np.uint64(1)
    z *= np.uint64(GAMMA)
    z += np.uint64(base)
    return _mix_array(z)


class _Random(Op):
    """A draw of `shape` from the key input; pure in (key, stream), so no input is differentiable."""
    traits = Trait.RANDOM | Trait.IMPURE
    differentiable = False
    needs_dims = True
    pure = False  # never merged or folded: two draws with the same key and stream are kept apart anyway
    kind = 0      # distribution number in the stream word (uniform 0, normal 1)

    def infer(self, inputs, shape, dtype, stream):
        k = inputs[0]
        if k.dtype != "int64" or k.shape != (2,):
            raise DTypeError(f"{self.name}: key must be int64 of shape (2,), got {k.type_str}")
        if not _dt.is_float(dtype):
            raise DTypeError(f"{self.name}: dtype must be float, got {dtype}")
        return [(shape, dtype)]

    def word(self, stream: int) -> int:
        """The stream word hashed into the draw's state (compile-time constant of a node)."""
        return 2 * int(stream) + self.kind

    def _base(self, k, stream) -> int:
        s, c = (int(v) for v in np.asarray(k).reshape(-1))
        return base_key(s, c, self.word(stream))

    def vjp(self, node, gouts):
        return [None]


@register
class RandomUniform(_Random):
    name = "random_uniform"
    kind = 0

    def impl(self, k, shape, dtype, stream, dims=None):
        shape = eval_shape(shape, dims)
        x = bits(self._base(k, stream), np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64))
        p = UNIFORM_BITS[dtype]
        x >>= np.uint64(64 - p)
        if p <= 24:
            u = x.astype(np.float32)
            u *= np.float32(2.0 ** -p)
        else:
            u = x.astype(np.float64)
            u *= 2.0 ** -p
        return u.astype(_dt.np_dtype(dtype), copy=False).reshape(shape)


@register
class RandomNormal(_Random):
    name = "random_normal"
    kind = 1

    def impl(self, k, shape, dtype, stream, dims=None):
        shape = eval_shape(shape, dims)
        j = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64) * np.uint64(2)
        base = self._base(k, stream)
        u1 = ((bits(base, j) >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * (2.0 ** -53)
        u2 = (bits(base, j + np.uint64(1)) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(TWO_PI * u2)
        return z.astype(_dt.np_dtype(dtype), copy=False).reshape(shape)


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
