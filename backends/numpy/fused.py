"""Fused nodes as inline NumPy lines: each body op writes in place over a dying temporary where it can,
the last one straight into the output; an all-elementwise body runs in row chunks of about CHUNK
elements, so its temporaries stay in cache instead of streaming whole arrays through memory."""
from __future__ import annotations

from graphc import shapes as _sh
from graphc.ir import Trait
from . import emit as _emit
from .spellings import OUT_SPELLINGS, dims_code, dtype_code, into

#: elements per chunk: a few float32 temporaries of this size fit in a 1 MiB L2 cache (32k-128k measured alike on W2)
CHUNK = 65536


def _elementwise(n) -> bool:
    return n.op.has(Trait.ELEMENTWISE)


def _chunk_inputs(node):
    """Which inputs are sliced along axis 0 in chunked mode, or None when the body cannot be chunked."""
    body = node.attrs["body"]
    shape = node.outputs[0].shape
    if not shape or any(not _elementwise(n) for n in body.compute_nodes()):
        return None
    if isinstance(shape[0], int) and shape[0] <= 1:
        return None
    if _sh.is_static(shape) and _sh.size(shape) <= CHUNK:
        return None
    if any(len(o.shape) != len(shape) or not all(_sh.dims_equal(a, b) for a, b in zip(o.shape, shape))
           for o in node.outputs):
        return None
    sliced = []
    for t in node.inputs:
        spans = len(t.shape) == len(shape) and not (isinstance(t.shape[0], int) and t.shape[0] == 1)
        if spans and not _sh.dims_equal(t.shape[0], shape[0]):
            return None
        sliced.append(spans)
    return sliced


def emit_fused(em, node, inputs: list[str], targets: list, shared: int | None = None) -> list[str]:
    """Emit `node` (a fused node) into `em`; returns the variables holding its outputs. `shared`: the
    index of an input whose memory the (single) output reuses (the memory plan's in-place case)."""
    body = node.attrs["body"]
    outs = []
    for o, tgt in zip(node.outputs, targets):
        if tgt is None:
            tgt = em.names.fresh(o.name or "fused")
            em.add(f"{tgt} = np.empty({dims_code(o.shape)}, {dtype_code(o.dtype)})")
        outs.append(tgt)
    sliced = _chunk_inputs(node)
    if sliced is None:
        _body(em, body, inputs, outs, 1, {inputs[shared]} if shared is not None else set())
        return outs
    shape = node.outputs[0].shape
    row = _sh.size(shape[1:])
    step = str(max(1, CHUNK // row)) if isinstance(row, int) else f"max(1, {CHUNK} // max(1, {dims_code((row,))[1:-2]}))"
    em.add(f"_step = {step}")
    em.add(f"for _lo in range(0, {dims_code(shape[:1])[1:-2]}, _step):")
    em.add("_hi = _lo + _step", indent=2)
    ins = []
    for v, s in zip(inputs, sliced):
        if s:
            name = em.names.fresh(f"{v}_")
            em.add(f"{name} = {v}[_lo:_hi]", indent=2)
            v = name
        ins.append(v)
    chunk_outs = []
    for v in outs:
        name = em.names.fresh(f"{v}_")
        em.add(f"{name} = {v}[_lo:_hi]", indent=2)
        chunk_outs.append(name)
    _body(em, body, ins, chunk_outs, 2, {ins[shared]} if shared is not None else set())
    return outs


def _last_uses(body) -> dict[int, int]:
    last = {}
    nodes = body.compute_nodes()
    for i, n in enumerate(nodes):
        for t in n.inputs:
            last[id(t)] = i
    for t in body.outputs:
        last[id(t)] = len(nodes)
    return last


def _body(em, body, inputs, outs, indent, same_memory):
    """Lines for the body ops: in place over temporaries that die, the body outputs into `outs`
    (`same_memory`: input variables that share memory with the output)."""
    var = {id(p): v for p, v in zip(body.inputs, inputs)}
    for n in body.nodes:
        if n.op.has(Trait.CONST):
            t = n.outputs[0]
            var[id(t)] = em.scalar(t) or em.constant(t, "const")
    out_var = {id(t): v for t, v in zip(body.outputs, outs)}
    last, temps = _last_uses(body), set()
    comp = body.compute_nodes()
    head_into_out = (len(outs) == 1 and comp[0].op in OUT_SPELLINGS and len(comp) > 1  # np.matmul has out=
                     and into(comp[0], ["a"] * len(comp[0].inputs), "o") is not None
                     and comp[0].outputs[0].shape == body.outputs[0].shape
                     and comp[0].outputs[0].dtype == body.outputs[0].dtype)
    for i, n in enumerate(comp):
        o = n.outputs[0]
        args = [var[id(t)] for t in n.inputs]
        target = out_var.get(id(o))
        if target is None and i == 0 and head_into_out:  # GEMM straight into the output; epilogue in place
            target = outs[0]
            temps.add(target)
        elif target is None:
            target = _reuse(n, i, args, last, temps, var)
        name = target or em.names.fresh(o.name or n.op.name)
        if target is not None and any((a == target or a in same_memory) and not _emit.may_alias(n, j)
                                      for j, a in enumerate(args)):
            tmp = em.names.fresh(o.name or n.op.name)  # the spelling would overwrite an input it reads later
            lines = node_lines(em, n, args, None, tmp) + [f"np.copyto({target}, {tmp})"]
        else:
            lines = node_lines(em, n, args, target, name)
        for ln in lines:
            em.add(ln, n, indent)
        var[id(o)] = name
        if id(o) not in out_var and name not in outs:
            temps.add(name)


def _reuse(n, i, args, last, temps, var) -> str | None:
    """A temporary argument that dies here and has the result's shape/dtype: overwrite it."""
    if not _elementwise(n) or n.outputs[0].ndim == 0:
        return None
    o = n.outputs[0]
    for j, t in enumerate(n.inputs):
        v = args[j]
        if (v in temps and last.get(id(t)) == i and t.dtype == o.dtype and len(t.shape) == len(o.shape)
                and all(_sh.dims_equal(a, b) for a, b in zip(t.shape, o.shape)) and _emit.may_alias(n, j)
                and sum(1 for a in args if a == v) == 1):
            temps.discard(v)
            return v
    return None


def node_lines(em, n, args, target, name) -> list[str]:
    """Source lines computing node `n` into `target` (a planned buffer) or a new variable `name`."""
    lines = None
    if _elementwise(n) and (target is not None or n.outputs[0].ndim > 0):
        lines = _emit.emit(n, args, target, name)
    if lines is None and target is not None:
        line = into(n, args, target)
        lines = None if line is None else [line]
    if lines is None:
        e = em.expr(n, args)
        lines = [f"{target}[...] = {e}" if target else f"{name} = {e}"]
    return lines
