"""The docs cannot rot: the Sphinx API reference (docs/api) builds with every documented module importable,
and the tutorial notebook (docs/tutorial.ipynb) executes from top to bottom.

Needs the dev extra's sphinx, nbclient, nbformat and ipykernel; each test skips with the reason otherwise.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest

import graphc as gc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "docs", "api")
NOTEBOOK = os.path.join(ROOT, "docs", "tutorial.ipynb")


def _need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed (pip install -e '.[dev]')")


def test_api_reference_builds(tmp_path):
    _need("sphinx")
    log = tmp_path / "sphinx-warnings.log"
    out = tmp_path / "html"
    # Not -W: graphc's docstrings are Markdown-flavoured prose, and docutils warns about some of it
    # (|x|, *, `name`_). Those only affect rendering; what must never happen is a module failing to import.
    r = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-w", str(log), API, str(out)],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    text = log.read_text() if log.exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr
    bad = [line for line in text.splitlines() if "failed to import" in line or "autodoc:" in line]
    assert not bad, "autodoc could not document:\n" + "\n".join(bad)
    pages = {p: (out / f"{p}.html").read_text() for p in ("index", "graphc", "nn", "losses", "optim", "passes",
                                                          "options")}
    # one documented object from each page, so an empty page (a silently skipped module) fails too
    for page, anchor in [("graphc", "graphc.function"), ("graphc", "graphc.fit"), ("nn", "graphc.nn.module.Sequential"),
                         ("nn", "graphc.nn.layers.Dense"), ("losses", "graphc.losses.cross_entropy"),
                         ("optim", "graphc.optim.Adam"), ("passes", "graphc.passes.pipeline.optimize"),
                         ("passes", "graphc.passes.pattern.Rule"),
                         ("options", "graphc.function.CompileOptions")]:
        assert f'id="{anchor}"' in pages[page], f"{anchor} is missing from {page}.html"


def test_top_level_page_lists_every_public_callable():
    """docs/api/graphc.rst names graphc's public functions and classes one by one (graphc has no __all__);
    a new one must be added there."""
    text = open(os.path.join(API, "graphc.rst")).read()
    listed = set(re.findall(r"^\.\. auto(?:function|class|data):: graphc\.(\w+)", text, re.M))
    public = {n for n in dir(gc) if not n.startswith("_")
              and not isinstance(getattr(gc, n), (types.ModuleType, str, dict))}
    assert public - listed == set(), f"add these to docs/api/graphc.rst: {sorted(public - listed)}"
    assert listed - public == set(), f"no longer in graphc: {sorted(listed - public)}"


def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    _need("nbformat", "nbclient", "ipykernel", "sklearn", "onnx", "onnxruntime")
    import nbformat
    from nbclient import NotebookClient

    # The kernel is this interpreter (whatever `python` is on PATH), with this checkout importable.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (graphc tests)", "language": "python", "env": env}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert re.search(r"held-out accuracy: 0\.9\d\d", text), text
    assert "ONNX Runtime agrees with graphc" in text, text
