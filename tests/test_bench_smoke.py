"""Smoke test of the benchmark suite: tiny sizes, every output checked against the float64 reference,
report files written (no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("only", ["W1,W2,W5,W6", "W3,W4"])
def test_benchmark_suite_runs_and_checks_outputs(tmp_path, only):
    out = tmp_path / "r.json"
    systems = "numpy,graphc-numpy O2,graphc-llvm,onnxruntime"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--only", only, "--systems", systems,
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "llvm / best" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert res, "no workloads ran"
    for wl, row in res.items():
        for system, cell in row.items():
            status = cell["status"]
            assert not status.startswith("WRONG"), f"{wl} {system}: {status}"
            if system in ("numpy", "graphc-llvm") and not status.startswith("n/a"):
                assert status == "ok", f"{wl} {system}: {status}"
                assert cell["median"] > 0


def test_workload_references_agree_with_numpy_by_hand():
    sys.path.insert(0, ROOT)
    import numpy as np
    from benchmarks import systems, workloads
    checked = []
    for wl in workloads.selected_workloads("tiny"):
        try:
            out = systems.numpy_build(wl)()
        except systems.Missing:   # W10: a torch model, not written in NumPy
            continue
        np.testing.assert_allclose(out, wl.reference, rtol=2e-3, atol=1e-4, err_msg=wl.id)
        checked.append(wl.id.split()[0])
    assert sorted(set(checked)) == sorted(f"W{i}" for i in range(1, 10))


def test_systems_are_timed_in_interleaved_rounds(monkeypatch):
    """Every round takes one sample of each system (after an untimed call), so a host whose speed changes
    mid-run slows every system alike instead of whichever happened to be timed then."""
    sys.path.insert(0, ROOT)
    from benchmarks import harness
    monkeypatch.setattr(harness, "GAP_S", 0.0)
    log = []

    def system(name, seconds):
        def fn():
            log.append(name)
            t = harness.time.perf_counter() + seconds
            while harness.time.perf_counter() < t:
                pass
        return fn
    res = harness.time_interleaved({"a": system("a", 1e-3), "b": system("b", 4e-4)}, quick=True)
    assert set(res) == {"a", "b"} and all(r["min"] <= r["median"] for r in res.values())
    assert 0.9e-3 < res["a"]["min"] < 5e-3 and 3.5e-4 < res["b"]["min"] < 2e-3
    runs = [log[0]]   # the system of each maximal run of consecutive calls
    for name in log[1:]:
        if name != runs[-1]:
            runs.append(name)
    # two calibration runs, then strictly alternating samples: a, b, a, b, ...
    assert runs[2:] == ["a", "b"] * ((len(runs) - 2) // 2) and len(runs) - 2 >= 6, runs
