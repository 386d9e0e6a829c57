"""A large product's right operand packed every call (backends/llvm/plan.py `_packed_per_call`): a product the
size rules give to BLAS may instead pack b into the micro-kernel's panels each call (gemm.pack_panels split
over the pool) and run the micro-kernel over them, when the tuner (tune.packed_for) found that faster on this
CPU model. Answers stay NumPy's (float64 reference) on odd sizes, both ISAs, both thread counts (forced with
GRAPHC_LLVM_PACK=always); the split packing writes the panel layout exactly; the plan follows the faster
(a stubbed timing picks each way), the decision is stored per CPU model and read back (and by the warm-start
check); nothing is timed with the tuner off, below the size rule, or inside a loop; the
real probe runs and checks itself. A transposed b whose columns are contiguous (W^T) packs by shuffled
lanes x lanes blocks. No timing is asserted."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, plan_steps


@pytest.fixture(autouse=True)
def llvm_blas(tmp_path, monkeypatch):
    backend_or_skip("llvm")
    from graphc.backends.llvm import jit, tune
    jit.target_machine()
    if jit.blas() is None:
        pytest.skip("no BLAS bound: products without a packed weight run the micro-kernel anyway")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_TUNE", "quick")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    monkeypatch.delenv("GRAPHC_LLVM_SMALL_GEMM", raising=False)
    monkeypatch.delenv("GRAPHC_LLVM_PACK", raising=False)
    monkeypatch.setattr(tune, "_memo", {})
    monkeypatch.setattr(tune, "log", [])
    monkeypatch.setattr(tune, "_busy", lambda: False)


def _steps(f) -> list:
    return [getattr(s, "name", "") for s in plan_steps(f)]


def _packed_every_call(f) -> bool:
    """A product over panels packed in the call (not the prologue): by a packing step of its own among the
    call's steps, or inside the product kernel (gemm.PACK_INSIDE: the kernel reads the packing's source)."""
    steps = plan_steps(f)
    inside = any(getattr(s, "packed", False) and getattr(s, "pack_source", None) for s in steps)
    return inside or ("pack_panels" in _steps(f) and any(getattr(s, "packed", False) for s in steps))


def _calls_blas(f) -> bool:
    return "call void @gc_cblas_" in f.source


def _product(rng, n, k, m, dtype, transposed=False):
    """relu(x @ y) (+ 0.5) for two inputs (no weight): compiled, run and checked against float64 NumPy."""
    x = gc.placeholder("x", (n, k), dtype)
    y = gc.placeholder("y", (m, k) if transposed else (k, m), dtype)
    f = gc.function([x, y], gc.relu(x @ (gc.transpose(y) if transposed else y)) + 0.5, backend="llvm")
    xv = rng.standard_normal((n, k)).astype(dtype)
    yv = rng.standard_normal((m, k) if transposed else (k, m)).astype(dtype)
    want = np.maximum(xv.astype(np.float64) @ (yv.T if transposed else yv).astype(np.float64), 0) + 0.5
    tol = 2e-5 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(f(xv, yv), want, rtol=tol, atol=tol * k)
    # a second call with new operands: the panels are packed again, never stale
    xv, yv = xv[::-1].copy(), -yv
    want = np.maximum(xv.astype(np.float64) @ (yv.T if transposed else yv).astype(np.float64), 0) + 0.5
    np.testing.assert_allclose(f(xv, yv), want, rtol=tol, atol=tol * k)
    return f


SIZES = [(2, 1, 8), (3, 17, 9), (17, 3, 65), (63, 65, 17), (65, 63, 257), (257, 17, 63), (64, 257, 130)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nkm", SIZES, ids=["x".join(map(str, s)) for s in SIZES])
def test_forced_packing_matches_numpy(nkm, dtype, isa, threads, monkeypatch, rng):
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    monkeypatch.setattr("graphc.backends.llvm.tune.packed_for",
                        lambda *a: pytest.fail("GRAPHC_LLVM_PACK=always times nothing"))
    n, k, m = nkm
    f = _product(rng, n, k, m, dtype)
    small = n * k * m <= (1 << 22)   # (gemm.SMALL_MACS: a small product runs the unpacked micro-kernel)
    if not small:
        assert _packed_every_call(f) and not _calls_blas(f)
        assert f"{n}x{k}x{m} {dtype}: micro-kernel over b packed in" in \
            " ".join(f.program.info["target"]["gemm"]["products"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forced_packing_of_products_the_size_rule_gives_blas(dtype, isa, threads, monkeypatch, rng):
    """The small-product rule lowered so that odd sizes reach the BLAS branch, where the packing takes them."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    for n, k, m in [(2, 1, 8), (3, 17, 9), (17, 3, 65), (63, 65, 17), (65, 63, 257), (257, 17, 63)]:
        f = _product(rng, n, k, m, dtype)
        assert _packed_every_call(f) and not _calls_blas(f), (n, k, m)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_transposed_right_operand_packs_by_blocks(dtype, isa, threads, monkeypatch, rng):
    """x @ W^T (W row-major: b's columns contiguous) packs every call by lanes x lanes blocks transposed with
    shuffles (gemm.TRANSPOSED_PACK), on odd sizes (k and m past whole blocks, partial panels); with the switch
    off, or a b strided both ways, it stays with BLAS."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    for n, k, m in [(2, 1, 8), (17, 3, 65), (65, 63, 257), (257, 17, 63), (64, 256, 130), (3, 33, 16)]:
        f = _product(rng, n, k, m, dtype, transposed=True)
        assert _packed_every_call(f) and not _calls_blas(f), (n, k, m)
    # b = W^T with W's rows 80 apart (b's columns still contiguous: shuffled blocks), and strided both ways
    x, y = gc.placeholder("x", (9, 40), dtype), gc.placeholder("y", (2, 80, 80), dtype)
    f = gc.function([x, y], x @ gc.transpose(y[0, :, :40]) + x @ gc.transpose(y[1, :, ::2]), backend="llvm")
    xv, yv = rng.standard_normal((9, 40)).astype(dtype), rng.standard_normal((2, 80, 80)).astype(dtype)
    want = xv.astype(np.float64) @ (yv[0, :, :40].T + yv[1, :, ::2].T)
    tol = 2e-5 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(f(xv, yv), want, rtol=tol, atol=tol * 40)
    monkeypatch.setattr(gemm, "TRANSPOSED_PACK", False)
    f = _product(rng, 65, 63, 257, dtype, transposed=True)
    assert not _packed_every_call(f) and _calls_blas(f)


def _big(monkeypatch):
    """The size rule lowered so a quick product (96 x 80 x 72) is one the tuner weighs."""
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setattr(tune, "PACKED_CALL_FLOPS", 1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("winner", ["packed", "blas"])
def test_plan_follows_the_faster(winner, dtype, monkeypatch, rng):
    from graphc.backends.llvm import tune
    _big(monkeypatch)
    loser = "blas" if winner == "packed" else "packed"
    timed = []
    monkeypatch.setattr(tune, "_time_packed", lambda *a: timed.append(a[:4]) or {winner: 1e-6, loser: 1e-3})
    f = _product(rng, 96, 80, 72, dtype)
    assert timed == [(96, 80, 72, dtype)]
    assert _packed_every_call(f) == (winner == "packed") and _calls_blas(f) == (winner == "blas")
    assert any(p.startswith(f"96x80x72 {dtype}: micro-kernel over b packed in") and p.endswith("every call (tuned)")
               for p in f.program.info["target"]["gemm"]["products"]) == (winner == "packed")
    assert tune.decided(96, 80, 72, tune.PACKED_TAG + dtype) == (int(winner == "packed"), "cache")
    # the next plan of the shape reads the decision: no second timing, from this process or from disk
    f = _product(rng, 96, 80, 72, dtype)
    monkeypatch.setattr(tune, "_memo", {})
    f = _product(rng, 96, 80, 72, dtype)
    assert len(timed) == 1 and _packed_every_call(f) == (winner == "packed")
    assert any("every call (cache)" in p for p in f.program.info["target"]["gemm"]["products"]) == \
        (winner == "packed")


def test_close_calls_and_the_switches_keep_blas(monkeypatch, rng):
    from graphc.backends.llvm import tune
    _big(monkeypatch)
    timed = []
    # faster, but by less than PACKED_MARGIN: BLAS stays
    monkeypatch.setattr(tune, "_time_packed",
                        lambda *a: timed.append(1) or {"packed": 1e-3 / (tune.PACKED_MARGIN * 0.99), "blas": 1e-3})
    f = _product(rng, 96, 80, 72, "float32")
    assert timed and _calls_blas(f) and not _packed_every_call(f)
    timed.clear()
    monkeypatch.setattr(tune, "_time_packed", lambda *a: timed.append(1) or {"packed": 1e-6, "blas": 1e-3})
    for env, value in (("GRAPHC_TUNE", "off"), ("GRAPHC_LLVM_PACK", "0"), ("GRAPHC_LLVM_SMALL_GEMM", "0")):
        monkeypatch.setenv(env, value)
        f = _product(rng, 97, 80, 72, "float32")
        assert _calls_blas(f) and not _packed_every_call(f), env
        monkeypatch.delenv(env)
    # below the size rule (rows, flops) nothing is timed
    monkeypatch.setattr(tune, "PACKED_CALL_FLOPS", 1 << 40)
    f = _product(rng, 98, 80, 72, "float32")
    monkeypatch.setattr(tune, "PACKED_CALL_FLOPS", 1)
    f = _product(rng, tune.PACKED_CALL_ROWS - 1, 80, 72, "float32")
    assert not timed and _calls_blas(f)


def test_not_inside_a_loop(monkeypatch, rng):
    """A scan body's product of the carry and an input is never packed per call (nor timed)."""
    from graphc.backends.llvm import tune
    _big(monkeypatch)
    monkeypatch.setattr(tune, "_time_packed", lambda *a: pytest.fail("timed inside a loop"))
    xs = gc.placeholder("xs", (3, 96, 72), "float32")
    y = gc.placeholder("y", (72, 72), "float32")
    h0 = gc.placeholder("h0", (96, 72), "float32")

    def step(h, x_t):
        h = gc.tanh(x_t + h @ (y * 0.1))
        return h, h
    _, ys = gc.scan(step, init=h0, xs=xs)
    f = gc.function([xs, y, h0], ys, backend="llvm")
    xv = rng.standard_normal((3, 96, 72)).astype(np.float32)
    yv = rng.standard_normal((72, 72)).astype(np.float32)
    h, want = np.zeros((96, 72)), []
    for t in range(3):
        h = np.tanh(xv[t].astype(np.float64) + h @ (0.1 * yv.astype(np.float64)))
        want.append(h)
    np.testing.assert_allclose(f(xv, yv, np.zeros((96, 72), np.float32)), np.stack(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("inside", [True, False])
def test_the_real_probe_runs_and_checks_itself(inside, monkeypatch):
    """The probe times the packed product as the plan would run it: its packing inside the product kernel
    (gemm.PACK_INSIDE) or a step before it; either computes the right product (it checks itself)."""
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setattr(gemm, "PACK_INSIDE", inside)
    for dtype in ("float32", "float64"):
        for transposed in (False, True):   # (b = W^T: packed by shuffled blocks)
            times = tune._time_packed(67, 33, 70, dtype, 2, transposed)
            assert set(times) == {"packed", "blas"} and all(0 < t < 1 for t in times.values())


def test_warm_start_checks_the_decision(monkeypatch, rng):
    """The program's recorded decisions include the packing choice; the warm-start check asks tune.decided."""
    from graphc.backends.llvm import tune
    _big(monkeypatch)
    monkeypatch.setattr(tune, "_time_packed", lambda *a: {"packed": 1e-6, "blas": 1e-3})
    f = _product(rng, 96, 80, 72, "float32")
    spec = list(f.program._specs.values())[0]
    assert (96, 80, 72, tune.PACKED_TAG + "float32", 1) in [tuple(d) for d in tune.decisions[spec.plan]]
    # a transposed b's decision is its own (timed and recorded as such), and read back as such
    monkeypatch.setattr(tune, "_time_packed", lambda *a: {"packed": 1e-3, "blas": 1e-6})
    f = _product(rng, 96, 80, 72, "float32", transposed=True)
    spec = list(f.program._specs.values())[0]
    assert (96, 80, 72, tune.PACKED_T_TAG + "float32", 0) in [tuple(d) for d in tune.decisions[spec.plan]]
    assert tune.decided(96, 80, 72, tune.PACKED_T_TAG + "float32")[0] == 0
    assert tune.decided(96, 80, 72, tune.PACKED_TAG + "float32")[0] == 1


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("k,m,nr", [(1, 8, 8), (5, 16, 16), (7, 17, 16), (3, 5, 16), (65, 63, 32), (9, 200, 64),
                                    (33, 47, 16), (16, 64, 64)])
def test_split_packing_writes_the_panels(k, m, nr, transposed, isa, monkeypatch):
    """pack_panels(split=True) run whole and over the pool: the layout of the unsplit packing, every element;
    from b's rows, or from b = W^T (W row-major, lanes x lanes blocks transposed by shuffles)."""
    from graphc.backends.llvm import gemm, tune
    from graphc.backends.schedule.views import View
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    src = np.random.default_rng(3).standard_normal(k * m).astype(np.float32)
    b = src.reshape(m, k).T if transposed else src.reshape(k, m)
    size = gemm.packed_size(k, m, nr)
    panels = -(-m // nr)
    padded = np.zeros((k, panels * nr), np.float32)
    padded[:, :m] = b
    want = padded.reshape(k, panels, nr).transpose(1, 0, 2).reshape(-1)
    kern = gemm.pack_panels(View(0, 0, (size,), (1,), "float32"),
                            View(1, 0, (k, m), (1, k) if transposed else (m, 1), "float32"), nr, split=True)
    assert kern.split == (panels if panels >= 2 else None)
    lanes = gemm.vector_shape("float32")[0]
    # the shuffled blocks where b's columns are its contiguous axis (k > 1) and panels hold whole vectors
    assert kern.key[-1] == (transposed and k > 1 and nr % lanes == 0)
    _, fns = tune._probe(kern, 2, (1, 2))
    for t in (1, 2):
        dst = np.full(size, np.nan, np.float32)
        table = (ctypes.c_void_p * 2)(dst.ctypes.data, src.ctypes.data)
        fns[t](ctypes.addressof(table))
        np.testing.assert_array_equal(dst, want)



@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forced_packing_with_a_transposed_left_operand(dtype, threads, monkeypatch, rng):
    """a = X.T (a weight gradient's X^T @ dY): the micro-kernel reads a's elements by broadcasts in any
    layout; b packed every call; NumPy's answer."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    for n, k, m in [(17, 3, 65), (65, 63, 257), (130, 64, 96)]:
        xs = gc.placeholder("xs", (k, n), dtype)
        y = gc.placeholder("y", (k, m), dtype)
        f = gc.function([xs, y], gc.transpose(xs) @ y, backend="llvm")
        xv, yv = rng.standard_normal((k, n)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
        tol = 2e-5 if dtype == "float32" else 1e-11
        np.testing.assert_allclose(f(xv, yv), xv.T.astype(np.float64) @ yv, rtol=tol, atol=tol * k)
        assert _packed_every_call(f) and not _calls_blas(f), (n, k, m)


def test_few_row_packed_products_prefetch_their_panels(monkeypatch, rng):
    """A packed product of at most gemm.PREFETCH_MAX_ROWS rows (its panel streamed from memory once or twice)
    prefetches the panel's rows ahead; taller ones, GRAPHC_LLVM_PREFETCH=0 and bounds-checked builds do not;
    the answers are the same."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    for n, env, sanitize, want in [(17, None, None, True), (gemm.PREFETCH_MAX_ROWS + 1, None, None, False),
                                   (17, "0", None, False), (17, None, "bounds", False)]:
        if env is None:
            monkeypatch.delenv("GRAPHC_LLVM_PREFETCH", raising=False)
        else:
            monkeypatch.setenv("GRAPHC_LLVM_PREFETCH", env)
        x, y = gc.placeholder("x", (n, 63), "float32"), gc.placeholder("y", (63, 130), "float32")
        kw = {} if sanitize is None else {"sanitize": sanitize}
        f = gc.function([x, y], x @ y, backend="llvm", **kw)
        xv, yv = rng.standard_normal((n, 63)).astype(np.float32), rng.standard_normal((63, 130)).astype(np.float32)
        np.testing.assert_allclose(f(xv, yv), xv.astype(np.float64) @ yv, rtol=2e-5, atol=2e-4)
        assert _packed_every_call(f)
        ir = "\n".join(s.ir for s in f.program._specs.values())
        assert ("call void @llvm.prefetch.p0(" in ir) == want, (n, env, sanitize)


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("region", ["fold", "epilogue", "none"])
def test_packing_inside_the_product(inside, region, isa, threads, monkeypatch, rng):
    """gemm.PACK_INSIDE: each run of column blocks packs its own panels inside the product kernel (no packing
    step of its own), with the region after the product folded into its tiles (bias + ReLU), joined after
    its blocks (tanh), or none; False: the packing step before it. NumPy's answers either way, twice over
    new operands (the panels packed again)."""
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setattr(gemm, "PACK_INSIDE", inside)
    monkeypatch.setattr(gemm, "SMALL_MACS", 0)              # (odd sizes reach the BLAS branch: packed there)
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)   # split even these products over the threads
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    for n, k, m in ((65, 17, 257), (130, 63, 100), (257, 65, 63)):
        x, y = gc.placeholder("x", (n, k)), gc.placeholder("y", (k, m))
        bias = gc.placeholder("b", (m,))
        p = x @ y
        out = {"fold": lambda: gc.relu(p + bias), "epilogue": lambda: gc.tanh(p) * 2.0 + bias,
               "none": lambda: p}[region]()
        f = gc.function([x, y, bias], out, backend="llvm")
        for _ in range(2):
            xv, yv, bv = (rng.standard_normal(s).astype(np.float32) for s in ((n, k), (k, m), (m,)))
            pv = xv.astype(np.float64) @ yv
            want = {"fold": lambda: np.maximum(pv + bv, 0), "epilogue": lambda: np.tanh(pv) * 2 + bv,
                    "none": lambda: pv}[region]()
            np.testing.assert_allclose(f(xv, yv, bv), want, rtol=2e-5, atol=2e-5 * k)
        steps = plan_steps(f)
        # (inside the kernel unless the product is split by parts of rows: gemm.packs_inside)
        here = gemm.packs_inside(n, k, m, "float32", tune.threads())
        assert _packed_every_call(f) and not _calls_blas(f)
        assert ("pack_panels" in _steps(f)) == (not here)
        assert any(getattr(s, "pack_source", None) for s in steps) == here
        if region == "fold":
            assert any(getattr(s, "folded", False) for s in steps)


def test_a_product_split_by_rows_packs_before_it(monkeypatch):
    """gemm.packs_inside: a product packed every call that is split by parts of its rows (few column blocks,
    many rows: a weight gradient X^T @ dY) packs in a step of its own before it, since each part reads
    every panel; one split by columns, or not split, packs inside."""
    from graphc.backends.llvm import gemm
    monkeypatch.setattr(gemm, "PACK_INSIDE", True)
    assert gemm.row_parts(512, 128, "float32", 2) is not None
    assert not gemm.packs_inside(512, 800, 128, "float32", 2)       # W9's weight gradient
    assert gemm.packs_inside(512, 800, 128, "float32", 1)           # one thread: not split
    assert gemm.packs_inside(1024, 1024, 1024, "float32", 2)        # W6: by columns
    assert gemm.packs_inside(64, 784, 512, "float32", 2)            # W5's x @ W0
    monkeypatch.setattr(gemm, "PACK_INSIDE", False)
    assert not gemm.packs_inside(1024, 1024, 1024, "float32", 2)
