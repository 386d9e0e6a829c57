"""Fused bodies as loops. A body is split, in schedule order, into runs of per-element ops (regions)
and other ops (matmul heads, closing reductions). Each region becomes one loop that evaluates every
region tensor at the current element of the loop shape (right-aligned broadcasting) as straight-line
scalar IR and stores only the tensors used after the region: so matmul + bias + ReLU is a GEMM and
one epilogue loop, and an elementwise group closed by a sum is one loop and one reduction."""
from __future__ import annotations

from graphc.ir import Trait, ops_with
from graphc.ops.core import StopGradient
from graphc.ops.shape_ops import BroadcastTo
from graphc.passes.cse import freeze

from . import lower as _lo
from .irtext import literal

#: movement ops that are the identity per element (their broadcasting is done by the loop's index maps)
PER_ELEMENT_IDENTITY = frozenset({BroadcastTo, StopGradient})
#: the other movement ops only make a view (no loop): planned in place without closing the open region
VIEW_OPS = ops_with(Trait.MOVEMENT) - PER_ELEMENT_IDENTITY


def per_element(n) -> bool:
    return n.op.has(Trait.ELEMENTWISE) or n.op in PER_ELEMENT_IDENTITY


def _fits(shape, full) -> bool:
    if len(shape) > len(full):
        return False
    lead = len(full) - len(shape)
    return all(d == 1 or d == full[lead + i] for i, d in enumerate(shape))


def region_compute(nodes, inputs, outputs, shape_of):
    """compute(em, [(value, dtype) per input]) -> values of `outputs`, or None when the region's
    tensors do not all broadcast into one loop shape."""
    if not outputs:
        return None
    full = shape_of(outputs[0])
    if any(shape_of(o) != full for o in outputs) or not all(_fits(shape_of(n.outputs[0]), full) for n in nodes):
        return None
    consts = {}
    for n in nodes:
        for t in n.inputs:
            if t.node.op.has(Trait.CONST) and t.node.attrs["value"].size == 1:
                consts[id(t)] = (literal(t.node.attrs["value"].reshape(-1)[0].item(), t.dtype), t.dtype)

    def compute(em, vals):
        env = dict(consts)
        env.update({id(t): v for t, v in zip(inputs, vals)})
        for n in nodes:
            t = n.outputs[0]
            args = [env[id(x)] for x in n.inputs]
            if n.op in PER_ELEMENT_IDENTITY:
                env[id(t)] = args[0]
            else:
                env[id(t)] = (_lo.lower(em, n.op, n.attrs, args, t.dtype), t.dtype)
        return [_lo.convert(em, *env[id(o)], o.dtype) for o in outputs]
    compute.key = _region_key(nodes, inputs, outputs, consts)
    return compute


def _region_key(nodes, inputs, outputs, consts):
    """What compute() emits depends on, as a hashable value (None when a node reads a tensor the region
    neither computes nor takes): per node its op, attrs, argument positions (a region input, an earlier
    node, a literal constant) and dtype. Two regions with equal keys emit the same IR for the same input
    dtypes (kernels.memo_key: one emission serves every copy of a repeated layer or chain)."""
    pos = {id(t): ("in", i) for i, t in enumerate(inputs)}
    pos.update({k: ("lit",) + v for k, v in consts.items()})
    items = []
    for j, n in enumerate(nodes):
        args = tuple(pos.get(id(x)) for x in n.inputs)
        if None in args:
            return None
        try:
            attrs = freeze(n.attrs, strict=True)
        except TypeError:
            return None
        items.append((n.op, attrs, args, n.outputs[0].dtype))
        pos[id(n.outputs[0])] = ("node", j)
    outs = tuple((pos.get(id(o)), o.dtype) for o in outputs)
    return ("region", tuple(items), outs)
