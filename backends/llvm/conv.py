"""Convolution as im2col + GEMM (the column matrix in the arena, then batched sgemm through BLAS) and
max pooling as a window loop; zero / -inf padding by clamped loads and selects (no padded copy)."""
from __future__ import annotations

from .gemm import mask_type, vector_shape, vload, vstore
from .irtext import VTYPE, literal
from .kernels import Kernel, load, nest, store
from .lower import _fmaxmin
from .views import View, contig_strides


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


def _im2col_image(cols: View, x: View, kernel, stride, pads, dilation):
    """image(em, P, cols element, x element): emits the columns of one image. The taps (kh, kw) are
    unrolled: each one's in-bounds output rows and columns are constant ranges, so the copy is a plain
    (vectorisable) row loop and the padding border plain zero stores."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = cols.shape[-2:]
    t = x.dtype
    zero = literal(0, t)

    def zeros(em, P, base, count: int):
        nest(em, [count], [(1,)], [base], lambda o, _: store(em, P, cols, o[0], zero))

    def tap(em, P, co, xo, i, j):
        r0, r1 = _valid(h, oh, i, stride[0], dilation[0], pads[0][0])
        c0, c1 = _valid(w, ow, j, stride[1], dilation[1], pads[1][0])
        base = em(f"add i64 {co}, {(i * kw + j) * oh * ow}")
        zeros(em, P, base, r0 * ow)

        def row(offs, idx):
            r = em(f"add i64 {idx[0]}, {r0}")
            dst = em(f"add i64 {base}, {em(f'mul i64 {r}, {ow}')}")
            ih = em(f"sub i64 {em(f'mul i64 {r}, {stride[0]}')}, {pads[0][0] - i * dilation[0]}")
            src = em(f"add i64 {xo}, {em(f'mul i64 {ih}, {x.strides[2]}')}")
            zeros(em, P, dst, c0)
            first = (c0 * stride[1] + j * dilation[1] - pads[1][0]) * x.strides[3]
            nest(em, [c1 - c0], [(1,), (stride[1] * x.strides[3],)],
                 [em(f"add i64 {dst}, {c0}"), em(f"add i64 {src}, {first}")],
                 lambda o, _: store(em, P, cols, o[0], load(em, P, x, o[1])))
            zeros(em, P, em(f"add i64 {dst}, {c1}"), ow - c1)
        nest(em, [r1 - r0], [()], [], row)
        zeros(em, P, em(f"add i64 {base}, {r1 * ow}"), (oh - r1) * ow)

    def image(em, P, co, xo):
        """The columns of one image (every channel) at element co of cols, from x's image at xo."""
        def per_channel(offs, _):
            for i in range(kh):
                for j in range(kw):
                    tap(em, P, offs[0], offs[1], i, j)
        nest(em, (c,), [(kh * kw * oh * ow,), (x.strides[1],)], [co, xo], per_channel)
    return image


def im2col(cols: View, x: View, kernel, stride, pads, dilation) -> Kernel:
    """cols[n, c, kh, kw, oh, ow] = x[n, c, oh*s + kh*d - pad, ow*s + kw*d - pad] (0 outside)."""
    image = _im2col_image(cols, x, kernel, stride, pads, dilation)
    per = cols.size // max(1, x.shape[0])

    def emit(em, P, lo, hi):
        if cols.size:
            nest(em, (x.shape[0],), [(per,), (x.strides[0],)], [cols.offset, x.offset],
                 lambda offs, _: image(em, P, offs[0], offs[1]))
    return Kernel("im2col", [cols, x], emit, None, cols.size)


def conv_tiles(out: View, x: View, w: View, cols: View, kernel, stride, pads, dilation) -> Kernel:
    """out (n, o, oh*ow) = w (o, c*kh*kw) @ im2col(x[i]) image by image: one image's columns (cols,
    (c*kh*kw, oh*ow)) are written and at once multiplied by the micro-kernel while still in cache."""
    from .gemm import gemm_tiles
    n = x.shape[0]
    o, ckk = w.shape
    hw = out.shape[-1]
    image = _im2col_image(cols, x, kernel, stride, pads, dilation)
    out2 = View(out.buf, 0, (o, hw), (hw, 1), out.dtype)
    cols2 = View(cols.buf, cols.offset, (ckk, hw), (hw, 1), cols.dtype)

    def one(em, P, offs):
        image(em, P, cols.offset, offs[1])
        gemm_tiles(em, P, out2, w, cols2, w.offset, cols.offset, offs[0], o, ckk, hw)

    def emit(em, P, lo, hi):
        if out.size:
            nest(em, (n,), [(o * hw,), (x.strides[0],)], [out.offset, x.offset], lambda offs, _: one(em, P, offs))
    return Kernel("conv2d", [out, x, w, cols], emit, None, 2 * n * o * ckk * hw)


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
