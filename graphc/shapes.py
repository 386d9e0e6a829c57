"""Shapes: tuples of ints or sympy expressions over named symbolic dims."""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass
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
    # equal, or two different ints/symbols: decided without sympy arithmetic (its first symbolic add in a
    # process imports sympy.tensor: ~40 ms of a warm start)
    if a == b:
        return True
    if isinstance(a, (int, sympy.Symbol)) and isinstance(b, (int, sympy.Symbol)):
        return False
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def size(shape):
    """Number of elements (int or sympy expression)."""
    n = 1
    for d in shape:
        n = n * d
    return canon_dim(n) if not isinstance(n, int) else n


@dataclass(frozen=True)
class DimConstraint:
    """`dim == value`, required when building a node unified a symbolic dim with a concrete one
    (`(N, 4) * (8, 4)` is `(8, 4)` if N is 8). The node keeps it (`Node.constraints`) and
    `gc.function` checks it against the dims bound from the inputs on every call."""
    dim: object          # sympy expression over symbolic dims
    value: int
    why: str             # e.g. "mul: shapes (N, 4), (8, 4) (axis -2)"

    def holds(self, bindings: Mapping) -> bool | None:
        """True/False under `bindings` ({symbol or name: int}); None when they do not determine it."""
        subs = {(dim_symbol(k) if isinstance(k, str) else k): v for k, v in bindings.items()}
        v = sympy.sympify(self.dim).subs(subs)
        return bool(int(v) == self.value) if v.is_Integer else None

    def __str__(self):
        return f"{self.dim} == {self.value}"


_recording = threading.local()


@contextlib.contextmanager
def recording_constraints():
    """Collect the DimConstraints shape rules make inside the block (ir.make_node wraps each op's
    `infer` in one and stores them on the node)."""
    stack = _recording.__dict__.setdefault("stack", [])
    found: list[DimConstraint] = []
    stack.append(found)
    try:
        yield found
    finally:
        stack.pop()


def require_equal(dim, value: int, why: str) -> None:
    """Record that symbolic `dim` must equal the concrete `value` at call time (see DimConstraint).
    A dim that can never be `value` (symbolic dims are positive) is a ShapeError now."""
    if value < 1:
        raise ShapeError(f"{why}: the symbolic dim {dim} cannot be {value} (symbolic dims are positive)")
    stack = getattr(_recording, "stack", None)
    if stack:
        c = DimConstraint(dim, int(value), why)
        if c not in stack[-1]:
            stack[-1].append(c)


def _unify(cur, d, why):
    """The dim two non-1 dims broadcast to: equal dims, or a symbolic dim against a concrete one (the
    concrete one, recording the constraint; `why()` describes it); None when they cannot unify (two
    different ints, two different symbolic dims)."""
    if dims_equal(cur, d):
        return cur
    if isinstance(cur, int) != isinstance(d, int):
        concrete, sym = (cur, d) if isinstance(cur, int) else (d, cur)
        require_equal(sym, concrete, why())
        return concrete
    return None


def broadcast_shapes(*shapes, op: str = "broadcast") -> tuple:
    """NumPy broadcasting over symbolic dims. A symbolic dim broadcasts against 1 (it stays), an equal
    dim, or a concrete dim: `(N, 4)` with `(8, 4)` is `(8, 4)` and records `N == 8`, checked at call time
    (see DimConstraint). Two different symbolic dims (or two different ints, neither 1) do not broadcast."""
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
                continue
            got = _unify(cur, d, lambda: f"{op}: shapes {', '.join(fmt_shape(s) for s in shapes)} (axis {i - ndim})")
            if got is None:
                shown = ", ".join(fmt_shape(s) for s in shapes)
                why = "" if isinstance(cur, int) and isinstance(d, int) else \
                    "; two different symbolic dims only broadcast against 1 or each other"
                raise ShapeError(f"{op}: shapes {shown} do not broadcast (axis {i - ndim}: {cur} vs {d}{why})")
            cur = got
        out.append(cur)
    return tuple(out)


def broadcast_to_shape(shape, target, op: str = "broadcast_to") -> tuple:
    """Check that `shape` broadcasts to `target` (NumPy rules, right-aligned) and return `target`. A
    symbolic dim meeting a different concrete dim (either side) records the constraint that they are equal."""
    shown = f"{fmt_shape(shape)} to {fmt_shape(target)}"
    lead = len(target) - len(shape)
    if lead < 0:
        raise ShapeError(f"{op}: cannot broadcast {shown} (more dims than the target)")
    for i, d in enumerate(shape):
        t = target[lead + i]
        if isinstance(d, int) and d == 1:
            continue
        if _unify(d, t, lambda: f"{op}: {shown} (axis {i - len(shape)})") is None:
            raise ShapeError(f"{op}: cannot broadcast {shown} (axis {i - len(shape)}: {d} vs {t})")
    return tuple(target)


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
