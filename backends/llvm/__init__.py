"""The LLVM backend: the optimised graph compiled with llvmlite to native code for this CPU.

Each set of dim values gets one specialisation (static loop bounds, an arena sized by the memory
plan) whose kernels run in one native call. The specialisation is a schedule (plan.Plan, a
graphc.backends.schedule Schedule: buffers, views, steps, the arena) rendered to LLVM IR
(program.py) and run by a small runtime (program.Specialised). Ops are lowered by their row in the
lowering table (table.PLAN, keyed by op object: the schedule's shared rows and llvm's kernel rows);
ops without a row run their NumPy impl in between (listed in `program.info["fallback_ops"]` and at
the top of `f.source`).
"""
from __future__ import annotations

import threading
import time

from graphc import shapes as _sh
from graphc.ir import Graph
from graphc.passes import pass_times

from ..base import Backend, Program


class LLVMProgram(Program):
    """run(inputs, params, dims): specialises on first use of each dims binding (static graphs: now)."""

    def __init__(self, graph: Graph, options):
        self.graph = graph
        self.options = options
        self._specs: dict = {}
        self._lock = threading.Lock()
        self._last = None
        # outputs are np.empty arrays made for each call: the caller owns them as they are
        self.info = {"fallback_ops": [], "asm": self._asm, "specialisations": self._specs, "fresh_outputs": True}
        from .tune import target_info   # the host's ISA, vector width, tiles, thread split per kernel kind
        self.info["target"] = target_info(graph)
        self.static = not any(_sh.free_symbols(t.shape) for n in graph.nodes for t in n.outputs)
        if self.static:
            self._specialise({})

    def _specialise(self, dims: dict):
        from .plan import Plan
        from .program import Specialised
        key = tuple(sorted(dims.items()))
        with self._lock:
            spec = self._specs.get(key)
            if spec is None:
                t0 = time.perf_counter()
                plan = Plan(self.graph, dims, bounds=self.options.sanitize == "bounds")
                t1 = time.perf_counter()
                spec = Specialised(plan)
                self._specs[key] = spec
                self.info["fallback_ops"] = sorted(set(self.info["fallback_ops"]) | spec.plan.fallback)
                self.info["cache_hit"] = spec.compiled.cache_hit
                # this specialisation's kernel steps, distinct kernel functions, kernels whose object code
                # came from the cache, and seconds per phase (passes: once per graph, in gc.function)
                self.info.update(kernels=spec.kernel_calls, kernel_functions=spec.kernel_functions,
                                 kernels_from_cache=spec.compiled.kernels_from_cache)
                times = {"passes": pass_times(self.graph).get("total", 0.0), "plan": t1 - t0, **spec.times}
                self.info["compile_time"] = {**times, "total": sum(times.values())}
            self._last = spec
        return spec

    def run(self, inputs, params, dims):
        return self.runner(dims)(inputs, params)

    def runner(self, dims):
        """run(inputs, params) of the specialisation for `dims` (compiled now if new): what gc.function's
        fast path calls for input shapes it has seen, without looking the dims up again."""
        spec = self._specs.get(tuple(sorted(dims.items()))) if dims else self._specs.get(())
        if spec is None:
            spec = self._specialise(dims)
        return spec.run

    @property
    def source(self) -> str:
        spec = self._last
        if spec is None:
            return ("; graphc llvm: not specialised yet (the graph has symbolic dims; each set of dim values "
                    "is compiled at its first call)\n")
        head = [f"; graphc llvm specialisation for dims {spec.plan.dims or '{}'}",
                f"; arena: {spec.plan.arena_bytes} bytes; native entries: "
                f"{sum(k == 'native' for k, _ in spec.segments)}",
                f"; host fallback ops (NumPy impl per node): {', '.join(sorted(spec.plan.fallback)) or 'none'}"]
        return "\n".join(head) + "\n" + spec.ir

    @source.setter
    def source(self, value):
        pass

    def _asm(self) -> str:
        return self._last.compiled.asm() if self._last is not None else ""


class LLVMBackend(Backend):
    name = "llvm"
    sanitizers = {"bounds": "every load, store, BLAS call and memset checked against its buffer's extent; "
                            "an out-of-bounds access raises a GraphcError naming the node (slow: debug only)"}

    def unavailable_reason(self):
        try:
            from . import jit
            jit.target_machine()
        except Exception as e:  # llvmlite missing or no native target
            return f"llvmlite cannot target this machine: {e}"
        return None

    def compile(self, graph: Graph, options=None) -> Program:
        from graphc.function import CompileOptions
        return LLVMProgram(graph, options if options is not None else CompileOptions(backend="llvm"))

    def lowered_ops(self) -> frozenset:
        """The ops with a row in the lowering table (table.PLAN: plan handlers, elementwise ops by their
        scalar row in lower.CODE_FOR_OP); every other op runs its NumPy impl on the host."""
        from .table import rows
        return frozenset(rows())


BACKEND = LLVMBackend()
