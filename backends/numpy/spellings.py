"""The NumPy backend's lowering table: the NumPy source spelling of each op, keyed by the op object.

One row per op that has a NumPy spelling: a format string (`"{0} + {1}"`: the argument expressions
by position) or a function `(args, attrs) -> str | None`. An op without a row (or whose row gives
None) is generated as a call of its reference `impl`, so every op runs here; a row only makes the
generated source shorter to read and faster to run. Spellings that write into a given array (ufunc
`out=`) are in emit.py (elementwise ops) and OUT_SPELLINGS below; ops lowered as more than one line
(fused kernels, scan loops) are in codegen.NODES.
"""
from __future__ import annotations

import sympy

from graphc import dtypes as _dt
from graphc.ir import Trait
from graphc.ops import elementwise as E
from graphc.ops.core import Cast, StopGradient
from graphc.ops.linalg import MatMul
from graphc.ops.reduce import Max, Min, Prod, Sum
from graphc.ops.shape_ops import BroadcastTo, Concatenate, GetItem, Reshape, SizeOf, Take, Transpose


def dtype_code(name: str) -> str:
    """Python source for a graphc dtype (bfloat16 is not a NumPy attribute: it is looked up by name)."""
    return f"np.{name}" if name != "bfloat16" else "np.dtype('bfloat16')"


def half_node(node) -> bool:
    """Whether `node` reads or writes float16/bfloat16: those are computed by the op's impl (in float32,
    rounded once, accumulating in float32) rather than by NumPy's own half-precision spellings."""
    return any(_dt.is_half(t.dtype) for t in node.inputs + node.outputs)


#: ops whose spelling only moves or selects elements (exact in any dtype, so kept for float16/bfloat16)
def _moves_only(op) -> bool:
    return op.has(Trait.MOVEMENT | Trait.SHAPE) or op in (Cast, Concatenate, GetItem, Take)


def dims_code(shape) -> str:
    """Python source for a shape whose symbolic dims are variables of the generated function."""
    parts = [str(d) if isinstance(d, int) else sympy.pycode(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def index_code(index) -> str:
    """Python source for a basic index (ints, slices, None), e.g. `1:3, None, 0`."""
    parts = []
    for it in index:
        if it is None:
            parts.append("None")
        elif isinstance(it, slice):
            a = "" if it.start is None else str(it.start)
            b = "" if it.stop is None else str(it.stop)
            parts.append(f"{a}:{b}" + ("" if it.step is None else f":{it.step}"))
        else:
            parts.append(str(it))
    return ", ".join(parts) + ("," if len(parts) == 1 else "")


def _call(fn: str):
    """`fn(a, b)`: a NumPy function applied to the arguments."""
    return lambda args, attrs: f"{fn}({', '.join(args)})"


def _reduce(fn: str):
    return lambda args, attrs: f"np.asarray({fn}({args[0]}, axis={attrs['axis']!r}, keepdims={attrs['keepdims']}))"


def _size_of(args, attrs):
    prod = " * ".join(f"{args[0]}.shape[{a}]" for a in attrs["axes"]) or "1"
    return f"np.asarray({prod}, {dtype_code(attrs['dtype'])})"


SPELLINGS: dict = {
    # elementwise
    E.neg.op: "-{0}", E.abs.op: _call("np.abs"), E.sign.op: _call("np.sign"), E.floor.op: _call("np.floor"),
    E.exp.op: _call("np.exp"), E.log.op: _call("np.log"), E.log1p.op: _call("np.log1p"),
    E.expm1.op: _call("np.expm1"), E.sqrt.op: _call("np.sqrt"), E.rsqrt.op: "1 / np.sqrt({0})",
    E.sin.op: _call("np.sin"), E.cos.op: _call("np.cos"), E.tanh.op: _call("np.tanh"),
    E.round.op: _call("np.round"),
    E.zeros_like.op: _call("np.zeros_like"), E.ones_like.op: _call("np.ones_like"),
    E.add.op: "{0} + {1}", E.sub.op: "{0} - {1}", E.mul.op: "{0} * {1}", E.div.op: "{0} / {1}",
    E.pow.op: "{0} ** {1}", E.maximum.op: _call("np.maximum"), E.minimum.op: _call("np.minimum"),
    E.less.op: "{0} < {1}", E.less_equal.op: "{0} <= {1}", E.greater.op: "{0} > {1}",
    E.greater_equal.op: "{0} >= {1}", E.equal.op: "{0} == {1}", E.not_equal.op: "{0} != {1}",
    E.logical_and.op: _call("np.logical_and"), E.logical_or.op: _call("np.logical_or"),
    E.Where: _call("np.where"),
    Cast: lambda args, attrs: f"{args[0]}.astype({dtype_code(attrs['dtype'])})",
    # reductions (argmax/argmin, logsumexp and the softmax family call their impl)
    Sum: _reduce("np.sum"), Prod: _reduce("np.prod"), Max: _reduce("np.max"), Min: _reduce("np.min"),
    # movement and indexing
    StopGradient: "{0}",
    Reshape: lambda args, attrs: f"{args[0]}.reshape({dims_code(attrs['shape'])})",
    Transpose: lambda args, attrs: f"{args[0]}.transpose({attrs['axes']!r})",
    BroadcastTo: lambda args, attrs: f"np.broadcast_to({args[0]}, {dims_code(attrs['shape'])})",
    GetItem: lambda args, attrs: f"{args[0]}[{index_code(attrs['index'])}]",
    Concatenate: lambda args, attrs: f"np.concatenate(({', '.join(args)},), axis={attrs['axis']})",
    Take: lambda args, attrs: f"np.take({args[0]}, {args[1]}, axis={attrs['axis']})",
    SizeOf: _size_of,
    # contractions
    MatMul: "{0} @ {1}",
}

#: ops that can write into a given array `{out}` (a planned buffer, or a fused body's output)
OUT_SPELLINGS: dict = {
    MatMul: "np.matmul({0}, {1}, out={out})",
}


def expression(node, args: list[str]) -> str | None:
    """The NumPy expression for single-output `node` on argument expressions `args`, or None (call impl)."""
    row = SPELLINGS.get(node.op)
    if row is None or (half_node(node) and not _moves_only(node.op)):
        return None
    if isinstance(row, str):
        return row.format(*args)
    return row(args, node.attrs)


def into(node, args: list[str], out: str) -> str | None:
    """A line computing `node` into the array `out`, or None when the op has no such spelling."""
    row = OUT_SPELLINGS.get(node.op)
    return None if row is None or half_node(node) else row.format(*args, out=out)
