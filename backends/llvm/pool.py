"""A persistent native thread pool for the generated code (LLVM IR text, compiled once per process).

`gc_pool_run(fn, args, n)` runs fn(args, 0) .. fn(args, n-1) (chunks of a kernel's outer range, blocks of
a GEMM's columns) on the calling thread and the pool's workers, and returns when all have run.

- Workers are created once, lazily at the first dispatch, at most `workers` of them (set from Python:
  graphc's thread count minus the caller). Between dispatches a worker spins on a generation counter
  (`pause`, with a sched_yield every YIELD_EVERY pauses so that a busy machine's other threads get the
  core; about SPIN_TICKS of the time-stamp counter), then sleeps on it with a futex.
- A dispatch publishes (fn, args, n), bumps the generation and wakes sleepers (one futex syscall, only
  when a worker sleeps). Chunks are claimed dynamically from one atomic word holding (generation << 32 |
  chunks left), so a worker that wakes late claims nothing of an old or finished job, and the CALLER
  runs chunks too: if every worker is descheduled (a busy machine) the caller simply runs all of them,
  at the cost of the publish (a few atomic stores) over one thread.
- A chunk's job fields are read only after a successful claim: the job cannot finish (and the next one
  cannot overwrite them) while a claimed chunk is pending.
- Dispatch is a try-lock: a second thread dispatching at the same time (two Python threads calling
  compiled functions, or a chunk dispatching again) runs its chunks inline, one after the other.
- After os.fork() the child has no workers: a fork hook resets the pool (workers are created again).

The function is bound for the JIT as the symbol gc_pool_run (like the BLAS symbols, jit.bind_blas), so
every program module only declares it (`DECLARATIONS`).
"""
from __future__ import annotations

import ctypes
import os
import threading

from . import jit

#: the declaration every generated module gets (program.generate's head)
DECLARATIONS = "declare void @gc_pool_run(ptr, ptr, i64) nounwind\n"

#: time-stamp-counter ticks a worker spins (pause) waiting for the next job before it sleeps on a futex
#: (~100 us at 2.5 GHz: back-to-back kernels, a scan's steps, find it awake)
SPIN_TICKS = 1 << 18
#: ticks the dispatching thread spins waiting for the workers' last chunks before it yields its core
#: (on a busy machine the worker it waits for may need that core)
YIELD_TICKS = 1 << 13
#: a spinning worker yields its core (sched_yield) once every this many pauses (~2 us)
YIELD_EVERY = 64

_SYS_FUTEX, _FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE = 202, 128, 129

_IR = r"""
@gen = internal global i32 0, align 64
@sleepers = internal global i32 0, align 64
@claimw = internal global i64 0, align 64
@pending = internal global i64 0, align 64
@jobfn = internal global ptr null, align 64
@jobargs = internal global ptr null, align 8
@jobn = internal global i64 0, align 8
@lock = internal global i32 0, align 64
@started = internal global i32 0, align 4
@want = internal global i32 0, align 4
; [dispatches through the pool, dispatches run inline because the pool was busy, chunks run by workers]
@stats = internal global [3 x i64] zeroinitializer, align 64

declare i32 @pthread_create(ptr, ptr, ptr, ptr)
declare i64 @syscall(i64, ...)
declare i32 @sched_yield()
declare i64 @llvm.readcyclecounter()
declare void @llvm.x86.sse2.pause()

; claim one chunk of job %g: true and its index in %slot, or false (none left, or another job)
define internal i1 @claim(i32 %g, ptr %slot) nounwind {
entry:
  %c0 = load atomic i64, ptr @claimw acquire, align 8
  %g64 = zext i32 %g to i64
  br label %loop
loop:
  %c = phi i64 [ %c0, %entry ], [ %seen, %retry ]
  %hi = lshr i64 %c, 32
  %same = icmp eq i64 %hi, %g64
  %rem = and i64 %c, 4294967295
  %some = icmp ne i64 %rem, 0
  %ok = and i1 %same, %some
  br i1 %ok, label %try, label %fail
try:
  %c1 = sub i64 %c, 1
  %r = cmpxchg ptr @claimw, i64 %c, i64 %c1 acq_rel acquire
  %seen = extractvalue { i64, i1 } %r, 0
  %won = extractvalue { i64, i1 } %r, 1
  br i1 %won, label %got, label %retry
retry:
  br label %loop
got:
  %n = load atomic i64, ptr @jobn monotonic, align 8
  %i = sub i64 %n, %rem
  store i64 %i, ptr %slot
  ret i1 true
fail:
  ret i1 false
}

; run chunks of job %g until none is left to claim (%worker: 1 on a pool thread, 0 on the caller)
define internal void @work(i32 %g, i64 %worker) nounwind {
entry:
  %slot = alloca i64, align 8
  br label %loop
loop:
  %ok = call i1 @claim(i32 %g, ptr %slot)
  br i1 %ok, label %run, label %done
run:
  %i = load i64, ptr %slot
  %fn = load atomic ptr, ptr @jobfn monotonic, align 8
  %args = load atomic ptr, ptr @jobargs monotonic, align 8
  call void %fn(ptr %args, i64 %i)
  %st = getelementptr [3 x i64], ptr @stats, i64 0, i64 2
  %old = atomicrmw add ptr %st, i64 %worker monotonic
  %left = atomicrmw sub ptr @pending, i64 1 release
  br label %loop
done:
  ret void
}

define internal ptr @worker(ptr %arg) nounwind {
entry:
  %a = ptrtoint ptr %arg to i64
  %s0 = trunc i64 %a to i32
  br label %wait
wait:
  %seen = phi i32 [ %s0, %entry ], [ %cur, %go ]
  %t0 = call i64 @llvm.readcyclecounter()
  br label %spin
spin:
  %k = phi i32 [ 0, %wait ], [ %k1, %every ], [ %k1, %polite ], [ 0, %woke ]
  %cur = load atomic i32, ptr @gen acquire, align 4
  %new = icmp ne i32 %cur, %seen
  br i1 %new, label %go, label %pause
pause:
  call void @llvm.x86.sse2.pause()
  %k1 = add i32 %k, 1
  %t = call i64 @llvm.readcyclecounter()
  %dt = sub i64 %t, %t0
  %long = icmp ugt i64 %dt, SPIN_TICKS
  br i1 %long, label %sleep, label %every
every:
  ; every YIELD_EVERY pauses give the core to any other runnable thread (a busy machine: the caller,
  ; another process) instead of spinning through its time slice
  %km = and i32 %k1, YIELD_MASK
  %turn = icmp eq i32 %km, 0
  br i1 %turn, label %polite, label %spin
polite:
  %y0 = call i32 @sched_yield()
  br label %spin
sleep:
  %x1 = atomicrmw add ptr @sleepers, i32 1 seq_cst
  %cur2 = load atomic i32, ptr @gen seq_cst, align 4
  %same2 = icmp eq i32 %cur2, %seen
  br i1 %same2, label %block, label %woke
block:
  %seen64 = zext i32 %seen to i64
  %rc = call i64 (i64, ...) @syscall(i64 SYS_FUTEX, ptr @gen, i64 FUTEX_WAIT, i64 %seen64, ptr null)
  br label %woke
woke:
  %x2 = atomicrmw sub ptr @sleepers, i32 1 seq_cst
  br label %spin
go:
  call void @work(i32 %cur, i64 1)
  br label %wait
}

define void @gc_pool_run(ptr %fn, ptr %args, i64 %n) nounwind {
entry:
  %tid = alloca i64, align 8
  %multi = icmp sgt i64 %n, 1
  br i1 %multi, label %check, label %inline
check:
  %want = load atomic i32, ptr @want monotonic, align 4
  %any = icmp sgt i32 %want, 0
  br i1 %any, label %trylock, label %inline
trylock:
  %r = cmpxchg ptr @lock, i32 0, i32 1 acquire monotonic
  %got = extractvalue { i32, i1 } %r, 1
  br i1 %got, label %locked, label %busy
locked:
  %g0 = load atomic i32, ptr @gen monotonic, align 4
  %have0 = load i32, ptr @started, align 4
  %need = icmp slt i32 %have0, %want
  br i1 %need, label %spawn, label %publish
spawn:
  %s = phi i32 [ %have0, %locked ], [ %s1, %spawned ]
  %g0z = zext i32 %g0 to i64
  %warg = inttoptr i64 %g0z to ptr
  %rc = call i32 @pthread_create(ptr %tid, ptr null, ptr @worker, ptr %warg)
  %okc = icmp eq i32 %rc, 0
  br i1 %okc, label %spawned, label %spawnend
spawned:
  %s1 = add i32 %s, 1
  store i32 %s1, ptr @started, align 4
  %more = icmp slt i32 %s1, %want
  br i1 %more, label %spawn, label %spawnend
spawnend:
  %have = load i32, ptr @started, align 4
  %none = icmp eq i32 %have, 0
  br i1 %none, label %unlock, label %publish
publish:
  store atomic ptr %fn, ptr @jobfn monotonic, align 8
  store atomic ptr %args, ptr @jobargs monotonic, align 8
  store atomic i64 %n, ptr @jobn monotonic, align 8
  store atomic i64 %n, ptr @pending monotonic, align 8
  %g = add i32 %g0, 1
  %gz = zext i32 %g to i64
  %ghi = shl i64 %gz, 32
  %cw = or i64 %ghi, %n
  store atomic i64 %cw, ptr @claimw release, align 8
  store atomic i32 %g, ptr @gen seq_cst, align 4
  %st0 = getelementptr [3 x i64], ptr @stats, i64 0, i64 0
  %x0 = atomicrmw add ptr %st0, i64 1 monotonic
  %sl = load atomic i32, ptr @sleepers seq_cst, align 4
  %sleeping = icmp sgt i32 %sl, 0
  br i1 %sleeping, label %wake, label %mine
wake:
  %wk = call i64 (i64, ...) @syscall(i64 SYS_FUTEX, ptr @gen, i64 FUTEX_WAKE, i64 2147483647)
  br label %mine
mine:
  call void @work(i32 %g, i64 0)
  %t0 = call i64 @llvm.readcyclecounter()
  br label %waitp
waitp:
  %p = load atomic i64, ptr @pending acquire, align 8
  %zero = icmp eq i64 %p, 0
  br i1 %zero, label %finish, label %waitmore
waitmore:
  %t = call i64 @llvm.readcyclecounter()
  %dt = sub i64 %t, %t0
  %long = icmp ugt i64 %dt, YIELD_TICKS
  br i1 %long, label %yield, label %pausep
pausep:
  call void @llvm.x86.sse2.pause()
  br label %waitp
yield:
  %y = call i32 @sched_yield()
  br label %waitp
finish:
  store atomic i32 0, ptr @lock release, align 4
  ret void
busy:
  %st1 = getelementptr [3 x i64], ptr @stats, i64 0, i64 1
  %x3 = atomicrmw add ptr %st1, i64 1 monotonic
  br label %inline
unlock:
  store atomic i32 0, ptr @lock release, align 4
  br label %inline
inline:
  %i = phi i64 [ 0, %entry ], [ 0, %check ], [ 0, %busy ], [ 0, %unlock ], [ %i1, %body ]
  %more2 = icmp slt i64 %i, %n
  br i1 %more2, label %body, label %out
body:
  call void %fn(ptr %args, i64 %i)
  %i1 = add i64 %i, 1
  br label %inline
out:
  ret void
}

define void @gc_pool_set_workers(i32 %n) nounwind {
entry:
  store atomic i32 %n, ptr @want monotonic, align 4
  ret void
}

define ptr @gc_pool_stats() nounwind {
entry:
  ret ptr @stats
}

define i32 @gc_pool_started() nounwind {
entry:
  %s = load atomic i32, ptr @started monotonic, align 4
  ret i32 %s
}

; in a forked child: no workers exist, no dispatch is in progress
define void @gc_pool_after_fork() nounwind {
entry:
  store i32 0, ptr @started, align 4
  store i32 0, ptr @sleepers, align 4
  store i64 0, ptr @pending, align 8
  store i64 0, ptr @claimw, align 8
  store i32 0, ptr @lock, align 4
  ret void
}
"""


def ir() -> str:
    return (_IR.replace("SPIN_TICKS", str(SPIN_TICKS)).replace("YIELD_TICKS", str(YIELD_TICKS))
            .replace("YIELD_MASK", str(YIELD_EVERY - 1))
            .replace("SYS_FUTEX", str(_SYS_FUTEX)).replace("FUTEX_WAIT", str(_FUTEX_WAIT_PRIVATE))
            .replace("FUTEX_WAKE", str(_FUTEX_WAKE_PRIVATE)))


_lock = threading.Lock()
_state: dict = {}


def bind() -> dict:
    """Compile the pool (once per process) and bind
    gc_pool_run for the JIT. Returns {'compiled', 'set_workers', 'stats', 'started', 'after_fork'}."""
    st = _state.get("pool")
    if st is not None:
        return st
    with _lock:
        if "pool" in _state:
            return _state["pool"]
        import llvmlite.binding as llvm
        names = ["gc_pool_run", "gc_pool_set_workers", "gc_pool_stats", "gc_pool_started", "gc_pool_after_fork"]
        c = compile_uncached(ir(), names)
        llvm.add_symbol("gc_pool_run", c.addresses["gc_pool_run"])
        st = {"compiled": c,   # owns the code: kept for the life of the process
              "run": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(c.addresses["gc_pool_run"]),
              "set_workers": ctypes.CFUNCTYPE(None, ctypes.c_int32)(c.addresses["gc_pool_set_workers"]),
              "stats": ctypes.CFUNCTYPE(ctypes.c_void_p)(c.addresses["gc_pool_stats"]),
              "started": ctypes.CFUNCTYPE(ctypes.c_int32)(c.addresses["gc_pool_started"]),
              "after_fork": ctypes.CFUNCTYPE(None)(c.addresses["gc_pool_after_fork"]),
              "workers": 0}
        # the workers run the pool's code until the process ends: it must outlive interpreter shutdown
        # (module globals are cleared then; a freed engine under a spinning worker would crash the exit)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(c))
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=st["after_fork"])
        _state["pool"] = st
        return st


def compile_uncached(text: str, names: list[str]):
    """JIT a small module kept out of the on-disk cache (the pool, once per process; the tuner's probes):
    the cache holds only the programs' code."""
    import llvmlite.binding as llvm
    jit.target_machine()
    with jit._lock:
        mod = llvm.parse_assembly(text)
        mod.verify()
        jit.optimise(mod)
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), jit._new_tm())
        engine.add_module(mod)
        engine.finalize_object()
        return jit.Compiled(text, names, False, engine, mod)


def ensure_workers(n: int) -> None:
    """Let the pool start up to `n` workers (it only grows; they start at the next dispatch)."""
    st = bind()
    if n > st["workers"]:
        st["workers"] = n
        st["set_workers"](n)


def declarations(nthreads: int = 1) -> str:
    """The pool's declaration for a module whose code dispatches on `nthreads` threads (binds the pool
    and lets it grow to nthreads - 1 workers)."""
    ensure_workers(max(0, nthreads - 1))
    return DECLARATIONS


def stats() -> dict:
    """Counters since the process started: dispatches through the pool, dispatches run inline because
    another thread held the pool, chunks run by workers; and the workers started."""
    st = bind()
    arr = (ctypes.c_int64 * 3).from_address(st["stats"]())
    return {"dispatches": arr[0], "busy_inline": arr[1], "worker_chunks": arr[2], "workers": st["started"]()}
