"""Shared fixtures: the backend-parametrised harness every op/model test plugs into."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.function import BACKENDS, get_backend

try:  # optional independent reference (pip install torch==2.13.0)
    import torch
    TF = torch.nn.functional
except ImportError:
    torch = TF = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch==2.13.0 not installed (optional reference)")


def run_graph(fn, *arrays):
    """fn applied to placeholders shaped like `arrays`, compiled (numpy backend) and run on them."""
    phs = [gc.placeholder(f"a{i}", a.shape, a.dtype.name) for i, a in enumerate(arrays)]
    return gc.function(phs, fn(*phs))(*arrays)


#: backends the parametrised tests run on (each skips with the reason when not usable here)
TEST_BACKENDS = [b for b in ("numpy", "llvm", "cuda-emulated") if b in BACKENDS]


def plan_steps(f) -> list:
    """The steps of every specialisation of compiled function f (llvm), loop bodies walked in place of
    their loops, in plan order."""
    from graphc.backends.schedule.steps import LoopStep
    out = []

    def walk(steps):
        for st in steps:
            if isinstance(st, LoopStep):
                walk(st.body)
            else:
                out.append(st)
    for spec in f.program._specs.values():
        walk(spec.plan.steps)
    return out


def backend_or_skip(name: str) -> str:
    try:
        get_backend(name)
    except gc.GraphcError as e:
        pytest.skip(str(e))
    return name


@pytest.fixture(params=TEST_BACKENDS)
def backend(request):
    """Each test that takes `backend` runs once per backend; unavailable ones skip with the reason."""
    return backend_or_skip(request.param)


def tolerance(dtype: str) -> dict:
    return {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=1e-6, atol=1e-6)}.get(
        dtype, dict(rtol=0, atol=0))


def assert_close(got, want, dtype=None, backend="numpy", **kw):
    """Backend results against a reference; native backends get float32 rounding slack."""
    want = np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    dtype = dtype or want.dtype.name
    tol = tolerance(dtype)
    if backend != "numpy" and dtype in ("float32", "float64"):
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    tol.update(kw)
    if want.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, **tol)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# llvm code generation under both ISAs (AVX2's vector shapes forced on an AVX-512 host) and both thread
# counts: tests that take `isa` / `threads` run once per value (a module may define its own instead)
@pytest.fixture(params=["avx2", "avx512"])
def isa(request, monkeypatch):
    monkeypatch.setenv("GRAPHC_LLVM_ISA", request.param)
    return request.param


@pytest.fixture(params=["1", "2"])
def threads(request, monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", request.param)
    return int(request.param)
