"""The digits data set that scikit-learn ships (1797 8x8 images, offline), split and scaled."""
from __future__ import annotations

import numpy as np


def load_digits_split(test_fraction: float = 0.25, seed: int = 0, images: bool = False):
    """(x_train, y_train, x_test, y_test): float32 pixels in [0, 1], int64 labels; a stratified
    held-out split. images=True gives (N, 1, 8, 8), else (N, 64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if images:
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    return xtr, ytr, xte, yte
