"""The llvm backend's float32 transcendentals after the instruction-count work (mathlib: biased shifters
whose bits give 2^n by one shift, the exp of x <= 0 scaled as 2^(n+64) 2^-64, tanh's sign by xor,
sigmoid's one division) and the paired elementwise loop (kernels._paired_loop: two element streams per
iteration for long, costly 1-D kernels), against NumPy float64:

- dense sweeps over the scaling boundaries (overflow near 88.72, the subnormals from -87.3 to -103.9,
  tanh's clamp) and random float32 bit patterns, on <8 x float> and <16 x float> vectors;
- exact special values: signed zeros, +-inf, NaN;
- the exp of x <= 0 path (sigmoid, softmax rows, attention) on its own;
- the paired loop at odd sizes around its threshold and odd chunk bounds, strided and broadcast inputs,
  both ISAs' settings and both thread counts, bit-for-bit equal to the plain loop;
- exp of an argument the body shows is <= 0 (-x*x, x*-x, -(x*x), -abs(x)) on the short path, and only those;
- the as-late-as-possible order of elementwise bodies (kernels._late_order): bit-identical results.
"""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip
from test_llvm_math_speedpaths import OPS, REF, _check, _vector_kernel

pytestmark = pytest.mark.usefixtures("llvm")


@pytest.fixture
def llvm(monkeypatch):
    backend_or_skip("llvm")
    # the kernels here are checked at the vector width of their ISA: the width tuner (which may take half
    # of it for a large costly kernel, tests/test_llvm_width_tuner.py) stays out
    monkeypatch.setenv("GRAPHC_TUNE", "off")


def _sweep(name, rng):
    """Dense points over every range where the scaling changes, plus random bit patterns (all exponents)."""
    parts = [np.linspace(-110.0, 95.0, 40001), np.linspace(-1.0, 1.0, 4001), np.linspace(87.0, 89.5, 2001),
             np.linspace(-105.0, -86.0, 4001), np.linspace(-22.0, 22.0, 4001)]
    bits = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([np.float32(np.concatenate(parts)), bits[np.isfinite(bits)]]).astype(np.float32)
    if name == "log":
        x = np.abs(x)
    if name == "log1p":
        x = np.maximum(x, np.float32(-1))
    return x


def _run_vector(name, lanes, x):
    n = -(-x.size // lanes) * lanes
    xp = np.concatenate([x, np.zeros(n - x.size, np.float32)])
    y = np.full(n, 7.0, np.float32)
    keep, fn = _vector_kernel(name, lanes, n)
    fn(xp.ctypes.data, y.ctypes.data)
    return y[:x.size]


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("name", sorted(REF))
def test_dense_sweep_within_4_ulp(name, lanes, rng):
    x = _sweep(name, rng)
    _check(name, x, _run_vector(name, lanes, x))


SPECIAL = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38])


@pytest.mark.parametrize("lanes", [1, 8, 16])
def test_special_values_exact(lanes):
    x = SPECIAL
    with np.errstate(all="ignore"):
        want = {"exp": np.float32([1, 1, np.inf, 0, np.nan, 1, 1, np.inf, 0]),
                "tanh": np.float32([0.0, -0.0, 1, -1, np.nan, 1e-45, -1e-45, 1, -1]),
                "sigmoid": np.float32([0.5, 0.5, 1, 0, np.nan, 0.5, 0.5, 1, 0]),
                "expm1": np.float32([0.0, -0.0, np.inf, -1, np.nan, 1e-45, -1e-45, np.inf, -1])}
    for name, w in want.items():
        if lanes == 1:   # the elementwise row (scalar code, widened by the loop vectoriser)
            p = gc.placeholder("x", (x.size,), "float32")
            got = gc.function([p], OPS[name](p), backend="llvm")(x)
        else:
            got = _run_vector(name, lanes, x)
        keep = np.ones(x.size, bool)
        if name == "expm1":   # expm1 = 2 (expm1/2) loses the smallest subnormal (1 ulp: the sweeps check it)
            keep[5:7] = False
        np.testing.assert_array_equal(got[keep], w[keep], err_msg=name)   # (NaN == NaN here)
        np.testing.assert_array_equal(np.signbit(got[:2]), np.signbit(w[:2]), err_msg=f"{name}: signed zero")


def _exp_nonpositive_kernel(lanes: int, n: int):
    """y = mathlib.exp_f32(x, hi=None) (the caller knows x <= 0) on <lanes x float> vectors."""
    from graphc.backends.llvm import mathlib
    return _vector_kernel("exp_nonpos", lanes, n, fn=lambda em, v, t: mathlib.exp_f32(em, v, hi=None, t=t))


@pytest.mark.parametrize("lanes", [8, 16])
def test_exp_of_nonpositive_argument(lanes, rng):
    x = -np.abs(np.concatenate([np.linspace(0, 110, 30001), rng.standard_normal(3000) * 30,
                                [1e-45, 1e-30, 1e-7, 0.3465, 0.3466, 87.33, 87.34, 103.97, 103.98, 104.0, 150.0,
                                 3.4e38]]).astype(np.float32))
    x = np.concatenate([x, np.float32([-0.0, -np.inf, np.nan])])
    n = -(-x.size // lanes) * lanes
    x = np.concatenate([x, np.zeros(n - x.size, np.float32)])
    y = np.full(n, 7.0, np.float32)
    keep, fn = _exp_nonpositive_kernel(lanes, n)
    fn(x.ctypes.data, y.ctypes.data)
    _check("exp", x, y)
    assert y[x == -np.inf].tolist() == [0.0] and np.isnan(y[np.isnan(x)]).all()


# ---- the paired elementwise loop ----------------------------------------------------------------------

def _w2(x, a=1.5, b=0.5):
    return gc.tanh(x * a + b) * gc.sigmoid(x) + gc.exp(-x * x)


def _w2_ref(x, a=1.5, b=0.5):
    x = x.astype(np.float64)
    with np.errstate(all="ignore"):
        return np.tanh(x * a + b) / (1 + np.exp(-x)) + np.exp(-x * x)


def _inputs(n, rng):
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    edge = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-38, 9.5, -9.5, 88.8, -90.0, -104.5])
    k = min(n, edge.size)
    x[:k] = edge[:k]
    x[-k:] = edge[:k]     # (the last elements land in the remainder loop)
    return x


def _compare(got, want):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)])
    np.testing.assert_allclose(got[fin], want[fin], rtol=3e-6, atol=5e-7)


def _fdivs(f) -> int:
    return sum(ln.count("fdiv float") + ln.count("fdiv <") for ln in f.source.splitlines()
               if not ln.startswith("declare"))


@pytest.mark.parametrize("extra", [0, 1, 127, 129, 255])
def test_paired_loop_w2_odd_sizes(extra, isa, threads, rng):
    from graphc.backends.llvm import kernels
    n = kernels.PAIR_MIN + extra
    x = _inputs(n, rng)
    p = gc.placeholder("x", (n,), "float32")
    f = gc.function([p], _w2(p), backend="llvm")
    assert _fdivs(f) == 6        # tanh's and sigmoid's divisions, emitted for both streams and the rest
    _compare(f(x), _w2_ref(x))


def test_small_kernels_are_not_paired(rng):
    for n in (1, 3, 17, 63, 65, 257, 70001):
        x = _inputs(n, rng)
        p = gc.placeholder("x", (n,), "float32")
        f = gc.function([p], _w2(p), backend="llvm")
        assert _fdivs(f) == 2
        _compare(f(x), _w2_ref(x))


def test_cheap_kernels_are_not_paired():
    from graphc.backends.llvm import kernels
    n = kernels.PAIR_MIN + 3
    p = gc.placeholder("x", (n,), "float32")
    f = gc.function([p], p / (p + 1.0), backend="llvm")
    assert _fdivs(f) == 1
    x = np.arange(n, dtype=np.float32)
    np.testing.assert_array_equal(f(x), x / (x + np.float32(1)))


def test_paired_loop_strided_and_broadcast_inputs(isa, threads, rng):
    """A stride-2 view and a broadcast (stride 0) operand through the paired loop's offsets."""
    from graphc.backends.llvm import kernels
    n = kernels.PAIR_MIN + 65
    xs = _inputs(2 * n, rng)
    s = np.float32(rng.standard_normal(1))
    px, ps = gc.placeholder("x", (2 * n,), "float32"), gc.placeholder("s", (1,), "float32")
    v = px[::2]
    f = gc.function([px, ps], gc.tanh(v * ps) * gc.sigmoid(v) + gc.exp(v * ps), backend="llvm")
    assert _fdivs(f) == 6
    xv = xs[::2].astype(np.float64)
    with np.errstate(all="ignore"):
        want = np.tanh(xv * s) / (1 + np.exp(-xv)) + np.exp(xv * s)
    got = f(xs, s)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want) & (np.abs(want) < 1e30)
    np.testing.assert_allclose(got[fin], want[fin], rtol=4e-6, atol=5e-7)


def test_paired_and_plain_loops_agree_bit_for_bit(monkeypatch, rng):
    from graphc.backends.llvm import kernels
    n = kernels.PAIR_MIN + 77
    x = _inputs(n, rng)
    p = gc.placeholder("x", (n,), "float32")
    paired = gc.function([p], _w2(p), backend="llvm")
    paired_divs = _fdivs(paired)   # (after a warm start its source is made now, before the setting changes)
    monkeypatch.setattr(kernels, "PAIR_MIN", 1 << 40)
    plain = gc.function([p], _w2(p), backend="llvm")
    assert (paired_divs, _fdivs(plain)) == (6, 2)
    np.testing.assert_array_equal(paired(x), plain(x))


def test_paired_loop_vectorises_both_streams_for_avx512(monkeypatch):
    """Forced avx512 (16 lanes), the paired kernel compiled for an AVX-512 CPU carries two zmm streams:
    two 64-byte loads of x per iteration of the vector loop."""
    from graphc.backends.llvm import kernels
    from test_llvm_math_speedpaths import _asm_for
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "avx512")
    n = kernels.PAIR_MIN + 5
    p = gc.placeholder("x", (n,), "float32")
    f = gc.function([p], _w2(p), backend="llvm")
    asm = _asm_for(f.source, "sapphirerapids")
    assert "zmm" in asm and "vdivps\t%zmm" in asm
    assert asm.count("vdivps\t%zmm") >= 4     # tanh's and sigmoid's, for each of the two streams
    x = _inputs(n, np.random.default_rng(3))
    _compare(f(x), _w2_ref(x))


def test_paired_loop_under_bounds_sanitizer(rng):
    """sanitize="bounds" checks every access of both streams and the rest loop: no false alarm, the
    same results."""
    from graphc.backends.llvm import kernels
    n = kernels.PAIR_MIN + 3
    x = _inputs(n, rng)
    p = gc.placeholder("x", (n,), "float32")
    checked = gc.function([p], _w2(p), backend="llvm", sanitize="bounds")
    assert _fdivs(checked) == 6
    np.testing.assert_array_equal(checked(x), gc.function([p], _w2(p), backend="llvm")(x))


# ---- exp of a provably non-positive argument; the as-late-as-possible body order ---------------------

_HI_CLAMP = "0x4056400000000000"   # 89.0: exp's overflow clamp, absent on the x <= 0 path


@pytest.mark.parametrize("name", ["-x*x", "x*-x", "-(x*x)", "-abs(x)"])
def test_exp_of_a_nonpositive_expression_takes_the_short_path(name, threads, rng):
    from graphc.backends.llvm import kernels
    build = {"-x*x": lambda x: -x * x, "x*-x": lambda x: x * -x, "-(x*x)": lambda x: -(x * x),
             "-abs(x)": lambda x: -gc.abs(x)}[name]
    ref = {"-x*x": lambda x: -x * x, "x*-x": lambda x: -x * x, "-(x*x)": lambda x: -x * x,
           "-abs(x)": lambda x: -np.abs(x)}[name]
    for n in (1, 3, 17, 63, 65, 257, kernels.PAIR_MIN + 65):
        x = _inputs(n, rng)
        x[: min(n, 4)] = np.float32([-0.0, 10.2, -13.5, 1e-20])[: min(n, 4)]   # exp(-x*x) subnormal, 0, 1
        p = gc.placeholder("x", (n,), "float32")
        f = gc.function([p], gc.exp(build(p)), backend="llvm")
        assert _HI_CLAMP not in f.source, name
        with np.errstate(all="ignore"):
            want = np.exp(ref(x.astype(np.float32)).astype(np.float64)).astype(np.float32)
        got = f(x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        fin = np.isfinite(want)
        w, g = want[fin].astype(np.float64), got[fin].astype(np.float64)
        ulp = np.abs(g - w) / np.spacing(np.maximum(np.abs(w), np.float32(1.1754944e-38)).astype(np.float32))
        assert ulp.max() <= 4, (name, n, ulp.max())


def test_exp_of_other_expressions_keeps_the_full_range():
    p, q = gc.placeholder("x", (5,), "float32"), gc.placeholder("y", (5,), "float32")
    for expr in (p * p, p * -q, -p * q, -(p * q), p - q):
        f = gc.function([p, q], gc.exp(expr), backend="llvm")
        assert _HI_CLAMP in f.source
        x, y = np.float32([0, 1, 50, 89, -3]), np.float32([1, 2, -2, -1, 0.5])
        with np.errstate(over="ignore"):
            np.testing.assert_allclose(f(x, y), np.exp(gc.function([p, q], expr, backend="numpy")(x, y)),
                                       rtol=3e-7)


@pytest.mark.parametrize("lanes", [1, 8])
def test_nonpositive_recognises_only_sign_proofs(lanes):
    from graphc.backends.llvm import mathlib
    from graphc.backends.llvm.irtext import Emitter
    t, em = mathlib.Ty(lanes), Emitter()
    x, y = em.fresh(), em.fresh()
    nx = em(f"fneg {t.f} {x}")
    sq = em(f"fmul {t.f} {x}, {x}")
    ax = em(f"call {t.f} @llvm.fabs.{'f32' if lanes == 1 else 'v8f32'}({t.f} {x})")
    orx = mathlib._float(em, em(f"or {t.i} {mathlib._bits(em, x, t)}, {t.ic(-0x80000000)}"), t)
    andx = mathlib._float(em, em(f"and {t.i} {mathlib._bits(em, x, t)}, {t.ic(0x7FFFFFFF)}"), t)
    yes = [em(f"fmul {t.f} {nx}, {x}"), em(f"fmul {t.f} {x}, {nx}"), em(f"fneg {t.f} {sq}"),
           em(f"fneg {t.f} {ax}"), orx]
    no = [x, nx, sq, ax, andx, em(f"fmul {t.f} {nx}, {y}"), em(f"fneg {t.f} {em(f'fmul {t.f} {x}, {y}')}"),
          em(f"fsub {t.f} {x}, {y}")]
    assert [mathlib.nonpositive(em, v) for v in yes] == [True] * len(yes)
    assert [mathlib.nonpositive(em, v) for v in no] == [False] * len(no)


def _mixed_body(p, q):
    """A fused body with two outputs, a float16 input, a comparison, a select and an int32 output."""
    h = gc.tanh(p * 0.75 - 0.25) + gc.sigmoid(q.astype("float32")) * gc.exp(-p * p)
    return [h, gc.where(h > 0.5, p, -p).astype("int32")]


@pytest.mark.parametrize("n_extra", [None, 0, 129])
def test_late_order_changes_no_bit(n_extra, threads, monkeypatch, rng):
    """The as-late-as-possible order of an elementwise body (kernels._late_order) only moves
    instructions: bit-identical results at odd sizes, paired or not, with several outputs and dtypes."""
    from graphc.backends.llvm import kernels
    sizes = (1, 3, 17, 63, 65, 257) if n_extra is None else (kernels.PAIR_MIN + n_extra,)
    for n in sizes:
        x = _inputs(n, rng)
        y = (rng.standard_normal(n) * 6).astype(np.float16)
        p, q = gc.placeholder("x", (n,), "float32"), gc.placeholder("y", (n,), "float16")
        late = gc.function([p, q], _mixed_body(p, q), backend="llvm")
        w2_late = gc.function([p], _w2(p), backend="llvm")
        monkeypatch.setattr(kernels, "LATE_ORDER", False)
        plain = gc.function([p, q], _mixed_body(p, q), backend="llvm")
        w2_plain = gc.function([p], _w2(p), backend="llvm")
        monkeypatch.setattr(kernels, "LATE_ORDER", True)
        for a, b in zip(late(x, y), plain(x, y)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(w2_late(x), w2_plain(x))
        _compare(w2_late(x), _w2_ref(x))


def test_late_order_unit():
    """Longest path to the end first (ties in emission order), every value defined before its uses, loads
    before stores, stores in their order; a span with a label or a void call is left alone."""
    from graphc.backends.llvm import kernels
    from graphc.backends.llvm.irtext import Emitter
    em = Emitter()
    em.raw("store float 0.0, ptr %out0")          # before the span: never moved
    first = len(em.lines)
    a = em("load float, ptr %pa")
    b = em("load float, ptr %pb")
    s1 = em(f"fadd float {a}, 1.0")
    s2 = em(f"fmul float {s1}, {s1}")
    s3 = em(f"fsub float {s2}, 2.0")
    t1 = em(f"fmul float {b}, 3.0")
    em.raw(f"store float {s3}, ptr %o1")
    em.raw(f"store float {t1}, ptr %o2")
    before = list(em.lines)
    kernels._late_order(em, first)
    assert em.lines[:first] == before[:first] and sorted(em.lines) == sorted(before)
    body = [ln.strip() for ln in em.lines[first:]]
    pos = {ln.split(" = ")[0]: k for k, ln in enumerate(body) if " = " in ln}
    for k, ln in enumerate(body):   # defined before used
        assert all(pos[v] < k for v in kernels._SSA.findall(ln.split(" = ")[-1]) if v in pos)
    assert body[-2:] == [f"store float {s3}, ptr %o1", f"store float {t1}, ptr %o2"]
    assert body.index(f"{t1} = fmul float {b}, 3.0") > body.index(f"{s1} = fadd float {a}, 1.0")
    for stop in ("lbl:", "  call void @f()", "  br label %x"):
        em2 = Emitter()
        em2.lines = list(before) + [stop]
        kernels._late_order(em2, first)
        assert em2.lines == list(before) + [stop]
    em3 = Emitter()           # a stack slot's store and load keep their order (the span is left alone)
    slot = em3.alloca("float")
    em3.raw(f"store float 1.0, ptr {slot}")
    v = em3(f"load float, ptr {slot}")
    em3.raw(f"store float {em3(f'fadd float {v}, 1.0')}, ptr %o")
    kept = list(em3.lines)
    kernels._late_order(em3, 0)
    assert em3.lines == kept


@pytest.mark.parametrize("n", [1, 3, 17, 63, 65, 257])
def test_w2_odd_sizes_both_thread_counts(n, threads, rng):
    x = _inputs(n, rng)
    p = gc.placeholder("x", (n,), "float32")
    _compare(gc.function([p], _w2(p), backend="llvm")(x), _w2_ref(x))
