"""Fusion: maximal groups of elementwise ops (same loop shape; inputs may broadcast), optionally
closed by one reduction, become one `fused` node; GEMM/conv epilogues (matmul + bias + activation)
become a fused node whose body starts with the matmul. See graphc/ops/fused.py for the contract."""
from __future__ import annotations

import networkx as nx

from .. import shapes as _sh
from ..ir import Graph, Node, Tensor, Trait
from ..names import Names
from ..ops.core import placeholder
from ..ops.fused import Fused
from ..ops.linalg import MatMul
from ..ops.nn_ops import Conv2d
from .rewrite import clone, rebuild, users, with_order

#: reductions that may close a group: Trait.MONOID (their combine step is a plain binary op)
CLOSING_REDUCTION = Trait.MONOID
#: ops whose output can feed an epilogue in the same kernel (the ops every backend heads a kernel with)
EPILOGUE_HEADS = frozenset({MatMul, Conv2d})
_LEAF_IN_BODY = Trait.INPUT | Trait.CONST


def fusible(node: Node) -> bool:
    return node.op.has(Trait.ELEMENTWISE) and len(node.outputs) == 1


def closes_group(node: Node) -> bool:
    """A reduction that may end a fused group."""
    return node.op.has(CLOSING_REDUCTION)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_sh.dims_equal(x, y) for x, y in zip(a, b))


class _Group:
    def __init__(self, node: Node):
        self.members = [node]
        self.shape = node.outputs[0].shape
        self.reduced = False


class _Fuser:
    """Greedy grouping in schedule order with a cycle check (no path leaves a group and comes back)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.pos = {id(n): i for i, n in enumerate(graph.nodes)}
        self.users = users(graph)
        self.roots = {id(t) for t in graph.roots}
        self.group: dict[int, _Group] = {}

    def run(self) -> None:
        for node in self.graph.nodes:
            if fusible(node):
                self._grow(node)
        for node in self.graph.nodes:
            if closes_group(node):
                self._close_with(node)

    def _grow(self, node):
        g = _Group(node)
        self.group[id(node)] = g
        for t in node.inputs:
            pg = self.group.get(id(t.node))
            if pg is None or pg is g or pg.reduced or not _same_shape(pg.shape, g.shape):
                continue
            here = self.pos[id(node)]
            if self._path_outside(pg, g, here) or self._path_outside(g, pg, here):
                continue
            pg.members.extend(g.members)
            for m in g.members:
                self.group[id(m)] = pg
            g = pg

    def _path_outside(self, src: _Group, dst: _Group, frontier: int) -> bool:
        """Is there a path from src to dst through nodes in neither group? Other groups count as one
        vertex (entering a member leaves from any member), since each will run as one kernel. Only
        nodes up to `frontier` (the node being grouped) are in groups, so later nodes are dead ends."""
        inside = {id(m) for m in src.members} | {id(m) for m in dst.members}
        dst_ids = {id(m) for m in dst.members}
        stack = [u for m in src.members for u in self.users.get(id(m.outputs[0]), ()) if id(u) not in inside]
        seen = set()
        while stack:
            n = stack.pop()
            if id(n) in dst_ids:
                return True
            if id(n) in seen or id(n) in inside or self.pos[id(n)] > frontier:
                continue
            seen.add(id(n))
            g = self.group.get(id(n))
            for m in (g.members if g is not None else (n,)):
                seen.add(id(m))
                for o in m.outputs:
                    stack.extend(self.users.get(id(o), ()))
        return False

    def _close_with(self, red: Node):
        """Append a reduction to the group that produces its input, when nothing else reads the group."""
        t = red.inputs[0]
        g = self.group.get(id(t.node))
        if g is None or g.reduced or not _same_shape(g.shape, t.shape):
            return
        ids = {id(m) for m in g.members}
        for m in g.members:
            o = m.outputs[0]
            if id(o) in self.roots or any(id(u) not in ids and u is not red for u in self.users.get(id(o), ())):
                return
        if len(self.users.get(id(t), ())) != 1:
            return
        g.members.append(red)
        g.reduced = True
        self.group[id(red)] = g

    def groups(self) -> list[_Group]:
        seen, out = set(), []
        for n in self.graph.nodes:
            g = self.group.get(id(n))
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                out.append(g)
        return out


def _placeholder_for(t: Tensor, i: int, names) -> Tensor:
    """A body placeholder standing for `t`, named after it (`names`: the body's Names, so unique)."""
    return placeholder(names.fresh(t.name or f"in{i}"), t.shape, t.dtype)


def build_fused(members: list[Node], env: dict, outs: list[Tensor], alias: dict | None = None):
    """A fused node computing `outs` from `members` (in order); external inputs are looked up in `env`;
    `alias` maps a stand-in tensor to the member output it stands for (an absorbed head's result).
    The body's schedule is the members' order (so an epilogue's matmul comes first)."""
    alias = alias or {}
    body_env: dict[int, Tensor] = {}
    ext, phs, leaves, order, by_outer, names = [], [], [], [], {}, Names(default="in")
    for m in members:
        m_ins = [alias.get(id(t), t) for t in m.inputs]
        for t in m_ins:
            if id(t) in body_env:
                continue
            if t.node.op.has(Trait.CONST) and t.node.attrs["value"].size == 1:
                body_env[id(t)] = t  # scalar constants live in the body as immediates
                leaves.append(t.node)
                continue
            outer = env[id(t)]
            if id(outer) in by_outer:  # one placeholder per distinct external tensor
                body_env[id(t)] = by_outer[id(outer)]
                continue
            ext.append(outer)
            body_env[id(t)] = by_outer[id(outer)] = _placeholder_for(t, len(phs), names)
            phs.append(body_env[id(t)])
        new = clone(m, [body_env[id(t)] for t in m_ins])
        order.append(new[0].node)
        for o, n in zip(m.outputs, new):
            body_env[id(o)] = n
    body = Graph(phs, [body_env[id(alias.get(id(o), o))] for o in outs], name="fused")
    with_order(body, [p.node for p in phs] + leaves + order)
    node = Node(Fused, ext, {"body": body}, members[-1].loc)
    node.outputs = tuple(Tensor(node, i, o.shape, o.dtype, o.name) for i, o in enumerate(outs))
    return node


def fusion(graph: Graph, log) -> Graph:
    """Replace each elementwise group of two or more ops (or one op and a reduction) by a fused node."""
    fz = _Fuser(graph)
    fz.run()
    groups = [g for g in fz.groups() if len(g.members) > 1]
    if not groups:
        return graph
    owner = {id(m): g for g in groups for m in g.members}
    # the condensed DAG (a group is one vertex) is acyclic by construction; emit in its order
    key = {}
    dag = nx.DiGraph()
    for n in graph.nodes:
        v = id(owner[id(n)]) if id(n) in owner else id(n)
        key.setdefault(v, (fz.pos[id(n)], n))
        dag.add_node(v)
        for t in n.inputs:
            u = id(owner[id(t.node)]) if id(t.node) in owner else id(t.node)
            if u != v:
                dag.add_edge(u, v)
    env: dict[int, Tensor] = {}
    by_id = {id(g): g for g in groups}
    for v in nx.lexicographical_topological_sort(dag, key=lambda v: key[v][0]):
        if v in by_id:
            _emit_group(by_id[v], fz, env, log)
        else:
            n = key[v][1]
            for o, new in zip(n.outputs, clone(n, [env[id(t)] for t in n.inputs]) if n.inputs else n.outputs):
                env[id(o)] = new
    return Graph(graph.inputs, [env[id(t)] for t in graph.outputs],
                 [(p, env[id(u)]) for p, u in graph.updates], graph.name)


def _emit_group(g: _Group, fz: _Fuser, env: dict, log) -> None:
    g.members.sort(key=lambda m: fz.pos[id(m)])  # schedule order (merging appends out of order)
    ids = {id(m) for m in g.members}
    outs = [m.outputs[0] for m in g.members
            if id(m.outputs[0]) in fz.roots or any(id(u) not in ids for u in fz.users.get(id(m.outputs[0]), ()))]
    node = build_fused(g.members, env, outs)
    for o, new in zip(outs, node.outputs):
        env[id(o)] = new
    log["fused groups"] += 1
    log["ops fused"] += len(g.members)


# ---- GEMM / conv epilogues --------------------------------------------------------------------------

def _loop_shape(node: Node):
    return node.outputs[0].shape


def _epilogue_rule(counts, roots):
    def rule(node, ins):
        is_fused = node.op is Fused
        if not (is_fused or fusible(node)):
            return None
        if is_fused and any(not n.op.has(_LEAF_IN_BODY) and not fusible(n)
                            for n in node.attrs["body"].nodes):
            return None  # already headed, or closed by a reduction
        for i, (t, old) in enumerate(zip(ins, node.inputs)):
            head = t.node  # counts and roots are about the graph before this pass: look up `old`
            # the epilogue must not read the GEMM's operands (keeps backends' kernel signatures simple)
            shared = {id(x) for x in head.inputs} & {id(x) for x in ins}
            if (head.op in EPILOGUE_HEADS and counts.get(id(old)) == 1 and id(old) not in roots
                    and not shared and _same_shape(t.shape, _loop_shape(node))
                    and t.dtype == node.outputs[0].dtype):
                return list(_absorb(head, node, i, ins).outputs)
        return None
    return rule


def _absorb(head: Node, node: Node, i: int, ins: list) -> Node:
    """A fused node: `head` followed by `node` (an elementwise op or fused node) reading it as input i."""
    env = {id(t): t for t in head.inputs}
    if node.op is Fused:
        body = node.attrs["body"]
        env.update({id(p): t for p, t in zip(body.inputs, ins)})
        alias = {id(body.inputs[i]): head.outputs[0]}
        members, outs = [head] + body.compute_nodes(), list(body.outputs)
    else:
        env.update({id(a): b for a, b in zip(node.inputs, ins)})
        alias = {id(node.inputs[i]): head.outputs[0]}
        members, outs = [head, node], list(node.outputs)
    return build_fused(members, env, outs, alias=alias)


def gemm_epilogue(graph: Graph, log) -> Graph:
    """matmul (or conv2d) whose only reader is an elementwise op or fused group: one fused node."""
    counts = {k: len(v) for k, v in users(graph).items()}
    roots = {id(t) for t in graph.roots}
    return rebuild(graph, _epilogue_rule(counts, roots), log, "epilogues fused")
