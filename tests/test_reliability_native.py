"""Native safety: cuda-emulated kernels built with AddressSanitizer (gc.function(...,
sanitize="address")) run fuzzed graphs cleanly, and ASan does catch an out-of-bounds write."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import graphc as gc
from conftest import backend_or_skip

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _asan_or_skip():
    backend_or_skip("cuda-emulated")
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.skip("g++ has no libasan.so (AddressSanitizer runtime not installed)")
    sys.path.insert(0, TESTS)
    import fuzz
    return fuzz.asan_env()


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_sanitize_without_the_asan_runtime_is_a_clear_error():
    backend_or_skip("cuda-emulated")
    x = gc.placeholder("x", (4,), "float32")
    with pytest.raises(gc.GraphcError, match="LD_PRELOAD"):
        gc.function([x], x + 1.0, backend="cuda-emulated", sanitize="address")
    with pytest.raises(gc.GraphcError, match="sanitize='thread'"):
        gc.function([x], x + 1.0, backend="cuda-emulated", sanitize="thread")


@pytest.mark.slow
def test_fuzzed_graphs_are_clean_under_asan():
    """Fuzz seeds (every kind: float, int, size-0, symbolic batch) at optimize 0/1/2 under ASan."""
    r = _run("""
        import fuzz
        t = fuzz.fuzz(range(0, 10), ["cuda-emulated"], grad_every=0, log=None, sanitize="address")["cuda-emulated"]
        print("graphs", t.graphs, "cases", t.cases, "failures", t.failures)
        assert t.graphs >= 9 and not t.failures
    """, _asan_or_skip())
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "AddressSanitizer" not in r.stderr


@pytest.mark.slow
def test_asan_catches_an_out_of_bounds_write_in_a_kernel():
    """A hand-broken kernel (stores shifted two float4 past the output) aborts with an ASan report
    pointing into graph.cu; the same graph unbroken under ASan is clean (so the report is the bug's)."""
    code = """
        import numpy as np, graphc as gc, graphc.backends.cuda_emulated as ce
        BROKEN = %s
        real = ce.lower
        def lower(graph, *table):
            source, plan = real(graph, *table)
            if BROKEN:
                source = source.replace("reinterpret_cast<float4*>(t_fused)[i4] =",
                                        "reinterpret_cast<float4*>(t_fused)[i4 + 2] =")
            return source, plan
        ce.lower = lower
        x = gc.placeholder("x", (8,), "float32")
        f = gc.function([x], gc.exp(x) * 2.0, backend="cuda-emulated", sanitize="address")
        y = f(np.ones(8, np.float32))
        print("RESULT", float(y[0]))
    """
    env = _asan_or_skip()
    ok = _run(code % "False", env)
    assert ok.returncode == 0 and "RESULT" in ok.stdout, ok.stderr[-3000:]
    bad = _run(code % "True", env)
    assert bad.returncode != 0 and "RESULT" not in bad.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    assert "graph.cu" in bad.stderr  # the report names the generated kernel's line
