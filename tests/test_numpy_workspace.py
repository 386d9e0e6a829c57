"""The NumPy backend's workspace: the memory plan's buffers (graphc.passes.memory.plan_buffers) placed
in one byte arena per thread and dims binding by the shared arena planner (backends/schedule/arena.py),
each buffer an aligned view with its dtype and shape; the `f.memory_plan` report; unique names from
graphc.names.Names."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphc as gc
from graphc.backends.numpy.workspace import ALIGN, memory_plan
from graphc.backends.schedule.arena import plan_arena
from graphc.ops.fused import Fused
from graphc.passes.memory import lifetimes


def _mlp_step(optimize=2):
    gc.init.seed(0)
    model = gc.nn.Sequential(gc.nn.Dense(64, 128, seed=0), gc.relu, gc.nn.Dense(128, 64, seed=1), gc.tanh,
                             gc.nn.Dense(64, 10, seed=2))
    x, y = gc.placeholder("x", (None, 64)), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    f = gc.function([x, y], loss, updates=gc.optim.Adam(1e-2).updates(loss, model.params), optimize=optimize)
    rng = np.random.default_rng(0)
    return f, lambda n: (rng.standard_normal((n, 64)).astype(np.float32), rng.integers(0, 10, n)), model.params


def _conv_step(optimize=2):
    gc.init.seed(0)
    nn = gc.nn
    model = nn.Sequential(nn.Conv2D(1, 8, 3, padding=1, bias=False), nn.BatchNorm(8), gc.relu,
                          nn.Conv2D(8, 8, 3, padding=1, groups=2), gc.relu, nn.MaxPool2D(2), nn.AvgPool2D(2),
                          nn.Flatten(), nn.Dropout(0.25, seed=3), nn.Dense(8 * 2 * 2, 10, seed=4))
    x, y = gc.placeholder("x", (None, 1, 8, 8)), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    f = gc.function([x, y], loss, updates=gc.optim.Adam(1e-2).updates(loss, model.params), optimize=optimize)
    rng = np.random.default_rng(0)
    return f, lambda n: (rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)), model.params


def _mixed():
    """Planned buffers of five sizes and two dtypes; each lives over two steps only."""
    rng = np.random.default_rng(1)
    x = gc.placeholder("x", (None, 8))
    w0 = gc.constant(rng.standard_normal((8, 64)).astype(np.float32) * 0.3)
    w1 = gc.constant(rng.standard_normal((64, 16)) * 0.3)
    w2 = gc.constant(rng.standard_normal((16, 48)).astype(np.float32) * 0.3)
    a = gc.tanh(x @ w0)                                  # (N, 64) float32, then float64
    b = gc.sin(gc.cast(a, "float64") @ w1)               # (N, 16) float64, then float32
    c = gc.tanh(gc.cast(b, "float32") @ w2)              # (N, 48) float32
    return x, gc.sum(c * 2.0, axis=1)


def _mixed_step(optimize=2):
    x, y = _mixed()
    return gc.function([x], y, optimize=optimize), None, None


def _equal_size_bytes(plan, dims):
    """The workspace of the plan before the arena: a buffer per (dtype, size), as many of each as are
    live at once (an independent sweep over the buffers' lifetimes)."""
    binds = {gc.shapes.dim_symbol(k): v for k, v in dims.items()}
    total = 0
    keys = {(b.dtype, b.elements) for b in plan.buffers}
    for key in keys:
        spans = [(b.first, b.last) for b in plan.buffers if (b.dtype, b.elements) == key]
        most = max(sum(1 for f, l in spans if f <= s <= l) for s in {f for f, _ in spans})
        n = key[1] if isinstance(key[1], int) else int(key[1].subs(binds))
        total += most * n * np.dtype(key[0]).itemsize
    return total


@pytest.mark.parametrize("build", [_mlp_step, _conv_step])
def test_arena_peak_is_not_above_the_equal_size_plan(build):
    f, _, _ = build()
    plan = f.program.info["plan"]
    for n in (1, 64, 1000):
        rep = f.memory_plan(N=n)
        old_ws = _equal_size_bytes(plan, {"N": n})
        own = rep.peak_bytes - rep.workspace_bytes  # self-allocated results: the same in both plans
        assert rep.workspace_bytes <= old_ws and rep.peak_bytes <= old_ws + own <= rep.naive_bytes
        assert rep.offsets is not None and len(rep.offsets) == len(rep.buffers) == len(rep.lifetimes)
        if n == 64:
            assert rep.workspace_bytes < old_ws  # the arena shares memory between sizes here


def test_the_arena_shares_memory_between_dtypes_and_sizes():
    x, y = _mixed()
    f = gc.function([x], y)
    rep = f.memory_plan(N=64)
    assert len({dt for dt, _ in rep.buffers}) == 2 and len(set(rep.buffers)) == len(rep.buffers) == 5
    assert rep.workspace_bytes < _equal_size_bytes(f.program.info["plan"], {"N": 64})
    views = f.program.info["workspace"].get({"N": 64})
    shared = [(i, j) for i in range(len(views)) for j in range(i) if np.shares_memory(views[i], views[j])]
    assert shared  # some buffers of different sizes reuse the same bytes
    a = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    want = gc.evaluate([y], {x: a})[0]
    for _ in range(3):  # repeated calls reuse the arena
        np.testing.assert_allclose(f(a), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [_mlp_step, _conv_step, _mixed_step])
def test_buffers_live_at_once_never_overlap(build):
    """Against the tensors' lifetimes (graphc.passes.memory.lifetimes), on the run-time views."""
    f = build()[0]
    plan = f.program.info["plan"]
    life, _, _ = lifetimes(f.graph)
    tensors = {id(o): o for n in f.graph.nodes for o in n.outputs}
    assigned = sorted(plan.assign.items(), key=lambda kv: life[kv[0]])
    assert len(assigned) >= 3
    for n in (1, 7, 64):
        views = f.program.info["workspace"].get({"N": n})
        for t, k in assigned:
            o, v = tensors[t], views[k]
            assert v.dtype == np.dtype(o.dtype) and v.ctypes.data % ALIGN == 0 and v.flags.c_contiguous
            assert v.shape == gc.shapes.evaluate(o.shape, {gc.shapes.dim_symbol("N"): n})
        checked = 0
        for i, (t1, k1) in enumerate(assigned):
            for t2, k2 in assigned[i + 1:]:
                (a0, a1), (b0, b1) = life[t1], life[t2]
                if k1 != k2 and a0 <= b1 and b0 <= a1:
                    assert not np.shares_memory(views[k1], views[k2]), (tensors[t1], tensors[t2])
                    checked += 1
        assert checked > 0 or len(plan.buffers) < 2


@pytest.mark.parametrize("build", [_mlp_step, _conv_step])
def test_models_train_the_same_with_the_arena(build):
    """A few Adam steps with the memory plan (optimize=2) match the unplanned function (optimize=0)."""
    results = []
    for level in (2, 0):
        f, data, params = build(level)
        assert (f.program.info["plan"] is not None) == (level == 2)
        batches = [data(n) for n in (5, 64, 5, 33)]
        losses = [float(f(*b)) for b in batches]
        results.append((losses, [p.get_value().copy() for p in params]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_report_bound_and_exact_peaks():
    x, y = _mixed()
    f = gc.function([x], y)
    expr = f.memory_plan().peak_bytes_expr
    N = gc.shapes.dim_symbol("N")
    assert N in expr.free_symbols and f.memory_plan().offsets is None
    for n in (1, 3, 64, 1000):
        rep = f.memory_plan(N=n)
        assert rep.peak_bytes <= int(expr.subs(N, n)) and rep.naive_bytes == int(rep.naive_bytes_expr.subs(N, n))
        # the report's arena is the one the program allocates
        views = f.program.info["workspace"].get({"N": n})
        base = min(v.ctypes.data for v in views)
        assert sorted(v.ctypes.data - base for v in views) == sorted(o - min(rep.offsets) for o in rep.offsets)
        assert all(o + v.nbytes <= rep.workspace_bytes for o, v in zip(rep.offsets, views))
    assert memory_plan(f.graph, {"N": 64}).workspace_bytes == f.memory_plan(N=64).workspace_bytes


def test_concurrent_calls_with_shared_arena_buffers(rng):
    x, y = _mixed()
    f = gc.function([x], y)
    errors, barrier = [], threading.Barrier(3)

    def work(seed):
        r = np.random.default_rng(seed)
        barrier.wait()
        for i in range(30):
            a = r.standard_normal((int(r.choice([4, 17, 64])), 8)).astype(np.float32)
            try:
                np.testing.assert_allclose(f(a), gc.evaluate([y], {x: a})[0], rtol=1e-5, atol=1e-6)
            except AssertionError as e:
                errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


def test_extra_placement_orders():
    bufs = [(0, 1, 100), (1, 2, 40), (2, 3, 100), (3, 4, 40)]
    plain = plan_arena(bufs, 8)
    stacked = plan_arena(bufs, 8, [[0, 2, 1, 3]])
    assert stacked.total <= plain.total and stacked.total <= 104 + 40
    with pytest.raises(gc.GraphcError, match="permutation"):
        plan_arena(bufs, 8, [[0, 1, 1, 3]])


def test_generated_names_never_shadow_what_the_code_uses():
    """Tensor names that are builtins, the generated function's own locals or an impl's name."""
    a = gc.placeholder("max", (None, 3))
    b = gc.placeholder("_ws", (None, 3))
    c = gc.placeholder("_dims", (None, 3))
    d = gc.placeholder("_softmax", (None, 3))
    y = gc.softmax(gc.tanh(a @ np.eye(3, dtype=np.float32)) + b * c + d, axis=1)
    f = gc.function([a, b, c, d], y)
    vals = [np.random.default_rng(i).standard_normal((4, 3)).astype(np.float32) for i in range(4)]
    np.testing.assert_allclose(f(*vals), gc.evaluate([y], dict(zip([a, b, c, d], vals)))[0], rtol=1e-5)
    head = f.source.splitlines()[0]
    assert "max_" in head and "_ws_" in head and "_dims_" in head and "_softmax_" in head


def test_fused_body_placeholders_are_unique_identifiers():
    x = gc.placeholder("x", (4,))
    y = gc.placeholder("x", (4,))  # inputs named alike
    z = gc.placeholder("x", (4,))
    f = gc.function([x, y, z], gc.exp(x) * y + z)
    [fused] = [n for n in f.graph.nodes if n.op is Fused]
    names = [p.name for p in fused.attrs["body"].inputs]
    assert len(set(names)) == 3 and all(n.isidentifier() for n in names)
    vals = [np.arange(4.0, dtype=np.float32) + i for i in range(3)]
    np.testing.assert_allclose(f(*vals), np.exp(vals[0]) * vals[1] + vals[2], rtol=1e-6)
