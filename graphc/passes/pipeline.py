"""The pass pipeline: one visible list of named passes, each with the lowest level that runs it."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import GraphcError
from ..ir import Graph
from .algebraic import algebraic
from .constant_fold import constant_fold
from .cse import cse
from .dce import dce
from .fusion import fusion, gemm_epilogue
from .memory import schedule
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
    Pass("fusion", fusion, 2, "elementwise groups (+ trailing reduction) -> one fused kernel"),
    Pass("gemm_epilogue", gemm_epilogue, 2, "matmul/conv + bias + activation -> one fused kernel"),
    Pass("schedule", schedule, 2, "topological order that lowers peak live memory"),
]


def _debug_enabled(flag) -> bool:
    return bool(flag) or os.environ.get("GRAPHC_DEBUG_PASSES", "") not in ("", "0")


def optimize(graph: Graph, level: int = 2, disable: Sequence[str] = (), debug_passes: bool = False,
             file=None) -> Graph:
    """Run the passes of `level` (0: none, 1: rewrites, 2: + fusion and scheduling) on `graph`;
    passes named in `disable` are skipped. Returns a new Graph (same inputs and parameters)."""
    if level not in (0, 1, 2):
        raise GraphcError(f"optimize must be 0, 1 or 2, got {level!r}")
    disable = set([disable] if isinstance(disable, str) else disable)
    unknown = disable - {p.name for p in PIPELINE}
    if unknown:
        raise GraphcError(f"unknown pass name(s) {sorted(unknown)}; passes are {[p.name for p in PIPELINE]}")
    debug = _debug_enabled(debug_passes)
    out = Graph(graph.inputs, graph.outputs, graph.updates, graph.name)
    for p in PIPELINE:
        if p.level > level or p.name in disable:
            continue
        before, log, t0 = len(out.compute_nodes()), Counter(), time.perf_counter()
        out = p.run(out, log)
        if debug:
            fired = ", ".join(f"{k}: {v}" for k, v in sorted(log.items())) or "nothing fired"
            print(f"[graphc pass] {p.name:14s} nodes {before:4d} -> {len(out.compute_nodes()):4d}  "
                  f"({fired}; {1e3 * (time.perf_counter() - t0):.1f} ms)", file=file or sys.stderr)
    return out
