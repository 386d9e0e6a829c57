"""Scalar lowering table (`CODE_FOR_OP`): elementwise op object -> IR for one element.

Values are SSA names in register types (irtext.VTYPE); inputs are first converted to the op's
computation dtype (the output dtype, or the promoted input dtype for comparisons), as NumPy does.
"""
from __future__ import annotations

from graphc import dtypes as _dt
from graphc.backends.schedule.plan import NotLowerable  # noqa: F401  (the shared schedule's: node -> host)
from graphc.ops import elementwise as E
from graphc.ops.core import Cast

from . import mathlib
from .irtext import VTYPE, Emitter, literal


def _signed(d: str) -> bool:
    return d in _dt.SIGNED


def _bf16_round_bits(em: Emitter, v: str) -> str:
    """The float's bits (i32) rounded to bfloat16 (round to nearest even, low 16 bits zero); NaN becomes
    the quiet NaN 0x7FC0 with its sign (as ml_dtypes does)."""
    b = em(f"bitcast float {v} to i32")
    lsb = em(f"and i32 {em(f'lshr i32 {b}, 16')}, 1")
    bias = em(f"add i32 {lsb}, 32767")
    r = em(f"and i32 {em(f'add i32 {b}, {bias}')}, -65536")
    nan = em(f"or i32 {em(f'and i32 {b}, -2147483648')}, 2143289344")
    return em(f"select i1 {em(f'fcmp uno float {v}, {v}')}, i32 {nan}, i32 {r}")


def bf16_bits(em: Emitter, v: str) -> str:
    """A float register value as its bfloat16 storage (i16)."""
    return em(f"trunc i32 {em(f'lshr i32 {_bf16_round_bits(em, v)}, 16')} to i16")


def bf16_value(em: Emitter, h: str) -> str:
    """bfloat16 storage (i16) as a float register value (exact: the high half of a float)."""
    w = em(f"zext i16 {h} to i32")
    return em(f"bitcast i32 {em(f'shl i32 {w}, 16')} to float")


def round_half(em: Emitter, v: str, d: str) -> str:
    """A float register value rounded to float16/bfloat16 `d` and held as a float again (F16C
    vcvtps2ph/vcvtph2ps for float16, integer rounding for bfloat16); other dtypes unchanged."""
    if d == "float16":
        return em(f"fpext half {em(f'fptrunc float {v} to half')} to float")
    if d == "bfloat16":
        return em(f"bitcast i32 {_bf16_round_bits(em, v)} to float")
    return v


def _f64_to_odd_f32(em: Emitter, v: str) -> str:
    """double -> float rounded to odd (truncate, then set the last bit if inexact): rounding that float
    to float16/bfloat16 is then the correctly rounded double -> half conversion (no double rounding)."""
    t = em(f"fptrunc double {v} to float")
    back = em(f"fpext float {t} to double")
    ab = em(f"call double @llvm.fabs.f64(double {back})")
    av = em(f"call double @llvm.fabs.f64(double {v})")
    over = em(f"zext i1 {em(f'fcmp ogt double {ab}, {av}')} to i32")
    bits = em(f"sub i32 {em(f'bitcast float {t} to i32')}, {over}")
    sticky = em(f"zext i1 {em(f'fcmp one double {back}, {v}')} to i32")
    return em(f"bitcast i32 {em(f'or i32 {bits}, {sticky}')} to float")


def convert(em: Emitter, v: str, src: str, dst: str) -> str:
    """NumPy astype semantics between register types (float16/bfloat16 values live in float registers,
    rounded to their dtype; conversions to them round once, correctly, as NumPy and ml_dtypes do)."""
    if src == dst:
        return v
    s, d = VTYPE[src], VTYPE[dst]
    if dst == "bool":
        if _dt.is_float(src):
            return em(f"fcmp une {s} {v}, {literal(0, src)}")
        return em(f"icmp ne {s} {v}, 0")
    if src == "bool":
        return em(f"uitofp i1 {v} to {d}") if _dt.is_float(dst) else em(f"zext i1 {v} to {d}")
    if _dt.is_float(src) and _dt.is_float(dst):
        if dst == "float64":
            return em(f"fpext float {v} to double")
        if src == "float64":
            return round_half(em, _f64_to_odd_f32(em, v), dst) if _dt.is_half(dst) else \
                em(f"fptrunc double {v} to float")
        return round_half(em, v, dst)       # between float registers: float32/float16/bfloat16
    if _dt.is_float(dst):
        inst = "sitofp" if _signed(src) else "uitofp"
        if _dt.is_half(dst):   # via double (exact below 2**53), then one correct rounding
            return round_half(em, _f64_to_odd_f32(em, em(f"{inst} {s} {v} to double")), dst)
        return em(f"{inst} {s} {v} to {d}")
    if _dt.is_float(src):
        # C casts as NumPy compiles them on x86: narrow targets through a wider signed conversion, wrapping
        if dst == "uint64":
            return em(f"fptoui {s} {v} to i64")
        if dst in ("int32", "int64"):
            return em(f"fptosi {s} {v} to {d}")
        wide = "i64" if dst == "uint32" else "i32"
        return em(f"trunc {wide} {em(f'fptosi {s} {v} to {wide}')} to {d}")
    bs, bd = _dt.itemsize(src), _dt.itemsize(dst)
    if bs == bd:
        return v
    if bd < bs:
        return em(f"trunc {s} {v} to {d}")
    return em(f"{'sext' if _signed(src) else 'zext'} {s} {v} to {d}")


def _fbin(inst):
    return lambda em, t, a, b: em(f"{inst} {VTYPE[t]} {a}, {b}")


def _ibin(inst):
    return lambda em, t, a, b: em(f"{inst} {VTYPE[t]} {a}, {b}")


def _select(em, t, c, a, b):
    return em(f"select i1 {c}, {VTYPE[t]} {a}, {VTYPE[t]} {b}")


def _fmaxmin(pred):
    def f(em, t, a, b):  # NaN in either operand propagates (np.maximum / np.minimum)
        ty = VTYPE[t]
        m = _select(em, t, em(f"fcmp {pred} {ty} {a}, {b}"), a, b)
        return _select(em, t, em(f"fcmp uno {ty} {a}, {a}"), a, m)
    return f


def int_pred(pred: str, t: str) -> str:
    """An icmp predicate for integer dtype t: the signed one (slt, sge, ...) becomes unsigned (ult, uge)
    for unsigned dtypes."""
    return "u" + pred[1:] if pred[0] == "s" and _dt.is_unsigned(t) else pred


def _imaxmin(pred):
    return lambda em, t, a, b: _select(em, t, em(f"icmp {int_pred(pred, t)} {VTYPE[t]} {a}, {b}"), a, b)


def _call(em, t, name, *args):
    ty = VTYPE[t]
    return em(f"call {ty} @{name}({', '.join(f'{ty} {a}' for a in args)})")


def _transcendental(fn: str):
    """The math function `fn` (a libm name): inline vector code for float32 where mathlib has it."""
    f32, (libf, libd) = mathlib.F32.get(fn), mathlib.LIBM[fn]

    def f(em, t, x):
        if t == "float32" and f32 is not None:
            return f32(em, x)
        return _call(em, t, libf if t == "float32" else libd, x)
    return f


def _sigmoid(em, t, x):
    if t == "float32":
        return mathlib.sigmoid_f32(em, x)
    ty = VTYPE[t]
    e = _call(em, t, "exp", em(f"fneg {ty} {_call(em, t, 'llvm.fabs.f64', x)}"))
    d = em(f"fadd {ty} {e}, 1.0")
    pos = em(f"fcmp oge {ty} {x}, 0.0")
    return _select(em, t, pos, em(f"fdiv {ty} 1.0, {d}"), em(f"fdiv {ty} {e}, {d}"))


def _softplus(em, t, x):
    """logaddexp(0, x) = max(x, 0) + log1p(exp(-|x|))."""
    ty, sfx = VTYPE[t], ("f32" if t == "float32" else "f64")
    ax = em(f"call {ty} @llvm.fabs.{sfx}({ty} {x})")
    e = _transcendental("exp")(em, t, em(f"fneg {ty} {ax}"))
    l1 = _transcendental("log1p")(em, t, e)
    m = _fmaxmin("ogt")(em, t, x, literal(0.0, t))
    return em(f"fadd {ty} {m}, {l1}")


def _fabs(em, t, x):
    if _dt.is_float(t):
        return em(f"call {VTYPE[t]} @llvm.fabs.{'f32' if t == 'float32' else 'f64'}({VTYPE[t]} {x})")
    if _dt.is_unsigned(t):
        return x
    neg = em(f"sub {VTYPE[t]} 0, {x}")
    return _select(em, t, em(f"icmp slt {VTYPE[t]} {x}, 0"), neg, x)


def _sign(em, t, x):
    ty, z = VTYPE[t], literal(0, t)
    one, m1 = literal(1, t), literal(-1, t)
    if _dt.is_float(t):
        r = _select(em, t, em(f"fcmp olt {ty} {x}, {z}"), m1, x)   # NaN and 0 pass through
        return _select(em, t, em(f"fcmp ogt {ty} {x}, {z}"), one, r)
    if _dt.is_unsigned(t):
        return _select(em, t, em(f"icmp ne {ty} {x}, 0"), one, z)
    r = _select(em, t, em(f"icmp slt {ty} {x}, 0"), m1, z)
    return _select(em, t, em(f"icmp sgt {ty} {x}, 0"), one, r)


def _floor(em, t, x):
    if not _dt.is_float(t):
        return x
    return em(f"call {VTYPE[t]} @llvm.floor.{'f32' if t == 'float32' else 'f64'}({VTYPE[t]} {x})")


def _sqrt(em, t, x):
    return em(f"call {VTYPE[t]} @llvm.sqrt.{'f32' if t == 'float32' else 'f64'}({VTYPE[t]} {x})")


def _relu(em, t, x):
    if _dt.is_unsigned(t):
        return x
    ty, z = VTYPE[t], literal(0, t)
    neg = em(f"fcmp olt {ty} {x}, {z}") if _dt.is_float(t) else em(f"icmp slt {ty} {x}, 0")
    return _select(em, t, neg, z, x)


def _leaky(em, t, x, alpha):
    ty = VTYPE[t]
    ax = em(f"fmul {ty} {x}, {literal(alpha, t)}")
    return _select(em, t, em(f"fcmp oge {ty} {x}, {literal(0, t)}"), x, ax)


def _neg(em, t, x):
    return em(f"fneg {VTYPE[t]} {x}") if _dt.is_float(t) else em(f"sub {VTYPE[t]} 0, {x}")


def _cmp(fpred, ipred):
    def f(em, t, a, b):
        ty = VTYPE[t]
        if _dt.is_float(t):
            return em(f"fcmp {fpred} {ty} {a}, {b}")
        return em(f"icmp {int_pred(ipred, t)} {ty} {a}, {b}")
    return f


# ---- row builders: a row is emit(em, attrs, args: [(ssa, dtype)], out dtype) -> ssa ----------------

def arith(fimpl, iimpl=None, float_only: bool = False):
    """A row computing in the output dtype (inputs converted as NumPy does): fimpl(em, t, *values) for
    floats, iimpl for integers (None: not lowered for integers); never for a bool output."""
    iimpl = None if float_only else (fimpl if iimpl is None else iimpl)

    def row(em, attrs, args, out):
        impl = fimpl if _dt.is_float(out) else iimpl
        if out == "bool" or impl is None:
            raise NotLowerable(f"on {out}")
        # float16/bfloat16: computed in float32 registers, the result rounded to the dtype
        return round_half(em, impl(em, _dt.compute_dtype(out), *[convert(em, v, d, out) for v, d in args]), out)
    return row


def compare(fpred, ipred):
    """A comparison in the promoted input dtype (bools compared as int32), producing i1."""
    impl = _cmp(fpred, ipred)

    def row(em, attrs, args, out):
        t = _dt.promote(*[d for _, d in args])
        t = "int32" if t == "bool" else t
        (a, da), (b, db) = args
        if _dt.is_float(t) and _dt.is_int(da) and _dt.is_int(db):
            return _mixed_sign_compare(em, fpred, ipred, a, da, b, db)
        return impl(em, _dt.compute_dtype(t), *[convert(em, v, d, t) for v, d in args])
    return row


def _mixed_sign_compare(em, fpred, ipred, a, da, b, db):
    """int64 against uint64 (whose promotion is float64): compared exactly, as NumPy 2 does. A negative
    signed value is below every unsigned one; otherwise both compare as unsigned 64-bit integers."""
    a = convert(em, a, da, "int64" if _signed(da) else "uint64")
    b = convert(em, b, db, "int64" if _signed(db) else "uint64")
    uns = em(f"icmp {int_pred(ipred, 'uint64')} i64 {a}, {b}")
    neg, when_neg = (a, ipred in ("slt", "sle", "ne")) if _signed(da) else (b, ipred in ("sgt", "sge", "ne"))
    is_neg = em(f"icmp slt i64 {neg}, 0")
    return em(f"select i1 {is_neg}, i1 {'true' if when_neg else 'false'}, i1 {uns}")


def logical(inst):
    def row(em, attrs, args, out):
        a, b = (convert(em, v, d, "bool") for v, d in args)
        return em(f"{inst} i1 {a}, {b}")
    return row


def _where_row(em, attrs, args, out):
    c = convert(em, *args[0], "bool")
    a, b = (convert(em, v, d, out) for v, d in args[1:])
    return _select(em, out, c, a, b)


def _cast_row(em, attrs, args, out):
    return convert(em, *args[0], out)


def _leaky_row(em, attrs, args, out):
    if not _dt.is_float(out):
        raise NotLowerable(f"on {out}")
    return round_half(em, _leaky(em, _dt.compute_dtype(out), convert(em, *args[0], out), attrs["alpha"]), out)


def _fbin_int(finst, iinst):
    return _fbin(finst), _ibin(iinst)


def _pow(em, t, a, b):
    return _call(em, t, mathlib.LIBM["pow"][0 if t == "float32" else 1], a, b)


def _rsqrt(em, t, x):
    return em(f"fdiv {VTYPE[t]} {literal(1.0, t)}, {_sqrt(em, t, x)}")


def _fround(intrinsic: str):
    """floor/ceil/trunc/roundeven: an LLVM intrinsic on floats, the identity on integers."""
    def f(em, t, x):
        if not _dt.is_float(t):
            return x
        return em(f"call {VTYPE[t]} @llvm.{intrinsic}.{'f32' if t == 'float32' else 'f64'}({VTYPE[t]} {x})")
    return f


def _safe_divisor(em, t, b):
    """(b', bad): b' is b, or 1 where b == 0 or (signed) b == -1, so sdiv/srem never trap (LLVM: undefined
    on 0 and on MIN / -1); the callers fix those lanes up as NumPy defines them."""
    ty = VTYPE[t]
    bad = em(f"icmp eq {ty} {b}, 0")
    if _signed(t):
        bad = em(f"or i1 {bad}, {em(f'icmp eq {ty} {b}, -1')}")
    return _select(em, t, bad, literal(1, t), b), bad


def _wrong_sign(em, ty, r, b):
    """i1: the truncated remainder r is nonzero and its sign differs from the divisor's (floored fix-up)."""
    differ = em(f"xor i1 {em(f'icmp slt {ty} {r}, 0')}, {em(f'icmp slt {ty} {b}, 0')}")
    return em(f"and i1 {em(f'icmp ne {ty} {r}, 0')}, {differ}")


def _imod(floored: bool):
    """Integer np.remainder (floored: the divisor's sign) or np.fmod (truncated); x % 0 and x % -1 are 0."""
    def f(em, t, a, b):
        ty = VTYPE[t]
        bs, _ = _safe_divisor(em, t, b)
        r = em(f"{'srem' if _signed(t) else 'urem'} {ty} {a}, {bs}")
        if not (floored and _signed(t)):
            return r
        return _select(em, t, _wrong_sign(em, ty, r, b), em(f"add {ty} {r}, {b}"), r)
    return f


def _ifloordiv(em, t, a, b):
    """Integer np.floor_divide: x // 0 is 0, x // -1 is -x (wrapping), else the floored quotient."""
    ty = VTYPE[t]
    bs, _ = _safe_divisor(em, t, b)
    if not _signed(t):
        return _select(em, t, em(f"icmp eq {ty} {b}, 0"), literal(0, t), em(f"udiv {ty} {a}, {bs}"))
    q, r = em(f"sdiv {ty} {a}, {bs}"), em(f"srem {ty} {a}, {bs}")
    q = _select(em, t, _wrong_sign(em, ty, r, b), em(f"sub {ty} {q}, 1"), q)
    q = _select(em, t, em(f"icmp eq {ty} {b}, -1"), em(f"sub {ty} 0, {a}"), q)
    return _select(em, t, em(f"icmp eq {ty} {b}, 0"), literal(0, t), q)


def _copysign0(em, t, like):
    """+0.0 or -0.0 with the sign of `like`."""
    ty, sfx = VTYPE[t], ("f32" if t == "float32" else "f64")
    return em(f"call {ty} @llvm.copysign.{sfx}({ty} {literal(0.0, t)}, {ty} {like})")


def _fmod_floored(em, t, a, b):
    """np.remainder on floats (NumPy's npy_remainder): fmod, moved into the divisor's sign; a zero result
    takes the divisor's sign; x % 0 is NaN."""
    ty = VTYPE[t]
    m = em(f"frem {ty} {a}, {b}")
    z = literal(0, t)
    wrong = em(f"xor i1 {em(f'fcmp olt {ty} {b}, {z}')}, {em(f'fcmp olt {ty} {m}, {z}')}")
    moved = _select(em, t, wrong, em(f"fadd {ty} {m}, {b}"), m)
    r = _select(em, t, em(f"fcmp une {ty} {m}, {z}"), moved, _copysign0(em, t, b))
    return _select(em, t, em(f"fcmp oeq {ty} {b}, {z}"), m, r)


def _ffloordiv(em, t, a, b):
    """np.floor_divide on floats (NumPy's npy_floor_divide / npy_divmod): (a - fmod(a, b)) / b, one less
    where fmod has the wrong sign, snapped to the nearest integer; a / b where b == 0."""
    ty, z = VTYPE[t], literal(0, t)
    m = em(f"frem {ty} {a}, {b}")
    div = em(f"fdiv {ty} {em(f'fsub {ty} {a}, {m}')}, {b}")
    differ = em(f"xor i1 {em(f'fcmp olt {ty} {b}, {z}')}, {em(f'fcmp olt {ty} {m}, {z}')}")
    wrong = em(f"and i1 {em(f'fcmp une {ty} {m}, {z}')}, {differ}")
    div = _select(em, t, wrong, em(f"fsub {ty} {div}, {literal(1.0, t)}"), div)
    fl = _fround("floor")(em, t, div)
    up = em(f"fcmp ogt {ty} {em(f'fsub {ty} {div}, {fl}')}, {literal(0.5, t)}")
    fl = _select(em, t, up, em(f"fadd {ty} {fl}, {literal(1.0, t)}"), fl)
    q = em(f"fdiv {ty} {a}, {b}")
    r = _select(em, t, em(f"fcmp une {ty} {div}, {z}"), fl, _copysign0(em, t, q))
    return _select(em, t, em(f"fcmp oeq {ty} {b}, {z}"), q, r)


def _bits(t: str) -> int:
    return 8 * _dt.itemsize(t)


def _shl(em, t, a, b):
    """np.left_shift: 0 when the shift (as unsigned) is the bit width or more (LLVM: poison)."""
    ty = VTYPE[t]
    ok = em(f"icmp ult {ty} {b}, {_bits(t)}")
    return _select(em, t, ok, em(f"shl {ty} {a}, {b}"), literal(0, t))


def _shr(em, t, a, b):
    """np.right_shift: arithmetic on signed integers (a too-large shift gives 0 or -1), logical on unsigned."""
    ty = VTYPE[t]
    ok = em(f"icmp ult {ty} {b}, {_bits(t)}")
    if _signed(t):
        return em(f"ashr {ty} {a}, {_select(em, t, ok, b, literal(_bits(t) - 1, t))}")
    return _select(em, t, ok, em(f"lshr {ty} {a}, {b}"), literal(0, t))


def bitwise(inst):
    """and/or/xor on integers, or on bools (i1) where both inputs are bool."""
    def row(em, attrs, args, out):
        a, b = (convert(em, v, d, out) for v, d in args)
        return em(f"{inst} {'i1' if out == 'bool' else VTYPE[out]} {a}, {b}")
    return row


def _bitwise_not_row(em, attrs, args, out):
    x = convert(em, *args[0], out)
    return em(f"xor {'i1' if out == 'bool' else VTYPE[out]} {x}, {'true' if out == 'bool' else -1}")


exp, log = _transcendental("exp"), _transcendental("log")

#: The scalar-spelling table (tinygrad's `code_for_op`): elementwise op -> row. An elementwise op is
#: native on llvm exactly when it has a row here (a missing one fails tests/test_lowering_tables.py).
CODE_FOR_OP = {
    E.neg.op: arith(_neg), E.abs.op: arith(_fabs), E.sign.op: arith(_sign), E.floor.op: arith(_floor),
    E.relu.op: arith(_relu),
    E.sqrt.op: arith(_sqrt, float_only=True), E.rsqrt.op: arith(_rsqrt, float_only=True),
    E.sigmoid.op: arith(_sigmoid, float_only=True), E.softplus.op: arith(_softplus, float_only=True),
    E.exp.op: arith(exp, float_only=True), E.log.op: arith(log, float_only=True),
    **{f.op: arith(_transcendental(fn), float_only=True)
       for f, fn in ((E.log1p, "log1p"), (E.expm1, "expm1"), (E.tanh, "tanh"), (E.erf, "erf"), (E.sin, "sin"),
                     (E.cos, "cos"), (E.atan, "atan"), (E.tan, "tan"), (E.asin, "asin"), (E.acos, "acos"),
                     (E.sinh, "sinh"), (E.cosh, "cosh"), (E.asinh, "asinh"), (E.acosh, "acosh"), (E.atanh, "atanh"))},
    E.ceil.op: arith(_fround("ceil")), E.trunc.op: arith(_fround("trunc")), E.round.op: arith(_fround("roundeven")),
    E.mod.op: arith(_fmod_floored, _imod(True)), E.fmod.op: arith(_fbin("frem"), _imod(False)),
    E.floor_divide.op: arith(_ffloordiv, _ifloordiv),
    E.left_shift.op: arith(None, _shl), E.right_shift.op: arith(None, _shr),
    E.bitwise_and.op: bitwise("and"), E.bitwise_or.op: bitwise("or"), E.bitwise_xor.op: bitwise("xor"),
    E.bitwise_not.op: _bitwise_not_row,
    E.zeros_like.op: arith(lambda em, t, x: literal(0, t)), E.ones_like.op: arith(lambda em, t, x: literal(1, t)),
    E.add.op: arith(*_fbin_int("fadd", "add")), E.sub.op: arith(*_fbin_int("fsub", "sub")),
    E.mul.op: arith(*_fbin_int("fmul", "mul")), E.div.op: arith(_fbin("fdiv"), float_only=True),
    E.pow.op: arith(_pow, float_only=True),
    E.maximum.op: arith(_fmaxmin("ogt"), _imaxmin("sgt")), E.minimum.op: arith(_fmaxmin("olt"), _imaxmin("slt")),
    E.less.op: compare("olt", "slt"), E.less_equal.op: compare("ole", "sle"), E.greater.op: compare("ogt", "sgt"),
    E.greater_equal.op: compare("oge", "sge"), E.equal.op: compare("oeq", "eq"),
    E.not_equal.op: compare("une", "ne"),
    E.logical_and.op: logical("and"), E.logical_or.op: logical("or"),
    E.Where: _where_row, E.leaky_relu.op: _leaky_row, Cast: _cast_row,
}


def lower(em: Emitter, op, attrs: dict, args: list[tuple[str, str]], out: str) -> str:
    """IR for one element of `op` on (ssa, dtype) args, producing graphc dtype `out`."""
    row = CODE_FOR_OP.get(op)
    if row is None:
        raise NotLowerable(op.name)
    try:
        return row(em, attrs, args, out)
    except NotLowerable as e:
        raise NotLowerable(f"{op.name} {e}") from None
