"""Losses against NumPy formulas and torch.nn.functional (when installed); gradients by verify_grad."""
from __future__ import annotations

import math

import numpy as np
import pytest

import graphc as gc

from conftest import TF, needs_torch, torch
from conftest import run_graph as _run


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_int_and_probability_labels(rng):
    logits = rng.standard_normal((6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    want = -_log_softmax(logits)[np.arange(6), labels].mean()
    assert _run(gc.losses.cross_entropy, logits, labels) == pytest.approx(want, rel=1e-12)
    probs = np.exp(_log_softmax(rng.standard_normal((6, 4))))
    want = -(probs * _log_softmax(logits)).sum(-1).mean()
    assert _run(gc.losses.cross_entropy, logits, probs) == pytest.approx(want, rel=1e-12)
    smooth = -(((1 - 0.2) * np.eye(4)[labels] + 0.05) * _log_softmax(logits)).sum(-1).mean()
    assert _run(lambda a, b: gc.losses.cross_entropy(a, b, label_smoothing=0.2), logits, labels) == \
        pytest.approx(smooth, rel=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]], np.float32)
    got = _run(gc.losses.cross_entropy, logits, np.array([1, 1]))
    assert np.isfinite(got) and got == pytest.approx(0.5e4, rel=1e-6)


@needs_torch
def test_losses_match_torch(rng):
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    T = torch.tensor
    lab = rng.integers(0, 3, 5)
    bt = rng.uniform(0, 1, (5, 3))
    var_log = rng.standard_normal((5, 3))
    pairs = [
        (gc.losses.mse(gc.constant(x), t), TF.mse_loss(T(x), T(t))),
        (gc.losses.mae(gc.constant(x), t), TF.l1_loss(T(x), T(t))),
        (gc.losses.cross_entropy(gc.constant(x * 10), lab, label_smoothing=0.1),
         TF.cross_entropy(T(x * 10), T(lab), label_smoothing=0.1)),
        (gc.losses.binary_cross_entropy_with_logits(gc.constant(x * 20), bt),
         TF.binary_cross_entropy_with_logits(T(x * 20), T(bt))),
        (gc.losses.gaussian_nll(gc.constant(x), gc.constant(var_log), t),
         TF.gaussian_nll_loss(T(x), T(t), T(np.exp(var_log)))),
        (gc.losses.nll(gc.log_softmax(gc.constant(x)), lab), TF.nll_loss(TF.log_softmax(T(x), -1), T(lab))),
    ]
    for got, want in pairs:
        assert gc.evaluate([got], {})[0] == pytest.approx(want.item(), rel=1e-10)


def test_mixture_density_matches_numpy(rng):
    n, k, d = 4, 3, 2
    pi, mu, ls, y = rng.standard_normal((n, k)), rng.standard_normal((n, k, d)), \
        rng.standard_normal((n, k, d)) * 0.3, rng.standard_normal((n, d))
    w = np.exp(_log_softmax(pi))
    dens = np.prod(np.exp(-0.5 * ((y[:, None] - mu) / np.exp(ls)) ** 2) / (np.exp(ls) * math.sqrt(2 * math.pi)), -1)
    want = -np.log((w * dens).sum(-1)).mean()
    assert _run(gc.losses.mixture_density, pi, mu, ls, y) == pytest.approx(want, rel=1e-12)
    # 1-D targets: mu (N, K)
    want1 = -np.log((w * np.exp(-0.5 * ((y[:, :1] - mu[..., 0]) / np.exp(ls[..., 0])) ** 2)
                     / (np.exp(ls[..., 0]) * math.sqrt(2 * math.pi))).sum(-1)).mean()
    assert _run(gc.losses.mixture_density, pi, mu[..., 0], ls[..., 0], y[:, 0]) == pytest.approx(want1, rel=1e-12)


def test_penalties_and_accuracy(rng):
    a, b = rng.standard_normal((3, 2)), rng.standard_normal(4)
    ps = [gc.parameter("pa", a, "float64"), gc.parameter("pb", b, "float64")]
    assert gc.evaluate([gc.losses.l1_penalty(ps)], {})[0] == pytest.approx(np.abs(a).sum() + np.abs(b).sum())
    assert gc.evaluate([gc.losses.l2_penalty(ps)], {})[0] == pytest.approx((a ** 2).sum() + (b ** 2).sum())
    logits = np.array([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    assert _run(gc.losses.accuracy, logits, np.array([1, 1, 1])) == pytest.approx(2 / 3)


LOSS_GRADS = [
    ("cross_entropy_int", lambda z: gc.losses.cross_entropy(z, gc.constant(np.array([0, 2, 1])), label_smoothing=0.1)),
    ("cross_entropy_prob", lambda z: gc.losses.cross_entropy(z, gc.softmax(gc.constant(np.eye(3))))),
    ("bce_logits", lambda z: gc.losses.bce_with_logits(z, gc.constant(np.full((3, 3), 0.3)))),
    ("gaussian_nll", lambda z: gc.losses.gaussian_nll(z[:, 0], z[:, 1], gc.constant(np.ones(3)))),
    ("mixture_density", lambda z: gc.losses.mixture_density(z[:, :2], z[:, 1:], z[:, :2] * 0.1,
                                                            gc.constant(np.zeros(3)))),
]


@pytest.mark.parametrize("name,fn", LOSS_GRADS, ids=[n for n, _ in LOSS_GRADS])
def test_loss_gradients(name, fn, rng):
    gc.verify_grad(fn, [rng.standard_normal((3, 3))])


def test_loss_errors():
    with pytest.raises(gc.ShapeError, match="without the class axis"):
        gc.losses.cross_entropy(gc.placeholder("z", (4, 3)), gc.placeholder("l", (4, 3), "int64"))
    with pytest.raises(gc.GraphcError, match="reduction must be"):
        gc.losses.mse(gc.placeholder("p", (2,)), 0.0, reduction="avg")
