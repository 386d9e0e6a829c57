"""gc.export_onnx: onnx.checker accepts the model and ONNX Runtime reproduces graphc's outputs."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _ort_matches(model_or_path, f, feeds: list[dict], rtol=1e-5, atol=1e-6):
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    for feed in feeds:
        want = f(*feed.values())
        want = want if isinstance(want, list) else [want]
        got = sess.run(None, feed)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def _mlp(rng):
    x = gc.placeholder("x", (None, 8))
    W1 = gc.parameter("W1", rng.standard_normal((8, 16)).astype(np.float32) * 0.3)
    b1 = gc.parameter("b1", rng.standard_normal(16).astype(np.float32))
    W2 = gc.parameter("W2", rng.standard_normal((16, 4)).astype(np.float32) * 0.3)
    return x, gc.softmax(gc.relu(x @ W1 + b1) @ W2)


def test_mlp_dynamic_batch(tmp_path, rng):
    x, y = _mlp(rng)
    f = gc.function([x], y)
    path = tmp_path / "mlp.onnx"
    model = gc.export_onnx(f, path)
    onnx.checker.check_model(onnx.load(path))
    assert model.ir_version <= 10
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N" and not dim0.HasField("dim_value")
    assert {i.name for i in model.graph.initializer} >= {"W1", "b1", "W2"}
    _ort_matches(path, f, [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (1, 5, 32)])


def test_export_from_inputs_outputs_and_optimised_graph(tmp_path, rng):
    x, y = _mlp(rng)
    f = gc.function([x], y)
    m1 = gc.export_onnx([x], [y], tmp_path / "a.onnx")
    m2 = gc.export_onnx(f.graph, tmp_path / "b.onnx")  # optimised: fused kernels exported inline
    feeds = [{"x": rng.standard_normal((3, 8)).astype(np.float32)}]
    _ort_matches(m1, f, feeds)
    _ort_matches(m2, lambda v: [f(v)], feeds)


def test_shape_ops_symbolic_reshape_and_indexing(rng):
    x = gc.placeholder("x", (None, 8))
    h = gc.reshape(x, (-1, 4, 2))[:, 1:, ::-1]                   # symbolic -1, reversed slice
    g = gc.reshape(h, (x.shape[0], 6))[:, None, 2:5]             # dims computed from the input shape
    s = gc.sum(g * g, axis=(1, 2)) / gc.cast(gc.size_of(x, (0,), "int64"), "float32")
    a = gc.cast(gc.argmax(x, None, keepdims=False), "float32") + gc.max(x, axis=1)[0]
    i = gc.take(x, gc.constant(np.array([3, 0, -1])), axis=1)
    c = gc.where(x > 0, gc.expm1(x), gc.log1p(gc.abs(x))) + gc.rsqrt(x * x + 1.0)
    d = gc.concatenate([x, gc.transpose(gc.reshape(x, (-1, 2, 4)), (0, 2, 1)).reshape(-1, 8)], 1)
    outs = [g, s, a, i, c, d, x.mean(axis=0), gc.cast(x > 0.5, "int32") + 2, gc.logsumexp(x, 1),
            gc.zeros_like(x) + gc.ones_like(x), gc.leaky_relu(x, 0.1), x != 0.25]
    f = gc.function([x], outs)
    _ort_matches(gc.export_onnx([x], outs), f, [{"x": rng.standard_normal((n, 8)).astype(np.float32)}
                                                  for n in (2, 5)])


def test_mixed_dtypes_follow_graphc_promotion(rng):
    a = gc.placeholder("a", (3,), "int32")
    b = gc.placeholder("b", (3,), "float64")
    outs = [a + b, a / 2, gc.sum(a), a < b, gc.maximum(a, 1)]
    f = gc.function([a, b], outs)
    _ort_matches(gc.export_onnx([a, b], outs), f,
                 [{"a": np.array([1, -2, 3], np.int32), "b": rng.standard_normal(3)}], rtol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_as_onnx_scan(kind, bidirectional, rng, tmp_path):
    x = gc.placeholder("x", (None, 5, 3))
    layer = getattr(gc.nn, kind)(3, 4, num_layers=2, bidirectional=bidirectional)
    y, state = layer(x)
    h = state[0] if isinstance(state, tuple) else state
    f = gc.function([x], [y, h])
    model = gc.export_onnx(f, tmp_path / "rnn.onnx")
    assert any(n.op_type == "Scan" for n in model.graph.node)
    _ort_matches(model, f, [{"x": rng.standard_normal((n, 5, 3)).astype(np.float32)} for n in (1, 4)])


def test_unsupported_ops_listed_at_once():
    x = gc.placeholder("x", (4,))
    g = gc.grad(gc.sum(x[1:3] ** 2) + gc.sum(gc.take(x, gc.constant(np.array([0, 0])))), x)
    with pytest.raises(gc.GraphcError, match="index_grad.*take_grad|take_grad.*index_grad"):
        gc.export_onnx([x], [g])


def test_round_trip_through_import(rng, tmp_path):
    x, y = _mlp(rng)
    f = gc.function([x], y)
    gc.export_onnx(f, tmp_path / "m.onnx")
    g = gc.load_onnx(tmp_path / "m.onnx")
    xv = rng.standard_normal((6, 8)).astype(np.float32)
    np.testing.assert_allclose(gc.function(g)(xv)[0], f(xv), rtol=1e-6, atol=1e-7)


def _set_bn_stats(model, rng):
    for k, p in model._walk("named_buffers").items():
        p.set_value(rng.uniform(0.5, 1.5, p.shape) if k.endswith("running_var") else rng.uniform(-0.3, 0.3, p.shape))


def test_lenet_built_with_gc_nn(rng, tmp_path):
    nn = gc.nn
    net = nn.Sequential(nn.Conv2D(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2D(2),
                        nn.Conv2D(6, 16, 5), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(),
                        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    x = gc.placeholder("x", (None, 1, 28, 28))
    f = gc.function([x], gc.softmax(net(x, training=False)))
    model = gc.export_onnx(f, tmp_path / "lenet.onnx")
    assert {"Conv", "MaxPool"} <= {n.op_type for n in model.graph.node}
    _ort_matches(model, f, [{"x": rng.standard_normal((n, 1, 28, 28)).astype(np.float32)} for n in (1, 3)])
    back = gc.function(gc.load_onnx(model))  # and graphc reads its own export back
    xv = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(back(xv)[0], f(xv), rtol=1e-5, atol=1e-6)


def test_batch_norm_dropout_network_in_inference_mode(rng, tmp_path):
    nn = gc.nn
    net = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(), nn.Dropout(0.5),
                        nn.AvgPool2D(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1D(16), nn.Tanh(),
                        nn.Dropout(0.2), nn.Linear(16, 5))
    _set_bn_stats(net, rng)
    net.eval()
    x = gc.placeholder("x", (None, 3, 8, 8))
    f = gc.function([x], net(x))
    model = gc.export_onnx(f, tmp_path / "bn.onnx")
    assert not any(n.op_type.startswith("Random") for n in model.graph.node)  # dropout is the identity
    _ort_matches(model, f, [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in (2, 6)],
                 rtol=1e-4, atol=1e-5)


def test_convolution_gradient_exports_as_conv_transpose(rng):
    x = gc.placeholder("x", (2, 3, 7, 7))
    w = gc.parameter("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    loss = gc.sum(gc.conv2d(x, w, stride=2, padding=1) ** 2)
    gx = gc.grad(loss, x)
    f = gc.function([x], gx)
    feeds = [{"x": rng.standard_normal((2, 3, 7, 7)).astype(np.float32)}]
    _ort_matches(gc.export_onnx([x], [gx]), lambda v: [f(v)], feeds, rtol=1e-4, atol=1e-4)
