"""A scan nested in a scan's body on native backends: the inner loop's buffers must not share arena
memory with the outer loop's carries (lifetimes are positions in the top-level step list; the inner
loop used its index in the outer body, which collided with top-level steps and overwrote a carry)."""
import numpy as np
import pytest

import graphc as gc
from graphc import ops as F


def _graph():
    S0 = gc.constant(np.arange(6.).reshape(2, 3) / 10)
    x0 = gc.placeholder("x", (3,), "float64")

    def body(c, _):
        S, g, x = c
        q, _ = gc.scan(lambda q, si: (q - F.sum(si * q) * si, None), -g, S)
        x = x + 0.1 * q
        return (S * 0.9, x * 2.0, x), None

    fin, _ = gc.scan(body, (S0, x0 * 2.0, x0), length=3)
    return x0, list(fin)


def _numpy_reference(xv):
    S, g, x = np.arange(6.).reshape(2, 3) / 10, xv * 2.0, xv.copy()
    for _ in range(3):
        q = -g
        for si in S:
            q = q - np.sum(si * q) * si
        x = x + 0.1 * q
        S, g, x = S * 0.9, x * 2.0, x
    return [S, g, x]


@pytest.mark.parametrize("backend", ["numpy", "llvm", "cuda-emulated"])
@pytest.mark.parametrize("level", [0, 2])
def test_nested_scan_keeps_outer_carries(backend, level):
    x0, outs = _graph()
    xv = np.array([0.3, -0.2, 0.5])
    got = gc.function([x0], outs, backend=backend, optimize=level)(xv)
    for g, r in zip(got, _numpy_reference(xv)):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
