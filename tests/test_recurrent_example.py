"""The LSTM example (examples/lstm_adding.py), shortened: the validation loss must fall clearly."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np


def _load():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lstm_adding.py"
    spec = importlib.util.spec_from_file_location("lstm_adding", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_adding_data_targets_are_the_marked_sums():
    x, y = _load().make_data(8, 10, np.random.default_rng(0))
    assert x.shape == (8, 10, 2) and y.shape == (8, 1)
    assert (x[..., 1].sum(1) == 2).all()
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * x[..., 1]).sum(1), rtol=1e-6)


def test_lstm_learns_the_adding_problem(capsys):
    hist = _load().train(epochs=5, steps=50, T=10, hidden=16, seed=0)
    out = capsys.readouterr().out
    assert out.count("val mse") == 6  # one line per epoch, plus the start
    assert hist[0] > 0.1  # the mean predictor's level (the target's variance is 1/6)
    assert hist[-1] < 0.1 * hist[0] and hist[-1] < 0.02, hist


def test_w4_benchmark_graph_matches_its_numpy_baseline(monkeypatch, capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lstm_benchmark.py"
    spec = importlib.util.spec_from_file_location("lstm_benchmark", path)
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    monkeypatch.setattr("sys.argv", ["lstm_benchmark.py", "--rounds", "1", "--calls", "2"])
    lb.main()  # asserts every system against a float64 NumPy reference before timing
    out = capsys.readouterr().out
    assert "graphc (numpy)" in out and "NumPy by hand" in out
