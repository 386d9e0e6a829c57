"""Batch inference on Dask: `gd.map_batches(f, data)`.

The model travels as data, never as code: `gc.save` bytes (a zip of JSON and .npy arrays, loaded without
executing anything) become one key of the Dask graph, which the scheduler sends once to each worker
that runs a chunk. A worker compiles them once per process (cached by the SHA-256 of the saved members, behind a lock:
a worker's threads share one compiled function) and streams each chunk through it, `batch_size` rows
at a time. A chunk whose worker dies is recomputed by Dask elsewhere (its usual retries); the results
are the same, since each chunk's output depends only on its rows and the model.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import Counter

import numpy as np

from graphc.errors import GraphcError

_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()
#: compilations done in this process, by model hash (a test reads it on the workers)
COMPILES: Counter = Counter()


def _need_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as e:
        raise GraphcError(f"gd.map_batches needs dask[array] and distributed ({e}); pip install 'graphc[dist]'") \
            from None
    return dask, da


def model_bytes(f) -> bytes:
    """The gc.save bytes of a compiled function."""
    import graphc as gc
    fd, path = tempfile.mkstemp(suffix=".graphc")
    os.close(fd)
    try:
        gc.save(f, path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def digest_of(blob: bytes) -> str:
    """SHA-256 of a saved model's members (names and contents, not the zip's timestamps): the same graph
    and values give the same digest whenever they were saved."""
    import io
    import zipfile
    h = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0")
            h.update(z.read(name))
    return h.hexdigest()


def compiled(blob: bytes, digest: str, backend: str):
    """The function saved in `blob`, compiled once in this process (cached by `digest`)."""
    key = f"{digest}:{backend}"
    fn = _CACHE.get(key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _CACHE.get(key)
        if fn is None:
            import graphc as gc
            if digest_of(blob) != digest:
                raise GraphcError("gd.map_batches: the model bytes on this worker do not match their hash")
            fd, path = tempfile.mkstemp(suffix=".graphc")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(blob)
                fn = gc.function(gc.load(path), backend=backend)
            finally:
                os.unlink(path)
            _CACHE[key] = fn
            COMPILES[digest] += 1
    return fn


def run_block(block, blob, digest: str, backend: str, batch_size, in_dtype: str):
    """One chunk through the model, batch_size rows at a time (runs on a worker)."""
    fn = compiled(blob, digest, backend)
    x = np.asarray(block)
    if x.dtype != np.dtype(in_dtype) and np.can_cast(x.dtype, in_dtype, "same_kind"):
        x = x.astype(in_dtype)
    n = len(x)
    step = n if not batch_size else batch_size
    outs = [np.asarray(fn(x[i:i + step])) for i in range(0, n, step)] if n else []
    if not outs:
        return np.asarray(fn(x))
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


def _load_npy(path: str):
    return np.load(path, allow_pickle=False)


def _from_paths(da, dask, paths):
    blocks = []
    for p in paths:
        p = os.fspath(p)
        try:
            head = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise GraphcError(f"gd.map_batches: cannot read {p}: {e}") from None
        blocks.append(da.from_delayed(dask.delayed(_load_npy)(p), shape=head.shape, dtype=head.dtype))
    shapes = {b.shape[1:] for b in blocks}
    if len(shapes) > 1:
        raise GraphcError(f"gd.map_batches: the .npy files have different row shapes {sorted(shapes)}")
    return da.concatenate(blocks, axis=0)


def map_batches(f, data, batch_size=None, client=None):
    from graphc.function import Function
    dask, da = _need_dask()
    if not isinstance(f, Function):
        raise GraphcError(f"gd.map_batches: f must be a compiled function (gc.function), got {type(f).__name__}")
    g = f.user_graph
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise GraphcError(f"gd.map_batches: f must have one input and one output, it has {len(g.inputs)} and "
                          f"{len(g.outputs)}")
    if g.updates:
        raise GraphcError("gd.map_batches: f updates parameters; batch inference needs a function without updates")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise GraphcError(f"gd.map_batches: batch_size must be a positive int or None, got {batch_size!r}")
    x, y = g.inputs[0], g.outputs[0]
    if not x.shape or not y.shape or x.shape[0] != y.shape[0] or isinstance(x.shape[0], int):
        raise GraphcError(f"gd.map_batches: f must map a batch of rows to a batch of rows (input {x.type_str}, "
                          f"output {y.type_str}: both need the same symbolic first dim, e.g. placeholder shape "
                          "(None, ...))")
    if not all(isinstance(d, int) for d in y.shape[1:]):
        raise GraphcError(f"gd.map_batches: the output's dims after the first must be fixed, got {y.type_str}")
    if isinstance(data, (list, tuple)):
        if not data:
            raise GraphcError("gd.map_batches: an empty list of .npy paths")
        data = _from_paths(da, dask, data)
    elif not isinstance(data, da.Array):
        raise GraphcError(f"gd.map_batches: data must be a dask array or a list of .npy paths, got "
                          f"{type(data).__name__} (wrap an array with dask.array.from_array(a, chunks=rows))")
    if data.ndim != len(x.shape):
        raise GraphcError(f"gd.map_batches: data has {data.ndim} dims, f's input {x.name!r} has {len(x.shape)} "
                          f"({x.type_str})")
    for i, (d, want) in enumerate(zip(data.shape[1:], x.shape[1:]), start=1):
        if isinstance(want, int) and d != want:
            raise GraphcError(f"gd.map_batches: data has shape {data.shape}; f's input {x.name!r} needs "
                              f"dim {i} = {want} ({x.type_str})")
    if any(len(c) > 1 for c in data.chunks[1:]):
        data = data.rechunk({i: -1 for i in range(1, data.ndim)})
    blob = model_bytes(f)
    digest = digest_of(blob)
    model = dask.delayed(blob, pure=True, name=f"graphc-model-{digest[:16]}")
    out_tail = tuple(int(d) for d in y.shape[1:])
    k, j = data.ndim, len(y.shape)
    kw = {}
    if j < k:
        kw["drop_axis"] = list(range(j, k))
    elif j > k:
        kw["new_axis"] = list(range(k, j))
    out = data.map_blocks(run_block, model, digest, f.backend_name, batch_size, str(x.dtype),
                          dtype=np.dtype(y.dtype), chunks=(data.chunks[0],) + tuple((d,) for d in out_tail), **kw)
    if client is not None:   # computed on that cluster (in the background); still a Dask array
        out = client.persist(out)
    return out
