"""gc.fit: mini-batches, seeded shuffling, validation metrics, early stopping with the best
parameters restored, progress bar."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc


def _blobs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((n, 2)) * 0.5 + np.array([[0, 3], [3, 0], [-3, -3]])[y]).astype(np.float32)
    return x, y.astype(np.int64)


def test_fit_learns_and_reports(capsys):
    x, y = _blobs()
    model = gc.nn.Sequential(gc.nn.Dense(2, 16, seed=0), gc.relu, gc.nn.Dense(16, 3, seed=1))
    h = gc.fit(model, gc.losses.cross_entropy, gc.optim.Adam(0.05), x[:200], y[:200], epochs=5, batch_size=32,
               validation_data=(x[200:], y[200:]), progress=True)
    assert set(h.metrics) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(h["loss"]) == 5 and h["loss"][-1] < h["loss"][0]
    assert h["val_accuracy"][-1] > 0.9
    assert "epoch 5/5" in capsys.readouterr().err       # the tqdm bar


def test_fit_is_reproducible_with_a_seed():
    x, y = _blobs()
    runs = []
    for _ in range(2):
        model = gc.nn.Sequential(gc.nn.Dense(2, 8, seed=0), gc.relu, gc.nn.Dropout(0.2, seed=3),
                                 gc.nn.Dense(8, 3, seed=1))
        gc.fit(model, gc.losses.cross_entropy, gc.optim.SGD(0.1), x, y, epochs=2, batch_size=50, seed=5,
               progress=False)
        runs.append([p.get_value() for p in model.params])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_restores_the_best_parameters():
    x, y = _blobs()
    model = gc.nn.Sequential(gc.nn.Dense(2, 3, seed=0))
    seen = []
    # a huge learning rate makes the validation loss jump around, so patience runs out
    h = gc.fit(model, gc.losses.cross_entropy, gc.optim.SGD(50.0), x[:200], y[:200], epochs=40, batch_size=200,
               validation_data=(x[200:], y[200:]), early_stopping=2, progress=False,
               log=lambda e, m: seen.append([p.get_value() for p in model.params]))
    assert len(h["loss"]) < 40
    best = int(np.argmin(h["val_loss"]))
    assert h.best_epoch == best
    for p, v in zip(model.params, seen[best]):
        np.testing.assert_array_equal(p.value, v)


def test_fit_regression_and_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype(np.float32)
    model = gc.nn.Dense(3, 1, seed=0)
    h = gc.fit(model, gc.losses.mse, gc.optim.SGD(0.1), x, y, epochs=20, batch_size=16, progress=False)
    assert h["loss"][-1] < 1e-3 * h["loss"][0]
    assert np.isnan(h["accuracy"][0])
    with pytest.raises(gc.GraphcError, match="rows"):
        gc.fit(model, gc.losses.mse, gc.optim.SGD(0.1), x, y[:10], progress=False)
