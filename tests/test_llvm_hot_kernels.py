"""Kernels a scan runs every step, on llvm: a costly 2-D elementwise region pairs its rows (kernels._paired_rows:
rows r and r + rows/2 in one iteration, an odd last row alone) and stays equal to the NumPy backend at odd
sizes on one and two threads (with and without the row split of the scan); and GRAPHC_PERF_MAP=1 writes the
perf map that names the JIT's kernels in a profile."""
from __future__ import annotations

import os

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _cell(n: int, H: int, T: int, rng):
    """An LSTM-like step: a product read by column windows (so the region's rows do not collapse), gates."""
    w = gc.constant((rng.standard_normal((H, 4 * H)) * 0.3).astype(np.float32))
    b = gc.constant((rng.standard_normal(4 * H) * 0.1).astype(np.float32))
    h0, c0 = gc.placeholder("h", (n, H)), gc.placeholder("c", (n, H))
    x = gc.placeholder("x", (T, n, 4 * H))

    def step(carry, xt):
        h, c = carry
        z = h @ w + xt + b
        i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
        c2 = gc.sigmoid(f) * c + gc.sigmoid(i) * gc.tanh(g)
        h2 = gc.sigmoid(o) * gc.tanh(c2)
        return (h2, c2), h2
    (hT, cT), hs = gc.scan(step, (h0, c0), x)
    return [h0, c0, x], [hT, cT, hs]


@pytest.mark.parametrize("n,H", [(2, 8), (5, 17), (9, 33), (16, 8)])
def test_paired_rows_match_numpy(threads, monkeypatch, n, H):
    from graphc.backends.llvm import kernels as K
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")   # planned here, so the patched _paired_rows sees the regions
    calls = []
    real = K._paired_rows
    monkeypatch.setattr(K, "_paired_rows", lambda em, dims, *a: (calls.append(tuple(dims)), real(em, dims, *a)))
    rng = np.random.default_rng(n * 31 + H)
    T = 4
    ins, outs = _cell(n, H, T, rng)
    vals = [rng.standard_normal((n, H)).astype(np.float32), rng.standard_normal((n, H)).astype(np.float32),
            rng.standard_normal((T, n, 4 * H)).astype(np.float32)]
    got = gc.function(ins, outs, backend="llvm")(*vals)
    want = gc.function(ins, outs, backend="numpy", optimize=0)(*vals)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=2e-5, atol=2e-6)
    assert calls and all(d[1] == H for d in calls), calls   # the gates' region, every part's rows paired


def test_cold_kernels_are_not_paired(monkeypatch):
    """Outside a loop a small region keeps one row per iteration (pairing doubles its code)."""
    from graphc.backends.llvm import kernels as K
    calls = []
    monkeypatch.setattr(K, "_paired_rows", lambda *a: calls.append(1))
    x = gc.placeholder("x", (6, 40))
    w = gc.constant(np.ones((40, 80), np.float32))
    z = x @ w
    y = gc.tanh(z[:, :40]) * gc.sigmoid(z[:, 40:])
    xv = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32) * 0.1
    np.testing.assert_allclose(gc.function([x], y, backend="llvm")(xv),
                               np.tanh(xv @ np.ones((40, 40))) / (1 + np.exp(-(xv @ np.ones((40, 40))))),
                               rtol=1e-5, atol=1e-6)
    assert not calls


def test_perf_map_names_the_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_PERF_MAP", "1")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    path = f"/tmp/perf-{os.getpid()}.map"
    before = open(path).read() if os.path.exists(path) else ""
    x = gc.placeholder("x", (3, 5))
    f = gc.function([x], gc.exp(x) * 2.0 + 1.0, backend="llvm")
    np.testing.assert_allclose(f(np.zeros((3, 5), np.float32)), np.full((3, 5), 3.0))
    new = open(path).read()[len(before):].splitlines()
    rows = [ln.split() for ln in new]
    assert any(r[2].startswith("k_") and r[2].endswith("_elementwise") for r in rows), new
    for addr, size, _ in rows:
        assert int(addr, 16) > 0 and int(size, 16) > 0
