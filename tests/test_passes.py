"""The optimiser: pipeline controls, each rewrite (structure + values against optimize=0 and NumPy),
fusion groups and their contract, GEMM epilogues, scheduling and the memory plan."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphc as gc
from graphc.passes import PIPELINE, optimize
from graphc.backends.numpy.workspace import memory_plan
from graphc.passes.memory import live_peak
from conftest import assert_close


def _both(inputs, out, *args, backend="numpy", **kw):
    """(optimize=0 result, optimize=2 result, optimised Function)."""
    f0 = gc.function(inputs, out, optimize=0, backend=backend)
    f2 = gc.function(inputs, out, backend=backend, **kw)
    return f0(*args), f2(*args), f2


def _ops(f) -> list[str]:
    return f.graph.op_names()


# ---- pipeline --------------------------------------------------------------------------------------

def test_pipeline_is_a_list_of_named_passes_with_levels():
    names = [p.name for p in PIPELINE]
    assert names[:5] == ["dce", "constant_fold", "algebraic", "stability", "cse"]
    assert {"fusion", "gemm_epilogue", "schedule"} <= set(names)
    assert all(p.level in (1, 2) for p in PIPELINE)


def test_optimize_returns_a_new_graph_sharing_inputs_and_parameters(rng):
    x = gc.placeholder("x", (3,))
    w = gc.parameter("w", np.ones(3, np.float32))
    g = gc.Graph([x], [gc.exp(x * w) + 0], updates=[(w, w * 1)])
    for level in (0, 1, 2):
        out = optimize(g, level)
        assert out is not g and out.inputs[0] is x and out.parameters[0] is w and out.updates[0][0] is w
    assert optimize(g, 0).outputs[0] is g.outputs[0]  # level 0 changes nothing


def test_levels_and_disable():
    x = gc.placeholder("x", (4,))
    y = gc.tanh(x * 1.0 + 2.0) * gc.exp(x)
    assert _ops(gc.function([x], y, optimize=0)) == ["mul", "add", "tanh", "exp", "mul"]
    assert _ops(gc.function([x], y, optimize=1)) == ["add", "tanh", "exp", "mul"]  # x*1 removed
    assert _ops(gc.function([x], y)) == ["fused[add,tanh,exp,mul]"]
    assert _ops(gc.function([x], y, disable=["fusion", "algebraic"])) == ["mul", "add", "tanh", "exp", "mul"]
    with pytest.raises(gc.GraphcError, match="unknown pass"):
        gc.function([x], y, disable=["nosuchpass"])
    with pytest.raises(gc.GraphcError, match="optimize must be"):
        gc.function([x], y, optimize=3)


def test_debug_passes_prints_each_pass(capsys, monkeypatch):
    x = gc.placeholder("x", (4,))
    gc.function([x], gc.exp(x) * 1.0 + gc.exp(x), debug_passes=True)
    err = capsys.readouterr().err
    for p in PIPELINE:
        assert f"[graphc pass] {p.name}" in err
    assert "simplified: 1" in err and "merged: 1" in err and "nodes    4 ->    3" in err
    monkeypatch.setenv("GRAPHC_DEBUG_PASSES", "1")
    gc.function([x], gc.exp(x))
    assert "[graphc pass] fusion" in capsys.readouterr().err
    monkeypatch.setenv("GRAPHC_DEBUG_PASSES", "0")
    gc.function([x], gc.exp(x))
    assert capsys.readouterr().err == ""


# ---- rewrites --------------------------------------------------------------------------------------

REWRITES = [  # (name, builder over x (3,4) and y (4,), ops that must be gone at optimize=1, NumPy reference)
    ("mul_one_add_zero", lambda x, y: x * 1.0 + 0.0 + y, {"mul"}, lambda x, y: x + y),
    ("sub_self", lambda x, y: (x - x) + y, {"sub"}, lambda x, y: np.zeros_like(x) + y),
    ("exp_log", lambda x, y: gc.exp(gc.log(gc.abs(x) + 1)), {"exp", "log"}, lambda x, y: np.abs(x) + 1),
    ("log_exp", lambda x, y: gc.log(gc.exp(x)) * y, {"exp", "log"}, lambda x, y: x * y),
    ("double_neg", lambda x, y: -(-x) + y, {"neg"}, lambda x, y: x + y),
    ("transpose_transpose", lambda x, y: x.T.T * y, {"transpose"}, lambda x, y: x * y),
    ("reshape_chain", lambda x, y: x.reshape(2, 6).reshape(12).reshape(4, 3), set(),
     lambda x, y: x.reshape(4, 3)),
    ("broadcast_scalar", lambda x, y: x * gc.broadcast_to(gc.constant(2.0), (3, 4)), {"broadcast_to"},
     lambda x, y: x * 2),
    ("broadcast_row", lambda x, y: x + gc.broadcast_to(y, (3, 4)), {"broadcast_to"}, lambda x, y: x + y),
    ("pow_two", lambda x, y: x ** 2 + y, {"pow"}, lambda x, y: x * x + y),
    ("add_neg", lambda x, y: x + (-y), {"neg", "add"}, lambda x, y: x - y),
    ("stop_gradient", lambda x, y: gc.stop_gradient(x) + y, {"stop_gradient"}, lambda x, y: x + y),
    ("cse_commutative", lambda x, y: gc.exp(x * y) + gc.exp(y * x), set(), lambda x, y: 2 * np.exp(x * y)),
    ("constant_fold", lambda x, y: x * (gc.constant(2.0) * gc.constant(3.0)), set(), lambda x, y: x * 6),
]


@pytest.mark.parametrize("name,build,gone,ref", REWRITES, ids=[r[0] for r in REWRITES])
def test_rewrite(name, build, gone, ref, backend, rng):
    x, y = gc.placeholder("x", (3, 4), "float64"), gc.placeholder("y", (4,), "float64")
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(4)
    out = build(x, y)
    f1 = gc.function([x, y], out, optimize=1, backend=backend)
    assert not gone & set(_ops(f1)), _ops(f1)
    n0 = len(gc.function([x, y], out, optimize=0).graph.op_names())
    assert len(_ops(f1)) < n0 or gone and len(_ops(f1)) == n0
    want = ref(a, b)
    assert_close(f1(a, b), want, "float64", backend)
    assert_close(gc.function([x, y], out, backend=backend)(a, b), want, "float64", backend)


def test_cse_and_folding_details():
    x = gc.placeholder("x", (3,))
    f = gc.function([x], [gc.sin(x) * 2.0, gc.sin(x) * 2.0, x * gc.size_of(x, (0,), "float32")], optimize=1)
    assert _ops(f).count("sin") == 1 and _ops(f).count("mul") == 2 and "size_of" not in _ops(f)
    np.testing.assert_allclose(f(np.ones(3, np.float32))[2], 3)
    n = gc.placeholder("n", (None,))  # a symbolic dim is not folded
    assert "size_of" in _ops(gc.function([n], n * gc.size_of(n, (0,), "float32"), optimize=1))


# ---- stability: the naive form overflows, the rewritten one is finite and right ------------------------

def _ce(logits, onehot):
    return -gc.sum(onehot * gc.log(gc.softmax(logits, axis=1)))


STABILITY = [  # (name, builder, input, exact value, rewritten-to op)
    ("log_softmax", lambda x: gc.log(gc.softmax(x)), np.array([1000.0, 0.0, -1000.0], np.float32),
     np.array([0.0, -1000.0, -2000.0]), "log_softmax"),
    ("log_sigmoid", lambda x: gc.log(gc.sigmoid(x)), np.array([-200.0, 0.0, 30.0], np.float32),
     np.array([-200.0, -np.log(2), -np.log1p(np.exp(-30.0))]), "softplus"),
    ("log_one_minus_sigmoid", lambda x: gc.log(1.0 - gc.sigmoid(x)), np.array([200.0, 0.0], np.float32),
     np.array([-200.0, -np.log(2)]), "softplus"),
    ("log1p", lambda x: x / gc.log(1.0 + x), np.array([1e-30, 1e-20], np.float32), np.array([1.0, 1.0]), "log1p"),
    ("expm1", lambda x: x / (gc.exp(x) - 1.0), np.array([1e-30, -1e-25], np.float32), np.array([1.0, 1.0]),
     "expm1"),
    ("softplus", lambda x: gc.log(1.0 + gc.exp(x)), np.array([1000.0, -5.0], np.float32),
     np.array([1000.0, np.log1p(np.exp(-5.0))]), "softplus"),
    ("logsumexp", lambda x: gc.log(gc.sum(gc.exp(x))), np.array([1000.0, 1000.0], np.float32),
     np.array(1000.0 + np.log(2.0)), "logsumexp"),
    ("cross_entropy", lambda x: _ce(gc.reshape(x, (1, 2)), gc.constant(np.array([[0.0, 1.0]], np.float32))),
     np.array([1000.0, 0.0], np.float32), np.array(1000.0), "log_softmax"),
    ("cross_entropy_labels", lambda x: -gc.log(gc.softmax(gc.reshape(x, (1, 3)))[0, 2]),
     np.array([0.0, 500.0, -500.0], np.float32), np.array(1000.0), "log_softmax"),
]


@pytest.mark.parametrize("name,build,a,exact,op", STABILITY, ids=[s[0] for s in STABILITY])
def test_stability_rewrite_on_overflow_input(name, build, a, exact, op, backend):
    x = gc.placeholder("x", a.shape)
    with np.errstate(all="ignore"):
        naive, stable, f = _both([x], build(x), a, backend=backend)
    assert not np.all(np.isfinite(naive)), f"the naive form should overflow here, got {naive}"
    assert np.all(np.isfinite(stable)), stable
    np.testing.assert_allclose(stable, exact, rtol=1e-5, atol=1e-6)
    assert any(op in o for o in _ops(f)), _ops(f)


def test_cross_entropy_gradient_is_finite_after_stabilisation(backend):
    x = gc.placeholder("x", (1, 3), "float64")
    onehot = gc.constant(np.array([[0.0, 0.0, 1.0]]))
    g = gc.grad(_ce(x, onehot), x)
    a = np.array([[800.0, 0.0, -800.0]])
    with np.errstate(all="ignore"):
        naive, stable, _ = _both([x], g, a, backend=backend)
    assert np.isnan(naive).any()
    np.testing.assert_allclose(stable, [[1.0, 0.0, -1.0]], atol=1e-12)  # softmax - onehot


# ---- fusion ----------------------------------------------------------------------------------------

def check_fused_contract(graph: gc.Graph) -> int:
    """Every fused node has one of the three body forms of graphc/ops/fused.py; returns how many."""
    from graphc.ir import Trait
    from graphc.passes.fusion import EPILOGUE_HEADS, closes_group, fusible
    count = 0
    for node in graph.compute_nodes():
        if node.op is not gc.ops.Fused:
            continue
        count += 1
        body = node.attrs["body"]
        assert [(t.shape, t.dtype) for t in body.inputs] == [(t.shape, t.dtype) for t in node.inputs]
        assert len({id(t) for t in node.inputs}) == len(node.inputs)  # distinct
        assert len({t.name for t in body.inputs}) == len(body.inputs)  # uniquely named
        assert [(t.shape, t.dtype) for t in body.outputs] == [(t.shape, t.dtype) for t in node.outputs]
        assert all(n.op.has(Trait.INPUT | Trait.CONST) for n in body.nodes if not n.inputs)
        assert all(n.attrs["value"].size == 1 for n in body.nodes if n.op.has(Trait.CONST))
        comp = body.compute_nodes()
        head, tail = comp[0], comp[-1]
        if head.op in EPILOGUE_HEADS:
            assert all(fusible(n) and n.outputs[0].shape == head.outputs[0].shape for n in comp[1:])
            assert all(t.op.has(Trait.INPUT) for t in head.inputs)
            assert not {id(t) for t in head.inputs} & {id(t) for n in comp[1:] for t in n.inputs}
            assert all(o is not head.outputs[0] for o in body.outputs)
        elif closes_group(tail):
            assert all(fusible(n) for n in comp[:-1]) and body.outputs == [tail.outputs[0]]
        else:
            loop = node.outputs[0].shape
            assert all(fusible(n) and n.outputs[0].shape == loop for n in comp)
    return count


def _w2():
    x, a, b = gc.placeholder("x", (None,)), gc.placeholder("a", ()), gc.placeholder("b", ())
    return [x, a, b], gc.tanh(x * a + b) * gc.sigmoid(x) + gc.exp(-x * x)


def test_w2_is_one_fused_kernel(backend, rng):
    ins, y = _w2()
    f = gc.function(ins, y, backend=backend)
    assert _ops(f) == ["fused[mul,add,tanh,sigmoid,mul,neg,mul,exp,add]"]
    node = f.graph.compute_nodes()[0]
    body = node.attrs["body"]
    assert isinstance(body, gc.Graph) and [t.name for t in body.inputs] == ["x", "a", "b"]
    assert "fused[mul,add,tanh" in gc.dprint(f, file=open("/dev/null", "w"))
    for n in (7, 100003):  # below and above the NumPy backend's chunk size
        a = rng.standard_normal(n).astype(np.float32)
        want = np.tanh(a * 0.5 + 0.25) / (1 + np.exp(-a)) + np.exp(-a * a)
        assert_close(f(a, np.float32(0.5), np.float32(0.25)), want, "float32", backend, rtol=2e-6)


def test_fusion_with_broadcasting_multi_output_and_reduction(backend, rng):
    x, b = gc.placeholder("x", (None, 5), "float64"), gc.placeholder("b", (5,), "float64")
    h = gc.tanh(x + b)
    out = [h * 2.0, gc.sum(gc.exp(x) * b, axis=1), gc.max(gc.sin(x) + 1.0, axis=0, keepdims=True)]
    f = gc.function([x, b], out, backend=backend)
    names = _ops(f)
    assert "fused[add,tanh,mul]" in names and "fused[exp,mul,sum]" in names and "fused[sin,add,max]" in names
    a, c = rng.standard_normal((9, 5)), rng.standard_normal(5)
    want = [np.tanh(a + c) * 2, (np.exp(a) * c).sum(1), (np.sin(a) + 1).max(0, keepdims=True)]
    for got, w in zip(f(a, c), want):
        assert_close(got, w, "float64", backend)


def test_group_output_used_outside_becomes_a_second_output(backend, rng):
    x = gc.placeholder("x", (6,), "float64")
    t = gc.exp(x) + 1.0
    f = gc.function([x], [gc.sin(t) * t, gc.sum(t)], backend=backend)
    fused = [n for n in f.graph.compute_nodes() if n.op.name == "fused"]
    assert len(fused) == 1 and len(fused[0].outputs) == 2
    a = rng.standard_normal(6)
    e = np.exp(a) + 1
    assert_close(f(a)[0], np.sin(e) * e, "float64", backend)
    assert_close(f(a)[1], e.sum(), "float64", backend)


def test_fusion_never_makes_a_cycle(rng):
    x, w = gc.placeholder("x", (4, 3), "float64"), gc.placeholder("w", (3, 5), "float64")
    out = gc.tanh(x @ w).sum(axis=1) * gc.sigmoid(x[:, 0])  # two groups joined through a sum and a slice
    g = gc.grad(gc.sum(out), [x, w])
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    for got, want in zip(gc.function([x, w], g)(a, b), gc.function([x, w], g, optimize=0)(a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gemm_epilogue(backend, rng):
    x = gc.placeholder("x", (None, 8))
    W = gc.parameter("W", rng.standard_normal((8, 4)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(4).astype(np.float32))
    f = gc.function([x], gc.relu(x @ W + b), backend=backend)
    assert _ops(f) == ["fused[matmul,add,relu]"]
    body = f.graph.compute_nodes()[0].attrs["body"]
    assert body.compute_nodes()[0].op.name == "matmul"
    a = rng.standard_normal((5, 8)).astype(np.float32)
    assert_close(f(a), np.maximum(a @ W.value + b.value, 0), "float32", backend)


def test_mlp_training_step_is_smaller_fused_and_equal(backend, rng):
    x, yl = gc.placeholder("x", (None, 6), "float64"), gc.placeholder("y", (None, 3), "float64")
    W1 = gc.parameter("W1", rng.standard_normal((6, 8)) * 0.3)
    W2 = gc.parameter("W2", rng.standard_normal((8, 3)) * 0.3)
    b1, b2 = gc.parameter("b1", np.zeros(8)), gc.parameter("b2", np.zeros(3))
    loss = _ce(gc.relu(x @ W1 + b1) @ W2 + b2, yl) / 4.0
    ps = [W1, b1, W2, b2]
    upd = [(p, p - 0.5 * g) for p, g in zip(ps, gc.grad(loss, ps))]
    a, lab = rng.standard_normal((4, 6)), np.eye(3)[[0, 2, 1, 1]]
    start = [p.get_value() for p in ps]
    results = {}
    for level in (0, 2):
        for p, v in zip(ps, start):
            p.set_value(v)
        f = gc.function([x, yl], loss, updates=upd, optimize=level, backend=backend)
        results[level] = [f(a, lab) for _ in range(3)], [p.get_value() for p in ps]
        if level == 2:
            n0 = len(gc.function([x, yl], loss, updates=upd, optimize=0).graph.compute_nodes())
            assert len(f.graph.compute_nodes()) < 0.7 * n0
            assert sum(n.startswith("fused[") for n in _ops(f)) >= 4
            assert any(n.startswith("fused[matmul") and n.endswith("sub]") for n in _ops(f))  # SGD update fused
            assert check_fused_contract(f.graph) >= 4
    np.testing.assert_allclose(results[2][0], results[0][0], rtol=1e-10)
    for p2, p0 in zip(results[2][1], results[0][1]):
        np.testing.assert_allclose(p2, p0, rtol=1e-10, atol=1e-12)


# ---- scheduling and the memory plan ------------------------------------------------------------------

def _chain(n_layers=4):
    x = gc.placeholder("x", (None, 32))
    h, ws = x, []
    for i in range(n_layers):
        w = gc.parameter(f"w{i}", np.random.default_rng(i).standard_normal((32, 32)).astype(np.float32) * 0.2)
        ws.append(w)
        h = gc.tanh(h @ w)
    return x, h, ws


def test_memory_plan_reuses_buffers_and_is_symbolic_in_the_batch():
    x, h, _ = _chain()
    f = gc.function([x], h, disable=["fusion", "gemm_epilogue"])
    plan = f.memory_plan(N=64)
    assert plan.peak_bytes < plan.naive_bytes and plan.naive_bytes == 7 * 64 * 32 * 4 + 64 * 32 * 4
    assert len(plan.buffers) < len(plan.assignment) and plan.in_place  # tanh writes over its dying input
    # 4 buffers (3 matmul+tanh chains, the last matmul), each live with the next only: 2 arena slots
    assert len(plan.buffers) == 4 and plan.workspace_bytes == 2 * 64 * 32 * 4
    expr = f.memory_plan().peak_bytes_expr  # a bound for every N (equal-size slots side by side)
    N = gc.shapes.dim_symbol("N")
    assert str(expr).count("N") >= 1 and N in expr.free_symbols
    for n in (1, 5, 64, 1000):
        assert f.memory_plan(N=n).peak_bytes <= int(expr.subs(N, n))
    assert f.memory_plan(N=1000).peak_bytes == int(expr.subs(N, 1000))  # all buffers one size: exact here
    assert "workspace buffers" in str(plan) and f.memory_plan().workspace_bytes == 2 * N * 32 * 4


def test_planned_buffers_never_leak_into_results_or_across_threads(rng):
    x, h, ws = _chain()
    f = gc.function([x], [h, h * 2.0], disable=["fusion", "gemm_epilogue"])
    assert "_ws[" in f.source and "out=" in f.source

    def ref(a):
        for w in ws:
            a = np.tanh(a @ w.value)
        return a
    a1, a2 = rng.standard_normal((5, 32)).astype(np.float32), rng.standard_normal((5, 32)).astype(np.float32)
    r1 = f(a1)
    f(a2)
    assert_close(r1[0], ref(a1), "float32", rtol=1e-5)  # a later call did not overwrite the first result
    errors = []

    def work(seed):
        r = np.random.default_rng(seed)
        for _ in range(20):
            a = r.standard_normal((int(r.integers(1, 40)), 32)).astype(np.float32)
            try:
                np.testing.assert_allclose(f(a)[0], ref(a), rtol=1e-4, atol=1e-5)
            except AssertionError as e:
                errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


def test_outputs_that_are_inputs_or_parameters_are_copies():
    x = gc.placeholder("x", (3,))
    w = gc.parameter("w", np.ones(3, np.float32))
    f = gc.function([x], [x * 1.0, w + 0.0])
    a = np.zeros(3, np.float32)
    r = f(a)
    assert r[0] is not a and not np.shares_memory(r[1], w.value)
    r[1][:] = 5
    assert np.all(w.value == 1)


def test_schedule_frees_memory_early():
    from graphc.passes.memory import _greedy_order, schedule
    from collections import Counter
    x = gc.placeholder("x", (256,))
    bigs = [gc.broadcast_to(gc.reshape(x, (1, 256)), (64, 256)) * float(i) for i in range(6)]
    total = gc.sum(bigs[0], axis=0)
    for b in bigs[1:]:
        total = total + gc.sum(b, axis=0)
    g = gc.Graph([x], [total])
    bad = sorted(g.nodes, key=lambda n: (n.op.name not in ("placeholder", "constant", "reshape", "broadcast_to"),
                                         n.op.name != "mul"))  # every big temporary first
    greedy = _greedy_order(g)
    pos = {id(n): i for i, n in enumerate(greedy)}
    assert sorted(map(id, greedy)) == sorted(map(id, g.nodes))
    assert all(pos[id(t.node)] < pos[id(n)] for n in greedy for t in n.inputs)  # a topological order
    assert live_peak(g, greedy) <= live_peak(g, g.nodes) < live_peak(g, bad)
    assert live_peak(g, greedy) <= 2 * 64 * 256 * 4
    out = schedule(g, Counter())
    assert live_peak(out, out.nodes) <= live_peak(g, g.nodes)
    a = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    np.testing.assert_allclose(gc.function([x], total)(a), a * 64 * 15, rtol=1e-5)
    assert memory_plan(out, {}).peak_bytes <= memory_plan(out, {}).naive_bytes


def test_in_place_fused_kernels_never_read_what_they_overwrote(backend, rng):
    x = gc.placeholder("x", (None, 8), "float64")
    W = gc.constant(rng.standard_normal((8, 8)))
    m = [x @ gc.constant(rng.standard_normal((8, 8))) for _ in range(3)]  # planned buffers, each dying in
    outs = [gc.where(m[0] > 0.1, m[0], gc.exp(m[0]) * 2.0) @ W,  # a kernel that may write over it
            gc.leaky_relu(m[1] * 1.5 + 1.0, 0.3) @ W, gc.where(gc.sin(m[2]) > 0, gc.cos(m[2]), m[2]) @ W]
    a = rng.standard_normal((5, 8))
    want = gc.function([x], outs, optimize=0)(a)
    for disable in ([], ["gemm_epilogue"]):  # without epilogues the kernels run in place over m
        f = gc.function([x], outs, backend=backend, disable=disable)
        for got, w in zip(f(a), want):
            assert_close(got, w, "float64", backend)
    if backend == "numpy":
        assert len(f.memory_plan(N=5).in_place) >= 3
