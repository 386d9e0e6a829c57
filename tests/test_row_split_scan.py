"""Row-split scans (backends/schedule/rows.py, plan._scan, llvm program._parted_loop): a scan whose body
never mixes batch rows runs as one loop per part of the rows, the parts on the pool's threads. Checked:
which bodies split (and which must not), every result against the NumPy backend / float64 references at
odd batch sizes on one and two threads, reversed scans, stacked outputs and carry history, gradients
through a split scan (BPTT), and the guard that refuses a part touching rows not its own."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from graphc.backends.schedule import rows
from graphc.backends.schedule.steps import LoopStep
from graphc.backends.schedule.views import View

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _loops(f) -> list:
    out = []
    for spec in f.program._specs.values():
        out += [st for st in spec.plan.steps if isinstance(st, LoopStep)]
    return out


def _run_both(build, inputs):
    """(llvm results, numpy-backend results, the llvm function) of build(placeholders) on `inputs`."""
    phs = [gc.placeholder(f"in{i}", v.shape, dtype=str(v.dtype)) for i, v in enumerate(inputs)]
    outs = build(*phs)
    f = gc.function(phs, outs, backend="llvm", optimize=2)
    ref = gc.function(phs, outs, backend="numpy", optimize=0)
    return f(*inputs), ref(*inputs), f


def _w(rng, *shape, scale=0.3):
    return gc.constant((rng.standard_normal(shape) * scale).astype(np.float32))


def _separable(rng, H):
    """Bodies that never mix rows: what rows.row_tensors accepts."""
    W, U, b = _w(rng, H, H), _w(rng, H, 2 * H), _w(rng, H)

    def rnn(h, x):           # tanh RNN, every hidden state stacked
        hT, hs = gc.scan(lambda c, xt: ((lambda n: (n, n))(gc.tanh(c @ W + xt + b))), h, x)
        return [hT, hs]

    def rnn_reverse(h, x):   # the same, from the end
        hT, hs = gc.scan(lambda c, xt: ((lambda n: (n, n * 2.0))(gc.tanh(c @ W + xt))), h, x, reverse=True)
        return [hT, hs]

    def gates(h, x):         # a product read by column windows, softmax and a sum over axis 1, concatenate
        def step(c, xt):
            z = c @ U
            a, g = z[:, :H], z[:, H:]
            s = gc.softmax(a + xt, axis=1) * gc.sum(g, axis=1, keepdims=True) * 0.1
            n = gc.concatenate([s[:, : H // 2], gc.sigmoid(g)[:, H // 2:]], axis=1)
            return n, None
        hT, _ = gc.scan(step, h, x)
        return [hT]

    def history(h, x):       # the carry entering each step kept (what a gradient reads)
        (hT, c2), ys, hist = gc.scan(lambda c, xt: ((gc.tanh(c[0] @ W + xt), c[1] + c[0]), c[0] * 3.0),
                                      (h, h * 0.5), x, history=True)
        return [hT, c2, ys, hist[0], hist[1]]

    return [rnn, rnn_reverse, gates, history]


def _mixing(rng, H):
    """Bodies that read other rows: never split, still right."""
    W = _w(rng, H, H)

    def batch_mean(h, x):    # a reduction over the batch
        hT, _ = gc.scan(lambda c, xt: (gc.tanh(c @ W + gc.mean(c, axis=0) + xt), None), h, x)
        return [hT]

    def flipped(h, x):       # rows reversed
        hT, _ = gc.scan(lambda c, xt: (gc.tanh(c[::-1] * 0.5 + xt), None), h, x)
        return [hT]

    def first_row(h, x):     # one row broadcast to all
        hT, _ = gc.scan(lambda c, xt: (c * 0.5 + c[:1] + xt, None), h, x)
        return [hT]

    def gram(h, x):          # rows times rows
        hT, _ = gc.scan(lambda c, xt: (gc.tanh((c @ gc.transpose(c)) @ c * 0.01 + xt), None), h, x)
        return [hT]

    return [batch_mean, flipped, first_row, gram]


@pytest.mark.parametrize("n", [1, 3, 8, 9, 17])
def test_separable_bodies_split_and_match(threads, n):
    rng = np.random.default_rng(n)
    H, T = 6, 5
    hv = rng.standard_normal((n, H)).astype(np.float32)
    xv = (rng.standard_normal((T, n, H)) * 0.5).astype(np.float32)
    want_parts = rows.parts(n, threads)
    for case in _separable(rng, H):
        got, ref, f = _run_both(case, [hv, xv])
        for g_, r_ in zip(got, ref):
            np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5, err_msg=case.__name__)
        loops = _loops(f)
        assert loops, case.__name__
        for lp in loops:
            assert (lp.parts is not None) == (want_parts is not None), (case.__name__, lp.parts)
            if lp.parts:
                assert len(lp.parts) == len(want_parts)
                assert lp.parts[-1][1] == len(lp.body)


@pytest.mark.parametrize("n", [3, 16])
def test_row_mixing_bodies_never_split(threads, n):
    rng = np.random.default_rng(100 + n)
    H, T = 16 if n == 16 else 5, 4
    hv = rng.standard_normal((n, H)).astype(np.float32)
    xv = (rng.standard_normal((T, n, H)) * 0.5).astype(np.float32)
    for case in _mixing(rng, H):
        got, ref, f = _run_both(case, [hv, xv])
        for g_, r_ in zip(got, ref):
            np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5, err_msg=case.__name__)
        assert all(lp.parts is None for lp in _loops(f)), case.__name__


def test_row_split_off_by_setting(monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    rng = np.random.default_rng(5)
    hv, xv = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((3, 16, 8)).astype(np.float32)
    case = _separable(rng, 8)[0]
    _, _, f = _run_both(case, [hv, xv])
    assert all(lp.parts for lp in _loops(f))
    monkeypatch.setenv("GRAPHC_LLVM_ROW_SPLIT", "0")
    got, ref, f = _run_both(case, [hv, xv])
    assert all(lp.parts is None for lp in _loops(f))
    for g_, r_ in zip(got, ref):
        np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5)


def _sig(v):
    return 1 / (1 + np.exp(-v))


@pytest.mark.parametrize("n", [2, 9, 16])
def test_gru_last_state_float64_reference(threads, n):
    """gc.nn.GRU (its forward scan split by rows) against a float64 GRU written here (torch's equations)."""
    rng = np.random.default_rng(7 + n)
    T, C, H = 6, 5, 12
    layer = gc.nn.GRU(C, H)
    b = 1 / np.sqrt(H)
    d = {k: rng.uniform(-b, b, s).astype(np.float32) for k, s in
         (("weight_ih_l0", (3 * H, C)), ("weight_hh_l0", (3 * H, H)), ("bias_ih_l0", (3 * H,)),
          ("bias_hh_l0", (3 * H,)))}
    layer.load_state_dict(d)
    x = gc.placeholder("x", (None, T, C))
    _, h = layer(x)
    f = gc.function([x], h[0], backend="llvm", optimize=2)
    xv = rng.standard_normal((n, T, C)).astype(np.float32)
    w = {k: v.astype(np.float64) for k, v in d.items()}
    hh = np.zeros((n, H))
    for t in range(T):
        gi = xv[:, t].astype(np.float64) @ w["weight_ih_l0"].T + w["bias_ih_l0"]
        gh = hh @ w["weight_hh_l0"].T + w["bias_hh_l0"]
        r, z = _sig(gi[:, :H] + gh[:, :H]), _sig(gi[:, H:2 * H] + gh[:, H:2 * H])
        nn_ = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        hh = (1 - z) * nn_ + z * hh
    np.testing.assert_allclose(f(xv), hh, rtol=1e-4, atol=1e-5)
    if threads == 2 and n >= 2 * rows.MIN_ROWS:
        assert any(lp.parts for lp in _loops(f))


def test_gradients_through_a_split_scan(threads):
    """BPTT through a row-split forward scan: llvm's gradients equal the NumPy backend's, and those agree
    with central finite differences in float64."""
    rng = np.random.default_rng(3)
    n, T, H = 9, 4, 5
    W0 = (rng.standard_normal((H, H)) * 0.4)
    x = gc.placeholder("x", (T, n, H), dtype="float64")
    W = gc.parameter("W", W0.copy())

    def loss_of(Wt):
        hT, hs = gc.scan(lambda c, xt: ((lambda v: (v, v))(gc.tanh(c @ Wt + xt))),
                         gc.constant(np.zeros((n, H))), x)
        return gc.sum(hT * hT) + gc.mean(hs)

    loss = loss_of(W)
    (gW,) = gc.grad(loss, [W])
    xv = rng.standard_normal((T, n, H))
    got = gc.function([x], [loss, gW], backend="llvm")(xv)
    ref = gc.function([x], [loss, gW], backend="numpy")(xv)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-10)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-9, atol=1e-12)
    f_loss = gc.function([x], loss, backend="numpy")
    eps, num = 1e-6, np.zeros_like(W0)
    for i in range(H):
        for j in range(H):
            for sgn in (1, -1):
                Wp = W0.copy()
                Wp[i, j] += sgn * eps
                W.set_value(Wp)
                num[i, j] += sgn * float(f_loss(xv)) / (2 * eps)
    W.set_value(W0)
    np.testing.assert_allclose(got[1], num, rtol=1e-5, atol=1e-7)


def test_within_rows_guard():
    """The check a part's views pass: only the part's own rows of a shared buffer."""
    carry = View(0, 0, (8, 4), (4, 1), "float32")
    part1 = View(0, 16, (4, 4), (4, 1), "float32")      # rows 4..7
    owned = {0: np.sort(rows.offsets(part1))}
    assert rows.within_rows([part1, View(0, 16, (4, 2), (4, 1), "float32")], owned)   # its own columns
    assert rows.within_rows([View(5, 0, (100,), (1,), "float32")], owned)             # another buffer
    assert not rows.within_rows([carry], owned)                                     # every row
    assert not rows.within_rows([View(0, 12, (4, 4), (4, 1), "float32")], owned)    # one row too early
    assert not rows.within_rows([View(0, 16, (4, 4), (0, 1), "float32")] + [View(0, 0, (1,), (1,), "float32")],
                                owned)
    assert rows.parts(16, 2) == [(0, 8), (8, 16)]
    assert rows.parts(7, 2) is None and rows.parts(16, 1) is None
    assert rows.parts(9, 2) == [(0, 4), (4, 9)]


def test_within_rows_empty_views():
    """Views of no elements touch nothing; an empty ownership admits no element."""
    assert rows.within_rows([View(0, 4, (0, 4), (4, 1), "float32")], {0: np.arange(4)})
    assert not rows.within_rows([View(0, 0, (1,), (1,), "float32")], {0: np.empty(0, np.int64)})
