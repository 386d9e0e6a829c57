"""The tuner's choice between the vector micro-kernel and BLAS for a small product
(backends/llvm/tune.py `kernel_for`): the plan follows the faster (a stubbed timing picks each way),
answers stay NumPy's (float64 reference) on odd sizes in float32 and float64, the real probes run and check
themselves, the decision is stored per CPU model and read back (and by the warm-start check), nothing is
timed with the tuner off, below KERNEL_TUNE_FLOPS or inside a loop. No timing is asserted."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm_blas(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    from graphc.backends.llvm import jit, tune
    jit.target_machine()
    if jit.blas() is None:
        pytest.skip("no BLAS bound: the micro-kernel is the only choice")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.delenv("GRAPHC_LLVM_SMALL_GEMM", raising=False)
    # (the products here multiply a parameter, which the plan would pack and give the micro-kernel by rule:
    # tests/test_llvm_packed_weights.py; the choice timed here is for products of two activations)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "0")
    monkeypatch.setattr(tune, "_memo", {})
    monkeypatch.setattr(tune, "log", [])
    monkeypatch.setattr(tune, "_busy", lambda: False)


def _calls_blas(f) -> bool:
    return "call void @gc_cblas_" in f.source


def _product(rng, n, k, m, dtype):
    x = gc.placeholder("x", (n, k), dtype)
    wv = rng.standard_normal((k, m)).astype(dtype)
    f = gc.function([x], gc.relu(x @ gc.parameter("W", wv)), backend="llvm")
    xv = rng.standard_normal((n, k)).astype(dtype)
    got = f(xv)
    want = np.maximum(xv.astype(np.float64) @ wv.astype(np.float64), 0)
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))
    return f


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("winner", ["tiles", "blas"])
def test_plan_follows_the_faster_kernel(winner, dtype, monkeypatch, rng):
    from graphc.backends.llvm import tune
    loser = "blas" if winner == "tiles" else "tiles"
    monkeypatch.setattr(tune, "_time_kernels", lambda *a: {winner: 1e-6, loser: 1e-3})
    for n, k, m in [(17, 63, 65), (65, 257, 17), (257, 65, 10)]:
        f = _product(rng, n, k, m, dtype)
        assert _calls_blas(f) == (winner == "blas"), (n, k, m)
        label = "BLAS" if winner == "blas" else "micro-kernel"
        assert f"{n}x{k}x{m} {dtype}: {label} (tuned)" in f.program.info["target"]["gemm"]["products"]


def test_real_probes_time_and_check_both(rng):
    from graphc.backends.llvm import tune
    for n, k, m, dtype in [(3, 17, 9, "float32"), (17, 63, 65, "float64"), (65, 257, 17, "float32")]:
        times = tune._time_kernels(n, k, m, dtype, 3)
        assert set(times) == {"tiles", "blas"} and all(0 < t < 1 for t in times.values()), times


def test_decision_is_stored_read_back_and_answers_the_warm_check(monkeypatch, rng):
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "_time_kernels", lambda *a: {"tiles": 1e-3, "blas": 1e-6})
    f = _product(rng, 64, 128, 24, "float32")
    assert _calls_blas(f) and tune.log[-1] == ("kernel", (64, 128, 24, "float32"), 1, "tuned")
    monkeypatch.setattr(tune, "_memo", {})   # a new process: the answer comes from the on-disk cache
    monkeypatch.setattr(tune, "_time_kernels", lambda *a: pytest.fail("timed again"))
    assert tune.decided(64, 128, 24, tune.KERNEL_TAG + "float32") == (1, "cache")
    f2 = _product(rng, 64, 128, 24, "float32")
    assert _calls_blas(f2)
    # the same graph again: the warm-start entry, accepted because the tuner gives the same answer
    assert "64x128x24 float32: BLAS (warm cache)" in f2.program.info["target"]["gemm"]["products"]
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")   # planned again: the decision from the cache
    f3 = _product(rng, 64, 128, 24, "float32")
    assert _calls_blas(f3)
    assert "64x128x24 float32: BLAS (cache)" in f3.program.info["target"]["gemm"]["products"]


def test_nothing_timed_when_off_small_or_in_a_loop(monkeypatch, rng):
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "_time_kernels", lambda *a: pytest.fail("timed"))
    f = _product(rng, 4, 8, 16, "float32")       # below KERNEL_TUNE_FLOPS: the micro-kernel, untimed
    assert not _calls_blas(f)
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    f = _product(rng, 64, 128, 24, "float32")
    assert not _calls_blas(f)
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    xs, w = gc.placeholder("xs", (5, 64, 128)), gc.parameter("w", rng.standard_normal((128, 128)).astype("f4"))
    fin, _ = gc.scan(lambda c, xt: (gc.tanh(xt @ w + c), c), gc.broadcast_to(gc.constant(0.0, "float32"), (64, 128)), xs)
    g = gc.function([xs], fin, backend="llvm")
    xv = rng.standard_normal((5, 64, 128)).astype("f4")
    h = np.zeros((64, 128))
    for t in range(5):
        h = np.tanh(xv[t].astype(np.float64) @ w.value.astype(np.float64) + h)
    np.testing.assert_allclose(g(xv), h, rtol=1e-4, atol=1e-4)
