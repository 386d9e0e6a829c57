"""The micro-kernel product and the elementwise region reading it as one kernel (backends/llvm/recurrent.py),
and the register tiles (backends/llvm/gemm.py: gemm_tiles, gemm_block), against NumPy and torch:
odd sizes, both ISAs' tile shapes (GRAPHC_LLVM_ISA=avx2 / avx512 forced), one and two threads."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, plan_steps

pytestmark = pytest.mark.usefixtures("llvm")

SIZES = (1, 3, 17, 63, 65)


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """The fused kernel is opt-in (GRAPHC_LLVM_FUSE_EPILOGUE=1): on for these tests. The tuner is off: where
    it times BLAS faster than the micro-kernel (the AVX-512 one run in halves on an AVX2 host) the product
    is a BLAS call and has no epilogue to fuse; these tests are about the micro-kernel's fusion."""
    monkeypatch.setenv("GRAPHC_LLVM_FUSE_EPILOGUE", "1")
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "0")   # a weight outside loops would be packed (no column windows)


def _kernels(f, *args) -> list[str]:
    """Names of the kernel steps of f's specialisation for args (loop bodies included)."""
    f(*args)
    return [getattr(st, "name", type(st).__name__) for st in plan_steps(f)]


def _sig(x):
    return 1 / (1 + np.exp(-x))


# ---- register tiles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tile_product_odd_sizes(isa, threads, rng, monkeypatch, dtype):
    """Every float product on the micro-kernel (GRAPHC_LLVM_SMALL_GEMM=1): partial row tiles, masked
    partial vectors, the column-block split."""
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    tol = 1e-4 if dtype == "float32" else 1e-11
    for n, k, m in [(1, 3, 17), (3, 17, 63), (17, 65, 3), (63, 1, 65), (65, 63, 1), (17, 17, 257), (16, 128, 512)]:
        a = rng.standard_normal((n, k)).astype(dtype)
        b = rng.standard_normal((k, m)).astype(dtype)
        pa, pb = gc.placeholder("a", (n, k), dtype), gc.placeholder("b", (k, m), dtype)
        f = gc.function([pa, pb], pa @ pb, backend="llvm")
        np.testing.assert_allclose(f(a, b), a.astype(np.float64) @ b, rtol=tol, atol=tol * max(1, k) ** 0.5)


@pytest.mark.parametrize("nv", [1, 2, 3, 4])
def test_gemm_block_columns(isa, rng, nv):
    """gemm_block writes exactly the columns j0 .. j0+width-1 (a dynamic j0, any width, tiles of nv
    vectors), nothing else: a kernel built from it directly, run through llvmlite."""
    import ctypes

    from graphc.backends.llvm import gemm, jit
    from graphc.backends.llvm.irtext import Emitter
    from graphc.backends.schedule.views import View
    n, k, m = 17, 19, 67
    for j0, width in [(0, 1), (3, 17), (5, 62), (0, 67), (40, 27)]:
        a = rng.standard_normal((n, k)).astype(np.float32)
        b = rng.standard_normal((k, m)).astype(np.float32)
        out = np.full((n, m), 7.0, np.float32)
        A, B, C = (View(i, 0, x.shape, (x.shape[1], 1), "float32") for i, x in enumerate((a, b, out)))
        em = Emitter()
        P = {0: "%a", 1: "%b", 2: "%c"}
        gemm.gemm_block(em, P, C, A, B, "0", "0", "0", n, k, m, "%j0", width, nv)
        fn = em.function("define void @blk(ptr noalias %a, ptr noalias %b, ptr noalias %c, i64 %j0) nounwind")
        compiled = jit.compile_ir(gemm.vector_declarations() + fn, ["blk"])
        cf = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int64)(compiled.addresses["blk"])
        cf(a.ctypes.data, b.ctypes.data, out.ctypes.data, j0)
        want = np.full((n, m), 7.0, np.float32)
        want[:, j0:j0 + width] = (a.astype(np.float64) @ b)[:, j0:j0 + width]
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


# ---- product + epilogue in one kernel --------------------------------------------------------------------

def _lstm_cell(h, c, gx, w, bias, H):
    z = h @ w
    zz = [gx[:, g * H:(g + 1) * H] + z[:, g * H:(g + 1) * H] + bias[g * H:(g + 1) * H] for g in range(4)]
    i, f, g, o = gc.sigmoid(zz[0]), gc.sigmoid(zz[1]), gc.tanh(zz[2]), gc.sigmoid(zz[3])
    c2 = f * c + i * g
    return o * gc.tanh(c2), c2


def _lstm_cell_ref(h, c, gx, w, bias, H):
    z = gx.astype(np.float64) + h.astype(np.float64) @ w + bias
    i, f, g, o = _sig(z[:, :H]), _sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), _sig(z[:, 3 * H:])
    c2 = f * c + i * g
    return o * np.tanh(c2), c2


@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("H", SIZES)
def test_gates_fused_with_product_odd_sizes(isa, threads, rng, n, H):
    """An LSTM cell's step: the product and the gate loop (reading the product by four column windows)
    are one kernel, equal to NumPy at odd batch and hidden sizes (partial blocks, masked vectors)."""
    k = 2 * H + 1
    h, c = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((n, H)).astype(np.float32)
    gx = rng.standard_normal((n, 4 * H)).astype(np.float32)
    w = (rng.standard_normal((k, 4 * H)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(4 * H).astype(np.float32)
    ph, pc, pg = gc.placeholder("h", (n, k)), gc.placeholder("c", (n, H)), gc.placeholder("gx", (n, 4 * H))
    pw, pb = gc.parameter("w", w), gc.parameter("b", bias)
    f = gc.function([ph, pc, pg], list(_lstm_cell(ph, pc, pg, pw, pb, H)), backend="llvm")
    got = f(h, c, gx)
    want = _lstm_cell_ref(h, c, gx, w, bias, H)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=2e-5, atol=2e-5)
    if n >= 2 and 4 * H >= 8:   # the micro-kernel's range (gemm.small): there the two are one kernel
        kinds = _kernels(f, h, c, gx)
        assert "matmul_epilogue" in kinds and "matmul" not in kinds, kinds


def test_single_window_epilogue_and_unfused_cases(isa, threads, rng, monkeypatch):
    """tanh(h @ W + b) (one window, the whole product) is one kernel; a region reading only part of the
    product's columns, or GRAPHC_LLVM_FUSE_EPILOGUE unset (the default), keeps two; all equal to NumPy."""
    n, k, m = 17, 63, 65
    h = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((k, m)) / 8).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    ph, pw, pb = gc.placeholder("h", (n, k)), gc.parameter("w", w), gc.parameter("b", b)
    ref = h.astype(np.float64) @ w
    f = gc.function([ph], gc.tanh(ph @ pw + pb), backend="llvm")
    np.testing.assert_allclose(f(h), np.tanh(ref + b), rtol=2e-5, atol=2e-5)
    assert "matmul_epilogue" in _kernels(f, h)
    # part of the columns: not a tiling of the product
    z = ph @ pw
    g = gc.function([ph], gc.sigmoid(z[:, :32]) * z[:, 32:64], backend="llvm")
    np.testing.assert_allclose(g(h), _sig(ref[:, :32]) * ref[:, 32:64], rtol=2e-5, atol=2e-5)
    assert "matmul_epilogue" not in _kernels(g, h)
    monkeypatch.delenv("GRAPHC_LLVM_FUSE_EPILOGUE")
    f2 = gc.function([ph], gc.tanh(ph @ pw + pb), backend="llvm")
    np.testing.assert_allclose(f2(h), np.tanh(ref + b), rtol=2e-5, atol=2e-5)
    assert "matmul_epilogue" not in _kernels(f2, h)


def test_product_read_after_the_region_is_whole(isa, threads, rng):
    """The fused kernel still writes the whole product: a later reader (here a root) sees it complete."""
    n, k, H = 5, 17, 19
    h = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((k, 2 * H)).astype(np.float32)
    ph, pw = gc.placeholder("h", (n, k)), gc.parameter("w", w)
    z = ph @ pw
    f = gc.function([ph], [gc.sigmoid(z[:, :H]) * gc.tanh(z[:, H:]), gc.sum(z, 1)], backend="llvm")
    ref = h.astype(np.float64) @ w
    y, s = f(h)
    np.testing.assert_allclose(y, _sig(ref[:, :H]) * np.tanh(ref[:, H:]), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(s, ref.sum(1), rtol=1e-4, atol=1e-4)


# ---- whole layers against torch ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_layer_forward_and_grad_vs_torch(isa, threads, kind):
    """LSTM/GRU forward (last state) and the input/weight gradients of a loss on it, against torch."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    N, T, C, H = 3, 5, 7, 17
    ref = getattr(torch.nn, kind)(C, H, batch_first=True)
    layer = getattr(gc.nn, kind)(C, H)
    layer.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((N, T, C)).astype(np.float32)
    px = gc.placeholder("x", (N, T, C))
    _, st = layer(px)
    h = st[0] if kind == "LSTM" else st
    loss = gc.sum(gc.tanh(h[0]) * gc.tanh(h[0]))
    w_hh = layer.named_params["weight_hh_l0"]
    gx, gw = gc.grad(loss, [px, w_hh])
    f = gc.function([px], [h[0], gx, gw], backend="llvm")
    got = f(x)
    tx = torch.tensor(x, requires_grad=True)
    _, tst = ref(tx)
    th = (tst[0] if kind == "LSTM" else tst)[0]
    tl = (torch.tanh(th) ** 2).sum()
    tl.backward()
    np.testing.assert_allclose(got[0], th.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], tx.grad.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got[2], ref.weight_hh_l0.grad.numpy(), rtol=1e-3, atol=1e-5)


def test_fused_epilogue_float64(isa, threads, rng):
    """float64: 4 (AVX2) or 8 (AVX-512) lanes a vector, the same blocks; a GRU-like cell with three windows."""
    n, k, H = 17, 67, 65
    h = rng.standard_normal((n, k))
    w = rng.standard_normal((k, 3 * H)) / 6
    ph, pw = gc.placeholder("h", (n, k), "float64"), gc.parameter("w", w)
    z = ph @ pw
    r, u = gc.sigmoid(z[:, :H]), gc.sigmoid(z[:, H:2 * H])
    f = gc.function([ph], (1 - u) * gc.tanh(r * z[:, 2 * H:]) + u * ph[:, :H], backend="llvm")
    ref = h @ w
    r_, u_ = _sig(ref[:, :H]), _sig(ref[:, H:2 * H])
    np.testing.assert_allclose(f(h), (1 - u_) * np.tanh(r_ * ref[:, 2 * H:]) + u_ * h[:, :H], rtol=1e-12, atol=1e-12)
    assert "matmul_epilogue" in _kernels(f, h)


def test_fused_kernel_clean_under_bounds_checks(rng):
    """sanitize="bounds": every access of the fused kernel (tiles, masked vectors, the region) checked,
    none out of its buffer, the result unchanged."""
    n, k, H = 3, 17, 17
    h, c = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((n, H)).astype(np.float32)
    gx = rng.standard_normal((n, 4 * H)).astype(np.float32)
    w = (rng.standard_normal((k, 4 * H)) / 4).astype(np.float32)
    bias = rng.standard_normal(4 * H).astype(np.float32)
    ph, pc, pg = gc.placeholder("h", (n, k)), gc.placeholder("c", (n, H)), gc.placeholder("gx", (n, 4 * H))
    f = gc.function([ph, pc, pg], list(_lstm_cell(ph, pc, pg, gc.parameter("w", w), gc.parameter("b", bias), H)),
                    backend="llvm", sanitize="bounds")
    for g_, w_ in zip(f(h, c, gx), _lstm_cell_ref(h, c, gx, w, bias, H)):
        np.testing.assert_allclose(g_, w_, rtol=2e-5, atol=2e-5)
    assert "matmul_epilogue" in _kernels(f, h, c, gx)
