"""The ONNX converters added for the attention family and the structured ops (GridSample, AffineGrid,
LinearAttention, CausalConvWithState, FlexAttention, SwiGLU, TensorScatter, DFT/STFT, DeformConv,
RoiAlign, MaxPool Indices/MaxUnpool, N-D ConvTranspose/Col2Im, antialiased Resize, Compress,
ReverseSequence) on random inputs and configurations beyond the node suite's single cases: each
single-node model through the project's ONNX backend against onnx's ReferenceEvaluator (or NumPy),
on numpy and llvm; and the gradients of the compositions by finite differences in float64."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import graphc as gc  # noqa: E402
from graphc.frontends import onnx_backend  # noqa: E402
from graphc.frontends.onnx_import import Ctx  # noqa: E402
from graphc.frontends.onnx_ops import CONVERTERS  # noqa: E402
from conftest import backend_or_skip  # noqa: E402

BACKENDS = ["numpy", "llvm"]


def _vi(name, a):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), np.shape(a))


def _model(op, feeds: dict, n_out=1, opset=24, domain="", **attrs):
    names = [k if v is not None else "" for k, v in feeds.items()]
    while names and names[-1] == "":
        names.pop()
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, domain=domain, **attrs)
    g = helper.make_graph([node], op, [_vi(k, v) for k, v in feeds.items() if v is not None],
                          [helper.make_tensor_value_info(o, 0, None) for o in outs])
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=ops)


def _check(model, feeds, backend, want=None, rtol=1e-5, atol=1e-5):
    backend_or_skip(backend)
    feeds = {k: v for k, v in feeds.items() if v is not None}
    if want is None:
        want = ReferenceEvaluator(model).run(None, feeds)
    else:
        want = [np.asarray(w, np.asarray(next(iter(feeds.values()))).dtype) for w in want]
    outs = [_vi(o.name, w) for o, w in zip(model.graph.output, want)]
    del model.graph.output[:]
    model.graph.output.extend(outs)
    got = onnx_backend.prepare(model, backend=backend).run(list(feeds.values()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.asarray(g).shape == np.asarray(w).shape
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


def _convert(op, attrs, opset=24, n_out=1):
    """The converter as a function of tensors (for gradient checks)."""
    cx = Ctx(opset)
    cx.node = helper.make_node(op, [], [])
    cx.n_out = n_out
    fn = CONVERTERS[op]
    return lambda *ts: fn(cx, list(ts), attrs)


@pytest.fixture
def r():
    return np.random.default_rng(3)


# ---- sampling ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,pad,align,vol", [("linear", "reflection", 0, True), ("nearest", "border", 1, True),
                                                ("cubic", "zeros", 1, False), ("linear", "border", 0, False)])
def test_grid_sample(backend, mode, pad, align, vol, r):
    x = r.standard_normal((2, 3, 3, 4, 5) if vol else (2, 3, 4, 5)).astype(np.float32)
    grid = r.uniform(-1.2, 1.2, (2, 2, 3, 4, 3) if vol else (2, 3, 4, 2)).astype(np.float32)
    feeds = {"x": x, "grid": grid}
    _check(_model("GridSample", feeds, opset=22, mode=mode, padding_mode=pad, align_corners=align), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deform_conv(backend, r):
    x = r.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = r.standard_normal((6, 2, 2, 3)).astype(np.float32)
    attrs = dict(kernel_shape=[2, 3], group=2, offset_group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 1, 0, 2])
    oh, ow = (5 + 1 - 2) // 2 + 1, (6 + 3 - 5) // 1 + 1
    feeds = {"x": x, "w": w, "offset": r.standard_normal((2, 2 * 2 * 6, oh, ow)).astype(np.float32) * 1.5,
             "b": r.standard_normal(6).astype(np.float32), "mask": r.uniform(0, 1, (2, 2 * 6, oh, ow)).astype(np.float32)}
    _check(_model("DeformConv", feeds, opset=22, **attrs), feeds, backend, rtol=1e-4, atol=1e-4)


def test_deform_conv_gradients(r):
    attrs = dict(kernel_shape=[2, 2], pads=[0, 0, 0, 0])
    x, w = r.standard_normal((1, 2, 3, 3)), r.standard_normal((2, 2, 2, 2))
    off = r.uniform(-0.8, 0.8, (1, 8, 2, 2)) + 0.37      # away from integer kinks
    gc.verify_grad(_convert("DeformConv", attrs, 22), [x, w, off], rng=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio,mode,ctm", [(0, "avg", "half_pixel"), (3, "max", "output_half_pixel"),
                                            (2, "avg", "output_half_pixel")])
def test_roi_align(backend, ratio, mode, ctm, r):
    x = r.standard_normal((2, 3, 8, 9)).astype(np.float32)
    rois = np.array([[0.5, 1.0, 6.2, 7.0], [-1.5, 2.0, 3.0, 9.5], [2.0, 2.0, 8.5, 4.0]], np.float32)
    feeds = {"x": x, "rois": rois, "bi": np.array([1, 0, 1], np.int64)}
    _check(_model("RoiAlign", feeds, opset=22, output_height=3, output_width=2, sampling_ratio=ratio, mode=mode,
                  spatial_scale=0.9, coordinate_transformation_mode=ctm), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_grid_3d(backend, r):
    feeds = {"theta": r.standard_normal((2, 3, 4)).astype(np.float32), "size": np.array([2, 1, 2, 3, 4], np.int64)}
    _check(_model("AffineGrid", feeds, opset=20, align_corners=0), feeds, backend)


# ---- attention family ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
def test_linear_attention(backend, rule, r):
    b, t, hq, hkv, dk, dv = 2, 3, 4, 2, 3, 5
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    feeds = {"q": r.standard_normal((b, t, hq * dk)).astype(np.float32),
             "k": r.standard_normal((b, t, hkv * dk)).astype(np.float32),
             "v": r.standard_normal((b, t, hkv * dv)).astype(np.float32),
             "past": r.standard_normal((b, hkv, dk, dv)).astype(np.float32),
             "decay": -r.uniform(0, 1, (b, t, hkv)).astype(np.float32) if gated else None,
             "beta": r.uniform(0, 1, (b, t, hkv)).astype(np.float32) if delta else None}
    _check(_model("LinearAttention", feeds, 2, opset=27, q_num_heads=hq, kv_num_heads=hkv, update_rule=rule),
           feeds, backend, rtol=1e-4, atol=1e-5)


def test_linear_attention_gradients(r):
    f = _convert("LinearAttention", {"q_num_heads": 2, "kv_num_heads": 1}, 27)
    b, t, d = 1, 2, 2
    q, k, v = (r.standard_normal((b, t, n * d)) for n in (2, 1, 1))
    decay, beta = -r.uniform(0, 1, (b, t, 1)), r.uniform(0, 1, (b, t, 1))
    gc.verify_grad(lambda *ts: f(*ts[:3], None, *ts[3:]), [q, k, v, decay, beta], rng=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv_with_state(backend, r):
    feeds = {"x": r.standard_normal((2, 3, 5)).astype(np.float32), "w": r.standard_normal((3, 1, 3)).astype(np.float32),
             "b": r.standard_normal(3).astype(np.float32), "past": r.standard_normal((2, 3, 2)).astype(np.float32)}
    _check(_model("CausalConvWithState", feeds, 2, opset=27, activation="silu"), feeds, backend)


def _flex_ref(q, k, v, scale, cap):
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    s = np.tanh(s / cap) * cap
    s = np.where(np.arange(s.shape[2])[:, None] >= np.arange(s.shape[3])[None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("backend", BACKENDS)
def test_flex_attention_score_mod(backend, r):
    """A score_mod subgraph (soft-cap, then a causal mask) on grouped-query heads."""
    from onnx import TensorProto
    cap = helper.make_tensor("cap", TensorProto.FLOAT, [], [3.0])
    body = helper.make_graph(
        [helper.make_node("Div", ["s", "cap"], ["a"]), helper.make_node("Tanh", ["a"], ["t"]),
         helper.make_node("Mul", ["t", "cap"], ["c"]),
         helper.make_node("Constant", [], ["m"], value=helper.make_tensor(
             "m", TensorProto.BOOL, [1, 1, 4, 5], (np.arange(4)[:, None] >= np.arange(5)[None, :]).reshape(-1).tolist())),
         helper.make_node("Constant", [], ["ninf"], value=helper.make_tensor("ninf", TensorProto.FLOAT, [], [-np.inf])),
         helper.make_node("Where", ["m", "c", "ninf"], ["out"])],
        "score_mod", [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [cap])
    feeds = {"q": r.standard_normal((2, 4, 4, 3)).astype(np.float32),
             "k": r.standard_normal((2, 2, 5, 3)).astype(np.float32),
             "v": r.standard_normal((2, 2, 5, 6)).astype(np.float32)}
    m = _model("FlexAttention", feeds, opset=26, domain="ai.onnx.preview", scale=0.7, score_mod=body)
    want = _flex_ref(*[feeds[n].astype(np.float64) for n in "qkv"], 0.7, 3.0)
    _check(m, feeds, backend, want=[want])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter(backend, mode, r):
    feeds = {"past": r.standard_normal((3, 2, 5, 4)).astype(np.float32),
             "upd": r.standard_normal((3, 2, 2, 4)).astype(np.float32),
             "idx": np.array([0, 3, 4 if mode == "circular" else 2], np.int64)}
    _check(_model("TensorScatter", feeds, opset=24, mode=mode), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu(backend, r):
    feeds = {"a": r.standard_normal((3, 4)).astype(np.float32), "b": r.standard_normal((3, 4)).astype(np.float32)}
    a, b = feeds["a"].astype(np.float64), feeds["b"].astype(np.float64)
    _check(_model("SwiGLU", feeds, opset=28, alpha=1.5), feeds, backend, want=[a / (1 + np.exp(-1.5 * a)) * b])


# ---- signal ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,length,inverse,onesided,cplx", [(7, None, 0, 0, True), (6, 8, 0, 1, False),
                                                            (5, 4, 1, 0, True), (5, 8, 1, 1, True),
                                                            (6, None, 1, 1, True)])
def test_dft(backend, n, length, inverse, onesided, cplx, r):
    x = r.standard_normal((2, n, 3, 2 if cplx else 1)).astype(np.float32)
    feeds = {"x": x, "len": None if length is None else np.array(length, np.int64), "axis": np.array(1, np.int64)}
    z = x[..., 0] + 1j * x[..., 1] if cplx else x[..., 0]
    if inverse and onesided:
        want = np.fft.irfft(z, length, axis=1)[..., None]
    else:
        f = np.fft.ifft(z, length, axis=1) if inverse else np.fft.fft(z, length, axis=1)
        if onesided:
            f = f[:, :(length or n) // 2 + 1]
        want = np.stack([f.real, f.imag], -1)
    _check(_model("DFT", feeds, opset=20, inverse=inverse, onesided=onesided), feeds, backend, want=[want])


def test_dft_gradient(r):
    f = _convert("DFT", {"onesided": 1}, 20)
    gc.verify_grad(lambda x: f(x, None, gc.constant(np.array(1, np.int64))), [r.standard_normal((2, 6, 1))], rng=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stft_with_window(backend, r):
    feeds = {"x": r.standard_normal((2, 40, 1)).astype(np.float32), "step": np.array(6, np.int64),
             "window": np.hanning(10).astype(np.float32)}
    _check(_model("STFT", feeds, opset=17), feeds, backend, rtol=1e-4, atol=1e-4)


# ---- pooling, transposed convolution, resize, selection ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_indices_and_unpool(backend, r):
    x = r.standard_normal((2, 3, 5, 6)).astype(np.float32)
    feeds = {"x": x}
    m = _model("MaxPool", feeds, 2, opset=22, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1])
    _check(m, feeds, backend)
    _check(_model("MaxPool", feeds, 2, opset=22, kernel_shape=[2, 3], strides=[1, 2], storage_order=1), feeds, backend)
    feeds = {"x": x[:, :, :4]}
    m = _model("MaxPool", feeds, 2, opset=22, kernel_shape=[2, 2], strides=[2, 2])
    y, idx = ReferenceEvaluator(m).run(None, feeds)
    feeds = {"y": y, "i": idx, "shape": np.array([2, 3, 5, 7], np.int64)}
    _check(_model("MaxUnpool", feeds, opset=22, kernel_shape=[2, 2], strides=[2, 2]), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_transpose_3d(backend, r):
    """Against torch's conv_transpose3d (groups, strides, dilation, padding, output_padding)."""
    torch = pytest.importorskip("torch")
    feeds = {"x": r.standard_normal((2, 4, 2, 3, 2)).astype(np.float32),
             "w": r.standard_normal((4, 3, 2, 3, 2)).astype(np.float32), "b": r.standard_normal(6).astype(np.float32)}
    want = torch.nn.functional.conv_transpose3d(*(torch.tensor(feeds[k]) for k in "xwb"), stride=(2, 1, 3),
                                                padding=(1, 0, 1), output_padding=(1, 0, 2), groups=2,
                                                dilation=(1, 2, 1)).numpy()
    _check(_model("ConvTranspose", feeds, opset=22, group=2, strides=[2, 1, 3], pads=[1, 0, 1, 1, 0, 1],
                  output_padding=[1, 0, 2], dilations=[1, 2, 1]), feeds, backend, want=[want], rtol=1e-4, atol=1e-4)


def test_conv_transpose_3d_gradients(r):
    f = _convert("ConvTranspose", {"strides": [2, 1, 1], "pads": [0, 1, 0, 1, 0, 0]}, 22)
    gc.verify_grad(f, [r.standard_normal((1, 2, 2, 3, 2)), r.standard_normal((2, 1, 2, 2, 2))], rng=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_col2im_3d(backend, r):
    feeds = {"cols": r.standard_normal((2, 2 * 8, 2 * 2 * 3)).astype(np.float32),
             "image": np.array([4, 3, 5], np.int64), "block": np.array([2, 2, 2], np.int64)}
    _check(_model("Col2Im", feeds, opset=18, strides=[2, 1, 2], pads=[0, 0, 1, 1, 0, 0]), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_antialias(backend, mode, r):
    feeds = {"x": r.standard_normal((1, 2, 9, 11)).astype(np.float32), "roi": None, "scales": None,
             "sizes": np.array([1, 2, 4, 3], np.int64)}
    _check(_model("Resize", feeds, opset=19, mode=mode, antialias=1), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compress_and_reverse_sequence(backend, r):
    feeds = {"x": r.standard_normal((4, 3, 2)).astype(np.float32), "c": np.array([1, 0, 1], bool)}
    _check(_model("Compress", feeds, opset=11, axis=1), feeds, backend)
    feeds = {"x": r.standard_normal((5, 3, 2)).astype(np.float32), "lens": np.array([5, 1, 3], np.int64)}
    _check(_model("ReverseSequence", feeds, opset=11, batch_axis=1, time_axis=0), feeds, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_det(backend, r):
    feeds = {"x": r.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    _check(_model("Det", feeds, opset=22), feeds, backend, want=[np.linalg.det(feeds["x"].astype(np.float64))],
           rtol=1e-4, atol=1e-4)
    gc.verify_grad(_convert("Det", {}, 22), [r.standard_normal((2, 3, 3))], rng=1)
