"""Vectorisable float32 transcendentals emitted inline (Cephes-style range reduction + polynomial).

LLVM turns its `llvm.exp`/`llvm.tanh` intrinsics into one scalar libm call per vector lane, so these
are written with plain arithmetic, selects and bit casts that the loop vectoriser widens to AVX-512.
float64 uses libm (correct to the last ulp, scalar). Each function takes an Emitter and an SSA value.
"""
from __future__ import annotations

from .irtext import Emitter, fconst

F = "float"


def c(v) -> str:
    return fconst(v, "float32")


def _poly(em: Emitter, x: str, coeffs) -> str:
    """Horner: coeffs[0]*x^(n-1) + ... + coeffs[-1]; each step may fuse into one FMA (`contract`:
    fewer instructions and one rounding instead of two)."""
    acc = c(coeffs[0])
    for k in coeffs[1:]:
        acc = em(f"fmul contract {F} {acc}, {x}")
        acc = em(f"fadd contract {F} {acc}, {c(k)}")
    return acc


def _sel(em, cond, a, b, ty=F):
    return em(f"select i1 {cond}, {ty} {a}, {ty} {b}")


def _pow2i(em, n: str) -> str:
    """2**n as a float for an i32 n in [-126, 127]."""
    e = em(f"add i32 {n}, 127")
    s = em(f"shl i32 {e}, 23")
    return em(f"bitcast i32 {s} to float")


def exp_f32(em: Emitter, x: str) -> str:
    """expf: n = round(x/ln2), r = x - n ln2 (two-part), 2^n applied in two halves (subnormals)."""
    xc = em(f"call float @llvm.maxnum.f32(float {x}, float {c(-104.0)})")
    xc = em(f"call float @llvm.minnum.f32(float {xc}, float {c(89.0)})")
    t = em(f"fmul float {xc}, {c(1.44269504088896341)}")
    n = em(f"call float @llvm.roundeven.f32(float {t})")
    r = em(f"fmul float {n}, {c(-0.693359375)}")
    r = em(f"fadd float {xc}, {r}")
    r2 = em(f"fmul float {n}, {c(2.12194440e-4)}")
    r = em(f"fadd float {r}, {r2}")
    p = _poly(em, r, [1.9875691500E-4, 1.3981999507E-3, 8.3334519073E-3, 4.1665795894E-2,
                      1.6666665459E-1, 5.0000001201E-1])
    rr = em(f"fmul float {r}, {r}")
    p = em(f"fmul contract float {p}, {rr}")
    p = em(f"fadd contract float {p}, {r}")
    p = em(f"fadd float {p}, {c(1.0)}")
    ni = em(f"fptosi float {n} to i32")
    n1 = em(f"ashr i32 {ni}, 1")
    n2 = em(f"sub i32 {ni}, {n1}")
    y = em(f"fmul float {p}, {_pow2i(em, n1)}")
    y = em(f"fmul float {y}, {_pow2i(em, n2)}")
    over = em(f"fcmp ogt float {x}, {c(88.72283935546875)}")
    y = _sel(em, over, "0x7FF0000000000000", y)
    under = em(f"fcmp olt float {x}, {c(-103.97208)}")
    y = _sel(em, under, c(0.0), y)
    nan = em(f"fcmp uno float {x}, 0.0")
    return _sel(em, nan, x, y)


def log_f32(em: Emitter, x: str) -> str:
    """logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a degree-9 polynomial."""
    sub = em(f"fcmp olt float {x}, {c(1.1754943508222875e-38)}")
    xs = em(f"fmul float {x}, {c(8388608.0)}")
    xs = _sel(em, sub, xs, x)
    eadj = _sel(em, sub, "-23", "0", "i32")
    bits = em(f"bitcast float {xs} to i32")
    e = em(f"lshr i32 {bits}, 23")
    e = em(f"and i32 {e}, 255")
    e = em(f"sub i32 {e}, 126")
    e = em(f"add i32 {e}, {eadj}")
    mb = em(f"and i32 {bits}, -2139095041")   # 0x807fffff
    mb = em(f"or i32 {mb}, 1056964608")       # 0x3f000000
    m = em(f"bitcast i32 {mb} to float")
    small = em(f"fcmp olt float {m}, {c(0.707106781186547524)}")
    e = em(f"sub i32 {e}, {em(f'zext i1 {small} to i32')}")
    m2 = em(f"fadd float {m}, {m}")
    m = _sel(em, small, m2, m)
    m = em(f"fsub float {m}, {c(1.0)}")
    z = em(f"fmul float {m}, {m}")
    y = _poly(em, m, [7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1,
                      1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1,
                      3.3333331174E-1])
    y = em(f"fmul float {y}, {m}")
    y = em(f"fmul float {y}, {z}")
    fe = em(f"sitofp i32 {e} to float")
    y = em(f"fadd float {y}, {em(f'fmul float {fe}, {c(-2.12194440e-4)}')}")
    y = em(f"fsub float {y}, {em(f'fmul float {z}, {c(0.5)}')}")
    r = em(f"fadd float {m}, {y}")
    r = em(f"fadd float {r}, {em(f'fmul float {fe}, {c(0.693359375)}')}")
    inf = em(f"fcmp oeq float {x}, 0x7FF0000000000000")
    r = _sel(em, inf, x, r)
    zero = em(f"fcmp oeq float {x}, 0.0")
    r = _sel(em, zero, "0xFFF0000000000000", r)
    neg = em(f"fcmp ult float {x}, 0.0")        # negative or NaN -> NaN
    return _sel(em, neg, "0x7FF8000000000000", r)


def log1p_f32(em: Emitter, x: str) -> str:
    """log1p via u = 1 + x: log(u) * x / (u - 1) (exact correction; x where u == 1)."""
    u = em(f"fadd float {x}, {c(1.0)}")
    lu = log_f32(em, u)
    d = em(f"fsub float {u}, {c(1.0)}")
    q = em(f"fdiv float {x}, {d}")
    r = em(f"fmul float {lu}, {q}")
    one = em(f"fcmp oeq float {u}, {c(1.0)}")
    r = _sel(em, one, x, r)
    inf = em(f"fcmp oeq float {x}, 0x7FF0000000000000")
    return _sel(em, inf, x, r)


def expm1_f32(em: Emitter, x: str) -> str:
    """expm1 (Kahan): u = exp(x); (u - 1) * x / log(u), x where u == 1, -1 where u - 1 == -1."""
    u = exp_f32(em, x)
    d = em(f"fsub float {u}, {c(1.0)}")
    lu = log_f32(em, u)
    q = em(f"fdiv float {x}, {lu}")
    r = em(f"fmul float {d}, {q}")
    one = em(f"fcmp oeq float {u}, {c(1.0)}")
    r = _sel(em, one, x, r)
    m1 = em(f"fcmp oeq float {d}, {c(-1.0)}")
    r = _sel(em, m1, c(-1.0), r)
    big = em(f"fcmp ogt float {x}, {c(88.0)}")
    return _sel(em, big, u, r)


def tanh_f32(em: Emitter, x: str) -> str:
    """tanhf: odd polynomial for |x| < 0.625, else 1 - 2/(exp(2|x|) + 1) with x's sign."""
    ax = em(f"call float @llvm.fabs.f32(float {x})")
    z = em(f"fmul float {x}, {x}")
    p = _poly(em, z, [-5.70498872745E-3, 2.06390887954E-2, -5.37397155531E-2, 1.33314422036E-1,
                      -3.33332819422E-1])
    p = em(f"fmul float {p}, {z}")
    p = em(f"fmul float {p}, {x}")
    small = em(f"fadd float {p}, {x}")
    a2 = em(f"fmul float {ax}, {c(2.0)}")
    ex = exp_f32(em, a2)
    d = em(f"fadd float {ex}, {c(1.0)}")
    q = em(f"fdiv float {c(2.0)}, {d}")
    big = em(f"fsub float {c(1.0)}, {q}")
    big = em(f"call float @llvm.copysign.f32(float {big}, float {x})")
    isbig = em(f"fcmp ogt float {ax}, {c(0.625)}")
    return _sel(em, isbig, big, small)


def sigmoid_f32(em: Emitter, x: str) -> str:
    """1/(1+e^-x) as e = exp(-|x|): 1/(1+e) for x >= 0 else e/(1+e) (no overflow)."""
    ax = em(f"call float @llvm.fabs.f32(float {x})")
    nx = em(f"fneg float {ax}")
    e = exp_f32(em, nx)
    d = em(f"fadd float {e}, {c(1.0)}")
    r = em(f"fdiv float {c(1.0)}, {d}")
    rn = em(f"fmul float {e}, {r}")          # e/(1+e) with the one division
    pos = em(f"fcmp oge float {x}, 0.0")
    r = _sel(em, pos, r, rn)
    nan = em(f"fcmp uno float {x}, 0.0")
    return _sel(em, nan, x, r)


_ERF_T = [7.853861353153693E-5, -8.010193625184903E-4, 5.188327685732524E-3, -2.685381193529856E-2,
          1.128358514861418E-1, -3.761262582423300E-1, 1.128379165726710E+0]
_ERFC_P = [2.326819970068386E-2, -1.387039388740657E-1, 3.687424674597105E-1, -5.824733027278666E-1,
           6.210004621745983E-1, -4.944515323274145E-1, 3.404879937665872E-1, -2.741127028184656E-1,
           5.638259427386472E-1]
_ERFC_R = [-1.047766399936249E+1, 1.297719955372516E+1, -7.495518717768503E+0, 2.921019019210786E+0,
           -1.015265279202700E+0, 4.218463358204948E-1, -2.820767439740514E-1, 5.641895067754075E-1]


def erf_f32(em: Emitter, x: str) -> str:
    """erff (Cephes ndtrf): x*T(x^2) for |x| <= 1, else sign(x)(1 - exp(-x^2)/|x| * P|R(1/x^2))."""
    ax = em(f"call float @llvm.fabs.f32(float {x})")
    z = em(f"fmul float {x}, {x}")
    small = em(f"fmul float {x}, {_poly(em, z, _ERF_T)}")
    axc = em(f"call float @llvm.minnum.f32(float {ax}, float {c(10.0)})")
    axc = em(f"call float @llvm.maxnum.f32(float {axc}, float {c(1.0)})")
    nz = em(f"fmul float {axc}, {axc}")
    nz = em(f"fneg float {nz}")
    ez = exp_f32(em, nz)
    q = em(f"fdiv float {c(1.0)}, {axc}")
    y = em(f"fmul float {q}, {q}")
    pp = _poly(em, y, _ERFC_P)
    pr = _poly(em, y, _ERFC_R)
    lt2 = em(f"fcmp olt float {axc}, {c(2.0)}")
    p = _sel(em, lt2, pp, pr)
    erfc = em(f"fmul float {ez}, {q}")
    erfc = em(f"fmul float {erfc}, {p}")
    big = em(f"fsub float {c(1.0)}, {erfc}")
    big = em(f"call float @llvm.copysign.f32(float {big}, float {x})")
    isbig = em(f"fcmp ogt float {ax}, {c(1.0)}")
    return _sel(em, isbig, big, small)


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
