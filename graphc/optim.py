"""Optimisers as graph updates: `gc.optim.Adam(lr=1e-3).updates(loss, params)` returns the
(parameter, new value) list for gc.function(..., updates=...). Optimiser state (moments, the step
counter that drives learning-rate schedules) is parameters too, so it is saved with the model.

First order: SGD (momentum, Nesterov), AdaGrad, AdaDelta, RMSProp, Adam, AdamW, QuickProp; second order:
Newton (damped, H + damping*I, from gc.hessian blocks: small models) and HessianFree (conjugate
gradient on gc.hvp) and LBFGS (torch's algorithm: up to max_iter quasi-Newton iterations per step, the
loss and gradient re-evaluated in the graph at each new point). Every optimiser takes weight_decay,
clip_value, clip_norm, schedule (StepLR, ExponentialLR, CosineLR, LinearLR, PolynomialLR, PowerLR:
functions of the step counter; ReduceLROnPlateau: driven by `.step(val_loss)` each epoch) and max_norm
(a MaxNorm constraint applied to the new weights: torch.renorm of each unit's incoming weights).
Polyak(optimizer, decay=None) keeps an averaged copy of the weights (Polyak-Ruppert mean or an
exponential moving average) to swap in for evaluation.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Sequence

import numpy as np

import graphc as gc
from graphc import ops as F
from .autodiff import hessian_blocks
from .errors import GraphcError
from .ir import Tensor, is_leaf, toposort
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


class MaxNorm:
    """Max-norm constraint (Srebro & Shraibman; Hinton et al.'s dropout training): after each update,
    every unit's incoming weight vector whose p-norm exceeds `max_value` is scaled back to it, exactly
    torch.renorm(w, p, dim, max_value): the sub-tensors along `dim` (dim 0: the output units of Dense
    (out, in) and Conv (out, in, ...) weights) scaled by max_value / (norm + 1e-7) where norm > max_value.

    Applies to `params` when given, otherwise to every parameter with at least 2 dims (weights and
    kernels; biases and normalisation scales are left alone). Pass it, or just the number, as
    `max_norm=` to any optimiser."""

    def __init__(self, max_value: float, dim: int = 0, p: float = 2.0, params=None):
        if isinstance(max_value, bool) or not isinstance(max_value, (int, float, np.integer, np.floating)) \
                or not max_value > 0 or not math.isfinite(max_value):
            raise GraphcError(f"MaxNorm: max_value must be a number > 0, got {max_value!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not p > 0:
            raise GraphcError(f"MaxNorm: p must be a number > 0, got {p!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise GraphcError(f"MaxNorm: dim must be an int, got {dim!r}")
        self.max_value, self.dim, self.p = float(max_value), int(dim), float(p)
        self.params = None if params is None else {id(q) for q in params}

    def applies_to(self, p: Parameter) -> bool:
        return id(p) in self.params if self.params is not None else p.ndim >= 2

    def __call__(self, new: Tensor) -> Tensor:
        """`new` (a parameter's next value) renormed along dim."""
        new = F.as_tensor(new)
        dim = gc.shapes.normalize_axis(self.dim, new.ndim, "MaxNorm")
        axes = tuple(a for a in range(new.ndim) if a != dim)
        if not axes:
            return new
        if self.p == 2.0:
            norm = F.sqrt(F.sum(new * new, axes, keepdims=True))
        else:
            norm = F.sum(F.abs(new) ** self.p, axes, keepdims=True) ** (1.0 / self.p)
        c = self.max_value
        return new * F.where(norm > c, c / (norm + 1e-7), F.ones_like(norm))

    def __repr__(self):
        return f"MaxNorm({self.max_value}, dim={self.dim}, p={self.p})"


def _max_norm(v) -> MaxNorm | None:
    if v is None or isinstance(v, MaxNorm):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise GraphcError(f"max_norm must be None, a number or a gc.optim.MaxNorm, got {v!r}")
    return MaxNorm(v)


def _total(terms):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


_counts: Counter = Counter()


class _StateDict:
    """state_dict / load_state_dict over `self.state` (a list of Parameters) for optimiser-like objects."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {s.name: s.get_value() for s in self.state}

    def load_state_dict(self, d: dict) -> None:
        for s in self.state:
            if s.name not in d:
                raise GraphcError(f"{self.name}.load_state_dict: missing {s.name}")
            s.set_value(d[s.name])


class Optimizer(_StateDict):
    decoupled_decay = False

    def __init__(self, lr: float = 0.01, weight_decay: float = 0.0, clip_value: float | None = None,
                 clip_norm: float | None = None, schedule=None, max_norm: float | MaxNorm | None = None):
        self.lr, self.weight_decay = lr, weight_decay
        self.clip_value, self.clip_norm, self.schedule = clip_value, clip_norm, schedule
        self.max_norm = _max_norm(max_norm)
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

    def constrain(self, params, pairs: list) -> list:
        """`pairs` with the max-norm constraint applied to the new values of `params` it covers."""
        if self.max_norm is None:
            return pairs
        ids = {id(p) for p in params}
        return [(q, self.max_norm(v)) if id(q) in ids and self.max_norm.applies_to(q) else (q, v) for q, v in pairs]

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
        return self.constrain(params, out) + [(self.step, t)]

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
        return self.constrain(params, [(p, p - lr * di) for p, di in zip(params, _split(d, params))]) + \
            [(self.step, self.step + 1.0)]


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
        return self.constrain(params, [(q, q - lr * d) for q, d in zip(params, _split(x, params))]) + \
            [(self.step, self.step + 1.0)]


# ---- L-BFGS -------------------------------------------------------------------------------------


def _substitute(outputs: Sequence[Tensor], mapping: dict) -> list[Tensor]:
    """`outputs` rebuilt with the tensors in `mapping` (id -> replacement) put in place: every node
    that depends on them is cloned onto the new inputs, the rest is shared."""
    from .passes.rewrite import clone
    env = dict(mapping)
    for node in toposort(list(outputs)):
        if is_leaf(node):
            continue
        outs = clone(node, [env.get(id(t), t) for t in node.inputs])
        for o, n in zip(node.outputs, outs):
            env[id(o)] = n
    return [env.get(id(t), t) for t in outputs]


class LBFGS(Optimizer):
    """L-BFGS with torch.optim.LBFGS's algorithm (line_search_fn=None): one step runs up to `max_iter`
    quasi-Newton iterations on the same batch, each a step of length t along the two-loop-recursion
    direction from the last `history_size` curvature pairs (t = min(1, 1/|g|_1) * lr on the very first
    iteration, lr after), and stops early as torch does: max|g| <= tolerance_grad, a direction that is
    not a descent direction (g.d > -tolerance_change), a step or loss change below tolerance_change, or
    `max_eval` evaluations (default max_iter * 5 / 4).

    The loop is in the graph (a gc.scan over the iterations: its body evaluates the loss-and-gradient
    graph at the moving point, masked once a stopping rule fires), so one call of the compiled training step is one `opt.step(closure)` of
    torch, and the history (directions, steps, the last gradient and direction) is optimiser state,
    saved with the model. The compiled step returns the loss at the starting point, as torch's step.

    The loss must be a deterministic function of the parameters (no dropout draws: every iteration
    re-evaluates it). weight_decay (adds weight_decay/2 * ||p||^2 to the loss), schedule (lr from the
    step counter) and max_norm (on the final weights) are honoured; clipping would break the quasi-
    Newton pairs and is refused. grads= must be differentiable graphs of the parameters."""

    def __init__(self, lr: float = 1.0, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn=None, **kw):
        for what, v in (("max_iter", max_iter), ("history_size", history_size)) + \
                ((("max_eval", max_eval),) if max_eval is not None else ()):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise GraphcError(f"LBFGS: {what} must be an integer >= 1, got {v!r}")
        if line_search_fn is not None:
            raise GraphcError(f"LBFGS: line_search_fn={line_search_fn!r} is not supported (only None: fixed steps "
                              "of length lr, torch's default)")
        for what in ("clip_value", "clip_norm"):
            if kw.get(what) is not None:
                raise GraphcError(f"LBFGS: {what}= is not supported (clipped gradients would break the "
                                  "quasi-Newton curvature pairs); scale the loss or use max_norm= instead")
        super().__init__(lr, **kw)
        self.max_iter, self.history_size = int(max_iter), int(history_size)
        self.max_eval = int(max_eval) if max_eval is not None else self.max_iter * 5 // 4
        self.tolerance_grad, self.tolerance_change = float(tolerance_grad), float(tolerance_change)
        self._state: dict | None = None

    def _make_state(self, n: int, dtype: str) -> dict:
        m = self.history_size

        def mk(what, shape, init=0.0):
            return parameter(f"{self.name}.{what}", np.full(shape, init, dtype), dtype)
        return dict(d=mk("d", (n,)), t=mk("t", ()), old_stps=mk("old_stps", (m, n)), old_dirs=mk("old_dirs", (m, n)),
                    ro=mk("ro", (m,)), count=mk("count", ()), H_diag=mk("H_diag", (), 1.0),
                    prev_flat_grad=mk("prev_flat_grad", (n,)), prev_loss=mk("prev_loss", ()),
                    n_iter=mk("n_iter", ()), func_evals=mk("func_evals", ()))

    @property
    def state(self) -> list[Parameter]:
        return super().state + (list(self._state.values()) if self._state else [])

    def updates(self, loss, params, grads=None):
        params = self._start(params)
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise GraphcError(f"LBFGS: all parameters must have one dtype (they form one vector), got {sorted(dtypes)}")
        dtype = params[0].dtype
        given = self._given_grads(params, grads)
        obj = F.cast(F.as_tensor(loss), dtype)
        if obj.ndim != 0:
            raise GraphcError(f"LBFGS: the loss must be a scalar, got shape {obj.shape}")
        gs = list(given) if given is not None else gc.grad(obj, params)
        if self.weight_decay:
            obj = obj + (0.5 * self.weight_decay) * _total([F.sum(p * p) for p in params])
            gs = [g + self.weight_decay * p for g, p in zip(gs, params)]
        gs = [F.cast(g, dtype) for g in gs]
        sizes = [int(np.prod(p.shape)) for p in params]
        n, m = sum(sizes), self.history_size
        if self._state is None:
            self._state = self._make_state(n, dtype)
        st = self._state
        if st["d"].shape != (n,):
            raise GraphcError(f"{self.name}: used for {st['d'].shape[0]} parameter elements before, now {n}; "
                              "make one LBFGS per set of parameters")

        def evaluate(x):
            """(loss, flat gradient) at the flat parameter vector x (a copy of the graph)."""
            mapping = {id(p): F.reshape(v, p.shape) for p, v in zip(params, _split(x, params))}
            outs = _substitute([obj] + gs, mapping)
            return outs[0], _flat(outs[1:])

        lr = self.learning_rate(self.step)
        lr = gc.constant(np.asarray(lr, dtype)) if isinstance(lr, (int, float, np.number)) else F.cast(lr, dtype)
        tol_change, tol_grad = self.tolerance_change, self.tolerance_grad
        one, zero = gc.constant(np.asarray(1, dtype)), gc.constant(np.asarray(0, dtype))
        idx = gc.constant(np.arange(m, dtype=dtype))
        g0 = _flat(gs)
        keys = ("x", "loss", "g", "d", "t", "old_stps", "old_dirs", "ro", "count", "H_diag", "prev_flat_grad",
                "prev_loss", "n_iter", "evals", "active")
        init = dict(x=_flat(params), loss=obj, g=g0, d=st["d"], t=st["t"], old_stps=st["old_stps"],
                    old_dirs=st["old_dirs"], ro=st["ro"], count=st["count"], H_diag=st["H_diag"],
                    prev_flat_grad=st["prev_flat_grad"], prev_loss=st["prev_loss"], n_iter=st["n_iter"],
                    evals=one, active=F.cast(F.max(F.abs(g0)) > tol_grad, dtype))

        def iteration(c, last: bool) -> dict:
            n_iter = c["n_iter"] + 1.0
            first = F.equal(n_iter, 1.0)
            g = c["g"]
            # the curvature pair of the last step joins the history (oldest first, newest last)
            y = g - c["prev_flat_grad"]
            s = c["d"] * c["t"]
            ys = F.sum(y * s)
            push = F.logical_and(F.not_equal(n_iter, 1.0), ys > 1e-10)
            old_dirs = F.where(push, F.concatenate([c["old_dirs"][1:], F.reshape(y, (1, n))], 0), c["old_dirs"])
            old_stps = F.where(push, F.concatenate([c["old_stps"][1:], F.reshape(s, (1, n))], 0), c["old_stps"])
            ro = F.where(push, F.concatenate([c["ro"][1:], F.reshape(1.0 / F.where(push, ys, one), (1,))], 0),
                         c["ro"])
            count = F.where(first, zero, F.where(push, F.minimum(c["count"] + 1.0, float(m)), c["count"]))
            H = F.where(first, one, F.where(push, ys / F.where(push, F.sum(y * y), one), c["H_diag"]))
            valid = F.cast(idx >= float(m) - count, dtype)

            def back(q, row):       # newest to oldest
                si, yi, roi, ok = row
                al = F.sum(si * q) * roi * ok
                return q - al * yi, al
            q, al = gc.scan(back, -g, (old_stps, old_dirs, ro, valid), reverse=True)

            def fwd(r, row):        # oldest to newest
                si, yi, roi, ali, ok = row
                be = F.sum(yi * r) * roi
                return r + si * ((ali - be) * ok), None
            r, _ = gc.scan(fwd, q * H, (old_stps, old_dirs, ro, al, valid))
            d = F.where(first, -g, r)
            t = F.where(first, F.minimum(one, 1.0 / F.sum(F.abs(g))) * lr, lr)
            descent = F.sum(g * d) <= -tol_change
            x = F.where(descent, c["x"] + t * d, c["x"])
            if last:    # torch does not evaluate after the last iteration; the step ends anyway
                return {key: F.where(c["active"] > 0.5, v, c[key]) for key, v in
                        dict(c, x=x, d=d, t=t, old_stps=old_stps, old_dirs=old_dirs, ro=ro, count=count, H_diag=H,
                             prev_flat_grad=g, prev_loss=c["loss"], n_iter=n_iter).items()}
            loss, g_new = evaluate(x)
            evaluated = descent
            evals = c["evals"] + F.cast(evaluated, dtype)
            go_on = F.logical_and(evaluated, evals < float(self.max_eval))
            go_on = F.logical_and(go_on, F.max(F.abs(g_new)) > tol_grad)
            go_on = F.logical_and(go_on, F.max(F.abs(d * t)) > tol_change)
            go_on = F.logical_and(go_on, F.abs(loss - c["loss"]) >= tol_change)
            new = dict(x=x, loss=F.where(evaluated, loss, c["loss"]), g=F.where(evaluated, g_new, g), d=d, t=t,
                       old_stps=old_stps, old_dirs=old_dirs, ro=ro, count=count, H_diag=H, prev_flat_grad=g,
                       prev_loss=c["loss"], n_iter=n_iter, evals=evals, active=F.cast(go_on, dtype))
            act = c["active"] > 0.5
            return {key: F.where(act, new[key], c[key]) for key in keys}

        # one gc.scan over the first max_iter - 1 iterations (one copy of the loss-and-gradient graph in
        # its body), then the last iteration, which does not evaluate the loss again
        fin = init
        if self.max_iter > 1:
            def body(carry, _):
                new = iteration(dict(zip(keys, carry)), False)
                return tuple(new[key] for key in keys), None
            fin_t, _ = gc.scan(body, tuple(init[key] for key in keys), length=self.max_iter - 1)
            fin = dict(zip(keys, fin_t))
        fin = iteration(fin, True)
        out = [(p, v) for p, v in zip(params, _split(fin["x"], params))]
        out = self.constrain(params, out)
        out += [(st[key], fin[key]) for key in ("d", "t", "old_stps", "old_dirs", "ro", "count", "H_diag",
                                                 "prev_flat_grad", "prev_loss", "n_iter")]
        out.append((st["func_evals"], st["func_evals"] + fin["evals"]))
        return out + [(self.step, self.step + 1.0)]


# ---- Polyak averaging ---------------------------------------------------------------------------


class Polyak(_StateDict):
    """Polyak averaging of the weights around any optimiser: `gc.optim.Polyak(gc.optim.SGD(0.1))` is
    used like the optimiser it wraps (`.updates(loss, params)`, gc.fit) and also keeps an averaged
    copy of each parameter, updated after every step from the step's new weights:

      decay=None   the Polyak-Ruppert mean of the iterates: avg += (p - avg) / (n + 1)
      decay=float  an exponential moving average: avg = decay * avg + (1 - decay) * p

    as torch.optim.swa_utils.AveragedModel (the first step copies the weights). The averages are
    parameters (saved with the model); evaluate with them swapped in:

        with avg.averaged():          # the model's parameters hold the averages inside the block
            val_loss = evaluate(x_val, y_val)
    """

    _made = 0

    def __init__(self, optimizer, decay: float | None = None):
        if not hasattr(optimizer, "updates"):
            raise GraphcError(f"Polyak: expected an optimiser (gc.optim.SGD(...), Adam, ...), got "
                              f"{type(optimizer).__name__}")
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float, np.integer,
                                                                                      np.floating))
                                  or not 0 <= decay < 1):
            raise GraphcError(f"Polyak: decay must be None (the running mean) or a number in [0, 1), got {decay!r}")
        self.optimizer, self.decay = optimizer, None if decay is None else float(decay)
        self.name = f"polyak{Polyak._made}"
        Polyak._made += 1
        self.n_averaged: Parameter | None = None
        self._avg: dict[int, tuple[Parameter, Parameter]] = {}

    def average_of(self, p: Parameter) -> Parameter:
        """The averaged copy of `p` (created with p's current value)."""
        if id(p) not in self._avg:
            self._avg[id(p)] = (p, parameter(f"{self.name}.{p.name}.avg", p.get_value(), p.dtype))
        return self._avg[id(p)][1]

    def updates(self, loss, params, grads=None) -> list:
        """The wrapped optimiser's updates plus the averages of the new weights."""
        params = list(params)
        ups = list(self.optimizer.updates(loss, params, grads))
        new = {id(q): v for q, v in ups}
        if self.n_averaged is None:
            self.n_averaged = parameter(f"{self.name}.n_averaged", np.zeros((), "float64"), "float64")
        n = self.n_averaged
        out = []
        for p in params:
            a = self.average_of(p)
            v = F.as_tensor(new.get(id(p), p))
            nn = F.cast(n, p.dtype)
            if self.decay is None:
                upd = a + (v - a) / (nn + 1.0)
            else:
                upd = self.decay * a + (1.0 - self.decay) * v
            out.append((a, F.where(F.equal(n, 0.0), v, upd)))
        return ups + out + [(n, n + 1.0)]

    def swap(self) -> None:
        """Exchange the parameters' values with their averages (call again to swap back)."""
        for p, a in self._avg.values():
            pv, av = p.get_value(), a.get_value()
            p.set_value(av)
            a.set_value(pv)

    @contextlib.contextmanager
    def averaged(self):
        """Inside the block the parameters hold the averaged weights; the trained ones come back after."""
        self.swap()
        try:
            yield self
        finally:
            self.swap()

    def current_lr(self) -> float:
        return self.optimizer.current_lr()

    @property
    def state(self) -> list[Parameter]:
        return list(getattr(self.optimizer, "state", [])) + \
            ([self.n_averaged] if self.n_averaged is not None else []) + [a for _, a in self._avg.values()]
