"""Row-separable scan bodies: a recurrent loop split over the batch rows, one part per thread.

A scan whose every carry and sequence step has the batch as its leading axis, and whose body never mixes
two rows (an LSTM/GRU/RNN cell: h @ W_hh with W_hh the same for every row, gates per element, slices of
the gate columns), computes row i of every new carry from row i of the old ones only. Its T steps can
then run as P independent loops, part p owning the rows [r0, r1): one dispatch over the thread pool for
the whole scan instead of one (or two) per step, no barrier between steps, each part's carries and
products staying in its core's caches. W4 (LSTM, batch 16, hidden 128, 50 steps) on the 2-core Zen 2:
every step's 16x128x512 product split by columns over both cores ran ~30 us a step (hand-off and the
carries crossing cores every step); two parts of 8 rows, ~17 us a step each, side by side.

`row_tensors` decides it on the graph (by op objects and traits, never names) and returns the tensors
whose leading axis is the batch ("row tensors"); the schedule then plans the body once per part with
those tensors' shapes cut to the part's rows (Schedule.shape) and the body's inputs as row windows of the
carries and sequence slices (plan._scan). Whatever the kernels did with the views, every view a part's
steps read or write in a buffer the parts share is checked to lie in the part's own rows (`within_rows`);
if one does not, the scan is planned whole (the split is a speed choice, never a semantic one).

Accepted per node (anything else: not separable):
  - elementwise ops (Trait.ELEMENTWISE): a row operand has the output's rank and the batch extent on axis 0;
    an operand that is not a row tensor broadcasts along axis 0 (lower rank, or extent 1 there);
  - matmul: a 2-D row left operand and a 2-D right operand that is not a row tensor (the weights);
  - getitem with a full slice on axis 0 (a gate's column window), transpose keeping axis 0 first,
    reshape keeping the batch extent on axis 0, broadcast_to of a row-free value (every row the same),
    stop_gradient;
  - reductions and softmax-like ops over axes other than 0; concatenate along an axis other than 0;
  - fused nodes, by their bodies (the same rules inside);
  - constants; nodes reading no row tensor (computed by every part, e.g. a bias expression).
Random draws, parameters (state), nested scans and every other op make the body not separable.
"""
from __future__ import annotations

from graphc.ir import Trait
from graphc.ops import shape_ops as S
from graphc.ops.core import StopGradient
from graphc.ops.fused import Fused
from graphc.ops.linalg import MatMul

import numpy as np

#: rows a part gets at least (a part of fewer rows runs its products on too few accumulators to pay)
MIN_ROWS = 4
#: the parts each read every invariant (weights) every step: above this many bytes of invariants the
#: per-step column split (each core reads half of the weights) is kept
MAX_SHARED_BYTES = 1 << 20


def row_tensors(body, nc: int, ns: int, shape_of) -> set | None:
    """ids of the body's tensors whose axis 0 is the batch (the carries, the sequences' steps and what is
    computed from them row by row), or None when the body is not row-separable. shape_of(t): t's concrete
    shape (ints)."""
    rows_in = list(body.inputs[:nc + ns])
    if not rows_in:
        return None
    shapes = [tuple(shape_of(t)) for t in rows_in]
    if any(len(s) == 0 for s in shapes):
        return None
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        return None
    rows = {id(t) for t in rows_in}
    if not _walk(body, rows, n, shape_of):
        return None
    if any(id(o) not in rows for o in body.outputs):
        return None
    return rows


def _walk(body, rows: set, n: int, shape_of) -> bool:
    for node in body.nodes:
        op = node.op
        if op.has(Trait.INPUT) or op.has(Trait.CONST):
            continue
        if op.has(Trait.STATE) or op.has(Trait.RANDOM) or op.has(Trait.IMPURE):
            return False
        ins = [id(t) in rows for t in node.inputs]
        if op is Fused:
            inner = node.attrs["body"]
            for ph, r in zip(inner.inputs, ins):
                if r:
                    rows.add(id(ph))
            if not _walk(inner, rows, n, shape_of):
                return False
            for o, bo in zip(node.outputs, inner.outputs):
                if id(bo) in rows:
                    if not _leads(shape_of(o), n):
                        return False
                    rows.add(id(o))
            continue
        if not any(ins):
            if op.has(Trait.SHAPE) or op.has(Trait.CONTROL):
                return False
            continue   # row-free: every part computes it whole
        if not _row_node(node, ins, n, shape_of):
            return False
        for o in node.outputs:
            rows.add(id(o))
    return True


def _leads(shape, n) -> bool:
    return len(shape) >= 1 and shape[0] == n


def _row_node(node, ins: list, n: int, shape_of) -> bool:
    """Whether `node` (reading at least one row tensor: ins[i] True) maps row i of its inputs to row i of
    its outputs."""
    op = node.op
    outs = [tuple(shape_of(o)) for o in node.outputs]
    if not all(_leads(s, n) for s in outs):
        return False
    x = tuple(shape_of(node.inputs[0])) if node.inputs else ()
    if op.has(Trait.ELEMENTWISE):
        rank = len(outs[0])
        for t, r in zip(node.inputs, ins):
            s = tuple(shape_of(t))
            if r and (len(s) != rank or s[0] != n):
                return False
            if not r and len(s) == rank and s[0] != 1:
                return False
        return True
    if op is MatMul:
        a, b = (tuple(shape_of(t)) for t in node.inputs)
        return ins[0] and not ins[1] and len(a) == 2 and len(b) == 2
    if op is StopGradient:
        return True
    if op is S.GetItem:
        idx = node.attrs["index"]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not idx or not all(isinstance(i, (slice, int, np.integer)) for i in idx):
            return False
        first = idx[0]
        return isinstance(first, slice) and first.start in (None, 0) and first.step in (None, 1) \
            and (first.stop is None or first.stop >= n)
    if op is S.Transpose:
        return tuple(node.attrs["axes"])[:1] == (0,)
    if op is S.Reshape:
        return _leads(x, n)
    if op.has(Trait.REDUCTION) or op.has(Trait.NORMALIZATION):
        axis = node.attrs.get("axis")
        if axis is None:
            return False
        axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        return len(x) >= 1 and all(int(a) % len(x) != 0 for a in axes)
    if op is S.Concatenate:
        return all(ins) and int(node.attrs["axis"]) % len(outs[0]) != 0
    return False


def parts(n: int, threads: int) -> list[tuple[int, int]] | None:
    """[(r0, r1), ...]: n rows cut into at most `threads` parts of at least MIN_ROWS rows (None: fewer
    than two parts)."""
    p = min(threads, n // MIN_ROWS)
    if p < 2:
        return None
    return [(n * j // p, n * (j + 1) // p) for j in range(p)]


def offsets(v, shape=None) -> np.ndarray:
    """The element offsets a view covers (shape: the view's, unless given)."""
    shape = tuple(v.shape if shape is None else shape)
    off = np.full((1,) * len(shape), int(v.offset), dtype=np.int64)
    for k, (d, s) in enumerate(zip(shape, v.strides)):
        ax = np.arange(int(d), dtype=np.int64) * int(s)
        off = off + ax.reshape((1,) * k + (-1,) + (1,) * (len(shape) - k - 1))
    return off.reshape(-1)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """a's distinct values, sorted (np.unique without its first-call import cost: ~20 ms)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def within_rows(views, owned: dict) -> bool:
    """Whether every view over a buffer in `owned` (buffer id -> the sorted element offsets the part owns
    there) touches only those offsets."""
    for v in views:
        if v is None or v.literal is not None or v.buf not in owned:
            continue
        if v.size > (1 << 22):
            return False
        got = offsets(v)
        if not len(got):
            continue
        allowed = owned[v.buf]
        if not len(allowed):
            return False
        pos = np.minimum(np.searchsorted(allowed, got), len(allowed) - 1)
        if not np.array_equal(allowed[pos], got):
            return False
    return True
