"""Code generation for a plan (one native entry per run of kernels; host steps in between) and the
runtime: one pointer table per call, a per-thread arena, outputs allocated fresh for the caller."""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from graphc.backends.schedule.steps import HostStep, LoopStep

from . import gemm, jit, mathlib
from .irtext import Emitter
from .kernels import Kernel
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
    """Data pointer of an array (c_char.from_buffer is the fast path; read-only/empty arrays fall back)."""
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


def _kernel_fn(name: str, kern: Kernel, bufs: list, plan: Plan) -> str:
    em = Emitter()
    P = {b: f"%b{b}" for b in bufs}
    if plan.bounds:   # sanitize="bounds": every access checked against its buffer (kernels.ptr_at)
        em.bounds = {b: plan.buffers[b].nbytes for b in bufs}
        em.status = P[plan.status.buf]
        node = getattr(kern, "node", None)
        op = f" of node {node.op.name}" if node is not None else ""
        em.code = plan.status_code(node, f"out-of-bounds memory access in the llvm {kern.name} kernel{op} "
                                         f"({kern.desc}): a graphc bug, please report it")
    kern.emit(em, P, "%lo", "%hi")
    params = ", ".join([f"ptr noalias %b{b}" for b in bufs] + ["i64 %lo", "i64 %hi"])
    return em.function(f"define internal void @{name}({params}) nounwind{NOINLINE}")


def _thunk(name: str, kern: Kernel) -> str:
    """A pthread start routine: unpacks [pointers..., lo, hi] and runs the kernel on that range."""
    nb = len(kern.bufs)
    lines = [f"define internal ptr @{name}_thunk(ptr %a) nounwind {{"]
    args = []
    for i in range(nb + 2):
        lines.append(f"  %q{i} = getelementptr i64, ptr %a, i64 {i}")
        lines.append(f"  %x{i} = load i64, ptr %q{i}")
        if i < nb:
            lines.append(f"  %p{i} = inttoptr i64 %x{i} to ptr")
            args.append(f"ptr %p{i}")
    args += [f"i64 %x{nb}", f"i64 %x{nb + 1}"]
    lines.append(f"  call void @{name}({', '.join(args)})")
    lines.append("  ret ptr null\n}\n")
    return "\n".join(lines)


def _parallel_call(em: Emitter, name: str, kern: Kernel, ptrs: list[str], nthreads: int) -> None:
    """Split the outer loop: threads 1..T-1 via pthread_create, chunk 0 on the caller, then join."""
    n, nb = kern.split, len(kern.bufs)
    bounds = [n * t // nthreads for t in range(nthreads + 1)]
    tids = []
    for t in range(1, nthreads):
        blk = em.alloca(f"[{nb + 2} x i64]")
        for i, p in enumerate(ptrs):
            q = em(f"getelementptr i64, ptr {blk}, i64 {i}")
            em.raw(f"store i64 {em(f'ptrtoint ptr {p} to i64')}, ptr {q}")
        for i, v in enumerate((bounds[t], bounds[t + 1])):
            em.raw(f"store i64 {v}, ptr {em(f'getelementptr i64, ptr {blk}, i64 {nb + i}')}")
        tid = em.alloca("i64")
        rc = em(f"call i32 @pthread_create(ptr {tid}, ptr null, ptr @{name}_thunk, ptr {blk})")
        tids.append((tid, rc, bounds[t], bounds[t + 1]))
    args = ", ".join(f"ptr {p}" for p in ptrs)
    em.raw(f"call void @{name}({args}, i64 {bounds[0]}, i64 {bounds[1]})")
    for tid, rc, lo, hi in tids:
        ok = em(f"icmp eq i32 {rc}, 0")
        j, inline, done = em.label("join"), em.label("inline"), em.label("joined")
        em.raw(f"br i1 {ok}, label %{j}, label %{inline}")
        em.place(j)
        em.raw(f"call i32 @pthread_join(i64 {em(f'load i64, ptr {tid}')}, ptr null)")
        em.raw(f"br label %{done}")
        em.place(inline)   # thread creation failed: run that chunk here
        em.raw(f"call void @{name}({args}, i64 {lo}, i64 {hi})")
        em.raw(f"br label %{done}")
        em.place(done)


class _Gen:
    """Emits segment functions; kernels become internal functions called with buffer pointers."""

    def __init__(self, plan: Plan, slots: Slots, nthreads: int):
        self.plan, self.slots, self.nthreads = plan, slots, nthreads
        self.funcs: list[str] = []
        self.count = 0

    def load(self, em, ptrs, b) -> None:
        if b not in ptrs:
            slot, off = self.slots.of(self.plan.buffers[b])
            base = em(f"load ptr, ptr {em(f'getelementptr ptr, ptr %ptrs, i64 {slot}')}")
            ptrs[b] = em(f"getelementptr i8, ptr {base}, i64 {off}") if off else base

    def step(self, em, ptrs, step, parallel=True) -> None:
        if isinstance(step, LoopStep):
            self.loop(em, ptrs, step)
            return
        self.count += 1
        kname = f"k{self.count}_{step.name}"
        bufs = sorted(set(step.bufs) | {self.plan.status.buf}) if self.plan.bounds else step.bufs
        self.funcs.append(_kernel_fn(kname, step, bufs, self.plan))
        for b in bufs:
            self.load(em, ptrs, b)
        args = [ptrs[b] for b in bufs]
        if parallel and step.split and self.nthreads > 1:
            self.funcs.append(_thunk(kname, step))
            _parallel_call(em, kname, step, args, self.nthreads)
        else:
            em.raw(f"call void @{kname}({', '.join(f'ptr {a}' for a in args)}, i64 0, i64 {step.outer})")

    def loop(self, em, ptrs, loop: LoopStep) -> None:
        """for t in range(length): slice pointers for t (reversed when asked), then the body steps."""
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
                self.step(em, inner, st, parallel=False)
        em.loop(loop.length, body)


def generate(plan: Plan, slots: Slots, nthreads: int, per_step: bool = False) -> tuple[str, list]:
    """(module IR, segments): a segment is ('native', entry name) or ('host', HostStep).
    per_step=True gives every kernel its own entry (for profiling)."""
    gen, segments, cur = _Gen(plan, slots, nthreads), [], None
    for step in plan.steps:
        if isinstance(step, HostStep):
            cur = None
            segments.append(("host", step))
            continue
        if cur is None or per_step:
            cur = (f"graphc_entry_{len(segments)}", Emitter(), {})
            segments.append(("native", cur))
        gen.step(cur[1], cur[2], step)
    out = []
    for kind, val in segments:
        if kind == "native":
            name, em, _ = val
            gen.funcs.append(em.function(f"define void @{name}(ptr %ptrs) nounwind"))
            out.append(("native", name))
        else:
            out.append(("host", val))
    if len(out) == 1 and out[0][0] == "native" and DATA_OFFSET is not None:
        gen.funcs.append(_call_wrapper(plan, slots, out[0][1]))
    head = (mathlib.DECLARATIONS + gemm.declarations() +
            "declare i32 @pthread_create(ptr, ptr, ptr, ptr)\ndeclare i32 @pthread_join(i64, ptr)\n")
    return head + "\n".join(gen.funcs), out


def _call_wrapper(plan: Plan, slots: Slots, entry: str) -> str:
    """graphc_call(table, input, parameter and output arrays...): stores each ndarray object's data
    pointer in its table slot, then runs the entry. One ctypes call per run instead of a ctypes address
    lookup per array (about 1 us each)."""
    slot_ids = (list(range(plan.kinds["input"] + plan.kinds["param"])) +
                [slots.base["out"] + j for j in range(plan.kinds["out"])])
    em = Emitter()
    for k, slot in enumerate(slot_ids):
        data = em(f"load ptr, ptr {em(f'getelementptr i8, ptr %a{k}, i64 {DATA_OFFSET}')}")
        em.raw(f"store ptr {data}, ptr {em(f'getelementptr ptr, ptr %ptrs, i64 {slot}')}")
    em.raw(f"call void @{entry}(ptr %ptrs)")
    params = ", ".join(["ptr %ptrs"] + [f"ptr %a{k}" for k in range(len(slot_ids))])
    return em.function(f"define void @graphc_call({params}) nounwind")


class Specialised:
    """The compiled code for one set of dim values."""

    def __init__(self, plan: Plan, per_step: bool = False):
        self.plan = plan
        self.slots = Slots(plan)
        # bounds checking runs kernels on one thread (the parallel thunks pass no status word)
        self.ir, segs = generate(plan, self.slots, 1 if plan.bounds else num_threads(), per_step)
        names = [v for k, v in segs if k == "native"]
        wrapped = "@graphc_call(" in self.ir
        self.compiled = jit.compile_ir(self.ir, names + ["graphc_call"] * wrapped)
        self.segments = [(k, _ENTRY(self.compiled.addresses[v]) if k == "native" else v) for k, v in segs]
        self.single = len(self.segments) == 1 and self.segments[0][0] == "native"
        n_arrays = plan.kinds["input"] + plan.kinds["param"] + plan.kinds["out"]
        self.call = (ctypes.CFUNCTYPE(None, ctypes.c_void_p, *[ctypes.py_object] * n_arrays)(
            self.compiled.addresses["graphc_call"]) if wrapped else None)
        g = plan.graph
        self.roots = [(plan.shape(t), np.dtype(t.dtype)) for t in g.roots]
        self.n_out = len(g.outputs)
        self.consts = [c.ctypes.data for c in plan.consts]
        self._keep = plan.consts
        self._tls = threading.local()
        self._status = None if plan.status is None else plan.buffers[plan.status.buf].offset

    def _arena(self) -> np.ndarray:
        a = getattr(self._tls, "arena", None)
        if a is None:   # one per thread: concurrent calls never share scratch memory
            raw = np.empty(self.plan.arena_bytes + 64, np.uint8)
            a = raw[(-raw.ctypes.data) % 64:][:self.plan.arena_bytes or 1]
            if self._status is not None:
                a[self._status:self._status + 8] = 0
            self._tls.arena = a
        return a

    def _table(self):
        """This thread's pointer table with the constant and arena slots filled in."""
        tls = self._tls
        t = getattr(tls, "table", None)
        if t is None:
            t = (ctypes.c_void_p * self.slots.n)()
            c0 = self.slots.base["const"]
            for i, a in enumerate(self.consts):
                t[c0 + i] = a
            t[self.slots.arena] = self._arena().ctypes.data
            tls.table, tls.addr, tls.params = t, ctypes.addressof(t), None
        return t

    def run(self, inputs, params):
        outs = [np.empty(s, d) for s, d in self.roots]
        table = self._table()
        tls = self._tls
        if self.call is not None:   # data pointers of inputs, parameters and outputs filled in natively
            self.call(tls.addr, *inputs, *params, *outs)
            if self._status is not None:
                self._check_status()
            return outs[:self.n_out], outs[self.n_out:]
        n_in = len(inputs)
        if params and (tls.params is None or any(p is not q for p, q in zip(params, tls.params))):
            table[n_in:n_in + len(params)] = [_address(p) for p in params]
            tls.params = list(params)   # set_value swaps the array: the identity check sees it
        if n_in:
            table[0:n_in] = [_address(a) for a in inputs]
        o0 = self.slots.base["out"]
        table[o0:o0 + len(outs)] = [_address(o) for o in outs]
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
        times.append((float(np.median(ts)), label))
    return times
