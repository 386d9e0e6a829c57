"""The llvm backend's object code in the shared on-disk cache (graphc.backends.schedule.cache, sub
"llvm"): warm hits in a new process, corrupt entries rebuilt (replaced, with one warning), concurrent
processes, and an unusable directory falling back to a private directory."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import backend_or_skip

SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, graphc as gc
x = gc.placeholder('x', (None, 30))
w = gc.parameter('w', np.arange(30 * 7, dtype='f4').reshape(30, 7) / 100)
y = gc.softmax(gc.tanh(x @ w) * SCALE, axis=1)
t1 = time.perf_counter()
f = gc.function([x], y, backend='llvm')
a = np.linspace(-1, 1, 4 * 30, dtype='f4').reshape(4, 30)
out = f(a)
t2 = time.perf_counter()
h = np.tanh(a @ w.value) * SCALE
e = np.exp(h - h.max(1, keepdims=True)); want = e / e.sum(1, keepdims=True)
from graphc.backends.schedule import cache
print(json.dumps({"hit": f.program.info["cache_hit"], "ok": bool(np.allclose(out, want, rtol=1e-5)),
                  "stats": cache.stats, "compile_s": t2 - t1}))
"""


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _run(cache_dir, scale=2.0, wait=True):
    env = dict(os.environ, GRAPHC_CACHE_DIR=str(cache_dir))
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.replace("SCALE", repr(scale))], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _result(p) if wait else p


def _result(p):
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]), stderr=err)


def test_warm_hit_in_a_new_process(tmp_path):
    cold = _run(tmp_path)
    assert cold["ok"] and not cold["hit"]
    assert glob.glob(str(tmp_path / "llvm" / "*.o"))
    warm = _run(tmp_path)
    assert warm["ok"] and warm["hit"] and warm["stats"]["hits"] == 1
    other = _run(tmp_path, scale=3.0)            # a different graph is a different key
    assert other["ok"] and not other["hit"]


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path):
    assert not _run(tmp_path)["hit"]
    (entry,) = glob.glob(str(tmp_path / "*" / "*.o"))
    with open(entry, "r+b") as fh:
        fh.seek(60)
        fh.write(b"\xde\xad\xbe\xef" * 8)
    again = _run(tmp_path)
    assert again["ok"] and not again["hit"] and again["stats"]["corrupt"] == 1
    assert "damaged cache entry" in again["stderr"] and entry in again["stderr"]
    assert _run(tmp_path)["hit"]                 # rebuilt entry is good


def test_two_processes_compiling_at_once(tmp_path):
    procs = [_run(tmp_path, wait=False) for _ in range(2)]
    results = [_result(p) for p in procs]
    assert all(r["ok"] for r in results)
    assert len(glob.glob(str(tmp_path / "*" / "*.o"))) == 1
    assert not glob.glob(str(tmp_path / "*" / ".tmp-*"))
    assert _run(tmp_path)["hit"]


def test_unusable_directory_falls_back_to_a_private_directory(tmp_path):
    """(Was: to memory. The shared cache's one fallback is a private temporary directory, with a
    warning, as for the cuda backends.)"""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run(blocker / "cache")
    assert r["ok"] and not r["hit"] and r["stats"]["disk_errors"] >= 1
    assert "cannot be written" in r["stderr"] and "private temporary directory" in r["stderr"]
