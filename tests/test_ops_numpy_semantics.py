"""mod / fmod / floor_divide, shifts and bitwise ops, rounding, cumsum, einsum and diagonal against NumPy.

Integer results must equal NumPy bit for bit on every integer dtype (full-range values, divisors 0 and
-1, shifts past the bit width); float mod/floor_divide must equal NumPy's npy_remainder/npy_floor_divide
including signed zeros, infinities and NaN. The op table (tests/op_table.py) holds the float rows with
their finite-difference gradient checks; this file holds the edge cases and the exact comparisons.
"""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc import dtypes as _dt
from conftest import TEST_BACKENDS, backend_or_skip

ALL_INTS = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
#: the dtypes each backend runs (cuda refuses the narrow and unsigned integers and the half floats today)
CUDA_OK = {"int32", "int64", "float32", "float64", "bool"}


def _runs(backend, dtype):
    return backend != "cuda-emulated" or dtype in CUDA_OK or dtype in _cuda_types()


def _cuda_types():
    from graphc.backends.cuda.prelude import C_TYPES
    return set(C_TYPES)


INT_OPS = {
    "mod": (gc.mod, np.mod), "fmod": (gc.fmod, np.fmod), "floor_divide": (gc.floor_divide, np.floor_divide),
    "left_shift": (gc.left_shift, np.left_shift), "right_shift": (gc.right_shift, np.right_shift),
    "and": (lambda a, b: a & b, np.bitwise_and), "or": (lambda a, b: a | b, np.bitwise_or),
    "xor": (lambda a, b: a ^ b, np.bitwise_xor), "invert": (lambda a, b: ~a, lambda a, b: np.invert(a)),
    "op_mod": (lambda a, b: a % b, lambda a, b: a % b), "op_floordiv": (lambda a, b: a // b, lambda a, b: a // b),
    "scalar_shift": (lambda a, b: (a << 3) ^ (a >> 2), lambda a, b: (a << 3) ^ (a >> 2)),
}


def _int_operands(rng, d, n=96):
    info = np.iinfo(d)
    a = rng.integers(info.min, info.max, size=n, dtype=d, endpoint=True)
    b = rng.integers(info.min, info.max, size=n, dtype=d, endpoint=True)
    a[:8] = [info.min, info.max, 0, 1, info.min, 5, 7, info.max]
    b[:8] = [0 if info.min == 0 else -1, 0, 1, 0, 3, 2, 9, 1]          # x // -1 of MIN wraps; x % 0 is 0
    b[8:40] = rng.integers(0, min(80, info.max), size=32)               # shifts below, at and past the width
    if info.min < 0:
        b[40:56] = -rng.integers(1, 80, size=16)                          # negative divisors and shifts
    return a, b


@pytest.mark.parametrize("d", ALL_INTS)
def test_integer_ops_equal_numpy_bit_for_bit(d, backend, rng):
    if not _runs(backend, d):
        pytest.skip(f"{backend} does not run {d}")
    a, b = _int_operands(rng, d)
    x, y = gc.placeholder("x", a.shape, d), gc.placeholder("y", b.shape, d)
    names = list(INT_OPS)
    outs = [INT_OPS[n][0](x, y) for n in names]
    with np.errstate(all="ignore"):
        want = [np.asarray(INT_OPS[n][1](a, b)) for n in names]
        f = gc.function([x, y], outs, backend=backend)
        got = f(a, b)
    assert f.program.info.get("fallback_ops", []) == []
    for n, g, w, o in zip(names, got, want, outs):
        assert o.dtype == w.dtype.name and g.dtype == w.dtype, f"{n}: {o.dtype} / {g.dtype}, numpy {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=f"{n} on {d}")


def _float_operands(rng, d):
    vals = [5, -5, 5, -5, 7, 0, -0.0, np.inf, 3, -3, np.nan, 1e10, -2.5, 7.5, 0.3, -np.inf, 4, -0.0, 6]
    divs = [3, 3, -3, -3, 0, -2, 2, 2, np.inf, np.inf, 1, 3, 0.5, -2.5, 0.1, 3, -np.inf, -2, -3]
    npd = _dt.np_dtype(d)
    with np.errstate(over="ignore"):   # 1e10 is inf in float16
        a = np.concatenate([vals, rng.uniform(-10, 10, 64)]).astype(npd)
        b = np.concatenate([divs, rng.uniform(-3, 3, 64)]).astype(npd)
    return a, b


@pytest.mark.parametrize("d", ["float16", "bfloat16", "float32", "float64"])
def test_float_mod_floor_divide_rounding_equal_numpy(d, backend, rng):
    """Exact values and signs (NaN where NumPy has NaN): npy_remainder / npy_fmod / npy_floor_divide,
    np.round (halves to even), ceil, trunc; float16/bfloat16 computed in float32 and rounded once."""
    if not _runs(backend, d):
        pytest.skip(f"{backend} does not run {d}")
    a, b = _float_operands(rng, d)
    x, y = gc.placeholder("x", a.shape, d), gc.placeholder("y", b.shape, d)
    ops = {"mod": (gc.mod, np.mod), "fmod": (gc.fmod, np.fmod), "floor_divide": (gc.floor_divide, np.floor_divide),
           "op_mod": (lambda p, q: p % q, np.mod), "round": (lambda p, q: gc.round(p), lambda p, q: np.round(p)),
           "ceil": (lambda p, q: gc.ceil(p), lambda p, q: np.ceil(p)),
           "trunc": (lambda p, q: gc.trunc(q), lambda p, q: np.trunc(q))}
    half = _dt.is_half(d)
    with np.errstate(all="ignore"):
        want = [np.asarray(r(a.astype(np.float32), b.astype(np.float32)) if half else r(a, b)).astype(a.dtype)
                for _, r in ops.values()]
        got = gc.function([x, y], [f(x, y) for f, _ in ops.values()], backend=backend)(a, b)
    for n, g, w in zip(ops, got, want):
        assert g.dtype == w.dtype, n
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        np.testing.assert_array_equal(g64, w64, err_msg=f"{n} on {d}")
        same_sign = np.signbit(g64) == np.signbit(w64)
        assert (same_sign | np.isnan(w64)).all(), f"{n} on {d}: signs of zeros differ at {np.nonzero(~same_sign)}"


def test_dtype_rules_are_numpys():
    t = gc.placeholder("t", (2,), "bool")
    i8, u8 = gc.placeholder("i", (2,), "int8"), gc.placeholder("u", (2,), "uint8")
    f = gc.placeholder("f", (2,), "float32")
    tb = np.ones(2, bool)
    for fn, ref in ((gc.mod, np.mod), (gc.floor_divide, np.floor_divide), (gc.left_shift, np.left_shift),
                    (gc.bitwise_xor, np.bitwise_xor)):
        assert fn(t, t).dtype == ref(tb, tb).dtype.name
    assert (t & t).node.op is gc.logical_and.op and (t | t).node.op is gc.logical_or.op   # bools: logical
    assert (i8 & u8).dtype == "int16" and (u8 << 1).dtype == "uint8" and (i8 % 3).dtype == "int8"
    assert gc.round(i8).dtype == "int8" and gc.ceil(f).dtype == "float32" and gc.tan(i8).dtype == "float16"
    assert gc.isnan(i8).dtype == "bool" and gc.cumsum(i8).dtype == "int64" and gc.cumsum(u8).dtype == "uint64"
    assert gc.cumsum(i8, dtype="int8").dtype == "int8"
    for bad in (lambda: f & f, lambda: ~f, lambda: gc.left_shift(f, 1),
                lambda: gc.bitwise_and(gc.placeholder("a", (2,), "int64"), gc.placeholder("b", (2,), "uint64"))):
        with pytest.raises(gc.DTypeError, match="integer or bool"):
            bad()


def test_bool_bitwise_not_and_shapes(backend, rng):
    a = rng.random((3, 4)) > 0.5
    b = rng.random((4,)) > 0.5
    x, y = gc.placeholder("x", a.shape, "bool"), gc.placeholder("y", b.shape, "bool")
    got = gc.function([x, y], [~x, x ^ y, gc.bitwise_not(x) & y], backend=backend)(a, b)
    for g, w in zip(got, [~a, a ^ b, ~a & b]):
        assert g.dtype == np.bool_
        np.testing.assert_array_equal(g, w)


def test_trig_and_hyperbolic_values(backend, rng):
    """Edges: asin/acos/atanh outside [-1, 1] are NaN, atanh(+-1) is +-inf, acosh below 1 NaN."""
    a = np.concatenate([rng.uniform(-0.99, 0.99, 32), [1.0, -1.0, 1.5, -2.0, 0.0]])
    for d in ("float32", "float64"):
        x = gc.placeholder("x", a.shape, d)
        fns = [(gc.tan, np.tan), (gc.asin, np.arcsin), (gc.acos, np.arccos), (gc.sinh, np.sinh),
               (gc.cosh, np.cosh), (gc.asinh, np.arcsinh), (gc.acosh, np.arccosh), (gc.atanh, np.arctanh)]
        v = a.astype(d)
        with np.errstate(all="ignore"):
            got = gc.function([x], [f(x * 3) if f in (gc.acosh, gc.sinh, gc.cosh, gc.asinh) else f(x)
                                     for f, _ in fns], backend=backend)(v)
            want = [r(v * np.asarray(3, d)) if f in (gc.acosh, gc.sinh, gc.cosh, gc.asinh) else r(v) for f, r in fns]
        for (f, _), g, w in zip(fns, got, want):
            np.testing.assert_allclose(g, w, rtol=2e-6 if d == "float32" else 1e-13, atol=0,
                                       err_msg=f"{f.__name__} {d} on {backend}")


# ---- cumsum ------------------------------------------------------------------------------------------

def _np_cumsum(x, axis, exclusive, reverse, dtype=None):
    y = np.flip(x, axis) if reverse else x
    c = np.cumsum(y, axis=axis, dtype=dtype)
    if exclusive:
        c = c - y.astype(c.dtype)
    return np.flip(c, axis) if reverse else c


@pytest.mark.parametrize("exclusive,reverse", [(False, False), (True, False), (False, True), (True, True)])
def test_cumsum_matches_numpy(exclusive, reverse, backend, rng):
    a = rng.standard_normal((3, 5, 4))
    ints = rng.integers(-100, 100, (4, 6)).astype(np.int8)     # wraps in int8
    x, k = gc.placeholder("x", a.shape, "float64"), gc.placeholder("k", ints.shape, "int8")
    outs = [gc.cumsum(x, 1, exclusive=exclusive, reverse=reverse),
            gc.cumsum(x.transpose(2, 0, 1), -1, exclusive=exclusive, reverse=reverse),   # through a strided view
            gc.cumsum(k, 1, dtype="int8", exclusive=exclusive, reverse=reverse),
            gc.cumsum(k, 0, exclusive=exclusive, reverse=reverse)]
    want = [_np_cumsum(a, 1, exclusive, reverse), _np_cumsum(a.transpose(2, 0, 1), 2, exclusive, reverse),
            _np_cumsum(ints, 1, exclusive, reverse, np.int8), _np_cumsum(ints, 0, exclusive, reverse)]
    f = gc.function([x, k], outs, backend=backend)
    got = f(a, ints)
    assert f.program.info.get("fallback_ops", []) == []
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_cumsum_flat_symbolic_and_half(rng):
    a = rng.standard_normal((5, 3)).astype(np.float32)
    x = gc.placeholder("x", (None, 3), "float32")
    for be in ("numpy", "llvm"):
        backend_or_skip(be)
        f = gc.function([x], [gc.cumsum(x), gc.cumsum(x, 0, reverse=True)], backend=be)
        for n in (5, 2):
            got = f(a[:n])
            np.testing.assert_allclose(got[0], np.cumsum(a[:n]), rtol=1e-5)
            np.testing.assert_allclose(got[1], np.flip(np.cumsum(np.flip(a[:n], 0), 0), 0), rtol=1e-5, atol=1e-6)
        h = gc.placeholder("h", (64,), "bfloat16")
        v = np.full(64, 1.0, _dt.np_dtype("bfloat16"))
        # accumulated in float32, each output rounded once: 1..64 are all exact in bfloat16 below 256
        np.testing.assert_array_equal(gc.function([h], gc.cumsum(h), backend=be)(v).astype(np.float32),
                                      np.arange(1, 65, dtype=np.float32))


def test_cumsum_gradient_second_order(rng):
    gc.verify_grad(lambda x: gc.sum(gc.cumsum(x * x, 0, exclusive=True) * gc.cumsum(x, 1, reverse=True)),
                   [rng.standard_normal((3, 4))], rng=1)
    x = gc.placeholder("x", (3, 4), "float64")
    h = gc.hessian(gc.sum(gc.cumsum(x * x, 1) ** 2), x)
    assert h is not None


# ---- einsum and diagonal ------------------------------------------------------------------------------

EINSUM = [("ij,jk->ik", [(3, 4), (4, 5)]), ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]), ("i,i", [(4,), (4,)]),
          ("ij->i", [(3, 4)]), ("ij->ji", [(3, 4)]), ("ii->i", [(3, 3)]), ("ii", [(3, 3)]),
          ("...ii->...i", [(2, 3, 3)]), ("i,j->ij", [(3,), (4,)]), ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),
          ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]), ("bn,anm,bm->ba", [(2, 3), (4, 3, 5), (2, 5)]),
          ("ba", [(3, 4)]), ("iij->j", [(3, 3, 2)]), ("ijk,ikj->i", [(2, 3, 4), (2, 4, 3)]), ("i...->...", [(3, 2, 4)]),
          (" i j , j k ", [(2, 3), (3, 2)]), ("...,...", [(2, 3), (3,)]), ("ij,i->j", [(3, 4), (1,)]),
          ("i,i->", [(0,), (0,)])]


@pytest.mark.parametrize("eq,shapes", EINSUM, ids=[e for e, _ in EINSUM])
def test_einsum_matches_numpy(eq, shapes, backend, rng):
    xs = [rng.standard_normal(s) for s in shapes]
    phs = [gc.placeholder(f"x{i}", s, "float64") for i, s in enumerate(shapes)]
    got = gc.function(phs, gc.einsum(eq, *phs), backend=backend)(*xs)
    want = np.einsum(eq, *xs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eq,shapes", [EINSUM[k] for k in (1, 6, 7, 9, 11, 14)],
                         ids=[EINSUM[k][0] for k in (1, 6, 7, 9, 11, 14)])
def test_einsum_gradients(eq, shapes, rng):
    gc.verify_grad(lambda *a: gc.einsum(eq, *a), [rng.standard_normal(s) for s in shapes], rng=1)


def test_einsum_ints_and_errors(rng):
    a, b = rng.integers(-9, 9, (3, 4)), rng.integers(-9, 9, (4, 2)).astype(np.int32)
    x, y = gc.placeholder("x", a.shape, "int64"), gc.placeholder("y", b.shape, "int32")
    got = gc.function([x, y], gc.einsum("ij,jk->ki", x, y))(a, b)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.einsum("ij,jk->ki", a, b))
    for eq in ("ij,jk->iq", "ij->ii", "i1->i", "ijk->i"):
        with pytest.raises(gc.ShapeError):
            gc.einsum(eq, x)
    with pytest.raises(gc.ShapeError, match="sizes"):
        gc.einsum("ij,ij->i", x, y)


@pytest.mark.parametrize("offset,ax", [(0, (0, 1)), (1, (0, 1)), (-2, (0, 1)), (2, (2, 0)), (0, (1, 2)), (7, (0, 1))])
def test_diagonal_matches_numpy(offset, ax, backend, rng):
    a = rng.standard_normal((4, 5, 3))
    x = gc.placeholder("x", a.shape, "float64")
    got = gc.function([x], gc.diagonal(x, offset, *ax), backend=backend)(a)
    np.testing.assert_array_equal(got, np.diagonal(a, offset, *ax))
    if np.diagonal(a, offset, *ax).size:
        gc.verify_grad(lambda t: gc.diagonal(t, offset, *ax), [a], rng=1)


def test_new_ops_are_native_everywhere():
    """No new op runs on the host: each has a row in llvm's and cuda's tables."""
    from graphc.ops.cumulative import CumSum
    from graphc.ops import elementwise as E
    ops = [CumSum] + [f.op for f in (E.tan, E.asin, E.acos, E.sinh, E.cosh, E.asinh, E.acosh, E.atanh, E.ceil,
                                     E.trunc, E.round, E.mod, E.fmod, E.floor_divide, E.left_shift, E.right_shift,
                                     E.bitwise_and, E.bitwise_or, E.bitwise_xor, E.bitwise_not)]
    for be in TEST_BACKENDS:
        if be == "numpy":
            continue
        from graphc.function import get_backend
        lowered = get_backend(be).lowered_ops()
        assert [op.name for op in ops if op not in lowered] == [], be
