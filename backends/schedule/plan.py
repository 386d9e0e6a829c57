"""One native schedule: the backend-neutral plan of an optimised graph, which a native backend renders
(kernel steps -> LLVM IR / CUDA C) and runs. A schedule is either concrete (built for one binding of the
graph's dims: every size an int; llvm builds one per specialisation) or symbolic (`dims=None`: built
once, shapes/strides/offsets/byte sizes are sympy expressions over the dims, evaluated per call; the
arena is placed per binding by `layout(dims)`; cuda compiles once for every batch size).

Data model
----------
- Buffer (steps.Buffer): a block of memory of a kind: `input`, `param`, `const` (the caller's and the
  graph's arrays, by index), `out` (output slot j of graph.roots), `arena` (scratch memory at a byte
  offset into one arena), `slice` (one loop iteration's window of a parent buffer). `Schedule.buffers`
  is the list of them; a buffer is named by its index there.
- View (views.View): what a tensor is at run time: a buffer id, an element offset, a shape,
  strides in elements (any sign; 0 broadcasts), a dtype; or a scalar literal broadcast to a shape (no
  buffer). `Schedule.view` maps id(tensor) -> View. Movement ops only make views (reshape of a
  contiguous view, transpose, broadcast_to, getitem, stop_gradient): several tensors share one buffer.
- Steps (`Schedule.steps`, in execution order):
    kernel steps: the backend's objects, opaque here; each has `bufs` (ids of the buffers it reads
      or writes) and gets `node` (the node it was planned for, for error messages);
    steps.HostStep(node, ins, outs): the node's NumPy impl on the host, for an op without a row in
      the backend's table or a case its row does not cover (the handler raised NotLowerable); the
      op's name is listed in `Schedule.fallback` (-> program.info["fallback_ops"]);
    steps.LoopStep(length, reverse, body, slices): gc.scan as a native loop (length: an int or an
      expression); its body is a list of
      kernel steps (a body needing the host is not lowered: the whole scan runs on the host), its
      `slices` are slice buffers that move by a byte stride each iteration (sequences, stacked ys, the
      carry history).
- Lifetimes: every buffer records the first and last step index touching it (`touch`, done by `add`);
  everything a loop body touches is live for the whole loop step. The arena planner
  (arena.plan_arena) gives buffers with disjoint lifetimes overlapping memory; `arena_bytes` is the
  total (symbolic: `layout(dims)` places the arena for one binding, cached). The status word (below)
  is live for the whole program.
- Output slots: a root tensor is computed straight into its output buffer when its node asks `fresh`
  for it; otherwise (a root that is a view, an input, a constant, a second root of the same tensor)
  a copy step into the slot is added at the end.
- Status word (`status`, int64, arena): a kernel that finds a bad index at run time (take, take_grad)
  or, under sanitize="bounds", a bad memory access stores its code there; `status_code(node, what)`
  hands out codes (status.StatusCodes), and `status_error(code)` is the GraphcError the runtime raises
  after the call, naming the node and the user's line that built it.

The walk
--------
Leaves get buffers or literals; every other node is planned by its row in the backend's op-keyed table
(`table`: op object -> handler(schedule, node, ins) that adds steps and sets the views of the node's
outputs). An op without a row, or a row raising NotLowerable, runs on the host (a HostStep; steps,
buffers and output slots the row planned before it gave up are dropped). `ROWS`
below are the backend-neutral rows (constants, views, fused bodies, scan loops, concatenate); a
backend's table includes them and may override any. A backend provides `copy(dst, src)` (a kernel
step, converting dtype) and may override `walk_body` (how the nodes of a fused or scan body are
planned, e.g. fusing per-element runs into one loop).
"""
from __future__ import annotations

import numpy as np

from graphc import shapes as _sh
from graphc.errors import GraphcError
from graphc.ir import Graph, Node, Trait
from graphc.ops import shape_ops as S
from graphc.ops.core import ConstantOp, StopGradient
from graphc.ops.fused import Fused
from graphc.ops.scan import Scan

from .arena import DEFAULT_ALIGN, plan_arena
from .status import StatusCodes
from .steps import Buffer, HostStep, LoopStep
from .views import (View, as_int, broadcast_strides, contig_strides, contiguous_view, extent, is_int, literal_view,
                    nbytes, product, view_getitem, view_reshape, view_slice)

__all__ = ["NotLowerable", "ROWS", "row", "Schedule", "Buffer", "HostStep", "LoopStep", "View"]


class NotLowerable(Exception):
    """This op/dtype/case has no native lowering: the node runs on the host (listed in fallback_ops)."""


def registrar(table: dict):
    """A decorator factory for an op-keyed table: `@reg(op, ...)` makes `fn(schedule, node, ins)` the
    row of each op (backends use it for their own tables, e.g. llvm's `table.lowers`)."""
    def reg(*ops):
        def deco(fn):
            for op in ops:
                table[op] = fn
            return fn
        return deco
    return reg


#: the backend-neutral rows: op -> handler(schedule, node, ins)
ROWS: dict = {}
row = registrar(ROWS)


class Schedule:
    """The plan of one specialisation: buffers, views, steps, lifetimes, arena (module docstring)."""

    #: the backend's op-keyed table (op -> handler(schedule, node, ins)); subclasses set their own
    table: dict = ROWS
    #: arena offsets are multiples of this
    align: int = DEFAULT_ALIGN
    #: keep the first-use arena placement (freed memory reused while still in cache) unless a tighter
    #: order saves more than this fraction (plan_arena's `locality`; LeNet inference on llvm ran ~5%
    #: slower with a 3% smaller largest-first arena)
    arena_locality: float = 0.125
    #: the backend's name in messages
    backend: str = "native"
    #: move the kernel steps that read only parameters, constants and each other's results to the front
    #: (`prologue`): a runtime honouring it runs them once and again only when a parameter they read
    #: changes (a concrete schedule, not under sanitize="bounds"; a backend opts in)
    hoist_invariants: bool = False
    #: a scan body may compute a new carry straight into the carry's buffer where that is safe (_scan):
    #: the backend marks its kernels that read element by element (`per_element`, _in_place_unsafe)
    carry_in_place: bool = False
    #: threads a row-separable scan may be split over, one part of the batch rows each (rows.py); 1: never
    row_parts: int = 1

    def __init__(self, graph: Graph, dims: dict | None, bounds: bool = False):
        self.graph = graph
        self.bounds = bounds   # sanitize="bounds": every kernel access checked (by the renderer)
        self.symbolic = dims is None   # sizes are expressions over the dims, evaluated per call
        self.dims = dict(dims or {})
        # concrete: symbol -> int; symbolic: a scan body's own symbols -> the outer expressions they are
        self.bind = {_sh.dim_symbol(k): v for k, v in self.dims.items()}
        self._layouts: dict = {}
        self.buffers: list[Buffer] = []
        self.steps: list = []
        self.view: dict[int, View] = {}
        self.consts: list[np.ndarray] = []
        self.fallback: set[str] = set()
        self.kinds = {"input": 0, "param": 0, "const": 0, "out": 0, "arena": 0}
        roots = graph.roots
        self.root_slot = {}
        for j, t in enumerate(roots):
            self.root_slot.setdefault(id(t), j)
        self.out_bufs = [None] * len(roots)
        self.status: View | None = None  # int64 word: the code of the kernel that found a bad index or
        self.status_codes = StatusCodes()  # access (code -> (node, what)); the program raises after the call
        self.arena_bytes = 0
        self._loop_pos = None   # inside a loop body: every buffer is live for the whole loop step
        #: while the body of a top-level loop is planned (not a nested one): its top-level step list, the
        #: buffers of the scan's invariant inputs (read-only in the body), and the buffers written by the
        #: steps `before_loop` added (kept when the body's steps are dropped and planned again)
        self._top: list | None = None
        self._loop_invs: set = set()
        self._before: set = set()
        self._loop_serial = 0   # top-level loops planned so far
        #: invariant's answers (settled False, True): buffer -> bool, valid until a step writing one of
        #: them is added or a top-level step is removed
        self._inv_memo: tuple = ({}, {})
        self._node: Node | None = None   # the node being planned (kernels remember it for error messages)
        self._used = None
        self._record: list | None = None   # (step, reads, writes) of every add while a scan body is planned
        #: id(tensor) -> the view its kernel writes instead of a fresh buffer (a scan body's stacked
        #: output: this step's slice of ys, so no per-step copy); taken by the first `fresh` for it
        self.into: dict = {}
        #: while one part of a row-split scan body is planned: (ids of the row tensors, the part's rows);
        #: `shape` cuts those tensors' axis 0 to the part (rows.py)
        self._rows: tuple | None = None
        #: the first `prologue` steps depend on parameters and constants only (hoist_invariants); their
        #: results live in arena buffers of their own (never shared); `prologue_params`: the indices of
        #: the parameters they read (a new array for one of them: run the prologue again)
        self.prologue = 0
        self.prologue_params: tuple = ()
        #: buffer -> the top-level steps added to write it (invariant; a step since dropped is skipped there)
        self._writers: dict = {}
        self._params: list = []           # graph.parameters, in param-buffer index order (_build)
        self._updated: set | None = None  # ids of the parameters graph.updates replaces (invariant)
        if bounds:
            self._status_buffer()
        self._build()

    # ---- what a backend provides -------------------------------------------------------------------
    def copy(self, dst: View, src: View):
        """A kernel step writing src into dst (same shape; dtype converted as NumPy's astype)."""
        raise NotImplementedError(f"{type(self).__name__}.copy")

    def walk_body(self, body: Graph, as_root: dict) -> None:
        """Plan the nodes of a fused or scan body whose placeholders already have views. `as_root` maps
        id(body output) -> the outer tensor it is (a backend may compute it straight into an output
        slot). Default: every node by its row."""
        for n in body.nodes:
            if not n.op.has(Trait.INPUT):
                self.node(n)

    # ---- buffers and views -------------------------------------------------------------------------
    def shape(self, t) -> tuple:
        shp = self.dim_values(t.shape)
        if self._rows is not None and id(t) in self._rows[0]:
            return (self._rows[1],) + tuple(shp[1:])
        return shp

    def dim_values(self, dims) -> tuple:
        """Dims (ints or sympy expressions) as this schedule sees them: ints when concrete; symbolic:
        expressions over the graph's own dims (a scan body's symbols replaced by what they are)."""
        if not self.symbolic:
            return _sh.evaluate(dims, self.bind)
        return tuple(d if isinstance(d, int) else as_int(d.xreplace(self.bind)) for d in dims)

    def evaluate(self, x, dims: dict) -> int:
        """A size of this schedule (an int or an expression over the dims) for the binding `dims`."""
        if is_int(x):
            return int(x)
        return int(x.subs({_sh.dim_symbol(k): v for k, v in dims.items()}))

    def new_buffer(self, kind: str, nbytes: int, index=None) -> int:
        idx = self.kinds[kind] if index is None else index
        self.kinds[kind] = max(self.kinds[kind], idx + 1)
        self.buffers.append(Buffer(kind, idx, nbytes))
        return len(self.buffers) - 1

    def fresh(self, t, shape=None, dtype=None) -> View:
        """A new contiguous buffer for tensor t: the output slot if t is a root, else the arena."""
        shape = self.shape(t) if shape is None else shape
        dtype = dtype or t.dtype
        dest = self.into.pop(id(t), None) if t is not None else None
        if dest is not None and dtype == dest.dtype and tuple(shape) == tuple(dest.shape):
            return dest
        size = nbytes(shape, dtype)
        j = self.root_slot.get(id(t)) if t is not None else None
        if j is not None and self.out_bufs[j] is None and dtype == t.dtype:
            b = self.new_buffer("out", size, j)
            self.out_bufs[j] = b
        else:
            b = self.new_buffer("arena", size)
        return View(b, 0, tuple(shape), contig_strides(shape), dtype)

    def touch(self, views, step: int) -> None:
        """Views are used at `step`: extend their buffers' (and slices' parents') lifetimes."""
        for v in views:
            if v is not None and v.buf is not None:
                b = self.buffers[v.buf]
                while True:
                    b.first, b.last = min(b.first, step), max(b.last, step)
                    if b.kind != "slice":
                        break
                    b = self.buffers[b.index]

    def add(self, step, reads, writes) -> None:
        """Append a step reading `reads` and writing `writes` (views)."""
        pos = self._loop_pos if self._loop_pos is not None else len(self.steps)
        self.touch(list(reads) + list(writes), pos)
        if self._record is not None:   # a scan body being planned: its steps' views (_scan's in-place carries)
            self._record.append((step, list(reads), list(writes)))
        if not isinstance(step, (HostStep, LoopStep)):
            step.node = self._node
            # the buffers it reads and writes (hoist_prologue)
            step.io = (tuple(v.buf for v in reads if v is not None and v.buf is not None),
                       tuple(v.buf for v in writes if v is not None and v.buf is not None))
        self.steps.append(step)
        if self._loop_pos is None:
            self._wrote(step, self._step_io(step)[1])

    def _wrote(self, step, bufs) -> None:
        """A top-level step writing `bufs` was added: _writers; invariant's answers about them are void."""
        for b in bufs:
            self._writers.setdefault(b, []).append(step)
            if b in self._inv_memo[0] or b in self._inv_memo[1]:
                self._forget_invariants()

    def _forget_invariants(self) -> None:
        self._inv_memo = ({}, {})

    def pop_step(self):
        """Remove and return the step added last (a backend replacing it by a fused kernel)."""
        step = self.steps.pop()
        if self._loop_pos is None:
            for b in self._step_io(step)[1]:
                ws = self._writers.get(b)
                if ws and ws[-1] is step:
                    ws.pop()
                # (an answer that depends on b visited b: none when b is not in the memo)
                if b in self._inv_memo[0] or b in self._inv_memo[1]:
                    self._forget_invariants()
        return step

    def before_loop(self, step, reads, writes) -> bool:
        """While a top-level loop's body is planned: add `step` (reading only the loop's invariant inputs'
        buffers or buffers outside the loop's) to the top-level steps just before the loop, to run once
        rather than every iteration (a weight packed for the body's product). The buffers it writes must be
        new ones of its own. The loop's position and the lifetimes at or past it move one step on. False
        (nothing added) inside a nested loop."""
        if self._top is None or self._loop_pos is None:
            return False
        pos = self._loop_pos
        never = 1 << 60
        for b in self.buffers:
            if pos <= b.first < never:
                b.first += 1
            if b.last >= pos:
                b.last += 1
        self._top.insert(pos, step)
        self._loop_pos = pos + 1
        self.touch(list(reads) + list(writes), pos)
        step.node = self._node
        step.io = (tuple(v.buf for v in reads if v.buf is not None), tuple(v.buf for v in writes))
        self._wrote(step, step.io[1])
        self._before.update(step.io[1])
        return True

    def materialise(self, v: View, dtype=None) -> View:
        """A contiguous copy of v (converted to dtype)."""
        out = self.fresh(None, v.shape, dtype or v.dtype)
        self.add(self.copy(out, v), [v], [out])
        return out

    def slice(self, v: View, axis0_stride_bytes: int) -> tuple[int, View]:
        """A per-iteration slice v[t] of a (length, ...) view: a buffer that moves by the stride. Its
        size is one slice's extent; every iteration's window is checked against the parent here."""
        item = np.dtype(v.dtype).itemsize
        inner = View(None, 0, v.shape[1:], v.strides[1:], v.dtype)
        lo, hi = extent(inner)
        if lo < 0:
            raise NotLowerable("scan")   # negative inner strides: not a forward window
        size = (hi + 1) * item if not is_int(inner.size) or inner.size else 0
        parent = self.buffers[v.buf]
        static = all(is_int(x) for x in (v.shape[0], size, axis0_stride_bytes, v.offset, parent.nbytes))
        for t in {0, max(v.shape[0] - 1, 0)} if static else ():
            start = v.offset * item + t * axis0_stride_bytes
            if inner.size and v.shape[0] and not (0 <= start and start + size <= parent.nbytes):
                raise GraphcError(f"internal error (a graphc bug, please report it): {self.backend} plan of scan "
                                  f"step {t} reads bytes [{start}, {start + size}) of a {parent.nbytes}-byte buffer")
        self.buffers.append(Buffer("slice", v.buf, as_int(size), offset=as_int(v.offset * item),
                                   stride=as_int(axis0_stride_bytes)))
        b = len(self.buffers) - 1
        return b, View(b, 0, v.shape[1:], v.strides[1:], v.dtype)

    # ---- run-time status ---------------------------------------------------------------------------
    def _status_buffer(self) -> View:
        """The arena word a checking kernel sets (live for the whole program, never shared)."""
        if self.status is None:
            b = self.new_buffer("arena", 8)
            self.buffers[b].first, self.buffers[b].last = 0, 1 << 59
            self.status = View(b, 0, (1,), (1,), "int64")
        return self.status

    def status_code(self, node: Node | None, what: str) -> int:
        """The code a kernel stores in the status word to report `what` about `node`."""
        return self.status_codes.add(node, what)

    def status_view(self, node: Node) -> tuple[View, int]:
        """Status word and code for a kernel that checks integer indices (take, take_grad)."""
        return self._status_buffer(), self.status_code(
            node, f"IndexError in {node.op.name} at run time: an integer index is out of range for axis "
                  f"{node.attrs['axis']}")

    def status_error(self, code: int) -> GraphcError:
        """The error for a non-zero status word: what went wrong, and the node's line."""
        return self.status_codes.error(code)

    # ---- the walk ----------------------------------------------------------------------------------
    def _build(self) -> None:
        g = self.graph
        for i, t in enumerate(g.inputs):
            shape = self.shape(t)
            self.view[id(t)] = contiguous_view(self.new_buffer("input", nbytes(shape, t.dtype), i), shape, t.dtype)
        self._params = list(g.parameters)
        for i, p in enumerate(self._params):
            self.view[id(p)] = contiguous_view(self.new_buffer("param", nbytes(p.shape, p.dtype), i), p.shape,
                                               p.dtype)
        for node in g.nodes:
            if not node.op.has(Trait.INPUT | Trait.STATE):
                self.node(node)
        for j, t in enumerate(g.roots):   # roots not computed straight into their output slot
            if self.out_bufs[j] is None or self.view[id(t)].buf != self.out_bufs[j]:
                shape = self.shape(t)
                b = self.new_buffer("out", nbytes(shape, t.dtype), j)
                self.out_bufs[j] = b
                out = contiguous_view(b, shape, t.dtype)
                self.add(self.copy(out, self.view[id(t)]), [self.view[id(t)]], [out])
        if self.hoist_invariants and not self.symbolic and not self.bounds:
            self.hoist_prologue()
        if not self.symbolic:
            self.assign_arena()

    def node(self, node: Node) -> None:
        """Plan one node by its row in the table; no row, or NotLowerable: a host step (what the row
        planned before it gave up is dropped)."""
        handler = self.table.get(node.op)
        ins = [self.view[id(t)] for t in node.inputs]
        outer, self._node = self._node, (self._node or node)   # a fused body's nodes report the fused node
        mark = len(self.steps), len(self.buffers), list(self.out_bufs), set(self.fallback)
        try:
            if handler is None:
                raise NotLowerable(node.op.name)
            handler(self, node, ins)
        except NotLowerable:
            self._drop_since(mark)
            self.host(node, ins)
        finally:
            self._node = outer

    def _drop_since(self, mark) -> set:
        """Forget the steps, buffers and output slots planned since `mark` (earlier buffers keep lifetimes
        the dropped steps extended: longer than needed, never too short); the buffers forgotten."""
        n_steps, n_bufs, out_bufs, fallback = mark
        if self._loop_pos is None:   # (a loop body's steps are not in _writers)
            for st in self.steps[n_steps:]:
                for b in self._step_io(st)[1]:
                    if b in self._writers:
                        self._writers[b] = [w for w in self._writers[b] if w is not st]
            self._forget_invariants()
        del self.steps[n_steps:]
        keep = self.status.buf if self.status is not None else None
        # (within a loop body, the buffers of steps before_loop added outside it stay: those steps do)
        kept = self._before if self._loop_pos is not None else ()
        gone = {b for b in range(n_bufs, len(self.buffers)) if b != keep and b not in kept}
        for b in gone:
            self.buffers[b].first, self.buffers[b].last = 1 << 60, -1
        self.out_bufs[:] = out_bufs
        self.fallback = fallback
        return gone

    def host(self, node: Node, ins) -> None:
        self.fallback.add(node.op.name)
        outs = [self.fresh(t) for t in node.outputs]
        for t, v in zip(node.outputs, outs):
            self.view[id(t)] = v
        self.add(HostStep(node, ins, outs), ins, outs)

    def consumed(self) -> set:
        """ids of every tensor some node (at any nesting depth) or the graph's roots read."""
        if self._used is None:
            used, todo, seen = {id(t) for t in self.graph.roots}, [self.graph], set()
            while todo:
                g = todo.pop()
                if id(g) in seen:
                    continue
                seen.add(id(g))
                used.update(id(t) for t in g.outputs)
                for n in g.nodes:
                    used.update(id(t) for t in n.inputs)
                    todo.extend(v for v in n.attrs.values() if isinstance(v, Graph))
            self._used = used
        return self._used

    # ---- parameter-derived values ------------------------------------------------------------------
    def invariant(self, buf: int | None, settled: bool = False) -> bool:
        """Whether buffer `buf` holds, by the steps planned so far, a value of the parameters and constants
        alone: a parameter or a constant, or an arena buffer every writer of which is a kernel step reading
        only such buffers (a transposed or converted weight). A step computing from it alone is one that
        hoist_prologue moves to the prologue (unless a later step writes that buffer too): a backend may
        plan work there that pays only when done once (a weight packed for its product). settled: not the
        parameters this graph's updates replace (a training step's weights: a new array every call, so
        their prologue would run every call)."""
        # (in a loop body, only the loop's invariant inputs: the body may rewrite other buffers, and its
        # steps are not in _writers)
        if buf is None or (self._loop_pos is not None and buf not in self._loop_invs):
            return False
        if self._updated is None:
            self._updated = {id(p) for p, _ in getattr(self.graph, "updates", ())}
        updated = self._updated if settled else set()
        # (the answers are kept from call to call: a chain of L layers asks about each layer's weight, and
        # without them every question walks the activations back to the input, O(L^2))
        memo = self._inv_memo[bool(settled)]
        status = self.status.buf if self.status is not None else None

        def ok(b: int) -> bool:
            if b not in memo:
                kind = self.buffers[b].kind
                # (False while an arena buffer's writers are checked: no cycles)
                memo[b] = kind == "const" or (kind == "param" and id(self._params[self.buffers[b].index])
                                              not in updated)
                if kind == "arena" and b != status and b in self._writers:
                    ws = self._writers[b]
                    memo[b] = bool(ws) and all(not isinstance(st, (HostStep, LoopStep))
                                               and getattr(st, "io", None) is not None
                                               and all(ok(x) for x in st.io[0]) for st in ws)
            return memo[b]
        return ok(buf)

    def hoist_prologue(self) -> None:
        """Move the kernel steps whose values depend on parameters and constants only (a transposed or
        converted weight, a constant subexpression of parameters) to the front as `prologue`. A step
        qualifies when every buffer it reads is a parameter, a constant or written only by qualifying
        steps, and every buffer it writes is an arena buffer written only by qualifying steps. Those
        buffers live for the whole program (the arena planner gives them memory of their own), so their
        values survive from one call to the next; the relative order of the steps is kept (lifetimes
        only compare positions, so the other buffers' placement is unchanged)."""
        steps, bufs = self.steps, self.buffers
        status = self.status.buf if self.status is not None else None
        io, writers = [], {}
        for k, st in enumerate(steps):
            r, w = self._step_io(st)
            io.append((r, w))
            for b in w:
                writers.setdefault(b, set()).add(k)
        cand = {k for k, st in enumerate(steps) if not isinstance(st, (HostStep, LoopStep))
                and getattr(st, "io", None) is not None
                and all(bufs[b].kind == "arena" and b != status for b in io[k][1])
                and status not in io[k][0]}
        def ready(b):
            kind = bufs[b].kind
            return kind in ("param", "const") or (kind == "arena" and b != status and b in writers
                                                  and writers[b] <= cand)
        # the largest subset of cand closed under the rule: drop the steps that fail it, then (a worklist,
        # linear in the reads and writes) the steps a dropped one makes fail: the readers and the other
        # writers of the buffers it writes
        readers: dict = {}
        for k in cand:
            for b in io[k][0]:
                readers.setdefault(b, []).append(k)
        queue = [k for k in cand if not all(ready(b) for b in io[k][0])
                 or not all(writers[b] <= cand for b in io[k][1])]
        cand.difference_update(queue)
        while queue:
            for b in io[queue.pop()][1]:
                for j in (*readers.get(b, ()), *writers.get(b, ())):
                    if j in cand:
                        cand.discard(j)
                        queue.append(j)
        if not cand:
            return
        for k in cand:
            for b in io[k][1]:
                bufs[b].first, bufs[b].last = 0, 1 << 59
        order = sorted(cand)
        self.prologue_params = tuple(sorted({bufs[b].index for k in order for b in io[k][0]
                                             if bufs[b].kind == "param"}))
        self.steps = [steps[k] for k in order] + [st for k, st in enumerate(steps) if k not in cand]
        self.prologue = len(order)

    def _step_io(self, st) -> tuple[set, set]:
        """(buffers read, buffers written) by a top-level step (a loop's slices as their parents; a
        kernel step without `io` writes everything it touches)."""
        if isinstance(st, HostStep):
            return ({v.buf for v in st.ins if v.buf is not None}, {v.buf for v in st.outs if v.buf is not None})
        if isinstance(st, LoopStep):
            r, w = set(), set()
            for b in st.body:
                br, bw = self._step_io(b)
                r |= br
                w |= bw
            return {self._root_buffer(b) for b in r}, {self._root_buffer(b) for b in w}
        io = getattr(st, "io", None)
        if io is None:
            return set(st.bufs), set(st.bufs)
        r, w = set(io[0]), set(io[1])
        return r, w | (set(st.bufs) - r)   # a buffer the kernel touches but was not told of: written

    def _root_buffer(self, b: int) -> int:
        """The buffer a (possibly nested) slice buffer is a window of; b itself otherwise."""
        while self.buffers[b].kind == "slice":
            b = self.buffers[b].index
        return b

    # ---- memory plan -------------------------------------------------------------------------------
    def assign_arena(self) -> None:
        """Arena offsets from the shared planner: buffers whose step ranges do not overlap share memory."""
        arena = [b for b in self.buffers if b.kind == "arena" and b.last >= 0]
        plan = plan_arena([(b.first, b.last, b.nbytes) for b in arena], self.align, locality=self.arena_locality)
        for b, off in zip(arena, plan.offsets):
            b.offset = off
        self.arena_bytes = plan.total

    def layout(self, dims: dict) -> "Layout":
        """A symbolic schedule's arena for one binding of the dims (cached per binding): every byte size
        evaluated, the arena buffers placed by the same planner."""
        key = tuple(sorted(dims.items()))
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) >= 64:   # many batch sizes: keep the cache bounded
                self._layouts.clear()
            sizes = [self.evaluate(b.nbytes, dims) for b in self.buffers]
            arena = [i for i, b in enumerate(self.buffers) if b.kind == "arena" and b.last >= 0]
            plan = plan_arena([(self.buffers[i].first, self.buffers[i].last, sizes[i]) for i in arena], self.align,
                              locality=self.arena_locality)
            lay = self._layouts[key] = Layout(dict(dims), plan.total, dict(zip(arena, plan.offsets)), sizes)
        return lay

    @property
    def layouts(self) -> list:
        """The layouts placed so far (one per binding called with)."""
        return list(self._layouts.values())

    # ---- a host-memory runtime's view of the schedule ----------------------------------------------
    def host_array(self, v: View, bases: dict) -> np.ndarray:
        """The ndarray view `v` denotes, given host memory `bases` ({kind: [uint8 array per index]},
        "arena": the arena as uint8)."""
        if v.literal is not None:
            return np.broadcast_to(np.asarray(v.literal, v.dtype), v.shape)
        b = self.buffers[v.buf]
        base = bases["arena"] if b.kind == "arena" else bases[b.kind][b.index]
        item = np.dtype(v.dtype).itemsize
        off = (b.offset if b.kind == "arena" else 0) + v.offset * item
        if 0 in v.shape:
            return np.empty(v.shape, v.dtype)
        return np.ndarray(v.shape, v.dtype, buffer=base, offset=off, strides=[s * item for s in v.strides])


class Layout:
    """A symbolic schedule's memory for one binding of the dims: `nbytes[b]` of every buffer, the arena
    buffers' byte `offsets` ({buffer id: offset}) and the arena's `total`."""

    def __init__(self, dims: dict, total: int, offsets: dict, nbytes: list):
        self.dims, self.total, self.offsets, self.nbytes = dims, total, offsets, nbytes

    @property
    def temps_bytes(self) -> int:
        """What the arena buffers would take with an allocation each."""
        return sum(self.nbytes[b] for b in self.offsets)


# ---- the backend-neutral rows ----------------------------------------------------------------------------

@row(ConstantOp)
def _constant(s: Schedule, node, ins):
    t, a = node.outputs[0], node.attrs["value"]
    if a.size == 1:
        s.view[id(t)] = literal_view(a.reshape(-1)[0].item(), a.shape, t.dtype)
        return
    b = s.new_buffer("const", a.nbytes, len(s.consts))
    s.consts.append(np.ascontiguousarray(a))
    s.view[id(t)] = contiguous_view(b, a.shape, t.dtype)


@row(S.Reshape)
def _reshape(s: Schedule, node, ins):
    v, shape = ins[0], s.shape(node.outputs[0])
    if v.literal is not None:
        s.view[id(node.outputs[0])] = literal_view(v.literal, shape, v.dtype)
        return
    if not v.contiguous:
        w = view_reshape(v, shape)   # a strided view whose merged axes are contiguous needs no copy
        if w is not None:
            s.view[id(node.outputs[0])] = w
            return
        v = s.materialise(v)
    s.view[id(node.outputs[0])] = View(v.buf, v.offset, shape, contig_strides(shape), v.dtype)


@row(S.Transpose)
def _transpose(s: Schedule, node, ins):
    v, axes = ins[0], node.attrs["axes"]
    s.view[id(node.outputs[0])] = View(v.buf, v.offset, tuple(v.shape[a] for a in axes),
                                       tuple(v.strides[a] for a in axes), v.dtype, v.literal)


@row(S.BroadcastTo)
def _broadcast_to(s: Schedule, node, ins):
    v, shape = ins[0], s.shape(node.outputs[0])
    s.view[id(node.outputs[0])] = View(v.buf, v.offset, shape, broadcast_strides(v, shape), v.dtype, v.literal)


@row(S.GetItem)
def _getitem(s: Schedule, node, ins):
    s.view[id(node.outputs[0])] = view_getitem(ins[0], node.attrs["index"])


@row(StopGradient)
def _stop_gradient(s: Schedule, node, ins):
    s.view[id(node.outputs[0])] = ins[0]


@row(S.SizeOf)
def _size_of(s: Schedule, node, ins):
    n = product(ins[0].shape[a] for a in node.attrs["axes"])
    s.view[id(node.outputs[0])] = literal_view(n, (), node.attrs["dtype"])


@row(S.Concatenate)
def _concatenate(s: Schedule, node, ins):
    t, axis = node.outputs[0], node.attrs["axis"]
    out, start = s.fresh(t), 0
    for v in ins:
        n = v.shape[axis]
        dst = view_slice(out, axis, start, n)
        s.add(s.copy(dst, v), [v], [out])
        start = as_int(start + n)
    s.view[id(t)] = out


@row(Fused)
def _fused(s: Schedule, node, ins):
    """A fused body planned in place (Schedule.walk_body), its outputs the fused node's."""
    body = node.attrs["body"]
    for ph, v in zip(body.inputs, ins):
        s.view[id(ph)] = v
    s.walk_body(body, {id(bo): o for bo, o in zip(body.outputs, node.outputs)})
    for o, bo in zip(node.outputs, body.outputs):
        s.view[id(o)] = s.view[id(bo)]


@row(Scan)
def _scan(s: Schedule, node, ins):
    """gc.scan as a native loop: carries in arena buffers, sequences/ys/history by moving slices."""
    a = node.attrs
    nc, ns, body = a["n_carry"], a["n_seq"], a["body"]
    seqs = ins[nc:nc + ns]
    # invariants read every iteration: make strided views (a hoisted transpose) contiguous once
    invs = [v if v.literal is not None or v.contiguous else s.materialise(v) for v in ins[nc + ns:]]
    T = seqs[0].shape[0] if seqs else s.dim_values((a["length"],))[0]
    concrete = [c.shape for c in ins[:nc]] + [q.shape[1:] for q in seqs] + [v.shape for v in invs]
    for ph, shp in zip(body.inputs, concrete):
        for d, val in zip(ph.shape, shp):
            if not isinstance(d, int) and d.is_Symbol:
                s.bind.setdefault(d, val)
    if any(n.op.has(Trait.STATE) for n in body.nodes):
        raise NotLowerable("scan")
    carry = [s.fresh(None, c.shape, t.dtype) for c, t in zip(ins[:nc], node.outputs[:nc])]
    for cb, c in zip(carry, ins[:nc]):
        s.add(s.copy(cb, c), [c], [cb])
    n_y = len(body.outputs) - nc
    used = s.consumed()
    # stacked ys / history nothing reads (inference needs no history): no buffer, no per-step copy
    live = [id(t) in used for t in node.outputs[nc:]]
    stacked = [s.fresh(t) if keep else None for t, keep in zip(node.outputs[nc:], live)]
    saved, saved_pos = s.steps, s._loop_pos
    # a nested loop's steps live at the OUTERMOST loop's position in the top-level step list (lifetimes
    # are indices there; the enclosing body's list index would collide with top-level steps)
    s._loop_pos, s.steps = (len(saved) if saved_pos is None else saved_pos), []
    # steps a backend adds before the loop (Schedule.before_loop): only for a top-level loop (a nested
    # one's position is its outer loop's, held by the frames planning it)
    top, s._top = s._top, (saved if saved_pos is None else None)
    s._loop_serial += saved_pos is None
    loop_invs, s._loop_invs = s._loop_invs, ({v.buf for v in invs if v.buf is not None} if saved_pos is None
                                             else set())
    try:
        slices, seq_views = [], []
        for q in seqs:
            b, sv = s.slice(q, q.strides[0] * np.dtype(q.dtype).itemsize)
            slices.append(b)
            seq_views.append(sv)
        outs = []
        for v in stacked:
            if v is None:
                outs.append(None)
                continue
            b, sv = s.slice(v, v.strides[0] * np.dtype(v.dtype).itemsize if not is_int(v.shape[0]) or v.shape[0]
                            else 0)
            slices.append(b)
            outs.append(sv)
        parts = None
        split = _row_split(s, body, nc, ns, carry, seq_views, invs) if saved_pos is None else None
        if split is not None:
            parts = _plan_parts(s, body, nc, ns, n_y, carry, seq_views, invs, outs, *split)
        if parts is None:
            _plan_step(s, body, nc, ns, n_y, carry, seq_views, invs, outs)
        loop = LoopStep(T, bool(a["reverse"]), s.steps, slices, parts=parts)
    except NotLowerable:   # Schedule.node drops what was planned and runs the scan on the host
        s.steps, s._loop_pos = saved, saved_pos
        raise
    finally:
        s._top, s._loop_invs = top, loop_invs
    # (before_loop may have moved a top-level loop's position on: it is len(saved) again)
    s.steps, s._loop_pos = saved, saved_pos
    s.add(loop, [], [])
    kept = [v for v in stacked if v is not None]
    s.touch(carry + kept, len(s.steps) - 1 if saved_pos is None else saved_pos)
    for t, v in zip(node.outputs, carry + stacked):
        if v is not None:
            s.view[id(t)] = v


def _plan_step(s: Schedule, body: Graph, nc: int, ns: int, n_y: int, carry: list, seq_views: list, invs: list,
               outs: list) -> None:
    """Plan one step of a scan body into s.steps: the body's inputs are the views `carry`, `seq_views`
    (this step's slices) and `invs`; `outs` are this step's slices of the stacked ys and carry history
    (None: not kept); the new carries are written back into `carry` (in place where safe)."""
    for ph, v in zip(body.inputs, carry + [None] * ns + list(invs)):
        if v is not None:
            s.view[id(ph)] = v
    for ph, v in zip(body.inputs[nc:nc + ns], seq_views):
        s.view[id(ph)] = v
    for hs, cb in zip(outs[n_y:], carry):       # history[t]: the carry entering step t
        if hs is not None:
            s.add(s.copy(hs, cb), [cb], [hs])
    into = {}   # ys computed straight into this step's slice of the stacked output
    for y, ys in zip(body.outputs[nc:], outs[:n_y]):
        if ys is not None and ys.contiguous and id(y) not in into and not y.node.op.has(Trait.INPUT):
            into[id(y)] = ys
    mark = (len(s.steps), len(s.buffers))
    in_place = _carries_in_place(body, nc, into, carry) if s.carry_in_place else {}
    while True:
        s.into.update(into)
        s.into.update(in_place)
        outer_record, s._record = s._record, []
        try:
            s.walk_body(body, {})
        finally:
            rec, s._record = s._record, outer_record
            if outer_record is not None:
                outer_record.extend(rec)
        for k in list(into) + list(in_place):
            s.into.pop(k, None)
        bad = _in_place_unsafe(s, body, carry, rec) if in_place else set()
        if not bad:
            break
        # a new carry written over its old value while something still reads that: plan the body again,
        # every new carry in a fresh buffer (copied at the end of the step). Not only the unsafe ones:
        # W9's backward step with its other carries in place measured ~3% slower (one thread, CPU time, noisy)
        _drop_planned(s, mark)
        in_place = {}
    if any(isinstance(st, HostStep) for st in s.steps):
        raise NotLowerable("scan")
    for y, ys in zip(body.outputs[nc:], outs[:n_y]):
        if ys is not None and s.view[id(y)] != ys:
            s.add(s.copy(ys, s.view[id(y)]), [s.view[id(y)]], [ys])
    carry_bufs = {cb.buf for cb in carry}
    new = [s.view[id(o)] for o in body.outputs[:nc]]
    done = [v == cb for v, cb in zip(new, carry)]   # computed in place: no copy
    new = [v if d or v.buf not in carry_bufs else s.materialise(v)   # no read-after-write
           for v, d in zip(new, done)]
    for cb, v, d in zip(carry, new, done):
        if not d:
            s.add(s.copy(cb, v), [v], [cb])


def _drop_planned(s: Schedule, mark: tuple) -> None:
    """Forget the steps and buffers planned since mark = (len(s.steps), len(s.buffers)) (their buffers stay
    in the list, never touched again: no lifetime, no arena space)."""
    del s.steps[mark[0]:]
    keep = s.status.buf if s.status is not None else None
    for b in range(mark[1], len(s.buffers)):
        if b != keep and b not in s._before:   # (written before the loop by a step that stays)
            s.buffers[b].first, s.buffers[b].last = 1 << 60, -1


def _row_split(s: Schedule, body: Graph, nc: int, ns: int, carry: list, seq_views: list, invs: list):
    """(ids of the row tensors, [(r0, r1) per part]) when this scan runs as independent row parts
    (rows.py), else None."""
    from . import rows
    if s.row_parts < 2 or s.symbolic or s.bounds or s._rows is not None:
        return None
    if sum(int(nbytes(v.shape, v.dtype)) for v in invs if v.literal is None) > rows.MAX_SHARED_BYTES:
        return None
    ids = rows.row_tensors(body, nc, ns, s.shape)
    if ids is None:
        return None
    first = (list(carry) + list(seq_views))[0]
    ranges = rows.parts(int(first.shape[0]), s.row_parts)
    return None if ranges is None else (ids, ranges)


def _row_window(v, r0: int, r1: int):
    """Rows r0 .. r1-1 (axis 0) of view v (a carry, a sequence's step or a stacked output's slice: a buffer)."""
    if v is None:
        return None
    return View(v.buf, v.offset + r0 * v.strides[0], (r1 - r0,) + tuple(v.shape[1:]), v.strides, v.dtype)


def _plan_parts(s: Schedule, body: Graph, nc: int, ns: int, n_y: int, carry: list, seq_views: list, invs: list,
                outs: list, ids: set, ranges: list):
    """Plan the step once per row part (rows.py) into s.steps; [(first, end) step indices per part], or
    None (nothing planned) when a part's steps would touch rows or buffers not its own."""
    from . import rows
    mark = (len(s.steps), len(s.buffers))
    shared = [v for v in list(carry) + list(seq_views) + list(outs) if v is not None]
    keep = {"arena", "out", "slice"}
    bounds = []
    for r0, r1 in ranges:
        start, first_buf = len(s.steps), len(s.buffers)
        win = lambda vs: [_row_window(v, r0, r1) for v in vs]   # noqa: E731
        owned: dict = {}
        for v in win(shared):
            owned.setdefault(v.buf, []).append(rows.offsets(v))
        owned = {b: rows.sorted_unique(np.concatenate(o)) for b, o in owned.items()}
        outer, s._record = s._record, []
        s._rows = (ids, r1 - r0)
        try:
            _plan_step(s, body, nc, ns, n_y, win(carry), win(seq_views), invs, win(outs))
        finally:
            s._rows = None
            rec, s._record = s._record, outer
        status = s.status.buf if s.status is not None else None
        views = [v for _, r, w in rec for v in list(r) + list(w) if v is not None and v.buf is not None]
        writes = [v for _, _, w in rec for v in w if v is not None and v.buf is not None]
        others = [v for v in views if mark[1] <= v.buf < first_buf and v.buf != status
                  and s.buffers[v.buf].kind in keep and v.buf not in s._before]
        foreign = [v for v in writes if v.buf < first_buf and v.buf not in owned and v.buf != status]
        if others or foreign or not rows.within_rows(views, owned):
            _drop_planned(s, mark)
            return None
        if outer is not None:
            outer.extend(rec)
        bounds.append((start, len(s.steps)))
    return bounds


def _carries_in_place(body: Graph, nc: int, into: dict, carry: list) -> dict:
    """id(new carry) -> the carry's own view, for each new carry a kernel may compute straight into it
    (instead of a fresh buffer and a copy at the end of the step): computed by a node of the body (not a
    placeholder), the new value of one carry only, not a stacked output. Whether that is safe is known only
    once the body is planned (_in_place_unsafe)."""
    news = body.outputs[:nc]
    ys = {id(y) for y in body.outputs[nc:]}
    return {id(o): cb for o, cb in zip(news, carry)
            if sum(p is o for p in news) == 1 and id(o) not in ys and id(o) not in into
            and not o.node.op.has(Trait.INPUT)}


def _in_place_unsafe(s: Schedule, body: Graph, carry: list, rec: list) -> set:
    """The carry buffers the body just planned (its adds recorded in `rec`) must not keep the new values
    computed into them. A carry buffer may be written by one step only, which reads it (if at all) only as
    that very view, element by element (a kernel marked `per_element`: its first that many reads are read
    whole, e.g. a fused product's operands; every other read view gives element i for output element i);
    no later step, no other carry's new value and no stacked output may read it. Loops nested in the body
    are not inspected: with one, none is kept."""
    bufs = {cb.buf for cb in carry}
    if any(isinstance(st, (LoopStep, HostStep)) for st, _, _ in rec):
        return bufs
    outs = [s.view[id(o)] for o in body.outputs]
    bad = set()
    for j, cb in enumerate(carry):
        writers = [k for k, (_, _, w) in enumerate(rec) if any(v is not None and v.buf == cb.buf for v in w)]
        if not writers:
            continue
        k = writers[0]
        st, reads, writes = rec[k]
        lead = getattr(st, "per_element", None)
        if len(writers) > 1 or lead is None or any(v is not None and v.buf == cb.buf and v != cb for v in writes) \
                or any(v is not None and v.buf == cb.buf and (i < lead or v != cb) for i, v in enumerate(reads)) \
                or any(v is not None and v.buf == cb.buf for _, r2, w2 in rec[k + 1:] for v in list(r2) + list(w2)) \
                or any(v.buf == cb.buf for i, v in enumerate(outs) if i != j):
            bad.add(cb.buf)
    return bad
