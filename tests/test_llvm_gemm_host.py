"""Host-aware products on llvm against NumPy (float64 references): graphc's batch-1 matrix-vector loop
(both matrix layouts, n == 1 and m == 1, odd sizes, batches, split across threads or not, under
sanitize="bounds", parameters replaced by set_value), the micro-kernel with AVX2's and AVX-512's vector
shapes forced (GRAPHC_LLVM_ISA: the AVX-512 path runs on an AVX2 host as split vectors), OpenBLAS's
thread count set per call (and restored), the tuner's decisions (measured once, then read from the
on-disk cache; off: the size rule) and f.program.info["target"]."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")

SIZES = (1, 3, 17, 63, 65, 257)
TOL = {"float32": 3e-5, "float64": 1e-12}


@pytest.fixture
def llvm(monkeypatch):
    backend_or_skip("llvm")
    # the BLAS, GEMV and micro-kernel paths of products with a parameter, which the plan would otherwise
    # pack (tests/test_llvm_packed_weights.py)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "0")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "_memo", {})
    return tmp_path


def _close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _product(rng, n, k, m, dtype, transposed, **kw):
    """f(x) = x @ W (or x @ W.T of a (m, k) parameter), with its data and float64 reference."""
    x = gc.placeholder("x", (n, k), dtype)
    wv = rng.standard_normal((m, k) if transposed else (k, m)).astype(dtype)
    w = gc.parameter("W", wv)
    f = gc.function([x], x @ (gc.transpose(w) if transposed else w), backend="llvm", **kw)
    xv = rng.standard_normal((n, k)).astype(dtype)
    ref = xv.astype(np.float64) @ (wv.T if transposed else wv).astype(np.float64)
    return f, w, xv, ref


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W.T"])
def test_gemv_batch1_matches_numpy_on_odd_sizes(rng, dtype, transposed):
    for k, m in [(1, 1), (3, 17), (17, 3), (63, 65), (65, 257), (257, 63), (257, 1), (1, 257)]:
        f, _, xv, ref = _product(rng, 1, k, m, dtype, transposed)
        _close(f(xv), ref, dtype)
        assert "_gemv(" in f.source and "@gc_cblas" not in f.source.split("declare i32")[-1], (k, m)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemv_matrix_times_column_vector(rng, dtype):
    for n, k in [(3, 17), (17, 3), (65, 63), (257, 65), (1, 257)]:
        a, v = gc.placeholder("a", (n, k), dtype), gc.placeholder("v", (k, 1), dtype)
        at = gc.placeholder("at", (k, n), dtype)
        f = gc.function([a, v, at], [a @ v, gc.transpose(at) @ v], backend="llvm")
        av, vv = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, 1)).astype(dtype)
        atv = rng.standard_normal((k, n)).astype(dtype)
        got = f(av, vv, atv)
        _close(got[0], av.astype(np.float64) @ vv, dtype)
        _close(got[1], atv.T.astype(np.float64) @ vv, dtype)
        assert "_gemv(" in f.source


def test_gemv_batched_and_strided_operands(rng):
    a, b = gc.placeholder("a", (3, 1, 17), "float32"), gc.placeholder("b", (3, 17, 65), "float32")
    c = gc.placeholder("c", (1, 34), "float32")
    f = gc.function([a, b, c], [a @ b, c[:, ::2] @ b[1, :, :33][:17], gc.transpose(b[0]) @ gc.transpose(a[0])],
                    backend="llvm")
    av, bv = rng.standard_normal((3, 1, 17)).astype(np.float32), rng.standard_normal((3, 17, 65)).astype(np.float32)
    cv = rng.standard_normal((1, 34)).astype(np.float32)
    got = f(av, bv, cv)
    a64, b64, c64 = av.astype(np.float64), bv.astype(np.float64), cv.astype(np.float64)
    _close(got[0], a64 @ b64, "float32")
    _close(got[1], c64[:, ::2] @ b64[1, :, :33][:17], "float32")
    _close(got[2], b64[0].T @ a64[0].T, "float32")


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W.T"])
def test_gemv_split_across_threads(rng, monkeypatch, threads, transposed):
    """Every GEMV split (GEMV_PARALLEL_FLOPS = 0) over 1 or 2 threads: uneven blocks, a tail group."""
    from graphc.backends.llvm import tune
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setattr(tune, "GEMV_PARALLEL_FLOPS", 0)
    for k, m in [(17, 257), (65, 130), (3, 129), (257, 129)]:
        f, _, xv, ref = _product(rng, 1, k, m, "float32", transposed)
        _close(f(xv), ref, "float32")
        assert ("_gemv_thunk" in f.source) == (threads == "2"), (k, m)


def test_gemv_under_bounds_checks(rng, monkeypatch):
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "GEMV_PARALLEL_FLOPS", 0)
    for transposed in (False, True):
        for k, m in [(17, 65), (1, 3), (63, 257)]:
            f, _, xv, ref = _product(rng, 1, k, m, "float64", transposed, sanitize="bounds")
            _close(f(xv), ref, "float64")


@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W.T"])
def test_products_follow_set_value_never_stale(rng, transposed):
    """The weights are read where they are, each call: set_value and a training update are seen at once."""
    for n, k, m in [(1, 65, 257), (64, 256, 300)]:
        f, w, xv, _ = _product(rng, n, k, m, "float32", transposed)
        f(xv)
        for _ in range(2):
            new = rng.standard_normal(w.shape).astype(np.float32)
            w.set_value(new)
            want = xv.astype(np.float64) @ (new.T if transposed else new).astype(np.float64)
            _close(f(xv), want, "float32")
    x = gc.placeholder("x", (1, 17))
    w = gc.parameter("W2", rng.standard_normal((17, 63)).astype(np.float32))
    step = gc.function([x], gc.sum(x @ w), updates=[(w, w * 0.5)], backend="llvm")
    xv = rng.standard_normal((1, 17)).astype(np.float32)
    for _ in range(3):
        before = w.value.astype(np.float64)
        _close(step(xv), (xv @ before).sum(), "float32")


@pytest.mark.parametrize("isa,vector", [("avx2", "<8 x float>"), ("avx512", "<16 x float>")])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_micro_kernel_with_forced_isa(rng, monkeypatch, isa, vector, threads):
    """The register-blocked micro-kernel with each ISA's vector shape (AVX-512's runs as split vectors on
    an AVX2 host: the code path is compiled and checked even where the host lacks it)."""
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    monkeypatch.setenv("GRAPHC_NUM_THREADS", threads)
    monkeypatch.setattr(gemm, "PARALLEL_FLOPS", 0)   # the batched product splits across threads
    assert tune.isa() == ("avx2+fma" if isa == "avx2" else isa)
    for n, k, m in [(3, 17, 63), (17, 65, 257), (65, 3, 17), (2, 257, 65)]:
        for dtype in ("float32", "float64"):
            a, b = gc.placeholder("a", (2, n, k), dtype), gc.placeholder("b", (2, k, m), dtype)
            f = gc.function([a, b], a @ b, backend="llvm")
            av, bv = rng.standard_normal((2, n, k)).astype(dtype), rng.standard_normal((2, k, m)).astype(dtype)
            _close(f(av, bv), av.astype(np.float64) @ bv, dtype)
            want = vector if dtype == "float32" else vector.replace("float", "double").replace(
                vector.split()[0][1:], str(int(vector.split()[0][1:]) // 2))
            assert want in f.source, (n, k, m, dtype)
            assert f.program.info["target"]["isa"] == tune.isa()


def _blas_threads_now():
    from graphc.backends.llvm import jit
    lib = jit.blas()["lib"]
    fn = next(getattr(lib, s) for s in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads")
              if hasattr(lib, s))
    return fn()


def test_blas_thread_count_set_per_call_and_restored(rng, monkeypatch, cache_dir):
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None or tune.set_threads_symbol() is None:
        pytest.skip("no OpenBLAS with openblas_set_num_threads_local")
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    before = _blas_threads_now()
    monkeypatch.setattr(tune, "BLAS_PARALLEL_FLOPS", 1 << 62)      # one thread: one BLAS call, OpenBLAS on 1
    f, _, xv, ref = _product(rng, 64, 256, 300, "float32", False)   # above SMALL_MACS: BLAS
    _close(f(xv), ref, "float32")
    assert "call i32 @gc_blas_set_threads(i32 1)" in f.source and "call void @gc_pool_run" not in f.source
    assert _blas_threads_now() == before
    monkeypatch.setattr(tune, "BLAS_PARALLEL_FLOPS", 0)             # split over the pool: OpenBLAS on 1 per block
    f, _, xv, ref = _product(rng, 64, 256, 300, "float32", True)
    _close(f(xv), ref, "float32")
    assert "call i32 @gc_blas_set_threads(i32 1)" in f.source
    assert ("call void @gc_pool_run" in f.source) == (tune.max_blas_threads() > 1)
    assert _blas_threads_now() == before
    assert f.program.info["target"]["gemm"]["products"] == [
        f"64x256x300 float32: {tune.max_blas_threads()} thread{'s' * (tune.max_blas_threads() > 1)} (rule)"]


def test_tuner_measures_once_then_reads_the_cache(rng, monkeypatch, cache_dir):
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None or tune.set_threads_symbol() is None or tune.max_blas_threads() < 2:
        pytest.skip("nothing to tune: one BLAS thread")
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.setattr(tune, "log", [])
    monkeypatch.setattr(tune, "_busy", lambda: False)   # a quiet machine: the decision is stored
    # ... whichever way it goes (a one-thread choice is otherwise stored only when won by PERSIST_MARGIN:
    # beside another test worker the split may lose narrowly, and the next plan would time it again)
    monkeypatch.setattr(tune, "PERSIST_MARGIN", 1.0)
    f, _, xv, ref = _product(rng, 64, 256, 320, "float32", False)
    _close(f(xv), ref, "float32")
    (kind, shape, chosen, source), = tune.log
    assert (kind, shape, source) == ("blas", (64, 256, 320, "float32"), "tuned") and chosen in (1, 2)
    assert ("call void @gc_pool_run" in f.source) == (chosen > 1)
    assert list((cache_dir / "tune").iterdir())
    monkeypatch.setattr(tune, "_memo", {})            # a new process: the decision comes from disk
    f2, _, xv, ref = _product(rng, 64, 256, 320, "float32", True)
    _close(f2(xv), ref, "float32")
    assert tune.log[-1] == ("blas", (64, 256, 320, "float32"), chosen, "cache")
    assert f2.program.info["target"]["gemm"]["products"] == [
        f"64x256x320 float32: {chosen} thread{'s' * (chosen > 1)} (cache)"]
    monkeypatch.setenv("GRAPHC_TUNE", "off")          # off: the size rule, nothing read or measured
    monkeypatch.setattr(tune, "_memo", {})
    f3, _, xv, ref = _product(rng, 64, 256, 320, "float32", False)
    _close(f3(xv), ref, "float32")
    rule = tune.blas_threads(2 * 64 * 256 * 320)
    assert f3.program.info["target"]["gemm"]["products"] == [f"64x256x320 float32: {rule} thread{'s' * (rule > 1)} (rule)"]
    assert f3.program.info["target"]["tune"] == {"mode": "off", "budget_s": 0.0}


def test_tuner_respects_its_budget(rng, monkeypatch, cache_dir):
    from graphc.backends.llvm import jit, tune
    if jit.blas() is None or tune.set_threads_symbol() is None or tune.max_blas_threads() < 2:
        pytest.skip("nothing to tune: one BLAS thread")
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.setitem(tune.BUDGET, "quick", 0.0)     # spent before it starts: every product by the rule
    f, _, xv, ref = _product(rng, 40, 400, 300, "float32", False)
    _close(f(xv), ref, "float32")
    rule = tune.blas_threads(2 * 40 * 400 * 300)
    assert f.program.info["target"]["gemm"]["products"] == [f"40x400x300 float32: {rule} thread{'s' * (rule > 1)} (rule)"]
    assert not (cache_dir / "tune").exists() or not list((cache_dir / "tune").iterdir())


def test_target_info_names_the_host(monkeypatch):
    from graphc.backends.llvm import jit, tune
    x = gc.placeholder("x", (3,))
    info = gc.function([x], x * 2, backend="llvm").program.info["target"]
    feats = jit.cpu_features()
    assert info["cpu"] == jit._state["cpu"]
    want = "avx512" if "+avx512f" in feats else "avx2+fma" if "+avx2" in feats and "+fma" in feats else None
    if want:
        assert info["isa"] == want
    assert info["vector_bits"] == {"avx512": 512, "avx2+fma": 256, "avx": 256}.get(info["isa"], 128)
    assert set(info) >= {"features", "threads", "gemm", "elementwise", "tune"}
    monkeypatch.setenv("GRAPHC_TUNE", "bogus")
    assert tune.mode() == "quick"


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape,axes", [((2, 17, 63), (1, 0, 2)), ((3, 5, 2, 65), (2, 0, 1, 3)),
                                        ((3, 1, 4, 17), (1, 2, 0, 3)), ((1, 3, 17), (1, 0, 2))])
def test_product_of_a_transposed_activation_is_one_gemm(rng, threads, dtype, shape, axes):
    """(batch..., n, k) @ W where the activation is a transposed view (an ONNX export's (seq, batch, d) of a
    (batch, seq, d) input): the product is written in the rows' memory order (llvm plan._row_order) and
    everything reading it (a bias, a second product, the output) sees the right values."""
    x = gc.placeholder("x", shape, dtype=dtype)
    k = shape[-1]
    wv = rng.standard_normal((k, 19)).astype(dtype)
    bv = rng.standard_normal(19).astype(dtype)
    w2v = rng.standard_normal((19, 5)).astype(dtype)
    xt = gc.transpose(x, axes)
    h = xt @ gc.parameter("w", wv) + gc.parameter("b", bv)
    y = gc.relu(h) @ gc.parameter("w2", w2v)
    f = gc.function([x], [y, xt @ gc.parameter("w3", wv)], backend="llvm")
    xv = rng.standard_normal(shape).astype(dtype)
    x64 = np.transpose(xv.astype(np.float64), axes)
    h64 = x64 @ wv.astype(np.float64) + bv.astype(np.float64)
    want = [np.maximum(h64, 0) @ w2v.astype(np.float64), x64 @ wv.astype(np.float64)]
    tol = {"float16": 2e-2}.get(dtype, TOL.get(dtype))
    for g_, w_ in zip(f(xv), want):
        assert g_.shape == w_.shape and g_.dtype == np.dtype(dtype)
        scale = max(1.0, float(np.max(np.abs(w_))))
        np.testing.assert_allclose(g_.astype(np.float64), w_, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 9, 16])
def test_tile_shape_by_row_count(rng, monkeypatch, threads, isa, n):
    """Few rows (an LSTM part's 8): a tile one vector wider where the usual tiles hold too few accumulators
    (gemm.tile_vectors), equal to float64 references at odd column counts, split over the pool or not."""
    from graphc.backends.llvm import gemm
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)
    nv, rows = gemm.tile_vectors(n, "float32")
    base = gemm.vector_shape("float32")[1]
    assert nv == (base + 1 if isa == "avx2" and n in (2, 3, 4, 7, 8) else base), (isa, n, nv)
    for k, m in [(1, 17), (17, 63), (128, 65), (65, 257)]:
        for dtype in ("float32", "float64"):
            a = gc.placeholder("a", (n, k), dtype)
            wv = rng.standard_normal((k, m)).astype(dtype)
            f = gc.function([a], a @ gc.parameter("w", wv), backend="llvm")
            av = rng.standard_normal((n, k)).astype(dtype)
            _close(f(av), av.astype(np.float64) @ wv.astype(np.float64), dtype)
