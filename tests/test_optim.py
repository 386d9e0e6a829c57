"""Optimisers step by step against NumPy implementations of their update rules and, when torch is
installed, torch.optim with the same initial values and gradients; clipping, schedules, state."""
from __future__ import annotations

import math

import numpy as np
import pytest

import graphc as gc

from conftest import needs_torch, torch

A = np.random.default_rng(1).standard_normal((5, 3))
B = np.random.default_rng(2).standard_normal((5, 2))
W0 = np.random.default_rng(3).standard_normal((3, 2))


def loss_np_grad(w):
    r = A @ w - B
    return 2 * A.T @ r  # d/dw sum((A w - B)^2)


def run_graphc(opt, steps=6, w0=W0):
    w = gc.parameter("w", w0, "float64")
    loss = gc.sum((gc.constant(A) @ w - gc.constant(B)) ** 2)
    f = gc.function([], loss, updates=opt.updates(loss, [w]))
    out = []
    for _ in range(steps):
        f()
        out.append(w.get_value())
    return out


def run_numpy(rule, steps=6):
    w, state, out = W0.copy(), {}, []
    for t in range(1, steps + 1):
        w = rule(w, loss_np_grad(w), state, t)
        out.append(w.copy())
    return out


def sgd_rule(lr, mom=0.0, nesterov=False, wd=0.0):
    def rule(w, g, s, t):
        g = g + wd * w
        if mom:
            s["b"] = mom * s.get("b", 0) + g
            g = g + mom * s["b"] if nesterov else s["b"]
        return w - lr * g
    return rule


def adagrad_rule(lr, eps=1e-10):
    def rule(w, g, s, t):
        s["s"] = s.get("s", 0) + g * g
        return w - lr * g / (np.sqrt(s["s"]) + eps)
    return rule


def rmsprop_rule(lr, alpha=0.99, eps=1e-8, mom=0.0):
    def rule(w, g, s, t):
        s["v"] = alpha * s.get("v", 0) + (1 - alpha) * g * g
        d = g / (np.sqrt(s["v"]) + eps)
        if mom:
            s["b"] = mom * s.get("b", 0) + d
            d = s["b"]
        return w - lr * d
    return rule


def adam_rule(lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
    def rule(w, g, s, t):
        if wd and not decoupled:
            g = g + wd * w
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        mh, vh = s["m"] / (1 - b1 ** t), s["v"] / (1 - b2 ** t)
        base = w * (1 - lr * wd) if decoupled else w
        return base - lr * mh / (np.sqrt(vh) + eps)
    return rule


def quickprop_rule(lr, mu=1.75):
    def rule(w, g, s, t):
        pg, pdw = s.get("g", np.zeros_like(w)), s.get("dw", np.zeros_like(w))
        dw = -lr * g
        for i in np.ndindex(w.shape):
            if pdw[i] != 0 and pg[i] != g[i]:
                q = pdw[i] * g[i] / (pg[i] - g[i])
                dw[i] = min(max(q, -mu * abs(pdw[i])), mu * abs(pdw[i]))
        s["g"], s["dw"] = g, dw
        return w + dw
    return rule


CASES = [
    ("sgd", lambda: gc.optim.SGD(0.01), sgd_rule(0.01)),
    ("sgd_wd", lambda: gc.optim.SGD(0.01, weight_decay=0.1), sgd_rule(0.01, wd=0.1)),
    ("momentum", lambda: gc.optim.Momentum(0.01, 0.9), sgd_rule(0.01, 0.9)),
    ("nesterov", lambda: gc.optim.Nesterov(0.01, 0.8, weight_decay=0.05), sgd_rule(0.01, 0.8, True, 0.05)),
    ("adagrad", lambda: gc.optim.AdaGrad(0.1), adagrad_rule(0.1)),
    ("rmsprop", lambda: gc.optim.RMSProp(0.01), rmsprop_rule(0.01)),
    ("rmsprop_momentum", lambda: gc.optim.RMSProp(0.01, momentum=0.5), rmsprop_rule(0.01, mom=0.5)),
    ("adam", lambda: gc.optim.Adam(0.05), adam_rule(0.05)),
    ("adam_wd", lambda: gc.optim.Adam(0.05, weight_decay=0.1), adam_rule(0.05, wd=0.1)),
    ("adamw", lambda: gc.optim.AdamW(0.05, weight_decay=0.1), adam_rule(0.05, wd=0.1, decoupled=True)),
    ("quickprop", lambda: gc.optim.QuickProp(0.01), quickprop_rule(0.01)),
]


@pytest.mark.parametrize("name,make,rule", CASES, ids=[c[0] for c in CASES])
def test_matches_numpy_rule_step_by_step(name, make, rule):
    for got, want in zip(run_graphc(make()), run_numpy(rule)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


TORCH = [
    ("sgd_momentum_wd", lambda: gc.optim.SGD(0.01, 0.9, weight_decay=0.1),
     lambda p: torch.optim.SGD(p, 0.01, momentum=0.9, weight_decay=0.1)),
    ("nesterov", lambda: gc.optim.Nesterov(0.01, 0.9), lambda p: torch.optim.SGD(p, 0.01, momentum=0.9, nesterov=True)),
    ("adagrad", lambda: gc.optim.AdaGrad(0.1, weight_decay=0.01), lambda p: torch.optim.Adagrad(p, 0.1, weight_decay=0.01)),
    ("rmsprop", lambda: gc.optim.RMSProp(0.01, momentum=0.3), lambda p: torch.optim.RMSprop(p, 0.01, momentum=0.3)),
    ("adam", lambda: gc.optim.Adam(0.05, weight_decay=0.01), lambda p: torch.optim.Adam(p, 0.05, weight_decay=0.01)),
    ("adamw", lambda: gc.optim.AdamW(0.05), lambda p: torch.optim.AdamW(p, 0.05)),
]


@needs_torch
@pytest.mark.parametrize("name,make,make_torch", TORCH, ids=[c[0] for c in TORCH])
def test_matches_torch_optim(name, make, make_torch):
    tw = torch.tensor(W0, requires_grad=True)
    opt = make_torch([tw])
    ta, tb = torch.tensor(A), torch.tensor(B)
    for got in run_graphc(make(), steps=8):
        opt.zero_grad()
        ((ta @ tw - tb) ** 2).sum().backward()
        opt.step()
        np.testing.assert_allclose(got, tw.detach().numpy(), rtol=1e-10, atol=1e-12)


def _lrs(schedule, n, lr=0.5):
    opt = gc.optim.SGD(lr, schedule=schedule)
    run_graphc(opt, steps=0)
    w = gc.parameter("w", np.zeros(()), "float64")
    f = gc.function([], gc.as_tensor(0.0), updates=opt.updates(w * 0 + w, [w]))
    out = []
    for _ in range(n):
        out.append(opt.current_lr())
        f()
    return out


def test_schedules_are_graph_state():
    assert _lrs(gc.optim.StepLR(3, 0.5), 7) == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125], rel=1e-6)
    assert _lrs(gc.optim.ExponentialLR(0.9), 4) == pytest.approx([0.5 * 0.9 ** t for t in range(4)], rel=1e-6)
    want = [0.1 + 0.4 * (1 + math.cos(math.pi * min(t, 4) / 4)) / 2 for t in range(6)]
    assert _lrs(gc.optim.CosineLR(4, 0.1), 6) == pytest.approx(want, rel=1e-6)


def test_schedule_drives_the_update():
    """SGD with a step schedule: each step's size follows the schedule (lr from the step counter)."""
    opt = gc.optim.SGD(0.1, schedule=gc.optim.StepLR(2, 0.1))
    got = run_graphc(opt, steps=4)
    rule_w, out = W0.copy(), []
    for t in range(4):
        rule_w = rule_w - 0.1 * 0.1 ** (t // 2) * loss_np_grad(rule_w)
        out.append(rule_w)
    for g, w in zip(got, out):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_gradient_clipping():
    w = gc.parameter("wc", np.array([3.0, -4.0]), "float64")
    loss = gc.sum(w * w)  # gradient 2w = (6, -8), norm 10
    f = gc.function([], loss, updates=gc.optim.SGD(1.0, clip_norm=5.0).updates(loss, [w]))
    f()
    s = 5.0 / (10.0 + 1e-6)  # torch's clip coefficient
    np.testing.assert_allclose(w.value, [3 - 6 * s, -4 + 8 * s], atol=1e-13)
    w.set_value([3.0, -4.0])
    f = gc.function([], loss, updates=gc.optim.SGD(1.0, clip_value=1.0).updates(loss, [w]))
    f()
    np.testing.assert_allclose(w.value, [2.0, -3.0])
    if torch is not None:
        tw = torch.tensor([3.0, -4.0], dtype=torch.float64, requires_grad=True)
        (tw * tw).sum().backward()
        torch.nn.utils.clip_grad_norm_([tw], 5.0)
        w.set_value([3.0, -4.0])
        gc.function([], loss, updates=gc.optim.SGD(1.0, clip_norm=5.0).updates(loss, [w]))()
        np.testing.assert_allclose(w.value, (tw - tw.grad).detach().numpy(), atol=1e-13)


def test_newton_and_hessian_free_solve_a_quadratic():
    """On a quadratic, one undamped Newton step lands on the minimiser; CG with n = 4 iterations too."""
    Q = A.T @ A + np.eye(3)
    c = np.array([1.0, -2.0, 0.5])
    want = np.linalg.solve(Q, c)
    for opt in (gc.optim.Newton(damping=0.0), gc.optim.HessianFree(damping=0.0, cg_iters=4)):
        w = gc.parameter("wq", np.zeros(3), "float64")
        u = gc.parameter("u", np.zeros(()), "float64")
        loss = 0.5 * gc.sum(w * (gc.constant(Q) @ w)) - gc.sum(gc.constant(c) * w) + (u - 1) ** 2
        gc.function([], loss, updates=opt.updates(loss, [w, u]))()
        np.testing.assert_allclose(w.value, want, rtol=1e-9)
        np.testing.assert_allclose(u.value, 1.0, rtol=1e-9)


def test_newton_damping_matches_numpy():
    w0 = np.array([0.3, -0.2])
    w = gc.parameter("wn", w0, "float64")
    loss = gc.sum(gc.exp(w)) + gc.sum(w) ** 2
    gc.function([], loss, updates=gc.optim.Newton(lr=0.5, damping=0.3).updates(loss, [w]))()
    g = np.exp(w0) + 2 * w0.sum()
    H = np.diag(np.exp(w0)) + 2
    np.testing.assert_allclose(w.value, w0 - 0.5 * np.linalg.solve(H + 0.3 * np.eye(2), g), rtol=1e-12)


def test_optimiser_state_is_parameters_and_round_trips():
    opt = gc.optim.Adam(0.05)
    run_graphc(opt, steps=3)
    sd = opt.state_dict()
    n = opt.name
    assert set(sd) == {f"{n}.step", f"{n}.w.m", f"{n}.w.v"} and sd[f"{n}.step"] == 3
    assert all(isinstance(s, gc.Parameter) for s in opt.state)
    run_graphc(opt, steps=1)
    opt.load_state_dict(sd)
    assert opt.step.value == 3


def test_optimiser_errors():
    with pytest.raises(gc.GraphcError, match="not a parameter"):
        gc.optim.SGD().updates(gc.as_tensor(1.0), [gc.placeholder("x", ())])
    with pytest.raises(gc.GraphcError, match="no parameters"):
        gc.optim.SGD().updates(gc.as_tensor(1.0), [])


def test_training_state_saves_and_resumes(tmp_path):
    """gc.save of a training step keeps the optimiser moments, the step counter, the dropout
    generator and the batch-norm statistics: the loaded step continues exactly where it was."""
    model = gc.nn.Sequential(gc.nn.Dense(3, 4, seed=0), gc.nn.BatchNorm(4), gc.relu, gc.nn.Dropout(0.3, seed=1),
                             gc.nn.Dense(4, 2, seed=1))
    x, y = gc.placeholder("x", (None, 3)), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x), y)
    opt = gc.optim.Adam(0.01, schedule=gc.optim.ExponentialLR(0.9))
    f = gc.function([x, y], loss, updates=opt.updates(loss, model.params))
    a, b = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32), np.arange(8) % 2
    for _ in range(3):
        f(a, b)
    gc.save(f, tmp_path / "step.graphc")
    g = gc.load(tmp_path / "step.graphc")
    names = {p.name for p in g.parameters}
    assert {opt.step.name, opt.slot(model[0].weight, "m").name, model[3].generator.state.name,
            model[1].running_mean.name} <= names
    f2 = gc.function(g)
    for _ in range(3):
        np.testing.assert_array_equal(f(a, b), f2(a, b))   # one output, as saved
