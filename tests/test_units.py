"""gc.nn.RBF, gc.nn.PNormPool / gc.pnorm_pool and gc.nn.Highway: outputs against NumPy written from the
definitions, p-norm pooling against torch's lp_pool1d (values and gradients), layer gradients against
torch autograd of the same formula, initialisation, training and argument errors. The op table
(tests/cases_units.py) checks the functions on every backend with float64 finite differences."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import needs_torch, torch

nn = gc.nn


def _run(layer, a, backend="numpy"):
    x = gc.placeholder("x", a.shape, a.dtype.name)
    return gc.function([x], layer(x), backend=backend)(a)


# ---- p-norm units ---------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("p,group", [(2, 2), (2, 3), (3, 2)])
def test_pnorm_pool_matches_torch_lp_pool1d_and_its_gradient(p, group):
    """Over the feature axis, groups of `group` units are torch's lp_pool1d windows (stride = kernel);
    torch raises to the power p without |.|, so p=3 uses positive inputs."""
    a = np.random.default_rng(0).standard_normal((4, 6))
    if p % 2:
        a = np.abs(a) + 0.1
    ta = torch.tensor(a, requires_grad=True)
    ty = torch.nn.functional.lp_pool1d(ta[:, None], p, group)[:, 0]
    (ty * torch.arange(ty.shape[1], dtype=torch.float64)).sum().backward()
    x = gc.placeholder("x", (None, 6), "float64")
    y = nn.PNormPool(group, p)(x)
    gx = gc.grad(gc.sum(y * gc.constant(np.arange(6 // group, dtype=np.float64))), x)
    got = gc.function([x], [y, gx])(a)
    np.testing.assert_allclose(got[0], ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(got[1], ta.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_pnorm_pool_channels_zero_groups_and_limits(backend):
    a = np.random.default_rng(1).standard_normal((2, 6, 3, 3))
    a[0, :3] = 0.0                                   # a group of zeros: value 0, gradient 0 (not nan)
    want = np.sqrt((a.reshape(2, 2, 3, 3, 3) ** 2).sum(2))
    x = gc.placeholder("x", a.shape, "float64")
    y = gc.pnorm_pool(x, 3)
    got, gx = gc.function([x], [y, gc.grad(gc.sum(y), x)], backend=backend)(a)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.isfinite(gx)) and not gx[0, :3].any()
    # large p approaches maxout of |x|
    v = np.abs(np.random.default_rng(2).standard_normal((3, 8))) + 0.5
    np.testing.assert_allclose(_run(nn.PNormPool(4, 60.0), v), np.abs(v).reshape(3, 2, 4).max(-1), rtol=0.03)


def test_pnorm_pool_errors():
    x = gc.placeholder("x", (2, 5))
    with pytest.raises(gc.ShapeError, match="not a multiple of group_size=2"):
        gc.pnorm_pool(x, 2)
    with pytest.raises(gc.GraphcError, match="p must be a finite number >= 1"):
        gc.pnorm_pool(x, 5, p=0.5)
    with pytest.raises(gc.GraphcError, match="PNormPool: group_size must be an integer >= 1"):
        nn.PNormPool(0)
    with pytest.raises(gc.DTypeError, match="floating point"):
        gc.pnorm_pool(gc.placeholder("i", (2, 4), "int64"), 2)


# ---- RBF units ------------------------------------------------------------------------------------

def test_rbf_layer_definition_parameters_and_gradients():
    layer = nn.RBF(3, 5, sigma=0.7, dtype="float64", seed=0)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {"centres": (5, 3), "log_sigmas": (5,)}
    np.testing.assert_allclose(layer.log_sigmas.value, np.log(0.7))
    assert not np.array_equal(nn.RBF(3, 5).centres.value, nn.RBF(3, 5).centres.value)   # fresh per layer
    a = np.random.default_rng(3).standard_normal((4, 2, 3))
    c = layer.centres.value
    gamma = 1 / 0.7 ** 2
    want = np.exp(-gamma * ((a[..., None, :] - c) ** 2).sum(-1))
    np.testing.assert_allclose(_run(layer, a), want, rtol=1e-12)
    # widths are learnt: finite differences through log_sigmas and centres
    x = gc.placeholder("x", (4, 2, 3), "float64")
    loss = gc.sum(layer(x) ** 2)
    g_c, g_s = gc.function([x], gc.grad(loss, [layer.centres, layer.log_sigmas]))(a)
    for p, g in ((layer.centres, g_c), (layer.log_sigmas, g_s)):
        v0 = p.get_value()
        num = np.zeros_like(v0)
        f = gc.function([x], loss)
        for i in np.ndindex(v0.shape):
            for sgn in (1, -1):
                v = v0.copy()
                v[i] += sgn * 1e-6
                p.set_value(v)
                num[i] += sgn * float(f(a)) / 2e-6
        p.set_value(v0)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_rbf_network_fits_a_curve():
    """RBF units + a linear read-out learn sin on [-2, 2] (centres and widths move)."""
    rbf, out = nn.RBF(1, 12, seed=1), nn.Dense(12, 1, seed=2)
    rbf.centres.set_value(np.linspace(-2, 2, 12)[:, None].astype(np.float32))
    x = gc.placeholder("x", (None, 1))
    t = gc.placeholder("t", (None, 1))
    loss = gc.losses.mse(out(rbf(x)), t)
    step = gc.function([x, t], loss, updates=gc.optim.Adam(0.05).updates(loss, rbf.params + out.params))
    data = np.linspace(-2, 2, 64, dtype=np.float32)[:, None]
    first = float(step(data, np.sin(2 * data)))
    for _ in range(300):
        last = float(step(data, np.sin(2 * data)))
    assert last < 0.02 * first, (first, last)


def test_rbf_errors():
    with pytest.raises(gc.GraphcError, match="sigma"):
        nn.RBF(2, 3, sigma=0)
    with pytest.raises(gc.GraphcError, match="out_features must be a positive int"):
        nn.RBF(2, 0)
    with pytest.raises(gc.ShapeError, match=r"(?s)last dim should be 2.*called at .*test_units.py"):
        nn.RBF(2, 3)(gc.placeholder("z", (4, 3)))
    with pytest.raises(gc.ShapeError, match="gamma must be a scalar or one width per unit"):
        gc.rbf(gc.placeholder("z", (4, 2)), np.zeros((3, 2), np.float32), np.ones(2, np.float32))


# ---- Highway ------------------------------------------------------------------------------------

def _highway_np(layer, a, act):
    wh, bh = layer.transform.weight.value, layer.transform.bias.value
    wt, bt = layer.gate.weight.value, layer.gate.bias.value
    t = 1 / (1 + np.exp(-(a @ wt.T + bt)))
    return t * act(a @ wh.T + bh) + (1 - t) * a


def test_highway_definition_init_and_state_dict(backend):
    layer = nn.Highway(4, dtype="float64", seed=0)
    assert list(layer.state_dict()) == ["transform.weight", "transform.bias", "gate.weight", "gate.bias"]
    np.testing.assert_array_equal(layer.gate.bias.value, -2.0)        # Srivastava et al.: negative gate bias
    np.testing.assert_array_equal(nn.Highway(4, gate_bias=-1.0).gate.bias.value, -1.0)
    a = np.random.default_rng(4).standard_normal((5, 4))
    np.testing.assert_allclose(_run(layer, a, backend), _highway_np(layer, a, lambda v: np.maximum(v, 0)),
                               rtol=1e-12, atol=1e-14)
    tl = nn.Highway(4, activation="tanh", dtype="float64", seed=1)
    np.testing.assert_allclose(_run(tl, a, backend), _highway_np(tl, a, np.tanh), rtol=1e-12, atol=1e-14)
    # with a strongly closed gate the layer carries x through
    closed = nn.Highway(4, gate_bias=-40.0, dtype="float64", seed=2)
    np.testing.assert_allclose(_run(closed, a), a, atol=1e-12)


@needs_torch
def test_highway_gradients_match_torch_autograd():
    layer = nn.Highway(3, activation="tanh", dtype="float64", seed=5)
    a = np.random.default_rng(6).standard_normal((4, 3))
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in layer.state_dict().items()}
    ta = torch.tensor(a, requires_grad=True)
    th = torch.tanh(ta @ tp["transform.weight"].T + tp["transform.bias"])
    tt = torch.sigmoid(ta @ tp["gate.weight"].T + tp["gate.bias"])
    ((tt * th + (1 - tt) * ta) ** 2).sum().backward()
    x = gc.placeholder("x", (4, 3), "float64")
    loss = gc.sum(layer(x) ** 2)
    names = list(layer.named_parameters())
    got = gc.function([x], gc.grad(loss, [x] + list(layer.named_parameters().values())))(a)
    np.testing.assert_allclose(got[0], ta.grad.numpy(), rtol=1e-10)
    for name, g in zip(names, got[1:]):
        np.testing.assert_allclose(g, tp[name].grad.numpy(), rtol=1e-10, atol=1e-13, err_msg=name)


def test_deep_highway_stack_trains():
    """Ten highway layers (gates closed at the start) still pass a gradient and fit a linear map."""
    rng = np.random.default_rng(7)
    model = nn.Sequential(*[nn.Highway(4, seed=i) for i in range(10)])
    x = gc.placeholder("x", (None, 4))
    t = gc.placeholder("t", (None, 4))
    loss = gc.losses.mse(model(x), t)
    step = gc.function([x, t], loss, updates=gc.optim.Adam(0.01).updates(loss, model.params))
    data = rng.standard_normal((32, 4)).astype(np.float32)
    target = (data @ rng.standard_normal((4, 4)) * 0.5).astype(np.float32)
    first = float(step(data, target))
    for _ in range(150):
        last = float(step(data, target))
    assert last < 0.5 * first, (first, last)
    assert len(model.params) == 40


def test_highway_errors():
    with pytest.raises(gc.GraphcError, match="activation must be one of relu"):
        nn.Highway(3, activation="swish")
    with pytest.raises(gc.GraphcError, match="features must be a positive int"):
        nn.Highway(0)
    with pytest.raises(gc.ShapeError, match=r"(?s)Highway\(3\).*last dim should be 3"):
        nn.Highway(3)(gc.placeholder("z", (2, 4)))
