"""Generate readable Python/NumPy source for a graph and exec it into a function.

One line per op, named after its tensors (unique names from graphc.names.Names). At
optimize=2 the backend also honours the memory plan (graphc.passes.memory.plan_buffers): planned
intermediates are computed with `out=` into workspace buffers (views over one byte arena per thread
and dims, placed by the shared arena planner, see workspace.py; reused across calls, never returned),
dead results are `del`eted, and fused nodes become inline NumPy lines (see fused.py), run in
cache-sized chunks.
"""
from __future__ import annotations

import builtins
import itertools
import keyword
import linecache
import time

import numpy as np

from graphc import shapes as _sh
from graphc.errors import GraphcError
from graphc.ir import Graph, Trait, fmt_loc
from graphc.ops.fused import Fused
from graphc.ops.scan import Scan
from ..base import Backend, Program
from graphc.names import Names
from .fused import emit_fused, node_lines
from .spellings import expression

_ids = itertools.count()
_SIMPLE = (int, float, bool, str, type(None))
#: results at least this large (elements, or symbolic) get a `del` after their last use
DEL_MIN_ELEMENTS = 4096


def _simple_attr(v) -> bool:
    if isinstance(v, _SIMPLE):
        return True
    if isinstance(v, tuple):
        return all(_simple_attr(e) for e in v)
    if isinstance(v, slice):
        return all(_simple_attr(e) for e in (v.start, v.stop, v.step))
    return False


#: fixed locals of generated functions (arguments, chunk-loop variables)
_LOCALS = ("_dims", "_ws", "_step", "_lo", "_hi")


def _reserved() -> frozenset:
    """Names generated code must not bind: keywords, builtins (never shadow max, sum, ...), the module
    names and fixed locals of the generated function, and the impls it calls (`_` + op name)."""
    from graphc.ir import OPS
    return (frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"np", "math", "graph_fn", *_LOCALS}
            | {f"_{name}" for name in OPS})


class NumpyBackend(Backend):
    name = "numpy"

    def memory_plan(self, graph: Graph, dims: dict):
        """The report behind `f.memory_plan(N=64)`: this backend's arena for `graph` (peak vs naive bytes)."""
        from .workspace import memory_plan
        return memory_plan(graph, dims)

    def compile(self, graph: Graph, options=None) -> Program:
        """`graph` (already optimised) as generated source; `options`: a graphc.function.CompileOptions."""
        if options is None:
            from graphc.function import CompileOptions
            options = CompileOptions()
        from graphc.passes import pass_times
        t0 = time.perf_counter()
        plan = ws = None
        if options.plan_memory:
            from graphc.passes.memory import plan_buffers
            from .workspace import Layout, Workspace
            plan = plan_buffers(graph)
            ws = Workspace(Layout(plan)) if plan.buffers else None
        t1 = time.perf_counter()
        src, ns, line_nodes = generate(graph, plan, options)
        t2 = time.perf_counter()
        filename = f"<graphc-numpy-{next(_ids)}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        exec(compile(src, filename, "exec"), ns)
        fn = ns["graph_fn"]
        # seconds per phase: the pass pipeline (gc.function ran it), the memory plan, source generation,
        # Python's compile of the source
        times = {"passes": pass_times(graph).get("total", 0.0), "memory_plan": t1 - t0, "codegen": t2 - t1,
                 "python_compile": time.perf_counter() - t2}
        times["total"] = sum(times.values())

        def run(inputs, params, dims):
            try:
                return fn(*inputs, *params, _dims=dims, _ws=ws.get(dims) if ws is not None else ())
            except GraphcError:
                raise
            except Exception as e:  # map the failing generated line back to the node and user's line
                node = _failing_node(e, filename, line_nodes)
                if node is None:
                    raise
                raise GraphcError(f"{type(e).__name__} in {node.op.name} at run time: {e}\n"
                                  f"  node built at {fmt_loc(node.loc)}") from e
        return Program(run, src, namespace=ns, plan=plan, workspace=ws, compile_time=times)


def _failing_node(exc, filename, line_nodes):
    tb = exc.__traceback__
    node = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            node = line_nodes.get(tb.tb_lineno)
        tb = tb.tb_next
    return node


class Emitter:
    """State of one generated function: names, namespace, lines and which node each line runs."""

    def __init__(self, options=None):
        self.options = options  # the function's CompileOptions (nested bodies are compiled with them)
        self.names = Names(_reserved(), default="t")
        self.ns, self.var = {"np": np, "math": __import__("math")}, {}
        self.lines, self.line_nodes = [], {}
        self.big: dict[int, str] = {}  # id(tensor) -> variable, for results worth a `del`

    def add(self, line: str, node=None, indent: int = 1) -> None:
        self.lines.append("    " * indent + line)
        if node is not None:
            self.line_nodes[len(self.lines)] = node

    def scalar(self, t) -> str | None:
        """Inline spelling of a 0-d constant."""
        if t.node.op.has(Trait.CONST) and t.node.attrs["value"].ndim == 0 and t.dtype != "bfloat16":
            v = t.node.attrs["value"]
            return f"np.{v.dtype.name}({v.item() if v.dtype.kind != 'f' else repr(str(v))})"
        return None

    def constant(self, t, hint: str) -> str:
        cname = self.names.fresh(f"c_{hint}")
        self.ns[cname] = t.node.attrs["value"]
        return cname

    def impl_call(self, node, inputs) -> str:
        op = node.op
        fname = f"_{op.name}"
        self.ns.setdefault(fname, op.impl)
        attrs = {k: v for k, v in node.attrs.items()}
        parts = list(inputs)
        if all(_simple_attr(v) for v in attrs.values()):
            parts += [f"{k}={v!r}" for k, v in attrs.items()]
        else:
            aname = self.names.fresh(f"_attrs_{op.name}")
            self.ns[aname] = attrs
            parts.append(f"**{aname}")
        if getattr(op, "needs_dims", False):
            parts.append("dims=_dims")
        return f"{fname}({', '.join(parts)})"

    def expr(self, node, inputs) -> str:
        """A NumPy expression computing a single-output node (its spelling, else a call of its impl)."""
        return expression(node, inputs) or self.impl_call(node, inputs)


def _comment(node) -> str:
    o = node.outputs[0]
    name = getattr(node.op, "display_name", lambda n: n.op.name)(node)
    return f"# {name} -> {o.dtype}{_sh.fmt_shape(o.shape)}  ({fmt_loc(node.loc).split(': ')[0]})"


def generate(graph: Graph, plan=None, options=None):
    """(source, namespace, {line number: node}) for `graph_fn(*inputs, *params, _dims, _ws)`."""
    em = Emitter(options)
    params = graph.parameters
    args = []
    for t in graph.inputs + params:
        em.var[id(t)] = em.names.fresh(t.name)
        args.append(em.var[id(t)])
    syms = sorted({s.name for t in graph.inputs for s in _sh.free_symbols(t.shape)} |
                  {s.name for n in graph.nodes for t in n.outputs for s in _sh.free_symbols(t.shape)})
    em.lines.append(f"def graph_fn({', '.join(args)}{', ' if args else ''}*, _dims, _ws):")
    for s in syms:
        em.names.reserve(s)
        em.add(f"{s} = _dims[{s!r}]")
    for pos, node in enumerate(graph.nodes):
        _node(em, node, plan)
        for t_id in (plan.free_after.get(pos, ()) if plan else ()):
            if t_id in em.big:
                em.add(f"del {em.big[t_id]}")
    owned = {id(t) for t in graph.inputs + params}
    outs = ", ".join(em.var[id(t)] + (".copy()" if id(t) in owned else "") for t in graph.outputs)
    upds = ", ".join(em.var[id(u)] for _, u in graph.updates)
    em.add(f"return [{outs}], [{upds}]")
    return "\n".join(em.lines) + "\n", em.ns, em.line_nodes


def _target(em, node, plan, o) -> str | None:
    """The workspace buffer planned for output `o` (a view over the arena with o's dtype and shape),
    bound to a variable; else None."""
    if plan is None or id(o) not in plan.assign:
        return None
    name = em.names.fresh(o.name or node.op.name)
    em.add(f"{name} = _ws[{plan.assign[id(o)]}]")
    return name


def _node(em, node, plan):
    op = node.op
    if op.has(Trait.CONST):
        t = node.outputs[0]
        em.var[id(t)] = em.scalar(t) or em.constant(t, t.name or "const")
        return
    if op.has(Trait.LEAF):  # placeholders and parameters are the function's arguments
        if id(node.outputs[0]) not in em.var:
            raise GraphcError(f"placeholder {node.outputs[0].name!r} is used but not among the function's inputs")
        return
    inputs = [em.var[id(t)] for t in node.inputs]
    em.add(_comment(node))
    targets = [_target(em, node, plan, o) for o in node.outputs]
    lower = NODES.get(op)
    if lower is not None:
        outs = lower(em, node, inputs, targets, plan)
    else:
        outs = [_single(em, node, inputs, targets[0])] if op.n_outputs == 1 else _multi(em, node, inputs)
    for t, name in zip(node.outputs, outs):
        em.var[id(t)] = name
        if not _sh.is_static(t.shape) or _sh.size(t.shape) >= DEL_MIN_ELEMENTS:
            em.big[id(t)] = name


def _single(em, node, inputs, target) -> str:
    o = node.outputs[0]
    name = target or em.names.fresh(o.name or node.op.name)
    for ln in node_lines(em, node, inputs, target, name):
        em.add(ln, node)
    return name


def _multi(em, node, inputs) -> list[str]:
    out = [em.names.fresh(o.name or f"{node.op.name}_{i}") for i, o in enumerate(node.outputs)]
    em.add(f"{', '.join(out)}{',' if len(out) == 1 else ''} = {em.expr(node, inputs)}", node)
    return out


def _fused(em, node, inputs, targets, plan) -> list[str]:
    src = plan.in_place.get(id(node.outputs[0])) if plan else None
    shared = next((i for i, t in enumerate(node.inputs) if id(t) == src), None)
    return emit_fused(em, node, inputs, targets, shared)


def _scan(em, node, inputs, targets, plan) -> list[str]:
    from .scan import scan_runner
    run = em.names.fresh("_run_scan")
    em.ns[run] = scan_runner(node, em.options)
    out = [em.names.fresh(o.name or f"scan_{i}") for i, o in enumerate(node.outputs)]
    em.add(f"{', '.join(out)}{',' if len(out) == 1 else ''} = {run}({', '.join(inputs)}, dims=_dims)", node)
    return out


#: ops lowered as more than one expression (the rest: their spelling, else a call of their impl)
NODES = {Fused: _fused, Scan: _scan}
