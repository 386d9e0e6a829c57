"""Data-parallel training of an MLP on scikit-learn's digits with graphc.distributed.

    python examples/distributed_mlp.py                       # one process
    graphc launch -n 2 python examples/distributed_mlp.py    # two processes: the same run, to float rounding
    graphc launch -n 4 python examples/distributed_mlp.py --deterministic --out p4.npz
                                                             # bit-identical parameters on 1, 2 or 4 processes
Options: --epochs, --batch-size (a multiple of the process count; of --micro-shards with --deterministic),
--backend, --out params.npz (rank 0 writes the trained parameters), --checkpoint ck.graphc
--checkpoint-every K (resumes from the file when it exists).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
import graphc.distributed as gd  # noqa: E402
from digits_data import load_digits_split  # noqa: E402


def build(seed: int = 0) -> gc.nn.Sequential:
    gc.init.seed(seed)
    return gc.nn.Sequential(gc.nn.Dense(64, 128), gc.relu, gc.nn.Dense(128, 10))


def main(epochs: int = 5, batch_size: int = 64, deterministic: bool = False, micro_shards: int = 8,
         backend: str = "numpy", out: str | None = None, checkpoint: str | None = None,
         checkpoint_every: int | None = None, progress: bool = True, n_train: int | None = None):
    """Train; returns (history, trained parameter values). Rank 0 prints the result and writes `out`."""
    gd.init(deterministic=deterministic, micro_shards=micro_shards)
    xtr, ytr, xte, yte = load_digits_split(seed=0)
    if n_train:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    model = build(0)
    hist = gc.fit(model, gc.losses.cross_entropy, gc.optim.Adam(3e-3), xtr, ytr, epochs=epochs,
                  batch_size=batch_size, validation_data=(xte, yte), progress=progress, backend=backend,
                  distributed=True, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    values = [p.get_value() for p in model.params]
    if gd.rank() == 0:
        mode = "deterministic" if deterministic else "data-parallel"
        print(f"{mode} MLP on {gd.size()} process(es): loss {hist['loss'][-1]:.6f}, test accuracy "
              f"{hist['val_accuracy'][-1]:.4f} after {len(hist['loss'])} epochs ({hist.seconds:.1f} s)")
        if out:
            np.savez(out, *values, loss=np.array(hist["loss"]), val_accuracy=np.array(hist["val_accuracy"]))
    return hist, values


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--micro-shards", type=int, default=8)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--out")
    ap.add_argument("--checkpoint")
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()
    main(a.epochs, a.batch_size, a.deterministic, a.micro_shards, a.backend, a.out, a.checkpoint,
         a.checkpoint_every, not a.no_progress, a.n_train)
