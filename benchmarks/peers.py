"""Peers: PyTorch eager and torch.compile, ONNX Runtime (models written with onnx.helper), JAX jit and
PyTensor, each used only when installed (`pip install graphc[bench]`)."""
from __future__ import annotations

import importlib.util

import numpy as np

from . import workloads as W
from .systems import Missing, needs, wid

#: workloads that are training steps (a call returns the updated parameters)
TRAINING = ("W5", "W8", "W9")


def _need(mod: str):
    if importlib.util.find_spec(mod) is None:
        raise Missing("not installed")
    return importlib.import_module(mod)


# ---- PyTorch --------------------------------------------------------------------------------------------

def torch_builder(compiled: bool):
    def build(wl):
        torch = _need("torch")
        needs(wl)
        if compiled and wid(wl) in TRAINING:
            raise Missing("-")
        fn = _torch_fn(torch, wl)
        if compiled:
            fn = torch.compile(fn)
        if wid(wl) in TRAINING:
            return fn

        def run():
            with torch.inference_mode():
                return fn().numpy()
        return run
    return build


def _threads() -> int:
    import os
    return int(os.environ.get("GRAPHC_BENCH_THREADS", "0"))


def _torch_fn(torch, wl):
    import torch.nn.functional as F
    if _threads():
        torch.set_num_threads(_threads())
    k = wid(wl)
    T = {n: torch.from_numpy(v) for n, v in wl.data.items() if isinstance(v, np.ndarray)}
    if k == "W1":
        return lambda: torch.softmax(F.linear(F.relu(F.linear(F.relu(F.linear(T["x"], T["w0"].T, T["b0"])),
                                                               T["w1"].T, T["b1"])), T["w2"].T, T["b2"]), -1)
    if k == "W2":
        a, b = wl.data["a"], wl.data["b"]
        return lambda: torch.tanh(T["x"] * a + b) * torch.sigmoid(T["x"]) + torch.exp(-T["x"] * T["x"])
    if k == "W3":
        def lenet():
            h = F.max_pool2d(F.relu(F.conv2d(T["x"], T["c1w"], T["c1b"], padding=2)), 2)
            h = F.max_pool2d(F.relu(F.conv2d(h, T["c2w"], T["c2b"])), 2).flatten(1)
            h = F.relu(h @ T["f1w"] + T["f1b"])
            return F.relu(h @ T["f2w"] + T["f2b"]) @ T["f3w"] + T["f3b"]
        return lenet
    if k == "W4":
        n, t, c = wl.data["x"].shape
        lstm = torch.nn.LSTM(c, wl.data["whh"].shape[1], batch_first=True)
        lstm.load_state_dict({"weight_ih_l0": T["wih"], "weight_hh_l0": T["whh"], "bias_ih_l0": T["bih"],
                              "bias_hh_l0": T["bhh"]})
        return lambda: lstm(T["x"])[1][0][0]
    if k == "W5":
        return _torch_train(torch, wl)
    if k == "W7":
        layer = _torch_encoder(torch, wl)
        return lambda: layer(T["x"])
    if k == "W8":
        return _torch_sgd(torch, wl, W.W8_LR, lambda P, x: _torch_lenet(F, P, x))
    if k == "W9":
        n, t, c = wl.data["x"].shape
        lstm = torch.nn.LSTM(c, wl.data["whh"].shape[1], batch_first=True)
        keys = {"wih": "weight_ih_l0", "whh": "weight_hh_l0", "bih": "bias_ih_l0", "bhh": "bias_hh_l0"}

        def forward(P, x):
            h = torch.func.functional_call(lstm, {keys[k]: P[k] for k in keys}, (x,))[1][0][0]
            return h @ P["hw"] + P["hb"]
        return _torch_sgd(torch, wl, W.W9_LR, forward)
    if k == "W10":
        model, x = wl.data["torch_model"], T["x"]
        return lambda: model(x)
    return lambda: T["a"] @ T["b"]


def _torch_encoder(torch, wl):
    d = wl.data
    layer = torch.nn.TransformerEncoderLayer(d["x"].shape[2], W.heads_of(wl), d["linear1.weight"].shape[0],
                                             dropout=0.0, batch_first=True)
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in d.items() if k != "x"})
    return layer.eval()


def _torch_lenet(F, P, x):
    h = F.max_pool2d(F.relu(F.conv2d(x, P["c1w"], P["c1b"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, P["c2w"], P["c2b"])), 2).flatten(1)
    h = F.relu(h @ P["f1w"] + P["f1b"])
    return F.relu(h @ P["f2w"] + P["f2b"]) @ P["f3w"] + P["f3b"]


def _torch_sgd(torch, wl, lr, forward):
    """A torch training step: forward(params, x) -> logits, mean cross-entropy, backward, SGD."""
    import torch.nn.functional as F
    ps = {k: torch.tensor(v, requires_grad=True) for k, v in wl.data.items() if k not in ("x", "y")}
    opt = torch.optim.SGD(list(ps.values()), lr=lr)
    x, y = torch.from_numpy(wl.data["x"]), torch.from_numpy(wl.data["y"])

    def step():
        loss = F.cross_entropy(forward(ps, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return np.concatenate([ps[k].detach().numpy().ravel() for k in sorted(ps)])
    return step


def _torch_train(torch, wl):
    import torch.nn.functional as F
    ps = {k: torch.tensor(wl.data[k], requires_grad=True) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    opt = torch.optim.SGD(list(ps.values()), lr=0.1)
    x, t = torch.from_numpy(wl.data["x"]), torch.from_numpy(wl.data["t"])

    def step():
        h = F.relu(x @ ps["w0"] + ps["b0"])
        h = F.relu(h @ ps["w1"] + ps["b1"])
        loss = -(t * torch.log_softmax(h @ ps["w2"] + ps["b2"], 1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return np.concatenate([ps[k].detach().numpy().ravel() for k in sorted(ps)])
    return step


# ---- ONNX Runtime ---------------------------------------------------------------------------------------

def ort_build(wl):
    _need("onnxruntime")
    _need("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    k = wid(wl)
    needs(wl)
    if k in TRAINING:
        raise Missing("-")
    if k == "W10":   # the model exported from torch, as a user deploying it would
        model, feeds = wl.data["onnx"], {"x": wl.data["x"]}
    else:   # torch 2.13's TorchScript exporter fails on TransformerEncoderLayer: W7 is written by hand too
        nodes, inits, feeds, out_name = _onnx_graph(k, wl.data, helper, numpy_helper, wl)
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in feeds.items()]
        outs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)]
        m = helper.make_model(helper.make_graph(nodes, wl.id.replace(" ", "_"), ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8   # ONNX Runtime 1.31+ rejects IR version 14 (onnx 1.23's default)
        model = m.SerializeToString()
    opts = ort.SessionOptions()
    if _threads():
        opts.intra_op_num_threads = _threads()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)[0]


def _onnx_graph(k, d, helper, nh, wl=None):
    N = helper.make_node
    init = lambda name, v: nh.from_array(np.asarray(v, np.float32), name)   # noqa: E731
    if k == "W7":
        return _onnx_encoder(d, W.heads_of(wl), N, init, nh)
    if k == "W1":
        nodes = [N("MatMul", ["x", "w0"], ["m0"]), N("Add", ["m0", "b0"], ["a0"]), N("Relu", ["a0"], ["r0"]),
                 N("MatMul", ["r0", "w1"], ["m1"]), N("Add", ["m1", "b1"], ["a1"]), N("Relu", ["a1"], ["r1"]),
                 N("MatMul", ["r1", "w2"], ["m2"]), N("Add", ["m2", "b2"], ["a2"]), N("Softmax", ["a2"], ["y"])]
        return nodes, [init(n, d[n]) for n in ("w0", "b0", "w1", "b1", "w2", "b2")], {"x": d["x"]}, "y"
    if k == "W2":
        nodes = [N("Mul", ["x", "a"], ["xa"]), N("Add", ["xa", "b"], ["xab"]), N("Tanh", ["xab"], ["t"]),
                 N("Sigmoid", ["x"], ["s"]), N("Mul", ["t", "s"], ["ts"]), N("Mul", ["x", "x"], ["xx"]),
                 N("Neg", ["xx"], ["nxx"]), N("Exp", ["nxx"], ["e"]), N("Add", ["ts", "e"], ["y"])]
        return nodes, [init("a", d["a"]), init("b", d["b"])], {"x": d["x"]}, "y"
    if k == "W3":
        nodes = [N("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[2, 2, 2, 2]), N("Relu", ["c1"], ["r1"]),
                 N("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
                 N("Conv", ["p1", "c2w", "c2b"], ["c2"]), N("Relu", ["c2"], ["r2"]),
                 N("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]), N("Flatten", ["p2"], ["fl"]),
                 N("Gemm", ["fl", "f1w", "f1b"], ["g1"]), N("Relu", ["g1"], ["h1"]),
                 N("Gemm", ["h1", "f2w", "f2b"], ["g2"]), N("Relu", ["g2"], ["h2"]),
                 N("Gemm", ["h2", "f3w", "f3b"], ["y"])]
        return nodes, [init(n, v) for n, v in d.items() if n != "x"], {"x": d["x"]}, "y"
    if k == "W4":
        H = d["whh"].shape[1]
        order = lambda w: np.concatenate([w[0:H], w[3 * H:4 * H], w[H:2 * H], w[2 * H:3 * H]])  # noqa: E731 ifgo->iofc
        inits = [init("W", order(d["wih"])[None]), init("R", order(d["whh"])[None]),
                 init("B", np.concatenate([order(d["bih"]), order(d["bhh"])])[None])]
        xs = np.ascontiguousarray(d["x"].transpose(1, 0, 2))
        nodes = [N("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=H),
                 N("Squeeze", ["Y_h", "ax0"], ["y"])]
        inits.append(nh.from_array(np.array([0], np.int64), "ax0"))
        return nodes, inits, {"x": xs}, "y"
    return [N("MatMul", ["a", "b"], ["y"])], [], {"a": d["a"], "b": d["b"]}, "y"


def _onnx_encoder(d, heads, N, init, nh):
    """W7 as ONNX (opset 17): per-head attention by Reshape/Transpose/MatMul/Softmax, LayerNormalization."""
    B, T, D = d["x"].shape
    hd = D // heads
    wi, bi = d["self_attn.in_proj_weight"], d["self_attn.in_proj_bias"]
    inits = [init(f"w{c}", wi[i * D:(i + 1) * D].T) for i, c in enumerate("qkv")]
    inits += [init(f"b{c}", bi[i * D:(i + 1) * D]) for i, c in enumerate("qkv")]
    inits += [init("wo", d["self_attn.out_proj.weight"].T), init("bo", d["self_attn.out_proj.bias"]),
              init("w1", d["linear1.weight"].T), init("b1", d["linear1.bias"]), init("w2", d["linear2.weight"].T),
              init("b2", d["linear2.bias"]), init("scale", np.float32(1 / np.sqrt(hd)))]
    inits += [init(f"{n}{i}", d[f"norm{i}.{w}"]) for i in (1, 2) for n, w in (("g", "weight"), ("be", "bias"))]
    inits += [nh.from_array(np.array([B, T, heads, hd], np.int64), "heads_shape"),
              nh.from_array(np.array([B, T, D], np.int64), "model_shape")]
    nodes = []
    for c in "qkv":
        nodes += [N("MatMul", ["x", f"w{c}"], [f"{c}m"]), N("Add", [f"{c}m", f"b{c}"], [f"{c}a"]),
                  N("Reshape", [f"{c}a", "heads_shape"], [f"{c}r"]),
                  N("Transpose", [f"{c}r"], [f"{c}t"], perm=[0, 2, 3, 1] if c == "k" else [0, 2, 1, 3])]
    nodes += [N("MatMul", ["qt", "kt"], ["s"]), N("Mul", ["s", "scale"], ["ss"]), N("Softmax", ["ss"], ["p"], axis=-1),
              N("MatMul", ["p", "vt"], ["o"]), N("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              N("Reshape", ["ot", "model_shape"], ["or"]), N("MatMul", ["or", "wo"], ["am"]),
              N("Add", ["am", "bo"], ["a"]), N("Add", ["x", "a"], ["r1"]),
              N("LayerNormalization", ["r1", "g1", "be1"], ["h"], axis=-1, epsilon=1e-5),
              N("MatMul", ["h", "w1"], ["f1"]), N("Add", ["f1", "b1"], ["f2"]), N("Relu", ["f2"], ["f3"]),
              N("MatMul", ["f3", "w2"], ["f4"]), N("Add", ["f4", "b2"], ["f5"]), N("Add", ["h", "f5"], ["r2"]),
              N("LayerNormalization", ["r2", "g2", "be2"], ["y"], axis=-1, epsilon=1e-5)]
    return nodes, inits, {"x": d["x"]}, "y"


# ---- JAX and PyTensor -------------------------------------------------------------------------------------

def jax_build(wl):
    jax = _need("jax")
    jnp = jax.numpy
    d, k = {n: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for n, v in wl.data.items()}, wid(wl)
    if k == "W1":
        f = jax.jit(lambda x: jax.nn.softmax(jax.nn.relu(jax.nn.relu(x @ d["w0"] + d["b0"]) @ d["w1"] + d["b1"])
                                             @ d["w2"] + d["b2"]))
        return lambda: np.asarray(f(d["x"]).block_until_ready())
    if k == "W2":
        f = jax.jit(lambda x: jnp.tanh(x * d["a"] + d["b"]) * jax.nn.sigmoid(x) + jnp.exp(-x * x))
        return lambda: np.asarray(f(d["x"]).block_until_ready())
    if k == "W6":
        f = jax.jit(lambda a, b: a @ b)
        return lambda: np.asarray(f(d["a"], d["b"]).block_until_ready())
    if k == "W7":
        f = jax.jit(lambda x: _jax_encoder(jax, d, x, W.heads_of(wl)))
        return lambda: np.asarray(f(d["x"]).block_until_ready())
    if k == "W8":
        return _jax_sgd(jax, wl, W.W8_LR, lambda P, x: _jax_lenet(jax, P, x))
    if k == "W9":
        return _jax_sgd(jax, wl, W.W9_LR, lambda P, x: _jax_lstm(jax, P, x) @ P["hw"] + P["hb"])
    raise Missing("not written for JAX")


def _jax_ln(jnp, x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + 1e-5) * g + b


def _jax_encoder(jax, P, x, heads):
    jnp = jax.numpy
    B, T, D = x.shape
    hd = D // heads
    qkv = x @ P["self_attn.in_proj_weight"].T + P["self_attn.in_proj_bias"]
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
    p = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), axis=-1)
    a = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, D) @ P["self_attn.out_proj.weight"].T + P["self_attn.out_proj.bias"]
    h = _jax_ln(jnp, x + a, P["norm1.weight"], P["norm1.bias"])
    f = jax.nn.relu(h @ P["linear1.weight"].T + P["linear1.bias"]) @ P["linear2.weight"].T + P["linear2.bias"]
    return _jax_ln(jnp, h + f, P["norm2.weight"], P["norm2.bias"])


def _jax_lenet(jax, P, x):
    lax = jax.lax

    def conv(h, w, b, pad):
        y = lax.conv_general_dilated(h, w, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y + b.reshape(1, -1, 1, 1)

    def pool(h):
        return lax.reduce_window(h, -np.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    h = pool(jax.nn.relu(conv(x, P["c1w"], P["c1b"], 2)))
    h = pool(jax.nn.relu(conv(h, P["c2w"], P["c2b"], 0))).reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ P["f1w"] + P["f1b"])
    return jax.nn.relu(h @ P["f2w"] + P["f2b"]) @ P["f3w"] + P["f3b"]


def _jax_lstm(jax, P, x):
    """Last hidden state of W4's LSTM (torch gate order i, f, g, o), a lax.scan over time."""
    jnp = jax.numpy
    H = P["whh"].shape[1]
    xp = x @ P["wih"].T + P["bih"] + P["bhh"]

    def cell(carry, z_in):
        h, c = carry
        z = z_in + h @ P["whh"].T
        i, f = jax.nn.sigmoid(z[:, :H]), jax.nn.sigmoid(z[:, H:2 * H])
        g, o = jnp.tanh(z[:, 2 * H:3 * H]), jax.nn.sigmoid(z[:, 3 * H:])
        c = f * c + i * g
        return (o * jnp.tanh(c), c), None
    zero = jnp.zeros((x.shape[0], H), x.dtype)
    (h, _), _ = jax.lax.scan(cell, (zero, zero), xp.transpose(1, 0, 2))
    return h


def _jax_sgd(jax, wl, lr, forward):
    """A jitted training step: mean softmax cross-entropy of forward(params, x), gradient, SGD."""
    jnp = jax.numpy
    params = {k: jnp.asarray(v) for k, v in wl.data.items() if k not in ("x", "y")}
    x, y = jnp.asarray(wl.data["x"]), jnp.asarray(wl.data["y"].astype(np.int32))

    def loss(P):
        logp = jax.nn.log_softmax(forward(P, x), axis=-1)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()
    update = jax.jit(lambda P: jax.tree_util.tree_map(lambda p, g: p - lr * g, P, jax.grad(loss)(P)))
    state = [params]

    def step():
        state[0] = update(state[0])
        return np.concatenate([np.asarray(state[0][k]).ravel() for k in sorted(state[0])])
    return step


def pytensor_build(wl):
    _need("pytensor")
    raise Missing("not written for PyTensor")
