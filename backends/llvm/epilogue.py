"""A product's elementwise region run on each block of the product right after the block is written.

A Dense layer is a product P = x @ W and a region reading P element by element (the bias, the activation:
`relu(P + b)`). Planned apart they are two kernels: the product split over the pool by blocks of rows or
columns (one OpenBLAS call per block, the micro-kernel's column blocks, the matrix-vector loop's output
blocks), then a pass over all of P, reading it back from memory or from the other core's cache. Here the
region runs inside the product's kernel on the rows and columns each block just wrote, while they are
in that core's cache: one dispatch instead of two, and the region's reads from the nearest cache (W1
batch 256 on a 2-core Zen 1: the two bias+ReLU passes over 256 x 512 and 256 x 256 took ~140 us of ~5 ms
apart). Measured, it was even, not faster, on that host (ENV below: which products it is used for).

The product kernel (gemm.matmul) says what a run of its blocks writes as `kern.product` =
(P, a, b, layout): layout None (one product written whole by any run: not split) or (axis, width,
extent): blocks lo .. hi-1 write rows (or columns) lo*width .. min(hi*width, extent) of P. The fusion is
made at plan time (Plan._region) when the step planned just before the region is such a product, the
region reads P only as the whole view (element i of P for element i of its outputs) and its outputs
have P's shape and lie outside P and its operands. The product is still written whole, so a later reader
of P (the ReLU's gradient reads P's sign) sees it complete. recurrent.py fuses a product with a region
that reads it by column windows (the gates of an LSTM step) inside loops; this one takes whole views.
"""
from __future__ import annotations

import numpy as np

from .kernels import Kernel, compute_key, literal, load, nest, store
from ..schedule.views import View, broadcast_strides, contig_strides

#: GRAPHC_LLVM_PRODUCT_EPILOGUE: "1" (default) fuses the region into matrix-vector products (whole or split),
#: into products written whole by one call, and into products split over the pool (OpenBLAS calls by rows or
#: columns, the micro-kernel's column blocks) whose region's pass apart would be memory-bound work of at
#: least STREAM_SHARE of the product's (`streams`: an SGD update `W - lr * X^T dY` with a short inner
#: dimension); "all" into every split product too; "0" never. Other split products are not fused by
#: default: on the 2-core Zen 1 VM this was measured on (in-process A/B, 60 interleaved samples each) the
#: fused kernel was as fast at best but slower in the median: 256x784x512 + bias + ReLU on OpenBLAS split
#: by rows 2.4-3.6% slower (best 2,846-2,856 us against 2,879-2,881: the region's pass saved; the median
#: lost because a thread descheduled on a busy VM now holds its block's product *and* region, where the
#: region apart is claimed in 8 dynamic chunks), the micro-kernel's 16x256x256 and 64x128x256 5-8%
#: slower (its column blocks are 16 columns wide: the region runs as many short strided loops). Matrix-
#: vector products and whole products measured even (0.96-1.03 over 1x784x512, 1x512x256, 8x64x64 and
#: 256x784x512 on one thread): one kernel and one dispatch fewer per layer, the same time. Where the
#: region apart streams as many bytes as the product computes it pays (session 14, same VM, in-process A/B,
#: 80 interleaved samples): `W - 0.1 * (A^T @ D)` 784x64x512 0.84x the time apart, 512x64x256 0.94x, W5's
#: training step 0.93x and W4's hoisted input projection (800x64x512 + bias) 0.96x, while bias + ReLU after
#: 256x784x512, 64x128x256 and 16x256x256 stayed 1.00-1.02x and a residual add after 64x256x256 1.02x.
ENV = "GRAPHC_LLVM_PRODUCT_EPILOGUE"
#: float32 FLOPs of a GEMM per byte of the copy loop on the hosts this was measured on (the 2-core Zen 1's
#: 66.5 GFLOP/s over 13.5 GB/s a thread, graphc.explain.host_peaks): the product's time per output element
#: is 2k / (BALANCE * bandwidth), the region's pass bytes / bandwidth
BALANCE = 5.0
#: a split product's region joins it by default when its pass apart would take this share of the product
STREAM_SHARE = 0.2


def streams(k: int, outs: list[View], ins: list[View], full: tuple) -> bool:
    """Whether the region's pass (its whole, unbroadcast operands read and outputs written, per output
    element) would take at least STREAM_SHARE of the time of the product of inner dimension k before it:
    then reading the product back from memory is a share worth saving (the region of an SGD step's
    weight-gradient product, k the batch)."""
    per = sum(np.dtype(v.dtype).itemsize for v in outs + ins if 0 not in broadcast_strides(v, full))
    return per * BALANCE >= STREAM_SHARE * 2 * k


def region_block(em, P, outs: list[View], ins: list[View], compute, full: tuple, r0, nr, c0, nc) -> None:
    """outs = compute(ins) over rows r0 .. r0+nr-1 and columns c0 .. c0+nc-1 of the 2-D shape `full`
    (each an int or an i64 IR value); the views broadcast to `full`."""
    views = outs + ins
    strides = [broadcast_strides(v, full) for v in views]
    # operands at the same place (a carry updated in place: read and written as one view) share one
    # address computation, so a loop's load and store of an element are visibly the same address
    uniq = list(dict.fromkeys((v.buf, v.offset, s) for v, s in zip(views, strides)))
    at = [uniq.index((v.buf, v.offset, s)) for v, s in zip(views, strides)]

    def moved(off, i, s):
        if s == 0 or i == 0 or i == "0":
            return off
        return em(f"add i64 {off}, {i if s == 1 else em(f'mul i64 {i}, {s}')}")
    bases = [moved(moved(off, r0, s[0]), c0, s[1]) for _, off, s in uniq]
    no = len(outs)

    def body(offs, _):
        offs = [offs[q] for q in at]
        vals = [(load(em, P, v, o), v.dtype) for v, o in zip(ins, offs[no:])]
        for v, o, r in zip(outs, offs, compute(em, vals)):
            store(em, P, v, o, r)
    nest(em, (nr, nc), [s for _, _, s in uniq], bases, body)


def _rows2d(v: View, full: tuple) -> View | None:
    """v (broadcast to the N-D shape `full`) as a (prod(full[:-1]), full[-1]) view of the same elements, or
    None when its leading dims do not merge into one stride (0 for a bias broadcast over the rows)."""
    if v.literal is not None:
        return View(None, 0, (int(np.prod(full[:-1])), full[-1]), (0, 0), v.dtype, v.literal)
    st = broadcast_strides(v, full)
    lead = [(d, x) for d, x in zip(full[:-1], st[:-1]) if d != 1]
    for (d0, s0), (d1, s1) in zip(lead, lead[1:]):
        if s0 != s1 * d1:
            return None
    return View(v.buf, v.offset, (int(np.prod(full[:-1])), full[-1]), (lead[-1][1] if lead else 0, st[-1]),
                v.dtype)


def _reads_whole(p: View, ins: list[View], full: tuple) -> bool:
    """Whether every input on P's buffer is P itself, element for element, and one is."""
    hit = False
    for v in ins:
        if v.buf != p.buf:
            continue
        if v.literal is not None or v.offset != p.offset or tuple(v.shape) != full or \
                broadcast_strides(v, full) != tuple(p.strides):
            return False
        hit = True
    return hit


def fuse(plan, outs: list[View], ins: list[View], compute, region: Kernel) -> bool:
    """Replace the product planned last (plan.steps[-1]) and the region (outs = compute(ins), planned
    alone as the kernel `region`) by one kernel; True when done (the caller adds nothing), False to plan
    the region on its own."""
    import os
    mode = os.environ.get(ENV, "1").strip().lower()
    if not plan.steps or mode == "0":
        return False
    prev = plan.steps[-1]
    product = getattr(prev, "product", None)
    if product is None or not isinstance(prev, Kernel):
        return False
    p, a, b, layout = product
    full = tuple(outs[0].shape)
    if len(full) > 2 and len(p.shape) == 2:
        # a region over (batch..., n, m) after the one GEMM over all its rows (plan._matmul's `flat`): the
        # same elements as (rows, m) where every operand's leading dims merge (a Transformer's projections)
        flat = [_rows2d(v, full) for v in outs + ins]
        if any(v is None for v in flat):
            return False
        outs, ins, full = flat[:len(outs)], flat[len(outs):], (int(np.prod(full[:-1])), full[-1])
    if len(full) != 2 or tuple(p.shape) != full or p.strides != (full[1], 1) or 0 in full:
        return False
    if prev.split is not None and prev.name != "gemv" and mode != "all" and not streams(a.shape[-1], outs, ins, full):
        return False   # see ENV
    if getattr(prev, "tiles", None) is not None and plan._loop_pos is not None:
        return False   # a recurrent step's product: recurrent.py's choice (measured not to pay in loops)
    if not _reads_whole(p, ins, full):
        return False
    if any(o.buf in (p.buf, a.buf, b.buf) or tuple(o.shape) != full for o in outs):
        return False
    if any(v.buf in (o.buf for o in outs) and v.buf != p.buf and (v.offset, broadcast_strides(v, full)) not in
           [(o.offset, o.strides) for o in outs] for v in ins):
        return False   # an input overlapping an output other than element for element
    if prev.split is None and region.split is not None:
        return False   # the region alone would run on every thread, the product on one: keep them apart
    n, m = full

    def emit(em, P, lo, hi):
        prev.emit(em, P, lo, hi)
        if layout is None:
            region_block(em, P, outs, ins, compute, full, "0", n, "0", m)
            return
        axis, width, extent = layout
        i0 = em(f"mul i64 {lo}, {width}")
        i1 = em(f"mul i64 {hi}, {width}")
        i1 = em(f"select i1 {em(f'icmp slt i64 {i1}, {extent}')}, i64 {i1}, i64 {extent}")

        def part():
            cnt = em(f"sub i64 {i1}, {i0}")
            if axis == "rows":
                region_block(em, P, outs, ins, compute, full, i0, cnt, "0", m)
            else:
                region_block(em, P, outs, ins, compute, full, "0", n, i0, cnt)
        em.if_(em(f"icmp slt i64 {i0}, {i1}"), part)

    extra = list(getattr(prev, "pack_source", []))   # a packing run inside the product reads its source
    kern = Kernel(prev.name, [p, a, b] + extra + outs + ins, emit, prev.split, prev.size, prev.outer)
    ckey = compute_key(compute, [v.dtype for v in ins])
    if prev.key is not None and ckey is not None:
        kern.key = ("epilogue", prev.key, ckey, len(outs))
    for attr in ("threads", "chunks", "blas_pinned", "packed", "pack_source"):
        if hasattr(prev, attr):
            setattr(kern, attr, getattr(prev, attr))
    kern.fn_attrs = prev.fn_attrs
    kern.epilogue = True
    kern.per_element = 2   # reads past the product's operands: element i for output element i (plan._scan)
    plan.pop_step()
    record = plan._record
    if record and record[-1][0] is prev:
        record.pop()
    plan.add(kern, [a, b] + extra + ins, [p] + outs + ([b] if extra else []))
    return True


# ---- a bias, residual and ReLU folded into the micro-kernel's tiles -----------------------------------------

#: GRAPHC_LLVM_FOLD: "1" (default) folds a micro-kernel product's region of adds and a closing ReLU into its
#: tiles (fold); "0": never
FOLD_ENV = "GRAPHC_LLVM_FOLD"


def fold(plan, members, inputs, outputs, ins, outs, live) -> bool:
    """Fold the region after a micro-kernel product P = a @ b (the step planned last: kern.fold_args) into
    the product when the region is P + addend (+ addend ...) with an optional ReLU, each addend a
    row vector (a bias) or a matrix (a residual) read with unit column stride, and nothing reads P after
    the region (`live`: the buffers of its inputs read later). The tiles then start from the addends' sum
    and take max(., 0) before their store (gemm_tiles' fold): the region's own pass over P is gone, P is
    never written. True when done (the caller adds nothing). W7 (a Transformer encoder layer) on the Intel
    Xeon (in-process A/B, 12 interleaved rounds): batch 16 5.78 -> 5.40 ms (its four such passes over
    1024 x 768, 1024 x 256 and 1024 x 1024 took 7.5% of the call apart), batch 1 395 -> 376 us; W1, W3, W4,
    W5 and W9 even (BLAS products, or the product read again by a gradient).
    After those (or instead of them), a chain of operations on the running value folds too: a scale by a
    literal, a matrix or row added, subtracted or subtracted from, a ReLU (gemm_tiles' fold[2], applied to
    each vector before its store, in the region's order): an SGD step's W - lr * (X^T @ dY), whose pass
    apart read the product back. W5 on the Intel Xeon (in-process A/B, 12 interleaved rounds, its weight
    products packed every call): 1,074 us a step without the fold, 986 with it."""
    import os
    from . import gemm
    from graphc.ops import elementwise as E
    if os.environ.get(FOLD_ENV, "1") == "0" or not plan.steps or plan._loop_pos is not None:
        return False
    prev = plan.steps[-1]
    args = getattr(prev, "fold_args", None)
    if args is None or len(outputs) != 1 or len(outs) != 1 or live is None:
        return False
    pout, a, b, threads, packed, pack = args
    if _outer_reads(plan, inputs, ins, pout.buf) > 1:   # (live covers the body walked; this, the graph around)
        return False
    n, m = pout.shape[-2], pout.shape[-1]
    full = tuple(outs[0].shape)   # the region's shape: the product's (n, m), or its rows split (batch, T, m)
    if (pout.dtype not in ("float32", "float64") or pout.buf in live or not full or full[-1] != m
            or int(np.prod(full)) != n * m):
        return False

    def row_stride(v):
        """v's row stride as an (n, m) matrix over the region's shape (column stride 1), or None."""
        st = broadcast_strides(v, full)
        if st[-1] != 1 and m > 1:
            return None
        sr = st[-2] if len(full) >= 2 else 0
        inner = 1
        for d in range(len(full) - 2, -1, -1):
            if full[d] > 1 and st[d] != sr * inner:
                return None
            inner *= full[d]
        return sr
    views = {id(t): v for t, v in zip(inputs, ins)}
    cur, adds, relu, post = None, [], False, []
    for node in members:
        xs = node.inputs
        if node.outputs[0].dtype != pout.dtype or len(xs) not in (1, 2):
            return False
        if cur is None:   # the first operation reads P (once, as the whole view)
            firsts = [i for i, t in enumerate(xs) if id(t) in views and views[id(t)].buf == pout.buf]
            if len(firsts) != 1:
                return False
            pv = views[id(xs[firsts[0]])]
            if pv.offset != pout.offset or tuple(pv.shape) != full or row_stride(pv) != m:
                return False
            pos = firsts[0]
        else:
            if sum(t is cur for t in xs) != 1:
                return False
            pos = 0 if xs[0] is cur else 1
        v = views.get(id(xs[1 - pos])) if len(xs) == 2 else None
        if len(xs) == 2 and (v is None or v.buf in (pout.buf, outs[0].buf) or v.dtype != pout.dtype):
            return False
        sr = row_stride(v) if v is not None and v.literal is None else None
        op = node.op
        if op is E.relu.op and len(xs) == 1:
            if post or relu:
                post.append(("relu", None, 0, None))
            else:
                relu = True
        elif op is E.add.op and len(xs) == 2 and not relu and not post and sr is not None:
            adds.append((v, sr))   # the tiles start from the addends' sum
        elif op in (E.add.op, E.sub.op) and len(xs) == 2 and sr is not None:
            post.append(("add" if op is E.add.op else "sub" if pos == 0 else "rsub", v, sr, None))
        elif op is E.mul.op and len(xs) == 2 and v.literal is not None and _scalar(v.literal):
            post.append(("mul", None, 0, literal(float(v.literal), pout.dtype)))
        else:
            return False
        cur = node.outputs[0]
    if cur is None or outputs[0] is not cur:
        return False
    o = outs[0]
    if broadcast_strides(o, full) != contig_strides(full):
        return False
    o2 = View(o.buf, o.offset, (n, m), (m, 1), o.dtype)
    fold = (adds, relu, tuple(post))
    kern = gemm.matmul(o2, a, b, blas="tiles", threads=threads, packed=packed, fold=fold, pack=pack)
    plan.pop_step()
    plan.add(kern, [a, b] + gemm.fold_operands(fold) + kern.pack_source, [o] + ([b] if pack is not None else []))
    return True


def _scalar(x) -> bool:
    """A literal that is a number (not an expression over the graph's dims)."""
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def _outer_reads(plan, inputs, ins, buf: int) -> int:
    """Reads, in the graph around the fused node being planned, of the tensors that the region's inputs on
    `buf` stand for (a body's placeholders): by the graph's nodes and as its roots. A fused body's region
    knows which of its inputs its own later nodes read; a product planned outside the body may also be
    read by other nodes or returned. (The graph's read counts are counted once a plan.)"""
    node = getattr(plan, "_node", None)
    body = node.attrs.get("body") if node is not None else None
    if body is None:
        return 0
    counts = getattr(plan, "_fold_reads", None)
    if counts is None:
        from collections import Counter
        g = plan.graph
        counts = Counter(id(t) for n in g.nodes for t in n.inputs)
        counts.update(id(t) for t in g.roots)
        plan._fold_reads = counts
    places = {id(ph): i for i, ph in enumerate(body.inputs)}
    return sum(counts[id(node.inputs[places[id(t)]])] for t, v in zip(inputs, ins)
               if v.buf == buf and id(t) in places)
