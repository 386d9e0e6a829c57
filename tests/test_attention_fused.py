"""Fused attention (issue 18): the scaled_dot_product_attention op (graphc/ops/attention.py), its llvm kernel
(backends/llvm/attention.py: online softmax over key blocks, query rows as vector lanes, items split over
threads) and the attention pass (graphc/passes/attention.py) that finds softmax(Q K^T * s + mask) @ V in
any graph (gc.nn.MultiheadAttention, an ONNX model exported by torch).

References: NumPy in float64 written here (not the op's impl), finite differences in float64, torch 2.13."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, needs_torch, torch

SDPA = "scaled_dot_product_attention"


def _ref(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in float64, two-pass (max subtracted)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("...ld,...sd->...ls", q, k) * scale
    if mask is not None:
        s = s + mask
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("...ls,...sd->...ld", p / p.sum(-1, keepdims=True), v)


def _count(f, name=SDPA):
    return sum(1 for n in f.graph.op_names() if n == name)


#: (L, S, E, Ev, mask kind): odd sizes, head dims 1 / 8 / 64; S = 130 and 300 span several key blocks
#: (KEY_BLOCK = 128: the online softmax rescales); masks: none, a full float mask with -inf entries,
#: a broadcast (L, S) mask, a key-padding (B, 1, 1, S) mask, one with a fully masked row (NaN, as NumPy);
#: E and Ev of whole vectors and a partial one (the kernel's transposes: 20, 24, 40, 17)
CASES = [(1, 1, 1, 1, None), (3, 17, 8, 8, "full"), (17, 3, 64, 64, None), (63, 65, 8, 1, "ls"),
         (65, 63, 1, 8, "kpm"), (65, 130, 64, 64, "full"), (17, 300, 8, 64, "ls"), (3, 5, 8, 8, "dead_row"),
         (1, 65, 64, 8, "kpm"), (63, 1, 1, 64, None), (33, 20, 20, 24, None), (17, 9, 40, 17, "ls")]
B, H = 2, 3


def _mask(rng, kind, L, S, dtype):
    if kind is None:
        return None
    shape = {"full": (B, H, L, S), "ls": (L, S), "kpm": (B, 1, 1, S), "dead_row": (B, H, L, S)}[kind]
    m = rng.standard_normal(shape).astype(dtype)
    m[rng.random(shape) < 0.2] = -np.inf
    if kind == "dead_row":
        m[1, 2, 1, :] = -np.inf      # every key masked: 0/0, NaN in NumPy and here
    elif kind == "kpm":
        m[..., 0] = 0.0              # every row keeps a key
    else:
        m[..., 0] = np.where(np.isinf(m[..., 0]), 0.0, m[..., 0])
    return m


def _graph(rng, dtype):
    """One function holding every case (one compile per configuration), with its inputs and references."""
    phs, args, outs, refs = [], [], [], []
    for i, (L, S, E, Ev, kind) in enumerate(CASES):
        arrs = [rng.standard_normal(s).astype(dtype) for s in ((B, H, L, E), (B, H, S, E), (B, H, S, Ev))]
        m = _mask(rng, kind, L, S, dtype)
        ts = [gc.placeholder(f"{n}{i}", a.shape, dtype) for n, a in zip("qkv", arrs)]
        mt = None if m is None else gc.placeholder(f"m{i}", m.shape, dtype)
        scale = 0.7 if i % 2 else None
        outs.append(gc.scaled_dot_product_attention(*ts, attn_mask=mt, scale=scale))
        refs.append(_ref(*arrs, m, scale))
        phs += ts + ([] if mt is None else [mt])
        args += arrs + ([] if m is None else [m])
    return phs, args, outs, refs


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_op_matches_numpy_on_llvm(isa, threads, monkeypatch):
    backend_or_skip("llvm")
    from graphc.backends.llvm import attention as A
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    monkeypatch.setattr(A, "PARALLEL_FLOPS", 0)       # split even these small kernels across the threads
    rng = np.random.default_rng(18)
    for dtype in ("float32", "float64") if (isa, threads) == ("avx2", 1) else ("float32",):
        phs, args, outs, refs = _graph(rng, dtype)
        f = gc.function(phs, outs, backend="llvm")
        assert _count(f) == len(CASES) and f.program.info["fallback_ops"] == []
        # with two threads every attention kernel's items are split (a thread entry calls the kernel)
        assert ("_attention_thunk" in f.source) == (threads == 2)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
        for got, want, case in zip(f(*args), refs, CASES):
            np.testing.assert_allclose(got, want, err_msg=str(case), **tol)
            if case[-1] == "dead_row":
                assert np.isnan(got[1, 2, 1]).all() and not np.isnan(got[0]).any()


def test_fused_kernel_under_bounds_sanitizer():
    """sanitize="bounds": every access of the kernel (q, k, v, a per-row mask, the output) is checked."""
    backend_or_skip("llvm")
    rng = np.random.default_rng(2)
    arrs = [rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 17, 8), (2, 3, 65, 8), (2, 3, 65, 5), (17, 65))]
    ts = [gc.placeholder(n, a.shape) for n, a in zip("qkvm", arrs)]
    f = gc.function(ts, gc.scaled_dot_product_attention(*ts[:3], attn_mask=ts[3]), backend="llvm", sanitize="bounds")
    np.testing.assert_allclose(f(*arrs), _ref(*arrs), rtol=1e-4, atol=1e-5)


def test_kernel_exp_over_its_whole_range():
    """One query, scores x in [-110, 0] (E = 1, scale 1) and V = I: the output row is softmax(x), so the
    kernel's vector exp is checked against NumPy's to float32 rounding, its underflow to 0 included."""
    backend_or_skip("llvm")
    S = 200
    x = np.linspace(-110, 0, S).astype(np.float32)
    q, k, v = np.ones((1, 1, 3, 1), np.float32), x.reshape(1, 1, S, 1), np.eye(S, dtype=np.float32)[None, None]
    ts = [gc.placeholder(n, a.shape) for n, a in zip("qkv", (q, k, v))]
    got = gc.function(ts, gc.scaled_dot_product_attention(*ts, scale=1.0), backend="llvm")(q, k, v)
    e = np.exp(x.astype(np.float64))
    for row in got[0, 0]:
        np.testing.assert_allclose(row, e / e.sum(), rtol=1e-6, atol=1e-37)


def test_fused_op_on_numpy_and_cuda_emulated():
    """The NumPy impl and cuda's composition lowering (host build of the CUDA source) agree with NumPy."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 8), (2, 7, 8), (2, 7, 3)))
    m = rng.standard_normal((5, 7)).astype(np.float32)
    for backend in ("numpy", "cuda-emulated"):
        try:
            backend_or_skip(backend)
        except pytest.skip.Exception:
            continue
        ts = [gc.placeholder(n, a.shape) for n, a in zip("qkvm", (q, k, v, m))]
        f = gc.function(ts, gc.scaled_dot_product_attention(*ts[:3], attn_mask=ts[3]), backend=backend)
        assert f.program.info.get("fallback_ops", []) == []
        np.testing.assert_allclose(f(q, k, v, m), _ref(q, k, v, m), rtol=1e-5, atol=1e-6)


def test_bool_and_causal_masks_follow_torch_convention():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for _ in range(3))
    keep = np.tril(np.ones((4, 4), bool))
    ts = [gc.placeholder(n, a.shape) for n, a in zip("qkv", (q, k, v))]
    f = gc.function(ts, [gc.scaled_dot_product_attention(*ts, attn_mask=keep),
                         gc.scaled_dot_product_attention(*ts, is_causal=True)], backend="numpy")
    want = _ref(q, k, v, np.where(keep, 0.0, -np.inf))
    for got in f(q, k, v):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(gc.GraphcError):
        gc.scaled_dot_product_attention(*ts, attn_mask=keep, is_causal=True)
    with pytest.raises(gc.ShapeError):
        gc.scaled_dot_product_attention(ts[0], gc.placeholder("k2", (1, 2, 4, 5)), ts[2])


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_gradients_by_finite_differences(backend):
    """q, k, v and the mask get their gradients (broadcast batch dims summed back) in float64."""
    backend_or_skip(backend)
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((2, 2, 5, 3))
    m = rng.standard_normal((3, 5))
    gc.verify_grad(lambda q, k, v, m: gc.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.6),
                   [q, k, v, m], backend=backend, rtol=1e-6, atol=1e-8)


# ---- the pass -------------------------------------------------------------------------------------------

def _mha_graph(need_weights=False, **kw):
    mha = gc.nn.MultiheadAttention(16, 2, seed=0, **kw)
    x = gc.placeholder("x", (None, 5, 16))
    out, w = mha(x, need_weights=need_weights)
    return mha, x, out, w


def test_pass_fires_on_multihead_attention_and_matches_torch():
    backend_or_skip("llvm")
    mha, x, out, _ = _mha_graph()
    f = gc.function([x], out, backend="llvm")
    assert _count(f) == 1
    # one packed QKV GEMM (q = k = v), no copy of the heads: matmuls are the projection and out_proj
    assert sum("matmul" in n for n in f.graph.op_names()) == 2
    xs = np.random.default_rng(6).standard_normal((3, 5, 16)).astype(np.float32)
    want = gc.function([x], out, backend="numpy", optimize=1)(xs)    # no pass at O1: the composition
    assert _count(gc.function([x], out, backend="numpy", optimize=1)) == 0
    np.testing.assert_allclose(f(xs), want, rtol=1e-5, atol=1e-6)
    if torch is not None:
        t = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        t.load_state_dict({k: torch.from_numpy(v) for k, v in mha.state_dict().items()})
        with torch.no_grad():
            ref = t(*[torch.from_numpy(xs)] * 3, need_weights=False)[0].numpy()
        np.testing.assert_allclose(f(xs), ref, rtol=1e-4, atol=1e-5)


def test_pass_keeps_masks_and_sequence_first_layout():
    backend_or_skip("llvm")
    mha = gc.nn.MultiheadAttention(16, 2, seed=1, batch_first=False)
    x = gc.placeholder("x", (5, 3, 16))
    kpm = np.zeros((3, 5), bool)
    kpm[0, -2:] = True
    am = np.triu(np.ones((5, 5), bool), 2)
    out, _ = mha(x, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    f = gc.function([x], out, backend="llvm")
    assert _count(f) == 1
    assert sum("matmul" in n for n in f.graph.op_names()) == 2    # the swapaxes is shared: still one QKV GEMM
    xs = np.random.default_rng(7).standard_normal((5, 3, 16)).astype(np.float32)
    want = gc.function([x], out, backend="numpy", optimize=1)(xs)
    np.testing.assert_allclose(f(xs), want, rtol=1e-5, atol=1e-6)


def test_pass_does_not_fire_when_the_pattern_differs():
    rng = np.random.default_rng(8)
    q, k, v = (gc.placeholder(n, (2, 4, 6)) for n in "qkv")
    s = q @ gc.swapaxes(k, -1, -2)
    scale = gc.placeholder("c", (2, 4, 4))
    cases = {
        "softmax over the query axis": gc.softmax(s, axis=-2) @ v,
        "weights also returned": None,
        "a mask that enlarges the scores": gc.softmax(s[:1] + gc.placeholder("m", (3, 4, 4)), -1) @ gc.broadcast_to(v[:1], (3, 4, 6)),
        "the scaled sum of scores and mask": gc.softmax((s + gc.placeholder("m2", (4, 4))) * 0.5, -1) @ v,
        "scores from no product": gc.softmax(scale, -1) @ v,
        "a 2-D value broadcast over the batch": gc.softmax(s, -1) @ gc.placeholder("v2", (4, 6)),
    }
    p = gc.softmax(s, -1)
    cases["weights also returned"] = [p @ v, p]
    for why, out in cases.items():
        outs = out if isinstance(out, list) else [out]
        ins = sorted({t for o in outs for t in _leaves(o)}, key=lambda t: t.name)
        f = gc.function(ins, outs, backend="numpy")
        assert _count(f) == 0, why
        args = [rng.standard_normal(t.shape).astype(np.float32) for t in ins]
        want = gc.function(ins, outs, backend="numpy", optimize=0)(*args)
        for a, b in zip(f(*args), want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a tensor (not constant) scale is part of Q: the pass fires and the result is unchanged
    out = gc.softmax((q * scale[:, :, :1]) @ gc.swapaxes(k, -1, -2), -1) @ v
    f = gc.function([q, k, v, scale], out, backend="numpy")
    assert _count(f) == 1
    args = [rng.standard_normal(t.shape).astype(np.float32) for t in (q, k, v, scale)]
    np.testing.assert_allclose(f(*args), gc.function([q, k, v, scale], out, backend="numpy", optimize=0)(*args),
                               rtol=1e-5, atol=1e-6)


def _leaves(t):
    seen, stack, out = set(), [t.node], []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op.name == "placeholder":
            out.append(n.outputs[0])
        stack.extend(x.node for x in n.inputs)
    return out


@needs_torch
def test_pass_fires_on_an_onnx_imported_encoder():
    """A 2-layer torch TransformerEncoder exported by torch.onnx (TorchScript, opset 17): q and k scaled by
    sqrt(scale) each, K^T by a Transpose; every layer's attention becomes one fused node; torch's output."""
    pytest.importorskip("onnx")
    backend_or_skip("llvm")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x, is_causal=False)

    torch.manual_seed(0)
    m = Encoder().eval()
    x = torch.randn(2, 5, 16)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    g = gc.load_onnx(buf.getvalue())
    f = gc.function(g, backend="llvm")
    assert _count(f) == 2
    for n in (2, 3):
        xs = torch.randn(n, 5, 16)
        with torch.no_grad():
            want = m(xs).numpy()
        np.testing.assert_allclose(f(xs.numpy())[0], want, rtol=1e-4, atol=1e-5)


@needs_torch
def test_w7_encoder_layer_matches_torch():
    """W7's layer (d_model 256, 4 heads, FFN 1024, sequence 64), batch 2, on llvm against torch."""
    backend_or_skip("llvm")
    torch.manual_seed(1)
    t = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True).eval()
    layer = gc.nn.TransformerEncoderLayer(256, 4, dim_feedforward=1024, dropout=0.0)
    layer.load_state_dict({k: v.detach().numpy() for k, v in t.state_dict().items()})
    layer.eval()
    x = gc.placeholder("x", (None, 64, 256))
    f = gc.function([x], layer(x), backend="llvm")
    assert _count(f) == 1
    xs = np.random.default_rng(9).standard_normal((2, 64, 256)).astype(np.float32)
    with torch.no_grad():
        want = t(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(f(xs), want, rtol=1e-4, atol=1e-4)


def test_training_through_multihead_attention_still_differentiates():
    """The pass runs after differentiation: a gradient through MHA matches finite differences (float64)."""
    mha = gc.nn.MultiheadAttention(4, 2, seed=2, dtype="float64")
    w = mha.in_proj_weight
    x = np.random.default_rng(10).standard_normal((1, 3, 4))
    xp = gc.placeholder("x", x.shape, "float64")
    out, _ = mha(xp, need_weights=False)
    loss = gc.sum(out * out)
    g = gc.function([xp], gc.grad(loss, [w])[0], backend="numpy")(x)
    f = gc.function([xp], loss, backend="numpy")
    w0, eps, num = w.value.copy(), 1e-6, np.zeros_like(w.value)
    for i in np.ndindex(*w0.shape):
        for sgn in (1, -1):
            ww = w0.copy()
            ww[i] += sgn * eps
            w.set_value(ww)
            num[i] += sgn * float(f(x)) / (2 * eps)
    w.set_value(w0)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_fused_op_exports_to_onnx(tmp_path):
    """gc.export_onnx writes the op as its composition; ONNX Runtime computes what graphc does."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rng = np.random.default_rng(11)
    arrs = [rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), (5, 7))]
    ts = [gc.placeholder(n, a.shape) for n, a in zip("qkvm", arrs)]
    gc.export_onnx(ts, [gc.scaled_dot_product_attention(*ts[:3], attn_mask=ts[3], scale=0.3)], tmp_path / "a.onnx")
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip("qkvm", arrs)))[0]
    np.testing.assert_allclose(got, _ref(*arrs, scale=0.3), rtol=1e-5, atol=1e-6)
