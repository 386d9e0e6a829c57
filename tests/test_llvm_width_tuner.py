"""The tuner's vector width for costly elementwise kernels (backends/llvm/tune.py `width_for`): the
plan builds the kernel at the width that ran faster (a stubbed timing picks each way), results stay
NumPy's at odd sizes at either width, the real probes run both widths over a prefix and compare their
outputs, the decision is stored per CPU model and read back without timing, and nothing is timed with
the tuner off, below WIDTH_TUNE_WORK, at the SSE level (no narrower width) or past the graph's budget.
No timing is asserted."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm_tuned(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    from graphc.backends.llvm import jit, tune
    jit.target_machine()
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    monkeypatch.setattr(tune, "_memo", {})
    monkeypatch.setattr(tune, "log", [])
    monkeypatch.setattr(tune, "_busy", lambda: False)
    if tune.vector_bits() <= 128:
        pytest.skip("128-bit vectors: no narrower width to tune")


def _chain(x):
    return gc.tanh(x * 0.7 + 0.1) * gc.sigmoid(x) + gc.exp(-x * x)


def _chain_ref(x):
    x = x.astype(np.float64)
    return np.tanh(x * 0.7 + 0.1) / (1 + np.exp(-x)) + np.exp(-x * x)


def _build(n, rng, shape=None):
    shape = shape or (n,)
    p = gc.placeholder("x", shape, "float32")
    f = gc.function([p], _chain(p), backend="llvm")
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    np.testing.assert_allclose(f(x), _chain_ref(x), rtol=3e-6, atol=5e-7)
    return f


def _widths(f):
    return f.program.info["target"]["elementwise"]["widths"]


@pytest.mark.parametrize("winner", ["wide", "narrow"])
def test_plan_follows_the_faster_width(winner, monkeypatch, rng, threads):
    from graphc.backends.llvm import tune
    wide = tune.vector_bits()
    narrow = wide // 2
    best = wide if winner == "wide" else narrow
    monkeypatch.setattr(tune, "WIDTH_TUNE_WORK", 1)   # every size is tuned: odd ones too
    monkeypatch.setattr(tune, "_time_widths", lambda *a: {best: 1e-6, (narrow if best == wide else wide): 1e-3})
    for n in (1, 3, 17, 63, 65, 257, 4099):
        f = _build(n, rng)
        if n == 1:   # no loop: nothing to vectorise, nothing tuned
            assert not _widths(f)
            continue
        assert f'"prefer-vector-width"="{best}"' in f.source, n
        assert _widths(f) == [f"float32[{n}] float32[{n}] float32[] float32[]: {best} bits (tuned)"], _widths(f)
    if best == 128:
        assert "%ymm" not in f.asm and "%xmm" in f.asm   # (the kernel and the entry: 128-bit code only)


def test_real_probes_time_and_compare_both(monkeypatch, rng):
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "WIDTH_PROBE_ELEMENTS", 1 << 14)
    f = _build(1 << 19, rng, (512, 1024))   # 2-D: a prefix of rows, the rows split over the pool
    (kind, size, bits, src), = tune.log
    assert (kind, size, src) == ("width", 1 << 19, "tuned") and bits in (tune.vector_bits(), tune.vector_bits() // 2)
    assert f'"prefer-vector-width"="{bits}"' in f.source
    blobs = _tune_blobs()
    assert len(blobs) == 1, blobs
    from graphc.backends.schedule import cache
    stored = json.loads(cache.load_blob(tune.CACHE_SUB, blobs[0].name).decode())
    assert stored["bits"] == bits and all(0 < t < 1 for t in stored["seconds"].values())


def _tune_blobs():
    root = Path(os.environ["GRAPHC_CACHE_DIR"])
    return [p for p in root.rglob("*.json") if "tune" in p.relative_to(root).parts]


def test_decision_is_stored_and_read_back(monkeypatch, rng):
    from graphc.backends.llvm import tune
    narrow = tune.vector_bits() // 2
    monkeypatch.setattr(tune, "_time_widths", lambda *a: {narrow: 1e-6, 2 * narrow: 1e-3})
    _build(1 << 18, rng)
    assert tune.log == [("width", 1 << 18, narrow, "tuned")]
    monkeypatch.setattr(tune, "_memo", {})       # a new process: the answer comes from the on-disk cache
    monkeypatch.setattr(tune, "_time_widths", lambda *a: pytest.fail("timed again"))
    f = _build(1 << 18, rng)
    assert f'"prefer-vector-width"="{narrow}"' in f.source
    assert any(w.endswith(f": {narrow} bits (cache)") for w in _widths(f))
    # another body, or the same body at another size, is timed on its own
    monkeypatch.setattr(tune, "_time_widths", lambda *a: {narrow: 1e-3, 2 * narrow: 1e-6})
    f = _build((1 << 18) + 1, rng)
    assert f'"prefer-vector-width"="{2 * narrow}"' in f.source and tune.log[-1][3] == "tuned"


def test_not_timed(monkeypatch, rng):
    from graphc.backends.llvm import tune
    monkeypatch.setattr(tune, "_time_widths", lambda *a: pytest.fail("timed"))
    host = f'"prefer-vector-width"="{tune.vector_bits()}"'
    _build(1 << 10, rng)                      # below WIDTH_TUNE_WORK
    p = gc.placeholder("x", (1 << 20,), "float32")
    f = gc.function([p], p + 1, backend="llvm")   # cheap body: 1M elements x a few instructions
    assert host in f.source
    monkeypatch.setenv("GRAPHC_TUNE", "off")
    assert host in _build(1 << 18, rng).source
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.setattr(tune, "BUDGET", {**tune.BUDGET, "quick": 0.0})   # the graph's budget spent
    assert host in _build(1 << 18, rng).source
    monkeypatch.setattr(tune, "BUDGET", {**tune.BUDGET, "quick": 0.5})
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "sse")
    f = _build(1 << 18, rng)
    assert '"prefer-vector-width"="128"' in f.source and not tune.log
    from graphc.backends.llvm import jit
    if not jit.has_feature(jit._state["host_features"], "avx512f"):   # AVX-512's shapes on a smaller host
        monkeypatch.setenv("GRAPHC_LLVM_ISA", "avx512")
        f = _build(1 << 18, rng)
        assert '"prefer-vector-width"="512"' in f.source and not tune.log


def test_failed_probe_keeps_the_host_width(monkeypatch, rng):
    from graphc.backends.llvm import tune

    def broken(*a):
        raise RuntimeError("the width probes computed different results")
    monkeypatch.setattr(tune, "_time_widths", broken)
    f = _build(1 << 18, rng)
    assert f'"prefer-vector-width"="{tune.vector_bits()}"' in f.source and not tune.log
