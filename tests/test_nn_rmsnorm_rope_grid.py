"""gc.rms_norm / gc.nn.RMSNorm, gc.grid_sample, gc.affine_grid against torch (forward and gradients),
gc.rotary_embedding against the ONNX reference evaluator, half-precision runs on the native backends,
and the errors a bad call raises. (The op-table rows in tests/cases_nn.py check every backend against
loop references and the gradients by finite differences.)"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import graphc as gc
from graphc.errors import GraphcError, ShapeError
from conftest import backend_or_skip

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _run(fn, *arrays, backend="numpy"):
    phs = [gc.placeholder(f"a{i}", a.shape, a.dtype.name) for i, a in enumerate(arrays)]
    out = fn(*phs)
    f = gc.function(phs, out, backend=backend)
    return np.asarray(f(*arrays))


def _grads(fn, *arrays):
    """graphc gradients of sum(fn(...) * r) for a fixed random r."""
    phs = [gc.placeholder(f"a{i}", a.shape, a.dtype.name) for i, a in enumerate(arrays)]
    out = fn(*phs)
    r = np.random.default_rng(7).standard_normal(tuple(out.shape))
    loss = gc.sum(out * gc.constant(r))
    gs = gc.grad(loss, phs)
    return [np.asarray(g) for g in gc.function(phs, list(gs), backend="numpy")(*arrays)], r


def _torch_grads(fn, r, *arrays):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    (fn(*ts) * torch.tensor(r)).sum().backward()
    return [t.grad.numpy() for t in ts]


# ---- rms_norm ----

@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_matches_torch_with_gradients(eps, rng):
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((4, 5))
    got = _run(lambda a, b: gc.rms_norm(a, (4, 5), b, eps), x, w)
    want = F.rms_norm(torch.tensor(x), (4, 5), torch.tensor(w), eps).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    (gx, gw), r = _grads(lambda a, b: gc.rms_norm(a, (4, 5), b, eps), x, w)
    tx, tw = _torch_grads(lambda a, b: F.rms_norm(a, (4, 5), b, eps), r, x, w)
    np.testing.assert_allclose(gx, tx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, tw, rtol=1e-10, atol=1e-12)


def test_rmsnorm_layer_loads_torch_state_dict(rng):
    tm = torch.nn.RMSNorm(6)
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(rng.standard_normal(6), dtype=torch.float32))
    m = gc.nn.RMSNorm(6)
    m.load_state_dict(tm.state_dict())
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    got = _run(lambda a: m(a), x)
    np.testing.assert_allclose(got, tm(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert "RMSNorm((6,)" in repr(m)


# ---- grid_sample / affine_grid ----

GRID_PARAMS = [(k, mode, pad, align) for k in (2, 3) for mode in ("bilinear", "nearest", "bicubic")
               for pad in ("zeros", "border", "reflection") for align in (False, True)
               if not (k == 3 and mode == "bicubic")]


@pytest.mark.parametrize("k,mode,pad,align", GRID_PARAMS)
def test_grid_sample_matches_torch_with_gradients(k, mode, pad, align, rng):
    x = rng.standard_normal((2, 2) + ((3, 4) if k == 2 else (2, 3, 4)))
    grid = rng.uniform(-1.3, 1.3, (2,) + ((2, 3) if k == 2 else (2, 2, 3)) + (k,))
    fn = lambda a, g: gc.grid_sample(a, g, mode, pad, align)      # noqa: E731
    tfn = lambda a, g: F.grid_sample(a, g, mode, pad, align)     # noqa: E731
    want = tfn(torch.tensor(x), torch.tensor(grid)).numpy()
    np.testing.assert_allclose(_run(fn, x, grid), want, rtol=1e-10, atol=1e-12)
    (gx, gg), r = _grads(fn, x, grid)
    tx, tg = _torch_grads(tfn, r, x, grid)
    np.testing.assert_allclose(gx, tx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gg, tg, rtol=1e-8, atol=1e-10)


def test_grid_sample_volumetric_finite_differences(rng):
    x = rng.standard_normal((1, 2, 2, 3, 3))
    grid = rng.uniform(-1.2, 1.2, (1, 2, 2, 2, 3))
    gc.verify_grad(lambda a, g: gc.grid_sample(a, g, "bilinear", "reflection", False), [x, grid], rng=1)


@pytest.mark.parametrize("k,align", itertools.product((2, 3), (False, True)))
def test_affine_grid_matches_torch(k, align, rng):
    theta = rng.standard_normal((2, k, k + 1))
    size = (2, 3, 4, 5) if k == 2 else (2, 3, 2, 4, 5)
    got = _run(lambda t: gc.affine_grid(t, size, align), theta)
    want = F.affine_grid(torch.tensor(theta), size, align_corners=align).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_spatial_transformer_trains_theta(rng):
    """affine_grid + grid_sample end to end: the gradient reaches theta and matches torch."""
    x, theta = rng.standard_normal((2, 1, 5, 5)), rng.standard_normal((2, 2, 3)) * 0.5
    fn = lambda t: gc.grid_sample(gc.constant(x), gc.affine_grid(t, x.shape), "bilinear", "zeros")  # noqa: E731
    (gt,), r = _grads(fn, theta)
    (tt,) = _torch_grads(lambda t: F.grid_sample(torch.tensor(x), F.affine_grid(t, x.shape, align_corners=False),
                                                 align_corners=False), r, theta)
    np.testing.assert_allclose(gt, tt, rtol=1e-8, atol=1e-10)


# ---- rotary_embedding ----

@pytest.mark.parametrize("interleaved,rd,three_d", [(False, None, False), (True, None, True), (False, 4, True),
                                                    (True, 4, False)])
def test_rotary_embedding_matches_onnx_reference(interleaved, rd, three_d, rng):
    pytest.importorskip("onnx")
    from onnx import helper
    from onnx.reference import ReferenceEvaluator
    b, h, s, d, p = 2, 2, 3, 6, 5
    x = rng.standard_normal((b, s, h * d) if three_d else (b, h, s, d)).astype(np.float32)
    half = (rd or d) // 2
    cos, sin = (rng.standard_normal((p, half)).astype(np.float32) for _ in range(2))
    pos = rng.integers(0, p, (b, s)).astype(np.int64)
    attrs = {"interleaved": int(interleaved)}
    if rd:
        attrs["rotary_embedding_dim"] = rd
    if three_d:
        attrs["num_heads"] = h
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], **attrs)
    vi = lambda n, a: helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)  # noqa: E731
    g = helper.make_graph([node], "rope", [vi("x", x), vi("cos", cos), vi("sin", sin), vi("pos", pos)],
                          [vi("y", x)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    want = ReferenceEvaluator(m).run(None, {"x": x, "cos": cos, "sin": sin, "pos": pos})[0]
    got = _run(lambda a, c, sn, q: gc.rotary_embedding(a, c, sn, q, interleaved, rd, h if three_d else None),
               x, cos, sin, pos)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---- half precision on the native backends ----

@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(backend, dtype, rng):
    backend_or_skip(backend)
    from graphc.dtypes import np_dtype
    dt = np_dtype(dtype)
    x = rng.standard_normal((2, 2, 3, 4)).astype(dt)
    grid = rng.uniform(-1.1, 1.1, (2, 3, 2, 2)).astype(dt)
    w = rng.standard_normal(4).astype(dt)
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    got = _run(lambda a, g: gc.grid_sample(a, g, "bilinear", "border"), x, grid, backend=backend)
    assert got.dtype == dt
    want = F.grid_sample(torch.tensor(x.astype(np.float32)), torch.tensor(grid.astype(np.float32)),
                         "bilinear", "border", False).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=tol, atol=tol)
    got = _run(lambda a, b: gc.rms_norm(a, 4, b, 1e-5), x, w, backend=backend)
    want = F.rms_norm(torch.tensor(x.astype(np.float32)), (4,), torch.tensor(w.astype(np.float32)), 1e-5).numpy()
    assert got.dtype == dt
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=tol, atol=tol)


# ---- errors ----

def test_bad_calls_raise_graphc_errors():
    x = gc.placeholder("x", (1, 2, 3, 4))
    with pytest.raises(GraphcError, match="mode must be"):
        gc.grid_sample(x, gc.placeholder("g", (1, 2, 2, 2)), mode="area")
    with pytest.raises(GraphcError, match="padding_mode"):
        gc.grid_sample(x, gc.placeholder("g", (1, 2, 2, 2)), padding_mode="wrap")
    with pytest.raises(ShapeError, match="grid of shape"):
        gc.grid_sample(x, gc.placeholder("g", (1, 2, 2, 3)))
    with pytest.raises(ShapeError, match="trailing dims"):
        gc.rms_norm(x, (3,))
    with pytest.raises(ShapeError, match="rotary_dim"):
        gc.rotary_embedding(x, gc.placeholder("c", (1, 2, 2)), gc.placeholder("s", (1, 2, 2)), rotary_dim=3)
    with pytest.raises(ShapeError, match="theta"):
        gc.affine_grid(gc.placeholder("t", (1, 2, 2)), (1, 1, 3, 3))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_grid_sample_symbolic_batch(backend, rng):
    """A (None, C, H, W) input: one compiled function serves every batch size, gradients included."""
    backend_or_skip(backend)
    xs, gs = gc.placeholder("x", (None, 2, 3, 4), "float64"), gc.placeholder("g", (None, 2, 3, 2), "float64")
    y = gc.grid_sample(xs, gs, "bicubic", "border", True)
    gx, gg = gc.grad(gc.sum(y * y), [xs, gs])
    f = gc.function([xs, gs], [y, gx, gg], backend=backend)
    for n in (1, 3):
        x, grid = rng.standard_normal((n, 2, 3, 4)), rng.uniform(-1.2, 1.2, (n, 2, 3, 2))
        out, dx, dg = f(x, grid)
        tx, tg = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
        ty = F.grid_sample(tx, tg, "bicubic", "border", True)
        (ty * ty).sum().backward()
        np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dg, tg.grad.numpy(), rtol=1e-8, atol=1e-10)
