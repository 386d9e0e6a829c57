"""Reductions over several axes on llvm (backends/llvm/kernels.reduce): the reduced dims that x walks
contiguously are merged into one run before the loops are emitted (a CNN bias gradient: the sum of an
NCHW tensor over N, H and W is N runs of H*W, not N*H loops of W), so the inner loop is one unit-stride
run that LLVM vectorises. Against NumPy in float64 on odd sizes, through views that merge and views that
do not (transposed, sliced), with NaN and inf propagating, max and min as well as sum, both ISAs."""
from __future__ import annotations

import re

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip

SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 3, 17, 1), (1, 4, 63, 65), (17, 2, 3, 3)]


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_reductions_over_merged_runs_match_numpy(shape, dtype, op, isa, rng):
    xv = rng.standard_normal(shape).astype(dtype)
    x = gc.placeholder("x", shape, dtype)
    red = getattr(gc, op)
    cases = [(0, 2, 3), (2, 3), (0, 1), (1, 3)]
    f = gc.function([x], [red(x, axis=a) for a in cases], backend="llvm")
    ref = getattr(np, op)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for got, a in zip(f(xv), cases):
        want = ref(xv.astype(np.float64), axis=a)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(xv.size))


def test_views_that_do_not_merge_and_nan_inf_propagation(rng):
    xv = rng.standard_normal((6, 4, 9, 10)).astype("float32")
    x = gc.placeholder("x", xv.shape)
    tr = gc.transpose(x, (0, 1, 3, 2))          # H and W swapped: the reduced dims walk with stride 10, 1
    sl = x[:, :, :, 1:8]                        # 7 of each row's 10: runs of 7, not of 63
    f = gc.function([x], [gc.sum(tr, axis=(0, 2, 3)), gc.sum(sl, axis=(0, 2, 3)), gc.max(x, axis=(0, 2, 3))],
                    backend="llvm")
    xv[2, 1, 4, 5] = np.nan
    xv[3, 2, 0, 0] = np.inf
    xv[4, 3, 8, 9] = -np.inf
    a, b, c = f(xv)
    x64 = xv.astype(np.float64)
    np.testing.assert_allclose(a, x64.transpose(0, 1, 3, 2).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b, x64[:, :, :, 1:8].sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.isnan(a), [False, True, False, False])
    assert a[2] == np.inf and a[3] == -np.inf
    assert np.isnan(c[1]) and c[2] == np.inf


def test_the_merged_run_is_vectorised():
    """A bias gradient's sum over (N, H, W) of (3, 5, 7, 9): its inner loop runs over the 63 elements of
    H*W, which LLVM turns into packed adds on the host's vectors."""
    x = gc.placeholder("x", (3, 5, 7, 9))
    f = gc.function([x], gc.sum(x, axis=(0, 2, 3)), backend="llvm")
    np.testing.assert_allclose(f(np.ones((3, 5, 7, 9), np.float32)), np.full(5, 189.0))
    bounds = sorted(int(b) for b in re.findall(r"icmp slt i64 %\w+, (\d+)\n", f.source + "\n"))
    assert bounds == [3, 5, 63], f"loops over C, N and the merged H*W expected, got bounds {bounds}"
    assert re.search(r"\tv?addps\t%[xyz]mm", f.asm), "no packed float adds in the reduction"
