"""A torch nn.TransformerEncoder (several layers: the stack benchmarks/compile_time.py's te12 case times)
exported by torch.onnx.export and imported with gc.load_onnx, against torch's own output; the per-layer
kernels are shared on llvm (distinct kernel functions do not grow with the layers)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import graphc as gc

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


class Encoder(torch.nn.Module):
    def __init__(self, layers, d_model=16, heads=2, ff=32):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model, heads, ff, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(x, is_causal=False)   # explicit: torch 2.13's tracer fails on the default


def _export(layers):
    torch.manual_seed(layers)
    m = Encoder(layers).eval()
    x = np.random.default_rng(layers).standard_normal((2, 5, 16)).astype(np.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.from_numpy(x),), buf, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    return buf.getvalue(), x, ref


@pytest.fixture(scope="module")
def models():
    return {n: _export(n) for n in (1, 2)}


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_encoder_stack_matches_torch(models, backend):
    if backend not in gc.available_backends():
        pytest.skip(f"{backend} unavailable")
    data, x, ref = models[2]
    f = gc.function(gc.load_onnx(data), backend=backend)
    out = f(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_layers_share_kernels(models):
    if "llvm" not in gc.available_backends():
        pytest.skip("llvm unavailable")
    info = {}
    for n, (data, x, _) in models.items():
        f = gc.function(gc.load_onnx(data), backend="llvm")
        f(x)
        info[n] = f.program.info
    # a second layer adds kernel steps but (almost) no new kernel functions: they are the first layer's
    assert info[2]["kernels"] > info[1]["kernels"]
    assert info[2]["kernel_functions"] - info[1]["kernel_functions"] <= 2
