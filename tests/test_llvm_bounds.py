"""gc.function(..., backend="llvm", sanitize="bounds"): every load, store, BLAS call and memset of the
generated kernels is checked against its buffer. Correct graphs (every op case, fuzzed graphs, their
gradients) run clean and agree with NumPy; deliberately broken address arithmetic (a shifted view, a
wrong BLAS leading dimension, an unclamped convolution window) is caught and named, never executed."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
import fuzz
from conftest import assert_close, backend_or_skip
from op_table import CASES, input_dtype, make_inputs

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _bounds(inputs, outputs, **kw):
    return gc.function(inputs, outputs, backend="llvm", sanitize="bounds", **kw)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_op_case_runs_clean_under_bounds_checks(case, rng):
    """Each op case, every shape in the table (size-0, size-1, broadcast), and its gradient graph."""
    dtype = "float64" if "float64" in case.dtypes else case.dtypes[0]
    for shapes in case.shapes:
        xs = make_inputs(case, shapes, dtype, rng)
        phs = [gc.placeholder(f"x{i}", s, input_dtype(case, i, dtype)) for i, s in enumerate(shapes)]
        out = case.fn(*phs)
        assert_close(_bounds(phs, out)(*xs), np.asarray(case.ref(*xs)), dtype, "llvm")
        wrt = [p for i, p in enumerate(phs)
               if p.dtype == "float64" and (case.grad_wrt is None or i in case.grad_wrt)]
        if out.dtype == "float64" and wrt and case.grad:
            gs = gc.grad((out * out).sum(), wrt)
            for got, want in zip(_bounds(phs, gs)(*xs), gc.function(phs, gs)(*xs)):
                assert_close(got, want, dtype, "llvm")


def test_fuzzed_graphs_run_clean_under_bounds_checks():
    """Fuzzed graphs and their gradient graphs, every optimisation level, checked accesses."""
    t = fuzz.fuzz(range(0, 60), ["llvm"], grad_every=0, log=None, hvp_every=1000, sanitize="bounds")["llvm"]
    assert t.graphs > 50 and not t.failures, t.failures[:5]


@pytest.mark.slow
def test_long_fuzz_slice_runs_clean_under_bounds_checks():
    t = fuzz.fuzz(range(60, 460), ["llvm"], grad_every=0, log=None, sanitize="bounds")["llvm"]
    assert t.graphs > 350 and not t.failures, t.failures[:5]


def test_networks_run_clean_under_bounds_checks(rng):
    """A CNN step (im2col GEMM, pooling, their gradients) and an LSTM with BPTT (native scan loops)."""
    nn = gc.nn
    x = gc.placeholder("x", (None, 2, 4, 4), "float64")
    y = gc.placeholder("y", (None,), "int64")
    net = nn.Sequential(nn.Conv2D(2, 4, 3, padding=1, dtype="float64"), gc.relu, nn.MaxPool2D(2), nn.Flatten(),
                        nn.Dense(16, 3, dtype="float64"))
    loss = gc.losses.cross_entropy(net(x), y)
    outs = [loss] + gc.grad(loss, net.params)
    xs, ys = rng.standard_normal((5, 2, 4, 4)), rng.integers(0, 3, 5)
    for got, want in zip(_bounds([x, y], outs)(xs, ys), gc.function([x, y], outs)(xs, ys)):
        assert_close(got, want, "float64", "llvm")
    lstm = nn.LSTM(3, 4, dtype="float64")
    s = gc.placeholder("s", (None, 6, 3), "float64")
    seq, (h, c) = lstm(s)
    loss = gc.sum(seq * seq) + gc.sum(h)
    outs = [loss] + gc.grad(loss, lstm.params)
    f = _bounds([s], outs)
    assert "scan" not in f.program.info["fallback_ops"]
    ss = rng.standard_normal((2, 6, 3))
    for got, want in zip(f(ss), gc.function([s], outs)(ss)):
        assert_close(got, want, "float64", "llvm")


# ---- the checker catches broken address arithmetic ------------------------------------------------

def test_a_shifted_view_is_caught_named_and_never_applied(monkeypatch, rng):
    """A planner bug that moves a slice view past its buffer: the access is caught, the error names
    the node and the user's line, and the call applies no update."""
    import graphc.backends.schedule.plan as plan   # the shared schedule's getitem row
    real = plan.view_getitem
    monkeypatch.setattr(plan, "view_getitem", lambda v, index: _shift(real(v, index), 1000))
    x = gc.placeholder("x", (8,), "float64")
    c = gc.parameter("c", np.zeros(2))
    y = x[2:4] * 2.0                                  # the line the error must name
    f = _bounds([x], y, updates=[(c, c + y)])
    with pytest.raises(gc.GraphcError, match=r"(?s)out-of-bounds memory access in the llvm .*node built at .*test_llvm_bounds.py"):
        f(rng.standard_normal(8))
    assert np.all(c.value == 0)


def _shift(v, by):
    from graphc.backends.schedule.views import View
    return View(v.buf, v.offset + by, v.shape, v.strides, v.dtype, v.literal)


def test_a_wrong_blas_leading_dimension_is_caught_before_the_call(monkeypatch, rng):
    import graphc.backends.llvm.gemm as gemm
    real = gemm.blas_layout

    def broken(v):
        lay = real(v)
        return None if lay is None else (lay[0], lay[1] + 64)
    monkeypatch.setattr(gemm, "blas_layout", broken)
    a, b = gc.placeholder("a", (4, 5), "float64"), gc.placeholder("b", (5, 6), "float64")
    f = _bounds([a, b], a @ b)
    with pytest.raises(gc.GraphcError, match=r"llvm matmul kernel of node matmul"):
        f(rng.standard_normal((4, 5)), rng.standard_normal((5, 6)))


def test_an_unclamped_convolution_window_is_caught(monkeypatch, rng):
    import graphc.backends.llvm.conv as conv
    # im2col copies each tap's in-bounds rows and columns: claim every output position is in bounds
    monkeypatch.setattr(conv, "_valid", lambda size, out, k, stride, dil, pad: (0, out))
    monkeypatch.setenv("GRAPHC_LLVM_CONV_WIDE", "0")   # im2col's path (the wide grid reads no windows)
    x, w = gc.placeholder("x", (1, 1, 5, 5), "float64"), gc.placeholder("w", (2, 1, 3, 3), "float64")
    f = _bounds([x, w], gc.conv2d(x, w, padding=1))
    with pytest.raises(gc.GraphcError, match=r"(im2col|conv2d) kernel of node conv2d"):
        f(rng.standard_normal((1, 1, 5, 5)), rng.standard_normal((2, 1, 3, 3)))


def test_bounds_checks_cost_only_when_asked(rng):
    """Without sanitize the IR has no checks (same code as before); with it every kernel has them."""
    x = gc.placeholder("x", (16,), "float64")
    plain, checked = gc.function([x], gc.exp(x), backend="llvm"), _bounds([x], gc.exp(x))
    assert "icmp uge" not in plain.source and "icmp uge" in checked.source
    a = rng.standard_normal(16)
    assert_close(checked(a), plain(a), "float64", "llvm")


# ---- options are validated, never ignored ---------------------------------------------------------

@pytest.mark.parametrize("backend,value", [("numpy", "bounds"), ("numpy", "address"), ("llvm", "address"),
                                           ("cuda-emulated", "bounds")])
def test_unsupported_sanitizers_are_refused(backend, value):
    backend_or_skip(backend)
    x = gc.placeholder("x", (3,), "float64")
    with pytest.raises(gc.GraphcError, match=rf"sanitize='{value}' is not supported by backend '{backend}'.*"
                                             rf"'bounds' \(llvm\), 'address' \(cuda-emulated\)"):
        gc.function([x], x + 1.0, backend=backend, sanitize=value)


def test_unknown_options_are_refused():
    x = gc.placeholder("x", (3,), "float64")
    with pytest.raises(gc.GraphcError, match=r"unknown option sanitise= for backend 'llvm'; known: .*sanitize"):
        gc.function([x], x + 1.0, backend="llvm", sanitise="bounds")
    with pytest.raises(gc.GraphcError, match=r"mode='fast'"):
        gc.function([x], x + 1.0, mode="fast")
    with pytest.raises(gc.GraphcError, match=r"unknown option arch="):
        gc.function([x], x + 1.0, backend="numpy", arch="sm_90")
