"""On-disk cache of compiled object code: key = hash(IR of the specialised graph, target, versions).

Entries are written to a temporary file and renamed (atomic, so concurrent processes never see half a
file); each holds a SHA-256 of its payload, so a corrupt entry is detected, removed and rebuilt.
GRAPHC_CACHE_DIR relocates it (default ~/.cache/graphc/llvm); a read-only or unusable directory
falls back to an in-memory cache for this process.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import graphc

_MAGIC = b"GCLLVM2\n"  # 2: entries written by 1 may hold the empty module's object
_memory: dict[str, bytes] = {}
stats = {"hits": 0, "misses": 0, "corrupt": 0, "disk_errors": 0}


def cache_dir() -> str:
    return os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphc", "llvm")


def key(ir: str, target: str) -> str:
    h = hashlib.sha256()
    for part in (ir, target, getattr(graphc, "__version__", "0"), _MAGIC.decode()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _path(k: str) -> str:
    return os.path.join(cache_dir(), k[:2], k + ".o")


def load(k: str) -> bytes | None:
    """Cached object code for key `k`, or None (missing or corrupt: a corrupt file is removed)."""
    if k in _memory:
        stats["hits"] += 1
        return _memory[k]
    try:
        with open(_path(k), "rb") as fh:
            blob = fh.read()
    except OSError:
        stats["misses"] += 1
        return None
    head, digest, payload = blob[:len(_MAGIC)], blob[len(_MAGIC):len(_MAGIC) + 32], blob[len(_MAGIC) + 32:]
    if head != _MAGIC or hashlib.sha256(payload).digest() != digest or not payload:
        stats["corrupt"] += 1
        try:
            os.remove(_path(k))
        except OSError:
            pass
        return None
    stats["hits"] += 1
    _memory[k] = payload
    return payload


def store(k: str, data: bytes) -> None:
    """Write atomically (temp file + rename); on any OS error keep it in memory only."""
    data = bytes(data)
    _memory[k] = data
    path = _path(k)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_MAGIC + hashlib.sha256(data).digest() + data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        stats["disk_errors"] += 1


def clear_memory() -> None:
    _memory.clear()
