"""Differential tests: seeded random graphs over the op set (broadcasting, size-1 dims, symbolic
batch) give the same results, and the same gradients, at optimize=0 and optimize=2 on every backend."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import TEST_BACKENDS, backend_or_skip

GRAPHS_PER_CHUNK = 25
CHUNKS = 6       # 150 graphs (results and gradients) per backend (compiled backends: 50 quick, 100 slow)
SLOW_CHUNKS = 6  # 150 more on numpy, marked slow


def _bounded(t):
    return gc.tanh(t) * 2.0


UNARY = [
    lambda t: gc.exp(_bounded(t)), gc.tanh, gc.sigmoid, lambda t: -t, gc.abs, gc.sin, gc.relu, gc.softplus,
    lambda t: gc.sqrt(gc.abs(t) + 1.0), lambda t: gc.log(gc.abs(t) + 1.0), lambda t: gc.log(1.0 + gc.abs(t)),
    lambda t: gc.exp(_bounded(t)) - 1.0, lambda t: t * t, lambda t: gc.leaky_relu(t, 0.1),
    lambda t: gc.log(gc.sigmoid(t)), lambda t: t * 1.0 + 0.0, lambda t: -(-t), lambda t: gc.exp(gc.log(gc.abs(t) + 0.5)),
    lambda t: gc.stop_gradient(t) * 0.5 + t, lambda t: gc.cast(gc.cast(t, "float32"), t.dtype),
    lambda t: (t - t) + t * 3.0, lambda t: gc.clip(t, -1.0, 1.5), lambda t: gc.rsqrt(t * t + 1.0),
]
BINARY = [
    lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / (gc.abs(b) + 1.0),
    gc.maximum, gc.minimum, lambda a, b: gc.where(a > b, a, b * 2.0), lambda a, b: (gc.abs(a) + 0.5) ** 2 + b,
    lambda a, b: a * b + b * a, lambda a, b: gc.exp(_bounded(a)) * gc.sigmoid(b),
]


def _reduce(r, t):
    if t.ndim == 0:
        return t
    axis = int(r.integers(0, t.ndim))
    kind = int(r.integers(0, 7))
    keep = bool(r.integers(0, 2))
    if kind == 0:
        return gc.sum(t, axis=axis, keepdims=keep)
    if kind == 1:
        return gc.mean(t, axis=axis, keepdims=keep)
    if kind == 2:
        return gc.max(t, axis=axis, keepdims=keep)
    if kind == 3:
        return gc.softmax(t, axis=axis)
    if kind == 4:
        return gc.log(gc.softmax(t, axis=axis))
    if kind == 5:
        return gc.log(gc.sum(gc.exp(_bounded(t)), axis=axis, keepdims=keep))
    return gc.logsumexp(t, axis=axis, keepdims=keep)


def _reshape_like(r, t):
    if t.ndim < 2:
        return t
    kind = int(r.integers(0, 3))
    if kind == 0:
        return t.T.T if r.integers(0, 2) else gc.transpose(gc.transpose(t))
    if kind == 1 and all(isinstance(d, int) for d in t.shape):
        return gc.reshape(gc.reshape(t, (-1,)), t.shape)
    return gc.expand_dims(t, 0)[0]


def _matmul(r, t):
    """t @ W (+ b, then an activation): a GEMM with an epilogue to fuse."""
    if t.ndim != 2 or not isinstance(t.shape[1], int):
        return t
    w = gc.constant(r.standard_normal((t.shape[1], 3)).astype(t.dtype))
    y = t @ w
    if r.integers(0, 2):
        y = y + gc.constant(r.standard_normal(3).astype(t.dtype))
    return [gc.tanh, gc.relu, gc.sigmoid, lambda v: v][int(r.integers(0, 4))](y)


def _shapes(r, seed):
    """Input shapes broadcasting against a (rows, cols) base: full, row, column, scalar, size-1 dims;
    a third of the graphs have a symbolic batch dim (named per graph, so graphs can share a function)."""
    rows = int(r.choice([1, 3, 5]))
    cols = int(r.choice([1, 4]))
    sym = bool(r.integers(0, 3) == 0)
    base = (f"n{seed}" if sym else rows, cols)
    pool = [base, (cols,), (1, cols), ()]
    if not sym:
        pool += [(rows, 1)]
    n = int(r.integers(1, 4))
    return [base] + [pool[int(r.integers(0, len(pool)))] for _ in range(n - 1)], rows


def random_graph(seed: int, dtype="float64"):
    """(placeholders, output, input arrays, all tensors built) for a random graph of 3-12 ops."""
    r = np.random.default_rng(seed)
    shapes, rows = _shapes(r, seed)
    phs = [gc.placeholder(f"s{seed}_x{i}", s, dtype) for i, s in enumerate(shapes)]
    vals = [r.uniform(-2, 2, tuple(rows if isinstance(d, str) else d for d in s)).astype(dtype) for s in shapes]
    pool = list(phs)
    for _ in range(int(r.integers(3, 13))):
        kind = r.random()
        a = pool[int(r.integers(0, len(pool)))]
        if kind < 0.4:
            t = UNARY[int(r.integers(0, len(UNARY)))](a)
        elif kind < 0.75:
            b = pool[int(r.integers(0, len(pool)))]
            try:
                t = BINARY[int(r.integers(0, len(BINARY)))](a, b)
            except gc.ShapeError:
                continue
        elif kind < 0.85:
            t = _reduce(r, a)
        elif kind < 0.93:
            t = _matmul(r, a)
        else:
            t = _reshape_like(r, a)
        pool.append(t)
    out = pool[-1] if len(pool) > len(phs) else gc.exp(phs[0])
    return phs, out, vals, pool


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
