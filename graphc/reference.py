"""The NumPy reference evaluator: walks the graph calling each op's `impl` (the living definition
of semantics that every backend and pass is tested against).

`evaluate` walks a graph once; `Interpreter` orders a graph once and then runs it many times (a scan
body, once per step), with no backend involved."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .ir import Graph, Tensor, Trait, toposort


def _leaf_value(node):
    """The value of a parameter or constant leaf; a placeholder has none (it must be fed)."""
    if node.op.has(Trait.STATE):
        return node.outputs[0].value
    if node.op.has(Trait.CONST):
        return node.attrs["value"]
    raise KeyError(f"no value fed for placeholder {node.outputs[0].name!r}")


def evaluate(outputs: Sequence[Tensor], feed: Mapping[Tensor, np.ndarray], dims: Mapping[str, int] | None = None,
             check=None):
    """Values of `outputs` for placeholder values `feed` ({tensor: array}); parameters read their value.
    `check(node, values)` is called after each computed node (mode="debug" uses it)."""
    env = {id(t): np.asarray(v) for t, v in feed.items()}
    for node in toposort(list(outputs) + list(feed)):
        if all(id(t) in env for t in node.outputs):
            continue
        if node.op.has(Trait.LEAF):
            env[id(node.outputs[0])] = _leaf_value(node)
            continue
        args = [env[id(t)] for t in node.inputs]
        attrs = dict(node.attrs)
        if getattr(node.op, "needs_dims", False):
            attrs["dims"] = dims
        res = node.op.impl(*args, **attrs)
        res = res if node.op.n_outputs != 1 else (res,)
        for t, v in zip(node.outputs, res):
            env[id(t)] = np.asarray(v)
        if check is not None:
            check(node, [env[id(t)] for t in node.outputs])
    return [env[id(t)] for t in outputs]


class Interpreter:
    """`graph` ordered once into steps over value slots; `run(values, dims)` evaluates its outputs for
    input values (graph.inputs order) with each op's `impl`, as `evaluate` does, without re-walking it."""

    def __init__(self, graph: Graph):
        slot: dict[int, int] = {}

        def at(t: Tensor) -> int:
            return slot.setdefault(id(t), len(slot))

        self.inputs = [at(t) for t in graph.inputs]
        self.consts: list[tuple[int, np.ndarray]] = []
        self.params: list[tuple[int, Tensor]] = []
        self.steps = []
        fed = {id(t) for t in graph.inputs}
        for node in toposort(graph.roots + graph.inputs):
            if node.op.has(Trait.LEAF):
                t = node.outputs[0]
                if id(t) in fed:
                    continue
                if node.op.has(Trait.STATE):
                    self.params.append((at(t), t))  # read at run time: parameters change between calls
                else:
                    self.consts.append((at(t), _leaf_value(node)))
                continue
            ins = [slot[id(t)] for t in node.inputs]
            outs = [at(t) for t in node.outputs]
            self.steps.append((node.op.impl, ins, dict(node.attrs), getattr(node.op, "needs_dims", False),
                               node.op.n_outputs == 1, outs))
        self.outputs = [slot[id(t)] for t in graph.outputs]
        self.n_slots = len(slot)

    def run(self, values: Sequence[np.ndarray], dims: Mapping[str, int] | None = None) -> list[np.ndarray]:
        env: list = [None] * self.n_slots
        for i, v in zip(self.inputs, values):
            env[i] = v
        for i, v in self.consts:
            env[i] = v
        for i, t in self.params:
            env[i] = t.value
        for impl, ins, attrs, needs_dims, single, outs in self.steps:
            res = impl(*[env[i] for i in ins], **attrs, dims=dims) if needs_dims else impl(*[env[i] for i in ins], **attrs)
            if single:
                env[outs[0]] = np.asarray(res)
            else:
                for i, v in zip(outs, res):
                    env[i] = np.asarray(v)
        return [env[i] for i in self.outputs]
