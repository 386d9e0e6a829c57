"""Parameter-derived values computed once (llvm: the plan's prologue, backends/schedule/plan.py
hoist_prologue; backends/llvm/program.py Specialised runs it when a parameter it reads has a new array).
Every case compares with NumPy after the parameters change: set_value, updates=, load_state_dict, several
specialisations, several threads; and an in-place write into a parameter's array is refused."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphc as gc
from graphc.ops import solve
from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _linear(rng, n_in=17, n_out=13):
    """y = x @ w.T + b, x (N, n_in): the transposed weight is materialised for the GEMM (a prologue step)."""
    x = gc.placeholder("x", (None, n_in), "float32")
    w = gc.parameter("w", rng.standard_normal((n_out, n_in)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(n_out).astype(np.float32))
    return x, w, b, x @ gc.transpose(w) + b


def _ref(a, w, b):
    return a.astype(np.float64) @ w.value.T.astype(np.float64) + b.value


def _prologue(f, **dims):
    return f.program._specs[tuple(sorted(dims.items()))].plan


def test_a_transposed_weight_is_a_prologue_step_and_follows_set_value(rng):
    x, w, b, y = _linear(rng)
    f = gc.function([x], y, backend="llvm")
    a = rng.standard_normal((3, 17)).astype(np.float32)
    np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)
    plan = _prologue(f, N=3)
    assert plan.prologue >= 1 and plan.prologue_params == (0,)   # reads w (index 0) only
    assert all(plan.buffers[b_].kind == "param" for st in plan.steps[:plan.prologue] for b_ in st.io[0])
    for k in range(3):   # a new weight: the next call sees it (the prologue runs again)
        w.set_value(rng.standard_normal((13, 17)).astype(np.float32))
        np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)
    b.set_value(np.zeros(13, np.float32))   # a parameter the prologue does not read
    np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)


def test_the_prologue_runs_once_per_parameter_change(rng, monkeypatch):
    x, w, b, y = _linear(rng)
    f = gc.function([x], y, backend="llvm")
    a = rng.standard_normal((3, 17)).astype(np.float32)
    f(a)
    spec = f.program._specs[(("N", 3),)]
    sets = []
    table = spec._tls.table

    class Spy:   # records every write of the "run the prologue first" word
        def __setitem__(self, i, v):
            sets.append(i)
            table[i] = v

        def __getitem__(self, i):
            return table[i]
    monkeypatch.setattr(spec._tls, "table", Spy())
    for _ in range(5):
        f(a)
    assert sets == []
    w.set_value(w.get_value() * 2)
    for _ in range(5):
        np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)
    assert sets == [spec.slots.n]


def test_in_place_writes_into_a_parameter_are_refused(rng):
    x, w, b, y = _linear(rng)
    f = gc.function([x], y, backend="llvm")
    a = rng.standard_normal((3, 17)).astype(np.float32)
    before = f(a)
    with pytest.raises(ValueError, match="read-only"):
        w.value[...] = 0.0
    with pytest.raises(ValueError, match="read-only"):
        w.value += 1.0
    np.testing.assert_array_equal(f(a), before)   # nothing changed, so nothing is stale
    mine = w.get_value()   # a writable copy, installed with set_value
    mine[0] = 5.0
    w.set_value(mine)
    assert not w.value.flags.writeable and mine.flags.writeable
    np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)


def test_updates_change_the_weight_every_call(rng):
    """A training step: the transposed weight is recomputed after every update (never stale)."""
    x, w, b, y = _linear(rng)
    loss = gc.sum(y * y)
    gw, = gc.grad(loss, [w])
    f = gc.function([x], [y, loss], updates=[(w, w - 0.01 * gw)], backend="llvm")
    a = (0.3 * rng.standard_normal((4, 17))).astype(np.float32)
    wv = w.get_value().astype(np.float64)
    for _ in range(4):
        out, _ = f(a)
        want = a @ wv.T + b.value
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        wv = wv - 0.01 * (2 * want.T @ a)
        np.testing.assert_allclose(w.value, wv, rtol=1e-4, atol=1e-4)
        y_only = gc.function([x], y, backend="llvm")   # a second function on the same, changing weight
        np.testing.assert_allclose(y_only(a), a @ wv.T + b.value, rtol=1e-4, atol=1e-4)
        assert not w.value.flags.writeable   # the updated array is read-only too
    assert _prologue(f, N=4).prologue >= 1


def test_symbolic_batch_several_specialisations(rng):
    x, w, b, y = _linear(rng)
    f = gc.function([x], y, backend="llvm")
    sizes = (3, 17, 5, 3, 17)
    arrays = {n: rng.standard_normal((n, 17)).astype(np.float32) for n in set(sizes)}
    for k, n in enumerate(sizes):
        np.testing.assert_allclose(f(arrays[n]), _ref(arrays[n], w, b), rtol=1e-5, atol=1e-5)
        if k == 2:
            w.set_value(-w.value)   # specialisations compiled before and after both see it
    for n in (3, 17):
        assert _prologue(f, N=n).prologue >= 1


def test_load_state_dict_refreshes_prepacked_weights(rng):
    lin = gc.nn.Linear(9, 6)
    x = gc.placeholder("x", (None, 9), "float32")
    f = gc.function([x], lin(x), backend="llvm")
    a = rng.standard_normal((5, 9)).astype(np.float32)
    f(a)
    state = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in lin.state_dict().items()}
    lin.load_state_dict(state)
    got = f(a)
    w = state["weight"] if state["weight"].shape == (6, 9) else state["weight"].T
    np.testing.assert_allclose(got, a @ w.T + state["bias"], rtol=1e-5, atol=1e-5)


def test_constant_only_values_and_host_steps(rng):
    """A graph with a host step (the runtime path that fills the table in Python): the transposed weight
    is still computed once per change of w, m (read by the host step) every call."""
    x = gc.placeholder("x", (None, 17), "float64")
    m = gc.parameter("m", rng.standard_normal((17, 17)) + 6 * np.eye(17))
    w = gc.parameter("w", rng.standard_normal((13, 17)))
    z = gc.transpose(solve(m, gc.transpose(x))) @ gc.transpose(w)   # solve runs on the host
    f = gc.function([x], z, backend="llvm")
    a = rng.standard_normal((4, 17))
    for k in range(4):
        np.testing.assert_allclose(f(a), np.linalg.solve(m.value, a.T).T @ w.value.T, rtol=1e-10, atol=1e-10)
        if k % 2:
            w.set_value(w.value + 1.0)
        else:
            m.set_value(m.value * 2.0)
    plan = _prologue(f, N=4)
    assert plan.prologue >= 1 and plan.prologue_params == (1,) and "solve" in plan.fallback
    assert f.program._specs[(("N", 4),)].call is None   # not the one-call path


def test_threads_each_see_the_current_weight(rng):
    """Each thread has its own arena (its own prepacked copy): after set_value every thread's next call
    uses the new weight."""
    x, w, b, y = _linear(rng)
    f = gc.function([x], y, backend="llvm")
    a = rng.standard_normal((3, 17)).astype(np.float32)
    n, rounds = 4, 3
    barrier, errors = threading.Barrier(n + 1), []

    def worker():
        try:
            for _ in range(rounds):
                barrier.wait()
                for _ in range(20):
                    np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)
                barrier.wait()
        except Exception as e:   # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        for _ in range(rounds):
            barrier.wait()   # the workers call
            barrier.wait()   # ... and are done: a new weight for the next round
            w.set_value(rng.standard_normal((13, 17)).astype(np.float32))
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_bounds_sanitizer_runs_everything_every_call(rng):
    x, w, b, y = _linear(rng)
    f = gc.function([x], y, backend="llvm", sanitize="bounds")
    a = rng.standard_normal((3, 17)).astype(np.float32)
    np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)
    assert _prologue(f, N=3).prologue == 0
    w.set_value(w.value * 3)
    np.testing.assert_allclose(f(a), _ref(a, w, b), rtol=1e-5, atol=1e-5)


def test_explain_reports_prologue_steps_as_free_per_call(rng):
    x, w, b, y = _linear(rng, 64, 48)
    f = gc.function([x], y, backend="llvm")
    e = f.explain(N=8, repeat=3)
    plan = _prologue(f, N=8)
    assert plan.prologue >= 1 and len(e.rows) == len(plan.steps)
    assert all(r.measured == 0.0 for r in e.rows[:plan.prologue])
    assert all(r.measured is not None for r in e.rows[plan.prologue:])
