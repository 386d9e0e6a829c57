"""Matrix products: CBLAS sgemm/dgemm (gemv for a single row or column) called from the generated code,
looping over broadcast batch dims; a pure-LLVM loop GEMM for integers or when no BLAS was found."""
from __future__ import annotations

import numpy as np

from . import jit
from .irtext import VTYPE, literal
from .kernels import Kernel, guarded, load, nest, ptr_at, store
from .views import View, broadcast_strides, contig_strides

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
    return "\n".join(out) + "\n"


def use_blas(a: View, b: View, out: View) -> bool:
    return jit.blas() is not None and out.dtype in ("float32", "float64") and a.dtype == b.dtype == out.dtype


#: GRAPHC_LLVM_SMALL_GEMM=1: GEMMs with 2..SMALL_ROWS rows and at most SMALL_MACS multiply-adds use the
#: vectorised loop instead of BLAS (off by default: on the LSTM step it measured 0.7-1.0x BLAS's time, noisy)
SMALL_ROWS, SMALL_MACS = 64, 1 << 22


def small(a: View, b: View) -> bool:
    import os
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    return (os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "0") == "1" and a.dtype in ("float32", "float64")
            and 2 <= n <= SMALL_ROWS and n * k * m <= SMALL_MACS and m >= 16)


def matmul(out: View, a: View, b: View, blas: bool | None = None) -> Kernel:
    """out (contiguous, batch..., n, m) = a (..., n, k) @ b (..., k, m); BLAS needs blas_layout(a/b)."""
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    bshape = out.shape[:-2]
    ast = broadcast_strides(View(a.buf, 0, a.shape[:-2], a.strides[:-2], a.dtype), bshape)
    bst = broadcast_strides(View(b.buf, 0, b.shape[:-2], b.strides[:-2], b.dtype), bshape)
    ost = contig_strides(bshape + (n * m,))[:-1] if bshape else ()
    blas = use_blas(a, b, out) if blas is None else blas
    it = "i64" if jit.blas() is None or jit.blas()["ilp64"] else "i32"

    def one(em, P, offs):
        ao, bo, oo = offs
        if k == 0:
            nbytes = n * m * np.dtype(out.dtype).itemsize
            guarded(em, [(out, oo, n * m - 1)], lambda: em.raw(
                f"call void @llvm.memset.p0.i64(ptr {ptr_at(em, P, out, oo)}, i8 0, i64 {nbytes}, i1 false)"))
        elif blas:
            _blas_call(em, P, out, a, b, ao, bo, oo, n, k, m, it)
        else:
            _loop_gemm(em, P, out, a, b, ao, bo, oo, n, k, m)

    def emit(em, P, lo, hi):
        if out.size:
            nest(em, bshape, [ast, bst, ost], [a.offset, b.offset, out.offset], lambda offs, _: one(em, P, offs))
    return Kernel("matmul", [out, a, b], emit, None, 2 * n * k * m * max(1, int(np.prod(bshape))))


def _blas_call(em, P, out, a, b, ao, bo, oo, n, k, m, it):
    ty, p = VTYPE[out.dtype], "s" if out.dtype == "float32" else "d"
    one, zero = literal(1.0, out.dtype), literal(0.0, out.dtype)
    ta, lda = blas_layout(a)
    tb, ldb = blas_layout(b)

    def mat(trans, rows, cols, ld):   # last element offset BLAS touches in a row-major (trans) operand
        return (rows - 1) * ld + cols - 1 if trans == NO_TRANS else (cols - 1) * ld + rows - 1
    if n == 1 and a.strides[-1] > 0:      # row vector @ matrix: gemv on B
        flip = TRANS if tb == NO_TRANS else NO_TRANS
        rows, cols = (k, m) if tb == NO_TRANS else (m, k)
        spans = [(b, bo, (rows - 1) * ldb + cols - 1), (a, ao, (k - 1) * a.strides[-1]), (out, oo, m - 1)]
        call = lambda A, B, C: (f"gemv(i32 {ROW_MAJOR}, i32 {flip}, {it} {rows}, {it} {cols}, {ty} {one}, "  # noqa
                                f"ptr {B}, {it} {ldb}, ptr {A}, {it} {a.strides[-1]}, {ty} {zero}, ptr {C}, {it} 1)")
    elif m == 1 and b.strides[-2] > 0:    # matrix @ column vector: gemv on A
        rows, cols = (n, k) if ta == NO_TRANS else (k, n)
        spans = [(a, ao, (rows - 1) * lda + cols - 1), (b, bo, (k - 1) * b.strides[-2]), (out, oo, n - 1)]
        call = lambda A, B, C: (f"gemv(i32 {ROW_MAJOR}, i32 {ta}, {it} {rows}, {it} {cols}, {ty} {one}, "  # noqa
                                f"ptr {A}, {it} {lda}, ptr {B}, {it} {b.strides[-2]}, {ty} {zero}, ptr {C}, {it} 1)")
    else:
        spans = [(a, ao, mat(ta, n, k, lda)), (b, bo, mat(tb, k, m, ldb)), (out, oo, (n - 1) * m + m - 1)]
        call = lambda A, B, C: (f"gemm(i32 {ROW_MAJOR}, i32 {ta}, i32 {tb}, {it} {n}, {it} {m}, {it} {k}, "  # noqa
                                f"{ty} {one}, ptr {A}, {it} {lda}, ptr {B}, {it} {ldb}, {ty} {zero}, ptr {C}, {it} {m})")
    guarded(em, spans, lambda: em.raw(f"call void @gc_cblas_{p}" + call(
        ptr_at(em, P, a, ao), ptr_at(em, P, b, bo), ptr_at(em, P, out, oo))))


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
