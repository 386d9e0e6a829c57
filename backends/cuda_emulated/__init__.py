"""backend="cuda-emulated": the CUDA backend's generated kernels compiled for the host (g++ with an
emulation header for the CUDA execution model) and run on the CPU, so their semantics are tested
on machines without a GPU."""
from __future__ import annotations

from graphc.backends.base import Backend, Program
from graphc.backends.cuda.lower import Lowering, lower
from graphc.backends.cuda.plan import execute
from .build import HostMemory, build, compiler


class EmulatedLowering(Lowering):
    """cuda's lowering table, inherited. An entry that must differ under the host emulation is
    overridden here (`C_CODE = {**Lowering.C_CODE, op: "..."}`, `LOWERINGS = {**Lowering.LOWERINGS,
    op: fn}`); today the emulation runs every cuda kernel as it is."""
    C_CODE = dict(Lowering.C_CODE)
    C_INT_CODE = dict(Lowering.C_INT_CODE)
    REDUCERS = dict(Lowering.REDUCERS)
    LOWERINGS = dict(Lowering.LOWERINGS)


class CudaEmulatedBackend(Backend):
    name = "cuda-emulated"
    sanitizers = {"address": "kernels built with AddressSanitizer (run Python with the ASan runtime preloaded)"}
    lowering = EmulatedLowering

    def unavailable_reason(self) -> str | None:
        return None if compiler() else "no host C++ compiler (g++ or clang++) found"

    def lowered_ops(self) -> frozenset:
        return frozenset(self.lowering.table())

    def compile(self, graph, options=None) -> Program:
        source, plan = lower(graph, self.lowering)
        sanitize = options.sanitize if options is not None else None
        mem = HostMemory(build(source, plan, sanitize=sanitize), separate=bool(sanitize))

        def run(inputs, params, dims):
            return execute(plan, mem, inputs, params, dims)
        return Program(run, source, plan=plan, plan_text=plan.text(), fallback_ops=plan.fallback_ops,
                       kernels=dict(plan.kernels), memory=mem)


BACKEND = CudaEmulatedBackend()
