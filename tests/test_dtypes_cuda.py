"""float16, bfloat16 and the 8/16-bit and unsigned integers on the cuda backends.

The kernels' semantics run on the CPU through cuda-emulated (the same CUDA C compiled for the host with
backends/cuda_emulated/emulation.h): the op table and the gradient table in float16/bfloat16 against
their references (test_dtypes_new's checks; rows batched into a few functions so that each batch is one
host compile), the emulation's float -> float16/bfloat16 conversions against NumPy/ml_dtypes' rounding
bit for bit, the integer table plus powers and exact int64/uint64 comparisons bit for bit. nvcc compiles
the generated CUDA C (cuda_fp16.h's __half, cuda_bf16.h's __nv_bfloat16, the integer C types) to PTX.
test_dtypes_new.py runs its integer, mixed-promotion, cast, MLP and LeNet-like tests on cuda-emulated
too (its BACKENDS).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import graphc as gc
from graphc import dtypes as _dt
from conftest import backend_or_skip
from test_dtypes_new import (HALVES, INT_EXPRS, NEW_INTS, _grad_params, _half_params, check_half_grads,
                             check_half_row, half_grad_row, half_row, npdt)

EMU = "cuda-emulated"
#: op-table rows per compiled function (one host compile per batch instead of one per row)
BATCH = 40


def _batches(params):
    """The pytest params (case, shapes, dtype) grouped by dtype into batches of BATCH rows."""
    out = []
    for d in HALVES:
        rows = [p.values[:2] for p in params if p.values[2] == d]
        for k in range(0, len(rows), BATCH):
            out.append(pytest.param(d, rows[k:k + BATCH], id=f"{d}-{k // BATCH}"))
    return out


@pytest.mark.parametrize("dtype,rows", _batches(_half_params()))
def test_op_table_in_half_precision_on_cuda_emulated(dtype, rows, rng):
    """Every float op-table row in float16/bfloat16 through cuda's kernels (run by the emulation): the
    same checks as test_dtypes_new.test_op_table_in_half_precision, one function per batch of rows."""
    backend_or_skip(EMU)
    built = [(case, *half_row(case, shapes, dtype, rng, prefix=f"r{j}_x")) for j, (case, shapes) in enumerate(rows)]
    phs = [p for _, ps, _, _, _ in built for p in ps]
    xs = [x for _, _, xv, _, _ in built for x in xv]
    f = gc.function(phs, [out for _, _, _, out, _ in built], backend=EMU)
    for (case, _, _, out, want), got in zip(built, f(*xs)):
        check_half_row(case, dtype, got, out, want, EMU)


@pytest.mark.parametrize("dtype,rows", _batches(_grad_params()))
def test_gradients_in_half_precision_on_cuda_emulated(dtype, rows, rng):
    """gc.grad of every differentiable float row in float16/bfloat16 through cuda's kernels against the
    float64 gradients (test_dtypes_new.test_gradients_in_half_precision's checks), batched."""
    backend_or_skip(EMU)
    built = []
    for j, (case, shapes) in enumerate(rows):
        row = half_grad_row(case, shapes, dtype, rng, prefix=f"r{j}_x")
        if row is not None:
            built.append((case, *row))
    phs = [p for _, ps, _, _, _ in built for p in ps]
    xs = [x for _, _, xv, _, _ in built for x in xv]
    f = gc.function(phs, [g for _, _, _, gs, _ in built for g in gs], backend=EMU)
    got = iter(f(*xs))
    for case, _, _, grads, want in built:
        check_half_grads(case, dtype, [next(got) for _ in grads], want, EMU)


# ---- the emulation's conversions round as the device's do ---------------------------------------------------

def _specials32() -> np.ndarray:
    """float32 values at the float16/bfloat16 rounding boundaries: ties, overflow, subnormals, inf, nan."""
    v = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e30, np.inf, -np.inf, np.nan, 2.0 ** -24,
         2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -11), 2.0 ** -26, 1e-45,
         3.3895314e38, 3.4028235e38, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8]
    halfway = np.arange(0, 1 << 16, dtype=np.uint32)   # every float16 / bfloat16 and the float between them
    f16 = (halfway.astype(np.uint16).view(np.float16)).astype(np.float32)
    bf = (halfway << 16).view(np.float32)
    mids = [(bf.view(np.uint32) + np.uint32(0x8000)).view(np.float32),
            np.nextafter(f16, np.float32(np.inf)), np.nextafter(f16, np.float32(-np.inf))]
    return np.concatenate([np.array(v, np.float32), f16, bf, *mids, -f16, -mids[0]]).astype(np.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NumPy's own casts of nan/inf/huge values
@pytest.mark.parametrize("dtype", HALVES)
def test_emulated_half_conversions_round_to_nearest_even(dtype, rng):
    """float32 -> float16/bfloat16 (the emulation's __float2half_rn / __float2bfloat16_rn), float64 -> half
    (through a float rounded to odd) and back, bit for bit against NumPy / ml_dtypes on every half value,
    the midpoints between them, and random bit patterns (NaN: any NaN)."""
    backend_or_skip(EMU)
    a32 = np.concatenate([_specials32(), rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
                          .view(np.float32)])
    a64 = np.concatenate([a32.astype(np.float64) * (1 + 2.0 ** -30), rng.standard_normal(4096) * 1e3,
                          np.array([65519.999999, 2.0 ** -25 + 2.0 ** -60, 1e300, -1e-300])])
    x, y = gc.placeholder("x", a32.shape, "float32"), gc.placeholder("y", a64.shape, "float64")
    h = gc.cast(x, dtype)
    f = gc.function([x, y], [h, gc.cast(y, dtype), gc.cast(h, "float32"), gc.cast(h, "float64")], backend=EMU)
    got32, got64, back32, back64 = f(a32, a64)
    with np.errstate(over="ignore"):
        want32, want64 = a32.astype(npdt(dtype)), a64.astype(npdt(dtype))
    for g, w, what in ((got32, want32, "float32"), (got64, want64, "float64")):
        gb, wb = g.view(np.uint16), w.view(np.uint16)
        nan = np.isnan(w.astype(np.float32))
        assert np.isnan(g[nan].astype(np.float32)).all(), what
        bad = np.flatnonzero((gb != wb) & ~nan)
        assert bad.size == 0, f"{what} -> {dtype}: {a32[bad[:5]] if what == 'float32' else a64[bad[:5]]} " \
                              f"gave {gb[bad[:5]]}, numpy {wb[bad[:5]]}"
    np.testing.assert_array_equal(back32, want32.astype(np.float32))
    np.testing.assert_array_equal(back64, want32.astype(np.float64))


# ---- nvcc compiles what cuda generates ----------------------------------------------------------------------

def _int_function(d, backend):
    """The integer table of test_dtypes_new plus powers (wrapping), casts to and from the half dtypes, and
    comparisons with uint64 / int64 (exact, though NumPy promotes the pair to float64)."""
    shape = (5, 7)
    x, y = gc.placeholder("x", shape, d), gc.placeholder("y", shape, d)
    u, s = gc.placeholder("u", shape, "uint64"), gc.placeholder("s", shape, "int64")
    outs = [fn(x, y) for fn, _ in INT_EXPRS.values()]
    outs += [gc.cast(x, t) for t in ("float16", "bfloat16", "float32", "uint64", "int8") if t != d]
    outs += [gc.cast(gc.cast(x, "bfloat16") * 0.5, d), x ** gc.constant(np.array(3, npdt(d))),
             x ** gc.minimum(y, gc.constant(np.array(9, npdt(d))))]
    outs += [x < u, u >= x, gc.equal(s, x), s > x]
    return gc.function([x, y, u, s], outs, backend=backend)


def _int_graph(d):
    return _int_function(d, "numpy").graph


def _nvcc_ptx(source, tmp_path, monkeypatch):
    from graphc.backends.cuda.compiler import compile_cuda, nvcc_path
    if nvcc_path() is None:
        pytest.skip("nvcc not installed")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    return compile_cuda(source, "sm_80", "ptx").decode()


@pytest.mark.parametrize("dtype", HALVES)
def test_nvcc_compiles_every_half_kernel(dtype, tmp_path, monkeypatch):
    """Every kernel kind in float16/bfloat16 (the graph of test_cuda_codegen) compiles with nvcc: __half /
    __nv_bfloat16 storage from cuda_fp16.h / cuda_bf16.h, float compute."""
    from test_cuda_codegen import every_kernel_graph
    from graphc.backends.cuda.lower import lower
    source, plan = lower(every_kernel_graph(dtype))
    assert plan.fallback_ops == []
    assert "#include <cuda_fp16.h>" in source and {"float16": "__half*", "bfloat16": "__nv_bfloat16*"}[dtype] in source
    ptx = _nvcc_ptx(source, tmp_path, monkeypatch)
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(plan.kernels)
    # random draws in the dtype (the reference's p-bit uniform, a rounded normal)
    key = np.array([3, 0], np.int64)
    draws = [gc.random.uniform((64,), dtype=dtype, key=key), gc.random.normal((64,), dtype=dtype, key=key)]
    source, plan = lower(gc.function([], draws, backend="numpy").graph)
    assert set(plan.kernels.values()) == {"random"}
    ptx = _nvcc_ptx(source, tmp_path, monkeypatch)
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(plan.kernels)


@pytest.mark.parametrize("d", NEW_INTS)
def test_nvcc_compiles_every_integer_kernel(d, tmp_path, monkeypatch):
    """The integer table (wrapping arithmetic, unsigned comparisons, reductions, argmax, matmul, casts to
    and from the half dtypes, exact comparisons with int64/uint64) in each new integer dtype compiles
    with nvcc."""
    from graphc.backends.cuda.lower import lower
    source, plan = lower(_int_graph(d))
    ptx = _nvcc_ptx(source, tmp_path, monkeypatch)
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(plan.kernels)


@pytest.mark.parametrize("d", NEW_INTS)
def test_integer_kernels_equal_numpy_bit_for_bit(d, rng):
    """Every node of the integer table as a cuda kernel in the dtype's own C type (no refusal, nothing on
    the host), equal to the NumPy backend bit for bit on full-range values (wrap-around, unsigned
    comparisons, exact comparisons with uint64/int64, powers)."""
    backend_or_skip(EMU)
    f = _int_function(d, EMU)
    assert f.program.info["fallback_ops"] == []
    ctype = {"int8": "signed char", "uint8": "unsigned char", "int16": "short", "uint16": "unsigned short",
             "uint32": "unsigned int", "uint64": "unsigned long long"}[d]
    assert f"{ctype}* __restrict__" in f.source
    info = np.iinfo(npdt(d))

    def full(dt):
        i = np.iinfo(npdt(dt))
        a = rng.integers(i.min, i.max, size=(5, 7), dtype=npdt(dt), endpoint=True)
        a.reshape(-1)[:4] = [i.min, i.max, 0, 1]
        return a
    a, b = full(d), np.abs(full(d) % 16).astype(npdt(d))
    b.reshape(-1)[:2] = [0, info.max]
    args = [a, b, full("uint64"), full("int64")]
    with np.errstate(all="ignore"):
        want = _int_function(d, "numpy")(*args)
        got = f(*args)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, k
        np.testing.assert_array_equal(g.astype(np.float64) if _dt.is_half(g.dtype.name) else g,
                                      w.astype(np.float64) if _dt.is_half(w.dtype.name) else w, err_msg=f"{d} {k}")
