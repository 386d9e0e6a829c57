"""A fused node's body as one loop: every body tensor is evaluated at the current element of the
iteration shape (right-aligned broadcasting), so the body runs as straight-line scalar IR."""
from __future__ import annotations

from . import lower as _lo

#: body ops that are the identity per element (their broadcasting is done by the loop's index maps)
PER_ELEMENT_IDENTITY = {"broadcast_to", "stop_gradient"}


def _fits(shape, full) -> bool:
    if len(shape) > len(full):
        return False
    lead = len(full) - len(shape)
    return all(d == 1 or d == full[lead + i] for i, d in enumerate(shape))


def body_compute(node, out_shapes, shape_of):
    """compute(em, vals) -> output values for a purely elementwise body, else None."""
    body = node.attrs["body"]
    full = out_shapes[0] if out_shapes else ()
    if any(tuple(s) != tuple(full) for s in out_shapes):
        return None
    for n in body.nodes:
        name = n.op.name
        if name == "placeholder":
            continue
        if name == "constant":
            if n.attrs["value"].size != 1:
                return None
            continue
        if not (getattr(n.op, "elementwise", False) or name == "cast" or name in PER_ELEMENT_IDENTITY):
            return None
        if not _fits(shape_of(n.outputs[0]), full):
            return None

    def compute(em, vals):
        env = {id(ph): v for ph, v in zip(body.inputs, vals)}
        for n in body.nodes:
            name = n.op.name
            if name == "placeholder":
                continue
            t = n.outputs[0]
            if name == "constant":
                from .irtext import literal
                env[id(t)] = (literal(n.attrs["value"].reshape(-1)[0].item(), t.dtype), t.dtype)
                continue
            args = [env[id(x)] for x in n.inputs]
            if name in PER_ELEMENT_IDENTITY:
                env[id(t)] = args[0]
                continue
            if name == "cast":
                env[id(t)] = (_lo.convert(em, args[0][0], args[0][1], t.dtype), t.dtype)
                continue
            env[id(t)] = (_lo.lower(em, name, n.attrs, args, t.dtype), t.dtype)
        return [_lo.convert(em, *env[id(o)], o.dtype) for o in body.outputs]
    return compute
