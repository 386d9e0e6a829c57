"""Kernels compiled on several threads (backends/llvm/jit.compile_kernels): the same object code as one
after the other, programs built that way compute the same results, and GRAPHC_COMPILE_THREADS=1
turns it off."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_TUNE", "off")


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    x = gc.placeholder("x", (5, 17))
    h, ws = x, []
    for i, (m, n) in enumerate(((17, 33), (33, 9), (9, 4))):
        w = gc.parameter(f"w{i}", rng.standard_normal((m, n)).astype(np.float32))
        b = gc.parameter(f"b{i}", rng.standard_normal(n).astype(np.float32))
        ws.append((w, b))
        h = gc.tanh(h @ w + b) if i < 2 else gc.softmax(h @ w + b, axis=1)
    return x, h, ws


def _kernel_irs(f):
    from graphc.backends.llvm import program as P
    spec = f.program._last
    mod, _ = P.generate(spec.plan, spec.slots, 1)
    return mod.kernel_irs


def test_parallel_objects_are_the_serial_ones():
    from graphc.backends.llvm import jit
    if jit.compile_threads() == 1 and any(jit._raw(n) is None for n in jit._UNLOCKED):
        pytest.skip("this llvmlite has no unlocked C functions: kernels compile serially")
    x, y, _ = _mlp()
    irs = _kernel_irs(gc.function([x], y, backend="llvm"))
    assert len(irs) >= 3
    t1 = {"llvm_opt": 0.0, "machine_code": 0.0}
    t3 = {"llvm_opt": 0.0, "machine_code": 0.0}
    serial = jit.compile_kernels(irs, t1, threads=1)
    parallel = jit.compile_kernels(irs, t3, threads=3)
    assert [len(o) for o in parallel] == [len(o) for o in serial]
    assert parallel == serial            # byte for byte: the same code, in the order asked
    assert t3["llvm_opt"] > 0 and t3["machine_code"] > 0


def test_parallel_compile_errors_reach_the_caller():
    from graphc.backends.llvm import jit
    bad = "define void @f() {\n  ret i32 0\n}\n"
    with pytest.raises(RuntimeError):
        jit.compile_kernels(["define void @g() {\n  ret void\n}\n", bad], {"llvm_opt": 0.0, "machine_code": 0.0},
                            threads=2)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_program_compiled_on_threads_matches_numpy(threads, monkeypatch):
    monkeypatch.setenv("GRAPHC_COMPILE_THREADS", threads)
    x, y, ws = _mlp(seed=int(threads))
    f = gc.function([x], y, backend="llvm")
    assert f.program.info["kernels_from_cache"] == 0
    a = np.random.default_rng(3).standard_normal((5, 17)).astype(np.float32)
    h = a.astype(np.float64)
    for i, (w, b) in enumerate(ws):
        h = h @ w.value + b.value
        if i < 2:
            h = np.tanh(h)
    e = np.exp(h - h.max(1, keepdims=True))
    np.testing.assert_allclose(f(a), e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    ct = f.program.info["compile_time"]
    assert ct["llvm_opt"] > 0 and ct["machine_code"] > 0


def test_compile_threads_setting(monkeypatch):
    from graphc.backends.llvm import jit
    monkeypatch.setenv("GRAPHC_COMPILE_THREADS", "1")
    assert jit.compile_threads() == 1
    monkeypatch.setenv("GRAPHC_COMPILE_THREADS", "3")
    assert jit.compile_threads() in (1, 3)   # 1 only where llvmlite offers no unlocked calls
