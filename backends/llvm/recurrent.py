"""A small matrix product and the elementwise region reading it, as one kernel split over the pool.

A recurrent cell's step is a product P = h @ W (n x G*H: the G gates of H hidden units side by side) and
one elementwise region that reads P by column windows P[:, g*H:(g+1)*H] (with the step's input
projection, the bias and the cell state) and writes (n, H) results. Planned apart they are two kernels:
the product split over the pool by column blocks, then the gate loop on one thread, its reads of P
coming from the other core's cache. Here the hidden units are cut into blocks of `hb` (a multiple of the
vector width); a block is the unit the pool's threads claim, and owns every gate's columns of its units:
it computes those columns of P with the register-tiled micro-kernel (gemm.gemm_block) and then runs the
region on its units, P's columns still in registers' reach (L1). One dispatch per step instead of two,
the gates split over the threads too, no pass over P from another core.

The same shape covers any small product whose whole output feeds such a region (one window of width m:
an RNN's tanh(h @ W + x_t + b), a Dense layer's bias and activation). The fusion is made at plan time
(Plan._region) when the step planned just before the region is the micro-kernel product (gemm.matmul with
blas="tiles", no batch) and the region reads P only through windows that tile P's columns exactly; the
product is still written whole, so a later reader of P sees it complete."""
from __future__ import annotations

from . import gemm
from .epilogue import region_block
from .kernels import Kernel
from ..schedule.views import View, broadcast_strides

#: GRAPHC_LLVM_FUSE_EPILOGUE=1 plans the product and its region as one kernel; off by default: on the
#: 2-core Zen 2 it was measured on (a shared, loaded machine; in-process A/B, min of 12 x 10 calls) it did
#: not pay against the two kernels with the 6 x 2 tiles: W4 1.98 ms fused vs 1.96 two kernels, W9 4.96
#: vs 4.88 (the gates split over both threads save ~4 us a step in theory; the carries and outputs then
#: move between the cores every step). Measured again (2026-12-04) after the region became one loop nest
#: per thread's run of blocks (one thread: W4 CPU time ~2.32 -> ~2.1 ms, about the two kernels' 2.08) and
#: the scan's carries were computed in place (c in the fused kernel; h still copied: other blocks read
#: it): on the same machine, under other processes' load (2-6 on 2 cores), fused against two kernels was
#: 1.88 vs 1.97 ms (best of ~150 interleaved samples) but 2.76 vs 2.53 ms (median) under load (a worker that holds
#: its one run of blocks and is descheduled stalls the step). Kept (tested) for hosts where it pays.
ENV = "GRAPHC_LLVM_FUSE_EPILOGUE"


def _enabled() -> bool:
    import os
    return os.environ.get(ENV, "0") == "1"


def block_shape(dtype: str, H: int, threads: int) -> tuple[int, int]:
    """(hb hidden units per block, vectors per tile): two vectors (tile_rows rows: 6 on AVX2), fewer
    when the units would make fewer blocks than two per thread."""
    lanes = gemm.vector_shape(dtype)[0]
    nv = 2
    if nv > 1 and -(-H // (nv * lanes)) < 2 * threads and H > lanes:
        nv = 1
    return nv * lanes, nv


def fuse_epilogue(plan, outs: list[View], ins: list[View], compute, parallel: bool) -> bool:
    """Replace the product planned last (plan.steps[-1]) and the region (outs = compute(ins), per element
    over outs[0].shape) by one kernel when the region reads the product by exact column windows; True
    when done (the caller adds nothing), False to plan the region on its own. `parallel`: the region
    alone would have been split over the pool."""
    if not plan.steps:
        return False
    prev = plan.steps[-1]
    if not _enabled():
        return False
    tiles = getattr(prev, "tiles", None)
    if tiles is None:
        return False
    p, a, b = tiles
    full = tuple(outs[0].shape)
    if len(full) != 2 or len(p.shape) != 2 or p.shape[0] != full[0] or p.strides != (p.shape[1], 1):
        return False
    n, H = full
    m = p.shape[1]
    if H < 1 or n < 1 or m % H:
        return False
    offsets = set()
    for v in ins:
        if v.buf != p.buf:
            continue
        if v.literal is not None or tuple(v.shape) != full or broadcast_strides(v, full) != (m, 1):
            return False
        c = v.offset - p.offset
        if c % H or not 0 <= c <= m - H:
            return False
        offsets.add(c)
    if sorted(offsets) != list(range(0, m, H)):
        return False
    # the region's outputs are fresh buffers: they must not be the product's operands or the product
    if any(o.buf in (p.buf, b.buf) for o in outs) or any(tuple(o.shape) != full for o in outs):
        return False
    # an output over the product's left operand (a scan computing a new carry in its own buffer: h_new over
    # h) would be written while another block still reads it: it gets a fresh buffer (the scan then copies it)
    for i, o in enumerate(outs):
        if o.buf == a.buf:
            outs[i] = plan.fresh(None, full, o.dtype)
    from . import tune
    threads = tune.threads()
    hb, nv = block_shape(p.dtype, H, threads)
    nfull, tail = divmod(H, hb)
    nblocks = nfull + (1 if tail else 0)
    outer_p = prev.split is not None or parallel
    split = nblocks if outer_p and nblocks >= 2 and threads > 1 else None
    k = a.shape[-1]
    views = outs + ins

    def region(em, P, c0, w):
        """The region on columns c0 .. c0+w-1 of every (n, H) operand (w an int or an i64 IR value)."""
        region_block(em, P, outs, ins, compute, full, "0", n, c0, w)

    def products(em, P, c0, w: int):
        for c in sorted(offsets):
            j0 = em(f"add i64 {c0}, {c}") if c else c0
            gemm.gemm_block(em, P, p, a, b, a.offset, b.offset, p.offset, n, k, m, j0, w, nv)

    def emit(em, P, lo, hi):
        # a run of blocks: every block's products first, then the region over the run's units at once
        # (one loop nest per run: its inner loop spans the run's units, not one block's)
        top = em(f"select i1 {em(f'icmp slt i64 {hi}, {nfull}')}, i64 {hi}, i64 {nfull}")
        if nfull:
            em.loop(top, lambda blk: products(em, P, em(f"mul i64 {blk}, {hb}"), hb), start=lo)
        if tail:
            em.if_(em(f"icmp sgt i64 {hi}, {nfull}"), lambda: products(em, P, str(nfull * hb), tail))
        c0 = em(f"mul i64 {lo}, {hb}")
        end = em(f"mul i64 {hi}, {hb}")
        c1 = em(f"select i1 {em(f'icmp slt i64 {end}, {H}')}, i64 {end}, i64 {H}")
        em.if_(em(f"icmp slt i64 {c0}, {c1}"), lambda: region(em, P, c0, em(f"sub i64 {c1}, {c0}")))

    # the product's FLOPs (as the GEMM step counted them); explain adds the region's from its node
    kern = Kernel("matmul_epilogue", [p, a, b] + views, emit, split, 2 * n * k * m, nblocks)
    kern.threads = threads if split else None
    kern.per_element = 2   # reads past the product's operands: element i for output element i (plan._scan)
    if split:   # one run of blocks per thread: a thread keeps the same hidden units (and their cell
        kern.chunks = threads   # state) from step to step (8 dynamic chunks measured ~4% slower on W4)
    plan.pop_step()
    plan.add(kern, [a, b] + ins, [p] + outs)
    return True
