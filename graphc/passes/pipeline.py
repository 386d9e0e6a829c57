"""The pass pipeline: one visible list of named passes, each with the lowest level that runs it.

`optimize` is the one place a graph is optimised, nested graphs included: the bodies of control ops
(scan steps, in attrs) go through the same passes at the same level before the graph around them, so
every backend compiles the same optimised body (a backend that optimises a body the pipeline already
optimised at that level gets it back unchanged)."""
from __future__ import annotations

import contextlib
import gc as _pygc
import os
import sys
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import GraphcError
from ..ir import Graph, Node, Trait
from ..ops.fused import Fused
from .algebraic import algebraic
from .attention import attention
from .constant_fold import constant_fold
from .cse import cse
from .dce import dce
from .fusion import fusion, gemm_epilogue
from .memory import schedule
from .rewrite import outputs_like, rebuild, with_order
from .scan_hoist import scan_hoist
from .stability import stability


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, Counter], Graph]
    level: int  # runs when optimize >= level
    doc: str


PIPELINE: list[Pass] = [
    Pass("dce", dce, 1, "drop unused nodes and identities (stop_gradient, same-type cast/reshape)"),
    Pass("constant_fold", constant_fold, 1, "evaluate nodes whose inputs are constants; static shape queries"),
    Pass("algebraic", algebraic, 1, "x*1, x+0, x-x, exp(log x), --x, transpose/reshape chains, scalar broadcasts"),
    Pass("stability", stability, 1, "log(softmax) -> log_softmax, log(1+x) -> log1p, ... (overflow-safe forms)"),
    Pass("cse", cse, 1, "merge structurally equal nodes (commutative inputs ordered, constants by value)"),
    Pass("scan_hoist", scan_hoist, 1, "scan loops: x_t @ W before the loop, sum_t a_t @ b_t accumulators after it"),
    Pass("attention", attention, 2, "softmax(Q K^T * s + mask) @ V -> one fused attention kernel"),
    Pass("fusion", fusion, 2, "elementwise groups (+ trailing reduction) -> one fused kernel"),
    Pass("gemm_epilogue", gemm_epilogue, 2, "matmul/conv + bias + activation -> one fused kernel"),
    Pass("schedule", schedule, 2, "topological order that lowers peak live memory"),
]


def _debug_enabled(flag) -> bool:
    return bool(flag) or os.environ.get("GRAPHC_DEBUG_PASSES", "") not in ("", "0")


#: graphs `optimize` produced -> (level, disabled passes): optimising one again the same way is a no-op
#: (a backend compiling a nested body that the pipeline already optimised gets it back as it is)
_DONE: "weakref.WeakKeyDictionary[Graph, tuple]" = weakref.WeakKeyDictionary()
#: graphs `optimize` produced -> seconds spent per pass ("total": the whole call, nested bodies included)
_TIMES: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def pass_times(graph: Graph) -> dict:
    """Seconds `optimize` spent making `graph`: {"total": ..., pass name: ...} ({} for a graph it did
    not make). Backends report the total as the "passes" phase of program.info["compile_time"]."""
    return dict(_TIMES.get(graph, {}))


def optimize(graph: Graph, level: int = 2, disable: Sequence[str] = (), debug_passes: bool = False,
             file=None) -> Graph:
    """Run the passes of `level` (0: none, 1: rewrites, 2: + fusion and scheduling) on `graph`;
    passes named in `disable` are skipped. Returns a new Graph (same inputs and parameters).

    Nested graphs are the pipeline's too: the bodies of control ops (a scan's step) are optimised
    first, at the same level and with the same passes disabled, whatever the backend. Fused bodies are
    kernels built by fusion from already optimised nodes (or by hand with gc.ops.fused) and are kept."""
    if level not in (0, 1, 2):
        raise GraphcError(f"optimize must be 0, 1 or 2, got {level!r}")
    disable = set([disable] if isinstance(disable, str) else disable)
    unknown = disable - {p.name for p in PIPELINE}
    if unknown:
        raise GraphcError(f"unknown pass name(s) {sorted(unknown)}; passes are {[p.name for p in PIPELINE]}")
    t0 = time.perf_counter()
    opt = _Optimiser(level, disable, _debug_enabled(debug_passes), file)
    with no_cyclic_gc():
        out = opt.run(graph)
    _TIMES[out] = {"total": time.perf_counter() - t0, **opt.times}
    return out


@contextlib.contextmanager
def no_cyclic_gc():
    """Python's cyclic garbage collector paused for the duration (when it was running): passes allocate
    many nodes and tensors that all live on, so the collections those allocations set off find nothing
    to free, and with a large heap (sympy, torch loaded) they cost ~20% of the passes' time (an 80-layer
    MLP step). Reference counting still frees everything; the collector resumes afterwards."""
    was = _pygc.isenabled()
    if was:
        _pygc.disable()
    try:
        yield
    finally:
        if was:
            _pygc.enable()


class _Optimiser:
    def __init__(self, level: int, disable: set, debug: bool, file):
        self.level, self.disable, self.debug, self.file = level, disable, debug, file
        self.key = (level, frozenset(disable))
        self.bodies: dict[int, Graph] = {}  # id(body) -> its optimised body (a body shared stays shared)
        self.times: dict[str, float] = {}   # pass name -> seconds (nested bodies included)

    def run(self, graph: Graph, label: str = "") -> Graph:
        out = Graph(graph.inputs, graph.outputs, graph.updates, graph.name)
        if _DONE.get(graph) == self.key:  # already optimised this way: same nodes, same schedule
            _DONE[out] = self.key
            return with_order(out, graph.nodes)
        if self.level > 0 and any(_has_bodies(n) for n in out.nodes):
            out = rebuild(out, lambda node, ins: self._nested(node, ins, label))
        for p in PIPELINE:
            if p.level > self.level or p.name in self.disable:
                continue
            before, log, t0 = len(out.compute_nodes()) if self.debug else 0, Counter(), time.perf_counter()
            out = p.run(out, log)
            self.times[p.name] = self.times.get(p.name, 0.0) + time.perf_counter() - t0
            if self.debug:
                fired = ", ".join(f"{k}: {v}" for k, v in sorted(log.items(), key=_rules_last)) or "nothing fired"
                print(f"[graphc pass] {label}{p.name:14s} nodes {before:4d} -> {len(out.compute_nodes()):4d}  "
                      f"({fired}; {1e3 * (time.perf_counter() - t0):.1f} ms)", file=self.file or sys.stderr)
        _DONE[out] = self.key
        return out

    def _nested(self, node: Node, ins, label: str):
        """A control node (not fused) whose nested graphs are optimised; None when nothing changed."""
        if not _has_bodies(node):
            return None
        attrs, changed = dict(node.attrs), False
        for k, v in node.attrs.items():
            if isinstance(v, Graph):
                attrs[k] = self.body(v, f"{label}{node.op.name} {k}: ")
                changed = changed or attrs[k] is not v
        if not changed:
            return None
        new = Node(node.op, ins, attrs, node.loc)
        new.outputs = outputs_like(new, node.outputs)
        return list(new.outputs)

    def body(self, body: Graph, label: str) -> Graph:
        if _DONE.get(body) == self.key:
            return body
        if id(body) not in self.bodies:
            self.bodies[id(body)] = self.run(body, label)
        return self.bodies[id(body)]


def _has_bodies(node: Node) -> bool:
    """A control node whose nested graphs the pipeline optimises (a fused node's body is a kernel)."""
    return node.op.has(Trait.CONTROL) and node.op is not Fused


def _rules_last(item) -> tuple:
    """Pass totals first, then the rules that fired (pattern rules are counted by name: `a(x) -> b`)."""
    return (" -> " in item[0], item[0])
