"""The llvm backend beyond the op table: generated IR/assembly, whole-graph entry, fallbacks,
specialisation per batch size, parameters by pointer, updates, BLAS/loop GEMM, threads, concurrency."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _mlp(rng, n_in=20, hidden=16, n_out=5):
    x = gc.placeholder("x", (None, n_in))
    w1 = gc.parameter("w1", rng.standard_normal((n_in, hidden)).astype(np.float32) * 0.3)
    b1 = gc.parameter("b1", rng.standard_normal(hidden).astype(np.float32))
    w2 = gc.parameter("w2", rng.standard_normal((hidden, n_out)).astype(np.float32) * 0.3)
    y = gc.softmax(gc.relu(x @ w1 + b1) @ w2, axis=-1)
    return x, (w1, b1, w2), y


def _np_mlp(a, w1, b1, w2):
    h = np.maximum(a @ w1 + b1, 0) @ w2
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_source_is_llvm_ir_and_one_native_entry(rng):
    x, ps, y = _mlp(rng)
    f = gc.function([x], y, backend="llvm")
    a = rng.standard_normal((3, 20)).astype(np.float32)
    np.testing.assert_allclose(f(a), _np_mlp(a, *(p.value for p in ps)), rtol=1e-5, atol=1e-6)
    src = f.source
    assert "define void @graphc_entry_0(ptr %ptrs)" in src and "graphc_entry_1" not in src
    assert "gc_cblas_sgem" in src                   # GEMM through BLAS from the generated code
    assert f.program.info["fallback_ops"] == []
    assert "graphc_entry_0" in f.asm


def test_each_batch_size_is_specialised_and_set_value_is_seen(rng):
    x, (w1, b1, w2), y = _mlp(rng)
    f = gc.function([x], y, backend="llvm")
    assert "not specialised yet" in f.source
    for n in (1, 7, 1, 64):
        a = rng.standard_normal((n, 20)).astype(np.float32)
        np.testing.assert_allclose(f(a), _np_mlp(a, w1.value, b1.value, w2.value), rtol=1e-5, atol=1e-6)
    assert len(f.program.info["specialisations"]) == 3
    w1.set_value(np.zeros((20, 16), np.float32))      # parameters go by pointer: no recompile
    a = rng.standard_normal((7, 20)).astype(np.float32)
    np.testing.assert_allclose(f(a), _np_mlp(a, w1.value, b1.value, w2.value), rtol=1e-5, atol=1e-6)


def test_updates_training_step_matches_numpy_backend(rng):
    def build(seed):
        r = np.random.default_rng(seed)
        x, ps, y = _mlp(r)
        t = gc.placeholder("t", (None, 5))
        loss = -gc.mean(gc.sum(t * gc.log(y + 1e-7), axis=1))
        gs = gc.grad(loss, list(ps))
        return [x, t], ps, loss, [(p, p - 0.1 * g) for p, g in zip(ps, gs)]
    a = rng.standard_normal((8, 20)).astype(np.float32)
    t = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 8)]
    results = []
    for backend in ("numpy", "llvm"):
        ins, ps, loss, upd = build(3)
        f = gc.function(ins, loss, updates=upd, backend=backend)
        losses = [float(f(a, t)) for _ in range(3)]
        results.append((losses, [p.value.copy() for p in ps]))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for p_llvm, p_np in zip(results[1][1], results[0][1]):
        np.testing.assert_allclose(p_llvm, p_np, rtol=1e-5, atol=1e-6)


def test_ops_without_native_lowering_fall_back_and_are_listed(rng):
    x = gc.placeholder("x", (4,), "int32")
    f = gc.function([x], x ** 3 + 1, backend="llvm")          # integer pow: host fallback
    a = np.array([1, -2, 3, 4], np.int32)
    np.testing.assert_array_equal(f(a), a ** 3 + 1)
    assert f.program.info["fallback_ops"] == ["pow"]
    assert "host fallback ops (NumPy impl per node): pow" in f.source


def test_strided_views_broadcast_and_transposed_gemm(rng):
    a = gc.placeholder("a", (6, 5))
    b = gc.placeholder("b", (4, 6))
    out = [a.T @ b.T.T.T, (a[::2, 1:] * 2.0).T, gc.broadcast_to(a[:, :1], (2, 6, 5)) + a, a[::-1] @ a.T[:, ::-1]]
    f = gc.function([a, b], out, backend="llvm")
    av = rng.standard_normal((6, 5)).astype(np.float32)
    bv = rng.standard_normal((4, 6)).astype(np.float32)
    want = [av.T @ bv.T, (av[::2, 1:] * 2).T, np.broadcast_to(av[:, :1], (2, 6, 5)) + av, av[::-1] @ av.T[:, ::-1]]
    for g, w in zip(f(av, bv), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_loop_gemm_without_blas_matches_numpy():
    code = ("import numpy as np, graphc as gc\n"
            "a = gc.placeholder('a', (2, 3, 9)); b = gc.placeholder('b', (9, 4))\n"
            "f = gc.function([a, b], a @ b, backend='llvm')\n"
            "assert 'gc_cblas' not in f.source.split('declare void @gc_cblas_dgemv')[1]\n"
            "r = np.random.default_rng(0); x = r.standard_normal((2, 3, 9)).astype('f4');"
            " y = r.standard_normal((9, 4)).astype('f4')\n"
            "np.testing.assert_allclose(f(x, y), x @ y, rtol=1e-5, atol=1e-5); print('ok')\n")
    _run_ok(code, GRAPHC_LLVM_NO_BLAS="1")


def test_large_elementwise_kernel_runs_on_two_threads(rng):
    n = 1 << 20
    x = gc.placeholder("x", (n,))
    f = gc.function([x], gc.tanh(x * 1.5 + 0.5) * gc.sigmoid(x) + gc.exp(-x * x), backend="llvm")
    a = rng.standard_normal(n).astype(np.float32)
    want = np.tanh(a * 1.5 + 0.5) / (1 + np.exp(-a)) + np.exp(-a * a)
    np.testing.assert_allclose(f(a), want, rtol=1e-5, atol=1e-6)
    from graphc.backends.llvm.program import num_threads
    if num_threads() > 1:
        assert "call void @gc_pool_run" in f.source
    y = gc.placeholder("y", (1000,))
    assert "call void @gc_pool_run" not in gc.function([y], gc.exp(y), backend="llvm").source  # small: 1 thread


def test_concurrent_calls_from_threads_give_correct_results(rng):
    x = gc.placeholder("x", (None, 300))
    w = gc.parameter("w", rng.standard_normal((300, 50)).astype(np.float32))
    f = gc.function([x], gc.sum(gc.tanh(x @ w) * 2.0, axis=1), backend="llvm")
    inputs = [rng.standard_normal((16, 300)).astype(np.float32) for _ in range(8)]
    wants = [np.sum(np.tanh(a @ w.value) * 2, axis=1) for a in inputs]
    errors = []

    def worker(k):
        for _ in range(30):
            i = (k * 3 + _) % len(inputs)
            got = f(inputs[i])
            if not np.allclose(got, wants[i], rtol=1e-4, atol=1e-4):
                errors.append((k, i))
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


@pytest.mark.parametrize("stride,padding,dilation", [(1, 2, 1), (2, 1, 1), (1, 0, 2)])
def test_conv2d_and_max_pool_are_native(rng, stride, padding, dilation):
    if not (hasattr(gc, "conv2d") and hasattr(gc, "max_pool2d")):
        pytest.skip("conv2d/max_pool2d not available")
    x = gc.placeholder("x", (None, 3, 11, 10))
    w = gc.parameter("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(4).astype(np.float32))
    y = gc.max_pool2d(gc.relu(gc.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)), 2)
    f = gc.function([x], y, backend="llvm")
    ref = gc.function([x], y, backend="numpy")
    a = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    np.testing.assert_allclose(f(a), ref(a), rtol=1e-5, atol=1e-5)
    assert not {"conv2d", "max_pool2d"} & set(f.program.info["fallback_ops"])


def test_scan_runs_as_a_native_loop_forward_and_bptt(rng):
    """An LSTM's forward scan and its back-propagation-through-time scan both compile to native loops."""
    if not hasattr(gc, "nn") or not hasattr(gc.nn, "LSTM"):
        pytest.skip("gc.nn.LSTM not available")
    lstm = gc.nn.LSTM(5, 7)
    x = gc.placeholder("x", (None, 6, 5))
    seq, (h, c) = lstm(x)
    loss = gc.sum(seq * seq) + gc.sum(h)
    grads = gc.grad(loss, list(lstm.named_params.values()))
    a = rng.standard_normal((3, 6, 5)).astype(np.float32)
    f = gc.function([x], [loss] + grads, backend="llvm")
    ref = gc.function([x], [loss] + grads, backend="numpy")
    for got, want in zip(f(a), ref(a)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert "scan" not in f.program.info["fallback_ops"]
    assert f.source.count("define void @graphc_entry_") == 1


def test_small_gemm_loop_path_matches_numpy(rng):
    code = ("import numpy as np, graphc as gc\n"
            "a = gc.placeholder('a', (16, 40)); b = gc.placeholder('b', (40, 48))\n"
            "f = gc.function([a, b], [a @ b, a @ gc.transpose(b[:, :40])], backend='llvm')\n"
            "r = np.random.default_rng(0); x = r.standard_normal((16, 40)).astype('f4');"
            " y = r.standard_normal((40, 48)).astype('f4')\n"
            "for g, w in zip(f(x, y), [x @ y, x @ y[:, :40].T]):\n"
            "    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)\n"
            "assert 'call void @gc_cblas' not in f.source; print('ok')\n")
    _run_ok(code, GRAPHC_LLVM_SMALL_GEMM="1")


def _run_ok(code: str, **env) -> None:
    """Run `code` in a new Python process with extra environment variables; it must print ok."""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
