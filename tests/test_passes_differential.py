"""Differential tests: seeded random graphs over the op set (broadcasting, size-1 dims, symbolic
batch) give the same results, and the same gradients, at optimize=0 and optimize=2 on every backend."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import TEST_BACKENDS, backend_or_skip
from fuzz import random_graph  # the generator lives in tests/fuzz.py (shared with the fuzzer)

GRAPHS_PER_CHUNK = 25
CHUNKS = 6       # 150 graphs (results and gradients) per backend (compiled backends: 50 quick, 100 slow)
SLOW_CHUNKS = 6  # 150 more on numpy, marked slow


def _case(seed, dtype):
    """Inputs, values, outputs (the result and one other tensor) and gradient tensors of one graph."""
    phs, out, vals, pool = random_graph(seed, dtype)
    r = np.random.default_rng(seed + 10 ** 6)
    extra = pool[int(r.integers(len(phs), len(pool)))] if len(pool) > len(phs) else out
    proj = r.standard_normal([int(d) for d in out.shape]) if all(isinstance(d, int) for d in out.shape) else 1.0
    cost = gc.sum(out * gc.constant(np.asarray(proj, dtype)))
    return phs, vals, [out, extra], gc.grad(cost, phs, disconnected="zero")


def _check_chunk(seeds, backend, dtype):
    """All graphs of a chunk in one function (one compile per backend): optimize=2 on `backend` against
    optimize=0 on numpy, for the results and for the gradients."""
    phs, vals, outs, grads, who, gwho = [], [], [], [], [], []
    for seed in seeds:
        p, v, o, g = _case(seed, dtype)
        phs += p
        vals += v
        outs += o
        grads += g
        who += [seed] * len(o)
        gwho += [seed] * len(g)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == "float64" else dict(rtol=2e-4, atol=2e-5)
    for kind, tensors in (("result", outs), ("gradient", grads)):
        f0 = gc.function(phs, tensors, optimize=0, backend="numpy")
        f2 = gc.function(phs, tensors, optimize=2, backend=backend)
        with np.errstate(all="ignore"):
            got, want = f2(*vals), f0(*vals)
        owners = who if kind == "result" else gwho
        for i, (a, b) in enumerate(zip(got, want)):
            np.testing.assert_allclose(a, b, **tol, err_msg=f"{kind} {i} of random graph seed {owners[i]}")


def _chunk_params(float32: bool = False):
    """(backend, chunk) params: numpy runs CHUNKS quick chunks, compiled backends (a compile per chunk)
    two; the rest up to CHUNKS + SLOW_CHUNKS (numpy) or CHUNKS (compiled) are marked slow."""
    out = []
    for b in TEST_BACKENDS:
        quick, total = (CHUNKS, CHUNKS + SLOW_CHUNKS) if b == "numpy" else (2, CHUNKS)
        if float32:
            quick, total = (2, 2) if b == "numpy" else (1, 2)
        for k in range(total):
            out.append(pytest.param(b, k, id=f"{b}-chunk{k}", marks=[pytest.mark.slow] if k >= quick else []))
    return out


@pytest.mark.parametrize("name,chunk", _chunk_params())
def test_random_graphs_agree_float64(name, chunk):
    backend_or_skip(name)
    _check_chunk(range(chunk * GRAPHS_PER_CHUNK, (chunk + 1) * GRAPHS_PER_CHUNK), name, "float64")


@pytest.mark.parametrize("name,chunk", _chunk_params(float32=True))
def test_random_graphs_agree_float32(name, chunk):
    backend_or_skip(name)
    _check_chunk(range(10 ** 5 + chunk * GRAPHS_PER_CHUNK, 10 ** 5 + (chunk + 1) * GRAPHS_PER_CHUNK), name,
                 "float32")


def test_the_generator_covers_the_rewrites_and_fusion():
    """The random graphs exercise every rewrite pass and fusion (so the agreement above means something)."""
    from collections import Counter
    from graphc.passes import PIPELINE
    from test_passes import check_fused_contract
    fired, fused = Counter(), 0
    for seed in range(CHUNKS * GRAPHS_PER_CHUNK):
        phs, out, _, _ = random_graph(seed)
        g = gc.Graph(phs, [out, gc.grad(gc.sum(out), phs[0], disconnected="zero")])
        for p in PIPELINE:
            log = Counter()
            g = p.run(g, log)
            if log:
                fired[p.name] += 1
            assert not [k for k in log if "rejected" in k], (seed, p.name, log)  # every rule keeps types
        fused += check_fused_contract(g)
    assert fused > 100
    assert {"dce", "constant_fold", "algebraic", "stability", "cse", "fusion", "gemm_epilogue"} <= set(fired), fired
