"""backend="cuda-emulated": the CUDA backend's generated kernels compiled for the host (g++ with an
emulation header for the CUDA execution model) and run on the CPU, so their semantics are tested
on machines without a GPU."""
from __future__ import annotations

from graphc.backends.base import Backend, Program
from graphc.backends.cuda.executor import execute
from graphc.backends.cuda.lower import CudaSchedule, lower
from .build import HostMemory, build, compiler


class EmulatedSchedule(CudaSchedule):
    """cuda's lowering table, inherited. An entry that must differ under the host emulation is
    overridden here (`C_CODE = {**CudaSchedule.C_CODE, op: "..."}`, `ROWS = {**CudaSchedule.ROWS,
    op: fn}`); today the emulation runs every cuda kernel as it is."""
    C_CODE = dict(CudaSchedule.C_CODE)
    C_INT_CODE = dict(CudaSchedule.C_INT_CODE)
    REDUCERS = dict(CudaSchedule.REDUCERS)
    ROWS = dict(CudaSchedule.ROWS)


class CudaEmulatedBackend(Backend):
    name = "cuda-emulated"
    sanitizers = {"address": "kernels built with AddressSanitizer (run Python with the ASan runtime preloaded)"}
    lowering = EmulatedSchedule

    def unavailable_reason(self) -> str | None:
        return None if compiler() else "no host C++ compiler (g++ or clang++) found"

    def lowered_ops(self) -> frozenset:
        return frozenset(self.lowering.rows())

    def compile(self, graph, options=None) -> Program:
        source, sched = lower(graph, self.lowering)
        sanitize = options.sanitize if options is not None else None
        mem = HostMemory(build(source, sched.steps, sanitize=sanitize), separate=bool(sanitize))

        def run(inputs, params, dims):
            return execute(sched, mem, inputs, params, dims)
        return Program(run, source, plan=sched, plan_text=sched.text(), fallback_ops=sched.fallback_ops,
                       kernels=dict(sched.kernels), memory=mem)


BACKEND = CudaEmulatedBackend()
