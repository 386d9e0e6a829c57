// graphc CUDA emulation: compiles generated CUDA C kernels for the host (g++/clang) and runs them
// on the CPU with CUDA's execution model. Blocks run one after another; the threads of a block run
// as fibers (user-level contexts with their own stacks) on the calling OS thread, so
// __syncthreads() and warp shuffles are real barriers: a fiber that reaches one yields to the
// block's scheduler, which resumes the waiting fibers once every live thread (of the block or the
// warp) has arrived. Kernels without barriers skip the fibers and run their threads in a loop.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
using namespace std;

#define GC_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one copy per block: a block's fibers share an OS thread
#define GC_INF (__builtin_huge_valf())
#define GC_NAN (__builtin_nanf(""))

struct uint3 { unsigned x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace gc_emu {

enum State { RUN = 0, AT_BLOCK = 1, AT_WARP = 2, DONE = 3 };

// the growable array the scheduler needs, for trivially copyable elements: <vector> makes the precompiled
// header half as large again (23 MB instead of 15) and each graph's compile 0.17 s slower (0.38 s vs 0.21)
template <class T> struct Vec {
  static_assert(__is_trivially_copyable(T), "Vec moves its elements with realloc");
  T* p = nullptr;
  size_t n = 0, cap = 0;
  Vec() = default;
  Vec(const Vec&) = delete;
  Vec& operator=(const Vec&) = delete;
  ~Vec() { free(p); }
  size_t size() const { return n; }
  bool empty() const { return n == 0; }
  T& operator[](size_t i) { return p[i]; }
  T* begin() { return p; }
  T* end() { return p + n; }
  void reserve(size_t c) {
    if (c <= cap) return;
    T* q = (T*)realloc(p, c * sizeof(T));
    if (!q) { fprintf(stderr, "graphc emulation: out of memory\n"); abort(); }
    p = q;
    cap = c;
  }
  void resize(size_t m) {  // new elements value-initialised, as std::vector's
    reserve(m);
    for (size_t i = n; i < m; ++i) p[i] = T();
    n = m;
  }
  void push_back(const T& v) {
    if (n == cap) reserve(cap ? 2 * cap : 8);
    p[n++] = v;
  }
};

struct Fiber {
  uint3 tid;
  int state;
  int lin;            // linear thread id in the block
  void* sp;           // saved stack pointer (x86-64 switch)
  char* stack;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
};

struct Launch {
  void (*thunk)(void*);
  void* body;
  Vec<Fiber> fibers;
  Vec<unsigned long long> slots;  // warp-shuffle exchange, one per thread
  void* sched_sp;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  const char* error;
};

inline thread_local Fiber* cur = nullptr;
inline thread_local Launch* launch_ = nullptr;
inline thread_local uint3 block_idx, block_dim, grid_dim;
inline thread_local const char* last_error = nullptr;

constexpr size_t kStack = 64 * 1024;

struct StackPool {  // per OS thread, reused across launches
  Vec<char*> stacks;
  ~StackPool() { for (char* s : stacks) free(s); }
  char* get(size_t i) {
    while (stacks.size() <= i) stacks.push_back((char*)malloc(kStack));
    return stacks[i];
  }
};
inline thread_local StackPool pool;

#if defined(__x86_64__)
// switch(save, to): push callee-saved registers, save rsp into *save, load `to`, pop, return
extern "C" void gc_emu_switch(void** save, void* to);
asm(R"(
.text
.globl gc_emu_switch
.hidden gc_emu_switch
.type gc_emu_switch,@function
gc_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size gc_emu_switch, .-gc_emu_switch
)");
#endif

inline void to_scheduler() {
#if defined(__x86_64__)
  gc_emu_switch(&cur->sp, launch_->sched_sp);
#else
  swapcontext(&cur->ctx, &launch_->sched_ctx);
#endif
}

extern "C" inline void fiber_entry() {
  launch_->thunk(launch_->body);
  cur->state = DONE;
  to_scheduler();
  abort();  // a finished fiber is never resumed
}

inline void start_fiber(Fiber& f, size_t i) {
  f.stack = pool.get(i);
#if defined(__x86_64__)
  char* top = (char*)(((unsigned long long)(f.stack + kStack)) & ~15ull);
  void** sp = (void**)(top - 64);
  for (int r = 0; r < 6; ++r) sp[r] = nullptr;  // r15 r14 r13 r12 rbx rbp
  sp[6] = (void*)&fiber_entry;                   // return address of the first switch
  sp[7] = nullptr;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, (void (*)())fiber_entry, 0);
#endif
}

inline void resume(Fiber& f) {
  cur = &f;
#if defined(__x86_64__)
  gc_emu_switch(&launch_->sched_sp, f.sp);
#else
  swapcontext(&launch_->sched_ctx, &f.ctx);
#endif
}

// release waiting fibers whose barrier is complete; false when nothing can move (deadlock)
inline bool release(Vec<Fiber>& fs) {
  bool all_block = true, any = false;
  for (auto& f : fs) if (f.state != DONE && f.state != AT_BLOCK) all_block = false;
  if (all_block) {
    for (auto& f : fs) if (f.state == AT_BLOCK) { f.state = RUN; any = true; }
    return any;
  }
  for (size_t w = 0; w < fs.size(); w += 32) {
    size_t end = w + 32 < fs.size() ? w + 32 : fs.size();
    bool ok = true, some = false;
    for (size_t i = w; i < end; ++i) {
      if (fs[i].state == AT_WARP) some = true;
      else if (fs[i].state != DONE) ok = false;
    }
    if (ok && some) {
      for (size_t i = w; i < end; ++i) if (fs[i].state == AT_WARP) fs[i].state = RUN;
      any = true;
    }
  }
  return any;
}

inline void run_block_fibers(Launch& L, unsigned nthreads) {
  L.fibers.resize(nthreads);
  L.slots.resize(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = L.fibers[i];
    f.lin = i;
    f.tid = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    f.state = RUN;
    start_fiber(f, i);
  }
  for (;;) {
    bool live = false;
    for (auto& f : L.fibers) if (f.state == RUN) resume(f);
    for (auto& f : L.fibers) if (f.state != DONE) live = true;
    if (!live) return;
    if (!release(L.fibers)) { L.error = "deadlock: threads wait at different barriers"; return; }
  }
}

// one out-of-line copy of the block loop for every kernel of the library (a template instantiated per
// kernel compiled and optimised the loop again for each: 342 kernels took 15 s to build instead of 8.5)
__attribute__((noinline)) inline int launch_erased(dim3 grid, dim3 block, bool sync, void (*thunk)(void*),
                                                   void* body) {
  Launch L;
  L.thunk = thunk;
  L.body = body;
  L.error = nullptr;
  Launch* saved = launch_;
  launch_ = &L;
  grid_dim = {grid.x, grid.y, grid.z};
  block_dim = {block.x, block.y, block.z};
  const unsigned nthreads = block.x * block.y * block.z;
  Fiber single;
  for (unsigned bz = 0; bz < grid.z && !L.error; ++bz)
    for (unsigned by = 0; by < grid.y && !L.error; ++by)
      for (unsigned bx = 0; bx < grid.x && !L.error; ++bx) {
        block_idx = {bx, by, bz};
        if (sync) { run_block_fibers(L, nthreads); continue; }
        for (unsigned i = 0; i < nthreads; ++i) {  // no barriers: threads run to completion in turn
          single.lin = i;
          single.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          cur = &single;
          thunk(body);
        }
      }
  launch_ = saved;
  last_error = L.error;
  return L.error ? 1 : 0;
}

template <class F> int launch(dim3 grid, dim3 block, bool sync, F& body) {
  return launch_erased(grid, block, sync, [](void* p) { (*(F*)p)(); }, &body);
}

inline void wait_warp() {
  if (!launch_ || launch_->fibers.empty()) { last_error = "warp shuffle in a kernel launched without fibers"; abort(); }
  cur->state = AT_WARP;
  to_scheduler();
}

template <class T> T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  const int me = cur->lin, base = me - me % 32;
  memcpy(&launch_->slots[me], &v, sizeof(T));
  wait_warp();  // every lane has written its value
  T r;
  int src = base + src_lane;
  if (src_lane < 0 || src_lane >= 32 || src >= (int)launch_->slots.size()) src = me;
  memcpy(&r, &launch_->slots[src], sizeof(T));
  wait_warp();  // every lane has read before the slots are reused
  return r;
}

}  // namespace gc_emu

#define threadIdx (gc_emu::cur->tid)
#define blockIdx (gc_emu::block_idx)
#define blockDim (gc_emu::block_dim)
#define gridDim (gc_emu::grid_dim)

inline void __syncthreads() {
  if (gc_emu::launch_->fibers.empty()) { fprintf(stderr, "graphc emulation: __syncthreads in a kernel launched without fibers\n"); abort(); }
  gc_emu::cur->state = gc_emu::AT_BLOCK;
  gc_emu::to_scheduler();
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask) {
  return gc_emu::shfl(v, (gc_emu::cur->lin % 32) ^ mask);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int delta) {
  const int lane = gc_emu::cur->lin % 32;
  return gc_emu::shfl(v, lane + delta < 32 ? lane + delta : lane);
}
template <class T> inline T __shfl_sync(unsigned, T v, int lane) { return gc_emu::shfl(v, lane); }
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }  // blocks run serially
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }


// float16 / bfloat16 on the host: the storage types of cuda_fp16.h / cuda_bf16.h (two bytes each) and
// the conversions the generated kernels use, rounding exactly as the device's cvt.rn.f16.f32 /
// cvt.rn.bf16.f32 do: to nearest, ties to even, subnormals kept, overflow to infinity, every NaN to
// the canonical NaN 0x7fff
struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };
inline float __half2float(__half h) {
  const unsigned sign = (unsigned)(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  unsigned u;
  if (e == 0x1fu) u = sign | 0x7f800000u | (m << 13);            // inf, NaN (payload kept)
  else if (e != 0) u = sign | ((e + 112u) << 23) | (m << 13);     // normal: rebias 15 -> 127
  else if (m == 0) u = sign;                                      // +-0
  else {                                                          // subnormal: m * 2**-24, exact in float
    float f = (float)m * 5.9604644775390625e-08f;
    memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  const unsigned sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  unsigned short r;
  if (a > 0x7f800000u) r = 0x7fffu;                               // NaN
  else if (a >= 0x47800000u) r = (unsigned short)(sign | 0x7c00u);  // >= 65536 (and inf): inf
  else if (a < 0x38800000u) {                                     // below 2**-14: subnormal or zero
    // the 10 mantissa bits land at the bottom of a float whose exponent makes its ulp 2**-24; the
    // float addition rounds to nearest even (the host's default rounding, no flush to zero at -O1)
    float x;
    memcpy(&x, &a, 4);
    x += 0.5f;                                                    // ulp(0.5) = 2**-24
    unsigned v;
    memcpy(&v, &x, 4);
    r = (unsigned short)(sign | (v - 0x3f000000u));
  } else {                                                        // normal (65520 and up round to inf)
    const unsigned odd = (a >> 13) & 1u;
    r = (unsigned short)(sign | ((a + 0xc8000fffu + odd) >> 13));  // rebias 127 -> 15, round half to even
  }
  __half h;
  h.__x = r;
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const unsigned u = (unsigned)b.__x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  b.__x = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)0x7fffu
                                          : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return b;
}

extern "C" const char* gc_emu_last_error() { return gc_emu::last_error; }
