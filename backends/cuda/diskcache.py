"""The CUDA backends' on-disk cache (PTX/cubin, the emulation's shared libraries and precompiled
header), to the standard of backends/llvm/cache.py.

- Every entry is checked before use. A *blob* (PTX, cubin, a manifest) is one file: MAGIC (format
  version) + SHA-256 + payload. A file that must stay as it is on disk (a .so to dlopen, a .gch for
  g++) cannot carry a header, so a manifest blob lists each file's size and SHA-256 and is written
  after them. A missing, truncated, corrupt or other-format entry is a miss and is rebuilt: never
  trusted, never dlopen'ed.
- Every write is a temporary file renamed over the entry in the same directory (files before their
  manifest), so concurrent processes only ever see whole files: a .so replaced between its check and
  its dlopen is another whole build of the same key. A damaged entry is not deleted but replaced by
  its rebuild, since another process may be about to dlopen or #include the old file (the one
  removal: a stray file that a manifest says must not exist, such as an unlisted .gch).
- GRAPHC_CACHE_DIR relocates it (default ~/.cache/graphc). Where that directory cannot be created or
  written (read-only, under a regular file, ...), entries are still read from it when readable (a
  pre-filled read-only cache) and written to a private temporary directory for this process, removed
  at exit, with one RuntimeWarning per directory; if that fails too, a GraphcError says so.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings

from graphc.errors import GraphcError

FORMAT = 1  # bump when the layout or the meaning of an entry changes: older entries are then rebuilt
MAGIC = b"GCCUDA%d\n" % FORMAT
stats = {"hits": 0, "misses": 0, "corrupt": 0, "disk_errors": 0}
_unusable: dict[str, OSError | None] = {}  # configured directory -> why it cannot be written (None: usable)
_private: list[str] = []
_hashed: dict[str, tuple] = {}  # path -> (stat signature, fingerprint) of files this process hashed
_lock = threading.Lock()


def root() -> str:
    return os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphc")


def configured_dir(sub: str) -> str:
    return os.path.join(root(), sub)


def cache_dir(sub: str) -> str:
    """Where entries of `sub` are written: $GRAPHC_CACHE_DIR/<sub> (default ~/.cache/graphc/<sub>) when
    it can be created and written, else this process's private temporary directory."""
    path = configured_dir(sub)
    return private_dir(sub) if _why_unusable(path) else path


def read_dirs(sub: str) -> list[str]:
    """Where entries of `sub` are looked up, in order (reading probes nothing: a read-only cache
    that holds every entry needed is used without a warning)."""
    path = configured_dir(sub)
    return [path, private_dir(sub)] if _unusable.get(path) else [path]


def private_dir(sub: str) -> str:
    """This process's own temporary cache directory (created on first use, removed at exit)."""
    try:
        with _lock:
            if not _private:
                d = tempfile.mkdtemp(prefix="graphc-cache-")
                atexit.register(shutil.rmtree, d, True)
                _private.append(d)
        path = os.path.join(_private[0], sub)
        os.makedirs(path, exist_ok=True)
        return path
    except OSError as e:
        raise _nowhere(sub, e) from e


def _nowhere(sub: str, err: OSError) -> GraphcError:
    return GraphcError(f"graphc cannot write compiled code anywhere: the cache directory "
                       f"{configured_dir(sub)} ({_unusable.get(configured_dir(sub))}) and the temporary "
                       f"directory ({err}) both failed; set GRAPHC_CACHE_DIR to a writable directory")


def _why_unusable(path: str) -> OSError | None:
    """Why `path` cannot be written (probed once per process by creating a file), or None."""
    if path not in _unusable:
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
            os.close(fd)
            os.unlink(probe)
            _unusable[path] = None
        except OSError as e:
            _mark_unusable(path, e)
    return _unusable[path]


def _mark_unusable(path: str, err: OSError) -> None:
    stats["disk_errors"] += 1
    if not _unusable.get(path):
        warnings.warn(f"graphc: cache directory {path} cannot be written ({err}); compiled code is cached "
                      f"in a private temporary directory for this process instead", RuntimeWarning)
    _unusable[path] = err


def atomic_write(path: str, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file in the same directory renamed over it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # concurrent writers of the same entry both end with a whole file
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def pack(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).digest() + payload


def unpack(blob: bytes) -> bytes | None:
    """The payload of a blob, or None when its header or checksum is wrong (corrupt, truncated, stale)."""
    n = len(MAGIC)
    head, digest, payload = blob[:n], blob[n:n + 32], blob[n + 32:]
    if head != MAGIC or len(digest) != 32 or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _read_blob(path: str) -> bytes | None:
    blob = _read(path)
    if blob is None:
        return None
    payload = unpack(blob)
    if payload is None:
        stats["corrupt"] += 1
    return payload


def load_blob(sub: str, name: str) -> bytes | None:
    """The checked payload of blob `name`, or None (missing, or damaged: the caller rebuilds it)."""
    for d in read_dirs(sub):
        payload = _read_blob(os.path.join(d, name))
        if payload is not None:
            stats["hits"] += 1
            return payload
    stats["misses"] += 1
    return None


def store_blob(sub: str, name: str, payload: bytes) -> None:
    """Write blob `name` atomically (in the private directory when the configured one fails)."""
    _store(sub, [(name, pack(payload))])


def find_files(sub: str, manifest: str) -> str | None:
    """The directory holding the entry whose manifest is `manifest` with every file it lists present
    and matching its checksum (and every file it lists as absent absent), or None."""
    for d in read_dirs(sub):
        if _verified(d, manifest):
            stats["hits"] += 1
            return d
    stats["misses"] += 1
    return None


def _verified(d: str, manifest: str) -> bool:
    payload = _read_blob(os.path.join(d, manifest))
    if payload is None:
        return False
    try:
        listing = json.loads(payload)
    except ValueError:
        stats["corrupt"] += 1
        return False
    base = os.path.dirname(os.path.join(d, manifest))
    for name, want in listing.items():
        if _fingerprint(os.path.join(base, name)) != want:
            stats["corrupt"] += 1
            return False
    return True


def _fingerprint(path: str) -> list | None:
    """[size, SHA-256] of a file, None if unreadable. A file this process already hashed and that is
    unchanged since (same inode, size and mtime) is not read again: the .gch is 23 MB."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # taken before the read: a change during it
    seen = _hashed.get(path)                                  # shows up as a new signature next time
    if seen and seen[0] == sig:
        return seen[1]
    data = _read(path)
    if data is None:
        return None
    fp = [len(data), hashlib.sha256(data).hexdigest()]
    _hashed[path] = (sig, fp)
    return fp


def store_files(sub: str, manifest: str, files: dict[str, bytes | None]) -> str:
    """Write `files` (name relative to the manifest's directory -> bytes, or None: must not exist), then
    their manifest, each atomically; returns the directory the entry is in (the configured one, or the
    private one if that fails)."""
    listing = {n: None if b is None else [len(b), hashlib.sha256(b).hexdigest()] for n, b in files.items()}
    base = os.path.dirname(manifest)
    writes = [(os.path.join(base, n), b) for n, b in files.items() if b is not None]
    removals = [os.path.join(base, n) for n, b in files.items() if b is None]
    return _store(sub, writes + [(manifest, pack(json.dumps(listing, sort_keys=True).encode()))], removals)


def _store(sub: str, writes: list[tuple[str, bytes]], removals: list[str] = ()) -> str:
    d = cache_dir(sub)
    try:
        _write_all(d, writes, removals)
    except OSError as e:
        if d != configured_dir(sub):
            raise
        _mark_unusable(d, e)
        d = private_dir(sub)
        try:
            _write_all(d, writes, removals)
        except OSError as e2:
            raise _nowhere(sub, e2) from e2
    return d


def _write_all(d: str, writes: list[tuple[str, bytes]], removals) -> None:
    for name in removals:
        try:
            os.remove(os.path.join(d, name))
        except FileNotFoundError:
            pass
    for name, data in writes:
        atomic_write(os.path.join(d, name), data)
