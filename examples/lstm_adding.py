"""An LSTM learns the adding problem (Hochreiter & Schmidhuber 1997).

Each input is a sequence of T pairs (value in [0, 1), marker in {0, 1}); exactly two markers are 1,
one in each half. The target is the sum of the two marked values, so the net must remember them
across the sequence. Predicting the mean (1.0) scores an MSE of about 0.167; an LSTM that learned
the task scores far below.

The LSTM is gc.nn.LSTM: one `scan` node whose gradient is back-propagation through time as a
second scan; gc.optim.Adam's graph updates make the training step one compiled function.

    python examples/lstm_adding.py [--epochs 12] [--seq 30] [--hidden 32]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import graphc as gc


def make_data(n: int, T: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, T, 2) float32, y (n, 1) float32) for the adding problem."""
    vals = rng.uniform(0, 1, (n, T)).astype(np.float32)
    marks = np.zeros((n, T), np.float32)
    first = rng.integers(0, T // 2, n)
    second = rng.integers(T // 2, T, n)
    marks[np.arange(n), first] = 1
    marks[np.arange(n), second] = 1
    y = (vals * marks).sum(1, keepdims=True)
    return np.stack([vals, marks], -1), y


def build(T: int, hidden: int, seed: int = 0):
    """(train_step(x, y) -> loss, evaluate(x, y) -> loss, params) for an LSTM + linear read-out."""
    rng = np.random.default_rng(seed)
    lstm = gc.nn.LSTM(2, hidden, seed=seed)
    w = gc.parameter("w_out", rng.normal(0, 1 / np.sqrt(hidden), (hidden, 1)).astype(np.float32))
    b = gc.parameter("b_out", np.ones(1, np.float32))  # start at the mean of the target
    x = gc.placeholder("x", (None, T, 2))
    y = gc.placeholder("y", (None, 1))
    out, (h, c) = lstm(x)
    pred = h[0] @ w + b
    loss = gc.mean((pred - y) ** 2)
    params = lstm.params + [w, b]
    step = gc.function([x, y], loss, updates=gc.optim.Adam(lr=1e-2).updates(loss, params))
    evaluate = gc.function([x, y], loss)
    return step, evaluate, params


def train(epochs: int = 12, steps: int = 60, T: int = 30, hidden: int = 32, batch: int = 64, seed: int = 0,
          verbose: bool = True) -> list[float]:
    """Train and return the validation loss before training and after each epoch."""
    rng = np.random.default_rng(seed)
    step, evaluate, _ = build(T, hidden, seed)
    xv, yv = make_data(512, T, np.random.default_rng(seed + 1))
    history = [float(evaluate(xv, yv))]
    if verbose:
        print(f"adding problem, T={T}, LSTM hidden={hidden}; predicting the mean scores ~0.167")
        print(f"epoch  0  val mse {history[0]:.4f}")
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_loss = np.mean([step(*make_data(batch, T, rng)) for _ in range(steps)])
        history.append(float(evaluate(xv, yv)))
        if verbose:
            print(f"epoch {epoch:2d}  train mse {train_loss:.4f}  val mse {history[-1]:.4f}  "
                  f"({time.perf_counter() - t0:.1f} s)")
    return history


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=60, help="training steps per epoch")
    ap.add_argument("--seq", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train(a.epochs, a.steps, a.seq, a.hidden, seed=a.seed)


if __name__ == "__main__":
    main()
