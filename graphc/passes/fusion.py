"""Fusion: maximal groups of elementwise ops (same loop shape; inputs may broadcast), optionally
closed by one reduction, become one `fused` node; GEMM/conv epilogues (matmul + bias + activation)
become a fused node whose body starts with the matmul. See graphc/ops/fused.py for the contract."""
from __future__ import annotations

import heapq

from .. import shapes as _sh
from ..ir import Graph, Node, Tensor, Trait
from ..names import Names
from ..ops.core import PlaceholderOp
from ..ops.fused import Fused
from ..ops.linalg import MatMul
from ..ops.nn_ops import Conv2d
from .rewrite import clone, outputs_like, rebuild, users, with_order

#: reductions that may close a group: Trait.MONOID (their combine step is a plain binary op)
CLOSING_REDUCTION = Trait.MONOID
#: ops whose output can feed an epilogue in the same kernel (the ops every backend heads a kernel with)
EPILOGUE_HEADS = frozenset({MatMul, Conv2d})
_LEAF_IN_BODY = Trait.INPUT | Trait.CONST
#: elementwise ops in one group at most. A native kernel's compile time grows with its body (llvm: a few
#: ms per op), while identical kernels compile once: a long run of ops is cut into groups of this size,
#: so a chain that repeats a pattern (a 20,000-op chain of sin, *, +, tanh) is a few distinct kernels,
#: not one enormous one. Groups of real models are far smaller; a cut costs one store and one load.
MAX_GROUP_OPS = 128


def fusible(node: Node) -> bool:
    return node.op.has(Trait.ELEMENTWISE) and len(node.outputs) == 1


def closes_group(node: Node) -> bool:
    """A reduction that may end a fused group."""
    return node.op.has(CLOSING_REDUCTION)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_sh.dims_equal(x, y) for x, y in zip(a, b))


class _Group:
    """A group being grown: its members, loop shape, whether a reduction closed it, the nodes outside
    it that read a member (`out`, id -> node: kept up to date as groups merge) and whether a member's
    result is a root."""
    __slots__ = ("members", "shape", "reduced", "out", "root")

    def __init__(self, node: Node, readers, root: bool):
        self.members = [node]
        self.shape = node.outputs[0].shape
        self.reduced = False
        self.out = {id(u): u for o in node.outputs for u in readers.get(id(o), ())}
        self.root = root


class _Fuser:
    """Greedy grouping in schedule order with a cycle check (no path leaves a group and comes back).

    Near-linear: merging moves the smaller group into the larger (each node moves O(log n) times), a
    group keeps the set of its outside readers, so the cycle check walks from those readers only
    (a group counts as one vertex), never over a group's members."""

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
        g = _Group(node, self.users, any(id(o) in self.roots for o in node.outputs))
        self.group[id(node)] = g
        here = self.pos[id(node)]
        for t in node.inputs:
            pg = self.group.get(id(t.node))
            if pg is None or pg is g or pg.reduced or not _same_shape(pg.shape, g.shape):
                continue
            if len(pg.members) + len(g.members) > MAX_GROUP_OPS:
                continue
            if self._path_outside(pg, g, here) or self._path_outside(g, pg, here):
                continue
            g = self._merge(pg, g)

    def _merge(self, a: _Group, b: _Group) -> _Group:
        """One group of a and b (the larger absorbs the smaller; the result keeps a's loop shape)."""
        big, small = (a, b) if len(a.members) >= len(b.members) else (b, a)
        for k, u in small.out.items():
            if self.group.get(k) is not big:
                big.out[k] = u
        for m in small.members:
            self.group[id(m)] = big
            big.out.pop(id(m), None)
        big.members.extend(small.members)
        big.root = big.root or small.root
        big.shape = a.shape
        return big

    def _path_outside(self, src: _Group, dst: _Group, frontier: int) -> bool:
        """Is there a path from src to dst through nodes in neither group? Other groups count as one
        vertex (entering a member leaves from any member), since each will run as one kernel. Only
        nodes up to `frontier` (the node being grouped) are in groups, so later nodes are dead ends."""
        group, pos = self.group, self.pos
        stack = [u for k, u in src.out.items() if group.get(k) is not dst]
        seen = set()
        while stack:
            n = stack.pop()
            if pos[id(n)] > frontier:
                continue
            g = group.get(id(n))
            if g is dst:
                return True
            key = id(g) if g is not None else id(n)
            if key in seen:
                continue
            seen.add(key)
            if g is not None:
                stack.extend(g.out.values())
            else:
                for o in n.outputs:
                    stack.extend(self.users.get(id(o), ()))
        return False

    def _close_with(self, red: Node):
        """Append a reduction to the group that produces its input, when nothing else reads the group."""
        t = red.inputs[0]
        g = self.group.get(id(t.node))
        if g is None or g.reduced or not _same_shape(g.shape, t.shape):
            return
        if g.root or any(u is not red for u in g.out.values()):
            return
        if len(self.users.get(id(t), ())) != 1:
            return
        g.members.append(red)
        g.reduced = True
        self.group[id(red)] = g
        g.out = {id(u): u for o in red.outputs for u in self.users.get(id(o), ())}
        g.root = any(id(o) in self.roots for o in red.outputs)

    def groups(self) -> list[_Group]:
        seen, out = set(), []
        for n in self.graph.nodes:
            g = self.group.get(id(n))
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                out.append(g)
        return out


def _placeholder_for(t: Tensor, i: int, names) -> Tensor:
    """A body placeholder standing for `t`, named after it (`names`: the body's Names, so unique), with
    t's (canonical) type and t's source line (no stack walk per placeholder)."""
    node = Node(PlaceholderOp, (), {}, t.node.loc)
    node.outputs = outputs_like(node, (t,))
    node.outputs[0].name = names.fresh(t.name or f"in{i}")
    return node.outputs[0]


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
    node.outputs = outputs_like(node, outs)
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
    key: dict[int, tuple] = {}
    succ: dict[int, set] = {}
    indeg: dict[int, int] = {}
    for n in graph.nodes:
        v = id(owner[id(n)]) if id(n) in owner else id(n)
        key.setdefault(v, (fz.pos[id(n)], n))
        succ.setdefault(v, set())
        indeg.setdefault(v, 0)
        for t in n.inputs:
            u = id(owner[id(t.node)]) if id(t.node) in owner else id(t.node)
            if u != v and v not in succ.setdefault(u, set()):
                succ[u].add(v)
                indeg[v] += 1
    env: dict[int, Tensor] = {}
    by_id = {id(g): g for g in groups}
    for v in _topological(succ, indeg, key):
        if v in by_id:
            _emit_group(by_id[v], fz, env, log)
        else:
            n = key[v][1]
            for o, new in zip(n.outputs, clone(n, [env[id(t)] for t in n.inputs]) if n.inputs else n.outputs):
                env[id(o)] = new
    return Graph(graph.inputs, [env[id(t)] for t in graph.outputs],
                 [(p, env[id(u)]) for p, u in graph.updates], graph.name)


def _topological(succ: dict, indeg: dict, key: dict):
    """The vertices of a DAG (successor sets, in-degrees) in topological order, ties broken by the
    smallest schedule position (key[v][0]): the schedule's order wherever the DAG allows it."""
    ready = [(key[v][0], v) for v, d in indeg.items() if d == 0]
    heapq.heapify(ready)
    while ready:
        _, v = heapq.heappop(ready)
        yield v
        for w in succ[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                heapq.heappush(ready, (key[w][0], w))


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


# ---- why two neighbouring kernels stayed apart (read by f.explain; decides nothing) ------------------

def _kernel_kind(node: Node) -> str:
    """'head' (a GEMM/conv, alone or with its epilogue), 'reduced' (a group closed by a reduction),
    'elementwise' (an op or group), 'reduction' (a closing reduction on its own) or 'other'."""
    if node.op in EPILOGUE_HEADS:
        return "head"
    if node.op is Fused:
        body = [n for n in node.attrs["body"].nodes if not n.op.has(_LEAF_IN_BODY)]
        if body and body[0].op in EPILOGUE_HEADS:
            return "head"
        return "reduced" if body and not fusible(body[-1]) else "elementwise"
    return "elementwise" if fusible(node) else "reduction" if closes_group(node) else "other"


def _loop_of(node: Node):
    """The loop shape a node's elementwise part runs over (a closing reduction's input shape)."""
    if node.op is Fused:
        body = [n for n in node.attrs["body"].nodes if not n.op.has(_LEAF_IN_BODY)]
        return (body[0].outputs[0] if fusible(body[0]) or body[0].op in EPILOGUE_HEADS else body[0].inputs[0]).shape
    return node.inputs[0].shape if closes_group(node) else node.outputs[0].shape


def unfused_reason(producer: Node, consumer: Node, readers: dict, roots: set) -> str | None:
    """Why `consumer` (reading an output of `producer`) is not in the producer's kernel, by the rules of
    this module, on the optimised graph (`readers`: id(tensor) -> reading nodes; `roots`: ids of the
    graph's result tensors). None when neither rule could have joined them (e.g. two GEMMs)."""
    kp, kc = _kernel_kind(producer), _kernel_kind(consumer)
    name = lambda n: n.op.display_name(n) if hasattr(n.op, "display_name") else n.op.name   # noqa: E731
    p, c = name(producer), name(consumer)
    if kc == "head":
        if kp == "other" or (kp == "head" and _operand_of_head(producer, consumer)):
            return None   # a GEMM/convolution reading its operand: nothing to fuse
        return (f"{c} has its own GEMM/convolution at its head (one per kernel)" if kp == "head" else
                f"{c} starts a kernel: fusion appends epilogues after a GEMM/convolution, never work before one")
    if kc == "other" or kp == "other":
        if kc == "other" and kp == "other":
            return None
        n = consumer if kc == "other" else producer
        return (f"{n.op.name} is not elementwise: its own kernel (a group takes elementwise ops and one closing "
                f"{'/'.join(sorted(o.name for o in _closing_ops()))})")
    t = next((o for o in producer.outputs if any(i is o for i in consumer.inputs)), producer.outputs[0])
    if not _same_shape(_loop_of(producer), _loop_of(consumer)):
        from ..shapes import fmt_shape
        return (f"loop shapes differ ({p} runs over {fmt_shape(_loop_of(producer))}, {c} over "
                f"{fmt_shape(_loop_of(consumer))}): a group has one iteration space")
    if kp in ("reduced", "reduction"):
        return f"{p} ends with a reduction: a group closes at its reduction"
    if kp == "head" and producer.op in EPILOGUE_HEADS:
        if kc == "reduced":
            return f"{c} ends with a reduction: an epilogue is elementwise only"
        n_read = len(readers.get(id(t), ()))
        if n_read > 1 or id(t) in roots:
            return (f"the {p} result is read by {n_read} ops{' and returned' if id(t) in roots else ''}: an "
                    f"epilogue must be its only reader")
        if {id(x) for x in producer.inputs} & {id(x) for x in consumer.inputs}:
            return f"{c} reads the {p}'s own operands (epilogues may not)"
        if t.dtype != consumer.outputs[0].dtype:
            return f"{c} changes the dtype ({t.dtype} -> {consumer.outputs[0].dtype})"
    if kc in ("reduction", "reduced") and (len(readers.get(id(t), ())) > 1 or id(t) in roots):
        return f"{p}'s result is also read elsewhere or returned: a reduction closes a group only as its one reader"
    size = sum(len(n.attrs["body"].compute_nodes()) if n.op is Fused else 1 for n in (producer, consumer))
    if size > MAX_GROUP_OPS:
        return (f"together {size} ops: a group holds at most MAX_GROUP_OPS = {MAX_GROUP_OPS} (longer runs are "
                f"cut so that their repeated parts compile once)")
    return f"fusing {p} with {c} would form a cycle (another path between them runs through a separate kernel)"


def _operand_of_head(producer: Node, consumer: Node) -> bool:
    """Does the consumer's GEMM/convolution itself read an output of `producer` (not just its epilogue)?"""
    outs = {id(o) for o in producer.outputs}
    if consumer.op is not Fused:
        return any(id(t) in outs for t in consumer.inputs)
    body = consumer.attrs["body"]
    ph = {id(p) for p, t in zip(body.inputs, consumer.inputs) if id(t) in outs}
    head = next(n for n in body.nodes if not n.op.has(_LEAF_IN_BODY))
    return any(id(t) in ph for t in head.inputs)


def _closing_ops():
    from ..ir import ops_with
    return ops_with(CLOSING_REDUCTION)
