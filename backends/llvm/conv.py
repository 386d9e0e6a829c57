"""Convolution as im2col + GEMM (the column matrix in the arena, then batched sgemm through BLAS) and
max pooling as a window loop; zero / -inf padding by clamped loads and selects (no padded copy)."""
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


def _im2col_image(cols: View, x: View, kernel, stride, pads, dilation, out_hw=None, layout=None, pad_value=0):
    """image(em, P, cols element, x element): emits the columns of one image. The taps (kh, kw) are
    unrolled: each one's in-bounds output rows and columns are constant ranges, so the copy is a plain
    (vectorisable) row loop and the padding border plain zero stores. `layout`: the element strides of
    (channel, tap, output position) in cols; default (kh*kw*oh*ow, oh*ow, 1), i.e. (c, kh, kw, oh, ow);
    conv2d_grad_weight writes the patch-rows layout (oh, ow, c, kh, kw): (kh*kw, 1, c*kh*kw). Padding reads
    `pad_value` (an integer convolution's input zero point)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = cols.shape[-2:] if out_hw is None else out_hw
    cst, tst, pst = layout or (kh * kw * oh * ow, oh * ow, 1)
    t = x.dtype
    zero = literal(pad_value, t)

    def zeros(em, P, base, count: int):
        nest(em, [count], [(pst,)], [base], lambda o, _: store(em, P, cols, o[0], zero))

    def tap(em, P, co, xo, i, j):
        r0, r1 = _valid(h, oh, i, stride[0], dilation[0], pads[0][0])
        c0, c1 = _valid(w, ow, j, stride[1], dilation[1], pads[1][0])
        base = em(f"add i64 {co}, {(i * kw + j) * tst}")
        zeros(em, P, base, r0 * ow)

        def row(offs, idx):
            r = em(f"add i64 {idx[0]}, {r0}")
            dst = em(f"add i64 {base}, {em(f'mul i64 {r}, {ow * pst}')}")
            ih = em(f"sub i64 {em(f'mul i64 {r}, {stride[0]}')}, {pads[0][0] - i * dilation[0]}")
            src = em(f"add i64 {xo}, {em(f'mul i64 {ih}, {x.strides[2]}')}")
            zeros(em, P, dst, c0)
            first = (c0 * stride[1] + j * dilation[1] - pads[1][0]) * x.strides[3]
            nest(em, [c1 - c0], [(pst,), (stride[1] * x.strides[3],)],
                 [em(f"add i64 {dst}, {c0 * pst}"), em(f"add i64 {src}, {first}")],
                 lambda o, _: store(em, P, cols, o[0], load(em, P, x, o[1])))
            zeros(em, P, em(f"add i64 {dst}, {c1 * pst}"), ow - c1)
        nest(em, [r1 - r0], [()], [], row)
        zeros(em, P, em(f"add i64 {base}, {r1 * ow * pst}"), (oh - r1) * ow)

    def image(em, P, co, xo):
        """The columns of one image (every channel) at element co of cols, from x's image at xo."""
        def per_channel(offs, _):
            for i in range(kh):
                for j in range(kw):
                    tap(em, P, offs[0], offs[1], i, j)
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


def conv_tiles(out: View, x: View, w: View, cols: View, kernel, stride, pads, dilation, groups: int = 1) -> Kernel:
    """out (n, o, oh*ow) = w (o, c/g*kh*kw) @ im2col(x[i]) image by image (per group g: its o/g filters
    times its c/g channels' columns): one image's columns (cols, (c*kh*kw, oh*ow)) are written and at
    once multiplied by the micro-kernel while still in cache."""
    from .gemm import gemm_tiles
    n = x.shape[0]
    o, ckk = w.shape
    og = o // groups
    hw = out.shape[-1]
    image = _im2col_image(cols, x, kernel, stride, pads, dilation)
    out2 = View(out.buf, 0, (og, hw), (hw, 1), out.dtype)
    cols2 = View(cols.buf, cols.offset, (ckk, hw), (hw, 1), cols.dtype)

    def one(em, P, offs):
        image(em, P, cols.offset, offs[1])
        for g in range(groups):
            gemm_tiles(em, P, out2, w, cols2, w.offset + g * og * ckk, cols.offset + g * ckk * hw,
                       em(f"add i64 {offs[0]}, {g * og * hw}") if g else offs[0], og, ckk, hw)

    def emit(em, P, lo, hi):
        if out.size:
            nest(em, (n,), [(o * hw,), (x.strides[0],)], [out.offset, x.offset], lambda offs, _: one(em, P, offs))
    return Kernel("conv2d", [out, x, w, cols], emit, None, 2 * n * o * ckk * hw)


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


def _vmax(em, vt: str, a: str, b: str) -> str:
    """np.maximum on vectors: NaN in either operand propagates."""
    bt = mask_type(vt)
    m = em(f"select {bt} {em(f'fcmp ogt {vt} {a}, {b}')}, {vt} {a}, {vt} {b}")
    nan = em(f"fcmp uno {vt} {a}, {a}")
    return em(f"select {bt} {nan}, {vt} {a}, {vt} {m}")


def _max_pool_vector(out: View, x: View, kernel, stride, lanes: int) -> Kernel:
    """Max pooling with every window in bounds and column stride 1 or 2: per output row, blocks of
    `lanes` outputs; each tap is one contiguous (masked) load of lanes*stride inputs and a shuffle that
    keeps every stride-th element, folded in with a NaN-propagating max."""
    n, c, oh, ow = out.shape
    t, ty = x.dtype, VTYPE[x.dtype]
    s1 = stride[1]
    vt, wide = f"<{lanes} x {ty}>", f"<{lanes * s1} x {ty}>"
    pick = "<" + ", ".join(f"i32 {i * s1}" for i in range(lanes)) + ">"

    def block(em, P, oo, xo, j0: int, live: int):
        acc = None
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                off = em(f"add i64 {xo}, {i * x.strides[2] + (j0 * s1 + j) * x.strides[3]}")
                v = vload(em, P, x, off, wide, lanes * s1, (live - 1) * s1 + 1)
                if s1 > 1:
                    v = em(f"shufflevector {wide} {v}, {wide} poison, <{lanes} x i32> {pick}")
                acc = v if acc is None else _vmax(em, vt, acc, v)
        vstore(em, P, out, em(f"add i64 {oo}, {j0}"), acc, vt, lanes, live)

    def emit(em, P, lo, hi):
        def per_row(offs, _):
            for j0 in range(0, ow, lanes):
                block(em, P, offs[0], offs[1], j0, min(lanes, ow - j0))
        xs = (x.strides[0], x.strides[1], x.strides[2] * stride[0])
        nest(em, (n, c, oh), [contig_strides(out.shape)[:3], xs], [out.offset, x.offset], per_row)
    return Kernel("max_pool2d", [out, x], emit, None, out.size)
