"""Winograd convolutions F(m x m, 3 x 3) on llvm (conv.plan_conv2d delegates its 3x3 stride-1 rows here
when `tile_size` says it pays; the direct paths keep every other convolution).

out = A^T [ (G g G^T) . (B^T d B) ] A per m x m output tile. The weights' transform U (alpha^2, O, C)
(alpha = m + 2) reads parameters only, so the schedule hoists it into the prologue (run once, again when a
parameter changes). The rest works on items (an image's block of R tile rows), split over the pool by
slot as the direct paths are (conv._slot_loop: each slot owns its scratch; race-free, the sums of one item
independent of the thread count). Per item:
  1. the block's input rows copied into the slot's zero-padded scratch, each row's columns split into m
     phase planes (column m*q + p at p*Q + q: the tiles of a tile row then read whole vectors, no
     shuffles, no bounds tests);
  2. the input transform B^T d B, vectors of L tiles of a tile row, stored as V (alpha^2, C, tiles);
  3. alpha^2 products M[xi] (O x tiles) = U[xi] (O x C) @ V[xi] (C x tiles): the register-blocked
     micro-kernel for narrow products, one-thread BLAS calls for wide ones (MICRO_KERNEL_COLS);
  4. the output transform A^T M A, vectors over tiles again, interleaved into the output rows (masked at
     the right edge, the rows past the bottom skipped).
Two forms (staged_rule): fused, the four phases of an item in a row in one kernel (V and M in the slot's
L2; the alpha^2 products one run-time loop, not alpha^2 copies of the micro-kernel); staged, three kernels
over the whole call's tiles (the transforms by blocks of channels, the products split by xi, each U[xi]
read once: for wide channels, whose U outgrows the cache).
F(2x2,3x3) multiplies 16 instead of 36 times per 2x2 outputs (2.25x fewer GEMM flops), F(4x4,3x3) 36
instead of 144 (4x) with larger transform constants (float32 error a few 1e-6 of the output's scale).
GRAPHC_LLVM_WINOGRAD=0 turns it off, =2 / =4 forces that tile size wherever the shape allows (tests);
GRAPHC_LLVM_WINOGRAD_MODE=staged|fused forces a form. Staged products of few tiles (batch 1) are turned round
(`transposed_rule`): M^T = V^T U^T, the weights' transform writing U^T in the micro-kernel's panels."""
from __future__ import annotations

import os
from fractions import Fraction as Fr

from . import conv as _conv
from .conv import _slot_kernel, _slot_loop, blas_gemm, slot_count, threads
from .gemm import vector_shape, vload, vstore
from .irtext import VTYPE, literal
from .kernels import Kernel, load, nest, ptr_at, store
from ..schedule.views import View


def _m(rows):
    return [[Fr(x) for x in r] for r in rows]


#: (B^T (alpha x alpha), G (alpha x 3), A^T (m x alpha)) of F(m x m, 3 x 3) (Lavin & Gray 2015; points
#: 0, 1, -1 (m=2); 0, +-1, +-2, inf (m=4))
MATRICES = {
    2: (_m([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        _m([[1, 0, 0], [Fr(1, 2), Fr(1, 2), Fr(1, 2)], [Fr(1, 2), Fr(-1, 2), Fr(1, 2)], [0, 0, 1]]),
        _m([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (_m([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        _m([[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
            [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]]),
        _m([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])),
}

#: the rule (auto): channels in and out at least this many (below it the per-tile transforms cost more
#: than the GEMM saves)
MIN_CHANNELS = 16
#: at least this many 2x2 output tiles per call (n * tiles per image): fewer, and the transformed weights
#: (alpha^2/9 times the direct ones) are read for too little work (ResNet-18's last stage at batch 1, 16
#: tiles of 512 channels: 1.45x faster than direct with the micro-kernel products)
MIN_TILES = 16
#: F(4x4, 3x3) for outputs at least this many rows and columns, F(2x2, 3x3) below (measured on ResNet-18's
#: layers, one thread's CPU time on a Zen 2: 4x4 1.2-1.35x faster at 56x56 and 28x28, equal to 1.1x at
#: 14x14, 1.35x slower at 7x7 where 4x4 tiles pad the 7 columns to 8). Its float32 error: a few 1e-6 of the
#: output's scale against 1e-7 for 2x2 (tests/test_llvm_winograd.py; W10's output within 4e-7 either way)
WIDE_TILE_MIN = 14
#: the alpha^2 products run the register-blocked micro-kernel (gemm.gemm_tiles: no packing) up to this many
#: columns (tiles), one-thread BLAS calls above: BLAS's packing of U[xi] (O x C) costs as much as a narrow
#: product (ResNet-18 at batch 1: the micro-kernel 1.1-1.5x faster; staged batch 8 at 448+ tiles: BLAS
#: 1.15x faster). GRAPHC_LLVM_SMALL_GEMM=1 / 0 forces the micro-kernel / BLAS.
MICRO_KERNEL_COLS = 256
#: bytes of one slot's V and M scratch per item (tile rows are blocked to about this: L2-sized)
BLOCK_BYTES = 768 * 1024


#: the staged form's input transform takes a channel's tile rows as one vector of up to WHOLE_LANES lanes
#: (_Parts._channel_transform) where a tile row is one vector of L lanes (False: a tile row at a time)
WHOLE_CHANNEL = True
WHOLE_LANES = 64
#: copy_rows reads an input row narrower than this as one vector and shuffles it into the phase layout
#: (_copy_rows_vector); 0: element by element
COPY_VECTOR_LANES = 64
#: a tile row's vectors may be cut down to lanes / QUARTER_MAX (at least 4): AVX-512's 16 float32 lanes
#: halve to 8 and then 4 for 7x7 outputs (4 tiles of 2x2 a row: 8 lanes padded every tile row, and so the
#: staged products' columns, to twice the tiles). ResNet-18 batch 1 (W10 b1) on the Intel Xeon (AVX-512,
#: 2 cores; in-process A/B, 10 interleaved rounds): 17.6 -> 16.7 ms against one halving at most
QUARTER_MAX = 4


def tile_size(x: View, w: View, stride, dilation, groups: int, out_hw) -> int | None:
    """m of the F(m x m, 3 x 3) Winograd path for this convolution, or None for the direct paths. Only 3x3,
    stride 1, dilation 1, one group, float32/float64; auto: C and O >= MIN_CHANNELS and >= MIN_TILES
    2x2 tiles; F(4x4) from WIDE_TILE_MIN outputs a side, else F(2x2)."""
    mode = os.environ.get("GRAPHC_LLVM_WINOGRAD", "auto")
    if mode == "0" or x.dtype not in ("float32", "float64") or x.dtype != w.dtype:
        return None
    o, c, kh, kw = w.shape
    if (kh, kw) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or groups != 1:
        return None
    oh, ow = out_hw
    if oh < 1 or ow < 1 or x.shape[0] < 1:
        return None
    if mode in ("2", "4"):
        return int(mode)
    tiles = x.shape[0] * -(-oh // 2) * -(-ow // 2)
    if c >= MIN_CHANNELS and o >= MIN_CHANNELS and tiles >= MIN_TILES:
        return 4 if min(oh, ow) >= WIDE_TILE_MIN else 2
    return None


def geometry(n: int, c: int, o: int, out_hw, m: int, dtype: str, staged: bool = False) -> dict:
    """How the work is cut: L lanes per vector over a tile row's tiles (a full vector, or half of one where
    that pads a tile row by more than a quarter), twp tiles per row padded to whole vectors, R tile rows
    per item (fused: V and M of an item about BLOCK_BYTES; staged: every tile row, th, its transforms' items
    being blocks of channels: conv_staged)."""
    oh, ow = out_hw
    a = m + 2
    th, tw = -(-oh // m), -(-ow // m)
    lanes = vector_shape(dtype)[0]
    L = lanes   # full vectors, unless they would pad a row by more than a quarter (7x7: half vectors)
    while -(-tw // L) * L > tw * 5 // 4 and L >= 4 and L > lanes // QUARTER_MAX:
        L //= 2
    twp = -(-tw // L) * L
    es = 4 if dtype == "float32" else 8
    per_row = a * a * twp * (c + o) * es
    R = max(1, min(th, BLOCK_BYTES // max(1, per_row)))
    t = threads()
    flops = 2 * n * a * a * o * c * th * twp
    want = 2 * t if t > 1 and flops >= _conv.SPLIT_FLOPS else 1
    if staged:
        R = th
    elif n * -(-th // R) < want:
        R = max(1, min(R, th * n // want))
    blocks = -(-th // R)
    balanced = not staged and BALANCED_ITEMS
    if balanced:
        # split over threads: as many items as a multiple of the slots; and every image's items of heights
        # within one tile row of each other (item_rows). W10 b1's 56x56 layers had 7 items of 2 tile rows
        # over 4 slots (1, 2, 2, 2 items): one thread ran 8 tile rows while the other ran 6, and the caller
        # waited for it every layer (the pool's late dispatches)
        if want > 1:
            blocks = next((b for b in range(blocks, th + 1) if (n * b) % want == 0), blocks)
        R = -(-th // blocks)
    items = n * blocks
    return {"n": n, "m": m, "a": a, "th": th, "tw": tw, "L": L, "twp": twp, "R": R, "blocks": blocks,
            "items": items, "slots": slot_count(items, flops), "flops": flops, "balanced": balanced}


#: a fused Winograd convolution cuts each image's tile rows into items of balanced heights, split over threads
#: as a multiple of the slots' count of them (geometry; False: items of R rows and a shorter last one)
BALANCED_ITEMS = True


def item_rows(em, geo: dict, blk) -> tuple:
    """(first tile row, tile rows) of block `blk` of an image (an i64 value): rows blk*th // blocks up to the
    next block's (balanced heights, R or R - 1), or blk*R and R with a shorter last block; the height an int
    where every block has it, else an i64 value."""
    th, blocks, R = geo["th"], geo["blocks"], geo["R"]
    if th == blocks * R:
        return em(f"mul i64 {blk}, {R}"), R
    if not geo["balanced"]:
        last = em(f"icmp eq i64 {blk}, {blocks - 1}")
        return em(f"mul i64 {blk}, {R}"), em(f"select i1 {last}, i64 {th - (blocks - 1) * R}, i64 {R}")
    first = em(f"udiv i64 {em(f'mul i64 {blk}, {th}')}, {blocks}")
    after = em(f"add i64 {blk}, 1")
    nxt = em(f"udiv i64 {em(f'mul i64 {after}, {th}')}, {blocks}")
    return first, em(f"sub i64 {nxt}, {first}")


# ---- IR helpers -------------------------------------------------------------------------------------------

def _splat_const(value, dtype: str, lanes: int) -> str:
    ty = VTYPE[dtype]
    c = literal(float(value), dtype)
    return "<" + ", ".join(f"{ty} {c}" for _ in range(lanes)) + ">"


def _combine(em, terms, vt: str, dtype: str, lanes: int) -> str:
    """sum(coef * value) over terms (coef a Fraction, value an SSA vector or scalar), zeros skipped:
    +-1 as fadd/fsub, others one fmul each (contractible into FMAs). Scalars when lanes == 0."""
    acc = None
    for coef, v in terms:
        if coef == 0:
            continue
        mag = abs(coef)
        if mag != 1:
            k = literal(float(mag), dtype) if lanes == 0 else _splat_const(mag, dtype, lanes)
            v = em(f"fmul contract {vt} {v}, {k}")
        if acc is None:
            acc = v if coef > 0 else em(f"fneg {vt} {v}")
        else:
            acc = em(f"{'fadd' if coef > 0 else 'fsub'} contract {vt} {acc}, {v}")
    if acc is None:
        return "zeroinitializer" if lanes else literal(0.0, dtype)
    return acc


def _apply(em, mat, xs, vt, dtype, lanes):
    """mat @ xs (a list of SSA values): F(4x4)'s B^T and A^T factored (shared sums, one multiply-add per
    constant: 14 and 11 operations instead of 26 and 15), any other matrix term by term."""
    def op(kind, a, b):
        return em(f"{kind} contract {vt} {a}, {b}")

    def k(c):
        return literal(float(c), dtype) if lanes == 0 else _splat_const(c, dtype, lanes)

    def axpy(c, a, b):   # c * a + b (contractible into one FMA)
        return op("fadd", op("fmul", a, k(c)), b)
    if mat is MATRICES[4][0]:
        d0, d1, d2, d3, d4, d5 = xs
        s12, s34, t12, t43 = op("fadd", d1, d2), op("fadd", d3, d4), op("fsub", d1, d2), op("fsub", d4, d3)
        f31, g42 = op("fsub", d3, d1), op("fsub", d4, d2)
        return [axpy(4, d0, axpy(-5, d2, d4)), axpy(-4, s12, s34), axpy(4, t12, t43), axpy(2, f31, g42),
                axpy(-2, f31, g42), axpy(4, d1, axpy(-5, d3, d5))]
    if mat is MATRICES[4][2]:
        m0, m1, m2, m3, m4, m5 = xs
        s1, d1, s2, d2 = op("fadd", m1, m2), op("fsub", m1, m2), op("fadd", m3, m4), op("fsub", m3, m4)
        return [op("fadd", op("fadd", m0, s1), s2), axpy(2, d2, d1), axpy(4, s2, s1),
                op("fadd", axpy(8, d2, d1), m5)]
    return [_combine(em, [(row[j], xs[j]) for j in range(len(xs))], vt, dtype, lanes) for row in mat]


def _sandwich(em, left, d, right, vt, dtype, lanes):
    """left (p x q) @ d (q x r) @ right^T (s x r)^T, d a grid of SSA values: p x s values."""
    cols = [_apply(em, left, [d[k][j] for k in range(len(d))], vt, dtype, lanes) for j in range(len(d[0]))]
    mid = [[cols[j][i] for j in range(len(d[0]))] for i in range(len(left))]
    return [_apply(em, right, mid[i], vt, dtype, lanes) for i in range(len(left))]


# ---- the weights' transform (a prologue step: parameters only) ---------------------------------------------

def weight_transform(u: View, w: View, m: int, panel: int | None = None) -> Kernel:
    """u (alpha^2, O, C) = G w[o, c] G^T for every filter and channel; float32 computed in double (the 1/6,
    1/24 of F(4x4) rounded once). `panel` (the turned products, transposed_rule): u holds each U[xi]^T
    (C x O) in the micro-kernel's panels of that many columns instead (gemm.pack_panels' layout, the last
    panel's columns past O zero), alpha^2 such blocks of gemm.packed_size(C, O, panel) elements."""
    from . import gemm
    o, c = w.shape[:2]
    _, g, _ = MATRICES[m]
    a = m + 2
    dt = w.dtype
    wide = "double"
    block = o * c if panel is None else gemm.packed_size(c, o, panel)

    def emit(em, P, lo, hi):
        def body(offs, idx):
            wo, uo = offs
            if panel is not None:   # (o, c) -> panel o // panel, row c, column o % panel
                oi, ci = idx
                pan = em(f"mul i64 {em(f'udiv i64 {oi}, {panel}')}, {c * panel}")
                col = em(f"add i64 {em(f'mul i64 {ci}, {panel}')}, {em(f'urem i64 {oi}, {panel}')}")
                uo = em(f"add i64 {u.offset}, {em(f'add i64 {pan}, {col}')}")
            vals = [[load(em, P, w, em(f"add i64 {wo}, {i * w.strides[2] + j * w.strides[3]}")) for j in range(3)]
                    for i in range(3)]
            if dt == "float32":
                vals = [[em(f"fpext float {v} to double") for v in r] for r in vals]
            res = _sandwich(em, g, vals, g, wide, "float64", 0)
            for i in range(a):
                for j in range(a):
                    v = res[i][j]
                    if dt == "float32":
                        v = em(f"fptrunc double {v} to float")
                    store(em, P, u, em(f"add i64 {uo}, {(i * a + j) * block}"), v)
        nest(em, (o, c), [(w.strides[0], w.strides[1]), (c, 1)], [w.offset, u.offset], body)
        pad = -o % panel if panel is not None else 0
        if pad:   # the last panel's columns past O: zeros (the micro-kernel reads whole vectors)
            first = u.offset + (o // panel) * c * panel + o % panel
            nest(em, (a * a, c, pad), [(block, panel, 1)], [first],
                 lambda offs, _: store(em, P, u, offs[0], literal(0.0, dt)))
    return Kernel("winograd_weights", [u, w], emit, None, 2 * a * a * 12 * o * c)


# ---- the convolution ------------------------------------------------------------------------------------

class _Parts:
    """The IR of the conv's phases on one item (an image's block of tile rows). V (alpha^2, C, ld) and M
    (alpha^2, O, ld) are addressed from a base at the item's first tile column, rows `ld` long: a slot's
    own block (fused: ld = R * twp) or the whole call's tiles (staged: ld = n * th * twp)."""

    def __init__(self, out: View, x: View, u: View, pad: View, vbuf: View, mbuf: View, pads, geo: dict, ld: int):
        from . import gemm
        self.out, self.x, self.u, self.pad, self.vbuf, self.mbuf, self.geo, self.ld = \
            out, x, u, pad, vbuf, mbuf, geo, ld
        self.n, self.c, self.h, self.w = x.shape
        self.o, self.oh, self.ow = out.shape[1:]
        self.m, self.a, self.L, self.twp, self.R = geo["m"], geo["a"], geo["L"], geo["twp"], geo["R"]
        self.bt, _, self.at = MATRICES[self.m]
        self.dt = x.dtype
        self.ty = VTYPE[self.dt]
        self.vt = f"<{self.L} x {self.ty}>"
        self.wide = f"<{self.m * self.L} x {self.ty}>"
        self.rows_in = self.R * self.m + 2
        self.Wp = pad.shape[-1]   # m phase planes of Q columns
        self.Q = self.Wp // self.m
        (self.pt, _), (self.pl, _) = pads
        self.groups = self.twp // self.L
        mode = os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto")
        wide = ld > MICRO_KERNEL_COLS or mode == "0"
        self.use_blas = gemm.use_blas(x, u, out) and mode != "1" and wide

    def copy_rows(self, em, P, po, xo, y0, nrows: int, chans: int | None = None):
        """pad[ch, rr] = input row y0 + rr of every channel, zero-padded, its columns split by phase: padded
        column m*q + p at p*Q + q (so the input transform loads a tile row's columns as whole vectors);
        rows outside the image: zeros."""
        x, pad, h, w, pl, Wp, ty, m, Q = self.x, self.pad, self.h, self.w, self.pl, self.Wp, self.ty, self.m, self.Q
        zero = literal(0, self.dt)
        if x.strides[3] == 1 and w < COPY_VECTOR_LANES:
            self._copy_rows_vector(em, P, po, xo, y0, nrows, chans)
            return

        def per_row(offs, idx):
            y = em(f"add i64 {y0}, {idx[1]}")
            ok = em(f"and i1 {em(f'icmp sge i64 {y}, 0')}, {em(f'icmp slt i64 {y}, {h}')}")
            yc = em(f"select i1 {ok}, i64 {y}, i64 0")
            src = em(f"add i64 {offs[1]}, {em(f'mul i64 {yc}, {x.strides[2]}')}")
            for p in range(m):
                dst = em(f"add i64 {offs[0]}, {p * Q}")
                q0 = min(Q, max(0, -(-(pl - p) // m)))
                q1 = min(Q, max(q0, -(-(pl + w - p) // m)))
                nest(em, [q0], [(1,)], [dst], lambda q, _: store(em, P, pad, q[0], zero))

                def cp(q, _):
                    v = load(em, P, x, q[1])
                    store(em, P, pad, q[0], em(f"select i1 {ok}, {ty} {v}, {ty} {zero}"))
                first = (m * q0 + p - pl) * x.strides[3]
                nest(em, [q1 - q0], [(1,), (m * x.strides[3],)],
                     [em(f"add i64 {dst}, {q0}"), em(f"add i64 {src}, {first}")], cp)
                nest(em, [Q - q1], [(1,)], [em(f"add i64 {dst}, {q1}")],
                     lambda q, _: store(em, P, pad, q[0], zero))
        nest(em, [self.c if chans is None else chans, nrows], [(self.rows_in * Wp, Wp), (x.strides[1], 0)], [po, xo],
             per_row)

    def _copy_rows_vector(self, em, P, po, xo, y0, nrows: int, chans: int | None):
        """copy_rows for rows narrower than COPY_VECTOR_LANES: each input row read as one vector (its lanes
        past the row zero), put in the phase layout by one shuffle (a padded column's lane: the zero one)
        and stored as the scratch row (its Wp elements), a row outside the image as zeros."""
        x, pad, h, w, pl, Wp, ty, m, Q = self.x, self.pad, self.h, self.w, self.pl, self.Wp, self.ty, self.m, self.Q
        lanes = 1 << w.bit_length()   # > w: lane w is zero
        rt, st = f"<{lanes} x {ty}>", f"<{Wp} x {ty}>"
        idx = [m * q + p - pl for p in range(m) for q in range(Q)]
        idx = ", ".join(f"i32 {i if 0 <= i < w else w}" for i in idx)

        def per_row(offs, ix):
            y = em(f"add i64 {y0}, {ix[1]}")
            ok = em(f"and i1 {em(f'icmp sge i64 {y}, 0')}, {em(f'icmp slt i64 {y}, {h}')}")
            yc = em(f"select i1 {ok}, i64 {y}, i64 0")
            v = vload(em, P, x, em(f"add i64 {offs[1]}, {em(f'mul i64 {yc}, {x.strides[2]}')}"), rt, lanes, w)
            v = em(f"select i1 {ok}, {rt} {v}, {rt} zeroinitializer")
            vstore(em, P, pad, offs[0], em(f"shufflevector {rt} {v}, {rt} poison, <{Wp} x i32> <{idx}>"), st, Wp, Wp)
        nest(em, [self.c if chans is None else chans, nrows], [(self.rows_in * Wp, Wp), (x.strides[1], 0)], [po, xo],
             per_row)

    def input_transform(self, em, P, po, vo, nrows: int, chans: int | None = None):
        """V[xi, ch, r * twp + tile] = (B^T d B)[xi] of the tiles of the item's tile row r (vectors of L)."""
        m, a, L, Wp, vt, c, ld = self.m, self.a, self.L, self.Wp, self.vt, self.c, self.ld
        if chans == 1 and WHOLE_CHANNEL and self.groups == 1 and nrows > 1 and nrows * L <= WHOLE_LANES:
            self._channel_transform(em, P, po, vo, nrows)
            return

        def per(offs, _):
            for g in range(self.groups):
                d = []
                for i in range(a):
                    row = []
                    for k in range(a):
                        off = em(f"add i64 {offs[0]}, {i * Wp + (k % m) * self.Q + g * L + k // m}")
                        row.append(em(f"load {vt}, ptr {ptr_at(em, P, self.pad, off, L - 1)}, align 4"))
                    d.append(row)
                res = _sandwich(em, self.bt, d, self.bt, vt, self.dt, L)
                for i in range(a):
                    for j in range(a):
                        dst = em(f"add i64 {offs[1]}, {(i * a + j) * c * ld + g * L}")
                        em.raw(f"store {vt} {res[i][j]}, ptr {ptr_at(em, P, self.vbuf, dst, L - 1)}, align 4")
        nest(em, [c if chans is None else chans, nrows], [(self.rows_in * Wp, m * Wp), (ld, self.twp)], [po, vo], per)

    def _channel_transform(self, em, P, po, vo, nrows: int):
        """input_transform of one channel's nrows tile rows as one vector (the staged form's, one tile row a
        vector of L = twp lanes): each d[i][k] put together from the rows' vectors by shuffles, one sandwich
        for the channel, and each V[xi] row of the channel (nrows * twp contiguous elements) written whole
        (a row of L lanes at a time wrote each of V's cache lines in nrows pieces, alpha^2 lines 32 KB apart
        at once: ResNet-18's 7x7 stage 55 us a layer)."""
        m, a, L, Wp, c, ld, ty = self.m, self.a, self.L, self.Wp, self.c, self.ld, self.ty
        width = 1 << (nrows * L - 1).bit_length()   # lanes of the channel's vectors (a power of two)
        wt = f"<{width} x {ty}>"

        def concat(vs: list, n: int):   # vectors of n lanes (a power-of-two count of them) side by side
            while len(vs) > 1:
                t = f"<{n} x {ty}>"
                idx = ", ".join(f"i32 {i}" for i in range(2 * n))
                vs = [em(f"shufflevector {t} {vs[q]}, {t} {vs[q + 1]}, <{2 * n} x i32> <{idx}>")
                      for q in range(0, len(vs), 2)]
                n *= 2
            return vs[0]
        d = []
        for i in range(a):
            row = []
            for k in range(a):
                parts = []
                for r in range(width // L):
                    if r >= nrows:   # lanes past the channel's tiles: zeros, never stored
                        parts.append("zeroinitializer")
                        continue
                    off = em(f"add i64 {po}, {r * m * Wp + i * Wp + (k % m) * self.Q + k // m}")
                    parts.append(em(f"load {self.vt}, ptr {ptr_at(em, P, self.pad, off, L - 1)}, align 4"))
                row.append(concat(parts, L))
            d.append(row)
        res = _sandwich(em, self.bt, d, self.bt, wt, self.dt, width)
        for i in range(a):
            for j in range(a):
                vstore(em, P, self.vbuf, em(f"add i64 {vo}, {(i * a + j) * c * ld}"), res[i][j], wt, width,
                       nrows * L)

    def product(self, em, P, xi, vo, mo, cols):
        """M[xi] (O x cols) = U[xi] (O x C) @ V[xi] (C x cols); xi an int or an i64 value (the micro-kernel
        computes all ld columns: cols only matters to BLAS)."""
        from . import gemm
        o, c, ld, u = self.o, self.c, self.ld, self.u
        uo = em(f"add i64 {u.offset}, {em(f'mul i64 {xi}, {o * c}')}")
        bo = em(f"add i64 {vo}, {em(f'mul i64 {xi}, {c * ld}')}")
        oo = em(f"add i64 {mo}, {em(f'mul i64 {xi}, {o * ld}')}")
        if self.use_blas:
            blas_gemm(em, P, self.mbuf, u, self.vbuf, uo, bo, oo, o, c, cols, c, ld, ld)
        else:   # the micro-kernel writes rows `cols` apart: every column of the block (ld) is computed
            gemm.gemm_tiles(em, P, View(self.mbuf.buf, 0, (o, ld), (ld, 1), self.dt),
                            View(u.buf, 0, (o, c), (c, 1), self.dt),
                            View(self.vbuf.buf, 0, (c, ld), (ld, 1), self.dt), uo, bo, oo, o, c, ld)

    def _vload(self, em, P, off):
        return em(f"load {self.vt}, ptr {ptr_at(em, P, self.mbuf, off, self.L - 1)}, align 4")

    def _interleave(self, em, ys):
        """Lane l * m + j of the result = ys[j][l] (m vectors of L)."""
        m, L, ty = self.m, self.L, self.ty
        cur, width = list(ys), L
        while len(cur) > 1:
            nxt = []
            for i in range(0, len(cur), 2):
                idx = "<" + ", ".join(f"i32 {k}" for k in range(2 * width)) + ">"
                t = f"<{width} x {ty}>"
                nxt.append(em(f"shufflevector {t} {cur[i]}, {t} {cur[i + 1]}, <{2 * width} x i32> {idx}"))
            cur, width = nxt, 2 * width
        perm = "<" + ", ".join(f"i32 {(q % m) * L + q // m}" for q in range(m * L)) + ">"
        return em(f"shufflevector {self.wide} {cur[0]}, {self.wide} poison, <{m * L} x i32> {perm}")

    def output_transform(self, em, P, mo, oo, ty0, nrows: int, chans: int | None = None):
        """out rows of the item's tile rows = (A^T M A) of its tiles, interleaved; masked at the right edge,
        the last tile row's rows past the bottom skipped."""
        m, a, L, o, ld, vt, oh, ow = self.m, self.a, self.L, self.o, self.ld, self.vt, self.oh, self.ow
        th = self.geo["th"]

        def per(offs, idx):
            ty_ = em(f"add i64 {ty0}, {idx[1]}")
            for g in range(self.groups):
                live = min(m * L, ow - m * g * L)
                if live <= 0:
                    continue
                mv = [[self._vload(em, P, em(f"add i64 {offs[0]}, {(i * a + j) * o * ld + g * L}"))
                       for j in range(a)] for i in range(a)]
                y = _sandwich(em, self.at, mv, self.at, vt, self.dt, L)
                for i in range(m):
                    yrow = em(f"add i64 {em(f'mul i64 {ty_}, {m}')}, {i}")
                    rowo = em(f"add i64 {offs[1]}, {em(f'mul i64 {yrow}, {ow}')}")
                    dst = em(f"add i64 {rowo}, {m * g * L}")
                    val = self._interleave(em, y[i])

                    def st(dst=dst, val=val, live=live):
                        vstore(em, P, self.out, dst, val, self.wide, m * L, live)
                    if (th - 1) * m + i >= oh:
                        em.if_(em(f"icmp slt i64 {yrow}, {oh}"), st)
                    else:
                        st()
        nest(em, [o if chans is None else chans, nrows], [(ld, self.twp), (oh * ow, 0)], [mo, oo], per)

    def item_blocks(self, em, it, body):
        """body(img, blk, ty0, nrows) for item `it`, nrows an int (item_rows' height: one body per height)."""
        blocks = self.geo["blocks"]
        img, blk = em(f"udiv i64 {it}, {blocks}"), em(f"urem i64 {it}, {blocks}")
        ty0, rows = item_rows(em, self.geo, blk)
        if isinstance(rows, int):
            body(img, blk, ty0, rows)
            return
        th, R = self.geo["th"], self.R
        heights = sorted({R, th - (blocks - 1) * R} if not self.geo["balanced"] else {R, R - 1})
        for hgt in heights:
            em.if_(em(f"icmp eq i64 {rows}, {hgt}"), lambda hgt=hgt: body(img, blk, ty0, hgt))

    def bases(self, em, s, img, ty0):
        """(pad slot base, x image base, out image base, first input row) of an item."""
        po = em(f"add i64 {self.pad.offset}, {em(f'mul i64 {s}, {self.pad.size // self.pad.shape[0]}')}")
        xo = em(f"add i64 {self.x.offset}, {em(f'mul i64 {img}, {self.x.strides[0]}')}")
        oo = em(f"add i64 {self.out.offset}, {em(f'mul i64 {img}, {self.o * self.oh * self.ow}')}")
        y0 = em(f"sub i64 {em(f'mul i64 {ty0}, {self.m}')}, {self.pt}")
        return po, xo, oo, y0


def conv_fused(out: View, x: View, u: View, pad: View, vbuf: View, mbuf: View, pads, geo: dict) -> Kernel:
    """out (n, O, oh, ow) = the 3x3 stride-1 convolution of x (n, C, h, w) with the filters whose transform
    is u (alpha^2, O, C), every phase of an item in a row while its V and M (the slot's scratch) are in
    cache: for many tiles (a large batch)."""
    slots = geo["slots"]
    parts = _Parts(out, x, u, pad, vbuf, mbuf, pads, geo, geo["R"] * geo["twp"])
    a = geo["a"]

    def one(em, P, s, img, blk, ty0, nrows):
        po, xo, oo, y0 = parts.bases(em, s, img, ty0)
        vo = em(f"add i64 {vbuf.offset}, {em(f'mul i64 {s}, {vbuf.size // slots}')}")
        mo = em(f"add i64 {mbuf.offset}, {em(f'mul i64 {s}, {mbuf.size // slots}')}")
        m = geo["m"]
        rows_in = nrows * m + 2 if isinstance(nrows, int) else em(f"add i64 {em(f'mul i64 {nrows}, {m}')}, 2")
        parts.copy_rows(em, P, po, xo, y0, rows_in)
        parts.input_transform(em, P, po, vo, nrows)
        # the alpha^2 products as a run-time loop: unrolled, each a copy of the micro-kernel (1.5 MB of IR)
        cols = nrows * geo["twp"] if parts.use_blas else None   # (the micro-kernel's width is the block's)
        em.loop(a * a, lambda xi: parts.product(em, P, xi, vo, mo, cols))
        parts.output_transform(em, P, mo, oo, ty0, nrows)

    def item(em, P, s, it):
        if parts.use_blas:   # BLAS products over the block's own columns: one body per block height
            parts.item_blocks(em, it, lambda *b: one(em, P, s, *b))
            return
        # the micro-kernel computes every column of the slot's block: one body, the height a run-time value
        blocks = geo["blocks"]
        img, blk = em(f"udiv i64 {it}, {blocks}"), em(f"urem i64 {it}, {blocks}")
        ty0, nrows = item_rows(em, geo, blk)
        one(em, P, s, img, blk, ty0, nrows)

    def emit(em, P, lo, hi):
        if out.size:
            _slot_loop(em, geo["items"], slots, lo, hi, lambda s, it: item(em, P, s, it))
    return _slot_kernel("conv2d_winograd", [out, x, u, pad, vbuf, mbuf], emit, slots, geo["flops"],
                        blas=parts.use_blas)


def staged_blocks(n: int, chans: int, flops: int) -> tuple[int, int, int]:
    """(blocks per image, channels per block, slots) of a staged transform's items (an image's block of
    channels, all of its tile rows): enough items for two per thread where the batch alone has too few."""
    t = threads()
    want = 2 * t if t > 1 and flops >= _conv.SPLIT_FLOPS else 1
    per = max(1, min(chans, -(-want // n)))
    cs = -(-chans // per)
    per = -(-chans // cs)
    return per, cs, slot_count(n * per, flops)


def conv_staged(out: View, x: View, u: View, pad: View, vbuf: View, mbuf: View, pads, geo: dict,
                turned: bool = False, tbuf: View | None = None) -> list:
    """The same convolution as three kernels over the whole call's tiles (V and M hold them all): the input
    transform by item, the alpha^2 products (one per item, each over every tile: the widest GEMMs), the
    output transform by item. For few tiles (batch 1), where one item's products would be too narrow.
    The transforms' items are blocks of channels of one image, every tile row (geo's R = th): a channel's
    rows of V and M (a few tiles, one cache line at batch 1) and its output plane belong to one item, so
    two threads never write one line (items by tile rows did: the transforms did not scale); the input
    is copied a channel at a time into the slot's padded scratch (pad: (slots, 1, th*m + 2, Wp))."""
    n, c = x.shape[:2]
    o, oh, ow = out.shape[1:]
    ld = geo["n"] * geo["th"] * geo["twp"]
    parts = _Parts(out, x, u, pad, vbuf, mbuf, pads, geo, ld)
    a, twp, th, m = geo["a"], geo["twp"], geo["th"], geo["m"]
    per_pad = pad.size // pad.shape[0]

    def channels(em, it, blocks: int, cs: int, total: int, body):
        """body(img, ch) for every channel of item `it` (an image's block of cs channels)."""
        img, blk = em(f"udiv i64 {it}, {blocks}"), em(f"urem i64 {it}, {blocks}")
        c0 = em(f"mul i64 {blk}, {cs}")
        c1 = em(f"add i64 {c0}, {cs}")
        c1 = em(f"select i1 {em(f'icmp slt i64 {c1}, {total}')}, i64 {c1}, i64 {total}")
        em.loop(c1, lambda ch: body(img, ch), start=c0)

    def first_tile(em, img, ch):   # element of V's / M's row ch at the image's first tile
        return em(f"add i64 {em(f'mul i64 {ch}, {ld}')}, {em(f'mul i64 {img}, {th * twp}')}")

    def inp(em, P, s, img, ch):
        po = em(f"add i64 {pad.offset}, {em(f'mul i64 {s}, {per_pad}')}")
        xo = em(f"add i64 {em(f'mul i64 {img}, {x.strides[0]}')}, {em(f'mul i64 {ch}, {x.strides[1]}')}")
        parts.copy_rows(em, P, po, em(f"add i64 {x.offset}, {xo}"), str(-parts.pt), th * m + 2, chans=1)
        parts.input_transform(em, P, po, em(f"add i64 {vbuf.offset}, {first_tile(em, img, ch)}"), th, chans=1)

    def outp(em, P, s, img, oc):
        oo = em(f"add i64 {em(f'mul i64 {img}, {o * oh * ow}')}, {em(f'mul i64 {oc}, {oh * ow}')}")
        parts.output_transform(em, P, em(f"add i64 {mbuf.offset}, {first_tile(em, img, oc)}"),
                               em(f"add i64 {out.offset}, {oo}"), "0", th, chans=1)

    def phase(name, body, chans: int, views, flops):
        blocks, cs, slots = staged_blocks(n, chans, geo["flops"])

        def emit(em, P, lo, hi):
            if out.size:
                _slot_loop(em, n * blocks, slots, lo, hi,
                           lambda s, it: channels(em, it, blocks, cs, chans, lambda img, ch: body(em, P, s, img, ch)))
        return _slot_kernel(name, views, emit, slots, flops)

    pslots = slot_count(a * a, geo["flops"])
    small = out.size * a * a // max(1, m * m)
    if turned:   # narrow products turned round: M[xi]^T (tiles x O) = V[xi]^T @ U[xi]^T (transposed_rule; u
        # holds the U[xi]^T in panels: weight_transform's `panel`)
        def emit_t(em, P, lo, hi):
            if out.size:
                _slot_loop(em, a * a, pslots, lo, hi,
                           lambda s, xi: _product_t(em, P, xi, s, u, vbuf, mbuf, tbuf, o, c, ld))
        prod = (_slot_kernel("winograd_products", [u, vbuf, mbuf, tbuf], emit_t, pslots, geo["flops"]),
                [u, vbuf], [mbuf, tbuf])
    else:
        def emit_products(em, P, lo, hi):
            if out.size:
                _slot_loop(em, a * a, pslots, lo, hi,
                           lambda s, xi: parts.product(em, P, xi, str(vbuf.offset), str(mbuf.offset), ld))
        prod = (_slot_kernel("winograd_products", [u, vbuf, mbuf], emit_products, pslots, geo["flops"],
                             blas=parts.use_blas), [u, vbuf], [mbuf])
    return [(phase("winograd_input", inp, c, [x, pad, vbuf], small), [x], [pad, vbuf]), prod,
            (phase("winograd_output", outp, o, [mbuf, out], small), [mbuf], [out])]


#: the staged products of at most this many columns (tiles) are turned round (transposed_rule)
TRANSPOSED_COLS = 32


def transposed_rule(ld: int, o: int) -> bool:
    """Whether the staged form's products M[xi] (O x ld) run as M[xi]^T = V[xi]^T (ld x C) @ U[xi]^T (C x O)
    over U[xi]^T in the micro-kernel's panels (weight_transform's `panel`: the prologue): for few tiles (batch 1's 14x14 and
    7x7 stages, 16 columns) the product as written feeds each broadcast of U to one vector FMA and is bound
    by its loads; turned round, each broadcast of V feeds a tile row of vectors of O. ResNet-18 at batch 1
    (W10 b1) on the Intel Xeon (AVX-512, 2 cores; in-process A/B, 10 interleaved rounds): 17.8 -> 13.1 ms;
    at batch 8 (128+ columns) every staged product turned measured 80.4 against 78.6 ms, hence the bound.
    GRAPHC_LLVM_WINOGRAD_TURN=1 / 0 forces it / the other way; a forced GRAPHC_LLVM_SMALL_GEMM keeps the other
    way."""
    mode = os.environ.get("GRAPHC_LLVM_WINOGRAD_TURN", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    return ld <= TRANSPOSED_COLS and o >= 16 and os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto") == "auto"


def _product_t(em, P, xi, s, upk: View, vbuf: View, mbuf: View, tbuf: View, o: int, c: int, ld: int):
    """M[xi] (O x ld) from the turned product: slot s's scratch (ld x O) = V[xi]^T @ U[xi]^T over upk's
    panels (gemm_tiles, packed), then copied into M's layout."""
    from . import gemm
    dt = vbuf.dtype
    nr = gemm.panel_width(ld, dt)
    psize = gemm.packed_size(c, o, nr)
    ao = em(f"add i64 {vbuf.offset}, {em(f'mul i64 {xi}, {c * ld}')}")
    bo = em(f"add i64 {upk.offset}, {em(f'mul i64 {xi}, {psize}')}")
    to = em(f"add i64 {tbuf.offset}, {em(f'mul i64 {s}, {ld * o}')}")
    gemm.gemm_tiles(em, P, View(tbuf.buf, 0, (ld, o), (o, 1), dt), View(vbuf.buf, 0, (ld, c), (1, ld), dt),
                    View(upk.buf, 0, (c, o), (nr, 1), dt), ao, bo, to, ld, c, o, packed=True, stream=True)
    mo = em(f"add i64 {mbuf.offset}, {em(f'mul i64 {xi}, {o * ld}')}")
    nest(em, [o, ld], [(ld, 1), (1, o)], [mo, to],
         lambda offs, _: store(em, P, mbuf, offs[0], load(em, P, tbuf, offs[1])))


#: fused only while the transformed weights U stay in the cache between one slot's items
U_CACHE_BYTES = 4 << 20


def staged_rule(n: int, c: int, o: int, out_hw, m: int, dtype: str) -> bool:
    """Staged when the transformed weights U (alpha^2 O C, read again by every fused item) outgrow the
    cache (wide channels: each staged product reads its U[xi] once); fused otherwise, its V and M in the
    slot's L2 while the threads share nothing. Measured on ResNet-18's layers (Zen 2): fused 1.8-2x faster
    than staged with two threads at batch 1 for 56x56x64 and 28x28x128 (staged streams every tile's V and
    M through the shared L3 and scales 1.2x), 1.15-1.25x at batch 8; staged 1.45x faster for 14x14x256
    (U 9.4 MB) and 2-4x for 7x7x512 (U 16.8 MB)."""
    es = 4 if dtype == "float32" else 8
    return (m + 2) ** 2 * o * c * es > U_CACHE_BYTES


def plan_winograd(plan, out: View, x: View, w: View, pads, m: int) -> None:
    """Plan the weights' transform (hoisted: parameters only) and the convolution into out (n, O, oh, ow):
    staged or fused by staged_rule (GRAPHC_LLVM_WINOGRAD_MODE=staged|fused forces one)."""
    n, c = x.shape[:2]
    o = w.shape[0]
    oh, ow = out.shape[2:]
    a = m + 2
    staged = {"staged": True, "fused": False}.get(os.environ.get("GRAPHC_LLVM_WINOGRAD_MODE", ""))
    if staged is None:
        staged = staged_rule(n, c, o, (oh, ow), m, x.dtype)
    geo = geometry(n, c, o, (oh, ow), m, x.dtype, staged=staged)
    slots, twp, R = geo["slots"], geo["twp"], geo["R"]
    turned = staged and transposed_rule(n * geo["th"] * twp, o)
    if turned:   # the transform writes each U[xi]^T straight into the micro-kernel's panels (_product_t)
        from . import gemm
        nr = gemm.panel_width(n * geo["th"] * twp, x.dtype)
        u = plan.fresh(None, (a * a * gemm.packed_size(c, o, nr),), x.dtype)
        plan.add(weight_transform(u, w, m, nr), [w], [u])
    else:
        u = plan.fresh(None, (a * a, o, c), x.dtype)
        plan.add(weight_transform(u, w, m), [w], [u])
    Wp = m * (twp + (a - 1) // m)   # m phase planes, each a tile row's columns plus the overlap
    if staged:   # the transforms' items: blocks of channels, every tile row (R = th; conv_staged)
        pad = plan.fresh(None, (staged_blocks(n, c, geo["flops"])[2], 1, R * m + 2, Wp), x.dtype)
        T = n * R * twp
        vbuf = plan.fresh(None, (a * a, c, T), x.dtype)
        mbuf = plan.fresh(None, (a * a, o, T), x.dtype)
        tbuf = plan.fresh(None, (slot_count(a * a, geo["flops"]), T, o), x.dtype) if turned else None
        for kern, reads, writes in conv_staged(out, x, u, pad, vbuf, mbuf, pads, geo, turned, tbuf):
            plan.add(kern, reads, writes)
        return
    pad = plan.fresh(None, (slots, c, R * m + 2, Wp), x.dtype)
    vbuf = plan.fresh(None, (slots, a * a, c, R * twp), x.dtype)
    mbuf = plan.fresh(None, (slots, a * a, o, R * twp), x.dtype)
    plan.add(conv_fused(out, x, u, pad, vbuf, mbuf, pads, geo), [x, u], [out, pad, vbuf, mbuf])
