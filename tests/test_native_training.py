"""Training steps run natively: forward, backward and the Adam update of an MLP, a LeNet-style CNN
(BatchNorm, grouped Conv2D, MaxPool2D, AvgPool2D, Dropout) and an LSTM compile on each native backend
with no op left on the host (`info["fallback_ops"] == []` after the first call), and the parameters
after a few steps match the NumPy backend's."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip

NATIVE = ["llvm", "cuda-emulated"]
STEPS = 3


def _mlp(rng):
    gc.init.seed(0)
    model = gc.nn.Sequential(gc.nn.Dense(6, 16, seed=0), gc.relu, gc.nn.Dense(16, 8, seed=1), gc.tanh,
                             gc.nn.Dense(8, 3, seed=2))
    x = gc.placeholder("x", (None, 6))
    y = gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    data = (rng.standard_normal((10, 6)).astype(np.float32), rng.integers(0, 3, 10))
    return [x, y], loss, model.params, data


def _cnn(rng):
    gc.init.seed(0)
    nn = gc.nn
    model = nn.Sequential(
        # no bias before BatchNorm: its gradient is rounding noise, which Adam would amplify to +-lr
        nn.Conv2D(2, 4, 3, padding=1, bias=False), nn.BatchNorm(4), gc.relu,     # 4 x 9 x 9
        nn.Conv2D(4, 6, 3, padding=1, groups=2), gc.relu,                 # grouped: 6 x 9 x 9
        nn.MaxPool2D(2),                                                   # 6 x 4 x 4
        nn.AvgPool2D(2),                                                   # 6 x 2 x 2 (a depthwise conv)
        nn.Flatten(), nn.Dropout(0.25, seed=3), nn.Dense(6 * 2 * 2, 3, seed=4))
    x = gc.placeholder("x", (None, 2, 9, 9))
    y = gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    data = (rng.standard_normal((5, 2, 9, 9)).astype(np.float32), rng.integers(0, 3, 5))
    return [x, y], loss, model.params, data


def _lstm(rng):
    lstm = gc.nn.LSTM(3, 5, seed=0)
    w = gc.parameter("w_out", rng.normal(0, 0.5, (5, 1)).astype(np.float32))
    x = gc.placeholder("x", (None, 4, 3))
    y = gc.placeholder("y", (None, 1))
    _, (h, _) = lstm(x)
    loss = gc.mean((h[0] @ w - y) ** 2)
    data = (rng.standard_normal((6, 4, 3)).astype(np.float32), rng.standard_normal((6, 1)).astype(np.float32))
    return [x, y], loss, lstm.params + [w], data


MODELS = {"mlp": _mlp, "cnn": _cnn, "lstm": _lstm}


def _train(build, backend):
    """Parameters after STEPS Adam steps on `backend` (a fresh model from the same seeds each time)."""
    inputs, loss, params, data = build(np.random.default_rng(0))
    f = gc.function(inputs, loss, updates=gc.optim.Adam(1e-2).updates(loss, params), backend=backend)
    losses = [float(f(*data)) for _ in range(STEPS)]
    return f, losses, [p.get_value().copy() for p in params]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("model", list(MODELS))
def test_training_step_runs_natively_and_matches_numpy(model, backend):
    backend_or_skip(backend)
    f, losses, got = _train(MODELS[model], backend)
    assert f.program.info["fallback_ops"] == [], f"{model} on {backend} ran on the host"
    _, want_losses, want = _train(MODELS[model], "numpy")
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
