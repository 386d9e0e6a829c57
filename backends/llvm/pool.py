"""A persistent native thread pool for the generated code (LLVM IR text, compiled once per process).

`gc_pool_run(fn, args, n)` runs fn(args, 0) .. fn(args, n-1) (chunks of a kernel's outer range, blocks of
a GEMM's columns) on the calling thread and the pool's workers, and returns when all have run.

- Workers are created once, lazily at the first dispatch, at most `workers` of them (set from Python:
  graphc's thread count minus the caller). Between dispatches a worker spins on a generation counter
  (`pause`, with a sched_yield every YIELD_EVERY pauses so that a busy machine's other threads get the
  core; about SPIN_TICKS of the time-stamp counter), then sleeps on it with a futex.
- A dispatch publishes (fn, args, n), bumps the generation and wakes sleepers (one futex syscall, only
  when a worker sleeps; steered off the caller's CPU first, below). Chunks are claimed dynamically from
  one atomic word holding (generation << 32 | chunks left), so a worker that wakes late claims nothing
  of an old or finished job, and the CALLER runs chunks too: if every worker is descheduled (a busy
  machine) the caller simply runs all of them, at the cost of the publish (a few atomic stores) over
  one thread.
- A chunk's job fields are read only after a successful claim: the job cannot finish (and the next one
  cannot overwrite them) while a claimed chunk is pending.
- Dispatch is a try-lock: a second thread dispatching at the same time (two Python threads calling
  compiled functions, or a chunk dispatching again) runs its chunks inline, one after the other.
- After os.fork() the child has no workers: a fork hook resets the pool (workers are created again).
- Late dispatches are counted (`stats()["late"]`: the caller ran out of chunks and then waited more than
  LATE_TICKS for a worker's): the sign of another thread spinning on a worker's core.
- OpenBLAS's idle threads (`_bind_openblas`, `quiet_openblas`, `gc_pool_quiet_openblas`). After each threaded call (any NumPy product
  above its threshold) OpenBLAS's server threads busy-wait ~2^28 time-stamp ticks (~0.1 s; on x86 its
  YIELDING is a run of nops, no sched_yield) for the next job. On a 2-core host one of them shares a core
  with the pool's worker or the caller for that whole time, and a split kernel's other half finishes a
  scheduler slice late: W1 b256 on a 2-core Zen 2 took 2.9 ms right after a NumPy 512 x 512 product
  instead of 1.7 (the same as one thread). Measured (a shared machine, under load) and dropped: finer
  chunks (a descheduled worker still holds its chunk: 3.2-3.6 ms), workers that sleep on the futex
  between jobs once late (woken behind the spinner: 4.8 ms); threads pinned to cores showed the caller
  beside the spinner costs most (4-8 ms), the worker beside it ~2.7 ms. What pays is to stop
  the spinners: a dispatch that finds OpenBLAS's server up calls its blas_thread_shutdown_ (it joins
  its threads; OpenBLAS re-creates them lazily at its next threaded call, the path it takes after a
  fork: driver/others/blas_server.c, exec_blas -> blas_thread_init). Shutting down while another
  thread is inside a threaded OpenBLAS call would lose that call's jobs, so it is done only when the
  process has no thread but the caller, the pool's workers and OpenBLAS's own (/proc/self/stat's
  thread count; any other thread, a Python thread or another library's pool, and it is left alone).
  graphc's own BLAS calls pin OpenBLAS to one thread around each call (openblas_set_num_threads_local,
  which would re-create the threads at once): while the server is down `gc_pool_blas_threads` sets
  the count (blas_cpu_number) directly instead, which is all that call does with the server up and a
  count no larger than its threads. GRAPHC_QUIET_BLAS=0 turns this off.
- Steering a woken worker (`@steer`, `steer_workers`; GRAPHC_POOL_STEER=0 turns it off). A user loop that
  alternates a threaded NumPy product and a graphc call finds the worker asleep at each call (the product
  outlasts its spin). Traced with perf's sched events on the 2-core Zen 2 VM: the futex wake often placed
  the worker on the CALLER's CPU (where it had last run) just as the other CPU went idle (OpenBLAS's
  thread had exited there), and the idle CPU did not pull it over: the worker waited behind the caller
  until the caller had run both chunks itself (W1 b256 in that loop, clean windows: 2.06 ms median, the
  worker ran 0.76 chunks a dispatch; 1.69 ms without the products). So a dispatch that wakes sleepers
  first takes the caller's CPU out of each sleeping worker's mask (sched_setaffinity; not when nothing
  else would be left), and the worker puts back its own mask (read when it started) after that job:
  1.74 ms, one chunk each; the loop without products unchanged (1.68 ms); ~3 us more per wake. Only the
  first MAX_PLACED workers record their thread id and mask (the others are never steered); a fork clears
  them. Measured and dropped: a spin budget counting only time on a CPU (a descheduled worker stays
  runnable instead of sleeping; 0.73 chunks a dispatch, 1.80 ms).

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
#: a dispatch whose caller, out of chunks, waited more than this many ticks for the workers' counts as late
#: (stats()["late"]; ~50 us, a third of W1's smallest split product)
LATE_TICKS = 1 << 17
#: after the quieting of OpenBLAS was refused (other threads exist) the next look is this many ticks later
#: (~0.5 s at 2.5 GHz)
REFUSE_TICKS = 1 << 30
#: a spinning worker yields its core (sched_yield) once every this many pauses (~2 us)
YIELD_EVERY = 64

#: workers whose thread id and CPU mask the pool keeps (a dispatch steers only these; more are never steered)
MAX_PLACED = 256
#: the CPU masks' size: 1024 CPUs (a CPU numbered above, or a kernel with more, and nothing is steered)
MASK_WORDS = 16

_SYS_FUTEX, _FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE, _SYS_GETTID = 202, 128, 129, 186

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
; [dispatches through the pool, dispatches run inline because the pool was busy, chunks run by workers,
;  late dispatches (the caller waited more than LATE_TICKS for the workers' last chunks), OpenBLAS
;  shutdowns (its server threads joined), quiets refused (threads besides ours and OpenBLAS's), sleeping
;  workers steered off the caller's CPU before a wake]
@stats = internal global [7 x i64] zeroinitializer, align 64
; OpenBLAS (bind_openblas): addresses of blas_cpu_number, blas_num_threads, blas_server_avail (i32 each),
; openblas_set_num_threads_local and blas_thread_shutdown_; @ob_on: quieting enabled (null/0: off)
@ob_cpu = internal global ptr null, align 8
@ob_num = internal global ptr null, align 8
@ob_avail = internal global ptr null, align 8
@ob_setlocal = internal global ptr null, align 8
@ob_shutdown = internal global ptr null, align 8
@ob_on = internal global i32 0, align 4
; time-stamp tick before which no dispatch looks at the process's threads again (after a refusal: other
; threads exist, and reading /proc costs ~10 us: a process with other threads pays it once per REFUSE_TICKS)
@ob_next = internal global i64 0, align 8
@procstat = internal constant [16 x i8] c"/proc/self/stat\00"
; OpenBLAS's work buffers mapped in after its server's first shutdown (the slots its threads held are free
; then; jit.prefault_blas_buffers): blas_memory_alloc, blas_memory_free, madvise, and how many buffers
; (0: done, or off)
@ob_alloc = internal global ptr null, align 8
@ob_free = internal global ptr null, align 8
@ob_madvise = internal global ptr null, align 8
@ob_prefault = internal global i32 0, align 4
; per worker (the first MAX_PLACED): its thread id (0: unknown, never steered), its own CPU mask (read when it
; started), 1 while it is on the way to or in its futex sleep, 1 while the caller has narrowed its mask
@tids = internal global [PLACED_SLOTS x i32] zeroinitializer, align 64
@masks = internal global [PLACED_SLOTS x [MASK_WORDS x i64]] zeroinitializer, align 64
@asleep = internal global [PLACED_SLOTS x i32] zeroinitializer, align 64
@pinned = internal global [PLACED_SLOTS x i32] zeroinitializer, align 64
; a dispatch that wakes sleepers steers them off the caller's CPU (@steer; GRAPHC_POOL_STEER=0: off)
@steer_on = internal global i32 STEER_DEFAULT, align 4

declare i32 @pthread_create(ptr, ptr, ptr, ptr)
declare i64 @syscall(i64, ...)
declare i32 @sched_yield()
declare i64 @llvm.readcyclecounter()
declare void @llvm.x86.sse2.pause()
declare i32 @open(ptr, i32, ...)
declare i64 @read(i32, ptr, i64)
declare i32 @close(i32)
declare i32 @sched_setaffinity(i32, i64, ptr)
declare i32 @sched_getaffinity(i32, i64, ptr)
declare i32 @sched_getcpu()
declare i64 @llvm.vector.reduce.or.vMASK_WORDSi64(<MASK_WORDS x i64>)

; the number of threads of this process (field 20 of /proc/self/stat), or -1
define internal i64 @process_threads() nounwind noinline optnone {
entry:
  %buf = alloca [1024 x i8], align 16
  %fd = call i32 (ptr, i32, ...) @open(ptr @procstat, i32 0)
  %bad = icmp slt i32 %fd, 0
  br i1 %bad, label %fail, label %rd
rd:
  %got = call i64 @read(i32 %fd, ptr %buf, i64 1023)
  %c = call i32 @close(i32 %fd)
  %none = icmp slt i64 %got, 1
  br i1 %none, label %fail, label %findp
findp:                                     ; the last ')' (the command name may hold spaces and parens)
  %i = phi i64 [ %got, %rd ], [ %i1, %backp ]
  %i1 = sub i64 %i, 1
  %neg = icmp slt i64 %i1, 0
  br i1 %neg, label %fail, label %testp
testp:
  %pp = getelementptr i8, ptr %buf, i64 %i1
  %ch = load i8, ptr %pp
  %isp = icmp eq i8 %ch, 41
  br i1 %isp, label %fields, label %backp
backp:
  br label %findp
fields:                                    ; field 20 follows the 18th space after it
  %j = phi i64 [ %i1, %testp ], [ %j1, %nexts ]
  %sp = phi i64 [ 0, %testp ], [ %sp1, %nexts ]
  %j1 = add i64 %j, 1
  %end = icmp sge i64 %j1, %got
  br i1 %end, label %fail, label %looks
looks:
  %qp = getelementptr i8, ptr %buf, i64 %j1
  %cq = load i8, ptr %qp
  %iss = icmp eq i8 %cq, 32
  %inc = zext i1 %iss to i64
  %sp1 = add i64 %sp, %inc
  %there = icmp eq i64 %sp1, 18
  br i1 %there, label %digits, label %nexts
nexts:
  br label %fields
digits:
  %k = phi i64 [ %j1, %looks ], [ %k1, %digit ]
  %v = phi i64 [ 0, %looks ], [ %v1, %digit ]
  %k1 = add i64 %k, 1
  %end2 = icmp sge i64 %k1, %got
  br i1 %end2, label %done, label %lookd
lookd:
  %dp = getelementptr i8, ptr %buf, i64 %k1
  %cd = load i8, ptr %dp
  %cd64 = zext i8 %cd to i64
  %dv = sub i64 %cd64, 48
  %isd = icmp ult i64 %dv, 10
  br i1 %isd, label %digit, label %done
digit:
  %v10 = mul i64 %v, 10
  %v1 = add i64 %v10, %dv
  br label %digits
done:
  %some = icmp sgt i64 %v, 0
  %r = select i1 %some, i64 %v, i64 -1
  ret i64 %r
fail:
  ret i64 -1
}

; stop OpenBLAS's server threads (their spinning shares the cores with the pool: the module's docstring)
; when its server is up and no thread but the caller, the pool's workers and OpenBLAS's own exists
define void @gc_pool_quiet_openblas() nounwind noinline optnone {
entry:
  %on = load atomic i32, ptr @ob_on monotonic, align 4
  %enabled = icmp ne i32 %on, 0
  br i1 %enabled, label %check, label %out
check:
  %avp = load ptr, ptr @ob_avail, align 8
  %av = load atomic i32, ptr %avp monotonic, align 4
  %up = icmp ne i32 %av, 0
  br i1 %up, label %count, label %out
count:
  %now = call i64 @llvm.readcyclecounter()
  %next = load atomic i64, ptr @ob_next monotonic, align 8
  %wait = icmp ult i64 %now, %next
  br i1 %wait, label %out, label %look
look:
  %nump = load ptr, ptr @ob_num, align 8
  %num = load atomic i32, ptr %nump monotonic, align 4
  %have = load atomic i32, ptr @started monotonic, align 4
  %sum = add i32 %num, %have                       ; the caller + the workers + OpenBLAS's num - 1
  %want = sext i32 %sum to i64
  %t = call i64 @process_threads()
  %alone = icmp eq i64 %t, %want
  br i1 %alone, label %stop, label %refuse
stop:
  %sd = load ptr, ptr @ob_shutdown, align 8
  %r = call i32 %sd()
  call void @prefault_blas()
  %s4 = getelementptr [7 x i64], ptr @stats, i64 0, i64 4
  %x4 = atomicrmw add ptr %s4, i64 1 monotonic
  br label %out
refuse:
  %later = add i64 %now, REFUSE_TICKS
  store atomic i64 %later, ptr @ob_next monotonic, align 8
  %s5 = getelementptr [7 x i64], ptr @stats, i64 0, i64 5
  %x5 = atomicrmw add ptr %s5, i64 1 monotonic
  br label %out
out:
  ret void
}

; take the first @ob_prefault free OpenBLAS work buffers (the slots the next concurrent calls get), map in
; their first PREFAULT_BYTES (madvise MADV_POPULATE_READ: the shared zero page) and give them back; once
define internal void @prefault_blas() nounwind noinline {
entry:
  %held = alloca [PREFAULT_MAX x ptr], align 16
  %n = atomicrmw xchg ptr @ob_prefault, i32 0 monotonic
  %some = icmp sgt i32 %n, 0
  br i1 %some, label %go, label %out
go:
  %al = load ptr, ptr @ob_alloc, align 8
  %fr = load ptr, ptr @ob_free, align 8
  %ma = load ptr, ptr @ob_madvise, align 8
  br label %take
take:
  %i = phi i32 [ 0, %go ], [ %i1, %take ]
  %p = call ptr %al(i32 0)
  %ps = getelementptr [PREFAULT_MAX x ptr], ptr %held, i64 0, i32 %i
  store ptr %p, ptr %ps, align 8
  %i1 = add i32 %i, 1
  %more = icmp slt i32 %i1, %n
  br i1 %more, label %take, label %give
give:
  %j = phi i32 [ 0, %take ], [ %j1, %next ]
  %qs = getelementptr [PREFAULT_MAX x ptr], ptr %held, i64 0, i32 %j
  %q = load ptr, ptr %qs, align 8
  %nul = icmp eq ptr %q, null
  br i1 %nul, label %next, label %map
map:
  %m = call i32 %ma(ptr %q, i64 PREFAULT_BYTES, i32 MADV_POPULATE_READ)
  call void %fr(ptr %q)
  br label %next
next:
  %j1 = add i32 %j, 1
  %more2 = icmp slt i32 %j1, %n
  br i1 %more2, label %give, label %out
out:
  ret void
}

define void @gc_pool_set_prefault(ptr %alloc, ptr %free, ptr %madvise, i32 %n) nounwind noinline optnone {
entry:
  store ptr %alloc, ptr @ob_alloc, align 8
  store ptr %free, ptr @ob_free, align 8
  store ptr %madvise, ptr @ob_madvise, align 8
  store atomic i32 %n, ptr @ob_prefault seq_cst, align 4
  ret void
}

; graphc's BLAS calls set OpenBLAS's thread count through this (bound as gc_blas_set_threads; returns the
; previous count): openblas_set_num_threads_local, except while OpenBLAS's server is down (quieted), where
; that call would re-create its threads at once: then the count itself is set (its only other effect)
define i32 @gc_pool_blas_threads(i32 %n) nounwind {
entry:
  %avp = load ptr, ptr @ob_avail, align 8
  %av = load atomic i32, ptr %avp monotonic, align 4
  %up = icmp ne i32 %av, 0
  %nump = load ptr, ptr @ob_num, align 8
  %num = load atomic i32, ptr %nump monotonic, align 4
  %small = icmp slt i32 %n, 1
  %big = icmp sgt i32 %n, %num
  %o1 = or i1 %up, %small
  %other = or i1 %o1, %big
  br i1 %other, label %call, label %direct
call:
  %f = load ptr, ptr @ob_setlocal, align 8
  %r = call i32 %f(i32 %n)
  ret i32 %r
direct:
  %cp = load ptr, ptr @ob_cpu, align 8
  %prev = atomicrmw xchg ptr %cp, i32 %n monotonic
  ret i32 %prev
}

define void @gc_pool_set_openblas(ptr %cpu, ptr %num, ptr %avail, ptr %setlocal, ptr %shutdown, i32 %on) nounwind noinline optnone {
entry:
  store ptr %cpu, ptr @ob_cpu, align 8
  store ptr %num, ptr @ob_num, align 8
  store ptr %avail, ptr @ob_avail, align 8
  store ptr %setlocal, ptr @ob_setlocal, align 8
  store ptr %shutdown, ptr @ob_shutdown, align 8
  store atomic i64 0, ptr @ob_next monotonic, align 8
  store atomic i32 %on, ptr @ob_on seq_cst, align 4
  ret void
}

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
  %st = getelementptr [7 x i64], ptr @stats, i64 0, i64 2
  %old = atomicrmw add ptr %st, i64 %worker monotonic
  %left = atomicrmw sub ptr @pending, i64 1 release
  br label %loop
done:
  ret void
}

; the first MAX_PLACED workers note their thread id and CPU mask, so that a dispatch can steer them (@steer)
define internal ptr @worker(ptr %arg) nounwind {
entry:
  %a = ptrtoint ptr %arg to i64
  %s0 = trunc i64 %a to i32
  %idx0 = lshr i64 %a, 32
  %placed = icmp ult i64 %idx0, MAX_PLACED
  %idx = select i1 %placed, i64 %idx0, i64 MAX_PLACED       ; the others share a spare slot (tid 0)
  %asp = getelementptr [PLACED_SLOTS x i32], ptr @asleep, i64 0, i64 %idx
  %pinp = getelementptr [PLACED_SLOTS x i32], ptr @pinned, i64 0, i64 %idx
  %mp = getelementptr [PLACED_SLOTS x [MASK_WORDS x i64]], ptr @masks, i64 0, i64 %idx
  br i1 %placed, label %ident, label %wait
ident:
  %gm = call i32 @sched_getaffinity(i32 0, i64 MASK_BYTES, ptr %mp)
  %gmok = icmp eq i32 %gm, 0
  br i1 %gmok, label %settid, label %wait
settid:
  %tid = call i64 (i64, ...) @syscall(i64 SYS_GETTID)
  %tid32 = trunc i64 %tid to i32
  %tidp = getelementptr [PLACED_SLOTS x i32], ptr @tids, i64 0, i64 %idx
  store atomic i32 %tid32, ptr %tidp release, align 4
  br label %wait
wait:
  %seen = phi i32 [ %s0, %entry ], [ %s0, %ident ], [ %s0, %settid ], [ %cur, %ran ], [ %cur, %restore ]
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
  store atomic i32 1, ptr %asp seq_cst, align 4
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
  store atomic i32 0, ptr %asp seq_cst, align 4
  br label %spin
go:
  call void @work(i32 %cur, i64 1)
  ; a dispatch narrowed this worker's CPU mask to wake it away from the caller's CPU: give it back
  %pv = atomicrmw xchg ptr %pinp, i32 0 acq_rel
  %was = icmp ne i32 %pv, 0
  br i1 %was, label %restore, label %ran
restore:
  %rs = call i32 @sched_setaffinity(i32 0, i64 MASK_BYTES, ptr %mp)
  br label %wait
ran:
  br label %wait
}

; before a futex wake: each sleeping worker whose mask holds the caller's CPU gets that CPU taken out of its
; mask (its own mask back after its job: @worker). Woken after another library's threads kept both cores
; busy, the scheduler otherwise often queues the worker behind the caller on the caller's CPU (the other one
; idle), where it waits until the caller has run every chunk itself.
define internal void @steer() nounwind noinline {
entry:
  %buf = alloca <MASK_WORDS x i64>, align 16
  %cpu = call i32 @sched_getcpu()
  %bad = icmp slt i32 %cpu, 0
  %big = icmp sge i32 %cpu, MASK_BITS
  %no = or i1 %bad, %big
  br i1 %no, label %out, label %start
start:
  %n0 = load atomic i32, ptr @started monotonic, align 4
  %n64 = zext i32 %n0 to i64
  %capped = icmp ult i64 %n64, MAX_PLACED
  %n = select i1 %capped, i64 %n64, i64 MAX_PLACED
  %cpu64 = zext i32 %cpu to i64
  %word = lshr i64 %cpu64, 6
  %bit = and i64 %cpu64, 63
  %bm = shl i64 1, %bit
  %nbm = xor i64 %bm, -1
  br label %loop
loop:
  %i = phi i64 [ 0, %start ], [ %i1, %next ]
  %more = icmp ult i64 %i, %n
  br i1 %more, label %look, label %out
look:
  %ap = getelementptr [PLACED_SLOTS x i32], ptr @asleep, i64 0, i64 %i
  %as = load atomic i32, ptr %ap seq_cst, align 4
  %tp = getelementptr [PLACED_SLOTS x i32], ptr @tids, i64 0, i64 %i
  %tid = load atomic i32, ptr %tp acquire, align 4
  %sl = icmp ne i32 %as, 0
  %kn = icmp ne i32 %tid, 0
  %both = and i1 %sl, %kn
  br i1 %both, label %mask, label %next
mask:
  %mp = getelementptr [PLACED_SLOTS x [MASK_WORDS x i64]], ptr @masks, i64 0, i64 %i
  %m = load <MASK_WORDS x i64>, ptr %mp, align 8
  %w = extractelement <MASK_WORDS x i64> %m, i64 %word
  %has = and i64 %w, %bm
  %mine = icmp ne i64 %has, 0
  br i1 %mine, label %cut, label %next
cut:
  %w2 = and i64 %w, %nbm
  %m2 = insertelement <MASK_WORDS x i64> %m, i64 %w2, i64 %word
  %any = call i64 @llvm.vector.reduce.or.vMASK_WORDSi64(<MASK_WORDS x i64> %m2)
  %left = icmp ne i64 %any, 0
  br i1 %left, label %set, label %next
set:
  store <MASK_WORDS x i64> %m2, ptr %buf, align 16
  %rc = call i32 @sched_setaffinity(i32 %tid, i64 MASK_BYTES, ptr %buf)
  %ok = icmp eq i32 %rc, 0
  br i1 %ok, label %mark, label %next
mark:
  %pp = getelementptr [PLACED_SLOTS x i32], ptr @pinned, i64 0, i64 %i
  store atomic i32 1, ptr %pp release, align 4
  %s6 = getelementptr [7 x i64], ptr @stats, i64 0, i64 6
  %x6 = atomicrmw add ptr %s6, i64 1 monotonic
  br label %next
next:
  %i1 = add i64 %i, 1
  br label %loop
out:
  ret void
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
  call void @gc_pool_quiet_openblas()
  %have0 = load i32, ptr @started, align 4
  %need = icmp slt i32 %have0, %want
  br i1 %need, label %spawn, label %publish
spawn:
  %s = phi i32 [ %have0, %locked ], [ %s1, %spawned ]
  %g0z = zext i32 %g0 to i64
  %sz = zext i32 %s to i64
  %shi = shl i64 %sz, 32
  %wa = or i64 %shi, %g0z
  %warg = inttoptr i64 %wa to ptr
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
  %st0 = getelementptr [7 x i64], ptr @stats, i64 0, i64 0
  %x0 = atomicrmw add ptr %st0, i64 1 monotonic
  %sl = load atomic i32, ptr @sleepers seq_cst, align 4
  %sleeping = icmp sgt i32 %sl, 0
  br i1 %sleeping, label %wake, label %mine
wake:
  %son = load atomic i32, ptr @steer_on monotonic, align 4
  %steering = icmp ne i32 %son, 0
  br i1 %steering, label %steerw, label %wakenow
steerw:
  call void @steer()
  br label %wakenow
wakenow:
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
  %tf = call i64 @llvm.readcyclecounter()
  %waited = sub i64 %tf, %t0
  %late = icmp ugt i64 %waited, LATE_TICKS
  %late64 = zext i1 %late to i64
  %st3 = getelementptr [7 x i64], ptr @stats, i64 0, i64 3
  %x5 = atomicrmw add ptr %st3, i64 %late64 monotonic
  store atomic i32 0, ptr @lock release, align 4
  ret void
busy:
  %st1 = getelementptr [7 x i64], ptr @stats, i64 0, i64 1
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
  call void @llvm.memset.p0.i64(ptr @tids, i8 0, i64 PLACED_TID_BYTES, i1 false)
  call void @llvm.memset.p0.i64(ptr @asleep, i8 0, i64 PLACED_TID_BYTES, i1 false)
  call void @llvm.memset.p0.i64(ptr @pinned, i8 0, i64 PLACED_TID_BYTES, i1 false)
  ret void
}
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)

define void @gc_pool_set_steer(i32 %on) nounwind {
entry:
  store atomic i32 %on, ptr @steer_on monotonic, align 4
  ret void
}
"""


def ir() -> str:
    subs = {"PLACED_SLOTS": MAX_PLACED + 1, "MAX_PLACED": MAX_PLACED, "PLACED_TID_BYTES": 4 * (MAX_PLACED + 1),
            "MASK_WORDS": MASK_WORDS, "MASK_BYTES": 8 * MASK_WORDS, "MASK_BITS": 64 * MASK_WORDS,
            "STEER_DEFAULT": int(os.environ.get("GRAPHC_POOL_STEER", "1") != "0"), "SYS_GETTID": _SYS_GETTID,
            "LATE_TICKS": LATE_TICKS, "REFUSE_TICKS": REFUSE_TICKS, "SPIN_TICKS": SPIN_TICKS,
            "YIELD_TICKS": YIELD_TICKS, "YIELD_MASK": YIELD_EVERY - 1, "SYS_FUTEX": _SYS_FUTEX,
            "FUTEX_WAIT": _FUTEX_WAIT_PRIVATE, "FUTEX_WAKE": _FUTEX_WAKE_PRIVATE,
            "PREFAULT_MAX": jit.BLAS_PREFAULT_MAX, "PREFAULT_BYTES": jit.BLAS_PREFAULT_BYTES,
            "MADV_POPULATE_READ": jit.MADV_POPULATE_READ}
    text = _IR
    for k, v in subs.items():
        text = text.replace(k, str(v))
    return text


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
        names = ["gc_pool_run", "gc_pool_set_workers", "gc_pool_stats", "gc_pool_started", "gc_pool_after_fork",
                 "gc_pool_quiet_openblas", "gc_pool_blas_threads", "gc_pool_set_openblas", "gc_pool_set_steer",
                 "gc_pool_set_prefault"]
        c = compile_uncached(ir(), names)
        llvm.add_symbol("gc_pool_run", c.addresses["gc_pool_run"])
        st = {"compiled": c,   # owns the code: kept for the life of the process
              "run": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(c.addresses["gc_pool_run"]),
              "set_workers": ctypes.CFUNCTYPE(None, ctypes.c_int32)(c.addresses["gc_pool_set_workers"]),
              "stats": ctypes.CFUNCTYPE(ctypes.c_void_p)(c.addresses["gc_pool_stats"]),
              "started": ctypes.CFUNCTYPE(ctypes.c_int32)(c.addresses["gc_pool_started"]),
              "after_fork": ctypes.CFUNCTYPE(None)(c.addresses["gc_pool_after_fork"]),
              "quiet_openblas": ctypes.CFUNCTYPE(None)(c.addresses["gc_pool_quiet_openblas"]),
              "set_steer": ctypes.CFUNCTYPE(None, ctypes.c_int32)(c.addresses["gc_pool_set_steer"]),
              "steer": os.environ.get("GRAPHC_POOL_STEER", "1") != "0",
              "set_openblas": ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 5, ctypes.c_int32)(
                  c.addresses["gc_pool_set_openblas"]),
              "set_prefault": ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 3, ctypes.c_int32)(
                  c.addresses["gc_pool_set_prefault"]),
              "workers": 0}
        st["openblas"] = _bind_openblas(st)
        # the workers run the pool's code until the process ends: it must outlive interpreter shutdown
        # (module globals are cleared then; a freed engine under a spinning worker would crash the exit)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(c))
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=st["after_fork"])
        _state["pool"] = st
        return st


def _bind_openblas(st) -> bool:
    """Give the pool OpenBLAS's thread-server globals and functions (the library graphc's BLAS calls
    bind, NumPy's own: jit.bind_blas), so a dispatch can stop its spinning threads (module docstring).
    False (nothing bound, gc_blas_set_threads stays openblas_set_num_threads_local) when any is missing:
    another BLAS, or an OpenBLAS built without its pthread server."""
    b = jit.blas()
    if b is None:
        return False
    lib = b["lib"]
    # only OpenBLAS's own pthread server (get_parallel 1: 0 is a sequential build, 2 an OpenMP one, whose
    # threads are OpenMP's and whose thread-count call does more than set blas_cpu_number)
    par = next((getattr(lib, n) for n in ("openblas_get_parallel", "scipy_openblas_get_parallel64_",
                                          "scipy_openblas_get_parallel") if hasattr(lib, n)), None)
    if par is None:
        return False
    par.restype = ctypes.c_int
    if par() != 1:
        return False
    try:
        ints = [ctypes.addressof(ctypes.c_int.in_dll(lib, n))
                for n in ("blas_cpu_number", "blas_num_threads", "blas_server_avail")]
        fns = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value
               for n in ("openblas_set_num_threads_local", "blas_thread_shutdown_")]
    except (ValueError, AttributeError):
        return False
    st["openblas_args"] = (*ints, *fns)
    st["quiet"] = os.environ.get("GRAPHC_QUIET_BLAS", "1") != "0"
    st["set_openblas"](*st["openblas_args"], int(st["quiet"]))
    pf = b.get("prefault")
    if pf:   # after the first shutdown, map in the buffers OpenBLAS's threads held (jit.prefault_blas_buffers)
        libc = ctypes.CDLL(None)
        st["set_prefault"](*(ctypes.cast(f, ctypes.c_void_p).value
                             for f in (lib.blas_memory_alloc, lib.blas_memory_free, libc.madvise)), pf["count"])
    return True


def quiet_openblas(on: bool | None = None) -> bool:
    """Whether dispatches stop OpenBLAS's spinning threads (GRAPHC_QUIET_BLAS, default on); `on` sets it
    for this process (tests). Always False when the pool has no OpenBLAS bound."""
    st = bind()
    if not st["openblas"]:
        return False
    if on is not None:
        st["quiet"] = bool(on)
        st["set_openblas"](*st["openblas_args"], int(st["quiet"]))
    return st["quiet"]


def steer_workers(on: bool | None = None) -> bool:
    """Whether a dispatch that wakes sleeping workers first takes the caller's CPU out of their masks
    (GRAPHC_POOL_STEER, default on; module docstring); `on` sets it for this process (tests, A/B timing)."""
    st = bind()
    if on is not None:
        st["steer"] = bool(on)
        st["set_steer"](int(st["steer"]))
    return st["steer"]


def blas_threads_symbol():
    """The address to bind as gc_blas_set_threads (tune.set_threads_symbol): the pool's
    gc_pool_blas_threads when OpenBLAS's server is bound (it never re-creates quieted threads), else None."""
    st = bind()
    return st["compiled"].addresses["gc_pool_blas_threads"] if st["openblas"] else None


def compile_uncached(text: str, names: list[str], glue: bool = False):
    """JIT a small module kept out of the on-disk cache (the pool, once per process; the tuner's probes):
    the cache holds only the programs' code. glue: code whose own speed does not matter (a probe whose time
    is spent in BLAS calls), compiled without the O3 pipeline and with the fast instruction selector:
    ~6 ms instead of ~20 for a split-product probe on a 2-core Zen 1."""
    import llvmlite.binding as llvm
    jit.target_machine()
    with jit._lock:
        mod = llvm.parse_assembly(text)
        mod.verify()
        if not glue:
            jit.optimise(mod)
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), jit._new_tm(0 if glue else 3))
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


def _counters():
    """The pool's seven int64 counters, in place (stats' order)."""
    return (ctypes.c_int64 * 7).from_address(bind()["stats"]())


def late_count() -> int:
    """stats()["late"] alone (read around each step of a profiled run: program.step_times)."""
    return _counters()[3]


def stats() -> dict:
    """Counters since the process started: dispatches through the pool, dispatches run inline because
    another thread held the pool, chunks run by workers, late dispatches, OpenBLAS shutdowns and refusals,
    sleeping workers steered off the caller's CPU before a wake; and the workers started."""
    st = bind()
    arr = _counters()
    return {"dispatches": arr[0], "busy_inline": arr[1], "worker_chunks": arr[2], "late": arr[3],
            "openblas_quieted": arr[4], "openblas_left": arr[5], "steered": arr[6], "workers": st["started"]()}
