"""gc.scan: against NumPy loops and against the same step unrolled in Python, gradients (BPTT, second
order, forward mode) by finite differences, symbolic and zero lengths, pytrees, nesting, errors."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ir import toposort
from graphc.backends.numpy.scan import _COMPILED


def _step(W, U):
    def step(h, x):
        h2 = gc.tanh(x @ W + h @ U)
        return h2, gc.sin(h2).sum(axis=1)
    return step


def _inputs(rng, T=5, N=3, C=4, H=5):
    return [rng.standard_normal((T, N, C)), rng.standard_normal((N, H)), rng.standard_normal((C, H)) * 0.5,
            rng.standard_normal((H, H)) * 0.5]


def _phs(vals):
    return [gc.placeholder(n, v.shape, "float64") for n, v in zip(("xs", "h0", "W", "U"), vals)]


def test_scan_equals_unrolled_loop_values_and_gradients(rng):
    vals = _inputs(rng)
    xs, h0, W, U = _phs(vals)
    step = _step(W, U)
    hT, ys = gc.scan(step, h0, xs)
    h, outs = h0, []
    for t in range(vals[0].shape[0]):  # the same step, unrolled into an ordinary graph
        h, y = step(h, xs[t])
        outs.append(y)
    cost_s = (hT ** 2).sum() + (ys * ys).sum()
    cost_u = (h ** 2).sum() + (gc.stack(outs) ** 2).sum()
    scan_nodes = [n for n in toposort([cost_s]) if n.op.name == "scan"]
    assert len(scan_nodes) == 1 and len(toposort([cost_s])) < len(toposort([cost_u])) / 2
    f = gc.function([xs, h0, W, U], [hT, ys, cost_s] + gc.grad(cost_s, [xs, h0, W, U]))
    g = gc.function([xs, h0, W, U], [h, gc.stack(outs), cost_u] + gc.grad(cost_u, [xs, h0, W, U]))
    for a, b in zip(f(*vals), g(*vals)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_matches_numpy_loop_float32(rng):
    vals = [v.astype(np.float32) for v in _inputs(rng)]
    xs, h0, W, U = [gc.placeholder(n, v.shape) for n, v in zip(("xs", "h0", "W", "U"), vals)]
    hT, ys = gc.scan(_step(W, U), h0, xs)
    got = gc.function([xs, h0, W, U], [hT, ys])(*vals)
    h, outs = vals[1], []
    for x in vals[0]:
        h = np.tanh(x @ vals[2] + h @ vals[3])
        outs.append(np.sin(h).sum(1))
    assert got[1].dtype == np.float32
    np.testing.assert_allclose(got[0], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], np.stack(outs), rtol=1e-5, atol=1e-6)


def test_verify_grad_all_inputs_reverse_and_pytree_carry(rng):
    def fn(xs, h0, W, U):
        def step(carry, x):
            h, c = carry["h"], carry["c"]
            c2 = 0.5 * c + gc.tanh(x @ W + h @ U)
            return {"h": gc.sigmoid(c2) * h, "c": c2}, (c2.sum(), h)
        fin, (s, hs) = gc.scan(step, {"h": h0, "c": h0 * 0.3}, xs, reverse=True)
        return (fin["h"] * fin["c"]).sum() + (s ** 2).sum() + gc.tanh(hs).sum()
    gc.verify_grad(fn, _inputs(rng, T=3, N=2, C=3, H=2))


def test_gradient_of_invariant_derived_from_another_invariant(rng):
    """W and W2 = 2 W are both read by the step: W's gradient must count the W2 path once."""
    def fn(xs, h0, W, U):
        W2 = W * 2.0

        def step(h, x):
            return gc.tanh(x @ W + x @ W2 + h @ U), None
        hT, _ = gc.scan(step, h0, xs)
        return (hT ** 2).sum() + W2.sum()
    gc.verify_grad(fn, _inputs(rng, T=3, N=2, C=2, H=2))


def test_nested_scan_gradient(rng):
    def fn(xs, h0, W, U):
        def outer(h, x):
            g, _ = gc.scan(lambda g, _: (gc.tanh(g @ U + x @ W), None), h, None, length=2)
            return g, g.sum()
        hT, ys = gc.scan(outer, h0, xs)
        return hT.sum() + (ys ** 2).sum()
    gc.verify_grad(fn, _inputs(rng, T=3, N=2, C=2, H=2))


def test_double_backprop_and_hessian(rng):
    vals = _inputs(rng, T=3, N=2, C=2, H=2)

    def cost(xs, h0, W, U):
        hT, ys = gc.scan(_step(W, U), h0, xs)
        return (hT ** 2).sum() + (ys ** 2).sum()

    def grad_norm(xs, h0, W, U):  # the gradient scan differentiated again
        return sum((g ** 2).sum() for g in gc.grad(cost(xs, h0, W, U), [xs, h0, W, U]))
    gc.verify_grad(grad_norm, vals, rtol=1e-5, atol=1e-8)
    xs, h0, W, U = _phs(vals)
    H = gc.function([xs, h0, W, U], gc.hessian(cost(xs, h0, W, U), U))(*vals)
    g = gc.function([xs, h0, W, U], gc.grad(cost(xs, h0, W, U), U))
    eps, num = 1e-6, np.zeros_like(H)
    for idx in np.ndindex(*vals[3].shape):
        up, dn = [v.copy() for v in vals], [v.copy() for v in vals]
        up[3][idx] += eps
        dn[3][idx] -= eps
        num[(...,) + idx] = (g(*up) - g(*dn)) / (2 * eps)
    np.testing.assert_allclose(H, num, rtol=1e-6, atol=1e-8)


def _reverse_counter_scan(xs, h0, W, U):
    W2 = W * 2.0  # an invariant computed from another invariant

    def step(carry, x):
        h, k = carry
        h2 = gc.tanh(x @ W2 + h @ U) * gc.cast(k, h.dtype) + 0.5 * h
        return (h2, k + 1), (h2 @ U.T).sum(axis=1)
    (hT, _), ys = gc.scan(step, (h0, gc.constant(1, "int32")), xs, reverse=True)
    return hT, ys


@pytest.mark.parametrize("fn", [lambda xs, h0, W, U: gc.scan(_step(W, U), h0, xs), _reverse_counter_scan])
def test_forward_mode_jvp_matches_finite_differences_and_the_derived_rule(fn, rng):
    from graphc.autodiff import _derived_jvp
    vals = _inputs(rng, T=4, N=2, C=3, H=3)
    phs = _phs(vals)
    hT, ys = fn(*phs)
    v = [rng.standard_normal(x.shape) for x in vals]
    jv = gc.function(phs, gc.jvp([hT, ys], phs, [gc.constant(t) for t in v]))(*vals)
    f = gc.function(phs, [hT, ys])
    eps = 1e-6
    hi = f(*[x + eps * t for x, t in zip(vals, v)])
    lo = f(*[x - eps * t for x, t in zip(vals, v)])
    for got, a, b in zip(jv, hi, lo):
        np.testing.assert_allclose(got, (a - b) / (2 * eps), rtol=1e-6, atol=1e-8)
    node = ys.node  # the scan's own rule against the generic one derived from its vjp
    tans = [gc.constant(rng.standard_normal(tuple(t.shape))) if t.dtype == "float64" else None for t in node.inputs]
    own, derived = node.op.jvp(node, tans), _derived_jvp(node, tans)
    pairs = [(a, b) for a, b in zip(own, derived) if a is not None]
    assert len(pairs) >= 3
    got = gc.function(phs, [a for a, _ in pairs] + [b for _, b in pairs])(*vals)
    for a, b in zip(got[:len(pairs)], got[len(pairs):]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_symbolic_sequence_length_including_zero(rng):
    xs = gc.placeholder("xs", ("T", 2, 3), "float64")
    h0 = gc.placeholder("h0", (2, 3), "float64")
    hT, ys = gc.scan(lambda h, x: (gc.tanh(h + x), h.sum()), h0, xs)
    assert str(ys.shape[0]) == "T" and hT.shape == (2, 3)
    gh0 = gc.grad((hT ** 2).sum() + ys.sum(), h0)
    f = gc.function([xs, h0], [hT, ys, gh0])
    b = rng.standard_normal((2, 3))
    for T in (0, 1, 6):
        a = rng.standard_normal((T, 2, 3))
        h, outs, hs = b, [], [b]
        for x in a:
            outs.append(h.sum())
            h = np.tanh(h + x)
            hs.append(h)
        got = f(a, b)
        np.testing.assert_allclose(got[0], h, rtol=1e-12)
        assert got[1].shape == (T,)
        np.testing.assert_allclose(got[1], np.array(outs).reshape(T), rtol=1e-12)
        gh = 2 * h  # hand BPTT
        for t in reversed(range(T)):
            gh = gh * (1 - hs[t + 1] ** 2) + 1.0
        np.testing.assert_allclose(got[2], gh, rtol=1e-10)


def test_zero_length_is_identity_on_the_carry(rng):
    xs, h0, W, U = phs = _phs(_inputs(rng, T=0))
    hT, ys = gc.scan(_step(W, U), h0, xs)
    gs = gc.grad((hT * 3).sum() + ys.sum(), [xs, h0, W, U])
    vals = _inputs(rng, T=0)
    out = gc.function(phs, [hT, ys] + gs)(*vals)
    np.testing.assert_array_equal(out[0], vals[1])
    assert out[1].shape == (0, 3) and out[2].shape == (0, 3, 4)
    np.testing.assert_array_equal(out[3], 3.0)
    np.testing.assert_array_equal(out[4], 0.0)
    np.testing.assert_array_equal(out[5], 0.0)


def test_length_without_sequences_bound_by_a_named_dim():
    h = gc.placeholder("h", (2,), "float64")
    n = gc.placeholder("n", ("K",), "float64")
    fin, ys = gc.scan(lambda c, _: (c * 2, c.sum()), h, length="K")
    f = gc.function([h, n], [fin, ys + n])
    got = f(np.ones(2), np.zeros(4))
    np.testing.assert_array_equal(got[0], [16, 16])
    np.testing.assert_array_equal(got[1], [2, 4, 8, 16])
    np.testing.assert_array_equal(gc.evaluate([fin], {h: np.ones(2)}, dims={"K": 3})[0], [8, 8])
    with pytest.raises(gc.ShapeError, match="K"):
        gc.evaluate([fin], {h: np.ones(2)})


def test_history_and_integer_carry():
    xs = gc.placeholder("xs", (4, 2), "float64")
    (k, s), ys, (hk, hs) = gc.scan(lambda c, x: ((c[0] + 1, c[1] + x), c[0]),
                                   (gc.constant(0, "int64"), gc.constant(np.zeros(2))), xs, history=True)
    assert k.dtype == "int64" and ys.dtype == "int64"
    a = np.arange(8.0).reshape(4, 2)
    out = gc.function([xs], [k, s, ys, hk, hs])(a)
    assert out[0] == 4 and list(out[2]) == [0, 1, 2, 3] and list(out[3]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(out[1], a.sum(0))
    np.testing.assert_array_equal(out[4], np.concatenate([np.zeros((1, 2)), np.cumsum(a, 0)[:-1]]))


def test_invariants_are_hoisted_and_body_is_compiled_once(rng, monkeypatch):
    vals = _inputs(rng)
    xs, h0, W, U = phs = _phs(vals)
    hT, _ = gc.scan(lambda h, x: (gc.tanh(x @ W.T.T + h @ U), None), h0, xs)
    node = hT.node
    body = node.attrs["body"]
    assert "transpose" not in {n.op.name for n in body.nodes}  # W.T.T was computed once, outside
    assert node.attrs["n_carry"] == 1 and node.attrs["n_seq"] == 1 and len(node.inputs) == 4
    f = gc.function(phs, hT)
    want = f(*vals)
    [body] = [n.attrs["body"] for n in f.graph.nodes if n.op is node.op]  # the pipeline optimised the body
    [compiled] = _COMPILED[body].values()  # the numpy backend compiled the body once, at the function's level
    import graphc.reference as ref
    monkeypatch.setattr(ref, "evaluate", lambda *a, **k: pytest.fail("body re-interpreted per step"))
    monkeypatch.setattr(ref.Interpreter, "run", lambda *a, **k: pytest.fail("body interpreted, not compiled"))
    np.testing.assert_array_equal(f(*vals), want)
    assert list(_COMPILED[body].values()) == [compiled] and "def graph_fn" in compiled.source


def test_reference_evaluator_agrees(rng):
    vals = _inputs(rng)
    phs = _phs(vals)
    hT, ys = gc.scan(_step(phs[2], phs[3]), phs[1], phs[0], reverse=True)
    ref = gc.evaluate([hT, ys], dict(zip(phs, vals)))
    got = gc.function(phs, [hT, ys], optimize=0)(*vals)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_errors_name_the_problem():
    xs = gc.placeholder("xs", (4, 2), "float32")
    h = gc.placeholder("h", (2,), "float32")
    with pytest.raises(gc.ShapeError, match=r"carry 0 as float32\[1,2\].*init 0 is float32\[2\]"):
        gc.scan(lambda c, x: (c[None] + x, None), h, xs)
    with pytest.raises(gc.ShapeError, match="float64"):
        gc.scan(lambda c, x: (gc.cast(c, "float64"), None), h, xs)
    with pytest.raises(gc.GraphcError, match=r"must return \(new_carry, y\)"):
        gc.scan(lambda c, x: c + x, h, xs)
    with pytest.raises(gc.GraphcError, match="structure"):
        gc.scan(lambda c, x: ((c, c), None), h, xs)
    with pytest.raises(gc.ShapeError, match="sequence 1 .*length 3"):
        gc.scan(lambda c, x: (c + x[0] + x[1], None), h, (xs, gc.placeholder("ys", (3, 2))))
    with pytest.raises(gc.ShapeError, match="length=5"):
        gc.scan(lambda c, x: (c + x, None), h, xs, length=5)
    with pytest.raises(gc.GraphcError, match="length="):
        gc.scan(lambda c, x: (c, None), h)
    with pytest.raises(gc.ShapeError, match="0-d"):
        gc.scan(lambda c, x: (c + x, None), h, gc.placeholder("s", (), "float32"))


def test_recycled_output_buffers_never_overwrite_results_still_held(rng):
    """Stacked outputs are reused across calls only once nothing references them."""
    xs = gc.placeholder("xs", ("T", 3), "float64")
    _, ys = gc.scan(lambda c, x: (c + x, c * 2), gc.constant(np.zeros(3)), xs)
    f, g = gc.function([xs], ys), gc.function([xs], [ys[1:], ys.sum()])
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    first, view = f(a), g(a)[0]
    keep, keep_view = first.copy(), view.copy()
    for _ in range(3):
        f(b), g(b)
    np.testing.assert_array_equal(first, keep)
    np.testing.assert_array_equal(view, keep_view)
    np.testing.assert_array_equal(f(a), keep)


def test_threads_share_a_compiled_scan(rng):
    import concurrent.futures as cf
    vals = _inputs(rng)
    phs = _phs(vals)
    hT, ys = gc.scan(_step(phs[2], phs[3]), phs[1], phs[0])
    f = gc.function(phs, [hT, ys])
    inputs = [[v + 0.1 * i for v in vals] for i in range(8)]
    want = [f(*x) for x in inputs]
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda x: f(*x), inputs * 3))
    for i, res in enumerate(got):
        for a, b in zip(res, want[i % 8]):
            np.testing.assert_array_equal(a, b)


def test_random_draw_in_the_step_is_one_draw_per_call():
    """Documented: a draw does not depend on the step, so it is hoisted (same value at every step)."""
    g = gc.random.Generator(seed=1)
    xs = gc.placeholder("xs", (4, 3), "float32")
    _, ys = gc.scan(lambda c, x: (c, x + gc.random.normal((3,), generator=g)), gc.constant(0.0), xs)
    f = gc.function([xs], ys)
    a, b = f(np.zeros((4, 3), np.float32)), f(np.zeros((4, 3), np.float32))
    assert np.all(a == a[0]) and np.all(b == b[0]) and not np.allclose(a, b)


def test_final_carry_never_aliases_an_input(rng):
    h = gc.placeholder("h", (3,), "float64")
    xs = gc.placeholder("xs", ("T", 3), "float64")
    fin, _ = gc.scan(lambda c, x: (c, x * 2), h, xs)  # the carry passes through unchanged
    f = gc.function([h, xs], fin)
    a = rng.standard_normal(3)
    for T in (0, 2):
        out = f(a, np.zeros((T, 3)))
        np.testing.assert_array_equal(out, a)
        out += 1
        assert not np.shares_memory(out, a)
