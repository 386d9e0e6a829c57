"""gc.fit: a training loop (mini-batches, shuffling, validation, early stopping, tqdm progress bar)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import graphc as gc
from graphc import ops as F
from .errors import GraphcError


@dataclass
class History:
    """Per-epoch metrics, the compiled functions, and the epoch whose parameters were kept."""
    metrics: dict = field(default_factory=dict)
    best_epoch: int = -1
    train_fn: object = None
    eval_fn: object = None
    seconds: float = 0.0

    def __getitem__(self, k):
        return self.metrics[k]

    def add(self, **kw):
        for k, v in kw.items():
            self.metrics.setdefault(k, []).append(float(v))


def _placeholders(x: np.ndarray, y: np.ndarray):
    xp = gc.placeholder("x", (None,) + x.shape[1:], x.dtype.name)
    yp = gc.placeholder("y", (None,) + y.shape[1:], y.dtype.name)
    return xp, yp


def _outputs(model, loss_fn, xp, yp, training: bool):
    out = model(xp, training=training)
    loss = loss_fn(out, yp)
    classify = np.dtype(yp.dtype).kind in "iu" and out.ndim == 2
    acc = gc.losses.accuracy(out, yp) if classify else F.constant(np.nan, "float32")
    return loss, acc


def _run_epoch(fn, x, y, batch_size, order, bar=None):
    tot_loss = tot_acc = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        loss, acc = fn(x[idx], y[idx])
        tot_loss += float(loss) * len(idx)
        tot_acc += float(acc) * len(idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{float(acc):.3f}")
    n = max(len(order), 1)
    return tot_loss / n, tot_acc / n


def evaluate_model(fn, x, y, batch_size: int = 512):
    return _run_epoch(fn, x, y, batch_size, np.arange(len(x)))


def _snapshot(model):
    return [p.get_value() for p in model.params + getattr(model, "buffers", [])]


def _restore(model, snap):
    for p, v in zip(model.params + getattr(model, "buffers", []), snap):
        p.set_value(v)


def fit(model, loss_fn: Callable, optimizer, x, y, epochs: int = 10, batch_size: int = 64,
        validation_data=None, shuffle: bool = True, seed: int = 0, early_stopping: int | None = None,
        progress: bool = True, backend: str = "numpy", log: Callable | None = None,
        blas_threads: int | None = None) -> History:
    """Train `model` (x -> output, with `training=`) to minimise `loss_fn(output, y)` with `optimizer`
    (a gc.optim optimiser). Mini-batches of `batch_size`, reshuffled each epoch (seeded). With
    validation_data=(xv, yv), reports val_loss/val_accuracy per epoch; early_stopping=k stops after
    k epochs without a better val_loss and restores the best parameters. blas_threads limits BLAS
    threads while training (small matrices on a busy machine run faster on one; needs threadpoolctl)."""
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(blas_threads):
            return fit(model, loss_fn, optimizer, x, y, epochs, batch_size, validation_data, shuffle, seed,
                       early_stopping, progress, backend, log)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    if len(x) != len(y):
        raise GraphcError(f"fit: x has {len(x)} rows but y has {len(y)}")
    xp, yp = _placeholders(x, y)
    loss, acc = _outputs(model, loss_fn, xp, yp, True)
    train_fn = gc.function([xp, yp], [loss, acc], updates=optimizer.updates(loss, model.params), backend=backend)
    eval_fn = gc.function([xp, yp], list(_outputs(model, loss_fn, xp, yp, False)), backend=backend)
    hist = History(train_fn=train_fn, eval_fn=eval_fn)
    rng = np.random.default_rng(seed)
    best, best_snap, waited, t0 = np.inf, None, 0, time.perf_counter()
    steps = -(-len(x) // batch_size)
    bar = _bar(progress, steps * epochs, "training")
    for epoch in range(epochs):
        order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        if bar is not None:
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
        tl, ta = _run_epoch(train_fn, x, y, batch_size, order, bar)
        hist.add(loss=tl, accuracy=ta)
        if validation_data is not None:
            vl, va = evaluate_model(eval_fn, *validation_data)
            hist.add(val_loss=vl, val_accuracy=va)
            if bar is not None:
                bar.set_postfix(loss=f"{tl:.4f}", acc=f"{ta:.3f}", val_loss=f"{vl:.4f}", val_acc=f"{va:.3f}")
            if vl < best:
                best, best_snap, waited, hist.best_epoch = vl, _snapshot(model), 0, epoch
            else:
                waited += 1
        if log is not None:
            log(epoch, {k: v[-1] for k, v in hist.metrics.items()})
        if early_stopping is not None and validation_data is not None and waited >= early_stopping:
            break
    if bar is not None:
        bar.close()
    if early_stopping is not None and best_snap is not None:
        _restore(model, best_snap)
    hist.seconds = time.perf_counter() - t0
    return hist


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)
