"""The host-side launch plan that accompanies the generated source, and the executor that runs it
on a memory runtime (device memory through the CUDA driver, or host arrays for the emulation).

Memory: the plan's steps give every buffer a lifetime (the steps that read or write it; a scan
step keeps what its body touches live for the whole loop). For each set of dim values the
temporaries are placed in one arena by the shared planner (graphc.backends.schedule.arena), the
layout cached per dims binding (`Plan.layout`); the runtime keeps one arena per function (per
thread for the emulation), grown when a larger batch needs more. Outputs, update values, inputs,
parameters and constants are not in the arena: they outlive the call or belong to the caller. A scan
body's temporaries have an arena of their own, a block of the enclosing arena live at the scan step;
the body reads its carries from the history slice they were copied to, so its outputs may be
overwritten by the next iteration."""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphc import shapes as _sh
from graphc.backends.schedule.arena import lifetimes, plan_arena
from graphc.backends.schedule.status import StatusCodes
from graphc.errors import GraphcError
from graphc.ir import fmt_loc
from .cexpr import DimTable, eval_shape


@dataclass
class Buffer:
    id: int
    name: str
    dtype: str
    shape: tuple
    kind: str = "temp"            # input | param | const | temp
    index: int | None = None      # position in inputs / params
    value: np.ndarray | None = None  # const


@dataclass
class Launch:
    kernel: str
    kind: str                     # elementwise | fused | reduce | softmax | matmul | copy | take | scatter
    args: list[int]               # buffer ids, in kernel parameter order (GcDims comes last)
    outputs: list[int]
    grid: Callable[[dict], tuple]  # dims -> (gx, gy, gz); any 0 skips the launch (empty tensors)
    block: tuple
    sync: bool                    # uses __syncthreads / warp shuffles (the emulation needs fibers)
    note: str = ""

    def describe(self, dims=None) -> str:
        grid = self.grid(dims) if dims is not None else "f(dims)"
        return f"launch {self.kernel}<<<{grid}, {self.block}>>>  [{self.kind}] {self.note}"

    def uses(self) -> list[int]:
        return self.args


@dataclass
class Fill:
    buf: int
    outputs: list[int] = field(default_factory=list)

    def describe(self, dims=None) -> str:
        return f"zero-fill buffer {self.buf}"

    def uses(self) -> list[int]:
        return [self.buf]


@dataclass
class HostOp:
    """Interim: an op with no kernel yet runs its NumPy impl on the host (listed in info['fallback_ops'])."""
    node: object
    inputs: list[int]
    outputs: list[int]

    def describe(self, dims=None) -> str:
        return f"HOST FALLBACK {self.node.op.name} (NumPy impl; node built at {fmt_loc(self.node.loc)})"

    def uses(self) -> list[int]:
        return self.inputs + self.outputs


@dataclass
class ScanLoop:
    """gc.scan: the host runs the body's own plan (kernels in the same module) once per step."""
    node: object
    body: "Plan"
    inputs: list[int]
    outputs: list[int]
    status: tuple | None = None  # (body's status buffer, graph's status buffer): one status word

    def describe(self, dims=None) -> str:
        a = self.node.attrs
        inner = "\n".join("    " + s.describe() for s in self.body.steps)
        return f"loop scan over {a['length']} steps ({'reversed' if a['reverse'] else 'forward'}):\n{inner}"

    def uses(self) -> list[int]:
        return self.inputs + self.outputs + ([self.status[1]] if self.status else [])


@dataclass
class Plan:
    buffers: list[Buffer]
    steps: list
    outputs: list[tuple[int, tuple]]   # (buffer id, tensor shape): reshapes alias their input buffer
    updates: list[tuple[int, tuple]]
    dimtab: DimTable
    kernels: dict = field(default_factory=dict)  # name -> kind
    update_params: list = field(default_factory=list)  # parameter index of each update
    status: int | None = None       # the int32 status word's buffer (kernels that can fail set it)
    status_codes: StatusCodes = field(default_factory=StatusCodes)   # error code -> (node, message)
    _layouts: dict = field(default_factory=dict, repr=False)         # dims binding -> Layout

    def text(self) -> str:
        lines = [f"buffer {b.id} {b.name}: {b.dtype}{_sh.fmt_shape(b.shape)} ({b.kind})" for b in self.buffers]
        lines += [s.describe() for s in self.steps]
        return "\n".join(lines)

    @property
    def fallback_ops(self) -> list[str]:
        ops = {s.node.op.name for s in self.steps if isinstance(s, HostOp)}
        for s in self.steps:
            if isinstance(s, ScanLoop):
                ops |= set(s.body.fallback_ops)
        return sorted(ops)

    def lifetimes(self) -> dict[int, tuple[int, int]]:
        """Buffer id -> (first, last) step index that reads or writes it."""
        return lifetimes([s.uses() for s in self.steps])

    @property
    def layouts(self) -> list["Layout"]:
        """The layouts planned so far (one per dims binding called with)."""
        return list(self._layouts.values())

    def layout(self, dims: dict) -> "Layout":
        """Where the temporaries live for these dim values (cached per dims binding)."""
        key = tuple(sorted(dims.items()))
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) >= 64:  # many batch sizes: keep the cache bounded
                self._layouts.clear()
            lay = self._layouts[key] = plan_layout(self, dims)
        return lay


@dataclass
class Layout:
    """A plan's temporaries in one arena for one set of dim values."""
    dims: dict
    total: int                         # arena bytes (a multiple of the alignment)
    offsets: dict[int, int]            # buffer id -> byte offset
    nbytes: dict[int, int]             # buffer id -> bytes it holds
    live: dict[int, tuple[int, int]]   # buffer id -> (first, last) step it is live (as planned)
    bodies: dict[int, tuple[int, "Layout"]]  # scan step index -> (byte offset of its body's arena, layout)

    @property
    def temps_bytes(self) -> int:
        """What the temporaries would take with a buffer each (scan bodies: one iteration's)."""
        return sum(self.nbytes.values()) + sum(b.temps_bytes for _, b in self.bodies.values())


def plan_layout(plan: Plan, dims: dict, body: bool = False) -> Layout:
    """Offsets of `plan`'s temporaries (and its status word) in one arena, for these dims. In a scan
    body (`body`), outputs are temporaries kept live to the end of the body (the loop reads them after
    it) and the status word is the enclosing plan's."""
    live = plan.lifetimes()
    end = len(plan.steps)
    keep_out = set() if body else {bid for bid, _ in plan.outputs + plan.updates}
    body_outs = {bid for bid, _ in plan.outputs} if body else set()
    ids, blocks, nbytes = [], [], {}
    for b in plan.buffers:
        if b.kind == "status" and not body:
            first, last = 0, end
        elif b.kind == "temp" and b.id in live and b.id not in keep_out:
            first, last = live[b.id]
            if b.id in body_outs:
                last = end
        else:
            continue
        n = int(np.prod(eval_shape(b.shape, dims), dtype=np.int64)) * np.dtype(b.dtype).itemsize
        ids.append(b.id)
        blocks.append((first, last, n))
        nbytes[b.id] = n
    scans = []
    for k, step in enumerate(plan.steps):
        if isinstance(step, ScanLoop):
            sub = plan_layout(step.body, body_dims(step, dims), body=True)
            scans.append((k, sub))
            blocks.append((k, k, sub.total))
    arena = plan_arena(blocks)
    n = len(ids)
    return Layout(dict(dims), arena.total, dict(zip(ids, arena.offsets[:n])), nbytes,
                  {i: (f, l) for i, (f, l, _) in zip(ids, blocks)},
                  {k: (off, sub) for (k, sub), off in zip(scans, arena.offsets[n:])})


def body_dims(step: "ScanLoop", dims: dict) -> dict:
    """The scan body's own symbolic dims, bound from the per-step shapes of the node's inputs."""
    a, node = step.node.attrs, step.node
    nc, ns = a["n_carry"], a["n_seq"]
    bdims = dict(dims)
    for i, (p, t) in enumerate(zip(a["body"].inputs, node.inputs)):
        shape = eval_shape(t.shape[1:] if nc <= i < nc + ns else t.shape, dims)
        for d, v in zip(p.shape, shape):
            if not isinstance(d, int) and d.is_Symbol:
                bdims[d.name] = v
    return bdims


class Memory:
    """What the executor needs from a runtime; handles are device pointers or host arrays.

    The arena policy is here, the same for every runtime: one arena per function (per thread when
    `per_thread_arena`: calls that may run concurrently), allocated at the first call and replaced
    by a larger one when a call needs more (a bigger batch); a runtime supplies new_arena,
    free_arena and place."""
    per_thread_arena = False

    def __init__(self):
        self._arenas = threading.local() if self.per_thread_arena else _Slot()

    def arena(self, nbytes: int):
        """The arena's base: at least `nbytes` bytes, kept between calls."""
        held = getattr(self._arenas, "arena", None)
        if held is None or held[0] < nbytes:
            if held is not None:
                self.free_arena(held[1])
            self._arenas.arena = held = (nbytes, self.new_arena(nbytes))
        return held[1]

    def new_arena(self, nbytes: int):
        raise NotImplementedError

    def free_arena(self, base) -> None:
        """Release an arena replaced by a larger one (host memory: the garbage collector's)."""

    def bind(self, array: np.ndarray, buf: Buffer):  # an input, parameter or constant
        raise NotImplementedError

    def alloc(self, dtype: str, shape: tuple):
        raise NotImplementedError

    def pointer(self, handle) -> int:
        raise NotImplementedError

    def download(self, handle, dtype: str, shape: tuple, copy: bool) -> np.ndarray:
        raise NotImplementedError

    def zero(self, handle, dtype: str, shape: tuple) -> None:
        raise NotImplementedError

    def launch(self, kernel: str, grid: tuple, block: tuple, params, sync: bool) -> None:
        raise NotImplementedError

    def after_run(self, env: dict, updates: list) -> None:
        """Called once the outputs are downloaded (the device runtime frees buffers here)."""

    def place(self, base, offset: int, dtype: str, shape: tuple):
        """A handle for a buffer of `dtype` and `shape` at byte `offset` of the arena `base`
        (dtype uint8 and shape (n,): a scan body's own arena)."""
        raise NotImplementedError

    def upload(self, handle, array: np.ndarray) -> None:
        """Write a host array into an allocated buffer (a host step's result into the arena)."""
        raise NotImplementedError

    def offset(self, handle, dtype: str, start: int, count: int):
        """A handle for elements [start, start + count) of a buffer (a step of a scan sequence)."""
        raise NotImplementedError

    def copy(self, dst, src, dtype: str, count: int) -> None:
        raise NotImplementedError


class _Slot:
    """Where a runtime whose calls are serialised keeps its one arena."""
    arena = None


def pack_params(pointers: list[int], dims_values: np.ndarray):
    """cuLaunchKernel's `void** kernelParams`: the address of each argument value (pointers, then GcDims)."""
    holders = [ctypes.c_void_p(p) for p in pointers]
    addrs = [ctypes.addressof(h) for h in holders] + [dims_values.ctypes.data]
    arr = (ctypes.c_void_p * len(addrs))(*addrs)
    return arr, (holders, dims_values)


def execute(plan: Plan, mem: Memory, inputs, params, dims):
    """Run the plan: place the temporaries in the arena, bind inputs/params/constants, allocate the
    outputs and update values as steps write them, launch; raise what the status word reports."""
    lay = plan.layout(dims)
    base = mem.arena(lay.total)
    env = prepare(plan, lay, mem, base)
    for b in plan.buffers:
        if b.kind == "input":
            env[b.id] = mem.bind(inputs[b.index], b)
        elif b.kind == "param":
            env[b.id] = mem.bind(params[b.index], b)
    if plan.status is not None:
        mem.zero(env[plan.status], "int32", (1,))
    run_steps(plan, lay, mem, env, dims, base)
    bufs = {b.id: b for b in plan.buffers}
    if plan.status is not None:
        code = int(mem.download(env[plan.status], "int32", (1,), copy=True)[0])
        if code:
            mem.after_run(env, [])  # frees the call's buffers; no update is applied
            raise plan.status_codes.error(code)

    def fetch(bid, shape):
        b = bufs[bid]
        return mem.download(env[bid], b.dtype, eval_shape(shape, dims), copy=b.kind != "temp")
    outs, upds = [fetch(*o) for o in plan.outputs], [fetch(*u) for u in plan.updates]
    mem.after_run(env, upds)
    return outs, upds


def prepare(plan: Plan, lay: Layout, mem: Memory, base) -> dict:
    """Buffer id -> handle for the temporaries placed in the arena `base` and the constants."""
    bufs = {b.id: b for b in plan.buffers}
    env = {bid: mem.place(base, off, bufs[bid].dtype, eval_shape(bufs[bid].shape, lay.dims))
           for bid, off in lay.offsets.items()}
    for b in plan.buffers:
        if b.kind == "const":
            env[b.id] = mem.bind(b.value, b)
    return env


def run_steps(plan: Plan, lay: Layout, mem: Memory, env: dict, dims, base) -> None:
    """The plan's steps on already-bound buffers (`env`: buffer id -> handle; `base`: the arena of
    `lay`); buffers outside the arena (outputs, update values) are allocated when first written."""
    bufs = {b.id: b for b in plan.buffers}
    dvals = plan.dimtab.values(dims)
    for k, step in enumerate(plan.steps):
        for o in step.outputs if not isinstance(step, HostOp) else ():
            if o not in env:
                env[o] = mem.alloc(bufs[o].dtype, eval_shape(bufs[o].shape, dims))
        if isinstance(step, Launch):
            grid = step.grid(dims)
            if min(grid) <= 0:
                continue
            arr, keep = pack_params([mem.pointer(env[a]) for a in step.args], dvals)
            mem.launch(step.kernel, grid, step.block, arr, step.sync)
        elif isinstance(step, Fill):
            mem.zero(env[step.buf], bufs[step.buf].dtype, eval_shape(bufs[step.buf].shape, dims))
        elif isinstance(step, ScanLoop):
            off, sub = lay.bodies[k]
            _scan(step, env, mem, dims, sub, mem.place(base, off, "uint8", (sub.total,)))
        else:
            _host_op(step, env, bufs, mem, dims)


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _scan(step: ScanLoop, env, mem: Memory, dims, lay: Layout, base):
    """The body's plan once per step. The carry entering step t is first copied to history[t], and
    the body reads it there: the body's outputs (in its own arena) are free to be rewritten."""
    a, node, body = step.node.attrs, step.node, step.body
    nc, ns = a["n_carry"], a["n_seq"]
    ins = node.inputs
    bdims = lay.dims
    T = eval_shape((a["length"],), dims)[0]
    outs = node.outputs
    sizes = [_numel(eval_shape(o.shape, dims)) // max(T, 1) if k >= nc else _numel(eval_shape(o.shape, dims))
             for k, o in enumerate(outs)]
    carries = [env[b] for b in step.inputs[:nc]]
    in_sizes = [_numel(eval_shape(t.shape[1:], dims)) for t in ins[nc:nc + ns]]
    placed = prepare(body, lay, mem, base)
    if step.status:
        placed[step.status[0]] = env[step.status[1]]
    rest = [env[b] for b in step.inputs[nc + ns:]]
    for i in range(T):
        t = T - 1 - i if a["reverse"] else i
        hist = []
        for k in range(nc):  # history[t] = the carry entering this step
            o = step.outputs[len(outs) - nc + k]
            hist.append(mem.offset(env[o], outs[k].dtype, t * sizes[k], sizes[k]))
            mem.copy(hist[-1], carries[k], outs[k].dtype, sizes[k])
        seq = [mem.offset(env[b], x.dtype, t * n, n) for b, x, n in zip(step.inputs[nc:nc + ns], ins[nc:], in_sizes)]
        benv = dict(placed)
        handles = hist + seq + rest
        for b in body.buffers:
            if b.kind == "input":
                benv[b.id] = handles[b.index]
        run_steps(body, lay, mem, benv, bdims, base)
        res = [benv[bid] for bid, _ in body.outputs]
        carries = res[:nc]
        for k, r in enumerate(res[nc:]):
            o = nc + k
            dst = mem.offset(env[step.outputs[o]], outs[o].dtype, t * sizes[o], sizes[o])
            mem.copy(dst, r, outs[o].dtype, sizes[o])
    for k in range(nc):
        mem.copy(env[step.outputs[k]], carries[k], outs[k].dtype, sizes[k])


def _host_op(step: HostOp, env, bufs, mem: Memory, dims):
    node = step.node
    args = [mem.download(env[i], bufs[i].dtype, eval_shape(t.shape, dims), copy=False)
            for i, t in zip(step.inputs, node.inputs)]
    attrs = dict(node.attrs)
    if getattr(node.op, "needs_dims", False):
        attrs["dims"] = dims
    res = node.op.impl(*args, **attrs)
    res = res if node.op.n_outputs != 1 else (res,)
    for o, t, v in zip(step.outputs, node.outputs, res):
        v = np.ascontiguousarray(np.asarray(v, dtype=t.dtype))
        want = eval_shape(t.shape, dims)
        if v.shape != want and v.size == int(np.prod(want)):
            v = v.reshape(want)  # e.g. a (1,) result for a 0-d tensor: the NumPy path accepts it too
        if v.shape != want:
            raise GraphcError(f"host fallback {node.op.name} produced shape {v.shape}")
        if o in env:   # a temporary: its place in the arena
            mem.upload(env[o], v)
        else:          # an output or update value: the call's own buffer
            env[o] = mem.bind(v, bufs[o])
