"""A symbolic dim broadcast against a concrete one unifies with it and is checked at call time (issue 17,
defect 8): `(N, 4) * (8, 4)` is `(8, 4)`, needs N == 8, and a batch of 5 is an InputError naming the input,
the dim, 8 vs 5 and the user's line that built the broadcasting node."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc import shapes as _sh
from conftest import assert_close

RNG = np.random.default_rng(17)
C = RNG.standard_normal((8, 4))


def _unified(dtype="float32"):
    x = gc.placeholder("x", (None, 4), dtype)
    c = gc.constant(C.astype(dtype))
    y = x * c   # UNIFY-LINE
    return x, c, y


def test_symbolic_against_concrete_unifies_and_records_the_constraint():
    x, c, y = _unified()
    assert y.shape == (8, 4)
    (con,) = y.node.constraints
    assert con.dim == _sh.dim_symbol("N") and con.value == 8 and "mul" in con.why
    # either order, and through broadcast_to / where / matmul batch dims
    assert (c + x).shape == (8, 4)
    assert gc.broadcast_to(x, (8, 4)).shape == (8, 4)
    assert gc.where(c > 0, x, 0.0).shape == (8, 4)
    w = gc.constant(np.ones((8, 4, 2), np.float32))
    assert (gc.placeholder("b", (None, 3, 4)) @ w).shape == (8, 3, 2)


def test_symbolic_against_one_stays_symbolic_and_two_symbols_still_refuse():
    x = gc.placeholder("x", (None, 4))
    y = x * gc.constant(np.ones((1, 4), np.float32))
    assert y.shape == (_sh.dim_symbol("N"), 4) and y.node.constraints == ()
    with pytest.raises(gc.ShapeError, match="symbolic"):
        x + gc.placeholder("m", ("M", 4))
    with pytest.raises(gc.ShapeError, match="positive"):   # N can never be 0
        x * gc.constant(np.ones((0, 4), np.float32))
    with pytest.raises(gc.ShapeError, match="do not broadcast"):  # two different ints: unchanged
        gc.placeholder("p", (3, 4)) + gc.placeholder("q", (5, 4))


def test_unified_results_match_numpy_and_a_wrong_batch_is_an_input_error(backend):
    x, c, y = _unified()
    out = gc.tanh(y) + gc.constant(np.arange(4, dtype=np.float32))   # fused with what follows
    f = gc.function([x], [y, out], backend=backend)
    a = RNG.standard_normal((8, 4)).astype(np.float32)
    got_y, got_out = f(a)
    want = a * C.astype(np.float32)
    assert_close(got_y, want, backend=backend)
    assert_close(got_out, np.tanh(want) + np.arange(4), backend=backend, rtol=1e-5, atol=1e-5)
    with pytest.raises(gc.InputError) as e:
        f(np.ones((5, 4), np.float32))
    msg = str(e.value)
    assert "input 'x'" in msg and "dim N is 5" in msg and "expected 8" in msg, msg
    assert "test_shapes_unify.py" in msg and "UNIFY-LINE" in msg, msg   # the user's line that broadcast


def test_gradients_through_a_unified_dim(backend):
    x, c, y = _unified("float64")
    cost = gc.sum(gc.sin(y) * y)
    g = gc.grad(cost, x)
    assert g.shape == x.shape                       # the gradient has the input's (symbolic) shape
    f = gc.function([x], [cost, g], backend=backend)
    a = RNG.standard_normal((8, 4))
    val, got = f(a)
    u = a * C
    np.testing.assert_allclose(got, (np.cos(u) * u + np.sin(u)) * C, rtol=1e-9, atol=1e-12)
    # central differences in float64, independent of the gradient rules
    eps, fd = 1e-6, np.zeros_like(a)
    fc = gc.function([x], cost, backend=backend)
    for i in np.ndindex(a.shape):
        d = np.zeros_like(a)
        d[i] = eps
        fd[i] = (fc(a + d) - fc(a - d)) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7)
    with pytest.raises(gc.InputError, match="expected 8"):
        f(np.ones((3, 4)))


def test_the_check_survives_optimisation_that_removes_the_broadcast():
    x, c, y = _unified()
    z = y - y                                        # folds to zeros(8, 4): no node broadcasts x any more
    for level in (0, 1, 2):
        f = gc.function([x], z, optimize=level)
        np.testing.assert_array_equal(f(np.ones((8, 4), np.float32)), np.zeros((8, 4)))
        with pytest.raises(gc.InputError, match="dim N is 5 .*expected 8"):
            f(np.ones((5, 4), np.float32))


def test_expression_dims_and_other_inputs():
    h = gc.placeholder("h", (None, 4))
    hh = gc.concatenate([h, h], axis=0)              # (2*N, 4)
    k = gc.placeholder("k", (None, 1))               # shares N, broadcasts on axis 1 only
    f = gc.function([h, k], hh * gc.constant(C.astype(np.float32)) + gc.concatenate([k, k], axis=0))
    a, b = np.ones((4, 4), np.float32), np.full((4, 1), 2, np.float32)
    np.testing.assert_allclose(f(a, b), np.concatenate([a, a]) * C.astype(np.float32) + 2, rtol=1e-6)
    with pytest.raises(gc.InputError) as e:
        f(np.ones((5, 4), np.float32), np.ones((5, 1), np.float32))
    assert "input 'h'" in str(e.value) and "2*N is 10" in str(e.value) and "expected 8" in str(e.value)
    with pytest.raises(gc.InputError, match="from an earlier input"):   # the usual binding check still first
        f(a, np.ones((5, 1), np.float32))


def test_saved_and_reloaded_function_checks_the_constraint(tmp_path):
    x, c, y = _unified()
    f = gc.function([x], y)
    path = tmp_path / "unified.gcm"
    gc.save(f, path)
    g = gc.function(gc.load(path))
    a = RNG.standard_normal((8, 4)).astype(np.float32)
    np.testing.assert_allclose(g(a), f(a), rtol=1e-6)
    with pytest.raises(gc.InputError, match="dim N is 5 .*expected 8"):
        g(np.ones((5, 4), np.float32))


def test_one_dim_unified_with_two_values_is_refused_when_compiled():
    x = gc.placeholder("x", (None, 4))
    a = x * gc.constant(np.ones((8, 4), np.float32))
    b = x * gc.constant(np.ones((5, 4), np.float32))
    with pytest.raises(gc.ShapeError, match="dim N is unified with 8 .* and with 5"):
        gc.function([x], [a, b])
