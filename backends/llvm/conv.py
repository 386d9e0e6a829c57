"""Convolution as im2col + GEMM (the column matrix in the arena, then batched sgemm through BLAS) and
max pooling as a window loop; zero / -inf padding by clamped loads and selects (no padded copy)."""
from __future__ import annotations

from .irtext import VTYPE
from .kernels import Kernel, load, nest, store
from .lower import _fmaxmin
from .views import View, contig_strides


def _window_pos(em, o: str, k: str, stride: int, dil: int, pad: int, size: int):
    """(clamped input index, in-bounds flag) for output position o and kernel tap k."""
    os_, ks = em(f"mul i64 {o}, {stride}"), em(f"mul i64 {k}, {dil}")
    i = em(f"sub i64 {em(f'add i64 {os_}, {ks}')}, {pad}")
    ok = em(f"and i1 {em(f'icmp sge i64 {i}, 0')}, {em(f'icmp slt i64 {i}, {size}')}")
    return em(f"select i1 {ok}, i64 {i}, i64 0"), ok


def im2col(cols: View, x: View, kernel, stride, pads, dilation) -> Kernel:
    """cols[n, c, kh, kw, oh, ow] = x[n, c, oh*s + kh*d - pad, ow*s + kw*d - pad] (0 outside)."""
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
