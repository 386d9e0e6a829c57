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
from graphc.errors import GraphcError
from graphc.ir import Graph
from graphc.passes import pass_times

from ..base import Backend, Program


def warm_entry(key: str, dims: tuple) -> str:
    """The name of the warm-cache entry of the specialisation for `dims` (sorted (name, value) pairs)."""
    from graphc.backends.schedule import warm
    return warm.sub_key(key, "llvm specialisation", repr(dims))


class LLVMProgram(Program):
    """run(inputs, params, dims): specialises on first use of each dims binding (static graphs: now).

    Warm start (backends/schedule/warm.py): with `warm` (the graph's warm-cache key) every specialisation
    is stored under it, and looked up there first: a hit links the cached object code and needs neither
    the plan nor the IR. A program made by `LLVMBackend.warm_program` has no optimised graph yet (`graph`
    is then a function making it, run the first time a specialisation misses, or f.explain/f.source ask)."""

    def __init__(self, graph, options, warm: str | None = None, static: bool | None = None):
        self._graph = graph if isinstance(graph, Graph) else None
        self._make_graph = None if isinstance(graph, Graph) else graph
        self.options = options
        self.warm_key = warm
        self._specs: dict = {}
        self._lock = threading.Lock()
        self._last = None
        # outputs are np.empty arrays made for each call: the caller owns them as they are
        self.info = {"fallback_ops": [], "asm": self._asm, "specialisations": self._specs, "fresh_outputs": True}
        from .tune import target_info   # the host's ISA, vector width, tiles, thread split per kernel kind
        self.info["target"] = target_info(self._graph)
        self.static = static if self._graph is None else \
            not any(_sh.free_symbols(t.shape) for n in graph.nodes for t in n.outputs)
        if self.static:
            self._specialise({})

    @property
    def graph(self) -> Graph:
        """The optimised graph (made now, by the passes, for a program started from the warm cache)."""
        if self._graph is None:
            self._graph = self._make_graph()
        return self._graph

    def _specialise(self, dims: dict):
        from . import tune
        from .plan import Plan
        from .program import Specialised
        key = tuple(sorted(dims.items()))
        with self._lock:
            spec = self._specs.get(key)
            if spec is None:
                name = None if self.warm_key is None else f"{warm_entry(self.warm_key, key)}.spec"
                bounds = self.options.sanitize == "bounds"
                spec = None if name is None or bounds else Specialised.restore(
                    name, lambda: Plan(self.graph, dims, bounds=bounds))
                if spec is not None:
                    times = {"passes": 0.0, "plan": 0.0, **spec.times}
                    self.info["target"]["gemm"]["products"] += [
                        f"{n}x{k}x{m} {dt[len(tune.KERNEL_TAG):]}: {'BLAS' if t else 'micro-kernel'} (warm cache)"
                        if dt.startswith(tune.KERNEL_TAG) else
                        f"{n}x{k}x{m} {dt}: {t} thread{'s' * (t > 1)} (warm cache)"
                        for n, k, m, dt, t in spec.decisions]
                else:
                    t0 = time.perf_counter()
                    plan = Plan(self.graph, dims, bounds=bounds)
                    t1 = time.perf_counter()
                    spec = Specialised(plan, warm=name)
                    times = {"passes": pass_times(self.graph).get("total", 0.0), "plan": t1 - t0, **spec.times}
                self._specs[key] = spec
                self.info["fallback_ops"] = sorted(set(self.info["fallback_ops"]) | spec.fallback)
                self.info["cache_hit"] = spec.compiled.cache_hit
                #: whether this specialisation came from the warm-start cache (no passes, plan or lowering)
                self.info["warm_hit"] = spec.warm
                # this specialisation's kernel steps, distinct kernel functions, kernels whose object code
                # came from the cache, and seconds per phase (passes: once per graph, in gc.function)
                self.info.update(kernels=spec.kernel_calls, kernel_functions=spec.kernel_functions,
                                 kernels_from_cache=spec.compiled.kernels_from_cache)
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
                f"; host fallback ops (NumPy impl per node): {', '.join(sorted(spec.fallback)) or 'none'}"]
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
        except GraphcError:   # a setting graphc rejects (GRAPHC_LLVM_ISA): the user's error, said as it is
            raise
        except Exception as e:  # llvmlite missing or no native target
            return f"llvmlite cannot target this machine: {e}"
        return None

    def compile(self, graph: Graph, options=None, warm: str | None = None) -> Program:
        """The program of optimised `graph`; `warm`: its warm-cache key (warm_key), under which each
        specialisation is stored and looked up."""
        from graphc.function import CompileOptions
        return LLVMProgram(graph, options if options is not None else CompileOptions(backend="llvm"), warm)

    def warm_key(self, user_graph: Graph, options) -> str | None:
        """The warm-start cache key of compiling `user_graph` (before any pass) with `options` here: the
        graph, options, graphc's code and state, the environment (warm.graph_key) and this host's code
        generation (target, pipeline, ISA, thread counts, BLAS); None: not cacheable."""
        from graphc.backends.schedule import warm
        from . import jit, tune
        b = jit.blas()
        host = "|".join([jit.target_id(), jit.pipeline_id(), tune.isa(), str(tune.threads()),
                         str(tune.max_blas_threads()), tune.mode(), "none" if b is None else
                         f"{b['library']} ilp64={b['ilp64']}"])
        return warm.graph_key(user_graph, options, "llvm|" + host)

    def warm_load(self, name: str):
        """A warm-cache entry stored by `warm_store` (a (value, ...) tuple), or None (a miss)."""
        from graphc.backends.schedule import warm
        return warm.load(name)

    def warm_store(self, name: str, value) -> None:
        from graphc.backends.schedule import warm
        warm.store(name, value)

    def warm_program(self, key: str, options, make_graph, static: bool) -> Program:
        """The program of a graph whose optimised form is made only when needed (`make_graph()`): every
        specialisation comes from the warm cache under `key` when it can (gc.function's warm start)."""
        return LLVMProgram(make_graph, options, key, static)

    def lowered_ops(self) -> frozenset:
        """The ops with a row in the lowering table (table.PLAN: plan handlers, elementwise ops by their
        scalar row in lower.CODE_FOR_OP); every other op runs its NumPy impl on the host."""
        from .table import rows
        return frozenset(rows())


BACKEND = LLVMBackend()
