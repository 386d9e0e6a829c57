"""gc.quantize (graphc/quantization.py) on the digits CNN and an MLP, and quantised ONNX models (the node
suite's quantisation cases; ONNX Runtime's quantize_static in QDQ and QOperator formats) on the int8
kernels."""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

import graphc as gc

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def digits_cnn():
    """The README's digits CNN (examples/cnn_digits.py) trained briefly on llvm, and its data."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, EXAMPLES)
    try:
        import cnn_digits
        from digits_data import load_digits_split
    finally:
        sys.path.remove(EXAMPLES)
    model, _, _ = cnn_digits.main(epochs=3, backend="llvm", progress=False)
    return model, load_digits_split(seed=0, images=True)


def test_digits_cnn_loses_at_most_half_a_point(digits_cnn):
    model, (xtr, _, xte, yte) = digits_cnn
    x = gc.placeholder("x", (None, 1, 8, 8))
    f = gc.function([x], model(x, training=False), backend="llvm")
    qf = gc.quantize(f, [xtr[i:i + 128] for i in range(0, 640, 128)])
    acc_f = float((f(xte).argmax(1) == yte).mean())
    acc_q = float((qf(xte).argmax(1) == yte).mean())
    assert acc_f > 0.9
    assert acc_q >= acc_f - 0.005, (acc_f, acc_q)
    ops = qf.function.graph.op_names()
    assert ops.count("qlinear_conv2d") == 2 and ops.count("qlinear_matmul") == 1
    assert not qf.program.info["fallback_ops"]
    # batch norm and ReLU folded into the first convolution, which hands uint8 straight to the second
    first = qf.layers[0]
    assert first["relu"] and first["output"] == "uint8" and len(first["folded"]) >= 3
    # the same int8 graph on numpy gives the same bits (the kernels are exact)
    qn = gc.quantize(f, [xtr[i:i + 128] for i in range(0, 640, 128)], backend="numpy",
                     weight_bits=qf._options[1])
    np.testing.assert_array_equal(qn(xte), qf(xte))


def test_mlp_matches_a_numpy_int8_reference_and_requantises_between_layers():
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((20, 16)).astype(np.float32) * 0.3, rng.standard_normal(16).astype(np.float32)
    w1, b1 = rng.standard_normal((16, 5)).astype(np.float32) * 0.3, rng.standard_normal(5).astype(np.float32)
    x = gc.placeholder("x", (None, 20))
    W0, B0, W1, B1 = (gc.parameter(n, v) for n, v in (("w0", w0), ("b0", b0), ("w1", w1), ("b1", b1)))
    f = gc.function([x], gc.relu(x @ W0 + B0) @ W1 + B1, backend="llvm")
    cal = [rng.standard_normal((32, 20)).astype(np.float32) for _ in range(3)]
    qf = gc.quantize(f, cal, weight_bits=8)
    assert [r["output"] for r in qf.layers] == ["uint8", "float32"]
    # an independent NumPy int8 pipeline with the same calibration (min/max, uint8 asymmetric)
    X = rng.standard_normal((50, 20)).astype(np.float32)
    allx = np.concatenate(cal)
    h = np.maximum(allx @ w0 + b0, 0)

    def qp(lo, hi):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = (hi - lo) / 255.0
        return s, int(np.clip(np.rint(-lo / s), 0, 255))
    sx, zx = qp(float(allx.min()), float(allx.max()))
    sh, zh = qp(0.0, float(h.max()))

    def wq(w):
        s = np.abs(w).max(0) / 127
        return np.clip(np.rint(w / s), -127, 127).astype(np.int8), s.astype(np.float32)
    q0, s0 = wq(w0)
    q1, s1 = wq(w1)
    xq = np.clip(np.rint(X / np.float32(sx)) + zx, 0, 255).astype(np.int32)
    acc0 = (xq - zx) @ q0.astype(np.int32)
    hq = np.clip(np.rint(np.maximum(acc0 * (sx * s0 / sh) + b0 / sh, 0)) + zh, 0, 255).astype(np.int32)
    y = ((hq - zh) @ q1.astype(np.int32)) * (sh * s1) + b1
    got = qf(X)
    assert np.abs(got - y).max() < 1e-3 * (np.abs(y).max() + 1)
    assert np.abs(got - f(X)).max() < 0.1 * np.abs(f(X)).max()


def test_quantize_requantises_when_a_parameter_changes_and_refuses_training_functions():
    rng = np.random.default_rng(1)
    w = gc.parameter("w", rng.standard_normal((6, 4)).astype(np.float32))
    x = gc.placeholder("x", (None, 6))
    f = gc.function([x], x @ w, backend="llvm")
    X = rng.standard_normal((8, 6)).astype(np.float32)
    qf = gc.quantize(f, [X])
    before = qf(X)
    w.set_value(w.value * 2)
    np.testing.assert_allclose(qf(X), 2 * before, rtol=0.05, atol=0.05 * np.abs(before).max())
    with pytest.raises(gc.GraphcError, match="training"):
        gc.quantize(gc.function([x], x @ w, updates=[(w, w * 0.5)]), [X])
    with pytest.raises(gc.GraphcError, match="nothing to quantise"):
        gc.quantize(gc.function([x], gc.tanh(x)), [X])
    with pytest.raises(gc.GraphcError, match="calibration batch"):
        gc.quantize(f, [(X, X)])


def test_percentile_calibration_and_int8_activations():
    rng = np.random.default_rng(2)
    w = gc.parameter("w", rng.standard_normal((10, 3)).astype(np.float32))
    x = gc.placeholder("x", (None, 10))
    f = gc.function([x], x @ w, backend="llvm")
    X = rng.standard_normal((200, 10)).astype(np.float32)
    ref = f(X)
    for kw in ({"method": "percentile", "percentile": 99.0}, {"activations": "int8"}):
        qf = gc.quantize(f, [X[:100], X[100:]], **kw)
        assert np.abs(qf(X) - ref).mean() < 0.02 * np.abs(ref).max(), kw
    # percentile ranges are narrower than min/max: outliers saturate
    lo, hi = gc.quantize(f, [X], method="percentile", percentile=99.0).ranges.range(id(x))
    assert X.min() < lo < 0 < hi < X.max()


# ---- ONNX ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_onnx_node_suite_quantisation_cases(backend):
    pytest.importorskip("onnx")
    from graphc.frontends.onnx_backend import run_suite
    pat = re.compile(r"quantize|qlinear|integer", re.I)
    res = run_suite("node", backend, select=lambda n: bool(pat.search(n)))
    assert not res.failed, res.failed
    assert len(res.passed) >= 26
    for name in ("test_qlinearmatmul_2D_uint8_float32", "test_qlinearconv", "test_matmulinteger", "test_convinteger_with_padding",
                 "test_dynamicquantizelinear", "test_quantizelinear", "test_dequantizelinear"):
        assert name in res.passed, name


def _float_model(rng):
    from onnx import TensorProto, helper, numpy_helper
    w1 = (rng.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((8 * 6 * 6, 10)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "W2"], ["m"]),
             helper.make_node("Add", ["m", "B2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(v, n) for n, v in
                           (("W1", w1), ("B1", b1), ("W2", w2), ("B2", np.zeros(10, np.float32)))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_onnxruntime_quantize_static_models_match_onnxruntime(tmp_path, fmt):
    """ONNX Runtime's quantize_static (7-bit weights: reduce_range, which ONNX Runtime itself needs on
    hosts without VNNI to avoid vpmaddubsw saturation), run by ONNX Runtime and by graphc's int8 kernels."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    rng = np.random.default_rng(0)
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_float_model(rng), src)
    X = rng.random((64, 1, 8, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": X[i:i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul"])
    ref = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    f = gc.function(gc.load_onnx(str(dst)), backend="llvm")
    ops = f.graph.op_names()
    assert "qlinear_conv2d" in ops and "qlinear_matmul" in ops and "conv2d" not in ops and "matmul" not in ops
    got = f(X)[0]
    qm = onnx.load(str(dst))
    last = next(nd for nd in qm.graph.node if "y" in nd.output)   # the float Add after the last quantised layer
    if last.op_type != "DequantizeLinear":
        last = next(nd for nd in qm.graph.node if nd.op_type == "DequantizeLinear" and nd.output[0] in last.input
                    and any(i.name == nd.input[0] for i in qm.graph.initializer) is False)
    scale = float(onnx.numpy_helper.to_array(next(i for i in qm.graph.initializer if i.name == last.input[1])))
    assert np.abs(got - ref).max() <= scale * 1.01   # at most one quantum apart (float rounding of the scales)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
