"""Partial vectors on llvm (backends/llvm/gemm.py vload / vstore): the first `live` lanes of a vector are
read and written as plain loads and stores of power-of-two pieces (tail_pieces) on AVX2 and SSE, or with
LLVM's masked intrinsics on AVX-512 or under GRAPHC_LLVM_MASKED_TAILS=1 (AVX2's masked store is microcoded
on AMD's Zen 1). Both
forms against NumPy on the kernels with tails: the micro-kernel's last columns, max pooling's gradient on
planes narrower than a vector, a convolution; under bounds checking (no piece may touch a lane past
`live`); both ISAs' vector shapes."""
from __future__ import annotations

import re

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def test_tail_pieces_cover_exactly_the_live_lanes():
    from graphc.backends.llvm.gemm import tail_pieces
    for live in range(1, 33):
        pieces = tail_pieces(live)
        lanes = [at + i for at, k in pieces for i in range(k)]
        assert lanes == list(range(live)), (live, pieces)
        assert all(k & (k - 1) == 0 for _, k in pieces)                 # powers of two
        assert [k for _, k in pieces] == sorted((k for _, k in pieces), reverse=True)
        assert len(pieces) == bin(live).count("1")


def _graph(dtype):
    """A product with 13 output columns on the micro-kernel, max pooling (and its gradient) over 10x10 planes
    (5 windows a row: no full vector), and a 5x5 convolution over 9x11 images."""
    a = gc.placeholder("a", (7, 9), dtype)
    b = gc.placeholder("b", (9, 13), dtype)
    x = gc.placeholder("x", (3, 2, 10, 10), dtype)
    w = gc.placeholder("w", (3, 2, 5, 5), dtype)
    p = gc.max_pool2d(x, 2)
    (gx,) = gc.grad(gc.sum(p * p), [x])
    c = gc.conv2d(x[:, :, :9, :], w, padding=(2, 1))
    return [a, b, x, w], [gc.matmul(a, b), p, gx, c]


def _reference(av, bv, xv, wv):
    from test_llvm_conv_speedpaths import _conv_reference
    x64 = xv.astype(np.float64)
    p = x64.reshape(3, 2, 5, 2, 5, 2).max(axis=(3, 5))
    win = x64.reshape(3, 2, 5, 2, 5, 2).transpose(0, 1, 2, 4, 3, 5).reshape(3, 2, 5, 5, 4)
    first = win.argmax(axis=-1)
    g = np.zeros_like(win)
    np.put_along_axis(g, first[..., None], (2 * p)[..., None], axis=-1)
    gx = g.reshape(3, 2, 5, 5, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(3, 2, 10, 10)
    c = _conv_reference(xv[:, :, :9, :], wv, (1, 1), ((2, 2), (1, 1)), (1, 1), 1)
    return [av.astype(np.float64) @ bv, p, gx, c]


@pytest.mark.parametrize("masked", ["0", "1"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tails_match_numpy_in_both_forms(masked, dtype, isa, monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_MASKED_TAILS", masked)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    ins, outs = _graph(dtype)
    f = gc.function(ins, outs, backend="llvm")
    vals = [rng.standard_normal(t.shape).astype(dtype) for t in ins]
    tol = 2e-5 if dtype == "float32" else 1e-12
    for got, want in zip(f(*vals), _reference(*vals)):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)
    assert ("call void @llvm.masked.store" in f.source) == (masked == "1")
    assert bool(re.search(r"= call <[^>]*> @llvm\.masked\.load", f.source)) == (masked == "1")


def test_the_default_follows_the_isa(isa, monkeypatch):
    """auto: AVX-512's code keeps the masked intrinsics (one instruction with a mask register), AVX2's
    uses pieces."""
    monkeypatch.delenv("GRAPHC_LLVM_MASKED_TAILS", raising=False)
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    a, b = gc.placeholder("a", (7, 9)), gc.placeholder("b", (9, 13))
    f = gc.function([a, b], gc.matmul(a, b), backend="llvm")
    assert ("call void @llvm.masked.store" in f.source) == (isa == "avx512")


def test_pieces_stay_inside_their_buffers_under_bounds_checks(monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")
    ins, outs = _graph("float32")
    f = gc.function(ins, outs, backend="llvm", sanitize="bounds")
    vals = [rng.standard_normal(t.shape).astype("float32") for t in ins]
    for got, want in zip(f(*vals), _reference(*vals)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
