"""Weights packed for the micro-kernel (backends/llvm/gemm.py pack_panels / gemm_tiles(packed=True),
plan.Plan._packed_tiles, Schedule.invariant): a product x @ W whose W is a parameter or constant (or a
value of them alone: W.T, 2 * W) runs the micro-kernel over a copy of W in panels of one tile's columns,
made by a step that the plan's prologue runs once and again whenever the parameter has a new array.
Against NumPy in float64 on odd sizes, float32 and float64, both ISAs' vector shapes and one or two threads;
the panel layout itself against a NumPy reshape; a's rows in blocks; a 3-D activation's epilogue; a new
weight after set_value and after another function's updates=; the weights a training step updates itself
(not packed: they change every call); the size and width rule (gemm.packs) and its switches; inside a scan
(packed before the loop: once for a weight, every call for one the step updates; not a carry, nor in a
nested scan); bounds-checked builds; a constant, and a weight read by two products, packed once. No
timing."""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, plan_steps


@pytest.fixture(autouse=True)
def llvm(monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.delenv("GRAPHC_LLVM_SMALL_GEMM", raising=False)
    monkeypatch.delenv("GRAPHC_LLVM_PACK", raising=False)
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")


def _tol(dtype):
    return (2e-5, 2e-5) if dtype == "float32" else (1e-11, 1e-11)


def _spec_plan(f):
    specs = list(f.program._specs.values())
    assert len(specs) == 1
    return specs[0].plan


def _packed(f) -> bool:
    """Whether f's plan packs a weight in its prologue and runs a product over the panels."""
    plan = _spec_plan(f)
    pro = [getattr(s, "name", "") for s in plan.steps[:plan.prologue]]
    return "pack_panels" in pro and any(getattr(s, "packed", False) for s in plan_steps(f))


def _dense(rng, n, k, m, dtype, transposed=False):
    x = gc.placeholder("x", (n, k), dtype)
    wv = rng.standard_normal((m, k) if transposed else (k, m)).astype(dtype)
    w = gc.parameter("w", wv)
    y = gc.relu(x @ (gc.transpose(w) if transposed else w) + 0.25)
    return x, w, y


def _ref(xv, w, transposed=False):
    wv = w.value.T if transposed else w.value
    return np.maximum(xv.astype(np.float64) @ wv.astype(np.float64) + 0.25, 0)


SIZES = [(2, 1, 8), (3, 17, 9), (17, 3, 65), (63, 65, 17), (65, 63, 257), (257, 17, 63), (6, 256, 24)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nkm", SIZES, ids=["x".join(map(str, s)) for s in SIZES])
def test_packed_product_matches_numpy(nkm, dtype, isa, threads, rng):
    n, k, m = nkm
    for transposed in (False, True):
        x, w, y = _dense(rng, n, k, m, dtype, transposed)
        f = gc.function([x], y, backend="llvm")
        xv = rng.standard_normal((n, k)).astype(dtype)
        rtol, atol = _tol(dtype)
        np.testing.assert_allclose(f(xv), _ref(xv, w, transposed), rtol=rtol, atol=atol * k)
        assert _packed(f), (nkm, transposed)
        assert f"{n}x{k}x{m} {dtype}: micro-kernel over the weight packed in" in \
            " ".join(f.program.info["target"]["gemm"]["products"])
        # W.T is packed straight from the transposed view: no contiguous copy of it first
        assert [s.name for s in _spec_plan(f).steps[:_spec_plan(f).prologue]] == ["pack_panels"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_blocks(dtype, isa, threads, monkeypatch, rng):
    """a's rows in blocks (gemm._row_block) for a product whose a outgrows ROW_BLOCK_BYTES: lowered here so
    odd sizes take several blocks and a short last one."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "ROW_BLOCK_BYTES", 4096)
    for n, k, m in [(257, 17, 65), (65, 63, 33), (13, 129, 40)]:
        assert gemm._row_block(n, k, 6, dtype) < n
        x, w, y = _dense(rng, n, k, m, dtype)
        f = gc.function([x], y, backend="llvm")
        xv = rng.standard_normal((n, k)).astype(dtype)
        rtol, atol = _tol(dtype)
        np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=rtol, atol=atol * k)
        assert _packed(f)


def test_epilogue_of_a_batched_activation(threads, monkeypatch, rng):
    """(batch, seq, k) @ W + bias, residual, ReLU: one GEMM over all rows, and its region over the 3-D
    tensors joins it (epilogue._rows2d: their leading dims merge) where the switch asks for every product."""
    monkeypatch.setenv("GRAPHC_LLVM_PRODUCT_EPILOGUE", "all")
    monkeypatch.setenv("GRAPHC_LLVM_FOLD", "0")   # (else folded into the tiles: tests/test_llvm_product_fold.py)
    for shape, k, m in [((2, 9), 17, 40), ((1, 64), 32, 48), ((3, 1), 5, 9)]:
        x, r = gc.placeholder("x", shape + (k,), "float32"), gc.placeholder("r", shape + (m,), "float32")
        w = gc.parameter("w", rng.standard_normal((k, m)).astype(np.float32))
        b = gc.parameter("b", rng.standard_normal(m).astype(np.float32))
        f = gc.function([x, r], gc.relu(x @ w + b + r), backend="llvm")
        xv = rng.standard_normal(shape + (k,)).astype(np.float32)
        rv = rng.standard_normal(shape + (m,)).astype(np.float32)
        want = np.maximum(xv.astype(np.float64) @ w.value + b.value + rv, 0)
        np.testing.assert_allclose(f(xv, rv), want, rtol=2e-5, atol=1e-4)
        assert _packed(f) and any(getattr(s, "epilogue", False) for s in plan_steps(f)), shape
        assert "elementwise" not in [s.name for s in plan_steps(f)]


def _run_pack(k, m, nr, dtype, strides=None):
    """gemm.pack_panels compiled alone over a (k, m) array read with `strides` (elements)."""
    from graphc.backends.llvm import gemm, tune
    from graphc.backends.schedule.views import View
    src = np.random.default_rng(3).standard_normal(k * m * 2).astype(dtype)
    strides = strides or (m, 1)
    size = gemm.packed_size(k, m, nr)
    dst = np.full(size, np.nan, dtype)
    kern = gemm.pack_panels(View(0, 0, (size,), (1,), dtype), View(1, 0, (k, m), strides, dtype), nr)
    mod, fns = tune._probe(kern, 2, (1,))
    table = (ctypes.c_void_p * 2)(dst.ctypes.data, src.ctypes.data)
    fns[1](ctypes.addressof(table))
    b = np.lib.stride_tricks.as_strided(src, (k, m), tuple(s * src.itemsize for s in strides))
    return dst, b


@pytest.mark.parametrize("k,m,nr", [(1, 8, 8), (5, 16, 16), (7, 17, 16), (3, 5, 16), (65, 63, 32)])
def test_panel_layout(k, m, nr):
    for strides in (None, (1, k)):   # row-major, and a transposed (column-major) weight
        dst, b = _run_pack(k, m, nr, "float32", strides)
        panels = -(-m // nr)
        padded = np.zeros((k, panels * nr), np.float32)
        padded[:, :m] = b
        want = padded.reshape(k, panels, nr).transpose(1, 0, 2).reshape(-1)
        np.testing.assert_array_equal(dst, want)   # every element written: no NaN left, zeros past m


def test_a_new_weight_is_repacked(rng):
    x, w, y = _dense(rng, 17, 33, 40, "float32")
    f = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((17, 33)).astype(np.float32)
    for _ in range(3):
        np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-4)
        np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-4)
        w.set_value(rng.standard_normal((33, 40)).astype(np.float32))
    assert _packed(f)
    # another function's updates= replace the weight: the packed copy follows
    g = gc.function([], [], updates=[(w, w * 0.5 - 1.0)], backend="llvm")
    for _ in range(2):
        g()
        np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-4)


def test_weights_a_training_step_updates_are_not_packed(rng):
    x, w, y = _dense(rng, 16, 24, 32, "float32")
    loss = gc.sum(y * y)
    (gw,) = gc.grad(loss, [w])
    step = gc.function([x], loss, updates=[(w, w - 0.01 * gw)], backend="llvm")
    infer = gc.function([x], y, backend="llvm")
    xv = rng.standard_normal((16, 24)).astype(np.float32)
    for _ in range(3):
        before = w.value.astype(np.float64)
        np.testing.assert_allclose(step(xv), np.sum(np.maximum(xv @ before + 0.25, 0) ** 2), rtol=1e-4)
        np.testing.assert_allclose(infer(xv), _ref(xv, w), rtol=2e-5, atol=1e-4)
    assert not _packed(step)   # a new array every call: packing it would run every call
    assert _packed(infer)


def test_a_value_of_weights_alone_is_packed(rng):
    x = gc.placeholder("x", (9, 20), "float32")
    w1 = gc.parameter("w1", rng.standard_normal((20, 30)).astype(np.float32))
    cv = rng.standard_normal((20, 30)).astype(np.float32)
    f = gc.function([x], x @ (w1 * 2.0 + gc.constant(cv)), backend="llvm")
    xv = rng.standard_normal((9, 20)).astype(np.float32)
    for _ in range(2):
        want = xv.astype(np.float64) @ (2.0 * w1.value.astype(np.float64) + cv)
        np.testing.assert_allclose(f(xv), want, rtol=2e-5, atol=1e-4)
        w1.set_value(rng.standard_normal((20, 30)).astype(np.float32))
    assert _packed(f)
    names = [s.name for s in _spec_plan(f).steps[:_spec_plan(f).prologue]]
    assert names[-1] == "pack_panels" and len(names) >= 2   # the sum, then its packing: both once


def test_a_constant_and_a_weight_read_by_two_products_are_packed_once(rng):
    x = gc.placeholder("x", (11, 24), "float32")
    cv = rng.standard_normal((40, 24)).astype(np.float32)
    w = gc.parameter("w", rng.standard_normal((24, 40)).astype(np.float32))
    h = gc.relu(x @ gc.transpose(gc.constant(cv)))          # a constant, transposed: packed once too
    y = gc.tanh(x @ w) + gc.sigmoid((h[:, :24] + x) @ w)    # one weight, two products: one packing step
    f = gc.function([x], [h, y], backend="llvm")
    xv = rng.standard_normal((11, 24)).astype(np.float32)
    for _ in range(2):
        x64, w64 = xv.astype(np.float64), w.value.astype(np.float64)
        hw = np.maximum(x64 @ cv.T, 0)
        want = np.tanh(x64 @ w64) + 1 / (1 + np.exp(-((hw[:, :24] + x64) @ w64)))
        got = f(xv)
        np.testing.assert_allclose(got[0], hw, rtol=2e-5, atol=1e-4)
        np.testing.assert_allclose(got[1], want, rtol=2e-5, atol=1e-4)
        w.set_value(rng.standard_normal((24, 40)).astype(np.float32))
    plan = _spec_plan(f)
    assert [s.name for s in plan.steps[:plan.prologue]] == ["pack_panels"] * 2   # cv's, and w's once
    assert sum(getattr(s, "packed", False) for s in plan_steps(f)) == 3


def test_rule_and_switches(rng, monkeypatch):
    from graphc.backends.llvm import gemm, tune
    xv = rng.standard_normal((256, 256)).astype(np.float32)
    x, w, y = _dense(rng, 256, 256, 10, "float32")   # one 16-column panel: BLAS splits its rows instead
    f = gc.function([x], y, backend="llvm")
    np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-3)
    assert _packed(f) == (tune.threads() == 1 or gemm.jit.blas() is None)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")   # one thread: nothing to split, the panel pays
    f = gc.function([x], y, backend="llvm")
    np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-3)
    assert _packed(f)
    x, w, y = _dense(rng, 64, 96, 80, "float32")
    xv = rng.standard_normal((64, 96)).astype(np.float32)
    for env, packed in (("GRAPHC_LLVM_PACK", False), ("GRAPHC_LLVM_SMALL_GEMM", False)):
        monkeypatch.setenv(env, "0")
        f = gc.function([x], y, backend="llvm")
        np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-3)
        assert _packed(f) is packed
        monkeypatch.delenv(env)
    if gemm.jit.blas() is not None:
        for const, value in (("PACKED_MACS", 64 * 96 * 80 - 1), ("PACKED_BYTES", 96 * 80 * 4 - 1)):
            keep = getattr(gemm, const)
            monkeypatch.setattr(gemm, const, value)   # above the size rule: not packed
            f = gc.function([x], y, backend="llvm")
            np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-3)
            assert not _packed(f) and "pack_panels" not in [s.name for s in plan_steps(f)], const
            monkeypatch.setattr(gemm, const, keep)


def _loop_packed(f) -> bool:
    """Whether f's plan packs a weight in its prologue and a product inside a loop body reads the panels."""
    from graphc.backends.schedule.steps import LoopStep
    plan = _spec_plan(f)
    pro = [getattr(s, "name", "") for s in plan.steps[:plan.prologue]]

    def packed_in(steps, inside):
        return any(packed_in(s.body, True) if isinstance(s, LoopStep) else inside and getattr(s, "packed", False)
                   for s in steps)
    return "pack_panels" in pro and packed_in(plan.steps, False)


def _rnn(rng, T, n, H, dtype, transposed=False):
    """A tanh RNN whose step reads the parameter w (H x H, or its transpose) inside gc.scan."""
    w = gc.parameter("w", (rng.standard_normal((H, H)) * (0.6 / np.sqrt(H))).astype(dtype))
    xs = gc.placeholder("xs", (T, n, H), dtype)
    h0 = gc.placeholder("h0", (n, H), dtype)

    def step(h, x_t):
        h = gc.tanh(x_t + h @ (gc.transpose(w) if transposed else w))
        return h, h
    _, ys = gc.scan(step, init=h0, xs=xs)
    return w, xs, h0, ys


def _rnn_ref(w, xv, hv, transposed=False):
    wv = (w.value.T if transposed else w.value).astype(np.float64)
    h, want = hv.astype(np.float64), []
    for x_t in xv:
        h = np.tanh(x_t + h @ wv)
        want.append(h)
    return np.stack(want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nH", [(5, 17), (8, 16), (17, 65), (6, 63)], ids=lambda s: "x".join(map(str, s)))
def test_a_scan_packs_its_weight_once_before_the_loop(nH, dtype, isa, threads, rng):
    """h @ W inside gc.scan, W a parameter read by the body: packed once in the prologue (Schedule.before_loop),
    the step's product over the panels, every step; a row-split scan's parts share the panels."""
    n, H = nH
    for transposed in (False, True):
        w, xs, h0, ys = _rnn(rng, 5, n, H, dtype, transposed)
        f = gc.function([xs, h0], ys, backend="llvm")
        xv = rng.standard_normal((5, n, H)).astype(dtype)
        hv = rng.standard_normal((n, H)).astype(dtype)
        rtol, atol = _tol(dtype)
        np.testing.assert_allclose(f(xv, hv), _rnn_ref(w, xv, hv, transposed), rtol=rtol * 10, atol=atol * H)
        assert _loop_packed(f), (nH, transposed)
        assert "packed before the loop" in " ".join(f.program.info["target"]["gemm"]["products"])
        # one packing per panel width (a row-split scan's parts of 9 and 8 rows take tiles of different widths)
        widths = set(re.findall(r"packed in (\d+)-column panels, packed before the loop",
                                " ".join(f.program.info["target"]["gemm"]["products"])))
        plan = _spec_plan(f)
        assert [getattr(s, "name", "") for s in plan.steps[:plan.prologue]].count("pack_panels") == len(widths)


def test_a_scan_weight_is_repacked_when_it_changes(rng):
    w, xs, h0, ys = _rnn(rng, 4, 8, 24, "float32")
    f = gc.function([xs, h0], ys, backend="llvm")
    xv = rng.standard_normal((4, 8, 24)).astype(np.float32)
    hv = rng.standard_normal((8, 24)).astype(np.float32)
    for _ in range(3):
        np.testing.assert_allclose(f(xv, hv), _rnn_ref(w, xv, hv), rtol=1e-4, atol=1e-5)
        w.set_value((rng.standard_normal((24, 24)) * 0.2).astype(np.float32))
    assert _loop_packed(f)
    g = gc.function([], [], updates=[(w, w * 0.5)], backend="llvm")
    g()
    np.testing.assert_allclose(f(xv, hv), _rnn_ref(w, xv, hv), rtol=1e-4, atol=1e-5)


def test_a_scan_weight_the_step_updates_is_packed_every_call(rng):
    """A training step through the scan (W9's shape): W gets a new array every call, so its panels are made
    again every call before the loop (the prologue runs again for a parameter's new array), read by every
    step of the loop (the backward scan's products with W.T too); right call after call (never stale)."""
    w, xs, h0, ys = _rnn(rng, 4, 8, 24, "float32")
    loss = gc.sum(ys[-1] * ys[-1])
    (gw,) = gc.grad(loss, [w])
    f = gc.function([xs, h0], loss, updates=[(w, w - 0.05 * gw)], backend="llvm")
    xv = rng.standard_normal((4, 8, 24)).astype(np.float32)
    hv = rng.standard_normal((8, 24)).astype(np.float32)
    for _ in range(3):
        before = w.value.copy()
        want = np.sum(_rnn_ref(w, xv, hv)[-1] ** 2)
        np.testing.assert_allclose(f(xv, hv), want, rtol=1e-4)
        assert not np.array_equal(before, w.value)
    assert [getattr(s, "name", "") for s in plan_steps(f)].count("pack_panels") >= 2
    assert sum(bool(getattr(s, "packed", False)) for s in plan_steps(f)) >= 2   # forward and backward loops


def test_a_carry_made_from_a_parameter_is_not_packed(rng):
    """The step's right operand is a carry whose first value is a parameter: it changes every step, so no
    product inside the loop reads panels of it (the scan's invariant inputs only)."""
    m0 = gc.parameter("m0", (rng.standard_normal((16, 16)) * 0.3).astype(np.float32))
    xs = gc.placeholder("xs", (4, 8, 16), "float32")

    def step(m, x_t):
        y = gc.tanh(x_t @ m)
        return m * 0.5 + 0.1, y
    _, ys = gc.scan(step, init=m0, xs=xs)
    f = gc.function([xs], ys, backend="llvm")
    xv = rng.standard_normal((4, 8, 16)).astype(np.float32)
    m, want = m0.value.astype(np.float64), []
    for x_t in xv:
        want.append(np.tanh(x_t @ m))
        m = m * 0.5 + 0.1
    np.testing.assert_allclose(f(xv), np.stack(want), rtol=1e-4, atol=1e-5)
    assert not _loop_packed(f)


def test_a_nested_scan_is_right_and_its_inner_product_unpacked(rng):
    """A scan inside a scan's body reading W: its loop position is the outer loop's, so nothing is added
    before it (Schedule.before_loop answers False); the results are right."""
    w = gc.parameter("w", (rng.standard_normal((16, 16)) * 0.25).astype(np.float32))
    xs = gc.placeholder("xs", (3, 2, 8, 16), "float32")
    h0 = gc.placeholder("h0", (8, 16), "float32")

    def inner(h, x_t):
        h = gc.tanh(x_t + h @ w)
        return h, h

    def outer(h, xseq):
        h, _ = gc.scan(inner, init=h, xs=xseq)
        return h, h
    _, ys = gc.scan(outer, init=h0, xs=xs)
    f = gc.function([xs, h0], ys, backend="llvm")
    xv = rng.standard_normal((3, 2, 8, 16)).astype(np.float32)
    hv = rng.standard_normal((8, 16)).astype(np.float32)
    h, want = hv.astype(np.float64), []
    for xseq in xv:
        for x_t in xseq:
            h = np.tanh(x_t + h @ w.value)
        want.append(h)
    np.testing.assert_allclose(f(xv, hv), np.stack(want), rtol=1e-4, atol=1e-5)
    assert "pack_panels" not in [getattr(s, "name", "") for s in plan_steps(f)]


def test_bounds_checked_build_packs_every_call(rng):
    x, w, y = _dense(rng, 7, 13, 21, "float32")
    f = gc.function([x], y, backend="llvm", sanitize="bounds")
    xv = rng.standard_normal((7, 13)).astype(np.float32)
    for _ in range(2):
        np.testing.assert_allclose(f(xv), _ref(xv, w), rtol=2e-5, atol=1e-4)
        w.set_value(rng.standard_normal((13, 21)).astype(np.float32))
    assert _spec_plan(f).prologue == 0 and "pack_panels" in [s.name for s in plan_steps(f)]


def test_invariant_answers_follow_the_steps_added_and_removed(rng):
    """Schedule.invariant keeps its answers from call to call (a deep network asks once per layer): a step
    added that writes a buffer it answered about, or removed (pop_step), makes it answer again, for that
    buffer and for the values computed from it."""
    from graphc.backends.schedule.views import View
    x, w, y = _dense(rng, 16, 24, 32, "float32")
    f = gc.function([x], y, backend="llvm")
    f(rng.standard_normal((16, 24)).astype(np.float32))
    plan = _spec_plan(f)
    pbuf = next(st for st in plan.steps if getattr(st, "name", "") == "pack_panels").io[1][0]
    xbuf = next(i for i, b in enumerate(plan.buffers) if b.kind == "input")
    vec = lambda b: View(b, 0, (16,), (1,), "float32")   # noqa: E731
    q = plan.fresh(None, (16,), "float32")
    plan.add(plan.copy(q, vec(pbuf)), [vec(pbuf)], [q])      # q: a value of the packed weight alone
    assert plan.invariant(pbuf, settled=True) and plan.invariant(q.buf, settled=True)
    plan.add(plan.copy(vec(pbuf), vec(xbuf)), [vec(xbuf)], [vec(pbuf)])   # the input written over the panels
    assert not plan.invariant(pbuf, settled=True) and not plan.invariant(q.buf, settled=True)
    plan.pop_step()
    assert plan.invariant(pbuf, settled=True) and plan.invariant(q.buf, settled=True)
    assert not plan.invariant(xbuf) and plan.invariant(pbuf) and not plan.invariant(None)
