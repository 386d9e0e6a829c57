"""Pictures of graphs: Graphviz DOT (`gc.to_dot`), rendered files (`gc.draw`), Jupyter SVG, and
graph-structure export (GraphML / JSON via networkx).

    gc.draw(f, "graph.svg")          # f: a compiled function (its optimised graph), a Graph,
    dot_text = gc.to_dot(loss)       # a tensor, a list of tensors, or a gradient graph

Nodes show op, shape and dtype; inputs, parameters, constants and outputs have distinct styles;
edges carry the shape of the tensor that flows. Fused kernels are drawn as clusters holding their
body; a scan is one box "scan xT" (or its body as a cluster with expand_scans=True). Large graphs
collapse repeated layers: nodes built by the same source line with the same op and type (a layer
applied in a Python loop) become one node labelled "xk", so a 50-layer network stays one screen.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter

from . import shapes as _sh
from .errors import GraphcError
from .ir import Graph, Node, Tensor, toposort
from .printing import _attrs_str

COLLAPSE_ABOVE = 150  # collapse repeated layers automatically in graphs with more compute nodes
_STYLE = {
    "placeholder": 'shape=ellipse, style=filled, fillcolor="#cfe2ff"',
    "parameter": 'shape=box, style="filled,rounded", fillcolor="#fff3cd"',
    "constant": 'shape=box, style=filled, fillcolor="#eeeeee", fontsize=9',
    "op": 'shape=box, style="filled", fillcolor="#ffffff"',
    "output": 'shape=ellipse, style=filled, fillcolor="#d1e7dd", peripheries=2',
}


class GraphvizNotFound(GraphcError):
    """Graphviz's `dot` program is not installed (the message says how to install it)."""


def _as_graph(obj) -> Graph:
    from .function import Function
    if isinstance(obj, Graph):
        return obj
    if isinstance(obj, Function):
        return obj.graph
    if isinstance(obj, Tensor):
        return Graph([], [obj])
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, Tensor) for t in obj):
        return Graph([], list(obj))
    raise GraphcError(f"cannot draw a {type(obj).__name__}: pass a tensor, a list of tensors, a Graph "
                      f"or a compiled function")


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(t: Tensor) -> str:
    return "[" + ",".join(_sh.fmt_dim(d) for d in t.shape) + "]"


def _op_label(node: Node) -> str:
    name = getattr(node.op, "display_name", lambda n: n.op.name)(node)
    if len(name) > 48:
        name = name[:45] + "...]"
    attrs = _attrs_str(node)
    if len(attrs) > 120:
        attrs = attrs[:117] + "..."
    # wrap long attribute lists at their commas so boxes stay narrow
    lines, cur = [], ""
    for part in attrs.split(", "):
        if cur and len(cur) + len(part) > 40:
            lines.append(cur + ",")
            cur = part
        else:
            cur = f"{cur}, {part}" if cur else part
    return name + "".join("\n" + ln for ln in lines + ([cur] if cur else []))


def _leaf_label(node: Node) -> str:
    t = node.outputs[0]
    if node.op.name == "constant":
        v = node.attrs["value"]
        e = v.reshape(-1)[0].item() if v.size == 1 else None
        head = "const" if e is None else (f"{e:.6g}" if isinstance(e, float) else repr(e))
    else:
        head = t.name or node.op.name
    return f"{head}\n{t.dtype}{_shape(t)}"


def _node_label(node: Node) -> str:
    if node.op.name in ("placeholder", "parameter", "constant"):
        return _leaf_label(node)
    outs = " ".join(f"{o.dtype}{_shape(o)}" for o in node.outputs[:3]) + (" ..." if len(node.outputs) > 3 else "")
    return f"{_op_label(node)}\n{outs}"


class _Dot:
    """Accumulates DOT statements; ids are stable per node object."""

    def __init__(self, collapse: bool, expand_scans: bool):
        self.lines: list[str] = []
        self.ids: dict = {}
        self.collapse, self.expand_scans = collapse, expand_scans
        self.edges: set = set()

    def nid(self, key) -> str:
        if key not in self.ids:
            self.ids[key] = f"n{len(self.ids)}"
        return self.ids[key]

    def edge(self, a: str, b: str, label: str = "", extra: str = "") -> None:
        if (a, b) in self.edges:
            return
        self.edges.add((a, b))
        attrs = [f"label={_q(label)}"] if label else []
        if extra:
            attrs.append(extra)
        self.lines.append(f"  {a} -> {b}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")


def _group_keys(g: Graph, nodes: list[Node], collapse) -> dict:
    """Node id -> group key; nodes of one layer repeated in a loop share a key (see module doc)."""
    if collapse is None:
        collapse = sum(1 for n in nodes if n.inputs) > COLLAPSE_ABOVE
    keep = {id(t.node) for t in g.outputs + g.inputs}

    def key(n):
        attrs = _attrs_str(n) if n.op.name != "constant" else ""
        return (n.loc, n.op.name, attrs, tuple(o.type_str for o in n.outputs))
    counts = Counter(key(n) for n in nodes if id(n) not in keep) if collapse else Counter()
    return {id(n): (key(n) if counts[key(n)] >= 3 and id(n) not in keep else ("node", id(n)), counts[key(n)])
            for n in nodes}


def to_dot(obj, collapse: bool | None = None, expand_scans: bool = False, rankdir: str = "TB",
           name: str = "graphc") -> str:
    """Graphviz DOT text for a tensor, list of tensors, Graph or compiled function (its optimised graph).

    `collapse`: merge repeated layers (None: automatically above COLLAPSE_ABOVE compute nodes)."""
    g = _as_graph(obj)
    d = _Dot(collapse, expand_scans)
    d.lines += [f"digraph {_q(name)} {{", f"  rankdir={rankdir};", '  node [fontname="Helvetica", fontsize=10];',
                '  edge [fontname="Helvetica", fontsize=8, color="#555555"];']
    roots = g.outputs + [u for _, u in g.updates] + [p for p, _ in g.updates] + g.inputs
    nodes = toposort(roots)
    groups = _group_keys(g, nodes, collapse)
    _emit_nodes(d, nodes, groups, "  ")
    for node in nodes:
        for t in node.inputs:
            _edge_in(d, t, node, groups)
    for i, t in enumerate(g.outputs):
        oid = d.nid(("output", i))
        d.lines.append(f"  {oid} [label={_q((t.name or f'output {i}') + chr(10) + t.dtype + _shape(t))}, "
                       f"{_STYLE['output']}];")
        d.edge(_src(d, t, groups), oid, _shape(t))
    for p, u in g.updates:
        d.edge(_src(d, u, groups), _src(d, p, groups), "update", 'style=dashed, color="#b02a37"')
    d.lines.append("}")
    return "\n".join(d.lines) + "\n"


def _emit_nodes(d: _Dot, nodes: list[Node], groups: dict, indent: str) -> None:
    repeated: dict = {}
    for node in nodes:
        gkey, count = groups[id(node)]
        if gkey[0] != "node":
            repeated.setdefault(count, {}).setdefault(gkey, []).append(node)
            continue
        _emit_one(d, node, indent)
    for count, members in sorted(repeated.items()):
        d.lines.append(f"{indent}subgraph cluster_rep{count} {{")
        d.lines.append(f'{indent}  label={_q(f"repeated x{count}")}; style="dashed,rounded"; color="#6f42c1";')
        for gkey, group in members.items():
            first, last = group[0], group[-1]
            label = _node_label(first)
            if first.op.name == "parameter":  # name the range: W0 ... W59
                label = label.replace(first.outputs[0].name or "", f"{first.outputs[0].name} ... "
                                      f"{last.outputs[0].name}", 1)
            style = _STYLE.get(first.op.name, _STYLE["op"])
            d.lines.append(f"{indent}  {d.nid(gkey)} [label={_q(label + f'  x{count}')}, {style}];")
        d.lines.append(f"{indent}}}")


def _emit_one(d: _Dot, node: Node, indent: str) -> None:
    op = node.op.name
    if op == "fused":
        _cluster(d, node, indent, "fused", "#e7f1ff")
        return
    if op == "scan" and d.expand_scans:
        _cluster(d, node, indent, "scan", "#fdf2e9")
        return
    label = _node_label(node)
    if op == "scan":
        length = node.attrs.get("length")
        n_body = len(node.attrs["body"].compute_nodes())
        label = f"scan x{length} ({n_body} ops per step)\n{_op_label(node)}"
    style = _STYLE.get(op, _STYLE["op"])
    d.lines.append(f"{indent}{d.nid(id(node))} [label={_q(label)}, {style}];")


def _cluster(d: _Dot, node: Node, indent: str, kind: str, color: str) -> None:
    """A fused kernel (or scan body) drawn as a cluster of its body's nodes."""
    body: Graph = node.attrs["body"]
    cid = d.nid(id(node))
    title = _op_label(node).split("\n")[0] if kind == "fused" else f"scan x{node.attrs.get('length')}"
    d.lines.append(f"{indent}subgraph cluster_{cid} {{")
    d.lines.append(f'{indent}  label={_q(title)}; style="filled,rounded"; fillcolor="{color}"; color="#888888";')
    bnodes = [n for n in toposort(body.outputs) if n.op.name != "placeholder"]
    for bn in bnodes:
        if not bn.inputs:  # leaves may be shared with other graphs: one copy per cluster
            d.ids[id(bn)] = d.nid((cid, id(bn)))
        _emit_one(d, bn, indent + "  ")
    d.lines.append(f"{indent}}}")
    for bn in bnodes:
        for t in bn.inputs:
            if t.node.op.name != "placeholder":
                d.edge(d.nid(id(t.node)), d.nid(id(bn)), _shape(t))
    for bn in bnodes:
        if not bn.inputs:
            del d.ids[id(bn)]
    # the cluster's id stands for the node: edges from outside enter at the body's consumers
    d.ids[("body-in", id(node))] = [(p, n) for p in body.inputs for n in bnodes
                                    if any(q is p for q in n.inputs)]
    d.ids[("body-out", id(node))] = [d.nid(id(o.node)) if o.node.op.name != "placeholder" else None
                                     for o in body.outputs]


def _src(d: _Dot, t: Tensor, groups: dict) -> str:
    node = t.node
    gkey, _ = groups.get(id(node), (("node", id(node)), 1))
    outs = d.ids.get(("body-out", id(node)))
    if outs is not None and t.index < len(outs):
        if outs[t.index] is None:  # a body output that is one of its inputs: the outer source
            ph = node.attrs["body"].outputs[t.index]
            k = next(i for i, p in enumerate(node.attrs["body"].inputs) if p is ph)
            return _src(d, node.inputs[k], groups)
        return outs[t.index]
    return d.nid(gkey if gkey[0] != "node" else id(node))


def _edge_in(d: _Dot, t: Tensor, node: Node, groups: dict) -> None:
    src = _src(d, t, groups)
    inner = d.ids.get(("body-in", id(node)))
    if inner is not None:  # into a cluster: to each body node reading the matching placeholder
        phs = [node.attrs["body"].inputs[k] for k, u in enumerate(node.inputs) if u is t]
        for p, bn in inner:
            if any(p is ph for ph in phs):
                d.edge(src, d.nid(id(bn)), _shape(t))
        return
    gkey, _ = groups[id(node)]
    dst = d.nid(gkey if gkey[0] != "node" else id(node))
    d.edge(src, dst, _shape(t))


# ---- rendering -------------------------------------------------------------------------------------

def dot_executable() -> str:
    """Path of Graphviz's `dot`; GraphvizNotFound (with install instructions) when missing."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFound("Graphviz's `dot` program was not found on PATH; install Graphviz "
                               "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                               "conda: conda install -c conda-forge graphviz)")
    return exe


def render(dot_text: str, fmt: str = "svg") -> bytes:
    """Run `dot -T<fmt>` on DOT text and return the output bytes."""
    exe = dot_executable()
    try:
        res = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise GraphcError("Graphviz took more than 120 s; draw with collapse=True") from None
    if res.returncode != 0:
        raise GraphcError(f"Graphviz failed ({fmt}): {res.stderr.decode(errors='replace').strip()[:500]}")
    return res.stdout


def draw(obj, path, format: str | None = None, **options) -> str:
    """Render `obj` (see to_dot) to `path`; the format comes from the suffix (.svg .png .pdf .dot).

    .html writes the interactive viewer (graphc.viewer: one self-contained page; no Graphviz needed)."""
    path = os.fspath(path)
    fmt = (format or os.path.splitext(path)[1].lstrip(".") or "svg").lower()
    if fmt in ("html", "htm"):
        from .viewer import write_html
        return write_html(obj, path, **options)
    text = to_dot(obj, **options)
    data = text.encode() if fmt in ("dot", "gv") else render(text, fmt)
    with open(path, "wb") as f:
        f.write(data)
    return path


def to_svg(obj, **options) -> str:
    return render(to_dot(obj, **options), "svg").decode()


def repr_svg(obj) -> str | None:
    """SVG for Jupyter's _repr_svg_, or None (plain repr) when Graphviz is missing."""
    try:
        return to_svg(obj)
    except GraphvizNotFound:
        return None


def repr_html(obj) -> str | None:
    """HTML for Jupyter's _repr_html_: the interactive viewer in an iframe (the SVG stays in the
    notebook's bundle as the fallback for frontends that do not run its script)."""
    from .viewer import repr_html as _viewer_html
    return _viewer_html(obj)


# ---- structure export ----------------------------------------------------------------------------

def structure(obj):
    """A networkx.DiGraph with plain string/int attributes (op, label, shape, dtype, name, role)."""
    import networkx as nx
    g = _as_graph(obj)
    G = nx.DiGraph(name=g.name)
    nodes = toposort(g.outputs + [u for _, u in g.updates] + g.inputs)
    index = {id(n): i for i, n in enumerate(nodes)}
    outs = {id(t.node) for t in g.outputs}
    for n in nodes:
        o = n.outputs[0]
        role = n.op.name if n.op.name in ("placeholder", "parameter", "constant") else "op"
        G.add_node(index[id(n)], op=n.op.name, label=_node_label(n), name=o.name or "",
                   shape=",".join(_sh.fmt_dim(d) for d in o.shape), dtype=o.dtype, role=role,
                   is_output=int(id(n) in outs), loc=f"{n.loc[0]}:{n.loc[1]}")
        for k, t in enumerate(n.inputs):
            G.add_edge(index[id(t.node)], index[id(n)], shape=",".join(_sh.fmt_dim(d) for d in t.shape),
                       dtype=t.dtype, port=k)
    return G


def to_graphml(obj, path) -> str:
    """Write the graph structure as GraphML (yEd, Gephi, networkx.read_graphml)."""
    import networkx as nx
    nx.write_graphml(structure(obj), os.fspath(path))
    return os.fspath(path)


def to_json(obj, path=None) -> str:
    """The graph structure as node-link JSON (d3 / networkx.node_link_graph); written to `path` if given."""
    import networkx as nx
    text = json.dumps(nx.node_link_data(structure(obj), edges="edges"), indent=1)
    if path is not None:
        with open(os.fspath(path), "w") as f:
            f.write(text)
    return text
