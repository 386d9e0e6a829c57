"""The interactive graph viewer: one self-contained HTML page per graph (pan, zoom, search, details).

    gc.draw(f, "model.html")          # f: a compiled function, a Graph, a tensor, a list of tensors,
    html = graphc.viewer.to_html(f)   # or the path of a .graphc / .onnx file
    graphc view model.onnx            # serves the page on http://127.0.0.1:PORT/

The page is built from a JSON model (`model(obj)`) with the layout computed here, at export time:
every node carries its op, attributes, input/output types (symbolic dims by name), the user's
source line, whether it belongs to the forward pass, the gradient or the optimiser's update, and
for a compiled function its kernel, the memory plan's buffer, whether the backend ran it on the
host (info["fallback_ops"]) and its time when timings are given. Fused kernels and scan bodies are
nested blocks laid out on their own; the page draws them as one box that expands on click (the
layers below it move down, the nodes beside it to the right). The page's script and style
(graphc/viewer_assets) are inlined, so it opens offline.

Layout: a layered drawing. Compute nodes get the longest-path rank from the sources; leaves
(inputs, parameters, large constants) sit one rank above their first reader; the order in each
rank comes from barycenter sweeps, x positions from averaging neighbours with the order kept.
Small constants (<= SMALL_CONST elements) are not drawn: they show as inputs in the details.
"""
from __future__ import annotations

import html as _html
import json
import linecache
import os
from importlib import resources

from . import shapes as _sh
from .errors import GraphcError
from .ir import Graph, Node, Tensor, Trait, toposort

SMALL_CONST = 16      # constants with at most this many elements are shown inline, not as nodes
CHAR_W, LINE_H = 6.6, 14   # the page's font metrics (px at zoom 1) used to size boxes
NODE_H, MAX_W, MIN_W = 34, 240, 44
RANK_GAP, NODE_SEP = 34, 16
SWEEPS = 6


class ViewerError(GraphcError):
    """The viewer cannot show the object or write/serve the page."""


def _load_path(path: str) -> Graph:
    from .serialize import SerializationError, load_model
    try:
        return load_model(path)
    except SerializationError as e:
        raise ViewerError(str(e)) from None


def _resolve(obj):
    """(graph, compiled function or None) for anything gc.draw accepts."""
    from .function import Function
    if isinstance(obj, (str, os.PathLike)):
        obj = _load_path(os.fspath(obj))
    if isinstance(obj, Function):
        return obj.graph, obj
    if isinstance(obj, Graph):
        return obj, None
    if isinstance(obj, Tensor):
        return Graph([], [obj]), None
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, Tensor) for t in obj):
        return Graph([], list(obj)), None
    raise ViewerError(f"cannot view a {type(obj).__name__}: pass a tensor, a list of tensors, a Graph, a compiled "
                      f"function or the path of a .graphc/.onnx file")


def _type(t: Tensor) -> str:
    return f"{t.dtype}[{','.join(_sh.fmt_dim(d) for d in t.shape)}]"


def _attr(v) -> str:
    from .printing import _fmt_attr
    s = _fmt_attr(v)
    return s if len(s) <= 200 else s[:197] + "..."


def _small_const(node: Node) -> bool:
    return node.op.has(Trait.CONST) and isinstance(node.outputs[0].size, int) and node.outputs[0].size <= SMALL_CONST


def _const_text(node: Node) -> str:
    v = node.attrs["value"]
    if v.size == 1:
        e = v.reshape(-1)[0].item()
        return f"const {e:.6g}" if isinstance(e, float) else f"const {e!r}"
    return "const " + str(v.tolist())[:60]


def _width(*lines: str) -> float:
    n = max((len(s) for s in lines), default=0)
    return float(min(MAX_W, max(MIN_W, n * CHAR_W + 16)))


def _clip(s: str, n: int = 34) -> str:
    return s if len(s) <= n else s[:n - 1] + "\u2026"


class _Builder:
    def __init__(self, graph: Graph, fn, timings):
        self.g, self.fn = graph, fn
        self.nodes: list[dict] = []
        self.edges: list[list] = []
        self.blocks: dict[str, dict] = {}
        self.files: dict[str, str] = {}
        self.fallback = set(fn.program.info.get("fallback_ops", [])) if fn is not None else set()
        self.timings = timings
        self.buffers = self._buffers() if fn is not None else ({}, {})

    def _buffers(self):
        """({id(tensor): slot}, {id(tensor) computed in place}) from the memory plan: tensors sharing a
        slot reuse one piece of workspace memory in turn (equal size, disjoint lifetimes)."""
        try:
            from .passes import memory as _mem
            plan = _mem.plan_buffers(self.g)
            slot = list(_mem.equal_size_groups(plan)) if hasattr(_mem, "equal_size_groups") else None
            assign = {t: (slot[k] if slot is not None else k) for t, k in plan.assign.items()}
            return assign, dict(plan.in_place)
        except Exception:  # noqa: BLE001 - the memory view is optional; the page still shows the graph
            return {}, {}

    # ---- classification: forward / gradient / update -------------------------------------------
    def parts(self) -> tuple[dict, set]:
        g = self.g
        fwd = toposort(g.outputs)
        fwd_ids = {id(n) for n in fwd}
        needed = {id(t) for n in fwd for t in n.inputs} | {id(t) for t in g.outputs}
        update_vals = {id(u) for _, u in g.updates}
        part = {}
        for n in g.nodes:
            if id(n) in fwd_ids:
                part[id(n)] = "forward"
            elif n.op.has(Trait.STATE):
                part[id(n)] = "state"       # optimiser state: read only by updates
            elif n.op.has(Trait.LEAF):
                part[id(n)] = "gradient" if n.op.has(Trait.CONST) else "forward"
            elif any(id(o) in update_vals for o in n.outputs) or any(
                    part.get(id(t.node)) in ("update", "state") for t in n.inputs):
                part[id(n)] = "update"
            else:
                part[id(n)] = "gradient"
        return part, needed

    # ---- nodes ---------------------------------------------------------------------------------
    def _loc(self, node: Node) -> tuple[str, str]:
        fn, line = node.loc
        if not line:
            return "", ""
        return f"{fn}:{line}", linecache.getline(fn, line).strip()

    def add_node(self, rec: dict) -> int:
        rec["id"] = len(self.nodes)
        self.nodes.append(rec)
        return rec["id"]

    def node_record(self, node: Node, parent: int, part: str, kernel, fb: bool, tm) -> dict:
        op = node.op
        outs = node.outputs
        if op.has(Trait.LEAF):
            t = outs[0]
            kind = "input" if op.has(Trait.INPUT) else "parameter" if op.has(Trait.STATE) else "constant"
            title = t.name or (_const_text(node) if kind == "constant" else op.name)
        else:
            kind = op.name if op.name in ("fused", "scan") else "op"
            title = getattr(op, "display_name", lambda n: n.op.name)(node)
            if op.name == "scan":
                title = f"scan x{_sh.fmt_dim(node.attrs.get('length'))} ({len(node.attrs['body'].compute_nodes())} ops)"
        sub = " ".join(_type(o) for o in outs[:2]) + (" \u2026" if len(outs) > 2 else "")
        loc, code = self._loc(node)
        attrs = {k: _attr(v) for k, v in node.attrs.items() if k != "value" and not isinstance(v, Graph)}
        if op.has(Trait.CONST):
            attrs["value"] = _const_text(node)[6:]
        buf, ip = self.buffers
        bufs = [buf[id(o)] for o in outs if id(o) in buf]
        names = [o.name for o in outs if o.name]
        title_s, sub_s = _clip(title), _clip(sub, 40)
        return {"op": op.name, "kind": kind, "title": title_s, "full": title, "sub": sub_s,
                "names": names, "attrs": attrs, "ins": [], "outs": [_type(o) for o in outs],
                "loc": loc, "code": code, "part": part, "kernel": kernel, "fb": fb,
                "buf": bufs or None, "inplace": any(id(o) in ip for o in outs), "time": tm,
                "parent": parent, "w": _width(title_s, sub_s), "h": NODE_H}

    def build(self) -> dict:
        part, needed = self.parts()
        g = self.g
        kernels = [n for n in g.nodes if not n.op.has(Trait.LEAF)] if self.fn is not None else []
        kidx = {id(n): k for k, n in enumerate(kernels)}
        times = _timings(self.timings, len(kernels))
        self.block(g, -1, "root", part, needed, kidx, times, top=True)
        return {"nodes": self.nodes, "edges": self.edges, "blocks": self.blocks}

    def block(self, g: Graph, parent: int, key: str, part, needed, kidx, times, top=False, ctx=None) -> None:
        """Add the nodes and edges of `g` (the top-level graph or a body) as block `key`."""
        ids: dict = {}              # id(node) -> viewer id
        members: list[int] = []
        bedges: list[list] = []     # this block's edges (bodies keep their own)
        order = g.nodes   # the schedule order where a pass set one
        body_in_labels = (ctx or {}).get("in_labels", [])
        for node in order:
            if _small_const(node):
                continue
            if top:
                p = part[id(node)]
                kernel = None
                if id(node) in kidx:
                    k = kidx[id(node)]
                    kernel = f"#{k} {getattr(node.op, 'display_name', lambda n: n.op.name)(node)}"
                    if node.op.name in self.fallback:
                        kernel += " (host fallback)"
                fb = id(node) in kidx and node.op.name in self.fallback
                tm = times.get(kidx.get(id(node), -1))
            else:
                p = ctx["part"](node)
                kernel, fb, tm = ctx["kernel"], False, None
            rec = self.node_record(node, parent, p, kernel, fb, tm)
            if not top and node.op.has(Trait.INPUT):
                k = next((i for i, t in enumerate(g.inputs) if t is node.outputs[0]), None)
                if k is not None and k < len(body_in_labels):
                    rec["title"] = _clip(body_in_labels[k])
                    rec["full"] = body_in_labels[k]
                    rec["w"] = _width(rec["title"], rec["sub"])
            i = self.add_node(rec)
            ids[id(node)] = i
            members.append(i)
            if node.op.name in ("fused", "scan") and isinstance(node.attrs.get("body"), Graph):
                self.body(node, i, p, needed if top else None, kernel)
        for node in order:
            if id(node) not in ids:
                continue
            i = ids[id(node)]
            for k, t in enumerate(node.inputs):
                src = ids.get(id(t.node))
                label = _const_text(t.node) if src is None else (t.name or "")
                self.nodes[i]["ins"].append({"src": src, "type": _type(t), "label": label,
                                             "out": t.index if src is not None and len(t.node.outputs) > 1 else None})
                if src is not None:
                    bedges.append([src, i, _type(t), 0])
        # the block's outputs (top level: the function's outputs; bodies: the values leaving the kernel)
        out_labels = (ctx or {}).get("out_labels", [])
        for k, t in enumerate(g.outputs):
            label = t.name or (out_labels[k] if k < len(out_labels) else f"output {k}")
            p = "forward" if top else ctx["part"](t.node)
            rec = {"op": "output", "kind": "output", "title": _clip(label), "full": label, "sub": _clip(_type(t), 40),
                   "names": [t.name] if t.name else [], "attrs": {}, "ins": [], "outs": [_type(t)], "loc": "",
                   "code": "", "part": p, "kernel": None, "fb": False, "buf": None, "inplace": False,
                   "time": None, "parent": parent}
            rec["w"], rec["h"] = _width(rec["title"], rec["sub"]), NODE_H
            i = self.add_node(rec)
            members.append(i)
            src = ids.get(id(t.node))
            rec["ins"].append({"src": src, "type": _type(t), "label": "" if src is not None else _const_text(t.node),
                               "out": t.index if len(t.node.outputs) > 1 else None})
            if src is not None:
                bedges.append([src, i, _type(t), 0])
        if top:
            for prm, u in g.updates:  # update edges: new value -> the parameter it replaces
                if id(u.node) in ids and id(prm.node) in ids:
                    bedges.append([ids[id(u.node)], ids[id(prm.node)], "update", 1])
                    self.nodes[ids[id(prm.node)]]["updated_by"] = ids[id(u.node)]
        self.edges += bedges
        self.blocks[key] = layout(self.nodes, members, bedges)

    def body(self, node: Node, vid: int, outer_part: str, needed, kernel) -> None:
        body: Graph = node.attrs["body"]
        if node.op.name == "scan":
            nc, ns = node.attrs["n_carry"], node.attrs["n_seq"]
            in_labels = ([f"carry {k}" for k in range(nc)] + [f"x {k} (step slice)" for k in range(ns)]
                         + [f"invariant {k}" for k in range(len(body.inputs) - nc - ns)])
            out_labels = [f"new carry {k}" for k in range(nc)] + [f"y {k}" for k in range(len(body.outputs) - nc)]
        else:
            in_labels = [f"in {k}" + (f" = {t.name}" if t.name else "") for k, t in enumerate(node.inputs)]
            out_labels = [f"out {k}" for k in range(len(body.outputs))]
        mixed = needed is not None and outer_part == "forward" and node.op.name == "fused"
        fwd_ids: set = set()
        if mixed:  # a kernel of forward and gradient ops: its forward part computes what the forward reads
            roots = [b for b, o in zip(body.outputs, node.outputs) if id(o) in needed]
            fwd_ids = {id(n) for n in toposort(roots)}

        def part_of(n):
            if not mixed:
                return outer_part
            return "forward" if id(n) in fwd_ids else "gradient"
        ctx = {"in_labels": in_labels, "out_labels": out_labels, "part": part_of, "kernel": kernel}
        self.nodes[vid]["block"] = str(vid)
        self.block(body, vid, str(vid), None, None, {}, {}, top=False, ctx=ctx)
        self.nodes[vid]["members"] = sum(1 for n in body.compute_nodes())


def _timings(timings, n_kernels: int) -> dict:
    """{kernel index: seconds} from a list (one per kernel, schedule order) or a dict; checked."""
    if timings is None:
        return {}
    if isinstance(timings, dict):
        items = list(timings.items())
    else:
        items = list(enumerate(timings))
    out = {}
    for k, v in items:
        if isinstance(v, (tuple, list)):  # (seconds, label) pairs as benchmarks' profiles give
            v = v[0]
        if not isinstance(k, int) or not 0 <= k < n_kernels:
            raise ViewerError(f"timings: kernel {k!r} is not one of the function's {n_kernels} kernels "
                              f"(schedule order, 0-based)")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ViewerError(f"timings: kernel {k} has a non-numeric time {v!r}") from None
    return out


# ---- layout -------------------------------------------------------------------------------------

def layout(nodes: list[dict], members: list[int], edges: list[list]) -> dict:
    """Layered layout of the block holding `members` (viewer ids in topological order).

    Sets each member's "r" (rank) and "x" (centre, block-local, >= w/2); returns the block
    {"ranks": [[ids in order]], "rh": [rank heights], "w", "h"} (y follows from the ranks)."""
    mset = set(members)
    preds: dict[int, list[int]] = {i: [] for i in members}
    succs: dict[int, list[int]] = {i: [] for i in members}
    for s, t, _, kind in edges:
        if kind == 0 and s in mset and t in mset:
            preds[t].append(s)
            succs[s].append(t)
    rank: dict[int, int] = {}
    for i in members:  # topological: predecessors first
        rank[i] = 1 + max((rank[p] for p in preds[i]), default=-1)
    for i in reversed(members):  # sources (leaves) one rank above their first reader
        if not preds[i] and succs[i]:
            rank[i] = max(0, min(rank[s] for s in succs[i]) - 1)
    n_ranks = 1 + max(rank.values(), default=-1)
    ranks: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in members:
        ranks[rank[i]].append(i)
    # order within ranks: barycenter sweeps on normalised positions
    pos = {}

    def set_pos(r):
        n = len(ranks[r])
        for k, i in enumerate(ranks[r]):
            pos[i] = (k + 0.5) / n
    for r in range(n_ranks):
        set_pos(r)
    for sweep in range(SWEEPS):
        down = sweep % 2 == 0
        nb = preds if down else succs
        for r in (range(1, n_ranks) if down else range(n_ranks - 2, -1, -1)):
            def key(i):
                ps = nb[i]
                return sum(pos[p] for p in ps) / len(ps) if ps else pos[i]
            ranks[r].sort(key=key)
            set_pos(r)
    # x coordinates: pack, then pull towards the neighbours' mean keeping order and separation
    w = {i: nodes[i]["w"] for i in members}
    x: dict[int, float] = {}
    for row in ranks:
        cur = 0.0
        for i in row:
            x[i] = cur + w[i] / 2
            cur += w[i] + NODE_SEP
        shift = cur / 2
        for i in row:
            x[i] -= shift

    def place(row, desired):
        prev = None
        xs = []
        for i, d in zip(row, desired):
            v = d if prev is None else max(d, xs[-1] + (w[prev] + w[i]) / 2 + NODE_SEP)
            xs.append(v)
            prev = i
        off = sum(d - v for d, v in zip(desired, xs)) / max(len(xs), 1)
        for i, v in zip(row, xs):
            x[i] = v + off
    for sweep in range(4):
        down = sweep % 2 == 0
        nb = preds if down else succs
        for r in (range(1, n_ranks) if down else range(n_ranks - 2, -1, -1)):
            row = ranks[r]
            desired = [sum(x[p] for p in nb[i]) / len(nb[i]) if nb[i] else x[i] for i in row]
            place(row, desired)
    if members:
        lo = min(x[i] - w[i] / 2 for i in members)
        hi = max(x[i] + w[i] / 2 for i in members)
    else:
        lo = hi = 0.0
    for i in members:
        nodes[i]["r"] = rank[i]
        nodes[i]["x"] = round(x[i] - lo, 1)
    rh = [max(nodes[i]["h"] for i in row) if row else NODE_H for row in ranks]
    height = sum(rh) + RANK_GAP * max(n_ranks - 1, 0)
    return {"ranks": ranks, "rh": rh, "w": round(hi - lo, 1), "h": height}


# ---- the model and the page ---------------------------------------------------------------------

def model(obj, title: str | None = None, timings=None) -> dict:
    """The JSON-able model the page draws (see the module docstring); `timings`: seconds per kernel
    of a compiled function, a list in schedule order or {kernel index: seconds}."""
    g, fn = _resolve(obj)
    if timings is None and fn is not None and callable(getattr(fn, "explain", None)):
        timings = _explain_timings(fn)
    if timings is not None and fn is None:
        raise ViewerError("timings are per kernel of a compiled function: pass the function, not a graph")
    b = _Builder(g, fn, timings)
    data = b.build()
    info = {"title": title or g.name, "kind": "function" if fn is not None else "graph",
            "backend": fn.backend_name if fn is not None else None,
            "inputs": len(g.inputs), "outputs": len(g.outputs), "updates": len(g.updates),
            "ops": sum(1 for n in data["nodes"] if n["kind"] in ("op", "fused", "scan")),
            "fallback_ops": sorted(b.fallback), "kernels": None, "memory": None,
            "timed": any(n["time"] is not None for n in data["nodes"])}
    if fn is not None:
        info["kernels"] = sum(1 for n in g.nodes if not n.op.has(Trait.LEAF))
        info["memory"] = _memory_summary(fn)
    data["info"] = info
    return data


def _explain_timings(fn):
    try:
        rep = fn.explain()
    except Exception:  # noqa: BLE001 - an explain() that needs arguments or data: no overlay
        return None
    kernels = rep.get("kernels") if isinstance(rep, dict) else getattr(rep, "kernels", None)
    if not kernels:
        return None
    try:
        return [k["seconds"] if isinstance(k, dict) else k for k in kernels]
    except (KeyError, TypeError):
        return None


def _memory_summary(fn) -> dict | None:
    try:
        mp = fn.memory_plan()
    except Exception:  # noqa: BLE001 - a backend without a plan: no summary
        return None
    fmt = lambda v: str(v) if v is not None else "?"  # noqa: E731
    return {"peak": fmt(getattr(mp, "peak_bytes", None)), "naive": fmt(getattr(mp, "naive_bytes", None)),
            "workspace": fmt(getattr(mp, "workspace_bytes", None)), "buffers": len(getattr(mp, "buffers", ())),
            "tensors": len(getattr(mp, "assignment", ())), "in_place": len(getattr(mp, "in_place", ()))}


def _asset(name: str) -> str:
    return resources.files("graphc").joinpath("viewer_assets", name).read_text(encoding="utf-8")


def _script_json(data: dict) -> str:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("<", "\\u003c")   # no "</script>" or "<!--" can end the data block early


def to_html(obj, title: str | None = None, timings=None) -> str:
    """The self-contained page (HTML text) for `obj`."""
    data = model(obj, title, timings)
    t = _html.escape(data["info"]["title"] or "graph")
    return (_asset("page.html").replace("{{TITLE}}", t)
            .replace("/*{{CSS}}*/", _asset("viewer.css"))
            .replace("/*{{JS}}*/", _asset("viewer.js"))
            .replace("{{DATA}}", _script_json(data)))


def write_html(obj, path, title: str | None = None, timings=None, **ignored) -> str:
    """Write the page for `obj` to `path`; returns the path. Options of the static pictures
    (collapse, expand_scans, rankdir) are accepted and ignored: the page collapses and expands itself."""
    unknown = set(ignored) - {"collapse", "expand_scans", "rankdir", "name"}
    if unknown:
        raise ViewerError(f"unknown option(s) for the HTML viewer: {', '.join(sorted(unknown))}")
    path = os.fspath(path)
    text = to_html(obj, title, timings)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def repr_html(obj, height: int = 640) -> str | None:
    """Jupyter's _repr_html_: the page in an iframe (srcdoc), so its script and style stay its own."""
    try:
        page = to_html(obj)
    except GraphcError:
        return None
    return (f'<iframe srcdoc="{_html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
            f'border:1px solid #ddd" sandbox="allow-scripts"></iframe>')


def serve(obj, port: int = 8000, host: str = "127.0.0.1", title: str | None = None, ready=None):
    """Serve the page for `obj` at http://host:port/ until interrupted. `ready(url)` is called once
    the server listens (the CLI prints the URL)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    page = to_html(obj, title).encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0] in ("/", "/index.html"):
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass
    try:
        server = ThreadingHTTPServer((host, int(port)), Handler)
    except OSError as e:
        raise ViewerError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    url = f"http://{host}:{server.server_address[1]}/"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return url
