"""One builder per system: build(workload) -> a zero-argument callable returning the output as a NumPy
array (W5: the updated parameters, flattened in sorted name order). Missing(reason) when a system
cannot run a workload (not installed, op missing, no training support)."""
from __future__ import annotations

import numpy as np

from . import workloads as W


class Missing(Exception):
    """This system cannot run this workload here (the message says why)."""


def wid(wl) -> str:
    return wl.id.split()[0]


# ---- graphc ---------------------------------------------------------------------------------------------

def graphc_builder(backend: str, optimize: int):
    def build(wl):
        import graphc as gc
        needs(wl)
        if wid(wl) == "W7":
            return _g_w7(gc, wl.data, backend, optimize, W.heads_of(wl))
        fn = _GRAPHC[wid(wl)]
        return fn(gc, wl.data, backend, optimize)
    return build


def _calls(f, *args, after=None):
    """The zero-argument call of compiled function f on args (`.function`, `.args` kept for f.explain)."""
    run = (lambda: f(*args)) if after is None else (lambda: after(f(*args)))
    run.function, run.args = f, args
    return run


def _gc_mlp(gc, d, n_in, params=None):
    ps = params or {k: gc.parameter(k, d[k]) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    x = gc.placeholder("x", (None, n_in))
    h = gc.relu(x @ ps["w0"] + ps["b0"])
    h = gc.relu(h @ ps["w1"] + ps["b1"])
    return x, ps, h @ ps["w2"] + ps["b2"]


def _g_w1(gc, d, backend, opt):
    x, _, z = _gc_mlp(gc, d, d["x"].shape[1])
    f = gc.function([x], gc.softmax(z, axis=-1), backend=backend, optimize=opt)
    return _calls(f, d["x"])


def _g_w2(gc, d, backend, opt):
    x = gc.placeholder("x", d["x"].shape)
    y = gc.tanh(x * d["a"] + d["b"]) * gc.sigmoid(x) + gc.exp(-x * x)
    f = gc.function([x], y, backend=backend, optimize=opt)
    return _calls(f, d["x"])


def _g_w3(gc, d, backend, opt):
    if not (hasattr(gc, "conv2d") and hasattr(gc, "max_pool2d")):
        raise Missing("n/a (missing op: conv2d/max_pool2d)")
    p = {k: gc.parameter(k, v) for k, v in d.items() if k != "x"}
    x = gc.placeholder("x", (None, 1, 28, 28))
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, p["c1w"], p["c1b"], padding=2)), 2)
    h = gc.max_pool2d(gc.relu(gc.conv2d(h, p["c2w"], p["c2b"])), 2)
    h = gc.reshape(h, (-1, 400))
    h = gc.relu(h @ p["f1w"] + p["f1b"])
    h = gc.relu(h @ p["f2w"] + p["f2b"])
    f = gc.function([x], h @ p["f3w"] + p["f3b"], backend=backend, optimize=opt)
    return _calls(f, d["x"])


def _g_w4(gc, d, backend, opt):
    try:
        LSTM = gc.nn.LSTM
    except AttributeError:
        raise Missing("n/a (missing op: gc.nn.LSTM)") from None
    n, t, c = d["x"].shape
    lstm = LSTM(c, d["whh"].shape[1])
    lstm.load_state_dict({"weight_ih_l0": d["wih"], "weight_hh_l0": d["whh"], "bias_ih_l0": d["bih"],
                          "bias_hh_l0": d["bhh"]})
    x = gc.placeholder("x", (None, t, c))
    _, (h, _c) = lstm(x)
    f = gc.function([x], h[0], backend=backend, optimize=opt)
    return _calls(f, d["x"])


def _g_w5(gc, d, backend, opt):
    x, ps, z = _gc_mlp(gc, d, d["x"].shape[1])
    t = gc.placeholder("t", (None, d["t"].shape[1]))
    loss = -gc.mean(gc.sum(t * gc.log_softmax(z, axis=1), axis=1))
    names = sorted(ps)
    grads = gc.grad(loss, [ps[k] for k in names])
    f = gc.function([x, t], loss, updates=[(ps[k], ps[k] - 0.1 * g) for k, g in zip(names, grads)],
                    backend=backend, optimize=opt)

    def step():
        f(d["x"], d["t"])
        return np.concatenate([ps[k].value.ravel() for k in names])
    step.function, step.args = f, (d["x"], d["t"])
    return step


def _g_w6(gc, d, backend, opt):
    a, b = gc.placeholder("a", d["a"].shape), gc.placeholder("b", d["b"].shape)
    f = gc.function([a, b], a @ b, backend=backend, optimize=opt)
    return _calls(f, d["a"], d["b"])


def _g_w7(gc, d, backend, opt, heads):
    D = d["x"].shape[2]
    layer = gc.nn.TransformerEncoderLayer(D, heads, dim_feedforward=d["linear1.weight"].shape[0], dropout=0.0,
                                          batch_first=True)
    layer.load_state_dict({k: v for k, v in d.items() if k != "x"})
    layer.eval()
    x = gc.placeholder("x", (None,) + d["x"].shape[1:])
    f = gc.function([x], layer(x), backend=backend, optimize=opt)
    return _calls(f, d["x"])


def _lenet(gc, p, x):
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, p["c1w"], p["c1b"], padding=2)), 2)
    h = gc.max_pool2d(gc.relu(gc.conv2d(h, p["c2w"], p["c2b"])), 2)
    h = gc.reshape(h, (-1, 400))
    h = gc.relu(h @ p["f1w"] + p["f1b"])
    h = gc.relu(h @ p["f2w"] + p["f2b"])
    return h @ p["f3w"] + p["f3b"]


def _sgd_step(gc, inputs, loss, ps, lr, backend, opt, data):
    """f(inputs) computing the loss and writing `p - lr * grad` into every parameter; a call returns the
    new parameters flattened in sorted name order (what the reference computes for the first step)."""
    names = sorted(ps)
    grads = gc.grad(loss, [ps[k] for k in names])
    f = gc.function(inputs, loss, updates=[(ps[k], ps[k] - lr * g) for k, g in zip(names, grads)],
                    backend=backend, optimize=opt)

    def step():   # the first call's result is checked against the reference; later calls keep training
        f(*data)
        return np.concatenate([ps[k].value.ravel() for k in names])
    step.function, step.args = f, tuple(data)
    return step


def _g_w8(gc, d, backend, opt):
    p = {k: gc.parameter(k, v) for k, v in d.items() if k not in ("x", "y")}
    x, y = gc.placeholder("x", (None, 1, 28, 28)), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(_lenet(gc, p, x), y)
    return _sgd_step(gc, [x, y], loss, p, W.W8_LR, backend, opt, (d["x"], d["y"]))


def _g_w9(gc, d, backend, opt):
    n, t, c = d["x"].shape
    lstm = gc.nn.LSTM(c, d["whh"].shape[1])
    lstm.load_state_dict({"weight_ih_l0": d["wih"], "weight_hh_l0": d["whh"], "bias_ih_l0": d["bih"],
                          "bias_hh_l0": d["bhh"]})
    names = {"wih": "weight_ih_l0", "whh": "weight_hh_l0", "bih": "bias_ih_l0", "bhh": "bias_hh_l0"}
    p = {k: lstm.named_params[v] for k, v in names.items()}
    p.update(hw=gc.parameter("hw", d["hw"]), hb=gc.parameter("hb", d["hb"]))
    x, y = gc.placeholder("x", (None, t, c)), gc.placeholder("y", (None,), "int64")
    _, (h, _c) = lstm(x)
    loss = gc.losses.cross_entropy(h[0] @ p["hw"] + p["hb"], y)
    return _sgd_step(gc, [x, y], loss, p, W.W9_LR, backend, opt, (d["x"], d["y"]))


def _g_w10(gc, d, backend, opt):
    f = gc.function(gc.load_onnx(d["onnx"]), backend=backend, optimize=opt)   # one output: [y]
    return _calls(f, d["x"], after=lambda out: out[0])


_GRAPHC = {"W1": _g_w1, "W2": _g_w2, "W3": _g_w3, "W4": _g_w4, "W5": _g_w5, "W6": _g_w6, "W8": _g_w8,
           "W9": _g_w9, "W10": _g_w10}


def needs(wl) -> None:
    """Missing when the workload could not be built here (W10 without torch/onnx)."""
    for n in wl.notes:
        if n.startswith("missing: "):
            raise Missing(n[len("missing: "):])


# ---- NumPy by hand ------------------------------------------------------------------------------------------

def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_build(wl):
    d, k = wl.data, wid(wl)
    needs(wl)
    if k == "W7":
        heads = W.heads_of(wl)
        return lambda: W.encoder_forward(d, d["x"], heads, np.float32)
    if k == "W8":
        return lambda: W.lenet_train_step(d, W.W8_LR, np.float32)
    if k == "W9":
        return lambda: W.lstm_train_step(d, W.W9_LR, np.float32)
    if k == "W10":
        raise Missing("not written in NumPy")
    if k == "W1":
        return lambda: _np_softmax(np.maximum(np.maximum(d["x"] @ d["w0"] + d["b0"], 0) @ d["w1"] + d["b1"], 0)
                                   @ d["w2"] + d["b2"])
    if k == "W2":
        x, a, b = d["x"], np.float32(d["a"]), np.float32(d["b"])
        return lambda: np.tanh(x * a + b) * (1 / (1 + np.exp(-x))) + np.exp(-x * x)
    if k == "W3":
        return lambda: _np_lenet(d)
    if k == "W4":
        return lambda: _np_lstm(d)
    if k == "W5":
        return _np_train(d)
    return lambda: d["a"] @ d["b"]


def _np_conv(x, w, b, pad):
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, c, kh, kw = w.shape
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))   # n c oh ow kh kw
    n, _, oh, ow = cols.shape[:4]
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    y = cols @ w.reshape(o, -1).T + b
    return y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def _np_pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _np_lenet(d):
    h = _np_pool(np.maximum(_np_conv(d["x"], d["c1w"], d["c1b"], 2), 0))
    h = _np_pool(np.maximum(_np_conv(h, d["c2w"], d["c2b"], 0), 0)).reshape(len(d["x"]), -1)
    h = np.maximum(h @ d["f1w"] + d["f1b"], 0)
    h = np.maximum(h @ d["f2w"] + d["f2b"], 0)
    return h @ d["f3w"] + d["f3b"]


def _np_lstm(d):
    x, H = d["x"], d["whh"].shape[1]
    n = x.shape[0]
    h, c = np.zeros((n, H), np.float32), np.zeros((n, H), np.float32)
    xp = x @ d["wih"].T + (d["bih"] + d["bhh"])
    whT = np.ascontiguousarray(d["whh"].T)
    for t in range(x.shape[1]):
        z = xp[:, t] + h @ whT
        i, f, o = (1 / (1 + np.exp(-z[:, s:s + H])) for s in (0, H, 3 * H))
        c = f * c + i * np.tanh(z[:, 2 * H:3 * H])
        h = o * np.tanh(c)
    return h


def _np_train(d):
    W = {k: d[k].copy() for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    x, t = d["x"], d["t"]

    def step():
        h1 = np.maximum(x @ W["w0"] + W["b0"], 0)
        h2 = np.maximum(h1 @ W["w1"] + W["b1"], 0)
        g = (_np_softmax(h2 @ W["w2"] + W["b2"]) - t) / np.float32(len(x))
        g2 = (g @ W["w2"].T) * (h2 > 0)
        g1 = (g2 @ W["w1"].T) * (h1 > 0)
        for k, gv in (("w2", h2.T @ g), ("b2", g.sum(0)), ("w1", h1.T @ g2), ("b1", g2.sum(0)),
                      ("w0", x.T @ g1), ("b0", g1.sum(0))):
            W[k] -= np.float32(0.1) * gv
        return np.concatenate([W[k].ravel() for k in sorted(W)])
    return step
