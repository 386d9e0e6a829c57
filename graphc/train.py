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
        blas_threads: int | None = None, distributed: bool = False, checkpoint: str | None = None,
        checkpoint_every: int | None = None) -> History:
    """Train `model` (x -> output, with `training=`) to minimise `loss_fn(output, y)` with `optimizer`
    (a gc.optim optimiser). Mini-batches of `batch_size`, reshuffled each epoch (seeded). With
    validation_data=(xv, yv), reports val_loss/val_accuracy per epoch; early_stopping=k stops after
    k epochs without a better val_loss and restores the best parameters. blas_threads limits BLAS
    threads while training (small matrices on a busy machine run faster on one; needs threadpoolctl).

    distributed=True (run under `graphc launch -n N`; see graphc.distributed): every process holds x and
    y; each global batch of `batch_size` rows is sharded by rank, gradients are averaged across processes
    (gd.allreduce, or the micro-shard tree in deterministic mode), rank 0 shows the progress bar and calls
    `log`, and every rank gets the same history (metrics averaged over all processes). batch_size must be
    a multiple of the number of processes (of micro_shards in deterministic mode); a last short batch
    is skipped, so runs on any number of processes see the same batches. checkpoint=path with checkpoint_every=k: rank 0 saves
    parameters, optimiser state and progress every k steps (gc.save); a run started with the same
    arguments resumes from that file (in deterministic mode bit-identical to an uninterrupted run)."""
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(blas_threads):
            return fit(model, loss_fn, optimizer, x, y, epochs, batch_size, validation_data, shuffle, seed,
                       early_stopping, progress, backend, log, distributed=distributed, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every)
    if distributed:
        return _fit_distributed(model, loss_fn, optimizer, x, y, epochs, batch_size, validation_data, shuffle,
                                seed, early_stopping, progress, backend, log, checkpoint, checkpoint_every)
    if checkpoint is not None or checkpoint_every is not None:
        raise GraphcError("fit: checkpoint= and checkpoint_every= need distributed=True (a world of one is fine)")
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
        _plateau_step(optimizer, hist)
        if log is not None:
            log(epoch, {k: v[-1] for k, v in hist.metrics.items()})
        if early_stopping is not None and validation_data is not None and waited >= early_stopping:
            break
    return _finish(bar, early_stopping, best_snap, model, hist, t0)


def _fit_distributed(model, loss_fn, optimizer, x, y, epochs, batch_size, validation_data, shuffle, seed,
                     early_stopping, progress, backend, log, checkpoint, checkpoint_every) -> History:
    import graphc.distributed as gd
    w = gd._world.world()
    P, rank = w.size, w.rank
    unit = w.micro_shards if w.deterministic else P
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % unit:
        what = f"micro_shards={unit} (deterministic mode)" if w.deterministic else f"the {P} processes"
        raise GraphcError(f"fit(distributed=True): batch_size={batch_size!r} must be a multiple of {what}")
    if checkpoint_every is not None and (checkpoint is None or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise GraphcError("fit: checkpoint_every=k needs a positive int k and checkpoint=path")
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    if len(x) != len(y):
        raise GraphcError(f"fit: x has {len(x)} rows but y has {len(y)}")
    xp, yp = _placeholders(x, y)
    loss, acc = _outputs(model, loss_fn, xp, yp, True)
    buffers = list(getattr(model, "buffers", []))
    step = gd.TrainStep([xp, yp], loss, model.params, optimizer, outputs=[acc], backend=backend)
    eval_fn = gc.function([xp, yp], list(_outputs(model, loss_fn, xp, yp, False)), backend=backend)
    state = step.state + [b for b in buffers if all(b is not s for s in step.state)]
    gd.broadcast_parameters(state)
    hist = History(train_fn=step, eval_fn=eval_fn)
    config = {"batch_size": batch_size, "seed": seed, "n": len(x), "shuffle": bool(shuffle)}
    epoch0, batch0, gstep, sums = 0, 0, 0, [0.0, 0.0, 0.0]
    best, best_snap, waited = np.inf, None, 0
    if checkpoint is not None:
        got = gd.load_checkpoint(checkpoint, state)
        if got is not None:
            gstep, meta = got
            if meta.get("config") != config:
                raise GraphcError(f"fit: checkpoint {checkpoint} was written by a run with {meta.get('config')}, "
                                  f"this one has {config}")
            epoch0, batch0 = meta["epoch"], meta["batch"]
            sums = list(meta["sums"]) if rank == 0 else [0.0, 0.0, 0.0]   # the partial epoch, all ranks' rows
            hist.metrics = {k: list(v) for k, v in meta["history"].items()}
            best, waited, hist.best_epoch = meta["best"], meta["waited"], meta["best_epoch"]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    starts = list(range(0, len(x) - batch_size + 1, batch_size))
    bar = _bar(progress and rank == 0, len(starts) * epochs, "training")
    if bar is not None and gstep:
        bar.update(min(gstep, len(starts) * epochs))
    save_after_epoch = False

    def save(next_epoch, next_batch, partial):
        partial = gd.gather_sum(np.array(partial, np.float64), "fit: checkpoint")   # every rank's, summed
        gd.save_checkpoint(checkpoint, state, gstep, {
            "config": config, "epoch": next_epoch, "batch": next_batch, "sums": [float(v) for v in partial],
            "history": hist.metrics, "best": best, "waited": waited, "best_epoch": hist.best_epoch})

    for epoch in range(epochs):
        order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        if epoch < epoch0:
            continue
        if bar is not None:
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
        for bi, start in enumerate(starts):
            if epoch == epoch0 and bi < batch0:
                continue
            idx = order[start:start + batch_size]
            if len(idx) == batch_size:   # a last short batch is skipped (whatever the process count)
                local = gd.shard(idx)
                lo, ac = (float(v) for v in step(x[local], y[local]))
                sums[0] += lo * len(local)
                sums[1] += ac * len(local)
                sums[2] += len(local)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{lo:.4f}", acc=f"{ac:.3f}")
            gstep += 1
            if checkpoint_every and gstep % checkpoint_every == 0:
                if bi + 1 < len(starts):
                    save(epoch, bi + 1, sums)
                else:   # the last step of the epoch: saved with the epoch's metrics below
                    save_after_epoch = True
        tot = gd.gather_sum(np.array(sums, np.float64), "fit: epoch metrics")
        n = max(tot[2], 1.0)
        hist.add(loss=tot[0] / n, accuracy=tot[1] / n)
        sums = [0.0, 0.0, 0.0]
        if buffers and P > 1:   # batch statistics: every rank keeps rank 0's
            gd.broadcast_parameters(buffers)
        if validation_data is not None:
            xv, yv = validation_data
            parts = np.array_split(np.arange(len(xv)), P)[rank]
            vl, va = evaluate_model(eval_fn, xv[parts], yv[parts]) if len(parts) else (0.0, 0.0)
            tv = gd.gather_sum(np.array([vl * len(parts), va * len(parts), len(parts)], np.float64), "fit: validation")
            vl, va = tv[0] / max(tv[2], 1.0), tv[1] / max(tv[2], 1.0)
            hist.add(val_loss=vl, val_accuracy=va)
            if bar is not None:
                bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}", val_loss=f"{vl:.4f}", val_acc=f"{va:.3f}")
            if vl < best:
                best, best_snap, waited, hist.best_epoch = vl, _snapshot(model), 0, epoch
            else:
                waited += 1
        if save_after_epoch:
            save(epoch + 1, 0, [0.0, 0.0, 0.0])
            save_after_epoch = False
        _plateau_step(optimizer, hist)   # every rank has the same history: the same decision
        if log is not None and rank == 0:
            log(epoch, {k: v[-1] for k, v in hist.metrics.items()})
        if early_stopping is not None and validation_data is not None and waited >= early_stopping:
            break
    return _finish(bar, early_stopping, best_snap, model, hist, t0)


def _finish(bar, early_stopping, best_snap, model, hist: History, t0: float) -> History:
    """End of training: close the progress bar, restore the best parameters under early stopping, time."""
    if bar is not None:
        bar.close()
    if early_stopping is not None and best_snap is not None:
        _restore(model, best_snap)
    hist.seconds = time.perf_counter() - t0
    return hist


def _plateau_step(optimizer, hist: History) -> None:
    """A ReduceLROnPlateau schedule on the optimiser (or on the one a wrapper such as Polyak holds) is
    stepped once per epoch: mode 'min' watches val_loss (loss without validation data), mode 'max'
    val_accuracy (accuracy)."""
    from .optim import ReduceLROnPlateau
    opt = optimizer
    while opt is not None:
        sched = getattr(opt, "schedule", None)
        if isinstance(sched, ReduceLROnPlateau):
            key = "loss" if sched.mode == "min" else "accuracy"
            sched.step(hist[("val_" + key) if "val_" + key in hist.metrics else key][-1])
            return
        opt = getattr(opt, "optimizer", None)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)
