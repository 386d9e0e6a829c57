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
    """Every workload W1-W10 (builds all data: W10 exports two ResNet-18s; prefer selected_workloads)."""
    return selected_workloads(size)


# ---- W7-W10 (benchmarks/WORKLOADS.md) ------------------------------------------------------------------
# Each new workload's computation is written once, generic in the float dtype: float64 is the reference,
# float32 the NumPy-by-hand peer (tests/test_benchmarks_new.py checks the float64 code against torch).

def _layer_norm(x, g, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


def encoder_forward(d, x, heads: int, dt=np.float64):
    """torch.nn.TransformerEncoderLayer (post-LN, ReLU, eval) on x (B, T, D), in dtype `dt`; `d` holds the
    layer's torch state dict."""
    P = {k: v.astype(dt, copy=False) for k, v in d.items() if k != "x"}
    x = x.astype(dt, copy=False)
    B, T, D = x.shape
    hd = D // heads
    qkv = x @ P["self_attn.in_proj_weight"].T + P["self_attn.in_proj_bias"]
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
    s = (q @ k.transpose(0, 1, 3, 2)) * dt(1 / np.sqrt(hd))
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ v
    a = o.transpose(0, 2, 1, 3).reshape(B, T, D) @ P["self_attn.out_proj.weight"].T + P["self_attn.out_proj.bias"]
    h = _layer_norm(x + a, P["norm1.weight"], P["norm1.bias"])
    f = np.maximum(h @ P["linear1.weight"].T + P["linear1.bias"], 0) @ P["linear2.weight"].T + P["linear2.bias"]
    return _layer_norm(h + f, P["norm2.weight"], P["norm2.bias"])


def w7(batch: int, size="full") -> Workload:
    rng = np.random.default_rng(7)
    D, H, F, T = (256, 4, 1024, 64) if size == "full" else (16, 2, 32, 5)
    bd, bf = 1 / np.sqrt(D), 1 / np.sqrt(F)
    u = lambda b, *s: rng.uniform(-b, b, s).astype(np.float32)   # noqa: E731  torch Linear's init
    d = {"self_attn.in_proj_weight": u(np.sqrt(6 / (4 * D)), 3 * D, D), "self_attn.in_proj_bias": u(0.1, 3 * D),
         "self_attn.out_proj.weight": u(bd, D, D), "self_attn.out_proj.bias": u(0.1, D),
         "linear1.weight": u(bd, F, D), "linear1.bias": u(bd, F), "linear2.weight": u(bf, D, F),
         "linear2.bias": u(bf, D), "norm1.weight": 1 + u(0.2, D), "norm1.bias": u(0.1, D),
         "norm2.weight": 1 + u(0.2, D), "norm2.bias": u(0.1, D)}
    d["x"] = rng.standard_normal((batch, T, D)).astype(np.float32)
    flops = 2 * batch * T * (4 * D * D + 2 * T * D + 2 * D * F)
    wl = Workload(f"W7 b{batch}", f"Transformer encoder layer, batch {batch}", d,
                  encoder_forward(d, d["x"], H), flops)
    wl.notes.append(f"heads={H}")
    return wl


def heads_of(wl) -> int:
    return int(next(n for n in wl.notes if n.startswith("heads=")).split("=")[1])


# LeNet (W3) training step, generic dtype: im2col convolutions and their gradients
def _im2col(x, k, pad):
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))   # n c oh ow kh kw
    n, c, oh, ow = cols.shape[:4]
    return np.ascontiguousarray(cols.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * k * k), (n, oh, ow)


def _col2im(dcols, shape, k, pad):
    """The adjoint of _im2col: (n*oh*ow, c*k*k) column gradients summed back into an (n, c, h, w) input."""
    n, c, h, w = shape
    hp, wp = h + 2 * pad, w + 2 * pad
    oh, ow = hp - k + 1, wp - k + 1
    g = dcols.reshape(n, oh, ow, c, k, k)
    out = np.zeros((n, c, hp, wp), dcols.dtype)
    for i in range(k):
        for j in range(k):
            out[:, :, i:i + oh, j:j + ow] += g[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return out[:, :, pad:pad + h, pad:pad + w]


def _pool_fwd(x):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    m = r.max(axis=(3, 5))
    return m, (r == m[:, :, :, None, :, None])


def _pool_bwd(g, mask):
    # ties only occur among ReLU zeros, whose gradient the ReLU then drops
    n, c, h2, _, w2, _ = mask.shape
    return (mask * g[:, :, :, None, :, None]).reshape(n, c, 2 * h2, 2 * w2)


def lenet_train_step(d, lr, dt=np.float64):
    """One SGD step of W3's LeNet on mean softmax cross-entropy (integer labels d['y']): the new
    parameters, flattened in sorted name order."""
    P = {k: v.astype(dt) for k, v in d.items() if k not in ("x", "y")}
    x, y = d["x"].astype(dt), d["y"]
    n = len(x)
    c1, s1 = _im2col(x, 5, 2)
    z1 = (c1 @ P["c1w"].reshape(6, -1).T + P["c1b"]).reshape(n, 28, 28, 6).transpose(0, 3, 1, 2)
    p1, m1 = _pool_fwd(np.maximum(z1, 0))
    c2, s2 = _im2col(p1, 5, 0)
    z2 = (c2 @ P["c2w"].reshape(16, -1).T + P["c2b"]).reshape(n, 10, 10, 16).transpose(0, 3, 1, 2)
    p2, m2 = _pool_fwd(np.maximum(z2, 0))
    a0 = p2.reshape(n, 400)
    a1 = np.maximum(a0 @ P["f1w"] + P["f1b"], 0)
    a2 = np.maximum(a1 @ P["f2w"] + P["f2b"], 0)
    z = a2 @ P["f3w"] + P["f3b"]
    e = np.exp(z - z.max(1, keepdims=True))
    g = e / e.sum(1, keepdims=True)
    g[np.arange(n), y] -= 1
    g /= dt(n)
    G = {"f3w": a2.T @ g, "f3b": g.sum(0)}
    g = (g @ P["f3w"].T) * (a2 > 0)
    G.update(f2w=a1.T @ g, f2b=g.sum(0))
    g = (g @ P["f2w"].T) * (a1 > 0)
    G.update(f1w=a0.T @ g, f1b=g.sum(0))
    g = _pool_bwd((g @ P["f1w"].T).reshape(p2.shape), m2) * (z2 > 0)
    gz = g.transpose(0, 2, 3, 1).reshape(-1, 16)
    G.update(c2w=(gz.T @ c2).reshape(P["c2w"].shape), c2b=gz.sum(0))
    g = _col2im(gz @ P["c2w"].reshape(16, -1), p1.shape, 5, 0)
    g = _pool_bwd(g, m1) * (z1 > 0)
    gz = g.transpose(0, 2, 3, 1).reshape(-1, 6)
    G.update(c1w=(gz.T @ c1).reshape(P["c1w"].shape), c1b=gz.sum(0))
    for k in G:
        P[k] -= dt(lr) * G[k]
    return np.concatenate([P[k].ravel() for k in sorted(P)])


W8_LR = 0.01


def w8(size="full") -> Workload:
    rng = np.random.default_rng(8)
    batch = 64 if size == "full" else 3
    d = lenet_params(rng)
    d["x"] = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    d["y"] = rng.integers(0, 10, batch).astype(np.int64)
    return Workload("W8", f"LeNet training step, batch {batch} (SGD lr {W8_LR})", d, lenet_train_step(d, W8_LR))


def lstm_train_step(d, lr, dt=np.float64):
    """One SGD step of W4's LSTM + a linear head (hw (H, K), hb) on mean softmax cross-entropy of the last
    hidden state (integer labels d['y']), back-propagated through every step: new parameters, flattened
    in sorted name order."""
    P = {k: v.astype(dt) for k, v in d.items() if k not in ("x", "y")}
    x, y = d["x"].astype(dt), d["y"]
    n, T, _ = x.shape
    H = P["whh"].shape[1]
    sig = lambda v: 1 / (1 + np.exp(-v))   # noqa: E731
    xp = x @ P["wih"].T + P["bih"] + P["bhh"]
    h, c = np.zeros((n, H), dt), np.zeros((n, H), dt)
    hs, cs, gates = [h], [c], []
    for t in range(T):
        z = xp[:, t] + h @ P["whh"].T
        i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
        gates.append((i, f, g, o))
        hs.append(h)
        cs.append(c)
    zl = h @ P["hw"] + P["hb"]
    e = np.exp(zl - zl.max(1, keepdims=True))
    gl = e / e.sum(1, keepdims=True)
    gl[np.arange(n), y] -= 1
    gl /= dt(n)
    G = {"hw": h.T @ gl, "hb": gl.sum(0)}
    dh, dc = gl @ P["hw"].T, np.zeros((n, H), dt)
    dwhh, dz_all = np.zeros_like(P["whh"]), np.zeros((n, T, 4 * H), dt)
    for t in reversed(range(T)):
        i, f, g, o = gates[t]
        tc = np.tanh(cs[t + 1])
        do = dh * tc
        dc = dc + dh * o * (1 - tc * tc)
        di, df, dg = dc * g, dc * cs[t], dc * i
        dz = np.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], 1)
        dz_all[:, t] = dz
        dwhh += dz.T @ hs[t]
        dh = dz @ P["whh"]
        dc = dc * f
    G["whh"] = dwhh
    G["wih"] = dz_all.reshape(-1, 4 * H).T @ x.reshape(-1, x.shape[2])
    G["bih"] = G["bhh"] = dz_all.sum((0, 1))
    for k in G:
        P[k] -= dt(lr) * G[k]
    return np.concatenate([P[k].ravel() for k in sorted(P)])


W9_LR = 0.1


def w9(size="full") -> Workload:
    wl4 = w4(size)
    rng = np.random.default_rng(9)
    d = dict(wl4.data)
    H, n = d["whh"].shape[1], d["x"].shape[0]
    K = 10 if size == "full" else 4
    d["hw"] = _w(rng, H, K)
    d["hb"] = _w(rng, K, scale=0.1)
    d["y"] = rng.integers(0, K, n).astype(np.int64)
    return Workload("W9", f"LSTM + head training step (SGD lr {W9_LR}, BPTT over {d['x'].shape[1]} steps)", d,
                    lstm_train_step(d, W9_LR))


def w10(batch: int, size="full") -> Workload:
    """ResNet-18 (benchmarks/resnet.py, torchvision's layout) with random weights and BatchNorm statistics,
    eval mode, exported by torch.onnx.export; data: the ONNX bytes, the torch module and the images.
    The reference is the torch module in float64. Needs torch and onnx (else no system can run it)."""
    import importlib.util
    x = np.random.default_rng(10).standard_normal((batch, 3, 224, 224) if size == "full" else
                                                  (batch, 3, 32, 32)).astype(np.float32)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
        wl = Workload(f"W10 b{batch}", "ResNet-18 from ONNX", {"x": x}, np.zeros(0))
        wl.notes.append("missing: torch and onnx are needed to build the model (pip install graphc[bench])")
        return wl
    import torch
    from .resnet import randomise_batchnorm, resnet18
    torch.manual_seed(10)
    model = resnet18(torch) if size == "full" else resnet18(torch, width=4, blocks=(1, 1, 1, 1), num_classes=10)
    randomise_batchnorm(torch, model, 10)
    d = {"x": x, "onnx": export_onnx(torch, model, x), "torch_model": model}
    with torch.no_grad():
        ref = __import__("copy").deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    flops = 1.82e9 * batch if size == "full" else 0.0
    return Workload(f"W10 b{batch}", f"ResNet-18 from ONNX, batch {batch}", d, ref, flops)


def export_onnx(torch, model, x) -> bytes:
    """The model as ONNX bytes, the way a user exports it (TorchScript exporter, opset 17; ONNX Runtime
    1.31+ reads at most IR version 13)."""
    import io
    import warnings
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x),), buf, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    return buf.getvalue()


#: workload id -> builders of its variants (each: size -> Workload); data is only built when selected
BUILDERS = {
    "W1": [lambda s: w1(1, s), lambda s: w1(256 if s == "full" else 8, s)],
    "W2": [w2],
    "W3": [lambda s: w3(1, s), lambda s: w3(64 if s == "full" else 2, s)],
    "W4": [w4], "W5": [w5], "W6": [w6],
    "W7": [lambda s: w7(1, s), lambda s: w7(16 if s == "full" else 2, s)],
    "W8": [w8], "W9": [w9],
    "W10": [lambda s: w10(1, s), lambda s: w10(8 if s == "full" else 2, s)],
}


def selected_workloads(size="full", only=None) -> list[Workload]:
    """The workloads whose id (e.g. 'W1') or full id (e.g. 'W1 b1') is in `only` (all when empty)."""
    out = []
    for k, builders in BUILDERS.items():
        if only and k not in only and not any(o.split()[0] == k for o in only):
            continue
        for b in builders:
            wl = b(size)
            if not only or k in only or wl.id in only:
                out.append(wl)
    return out
