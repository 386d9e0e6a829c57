"""Compile time that grows with the distinct kernels, not the graph: deep graphs compile without Python
recursion, the near-linear passes decide exactly what the simple quadratic ones did, identical llvm
kernels are one function (within a graph, and across graphs through the on-disk cache), and programs
report seconds per compile phase. No timing assertions: the speed goals live in
`python -m benchmarks.compile_time`."""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from graphc.ir import Graph, Trait
from graphc.passes import fusion as FU
from graphc.passes import memory as MEM
from graphc.passes import optimize
from graphc.passes.rewrite import users

LLVM_PHASES = {"passes", "plan", "lowering", "llvm_opt", "machine_code", "load", "total"}
NUMPY_PHASES = {"passes", "memory_plan", "codegen", "python_compile", "total"}


def _chain(n: int, size: int = 33):
    """y = f_n(...f_1(x)) cycling through sin, *0.9, +0.1, tanh; and the float64 NumPy value."""
    x = gc.placeholder("x", (size,))
    y = x
    xs = np.linspace(-2, 2, size).astype(np.float32)
    v = xs.astype(np.float64)
    for i in range(n):
        k = i % 4
        if k == 0:
            y, v = gc.sin(y), np.sin(v)
        elif k == 1:
            y, v = y * 0.9, v * 0.9
        elif k == 2:
            y, v = y + 0.1, v + 0.1
        else:
            y, v = gc.tanh(y), np.tanh(v)
    return x, y, xs, v


@pytest.fixture
def low_recursion_limit():
    """Python's default limit: a walk that recursed once per node would fail on a deep graph."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_deep_chain_compiles_without_recursion_and_matches_numpy(backend, low_recursion_limit, tmp_path,
                                                                 monkeypatch):
    backend_or_skip(backend)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    n = 4001
    x, y, xs, want = _chain(n)
    f = gc.function([x], y, backend=backend)
    np.testing.assert_allclose(f(xs), want, rtol=2e-5, atol=2e-6)
    fused = [node for node in f.graph.compute_nodes()]
    # fusion cut the chain into groups of at most MAX_GROUP_OPS ops (every op is fused)
    sizes = [len(node.attrs["body"].compute_nodes()) for node in fused]
    assert sum(sizes) == n and max(sizes) <= FU.MAX_GROUP_OPS and len(fused) == -(-n // FU.MAX_GROUP_OPS)
    if backend == "llvm":   # the repeated groups are one function: 4001 = 31 * 129 + 2 ops
        info = f.program.info
        assert info["kernels"] == len(fused) and info["kernel_functions"] <= 3


def test_a_cut_chain_says_why_its_groups_stayed_apart():
    x, y, xs, want = _chain(2 * FU.MAX_GROUP_OPS + 3)
    f = gc.function([x], y)
    np.testing.assert_allclose(f(xs), want, rtol=1e-5, atol=1e-6)
    a, b = f.graph.compute_nodes()[:2]
    why = FU.unfused_reason(a, b, users(f.graph), {id(t) for t in f.graph.roots})
    assert f"at most MAX_GROUP_OPS = {FU.MAX_GROUP_OPS}" in why


def _mlp_adam(layers: int, width: int = 8, batch: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    ws = [gc.parameter(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32))
          for i in range(layers)]
    bs = [gc.parameter(f"b{i}", (0.1 * rng.standard_normal(width)).astype(np.float32)) for i in range(layers)]
    x, t = gc.placeholder("x", (batch, width)), gc.placeholder("t", (batch, width))
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = h @ w + b
        if i < layers - 1:
            h = gc.relu(h)
    loss = gc.mean((h - t) * (h - t))
    upd = gc.optim.Adam(lr=1e-2).updates(loss, ws + bs)
    data = (rng.standard_normal((batch, width)).astype(np.float32), rng.standard_normal((batch, width)).astype(np.float32))
    return [x, t], loss, upd, ws + bs, data


def test_identical_kernels_are_one_llvm_function_and_results_match_numpy(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    results = {}
    for backend in ("numpy", "llvm"):
        ins, loss, upd, params, data = _mlp_adam(10)
        f = gc.function(ins, loss, updates=upd, backend=backend)
        losses = [float(f(*data)) for _ in range(3)]
        results[backend] = (losses, [p.value.copy() for p in params])
        if backend == "llvm":
            info = f.program.info
            # every layer's forward, backward and Adam update steps are the same kernels
            assert info["kernel_functions"] < info["kernels"] / 3, info
            assert f.source.count("\ndefine void @k_") == info["kernel_functions"]
    (l_np, p_np), (l_ll, p_ll) = results["numpy"], results["llvm"]
    np.testing.assert_allclose(l_ll, l_np, rtol=1e-4)
    for a, b in zip(p_ll, p_np):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_memoised_emission_writes_the_module_a_fresh_emission_writes(tmp_path, monkeypatch):
    """Kernels with equal memo keys are emitted once (program._Gen.kernel): the module must be the same
    text, byte for byte, as when every step's kernel is emitted afresh; and results match NumPy."""
    backend_or_skip("llvm")
    from graphc.backends.llvm import program as PR
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    sources, emitted, keys = {}, {}, []
    real, key_of = PR._kernel_fn, PR.memo_key

    def counting(kern, bufs, *a):
        emitted[memo] += 1
        if memo:
            keys.append(key_of(kern, bufs))
        return real(kern, bufs, *a)
    monkeypatch.setattr(PR, "_kernel_fn", counting)
    for memo in (True, False):
        emitted[memo] = 0
        if not memo:
            monkeypatch.setattr(PR, "memo_key", lambda kern, bufs: None)
        ins, loss, upd, params, data = _mlp_adam(6)
        x, y, xs, want = _chain(3 * 129 + 7)
        f = gc.function(ins, loss, updates=upd, backend="llvm")
        g = gc.function([x], y, backend="llvm")
        np.testing.assert_allclose(g(xs), want, rtol=2e-5, atol=2e-6)
        ref_ins, ref_loss, ref_upd, ref_params, _ = _mlp_adam(6)
        ref = gc.function(ref_ins, ref_loss, updates=ref_upd, backend="numpy")
        np.testing.assert_allclose(f(*data), ref(*data), rtol=1e-5)
        for a, b in zip(params, ref_params):
            np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-6)
        sources[memo] = (f.source, g.source)
    assert sources[True] == sources[False]
    named = [k for k in keys if k is not None]
    assert len(named) == len(set(named)), "a kernel was emitted twice under one memo key"
    # the 6 repeated layers' kernels (forward products with their epilogues, Adam's updates) were emitted once
    assert emitted[False] - emitted[True] >= 12, emitted


def test_memo_keys_tell_apart_regions_that_differ_in_a_constant_or_an_attr(tmp_path, monkeypatch):
    """Regions of the same ops whose constants or attrs differ (0.9 / 0.8, alpha 0.1 / 0.2), separated by
    cumulative sums, are different kernels: the result matches NumPy (the keys' exactness on floats:
    test_freeze_keys_values_exactly)."""
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    xs = np.random.default_rng(3).standard_normal((5, 17)).astype(np.float32)
    x = gc.placeholder("x", (5, 17))
    h, v = x, xs.astype(np.float64)
    for kind, c in [("mul", 0.9), ("mul", 0.8), ("leaky", 0.1), ("leaky", 0.2)] * 2:
        if kind == "mul":
            h, v = gc.tanh(gc.sin(h) * c), np.tanh(np.sin(v) * c)
        else:
            s = np.sin(v)
            h, v = gc.tanh(gc.leaky_relu(gc.sin(h), c)), np.tanh(np.where(s > 0, s, c * s))
        h, v = gc.cumsum(h, axis=1), np.cumsum(v, axis=1)
    f = gc.function([x], h, backend="llvm")
    np.testing.assert_allclose(f(xs), v, rtol=2e-5, atol=2e-6)
    assert f.program.info["kernel_functions"] < f.program.info["kernels"]   # the two 0.9 regions: one


def test_freeze_keys_values_exactly():
    from graphc.passes.cse import freeze
    assert freeze(0.0) != freeze(-0.0) and freeze(1) != freeze(1.0)
    assert freeze(float("nan")) == freeze(float("nan"))
    assert freeze(np.float32(0.5)) != freeze(0.5)
    assert freeze({"a": (1, 2.0), "b": slice(0, None, 2)}) == freeze({"b": slice(0, None, 2), "a": [1, 2.0]})
    big = np.zeros(5000, np.float32)
    assert freeze(big) == ("id", id(big))
    with pytest.raises(TypeError):
        freeze({"v": big}, strict=True)
    with pytest.raises(TypeError):
        freeze([1, {1, 2}], strict=True)


def test_kernels_are_shared_across_graphs_through_the_cache(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    ins, loss, upd, _, data = _mlp_adam(3)
    first = gc.function(ins, loss, updates=upd, backend="llvm")
    assert first.program.info["kernels_from_cache"] == 0 and not first.program.info["cache_hit"]
    ins, loss, upd, params, data = _mlp_adam(4, seed=1)   # another graph made of the same kernels
    ref_ins, ref_loss, ref_upd, ref_params, _ = _mlp_adam(4, seed=1)
    second = gc.function(ins, loss, updates=upd, backend="llvm")
    info = second.program.info
    assert not info["cache_hit"] and info["kernels_from_cache"] >= info["kernel_functions"] - 2, info
    ref = gc.function(ref_ins, ref_loss, updates=ref_upd, backend="numpy")
    np.testing.assert_allclose(second(*data), ref(*data), rtol=1e-5)
    for a, b in zip(params, ref_params):
        np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-6)
    again = gc.function(ins, loss, updates=upd, backend="llvm")   # the whole program: one cache entry
    assert again.program.info["cache_hit"]


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_compile_time_reported_per_phase(backend, tmp_path, monkeypatch):
    backend_or_skip(backend)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    ins, loss, upd, _, data = _mlp_adam(2)
    f = gc.function(ins, loss, updates=upd, backend=backend)
    ct = f.program.info["compile_time"]
    assert set(ct) == (LLVM_PHASES if backend == "llvm" else NUMPY_PHASES)
    assert all(isinstance(v, float) and v >= 0 for v in ct.values())
    assert ct["passes"] > 0 and ct["total"] == pytest.approx(sum(v for k, v in ct.items() if k != "total"))
    if backend == "llvm":
        assert ct["llvm_opt"] > 0 and ct["machine_code"] > 0
        warm = gc.function(ins, loss, updates=upd, backend=backend).program.info
        assert warm["cache_hit"] and warm["compile_time"]["llvm_opt"] == 0 == warm["compile_time"]["machine_code"]


def test_compile_time_of_a_symbolic_graph_is_its_specialisation():
    backend_or_skip("llvm")
    x = gc.placeholder("x", (None, 3))
    f = gc.function([x], gc.tanh(x) * 2.0, backend="llvm")
    assert "compile_time" not in f.program.info          # nothing compiled before the first call
    np.testing.assert_allclose(f(np.ones((4, 3), np.float32)), np.tanh(np.ones((4, 3))) * 2, rtol=1e-6)
    assert set(f.program.info["compile_time"]) == LLVM_PHASES


# ---- the near-linear passes decide as the simple ones did --------------------------------------------------

def _random_graph(seed: int, n: int = 60):
    """Elementwise ops over earlier values, with matmuls and transposes in between (non-fusible paths)."""
    rng = np.random.default_rng(seed)
    x = gc.placeholder("x", (4, 4))
    w = gc.parameter(f"w{seed}", np.eye(4, dtype=np.float32))
    vals = [x, gc.exp(x)]
    for _ in range(n):
        r = rng.random()
        a = vals[int(rng.integers(max(0, len(vals) - 8), len(vals)))]
        b = vals[int(rng.integers(0, len(vals)))]
        if r < 0.12:
            vals.append(a @ w)
        elif r < 0.2:
            vals.append(gc.transpose(a))
        elif r < 0.5:
            vals.append(a + b)
        elif r < 0.75:
            vals.append(a * b)
        else:
            vals.append(gc.tanh(a))
    outs = [vals[-1]] + [vals[int(i)] for i in rng.integers(0, len(vals), 3)]
    return Graph([x], outs)


class _QuadraticFuser(FU._Fuser):
    """The cycle check as it was: a search from every member of src over every member of a group."""

    def _path_outside(self, src, dst, frontier):
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


def _partition(fuser):
    fuser.run()
    return sorted(sorted(fuser.pos[id(m)] for m in g.members) for g in fuser.groups())


@pytest.mark.parametrize("seed", range(12))
def test_fusion_groups_equal_the_quadratic_cycle_check(seed):
    g = optimize(_random_graph(seed), level=1)
    fast, slow = _partition(FU._Fuser(g)), _partition(_QuadraticFuser(g))
    assert fast == slow
    assert any(len(p) > 1 for p in fast)   # the graphs do fuse


def _quadratic_greedy_order(graph):
    """The schedule's greedy order as it was: the ready list scanned for the lowest score each step."""
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    succ = {i: [] for i in range(len(nodes))}
    indeg = Counter()
    for i, n in enumerate(nodes):
        for j in {index[id(t.node)] for t in n.inputs}:
            succ[j].append(i)
            indeg[i] += 1
    readers = users(graph)
    remaining = {t: len(v) for t, v in readers.items()}
    size = {id(o): MEM.typical(MEM.nbytes(o)) for n in nodes for o in n.outputs}
    roots = {id(t) for t in graph.roots}

    def score(i):
        n = nodes[i]
        if n.op.has(Trait.LEAF):
            return -10 ** 18
        alloc = sum(size[id(o)] for o in n.outputs) if MEM.fresh(n) else 0
        freed = sum(size[id(t)] for t in {id(t): t for t in n.inputs}.values()
                    if remaining.get(id(t)) == 1 and id(t) not in roots and not t.node.op.has(Trait.LEAF))
        return alloc - freed

    ready, order = [i for i in range(len(nodes)) if indeg[i] == 0], []
    while ready:
        i = min(ready, key=lambda r: (score(r), r))
        ready.remove(i)
        order.append(nodes[i])
        for t in {id(t): t for t in nodes[i].inputs}.values():
            remaining[id(t)] = remaining.get(id(t), 1) - 1
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    return order


@pytest.mark.parametrize("seed", range(6))
def test_schedule_heap_order_equals_the_ready_list_scan(seed):
    graphs = [optimize(_random_graph(seed, 80), level=1)]
    ins, loss, upd, _, _ = _mlp_adam(2 + seed % 3, seed=seed)
    graphs.append(optimize(Graph(ins, [loss], upd), level=1))
    for g in graphs:
        fast = MEM._greedy_order(g)
        assert [id(n) for n in fast] == [id(n) for n in _quadratic_greedy_order(g)]


def test_compile_time_benchmark_runs(tmp_path):
    """`python -m benchmarks.compile_time` (smallest case): runs, checks its result, reports the phases."""
    import json
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ct.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--cases", "mlp5", "--backends",
                        "numpy", "--no-warm", "--json", str(out)], cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and set(row["phases"]) == NUMPY_PHASES and "machine:" in r.stdout
