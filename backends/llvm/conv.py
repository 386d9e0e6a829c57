"""Convolutions and max pooling on llvm (plan.py's conv rows delegate to the plan_* functions at the end).

conv2d: 3x3 stride-1 convolutions with enough channels and tiles run Winograd F(m x m, 3 x 3) (winograd.py:
tile_size states the rule). The rest: im2col of one image (or of a block of its output rows) into a slot's
tile in the arena, then the product while the tile is in cache: the register-blocked micro-kernel
(gemm.gemm_tiles) for small products, one-thread BLAS calls (blas_gemm) over blocks of output rows or
channels for large ones.
conv2d_grad_input: per image, W^T @ gy into the slot's tile, then col2im from it (by output row in vector
registers for unit column stride). conv2d_grad_weight: per image (or a few images side by side), im2col
into the slot's tile and a dot-product or GEMM micro-kernel into the slot's partial sums, summed after.
The items of each kernel are cut into slots that the kernel `split` runs across threads (one pool chunk per
slot, each with its own scratch: race-free, and the sums of one item never depend on the thread count).
Large kernels (more than UNROLL_TAPS taps: a 7x7 stem) loop over their im2col taps at run time (unrolled,
the stem's kernel was 160 KB of IR and 9 s of LLVM). Max pooling: vectors along output rows (padded
windows: interior columns as vectors, border ones one by one), split by plane across threads; its
gradient for windows that tile the plane as vectors (first maximum, interleaved stores), else per plane.
Zero / -inf padding by clamped loads and selects (no padded copy)."""
from __future__ import annotations

from .gemm import mask_type, vector_shape, vload, vstore
from .irtext import VTYPE, literal
from .kernels import Kernel, load, nest, store
from .lower import _fmaxmin
from ..schedule.views import View, contig_strides


def _window_pos(em, o: str, k: str, stride: int, dil: int, pad: int, size: int):
    """(clamped input index, in-bounds flag) for output position o and kernel tap k."""
    os_, ks = em(f"mul i64 {o}, {stride}"), em(f"mul i64 {k}, {dil}")
    i = em(f"sub i64 {em(f'add i64 {os_}, {ks}')}, {pad}")
    ok = em(f"and i1 {em(f'icmp sge i64 {i}, 0')}, {em(f'icmp slt i64 {i}, {size}')}")
    return em(f"select i1 {ok}, i64 {i}, i64 0"), ok


def _valid(size: int, out: int, k: int, stride: int, dil: int, pad: int) -> tuple[int, int]:
    """[lo, hi): the output positions o whose input index o*stride + k*dil - pad lies in [0, size)."""
    first = k * dil - pad
    lo = min(out, max(0, -(-(-first) // stride)))
    hi = max(lo, min(out, -(-(size - first) // stride)))
    return lo, hi


#: kernels of at most this many taps (kh * kw) have their im2col taps unrolled (each tap's in-bounds ranges
#: constants); larger ones (a 7x7 stem: 49 taps, each a few loops) loop over the taps at run time, the
#: ranges picked from per-tap constants: unrolled, the stem's kernel was 160 KB of IR and 9 s of LLVM
UNROLL_TAPS = 9
#: ... and the forward micro-kernel convolution (conv_tiles: one image's columns, then its product) unrolls up
#: to this many: LeNet's 5x5 convolutions (W3 batch 64 on the 2-core Zen 2: 1.16 -> 0.93 ms, its cold compile
#: 0.39 -> 0.59 s; unrolling every im2col as well cost W8's compile 0.5 s more for little)
UNROLL_TAPS_FORWARD = 25


def _pick(em, idx: str, values) -> str:
    """values[idx] for a run-time index idx (an i64 in range) as an IR operand: a chain of selects over
    the distinct leading values (a constant when they are all equal)."""
    values = [int(v) for v in values]
    last = len(values) - 1
    while last > 0 and values[last - 1] == values[-1]:
        last -= 1
    acc = str(values[-1])
    for k in range(last - 1, -1, -1):
        acc = em(f"select i1 {em(f'icmp eq i64 {idx}, {k}')}, i64 {values[k]}, i64 {acc}")
    return acc


def _taps(em, kernel, body, unroll: int | None = None) -> None:
    """body(i, j, pick) for every tap (i, j): unrolled (i, j Python ints) up to UNROLL_TAPS taps, else two
    run-time loops (i, j i64 values). pick(per_i, per_j) -> (per_i[i], per_j[j]): ints when unrolled, IR
    operands in the loops."""
    kh, kw = kernel
    if kh * kw <= (UNROLL_TAPS if unroll is None else unroll):
        for i in range(kh):
            for j in range(kw):
                body(i, j, lambda vi, vj, i=i, j=j: (vi[i], vj[j]))
        return
    em.loop(kh, lambda i: em.loop(kw, lambda j: body(i, j, lambda vi, vj: (_pick(em, i, vi), _pick(em, j, vj)))))


def _mul(em, a, k: int):
    """a * k: an int when a is one, else an i64 IR value."""
    if isinstance(a, int):
        return a * k
    return a if k == 1 else em(f"mul i64 {a}, {k}")


def _add(em, a, b):
    """a + b (ints or i64 IR operands): an int when both are, else an IR value (a 0 term dropped)."""
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(b, int) and b == 0:
        return a
    if isinstance(a, int) and a == 0:
        return b
    return em(f"add i64 {a}, {b}")


def _sub(em, a, b):
    return a - b if isinstance(a, int) and isinstance(b, int) else em(f"sub i64 {a}, {b}")


def _im2col_image(cols: View, x: View, kernel, stride, pads, dilation, out_hw=None, layout=None, pad_value=0,
                  unroll: int | None = None):
    """image(em, P, cols element, x element): emits the columns of one image. Per tap (kh, kw; unrolled up
    to UNROLL_TAPS, else run-time loops: _taps) its in-bounds output rows and columns are ranges known per
    tap, so the copy is a plain (vectorisable) row loop and the padding border plain zero stores. `layout`:
    the element strides of (channel, tap, output position) in cols; default (kh*kw*oh*ow, oh*ow, 1), i.e.
    (c, kh, kw, oh, ow); conv2d_grad_weight writes the patch-rows layout (oh, ow, c, kh, kw): (kh*kw, 1,
    c*kh*kw). Padding reads `pad_value` (an integer convolution's input zero point)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = cols.shape[-2:] if out_hw is None else out_hw
    cst, tst, pst = layout or (kh * kw * oh * ow, oh * ow, 1)
    t = x.dtype
    zero = literal(pad_value, t)

    def zeros(em, P, base, count):
        nest(em, [count], [(pst,)], [base], lambda o, _: store(em, P, cols, o[0], zero))
    rows_ = [_valid(h, oh, i, stride[0], dilation[0], pads[0][0]) for i in range(kh)]
    cols_ = [_valid(w, ow, j, stride[1], dilation[1], pads[1][0]) for j in range(kw)]

    def tap(em, P, co, xo, i, j, pick):
        r0, c0 = pick([r[0] for r in rows_], [q[0] for q in cols_])
        r1, c1 = pick([r[1] for r in rows_], [q[1] for q in cols_])
        base = _add(em, co, _mul(em, _add(em, _mul(em, i, kw), j), tst))
        zeros(em, P, base, _mul(em, r0, ow))
        # input row of output row r: r*stride - (pad - i*dil); first input column of the copy
        ioff = _sub(em, pads[0][0], _mul(em, i, dilation[0]))
        first = _mul(em, _sub(em, _add(em, _mul(em, c0, stride[1]), _mul(em, j, dilation[1])), pads[1][0]),
                     x.strides[3])

        def row(offs, idx):
            r = em(f"add i64 {idx[0]}, {r0}")
            dst = em(f"add i64 {base}, {em(f'mul i64 {r}, {ow * pst}')}")
            ih = em(f"sub i64 {em(f'mul i64 {r}, {stride[0]}')}, {ioff}")
            src = em(f"add i64 {xo}, {em(f'mul i64 {ih}, {x.strides[2]}')}")
            zeros(em, P, dst, c0)
            nest(em, [_sub(em, c1, c0)], [(pst,), (stride[1] * x.strides[3],)],
                 [_add(em, dst, _mul(em, c0, pst)), em(f"add i64 {src}, {first}")],
                 lambda o, _: store(em, P, cols, o[0], load(em, P, x, o[1])))
            zeros(em, P, _add(em, dst, _mul(em, c1, pst)), _sub(em, ow, c1))
        nest(em, [_sub(em, r1, r0)], [()], [], row)
        zeros(em, P, _add(em, base, _mul(em, r1, ow * pst)), _mul(em, _sub(em, oh, r1), ow))

    def image(em, P, co, xo):
        """The columns of one image (every channel) at element co of cols, from x's image at xo."""
        def per_channel(offs, _):
            _taps(em, kernel, lambda i, j, pick: tap(em, P, offs[0], offs[1], i, j, pick), unroll)
        nest(em, (c,), [(cst,), (x.strides[1],)], [co, xo], per_channel)
    return image


def im2col(cols: View, x: View, kernel, stride, pads, dilation, out_hw=None, layout=None, pad_value=0) -> Kernel:
    """cols[n, c, kh, kw, oh, ow] = x[n, c, oh*s + kh*d - pad, ow*s + kw*d - pad] (0 outside); with
    `layout` (see _im2col_image) the same values in another order (each image's block contiguous)."""
    image = _im2col_image(cols, x, kernel, stride, pads, dilation, out_hw, layout, pad_value)
    per = cols.size // max(1, x.shape[0])

    def emit(em, P, lo, hi):
        if cols.size:
            nest(em, (x.shape[0],), [(per,), (x.strides[0],)], [cols.offset, x.offset],
                 lambda offs, _: image(em, P, offs[0], offs[1]))
    return Kernel("im2col", [cols, x], emit, None, cols.size)


#: GRAPHC_LLVM_CONV_WIDE: "1" (default) lets stride-1 micro-kernel convolutions read their taps from a
#: padded copy of the image (wide_grid) instead of writing im2col columns where wide_pays; "all" wherever
#: the grid applies (tests); "0": always im2col
WIDE_ENV = "GRAPHC_LLVM_CONV_WIDE"
#: cycles a short row copy costs beyond its vectors (loop entry, the tail, the zero fill around it): the
#: cost model of wide_pays, fitted to in-process A/Bs on the 2-core Zen 1 (LeNet's 5x5 over 28x28 padded
#: by 2, batch 64 / 1: wide 0.72x / 0.88x the im2col time; its 6 -> 16 channel 5x5 over 14x14, whose wide
#: rows are 14 for 10 kept: 1.09x / 1.15x; 16 -> 32 3x3 over 12x12 1.00-1.08x; 3 -> 16 over 32x32 even)
ROW_OVERHEAD = 6.0


def wide_grid(x_shape, kernel, stride, pads, dilation, out_hw) -> dict | None:
    """The implicit im2col of a stride-1 convolution, or None where it does not apply. The image is copied
    once into a zero-bordered (Hp, Wp) plane per channel; output row r is then computed over Wp "wide"
    columns, and tap (c, i, j)'s im2col row is the plane itself from element c*plane + i*dh*Wp + j*dw, a
    contiguous run of oh*Wp elements (the micro-kernel's b rows, gemm_tiles' ktaps: they overlap). The
    last dw*(kw-1) columns of each wide row read past the row and are dropped when the output is copied
    out. LeNet's convolutions (5x5 over 28x28 padded by 2, and over 14x14) wrote 25 and 150 rows of
    28- and 10-element runs per image as im2col (short loops, most of the time); here 28 + 84 row copies.
    Returns {"Hp", "Wp", "plane" (elements per channel), "pad" (the zeroed slack after the last plane),
    "image" (the padded image's elements), "wide" (one image's wide output per filter: oh*Wp)}."""
    import os
    if os.environ.get(WIDE_ENV, "1") == "0" or tuple(stride) != (1, 1):
        return None
    grid = _wide_geometry(x_shape, kernel, pads, dilation, out_hw)
    oh, ow = out_hw
    return grid if oh >= 1 and ow >= 1 and grid["Wp"] <= 2 * ow else None


def _wide_geometry(x_shape, kernel, pads, dilation, out_hw) -> dict:
    """wide_grid's numbers for a stride-1 convolution (no applicability checks)."""
    c, h, w = x_shape[1:]
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, w + pl + pr
    slack = dilation[1] * (kernel[1] - 1)
    return {"Hp": hp, "Wp": wp, "plane": hp * wp, "pad": slack, "image": c * hp * wp + slack,
            "wide": out_hw[0] * wp}


def wide_pays(grid: dict, x_shape, o: int, ckk: int, out_hw, dtype: str, groups: int = 1) -> bool:
    """Whether the wide grid costs less than im2col for one image, in cycles of a rough model: im2col
    copies groups * ckk * oh rows of ow elements (ckk: a group's channels times taps); the wide grid
    copies the image's c * h rows in and o * oh rows out, and its product computes Wp - ow more columns
    per row (at 2 FLOPs per lane and cycle)."""
    lanes = vector_shape(dtype)[0]
    c, h, w = x_shape[1:]
    oh, ow = out_hw

    def rows(count, length):
        return count * (length / lanes + ROW_OVERHEAD)
    extra = 2 * o * ckk * oh * (grid["Wp"] - ow) / (2 * lanes)
    return extra + rows(c * h, w) + rows(o * oh, ow) < rows(groups * ckk * oh, ow)


def conv_tiles(out: View, x: View, w: View, cols: View, kernel, stride, pads, dilation, groups: int = 1,
               slots: int = 1, wide: bool = False, epilogue=None, extra_views=()) -> Kernel:
    """out (n, o, oh*ow) = w (o, c/g*kh*kw) @ im2col(x[i]) image by image (per group g: its o/g filters
    times its c/g channels' columns): one image's columns (a slot of cols, (c*kh*kw, oh*ow)) are written
    and at once multiplied by the micro-kernel while still in cache. The images are cut into `slots` runs
    split across threads (cols holds one image's columns per slot). wide: the columns are not written:
    cols holds per slot the padded image and the wide output of wide_grid (the product reads its taps from
    the image, its output is copied out by rows). epilogue(em, P, i): run after image i's product, while
    its output is in cache (fuse_conv_epilogue); extra_views: the views it reads and writes."""
    from .gemm import gemm_tiles
    n = x.shape[0]
    o, ckk = w.shape
    og = o // groups
    hw = out.shape[-1]
    if wide:
        return _conv_wide(out, x, w, cols, kernel, pads, dilation, groups, slots, epilogue, extra_views)
    per_slot = cols.size // slots
    one_image = View(cols.buf, 0, (x.shape[1],) + tuple(kernel) + cols.shape[-2:],
                     contig_strides((x.shape[1],) + tuple(kernel) + cols.shape[-2:]), cols.dtype)
    image = _im2col_image(one_image, x, kernel, stride, pads, dilation, unroll=UNROLL_TAPS_FORWARD)
    out2 = View(out.buf, 0, (og, hw), (hw, 1), out.dtype)
    cols2 = View(cols.buf, cols.offset, (ckk, hw), (hw, 1), cols.dtype)

    def one(em, P, s, i):
        co = em(f"add i64 {cols.offset}, {em(f'mul i64 {s}, {per_slot}')}")
        oo = em(f"add i64 {out.offset}, {em(f'mul i64 {i}, {o * hw}')}")
        image(em, P, co, em(f"add i64 {x.offset}, {em(f'mul i64 {i}, {x.strides[0]}')}"))
        for g in range(groups):
            gemm_tiles(em, P, out2, w, cols2, w.offset + g * og * ckk, em(f"add i64 {co}, {g * ckk * hw}"),
                       em(f"add i64 {oo}, {g * og * hw}") if g else oo, og, ckk, hw)
        if epilogue is not None:
            epilogue(em, P, i)

    def emit(em, P, lo, hi):
        if out.size:
            _slot_loop(em, n, slots, lo, hi, lambda s, i: one(em, P, s, i))
    kern = _slot_kernel("conv2d", [out, x, w, cols] + list(extra_views), emit, slots, 2 * n * o * ckk * hw)
    kern.conv_tiles = (out, x, w, cols, (kernel, stride, pads, dilation, groups, slots, False))
    return kern


def _conv_wide(out: View, x: View, w: View, cols: View, kernel, pads, dilation, groups: int, slots: int,
               epilogue, extra_views) -> Kernel:
    """conv_tiles over wide_grid: per slot the padded planes are zeroed once (their borders and the slack
    stay zero: only interiors are written), then per image: its rows copied into the planes' interiors,
    per group the micro-kernel over the wide columns with the taps as b's rows (gemm_tiles' ktaps), and the
    ow kept columns of each wide row copied to the output (then the epilogue)."""
    from .gemm import gemm_tiles
    n, c, h, wd = x.shape
    o, ckk = w.shape
    og, cg = o // groups, c // groups
    kh, kw = kernel
    oh_ow = out.shape[-1]
    oh, ow = _out_hw(x.shape, kernel, pads, dilation)
    assert oh * ow == oh_ow, (oh, ow, oh_ow)
    g_ = _wide_geometry(x.shape, kernel, pads, dilation, (oh, ow))
    assert g_["image"] + o * g_["wide"] <= cols.size // slots, "conv2d: wide scratch too small"
    wp, plane, image_n, wide_n = g_["Wp"], g_["plane"], g_["image"], g_["wide"]
    per_slot = cols.size // slots
    (pt, _), (pl, _) = pads
    dh, dw = dilation
    ty = cols.dtype
    pad_v = View(cols.buf, 0, (image_n,), (1,), ty)
    wide_v = View(cols.buf, 0, (og, wide_n), (wide_n, 1), ty)
    out2 = View(out.buf, 0, (og, oh_ow), (oh_ow, 1), out.dtype)
    taps = ((cg, kh, kw), (plane, dh * wp, dw))

    def slot_base(em, s):
        return em(f"add i64 {cols.offset}, {em(f'mul i64 {s}, {per_slot}')}")

    def slot_start(em, P, s):
        nest(em, [image_n], [(1,)], [slot_base(em, s)], lambda o_, _: store(em, P, pad_v, o_[0], literal(0, ty)))

    def one(em, P, s, i):
        base = slot_base(em, s)
        wo = em(f"add i64 {base}, {image_n}")
        xo = em(f"add i64 {x.offset}, {em(f'mul i64 {i}, {x.strides[0]}')}")
        nest(em, [c, h, wd], [(plane, wp, 1), x.strides[1:]], [em(f"add i64 {base}, {pt * wp + pl}"), xo],
             lambda o_, _: store(em, P, pad_v, o_[0], load(em, P, x, o_[1])))
        oo = em(f"add i64 {out.offset}, {em(f'mul i64 {i}, {o * oh_ow}')}")
        for g in range(groups):
            gemm_tiles(em, P, wide_v, w, pad_v, w.offset + g * og * ckk,
                       em(f"add i64 {base}, {g * cg * plane}") if g else base, wo, og, ckk, wide_n, ktaps=taps)
            nest(em, [og, oh, ow], [(wide_n, wp, 1), (oh_ow, ow, 1)],
                 [wo, em(f"add i64 {oo}, {g * og * oh_ow}") if g else oo],
                 lambda o_, _: store(em, P, out2, o_[1], load(em, P, wide_v, o_[0])))
        if epilogue is not None:
            epilogue(em, P, i)

    def emit(em, P, lo, hi):
        if out.size:
            _slot_loop(em, n, slots, lo, hi, lambda s, i: one(em, P, s, i), lambda s: slot_start(em, P, s))
    kern = _slot_kernel("conv2d", [out, x, w, cols] + list(extra_views), emit, slots, 2 * n * o * ckk * oh * wp)
    kern.conv_tiles = (out, x, w, cols, (kernel, (1, 1), pads, dilation, groups, slots, True))
    return kern


def _out_hw(x_shape, kernel, pads, dilation) -> tuple[int, int]:
    """A stride-1 convolution's output rows and columns."""
    h, w = x_shape[2:]
    return (h + pads[0][0] + pads[0][1] - dilation[0] * (kernel[0] - 1),
            w + pads[1][0] + pads[1][1] - dilation[1] * (kernel[1] - 1))


def fuse_conv_epilogue(plan, outs: list[View], ins: list[View], compute, full_shape, live=None) -> bool:
    """Replace the micro-kernel convolution planned last (conv_tiles, plan.steps[-1]) and the elementwise
    region after it (outs = compute(ins) per element of full_shape: its bias, activation, residual add)
    by one kernel that runs the region on each image right after that image's product, while its output
    is in cache, instead of a second pass over the whole batch. True when done (the caller adds nothing).
    Only outside scan bodies, when the region's shape is the convolution's (n, o, oh, ow) and it reads the
    convolution's output exactly as written (contiguous, same place); its other operands broadcast over
    it in any way. A direct convolution (direct.py) runs the region in its copy-out, from the product's block,
    and does not write its own output: only where `live` (the buffers of the region's inputs read after it;
    None: unknown) shows that nothing else reads it. LeNet batch 64 on a 2-core Zen 1: the two epilogue passes
    (bias + ReLU) took 110 and 36 us of 1.56 ms as passes of their own; fused, conv1 + pool 545 -> 522 us and
    conv2 + pool 673 -> 671 us (interleaved medians): the pass was mostly cache-resident already."""
    from ..schedule.views import broadcast_strides
    if not plan.steps or plan._loop_pos is not None or getattr(plan, "_record", None) is not None:
        return False
    prev = plan.steps[-1]
    info = getattr(prev, "conv_tiles", None)
    drct = getattr(prev, "direct_conv", None)   # direct.conv_direct: the epilogue by item, after its copy-out
    if (info is None and drct is None) or getattr(prev, "fused_epilogue", False):
        return False
    om, x, w, cols = (info or drct)[:4]
    n, o, hw = om.shape
    full = tuple(full_shape)
    if len(full) != 4 or full[0] != n or full[1] != o or full[2] * full[3] != hw:
        return False
    reads_conv = False
    for v in ins:
        if v.buf != om.buf:
            continue
        if v.literal is not None or tuple(v.shape) != full or v.offset != om.offset or \
                broadcast_strides(v, full) != contig_strides(full):
            return False
        reads_conv = True
    if not reads_conv or any(o_.buf in (om.buf, x.buf, w.buf, cols.buf) for o_ in outs) or \
            any(tuple(o_.shape) != full for o_ in outs):
        return False
    views = outs + ins
    strides = [broadcast_strides(v, full) for v in views]
    no = len(outs)
    from ..schedule.views import collapse
    dims, sts = collapse(full[1:], [s[1:] for s in strides])

    def body(em, P):
        def elements(offs, _):
            vals = [(load(em, P, v, q), v.dtype) for v, q in zip(ins, offs[no:])]
            for v, q, r in zip(outs, offs, compute(em, vals)):
                store(em, P, v, q, r)
        return elements

    def epilogue(em, P, i):
        bases = [str(v.offset) if s[0] == 0 else em(f"add i64 {v.offset}, {em(f'mul i64 {i}, {s[0]}')}")
                 for v, s in zip(views, strides)]
        nest(em, dims, sts, bases, body(em, P))

    if drct is not None and (live is None or om.buf in live):
        return False   # (the direct copy-out with the region fused never writes the convolution's own output)

    def rows_epilogue(em, P, i, o0, chans: int, r0, rows, wide, wbase, wstrides):
        # channels o0 .. o0+chans-1, output rows r0 .. r0+rows-1 of image i, the convolution's values read
        # from the item's block (wide, from wbase by wstrides): the copy-out and the region in one pass
        bases = []
        for v, s in zip(views, strides):
            b = str(v.offset)
            for idx, st in ((i, s[0]), (o0, s[1]), (r0, s[2])):
                if st:
                    b = em(f"add i64 {b}, {em(f'mul i64 {idx}, {st}')}")
            bases.append(b)

        def elements(offs, _):
            conv_v = load(em, P, wide, offs[-1])
            vals = []
            for v, q in zip(ins, offs[no:-1]):
                if v.buf == om.buf:
                    vals.append((conv_v, v.dtype))
                else:
                    vals.append((load(em, P, v, q), v.dtype))
            for v, q, r in zip(outs, offs, compute(em, vals)):
                store(em, P, v, q, r)
        nest(em, [chans, rows, full[3]], [tuple(s[1:]) for s in strides] + [tuple(wstrides)], bases + [wbase],
             elements)

    if drct is not None:
        from . import direct
        out_, planes, wp, wide, geo, slots = drct
        kern = direct.conv_direct(out_, planes, wp, wide, geo, slots, epilogue=rows_epilogue, extra_views=views)
        kern.fused_epilogue = True
        plan.pop_step()
        plan.add(kern, [planes, wp] + [v for v in ins if v.buf != om.buf], [om, wide] + outs)
        return True
    kern = conv_tiles(om, x, w, cols, *info[4], epilogue=epilogue, extra_views=views)
    kern.fused_epilogue = True
    plan.pop_step()
    plan.add(kern, [x, w] + [v for v in ins if v.buf != om.buf], [om, cols] + outs)
    return True


# ---- the adjoints: conv2d_grad_input (GEMM then col2im) ------------------------------------------------

def _col2im_image(gx: View, cols: View, kernel, stride, pads, dilation, out_hw):
    """image(em, P, gx element, cols element): gx's image (c, h, w) = the sum of every column entry
    over the input position it was read from (the adjoint of _im2col_image; cols in the default
    (c, kh, kw, oh, ow) layout). One image at a time, each channel plane zeroed then accumulated tap by
    tap in a fixed order: no two threads ever write the same plane (race-free when split by image)."""
    _, c, h, w = gx.shape
    kh, kw = kernel
    oh, ow = out_hw
    t, ty = gx.dtype, VTYPE[gx.dtype]
    tst = oh * ow

    def tap(em, P, go, co, i, j):
        r0, r1 = _valid(h, oh, i, stride[0], dilation[0], pads[0][0])
        c0, c1 = _valid(w, ow, j, stride[1], dilation[1], pads[1][0])
        base = em(f"add i64 {co}, {(i * kw + j) * tst}")

        def row(offs, idx):
            r = em(f"add i64 {idx[0]}, {r0}")
            src = em(f"add i64 {base}, {em(f'mul i64 {r}, {ow}')}")
            ih = em(f"sub i64 {em(f'mul i64 {r}, {stride[0]}')}, {pads[0][0] - i * dilation[0]}")
            dst = em(f"add i64 {go}, {em(f'mul i64 {ih}, {gx.strides[2]}')}")
            first = (c0 * stride[1] + j * dilation[1] - pads[1][0]) * gx.strides[3]

            def acc(o, _):
                cur = load(em, P, gx, o[0])
                store(em, P, gx, o[0], em(f"fadd {ty} {cur}, {load(em, P, cols, o[1])}"))
            nest(em, [c1 - c0], [(stride[1] * gx.strides[3],), (1,)],
                 [em(f"add i64 {dst}, {first}"), em(f"add i64 {src}, {c0}")], acc)
        nest(em, [r1 - r0], [()], [], row)

    def image(em, P, go, co):
        def per_channel(offs, _):
            nest(em, [h, w], [gx.strides[2:]], [offs[0]], lambda o, __: store(em, P, gx, o[0], literal(0, t)))
            for i in range(kh):
                for j in range(kw):
                    tap(em, P, offs[0], offs[1], i, j)
        nest(em, (c,), [(gx.strides[1],), (kh * kw * tst,)], [go, co], per_channel)
    return image


def col2im(gx: View, cols: View, kernel, stride, pads, dilation, out_hw) -> Kernel:
    """gx[n] = col2im(cols[n]) for every image (cols (n, c*kh*kw, oh*ow)); split by image across threads
    when large (each image's planes belong to one thread)."""
    from .kernels import PARALLEL_MIN
    image = _col2im_image(gx, cols, kernel, stride, pads, dilation, out_hw)
    n = gx.shape[0]
    per = cols.size // max(1, n)

    def emit(em, P, lo, hi):
        if gx.size:
            nest(em, (n,), [(gx.strides[0],), (per,)], [gx.offset, cols.offset],
                 lambda offs, _: image(em, P, offs[0], offs[1]), lo, hi)
    split = n if n >= 2 and cols.size >= PARALLEL_MIN else None
    return Kernel("col2im", [gx, cols], emit, split, cols.size, n)


# ---- max pooling's adjoints: the window's first maximum ------------------------------------------------

def _window_argmax(em, P, x: View, xo, oi, oj, kernel, stride, pads):
    """(row, column, in-bounds flag) of the first maximum of the window at output (oi, oj) of x's plane
    at element xo, taps in row-major order, padding read as -inf, the first NaN winning: np.argmax over
    the padded window. Row and column are clamped into the plane (a padded winner has flag false)."""
    h, w = x.shape[2:]
    ty = VTYPE[x.dtype]
    best = bi = bj = bok = None
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            ih, okh = _window_pos(em, oi, str(i), stride[0], 1, pads[0][0], h)
            iw, okw = _window_pos(em, oj, str(j), stride[1], 1, pads[1][0], w)
            xoff = em(f"add i64 {xo}, {em(f'mul i64 {ih}, {x.strides[2]}')}")
            xoff = em(f"add i64 {xoff}, {em(f'mul i64 {iw}, {x.strides[3]}')}")
            ok = em(f"and i1 {okh}, {okw}")
            v = em(f"select i1 {ok}, {ty} {load(em, P, x, xoff)}, {ty} 0xFFF0000000000000")
            if best is None:
                best, bi, bj, bok = v, ih, iw, ok
                continue
            gt = em(f"fcmp ogt {ty} {v}, {best}")
            nan = em(f"and i1 {em(f'fcmp uno {ty} {v}, {v}')}, {em(f'fcmp ord {ty} {best}, {best}')}")
            take = em(f"or i1 {gt}, {nan}")
            best = em(f"select i1 {take}, {ty} {v}, {ty} {best}")
            bi = em(f"select i1 {take}, i64 {ih}, i64 {bi}")
            bj = em(f"select i1 {take}, i64 {iw}, i64 {bj}")
            bok = em(f"select i1 {take}, i1 {ok}, i1 {bok}")
    return bi, bj, bok


def _plane_offset(em, base, i, j, v: View) -> str:
    """Element base + i * v's row stride + j * v's column stride (an NCHW view)."""
    row = em(f"mul i64 {i}, {v.strides[2]}")
    col = em(f"mul i64 {j}, {v.strides[3]}")
    return em(f"add i64 {base}, {em(f'add i64 {row}, {col}')}")


def max_pool_grad(gx: View, x: View, gy: View, kernel, stride, pads) -> Kernel:
    """gx = max_pool2d_grad(x, gy): each gy element added at its window's first maximum of x (windows
    may overlap). Per (image, channel) plane: zeroed, then accumulated in output order by one thread
    (split by image when large: race-free)."""
    from .kernels import PARALLEL_MIN
    tiling = max_pool_grad_tiling(gx, x, gy, kernel, stride, pads)
    if tiling is not None:
        return tiling
    n, c, h, w = x.shape
    oh, ow = gy.shape[2:]
    t, ty = gx.dtype, VTYPE[gx.dtype]

    def per_plane(em, P, offs):
        go, xo, yo = offs
        nest(em, [h, w], [gx.strides[2:]], [go], lambda o, _: store(em, P, gx, o[0], literal(0, t)))

        def per_out(o, idx):
            bi, bj, bok = _window_argmax(em, P, x, xo, idx[0], idx[1], kernel, stride, pads)
            goff = _plane_offset(em, go, bi, bj, gx)
            g = em(f"select i1 {bok}, {ty} {load(em, P, gy, o[0])}, {ty} {literal(0, t)}")
            store(em, P, gx, goff, em(f"fadd {ty} {load(em, P, gx, goff)}, {g}"))
        nest(em, [oh, ow], [gy.strides[2:]], [yo], per_out)

    def emit(em, P, lo, hi):
        if gx.size:
            nest(em, (n, c), [gx.strides[:2], x.strides[:2], gy.strides[:2]], [gx.offset, x.offset, gy.offset],
                 lambda offs, _: per_plane(em, P, offs), lo if n else None, hi)
    split = n if n >= 2 and gy.size * kernel[0] * kernel[1] >= PARALLEL_MIN else None
    return Kernel("max_pool2d_grad", [gx, x, gy], emit, split, gy.size * kernel[0] * kernel[1], n)


def max_pool_select(out: View, x: View, g: View, kernel, stride, pads) -> Kernel:
    """out = max_pool2d_select(x, g): g read at each window's first maximum of x (0 where that is padding)."""
    t, ty = out.dtype, VTYPE[out.dtype]

    def emit(em, P, lo, hi):
        def per_out(offs, idx):
            bi, bj, bok = _window_argmax(em, P, x, offs[1], idx[2], idx[3], kernel, stride, pads)
            goff = _plane_offset(em, offs[2], bi, bj, g)
            store(em, P, out, offs[0], em(f"select i1 {bok}, {ty} {load(em, P, g, goff)}, {ty} {literal(0, t)}"))
        if out.size:
            nest(em, out.shape, [out.strides, x.strides[:2] + (0, 0), g.strides[:2] + (0, 0)],
                 [out.offset, x.offset, g.offset], per_out)
    return Kernel("max_pool2d_select", [out, x, g], emit, None, out.size * kernel[0] * kernel[1])


def im2col_reference(cols: View, x: View, kernel, stride, pads, dilation) -> Kernel:
    """The same as im2col by one clamped load and select per element (kept as the tests' reference)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = cols.shape[-2:]
    shape = (n, c, kh, kw, oh, ow)
    ost = contig_strides(shape)
    t = x.dtype

    def emit(em, P, lo, hi):
        def body(offs, idx):
            ih, okh = _window_pos(em, idx[4], idx[2], stride[0], dilation[0], pads[0][0], h)
            iw, okw = _window_pos(em, idx[5], idx[3], stride[1], dilation[1], pads[1][0], w)
            xo = em(f"add i64 {offs[1]}, {em(f'mul i64 {ih}, {x.strides[2]}')}")
            xo = em(f"add i64 {xo}, {em(f'mul i64 {iw}, {x.strides[3]}')}")
            v = load(em, P, x, xo)
            ok = em(f"and i1 {okh}, {okw}")
            store(em, P, cols, offs[0], em(f"select i1 {ok}, {VTYPE[t]} {v}, {VTYPE[t]} 0.0"))
        xs = (x.strides[0], x.strides[1], 0, 0, 0, 0)
        if cols.size:
            nest(em, shape, [ost, xs], [cols.offset, x.offset], body)
    return Kernel("im2col", [cols, x], emit, None, cols.size)


def max_pool(out: View, x: View, kernel, stride, pads) -> Kernel:
    """out[n, c, i, j] = max over the window (padding is -inf, i.e. ignored; NaN propagates)."""
    n, c, h, w = x.shape
    t, ty = x.dtype, VTYPE[x.dtype]
    mx = _fmaxmin("ogt")
    oh, ow = out.shape[2:]
    inside = (all(p == 0 for pp in pads for p in pp) and out.size and
              (oh - 1) * stride[0] + kernel[0] <= h and (ow - 1) * stride[1] + kernel[1] <= w)
    lanes = vector_shape(t)[0]
    if inside and stride[1] in (1, 2) and x.strides[3] == 1 and t in ("float32", "float64"):
        return _max_pool_vector(out, x, kernel, stride, lanes)
    if not inside:
        padded = max_pool_padded(out, x, kernel, stride, pads)
        if padded is not None:
            return padded
    if inside:   # every window in bounds: the taps unrolled as a chain of max, no clamps or selects
        def emit_inside(em, P, lo, hi):
            def per_out(offs, _):
                acc = None
                for i in range(kernel[0]):
                    for j in range(kernel[1]):
                        v = load(em, P, x, em(f"add i64 {offs[1]}, {i * x.strides[2] + j * x.strides[3]}"))
                        acc = v if acc is None else mx(em, t, acc, v)
                store(em, P, out, offs[0], acc)
            xs = (x.strides[0], x.strides[1], x.strides[2] * stride[0], x.strides[3] * stride[1])
            nest(em, out.shape, [contig_strides(out.shape), xs], [out.offset, x.offset], per_out)
        return Kernel("max_pool2d", [out, x], emit_inside, None, out.size)

    def emit(em, P, lo, hi):
        def per_out(offs, idx):
            acc = em.alloca(ty)
            em.raw(f"store {ty} 0xFFF0000000000000, ptr {acc}")

            def tap(_, kidx):
                ih, okh = _window_pos(em, idx[2], kidx[0], stride[0], 1, pads[0][0], h)
                iw, okw = _window_pos(em, idx[3], kidx[1], stride[1], 1, pads[1][0], w)
                xo = em(f"add i64 {offs[1]}, {em(f'mul i64 {ih}, {x.strides[2]}')}")
                xo = em(f"add i64 {xo}, {em(f'mul i64 {iw}, {x.strides[3]}')}")
                ok, xv = em(f"and i1 {okh}, {okw}"), load(em, P, x, xo)
                v = em(f"select i1 {ok}, {ty} {xv}, {ty} 0xFFF0000000000000")
                em.raw(f"store {ty} {mx(em, t, em(f'load {ty}, ptr {acc}'), v)}, ptr {acc}")
            nest(em, list(kernel), [()], [], tap)
            store(em, P, out, offs[0], em(f"load {ty}, ptr {acc}"))
        if out.size:
            nest(em, out.shape, [contig_strides(out.shape), (x.strides[0], x.strides[1], 0, 0)],
                 [out.offset, x.offset], per_out)
    return Kernel("max_pool2d", [out, x], emit, None, out.size)


def _planes(em, out: View, x: View, lo, hi, body) -> None:
    """body(out plane offset, x plane offset) for the (image, channel) planes lo .. hi-1 of out (n, c, oh, ow)
    (contiguous) and x: the pooling kernels' outer loop, the range a pool chunk runs."""
    c = out.shape[1]

    def plane(p):
        img, ch = em(f"udiv i64 {p}, {c}"), em(f"urem i64 {p}, {c}")
        oo = em(f"add i64 {out.offset}, {em(f'mul i64 {p}, {out.shape[2] * out.shape[3]}')}")
        xo = em(f"add i64 {em(f'mul i64 {img}, {x.strides[0]}')}, {em(f'mul i64 {ch}, {x.strides[1]}')}")
        body(oo, em(f"add i64 {xo}, {x.offset}"))
    em.loop(hi, plane, start=lo)


def _pool_kernel(out: View, x: View, emit, kernel) -> Kernel:
    """A max-pooling kernel over planes (_planes), split across threads by plane when its taps reach
    kernels.PARALLEL_MIN (ResNet's stem pool, 64 planes of 112x112: 0.3 ms on one thread)."""
    from .kernels import PARALLEL_MIN
    planes = out.shape[0] * out.shape[1]
    work = out.size * kernel[0] * kernel[1]
    return Kernel("max_pool2d", [out, x], emit, planes if planes >= 2 and work >= PARALLEL_MIN else None, work,
                  planes)


def _vmax(em, vt: str, a: str, b: str) -> str:
    """np.maximum on vectors: NaN in either operand propagates."""
    bt = mask_type(vt)
    m = em(f"select {bt} {em(f'fcmp ogt {vt} {a}, {b}')}, {vt} {a}, {vt} {b}")
    nan = em(f"fcmp uno {vt} {a}, {a}")
    return em(f"select {bt} {nan}, {vt} {a}, {vt} {m}")


def _pick_orders(lanes: int, s1: int, itemsize: int) -> tuple[list[list[int]], list[int] | None]:
    """Shuffles that take every s1-th of lanes*s1 contiguous inputs. s1 == 2: per tap phase r, an in-lane
    pick (within each 128-bit lane, like shufps: no lane crossing) and one final order applied to the
    block's max once (max is elementwise, so the lane-crossing part commutes with it: AVX2 float32 pays
    one vpermpd per block instead of one per tap); else plain strided picks and no final order."""
    if s1 != 2:
        return [[k * s1 + r for k in range(lanes)] for r in range(s1)], None
    per = max(2, 16 // itemsize)              # elements per 128-bit lane
    if lanes % per:
        return [[k * 2 + r for k in range(lanes)] for r in range(2)], None
    picks, where = [], {}
    for r in range(2):
        order = []
        for lane in range(lanes // per):
            for half in range(2):
                for e in range(per // 2):
                    src = half * lanes + lane * per + 2 * e
                    if r == 0:
                        where[src // 2] = len(order)
                    order.append(src + r)
        picks.append(order)
    final = [where[k] for k in range(lanes)]
    return picks, (None if final == list(range(lanes)) else final)


def _max_pool_vector(out: View, x: View, kernel, stride, lanes: int) -> Kernel:
    """Max pooling with every window in bounds and column stride 1 or 2: per output row, blocks of
    `lanes` outputs. The taps of a kernel row are grouped by s1 (the column stride): one contiguous load of
    lanes*s1 inputs serves the group's taps (2x2 stride 2: both), each tap a shuffle that keeps every
    s1-th element from its phase, folded in with a NaN-propagating max. A load is masked only where it
    would read past what the block needs (a row's last, partial block; a group shorter than s1).
    (A load per tap, masked to its last needed element, took 267 us for 64x6x32x32 on a 2-core Zen 1.)"""
    n, c, oh, ow = out.shape
    t, ty = x.dtype, VTYPE[x.dtype]
    s1 = stride[1]
    # rows narrower than a vector take the widest power-of-two width that fits (64x16x10x10 pools to 5 wide:
    # 4 lanes); a row's last partial block is a full one moved back over outputs already written (the
    # same values: no masked store, slow on AMD) unless out and x share a buffer
    width = lanes if ow >= lanes else max(2, 1 << (max(ow, 1).bit_length() - 1))
    overlap = ow >= width and out.buf is not x.buf
    vec = lambda idx: "<" + ", ".join(f"i32 {i}" for i in idx) + ">"   # noqa: E731

    def block(em, P, oo, xo, j0: int, live: int, lanes: int):
        vt, wide = f"<{lanes} x {ty}>", f"<{lanes * s1} x {ty}>"
        picks, final = _pick_orders(lanes, s1, 4 if t == "float32" else 8)
        acc = None
        for i in range(kernel[0]):
            for q in range(-(-kernel[1] // s1)):
                taps = range(q * s1, min(kernel[1], (q + 1) * s1))
                need = (live - 1) * s1 + (taps[-1] - q * s1) + 1     # inputs this group reads
                off = em(f"add i64 {xo}, {i * x.strides[2] + (j0 + q) * s1 * x.strides[3]}")
                v = vload(em, P, x, off, wide, lanes * s1, need)
                for j in taps:
                    tv = v if s1 == 1 else em(f"shufflevector {wide} {v}, {wide} poison, <{lanes} x i32> "
                                              f"{vec(picks[j - q * s1])}")
                    acc = tv if acc is None else _vmax(em, vt, acc, tv)
        if final is not None:
            acc = em(f"shufflevector {vt} {acc}, {vt} poison, <{lanes} x i32> {vec(final)}")
        vstore(em, P, out, em(f"add i64 {oo}, {j0}"), acc, vt, lanes, live)

    def emit(em, P, lo, hi):
        def per_row(offs, _):
            for j0 in range(0, ow, width):
                live = min(width, ow - j0)
                if live < width and overlap:
                    block(em, P, offs[0], offs[1], ow - width, width, width)
                else:
                    block(em, P, offs[0], offs[1], j0, live, width)
        _planes(em, out, x, lo, hi, lambda oo, xo: nest(em, (oh,), [(ow,), (x.strides[2] * stride[0],)], [oo, xo],
                                                          per_row))
    return _pool_kernel(out, x, emit, kernel)


# ---- work split into slots: convolutions as independent items over the kernel `split` -----------------------
#
# A convolution kernel's work is a list of items (an image, a block of an image's output rows, a block of
# its output channels); the items are cut into `slots` contiguous runs and the kernel's outer loop runs over
# slots (Kernel.split = slots, one pool chunk each: Kernel.chunks). A slot owns a scratch tile in the arena
# (its im2col columns, its GEMM result), so no two threads ever share one: race-free with any thread count,
# and the same sums in the same order whatever the thread count (the slot count depends on it only through
# which items run together, never on how one item is computed).

#: convolution kernels of at least this many flops split their items across threads
SPLIT_FLOPS = 1 << 21
#: elements of one slot's im2col tile in the BLAS path (rows of output blocked to about this: ~384 KiB of
#: float32, inside Zen 2's 512 KiB L2 with the BLAS packing buffers' hot part)
TILE_ELEMS = 96 * 1024


def threads() -> int:
    from . import tune
    return tune.threads()


def slot_count(items: int, flops: int) -> int:
    """Slots the items are cut into: 1 (one thread) for small work or one thread, else up to two per
    thread (the pool's threads claim them dynamically: a late or descheduled thread leaves its share)."""
    t = threads()
    if t <= 1 or items < 2 or flops < SPLIT_FLOPS:
        return 1
    return min(items, 2 * t)


def _slot_loop(em, items: int, slots: int, lo, hi, body, start=None) -> None:
    """for s in [lo, hi): start(s) (when given: a slot's set-up, e.g. zeroing its scratch), then for it in
    [s * items // slots, (s + 1) * items // slots): body(s, it)."""
    def per_slot(s):
        if start is not None:
            start(s)
        i0 = em(f"udiv i64 {em(f'mul i64 {s}, {items}')}, {slots}")
        s1 = em(f"add i64 {s}, 1")
        i1 = em(f"udiv i64 {em(f'mul i64 {s1}, {items}')}, {slots}")
        em.loop(i1, lambda it: body(s, it), start=i0)
    em.loop(hi, per_slot, start=lo)


def _slot_kernel(name: str, views, emit, slots: int, flops: int, blas: bool = False) -> Kernel:
    """A kernel over slots: one pool chunk per slot (program._chunks). `blas`: its items call BLAS, so a
    split run has OpenBLAS's (process-wide) thread count set to 1 around the whole dispatch
    (program._parallel_call, blas_pinned): the items' own set-and-restore (blas_gemm) then never races a
    larger count back in while another thread's call runs."""
    kern = Kernel(name, views, emit, slots if slots >= 2 else None, flops, slots)
    kern.chunks = slots
    kern.blas_pinned = bool(blas and slots >= 2)
    if slots >= 2:
        kern.threads = threads()
    return kern


def blas_gemm(em, P, c: View, a: View, b: View, ao, bo, co, n: int, k: int, m: int, lda: int, ldb: int,
              ldc: int, ta: bool = False, tb: bool = False) -> None:
    """c (n x m, row stride ldc) = op(a) (n x k) @ op(b) (k x m) by one CBLAS gemm (gemm.declarations) on
    the calling thread only (OpenBLAS's thread count for this thread set to 1 around the call: the
    convolution kernels split their own items across threads)."""
    from . import jit, tune
    from .gemm import NO_TRANS, ROW_MAJOR, TRANS
    from .kernels import guarded, ptr_at
    it = "i64" if jit.blas()["ilp64"] else "i32"
    ty, p = VTYPE[c.dtype], "s" if c.dtype == "float32" else "d"
    one, zero = literal(1.0, c.dtype), literal(0.0, c.dtype)
    span_a = (k - 1) * lda + n - 1 if ta else (n - 1) * lda + k - 1
    span_b = (m - 1) * ldb + k - 1 if tb else (k - 1) * ldb + m - 1
    spans = [(a, ao, span_a), (b, bo, span_b), (c, co, (n - 1) * ldc + m - 1)]
    pin = tune.set_threads_symbol() is not None

    def body():
        prev = em("call i32 @gc_blas_set_threads(i32 1)") if pin else None
        em.raw(f"call void @gc_cblas_{p}gemm(i32 {ROW_MAJOR}, i32 {TRANS if ta else NO_TRANS}, "
               f"i32 {TRANS if tb else NO_TRANS}, {it} {n}, {it} {m}, {it} {k}, {ty} {one}, "
               f"ptr {ptr_at(em, P, a, ao)}, {it} {lda}, ptr {ptr_at(em, P, b, bo)}, {it} {ldb}, {ty} {zero}, "
               f"ptr {ptr_at(em, P, c, co)}, {it} {ldc})")
        if pin:
            em(f"call i32 @gc_blas_set_threads(i32 {prev})")
    if n and m:
        guarded(em, spans, body)


def _im2col_rows(em, P, tile: View, x: View, to, xo, r0, rows, ld: int, kernel, stride, pads, dilation,
                 out_hw) -> None:
    """tile[(ch, i, j), rr * ow + q] (row stride ld) = x's image at xo, output rows r0 .. r0+rows-1 (r0 and
    rows ints or run-time values): per tap (_taps), a row copy over its in-bounds columns (a range known per
    tap) and zeros outside; a row read from the padding is zeros (its source row clamped, the loaded values
    selected away)."""
    c, h, w = x.shape[1:]
    kh, kw = kernel
    oh, ow = out_hw
    t, ty = x.dtype, VTYPE[x.dtype]
    zero = literal(0, t)
    cols_ = [_valid(w, ow, j, stride[1], dilation[1], pads[1][0]) for j in range(kw)]

    def tap(to_c, xo_c, i, j, pick):
        q0, q1 = pick([0] * kh, [q[0] for q in cols_])[1], pick([0] * kh, [q[1] for q in cols_])[1]
        base = _add(em, to_c, _mul(em, _add(em, _mul(em, i, kw), j), ld))
        ioff = _sub(em, pads[0][0], _mul(em, i, dilation[0]))
        first = _mul(em, _sub(em, _add(em, _mul(em, q0, stride[1]), _mul(em, j, dilation[1])), pads[1][0]),
                     x.strides[3])

        def row(_o, idx):
            r = em(f"add i64 {r0}, {idx[0]}")
            ih = em(f"sub i64 {em(f'mul i64 {r}, {stride[0]}')}, {ioff}")
            ok = em(f"and i1 {em(f'icmp sge i64 {ih}, 0')}, {em(f'icmp slt i64 {ih}, {h}')}")
            ihc = em(f"select i1 {ok}, i64 {ih}, i64 0")
            src = em(f"add i64 {xo_c}, {em(f'mul i64 {ihc}, {x.strides[2]}')}")
            dst = em(f"add i64 {base}, {em(f'mul i64 {idx[0]}, {ow}')}")
            nest(em, [q0], [(1,)], [dst], lambda o, __: store(em, P, tile, o[0], zero))

            def cp(o, __):
                v = load(em, P, x, o[1])
                store(em, P, tile, o[0], em(f"select i1 {ok}, {ty} {v}, {ty} {zero}"))
            nest(em, [_sub(em, q1, q0)], [(1,), (stride[1] * x.strides[3],)],
                 [_add(em, dst, q0), em(f"add i64 {src}, {first}")], cp)
            nest(em, [_sub(em, ow, q1)], [(1,)], [_add(em, dst, q1)],
                 lambda o, __: store(em, P, tile, o[0], zero))
        nest(em, [rows], [()], [], row)

    def per_channel(offs, _):
        _taps(em, kernel, lambda i, j, pick: tap(offs[0], offs[1], i, j, pick))
    nest(em, (c,), [(kh * kw * ld,), (x.strides[1],)], [to, xo], per_channel)


def conv_blas(out: View, x: View, w: View, tile: View, kernel, stride, pads, dilation, groups: int,
              plan_: dict) -> Kernel:
    """out (n, o, oh*ow) = W (o, c/g*kh*kw) @ im2col(x) by items, each one BLAS call per group on one
    thread: plan_["mode"] "rows": an item is a block of R output rows of one image (its columns im2col'd
    into the slot's tile, (c*kh*kw) x (R*ow), then out[:, rows] = W @ tile with the row stride oh*ow);
    "channels": an item is a block of output channels of one image (the image's whole im2col in the tile:
    for layers whose weights outweigh an image's columns, so each item reads W once)."""
    n, c = x.shape[:2]
    o, ckk = w.shape            # ckk: one group's c/g*kh*kw
    og = o // groups
    oh, ow = plan_["out_hw"]
    hw = oh * ow
    slots, mode = plan_["slots"], plan_["mode"]
    per_slot = tile.size // slots
    flops = 2 * n * o * ckk * hw

    if mode == "rows":
        R = plan_["rows"]
        blocks = -(-oh // R)
        items = n * blocks
        tail = oh - (blocks - 1) * R

        def item(em, P, s, it):
            img, blk = em(f"udiv i64 {it}, {blocks}"), em(f"urem i64 {it}, {blocks}")
            to = em(f"add i64 {tile.offset}, {em(f'mul i64 {s}, {per_slot}')}")
            xo = em(f"add i64 {x.offset}, {em(f'mul i64 {img}, {x.strides[0]}')}")
            r0 = em(f"mul i64 {blk}, {R}")
            last = None if tail == R else em(f"icmp eq i64 {blk}, {blocks - 1}")
            # one im2col for both block heights (the row count a run-time value: one copy of the tap loops)
            rows = R if last is None else em(f"select i1 {last}, i64 {tail}, i64 {R}")
            _im2col_rows(em, P, tile, x, to, xo, r0, rows, R * ow, kernel, stride, pads, dilation, (oh, ow))
            oi = em(f"add i64 {out.offset}, {em(f'mul i64 {img}, {o * hw}')}")
            oo = em(f"add i64 {oi}, {em(f'mul i64 {r0}, {ow}')}")

            def products(rows: int):
                for g in range(groups):
                    blas_gemm(em, P, out, w, tile, w.offset + g * og * ckk, em(f"add i64 {to}, {g * ckk * R * ow}"),
                              em(f"add i64 {oo}, {g * og * hw}"), og, ckk, rows * ow, ckk, R * ow, hw)
            if last is None:
                products(R)
                return
            em.if_(em(f"xor i1 {last}, true"), lambda: products(R))
            em.if_(last, lambda: products(tail))
    else:
        ob = plan_["oblock"]
        blocks = -(-o // ob)
        items = n * blocks
        cols = View(tile.buf, 0, (c,) + tuple(kernel) + (oh, ow), contig_strides((c,) + tuple(kernel) + (oh, ow)),
                    tile.dtype)
        image = _im2col_image(cols, x, kernel, stride, pads, dilation)

        def item(em, P, s, it):
            img, blk = em(f"udiv i64 {it}, {blocks}"), em(f"urem i64 {it}, {blocks}")
            to = em(f"add i64 {tile.offset}, {em(f'mul i64 {s}, {per_slot}')}")
            xo = em(f"add i64 {x.offset}, {em(f'mul i64 {img}, {x.strides[0]}')}")
            image(em, P, to, xo)
            o0 = em(f"mul i64 {blk}, {ob}")
            oi = em(f"add i64 {out.offset}, {em(f'mul i64 {img}, {o * hw}')}")
            oo = em(f"add i64 {oi}, {em(f'mul i64 {o0}, {hw}')}")
            wo = em(f"add i64 {w.offset}, {em(f'mul i64 {o0}, {ckk}')}")
            rest = o - (blocks - 1) * ob

            by_block_size(em, blk, blocks, ob, rest,
                          lambda rows: blas_gemm(em, P, out, w, tile, wo, to, oo, rows, ckk, hw, ckk, hw, hw))

    def emit(em, P, lo, hi):
        if out.size:
            _slot_loop(em, items, slots, lo, hi, lambda s, it: item(em, P, s, it))
    return _slot_kernel("conv2d", [out, x, w, tile], emit, slots, flops, blas=True)


def by_block_size(em, blk, blocks: int, size: int, rest: int, body) -> None:
    """body(size) for block `blk` (an i64 value) of `blocks`, body(rest) for the last one where it is
    shorter: one copy of the body per block size (the sizes are constants in it)."""
    if rest == size:
        body(size)
        return
    last = em(f"icmp eq i64 {blk}, {blocks - 1}")
    em.if_(em(f"xor i1 {last}, true"), lambda: body(size))
    em.if_(last, lambda: body(rest))


def blas_conv_plan(n: int, c: int, o: int, ckk: int, out_hw, groups: int, flops: int) -> dict:
    """How conv_blas cuts the work: output-channel blocks when one image's columns (ckk x oh*ow) are smaller
    than the weights (o x ckk) and there is no grouping (where the batch has too few images, the fewest
    blocks per image that give each thread as many), else blocks of output rows (tile <= TILE_ELEMS),
    enough items for two per thread where the batch alone has too few."""
    oh, ow = out_hw
    hw = oh * ow
    t = threads()
    want = 2 * t if t > 1 and flops >= SPLIT_FLOPS else 1
    if groups == 1 and o > hw:
        # where the batch is short, just enough blocks per image for a whole number of items per thread: every
        # block of an image im2cols the whole image and BLAS packs all of its columns again, so two blocks
        # per thread (ResNet's stride-2 convolutions at batch 1) cost 17% more CPU time than one
        from math import gcd
        per_img = 1 if n >= want else min(t // gcd(n, t), max(1, o // 32))
        ob = -(-o // per_img)
        ob = -(-ob // 8) * 8 if ob > 8 else ob
        items = n * -(-o // ob)
        slots = slot_count(items, flops)
        return {"mode": "channels", "oblock": ob, "slots": slots, "tile": ckk * hw, "out_hw": out_hw}
    R = max(1, min(oh, TILE_ELEMS // max(1, ckk * ow)))
    if n * -(-oh // R) < want:
        R = max(1, min(R, oh * n // want))
    items = n * -(-oh // R)
    slots = slot_count(items, flops)
    return {"mode": "rows", "rows": R, "slots": slots, "tile": ckk * R * ow, "out_hw": out_hw}


# ---- the plan rows (backends/llvm/plan.py delegates its convolution rows here) ------------------------------

def plan_conv2d(plan, node, ins) -> None:
    """conv2d: the micro-kernel image by image for small products (im2col of one image into its slot,
    then its product while in cache), one-thread BLAS calls over blocks of output rows or channels for
    large ones (conv_blas), split across threads by slot; integer convolutions: im2col + the loop GEMM."""
    import os
    from . import gemm
    from .lower import NotLowerable
    t, a = node.outputs[0], node.attrs
    if ins[0].dtype != ins[1].dtype or ins[0].dtype != t.dtype:
        raise NotLowerable("conv2d")
    ct, (x, w) = plan._compute_operands(t, ins, lambda v: v.literal is None)
    g = a["groups"]
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    oshape = plan.shape(t)
    og, ckk, hw = o // g, cg * kh * kw, oshape[2] * oshape[3]
    flops = 2 * n * o * ckk * hw
    wm = w if w.contiguous else plan.materialise(w)
    w2 = View(wm.buf, wm.offset, (o, ckk), (ckk, 1), wm.dtype)
    args = ((kh, kw), a["stride"], a["pads"], a["dilation"])
    from . import winograd
    m = winograd.tile_size(x, wm, a["stride"], a["dilation"], g, oshape[2:])
    if m:   # 3x3 stride 1 with enough channels and tiles: F(m x m, 3 x 3) (winograd.py)
        out = plan._compute_out(t, ct)
        winograd.plan_winograd(plan, out, x, wm, a["pads"], m)
        plan._store_rounded(t, out)
        return
    from . import direct
    drct = direct.rule(x, wm, a["stride"], a["dilation"], g, oshape[2:])
    if drct and direct.forced():   # (forced: also the small products the micro-kernel takes image by image)
        direct.plan_direct(plan, t, ct, x, wm, (kh, kw), a["stride"], a["pads"], oshape)
        return
    if plan._conv_tiles(og, ckk, hw, x.dtype, 2 if g == 1 else 1):
        slots = slot_count(n, flops)
        grid = wide_grid(x.shape, (kh, kw), a["stride"], a["pads"], a["dilation"], oshape[2:])
        if grid is not None and os.environ.get(WIDE_ENV, "1") != "all" and \
                not wide_pays(grid, x.shape, o, ckk, oshape[2:], x.dtype, g):
            grid = None
        if grid is not None:   # per slot: the padded image, then one image's wide output
            cols = plan.fresh(None, (slots, grid["image"] + o * grid["wide"]), x.dtype)
        else:
            cols = plan.fresh(None, (slots, c, kh, kw) + oshape[2:], x.dtype)
        out = plan._compute_out(t, ct)
        om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
        plan.add(conv_tiles(om, x, w2, cols, *args, g, slots, grid is not None), [x, w2], [om, cols])
        plan._store_rounded(t, out)
        return
    if drct:
        direct.plan_direct(plan, t, ct, x, wm, (kh, kw), a["stride"], a["pads"], oshape)
        return
    if turned_rule(n, g, o, ckk, hw, x.dtype) and gemm.use_blas(x, w2, x):
        _plan_turned(plan, t, ct, x, w2, args, c, o, ckk, hw, oshape)
        return
    if gemm.use_blas(x, w2, x):
        how = blas_conv_plan(n, c, o, ckk * g, oshape[2:], g, flops)
        tile = plan.fresh(None, (how["slots"], how["tile"]), x.dtype)
        out = plan._compute_out(t, ct)
        om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
        plan.add(conv_blas(om, x, w2, tile, *args, g, how), [x, w2], [om, tile])
        plan._store_rounded(t, out)
        return
    cols = plan.fresh(None, (n, c, kh, kw) + oshape[2:], x.dtype)
    plan.add(im2col(cols, x, *args), [x], [cols])
    out = plan._compute_out(t, ct)
    if g == 1:
        wv = View(wm.buf, wm.offset, (1, o, ckk), (0, ckk, 1), wm.dtype)
        cm = View(cols.buf, cols.offset, (n, ckk, hw), (ckk * hw, hw, 1), cols.dtype)
        om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
    else:
        wv = View(wm.buf, wm.offset, (1, g, og, ckk), (0, og * ckk, ckk, 1), wm.dtype)
        cm = View(cols.buf, cols.offset, (n, g, ckk, hw), contig_strides((n, g, ckk, hw)), cols.dtype)
        om = View(out.buf, out.offset, (n, g, og, hw), contig_strides((n, g, og, hw)), out.dtype)
    plan.add(gemm.matmul(om, wv, cm), [wv, cm], [om])
    plan._store_rounded(t, out)


#: one image's convolution (batch 1) with at most this many output pixels, which the size rule gives to
#: BLAS, runs turned round (turned_rule). W10 b1 on the Intel Xeon (its 7x7 stride-2 and 1x1 convolutions;
#: in-process A/B, 12 interleaved rounds, twice): 11.74 -> 11.58 and 12.50 -> 12.16 ms; with 256 (the 14x14
#: ones too, their columns read across) even
TURNED_HW = 64


def turned_rule(n: int, g: int, o: int, ckk: int, hw: int, dtype: str) -> bool:
    """Whether conv2d (batch 1, one group) runs as out^T (hw x O) = cols^T (hw x C*kh*kw) @ W^T over W^T packed
    in the micro-kernel's panels (a prologue step for a weight), then out = its transpose: for few output
    pixels (ResNet's 7x7 stride-2 and 1x1 convolutions at batch 1) OpenBLAS packs the whole weight every call
    for a narrow product. GRAPHC_LLVM_CONV_TURN=0 / 1 turns it off / forces it (any batch-1, one-group float
    convolution the size rule gives to BLAS); a forced GRAPHC_LLVM_SMALL_GEMM keeps BLAS."""
    import os
    mode = os.environ.get("GRAPHC_LLVM_CONV_TURN", "auto")
    if mode == "0" or n != 1 or g != 1 or dtype not in ("float32", "float64") or ckk < 1:
        return False
    if os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto") != "auto":
        return False
    return mode == "1" or (hw <= TURNED_HW and o >= 16)


def _plan_turned(plan, t, ct, x: View, w2: View, args, c: int, o: int, ckk: int, hw: int, oshape) -> None:
    """The turned convolution (turned_rule): im2col, W^T packed (hoisted when W is a weight), the micro-kernel
    product over the columns read transposed (split by column blocks of O), the transposing copy into out."""
    from . import gemm
    from .kernels import copy
    (kh, kw) = args[0]
    dt = x.dtype
    cols = plan.fresh(None, (1, c, kh, kw) + tuple(oshape[2:]), dt)
    plan.add(im2col(cols, x, *args), [x], [cols])
    nr = gemm.panel_width(hw, dt)
    pk = plan.fresh(None, (gemm.packed_size(ckk, o, nr),), dt)
    plan.add(gemm.pack_panels(pk, View(w2.buf, w2.offset, (ckk, o), (1, ckk), dt), nr), [w2], [pk])
    bp = View(pk.buf, pk.offset, (ckk, o), (nr, 1), dt)
    at = View(cols.buf, cols.offset, (hw, ckk), (1, hw), dt)
    out_t = plan.fresh(None, (hw, o), dt)
    plan.add(gemm.matmul(out_t, at, bp, blas="tiles", packed=True), [at, bp], [out_t])
    out = plan._compute_out(t, ct)
    om = View(out.buf, out.offset, (o, hw), (hw, 1), out.dtype)
    plan.add(copy(om, View(out_t.buf, out_t.offset, (o, hw), (1, o), dt)), [out_t], [om])
    plan._store_rounded(t, out)


# ---- conv2d_grad_weight: per image, a dot-product micro-kernel over its columns ------------------------------

def _hsum(em, v: str, lanes: int, ty: str) -> str:
    """The sum of a vector's lanes (a tree of halves: no intrinsic declaration needed)."""
    while lanes > 1:
        half = lanes // 2
        lo = em(f"shufflevector <{lanes} x {ty}> {v}, <{lanes} x {ty}> poison, <{half} x i32> <"
                + ", ".join(f"i32 {i}" for i in range(half)) + ">")
        hi = em(f"shufflevector <{lanes} x {ty}> {v}, <{lanes} x {ty}> poison, <{half} x i32> <"
                + ", ".join(f"i32 {i}" for i in range(half, lanes)) + ">")
        v, lanes = em(f"fadd <{half} x {ty}> {lo}, {hi}"), half
    return em(f"extractelement <1 x {ty}> {v}, i64 0")


def f_add(x, c) -> str:
    return f"add i64 {x}, {c}"


def dot_tiles(em, P, out: View, a: View, b: View, ao, bo, oo, n: int, k: int, m: int, lda: int, ldb: int,
              ldo: int) -> None:
    """out[i, j] += sum_p a[i, p] * b[j, p] (row strides lda, ldb, ldo; both operands contiguous along p):
    tiles of mr x nr dot products held as vectors along p (one multiply-add per pair and step, the lanes
    summed once at the end), the last partial vector by masked loads."""
    t, ty = out.dtype, VTYPE[out.dtype]
    lanes, nv, _ = vector_shape(t)
    mr, nr = (4, 6) if nv == 4 else (3, 4)
    vt = f"<{lanes} x {ty}>"
    full, tail = divmod(k, lanes)

    def tile(i0, j0, h: int, wd: int):
        acc = [[em.alloca(vt) for _ in range(wd)] for _ in range(h)]
        for row in acc:
            for x in row:
                em.raw(f"store {vt} zeroinitializer, ptr {x}")
        def at(base, idx, plus, ld):
            return em(f"add i64 {base}, {em(f'mul i64 {em(f_add(idx, plus))}, {ld}')}")
        arow = [at(ao, i0, r, lda) for r in range(h)]
        brow = [at(bo, j0, q, ldb) for q in range(wd)]

        def step(p0, live):
            av = [vload(em, P, a, em(f"add i64 {arow[r]}, {p0}"), vt, lanes, live) for r in range(h)]
            bv = [vload(em, P, b, em(f"add i64 {brow[q]}, {p0}"), vt, lanes, live) for q in range(wd)]
            for r in range(h):
                for q in range(wd):
                    cur = em(f"load {vt}, ptr {acc[r][q]}")
                    prod = em(f"fmul contract {vt} {av[r]}, {bv[q]}")
                    em.raw(f"store {vt} {em(f'fadd contract {vt} {cur}, {prod}')}, ptr {acc[r][q]}")
        em.loop(full, lambda pp: step(em(f"mul i64 {pp}, {lanes}"), lanes))
        if tail:
            step(str(full * lanes), tail)
        for r in range(h):
            orow = at(oo, i0, r, ldo)
            for q in range(wd):
                off = em(f"add i64 {orow}, {em(f'add i64 {j0}, {q}')}")
                s = _hsum(em, em(f"load {vt}, ptr {acc[r][q]}"), lanes, ty)
                store(em, P, out, off, em(f"fadd {ty} {load(em, P, out, off)}, {s}"))

    def col_block(j0, wd: int):
        fr, rr = divmod(n, mr)
        em.loop(fr, lambda ib: tile(em(f"mul i64 {ib}, {mr}"), j0, mr, wd))
        if rr:
            tile(str(fr * mr), j0, rr, wd)
    fc, rc = divmod(m, nr)
    em.loop(fc, lambda jb: col_block(em(f"mul i64 {jb}, {nr}"), nr))
    if rc:
        col_block(str(fc * nr), rc)


def conv_grad_weight(gw: View, x: View, gy: View, tile: View, kernel, stride, pads, dilation, groups: int,
                     slots: int) -> Kernel:
    """gw (slots, o, c/g*kh*kw): slot s's sum over its images i of gy_i,g (o/g, oh*ow) . im2col(x_i)_g^T per
    group g (gy contiguous): per image, its columns (c*kh*kw, oh*ow) into the slot's tile, then the
    dot-product micro-kernel adds into the slot's partial sums (zeroed when the slot starts)."""
    n, c = x.shape[:2]
    _, o, ckk = gw.shape
    og = o // groups
    oh, ow = gy.shape[2:]
    hw = oh * ow
    per_slot = tile.size // slots
    cols = View(tile.buf, 0, (c,) + tuple(kernel) + (oh, ow), contig_strides((c,) + tuple(kernel) + (oh, ow)),
                tile.dtype)
    image = _im2col_image(cols, x, kernel, stride, pads, dilation)
    t = gw.dtype

    def one(em, P, s, i):
        to = em(f"add i64 {tile.offset}, {em(f'mul i64 {s}, {per_slot}')}")
        po = em(f"add i64 {gw.offset}, {em(f'mul i64 {s}, {o * ckk}')}")
        image(em, P, to, em(f"add i64 {x.offset}, {em(f'mul i64 {i}, {x.strides[0]}')}"))
        go = em(f"add i64 {gy.offset}, {em(f'mul i64 {i}, {o * hw}')}")
        for g in range(groups):
            dot_tiles(em, P, gw, gy, tile, em(f"add i64 {go}, {g * og * hw}"), em(f"add i64 {to}, {g * ckk * hw}"),
                      em(f"add i64 {po}, {g * og * ckk}"), og, hw, ckk, hw, hw, ckk)

    def zero_parts(em, P, s):
        po = em(f"add i64 {gw.offset}, {em(f'mul i64 {s}, {o * ckk}')}")
        nest(em, [o * ckk], [(1,)], [po], lambda off, _: store(em, P, gw, off[0], literal(0, t)))

    def emit(em, P, lo, hi):
        if gw.size:
            _slot_loop(em, n, slots, lo, hi, lambda s, i: one(em, P, s, i), lambda s: zero_parts(em, P, s))
    return _slot_kernel("conv2d_grad_weight", [gw, x, gy, tile], emit, slots, 2 * n * o * ckk * hw)


def sum_slots(out: View, parts: View) -> Kernel:
    """out = parts[0] + parts[1] + ... (the slots' partial sums, in slot order)."""
    slots = parts.shape[0]
    size = out.size
    ty = VTYPE[out.dtype]

    def emit(em, P, lo, hi):
        def body(offs, _):
            acc = load(em, P, parts, offs[1])
            for s in range(1, slots):
                acc = em(f"fadd {ty} {acc}, {load(em, P, parts, em(f'add i64 {offs[1]}, {s * size}'))}")
            store(em, P, out, offs[0], acc)
        if size:
            nest(em, [size], [(1,), (1,)], [out.offset, parts.offset], body)
    return Kernel("sum_slots", [out, parts], emit, None, size * slots)


def plan_conv2d_grad_weight(plan, node, ins) -> None:
    """conv2d_grad_weight: per image (slots split across threads) im2col into the slot's tile and the dot
    micro-kernel into the slot's partial sums, then the partials summed (one slot: directly into gw)."""
    from .lower import NotLowerable
    t, a = node.outputs[0], node.attrs
    if ins[0].dtype != ins[1].dtype or ins[0].dtype != t.dtype:
        raise NotLowerable("conv2d_grad_weight")
    ct, (x,) = plan._compute_operands(t, ins[:1], lambda v: v.literal is None)
    _, (gy,) = plan._compute_operands(t, ins[1:], lambda v: v.contiguous)
    if ct not in ("float32", "float64"):
        _grad_weight_gemm(plan, t, a, ct, x, gy)
        return
    g = a["groups"]
    n, c = x.shape[:2]
    kh, kw = a["kernel"]
    o, oh, ow = gy.shape[1:]
    ckk = c // g * kh * kw
    flops = 2 * n * o * ckk * oh * ow
    slots = slot_count(n, flops)
    gw = plan._compute_out(t, ct)
    lanes = vector_shape(ct)[0]
    if o // g >= lanes:      # vectors along the output channels: the GEMM form over batches of images
        hw = oh * ow
        batch = max(1, min(-(-n // slots), TILE_ELEMS // max(1, c * kh * kw * hw)))
        tile = plan.fresh(None, (slots, c * kh * kw * batch * hw), ct)
        gyt = plan.fresh(None, (slots, batch * hw * o), ct)
        res = plan.fresh(None, (slots, ckk * (o // g)), ct)
        part = plan.fresh(None, (slots, g, ckk, o // g), ct)
        plan.add(conv_grad_weight_gemm(part, x, gy, tile, gyt, res, (kh, kw), a["stride"], a["pads"],
                                       a["dilation"], g, slots, batch), [x, gy], [part, tile, gyt, res])
        gv = View(gw.buf, gw.offset, (o, ckk), (ckk, 1), ct)
        plan.add(sum_slots_transposed(gv, part), [part], [gv])
        plan._store_rounded(t, gw)
        return
    tile = plan.fresh(None, (slots, c * kh * kw * oh * ow), ct)
    parts = gw if slots == 1 else plan.fresh(None, (slots, o, ckk), ct)
    pv = View(parts.buf, parts.offset, (slots, o, ckk), contig_strides((slots, o, ckk)), ct)
    plan.add(conv_grad_weight(pv, x, gy, tile, (kh, kw), a["stride"], a["pads"], a["dilation"], g, slots),
             [x, gy], [pv, tile])
    if slots > 1:
        gv = View(gw.buf, gw.offset, (o * ckk,), (1,), ct)
        plan.add(sum_slots(gv, View(parts.buf, parts.offset, (slots, o * ckk), (o * ckk, 1), ct)), [pv], [gv])
    plan._store_rounded(t, gw)


def _grad_weight_gemm(plan, t, a, ct, x: View, gy: View) -> None:
    """conv2d_grad_weight of non-float dtypes: gw_g = gy_g (o/g, n*oh*ow) @ rows_g, rows = im2col(x) in
    patch-rows layout (n*oh*ow, c*kh*kw), gy reordered to (o, n*oh*ow); the plan's GEMM choice."""
    from . import kernels as K
    g = a["groups"]
    n, c = x.shape[:2]
    kh, kw = a["kernel"]
    o, oh, ow = gy.shape[1:]
    og, kk, hw = o // g, kh * kw, oh * ow
    ckk = c // g * kk
    rows = plan.fresh(None, (n * hw, c * kk), ct)
    plan.add(im2col(rows, x, (kh, kw), a["stride"], a["pads"], a["dilation"], (oh, ow), (kk, 1, c * kk)), [x], [rows])
    gt = gy
    if n > 1:
        gt = plan.fresh(None, (o, n, hw), ct)
        plan.add(K.copy(gt, View(gy.buf, gy.offset, (o, n, hw), (hw, o * hw, 1), gy.dtype)), [gy], [gt])
    gw = plan._compute_out(t, ct)
    plan._matmul_views(View(gw.buf, gw.offset, (g, og, ckk), contig_strides((g, og, ckk)), gw.dtype),
                       View(gt.buf, gt.offset, (g, og, n * hw), (og * n * hw, n * hw, 1), gt.dtype),
                       View(rows.buf, rows.offset, (g, n * hw, ckk), (ckk, c * kk, 1), rows.dtype))
    plan._store_rounded(t, gw)


# ---- max pooling: vector paths for padded windows (forward) and tiling windows (backward) ----------------------

def _splat(em, vt: str, ty: str, lanes: int, val: str) -> str:
    one = em(f"insertelement {vt} poison, {ty} {val}, i64 0")
    return em(f"shufflevector {vt} {one}, {vt} poison, <{lanes} x i32> zeroinitializer")


def _deinterleave(em, P, x: View, off, lanes: int, s1: int, ty: str, live: int) -> str:
    """The `live` (<= lanes) elements x[off], x[off + s1], ... as a vector (one wide load and a shuffle)."""
    wide = f"<{lanes * s1} x {ty}>"
    v = vload(em, P, x, off, wide, lanes * s1, (live - 1) * s1 + 1)
    if s1 == 1:
        return v
    pick = "<" + ", ".join(f"i32 {i * s1}" for i in range(lanes)) + ">"
    return em(f"shufflevector {wide} {v}, {wide} poison, <{lanes} x i32> {pick}")


def max_pool_padded(out: View, x: View, kernel, stride, pads) -> Kernel | None:
    """Max pooling with padding, column stride 1 or 2, unit-stride rows: per output row, the columns whose
    windows lie inside the row horizontally run as vectors (a window row read from the padding is -inf:
    its source row clamped, the loaded vector selected away), the few border columns one by one with
    clamped taps. None where the vector path does not apply."""
    n, c, oh, ow = out.shape
    h, w = x.shape[2:]
    t, ty = x.dtype, VTYPE[x.dtype]
    s1 = stride[1]
    if s1 not in (1, 2) or x.strides[3] != 1 or t not in ("float32", "float64") or not out.size:
        return None
    lanes = vector_shape(t)[0]
    vt = f"<{lanes} x {ty}>"
    j0s = [_valid(w, ow, j, s1, 1, pads[1][0]) for j in range(kernel[1])]
    jc0, jc1 = max(lo for lo, _ in j0s), min(hi for _, hi in j0s)
    if jc1 <= jc0:
        return None
    ninf = "0xFFF0000000000000"
    mx = _fmaxmin("ogt")

    def per_row(em, P, oo, xo, oi):
        rows = []
        for i in range(kernel[0]):
            ih = em(f"sub i64 {em(f'mul i64 {oi}, {stride[0]}')}, {pads[0][0] - i}")
            ok = em(f"and i1 {em(f'icmp sge i64 {ih}, 0')}, {em(f'icmp slt i64 {ih}, {h}')}")
            ihc = em(f"select i1 {ok}, i64 {ih}, i64 0")
            rows.append((ok, em(f"add i64 {xo}, {em(f'mul i64 {ihc}, {x.strides[2]}')}")))
        neg = _splat(em, vt, ty, lanes, ninf)

        def block(j0, live: int):   # outputs j0 .. j0+live-1 (j0 an int or an i64 value)
            acc = None
            for ok, ro in rows:
                for j in range(kernel[1]):
                    v = _deinterleave(em, P, x, _add(em, ro, _add(em, _mul(em, j0, s1), j - pads[1][0])), lanes, s1,
                                      ty, live)
                    v = em(f"select i1 {ok}, {vt} {v}, {vt} {neg}")
                    acc = v if acc is None else _vmax(em, vt, acc, v)
            vstore(em, P, out, _add(em, oo, j0), acc, vt, lanes, live)
        full, rest = divmod(jc1 - jc0, lanes)
        if full > 1:   # the whole vectors as a run-time loop (unrolled, ResNet's stem pool was 57 KB of IR)
            em.loop(full, lambda b: block(em(f"add i64 {em(f'mul i64 {b}, {lanes}')}, {jc0}"), lanes))
        elif full:
            block(jc0, lanes)
        if rest:
            block(jc0 + full * lanes, rest)
        for oj in list(range(jc0)) + list(range(jc1, ow)):
            acc = None
            for ok, ro in rows:
                for j in range(kernel[1]):
                    iw = oj * s1 + j - pads[1][0]
                    inside = 0 <= iw < w
                    xv = load(em, P, x, em(f"add i64 {ro}, {iw if inside else 0}"))
                    v = em(f"select i1 {ok if inside else 'false'}, {ty} {xv}, {ty} {ninf}")
                    acc = v if acc is None else mx(em, t, acc, v)
            store(em, P, out, em(f"add i64 {oo}, {oj}"), acc)

    def emit(em, P, lo, hi):
        _planes(em, out, x, lo, hi, lambda oo, xo: nest(em, (oh,), [(ow,)], [oo],
                                                        lambda offs, idx: per_row(em, P, offs[0], xo, idx[0])))
    return _pool_kernel(out, x, emit, kernel)


def max_pool_grad_tiling(gx: View, x: View, gy: View, kernel, stride, pads) -> Kernel | None:
    """max_pool2d_grad for windows that tile the plane (kernel == stride, no padding, column stride 1 or 2,
    unit-stride rows): per output row, blocks of `lanes` windows as vectors: each tap's inputs (one wide
    load and a shuffle), the first maximum's tap index (NaN first, as np.argmax), then every input of the
    block written once: gy where its tap won, else 0 (taps of one window row interleaved back into one
    store); rows and columns no window covers are zeros. None where this does not apply."""
    n, c, h, w = x.shape
    oh, ow = gy.shape[2:]
    kh, kw = kernel
    t, ty = x.dtype, VTYPE[x.dtype]
    if (tuple(kernel) != tuple(stride) or any(p for pp in pads for p in pp) or kw not in (1, 2)
            or t not in ("float32", "float64") or x.strides[3] != 1 or gx.strides[3] != 1 or gy.strides[3] != 1
            or not gx.size):
        return None
    lanes = vector_shape(t)[0]
    vt, it = f"<{lanes} x {ty}>", f"<{lanes} x i32>"
    bt = mask_type(vt)
    zero = literal(0, t)

    def row_at(em, base, oi, i: int, st: int):     # element of row oi*kh + i of the plane at base
        ri = em(f"add i64 {em(f'mul i64 {oi}, {kh}')}, {i}")
        return em(f"add i64 {base}, {em(f'mul i64 {ri}, {st}')}")

    def block(em, P, go, xo, yo, oi, j0: int, live: int):
        best = win = None
        k = 0
        for i in range(kh):
            r = row_at(em, xo, oi, i, x.strides[2])
            for j in range(kw):
                v = _deinterleave(em, P, x, em(f"add i64 {r}, {j0 * kw + j}"), lanes, kw, ty, live)
                if best is None:
                    best, win = v, "zeroinitializer"
                else:
                    gt = em(f"fcmp ogt {vt} {v}, {best}")
                    nan = em(f"and {bt} {em(f'fcmp uno {vt} {v}, {v}')}, {em(f'fcmp ord {vt} {best}, {best}')}")
                    take = em(f"or {bt} {gt}, {nan}")
                    best = em(f"select {bt} {take}, {vt} {v}, {vt} {best}")
                    win = em(f"select {bt} {take}, {it} {_splat(em, it, 'i32', lanes, str(k))}, {it} {win}")
                k += 1
        g = vload(em, P, gy, em(f"add i64 {yo}, {j0}"), vt, lanes, live)
        zv = "zeroinitializer"
        k = 0
        for i in range(kh):
            parts = []
            for j in range(kw):
                hit = em(f"icmp eq {it} {win}, {_splat(em, it, 'i32', lanes, str(k))}")
                parts.append(em(f"select {bt} {hit}, {vt} {g}, {vt} {zv}"))
                k += 1
            if kw == 1:
                row_v, wide, wl = parts[0], vt, lanes
            else:
                wl = 2 * lanes
                wide = f"<{wl} x {ty}>"
                inter = "<" + ", ".join(f"i32 {q // 2 + (q % 2) * lanes}" for q in range(wl)) + ">"
                row_v = em(f"shufflevector {vt} {parts[0]}, {vt} {parts[1]}, <{wl} x i32> {inter}")
            r = row_at(em, go, oi, i, gx.strides[2])
            vstore(em, P, gx, em(f"add i64 {r}, {j0 * kw}"), row_v, wide, wl, live * kw)

    def per_plane(em, P, offs):
        go, xo, yo = offs

        def per_row(_o, idx):
            oi = idx[0]
            yr = em(f"add i64 {yo}, {em(f'mul i64 {oi}, {gy.strides[2]}')}")
            for j0 in range(0, ow, lanes):
                block(em, P, go, xo, yr, oi, j0, min(lanes, ow - j0))
            if w > ow * kw:     # columns past the last window
                for rr in range(kh):
                    r = row_at(em, go, oi, rr, gx.strides[2])
                    nest(em, [w - ow * kw], [(gx.strides[3],)], [em(f"add i64 {r}, {ow * kw * gx.strides[3]}")],
                         lambda o, __: store(em, P, gx, o[0], zero))
        nest(em, [oh], [()], [], per_row)
        if h > oh * kh:         # rows past the last window
            nest(em, [h - oh * kh, w], [gx.strides[2:]], [em(f"add i64 {go}, {oh * kh * gx.strides[2]}")],
                 lambda o, __: store(em, P, gx, o[0], zero))

    def emit(em, P, lo, hi):
        nest(em, (n, c), [gx.strides[:2], x.strides[:2], gy.strides[:2]], [gx.offset, x.offset, gy.offset],
             lambda offs, _: per_plane(em, P, offs), lo, hi)
    from .kernels import PARALLEL_MIN
    split = n if n >= 2 and gx.size >= PARALLEL_MIN // 4 else None
    return Kernel("max_pool2d_grad", [gx, x, gy], emit, split, gy.size * kh * kw, n)


# ---- conv2d_grad_input: per image, the product into the slot's tile, then col2im by output row ---------------

def _col2im_rows_image(gx: View, cols: View, kernel, stride, pads, dilation, out_hw):
    """image(em, P, gx element, cols element) for unit column stride: each row of gx's image is summed in
    vector registers over every tap that reads it (a window row's tap i contributes when (ih + pad - i*dil)
    is a multiple of the row stride inside the output; tap j's column block is one masked load of that
    output row, shifted into place) and stored once: no zeroing pass, no read-modify-write of gx."""
    _, c, h, w = gx.shape
    kh, kw = kernel
    oh, ow = out_hw
    t, ty = gx.dtype, VTYPE[gx.dtype]
    lanes = vector_shape(t)[0]
    vt = f"<{lanes} x {ty}>"
    nvec = -(-w // lanes)
    tst = oh * ow
    pw, dw = pads[1][0], dilation[1]

    def shifted(em, v, by: int) -> str:
        if by == 0:
            return v
        idx = ", ".join(f"i32 {p + lanes - by}" if p >= by else "i32 0" for p in range(lanes))
        return em(f"shufflevector {vt} zeroinitializer, {vt} {v}, <{lanes} x i32> <{idx}>")

    def row(em, P, go, co, ih):
        acc = [em.alloca(vt) for _ in range(nvec)]
        for a in acc:
            em.raw(f"store {vt} zeroinitializer, ptr {a}")
        for i in range(kh):
            tt = em(f"sub i64 {ih}, {i * dilation[0] - pads[0][0]}")
            r = em(f"sdiv i64 {tt}, {stride[0]}")
            ok = em(f"and i1 {em(f'icmp sge i64 {tt}, 0')}, {em(f'icmp slt i64 {r}, {oh}')}")
            if stride[0] > 1:
                rem = em(f"srem i64 {tt}, {stride[0]}")
                ok = em(f"and i1 {ok}, {em(f'icmp eq i64 {rem}, 0')}")

            def taps(i=i, r=r):
                for j in range(kw):
                    q0_, q1_ = _valid(w, ow, j, 1, dw, pw)      # gx columns [a_j, b_j) read tap j
                    a_j, b_j = q0_ + j * dw - pw, q1_ + j * dw - pw
                    ro_ = em(f_mul(r, ow))
                    base = em(f"add i64 {co}, {em(f'add i64 {(i * kw + j) * tst}, {ro_}')}")
                    for k in range(nvec):
                        lo_l, hi_l = max(a_j - k * lanes, 0), min(b_j - k * lanes, lanes)
                        if hi_l <= lo_l:
                            continue
                        q0 = k * lanes + lo_l + pw - j * dw
                        v = vload(em, P, cols, em(f"add i64 {base}, {q0}"), vt, lanes, hi_l - lo_l)
                        cur = em(f"load {vt}, ptr {acc[k]}")
                        em.raw(f"store {vt} {em(f'fadd {vt} {cur}, {shifted(em, v, lo_l)}')}, ptr {acc[k]}")
            em.if_(ok, taps)
        ro = em(f"add i64 {go}, {em(f_mul(ih, gx.strides[2]))}")
        for k in range(nvec):
            vstore(em, P, gx, em(f"add i64 {ro}, {k * lanes}"), em(f"load {vt}, ptr {acc[k]}"), vt, lanes,
                   min(lanes, w - k * lanes))

    def image(em, P, go, co):
        def per_channel(offs, _):
            em.loop(h, lambda ih: row(em, P, offs[0], offs[1], ih))
        nest(em, (c,), [(gx.strides[1],), (kh * kw * tst,)], [go, co], per_channel)
    return image


def f_mul(x, c) -> str:
    return f"mul i64 {x}, {c}"


def conv_grad_input(gx: View, gy: View, w: View, tile: View, kernel, stride, pads, dilation, groups: int,
                    slots: int, blas: bool) -> Kernel:
    """gx (n, c, h, w) = col2im(W_g^T @ gy_i,g) image by image: the product (c*kh*kw, oh*ow) into the slot's
    tile (the micro-kernel, or one-thread BLAS when `blas`), then col2im from the tile while in cache
    (by output row in registers for unit column stride; else zeroed planes accumulated tap by tap)."""
    from .gemm import gemm_tiles
    n, c, h, wd = gx.shape
    o, cg, kh, kw = w.shape
    og, ckk = o // groups, cg * kh * kw
    oh, ow = gy.shape[2:]
    hw = oh * ow
    per_slot = tile.size // slots
    if stride[1] == 1 and gx.strides[3] == 1:
        image = _col2im_rows_image(gx, tile, kernel, stride, pads, dilation, (oh, ow))
    else:
        image = _col2im_image(gx, tile, kernel, stride, pads, dilation, (oh, ow))
    wt = View(w.buf, 0, (ckk, og), (1, ckk), w.dtype)
    gyv = View(gy.buf, 0, (og, hw), (hw, 1), gy.dtype)
    tv = View(tile.buf, 0, (ckk, hw), (hw, 1), tile.dtype)

    def one(em, P, s, i):
        to = em(f"add i64 {tile.offset}, {em(f_mul(s, per_slot))}")
        yo = em(f"add i64 {gy.offset}, {em(f_mul(i, o * hw))}")
        for g in range(groups):
            ao, bo = w.offset + g * og * ckk, em(f"add i64 {yo}, {g * og * hw}")
            co = em(f"add i64 {to}, {g * ckk * hw}")
            if blas:
                blas_gemm(em, P, tile, w, gy, ao, bo, co, ckk, og, hw, ckk, hw, hw, ta=True)
            else:
                gemm_tiles(em, P, tv, wt, gyv, ao, bo, co, ckk, og, hw)
        image(em, P, em(f"add i64 {gx.offset}, {em(f_mul(i, gx.strides[0]))}"), to)

    def emit(em, P, lo, hi):
        if gx.size:
            _slot_loop(em, n, slots, lo, hi, lambda s, i: one(em, P, s, i))
    return _slot_kernel("conv2d_grad_input", [gx, gy, w, tile], emit, slots, 2 * n * o * ckk * hw, blas)


def plan_conv2d_grad_input(plan, node, ins) -> None:
    """conv2d_grad_input: per image (slots split across threads), W^T @ gy into the slot's tile and col2im
    from it (float); other dtypes: the batched product then the plane-by-plane col2im."""
    from . import gemm
    from .lower import NotLowerable
    t, a = node.outputs[0], node.attrs
    if ins[0].dtype != ins[1].dtype or ins[0].dtype != t.dtype:
        raise NotLowerable("conv2d_grad_input")
    ct, (gy, w) = plan._compute_operands(t, ins, lambda v: v.contiguous)
    g = a["groups"]
    n, o, oh, ow = gy.shape
    _, cg, kh, kw = w.shape
    og, ckk, hw = o // g, cg * kh * kw, oh * ow
    args = ((kh, kw), a["stride"], a["pads"], a["dilation"])
    gx = plan._compute_out(t, ct)
    if ct in ("float32", "float64"):
        tiles = plan._conv_tiles(ckk, og, hw, ct, 2 if g == 1 else 1)
        blas = not tiles and gemm.use_blas(gy, w, gy)
        if tiles or blas:
            slots = slot_count(n, 2 * n * o * ckk * hw)
            tile = plan.fresh(None, (slots, g * ckk * hw), ct)
            plan.add(conv_grad_input(gx, gy, w, tile, *args, g, slots, blas), [gy, w], [gx, tile])
            plan._store_rounded(t, gx)
            return
    cols = plan.fresh(None, (n, g, ckk, hw), ct)
    wt = View(w.buf, w.offset, (1, g, ckk, og), (0, og * ckk, 1, ckk), w.dtype)
    gm = View(gy.buf, gy.offset, (n, g, og, hw), (o * hw, og * hw, hw, 1), gy.dtype)
    plan._matmul_views(cols, wt, gm)
    plan.add(col2im(gx, cols, *args, (oh, ow)), [cols], [gx])
    plan._store_rounded(t, gx)


def conv_grad_weight_gemm(part: View, x: View, gy: View, tile: View, gyt: View, res: View, kernel, stride, pads,
                          dilation, groups: int, slots: int, batch: int) -> Kernel:
    """part (slots, g, c/g*kh*kw, o/g): slot s's sum over its images of im2col(x_i)_g @ gy_i,g^T, the
    micro-kernel form (vectors along the output channels: for o/g of a vector or more): `batch` images at a
    time, their columns side by side in the slot's tile ((c*kh*kw) x batch*oh*ow) and their gy transposed
    into gyt (batch*oh*ow x o), one product over all of them into res, added into the slot's partial."""
    from .gemm import gemm_tiles
    n, c = x.shape[:2]
    _, _, ckk, og = part.shape
    o = og * groups
    kh, kw = kernel
    oh, ow = gy.shape[2:]
    hw = oh * ow
    ld = batch * hw
    t = part.dtype
    per_tile, per_gyt, per_res = tile.size // slots, gyt.size // slots, res.size // slots
    cols = View(tile.buf, 0, (c, kh, kw, oh, ow), (kh * kw * ld, ld, ow, 1), tile.dtype)
    image = _im2col_image(cols, x, kernel, stride, pads, dilation, (oh, ow), (kh * kw * ld, ld, 1))
    av = View(tile.buf, 0, (ckk, ld), (ld, 1), tile.dtype)
    bv = View(gyt.buf, 0, (ld, o), (o, 1), gyt.dtype)
    rv = View(res.buf, 0, (ckk, og), (og, 1), res.dtype)

    def chunk(em, P, s, c0, nb):
        to = em(f"add i64 {tile.offset}, {em(f_mul(s, per_tile))}")
        yo = em(f"add i64 {gyt.offset}, {em(f_mul(s, per_gyt))}")
        ro = em(f"add i64 {res.offset}, {em(f_mul(s, per_res))}")
        po = em(f"add i64 {part.offset}, {em(f_mul(s, groups * ckk * og))}")

        def one(b):
            img = em(f"add i64 {c0}, {b}")
            image(em, P, em(f"add i64 {to}, {em(f_mul(b, hw))}"),
                  em(f"add i64 {x.offset}, {em(f_mul(img, x.strides[0]))}"))
            src = em(f"add i64 {gy.offset}, {em(f_mul(img, o * hw))}")
            dst = em(f"add i64 {yo}, {em(f_mul(b, hw * o))}")
            nest(em, [hw, o], [(o, 1), (1, hw)], [dst, src], lambda off, _: store(em, P, gyt, off[0],
                                                                                  load(em, P, gy, off[1])))
        em.loop(nb, one)
        k = em(f_mul(nb, hw))
        for g in range(groups):
            gemm_tiles(em, P, rv, av, bv, em(f"add i64 {to}, {g * ckk * ld}"), em(f"add i64 {yo}, {g * og}"), ro,
                       ckk, k, og)
            ty = VTYPE[t]

            def acc(off, _):
                store(em, P, part, off[0], em(f"fadd {ty} {load(em, P, part, off[0])}, {load(em, P, res, off[1])}"))
            nest(em, [ckk * og], [(1,), (1,)], [em(f"add i64 {po}, {g * ckk * og}"), ro], acc)

    def per_slot(em, P, s):
        po = em(f"add i64 {part.offset}, {em(f_mul(s, groups * ckk * og))}")
        nest(em, [groups * ckk * og], [(1,)], [po], lambda off, _: store(em, P, part, off[0], literal(0, t)))
        i0 = em(f"udiv i64 {em(f_mul(s, n))}, {slots}")
        s1 = em(f"add i64 {s}, 1")
        i1 = em(f"udiv i64 {em(f_mul(s1, n))}, {slots}")
        cnt = em(f"udiv i64 {em(f'add i64 {em(f_sub(i1, i0))}, {batch - 1}')}, {batch}")

        def per_chunk(cb):
            c0 = em(f"add i64 {i0}, {em(f_mul(cb, batch))}")
            left = em(f_sub(i1, c0))
            nb = em(f"select i1 {em(f'icmp slt i64 {left}, {batch}')}, i64 {left}, i64 {batch}")
            chunk(em, P, s, c0, nb)
        em.loop(cnt, per_chunk)

    def emit(em, P, lo, hi):
        if part.size:
            em.loop(hi, lambda s: per_slot(em, P, s), start=lo)
    return _slot_kernel("conv2d_grad_weight", [part, x, gy, tile, gyt, res], emit, slots, 2 * n * o * ckk * hw)


def f_sub(a, b) -> str:
    return f"sub i64 {a}, {b}"


def sum_slots_transposed(gw: View, part: View) -> Kernel:
    """gw (o, c/g*kh*kw)[g*og + j, p] = sum over slots of part (slots, g, c/g*kh*kw, o/g)[s, g, p, j]."""
    slots, groups, ckk, og = part.shape
    ty = VTYPE[gw.dtype]
    per = groups * ckk * og

    def emit(em, P, lo, hi):
        def body(offs, _):
            acc = load(em, P, part, offs[1])
            for s in range(1, slots):
                acc = em(f"fadd {ty} {acc}, {load(em, P, part, em(f'add i64 {offs[1]}, {s * per}'))}")
            store(em, P, gw, offs[0], acc)
        if gw.size:
            nest(em, [groups, og, ckk], [(og * ckk, ckk, 1), (ckk * og, 1, og)], [gw.offset, part.offset], body)
    return Kernel("sum_slots", [gw, part], emit, None, gw.size * slots)
