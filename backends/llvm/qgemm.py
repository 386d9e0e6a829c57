"""The int8 GEMM: uint8/int8 x int8/uint8 -> int32 with the requantising epilogue in registers.

C[n, m] = A[n, k] . B[k, m] by tiles of `mr` rows x `nv` vectors of `lanes` int32 accumulators. B (the
weights) is packed once into panels of nv*lanes columns, four consecutive k per int32 lane:

    packed[panel][k/4][column][4 bytes]   (zero padded in k and m), then per column the int32 correction
    -alpha * sum_k B[k, j], then one flag word (1 when every packed byte lies in [-64, 64])

so one step of the inner loop broadcasts four bytes of a row of A to every lane and multiplies them into
each B vector: AVX512-VNNI `vpdpbusd` (u8 x s8, four products summed into each int32 lane, no
intermediate saturation), or on AVX2 `vpmaddubsw` (u8 x s8 pairs summed into int16) + `vpmaddwd` with
ones (pairs of int16 into int32). `vpmaddubsw` saturates when a pair exceeds 32767, so it runs only when
the pack found every weight in [-64, 64] (gc.quantize's 7-bit weights on hosts without VNNI); other
weights take the exact path (bytes widened to int32, multiplied, summed in fours). The instructions need
an unsigned A and a signed B: int8 activations are flipped to uint8 (A + 128, xor 0x80) and corrected
by -128 * column sums of B (stored with the pack); uint8 weights are packed as B - 128 and corrected by
+128 * the row sums of A. Every result equals the NumPy int32 reference bit for bit.

Packing: weights that are constants (ONNX initialisers, gc.quantize's weights) are packed at compile
time (a new constant buffer); any other B (a parameter, a computed tensor) by a pack kernel before the
product, each call (so a changed parameter is always repacked).

Epilogue per column j (or row, for convolutions' channels: see `qgemm`): acc + offset[j] (int32), then
float32 acc * mult[j] + bias[j] (no FMA: two roundings, as NumPy), max(., 0), and for uint8/int8 output
rint + zero point, saturate (minnum/maxnum: NaN saturates high), convert - in registers, one store.

Convolutions: im2col of the uint8/int8 input in patch-rows layout (pixels x C*KH*KW, padding reads the
input's zero point), then this GEMM against the packed (C*KH*KW x O) weights image by image, storing
the channels of each pixel into NCHW.
"""
from __future__ import annotations

import os

import numpy as np

from graphc.ops import quant as Q

from . import jit
from .irtext import VTYPE, literal
from .kernels import Kernel, nest, ptr_at
from .lower import CODE_FOR_OP, NotLowerable, convert
from .table import DECLARATIONS, PLAN, lowers
from ..schedule.views import View, collapse

#: isa -> (int32 lanes per vector, vectors per tile row, tile rows)
ISAS = {"vnni512": (16, 4, 6), "vnni256": (8, 2, 6), "avx2": (8, 2, 4), "generic": (8, 2, 4)}
FLIP = -2139062144   # 0x80808080 as a signed i32: xor flips each byte's sign bit (u8 <-> s8 + 128)

DECLARATIONS.append("""
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <8 x i32>, <8 x i32>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <8 x float> @llvm.roundeven.v8f32(<8 x float>)
declare <16 x float> @llvm.roundeven.v16f32(<16 x float>)
declare <8 x float> @llvm.minnum.v8f32(<8 x float>, <8 x float>)
declare <16 x float> @llvm.minnum.v16f32(<16 x float>, <16 x float>)
declare <8 x float> @llvm.maxnum.v8f32(<8 x float>, <8 x float>)
declare <16 x float> @llvm.maxnum.v16f32(<16 x float>, <16 x float>)
declare double @llvm.minnum.f64(double, double)
declare double @llvm.maxnum.f64(double, double)
""")


def isa() -> str:
    """The int8 GEMM flavour for this host: 'vnni512' (AVX512-VNNI), 'vnni256' (AVX-VNNI), 'avx2'
    (vpmaddubsw + vpmaddwd) or 'generic' (portable IR). GRAPHC_QGEMM_ISA overrides it (e.g. 'generic'
    to test the exact path; a flavour the CPU lacks would fault)."""
    forced = os.environ.get("GRAPHC_QGEMM_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"GRAPHC_QGEMM_ISA={forced!r}; expected one of {', '.join(ISAS)}")
        return forced
    f = jit.cpu_features()
    if "+avx512vnni" in f and "+avx512bw" in f and "+avx512f" in f:
        return "vnni512"
    if "+avxvnni" in f:
        return "vnni256"
    return "avx2" if "+avx2" in f else "generic"


def panel_width(flavour: str) -> int:
    lanes, nv, _ = ISAS[flavour]
    return lanes * nv


# ---- packing ------------------------------------------------------------------------------------------

def packed_words(k: int, m: int, nr: int) -> int:
    return -(-m // nr) * (-(-k // 4) * nr + nr) + 1


def pack(b: np.ndarray, nr: int, alpha: int) -> np.ndarray:
    """The packed int32 words of B (k, m) int8/uint8 for panels of nr columns (module docstring); alpha:
    128 when A is int8 (flipped), else 0."""
    k, m = b.shape
    k4, panels = -(-k // 4), -(-m // nr)
    beta = 128 if b.dtype == np.uint8 else 0
    bs = b.astype(np.int32) - beta
    padded = np.zeros((k4 * 4, panels * nr), np.int8)
    padded[:k, :m] = bs
    words = np.ascontiguousarray(padded.reshape(k4, 4, panels, nr).transpose(2, 0, 3, 1)).view("<i4")
    corr = np.zeros((panels, nr), np.int64)
    corr.reshape(-1)[:m] = -alpha * b.astype(np.int64).sum(0)
    flag = 1 if bs.size == 0 or np.abs(bs).max() <= 64 else 0
    out = np.concatenate([words.reshape(panels, k4 * nr), corr.astype(np.int32)], axis=1)
    return np.concatenate([out.reshape(-1), np.array([flag], np.int32)]).astype(np.int32)


def pack_kernel(pk: View, b: View, nr: int, alpha: int) -> Kernel:
    """The pack above as a kernel (for a B that is not a constant): byte by byte, with clamped loads."""
    k, m = b.shape
    k4, panels = -(-k // 4), -(-m // nr)
    beta = 128 if b.dtype == "uint8" else 0
    signed = b.dtype == "int8"
    sk, sm = b.strides

    def byte(em, P, kk, col):
        """(in range, B value as i32) at row kk, column col (SSA)."""
        ok = em(f"and i1 {em(f'icmp slt i64 {kk}, {k}')}, {em(f'icmp slt i64 {col}, {m}')}")
        kc, cc = em(f"select i1 {ok}, i64 {kk}, i64 0"), em(f"select i1 {ok}, i64 {col}, i64 0")
        off = em(f"add i64 {em(f'mul i64 {kc}, {sk}')}, {em(f'mul i64 {cc}, {sm}')}")
        v = em(f"load i8, ptr {ptr_at(em, P, b, em(f'add i64 {off}, {b.offset}'))}")
        return ok, em(f"{'sext' if signed else 'zext'} i8 {v} to i32")

    def emit(em, P, lo, hi):
        if not m:
            return
        flag = em.alloca("i32")
        em.raw(f"store i32 1, ptr {flag}")

        def word(p, g, j):
            col = em(f"add i64 {em(f'mul i64 {p}, {nr}')}, {j}")
            w = "0"
            for r in range(4):
                ok, v = byte(em, P, em(f"add i64 {em(f'mul i64 {g}, 4')}, {r}"), col)
                v = em(f"select i1 {ok}, i32 {em(f'sub i32 {v}, {beta}')}, i32 0")
                big = em(f"icmp ugt i32 {em(f'add i32 {v}, 64')}, 128")   # outside [-64, 64]
                em.if_(big, lambda: em.raw(f"store i32 0, ptr {flag}"))
                byte_ = em(f"and i32 {v}, 255")
                w = em(f"or i32 {w}, {em(f'shl i32 {byte_}, {8 * r}')}")
            # word (p, g, j) of panel p (panel stride k4*nr + nr: its words, then its corrections)
            off = _add(em, _add(em, _mul(em, p, k4 * nr + nr), _mul(em, g, nr)), j)
            em.raw(f"store i32 {w}, ptr {ptr_at(em, P, pk, _add(em, off, pk.offset))}")

        def column_sum(p, j):
            col = em(f"add i64 {em(f'mul i64 {p}, {nr}')}, {j}")
            acc = em.alloca("i32")
            em.raw(f"store i32 0, ptr {acc}")

            def add(kk):
                ok, v = byte(em, P, kk, col)
                cur = em(f"load i32, ptr {acc}")
                v0 = em(f"select i1 {ok}, i32 {v}, i32 0")
                em.raw(f"store i32 {em(f'add i32 {cur}, {v0}')}, ptr {acc}")
            if alpha:
                em.loop(k, add)
            s = em(f"mul i32 {em(f'load i32, ptr {acc}')}, {-alpha}")
            off = em(f"add i64 {em(f'mul i64 {p}, {k4 * nr + nr}')}, {k4 * nr}")
            em.raw(f"store i32 {s}, ptr {ptr_at(em, P, pk, _add(em, _add(em, off, j), pk.offset))}")

        def panel(p):
            em.loop(k4, lambda g: em.loop(nr, lambda j: word(p, g, j)))
            em.loop(nr, lambda j: column_sum(p, j))
        em.loop(panels, panel)
        last = pk.offset + panels * (k4 * nr + nr)
        em.raw(f"store i32 {em(f'load i32, ptr {flag}')}, ptr {ptr_at(em, P, pk, str(last))}")
    return Kernel("qpack", [pk, b], emit, None, k * m)


# ---- the GEMM kernel ----------------------------------------------------------------------------------

def _add(em, x, y) -> str:
    return em(f"add i64 {x}, {y}")


def _mul(em, x, y) -> str:
    return em(f"mul i64 {x}, {y}")


def _splat(em, lanes: int, ty: str, val: str) -> str:
    vt = f"<{lanes} x {ty}>"
    v = em(f"insertelement {vt} poison, {ty} {val}, i64 0")
    return em(f"shufflevector {vt} {v}, {vt} poison, <{lanes} x i32> zeroinitializer")


def _dot(em, mode: str, lanes: int, acc: str, a: str, b: str) -> str:
    """acc + per lane the sum of the four products of a's bytes (unsigned) and b's bytes (signed)."""
    vt = f"<{lanes} x i32>"
    if mode == "vnni512":
        return em(f"call <16 x i32> @llvm.x86.avx512.vpdpbusd.512({vt} {acc}, {vt} {a}, {vt} {b})")
    if mode == "vnni256":
        return em(f"call <8 x i32> @llvm.x86.avx512.vpdpbusd.256({vt} {acc}, {vt} {a}, {vt} {b})")
    bt = f"<{4 * lanes} x i8>"
    a8, b8 = em(f"bitcast {vt} {a} to {bt}"), em(f"bitcast {vt} {b} to {bt}")
    if mode == "fast":
        ones = "<" + ", ".join(["i16 1"] * 16) + ">"
        p = em(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> {a8}, <32 x i8> {b8})")
        return em(f"add {vt} {acc}, {em(f'call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {p}, <16 x i16> {ones})')}")
    wt = f"<{4 * lanes} x i32>"   # exact: widen, multiply, sum each lane's four products
    prod = em(f"mul {wt} {em(f'zext {bt} {a8} to {wt}')}, {em(f'sext {bt} {b8} to {wt}')}")
    s = acc
    for r in range(4):
        idx = "<" + ", ".join(f"i32 {4 * i + r}" for i in range(lanes)) + ">"
        s = em(f"add {vt} {s}, {em(f'shufflevector {wt} {prod}, {wt} poison, <{lanes} x i32> {idx}')}")
    return s


def _vec(em, P, v: View | None, off, live: int, lanes: int, ty: str, zero: str) -> str:
    """A vector of v's elements off .. off+live-1 (strided; a literal splatted); lanes past live are zero."""
    vt = f"<{lanes} x {ty}>"
    if v is None:
        return _splat(em, lanes, ty, zero)
    if v.literal is not None:
        return _splat(em, lanes, ty, literal(v.literal, v.dtype))
    st = v.strides[-1]
    if st == 1 and live == lanes:
        return em(f"load {vt}, ptr {ptr_at(em, P, v, off, lanes - 1)}, align 4")
    out = "zeroinitializer"
    for i in range(live):
        x = em(f"load {ty}, ptr {ptr_at(em, P, v, em(f'add i64 {off}, {i * st}'))}")
        out = em(f"insertelement {vt} {out}, {ty} {x}, i64 {i}")
    return out


def _fvec(em, name: str, lanes: int, *args) -> str:
    vt = f"<{lanes} x float>"
    return em(f"call {vt} @llvm.{name}.v{lanes}f32({', '.join(f'{vt} {a}' for a in args)})")


class Epilogue:
    """What happens to an accumulator: `offset`, `mult`, `bias` views (one entry per channel, or None),
    relu, the output dtype (int32: the accumulator (+ offset)) and zero point. Channels are the columns of
    the matmul (a vector of parameters per tile vector) and the rows of the convolution (`apply(row=)`:
    one parameter broadcast to every lane)."""

    def __init__(self, out_dtype="int32", offset=None, mult=None, bias=None, relu=False, zero_point=0):
        self.out_dtype, self.offset, self.mult, self.bias = out_dtype, offset, mult, bias
        self.relu, self.zero_point = relu, zero_point

    def views(self):
        return [v for v in (self.offset, self.mult, self.bias) if v is not None]

    def apply(self, em, P, acc: str, col, live: int, lanes: int, row=None) -> str:
        """The stored vector (IR type per out_dtype) for accumulator `acc` at columns col .. col+live-1
        (`row` given: the parameters are per row, the same for every lane)."""
        vt = f"<{lanes} x i32>"

        def par(v, ty, zero):
            if row is None or v is None or v.literal is not None:
                return _vec(em, P, v, col, live, lanes, ty, zero)
            x = em(f"load {ty}, ptr {ptr_at(em, P, v, _add(em, v.offset, _mul(em, row, v.strides[-1])))}")
            return _splat(em, lanes, ty, x)
        if self.offset is not None:
            acc = em(f"add {vt} {acc}, {par(self.offset, 'i32', '0')}")
        if self.out_dtype == "int32":
            return acc
        ft = f"<{lanes} x float>"
        r = em(f"sitofp {vt} {acc} to {ft}")
        r = em(f"fmul {ft} {r}, {par(self.mult, 'float', '1.0')}")
        r = em(f"fadd {ft} {r}, {par(self.bias, 'float', '0.0')}")
        if self.relu:   # np.maximum(r, 0): NaN stays NaN
            neg = em(f"fcmp olt {ft} {r}, zeroinitializer")
            r = em(f"select <{lanes} x i1> {neg}, {ft} zeroinitializer, {ft} {r}")
        if self.out_dtype == "float32":
            return r
        lo, hi = Q.qrange(self.out_dtype)
        c = lambda x: _splat(em, lanes, "float", literal(float(x), "float32"))   # noqa: E731
        r = _fvec(em, "roundeven", lanes, r)
        r = em(f"fadd {ft} {r}, {c(self.zero_point)}")
        r = _fvec(em, "maxnum", lanes, _fvec(em, "minnum", lanes, r, c(hi)), c(lo))
        return em(f"trunc {vt} {em(f'fptosi {ft} {r} to {vt}')} to <{lanes} x i8>")

    def elem(self) -> str:
        return {"int32": "i32", "float32": "float", "uint8": "i8", "int8": "i8"}[self.out_dtype]


def qgemm(out: View, a: View, pk: View, n: int, k: int, m: int, flavour: str, epi: Epilogue, b_unsigned: bool,
          batch: tuple = (), a_batch=(), out_batch=()) -> Kernel:
    """out[i, j] (rows strided by out.strides[-2], columns by out.strides[-1]) = epilogue(A[i, :] . B[:, j])
    for a (n, k) int8/uint8 with unit k-stride and B packed in `pk` (packed for this flavour's panels and
    a's signedness; `b_unsigned`: B was uint8, packed as B - 128); `batch` dims loop outside with a's and
    out's element strides per dim."""
    lanes, nv, mr = ISAS[flavour]
    nr = lanes * nv
    k4f, kt = divmod(k, 4)
    k4 = k4f + (1 if kt else 0)
    panels, tail = divmod(m, nr)
    alpha = a.dtype == "int8"
    sa = a.strides[-2]
    so_r, so_c = out.strides[-2], out.strides[-1]
    vt = f"<{lanes} x i32>"
    et = epi.elem()
    flag_at = pk.offset + -(-m // nr) * (k4 * nr + nr)

    def gemm(em, P, ao, oo, mode, rng=None):
        def tile(p, i0, h, vecs):
            acc = [[em.alloca(vt) for _ in vecs] for _ in range(h)]
            for row in acc:
                for x in row:
                    em.raw(f"store {vt} zeroinitializer, ptr {x}")
            arow = [_add(em, ao, _mul(em, _add(em, i0, r), sa)) for r in range(h)]
            pbase = em(f"add i64 {em(f'mul i64 {p}, {k4 * nr + nr}')}, {pk.offset}")

            def step(g, tail_bytes=0):
                boff = em(f"add i64 {pbase}, {em(f'mul i64 {g}, {nr}')}")
                bv = [em(f"load {vt}, ptr {ptr_at(em, P, pk, em(f'add i64 {boff}, {q * lanes}'), lanes - 1)}, align 4")
                      for q in range(len(vecs))]
                for r in range(h):
                    at = em(f"add i64 {arow[r]}, {em(f'mul i64 {g}, 4')}")
                    if tail_bytes:
                        w = "0"
                        for t in range(tail_bytes):
                            x = em(f"load i8, ptr {ptr_at(em, P, a, _add(em, at, t))}")
                            x = em(f"zext i8 {x} to i32")
                            w = em(f"or i32 {w}, {em(f'shl i32 {x}, {8 * t}')}")
                    else:
                        w = em(f"load i32, ptr {ptr_at(em, P, a, at, 3)}, align 1")
                    if alpha:
                        w = em(f"xor i32 {w}, {FLIP}")
                    abc = _splat(em, lanes, "i32", w)
                    for q in range(len(vecs)):
                        cur = em(f"load {vt}, ptr {acc[r][q]}")
                        em.raw(f"store {vt} {_dot(em, mode, lanes, cur, abc, bv[q])}, ptr {acc[r][q]}")
            em.loop(k4f, step)
            if kt:
                step(str(k4f), kt)
            col0 = em(f"mul i64 {p}, {nr}")
            for r in range(h):
                extra = None
                if b_unsigned:   # uint8 B packed as B - 128: + 128 * the row sum of A (as multiplied)
                    s = em.alloca("i32")
                    em.raw(f"store i32 0, ptr {s}")

                    def add(kk, r=r, s=s):
                        x = em(f"load i8, ptr {ptr_at(em, P, a, _add(em, arow[r], kk))}")
                        x = em(f"zext i8 {x} to i32")
                        if alpha:
                            x = em(f"xor i32 {x}, 128")
                        cur = em(f"load i32, ptr {s}")
                        em.raw(f"store i32 {em(f'add i32 {cur}, {x}')}, ptr {s}")
                    em.loop(k, add)
                    extra = _splat(em, lanes, "i32", em(f"mul i32 {em(f'load i32, ptr {s}')}, 128"))
                orow = _add(em, oo, _mul(em, _add(em, i0, r), so_r))
                for q, live in enumerate(vecs):
                    v = em(f"load {vt}, ptr {acc[r][q]}")
                    corr = em(f"add i64 {pbase}, {k4 * nr + q * lanes}")
                    v = em(f"add {vt} {v}, {em(f'load {vt}, ptr {ptr_at(em, P, pk, corr, lanes - 1)}, align 4')}")
                    if extra is not None:
                        v = em(f"add {vt} {v}, {extra}")
                    col = em(f"add i64 {col0}, {q * lanes}")
                    res = epi.apply(em, P, v, col, live, lanes)
                    at = em(f"add i64 {orow}, {em(f'mul i64 {col}, {so_c}')}")
                    if so_c == 1 and live == lanes:
                        em.raw(f"store <{lanes} x {et}> {res}, ptr {ptr_at(em, P, out, at, lanes - 1)}, align 1")
                    else:
                        for i in range(live):
                            x = em(f"extractelement <{lanes} x {et}> {res}, i64 {i}")
                            em.raw(f"store {et} {x}, ptr {ptr_at(em, P, out, em(f'add i64 {at}, {i * so_c}'))}")

        def rows_of(p, vecs):
            full, rest = divmod(n, mr)
            em.loop(full, lambda ib: tile(p, em(f"mul i64 {ib}, {mr}"), mr, vecs))
            if rest:
                tile(p, str(full * mr), rest, vecs)
        if rng is None:
            em.loop(panels, lambda p: rows_of(p, [lanes] * nv))
            if tail:
                rows_of(str(panels), [lanes] * (tail // lanes) + ([tail % lanes] if tail % lanes else []))
            return
        lo, hi = rng   # a thread's share of the column panels [lo, hi) (the tail panel is number `panels`)
        end = em(f"select i1 {em(f'icmp slt i64 {hi}, {panels}')}, i64 {hi}, i64 {panels}")
        em.loop(end, lambda p: rows_of(p, [lanes] * nv), start=lo)
        if tail:
            em.if_(em(f"icmp sgt i64 {hi}, {panels}"), lambda: rows_of(
                str(panels), [lanes] * (tail // lanes) + ([tail % lanes] if tail % lanes else [])))

    def body(em, P, ao, oo, rng=None):
        if flavour == "avx2":   # vpmaddubsw only when the pack found no weight outside [-64, 64]
            fast = em(f"icmp ne i32 {em(f'load i32, ptr {ptr_at(em, P, pk, str(flag_at))}')}, 0")
            em.if_(fast, lambda: gemm(em, P, ao, oo, "fast", rng))
            em.if_(em(f"xor i1 {fast}, true"), lambda: gemm(em, P, ao, oo, "exact", rng))
        else:
            gemm(em, P, ao, oo, "exact" if flavour == "generic" else flavour, rng)

    total = panels + (1 if tail else 0)
    flops = 2 * n * k * m * int(np.prod(batch or (1,)))
    split = total if not batch and total >= 2 and flops >= _parallel_flops() else None

    def emit(em, P, lo, hi):
        if not (n and m) or not all(batch):
            return
        if split:
            body(em, P, str(a.offset), str(out.offset), (lo, hi))
            return
        nest(em, batch, [a_batch, out_batch], [a.offset, out.offset], lambda offs, _: body(em, P, *offs))
    views = [out, a, pk] + epi.views()
    return Kernel("qgemm", views, emit, split, flops, total if split else 0)


#: int8 GEMMs of at least GRAPHC_QGEMM_PARALLEL_FLOPS flops split their column panels across threads.
#: Off by default (as gemm.PARALLEL_FLOPS): on the shared 2-core Zen 2 (load 4-5) splitting W1 b256's first
#: layer (205 MFLOP) over 2 threads measured the same 2.8 ms as one thread
PARALLEL_FLOPS = 1 << 62


def _parallel_flops() -> int:
    v = int(os.environ.get("GRAPHC_QGEMM_PARALLEL_FLOPS", PARALLEL_FLOPS))
    return v if v > 0 else 1 << 62


# ---- convolutions: channels as rows, pixels as lanes ----------------------------------------------------

#: isa -> (int32 lanes, vectors per tile row, tile rows) of the convolution kernel
CONV_TILES = {"vnni512": (16, 2, 8), "vnni256": (8, 2, 6), "avx2": (8, 1, 6), "generic": (8, 1, 6)}


def pack_rows(w: np.ndarray, alpha: int) -> np.ndarray:
    """int8 weights (O, K) as int32 words of four consecutive k per row (zero padded), then per row the
    correction -alpha * sum_k w (alpha 128 for int8 inputs, flipped to uint8), then the flag word
    (1 when every weight lies in [-64, 64])."""
    o, k = w.shape
    k4 = -(-k // 4)
    padded = np.zeros((o, 4 * k4), np.int8)
    padded[:, :k] = w
    corr = (-alpha * w.astype(np.int64).sum(1)).astype(np.int32)
    flag = 1 if w.size == 0 or np.abs(w.astype(np.int32)).max() <= 64 else 0
    return np.concatenate([padded.view("<i4").reshape(-1), corr, np.array([flag], np.int32)]).astype(np.int32)


def qconv_rows(out: View, x: View, wp: View, cols: View, o: int, ckk: int, out_hw: tuple, kernel, stride, pads,
               dilation, pad_value: int, flavour: str, epi: Epilogue) -> Kernel:
    """out (n, o, hw) = epilogue(W (o, ckk) . im2col(x[i]) (ckk, hw)) image by image: each image's columns
    (rows padded to `cols`' row stride, a multiple of the lanes) are written by the vectorised im2col and
    multiplied at once, while in cache. Per k-group four column rows are interleaved into the lanes
    (four bytes per pixel) and the weights broadcast four bytes per channel; the epilogue's parameters
    are per channel (row) and each output row is stored as vectors."""
    from .conv import _im2col_image
    lanes, nv, mr = CONV_TILES[flavour]
    hw = out_hw[0] * out_hw[1]
    hwp = cols.strides[0]
    k4f, kt = divmod(ckk, 4)
    k4 = k4f + (1 if kt else 0)
    n = x.shape[0]
    alpha = x.dtype == "int8"
    corr_at, flag_at = wp.offset + o * k4, wp.offset + o * k4 + o
    vt, bt = f"<{lanes} x i32>", f"<{lanes} x i8>"
    et = epi.elem()
    image = _im2col_image(View(cols.buf, cols.offset, (ckk, hw), (hwp, 1), cols.dtype), x, kernel, stride, pads,
                          dilation, tuple(out_hw), (kernel[0] * kernel[1] * hwp, hwp, 1), pad_value)
    inter = "<" + ", ".join(f"i32 {t * lanes + j}" for j in range(lanes) for t in range(4)) + ">"
    cat = "<" + ", ".join(f"i32 {i}" for i in range(2 * lanes)) + ">"

    def bvec(em, P, g, j0, rows: int):
        """<lanes x i32>: per pixel j0 + lane the bytes of column rows 4g .. 4g+3 (rows past `rows` zero)."""
        parts = []
        for t in range(4):
            if t < rows:
                at = _add(em, cols.offset, _add(em, _mul(em, _add(em, _mul(em, g, 4), t), hwp), j0))
                parts.append(em(f"load {bt}, ptr {ptr_at(em, P, cols, at, lanes - 1)}, align 1"))
            else:
                parts.append("zeroinitializer")
        lo = em(f"shufflevector {bt} {parts[0]}, {bt} {parts[1]}, <{2 * lanes} x i32> {cat}")
        hi = em(f"shufflevector {bt} {parts[2]}, {bt} {parts[3]}, <{2 * lanes} x i32> {cat}")
        w = em(f"shufflevector <{2 * lanes} x i8> {lo}, <{2 * lanes} x i8> {hi}, <{4 * lanes} x i32> {inter}")
        v = em(f"bitcast <{4 * lanes} x i8> {w} to {vt}")
        return em(f"xor {vt} {v}, {_splat(em, lanes, 'i32', str(FLIP))}") if alpha else v

    def gemm(em, P, oo, mode):
        def tile(i0, h, j0, vecs):
            acc = [[em.alloca(vt) for _ in vecs] for _ in range(h)]
            for row in acc:
                for a in row:
                    em.raw(f"store {vt} zeroinitializer, ptr {a}")

            def step(g, rows=4):
                bv = [bvec(em, P, g, _add(em, j0, q * lanes), rows) for q in range(len(vecs))]
                for r in range(h):
                    wat = _add(em, wp.offset, _add(em, _mul(em, _add(em, i0, r), k4), g))
                    abc = _splat(em, lanes, "i32", em(f"load i32, ptr {ptr_at(em, P, wp, wat)}"))
                    for q in range(len(vecs)):
                        cur = em(f"load {vt}, ptr {acc[r][q]}")
                        em.raw(f"store {vt} {_dot(em, mode, lanes, cur, bv[q], abc)}, ptr {acc[r][q]}")
            em.loop(k4f, step)
            if kt:
                step(str(k4f), kt)
            for r in range(h):
                ch = _add(em, i0, r)
                corr = _splat(em, lanes, "i32", em(f"load i32, ptr {ptr_at(em, P, wp, _add(em, corr_at, ch))}"))
                orow = _add(em, oo, _mul(em, ch, hw))
                for q, live in enumerate(vecs):
                    v = em(f"add {vt} {em(f'load {vt}, ptr {acc[r][q]}')}, {corr}")
                    res = epi.apply(em, P, v, None, live, lanes, row=ch)
                    at = _add(em, orow, _add(em, j0, q * lanes))
                    if live == lanes:
                        em.raw(f"store <{lanes} x {et}> {res}, ptr {ptr_at(em, P, out, at, lanes - 1)}, align 1")
                    else:
                        for i in range(live):
                            xv = em(f"extractelement <{lanes} x {et}> {res}, i64 {i}")
                            em.raw(f"store {et} {xv}, ptr {ptr_at(em, P, out, _add(em, at, i))}")

        nr = lanes * nv
        blocks, tail = divmod(hw, nr)

        def columns(j0, vecs):
            full, rest = divmod(o, mr)
            em.loop(full, lambda ib: tile(_mul(em, ib, mr), mr, j0, vecs))
            if rest:
                tile(str(full * mr), rest, j0, vecs)
        em.loop(blocks, lambda jb: columns(_mul(em, jb, nr), [lanes] * nv))
        if tail:
            columns(str(blocks * nr), [lanes] * (tail // lanes) + ([tail % lanes] if tail % lanes else []))

    def one(em, P, oo, xo):
        image(em, P, cols.offset, xo)
        if flavour == "avx2":   # vpmaddubsw only when no weight lies outside [-64, 64]
            fast = em(f"icmp ne i32 {em(f'load i32, ptr {ptr_at(em, P, wp, str(flag_at))}')}, 0")
            em.if_(fast, lambda: gemm(em, P, oo, "fast"))
            em.if_(em(f"xor i1 {fast}, true"), lambda: gemm(em, P, oo, "exact"))
        else:
            gemm(em, P, oo, "exact" if flavour == "generic" else flavour)

    def emit(em, P, lo, hi):
        if out.size:
            nest(em, (n,), [(o * hw,), (x.strides[0],)], [out.offset, x.offset], lambda offs, _: one(em, P, *offs))
    return Kernel("qconv", [out, x, wp, cols] + epi.views(), emit, None, 2 * n * o * ckk * hw)


# ---- plan rows ----------------------------------------------------------------------------------------

def _const_array(plan, v: View) -> np.ndarray | None:
    """The values of a view of a constant buffer (None for other buffers)."""
    if v.literal is not None:
        return np.full(v.shape, v.literal, v.dtype)
    buf = plan.buffers[v.buf]
    if buf.kind != "const":
        return None
    base = plan.consts[buf.index].reshape(-1).view(v.dtype)
    item = base.itemsize
    return np.lib.stride_tricks.as_strided(base[v.offset:], v.shape, [s * item for s in v.strides]).copy()


def packed_b(plan, b: View, a_dtype: str, flavour: str) -> View:
    """B (k, m) packed for this flavour: a new constant (packed now) when B is constant, else an arena
    buffer filled by a pack kernel before the product."""
    k, m = b.shape
    nr = panel_width(flavour)
    alpha = 128 if a_dtype == "int8" else 0
    words = packed_words(k, m, nr)
    arr = _const_array(plan, b)
    if arr is not None:
        data = pack(arr, nr, alpha)
        buf = plan.new_buffer("const", data.nbytes, len(plan.consts))
        plan.consts.append(data)
        pk = View(buf, 0, (words,), (1,), "int32")
    else:
        pk = plan.fresh(None, (words,), "int32")
        plan.add(pack_kernel(pk, b, nr, alpha), [b], [pk])
    return pk


def _epilogue(node, ins) -> Epilogue:
    a = node.attrs
    if len(ins) == 2:
        return Epilogue()
    return Epilogue(a["out_dtype"], *ins[2:5], relu=a["relu"], zero_point=a["out_zero_point"])


def _rows(plan, a: View):
    """a (batch..., n, k) as one (rows, k) matrix with unit k-stride, or None when the batch does not
    collapse into rows."""
    if a.literal is not None:
        return None
    if a.strides[-1] != 1 and a.shape[-1] > 1:
        return None
    dims, (st,) = collapse(a.shape[:-1], [a.strides[:-1]])
    if len(dims) > 1:
        return None
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))
    return View(a.buf, a.offset, (rows, a.shape[-1]), (st[0] if dims else 0, 1), a.dtype)


@lowers(Q.MatMulInteger, Q.QLinearMatMul)
def _qmatmul(plan, node, ins):
    """(batch..., n, k) @ (k, m) (any batch of b must broadcast): one int8 GEMM over batch*n rows."""
    t = node.outputs[0]
    a, b = ins[:2]
    if any(s for s in b.strides[:-2]):
        raise NotLowerable("matmul_integer with a batched b")
    b = View(b.buf, b.offset, b.shape[-2:], b.strides[-2:], b.dtype, b.literal)
    flavour = isa()
    shape_out = plan.shape(t)
    if int(np.prod(shape_out[:-1], dtype=np.int64)) != int(np.prod(a.shape[:-1], dtype=np.int64)):
        raise NotLowerable("matmul_integer: b's batch broadcasts a")
    rows = _rows(plan, a)
    if rows is None:
        a = plan.materialise(a)
        rows = _rows(plan, a)
    out = plan.fresh(t)
    n, k = rows.shape
    m = b.shape[1]
    pk = packed_b(plan, b, a.dtype, flavour)
    epi = _epilogue(node, ins)
    o2 = View(out.buf, out.offset, (n, m), (m, 1), out.dtype)
    plan.add(qgemm(o2, rows, pk, n, k, m, flavour, epi, b.dtype == "uint8"), [rows, pk] + epi.views(), [o2])
    plan.view[id(t)] = out


@lowers(Q.ConvInteger, Q.QLinearConv2d)
def _qconv(plan, node, ins):
    """im2col (pixels x C*KH*KW, padding = pad_value) then the int8 GEMM against the packed weights,
    image by image, storing channels into NCHW."""
    from . import conv
    t, at = node.outputs[0], node.attrs
    if at["groups"] != 1:
        raise NotLowerable("grouped integer convolution")
    x, w = ins[:2]
    x = x if x.literal is None and x.contiguous else plan.materialise(x)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    oshape = plan.shape(t)
    oh, ow = oshape[2:]
    hw, ckk = oh * ow, c * kh * kw
    flavour = isa()
    wv = _const_array(plan, w)
    if wv is not None and w.dtype == "int8":   # channels as rows, pixels as lanes (see qconv_rows)
        lanes = CONV_TILES[flavour][0]
        data = pack_rows(wv.reshape(o, ckk), 128 if x.dtype == "int8" else 0)
        buf = plan.new_buffer("const", data.nbytes, len(plan.consts))
        plan.consts.append(data)
        wp = View(buf, 0, (data.size,), (1,), "int32")
        hwp = -(-hw // lanes) * lanes
        cols = plan.fresh(None, (ckk, hwp), x.dtype)
        out = plan.fresh(t)
        epi = _epilogue(node, ins)
        plan.add(qconv_rows(out, x, wp, cols, o, ckk, (oh, ow), (kh, kw), at["stride"], at["pads"], at["dilation"],
                            at["pad_value"], flavour, epi), [x, wp] + epi.views(), [out, cols])
        plan.view[id(t)] = out
        return
    # the weights as B (C*KH*KW, O)
    wt = View(w.buf, w.offset, (ckk, o), (1, w.strides[0]), w.dtype, w.literal) if w.contiguous or \
        w.literal is not None else None
    if wt is None:
        w = plan.materialise(w)
        wt = View(w.buf, w.offset, (ckk, o), (1, ckk), w.dtype)
    pk = packed_b(plan, wt, x.dtype, flavour)
    cols = plan.fresh(None, (n * hw, ckk), x.dtype)
    plan.add(conv.im2col(cols, x, (kh, kw), at["stride"], at["pads"], at["dilation"], (oh, ow), (kh * kw, 1, ckk),
                         pad_value=at["pad_value"]), [x], [cols])
    out = plan.fresh(t)
    epi = _epilogue(node, ins)
    a1 = View(cols.buf, cols.offset, (hw, ckk), (ckk, 1), cols.dtype)
    o1 = View(out.buf, out.offset, (hw, o), (1, hw), out.dtype)
    plan.add(qgemm(o1, a1, pk, hw, ckk, o, flavour, epi, w.dtype == "uint8", (n,), (hw * ckk,), (o * hw,)),
             [cols, pk] + epi.views(), [out])
    plan.view[id(t)] = out


# ---- quantize_linear: its scalar row (an elementwise op like any other: it fuses) ---------------------

def _quantize_row(em, attrs, args, out):
    (x, dx), (s, ds), (z, dz) = args
    ct = "float64" if "float64" in (dx, ds) else "float32"
    ty = "double" if ct == "float64" else "float"
    sfx = "f64" if ct == "float64" else "f32"
    q = em(f"fdiv {ty} {convert(em, x, dx, ct)}, {convert(em, s, ds, ct)}")
    r = em(f"call {ty} @llvm.roundeven.{sfx}({ty} {q})")
    r = em(f"fadd {ty} {r}, {convert(em, z, dz, ct)}")
    lo, hi = Q.qrange(out)
    r = em(f"call {ty} @llvm.minnum.{sfx}({ty} {r}, {ty} {literal(float(hi), ct)})")
    r = em(f"call {ty} @llvm.maxnum.{sfx}({ty} {r}, {ty} {literal(float(lo), ct)})")
    return em(f"trunc i32 {em(f'fptosi {ty} {r} to i32')} to {VTYPE[out]}")


def _register_quantize():
    from .plan import Plan
    CODE_FOR_OP[Q.QuantizeLinear] = _quantize_row
    PLAN[Q.QuantizeLinear] = Plan._elementwise


_register_quantize()


# ---- inspection: the kernel for another CPU ---------------------------------------------------------------

def assembly(flavour: str, n: int, k: int, m: int, a_dtype: str = "uint8", out_dtype: str = "uint8",
             cpu: str = "icelake-server", features: str = "+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2") -> str:
    """Assembly of a standalone int8 GEMM kernel of `flavour` compiled for `cpu` with `features`
    (compile only: nothing runs), e.g. to check that the VNNI flavour becomes `vpdpbusd` on a host
    without AVX-512. Buffers: 0 the output, 1 A, 2 the packed B, 3-5 offset, mult, bias."""
    import llvmlite.binding as llvm

    from . import mathlib
    from .irtext import Emitter
    jit.target_machine()
    words = packed_words(k, m, panel_width(flavour))
    out = View(0, 0, (n, m), (m, 1), out_dtype)
    a = View(1, 0, (n, k), (k, 1), a_dtype)
    pk = View(2, 0, (words,), (1,), "int32")
    epi = Epilogue() if out_dtype == "int32" else Epilogue(
        out_dtype, View(3, 0, (m,), (1,), "int32"), View(4, 0, (m,), (1,), "float32"),
        View(5, 0, (m,), (1,), "float32"), relu=True, zero_point=0)
    kern = qgemm(out, a, pk, n, k, m, flavour, epi, False)
    em = Emitter()
    P = {b: f"%b{b}" for b in range(6)}
    kern.emit(em, P, "%lo", "%hi")
    params = ", ".join([f"ptr noalias %b{i}" for i in range(6)] + ["i64 %lo", "i64 %hi"])
    ir = mathlib.DECLARATIONS + "".join(DECLARATIONS) + em.function(f"define void @qgemm_kernel({params}) nounwind")
    mod = llvm.parse_assembly(ir)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)
