"""backend="cuda": the generated CUDA C compiles with nvcc/NVRTC for sm_80 and sm_90 for every
kernel kind the backend emits; compile errors show the generated source; without a GPU the function
still compiles and raises BackendUnavailable when called. Semantics are tested on the CPU by
test_cuda_emulated.py (the same source under the emulation header)."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

import graphc as gc
from graphc.backends.cuda import BACKEND as CUDA
from graphc.backends.cuda.compiler import compile_cuda, nvcc_path, nvrtc_library
from graphc.backends.cuda.lower import lower
from graphc.ir import Graph

needs_compiler = pytest.mark.skipif(not (nvcc_path() or nvrtc_library()),
                                    reason="no CUDA compiler here (neither nvcc nor libnvrtc)")
needs_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed (cubin output needs ptxas)")
GPU_REASON = CUDA.unavailable_reason()
ALL_KINDS = {"elementwise", "fused", "reduce", "softmax", "matmul", "copy", "fill", "take", "scatter", "conv", "pool"}


def w2(x, a, b):
    """The W2 workload's fused elementwise expression."""
    return gc.tanh(x * a + b) * gc.sigmoid(x) + gc.exp(-x * x)


def every_kernel_graph(dtype: str) -> Graph:
    """One graph whose optimised form needs every kernel kind (symbolic batch dim N included)."""
    rng = np.random.default_rng(0)
    x = gc.placeholder("x", (None, 1, 8, 8), dtype)
    v = gc.placeholder("v", (None, 6), dtype)
    w = gc.parameter("w", rng.standard_normal((4, 1, 3, 3)).astype(dtype))
    m = gc.parameter("m", rng.standard_normal((6, 5)).astype(dtype))
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, w, padding=1)), 2)            # conv, elementwise, pool
    z = w2(v, 0.5, 0.25) @ m                                               # fused, matmul
    e = gc.concatenate([z, v[:, ::-1]], axis=1).T                          # copy (concatenate, getitem, transpose)
    t = gc.take(z, gc.constant(np.array([1, 1, 3])), axis=1)               # take
    carry, ys = gc.scan(lambda c, xt: (gc.tanh(c * 0.5 + xt), c * c), v[0], v)  # scan: body kernels
    loss = (gc.log_softmax(z, axis=1).sum() + gc.softmax(e, axis=0).max() + h.mean()
            + gc.logsumexp(t) + (v[:, 1:] ** 2).sum() + carry.sum() + ys.mean())
    grads = gc.grad(loss, [w, m, v])                                       # scatter (take_grad, index_grad)
    outs = [loss, gc.argmax(z, axis=1), *grads]
    f = gc.function([x, v], outs, backend="numpy")
    return f.graph


@pytest.fixture(scope="module", params=["float32", "float64"])
def lowered(request):
    source, plan = lower(every_kernel_graph(request.param))
    return source, plan


def test_every_kernel_kind_is_emitted(lowered):
    source, plan = lowered
    assert set(plan.kernels.values()) == ALL_KINDS, plan.kernels
    assert plan.fallback_ops == []
    assert plan.text().count("loop scan over") == 2  # forward and back-propagation through time
    for name in plan.kernels:
        assert f"__global__ void __launch_bounds__" in source and f" {name}(" in source


@needs_compiler
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_to_ptx(lowered, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    source, plan = lowered
    ptx = compile_cuda(source, arch, "ptx").decode()
    assert f".target {arch}" in ptx
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(plan.kernels)


@pytest.mark.skipif(nvrtc_library() is None, reason="libnvrtc not found (pip install graphc[cuda])")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_in_process_compiles_every_kernel(lowered, arch, tmp_path, monkeypatch):
    import graphc.backends.cuda.compiler as C
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(C, "nvcc_path", lambda: None)  # force the NVRTC route
    source, plan = lowered
    ptx = C.compile_cuda(source, arch, "ptx").decode()
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(plan.kernels)
    with pytest.raises(gc.GraphcError, match=re.escape(">>     2 |   y[0] = nope;")):
        C.compile_cuda('extern "C" __global__ void k(float* y) {\n  y[0] = nope;\n}\n', arch)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_assembles_to_cubin(lowered, arch, tmp_path, monkeypatch):
    """ptxas assembles every kernel for the real architecture (registers, shared memory limits)."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    source, plan = lowered
    cubin = compile_cuda(source, arch, "cubin")
    assert cubin[:4] == b"\x7fELF"
    for name in plan.kernels:
        assert name.encode() in cubin


@needs_compiler
def test_compile_cache_is_keyed_by_source_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    src = 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 1.0f; }\n'
    a = compile_cuda(src, "sm_80")
    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert compile_cuda(src, "sm_80") == a and not calls          # cache hit: no compiler run
    compile_cuda(src, "sm_90")
    assert len(calls) == 1 and len(list((tmp_path / "cuda").iterdir())) == 2


@needs_compiler
def test_compile_error_shows_the_generated_source(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    src = "// line 1\n// line 2\nextern \"C\" __global__ void k(float* y) {\n  y[0] = undefined_name;\n}\n"
    with pytest.raises(gc.GraphcError) as e:
        compile_cuda(src, "sm_80")
    msg = str(e.value)
    assert "undefined_name" in msg and ">>     4 |   y[0] = undefined_name;" in msg


@needs_compiler
@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present: the call runs (see test_runs_on_the_gpu)")
def test_without_a_gpu_compiles_and_raises_on_call():
    x = gc.placeholder("x", (None, 4))
    f = gc.function([x], w2(x, 2.0, 1.0), backend="cuda")
    assert "__global__" in f.source and f.program.info["ptx"].startswith(b"//")
    assert "cuda" not in gc.available_backends() and "cuda-emulated" in gc.available_backends()
    with pytest.raises(gc.BackendUnavailable, match="cannot run here"):
        f(np.ones((2, 4), np.float32))


def test_w2_is_one_fused_kernel_with_a_grid_stride_loop():
    x = gc.placeholder("x", (None, 256))
    a, b = gc.placeholder("a", (256,)), gc.placeholder("b", (256,))
    src, plan = lower(gc.function([x, a, b], w2(x, a, b)).graph)
    assert list(plan.kernels.values()) == ["fused"]
    assert "i += (long long)gridDim.x * blockDim.x" in src
    body = src[src.index("// fused["):]
    for fn in ("tanh(", "exp(", "1/(1+exp(-"):
        assert fn in body
    assert "const long long n = (gd.N * 256);" in body and "x[i]" in body  # x read linearly, a/b broadcast


def test_runtime_dims_and_plan_text():
    x = gc.placeholder("x", (None, 6))
    f = gc.function([x], (x.reshape(-1, 2, 3).sum(axis=2) * 2)[1:], backend="numpy")
    src, plan = lower(f.graph)
    assert "struct GcDims" in src and "long long N;" in src
    assert plan.dimtab.values({"N": 5})[0] == 5
    assert "launch k0_" in plan.text() and "(input)" in plan.text()


@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a GPU: {GPU_REASON}")
def test_runs_on_the_gpu(rng):
    x = gc.placeholder("x", (None, 64))
    w = gc.parameter("w", rng.standard_normal((64, 10)).astype(np.float32))
    out = gc.log_softmax(w2(x, 0.5, 0.1) @ w, axis=1)
    loss = -out.mean()
    upd = [(w, w - 0.1 * gc.grad(loss, w))]
    xs = rng.standard_normal((32, 64)).astype(np.float32)
    w0 = w.get_value()
    ref = gc.function([x], [out, loss], updates=upd)
    want = [ref(xs) for _ in range(3)]
    w.set_value(w0)
    f = gc.function([x], [out, loss], updates=upd, backend="cuda")
    for k in range(3):
        got = f(xs)
        for g, e in zip(got, want[k]):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
