"""backend="cuda": CUDA C generated from the optimised graph (lower.py), compiled with nvcc or
NVRTC (compiler.py), launched through the CUDA driver (runtime.py). Without a GPU it still
compiles (so f.source and compile errors are available) and raises BackendUnavailable on call."""
from __future__ import annotations

import threading

from graphc.backends.base import Backend, Program
from graphc.errors import BackendUnavailable
from .compiler import DEFAULT_ARCH, compile_cuda, nvcc_path, nvrtc_library
from .lower import Lowering, lower
from .plan import execute


class CudaBackend(Backend):
    name = "cuda"
    options = {"arch": f"GPU architecture the PTX is compiled for (default {DEFAULT_ARCH})"}
    lowering = Lowering  # the lowering table (backends/cuda/lower.py)

    def lowered_ops(self) -> frozenset:
        return frozenset(self.lowering.table())

    def unavailable_reason(self) -> str | None:
        from .runtime import driver
        try:
            driver()
        except BackendUnavailable as e:
            return str(e)
        return None

    def can_compile(self) -> bool:
        """True where CUDA C can be compiled (nvcc or NVRTC), GPU or not."""
        return bool(nvcc_path() or nvrtc_library())

    def compile(self, graph, options=None) -> Program:
        from graphc.function import CompileOptions
        options = options if options is not None else CompileOptions(backend="cuda")
        source, plan = lower(graph, self.lowering)
        arch = options.option("arch", DEFAULT_ARCH)
        ptx = compile_cuda(source, arch, "ptx")
        state = {}
        lock = threading.Lock()

        def run(inputs, params, dims):
            why = self.unavailable_reason()
            if why:
                raise BackendUnavailable(f"backend 'cuda' cannot run here: {why} (the graph was compiled "
                                         f"to PTX for {arch}; use backend='cuda-emulated' to run its kernels "
                                         f"on the CPU)")
            from .runtime import DeviceMemory, DeviceModule, make_current
            with lock:  # one device memory state per function: calls are serialised
                make_current()
                if "mem" not in state:
                    state["mem"] = DeviceMemory(_load(source, ptx, list(plan.kernels)), plan)
                mem = state["mem"]
                return execute(plan, mem, inputs, params, dims)
        return Program(run, source, plan=plan, plan_text=plan.text(), fallback_ops=plan.fallback_ops,
                       kernels=dict(plan.kernels), ptx=ptx, arch=arch)


def _load(source: str, ptx: bytes, kernels: list):
    """Load the PTX (the driver JIT-compiles it for the device); a driver older than the compiler's
    PTX version refuses it, so fall back to a cubin built for the device's own architecture."""
    from graphc.errors import GraphcError
    from .runtime import DeviceModule, device_arch
    try:
        return DeviceModule(ptx, kernels)
    except GraphcError:
        if not nvcc_path():
            raise
        return DeviceModule(compile_cuda(source, device_arch(), "cubin"), kernels)


BACKEND = CudaBackend()
