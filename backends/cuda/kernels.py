"""CUDA C kernel templates: pointwise (fused elementwise groups), reductions, the softmax family,
tiled GEMM, and index-mapping kernels (copy through a view, concatenate, take, scatter).

Each function returns the kernel's source text. `element(coords, indent)` callbacks return
(lines, value) computing one input element at the given loop coordinates, so a reduction can load
through a view or run a fused elementwise prologue without knowing which."""
from __future__ import annotations

from dataclasses import dataclass

from graphc import dtypes as _dt
from .cexpr import View, cmul, contiguous_strides, coords_code, cprod
from .prelude import C_TYPES, VALUE_TYPES, load, store

THREADS = 256
TILE = 16


def signature(name: str, ins: list, outs: list, threads: int) -> str:
    """`extern "C"` so the driver (and the emulation's loader) finds the kernel by name. One parameter
    per buffer: a name listed twice (x @ x reads one buffer as both operands) is declared once."""
    seen = set()
    ins = [p for p in ins if not (p[0] in seen or seen.add(p[0]))]
    ps = [f"const {C_TYPES[dt]}* __restrict__ {n}" for n, dt in ins]
    ps += [f"{C_TYPES[dt]}* __restrict__ {n}" for n, dt in outs]
    ps.append("GcDims gd")
    return f'extern "C" __global__ void __launch_bounds__({threads}) {name}({", ".join(ps)})'


def grid_stride(n, indent="  ") -> str:
    return (f"{indent}const long long n = {n};\n"
            f"{indent}for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;\n"
            f"{indent}     i += (long long)gridDim.x * blockDim.x) {{")


def pointwise(name, comment, loop_c, ins, outs, element, vec=(), out_index=None) -> str:
    """out_k[i] = f_k(inputs at loop coordinate i) over the loop shape (grid-stride loop); values are
    register values (prelude.VALUE_TYPES), stored with prelude.store; with
    `out_index` (one `coords -> index` per output) out_k is written at that index instead of i.
    `element(coords, linear, indent, lane=None) -> (lines, [value per output])`. With `vec` (the
    inputs read linearly; every buffer float32, the others broadcast scalars), a float4 loop does
    16-byte loads/stores when those pointers are 16-byte aligned (always true for device
    allocations) and a scalar loop finishes the tail."""
    coords = [f"c{k}" for k in range(len(loop_c))]
    lines = [f"// {comment}", signature(name, ins, outs, THREADS) + " {"]
    start = "blockIdx.x * (long long)blockDim.x + threadIdx.x"
    if vec:
        ptrs = " | ".join(f"(unsigned long long){n}" for n, _ in ins + outs if n in vec or (n, _) in outs)
        lines += [f"  const long long n = {cprod(loop_c)};",
                  f"  const long long n4 = (({ptrs}) % 16 == 0) ? n / 4 : 0;",
                  f"  for (long long i4 = {start}; i4 < n4; i4 += (long long)gridDim.x * blockDim.x) {{"]
        lines += [f"    const float4 {n}_4 = reinterpret_cast<const float4*>({n})[i4];" for n, _ in ins if n in vec]
        lines += [f"    float4 {n}_4;" for n, _ in outs]
        for lane in "xyzw":
            body, vals = element(coords, "i", "      ", lane)
            lines += ["    {"] + body + [f"      {n}_4.{lane} = {v};" for (n, _), v in zip(outs, vals)] + ["    }"]
        lines += [f"    reinterpret_cast<float4*>({n})[i4] = {n}_4;" for n, _ in outs]
        lines += ["  }", f"  for (long long i = 4 * n4 + {start}; i < n; i += (long long)gridDim.x * blockDim.x) {{"]
    else:
        lines.append(grid_stride(cprod(loop_c)))
    body, vals = element(coords, "i", "    ")
    where = [f(coords) for f in out_index] if out_index else ["i"] * len(outs)
    if any(c in "\n".join(body + vals + where) for c in coords):
        lines += coords_code("i", loop_c, coords, "    ")
    lines += body
    lines += [f"    {n}[{w}] = {store(v, dt)};" for (n, dt), v, w in zip(outs, vals, where)]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Monoid:
    """A reduction by an associative combine functor (prelude: GcSum, ...) from an identity
    (`float_identity` for floating accumulators, `int_identity` for integers; `{t}` = the C type)."""
    combine: str
    float_identity: str
    int_identity: str


@dataclass(frozen=True)
class ArgReduce:
    """argmax (is_max) / argmin: the first index of the extreme value along the flattened axes."""
    is_max: bool


class LogSumExp:
    """log(sum(exp(x - m))) + m with m the maximum (two passes over the reduced elements)."""


LOG_SUM_EXP = LogSumExp()


def _row_loops(kept_c, red_c, indent="  "):
    """Block per output (grid-stride over outputs), threads stride over the reduced elements."""
    head = [f"{indent}const long long n_out = {cprod(kept_c)}, n_red = {cprod(red_c)};",
            f"{indent}for (long long o = blockIdx.x; o < n_out; o += gridDim.x) {{"]
    return head


def _split(kept_axes, red_axes, shape_c, indent):
    """Coordinates c0..c{r-1} of the input from output index `o` and reduced index `j`."""
    names = {a: f"c{a}" for a in range(len(shape_c))}
    kept = coords_code("o", [shape_c[a] for a in kept_axes], [names[a] for a in kept_axes], indent)
    red = coords_code("j", [shape_c[a] for a in red_axes], [names[a] for a in red_axes], indent + "  ")
    return [names[a] for a in range(len(shape_c))], kept, red


def reduce_kernel(name, comment, reducer, shape_c, axes, acc_dt, ins, out, element, threads) -> str:
    """out[o] = the reduction over the reduced axes (reducer: a Monoid, ArgReduce or LOG_SUM_EXP)."""
    kept = [a for a in range(len(shape_c)) if a not in axes]
    coords, kept_lines, red_lines = _split(kept, list(axes), shape_c, "    ")
    t = VALUE_TYPES[acc_dt]   # float16/bfloat16 accumulate in float, rounded once on store
    lines = [f"// {comment}", signature(name, ins, [out], threads) + " {"]
    lines += _row_loops([shape_c[a] for a in kept], [shape_c[a] for a in axes])
    lines += kept_lines

    def loop(acc_init, update, var="acc"):
        ls = [f"    {t} {var} = {acc_init};",
              "    for (long long j = threadIdx.x; j < n_red; j += blockDim.x) {"]
        ls += red_lines
        el, v = element(coords, "      ")
        ls += el + [f"      const {t} x_ = ({t})({v});", f"      {update}", "    }"]
        return ls
    kd = "f" if _dt.is_float(acc_dt) else "i"
    if isinstance(reducer, Monoid):
        fn = reducer.combine
        idv = (reducer.float_identity if kd == "f" else reducer.int_identity).format(t=t)
        lines += loop(idv, f"acc = {fn}(acc, x_);")
        lines += [f"    acc = gc_block_reduce(acc, {fn}, ({t})({idv}));",
                  f"    if (threadIdx.x == 0) {out[0]}[o] = {store('acc', out[1])};"]
    elif isinstance(reducer, LogSumExp):
        lines += loop("-GC_INF", "m = gc_max(m, x_);", "m")
        lines += [f"    m = gc_block_reduce(m, GcMax(), ({t})-GC_INF);",
                  f"    if (!gc_finite(m)) m = 0;  // all -inf (or inf/nan): NumPy's reference does the same"]
        lines += loop("0", "acc += exp(x_ - m);")
        lines += [f"    acc = gc_block_reduce(acc, GcSum(), ({t})0);",
                  f"    if (threadIdx.x == 0) {out[0]}[o] = {store('log(acc) + m', out[1])};"]
    elif isinstance(reducer, ArgReduce):  # index into the flattened reduced axes
        is_max = str(reducer.is_max).lower()
        lines += [f"    {t} best = 0; long long bi = -1;",
                  "    for (long long j = threadIdx.x; j < n_red; j += blockDim.x) {"]
        lines += red_lines
        el, v = element(coords, "      ")
        lines += el + [f"      gc_arg_combine(best, bi, ({t})({v}), j, {is_max});", "    }",
                       f"    bi = gc_block_arg_reduce(best, bi, {is_max});",
                       f"    if (threadIdx.x == 0) {out[0]}[o] = bi;"]
    else:
        raise TypeError(f"reduce_kernel: unknown reducer {reducer!r}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def softmax_kernel(name, comment, log, shape_c, axis, x, out, threads) -> str:
    """Row-wise (log-)softmax along `axis`: block max, block sum of exp(x - max), then write (float16/
    bfloat16 in float, rounded once on store)."""
    t = VALUE_TYPES[out[1]]
    xk = load(f"{x[0]}[k]", x[1])
    kept = [a for a in range(len(shape_c)) if a != axis]
    coords, kept_lines, red_lines = _split(kept, [axis], shape_c, "    ")
    idx = View(0, contiguous_strides(shape_c)).index(coords)
    lines = [f"// {comment}", signature(name, [x], [out], threads) + " {"]
    lines += _row_loops([shape_c[a] for a in kept], [shape_c[axis]]) + kept_lines

    def loop(body):
        return ["    for (long long j = threadIdx.x; j < n_red; j += blockDim.x) {", *red_lines,
                f"      const long long k = {idx};", f"      {body}", "    }"]
    lines += [f"    {t} m = -GC_INF;"] + loop(f"m = gc_max(m, ({t}){xk});")
    lines += [f"    m = gc_block_reduce(m, GcMax(), ({t})-GC_INF);", f"    {t} s = 0;"]
    lines += loop(f"s += exp({xk} - m);")
    lines += ["    s = gc_block_reduce(s, GcSum(), (" + t + ")0);"]
    write = f"{out[0]}[k] = {store(f'{xk} - m - log(s)' if log else f'exp({xk} - m) / s', out[1])};"
    lines += loop(write) + ["  }", "}"]
    return "\n".join(lines) + "\n"


def gemm_kernel(name, comment, ins, outs, acc_dt, M, N, K, nbatch, batch_lines, a_lines, b_lines, store) -> str:
    """Tiled GEMM skeleton (16x16 tiles through shared memory, blockIdx.z strides over a batch).
    Loaders fill `v` for A[r, q] / B[q, cc] (zero outside), so convolutions use it as implicit GEMM;
    `store` writes `acc` for (row, col). `acc_dt` is the output's dtype (float16/bfloat16 accumulate
    in float: its register type)."""
    t = VALUE_TYPES[acc_dt]
    lines = [f"// {comment}", signature(name, ins, outs, TILE * TILE) + " {",
             f"  __shared__ {t} As[{TILE}][{TILE + 1}];  // +1 column: no shared-memory bank conflicts",
             f"  __shared__ {t} Bs[{TILE}][{TILE + 1}];",
             f"  const long long M = {M}, N = {N}, K = {K}, nbatch = {nbatch};",
             "  const int tx = threadIdx.x, ty = threadIdx.y;",
             f"  const long long row = (long long)blockIdx.y * {TILE} + ty, col = (long long)blockIdx.x * {TILE} + tx;",
             "  for (long long bz = blockIdx.z; bz < nbatch; bz += gridDim.z) {", *batch_lines,
             f"    {t} acc = 0;",
             f"    for (long long t0 = 0; t0 < K; t0 += {TILE}) {{",
             "      {",
             f"        const long long r = row, q = t0 + tx;",
             f"        {t} v = 0;",
             "        if (r < M && q < K) {", *a_lines, "        }",
             "        As[ty][tx] = v;",
             "      }",
             "      {",
             f"        const long long q = t0 + ty, cc = col;",
             f"        {t} v = 0;",
             "        if (q < K && cc < N) {", *b_lines, "        }",
             "        Bs[ty][tx] = v;",
             "      }",
             "      __syncthreads();",
             f"      for (int k = 0; k < {TILE}; ++k) acc += As[ty][k] * Bs[k][tx];",
             "      __syncthreads();",
             "    }",
             "    if (row < M && col < N) {", *store, "    }",
             "  }", "}"]
    return "\n".join(lines) + "\n"


def matmul_kernel(name, comment, a, b, outs, n, k, m, batch_c, a_bstrides, b_bstrides, extra=(), epilogue=None) -> str:
    """Batched C = A @ B (batch dims broadcast through the per-operand batch strides).
    `epilogue(batch_coords, indent)` replaces the plain store: a fused elementwise tail applied to
    `acc` before writing (bias, activation), reading `extra` inputs."""
    t = VALUE_TYPES[outs[0][1]]
    bcoords = [f"b{q}" for q in range(len(batch_c))]
    aoff = View(0, a_bstrides).index(bcoords)
    boff = View(0, b_bstrides).index(bcoords)
    batch = coords_code("bz", batch_c, bcoords, "    ") + [
        f"    const {C_TYPES[a[1]]}* A = {a[0]} + {aoff} * M * K;",
        f"    const {C_TYPES[b[1]]}* B = {b[0]} + {boff} * K * N;"]
    st = epilogue(bcoords, "      ") if epilogue else \
        [f"      {outs[0][0]}[bz * M * N + row * N + col] = {store('acc', outs[0][1])};"]
    return gemm_kernel(name, comment, [a, b, *extra], outs, outs[0][1], n, m, k, cprod(batch_c), batch,
                       [f"          v = ({t}){load('A[r * K + q]', a[1])};"],
                       [f"          v = ({t}){load('B[q * N + cc]', b[1])};"], st)


def scatter_kernel(name, comment, loop_c, ins, dst, target, accumulate, extra_outs=()) -> str:
    """dst[target(c)] (+)= src[i] over src's elements (gradients of indexing; dst is zero-filled first).
    Accumulation is an atomicAdd on dst's type (float, double, int, unsigned, 64-bit integers; a
    float16/bfloat16 destination is a float32 buffer, converted afterwards: lower.CudaSchedule.scatter)."""
    coords = [f"c{k}" for k in range(len(loop_c))]
    src = ins[0]
    lines = [f"// {comment}", signature(name, ins, [dst, *extra_outs], THREADS) + " {", grid_stride(cprod(loop_c))]
    tl, tidx = target(coords, "    ")
    lines += coords_code("i", loop_c, coords, "    ") + tl
    val = f"({VALUE_TYPES[dst[1]]}){load(f'{src[0]}[i]', src[1])}"
    if not accumulate:
        op = f"{dst[0]}[{tidx}] = {store(val, dst[1])};"
    elif dst[1] == "int64":   # no signed 64-bit atomicAdd: the two's complement sum is the unsigned one
        op = f"atomicAdd((unsigned long long*)&{dst[0]}[{tidx}], (unsigned long long){val});"
    else:
        op = f"atomicAdd(&{dst[0]}[{tidx}], {val if src[1] != dst[1] else src[0] + '[i]'});"
    lines += [f"    {op}", "  }", "}"]
    return "\n".join(lines) + "\n"


def grid_1d(n_fn, threads=THREADS, cap=65535):
    """Blocks for a grid-stride loop over n elements."""
    def grid(dims):
        n = n_fn(dims)
        return (min(cap, (n + threads - 1) // threads), 1, 1) if n > 0 else (0, 1, 1)
    return grid


def reduce_threads(n_red) -> int:
    """Threads per block for a reduction of n_red elements (static): a power of two in [32, 256]."""
    if not isinstance(n_red, int):
        return THREADS
    t = 32
    while t < n_red and t < THREADS:
        t *= 2
    return t


__all__ = ["pointwise", "reduce_kernel", "softmax_kernel", "matmul_kernel", "scatter_kernel", "grid_1d",
           "reduce_threads", "THREADS", "TILE", "cmul"]
