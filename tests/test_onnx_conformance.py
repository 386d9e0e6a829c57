"""The ONNX backend test suite (shipped inside the onnx wheel) run against graphc as an ONNX backend.

Every case whose ops, attributes and dtypes graphc supports must pass; unsupported ones are skipped
by the runner with the reason (counted, never passed). The pass count is printed (pytest -s).
"""
from __future__ import annotations

import pytest

pytest.importorskip("onnx", reason="onnx is not installed")

from graphc.frontends.onnx_backend import GraphcBackend, run_suite  # noqa: E402
from tests.conftest import backend_or_skip  # noqa: E402

MIN_NODE_PASSES = 1575  # issue 14 asks for >= 1450 (ONNX Runtime: 1310); 1581 pass on numpy and llvm today


#: cases whose expected outputs are wrong beyond the case's tolerance (they fail on ONNX Runtime too):
#: the inverse complex DFT's outputs hold ~2e-7 of float32 FFT rounding noise where the exact value is
#: 0 (atol 1e-7); graphc computes ~1e-15 there. They must fail with exactly that mismatch, nothing else.
DISPUTED = {"test_dft_inverse": "Mismatched elements: 10 / 200", "test_dft_inverse_opset19": "Mismatched elements: 10 / 200"}


def _report(kind, backend, res):
    print(f"\nONNX {kind} suite on {backend}: {res.summary()}")
    failed = {k: v for k, v in res.failed.items() if not (k in DISPUTED and DISPUTED[k] in v)}
    assert not failed, "supported cases failing:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(failed.items()))


@pytest.fixture(scope="module")
def node_numpy():
    return run_suite("node", "numpy")


def test_node_suite_numpy(node_numpy):
    _report("node", "numpy", node_numpy)
    assert len(node_numpy.passed) >= MIN_NODE_PASSES


@pytest.mark.slow
def test_node_suite_llvm():
    backend_or_skip("llvm")
    res = run_suite("node", "llvm")
    _report("node", "llvm", res)
    assert len(res.passed) >= MIN_NODE_PASSES


@pytest.mark.parametrize("kind,minimum", [("simple", 9), ("pytorch-converted", 82), ("pytorch-operator", 35)])
def test_other_suites_numpy(kind, minimum):
    res = run_suite(kind, "numpy")
    _report(kind, "numpy", res)
    assert len(res.passed) >= minimum


def test_suite_cases_cover_the_core_op_families(node_numpy):
    """The passing cases include every family the issue names (so a regression in one shows)."""
    for prefix in _FAMILIES:
        assert any(n.startswith(prefix) for n in node_numpy.passed), f"no passing case for {prefix}"


_FAMILIES = ("test_add", "test_reduce_sum", "test_matmul", "test_gemm", "test_conv", "test_maxpool",
             "test_averagepool", "test_batchnorm", "test_layer_normalization", "test_reshape", "test_softmax",
             "test_logsoftmax", "test_lstm", "test_gru", "test_rnn", "test_dropout", "test_transpose",
             "test_slice", "test_gather", "test_concat")


def test_backend_api():
    import numpy as np
    import onnx
    from onnx import helper, TensorProto
    node = helper.make_node("Add", ["a", "b"], ["c"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    assert GraphcBackend.supports_device("CPU") and not GraphcBackend.supports_device("CUDA")
    assert GraphcBackend.is_compatible(m)
    out = GraphcBackend.run_model(m, [np.ones(2, np.float32), np.arange(2, dtype=np.float32)])
    np.testing.assert_array_equal(out[0], [1, 2])
