"""backend="cuda-emulated": the CUDA backend's generated kernels compiled for the host (g++ with an
emulation header for the CUDA execution model) and run on the CPU, so their semantics are tested
on machines without a GPU."""
from __future__ import annotations

from graphc.backends.base import Backend, Program
from graphc.backends.cuda.lower import lower
from graphc.backends.cuda.plan import execute
from .build import HostMemory, build, compiler


class CudaEmulatedBackend(Backend):
    name = "cuda-emulated"
    sanitizers = {"address": "kernels built with AddressSanitizer (run Python with the ASan runtime preloaded)"}

    def unavailable_reason(self) -> str | None:
        return None if compiler() else "no host C++ compiler (g++ or clang++) found"

    def compile(self, graph, options=None) -> Program:
        source, plan = lower(graph)
        mem = HostMemory(build(source, plan, sanitize=(options or {}).get("sanitize")))

        def run(inputs, params, dims):
            return execute(plan, mem, inputs, params, dims)
        return Program(run, source, plan=plan, plan_text=plan.text(), fallback_ops=plan.fallback_ops,
                       kernels=dict(plan.kernels))


BACKEND = CudaEmulatedBackend()
