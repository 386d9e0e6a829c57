"""The steps and buffers of a schedule (see graphc.backends.schedule.plan for the data model).

Kernel steps are the backends' own objects; the schedule needs only two things of one: `bufs`, the
sorted ids of the buffers it reads or writes, and a writable `node` attribute (set by Schedule.add to
the graph node it was planned for, so run-time errors can name that node and its line).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphc.ir import Node


@dataclass
class Buffer:
    """A block of memory. kind:
      input / param / const / out: the caller's arrays (index: position among buffers of that kind);
      arena: scratch memory at `offset` bytes into the one arena, shared with buffers not live at once;
      slice: one iteration's window of a parent buffer (index = the parent's buffer id) inside a
             LoopStep: bytes [offset + t * stride, ... + nbytes) of the parent at iteration t.
    first / last: the steps (top-level step indices, inclusive) that read or write it; a buffer used inside
    a loop step is live for the whole loop step. In a symbolic schedule nbytes (and a slice's offset and
    stride) may be sympy expressions over the dims; an arena buffer's offset is then per binding
    (Schedule.layout), not here."""
    kind: str
    index: int
    nbytes: int
    first: int = 1 << 60
    last: int = -1
    offset: int = 0    # arena byte offset (slice: byte offset into the parent)
    stride: int = 0    # slice buffers: bytes between loop iterations (index = parent buffer id)


@dataclass
class LoopStep:
    """A native loop (gc.scan): `body` steps run `length` times (an int, or an expression in a symbolic
    schedule); slice buffers move per iteration; `parts`: independent row parts of the body."""
    length: int
    reverse: bool
    body: list
    slices: list      # buffer ids of kind "slice"
    name: str = "scan"
    #: a row-split scan (rows.py): [(first, end) indices into `body`] per part, each part the whole step on
    #: its own batch rows, independent of the others (run one after the other they are the same step; a
    #: backend may run each part's loop on its own thread); None: one body
    parts: list | None = None

    def buffers(self) -> set:
        """The ids of the (non-slice) buffers the body's steps touch."""
        out = set()
        for st in self.body:
            out |= st.buffers() if isinstance(st, LoopStep) else set(st.bufs)
        return out - set(self.slices)


@dataclass
class HostStep:
    """A node run by its NumPy impl on the host (its op has no native lowering, or this case has none)."""
    node: Node
    ins: list
    outs: list

    def run(self, array_of, dims: dict) -> None:
        """Run the node's impl on host arrays: `array_of(view)` is the ndarray a View denotes."""
        node = self.node
        args = [array_of(v) for v in self.ins]
        kw = dict(node.attrs)
        if getattr(node.op, "needs_dims", False):
            kw["dims"] = dims
        res = node.op.impl(*args, **kw)
        res = res if isinstance(res, tuple) else (res,)
        for v, r in zip(self.outs, res):
            np.copyto(array_of(v), r, casting="unsafe")
