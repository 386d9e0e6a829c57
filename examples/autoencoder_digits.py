"""A small autoencoder on scikit-learn's digits: 64 -> 32 -> 8 -> 32 -> 64 pixels, trained with MSE;
prints the held-out reconstruction error against the mean-image baseline (and can save a PNG).

    python examples/autoencoder_digits.py [--epochs 40] [--png recon.png]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
from digits_data import load_digits_split  # noqa: E402


def build(seed: int = 0):
    nn = gc.nn
    encoder = nn.Sequential(nn.Dense(64, 32, seed=seed), gc.relu, nn.Dense(32, 8, seed=seed + 1))
    decoder = nn.Sequential(nn.Dense(8, 32, seed=seed + 2), gc.relu, nn.Dense(32, 64, seed=seed + 3), gc.sigmoid)
    return nn.Sequential(encoder, decoder)


def main(epochs: int = 40, png: str | None = None, progress: bool = True, seed: int = 0):
    """Train; returns (test MSE, mean-image baseline MSE)."""
    xtr, _, xte, _ = load_digits_split(seed=seed)
    model = build(seed)
    hist = gc.fit(model, gc.losses.mse, gc.optim.Adam(3e-3), xtr, xtr, epochs=epochs, batch_size=32,
                  validation_data=(xte, xte), progress=progress, seed=seed, blas_threads=1)
    mse = hist["val_loss"][-1]
    baseline = float(np.mean((xte - xtr.mean(0)) ** 2))
    print(f"autoencoder: test reconstruction MSE {mse:.4f} (mean-image baseline {baseline:.4f}), "
          f"{hist.seconds:.1f} s")
    if png:
        save_png(model, xte[:8], png)
    return mse, baseline


def save_png(model, x, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = gc.placeholder("x", (None, 64))
    rec = gc.function([xs], model(xs, training=False))(x)
    fig, ax = plt.subplots(2, len(x), figsize=(len(x), 2.2))
    for i in range(len(x)):
        for r, img in enumerate((x[i], rec[i])):
            ax[r, i].imshow(img.reshape(8, 8), cmap="gray_r")
            ax[r, i].axis("off")
    fig.suptitle("digits (top) and their reconstructions through an 8-number code (bottom)", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--png")
    a = ap.parse_args()
    main(a.epochs, a.png)
