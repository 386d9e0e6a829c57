"""Adversarial examples (FGSM) against the digits CNN: x_adv = clip(x + eps * sign(d loss / d x), 0, 1),
the gradient taken with respect to the INPUT image. Shows the clean CNN's accuracy drop on
adversarial digits, then adversarial training (each step also trains on FGSM digits made in the
same graph) recovering it.

    python examples/fgsm_digits.py [--eps 0.2] [--epochs 6]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
import cnn_digits  # noqa: E402
from digits_data import load_digits_split  # noqa: E402


def fgsm(model, x, y, eps: float, training: bool = False):
    """Adversarial images for the model's current weights (a graph: no gradient flows through them)."""
    loss = gc.losses.cross_entropy(model(x, training=training), y)
    return gc.stop_gradient(gc.clip(x + eps * gc.sign(gc.grad(loss, x)), 0.0, 1.0))


def train(model, xtr, ytr, epochs, eps, adversarial: bool, seed: int = 0, batch_size: int = 32):
    x = gc.placeholder("x", (None, 1, 8, 8))
    y = gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    if adversarial:  # half clean, half adversarial (Goodfellow et al.)
        loss = 0.5 * loss + 0.5 * gc.losses.cross_entropy(model(fgsm(model, x, y, eps, True), training=True), y)
    step = gc.function([x, y], loss, updates=gc.optim.Adam(3e-3).updates(loss, model.params))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            step(xtr[idx], ytr[idx])


def accuracies(model, xte, yte, eps):
    """(clean accuracy, accuracy on FGSM digits made against this model)."""
    x = gc.placeholder("x", (None, 1, 8, 8))
    y = gc.placeholder("y", (None,), "int64")
    f = gc.function([x, y], [gc.losses.accuracy(model(x, training=False), y),
                             gc.losses.accuracy(model(fgsm(model, x, y, eps), training=False), y)])
    return tuple(float(v) for v in f(xte, yte))


def main(eps: float = 0.2, epochs: int = 6, seed: int = 0, n_train: int | None = None):
    """Returns {'clean': (clean acc, adversarial acc), 'adversarial': (...)} for the two trainings."""
    from threadpoolctl import threadpool_limits
    xtr, ytr, xte, yte = load_digits_split(seed=seed, images=True)
    if n_train:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    out, t0 = {}, time.perf_counter()
    with threadpool_limits(1):  # small matrices: one BLAS thread is fastest on a shared machine
        for name, adv in (("clean", False), ("adversarial", True)):
            model = cnn_digits.build(seed)
            train(model, xtr, ytr, epochs, eps, adv, seed)
            out[name] = accuracies(model, xte, yte, eps)
            print(f"{name:>11} training: clean test accuracy {out[name][0]:.3f}, "
                  f"FGSM (eps={eps}) accuracy {out[name][1]:.3f}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=6)
    a = ap.parse_args()
    main(a.eps, a.epochs)
