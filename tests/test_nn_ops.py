"""NN ops against torch.nn.functional with the same weights (when torch is installed), symbolic
shapes, double backprop of convolution and pooling, and error messages."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

import graphc as gc
import op_table  # noqa: F401  (first: it collects cases_nn's rows)
from cases_nn import loop_conv2d

from conftest import TF, needs_torch, torch
from conftest import run_graph as _run


CONV_CONFIGS = [dict(stride=1, padding=0, dilation=1, groups=1), dict(stride=2, padding=1, dilation=1, groups=1),
                dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2), dict(stride=1, padding="same",
                                                                                     dilation=2, groups=4),
                dict(stride=1, padding="valid", dilation=1, groups=1)]


@needs_torch
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=[str(c) for c in CONV_CONFIGS])
def test_conv2d_matches_torch_forward_and_backward(cfg, rng):
    x = rng.standard_normal((3, 4, 9, 8))
    w = rng.standard_normal((8, 4 // cfg["groups"], 3, 3))
    b = rng.standard_normal(8)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = TF.conv2d(tx, tw, tb, **cfg)
    gy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(gy))
    xs, ws, bs = (gc.placeholder(n, a.shape, "float64") for n, a in (("x", x), ("w", w), ("b", b)))
    y = gc.conv2d(xs, ws, bs, **cfg)
    grads = gc.grad(gc.sum(y * gc.constant(gy)), [xs, ws, bs])
    out = gc.function([xs, ws, bs], [y] + grads)(x, w, b)
    np.testing.assert_allclose(out[0], ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    for got, t in zip(out[1:], (tx, tw, tb)):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-10, atol=1e-10)


@needs_torch
def test_conv1d_matches_torch(rng):
    x, b = rng.standard_normal((2, 4, 11)), rng.standard_normal(6)
    for wshape, cfg in (((6, 2, 3), dict(stride=2, padding=1, dilation=2, groups=2)), ((6, 4, 3), dict(padding="same"))):
        w = rng.standard_normal(wshape)
        want = TF.conv1d(torch.tensor(x), torch.tensor(w), torch.tensor(b), **cfg).numpy()
        np.testing.assert_allclose(_run(lambda a, c, d: gc.conv1d(a, c, d, **cfg), x, w, b), want, rtol=1e-10, atol=1e-10)


@needs_torch
@pytest.mark.parametrize("k,s,p", [(2, None, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 1)), (3, 1, 0)])
def test_pooling_matches_torch(k, s, p, rng):
    x = rng.standard_normal((2, 3, 7, 6))
    tx = torch.tensor(x, requires_grad=True)
    ty = TF.max_pool2d(tx, k, s, p)
    gy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(gy))
    xs = gc.placeholder("x", x.shape, "float64")
    y = gc.max_pool2d(xs, k, s, p)
    got_y, got_g = gc.function([xs], [y, gc.grad(gc.sum(y * gc.constant(gy)), xs)])(x)
    np.testing.assert_allclose(got_y, ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(got_g, tx.grad.numpy(), rtol=1e-12)
    for cip in (True, False):
        want = TF.avg_pool2d(torch.tensor(x), k, s, p, count_include_pad=cip).numpy()
        np.testing.assert_allclose(_run(lambda a: gc.avg_pool2d(a, k, s, p, cip), x), want, rtol=1e-10, atol=1e-12)
    xp = np.abs(x) + 0.1  # torch's lp_pool has no abs: compare on positive inputs
    want = TF.lp_pool2d(torch.tensor(xp), 2.0, k, s).numpy()
    np.testing.assert_allclose(_run(lambda a: gc.lp_pool2d(a, 2, k, s), xp), want, rtol=1e-10)


@needs_torch
def test_activations_match_torch(rng):
    x = rng.standard_normal((4, 6)) * 3
    t = torch.tensor(x)
    pairs = [(gc.gelu, TF.gelu(t)), (lambda a: gc.gelu(a, "tanh"), TF.gelu(t, approximate="tanh")),
             (lambda a: gc.elu(a, 0.5), TF.elu(t, 0.5)), (gc.selu, TF.selu(t)), (gc.softplus, TF.softplus(t)),
             (lambda a: gc.leaky_relu(a, 0.1), TF.leaky_relu(t, 0.1)), (gc.heaviside, torch.heaviside(t, t * 0))]
    for fn, want in pairs:
        np.testing.assert_allclose(_run(fn, x), want.numpy(), rtol=1e-12, atol=1e-12)


@needs_torch
def test_normalisation_matches_torch(rng):
    x = rng.standard_normal((5, 3, 4, 4))
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    want = TF.batch_norm(torch.tensor(x), rm, rv, torch.tensor(g), torch.tensor(b), training=True, momentum=0.1)
    m = gc.parameter("rm", np.zeros(3), "float64")
    v = gc.parameter("rv", np.ones(3), "float64")
    got = _run(lambda a: gc.batch_norm(a, m, v, gc.constant(g), gc.constant(b), training=True), x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.value, rm.numpy(), rtol=1e-12)  # running stats: implicit updates
    np.testing.assert_allclose(v.value, rv.numpy(), rtol=1e-12)
    want = TF.batch_norm(torch.tensor(x), rm, rv, torch.tensor(g), torch.tensor(b), training=False)
    got = _run(lambda a: gc.batch_norm(a, m, v, gc.constant(g), gc.constant(b), training=False), x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
    gw, gb = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    want = TF.layer_norm(torch.tensor(x), (4, 4), torch.tensor(gw), torch.tensor(gb))
    got = _run(lambda a: gc.layer_norm(a, (4, 4), gc.constant(gw), gc.constant(gb)), x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


@needs_torch
def test_embedding_and_one_hot_match_torch(rng):
    w = rng.standard_normal((7, 3))
    idx = np.array([[0, 6, 2], [2, 2, 5]])
    tw = torch.tensor(w, requires_grad=True)
    ty = TF.embedding(torch.tensor(idx), tw)
    ty.sum().backward()
    ws = gc.placeholder("w", w.shape, "float64")
    y = gc.embedding(gc.constant(idx), ws)
    got, g = gc.function([ws], [y, gc.grad(gc.sum(y), ws)])(w)
    np.testing.assert_allclose(got, ty.detach().numpy())
    np.testing.assert_allclose(g, tw.grad.numpy())  # scatter-add: index 2 three times
    lab = np.array([3, 0, 1])
    np.testing.assert_array_equal(_run(lambda i: gc.one_hot(i, 5), lab), TF.one_hot(torch.tensor(lab), 5).numpy())


def test_conv_and_pool_output_sizes_are_symbolic():
    x = gc.placeholder("img", (None, 3, "H", "W"))
    y = gc.conv2d(x, gc.constant(np.zeros((4, 3, 3, 3), np.float32)), stride=2, padding=1)
    H, W = sympy.Symbol("H", integer=True, positive=True), sympy.Symbol("W", integer=True, positive=True)
    assert y.shape[0] == gc.shapes.dim_symbol("N")
    assert sympy.simplify(y.shape[2] - (sympy.floor((H - 1) / 2) + 1)) == 0
    p = gc.max_pool2d(gc.conv2d(x, gc.constant(np.zeros((4, 3, 3, 3), np.float32)), padding="same"), 2)
    assert sympy.simplify(p.shape[3] - (sympy.floor((W - 2) / 2) + 1)) == 0
    f = gc.function([x], [y, p])
    for n, h, w in ((1, 5, 6), (3, 8, 7)):
        a = np.random.default_rng(0).standard_normal((n, 3, h, w)).astype(np.float32)
        got_y, got_p = f(a)
        assert got_y.shape == (n, 4, (h - 1) // 2 + 1, (w - 1) // 2 + 1)
        assert got_p.shape == (n, 4, h // 2, w // 2)


def test_conv_double_backprop(rng):
    """The gradient of a conv's input gradient: conv2d_grad_input/weight differentiate again."""
    w = rng.standard_normal((2, 2, 3, 3))

    def fn(x):
        y = gc.conv2d(x, gc.constant(w), stride=2, padding=1)
        gx = gc.grad(gc.sum(gc.tanh(y)), x)
        return gc.sum(gx * gx)
    gc.verify_grad(fn, [rng.standard_normal((1, 2, 5, 5))], rtol=1e-5, atol=1e-8)

    def fn_w(wt):
        x = gc.constant(rng.standard_normal((2, 2, 5, 4)))
        gw = gc.grad(gc.sum(gc.conv2d(x, wt, padding=1) ** 2), wt)
        return gc.sum(gw * gw)
    gc.verify_grad(fn_w, [w], rtol=1e-5, atol=1e-8)


def test_conv_matches_loop_reference_float32(rng):
    x, w = rng.standard_normal((2, 3, 6, 6)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(lambda a, b: gc.conv2d(a, b, padding=1), x, w),
                               loop_conv2d(x, w, pads=((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    x = gc.placeholder("x", (None, 3, 8, 8))
    with pytest.raises(gc.ShapeError, match="3 channels"):
        gc.conv2d(x, gc.constant(np.zeros((4, 2, 3, 3), np.float32)))
    with pytest.raises(gc.ShapeError, match="larger than the padded input"):
        gc.conv2d(x, gc.constant(np.zeros((4, 3, 9, 9), np.float32)))
    with pytest.raises(gc.ShapeError, match="at most half the kernel"):
        gc.max_pool2d(x, 2, padding=2)
    with pytest.raises(gc.ShapeError, match="padding.*'full'"):  # 'full' is valid (issue 17): tests/test_conv3d.py
        gc.conv2d(x, gc.constant(np.zeros((4, 3, 3, 3), np.float32)), padding="fulll")
    with pytest.raises(gc.DTypeError, match="float"):
        gc.conv2d(gc.placeholder("i", (1, 3, 4, 4), "int64"), gc.constant(np.zeros((4, 3, 3, 3), np.int64)))
    with pytest.raises(gc.ShapeError, match="multiple of pieces"):
        gc.maxout(gc.placeholder("m", (2, 5)), 2)


def test_forward_mode_through_conv_and_pooling(rng):
    """gc.jvp (derived from the vjp rules) equals the central-difference directional derivative."""
    w = gc.constant(rng.standard_normal((3, 2, 3, 3)))

    def net(x):
        return gc.avg_pool2d(gc.max_pool2d(gc.tanh(gc.conv2d(x, w, stride=1, padding=1)), 2, 1), 2)
    a, t = rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((2, 2, 6, 6))
    x = gc.placeholder("x", a.shape, "float64")
    tx = gc.placeholder("tx", a.shape, "float64")
    f = gc.function([x], net(x))
    got = gc.function([x, tx], gc.jvp(net(x), x, tx))(a, t)
    eps = 1e-6
    np.testing.assert_allclose(got, (f(a + eps * t) - f(a - eps * t)) / (2 * eps), rtol=1e-6, atol=1e-8)
