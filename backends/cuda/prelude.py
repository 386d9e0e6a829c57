"""The fixed part of every generated .cu file: dtype names, math helpers, warp/block reductions, and
the C spellings of loads, stores and conversions between dtypes (NumPy's astype semantics).

Everything here is plain CUDA C++ that nvcc, NVRTC and the host emulation (g++ with
backends/cuda_emulated/emulation.h included first) all accept; a graph with float16/bfloat16 tensors
also gets HALF_PRELUDE (cuda_fp16.h / cuda_bf16.h on the device, the emulation's own host types).

float16 and bfloat16 are storage types (`__half`, `__nv_bfloat16`): a kernel loads them into float
registers, computes in float32, and rounds every result of a half dtype to nearest even (as NumPy's
float16 loops, ml_dtypes and the llvm backend do); a store rounds once more (a no-op on a rounded
value). Integers of every width keep their own C type, so arithmetic wraps as NumPy's does.
"""
from __future__ import annotations

from graphc import dtypes as _dt

#: graphc dtype -> C type of its elements in memory (kernel parameters, buffers)
C_TYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long", "bool": "bool",
           "float16": "__half", "bfloat16": "__nv_bfloat16", "int8": "signed char", "uint8": "unsigned char",
           "int16": "short", "uint16": "unsigned short", "uint32": "unsigned int", "uint64": "unsigned long long"}
#: graphc dtype -> C type of its values in a kernel's registers (float16/bfloat16 compute in float)
VALUE_TYPES = {**C_TYPES, "float16": "float", "bfloat16": "float"}
#: float16/bfloat16 -> (storage -> float, float -> storage rounded to nearest even, float rounded and back)
_HALF_FNS = {"float16": ("__half2float", "__float2half_rn", "gc_rnd_f16"),
             "bfloat16": ("__bfloat162float", "__float2bfloat16_rn", "gc_rnd_bf16")}


def uses_half(dtypes) -> bool:
    """Whether a translation unit over these dtypes needs HALF_PRELUDE."""
    return any(d in _HALF_FNS for d in dtypes)


def load(expr: str, dtype: str) -> str:
    """The value (register type VALUE_TYPES[dtype]) of the element `expr` of a `dtype` buffer."""
    return f"{_HALF_FNS[dtype][0]}({expr})" if dtype in _HALF_FNS else expr


def store(expr: str, dtype: str) -> str:
    """A value of `dtype` (register type) as the element to write into a `dtype` buffer."""
    return f"{_HALF_FNS[dtype][1]}({expr})" if dtype in _HALF_FNS else expr


def rounded(expr: str, dtype: str) -> str:
    """A float32 result computed for a float16/bfloat16 tensor, rounded to it (other dtypes: as is)."""
    return f"{_HALF_FNS[dtype][2]}({expr})" if dtype in _HALF_FNS else expr


def convert(v: str, src: str, dst: str) -> str:
    """The C expression converting value `v` of dtype `src` to dtype `dst` as NumPy's astype does (and
    llvm's lower.convert): to bool by != 0; to float16/bfloat16 one correct rounding (from float64 and
    the integers through a float rounded to odd, so no double rounding); float to a narrow integer
    through int (uint32 through long long), wrapping as NumPy compiles it on x86."""
    if src == dst:
        return v
    vt = VALUE_TYPES[dst]
    if dst == "bool":
        return f"({v} != 0)"
    if src == "bool":
        return f"(({vt}){v})"
    if _dt.is_half(dst):
        if src == "float64" or _dt.is_int(src):
            return rounded(f"gc_odd_f32((double){v})", dst)
        return rounded(v, dst)             # float32, or the other half dtype (a float register)
    if _dt.is_float(src) and _dt.is_int(dst) and dst not in ("int32", "int64", "uint64"):
        return f"(({vt})({'long long' if dst == 'uint32' else 'int'}){v})"
    if _dt.is_half(src) and dst == "float32":
        return v
    return f"(({vt}){v})"


PRELUDE = r"""
// ---- graphc CUDA prelude ------------------------------------------------------------------
#ifndef GC_INF
#define GC_INF (__int_as_float(0x7f800000))
#define GC_NAN (__int_as_float(0x7fffffff))
#endif
#define GC_WARP 32

template <class T> __device__ __forceinline__ T gc_max(T a, T b) { return (a != a || a > b) ? a : b; }
template <class T> __device__ __forceinline__ T gc_min(T a, T b) { return (a != a || a < b) ? a : b; }
template <class T> __device__ __forceinline__ T gc_abs(T a) { return a < T(0) ? T(-a) : a; }
template <class T> __device__ __forceinline__ T gc_sign(T a) { return T((a > T(0)) - (a < T(0))); }
// integer power by squaring in 64-bit unsigned arithmetic: wraps as NumPy's integer power does
template <class T> __device__ __forceinline__ T gc_ipow(T a, T b) {
  if (b < T(0)) return T(pow((double)a, (double)b));
  unsigned long long r = 1ULL, x = (unsigned long long)a, e = (unsigned long long)b;
  for (; e; e >>= 1) { if (e & 1ULL) r *= x; x *= x; }
  return T(r);
}
// integer product wrapping at the type's width (unsigned short * unsigned short overflows int in C)
template <class T> __device__ __forceinline__ T gc_imul(T a, T b) {
  return T((unsigned long long)a * (unsigned long long)b);
}
// the smallest and largest value of an integer type (signed or unsigned): max/min identities
template <class T> __device__ __forceinline__ T gc_lowest() {
  return T(-1) < T(0) ? T(1ULL << (8 * sizeof(T) - 1)) : T(0);
}
template <class T> __device__ __forceinline__ T gc_highest() { return T(~gc_lowest<T>()); }
// exact three-way comparison of a signed and an unsigned 64-bit integer (NumPy 2 compares int64 with
// uint64 exactly, not through float64): -1, 0 or 1
__device__ __forceinline__ int gc_cmp_su(long long a, unsigned long long b) {
  return a < 0 ? -1 : ((unsigned long long)a < b ? -1 : (unsigned long long)a > b ? 1 : 0);
}
template <class T> __device__ __forceinline__ bool gc_finite(T a) { return a == a && a - a == T(0); }

struct GcSum { template <class T> __device__ T operator()(T a, T b) const { return a + b; } };
struct GcProd { template <class T> __device__ T operator()(T a, T b) const { return a * b; } };
struct GcMax { template <class T> __device__ T operator()(T a, T b) const { return gc_max(a, b); } };
struct GcMin { template <class T> __device__ T operator()(T a, T b) const { return gc_min(a, b); } };

// every lane of the warp ends with the warp's total (butterfly)
template <class T, class Op> __device__ __forceinline__ T gc_warp_reduce(T v, Op op) {
  for (int o = GC_WARP / 2; o > 0; o >>= 1) v = op(v, (T)__shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// block-wide reduction: warp shuffles, then one value per warp through shared memory;
// every thread gets the result. blockDim.x must be a multiple of 32 and all threads must call it.
template <class T, class Op> __device__ T gc_block_reduce(T v, Op op, T identity) {
  __shared__ T part[32];
  const int lane = threadIdx.x % GC_WARP, warp = threadIdx.x / GC_WARP;
  v = gc_warp_reduce(v, op);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x / GC_WARP) ? part[lane] : identity;
    v = gc_warp_reduce(v, op);
    if (lane == 0) part[0] = v;
  }
  __syncthreads();
  return part[0];
}

// arg-reduction: (value, index) pairs; ties go to the smaller index (NumPy's first occurrence)
template <class T> __device__ __forceinline__ void gc_arg_combine(T& v, long long& i, T v2, long long i2, bool is_max) {
  const bool better = is_max ? (v2 > v || (v2 != v2 && v == v)) : (v2 < v || (v2 != v2 && v == v));
  if (i < 0 || (i2 >= 0 && (better || (v2 == v && i2 < i)))) { v = v2; i = i2; }
}

template <class T> __device__ long long gc_block_arg_reduce(T v, long long i, bool is_max) {
  __shared__ T pv[32];
  __shared__ long long pi[32];
  const int lane = threadIdx.x % GC_WARP, warp = threadIdx.x / GC_WARP;
  for (int o = GC_WARP / 2; o > 0; o >>= 1) {
    T v2 = __shfl_xor_sync(0xffffffffu, v, o);
    long long i2 = __shfl_xor_sync(0xffffffffu, i, o);
    gc_arg_combine(v, i, v2, i2, is_max);
  }
  __syncthreads();
  if (lane == 0) { pv[warp] = v; pi[warp] = i; }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < (int)(blockDim.x / GC_WARP);
    v = has ? pv[lane] : pv[0];
    i = has ? pi[lane] : -1;
    for (int o = GC_WARP / 2; o > 0; o >>= 1) {
      T v2 = __shfl_xor_sync(0xffffffffu, v, o);
      long long i2 = __shfl_xor_sync(0xffffffffu, i, o);
      gc_arg_combine(v, i, v2, i2, is_max);
    }
    if (lane == 0) pi[0] = i;
  }
  __syncthreads();
  return pi[0];
}
// ---- end of prelude -----------------------------------------------------------------------
"""

#: added to a translation unit with float16/bfloat16 tensors (uses_half): the device's types from the CUDA
#: headers (the emulation header defines host ones that round the same way), and the rounding helpers
HALF_PRELUDE = r"""
// ---- float16 / bfloat16: storage types, computed in float, rounded to nearest even on store -------
#ifndef GC_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
// a float rounded to float16 / bfloat16 and held as a float again (one op's result in a half dtype)
__device__ __forceinline__ float gc_rnd_f16(float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float gc_rnd_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
// double -> float rounded to odd (truncate, then set the last bit when inexact): rounding that float to
// float16/bfloat16 is the correctly rounded double -> half conversion (no double rounding)
__device__ __forceinline__ float gc_odd_f32(double v) {
  const float t = (float)v;
  const double back = (double)t;
  int bits = __float_as_int(t) - (fabs(back) > fabs(v) ? 1 : 0);
  bits |= (back != v) ? 1 : 0;
  return __int_as_float(bits);
}
// ---- end of the float16 / bfloat16 prelude --------------------------------------------------------
"""
