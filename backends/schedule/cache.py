"""The native backends' one on-disk cache of compiled code: llvm's object code, cuda's PTX/cubin, the
emulation's shared libraries and precompiled header.

Layout. $GRAPHC_CACHE_DIR/<sub>/<entry> (default ~/.cache/graphc/<sub>/...), one `sub` per kind of
code ("llvm", "cuda", "cuda_emulated"). Entries are content-addressed: `key(...)` hashes everything
that goes into a build (source, compiler identity and flags, target) with the cache FORMAT and the
graphc version, so a changed input is a new entry, never a stale hit.

Entries. A *blob* (object code, PTX, a manifest) is one file: MAGIC (format) + SHA-256 + payload.
Files that must stay as they are on disk (a .so to dlopen, a .gch for g++) cannot carry a header: a
manifest blob lists each one's size and SHA-256 (or that it must be absent) and is written after them.

Writes. Every write is a temporary file in the entry's directory renamed over it, files before their
manifest, so concurrent processes only ever see whole files (two writers of one key both end with a
whole file; a .so replaced between its check and its dlopen is another whole build of the same key).

The damaged-entry policy (one, for every backend). An entry is checked on every lookup before it is
used. One that is missing, of another format (an older graphc's, a header-less one) or damaged
(truncated, corrupt, a manifest whose files do not match) is a miss: it is never trusted, never
dlopen'ed, never handed to a compiler. It is recompiled and the rebuild is renamed over it; the
damaged file is *not* deleted first, since another process may be about to dlopen or #include a
file of the same name that it already checked (deleting would also race with a concurrent rebuild).
The one removal: a stray file that a manifest lists as absent (e.g. an unlisted .gch). Every such
miss counts in stats["corrupt"]; the first damaged entry of the process (current format, wrong
contents: something really went wrong) also gives one RuntimeWarning, an entry of another format
(expected after an upgrade) none.

Unusable directory. Where GRAPHC_CACHE_DIR cannot be created or written (read-only, under a regular
file, disk full), entries are still read from it when readable (a pre-filled read-only cache is used
without a warning) and written to a private temporary directory of this process, removed at exit,
with one RuntimeWarning per directory; if that fails too, store_* raise a GraphcError saying so.
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

import graphc
from graphc.errors import GraphcError

FORMAT = 2  # bump when the layout or the meaning of an entry changes: older entries are then rebuilt
MAGIC = b"GCACHE%d\n" % FORMAT   # 8 bytes
_DIGEST = 32
stats = {"hits": 0, "misses": 0, "corrupt": 0, "disk_errors": 0}
_unusable: dict[str, OSError | None] = {}  # configured directory -> why it cannot be written (None: usable)
_private: list[str] = []
_hashed: dict[str, tuple] = {}  # path -> (stat signature, fingerprint) of files this process hashed
_warned: list[str] = []         # the damaged entry this process warned about (one warning per process)
_lock = threading.Lock()


# ---- keys ---------------------------------------------------------------------------------------------

def key(*parts: str | bytes) -> str:
    """The content address of a build: a hash of every part (source, compiler identity, flags,
    target), the cache format and the graphc version. Parts are length-prefixed, so no two different
    part lists hash alike."""
    h = hashlib.sha256()
    for p in (MAGIC, getattr(graphc, "__version__", "0"), *parts):
        b = p if isinstance(p, bytes) else str(p).encode()
        h.update(b"%d:" % len(b))
        h.update(b)
    return h.hexdigest()[:40]


def tool_identity(path: str | None) -> str:
    """What a key records about an external compiler or library: its resolved path, size and mtime
    (an upgrade in place changes them; no subprocess is run)."""
    if not path:
        return "none"
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return f"{real}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return real


# ---- directories ----------------------------------------------------------------------------------------

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
                      f"in a private temporary directory for this process instead", RuntimeWarning, stacklevel=3)
    _unusable[path] = err


def _damaged(path: str, why: str) -> None:
    """Count a damaged entry; warn about the first one of the process."""
    stats["corrupt"] += 1
    with _lock:
        if _warned:
            return
        _warned.append(path)
    warnings.warn(f"graphc: damaged cache entry {path}: {why}; it is ignored and rebuilt (later damaged "
                  f"entries are rebuilt without a warning; graphc.backends.schedule.cache.stats['corrupt'] "
                  f"counts them)", RuntimeWarning, stacklevel=4)


# ---- files ------------------------------------------------------------------------------------------------

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
    """The payload of a blob, or None when its header or checksum is wrong (damaged or another format)."""
    return _check(blob)[0]


def _check(blob: bytes) -> tuple[bytes | None, str]:
    """(payload, "") for a good blob, else (None, what is wrong with it)."""
    n = len(MAGIC)
    head, digest, payload = blob[:n], blob[n:n + _DIGEST], blob[n + _DIGEST:]
    if head != MAGIC:
        return None, "format"
    if len(digest) != _DIGEST or hashlib.sha256(payload).digest() != digest:
        return None, "truncated or corrupt, its checksum does not match"
    return payload, ""


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
    payload, why = _check(blob)
    if why == "format":
        stats["corrupt"] += 1   # another format: a miss, counted, no warning
    elif why:
        _damaged(path, why)
    return payload


# ---- blobs ------------------------------------------------------------------------------------------------

def load_blob(sub: str, name: str, counts: dict | None = None) -> bytes | None:
    """The checked payload of blob `name`, or None (missing, or damaged: the caller rebuilds it). Hits and
    misses are counted in `counts` (default: `stats`; damaged entries always in stats["corrupt"])."""
    counts = stats if counts is None else counts
    for d in read_dirs(sub):
        payload = _read_blob(os.path.join(d, name))
        if payload is not None:
            counts["hits"] += 1
            return payload
    counts["misses"] += 1
    return None


def store_blob(sub: str, name: str, payload: bytes) -> None:
    """Write blob `name` atomically (in the private directory when the configured one fails)."""
    _store(sub, [(name, pack(bytes(payload)))])


# ---- file sets under a manifest -----------------------------------------------------------------------

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
    path = os.path.join(d, manifest)
    payload = _read_blob(path)
    if payload is None:
        return False
    try:
        listing = json.loads(payload)
    except ValueError:
        _damaged(path, "unreadable manifest")
        return False
    base = os.path.dirname(path)
    for name, want in listing.items():
        if _fingerprint(os.path.join(base, name)) != want:
            _damaged(os.path.join(base, name), "does not match its manifest")
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


def _store(sub: str, writes: list[tuple[str, bytes]], removals=()) -> str:
    d = cache_dir(sub)
    try:
        _write_all(d, writes, removals)
    except OSError as e:
        if d != configured_dir(sub):
            raise _nowhere(sub, e) from e
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
