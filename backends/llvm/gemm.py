"""Matrix products: CBLAS sgemm/dgemm (gemv for a single row or column) called from the generated code,
looping over broadcast batch dims; a pure-LLVM loop GEMM for integers or when no BLAS was found."""
from __future__ import annotations

import numpy as np

from . import jit
from .irtext import VTYPE, literal
from .kernels import Kernel, guarded, load, nest, ptr_at, store
from ..schedule.views import View, broadcast_strides, contig_strides

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def blas_layout(v: View):
    """(trans flag, leading dim) for a matrix view BLAS can read in place, else None."""
    r, c = v.shape[-2], v.shape[-1]
    sr, sc = v.strides[-2], v.strides[-1]
    if (sc == 1 or c == 1) and (r == 1 or sr >= max(1, c)):
        return NO_TRANS, max(sr if r > 1 else c, c, 1)
    if (sr == 1 or r == 1) and (c == 1 or sc >= max(1, r)):
        return TRANS, max(sc if c > 1 else r, r, 1)
    return None


def declarations() -> str:
    b = jit.blas()
    it = "i64" if b is None or b["ilp64"] else "i32"
    out = []
    for p, ty in (("s", "float"), ("d", "double")):
        out.append(f"declare void @gc_cblas_{p}gemm(i32, i32, i32, {it}, {it}, {it}, {ty}, ptr, {it}, ptr, {it}, "
                   f"{ty}, ptr, {it})")
        out.append(f"declare void @gc_cblas_{p}gemv(i32, i32, {it}, {it}, {ty}, ptr, {it}, ptr, {it}, {ty}, "
                   f"ptr, {it})")
    from . import tune
    if tune.set_threads_symbol() is not None:   # OpenBLAS's thread count for one call (tune.py)
        out.append("declare i32 @gc_blas_set_threads(i32)")
    return "\n".join(out) + "\n" + vector_declarations()


def use_blas(a: View, b: View, out: View) -> bool:
    return jit.blas() is not None and out.dtype in ("float32", "float64") and a.dtype == b.dtype == out.dtype


#: GEMMs with at most this many multiply-adds per product (and more than one row) run the register-blocked
#: vector micro-kernel below instead of BLAS: for the LSTM step (16x128x512) and LeNet's convolutions
#: (6x25x784, 16x150x100) BLAS's per-call set-up and thread hand-off cost more than the arithmetic.
#: GRAPHC_LLVM_SMALL_GEMM=0 always calls BLAS, =1 uses the micro-kernel for every float product.
SMALL_MACS = 1 << 22
#: batched micro-kernel products of at least GRAPHC_LLVM_PARALLEL_FLOPS flops split their batch over the
#: pool (attention's per-head products). Was off while each split started its own threads (LeNet's second
#: convolution, 31 MFLOP over 64 images, measured 1.2x slower than one thread at load 6-8); the pool's
#: hand-off costs about a microsecond and a busy worker leaves its chunks to the caller
PARALLEL_FLOPS = 1 << 21


def _parallel_flops() -> int:
    import os
    return int(os.environ.get("GRAPHC_LLVM_PARALLEL_FLOPS", PARALLEL_FLOPS))


def vector_shape(dtype: str) -> tuple[int, int, tuple]:
    """(lanes per vector, vectors per tile row, candidate tile row counts) for this target (tune.isa():
    the host's, or GRAPHC_LLVM_ISA's)."""
    from . import tune
    kind = tune.isa()
    wide = kind == "avx512"
    lanes = (16 if wide else 4 if kind == "sse" else 8) // (2 if dtype == "float64" else 1)
    # 4 vectors x 6 rows: 24 accumulators + 4 b vectors + a broadcast fill the 32 AVX-512 registers
    # (measured on W4 against 3x8, 2x12, 4x4 and 4x5: best or equal); AVX2: 2 vectors x 6 rows, 12
    # accumulators (enough to cover the FMA latency on two pipes: 4 x 2 ran the LSTM step's 16x128x512
    # product at ~70 GFLOP/s on Zen 2, 6 x 2 at ~85; 4 x 3 measured equal, but leaves ragged column blocks)
    nv = 4 if wide else 2
    return lanes, nv, tile_rows(nv, dtype)


def small(a: View, b: View, min_rows: int = 2) -> bool:
    """Use the vector micro-kernel (gemm_tiles) for a @ b rather than BLAS (min_rows=1: also single-row
    products, e.g. a depthwise convolution's per-channel product, where BLAS would be one gemv call each)."""
    import os
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    mode = os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto")
    if a.dtype not in ("float32", "float64") or mode == "0":
        return False
    if mode == "1" or jit.blas() is None:
        return True
    return n >= min_rows and m >= 8 and n * k * m <= SMALL_MACS


#: a product whose right operand is a weight (a parameter or constant, packed once: Plan._packed_tiles) with
#: at most this many multiply-adds runs the micro-kernel over the packed panels rather than BLAS, which packs
#: both operands again every call (each block of a split product its own copy). Measured on the 2-core
#: Zen 1 VM (x @ W, 2 threads, in-process medians against graphc's split OpenBLAS calls): 64x256x1024 0.73x,
#: 64x256x768 0.74x, 64x1024x256 0.75x, 128x256x2048 0.69x, 256x784x512 0.76x, 512x784x512 0.81x,
#: 256x512x256 0.90x, 64x400x120 0.81x, 16x256x256 0.69x; from 1024 rows BLAS is as fast or faster
#: (1024x784x512 0.96-1.02x, 1024^3 0.86-1.14x: the micro-kernel reads all of a once per panel)
PACKED_MACS = 1 << 28
#: ... and a weight of at most this many bytes (the packed copy lives beside it for the function's life:
#: a language model's 100+ MB matrices are left to BLAS rather than held twice)
PACKED_BYTES = 1 << 26


def packs(a: View, b: View) -> bool:
    """Use the micro-kernel over b packed in panels for a @ b, b a weight (plan._packed_tiles): float, at
    least two rows and eight columns, at most PACKED_MACS and PACKED_BYTES, and enough column blocks for the
    threads where the product is split (one 16-column block of a (256 x 256) @ (256 x 10) product would run
    on one core: BLAS splits its rows, 60 against 97 us). GRAPHC_LLVM_SMALL_GEMM=0: never; =1: whatever the
    size."""
    import os
    from . import tune
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    mode = os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto")
    if a.dtype not in ("float32", "float64") or a.dtype != b.dtype or mode == "0" or n < 2 or m < 8 or k < 1:
        return False
    if mode == "1" or jit.blas() is None:
        return True
    threads = tune.threads()
    return (n * k * m <= PACKED_MACS and k * m * np.dtype(b.dtype).itemsize <= PACKED_BYTES
            and (threads == 1 or 2 * n * k * m < tune.TILES_PARALLEL_FLOPS
                 or tile_blocks(m, a.dtype, n) >= 2 * threads))


def gemv_ok(a: View, b: View, out: View) -> bool:
    """Use graphc's matrix-vector loop (gemv) for a @ b: float, n == 1 or m == 1, a vector of at least two
    outputs or k. Not when GRAPHC_LLVM_SMALL_GEMM forces BLAS (0) or the micro-kernel (1) for every product,
    nor with GRAPHC_LLVM_GEMV=0."""
    import os
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    if os.environ.get("GRAPHC_LLVM_GEMV", "1") == "0" or os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto") != "auto":
        return False
    if not (n == 1 or m == 1):
        return False
    return a.dtype in ("float32", "float64") and a.dtype == b.dtype == out.dtype and k >= 1


def matmul(out: View, a: View, b: View, blas: bool | str | None = None, threads: int | None = None,
           packed: bool = False, fold=None, pack: Kernel | None = None) -> Kernel:
    """out (contiguous, batch..., n, m) = a (..., n, k) @ b (..., k, m); BLAS needs blas_layout(a/b);
    blas="tiles": the vector micro-kernel (b's rows contiguous, or `packed`: b is the (k, m) view of
    pack_panels' buffer, no batch); blas="gemv": graphc's matrix-vector loop
    (n == 1 or m == 1, gemv_form(a, b) not None). `threads` (BLAS products; None: tune.blas_threads by the
    product's size): the threads the product is split over. Above one, a single product (n, m > 1) is cut
    into blocks of rows or columns (split_blocks), each one OpenBLAS call on one thread, and the blocks run
    on graphc's pool (program._parallel_call); a batch of products splits its batch the same way. OpenBLAS
    runs on one thread per call (its own threads only where its count cannot be set per call). A micro-kernel
    product splits its column blocks over the pool (tile_chunks), or parts of its rows (row_parts). `fold`
    (the micro-kernel, one product): gemm_tiles' addends, ReLU and later operations, out = their region's
    result. `pack` (a
    packed product): the pack_panels(split=True) kernel writing b's panels from the source operand, run
    inside this kernel: each run of column blocks packs its own panels just before its tiles read them
    (a product packed every call: the packing of one thread overlaps the other's arithmetic, and its
    panels are in its cache when its tiles start)."""
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    bshape = out.shape[:-2]
    ast = broadcast_strides(View(a.buf, 0, a.shape[:-2], a.strides[:-2], a.dtype), bshape)
    bst = broadcast_strides(View(b.buf, 0, b.shape[:-2], b.strides[:-2], b.dtype), bshape)
    ost = contig_strides(bshape + (n * m,))[:-1] if bshape else ()
    while bshape and bshape[0] == 1:   # leading batch dims of one: no loop for them (the offsets stay)
        bshape, ast, bst, ost = bshape[1:], ast[1:], bst[1:], ost[1:]
    blas = use_blas(a, b, out) if blas is None else blas
    it = "i64" if jit.blas() is None or jit.blas()["ilp64"] else "i32"
    flops = 2 * n * k * m * max(1, int(np.prod(bshape)))
    if blas is True and threads is None:
        from . import tune
        threads = tune.blas_threads(2 * n * k * m)
    form = gemv_form(a, b) if blas == "gemv" else None
    if blas == "gemv" and form is None:
        raise ValueError("gemv needs n == 1 or m == 1 and a unit stride")
    from . import tune
    # one matrix-vector product (no batch) of enough work: its output blocks split across threads
    par = bool(form) and not bshape and gemv_split(n, k, m)
    blocks = gemv_blocks(form, n, m, par) if form else 0
    pool_ok = tune.threads() > 1
    # a BLAS product split over the pool: ("rows" | "cols", block width, extent, blocks); OpenBLAS then runs
    # on one thread per call (pinned around the whole dispatch too: program._parallel_call, blas_pinned)
    pinnable = blas is True and tune.set_threads_symbol() is not None
    blas_split = (split_blocks(n, m, threads, out.dtype) if pinnable and not bshape and pool_ok and threads
                  and threads > 1 and n > 1 and m > 1 else None)
    batch_split = bool(pinnable and bshape and bshape[0] >= 2 and pool_ok and threads and threads > 1)
    # OpenBLAS's own threads only where its count cannot be set per call (then it chooses anyway)
    blas_threads = 1 if pinnable else threads
    # one micro-kernel product (no batch) of enough work: its blocks of columns split across the pool
    tile_split = (blas == "tiles" and not bshape and pool_ok and flops >= tune.TILES_PARALLEL_FLOPS
                  and tile_blocks(m, out.dtype, n) >= 2)
    # ... or its rows, where its columns make too few chunks (row_parts)
    parts = row_parts(n, m, out.dtype, tune.threads()) if tile_split and packed and pack is None else None

    if packed and (blas not in ("tiles", "gemv") or bshape):
        raise ValueError("a packed right operand is read by the micro-kernel or the GEMV, one product (no batch)")
    if packed and blas == "gemv" and (form is None or form["kind"] != "axpy" or form["vec"] != "a"):
        raise ValueError("a packed GEMV matrix is x @ W's W")
    if fold is not None and (blas != "tiles" or bshape):
        raise ValueError("a folded region is the micro-kernel's, one product (no batch)")
    if pack is not None and (not packed or form or bshape):
        raise ValueError("a packing run inside the product needs b as its packed view, one product")
    fold_views = fold_operands(fold)
    pack_views = list(pack.views[1:]) if pack is not None else []   # the packing's source (its dst is b's buffer)
    key = ("matmul", blas, it, blas_threads, blas_split, tile_split, parts, par, blocks, repr(form), bshape, ast, bst, ost,
           packed, None if fold is None else (tuple(sr for _, sr in fold[0]), bool(fold[1]),
                                              tuple(op[:1] + op[2:] for op in fold[2])),
           None if pack is None else pack.key)

    def packing(em, P, lo, hi):   # the panels of column blocks lo .. hi-1 (all: "0", pack.outer)
        if pack is not None:
            pack.emit(em, P, lo, hi)

    def one(em, P, offs, lo=None, hi=None):
        ao, bo, oo = offs
        if k == 0:
            nbytes = n * m * np.dtype(out.dtype).itemsize
            guarded(em, [(out, oo, n * m - 1)], lambda: em.raw(
                f"call void @llvm.memset.p0.i64(ptr {ptr_at(em, P, out, oo)}, i8 0, i64 {nbytes}, i1 false)"))
        elif form:
            gemv(em, P, out, a, b, ao, bo, oo, n, k, m, form, "0" if lo is None else lo,
                 blocks if hi is None else hi, par, packed)
        elif blas == "tiles" and parts:
            rp = parts[0]

            def part(i, rows: int):   # rows i*rp .. i*rp+rows-1, every column
                r0 = em(_imul(i, rp))
                gemm_tiles(em, P, out, a, b, em(f"add i64 {ao}, {em(_imul(r0, a.strides[-2]))}"), bo,
                           em(f"add i64 {oo}, {em(_imul(r0, m))}"), rows, k, m, packed=packed, fold=fold, row0=r0)
            last = n - (parts[1] - 1) * rp
            if last == rp:
                em.loop(hi, lambda i: part(i, rp), start=lo)
            else:
                top = em(f"select i1 {em(f'icmp slt i64 {hi}, {parts[1] - 1}')}, i64 {hi}, i64 {parts[1] - 1}")
                em.loop(top, lambda i: part(i, rp), start=lo)
                em.if_(em(f"icmp eq i64 {hi}, {parts[1]}"), lambda: part(str(parts[1] - 1), last))
        elif blas == "tiles":
            gemm_tiles(em, P, out, a, b, ao, bo, oo, n, k, m, (lo, hi) if tile_split else None, packed=packed,
                       fold=fold)
        elif blas:
            _blas_call(em, P, out, a, b, ao, bo, oo, n, k, m, it, blas_threads,
                       (*blas_split, lo, hi) if blas_split else None)
        else:
            _loop_gemm(em, P, out, a, b, ao, bo, oo, n, k, m)

    if form and not bshape:
        def emit_gemv(em, P, lo, hi):
            if out.size:
                one(em, P, (a.offset, b.offset, out.offset), lo, hi)
        split = blocks if par and blocks >= 2 else None
        kern = Kernel("gemv", [out, a, b], emit_gemv, split, flops, blocks)
        kern.key, kern.packed = key, packed
        kern.threads = split and tune.threads()
        width = gemv_block(form, par) if form["kind"] == "axpy" else GEMV_DOTS
        kern.product = (out, a, b, ("cols" if form["vec"] == "a" else "rows", width, form["L"]))
        return kern

    if blas_split or tile_split:   # one product cut into blocks (of rows or columns): the kernel's outer range
        nblk = blas_split[3] if blas_split else parts[1] if parts else tile_blocks(m, out.dtype, n)

        def emit_blocks(em, P, lo, hi):
            if out.size:
                packing(em, P, lo, hi)
                one(em, P, (a.offset, b.offset, out.offset), lo, hi)
        kern = Kernel("matmul", [out, a, b] + fold_views + pack_views, emit_blocks, nblk, flops, nblk)
        kern.key, kern.packed = key, packed
        if blas_split:   # one OpenBLAS call per block: as many blocks as threads (each call packs its operands)
            kern.chunks, kern.blas_pinned = nblk, True
            kern.product = (out, a, b, blas_split[:3])
        elif k and parts:   # its parts of rows, one chunk each (a region after it may join it by rows)
            kern.product = (out, a, b, ("rows", parts[0], n))
            kern.chunks = parts[1]
        elif k:          # a micro-kernel product: an elementwise region after it may join it (epilogue.py;
            if not packed:   # recurrent.py's column windows read b's own rows)
                kern.tiles = (out, a, b)
            kern.product = (out, a, b, ("cols", tile_vectors(n, out.dtype)[0] * vector_shape(out.dtype)[0], m))
            kern.chunks = tile_chunks(nblk, tune.threads())
        kern.threads = tune.threads()
        kern.pack_source = pack_views
        _foldable(kern, out, a, b, blas, threads, packed, fold, k, pack)
        return kern

    def emit(em, P, lo, hi):
        if out.size:
            packing(em, P, "0", str(pack.outer) if pack is not None else "0")
            nest(em, bshape, [ast, bst, ost], [a.offset, b.offset, out.offset], lambda offs, _: one(em, P, offs),
                 lo if bshape else None, hi)
    # a batch of products splits its batch across the pool: BLAS ones when tuned/ruled parallel, micro-kernel
    # ones (convolution over images) from GRAPHC_LLVM_PARALLEL_FLOPS
    split = (bshape[0] if batch_split or (blas == "tiles" and bshape and bshape[0] >= 2 and pool_ok
                                         and flops >= _parallel_flops()) else None)
    kern = Kernel("gemv" if form else "matmul", [out, a, b] + fold_views + pack_views, emit, split, flops,
                  bshape[0] if bshape else 0)
    kern.key = key   # (with the views: kernels.memo_key) what the text depends on
    kern.packed = packed   # b is pack_panels' copy of a weight
    kern.blas_pinned = batch_split
    kern.threads = tune.threads() if split else (threads if blas is True else None)
    if blas == "tiles" and not bshape and k and not packed:   # a region after it may join it (recurrent.py)
        kern.tiles = (out, a, b)
    if not bshape and not split:   # one product written whole: its region may run after it (epilogue.py)
        kern.product = (out, a, b, None)
    kern.pack_source = pack_views
    if not bshape:
        _foldable(kern, out, a, b, blas, threads, packed, fold, k, pack)
    return kern


def fold_operands(fold) -> list[View]:
    """The views a folded region reads (gemm_tiles' `fold`): its addends, then its later operands."""
    if fold is None:
        return []
    return [v for v, _ in fold[0]] + [op[1] for op in fold[2] if op[1] is not None]


def _post(em, P, ops, val: str, vt: str, lanes: int, live: int, row, col) -> str:
    """A folded region's operations after the product (gemm_tiles' fold[2]) on one vector `val` of the
    product at product row `row` (i64), columns from `col`: each op (kind, view, row stride, literal):
    "mul" by the literal, "add" / "sub" (val - view) / "rsub" (view - val) of the view's vector, "relu"."""
    for kind, v, sr, lit in ops:
        if kind == "relu":
            val = em(f"select {mask_type(vt)} {em(f'fcmp olt {vt} {val}, zeroinitializer')}, "
                     f"{vt} zeroinitializer, {vt} {val}")
            continue
        if kind == "mul":
            ty = vt.split(" x ")[1].rstrip(">")
            x = em(f"shufflevector {vt} {em(f'insertelement {vt} poison, {ty} {lit}, i64 0')}, {vt} poison, "
                   f"<{lanes} x i32> zeroinitializer")
            val = em(f"fmul {vt} {val}, {x}")
            continue
        at = em(f"add i64 {em(f'add i64 {v.offset}, {em(_imul(row, sr))}')}, {col}")
        x = vload(em, P, v, at, vt, lanes, live)
        val = em(f"fadd {vt} {val}, {x}" if kind == "add" else f"fsub {vt} {val}, {x}" if kind == "sub"
                 else f"fsub {vt} {x}, {val}")
    return val


def _foldable(kern: Kernel, out: View, a: View, b: View, blas, threads, packed: bool, fold, k: int,
              pack: Kernel | None = None) -> None:
    """Mark a micro-kernel product whose region may fold into it (epilogue.fold: kern.fold_args, how to
    build it again); a folded one is no plain product any more: no region joins it after."""
    if fold is not None:
        for attr in ("product", "tiles"):
            if hasattr(kern, attr):
                delattr(kern, attr)
        kern.folded = True
        return
    if blas == "tiles" and k > 0:
        kern.fold_args = (out, a, b, threads, packed, pack)


#: blocks per thread a split BLAS product is cut into (each block is one OpenBLAS call that packs its own
#: copy of the shared operand: more blocks balance a late thread better but pack more)
BLAS_BLOCKS_PER_THREAD = 1


def split_blocks(n: int, m: int, threads: int, dtype: str) -> tuple | None:
    """How a BLAS product (n x k) @ (k x m) is cut for `threads` threads: ("rows" | "cols", block width,
    extent, blocks), or None when it cannot be cut in two. Along the longer of n and m (each block's call
    packs the whole other operand: A (n x k) for a column block, B (k x m) for a row block, so the cut
    duplicates the smaller one); column blocks are whole cache lines of the output's rows."""
    axis, L = ("rows", n) if n >= m else ("cols", m)
    align = 4 if axis == "rows" else max(1, 64 // np.dtype(dtype).itemsize)
    w = -(-L // max(1, threads * BLAS_BLOCKS_PER_THREAD))
    w = -(-w // align) * align
    blocks = -(-L // w)
    return (axis, w, L, blocks) if blocks >= 2 else None


def tile_blocks(m: int, dtype: str, n: int | None = None) -> int:
    """Column blocks of the micro-kernel (gemm_tiles) for an (n x m) output (the last one partial)."""
    lanes = vector_shape(dtype)[0]
    nv = tile_vectors(n, dtype)[0]
    return -(-m // (lanes * nv))


#: a product whose b is packed every call (plan._packed_per_call) packs it inside the product kernel, each run
#: of column blocks its own panels just before its tiles (False: a packing step of its own before it)
PACK_INSIDE = True


def packs_inside(n: int, k: int, m: int, dtype: str, threads: int) -> bool:
    """Whether a product packed every call packs inside its kernel (PACK_INSIDE): not where its split is
    by parts of rows (row_parts), whose parts each read every panel: the packing is then a step of its own
    before it (W9's weight gradient 512 x 800 x 128 cut by columns read all 1.6 MB of a on each thread;
    in-process A/B on the Intel Xeon, W9 2,303 -> 2,227 us)."""
    from . import tune
    split = threads > 1 and 2 * n * k * m >= tune.TILES_PARALLEL_FLOPS and tile_blocks(m, dtype, n) >= 2
    return PACK_INSIDE and not (split and row_parts(n, m, dtype, threads))


#: a micro-kernel product split by column blocks is cut into chunks of at least this many blocks (at most
#: program.CHUNKS_PER_THREAD chunks a thread, at least one): every chunk reads all of a again (its blocks of
#: rows pass over the chunk's columns), so small chunks multiply a's traffic. In-process A/B on the Intel Xeon
#: (2 threads): 1024 x 256 x 768 (12 blocks) 1.27 -> 1.09 ms as one chunk a thread instead of 4 (1 or 2
#: blocks each); W7 b16 5.39 -> 4.98 ms (best 5.08 -> 4.69); W6 (16 blocks) even with 4 chunks of 4 (6.11 ms
#: against 5.81 with 2 of 8: one late thread leaves the other nothing to take); W1, W3, W5, W9, W10 even
TILE_BLOCKS_PER_CHUNK = 4


#: a split micro-kernel product over packed panels with fewer column blocks than threads x this is cut into
#: parts of its rows instead (row_parts): each thread then reads its part of a once, and every panel (few:
#: they stay in its L2), where cut by columns each thread read all of a (W7's 1024 x 1024 @ 1024 x 256 and
#: 1024 x 256 @ 256 x 256). In-process A/B on the Intel Xeon: W7 b16 5.28 -> 5.08 ms
ROW_SPLIT_BLOCKS = 4


def row_parts(n: int, m: int, dtype: str, threads: int) -> tuple | None:
    """(rows a part, parts) for a micro-kernel product of n rows split by its rows, or None: by columns.
    Two parts a thread (a late thread leaves one to the other), each a whole number of tile heights."""
    # by columns each of the t threads reads all of a and its part of b, by rows (2t parts) its part of a and
    # all of b: rows pay where a is the larger by n (t - 1) > m (2t - 1) (W7 b1's 64 rows read more panels)
    if (threads < 2 or tile_blocks(m, dtype, n) >= threads * ROW_SPLIT_BLOCKS
            or n * (threads - 1) <= m * (2 * threads - 1)):
        return None
    nv, rows = tile_vectors(n, dtype)
    mr = _row_tile(n, rows)
    per = -(-n // (2 * threads))      # two parts a thread, rounded up to whole tile heights
    rp = -(-per // mr) * mr
    count = -(-n // rp)
    last = n - (count - 1) * rp
    # every part's tiles as wide as the panels (packed for n rows: panel_width), AVX2's few-row tiles differ
    if count < 2 or tile_vectors(rp, dtype)[0] != nv or tile_vectors(last, dtype)[0] != nv:
        return None
    return rp, count


def tile_chunks(blocks: int, threads: int) -> int:
    """Pool chunks for a micro-kernel product of `blocks` column blocks split over `threads`."""
    from .program import CHUNKS_PER_THREAD
    per = max(1, min(CHUNKS_PER_THREAD, blocks // max(1, threads * TILE_BLOCKS_PER_CHUNK)))
    return max(1, threads) * per


#: accumulators a tile needs to keep both FMA pipes busy (FMA latency 5 cycles x 2 pipes on Zen 2 / Skylake)
LATENCY_ACCUMULATORS = 10


def tile_vectors(n: int | None, dtype: str) -> tuple[int, tuple]:
    """(vectors per tile row, candidate tile heights) for an n-row product: vector_shape's, unless its
    tiles for n rows would hold fewer than LATENCY_ACCUMULATORS accumulators and one vector more holds
    more (AVX2, 8 rows: two 4 x 2 tiles, 8 accumulators -> two 4 x 3 tiles, 12: an LSTM step's
    8 x 128 x 512 product, one thread of a 2-core Zen 2, 14.6 -> 11.8 us; 2, 3, 4 and 7 rows 10-25% faster;
    6, 12, 16 and 24 rows keep 6 x 2 tiles: 4 x 3 measured 7-12% slower there)."""
    from . import tune
    lanes, nv, rows = vector_shape(dtype)
    if n is None or n < 1 or tune.isa() == "avx512":   # (AVX-512's 4-vector tiles: not measured, kept)
        return nv, rows

    def least(v: int, r: tuple) -> int:   # accumulators of the lowest tile when n rows are cut into tiles
        mr = _row_tile(n, r)
        return (n // -(-n // mr)) * v
    if least(nv, rows) >= LATENCY_ACCUMULATORS:
        return nv, rows
    more = tile_rows(nv + 1, dtype)
    # not when it needs more row tiles (each one more pass over b's columns: 9 rows as three 3 x 3 tiles
    # measured 11% slower than 5 x 2 and 4 x 2)
    if least(nv + 1, more) > least(nv, rows) and -(-n // _row_tile(n, more)) <= -(-n // _row_tile(n, rows)):
        return nv + 1, more
    return nv, rows


def _blas_call(em, P, out, a, b, ao, bo, oo, n, k, m, it, threads=None, block=None):
    """One CBLAS call computing out = a @ b; `block` = (axis, width, extent, blocks, lo, hi): only the
    rows (or columns) of blocks lo .. hi-1 (split_blocks), the operands' pointers moved to the block."""
    ty, p = VTYPE[out.dtype], "s" if out.dtype == "float32" else "d"
    one, zero = literal(1.0, out.dtype), literal(0.0, out.dtype)
    ta, lda = blas_layout(a)
    tb, ldb = blas_layout(b)

    def mat(trans, rows, cols, ld):   # last element offset BLAS touches in a row-major (trans) operand
        return (rows - 1) * ld + cols - 1 if trans == NO_TRANS else (cols - 1) * ld + rows - 1
    # sanitize="bounds" checks the whole product's extents (a block lies inside them)
    full = [(a, ao, mat(ta, n, k, lda)), (b, bo, mat(tb, k, m, ldb)), (out, oo, (n - 1) * m + m - 1)]
    dims = {"n": n, "m": m}
    if block is not None:
        axis, w, L, _, lo, hi = block
        i0 = em(f"mul i64 {lo}, {w}")
        i1 = em(f"mul i64 {hi}, {w}")
        i1 = em(f"select i1 {em(f'icmp slt i64 {i1}, {L}')}, i64 {i1}, i64 {L}")
        cnt = em(f"sub i64 {i1}, {i0}")
        cnt = em(f"trunc i64 {cnt} to i32") if it == "i32" else cnt
        if axis == "rows":
            ao = em(f"add i64 {ao}, {em(f'mul i64 {i0}, {lda if ta == NO_TRANS else 1}')}")
            oo = em(f"add i64 {oo}, {em(f'mul i64 {i0}, {m}')}")
            dims["n"] = cnt
        else:
            bo = em(f"add i64 {bo}, {em(f'mul i64 {i0}, {1 if tb == NO_TRANS else ldb}')}")
            oo = em(f"add i64 {oo}, {i0}")
            dims["m"] = cnt
    # the call's arguments with {A}, {B}, {C} for the operand pointers (emitted inside the guard)
    if n == 1 and a.strides[-1] > 0:      # row vector @ matrix: gemv on B
        flip = TRANS if tb == NO_TRANS else NO_TRANS
        rows, cols = (k, m) if tb == NO_TRANS else (m, k)
        spans = [(b, bo, (rows - 1) * ldb + cols - 1), (a, ao, (k - 1) * a.strides[-1]), (out, oo, m - 1)]
        call = (f"gemv(i32 {ROW_MAJOR}, i32 {flip}, {it} {rows}, {it} {cols}, {ty} {one}, ptr {{B}}, {it} {ldb}, "
                f"ptr {{A}}, {it} {a.strides[-1]}, {ty} {zero}, ptr {{C}}, {it} 1)")
    elif m == 1 and b.strides[-2] > 0:    # matrix @ column vector: gemv on A
        rows, cols = (n, k) if ta == NO_TRANS else (k, n)
        spans = [(a, ao, (rows - 1) * lda + cols - 1), (b, bo, (k - 1) * b.strides[-2]), (out, oo, n - 1)]
        call = (f"gemv(i32 {ROW_MAJOR}, i32 {ta}, {it} {rows}, {it} {cols}, {ty} {one}, ptr {{A}}, {it} {lda}, "
                f"ptr {{B}}, {it} {b.strides[-2]}, {ty} {zero}, ptr {{C}}, {it} 1)")
    else:
        spans = full
        call = (f"gemm(i32 {ROW_MAJOR}, i32 {ta}, i32 {tb}, {it} {dims['n']}, {it} {dims['m']}, {it} {k}, {ty} {one}, "
                f"ptr {{A}}, {it} {lda}, ptr {{B}}, {it} {ldb}, {ty} {zero}, ptr {{C}}, {it} {m})")
    from . import tune
    pin = threads is not None and tune.set_threads_symbol() is not None

    def body():
        # OpenBLAS's thread count for this call only (tune.py: its pool stalls on a busy machine), restored after
        prev = em(f"call i32 @gc_blas_set_threads(i32 {threads})") if pin else None
        em.raw(f"call void @gc_cblas_{p}" + call.format(A=ptr_at(em, P, a, ao), B=ptr_at(em, P, b, bo),
                                                         C=ptr_at(em, P, out, oo)))
        if pin:
            em(f"call i32 @gc_blas_set_threads(i32 {prev})")
    guarded(em, full if block is not None else spans, body)


def _loop_gemm(em, P, out, a, b, ao, bo, oo, n, k, m):
    """C[i, :] = sum_p A[i, p] * B[p, :] (the inner loop over j vectorises for contiguous rows)."""
    t, ty = out.dtype, VTYPE[out.dtype]
    mul, add = ("fmul contract", "fadd contract") if t in ("float32", "float64") else ("mul", "add")
    from .lower import convert
    crow = View(out.buf, 0, (m,), (1,), t)

    def row(offs, idx):
        i = idx[0]
        co = em(f"add i64 {oo}, {em(f'mul i64 {i}, {m}')}")
        nest(em, [m], [(1,)], [co], lambda o, _: store(em, P, crow, o[0], literal(0, t)))

        def per_p(po, _):
            av = convert(em, load(em, P, a, po[0]), a.dtype, t)

            def per_j(jo, __):
                bv = convert(em, load(em, P, b, jo[0]), b.dtype, t)
                cv = load(em, P, crow, jo[1])
                store(em, P, crow, jo[1], em(f"{add} {ty} {cv}, {em(f'{mul} {ty} {av}, {bv}')}"))
            nest(em, [m], [(b.strides[-1],), (1,)], [po[1], co], per_j)
        nest(em, [k], [(a.strides[-1],), (b.strides[-2],)], [offs[0], bo], per_p)
    nest(em, [n], [(a.strides[-2],)], [ao], row)


# ---- matrix-vector products (batch 1) ---------------------------------------------------------------

#: output columns per block of an axpy-form GEMV at most (the block's partial sums stay in L1; one block
#: reads the matrix's rows whole, in order: (1 x 784) @ (784 x 512) took 39 us in blocks of 256 columns,
#: 2x the time of the same bytes read in order) and rows of the matrix folded into each pass over the block
GEMV_BLOCK, GEMV_UNROLL = 4096, 8
#: outputs per group of a dot-form GEMV (one pass over the vector feeds this many dot products)
GEMV_DOTS = 4


def gemv_form(a: View, b: View) -> dict | None:
    """How a @ b with n == 1 (or m == 1) reads as a matrix-vector product out[j] = sum_p vec[p] * mat(j, p):
    kind "axpy" when the matrix's outputs are contiguous (x @ W, W row-major: the matrix is streamed
    row by row, which is already the order a packed copy would have, so no copy is made), "dot" when its
    p axis is (x @ W.T: one contiguous dot product per output); None for other layouts or n, m > 1."""
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    if n == 1:
        vec, vs, L, s_out, s_p = "a", a.strides[-1], m, b.strides[-1], b.strides[-2]
    elif m == 1:
        vec, vs, L, s_out, s_p = "b", b.strides[-2], n, a.strides[-2], a.strides[-1]
    else:
        return None
    if a.dtype not in ("float32", "float64") or a.dtype != b.dtype:
        return None
    if s_out == 1 and L > 1:
        kind = "axpy"
    elif s_p == 1 or k == 1:
        kind = "dot"
    else:
        return None
    return {"kind": kind, "vec": vec, "vs": vs, "L": L, "s_out": s_out, "s_p": s_p}


def gemv_block(form: dict, split: bool = False) -> int:
    """Columns per block of an axpy-form GEMV (the unit threads split: one block per thread when split)."""
    from . import tune
    L = form["L"]
    if split and L >= 128:
        return min(GEMV_BLOCK, -(-L // (tune.threads() * 64)) * 64)
    return min(GEMV_BLOCK, L)


def gemv_split(n: int, k: int, m: int) -> bool:
    """Whether a (single, unbatched) matrix-vector product of these sizes splits its output blocks over the
    pool (GEMV_PARALLEL_FLOPS of work and more than one thread): matmul's rule."""
    from . import tune
    return 2 * n * k * m >= tune.GEMV_PARALLEL_FLOPS and tune.threads() > 1


def gemv_blocks(form: dict, n: int, m: int, split: bool = False) -> int:
    L = form["L"]
    return -(-L // gemv_block(form, split)) if form["kind"] == "axpy" else -(-L // GEMV_DOTS)


def gemv(em, P, out: View, a: View, b: View, ao, bo, oo, n: int, k: int, m: int, form: dict, lo, hi,
         split: bool = False, packed: bool = False) -> None:
    """out[j] = sum_p vec[p] * mat(j, p) for the output blocks lo .. hi-1 (gemv_form, gemv_blocks)."""
    t, ty = out.dtype, VTYPE[out.dtype]
    vec, mat = (a, b) if form["vec"] == "a" else (b, a)
    vo, mo = (ao, bo) if form["vec"] == "a" else (bo, ao)
    L, vs, s_out, s_p = form["L"], form["vs"], form["s_out"], form["s_p"]
    zero = literal(0.0, t)

    def at(base, *terms):   # IR of base + sum(index * stride)
        x = str(base)
        for i, st in terms:
            if st == 0:
                continue
            x = em(f"add i64 {x}, {i if st == 1 else em(f'mul i64 {i}, {st}')}")
        return x

    if form["kind"] == "axpy":
        width = gemv_block(form, split)

        def block(blk):
            j0 = em(f"mul i64 {blk}, {width}")
            j1 = em(f"add i64 {j0}, {width}")
            j1 = em(f"select i1 {em(f'icmp slt i64 {j1}, {L}')}, i64 {j1}, i64 {L}")
            em.loop(j1, lambda j: store(em, P, out, at(oo, (j, 1)), zero), start=j0)
            # packed (pack_panels in panels of `width` columns: the block's k rows one contiguous run): row p
            # of block blk at blk*width*k + p*width, so column j of it at mb + p*width + j
            mb = em(f"add i64 {mo}, {em(_imul(blk, width * (k - 1)))}") if packed else mo
            sp = width if packed else s_p

            def rows(p0, u):   # out[j0:j1] += sum over p0 .. p0+u-1 of vec[p] * mat(j, p)
                xs = [load(em, P, vec, at(vo, (em(f"add i64 {p0}, {q}"), vs))) for q in range(u)]
                rbase = [at(mb, (em(f"add i64 {p0}, {q}"), sp)) for q in range(u)]

                def col(j):
                    oj = at(oo, (j, 1))
                    acc = load(em, P, out, oj)
                    for q in range(u):
                        acc = em(f"fadd contract {ty} {acc}, "
                                 f"{em(f'fmul contract {ty} {xs[q]}, {load(em, P, mat, at(rbase[q], (j, 1)))}')}")
                    store(em, P, out, oj, acc)
                em.loop(j1, col, start=j0)
            full, rest = divmod(k, GEMV_UNROLL)
            em.loop(full, lambda pp: rows(em(f"mul i64 {pp}, {GEMV_UNROLL}"), GEMV_UNROLL))
            if rest:
                rows(str(full * GEMV_UNROLL), rest)
        em.loop(hi, block, start=lo)
        return

    groups, tail = divmod(L, GEMV_DOTS)

    def group(j0, h):
        accs = [em.alloca(ty) for _ in range(h)]
        for x in accs:
            em.raw(f"store {ty} {zero}, ptr {x}")
        rbase = [at(mo, (em(f"add i64 {j0}, {q}"), s_out)) for q in range(h)]

        def step(p):
            xv = load(em, P, vec, at(vo, (p, vs)))
            for q in range(h):
                prod = em(f"fmul contract {ty} {xv}, {load(em, P, mat, at(rbase[q], (p, s_p)))}")
                cur = em(f"load {ty}, ptr {accs[q]}")
                em.raw(f"store {ty} {em(f'fadd reassoc contract {ty} {cur}, {prod}')}, ptr {accs[q]}")
        em.loop(k, step)
        for q in range(h):
            store(em, P, out, at(oo, (em(f"add i64 {j0}, {q}"), 1)), em(f"load {ty}, ptr {accs[q]}"))

    top = em(f"select i1 {em(f'icmp slt i64 {hi}, {groups}')}, i64 {hi}, i64 {groups}")
    em.loop(top, lambda g: group(em(f"mul i64 {g}, {GEMV_DOTS}"), GEMV_DOTS), start=lo)
    if tail:
        em.if_(em(f"icmp sgt i64 {hi}, {groups}"), lambda: group(str(groups * GEMV_DOTS), tail))


# ---- register-blocked vector micro-kernel ------------------------------------------------------------

def mask(lanes: int, live: int) -> str:
    """A constant <lanes x i1> with the first `live` lanes on."""
    return "<" + ", ".join(f"i1 {'true' if i < live else 'false'}" for i in range(lanes)) + ">"


#: GRAPHC_LLVM_MASKED_TAILS: "1" reads and writes a vector's first `live` lanes with LLVM's masked load /
#: store intrinsics; "0" with plain loads and stores of power-of-two pieces (5 lanes: 4 + 1, 10: 8 + 2);
#: "auto" (default): masked where the code is AVX-512's (its mask registers make them one instruction),
#: pieces elsewhere. AVX2's masked store is microcoded on AMD: on the Zen 1 VM, max_pool2d's gradient over
#: 10x10 planes (a 5-lane tail per row, no full vector) took 393 us masked, 121 us in pieces (64x16 planes).
MASKED_ENV = "GRAPHC_LLVM_MASKED_TAILS"


def _masked() -> bool:
    import os
    mode = os.environ.get(MASKED_ENV, "auto").strip().lower()
    if mode in ("0", "1"):
        return mode == "1"
    from . import tune
    return tune.isa() == "avx512"


def tail_pieces(live: int) -> list[tuple[int, int]]:
    """(first lane, lanes) of the power-of-two pieces that cover lanes 0 .. live-1, largest first."""
    out, at, k = [], 0, 1 << (max(live, 1).bit_length() - 1)
    while at < live:
        if k <= live - at:
            out.append((at, k))
            at += k
        k >>= 1
    return out


def _piece_ptr(em, p: str, ety: str, at: int) -> str:
    return p if at == 0 else em(f"getelementptr {ety}, ptr {p}, i64 {at}")


def _lanes_mask(idx) -> str:
    return "<" + ", ".join("i32 poison" if i is None else f"i32 {i}" for i in idx) + ">"


def vload(em, P, v: View, off, vt: str, lanes: int, live: int) -> str:
    """Vector of v's elements off .. off+lanes-1 (only the first `live` read; the others 0): a plain load,
    else power-of-two pieces put together (or a masked load: MASKED_ENV)."""
    p = ptr_at(em, P, v, off, live - 1)
    if live == lanes:
        return em(f"load {vt}, ptr {p}, align 4")
    if _masked():
        return em(f"call {vt} @llvm.masked.load.{_vsfx(vt)}.p0(ptr {p}, i32 4, {mask_type(vt)} "
                  f"{mask(lanes, live)}, {vt} zeroinitializer)")
    ety = vt.strip("<>").split()[-1]
    acc = "zeroinitializer"
    for at, k in tail_pieces(live):
        q = _piece_ptr(em, p, ety, at)
        if k == 1:
            acc = em(f"insertelement {vt} {acc}, {ety} {em(f'load {ety}, ptr {q}, align 4')}, i64 {at}")
            continue
        pt = f"<{k} x {ety}>"
        piece = em(f"load {pt}, ptr {q}, align 4")
        wide = em(f"shufflevector {pt} {piece}, {pt} poison, "
                  f"<{lanes} x i32> {_lanes_mask([i if i < k else None for i in range(lanes)])}")
        sel = [lanes + i - at if at <= i < at + k else i for i in range(lanes)]
        acc = em(f"shufflevector {vt} {acc}, {vt} {wide}, <{lanes} x i32> {_lanes_mask(sel)}")
    return acc


def vstore(em, P, v: View, off, val: str, vt: str, lanes: int, live: int) -> None:
    """Store the first `live` lanes of val to v's elements off ...: a plain store, else power-of-two pieces
    (or a masked store: MASKED_ENV)."""
    p = ptr_at(em, P, v, off, live - 1)
    if live == lanes:
        em.raw(f"store {vt} {val}, ptr {p}, align 4")
    elif _masked():
        em.raw(f"call void @llvm.masked.store.{_vsfx(vt)}.p0({vt} {val}, ptr {p}, i32 4, {mask_type(vt)} "
               f"{mask(lanes, live)})")
    else:
        ety = vt.strip("<>").split()[-1]
        for at, k in tail_pieces(live):
            q = _piece_ptr(em, p, ety, at)
            if k == 1:
                em.raw(f"store {ety} {em(f'extractelement {vt} {val}, i64 {at}')}, ptr {q}, align 4")
                continue
            pt = f"<{k} x {ety}>"
            piece = em(f"shufflevector {vt} {val}, {vt} poison, <{k} x i32> {_lanes_mask(range(at, at + k))}")
            em.raw(f"store {pt} {piece}, ptr {q}, align 4")


def _vsfx(vt: str) -> str:     # "<16 x float>" -> "v16f32"
    n, _, ty = vt.strip("<>").split()
    return f"v{n}{'f32' if ty == 'float' else 'f64'}"


def mask_type(vt: str) -> str:
    return f"<{vt.strip('<>').split()[0]} x i1>"


def vector_declarations() -> str:
    """Masked vector load/store intrinsics the micro-kernel uses (both dtypes, both widths)."""
    out = []
    for n, ty in [(n, ty) for n in (4, 8, 16, 32, 64) for ty in ("float", "double")]:
        vt = f"<{n} x {ty}>"
        out.append(f"declare {vt} @llvm.masked.load.{_vsfx(vt)}.p0(ptr, i32, <{n} x i1>, {vt})")
        out.append(f"declare void @llvm.masked.store.{_vsfx(vt)}.p0({vt}, ptr, i32, <{n} x i1>)")
    out.append("declare void @llvm.prefetch.p0(ptr, i32, i32, i32)")
    return "\n".join(out) + "\n"


def tile_split(n: int, mr: int) -> tuple[int, int, int]:
    """(tiles, base, extra) of n rows in tiles of at most mr: as many tiles as mr-row tiles need, their
    heights balanced, `extra` tiles of base + 1 rows then the rest of base (16 rows: 6, 5, 5 rather than
    6, 6, 4: a short last tile has too few accumulators to cover the FMA latency)."""
    count = -(-n // mr)
    return (count,) + divmod(n, count)


def _row_tile(n: int, rows: tuple) -> int:
    """Tile height: the candidate needing fewest row tiles (ties: the taller)."""
    return min(rows, key=lambda r: (-(-n // r), -r)) if n >= rows[-1] else n


def tile_rows(nv: int, dtype: str) -> tuple:
    """Candidate tile heights for tiles nv vectors wide on this target: the accumulators (rows x nv), nv
    vectors of b and a broadcast fit the vector registers (16 on AVX2/SSE, 32 on AVX-512)."""
    from . import tune
    regs = 32 if tune.isa() == "avx512" else 16
    top = min(8, (regs - nv - 1) // nv)
    return tuple(r for r in (top, top - 1, top - 2) if r >= 1) or (1,)


def panel_width(n: int, dtype: str) -> int:
    """Columns of one micro-kernel tile for an n-row product: the width of pack_panels' panels for it."""
    return tile_vectors(n, dtype)[0] * vector_shape(dtype)[0]


def packed_size(k: int, m: int, nr: int) -> int:
    """Elements of b (k, m) packed in panels of nr columns (the last one zero-padded)."""
    return -(-m // nr) * k * nr


def pack_panels(dst: View, b: View, nr: int, split: bool = False) -> Kernel:
    """dst (contiguous, packed_size elements) = b (k, m, any strides) in the micro-kernel's panel layout:
    panel j (columns j*nr .. j*nr+nr-1) is k rows of nr elements, row p at j*k*nr + p*nr, columns past m
    zero. The micro-kernel then reads each step's b vectors from one contiguous run (b's own rows are m
    elements apart: at 512 or 1024 float32 columns every row of a column block maps to the same L1 set)
    and the last panel as whole vectors. A weight's packing is a prologue step (plan.hoist_prologue): run
    once, and again when the parameter has a new array."""
    k, m = b.shape[-2], b.shape[-1]
    sr, sc = b.strides[-2], b.strides[-1]
    full, tail = divmod(m, nr)
    zero = literal(0.0, dst.dtype)

    # the loops walk b in its memory order: a transposed weight (W.T of a row-major W, an ONNX initialiser)
    # is read down its columns, the panel's rows written 16 floats apart (a 2 MB te12 weight: ~10 ms read
    # element by element across, against ~2 ms in order)
    down = abs(sr) < abs(sc)
    # ... or, where b's columns are contiguous (b = W^T), lanes x lanes blocks at a time: lanes of W's rows
    # loaded as vectors, transposed by shuffles, stored as whole panel rows (transposed_pack)
    turned = down and sr == 1 and TRANSPOSED_PACK and dst.dtype in ("float32", "float64") \
        and nr % vector_shape(dst.dtype)[0] == 0

    panels = full + bool(tail)

    def emit(em, P, lo, hi):
        if turned:
            _pack_turned(em, P, dst, b, nr, "0" if not split else lo, panels if not split else hi)
            return
        def copy(offs, _):
            store(em, P, dst, offs[0], load(em, P, b, offs[1]))

        def walk(lead, cols, bases, lo=None, hi=None):
            """dst/b over (lead..., k rows, cols columns): the last two in b's memory order."""
            shape, dsts, srcs = [k, cols], [nr, 1], [sr, sc]
            if down:
                shape, dsts, srcs = shape[::-1], dsts[::-1], srcs[::-1]
            nest(em, tuple(lead) + tuple(shape), [(k * nr,) * len(lead) + tuple(dsts),
                                                  (nr * sc,) * len(lead) + tuple(srcs)], bases, copy, lo, hi)

        def last():
            at = dst.offset + full * k * nr
            walk((), tail, [at, b.offset + full * nr * sc])
            nest(em, (k, nr - tail), [(nr, 1)], [at + tail],
                 lambda offs, _: store(em, P, dst, offs[0], zero))
        if not split:
            if full:
                walk((full,), nr, [dst.offset, b.offset])
            if tail:
                last()
            return
        # panels lo .. hi-1 (a split packing: the full panels among them, then the partial one if it is hi-1)
        if full:
            top = em(f"select i1 {em(f'icmp slt i64 {hi}, {full}')}, i64 {hi}, i64 {full}")
            walk((full,), nr, [dst.offset, b.offset], lo, top)
        if tail:
            em.if_(em(f"icmp sgt i64 {hi}, {full}"), last)
    kern = Kernel("pack_panels", [dst, b], emit, panels if split and panels >= 2 else None, 0, panels)
    kern.key = ("pack_panels", nr, down, split, turned)
    return kern


#: pack_panels reads a transposed b with contiguous columns (W^T of a row-major W) lanes x lanes blocks at a
#: time, transposed by shuffles (attention.transpose), instead of element by element down its columns; and
#: such a product may then pack every call (plan._packed_per_call, timed by the tuner as such). W5's input
#: gradient g @ W1^T (64 x 256 x 512) had gone to OpenBLAS's NT product: in-process on the Intel Xeon, W5
#: 1,053 -> 987 us a step; W7 b16, W8, W9 even
TRANSPOSED_PACK = True


def _pack_turned(em, P, dst: View, b: View, nr: int, lo, hi) -> None:
    """pack_panels' panels lo .. hi-1 (i64 values or ints) of b (k, m) whose rows are adjacent (b[p, j] at
    offset + p + j * sc): per panel, per lanes x lanes block of (rows p0.., columns j0..), lanes vectors of
    b's columns (lanes rows each) transposed into lanes panel rows; rows past the last whole block element by
    element; the last panel's columns past m zero."""
    from .attention import transpose
    k, m = b.shape[-2], b.shape[-1]
    sc = b.strides[-1]
    t = dst.dtype
    lanes = vector_shape(t)[0]
    vt = f"<{lanes} x {VTYPE[t]}>"
    full, tail = divmod(m, nr)
    kv = k // lanes
    zero = literal(0.0, t)

    def panel(j, cols: int):
        dbase = em(_iadd(em(_imul(j, k * nr)), dst.offset))
        bbase = em(_iadd(em(_imul(j, nr * sc)), b.offset))

        def block(i):
            p0 = em(_imul(i, lanes))
            for g in range(nr // lanes):
                live = max(0, min(lanes, cols - g * lanes))
                vecs = [vload(em, P, b, em(f"add i64 {bbase}, {em(_iadd(p0, (g * lanes + r) * sc))}"), vt, lanes,
                              lanes) if r < live else "zeroinitializer" for r in range(lanes)]
                rows = transpose(em, vt, lanes, vecs) if live else vecs
                for c in range(lanes):
                    at = em(f"add i64 {dbase}, {em(_iadd(em(_imul(em(_iadd(p0, c)), nr)), g * lanes))}")
                    vstore(em, P, dst, at, rows[c], vt, lanes, lanes)
        if kv:
            em.loop(kv, block)
        for p in range(kv * lanes, k):   # the rows past the last whole block
            for jj in range(nr):
                at = em(_iadd(dbase, p * nr + jj))
                store(em, P, dst, at, load(em, P, b, em(_iadd(bbase, jj * sc + p))) if jj < cols else zero)
    if full:
        top = hi if isinstance(hi, int) and hi <= full else \
            em(f"select i1 {em(f'icmp slt i64 {hi}, {full}')}, i64 {hi}, i64 {full}")
        em.loop(top, lambda j: panel(j, nr), start=lo)
    if tail:
        if isinstance(hi, int):
            if hi > full:
                panel(str(full), tail)
        else:
            em.if_(em(f"icmp sgt i64 {hi}, {full}"), lambda: panel(str(full), tail))


def gemm_tiles(em, P, out: View, a: View, b: View, ao, bo, oo, n: int, k: int, m: int, cols=None,
               ktaps=None, packed: bool = False, stream: bool = False, fold=None, row0="0") -> None:
    """out[n, m] = a[n, k] @ b[k, m] by tiles of mr rows x nv vectors held in registers: per step p one
    row of b's tile is loaded as vectors and every row's a[i, p] broadcast into a fused multiply-add.
    Column blocks run outermost so b's block (k x nv vectors) stays in L1/L2 across the row tiles (packed,
    with a larger than ROW_BLOCK_BYTES: blocks of a's rows outside them, each kept in L2 while the
    column blocks pass over it); the last partial vector is read and written by vload / vstore (pieces or
    masked). b's rows must be contiguous (stride 1). `cols` = (lo, hi): only the column blocks lo .. hi-1
    (tile_blocks; the partial block last), the unit a split runs.
    `ktaps` = (dims, strides): b's row p starts at element sum(idx * strides) for p's multi-index idx in
    dims (prod(dims) == k) instead of p * b's row stride: the rows of an implicit im2col (a convolution's
    taps read from the padded image itself, conv.conv_tiles' wide grid), which may overlap. Or a dict
    (_tap_loop): channels whose taps are rows of b at given offsets (direct.py: a strided convolution's
    taps in its phase planes).
    `packed`: b is in pack_panels' layout (b's column block j0 .. j0+nr-1 is k rows of nr elements from
    element j0*k, zero past column m): every step reads one contiguous run, and whole vectors. `stream`:
    the packed panels come from memory (read once a call, not kept in cache: a Winograd layer's U): they are
    also prefetched into L2 further ahead (PREFETCH_L2_AHEAD). `fold` = (addends, relu, post): out = a @ b
    plus each addend (a view whose element (i, j) is at offset + i * row stride + j: a bias row, a residual
    matrix), then ReLU when `relu`: the tiles start from the addends' sum and take max(., 0) before they
    are stored (epilogue.fold: the region after a product, with no pass of its own); then each of `post`'s
    operations in turn on the stored value (_post: a scale by a literal and a view added, subtracted or
    subtracted from: an SGD step's W - lr * (X^T @ dY), the product never written). `row0`: the product's
    row that out's and a's row at ao / oo is (a part of a product's rows: the fold's addends start there)."""
    lanes = vector_shape(out.dtype)[0]
    nv, rows = tile_vectors(n, out.dtype)
    mr = _row_tile(n, rows)
    nr = nv * lanes
    full_cols, tail = divmod(m, nr)
    if packed and ktaps is not None:
        raise ValueError("a packed b has no taps")

    vecs = [lanes] * (tail // lanes) + ([tail % lanes] if tail % lanes else [])

    def blocks(ra, ro, nrows: int, row0="0"):
        """The column blocks (all, or cols') over nrows rows of a and out starting at offsets ra, ro (row
        row0 of the product)."""
        def rows_of(j0, vv):
            _tile_rows(em, P, out, a, b, ra, bo, ro, nrows, k, m, j0, vv, _row_tile(nrows, rows),
                       ktaps, nr if packed else None, stream, None if fold is None else (fold, row0))
        if cols is None:
            em.loop(full_cols, lambda jb: rows_of(em(f"mul i64 {jb}, {nr}"), [lanes] * nv))
            if tail:
                rows_of(str(full_cols * nr), vecs)
            return
        lo, hi = cols
        top = em(f"select i1 {em(f'icmp slt i64 {hi}, {full_cols}')}, i64 {hi}, i64 {full_cols}")
        em.loop(top, lambda jb: rows_of(em(f"mul i64 {jb}, {nr}"), [lanes] * nv), start=lo)
        if tail:
            em.if_(em(f"icmp sgt i64 {hi}, {full_cols}"), lambda: rows_of(str(full_cols * nr), vecs))

    nb = _row_block(n, k, mr, out.dtype) if packed else n
    if nb >= n:
        blocks(ao, oo, n, row0)
        return
    # a's rows in blocks that stay in L2 while the run's column blocks (packed panels) pass over them
    full_rb, rest = divmod(n, nb)
    sa_r = a.strides[-2]
    em.loop(full_rb, lambda rb: blocks(em(f"add i64 {ao}, {em(_imul(rb, nb * sa_r))}"),
                                       em(f"add i64 {oo}, {em(_imul(rb, nb * m))}"), nb,
                                       em(f"add i64 {row0}, {em(_imul(rb, nb))}")))
    if rest:
        blocks(em(_iadd(ao, full_rb * nb * sa_r)), em(_iadd(oo, full_rb * nb * m)), rest,
               em(_iadd(row0, full_rb * nb)))


#: a packed product's rows of a are taken in blocks of about this many bytes (the 512 KB L2 of the 2-core
#: Zen 1 holds a block and the panels passing over it); one block (all of a) when a is smaller
ROW_BLOCK_BYTES = 1 << 18


def _row_block(n: int, k: int, mr: int, dtype: str) -> int:
    """Rows per block of a packed product: a multiple of the tile height mr, about ROW_BLOCK_BYTES of a."""
    per = max(1, k * np.dtype(dtype).itemsize)
    return max(mr, ROW_BLOCK_BYTES // per // mr * mr)


def gemm_block(em, P, out: View, a: View, b: View, ao, bo, oo, n: int, k: int, m: int, j0, width: int,
               nv: int) -> None:
    """out[:, j0:j0+width] = a @ b[:, j0:j0+width] (j0 an i64 IR value, `width` a constant) by tiles of
    nv vectors (tile_rows rows; the last columns partial vectors, masked): the product part of a kernel
    that owns a block of output columns (recurrent.py: a product and the epilogue reading it)."""
    lanes = vector_shape(out.dtype)[0]
    mr = _row_tile(n, tile_rows(nv, out.dtype))
    nr = nv * lanes
    for q in range(0, width, nr):
        w = min(nr, width - q)
        vecs = [lanes] * (w // lanes) + ([w % lanes] if w % lanes else [])
        _tile_rows(em, P, out, a, b, ao, bo, oo, n, k, m, em(f"add i64 {j0}, {q}") if q else j0, vecs, mr)


def _tile_rows(em, P, out: View, a: View, b: View, ao, bo, oo, n: int, k: int, m: int, j0, vecs: list,
               mr: int, ktaps=None, panel: int | None = None, stream: bool = False, fold=None) -> None:
    """out[:, j0 : j0 + len(vecs) vectors] by tiles of mr rows (the last tile the rest); vecs: the live
    lanes of each vector (the last may be partial); ktaps: gemm_tiles'; panel: b packed in panels of this
    many columns (pack_panels: row p of the block at j0 is at j0*k + p*panel, whole vectors readable)."""
    t, ty = out.dtype, VTYPE[out.dtype]
    lanes = vector_shape(t)[0]
    vt = f"<{lanes} x {ty}>"
    sa_r, sa_k = a.strides[-2], a.strides[-1]
    sb_k = panel if panel is not None else b.strides[-2] if ktaps is None else 0
    # where the block's columns start within b's rows (packed: where the block's panel starts)
    bcol = j0 if panel is None else em(_imul(j0, k))
    import os
    may_prefetch = em.bounds is None and os.environ.get("GRAPHC_LLVM_PREFETCH", "1") != "0"
    prefetch = may_prefetch and panel is not None and ktaps is None and n <= PREFETCH_MAX_ROWS
    bvecs = [lanes] * len(vecs) if panel is not None else vecs   # (a panel's columns past m are zeros)
    tap_ahead = ktaps["stride"] * ktaps.get("prefetch", 0) if may_prefetch and isinstance(ktaps, dict) else 0
    row_bytes = len(bvecs) * lanes * np.dtype(t).itemsize

    def tile(i0, h: int):
        """The h x len(vecs) tile at rows i0.., columns j0.."""
        acc = [[em.alloca(vt) for _ in vecs] for _ in range(h)]
        for r, row in enumerate(acc):
            for q, x in enumerate(row):
                init = "zeroinitializer"
                if fold is not None:   # the addends' sum at (row0 + i0 + r, j0 + q*lanes ...)
                    (adds, _, _), row0 = fold
                    i = em(f"add i64 {row0}, {em(_iadd(i0, r))}")
                    for v, sr in adds:
                        at = em(f"add i64 {em(f'add i64 {v.offset}, {em(_imul(i, sr))}')}, {em(_iadd(j0, q * lanes))}")
                        val = vload(em, P, v, at, vt, lanes, vecs[q])
                        init = val if init == "zeroinitializer" else em(f"fadd {vt} {init}, {val}")
                em.raw(f"store {vt} {init}, ptr {x}")
        arow = [em(f"add i64 {ao}, {em(f'mul i64 {em(_iadd(i0, r))}, {sa_r}')}") for r in range(h)]

        def step(p, boff=None):
            brow = em(f"add i64 {em(f'add i64 {bo}, {em(_imul(p, sb_k))}') if boff is None else boff}, {bcol}")
            bv = [vload(em, P, b, em(f"add i64 {brow}, {q * lanes}"), vt, lanes, live)
                  for q, live in enumerate(bvecs)]
            if prefetch:   # the panel's row PREFETCH_ROWS_AHEAD steps on into L1 (a panel read once: few row
                # tiles); a streamed one also PREFETCH_L2_AHEAD steps on into L2
                for rows_ahead, hint in ((PREFETCH_ROWS_AHEAD, 3), (PREFETCH_L2_AHEAD if stream else 0, 2)):
                    if rows_ahead:
                        _prefetch(em, P, b, em(f"add i64 {brow}, {rows_ahead * sb_k}"), row_bytes, hint)
            if tap_ahead and not TAP_PREFETCH_BY_SEGMENT:   # the same tap of the channel ktaps["prefetch"]
                # on: its b row (unaligned) into L1
                _prefetch(em, P, b, em(f"add i64 {brow}, {tap_ahead}"), row_bytes + np.dtype(t).itemsize, 3)
            for r in range(h):
                av = load(em, P, a, em(f"add i64 {arow[r]}, {em(_imul(p, sa_k))}"))
                sp = em(f"shufflevector {vt} {em(f'insertelement {vt} poison, {ty} {av}, i64 0')}, {vt} poison, "
                        f"<{lanes} x i32> zeroinitializer")
                for q in range(len(vecs)):
                    prod = em(f"fmul contract {vt} {sp}, {bv[q]}")
                    cur = em(f"load {vt}, ptr {acc[r][q]}")
                    em.raw(f"store {vt} {em(f'fadd contract {vt} {cur}, {prod}')}, ptr {acc[r][q]}")
        if ktaps is None:
            _steps(em, k, step)
        elif isinstance(ktaps, dict):
            def segment_prefetch(at, elems: int):   # a segment's rows of the channel ktaps["prefetch"] on
                _prefetch(em, P, b, em(f"add i64 {em(f'add i64 {at}, {bcol}')}, {tap_ahead}"),
                          elems * np.dtype(t).itemsize + row_bytes + 64, 3)
            _tap_loop(em, ktaps, bo, step, segment_prefetch if tap_ahead and TAP_PREFETCH_BY_SEGMENT else None)
        else:
            dims, bst = ktaps
            nest(em, dims, [contig_strides(dims), bst], [0, bo], lambda offs, _: step(offs[0], offs[1]))
        for r in range(h):
            orow = em(f"add i64 {em(f'add i64 {oo}, {em(_imul(em(_iadd(i0, r)), m))}')}, {j0}")
            for q, live in enumerate(vecs):
                val = em(f"load {vt}, ptr {acc[r][q]}")
                if fold is not None and fold[0][1]:   # ReLU: x < 0 ? 0 : x (NaN kept, as lower._relu)
                    val = em(f"select {mask_type(vt)} {em(f'fcmp olt {vt} {val}, zeroinitializer')}, "
                             f"{vt} zeroinitializer, {vt} {val}")
                if fold is not None and fold[0][2]:   # the region's operations after the sum, in its order
                    val = _post(em, P, fold[0][2], val, vt, lanes, live,
                                em(f"add i64 {fold[1]}, {em(_iadd(i0, r))}"), em(_iadd(j0, q * lanes)))
                vstore(em, P, out, em(f"add i64 {orow}, {q * lanes}"), val, vt, lanes, live)

    count, base, extra = tile_split(n, mr)
    if extra:
        em.loop(extra, lambda ib: tile(em(f"mul i64 {ib}, {base + 1}"), base + 1))
    em.loop(count - extra, lambda ib: tile(em(f"add i64 {em(f'mul i64 {ib}, {base}')}, {extra * (base + 1)}"), base))


#: the micro-kernel's steps (one k each) run this many to a loop iteration (the rest after the loop). The
#: Intel Xeon (family 6 model 167), one thread, a standalone IR copy of the packed 6 x 4 tiles, 14 interleaved
#: rounds: 1024^3 165 -> 177 GFLOP/s (1020 deep 166 -> 181, 174 -> 183; 3 to a loop as 2, 4 as 2),
#: 1024 x 256 x 1024 179 -> 195, 1024 x 256 x 256 181 -> 186. The workloads (in-process A/B, 2 threads):
#: W1 b1 14.8 -> 13.0 us, W1 b256 792 -> 740 us, W7 b1 390 -> 378 us, W10 b8 71.1 -> 68.5 ms, W4, W5 and
#: W9 -2%; W6 and W7 b16 even (two threads already near the FMA peak there)
K_UNROLL = 2


def _steps(em, k: int, step) -> None:
    """step(p) for p in range(k): K_UNROLL steps to an iteration of a run-time loop, then the rest (k an
    int; an i64 value: one step an iteration)."""
    u = K_UNROLL if isinstance(k, int) and k >= 2 * K_UNROLL else 1
    if u == 1:
        em.loop(k, step)
        return

    def body(i):
        p0 = em(_imul(i, u))
        for q in range(u):
            step(em(_iadd(p0, q)) if q else p0)
    em.loop(k // u, body)
    for p in range(k - k % u, k):
        step(str(p))


#: a tap row of at most this many taps is unrolled in _tap_loop (a loop over them instead: ResNet-18's stem and
#: stride-2 convolutions 3.5-5% slower, their kernels' IR 3.5x smaller)
TAP_UNROLL = 8


def _prefetch(em, P, v: View, at, nbytes: int, hint: int) -> None:
    """Prefetch the cache lines of nbytes of v's buffer from element `at` (hint 3: into L1, 2: L2)."""
    base = em(_imul(at, np.dtype(v.dtype).itemsize))
    for q in range(0, nbytes, 64):
        addr = em(f"getelementptr i8, ptr {P[v.buf]}, i64 {em(_iadd(base, q)) if q else base}")
        em.raw(f"call void @llvm.prefetch.p0(ptr {addr}, i32 0, i32 {hint}, i32 1)")


#: a direct convolution's taps prefetch the channel ktaps["prefetch"] on once per segment of tap rows (all its
#: rows' reach at once) rather than at every tap (each tap's prefetch covered nearly its neighbour's lines:
#: five prefetches beside each step's four loads and six broadcasts). ResNet-18's 3x3 stride-2 convolutions
#: alone on the Intel Xeon (two runs each, bias + ReLU): 64->128 to 28x28 430/414 -> 421/403 us, 256->512 to
#: 7x7 409/420 -> 398/408 us, 128->256 to 14x14 even; W10 b1 even in-process (12 rounds)
TAP_PREFETCH_BY_SEGMENT = True


def _tap_loop(em, ktaps: dict, bo, step, prefetch=None) -> None:
    """step(p, b row offset) for every column p of a (gemm_tiles' ktaps as a dict): a run-time loop over
    ktaps["loop"] channels, b's rows ktaps["stride"] apart; per channel its tap rows ktaps["rows"] in turn,
    each (count, taps, first, stride): a loop over `count` rows `stride` apart from `first`, the row's `taps`
    adjacent rows of b unrolled up to TAP_UNROLL (a's columns in that order). ktaps["prefetch"] (optional):
    each step prefetches its b row that many channels on (_tile_rows)."""
    rows, bst = ktaps["rows"], ktaps["stride"]
    t = sum(cnt * taps for cnt, taps, _, _ in rows)

    def channel(c):
        p0 = em(_imul(c, t))
        b0 = em(f"add i64 {bo}, {em(_imul(c, bst))}")
        at = 0
        for cnt, taps, first, rst in rows:
            if prefetch is not None:
                prefetch(em(_iadd(b0, first)), (cnt - 1) * rst + taps - 1)

            def row(i, at=at, taps=taps, first=first, rst=rst):
                pr = em(_iadd(em(_iadd(p0, at)), em(_imul(i, taps)))) if i != "0" else em(_iadd(p0, at))
                br = em(_iadd(em(_iadd(b0, first)), em(_imul(i, rst)))) if i != "0" else em(_iadd(b0, first))
                if taps > TAP_UNROLL:
                    em.loop(taps, lambda q: step(em(f"add i64 {pr}, {q}"), em(f"add i64 {br}, {q}")))
                    return
                for q in range(taps):
                    step(pr if q == 0 else em(_iadd(pr, q)), br if q == 0 else em(_iadd(br, q)))
            em.loop(cnt, row)
            at += cnt * taps
    em.loop(ktaps["loop"], channel)


#: a packed product of at most this many rows (its panels read from memory by few row tiles: the turned
#: Winograd products at batch 1, 16 rows over 16.8 MB of U a layer) prefetches each panel's rows
#: PREFETCH_ROWS_AHEAD steps ahead into L1 (GRAPHC_LLVM_PREFETCH=0: not). W10 b1 on the Intel Xeon (in-process A/B,
#: 10 interleaved rounds): 12.47 -> 11.61 ms (4 rows ahead 11.91, 16 11.91, 32 12.14); W4, W9, W3 b1 and
#: W7 b1 (their panels in L2) unchanged
PREFETCH_MAX_ROWS = 32
PREFETCH_ROWS_AHEAD = 8
#: ... and a streamed one's (gemm_tiles' `stream`: the turned Winograd products) into L2 this many steps ahead.
#: W10 b1 on the Intel Xeon (in-process A/B, 8-16 interleaved rounds, three runs): 10.35 -> 10.00, 10.73 ->
#: 10.50 and 10.90 -> 10.72 ms (32 and 64 ahead as 48, 128 less); for every small packed product W4 measured
#: 9% slower (its weights stay in L2)
PREFETCH_L2_AHEAD = 48


def _iadd(x, c: int) -> str:   # IR text of an i64 add / multiply by a constant
    return f"add i64 {x}, {c}"


def _imul(x, c: int) -> str:
    return f"mul i64 {x}, {c}"
