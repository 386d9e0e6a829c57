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


class Elementwise(Op):
    traits = Trait.ELEMENTWISE | Trait.FRESH
    fn = None            # NumPy callable
    npname: str | None = None  # NumPy spelling in generated source, e.g. "np.exp" or "{0} + {1}"
    dtype_rule = "same"  # same | float | bool | promote | promote_float
    int_ok = True
    grads = None         # (g, *inputs, out) -> tuple of Tensor | None

    def infer(self, inputs, **attrs):
        shape = _sh.broadcast_shapes(*[t.shape for t in inputs], op=self.name)
        dts = [t.dtype for t in inputs]
        if not self.int_ok and not all(_dt.is_float(d) for d in dts):
            raise DTypeError(f"{self.name} needs float inputs, got {', '.join(dts)}")
        rule = self.dtype_rule
        if rule == "bool":
            return [(shape, "bool")]
        d = _dt.promote(*dts)
        if rule in ("float", "promote_float"):
            d = _dt.float_of(d)
        return [(shape, d)]

    def impl(self, *args, **attrs):
        return self.fn(*args, **attrs)

    def np_code(self, args, attrs):
        if self.npname is None:
            return None
        if "{" in self.npname:
            return self.npname.format(*args, **attrs)
        extra = "".join(f", {k}={v!r}" for k, v in attrs.items())
        return f"{self.npname}({', '.join(args)}{extra})"

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


def _define(name, nin, fn, npname=None, dtype_rule="same", grads=None, c=None, int_ok=True, attrs=(),
            commutative=False):
    cls = type(name.title().replace("_", ""), (Elementwise,), dict(
        name=name, traits=Elementwise.traits | (Trait.COMMUTATIVE if commutative else Trait.NONE), fn=staticmethod(fn), npname=npname, dtype_rule=dtype_rule,
        grads=staticmethod(grads) if grads else None, c=c, int_ok=int_ok,
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


def _unary(name, fn, npname=None, dtype_rule="float", grads=None, c=None, int_ok=True):
    op = _define(name, 1, fn, npname, dtype_rule, grads, c, int_ok)

    def f(x):
        return apply(op, as_tensor(x))
    f.__name__ = name
    f.__doc__ = f"Elementwise {name} (NumPy semantics)."
    f.op = op
    return f


def _binary(name, fn, npname, dtype_rule="promote", grads=None, c=None, commutative=False):
    op = _define(name, 2, fn, npname, dtype_rule, grads, c, commutative=commutative)

    def f(a, b):
        return apply(op, *_binary_args(a, b))
    f.__name__ = name
    f.__doc__ = f"Elementwise {name} with broadcasting (NumPy semantics)."
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

neg = _unary("neg", np.negative, "-{0}", "same", lambda g, x, y: (-g,), c="(-{0})")
abs = _unary("abs", np.abs, "np.abs", "same", lambda g, x, y: (g * F.sign(x),), c="fabs({0})")
sign = _unary("sign", np.sign, "np.sign", "same", lambda g, x, y: (F.zeros_like(g),), c="sign({0})")
floor = _unary("floor", np.floor, "np.floor", "same", lambda g, x, y: (F.zeros_like(g),), c="floor({0})")
exp = _unary("exp", np.exp, "np.exp", grads=lambda g, x, y: (g * y,), c="exp({0})")
log = _unary("log", np.log, "np.log", grads=lambda g, x, y: (g / x,), c="log({0})")
log1p = _unary("log1p", np.log1p, "np.log1p", grads=lambda g, x, y: (g / (x + 1),), c="log1p({0})")
expm1 = _unary("expm1", np.expm1, "np.expm1", grads=lambda g, x, y: (g * (y + 1),), c="expm1({0})")
sqrt = _unary("sqrt", np.sqrt, "np.sqrt", grads=lambda g, x, y: (g * 0.5 / y,), c="sqrt({0})")
rsqrt = _unary("rsqrt", _rsqrt, "1 / np.sqrt({0})", grads=lambda g, x, y: (g * -0.5 * y / x,), c="(1/sqrt({0}))")
sin = _unary("sin", np.sin, "np.sin", grads=lambda g, x, y: (g * F.cos(x),), c="sin({0})")
cos = _unary("cos", np.cos, "np.cos", grads=lambda g, x, y: (-g * F.sin(x),), c="cos({0})")
tanh = _unary("tanh", np.tanh, "np.tanh", grads=lambda g, x, y: (g * (1 - y * y),), c="tanh({0})")
sigmoid = _unary("sigmoid", _sigmoid, None, grads=lambda g, x, y: (g * y * (1 - y),), c="(1/(1+exp(-{0})))")
softplus = _unary("softplus", _softplus, None, grads=lambda g, x, y: (g * F.sigmoid(x),),
                  c="({0} > 0 ? {0} + log1p(exp(-{0})) : log1p(exp({0})))")
erf = _unary("erf", _erf, None, grads=lambda g, x, y: (g * (2 / math.sqrt(math.pi)) * F.exp(-x * x),), c="erf({0})")
relu = _unary("relu", _relu, None, "same", lambda g, x, y: (F.where(x > 0, g, 0),), c="({0} > 0 ? {0} : 0)")
zeros_like = _unary("zeros_like", _zeros_like, "np.zeros_like", "same", None, c="0")
ones_like = _unary("ones_like", _ones_like, "np.ones_like", "same", None, c="1")

_leaky = _define("leaky_relu", 1, _leaky_relu, None, "same",
                 lambda g, x, y, alpha: (F.where(x >= 0, g, g * alpha),), c="({0} >= 0 ? {0} : {0} * {alpha})")


def leaky_relu(x, alpha: float = 0.01):
    """max(x, alpha*x) for 0 <= alpha <= 1: x where x >= 0, alpha*x elsewhere."""
    return apply(_leaky, as_tensor(x), alpha=float(alpha))


# ---- binary --------------------------------------------------------------------------------

add = _binary("add", np.add, "{0} + {1}", grads=lambda g, a, b, y: (g, g), c="({0} + {1})", commutative=True)
sub = _binary("sub", np.subtract, "{0} - {1}", grads=lambda g, a, b, y: (g, -g), c="({0} - {1})")
mul = _binary("mul", np.multiply, "{0} * {1}", grads=lambda g, a, b, y: (g * b, g * a), c="({0} * {1})", commutative=True)
div = _binary("div", np.true_divide, "{0} / {1}", "promote_float",
              lambda g, a, b, y: (g / b, -g * y / b), c="({0} / {1})")
pow = _binary("pow", np.power, "{0} ** {1}",
              grads=lambda g, a, b, y: (g * b * a ** (b - 1), g * y * F.log(a)), c="pow({0}, {1})")
maximum = _binary("maximum", np.maximum, "np.maximum",
                  grads=lambda g, a, b, y: (F.where(a >= b, g, 0), F.where(a >= b, 0, g)), c="fmax({0}, {1})", commutative=True)
minimum = _binary("minimum", np.minimum, "np.minimum",
                  grads=lambda g, a, b, y: (F.where(a <= b, g, 0), F.where(a <= b, 0, g)), c="fmin({0}, {1})", commutative=True)
less = _binary("less", np.less, "{0} < {1}", "bool", c="({0} < {1})")
less_equal = _binary("less_equal", np.less_equal, "{0} <= {1}", "bool", c="({0} <= {1})")
greater = _binary("greater", np.greater, "{0} > {1}", "bool", c="({0} > {1})")
greater_equal = _binary("greater_equal", np.greater_equal, "{0} >= {1}", "bool", c="({0} >= {1})")
equal = _binary("equal", np.equal, "{0} == {1}", "bool", c="({0} == {1})", commutative=True)
not_equal = _binary("not_equal", np.not_equal, "{0} != {1}", "bool", c="({0} != {1})", commutative=True)
logical_and = _binary("logical_and", np.logical_and, "np.logical_and", "bool", c="({0} && {1})", commutative=True)
logical_or = _binary("logical_or", np.logical_or, "np.logical_or", "bool", c="({0} || {1})", commutative=True)


@register
class Where(Elementwise):
    name = "where"
    c = "({0} ? {1} : {2})"
    npname = "np.where"
    fn = staticmethod(np.where)

    def infer(self, inputs):
        cond, a, b = inputs
        if cond.dtype != "bool":
            raise DTypeError(f"where: condition must be bool, got {cond.dtype}")
        shape = _sh.broadcast_shapes(cond.shape, a.shape, b.shape, op="where")
        return [(shape, _dt.promote(a.dtype, b.dtype))]

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


def reciprocal(x):
    return div(1.0, x)
