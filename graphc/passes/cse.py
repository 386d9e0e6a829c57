"""Common-subexpression elimination by structural hashing, with canonicalisation so more matches:
inputs of commutative ops are ordered, equal small constants are one constant."""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node, Tensor, Trait
from .rewrite import clone, unchanged_order

#: constants up to this many elements are compared by value
SMALL_CONST = 4096


def freeze(v, strict: bool = False):
    """A hashable key for an attr value (slices, arrays and graphs included); equal keys mean equal
    values to every consumer: floats by their exact repr (0.0 and -0.0, 1 and 1.0 differ; a NaN
    equals a NaN), arrays by dtype, shape and bytes. A value with no such key (a large array, an
    unhashable object) is keyed by its identity, or, when strict (a key kept beyond the value's
    life), raises TypeError."""
    if isinstance(v, (float, np.floating)):
        return ("float", type(v).__name__, repr(float(v)))
    if isinstance(v, (tuple, list)):
        return tuple(freeze(e, strict) for e in v)
    if isinstance(v, slice):
        return ("slice", freeze(v.start, strict), freeze(v.stop, strict), freeze(v.step, strict))
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(e, strict)) for k, e in v.items()))
    if isinstance(v, np.ndarray) and v.size <= SMALL_CONST:
        return ("array", v.dtype.name, v.shape, v.tobytes())
    try:
        if isinstance(v, np.ndarray):
            raise TypeError("large array")
        hash(v)
        return v
    except TypeError:
        if strict:
            raise
        return ("id", id(v))


_NEVER_MERGED = Trait.IMPURE | Trait.INPUT | Trait.STATE


def pure(op) -> bool:
    """Two applications with equal inputs give equal results (random draws do not; every graph input
    and parameter is its own value)."""
    return not op.has(_NEVER_MERGED)


def _key(node: Node, ins: list[Tensor], number: dict[int, int]):
    if node.op.has(Trait.CONST):
        v = node.attrs["value"]
        return (node.op, freeze(v)) if v.size <= SMALL_CONST else None
    if not pure(node.op):
        return None
    args = [number[id(t)] for t in ins]
    if node.op.has(Trait.COMMUTATIVE):
        args.sort()
    return (node.op, tuple(args), freeze(node.attrs) if node.attrs else ())


def cse(graph: Graph, log) -> Graph:
    """Merge nodes with the same op, attrs and (value-numbered) inputs."""
    env: dict[int, Tensor] = {}
    number: dict[int, int] = {}  # id(tensor) -> value number
    table: dict = {}
    changed = False
    for node in graph.nodes:
        ins = [env[id(t)] for t in node.inputs]
        key = _key(node, ins, number)
        if key is not None and key in table:
            outs = table[key]
            log["merged"] += 1
        else:
            outs = clone(node, ins) if node.inputs else node.outputs
            if key is not None:
                table[key] = outs
        changed = changed or outs is not node.outputs
        for o, n in zip(node.outputs, outs):
            env[id(o)] = n
            number.setdefault(id(n), len(number))
    return unchanged_order(graph, Graph(graph.inputs, [env[id(t)] for t in graph.outputs],
                                        [(p, env[id(v)]) for p, v in graph.updates], graph.name), changed)
