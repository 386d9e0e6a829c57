"""The NumPy backend's workspace: the memory plan's buffers placed in one byte arena.

graphc.passes.memory.plan_buffers decides which intermediates live in workspace buffers (each a tensor,
or a chain of tensors computed in place over the one before) and when each buffer is live. Here they
are placed by the shared arena planner (graphc.backends.schedule.arena, as llvm places its own): for
each binding of the symbolic dims the buffers' sizes are evaluated and the placement made once
(Layout, cached per binding); each thread gets its own arena per binding (Workspace), and each buffer
is an ndarray view over that arena's bytes with its dtype and shape, aligned. Buffers of any dtypes and
sizes share memory when their lifetimes do not overlap.

memory_plan(graph, dims) is the report behind `f.memory_plan(N=64)`.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import sympy

from graphc import shapes as _sh
from graphc._aligned import aligned_bytes
from graphc.errors import ShapeError
from graphc.ir import Graph, Trait
from graphc.passes.memory import BufferPlan, equal_size_groups, fresh, lifetimes, nbytes, plan_buffers
from ..schedule.arena import DEFAULT_ALIGN, ArenaPlan, plan_arena
from .spellings import dims_code

ALIGN = DEFAULT_ALIGN
#: placements kept per compiled function (one per binding of the dims its buffer sizes depend on)
PLACEMENTS_KEPT = 64
#: arenas kept per thread and compiled function (the latest bindings)
ARENAS_KEPT = 2


class Layout:
    """Where each buffer of a BufferPlan lies in the arena, per binding of the symbolic dims."""

    def __init__(self, plan: BufferPlan):
        self.buffers = plan.buffers
        self.dtypes = [np.dtype(b.dtype) for b in plan.buffers]
        #: the dims the buffer sizes depend on, in the order of a binding's key
        self.symbols = sorted({s.name for b in plan.buffers for s in _sh.free_symbols(b.shape)})
        #: the slots of equal-size buffers stacked side by side (the plan that shares only equal sizes),
        #: tried as one more placement order: the arena never needs more than that plan
        self.groups = equal_size_groups(plan)
        self.group_order = sorted(range(len(self.buffers)), key=lambda k: (self.groups[k], self.buffers[k].first, k))
        src = (f"def _shapes({', '.join(self.symbols)}):\n"
               f"    return ({''.join(dims_code(b.shape) + ', ' for b in self.buffers)})\n")
        ns = {"math": math}
        exec(compile(src, "<graphc-numpy-workspace>", "exec"), ns)
        self._shapes = ns["_shapes"]
        self._placed: dict = {}
        self._lock = threading.Lock()

    def key(self, dims) -> tuple:
        """The binding of the dims the sizes depend on, from a call's `dims` ({name: int})."""
        try:
            return tuple(dims[s] for s in self.symbols)
        except KeyError as e:
            raise ShapeError(f"workspace sizes depend on dim {e.args[0]}, which the inputs do not bind "
                             f"(bound: {dict(dims)})") from None

    def place(self, key: tuple) -> tuple[ArenaPlan, list[tuple]]:
        """(arena placement, buffer shapes) for binding `key`; made once per binding."""
        got = self._placed.get(key)
        if got is None:
            shapes = [tuple(int(d) for d in s) for s in self._shapes(*key)]
            sizes = [math.prod(s) * dt.itemsize for s, dt in zip(shapes, self.dtypes)]
            arena = plan_arena([(b.first, b.last, n) for b, n in zip(self.buffers, sizes)], ALIGN,
                               [self.group_order])
            got = arena, shapes
            with self._lock:
                if len(self._placed) >= PLACEMENTS_KEPT:
                    self._placed.pop(next(iter(self._placed)))
                self._placed[key] = got
        return got

    def views(self, key: tuple) -> list[np.ndarray]:
        """A new arena for binding `key`, and each buffer as a view over it."""
        arena, shapes = self.place(key)
        raw = aligned_bytes(arena.total, ALIGN)
        views = []
        for off, shape, dt in zip(arena.offsets, shapes, self.dtypes):
            lo = off
            views.append(raw[lo:lo + math.prod(shape) * dt.itemsize].view(dt).reshape(shape))
        return views

    def bound_expr(self):
        """An upper bound on the arena's bytes for every binding, as an expression in the symbolic dims:
        the equal-size groups' slots side by side (one of the orders every placement tries)."""
        slots = {}
        for g, b in zip(self.groups, self.buffers):
            slots[g] = _slot(b.nbytes)
        return sum(slots.values(), 0)


def _slot(n):
    """Bytes an arena slot for `n` bytes takes (at least one aligned slot), `n` maybe symbolic."""
    if isinstance(n, int):
        return -(-max(n, 1) // ALIGN) * ALIGN
    if not (n - 1).is_nonnegative:
        n = sympy.Max(n, 1)
    return sympy.ceiling(n / ALIGN) * ALIGN


class Workspace(threading.local):
    """One compiled function's arenas in the calling thread, by dims binding (the latest ARENAS_KEPT):
    concurrent calls from several threads never share a buffer."""

    def __init__(self, layout: Layout):
        self.layout, self.arenas = layout, {}
        self.last = (None, ())

    def get(self, dims) -> list:
        """The buffers (views over this thread's arena) for a call with `dims`."""
        if self.last[0] == dims:  # the common case: the same batch size as the previous call
            return self.last[1]
        key = self.layout.key(dims)
        ws = self.arenas.get(key)
        if ws is None:
            ws = self.layout.views(key)
            if len(self.arenas) >= ARENAS_KEPT:
                self.arenas.pop(next(iter(self.arenas)))
            self.arenas[key] = ws
        self.last = (dict(dims), ws)
        return ws


# ---- the report ------------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """Planned vs naive memory for a compiled graph (bytes; symbolic exprs where dims are symbolic)."""
    peak_bytes: object        # planned peak: the arena + the live self-allocated results, for `dims`
    naive_bytes: object       # every intermediate in its own allocation, kept to the end of the call
    peak_bytes_expr: object   # an upper bound on the planned peak for every binding of the dims
    naive_bytes_expr: object
    workspace_bytes: object   # the arena (allocated once per thread and dims); a bound if dims are unbound
    buffers: list             # [(dtype, elements)] workspace buffers
    assignment: dict          # tensor label -> buffer index
    in_place: list            # labels of tensors computed in place over a dying input
    dims: dict
    lifetimes: list           # [(first step, last step)] of each buffer
    offsets: list | None      # byte offset of each buffer in the arena (None unless dims bind the sizes)

    def __str__(self):
        return (f"MemoryPlan: peak {self.peak_bytes} bytes (naive {self.naive_bytes}); "
                f"{len(self.buffers)} workspace buffers in an arena of {self.workspace_bytes} bytes "
                f"for {len(self.assignment)} tensors, {len(self.in_place)} computed in place")


def _eval(expr, dims):
    if isinstance(expr, int) or not dims:
        return expr
    v = sympy.sympify(expr).subs({_sh.dim_symbol(k): int(v) for k, v in dims.items()})
    return int(v) if v.is_Integer else v


def memory_plan(graph: Graph, dims: dict | None = None) -> MemoryPlan:
    """The memory report of the NumPy backend's plan for `graph` (optimised): the arena's bytes as
    placed for `dims` (when they bind every size) plus the peak of the self-allocated results live at
    once, against the naive sum of every intermediate."""
    dims = dict(dims or {})
    plan = plan_buffers(graph)
    life, _, _ = lifetimes(graph)
    computed = [(i, o) for i, n in enumerate(graph.nodes) if not n.op.has(Trait.LEAF) and fresh(n)
                for o in n.outputs]
    naive = sum((nbytes(o) for _, o in computed), 0)
    events: dict = {}
    for i, o in computed:
        if id(o) not in plan.assign:
            events.setdefault(i, []).append(nbytes(o))
            events.setdefault(life[id(o)][1] + 1, []).append(-nbytes(o))
    live, peaks = 0, [0]
    for i in sorted(events):
        live = live + sum(events[i])
        peaks.append(live)
    own_peak = sympy.Max(*peaks) if any(not isinstance(p, int) for p in peaks) else max(peaks)
    layout = Layout(plan)
    bound = layout.bound_expr()
    offsets = None
    if all(s in dims for s in layout.symbols):
        arena, _ = layout.place(layout.key(dims))
        ws, offsets = arena.total, list(arena.offsets)
        peak = ws + _eval(own_peak, dims)
    else:
        ws = _eval(bound, dims)
        peak = _eval(bound + own_peak, dims)
    labels = {id(o): o.label for _, o in computed}
    return MemoryPlan(peak, _eval(naive, dims), bound + own_peak, naive, ws,
                      [(b.dtype, b.elements) for b in plan.buffers],
                      {labels[t]: k for t, k in plan.assign.items()}, [labels[t] for t in plan.in_place],
                      dims, [(b.first, b.last) for b in plan.buffers], offsets)
