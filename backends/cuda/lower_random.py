"""random_uniform / random_normal as CUDA kernels: graphc.ops.random's counter-based generator
(splitmix64 finaliser rounds over (seed, counter, stream word, element index)) in CUDA C with the same
uint64 arithmetic as the NumPy reference, so uniform draws are bit-exact (GPU and emulation) and
normal draws differ only by the device's log/cos (a few ulp). One grid-stride kernel per draw; each
thread derives the draw's state from the key once, then hashes its element indices."""
from __future__ import annotations

from graphc.ops import random as R

from graphc.backends.schedule.views import product
from . import kernels as K
from .lower import Params, lowers
from .prelude import C_TYPES, convert, store

#: device helpers, defined once per translation unit (the first random kernel carries them)
HELPERS = f"""#ifndef GC_RANDOM_HELPERS
#define GC_RANDOM_HELPERS
// graphc.ops.random's generator: splitmix64's finaliser over (seed, counter, stream word, index)
__device__ __forceinline__ unsigned long long gc_mix64(unsigned long long z) {{
  z = (z ^ (z >> 30)) * {R.MIX1:#x}ULL;
  z = (z ^ (z >> 27)) * {R.MIX2:#x}ULL;
  return z ^ (z >> 31);
}}
__device__ __forceinline__ unsigned long long gc_rng_base(long long seed, long long counter, unsigned long long word) {{
  unsigned long long h = gc_mix64((unsigned long long)seed ^ {R.SEED_SALT:#x}ULL);
  h = gc_mix64(h ^ (unsigned long long)counter ^ {R.COUNTER_SALT:#x}ULL);
  return gc_mix64(h ^ word ^ {R.WORD_SALT:#x}ULL);
}}
__device__ __forceinline__ unsigned long long gc_rng_bits(unsigned long long base, unsigned long long j) {{
  return gc_mix64(base + (j + 1ULL) * {R.GAMMA:#x}ULL);
}}
__device__ __forceinline__ double gc_rng_unit(unsigned long long x, unsigned long long plus) {{
  return (double)((x >> 11) + plus) * {2.0 ** -53!r};  // 2**-53; exact: at most 2**53 * 2**-53
}}
__device__ __forceinline__ float gc_uniform_float(unsigned long long base, long long j) {{
  return (float)(gc_rng_bits(base, (unsigned long long)j) >> 40) * {2.0 ** -24:.17g}f;  // 2**-24
}}
__device__ __forceinline__ double gc_uniform_double(unsigned long long base, long long j) {{
  return gc_rng_unit(gc_rng_bits(base, (unsigned long long)j), 0ULL);
}}
// Box-Muller in double: u1 in (0, 1] (never log(0)), u2 in [0, 1); no additions, so no FMA contraction
__device__ __forceinline__ double gc_normal_double(unsigned long long base, long long j) {{
  const unsigned long long j2 = 2ULL * (unsigned long long)j;
  const double u1 = gc_rng_unit(gc_rng_bits(base, j2), 1ULL), u2 = gc_rng_unit(gc_rng_bits(base, j2 + 1ULL), 0ULL);
  const double r_ = sqrt(-2.0 * log(u1)), c_ = cos({R.TWO_PI!r} * u2);
  return r_ * c_;
}}
__device__ __forceinline__ float gc_normal_float(unsigned long long base, long long j) {{
  return (float)gc_normal_double(base, j);
}}
#endif
"""

#: op -> C helper name prefix of its distribution
DRAWS = {R.RandomUniform: "gc_uniform", R.RandomNormal: "gc_normal"}


def _half_draw(dtype: str):
    """The value of element i of a draw in float16/bfloat16 (a float): uniform keeps the top p bits
    (R.UNIFORM_BITS) scaled by 2**-p, exact; normal is the float64 draw rounded once to the dtype."""
    p = R.UNIFORM_BITS[dtype]

    def value(op) -> str:
        if op is R.RandomUniform:
            return f"((float)(gc_rng_bits(r_base, (unsigned long long)i) >> {64 - p}) * {2.0 ** -p!r}f)"
        return convert("gc_normal_double(r_base, i)", "float64", dtype)
    return value


#: float16/bfloat16 -> fn(op) -> the C value of element i
HALF_DRAWS = {d: _half_draw(d) for d in ("float16", "bfloat16")}


def source(name: str, comment: str, op, key: tuple, out: tuple, n, word: int, helpers: bool = True) -> str:
    """out[i] = element i of the draw of `op` from key [seed, counter] and `word`, i < n (with the
    helpers in front when `helpers`: the first random kernel of a translation unit)."""
    dt = out[1]
    if dt in HALF_DRAWS:   # float16/bfloat16: the reference's draws (uniform: p-bit, exact; normal: rounded once)
        value = HALF_DRAWS[dt](op)
    else:
        value = f"{DRAWS[op]}_{C_TYPES[dt]}(r_base, i)"
    lines = [HELPERS if helpers else "", f"// {comment}", K.signature(name, [key], [out], K.THREADS) + " {",
             f"  const unsigned long long r_base = gc_rng_base({key[0]}[0], {key[0]}[1], {word}ULL);",
             K.grid_stride(n),
             f"    {out[0]}[i] = {store(value, dt)};",
             "  }", "}"]
    return "\n".join(lines) + "\n"


@lowers(R.RandomUniform, R.RandomNormal)
def random(s, node, ins) -> None:
    """A random node on the cuda schedule `s`: a grid-stride kernel over the flat output."""
    y = node.outputs[0]
    key = s.dense(ins[0])
    P = Params(s)
    ka = (P(key), key.dtype)
    out = s.fresh(y)
    oa = (P(out, write=True), y.dtype)
    n = s.c(product(out.shape))
    word = node.op.word(node.attrs["stream"])
    comment = f"{node.op.name} {y.dtype}{list(out.shape)} from key {key.dtype}{list(key.shape)}, stream {node.attrs['stream']}"
    helpers = not any("GC_RANDOM_HELPERS" in src for src in s.sources)
    s.launch("random", lambda kn: source(kn, comment, node.op, ka, oa, n, word, helpers), P,
             K.grid_1d(lambda ev: ev(product(out.shape))), (K.THREADS, 1, 1), False)
    s.view[id(y)] = out
