"""The collective graph ops: `allreduce_start` (packs a bucket of tensors, starts a non-blocking MPI
reduction, returns a token) and `allreduce_wait` (waits for it and returns the reduced tensors).

They run on the host under every backend (`host_only`): a native backend runs its kernels in segments
and calls these between them, so a bucket's reduction starts as soon as the schedule has computed its
gradients and overlaps the kernels that follow, and the wait sits just before the updates that read it.
Every `allreduce_wait` takes all the tokens of its `gd.allreduce` call (in bucket order) as inputs, so any
topological order issues every start before the first wait.
"""
from __future__ import annotations

import time

import numpy as np

from graphc import ops as F
from graphc import shapes as _sh
from graphc.errors import GraphcError
from graphc.ir import Op, Trait, apply, register

from ._world import world

_HOST = "MPI collective through mpi4py (a non-blocking reduction on the host between native segments)"


def tree_sum(rows: list) -> np.ndarray:
    """Sum of `rows` by a fixed pairwise tree: adjacent pairs level by level (an odd last one carried up).
    The same rows give the same bits wherever and however often it runs; a block of 2^k adjacent aligned
    rows is summed exactly as the whole tree sums it (what deterministic mode relies on)."""
    rows = list(rows)
    if not rows:
        raise GraphcError("tree_sum of nothing")
    while len(rows) > 1:
        nxt = [rows[i] + rows[i + 1] for i in range(0, len(rows) - 1, 2)]
        if len(rows) % 2:
            nxt.append(rows[-1])
        rows = nxt
    return np.array(rows[0], copy=True)


@register
class AllreduceStart(Op):
    name = "allreduce_start"
    traits = Trait.INDEXING | Trait.IMPURE | Trait.FRESH
    host_only = _HOST
    differentiable = False   # its output is a token (int64)
    schedule_early = True    # the memory scheduler places it as soon as its inputs are computed

    def infer(self, inputs, reduce, bucket):
        return [((), "int64")]

    def impl(self, *arrays, reduce, bucket):
        w = world()
        dtype = np.result_type(*arrays) if arrays else np.float32
        flat = np.concatenate([np.ascontiguousarray(a, dtype).reshape(-1) for a in arrays]) if arrays \
            else np.zeros(0, dtype)
        entry = {"send": flat, "shapes": [a.shape for a in arrays], "reduce": reduce, "bucket": bucket,
                 "t0": time.perf_counter(), "req": None, "gather": False}
        if w.size > 1:
            MPI = w.MPI
            if w.deterministic:   # gather every rank's bucket, summed in rank order by a fixed tree
                entry["recv"] = np.empty((w.size, flat.size), flat.dtype)
                entry["gather"] = True
                entry["req"] = w.comm.Iallgather(flat, entry["recv"])
            else:
                entry["recv"] = np.empty_like(flat)
                entry["req"] = w.comm.Iallreduce(flat, entry["recv"], op=MPI.SUM)
            w.progress()   # also moves the earlier buckets along
        else:
            entry["recv"] = flat
        return np.array(w.new_token(entry), np.int64)


@register
class AllreduceWait(Op):
    name = "allreduce_wait"
    n_outputs = -1
    traits = Trait.INDEXING | Trait.IMPURE | Trait.FRESH
    host_only = _HOST

    def infer(self, inputs, n_tokens, index, reduce):
        return [(t.shape, t.dtype) for t in inputs[n_tokens:]]

    def impl(self, *args, n_tokens, index, reduce):
        w = world()
        e = w.take(int(args[index]))
        t = time.perf_counter()
        w.wait(e["req"], f"gd.allreduce (bucket {e['bucket']}, {e['send'].nbytes} bytes)")
        now = time.perf_counter()
        if e["req"] is not None:
            w.stats.add(e["send"].nbytes, (e.get("done") or now) - e["t0"], now - t)
        total = tree_sum(list(e["recv"])) if e["gather"] else e["recv"]
        if reduce == "mean" and w.size > 1:
            total = total / np.asarray(w.size, total.dtype)
        out, pos = [], 0
        for shape in e["shapes"]:
            n = int(np.prod(shape, dtype=np.int64))
            out.append(np.array(total[pos:pos + n].reshape(shape), copy=True))
            pos += n
        return tuple(out)

    def vjp(self, node, gouts):
        """d/dx of a mean (sum) over ranks, with every rank's loss summed: the same reduction of the
        cotangents (each rank's input reaches every rank's output)."""
        n = node.attrs["n_tokens"]
        gs = [g if g is not None else F.zeros_like(o) for g, o in zip(gouts, node.outputs)]
        return [None] * n + list(allreduce(gs, op=node.attrs["reduce"]))


def _nbytes(t) -> float:
    n = _sh.size(t.shape)
    return float(n) * np.dtype(t.dtype).itemsize if isinstance(n, int) else float("inf")


DEFAULT_BUCKET_BYTES = 2 << 20


def allreduce(tensors, op: str = "mean", bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list:
    """The sum (op="sum") or mean (op="mean") over every process of each tensor in `tensors`, as graph
    nodes that run inside the compiled call (typically `gd.allreduce(gc.grad(loss, params))`).

    The tensors are packed into buckets of about `bucket_bytes` (taken from the end of the list, where
    back-propagation produces gradients first); each bucket is one non-blocking MPI reduction started as
    soon as its tensors are computed and waited for only by the nodes that read its results (the
    optimiser's updates), so reductions overlap the rest of the backward pass. In deterministic mode
    (gd.init(deterministic=True)) a bucket is gathered and summed in rank order by a fixed tree: the same
    bits on every rank and in every run with this many processes. Its gradient is the same reduction of
    the cotangents. A world of one returns copies of the tensors."""
    if op not in ("mean", "sum"):
        raise GraphcError(f"gd.allreduce: op must be 'mean' or 'sum', got {op!r}")
    single = not isinstance(tensors, (list, tuple))
    ts = [F.as_tensor(t) for t in ([tensors] if single else tensors)]
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise GraphcError(f"gd.allreduce: bucket_bytes must be a positive int, got {bucket_bytes!r}")
    for i, t in enumerate(ts):
        if op == "mean" and np.dtype(t.dtype).kind != "f":
            raise GraphcError(f"gd.allreduce: tensor {i} ({t.label}: {t.type_str}) is not floating point; "
                              "a mean needs floats (op='sum' reduces integers)")
        if np.dtype(t.dtype).kind == "b":
            raise GraphcError(f"gd.allreduce: tensor {i} ({t.label}) is boolean; cast it first")
    if not ts:
        return []
    buckets, cur, size = [], [], 0.0
    for i in reversed(range(len(ts))):   # gradients of the last layers are computed first
        nb = _nbytes(ts[i])
        if cur and (ts[cur[0]].dtype != ts[i].dtype or size + nb > bucket_bytes):
            buckets.append(cur)
            cur, size = [], 0.0
        cur.append(i)
        size += nb
    buckets.append(cur)
    tokens = [apply(AllreduceStart, *[ts[i] for i in b], reduce=op, bucket=k) for k, b in enumerate(buckets)]
    out = [None] * len(ts)
    for k, b in enumerate(buckets):
        res = apply(AllreduceWait, *tokens, *[ts[i] for i in b], n_tokens=len(tokens), index=k, reduce=op)
        for i, r in zip(b, res):
            out[i] = r
    return out[0] if single else out
