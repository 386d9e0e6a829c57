"""The host-side launch plan that accompanies the generated source, and the executor that runs it
on a memory runtime (real device memory through cuda-python, or host arrays for the emulation)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphc import shapes as _sh
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


@dataclass
class Fill:
    buf: int
    outputs: list[int] = field(default_factory=list)

    def describe(self, dims=None) -> str:
        return f"zero-fill buffer {self.buf}"


@dataclass
class HostOp:
    """Interim: an op with no kernel yet runs its NumPy impl on the host (listed in info['fallback_ops'])."""
    node: object
    inputs: list[int]
    outputs: list[int]

    def describe(self, dims=None) -> str:
        return f"HOST FALLBACK {self.node.op.name} (NumPy impl; node built at {fmt_loc(self.node.loc)})"


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
    status_nodes: list = field(default_factory=list)   # error code k -> node (k - 1)

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


class Memory:
    """What the executor needs from a runtime; handles are device pointers or host arrays."""

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

    def offset(self, handle, dtype: str, start: int, count: int):
        """A handle for elements [start, start + count) of a buffer (a step of a scan sequence)."""
        raise NotImplementedError

    def copy(self, dst, src, dtype: str, count: int) -> None:
        raise NotImplementedError


def pack_params(pointers: list[int], dims_values: np.ndarray):
    """cuLaunchKernel's `void** kernelParams`: the address of each argument value (pointers, then GcDims)."""
    holders = [ctypes.c_void_p(p) for p in pointers]
    addrs = [ctypes.addressof(h) for h in holders] + [dims_values.ctypes.data]
    arr = (ctypes.c_void_p * len(addrs))(*addrs)
    return arr, (holders, dims_values)


def execute(plan: Plan, mem: Memory, inputs, params, dims):
    """Run the plan: bind inputs/params/constants, allocate buffers as steps write them, launch."""
    env = {}
    for b in plan.buffers:
        if b.kind == "input":
            env[b.id] = mem.bind(inputs[b.index], b)
        elif b.kind == "param":
            env[b.id] = mem.bind(params[b.index], b)
    if plan.status is not None:
        env[plan.status] = mem.alloc("int32", (1,))
        mem.zero(env[plan.status], "int32", (1,))
    run_steps(plan, mem, env, dims)
    bufs = {b.id: b for b in plan.buffers}
    if plan.status is not None:
        code = int(mem.download(env[plan.status], "int32", (1,), copy=True)[0])
        if code:
            mem.after_run(env, [])  # frees the call's buffers; no update is applied
            node = plan.status_nodes[code - 1]
            raise GraphcError(f"{node.op.name}: index out of range at run time (indices must lie in [-n, n))\n"
                              f"  node built at {fmt_loc(node.loc)}")

    def fetch(bid, shape):
        b = bufs[bid]
        return mem.download(env[bid], b.dtype, eval_shape(shape, dims), copy=b.kind != "temp")
    outs, upds = [fetch(*o) for o in plan.outputs], [fetch(*u) for u in plan.updates]
    mem.after_run(env, upds)
    return outs, upds


def run_steps(plan: Plan, mem: Memory, env: dict, dims) -> None:
    """The plan's steps on already-bound inputs (`env`: buffer id -> handle)."""
    bufs = {b.id: b for b in plan.buffers}
    for b in plan.buffers:
        if b.kind == "const" and b.id not in env:
            env[b.id] = mem.bind(b.value, b)
    dvals = plan.dimtab.values(dims)
    for step in plan.steps:
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
            _scan(step, env, bufs, mem, dims)
        else:
            _host_op(step, env, bufs, mem, dims)


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _scan(step: ScanLoop, env, bufs, mem: Memory, dims):
    a, node, body = step.node.attrs, step.node, step.body
    nc, ns = a["n_carry"], a["n_seq"]
    ins = node.inputs
    bdims = dict(dims)  # the body's own symbolic dims, bound from the actual per-step shapes
    for i, (p, t) in enumerate(zip(a["body"].inputs, ins)):
        shape = eval_shape(t.shape[1:] if nc <= i < nc + ns else t.shape, dims)
        for d, v in zip(p.shape, shape):
            if not isinstance(d, int) and d.is_Symbol:
                bdims[d.name] = v
    T = eval_shape((a["length"],), dims)[0]
    outs = node.outputs
    sizes = [_numel(eval_shape(o.shape, dims)) // max(T, 1) if k >= nc else _numel(eval_shape(o.shape, dims))
             for k, o in enumerate(outs)]
    carries = [env[b] for b in step.inputs[:nc]]
    in_sizes = [_numel(eval_shape(t.shape[1:], dims)) for t in ins[nc:nc + ns]]
    for i in range(T):
        t = T - 1 - i if a["reverse"] else i
        for k in range(nc):  # history[t] = the carry entering this step
            o = step.outputs[len(outs) - nc + k]
            mem.copy(mem.offset(env[o], outs[k].dtype, t * sizes[k], sizes[k]), carries[k], outs[k].dtype, sizes[k])
        seq = [mem.offset(env[b], x.dtype, t * n, n) for b, x, n in zip(step.inputs[nc:nc + ns], ins[nc:], in_sizes)]
        benv = {}
        handles = carries + seq + [env[b] for b in step.inputs[nc + ns:]]
        for b in body.buffers:
            if b.kind == "input":
                benv[b.id] = handles[b.index]
        if step.status:
            benv[step.status[0]] = env[step.status[1]]
        run_steps(body, mem, benv, bdims)
        res = [benv[bid] for bid, _ in body.outputs]
        carries = res[:nc]
        for k, r in enumerate(res[nc:]):
            o = nc + k
            mem.copy(mem.offset(env[step.outputs[o]], outs[o].dtype, t * sizes[o], sizes[o]), r, outs[o].dtype, sizes[o])
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
        env[o] = mem.bind(v, bufs[o])
