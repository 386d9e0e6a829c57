"""Issue 17's activations, pools, losses, metrics, AdaDelta and learning-rate schedules against
torch 2.13 (same weights, same inputs), scikit-learn's metrics, and their argument checks. The op
table (tests/cases_nn.py) checks the functions on every backend with gradients."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import TF, needs_torch, torch

nn = gc.nn
L = gc.losses


def _run(layer_or_fn, *arrays, training=False, backend="numpy"):
    phs = [gc.placeholder(f"a{i}", a.shape, a.dtype.name) for i, a in enumerate(arrays)]
    out = layer_or_fn(*phs) if not isinstance(layer_or_fn, nn.Module) else layer_or_fn(*phs, training=training)
    return gc.function(phs, out, backend=backend)(*arrays)


# ---- layers against torch.nn -------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("make,make_torch,shape", [
    (lambda: nn.Hardtanh(), lambda: torch.nn.Hardtanh(), (3, 4)),
    (lambda: nn.Hardtanh(-0.5, 2.0), lambda: torch.nn.Hardtanh(-0.5, 2.0), (2, 3, 4)),
    (lambda: nn.Softsign(), lambda: torch.nn.Softsign(), (3, 4)),
    (lambda: nn.MaxPool1D(3, 2, 1), lambda: torch.nn.MaxPool1d(3, 2, 1), (2, 3, 9)),
    (lambda: nn.MaxPool1D(2), lambda: torch.nn.MaxPool1d(2), (2, 3, 7)),
    (lambda: nn.AvgPool1D(3, 2, 1), lambda: torch.nn.AvgPool1d(3, 2, 1), (2, 3, 8)),
    (lambda: nn.AvgPool1D(3, 1, 1, count_include_pad=False),
     lambda: torch.nn.AvgPool1d(3, 1, 1, count_include_pad=False), (1, 2, 6)),
    (lambda: nn.GlobalAvgPool2D(), lambda: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
     (2, 3, 4, 5)),
    (lambda: nn.GlobalAvgPool2D(keepdims=True), lambda: torch.nn.AdaptiveAvgPool2d(1), (2, 3, 4, 5)),
], ids=["hardtanh", "hardtanh_range", "softsign", "maxpool1d", "maxpool1d_default", "avgpool1d",
        "avgpool1d_no_pad_count", "global_avg", "global_avg_keepdims"])
def test_layers_match_torch(make, make_torch, shape, backend):
    a = np.random.default_rng(0).standard_normal(shape) * 2
    want = make_torch()(torch.tensor(a)).numpy()
    np.testing.assert_allclose(_run(make(), a, backend=backend), want, rtol=1e-10, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("num,shape", [(1, (4, 3)), (3, (2, 3, 5)), (3, (2, 3, 4, 4)), (1, (5,))])
def test_prelu_matches_torch_outputs_and_gradients(num, shape, backend):
    tm = torch.nn.PReLU(num).double()
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.1, 0.6, num, dtype=torch.float64))
    gm = nn.PReLU(num, dtype="float64")
    assert list(gm.state_dict()) == list(tm.state_dict()) == ["weight"]
    assert gm.state_dict()["weight"].shape == tuple(tm.weight.shape)
    gm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    a = np.random.default_rng(1).standard_normal(shape)
    ta = torch.tensor(a, requires_grad=True)
    ty = tm(ta)
    (ty ** 2).sum().backward()
    x = gc.placeholder("x", shape, "float64")
    y = gm(x)
    gx, gw = gc.grad(gc.sum(y * y), [x, gm.weight])
    got = gc.function([x], [y, gx, gw], backend=backend)(a)
    np.testing.assert_allclose(got[0], ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], ta.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[2], tm.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_prelu_defaults_and_training():
    m = nn.PReLU()
    assert m.weight.shape == (1,) and m.weight.dtype == "float32"
    np.testing.assert_allclose(m.state_dict()["weight"], [0.25])
    assert m.params == [m.weight]
    # the slope is learnt: fit y = where(x > 0, x, 0.7 x)
    x, y = gc.placeholder("x", (None,)), gc.placeholder("y", (None,))
    data = np.linspace(-2, 2, 41).astype(np.float32)
    target = np.where(data > 0, data, 0.7 * data).astype(np.float32)
    loss = L.mse(m(x), y)
    step = gc.function([x, y], loss, updates=gc.optim.SGD(0.5).updates(loss, m.params))
    for _ in range(200):
        step(data, target)
    np.testing.assert_allclose(m.weight.get_value(), [0.7], atol=1e-4)


def test_layer_argument_errors():
    with pytest.raises(gc.GraphcError, match="min_val must be <= max_val"):
        nn.Hardtanh(1.0, -1.0)
    with pytest.raises(gc.GraphcError, match="min_val must be a number"):
        gc.hardtanh(gc.placeholder("x", (2,)), "a")
    with pytest.raises(gc.GraphcError, match="num_parameters must be an integer >= 1"):
        nn.PReLU(0)
    with pytest.raises(gc.GraphcError, match="init must be a number"):
        nn.PReLU(1, init="zeros")
    with pytest.raises(gc.ShapeError, match="3 slopes need an input with 3 channels"):
        nn.PReLU(3)(gc.placeholder("x", (2, 4)))
    with pytest.raises(gc.ShapeError, match=r"max_pool1d: input must be \(N, C, L\)"):
        nn.MaxPool1D(2)(gc.placeholder("x", (2, 4, 4, 4)))
    with pytest.raises(gc.ShapeError, match=r"avg_pool1d: input must be \(N, C, L\)"):
        nn.AvgPool1D(2)(gc.placeholder("x", (4, 4)))
    with pytest.raises(gc.ShapeError, match=r"global_avg_pool2d: input must be \(N, C, H, W\)"):
        nn.GlobalAvgPool2D()(gc.placeholder("x", (4, 4, 2)))


def test_pools_take_a_symbolic_batch():
    x = gc.placeholder("x", (None, 2, 8))
    f = gc.function([x], [nn.MaxPool1D(2)(x), nn.AvgPool1D(4)(x)])
    a = np.random.default_rng(0).standard_normal((3, 2, 8)).astype(np.float32)
    mx, av = f(a)
    np.testing.assert_allclose(mx, a.reshape(3, 2, 4, 2).max(-1), rtol=1e-6)
    np.testing.assert_allclose(av, a.reshape(3, 2, 2, 4).mean(-1), rtol=1e-6)


# ---- losses against torch.nn.functional ---------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_match_torch(reduction):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    T = torch.tensor
    p, t = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
    pairs = [
        (lambda x, y: L.huber(x, y, reduction=reduction), TF.huber_loss(T(a), T(b), reduction=reduction), a, b),
        (lambda x, y: L.huber(x, y, 0.3, reduction), TF.huber_loss(T(a), T(b), reduction=reduction, delta=0.3), a, b),
        (lambda x, y: L.binary_cross_entropy(x, y, reduction), TF.binary_cross_entropy(T(p), T(t), reduction=reduction),
         p, t),
        (lambda x, y: L.kl_div(x, y, reduction), TF.kl_div(T(a), T(t), reduction=reduction), a, t),
        (lambda x, y: L.kl_div(x, y, reduction, log_target=True),
         TF.kl_div(T(a), T(b), reduction=reduction, log_target=True), a, b),
    ]
    for fn, want, x, y in pairs:
        np.testing.assert_allclose(_run(fn, x, y), want.numpy(), rtol=1e-12, atol=1e-12)


@needs_torch
def test_kl_div_batchmean_and_zero_targets_match_torch():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 4))
    p = np.exp(rng.standard_normal((6, 4)))
    p[p < 0.8] = 0.0      # exact zeros: 0 log 0 = 0
    p /= p.sum(-1, keepdims=True) + 1e-12
    logq = a - np.log(np.exp(a).sum(-1, keepdims=True))
    want = TF.kl_div(torch.tensor(logq), torch.tensor(p), reduction="batchmean").item()
    assert _run(L.kl_div, logq, p) == pytest.approx(want, rel=1e-12)
    # symbolic batch: divides by the runtime batch size
    x, y = gc.placeholder("x", (None, 4), "float64"), gc.placeholder("y", (None, 4), "float64")
    assert gc.function([x, y], L.kl_div(x, y))(logq, p) == pytest.approx(want, rel=1e-12)
    # the gradient with respect to log_q is -p / N, zero where p = 0, as torch's
    tq = torch.tensor(logq, requires_grad=True)
    TF.kl_div(tq, torch.tensor(p), reduction="batchmean").backward()
    g = gc.function([x, y], gc.grad(L.kl_div(x, y), x))(logq, p)
    np.testing.assert_allclose(g, tq.grad.numpy(), rtol=1e-12, atol=1e-15)


@needs_torch
def test_binary_cross_entropy_clamps_logs_like_torch():
    p = np.array([0.0, 1.0, 0.3, 1.0, 0.0])
    t = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    want = TF.binary_cross_entropy(torch.tensor(p), torch.tensor(t), reduction="none").numpy()
    got = _run(lambda x, y: L.binary_cross_entropy(x, y, "none"), p, t)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isfinite(got).all() and got[0] == pytest.approx(100.0)
    x = gc.placeholder("x", (5,), "float64")
    g = gc.function([x], gc.grad(L.binary_cross_entropy(x, gc.constant(t)), x))(p)
    assert np.isfinite(g).all()   # no log(0) formed, so no 0 * inf


@needs_torch
@pytest.mark.parametrize("p,margin,reduction", [(1, 1.0, "mean"), (2, 0.5, "sum"), (1, 2.0, "none")])
def test_multi_margin_matches_torch(p, margin, reduction):
    rng = np.random.default_rng(4)
    s, y = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    want = TF.multi_margin_loss(torch.tensor(s), torch.tensor(y), p=p, margin=margin, reduction=reduction)
    got = _run(lambda a, b: L.multi_margin(a, b, p, margin, reduction), s, y)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


@needs_torch
def test_hinge_is_the_binary_svm_loss():
    """max(0, 1 - t s) with t in {-1, +1}; torch's soft_margin is its smooth version, and
    multi_margin_loss with two classes equals half the binary hinge on the score difference."""
    rng = np.random.default_rng(5)
    s, t = rng.standard_normal(8), np.where(rng.random(8) > 0.5, 1.0, -1.0)
    assert _run(L.hinge, s, t) == pytest.approx(np.maximum(0, 1 - t * s).mean(), rel=1e-12)
    assert _run(lambda a, b: L.hinge(a, b, squared=True), s, t) == pytest.approx(
        (np.maximum(0, 1 - t * s) ** 2).mean(), rel=1e-12)
    two = np.stack([-s / 2, s / 2], 1)   # score difference s between class 1 and class 0
    y = (t > 0).astype(np.int64)
    want = TF.multi_margin_loss(torch.tensor(two), torch.tensor(y)).item()
    assert _run(L.hinge, s, t) / 2 == pytest.approx(want, rel=1e-12)


def test_loss_argument_errors():
    x, y = gc.placeholder("x", (4, 1)), gc.placeholder("y", (4,))
    with pytest.raises(gc.ShapeError, match="huber: prediction"):
        L.huber(x, y)
    with pytest.raises(gc.GraphcError, match="huber: delta must be a number > 0"):
        L.huber(y, y, delta=0)
    with pytest.raises(gc.GraphcError, match="kl_div: reduction must be one of 'batchmean'"):
        L.kl_div(y, y, reduction="avg")
    with pytest.raises(gc.GraphcError, match="binary_cross_entropy: reduction must be"):
        L.binary_cross_entropy(y, y, reduction="batchmean")
    with pytest.raises(gc.ShapeError, match="hinge: prediction"):
        L.hinge(x, y)
    with pytest.raises(gc.GraphcError, match="multi_margin: p must be 1 or 2"):
        L.multi_margin(gc.placeholder("s", (4, 3)), gc.placeholder("l", (4,), "int64"), p=3)
    with pytest.raises(gc.ShapeError, match=r"multi_margin: expected scores \(N, K\) and integer labels"):
        L.multi_margin(gc.placeholder("s", (4, 3)), y)
    with pytest.raises(gc.GraphcError, match="average must be None"):
        L.precision(y, y, average="weighted")
    with pytest.raises(gc.GraphcError, match="need average='macro' or 'micro'"):
        L.recall(gc.placeholder("s", (4, 3)), gc.placeholder("l", (4,), "int64"), average="binary")
    with pytest.raises(gc.DTypeError, match="need integer class targets"):
        L.f1_score(gc.placeholder("s", (4, 3)), y)


# ---- metrics against scikit-learn -----------------------------------------------------------------

def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    s, y = rng.standard_normal((40, 4)).astype(np.float32), rng.integers(0, 4, 40)
    y[y == 3] = 2     # class 3 never true: scikit-learn's zero_division=0 with labels=range(4)
    pred = s.argmax(-1)
    for ours, theirs in ((L.precision, metrics.precision_score), (L.recall, metrics.recall_score),
                         (L.f1_score, metrics.f1_score)):
        for avg in ("macro", "micro"):
            want = theirs(y, pred, labels=range(4), average=avg, zero_division=0)
            assert _run(lambda a, b: ours(a, b, average=avg), s, y) == pytest.approx(want, rel=1e-6)
        p = rng.random(30).astype(np.float32)
        t = rng.integers(0, 2, 30)
        want = theirs(t, (p >= 0.5).astype(int), zero_division=0)
        assert _run(ours, p, t) == pytest.approx(want, rel=1e-6)
    # nothing predicted positive: 0, not nan
    assert _run(L.precision, np.zeros(4, np.float32), np.ones(4, np.int64)) == 0.0
    assert _run(L.f1, np.zeros(4, np.float32), np.zeros(4, np.int64)) == 0.0


# ---- AdaDelta and schedules against torch.optim -------------------------------------------------

from test_optim import A, B, W0, run_graphc  # noqa: E402  (the least-squares problem the optimiser tests share)


@needs_torch
@pytest.mark.parametrize("kw", [{}, dict(lr=0.5, rho=0.8, eps=1e-5), dict(lr=2.0, weight_decay=0.1)],
                         ids=["defaults", "args", "weight_decay"])
def test_adadelta_matches_torch_step_by_step(kw):
    tw = torch.tensor(W0, requires_grad=True)
    topt = torch.optim.Adadelta([tw], **kw)
    ta, tb = torch.tensor(A), torch.tensor(B)
    for got in run_graphc(gc.optim.AdaDelta(**kw), 10):
        topt.zero_grad()
        ((ta @ tw - tb) ** 2).sum().backward()
        topt.step()
        np.testing.assert_allclose(got, tw.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_adadelta_defaults_state_and_errors():
    opt = gc.optim.AdaDelta()
    assert (opt.lr, opt.rho, opt.eps) == (1.0, 0.9, 1e-6)
    run_graphc(opt, 2)
    assert sorted(k.rsplit(".", 1)[-1] for k in opt.state_dict()) == ["acc_delta", "square_avg", "step"]
    with pytest.raises(gc.GraphcError, match=r"rho must be a number in \[0, 1\]"):
        gc.optim.AdaDelta(rho=1.5)
    with pytest.raises(gc.GraphcError, match="eps must be a number > 0"):
        gc.optim.AdaDelta(eps=0)


def _lrs(schedule, n, lr=0.5):
    opt = gc.optim.SGD(lr, schedule=schedule)
    w = gc.parameter("w", np.zeros(2), "float64")
    f = gc.function([], gc.sum(w), updates=opt.updates(gc.sum(w * w), [w]))
    out = []
    for _ in range(n):
        out.append(opt.current_lr())
        f()
    return out


def _torch_lrs(make, n, lr=0.5):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@needs_torch
@pytest.mark.parametrize("ours,theirs", [
    (lambda: gc.optim.LinearLR(), lambda o: torch.optim.lr_scheduler.LinearLR(o)),
    (lambda: gc.optim.LinearLR(0.25, 1.0, 4), lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, 4)),
    (lambda: gc.optim.LinearLR(1.0, 0.1, 5), lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.1, 5)),
    (lambda: gc.optim.PolynomialLR(), lambda o: torch.optim.lr_scheduler.PolynomialLR(o)),
    (lambda: gc.optim.PolynomialLR(6, 2.0), lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 6, 2.0)),
], ids=["linear_default", "linear_warmup", "linear_decay", "poly_default", "poly_power2"])
def test_schedules_match_torch(ours, theirs):
    np.testing.assert_allclose(_lrs(ours(), 9), _torch_lrs(theirs, 9), rtol=1e-12)


def test_power_schedule():
    assert _lrs(gc.optim.PowerLR(2), 5) == pytest.approx([0.5 / (1 + t / 2) for t in range(5)], rel=1e-12)
    assert _lrs(gc.optim.PowerLR(4, 0.5), 3) == pytest.approx([0.5 / (1 + t / 4) ** 0.5 for t in range(3)])
    with pytest.raises(gc.GraphcError, match="steps must be a number > 0"):
        gc.optim.PowerLR(0)
    with pytest.raises(gc.GraphcError, match="total_iters must be an integer >= 1"):
        gc.optim.LinearLR(total_iters=0)
    with pytest.raises(gc.GraphcError, match="total_iters must be an integer >= 1"):
        gc.optim.PolynomialLR(2.5)


@needs_torch
@pytest.mark.parametrize("kw", [dict(patience=2), dict(patience=1, factor=0.5, cooldown=2, min_lr=0.02),
                                dict(mode="max", patience=0, threshold=0.1, threshold_mode="abs")],
                         ids=["patience", "cooldown_min_lr", "max_abs"])
def test_reduce_on_plateau_matches_torch(kw):
    metrics = [1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.5, 0.6, 0.6, 0.6, 0.61, 0.6, 0.7, 0.7, 0.7]
    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([p], 0.5)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    sched = gc.optim.ReduceLROnPlateau(**kw)
    opt = gc.optim.SGD(0.5, schedule=sched)
    w = gc.parameter("w", np.ones(2), "float64")
    step = gc.function([], gc.sum(w), updates=opt.updates(gc.sum(w * w), [w]))
    for m in metrics:
        before = w.get_value()
        step()
        # the compiled step used the current learning rate: w -= lr * 2w
        np.testing.assert_allclose(w.get_value(), before * (1 - 2 * topt.param_groups[0]["lr"]), rtol=1e-12)
        sched.step(m)
        tsched.step(m)
        assert opt.current_lr() == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)
        assert sched.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)


def test_reduce_on_plateau_errors():
    with pytest.raises(gc.GraphcError, match="mode must be 'min' or 'max'"):
        gc.optim.ReduceLROnPlateau(mode="lowest")
    with pytest.raises(gc.GraphcError, match=r"factor must be a number in \(0, 1\)"):
        gc.optim.ReduceLROnPlateau(factor=2)
    with pytest.raises(gc.GraphcError, match="patience must be an integer >= 0"):
        gc.optim.ReduceLROnPlateau(patience=-1)
    with pytest.raises(gc.GraphcError, match="not attached to an optimiser"):
        gc.optim.ReduceLROnPlateau().lr
    s = gc.optim.ReduceLROnPlateau()
    _lrs(s, 1, lr=0.5)
    with pytest.raises(gc.GraphcError, match="one instance serves one optimiser"):
        _lrs(s, 1, lr=0.1)


@needs_torch
@pytest.mark.parametrize("use_val", [True, False], ids=["val_loss", "train_loss"])
def test_fit_steps_reduce_on_plateau(use_val):
    """gc.fit steps a ReduceLROnPlateau schedule once per epoch on val_loss (loss without validation
    data): the learning rates it used equal torch's scheduler replayed on the same history."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 5)).astype("float32"), rng.integers(0, 3, 48)
    model = gc.nn.Sequential(gc.nn.Dense(5, 3, seed=1))
    sched = gc.optim.ReduceLROnPlateau(patience=0, factor=0.5, threshold=0.05)
    opt = gc.optim.SGD(0.5, schedule=sched)
    lrs = []
    hist = gc.fit(model, gc.losses.cross_entropy, opt, x, y, epochs=6, batch_size=16, progress=False,
                  validation_data=(x[:16], y[:16]) if use_val else None,
                  log=lambda epoch, m: lrs.append(opt.current_lr()))
    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([p], 0.5)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, patience=0, factor=0.5, threshold=0.05)
    want = []
    for m in hist["val_loss" if use_val else "loss"]:
        tsched.step(m)
        want.append(topt.param_groups[0]["lr"])
    assert lrs == pytest.approx(want, rel=1e-12)
    assert min(want) < 0.5   # the run did reduce the rate at least once (else the test proves nothing)
