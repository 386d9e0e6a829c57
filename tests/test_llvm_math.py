"""The llvm backend's inline float32 transcendentals against NumPy (float64 reference rounded to
float32) over the full float32 range, including overflow, underflow, subnormals, +-0, +-inf and NaN."""
from __future__ import annotations

import math

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm():
    backend_or_skip("llvm")


def _erf(x):
    try:
        from scipy.special import erf
        return erf(x)
    except ImportError:
        return np.vectorize(math.erf)(x)


REF = {
    "exp": (gc.exp, np.exp), "log": (gc.log, np.log), "log1p": (gc.log1p, np.log1p),
    "expm1": (gc.expm1, np.expm1), "tanh": (gc.tanh, np.tanh),
    "sigmoid": (gc.sigmoid, lambda x: 1 / (1 + np.exp(-x))), "erf": (gc.erf, _erf),
    "softplus": (gc.softplus, lambda x: np.logaddexp(0, x)),
}
SPECIAL = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-40, 1.17e-38, 3.4e38, -3.4e38,
                      88.72, 88.73, 89.0, -87.3, -88.0, -100.0, -103.9, -104.5, -150.0, 0.625, -0.625,
                      0.626, 1.0, -1.0, 2.0, -2.0, 9.0, 10.0, -0.9999999, 1e-7, -1e-7, 0.5])


def _inputs(name, rng):
    parts = [rng.standard_normal(20000) * s for s in (1e-6, 0.1, 1.0, 4.0, 30.0, 200.0)]
    parts.append(rng.uniform(-110, 90, 20000))
    x = np.concatenate(parts + [SPECIAL]).astype(np.float32)
    if name == "log":
        x = np.abs(x)
        x = np.concatenate([x, np.float32([-1.0, -np.inf])])
    if name == "log1p":
        x = np.concatenate([np.maximum(x, np.float32(-1)), np.float32([-2.0])])
    return x


@pytest.mark.parametrize("name", sorted(REF))
def test_transcendental_matches_numpy_over_the_float32_range(name, rng):
    op, ref = REF[name]
    x = _inputs(name, rng)
    p = gc.placeholder("x", (x.size,), "float32")
    f = gc.function([p], op(p), backend="llvm")
    got = f(x)
    with np.errstate(all="ignore"):
        want = ref(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN positions differ")
    np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))
    np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(want) & (want < 0))
    fin = np.isfinite(want)
    w, g = want[fin].astype(np.float64), got[fin].astype(np.float64)
    ulp = np.abs(g - w) / np.spacing(np.maximum(np.abs(w), np.float32(1.1754944e-38)).astype(np.float32))
    worst = int(np.argmax(ulp))
    assert ulp.max() <= 4, f"{name}: {ulp.max():.1f} ulp at x={x[fin][worst]!r}: got {g[worst]!r}, want {w[worst]!r}"


def test_float64_uses_libm_accuracy(rng):
    x = rng.uniform(-20, 20, 1000)
    p = gc.placeholder("x", (1000,), "float64")
    f = gc.function([p], [gc.exp(p), gc.tanh(p), gc.erf(p), gc.sigmoid(p)], backend="llvm")
    for got, want in zip(f(x), [np.exp(x), np.tanh(x), _erf(x), 1 / (1 + np.exp(-x))]):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-300)


def test_transcendentals_vectorise(rng):
    """The kernel's loop uses vector registers: no per-lane libm calls for float32 exp/tanh/erf (packed
    SSE instructions where the code is generated without AVX: the host's, or GRAPHC_LLVM_ISA=sse)."""
    from graphc.backends.llvm import jit
    p = gc.placeholder("x", (4096,), "float32")
    f = gc.function([p], gc.tanh(p) * gc.sigmoid(p) + gc.exp(-p * p) + gc.erf(p), backend="llvm")
    asm = f.asm
    if jit.has_feature(jit.cpu_features(), "avx"):
        assert "zmm" in asm or "ymm" in asm, "no AVX vector registers in the fused kernel"
    else:
        assert "\tmulps\t" in asm and "%ymm" not in asm, "no packed SSE code in the fused kernel"
    for libm in ("expf", "tanhf", "erff"):
        assert f"call{libm}" not in asm.replace(" ", "").replace("\t", ""), f"scalar libm call {libm}"
