"""Differential fuzzing: seeded random well-typed graphs (float64/float32/int32/int64, broadcast,
size-0/size-1 and symbolic batch dims) run on every backend at optimize=0/1/2 and compared with the
unoptimised NumPy reference evaluator (graphc.reference.evaluate); for a sample of float64 graphs the
gradients are checked against central differences (gc.verify_grad) on each backend.

    python tests/fuzz.py --graphs 2000 [--backends numpy,llvm,cuda-emulated] [--seed S] [--grad-every K]

prints per-backend counts of graphs and cases run and every failure with its seed (reproduce one
with --seed S --graphs 1; turn it into a regression test in tests/test_fuzz.py)."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
import graphc as gc  # noqa: E402
from graphc.ir import toposort  # noqa: E402
from graphc.reference import evaluate  # noqa: E402

LEVELS = (0, 1, 2)
CHUNK = 20  # graphs compiled into one function per (backend, level); a failing chunk is bisected


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


def _shapes(r, seed, rows=None):
    """Input shapes broadcasting against a (rows, cols) base: full, row, column, scalar, size-1 dims;
    a third of the graphs have a symbolic batch dim (named per graph, so graphs can share a function).
    `rows` overrides the drawn row count (e.g. 0 for size-0 graphs) without changing later draws."""
    drawn = int(r.choice([1, 3, 5]))
    rows = drawn if rows is None else rows
    cols = int(r.choice([1, 4]))
    sym = bool(r.integers(0, 3) == 0)
    base = (f"n{seed}" if sym else rows, cols)
    pool = [base, (cols,), (1, cols), ()]
    if not sym:
        pool += [(rows, 1)]
    n = int(r.integers(1, 4))
    return [base] + [pool[int(r.integers(0, len(pool)))] for _ in range(n - 1)], rows


def random_graph(seed: int, dtype="float64", inputs=None, rows=None):
    """(placeholders, output, input arrays, all tensors built) for a random graph of 3-12 ops.
    `inputs` replaces the placeholders (gc.verify_grad's); `rows` overrides the batch size."""
    r = np.random.default_rng(seed)
    shapes, rows = _shapes(r, seed, rows)
    phs = list(inputs) if inputs is not None else \
        [gc.placeholder(f"s{seed}_x{i}", s, dtype) for i, s in enumerate(shapes)]
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


INT_UNARY = [lambda t: -t, gc.abs, lambda t: t * 2, lambda t: gc.maximum(t, 0), lambda t: t - 1,
             lambda t: gc.clip(t, -4, 4), lambda t: gc.cast(gc.cast(t, "float64"), t.dtype)]
INT_BINARY = [lambda a, b: a + b, lambda a, b: a - b, gc.maximum, gc.minimum,
              lambda a, b: gc.where(a > b, a, b), lambda a, b: gc.where(a >= b, b - a, a * 0 + 1)]


def _int_reduce(r, t):
    if t.ndim == 0:
        return t
    axis, keep = int(r.integers(0, t.ndim)), bool(r.integers(0, 2))
    return [gc.sum, gc.max, gc.min][int(r.integers(0, 3))](t, axis=axis, keepdims=keep)


def random_int_graph(seed: int, dtype="int32", rows=None):
    """Like random_graph over integer inputs (small values, no products of tensors: no overflow)."""
    r = np.random.default_rng(seed)
    shapes, rows = _shapes(r, seed, rows)
    phs = [gc.placeholder(f"i{seed}_x{i}", s, dtype) for i, s in enumerate(shapes)]
    vals = [r.integers(-5, 6, tuple(rows if isinstance(d, str) else d for d in s)).astype(dtype) for s in shapes]
    pool = list(phs)
    for _ in range(int(r.integers(3, 10))):
        kind, a = r.random(), pool[int(r.integers(0, len(pool)))]
        if kind < 0.4:
            t = INT_UNARY[int(r.integers(0, len(INT_UNARY)))](a)
        elif kind < 0.85:
            b = pool[int(r.integers(0, len(pool)))]
            try:
                t = INT_BINARY[int(r.integers(0, len(INT_BINARY)))](a, b)
            except gc.ShapeError:
                continue
        else:
            t = _int_reduce(r, a)
        pool.append(t)
    out = pool[-1] if len(pool) > len(phs) else -phs[0]
    return phs, out, vals, pool


# seed % 10 picks the kind of graph: mostly float64, then float32, int32/int64, size-0 batch
KINDS = ["float64"] * 4 + ["float32"] * 2 + ["int32", "int64", "empty64", "empty32"]


@dataclass
class Case:
    seed: int
    kind: str
    phs: list
    outs: list
    vals: list
    dims: dict


def make_case(seed: int) -> Case | None:
    """The graph for `seed` (its kind from seed % 10) with its result and one intermediate as outputs;
    None when the reference itself rejects it (e.g. max over a size-0 axis)."""
    kind = KINDS[seed % len(KINDS)]
    rows = 0 if kind.startswith("empty") else None
    dtype = {"empty64": "float64", "empty32": "float32"}.get(kind, kind)
    try:
        if dtype.startswith("int"):
            phs, out, vals, pool = random_int_graph(seed, dtype, rows)
        else:
            phs, out, vals, pool = random_graph(seed, dtype, rows=rows)
    except gc.ShapeError:
        return None  # rejected when built (max over a size-0 axis): tests/test_ops.py covers the message
    r = np.random.default_rng(seed + 10 ** 6)
    extra = pool[int(r.integers(len(phs), len(pool)))] if len(pool) > len(phs) else out
    dims = {str(d): vals[0].shape[0] for d in phs[0].shape if not isinstance(d, int)}  # symbolic batch
    try:
        with np.errstate(all="ignore"):
            evaluate([out, extra], dict(zip(phs, vals)), dims)
    except (ValueError, ArithmeticError):
        return None
    return Case(seed, kind, phs, [out, extra], vals, dims)


def _tol(case: Case) -> dict:
    if case.kind.startswith("int"):
        return dict(rtol=0, atol=0)
    return dict(rtol=1e-9, atol=1e-10) if "64" in case.kind else dict(rtol=2e-4, atol=2e-5)


def check_cases(cases: list, backend: str, level: int, **options) -> list:
    """[(seed, message)] for the cases whose results on (backend, level) differ from the reference
    (all cases in one function; a failing batch is split until the failing graphs are isolated)."""
    phs = [p for c in cases for p in c.phs]
    outs = [o for c in cases for o in c.outs]
    try:
        f = gc.function(phs, outs, backend=backend, optimize=level, **options)
        with np.errstate(all="ignore"):
            got = f(*[v for c in cases for v in c.vals])
    except Exception as e:  # noqa: BLE001 - any crash is a finding; isolate it below
        if len(cases) > 1:
            return _split(cases, backend, level, **options)
        return [(cases[0].seed, f"{type(e).__name__}: {e}".splitlines()[0][:300])]
    bad, k = [], 0
    for c in cases:
        with np.errstate(all="ignore"):
            want = evaluate(c.outs, dict(zip(c.phs, c.vals)), c.dims)
        for a, b in zip(got[k:k + len(c.outs)], want):
            msg = _compare(a, b, _tol(c))
            if msg:
                bad.append((c.seed, msg))
                break
        k += len(c.outs)
    return bad


def _split(cases, backend, level, **options):
    half = len(cases) // 2
    return check_cases(cases[:half], backend, level, **options) + check_cases(cases[half:], backend, level, **options)


def _compare(got, want, tol) -> str | None:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"shape {got.shape} != reference {want.shape}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != reference {want.dtype}"
    try:
        np.testing.assert_allclose(got, want, **tol)
    except AssertionError as e:
        return " ".join(str(e).split())[:300]
    return None


# stop_gradient and a round trip through float32 are (by design) not what central differences measure
NOT_DIFFERENTIABLE_BY_FD = {"stop_gradient", "cast"}


def check_grad(seed: int, backend: str) -> str | None:
    """gc.verify_grad of float64 graph `seed` (the generator rebuilt on verify_grad's placeholders)."""
    phs, out, vals, _ = random_graph(seed, "float64")
    if {n.op.name for n in toposort([out])} & NOT_DIFFERENTIABLE_BY_FD:
        return "skip"
    try:
        gc.verify_grad(lambda *xs: random_graph(seed, "float64", inputs=xs)[1], vals, rtol=1e-4, atol=1e-6,
                       backend=backend)
    except gc.GradientError as e:
        if "does not depend on" in str(e):
            return "skip"  # an input the output ignores: verify_grad has nothing to compare
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None


@dataclass
class Tally:
    graphs: int = 0
    cases: int = 0
    grads: int = 0
    failures: list = field(default_factory=list)


def fuzz(seeds, backends, grad_every: int = 10, levels=LEVELS, log=print, **options) -> dict:
    """{backend: Tally} over `seeds`; a case is one graph at one optimisation level; `options` go to
    gc.function (e.g. sanitize="address" for cuda-emulated)."""
    tallies = {b: Tally() for b in backends}
    seeds = list(seeds)
    for i in range(0, len(seeds), CHUNK):
        cases = [c for c in map(make_case, seeds[i:i + CHUNK]) if c is not None]
        for b in backends:
            t = tallies[b]
            t.graphs += len(cases)
            for level in levels:
                t.cases += len(cases)
                t.failures += [(s, f"optimize={level}: {m}") for s, m in check_cases(cases, b, level, **options)]
            for c in cases:
                if grad_every and c.kind == "float64" and c.seed % (grad_every * len(KINDS)) < len(KINDS):
                    m = check_grad(c.seed, b)
                    t.grads += m != "skip"
                    if m and m != "skip":
                        t.failures.append((c.seed, f"gradient: {m}"))
        if log:
            log(f"  seeds {seeds[i]}..{seeds[min(i + CHUNK, len(seeds)) - 1]}: " +
                ", ".join(f"{b} {t.graphs} graphs {len(t.failures)} failures" for b, t in tallies.items()))
    return tallies


def asan_env() -> dict:
    """The environment a Python process needs to load ASan-instrumented kernels."""
    import subprocess
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0")


def _reexec_with_asan():
    with open("/proc/self/maps") as f:
        if "libasan" not in f.read():
            os.execve(sys.executable, [sys.executable, *sys.argv], asan_env())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", type=int, default=200)
    ap.add_argument("--backends", default="numpy,llvm,cuda-emulated")
    ap.add_argument("--seed", type=int, default=0, help="first seed (graphs use seed, seed+1, ...)")
    ap.add_argument("--grad-every", type=int, default=10, help="check gradients of 1 in K float64 graphs")
    ap.add_argument("--sanitize", choices=["address"], help="cuda-emulated kernels built with ASan")
    a = ap.parse_args(argv)
    options = {"sanitize": a.sanitize} if a.sanitize else {}
    if a.sanitize:
        _reexec_with_asan()
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    t0 = time.perf_counter()
    tallies = fuzz(range(a.seed, a.seed + a.graphs), backends, a.grad_every, **options)
    print(f"fuzz: seeds {a.seed}..{a.seed + a.graphs - 1} in {time.perf_counter() - t0:.0f} s")
    for b, t in tallies.items():
        print(f"{b:14s} graphs {t.graphs:5d}  cases {t.cases:6d} (x{len(LEVELS)} levels)  "
              f"gradient checks {t.grads:4d}  failures {len(t.failures)}")
        for seed, msg in t.failures:
            print(f"    FAIL seed {seed} ({KINDS[seed % len(KINDS)]}): {msg}")
    return 1 if any(t.failures for t in tallies.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
