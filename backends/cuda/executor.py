"""Runs cuda's symbolic schedule (lower.CudaSchedule) on a memory runtime: device memory through the
CUDA driver (runtime.py) or host memory for the emulation (cuda_emulated/build.py).

Per binding of the dims (cached, `Bound`): the schedule's arena layout (Schedule.layout: the shared
planner), every size, grid, loop length and slice window evaluated, and the GcDims values. Per call:
the arena (one per function, per thread on the emulation, grown when a bigger batch needs more),
inputs/parameters/constants bound, one fresh buffer per output slot, then the steps: launches, host
steps (the node's NumPy impl on downloaded views, its result uploaded), loop steps (the body's steps
once per iteration, slice buffers moved to the iteration's window); the status word is read at the
end and a non-zero code raised as the error it stands for."""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from graphc.backends.schedule.plan import Schedule
from graphc.backends.schedule.steps import HostStep, LoopStep
from graphc.backends.schedule.views import View


class Bound:
    """A schedule's sizes for one binding of the dims."""

    def __init__(self, s: Schedule, dims: dict):
        self.dims = dict(dims)
        self.layout = s.layout(dims)
        self.nbytes = self.layout.nbytes
        self.dvals = s.dt.values(dims)
        self._memo: dict = {}
        self._s = s
        self.grids: dict[int, tuple] = {}
        self.lengths: dict[int, int] = {}
        self._walk(s.steps)

    def ev(self, x) -> int:
        """A size expression's value for this binding (memoised)."""
        if isinstance(x, (int, np.integer)):
            return int(x)
        v = self._memo.get(x)
        if v is None:
            v = self._memo[x] = self._s.evaluate(x, self.dims)
        return v

    def _walk(self, steps) -> None:
        for st in steps:
            if isinstance(st, LoopStep):
                self.lengths[id(st)] = self.ev(st.length)
                self._walk(st.body)
            elif not isinstance(st, HostStep):
                self.grids[id(st)] = tuple(int(g) for g in st.grid(self.ev))

    def shape(self, shape) -> tuple:
        return tuple(self.ev(d) for d in shape)


def bound(s: Schedule, dims: dict) -> Bound:
    """The schedule's Bound for `dims` (cached on the schedule, bounded)."""
    cache = s.__dict__.setdefault("_bound", {})
    key = tuple(sorted(dims.items()))
    b = cache.get(key)
    if b is None:
        if len(cache) >= 64:
            cache.clear()
        b = cache[key] = Bound(s, dims)
    return b


class Memory:
    """What the executor needs from a runtime; handles are device pointers or host uint8 arrays.

    The arena policy is here, the same for every runtime: one arena per function (per thread when
    `per_thread_arena`: calls that may run concurrently), allocated at the first call and replaced
    by a larger one when a call needs more (a bigger batch)."""
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

    def temp(self, base, offset: int, nbytes: int):
        """An arena buffer: `nbytes` at byte `offset` of the arena `base`."""
        return self.sub(base, offset, nbytes)

    def sub(self, handle, offset: int, nbytes: int):
        """Bytes [offset, offset + nbytes) of a buffer (a loop iteration's slice window)."""
        raise NotImplementedError

    def bind(self, array: np.ndarray, kind: str, key):
        """An input, parameter (key: its index) or constant (key: a stable identity) as a buffer."""
        raise NotImplementedError

    def alloc(self, nbytes: int):
        """A fresh buffer for an output slot (the call's result)."""
        raise NotImplementedError

    def pointer(self, handle) -> int:
        raise NotImplementedError

    def read(self, handle, nbytes: int, copy: bool) -> np.ndarray:
        """The buffer's bytes as a uint8 array (host memory: the buffer itself unless `copy`)."""
        raise NotImplementedError

    def write(self, handle, data: np.ndarray) -> None:
        """Write uint8 bytes at the buffer's start."""
        raise NotImplementedError

    def zero(self, handle, nbytes: int) -> None:
        raise NotImplementedError

    def launch(self, kernel: str, grid: tuple, block: tuple, params, sync: bool) -> None:
        raise NotImplementedError

    def after_run(self, outs: list, updates: list) -> None:
        """Called once the outputs are read: `updates` = (parameter index, handle, host array) of each
        update value (the device keeps it as the parameter's copy), `outs` the output handles."""


class _Slot:
    """Where a runtime whose calls are serialised keeps its one arena."""
    arena = None


def pack_params(pointers: list[int], dims_values: np.ndarray):
    """cuLaunchKernel's `void** kernelParams`: the address of each argument value (pointers, then GcDims)."""
    holders = [ctypes.c_void_p(p) for p in pointers]
    addrs = [ctypes.addressof(h) for h in holders] + [dims_values.ctypes.data]
    arr = (ctypes.c_void_p * len(addrs))(*addrs)
    return arr, (holders, dims_values)


def execute(s: Schedule, mem: Memory, inputs, params, dims):
    """Run the schedule for one call: (outputs, update values)."""
    bd = bound(s, dims)
    lay = bd.layout
    base = mem.arena(lay.total)
    env = {}
    outs = {}
    for b, buf in enumerate(s.buffers):
        if buf.kind == "arena" and b in lay.offsets:
            env[b] = mem.temp(base, lay.offsets[b], bd.nbytes[b])
        elif buf.kind == "input":
            env[b] = mem.bind(inputs[buf.index], "input", buf.index)
        elif buf.kind == "param":
            env[b] = mem.bind(params[buf.index], "param", buf.index)
        elif buf.kind == "const":
            env[b] = mem.bind(s.consts[buf.index], "const", (id(s), buf.index))
    for j, b in enumerate(s.out_bufs):
        env[b] = outs[j] = mem.alloc(bd.nbytes[b])
    if s.status is not None:
        mem.zero(env[s.status.buf], 8)
    _run(s, s.steps, bd, mem, env)
    if s.status is not None:
        code = int(mem.read(env[s.status.buf], 8, True).view(np.int64)[0])
        if code:
            mem.after_run(list(outs.values()), [])
            raise s.status_error(code)
    roots = s.graph.roots
    res = []
    for j, t in enumerate(roots):
        b = s.out_bufs[j]
        res.append(mem.read(outs[j], bd.nbytes[b], False).view(t.dtype).reshape(bd.shape(s.shape(t))))
    n_out = len(s.graph.outputs)
    pidx = {id(p): i for i, p in enumerate(s.graph.parameters)}
    upds = [(pidx[id(p)], outs[n_out + k], res[n_out + k]) for k, (p, _) in enumerate(s.graph.updates)]
    mem.after_run([outs[j] for j in range(n_out)], upds)
    return res[:n_out], res[n_out:]


def _run(s: Schedule, steps, bd: Bound, mem: Memory, env: dict) -> None:
    for st in steps:
        if isinstance(st, HostStep):
            _host(s, st, bd, mem, env)
        elif isinstance(st, LoopStep):
            _loop(s, st, bd, mem, env)
        else:
            grid = bd.grids[id(st)]
            if min(grid) <= 0:
                continue
            arr, keep = pack_params([mem.pointer(env[a]) for a in st.args], bd.dvals)
            mem.launch(st.kernel, grid, st.block, arr, st.sync)


def _loop(s: Schedule, st: LoopStep, bd: Bound, mem: Memory, env: dict) -> None:
    """The body's steps once per iteration, each slice buffer at its iteration's window of its parent."""
    T = bd.lengths[id(st)]
    wins = [(b, s.buffers[b].index, bd.ev(s.buffers[b].offset), bd.ev(s.buffers[b].stride), bd.nbytes[b])
            for b in st.slices]
    for i in range(T):
        t = T - 1 - i if st.reverse else i
        for b, parent, off, stride, n in wins:
            env[b] = mem.sub(env[parent], off + t * stride, n)
        _run(s, st.body, bd, mem, env)


def _host(s: Schedule, st: HostStep, bd: Bound, mem: Memory, env: dict) -> None:
    """The node's NumPy impl on its input views (read from their buffers), its results written back."""
    results = {}

    def array_of(v: View) -> np.ndarray:
        shape = bd.shape(v.shape)
        if v.literal is not None:
            return np.broadcast_to(np.asarray(bd.ev(v.literal) if not np.isscalar(v.literal) else v.literal,
                                              v.dtype), shape)
        if any(v is o for o in st.outs):
            return results.setdefault(id(v), np.empty(shape, v.dtype))
        item = np.dtype(v.dtype).itemsize
        if 0 in shape:
            return np.empty(shape, v.dtype)
        data = mem.read(env[v.buf], bd.nbytes[v.buf], False)
        return np.ndarray(shape, v.dtype, buffer=data, offset=bd.ev(v.offset) * item,
                          strides=[bd.ev(x) * item for x in v.strides])
    st.run(array_of, bd.dims)
    for v in st.outs:   # fresh contiguous buffers (Schedule.host)
        a = np.ascontiguousarray(array_of(v))
        if a.nbytes:
            mem.write(env[v.buf], a.reshape(-1).view(np.uint8))
