"""float16, bfloat16 and the 8/16-bit and unsigned integers on every backend that supports them.

References: NumPy itself (its promotion rules, its integer arithmetic with wrap-around, its float16
loops and ml_dtypes' bfloat16) on the same arrays; the op table's float rows run in float16/bfloat16
against their NumPy reference computed in float32 and rounded; gradients against graphc's float64
gradient (verified against finite differences by test_ops/test_grad_ops) at the same inputs.
"""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

import graphc as gc
from graphc import dtypes as _dt
from conftest import backend_or_skip
from op_table import CASES, make_inputs

BF16 = np.dtype(ml_dtypes.bfloat16)
HALVES = ["float16", "bfloat16"]
NEW_INTS = ["int8", "uint8", "int16", "uint16", "uint32", "uint64"]
ALL_INTS = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
#: the backends that run the new dtypes (cuda's kernels run here through cuda-emulated; nvcc compiles
#: them in test_dtypes_cuda.py)
BACKENDS = ["numpy", "llvm", "cuda-emulated"]


#: the op table and gradient table compile one function per row on these; cuda-emulated runs the same
#: rows batched into a few functions (test_dtypes_cuda.py: one host compile per batch, not per row)
PER_ROW_BACKENDS = ["numpy", "llvm"]


@pytest.fixture(params=BACKENDS)
def be(request):
    return backend_or_skip(request.param)


@pytest.fixture(params=PER_ROW_BACKENDS)
def be_row(request):
    return backend_or_skip(request.param)


def npdt(d):
    return _dt.np_dtype(d)


# ---- promotion -------------------------------------------------------------------------------------

def test_supported_dtypes():
    for d in HALVES + NEW_INTS:
        assert d in _dt.SUPPORTED and gc.placeholder("x", (2,), d).dtype == d
    assert _dt.as_dtype(ml_dtypes.bfloat16) == "bfloat16"
    assert _dt.is_float("bfloat16") and _dt.is_unsigned("uint16") and _dt.is_int("uint64")
    with pytest.raises(gc.GraphcError, match="unsupported dtype"):
        _dt.as_dtype("complex64")


@pytest.mark.parametrize("a,b", list(itertools.combinations_with_replacement(_dt.SUPPORTED, 2)))
def test_promotion_is_numpys(a, b):
    """Every pair: the dtype of graphc's a + b is the dtype NumPy gives for arrays of a and b."""
    x, y = gc.placeholder("x", (2,), a), gc.placeholder("y", (2,), b)
    want = (np.ones(2, npdt(a)) + np.ones(2, npdt(b))).dtype.name if "bool" not in (a, b) or a == b == "bool" \
        else np.result_type(npdt(a), npdt(b)).name
    got = gc.add(x, y).dtype if not a == b == "bool" else "bool"
    assert got == want


def test_bfloat16_promotion_rules():
    """bfloat16 as JAX/ml_dtypes promote it where they agree; with wider integers as float16 does."""
    p = _dt.promote
    assert p("bfloat16", "float16") == "float32"
    assert p("bfloat16", "float32") == "float32" and p("bfloat16", "float64") == "float64"
    assert p("bfloat16", "int8") == p("bfloat16", "uint8") == p("bfloat16", "bool") == "bfloat16"
    assert p("bfloat16", "int16") == p("float16", "int16") == "float32"
    assert p("bfloat16", "int32") == p("float16", "int32") == "float64"
    x = gc.placeholder("x", (2,), "bfloat16")
    assert (x + 2).dtype == (x * 2.5).dtype == (2 - x).dtype == "bfloat16"   # Python scalars are weak
    assert (gc.placeholder("u", (2,), "uint8") + 1).dtype == "uint8"
    assert (gc.placeholder("i", (2,), "int8") * 1.5).dtype == "float64"


@pytest.mark.parametrize("d", ["bool"] + ALL_INTS + HALVES)
def test_unary_float_and_reduction_dtypes_are_numpys(d):
    """exp(int8) is float16, int16 / int16 float64, sum(uint8) uint64, mean(int8) float64 (NumPy's rules)."""
    a = np.ones(3, npdt(d))
    x = gc.placeholder("x", (3,), d)
    assert gc.exp(x).dtype == np.exp(a).dtype.name
    assert gc.sqrt(x).dtype == np.sqrt(a).dtype.name
    assert (x / x).dtype == (a / a).dtype.name
    assert gc.sum(x).dtype == (np.sum(a).dtype.name if d not in HALVES else d)
    assert gc.mean(x).dtype == (np.mean(a).dtype.name if d not in HALVES else d)


# ---- integers: bit for bit against NumPy --------------------------------------------------------------

def _full_range(rng, d, shape):
    """Random values over the dtype's whole range, with its extremes (so products and sums wrap)."""
    info = np.iinfo(npdt(d))
    a = rng.integers(info.min, info.max, size=shape, dtype=npdt(d), endpoint=True)
    flat = a.reshape(-1)
    flat[:4] = [info.min, info.max, 0, 1][:flat.size]
    return a


INT_EXPRS = {
    "add": (lambda a, b: a + b, lambda a, b: a + b),
    "sub": (lambda a, b: a - b, lambda a, b: a - b),
    "mul": (lambda a, b: a * b, lambda a, b: a * b),
    "neg": (lambda a, b: -a, lambda a, b: -a),
    "abs": (lambda a, b: gc.abs(a), lambda a, b: np.abs(a)),
    "sign": (lambda a, b: gc.sign(a), lambda a, b: np.sign(a)),
    "relu": (lambda a, b: gc.relu(a), lambda a, b: np.maximum(a, np.zeros((), a.dtype))),
    "maximum": (gc.maximum, np.maximum),
    "minimum": (gc.minimum, np.minimum),
    "less": (lambda a, b: a < b, lambda a, b: a < b),
    "greater_equal": (lambda a, b: a >= b, lambda a, b: a >= b),
    "equal": (lambda a, b: gc.equal(a, b), lambda a, b: a == b),
    "where": (lambda a, b: gc.where(a > b, a, b), lambda a, b: np.where(a > b, a, b)),
    "div": (lambda a, b: a / gc.maximum(b, 1), lambda a, b: a / np.maximum(b, 1)),
    "scalar": (lambda a, b: a * 3 + 7, lambda a, b: a * 3 + 7),
    "sum": (lambda a, b: gc.sum(a, axis=1), lambda a, b: np.sum(a, axis=1)),
    "sum_all": (lambda a, b: gc.sum(a), lambda a, b: np.sum(a)),
    "prod": (lambda a, b: gc.prod(a, axis=0), lambda a, b: np.prod(a, axis=0)),
    "max": (lambda a, b: gc.max(a, axis=1), lambda a, b: np.max(a, axis=1)),
    "min": (lambda a, b: gc.min(a, axis=0), lambda a, b: np.min(a, axis=0)),
    "argmax": (lambda a, b: gc.argmax(a, axis=1), lambda a, b: np.argmax(a, axis=1)),
    "argmin": (lambda a, b: gc.argmin(a, axis=0), lambda a, b: np.argmin(a, axis=0)),
    "matmul": (lambda a, b: a @ gc.transpose(b), lambda a, b: a @ b.T),
}


@pytest.mark.parametrize("d", NEW_INTS)
def test_integer_ops_equal_numpy_bit_for_bit(d, be, rng):
    """One graph with every integer op on full-range values: wrap-around, unsigned comparisons and
    max/min, sums to int64/uint64, argmax, wrapping matmul, true division to float64."""
    shape = (5, 7)
    a, b = _full_range(rng, d, shape), _full_range(rng, d, shape)
    x, y = gc.placeholder("x", shape, d), gc.placeholder("y", shape, d)
    names = list(INT_EXPRS)
    outs = [INT_EXPRS[n][0](x, y) for n in names]
    with np.errstate(over="ignore"):
        want = [np.asarray(INT_EXPRS[n][1](a, b)) for n in names]
    got = gc.function([x, y], outs, backend=be)(a, b)
    for n, g, w, o in zip(names, got, want, outs):
        assert o.dtype == w.dtype.name, f"{n}: dtype rule {o.dtype}, numpy {w.dtype}"
        assert g.dtype == w.dtype, f"{n}: result dtype {g.dtype}, numpy {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=f"{n} on {d}")


#: mixed signedness and width: int8+uint8 -> int16, uint32+int32 -> int64, int64+uint64 -> float64, ...
MIXED = [("int8", "uint8"), ("uint8", "int16"), ("uint16", "int8"), ("int32", "uint32"), ("uint32", "int64"),
         ("int64", "uint64"), ("uint64", "int8"), ("uint8", "uint64"), ("int16", "float16"), ("uint8", "bfloat16"),
         ("int8", "float32"), ("uint64", "float64"), ("bool", "uint16")]


@pytest.mark.parametrize("da,db", MIXED)
def test_mixed_promotion_equals_numpy(da, db, be, rng):
    """Mixed signed/unsigned (and int/float) arithmetic and exact comparisons (int64 against uint64 is
    compared exactly by NumPy 2, not through float64)."""
    shape = (4, 6)

    def draw(d):
        if d == "bool":
            return rng.integers(0, 2, shape).astype(bool)
        if _dt.is_float(d):
            return rng.uniform(-40, 40, shape).astype(npdt(d))
        return _full_range(rng, d, shape)
    a, b = draw(da), draw(db)
    x, y = gc.placeholder("x", shape, da), gc.placeholder("y", shape, db)
    outs = [x + y, x * y, x < y, x >= y, gc.equal(x, y), gc.maximum(x, y), gc.where(x > y, x, y)]
    with np.errstate(over="ignore", invalid="ignore"):
        want = [a + b, a * b, a < b, a >= b, a == b, np.maximum(a, b), np.where(a > b, a, b)]
    got = gc.function([x, y], outs, backend=be)(a, b)
    for k, (g, w, o) in enumerate(zip(got, want, outs)):
        assert o.dtype == w.dtype.name and g.dtype == w.dtype, (k, o.dtype, g.dtype, w.dtype)
        if _dt.is_half(w.dtype.name):   # float32 compute, one rounding: NumPy's float16 / ml_dtypes loops
            np.testing.assert_array_equal(g.astype(np.float64), w.astype(np.float64), err_msg=str(k))
        else:
            np.testing.assert_array_equal(g, w, err_msg=str(k))


def test_int64_uint64_comparison_is_exact(be):
    a = np.array([2 ** 63 - 1, -1, 5, -(2 ** 63)], np.int64)
    b = np.array([2 ** 63, 2 ** 64 - 1, 5, 0], np.uint64)
    x, y = gc.placeholder("x", (4,), "int64"), gc.placeholder("y", (4,), "uint64")
    got = gc.function([x, y], [x < y, x <= y, x > y, gc.equal(x, y), gc.not_equal(x, y)], backend=be)(a, b)
    for g, w in zip(got, [a < b, a <= b, a > b, a == b, a != b]):
        np.testing.assert_array_equal(g, w)


CAST_SOURCES = ["float64", "float32", "float16", "bfloat16"] + ALL_INTS + ["bool"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NumPy warns on the out-of-range casts it makes
@pytest.mark.parametrize("src", CAST_SOURCES)
def test_casts_equal_numpy(src, be, rng):
    """Casts from `src` to every dtype: integer truncation/wrap (in-range floats), float16/bfloat16 rounding
    to nearest even from float64, float32 and every integer (one correct rounding, as NumPy/ml_dtypes)."""
    n = 64
    if _dt.is_float(src):
        a = rng.uniform(-120, 120, n)
        a[:6] = [0.5, -0.5, 1 + 2 ** -11 + 2 ** -40, 1 + 2 ** -8 + 2 ** -40, 65519.0, 1e-7]   # ties and rounding
        a = a.astype(npdt(src))
    elif src == "bool":
        a = rng.integers(0, 2, n).astype(bool)
    else:
        a = _full_range(rng, src, (n,))
    x = gc.placeholder("x", (n,), src)
    targets = [d for d in CAST_SOURCES if d != src]
    got = gc.function([x], [gc.cast(x, d) for d in targets], backend=be)(a)
    for d, g in zip(targets, got):
        with np.errstate(over="ignore", invalid="ignore"):
            w = a.astype(npdt(d))
        keep = np.ones(n, bool)
        if _dt.is_float(src) and _dt.is_int(d):   # out-of-range float -> int is undefined in C: skip those
            info = np.iinfo(npdt(d))
            keep = (a.astype(np.float64) > info.min - 1) & (a.astype(np.float64) < info.max + 1)
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g[keep].astype(np.float64) if _dt.is_half(d) else g[keep],
                                      w[keep].astype(np.float64) if _dt.is_half(d) else w[keep],
                                      err_msg=f"{src} -> {d}")


# ---- float16 / bfloat16: the op table --------------------------------------------------------------------

#: spacing of 1.0 in each dtype
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
#: op-table rows whose result is a long chain of roundings or needs a wider range than float16's
LOOSE = {"var": 4, "var_ddof": 4, "std": 4, "mlp_chain": 4, "pow": 2, "softplus": 2, "log_softmax": 2,
         "logsumexp": 2, "logsumexp_all": 2, "mean_all": 2, "mean": 2}
SKIP_HALF = set()


def _half_params():
    out = []
    for c in CASES:
        if "float32" not in c.dtypes or c.name in SKIP_HALF:
            continue
        for d in HALVES:
            out.append(pytest.param(c, c.shapes[0], d, id=f"{c.name}-{d}"))
    return out


def half_row(case, shapes, dtype, rng, prefix="x"):
    """An op-table row in `dtype`: (placeholders, inputs, output tensor, reference). The inputs are the
    row's float32 inputs rounded to the dtype; the reference is the row's NumPy reference computed in
    float32 on them. The output's dtype is checked: the half dtype where float32 gives float32 (metrics
    stay float32), else the same (float64, int64, ...)."""
    xs32 = make_inputs(case, shapes, "float32", rng)
    xs = [x.astype(npdt(dtype)) if i not in case.int_inputs else x for i, x in enumerate(xs32)]
    phs = [gc.placeholder(f"{prefix}{i}", x.shape, x.dtype.name) for i, x in enumerate(xs)]
    out = case.fn(*phs)
    with np.errstate(all="ignore"):
        want = np.asarray(case.ref(*[x.astype(np.float32) if x.dtype == npdt(dtype) else x for x in xs]))
    out32 = case.fn(*[gc.placeholder(f"y{i}", x.shape, "float32" if x.dtype == npdt(dtype) else x.dtype.name)
                      for i, x in enumerate(xs)])
    assert out.dtype in ((dtype, "float32") if out32.dtype == "float32" else (out32.dtype,)), out.dtype
    return phs, xs, out, want


def check_half_row(case, dtype, got, out, want, where):
    """A row's result within a few roundings of the half dtype of its float32 reference."""
    assert got.shape == want.shape, f"{case.name} {dtype} on {where}"
    assert got.dtype == npdt(out.dtype), f"{case.name} {dtype} on {where}"
    k = 4 * LOOSE.get(case.name, 1)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=k * EPS[dtype],
                               atol=k * EPS[dtype] * scale, err_msg=f"{case.name} {dtype} on {where}")


@pytest.mark.parametrize("case,shapes,dtype", _half_params())
def test_op_table_in_half_precision(case, shapes, dtype, be_row, rng):
    """Every float op-table row (first shape) in float16/bfloat16 on numpy and llvm: the result dtype is
    the half dtype and the values are the row's NumPy reference computed in float32 on the same
    (half-representable) inputs, within a few roundings of the half dtype."""
    phs, xs, out, want = half_row(case, shapes, dtype, rng)
    got = gc.function(phs, out, backend=be_row)(*xs)
    check_half_row(case, dtype, got, out, want, be_row)


@pytest.mark.parametrize("dtype", HALVES)
def test_half_elementwise_bit_equal_across_backends(dtype, rng):
    """float32 compute with one rounding per op: llvm's fused loops equal the NumPy backend's result bit
    for bit for the correctly rounded ops (+ - * / sqrt, comparisons, max, where)."""
    a = rng.uniform(-4, 4, (33, 17)).astype(npdt(dtype))
    b = rng.uniform(0.5, 4, (33, 17)).astype(npdt(dtype))
    x, y = gc.placeholder("x", a.shape, dtype), gc.placeholder("y", b.shape, dtype)
    outs = [(x * y + x) / y - gc.sqrt(y), gc.where(x > 0, x * 0.1, y), gc.maximum(x, -y) * 3.0, gc.cast(x, "float16"),
            gc.cast(x + y, "bfloat16"), gc.cast(gc.cast(x, "float64") * 1.000001, dtype)]
    want = [(a * b + a) / b - np.sqrt(b), np.where(a > 0, a * np.asarray(0.1, a.dtype), b),
            np.maximum(a, -b) * np.asarray(3, a.dtype), a.astype(np.float16), (a + b).astype(BF16),
            (a.astype(np.float64) * 1.000001).astype(a.dtype)]
    for be in BACKENDS:
        got = gc.function([x, y], outs, backend=backend_or_skip(be))(a, b)
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g.astype(np.float64), w.astype(np.float64), err_msg=f"{be} {k}")


@pytest.mark.parametrize("dtype", HALVES)
def test_half_sums_accumulate_in_float32(dtype, be):
    """A sum of 4096 ones in float16/bfloat16 is 4096 (float32 accumulation, one rounding), not the 256
    or 2048 a half-precision running sum sticks at; the same for matmul."""
    n = 4096
    x = gc.placeholder("x", (2, n), dtype)
    a = np.ones((2, n), npdt(dtype))
    s, m, mm = gc.function([x], [gc.sum(x, axis=1), gc.mean(x), x @ gc.transpose(x)], backend=be)(a)
    np.testing.assert_array_equal(s.astype(np.float64), [n, n])
    assert float(m) == 1.0
    np.testing.assert_array_equal(mm.astype(np.float64), np.full((2, 2), n))


# ---- gradients in float16 / bfloat16 -------------------------------------------------------------------

def _grad_params():
    out = []
    for c in CASES:
        if "float32" not in c.dtypes or not c.grad or c.int_inputs:
            continue
        for d in HALVES:
            out.append(pytest.param(c, c.shapes[0], d, id=f"{c.name}-{d}"))
    return out


def half_grad_row(case, shapes, dtype, rng, prefix="x"):
    """A differentiable row's gradient graph in `dtype`: (placeholders, inputs, gradient tensors, the
    float64 gradients at the same inputs from the NumPy backend); None for a row with an empty input."""
    xs = [x.astype(npdt(dtype)) for x in make_inputs(case, shapes, "float32", rng)]
    if any(x.size == 0 for x in xs):
        return None

    def grads_of(d):
        phs = [gc.placeholder(f"{prefix}{i}", x.shape, d) for i, x in enumerate(xs)]
        out = case.fn(*phs)
        proj = np.linspace(-1, 1, max(1, int(np.prod(out.shape)))).reshape(out.shape)
        cost = gc.sum(out * gc.constant(proj, d))
        return phs, gc.grad(cost, phs)
    phs64, g64 = grads_of("float64")
    want = gc.function(phs64, g64, backend="numpy")(*[x.astype(np.float64) for x in xs])
    phs, grads = grads_of(dtype)
    return phs, xs, grads, want


def check_half_grads(case, dtype, got, want, where):
    k = 8 * LOOSE.get(case.name, 1)
    for g, w in zip(got, want):
        assert g.dtype == npdt(dtype), f"{case.name} {dtype} on {where}"
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=k * EPS[dtype], atol=k * EPS[dtype] * scale,
                                   err_msg=f"{case.name} {dtype} on {where}")


@pytest.mark.parametrize("case,shapes,dtype", _grad_params())
def test_gradients_in_half_precision(case, shapes, dtype, be_row, rng):
    """gc.grad of each differentiable float row in float16/bfloat16 (float32 compute, rounded on store)
    against the float64 gradient at the same inputs (loose: each op rounds its result)."""
    row = half_grad_row(case, shapes, dtype, rng)
    if row is None:
        pytest.skip("empty input")
    phs, xs, grads, want = row
    got = gc.function(phs, grads, backend=be_row)(*xs)
    check_half_grads(case, dtype, got, want, be_row)


# ---- a float16 and a bfloat16 MLP train ------------------------------------------------------------------

def _train_mlp(dtype, backend, steps=8):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 8)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64)
    w1 = gc.parameter("w1", rng.normal(0, 0.4, (8, 16)), dtype=dtype)
    b1 = gc.parameter("b1", np.zeros(16), dtype=dtype)
    w2 = gc.parameter("w2", rng.normal(0, 0.4, (16, 2)), dtype=dtype)
    x = gc.placeholder("x", (None, 8), dtype)
    t = gc.placeholder("t", (None,), "int64")
    logits = gc.tanh(x @ w1 + b1) @ w2
    loss = -gc.mean(gc.sum(gc.log_softmax(logits, axis=1) * gc.one_hot(t, 2, dtype), axis=1))
    params = [w1, b1, w2]
    grads = gc.grad(loss, params)
    step = gc.function([x, t], loss, updates=[(p, p - 0.5 * g) for p, g in zip(params, grads)], backend=backend)
    predict = gc.function([x], gc.argmax(logits, axis=1), backend=backend)
    xs = X.astype(npdt(dtype))
    losses = [float(step(xs, y)) for _ in range(steps)]
    assert backend == "numpy" or step.program.info["fallback_ops"] == []
    acc = float(np.mean(predict(xs) == y))
    return losses, acc, [p.get_value() for p in params]


@pytest.mark.parametrize("dtype", HALVES)
def test_half_mlp_trains_close_to_float32(dtype, be):
    losses, acc, params = _train_mlp(dtype, be)
    ref_losses, ref_acc, _ = _train_mlp("float32", be)
    assert all(p.dtype == npdt(dtype) for p in params)
    assert losses[-1] < 0.8 * losses[0], losses
    np.testing.assert_allclose(losses, ref_losses, rtol=8 * EPS[dtype], atol=8 * EPS[dtype])
    assert abs(acc - ref_acc) <= 0.1


# ---- a float16 and a bfloat16 LeNet-like step: convolutions and pools native --------------------------------

def _lenet_step(dtype, backend):
    """Loss and gradients of a LeNet-like step: conv2d + bias + relu, max pooling, conv-based average and
    L2 pooling, a dense layer, log_softmax."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4, 1, 12, 12)).astype(npdt(dtype))
    y = rng.integers(0, 3, 4)
    w1 = gc.parameter("w1", rng.normal(0, 0.3, (4, 1, 3, 3)), dtype=dtype)
    b1 = gc.parameter("b1", rng.normal(0, 0.1, 4), dtype=dtype)
    w2 = gc.parameter("w2", rng.normal(0, 0.3, (3, 4 * 5 * 5)), dtype=dtype)
    x = gc.placeholder("x", (None, 1, 12, 12), dtype)
    t = gc.placeholder("t", (None,), "int64")
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, w1) + gc.reshape(b1, (1, 4, 1, 1))), 2)
    h = gc.avg_pool2d(h, 3, stride=1, padding=1) + gc.lp_pool2d(h, 2.0, 3, stride=1, padding=1)
    logits = gc.reshape(h, (-1, 4 * 5 * 5)) @ gc.transpose(w2)
    loss = -gc.mean(gc.sum(gc.log_softmax(logits, axis=1) * gc.one_hot(t, 3, dtype), axis=1))
    f = gc.function([x, t], [loss, *gc.grad(loss, [w1, b1, w2, x])], backend=backend)
    return f, f(X, y)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("dtype", HALVES)
def test_half_lenet_step_is_native(dtype, backend):
    """conv2d, its input and weight gradients, max/avg/L2 pooling in float16/bfloat16 run as kernels (float32
    compute, one rounding per result: nothing on the host) and equal the NumPy backend within the dtype's
    rounding."""
    f, got = _lenet_step(dtype, backend_or_skip(backend))
    assert f.program.info["fallback_ops"] == []
    _, want = _lenet_step(dtype, "numpy")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == npdt(dtype)
        scale = max(1.0, float(np.max(np.abs(w.astype(np.float64)))))
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=8 * EPS[dtype],
                                   atol=8 * EPS[dtype] * scale)


# ---- files, random draws ------------------------------------------------------------------------------------

def test_save_load_keeps_half_and_small_int_constants(tmp_path):
    """bfloat16 arrays (no .npy dtype) are saved as their bits and come back as bfloat16; float16/uint16 as is."""
    x = gc.placeholder("x", (3,), "bfloat16")
    w = gc.parameter("w", np.array([0.3, 2, 3]), dtype="bfloat16")
    y = x * gc.constant(np.array([1.5, 2, 3]), "bfloat16") * w + gc.constant(np.array([1, 2, 3]), "uint16") \
        + gc.constant(np.array([1, 2, 3.5]), "float16")
    gc.save(gc.Graph([x], [y]), tmp_path / "m.graphc")
    g = gc.load(tmp_path / "m.graphc")
    assert g.outputs[0].dtype == y.dtype == "float32"
    a = np.array([1, -2, 0.5], BF16)
    np.testing.assert_array_equal(gc.function(g.inputs, g.outputs)(a)[0], gc.function([x], [y])(a)[0])
    assert g.parameters[0].value.dtype == BF16


@pytest.mark.parametrize("dtype", HALVES)
def test_random_draws_in_half_precision(dtype, be):
    """uniform draws are exact in the dtype and never round up to 1; llvm draws the reference's values."""
    u = gc.random.uniform((4096,), dtype=dtype, key=np.array([3, 0], np.int64))
    z = gc.random.normal((4096,), dtype=dtype, key=np.array([4, 0], np.int64))
    got_u, got_z = gc.function([], [u, z], backend=be)()
    want_u, want_z = gc.evaluate([u, z], {})
    assert got_u.dtype == npdt(dtype) and float(got_u.max()) < 1.0 and float(got_u.min()) >= 0.0
    np.testing.assert_array_equal(got_u.astype(np.float64), want_u.astype(np.float64))
    np.testing.assert_allclose(got_z.astype(np.float64), want_z.astype(np.float64), rtol=EPS[dtype], atol=EPS[dtype])
    assert abs(float(np.mean(got_z.astype(np.float64)))) < 0.1 and abs(float(np.std(got_z.astype(np.float64))) - 1) < 0.1
