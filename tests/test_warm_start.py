"""The warm-start cache (backends/schedule/warm.py): a function compiled before (in this process or another)
is found from the user's graph before any pass runs, and its specialisations from their entries without a
plan or IR. A hit is never stale: a changed graph, constant, dtype, shape, host CPU, forced ISA, tuner
decision, graphc version or code, a setting that changes code generation, or a monkeypatched constant is
a miss, and every result (hit or miss) is checked against NumPy."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GRAPHC_WARM_CACHE", raising=False)
    return tmp_path


W = (np.arange(30 * 7, dtype="f4").reshape(30, 7) - 100) / 100
C = np.linspace(0.5, 1.5, 7, dtype="f4")


def _mlp(scale=2.0, dtype="float32", shape=(None, 30), const=C):
    x = gc.placeholder("x", shape, dtype)
    w = gc.parameter("w", W.astype(dtype))
    y = gc.softmax(gc.tanh(x @ w) * scale * gc.constant(const.astype(dtype)), axis=1)
    return x, w, y


def _want(a, w, scale=2.0, const=C):
    h = np.tanh(a.astype(np.float64) @ w.astype(np.float64)) * scale * const
    e = np.exp(h - h.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _compile(**kw):
    x, w, y = _mlp(**{k: v for k, v in kw.items() if k in ("scale", "dtype", "shape", "const")})
    return gc.function([x], y, backend="llvm"), w


def _check(f, w, rows=4, dtype="float32", scale=2.0, const=C):
    a = np.linspace(-1, 1, rows * 30).reshape(rows, 30).astype(dtype)
    out = f(a)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, _want(a, w.value, scale, const), rtol=1e-4, atol=1e-6)
    return f.program.info["warm_hit"]


def test_second_compile_is_a_warm_hit_without_passes_plan_or_lowering():
    f, w = _compile()
    assert _check(f, w) is False
    g, w2 = _compile()
    assert _check(g, w2) is True
    ct = g.program.info["compile_time"]
    assert ct["passes"] == ct["plan"] == ct["lowering"] == ct["llvm_opt"] == 0
    assert g._graph is None                       # the passes have not run
    assert g.program.info["kernels"] == f.program.info["kernels"]
    # what needs the optimised graph or the plan still works, made on demand
    assert g.graph.compute_nodes() and "define" in g.source
    assert g.program._last.plan.steps
    assert g.program.info["warm_hit"] is True


def test_source_after_a_warm_hit_and_a_changed_setting_is_an_error_not_other_code(monkeypatch):
    """After a warm hit the plan (f.source) is made when first asked for: with a graphc setting changed
    in between it would describe other code than what runs, so asking is a clear error; asked before the
    change, it is the code that runs."""
    from graphc import GraphcError
    from graphc.backends.llvm import kernels
    f, w = _compile()
    assert _check(f, w) is False
    g, w2 = _compile()
    assert _check(g, w2) is True
    h, w3 = _compile()
    assert _check(h, w3) is True
    assert g.source == f.source   # made before the change: the code that runs
    monkeypatch.setattr(kernels, "LATE_ORDER", not kernels.LATE_ORDER)
    with pytest.raises(GraphcError, match="settings changed since it was compiled"):
        h.source
    assert g.source == f.source   # made before the change: kept
    np.testing.assert_allclose(h(np.ones((2, 30), "f4")), _want(np.ones((2, 30), "f4"), w3.value),
                               rtol=1e-4, atol=1e-6)   # the code that runs is unchanged


def test_explain_and_run_time_errors_after_a_warm_hit():
    def take():
        x = gc.placeholder("x", (5, 3))
        i = gc.placeholder("i", (2,), "int64")
        return gc.function([x, i], gc.take(x, i, axis=0) * 2.0, backend="llvm")
    a = np.arange(15, dtype="f4").reshape(5, 3)
    for hit in (False, True):
        f = take()
        np.testing.assert_array_equal(f(a, np.array([4, 0])), a[[4, 0]] * 2)
        assert f.program.info["warm_hit"] is hit
        # the status word's message names the node: the plan is made again for it after a hit
        with pytest.raises(gc.GraphcError, match="out of range for axis 0"):
            f(a, np.array([0, 7]))
    f, w = _compile()
    _check(f, w)
    g, w2 = _compile()
    assert _check(g, w2) is True
    e = g.explain(N=4, repeat=1)
    assert len(e.rows) == len(g.program._specs[(("N", 4),)].plan.steps)


def test_new_batch_size_reuses_the_function_entry_and_compiles_only_the_specialisation():
    f, w = _compile()
    _check(f, w, rows=4)
    g, w2 = _compile()
    assert _check(g, w2, rows=3) is False          # a new specialisation: planned and compiled (dims N=3)
    assert _check(g, w2, rows=4) is True           # the one compiled before: from the warm cache
    h, w3 = _compile()
    assert _check(h, w3, rows=3) is True


@pytest.mark.parametrize("change", ["scale", "const", "dtype", "shape"])
def test_a_changed_graph_misses(change):
    f, w = _compile()
    _check(f, w)
    if change == "scale":
        g, w2 = _compile(scale=3.0)
        assert _check(g, w2, scale=3.0) is False
    elif change == "const":
        c2 = C.copy()
        c2[3] += 1e-3
        g, w2 = _compile(const=c2)
        assert _check(g, w2, const=c2) is False
    elif change == "dtype":
        g, w2 = _compile(dtype="float64")
        assert _check(g, w2, dtype="float64") is False
    else:
        g, w2 = _compile(shape=(4, 30))
        assert _check(g, w2) is False
        g, w2 = _compile(shape=(5, 30))
        assert _check(g, w2, rows=5) is False


def test_parameter_values_are_not_compiled_in():
    f, w = _compile()
    _check(f, w)
    g, w2 = _compile()
    w2.set_value(W * -0.5)
    assert _check(g, w2) is True                   # same code, the new value read at run time


def test_host_cpu_isa_and_codegen_settings_miss(monkeypatch):
    from graphc.backends.llvm import jit
    f, w = _compile()
    _check(f, w)
    with monkeypatch.context() as m:               # another CPU name (the target id in the key)
        jit.target_machine()
        m.setitem(jit._state, "cpu", jit._state["cpu"] + "-other")
        g, w2 = _compile()
        assert _check(g, w2) is False
    for var, value in (("GRAPHC_LLVM_ISA", "avx512"), ("GRAPHC_LLVM_UNROLL", "1"), ("GRAPHC_NUM_THREADS", "1"),
                       ("GRAPHC_TUNE", "off")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            g, w2 = _compile()
            assert _check(g, w2) is False, var
            g, w2 = _compile()
            assert _check(g, w2) is True, var      # the same setting again: its own entry
    g, w2 = _compile()
    assert _check(g, w2) is True                   # every setting back: the first entry


def test_graphc_version_code_and_patched_constants_miss(monkeypatch):
    from graphc.backends.llvm import kernels, tune
    from graphc.backends.schedule import warm
    f, w = _compile()
    _check(f, w)
    with monkeypatch.context() as m:
        m.setattr(gc, "__version__", "99.0")
        g, w2 = _compile()
        assert _check(g, w2) is False
    with monkeypatch.context() as m:               # an edited source file (its size or mtime)
        m.setattr(warm, "_code", ["another checkout"])
        g, w2 = _compile()
        assert _check(g, w2) is False
    for mod, name, value in ((kernels, "PARALLEL_MIN", 1), (tune, "BLAS_PARALLEL_FLOPS", 1)):
        with monkeypatch.context() as m:
            m.setattr(mod, name, value)
            g, w2 = _compile()
            assert _check(g, w2) is False, name
    with monkeypatch.context() as m:               # a replaced function
        m.setattr(tune, "blas_threads", lambda flops: 1)
        g, w2 = _compile()
        assert _check(g, w2) is False
    g, w2 = _compile()
    assert _check(g, w2) is True


N, K, M = 80, 256, 256   # above gemm.SMALL_MACS: a BLAS product whose thread split the tuner times


def _product():
    x = gc.placeholder("x", (N, K))
    w = gc.parameter("w", np.random.default_rng(0).standard_normal((K, M)).astype("f4") / 10)
    return gc.function([x], gc.relu(x @ w), backend="llvm"), w


def _run_product(f, w):
    a = np.random.default_rng(1).standard_normal((N, K)).astype("f4")
    np.testing.assert_allclose(f(a), np.maximum(a @ w.value, 0), rtol=1e-4, atol=1e-4)
    return f.program.info["warm_hit"]


def test_a_changed_tuner_decision_misses(monkeypatch):
    from graphc.backends.llvm import tune
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "0")   # a BLAS product of the weight, not the packed micro-kernel
    monkeypatch.setattr(tune, "_memo", {})
    monkeypatch.setattr(tune, "_busy", lambda: False)
    if tune.decided(N, K, M, "float32") == (tune.blas_threads(2 * N * K * M), "rule"):
        pytest.skip("the tuner does not time this product here (one thread, no OpenBLAS thread control)")
    f, w = _product()
    assert _run_product(f, w) is False
    (threads, _), top = tune.decided(N, K, M, "float32"), tune.max_blas_threads()
    g, w2 = _product()
    assert _run_product(g, w2) is True
    # another stored answer (a retune, another run of the tuner): a miss, planned with the new answer
    other = 1 if threads == top else top
    name = tune._cache_name("blas", N, K, M, "float32", top, tune.mode())
    tune._store(name, {"threads": other})
    tune._memo.clear()
    g, w2 = _product()
    assert _run_product(g, w2) is False
    assert tune.decisions[g.program._last.plan][0][-1] == other
    g, w2 = _product()
    assert _run_product(g, w2) is True
    # no stored answer: on a quiet machine the tuner times it again (a miss); on a busy one it keeps nothing,
    # so the entry's answer stands (a hit)
    for path in glob.glob(os.path.join(os.environ["GRAPHC_CACHE_DIR"], "tune", "*")):
        os.remove(path)
    tune._memo.clear()
    monkeypatch.setattr(tune, "_busy", lambda: True)
    g, w2 = _product()
    assert _run_product(g, w2) is True
    tune._memo.clear()
    monkeypatch.setattr(tune, "_busy", lambda: False)
    monkeypatch.setattr(tune, "_time_split", lambda n, k, m, dtype, top, reps: {1: 1.0, top: 2.0})
    g, w2 = _product()
    assert _run_product(g, w2) is False
    assert tune.decisions[g.program._last.plan][0][-1] == 1


def test_damaged_entries_are_misses_and_rebuilt(cache_dir, monkeypatch):
    from graphc.backends.schedule import cache
    monkeypatch.setattr(cache, "_warned", [])     # the first damaged entry of the process warns
    f, w = _compile()
    _check(f, w)

    def damage(kind):
        paths = glob.glob(str(cache_dir / "warm" / f"*.{kind}"))
        assert paths
        for path in paths:
            with open(path, "r+b") as fh:
                fh.seek(50)
                fh.write(b"\xde\xad\xbe\xef" * 4)
    damage("spec")                                 # the specialisation: planned and compiled again
    with pytest.warns(RuntimeWarning, match="damaged cache entry"):
        g, w2 = _compile()
        assert _check(g, w2) is False
    g, w2 = _compile()
    assert _check(g, w2) is True and g._graph is None
    damage("function")                             # the function's entry: the passes run again (the
    g, w2 = _compile()                             # specialisation's entry is still good)
    assert g._graph is not None and _check(g, w2) is True
    g, w2 = _compile()
    assert _check(g, w2) is True and g._graph is None


def test_switched_off(monkeypatch):
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    f, w = _compile()
    _check(f, w)
    g, w2 = _compile()
    assert _check(g, w2) is False


SCRIPT = r"""
import json, sys, time
import numpy as np, graphc as gc
t0 = time.perf_counter()
x = gc.placeholder('x', (None, 6))
w = gc.parameter('w', np.linspace(-1, 1, 24, dtype='f4').reshape(6, 4))
b = gc.parameter('b', np.zeros(4, 'f4'))
y = gc.placeholder('y', (None, 4))
loss = gc.mean((gc.tanh(x @ w + b) - y) ** 2)
gw, gb = gc.grad(loss, [w, b])
f = gc.function([x, y], loss, updates=[(w, w - 0.1 * gw), (b, b - 0.1 * gb)], backend='llvm')
xs = np.linspace(-1, 1, 30, dtype='f4').reshape(5, 6); ys = np.ones((5, 4), 'f4') / 2
losses = [float(f(xs, ys)) for _ in range(3)]
print(json.dumps({"hit": f.program.info["warm_hit"], "losses": losses, "w": w.value.tolist(),
                  "passes": f.program.info["compile_time"]["passes"], "s": time.perf_counter() - t0}))
"""


def test_a_training_step_in_a_new_process(cache_dir):
    def run():
        p = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(os.environ), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])
    cold, warm = run(), run()
    assert cold["hit"] is False and warm["hit"] is True and warm["passes"] == 0
    assert warm["losses"] == cold["losses"] and warm["w"] == cold["w"]   # the same code: the same bits
    # and both are right: three SGD steps in NumPy (float64)
    xs = np.linspace(-1, 1, 30).reshape(5, 6)
    ys = np.ones((5, 4)) / 2
    w, b, want = np.linspace(-1, 1, 24).reshape(6, 4), np.zeros(4), []
    for _ in range(3):
        h = np.tanh(xs @ w + b)
        want.append(np.mean((h - ys) ** 2))
        d = 2 * (h - ys) / h.size * (1 - h ** 2)
        w, b = w - 0.1 * xs.T @ d, b - 0.1 * d.sum(0)
    np.testing.assert_allclose(warm["losses"], want, rtol=1e-5)
    np.testing.assert_allclose(warm["w"], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one, split, stored", [(1.0, 1.15, False), (1.0, 1.5, True), (1.0, 0.6, True)])
def test_a_narrow_one_thread_win_is_not_stored(cache_dir, monkeypatch, one, split, stored):
    """The thread split of a product is stored for later processes unless one thread won narrowly (a
    phase of a shared host where the second core gains nothing must not stick to the CPU model)."""
    from graphc.backends.llvm import tune
    if tune.max_blas_threads() < 2 or tune.set_threads_symbol() is None:
        pytest.skip("one BLAS thread here: nothing is tuned")
    monkeypatch.setattr(tune, "_busy", lambda: False)
    monkeypatch.setattr(tune, "_time_split", lambda n, k, m, dtype, top, reps: {1: one, top: split})
    tune._memo.clear()
    top = tune.max_blas_threads()
    t, src = tune._blas_threads_for(None, 128, 256, 512, "float32")
    assert src == "tuned" and t == (1 if split > one * tune.SPLIT_MARGIN else top)
    name = tune._cache_name("blas", 128, 256, 512, "float32", top, tune.mode())
    assert (tune._load(name) is not None) is stored
    tune._memo.clear()


def test_a_large_product_splits_without_timing(cache_dir, monkeypatch):
    """Products of TUNE_MAX_FLOPS or more take the split by the size rule: no probe is built or timed,
    and the answer comes back the same when asked again; just under the bound the tuner times."""
    from graphc.backends.llvm import tune
    if tune.max_blas_threads() < 2 or tune.set_threads_symbol() is None:
        pytest.skip("one BLAS thread here: nothing is tuned")
    timed = []
    top = tune.max_blas_threads()

    def probe(n, k, m, dtype, top, reps):
        timed.append((n, k, m))
        return {1: 1.0, top: 0.6}

    monkeypatch.setattr(tune, "_time_split", probe)
    monkeypatch.setattr(tune, "_busy", lambda: False)
    tune._memo.clear()
    n, k, m = 128, 2048, 256
    assert 2 * n * k * m >= tune.TUNE_MAX_FLOPS
    assert tune._blas_threads_for(None, n, k, m, "float32") == (top, "rule")
    assert tune.decided(n, k, m, "float32") == (top, "rule") and timed == []
    assert tune._blas_threads_for(None, n, k, m // 2 - 1, "float32") == (top, "tuned")
    assert timed == [(n, k, m // 2 - 1)]
    tune._memo.clear()


def test_the_same_model_with_other_tensor_names_is_a_hit():
    """Layers number themselves per process (lstm0, lstm1, ...): the same model built again under other
    names is a hit, runs with its own parameters' values, and its optimised graph has its own names."""
    def lstm():
        x = gc.placeholder("x", (6, 3, 5))
        y, _ = gc.nn.LSTM(5, 4)(x)
        return gc.function([x], y[-1], backend="llvm")
    a = np.random.default_rng(0).standard_normal((6, 3, 5)).astype("f4")
    f, g = lstm(), lstm()
    names = [sorted(p.name for p in fn.user_graph.parameters) for fn in (f, g)]
    assert names[0] != names[1]
    for p in g.user_graph.parameters:
        p.set_value(p.value * 0.5)
    want = [gc.function(fn.user_graph.inputs, fn.user_graph.outputs[0], backend="numpy")(a) for fn in (f, g)]
    assert not np.allclose(want[0], want[1])
    np.testing.assert_allclose(f(a), want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g(a), want[1], rtol=1e-5, atol=1e-6)
    assert f.program.info["warm_hit"] is False and g.program.info["warm_hit"] is True
    # what is made again after a hit (the optimised graph, for listings and messages) is g's own
    assert sorted(p.name for p in g.program.graph.parameters) == names[1]
