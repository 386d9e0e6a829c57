"""Scalar lowering table: one entry per elementwise op name -> IR for one element.

Values are SSA names in register types (irtext.VTYPE); inputs are first converted to the op's
computation dtype (the output dtype, or the promoted input dtype for comparisons), as NumPy does.
"""
from __future__ import annotations

from graphc import dtypes as _dt

from . import mathlib
from .irtext import VTYPE, Emitter, literal


class NotLowerable(Exception):
    """This op/dtype has no native lowering: the node runs on the host (listed in fallback_ops)."""


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


def _transcendental(name):
    def f(em, t, x):
        if t == "float32" and name in mathlib.F32:
            return mathlib.F32[name](em, x)
        return _call(em, t, mathlib.LIBM[name][0 if t == "float32" else 1], x)
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


FLOAT_ONLY = {"exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "softplus",
              "erf", "pow", "div", "leaky_relu"}

UNARY = {
    "neg": _neg, "abs": _fabs, "sign": _sign, "floor": _floor, "sqrt": _sqrt, "relu": _relu,
    "rsqrt": lambda em, t, x: em(f"fdiv {VTYPE[t]} {literal(1.0, t)}, {_sqrt(em, t, x)}"),
    "sigmoid": _sigmoid, "softplus": _softplus,
    "zeros_like": lambda em, t, x: literal(0, t), "ones_like": lambda em, t, x: literal(1, t),
    "stop_gradient": lambda em, t, x: x, "cast": lambda em, t, x: x,
    **{n: _transcendental(n) for n in ("exp", "log", "log1p", "expm1", "tanh", "erf", "sin", "cos")},
}

BINARY = {
    "add": (_fbin("fadd"), _ibin("add")), "sub": (_fbin("fsub"), _ibin("sub")),
    "mul": (_fbin("fmul"), _ibin("mul")), "div": (_fbin("fdiv"), None),
    "pow": (lambda em, t, a, b: _call(em, t, mathlib.LIBM["pow"][0 if t == "float32" else 1], a, b), None),
    "maximum": (_fmaxmin("ogt"), _imaxmin("sgt")), "minimum": (_fmaxmin("olt"), _imaxmin("slt")),
}

COMPARE = {"less": _cmp("olt", "slt"), "less_equal": _cmp("ole", "sle"), "greater": _cmp("ogt", "sgt"),
           "greater_equal": _cmp("oge", "sge"), "equal": _cmp("oeq", "eq"), "not_equal": _cmp("une", "ne")}

LOWERED = set(UNARY) | set(BINARY) | set(COMPARE) | {"logical_and", "logical_or", "where", "leaky_relu"}


def lower(em: Emitter, name: str, attrs: dict, args: list[tuple[str, str]], out: str) -> str:
    """IR for one element of op `name` on (ssa, dtype) args, producing graphc dtype `out`."""
    if name not in LOWERED:
        raise NotLowerable(name)
    if name in COMPARE:
        t = _dt.promote(*[d for _, d in args])
        if t == "bool":
            t = "int32"
        a, b = (convert(em, v, d, t) for v, d in args)
        return COMPARE[name](em, t, a, b)
    if name in ("logical_and", "logical_or"):
        a, b = (convert(em, v, d, "bool") for v, d in args)
        return em(f"{'and' if name == 'logical_and' else 'or'} i1 {a}, {b}")
    if name == "where":
        c = convert(em, *args[0], "bool")
        a, b = (convert(em, v, d, out) for v, d in args[1:])
        return _select(em, out, c, a, b)
    if out == "bool" or (name in FLOAT_ONLY and not _dt.is_float(out)):
        raise NotLowerable(f"{name} on {out}")
    vals = [convert(em, v, d, out) for v, d in args]
    if name == "leaky_relu":
        return _leaky(em, out, vals[0], attrs["alpha"])
    if name in UNARY:
        return UNARY[name](em, out, vals[0])
    fimpl, iimpl = BINARY[name]
    impl = fimpl if _dt.is_float(out) else iimpl
    if impl is None:
        raise NotLowerable(f"{name} on {out}")
    return impl(em, out, *vals)
