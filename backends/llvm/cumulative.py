"""cumsum as a native kernel: one sequential running sum per row of the scanned axis (the rows are the
other axes' index tuples), read and written through strided views. The accumulator lives in a
register of the compute dtype (float32 for float16/bfloat16: each output rounded once on store; the
integers wrap as NumPy's do); the sum is sequential (no reassociation), so float results equal
np.cumsum's order of additions. Rows are split across threads when the kernel is large."""
from __future__ import annotations

from graphc import dtypes as _dt
from graphc.ops.cumulative import CumSum

from . import kernels as K
from .irtext import VTYPE, literal
from .table import lowers
from ..schedule.views import View


def cumsum(out: View, x: View, axis: int, exclusive: bool, reverse: bool) -> K.Kernel:
    """out (x's shape) = the running sum of x along `axis` (exclusive: of the elements before; reverse:
    from the end)."""
    t = _dt.compute_dtype(out.dtype)
    ty = VTYPE[t]
    add = "fadd" if _dt.is_float(t) else "add"
    kept = [a for a in range(len(x.shape)) if a != axis]
    kshape = [x.shape[a] for a in kept]
    kst, ost = [x.strides[a] for a in kept], [out.strides[a] for a in kept]
    n, xs, os = x.shape[axis], x.strides[axis], out.strides[axis]

    def row(em, P, offs):
        acc = em.alloca(ty)
        em.raw(f"store {ty} {literal(0, t)}, ptr {acc}")

        def step(i):
            j = em(f"sub i64 {n - 1}, {i}") if reverse else i
            xo = em(f"add i64 {offs[0]}, {em(f'mul i64 {j}, {xs}')}")
            oo = em(f"add i64 {offs[1]}, {em(f'mul i64 {j}, {os}')}")
            a = em(f"load {ty}, ptr {acc}")
            s = em(f"{add} {ty} {a}, {K.load(em, P, x, xo)}")
            K.store(em, P, out, oo, a if exclusive else s)
            em.raw(f"store {ty} {s}, ptr {acc}")
        em.loop(n, step)

    split = kshape[0] if kshape and out.size >= K.PARALLEL_MIN and kshape[0] >= 2 else None

    def emit(em, P, lo, hi):
        if out.size == 0:
            return
        K.nest(em, kshape, [kst, ost], [x.offset, out.offset], lambda offs, _: row(em, P, offs),
               lo if split else None, hi)
    return K.Kernel("cumsum", [out, x], emit, split, out.size, kshape[0] if kshape else 0)


@lowers(CumSum)
def plan(p, node, ins) -> None:
    """The llvm table's row: a fresh output buffer and the running-sum kernel (x read through its view)."""
    t = node.outputs[0]
    out = p.fresh(t)
    a = node.attrs
    p.add(cumsum(out, ins[0], a["axis"], a["exclusive"], a["reverse"]), ins, [out])
    p.view[id(t)] = out

