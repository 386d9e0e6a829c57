"""Real models exported by PyTorch 2.13 (legacy exporter, dynamic batch) imported with gc.load_onnx:
graphc's outputs match torch's; re-exported with gc.export_onnx, ONNX Runtime matches graphc."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import graphc as gc
from tests.conftest import backend_or_skip

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
pytest.importorskip("onnx", reason="onnx is not installed")
nn = torch.nn


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.f1, self.f2, self.f3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        x = x.view(x.size(0), -1)  # Shape -> Gather -> Concat -> Reshape on the dynamic batch
        return self.f3(torch.relu(self.f2(torch.relu(self.f1(x)))))


class ResBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        for bn in (self.bn1, self.bn2):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.b(torch.relu(self.bn1(self.a(x))))))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(5, 8, num_layers=2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.layer(x, is_causal=False)  # explicit: torch 2.13's tracer fails on the default


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4), nn.Softmax(-1))
    return {"mlp_dropout": (mlp, (10,)), "lenet": (LeNet(), (1, 28, 28)), "resblock_bn": (ResBlock(), (8, 6, 6)),
            "lstm": (LSTMNet(), (7, 5)), "transformer_encoder": (Encoder(), (5, 16))}


MODELS = _models()


def _export(model, sample) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported():
    out = {}
    for name, (m, shape) in MODELS.items():
        m.eval()
        out[name] = _export(m, torch.randn(2, *shape))
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["numpy", pytest.param("llvm", marks=pytest.mark.slow)])
def test_imported_model_matches_torch(name, backend, exported):
    backend_or_skip(backend)
    m, shape = MODELS[name]
    g = gc.load_onnx(exported[name])
    assert [t.name for t in g.inputs] == ["x"] and [t.name for t in g.outputs] == ["y"]
    assert str(g.inputs[0].shape[0]) == "batch"  # the dynamic dim stays symbolic
    assert len(g.parameters) > 0
    f = gc.function(g, backend=backend)
    for n in (2, 5):
        x = torch.randn(n, *shape)
        with torch.no_grad():
            want = m(x).numpy()
        np.testing.assert_allclose(f(x.numpy())[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp_dropout", "lenet", "resblock_bn", "lstm"])
def test_reexport_runs_in_onnxruntime(name, exported, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    m, shape = MODELS[name]
    g = gc.load_onnx(exported[name])
    f = gc.function(g)
    gc.export_onnx(g, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *shape).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], f(x)[0], rtol=1e-5, atol=1e-6)


def test_unsupported_ops_listed_at_once():
    from onnx import TensorProto, helper
    nodes = [helper.make_node("TfIdfVectorizer", ["x"], ["d"]), helper.make_node("Unique", ["x"], ["u"]),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NonZero", ["x"], ["z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                       helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(gc.GraphcError, match=r"3 unsupported ONNX op type\(s\) in model: NonZero, TfIdfVectorizer, Unique"):
        gc.load_onnx(helper.make_model(g))


def test_load_errors(tmp_path):
    with pytest.raises(gc.GraphcError, match="no such ONNX file"):
        gc.load_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model at all")
    with pytest.raises(gc.GraphcError):
        gc.load_onnx(bad)
    with pytest.raises(gc.GraphcError, match="takes a path"):
        gc.load_onnx(3.5)


def test_recurrent_layer_with_dynamic_sequence_length():
    """ONNX GRU imports as a scan loop, so the sequence length may be symbolic too."""
    torch.manual_seed(1)
    m = nn.GRU(4, 6, bidirectional=True).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(5, 2, 4),), buf, dynamo=False, input_names=["x"], output_names=["y", "h"],
                          dynamic_axes={"x": {0: "T", 1: "B"}}, opset_version=17)
    g = gc.load_onnx(buf.getvalue())
    assert [str(d) for d in g.inputs[0].shape] == ["T", "B", "4"]
    assert any(n.startswith("scan[") for n in g.op_names())
    f = gc.function(g)
    for T, B in ((3, 2), (9, 1)):
        x = torch.randn(T, B, 4)
        with torch.no_grad():
            y, h = m(x)
        got = f(x.numpy())
        np.testing.assert_allclose(got[0], y.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1], h.numpy(), rtol=1e-4, atol=1e-5)
