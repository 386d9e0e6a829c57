"""Batch inference on a Dask cluster with gd.map_batches: a model trained here, saved as gc.save bytes,
shipped once to each worker, compiled there once and run over a Dask array chunked by rows.

    python examples/batch_inference.py                       # a LocalCluster of 2 worker processes
    python examples/batch_inference.py --scheduler tcp://host:8786   # a running Dask scheduler
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
import graphc.distributed as gd  # noqa: E402


def main(workers: int = 2, rows: int = 20_000, chunk: int = 2_000, scheduler: str | None = None,
         backend: str = "llvm", epochs: int = 5) -> float:
    """Train a small classifier, then classify `rows` rows on the cluster; returns the largest difference
    from running the compiled function on the whole array in this process."""
    import dask.array as da
    from distributed import Client, LocalCluster
    from digits_data import load_digits_split
    xtr, ytr, _, _ = load_digits_split(seed=0)
    gc.init.seed(0)
    model = gc.nn.Sequential(gc.nn.Dense(64, 128), gc.relu, gc.nn.Dense(128, 10))
    gc.fit(model, gc.losses.cross_entropy, gc.optim.Adam(3e-3), xtr, ytr, epochs=epochs, progress=False)
    x = gc.placeholder("x", (None, 64))
    f = gc.function([x], gc.softmax(model(x, training=False)), backend=backend)
    rng = np.random.default_rng(0)
    data = xtr[rng.integers(0, len(xtr), rows)] + rng.normal(0, 0.05, (rows, 64)).astype(np.float32)
    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                  dashboard_address=None)
    with Client(scheduler or cluster) as client:
        t0 = time.perf_counter()
        probs = gd.map_batches(f, da.from_array(data, chunks=chunk), batch_size=512).compute()
        secs = time.perf_counter() - t0
        n_workers = len(client.scheduler_info()["workers"])
    if cluster is not None:
        cluster.close()
    diff = float(np.abs(probs - f(data)).max())
    print(f"classified {rows} rows on {n_workers} Dask workers in {secs:.2f} s (model shipping and compiling "
          f"included); max difference from one process: {diff:.2e}; predicted classes: "
          f"{np.bincount(probs.argmax(1), minlength=10).tolist()}")
    return diff


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=2_000)
    ap.add_argument("--scheduler")
    ap.add_argument("--backend", default="llvm")
    a = ap.parse_args()
    main(a.workers, a.rows, a.chunk, a.scheduler, a.backend)
