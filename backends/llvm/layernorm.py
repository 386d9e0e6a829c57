"""layer_norm (graphc/ops/layernorm.py) as one kernel: per row of the normalised axes, three passes over a
row that stays in cache -- the sum (mean), the sum of squares of the centred row (variance) and the output
(x - mean) * rstd [* weight] [+ bias] -- where the op's composition ran six kernels (two sums, two divisions,
the centring, the output) and read the row from memory four times.

A row whose normalised axes collapse to one contiguous float32 axis (stride 1 in x, the output, weight and
bias) runs as explicit <W x float> loops (W: the host's lanes) plus a scalar tail, each sum kept in UNROLL
vector accumulators side by side and folded at the end; any other row (strided, float64, a literal operand)
as scalar loops over the views (`kernels.nest`). Rows are split across threads from PARALLEL_MIN elements."""
from __future__ import annotations

import numpy as np

from graphc.ops.layernorm import LayerNorm

from . import mathlib
from .irtext import VTYPE, literal
from .kernels import PARALLEL_MIN_COSTLY, Kernel, fold_lanes, lanes, load, nest, ptr_at, sfx, store
from .table import lowers
from ..schedule.views import collapse

#: vector accumulators a row's sum keeps side by side
UNROLL = 4
#: rows are split across threads from this many elements (three passes over each: a costly elementwise op)
PARALLEL_MIN = PARALLEL_MIN_COSTLY // 4


@lowers(LayerNorm)
def _layer_norm(plan, node, ins):
    t, a = node.outputs[0], node.attrs
    x = ins[0] if ins[0].literal is None else plan.materialise(ins[0])
    w = ins[1] if a["weight"] else None
    b = ins[-1] if a["bias"] else None
    out = plan.fresh(t)
    plan.add(layer_norm_kernel(out, x, w, b, len(a["axis"]), a["eps"]), list(ins), [out])
    plan.view[id(t)] = out


def _centred_square(em, ty: str, xv: str, mean: str) -> str:
    d = em(f"fsub {ty} {xv}, {mean}")
    return em(f"fmul {ty} {d}, {d}")


def _normalised(em, ty: str, xv: str, mean: str, rstd: str, wv, bv) -> str:
    """(x - mean) * rstd [* w] [+ b] on values of IR type ty (scalars or vectors); wv/bv False: absent."""
    y = em(f"fmul {ty} {em(f'fsub {ty} {xv}, {mean}')}, {rstd}")
    if wv:
        y = em(f"fmul {ty} {y}, {wv}")
    if bv:
        y = em(f"fadd {ty} {y}, {bv}")
    return y


def layer_norm_kernel(out, x, w, b, naxes: int, eps: float) -> Kernel:
    dt = x.dtype
    ty = VTYPE[dt]
    nd = len(x.shape)
    kept, red = list(range(nd - naxes)), list(range(nd - naxes, nd))
    kshape, rshape = [x.shape[i] for i in kept], [x.shape[i] for i in red]
    n = int(np.prod(rshape, dtype=np.int64))
    xr, orr = [x.strides[i] for i in red], [out.strides[i] for i in red]
    wr = list(w.strides) if w is not None else [0] * naxes
    br = list(b.strides) if b is not None else [0] * naxes
    rdims, (rx, ro, rw, rb) = collapse(rshape, [xr, orr, wr, br])
    vector = (dt == "float32" and n >= 2 and len(rdims) == 1 and rx[0] == 1 and ro[0] == 1
              and all(v is None or (v.literal is None and s[0] == 1) for v, s in ((w, rw), (b, rb))))
    kdims, (kx, ko) = collapse(kshape, [[x.strides[i] for i in kept], [out.strides[i] for i in kept]])
    if not kdims:
        kdims, kx, ko = [1], (0,), (0,)
    split = kdims[0] if kdims[0] >= 2 and x.size >= PARALLEL_MIN else None
    inv_n = literal(1.0 / n, dt)
    epsl = literal(eps, dt)

    def rstd_of(em, ss):
        var = em(f"fadd {ty} {em(f'fmul {ty} {ss}, {inv_n}')}, {epsl}")
        return em(f"fdiv {ty} {literal(1.0, dt)}, {em(f'call {ty} @llvm.sqrt.{sfx(dt)}({ty} {var})')}")

    def scalar_row(em, P, xo, oo):
        acc = em.alloca(ty)

        def total(term):
            em.raw(f"store {ty} {literal(0, dt)}, ptr {acc}")

            def body(offs, _):
                v, cur = term(offs), em(f"load {ty}, ptr {acc}")
                em.raw(f"store {ty} {em(f'fadd reassoc {ty} {cur}, {v}')}, ptr {acc}")
            nest(em, rshape, [xr], [xo], body)
            return em(f"load {ty}, ptr {acc}")
        mean = em(f"fmul {ty} {total(lambda o: load(em, P, x, o[0]))}, {inv_n}")

        rstd = rstd_of(em, total(lambda o: _centred_square(em, ty, load(em, P, x, o[0]), mean)))

        def outp(o, _):
            store(em, P, out, o[1], _normalised(em, ty, load(em, P, x, o[0]), mean, rstd,
                                                w is not None and load(em, P, w, o[2]),
                                                b is not None and load(em, P, b, o[3])))
        nest(em, rshape, [xr, orr, wr, br], [xo, oo, w.offset if w is not None else 0,
                                           b.offset if b is not None else 0], outp)

    W = lanes()
    nv, tail = n // W, n % W

    def vector_row(em, P, xo, oo):
        V = mathlib.Ty(W)

        def ld(v, base, off, T):
            o = em(f"add i64 {base}, {off}")
            return em(f"load {T.f}, ptr {ptr_at(em, P, v, o, T.lanes - 1)}, align 4")

        def splat(s):
            one = em(f"insertelement <{W} x float> poison, float {s}, i64 0")
            return em(f"shufflevector {V.f} {one}, {V.f} poison, <{W} x i32> zeroinitializer")

        def fold(vec):   # the lanes of a <W x float> summed pairwise
            return fold_lanes(em, vec, W, lambda a, b, T: em(f"fadd reassoc {T.f if T else '<1 x float>'} {a}, {b}"))

        def total(term):
            """sum of term(off, T) over the row: UNROLL vector accumulators side by side (one would wait on
            the previous add's latency every step), folded into one, its lanes pairwise, then the tail."""
            accs = [em.alloca(V.f) for _ in range(UNROLL)]
            sacc = em.alloca("float")
            for acc in accs:
                em.raw(f"store {V.f} zeroinitializer, ptr {acc}")

            def vstep(i, acc):
                t, cur = term(i, V), em(f"load {V.f}, ptr {acc}")
                em.raw(f"store {V.f} {em(f'fadd reassoc {V.f} {cur}, {t}')}, ptr {acc}")

            def sstep(i):
                t, cur = term(i, mathlib.S), em(f"load float, ptr {sacc}")
                em.raw(f"store float {em(f'fadd reassoc float {cur}, {t}')}, ptr {sacc}")
            groups = nv // UNROLL
            if groups:
                em.loop(groups, lambda g: [vstep(em(f"mul i64 {g}, {W * UNROLL}") if u == 0 else
                                                 em(f"add i64 {em(f'mul i64 {g}, {W * UNROLL}')}, {W * u}"), accs[u])
                                           for u in range(UNROLL)])
            if nv % UNROLL:
                em.loop(nv, lambda i: vstep(em(f"mul i64 {i}, {W}"), accs[0]), start=str(groups * UNROLL))
            vals = [em(f"load {V.f}, ptr {acc}") for acc in accs]
            while len(vals) > 1:
                vals = [em(f"fadd reassoc {V.f} {vals[k]}, {vals[k + 1]}") for k in range(0, len(vals) - 1, 2)] + \
                    ([vals[-1]] if len(vals) % 2 else [])
            em.raw(f"store float {fold(vals[0])}, ptr {sacc}")
            if tail:
                em.loop(n, sstep, start=str(nv * W))
            return em(f"load float, ptr {sacc}")

        mean = em(f"fmul float {total(lambda off, T: ld(x, xo, off, T))}, {inv_n}")
        means = {1: mean, W: splat(mean)}

        rstd = rstd_of(em, total(lambda off, T: _centred_square(em, T.f, ld(x, xo, off, T), means[T.lanes])))
        rstds = {1: rstd, W: splat(rstd)}

        def outp(off, T):
            y = _normalised(em, T.f, ld(x, xo, off, T), means[T.lanes], rstds[T.lanes],
                            w is not None and ld(w, str(w.offset), off, T),
                            b is not None and ld(b, str(b.offset), off, T))
            o = em(f"add i64 {oo}, {off}")
            em.raw(f"store {T.f} {y}, ptr {ptr_at(em, P, out, o, T.lanes - 1)}, align 4")
        if nv:
            em.loop(nv, lambda i: outp(em(f"mul i64 {i}, {W}"), V))
        if tail:
            em.loop(n, lambda i: outp(i, mathlib.S), start=str(nv * W))

    row = vector_row if vector else scalar_row

    def emit(em, P, lo, hi):
        if out.size:
            nest(em, kdims, [kx, ko], [x.offset, out.offset], lambda offs, _: row(em, P, offs[0], offs[1]),
                 lo if split else None, hi)
    kern = Kernel("layer_norm", [out, x, w, b], emit, split, 8 * x.size, kdims[0])
    kern.key = ("layer_norm", naxes, repr(float(eps)), w is not None, b is not None, vector)
    return kern
