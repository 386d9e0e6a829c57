"""Symbol-to-symbol differentiation: higher order, forward mode, training with gc.grad."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import assert_close


def _mlp_loss(w_flat, x, y, shapes=((3, 4), (4,), (4, 2))):
    """A small MLP loss of a flat weight vector (so Hessians are matrices)."""
    n1, n2 = 12, 16
    W1 = w_flat[:n1].reshape(3, 4)
    b1 = w_flat[n1:n2]
    W2 = w_flat[n2:].reshape(4, 2)
    h = gc.tanh(x @ W1 + b1)
    return gc.mean((h @ W2 - y) ** 2)


def _num_grad(f, w, eps=1e-6):
    g = np.zeros_like(w)
    for i in range(w.size):
        e = np.zeros_like(w)
        e[i] = eps
        g[i] = (f(w + e) - f(w - e)) / (2 * eps)
    return g


def test_hessian_of_mlp_loss_matches_finite_differences(rng):
    x = gc.constant(rng.standard_normal((5, 3)))
    y = gc.constant(rng.standard_normal((5, 2)))
    w = gc.placeholder("w", (24,), "float64")
    loss = _mlp_loss(w, x, y)
    g = gc.grad(loss, w)
    H = gc.hessian(loss, w)
    assert H.shape == (24, 24)
    fg, fH = gc.function([w], g), gc.function([w], H)
    w0 = rng.standard_normal(24) * 0.5
    Hnum = np.stack([_num_grad(lambda v: fg(v)[i], w0) for i in range(24)])
    np.testing.assert_allclose(fH(w0), Hnum, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fH(w0), fH(w0).T, atol=1e-12)


def test_hvp_equals_hessian_times_v(rng):
    x = gc.constant(rng.standard_normal((5, 3)))
    y = gc.constant(rng.standard_normal((5, 2)))
    w = gc.placeholder("w", (24,), "float64")
    v = gc.placeholder("v", (24,), "float64")
    loss = _mlp_loss(w, x, y)
    f = gc.function([w, v], [gc.hvp(loss, w, v), gc.hessian(loss, w) @ v])
    w0, v0 = rng.standard_normal(24), rng.standard_normal(24)
    hv, Hv = f(w0, v0)
    np.testing.assert_allclose(hv, Hv, rtol=1e-10, atol=1e-12)


def test_jvp_equals_jacobian_times_v_and_finite_differences(rng):
    x = gc.placeholder("x", (4,), "float64")
    W = gc.constant(rng.standard_normal((4, 3)))
    y = gc.softmax(gc.tanh(x @ W) * gc.sigmoid(x[:3]) + gc.log1p(x[1:] ** 2), axis=0)
    v = rng.standard_normal(4)
    f = gc.function([x], [gc.jvp(y, x, v), gc.jacobian(y, x) @ v, y])
    x0 = rng.standard_normal(4)
    jv, Jv, _ = f(x0)
    np.testing.assert_allclose(jv, Jv, rtol=1e-10, atol=1e-12)
    fy = gc.function([x], y)
    eps = 1e-6
    np.testing.assert_allclose(jv, (fy(x0 + eps * v) - fy(x0 - eps * v)) / (2 * eps), rtol=1e-6, atol=1e-9)


JVP_FNS = {
    "reduce_max": lambda x: gc.max(x * x, axis=0),
    "logsumexp": lambda x: gc.logsumexp(x, axis=1),
    "log_softmax": lambda x: gc.log_softmax(x, axis=1),
    "matmul_T": lambda x: x @ x.T,
    "index": lambda x: x[1:, ::2] * x[np.array([0, 0])][:2, :2],
    "concat_var": lambda x: gc.concatenate([gc.var(x, axis=1, keepdims=True), gc.prod(x, 1, keepdims=True)], 1),
    "where_pow": lambda x: gc.where(x > 0, x ** 3, gc.exp(x)) / (1 + gc.abs(x)),
}


@pytest.mark.parametrize("name", list(JVP_FNS))
def test_jvp_matches_reverse_mode(name, rng):
    fn = JVP_FNS[name]
    x = gc.placeholder("x", (3, 3), "float64")
    y = fn(x)
    v = rng.standard_normal((3, 3))
    J = gc.jacobian(y, x)
    f = gc.function([x], [gc.jvp(y, x, v), gc.sum(J * v, axis=(-2, -1))])
    x0 = rng.uniform(0.3, 1.5, (3, 3)) * rng.choice([-1, 1], (3, 3))
    a, b = f(x0)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_double_grad_and_gradient_penalty_training(rng):
    # gradient penalty: loss = mse + lambda * ||d out / d x||^2, trained with gc.grad of it
    x = gc.placeholder("x", (None, 2), "float64")
    t = gc.placeholder("t", (None,), "float64")
    W = gc.parameter("W", rng.standard_normal((2, 8)) * 0.5)
    v = gc.parameter("v", rng.standard_normal(8) * 0.5)
    out = gc.tanh(x @ W) @ v
    gx = gc.grad(gc.sum(out), x)
    loss = gc.mean((out - t) ** 2) + 0.01 * gc.mean(gc.sum(gx * gx, axis=1))
    gW, gv = gc.grad(loss, [W, v])
    step = gc.function([x, t], loss, updates=[(W, W - 0.2 * gW), (v, v - 0.2 * gv)])
    X = rng.standard_normal((64, 2))
    T = np.sin(X[:, 0]) * 0.5
    losses = [float(step(X, T)) for _ in range(200)]
    assert losses[-1] < 0.3 * losses[0]
    gc.verify_grad(lambda w: gc.sum(gc.grad(gc.sum(gc.tanh(gc.constant(X[:4]) @ w)), w) ** 2),
                   [rng.standard_normal((2, 3))])


def test_grad_of_grad_sum():
    x = gc.placeholder("x", (5,), "float64")
    g2 = gc.grad(gc.grad(gc.sum(x ** 3), x).sum(), x)
    a = np.linspace(-1, 1, 5)
    np.testing.assert_allclose(gc.function([x], g2)(a), 6 * a)


def _numpy_mlp_grads(X, Y, W1, b1, W2, b2):
    """Hand-written backprop for softmax cross-entropy through one tanh layer (the independent reference)."""
    h = np.tanh(X @ W1 + b1)
    z = h @ W2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = X.shape[0]
    loss = -np.mean(np.log(p[np.arange(n), Y]))
    dz = p.copy()
    dz[np.arange(n), Y] -= 1
    dz /= n
    dW2, db2 = h.T @ dz, dz.sum(0)
    dh = dz @ W2.T * (1 - h * h)
    return loss, [X.T @ dh, dh.sum(0), dW2, db2]


def _data(rng, n=120):
    X = rng.standard_normal((n, 4))
    Y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 1)
    return X, Y


def test_mlp_training_matches_numpy_backprop(backend, rng):
    X, Y = _data(rng)
    init = [rng.standard_normal((4, 16)) * 0.5, np.zeros(16), rng.standard_normal((16, 3)) * 0.5, np.zeros(3)]
    x = gc.placeholder("x", (None, 4), "float64")
    y = gc.placeholder("y", (None,), "int64")
    W1, b1, W2, b2 = params = [gc.parameter(n, v) for n, v in zip(["W1", "b1", "W2", "b2"], init)]
    logits = gc.tanh(x @ W1 + b1) @ W2 + b2
    n = gc.size_of(x, (0,), "float64")
    onehot = gc.cast(gc.equal(gc.expand_dims(y, 1), gc.constant(np.arange(3))), "float64")
    loss = -gc.sum(gc.log_softmax(logits, axis=1) * onehot) / n
    grads = gc.grad(loss, params)
    fg = gc.function([x, y], [loss] + grads, backend=backend)
    got = fg(X, Y)
    want_loss, want = _numpy_mlp_grads(X, Y, *init)
    assert_close(got[0], want_loss, "float64", backend, rtol=1e-10)
    for g, w in zip(got[1:], want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    step = gc.function([x, y], loss, updates=[(p, p - 0.5 * g) for p, g in zip(params, grads)], backend=backend)
    first = float(step(X, Y))
    for _ in range(100):
        last = float(step(X, Y))
    assert last < 0.5 * first


def test_logistic_regression_trains_and_matches_numpy(rng):
    X, Y = _data(rng)
    Y = (Y > 0).astype(np.float64)
    x = gc.placeholder("x", (None, 4), "float64")
    y = gc.placeholder("y", (None,), "float64")
    w = gc.parameter("w", np.zeros(4))
    b = gc.parameter("b", np.zeros(()))
    z = x @ w + b
    loss = gc.mean(gc.softplus(z) - y * z)  # binary cross-entropy from logits
    gw, gb = gc.grad(loss, [w, b])
    f = gc.function([x, y], [gw, gb])
    w0 = rng.standard_normal(4)
    w.set_value(w0)
    p = 1 / (1 + np.exp(-(X @ w0)))
    np.testing.assert_allclose(f(X, Y)[0], X.T @ (p - Y) / len(X), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(f(X, Y)[1], np.mean(p - Y), rtol=1e-10, atol=1e-14)
    step = gc.function([x, y], loss, updates=[(w, w - 1.0 * gw), (b, b - 1.0 * gb)])
    first = float(step(X, Y))
    for _ in range(50):
        last = float(step(X, Y))
    assert last < 0.8 * first


def test_gradient_is_a_printable_graph(capsys):
    x = gc.placeholder("x", (None, 3))
    W = gc.parameter("W", np.ones((3, 2), np.float32))
    gW = gc.grad(gc.sum(gc.tanh(x @ W)), W)
    text = gc.dprint(gW)
    assert "matmul" in text and "tanh" in text and gW.shape == (3, 2) and gW.dtype == "float32"


def test_known_grads_and_consider_constant(rng):
    x = gc.placeholder("x", (3,), "float64")
    h = gc.exp(x)
    g = gc.grad(None, x, known_grads={h: gc.constant(np.ones(3))})
    a = rng.standard_normal(3)
    np.testing.assert_allclose(gc.function([x], g)(a), np.exp(a))
    y = h * x
    g2 = gc.grad(gc.sum(y), x, consider_constant=[h])
    np.testing.assert_allclose(gc.function([x], g2)(a), np.exp(a))


def test_verify_grad_reports_the_worst_element():
    # stop_gradient hides part of the derivative, so the symbolic gradient is wrong on purpose
    with pytest.raises(gc.GradientCheckError, match=r"input 0 .* at index"):
        gc.verify_grad(lambda x: gc.stop_gradient(x) * x, [np.array([1.0, 2.0, 3.0])])


def test_integer_paths_give_zero_and_fused_nodes_refuse_clearly():
    x = gc.placeholder("x", (3,), "float64")
    g = gc.grad(gc.sum(gc.cast(gc.cast(x * 3, "int64"), "float64")) + gc.sum(gc.argmax(x) * 1.0), x)
    np.testing.assert_array_equal(gc.function([x], g)(np.array([0.1, 0.5, 0.2])), 0)
    p = gc.placeholder("p", (3,), "float64")
    (y,) = gc.fused([x], gc.Graph([p], [gc.exp(p)]))
    with pytest.raises(gc.GradientError, match="fused"):
        gc.grad(gc.sum(y), x)
