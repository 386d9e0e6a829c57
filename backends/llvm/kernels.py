"""Kernel emitters: loop nests over strided views (elementwise/fused, reductions, softmax family,
GEMM through CBLAS or a pure-LLVM loop, gather/scatter, copies). Each returns a Kernel whose `emit`
writes the body of an internal function taking one pointer per buffer it touches (noalias: distinct
buffers never overlap) and the [lo, hi) range of its outermost loop (used to split work across threads).
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from graphc import dtypes as _dt
from graphc.ops import reduce as R
from graphc.passes.cse import freeze

from . import lower as _lo
from . import mathlib
from .irtext import STYPE, VTYPE, Emitter, literal
from ..schedule.views import View, broadcast_strides, collapse, contig_strides

#: elementwise kernels at least this large (elements) split their outer loop across threads; below it
#: thread start-up and contention with OpenBLAS's spinning workers (W5's weight updates) cost more
PARALLEL_MIN = 1 << 20
#: ... and so do smaller ones whose elements are costly (exp/tanh/sigmoid/erf: 20-40 instructions each),
#: from PARALLEL_MIN_COSTLY elements, when elements x IR instructions per element reach PARALLEL_WORK
#: (a W2-like body of ~100 instructions splits from 64k elements, ~0.1 ms on one core)
PARALLEL_WORK = 1 << 22
PARALLEL_MIN_COSTLY = 1 << 16
#: 1-D elementwise kernels of at least PAIR_MIN elements each costing at least PAIR_COST IR instructions
#: (transcendental chains) walk blocks of 2 * PAIR_BLOCK elements, elements j and j + PAIR_BLOCK in one
#: iteration: the loop vectoriser then issues two independent vector chains per iteration, which the
#: out-of-order core overlaps (its own interleaving heuristic keeps such register-hungry bodies at one).
#: W2 on a Zen 2 core: 7.2 -> 6.85 ms a thread, for ~50 ms more compile time (the body is emitted twice:
#: hence only for kernels that run long). PAIR_BLOCK is a multiple of every vector width, and the
#: constant distance lets the vectoriser prove the two streams independent
PAIR_COST = 48
PAIR_MIN = 1 << 18
PAIR_BLOCK = 64
#: an elementwise body (both streams of a paired one) is emitted in as-late-as-possible order
#: (`_late_order`): W2 on a Zen 2 core 6.1 -> 5.4 ms a thread (the same instructions, better overlapped)
LATE_ORDER = True


def vector_attrs(bits: int | None = None) -> str:
    """Function attributes that make LLVM vectorise for the host's vector width (tune.isa(), or
    GRAPHC_LLVM_ISA's), or `bits` (the width tuner's choice for an elementwise kernel): its tuning for
    some AVX-512 CPUs (Intel server cores) prefers 256-bit vectors and splits 512-bit ones unless told
    otherwise; forcing avx2 on an AVX-512 host gives 256-bit code. (On a host without AVX-512 a 512
    preference is capped by the registers the target has.)"""
    from . import tune
    bits = bits or tune.vector_bits()
    return f' "prefer-vector-width"="{bits}" "min-legal-vector-width"="{bits}"'


class Kernel:
    def __init__(self, name: str, views, emit: Callable, split: int | None = None, flops: int = 0,
                 outer: int = 0):
        self.name = name
        self.outer = outer    # extent of the outermost loop (the hi passed for a whole run)
        # the buffers in the order the views name them (the kernel function's arguments): two kernels over the
        # same roles share one function whatever the buffers' numbers (a weight packed once for several
        # layers has a lower number than each layer's activations)
        self.bufs = list(dict.fromkeys(v.buf for v in views if v is not None and v.buf is not None))
        self.emit = emit      # emit(em, P: {buf: ptr ssa}, lo, hi)
        self.split = split    # outer extent when the kernel may be split across threads
        self.size = flops
        self.desc = " ".join(f"{v.dtype}{list(v.shape)}" for v in views if v is not None)
        self.fn_attrs = vector_attrs()   # appended to the function's definition (program._kernel_fn)
        self.views = tuple(views)
        #: None, or a hashable value that, with the views (memo_key), determines the text `emit` writes:
        #: the program emits a kernel once for all its steps with equal memo keys (a repeated layer)
        self.key = None


def memo_key(kern: Kernel, bufs: list):
    """A key equal for two kernels exactly when their definitions over `bufs` (program._kernel_fn,
    without bounds checks) are the same text, or None when the kernel has no key."""
    if kern.key is None:
        return None
    from . import tune
    pos = {b: i for i, b in enumerate(bufs)}
    return (kern.name, kern.key, kern.fn_attrs, tune.isa(), tuple(None if v is None else (
        pos.get(v.buf), v.offset, v.shape, v.strides, v.dtype, freeze(v.literal)) for v in kern.views))


#: (compute key, input dtypes) -> IR instructions of one element (body_cost), bounded
_COSTS: dict = {}


def compute_key(compute, dtypes) -> tuple | None:
    key = getattr(compute, "key", None)
    return None if key is None else (key, tuple(dtypes))


# ---- element access ---------------------------------------------------------------------------------

#: bytes of the per-function scratch an out-of-bounds access is redirected to (the widest vector access)
SCRATCH_BYTES = 256


def ptr_at(em: Emitter, P, v: View, off, last: int = 0) -> str:
    """Pointer to element `off` of v's buffer; an access to elements off .. off+last (a vector load or
    store: last = lanes - 1) is checked as a whole under sanitize="bounds"."""
    if em.bounds is None:
        return em(f"getelementptr inbounds {STYPE[v.dtype]}, ptr {P[v.buf]}, i64 {off}")
    p = em(f"getelementptr {STYPE[v.dtype]}, ptr {P[v.buf]}, i64 {off}")
    assert (last + 1) * np.dtype(v.dtype).itemsize <= SCRATCH_BYTES
    bad = _out_of_bounds(em, v, off, last)
    if em.scratch is None:
        em.scratch = em.alloca(f"[{SCRATCH_BYTES // 8} x i64]")
    return em(f"select i1 {bad}, ptr {em.scratch}, ptr {p}")   # the access lands in scratch, never outside


def _out_of_bounds(em: Emitter, v: View, first, last: int) -> str:
    """sanitize="bounds": i1 true (and the status word set to this kernel's code) when elements
    first .. first+last of v's buffer are not all inside it. One unsigned compare covers negatives."""
    n = em.bounds[v.buf] // np.dtype(v.dtype).itemsize - last
    bad = em(f"icmp uge i64 {first}, {n}") if n > 0 else "true"
    em.if_(bad, lambda: em.raw(f"store i64 {em.code}, ptr {em.status}"))
    return bad


def guarded(em: Emitter, spans, body) -> None:
    """body() (a BLAS call or memset), run only if every (view, first element, last offset) span lies
    inside its buffer; without sanitize="bounds" just body()."""
    if em.bounds is None:
        body()
        return
    ok = "true"
    for v, first, last in spans:
        ok = em(f"and i1 {ok}, {em(f'xor i1 {_out_of_bounds(em, v, first, last)}, true')}")
    em.if_(ok, body)


def load(em: Emitter, P, v: View, off) -> str:
    """The element as a register value (VTYPE): float16/bfloat16 are widened to float here, inside the
    kernel's loop (F16C vcvtph2ps; bfloat16 by a shift), never by a separate pass over memory."""
    if v.literal is not None:
        return literal(v.literal, v.dtype)
    x = em(f"load {STYPE[v.dtype]}, ptr {ptr_at(em, P, v, off)}")
    if v.dtype == "float16":
        return em(f"fpext half {x} to float")
    if v.dtype == "bfloat16":
        return _lo.bf16_value(em, x)
    return em(f"icmp ne i8 {x}, 0") if v.dtype == "bool" else x


def store(em: Emitter, P, v: View, off, val: str) -> None:
    """Store a register value; float16/bfloat16 round to nearest even here (vcvtps2ph; bfloat16 bits)."""
    if v.dtype == "bool":
        val = em(f"zext i1 {val} to i8")
    elif v.dtype == "float16":
        val = em(f"fptrunc float {val} to half")
    elif v.dtype == "bfloat16":
        val = _lo.bf16_bits(em, val)
    em.raw(f"store {STYPE[v.dtype]} {val}, ptr {ptr_at(em, P, v, off)}")


def nest(em: Emitter, shape, strides_list, bases, body, lo=None, hi=None) -> None:
    """Loops over `shape`; body(offsets per operand, loop indices). lo/hi bound the outermost loop."""
    def rec(d, offs, idxs):
        if d == len(shape):
            body(offs, idxs)
            return

        def inner(i):
            new = []
            for o, st in zip(offs, strides_list):
                s = st[d]
                if s == 0:
                    new.append(o)
                elif s == 1:
                    new.append(em(f"add i64 {o}, {i}"))
                else:
                    new.append(em(f"add i64 {o}, {em(f'mul i64 {i}, {s}')}"))
            rec(d + 1, new, idxs + [i])
        if d == 0 and lo is not None:
            em.loop(hi, inner, start=lo)
        else:
            em.loop(shape[d], inner)
    rec(0, [str(b) for b in bases], [])


def fill(em: Emitter, P, v: View, value) -> None:
    """out[...] = value for a contiguous view (memset for zero)."""
    if v.size == 0:
        return
    if value == 0:
        nbytes = v.size * np.dtype(v.dtype).itemsize
        guarded(em, [(v, v.offset, v.size - 1)], lambda: em.raw(
            f"call void @llvm.memset.p0.i64(ptr {ptr_at(em, P, v, v.offset)}, i8 0, i64 {nbytes}, i1 false)"))
        return
    nest(em, [v.size], [(1,)], [v.offset], lambda offs, _: store(em, P, v, offs[0], literal(value, v.dtype)))


# ---- elementwise ------------------------------------------------------------------------------------

def elementwise(outs: list[View], ins: list[View], compute, hot: bool = False) -> Kernel:
    """outs[k][i] = compute(em, [(value, dtype) per input])[k] for every index i of outs[0].shape.
    hot: the kernel runs many times per call (a scan body's): a costly 2-D one pairs its rows (_paired_rows)
    whatever its size."""
    shape = outs[0].shape
    strides = [o.strides for o in outs] + [broadcast_strides(v, shape) for v in ins]
    dims, sts = collapse(shape, strides)
    bases = [v.offset for v in outs + ins]
    size = int(np.prod(shape, dtype=np.int64))

    def emit(em, P, lo, hi):
        if size == 0:
            return

        def body(offs, _):
            first = len(em.lines)
            vals = [(load(em, P, v, o), v.dtype) for v, o in zip(ins, offs[len(outs):])]
            for v, o, r in zip(outs, offs, compute(em, vals)):
                store(em, P, v, o, r)
            if reorder and not paired and not paired_rows:
                _late_order(em, first)
        if paired:
            _paired_loop(em, [s[0] for s in sts], bases, body, lo, hi, reorder)
        elif paired_rows:
            _paired_rows(em, dims, sts, bases, body, reorder)
        else:
            nest(em, dims, sts, bases, body, lo if dims else None, hi)
    # (not when an output is also an input's buffer: its loads and stores then keep their order)
    reorder = LATE_ORDER and not ({v.buf for v in outs} & {v.buf for v in ins if v.literal is None})
    cost = body_cost(compute, ins) if size >= PARALLEL_MIN_COSTLY else 0
    paired = len(dims) == 1 and size >= PAIR_MIN and cost >= PAIR_COST
    parallel = size >= PARALLEL_MIN or (size >= PARALLEL_MIN_COSTLY and size * cost >= PARALLEL_WORK)
    split = dims[0] if dims and parallel and dims[0] >= 2 else None
    if hot and not cost and size:
        cost = body_cost(compute, ins)
    paired_rows = hot and split is None and len(dims) == 2 and dims[0] >= 2 and cost >= PAIR_COST
    kern = Kernel("elementwise", outs + ins, emit, split, size, dims[0] if dims else 0)
    ck = getattr(compute, "key", None)
    if ck is not None:   # the text depends on the body, the views and these choices
        kern.key = ("elementwise", ck, len(outs), reorder, paired, paired_rows)
    return kern


def _paired_loop(em: Emitter, strides, bases, body, lo, hi, reorder: bool = False) -> None:
    """A 1-D loop over [lo, hi) in blocks of 2 * PAIR_BLOCK elements, body(offsets, [i]) for elements
    i and i + PAIR_BLOCK in one iteration of the inner loop (the two in one `_late_order` when reorder),
    then the rest one by one."""
    b2 = 2 * PAIR_BLOCK

    def offsets(i):
        return [str(b) if s == 0 else em(f"add i64 {b}, {i if s == 1 else em(f'mul i64 {i}, {s}')}")
                for b, s in zip(bases, strides)]

    blocks = em(f"sdiv i64 {em(f'sub i64 {hi}, {lo}')}, {b2}")

    def block(k):
        start = em(f"add i64 {lo}, {em(f'mul i64 {k}, {b2}')}")

        def inner(j):
            first = len(em.lines)
            i = em(f"add i64 {start}, {j}")
            body(offsets(i), [i])
            i2 = em(f"add i64 {i}, {PAIR_BLOCK}")
            body(offsets(i2), [i2])
            if reorder:
                _late_order(em, first)
        em.loop(PAIR_BLOCK, inner)
    em.loop(blocks, block)
    rest = em(f"add i64 {lo}, {em(f'mul i64 {blocks}, {b2}')}")
    em.loop(hi, lambda i: body(offsets(i), [i]), start=rest)


def _paired_rows(em: Emitter, dims, sts, bases, body, reorder: bool) -> None:
    """A 2-D nest (rows, columns) whose inner loop takes rows r and r + rows // 2 at once (the two bodies in
    one `_late_order` when reorder; an odd last row on its own): two independent transcendental chains per
    iteration for the out-of-order core to overlap, as _paired_loop does for long 1-D kernels. For a scan
    step's gates (LSTM: 3 sigmoids and 2 tanh an element, 8 rows x 128 a part), whose one chain per
    iteration leaves the core waiting on its latencies. The whole range only (no split: lo/hi unused)."""
    half = dims[0] // 2

    def pair(offs, idx):
        first = len(em.lines)
        body(offs, idx)
        body([o if st[0] == 0 else em(f"add i64 {o}, {half * st[0]}") for o, st in zip(offs, sts)], idx)
        if reorder:
            _late_order(em, first)
    nest(em, [half, dims[1]], sts, bases, pair)
    if dims[0] % 2:
        last = [str(b) if st[0] == 0 else em(f"add i64 {b}, {(dims[0] - 1) * st[0]}") for b, st in zip(bases, sts)]
        nest(em, [dims[1]], [st[1:] for st in sts], last, lambda offs, idx: body(offs, idx))


_SSA = re.compile(r"%[\w.]+")


def _late_order(em: Emitter, first: int) -> None:
    """Reorder the straight-line IR em.lines[first:] (one element's body, or a paired loop's two) as late
    as possible: by the length of the longest dependency path from each instruction to the end, longest
    first, ties in emission order. Independent chains (the three exps of a W2-like body, the paired loop's
    two elements) then interleave from their ends, each value made shortly before its first use, and
    LLVM's scheduler, which keeps much of the IR's order, gives a loop the core overlaps better (W2 on a
    Zen 2 core: the same instruction count, 12% less time). Loads come before every store (their paths
    are longer), stores keep their order: the kernel's buffers are distinct (the caller does not reorder
    when an output is also an input). Nothing is moved when the span has a label or a branch
    (sanitize="bounds" checks), a call without a result, or touches a stack slot (an alloca)."""
    lines = em.lines[first:]
    if any(not ln.startswith("  ") or ln.lstrip().startswith(("br ", "call ")) for ln in lines):
        return
    slots = {a.split(" = ", 1)[0].strip() for a in em.allocas}
    entries = []    # [height, index, line, defined name or None, operand names]
    for k, ln in enumerate(lines):
        text = ln.strip()
        name, rhs = text.split(" = ", 1) if text.startswith("%") and " = " in text else (None, text)
        ops = _SSA.findall(rhs)
        if slots.intersection(ops):
            return
        entries.append([0, k, ln, name, ops])
    height: dict[str, int] = {}
    for e in reversed(entries):
        h = height.get(e[3], 0) if e[3] else 0
        e[0] = -h
        for op in e[4]:
            if height.get(op, -1) < h + 1:
                height[op] = h + 1
    entries.sort(key=lambda e: (e[0], e[1]))
    em.lines[first:] = [e[2] for e in entries]


def body_cost(compute, ins: list[View]) -> int:
    """IR instructions compute() emits for one element (a dry run into a scratch emitter): the cost
    the thread split weighs against its start-up."""
    key = compute_key(compute, [v.dtype for v in ins])
    if key in _COSTS:
        return _COSTS[key]
    em = Emitter()
    try:
        compute(em, [(em.fresh(), v.dtype) for v in ins])
    except Exception:   # not lowerable: the real emission reports it
        return 1
    if key is not None:
        if len(_COSTS) > 4096:
            _COSTS.clear()
        _COSTS[key] = len(em.lines)
    return len(em.lines)


def op_compute(op, attrs: dict, out_dtype: str):
    def compute(em, vals):
        return [_lo.lower(em, op, attrs, vals, out_dtype)]
    try:
        compute.key = ("op", op, freeze(attrs, strict=True), out_dtype)
    except TypeError:
        compute.key = None
    return compute


#: edge of the square blocks a transposing copy moves at a time (both sides' lines stay in L1)
TILE = 16


def copy(out: View, src: View) -> Kernel:
    """out = src (with dtype conversion): materialises a strided or broadcast view."""
    conv = lambda em, vals: [_lo.convert(em, vals[0][0], vals[0][1], out.dtype)]   # noqa: E731
    dims, (ost, sst) = collapse(out.shape, [out.strides, broadcast_strides(src, out.shape)])
    if len(dims) == 2 and ost[1] == 1 and sst[0] == 1 and abs(sst[1]) > 1 and min(dims) >= TILE and \
            src.literal is None:
        return _transpose_copy(out, src, dims, ost, sst, conv)
    return elementwise([out], [src], conv)


def _transpose_copy(out: View, src: View, dims, ost, sst, conv) -> Kernel:
    """A 2-D copy whose source walks the other axis contiguously (a materialised transpose), by
    TILE x TILE blocks: a column-order read of the whole source would touch a new cache line per element."""
    (r, c), t = dims, TILE
    br, bc = r // t * t, c // t * t

    def block(em, P, shape, strides_o, strides_s, base_o, base_s):
        def body(offs, _):
            store(em, P, out, offs[0], conv(em, [(load(em, P, src, offs[1]), src.dtype)])[0])
        nest(em, shape, [strides_o, strides_s], [base_o, base_s], body)

    def emit(em, P, lo, hi):
        o0, s0 = out.offset, src.offset
        block(em, P, (r // t, c // t, t, t), (t * ost[0], t, ost[0], 1), (t, t * sst[1], 1, sst[1]), o0, s0)
        if c > bc:   # right strip (all rows, the last columns)
            block(em, P, (r, c - bc), (ost[0], 1), (1, sst[1]), o0 + bc, s0 + bc * sst[1])
        if r > br:   # bottom strip (the last rows, the tiled columns)
            block(em, P, (r - br, bc), (ost[0], 1), (1, sst[1]), o0 + br * ost[0], s0 + br)
    return Kernel("copy", [out, src], emit, None, r * c)


# ---- reductions --------------------------------------------------------------------------------------

def _split_axes(x: View, axes):
    kept = [a for a in range(len(x.shape)) if a not in axes]
    return kept, [x.shape[a] for a in kept], [x.shape[a] for a in axes]


def _lowest(t):
    return "0xFFF0000000000000" if _dt.is_float(t) else literal(np.iinfo(t).min, t)


def _highest(t):
    return "0x7FF0000000000000" if _dt.is_float(t) else literal(np.iinfo(t).max, t)


#: monoid reductions: op -> (identity(dtype) as an IR literal, float combine, integer combine)
COMBINE = {
    R.Sum: (lambda t: literal(0, t), _lo._fbin("fadd reassoc"), _lo._ibin("add")),
    R.Prod: (lambda t: literal(1, t), _lo._fbin("fmul reassoc"), _lo._ibin("mul")),
    R.Max: (_lowest, _lo._fmaxmin("ogt"), _lo._imaxmin("sgt")),
    R.Min: (_highest, _lo._fmaxmin("olt"), _lo._imaxmin("slt")),
}


def reduce(op, out: View, x: View, axes) -> Kernel:
    """out = op(x over axes) for a monoid reduction op (out contiguous; keepdims does not change its layout)."""
    t = out.dtype
    kept, kshape, rshape = _split_axes(x, axes)
    identity, fcomb, icomb = COMBINE[op]
    comb = fcomb if _dt.is_float(t) else icomb
    init = identity(t)
    kst = [x.strides[a] for a in kept]
    rst = [x.strides[a] for a in axes]
    ost = contig_strides(kshape)
    # (not for float16/bfloat16: their sums accumulate in a float32 register, not in the stored output)
    outer_layout = axes and kept and max(axes) < min(kept) and not _dt.is_half(t)
    # the reduced dims merged where x walks them contiguously (a bias gradient's (N, H, W) of an NCHW
    # tensor: N runs of H*W): the inner loop one long unit-stride run, which LLVM vectorises (the combine
    # is reassociable) instead of H loops of W elements
    rdims, (rst_c,) = collapse(rshape, [rst]) if rshape else ([], [()])

    def emit(em, P, lo, hi):
        if out.size == 0:
            return
        if outer_layout and x.size:   # column reduction: accumulate rows into out (vectorises over out)
            fill_val = init
            nest(em, kshape, [ost], [out.offset], lambda o, _: store(em, P, out, o[0], fill_val))
            full = [x.shape[a] for a in axes] + kshape
            fst = [rst + kst, [0] * len(axes) + list(ost)]

            def body(offs, _):
                v = _lo.convert(em, load(em, P, x, offs[0]), x.dtype, t)
                acc = load(em, P, out, offs[1])
                store(em, P, out, offs[1], comb(em, t, acc, v))
            nest(em, full, fst, [x.offset, out.offset], body)
            return

        def per_out(offs, _):
            acc = em.alloca(VTYPE[t])
            em.raw(f"store {VTYPE[t]} {init}, ptr {acc}")

            def inner(ioffs, __):
                v = _lo.convert(em, load(em, P, x, ioffs[0]), x.dtype, t)
                a = em(f"load {VTYPE[t]}, ptr {acc}")
                em.raw(f"store {VTYPE[t]} {comb(em, t, a, v)}, ptr {acc}")
            nest(em, rdims, [rst_c], [offs[0]], inner)
            store(em, P, out, offs[1], em(f"load {VTYPE[t]}, ptr {acc}"))
        nest(em, kshape, [kst, ost], [x.offset, out.offset], per_out)
    return Kernel(op.name, [out, x], emit, None, x.size)


#: argmax / argmin: the predicates (float, signed int, bool) for "v replaces the best so far"
ARG_BETTER = {R.ArgMax: ("ogt", "sgt", "ugt"), R.ArgMin: ("olt", "slt", "ult")}


def arg_reduce(op, out: View, x: View, axis) -> Kernel:
    """argmax/argmin: first index of the extreme value along `axis` (None: flat C order); NaN wins."""
    axes = tuple(range(len(x.shape))) if axis is None else (axis,)
    kept, kshape, rshape = _split_axes(x, axes)
    kst, rst, ost = [x.strides[a] for a in kept], [x.strides[a] for a in axes], contig_strides(kshape)
    t, ty = x.dtype, VTYPE[x.dtype]
    better = ARG_BETTER[op]
    ipred = better[2] if _dt.is_unsigned(t) else better[1]

    def emit(em, P, lo, hi):
        def per_out(offs, _):
            best, bi, cnt = em.alloca(ty), em.alloca("i64"), em.alloca("i64")
            em.raw(f"store {ty} {load(em, P, x, offs[0])}, ptr {best}")
            em.raw(f"store i64 0, ptr {bi}")
            em.raw(f"store i64 0, ptr {cnt}")

            def inner(ioffs, __):
                v = load(em, P, x, ioffs[0])
                b = em(f"load {ty}, ptr {best}")
                k = em(f"load i64, ptr {cnt}")
                if _dt.is_float(t):
                    gt = em(f"fcmp {better[0]} {ty} {v}, {b}")
                    nan = em(f"and i1 {em(f'fcmp uno {ty} {v}, {v}')}, {em(f'fcmp ord {ty} {b}, {b}')}")
                    take = em(f"or i1 {gt}, {nan}")
                elif t == "bool":
                    take = em(f"icmp {better[2]} i1 {v}, {b}")
                else:
                    take = em(f"icmp {ipred} {ty} {v}, {b}")
                em.raw(f"store {ty} {em(f'select i1 {take}, {ty} {v}, {ty} {b}')}, ptr {best}")
                old = em(f"load i64, ptr {bi}")
                em.raw(f"store i64 {em(f'select i1 {take}, i64 {k}, i64 {old}')}, ptr {bi}")
                em.raw(f"store i64 {em(f'add i64 {k}, 1')}, ptr {cnt}")
            nest(em, rshape, [rst], [offs[0]], inner)
            store(em, P, out, offs[1], em(f"load i64, ptr {bi}"))
        if out.size and x.size:
            nest(em, kshape, [kst, ost], [x.offset, out.offset], per_out)
    return Kernel(op.name, [out, x], emit)


def _exp(em, t, v):
    return _lo.exp(em, _dt.compute_dtype(t), v)


def _log(em, t, v):
    return _lo.log(em, _dt.compute_dtype(t), v)


def softmax_like(op, out: View, x: View, axes) -> Kernel:
    """softmax / log_softmax (one axis, out shaped like x) and logsumexp (axes; out contiguous)."""
    t, ty = x.dtype, VTYPE[x.dtype]
    kept, kshape, rshape = _split_axes(x, axes)
    kst, rst = [x.strides[a] for a in kept], [x.strides[a] for a in axes]
    full = contig_strides(x.shape)
    is_lse, soft = op is R.LogSumExp, op is R.Softmax    # else log_softmax
    if is_lse:
        ost, orst = contig_strides(kshape), [0] * len(axes)
    else:
        ost, orst = [full[a] for a in kept], [full[a] for a in axes]
    mx = _lo._fmaxmin("ogt")

    def per_out(em, P, offs):
        m, s = em.alloca(ty), em.alloca(ty)
        em.raw(f"store {ty} 0xFFF0000000000000, ptr {m}")
        em.raw(f"store {ty} {literal(0, t)}, ptr {s}")

        def pmax(o, _):
            em.raw(f"store {ty} {mx(em, t, em(f'load {ty}, ptr {m}'), load(em, P, x, o[0]))}, ptr {m}")
        nest(em, rshape, [rst], [offs[0]], pmax)
        mv = em(f"load {ty}, ptr {m}")
        if is_lse:   # an all -inf (or +inf) slice: subtract 0 instead
            fin = em(f"fcmp one {ty} {em(f'call {ty} @llvm.fabs.{sfx(t)}({ty} {mv})')}, 0x7FF0000000000000")
            mv = em(f"select i1 {fin}, {ty} {mv}, {ty} {literal(0, t)}")

        def psum(o, _):
            e = _exp(em, t, em(f"fsub {ty} {load(em, P, x, o[0])}, {mv}"))
            if soft:
                store(em, P, out, o[1], e)
            acc = em(f"load {ty}, ptr {s}")
            em.raw(f"store {ty} {em(f'fadd reassoc {ty} {acc}, {e}')}, ptr {s}")
        nest(em, rshape, [rst, orst], [offs[0], offs[1]], psum)
        sv = em(f"load {ty}, ptr {s}")
        if is_lse:
            store(em, P, out, offs[1], em(f"fadd {ty} {_log(em, t, sv)}, {mv}"))
            return
        if soft:
            inv = em(f"fdiv {ty} {literal(1.0, t)}, {sv}")
            nest(em, rshape, [orst], [offs[1]],
                 lambda o, _: store(em, P, out, o[0], em(f"fmul {ty} {load(em, P, out, o[0])}, {inv}")))
            return
        lse = em(f"fadd {ty} {_log(em, t, sv)}, {mv}")
        nest(em, rshape, [rst, orst], [offs[0], offs[1]],
             lambda o, _: store(em, P, out, o[1], em(f"fsub {ty} {load(em, P, x, o[0])}, {lse}")))

    n = int(np.prod(rshape, dtype=np.int64))
    rows = _VectorRows(op, out, x, n) if len(axes) == 1 and t == "float32" and n >= 2 and \
        x.literal is None and rst[0] == 1 and (is_lse or orst[0] == 1) else None
    rdims, (rkst, rost) = collapse(kshape, [kst, ost]) if rows else (kshape, (kst, ost))
    split = rdims[0] if rows and rdims and rdims[0] >= 2 and x.size >= PARALLEL_MIN_COSTLY else None

    def emit(em, P, lo, hi):
        if out.size:
            nest(em, rdims, [rkst, rost], [x.offset, out.offset],
                 (lambda offs, _: rows.row(em, P, offs)) if rows else (lambda offs, _: per_out(em, P, offs)),
                 lo if split else None, hi)
    return Kernel(op.name, [out, x], emit, split, x.size, rdims[0] if rdims else 0)


def lanes() -> int:
    """float32 lanes of the host's vectors (tune.isa(), or GRAPHC_LLVM_ISA's): 16 for AVX-512, 8 for AVX2."""
    from . import tune
    return max(4, tune.vector_bits() // 32)


def fold_lanes(em: Emitter, v: str, w: int, combine) -> str:
    """The w lanes of float vector v folded into one float: halves combined pairwise ((lanes 0..k/2) with
    (k/2..k)) by combine(lo, hi, T) (T: mathlib.Ty of the halves, None for the last <1 x float> pair)."""
    k = w
    while k > 1:
        h = k // 2
        lo_, hi_ = (em(f"shufflevector <{k} x float> {v}, <{k} x float> poison, <{h} x i32> "
                       f"<{', '.join(f'i32 {j}' for j in range(s, s + h))}>") for s in (0, h))
        v, k = combine(lo_, hi_, mathlib.Ty(h) if h > 1 else None), h
    return em(f"extractelement <1 x float> {v}, i64 0")


class _VectorRows:
    """softmax / log_softmax / logsumexp of one contiguous float32 row (the reduced axis has stride 1),
    written as explicit <W x float> loops (W: the host's lanes) plus a scalar loop for the last n % W:
    a max pass, an exp-and-sum pass (softmax stores the exponentials), and a scale pass (softmax:
    times 1/sum; log_softmax: x - (max + log sum)); the row stays in cache between the passes. The
    exponential is mathlib's on vectors: the same steps as the elementwise rows, lane by lane."""

    def __init__(self, op, out: View, x: View, n: int):
        self.op, self.out, self.x, self.n = op, out, x, n
        self.w = lanes()
        self.nv = n // self.w

    def _loops(self, em, body):
        """body(off (i64 element offset within the row), T) over the vector part, then the tail."""
        w = self.w
        if self.nv:
            em.loop(self.nv, lambda i: body(em(f"mul i64 {i}, {w}"), mathlib.Ty(w)))
        if self.n % w:
            em.loop(self.n, lambda i: body(i, mathlib.S), start=str(self.nv * w))

    def _load(self, em, P, v, base, off, T):
        o = em(f"add i64 {base}, {off}")
        return em(f"load {T.f}, ptr {ptr_at(em, P, v, o, T.lanes - 1)}, align 4")

    def _store(self, em, P, v, base, off, val, T):
        o = em(f"add i64 {base}, {off}")
        em.raw(f"store {T.f} {val}, ptr {ptr_at(em, P, v, o, T.lanes - 1)}, align 4")

    def _accumulate(self, em, init: str, step, combine) -> str:
        """A scalar: the vector part folded lane-wise by step(acc, off, T) from init, its lanes combined
        pairwise, then the tail folded in."""
        w = self.w
        acc = em.alloca(f"<{w} x float>")
        em.raw(f"store <{w} x float> splat (float {init}), ptr {acc}")
        if self.nv:
            def vbody(i):
                T = mathlib.Ty(w)
                a = em(f"load {T.f}, ptr {acc}")
                em.raw(f"store {T.f} {step(a, em(f'mul i64 {i}, {w}'), T)}, ptr {acc}")
            em.loop(self.nv, vbody)
        folded = fold_lanes(em, em(f"load <{w} x float>, ptr {acc}"), w, combine)
        s = em.alloca("float")
        em.raw(f"store float {folded}, ptr {s}")
        if self.n % w:
            def sbody(i):
                a = em(f"load float, ptr {s}")
                em.raw(f"store float {step(a, i, mathlib.S)}, ptr {s}")
            em.loop(self.n, sbody, start=str(self.nv * w))
        return em(f"load float, ptr {s}")

    def row(self, em, P, offs):
        x, out, xo, oo = self.x, self.out, offs[0], offs[1]
        is_lse, soft = self.op is R.LogSumExp, self.op is R.Softmax

        def splat(v, T):
            if T.lanes == 1:
                return v
            one = em(f"insertelement <{T.lanes} x float> poison, float {v}, i64 0")
            return em(f"shufflevector {T.f} {one}, {T.f} poison, <{T.lanes} x i32> zeroinitializer")

        def vmax(a, b, T):
            ty, bt = (T.f, T.b) if T is not None else ("<1 x float>", "<1 x i1>")
            return em(f"select {bt} {em(f'fcmp ogt {ty} {a}, {b}')}, {ty} {a}, {ty} {b}")

        def vadd(a, b, T):
            return em(f"fadd reassoc {T.f if T is not None else '<1 x float>'} {a}, {b}")

        # pass 1: the row's max. A NaN is skipped here but reaches every output through the sum below
        # (x - max is NaN there), as NumPy's NaN max would
        def pmax(a, off, T):
            v = self._load(em, P, x, xo, off, T)
            return em(f"select {T.b} {em(f'fcmp ogt {T.f} {v}, {a}')}, {T.f} {v}, {T.f} {a}")
        m = self._accumulate(em, "0xFFF0000000000000", pmax, vmax)
        if is_lse:   # an all -inf (or +inf) row: subtract 0 instead
            fin = em(f"fcmp one float {em(f'call float @llvm.fabs.f32(float {m})')}, 0x7FF0000000000000")
            m = em(f"select i1 {fin}, float {m}, float 0.0")
        ms = {1: m, self.w: splat(m, mathlib.Ty(self.w))}

        # pass 2: sum of exp(x - max); softmax keeps the exponentials in out
        def psum(a, off, T):
            d = em(f"fsub {T.f} {self._load(em, P, x, xo, off, T)}, {ms[T.lanes]}")
            e = mathlib.exp_f32(em, d, hi=89.0 if is_lse else None, t=T)
            if soft:
                self._store(em, P, out, oo, off, e, T)
            return em(f"fadd reassoc {T.f} {a}, {e}")
        total = self._accumulate(em, "0.0", psum, vadd)
        if is_lse:
            store(em, P, out, oo, em(f"fadd float {mathlib.log_f32(em, total)}, {m}"))
            return
        # pass 3: the scale
        if soft:
            k = em(f"fdiv float 1.0, {total}")
        else:
            k = em(f"fadd float {mathlib.log_f32(em, total)}, {m}")
        ks = {1: k, self.w: splat(k, mathlib.Ty(self.w))}

        def pscale(off, T):
            if soft:
                r = em(f"fmul {T.f} {self._load(em, P, out, oo, off, T)}, {ks[T.lanes]}")
            else:
                r = em(f"fsub {T.f} {self._load(em, P, x, xo, off, T)}, {ks[T.lanes]}")
            self._store(em, P, out, oo, off, r, T)
        self._loops(em, pscale)


def sfx(t):
    return "f64" if t == "float64" else "f32"
