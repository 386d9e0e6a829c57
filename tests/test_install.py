"""A clean install: the built wheel holds one import package, graphc (with graphc.backends and
graphc.frontends inside it), and gc.function(..., backend="llvm") works from it outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy: a stale build/ folder in the checkout would leak removed modules into the wheel
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".hypothesis", "out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("graphc-*.whl")
    return whl


def test_wheel_top_level_is_only_graphc(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"graphc", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    for must in ("graphc/backends/llvm/__init__.py", "graphc/backends/cuda_emulated/emulation.h",
                 "graphc/frontends/onnx_import.py", "graphc/backends/numpy/__init__.py"):
        assert must in names, must
    assert not any(n.startswith(("backends/", "frontends/", "tests/")) for n in names)
    # every module of the source tree is in the wheel (pyproject lists the packages explicitly)
    for folder, pkg in (("graphc", "graphc"), ("backends", "graphc/backends"), ("frontends", "graphc/frontends")):
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder).as_posix()
            if "__pycache__" not in rel:
                assert f"{pkg}/{rel}" in names, f"{folder}/{rel} is missing from the wheel (pyproject packages?)"


def test_wheel_installed_outside_the_repository_compiles_llvm(wheel, tmp_path):
    venv = tmp_path / "venv"
    # the venv sees this interpreter's packages (numpy, llvmlite, ...) but gets graphc from the wheel only
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    code = (
        "import importlib.util, numpy as np, graphc as gc\n"
        "import graphc.backends.llvm as L, graphc.frontends.numpy_trace as T\n"
        "site = gc.__file__.rsplit('graphc', 1)[0]\n"
        "assert L.__file__.startswith(site) and T.__file__.startswith(site), (gc.__file__, L.__file__)\n"
        "assert importlib.util.find_spec('backends') is None and importlib.util.find_spec('frontends') is None\n"
        "x = gc.placeholder('x', (None, 3))\n"
        "f = gc.function([x], gc.tanh(x) * 2 + 1, backend='llvm')\n"
        "a = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)\n"
        "np.testing.assert_allclose(f(a), np.tanh(a) * 2 + 1, rtol=1e-6)\n"
        "assert f.program.info['fallback_ops'] == []\n"
        "print(gc.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(venv) in r.stdout, r.stdout


def test_backends_not_importable_under_a_second_name():
    r = subprocess.run([sys.executable, "-c", "import backends"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "graphc.backends" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import frontends"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "graphc.frontends" in r.stderr, r.stderr
