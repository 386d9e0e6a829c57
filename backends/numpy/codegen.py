"""Generate readable Python/NumPy source for a graph and exec it into a function."""
from __future__ import annotations

import itertools
import keyword
import linecache
import sys

import numpy as np

from graphc import shapes as _sh
from graphc.errors import GraphcError
from graphc.ir import Graph, fmt_loc
from ..base import Backend, Program

_ids = itertools.count()
_SIMPLE = (int, float, bool, str, type(None))


def _simple_attr(v) -> bool:
    if isinstance(v, _SIMPLE):
        return True
    if isinstance(v, tuple):
        return all(_simple_attr(e) for e in v)
    if isinstance(v, slice):
        return all(_simple_attr(e) for e in (v.start, v.stop, v.step))
    return False


class _Names:
    """Readable, unique Python identifiers for tensors."""

    def __init__(self):
        self.used = set(keyword.kwlist) | {"np", "math"}
        self.count = itertools.count(1)

    def fresh(self, hint: str) -> str:
        base = hint if hint and hint.isidentifier() else "t"
        name = base
        while name in self.used:
            name = f"{base}{next(self.count)}"
        self.used.add(name)
        return name


class NumpyBackend(Backend):
    name = "numpy"

    def compile(self, graph: Graph, options=None) -> Program:
        src, ns, line_nodes = generate(graph)
        filename = f"<graphc-numpy-{next(_ids)}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        exec(compile(src, filename, "exec"), ns)
        fn = ns["graph_fn"]

        def run(inputs, params, dims):
            try:
                return fn(*inputs, *params, _dims=dims)
            except GraphcError:
                raise
            except Exception as e:  # map the failing generated line back to the node and user's line
                node = _failing_node(e, filename, line_nodes)
                if node is None:
                    raise
                raise GraphcError(f"{type(e).__name__} in {node.op.name} at run time: {e}\n"
                                  f"  node built at {fmt_loc(node.loc)}") from e
        return Program(run, src, namespace=ns)


def _failing_node(exc, filename, line_nodes):
    tb = exc.__traceback__
    node = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            node = line_nodes.get(tb.tb_lineno)
        tb = tb.tb_next
    return node


def generate(graph: Graph):
    """(source, namespace, {line number: node}) for `graph_fn(*inputs, *params, _dims)`."""
    names, ns, var = _Names(), {"np": np, "math": __import__("math")}, {}
    line_nodes = {}
    params = graph.parameters
    args = []
    for t in graph.inputs + params:
        var[id(t)] = names.fresh(t.name)
        args.append(var[id(t)])
    syms = sorted({s.name for t in graph.inputs for s in _sh.free_symbols(t.shape)} |
                  {s.name for n in graph.nodes for t in n.outputs for s in _sh.free_symbols(t.shape)})
    lines = [f"def graph_fn({', '.join(args)}{', ' if args else ''}*, _dims):"]
    for s in syms:
        names.used.add(s)
        lines.append(f"    {s} = _dims[{s!r}]")
    for node in graph.nodes:
        op = node.op
        if op.name in ("placeholder", "parameter"):
            if id(node.outputs[0]) not in var:
                raise GraphcError(f"placeholder {node.outputs[0].name!r} is used but not among the function's inputs")
            continue
        out = [names.fresh(o.name or (op.name if op.n_outputs == 1 else f"{op.name}_{i}"))
               for i, o in enumerate(node.outputs)]
        inputs = [var[id(t)] for t in node.inputs]
        if op.name == "constant" and node.attrs["value"].ndim == 0:  # scalars are written inline
            v = node.attrs["value"]
            var[id(node.outputs[0])] = f"np.{v.dtype.name}({v.item() if v.dtype.kind != 'f' else repr(str(v))})"
            continue
        expr = op.np_code(inputs, node.attrs)
        if expr is None and op.name == "constant":
            cname = names.fresh(f"c_{out[0]}")
            ns[cname] = node.attrs["value"]
            expr = cname
        elif expr is None:
            expr = _impl_call(op, node, inputs, ns, names)
        o = node.outputs[0]
        lines.append(f"    # {op.name} -> {o.dtype}{_sh.fmt_shape(o.shape)}  ({fmt_loc(node.loc).split(': ')[0]})")
        lines.append(f"    {', '.join(out)}{',' if len(out) == 1 and op.n_outputs != 1 else ''} = {expr}")
        line_nodes[len(lines)] = node
        for t, n in zip(node.outputs, out):
            var[id(t)] = n
    outs = ", ".join(var[id(t)] for t in graph.outputs)
    upds = ", ".join(var[id(u)] for _, u in graph.updates)
    lines.append(f"    return [{outs}], [{upds}]")
    return "\n".join(lines) + "\n", ns, line_nodes


def _impl_call(op, node, inputs, ns, names) -> str:
    fname = f"_{op.name}"
    ns.setdefault(fname, op.impl)
    attrs = dict(node.attrs)
    parts = list(inputs)
    if all(_simple_attr(v) for v in attrs.values()):
        parts += [f"{k}={v!r}" for k, v in attrs.items()]
    else:
        aname = names.fresh(f"_attrs_{op.name}")
        ns[aname] = attrs
        parts.append(f"**{aname}")
    if getattr(op, "needs_dims", False):
        parts.append("dims=_dims")
    return f"{fname}({', '.join(parts)})"
