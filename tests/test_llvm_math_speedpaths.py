"""The llvm backend's fast paths for transcendentals and row-wise kernels, against NumPy float64:

- mathlib's functions on explicit <8 x float> and <16 x float> vectors (the row kernels use them
  directly; the elementwise rows are the same code on scalars, widened by the loop vectoriser), over
  edge values (0, +-tiny, subnormals, +-large, +-inf, NaN) and random inputs;
- the elementwise kernels under both ISAs' settings (GRAPHC_LLVM_ISA=avx2 / avx512: the vector width
  the code is built for) and both thread counts, at odd sizes (1, 3, 17, 63, 65, 257) and ~4M;
- the host's vector width reaching the generated code (an AVX-512 target gets zmm code);
- softmax / log_softmax / logsumexp row kernels (explicit vectors + a scalar tail) at odd row lengths,
  with NaN / +inf / all -inf rows, split over threads; LayerNorm's row kernel.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from test_llvm_math import _erf

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


REF = {"exp": np.exp, "log": np.log, "log1p": np.log1p, "expm1": np.expm1, "tanh": np.tanh,
       "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "erf": _erf}
OPS = {"exp": gc.exp, "log": gc.log, "log1p": gc.log1p, "expm1": gc.expm1, "tanh": gc.tanh,
       "sigmoid": gc.sigmoid, "erf": gc.erf}
EDGE = np.float32([0.0, -0.0, 1e-45, -1e-45, 3e-42, -3e-42, 1e-38, -1e-38, 1.17549435e-38, 1e-30, -1e-30,
                   1e-7, -1e-7, 0.5, -0.5, 0.625, 1.0, -1.0, 2.0, 9.0, 9.02, -9.02, 10.5, 20.0, -17.5,
                   -25.5, 88.72, 88.7229, 88.73, 89.5, -87.3, -100.0, -103.9, -104.5, -150.0, 1e30,
                   -1e30, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan])


def _domain(name, x):
    if name == "log":
        return np.abs(x)
    if name == "log1p":
        return np.maximum(x, np.float32(-1))
    return x


def _inputs(name, rng, n_random=3000):
    parts = [rng.standard_normal(n_random) * s for s in (1e-5, 0.3, 3.0, 40.0)]
    x = np.concatenate([EDGE] + parts).astype(np.float32)
    x = _domain(name, x)
    if name in ("log", "log1p"):
        x = np.concatenate([x, np.float32([-1.0, -2.0, -np.inf])])
    return x


def _check(name, x, got, max_ulp=4):
    with np.errstate(all="ignore"):
        want = REF[name](x.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN positions")
    for sign in (1, -1):
        np.testing.assert_array_equal(np.isinf(got) & (got * sign > 0), np.isinf(want) & (want * sign > 0),
                                      err_msg=f"{name}: {'+' if sign > 0 else '-'}inf positions")
    fin = np.isfinite(want)
    w, g = want[fin].astype(np.float64), got[fin].astype(np.float64)
    ulp = np.abs(g - w) / np.spacing(np.maximum(np.abs(w), np.float32(1.1754944e-38)).astype(np.float32))
    i = int(np.argmax(ulp)) if ulp.size else 0
    assert ulp.size == 0 or ulp.max() <= max_ulp, \
        f"{name}: {ulp.max():.1f} ulp at x={x[fin][i]!r}: got {g[i]!r}, want {w[i]!r}"


# ---- mathlib on explicit vectors ----------------------------------------------------------------------

def _vector_kernel(name: str, lanes: int, n: int, fn=None):
    """A JIT-compiled function y[i] = mathlib.<name>(x[i]) computed on <lanes x float> vectors (`fn(em, v,
    t)`: another float32 math function instead, e.g. exp_f32 with options; `name` then names the kernel)."""
    from graphc.backends.llvm import jit, mathlib
    from graphc.backends.llvm.irtext import Emitter
    t = mathlib.Ty(lanes)
    em = Emitter()

    def body(i):
        off = em(f"mul i64 {i}, {lanes}")
        v = em(f"load {t.f}, ptr {em(f'getelementptr float, ptr %x, i64 {off}')}, align 4")
        r = mathlib.F32[name](em, v, t=t) if fn is None else fn(em, v, t)
        em.raw(f"store {t.f} {r}, ptr {em(f'getelementptr float, ptr %y, i64 {off}')}, align 4")
    em.loop(n // lanes, body)
    fn = f"vmath_{name}_{lanes}"
    ir = mathlib.DECLARATIONS + em.function(f"define void @{fn}(ptr noalias %x, ptr noalias %y) nounwind")
    compiled = jit.compile_ir(ir, [fn])
    return compiled, ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(compiled.addresses[fn])


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("name", sorted(REF))
def test_vector_mathlib_matches_numpy(name, lanes, rng):
    x = _inputs(name, rng)
    n = -(-x.size // lanes) * lanes
    x = np.concatenate([x, np.zeros(n - x.size, np.float32)])
    y = np.full(n, 7.0, np.float32)
    keep, fn = _vector_kernel(name, lanes, n)
    fn(x.ctypes.data, y.ctypes.data)
    _check(name, x, y)


def test_vector_and_scalar_paths_agree_bit_for_bit(rng):
    """The row kernels (vectors) and the elementwise rows (scalars, vectorised by LLVM) compute the same
    steps: identical results, lane by lane."""
    x = _inputs("tanh", rng, 500)
    n = x.size // 8 * 8
    x = x[:n]
    for name in ("exp", "tanh", "sigmoid"):
        y = np.empty(n, np.float32)
        keep, fn = _vector_kernel(name, 8, n)
        fn(x.ctypes.data, y.ctypes.data)
        p = gc.placeholder("x", (n,), "float32")
        np.testing.assert_array_equal(gc.function([p], OPS[name](p), backend="llvm")(x), y, err_msg=name)


# ---- elementwise kernels: both ISAs, both thread counts, odd sizes ------------------------------------

@pytest.mark.parametrize("name", sorted(REF))
def test_elementwise_math_odd_sizes(name, isa, threads, rng):
    base = _inputs(name, rng, 200)
    for n in (1, 3, 17, 63, 65, 257, 70001):
        x = np.resize(np.roll(base, n), n).astype(np.float32)
        p = gc.placeholder("x", (n,), "float32")
        f = gc.function([p], OPS[name](p), backend="llvm")
        _check(name, x, f(x))


def _w2(x):
    return gc.tanh(x * 1.5 + 0.5) * gc.sigmoid(x) + gc.exp(-x * x)


def _w2_ref(x):
    x = x.astype(np.float64)
    return np.tanh(x * 1.5 + 0.5) / (1 + np.exp(-x)) + np.exp(-x * x)


def test_costly_elementwise_kernel_splits_over_threads(isa, threads, rng):
    """A W2-like chain (~100 instructions an element) runs on the pool from 64k elements, a cheap one
    (x + 1) only from 1M; both correct at 4M + 1 elements (an odd split) and at 65,537."""
    from graphc.backends.llvm import kernels
    for n in (kernels.PARALLEL_MIN_COSTLY + 1, 4_194_305):
        x = rng.standard_normal(n).astype(np.float32)
        x[:len(EDGE)] = EDGE
        p = gc.placeholder("x", (n,), "float32")
        f = gc.function([p], _w2(p), backend="llvm")
        got = f(x)
        with np.errstate(all="ignore"):
            want = _w2_ref(x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=3e-6, atol=5e-7)   # terms are O(1)
        assert ("@gc_pool_run(" in _entry(f.source)) == (threads == 2)
        cheap = gc.function([p], p + 1.0, backend="llvm")
        assert ("@gc_pool_run(" in _entry(cheap.source)) == (threads == 2 and n >= kernels.PARALLEL_MIN)
        np.testing.assert_array_equal(cheap(x), x + np.float32(1))


def _entry(source: str) -> str:
    """The IR outside the kernels' definitions (where the pool is called)."""
    return "\n".join(ln for ln in source.splitlines() if not ln.startswith("declare"))


# ---- the host's vector width --------------------------------------------------------------------------

def _asm_for(ir: str, cpu: str, features: str = "") -> str:
    """The assembly of `ir` optimised as graphc does, for CPU `cpu` (its own features, or `features`)."""
    import llvmlite.binding as llvm
    from graphc.backends.llvm import jit
    jit.target_machine()
    tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=3, codemodel="jitdefault")
    mod = llvm.parse_assembly(ir)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


@pytest.mark.parametrize("forced, zmm", [("avx512", True), ("avx2", False)])
def test_vector_width_follows_the_isa(monkeypatch, forced, zmm):
    """The kernels carry the ISA's width: on an Intel AVX-512 server core (whose LLVM tuning prefers
    256-bit vectors) the elementwise loop is built with zmm registers unless avx2 is forced."""
    monkeypatch.setenv("GRAPHC_LLVM_ISA", forced)
    p = gc.placeholder("x", (4099,), "float32")
    f = gc.function([p], _w2(p), backend="llvm")
    bits = 512 if forced == "avx512" else 256
    assert f'"prefer-vector-width"="{bits}"' in f.source
    assert ("zmm" in _asm_for(f.source, "sapphirerapids")) == zmm
    x = np.random.default_rng(1).standard_normal(4099).astype(np.float32)   # (here: the host's registers)
    np.testing.assert_allclose(f(x), _w2_ref(x), rtol=3e-6, atol=5e-7)


# ---- row kernels --------------------------------------------------------------------------------------

def _softmax_ref(name, x, axis):
    x = x.astype(np.float64)
    with np.errstate(all="ignore"):
        m = x.max(axis=axis, keepdims=True)
        if name == "logsumexp":
            m = np.where(np.isfinite(m), m, 0)
        e = np.exp(x - m)
        s = e.sum(axis=axis, keepdims=True)
        if name == "softmax":
            return e / s
        if name == "log_softmax":
            return x - m - np.log(s)
        return np.squeeze(np.log(s) + m, axis)


SOFT = {"softmax": gc.softmax, "log_softmax": gc.log_softmax, "logsumexp": gc.logsumexp}


@pytest.mark.parametrize("name", sorted(SOFT))
def test_softmax_rows_odd_lengths(name, isa, threads, rng):
    from graphc.backends.llvm import kernels
    lanes = kernels.lanes()
    for rows, n in [(1, 1), (3, 3), (2, 17), (5, 63), (4, 65), (3, 257), (6, 8), (257, 257)]:
        x = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
        if rows >= 5 and n >= 3:
            x[1, n // 2] = np.nan
            x[2, :] = -np.inf
            x[3, 0] = np.inf
            x[4, :] = 88.0 + np.arange(n, dtype=np.float32) % 3   # large but finite: no overflow
        p = gc.placeholder("x", x.shape, "float32")
        f = gc.function([p], SOFT[name](p, axis=-1), backend="llvm")
        got, want = f(x), _softmax_ref(name, x, -1)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name} {x.shape}")
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=4e-6, atol=1e-6 if name != "softmax" else 1e-12,
                                   err_msg=f"{name} {x.shape}")
        if n >= 2:   # the vector row kernel (the tail alone when the row is shorter than a vector)
            assert f"<{lanes} x float>" in f.source


def test_softmax_rows_split_over_threads(threads, rng):
    """Large row batches (leading dims merged, a size-1 batch dim included) run on the pool."""
    x = rng.standard_normal((1, 1100, 65)).astype(np.float32)
    p = gc.placeholder("x", x.shape, "float32")
    f = gc.function([p], [gc.softmax(p, axis=-1), gc.log_softmax(p, axis=-1)], backend="llvm")
    s, ls = f(x)
    np.testing.assert_allclose(s, _softmax_ref("softmax", x, -1), rtol=4e-6, atol=1e-12)
    np.testing.assert_allclose(ls, _softmax_ref("log_softmax", x, -1), rtol=4e-6, atol=1e-6)
    assert ("@gc_pool_run(" in _entry(f.source)) == (threads == 2)


@pytest.mark.parametrize("name", sorted(SOFT))
def test_softmax_other_axes_and_dtypes(name, rng):
    """Rows that are not contiguous (axis 0) and float64 rows take the scalar kernel: still right."""
    x = rng.standard_normal((17, 5, 9))
    for dtype, axis in [("float32", 0), ("float32", 1), ("float64", -1)]:
        xv = x.astype(dtype)
        p = gc.placeholder("x", xv.shape, dtype)
        got = gc.function([p], SOFT[name](p, axis=axis), backend="llvm")(xv)
        np.testing.assert_allclose(got, _softmax_ref(name, xv, axis), rtol=2e-6 if dtype == "float32" else 1e-12,
                                   atol=1e-7 if dtype == "float32" else 1e-14)


def test_softmax_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 3, 65)).astype(np.float32) * 5
    p = gc.placeholder("x", x.shape, "float32")
    f = gc.function([p], [gc.softmax(p, axis=-1), gc.log_softmax(p, axis=-1)], backend="llvm")
    s, ls = f(x)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(s, torch.softmax(t, -1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ls, torch.log_softmax(t, -1).numpy(), rtol=1e-5, atol=1e-5)
