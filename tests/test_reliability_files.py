"""Hostile ONNX files for gc.load_onnx: external data outside the model's folder or absolute,
cycles, unknown ops, huge declared shapes; each a clear GraphcError with bounded memory.
(gc.load's own hostile-file cases are in tests/test_serialize.py.)"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import graphc as gc

onnx = pytest.importorskip("onnx", reason="onnx not installed")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _model(nodes, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _external(location):
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", "0"), ("length", "8")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _load(tmp_path, m, name="m.onnx"):
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    onnx.save(m, d / name)
    return gc.load_onnx(d / name)


@pytest.mark.parametrize("location,msg", [("../secret.bin", "outside"), ("/etc/passwd", "absolute")])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location, msg):
    (tmp_path / "secret.bin").write_bytes(np.ones(2, np.float32).tobytes())
    with pytest.raises(gc.GraphcError, match=msg):
        _load(tmp_path, _model([helper.make_node("Add", ["x", "w"], ["y"])], [_external(location)]))


def test_cycle_and_unknown_op_are_refused(tmp_path):
    cyc = _model([helper.make_node("Add", ["x", "z"], ["y"]), helper.make_node("Relu", ["y"], ["z"])])
    with pytest.raises(gc.GraphcError, match="input 'z' is not defined before it"):
        _load(tmp_path, cyc)
    with pytest.raises(gc.GraphcError, match="unsupported ONNX op.*FooBar"):
        _load(tmp_path, _model([helper.make_node("FooBar", ["x"], ["y"])]), "u.onnx")


def test_huge_declared_initializer_without_data_is_a_graphc_error(tmp_path):
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10 ** 6, 10 ** 6])
    with pytest.raises(gc.GraphcError, match=r"initializer 'w' of declared shape \[1000000, 1000000\]"):
        _load(tmp_path, _model([helper.make_node("Add", ["x", "w"], ["y"])], [t]))


def test_huge_constant_of_shape_is_refused_with_bounded_memory(tmp_path):
    s = numpy_helper.from_array(np.array([10 ** 6, 10 ** 6], np.int64), "s")
    m = _model([helper.make_node("ConstantOfShape", ["s"], ["z"]), helper.make_node("Add", ["x", "z"], ["y"])], [s])
    tracemalloc.start()
    try:
        with pytest.raises(gc.GraphcError):
            _load(tmp_path, m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # a 4 TB constant was never allocated


def test_graphc_file_with_a_cycle_is_refused(tmp_path):
    """A .graphc file whose node reads a later node's output (a cycle once resolved) is a clear
    SerializationError, not a hang or a recursion error."""
    import json
    import zipfile
    from test_serialize import _rewrite
    x = gc.placeholder("x", (3,), "float64")
    saved = tmp_path / "ok.graphc"
    gc.save(gc.Graph([x], [gc.tanh(gc.exp(x))]), saved)
    with zipfile.ZipFile(saved) as z:
        doc = json.loads(z.read("graph.json"))
    doc["graph"]["nodes"][1]["inputs"] = [[2, 0]]  # exp reads tanh, which reads exp
    bad = tmp_path / "cycle.graphc"
    _rewrite(saved, bad, {"graph.json": json.dumps(doc).encode()}, fix_digests=True)
    with pytest.raises(gc.GraphcError, match="reference"):
        gc.load(bad)
