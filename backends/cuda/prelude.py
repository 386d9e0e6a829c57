"""The fixed part of every generated .cu file: dtype names, math helpers, warp/block reductions.

Everything here is plain CUDA C++ that nvcc, NVRTC and the host emulation (g++ with
backends/cuda_emulated/emulation.h included first) all accept; no #include is needed.
"""
from __future__ import annotations

#: graphc dtype -> C type used in kernels
C_TYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long", "bool": "bool"}

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
template <class T> __device__ __forceinline__ T gc_ipow(T a, T b) { return T(pow((double)a, (double)b)); }
template <class T> __device__ __forceinline__ bool gc_finite(T a) { return a == a && a - a == T(0); }

struct GcSum { template <class T> __device__ T operator()(T a, T b) const { return a + b; } };
struct GcProd { template <class T> __device__ T operator()(T a, T b) const { return a * b; } };
struct GcMax { template <class T> __device__ T operator()(T a, T b) const { return gc_max(a, b); } };
struct GcMin { template <class T> __device__ T operator()(T a, T b) const { return gc_min(a, b); } };

// every lane of the warp ends with the warp's total (butterfly)
template <class T, class Op> __device__ __forceinline__ T gc_warp_reduce(T v, Op op) {
  for (int o = GC_WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
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
