"""gc.scan on the CUDA path: the step body is lowered into the same translation unit (its kernels
sit beside the graph's) and the host runs the body's launch plan once per step, with the carries,
sequence slices and history as offsets into device buffers: no data leaves the device."""
from __future__ import annotations

from .plan import Plan, ScanLoop


def scan(L, node, optimize_body: bool = True) -> None:
    from .lower import Lowering
    body = node.attrs["body"]
    if optimize_body:  # the optimiser leaves scan bodies alone: fuse the step's elementwise work here
        try:
            from graphc.passes import optimize
            body = optimize(body, level=2)
        except ImportError:
            pass
    child = Lowering(body)
    child.dt, child.kernels, child.kinds, child.names = L.dt, L.kernels, L.kinds, L.names  # one module
    child.steps, child.buffers, child.status_nodes = [], [], L.status_nodes  # one list of error codes
    for i, t in enumerate(body.inputs):
        child.new_buffer(t, "input", index=i)
    for n in body.nodes:
        if n.op.name == "parameter":
            raise NotImplementedError("scan body with a parameter node")  # captured as inputs by gc.scan
        child.lower_node(n)
    plan = Plan(child.buffers, child.steps, [(child.buf(o), o.shape) for o in body.outputs], [], L.dt)
    ins = [L.buf(t) for t in node.inputs]
    outs = [L.new_buffer(t, hint="scan") for t in node.outputs]
    status = None
    if child.status is not None:
        if L.status is None:
            L.status_arg(node)  # creates the graph's status word (code unused)
        status = (child.status, L.status)
    L.steps.append(ScanLoop(node, plan, ins, outs, status))
