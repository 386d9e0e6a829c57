"""The workloads: data (fixed seeds, float32, the same weights for every system) and a float64 NumPy
reference. `size` is "full" (WORKLOADS.md sizes) or "tiny" (the smoke test)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Workload:
    id: str
    title: str
    data: dict
    reference: np.ndarray
    flops: float = 0.0
    notes: list = field(default_factory=list)


def _w(rng, *shape, scale=None):
    scale = scale or 1.0 / np.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mlp_params(rng, dims=(784, 512, 256, 10)):
    out = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"w{i}"], out[f"b{i}"] = _w(rng, a, b), _w(rng, b, scale=0.1)
    return out


def mlp_forward64(d, x):
    h = np.maximum(x @ d["w0"].astype(np.float64) + d["b0"], 0)
    h = np.maximum(h @ d["w1"].astype(np.float64) + d["b1"], 0)
    return _softmax(h @ d["w2"].astype(np.float64) + d["b2"])


def w1(batch: int, size="full") -> Workload:
    rng = np.random.default_rng(1)
    dims = (784, 512, 256, 10) if size == "full" else (30, 16, 8, 5)
    d = mlp_params(rng, dims)
    d["x"] = rng.standard_normal((batch, dims[0])).astype(np.float32)
    flops = 2 * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return Workload(f"W1 b{batch}", f"MLP inference, batch {batch}", d, mlp_forward64(d, d["x"].astype(np.float64)),
                    flops)


def w2(size="full") -> Workload:
    rng = np.random.default_rng(2)
    n = 4_194_304 if size == "full" else 1000
    d = {"x": rng.standard_normal(n).astype(np.float32), "a": 1.5, "b": 0.5}
    x = d["x"].astype(np.float64)
    ref = np.tanh(x * 1.5 + 0.5) / (1 + np.exp(-x)) + np.exp(-x * x)
    return Workload("W2", "elementwise chain, 4M floats" if size == "full" else "elementwise chain", d, ref)


def lenet_params(rng):
    return {"c1w": _w(rng, 6, 1, 5, 5), "c1b": _w(rng, 6, scale=0.1), "c2w": _w(rng, 16, 6, 5, 5),
            "c2b": _w(rng, 16, scale=0.1), "f1w": _w(rng, 400, 120), "f1b": _w(rng, 120, scale=0.1),
            "f2w": _w(rng, 120, 84), "f2b": _w(rng, 84, scale=0.1), "f3w": _w(rng, 84, 10),
            "f3b": _w(rng, 10, scale=0.1)}


def conv2d64(x, w, b, pad):
    """Direct NCHW cross-correlation in float64 (the reference)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
    return np.einsum("ncijkl,ockl->noij", cols, w.astype(np.float64)) + b.reshape(1, -1, 1, 1)


def maxpool64(x):
    n, c, h, w = x.shape
    return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def lenet64(d, x):
    h = maxpool64(np.maximum(conv2d64(x, d["c1w"], d["c1b"], 2), 0))
    h = maxpool64(np.maximum(conv2d64(h, d["c2w"], d["c2b"], 0), 0))
    h = h.reshape(h.shape[0], -1)
    h = np.maximum(h @ d["f1w"] + d["f1b"], 0)
    h = np.maximum(h @ d["f2w"] + d["f2b"], 0)
    return h @ d["f3w"] + d["f3b"]


def w3(batch: int, size="full") -> Workload:
    rng = np.random.default_rng(3)
    d = lenet_params(rng)
    d["x"] = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    return Workload(f"W3 b{batch}", f"LeNet inference, batch {batch}", d, lenet64(d, d["x"].astype(np.float64)))


def lstm64(d, x):
    """Last hidden state of a one-layer LSTM, torch gate order (i, f, g, o); x is (N, T, C)."""
    H = d["whh"].shape[1]
    n = x.shape[0]
    h, c = np.zeros((n, H)), np.zeros((n, H))
    sig = lambda v: 1 / (1 + np.exp(-v))   # noqa: E731
    xp = x @ d["wih"].T.astype(np.float64) + d["bih"] + d["bhh"]
    for t in range(x.shape[1]):
        z = xp[:, t] + h @ d["whh"].T.astype(np.float64)
        i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
    return h


def w4(size="full") -> Workload:
    rng = np.random.default_rng(4)
    T, N, C, H = (50, 16, 64, 128) if size == "full" else (5, 3, 4, 6)
    b = 1 / np.sqrt(H)
    d = {k: rng.uniform(-b, b, s).astype(np.float32) for k, s in
         (("wih", (4 * H, C)), ("whh", (4 * H, H)), ("bih", (4 * H,)), ("bhh", (4 * H,)))}
    d["x"] = rng.standard_normal((N, T, C)).astype(np.float32)
    return Workload("W4", f"LSTM inference seq {T} batch {N} in {C} hidden {H}", d, lstm64(d, d["x"].astype(np.float64)))


def train_step64(d, x, t, lr=0.1):
    """New parameters after one SGD step on mean cross-entropy (t one-hot), float64."""
    W = {k: v.astype(np.float64) for k, v in d.items() if k[0] in "wb"}
    h1 = np.maximum(x @ W["w0"] + W["b0"], 0)
    h2 = np.maximum(h1 @ W["w1"] + W["b1"], 0)
    g = (_softmax(h2 @ W["w2"] + W["b2"]) - t) / x.shape[0]
    grads = {"w2": h2.T @ g, "b2": g.sum(0)}
    g2 = (g @ W["w2"].T) * (h2 > 0)
    grads.update(w1=h1.T @ g2, b1=g2.sum(0))
    g1 = (g2 @ W["w1"].T) * (h1 > 0)
    grads.update(w0=x.T @ g1, b0=g1.sum(0))
    return np.concatenate([(W[k] - lr * grads[k]).ravel() for k in sorted(grads)])


def w5(size="full") -> Workload:
    rng = np.random.default_rng(5)
    dims = (784, 512, 256, 10) if size == "full" else (30, 16, 8, 5)
    batch = 64 if size == "full" else 4
    d = mlp_params(rng, dims)
    d["x"] = rng.standard_normal((batch, dims[0])).astype(np.float32)
    d["t"] = np.eye(dims[-1], dtype=np.float32)[rng.integers(0, dims[-1], batch)]
    ref = train_step64(d, d["x"].astype(np.float64), d["t"].astype(np.float64))
    return Workload("W5", f"MLP training step, batch {batch} (SGD lr 0.1)", d, ref)


def w6(size="full") -> Workload:
    rng = np.random.default_rng(6)
    n = 1024 if size == "full" else 16
    d = {"a": rng.standard_normal((n, n)).astype(np.float32), "b": rng.standard_normal((n, n)).astype(np.float32)}
    return Workload("W6", f"matmul {n}^3 float32", d, d["a"].astype(np.float64) @ d["b"], 2 * n ** 3)


def all_workloads(size="full") -> list[Workload]:
    return [w1(1, size), w1(256 if size == "full" else 8, size), w2(size), w3(1, size),
            w3(64 if size == "full" else 2, size), w4(size), w5(size), w6(size)]
