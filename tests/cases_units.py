"""Op-table rows for the units of graphc/nn/units.py and their functions in graphc/ops/nn_ops.py
(p-norm pooling over groups, Gaussian radial basis units, highway layers): every backend, both float
dtypes, against NumPy written from the definitions, and gradients by float64 finite differences."""
from __future__ import annotations

import numpy as np

import graphc as gc
from graphc.nn.units import highway
from op_table import Case


def _pnorm(x, g, p, axis):
    axis = axis % x.ndim
    y = x.reshape(x.shape[:axis] + (x.shape[axis] // g, g) + x.shape[axis + 1:])
    return (np.abs(y) ** p).sum(axis + 1) ** (1 / p)


def _rbf(x, c, lg):
    gamma = 0.25 * np.exp(lg)
    d2 = ((x[..., None, :] - c) ** 2).sum(-1)
    return np.exp(-gamma * d2).astype(x.dtype)


def _sig(a):
    return 1 / (1 + np.exp(-a))


def _highway(x, wh, bh, wt, bt, act):
    h = act(x @ wh.T + bh)
    t = _sig(x @ wt.T + bt)
    return (t * h + (1 - t) * x).astype(x.dtype)


CASES = [
    Case("pnorm_pool_p2", lambda x: gc.pnorm_pool(x, 3), lambda x: _pnorm(x, 3, 2, 1), [[(3, 6)], [(2, 6, 2, 2)]]),
    Case("pnorm_pool_p3_last_axis", lambda x: gc.pnorm_pool(x, 2, 3.0, axis=-1), lambda x: _pnorm(x, 2, 3, -1),
         [[(2, 3, 4)]]),
    Case("pnorm_pool_p1_group1", lambda x: gc.pnorm_pool(x, 1, 1.0), lambda x: np.abs(x), [[(2, 5)]]),
    Case("pnorm_pool_p4", lambda x: gc.pnorm_pool(x, 4, 4), lambda x: _pnorm(x, 4, 4, 1), [[(2, 8)]]),
    Case("rbf", lambda x, c, lg: gc.rbf(x, c, 0.25 * gc.exp(lg)), _rbf,
         [[(4, 3), (5, 3), (5,)], [(2, 2, 3), (4, 3), ()], [(3,), (2, 3), (2,)]]),
    Case("highway_tanh", lambda x, wh, bh, wt, bt: highway(x, wh, bh, wt, bt, gc.tanh),
         lambda x, wh, bh, wt, bt: _highway(x, wh, bh, wt, bt, np.tanh),
         [[(4, 3), (3, 3), (3,), (3, 3), (3,)], [(2, 2, 3), (3, 3), (3,), (3, 3), (3,)]]),
    Case("highway_relu", lambda x, wh, bh, wt, bt: highway(x, wh, bh, wt, bt),
         lambda x, wh, bh, wt, bt: _highway(x, wh, bh, wt, bt, lambda a: np.maximum(a, 0)),
         [[(5, 4), (4, 4), (4,), (4, 4), (4,)]]),
]
