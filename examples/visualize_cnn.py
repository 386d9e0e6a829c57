"""Look inside the digits CNN: saves PNGs of its first-layer filters, the first layer's activation
maps for one digit, and a saliency map (|d class score / d input pixel|, a gradient w.r.t. the input).

    python examples/visualize_cnn.py [--out-dir cnn_pngs] [--epochs 6]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
import cnn_digits  # noqa: E402
from digits_data import load_digits_split  # noqa: E402


def _grid(images, title, path, cmap="gray"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(images)
    cols = min(n, 8)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.2 + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img in zip(axes.ravel(), images):
        ax.imshow(img, cmap=cmap)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(out_dir: str = "cnn_pngs", epochs: int = 6, seed: int = 0) -> list[str]:
    """Train the CNN briefly and save the three PNGs; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    model, acc, _ = cnn_digits.main(epochs=epochs, progress=False, seed=seed)
    _, _, xte, yte = load_digits_split(seed=seed, images=True)
    digit, label = xte[:1], int(yte[0])
    x = gc.placeholder("x", (None, 1, 8, 8))
    conv1 = model[0]
    first = gc.relu(model[1](conv1(x), training=False))        # conv -> batch norm -> relu
    score = model(x, training=False)[0, label]
    saliency = gc.abs(gc.grad(score, x))
    acts, sal = gc.function([x], [first, saliency])(digit)
    filters = conv1.weight.value[:, 0]
    paths = [
        _grid(list(filters), "first-layer 3x3 filters", os.path.join(out_dir, "filters.png"), "RdBu"),
        _grid([digit[0, 0]] + list(acts[0]), f"a '{label}' and its 16 first-layer activation maps",
              os.path.join(out_dir, "activations.png")),
        _grid([digit[0, 0], sal[0, 0]], f"a '{label}' and its saliency |d score / d pixel|",
              os.path.join(out_dir, "saliency.png"), "hot"),
    ]
    print(f"CNN test accuracy {acc:.3f}; saved " + ", ".join(paths))
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default="cnn_pngs")
    ap.add_argument("--epochs", type=int, default=6)
    a = ap.parse_args()
    main(a.out_dir, a.epochs)
