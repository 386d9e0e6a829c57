"""ONNX Compress and ReverseSequence (and Det, by cofactors): selections whose index pattern comes from a small integer or
bool input. The ONNX backend feeds such inputs as constants (one compile per value), so each becomes
one gather with constant indices (gradient: scatter-add)."""
from __future__ import annotations

import numpy as np

import graphc as gc
from .onnx_ops import op


@op("Compress")
def _compress(cx, ins, a):
    x, cond = ins[0], cx.const(ins[1], "condition").reshape(-1).astype(bool)
    if "axis" not in a:
        x, axis = gc.reshape(x, (-1,)), 0
    else:
        axis = a["axis"] % x.ndim
    keep = np.nonzero(cond[:x.shape[axis]])[0].astype(np.int64)
    return gc.take(x, gc.constant(keep), axis)


@op("ReverseSequence")
def _reverse_sequence(cx, ins, a):
    """Reverse the first sequence_lens[b] steps along the time axis of each batch entry b."""
    x, lens = ins[0], cx.const(ins[1], "sequence_lens").reshape(-1).astype(np.int64)
    bax, tax = a.get("batch_axis", 1), a.get("time_axis", 0)
    b, t = x.shape[bax], x.shape[tax]
    rest = [i for i in range(x.ndim) if i not in (bax, tax)]
    xt = gc.transpose(x, (bax, tax, *rest))                              # (B, T, ...)
    src = np.tile(np.arange(t), (b, 1))
    for i, n in enumerate(lens):
        src[i, :n] = np.arange(n)[::-1]
    flat = gc.reshape(xt, (b * t,) + tuple(xt.shape[2:]))
    y = gc.take(flat, gc.constant(src + np.arange(b).reshape(b, 1) * t), 0)    # (B, T, ...)
    back = np.argsort([bax, tax, *rest])
    return gc.transpose(y, tuple(int(i) for i in back))


@op("Det")
def _det(cx, ins, a):
    """Determinant of the trailing (n, n) matrices by cofactor expansion along the first row
    (n! terms: small matrices only, where it is exact and differentiable)."""
    x = ins[0]
    n = x.shape[-1]
    if not isinstance(n, int) or n > 5:
        raise cx.unsupported(f"Det of {n}x{n} matrices (cofactor expansion is limited to n <= 5)")

    def det(rows, cols):
        if len(rows) == 1:
            return x[..., rows[0], cols[0]]
        total = None
        for j, col in enumerate(cols):
            term = x[..., rows[0], col] * det(rows[1:], cols[:j] + cols[j + 1:])
            total = term if total is None else (total - term if j % 2 else total + term)
        return total
    return det(list(range(n)), list(range(n)))
