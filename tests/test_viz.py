"""Graph pictures: DOT checked structurally, SVG/PNG rendered by Graphviz, GraphML/JSON export."""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest

import graphc as gc
from graphc import viz
from graphc.ir import toposort

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz `dot` is not installed (apt-get install graphviz)")

_NODE = re.compile(r'^\s*(n\d+) \[label="((?:[^"\\]|\\.)*)"', re.M)
_EDGE = re.compile(r"^\s*(n\d+) -> (n\d+)", re.M)


def parse_dot(text: str):
    labels = {i: lab.replace("\\n", "\n") for i, lab in _NODE.findall(text)}
    edges = _EDGE.findall(text)
    return labels, edges


def _mlp(rng):
    x = gc.placeholder("x", (None, 8))
    W1 = gc.parameter("W1", rng.standard_normal((8, 16)).astype(np.float32))
    b1 = gc.parameter("b1", np.zeros(16, np.float32))
    W2 = gc.parameter("W2", rng.standard_normal((16, 4)).astype(np.float32))
    y = gc.softmax(gc.tanh(x @ W1 + b1) @ W2)
    return x, (W1, b1, W2), y


def test_dot_has_every_node_and_edge(rng):
    x, params, y = _mlp(rng)
    loss = gc.mean(gc.log(y))
    text = gc.to_dot([y, loss], collapse=False)
    labels, edges = parse_dot(text)
    nodes = toposort([y, loss])
    # one picture node per graph node plus one per output
    assert len(labels) == len(nodes) + 2
    want_ops = Counter(n.op.name for n in nodes if n.inputs)
    got_ops = Counter(lab.split("\n")[0] for lab in labels.values())
    for op, k in want_ops.items():
        assert got_ops[op] == k, (op, got_ops)
    # every producer -> consumer pair is an edge, labelled with the tensor's shape
    want_edges = {(id(t.node), id(n)) for n in nodes for t in n.inputs}
    assert len(edges) == len(want_edges) + 2
    assert "[N,8]" in text and "[16,4]" in text
    for name in ("x", "W1", "b1", "W2"):
        assert any(lab.startswith(name + "\n") for lab in labels.values())
    assert text.count("peripheries=2") == 2  # outputs styled distinctly
    assert "float32[N,4]" in text


def test_styles_distinguish_inputs_parameters_constants(rng):
    x, params, y = _mlp(rng)
    text = gc.to_dot(y * 2.0)
    assert viz._STYLE["placeholder"] in text and viz._STYLE["parameter"] in text
    assert viz._STYLE["constant"] in text and viz._STYLE["output"] in text


def test_fused_kernels_drawn_as_clusters(rng):
    x, params, y = _mlp(rng)
    f = gc.function([x], y)
    fused = [n for n in f.graph.compute_nodes() if n.op.name == "fused"]
    assert fused, f.graph.op_names()
    text = gc.to_dot(f)
    assert text.count("subgraph cluster_") == len(fused)
    for n in fused:
        assert f'label="{n.op.display_name(n)}"' in text
    labels, edges = parse_dot(text)
    # the body's ops are inside the picture, and the input x reaches the body's matmul
    x_id = next(i for i, lab in labels.items() if lab.startswith("x\n"))
    assert any(a == x_id and labels[b].startswith("matmul") for a, b in edges)


def test_gradient_graph_and_updates(rng):
    x, (W1, b1, W2), y = _mlp(rng)
    loss = gc.mean(gc.log(y))
    g = gc.grad(loss, W1)
    labels, edges = parse_dot(gc.to_dot(g))
    assert len(labels) == len(toposort([g])) + 1
    f = gc.function([x], loss, updates=[(W1, W1 - 0.1 * g)])
    text = gc.to_dot(f)
    assert 'label="update"' in text


def test_repeated_layers_collapse(rng):
    x = gc.placeholder("x", (None, 8))
    h = x
    for i in range(40):
        W = gc.parameter(f"W{i}", rng.standard_normal((8, 8)).astype(np.float32))
        h = gc.relu(h @ W)
    full = parse_dot(gc.to_dot(h, collapse=False))[0]
    small_text = gc.to_dot(h, collapse=True)
    small = parse_dot(small_text)[0]
    assert len(full) == 1 + 40 * 3 + 1
    assert len(small) <= 8
    assert "x40" in small_text and "W0 ... W39" in small_text
    assert len(parse_dot(gc.to_dot(h))[0]) == len(full)  # 80 compute nodes: below the automatic threshold


def test_scan_as_one_box_or_cluster(rng):
    x = gc.placeholder("x", (None, 6, 3))
    y, h = gc.nn.GRU(3, 4)(x)
    f = gc.function([x], y)
    text = gc.to_dot(f)
    assert re.search(r'label="scan x6 \(\d+ ops per step\)', text)
    expanded = gc.to_dot(f, expand_scans=True)
    assert 'label="scan x6"' in expanded and "subgraph cluster_" in expanded


@needs_dot
def test_draw_svg_and_png(rng, tmp_path):
    x, params, y = _mlp(rng)
    f = gc.function([x], y)
    out = gc.draw(f, tmp_path / "g.svg")
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    ns = {"s": "http://www.w3.org/2000/svg"}
    n_nodes = len(root.findall(".//s:g[@class='node']", ns))
    assert n_nodes == len(parse_dot(gc.to_dot(f))[0])
    titles = [t.text for t in root.findall(".//s:g[@class='node']/s:text", ns)]
    assert "x" in titles and "softmax" in " ".join(titles)
    png = gc.draw(f, tmp_path / "g.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    svg = f.graph._repr_svg_()
    assert "<svg" in svg and f._repr_svg_().count("class=\"node\"") == n_nodes


def test_missing_graphviz_is_a_clear_error(monkeypatch, rng, tmp_path):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    x, params, y = _mlp(rng)
    with pytest.raises(viz.GraphvizNotFound, match="apt-get install graphviz"):
        gc.draw(y, tmp_path / "g.svg")
    assert gc.function([x], y)._repr_svg_() is None
    assert gc.draw(y, tmp_path / "g.dot").endswith(".dot")  # DOT itself needs no Graphviz


def test_graphml_and_json_export(rng, tmp_path):
    import networkx as nx
    x, params, y = _mlp(rng)
    n_nodes = len(toposort([y]))
    n_edges = len({(id(t.node), id(n)) for n in toposort([y]) for t in n.inputs})
    G = nx.read_graphml(viz.to_graphml(y, tmp_path / "g.graphml"))
    assert G.number_of_nodes() == n_nodes and G.number_of_edges() == n_edges
    assert {d["role"] for _, d in G.nodes(data=True)} == {"placeholder", "parameter", "op"}
    doc = json.loads(viz.to_json(y, tmp_path / "g.json"))
    assert len(doc["nodes"]) == n_nodes and len(doc["edges"]) == n_edges
    assert any(nd["op"] == "softmax" and nd["shape"] == "N,4" for nd in doc["nodes"])


def test_bad_object():
    with pytest.raises(gc.GraphcError, match="cannot draw"):
        gc.to_dot(3)
