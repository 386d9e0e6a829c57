"""NumPy spellings of elementwise ops for generated source, able to write into a given array.

`emit(node, args, target)` returns (lines, result): Python lines computing the op from the argument
expressions `args`; with `target` (a variable holding an array of the result's shape and dtype, maybe
one of the args when that input dies here) the result is written into it (ufunc `out=`), else the
lines bind a new variable `result`. `may_alias(node, i)`: may the target be argument i?
"""
from __future__ import annotations

import numpy as np

from graphc.ops import elementwise as E
from graphc.ops.core import Cast
from .spellings import dtype_code, expression, half_node


def ufunc_name(op) -> str | None:
    """'np.add' for an op whose NumPy function is that ufunc, else None."""
    fn = getattr(op, "fn", None)
    if isinstance(fn, np.ufunc) and getattr(np, fn.__name__, None) is fn:
        return f"np.{fn.__name__}"
    return None


def may_alias(node, i: int) -> bool:
    return i not in READS_AFTER_WRITE.get(node.op, ())


def _steps(first: str, rest: list[str], args, target, result):
    """A chain of ufuncs: first(args) then each of `rest` applied in place on the result."""
    dst = target or result
    lines = [f"{dst} = {first}({', '.join(args)})" if target is None else f"{first}({', '.join(args)}, out={dst})"]
    lines += [r.format(dst) for r in rest]
    return lines


def _sigmoid(node, args, target, result):
    # 1 / (1 + exp(-x)): exp overflows to inf for very negative x, giving the exact limit 0
    return _steps("np.negative", ['with np.errstate(over="ignore"): np.exp({0}, out={0})', "np.add({0}, 1, out={0})",
                                  "np.reciprocal({0}, out={0})"], args, target, result)


def _rsqrt(node, args, target, result):
    return _steps("np.sqrt", ["np.reciprocal({0}, out={0})"], args, target, result)


def _relu(node, args, target, result):
    return _steps("np.maximum", [], [args[0], "0"], target, result)


def _softplus(node, args, target, result):
    return _steps("np.logaddexp", [], [args[0], "0"], target, result)


def _leaky_relu(node, args, target, result):
    alpha = node.attrs["alpha"]
    if not 0 <= alpha <= 1:
        return None
    dst = target or result
    first = f"{dst} = {args[0]} * {alpha!r}" if target is None else f"np.multiply({args[0]}, {alpha!r}, out={dst})"
    return [first, f"np.maximum({args[0]}, {dst}, out={dst})"]  # max(x, a*x) for 0 <= a <= 1


def _where(node, args, target, result):
    if target is None:
        return [f"{result} = np.where({', '.join(args)})"]
    c, a, b = args
    if a == target:  # in place on the first branch: overwrite only where the condition is false
        return [f"np.copyto({target}, {b}, where=~{c})"]
    if b == target:
        return [f"np.copyto({target}, {a}, where={c})"]
    return [f"np.copyto({target}, {b})", f"np.copyto({target}, {a}, where={c})"]


def _cast(node, args, target, result):
    dt = node.attrs["dtype"]
    if target is None:
        return [f"{result} = {args[0]}.astype({dtype_code(dt)})"]
    return [f"np.copyto({target}, {args[0]}, casting='unsafe')"]


def _fill(value):
    def emit(node, args, target, result):
        if target is None:
            return [f"{result} = np.full_like({args[0]}, {value})"]
        return [f"{target}.fill({value})"]
    return emit


#: elementwise ops spelled as several lines (or with an out= form their expression lacks), by op
SPECIAL = {E.sigmoid.op: _sigmoid, E.rsqrt.op: _rsqrt, E.relu.op: _relu, E.softplus.op: _softplus,
           E.leaky_relu.op: _leaky_relu, E.Where: _where, Cast: _cast, E.zeros_like.op: _fill(0),
           E.ones_like.op: _fill(1)}

#: ops whose spelling reads some argument after writing the target (so the target must not alias it)
READS_AFTER_WRITE = {E.leaky_relu.op: (0,), E.Where: (0, 1)}


def emit(node, args: list[str], target: str | None, result: str) -> list[str] | None:
    """Lines for an elementwise node (see the module docstring), or None when there is no spelling."""
    if half_node(node) and node.op is not Cast:
        return None   # float16/bfloat16: the op's impl (float32 compute, one rounding)
    special = SPECIAL.get(node.op)
    if special is not None:
        lines = special(node, args, target, result)
        if lines is not None:
            return lines
    uf = ufunc_name(node.op)
    if uf is None or node.attrs:
        return None
    if target is None:
        expr = expression(node, args)
        return [f"{result} = {expr or uf + '(' + ', '.join(args) + ')'}"]
    return [f"{uf}({', '.join(args)}, out={target})"]
