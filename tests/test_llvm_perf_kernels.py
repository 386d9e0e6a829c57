"""The llvm backend's fast kernels against NumPy: the register-blocked vector GEMM micro-kernel (every
edge: one row, odd columns, sizes not a multiple of the vector width or tile, size 0, strided and
batched operands, float32 and float64), (batch, n, k) @ (k, m) planned as one GEMM, the unrolled-tap
im2col, the vectorised max pooling (NaN propagation, stride 1 and 2), and scans that skip the copies of
stacked outputs nothing reads. Each runs plain and under sanitize="bounds"."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")

GEMM_SHAPES = [(1, 1, 1), (1, 7, 33), (2, 3, 5), (7, 33, 101), (16, 128, 512), (6, 25, 784), (13, 1, 17),
               (5, 9, 15), (17, 5, 16), (6, 3, 65), (3, 0, 9), (0, 4, 5), (5, 4, 0), (31, 64, 8)]
TOL = {"float32": 2e-5, "float64": 1e-12}


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


@pytest.fixture
def tiles(monkeypatch):
    """Every float product through the micro-kernel (GRAPHC_LLVM_SMALL_GEMM=1)."""
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "1")


def _fn(inputs, outputs, bounds=False):
    kw = {"sanitize": "bounds"} if bounds else {}
    return gc.function(inputs, outputs, backend="llvm", **kw)


def _close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _uses_tiles(f) -> bool:
    return "call void @gc_cblas" not in f.source and "fmul contract <" in f.source


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bounds", [False, True], ids=["plain", "bounds"])
def test_micro_kernel_gemm_matches_numpy(tiles, rng, dtype, bounds):
    for n, k, m in GEMM_SHAPES:
        a, b = gc.placeholder("a", (n, k), dtype), gc.placeholder("b", (k, m), dtype)
        f = _fn([a, b], a @ b, bounds)
        x, y = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
        _close(f(x, y), x.astype(np.float64) @ y, dtype)
        if n and k and m:
            assert _uses_tiles(f), (n, k, m)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_micro_kernel_strided_transposed_and_batched_operands(tiles, rng, dtype):
    a, b = gc.placeholder("a", (9, 20), dtype), gc.placeholder("b", (20, 37), dtype)
    c = gc.placeholder("c", (3, 5, 20), dtype)
    outs = [a[:, ::2] @ b[::2, 1:],          # strided rows and columns of a, offset b
            gc.transpose(b) @ gc.transpose(a),   # both transposed (b materialised row-major)
            c @ b,                           # batch of 3 sharing b: one GEMM over 15 rows
            gc.transpose(c, (1, 0, 2)) @ b,  # batch rows not collapsible: per-batch products
            c @ gc.broadcast_to(b, (3, 20, 37)),
            c @ gc.transpose(c, (0, 2, 1))]  # a real batch of products
    for bounds in (False, True):
        f = _fn([a, b, c], outs, bounds)
        x, y, z = (rng.standard_normal(s).astype(dtype) for s in ((9, 20), (20, 37), (3, 5, 20)))
        x64, y64, z64 = x.astype(np.float64), y.astype(np.float64), z.astype(np.float64)
        want = [x64[:, ::2] @ y64[::2, 1:], y64.T @ x64.T, z64 @ y64, z64.transpose(1, 0, 2) @ y64, z64 @ y64,
                z64 @ z64.transpose(0, 2, 1)]
        for g, w in zip(f(x, y, z), want):
            _close(g, w, dtype)
        assert _uses_tiles(f)


def test_batch_rows_sharing_one_matrix_are_one_product(rng):
    """(batch, n, k) @ (k, m) is planned as a single (batch*n, k) @ (k, m) GEMM, not a loop of products."""
    from graphc.backends.llvm import program
    c, b = gc.placeholder("c", (50, 16, 64)), gc.placeholder("b", (64, 96))
    f = _fn([c, b], c @ b)
    x, y = rng.standard_normal((50, 16, 64)).astype("f4"), rng.standard_normal((64, 96)).astype("f4")
    _close(f(x, y), x.astype(np.float64) @ y, "float32")
    labels = [lab for _, lab in program.profile(f, x, y, repeat=1)]
    assert any("matmul float32[800, 96] float32[800, 64] float32[64, 96]" in lab for lab in labels), labels


def test_auto_mode_keeps_blas_for_large_products_and_single_rows(monkeypatch, rng):
    from graphc.backends.llvm import jit
    monkeypatch.delenv("GRAPHC_LLVM_SMALL_GEMM", raising=False)
    monkeypatch.setenv("GRAPHC_TUNE", "off")   # the size rule (the tuner may take BLAS for a small product)
    jit.target_machine()
    if jit.blas() is None:
        pytest.skip("no BLAS found: every product uses the micro-kernel")
    small, big, row = ((16, 128, 512), (300, 200, 100), (1, 64, 64))
    for (n, k, m), want_tiles in ((small, True), (big, False), (row, False)):
        a, b = gc.placeholder("a", (n, k)), gc.placeholder("b", (k, m))
        f = _fn([a, b], a @ b)
        x, y = rng.standard_normal((n, k)).astype("f4"), rng.standard_normal((k, m)).astype("f4")
        _close(f(x, y), x.astype(np.float64) @ y, "float32")
        assert _uses_tiles(f) == want_tiles, (n, k, m)


def test_blas_mode_never_uses_the_micro_kernel(monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_SMALL_GEMM", "0")
    from graphc.backends.llvm import jit
    jit.target_machine()
    if jit.blas() is None:
        pytest.skip("no BLAS found")
    a, b = gc.placeholder("a", (16, 128)), gc.placeholder("b", (128, 512))
    f = _fn([a, b], a @ b)
    assert "call void @gc_cblas_sgemm" in f.source


def _conv_ref(x, w, stride, pad, dil):
    """Direct cross-correlation in float64, zero padding."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh = (h - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i * dil[0]:i * dil[0] + stride[0] * (oh - 1) + 1:stride[0],
                      j * dil[1]:j * dil[1] + stride[1] * (ow - 1) + 1:stride[1]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


CONV_CASES = [  # x shape, w shape, stride, padding, dilation
    ((2, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1), ((3, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1),
    ((1, 2, 7, 9), (3, 2, 3, 3), 2, 1, 1), ((1, 1, 1, 1), (2, 1, 3, 3), 1, 1, 1),
    ((2, 3, 6, 5), (2, 3, 2, 3), 1, 0, 2), ((1, 2, 5, 5), (1, 2, 5, 5), 3, 4, 1),
    ((1, 1, 3, 20), (4, 1, 1, 7), (1, 3), (0, 3), 1), ((0, 2, 5, 5), (3, 2, 3, 3), 1, 1, 1),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bounds", [False, True], ids=["plain", "bounds"])
def test_im2col_convolution_matches_numpy(rng, dtype, bounds):
    for xs, ws, stride, pad, dil in CONV_CASES:
        x, w = gc.placeholder("x", xs, dtype), gc.placeholder("w", ws, dtype)
        f = _fn([x, w], gc.conv2d(x, w, stride=stride, padding=pad, dilation=dil), bounds)
        xv, wv = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
        pair = lambda v: v if isinstance(v, tuple) else (v, v)   # noqa: E731
        _close(f(xv, wv), _conv_ref(xv, wv, pair(stride), pair(pad), pair(dil)), dtype)
        assert "conv2d" not in f.program.info["fallback_ops"]


def _pool_ref(x, k, s, p):
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    oh, ow = (xp.shape[2] - k) // s + 1, (xp.shape[3] - k) // s + 1
    out = np.full(x.shape[:2] + (oh, ow), -np.inf, x.dtype)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s])
    return out


POOL_CASES = [((2, 3, 28, 28), 2, 2, 0), ((1, 1, 5, 5), 2, 2, 0), ((2, 2, 7, 9), 3, 1, 0),
              ((1, 2, 33, 35), 2, 2, 0), ((1, 1, 4, 40), 3, 2, 1), ((1, 1, 3, 3), 3, 3, 0),
              ((2, 1, 6, 50), 2, 1, 0), ((1, 1, 2, 2), 2, 2, 0), ((1, 1, 2, 70), 2, 2, 0), ((0, 2, 4, 4), 2, 2, 0)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bounds", [False, True], ids=["plain", "bounds"])
def test_vector_max_pool_matches_numpy_and_propagates_nan(rng, dtype, bounds):
    for shape, k, s, p in POOL_CASES:
        xv = rng.standard_normal(shape).astype(dtype)
        if xv.size:
            xv.reshape(-1)[[0, xv.size // 2, xv.size - 1]] = np.nan
            xv.reshape(-1)[1] = -np.inf
        x = gc.placeholder("x", shape, dtype)
        f = _fn([x], gc.max_pool2d(x, k, stride=s, padding=p), bounds)
        np.testing.assert_array_equal(f(xv), _pool_ref(xv, k, s, p))


# rows of every width around the vector's (1 .. 17 outputs, 4-, 8- and 16-lane vectors): full blocks, the
# last partial block moved back over written outputs, rows narrower than a vector on half-width vectors,
# a kernel wider than the stride (a tap group of one: its load masked to what it needs)
POOL_WIDTHS = [((1, 2, 2 * ow + extra, 2 * ow + extra), k, s) for ow in (1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 16, 17)
               for extra, k, s in ((0, 2, 2), (1, 3, 2))] + \
              [((2, 1, 3, ow + 1), 2, 1) for ow in (1, 3, 4, 5, 8, 9, 15, 16, 17)]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vector_max_pool_every_row_width_both_isas(isa, dtype, monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    for shape, k, s in POOL_WIDTHS:
        xv = rng.standard_normal(shape).astype(dtype)
        xv.reshape(-1)[::7] = np.nan
        xv.reshape(-1)[3::11] = -np.inf
        x = gc.placeholder("x", shape, dtype)
        for bounds in (False, True):
            f = _fn([x], gc.max_pool2d(x, k, stride=s), bounds)
            np.testing.assert_array_equal(f(xv), _pool_ref(xv, k, s, 0), err_msg=f"{shape} k{k} s{s}")


def test_max_pool_of_a_strided_view_matches_numpy(rng):
    """Columns not contiguous (a transposed input): the scalar path, same answers."""
    x = gc.placeholder("x", (2, 3, 12, 10))
    f = _fn([x], gc.max_pool2d(gc.transpose(x, (0, 1, 3, 2)), 2))
    xv = rng.standard_normal((2, 3, 12, 10)).astype("f4")
    np.testing.assert_array_equal(f(xv), _pool_ref(xv.transpose(0, 1, 3, 2), 2, 2, 0))


def test_scan_skips_copies_of_stacked_outputs_nobody_reads(rng):
    xs, w = gc.placeholder("xs", (5, 3, 4)), gc.placeholder("w", (4, 6))
    fin, ys = gc.scan(lambda c, xt: (gc.tanh(xt @ w + c), gc.tanh(xt @ w + c) * 2.0),
                      gc.broadcast_to(gc.constant(0.0, "float32"), (3, 6)), xs)
    xv, wv = rng.standard_normal((5, 3, 4)).astype("f4"), rng.standard_normal((4, 6)).astype("f4")
    h, hs = np.zeros((3, 6)), []
    for t in range(5):
        h = np.tanh(xv[t].astype(np.float64) @ wv + h)
        hs.append(2 * h)
    only_final, both = _fn([xs, w], fin), _fn([xs, w], [fin, ys])
    _close(only_final(xv, wv), h, "float32")
    got_fin, got_ys = both(xv, wv)
    _close(got_fin, h, "float32")
    _close(got_ys, np.stack(hs), "float32")
    # the stacked ys buffer exists only when ys is an output, and then the step computes y straight
    # into its slice: no per-step copy either way, so no more kernels with it
    assert only_final.program.info["kernels"] <= both.program.info["kernels"]


def test_scan_gradient_through_history_still_matches_numpy_backend(rng):
    xs, w = gc.placeholder("xs", (4, 2, 3), "float64"), gc.placeholder("w", (3, 3), "float64")
    init = gc.broadcast_to(gc.constant(0.5, "float64"), (2, 3))
    fin, _ = gc.scan(lambda c, xt: (gc.tanh(xt @ w + c @ w), c), init, xs)
    loss = gc.sum(fin * fin)
    g = gc.grad(loss, [w])
    xv, wv = rng.standard_normal((4, 2, 3)), rng.standard_normal((3, 3))
    for bounds in (False, True):
        for got, want in zip(_fn([xs, w], [loss] + g, bounds)(xv, wv),
                             gc.function([xs, w], [loss] + g, backend="numpy")(xv, wv)):
            _close(got, want, "float64")


def test_lstm_inference_matches_torch_layout_reference(rng):
    """W4's shape class (last hidden state of an LSTM) through the micro-kernel, against NumPy."""
    lstm = gc.nn.LSTM(8, 20)
    x = gc.placeholder("x", (None, 7, 8))
    _, (h, _c) = lstm(x)
    f = _fn([x], h[0])
    xv = rng.standard_normal((5, 7, 8)).astype("f4")
    p = {k: v.astype(np.float64) for k, v in lstm.state_dict().items()}
    hh, cc = np.zeros((5, 20)), np.zeros((5, 20))
    sig = lambda v: 1 / (1 + np.exp(-v))   # noqa: E731
    for t in range(7):
        z = xv[:, t] @ p["weight_ih_l0"].T + hh @ p["weight_hh_l0"].T + p["bias_ih_l0"] + p["bias_hh_l0"]
        i, fg, g, o = sig(z[:, :20]), sig(z[:, 20:40]), np.tanh(z[:, 40:60]), sig(z[:, 60:])
        cc = fg * cc + i * g
        hh = o * np.tanh(cc)
    _close(f(xv), hh, "float32")
    assert _uses_tiles(f)


def test_a_broken_micro_kernel_vector_access_is_caught_under_bounds(tiles, monkeypatch, rng):
    """The micro-kernel's vector loads go through kernels.ptr_at: a wrong offset is caught and named."""
    import graphc.backends.llvm.gemm as gemm
    real = gemm.vload
    monkeypatch.setattr(gemm, "vload", lambda em, P, v, off, *rest: real(em, P, v, em(f"add i64 {off}, 1000"),
                                                                         *rest))
    a, b = gc.placeholder("a", (4, 5), "float64"), gc.placeholder("b", (5, 6), "float64")
    f = _fn([a, b], a @ b, bounds=True)
    with pytest.raises(gc.GraphcError, match=r"out-of-bounds memory access in the llvm matmul kernel"):
        f(rng.standard_normal((4, 5)), rng.standard_normal((5, 6)))


def test_a_broken_max_pool_vector_access_is_caught_under_bounds(monkeypatch, rng):
    import graphc.backends.llvm.conv as conv
    real = conv.vload
    monkeypatch.setattr(conv, "vload", lambda em, P, v, off, *rest: real(em, P, v, em(f"add i64 {off}, 64"),
                                                                         *rest))
    x = gc.placeholder("x", (1, 1, 4, 4), "float64")
    f = _fn([x], gc.max_pool2d(x, 2), bounds=True)
    with pytest.raises(gc.GraphcError, match=r"out-of-bounds memory access in the llvm max_pool2d kernel"):
        f(rng.standard_normal((1, 1, 4, 4)))


def test_batched_micro_kernel_products_split_across_threads_when_asked(tiles, monkeypatch, rng):
    """GRAPHC_LLVM_PARALLEL_FLOPS (off by default): a batch of products runs as two thread chunks."""
    from graphc.backends.llvm import program
    if program.num_threads() < 2:
        monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_LLVM_PARALLEL_FLOPS", "1")
    for batch in (2, 3, 7):
        a, b = gc.placeholder("a", (batch, 16, 20)), gc.placeholder("b", (batch, 20, 40))
        f = _fn([a, b], a @ b)
        x, y = rng.standard_normal((batch, 16, 20)).astype("f4"), rng.standard_normal((batch, 20, 40)).astype("f4")
        _close(f(x, y), x.astype(np.float64) @ y, "float32")
        assert "call void @gc_pool_run" in f.source
    monkeypatch.delenv("GRAPHC_LLVM_PARALLEL_FLOPS")
    a, b = gc.placeholder("a", (4, 16, 20)), gc.placeholder("b", (4, 20, 40))
    assert "call void @gc_pool_run" not in _fn([a, b], a @ b).source
