"""Fused attention: scaled_dot_product_attention (graphc/ops/attention.py) as one kernel.

out[b, i, :] = softmax_j(q[b, i, :] . k[b, j, :] * scale + mask[b, i, j]) v[b, j, :], per work item =
(batch index, block of BR query rows), the items split across threads (Kernel.split). Nothing of the
(L, S) scores is stored but one (KEY_BLOCK x BR) tile on the stack: an online softmax (running max and
sum per query, the partial output rescaled when the max grows) walks the keys block by block.

Layout inside an item: the query rows are the vector lanes (BR = 2 vectors). qt (E x BR) holds the
block's queries transposed and pre-scaled; the score tile st (keys x BR) = K_block @ qt is a register-
blocked product (MR keys x 2 vectors of queries per tile, k[j, p] broadcast); the row max, exp and sum
are vector operations across queries; the output ot (Ev x BR) += V_block^T @ st is the same product
shape (MR value columns x 2 vectors, v[j, d] broadcast), rescaled by the correction on load. At the end
each query row is divided by its sum and written through the output view (when every reader is one and
the same transpose keeping the last axis last, the output is laid out in the order it makes, e.g.
(B, H, L, hd) as (B, L, H, hd) or torch's sequence-first (L, B, H, hd): the head merge is then a view).

float32 and float64; other dtypes, and operands the kernel cannot read in place, are planned as the
op's composition (graphc.ops.attention.composition_body): GEMMs and a softmax kernel."""
from __future__ import annotations

import numpy as np

from graphc.ops.attention import ScaledDotProductAttention, composition_body
from graphc.ops.shape_ops import Transpose

from . import gemm, mathlib
from .irtext import VTYPE, literal
from .kernels import Kernel, load, store
from .table import lowers
from ..schedule.views import View, broadcast_strides

#: keys per block of the online softmax (a block's score tile, KEY_BLOCK x BR values, stays in L1)
KEY_BLOCK = 128
#: items are split across threads when the kernel has at least this many FLOPs (below, a thread's
#: start-up costs more than it saves)
PARALLEL_FLOPS = 1 << 21
#: the stack the per-item tiles may take at most (bytes); larger head dims are planned as the composition
MAX_STACK = 1 << 20


def geometry(dtype: str) -> tuple[int, int, int]:
    """(lanes per vector, BR query rows per item = 2 vectors, MR rows per register tile) for the target."""
    from . import tune
    lanes = gemm.vector_shape(dtype)[0]
    return lanes, 2 * lanes, (8 if tune.isa() == "avx512" else 6)


def _plan_composition(plan, node, ins) -> None:
    body = composition_body(node)
    for ph, v in zip(body.inputs, ins):
        plan.view[id(ph)] = v
    plan.walk_body(body, {id(body.outputs[0]): node.outputs[0]})
    plan.view[id(node.outputs[0])] = plan.view[id(body.outputs[0])]


def _reader_layout(plan, t) -> tuple | None:
    """The axes of the one transpose every reader of t (rank >= 3, not a root) applies, when it keeps the
    last axis last (e.g. heads merged back: (B, H, L, Ev) read as (B, L, H, Ev), or torch's sequence-first
    (L, B, H, Ev)); else None. The kernel then writes t in that order, so the transpose (and the reshape
    merging the heads after it) is a view, not a copy."""
    r = t.ndim
    if r < 3 or id(t) in plan.root_slot:
        return None
    cache = plan.__dict__.setdefault("_attention_readers", None)
    if cache is None:
        cache = {}
        for n in plan.graph.nodes:
            for x in n.inputs:
                cache.setdefault(id(x), []).append(n)
        plan._attention_readers = cache
    readers = cache.get(id(t), [])
    if not readers or any(n.op is not Transpose for n in readers):
        return None
    axes = {tuple(n.attrs["axes"]) for n in readers}
    if len(axes) != 1:
        return None
    perm, = axes
    return perm if perm[-1] == r - 1 and perm != tuple(range(r)) else None


@lowers(ScaledDotProductAttention)
def _attention(plan, node, ins):
    t = node.outputs[0]
    dt = t.dtype
    if dt not in ("float32", "float64") or any(v.dtype != dt for v in ins):
        _plan_composition(plan, node, ins)
        return
    q, k, v = (x if x.literal is None and (x.strides[-1] == 1 or x.shape[-1] == 1) and min(x.strides) >= 0
               else plan.materialise(x) for x in ins[:3])
    mask = ins[3] if len(ins) == 4 else None
    if mask is not None and mask.literal is None and min(mask.strides, default=0) < 0:
        mask = plan.materialise(mask)
    shape = plan.shape(t)
    E, Ev, S = q.shape[-1], shape[-1], k.shape[-2]
    _, br, _ = geometry(dt)
    bc = max(1, min(S, KEY_BLOCK))
    if (E + Ev + bc + 4) * br * np.dtype(dt).itemsize > MAX_STACK:
        _plan_composition(plan, node, ins)
        return
    perm = _reader_layout(plan, t)
    if perm is not None:   # stored in the order its readers transpose it to, e.g. (..., L, H, Ev)
        r = len(shape)
        buf = plan.fresh(None, tuple(shape[a] for a in perm), dt)
        st = buf.strides
        out = View(buf.buf, buf.offset, shape, tuple(st[perm.index(a)] for a in range(r)), dt)
    else:
        out = plan.fresh(t)
    views = [out, q, k, v] + ([mask] if mask is not None else [])
    plan.add(attention_kernel(out, q, k, v, mask, node.attrs["scale"]), views[1:], [out])
    plan.view[id(t)] = out


def _vconst(value, dtype: str, lanes: int) -> str:
    c = literal(value, dtype)
    return "<" + ", ".join([f"{VTYPE[dtype]} {c}"] * lanes) + ">"


def _vexp(em, x: str, dtype: str, lanes: int) -> str:
    """exp of each lane of x <= 0 (or NaN): float32 by mathlib.exp_f32 on vectors (the elementwise
    kernels' code, so fused and unfused attention agree), float64 by libm per lane."""
    if dtype == "float64":
        from .lower import exp as _exp
        vt, out = f"<{lanes} x double>", "poison"
        for i in range(lanes):
            e = _exp(em, dtype, em(f"extractelement {vt} {x}, i64 {i}"))
            out = em(f"insertelement {vt} {out}, double {e}, i64 {i}")
        return out
    return mathlib.exp_f32(em, x, hi=None, t=mathlib.Ty(lanes))


def transpose(em, vt: str, lanes: int, rows: list) -> list:
    """The lanes x lanes block whose row r is vector rows[r] (IR values of type vt), transposed: vector c of
    the result holds element c of every row. log2(lanes) rounds of two-source shuffles: the round of
    half-width h pairs row r with row r + h (r mod 2h < h) and swaps the off-diagonal h x h blocks of every
    2h x 2h block, so the last round (h = 1) leaves every element in place (16 x 16 float32: 64 shuffles
    where the element-by-element copy takes 256 loads and stores)."""
    assert len(rows) == lanes and lanes & (lanes - 1) == 0
    rows, h = list(rows), lanes // 2
    while h:
        for r in range(lanes):
            if r % (2 * h) >= h:
                continue
            # lo: c in the left half of its 2h block -> row r at c; in the right half -> row r + h at c - h
            lo = [c if c % (2 * h) < h else lanes + c - h for c in range(lanes)]
            # hi: left half -> row r at c + h; right half -> row r + h at c
            hi = [c + h if c % (2 * h) < h else lanes + c for c in range(lanes)]
            a, b = rows[r], rows[r + h]
            rows[r] = em(f"shufflevector {vt} {a}, {vt} {b}, <{lanes} x i32> <{', '.join(f'i32 {i}' for i in lo)}>")
            rows[r + h] = em(f"shufflevector {vt} {a}, {vt} {b}, <{lanes} x i32> <{', '.join(f'i32 {i}' for i in hi)}>")
        h //= 2
    return rows


def attention_kernel(out: View, q: View, k: View, v: View, mask: View | None, scale: float) -> Kernel:
    dt = out.dtype
    ty, isz = VTYPE[dt], np.dtype(dt).itemsize
    lanes, br, mr = geometry(dt)
    nv = br // lanes
    vt = f"<{lanes} x {ty}>"
    bshape = tuple(out.shape[:-2])
    L, Ev = out.shape[-2], out.shape[-1]
    E, S = q.shape[-1], k.shape[-2]
    bc = max(1, min(S, KEY_BLOCK))
    nblk = -(-L // br)
    nb = int(np.prod(bshape, dtype=np.int64)) if bshape else 1
    items = nb * nblk

    def bstrides(x: View):
        return broadcast_strides(View(x.buf, 0, x.shape[:-2], x.strides[:-2], x.dtype), bshape) if bshape else ()
    ost, qst, kst, vst = (bstrides(x) for x in (out, q, k, v))
    osl, osd = out.strides[-2:]
    qsl, qsp = q.strides[-2:]
    ksl, ksp = k.strides[-2:]
    vsl, vsd = v.strides[-2:]
    if mask is not None:
        full = broadcast_strides(mask, bshape + (L, S))
        mst, (msl, mss) = full[:-2], full[-2:]
    if not (qsp == 1 or E == 1) or not (osd == 1 or Ev == 1):
        raise ValueError("the attention kernel reads q's rows and writes the output's as vectors: unit strides")
    flops = 4 * items * br * S * max(E, Ev)
    zv = "zeroinitializer"

    def emit(em, P, lo, hi):
        if out.size == 0:
            return
        qt = em.alloca(f"[{E * br} x {ty}]")
        st = em.alloca(f"[{bc * br} x {ty}]")
        ot = em.alloca(f"[{Ev * br} x {ty}]")
        mrow, lrow = em.alloca(f"[{br} x {ty}]"), em.alloca(f"[{br} x {ty}]")
        moff = em.alloca(f"[{br} x i64]") if mask is not None and msl else None

        def ix(*terms):   # IR of the sum of (value, constant multiplier) terms and plain values
            acc = None
            for term in terms:
                val, mul = term if isinstance(term, tuple) else (term, 1)
                if mul == 0 or val == "0":
                    continue
                if mul != 1:
                    val = em(f"mul i64 {val}, {mul}")
                acc = val if acc is None else em(f"add i64 {acc}, {val}")
            return "0" if acc is None else acc

        def aptr(arr, idx, t=ty):
            return em(f"getelementptr inbounds {t}, ptr {arr}, i64 {idx}")

        def vld(arr, idx):
            return em(f"load {vt}, ptr {aptr(arr, idx)}, align {isz}")

        def vsto(arr, idx, val):
            em.raw(f"store {vt} {val}, ptr {aptr(arr, idx)}, align {isz}")

        def splat(x):
            ins = em(f"insertelement {vt} poison, {ty} {x}, i64 0")
            return em(f"shufflevector {vt} {ins}, {vt} poison, <{lanes} x i32> zeroinitializer")

        def fma(acc, a, b):
            return em(f"fadd contract {vt} {acc}, {em(f'fmul contract {vt} {a}, {b}')}")

        def vmax(a, b):
            return em(f"select <{lanes} x i1> {em(f'fcmp ogt {vt} {a}, {b}')}, {vt} {a}, {vt} {b}")

        def outer_steps(acc, h: int, count: int, tile, scalar):
            """acc[r][c] += scalar(p, r) * tile[p, c-th vector] for p in 0 .. count-1 (rank-1 updates of an
            h x nv register tile by one row of the br-wide tile and one scalar per row)."""
            def step(p):
                row = [vld(tile, ix((p, br), str(c * lanes))) for c in range(nv)]
                for r in range(h):
                    sp = splat(scalar(p, r))
                    for c in range(nv):
                        em.raw(f"store {vt} {fma(em(f'load {vt}, ptr {acc[r][c]}'), sp, row[c])}, ptr {acc[r][c]}")
            em.loop(count, step)

        def store_tile(acc, h: int, tile, row0):
            """tile[row0 + r, :] = acc[r] for the h rows of a register tile."""
            for r in range(h):
                for c in range(nv):
                    vsto(tile, ix((ix(row0, r) if r else row0, br), str(c * lanes)), em(f"load {vt}, ptr {acc[r][c]}"))

        def tiles(n: int, tile):
            """tile(first row (IR), rows) over n rows in tiles of mr (the last one shorter)."""
            full, rest = divmod(n, mr)
            em.loop(full, lambda i: tile(em(f"mul i64 {i}, {mr}"), mr))
            if rest:
                tile(str(full * mr), rest)

        def item(w):
            if nblk > 1:
                bi, blk = em(f"udiv i64 {w}, {nblk}"), em(f"urem i64 {w}, {nblk}")
            else:
                bi, blk = w, "0"
            offs = {name: [] for name in ("o", "q", "k", "v", "m")}
            rem = bi
            for d in range(len(bshape) - 1, -1, -1):
                if d:
                    idx, rem = em(f"urem i64 {rem}, {bshape[d]}"), em(f"udiv i64 {rem}, {bshape[d]}")
                else:
                    idx = rem
                for name, strides in (("o", ost), ("q", qst), ("k", kst), ("v", vst)) + (
                        (("m", mst),) if mask is not None else ()):
                    offs[name].append((idx, strides[d]))
            oo, qo, ko, vo = (ix(x.offset, *offs[n]) for x, n in ((out, "o"), (q, "q"), (k, "k"), (v, "v")))
            i0 = ix((blk, br))
            left = em(f"sub i64 {L}, {i0}")
            live = em(f"select i1 {em(f'icmp slt i64 {left}, {br}')}, i64 {left}, i64 {br}")
            # the block's queries, transposed and scaled: qt[p, r] = q[i0 + r, p] * scale, q's rows read as
            # vectors and transposed lanes x lanes at a time (a dead lane, a row past L, repeats row L - 1: its
            # scores are finite and its output row is not written)
            scv = _vconst(scale, dt, lanes)
            for c in range(nv):
                rows = []
                for r in range(lanes):
                    row = em(f"add i64 {i0}, {c * lanes + r}")
                    if L % br:
                        row = em(f"select i1 {em(f'icmp slt i64 {row}, {L}')}, i64 {row}, i64 {L - 1}")
                    rows.append(ix(qo, (row, qsl)))

                def qchunk(p0, w, c=c, rows=rows):
                    vecs = [gemm.vload(em, P, q, ix(base, p0), vt, lanes, w) for base in rows]
                    for p, tv in enumerate(transpose(em, vt, lanes, vecs)[:w]):
                        vsto(qt, ix((ix(p0, str(p)) if p else p0, br), str(c * lanes)), em(f"fmul {vt} {tv}, {scv}"))
                em.loop(E // lanes, lambda j: qchunk(em(f"mul i64 {j}, {lanes}"), lanes))
                if E % lanes:
                    qchunk(str(E - E % lanes), E % lanes)
            if moff is not None:   # each lane's mask row (dead lanes read the last row)
                mo = ix(mask.offset, *offs["m"])
                for r in range(br):
                    row = em(f"add i64 {i0}, {r}")
                    row = em(f"select i1 {em(f'icmp slt i64 {row}, {L}')}, i64 {row}, i64 {L - 1}")
                    em.raw(f"store i64 {ix(mo, (row, msl))}, ptr {aptr(moff, str(r), 'i64')}")
            elif mask is not None:
                mo = ix(mask.offset, *offs["m"])
            for c in range(nv):
                vsto(mrow, str(c * lanes), _vconst(-np.inf, dt, lanes))
                vsto(lrow, str(c * lanes), zv)
            em.raw(f"call void @llvm.memset.p0.i64(ptr {ot}, i8 0, i64 {Ev * br * isz}, i1 false)")

            def block(j0, n: int):
                # scores: st[j, :] = k[j0 + j, :] @ qt
                def score_tile(jt, h):
                    acc = [[em.alloca(vt) for _ in range(nv)] for _ in range(h)]
                    for row in acc:
                        for a in row:
                            em.raw(f"store {vt} {zv}, ptr {a}")
                    krow = [ix(ko, (em(f"add i64 {j0}, {ix(jt, r) if r else jt}"), ksl)) for r in range(h)]

                    outer_steps(acc, h, E, qt, lambda p, r: load(em, P, k, ix(krow[r], (p, ksp))))
                    store_tile(acc, h, st, jt)
                tiles(n, score_tile)
                if mask is not None:
                    def add_mask(j):
                        col = ix((em(f"add i64 {j0}, {j}"), mss))
                        for c in range(nv):
                            if moff is None:
                                mv = splat(load(em, P, mask, ix(mo, col)))
                            else:
                                mv = "poison"
                                for r in range(lanes):
                                    o = em(f"load i64, ptr {aptr(moff, str(c * lanes + r), 'i64')}")
                                    mv = em(f"insertelement {vt} {mv}, {ty} {load(em, P, mask, ix(o, col))}, "
                                            f"i64 {r}")
                            at = ix((j, br), str(c * lanes))
                            vsto(st, at, em(f"fadd {vt} {vld(st, at)}, {mv}"))
                    em.loop(n, add_mask)
                # online softmax: the new running max, the correction of what came before, exp and sums
                mx = [em.alloca(vt) for _ in range(nv)]
                for c in range(nv):
                    em.raw(f"store {vt} {vld(mrow, str(c * lanes))}, ptr {mx[c]}")

                def pmax(j):
                    for c in range(nv):
                        em.raw(f"store {vt} {vmax(em(f'load {vt}, ptr {mx[c]}'), vld(st, ix((j, br), str(c * lanes))))}"
                               f", ptr {mx[c]}")
                em.loop(n, pmax)
                safe, corr = [], []
                for c in range(nv):
                    m_new = em(f"load {vt}, ptr {mx[c]}")
                    inf = em(f"fcmp oeq {vt} {m_new}, {_vconst(-np.inf, dt, lanes)}")
                    safe.append(em(f"select <{lanes} x i1> {inf}, {vt} {zv}, {vt} {m_new}"))
                    corr.append(_vexp(em, em(f"fsub {vt} {vld(mrow, str(c * lanes))}, {safe[c]}"), dt, lanes))
                    vsto(mrow, str(c * lanes), m_new)
                sums = [em.alloca(vt) for _ in range(nv)]
                for c in range(nv):
                    em.raw(f"store {vt} {zv}, ptr {sums[c]}")

                def pexp(j):
                    for c in range(nv):
                        at = ix((j, br), str(c * lanes))
                        e = _vexp(em, em(f"fsub {vt} {vld(st, at)}, {safe[c]}"), dt, lanes)
                        vsto(st, at, e)
                        cur = em(f"load {vt}, ptr {sums[c]}")
                        em.raw(f"store {vt} {em(f'fadd {vt} {cur}, {e}')}, ptr {sums[c]}")
                em.loop(n, pexp)
                for c in range(nv):
                    at = str(c * lanes)
                    vsto(lrow, at, fma(em(f"load {vt}, ptr {sums[c]}"), vld(lrow, at), corr[c]))

                # output: ot[d, :] = ot[d, :] * corr + sum_j v[j0 + j, d] * st[j, :]
                def pv_tile(d0, h):
                    acc = [[em.alloca(vt) for _ in range(nv)] for _ in range(h)]
                    for r in range(h):
                        for c in range(nv):
                            old = vld(ot, ix((ix(d0, r) if r else d0, br), str(c * lanes)))
                            em.raw(f"store {vt} {em(f'fmul {vt} {old}, {corr[c]}')}, ptr {acc[r][c]}")

                    outer_steps(acc, h, n, st, lambda j, r: load(em, P, v, ix(
                        ix(vo, (em(f"add i64 {j0}, {j}"), vsl)), ((ix(d0, r) if r else d0), vsd))))
                    store_tile(acc, h, ot, d0)
                tiles(Ev, pv_tile)

            full, rest = divmod(S, bc)
            em.loop(full, lambda b: block(em(f"mul i64 {b}, {bc}"), bc))
            if rest:
                block(str(full * bc), rest)
            # out[i0 + r, d] = ot[d, r] / l[r] for the live rows: ot's rows scaled, transposed lanes x lanes at
            # a time and stored as the output's rows
            for c in range(nv):
                at = str(c * lanes)
                vsto(lrow, at, em(f"fdiv {vt} {_vconst(1.0, dt, lanes)}, {vld(lrow, at)}"))
            for c in range(nv):
                inv = vld(lrow, str(c * lanes))

                def ochunk(d0, w, c=c, inv=inv):
                    vecs = [em(f"fmul {vt} {vld(ot, ix((ix(d0, str(d)) if d else d0, br), str(c * lanes)))}, {inv}")
                            if d < w else zv for d in range(lanes)]
                    for r, tv in enumerate(transpose(em, vt, lanes, vecs)):
                        def put(r=r, tv=tv):
                            at = ix(oo, (em(f"add i64 {i0}, {c * lanes + r}"), osl), d0)
                            gemm.vstore(em, P, out, at, tv, vt, lanes, w)
                        if L % br:
                            em.if_(em(f"icmp slt i64 {c * lanes + r}, {live}"), put)
                        else:
                            put()
                em.loop(Ev // lanes, lambda j: ochunk(em(f"mul i64 {j}, {lanes}"), lanes))
                if Ev % lanes:
                    ochunk(str(Ev - Ev % lanes), Ev % lanes)

        em.loop(hi, item, start=lo)
    split = items if items >= 2 and flops >= PARALLEL_FLOPS else None
    kern = Kernel("attention", [out, q, k, v] + ([mask] if mask is not None else []), emit, split, flops, items)
    kern.key = ("attention", repr(float(scale)), mask is not None)   # with the views: kernels.memo_key
    return kern
