"""An LSTM's scan step on llvm: new carries computed straight into the carries' own buffers where that is
safe (backends/schedule/plan.py `_scan`, `_in_place_unsafe`), with and without the product + gates kernel
(backends/llvm/recurrent.py), at odd sizes, one and two threads; the cases where it is not safe (a carry
read after it is rewritten, swapped carries, shifted or broadcast views) against the NumPy backend; the
BPTT training step (W9's path) against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


@pytest.fixture(params=["0", "1"])
def fused(request, monkeypatch):
    monkeypatch.setenv("GRAPHC_LLVM_FUSE_EPILOGUE", request.param)
    return request.param == "1"


def _body_kernels(f) -> list[list[str]]:
    """Kernel names of every scan loop body in f's specialisations (a row-split loop: one list per part)."""
    from graphc.backends.schedule.steps import LoopStep
    out = []

    def walk(steps):
        for st in steps:
            if isinstance(st, LoopStep):
                for a, b in st.parts or [(0, len(st.body))]:
                    out.append([getattr(s, "name", type(s).__name__) for s in st.body[a:b]])
                walk(st.body)
    for spec in f.program._specs.values():
        walk(spec.plan.steps)
    return out


def _sig(v):
    return 1 / (1 + np.exp(-v))


def _lstm_ref(d, x):
    """Last (h, c) of a one-layer LSTM in float64, torch gate order (i, f, g, o); x is (N, T, C)."""
    H = d["whh"].shape[1]
    n = x.shape[0]
    h, c = np.zeros((n, H)), np.zeros((n, H))
    xp = x.astype(np.float64) @ d["wih"].T.astype(np.float64) + d["bih"] + d["bhh"]
    for t in range(x.shape[1]):
        z = xp[:, t] + h @ d["whh"].T.astype(np.float64)
        i, f, g, o = _sig(z[:, :H]), _sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), _sig(z[:, 3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
    return h, c


def _params(rng, C, H):
    b = 1 / np.sqrt(H)
    return {k: rng.uniform(-b, b, s).astype(np.float32) for k, s in
            (("wih", (4 * H, C)), ("whh", (4 * H, H)), ("bih", (4 * H,)), ("bhh", (4 * H,)))}


def _lstm(d, T, C):
    H = d["whh"].shape[1]
    layer = gc.nn.LSTM(C, H)
    layer.load_state_dict({"weight_ih_l0": d["wih"], "weight_hh_l0": d["whh"], "bias_ih_l0": d["bih"],
                           "bias_hh_l0": d["bhh"]})
    x = gc.placeholder("x", (None, T, C))
    _, (h, c) = layer(x)
    return x, h[0], c[0]


@pytest.mark.parametrize("n,H", [(1, 17), (3, 1), (3, 63), (17, 3), (16, 65), (5, 257)])
def test_lstm_last_state_odd_sizes(threads, fused, n, H):
    """gc.nn.LSTM's last (h, c) equal the float64 reference; no carry copy left in the step when the gates
    are their own kernel (both carries computed in place), one (h: the fused kernel's blocks still read
    the old h) when they are fused with the product."""
    rng = np.random.default_rng(n * 1000 + H)
    T, C = 7, 3 if H > 60 else 17
    d = _params(rng, C, H)
    xv = rng.standard_normal((n, T, C)).astype(np.float32)
    x, h, c = _lstm(d, T, C)
    f = gc.function([x], [h, c], backend="llvm", optimize=2)
    got = f(xv)
    for g_, w_ in zip(got, _lstm_ref(d, xv)):
        np.testing.assert_allclose(g_, w_, rtol=1e-4, atol=1e-5)
    bodies = _body_kernels(f)
    from graphc.backends.schedule import rows
    assert len(bodies) == len(rows.parts(n, threads) or [None]), bodies   # split by batch rows on 2 threads
    for kinds in bodies:
        if "matmul_epilogue" in kinds:
            assert fused and len(kinds) == 2, kinds      # the fused kernel and h's copy
        else:
            assert len(kinds) == 2, kinds                # the product and the gates: no copies
    from graphc.backends.schedule.steps import LoopStep
    for spec in f.program._specs.values():            # a split step product: one run of blocks per thread
        for st in spec.plan.steps:
            for k in (st.body if isinstance(st, LoopStep) and not st.parts else ()):
                if getattr(k, "split", None) and k.name in ("matmul", "matmul_epilogue"):
                    assert k.chunks == threads, (k.name, k.chunks)


def _scan_cases():
    """(name, build(ph_list) -> outputs, input shapes): bodies where computing a new carry in place would
    be wrong, or is right only for some carries."""
    def swapped(a, b, x):       # (a, b) -> (b + x, a * 2): each new carry reads the other's old value
        (fa, fb), _ = gc.scan(lambda c, xt: ((c[1] + xt, c[0] * 2.0), None), (a, b), x)
        return [fa, fb]

    def reversed_view(a, b, x):  # a new carry from a reversed view of the old one
        (fa, fb), _ = gc.scan(lambda c, xt: ((c[0][:, ::-1] + xt, c[1] + 1.0), None), (a, b), x)
        return [fa, fb]

    def shifted(a, b, x):        # a new carry from a shifted window of the old one
        def step(c, xt):
            s = gc.concatenate([c[0][:, 1:], c[0][:, :1]], axis=1)
            return (gc.tanh(s + xt), c[1] * 0.5 + c[0]), None
        (fa, fb), _ = gc.scan(step, (a, b), x)
        return [fa, fb]

    def read_after(a, b, x):     # the old carry a is read by a product after a's new value is computed
        def step(c, xt):
            na = gc.tanh(c[0] + xt)
            nb = c[1] + (c[0] @ gc.constant(np.eye(c[0].shape[1], dtype=np.float32) * 0.5)) + na
            return (na, nb), None
        (fa, fb), _ = gc.scan(step, (a, b), x)
        return [fa, fb]

    def product_carry(a, b, x):  # a new carry written by a product of the old one
        w = gc.constant((np.arange(a.shape[1] ** 2, dtype=np.float32).reshape(a.shape[1], -1) % 7 - 3) / 9)
        (fa, fb), _ = gc.scan(lambda c, xt: ((c[0] @ w + xt, gc.sigmoid(c[1]) + c[0]), None), (a, b), x)
        return [fa, fb]

    def with_ys(a, b, x):        # the old and the new carry as stacked outputs, a history
        def step(c, xt):
            na, nb = c[0] * 0.9 + xt, c[1] + c[0]
            return (na, nb), (c[0], na)
        (fa, fb), (ya, yb) = gc.scan(step, (a, b), x)
        return [fa, fb, ya, yb]

    def broadcast_read(a, b, x):  # the old carry read broadcast (a row of it for every row)
        (fa, fb), _ = gc.scan(lambda c, xt: ((c[0] * 0.5 + c[0][:1] + xt, c[1] - c[0]), None), (a, b), x)
        return [fa, fb]

    def same_new(a, b, x):       # one tensor the new value of both carries
        def step(c, xt):
            v = c[0] * 0.5 + c[1] * 0.25 + xt
            return (v, v), None
        (fa, fb), _ = gc.scan(step, (a, b), x)
        return [fa, fb]

    def passthrough(a, b, x):    # a carry kept as is, the other computed from it
        (fa, fb), _ = gc.scan(lambda c, xt: ((c[0], gc.tanh(c[1] + c[0] + xt)), None), (a, b), x)
        return [fa, fb]

    return [swapped, reversed_view, shifted, read_after, product_carry, with_ys, broadcast_read, same_new,
            passthrough]


@pytest.mark.parametrize("case", _scan_cases(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("n,m", [(1, 1), (3, 17), (17, 63), (2, 65)])
def test_carries_in_place_only_when_safe(threads, case, n, m):
    """Scans whose new carries must not (or only partly may) overwrite the old ones in place: llvm equals
    the NumPy backend."""
    rng = np.random.default_rng(n + 7 * m)
    T = 5
    av, bv = rng.standard_normal((n, m)).astype(np.float32), rng.standard_normal((n, m)).astype(np.float32)
    xv = (rng.standard_normal((T, n, m)) * 0.3).astype(np.float32)
    a, b, x = gc.placeholder("a", (n, m)), gc.placeholder("b", (n, m)), gc.placeholder("x", (T, n, m))
    outs = case(a, b, x)
    want = gc.function([a, b, x], outs, backend="numpy")(av, bv, xv)
    got = gc.function([a, b, x], outs, backend="llvm")(av, bv, xv)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,H,T", [(3, 17, 5), (16, 65, 4), (1, 3, 6)])
def test_lstm_training_step_vs_float64(threads, fused, n, H, T):
    """W9's path (LSTM + linear head, cross-entropy, BPTT through every step, one SGD step): the new
    parameters equal the float64 reference (benchmarks.workloads.lstm_train_step)."""
    from benchmarks import systems, workloads as W
    rng = np.random.default_rng(9 + n + H)
    C, K = 5, 4
    d = _params(rng, C, H)
    d["hw"] = (rng.standard_normal((H, K)) / np.sqrt(H)).astype(np.float32)
    d["hb"] = (rng.standard_normal(K) * 0.1).astype(np.float32)
    d["x"] = rng.standard_normal((n, T, C)).astype(np.float32)
    d["y"] = rng.integers(0, K, n).astype(np.int64)
    want = W.lstm_train_step(d, W.W9_LR)
    step = systems._g_w9(gc, d, "llvm", 2)   # the benchmark's own W9 graph, as a user writes it
    got = step()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_lstm_in_place_carries_under_bounds_checks(fused):
    """sanitize="bounds": every access of the step's kernels (carries read and written in place) checked,
    none out of its buffer, the result unchanged."""
    rng = np.random.default_rng(5)
    n, T, C, H = 3, 4, 5, 17
    d = _params(rng, C, H)
    xv = rng.standard_normal((n, T, C)).astype(np.float32)
    x, h, c = _lstm(d, T, C)
    f = gc.function([x], [h, c], backend="llvm", sanitize="bounds")
    for g_, w_ in zip(f(xv), _lstm_ref(d, xv)):
        np.testing.assert_allclose(g_, w_, rtol=1e-4, atol=1e-5)
