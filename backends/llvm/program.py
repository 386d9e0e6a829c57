"""Code generation for a plan (one native entry per run of kernels; host steps in between) and the
runtime: one pointer table per call, a per-thread arena, outputs allocated fresh for the caller."""
from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import re
import threading
import time

import numpy as np

from graphc._aligned import aligned_bytes
from graphc.backends.schedule.steps import HostStep, LoopStep

from . import gemm, jit, mathlib, pool, table
from .irtext import Emitter
from .kernels import Kernel, memo_key
from .plan import Plan

_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
#: kernels stay separate functions: inlined into one entry, O3 time grew super-linearly with graph size
#: (a 2,800-node gradient graph: 73 s -> 5 s with noinline); calls per kernel cost nothing measurable
#: (W3 b1, W4 timed both ways)
NOINLINE = " noinline"


def num_threads() -> int:
    """Threads for large elementwise kernels: GRAPHC_NUM_THREADS, else the cores this process may use."""
    env = os.environ.get("GRAPHC_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))


def _data_offset() -> int | None:
    """Byte offset of the data pointer inside an ndarray object (PyArrayObject_fields.data: 16 on
    64-bit CPython), found by probing a live array; None if it cannot be confirmed (the call then
    goes the slower way, through _address)."""
    probes = [np.empty(n, np.uint8) for n in (1, 3, 64)]
    for off in range(8, 64, 8):
        if all(ctypes.c_void_p.from_address(id(a) + off).value == a.ctypes.data for a in probes):
            return off
    return None


DATA_OFFSET = _data_offset()


def _address(a: np.ndarray) -> int:
    """Data pointer of an array (read from the array object where DATA_OFFSET is known; else
    c_char.from_buffer, and read-only/empty arrays through the array interface)."""
    if DATA_OFFSET is not None and type(a) is np.ndarray:
        return ctypes.c_void_p.from_address(id(a) + DATA_OFFSET).value or 0
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):
        return a.__array_interface__["data"][0]


class Slots:
    """Pointer-table layout: inputs, params, constants, outputs (roots), arena."""

    def __init__(self, plan: Plan):
        k = plan.kinds
        self.base = {"input": 0, "param": k["input"]}
        self.base["const"] = self.base["param"] + k["param"]
        self.base["out"] = self.base["const"] + k["const"]
        self.arena = self.base["out"] + k["out"]
        self.n = self.arena + 1

    def of(self, buf) -> tuple[int, int]:
        if buf.kind == "arena":
            return self.arena, buf.offset
        return self.base[buf.kind] + buf.index, 0


#: the name a kernel's definition is generated with, replaced by its content-derived name (_Gen.kernel)
_SELF = "@__graphc_kernel__"


def _kernel_fn(kern: Kernel, bufs: list, plan: Plan) -> str:
    """The kernel's definition, named _SELF, its buffer parameters by position (%b0, %b1, ...): two
    steps with the same body, shapes and dtypes get the same text, so one function serves both."""
    em = Emitter()
    P = {b: f"%b{i}" for i, b in enumerate(bufs)}
    if plan.bounds:   # sanitize="bounds": every access checked against its buffer (kernels.ptr_at)
        em.bounds = {b: plan.buffers[b].nbytes for b in bufs}
        em.status = P[plan.status.buf]
        node = getattr(kern, "node", None)
        op = f" of node {node.op.name}" if node is not None else ""
        em.code = plan.status_code(node, f"out-of-bounds memory access in the llvm {kern.name} kernel{op} "
                                         f"({kern.desc}): a graphc bug, please report it")
    kern.emit(em, P, "%lo", "%hi")
    params = ", ".join([f"ptr noalias %b{i}" for i in range(len(bufs))] + ["i64 %lo", "i64 %hi"])
    return em.function(f"define void {_SELF}({params}) nounwind{NOINLINE}{getattr(kern, 'fn_attrs', '')}")


def _declaration(name: str, n_ptrs: int) -> str:
    return f"declare void @{name}({', '.join(['ptr noalias'] * n_ptrs + ['i64', 'i64'])}) nounwind\n"


def _thunk(name: str, nb: int) -> str:
    """A pool chunk (pool.py: fn(args, c)): args is [pointers..., outer extent, chunks]; chunk c runs the
    kernel on [extent * c // chunks, extent * (c + 1) // chunks)."""
    lines = [f"define internal void @{name}_thunk(ptr %a, i64 %c) nounwind {{"]
    args = []
    for i in range(nb + 2):
        lines.append(f"  %q{i} = getelementptr i64, ptr %a, i64 {i}")
        lines.append(f"  %x{i} = load i64, ptr %q{i}")
        if i < nb:
            lines.append(f"  %p{i} = inttoptr i64 %x{i} to ptr")
            args.append(f"ptr %p{i}")
    lines += ["  %c1 = add i64 %c, 1", f"  %m0 = mul i64 %x{nb}, %c", f"  %m1 = mul i64 %x{nb}, %c1",
              f"  %lo = udiv i64 %m0, %x{nb + 1}", f"  %hi = udiv i64 %m1, %x{nb + 1}"]
    args += ["i64 %lo", "i64 %hi"]
    lines.append(f"  call void @{name}({', '.join(args)})")
    lines.append("  ret void\n}\n")
    return "\n".join(lines)


#: chunks per thread a split kernel's outer range is cut into (claimed dynamically by the pool's threads:
#: a thread that starts late, or is descheduled, leaves its share to the others); a kernel may ask for
#: its own count (`kern.chunks`: a GEMM split into blocks of columns, one BLAS call each)
CHUNKS_PER_THREAD = 4


def _chunks(kern: Kernel, nthreads: int) -> int:
    want = getattr(kern, "chunks", None) or nthreads * CHUNKS_PER_THREAD
    return max(1, min(kern.split, want))


def _parallel_call(em: Emitter, name: str, kern: Kernel, ptrs: list[str], nthreads: int) -> None:
    """Split the outer loop over the persistent pool (pool.py): the chunks of [0, kern.split) run on the
    calling thread and the pool's workers, whichever claims them first; returns when all have run."""
    nb = len(ptrs)
    blk = em.alloca(f"[{nb + 2} x i64]")
    for i, p in enumerate(ptrs):
        em.raw(f"store i64 {em(f'ptrtoint ptr {p} to i64')}, ptr {em(f'getelementptr i64, ptr {blk}, i64 {i}')}")
    chunks = _chunks(kern, nthreads)
    for i, v in enumerate((kern.split, chunks)):
        em.raw(f"store i64 {v}, ptr {em(f'getelementptr i64, ptr {blk}, i64 {nb + i}')}")
    # chunks calling BLAS run OpenBLAS on one thread each: its count is set around the whole dispatch (it is
    # one process-wide setting, so the chunks' own set-and-restore must not race back to a larger one)
    from . import tune
    pin = getattr(kern, "blas_pinned", False) and tune.set_threads_symbol() is not None
    prev = em("call i32 @gc_blas_set_threads(i32 1)") if pin else None
    em.raw(f"call void @gc_pool_run(ptr @{name}_thunk, ptr {blk}, i64 {chunks})")
    if pin:
        em(f"call i32 @gc_blas_set_threads(i32 {prev})")


class _Gen:
    """Emits segment functions; kernels are functions called with buffer pointers. Identical kernels
    (same text: body, shapes, dtypes) are one function, named after a hash of its text, defined once
    and called from every step that needs it."""

    def __init__(self, plan: Plan, slots: Slots, nthreads: int):
        self.plan, self.slots, self.nthreads = plan, slots, nthreads
        self.funcs: list[str] = []                  # the entry module's functions (thunks, entries)
        self.kernels: dict[str, str] = {}           # kernel definition (named _SELF) -> its name
        self.by_key: dict = {}                      # kernels.memo_key -> name (emitted once per key)
        self.defs: list[tuple[str, str, int]] = []  # (name, definition, pointer parameters), in order
        self.thunks: set[str] = set()
        self.calls = 0                              # kernel steps (a step in a scan body counts once)
        self.loops = 0                              # row-split loops rendered as part functions

    def kernel(self, step, bufs) -> str:
        """The name of the function computing `step` over `bufs` (defined at its first use)."""
        key = None if self.plan.bounds else memo_key(step, bufs)
        name = self.by_key.get(key) if key is not None else None
        if name is not None:
            return name
        text = _kernel_fn(step, bufs, self.plan)
        name = self.kernels.get(text)
        if name is None:
            digest = hashlib.sha1(text.encode()).hexdigest()[:16]
            name = f"k_{digest}_{re.sub(r'[^A-Za-z0-9_]', '_', step.name)}"
            self.kernels[text] = name
            self.defs.append((name, text.replace(_SELF, "@" + name, 1), len(bufs)))
        if key is not None:
            self.by_key[key] = name
        return name

    def load(self, em, ptrs, b) -> None:
        if b not in ptrs:
            slot, off = self.slots.of(self.plan.buffers[b])
            base = em(f"load ptr, ptr {em(f'getelementptr ptr, ptr %ptrs, i64 {slot}')}")
            ptrs[b] = em(f"getelementptr i8, ptr {base}, i64 {off}") if off else base

    def step(self, em, ptrs, step, parallel=True) -> None:
        if isinstance(step, LoopStep):
            self.loop(em, ptrs, step, parallel)
            return
        self.calls += 1
        bufs = sorted(set(step.bufs) | {self.plan.status.buf}) if self.plan.bounds else step.bufs
        kname = self.kernel(step, bufs)
        for b in bufs:
            self.load(em, ptrs, b)
        args = [ptrs[b] for b in bufs]
        if parallel and step.split and self.nthreads > 1:
            if kname not in self.thunks:
                self.thunks.add(kname)
                self.funcs.append(_thunk(kname, len(bufs)))
            _parallel_call(em, kname, step, args, self.nthreads)
        else:
            em.raw(f"call void @{kname}({', '.join(f'ptr {a}' for a in args)}, i64 0, i64 {step.outer})")

    def loop(self, em, ptrs, loop: LoopStep, parallel: bool = True) -> None:
        """for t in range(length): slice pointers for t (reversed when asked), then the body steps. A
        row-split loop (loop.parts) on more than one thread: each part's whole loop is a function, the
        parts dispatched over the pool at once (_parted_loop)."""
        if loop.parts and parallel and self.nthreads > 1:
            self._parted_loop(em, loop)
            return
        for b in sorted(loop.buffers()):
            self.load(em, ptrs, b)
        for b in loop.slices:
            self.load(em, ptrs, self.plan.buffers[b].index)

        def body(i):
            t = em(f"sub i64 {loop.length - 1}, {i}") if loop.reverse else i
            inner = dict(ptrs)
            for b in loop.slices:
                buf = self.plan.buffers[b]
                off = em(f"add i64 {em(f'mul i64 {t}, {buf.stride}')}, {buf.offset}")
                inner[b] = em(f"getelementptr i8, ptr {ptrs[buf.index]}, i64 {off}")
            for st in loop.body:
                self.step(em, inner, st, parallel)
        em.loop(loop.length, body)

    def _parted_loop(self, em, loop: LoopStep) -> None:
        """The parts of a row-split loop (schedule/rows.py) as pool chunks: part j is the function
        graphc_loop<k>_p<j>(ptrs) running the whole loop on its rows with its kernels inline (no dispatch
        inside); chunk j of the dispatch calls it. A worker that is late leaves its part to the caller."""
        name = f"graphc_loop{self.loops}"
        self.loops += 1
        for j, (a, b) in enumerate(loop.parts):
            pem = Emitter()
            part = LoopStep(loop.length, loop.reverse, loop.body[a:b], loop.slices, loop.name)
            self.loop(pem, {}, part, parallel=False)
            self.funcs.append(pem.function(f"define internal void @{name}_p{j}(ptr %ptrs) nounwind{NOINLINE}"))
        n = len(loop.parts)
        lines = [f"define internal void @{name}_thunk(ptr %a, i64 %c) nounwind {{",
                 "  %t = load ptr, ptr %a",
                 "  switch i64 %c, label %done [" + " ".join(f"i64 {j}, label %p{j}" for j in range(n)) + "]"]
        for j in range(n):
            lines += [f"p{j}:", f"  call void @{name}_p{j}(ptr %t)", "  br label %done"]
        lines += ["done:", "  ret void", "}", ""]
        self.funcs.append("\n".join(lines))
        blk = em.alloca("[1 x i64]")
        em.raw(f"store i64 {em('ptrtoint ptr %ptrs to i64')}, ptr {blk}")
        em.raw(f"call void @gc_pool_run(ptr @{name}_thunk, ptr {blk}, i64 {n})")


class Module:
    """The generated code of one specialisation: the declarations every module starts with (`head`),
    one definition per distinct kernel (each compiled as its own module, cached on disk by its text:
    shared by every graph that has it) and the entry module's functions (entries, thread thunks, the
    call wrapper), which call the kernels. `ir` is all of it as one module (f.source, f.asm)."""

    def __init__(self, head: str, kernels: list[tuple[str, str, int]], entry: str, calls: int):
        self.head, self.kernels, self.entry, self.calls = head, kernels, entry, calls

    @property
    def ir(self) -> str:
        return self.head + "".join(text + "\n" for _, text, _ in self.kernels) + self.entry

    @property
    def entry_ir(self) -> str:
        return self.head + "".join(_declaration(n, k) for n, _, k in self.kernels) + self.entry

    @property
    def kernel_irs(self) -> list[str]:
        return [self.head + text for _, text, _ in self.kernels]


def generate(plan: Plan, slots: Slots, nthreads: int, per_step: bool = False) -> tuple[Module, list]:
    """(module, segments): a segment is ('native', entry name) or ('host', HostStep).
    per_step=True gives every kernel its own entry (for profiling; the prologue's steps included, first).
    Otherwise the plan's prologue (steps computing parameter-derived values) is the entry PROLOGUE,
    which Specialised runs when a parameter it reads changed, and is not among the segments."""
    gen, segments, cur = _Gen(plan, slots, nthreads), [], None
    first = 0 if per_step else plan.prologue
    for step in plan.steps[first:]:
        if isinstance(step, HostStep):
            cur = None
            segments.append(("host", step))
            continue
        if cur is None or per_step:
            cur = (f"graphc_entry_{len(segments)}", [])
            segments.append(("native", cur))
        cur[1].append(step)
    out = []
    for kind, val in segments:
        if kind == "native":
            _entry_parts(gen, *val)
            out.append(("native", val[0]))
        else:
            out.append(("host", val))
    prologue = None
    if first:   # every prologue step is a kernel step (Schedule.hoist_prologue)
        prologue = PROLOGUE
        _entry_parts(gen, prologue, plan.steps[:first])
    n_arrays = plan.kinds["input"] + plan.kinds["param"] + plan.kinds["out"]
    if len(out) == 1 and out[0][0] == "native" and DATA_OFFSET is not None and (
            TUPLE_ITEMS is not None or n_arrays <= CALL_ARGS_MAX):
        gen.funcs.append(_call_wrapper(plan, slots, out[0][1], prologue))
    return Module(head(nthreads), gen.defs, "\n".join(gen.funcs), gen.calls), out


def head(nthreads: int) -> str:
    """The declarations every module starts with; making them also binds the symbols the code calls
    (BLAS, OpenBLAS's thread count, the pool and its workers): a program loaded from the cache without
    generating its text calls this before linking."""
    return (mathlib.DECLARATIONS + gemm.declarations() + "".join(table.DECLARATIONS) +
            pool.declarations(nthreads))


#: native steps per entry function at most: a longer run of steps is split into parts that the entry
#: calls in order (one function of 720 calls, each loading its buffers' pointers once, took LLVM's
#: register allocator 12 s on an 80-layer MLP step; the parts' time grows linearly)
ENTRY_PART = 48


#: the entry computing a specialisation's parameter-derived values (the plan's prologue)
PROLOGUE = "graphc_prologue"


def _entry_parts(gen: _Gen, name: str, steps: list) -> None:
    """The entry `name` running `steps` in order (in parts of at most ENTRY_PART steps)."""
    parts = [steps[i:i + ENTRY_PART] for i in range(0, len(steps), ENTRY_PART)]
    if len(parts) == 1:
        gen.funcs.append(_entry(gen, name, steps))
        return
    em = Emitter()   # the entry calls its parts in order
    for k, part in enumerate(parts):
        gen.funcs.append(_entry(gen, f"{name}_part{k}", part, "internal "))
        em.raw(f"call void @{name}_part{k}(ptr %ptrs)")
    gen.funcs.append(em.function(f"define void @{name}(ptr %ptrs) nounwind"))


def _entry(gen: _Gen, name: str, steps: list, linkage: str = "") -> str:
    """A function running `steps` in order on the pointer table %ptrs."""
    em, ptrs = Emitter(), {}
    for step in steps:
        gen.step(em, ptrs, step)
    return em.function(f"define {linkage}void @{name}(ptr %ptrs) nounwind{NOINLINE if linkage else ''}")


def _tuple_items_offset() -> int | None:
    """Byte offset of a tuple object's item pointers (PyTupleObject.ob_item: 24 on 64-bit CPython),
    found by probing; None if it cannot be confirmed (many arrays then go the slower way)."""
    probe = (object(), object(), object())
    for off in range(8, 64, 8):
        if all(ctypes.c_void_p.from_address(id(probe) + off + 8 * i).value == id(x) for i, x in enumerate(probe)):
            return off
    return None


TUPLE_ITEMS = _tuple_items_offset()
#: up to this many arrays, graphc_call takes each as an argument; more (an 80-layer model's parameters
#: and optimiser state: ~1,000) come as one tuple the wrapper walks in a loop (a function of 965
#: arguments took LLVM 8 s to compile)
CALL_ARGS_MAX = 64


def _python_api():
    """PyCFunction_NewEx (through ctypes), with the C-API functions graphc_call uses made known to the JIT;
    None where this Python does not offer them (graphc_call is then a ctypes function)."""
    if DATA_OFFSET is None:
        return None
    try:
        import llvmlite.binding as llvm
        api = ctypes.pythonapi
        for name in ("PyEval_SaveThread", "PyEval_RestoreThread", "Py_IncRef"):
            llvm.add_symbol(name, ctypes.cast(getattr(api, name), ctypes.c_void_p).value)
        llvm.add_symbol("_Py_NoneStruct", id(None))
        new = api.PyCFunction_NewEx
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.py_object, ctypes.py_object]
        return new
    except (AttributeError, ImportError, OSError):
        return None


class _MethodDef(ctypes.Structure):
    """CPython's PyMethodDef."""
    _fields_ = [("ml_name", ctypes.c_char_p), ("ml_meth", ctypes.c_void_p), ("ml_flags", ctypes.c_int),
                ("ml_doc", ctypes.c_char_p)]


#: graphc_call as a built-in function (METH_FASTCALL: a C array of the argument objects), bound to this
#: thread's pointer table: calling it costs ~0.2 us, a ctypes call of one tuple ~0.7 us, of 3 arrays 1.1 us
NEW_BUILTIN = _python_api()
METH_FASTCALL = 0x0080
_FASTCALL_DECLS = ("declare ptr @PyEval_SaveThread() nounwind\ndeclare void @PyEval_RestoreThread(ptr) nounwind\n"
                   "declare void @Py_IncRef(ptr) nounwind\n@_Py_NoneStruct = external global i8\n")


def _packed(n_arrays: int) -> bool:
    """Whether graphc_call takes its arrays as one tuple (ctypes converts each argument of a call: one
    tuple of 3 arrays cost 0.7 us against 1.1 us for 3 arguments) or one argument each (no tuple layout)."""
    return TUPLE_ITEMS is not None or n_arrays > CALL_ARGS_MAX


def _call_wrapper(plan: Plan, slots: Slots, entry: str, prologue: str | None = None) -> str:
    """graphc_call: stores the data pointer of each input, parameter and output array (read from the
    ndarray object) in its table slot, then runs the entry: one call per run instead of a ctypes address
    lookup per array (about 1 us each). Where this Python offers it (NEW_BUILTIN), a METH_FASTCALL
    built-in function graphc_call(table as self; arrays...) that releases the GIL around the entry; else
    a ctypes function graphc_call(table, tuple of the arrays), or graphc_call(table, arrays...) without a
    known tuple layout. With a prologue: it runs first when the table's word after its last slot
    (slots.n) is non-zero (the runtime sets it when a parameter the prologue reads changed), and that
    word is cleared."""
    slot_ids = (list(range(plan.kinds["input"] + plan.kinds["param"])) +
                [slots.base["out"] + j for j in range(plan.kinds["out"])])
    em = Emitter()
    head = "ptr %ptrs"
    fastcall = NEW_BUILTIN is not None

    def run():
        if fastcall:
            em.raw("%ts = call ptr @PyEval_SaveThread()")
        if prologue:
            flag = em(f"getelementptr ptr, ptr %ptrs, i64 {slots.n}")

            def first():
                em.raw(f"call void @{prologue}(ptr %ptrs)")
                em.raw(f"store i64 0, ptr {flag}")
            em.if_(em(f"icmp ne i64 {em(f'load i64, ptr {flag}')}, 0"), first)
        em.raw(f"call void @{entry}(ptr %ptrs)")
        if fastcall:
            em.raw("call void @PyEval_RestoreThread(ptr %ts)")
            em.raw("call void @Py_IncRef(ptr @_Py_NoneStruct)")
    if fastcall:
        em.raw(f"%ptrs = load ptr, ptr {em(f'getelementptr i8, ptr %self, i64 {DATA_OFFSET}')}")
    if fastcall and len(slot_ids) <= CALL_ARGS_MAX:
        for k, slot in enumerate(slot_ids):
            arr = em(f"load ptr, ptr {em(f'getelementptr ptr, ptr %args, i64 {k}')}")
            data = em(f"load ptr, ptr {em(f'getelementptr i8, ptr {arr}, i64 {DATA_OFFSET}')}")
            em.raw(f"store ptr {data}, ptr {em(f'getelementptr ptr, ptr %ptrs, i64 {slot}')}")
    elif fastcall or _packed(len(slot_ids)):
        n_in = plan.kinds["input"] + plan.kinds["param"]
        items, items_off = ("%args", 0) if fastcall else ("%a0", TUPLE_ITEMS)
        for first, count, slot0 in ((0, n_in, 0), (n_in, plan.kinds["out"], slots.base["out"])):
            def store(j, first=first, slot0=slot0):
                item = em(f"add i64 {j}, {first}")
                off = em(f"add i64 {em(f'mul i64 {item}, 8')}, {items_off}")
                arr = em(f"load ptr, ptr {em(f'getelementptr i8, ptr {items}, i64 {off}')}")
                data = em(f"load ptr, ptr {em(f'getelementptr i8, ptr {arr}, i64 {DATA_OFFSET}')}")
                slot = em(f"add i64 {j}, {slot0}")
                em.raw(f"store ptr {data}, ptr {em(f'getelementptr ptr, ptr %ptrs, i64 {slot}')}")
            em.loop(count, store)
        if not fastcall:
            run()
            return em.function(f"define void @graphc_call({head}, ptr %a0) nounwind")
    if fastcall:
        run()
        return _FASTCALL_DECLS + em.function("define ptr @graphc_call(ptr %self, ptr %args, i64 %nargs) nounwind",
                                             "ret ptr @_Py_NoneStruct")
    for k, slot in enumerate(slot_ids):
        data = em(f"load ptr, ptr {em(f'getelementptr i8, ptr %a{k}, i64 {DATA_OFFSET}')}")
        em.raw(f"store ptr {data}, ptr {em(f'getelementptr ptr, ptr %ptrs, i64 {slot}')}")
    run()
    params = ", ".join([head] + [f"ptr %a{k}" for k in range(len(slot_ids))])
    return em.function(f"define void @graphc_call({params}) nounwind")


#: a specialisation whose constants take more bytes than this is not stored in the warm-start cache (its
#: entry carries the constants: a graph with a large constant array recompiles from the object cache)
WARM_CONSTS_MAX = 64 << 20


def _settings() -> tuple:
    """What a restored specialisation's plan depends on besides the graph: the patched graphc globals
    (graphc/_modstate.py) and the environment (the warm key's parts; backends/schedule/warm.py)."""
    from graphc.backends.schedule import warm
    return warm.module_state(), warm.environment()


class Specialised:
    """The compiled code for one set of dim values: made from a plan (compiled, or its object code
    from the cache), or restored from a warm-start entry (`restore`: no plan, no IR; both are made
    again when asked for, by `.plan` and `.ir`)."""

    def __init__(self, plan: Plan, per_step: bool = False, warm: str | None = None):
        self._plan = plan
        self.slots = Slots(plan)
        # bounds checking runs kernels on one thread (the parallel thunks pass no status word)
        nthreads = 1 if plan.bounds else num_threads()
        t0 = time.perf_counter()
        mod, segs = generate(plan, self.slots, nthreads, per_step)
        lowering = time.perf_counter() - t0
        self._ir = mod.ir
        names = [v for k, v in segs if k == "native"]
        wrapped = "@graphc_call(" in mod.entry
        # the prologue (parameter-derived values: plan.prologue steps) is an entry of its own, run when a
        # parameter it reads is a different array than at this thread's last run (per_step: a segment)
        has_prologue = bool(plan.prologue) and not per_step
        self.compiled = jit.compile_program(mod.head, mod.kernel_irs, mod.entry_ir, self._ir,
                                            names + ["graphc_call"] * wrapped + [PROLOGUE] * has_prologue)
        jit.perf_map(self.compiled, [n for n, _, _ in mod.kernels] + names)   # GRAPHC_PERF_MAP=1
        #: kernel steps planned, and distinct kernel functions compiled for them
        self.kernel_calls, self.kernel_functions = mod.calls, len(mod.kernels)
        #: seconds per phase: IR generation, then LLVM's (jit.compile_program: optimisation, machine code,
        #: loading; zero optimisation and machine code when the cache had the program)
        self.times = {"lowering": lowering, **self.compiled.times}
        g = plan.graph
        self._setup(segs, wrapped, has_prologue, plan.prologue_params, plan.kinds,
                    [(plan.shape(t), np.dtype(t.dtype)) for t in g.roots], len(g.outputs), plan.consts,
                    None if plan.status is None else plan.buffers[plan.status.buf].offset, plan.arena_bytes)
        self.fallback = plan.fallback
        self.warm = False
        if warm is not None and not per_step and not plan.bounds and all(k == "native" for k, _ in segs) \
                and getattr(self.compiled, "key", None) and sum(c.nbytes for c in plan.consts) <= WARM_CONSTS_MAX:
            from . import tune
            _store_entry(warm, {
                "program": self.compiled.key, "objects": self.compiled.objects, "names": names,
                "wrapped": wrapped, "prologue": has_prologue, "prologue_params": list(plan.prologue_params),
                "kinds": plan.kinds, "arena_bytes": plan.arena_bytes, "nthreads": nthreads,
                "roots": [[list(s), d.name] for s, d in self.roots], "n_out": self.n_out, "status": self._status,
                "fallback": sorted(plan.fallback), "kernel_calls": self.kernel_calls,
                "kernel_functions": self.kernel_functions,
                "decisions": [list(d) for d in tune.decisions.get(plan, ())]}, plan.consts)

    @classmethod
    def restore(cls, name: str, make_plan) -> "Specialised | None":
        """The specialisation the warm-start entry `name` describes (its object code loaded by key), or
        None: no entry, a damaged one, the program's objects missing, or a tuner decision its plan used
        that the tuner would not give now (tune.decided: another stored answer; or none, on a quiet machine,
        where the tuner times it again and keeps the result: a busy one keeps only a split). `make_plan()`
        makes the plan when something asks for it (f.explain, f.source, a run-time error's message)."""
        from graphc.backends.schedule import warm as _warm
        from . import tune
        t0 = time.perf_counter()
        got = _warm.load(name)
        if got is None:
            return None
        e, consts = got
        busy = None
        for n, k, m, dtype, threads in e["decisions"]:
            now = tune.decided(n, k, m, dtype)
            if now is None:   # the tuner knows no answer: on a quiet machine it would time the product
                if busy is None:   # now (a miss); on a busy one the entry's answer stands
                    busy = tune._busy()
                if not busy:
                    return None
            elif now[0] != threads:
                return None
        head(e["nthreads"])   # binds the symbols the objects call
        self = cls.__new__(cls)
        self._plan, self._make_plan = None, make_plan
        # the settings the plan will be made again under (f.source, f.explain, a run-time error's node)
        self._settings = _settings()
        wrapped, has_prologue = e["wrapped"], e["prologue"]
        self.compiled = jit.load_program(e["program"], e["objects"],
                                         e["names"] + ["graphc_call"] * wrapped + [PROLOGUE] * has_prologue,
                                         lambda: self.ir)
        if self.compiled is None:
            return None
        self._ir = None
        self.slots = Slots(_Kinds(e["kinds"]))
        self.kernel_calls, self.kernel_functions = e["kernel_calls"], e["kernel_functions"]
        self.fallback = set(e["fallback"])
        self.decisions = [tuple(d) for d in e["decisions"]]
        self._setup([("native", v) for v in e["names"]], wrapped, has_prologue, tuple(e["prologue_params"]),
                    e["kinds"], [(tuple(s), np.dtype(d)) for s, d in e["roots"]], e["n_out"], consts,
                    e["status"], e["arena_bytes"])
        self.warm = True
        self.times = {"lowering": 0.0, "llvm_opt": 0.0, "machine_code": 0.0, "load": time.perf_counter() - t0}
        return self

    def _setup(self, segs, wrapped, has_prologue, prologue_params, kinds, roots, n_out, consts, status, arena_bytes):
        self.segments = [(k, _ENTRY(self.compiled.addresses[v]) if k == "native" else v) for k, v in segs]
        self.single = len(self.segments) == 1 and self.segments[0][0] == "native"
        n_arrays = kinds["input"] + kinds["param"] + kinds["out"]
        self.packed = _packed(n_arrays)   # graphc_call takes one tuple of the arrays
        #: graphc_call is a METH_FASTCALL function: each thread calls its own built-in function object,
        #: bound to its table (_table)
        self.fastcall = wrapped and NEW_BUILTIN is not None
        self._def = (_MethodDef(b"graphc_call", self.compiled.addresses["graphc_call"], METH_FASTCALL, None)
                     if self.fastcall else None)
        self.call = (ctypes.CFUNCTYPE(None, ctypes.c_void_p, *[ctypes.py_object] * (1 if self.packed else n_arrays))(
            self.compiled.addresses["graphc_call"]) if wrapped and not self.fastcall else None)
        self.prologue = _ENTRY(self.compiled.addresses[PROLOGUE]) if has_prologue else None
        idx = prologue_params
        self._prologue_params = tuple(idx) if has_prologue else None
        #: params -> the arrays the prologue reads (compared by identity with those of the last run)
        self._pick = (None if not has_prologue else (lambda params: ()) if not idx else
                      (lambda params, i=idx[0]: (params[i],)) if len(idx) == 1 else operator.itemgetter(*idx))
        self.roots = roots
        self.n_out = n_out
        self.consts = [c.ctypes.data for c in consts]
        self._keep = consts
        self.arena_bytes = arena_bytes
        self._tls = threading.local()
        self._status = status
        self.run = self._runner()

    @property
    def plan(self) -> Plan:
        """The plan (made again, from the optimised graph, for a specialisation restored from the cache)."""
        if self._plan is None:
            if _settings() != self._settings:
                from graphc.errors import GraphcError
                raise GraphcError(
                    "this function was started from the warm-start cache and its plan (for f.source, f.asm, "
                    "f.explain or a run-time error's node) is made when first asked for, but graphc's settings "
                    "changed since it was compiled (a patched module constant or function, or a GRAPHC_*/BLAS "
                    "environment variable): the plan made now would not be the code that runs. Ask before "
                    "changing them, or compile with GRAPHC_WARM_CACHE=0")
            self._plan = self._make_plan()
        return self._plan

    @property
    def ir(self) -> str:
        """The program's LLVM IR (generated again from the plan for a restored specialisation)."""
        if self._ir is None:
            self._ir = generate(self.plan, Slots(self.plan), 1 if self.plan.bounds else num_threads())[0].ir
        return self._ir

    def _arena(self) -> np.ndarray:
        a = getattr(self._tls, "arena", None)
        if a is None:   # one per thread: concurrent calls never share scratch memory
            a = aligned_bytes(self.arena_bytes or 1)
            if self._status is not None:
                a[self._status:self._status + 8] = 0
            self._tls.arena = a
        return a

    def _table(self):
        """This thread's pointer table with the constant and arena slots filled in."""
        tls = self._tls
        t = getattr(tls, "table", None)
        if t is None:   # one word more: graphc_call's "run the prologue first" flag
            t = (ctypes.c_void_p * (self.slots.n + 1))()
            c0 = self.slots.base["const"]
            for i, a in enumerate(self.consts):
                t[c0 + i] = a
            t[self.slots.arena] = self._arena().ctypes.data
            # pro: the parameter arrays the prologue last ran on in this thread (its results live in this
            # thread's arena)
            tls.table, tls.addr, tls.params, tls.pro = t, ctypes.addressof(t), None, None
            if self.fastcall:   # the built-in graphc_call with this table as its self
                tls.fast = NEW_BUILTIN(ctypes.addressof(self._def), np.frombuffer(t, np.uintp), None)
        return t

    def _runner(self):
        """run(inputs, params) -> (outputs, update values): fresh output arrays, this thread's table and
        arena; the prologue first when a parameter it reads is another array than at this thread's last
        run (set_value and updates= install new arrays; parameter arrays are read-only, so the same
        array is the same value). The common case (one native entry) is one ctypes call."""
        call, tls, roots, n_out, pick, table = self.call, self._tls, self.roots, self.n_out, self._pick, self._table
        status, empty, same, flag = self._status is not None, np.empty, operator.is_, self.slots.n
        if self.fastcall:   # generated, unrolled over the outputs (a comprehension cost 0.3 us more)
            k = len(roots) if len(roots) <= 16 else None
            env = {"empty": empty, "tls": tls, "table": table, "pick": pick, "same": same, "flag": flag,
                   "check": self._check_status, "roots": roots, "n_out": n_out}
            outs = [f"o{j}" for j in range(k or 0)]
            for j, (shape, dtype) in enumerate(roots[:16]):
                env[f"S{j}"], env[f"D{j}"] = shape, dtype
            lines = ["def run(inputs, params):"]
            lines += [f"    {o} = empty(S{j}, D{j})" for j, o in enumerate(outs)] if k is not None else \
                ["    outs = [empty(s, d) for s, d in roots]"]
            lines += ["    try:", "        call = tls.fast", "    except AttributeError:", "        table()",
                      "        call = tls.fast"]
            if pick is not None:   # graphc_call runs the prologue first when the word is set (and clears it)
                lines += ["    cur, last = pick(params), tls.pro",
                          "    if last is None or not all(map(same, cur, last)):",
                          "        tls.table[flag] = 1", "        tls.pro = cur"]
            lines.append(f"    call(*inputs, *params, {', '.join(outs)})" if k is not None else
                         "    call(*inputs, *params, *outs)")
            if status:
                lines.append("    check()")
            lines.append(f"    return [{', '.join(outs[:n_out])}], [{', '.join(outs[n_out:])}]" if k is not None else
                         "    return outs[:n_out], outs[n_out:]")
            exec("\n".join(lines), env)   # noqa: S102 (generated from the output count only)
            run = env["run"]
            run.direct = self._direct(env)
            return run
        if call is None:
            return self._run_segments
        packed = self.packed

        def run(inputs, params):
            outs = [empty(s, d) for s, d in roots]
            try:
                addr = tls.addr
            except AttributeError:   # this thread's first call
                table()
                addr = tls.addr
            if pick is not None:
                cur, last = pick(params), tls.pro
                if last is None or not all(map(same, cur, last)):
                    tls.table[flag] = 1   # graphc_call runs the prologue first (and clears the word)
                    tls.pro = cur
            if packed:
                call(addr, (*inputs, *params, *outs))
            else:
                call(addr, *inputs, *params, *outs)
            if status:
                self._check_status()
            return outs[:n_out], outs[n_out:]
        return run

    def _direct(self, env: dict):
        """direct(input arrays..., parameter arrays...) -> the one output, or the list of outputs: run() for
        gc.function's fast path without the argument and result lists (with them the call of a 4-element
        function took 3.3 us on a 2-core Zen 1, without 2.45). None where the arrays are too many to name (run() serves) or the program writes
        updates (their values go back through run())."""
        n_in, n_par = self.slots.base["param"], self.slots.base["const"] - self.slots.base["param"]
        roots = self.roots
        if self.n_out != len(roots) or not roots or len(roots) > 16 or n_in + n_par + len(roots) > CALL_ARGS_MAX:
            return None
        ins, pars = [f"i{j}" for j in range(n_in)], [f"p{j}" for j in range(n_par)]
        outs = [f"o{j}" for j in range(len(roots))]
        lines = [f"def direct({', '.join(ins + pars)}):"]
        lines += [f"    {o} = empty(S{j}, D{j})" for j, o in enumerate(outs)]
        lines += ["    try:", "        call = tls.fast", "    except AttributeError:", "        table()",
                  "        call = tls.fast"]
        idx = self._prologue_params
        if idx is not None:   # the prologue's parameters: the same identity check as run()'s
            cur = "(" + "".join(f"p{i}, " for i in idx) + ")"
            lines += [f"    cur, last = {cur}, tls.pro",
                      "    if last is None or not all(map(same, cur, last)):",
                      "        tls.table[flag] = 1", "        tls.pro = cur"]
        lines.append(f"    call({', '.join(ins + pars + outs)})")
        if self._status is not None:
            lines.append("    check()")
        lines.append(f"    return {outs[0]}" if len(outs) == 1 else f"    return [{', '.join(outs)}]")
        exec("\n".join(lines), env)   # noqa: S102 (generated from the array counts only)
        return env["direct"]

    def _run_segments(self, inputs, params):
        """run() for a program with host steps (or without the call wrapper): the table filled here."""
        outs = [np.empty(s, d) for s, d in self.roots]
        table = self._table()
        tls = self._tls
        n_in = len(inputs)
        if params and (tls.params is None or any(p is not q for p, q in zip(params, tls.params))):
            table[n_in:n_in + len(params)] = [_address(p) for p in params]
            tls.params = list(params)   # set_value swaps the array: the identity check sees it
        if n_in:
            table[0:n_in] = [_address(a) for a in inputs]
        o0 = self.slots.base["out"]
        table[o0:o0 + len(outs)] = [_address(o) for o in outs]
        if self._pick is not None:
            cur, last = self._pick(params), tls.pro
            if last is None or not all(map(operator.is_, cur, last)):
                self.prologue(tls.addr)
                tls.pro = cur
        if self.single:
            self.segments[0][1](tls.addr)
        else:
            bases = None
            for kind, seg in self.segments:
                if kind == "native":
                    seg(tls.addr)
                else:
                    bases = bases or self._bases(inputs, params, outs, self._arena())
                    self._host(seg, bases)
        if self._status is not None:
            self._check_status()
        return outs[:self.n_out], outs[self.n_out:]

    def _check_status(self) -> None:
        """Raise (after resetting it) if a kernel recorded a bad index or access this call."""
        word = self._arena()[self._status:self._status + 8].view(np.int64)
        code = int(word[0])
        if code:
            word[0] = 0
            raise self.plan.status_error(code)

    def _bases(self, inputs, params, outs, arena):
        flat = lambda a: a.reshape(-1).view(np.uint8)   # noqa: E731
        return {"input": [flat(a) for a in inputs], "param": [flat(p) for p in params],
                "const": [flat(c) for c in self.plan.consts], "out": [flat(o) for o in outs], "arena": arena}

    def _host(self, step: HostStep, bases) -> None:
        step.run(lambda v: self.plan.host_array(v, bases), self.plan.dims)


class _Kinds:
    """What Slots reads of a plan (its buffer counts by kind), for a restored specialisation."""

    def __init__(self, kinds: dict):
        self.kinds = kinds


def _store_entry(name: str, head: dict, consts) -> None:
    from graphc.backends.schedule import warm as _warm
    _warm.store(name, head, consts)


def profile(f, *args, repeat: int = 20) -> list[tuple[float, str]]:
    """Median seconds per step of llvm-compiled Function `f` on `args` (each kernel timed alone)."""
    import time
    values, dims = f._bind(args, {})
    prog = f.program
    base = prog._specs.get(tuple(sorted(dims.items()))) or prog._specialise(dims)
    spec = Specialised(base.plan, per_step=True)
    params = [p.value for p in f._params]
    outs = [np.empty(s, d) for s, d in spec.roots]
    arena = spec._arena()
    addrs = ([a.ctypes.data for a in values] + [p.ctypes.data for p in params] + spec.consts +
             [o.ctypes.data for o in outs] + [arena.ctypes.data])
    table = (ctypes.c_void_p * len(addrs))(*addrs)
    bases = spec._bases(values, params, outs, arena)
    times = []
    for (kind, seg), step in zip(spec.segments, [s for s in spec.plan.steps]):
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            seg(ctypes.addressof(table)) if kind == "native" else spec._host(seg, bases)
            ts.append(time.perf_counter() - t0)
        label = f"host {seg.node.op.name}" if kind == "host" else f"{step.name} {getattr(step, 'desc', '')}"
        if len(times) < spec.plan.prologue:
            label += " (prologue: once per parameter change)"
        times.append((float(np.median(ts)), label))
    return times


_NOP: list = []


def _nop_entry():
    """An empty native entry, called the way step_times calls a step (its cost is the timing overhead)."""
    if not _NOP:
        c = jit.compile_ir("define void @graphc_nop(ptr %p) nounwind {\n  ret void\n}\n", ["graphc_nop"])
        _NOP.append((c, _ENTRY(c.addresses["graphc_nop"])))
    return _NOP[0][1]


def step_times(spec: Specialised, inputs, params):
    """A per-step profiler of one specialisation (f.explain()): the same plan compiled with one native
    entry per top-level step (the kernels are the same functions; a scan loop is one step), bound to
    `inputs`/`params`. Returns (steps, run, overhead): run() runs every step once, in order, and returns
    each one's seconds (perf_counter around the call from the host); `overhead` is the median time of an
    empty native entry called the same way (what a native step's figure includes beyond its kernels).
    The plan's prologue steps (parameter-derived values, computed once, not per call) run once here
    and report 0 s."""
    import time
    prof = Specialised(spec.plan, per_step=True)
    outs = [np.empty(s, d) for s, d in prof.roots]
    # the function's own arena (this thread's: the same plan, the same layout), so the steps read the
    # prologue's packed weights where the timed calls read them: a second copy would double the weights'
    # share of the caches (W1 b1's 2.1 MB packed twice outgrew the Xeon's 2 x 2 MB L2, each GEMV step
    # timed at 1.2x a whole call). Not with a status word (checked in the profiler's own arena)
    shared = prof._status is None and spec._status is None and spec.arena_bytes == prof.arena_bytes
    arena = spec._arena() if shared else prof._arena()
    addrs = ([a.ctypes.data for a in inputs] + [p.ctypes.data for p in params] + prof.consts +
             [o.ctypes.data for o in outs] + [arena.ctypes.data])
    table = (ctypes.c_void_p * len(addrs))(*addrs)
    addr = ctypes.addressof(table)
    bases = prof._bases(inputs, params, outs, arena)
    clock = time.perf_counter
    once = spec.plan.prologue
    for kind, seg in prof.segments[:once]:
        seg(addr)

    from . import pool
    late = pool.late_count

    def run() -> list[float]:
        out = [0.0] * once
        for k, (kind, seg) in enumerate(prof.segments[once:], once):
            before = late()
            t0 = clock()
            if kind == "native":
                seg(addr)
            else:
                prof._host(seg, bases)
            out.append(clock() - t0)
            run.late[k] += late() - before
        run.runs += 1
        if prof._status is not None:
            prof._check_status()
        return out
    # per step: the pool's late dispatches over the runs (the caller out of chunks waited for a worker's:
    # the threads' shares uneven, or a thread descheduled); run.runs: the runs counted
    run.late, run.runs = [0] * len(prof.segments), 0
    nop, ts = _nop_entry(), []
    for _ in range(101):
        t0 = clock()
        nop(addr)
        ts.append(clock() - t0)
    run.keep = (table, outs, arena, inputs, params)   # the table points into these
    return list(prof.plan.steps), run, float(np.median(ts))
