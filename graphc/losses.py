"""Losses (mean over the batch unless reduction='sum'/'none'), built from stable fused forms."""
from __future__ import annotations

import math
from typing import Sequence

from graphc import ops as F
from . import dtypes as _dt
from .errors import DTypeError, ShapeError
from .ir import Tensor
from .ops import nn_ops as N


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return F.mean(loss)
    if reduction == "sum":
        return F.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def mse(pred, target, reduction: str = "mean") -> Tensor:
    """Mean squared error (torch.nn.functional.mse_loss)."""
    d = F.as_tensor(pred) - target
    return _reduce(d * d, reduction)


def mae(pred, target, reduction: str = "mean") -> Tensor:
    return _reduce(F.abs(F.as_tensor(pred) - target), reduction)


def cross_entropy(logits, labels, label_smoothing: float = 0.0, reduction: str = "mean", axis: int = -1) -> Tensor:
    """Softmax cross-entropy from logits (log_softmax, so never overflows). `labels`: integer class
    indices of shape logits.shape without `axis`, or probabilities / one-hot of logits' shape.
    label_smoothing mixes the target with the uniform distribution (PyTorch's definition)."""
    logits = F.as_tensor(logits)
    labels = F.as_tensor(labels)
    axis = axis % logits.ndim
    k = logits.shape[axis]
    logp = F.log_softmax(logits, axis)
    if _dt.is_int(labels.dtype):
        if labels.ndim != logits.ndim - 1 or axis != logits.ndim - 1:
            raise ShapeError(f"cross_entropy: integer labels {labels.type_str} must have the shape of logits "
                             f"{logits.type_str} without the class axis (the last)")
        target = N.one_hot(labels, k, logits.dtype)
    elif _dt.is_float(labels.dtype):
        target = F.cast(labels, logits.dtype)
    else:
        raise DTypeError(f"cross_entropy: labels must be int or float, got {labels.dtype}")
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / k
    return _reduce(-F.sum(target * logp, axis), reduction)


def nll(log_probs, labels, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer labels given log-probabilities (N, K)."""
    log_probs = F.as_tensor(log_probs)
    return _reduce(-F.sum(N.one_hot(labels, log_probs.shape[-1], log_probs.dtype) * log_probs, -1), reduction)


def binary_cross_entropy_with_logits(logits, targets, reduction: str = "mean") -> Tensor:
    """-t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)) = softplus(x) - t x (stable for any x)."""
    logits = F.as_tensor(logits)
    return _reduce(F.softplus(logits) - logits * targets, reduction)


bce_with_logits = binary_cross_entropy_with_logits


def gaussian_nll(mean, log_var, target, reduction: str = "mean", full: bool = False) -> Tensor:
    """Negative log-likelihood of target under N(mean, exp(log_var)), the variance predicted as a log."""
    log_var = F.as_tensor(log_var)
    d = F.as_tensor(target) - mean
    loss = 0.5 * (log_var + d * d * F.exp(-log_var))
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)


def mixture_density(logit_pi, mu, log_sigma, target, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood under a mixture of diagonal Gaussians (Bishop's mixture density network).
    logit_pi (N, K) mixture logits; mu, log_sigma (N, K, D) or (N, K); target (N, D) or (N,)."""
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
