"""The interactive viewer (graphc.viewer): the JSON model and layout the page is built from, checked
against the graph itself; the CLI; and the page driven in headless Chromium (Debian's package, driven
by the `playwright` Python package; those tests skip, with the reason, where either is missing)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import warnings

import numpy as np
import pytest

import graphc as gc
from graphc import viewer
from graphc.errors import GraphcError
from graphc.ir import Trait, toposort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
HERE = os.path.abspath(__file__)


def _here() -> int:
    return sys._getframe(1).f_lineno


def _page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="graphc-data">(.*?)</script>', html, re.S)
    assert m, "the page has no data block"
    assert "<" not in m.group(1)
    return json.loads(m.group(1))


def _mlp(rng):
    x = gc.placeholder("x", (None, 8))
    W1 = gc.parameter("W1", rng.standard_normal((8, 16)).astype(np.float32))
    b1 = gc.parameter("b1", np.zeros(16, np.float32))
    W2 = gc.parameter("W2", rng.standard_normal((16, 4)).astype(np.float32))
    h, line_h = gc.tanh(x @ W1 + b1), _here()
    y, line_y = gc.log_softmax(h @ W2), _here()
    return x, (W1, b1, W2), h, y, {"tanh": line_h, "log_softmax": line_y}


def _sgd_step(rng, lr=0.1):
    x, params, h, y, lines = _mlp(rng)
    t = gc.placeholder("t", (None, 4))
    loss = -gc.mean(gc.sum(t * y, axis=1))
    grads = gc.grad(loss, list(params))
    updates = [(p, p - lr * g) for p, g in zip(params, grads)]
    return x, t, params, loss, grads, updates, lines


# ---- the model: nodes, edges, types, source lines ----------------------------------------------------

def test_model_has_every_node_edge_and_type(rng):
    x, params, h, y, lines = _mlp(rng)
    g = gc.Graph([x], [y])
    m = viewer.model(g)
    nodes = [n for n in m["nodes"] if n["kind"] != "output"]
    graph_nodes = [n for n in toposort([y]) if not (n.op.has(Trait.CONST) and n.outputs[0].size <= viewer.SMALL_CONST)]
    assert sorted(n["op"] for n in nodes) == sorted(n.op.name for n in graph_nodes)
    # every edge is an input of the graph (small constants are shown as inputs, not edges)
    n_edges = sum(1 for n in graph_nodes for t in n.inputs
                  if not (t.node.op.has(Trait.CONST) and t.node.outputs[0].size <= viewer.SMALL_CONST))
    assert len([e for e in m["edges"] if e[3] == 0]) == n_edges + 1   # + the edge into "output 0"
    by_op = {n["op"]: n for n in nodes}
    assert by_op["matmul"]["outs"] in (["float32[N,16]"], ["float32[N,4]"])   # symbolic dim shown by name
    assert by_op["placeholder"]["names"] == ["x"] and by_op["placeholder"]["outs"] == ["float32[N,8]"]
    assert by_op["log_softmax"]["attrs"] == {"axis": str(y.node.attrs["axis"])} == {"axis": "1"}
    for op, line in lines.items():   # the user's source line, with its text
        assert by_op[op]["loc"] == f"{HERE}:{line}"
        assert op in by_op[op]["code"]
    assert {n["kind"] for n in nodes} == {"input", "parameter", "op"}
    assert all(n["part"] == "forward" for n in m["nodes"])
    assert m["info"]["kind"] == "graph" and m["info"]["ops"] == sum(1 for n in graph_nodes if n.inputs)


def test_small_constants_are_inputs_large_ones_nodes(rng):
    x = gc.placeholder("x", (None, 40))
    big = gc.constant(np.arange(40, dtype=np.float32))
    y = (x * 2.5) + big
    m = viewer.model(gc.Graph([x], [y]))
    mul = next(n for n in m["nodes"] if n["op"] == "mul")
    assert [i["label"] for i in mul["ins"] if i["src"] is None] == ["const 2.5"]
    consts = [n for n in m["nodes"] if n["kind"] == "constant"]
    assert len(consts) == 1 and consts[0]["outs"] == ["float32[40]"]


def test_forward_gradient_and_update_parts(rng):
    x, t, params, loss, grads, updates, _ = _sgd_step(rng)
    g = gc.Graph([x, t], [loss], updates)
    m = viewer.model(g)
    fwd = {id(n) for n in toposort([loss])}
    grad_only = [n for n in toposort(grads) if id(n) not in fwd and n.inputs]
    upd = [u.node for _, u in updates]
    count = lambda part: sum(1 for n in m["nodes"] if n["part"] == part and n["kind"] == "op")  # noqa: E731
    assert count("forward") == sum(1 for n in toposort([loss]) if n.inputs)
    # SGD: the update value p - lr*g is the update; lr*g belongs to the gradient side
    upd_ids = {id(n) for n in upd}
    grad_side = [n for n in toposort([u for _, u in updates]) if id(n) not in fwd and n.inputs and id(n) not in upd_ids]
    assert {id(n) for n in grad_only} <= {id(n) for n in grad_side}
    assert len(grad_side) == len(grad_only) + len(params)   # the lr*g products
    assert count("gradient") == len(grad_side)
    assert count("update") == len(upd)
    # parameters and their update edges
    pnodes = {n["names"][0]: n for n in m["nodes"] if n["kind"] == "parameter"}
    assert set(pnodes) == {"W1", "b1", "W2"}
    upd_edges = [e for e in m["edges"] if e[3] == 1]
    assert sorted(m["nodes"][e[1]]["names"][0] for e in upd_edges) == ["W1", "W2", "b1"]
    for e in upd_edges:
        assert m["nodes"][e[0]]["part"] == "update" and pnodes[m["nodes"][e[1]]["names"][0]]["updated_by"] == e[0]


def test_adam_state_is_marked(rng):
    x, t, params, loss, *_ = _sgd_step(rng)
    opt = gc.optim.Adam(1e-3)
    g = gc.Graph([x, t], [loss], opt.updates(loss, list(params)))
    m = viewer.model(g)
    state = [n for n in m["nodes"] if n["part"] == "state"]
    assert state and all(n["kind"] == "parameter" for n in state)
    fwd_params = {n["names"][0] for n in m["nodes"] if n["kind"] == "parameter" and n["part"] == "forward"}
    assert fwd_params == {"W1", "b1", "W2"}
    # the Adam arithmetic reads the state: update; the update edges target every updated parameter
    assert sum(1 for n in m["nodes"] if n["part"] == "update") > 3 * len(params)
    assert len([e for e in m["edges"] if e[3] == 1]) == len(g.updates)


def test_fused_kernels_are_nested_blocks_with_kernel_and_memory(rng):
    x, t, params, loss, grads, updates, _ = _sgd_step(rng)
    f = gc.function([x, t], loss, updates=updates)
    m = viewer.model(f)
    fused = [n for n in f.graph.nodes if n.op.name == "fused"]
    boxes = [n for n in m["nodes"] if n["kind"] == "fused"]
    assert fused and len(boxes) == len(fused)
    for node, box in zip(fused, boxes):
        members = [n for n in m["nodes"] if n["parent"] == box["id"] and n["kind"] == "op"]
        body_ops = [n.op.name for n in node.attrs["body"].compute_nodes()]
        assert sorted(n["op"] for n in members) == sorted(body_ops)
        assert box["members"] == len(body_ops) and box["block"] in m["blocks"]
        assert all(n["kernel"] == box["kernel"] for n in members)
    kernels = [n for n in f.graph.nodes if not n.op.has(Trait.LEAF)]
    assert m["info"]["kernels"] == len(kernels)
    top = [n for n in m["nodes"] if n["parent"] == -1 and n["kernel"]]
    assert sorted(int(n["kernel"].split()[0][1:]) for n in top) == list(range(len(kernels)))
    assert m["info"]["memory"] is not None


def test_memory_slots_are_shared_only_by_disjoint_lifetimes():
    x = gc.placeholder("x", (64, 64))
    v = x
    for k in range(6):   # matmuls into fresh buffers: lifetimes end one step later, so slots are reused
        v = gc.tanh(v @ v) if k % 2 else v @ v
    f = gc.function([x], gc.sum(v), optimize=1)
    m = viewer.model(f)
    order = {}
    pos = {}
    for i, n in enumerate(f.graph.nodes):
        pos[id(n)] = i
    last = {}
    for n in f.graph.nodes:
        for t in n.inputs:
            last[id(t.node)] = max(last.get(id(t.node), 0), pos[id(n)])
    kernels = [n for n in f.graph.nodes if not n.op.has(Trait.LEAF)]
    recs = {int(n["kernel"].split()[0][1:]): n for n in m["nodes"] if n["parent"] == -1 and n["kernel"]}
    for k, node in enumerate(kernels):
        if recs[k]["buf"]:
            order.setdefault(recs[k]["buf"][0], []).append((pos[id(node)], last.get(id(node), pos[id(node)])))
    assert order, "no tensor was planned into a workspace buffer"
    for spans in order.values():
        spans.sort()
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert a1 <= b0, f"slot shared by overlapping lifetimes {spans}"


def test_scan_body_is_a_block(rng):
    lstm = gc.nn.LSTM(2, 4, seed=0)
    x = gc.placeholder("x", (None, 5, 2))
    out, (h, c) = lstm(x)
    loss = gc.mean(h[0] ** 2)
    g = gc.Graph([x], [loss], [(p, p - 0.1 * gp) for p, gp in zip(lstm.params, gc.grad(loss, lstm.params))])
    m = viewer.model(g)
    scans = [n for n in m["nodes"] if n["kind"] == "scan"]
    assert {n["part"] for n in scans} == {"forward", "gradient"}   # the loop and its BPTT loop
    graph_scans = [n for n in g.nodes if n.op.name == "scan"]
    for rec, node in zip(scans, graph_scans):
        inner = [n for n in m["nodes"] if n["parent"] == rec["id"] and n["kind"] in ("op", "fused", "scan")]
        assert len(inner) == len(node.attrs["body"].compute_nodes()) == rec["members"]
        assert rec["title"].startswith("scan x5")
        titles = [n["title"] for n in m["nodes"] if n["parent"] == rec["id"] and n["kind"] == "input"]
        assert "carry 0" in titles and any(s.startswith("x 0") for s in titles)


def test_layout_is_layered_without_overlaps(rng):
    x, t, params, loss, grads, updates, _ = _sgd_step(rng)
    f = gc.function([x, t], loss, updates=updates)
    m = viewer.model(f)
    nodes = m["nodes"]
    for key, blk in m["blocks"].items():
        ids = [i for row in blk["ranks"] for i in row]
        assert len(ids) == len(set(ids))
        members = {i for i in ids}
        for s, d, _, kind in m["edges"]:
            if kind == 0 and s in members:
                assert d in members and nodes[s]["r"] < nodes[d]["r"], (key, s, d)
        for r, row in enumerate(blk["ranks"]):
            assert all(nodes[i]["r"] == r for i in row)
            for a, b in zip(row, row[1:]):   # left to right, apart
                gap = nodes[b]["x"] - nodes[b]["w"] / 2 - (nodes[a]["x"] + nodes[a]["w"] / 2)
                assert gap >= viewer.NODE_SEP - 0.2, (key, a, b, gap)
            for i in row:
                assert nodes[i]["x"] - nodes[i]["w"] / 2 >= -0.2
                assert nodes[i]["x"] + nodes[i]["w"] / 2 <= blk["w"] + 0.2
        assert len(blk["rh"]) == len(blk["ranks"])
    top = {i for row in m["blocks"]["root"]["ranks"] for i in row}
    assert top == {n["id"] for n in nodes if n["parent"] == -1}


def test_layout_is_fast_for_5000_nodes():
    g = _big_graph(5000)
    t0 = time.perf_counter()
    m = viewer.model(g)
    took = time.perf_counter() - t0
    assert len(m["nodes"]) >= 5000
    assert took < 15, f"model and layout of 5,000 nodes took {took:.1f} s"


def test_timings_and_fallback(rng, monkeypatch):
    x, params, h, y, _ = _mlp(rng)
    f = gc.function([x], y, optimize=0)
    kernels = [n for n in f.graph.nodes if not n.op.has(Trait.LEAF)]
    times = [1e-3 * (k + 1) for k in range(len(kernels))]
    monkeypatch.setitem(f.program.info, "fallback_ops", ["tanh"])
    m = viewer.model(f, timings=times)
    tanh = next(n for n in m["nodes"] if n["op"] == "tanh")
    assert tanh["fb"] and "host fallback" in tanh["kernel"] and m["info"]["fallback_ops"] == ["tanh"]
    assert not any(n["fb"] for n in m["nodes"] if n["op"] != "tanh")
    for n in m["nodes"]:
        if n["kernel"]:
            k = int(n["kernel"].split()[0][1:])
            assert n["time"] == pytest.approx(times[k])
    assert m["info"]["timed"]
    with pytest.raises(viewer.ViewerError, match="kernel 99"):
        viewer.model(f, timings={99: 1.0})
    with pytest.raises(viewer.ViewerError, match="non-numeric"):
        viewer.model(f, timings=["fast"] * len(kernels))
    with pytest.raises(viewer.ViewerError, match="compiled function"):
        viewer.model(f.graph, timings=times)


# ---- the page ----------------------------------------------------------------------------------------

def test_page_is_self_contained_and_escapes_names(rng, tmp_path):
    evil = "</script><script>alert(1)</script><!--"
    x = gc.placeholder("x", (None, 3))
    y = gc.exp(x) + gc.parameter(evil, np.zeros(3, np.float32))
    path = gc.draw(gc.Graph([x], [y], name=evil), tmp_path / "g.html")
    text = open(path, encoding="utf-8").read()
    assert text.count("</script>") == 2   # the data block's and the viewer script's
    assert "<title>&lt;/script&gt;" in text
    assert not re.search(r'(src|href)="(https?:)?//', text), "the page loads something from the network"
    data = _page_data(text)
    assert [n["names"] for n in data["nodes"] if n["kind"] == "parameter"] == [[evil]]
    assert data["info"]["title"] == evil
    assert "graphcViewer" in text and "<style>" in text


def test_draw_accepts_every_kind_of_object(rng, tmp_path):
    x, params, h, y, _ = _mlp(rng)
    g = gc.Graph([x], [y], name="mlp")
    f = gc.function(g)
    gc.save(g, tmp_path / "m.graphc")
    for k, obj in enumerate([y, [h, y], g, f, str(tmp_path / "m.graphc")]):
        out = gc.draw(obj, tmp_path / f"v{k}.html")
        assert _page_data(open(out, encoding="utf-8").read())["nodes"]
    with pytest.raises(GraphcError, match="cannot view a dict"):
        gc.draw({}, tmp_path / "bad.html")
    with pytest.raises(viewer.ViewerError, match="no such file"):
        gc.draw(str(tmp_path / "missing.onnx"), tmp_path / "bad.html")
    with pytest.raises(viewer.ViewerError, match="unknown option"):
        gc.draw(y, tmp_path / "bad.html", colour="red")


def test_repr_html_is_an_iframe_with_the_page(rng):
    from graphc import viz
    x, params, h, y, _ = _mlp(rng)
    f = gc.function([x], y)
    html = viz.repr_html(f)
    assert html.startswith("<iframe srcdoc=") and "graphc-data" in html and "<script" not in html.split('"')[0]
    assert viz.repr_html(gc.Graph([x], [y])).startswith("<iframe")


def test_jupyter_repr_html_hooks(rng):
    x, params, h, y, _ = _mlp(rng)
    f = gc.function([x], y)
    if not hasattr(gc.Graph, "_repr_html_") or not hasattr(gc.Function, "_repr_html_"):
        pytest.skip("gc.Graph/gc.Function have no _repr_html_ hook yet (graphc.ir/function: hook('repr_html'))")
    for obj in (f, gc.Graph([x], [y])):
        html = obj._repr_html_()
        assert html.startswith("<iframe srcdoc=") and "graphc-data" in html
        assert obj._repr_svg_ is not None   # the SVG stays as the fallback in the notebook's bundle


def test_assets_are_package_data():
    import fnmatch
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        globs = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["graphc"]
    assets = os.listdir(os.path.join(ROOT, "graphc", "viewer_assets"))
    assert {"page.html", "viewer.js", "viewer.css"} <= set(assets)
    for name in assets:
        assert any(fnmatch.fnmatch(f"viewer_assets/{name}", g) for g in globs), f"{name} would not be in the wheel"


def test_cli_draw_html_and_view(rng, tmp_path):
    from graphc.cli import main
    x, params, h, y, _ = _mlp(rng)
    gpath = tmp_path / "m.graphc"
    gc.save(gc.Graph([x], [y], name="mlp"), gpath)
    out = tmp_path / "m.html"
    assert main(["draw", str(gpath), "-o", str(out)]) == 0
    assert len(_page_data(out.read_text())["nodes"]) > 5
    proc = subprocess.Popen([sys.executable, "-m", "graphc.cli", "view", str(gpath), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        page = urllib.request.urlopen(m.group(1), timeout=30).read().decode()
        data = _page_data(page)
        assert any(n["kind"] == "fused" for n in data["nodes"])   # served compiled (-O 2) by default
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(m.group(1) + "other", timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_view_port_in_use_is_one_line(rng, tmp_path, capsys):
    import socket
    from graphc.cli import main
    x, params, h, y, _ = _mlp(rng)
    gpath = tmp_path / "m.graphc"
    gc.save(gc.Graph([x], [y]), gpath)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["view", str(gpath), "--port", str(s.getsockname()[1])]) == 1
    finally:
        s.close()
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphc: error: cannot serve on 127.0.0.1:") and "\n" not in err


# ---- models the browser tests open --------------------------------------------------------------------

def _big_graph(n_ops: int, seed: int = 0):
    """A random DAG of about n_ops elementwise ops (each reads one or two recent values)."""
    rng = np.random.default_rng(seed)
    x = gc.placeholder("x", (None, 16))
    vals = [x]
    unary = [gc.tanh, gc.exp, gc.relu, gc.sigmoid]
    while len(vals) < n_ops:
        k = len(vals)
        a = vals[max(0, k - 1 - int(rng.integers(0, 60)))]
        if rng.random() < 0.5:
            b = vals[max(0, k - 1 - int(rng.integers(0, 60)))]
            vals.append(a + b if rng.random() < 0.5 else a * b)
        else:
            vals.append(unary[int(rng.integers(0, 4))](a))
    used = {id(t) for v in vals for t in v.node.inputs}
    return gc.Graph([x], [v for v in vals if id(v) not in used], name="random5000")


def _digits_step():
    sys.path.insert(0, EXAMPLES)
    try:
        import mlp_digits
    finally:
        sys.path.remove(EXAMPLES)
    model = mlp_digits.build(0)
    opt = mlp_digits.make_optimizer(2, 256)
    xp = gc.placeholder("x", (None, 64))
    yp = gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(xp, training=True), yp)
    return gc.function([xp, yp], loss, updates=opt.updates(loss, model.params))


def _lstm_step():
    sys.path.insert(0, EXAMPLES)
    try:
        import lstm_adding
    finally:
        sys.path.remove(EXAMPLES)
    step, _, _ = lstm_adding.build(T=10, hidden=8)
    return step


def _transformer():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)

        def forward(self, x):
            return self.layer(x, is_causal=False)
    torch.manual_seed(0)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Encoder().eval(), (torch.randn(2, 5, 16),), buf, dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.onnx.export of TransformerEncoderLayer failed: {type(e).__name__}: {e}")
    return gc.function(gc.load_onnx(buf.getvalue(), name="transformer_encoder"))


# ---- in the browser -----------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the legend's fills (viewer.js PART/KIND): the colours the pixels must show
FILL = {"forward": (0xdb, 0xe9, 0xff), "gradient": (0xff, 0xe1, 0xcc), "update": (0xec, 0xdc, 0xf8),
        "parameter": (0xff, 0xf3, 0xcd)}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"chromium does not start under playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


class Page:
    """A viewer page opened offline from a file, recording console errors and every request."""

    def __init__(self, browser, path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.route(re.compile(r"^(https?|wss?)://"), lambda route: route.abort())   # offline
        t0 = time.perf_counter()
        self.page.goto("file://" + os.fspath(path))
        self.page.wait_for_function("document.body.dataset.ready === '1'", timeout=30000)
        self.load_s = time.perf_counter() - t0
        self.data = json.loads(self.page.evaluate("JSON.stringify(graphcViewer.data)"))   # one string: fast

    def js(self, code, *args):
        return self.page.evaluate(code, *args)

    def click_node(self, i):
        self.js(f"graphcViewer.centerOn({i}, 1)")
        p = self.js(f"graphcViewer.screenPos({i})")
        self.page.mouse.click(p["x"], p["y"])

    def pixel(self, x, y):
        from PIL import Image
        img = Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")
        return img.getpixel((int(x), int(y)))

    def fill_of(self, i):
        """The fill colour drawn for node i (a point inside its box, left of the text)."""
        self.js(f"graphcViewer.centerOn({i}, 1)")
        b = self.js(f"graphcViewer.box({i})")
        return self.pixel(b["x"] + 4, b["y"] + b["h"] / 2)

    def close(self):
        assert not self.errors, f"console errors: {self.errors}"
        bad = [u for u in self.requests if not u.startswith(("file://", "data:"))]
        assert not bad, f"the page made network requests: {bad}"
        self.page.close()


def _open(browser, tmp_path, obj, name):
    path = tmp_path / f"{name}.html"
    gc.draw(obj, path)
    return Page(browser, path)


def _near(c, ref, tol=6):
    return all(abs(a - b) <= tol for a, b in zip(c, ref))


def test_browser_loads_offline_search_click_and_source_line(browser, tmp_path, rng):
    x, params, h, y, lines = _mlp(rng)
    pg = _open(browser, tmp_path, gc.Graph([x], [y]), "mlp")
    assert pg.js("graphcViewer.visibleIds().length") == len(pg.data["nodes"])
    # search by op name: the results list shows it; Enter selects it
    pg.page.fill("#search", "log_softmax")
    assert "log_softmax" in pg.page.inner_text("#results")
    pg.page.press("#search", "Enter")
    assert pg.page.inner_text("#details h2") == "log_softmax"
    # search by tensor name, and by file:line
    assert [pg.data["nodes"][i]["names"] for i in pg.js("graphcViewer.search('W2')")] == [["W2"]]
    hits = pg.js(f"graphcViewer.search('test_viewer.py:{lines['tanh']}')")
    assert sorted(pg.data["nodes"][i]["op"] for i in hits) == ["add", "matmul", "tanh"]   # all built there
    assert pg.js(f"graphcViewer.search('test_viewer.py:{lines['tanh'] // 10}')") == []  # a line, not a prefix
    # a click on the tanh node shows its source line
    tanh = next(i for i in hits if pg.data["nodes"][i]["op"] == "tanh")
    pg.click_node(tanh)
    assert pg.page.inner_text("#details h2") == "tanh"
    assert pg.page.inner_text("#loc") == f"{HERE}:{lines['tanh']}"
    assert "gc.tanh(x @ W1 + b1)" in pg.page.inner_text("#code")
    assert "float32[N,16]" in pg.page.inner_text("#details")
    # wheel zooms around the cursor; a drag pans
    s0 = pg.js("graphcViewer.scale")
    pg.page.mouse.move(500, 400)
    pg.page.mouse.wheel(0, -300)
    pg.page.wait_for_timeout(100)
    assert pg.js("graphcViewer.scale") > s0 * 1.2
    pg.close()


def test_browser_expanding_a_fused_kernel_shows_its_ops(browser, tmp_path, rng):
    x, t, params, loss, grads, updates, _ = _sgd_step(rng)
    f = gc.function([x, t], loss, updates=updates)
    pg = _open(browser, tmp_path, f, "fused")
    nodes = pg.data["nodes"]
    box = next(n for n in nodes if n["kind"] == "fused" and n["members"] >= 2)
    inner = [n["id"] for n in nodes if n["parent"] == box["id"]]
    assert not set(inner) & set(pg.js("graphcViewer.visibleIds()"))    # collapsed at first
    pg.click_node(box["id"])
    assert pg.js(f"graphcViewer.isExpanded({box['id']})")
    assert set(inner) <= set(pg.js("graphcViewer.visibleIds()"))
    details = pg.page.inner_text("#details")
    assert "fused ops" in details and box["full"] in pg.page.inner_text("#details h2")
    b = pg.js(f"graphcViewer.box({box['id']})")
    ops = [n for n in nodes if n["parent"] == box["id"] and n["kind"] == "op"]
    assert sorted(n["op"] for n in ops) == sorted(box["full"][len("fused["):-1].split(","))
    for n in ops:   # drawn inside the box
        c = pg.js(f"graphcViewer.box({n['id']})")
        assert b["x"] <= c["x"] and c["x"] + c["w"] <= b["x"] + b["w"] + 0.5 and b["y"] < c["y"] < b["y"] + b["h"]
    # clicking the expanded box's header collapses it
    pg.page.mouse.click(b["x"] + 20, b["y"] + 6)
    assert not pg.js(f"graphcViewer.isExpanded({box['id']})")
    pg.close()


def test_browser_5000_nodes_render_within_seconds(browser, tmp_path):
    g = _big_graph(5000)
    t0 = time.perf_counter()
    path = tmp_path / "big.html"
    gc.draw(g, path)
    export_s = time.perf_counter() - t0
    pg = Page(browser, path)
    assert len(pg.data["nodes"]) >= 5000
    t1 = time.perf_counter()
    pg.js("graphcViewer.fit(true)")
    png = pg.page.screenshot(path=str(tmp_path / "big.png"))
    shot_s = time.perf_counter() - t1
    frame_ms = max(pg.js("graphcViewer.redraw()") for _ in range(3))   # the whole graph in view
    assert pg.load_s < 5 and shot_s < 5, (pg.load_s, shot_s)
    assert frame_ms < 250, f"a frame of the whole 5,000-node graph took {frame_ms:.0f} ms"
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("L")
    dark = int((np.asarray(img) < 200).sum())
    assert dark > 5000, "the screenshot shows (almost) nothing"
    pg.js("graphcViewer.setView(1, 0, 0)")   # zoomed in: text and details still work
    assert pg.js("graphcViewer.redraw()") < 250
    print(f"5,000 nodes: export {export_s:.2f} s, load {pg.load_s:.2f} s, screenshot {shot_s:.2f} s, "
          f"frame {frame_ms:.0f} ms")
    pg.close()


def _check_training_page(pg, want_kinds):
    nodes = pg.data["nodes"]
    kinds = {n["kind"] for n in nodes}
    assert want_kinds <= kinds, kinds
    legend = pg.page.inner_text("#legend")
    for label in ("forward", "gradient", "optimiser update", "parameter", "parameter update"):
        assert label in legend
    # forward / gradient / update nodes drawn in their colours
    for part in ("forward", "gradient", "update"):
        i = next(n["id"] for n in nodes if n["part"] == part and n["kind"] in ("op", "fused", "scan")
                 and n["parent"] == -1)
        assert _near(pg.fill_of(i), FILL[part]), (part, pg.fill_of(i))
    # a parameter: its colour and its update
    prm = next(n for n in nodes if n["kind"] == "parameter" and n.get("updated_by") is not None)
    assert _near(pg.fill_of(prm["id"]), FILL["parameter"])
    pg.click_node(prm["id"])
    assert "updated by" in pg.page.inner_text("#details")
    assert "parameter updates" in pg.page.inner_text("#stats")


def test_browser_digits_training_step(browser, tmp_path):
    f = _digits_step()
    pg = _open(browser, tmp_path, f, "digits")
    _check_training_page(pg, {"fused", "parameter", "input", "output"})
    # memory mode: planned tensors coloured by their buffer slot
    pg.js("graphcViewer.setMode('memory')")
    assert "buffer" in pg.page.inner_text("#legend")
    assert "memory plan: peak" in pg.page.inner_text("#stats")
    pg.close()


def test_browser_lstm_example(browser, tmp_path):
    f = _lstm_step()
    pg = _open(browser, tmp_path, f, "lstm")
    _check_training_page(pg, {"scan", "fused", "parameter"})
    nodes = pg.data["nodes"]
    scans = [n for n in nodes if n["kind"] == "scan"]
    assert {n["part"] for n in scans} == {"forward", "gradient"}
    fwd = next(n for n in scans if n["part"] == "forward")
    pg.click_node(fwd["id"])
    inner = {n["id"] for n in nodes if n["parent"] == fwd["id"]}
    assert inner <= set(pg.js("graphcViewer.visibleIds()"))
    assert "carry 0" in [nodes[i]["title"] for i in inner]
    pg.close()


def test_browser_imported_transformer_encoder(browser, tmp_path):
    f = _transformer()
    pg = _open(browser, tmp_path, f, "transformer")
    nodes = pg.data["nodes"]
    assert {"fused", "parameter", "input", "output"} <= {n["kind"] for n in nodes}
    assert any(n["op"] == "matmul" or "matmul" in n["full"] for n in nodes)
    assert all(n["part"] == "forward" for n in nodes)
    # the optimiser's attention pass made softmax(QK^T)V one scaled_dot_product_attention node
    hits = pg.js("graphcViewer.search('scaled_dot_product_attention')")
    assert hits
    pg.js(f"graphcViewer.reveal({hits[0]})")
    assert "scaled_dot_product_attention" in pg.page.inner_text("#details h2")
    box = next(n for n in nodes if n["kind"] == "fused")
    pg.click_node(box["id"])
    assert pg.js(f"graphcViewer.isExpanded({box['id']})")
    pg.close()
