"""layer_norm as one op (graphc/ops/layernorm.py) and one llvm kernel (backends/llvm/layernorm.py).

Checked against a float64 NumPy reference on odd row lengths (1, 3, 17, 63, 65, 257), one and two normalised
axes, float32 and float64, with and without weight and bias, strided inputs, both ISAs' vector shapes and
both thread counts; the gradient (written out of existing ops) against central differences in float64 and
against the composition's own gradient; who builds the op and who gets the composition; the ONNX export
(LayerNormalization) through ONNX Runtime when installed; the cuda plan as the composition."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from graphc.ops import layernorm
from graphc.ops.layernorm import LayerNorm


def _ref(x, w, b, naxes, eps=1e-5):
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - naxes, x.ndim))
    d = x - x.mean(axes, keepdims=True)
    y = d / np.sqrt((d * d).mean(axes, keepdims=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def _build(shape, naxes, dtype, affine, rng, transpose=False):
    x = gc.placeholder("x", shape, dtype)
    norm = shape[len(shape) - naxes:]
    wv = rng.standard_normal(norm).astype(dtype) if affine >= 1 else None
    bv = rng.standard_normal(norm).astype(dtype) if affine >= 2 else None
    src = gc.transpose(x, (1, 0) + tuple(range(2, len(shape)))) if transpose else x
    sh = (shape[1], shape[0]) + tuple(shape[2:]) if transpose else shape
    y = gc.layer_norm(src, sh[len(sh) - naxes:], None if wv is None else gc.parameter("w", wv),
                      None if bv is None else gc.parameter("b", bv))
    return x, y, wv, bv


@pytest.mark.parametrize("n", [1, 3, 17, 63, 65, 257])
def test_rows_of_odd_length(n, isa, threads, rng):
    backend_or_skip("llvm")
    for dtype in ("float32", "float64") if (isa, threads) == ("avx2", 1) else ("float32",):
        for affine in (0, 1, 2):
            x, y, wv, bv = _build((5, 3, n), 1, dtype, affine, rng)
            assert y.node.op is LayerNorm
            f = gc.function([x], y, backend="llvm")
            xv = (rng.standard_normal((5, 3, n)) * 3 + 1).astype(dtype)
            tol = 2e-5 if dtype == "float32" else 1e-12
            np.testing.assert_allclose(f(xv), _ref(xv, wv, bv, 1), rtol=tol, atol=tol, err_msg=f"{dtype} {affine}")
            assert f.program.info["fallback_ops"] == []


@pytest.mark.parametrize("shape, naxes, transpose", [((4, 6, 5), 2, False), ((2, 3, 65), 1, True),
                                                    ((1, 17), 1, False), ((3, 2, 3, 5), 3, False)])
def test_strided_and_several_axes(shape, naxes, transpose, rng):
    for dtype in ("float32", "float64"):
        x, y, wv, bv = _build(shape, naxes, dtype, 2, rng, transpose)
        xv = rng.standard_normal(shape).astype(dtype)
        src = np.swapaxes(xv, 0, 1) if transpose else xv
        want = _ref(src, wv, bv, naxes)
        for be in ("numpy", "llvm"):
            got = gc.function([x], y, backend=be)(xv)
            np.testing.assert_allclose(got, want, rtol=2e-5 if dtype == "float32" else 1e-12, atol=2e-5,
                                       err_msg=f"{be} {dtype}")


def test_large_rows_split_over_threads(rng, monkeypatch):
    """Enough rows to split across the pool (both halves written, each row once)."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    x, y, wv, bv = _build((301, 256), 1, "float32", 2, rng)
    f = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((301, 256)).astype("float32") * 10
    np.testing.assert_allclose(f(xv), _ref(xv, wv, bv, 1), rtol=3e-5, atol=3e-5)


def test_gradient_matches_differences_and_the_composition():
    rng = np.random.default_rng(3)
    shape = (3, 7)
    x = gc.placeholder("x", shape, "float64")
    w = gc.parameter("w", rng.standard_normal(7))
    b = gc.parameter("b", rng.standard_normal(7))
    r = gc.constant(rng.standard_normal(shape))
    y = gc.layer_norm(x, 7, w, b)
    assert y.node.op is LayerNorm
    loss = gc.sum(y * r)
    grads = gc.grad(loss, [x, w, b])
    comp = gc.sum(layernorm.composition(x, w, b, 1) * r)
    cgrads = gc.grad(comp, [x, w, b])
    xv = rng.standard_normal(shape)
    for be in ("numpy", "llvm"):
        got = gc.function([x], grads, backend=be)(xv)
        want = gc.function([x], cgrads, backend="numpy")(xv)
        for g_, c_ in zip(got, want):
            np.testing.assert_allclose(g_, c_, rtol=1e-10, atol=1e-12, err_msg=be)
    # central differences of the NumPy reference in x
    f0 = lambda v: float(np.sum(_ref(v, w.value, b.value, 1) * r.node.attrs["value"]))   # noqa: E731
    num = np.zeros(shape)
    for i in np.ndindex(shape):
        e = np.zeros(shape)
        e[i] = 1e-6
        num[i] = (f0(xv + e) - f0(xv - e)) / 2e-6
    np.testing.assert_allclose(gc.function([x], grads[0], backend="numpy")(xv), num, rtol=1e-6, atol=1e-8)
    # differentiated again (double backprop through the written-out gradient)
    gg = gc.grad(gc.sum(grads[0] * grads[0]), [x])[0]
    assert gc.function([x], gg, backend="llvm")(xv).shape == shape


def test_who_gets_the_op():
    x32 = gc.placeholder("x", (2, 4), "float32")
    assert gc.layer_norm(x32, 4).node.op is LayerNorm
    assert gc.nn.LayerNorm(4)(x32).node.op is LayerNorm
    # a weight that only broadcasts, another dtype, half precision: the composition (same values)
    assert gc.layer_norm(x32, 4, gc.constant(np.ones((1,), "f4"))).node.op is not LayerNorm
    assert gc.layer_norm(gc.placeholder("h", (2, 4), "float16"), 4).node.op is not LayerNorm
    with pytest.raises(gc.GraphcError, match="trailing dims"):
        gc.layer_norm(x32, 3)


def test_onnx_export_runs_in_onnx_runtime(rng, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    for affine in (0, 2):
        x, y, wv, bv = _build((3, 5, 8), 1, "float32", affine, rng)
        f = gc.function([x], y, backend="numpy")
        path = str(tmp_path / f"ln{affine}.onnx")
        gc.export_onnx(f, path)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        xv = rng.standard_normal((3, 5, 8)).astype("float32")
        got = sess.run(None, {sess.get_inputs()[0].name: xv})[0]
        np.testing.assert_allclose(got, _ref(xv, wv, bv, 1), rtol=1e-5, atol=1e-5)
        import onnx
        assert "LayerNormalization" in {n.op_type for n in onnx.load(path).graph.node}


def test_cuda_runs_the_composition(rng):
    """cuda has no layer-norm kernel: its plan is the composition's launches (run here through the host
    emulation of the CUDA source), with no host fallback."""
    from graphc.backends.cuda.lower import CudaSchedule
    assert LayerNorm in CudaSchedule.rows()
    backend_or_skip("cuda-emulated")
    x, y, wv, bv = _build((4, 33), 1, "float32", 2, rng)
    f = gc.function([x], y, backend="cuda-emulated")
    xv = rng.standard_normal((4, 33)).astype("float32")
    np.testing.assert_allclose(f(xv), _ref(xv, wv, bv, 1), rtol=1e-5, atol=1e-5)
    assert not f.program.info.get("fallback_ops")
