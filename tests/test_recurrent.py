"""gc.nn.RNN/LSTM/GRU against NumPy loops written here (always) and torch.nn with copied weights
(when torch is installed), gradients by finite differences and against torch autograd."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ir import toposort

KINDS = ["LSTM", "GRU", "RNN"]
CONFIGS = [(1, False), (2, True)]


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _np_cell(kind, p, x, h, c, sfx):
    """One step of torch's cell equations with state-dict weights `p` (suffix like '_l0')."""
    gi = x @ p[f"weight_ih{sfx}"].T + p[f"bias_ih{sfx}"]
    gh = h @ p[f"weight_hh{sfx}"].T + p[f"bias_hh{sfx}"]
    if kind == "RNN":
        return np.tanh(gi + gh), c
    if kind == "GRU":
        H = h.shape[1]
        r, z = _sig(gi[:, :H] + gh[:, :H]), _sig(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return (1 - z) * n + z * h, c
    i, f, g, o = np.split(gi + gh, 4, axis=1)
    c = _sig(f) * c + _sig(i) * np.tanh(g)
    return _sig(o) * np.tanh(c), c


def np_recurrent(kind, p, x, layers, bidir, h0=None, c0=None):
    """Reference forward pass on (N, T, C): (outputs, h_n, c_n) like torch with batch_first=True."""
    N, T, _ = x.shape
    H = p["weight_hh_l0"].shape[1]
    dirs = 2 if bidir else 1
    hn, cn, seq = [], [], x
    for k in range(layers):
        outs = []
        for d in range(dirs):
            j = k * dirs + d
            h = np.zeros((N, H)) if h0 is None else h0[j]
            c = np.zeros((N, H)) if c0 is None else c0[j]
            ys = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                h, c = _np_cell(kind, p, seq[:, t], h, c, f"_l{k}" + ("_reverse" if d else ""))
                ys[t] = h
            outs.append(np.stack(ys, 1))
            hn.append(h)
            cn.append(c)
        seq = np.concatenate(outs, -1)
    return seq, np.stack(hn), np.stack(cn)


def _build(kind, layers, bidir, T=5, C=3, H=4, seed=1):
    m = getattr(gc.nn, kind)(C, H, num_layers=layers, bidirectional=bidir, dtype="float64", seed=seed)
    x = gc.placeholder("x", (None, T, C), "float64")
    return m, x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers,bidir", CONFIGS)
def test_matches_numpy_loop(kind, layers, bidir, rng):
    m, x = _build(kind, layers, bidir)
    out, state = m(x)
    hn = state[0] if kind == "LSTM" else state
    f = gc.function([x], [out, hn] + ([state[1]] if kind == "LSTM" else []))
    a = rng.standard_normal((2, 5, 3))
    want = np_recurrent(kind, m.state_dict(), a, layers, bidir)
    got = f(a)
    assert got[0].shape == (2, 5, 4 * (1 + bidir)) and got[1].shape == (layers * (1 + bidir), 2, 4)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_initial_state_and_one_scan_node_per_layer_direction(rng):
    m = gc.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype="float64")
    x = gc.placeholder("x", ("B", "T", 3), "float64")  # symbolic batch and sequence length
    h0, c0 = gc.placeholder("h0", (4, "B", 4), "float64"), gc.placeholder("c0", (4, "B", 4), "float64")
    out, (h, c) = m(x, (h0, c0))
    assert sum(n.op.name == "scan" for n in toposort([out, h, c])) == 4
    f = gc.function([x, h0, c0], [out, h, c])
    for T in (1, 7):
        a, b, d = rng.standard_normal((3, T, 3)), rng.standard_normal((4, 3, 4)), rng.standard_normal((4, 3, 4))
        for g, w in zip(f(a, b, d), np_recurrent("LSTM", m.state_dict(), a, 2, True, b, d)):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_parameters_have_torch_names_and_shapes():
    m = gc.nn.GRU(3, 5, num_layers=2, bidirectional=True)
    names = list(m.named_params)
    assert names[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert names[4] == "weight_ih_l0_reverse" and len(m.params) == 16
    assert m.named_params["weight_ih_l1"].shape == (15, 10) and m.named_params["weight_hh_l1"].shape == (15, 5)
    assert all(p.dtype == "float32" for p in m.params)
    with pytest.raises(gc.GraphcError, match="missing"):
        m.load_state_dict({"weight_ih_l0": np.zeros((15, 3))})
    with pytest.raises(gc.ShapeError, match=r"\(N, T, 3\)"):
        m(gc.placeholder("x", (2, 4, 7)))
    with pytest.raises(gc.ShapeError, match=r"initial state h0 .*\(4, 2, 5\)"):
        m(gc.placeholder("x", (2, 4, 3)), gc.placeholder("h0", (4, 3, 5)))


@pytest.mark.parametrize("kind", KINDS)
def test_verify_grad_input_and_initial_state(kind, rng):
    m = getattr(gc.nn, kind)(2, 3, bidirectional=True, dtype="float64", seed=3)

    def fn(x, h0, c0):
        state = (h0, c0) if kind == "LSTM" else h0
        out, st = m(x, state)
        hn = st[0] if kind == "LSTM" else st
        extra = (c0 * 0).sum() if kind != "LSTM" else 0.0  # keep c0 connected for every kind
        return (out ** 2).sum() + gc.sin(hn).sum() + extra
    gc.verify_grad(fn, [rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 2, 3)),
                        rng.standard_normal((2, 2, 3))])


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_gradients_by_finite_differences(kind, rng):
    m, x = _build(kind, 2, True, T=3, C=2, H=3)
    out, _ = m(x)
    proj = rng.standard_normal((3, 6))
    loss = (out * gc.constant(proj)).sum()
    f = gc.function([x], loss)
    g = gc.function([x], gc.grad(loss, m.params))
    a = rng.standard_normal((2, 3, 2))
    grads = g(a)
    eps = 1e-6
    for p, gp in zip(m.params, grads):
        w = p.get_value()
        for idx in [tuple(rng.integers(0, s) for s in w.shape) for _ in range(3)]:
            up, dn = w.copy(), w.copy()
            up[idx] += eps
            dn[idx] -= eps
            p.set_value(up)
            hi = f(a)
            p.set_value(dn)
            lo = f(a)
            p.set_value(w)
            assert gp[idx] == pytest.approx((hi - lo) / (2 * eps), rel=1e-6, abs=1e-8), (p.name, idx)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers,bidir", CONFIGS)
def test_matches_torch_with_copied_weights(kind, layers, bidir, rng):
    torch = pytest.importorskip("torch", reason="torch (optional reference) is not installed")
    torch.manual_seed(0)
    tm = getattr(torch.nn, kind)(3, 4, num_layers=layers, bidirectional=bidir, batch_first=True).double()
    m, x = _build(kind, layers, bidir)
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    out, state = m(x)
    hn = state[0] if kind == "LSTM" else state
    loss = (out ** 2).sum() + hn.sum()
    f = gc.function([x], [out, hn, loss] + gc.grad(loss, [x] + m.params))
    a = rng.standard_normal((2, 5, 3))
    xt = torch.tensor(a, requires_grad=True)
    to, ts = tm(xt)
    th = ts[0] if kind == "LSTM" else ts
    tl = (to ** 2).sum() + th.sum()
    tl.backward()
    want = [to.detach(), th.detach(), tl.detach(), xt.grad] + [p.grad for p in tm.parameters()]
    for g, w in zip(f(a), want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-10, atol=1e-12)


def test_works_inside_sequential_and_trains_with_the_library_optimiser(rng):
    net = gc.nn.Sequential(gc.nn.GRU(3, 8), lambda t: t[:, -1], gc.nn.Dense(8, 1))
    x, y = gc.placeholder("x", (None, 6, 3)), gc.placeholder("y", (None, 1))
    loss = gc.mean((net(x) - y) ** 2)
    assert any(p.name.startswith("gru") for p in net.params)
    step = gc.function([x, y], loss, updates=gc.optim.Adam(lr=2e-2).updates(loss, net.params))
    a = rng.standard_normal((32, 6, 3)).astype(np.float32)
    b = a[:, :, 0].sum(1, keepdims=True) * 0.3  # a target the GRU can fit
    losses = [float(step(a, b)) for _ in range(60)]
    assert losses[-1] < 0.2 * losses[0], losses[::10]
