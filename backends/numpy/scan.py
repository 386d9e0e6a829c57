"""gc.scan on the NumPy backend: the step body (optimised by the pass pipeline with the graph, at the
function's level) is compiled once by this backend (generated source of its own, with its workspace)
and run by the scan op's own loop (`Scan.loop`: history, stacked ys, zero-length loops), once per step."""
from __future__ import annotations

import weakref

from graphc.ir import Graph

#: body Graph -> {plan_memory: the compiled body's Program}
_COMPILED: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def compiled_body(body: Graph, options):
    """The Program of scan body `body` under `options` (a CompileOptions); compiled once per body."""
    progs = _COMPILED.setdefault(body, {})
    prog = progs.get(options.plan_memory)
    if prog is None:
        from . import BACKEND
        prog = progs[options.plan_memory] = BACKEND.compile(body, options)
    return prog


def scan_runner(node, options):
    """`run(*inputs, dims) -> outputs` for scan node `node` (called by the generated line)."""
    attrs = dict(node.attrs)
    body = attrs["body"]
    prog = compiled_body(body, options)
    params = body.parameters
    run_body, loop = prog.run, node.op.loop

    def run(*args, dims):
        pv = [p.value for p in params]

        def step(values, dims):
            return run_body(values, pv, dims)[0]
        return loop(step, args, dims=dims, **attrs)
    return run
