"""Constant folding: nodes whose inputs are all constants become constants (small results only),
and shape queries over static dims (size_of) become numbers."""
from __future__ import annotations

import numpy as np

from .. import shapes as _sh
from ..ir import Graph, Trait
from ..ops.core import constant
from .rewrite import rebuild

#: results larger than this stay computed at run time (folding would bloat the compiled program)
MAX_FOLD_ELEMENTS = 1 << 16
_NEVER_FOLDED = Trait.IMPURE | Trait.NO_FOLD


def foldable(op) -> bool:
    """Never folded: random draws and anything else not a pure function of its inputs (IMPURE), fused
    kernels (NO_FOLD), multi-output ops."""
    return not op.has(_NEVER_FOLDED) and op.n_outputs == 1


def _static_size(t):
    return _sh.size(t.shape) if _sh.is_static(t.shape) else None


def _rule(node, ins):
    out = node.outputs[0]
    if not foldable(node.op):
        return None
    n = _static_size(out)
    if n is None or n > MAX_FOLD_ELEMENTS:
        return None
    if node.op.has(Trait.SHAPE):  # a shape query (size_of): needs only static dims, not a constant input
        axes, x = node.attrs["axes"], ins[0]
        if all(isinstance(x.shape[a], int) for a in axes):
            return [constant(np.asarray(int(np.prod([x.shape[a] for a in axes])), out.dtype), out.dtype)]
        return None
    if not ins or any(not t.node.op.has(Trait.CONST) for t in ins):
        return None
    attrs = dict(node.attrs)
    if getattr(node.op, "needs_dims", False):
        attrs["dims"] = {}
    with np.errstate(all="ignore"):  # an inf/nan folded here is what the program would compute
        value = np.asarray(node.op.impl(*[t.node.attrs["value"] for t in ins], **attrs))
    if value.shape != _sh.evaluate(out.shape, {}) or value.dtype.name != out.dtype:
        return None  # an op whose impl does not follow its own rule is left alone
    return [constant(value, out.dtype)]


def constant_fold(graph: Graph, log) -> Graph:
    return rebuild(graph, _rule, log, "folded")
