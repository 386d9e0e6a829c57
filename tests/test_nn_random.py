"""In-graph random numbers (seeded, fresh per call, reproducible) and graph state that compiled
functions advance by themselves (generator counters, batch-norm running statistics)."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc


def test_same_seed_same_draws_fresh_every_call():
    x = gc.placeholder("x", (None, 4))
    f1 = gc.function([x], gc.random.uniform(x.shape, seed=5) + x)
    f2 = gc.function([x], gc.random.uniform(x.shape, seed=5) + x)
    z = np.zeros((3, 4), np.float32)
    a1, b1 = f1(z), f1(z)
    a2, b2 = f2(z), f2(z)
    assert not np.array_equal(a1, b1)                 # a fresh draw every call
    np.testing.assert_array_equal(a1, a2)             # same seed, same sequence
    np.testing.assert_array_equal(b1, b2)
    assert a1.dtype == np.float32 and 0 <= a1.min() and a1.max() < 1


def test_generator_reseed_repeats_and_constant_key_is_fixed():
    g = gc.random.Generator(11)
    f = gc.function([], gc.random.normal((5,), generator=g))
    first = [f(), f()]
    g.seed(11)
    np.testing.assert_array_equal(f(), first[0])
    np.testing.assert_array_equal(f(), first[1])
    k = gc.function([], gc.random.normal((5,), key=gc.random.key(3)))
    np.testing.assert_array_equal(k(), k())
    assert k.graph.updates == []                      # a constant key is stateless


def test_two_draws_in_one_graph_differ_and_share_one_state_update():
    g = gc.random.Generator(0)
    a, b = gc.random.uniform((100,), generator=g), gc.random.uniform((100,), generator=g)
    f = gc.function([], [a, b])
    va, vb = f()
    assert not np.array_equal(va, vb)
    assert [p.name for p, _ in f.graph.updates] == [g.state.name]
    np.testing.assert_array_equal(g.state.value, [0, 1])


def test_distributions_statistics():
    n = 200_000
    f = gc.function([], [gc.random.uniform((n,), -2.0, 3.0, dtype="float64", seed=1),
                         gc.random.normal((n,), 1.5, 0.5, dtype="float64", seed=2),
                         gc.random.bernoulli(0.3, (n,), seed=3)])
    u, z, b = f()
    assert -2 <= u.min() and u.max() < 3 and abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 25 / 12) < 0.03
    assert abs(z.mean() - 1.5) < 0.01 and abs(z.std() - 0.5) < 0.01
    assert set(np.unique(b)) == {0.0, 1.0} and abs(b.mean() - 0.3) < 0.01


def test_normal_reparameterisation_gradient():
    """d/dmu, d/dsigma of sum(mu + sigma * eps) are 1 and eps (eps the same draw in the graph)."""
    mu = gc.placeholder("mu", (6,), "float64")
    sigma = gc.placeholder("sigma", (6,), "float64")
    k = gc.random.key(9)
    y = gc.random.normal((6,), mu, sigma, dtype="float64", key=k)
    eps = gc.random.normal((6,), dtype="float64", key=k)
    gm, gs, e = gc.function([mu, sigma], gc.grad(gc.sum(y), [mu, sigma]) + [eps])(np.zeros(6), np.ones(6))
    np.testing.assert_allclose(gm, 1.0)
    np.testing.assert_allclose(gs, e)
    gc.verify_grad(lambda m, s: gc.random.normal((6,), m, s, dtype="float64", key=k) ** 2,
                   [np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)])


def test_dropout_mask_scaling_and_inference():
    x = gc.placeholder("x", (None, 1000), "float64")
    g = gc.random.Generator(4)
    f = gc.function([x], gc.dropout(x, 0.25, generator=g))
    ones = np.ones((20, 1000))
    y1, y2 = f(ones), f(ones)
    assert set(np.unique(y1)) == {0.0, 1 / 0.75}       # inverted scaling
    assert abs((y1 == 0).mean() - 0.25) < 0.01
    assert abs(y1.mean() - 1.0) < 0.02                 # expectation preserved
    assert not np.array_equal(y1, y2)                  # fresh mask each call
    g.seed(4)
    np.testing.assert_array_equal(f(ones), y1)         # reproducible
    ev = gc.function([x], gc.dropout(x, 0.25, training=False))
    np.testing.assert_array_equal(ev(ones), ones)
    assert ev.graph.updates == []


def test_dropout_gradient_uses_the_same_mask():
    x = gc.placeholder("x", (50,), "float64")
    y = gc.dropout(x, 0.5, generator=gc.random.Generator(1))
    out, gx = gc.function([x], [y, gc.grad(gc.sum(y), x)])(np.ones(50))
    np.testing.assert_array_equal(gx, out)             # d(x*m/(1-p))/dx = m/(1-p) = out for x = 1


def test_implicit_updates_in_training_functions_only():
    bn = gc.nn.BatchNorm(3, momentum=0.5, dtype="float64")
    x = gc.placeholder("x", (None, 3), "float64")
    a = np.random.default_rng(0).standard_normal((8, 3)) * 2 + 5
    train = gc.function([x], bn(x, training=True))
    infer = gc.function([x], bn(x, training=False))
    infer(a)
    np.testing.assert_array_equal(bn.running_mean.value, 0)   # inference leaves state alone
    train(a)
    np.testing.assert_allclose(bn.running_mean.value, 0.5 * a.mean(0))
    np.testing.assert_allclose(bn.running_var.value, 0.5 + 0.5 * a.var(0, ddof=1))
    train(a)
    np.testing.assert_allclose(bn.running_mean.value, 0.75 * a.mean(0))


def test_implicit_updates_next_to_user_updates_and_through_gradients():
    """A training step built from the gradient alone still advances the batch-norm statistics,
    together with the optimiser's updates; an explicit user update of the same parameter wins."""
    model = gc.nn.Sequential(gc.nn.Dense(3, 4, seed=0), gc.nn.BatchNorm(4), gc.relu, gc.nn.Dense(4, 1, seed=1))
    x = gc.placeholder("x", (None, 3))
    loss = gc.mean(model(x) ** 2)
    ups = gc.optim.SGD(0.1).updates(loss, model.params)
    f = gc.function([x], gc.grad(loss, model.params[0]), updates=ups)
    names = {p.name for p, _ in f.graph.updates}
    bn = model[1]
    assert {bn.running_mean.name, bn.running_var.name} <= names and model.params[0].name in names
    f(np.ones((4, 3), np.float32))
    assert np.any(bn.running_mean.value != 0)
    pinned = gc.function([x], loss, updates=[(bn.running_mean, bn.running_mean * 0)])
    bn.running_mean.set_value(np.ones(4))
    pinned(np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(bn.running_mean.value, 0)


def test_noisy_relu_fixed_key_matches_numpy():
    x = np.linspace(-2, 2, 12)
    k = gc.random.key(2)
    eps = gc.function([], gc.random.normal((12,), dtype="float64", key=k))()
    xs = gc.placeholder("x", (12,), "float64")
    got = gc.function([xs], gc.noisy_relu(xs, key=k))(x)
    np.testing.assert_allclose(got, np.maximum(x + np.sqrt(1 / (1 + np.exp(-x))) * eps, 0), rtol=1e-12)


def test_batch_shaped_draws():
    x = gc.placeholder("x", (None, 3))
    f = gc.function([x], x + gc.random.normal((None, 3), seed=0))
    assert f(np.zeros((4, 3), np.float32)).shape == (4, 3) and f(np.zeros((2, 3), np.float32)).shape == (2, 3)
    with pytest.raises(gc.ShapeError, match="only axis 0"):
        gc.random.uniform((2, None))


def test_random_errors():
    with pytest.raises(gc.GraphcError, match="at most one"):
        gc.random.uniform((2,), seed=1, key=gc.random.key(1))
    with pytest.raises(gc.DTypeError, match="dtype must be float"):
        gc.random.normal((2,), dtype="int32")
    with pytest.raises(ValueError, match="p must be in"):
        gc.dropout(gc.placeholder("x", (3,)), 1.0)
