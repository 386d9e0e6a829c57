"""gc.nn.MultiheadAttention and gc.nn.TransformerEncoderLayer: torch's state-dict keys and layouts load
unchanged, eval-mode outputs equal torch 2.13's (masks, symbolic batch, batch_first, pre/post norm),
gradients check in float64 and against torch autograd, every backend computes the same, and a small
model trains."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

nn = gc.nn
from conftest import needs_torch, torch

E, H, L, S = 8, 2, 4, 5


def _arr(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _t(a):
    return torch.tensor(np.asarray(a))


# ---- MultiheadAttention against torch ---------------------------------------------------------------

MHA_CASES = {
    "plain": {},
    "no_bias": dict(bias=False),
    "seq_first": dict(batch_first=False),
    "bool_key_padding": dict(kpm="bool"),
    "float_key_padding": dict(kpm="float"),
    "bool_attn_mask": dict(am="bool"),
    "float_attn_mask": dict(am="float"),
    "both_masks": dict(kpm="bool", am="bool"),
    "both_float_masks": dict(kpm="float", am="float"),
    "per_head_weights": dict(average=False, am="bool"),
    "no_weights": dict(need_weights=False, kpm="bool"),
    "three_d_mask": dict(am="bool3", symbolic=False),
    "one_head": dict(heads=1),
}


def _masks(rng, N, kind_kpm, kind_am, heads):
    kpm = am = None
    if kind_kpm == "bool":
        kpm = np.zeros((N, S), bool)
        kpm[0, -2:] = True
        kpm[1, 0] = True
    elif kind_kpm == "float":
        kpm = _arr(rng, N, S)
    if kind_am == "bool":
        am = np.triu(np.ones((L, S), bool), 2)      # every row keeps >= 1 key
    elif kind_am == "float":
        am = _arr(rng, L, S)
    elif kind_am == "bool3":
        am = rng.random((N * heads, L, S)) < 0.3
        am[..., 0] = False
    return kpm, am


@needs_torch
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_matches_torch(case):
    cfg = MHA_CASES[case]
    heads, bias, bf = cfg.get("heads", H), cfg.get("bias", True), cfg.get("batch_first", True)
    need, avg = cfg.get("need_weights", True), cfg.get("average", True)
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(E, heads, bias=bias, batch_first=bf).eval()
    m = nn.MultiheadAttention(E, heads, bias=bias, batch_first=bf).eval()
    assert list(m.state_dict()) == list(tm.state_dict())
    m.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(1)
    N = 3
    q, k, v = _arr(rng, N, L, E), _arr(rng, N, S, E), _arr(rng, N, S, E)
    kpm, am = _masks(rng, N, cfg.get("kpm"), cfg.get("am"), heads)
    if not bf:
        q, k, v = (a.transpose(1, 0, 2).copy() for a in (q, k, v))
    bdim = None if cfg.get("symbolic", True) else N
    shp = (lambda n: (bdim, n, E)) if bf else (lambda n: (n, bdim, E))
    phs = [gc.placeholder("q", shp(L)), gc.placeholder("k", shp(S)), gc.placeholder("v", shp(S))]
    args = [q, k, v]
    mk = {}
    if kpm is not None:
        mk["key_padding_mask"] = gc.placeholder("kpm", (bdim, S), kpm.dtype.name)
        phs.append(mk["key_padding_mask"])
        args.append(kpm)
    if am is not None:
        mk["attn_mask"] = am          # a constant mask
    out, w = m(*phs[:3], need_weights=need, average_attn_weights=avg, **mk)
    assert (w is None) == (not need)
    got = gc.function(phs, [out] + ([w] if need else []))(*args)
    tout, tw = tm(_t(q), _t(k), _t(v), key_padding_mask=None if kpm is None else _t(kpm), need_weights=need,
                  attn_mask=None if am is None else _t(am), average_attn_weights=avg)
    np.testing.assert_allclose(got[0], tout.detach().numpy(), rtol=1e-5, atol=1e-6)
    if need:
        np.testing.assert_allclose(got[1], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
        assert got[1].shape == ((N, L, S) if avg else (N, heads, L, S))


@needs_torch
def test_mha_unbatched_and_self_attention_default():
    torch.manual_seed(1)
    tm = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    m = nn.MultiheadAttention(E, H)
    m.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(2)
    x = _arr(rng, L, E)
    xp = gc.placeholder("x", (L, E))
    out, w = m(xp, training=False)              # key = value = query
    got = gc.function([xp], [out, w])(x)
    tout, tw = tm(_t(x), _t(x), _t(x))
    np.testing.assert_allclose(got[0], tout.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_mha_parameters_and_state_dict_layout():
    m = nn.MultiheadAttention(12, 3, seed=0)
    sd = m.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {"in_proj_weight": (36, 12), "in_proj_bias": (36,),
                                                   "out_proj.weight": (12, 12), "out_proj.bias": (12,)}
    assert not sd["in_proj_bias"].any() and not sd["out_proj.bias"].any()    # torch zero-initialises them
    bound = np.sqrt(6 / (12 + 36))                                             # xavier_uniform
    assert np.abs(sd["in_proj_weight"]).max() <= bound
    assert len(m.params) == 4
    assert list(nn.MultiheadAttention(12, 3, bias=False).state_dict()) == ["in_proj_weight", "out_proj.weight"]
    a, b = nn.MultiheadAttention(12, 3), nn.MultiheadAttention(12, 3)
    assert not np.array_equal(a.in_proj_weight.value, b.in_proj_weight.value)   # fresh weights per layer
    np.testing.assert_array_equal(nn.MultiheadAttention(12, 3, seed=4).in_proj_weight.value,
                                  nn.MultiheadAttention(12, 3, seed=4).in_proj_weight.value)


# ---- TransformerEncoderLayer against torch ---------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", [False, True])
def test_encoder_layer_matches_torch(norm_first, activation, masks):
    torch.manual_seed(3)
    tl = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.1, activation=activation,
                                          batch_first=True, norm_first=norm_first).eval()
    g = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.1, activation=activation,
                                   norm_first=norm_first)
    assert list(g.state_dict()) == list(tl.state_dict())
    g.load_state_dict(tl.state_dict())
    rng = np.random.default_rng(4)
    x = _arr(rng, 3, L, E)
    xp = gc.placeholder("x", (None, L, E))
    kw, tkw, phs, args = {}, {}, [xp], [x]
    if masks:
        causal = np.triu(np.ones((L, L), bool), 1)
        kpm = np.zeros((3, L), bool)
        kpm[0, -1] = kpm[2, 1] = True
        kp = gc.placeholder("kpm", (None, L), "bool")
        kw, tkw = dict(src_mask=causal, src_key_padding_mask=kp), dict(src_mask=_t(causal),
                                                                       src_key_padding_mask=_t(kpm))
        phs, args = [xp, kp], [x, kpm]
    got = gc.function(phs, g(xp, training=False, **kw))(*args)
    want = tl(_t(x), **tkw).detach().numpy()          # grad enabled: torch's reference (non-fast) path
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():                              # and its fused fast path
        np.testing.assert_allclose(got, tl(_t(x), **tkw).numpy(), rtol=1e-4, atol=1e-5)
    g.eval()
    np.testing.assert_allclose(gc.function(phs, g(xp, **kw))(*args), got, rtol=0, atol=0)


@needs_torch
def test_encoder_layer_no_bias_state_dict_loads():
    tl = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, bias=False, batch_first=True).eval()
    g = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, bias=False)
    assert list(g.state_dict()) == list(tl.state_dict())
    g.load_state_dict(tl.state_dict())
    x = _arr(np.random.default_rng(5), 2, L, E)
    xp = gc.placeholder("x", (None, L, E))
    np.testing.assert_allclose(gc.function([xp], g(xp, training=False))(x), tl(_t(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_encoder_layer_training_mode_uses_dropout_and_sequential():
    g = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.5, seed=0)
    model = nn.Sequential(g, nn.MultiheadAttention(E, H, dropout=0.5, seed=1), nn.Dense(E, 1))
    xp = gc.placeholder("x", (None, L, E))
    x = _arr(np.random.default_rng(6), 2, L, E)
    f_train = gc.function([xp], model(xp, training=True))
    f_eval = gc.function([xp], model(xp, training=False))
    a, b = f_train(x), f_train(x)
    assert a.shape == (2, L, 1) and not np.allclose(a, b)           # a fresh dropout mask per call
    np.testing.assert_array_equal(f_eval(x), f_eval(x))
    assert len(model.params) == 12 + 4 + 2


# ---- gradients --------------------------------------------------------------------------------------

def test_mha_verify_grad_float64():
    """Central differences on the functional form: query, key, value and every weight, with a mask."""
    rng = np.random.default_rng(7)
    e, h = 4, 2
    am = np.array([[0, 0, 1], [0, 1, 1]], bool)

    def fn(q, k, v, w_in, b_in, w_out, b_out):
        out, w = nn.multi_head_attention(q, k, v, h, w_in, b_in, w_out, b_out, attn_mask=am)
        return out + gc.sum(w)
    inputs = [rng.standard_normal(s) for s in ((2, 2, e), (2, 3, e), (2, 3, e), (3 * e, e), (3 * e,), (e, e), (e,))]
    gc.verify_grad(fn, inputs, rtol=1e-5, atol=1e-8)


@needs_torch
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_gradients_match_torch_float64(norm_first):
    torch.manual_seed(8)
    tl = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True,
                                          norm_first=norm_first).double()
    g = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, norm_first=norm_first, dtype="float64")
    g.load_state_dict(tl.state_dict())
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, L, E))
    r = rng.standard_normal((2, L, E))
    kpm = np.array([[False, False, False, True], [False, True, False, False]])
    xp = gc.placeholder("x", (None, L, E), "float64")
    kp = gc.placeholder("kpm", (None, L), "bool")
    rp = gc.placeholder("r", (None, L, E), "float64")
    loss = gc.sum(g(xp, src_key_padding_mask=kp, training=True) * rp)
    names = list(g.named_parameters())
    got = gc.function([xp, kp, rp], [loss] + gc.grad(loss, list(g.named_parameters().values())))(x, kpm, r)
    tloss = (tl(_t(x), src_key_padding_mask=_t(kpm)) * _t(r)).sum()
    tloss.backward()
    tgrads = dict(tl.named_parameters())
    np.testing.assert_allclose(got[0], tloss.item(), rtol=1e-10)
    for name, gg in zip(names, got[1:]):
        np.testing.assert_allclose(gg, tgrads[name].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


def test_attention_step_on_every_backend(backend):
    """Loss and parameter gradients of an encoder layer (masks with -inf, dropout reseeded) on each
    backend equal the NumPy backend's."""
    g = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.2, activation="gelu", seed=0,
                                   dtype="float64")
    head = nn.Dense(E, 3, seed=1, dtype="float64")
    xp = gc.placeholder("x", (None, L, E), "float64")
    kp = gc.placeholder("kpm", (None, L), "bool")
    y = gc.placeholder("y", (None,), "int64")
    causal = np.triu(np.ones((L, L), bool), 1)
    h = g(xp, src_mask=causal, src_key_padding_mask=kp, training=True)
    loss = gc.losses.cross_entropy(head(gc.mean(h, axis=1)), y)
    outs = [loss] + gc.grad(loss, g.params + head.params)
    rng = np.random.default_rng(10)
    x, kpm, lab = rng.standard_normal((3, L, E)), np.zeros((3, L), bool), rng.integers(0, 3, 3)
    kpm[1, 2:] = True
    gens = [d.generator for d in (g.dropout, g.dropout1, g.dropout2, g.self_attn)]
    results = []
    for be in ("numpy", backend):
        f = gc.function([xp, kp, y], outs, backend=be)
        for i, gen in enumerate(gens):
            gen.seed(i)
        results.append(f(x, kpm, lab))
    for got, want in zip(results[1], results[0]):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_encoder_training_smoke_loss_decreases():
    """Classify whether token 0 equals the sum-sign of the sequence: a tiny encoder + Adam learns it."""
    rng = np.random.default_rng(11)
    n = 64
    x = rng.standard_normal((n, L, E)).astype(np.float32)
    lab = (x[:, :, 0].sum(1) > 0).astype(np.int64)
    enc = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, seed=0)
    head = nn.Dense(E, 2, seed=1)
    xp, y = gc.placeholder("x", (None, L, E)), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(head(gc.mean(enc(xp, training=True), axis=1)), y)
    params = enc.params + head.params
    step = gc.function([xp, y], loss, updates=gc.optim.Adam(1e-2).updates(loss, params))
    losses = [float(step(x, lab)) for _ in range(60)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# ---- errors -----------------------------------------------------------------------------------------

def test_bad_arguments_raise_graphc_errors():
    with pytest.raises(gc.GraphcError, match="divisible by num_heads"):
        nn.MultiheadAttention(10, 3)
    with pytest.raises(gc.GraphcError, match="positive int"):
        nn.MultiheadAttention(8, 0)
    with pytest.raises(gc.GraphcError, match=r"dropout must be a probability"):
        nn.MultiheadAttention(8, 2, dropout=1.5)
    with pytest.raises(gc.GraphcError, match="'relu', 'gelu'"):
        nn.TransformerEncoderLayer(8, 2, activation="tanhh")
    with pytest.raises(gc.GraphcError, match="dim_feedforward"):
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=0)
    m = nn.MultiheadAttention(8, 2)
    x = gc.placeholder("x", (None, 4, 8))
    with pytest.raises(gc.ShapeError, match=r"(?s)last dim should be embed_dim=8.*called at .*test_attention.py"):
        m(gc.placeholder("z", (None, 4, 6)))
    with pytest.raises(gc.ShapeError, match="expected \\(batch, seq, embed_dim\\)"):
        m(gc.placeholder("z", (2, 3, 4, 8)))
    with pytest.raises(gc.ShapeError, match="key has 5 positions and value 4"):
        m(x, gc.placeholder("k", (None, 5, 8)), x)
    with pytest.raises(gc.ShapeError, match="key_padding_mask has shape"):
        m(x, key_padding_mask=np.zeros((2, 5), bool))
    # a fixed-batch mask fixes a symbolic batch (graphc unifies N with 2), checked when called
    f = gc.function([x], m(x, key_padding_mask=np.zeros((2, 4), bool))[0])
    assert f(np.zeros((2, 4, 8), np.float32)).shape == (2, 4, 8)
    with pytest.raises(gc.InputError, match="unified N with 2"):
        f(np.zeros((3, 4, 8), np.float32))
    with pytest.raises(gc.ShapeError, match="attn_mask has shape"):
        m(x, attn_mask=np.zeros((4, 3), bool))
    with pytest.raises(gc.DTypeError, match="bool mask"):
        m(x, attn_mask=np.zeros((4, 4), np.int64))
    with pytest.raises(gc.GraphcError, match="num_heads must be a positive int dividing"):
        nn.multi_head_attention(x, x, x, 3, np.zeros((24, 8), np.float32))
    with pytest.raises(gc.ShapeError, match=r"in_proj_weight has shape \(8, 8\)"):
        nn.multi_head_attention(x, x, x, 2, np.zeros((8, 8), np.float32))
