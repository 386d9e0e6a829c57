"""The CUDA backends' entries in the shared on-disk cache (graphc.backends.schedule.cache): a corrupt, truncated or
other-format entry (the emulation's .so, its precompiled header, nvcc's PTX) is detected and rebuilt,
never dlopen'ed or handed to g++; an unwritable or uncreatable GRAPHC_CACHE_DIR falls back to a
private directory with correct results; a read-only pre-filled cache is still used; two processes
compiling the same graph at once share the cache. Results are checked against NumPy."""
from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest

import graphc as gc
from graphc.backends.cuda import compiler
from graphc.backends.schedule import cache as diskcache  # (the fixture `cache` is a cache directory)
from graphc.backends.cuda.compiler import compile_cuda, nvcc_path, nvrtc_library
from conftest import backend_or_skip

W = (np.arange(12 * 5, dtype=np.float32).reshape(12, 5) - 30) / 40
A = np.linspace(-1, 1, 4 * 12, dtype=np.float32).reshape(4, 12)
PTX_SRC = 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 2.0f * y[threadIdx.x]; }\n'
OLD_MAGIC = b"GCCUDA0\n"
needs_cuda_compiler = pytest.mark.skipif(not (nvcc_path() or nvrtc_library()),
                                         reason="no CUDA compiler here (neither nvcc nor libnvrtc)")


def expected(scale: float) -> np.ndarray:
    h = np.tanh(A @ W) * scale
    e = np.exp(h - h.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def run_emulated(scale: float = 2.0) -> None:
    """Compile softmax(tanh(x @ w) * scale) for cuda-emulated (a matmul, a fused and a softmax
    kernel) and check it against NumPy."""
    x = gc.placeholder("x", (None, 12))
    w = gc.parameter("w", W)
    f = gc.function([x], gc.softmax(gc.tanh(x @ w) * scale, axis=1), backend="cuda-emulated")
    np.testing.assert_allclose(f(A), expected(scale), rtol=1e-5, atol=1e-6)


def has_cuda_compiler() -> bool:
    return bool(nvcc_path() or nvrtc_library())


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A cache filled once (PCH, the graph's .so, PTX), copied by each test that damages it."""
    backend_or_skip("cuda-emulated")
    root = tmp_path_factory.mktemp("golden")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHC_CACHE_DIR", str(root))
        run_emulated()
        if has_cuda_compiler():
            compile_cuda(PTX_SRC, "sm_80")
    return root


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch):
    monkeypatch.setattr(diskcache, "stats", dict.fromkeys(diskcache.stats, 0))
    monkeypatch.setattr(diskcache, "_warned", [])  # the once-per-process damaged-entry warning


@pytest.fixture
def cache(tmp_path, golden, monkeypatch):
    """A private copy of the golden cache, as GRAPHC_CACHE_DIR."""
    root = tmp_path / "cache"
    shutil.copytree(golden, root)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(root))
    return root


@pytest.fixture
def runs(monkeypatch):
    """The compiler runs made during the test: 'pch' / 'so' (g++) and 'ptx' (nvcc or NVRTC)."""
    seen = []
    real_run, real_nvcc, real_nvrtc = subprocess.run, compiler._nvcc, compiler._nvrtc

    def run(cmd, *a, **k):
        if "++" in os.path.basename(str(cmd[0])):
            seen.append("pch" if "c++-header" in cmd else "so")
        return real_run(cmd, *a, **k)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(compiler, "_nvcc", lambda *a: seen.append("ptx") or real_nvcc(*a))
    monkeypatch.setattr(compiler, "_nvrtc", lambda *a: seen.append("ptx") or real_nvrtc(*a))
    return seen


@pytest.fixture
def loads(monkeypatch):
    """The bytes of every shared library dlopen'ed during the test."""
    seen = []
    real = ctypes.CDLL

    def cdll(path, *a, **k):
        with open(path, "rb") as f:
            seen.append((str(path), f.read()))
        return real(path, *a, **k)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    return seen


def listing(manifest: str) -> dict:
    """A manifest's file list, parsed here independently of diskcache: MAGIC + SHA-256 + JSON."""
    with open(manifest, "rb") as f:
        blob = f.read()
    assert blob[:8] == diskcache.MAGIC and hashlib.sha256(blob[40:]).digest() == blob[8:40]
    return json.loads(blob[40:])


def verifies(manifest: str) -> bool:
    """Every file the manifest lists matches its size and SHA-256 (or is absent where listed so)."""
    for name, want in listing(manifest).items():
        path = os.path.join(os.path.dirname(manifest), name)
        if want is None:
            if os.path.exists(path):
                return False
            continue
        data = open(path, "rb").read()
        if [len(data), hashlib.sha256(data).hexdigest()] != want:
            return False
    return True


def one(pattern) -> str:
    (hit,) = glob.glob(str(pattern))
    return hit


def damage(path: str, how: str) -> bytes:
    """Damage a cache file in place the way a crash, a full disk or an older graphc leaves it."""
    with open(path, "rb") as f:
        data = f.read()
    if how == "corrupt":
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 64]) + data[mid + 64:]
    elif how == "truncated":
        data = data[:len(data) // 3]
    elif how == "empty":
        data = b""
    elif how == "stale":  # a whole, self-consistent entry of an older cache format
        assert data[:8] == diskcache.MAGIC
        data = OLD_MAGIC + data[8:]
    with open(path, "wb") as f:
        f.write(data)
    return data


# ---- cuda-emulated: the shared library ------------------------------------------------------------

@pytest.mark.parametrize("how", ["corrupt", "truncated", "empty"])
def test_damaged_library_is_rebuilt_not_loaded(cache, how, runs, loads):
    so = one(cache / "cuda_emulated" / "*.so")
    bad = damage(so, how)
    with pytest.warns(RuntimeWarning, match="damaged cache entry .*: does not match its manifest"):
        run_emulated()
    assert runs == ["so"] and diskcache.stats["corrupt"] == 1
    assert [p for p, _ in loads] == [so]
    loaded = loads[0][1]
    assert loaded != bad and loaded[:4] == b"\x7fELF"
    assert verifies(one(cache / "cuda_emulated" / "*.manifest"))


@pytest.mark.parametrize("how", ["stale", "corrupt", "truncated", "missing"])
def test_damaged_or_stale_manifest_means_rebuild(cache, how, runs, loads):
    """A manifest of an older format, a damaged one, or none at all (a pre-manifest cache): the .so
    beside it is not trusted even when its bytes are garbage."""
    so, manifest = one(cache / "cuda_emulated" / "*.so"), one(cache / "cuda_emulated" / "*.manifest")
    if how == "missing":
        os.remove(manifest)
        damage(so, "truncated")
    else:
        damage(manifest, how)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_emulated()
    # the one policy: damage warns (once per process), another format or a missing entry does not
    assert [str(w.message) for w in seen if "damaged" in str(w.message)] == (
        [] if how in ("stale", "missing") else [f"graphc: damaged cache entry {manifest}: truncated or corrupt, "
                                                f"its checksum does not match; it is ignored and rebuilt (later "
                                                f"damaged entries are rebuilt without a warning; graphc.backends."
                                                f"schedule.cache.stats['corrupt'] counts them)"])
    assert runs == ["so"]
    assert diskcache.stats["corrupt"] == (0 if how == "missing" else 1)
    assert loads[0][1][:4] == b"\x7fELF" and verifies(manifest)


def test_warm_cache_loads_without_compiling(cache, runs, loads):
    run_emulated()
    assert runs == [] and diskcache.stats == {"hits": 1, "misses": 0, "corrupt": 0, "disk_errors": 0}
    assert len(loads) == 1


# ---- cuda-emulated: the precompiled header --------------------------------------------------------

@pytest.mark.parametrize("how", ["corrupt", "truncated", "manifest-stale"])
def test_damaged_precompiled_header_is_rebuilt(cache, how, runs):
    """A new graph (another scale) needs a compile with the PCH: a damaged .gch (g++ would fail on a
    truncated one, and could miscompile with a corrupt one) is rebuilt first."""
    gch = one(cache / "cuda_emulated" / "pch-*" / "emulation.h.gch")
    manifest = os.path.join(os.path.dirname(gch), "manifest")
    bad = damage(manifest, "stale") if how == "manifest-stale" else damage(gch, how)
    run_emulated(scale=3.0)
    assert runs == ["pch", "so"] and diskcache.stats["corrupt"] >= 1
    assert verifies(manifest) and open(gch, "rb").read() != bad


def test_header_damaged_after_this_process_checked_it_is_rebuilt(cache, runs):
    """The process remembers files it already hashed (the .gch is 23 MB) only while their inode, size
    and mtime are unchanged: damage in place after a check is still caught."""
    run_emulated(scale=3.0)
    gch = one(cache / "cuda_emulated" / "pch-*" / "emulation.h.gch")
    damage(gch, "corrupt")
    run_emulated(scale=3.5)
    assert runs == ["so", "pch", "so"] and diskcache.stats["corrupt"] == 1


def test_stray_precompiled_header_is_not_used(cache, runs, monkeypatch):
    """When the compiler could not precompile the header, the entry says no .gch may sit beside it;
    a stray one found there later invalidates the entry."""
    monkeypatch.setattr(importlib.import_module("graphc.backends.cuda_emulated.build"), "_precompile", lambda cxx: None)
    shutil.rmtree(one(cache / "cuda_emulated" / "pch-*"))
    run_emulated(scale=3.0)
    pch = one(cache / "cuda_emulated" / "pch-*")
    assert not os.path.exists(os.path.join(pch, "emulation.h.gch"))
    assert listing(os.path.join(pch, "manifest"))["emulation.h.gch"] is None
    with open(os.path.join(pch, "emulation.h.gch"), "wb") as f:
        f.write(b"gpch garbage")
    run_emulated(scale=4.0)
    assert runs == ["so", "so"] and diskcache.stats["corrupt"] == 1
    assert not os.path.exists(os.path.join(pch, "emulation.h.gch"))


# ---- cuda: PTX from nvcc / NVRTC (no GPU needed) ---------------------------------------------------

@needs_cuda_compiler
@pytest.mark.parametrize("how", ["corrupt", "truncated", "stale", "empty", "headerless"])
def test_damaged_ptx_is_recompiled(cache, golden, how, runs):
    ptx = one(cache / "cuda" / "*.ptx")
    good = open(one(golden / "cuda" / "*.ptx"), "rb").read()[40:]
    if how == "headerless":  # what graphc wrote before entries had a header
        with open(ptx, "wb") as f:
            f.write(good)
    else:
        damage(ptx, how)
    out = compile_cuda(PTX_SRC, "sm_80")
    assert out == good and b".entry k(" in out and runs == ["ptx"]
    assert diskcache.stats["corrupt"] == 1
    assert compile_cuda(PTX_SRC, "sm_80") == good and runs == ["ptx"]  # repaired: a hit now


# ---- unusable directories ---------------------------------------------------------------------------

def make_read_only(path, monkeypatch) -> None:
    """chmod a-w; where that does not stop writes (root), refuse directory and file creation under
    `path` the way a read-only filesystem does (every cache write creates a temporary file first)."""
    for d, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(d, name), 0o444)
        os.chmod(d, 0o555)
    try:
        fd, probe = tempfile.mkstemp(dir=path)
    except OSError:
        return
    os.close(fd)
    os.unlink(probe)
    real_mkstemp, real_mkdir, prefix = tempfile.mkstemp, os.mkdir, str(path)

    def refuse(where):
        if str(where).startswith(prefix):
            raise OSError(30, "Read-only file system", str(where))

    def mkstemp(*a, dir=None, **k):
        refuse(dir)
        return real_mkstemp(*a, dir=dir, **k)

    def mkdir(p, *a, **k):
        refuse(p)
        return real_mkdir(p, *a, **k)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture
def writable_again():
    """Give pytest back the right to delete read-only test directories."""
    paths = []
    yield paths
    for p in paths:
        for d, _, _ in os.walk(p):
            os.chmod(d, 0o755)


def unusable_dir(kind, tmp_path, monkeypatch, writable_again) -> str:
    if kind == "read-only":
        path = tmp_path / "ro"
        path.mkdir()
        make_read_only(path, monkeypatch)
        writable_again.append(path)
        return str(path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    return str(blocker / "cache") if kind == "under-a-file" else str(blocker)


@pytest.mark.parametrize("kind", ["read-only", "under-a-file", "is-a-file"])
def test_unusable_directory_falls_back_to_a_private_one(kind, tmp_path, monkeypatch, writable_again, runs):
    backend_or_skip("cuda-emulated")
    root = unusable_dir(kind, tmp_path, monkeypatch, writable_again)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", root)
    before = sorted(glob.glob(str(tmp_path / "**"), recursive=True))
    # a graph no other test compiles (the private directory lives as long as the process)
    scale = 5.0 + ["read-only", "under-a-file", "is-a-file"].index(kind)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        run_emulated(scale)
        if has_cuda_compiler():
            compile_cuda(PTX_SRC + f"// {kind}\n", "sm_80")
    assert "so" in runs and diskcache.stats["disk_errors"] >= 1
    assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == before  # nothing written there
    private = diskcache.private_dir("cuda_emulated")
    manifests = [m for m in glob.glob(os.path.join(private, "*.manifest")) if verifies(m)]
    assert manifests
    n = len(runs)
    run_emulated(scale)                               # a warm hit from the private directory
    assert len(runs) == n


def test_directory_becoming_unwritable_mid_process(tmp_path, monkeypatch, writable_again, runs):
    """The first write found the directory usable; a later one fails (disk full, permissions
    changed): that entry goes to the private directory instead, with a warning."""
    backend_or_skip("cuda-emulated")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    run_emulated(scale=8.0)
    make_read_only(tmp_path, monkeypatch)
    writable_again.append(tmp_path)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        run_emulated(scale=9.0)
    assert runs == ["pch", "so", "so"] and diskcache.stats["disk_errors"] == 1
    assert len(glob.glob(str(tmp_path / "cuda_emulated" / "*.so"))) == 1
    run_emulated(scale=9.0)                           # now a hit, from the private directory
    assert runs == ["pch", "so", "so"]


def test_read_only_prefilled_cache_is_still_used(cache, monkeypatch, writable_again, runs, loads):
    make_read_only(cache, monkeypatch)
    writable_again.append(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry is there: nothing to write, nothing to warn about
        run_emulated()
        if has_cuda_compiler():
            compile_cuda(PTX_SRC, "sm_80")
    assert runs == [] and diskcache.stats["misses"] == 0
    assert loads[0][0].startswith(str(cache))


def test_nowhere_to_write_is_a_clear_error(tmp_path, monkeypatch):
    """Both the cache directory and the temporary directory unusable: a GraphcError naming them."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    monkeypatch.setattr(diskcache, "_private", [])
    with pytest.warns(RuntimeWarning), pytest.raises(gc.GraphcError, match="set GRAPHC_CACHE_DIR") as e:
        diskcache.store_blob("cuda", "x.ptx", b"payload")
    assert str(blocker / "cache" / "cuda") in str(e.value)


def test_missing_directory_is_created(tmp_path, monkeypatch, runs):
    backend_or_skip("cuda-emulated")
    root = tmp_path / "a" / "b" / "c"
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_emulated()
    assert runs == ["pch", "so"] and diskcache.stats["disk_errors"] == 0
    assert verifies(one(root / "cuda_emulated" / "*.manifest"))
    assert verifies(one(root / "cuda_emulated" / "pch-*" / "manifest"))


# ---- concurrency ------------------------------------------------------------------------------------

SCRIPT = r"""
import json, sys
import numpy as np
import graphc as gc
from graphc.backends.schedule import cache as diskcache
from graphc.backends.cuda.compiler import compile_cuda, nvcc_path, nvrtc_library
W, A = np.array(json.loads(sys.argv[1]), "f4"), np.array(json.loads(sys.argv[2]), "f4")
x = gc.placeholder("x", (None, 12))
f = gc.function([x], gc.softmax(gc.tanh(x @ gc.parameter("w", W)) * 1.5, axis=1), backend="cuda-emulated")
if nvcc_path() or nvrtc_library():
    assert b".entry k(" in compile_cuda(sys.argv[3], "sm_80")
print(json.dumps({"out": f(A).tolist(), "stats": diskcache.stats}))
"""


def _spawn(root):
    env = dict(os.environ, GRAPHC_CACHE_DIR=str(root))
    args = [json.dumps(W.tolist()), json.dumps(A.tolist()), PTX_SRC]
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _stats(p) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(r["out"]), expected(1.5), rtol=1e-5, atol=1e-6)
    return r["stats"]


def test_two_processes_compiling_at_once(tmp_path):
    """Both build the PCH, the .so and the PTX into the same fresh directory at the same time."""
    backend_or_skip("cuda-emulated")
    results = [_stats(p) for p in [_spawn(tmp_path), _spawn(tmp_path)]]
    assert all(r["corrupt"] == 0 and r["disk_errors"] == 0 for r in results)
    emu = tmp_path / "cuda_emulated"
    assert verifies(one(emu / "*.manifest")) and one(emu / "*.so")
    assert verifies(one(emu / "pch-*" / "manifest"))
    if has_cuda_compiler():
        assert one(tmp_path / "cuda" / "*.ptx")
    assert not glob.glob(str(tmp_path / "**" / ".tmp-*"), recursive=True)
    warm = _stats(_spawn(tmp_path))
    assert warm["misses"] == 0 and warm["corrupt"] == 0 and warm["hits"] >= 1
