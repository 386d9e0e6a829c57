"""gc.optim.LBFGS against torch.optim.LBFGS (same start, same problem: parameters, returned loss and
the optimiser's counters after every step), Polyak averaging against torch.optim.swa_utils.AveragedModel
(running mean and EMA) and NumPy, and max-norm constraints against torch.renorm and NumPy."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, needs_torch, torch

RNG = np.random.default_rng(5)
A = RNG.standard_normal((20, 4))
B = RNG.standard_normal(20)
W0 = RNG.standard_normal(4)
X = RNG.standard_normal((30, 3))
Y = RNG.integers(0, 2, 30)
WL0 = RNG.standard_normal((2, 3)) * 0.3


def _lsq_graphc(opt, steps, w0=W0):
    """A least-squares problem with a quartic term (not quadratic, so the history matters)."""
    w = gc.parameter("w", w0, "float64")
    loss = gc.sum((gc.constant(A) @ w - gc.constant(B)) ** 2) + 0.1 * gc.sum(w ** 4)
    f = gc.function([], loss, updates=opt.updates(loss, [w]))
    out = []
    for _ in range(steps):
        out.append((float(f()), w.get_value()))
    return out


def _lsq_torch(steps, w0=W0, extra=None, **kw):
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.LBFGS([tw], **kw)
    ta, tb = torch.tensor(A), torch.tensor(B)

    def closure():
        opt.zero_grad()
        loss = ((ta @ tw - tb) ** 2).sum() + 0.1 * (tw ** 4).sum()
        if extra is not None:
            loss = loss + extra(tw)
        loss.backward()
        return loss
    out = []
    for _ in range(steps):
        out.append((opt.step(closure).item(), tw.detach().numpy().copy()))
    return out, opt.state[tw]


LBFGS_CFGS = {
    "defaults": dict(),
    "short_history_wraps": dict(max_iter=7, history_size=2),
    "lr_half": dict(lr=0.5, max_iter=5, history_size=3),
    "one_iter_per_step": dict(max_iter=1, history_size=4),
    "max_eval_binds": dict(max_iter=8, max_eval=3, history_size=5),
    "loose_tolerances_stop_early": dict(max_iter=20, tolerance_grad=1e-2, tolerance_change=1e-4),
}


@needs_torch
@pytest.mark.parametrize("cfg", list(LBFGS_CFGS))
def test_lbfgs_matches_torch_least_squares(cfg):
    kw = LBFGS_CFGS[cfg]
    opt = gc.optim.LBFGS(**kw)
    got = _lsq_graphc(opt, 4)
    want, tstate = _lsq_torch(4, **kw)
    for (gl, gw), (tl, tw) in zip(got, want):
        np.testing.assert_allclose(gl, tl, rtol=1e-11)
        np.testing.assert_allclose(gw, tw, rtol=1e-9, atol=1e-11)
    sd = opt.state_dict()
    assert sd[f"{opt.name}.n_iter"] == tstate["n_iter"]
    assert sd[f"{opt.name}.func_evals"] == tstate["func_evals"]
    np.testing.assert_allclose(sd[f"{opt.name}.d"], tstate["d"].numpy(), rtol=1e-8, atol=1e-11)
    n_hist = len(tstate["old_dirs"])
    assert sd[f"{opt.name}.count"] == n_hist
    if n_hist:      # the newest pairs, oldest first, as torch's lists
        np.testing.assert_allclose(sd[f"{opt.name}.old_dirs"][-n_hist:],
                                   torch.stack(tstate["old_dirs"]).numpy(), rtol=1e-8, atol=1e-11)


@needs_torch
def test_lbfgs_matches_torch_logistic_regression_two_parameters():
    W = gc.parameter("W", WL0, "float64")
    b = gc.parameter("b", np.zeros(2), "float64")
    xp, yp = gc.placeholder("x", (None, 3), "float64"), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(xp @ W.T + b, yp)
    f = gc.function([xp, yp], loss, updates=gc.optim.LBFGS(0.8, max_iter=6, history_size=4).updates(loss, [W, b]))
    tW, tb = torch.tensor(WL0, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.LBFGS([tW, tb], lr=0.8, max_iter=6, history_size=4)

    def closure():
        topt.zero_grad()
        out = torch.nn.functional.cross_entropy(torch.tensor(X) @ tW.T + tb, torch.tensor(Y))
        out.backward()
        return out
    for _ in range(4):
        np.testing.assert_allclose(float(f(X, Y)), topt.step(closure).item(), rtol=1e-11)
        np.testing.assert_allclose(W.value, tW.detach().numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(b.value, tb.detach().numpy(), rtol=1e-9, atol=1e-11)


@needs_torch
def test_lbfgs_weight_decay_is_an_l2_term_and_schedule_scales_the_step():
    opt = gc.optim.LBFGS(max_iter=5, history_size=3, weight_decay=0.3)
    want, _ = _lsq_torch(3, extra=lambda w: 0.15 * (w * w).sum(), max_iter=5, history_size=3)
    for (gl, gw), (tl, tw) in zip(_lsq_graphc(opt, 3), want):
        np.testing.assert_allclose(gw, tw, rtol=1e-9, atol=1e-11)
    # a schedule sets lr per step: lr 0.5 then 0.25 equals torch with param_groups' lr changed each step
    opt = gc.optim.LBFGS(0.5, max_iter=3, history_size=3, schedule=gc.optim.StepLR(1, 0.5))
    got = _lsq_graphc(opt, 2)
    tw = torch.tensor(W0, requires_grad=True)
    topt = torch.optim.LBFGS([tw], lr=0.5, max_iter=3, history_size=3)
    ta, tb = torch.tensor(A), torch.tensor(B)

    def closure():
        topt.zero_grad()
        loss = ((ta @ tw - tb) ** 2).sum() + 0.1 * (tw ** 4).sum()
        loss.backward()
        return loss
    for i, (_, gw) in enumerate(got):
        topt.param_groups[0]["lr"] = 0.5 * 0.5 ** i
        topt.step(closure)
        np.testing.assert_allclose(gw, tw.detach().numpy(), rtol=1e-9, atol=1e-11)


def test_lbfgs_converged_start_changes_nothing_and_minimises_a_quadratic():
    """At a stationary point (max|g| <= tolerance_grad) a step leaves the weights alone; on a
    convex quadratic a few steps come close to the least-squares solution (independent of torch)."""
    want = np.linalg.lstsq(A, B, rcond=None)[0]
    w = gc.parameter("wq", np.zeros(4), "float64")
    loss = gc.sum((gc.constant(A) @ w - gc.constant(B)) ** 2)
    opt = gc.optim.LBFGS(max_iter=10, history_size=5)
    f = gc.function([], loss, updates=opt.updates(loss, [w]))
    for _ in range(3):
        f()
    np.testing.assert_allclose(w.value, want, atol=1e-4)     # fixed steps stop at tolerance_change
    w.set_value(want)
    before = opt.state_dict()
    f()
    np.testing.assert_array_equal(w.value, want)
    after = opt.state_dict()
    assert after[f"{opt.name}.n_iter"] == before[f"{opt.name}.n_iter"]
    assert after[f"{opt.name}.func_evals"] == before[f"{opt.name}.func_evals"] + 1


def test_lbfgs_every_backend_matches_numpy(backend):
    backend_or_skip(backend)
    res = []
    for be in ("numpy", backend):
        W = gc.parameter("W", WL0, "float64")
        b = gc.parameter("b", np.zeros(2), "float64")
        xp, yp = gc.placeholder("x", (None, 3), "float64"), gc.placeholder("y", (None,), "int64")
        loss = gc.losses.cross_entropy(xp @ W.T + b, yp)
        opt = gc.optim.LBFGS(0.8, max_iter=4, history_size=2)
        f = gc.function([xp, yp], loss, updates=opt.updates(loss, [W, b]), backend=be)
        res.append([(float(f(X, Y)), W.get_value(), b.get_value()) for _ in range(3)])
    for (l0, w0, b0), (l1, w1, b1) in zip(*res):
        np.testing.assert_allclose(l1, l0, rtol=1e-12)
        np.testing.assert_allclose(w1, w0, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(b1, b0, rtol=1e-10, atol=1e-13)


def test_lbfgs_bad_arguments_raise_graphc_errors():
    with pytest.raises(gc.GraphcError, match="line_search_fn"):
        gc.optim.LBFGS(line_search_fn="strong_wolfe")
    with pytest.raises(gc.GraphcError, match="clip_norm= is not supported"):
        gc.optim.LBFGS(clip_norm=1.0)
    with pytest.raises(gc.GraphcError, match="max_iter must be an integer >= 1"):
        gc.optim.LBFGS(max_iter=0)
    with pytest.raises(gc.GraphcError, match="history_size"):
        gc.optim.LBFGS(history_size=2.5)
    w32 = gc.parameter("w32", np.zeros(2, np.float32))
    w64 = gc.parameter("w64", np.zeros(2), "float64")
    with pytest.raises(gc.GraphcError, match="one dtype"):
        gc.optim.LBFGS().updates(gc.sum(w32) + gc.cast(gc.sum(w64), "float32"), [w32, w64])


# ---- Polyak averaging ---------------------------------------------------------------------------

def _polyak_run(decay, steps=5):
    w = gc.parameter("wp", W0, "float64")
    loss = gc.sum((gc.constant(A) @ w - gc.constant(B)) ** 2)
    avg = gc.optim.Polyak(gc.optim.SGD(0.01, momentum=0.5), decay=decay)
    f = gc.function([], loss, updates=avg.updates(loss, [w]))
    ws, avgs = [], []
    for _ in range(steps):
        f()
        ws.append(w.get_value())
        avgs.append(avg.average_of(w).get_value())
    return w, avg, ws, avgs


@pytest.mark.parametrize("decay", [None, 0.8])
def test_polyak_average_follows_its_definition(decay):
    w, avg, ws, avgs = _polyak_run(decay)
    ref = None
    for i, (wi, ai) in enumerate(zip(ws, avgs)):
        if ref is None:
            ref = wi.copy()          # the first step copies the weights
        elif decay is None:
            ref = ref + (wi - ref) / (i + 1)
        else:
            ref = decay * ref + (1 - decay) * wi
        np.testing.assert_allclose(ai, ref, rtol=1e-13, atol=1e-14)
    if decay is None:
        np.testing.assert_allclose(avgs[-1], np.mean(ws, 0), rtol=1e-12)   # the Polyak-Ruppert mean
    # swap in for evaluation, and back
    trained = w.get_value()
    with avg.averaged():
        np.testing.assert_array_equal(w.value, avgs[-1])
        np.testing.assert_array_equal(avg.average_of(w).value, trained)
    np.testing.assert_array_equal(w.value, trained)
    np.testing.assert_array_equal(avg.average_of(w).value, avgs[-1])
    assert f"{avg.name}.n_averaged" in avg.state_dict()


@needs_torch
@pytest.mark.parametrize("decay", [None, 0.8])
def test_polyak_matches_torch_averaged_model(decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    _, _, _, avgs = _polyak_run(decay)
    tw = torch.nn.Parameter(torch.tensor(W0))
    model = torch.nn.ParameterList([tw])
    kw = {} if decay is None else dict(multi_avg_fn=get_ema_multi_avg_fn(decay))
    swa = AveragedModel(model, **kw)
    opt = torch.optim.SGD([tw], 0.01, momentum=0.5)
    ta, tb = torch.tensor(A), torch.tensor(B)
    for a in avgs:
        opt.zero_grad()
        ((ta @ tw - tb) ** 2).sum().backward()
        opt.step()
        swa.update_parameters(model)
        np.testing.assert_allclose(a, swa.module[0].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_polyak_works_with_a_layer_and_rejects_bad_arguments():
    layer = gc.nn.Dense(3, 2, dtype="float64", seed=0)
    xp = gc.placeholder("x", (None, 3), "float64")
    yp = gc.placeholder("y", (None, 2), "float64")
    loss = gc.losses.mse(layer(xp), yp)
    avg = gc.optim.Polyak(gc.optim.Adam(0.05))
    step = gc.function([xp, yp], loss, updates=avg.updates(loss, layer.params))
    x = RNG.standard_normal((8, 3))
    y = RNG.standard_normal((8, 2))
    for _ in range(3):
        step(x, y)
    assert set(avg.state_dict()) >= {f"{avg.name}.{p.name}.avg" for p in layer.params}
    with pytest.raises(gc.GraphcError, match="decay must be None"):
        gc.optim.Polyak(gc.optim.SGD(0.1), decay=1.5)
    with pytest.raises(gc.GraphcError, match="expected an optimiser"):
        gc.optim.Polyak([layer.weight])


# ---- max-norm constraints ---------------------------------------------------------------------------

def _renorm_np(w, c, dim=0, p=2.0):
    axes = tuple(a for a in range(w.ndim) if a != dim)
    norm = (np.abs(w) ** p).sum(axes, keepdims=True) ** (1 / p)
    return w * np.where(norm > c, c / (norm + 1e-7), 1.0)


def _maxnorm_step(opt, w0, b0):
    W = gc.parameter("Wm", w0, "float64")
    b = gc.parameter("bm", b0, "float64")
    x = gc.constant(RNG.standard_normal((6,) + w0.shape[1:]))
    loss = gc.sum((gc.reshape(x, (6, -1)) @ gc.reshape(W, (w0.shape[0], -1)).T) ** 2) + gc.sum(b * b)
    gw, gb = gc.function([], gc.grad(loss, [W, b]))()
    gc.function([], loss, updates=opt.updates(loss, [W, b]))()
    return W.get_value(), b.get_value(), gw, gb


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2)])
def test_max_norm_renorms_each_units_incoming_weights(shape):
    w0 = RNG.standard_normal(shape) * 2
    b0 = RNG.standard_normal(shape[0]) * 5
    W, b, gw, gb = _maxnorm_step(gc.optim.SGD(0.1, max_norm=1.5), w0, b0)
    np.testing.assert_allclose(W, _renorm_np(w0 - 0.1 * gw, 1.5), rtol=1e-13)
    np.testing.assert_allclose(b, b0 - 0.1 * gb, rtol=1e-13)            # 1-D parameters are left alone
    norms = np.sqrt((W.reshape(shape[0], -1) ** 2).sum(1))
    assert norms.max() <= 1.5 + 1e-9
    if torch is not None:
        np.testing.assert_allclose(W, torch.renorm(torch.tensor(w0 - 0.1 * gw), 2, 0, 1.5).numpy(), rtol=1e-13)


@needs_torch
def test_max_norm_object_dim_p_and_params_match_torch_renorm():
    w0 = RNG.standard_normal((4, 3)) * 2
    b0 = RNG.standard_normal(4) * 5
    c = gc.optim.MaxNorm(1.0, dim=1, p=1.0)
    W, b, gw, gb = _maxnorm_step(gc.optim.Adam(0.1, max_norm=c), w0, b0)
    # Adam's first step is lr * sign(g) (bias-corrected), up to eps
    new = w0 - 0.1 * gw / (np.abs(gw) + 1e-8)
    np.testing.assert_allclose(W, torch.renorm(torch.tensor(new), 1, 1, 1.0).numpy(), rtol=1e-12)
    # params= restricts the constraint (here to the bias, a 1-D tensor: renormed along dim 0 = per element)
    W2 = gc.parameter("W2", w0, "float64")
    b2 = gc.parameter("b2", b0, "float64")
    loss = gc.sum(W2) + gc.sum(b2)
    gc.function([], loss, updates=gc.optim.SGD(0.0, max_norm=gc.optim.MaxNorm(0.5, params=[W2])).updates(
        loss, [W2, b2]))()
    np.testing.assert_allclose(W2.value, torch.renorm(torch.tensor(w0), 2, 0, 0.5).numpy(), rtol=1e-13)
    np.testing.assert_array_equal(b2.value, b0)


def test_max_norm_on_second_order_and_lbfgs_and_errors():
    w0 = RNG.standard_normal((3, 2)) * 3
    for opt in (gc.optim.Newton(max_norm=1.0), gc.optim.HessianFree(max_norm=1.0, cg_iters=3),
                gc.optim.LBFGS(max_iter=2, max_norm=1.0)):
        W = gc.parameter("Wn", w0, "float64")
        loss = gc.sum((W - 4.0) ** 2)
        gc.function([], loss, updates=opt.updates(loss, [W]))()
        assert np.sqrt((W.value ** 2).sum(1)).max() <= 1.0 + 1e-9, type(opt).__name__
    with pytest.raises(gc.GraphcError, match="max_norm must be None, a number or a gc.optim.MaxNorm"):
        gc.optim.SGD(0.1, max_norm="big")
    with pytest.raises(gc.GraphcError, match="max_value must be a number > 0"):
        gc.optim.MaxNorm(-1.0)
