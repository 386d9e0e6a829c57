"""Differential fuzzing: seeded random well-typed graphs (float64/float32/int32/int64, broadcast,
size-0/size-1 and symbolic batch dims) run on every backend at optimize=0/1/2 and compared with the
unoptimised NumPy reference evaluator (graphc.reference.evaluate). Every float graph also gets
gc.grad of a random projection of its outputs w.r.t. its inputs (and, on a sample, gc.hvp: double
backprop) compiled the same way and compared with the reference evaluator on the unoptimised gradient
graph; in float64 the backend's gradient and HVP are also checked against central differences of its
own cost and gradient along a random direction (input values are redrawn off kinks of
abs/relu/maximum/where/max; a graph FD cannot check is counted with its reason), and a sample gets
per-element gc.verify_grad.

    python tests/fuzz.py --graphs 2000 [--backends numpy llvm cuda-emulated] [--seed S]
                         [--grad-every K] [--hvp-every K] [--verify-every K] [--sanitize address|bounds]

prints per backend the graphs, forward/gradient/FD/HVP cases run and every failure with its seed
(reproduce one with --seed S --graphs 1; turn it into a regression test in tests/test_fuzz.py).
Seeds from DTYPE_SEED on draw the other dtypes (float16, bfloat16, int8/16, uint8/16/32/64 and graphs
mixing integer widths and signedness): `python tests/fuzz.py --seed 3000000 --graphs 500`.
`kill PID` (SIGTERM) stops a long run and still prints the tally so far."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
import graphc as gc  # noqa: E402
from graphc.ir import toposort  # noqa: E402
from graphc.reference import evaluate  # noqa: E402

LEVELS = (0, 1, 2)
CHUNK = 20  # graphs built together; compiled in batches of up to BATCH_NODES nodes per (backend, level)
BATCH_NODES = 600  # LLVM's O3 pipeline time grows faster than linearly with the function's size


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


# Seeds from EXT_SEED on draw from a wider op set (EXT_*) too: more gradient rules (composites like
# gelu/elu/var, prod/min reductions, gathers, concatenation, tensor-tensor products), while the graphs
# of the seeds below it (and the regression tests pinned to them) stay as they were.
EXT_SEED = 10 ** 6
SCAN_SEED = 2 * 10 ** 6  # from here also gc.scan loops (BPTT gradients, double backprop through loops)
EXT_UNARY = [
    gc.cos, gc.erf, lambda t: gc.expm1(_bounded(t)), lambda t: gc.log1p(gc.abs(t)), gc.gelu,
    lambda t: gc.gelu(t, approximate="tanh"), gc.elu, gc.selu, gc.square, lambda t: gc.reciprocal(gc.abs(t) + 1.0),
    lambda t: gc.sign(t) * t, lambda t: gc.floor(t * 2.0) * 0.5 + t, lambda t: gc.sqrt(t * t + 0.1),
    lambda t: _bounded(t) ** 3, lambda t: gc.sigmoid(t) * t, lambda t: gc.softplus(-t) + gc.log_softmax(t, -1),
]
EXT_BINARY = [
    lambda a, b: gc.pow(gc.abs(a) + 0.5, gc.tanh(b)), lambda a, b: a / (b * b + 1.0),
    lambda a, b: gc.where(a > 0.5, gc.exp(_bounded(b)), a * b), lambda a, b: gc.minimum(a * b, 1.0),
    lambda a, b: gc.maximum(a, 0.0) * gc.sin(b),
]


def _scan(r, t):
    """A gc.scan over t's leading axis: carry' = tanh(0.7 * carry + x), y = carry' * x (a tiny RNN);
    the initial carry depends on t too (sum over the loop axis, zero for a size-0 loop)."""
    reverse, final = bool(r.integers(0, 2)), bool(r.integers(0, 2))

    def step(carry, x):
        new = gc.tanh(carry * 0.7 + x)
        return new, new * x
    last, ys = gc.scan(step, gc.sum(t, axis=0) * 0.1, t, reverse=reverse)
    return last if final else ys


def _ext_structural(r, t, scan=False):
    """Reductions and shape ops of the wider set (and gc.scan when `scan`), on `t` (returns `t` where one
    does not apply)."""
    if t.ndim == 0:
        return t * gc.sigmoid(t)
    axis = int(r.integers(0, t.ndim))
    if scan and r.integers(0, 2):
        return _scan(r, t)
    kind = int(r.integers(0, 9))
    if kind == 0:
        return gc.prod(gc.tanh(t) + 1.5, axis=axis, keepdims=bool(r.integers(0, 2)))
    if kind == 1:
        return gc.min(t, axis=axis)
    if kind == 2:
        return gc.sqrt(gc.var(t, axis=axis, keepdims=True) + 0.1)
    if kind == 3:
        return gc.concatenate([t, gc.tanh(t)], axis=axis)
    if kind == 4:
        return gc.stack([t, t * t], axis=axis)[(slice(None),) * axis + (1,)]
    if kind == 5 and isinstance(t.shape[axis], int) and t.shape[axis] > 0:
        idx = gc.constant(r.integers(0, t.shape[axis], 4).astype("int64"))
        return gc.take(t, idx, axis=axis)
    if kind == 6 and t.ndim == 2:
        return t @ gc.swapaxes(gc.tanh(t), 0, 1)  # tensor x tensor: both operands get gradients
    if kind == 7:
        return gc.broadcast_to(t, (2,) + tuple(t.shape)) * gc.constant(np.array([1.0, -0.5]).reshape(
            (2,) + (1,) * t.ndim).astype(t.dtype))
    return gc.mean(t * t)


def _no_unify(t):
    """`t`, or a ShapeError (skipped like any) when building it unified a symbolic dim with a concrete one
    ((n, 4) + (n,) needs n == 4, see gc.shapes.DimConstraint): the drawn values have their own row count,
    so graphs stay as they were before dims unified."""
    from graphc.function import graph_constraints
    if graph_constraints(gc.Graph([], [t])):
        raise gc.ShapeError("unifies a symbolic dim with a concrete one")
    return t


def random_graph(seed: int, dtype="float64", inputs=None, rows=None):
    """(placeholders, output, input arrays, all tensors built) for a random graph of 3-12 ops.
    `inputs` replaces the placeholders (gc.verify_grad's); `rows` overrides the batch size."""
    r = np.random.default_rng(seed)
    ext = seed >= EXT_SEED
    unary, binary = (UNARY + EXT_UNARY, BINARY + EXT_BINARY) if ext else (UNARY, BINARY)
    shapes, rows = _shapes(r, seed, rows)
    phs = list(inputs) if inputs is not None else \
        [gc.placeholder(f"s{seed}_x{i}", s, dtype) for i, s in enumerate(shapes)]
    vals = [r.uniform(-2, 2, tuple(rows if isinstance(d, str) else d for d in s)).astype(dtype) for s in shapes]
    pool = list(phs)
    for _ in range(int(r.integers(3, 13))):
        kind = r.random()
        a = pool[int(r.integers(0, len(pool)))]
        if kind < 0.4:
            t = unary[int(r.integers(0, len(unary)))](a)
        elif kind < 0.75:
            b = pool[int(r.integers(0, len(pool)))]
            try:
                t = _no_unify(binary[int(r.integers(0, len(binary)))](a, b))
            except gc.ShapeError:
                continue
        elif kind < 0.85:
            t = _ext_structural(r, a, seed >= SCAN_SEED) if ext and r.integers(0, 2) else _reduce(r, a)
        elif kind < 0.93:
            t = _matmul(r, a)
        else:
            t = _reshape_like(r, a)
        pool.append(t)
    out = pool[-1] if len(pool) > len(phs) else gc.exp(phs[0])
    return phs, out, vals, pool


def _unsigned(t) -> bool:
    return t.dtype.startswith("uint")


INT_UNARY = [lambda t: -t, gc.abs, lambda t: t * 2, lambda t: gc.maximum(t, 0), lambda t: t - 1,
             lambda t: gc.clip(t, *((1, 9) if _unsigned(t) else (-4, 4))),
             # (unsigned values wrap to large ones, which float64 would round: through int64 instead)
             lambda t: gc.cast(gc.cast(t, "int64" if _unsigned(t) else "float64"), t.dtype)]
INT_BINARY = [lambda a, b: a + b, lambda a, b: a - b, gc.maximum, gc.minimum,
              lambda a, b: gc.where(a > b, a, b), lambda a, b: gc.where(a >= b, b - a, a * 0 + 1)]


def _int_reduce(r, t):
    if t.ndim == 0:
        return t
    axis, keep = int(r.integers(0, t.ndim)), bool(r.integers(0, 2))
    return [gc.sum, gc.max, gc.min][int(r.integers(0, 3))](t, axis=axis, keepdims=keep)


def random_int_graph(seed: int, dtype="int32", rows=None):
    """Like random_graph over integer inputs (small values, no products of tensors: no overflow in int32/
    int64; the narrow and unsigned dtypes wrap, as NumPy's do). dtype "intmix": each input its own integer
    dtype (mixed widths and signedness promote as NumPy's; int64 with uint64 is float64)."""
    r = np.random.default_rng(seed)
    shapes, rows = _shapes(r, seed, rows)
    dts = [str(r.choice(MIX_INTS)) if dtype == "intmix" else dtype for _ in shapes]
    phs = [gc.placeholder(f"i{seed}_x{i}", s, d) for i, (s, d) in enumerate(zip(shapes, dts))]
    vals = [r.integers(-5, 6, tuple(rows if isinstance(d, str) else d for d in s)).astype(d)
            for s, d in zip(shapes, dts)]
    pool = list(phs)
    for _ in range(int(r.integers(3, 10))):
        kind, a = r.random(), pool[int(r.integers(0, len(pool)))]
        if kind < 0.4:
            t = INT_UNARY[int(r.integers(0, len(INT_UNARY)))](a)
        elif kind < 0.85:
            b = pool[int(r.integers(0, len(pool)))]
            try:
                t = _no_unify(INT_BINARY[int(r.integers(0, len(INT_BINARY)))](a, b))
            except gc.ShapeError:
                continue
        else:
            t = _int_reduce(r, a)
        pool.append(t)
    out = pool[-1] if len(pool) > len(phs) else -phs[0]
    return phs, out, vals, pool


# seed % 10 picks the kind of graph: mostly float64, then float32, int32/int64, size-0 batch
KINDS = ["float64"] * 4 + ["float32"] * 2 + ["int32", "int64", "empty64", "empty32"]
# from DTYPE_SEED on: the half floats (computed in float32, rounded per op) and the other integer dtypes
DTYPE_SEED = 3 * 10 ** 6
DTYPE_KINDS = ["float16", "bfloat16", "float16", "bfloat16", "int8", "uint8", "int16", "uint16", "uint64",
               "intmix"]
MIX_INTS = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
HALF_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def kind_of(seed: int) -> str:
    kinds = DTYPE_KINDS if seed >= DTYPE_SEED else KINDS
    return kinds[seed % len(kinds)]


def is_int_kind(kind: str) -> bool:
    return kind.startswith(("int", "uint"))

# Finite differences: the cost at x + t*FD_STEP*v (v a random direction, t in FD_POINTS), combined
# by Richardson extrapolation (truncation error O(h^4)), so h can be large enough that rounding in
# the cost stays far below the tolerance.
FD_STEP = 1e-4
FD_POINTS = (-2, -1, 1, 2)
FD_RTOL = 1e-6  # of sum|g * v| (first order) / of max|Hv| + max|fd| (second order)
# plus the rounding floor: float64 rounding of the differenced values (64 ulps of their magnitude),
# amplified by the stencil's 1.5/h; a wrong rule is off by O(1) of the derivative, far above both
FD_ROUNDING = 64 * np.finfo(np.float64).eps * 1.5 / FD_STEP
REDRAWS = 4  # fresh input values tried when the generator's lie within the FD stencil of a kink
# stop_gradient and a round trip through float32 are (by design) not what central differences measure
NOT_DIFFERENTIABLE_BY_FD = {"stop_gradient", "cast"}


@dataclass
class Grad:
    """cost = sum(out * p0) + sum(extra * p1) (p: random projections, fed as inputs), its gradient
    w.r.t. every input and (on a sample) gc.hvp along the FD direction v; `want` holds the reference
    evaluator's grads + hvps + jvps; `fd_skip` says why central differences cannot check this graph.
    The HVP sample also gets gc.jvp of the outputs along v (forward mode)."""
    projs: list
    proj_vals: list
    cost: object
    grads: list
    direction: list
    tans: list = field(default_factory=list)
    hvp_of: list = field(default_factory=list)  # input index of each hvp output
    hvps: list = field(default_factory=list)
    jvps: list = field(default_factory=list)
    want: list = field(default_factory=list)
    fd_skip: str | None = None


@dataclass
class Case:
    seed: int
    kind: str
    phs: list
    outs: list
    vals: list
    dims: dict
    want: list = field(default_factory=list)  # the reference evaluator's values of outs
    grad: Grad | None = None
    error: str | None = None  # building the gradient graph failed: a finding on every backend

    def nodes(self) -> int:
        """Nodes of this case's compiled outputs (unoptimised)."""
        return len(toposort(self.io()[2]))

    def io(self, forward_only: bool = False) -> tuple[list, list, list]:
        """(placeholders, their values, outputs) of this case in a compiled function."""
        g = self.grad
        if g is None or forward_only:
            return list(self.phs), list(self.vals), list(self.outs)
        return (self.phs + g.projs + g.tans, self.vals + g.proj_vals + [g.direction[i] for i in g.hvp_of],
                self.outs + [g.cost] + g.grads + g.hvps + g.jvps)


def make_case(seed: int, gradients: bool = True, hvp: bool = False) -> Case | None:
    """The graph for `seed` (its kind from seed % 10) with its result and one intermediate as outputs,
    and for float graphs (`gradients`) its gradient graph (+ gc.hvp and gc.jvp); None when the reference itself
    rejects it (e.g. max over a size-0 axis)."""
    kind = kind_of(seed)
    rows = 0 if kind.startswith("empty") else None
    dtype = {"empty64": "float64", "empty32": "float32"}.get(kind, kind)
    try:
        if is_int_kind(dtype):
            phs, out, vals, pool = random_int_graph(seed, dtype, rows)
        else:
            phs, out, vals, pool = random_graph(seed, dtype, rows=rows)
    except gc.ShapeError:
        return None  # rejected when built (max over a size-0 axis): tests/test_ops.py covers the message
    r = np.random.default_rng(seed + 10 ** 6)
    extra = pool[int(r.integers(len(phs), len(pool)))] if len(pool) > len(phs) else out
    dims = {str(d): vals[0].shape[0] for d in phs[0].shape if not isinstance(d, int)}  # symbolic batch
    case = Case(seed, kind, phs, [out, extra], vals, dims)
    try:
        case.want = _reference(case.outs, case)
    except (ValueError, IndexError, ArithmeticError):
        return None
    if gradients and not is_int_kind(dtype):
        want = case.want
        try:
            add_gradient(case, hvp)
        except Exception as e:  # noqa: BLE001 - gc.grad failing on a well-typed graph is a finding
            case.error = f"gradient graph: {type(e).__name__}: {e}".splitlines()[0][:300]
            case.grad, case.vals, case.want = None, vals, want  # the forward case still runs
    return case


def _reference(outputs, case: Case, extra_feed=None) -> list:
    feed = {**dict(zip(case.phs, case.vals)), **(extra_feed or {})}
    with np.errstate(all="ignore"):
        return evaluate(outputs, feed, case.dims)


def add_gradient(case: Case, hvp: bool) -> None:
    """Attach case.grad: the projected cost, gc.grad of it w.r.t. every input, gc.hvp on a sample; the
    input values are redrawn (same shapes) when the FD stencil around them would cross a kink."""
    seed, dtype = case.seed, case.phs[0].dtype
    r = np.random.default_rng(seed + 3 * 10 ** 6)
    projs = [gc.placeholder(f"s{seed}_p{k}", o.shape, dtype) for k, o in enumerate(case.outs)]
    cost = gc.sum(case.outs[0] * projs[0]) + gc.sum(case.outs[1] * projs[1])
    g = Grad(projs, [r.standard_normal(w.shape).astype(dtype) for w in case.want], cost,
             gc.grad(cost, case.phs, disconnected="zero"),
             [r.standard_normal(x.shape).astype(dtype) for x in case.vals])
    if hvp:
        used = {id(t) for n in toposort([cost]) for t in n.outputs}
        g.hvp_of = [i for i, p in enumerate(case.phs) if id(p) in used]
        g.tans = [gc.placeholder(f"s{seed}_v{i}", case.phs[i].shape, dtype) for i in g.hvp_of]
        if g.hvp_of:
            g.hvps = gc.hvp(cost, [case.phs[i] for i in g.hvp_of], g.tans)
            g.jvps = gc.jvp(list(case.outs), [case.phs[i] for i in g.hvp_of], g.tans)
    case.grad = g
    g.fd_skip = _choose_values(case, r)
    case.want = _reference(case.outs, case)
    g.want = _reference(g.grads + g.hvps + g.jvps, case, {**dict(zip(projs, g.proj_vals)),
                                               **{t: g.direction[i] for t, i in zip(g.tans, g.hvp_of)}})


def _choose_values(case: Case, r) -> str | None:
    """Keep (or redraw, up to REDRAWS times) input values whose FD stencil along the direction crosses
    no kink (abs/relu/maximum/where/max... keep their branch at every point); the reason FD cannot
    check this graph, or None. Float32 graphs use a wider stencil: their branches must not flip
    under rounding between backends either."""
    on_graph = {n.op.name for n in toposort(case.outs)} & NOT_DIFFERENTIABLE_BY_FD
    step = FD_STEP if case.phs[0].dtype == "float64" else 1e-2
    original = case.vals
    why = None
    for attempt in range(REDRAWS + 1):
        if attempt:
            rr = np.random.default_rng(case.seed + 4 * 10 ** 6 + attempt)
            case.vals = [rr.uniform(-2, 2, x.shape).astype(x.dtype) for x in original]
        why = _stencil_problem(case, step)
        if why is None:
            break
    else:
        case.vals = original
    if case.phs[0].dtype != "float64":
        return f"{case.phs[0].dtype} (gradients checked against the reference only)"
    if on_graph:
        return f"{sorted(on_graph)[0]} on the graph (by design not what central differences measure)"
    return why


def _stencil_problem(case: Case, step: float) -> str | None:
    """Why the FD stencil x + t*step*v (t in 0 and FD_POINTS) is not smooth: a value is not finite,
    or a non-smooth node changes branch between its points; None when it is."""
    nodes = toposort(case.outs)
    tensors = [t for n in nodes for t in n.outputs]
    first = None
    for t in (0,) + FD_POINTS:
        xs = [(x + t * step * v).astype(x.dtype) for x, v in zip(case.vals, case.grad.direction)]
        with np.errstate(all="ignore"):
            env = dict(zip(map(id, tensors), evaluate(tensors, dict(zip(case.phs, xs)), case.dims)))
        if not all(np.all(np.isfinite(v)) for v in env.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"):
            return "non-finite values"
        states = [_branch(n, env) for n in nodes]
        if first is None:
            first = states
            continue
        for n, a, b in zip(nodes, first, states):
            if a is not None and not all(np.array_equal(u, w) for u, w in zip(a, b)):
                return f"kink of {n.op.name} within the FD stencil ({len(FD_POINTS)} redraws tried)"
    return None


def _branch(node, env):
    """The branch a non-smooth node takes at these values (None for a smooth node)."""
    name = node.op.name
    ins = [env[id(t)] for t in node.inputs]
    if name in ("abs", "relu", "leaky_relu", "sign"):
        return [np.sign(ins[0])]
    if name in ("maximum", "minimum"):
        return None if node.inputs[0] is node.inputs[1] else [np.sign(ins[0] - ins[1])]
    if name in ("max", "min"):
        return [ins[0] == getattr(np, name)(ins[0], axis=node.attrs["axis"], keepdims=True)]
    if name in ("floor", "ceil", "round", "trunc", "heaviside") or any(t.dtype == "bool" or "int" in t.dtype
                                                          for t in node.outputs):
        return [env[id(t)] for t in node.outputs]
    return None


def _tol(case: Case, grad: bool = False, want=None) -> dict:
    if is_int_kind(case.kind):
        return dict(rtol=0, atol=0)
    eps = HALF_EPS.get(case.phs[0].dtype)
    if eps is not None:   # a few roundings of the half dtype, normwise (backends differ in float32 libm ulps)
        k = 32 if grad else 8
        big = float(np.max(np.abs(np.asarray(want, np.float64)), initial=0, where=np.isfinite(
            np.asarray(want, np.float64)))) if want is not None and np.size(want) else 0.0
        return dict(rtol=k * eps, atol=k * eps * max(1.0, big))
    if "64" in case.kind:
        return dict(rtol=1e-8, atol=1e-9) if grad else dict(rtol=1e-9, atol=1e-10)
    return dict(rtol=1e-3, atol=1e-4) if grad else dict(rtol=2e-4, atol=2e-5)


def _grad_tol(case: Case, want) -> dict:
    """Tolerance for a gradient/HVP/JVP array: in float32 normwise (atol a share of the largest element),
    since second-order graphs cancel and both sides carry float32 rounding of that size (seed 1000264:
    the float32 reference and llvm are both ~2e-3 off the float64 HVP, in different elements)."""
    tol = _tol(case, grad=True, want=want)
    if case.phs[0].dtype == "float32":
        tol["atol"] = max(tol["atol"], 2e-3 * float(np.max(np.abs(want), initial=0)))
    return tol


def _fd_checked(case: Case) -> bool:
    return case.grad is not None and case.grad.fd_skip is None


def _values_at(cases: list, t: int) -> list:
    """Every case's input values, those of the FD-checked cases moved to x + t*FD_STEP*v."""
    vals = []
    for c in cases:
        _, v, _ = c.io()
        if _fd_checked(c):
            v[:len(c.vals)] = [x + t * FD_STEP * d for x, d in zip(c.vals, c.grad.direction)]
        vals += v
    return vals


def check_cases(cases: list, backend: str, level: int, **options) -> list:
    """[(seed, message)] for the cases whose results on (backend, level) differ from the reference:
    forward values, gradients and HVPs against the reference evaluator, and the gradients and HVPs
    against central differences of the backend's own cost/gradient (all cases in one function; a
    failing batch is split until the failing graphs are isolated)."""
    ios = [c.io() for c in cases]
    try:
        f = gc.function([p for io in ios for p in io[0]], [o for io in ios for o in io[2]], backend=backend,
                        optimize=level, **options)
        with np.errstate(all="ignore"):
            got = f(*[v for io in ios for v in io[1]])
            kept = [np.array(a, copy=True) for a in got]
            moved = {t: f(*_values_at(cases, t)) for t in FD_POINTS} if any(map(_fd_checked, cases)) else {}
    except Exception as e:  # noqa: BLE001 - any crash is a finding; isolate it below
        if len(cases) > 1:
            return _split(cases, backend, level, **options)
        return [(cases[0].seed, _crash(cases[0], e, backend, level, options))]
    bad, k = [], 0
    for c, io in zip(cases, ios):
        n = len(io[2])
        if not all(_same(a, b) for a, b in zip(got[k:k + n], kept[k:k + n])):
            msg = "a result array was overwritten by a later call of the function"
        else:
            msg = _check_case(c, got[k:k + n], {t: m[k:k + n] for t, m in moved.items()})
        if msg:
            bad.append((c.seed, msg))
        k += n
    return bad


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), b, equal_nan=np.asarray(a).dtype.kind in "fc" or
                          np.asarray(a).dtype.name == "bfloat16")


def _crash(case: Case, e: Exception, backend: str, level: int, options: dict) -> str:
    """The message for a compile/run crash of one case, saying whether its forward graph alone crashes."""
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if case.grad is None:
        return msg
    phs, vals, outs = case.io(forward_only=True)
    try:
        with np.errstate(all="ignore"):
            gc.function(phs, outs, backend=backend, optimize=level, **options)(*vals)
    except Exception:  # noqa: BLE001
        return msg
    return f"gradient graph: {msg}"


def _check_case(c: Case, got: list, moved: dict) -> str | None:
    """The first disagreement of one case's outputs (forward, cost, grads, hvps) with the reference
    and with central differences; None when all agree."""
    n = len(c.outs)
    for a, b in zip(got[:n], c.want):
        msg = _compare(a, b, _tol(c, want=b))
        if msg:
            return msg
    g = c.grad
    if g is None:
        return None
    ng, nh = len(g.grads), len(g.hvps)
    grads, hvps, jvps = got[n + 1:n + 1 + ng], got[n + 1 + ng:n + 1 + ng + nh], got[n + 1 + ng + nh:]
    labels = [f"gradient wrt input {i}" for i in range(ng)] + [f"hvp wrt input {i}" for i in g.hvp_of] + \
        [f"jvp of output {k}" for k in range(len(jvps))]
    for label, a, b in zip(labels, grads + hvps + jvps, g.want):
        msg = _compare(a, b, _grad_tol(c, b))
        if msg:
            return f"{label}: {msg}"
    if not moved or g.fd_skip is not None:
        return None
    mag = sum(float(np.sum(np.abs(np.asarray(o, np.float64) * p))) for o, p in zip(got[:n], g.proj_vals))
    return _fd_first(c, grads, {t: float(m[n]) for t, m in moved.items()}, mag) or \
        _fd_vectors(labels[ng:ng + nh], " of the gradient", hvps,
                    [{t: m[n + 1 + i] for t, m in moved.items()} for i in g.hvp_of]) or \
        _fd_vectors(labels[ng + nh:], " of the output", jvps, [{t: m[k] for t, m in moved.items()}
                                                                for k in range(len(jvps))])


def _richardson(f: dict):
    """d/dt at 0 of the values f[t] at t*FD_STEP (t = +-1, +-2), fourth order."""
    d1 = (f[1] - f[-1]) / (2 * FD_STEP)
    d2 = (f[2] - f[-2]) / (4 * FD_STEP)
    return (4 * d1 - d2) / 3


def _fd_first(c: Case, grads: list, cost: dict, mag: float) -> str | None:
    """<grad, v> against central differences of the backend's cost along v (`mag`: sum|out * p|, the
    size of the terms the cost sums, for its rounding)."""
    terms = [np.asarray(g, np.float64) * v for g, v in zip(grads, c.grad.direction)]
    sym = float(sum(np.sum(t) for t in terms))
    scale = float(sum(np.sum(np.abs(t)) for t in terms))
    num = _richardson(cost)
    if not abs(sym - num) <= FD_RTOL * scale + FD_ROUNDING * mag + 1e-9:
        return (f"gradient vs finite differences: <grad, v> = {sym!r}, central differences {num!r} "
                f"(sum|grad*v| {scale:.3g}, step {FD_STEP})")
    return None


def _fd_vectors(labels: list, of: str, syms: list, series: list) -> str | None:
    """Each directional derivative in `syms` (gc.hvp / gc.jvp along v) against central differences of
    the backend's values `series[j]` ({t: array at x + t*FD_STEP*v})."""
    for label, sym, f in zip(labels, syms, series):
        num = _richardson({t: np.asarray(a, np.float64) for t, a in f.items()})
        sym = np.asarray(sym, np.float64)
        scale = float(np.max(np.abs(sym), initial=0) + np.max(np.abs(num), initial=0))
        size = max(float(np.max(np.abs(a), initial=0)) for a in f.values())
        err = np.abs(sym - num)
        if err.size and not np.max(err) <= FD_RTOL * scale + FD_ROUNDING * size + 1e-9:
            k = tuple(int(j) for j in np.unravel_index(int(np.argmax(err)), err.shape))
            return (f"{label} vs finite differences{of}: at {k} {float(sym[k])!r}, central differences "
                    f"{float(num[k])!r} (max|sym| + max|fd| {scale:.3g}, step {FD_STEP})")
    return None


def _split(cases, backend, level, **options):
    half = len(cases) // 2
    return check_cases(cases[:half], backend, level, **options) + check_cases(cases[half:], backend, level, **options)


def _compare(got, want, tol) -> str | None:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"shape {got.shape} != reference {want.shape}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != reference {want.dtype}"
    if got.dtype.name in HALF_EPS:   # (np.isclose cannot promote bfloat16 with a Python float)
        got, want = got.astype(np.float64), want.astype(np.float64)
    try:
        np.testing.assert_allclose(got, want, **tol)
    except AssertionError as e:
        return " ".join(str(e).split())[:300]
    return None


def check_grad(seed: int, backend: str) -> str | None:
    """gc.verify_grad (per element) of float64 graph `seed`, the generator rebuilt on verify_grad's
    placeholders; "skip" for a graph central differences cannot check."""
    case = make_case(seed)
    if case is None or case.grad is None or case.grad.fd_skip:
        return "skip"
    try:
        gc.verify_grad(lambda *xs: random_graph(seed, "float64", inputs=xs)[1], case.vals, rtol=1e-4, atol=1e-6,
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
    cases: int = 0        # forward: graphs x levels
    grads: int = 0        # gradient graphs against the reference evaluator: graphs x levels
    fd: int = 0           # <grad, v> against central differences: graphs x levels
    hvps: int = 0         # gc.hvp and gc.jvp against the reference evaluator: graphs x levels
    hvp_fd: int = 0       # gc.hvp / gc.jvp against central differences of the gradient / output
    verify_grad: int = 0  # per-element gc.verify_grad on a sample of graphs
    seconds: float = 0.0
    fd_skipped: Counter = field(default_factory=Counter)  # why FD could not check a graph -> graphs
    failures: list = field(default_factory=list)


def _sampled(seed: int, every: int) -> bool:
    """1 in `every` graphs of each kind (0: none)."""
    return bool(every) and seed % (every * len(KINDS)) < len(KINDS)


def fuzz(seeds, backends, grad_every: int = 1, levels=LEVELS, log=print, hvp_every: int = 1,
         verify_every: int = 10, tallies: dict | None = None, **options) -> dict:
    """{backend: Tally} over `seeds`; a case is one graph at one optimisation level. Gradient graphs
    (against the reference and, in float64, central differences) for 1 in `grad_every` float graphs
    (0: forward values only), gc.hvp for 1 in `hvp_every` of those, per-element gc.verify_grad for 1 in
    `verify_every` float64 graphs; `options` go to gc.function (e.g. sanitize="address");
    `tallies` (updated in place) lets a caller keep the counts of an interrupted run."""
    tallies = {b: Tally() for b in backends} if tallies is None else tallies
    seeds = list(seeds)
    for i in range(0, len(seeds), CHUNK):
        cases = [c for c in (make_case(s, _sampled(s, grad_every), _sampled(s, hvp_every))
                             for s in seeds[i:i + CHUNK]) if c is not None]
        for b in backends:
            t0, t = time.perf_counter(), tallies[b]
            _run_chunk(t, cases, b, levels, verify_every, options)
            t.seconds += time.perf_counter() - t0
        if log:
            log(f"  seeds {seeds[i]}..{seeds[min(i + CHUNK, len(seeds)) - 1]}: " +
                ", ".join(f"{b} {t.graphs} graphs {len(t.failures)} failures" for b, t in tallies.items()))
    return tallies


def _batches(cases: list) -> list:
    """Consecutive groups of cases of at most BATCH_NODES nodes together (a bigger case alone)."""
    out, size = [], BATCH_NODES
    for c in cases:
        n = c.nodes()
        if size + n > BATCH_NODES:
            out.append([])
            size = 0
        out[-1].append(c)
        size += n
    return out


def _run_chunk(t: Tally, cases: list, backend: str, levels, verify_every: int, options: dict) -> None:
    t.graphs += len(cases)
    t.failures += [(c.seed, c.error) for c in cases if c.error]
    graded = [c for c in cases if c.grad is not None]
    batches = _batches(cases)
    for c in graded:
        if c.grad.fd_skip:
            t.fd_skipped[c.grad.fd_skip.split(" (")[0]] += 1
    for level in levels:
        t.cases += len(cases)
        t.grads += len(graded)
        t.fd += sum(map(_fd_checked, graded))
        t.hvps += sum(bool(c.grad.hvps) for c in graded)
        t.hvp_fd += sum(bool(c.grad.hvps) and _fd_checked(c) for c in graded)
        for batch in batches:
            t.failures += [(s, f"optimize={level}: {m}") for s, m in check_cases(batch, backend, level, **options)]
    for c in cases:
        if c.kind == "float64" and _sampled(c.seed, verify_every):
            m = check_grad(c.seed, backend)
            t.verify_grad += m != "skip"
            if m and m != "skip":
                t.failures.append((c.seed, f"verify_grad: {m}"))


def asan_env() -> dict:
    """The environment a Python process needs to load ASan-instrumented kernels."""
    import subprocess
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0")


def _reexec_with_asan():
    with open("/proc/self/maps") as f:
        if "libasan" not in f.read():
            os.execve(sys.executable, [sys.executable, *sys.argv], asan_env())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", type=int, default=200)
    ap.add_argument("--backends", nargs="+", default=["numpy,llvm,cuda-emulated"],
                    help="backend names (space or comma separated)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (graphs use seed, seed+1, ...)")
    ap.add_argument("--grad-every", type=int, default=1,
                    help="gradient checks on 1 in K float graphs (0: forward values only)")
    ap.add_argument("--hvp-every", type=int, default=1, help="gc.hvp checks on 1 in K float graphs (0: none)")
    ap.add_argument("--verify-every", type=int, default=10,
                    help="per-element gc.verify_grad on 1 in K float64 graphs (0: none)")
    ap.add_argument("--sanitize", choices=["address", "bounds"],
                    help="address: cuda-emulated kernels built with ASan; bounds: llvm accesses checked")
    a = ap.parse_args(argv)
    options = {"sanitize": a.sanitize} if a.sanitize else {}
    if a.sanitize == "address":
        _reexec_with_asan()
    backends = [b.strip() for arg in a.backends for b in arg.split(",") if b.strip()]
    t0 = time.perf_counter()
    tallies = {b: Tally() for b in backends}
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops a long run and still prints its tally
    try:
        fuzz(range(a.seed, a.seed + a.graphs), backends, a.grad_every, hvp_every=a.hvp_every,
             verify_every=a.verify_every, tallies=tallies, **options)
    except KeyboardInterrupt:  # report what ran so far
        print(f"interrupted after {next(iter(tallies.values())).graphs} graphs")
    print(f"fuzz: seeds {a.seed}..{a.seed + a.graphs - 1} in {time.perf_counter() - t0:.0f} s "
          f"(counts are graphs x {len(LEVELS)} optimize levels, except graphs and verify_grad)")
    for b, t in tallies.items():
        print(report_line(b, t))
        for seed, msg in t.failures:
            print(f"    FAIL seed {seed} ({kind_of(seed)}): {msg}")
    skipped = next(iter(tallies.values())).fd_skipped if tallies else {}
    if skipped:
        print("graphs whose gradients central differences do not check (still checked against the reference):")
        for why, n in skipped.most_common():
            print(f"    {n:5d}  {why}")
    return 1 if any(t.failures for t in tallies.values()) else 0


def report_line(backend: str, t: Tally) -> str:
    """One line of the tally: what ran on `backend` and how many failures."""
    return (f"{backend:14s} graphs {t.graphs:5d}  forward {t.cases:6d}  gradient {t.grads:6d}  FD {t.fd:6d}  "
            f"HVP+JVP {t.hvps:6d} (FD {t.hvp_fd:6d})  verify_grad {t.verify_grad:4d}  failures {len(t.failures)}  "
            f"{t.seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
