"""backend="cuda": CUDA C generated from the optimised graph (lower.py), compiled with nvcc or
NVRTC (compiler.py), launched through the CUDA driver (runtime.py). Without a GPU it still
compiles (so f.source and compile errors are available) and raises BackendUnavailable on call."""
from __future__ import annotations

import threading

from graphc.backends.base import Backend, Program
from graphc.errors import BackendUnavailable
from .compiler import DEFAULT_ARCH, compile_cuda, nvcc_path, nvrtc_library
from .executor import execute
from .lower import CudaSchedule, lower


class CudaBackend(Backend):
    name = "cuda"
    options = {"arch": f"GPU architecture the PTX is compiled for (default {DEFAULT_ARCH})"}
    lowering = CudaSchedule  # the schedule and its lowering table (backends/cuda/lower.py)

    def lowered_ops(self) -> frozenset:
        return frozenset(self.lowering.rows())

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
        source, sched = lower(graph, self.lowering)
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
            from .runtime import DeviceMemory, make_current
            with lock:  # one device memory state per function: calls are serialised
                make_current()
                if "mem" not in state:
                    state["mem"] = DeviceMemory(_load(source, ptx, list(sched.kernels)))
                mem = state["mem"]
                return execute(sched, mem, inputs, params, dims)
        return Program(run, source, plan=sched, plan_text=sched.text(), fallback_ops=sched.fallback_ops,
                       kernels=dict(sched.kernels), ptx=ptx, arch=arch)


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
