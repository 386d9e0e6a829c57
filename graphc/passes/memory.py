"""Memory planning and scheduling (backend-neutral: lifetimes and in-place decisions).

schedule (a pass): a topological order, chosen greedily to free memory early (the order backends run).
lifetimes: when each computed tensor is written and last read (views keep their bases alive).
plan_buffers: which intermediates live in workspace buffers, each with its lifetime (an elementwise op
whose input dies writes in place, continuing that input's buffer), used by the NumPy backend, which
places them in one byte arena with the shared planner (backends/numpy/workspace.py, where the report
behind `f.memory_plan(N=64)` is made).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from .. import shapes as _sh
from ..ir import Graph, Node, Tensor, Trait
from ..ops.fused import Fused
from .rewrite import users, with_order

_LEAF_OR_ELEMENTWISE = Trait.LEAF | Trait.ELEMENTWISE
#: value used for symbolic dims when sizes must be compared (schedule heuristics)
TYPICAL_DIM = 64


def nbytes(t: Tensor):
    """Bytes of `t` (an int, or a sympy expression in the symbolic dims)."""
    return _sh.size(t.shape) * np.dtype(t.dtype).itemsize


_typical_cache: dict = {}


def typical(expr) -> int:
    """An int for a byte count, symbolic dims set to TYPICAL_DIM (memoised: sympy subs is slow)."""
    if isinstance(expr, int):
        return expr
    if expr not in _typical_cache:
        _typical_cache[expr] = int(expr.subs({s: TYPICAL_DIM for s in expr.free_symbols}))
    return _typical_cache[expr]


def fresh(node: Node) -> bool:
    """The result is new memory (Trait.FRESH); any other op may return a view of an input (reshape)."""
    return node.op.has(Trait.FRESH)


def writes_into_buffer(node: Node) -> bool:
    """The NumPy backend can compute this node into a given buffer (Trait.WRITES_INTO: matmul out=,
    fused; an elementwise op whose NumPy function is a ufunc: out=)."""
    op = node.op
    if op.has(Trait.WRITES_INTO):
        return True
    return op.has(Trait.ELEMENTWISE) and isinstance(getattr(op, "fn", None), np.ufunc)


def in_place_ok(node: Node, x: Tensor) -> bool:
    """May `node` write its result over input `x` (same shape and dtype; elementwise reads)?"""
    out = node.outputs[0]
    if len(node.outputs) != 1 or x.dtype != out.dtype or len(x.shape) != len(out.shape) or not all(
            _sh.dims_equal(a, b) for a, b in zip(x.shape, out.shape)):
        return False
    if node.op is Fused:  # a pure elementwise body reads each element before it writes it
        return all(n.op.has(_LEAF_OR_ELEMENTWISE) for n in node.attrs["body"].nodes)
    return writes_into_buffer(node) and node.op.has(Trait.ELEMENTWISE)


# ---- lifetimes -------------------------------------------------------------------------------------

def lifetimes(graph: Graph) -> tuple[dict, dict, set]:
    """({id(t): (def position, last use)}, {id(t): base tensor id}, escaping ids) for computed tensors.
    A view keeps its base alive; roots (outputs, update values) and their bases escape."""
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    end = len(graph.nodes)
    life, base = {}, {}
    for i, n in enumerate(graph.nodes):
        for o in n.outputs:
            life[id(o)] = [i, i]
        if not n.op.has(Trait.LEAF) and not fresh(n):
            for o in n.outputs:  # may alias any input
                base[id(o)] = [id(t) for t in n.inputs]
    for t_id, readers in users(graph).items():
        if t_id in life:
            life[t_id][1] = max(pos[id(r)] for r in readers)
    escaping = {id(t) for t in graph.roots}
    for t in graph.roots:
        life[id(t)][1] = end
    for n in reversed(graph.nodes):  # views extend their bases' lives; a returned view escapes its base
        for o in n.outputs:
            for b in base.get(id(o), ()):
                life[b][1] = max(life[b][1], life[id(o)][1])
                if id(o) in escaping:
                    escaping.add(b)
    return {k: tuple(v) for k, v in life.items()}, base, escaping


# ---- buffer assignment -----------------------------------------------------------------------------

@dataclass
class Buffer:
    """A planned workspace buffer: one tensor, or a chain of tensors each computed in place over the
    one before; live from step `first` (its first write) to step `last` (its last read), inclusive."""
    dtype: str
    shape: tuple
    first: int
    last: int

    @property
    def elements(self):
        return _sh.size(self.shape)

    @property
    def nbytes(self):
        return self.elements * np.dtype(self.dtype).itemsize


@dataclass
class BufferPlan:
    """Which computed tensors live in workspace buffers (their memory is placed by the backend: the
    NumPy backend puts them in one byte arena per thread and dims, backends/schedule/arena.py)."""
    buffers: list = field(default_factory=list)       # [Buffer]
    assign: dict = field(default_factory=dict)        # id(tensor) -> buffer index
    in_place: dict = field(default_factory=dict)      # id(tensor) -> id(input it overwrote)
    free_after: dict = field(default_factory=dict)    # node position -> [id(t)] self-allocated, dead after


def plan_buffers(graph: Graph) -> BufferPlan:
    """Every intermediate the NumPy backend can compute into a given buffer (not returned, not a view's
    base that escapes) gets a buffer with its lifetime; an elementwise result whose input dies at its
    step takes over that input's buffer (in place). Which buffers share memory is decided by lifetimes
    alone when they are placed in the arena."""
    life, base, escaping = lifetimes(graph)
    aliased = {b for bs in base.values() for b in bs}
    plan = BufferPlan()
    taken: set[int] = set()   # buffers already continued in place at this step
    for i, n in enumerate(graph.nodes):
        if n.op.has(Trait.LEAF):
            continue
        for o in n.outputs:
            if id(o) in escaping or not fresh(n):
                continue
            if len(n.outputs) == 1 and writes_into_buffer(n):
                _assign(plan, n, o, i, life, aliased, taken)
            elif life[id(o)][1] > i:
                plan.free_after.setdefault(life[id(o)][1], []).append(id(o))
        taken.clear()
    return plan


def _assign(plan, n, o, i, life, aliased, taken):
    k = None
    for x in n.inputs:  # in place over an input that dies here
        kx = plan.assign.get(id(x))
        if (kx is not None and kx not in taken and life[id(x)][1] == i and plan.buffers[kx].last == i
                and id(x) not in aliased and in_place_ok(n, x)):
            k = kx
            taken.add(k)
            plan.in_place[id(o)] = id(x)
            plan.buffers[k].last = life[id(o)][1]
            break
    if k is None:
        k = len(plan.buffers)
        plan.buffers.append(Buffer(o.dtype, tuple(o.shape), i, life[id(o)][1]))
    plan.assign[id(o)] = k


def equal_size_groups(plan: BufferPlan) -> list[int]:
    """A group for each buffer: buffers of one group have the same dtype and size and disjoint
    lifetimes, so one slot holds them all in turn (greedy by first use: the fewest slots per size).
    These slots side by side are a simple placement (sharing only between equal sizes) that the arena
    placement never exceeds (see backends/numpy/workspace.py)."""
    bufs = plan.buffers
    group, free, live, count = [0] * len(bufs), {}, [], 0
    for k in sorted(range(len(bufs)), key=lambda k: (bufs[k].first, k)):
        b = bufs[k]
        while live and live[0][0] < b.first:  # slots whose buffer died before this one starts
            _, g, key = heapq.heappop(live)
            free.setdefault(key, []).append(g)
        key = (b.dtype, b.elements)
        if free.get(key):
            g = free[key].pop()
        else:
            g, count = count, count + 1
        group[k] = g
        heapq.heappush(live, (b.last, g, key))
    return group


# ---- scheduling ------------------------------------------------------------------------------------

def live_peak(graph: Graph, order: list[Node]) -> int:
    """Peak bytes of simultaneously live computed results for `order` (symbolic dims at TYPICAL_DIM)."""
    pos = {id(n): i for i, n in enumerate(order)}
    last = {}
    for n in order:
        for t in n.inputs:
            last[id(t)] = max(last.get(id(t), 0), pos[id(n)])
    for t in graph.roots:
        last[id(t)] = len(order)
    delta = [0] * (len(order) + 2)
    for i, n in enumerate(order):
        if n.op.has(Trait.LEAF) or not fresh(n):
            continue
        for o in n.outputs:
            b = typical(nbytes(o))
            delta[i] += b
            delta[last.get(id(o), i) + 1] -= b
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


def _greedy_order(graph: Graph) -> list[Node]:
    """Greedy list scheduling: of the ready nodes, the one with the lowest (bytes allocated - bytes
    freed, position) next. A node's score only falls (an input's last other reader is scheduled), so a
    heap with a fresh entry pushed on each fall gives the same order as a scan of the ready list, in
    O(n log n)."""
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    succ: list[list[int]] = [[] for _ in nodes]
    indeg = [0] * len(nodes)
    for i, n in enumerate(nodes):
        for j in {index[id(t.node)] for t in n.inputs}:
            succ[j].append(i)
            indeg[i] += 1
    readers = users(graph)
    remaining = {t_id: len(v) for t_id, v in readers.items()}  # readers not yet scheduled
    size = {id(o): typical(nbytes(o)) for n in nodes for o in n.outputs}
    roots = {id(t) for t in graph.roots}
    fresh_alloc = [sum(size[id(o)] for o in n.outputs) if fresh(n) else 0 for n in nodes]
    # leaves, and ops that start asynchronous work (`schedule_early`: a collective's start), go as soon as ready
    leaf = [n.op.has(Trait.LEAF) or getattr(n.op, "schedule_early", False) for n in nodes]
    distinct_ins = [list({id(t): t for t in n.inputs}.values()) for n in nodes]
    freeable = {id(t) for n in nodes for t in n.inputs if id(t) not in roots and not t.node.op.has(Trait.LEAF)}

    def score(i):
        if leaf[i]:
            return -10 ** 18
        freed = sum(size[id(t)] for t in distinct_ins[i] if remaining.get(id(t)) == 1 and id(t) in freeable)
        return fresh_alloc[i] - freed

    ready = [(score(i), i) for i in range(len(nodes)) if indeg[i] == 0]
    heapq.heapify(ready)
    is_ready = [indeg[i] == 0 for i in range(len(nodes))]
    done = [False] * len(nodes)
    order = []
    while ready:
        sc, i = heapq.heappop(ready)
        if done[i] or sc != score(i):
            continue   # scheduled already, or a stale entry (a fresher, lower one was pushed)
        done[i] = True
        order.append(nodes[i])
        for t in distinct_ins[i]:
            left = remaining.get(id(t), 1) - 1
            remaining[id(t)] = left
            if left == 1 and id(t) in freeable:   # its last reader now frees it: that reader's score fell
                for r in readers[id(t)]:
                    k = index[id(r)]
                    if not done[k]:
                        if is_ready[k]:
                            heapq.heappush(ready, (score(k), k))
                        break
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                is_ready[j] = True
                heapq.heappush(ready, (score(j), j))
    return order


def schedule(graph: Graph, log) -> Graph:
    """Reorder nodes to lower peak live memory (greedy: prefer nodes that free more than they allocate);
    keeps the original order when the greedy one is not better."""
    out = Graph(graph.inputs, graph.outputs, graph.updates, graph.name)
    order = _greedy_order(out)
    before, after = live_peak(out, out.nodes), live_peak(out, order)
    if after < before:
        log["peak bytes (typical dims) before"] = before
        log["after"] = after
        return with_order(out, order)
    return out
