"""Peers: PyTorch eager and torch.compile, ONNX Runtime (models written with onnx.helper), JAX jit and
PyTensor, each used only when installed (`pip install graphc[bench]`)."""
from __future__ import annotations

import importlib.util

import numpy as np

from .systems import Missing, wid


def _need(mod: str):
    if importlib.util.find_spec(mod) is None:
        raise Missing("not installed")
    return importlib.import_module(mod)


# ---- PyTorch --------------------------------------------------------------------------------------------

def torch_builder(compiled: bool):
    def build(wl):
        torch = _need("torch")
        if compiled and wid(wl) == "W5":
            raise Missing("-")
        fn = _torch_fn(torch, wl)
        if compiled:
            fn = torch.compile(fn)
        if wid(wl) == "W5":
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
    return lambda: T["a"] @ T["b"]


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
    if k == "W5":
        raise Missing("-")
    nodes, inits, feeds, out_name = _onnx_graph(k, wl.data, helper, numpy_helper)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in feeds.items()]
    outs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)]
    model = helper.make_model(helper.make_graph(nodes, wl.id.replace(" ", "_"), ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8   # ONNX Runtime 1.31+ rejects IR version 14 (onnx 1.23's default)
    opts = ort.SessionOptions()
    if _threads():
        opts.intra_op_num_threads = _threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)[0]


def _onnx_graph(k, d, helper, nh):
    N = helper.make_node
    init = lambda name, v: nh.from_array(np.asarray(v, np.float32), name)   # noqa: E731
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
    raise Missing("not written for JAX")


def pytensor_build(wl):
    _need("pytensor")
    raise Missing("not written for PyTensor")
