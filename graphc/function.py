"""gc.function: compile a graph into a callable; input checking, symbolic-dim binding, updates."""
from __future__ import annotations

import difflib
import importlib
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import dtypes as _dt
from . import shapes as _sh
from .errors import BackendUnavailable, GraphcError, InputError, NumericalError, ShapeError, UnknownBackend
from .ir import Graph, Tensor, Trait, fmt_loc, hook

#: backend name -> module that defines BACKEND (loaded on first use; core never imports them eagerly)
BACKENDS = {"numpy": "graphc.backends.numpy", "llvm": "graphc.backends.llvm", "cuda": "graphc.backends.cuda",
            "cuda-emulated": "graphc.backends.cuda_emulated"}
_loaded: dict = {}


def get_backend(name: str, for_compile: bool = False):
    """The Backend object called `name`; raises UnknownBackend or BackendUnavailable (with the reason).
    `for_compile=True` accepts a backend that cannot run here but can still compile (its `can_compile()`,
    e.g. cuda without a GPU): its program raises BackendUnavailable when called."""
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name]).BACKEND
        except (ImportError, AttributeError) as e:  # not installed, or a module without BACKEND
            raise BackendUnavailable(f"backend {name!r} is not usable here: {e}") from None
    be = _loaded[name]
    why = be.unavailable_reason()
    if why and not (for_compile and getattr(be, "can_compile", lambda: False)()):
        raise BackendUnavailable(f"backend {name!r} is not usable here: {why}")
    return be


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    out = []
    for name in BACKENDS:
        try:
            get_backend(name)
            out.append(name)
        except GraphcError:
            pass
    return out


#: gc.function keyword options every backend accepts
COMMON_OPTIONS = {"mode": "None, or 'debug': check every intermediate for NaN/Inf",
                  "disable": "names of optimisation passes to skip",
                  "debug_passes": "check the graph after every pass",
                  "sanitize": "a native-code checker (backend.sanitizers)",
                  "allow_input_downcast": "convert inputs of a wider dtype of the same kind (float64 data "
                                          "into a float32 placeholder) instead of refusing them"}
#: gc.function's own parameters (listed with the options in the unknown-option message)
SIGNATURE = ("inputs", "outputs", "updates", "backend", "optimize")
MODES = (None, "debug")
LEVELS = (0, 1, 2)


@dataclass(frozen=True)
class CompileOptions:
    """Every gc.function keyword, checked in one place (`CompileOptions.make`) and handed to the backend.

    `optimize` is read here and nowhere else: `optimise(graph)` runs the pass pipeline at the function's
    level (on its graph, and on nested bodies a backend compiles itself), and `plan_memory` says whether
    a backend honours a memory plan. Backends read the other fields, and their own keywords with
    `option(name, default)` (e.g. cuda's `arch`)."""

    backend: str = "numpy"
    optimize: int = 2
    mode: str | None = None
    disable: tuple[str, ...] = ()
    debug_passes: bool = False
    sanitize: str | None = None
    allow_input_downcast: bool = False
    #: backend-specific keywords, as sorted (name, value) pairs
    backend_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, backend: str = "numpy", optimize: int = 2, **options) -> "CompileOptions":
        """The options of ``gc.function(..., backend=, optimize=, **options)``; unknown options and unsupported
        values are refused with a GraphcError (UnknownBackend/BackendUnavailable for the backend)."""
        be = get_backend(backend, for_compile=True)
        known = {**COMMON_OPTIONS, **be.options}
        for k in options:
            if k not in known:
                every = sorted(set(known) | set(SIGNATURE) - {"inputs", "outputs"})
                near = difflib.get_close_matches(k, every, n=1, cutoff=0.6)
                raise GraphcError(f"gc.function: unknown option {k}= for backend {be.name!r}; known: "
                                  f"{', '.join(f'{o}=' for o in every)}"
                                  + (f"; did you mean {near[0]}=?" if near else ""))
        mode = options.get("mode")
        if mode not in MODES:
            raise GraphcError(f"gc.function: mode={mode!r}; expected None or 'debug'")
        san = options.get("sanitize")
        if san is not None and san not in be.sanitizers:
            offer = ", ".join(f"{n!r} ({b})" for b, n in _sanitizer_offers()) or "none"
            raise GraphcError(f"gc.function: sanitize={san!r} is not supported by backend {be.name!r} "
                              f"(supported there: {', '.join(map(repr, be.sanitizers)) or 'none'}; "
                              f"sanitizers by backend: {offer})")
        if optimize not in LEVELS:
            raise GraphcError(f"optimize must be 0, 1 or 2, got {optimize!r}")
        disable = options.get("disable") or ()
        disable = (disable,) if isinstance(disable, str) else tuple(disable)
        from .passes import PIPELINE
        unknown = set(disable) - {p.name for p in PIPELINE}
        if unknown:
            raise GraphcError(f"unknown pass name(s) {sorted(unknown)}; passes are {[p.name for p in PIPELINE]}")
        downcast = options.get("allow_input_downcast", False)
        if not isinstance(downcast, bool):
            raise GraphcError(f"gc.function: allow_input_downcast must be True or False, got {downcast!r}")
        extra = tuple(sorted((k, v) for k, v in options.items() if k not in COMMON_OPTIONS))
        return cls(backend, int(optimize), mode, disable, bool(options.get("debug_passes", False)), san, downcast,
                   extra)

    @property
    def debug(self) -> bool:
        """mode="debug": the function evaluates the unoptimised graph node by node, checking for NaN/Inf."""
        return self.mode == "debug"

    @property
    def plan_memory(self) -> bool:
        """Whether the backend places intermediates by the memory plan (graphc.passes.memory)."""
        return self.optimize >= 2

    def optimise(self, graph: Graph) -> Graph:
        """`graph` through the pass pipeline at this level, skipping `disable` (a new Graph)."""
        from .passes import optimize as run_passes
        return run_passes(graph, level=self.optimize, disable=self.disable, debug_passes=self.debug_passes)

    def option(self, name: str, default=None):
        """A backend-specific keyword's value (`default` when not given)."""
        return dict(self.backend_options).get(name, default)


def _sanitizer_offers():
    """(backend, sanitizer) pairs over every installed backend (for the error message)."""
    for name, mod in BACKENDS.items():
        try:
            be = _loaded.get(name) or importlib.import_module(mod).BACKEND
        except (ImportError, AttributeError):
            continue
        for s in getattr(be, "sanitizers", {}):
            yield name, s


def _check_updates(updates):
    from .ops.core import Parameter, as_tensor, cast
    out = []
    for item in updates or ():
        try:
            p, v = item
        except (TypeError, ValueError):
            raise GraphcError(f"updates must be (parameter, new_value) pairs, got {item!r}") from None
        if not isinstance(p, Parameter):
            raise GraphcError(f"updates: {getattr(p, 'label', p)!r} is not a parameter")
        v = as_tensor(v)
        if len(v.shape) != len(p.shape) or not all(_sh.dims_equal(a, b) for a, b in zip(v.shape, p.shape)):
            raise GraphcError(f"updates: new value for {p.name} has shape {_sh.fmt_shape(v.shape)}, "
                              f"expected {_sh.fmt_shape(p.shape)}")
        if v.dtype != p.dtype:
            if not np.can_cast(v.dtype, p.dtype, "same_kind"):
                raise GraphcError(f"updates: new value for {p.name} has dtype {v.dtype}, expected {p.dtype}")
            v = cast(v, p.dtype)
        out.append((p, v))
    if len({id(p) for p, _ in out}) != len(out):
        raise GraphcError("updates: a parameter appears twice")
    return out


def _output(o, i: int) -> Tensor:
    from .ops.core import as_tensor
    if isinstance(o, Tensor):
        return o
    if isinstance(o, (bool, int, float, complex, np.ndarray, np.generic)):
        return as_tensor(o)   # a constant output
    raise GraphcError(f"gc.function: output {i} must be a tensor, got {type(o).__name__} {o!r}")


class Function:
    """A compiled graph. Call it with arrays for the inputs; returns array(s)."""

    def __init__(self, inputs, outputs, updates=None, backend="numpy", optimize=2, name="graph", **options):
        from .ops.core import as_tensor
        if isinstance(inputs, Graph):
            g = inputs
            single = getattr(g, "single", False) and len(g.outputs) == 1   # gc.load of a one-output function
            inputs, outputs, updates = g.inputs, (g.outputs[0] if single else g.outputs), (updates or g.updates)
        self.single = isinstance(outputs, Tensor)
        if not (outputs is None or self.single or isinstance(outputs, (list, tuple))):
            raise GraphcError(f"gc.function: outputs must be a tensor or a list of tensors, got "
                              f"{type(outputs).__name__} {outputs!r}" +
                              ("; wrap a constant in gc.constant(...)" if isinstance(outputs, (int, float)) else ""))
        outs = [outputs] if self.single else [_output(o, i) for i, o in enumerate(outputs or [])]
        try:
            if isinstance(inputs, Tensor):
                raise TypeError
            ins = list(inputs)
        except TypeError:
            raise GraphcError(f"gc.function: inputs must be a list of placeholders, got {type(inputs).__name__}"
                              + (" (write [x])" if isinstance(inputs, Tensor) else "")) from None
        for t in ins:
            if not isinstance(t, Tensor) or not t.node.op.has(Trait.INPUT):
                raise GraphcError(f"inputs must be placeholders, got {t!r}")
        if len({id(t) for t in ins}) != len(ins):
            raise GraphcError("an input placeholder appears twice")
        upd = _check_updates(updates)
        # graph state the outputs advance by themselves (RNG counters, batch-norm running stats)
        from .ops.state import implicit_updates
        upd += _check_updates(implicit_updates(outs + [v for _, v in upd], exclude=[p for p, _ in upd]))
        self.user_graph = Graph(ins, outs, upd, name)
        self.backend_name = backend
        self.options = CompileOptions.make(backend, optimize, **options)
        self.backend = get_backend(backend, for_compile=True)
        self._graph, self._graph_lock = None, threading.Lock()
        # the warm start: a program compiled for the same graph before (this process or another) is found
        # before any pass runs; the optimised graph is then made only when something asks for it
        key = self._warm_key()
        meta = _warm_meta(self.backend, key) if key is not None else None
        if meta is not None:
            known = _param_candidates(self.user_graph)
            self._params = [known[i] for i in meta["params"]]
            self._update_params = [known[i] for i in meta["updates"]]
            opt_constraints = []
        else:
            self._graph = self.options.optimise(self.user_graph)
            self._params = self._graph.parameters
            self._update_params = [p for p, _ in self._graph.updates]
            opt_constraints = graph_constraints(self._graph)
        self._inputs = self.user_graph.inputs   # the optimised graph's too (passes keep inputs and parameters)
        # dims the graph's shape rules unified with concrete ones ((N, 4) * (8, 4) needs N == 8): checked on
        # every call, a symbol where an input binds it, an expression once every input is bound
        required, self._dim_checks = {}, []
        user_constraints = graph_constraints(self.user_graph)
        for node, c in user_constraints + opt_constraints:
            if c.dim.is_Symbol:
                value, first, fc = required.setdefault(c.dim.name, (c.value, node, c))
                if value != c.value:
                    raise ShapeError(f"dim {c.dim} is unified with {value} ({fc.why}, built at {fmt_loc(first.loc)}) "
                                     f"and with {c.value} ({c.why}, built at {fmt_loc(node.loc)})")
            if all(c != k for _, k in self._dim_checks):
                self._dim_checks.append((node, c))
        self._specs = [self._input_spec(t, self.options.allow_input_downcast, required) for t in self._inputs]
        bound = {name for spec in self._specs for _, name, _ in spec[3]}
        self._dim_checks = [(n, c) for n, c in self._dim_checks if not (c.dim.is_Symbol and c.dim.name in bound)]
        if meta is not None:
            self.program = self.backend.warm_program(key, self.options, lambda: self.graph, meta["static"])
        else:
            self._check_placeholders()
            if key is None:
                self.program = self.backend.compile(self.graph, self.options)
            else:
                self.program = self.backend.compile(self.graph, self.options, warm=key)
                # the warm start needs no constraint of the optimised graph that the user's lacks
                if all(any(c == k for _, k in user_constraints) for _, c in opt_constraints):
                    _store_warm_meta(self.backend, key, self)
        self._lock = threading.Lock()
        self._plain = not self._update_params and not self.options.debug
        # the backend's outputs are new arrays on every call (never an input, a parameter or each other):
        # returned as they are, and update values become the parameters' arrays without a copy
        self._fresh = bool(self.program.info.get("fresh_outputs")) and not self.options.debug
        # the call's fast path (`_fast_path`): input shapes already bound once -> (runner, dims, direct)
        self._seen: dict = {}
        self._fast = _fast_path(self)

    @property
    def graph(self) -> Graph:
        """The optimised graph the backend compiled (after a warm start: made by the passes when first
        asked for)."""
        g = self._graph
        if g is None:
            with self._graph_lock:
                if self._graph is None:
                    g = self.options.optimise(self.user_graph)
                    if [id(p) for p in g.parameters] != [id(p) for p in self._params] or \
                            [id(p) for p, _ in g.updates] != [id(p) for p in self._update_params]:
                        raise GraphcError("internal error (a graphc bug, please report it): the optimised graph's "
                                          "parameters differ from those its warm-cache entry recorded")
                    self._graph = g
            g = self._graph
        return g

    def _warm_key(self) -> str | None:
        """The warm-start cache key of this function (backends offering one: `warm_key`), or None."""
        fn = getattr(self.backend, "warm_key", None)
        if fn is None or self.options.debug_passes or self.options.debug:
            return None
        return fn(self.user_graph, self.options)

    def _check_placeholders(self):
        known = {id(t) for t in self.graph.inputs}
        for node in self.graph.nodes:
            if node.op.has(Trait.INPUT) and id(node.outputs[0]) not in known:
                t = node.outputs[0]
                raise GraphcError(f"the outputs depend on placeholder {t.name!r}, which is not among the inputs "
                                  f"(built at {fmt_loc(node.loc)})")

    @property
    def source(self) -> str:
        """The generated code (Python for numpy, LLVM IR for llvm, CUDA C for cuda)."""
        return self.program.source

    @property
    def asm(self) -> str:
        """Assembly of the native code (llvm backend; empty for backends without one)."""
        a = self.program.info.get("asm", "")
        return a() if callable(a) else a

    def _bind(self, args, kwargs):
        ins = self._inputs
        if kwargs:
            by_name = {t.name: i for i, t in enumerate(ins)}
            args = list(args) + [None] * (len(ins) - len(args))
            for k, v in kwargs.items():
                if k not in by_name:
                    raise InputError(f"unexpected keyword argument {k!r}; inputs are {[t.name for t in ins]}")
                if args[by_name[k]] is not None:
                    raise InputError(f"input {k!r} given twice")
                args[by_name[k]] = v
        if len(args) != len(ins) or any(a is None for a in args):
            raise InputError(f"expected {len(ins)} inputs ({', '.join(t.name for t in ins)}), got "
                             f"{sum(a is not None for a in args)}")
        dims: dict = {}
        values = [self._convert(spec, a, dims) for spec, a in zip(self._specs, args)]
        if self._dim_checks:
            self._check_dims(dims)
        return values, dims

    def _check_dims(self, dims):
        """Every constraint a shape rule recorded (a symbolic dim unified with a concrete one) holds for the
        dims bound from this call's inputs (a symbol an input binds was checked already, by `_convert`)."""
        for node, c in self._dim_checks:
            if c.holds(dims) is False:
                syms = sorted(str(s) for s in c.dim.free_symbols)
                by = next((f"input {t.name!r} axis {ax}" for t, *_ in self._specs
                           for ax, d in enumerate(t.shape) if not isinstance(d, int) and str(d) in syms), "the inputs")
                got = c.dim.subs({_sh.dim_symbol(k): v for k, v in dims.items()})
                raise InputError(f"{by}: dim {c.dim} is {got} ({', '.join(f'{k}={dims[k]}' for k in syms if k in dims)})"
                                 f", expected {c.value}: the graph unified {c.dim} with {c.value} ({c.why}), "
                                 f"built at {fmt_loc(node.loc)}")

    @staticmethod
    def _input_spec(t: Tensor, downcast: bool = False, required=None):
        """(tensor, dtype, [(axis, fixed size)], [(axis, symbol name, required)], static shape, downcast)
        checked on every call; `required` is {symbol name: (value, node, constraint)}: the symbol's value
        the graph's shape rules unified it with (None where it is free)."""
        required = required or {}
        fixed = [(ax, d) for ax, d in enumerate(t.shape) if isinstance(d, int)]
        syms = [(ax, d.name, required.get(d.name)) for ax, d in enumerate(t.shape)
                if not isinstance(d, int) and d.is_Symbol]
        static = tuple(t.shape) if len(fixed) == t.ndim else None
        return t, np.dtype(t.dtype), fixed, syms, static, downcast

    @staticmethod
    def _convert(spec, a, dims) -> np.ndarray:
        t, dtype, fixed, syms, static, downcast = spec
        if type(a) is np.ndarray and a.dtype == dtype and a.shape == static:   # the common case, quickly
            fl = a.flags
            if fl.c_contiguous and fl.aligned:
                return a
        if isinstance(a, np.ndarray):
            if a.dtype != dtype:
                same_kind = np.can_cast(a.dtype, dtype, "same_kind") or (a.dtype.kind in "iub" and dtype.kind == "f")
                if not (downcast and same_kind):
                    fix = (f"; convert it (x.astype({t.dtype!r})) or compile with "
                           f"gc.function(..., allow_input_downcast=True)") if same_kind else ""
                    raise InputError(f"input {t.name!r}: expected dtype {t.dtype}, got {a.dtype}{fix}")
                a = a.astype(dtype)
        else:
            try:
                raw = np.asarray(a)
            except Exception as e:
                raise InputError(f"input {t.name!r}: cannot convert {type(a).__name__} to an array: {e}") from None
            if raw.dtype == object or not np.can_cast(raw.dtype, t.dtype, "same_kind") and not (
                    raw.dtype.kind in "iub" and _dt.is_float(t.dtype)):
                raise InputError(f"input {t.name!r}: expected dtype {t.dtype}, got {raw.dtype} values")
            a = raw.astype(t.dtype)
        if a.ndim != t.ndim:
            raise InputError(f"input {t.name!r}: expected rank {t.ndim} shape {_sh.fmt_shape(t.shape)}, "
                             f"got shape {a.shape}")
        shape = a.shape
        for ax, d in fixed:
            if shape[ax] != d:
                raise InputError(f"input {t.name!r}: expected shape {_sh.fmt_shape(t.shape)}, got {shape} "
                                 f"(axis {ax})")
        for ax, name, req in syms:
            if dims.setdefault(name, shape[ax]) != shape[ax]:
                raise InputError(f"input {t.name!r}: dim {name} is {shape[ax]} on axis {ax}, but {dims[name]} "
                                 f"from an earlier input")
            if req is not None and shape[ax] != req[0]:
                value, node, c = req
                raise InputError(f"input {t.name!r}: dim {name} is {shape[ax]} on axis {ax} (shape {shape}), expected "
                                 f"{value}: the graph unified {name} with {value} ({c.why}), built at {fmt_loc(node.loc)}")
        # native backends read raw buffers: non-contiguous or misaligned arrays are copied
        fl = a.flags
        return a if fl.c_contiguous and fl.aligned else np.require(a, requirements=["C", "A"])

    def __call__(self, *args, **kwargs):
        if not kwargs and self._fast is not None:
            res = self._fast(args)   # positional arrays of shapes seen before, nothing to convert
            if res is not _MISS:
                return res
        values, dims = self._bind(args, kwargs)
        run = self._runner(dims)
        if len(self._seen) >= 64:   # many distinct shapes: keep the table bounded
            self._seen.clear()
        self._seen[tuple(v.shape for v in values)] = (run, dims, getattr(run, "direct", None))
        return self._execute(values, dims, run)

    def _runner(self, dims):
        """run(values, params) -> (outputs, update values) of the program for this binding of the dims."""
        runner = getattr(self.program, "runner", None)
        if runner is not None:
            return runner(dims)
        return lambda values, params, run=self.program.run: run(values, params, dims)

    def _execute(self, values, dims, run):
        """The call on checked input arrays: run the program, write the updates back (under the lock)."""
        if self._plain:   # no updates and no debug mode: nothing to lock or write back
            params = [p._value for p in self._params]
            outs, _ = run(values, params)
            if self._fresh:
                return outs[0] if self.single else outs
            return _owned_outputs(outs, params, values, self.single)
        with self._lock:
            params = [p._value for p in self._params]
            if self.options.debug:
                outs, upds = self._debug_run(values, dims)
            else:
                outs, upds = run(values, params)
            new = [v if self._fresh and v.dtype == p.dtype else np.array(v, dtype=p.dtype, order="C", copy=True)
                   for p, v in zip(self._update_params, upds)]
            for p, v in zip(self._update_params, new):
                if v.shape != p.shape:
                    raise GraphcError(f"update of {p.name} produced shape {v.shape}, expected {p.shape}")
            for p, v in zip(self._update_params, new):
                v.flags.writeable = False   # a parameter's array is never written in place (Parameter.value)
                p._value = v
        if self._fresh:
            return outs[0] if self.single else outs
        return _owned_outputs(outs, params, values, self.single)

    def _debug_run(self, values, dims):
        """mode="debug": evaluate the unoptimised graph node by node, stopping at the first NaN/Inf."""
        from .reference import evaluate
        g = self.user_graph
        for t, v in zip(g.inputs, values):
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                raise NumericalError(f"input {t.name!r} contains NaN or Inf")

        def check(node, outs):
            for o, v in zip(node.outputs, outs):
                if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                    bad = "NaN" if np.isnan(v).any() else "Inf"
                    args = ", ".join(f"{t.label}: {t.type_str}" for t in node.inputs)
                    raise NumericalError(f"{node.op.name}({args}) produced {bad}\n  node built at {fmt_loc(node.loc)}")
        roots = g.outputs + [u for _, u in g.updates]
        with np.errstate(all="ignore"):  # reported by check() instead
            res = evaluate(roots, dict(zip(g.inputs, values)), dims, check=check)
        return res[:len(g.outputs)], res[len(g.outputs):]

    def memory_plan(self, **dims):
        """The NumPy backend's memory plan for this graph (arena peak vs naive bytes, offsets, lifetimes)."""
        return get_backend("numpy").memory_plan(self.graph, dims)

    def explain(self, *args, repeat: int = 10, **dims):
        """Where a call's time goes, one row per kernel: the ops fused into it, FLOPs and bytes, the time the
        roofline of this host predicts and the time measured (a profiled run on `args`, or on random inputs
        with symbolic dims bound by `dims`), what bounds it, and why a neighbouring op stayed unfused.
        `print(f.explain(N=64))` shows the table (graphc/explain.py)."""
        return hook("explain")(self, *args, repeat=repeat, **dims)

    def _repr_svg_(self):
        """Jupyter shows a compiled function as a picture of its optimised graph."""
        return hook("repr_svg")(self)

    def _repr_html_(self):
        """Jupyter shows a compiled function in the interactive viewer (kernels, memory plan, fallbacks)."""
        return hook("repr_html")(self)

    def __repr__(self):
        return f"<graphc.Function {self.graph.name} backend={self.backend_name} ops={len(self.graph.compute_nodes())}>"


#: what a fast path returns when the call is not its case (the full checks then run)
_MISS = object()
#: the fast path is generated for at most this many inputs, and reads at most this many parameters one by one
_FAST_INPUTS, _FAST_PARAMS = 16, 32


def _fast_path(f: Function):
    """fast(args) for f: when every argument is an ndarray of the input's exact dtype, C-contiguous and
    aligned, and the tuple of their shapes was bound by an earlier call (f._seen: it passed every check
    then, and shapes decide every check), the call skips `_bind` and the dims lookup and runs the
    runner recorded for those shapes (its `direct` form, taking the arrays as arguments, where the
    backend offers one); otherwise it returns _MISS and the call takes the full path (the
    same errors, conversions and copies as ever). Generated per function, unrolled over its inputs and
    parameters (a loop over them cost more than the call itself on a 4-element function)."""
    n, m = len(f._specs), len(f._params)
    if n > _FAST_INPUTS:
        return None
    a = [f"a{i}" for i in range(n)]
    env = {"MISS": _MISS, "ndarray": np.ndarray, "SEEN": f._seen, "PARAMS": f._params, "OWNED": _owned_outputs,
           "EXEC": f._execute, "SINGLE": f.single}
    lines = ["def fast(args):", f"    if len(args) != {n}:", "        return MISS"]
    if n:
        lines.append(f"    {', '.join(a)}, = args")
    for i, spec in enumerate(f._specs):
        env[f"D{i}"] = spec[1]
        lines += [f"    if type(a{i}) is not ndarray:", "        return MISS", f"    d = a{i}.dtype",
                  f"    if d is not D{i} and d != D{i}:", "        return MISS"]
    key = "".join(f"{x}.shape, " for x in a)
    lines += [f"    ent = SEEN.get(({key}))", "    if ent is None:", "        return MISS"]
    for x in a:
        lines += [f"    fl = {x}.flags", "    if not (fl.c_contiguous and fl.aligned):", "        return MISS"]
    if f._plain:
        for j, p in enumerate(f._params[:_FAST_PARAMS]):
            env[f"P{j}"] = p
        params = (f"[{', '.join(f'P{j}._value' for j in range(m))}]" if m <= _FAST_PARAMS
                  else "[p._value for p in PARAMS]")
        if f._fresh and m <= _FAST_PARAMS:   # the runner's direct(arrays...) when it has one (no lists)
            lines += ["    direct = ent[2]", "    if direct is not None:",
                      f"        res = direct({', '.join(a + [f'P{j}._value' for j in range(m)])})",
                      "        return res" if f.single else "        return res if type(res) is list else [res]"]
        lines += [f"    values = [{', '.join(a)}]", f"    params = {params}", "    outs = ent[0](values, params)[0]"]
        if f._fresh:
            lines.append("    return outs[0]" if f.single else "    return outs")
        else:
            lines.append("    return OWNED(outs, params, values, SINGLE)")
    else:
        lines += [f"    values = [{', '.join(a)}]", "    return EXEC(values, ent[1], ent[0])"]
    exec("\n".join(lines), env)   # noqa: S102 (generated from the input count only)
    return env["fast"]


def _param_candidates(user_graph: Graph) -> list:
    """The parameters a warm-cache entry indexes: the user graph's, then its updated ones not among them."""
    out = list(user_graph.parameters)
    seen = {id(p) for p in out}
    for p, _ in user_graph.updates:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _warm_meta(backend, key: str) -> dict | None:
    """What a warm start needs of the optimised graph (its parameters and updated parameters, as indices
    into the user graph's; whether it is static), stored by the first compile under `key` (in the
    backend's warm cache: backends offering `warm_key` offer `warm_load`/`warm_store`)."""
    got = backend.warm_load(f"{key}.function")
    return None if got is None else got[0]


def _store_warm_meta(backend, key: str, f: "Function") -> None:
    index = {id(p): i for i, p in enumerate(_param_candidates(f.user_graph))}
    try:
        params = [index[id(p)] for p in f._params]
        updates = [index[id(p)] for p in f._update_params]
    except KeyError:   # a parameter the passes made: nothing to index it by (no warm start)
        return
    backend.warm_store(f"{key}.function", {"params": params, "updates": updates,
                                   "static": bool(getattr(f.program, "static", False))})


def graph_constraints(graph: Graph) -> list:
    """(node, shapes.DimConstraint) for every constraint the nodes of `graph` (nested bodies included)
    recorded when their shape rules unified a symbolic dim with a concrete one."""
    out, seen, stack = [], set(), [graph]
    while stack:
        g = stack.pop()
        for node in g.nodes:   # (one pass over each node's attrs, no generators: 30,000-node graphs)
            cs = getattr(node, "constraints", None)
            if cs:
                out.extend((node, c) for c in cs)
            for v in node.attrs.values():
                if isinstance(v, Graph) and id(v) not in seen:
                    seen.add(id(v))
                    stack.append(v)
    return out


def _owned_outputs(outs, params, values, single):
    """Outputs the caller owns: a view, a read-only array, a parameter's or an input's own array, or an
    array already returned for another output (CSE merges equal outputs) is copied."""
    seen = {id(v) for v in params} | {id(v) for v in values}
    res = []
    for o in outs:
        if not (isinstance(o, np.ndarray) and o.base is None and o.flags.writeable) or id(o) in seen:
            o = np.array(o)
        seen.add(id(o))
        res.append(o)
    return res[0] if single else res


def function(inputs, outputs=None, updates=None, backend: str = "numpy", optimize: int = 2, **options) -> Function:
    """Compile `outputs` (a tensor or list) as a function of placeholder `inputs`.

    `updates=[(param, new_value)]`: new values computed from the old ones, written after the call,
    all together. `inputs` may also be a gc.Graph. `backend` is a name from gc.available_backends().
    `mode="debug"` checks every intermediate for NaN/Inf and names the first node that made one.
    """
    return Function(inputs, outputs, updates, backend, optimize, **options)
