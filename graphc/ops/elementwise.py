"""Elementwise ops: one row each (NumPy function, dtype rule, partial derivatives, C spelling).

An elementwise op's `grads(g, *inputs, out)` returns, per input, `g` times the local partial
derivative (or None where the input is not differentiable). Reverse mode sums it back over broadcast
axes; forward mode uses the same rule with the tangent in place of `g` (the Jacobian is diagonal).
"""
from __future__ import annotations

import math

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError
from ..ir import Op, Trait, apply, register
from .core import as_tensor, scalar_like


_HALF = frozenset(_dt.HALF)   # by name: comparing with ml_dtypes' bfloat16 would import it


class Elementwise(Op):
    traits = Trait.ELEMENTWISE | Trait.FRESH
    fn = None            # NumPy callable
    dtype_rule = "same"  # same | float | bool | promote | promote_float | promote_int
    int_ok = True
    float_ok = True      # False: integer/bool only (bitwise ops, shifts)
    grads = None         # (g, *inputs, out) -> tuple of Tensor | None

    def infer(self, inputs, **attrs):
        shape = _sh.broadcast_shapes(*[t.shape for t in inputs], op=self.name)
        dts = [t.dtype for t in inputs]
        if not self.int_ok and not all(_dt.is_float(d) for d in dts):
            raise DTypeError(f"{self.name} needs float inputs, got {', '.join(dts)}")
        out = self.out_dtype(dts)
        if not self.float_ok and _dt.is_float(out):
            raise DTypeError(f"{self.name} needs integer or bool inputs (NumPy has no {self.name} for floats), "
                             f"got {', '.join(dts)}" + (f" (they promote to {out})" if out not in dts else ""))
        return [(shape, out)]

    def out_dtype(self, dts) -> str:
        """The result dtype for input dtypes `dts` (NumPy's rule for this kind of ufunc)."""
        rule = self.dtype_rule
        if rule == "bool":
            return "bool"
        d = _dt.promote(*dts)
        if rule == "float":
            return _dt.ufunc_float_of(d)      # exp(int8) is float16, exp(int32) float64
        if rule == "promote_float":
            return _dt.float_of(d)            # true division of integers is float64
        if rule == "promote_int":
            return "int8" if d == "bool" else d   # mod, floor_divide, shifts of bools compute in int8
        return d

    def impl(self, *args, **attrs):
        if any(getattr(getattr(a, "dtype", None), "name", None) in _HALF for a in args):
            # float16/bfloat16: compute in float32, round the result once (as NumPy's float16 loops do)
            out = self.out_dtype([np.asarray(a).dtype.name for a in args])
            r = np.asarray(self.fn(*[_dt.upcast(a) for a in args], **attrs))
            return r if out == "bool" else r.astype(_dt.np_dtype(out), copy=False)
        return self.fn(*args, **attrs)

    def _partials(self, node, g):
        if self.grads is None or not _dt.is_float(node.outputs[0].dtype):
            return [None] * len(node.inputs)
        res = self.grads(g, *node.inputs, node.outputs[0], **node.attrs)
        return [r if r is not None and _dt.is_float(x.dtype) else None for r, x in zip(res, node.inputs)]

    def vjp(self, node, gouts):
        out = []
        for gx, x in zip(self._partials(node, gouts[0]), node.inputs):
            out.append(None if gx is None else F.cast(F.sum_to(gx, x.shape), x.dtype))
        return out

    def jvp(self, node, tangents):
        y = node.outputs[0]
        total = None
        for i, t in enumerate(tangents):
            if t is None:
                continue
            parts = self._partials(node, t)
            if parts[i] is None:
                continue
            total = parts[i] if total is None else total + parts[i]
        if total is None:
            return [None]
        if total.shape != y.shape:
            total = F.broadcast_to(total, y.shape)
        return [F.cast(total, y.dtype)]


def _define(name, nin, fn, dtype_rule="same", grads=None, int_ok=True, attrs=(), commutative=False, float_ok=True):
    cls = type(name.title().replace("_", ""), (Elementwise,), dict(
        name=name, traits=Elementwise.traits | (Trait.COMMUTATIVE if commutative else Trait.NONE), fn=staticmethod(fn),
        dtype_rule=dtype_rule,
        grads=staticmethod(grads) if grads else None, int_ok=int_ok, float_ok=float_ok,
        differentiable=grads is not None))
    return register(cls)


def _binary_args(a, b):
    """Tensors for a binary op; a Python scalar takes the other operand's dtype (NEP 50)."""
    from ..ir import Tensor
    if isinstance(a, Tensor) and not isinstance(b, Tensor):
        return a, scalar_like(b, a)
    if isinstance(b, Tensor) and not isinstance(a, Tensor):
        return scalar_like(a, b), b
    return as_tensor(a), as_tensor(b)


def _unary(name, fn, dtype_rule="float", grads=None, int_ok=True, float_ok=True, doc=None):
    op = _define(name, 1, fn, dtype_rule, grads, int_ok, float_ok=float_ok)

    def f(x):
        return apply(op, as_tensor(x))
    f.__name__ = name
    f.__doc__ = doc or f"Elementwise {name} (NumPy semantics)."
    f.op = op
    return f


def _binary(name, fn, dtype_rule="promote", grads=None, commutative=False, float_ok=True, doc=None):
    op = _define(name, 2, fn, dtype_rule, grads, commutative=commutative, float_ok=float_ok)

    def f(a, b):
        return apply(op, *_binary_args(a, b))
    f.__name__ = name
    f.__doc__ = doc or f"Elementwise {name} with broadcasting (NumPy semantics)."
    f.op = op
    return f


# ---- NumPy reference implementations that are not single ufuncs ----------------------------

def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def _erf(x):
    try:
        from scipy.special import erf
        return erf(x)
    except ImportError:
        return np.vectorize(math.erf, otypes=[x.dtype])(x) if x.size else x.copy()


def _rsqrt(x):
    return 1 / np.sqrt(x)


def _relu(x):
    return np.maximum(x, np.zeros((), x.dtype))


def _leaky_relu(x, alpha=0.01):
    return np.where(x >= 0, x, x * np.asarray(alpha, x.dtype))


def _softplus(x):
    return np.logaddexp(np.zeros((), x.dtype), x)


def _zeros_like(x):
    return np.zeros_like(x)


def _ones_like(x):
    return np.ones_like(x)


# ---- unary ---------------------------------------------------------------------------------

neg = _unary("neg", np.negative, "same", lambda g, x, y: (-g,))
abs = _unary("abs", np.abs, "same", lambda g, x, y: (g * F.sign(x),))
sign = _unary("sign", np.sign, "same", lambda g, x, y: (F.zeros_like(g),))
floor = _unary("floor", np.floor, "same", lambda g, x, y: (F.zeros_like(g),))
ceil = _unary("ceil", np.ceil, "same", lambda g, x, y: (F.zeros_like(g),))
trunc = _unary("trunc", np.trunc, "same", lambda g, x, y: (F.zeros_like(g),),
               doc="Elementwise rounding toward zero (np.trunc); integers unchanged.")
round = _unary("round", np.round, "same", lambda g, x, y: (F.zeros_like(g),),
               doc="Elementwise rounding to the nearest integer, halves to even (np.round); integers unchanged.")
bitwise_not = _unary("bitwise_not", np.invert, "same", float_ok=False,
                     doc="Elementwise bitwise NOT (np.invert / ~x): logical NOT on bool, two's complement on integers.")
exp = _unary("exp", np.exp, grads=lambda g, x, y: (g * y,))
log = _unary("log", np.log, grads=lambda g, x, y: (g / x,))
log1p = _unary("log1p", np.log1p, grads=lambda g, x, y: (g / (x + 1),))
expm1 = _unary("expm1", np.expm1, grads=lambda g, x, y: (g * (y + 1),))
sqrt = _unary("sqrt", np.sqrt, grads=lambda g, x, y: (g * 0.5 / y,))
rsqrt = _unary("rsqrt", _rsqrt, grads=lambda g, x, y: (g * -0.5 * y / x,))
sin = _unary("sin", np.sin, grads=lambda g, x, y: (g * F.cos(x),))
atan = _unary("atan", np.arctan, grads=lambda g, x, y: (g / (1 + x * x),))
cos = _unary("cos", np.cos, grads=lambda g, x, y: (-g * F.sin(x),))
tan = _unary("tan", np.tan, grads=lambda g, x, y: (g * (1 + y * y),))
asin = _unary("asin", np.arcsin, grads=lambda g, x, y: (g * F.rsqrt(1 - x * x),),
              doc="Elementwise arcsine (np.arcsin): NaN outside [-1, 1].")
acos = _unary("acos", np.arccos, grads=lambda g, x, y: (-g * F.rsqrt(1 - x * x),),
              doc="Elementwise arccosine (np.arccos): NaN outside [-1, 1].")
sinh = _unary("sinh", np.sinh, grads=lambda g, x, y: (g * F.cosh(x),))
cosh = _unary("cosh", np.cosh, grads=lambda g, x, y: (g * F.sinh(x),))
asinh = _unary("asinh", np.arcsinh, grads=lambda g, x, y: (g * F.rsqrt(x * x + 1),),
               doc="Elementwise inverse hyperbolic sine (np.arcsinh).")
acosh = _unary("acosh", np.arccosh, grads=lambda g, x, y: (g * F.rsqrt(x * x - 1),),
               doc="Elementwise inverse hyperbolic cosine (np.arccosh): NaN below 1.")
atanh = _unary("atanh", np.arctanh, grads=lambda g, x, y: (g / (1 - x * x),),
               doc="Elementwise inverse hyperbolic tangent (np.arctanh): +-inf at +-1, NaN outside.")
tanh = _unary("tanh", np.tanh, grads=lambda g, x, y: (g * (1 - y * y),))
sigmoid = _unary("sigmoid", _sigmoid, grads=lambda g, x, y: (g * y * (1 - y),))
softplus = _unary("softplus", _softplus, grads=lambda g, x, y: (g * F.sigmoid(x),))
erf = _unary("erf", _erf, grads=lambda g, x, y: (g * (2 / math.sqrt(math.pi)) * F.exp(-x * x),))
relu = _unary("relu", _relu, "same", lambda g, x, y: (F.where(x > 0, g, 0),))
zeros_like = _unary("zeros_like", _zeros_like, "same", None)
ones_like = _unary("ones_like", _ones_like, "same", None)

_leaky = _define("leaky_relu", 1, _leaky_relu, "same",
                 lambda g, x, y, alpha: (F.where(x >= 0, g, g * alpha),))


def leaky_relu(x, alpha: float = 0.01):
    """max(x, alpha*x) for 0 <= alpha <= 1: x where x >= 0, alpha*x elsewhere."""
    return apply(_leaky, as_tensor(x), alpha=float(alpha))


leaky_relu.op = _leaky


# ---- binary --------------------------------------------------------------------------------

add = _binary("add", np.add, grads=lambda g, a, b, y: (g, g), commutative=True)
sub = _binary("sub", np.subtract, grads=lambda g, a, b, y: (g, -g))
mul = _binary("mul", np.multiply, grads=lambda g, a, b, y: (g * b, g * a), commutative=True)
div = _binary("div", np.true_divide, "promote_float",
              lambda g, a, b, y: (g / b, -g * y / b))
pow = _binary("pow", np.power,
              grads=lambda g, a, b, y: (g * b * a ** (b - 1), g * y * F.log(a)))
maximum = _binary("maximum", np.maximum,
                  grads=lambda g, a, b, y: (F.where(a >= b, g, 0), F.where(a >= b, 0, g)), commutative=True)
minimum = _binary("minimum", np.minimum,
                  grads=lambda g, a, b, y: (F.where(a <= b, g, 0), F.where(a <= b, 0, g)), commutative=True)
less = _binary("less", np.less, "bool")
less_equal = _binary("less_equal", np.less_equal, "bool")
greater = _binary("greater", np.greater, "bool")
greater_equal = _binary("greater_equal", np.greater_equal, "bool")
equal = _binary("equal", np.equal, "bool", commutative=True)
not_equal = _binary("not_equal", np.not_equal, "bool", commutative=True)
logical_and = _binary("logical_and", np.logical_and, "bool", commutative=True)
logical_or = _binary("logical_or", np.logical_or, "bool", commutative=True)
mod = _binary("mod", np.remainder, "promote_int",
              lambda g, a, b, y: (g, -g * F.floor_divide(a, b)),
              doc="Elementwise remainder with the divisor's sign (np.mod, Python's %): a - floor(a / b) * b; "
                  "an integer modulo 0 is 0, a float one NaN.")
fmod = _binary("fmod", np.fmod, "promote_int",
               lambda g, a, b, y: (g, -g * F.trunc(a / b)),
               doc="Elementwise remainder with the dividend's sign (np.fmod, C's fmod and %): a - trunc(a / b) * b; "
                   "an integer modulo 0 is 0, a float one NaN.")
floor_divide = _binary("floor_divide", np.floor_divide, "promote_int",
                       lambda g, a, b, y: (F.zeros_like(g), F.zeros_like(g)),
                       doc="Elementwise floor(a / b) (np.floor_divide, Python's //) in the promoted dtype; an "
                           "integer divided by 0 is 0; integer results wrap (int8 -128 // -1 is -128).")
_bitwise_and = _binary("bitwise_and", np.bitwise_and, float_ok=False, commutative=True)
_bitwise_or = _binary("bitwise_or", np.bitwise_or, float_ok=False, commutative=True)
bitwise_xor = _binary("bitwise_xor", np.bitwise_xor, float_ok=False, commutative=True,
                      doc="Elementwise bitwise XOR (np.bitwise_xor / a ^ b) of integers or bools.")
left_shift = _binary("left_shift", np.left_shift, "promote_int", float_ok=False,
                     doc="Elementwise a << b (np.left_shift): bits shifted out are lost; a shift by the bit "
                         "width or more (or a negative one) gives 0.")
right_shift = _binary("right_shift", np.right_shift, "promote_int", float_ok=False,
                      doc="Elementwise a >> b (np.right_shift): arithmetic for signed integers (a shift by the "
                          "bit width or more gives 0 or -1), logical for unsigned ones (0).")


def bitwise_and(a, b):
    """Elementwise bitwise AND (np.bitwise_and / a & b) of integers or bools (logical_and for two bools)."""
    a, b = _binary_args(a, b)
    return logical_and(a, b) if a.dtype == b.dtype == "bool" else _bitwise_and(a, b)


def bitwise_or(a, b):
    """Elementwise bitwise OR (np.bitwise_or / a | b) of integers or bools (logical_or for two bools)."""
    a, b = _binary_args(a, b)
    return logical_or(a, b) if a.dtype == b.dtype == "bool" else _bitwise_or(a, b)


bitwise_and.op, bitwise_or.op = _bitwise_and.op, _bitwise_or.op
invert = bitwise_not


@register
class Where(Elementwise):
    name = "where"
    fn = staticmethod(np.where)

    def infer(self, inputs):
        cond, a, b = inputs
        if cond.dtype != "bool":
            raise DTypeError(f"where: condition must be bool, got {cond.dtype}")
        shape = _sh.broadcast_shapes(cond.shape, a.shape, b.shape, op="where")
        return [(shape, _dt.promote(a.dtype, b.dtype))]

    def out_dtype(self, dts) -> str:
        return _dt.promote(*dts[1:])

    @staticmethod
    def grads(g, cond, a, b, y):
        return None, F.where(cond, g, 0), F.where(cond, 0, g)


def where(cond, a, b):
    """Elementwise choice: a where cond is true, else b (broadcast; NumPy dtype promotion)."""
    from ..ir import Tensor
    cond = as_tensor(cond)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = _binary_args(a, b)
    else:
        a, b = as_tensor(a), as_tensor(b)
    return apply(Where, cond, a, b)


def clip(x, lo=None, hi=None):
    """Limit values to [lo, hi] (either may be None)."""
    x = as_tensor(x)
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x


def square(x):
    return mul(x, x)


def isnan(x):
    """Elementwise x is NaN (np.isnan): False for integers and bools."""
    x = as_tensor(x)
    return not_equal(x, x)


def isinf(x):
    """Elementwise x is +-inf (np.isinf): False for integers and bools."""
    x = as_tensor(x)
    if not _dt.is_float(x.dtype):
        return not_equal(x, x)
    return equal(abs(x), np.inf)


def isfinite(x):
    """Elementwise x is neither NaN nor +-inf (np.isfinite): True for integers and bools."""
    x = as_tensor(x)
    if not _dt.is_float(x.dtype):
        return equal(x, x)
    return less(abs(x), np.inf)


def reciprocal(x):
    return div(1.0, x)
