"""Every op case against its NumPy reference, on every backend, for every shape and dtype in the table."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from op_table import CASES, input_dtype, make_inputs
from conftest import assert_close

PARAMS = [(c, s, d) for c in CASES for s in c.shapes for d in c.dtypes]


def _ids(p):
    c, s, d = p
    return f"{c.name}-{'x'.join(map(str, s))}-{d}".replace(" ", "")


@pytest.mark.parametrize("case,shapes,dtype", PARAMS, ids=[_ids(p) for p in PARAMS])
def test_op_matches_numpy(case, shapes, dtype, backend, rng):
    xs = make_inputs(case, shapes, dtype, rng)
    phs = [gc.placeholder(f"x{i}", s, input_dtype(case, i, dtype)) for i, s in enumerate(shapes)]
    out = case.fn(*phs)
    want = np.asarray(case.ref(*xs))
    assert out.dtype == want.dtype.name, f"dtype rule: graphc {out.dtype}, numpy {want.dtype}"
    assert out.shape == want.shape, f"shape rule: graphc {out.shape}, numpy {want.shape}"
    f = gc.function(phs, out, backend=backend)
    assert_close(f(*xs), want, dtype, backend)
    assert_close(gc.evaluate([out], dict(zip(phs, xs)))[0], want, dtype)


def test_symbolic_batch_dims(backend, rng):
    x = gc.placeholder("x", (None, 6))
    y = gc.placeholder("y", (None,))
    out = (x.reshape(-1, 2, 3).sum(axis=2).mean(axis=1) + y)[1:]
    assert str(out.shape[0]) == "Max(0, N - 1)" or out.ndim == 1
    f = gc.function([x, y], out, backend=backend)
    for n in (1, 4, 7):
        a = rng.standard_normal((n, 6)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        assert_close(f(a, b), (a.reshape(-1, 2, 3).sum(2).mean(1) + b)[1:], "float32", backend)
