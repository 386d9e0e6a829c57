"""The backend contract: a Backend turns an (optimised) Graph into a Program.

A Program is called as program(inputs, params, dims) with lists of NumPy arrays (placeholders in
graph.inputs order, parameters in graph.parameters order) and the symbolic dim bindings; it returns
(outputs, update_values), both lists of arrays. The caller validates inputs and writes updates.
"""
from __future__ import annotations

from typing import Callable


class Program:
    """A compiled graph: `run(inputs, params, dims) -> (outputs, updates)`, plus its source text."""

    def __init__(self, run: Callable, source: str = "", **info):
        self.run = run
        self.source = source
        self.info = info


class Backend:
    name = "?"
    #: backend-specific gc.function keyword options: name -> one-line description
    options: dict = {}
    #: values accepted for gc.function(..., sanitize=...): name -> what it checks
    sanitizers: dict = {}

    def unavailable_reason(self) -> str | None:
        """None when usable on this machine, else a sentence that says why not."""
        return None

    def compile(self, graph, options) -> Program:
        raise NotImplementedError

    def lowered_ops(self) -> frozenset:
        """The registered ops this backend lowers natively, read off its lowering table (keyed by op).
        tests/test_lowering_tables.py fails for any op a native backend neither lowers nor declares
        `host_only` with a reason. The NumPy backend runs every op (its host is NumPy)."""
        from graphc.ir import OPS
        return frozenset(OPS.values())
