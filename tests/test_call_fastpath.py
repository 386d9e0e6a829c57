"""gc.function's call fast path (graphc/function.py _fast_path): positional ndarrays of the exact dtype,
C-contiguous and aligned, with shapes an earlier call bound, skip the argument checks; anything else
takes the full path, with the same conversions and the same error messages. Results against NumPy."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphc as gc
from graphc.errors import InputError, NumericalError
from conftest import backend_or_skip

FAST = ["numpy", "llvm"]


def _scale(backend, shape=(None, 4)):
    x = gc.placeholder("x", shape, "float32")
    w = gc.parameter("w", np.arange(1, 5, dtype=np.float32))
    return x, w, gc.function([x], x * w + 1.0, backend=backend_or_skip(backend))


@pytest.mark.parametrize("backend", FAST)
def test_seen_shapes_skip_the_checks(backend, monkeypatch):
    x, w, f = _scale(backend)
    a = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(f(a), a * w.value + 1)
    assert (a.shape,) in f._seen

    def no_bind(*args, **kw):
        raise AssertionError("the full path ran")
    monkeypatch.setattr(f, "_bind", no_bind)
    b = np.full((3, 4), 2.0, np.float32)
    np.testing.assert_array_equal(f(b), b * w.value + 1)   # fast: same shape
    with pytest.raises(AssertionError, match="full path"):
        f(np.ones((5, 4), np.float32))   # a new shape takes the full path
    with pytest.raises(AssertionError, match="full path"):
        f(b.astype(np.float64))   # so does another dtype, a list, a strided view, a keyword
    with pytest.raises(AssertionError, match="full path"):
        f(np.ones((3, 8), np.float32)[:, ::2])
    with pytest.raises(AssertionError, match="full path"):
        f(x=b)


@pytest.mark.parametrize("backend", FAST)
def test_everything_else_is_checked_and_converted_as_before(backend):
    x, w, f = _scale(backend)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    f(a)
    want = a * w.value + 1
    np.testing.assert_array_equal(f(a.tolist()), want)                       # a list
    np.testing.assert_array_equal(f(np.asfortranarray(np.ones((3, 4), np.float32))), np.ones((3, 4)) * w.value + 1)
    strided = np.zeros((3, 8), np.float32)
    strided[:, ::2] = a
    np.testing.assert_array_equal(f(strided[:, ::2]), want)                  # not contiguous: copied
    raw = np.zeros(a.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(3, 4)  # misaligned
    raw[...] = a
    assert not raw.flags.aligned
    np.testing.assert_array_equal(f(raw), want)
    np.testing.assert_array_equal(f(x=a), want)
    with pytest.raises(InputError, match=r"input 'x': expected dtype float32, got float64; convert it"):
        f(a.astype(np.float64))
    with pytest.raises(InputError, match=r"input 'x': expected shape \(N, 4\), got \(3, 5\)"):
        f(np.ones((3, 5), np.float32))
    with pytest.raises(InputError, match=r"expected 1 inputs \(x\), got 2"):
        f(a, a)
    with pytest.raises(InputError, match="expected 1 inputs"):
        f()
    np.testing.assert_array_equal(f(a), want)   # and the fast path still answers afterwards


def test_a_unified_dim_is_still_checked_on_new_shapes():
    """x (N, 4) * c (8, 4) makes N == 8: a call with N = 8 registers its shape; N = 3 is refused with
    the full path's message every time."""
    x = gc.placeholder("x", (None, 4), "float32")
    c = gc.constant(np.ones((8, 4), np.float32))
    f = gc.function([x], x * c, backend=backend_or_skip("llvm"))
    np.testing.assert_array_equal(f(np.full((8, 4), 2, np.float32)), np.full((8, 4), 2))
    for _ in range(2):
        with pytest.raises(InputError, match="expected 8"):
            f(np.ones((3, 4), np.float32))


@pytest.mark.parametrize("backend", FAST)
def test_outputs_are_fresh_and_parameters_are_read_each_call(backend):
    p = gc.parameter("p", np.ones(4, np.float32))
    x = gc.placeholder("x", (4,), "float32")
    f = gc.function([x], [x + p, p], backend=backend_or_skip(backend))
    a = np.zeros(4, np.float32)
    y0, q0 = f(a)
    y1, q1 = f(a)
    assert y0 is not y1 and not np.shares_memory(y0, y1) and q1 is not p.value
    y1[...] = -5   # the caller owns it
    q1[...] = -5
    np.testing.assert_array_equal(p.value, 1)
    p.set_value(np.full(4, 3, np.float32))   # seen at the next call
    y2, q2 = f(a)
    np.testing.assert_array_equal(y2, 3)
    np.testing.assert_array_equal(q2, 3)
    np.testing.assert_array_equal(y0, 1)


@pytest.mark.parametrize("backend", FAST)
def test_updates_through_the_fast_path_under_the_lock(backend):
    """p <- p + x from 4 threads, 50 calls each: every update lands (they are serialised), the
    outputs are the values before each update."""
    p = gc.parameter("p", np.zeros(3, np.float64))
    x = gc.placeholder("x", (3,), "float64")
    f = gc.function([x], p * 1.0, updates=[(p, p + x)], backend=backend_or_skip(backend))
    one = np.ones(3)
    f(one)
    seen, errors = [], []

    def worker():
        try:
            for _ in range(50):
                seen.append(float(f(one)[0]))
        except Exception as e:   # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_array_equal(p.value, 201)
    assert sorted(seen) == [float(k) for k in range(1, 201)]


@pytest.mark.parametrize("backend", FAST)
def test_threads_with_their_own_inputs(backend):
    x, w, f = _scale(backend, (4,))
    f(np.zeros(4, np.float32))
    errors = []

    def worker(k):
        try:
            a = np.full(4, k, np.float32)
            for _ in range(100):
                np.testing.assert_array_equal(f(a), a * w.value + 1)
        except Exception as e:   # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_debug_mode_still_checks_every_call():
    x = gc.placeholder("x", (3,), "float32")
    f = gc.function([x], gc.log(x), backend=backend_or_skip("llvm"), mode="debug")
    np.testing.assert_allclose(f(np.ones(3, np.float32)), 0)
    for _ in range(2):
        with pytest.raises(NumericalError, match="log"):
            f(np.array([1, -1, 2], np.float32))


def test_run_time_index_errors_on_the_fast_path():
    """take's run-time index check (the status word) is read after every call."""
    x = gc.placeholder("x", (5,), "float32")
    i = gc.placeholder("i", (2,), "int64")
    f = gc.function([x, i], gc.take(x, i, axis=0), backend=backend_or_skip("llvm"))
    a = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(f(a, np.array([0, 4])), [0, 4])
    for _ in range(2):
        with pytest.raises(gc.GraphcError, match="out of range"):
            f(a, np.array([1, 7]))
        np.testing.assert_array_equal(f(a, np.array([3, 1])), [3, 1])


def test_many_inputs_take_the_full_path():
    xs = [gc.placeholder(f"x{k}", (2,), "float32") for k in range(20)]
    total = xs[0]
    for t in xs[1:]:
        total = total + t
    f = gc.function(xs, total, backend=backend_or_skip("llvm"))
    assert f._fast is None
    args = [np.full(2, k, np.float32) for k in range(20)]
    np.testing.assert_array_equal(f(*args), np.full(2, sum(range(20))))


def test_the_call_is_one_builtin_call():
    """CPython: graphc_call is a METH_FASTCALL built-in function per thread (bound to that thread's
    table); it returns None and leaves the reference counts of its arguments as they were."""
    import sys
    from graphc.backends.llvm import program
    x, w, f = _scale("llvm", (4,))
    a = np.zeros(4, np.float32)
    f(a)
    spec = f.program._specs[()]
    assert f.program.runner({}) is spec.run
    if program.NEW_BUILTIN is None:
        assert spec.call is not None
        return
    assert spec.fastcall and spec.call is None
    out = np.empty(4, np.float32)
    before = [sys.getrefcount(o) for o in (a, w.value, out, None)]
    for _ in range(100):
        assert spec._tls.fast(a, w.value, out) is None
    after = [sys.getrefcount(o) for o in (a, w.value, out, None)]
    assert before[:3] == after[:3] and abs(after[3] - before[3]) < 50
    np.testing.assert_array_equal(out, a * w.value + 1)


def test_more_arrays_than_arguments_are_walked_in_a_loop():
    """70 parameters + an input + an output: graphc_call reads the arrays in a loop (CALL_ARGS_MAX)."""
    from graphc.backends.llvm import program
    rng = np.random.default_rng(0)
    ps = [gc.parameter(f"p{k}", rng.standard_normal(3).astype(np.float32)) for k in range(70)]
    assert len(ps) + 2 > program.CALL_ARGS_MAX
    x = gc.placeholder("x", (3,), "float32")
    total = x
    for k, p in enumerate(ps):
        total = total + p * float(k + 1)
    f = gc.function([x], total, backend=backend_or_skip("llvm"))
    a = np.ones(3, np.float32)
    for _ in range(2):
        want = a + sum(p.value.astype(np.float64) * (k + 1) for k, p in enumerate(ps))
        np.testing.assert_allclose(f(a), want, rtol=1e-5)
        ps[-1].set_value(ps[-1].value + 1)


@pytest.mark.parametrize("n_params", [1, 70])
def test_the_ctypes_call_where_no_builtin_can_be_made(monkeypatch, n_params):
    """Without PyCFunction_NewEx (program.NEW_BUILTIN None) graphc_call is a ctypes function of one tuple;
    the prologue flag works the same."""
    from graphc.backends.llvm import program
    monkeypatch.setattr(program, "NEW_BUILTIN", None)
    rng = np.random.default_rng(1)
    x = gc.placeholder("x", (None, 17), "float32")
    w = gc.parameter("w", rng.standard_normal((13, 17)).astype(np.float32))
    extra = [gc.parameter(f"e{k}", rng.standard_normal(13).astype(np.float32)) for k in range(n_params - 1)]
    y = x @ gc.transpose(w)
    for e in extra:
        y = y + e
    f = gc.function([x], y, backend=backend_or_skip("llvm"))
    a = rng.standard_normal((3, 17)).astype(np.float32)
    for _ in range(3):
        want = a.astype(np.float64) @ w.value.T + sum((e.value.astype(np.float64) for e in extra), 0.0)
        np.testing.assert_allclose(f(a), want, rtol=1e-4, atol=1e-4)
        w.set_value(w.value * -2)
    spec = f.program._specs[(("N", 3),)]
    assert not spec.fastcall and spec.call is not None and spec.plan.prologue >= 1


def test_the_fast_path_calls_the_runners_direct_form_with_the_prologue_and_list_outputs(rng):
    """llvm: a seen shape calls the specialisation's direct(arrays...) (no argument or result lists);
    a parameter-only step (the prologue: 2 w) runs again after set_value;
    one output asked for as a list comes back as a list."""
    from graphc.backends.llvm import program
    wv = rng.standard_normal((5, 3)).astype(np.float32)
    x = gc.placeholder("x", (None, 3), "float32")
    w = gc.parameter("w", wv)
    y = gc.exp(gc.matmul(x, gc.transpose(w * 2.0)) * 0.05)
    f = gc.function([x], [y], backend=backend_or_skip("llvm"))
    a = rng.standard_normal((4, 3)).astype(np.float32)
    got = f(a)
    assert isinstance(got, list) and len(got) == 1
    np.testing.assert_allclose(got[0], np.exp(a @ wv.T * 0.1), rtol=1e-5)
    ent = f._seen[(a.shape,)]
    spec = next(iter(f.program._specs.values()))
    assert spec._prologue_params == (0,)
    if program.NEW_BUILTIN is not None:
        assert ent[2] is not None and ent[2] is ent[0].direct
    for k in range(3):
        w2 = (wv * (k + 2)).astype(np.float32)
        w.set_value(w2)
        got = f(a)
        assert isinstance(got, list)
        np.testing.assert_allclose(got[0], np.exp(a @ w2.T * 0.1), rtol=1e-5)
    g = gc.function([x], y, backend="llvm")
    out = g(a)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(g(a), np.exp(a @ w2.T * 0.1), rtol=1e-5)
