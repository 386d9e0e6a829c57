"""W4 of WORKLOADS.md: LSTM inference, seq 50, batch 16, input 64, hidden 128, one layer, last
hidden state, float32. graphc (gc.nn.LSTM = one scan node whose step is compiled once to NumPy
code) against a hand-written NumPy loop and, when installed, torch eager; all with the same
weights, checked against a float64 NumPy reference before timing. Rounds are interleaved (the
machine is shared and noisy): the median and best per call are printed.

    python examples/lstm_benchmark.py [--rounds 7] [--calls 20] [--backend numpy]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import graphc as gc

T, N, C, H = 50, 16, 64, 128


def numpy_lstm(x: np.ndarray, p: dict) -> np.ndarray:
    """The eager baseline, written the way one would by hand: one step at a time."""
    wi, wh = p["weight_ih_l0"].T, p["weight_hh_l0"].T
    b = p["bias_ih_l0"] + p["bias_hh_l0"]
    h = np.zeros((x.shape[0], H), x.dtype)
    c = np.zeros_like(h)
    for t in range(x.shape[1]):
        z = x[:, t] @ wi + h @ wh + b
        i, f = 1 / (1 + np.exp(-z[:, :H])), 1 / (1 + np.exp(-z[:, H:2 * H]))
        g, o = np.tanh(z[:, 2 * H:3 * H]), 1 / (1 + np.exp(-z[:, 3 * H:]))
        c = f * c + i * g
        h = o * np.tanh(c)
    return h


def _torch_fn(p):
    try:
        import torch
    except ImportError:
        return None
    m = torch.nn.LSTM(C, H, batch_first=True)
    m.load_state_dict({k: torch.tensor(v) for k, v in p.items()})

    def run(x):
        with torch.no_grad():
            return m(torch.from_numpy(x))[1][0][0].numpy()
    return run


def build(backend: str = "numpy"):
    lstm = gc.nn.LSTM(C, H, seed=0)
    x = gc.placeholder("x", (N, T, C))
    _, (h, _) = lstm(x)
    t0 = time.perf_counter()
    f = gc.function([x], h[0], backend=backend)
    return f, lstm.state_dict(), time.perf_counter() - t0


def _time(fn, x, calls):
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return ts


def main():
    ap = argparse.ArgumentParser(description="W4 LSTM inference timing")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--backend", default="numpy")
    a = ap.parse_args()
    f, p, compile_s = build(a.backend)
    x = np.random.default_rng(0).standard_normal((N, T, C)).astype(np.float32)
    ref = numpy_lstm(x.astype(np.float64), {k: v.astype(np.float64) for k, v in p.items()})
    systems = {f"graphc ({a.backend})": f, "NumPy by hand": lambda x: numpy_lstm(x, p)}
    tf = _torch_fn(p)
    if tf is not None:
        systems["torch eager"] = tf
    for name, fn in systems.items():
        err = np.abs(fn(x) - ref).max()
        assert err < 1e-4, f"{name}: max error {err} against the float64 reference"
    times = {k: [] for k in systems}
    for _ in range(a.rounds):
        for name, fn in systems.items():
            times[name] += _time(fn, x, a.calls)
    print(f"W4 LSTM T={T} N={N} C={C} H={H} float32; graphc compile {compile_s * 1e3:.0f} ms")
    for name, ts in times.items():
        print(f"  {name:18s} median {np.median(ts) * 1e3:6.2f} ms   best {min(ts) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
