"""The `graphc` command: show, draw, convert, run, bench; one-line errors with non-zero status."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.cli import main

pytest.importorskip("onnx", reason="onnx is not installed")


@pytest.fixture
def model(tmp_path, rng):
    x = gc.placeholder("x", (None, 6))
    W = gc.parameter("W", rng.standard_normal((6, 3)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(3).astype(np.float32))
    y = gc.softmax(gc.tanh(x @ W + b))
    y.name = "probs"
    f = gc.function([x], y)
    gpath = tmp_path / "m.graphc"
    gc.save(f, gpath)
    xv = rng.standard_normal((4, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", xv)
    return gpath, f, xv


def test_show(model, capsys):
    gpath, f, xv = model
    assert main(["show", str(gpath)]) == 0
    out = capsys.readouterr().out
    assert "x" in out and "float32  (N, 6)" in out and "probs" in out
    assert "parameters: 2 tensors, 21 values" in out
    assert "matmul" in out and "softmax" in out


def test_convert_both_ways_and_run(model, tmp_path, capsys):
    gpath, f, xv = model
    onnx_path, back = tmp_path / "m.onnx", tmp_path / "back.graphc"
    assert main(["convert", str(gpath), str(onnx_path)]) == 0
    assert main(["convert", str(onnx_path), str(back)]) == 0
    assert main(["show", str(onnx_path)]) == 0
    want = f(xv)
    for path in (gpath, onnx_path, back):
        out = tmp_path / "out.npz"
        assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "-o", str(out)]) == 0
        got = np.load(out)["probs"]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert main(["run", str(onnx_path), "--input", f"x={tmp_path / 'x.npy'}", "--backend", "numpy"]) == 0
    assert "probs: float32(4, 3)" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed (apt-get install graphviz)")
def test_draw(model, tmp_path):
    gpath, f, xv = model
    out = tmp_path / "g.svg"
    assert main(["draw", str(gpath), "-o", str(out), "-O", "2"]) == 0
    assert "<svg" in out.read_text()


@pytest.mark.parametrize("argv,msg", [
    (["show", "missing.onnx"], "no such file"),
    (["run", "{model}"], "no value for input 'x'"),
    (["convert", "{model}", "out.txt"], "unknown output format"),
    (["run", "{model}", "--input", "nope.npy"], "cannot read input"),
    (["run", "{model}", "--input", "{x}", "--backend", "nosuch"], "unknown backend"),
])
def test_errors_are_one_line(model, tmp_path, capsys, argv, msg):
    gpath, f, xv = model
    argv = [a.format(model=gpath, x=tmp_path / "x.npy") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("graphc: error: ") and msg in err and err.count("\n") == 1


def test_corrupt_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.graphc"
    bad.write_bytes(b"PK\x03\x04garbage")
    assert main(["show", str(bad)]) == 1
    assert "graphc: error:" in capsys.readouterr().err


def test_console_script(model):
    exe = shutil.which("graphc")
    if exe is None:
        pytest.skip("the graphc console script is not installed (pip install -e .)")
    gpath, f, xv = model
    res = subprocess.run([exe, "show", str(gpath)], capture_output=True, text=True)
    assert res.returncode == 0 and "softmax" in res.stdout
    res = subprocess.run([exe, "show", "missing.graphc"], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().startswith("graphc: error:")


def test_bench_delegates_to_benchmarks_module(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append(cmd) or 0)
    assert main(["bench", "--quick"]) == 0
    assert calls and calls[0][:3] == [sys.executable, "-m", "benchmarks"] and calls[0][3:] == ["--quick"]
