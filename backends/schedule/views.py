"""Strided views over buffers (what a schedule hands kernels) and dim collapsing for loop nests.

A View is pure data: shape and strides (in elements, any sign, 0 for broadcast dims), an element
offset into buffer `buf` (an index into Schedule.buffers), and a dtype; or a scalar literal broadcast
to a shape (buf None). Movement ops (reshape of a contiguous view, transpose, broadcast, basic
indexing) only make new views of the same buffer: no data moves. In a concrete schedule every size is
an int; in a symbolic one (compiled once for every binding of the dims, cuda) a shape, stride, offset
or literal may be a sympy expression over the graph's dims (`is_int` tells them apart), evaluated per
call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy


@dataclass(frozen=True)
class View:
    """Elements of buffer `buf` at offset + sum(i_k * strides[k]) (in elements), or a scalar literal."""
    buf: int | None
    offset: int
    shape: tuple
    strides: tuple
    dtype: str
    literal: object = None

    @property
    def size(self):
        return product(self.shape)

    @property
    def contiguous(self) -> bool:
        """Row-major with no gaps (size-1 dims may have any stride)."""
        if self.literal is not None:
            return False
        dims, (st,) = collapse(self.shape, [self.strides])
        return not dims or (len(dims) == 1 and st[0] == 1)

    def reshape(self, shape) -> "View":
        return View(self.buf, self.offset, tuple(shape), contig_strides(shape), self.dtype, self.literal)


def is_int(x) -> bool:
    """A concrete size (an int), not an expression over dims."""
    return isinstance(x, (int, np.integer)) or (isinstance(x, sympy.Basic) and x.is_Integer)


def as_int(x):
    """A sympy Integer as an int; anything else unchanged."""
    return int(x) if isinstance(x, sympy.Basic) and x.is_Integer else x


def product(xs):
    """The product of sizes (an int when they all are, else a sympy expression)."""
    n = 1
    for d in xs:
        n = n * d
    return as_int(n)


def contig_strides(shape) -> tuple:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def contiguous_view(buf: int, shape, dtype: str) -> View:
    """The whole of buffer `buf` as a row-major array of `shape`."""
    return View(buf, 0, tuple(shape), contig_strides(shape), dtype)


def literal_view(value, shape, dtype) -> View:
    return View(None, 0, tuple(shape), (0,) * len(shape), dtype, value)


def broadcast_strides(v: View, shape) -> tuple:
    """v's strides when broadcast (NumPy rules, right-aligned) to `shape`."""
    lead = len(shape) - len(v.shape)
    out = [0] * lead
    for d, (n, s) in enumerate(zip(v.shape, v.strides)):
        out.append(0 if n == 1 and shape[lead + d] != 1 else s)
    return tuple(out)


def collapse(shape, strides_list):
    """Drop size-1 dims and merge adjacent dims that every operand walks contiguously."""
    dims = [(n, [s[k] for s in strides_list]) for k, n in enumerate(shape) if n != 1]
    out: list = []
    for n, st in dims:
        if out:
            pn, pst = out[-1]
            if all(ps == s * n for ps, s in zip(pst, st)):
                out[-1] = (pn * n, st)
                continue
        out.append((n, st))
    return [n for n, _ in out], [tuple(st[i] for _, st in out) for i in range(len(strides_list))]


def view_reshape(v: View, shape) -> View | None:
    """v reshaped (row-major order) to `shape` as a view of the same elements without a copy, or None when
    no strides can do it (NumPy's rule: every run of v's axes merged into one new axis must be walked
    contiguously, one axis's stride the next one's times its length). Splitting an axis always works, so a
    transposed or sliced view reshaped e.g. (64, 2, 768) -> (64, 2, 3, 256) stays a view. Concrete
    shapes only (None for a symbolic dim)."""
    shape = tuple(shape)
    if not all(is_int(n) for n in (*v.shape, *shape)) or v.literal is not None:
        return None
    if product(v.shape) != product(shape):
        return None
    if product(shape) == 0:
        return View(v.buf, v.offset, shape, contig_strides(shape), v.dtype)
    old = [(int(n), s) for n, s in zip(v.shape, v.strides) if n != 1]
    new = [int(n) for n in shape]
    strides = [1] * len(new)
    oi = ni = 0
    while oi < len(old):
        while new[ni] == 1:          # a new axis of length 1: any stride
            ni += 1
        oj, nj = oi + 1, ni + 1
        po, pn = old[oi][0], new[ni]
        while po != pn:              # the smallest runs of old and new axes of equal size
            if pn < po:
                pn *= new[nj]
                nj += 1
            else:
                po *= old[oj][0]
                oj += 1
        if any(old[k][1] != old[k + 1][1] * old[k + 1][0] for k in range(oi, oj - 1)):
            return None              # the old run is not one contiguous walk: a copy is needed
        strides[nj - 1] = old[oj - 1][1]
        for k in range(nj - 1, ni, -1):
            strides[k - 1] = strides[k] * new[k]
        oi, ni = oj, nj
    return View(v.buf, v.offset, shape, tuple(strides), v.dtype)


def view_getitem(v: View, index) -> View:
    """Basic indexing (ints, slices, None) of a view: a new view of the same buffer (a symbolic dim
    gives a symbolic start and length, as graphc.ops.shape_ops infers them)."""
    off, shape, strides, ax = v.offset, [], [], 0
    for it in index:
        if it is None:
            shape.append(1)
            strides.append(0)
            continue
        n, s = v.shape[ax], v.strides[ax]
        if isinstance(it, slice) and is_int(n):
            start, stop, step = it.indices(int(n))
            m = len(range(start, stop, step))
            off += start * s if m else 0
            shape.append(m)
            strides.append(s * step)
        elif isinstance(it, slice):
            from graphc.ops.shape_ops import _slice_len   # raises for a negative step on a symbolic dim
            m = _slice_len(n, it)
            start = 0 if it.start is None else (sympy.Min(it.start, n) if it.start >= 0 else
                                                sympy.Max(0, n + it.start))
            off += start * s
            shape.append(m)
            strides.append(s * (it.step or 1))
        else:
            off += (it % n if is_int(n) else (it if it >= 0 else n + it)) * s
        ax += 1
    return View(v.buf, as_int(off), tuple(shape) + v.shape[ax:], tuple(strides) + v.strides[ax:], v.dtype,
                v.literal)


def view_slice(v: View, axis: int, start, n) -> View:
    """Elements [start, start + n) of axis `axis` of v (start and n may be expressions)."""
    shape = v.shape[:axis] + (n,) + v.shape[axis + 1:]
    return View(v.buf, as_int(v.offset + start * v.strides[axis]), shape, v.strides, v.dtype, v.literal)


def nbytes(shape, dtype):
    """Bytes of a contiguous array of `shape` and `dtype` (an expression when the shape is symbolic)."""
    return product(shape) * np.dtype(dtype).itemsize


def extent(v: View) -> tuple[int, int]:
    """Lowest and highest element offsets (relative to v.offset) that a non-empty view reaches."""
    lo = sum((n - 1) * s for n, s in zip(v.shape, v.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(v.shape, v.strides) if s > 0)
    return lo, hi
