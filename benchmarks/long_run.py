"""Long-run check: N Adam steps (default 100000) of the digits MLP (64-256-10, batch 32) on the llvm
backend, sampling RSS (/proc/self/status VmRSS) and mean step time every --every steps; reports whether
RSS is flat after warm-up and whether steps slow down.

    python -m benchmarks.long_run [--steps 100000] [--every 5000] [--backend llvm] [--seconds S]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import graphc as gc  # noqa: E402

WARMUP_SAMPLES = 2      # samples before the baseline (allocator and caches settle)
RSS_SLACK_MB = 8.0      # growth after warm-up above this counts as a leak
SLOWDOWN = 1.25         # last-quarter step time over first-quarter (after warm-up) above this is a slowdown


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_step(backend: str):
    """The training step (loss, updates for the Dense weights and Adam's state) and a data batch source."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    gc.init.seed(0)
    model = gc.nn.Sequential(gc.nn.Dense(64, 256), gc.relu, gc.nn.Dense(256, 10))
    xp, yp = gc.placeholder("x", ("n", 64), "float32"), gc.placeholder("y", ("n",), "int64")
    loss = gc.losses.cross_entropy(model(xp), yp)
    step = gc.function([xp, yp], loss, updates=gc.optim.Adam(1e-3).updates(loss, model.params), backend=backend)
    rng = np.random.default_rng(0)

    def batch():
        i = rng.integers(0, len(x), 32)
        return x[i], y[i].astype(np.int64)
    return step, batch


def run(steps: int, every: int, backend: str, seconds: float | None, log=print) -> list:
    """[(step, rss_mb, mean_ms_per_step)] samples; stops early after `seconds` of wall time."""
    step, batch = build_step(backend)
    batches = [batch() for _ in range(64)]  # pre-drawn: time the step, not the sampling
    samples, t_start, t0 = [], time.perf_counter(), time.perf_counter()
    for k in range(1, steps + 1):
        loss = step(*batches[k % 64])
        if k % every == 0:
            t1 = time.perf_counter()
            samples.append((k, rss_mb(), (t1 - t0) / every * 1e3))
            if log:
                log(f"step {k:7d}  RSS {samples[-1][1]:7.1f} MB  {samples[-1][2]:.4f} ms/step  loss {float(loss):.4f}")
            t0 = time.perf_counter()
            if seconds and t1 - t_start > seconds:
                break
    return samples


def verdict(samples: list) -> tuple[bool, bool, str]:
    """(rss_flat, no_slowdown, summary line) from the samples after warm-up."""
    tail = samples[WARMUP_SAMPLES:] or samples
    growth = tail[-1][1] - tail[0][1]
    q = max(1, len(tail) // 4)
    first, last = np.median([s[2] for s in tail[:q]]), np.median([s[2] for s in tail[-q:]])
    flat, fast = growth <= RSS_SLACK_MB, last / first <= SLOWDOWN
    return flat, fast, (f"{samples[-1][0]} steps: RSS {tail[0][1]:.1f} -> {tail[-1][1]:.1f} MB after warm-up "
                        f"({growth:+.1f} MB, {'flat' if flat else 'GROWING'}); step time {first:.4f} -> "
                        f"{last:.4f} ms ({last / first:.2f}x, {'no slowdown' if fast else 'SLOWER'})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--every", type=int, default=5000)
    ap.add_argument("--backend", default="llvm")
    ap.add_argument("--seconds", type=float, help="stop at the first sample after this much wall time")
    a = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):  # small matrices: one BLAS thread is fastest and least noisy
        samples = run(a.steps, a.every, a.backend, a.seconds)
    if len(samples) < 3:
        print("too few samples for a verdict (raise --steps or lower --every)")
        return 1
    flat, fast, line = verdict(samples)
    print(line)
    return 0 if flat and fast else 1


if __name__ == "__main__":
    sys.exit(main())
