"""Graph state: implicit updates that a graph advances by itself (random-generator counters,
batch-norm running statistics). An op or layer registers (parameter, new_value) pairs on the
tensor that needs them; every gc.function whose outputs reach that tensor applies them together
with the user's `updates=`, so no manual collection is needed."""
from __future__ import annotations

import weakref

from ..ir import Tensor, toposort

#: node -> [(parameter, new value)]; weak, so graphs that are dropped take their entries with them
_REGISTRY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def add_implicit_update(t: Tensor, param, value: Tensor) -> None:
    """Apply `param <- value` whenever a compiled function computes `t` (or anything built from it)."""
    _REGISTRY.setdefault(t.node, []).append((param, value))


def implicit_updates(roots, exclude=()) -> list:
    """The implicit updates of nodes reachable from `roots` (parameters in `exclude`, e.g. those
    the user updates explicitly, are skipped). A parameter registered twice keeps its last value."""
    skip = {id(p) for p in exclude}
    found: dict[int, tuple] = {}
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        new = []
        for node in toposort(todo):
            if id(node) in seen:
                continue
            seen.add(id(node))
            for p, v in _REGISTRY.get(node, ()):
                if id(p) not in skip and (id(p) not in found or found[id(p)][1] is not v):
                    found[id(p)] = (p, v)
                    new.append(v)
        todo = new  # an update value may itself reach nodes with updates
    return list(found.values())
