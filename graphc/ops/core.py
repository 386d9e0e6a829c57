"""Leaves of a graph (placeholders, parameters, constants), casts and stop_gradient."""
from __future__ import annotations

import itertools

import numpy as np

from graphc._aligned import aligned_copy

from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, GraphcError, InputError, ShapeError
from ..ir import Node, Op, Tensor, Trait, apply, provide, register, user_frame

_names = itertools.count()


class _Leaf(Op):
    traits = Trait.LEAF
    differentiable = True

    def infer(self, inputs, **attrs):
        raise GraphcError(f"{self.name} nodes are built by gc.{self.name}()")

    def vjp(self, node, gouts):
        return []


@register
class PlaceholderOp(_Leaf):
    traits = Trait.LEAF | Trait.INPUT
    name = "placeholder"


@register
class ParameterOp(_Leaf):
    traits = Trait.LEAF | Trait.STATE
    name = "parameter"


@register
class ConstantOp(_Leaf):
    traits = Trait.LEAF | Trait.CONST
    name = "constant"

    def impl(self, value):
        return value


def _leaf(op: Op, shape, dtype, name, attrs=None, cls=Tensor) -> Tensor:
    node = Node(op, (), attrs or {}, user_frame())
    t = cls(node, 0, shape, dtype, name)
    node.outputs = (t,)
    return t


def placeholder(name: str, shape=(), dtype="float32") -> Tensor:
    """A graph input. `None` is the shared batch dim `N` wherever it stands ((None, C), (T, None, C));
    a second `None` in the same shape is a dim of this input alone (`<name>_<axis>`). A string dim
    names a symbolic dim shared by every tensor that uses the same string."""
    if not isinstance(name, str) or not name.isidentifier():
        raise GraphcError(f"placeholder name must be a Python identifier, got {name!r}")
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise ShapeError(f"placeholder {name!r}: shape must be a tuple of dims (ints, None or names), got {shape!r}")
    dims, batch = [], False
    for i, d in enumerate(shape):
        if d is None:
            d = _sh.dim_symbol(f"{name}_{i}") if batch else _sh.dim_symbol("N")
            batch = True
        dims.append(d)
    return _leaf(PlaceholderOp, tuple(dims), dtype, name)


class Parameter(Tensor):
    """Shared state: a tensor whose value lives outside the graph and persists across calls."""

    def __init__(self, node, index, shape, dtype, name=None):
        super().__init__(node, index, shape, dtype, name)
        self._value = None

    @property
    def value(self) -> np.ndarray:
        """The current value, read-only: `set_value` (or a function's `updates=`) installs a new array.
        Compiled functions keep values derived from a parameter alone (a transposed or packed weight)
        until the parameter has a new array, so it is never written in place."""
        return self._value

    def get_value(self) -> np.ndarray:
        """A writable copy of the value."""
        return self._value.copy()

    def set_value(self, value) -> None:
        """Replace the value (same shape and dtype; the array is copied, and read-only)."""
        a = np.asarray(value)
        if a.shape != self.shape:
            raise ShapeError(f"parameter {self.name}: expected shape {_sh.fmt_shape(self.shape)}, got {a.shape}")
        if a.dtype != np.dtype(self.dtype):
            if not np.can_cast(a.dtype, self.dtype, "same_kind"):
                raise DTypeError(f"parameter {self.name}: expected dtype {self.dtype}, got {a.dtype}")
            a = a.astype(self.dtype)
        # on a cache line (graphc._aligned): a weight 16 or 48 bytes into one made the micro-kernel's loads
        # straddle lines (an 8 x 128 x 512 product 14.7 -> 16.8-17.5 us a thread on the 2-core Zen 2, varying
        # from process to process with NumPy's 16-byte alignment)
        v = aligned_copy(a, self.dtype)
        v.flags.writeable = False
        self._value = v


def parameter(name: str, value, dtype=None) -> Parameter:
    """Shared state initialised to `value` (copied); `p.value` reads it and `p.set_value(a)` writes it."""
    a = np.asarray(value)
    if dtype is None:
        weak = not isinstance(value, np.ndarray | np.generic)
        dtype = _dt.default_float if weak and a.dtype == np.float64 else a.dtype
    dtype = _dt.as_dtype(dtype)
    p = _leaf(ParameterOp, a.shape, dtype, name or f"p{next(_names)}", cls=Parameter)
    p.set_value(a.astype(dtype))
    return p


def constant(value, dtype=None, name=None) -> Tensor:
    """A constant tensor from a NumPy array or Python scalar (float scalars default to float32)."""
    if isinstance(value, Tensor):
        return value
    a = np.asarray(value)
    if dtype is None:
        if a.dtype == np.float64 and not isinstance(value, np.ndarray | np.generic):
            dtype = _dt.default_float
        elif a.dtype == np.int64 and not isinstance(value, np.ndarray | np.generic):
            dtype = "int64"
        else:
            dtype = a.dtype
    dtype = _dt.as_dtype(dtype)
    a = np.array(a, dtype=dtype, order="C", copy=True)
    a.setflags(write=False)
    return _leaf(ConstantOp, a.shape, dtype, name, {"value": a})


def as_tensor(x, dtype=None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)) and any(isinstance(e, Tensor) for e in x):
        from .shape_ops import stack
        return stack([as_tensor(e) for e in x])
    return constant(x, dtype)


provide("as_tensor", as_tensor)  # make_node turns Python values into constants with it


def scalar_like(value, like: Tensor) -> Tensor:
    """A Python scalar as a constant with NumPy 2's weak-scalar dtype against `like`."""
    dtype = _dt.promote_with_scalar(like.dtype, value)
    if isinstance(value, int) and _dt.is_int(dtype):
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:   # NumPy 2 raises too (uint8_tensor + 300, + -1)
            raise DTypeError(f"Python integer {value} is out of bounds for {like.label} of dtype {dtype} "
                             f"(range {info.min}..{info.max}); cast the tensor first")
    return constant(value, dtype)


@register
class Cast(Op):
    traits = Trait.ELEMENTWISE | Trait.FRESH
    name = "cast"

    def infer(self, inputs, dtype):
        return [(inputs[0].shape, dtype)]

    def impl(self, x, dtype):
        return x.astype(dtype)

    def vjp(self, node, gouts):
        x = node.inputs[0]
        if not _dt.is_float(x.dtype) or not _dt.is_float(node.attrs["dtype"]):
            return [None]
        return [cast(gouts[0], x.dtype)]

    def jvp(self, node, tangents):
        if tangents[0] is None or not _dt.is_float(node.attrs["dtype"]):
            return [None]
        return [cast(tangents[0], node.attrs["dtype"])]


def cast(x, dtype) -> Tensor:
    x = as_tensor(x)
    dtype = _dt.as_dtype(dtype)
    if x.dtype == dtype:
        return x
    return apply(Cast, x, dtype=dtype)


@register
class StopGradient(Op):
    traits = Trait.MOVEMENT
    name = "stop_gradient"
    differentiable = False  # by design: it blocks gradients

    def infer(self, inputs):
        return [(inputs[0].shape, inputs[0].dtype)]

    def impl(self, x):
        return x

    def vjp(self, node, gouts):
        return [None]

    def jvp(self, node, tangents):
        return [None]


def stop_gradient(x) -> Tensor:
    """Identity in the forward pass; gradients do not flow through it."""
    return apply(StopGradient, x)
