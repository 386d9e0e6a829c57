"""`f.explain()`: where a compiled function's time goes, one row per kernel (step), the first thing to
read when a model is slow.

Each row: the kernel, the ops fused into it, its FLOPs and the bytes it moves (from shapes and dtypes),
the time the roofline predicts from this host's measured peaks, the time measured per call in a
profiled run, what bounds it (compute, memory, or fixed overhead), and, for a neighbouring op left in
a kernel of its own, why fusion did not take it (graphc.passes.fusion.unfused_reason). On llvm each row
also counts how often its dispatch over the thread pool was late (Row.late: the calling thread, out of
work, waited for a worker's chunk), and the kernels late in most runs are listed: threads given uneven
shares of a kernel's work show there.

How times are measured (the simplest honest way per backend):
- llvm: the same plan compiled with one native entry per step (the kernels are the same functions),
  the steps run in order, each timed from the host; an empty native call's cost is subtracted.
- numpy: the generated source with a clock reading between its statements (one list append each);
  statements map to the nodes that emitted them.
- other backends: no per-step profile; rows carry the predictions, the total is measured.
The call is also timed as a user calls it (`f(*args)`): what it takes beyond the steps (argument checks,
the Python-to-native call, output allocation) is the "call overhead" row, so the rows add up to it.

Peaks: float32 GEMM GFLOP/s (NumPy's BLAS, 512^3, best of 30) and single-thread copy bandwidth (16 MiB,
best of 20), measured once per CPU model and kept in the on-disk cache (graphc.backends.schedule.cache,
sub "host"); `host_peaks(refresh=True)` measures again.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np

from . import shapes as _sh
from .errors import GraphcError
from .ir import Trait

#: notes on unfused neighbours shown under the table (all are kept in Row.why_unfused)
MAX_NOTES = 12
#: a step whose roofline time is below this is bounded by fixed costs (calls, loop set-up), not the machine
OVERHEAD_FLOOR_S = 1e-6
#: a step late (Row.late) in at least this share of the profiled runs is listed under the table: W10 b1's
#: 56x56 Winograd layers were late in 75-97% of runs when one thread had two more tile rows than the other
LATE_SHARE = 0.5


# ---- this host ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU model, with its family and model numbers where /proc/cpuinfo gives them (virtual machines
    often name only the vendor line): e.g. 'AMD EPYC (family 23 model 49)'."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def _measure_peaks() -> dict:
    """Best of several short runs (a shared machine has quiet moments; the peak is the best it does)."""
    a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    c = np.empty_like(a)
    np.matmul(a, a, out=c)
    gemm = min(_clock(lambda: np.matmul(a, a, out=c)) for _ in range(30))
    x = np.ones(4_194_304, np.float32)
    y = np.empty_like(x)
    bw = min(_clock(lambda: np.copyto(y, x)) for _ in range(20))
    return {"gemm_flops": 2 * 512 ** 3 / gemm, "copy_Bps": 2 * x.nbytes / bw, "load": _load(), "when": time.time()}


def _load() -> float:
    try:
        return os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return 0.0


def _clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_PEAKS: dict = {}


def host_peaks(refresh: bool = False) -> dict:
    """{'cpu', 'gemm_flops' (float32 FLOP/s), 'copy_Bps' (bytes/s, read + write), 'cached'}: measured once
    per CPU model (about 0.3 s) and kept in the on-disk cache; `refresh=True` measures again. Figures
    measured on an overloaded machine (load average above the cores) are measured again when a process
    at least ten minutes later finds it quieter; the best figures seen are kept."""
    from graphc.backends.schedule import cache
    cpu = cpu_model()
    name = cache.key("host-peaks", cpu, np.__version__, os.environ.get("OPENBLAS_NUM_THREADS", ""))
    if cpu in _PEAKS and not refresh:
        return _PEAKS[cpu]
    old = None
    blob = cache.load_blob("host", name)
    if blob is not None:
        try:
            old = json.loads(blob)
        except ValueError:
            old = None
    overloaded = old is not None and old.get("load", 0) > 1 and time.time() - old.get("when", 0) > 600
    if old is not None and not refresh and not (overloaded and _load() < old["load"] / 2):
        _PEAKS[cpu] = dict(old, cpu=cpu, cached=True)
        return _PEAKS[cpu]
    peaks = _measure_peaks()
    if old is not None:   # keep the best figures seen on this CPU model
        if old["gemm_flops"] > peaks["gemm_flops"]:
            peaks["gemm_flops"], peaks["load"] = old["gemm_flops"], min(peaks["load"], old.get("load", 0))
        peaks["copy_Bps"] = max(peaks["copy_Bps"], old["copy_Bps"])
    try:
        cache.store_blob("host", name, json.dumps(peaks).encode())
    except GraphcError:
        pass   # no writable cache: measured again next process
    _PEAKS[cpu] = dict(peaks, cpu=cpu, cached=False)
    return _PEAKS[cpu]


# ---- FLOPs and bytes from shapes -------------------------------------------------------------------------

def _ev(shape, dims: dict) -> tuple:
    """A concrete shape: symbolic dims bound by name from `dims` ({'N': 64})."""
    return _sh.evaluate(shape, {s: dims[s.name] for s in _sh.free_symbols(shape) if s.name in dims})


def _size(shape, dims) -> int:
    return int(np.prod(_ev(shape, dims), dtype=np.int64)) if len(shape) else 1


def _nbytes(t, dims) -> int:
    return _size(t.shape, dims) * np.dtype(t.dtype).itemsize


def node_flops(node, dims) -> int:
    """Arithmetic of one node: 2*M*N*K for GEMMs, 2 * outputs * (C/groups * KH * KW) for convolutions and
    their gradients, the body's for fused nodes and scan loops (times the length), one per element of the
    largest operand otherwise (movement ops and leaves: none)."""
    from .ops.fused import Fused
    from .ops.linalg import MatMul
    from .ops.nn_ops import Conv2d, Conv2dGradInput, Conv2dGradWeight
    from .ops.scan import Scan
    op = node.op
    if op.has(Trait.LEAF) or op.has(Trait.MOVEMENT) or op.has(Trait.SHAPE):
        return 0
    if op is Fused:
        return sum(node_flops(n, dims) for n in node.attrs["body"].nodes)
    if op is Scan:
        return int(node.attrs["length"]) * sum(node_flops(n, dims) for n in node.attrs["body"].nodes)
    if op is MatMul:
        a = node.inputs[0]
        return 2 * _size(node.outputs[0].shape, dims) * int(_ev(a.shape[-1:], dims)[0])
    if op in (Conv2d, Conv2dGradInput):
        gy = node.outputs[0] if op is Conv2d else node.inputs[0]
        return 2 * _size(gy.shape, dims) * _size(node.inputs[1].shape[1:], dims)
    if op is Conv2dGradWeight:
        return 2 * _size(node.inputs[1].shape, dims) * _size(node.outputs[0].shape[1:], dims)
    return max([_size(t.shape, dims) for t in list(node.inputs) + list(node.outputs)] or [0])


def node_bytes(node, dims) -> int:
    """Compulsory traffic of a node: its inputs read once and its outputs written once (views: none)."""
    if node.op.has(Trait.LEAF) or node.op.has(Trait.MOVEMENT) or node.op.has(Trait.SHAPE):
        return 0
    return sum(_nbytes(t, dims) for t in list(node.inputs) + list(node.outputs))


def ops_of(node) -> str:
    """The ops a kernel runs: `matmul+add+relu` for a fused node, `scan[...]` for a loop."""
    from .ops.fused import Fused
    from .ops.scan import Scan
    if node is None:
        return "-"
    if node.op is Fused:
        return "+".join(n.op.name for n in node.attrs["body"].compute_nodes())
    if node.op is Scan:
        body = [ops_of(n) for n in node.attrs["body"].compute_nodes() if not n.op.has(Trait.MOVEMENT)]
        return f"scan x{node.attrs['length']}[{', '.join(body)}]"
    return node.op.name


# ---- rows ------------------------------------------------------------------------------------------------

class Row:
    """One kernel (step) of a compiled function: see Explanation's columns."""

    def __init__(self, kernel: str, node, flops: int, nbytes: int, peaks: dict, seconds: float | None):
        self.kernel, self.node, self.flops, self.bytes = kernel, node, int(flops), int(nbytes)
        self.ops = ops_of(node)
        self.compute_s = self.flops / peaks["gemm_flops"]
        self.memory_s = self.bytes / peaks["copy_Bps"]
        self.predicted = max(self.compute_s, self.memory_s)
        self.measured = seconds
        self.why_unfused: list[str] = []
        self.note_costs: list[float] = []   # per note: the time of the two kernels (orders the notes)
        #: llvm: the share of profiled runs in which this step's dispatch over the thread pool was late (the
        #: calling thread, out of chunks, waited for a worker's: the threads' shares uneven, or one of them
        #: descheduled); None where not counted
        self.late: float | None = None

    @property
    def bound(self) -> str:
        if self.predicted < OVERHEAD_FLOOR_S:
            return "overhead"
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "ops": self.ops, "flops": self.flops, "bytes": self.bytes,
                "predicted_s": self.predicted, "measured_s": self.measured, "bound": self.bound,
                "why_unfused": list(self.why_unfused), "late": self.late}


def _clip(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def _fmt_t(s) -> str:
    if s is None:
        return "-"
    if s < 0:   # the call measured below the steps' sum (noise)
        return "-" + _fmt_t(-s)
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_n(n) -> str:
    for unit, v in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:.1f}{unit}"
    return str(n)


class Explanation:
    """What `f.explain()` returns: `rows` (Row objects, one per kernel, in execution order), `call_s`
    (the measured time of one call as a user makes it), `overhead_s` (call time the steps do not
    account for), `peaks` (this host's), and the table as `str(...)`. `as_dict()` for programs."""

    def __init__(self, f, rows, call_s, peaks, dims, how):
        self.function, self.rows, self.call_s, self.peaks, self.dims, self.how = f, rows, call_s, peaks, dims, how
        timed = [r.measured for r in rows if r.measured is not None]
        self.steps_s = sum(timed) if timed else None
        self.overhead_s = None if self.steps_s is None else self.call_s - self.steps_s

    def as_dict(self) -> dict:
        return {"backend": self.function.backend_name, "dims": self.dims, "call_s": self.call_s,
                "steps_s": self.steps_s, "overhead_s": self.overhead_s, "peaks": self.peaks,
                "rows": [r.as_dict() for r in self.rows]}

    def __str__(self) -> str:
        f, p = self.function, self.peaks
        head = [f"graphc explain: {f.graph.name!r} on {f.backend_name}" +
                (f", dims {self.dims}" if self.dims else ""),
                f"host: {p['cpu']}; peaks {p['gemm_flops'] / 1e9:.1f} GFLOP/s (float32 GEMM), "
                f"{p['copy_Bps'] / 1e9:.1f} GB/s (copy, 1 thread){' (cached)' if p.get('cached') else ''}",
                f"timing: {self.how}"]
        tgt = f.program.info.get("target")
        if isinstance(tgt, dict) and "isa" in tgt:   # (llvm) the ISA level the code was generated for
            head.insert(2, f"code: {tgt['isa']}, {tgt.get('vector_bits')}-bit vectors, "
                           f"{tgt.get('threads')} thread{'s' * (tgt.get('threads') != 1)}")
        ct = f.program.info.get("compile_time")
        if isinstance(ct, dict) and ct:
            head.append("compile: " + ", ".join(f"{k} {_fmt_t(v)}" for k, v in ct.items()
                                                 if isinstance(v, (int, float))))
        cols = ["#", "kernel", "ops", "FLOPs", "bytes", "roofline", "measured", "of call", "bound"]
        body = []
        for i, r in enumerate(self.rows):
            share = f"{100 * r.measured / self.call_s:.0f}%" if r.measured is not None and self.call_s else "-"
            ops = r.ops if len(r.ops) <= 48 else r.ops[:45] + "..."
            body.append([str(i), r.kernel, ops, _fmt_n(r.flops), _fmt_n(r.bytes), _fmt_t(r.predicted),
                         _fmt_t(r.measured), share, r.bound])
        if self.overhead_s is not None and self.overhead_s >= 0:
            share = f"{100 * self.overhead_s / self.call_s:.0f}%" if self.call_s else "-"
            body.append(["", "call", "argument checks, call into the program, outputs", "", "", "",
                         _fmt_t(self.overhead_s), share, "overhead"])
        elif self.overhead_s is not None:   # the steps, timed one by one, add up to more than a whole call
            body.append(["", "call", f"not resolved: the steps timed one by one sum to {_fmt_t(-self.overhead_s)} "
                         "more than a call (noise)", "", "", "", "-", "-", "noise"])
        pred = sum(r.predicted for r in self.rows)
        body.append(["", "total", f"{len(self.rows)} kernels", _fmt_n(sum(r.flops for r in self.rows)),
                     _fmt_n(sum(r.bytes for r in self.rows)), _fmt_t(pred), _fmt_t(self.call_s), "100%", ""])
        w = [max(len(x[i]) for x in [cols] + body) for i in range(len(cols))]
        lines = head + ["", "  ".join(c.ljust(n) for c, n in zip(cols, w)), "  ".join("-" * n for n in w)]
        lines += ["  ".join(c.ljust(n) for c, n in zip(x, w)).rstrip() for x in body]
        notes = [(-c, i, why) for i, r in enumerate(self.rows) for c, why in zip(r.note_costs, r.why_unfused)]
        if notes:   # the costliest kernels' neighbours first
            notes.sort(key=lambda x: (x[0], x[1]))
            lines += ["", "left unfused (the costliest pairs of kernels first):"]
            lines += [_clip(f"  #{i} {why}") for _, i, why in notes[:MAX_NOTES]]
            if len(notes) > MAX_NOTES:
                lines.append(f"  ... {len(notes) - MAX_NOTES} more in .rows[i].why_unfused")
        late = [(r.late, i, r) for i, r in enumerate(self.rows) if r.late is not None and r.late >= LATE_SHARE]
        if late:   # the kernels whose threads finished apart, the costliest first
            late.sort(key=lambda x: (-(x[2].measured or 0), x[1]))
            lines += ["", f"threads waited on (in at least {LATE_SHARE:.0%} of the profiled runs the calling thread, "
                          "out of work, waited for a worker's chunk: uneven shares, or a descheduled thread):"]
            lines += [_clip(f"  #{i} {r.kernel} {r.ops}: {share:.0%} of runs") for share, i, r in late[:MAX_NOTES]]
        lines += ["", "roofline = max(FLOPs / GEMM peak, bytes / copy bandwidth); bound 'overhead': under "
                      f"{_fmt_t(OVERHEAD_FLOOR_S)} of roofline time, fixed costs dominate"]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):   # IPython shows the table
        p.text(str(self))

    def __repr__(self):
        return str(self)


# ---- inputs, timing --------------------------------------------------------------------------------------

def example_inputs(f, dims: dict) -> list[np.ndarray]:
    """Random inputs for f's placeholders, symbolic dims bound by `dims` (unbound ones: 1)."""
    rng = np.random.default_rng(0)
    out = []
    for t in f.graph.inputs:
        shape = _ev(t.shape, {s.name: dims.get(s.name, 1) for s in _sh.free_symbols(t.shape)})
        dt = np.dtype(t.dtype)
        if dt.kind == "f":
            out.append(rng.standard_normal(shape).astype(dt))
        elif dt.kind in "iu":
            out.append(rng.integers(0, 2, shape).astype(dt))   # small: valid class labels and indices
        else:
            out.append(rng.integers(0, 2, shape).astype(dt))
    return out


def _caller(f, args):
    """One timed sample of f(*args) as a user calls it: (seconds per call, calls per sample chosen so a
    sample lasts about 0.2 ms or more)."""
    f(*args)
    one = max(_clock(lambda: f(*args)), 1e-7)
    number = max(1, min(1000, int(2e-4 / one)))

    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            f(*args)
        return (time.perf_counter() - t0) / number
    return sample


# ---- per-backend profiles ---------------------------------------------------------------------------------

def _owners(graph) -> dict:
    """id(node inside a fused or scan body) -> the node of `graph` that runs it."""
    own = {}

    def visit(outer, body):
        for n in body.nodes:
            own[id(n)] = outer
            for v in n.attrs.values():
                if hasattr(v, "nodes") and hasattr(v, "inputs"):
                    visit(outer, v)
    for n in graph.nodes:
        for v in n.attrs.values():
            if hasattr(v, "nodes") and hasattr(v, "inputs"):
                visit(n, v)
    return own


class _LLVMProfile:
    """llvm: one native entry per step (backends/llvm/program.step_times)."""

    def __init__(self, f, values, dims, peaks):
        from graphc.backends.llvm.program import step_times
        prog = f.program
        spec = prog._specs.get(tuple(sorted(dims.items()))) or prog._specialise(dims)
        self.plan = spec.plan
        self.steps, self.run, self.nop = step_times(spec, values, [p.value for p in f._params])
        self.f, self.dims, self.peaks = f, dims, peaks

    def rows(self, med: list[float]) -> list[Row]:
        from graphc.backends.schedule.steps import HostStep, LoopStep
        own, dims, steps = _owners(self.f.graph), self.dims, self.steps
        nodes = []
        for st in steps:
            n = _first_node(st) if isinstance(st, LoopStep) else getattr(st, "node", None)
            nodes.append(own.get(id(n), n) if n is not None else None)
        # a node planned as several steps (a GEMM and its epilogue loop, an im2col and a GEMM, carry copies
        # and a loop): its main step is the loop, else its first GEMM, else its first step; steps that
        # count their FLOPs (GEMMs) keep them, the rest of the node's go to the main step or the first other
        # the plan's prologue (a weight transposed or packed: run once per new parameter array, 0 s a call)
        # counts nothing of a call's work
        once = self.plan.prologue
        flops, by_node, main = [0] * len(steps), {}, {}
        for k, n in enumerate(nodes):
            if n is not None and k >= once:
                by_node.setdefault(id(n), []).append(k)
        for key, ks in by_node.items():
            sized = [k for k in ks if getattr(steps[k], "size", 0)]
            loops = [k for k in ks if isinstance(steps[k], LoopStep)]
            main[key] = (loops or sized or ks)[0]
            for k in sized:
                flops[k] = int(steps[k].size)
            rest = loops or [k for k in ks if k not in sized] or ks[:1]
            flops[rest[0]] += max(0, node_flops(nodes[ks[0]], dims) - sum(flops[k] for k in sized))
        rows = []
        for k, st in enumerate(steps):
            if isinstance(st, HostStep):
                rows.append(Row("host (NumPy impl)", nodes[k], flops[k], node_bytes(st.node, dims), self.peaks, med[k]))
            elif k < once:
                rows.append(Row(st.name, nodes[k], 0, 0, self.peaks, 0.0))
                rows[-1].ops = f"(once per new weight) {rows[-1].ops}"
                continue
            else:
                kernel = "loop" if isinstance(st, LoopStep) else st.name
                rows.append(Row(kernel, nodes[k], flops[k], _step_bytes(self.plan, st), self.peaks,
                                max(0.0, med[k] - self.nop)))
            n = nodes[k]
            if n is not None and main.get(id(n), k) != k:   # another step of the same node's work
                rows[-1].ops = f"(of #{main[id(n)]}) {rows[-1].ops}"
            if getattr(self.run, "runs", 0) and k >= once:
                rows[-1].late = self.run.late[k] / self.run.runs
        return rows

    def how(self, repeat) -> str:
        return (f"llvm steps run one by one in order, each timed from the host (median of {repeat} runs, "
                f"interleaved with the timed calls); an empty native call ({_fmt_t(self.nop)}) subtracted")


def _first_node(loop):
    from graphc.backends.schedule.steps import LoopStep
    for st in loop.body:
        n = _first_node(st) if isinstance(st, LoopStep) else getattr(st, "node", None)
        if n is not None:
            return n
    return None


def _step_bytes(plan, st) -> int:
    from graphc.backends.schedule.steps import LoopStep
    if isinstance(st, LoopStep):   # what the body touches: the slices once per iteration, the rest once
        inner = set()
        for b in st.body:
            inner |= b.buffers() if isinstance(b, LoopStep) else set(b.bufs)
        slices = set(st.slices)
        return (sum(plan.buffers[b].nbytes for b in inner - slices) +
                st.length * sum(_slice_bytes(plan, b, st.length) for b in inner & slices))
    return sum(plan.buffers[b].nbytes for b in st.bufs)


def _slice_bytes(plan, b: int, length) -> int:
    """Bytes one iteration reads of slice buffer b: its window's extent, but no more than its share of the
    parent when the windows move (a transposed sequence's step spans every other step's rows: W4's
    (N, 512) step of a (N, T, 512) projection is 32 KB of a 1.5 MB extent)."""
    buf = plan.buffers[b]
    n = buf.nbytes
    if buf.stride and length:
        n = min(n, -(-plan.buffers[buf.index].nbytes // int(length)))
    return n


class _NumpyProfile:
    """numpy: the generated source again, with a clock reading before every top-level statement."""

    def __init__(self, f, values, dims, peaks):
        import ast

        from graphc.backends.numpy.codegen import generate
        prog = f.program
        src, ns, line_nodes = generate(f.graph, prog.info.get("plan"), f.options)
        tree = ast.parse(src)
        fn = tree.body[0]
        self.stmts, body = list(fn.body), []
        for st in self.stmts:
            body += [ast.copy_location(ast.parse("_gc_ts.append(_gc_clock())").body[0], st), st]
        fn.body = body
        ast.fix_missing_locations(tree)
        self.ts: list = []
        ns.update(_gc_ts=self.ts, _gc_clock=time.perf_counter)
        exec(compile(tree, f"<graphc-explain-{f.graph.name}>", "exec"), ns)
        fn, ws = ns["graph_fn"], prog.info.get("workspace")
        params = [p.value for p in f._params]
        ts = self.ts

        def run() -> list[float]:
            ts.clear()
            fn(*values, *params, _dims=dims, _ws=ws.get(dims) if ws is not None else ())
            ts.append(time.perf_counter())
            return [b - a for a, b in zip(ts, ts[1:])]
        self.run = run
        own = _owners(f.graph)
        self.stmt_node = []   # a body line maps to the fused node around it; unmapped lines join the next node
        for st in self.stmts:
            n = next((line_nodes[ln] for ln in range(st.lineno, (st.end_lineno or st.lineno) + 1)
                      if ln in line_nodes), None)
            self.stmt_node.append(own.get(id(n), n) if n is not None else None)
        self.dims, self.peaks = dims, peaks

    def rows(self, med: list[float]) -> list[Row]:
        order, acc, pending = [], {}, 0.0
        for n, t in zip(self.stmt_node, med):
            if n is None:
                pending += t
                continue
            if id(n) not in acc:
                order.append(n)
                acc[id(n)] = 0.0
            acc[id(n)] += t + pending
            pending = 0.0
        rows = [Row(n.op.name, n, node_flops(n, self.dims), node_bytes(n, self.dims), self.peaks, acc[id(n)])
                for n in order]
        if pending:
            rows.append(Row("return", None, 0, 0, self.peaks, pending))
        return rows

    def how(self, repeat) -> str:
        return (f"the generated NumPy source with a clock reading between statements (median of {repeat} runs, "
                "interleaved with the timed calls), statements summed per node")


class _NoProfile:
    """Backends without a per-step profile: rows are predictions per node, the call is measured."""

    def __init__(self, f, values, dims, peaks):
        self.f, self.dims, self.peaks = f, dims, peaks
        self.run = lambda: []

    def rows(self, med) -> list[Row]:
        return [Row(n.op.name, n, node_flops(n, self.dims), node_bytes(n, self.dims), self.peaks, None)
                for n in self.f.graph.compute_nodes() if not n.op.has(Trait.MOVEMENT)]

    def how(self, repeat) -> str:
        return (f"no per-step profile for backend {self.f.backend_name!r}: rows are the roofline's predictions, "
                f"the call is measured (median of {repeat})")


#: backend name -> profiler class (init(f, values, dims, peaks); run() -> seconds per step; rows(medians))
PROFILERS = {"llvm": _LLVMProfile, "numpy": _NumpyProfile}


def _why_unfused(f, rows) -> None:
    """Notes for neighbouring kernels that fusion kept apart (looking through views)."""
    from .passes.fusion import unfused_reason
    g = f.graph
    readers: dict = {}
    for n in g.nodes:
        for t in n.inputs:
            readers.setdefault(id(t), []).append(n)
    roots = {id(t) for t in g.roots}
    main, cost = {}, {}   # node -> its main row (most FLOPs), and its time (measured, else predicted)
    for k, r in enumerate(rows):
        if r.node is not None:
            key = id(r.node)
            if key not in main or r.flops > rows[main[key]].flops:
                main[key] = k
            cost[key] = cost.get(key, 0.0) + (r.measured if r.measured is not None else r.predicted)

    def kernels_reading(t, seen):
        for u in readers.get(id(t), ()):
            if u.op.has(Trait.MOVEMENT):
                if id(u) not in seen:
                    seen.add(id(u))
                    for o in u.outputs:
                        yield from kernels_reading(o, seen)
            else:
                yield u
    for key, k in main.items():
        r = rows[k]
        n = r.node
        if n.op.has(Trait.MOVEMENT) or n.op.has(Trait.SHAPE):
            continue
        for o in n.outputs:
            for u in kernels_reading(o, set()):
                if id(u) not in main or u is n or u.op.has(Trait.SHAPE):
                    continue
                why = unfused_reason(n, u, readers, roots)
                text = f"-> #{main[id(u)]} {u.op.name}: {why}"
                if why and text not in r.why_unfused:
                    r.why_unfused.append(text)
                    r.note_costs.append(cost[key] + cost[id(u)])

def explain(f, *args, repeat: int = 10, **dims) -> Explanation:
    """The per-kernel report of compiled function `f` (see the module docstring). `args`: inputs to run
    it on (default: random arrays of the placeholders' shapes, symbolic dims bound by `dims`, e.g.
    `f.explain(N=64)`; unbound dims are 1). Profiled runs and timed calls alternate, `repeat` of each
    (medians), so both see the same machine load. Parameters the function updates are restored."""
    values, bound = f._bind(args if args else example_inputs(f, dims), {})
    peaks = host_peaks()
    repeat = max(3, int(repeat))
    saved = [(p, p.value) for p, _ in f.graph.updates]
    try:
        cls = _NoProfile if f.options.debug else PROFILERS.get(f.backend_name, _NoProfile)
        prof = cls(f, values, bound, peaks)
        prof.run()   # warm: first-call work (specialisation, page faults) is not a step's time
        call = _caller(f, values)
        per, calls = [], []
        for _ in range(repeat):
            per.append(prof.run())
            calls.append(call())
    finally:
        for p, v in saved:
            p._value = v   # the very arrays (the Function swaps in new ones per call)
    med = [statistics.median(x) for x in zip(*per)] if per and per[0] else []
    rows = prof.rows(med)
    _why_unfused(f, rows)
    return Explanation(f, rows, statistics.median(calls), peaks, bound, prof.how(repeat))
