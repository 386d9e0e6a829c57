"""Bad input at call time on every backend: wrong rank/shape/dtype, lists, too many/few arguments,
NaN/Inf, an input that aliases a parameter's own array, outputs that would alias state; a failed
call never applies part of its updates."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc


def _counter_fn(backend):
    x = gc.placeholder("x", ("N", 3), "float32")
    c = gc.parameter("c", np.zeros((), np.float32))
    w = gc.parameter("w", np.ones(3, np.float32))
    f = gc.function([x], gc.sum(x * w, axis=1), updates=[(c, c + 1), (w, w * 2.0)], backend=backend)
    return f, c, w


def test_bad_calls_raise_input_errors_and_change_nothing(backend):
    f, c, w = _counter_fn(backend)
    good = np.ones((2, 3), np.float32)
    cases = [(np.ones((2, 4), np.float32),), (np.ones((2, 3, 1), np.float32),), (good.astype(np.float64),),
             (), (good, good), (["a", "b", "c"],), (np.ones((2, 3), np.int64) + 2 ** 40,)]
    for args in cases:
        with pytest.raises(gc.InputError, match="input 'x'|expected 1 input"):
            f(*args)
    assert c.value == 0 and np.all(w.value == 1)  # no failed call applied any update
    np.testing.assert_allclose(f([[1, 2, 3]]), [6])  # a list of numbers is converted
    assert c.value == 1 and np.all(w.value == 2)


def test_nan_and_inf_inputs_propagate_like_numpy(backend):
    x = gc.placeholder("x", (4,), "float64")
    f = gc.function([x], [gc.exp(x) * 2.0, gc.sum(x), gc.maximum(x, 0.0)], backend=backend)
    a = np.array([np.nan, np.inf, -np.inf, 1.0])
    with np.errstate(all="ignore"):
        got, want = f(a), [np.exp(a) * 2.0, np.sum(a), np.maximum(a, 0.0)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # array_equal treats NaN == NaN


def test_input_aliasing_a_parameter_is_read_before_the_update(backend):
    """The parameter's own array passed as an input to a function that updates that parameter:
    the outputs see the old value, the update happens once, and the caller's array is not written."""
    p = gc.parameter("p", np.arange(4, dtype=np.float64))
    x = gc.placeholder("x", (4,), "float64")
    f = gc.function([x], x * 10.0 + p, updates=[(p, p + x)], backend=backend)
    mine = p.value
    before = mine.copy()
    y = f(mine)
    np.testing.assert_array_equal(y, before * 11.0)
    np.testing.assert_array_equal(p.value, before * 2.0)
    np.testing.assert_array_equal(mine, before)  # the array the caller passed (and still holds) is unchanged
    y2 = f(p.value)  # again with the new value: state kept advancing correctly
    np.testing.assert_array_equal(y2, before * 22.0)
    np.testing.assert_array_equal(p.value, before * 4.0)


def test_outputs_never_alias_parameters_or_each_other(backend):
    """An output equal to a parameter (or to an updated value) is a copy: writing into a returned
    array changes neither the parameter nor a later call's results."""
    p = gc.parameter("p", np.ones(3, np.float64))
    x = gc.placeholder("x", (3,), "float64")
    f = gc.function([x], [p, p + x, p + x], updates=[(p, p + x)], backend=backend)
    a, b, c = f(np.ones(3))
    for out in (a, b):
        out[...] = -99.0
    np.testing.assert_array_equal(p.value, [2, 2, 2])
    np.testing.assert_array_equal(c, [2, 2, 2])
    a2, b2, _ = f(np.ones(3))
    np.testing.assert_array_equal(a2, [2, 2, 2])
    np.testing.assert_array_equal(b2, [3, 3, 3])
    np.testing.assert_array_equal(a, [-99, -99, -99])  # the earlier result was not overwritten by the call


def test_input_and_output_buffers_are_not_shared_with_the_caller(backend):
    """Writing into an output does not change the input it was computed from (identity-like graphs)."""
    x = gc.placeholder("x", (3,), "float64")
    f = gc.function([x], [x * 1.0, gc.reshape(x, (3,))], backend=backend)
    a = np.array([1.0, 2.0, 3.0])
    y0, y1 = f(a)
    y0[...] = 0
    y1[...] = 0
    np.testing.assert_array_equal(a, [1, 2, 3])


def test_returning_a_parameter_or_an_input_gives_a_copy(backend):
    """With no updates, an output that is a parameter (or an input) as-is must still be the caller's
    own array: writing into it must not change the parameter or the array passed in."""
    p = gc.parameter("p", np.ones(3, np.float64))
    x = gc.placeholder("x", (3,), "float64")
    f = gc.function([x], [p, x, p * 1.0], backend=backend)
    a = np.full(3, 5.0)
    outs = f(a)
    for o in outs:
        o[...] = -1.0
    np.testing.assert_array_equal(p.value, [1, 1, 1])
    np.testing.assert_array_equal(a, [5, 5, 5])
    np.testing.assert_array_equal(f(a)[0], [1, 1, 1])
