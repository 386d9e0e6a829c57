"""Vectorisable float32 transcendentals emitted inline: branch-free range reduction + polynomial.

LLVM turns its `llvm.exp`/`llvm.tanh` intrinsics into one scalar libm call per vector lane, so these
are written with plain arithmetic, selects and bit casts: on scalars (`float`, the elementwise rows,
which the loop vectoriser widens to the host's vectors) or directly on `<N x float>` vectors (row
kernels that write their own vector loops; `Ty(lanes)`). Every function is accurate to a few ulp over
the whole float32 range (overflow, underflow into the subnormals, +-0, +-inf, NaN; tests/test_llvm_math*)
with no per-element branch and no libm call. float64 uses libm (correct to the last ulp, scalar).

Kernels full of these functions are bound by their dependency chains and by the vector registers in flight
(on Zen 2 a W2-like loop of ~100 instructions a vector stalls on the physical register file, not on the
FMA ports): every instruction counts, so one FMA per polynomial step, Estrin's pairs instead of a Horner
chain where it is long, the shifter trick instead of round + convert (its bias chosen so that 2^n is
one shift of the sum's bits), one division per function, and NaN/inf/0 that fall out of clamped
arithmetic instead of compare-and-select after the fact. What the emitted code already shows is used:
exp of a value the body made as -(y*y) or -|y| takes the cheaper x <= 0 path (`nonpositive`).
"""
from __future__ import annotations

from .irtext import Emitter, fconst


class Ty:
    """The IR types one function works on: float32 scalars (lanes=1) or <lanes x float> vectors."""

    def __init__(self, lanes: int = 1):
        self.lanes = lanes
        vec = (lambda s: s) if lanes == 1 else (lambda s: f"<{lanes} x {s}>")
        self.f, self.i, self.b = vec("float"), vec("i32"), vec("i1")

    def c(self, v) -> str:
        """A float constant (splat across the lanes)."""
        k = fconst(v, "float32")
        return k if self.lanes == 1 else f"splat (float {k})"

    def ic(self, v: int) -> str:
        return str(int(v)) if self.lanes == 1 else f"splat (i32 {int(v)})"


S = Ty(1)
F = S.f


def c(v) -> str:
    return fconst(v, "float32")


def _poly(em: Emitter, x: str, coeffs, t: Ty = S) -> str:
    """Horner: coeffs[0]*x^(n-1) + ... + coeffs[-1]; each step may fuse into one FMA (`contract`:
    fewer instructions and one rounding instead of two)."""
    acc = t.c(coeffs[0])
    for k in coeffs[1:]:
        acc = _fma(em, acc, x, t.c(k), t)
    return acc


def _estrin(em, x: str, xx: str, coeffs, t: Ty = S) -> str:
    """The polynomial coeffs[0]*x^(n-1) + ... + coeffs[-1] by pairs (Estrin's scheme, xx = x*x): half
    Horner's chain of dependent FMAs, the same number of instructions."""
    cs = list(coeffs)
    odd = len(cs) % 2
    pairs = [_fma(em, t.c(cs[i]), x, t.c(cs[i + 1]), t) for i in range(odd, len(cs), 2)]
    if odd:     # the leading coefficient starts the chain (no 0*x + c pair: LLVM may not fold it)
        pairs = [t.c(cs[0])] + pairs
    acc = pairs[0]
    for p in pairs[1:]:
        acc = _fma(em, acc, xx, p, t)
    return acc


def _sel(em, cond, a, b, t: Ty = S, ity: bool = False):
    ty = t.i if ity else t.f
    return em(f"select {t.b} {cond}, {ty} {a}, {ty} {b}")


def _fma(em, a, b, cst, t: Ty = S) -> str:
    """a*b + cst, one FMA where the target has them (`contract`)."""
    p = em(f"fmul contract {t.f} {a}, {b}")
    return em(f"fadd contract {t.f} {p}, {cst}")


def _max(em, x, lo, t: Ty = S) -> str:
    """max(x, lo) that keeps a NaN x (one vmaxps: the compare is false for NaN)."""
    return _sel(em, em(f"fcmp olt {t.f} {x}, {t.c(lo)}"), t.c(lo), x, t)


def _min(em, x, hi, t: Ty = S) -> str:
    return _sel(em, em(f"fcmp ogt {t.f} {x}, {t.c(hi)}"), t.c(hi), x, t)


def _bits(em, x, t: Ty) -> str:
    return em(f"bitcast {t.f} {x} to {t.i}")


def _float(em, i, t: Ty) -> str:
    return em(f"bitcast {t.i} {i} to {t.f}")


def fabs(em, x, t: Ty = S) -> str:
    if t.lanes == 1:
        return em(f"call float @llvm.fabs.f32(float {x})")
    return _float(em, em(f"and {t.i} {_bits(em, x, t)}, {t.ic(0x7FFFFFFF)}"), t)


def copysign(em, mag, sign, t: Ty = S) -> str:
    if t.lanes == 1:
        return em(f"call float @llvm.copysign.f32(float {mag}, float {sign})")
    m = em(f"and {t.i} {_bits(em, mag, t)}, {t.ic(0x7FFFFFFF)}")
    s = em(f"and {t.i} {_bits(em, sign, t)}, {t.ic(-0x80000000)}")
    return _float(em, em(f"or {t.i} {m}, {s}"), t)


#: 1.5 * 2**23: x + SHIFT (|x| < 2**22) rounds x to an integer (to nearest even) held in the low bits
#: of the sum's mantissa, so one FMA gives both round(x / ln2) as a float and, by a bit cast, as an i32
#: (no roundps/cvtps2dq, and no fptosi, which is poison on NaN). The shifters below add a bias B: the
#: sum's bits are SHIFT_BITS + B + n, and SHIFT_BITS's low 10 bits are 0, so `shl 23` of them (or of
#: their half) is 2^(n + B - 127) as a float's bits with no add: one integer instruction per scale.
SHIFT = 12582912.0
SHIFT_BITS = 0x4B400000
#: B = 254 (exp, _half_expm1): the bits b = SHIFT_BITS + 254 + n halve into bh = b >> 1 = SHIFT_BITS/2 +
#: 127 + floor(n/2) and b - bh (127 + ceil(n/2)): `shl 23` of each is one half of 2^n, both normal floats
SHIFT_EXP = SHIFT + 254.0
#: B = 191 (exp of x <= 0, n in [-150, 0]): `shl 23` of the bits is 2^(n + 64), a normal float; the
#: bits less 65 shift to 2^(n-1) (_half_expm1 of x <= 0: one shifter constant shared with exp and sigmoid)
SHIFT_NEG = SHIFT + 191.0
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4   # Cody-Waite: n * LN2_HI is exact for |n| < 2**15
#: float32(ln2) (fconst rounds it): r = x - n LN2_F32 in one FMA is off by at most |n| 1.9e-9, a relative
#: error of e^x under 0.5 ulp for the |n| <= 29 of a reduction clamped at x >= -20 (tanh's, where e^x
#: that far out only moves tanh by a fraction of an ulp): one FMA and one constant fewer there
LN2_F32 = 0.6931471805599453
#: the lowest clamp (lo) of _half_expm1's x <= 0 path that takes the one-FMA reduction
ONE_FMA_REDUCTION_MIN = -20.0
#: exp(r) = 1 + r + r*r*P(r) on |r| <= ln2/2: P fitted (minimax, relative error of expm1(r)) with five
#: coefficients; its error is under 0.3 ulp of expm1(r) and 0.1 ulp of exp(r) (Cephes uses six)
_EXP_P = [1.3882460771128535e-3, 8.366494439542294e-3, 4.166720062494278e-2, 1.666654348373413e-1,
          4.999999701976776e-1]


def _reduce(em, x, t: Ty, shift: float = SHIFT_EXP, one_fma: bool = False):
    """x = n ln2 + r, |r| <= ln2/2: (n as the shifter's sum's bits (i32): SHIFT_BITS + bias + n, r).
    one_fma (|n| <= 29 only): r = x - n LN2_F32 in one rounding instead of Cody-Waite's two steps."""
    s = _fma(em, x, t.c(1.44269504088896341), t.c(shift), t)
    n = em(f"fsub {t.f} {s}, {t.c(shift)}")
    if one_fma:
        return _bits(em, s, t), _fma(em, n, t.c(-LN2_F32), x, t)
    r = _fma(em, n, t.c(-LN2_HI), x, t)                                    # exact
    return _bits(em, s, t), _fma(em, n, t.c(-LN2_LO), r, t)                # one rounding


def _expm1_r(em, r, t: Ty):
    """expm1(r) = r + r*r*P(r) for the reduced |r| <= ln2/2 (no cancellation: r carries the small part)."""
    rr = em(f"fmul {t.f} {r}, {r}")
    return _fma(em, rr, _estrin(em, r, rr, _EXP_P, t), r, t)


def exp_f32(em: Emitter, x: str, lo: float = -104.0, hi: float | None = 89.0, t: Ty = S) -> str:
    """expf, branch-free: n = round(x/ln2) and r by the SHIFT trick and Cody-Waite; 2^n applied in two
    factors (each a normal float), so results down in the subnormals come out of one last product.
    Clamping x to [-104, 89] (NaN kept) makes overflow (inf), underflow (0) and NaN fall out of the
    arithmetic. Callers that know x <= 0 pass hi=None: one compare fewer, and 2^n as 2^(n+64) 2^-64
    (one shift instead of four integer instructions); so does an x the emitted code shows is <= 0."""
    if hi is not None and nonpositive(em, x):
        hi = None
    xc = _max(em, x, lo, t)
    if hi is None:
        b, r = _reduce(em, xc, t, SHIFT_NEG)
        m = _expm1_r(em, r, t)
        s1 = _float(em, em(f"shl {t.i} {b}, {t.ic(23)}"), t)
        return em(f"fmul {t.f} {_fma(em, m, s1, s1, t)}, {t.c(2.0 ** -64)}")
    xc = _min(em, xc, hi, t)
    b, r = _reduce(em, xc, t, SHIFT_EXP)
    m = _expm1_r(em, r, t)
    bh = em(f"lshr {t.i} {b}, {t.ic(1)}")
    s1 = _float(em, em(f"shl {t.i} {bh}, {t.ic(23)}"), t)                             # 2^floor(n/2)
    s2 = _float(em, em(f"shl {t.i} {em(f'sub {t.i} {b}, {bh}')}, {t.ic(23)}"), t)     # 2^ceil(n/2)
    y = _fma(em, m, s1, s1, t)                  # (1 + m) 2^n1, exact scaling of a normal float
    return em(f"fmul {t.f} {y}, {s2}")


def _defining(em: Emitter, v: str) -> list[str] | None:
    """The tokens (commas dropped) of the instruction em emitted to define SSA value v, or None."""
    key = f"  {v} = "
    for ln in reversed(em.lines):
        if ln.startswith(key):
            return ln[len(key):].replace(",", " ").split()
    return None


def nonpositive(em: Emitter, v: str) -> bool:
    """Whether the float value v is <= 0 or NaN by the instructions that made it (straight-line code of
    this emitter): (-y)*y or y*(-y), -(y*y), -fabs(y), or y's bits with the sign bit set."""
    d = _defining(em, v)
    if not d:
        return False
    if d[0] == "fmul":
        a, b = d[-2], d[-1]
        for p, q in ((a, b), (b, a)):
            dp = _defining(em, p)
            if dp and dp[0] == "fneg" and dp[-1] == q:
                return True
    if d[0] == "fneg":
        dp = _defining(em, d[-1])
        return bool(dp) and ((dp[0] == "fmul" and dp[-2] == dp[-1]) or
                             (dp[0] == "call" and any(tok.startswith("@llvm.fabs.") for tok in dp)))
    if d[0] == "bitcast":
        dp = _defining(em, next((tok for tok in d if tok.startswith("%")), ""))
        return bool(dp) and dp[0] == "or" and any(tok.strip("()") == "-2147483648" for tok in dp)
    return False


def _half_expm1(em, x: str, lo: float, hi: float | None, t: Ty) -> str:
    """expm1(x) / 2 on x clamped to [lo, hi] (lo >= -40, hi <= 89; NaN kept): 2^n (1 + m) - 1 with
    m = expm1(r), computed as s m + (s - 1/2) with s = 2^(n-1), a normal float for every n the
    clamp allows (2^128 itself is not), and exact where n is 0 (x near 0: the result is m / 2).
    hi=None (x <= 0): SHIFT_NEG's bias (the constant exp and sigmoid use), and for lo >= -20 the
    one-FMA reduction."""
    xc = _max(em, x, lo, t)
    if hi is not None:
        xc = _min(em, xc, hi, t)
    neg = hi is None
    b, r = _reduce(em, xc, t, SHIFT_NEG if neg else SHIFT_EXP, one_fma=neg and lo >= ONE_FMA_REDUCTION_MIN)
    m = _expm1_r(em, r, t)
    e = em(f"sub {t.i} {b}, {t.ic(65 if neg else 128)}")      # n - 1 + 127 in the low 9 bits
    s = _float(em, em(f"shl {t.i} {e}, {t.ic(23)}"), t)
    return _fma(em, s, m, em(f"fsub {t.f} {s}, {t.c(0.5)}"), t)


_LOG_P = [7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1,
          -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1]


def log_f32(em: Emitter, x: str, t: Ty = S) -> str:
    """logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a degree-9 polynomial (Cephes);
    subnormal x scaled by 2^23 first; log(+inf) = inf, log(0) = -inf, negative or NaN -> NaN."""
    f, i = t.f, t.i
    sub = em(f"fcmp olt {f} {x}, {t.c(1.1754943508222875e-38)}")
    xs = _sel(em, sub, em(f"fmul {f} {x}, {t.c(8388608.0)}"), x, t)
    eadj = _sel(em, sub, t.ic(-23), t.ic(0), t, ity=True)
    bits = _bits(em, xs, t)
    e = em(f"and {i} {em(f'lshr {i} {bits}, {t.ic(23)}')}, {t.ic(255)}")
    e = em(f"add {i} {em(f'sub {i} {e}, {t.ic(126)}')}, {eadj}")
    mb = em(f"and {i} {bits}, {t.ic(-2139095041)}")   # 0x807fffff
    m = _float(em, em(f"or {i} {mb}, {t.ic(1056964608)}"), t)   # | 0x3f000000: m in [0.5, 1)
    small = em(f"fcmp olt {f} {m}, {t.c(0.707106781186547524)}")
    e = em(f"sub {i} {e}, {em(f'zext {t.b} {small} to {i}')}")
    m = _sel(em, small, em(f"fadd {f} {m}, {m}"), m, t)
    m = em(f"fsub {f} {m}, {t.c(1.0)}")
    z = em(f"fmul {f} {m}, {m}")
    y = _estrin(em, m, z, _LOG_P, t)
    y = em(f"fmul {f} {em(f'fmul {f} {y}, {m}')}, {z}")
    fe = em(f"sitofp {i} {e} to {f}")
    y = _fma(em, fe, t.c(-2.12194440e-4), y, t)
    y = _fma(em, z, t.c(-0.5), y, t)
    r = em(f"fadd {f} {m}, {y}")
    r = _fma(em, fe, t.c(0.693359375), r, t)
    r = _sel(em, em(f"fcmp oeq {f} {x}, {t.c(float('inf'))}"), x, r, t)
    r = _sel(em, em(f"fcmp oeq {f} {x}, {t.c(0.0)}"), t.c(float("-inf")), r, t)
    neg = em(f"fcmp ult {f} {x}, {t.c(0.0)}")        # negative or NaN -> NaN
    return _sel(em, neg, t.c(float("nan")), r, t)


def log1p_f32(em: Emitter, x: str, t: Ty = S) -> str:
    """log1p via u = 1 + x: log(u) * x / (u - 1) (exact correction; x where u == 1)."""
    f = t.f
    u = em(f"fadd {f} {x}, {t.c(1.0)}")
    lu = log_f32(em, u, t)
    q = em(f"fdiv {f} {x}, {em(f'fsub {f} {u}, {t.c(1.0)}')}")
    r = em(f"fmul {f} {lu}, {q}")
    r = _sel(em, em(f"fcmp oeq {f} {u}, {t.c(1.0)}"), x, r, t)
    return _sel(em, em(f"fcmp oeq {f} {x}, {t.c(float('inf'))}"), x, r, t)


def expm1_f32(em: Emitter, x: str, t: Ty = S) -> str:
    """expm1f: one reduction and polynomial (see _half_expm1); -1 below -25 (expm1 is -1 in float32
    below about -17.3), inf above 88.72; -0.0 kept."""
    r = em(f"fmul {t.f} {_half_expm1(em, x, -25.0, 89.0, t)}, {t.c(2.0)}")
    return _sel(em, em(f"fcmp oeq {t.f} {x}, {t.c(0.0)}"), x, r, t)


def tanh_f32(em: Emitter, x: str, t: Ty = S) -> str:
    """tanhf with one exponential and one division: with h = expm1(-2|x|) / 2 (accurate near 0, so no
    separate small-x polynomial), tanh|x| = -2h / (2 + 2h) = h / (-1 - h), its sign bit cleared (h = +0
    gives -0) and x's put in. |x| > 10 gives 1 (tanh is 1 in float32 beyond 9.01); NaN propagates."""
    xb = _bits(em, x, t)
    nb = _float(em, em(f"or {t.i} {xb}, {t.ic(-0x80000000)}"), t)         # -|x|
    h = _half_expm1(em, em(f"fadd {t.f} {nb}, {nb}"), -20.0, None, t)
    q = _bits(em, em(f"fdiv {t.f} {h}, {em(f'fsub {t.f} {t.c(-1.0)}, {h}')}"), t)
    q = em(f"and {t.i} {q}, {t.ic(0x7FFFFFFF)}")
    return _float(em, em(f"or {t.i} {q}, {em(f'and {t.i} {xb}, {t.ic(-0x80000000)}')}"), t)


def sigmoid_f32(em: Emitter, x: str, t: Ty = S) -> str:
    """1/(1+e^-x) as e = exp(-|x|): (x >= 0 ? 1 : e) / (1+e), one division rounded once (no overflow;
    NaN propagates through e). Numerator and denominator are both scaled by 2^64: e 2^64 is exp's
    2^(n+64) (1 + m) before its last product (a normal float even where e is subnormal: one rounding
    fewer there). The choice reads x's sign bit (a blend on it: no compare; -0 picks e = 1, the same)."""
    f = t.f
    xb = _bits(em, x, t)
    nb = _float(em, em(f"or {t.i} {xb}, {t.ic(-0x80000000)}"), t)   # -|x|
    b, r = _reduce(em, _max(em, nb, -104.0, t), t, SHIFT_NEG)
    s1 = _float(em, em(f"shl {t.i} {b}, {t.ic(23)}"), t)
    e = _fma(em, _expm1_r(em, r, t), s1, s1, t)                       # e^-|x| 2^64
    big = t.c(2.0 ** 64)
    num = _sel(em, em(f"icmp slt {t.i} {xb}, {t.ic(0)}"), e, big, t)
    return em(f"fdiv {f} {num}, {em(f'fadd {f} {e}, {big}')}")


_ERF_T = [7.853861353153693E-5, -8.010193625184903E-4, 5.188327685732524E-3, -2.685381193529856E-2,
          1.128358514861418E-1, -3.761262582423300E-1, 1.128379165726710E+0]
_ERFC_P = [2.326819970068386E-2, -1.387039388740657E-1, 3.687424674597105E-1, -5.824733027278666E-1,
           6.210004621745983E-1, -4.944515323274145E-1, 3.404879937665872E-1, -2.741127028184656E-1,
           5.638259427386472E-1]
_ERFC_R = [-1.047766399936249E+1, 1.297719955372516E+1, -7.495518717768503E+0, 2.921019019210786E+0,
           -1.015265279202700E+0, 4.218463358204948E-1, -2.820767439740514E-1, 5.641895067754075E-1]


def erf_f32(em: Emitter, x: str, t: Ty = S) -> str:
    """erff (Cephes ndtrf): x*T(x^2) for |x| <= 1, else sign(x)(1 - exp(-x^2)/|x| * P|R(1/x^2))."""
    f = t.f
    ax = fabs(em, x, t)
    z = em(f"fmul {f} {x}, {x}")
    small = em(f"fmul {f} {x}, {_poly(em, z, _ERF_T, t)}")
    axc = _max(em, _min(em, ax, 10.0, t), 1.0, t)
    ez = exp_f32(em, em(f"fneg {f} {em(f'fmul {f} {axc}, {axc}')}"), hi=None, t=t)
    q = em(f"fdiv {f} {t.c(1.0)}, {axc}")
    y = em(f"fmul {f} {q}, {q}")
    yy = em(f"fmul {f} {y}, {y}")
    p = _sel(em, em(f"fcmp olt {f} {axc}, {t.c(2.0)}"), _estrin(em, y, yy, _ERFC_P, t),
             _estrin(em, y, yy, _ERFC_R, t), t)
    erfc = em(f"fmul {f} {em(f'fmul {f} {ez}, {q}')}, {p}")
    big = copysign(em, em(f"fsub {f} {t.c(1.0)}, {erfc}"), x, t)
    return _sel(em, em(f"fcmp ogt {f} {ax}, {t.c(1.0)}"), big, small, t)


F32 = {"exp": exp_f32, "log": log_f32, "log1p": log1p_f32, "expm1": expm1_f32, "tanh": tanh_f32,
       "sigmoid": sigmoid_f32, "erf": erf_f32}

#: libm names for functions computed by scalar calls: float32 / float64
LIBM = {"exp": ("expf", "exp"), "log": ("logf", "log"), "log1p": ("log1pf", "log1p"),
        "expm1": ("expm1f", "expm1"), "tanh": ("tanhf", "tanh"), "erf": ("erff", "erf"),
        "sin": ("sinf", "sin"), "cos": ("cosf", "cos"), "atan": ("atanf", "atan"), "pow": ("powf", "pow"),
        "tan": ("tanf", "tan"), "asin": ("asinf", "asin"), "acos": ("acosf", "acos"), "sinh": ("sinhf", "sinh"),
        "cosh": ("coshf", "cosh"), "asinh": ("asinhf", "asinh"), "acosh": ("acoshf", "acosh"),
        "atanh": ("atanhf", "atanh")}

DECLARATIONS = """
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.minnum.f32(float, float)
declare float @llvm.roundeven.f32(float)
declare double @llvm.roundeven.f64(double)
declare float @llvm.ceil.f32(float)
declare double @llvm.ceil.f64(double)
declare float @llvm.trunc.f32(float)
declare double @llvm.trunc.f64(double)
declare double @llvm.copysign.f64(double, double)
declare float @llvm.fabs.f32(float)
declare double @llvm.fabs.f64(double)
declare float @llvm.copysign.f32(float, float)
declare float @llvm.floor.f32(float)
declare double @llvm.floor.f64(double)
declare float @llvm.sqrt.f32(float)
declare double @llvm.sqrt.f64(double)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
""" + "".join(f"declare float @{f}(float{', float' if k == 'pow' else ''}) nounwind\n"
              f"declare double @{d}(double{', double' if k == 'pow' else ''}) nounwind\n"
              for k, (f, d) in LIBM.items())
