"""Optimisers as graph updates: `gc.optim.Adam(lr=1e-3).updates(loss, params)` returns the
(parameter, new value) list for gc.function(..., updates=...). Optimiser state (moments, the step
counter that drives learning-rate schedules) is parameters too, so it is saved with the model.

First order: SGD (momentum, Nesterov), AdaGrad, AdaDelta, RMSProp, Adam, AdamW, QuickProp; second order:
Newton (damped, H + damping*I, from gc.hessian blocks: small models) and HessianFree (conjugate
gradient on gc.hvp). Every optimiser takes weight_decay, clip_value, clip_norm and schedule
(StepLR, ExponentialLR, CosineLR, LinearLR, PolynomialLR, PowerLR: functions of the step counter;
ReduceLROnPlateau: driven by `.step(val_loss)` each epoch).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

import graphc as gc
from graphc import ops as F
from .autodiff import hessian_blocks
from .errors import GraphcError
from .ir import Tensor
from .ops.core import Parameter, parameter

# ---- learning-rate schedules: functions of the step counter, evaluated in the graph ---------------


class StepLR:
    """lr * gamma ** floor(step / step_size)."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size, self.gamma = step_size, gamma

    def __call__(self, lr: float, step: Tensor) -> Tensor:
        return lr * self.gamma ** F.floor(step / float(self.step_size))


class ExponentialLR:
    """lr * gamma ** step."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def __call__(self, lr, step):
        return lr * self.gamma ** step


class CosineLR:
    """eta_min + (lr - eta_min) * (1 + cos(pi * min(step, T_max) / T_max)) / 2."""

    def __init__(self, T_max: int, eta_min: float = 0.0):
        self.T_max, self.eta_min = T_max, eta_min

    def __call__(self, lr, step):
        frac = F.minimum(step, float(self.T_max)) / float(self.T_max)
        return self.eta_min + (lr - self.eta_min) * 0.5 * (1.0 + F.cos(math.pi * frac))



class LinearLR:
    """lr * (start_factor + (end_factor - start_factor) * min(step, total_iters) / total_iters)
    (torch.optim.lr_scheduler.LinearLR: a linear warm-up or decay, then constant)."""

    def __init__(self, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5):
        if isinstance(total_iters, bool) or not isinstance(total_iters, int) or total_iters < 1:
            raise GraphcError(f"LinearLR: total_iters must be an integer >= 1, got {total_iters!r}")
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise GraphcError(f"LinearLR: expected 0 < start_factor <= 1 and 0 <= end_factor <= 1, got "
                              f"start_factor={start_factor!r}, end_factor={end_factor!r}")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters

    def __call__(self, lr, step):
        frac = F.minimum(step, float(self.total_iters)) / float(self.total_iters)
        return lr * (self.start_factor + (self.end_factor - self.start_factor) * frac)


class PolynomialLR:
    """lr * (1 - min(step, total_iters) / total_iters) ** power (torch.optim.lr_scheduler.PolynomialLR:
    decays to 0 at total_iters)."""

    def __init__(self, total_iters: int = 5, power: float = 1.0):
        if isinstance(total_iters, bool) or not isinstance(total_iters, int) or total_iters < 1:
            raise GraphcError(f"PolynomialLR: total_iters must be an integer >= 1, got {total_iters!r}")
        self.total_iters, self.power = total_iters, power

    def __call__(self, lr, step):
        return lr * (1.0 - F.minimum(step, float(self.total_iters)) / float(self.total_iters)) ** self.power


class PowerLR:
    """Power scheduling: lr / (1 + step / steps) ** power (lr halves after `steps` steps with power 1,
    then falls ever more slowly; the 1/t decay of stochastic approximation)."""

    def __init__(self, steps: float, power: float = 1.0):
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps <= 0:
            raise GraphcError(f"PowerLR: steps must be a number > 0, got {steps!r}")
        self.steps, self.power = steps, power

    def __call__(self, lr, step):
        return lr / (1.0 + step / float(self.steps)) ** self.power


class ReduceLROnPlateau:
    """Divide the learning rate by 1/factor when a monitored metric stops improving
    (torch.optim.lr_scheduler.ReduceLROnPlateau, same arguments and rule): call `.step(metric)` once
    per epoch with the validation loss (mode='min') or score (mode='max'); after more than `patience`
    epochs without improvement by `threshold` (relative, or absolute with threshold_mode='abs') the
    learning rate becomes max(lr * factor, min_lr), then `cooldown` epochs pass before counting again.

    The factor applied so far is a parameter (graph state, saved with the model), so compiled training
    steps pick up the new learning rate without recompiling. One instance serves one optimiser."""

    _made = 0

    def __init__(self, mode: str = "min", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                 threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8):
        if mode not in ("min", "max"):
            raise GraphcError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise GraphcError(f"ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise GraphcError(f"ReduceLROnPlateau: factor must be a number in (0, 1), got {factor!r}")
        for what, v in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise GraphcError(f"ReduceLROnPlateau: {what} must be an integer >= 0, got {v!r}")
        self.mode, self.factor, self.patience, self.threshold = mode, factor, patience, threshold
        self.threshold_mode, self.cooldown, self.min_lr, self.eps = threshold_mode, cooldown, min_lr, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = self.cooldown_counter = 0
        self.base_lr: float | None = None
        self.scale = parameter(f"reducelronplateau{ReduceLROnPlateau._made}.scale", np.ones((), "float64"),
                               "float64")
        ReduceLROnPlateau._made += 1

    def __call__(self, lr, step):
        if self.base_lr is None:
            self.base_lr = float(lr)
        elif float(lr) != self.base_lr:
            raise GraphcError("ReduceLROnPlateau: one instance serves one optimiser (it was given "
                              f"lr={self.base_lr} before, now lr={lr})")
        return lr * F.cast(self.scale, step.dtype)

    @property
    def lr(self) -> float:
        """The current learning rate (after the reductions so far)."""
        if self.base_lr is None:
            raise GraphcError("ReduceLROnPlateau: not attached to an optimiser yet (pass schedule= and "
                              "call .updates first)")
        return self.base_lr * float(self.scale.get_value())

    def _better(self, a: float) -> bool:
        t, b = self.threshold, self.best
        if self.mode == "min":
            return a < (b * (1.0 - t) if self.threshold_mode == "rel" else b - t)
        return a > (b * (1.0 + t) if self.threshold_mode == "rel" else b + t)

    def step(self, metric) -> None:
        """Record one epoch's metric (a number or a 0-d array) and reduce the learning rate if due."""
        a = float(np.asarray(metric))
        if self._better(a):
            self.best, self.num_bad_epochs = a, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = self.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.scale.set_value(np.asarray(new / self.base_lr, "float64"))
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

# ---- the base: clipping, weight decay, state slots ------------------------------------------------


def clip_by_value(grads: Sequence[Tensor], v: float) -> list[Tensor]:
    return [F.clip(g, -v, v) for g in grads]


def clip_by_global_norm(grads: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """Scale all gradients by min(1, max_norm / (||g||_2 + 1e-6)) (``torch.nn.utils.clip_grad_norm_``)."""
    norm = F.sqrt(_total([F.sum(g * g) for g in grads]))
    scale = F.minimum(max_norm / (norm + 1e-6), 1.0)
    return [g * F.cast(scale, g.dtype) for g in grads]


def _total(terms):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


_counts: Counter = Counter()


class Optimizer:
    decoupled_decay = False

    def __init__(self, lr: float = 0.01, weight_decay: float = 0.0, clip_value: float | None = None,
                 clip_norm: float | None = None, schedule=None):
        self.lr, self.weight_decay = lr, weight_decay
        self.clip_value, self.clip_norm, self.schedule = clip_value, clip_norm, schedule
        self.step: Parameter | None = None
        self._slots: dict = {}
        cls = type(self).__name__.lower()
        self.name = f"{cls}{_counts[cls]}"  # unique state names (adam0.step, adam0.<param>.m, ...)
        _counts[cls] += 1

    # state ------------------------------------------------------------------------------------
    def slot(self, p: Parameter, what: str, init: float = 0.0) -> Parameter:
        """Per-parameter state, created once (zeros or `init`, p's shape and dtype)."""
        key = (id(p), what)
        if key not in self._slots:
            self._slots[key] = parameter(f"{self.name}.{p.name}.{what}", np.full(p.shape, init, p.dtype), p.dtype)
        return self._slots[key]

    @property
    def state(self) -> list[Parameter]:
        return ([self.step] if self.step is not None else []) + list(self._slots.values())

    def state_dict(self) -> dict[str, np.ndarray]:
        return {s.name: s.get_value() for s in self.state}

    def load_state_dict(self, d: dict) -> None:
        for s in self.state:
            if s.name not in d:
                raise GraphcError(f"{self.name}.load_state_dict: missing {s.name}")
            s.set_value(d[s.name])

    def learning_rate(self, step: Tensor):
        return self.lr if self.schedule is None else self.schedule(self.lr, step)

    def current_lr(self) -> float:
        """The learning rate the next step will use."""
        if self.schedule is None:
            return float(self.lr)
        s = 0.0 if self.step is None else float(self.step.value)
        return float(gc.evaluate([F.as_tensor(self.schedule(self.lr, gc.constant(s, "float64")))], {})[0])

    # updates ----------------------------------------------------------------------------------
    def gradients(self, loss, params, grads=None) -> list[Tensor]:
        grads = list(grads) if grads is not None else gc.grad(loss, list(params))
        if self.clip_value is not None:
            grads = clip_by_value(grads, self.clip_value)
        if self.clip_norm is not None:
            grads = clip_by_global_norm(grads, self.clip_norm)
        return grads

    def _start(self, params) -> list[Parameter]:
        """Check the parameter list and create the step counter (once)."""
        params = list(params)
        if not params:
            raise GraphcError(f"{self.name}: no parameters to optimise (a gc.nn.Module registers the layers "
                              "assigned to its attributes; put lists of layers in gc.nn.ModuleList)")
        for p in params:
            if not isinstance(p, Parameter):
                raise GraphcError(f"{self.name}: {getattr(p, 'label', p)!r} is not a parameter")
        if self.step is None:
            self.step = parameter(f"{self.name}.step", np.zeros((), params[0].dtype), params[0].dtype)
        return params

    def _given_grads(self, params, grads) -> list[Tensor] | None:
        if grads is None:
            return None
        grads = [F.as_tensor(g) for g in grads]
        if len(grads) != len(params):
            raise GraphcError(f"{self.name}: {len(grads)} gradients for {len(params)} parameters")
        return grads

    def updates(self, loss, params: Sequence[Parameter], grads: Sequence[Tensor] | None = None) -> list:
        """(parameter, new value) pairs for one step on `loss`: parameters, state, step counter."""
        params = self._start(params)
        grads = self.gradients(loss, params, self._given_grads(params, grads))
        t = self.step + 1.0
        lr = self.learning_rate(self.step)
        out = []
        for p, g in zip(params, grads):
            if self.weight_decay and not self.decoupled_decay:
                g = g + self.weight_decay * p
            out += self.rule(p, g, lr, t)
        return out + [(self.step, t)]

    def rule(self, p, g, lr, t) -> list:
        raise NotImplementedError


# ---- first-order methods ----------------------------------------------------------------------


class SGD(Optimizer):
    """p -= lr * d; with momentum: buf = momentum * buf + g, d = buf (Nesterov: g + momentum * buf)."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, **kw):
        super().__init__(lr, **kw)
        self.momentum, self.nesterov = momentum, nesterov

    def rule(self, p, g, lr, t):
        if not self.momentum:
            return [(p, p - lr * g)]
        buf = self.slot(p, "momentum")
        new = self.momentum * buf + g
        d = g + self.momentum * new if self.nesterov else new
        return [(p, p - lr * d), (buf, new)]


class Momentum(SGD):
    def __init__(self, lr: float = 0.01, momentum: float = 0.9, **kw):
        super().__init__(lr, momentum, False, **kw)


class Nesterov(SGD):
    def __init__(self, lr: float = 0.01, momentum: float = 0.9, **kw):
        super().__init__(lr, momentum, True, **kw)


class AdaGrad(Optimizer):
    """s += g^2; p -= lr * g / (sqrt(s) + eps)."""

    def __init__(self, lr: float = 0.01, eps: float = 1e-10, initial_accumulator_value: float = 0.0, **kw):
        super().__init__(lr, **kw)
        self.eps, self.init = eps, initial_accumulator_value

    def rule(self, p, g, lr, t):
        s = self.slot(p, "sum", self.init)
        new = s + g * g
        return [(p, p - lr * g / (F.sqrt(new) + self.eps)), (s, new)]


class RMSProp(Optimizer):
    """v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps) (with momentum: through a buffer)."""

    def __init__(self, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0, **kw):
        super().__init__(lr, **kw)
        self.alpha, self.eps, self.momentum = alpha, eps, momentum

    def rule(self, p, g, lr, t):
        v = self.slot(p, "square_avg")
        nv = self.alpha * v + (1 - self.alpha) * g * g
        d = g / (F.sqrt(nv) + self.eps)
        if not self.momentum:
            return [(p, p - lr * d), (v, nv)]
        buf = self.slot(p, "momentum")
        nb = self.momentum * buf + d
        return [(p, p - lr * nb), (v, nv), (buf, nb)]


class Adam(Optimizer):
    """Adam with bias correction: p -= lr * m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, **kw):
        super().__init__(lr, **kw)
        self.b1, self.b2 = betas
        self.eps = eps

    def rule(self, p, g, lr, t):
        m, v = self.slot(p, "m"), self.slot(p, "v")
        nm = self.b1 * m + (1 - self.b1) * g
        nv = self.b2 * v + (1 - self.b2) * g * g
        mhat = nm / (1.0 - self.b1 ** t)
        vhat = nv / (1.0 - self.b2 ** t)
        base = p * (1.0 - lr * self.weight_decay) if self.decoupled_decay and self.weight_decay else p
        return [(p, base - lr * mhat / (F.sqrt(vhat) + self.eps)), (m, nm), (v, nv)]


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p *= 1 - lr * weight_decay`` before the Adam step."""
    decoupled_decay = True

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01, **kw):
        super().__init__(lr, betas, eps, weight_decay=weight_decay, **kw)


class AdaDelta(Optimizer):
    """Zeiler's AdaDelta with torch's update rule (torch.optim.Adadelta):
    v = rho v + (1 - rho) g^2;  d = sqrt(u + eps) / sqrt(v + eps) * g;  u = rho u + (1 - rho) d^2;
    p -= lr * d (lr=1.0 is the original method)."""

    def __init__(self, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, **kw):
        super().__init__(lr, **kw)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
            raise GraphcError(f"AdaDelta: rho must be a number in [0, 1], got {rho!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise GraphcError(f"AdaDelta: eps must be a number > 0, got {eps!r}")
        self.rho, self.eps = rho, eps

    def rule(self, p, g, lr, t):
        v, u = self.slot(p, "square_avg"), self.slot(p, "acc_delta")
        nv = self.rho * v + (1 - self.rho) * g * g
        d = F.sqrt(u + self.eps) / F.sqrt(nv + self.eps) * g
        nu = self.rho * u + (1 - self.rho) * d * d
        return [(p, p - lr * d), (v, nv), (u, nu)]



class QuickProp(Optimizer):
    """Fahlman's QuickProp: per weight, jump to the minimum of the parabola through the last two
    slopes, dw = dw_prev * g / (g_prev - g), limited to ``mu * |dw_prev|``; plain -lr * g on the first
    step and wherever the parabola is undefined (dw_prev = 0 or g_prev = g)."""

    def __init__(self, lr: float = 0.01, mu: float = 1.75, **kw):
        super().__init__(lr, **kw)
        self.mu = mu

    def rule(self, p, g, lr, t):
        pg, pdw = self.slot(p, "prev_grad"), self.slot(p, "prev_step")
        denom = pg - g
        ok = F.logical_and(F.not_equal(pdw, 0.0), F.not_equal(denom, 0.0))
        qp = pdw * g / F.where(ok, denom, F.ones_like(denom))
        lim = self.mu * F.abs(pdw)
        dw = F.where(ok, F.clip(qp, -lim, lim), -lr * g)
        return [(p, p + dw), (pg, g), (pdw, dw)]


# ---- second-order methods ---------------------------------------------------------------------


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return F.concatenate([F.reshape(t, (-1,)) for t in ts], 0)


def _split(v: Tensor, params) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        n = int(np.prod(p.shape))
        out.append(F.reshape(v[start:start + n], p.shape))
        start += n
    return out


def _decayed_grads(opt: Optimizer, loss, params, grads) -> list[Tensor]:
    """The gradient of loss + weight_decay/2 * sum(p^2), from `grads` when given (differentiable again)."""
    gs = grads if grads is not None else gc.grad(loss, params)
    if opt.weight_decay:
        gs = [g + opt.weight_decay * p for g, p in zip(gs, params)]
    return list(gs)


def _clipped(opt: Optimizer, gs: list[Tensor]) -> list[Tensor]:
    if opt.clip_value is not None:
        gs = clip_by_value(gs, opt.clip_value)
    if opt.clip_norm is not None:
        gs = clip_by_global_norm(gs, opt.clip_norm)
    return gs


class Newton(Optimizer):
    """Damped Newton: p -= lr * (H + damping I)^-1 g with the full Hessian from gc.hessian blocks
    (one reverse pass per parameter element: for small models).

    Like every optimiser it takes weight_decay (added to the loss as weight_decay/2 * ||p||^2),
    clip_value / clip_norm (applied to g on the right-hand side; H is the Hessian of the unclipped
    loss), schedule (lr from the step counter) and grads= (gradients to use; they must be
    differentiable graphs of the parameters, since H is their Jacobian)."""

    def __init__(self, lr: float = 1.0, damping: float = 1e-3, **kw):
        super().__init__(lr, **kw)
        self.damping = damping

    def updates(self, loss, params, grads=None):
        params = self._start(params)
        gs = _decayed_grads(self, loss, params, self._given_grads(params, grads))
        blocks = hessian_blocks(gs, params)
        sizes = [int(np.prod(p.shape)) for p in params]
        h = F.concatenate([F.concatenate([F.reshape(b, (m, n)) for b, n in zip(row, sizes)], 1)
                           for row, m in zip(blocks, sizes)], 0)
        n = h.shape[0]
        d = gc.solve(h + gc.constant(self.damping * np.eye(n), h.dtype), _flat(_clipped(self, gs)))
        lr = self.learning_rate(self.step)
        return [(p, p - lr * di) for p, di in zip(params, _split(d, params))] + [(self.step, self.step + 1.0)]


class HessianFree(Optimizer):
    """Hessian-free (truncated Newton): solve (H + damping I) d = g by `cg_iters` steps of conjugate
    gradient, each using a Hessian-vector product (double backprop; H is never formed).

    weight_decay, clip_value / clip_norm (on g, the right-hand side), schedule and grads= (differentiable
    gradients, whose products with a vector are differentiated for H v) are honoured as in Newton."""

    def __init__(self, lr: float = 1.0, damping: float = 1e-2, cg_iters: int = 10, **kw):
        super().__init__(lr, **kw)
        if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 1:
            raise GraphcError(f"HessianFree: cg_iters must be an integer >= 1, got {cg_iters!r}")
        self.damping, self.cg_iters = damping, cg_iters

    def updates(self, loss, params, grads=None):
        params = self._start(params)
        gs = _decayed_grads(self, loss, params, self._given_grads(params, grads))

        def hvp(vs):
            inner = _total([F.sum(g * F.stop_gradient(v)) for g, v in zip(gs, vs)])
            return _flat(gc.grad(inner, params, disconnected="zero"))
        g = _flat(_clipped(self, gs))
        x, r = F.zeros_like(g), g
        p = r
        rs = F.sum(r * r)
        for _ in range(self.cg_iters):
            hp = hvp(_split(p, params)) + self.damping * p
            alpha = rs / (F.sum(p * hp) + 1e-30)
            x = x + alpha * p
            r = r - alpha * hp
            rs_new = F.sum(r * r)
            p = r + (rs_new / (rs + 1e-30)) * p
            rs = rs_new
        lr = self.learning_rate(self.step)
        return [(q, q - lr * d) for q, d in zip(params, _split(x, params))] + [(self.step, self.step + 1.0)]
