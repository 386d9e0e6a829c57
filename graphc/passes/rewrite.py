"""Helpers shared by the passes: clone a node onto new inputs, rebuild a graph through a rule."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .. import shapes as _sh
from ..ir import Trait, Graph, Node, Tensor, toposort

#: a rule sees an original node and its (already rewritten) inputs; it returns replacement tensors
#: for the node's outputs, or None to keep the node
Rule = Callable[[Node, list], "list[Tensor] | None"]


def _plain_tensor_fields() -> bool:
    """Does Tensor.__init__ set exactly node, index, shape, dtype and name (so `outputs_like` may copy
    already canonical types without re-checking them)?"""
    probe = Tensor(None, 0, (), "float32")
    return type(probe) is Tensor and set(vars(probe)) == {"node", "index", "shape", "dtype", "name"}


_FAST_TENSORS = _plain_tensor_fields()


def outputs_like(node: Node, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Output tensors of `node` with the shapes, dtypes and names of `like` (tensors of an existing node:
    their types are canonical already, so they are copied, not re-checked; a pass builds many)."""
    if not _FAST_TENSORS:
        return tuple(Tensor(node, i, o.shape, o.dtype, o.name) for i, o in enumerate(like))
    out = []
    new = Tensor.__new__
    for i, o in enumerate(like):
        t = new(Tensor)
        t.node, t.index, t.shape, t.dtype, t.name = node, i, o.shape, o.dtype, o.name
        out.append(t)
    return tuple(out)


def clone(node: Node, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """`node` applied to `inputs` (same shapes/dtypes as before), keeping attrs, names and source line."""
    if all(a is b for a, b in zip(inputs, node.inputs)):
        return node.outputs
    new = Node(node.op, inputs, node.attrs, node.loc)
    if getattr(node, "constraints", None):
        new.constraints = node.constraints
    new.outputs = outputs_like(new, node.outputs)
    return new.outputs


def with_order(graph: Graph, nodes: list[Node]) -> Graph:
    """`graph` whose `nodes` (the schedule backends follow) is `nodes`, a topological order."""
    graph.__dict__["nodes"] = list(nodes)
    return graph


def _adopt(new: Sequence[Tensor], old: Node, done: set) -> None:
    """Give the nodes a rule built the replaced node's source line (and a replaced output's name)."""
    for t, o in zip(new, old.outputs):
        if t.name is None and o.name is not None and id(t.node) not in done and not t.node.op.has(Trait.LEAF):
            t.name = o.name
    stack = [t.node for t in new]
    while stack:
        node = stack.pop()
        if id(node) in done:
            continue
        done.add(id(node))
        if not node.op.has(Trait.LEAF):
            node.loc = old.loc
        stack.extend(t.node for t in node.inputs)


def rebuild(graph: Graph, rule: Rule | None, log=None, name: str = "") -> Graph:
    """A new graph with `rule` applied to every node (inputs first); replacements are re-offered to
    the rule so chains of rewrites finish in one walk. `log[name]` counts firings."""
    env: dict[int, Tensor] = {}
    done = {id(n) for n in graph.nodes}  # nodes already in place (rule-built nodes join as adopted)
    changed = False
    for node in graph.nodes:
        if node.op.has(Trait.LEAF):
            for o in node.outputs:
                env[id(o)] = o
            continue
        ins = [env[id(t)] for t in node.inputs]
        outs = _apply(rule, node, ins, done, log, name) if rule else None
        if outs is None:
            outs = clone(node, ins)
            done.add(id(outs[0].node))
        changed = changed or outs is not node.outputs
        for o, n in zip(node.outputs, outs):
            env[id(o)] = n
    return unchanged_order(graph, Graph(graph.inputs, [env[id(t)] for t in graph.outputs],
                                        [(p, env[id(v)]) for p, v in graph.updates], graph.name), changed)


def unchanged(graph: Graph) -> Graph:
    """What a pass that has nothing to do returns without walking: a new Graph of the same nodes, in
    the same order (a pass whose pattern needs an op the graph lacks checks for it first)."""
    return with_order(Graph(graph.inputs, graph.outputs, graph.updates, graph.name), graph.nodes)


def unchanged_order(old: Graph, new: Graph, changed: bool) -> Graph:
    """`new`; when a pass changed no node (`changed` False: `new` has `old`'s nodes), with `old`'s order
    (no new topological sort: a pass that finds nothing to do costs one walk)."""
    return new if changed else with_order(new, old.nodes)


def _apply(rule, node, ins, done, log, name, depth=0):
    outs = rule(node, ins)
    if outs is None:
        return None
    if not _types_kept(node, outs):  # a rule must keep shape and dtype; never let one change semantics
        if log is not None:
            log[f"{name}: rejected (type changed)"] += 1
        return None
    fresh = [id(t.node) not in done for t in outs]
    _adopt(outs, node, done)
    if log is not None:
        log[name] += 1
        fired = getattr(rule, "fired", None)  # a pattern.Rules table: count the rule by its name too
        if fired is not None:
            log[fired.name] += 1
    # a replacement may itself match (log(1+exp x) -> log1p(exp x) -> softplus x)
    if depth < 8 and len(outs) == 1 and fresh[0] and not outs[0].node.op.has(Trait.LEAF):
        inner = outs[0].node
        again = _apply(rule, inner, list(inner.inputs), done, log, name, depth + 1)
        if again is not None:
            return again
    return outs


def _types_kept(node, outs) -> bool:
    return len(outs) == len(node.outputs) and all(same_type(n, o) for o, n in zip(node.outputs, outs))


def users(graph: Graph) -> dict[int, list[Node]]:
    """id(tensor) -> the nodes that read it (in schedule order)."""
    out: dict[int, list[Node]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            lst = out.setdefault(id(t), [])
            if not lst or lst[-1] is not node:
                lst.append(node)
    return out


def const_scalar(t: Tensor):
    """The value of a constant whose elements are all equal (a Python number), else None."""
    if not t.node.op.has(Trait.CONST):
        return None
    v = t.node.attrs["value"]
    if v.size == 0 or v.size > 4096:
        return None
    first = v.reshape(-1)[0]
    if v.size > 1 and not np.all(v == first):
        return None
    return first.item()


def is_const(t: Tensor, value) -> bool:
    c = const_scalar(t)
    return c is not None and c == value


def same_type(a: Tensor, b: Tensor) -> bool:
    """Same dtype and (symbolically) equal shape."""
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(
        _sh.dims_equal(x, y) for x, y in zip(a.shape, b.shape))
