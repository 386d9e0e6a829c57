"""Import-time arithmetic on symbolic shape values (graphc.frontends.onnx_import.SymVal).

Exporters compute shapes with Shape -> Gather -> Unsqueeze -> Concat chains; with a dynamic batch
some entries are sympy dims. These rules evaluate such chains on NumPy object arrays, so the
result is a shape graphc can use statically (symbolic dims included) instead of a run-time tensor.
"""
from __future__ import annotations

import numpy as np

from graphc.ir import constant_value


def _vals(t):
    from .onnx_import import SymVal
    if t is None:
        return None
    if isinstance(t, SymVal):
        return t.values
    return np.asarray(constant_value(t)).astype(object)


def _ints(t) -> list[int] | None:
    v = _vals(t)
    return None if v is None else [int(e) for e in v.reshape(-1)]


def _axes(cx, ins, a, k=1):
    return a.get("axes") if cx.opset < 13 else _ints(ins[k] if len(ins) > k else None)


def _binary(fn):
    return lambda cx, ins, a: [fn(_vals(ins[0]), _vals(ins[1]))]


def _unsqueeze(cx, ins, a):
    v = _vals(ins[0])
    for ax in sorted(x % (v.ndim + len(_axes(cx, ins, a))) for x in _axes(cx, ins, a)):
        v = np.expand_dims(v, ax)
    return [v]


def _squeeze(cx, ins, a):
    v = _vals(ins[0])
    axes = _axes(cx, ins, a)
    return [np.squeeze(v, tuple(axes)) if axes else np.squeeze(v)]


def _slice(cx, ins, a):
    v = _vals(ins[0])
    starts, ends = _ints(ins[1]), _ints(ins[2])
    axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * v.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[ax] = slice(s, e, st)
    return [v[tuple(index)]]


def _reshape(cx, ins, a):
    shape = [int(d) for d in _ints(ins[1])]
    return [_vals(ins[0]).reshape([d if d != 0 else _vals(ins[0]).shape[i] for i, d in enumerate(shape)])]


SYM_FOLD = {
    "Identity": lambda cx, ins, a: [_vals(ins[0])],
    "Cast": lambda cx, ins, a: [_vals(ins[0])],
    "Gather": lambda cx, ins, a: [np.take(_vals(ins[0]), np.asarray(_ints(ins[1])).reshape(
        np.shape(_vals(ins[1]))), axis=a.get("axis", 0))],
    "Concat": lambda cx, ins, a: [np.concatenate([_vals(t) for t in ins if t is not None], a.get("axis", 0))],
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Slice": _slice, "Reshape": _reshape,
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply),
    "Div": _binary(np.floor_divide), "Equal": _binary(lambda x, y: np.asarray(x == y, dtype=object)),
    "Where": lambda cx, ins, a: [np.where(_vals(ins[0]).astype(bool), _vals(ins[1]), _vals(ins[2]))],
    "ReduceProd": lambda cx, ins, a: [np.asarray(np.prod(_vals(ins[0])), dtype=object).reshape(
        (1,) if a.get("keepdims", 1) else ())],
}
