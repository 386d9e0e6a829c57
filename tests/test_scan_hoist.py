"""The scan_hoist pass: per-step products of a sequence slice by loop invariants computed once before the
loop, accumulator carries acc + a_t @ b_t (BPTT's weight gradients) summed by one product after it, unused
stacked outputs dropped. Results against NumPy loops written here and the unhoisted graph (the pass
disabled), gradients by finite differences in float64, LSTM/GRU/RNN against torch when installed, on every
backend."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import graphc as gc
from graphc.ops.linalg import MatMul
from graphc.ops.scan import Scan
from graphc.passes import optimize
from graphc.passes.scan_hoist import scan_hoist
from conftest import assert_close


def _scans(graph):
    return [n for n in graph.nodes if n.op is Scan]


def _body_products(node):
    """The matrix products a scan body runs per step (inside fused kernels too)."""
    out, todo = [], [node.attrs["body"]]
    while todo:
        g = todo.pop()
        for n in g.nodes:
            if n.op is MatMul:
                out.append(n)
            todo.extend(v for v in n.attrs.values() if isinstance(v, gc.Graph))
    return out


def _rnn(x, h0, w, u, b, reverse=False):
    """h' = tanh(x_t @ w + h @ u + b): (final h, ys)."""
    return gc.scan(lambda h, xt: (lambda n: (n, n))(gc.tanh(xt @ w + h @ u + b)), h0, x, reverse=reverse)


def _np_rnn(x, h0, w, u, b, reverse=False):
    h, ys = h0, [None] * len(x)
    for t in (reversed(range(len(x))) if reverse else range(len(x))):
        h = np.tanh(x[t] @ w + h @ u + b)
        ys[t] = h
    return h, np.stack(ys) if len(x) else np.zeros((0,) + h0.shape)


def _data(rng, T, N, C, H, dtype="float64"):
    return [rng.standard_normal(s).astype(dtype) * 0.5 for s in ((T, N, C), (N, H), (C, H), (H, H), (H,))]


def _phs(T, N, C, H, dtype="float64"):
    return [gc.placeholder(n, s, dtype) for n, s in
            (("x", (T, N, C)), ("h0", (N, H)), ("w", (C, H)), ("u", (H, H)), ("b", (H,)))]


@pytest.mark.parametrize("T,N,C,H", [(1, 1, 1, 1), (3, 3, 17, 5), (7, 2, 3, 63), (4, 65, 3, 2)])
@pytest.mark.parametrize("reverse", [False, True])
def test_input_projection_leaves_the_loop_and_results_match_numpy(backend, rng, T, N, C, H, reverse):
    phs = _phs(T, N, C, H)
    hT, ys = _rnn(*phs, reverse=reverse)
    f = gc.function(phs, [hT, ys], backend=backend)
    [scan] = _scans(f.graph)
    assert len(_body_products(scan)) == 1            # h @ u only; x_t @ w is one product before the loop
    outer = [n for n in f.graph.nodes if n.op is MatMul]
    assert len(outer) == 1 and outer[0].inputs[0].shape == (T * N, C)
    vals = _data(rng, T, N, C, H)
    for g, w in zip(f(*vals), _np_rnn(*vals, reverse=reverse)):
        assert_close(g, w, backend=backend)


def test_same_results_as_the_unhoisted_loop_in_float32(backend, rng):
    phs = _phs(5, 3, 17, 63, "float32")
    outs = list(_rnn(*phs))
    vals = _data(rng, 5, 3, 17, 63, "float32")
    got = gc.function(phs, outs, backend=backend)(*vals)
    plain = gc.function(phs, outs, backend=backend, disable=["scan_hoist"])
    assert len(_body_products(_scans(plain.graph)[0])) == 2
    for g, w in zip(got, plain(*vals)):
        assert_close(g, w, backend=backend, rtol=2e-5, atol=2e-6)


def test_several_sequences_and_a_time_major_view_of_a_batch_major_input(backend, rng):
    """Two sequences, each projected by its own weight; x is batch-major (N, T, C) and scanned as its
    transpose: the projection reads x's rows in place and transposes the (N, T, H) result."""
    N, T, C, D, H = 3, 7, 5, 2, 4
    x, y = gc.placeholder("x", (None, T, C)), gc.placeholder("y", (T, None, D))
    w, v, u = (gc.parameter(n, (rng.standard_normal(s) * 0.4).astype(np.float32))
               for n, s in (("w", (C, H)), ("v", (D, H)), ("u", (H, H))))
    h0 = gc.broadcast_to(gc.constant(0.0), (x.shape[0], H))
    hT, ys = gc.scan(lambda h, s: (lambda n: (n, n * 2.0))(gc.tanh(s[0] @ w + s[1] @ v + h @ u)), h0,
                     (gc.transpose(x, (1, 0, 2)), y))
    f = gc.function([x, y], [hT, ys], backend=backend)
    [scan] = _scans(f.graph)
    assert len(_body_products(scan)) == 1 and scan.attrs["n_seq"] == 2   # the two projections
    a, b = rng.standard_normal((N, T, C)), rng.standard_normal((T, N, D))
    h, want = np.zeros((N, H)), []
    for t in range(T):
        h = np.tanh(a[:, t] @ w.value + b[t] @ v.value + h @ u.value)
        want.append(2 * h)
    got = f(a.astype(np.float32), b.astype(np.float32))
    assert_close(got[0], h, "float32", backend, rtol=1e-5, atol=1e-5)
    assert_close(got[1], np.stack(want), "float32", backend, rtol=1e-5, atol=1e-5)


def test_a_product_by_a_carried_weight_stays_in_the_loop(backend, rng):
    """w is a carry (it changes every step): x_t @ w is not loop-invariant work and must stay."""
    T, N, C = 4, 3, 5
    x, w0 = gc.placeholder("x", (T, N, C), "float64"), gc.placeholder("w0", (C, C), "float64")

    def step(w, xt):
        return w * 0.9 + 0.01, gc.tanh(xt @ w)
    wT, ys = gc.scan(step, w0, x)
    f = gc.function([x, w0], [wT, ys], backend=backend)
    [scan] = _scans(f.graph)
    assert len(_body_products(scan)) == 1 and not any(n.op is MatMul for n in f.graph.nodes)
    a, w = rng.standard_normal((T, N, C)), rng.standard_normal((C, C))
    got = f(a, w)
    want = []
    for t in range(T):
        want.append(np.tanh(a[t] @ w))
        w = w * 0.9 + 0.01
    assert_close(got[0], w, backend=backend)
    assert_close(got[1], np.stack(want), backend=backend)


def test_a_product_of_two_per_step_values_is_not_hoisted(rng):
    """x_t @ h (h a carry) and a product whose operand needs a carry stay per step."""
    x, h0 = gc.placeholder("x", (3, 2, 2), "float64"), gc.placeholder("h0", (2, 2), "float64")
    hT, _ = gc.scan(lambda h, xt: (gc.tanh(xt @ h), None), h0, x)
    f = gc.function([x, h0], hT)
    assert len(_body_products(_scans(f.graph)[0])) == 1
    a, b = rng.standard_normal((3, 2, 2)), rng.standard_normal((2, 2))
    h = b
    for t in range(3):
        h = np.tanh(a[t] @ h)
    assert_close(f(a, b), h)


def test_stacked_output_of_a_hoisted_value_is_the_outer_product(backend, rng):
    """A step returning x_t @ w as y: the loop computes nothing for it (y is the product outside)."""
    x, w = gc.placeholder("x", (5, 3, 4)), gc.placeholder("w", (4, 2))
    _, ys = gc.scan(lambda c, xt: (None, xt @ w), None, x)
    f = gc.function([x, w], gc.exp(ys), backend=backend)
    assert not _scans(f.graph)
    a, b = rng.standard_normal((5, 3, 4)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    assert_close(f(a, b), np.exp(a @ b), backend=backend, rtol=1e-5)


def test_zero_and_one_step_with_a_symbolic_length(backend, rng):
    x = gc.placeholder("x", ("T", 2, 3), "float64")
    h0, w, u, b = gc.placeholder("h0", (2, 4), "float64"), *(gc.placeholder(n, s, "float64") for n, s in
                                                              (("w", (3, 4)), ("u", (4, 4)), ("b", (4,))))
    hT, ys = _rnn(x, h0, w, u, b)
    f = gc.function([x, h0, w, u, b], [hT, ys], backend=backend)
    for T in (0, 1, 3):
        vals = _data(rng, T, 2, 3, 4)
        for g, want in zip(f(*vals), _np_rnn(*vals)):
            assert_close(g, want, backend=backend)


# ---- sinking: accumulators become one product after the loop -------------------------------------

def _bptt_graph(T=6, N=3, C=5, H=4, reverse=False):
    phs = _phs(T, N, C, H)
    hT, ys = _rnn(*phs, reverse=reverse)
    loss = (ys ** 2).sum() + gc.sin(hT).sum()
    return phs, [loss] + gc.grad(loss, phs)


def test_weight_gradients_leave_the_backward_loop():
    phs, outs = _bptt_graph()
    g = optimize(gc.Graph(phs, outs), 2)
    fwd, bwd = sorted(_scans(g), key=lambda n: n.attrs["reverse"])
    plain = optimize(gc.Graph(phs, outs), 2, disable=["scan_hoist"])
    bwd0 = sorted(_scans(plain), key=lambda n: n.attrs["reverse"])[1]
    # before: dh, then the accumulators of dw, du, db as carries with a (C, H) and an (H, H) product
    # per step; after: dh alone, one product per step (dz @ u^T), the sums after the loop
    assert bwd0.attrs["n_carry"] == 4 and len(_body_products(bwd0)) >= 4
    assert bwd.attrs["n_carry"] == 1 and len(_body_products(bwd)) == 1
    # outside the loops: x @ w before them; after them dx = DZ @ w^T, dw = X^T DZ, du = H^T DZ. The
    # backward step's h_t @ u is not recomputed by a GEMM over the history: the forward loop stacks it
    outer = [(n.inputs[0].shape, n.inputs[1].shape) for n in g.nodes if n.op is MatMul]
    assert sorted(outer) == sorted([((18, 5), (5, 4)), ((18, 4), (4, 5)), ((5, 18), (18, 4)), ((4, 18), (18, 4))])
    assert fwd.attrs["n_carry"] == 1 and len(fwd.outputs) == 1 + 2 + 1   # final h, ys, h @ u; history
    log = Counter()
    scan_hoist(gc.Graph(phs, outs), log)
    assert log["scan_hoist: sunk"] == 3 and log["scan_hoist: hoisted"] >= 2


@pytest.mark.parametrize("reverse", [False, True])
def test_bptt_gradients_match_finite_differences(backend, reverse):
    T, N, C, H = 4, 2, 3, 5

    def fn(x, h0, w, u, b):
        hT, ys = _rnn(x, h0, w, u, b, reverse)
        return (ys ** 2).sum() + gc.sin(hT).sum()
    rng = np.random.default_rng(7)
    gc.verify_grad(fn, _data(rng, T, N, C, H), backend=backend)


def test_bptt_gradients_equal_the_unhoisted_graph(backend, rng):
    phs, outs = _bptt_graph(T=7, N=3, C=17, H=5)
    vals = _data(rng, 7, 3, 17, 5)
    got = gc.function(phs, outs, backend=backend)(*vals)
    want = gc.function(phs, outs, backend="numpy", optimize=0)(*vals)
    for a, b in zip(got, want):
        assert_close(a, b, backend=backend, rtol=1e-10, atol=1e-12)


def test_an_accumulator_whose_history_is_read_is_kept(rng):
    """acc' = acc + x_t^T @ x_t with the carry history returned: the accumulator stays a carry."""
    x = gc.placeholder("x", (4, 3, 2), "float64")
    acc0 = gc.placeholder("acc0", (2, 2), "float64")
    step = lambda acc, xt: (acc + gc.transpose(xt) @ xt, None)  # noqa: E731
    fin, _, hist = gc.scan(step, acc0, x, history=True)
    fin2, _ = gc.scan(step, acc0, x)
    f = gc.function([x, acc0], [fin, hist, fin2])
    [kept] = _scans(f.graph)   # the other loop is gone: its sum is one product after it
    assert kept.attrs["n_carry"] == 1
    a, c = rng.standard_normal((4, 3, 2)), rng.standard_normal((2, 2))
    acc, hs = c, []
    for t in range(4):
        hs.append(acc)
        acc = acc + a[t].T @ a[t]
    got = f(a, c)
    assert_close(got[0], acc)
    assert_close(got[1], np.stack(hs))
    assert_close(got[2], acc)


def test_partially_sinkable_accumulator(backend, rng):
    """acc' = acc + x_t^T @ y_t + sin(acc-independent) * 1: the product is summed after the loop, the
    other addend keeps accumulating in it."""
    x, y = gc.placeholder("x", (5, 3, 2), "float64"), gc.placeholder("y", (5, 3, 4), "float64")
    acc0 = gc.placeholder("acc0", (2, 4), "float64")
    fin, _ = gc.scan(lambda acc, s: (acc + gc.transpose(s[0]) @ s[1] + gc.sin(s[0][:2, :1] * 1.0 + s[1][:2]), None),
                     acc0, (x, y))
    f = gc.function([x, y, acc0], fin, backend=backend)
    a, b, c = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 4)), rng.standard_normal((2, 4))
    acc = c
    for t in range(5):
        acc = acc + a[t].T @ b[t] + np.sin(a[t][:2, :1] + b[t][:2])
    [scan] = _scans(f.graph)
    assert not _body_products(scan)
    assert_close(f(a, b, c), acc, backend=backend)


# ---- the recurrent layers --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_hoist_every_direction_and_layer(kind):
    m = getattr(gc.nn, kind)(3, 5, num_layers=2, bidirectional=True, dtype="float64", seed=1)
    x = gc.placeholder("x", (None, 4, 3), "float64")
    out, _ = m(x)
    loss = (out ** 2).sum()
    f = gc.function([x], [out] + gc.grad(loss, m.params))
    scans = _scans(f.graph)
    assert len(scans) == 8   # 4 layer-directions, forward and backward
    for s in scans:
        assert len(_body_products(s)) == 1, s.attrs["reverse"]   # the recurrent product only


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_match_torch_with_gradients(backend, kind, rng):
    torch = pytest.importorskip("torch", reason="torch (optional reference) is not installed")
    torch.manual_seed(0)
    tm = getattr(torch.nn, kind)(3, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    m = getattr(gc.nn, kind)(3, 5, num_layers=2, bidirectional=True, dtype="float64")
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    x = gc.placeholder("x", (None, 7, 3), "float64")
    out, state = m(x)
    hn = state[0] if kind == "LSTM" else state
    loss = (out ** 2).sum() + hn.sum()
    f = gc.function([x], [out, hn] + gc.grad(loss, [x] + m.params), backend=backend)
    a = rng.standard_normal((3, 7, 3))
    xt = torch.tensor(a, requires_grad=True)
    to, ts = tm(xt)
    th = ts[0] if kind == "LSTM" else ts
    ((to ** 2).sum() + th.sum()).backward()
    want = [to.detach(), th.detach(), xt.grad] + [p.grad for p in tm.parameters()]
    for g, w in zip(f(a), want):
        assert_close(g, w.numpy(), backend=backend, rtol=1e-9, atol=1e-11)


def test_lstm_training_step_float32_matches_the_unhoisted_step(backend, rng):
    """W9's shape in small: LSTM + head, cross-entropy on the last state, one SGD step."""
    def build(disable):
        lstm = gc.nn.LSTM(5, 7, seed=3)
        hw = gc.parameter("hw", np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32) * 0.3)
        x, y = gc.placeholder("x", (None, 6, 5)), gc.placeholder("y", (None,), "int64")
        _, (h, _c) = lstm(x)
        loss = gc.losses.cross_entropy(h[0] @ hw, y)
        ps = lstm.params + [hw]
        f = gc.function([x, y], loss, updates=[(p, p - 0.5 * g) for p, g in zip(ps, gc.grad(loss, ps))],
                        backend=backend, disable=disable)
        return f, ps
    a, b = rng.standard_normal((4, 6, 5)).astype(np.float32), rng.integers(0, 3, 4)
    (f1, p1), (f2, p2) = build(()), build(["scan_hoist"])
    for _ in range(2):
        assert_close(f1(a, b), f2(a, b), backend=backend, rtol=1e-5, atol=1e-6)
    for u, v in zip(p1, p2):
        assert_close(u.value, v.value, backend=backend, rtol=1e-5, atol=1e-6)
