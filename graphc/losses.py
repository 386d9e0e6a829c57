"""Losses (mean over the batch unless reduction='sum'/'none'), built from stable fused forms."""
from __future__ import annotations

import math
from typing import Sequence

from graphc import ops as F
from . import dtypes as _dt
from . import shapes as _sh
from .errors import DTypeError, GraphcError, ShapeError
from .ir import Tensor
from .ops import nn_ops as N

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction, loss: str) -> None:
    if reduction not in REDUCTIONS:
        raise GraphcError(f"{loss}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _reduce(loss: Tensor, reduction: str, name: str = "loss") -> Tensor:
    _check_reduction(reduction, name)
    if reduction == "mean":
        return F.mean(loss)
    if reduction == "sum":
        return F.sum(loss)
    return loss


def _matched(loss: str, pred, target, what: str = "target") -> tuple[Tensor, Tensor]:
    """pred and target as tensors of one shape. A scalar target is allowed; anything else that would
    broadcast ((N, 1) against (N,) gives (N, N)) is a ShapeError, where torch only warns."""
    pred, target = F.as_tensor(pred), F.as_tensor(target)
    if target.ndim == 0:
        return pred, target
    same = pred.ndim == target.ndim and all(_sh.dims_equal(a, b) for a, b in zip(pred.shape, target.shape))
    if not same:
        hint = ""
        if pred.ndim == target.ndim + 1 and pred.shape[-1] == 1:
            hint = f"; squeeze the prediction (pred[:, 0] or gc.squeeze(pred, -1)) or give the {what} shape (..., 1)"
        elif target.ndim == pred.ndim + 1 and target.shape[-1] == 1:
            hint = f"; squeeze the {what} or give the prediction shape (..., 1)"
        raise ShapeError(f"{loss}: prediction {pred.label} has shape {_sh.fmt_shape(pred.shape)} but {what} "
                         f"{target.label} has shape {_sh.fmt_shape(target.shape)}; they must match (they would "
                         f"broadcast to a different shape and give a wrong loss){hint}")
    return pred, target


def mse(pred, target, reduction: str = "mean") -> Tensor:
    """Mean squared error (torch.nn.functional.mse_loss); pred and target of one shape (or a scalar target)."""
    _check_reduction(reduction, "mse")
    pred, target = _matched("mse", pred, target)
    d = pred - target
    return _reduce(d * d, reduction)


def mae(pred, target, reduction: str = "mean") -> Tensor:
    """Mean absolute error (torch.nn.functional.l1_loss); pred and target of one shape."""
    _check_reduction(reduction, "mae")
    pred, target = _matched("mae", pred, target)
    return _reduce(F.abs(pred - target), reduction)


def cross_entropy(logits, labels, label_smoothing: float = 0.0, reduction: str = "mean", axis: int = -1) -> Tensor:
    """Softmax cross-entropy from logits (log_softmax, so never overflows). `labels`: integer class
    indices of shape logits.shape without `axis`, or probabilities / one-hot of logits' shape.
    label_smoothing mixes the target with the uniform distribution (PyTorch's definition)."""
    _check_reduction(reduction, "cross_entropy")
    logits = F.as_tensor(logits)
    labels = F.as_tensor(labels)
    axis = _sh.normalize_axis(axis, logits.ndim, "cross_entropy")
    k = logits.shape[axis]
    logp = F.log_softmax(logits, axis)
    if _dt.is_int(labels.dtype):
        if labels.ndim != logits.ndim - 1 or axis != logits.ndim - 1:
            raise ShapeError(f"cross_entropy: integer labels {labels.type_str} must have the shape of logits "
                             f"{logits.type_str} without the class axis (the last)")
        target = N.one_hot(labels, k, logits.dtype)
    elif _dt.is_float(labels.dtype):
        _matched("cross_entropy", logits, labels, "probability labels")
        target = F.cast(labels, logits.dtype)
    else:
        raise DTypeError(f"cross_entropy: labels must be int or float, got {labels.dtype}")
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / k
    return _reduce(-F.sum(target * logp, axis), reduction)


def nll(log_probs, labels, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer labels given log-probabilities (N, K)."""
    _check_reduction(reduction, "nll")
    log_probs = F.as_tensor(log_probs)
    return _reduce(-F.sum(N.one_hot(labels, log_probs.shape[-1], log_probs.dtype) * log_probs, -1), reduction)


def binary_cross_entropy_with_logits(logits, targets, reduction: str = "mean") -> Tensor:
    """-t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)) = softplus(x) - t x (stable for any x)."""
    _check_reduction(reduction, "binary_cross_entropy_with_logits")
    logits, targets = _matched("binary_cross_entropy_with_logits", logits, targets)
    return _reduce(F.softplus(logits) - logits * targets, reduction)


bce_with_logits = binary_cross_entropy_with_logits


def gaussian_nll(mean, log_var, target, reduction: str = "mean", full: bool = False) -> Tensor:
    """Negative log-likelihood of target under N(mean, exp(log_var)), the variance predicted as a log."""
    _check_reduction(reduction, "gaussian_nll")
    mean, target = _matched("gaussian_nll", mean, target)
    log_var = F.as_tensor(log_var)
    d = target - mean
    loss = 0.5 * (log_var + d * d * F.exp(-log_var))
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)


def mixture_density(logit_pi, mu, log_sigma, target, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood under a mixture of diagonal Gaussians (Bishop's mixture density network).
    logit_pi (N, K) mixture logits; mu, log_sigma (N, K, D) or (N, K); target (N, D) or (N,)."""
    _check_reduction(reduction, "mixture_density")
    logit_pi, mu, log_sigma, target = (F.as_tensor(t) for t in (logit_pi, mu, log_sigma, target))
    if mu.ndim == 2:
        mu, log_sigma = F.expand_dims(mu, -1), F.expand_dims(log_sigma, -1)
        target = F.expand_dims(target, -1)
    z = (F.expand_dims(target, 1) - mu) * F.exp(-log_sigma)
    log_n = F.sum(-0.5 * z * z - log_sigma - 0.5 * math.log(2 * math.pi), -1)  # (N, K)
    return _reduce(-F.logsumexp(F.log_softmax(logit_pi, -1) + log_n, -1), reduction)


def l1_penalty(params: Sequence[Tensor]) -> Tensor:
    """sum of |w| over every parameter."""
    return _sum([F.sum(F.abs(p)) for p in params])


def l2_penalty(params: Sequence[Tensor]) -> Tensor:
    """sum of w^2 over every parameter (add lambda/2 * this for weight decay lambda)."""
    return _sum([F.sum(p * p) for p in params])


def _sum(terms):
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def accuracy(logits, labels) -> Tensor:
    """Fraction of rows whose argmax equals the integer label (not differentiable)."""
    hit = F.equal(F.argmax(logits, -1), F.cast(labels, "int64"))
    return F.mean(F.cast(hit, "float32"))
