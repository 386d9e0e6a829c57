"""gc.scan on the CUDA path: the step body is lowered into the same translation unit (its kernels
sit beside the graph's) and the host runs the body's launch plan once per step, with the carries,
sequence slices and history as offsets into device buffers: no data leaves the device.

The body is lowered as the pass pipeline left it (optimised at the user's `optimize` level, like
every other backend): unfused ops and fused groups both go through the same lowering table."""
from __future__ import annotations

from graphc.errors import GraphcError
from graphc.ir import Trait
from graphc.ops.scan import Scan
from .plan import Plan, ScanLoop


def scan(L, node) -> None:
    body = node.attrs["body"]
    child = type(L)(body)  # the same backend's table (cuda_emulated may override entries)
    child.dt, child.kernels, child.kinds, child.names = L.dt, L.kernels, L.kinds, L.names  # one module
    child.steps, child.buffers, child.status_codes = [], [], L.status_codes  # one registry of error codes
    for i, t in enumerate(body.inputs):
        child.new_buffer(t, "input", index=i)
    for n in body.nodes:
        if n.op.has(Trait.STATE):  # gc.scan captures parameters as inputs; a hand-built body may not
            raise GraphcError(f"scan body reads the parameter {n.outputs[0].name!r} directly: "
                              f"pass it to the body as an input")
        child.lower_node(n)
    plan = Plan(child.buffers, child.steps, [(child.buf(o), o.shape) for o in body.outputs], [], L.dt)
    ins = [L.buf(t) for t in node.inputs]
    outs = [L.new_buffer(t, hint="scan") for t in node.outputs]
    status = None
    if child.status is not None:
        status = (child.status, L.status_word())  # the body's word is the graph's
    L.steps.append(ScanLoop(node, plan, ins, outs, status))


#: rows of the cuda lowering table (backends/cuda/lower.py): op -> fn(lowering, node)
LOWERINGS = {Scan: scan}
