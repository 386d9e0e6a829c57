"""Losses (mean over the batch unless reduction='sum'/'none'), built from stable fused forms, and
classification metrics (accuracy, precision, recall, F1; not differentiable)."""
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
    """``sum of |w|`` over every parameter."""
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


def _positive_number(loss: str, what: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise GraphcError(f"{loss}: {what} must be a number > 0, got {v!r}")
    return float(v)


def huber(pred, target, delta: float = 1.0, reduction: str = "mean") -> Tensor:
    """Huber loss (torch.nn.functional.huber_loss): ``0.5 d^2`` where ``|d| <= delta``, ``delta (|d| - delta/2)``
    beyond, ``d = pred - target``. Written as ``0.5 q^2 + delta (|d| - q)``, ``q = min(|d|, delta)``."""
    _check_reduction(reduction, "huber")
    delta = _positive_number("huber", "delta", delta)
    pred, target = _matched("huber", pred, target)
    a = F.abs(pred - target)
    q = F.minimum(a, delta)
    return _reduce(0.5 * q * q + delta * (a - q), reduction)


KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def kl_div(log_q, p, reduction: str = "batchmean", log_target: bool = False) -> Tensor:
    """KL(p || q) with torch's argument order (torch.nn.functional.kl_div): `log_q` the model's
    log-probabilities, `p` the target probabilities (log-probabilities with log_target=True); pointwise
    p (log p - log_q), 0 where p = 0. reduction='batchmean' (the default; the true KL per sample) sums
    and divides by the batch size (axis 0); 'mean' divides by the number of elements, as torch does."""
    if reduction not in KL_REDUCTIONS:
        raise GraphcError(f"kl_div: reduction must be one of {', '.join(map(repr, KL_REDUCTIONS))}, "
                          f"got {reduction!r}")
    log_q, p = _matched("kl_div", log_q, p)
    if log_target:
        loss = F.exp(p) * (p - log_q)
    else:
        pos = F.greater(p, 0.0)
        loss = F.where(pos, p * (F.log(F.where(pos, p, F.ones_like(p))) - log_q), F.zeros_like(p))
    if reduction == "batchmean":
        n = log_q.shape[0] if log_q.ndim else 1
        return F.sum(loss) / (float(n) if isinstance(n, int) else F.size_of(log_q, (0,), loss.dtype))
    return _reduce(loss, reduction, "kl_div")


def binary_cross_entropy(probs, targets, reduction: str = "mean") -> Tensor:
    """-(t log p + (1 - t) log(1 - p)) from probabilities (torch.nn.functional.binary_cross_entropy),
    each log clamped at -100 as torch does, so p = 0 or 1 gives a finite loss. From logits,
    binary_cross_entropy_with_logits is exact for any input and preferable."""
    _check_reduction(reduction, "binary_cross_entropy")
    probs, targets = _matched("binary_cross_entropy", probs, targets)

    def clamped_log(v):   # max(log v, -100), with log 0 never formed (so its gradient is 0, not nan)
        pos = F.greater(v, 0.0)
        return F.maximum(F.where(pos, F.log(F.where(pos, v, F.ones_like(v))), -100.0), -100.0)
    return _reduce(-(targets * clamped_log(probs) + (1.0 - targets) * clamped_log(1.0 - probs)), reduction)


bce = binary_cross_entropy


def hinge(scores, targets, margin: float = 1.0, squared: bool = False, reduction: str = "mean") -> Tensor:
    """Binary hinge loss of a margin classifier (the SVM loss; scikit-learn's hinge_loss):
    max(0, margin - t * s) with targets t in {-1, +1} and real scores s of the same shape;
    squared=True gives the squared hinge (L2-SVM). For K classes see multi_margin."""
    _check_reduction(reduction, "hinge")
    margin = _positive_number("hinge", "margin", margin)
    scores, targets = _matched("hinge", scores, targets)
    h = F.relu(margin - F.cast(targets, scores.dtype) * scores)
    return _reduce(h * h if squared else h, reduction)


def multi_margin(scores, labels, p: int = 1, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Multi-class hinge (torch.nn.functional.multi_margin_loss, Weston & Watkins): for scores (N, K)
    and integer labels (N,), sum over i != y of max(0, margin - s_y + s_i)^p, divided by K."""
    _check_reduction(reduction, "multi_margin")
    if p not in (1, 2):
        raise GraphcError(f"multi_margin: p must be 1 or 2, got {p!r}")
    margin = _positive_number("multi_margin", "margin", margin)
    scores, labels = F.as_tensor(scores), F.as_tensor(labels)
    if scores.ndim != 2 or labels.ndim != 1 or not _dt.is_int(labels.dtype):
        raise ShapeError(f"multi_margin: expected scores (N, K) and integer labels (N,), got {scores.type_str} "
                         f"and {labels.type_str}")
    k = scores.shape[1]
    hot = N.one_hot(labels, k, scores.dtype)
    s_y = F.sum(hot * scores, -1, keepdims=True)
    h = F.relu(margin - s_y + scores)
    h = h * h if p == 2 else h
    return _reduce(F.sum((1.0 - hot) * h, -1) / float(k), reduction)


# ---- classification metrics (not differentiable) --------------------------------------------------

AVERAGES = ("binary", "macro", "micro")


def _counts(metric: str, preds, targets, threshold: float, average):
    """(tp, fp, fn) as float32 counts: scalars for average='binary' / 'micro', (K,) for 'macro'.

    Binary: `preds` scores or probabilities of targets' shape, positive where preds >= threshold;
    targets 0/1 (positive where != 0). Multi-class: `preds` scores (N, K) (the argmax is the
    prediction) and integer `targets` (N,)."""
    preds, targets = F.as_tensor(preds), F.as_tensor(targets)
    multi = preds.ndim == targets.ndim + 1
    if average is None:
        average = "macro" if multi else "binary"
    if average not in AVERAGES:
        raise GraphcError(f"{metric}: average must be None (automatic), 'binary', 'macro' or 'micro', got {average!r}")
    if multi:
        if not _dt.is_int(targets.dtype):
            raise DTypeError(f"{metric}: class scores {preds.type_str} need integer class targets, got "
                             f"{targets.type_str}")
        if average == "binary":
            raise GraphcError(f"{metric}: scores {preds.type_str} for several classes need average='macro' or "
                              "'micro' (binary needs scores of the targets' shape)")
        k = preds.shape[-1]
        pred_hot = N.one_hot(F.argmax(preds, -1), k)
        true_hot = N.one_hot(targets, k)
        axes = tuple(range(pred_hot.ndim - 1))
        tp = F.sum(pred_hot * true_hot, axes)
        fp = F.sum(pred_hot * (1.0 - true_hot), axes)
        fn = F.sum((1.0 - pred_hot) * true_hot, axes)
        if average == "micro":
            tp, fp, fn = F.sum(tp), F.sum(fp), F.sum(fn)
        return tp, fp, fn, average
    preds, targets = _matched(metric, preds, targets)
    if average == "macro":
        raise GraphcError(f"{metric}: average='macro' needs class scores (N, K) and integer targets (N,)")
    pos = F.cast(F.greater_equal(preds, float(threshold)), "float32")
    true = F.cast(F.not_equal(targets, 0), "float32")
    return F.sum(pos * true), F.sum(pos * (1.0 - true)), F.sum((1.0 - pos) * true), average


def _ratio(num, den, average):
    r = num / F.maximum(den, 1.0)   # 0 where undefined (scikit-learn's zero_division=0)
    return F.mean(r) if average == "macro" else r


def precision(preds, targets, threshold: float = 0.5, average: str | None = None) -> Tensor:
    """tp / (tp + fp), 0 when nothing is predicted positive. Binary (preds of targets' shape,
    positive where preds >= threshold: 0.5 for probabilities, 0 for logits) or multi-class (scores
    (N, K), integer targets; average='macro' over all K classes, the default, or 'micro')."""
    tp, fp, _, average = _counts("precision", preds, targets, threshold, average)
    return _ratio(tp, tp + fp, average)


def recall(preds, targets, threshold: float = 0.5, average: str | None = None) -> Tensor:
    """tp / (tp + fn), 0 when there are no positives; arguments as for precision."""
    tp, _, fn, average = _counts("recall", preds, targets, threshold, average)
    return _ratio(tp, tp + fn, average)


def f1_score(preds, targets, threshold: float = 0.5, average: str | None = None) -> Tensor:
    """2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall (0 when both are 0);
    arguments as for precision."""
    tp, fp, fn, average = _counts("f1_score", preds, targets, threshold, average)
    return _ratio(2.0 * tp, 2.0 * tp + fp + fn, average)


f1 = f1_score
