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


def convert(em: Emitter, v: str, src: str, dst: str) -> str:
    """NumPy astype semantics between register types."""
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
        return em(f"{'fpext' if dst == 'float64' else 'fptrunc'} {s} {v} to {d}")
    if _dt.is_float(dst):
        return em(f"sitofp {s} {v} to {d}")
    if _dt.is_float(src):
        return em(f"fptosi {s} {v} to {d}")
    return em(f"{'sext' if dst == 'int64' else 'trunc'} {s} {v} to {d}")


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


def _imaxmin(pred):
    return lambda em, t, a, b: _select(em, t, em(f"icmp {pred} {VTYPE[t]} {a}, {b}"), a, b)


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
    neg = em(f"sub {VTYPE[t]} 0, {x}")
    return _select(em, t, em(f"icmp slt {VTYPE[t]} {x}, 0"), neg, x)


def _sign(em, t, x):
    ty, z = VTYPE[t], literal(0, t)
    one, m1 = literal(1, t), literal(-1, t)
    if _dt.is_float(t):
        r = _select(em, t, em(f"fcmp olt {ty} {x}, {z}"), m1, x)   # NaN and 0 pass through
        return _select(em, t, em(f"fcmp ogt {ty} {x}, {z}"), one, r)
    r = _select(em, t, em(f"icmp slt {ty} {x}, 0"), m1, z)
    return _select(em, t, em(f"icmp sgt {ty} {x}, 0"), one, r)


def _floor(em, t, x):
    if not _dt.is_float(t):
        return x
    return em(f"call {VTYPE[t]} @llvm.floor.{'f32' if t == 'float32' else 'f64'}({VTYPE[t]} {x})")


def _sqrt(em, t, x):
    return em(f"call {VTYPE[t]} @llvm.sqrt.{'f32' if t == 'float32' else 'f64'}({VTYPE[t]} {x})")


def _relu(em, t, x):
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
        return em(f"icmp {ipred} {ty} {a}, {b}")
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
        return impl(em, out, *[convert(em, v, d, out) for v, d in args])
    return row


def compare(fpred, ipred):
    """A comparison in the promoted input dtype (bools compared as int32), producing i1."""
    impl = _cmp(fpred, ipred)

    def row(em, attrs, args, out):
        t = _dt.promote(*[d for _, d in args])
        t = "int32" if t == "bool" else t
        return impl(em, t, *[convert(em, v, d, t) for v, d in args])
    return row


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
    return _leaky(em, out, convert(em, *args[0], out), attrs["alpha"])


def _fbin_int(finst, iinst):
    return _fbin(finst), _ibin(iinst)


def _pow(em, t, a, b):
    return _call(em, t, mathlib.LIBM["pow"][0 if t == "float32" else 1], a, b)


def _rsqrt(em, t, x):
    return em(f"fdiv {VTYPE[t]} {literal(1.0, t)}, {_sqrt(em, t, x)}")


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
                     (E.cos, "cos"), (E.atan, "atan"))},
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
