"""Symbol-to-symbol differentiation: grad (reverse), jvp (forward), jacobian, hessian, hvp.

The rules live with the ops (`Op.vjp`, `Op.jvp`); this module only walks the graph. A gradient is
a graph of ordinary nodes, so it can be printed, optimised, compiled and differentiated again.
"""
from __future__ import annotations

from typing import Sequence

from graphc import ops as F
from . import dtypes as _dt
from .errors import GradientError
from .ir import Node, Tensor, fmt_loc, toposort


def _as_list(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


def _depends_on(nodes: list[Node], sources: set[int]) -> set[int]:
    """ids of tensors that depend on any tensor id in `sources` (inclusive)."""
    dep = set(sources)
    for node in nodes:
        if any(id(t) in dep for t in node.inputs):
            dep.update(id(t) for t in node.outputs)
    return dep


def _sum(terms: list[Tensor]) -> Tensor:
    tiled = _tiles(terms)
    if tiled is not None:
        return tiled
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _tiles(terms: list[Tensor]):
    """Cotangents of slices x[..., a:b, ...] that tile one axis of x (an LSTM's four gates of z): their
    pieces concatenated, not a zero-filled scatter each summed. None when the terms are not that."""
    from .ops.shape_ops import IndexGrad
    if len(terms) < 2 or any(t.node.op is not IndexGrad for t in terms):
        return None
    like = terms[0].node.inputs[1]
    axis, pieces = None, []
    for t in terms:
        index = t.node.attrs["index"]
        if t.node.inputs[1] is not like or not isinstance(index, tuple) or len(index) > like.ndim:
            return None
        cut = [i for i, s in enumerate(index) if not (isinstance(s, slice) and s == slice(None))]
        if len(cut) != 1 or (axis is not None and cut[0] != axis) or not isinstance(index[cut[0]], slice):
            return None
        axis, dim = cut[0], like.shape[cut[0]]
        if not isinstance(dim, int):
            return None
        start, stop, step = index[axis].indices(dim)
        if step != 1 or stop <= start:
            return None
        pieces.append((start, stop, t.node.inputs[0]))
    pieces.sort(key=lambda p: p[0])
    if pieces[0][0] != 0 or pieces[-1][1] != like.shape[axis] or any(
            a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
        return None
    return F.concatenate([g for _, _, g in pieces], axis)


def backprop(roots: Sequence[tuple[Tensor, Tensor]], wrt: Sequence[Tensor], stop: Sequence[Tensor] = ()):
    """Accumulate cotangents from (tensor, cotangent) pairs back to `wrt`; returns {id: cotangent}."""
    nodes = toposort([t for t, _ in roots] + list(wrt))
    stop_ids = {id(t) for t in stop}
    relevant = _depends_on(nodes, {id(t) for t in wrt})
    contrib: dict[int, list[Tensor]] = {}
    for t, g in roots:
        contrib.setdefault(id(t), []).append(g)
    wrt_ids = {id(t) for t in wrt}
    for node in reversed(nodes):
        gouts = [(_sum(contrib[id(o)]) if id(o) in contrib else None) for o in node.outputs]
        if all(g is None for g in gouts) or not node.inputs:
            continue
        if any(id(o) in stop_ids for o in node.outputs):
            continue
        need = [id(x) in relevant and _dt.is_float(x.dtype) for x in node.inputs]
        if not any(need):
            continue
        try:
            gins = node.op.vjp(node, gouts)
        except GradientError:
            raise
        except NotImplementedError as e:
            raise GradientError(f"op {node.op.name!r} has no gradient rule ({e}); node built at {fmt_loc(node.loc)}")
        for x, gx, nd in zip(node.inputs, gins, need):
            if gx is None or not nd:
                continue
            if gx.shape != x.shape and not _same_shape(gx.shape, x.shape):
                raise GradientError(f"internal: {node.op.name} vjp gave shape {gx.shape} for input of shape {x.shape}")
            contrib.setdefault(id(x), []).append(gx)
    return {k: _sum(v) for k, v in contrib.items() if k in wrt_ids}


def _same_shape(a, b):
    from .shapes import dims_equal
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def grad(cost: Tensor, wrt, consider_constant: Sequence[Tensor] = (), known_grads: dict | None = None,
         disconnected: str = "raise"):
    """d cost / d wrt as new graph nodes; `wrt` a tensor or list (placeholders, parameters, any
    intermediate). `consider_constant` tensors pass no gradient; `known_grads` {tensor: cotangent}
    adds cotangents of other tensors; disconnected='raise'|'zero' for wrt the cost does not use."""
    wrt_list, is_list = _as_list(wrt)
    roots = []
    if cost is not None:
        cost = F.as_tensor(cost)
        if cost.ndim != 0:
            raise GradientError(f"grad: cost must be a scalar, got shape {cost.shape}; reduce it (e.g. .sum()) first")
        if not _dt.is_float(cost.dtype):
            raise GradientError(f"grad: cost must be float, got {cost.dtype}")
        roots.append((cost, F.constant(1, cost.dtype)))
    for t, g in (known_grads or {}).items():
        roots.append((t, F.as_tensor(g)))
    for w in wrt_list:
        if not isinstance(w, Tensor):
            raise GradientError(f"grad: wrt must be tensors, got {type(w).__name__}")
        if not _dt.is_float(w.dtype):
            raise GradientError(f"grad: cannot differentiate with respect to {w.label} of dtype {w.dtype}")
    got = backprop(roots, wrt_list, consider_constant)
    reachable = {id(t) for n in toposort([t for t, _ in roots]) for t in n.outputs}
    out = []
    for w in wrt_list:
        g = got.get(id(w))
        if g is None and id(w) in reachable:  # connected only through integer or zero-gradient paths
            g = F.zeros_like(w)
        if g is None:
            if disconnected == "raise":
                raise GradientError(f"grad: the cost does not depend on {w.label} ({w.type_str}); "
                                    "pass disconnected='zero' to get zeros")
            g = F.zeros_like(w)
        out.append(F.cast(g, w.dtype))
    return out if is_list else out[0]


def _derived_jvp(node: Node, tangents: list) -> list:
    """J t from the reverse rule: d/du <vjp(u), t> for a dummy cotangent u (vjp is linear in u)."""
    us = [F.zeros_like(o) if _dt.is_float(o.dtype) else None for o in node.outputs]
    gins = node.op.vjp(node, us)
    inner = [F.sum(gi * t) for gi, t in zip(gins, tangents) if gi is not None and t is not None]
    if not inner:
        return [None] * len(node.outputs)
    s = _sum(inner)
    live = [u for u in us if u is not None]
    res = iter(grad(s, live, disconnected="zero"))
    return [next(res) if u is not None else None for u in us]


def jvp(outputs, wrt, tangents):
    """Forward mode (Theano's R-op): the directional derivatives of `outputs` along `tangents`."""
    outs, is_list = _as_list(outputs)
    wrt_list, _ = _as_list(wrt)
    tans, _ = _as_list(tangents)
    if len(tans) != len(wrt_list):
        raise GradientError(f"jvp: {len(wrt_list)} wrt tensors but {len(tans)} tangents")
    tmap = {}
    for w, t in zip(wrt_list, tans):
        t = F.as_tensor(t) if isinstance(t, Tensor) else F.constant(t, w.dtype)
        if not _same_shape(t.shape, w.shape):
            raise GradientError(f"jvp: tangent for {w.label} has shape {t.shape}, expected {w.shape}")
        tmap[id(w)] = F.cast(t, w.dtype)
    for node in toposort(outs + wrt_list):
        if any(id(o) in tmap for o in node.outputs):
            continue
        ts = [tmap.get(id(x)) if _dt.is_float(x.dtype) else None for x in node.inputs]
        if all(t is None for t in ts):
            continue
        rule = node.op.jvp
        res = rule(node, ts) if rule is not None else _derived_jvp(node, ts)
        for o, r in zip(node.outputs, res):
            if r is not None:
                tmap[id(o)] = r
    res = [tmap[id(o)] if id(o) in tmap else F.zeros_like(o) for o in outs]
    return res if is_list else res[0]


def _static_size(t: Tensor, what: str) -> int:
    n = t.size
    if not isinstance(n, int):
        raise GradientError(f"{what} needs static shapes, {t.label} has shape {t.shape}")
    return n


def _check_wrt(xs, what: str) -> None:
    if not xs:
        raise GradientError(f"{what}: wrt is an empty list; give a tensor or a list of tensors")
    for x in xs:
        if not isinstance(x, Tensor):
            raise GradientError(f"{what}: wrt must be a tensor or a list of tensors, got {type(x).__name__}")


def jacobian(y: Tensor, x):
    """dy/dx of shape y.shape + x.shape (one reverse pass per element of y). `x` a list: the list of
    blocks dy/dx_i, each y.shape + x_i.shape (the same reverse passes serve every block)."""
    xs, is_list = _as_list(x)
    _check_wrt(xs, "jacobian")
    y = F.as_tensor(y)
    n = _static_size(y, "jacobian")
    flat = F.reshape(y, (n,))
    rows = [grad(flat[i], xs, disconnected="zero") for i in range(n)]
    out = []
    for j, xj in enumerate(xs):
        if not rows:
            out.append(F.broadcast_to(F.constant(0, xj.dtype), y.shape + xj.shape))
        else:
            out.append(F.reshape(F.stack([r[j] for r in rows], 0), y.shape + xj.shape))
    return out if is_list else out[0]


def hessian_blocks(grads: Sequence[Tensor], wrt: Sequence[Tensor]) -> list[list[Tensor]]:
    """H[i][j] = d grads[i] / d wrt[j] (shape grads[i].shape + wrt[j].shape): the Hessian blocks
    when `grads` are the gradients of one cost with respect to `wrt`."""
    return [jacobian(g, list(wrt)) for g in grads]


def hessian(cost: Tensor, x):
    """Second derivatives of a scalar cost w.r.t. x: shape x.shape + x.shape. `x` a list of tensors
    [x_1, ..., x_k] (e.g. a model's parameters): the blocks as a list of k lists, H[i][j] =
    d2 cost / dx_i dx_j of shape x_i.shape + x_j.shape."""
    xs, is_list = _as_list(x)
    _check_wrt(xs, "hessian")
    blocks = hessian_blocks(grad(cost, xs), xs)
    return blocks if is_list else blocks[0][0]


def hvp(cost: Tensor, wrt, v):
    """Hessian-vector product H v by double backprop (the Hessian is never formed)."""
    wrt_list, is_list = _as_list(wrt)
    vs, _ = _as_list(v)
    gs = grad(cost, wrt_list)
    inner = _sum([F.sum(g * F.as_tensor(vi)) for g, vi in zip(gs, vs)])
    res = grad(inner, wrt_list, disconnected="zero")
    return res if is_list else res[0]
