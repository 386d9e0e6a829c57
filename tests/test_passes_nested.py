"""The pipeline owns nested graphs: a scan's step body is optimised at the function's level (0: left
alone, 1: folded/simplified/merged, 2: + fused) whatever the backend, with the same passes disabled;
results match the reference evaluator on every backend; fused bodies (kernels) are kept as built."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ops.scan import Scan
from graphc.passes import optimize
from conftest import assert_close


def _scan_graph():
    xs, h0 = gc.placeholder("xs", (5, 3, 4), "float64"), gc.placeholder("h0", (3, 4), "float64")

    def step(h, x):
        n = gc.size_of(x, (0,), "float64")       # a static shape query: folded at level 1
        a = gc.exp(x * 1.0) + gc.exp(x)           # x * 1 simplified, the two exps merged (CSE) at level 1
        h2 = gc.tanh(h * 0.5 + a / n)             # elementwise work: fused at level 2
        return h2, gc.sum(h2 * h2, axis=1)
    hT, ys = gc.scan(step, h0, xs)
    return [xs, h0], [hT, ys]


def _body(graph: gc.Graph) -> gc.Graph:
    [body] = [n.attrs["body"] for n in graph.nodes if n.op is Scan]
    return body


def _vals(rng):
    return [rng.standard_normal((5, 3, 4)), rng.standard_normal((3, 4)) * 0.1]


def test_scan_body_is_optimised_at_the_functions_level(backend, rng):
    ins, outs = _scan_graph()
    user_body = _body(gc.Graph(ins, outs))
    before = user_body.op_names()
    assert before.count("exp") == 2 and "size_of" in before and before.count("mul") == 3
    vals = _vals(rng)
    want = gc.evaluate(outs, dict(zip(ins, vals)))
    for level in (0, 1, 2):
        f = gc.function(ins, outs, optimize=level, backend=backend)
        body = _body(f.graph)
        names = body.op_names()
        if level == 0:
            assert body is user_body  # left alone
        elif level == 1:
            assert "size_of" not in names and names.count("exp") == 1 and names.count("mul") == 2, names
            assert not any(n.startswith("fused") for n in names)
        else:
            assert any(n.startswith("fused[") for n in names) and len(names) < len(before) / 2, names
            assert "size_of" not in " ".join(names) and " ".join(names).count("exp") == 1
        for got, w in zip(f(*vals), want):
            assert_close(got, w, "float64", backend)
        assert not f.program.info.get("fallback_ops"), f.program.info.get("fallback_ops")  # bodies run natively


def test_scan_body_level_is_the_same_on_every_backend(rng):
    ins, outs = _scan_graph()
    shapes = {}
    for backend in ("numpy", "llvm", "cuda-emulated"):
        try:
            f = gc.function(ins, outs, optimize=1, backend=backend)
        except gc.GraphcError as e:  # backend not usable here
            pytest.skip(str(e))
        shapes[backend] = _body(f.graph).op_names()
    assert len({tuple(v) for v in shapes.values()}) == 1, shapes


def test_disabled_passes_are_disabled_in_bodies_too():
    ins, outs = _scan_graph()
    f = gc.function(ins, outs, disable=["fusion", "cse"])
    names = _body(f.graph).op_names()
    assert names.count("exp") == 2 and not any(n.startswith("fused") for n in names) and "size_of" not in names


def test_debug_passes_shows_the_body_passes(capsys):
    ins, outs = _scan_graph()
    gc.function(ins, outs, debug_passes=True)
    err = capsys.readouterr().err
    assert "[graphc pass] scan body: constant_fold" in err and "folded: 1" in err
    assert "[graphc pass] scan body: fusion" in err
    assert err.index("scan body: schedule") < err.index("[graphc pass] dce")  # bodies first


def test_a_body_shared_by_two_scans_is_optimised_once_and_stays_shared():
    ins, outs = _scan_graph()
    hT = outs[0]
    node = hT.node
    xs2 = gc.placeholder("xs2", (5, 3, 4), "float64")
    other = gc.ir.make_node(Scan, [node.inputs[0], xs2, *node.inputs[2:]], node.attrs)  # same body
    g = optimize(gc.Graph(ins + [xs2], [hT, other.outputs[0]]), 2)
    bodies = {id(n.attrs["body"]) for n in g.nodes if n.op is Scan}
    assert len([n for n in g.nodes if n.op is Scan]) == 2 and len(bodies) == 1


def test_nested_scans_are_optimised_recursively(rng):
    xs, h0 = gc.placeholder("xs", (4, 3, 2), "float64"), gc.placeholder("h0", (2,), "float64")

    def outer(h, x):
        def inner(c, r):
            return c + gc.exp(r * 1.0) * gc.size_of(r, (0,), "float64"), None
        c, _ = gc.scan(inner, h, x)
        return gc.tanh(c), None
    hT, _ = gc.scan(outer, h0, xs)
    for level in (0, 1, 2):
        f = gc.function([xs, h0], hT, optimize=level)
        inner_body = _body(_body(f.graph))
        names = inner_body.op_names()
        assert ("size_of" in names) == (level == 0), (level, names)
        assert any(n.startswith("fused") for n in names) == (level == 2), (level, names)
        a, b = rng.standard_normal((4, 3, 2)), rng.standard_normal(2) * 0.1
        np.testing.assert_allclose(f(a, b), gc.evaluate([hT], {xs: a, h0: b})[0], rtol=1e-12)


def test_optimising_an_optimised_graph_again_is_a_no_op(capsys):
    """A backend compiling a nested body itself (options.optimise) gets the pipeline's body back as is."""
    ins, outs = _scan_graph()
    g = optimize(gc.Graph(ins, outs), 2)
    again = optimize(g, 2, debug_passes=True)
    assert again is not g and again.nodes == g.nodes and again.outputs == g.outputs
    body = _body(g)
    assert optimize(body, 2, debug_passes=True).nodes == body.nodes
    assert capsys.readouterr().err == ""  # no pass ran
    optimize(body, 1, debug_passes=True)  # another level is another optimisation
    assert "[graphc pass] dce" in capsys.readouterr().err


def test_fused_bodies_are_kernels_and_kept_as_built():
    a = gc.placeholder("a", (3,), "float64")
    pa = gc.placeholder("p", (3,), "float64")
    body = gc.Graph([pa], [gc.exp(pa * 1.0) + 1.0])
    [out] = gc.ops.fused([a], body)
    g = optimize(gc.Graph([a], [out * 2.0]), 2)
    [node] = [n for n in g.nodes if n.op is gc.ops.Fused]
    assert node.attrs["body"] is body
    np.testing.assert_allclose(gc.evaluate(g.outputs, {a: np.ones(3)})[0], (np.e + 1) * 2 * np.ones(3))
