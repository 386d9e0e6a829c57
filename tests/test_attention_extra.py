"""gc.nn.MultiheadAttention with kdim/vdim (torch's separate q/k/v projection weights) and
gc.nn.TransformerEncoder (torch's `layers.N.*` layout): state dicts load unchanged, outputs and float64
gradients equal torch 2.13's, every backend computes the same, and bad arguments are GraphcErrors."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, needs_torch, torch

nn = gc.nn
E, H, L, S, KD, VD = 8, 2, 4, 5, 6, 3


def _t(a):
    return torch.tensor(np.asarray(a))


# ---- kdim / vdim ----------------------------------------------------------------------------------

def test_mha_kdim_vdim_parameters_follow_torchs_layout():
    m = nn.MultiheadAttention(E, H, kdim=KD, vdim=VD, seed=0)
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        "q_proj_weight": (E, E), "k_proj_weight": (E, KD), "v_proj_weight": (E, VD), "in_proj_bias": (3 * E,),
        "out_proj.weight": (E, E), "out_proj.bias": (E,)}
    assert m.in_proj_weight is None and len(m.params) == 6
    assert list(nn.MultiheadAttention(E, H, kdim=E, vdim=E).state_dict())[0] == "in_proj_weight"  # same dims
    assert list(nn.MultiheadAttention(E, H, bias=False, kdim=KD).state_dict()) == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    for name, fan in (("k_proj_weight", KD), ("v_proj_weight", VD)):
        assert np.abs(m.state_dict()[name]).max() <= np.sqrt(6 / (E + fan))    # xavier_uniform


@needs_torch
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", [False, True])
def test_mha_kdim_vdim_matches_torch(batch_first, masks):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(E, H, kdim=KD, vdim=VD, batch_first=batch_first).eval()
    with torch.no_grad():
        tm.in_proj_bias.normal_()      # torch zero-initialises it: make the bias count
    m = nn.MultiheadAttention(E, H, kdim=KD, vdim=VD, batch_first=batch_first)
    assert list(m.state_dict()) == list(tm.state_dict())
    m.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((3, L, E), (3, S, KD), (3, S, VD)))
    kpm = np.zeros((3, S), bool)
    kpm[0, -2:] = kpm[2, 0] = True
    am = np.triu(np.ones((L, S), bool), 2)
    if not batch_first:
        q, k, v = (a.transpose(1, 0, 2).copy() for a in (q, k, v))
    shp = (lambda n, d: (None, n, d)) if batch_first else (lambda n, d: (n, None, d))
    phs = [gc.placeholder("q", shp(L, E)), gc.placeholder("k", shp(S, KD)), gc.placeholder("v", shp(S, VD))]
    kw = dict(key_padding_mask=gc.placeholder("kpm", (None, S), "bool"), attn_mask=am) if masks else {}
    out, w = m(*phs, **kw)
    got = gc.function(phs + ([kw["key_padding_mask"]] if masks else []), [out, w])(q, k, v, *([kpm] if masks else []))
    tout, tw = tm(_t(q), _t(k), _t(v), key_padding_mask=_t(kpm) if masks else None,
                  attn_mask=_t(am) if masks else None)
    np.testing.assert_allclose(got[0], tout.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], tw.detach().numpy(), rtol=1e-5, atol=1e-6)


@needs_torch
def test_mha_kdim_vdim_gradients_match_torch_float64():
    torch.manual_seed(2)
    tm = torch.nn.MultiheadAttention(E, H, kdim=KD, vdim=VD, batch_first=True).double()
    m = nn.MultiheadAttention(E, H, kdim=KD, vdim=VD, dtype="float64")
    m.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s) for s in ((2, L, E), (2, S, KD), (2, S, VD)))
    r = rng.standard_normal((2, L, E))
    tq, tk, tv = (_t(a).requires_grad_() for a in (q, k, v))
    (tm(tq, tk, tv)[0] * _t(r)).sum().backward()
    phs = [gc.placeholder(n, a.shape, "float64") for n, a in zip("qkv", (q, k, v))]
    loss = gc.sum(m(*phs)[0] * gc.constant(r))
    params = m.named_parameters()
    got = gc.function(phs, gc.grad(loss, phs + list(params.values())))(q, k, v)
    for g, t in zip(got[:3], (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-11)
    tgrads = dict(tm.named_parameters())
    for name, g in zip(params, got[3:]):
        np.testing.assert_allclose(g, tgrads[name].grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def test_functional_separate_projections_verify_grad():
    rng = np.random.default_rng(4)
    e, h = 4, 2

    def fn(q, k, v, wq, wk, wv, b_in, w_out):
        out, w = nn.multi_head_attention(q, k, v, h, None, b_in, w_out, q_proj_weight=wq, k_proj_weight=wk,
                                         v_proj_weight=wv)
        return out + gc.sum(w)
    shapes = ((2, 2, e), (2, 3, 5), (2, 3, 2), (e, e), (e, 5), (e, 2), (3 * e,), (e, e))
    gc.verify_grad(fn, [rng.standard_normal(s) for s in shapes], rtol=1e-5, atol=1e-8)


def test_kdim_vdim_errors():
    m = nn.MultiheadAttention(E, H, kdim=KD, vdim=VD)
    q = gc.placeholder("q", (None, L, E))
    with pytest.raises(gc.ShapeError, match=r"k_proj_weight has shape \(8, 6\), expected .*\(8, 5\)"):
        m(q, gc.placeholder("k", (None, S, 5)), gc.placeholder("v", (None, S, VD)))
    with pytest.raises(gc.ShapeError, match="needs separate projection weights"):
        nn.MultiheadAttention(E, H)(q, gc.placeholder("k", (None, S, KD)), gc.placeholder("v", (None, S, KD)))
    with pytest.raises(gc.GraphcError, match="kdim must be a positive int"):
        nn.MultiheadAttention(E, H, kdim=0)
    with pytest.raises(gc.GraphcError, match="not both"):
        nn.multi_head_attention(q, q, q, 2, np.zeros((24, 8), np.float32), q_proj_weight=np.zeros((8, 8)))
    with pytest.raises(gc.GraphcError, match="all of q_proj_weight"):
        nn.multi_head_attention(q, q, q, 2, None)


# ---- TransformerEncoder -----------------------------------------------------------------------------

def test_encoder_copies_the_layer_and_names_its_state_like_torch():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, seed=0)
    enc = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(E))
    sd = enc.state_dict()
    assert len(sd) == 3 * len(layer.state_dict()) + 2
    assert list(sd)[0] == "layers.0.self_attn.in_proj_weight" and list(sd)[-2:] == ["norm.weight", "norm.bias"]
    for i in range(3):     # torch deep-copies: every layer starts with the given layer's weights
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(sd[f"layers.{i}.{k}"], v)
    assert len(enc.params) == 3 * len(layer.params) + 2
    assert enc.layers[0].linear1.weight is not enc.layers[1].linear1.weight
    assert len({id(p) for p in enc.params}) == len(enc.params)


@needs_torch
@pytest.mark.parametrize("norm_first,final_norm,masks", [(False, False, False), (False, True, True),
                                                         (True, True, True)])
def test_encoder_matches_torch(norm_first, final_norm, masks):
    torch.manual_seed(5)
    tl = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True,
                                          norm_first=norm_first)
    tenc = torch.nn.TransformerEncoder(tl, 2, norm=torch.nn.LayerNorm(E) if final_norm else None,
                                       enable_nested_tensor=False).eval()
    with torch.no_grad():
        for p in tenc.parameters():      # the copies differ after this, and norms are not identities
            p.add_(0.1 * torch.randn_like(p))
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                                           norm_first=norm_first), 2,
                                norm=nn.LayerNorm(E) if final_norm else None).eval()
    assert list(enc.state_dict()) == list(tenc.state_dict())
    enc.load_state_dict(tenc.state_dict())
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, L, E)).astype(np.float32)
    kpm = np.zeros((3, L), bool)
    kpm[1, -1] = True
    causal = np.triu(np.ones((L, L), bool), 1)
    xp = gc.placeholder("x", (None, L, E))
    kp = gc.placeholder("kpm", (None, L), "bool")
    out = enc(xp, mask=causal if masks else None, src_key_padding_mask=kp if masks else None)
    got = gc.function([xp, kp] if masks else [xp], out)(*([x, kpm] if masks else [x]))
    want = tenc(_t(x), mask=_t(causal) if masks else None, src_key_padding_mask=_t(kpm) if masks else None)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)


@needs_torch
def test_encoder_gradients_match_torch_float64():
    torch.manual_seed(7)
    tenc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True), 2,
        norm=torch.nn.LayerNorm(E), enable_nested_tensor=False).double()
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, dtype="float64"),
                                2, norm=nn.LayerNorm(E, dtype="float64"))
    enc.load_state_dict(tenc.state_dict())
    rng = np.random.default_rng(8)
    x, r = rng.standard_normal((2, L, E)), rng.standard_normal((2, L, E))
    xp = gc.placeholder("x", (None, L, E), "float64")
    loss = gc.sum(enc(xp, training=True) * gc.constant(r))
    params = enc.named_parameters()
    got = gc.function([xp], [loss] + gc.grad(loss, list(params.values())))(x)
    tloss = (tenc(_t(x)) * _t(r)).sum()
    tloss.backward()
    np.testing.assert_allclose(got[0], tloss.item(), rtol=1e-10)
    tgrads = dict(tenc.named_parameters())
    for name, g in zip(params, got[1:]):
        np.testing.assert_allclose(g, tgrads[name].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


def test_encoder_on_every_backend(backend):
    backend_or_skip(backend)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, seed=1,
                                                           dtype="float64"), 2)
    xp = gc.placeholder("x", (None, L, E), "float64")
    out = enc(xp, training=False)
    loss = gc.sum(out * out)
    outs = [out] + gc.grad(loss, enc.params[:4])
    x = np.random.default_rng(9).standard_normal((2, L, E))
    want = gc.function([xp], outs, backend="numpy")(x)
    got = gc.function([xp], outs, backend=backend)(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


def test_encoder_modes_and_errors():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.5), 2)
    enc.eval()
    assert not any(layer.training for layer in enc.layers)
    x = np.random.default_rng(10).standard_normal((2, L, E)).astype(np.float32)
    xp = gc.placeholder("x", (None, L, E))
    f = gc.function([xp], enc(xp))
    np.testing.assert_array_equal(f(x), f(x))       # eval: no dropout
    with pytest.raises(gc.GraphcError, match="encoder_layer must be a gc.nn.TransformerEncoderLayer"):
        nn.TransformerEncoder(nn.Dense(E, E), 2)
    with pytest.raises(gc.GraphcError, match="num_layers must be a positive int"):
        nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H), 0)
