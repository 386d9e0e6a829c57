"""Printing graphs: dprint (an indented tree, PyTensor's debugprint style), text form, networkx."""
from __future__ import annotations

import io
import sys

from . import shapes as _sh
from .ir import Graph, Tensor, Trait, toposort


def _fmt_attr(v) -> str:
    if isinstance(v, slice):
        s = ("" if v.start is None else str(v.start)) + ":" + ("" if v.stop is None else str(v.stop))
        return s + ("" if v.step is None else f":{v.step}")
    if isinstance(v, tuple) and any(isinstance(e, slice) for e in v):
        return "[" + ", ".join("None" if e is None else _fmt_attr(e) for e in v) + "]"
    return str(v)


def _attrs_str(node) -> str:
    items = [(k, v) for k, v in node.attrs.items() if k != "value" and not isinstance(v, Graph)]
    if not items:
        return ""
    return "{" + ", ".join(f"{k}={_fmt_attr(v)}" for k, v in items) + "}"


def _label(t: Tensor) -> str:
    node = t.node
    op = getattr(node.op, "display_name", lambda n: n.op.name)(node)
    kind = op + _attrs_str(node)
    if node.op.has(Trait.LEAF):
        head = f"{t.name or 'const'} [{node.op.name}]"
        if node.op.name == "constant" and t.size == 1:
            head = f"{node.attrs['value'].reshape(-1)[0].item()!r} [constant]"
    else:
        head = kind + (f" '{t.name}'" if t.name else "")
        if node.op.n_outputs != 1:
            head += f".{t.index}"
    return f"{head} {t.dtype}{_sh.fmt_shape(t.shape)}"


def _as_graph(obj) -> Graph:
    if isinstance(obj, Graph):
        return obj
    if hasattr(obj, "graph") and isinstance(obj.graph, Graph):
        return obj.graph
    if isinstance(obj, Tensor):
        return Graph([], [obj])
    if isinstance(obj, (list, tuple)):
        return Graph([], list(obj))
    raise TypeError(f"cannot print {type(obj).__name__}")


def dprint(obj, file=None, depth: int = -1, show_loc: bool = False) -> str:
    """Print a tensor, list of tensors, Graph or compiled function as an indented tree; returns the text.

    Each node shows op{attrs}, name, dtype and shape, and an [id X]; a node already printed is
    shown again only as its id, so shared subgraphs appear once."""
    g = _as_graph(obj)
    out = io.StringIO()
    ids: dict[int, str] = {}
    roots = list(g.outputs) + [u for _, u in g.updates]
    upd_names = {id(u): p.name for p, u in g.updates}

    def ident(n) -> str:
        if id(n) not in ids:
            k = len(ids)
            s = ""
            while True:
                s = chr(ord("A") + k % 26) + s
                k = k // 26 - 1
                if k < 0:
                    break
            ids[id(n)] = s
        return ids[id(n)]

    def rec(t: Tensor, prefix: str, child_prefix: str, level: int):
        n = t.node
        seen = id(n) in ids
        line = f"{prefix}{_label(t)} [id {ident(n)}]"
        if show_loc and not seen and not n.op.has(Trait.LEAF):
            line += f"  <- {n.loc[0]}:{n.loc[1]}"
        if seen and n.inputs:
            out.write(line + " ···\n")
            return
        out.write(line + "\n")
        if depth >= 0 and level >= depth:
            return
        for i, x in enumerate(n.inputs):
            last = i == len(n.inputs) - 1
            rec(x, child_prefix + ("└─ " if last else "├─ "), child_prefix + ("   " if last else "│  "), level + 1)

    for r in roots:
        if id(r) in upd_names:
            out.write(f"update {upd_names[id(r)]} <-\n")
        rec(r, "", "", 0)
    text = out.getvalue()
    print(text, end="", file=file or sys.stdout)
    return text


def graph_text(g: Graph) -> str:
    """One line per node: `name:dtype[shape] = op{attrs}(inputs)`, inputs and outputs listed."""
    names: dict[int, str] = {}
    lines = []

    def nm(t):
        if id(t) not in names:
            names[id(t)] = t.name or f"%{len(names)}"
        return names[id(t)]

    ins = " ".join(f"{nm(t)}:{t.type_str}" for t in g.inputs)
    lines.append(f"{{ lambda {ins} .")
    for node in toposort(g.roots + g.inputs):
        if node.op.name in ("placeholder",):
            continue
        outs = ", ".join(f"{nm(o)}:{o.type_str}" for o in node.outputs)
        if node.op.name == "parameter":
            lines.append(f"  {outs} = parameter")
            continue
        if node.op.name == "constant":
            v = node.attrs["value"]
            lines.append(f"  {outs} = constant {v.reshape(-1)[0] if v.size == 1 else '<array>'}")
            continue
        op = getattr(node.op, "display_name", lambda n: n.op.name)(node)
        lines.append(f"  {outs} = {op}{_attrs_str(node)} {' '.join(nm(t) for t in node.inputs)}")
    upd = "".join(f"; {p.name} <- {nm(u)}" for p, u in g.updates)
    lines.append(f"  in ({', '.join(nm(t) for t in g.outputs)}{upd}) }}")
    return "\n".join(lines)


def to_networkx(obj):
    """The graph as a networkx.DiGraph: one vertex per node (op, attrs, shapes), edges input -> user."""
    import networkx as nx
    g = _as_graph(obj)
    G = nx.DiGraph()
    nodes = toposort(g.roots + g.inputs)
    index = {id(n): i for i, n in enumerate(nodes)}
    for n in nodes:
        G.add_node(index[id(n)], op=n.op.name, label=_label(n.outputs[0]),
                   shape=[tuple(map(str, o.shape)) for o in n.outputs], dtype=[o.dtype for o in n.outputs],
                   node=n)
        for k, t in enumerate(n.inputs):
            G.add_edge(index[id(t.node)], index[id(n)], shape=str(t.shape), port=k)
    return G
