"""Shapes: tuples of ints or sympy expressions over named symbolic dims."""
from __future__ import annotations

import itertools
from typing import Iterable, Mapping

import sympy

from .errors import ShapeError

Dim = "int | sympy.Expr"
_counter = itertools.count()
_symbols: dict[str, sympy.Symbol] = {}


def dim_symbol(name: str) -> sympy.Symbol:
    """The symbolic dim called `name` (one object per name, positive integer)."""
    if name not in _symbols:
        _symbols[name] = sympy.Symbol(name, integer=True, positive=True)
    return _symbols[name]


def fresh_dim(hint: str) -> sympy.Symbol:
    """A new symbolic dim whose name starts with `hint`."""
    return dim_symbol(f"{hint}{next(_counter)}")


def canon_dim(d):
    """Normalise one dim: Python int, or a sympy expression (integers become ints)."""
    if isinstance(d, bool):
        raise ShapeError(f"bad dim {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise ShapeError(f"negative dim {d}")
        return d
    if hasattr(d, "__index__") and not isinstance(d, sympy.Basic):
        return canon_dim(int(d))
    if isinstance(d, str):
        if not d.isidentifier():
            raise ShapeError(f"a named dim must be an identifier, got {d!r}")
        return dim_symbol(d)
    if isinstance(d, sympy.Basic):
        d = sympy.sympify(d)
        if d.is_Integer:
            return int(d)
        return d
    raise ShapeError(f"bad dim {d!r}")


def canon_shape(shape: Iterable) -> tuple:
    return tuple(canon_dim(d) for d in shape)


def is_static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def dims_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def size(shape):
    """Number of elements (int or sympy expression)."""
    n = 1
    for d in shape:
        n = n * d
    return canon_dim(n) if not isinstance(n, int) else n


def broadcast_shapes(*shapes, op: str = "broadcast") -> tuple:
    """NumPy broadcasting; a symbolic dim only broadcasts against 1 or an equal dim."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(ndim):
        dims = [s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0]
        cur = 1
        for d in dims:
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(cur, int) and cur == 1:
                cur = d
            elif not dims_equal(cur, d):
                shown = ", ".join(fmt_shape(s) for s in shapes)
                why = "" if isinstance(cur, int) and isinstance(d, int) else \
                    "; a symbolic dim only broadcasts against 1 or an equal dim"
                raise ShapeError(f"{op}: shapes {shown} do not broadcast (axis {i - ndim}: {cur} vs {d}{why})")
        out.append(cur)
    return tuple(out)


def normalize_axis(axis: int, ndim: int, op: str = "op") -> int:
    if not -ndim <= axis < max(ndim, 1) or (ndim == 0 and axis not in (0, -1)):
        raise ShapeError(f"{op}: axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim if ndim else 0


def normalize_axes(axis, ndim: int, op: str = "op") -> tuple[int, ...]:
    """axis=None -> all axes; int or sequence -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    axes = tuple(sorted(normalize_axis(a, ndim, op) for a in axis))
    if len(set(axes)) != len(axes):
        raise ShapeError(f"{op}: repeated axis in {axis}")
    return axes


def free_symbols(shape) -> set:
    out = set()
    for d in shape:
        if not isinstance(d, int):
            out |= d.free_symbols
    return out


def evaluate(shape, bindings: Mapping) -> tuple[int, ...]:
    """Concrete shape for symbol values `bindings` ({symbol: int})."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            v = d.subs(bindings)
            if not v.is_Integer:
                raise ShapeError(f"dim {d} is not determined by {dict(bindings)}")
            out.append(int(v))
    return tuple(out)


def fmt_dim(d) -> str:
    return str(d)


def fmt_shape(shape) -> str:
    return "(" + ", ".join(fmt_dim(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
