"""Direct convolution over phase planes (conv2d forward: one group, dilation 1, float32/float64).

A stride-s convolution reads input column s*x + j for output column x and tap j. Split the zero-padded image
into s x s phase planes, plane (pi, pj) holding the padded image's rows pi, pi+s, ... and columns pj, pj+s,
...: then tap (i, j) of output (y, x) is element (y + i//s, x + j//s) of plane (i%s, j%s), and for a run of
output columns the taps read contiguous runs of a plane. Every tap of every channel is a row of an implicit
im2col that the register-blocked micro-kernel (gemm.gemm_tiles, ktaps as segments: one per phase plane)
reads in place, with vectors along the output row and the weights broadcast, so the result comes out in
NCHW order with no im2col and no transpose. Output rows are taken R at a time as "wide" rows of Wq columns
(the plane's width: Wq - ow columns of each wide row are padding, computed and dropped), so small images
(7x7, 14x14) still fill whole vectors. Stride 1 is the one-plane case.

Two steps: conv_phases writes the planes of every image (split over images x channels), conv_direct runs
items of (image, block of R output rows, block of output channels) split over threads: the product into the
slot's wide block, then its kept columns copied to the output, where a fused epilogue (bias, activation,
residual add: conv.fuse_conv_epilogue) runs on the rows just written. The weights are permuted once into
the segments' tap order (a prologue step for a parameter). The ResNet-18 stem (7x7 stride 2 over 3x224x224)
and the stride-2 and 1x1 convolutions of its later stages take this path (rule)."""
from __future__ import annotations

import os

import numpy as np

from .gemm import panel_width, vector_shape, vload, vstore
from .irtext import VTYPE, literal
from .kernels import Kernel, load, nest, store
from ..schedule.views import View, contig_strides

ENV = "GRAPHC_LLVM_CONV_DIRECT"
#: bytes of one slot's block of wide output rows (R rows x the block's channels), kept in L2 for the copy-out
OUT_BYTES = 1 << 17
#: a product whose column block reads more than this many bytes of the planes prefetches the next channel's
#: taps (geometry): ResNet-18's 3x3 stride-2 convolutions to 28x28 and 14x14 (148 and 75 KB) 7-10% faster
#: in-process on the Intel Xeon, its stem (28 KB) 2% slower
PREFETCH_BYTES = 32 << 10
#: the rule's floor: at least this many output columns a row ...
MIN_OW = 7
#: ... and this many FLOPs (smaller convolutions stay on the im2col paths) ...
MIN_FLOPS = 1 << 22
#: ... and at most this fraction of each wide row padding. ResNet's 3x3 stride-2 convolution to 7x7 (8 wide
#: columns a row, one dropped) runs direct: 406 against 424 us on im2col + the turned product
#: (conv.turned_rule), W10 b1 10.67 -> 10.50 ms (in-process on the Intel Xeon, the next channel's taps
#: prefetched; without that prefetch it had measured 4% slower)
MAX_PAD_FRACTION = 0.15


def rule(x: View, w: View, stride, dilation, groups: int, out_hw) -> bool:
    """Whether conv2d runs direct over phase planes: float32/float64, one group, dilation 1, stride <= 4,
    at least MIN_OW output columns, MIN_FLOPS, and wide rows at most MAX_PAD_FRACTION padding.
    GRAPHC_LLVM_CONV_DIRECT=0 / 1: never / whenever it applies (any size: forced, it comes before the
    small-product micro-kernel path too; Winograd is asked first)."""
    mode = os.environ.get(ENV, "auto")
    if mode == "0" or x.dtype not in ("float32", "float64") or x.dtype != w.dtype or groups != 1:
        return False
    if tuple(dilation) != (1, 1) or max(stride) > 4 or min(stride) < 1:
        return False
    o, c, kh, kw = w.shape
    oh, ow = out_hw
    if oh < 1 or ow < 1 or x.shape[0] < 1 or c < 1 or o < 1:
        return False
    if mode == "1":
        return True
    wq = ow + (kw - 1) // stride[1]
    return (ow >= MIN_OW and (wq - ow) <= MAX_PAD_FRACTION * wq
            and 2 * x.shape[0] * o * c * kh * kw * oh * ow >= MIN_FLOPS)


def forced() -> bool:
    return os.environ.get(ENV, "auto") == "1"


def segments(kernel, stride) -> list[tuple[int, int, int, int]]:
    """(pi, pj, taps down, taps across) per phase plane a tap reads, in the weights' permuted order."""
    (kh, kw), (sh, sw) = kernel, stride
    return [(pi, pj, -(-(kh - pi) // sh), -(-(kw - pj) // sw))
            for pi in range(min(sh, kh)) for pj in range(min(sw, kw))]


def geometry(x_shape, o: int, kernel, stride, pads, out_hw, dtype: str, threads: int) -> dict:
    """How the work is cut: Wq (plane width: ow plus the taps' reach past a row), R output rows per item
    (a wide block of at most OUT_BYTES; fewer where the batch gives the threads too few items), rb row
    blocks, OB channels per block (halved while the items are fewer than two per thread), Hq plane rows
    (every row block computes R rows: the planes are padded to rb*R plus the reach)."""
    from .conv import SPLIT_FLOPS
    n, c = x_shape[:2]
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = out_hw
    isz = np.dtype(dtype).itemsize
    wq = ow + (kw - 1) // sw
    halo = (kh - 1) // sh
    segs = segments(kernel, stride)
    flops = 2 * n * o * c * kh * kw * oh * wq
    want = 2 * threads if threads > 1 and flops >= SPLIT_FLOPS else 1
    R = max(1, min(oh, OUT_BYTES // max(1, o * wq * isz)))
    rb = -(-oh // R)
    nob = 1
    while n * rb * nob < want and o // (2 * nob) >= 16:
        nob *= 2
    if n * rb * nob < want:
        rb = min(oh, -(-want // (n * nob)))
    R = -(-oh // rb)
    rb = -(-oh // R)
    ob = -(-o // nob)
    nob = -(-o // ob)
    if SEARCH_CUTS:
        R, rb, ob, nob = _best_cut(n, o, oh, ow, wq, isz, dtype, threads, flops, want, (R, rb, ob, nob))
    hq = rb * R + halo
    m = (R - 1) * wq + ow
    plane = hq * wq
    taps = [(ni, nj, si * c * plane, wq) for si, (_, _, ni, nj) in enumerate(segs)]
    # the planes' rows one column block reads (its wide rows and the taps' reach below them) over every
    # channel: beyond L1, each step prefetches its row of the next channel (the L1 streamer does not follow
    # taps that jump between planes)
    nr = panel_width(ob, dtype)   # (the columns of one of gemm_tiles' blocks for OB rows)
    reach = c * len(segs) * min(plane, (-(-min(nr, m) // wq) + 1 + halo) * wq) * isz
    return {"C": c, "ow": ow, "Wq": wq, "Hq": hq, "R": R, "rb": rb, "OB": ob, "nob": nob, "m": m, "segs": segs,
            "plane": plane, "image": len(segs) * c * plane, "items": n * rb * nob, "taps": taps,
            "prefetch": int(reach > PREFETCH_BYTES),
            "flops": 2 * n * o * c * kh * kw * rb * R * wq}


#: geometry weighs other cuts of the work (rows per item, channel blocks) by _cut_cycles and takes one at least
#: SEARCH_GAIN cheaper than OUT_BYTES' rule gives; an item's wide block stays within WIDE_BYTES. ResNet-18's
#: 64 -> 128 3x3 stride-2 convolution to 28 x 28 (in-process on the Intel Xeon): 7-row items of all 128
#: channels (202 wide columns: three whole column blocks and a 1-vector one, whose 6 x 1 tiles wait on
#: their loads) 396 us; whole-image items of 32 channels (811 columns: 12 blocks and a 3-vector one) 375-381
SEARCH_CUTS = True
SEARCH_GAIN = 0.03
WIDE_BYTES = 1 << 19


def _step_cycles(rows: int, vecs: int) -> float:
    """Cycles of one k step of a rows x vecs tile of the micro-kernel (2 FMA ports; its unaligned plane loads
    two load slots each beside a broadcast a row, 2 loads a cycle; at least the FMA latency's 4)."""
    return max(rows * vecs / 2, vecs + rows / 2, 4.0)


def _cut_cycles(ob: int, m: int, dtype: str) -> float:
    """Relative cycles of one item: ob output channels (rows of the product, in gemm_tiles' balanced tiles)
    over m wide columns (whole column blocks, then the last one's vectors)."""
    from .gemm import _row_tile, tile_split, tile_vectors
    lanes = vector_shape(dtype)[0]
    nv, rows = tile_vectors(ob, dtype)
    count, base, extra = tile_split(ob, _row_tile(ob, rows))
    heights = [base + 1] * extra + [base] * (count - extra)
    full, tail = divmod(m, nv * lanes)
    return sum(full * _step_cycles(h, nv) + (_step_cycles(h, -(-tail // lanes)) if tail else 0) for h in heights)


def _makespan(costs: list, slots: int, threads: int) -> float:
    """The last thread's finish when `threads` threads claim the slots in order (each slot a run of items,
    as _slot_loop cuts them), each taking the next as it frees."""
    items = len(costs)
    loads = [sum(costs[s * items // slots:(s + 1) * items // slots]) for s in range(slots)]
    free = [0.0] * max(1, threads)
    for x in loads:
        i = free.index(min(free))
        free[i] += x
    return max(free)


def _best_cut(n: int, o: int, oh: int, ow: int, wq: int, isz: int, dtype: str, threads: int, flops: int,
              want: int, rule: tuple) -> tuple:
    """(R, rb, OB, nob) for geometry: the rule's cut, or the cheapest other one by _cut_cycles over the items'
    schedule (_makespan) when that is at least SEARCH_GAIN cheaper: R from every row-block count, channel
    blocks of at least 16 halved from o, each item's wide block at most WIDE_BYTES, enough items for the
    threads where the rule had them."""
    from .conv import slot_count

    def cost(R, rb, ob, nob):
        m = (R - 1) * wq + ow
        rest = o - (nob - 1) * ob
        per = [_cut_cycles(ob, m, dtype)] * (nob - 1) + [_cut_cycles(rest, m, dtype)]
        costs = per * (n * rb)
        items = len(costs)
        return _makespan(costs, slot_count(items, flops), threads if items > 1 else 1)
    base = cost(*rule)
    best, best_cost = rule, base
    lanes = vector_shape(dtype)[0]
    tail = ((rule[0] - 1) * wq + ow) % (panel_width(rule[2], dtype))
    if not 0 < tail <= lanes:   # only a rule cut whose last column block is one vector (its tiles wait on
        return rule              # their loads) looks for another
    enough = n * rule[1] * rule[3] >= want
    for rb in range(1, oh + 1):
        R = -(-oh // rb)
        if -(-oh // R) != rb or R < rule[0]:   # (items no shorter: each re-reads its taps' reach)
            continue
        nob = 1
        while True:
            ob = -(-o // nob)
            nb = -(-o // ob)
            m = (R - 1) * wq + ow
            if ob * m * isz <= WIDE_BYTES and (not enough or n * rb * nb >= want):
                c = cost(R, rb, ob, nb)
                if c < best_cost:
                    best, best_cost = (R, rb, ob, nb), c
            if o // (2 * nob) < 16:
                break
            nob *= 2
    return best if best_cost <= base * (1 - SEARCH_GAIN) else rule


def permute_weights(plan, w: View, kernel, stride) -> View:
    """w (o, c, kh, kw) as (o, K) in the taps' order (geometry's "taps": per channel, plane by plane (pi, pj),
    tap row, tap column): w itself (2-D) for stride 1, else a copy per plane (plan.add: a prologue step for
    a weight)."""
    from .kernels import copy
    o, c, kh, kw = w.shape
    k = c * kh * kw
    segs = segments(kernel, stride)
    if len(segs) == 1:
        return View(w.buf, w.offset, (o, k), (k, 1), w.dtype)
    wp = plan.fresh(None, (o, k), w.dtype)
    sh, sw = stride
    t = kh * kw
    at = 0
    for pi, pj, ni, nj in segs:
        src = View(w.buf, w.offset + w.strides[2] * pi + w.strides[3] * pj, (o, c, ni, nj),
                   (w.strides[0], w.strides[1], w.strides[2] * sh, w.strides[3] * sw), w.dtype)
        dst = View(wp.buf, wp.offset + at, (o, c, ni, nj), (k, t, nj, 1), w.dtype)
        plan.add(copy(dst, src), [src], [dst])
        at += ni * nj
    return wp


def conv_phases(planes: View, x: View, kernel, stride, pads, geo: dict) -> Kernel:
    """planes[img][segment][c] (Hq x Wq each) = the zero-padded image's phase plane (pi, pj): element
    (y, q) is x[img, c, s_h*y + pi - top, s_w*q + pj - left], zero outside x. Split over images x channels x
    planes; a row read from the padding is zeros; a stride-2 row of unit-stride x is deinterleaved by
    vectors (two loads, one shuffle), the rest element by element."""
    from .conv import _pick, _valid
    n, c, h, w = x.shape
    (sh, sw), (pt, pl) = stride, (pads[0][0], pads[1][0])
    wq, hq, segs = geo["Wq"], geo["Hq"], geo["segs"]
    plane = hq * wq
    t = x.dtype
    zero = literal(0, t)
    S = len(segs)
    lanes = vector_shape(t)[0]
    vt = f"<{lanes} x {VTYPE[t]}>"
    valid = [_valid(w, wq, pj, sw, 1, pl) for _, pj, _, _ in segs]
    # per plane: the columns read as vectors (2*lanes inputs each, all inside the row): [q0, q0 + vec*lanes)
    vec = [max(0, min(q1 - q0, (w - (q0 * sw + pj - pl)) // (2 * lanes) * lanes)) // lanes
           if sw == 2 and x.strides[3] == 1 else 0 for (q0, q1), (_, pj, _, _) in zip(valid, segs)]
    evens = ", ".join(f"i32 {2 * i}" for i in range(lanes))

    def emit(em, P, lo, hi):
        def per_plane(q):
            img = em(f"udiv i64 {q}, {c * S}")
            ch = em(f"urem i64 {em(f'udiv i64 {q}, {S}')}, {c}")
            sg = em(f"urem i64 {q}, {S}")
            pi, pj = _pick(em, sg, [g[0] for g in segs]), _pick(em, sg, [g[1] for g in segs])
            q0, q1 = _pick(em, sg, [v[0] for v in valid]), _pick(em, sg, [v[1] for v in valid])
            nv = _pick(em, sg, vec)
            xo = _madd(em, _madd(em, x.offset, img, x.strides[0]), ch, x.strides[1])
            po = _madd(em, _madd(em, _madd(em, planes.offset, img, S * c * plane), sg, c * plane), ch, plane)
            first = em(f"sub i64 {_madd(em, pj, q0, sw)}, {pl}")

            def zeros(at, count):
                nest(em, [count], [(1,)], [at], lambda o, _: store(em, P, planes, o[0], zero))

            def row(offs, idx):
                ih = em(f"sub i64 {_madd(em, pi, idx[0], sh)}, {pt}")
                ok = em(f"and i1 {em(f'icmp sge i64 {ih}, 0')}, {em(f'icmp slt i64 {ih}, {h}')}")
                em.if_(em(f"xor i1 {ok}, true"), lambda: zeros(offs[0], wq))

                def inside():
                    src = _madd(em, _madd(em, xo, ih, x.strides[2]), first, x.strides[3])
                    dst = em(f"add i64 {offs[0]}, {q0}")
                    zeros(offs[0], q0)

                    def vecs(o, _):   # lanes outputs from 2*lanes inputs: the even ones
                        a = vload(em, P, x, o[1], vt, lanes, lanes)
                        b = vload(em, P, x, em(f"add i64 {o[1]}, {lanes}"), vt, lanes, lanes)
                        vstore(em, P, planes, o[0], em(f"shufflevector {vt} {a}, {vt} {b}, <{lanes} x i32> "
                                                        f"<{evens}>"), vt, lanes, lanes)
                    nest(em, [nv], [(lanes,), (2 * lanes,)], [dst, src], vecs)
                    done = em(f"mul i64 {nv}, {lanes}")
                    left = em(f"sub i64 {em(f'sub i64 {q1}, {q0}')}, {done}")
                    nest(em, [left], [(1,), (sw * x.strides[3],)],
                         [em(f"add i64 {dst}, {done}"), _madd(em, src, done, sw * x.strides[3])],
                         lambda o, _: store(em, P, planes, o[0], load(em, P, x, o[1])))
                    zeros(em(f"add i64 {offs[0]}, {q1}"), em(f"sub i64 {wq}, {q1}"))
                em.if_(ok, inside)
            nest(em, [hq], [(wq,)], [po], row)
        em.loop(hi, per_plane, start=lo)
    units = n * c * S
    kern = Kernel("conv_phases", [planes, x], emit, units if units >= 2 else None, 0, units)
    kern.key = ("conv_phases", tuple(kernel), tuple(stride), (pt, pl), wq, hq)
    return kern


def _madd(em, base, idx, k: int):
    """base + idx * k (conv's _add / _mul: ints stay ints, zero terms drop)."""
    from .conv import _add, _mul
    return _add(em, base, _mul(em, idx, k))


def conv_direct(out: View, planes: View, w: View, wide: View, geo: dict, slots: int, epilogue=None,
                extra_views=()) -> Kernel:
    """out (n, o, oh*ow) = the convolution, from the phase planes and the permuted weights w (o, K): per
    item (image, row block, channel block) the micro-kernel over the block's wide rows into the slot's
    part of `wide` (OB x m), then its kept columns copied to out, or epilogue(em, P, img, o0, channels, r0,
    rows, wide, block base, block strides) runs instead: the copy-out with the region fused
    (conv.fuse_conv_epilogue)."""
    from .conv import _slot_kernel, _slot_loop, by_block_size
    from .gemm import gemm_tiles
    n, o, hw = out.shape
    k = w.shape[1]
    c, ow = geo["C"], geo["ow"]
    wq, R, rb, ob, nob, m = geo["Wq"], geo["R"], geo["rb"], geo["OB"], geo["nob"], geo["m"]
    plane, image = geo["plane"], geo["image"]
    oh = hw // ow
    per_slot = wide.size // slots
    taps = geo["taps"]
    items = geo["items"]
    rest = o - (nob - 1) * ob
    tail_rows = oh - (rb - 1) * R
    wv = View(wide.buf, 0, (ob, m), (m, 1), wide.dtype)

    def item(em, P, s, it):
        img = em(f"udiv i64 {it}, {rb * nob}")
        rblk = em(f"udiv i64 {em(f'urem i64 {it}, {rb * nob}')}, {nob}")
        oblk = em(f"urem i64 {it}, {nob}")
        wo = em(f"add i64 {wide.offset}, {em(f'mul i64 {s}, {per_slot}')}")
        r0 = em(f"mul i64 {rblk}, {R}")
        o0 = em(f"mul i64 {oblk}, {ob}")
        bo = _madd(em, _madd(em, planes.offset, img, image), r0, wq)
        ao = em(f"add i64 {w.offset}, {em(f'mul i64 {o0}, {k}')}")
        rows = str(R) if tail_rows == R else em(
            f"select i1 {em(f'icmp eq i64 {rblk}, {rb - 1}')}, i64 {tail_rows}, i64 {R}")

        def block(chans: int):
            gemm_tiles(em, P, wv, w, planes, ao, bo, wo, chans, k, m,
                       ktaps={"loop": c, "stride": plane, "rows": taps, "prefetch": geo["prefetch"]})
            if epilogue is not None:
                epilogue(em, P, img, o0, chans, r0, rows, wv, wo, (m, wq, 1))
                return
            oo = _madd(em, _madd(em, _madd(em, out.offset, img, o * hw), o0, hw), r0, ow)
            nest(em, [chans, rows, ow], [(m, wq, 1), (hw, ow, 1)], [wo, oo],
                 lambda offs, _: store(em, P, out, offs[1], load(em, P, wv, offs[0])))
        by_block_size(em, oblk, nob, ob, rest, block)

    def emit(em, P, lo, hi):
        if out.size:
            _slot_loop(em, items, slots, lo, hi, lambda s, it: item(em, P, s, it))
    kern = _slot_kernel("conv2d_direct", [out, planes, w, wide] + list(extra_views), emit, slots, geo["flops"])
    kern.direct_conv = (out, planes, w, wide, geo, slots)
    return kern


def plan_direct(plan, t, ct: str, x: View, wm: View, kernel, stride, pads, oshape) -> None:
    """The plan rows of a direct convolution: the weights permuted (prologue for a weight), the phase
    planes, the product with its copy-out (an elementwise region after it may fuse: fuse_conv_epilogue)."""
    from .conv import slot_count, threads
    n, c = x.shape[:2]
    o = wm.shape[0]
    oh, ow = oshape[2:]
    geo = geometry(x.shape, o, kernel, stride, pads, (oh, ow), x.dtype, threads())
    wp = permute_weights(plan, wm, kernel, stride)
    planes = plan.fresh(None, (n * geo["image"],), x.dtype)
    plan.add(conv_phases(planes, x, kernel, stride, pads, geo), [x], [planes])
    slots = slot_count(geo["items"], geo["flops"])
    wide = plan.fresh(None, (slots, geo["OB"] * geo["m"]), x.dtype)
    out = plan._compute_out(t, ct)
    om = View(out.buf, out.offset, (n, o, oh * ow), contig_strides((n, o, oh * ow)), out.dtype)
    plan.add(conv_direct(om, planes, wp, wide, geo, slots), [planes, wp], [om, wide])
    plan._store_rounded(t, out)
