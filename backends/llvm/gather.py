"""Integer-array indexing: take (gather) and its gradient take_grad (scatter-add)."""
from __future__ import annotations

from .irtext import VTYPE
from .kernels import Kernel, fill, load, nest, store
from .lower import convert
from ..schedule.views import View, contig_strides


def _wrap(em, idx: str, idx_dtype: str, n: int, P, status: View, code: int) -> str:
    """NumPy's negative indices count from the end. An out-of-range index sets the status word (the
    program raises after the call) and is clamped, so the kernel never reads or writes out of bounds."""
    i = convert(em, idx, idx_dtype, "int64")
    neg = em(f"icmp slt i64 {i}, 0")
    i = em(f"select i1 {neg}, i64 {em(f'add i64 {i}, {n}')}, i64 {i}")
    bad = em(f"or i1 {em(f'icmp slt i64 {i}, 0')}, {em(f'icmp sgt i64 {i}, {n - 1}')}")
    err, ok = em.label("oob"), em.label("inb")
    em.raw(f"br i1 {bad}, label %{err}, label %{ok}")
    em.place(err)
    store(em, P, status, "0", str(code))
    em.raw(f"br label %{ok}")
    em.place(ok)
    i = em(f"select i1 {em(f'icmp slt i64 {i}, 0')}, i64 0, i64 {i}")
    return em(f"select i1 {em(f'icmp sgt i64 {i}, {max(n - 1, 0)}')}, i64 {max(n - 1, 0)}, i64 {i}")


def _operand_strides(xshape, xstrides, idx: View, axis):
    """Strides over the gathered shape x[:axis] + idx + x[axis+1:] for x (no axis) and idx."""
    xs = tuple(xstrides[:axis]) + (0,) * len(idx.shape) + tuple(xstrides[axis + 1:])
    ist = (0,) * axis + tuple(idx.strides) + (0,) * (len(xshape) - axis - 1)
    return xs, ist


def take(out: View, x: View, idx: View, axis: int, status: View, code: int) -> Kernel:
    xs, ist = _operand_strides(x.shape, x.strides, idx, axis)
    n, sa = x.shape[axis], x.strides[axis]

    def emit(em, P, lo, hi):
        def body(offs, _):
            i = _wrap(em, load(em, P, idx, offs[2]), idx.dtype, n, P, status, code)
            xo = em(f"add i64 {offs[1]}, {em(f'mul i64 {i}, {sa}')}")
            store(em, P, out, offs[0], load(em, P, x, xo))
        if out.size:
            nest(em, out.shape, [out.strides, xs, ist], [out.offset, x.offset, idx.offset], body)
    return Kernel("take", [out, x, idx, status], emit)


def take_grad(out: View, g: View, idx: View, axis: int, status: View, code: int) -> Kernel:
    """out = zeros(x.shape); out[..., idx[j], ...] += g[..., j, ...] (repeated indices accumulate)."""
    ost = contig_strides(out.shape)
    os_, ist = _operand_strides(out.shape, ost, idx, axis)
    n, sa = out.shape[axis], ost[axis]
    t, ty = out.dtype, VTYPE[out.dtype]

    def emit(em, P, lo, hi):
        fill(em, P, out, 0)

        def body(offs, _):
            i = _wrap(em, load(em, P, idx, offs[2]), idx.dtype, n, P, status, code)
            oo = em(f"add i64 {offs[1]}, {em(f'mul i64 {i}, {sa}')}")
            gv = convert(em, load(em, P, g, offs[0]), g.dtype, t)
            store(em, P, out, oo, em(f"fadd {ty} {load(em, P, out, oo)}, {gv}"))
        if g.size and n:
            nest(em, g.shape, [g.strides, os_, ist], [g.offset, out.offset, idx.offset], body)
    return Kernel("take_grad", [out, g, idx, status], emit)
