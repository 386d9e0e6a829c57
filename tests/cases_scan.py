"""Op-table rows for gc.scan (collected by tests/op_table.py): forward against NumPy loops written
here, verify_grad through back-propagation through time, and second order (the gradient scan's own
gradient)."""
from __future__ import annotations

import numpy as np

import graphc as gc
from op_table import Case


def _rnn(xs, h0, U, reverse=False):
    def step(h, x):
        h2 = gc.tanh(x + h @ U)
        return h2, h2 * h2
    return gc.scan(step, h0, xs, reverse=reverse)


def _np_rnn(xs, h0, U, reverse=False):
    h, ys = h0, [None] * len(xs)
    for t in (reversed(range(len(xs))) if reverse else range(len(xs))):
        h = np.tanh(xs[t] + h @ U)
        ys[t] = h * h
    return h, (np.stack(ys) if len(xs) else np.zeros((0,) + h0.shape, h0.dtype))


def _np_lstm_like(xs, c0, W):
    """Two carries, a closed-over weight and an integer step counter."""
    h, c, k = c0, c0, 0
    for x in xs:
        c = c * 0.5 + np.tanh(x @ W + h) * (k + 1)
        h = np.sin(c)
        k += 1
    return h + c


def _lstm_like(xs, c0, W):
    def step(carry, x):
        h, c, k = carry
        c = c * 0.5 + gc.tanh(x @ W + h) * gc.cast(k + 1, x.dtype)
        return (gc.sin(c), c, k + 1), None
    (h, c, _), _ = gc.scan(step, (c0, c0, gc.constant(0, "int32")), xs)
    return h + c


def _second_order(xs, h0, U):
    hT, ys = _rnn(xs, h0, U)
    g = gc.grad((hT ** 2).sum() + ys.sum(), [h0, U])
    return (g[0] ** 2).sum() + (g[1] * U).sum()


RNN_SHAPES = [[(4, 2, 3), (2, 3), (3, 3)], [(1, 1, 2), (1, 2), (2, 2)], [(0, 2, 3), (2, 3), (3, 3)]]

CASES = [
    Case("scan_rnn_ys", lambda x, h, u: _rnn(x, h, u)[1], lambda x, h, u: _np_rnn(x, h, u)[1], RNN_SHAPES),
    Case("scan_rnn_final_reverse", lambda x, h, u: _rnn(x, h, u, True)[0],
         lambda x, h, u: _np_rnn(x, h, u, True)[0], RNN_SHAPES),
    Case("scan_two_carries_counter", _lstm_like, _np_lstm_like, [[(3, 2, 4), (2, 3), (4, 3)]]),
    Case("scan_map_no_carry", lambda x, w: gc.scan(lambda c, xt: (None, gc.exp(xt @ w)), None, x)[1],
         lambda x, w: np.exp(x @ w), [[(3, 2, 4), (4, 2)]]),
    Case("scan_second_order", _second_order, None, [[(3, 2, 3), (2, 3), (3, 3)]], dtypes=("float64",)),
]


def _np_second_order(xs, h0, U):
    """d/d(h0, U) of sum(hT^2) + sum(ys) by hand-written BPTT."""
    hs, h = [h0], h0
    for x in xs:
        h = np.tanh(x + h @ U)
        hs.append(h)
    gh, gU = 2 * hs[-1], np.zeros_like(U)
    for t in reversed(range(len(xs))):
        h = hs[t + 1]
        gh = gh + 2 * h  # from ys[t] = h*h
        ga = gh * (1 - h * h)
        gU += hs[t].T @ ga
        gh = ga @ U.T
    return (gh ** 2).sum() + (gU * U).sum()


CASES[-1].ref = _np_second_order
