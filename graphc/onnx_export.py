"""ONNX export: `gc.export_onnx(inputs, outputs, path)` or `gc.export_onnx(fn_or_graph, path)`.

Each graphc op maps to one or a few ONNX nodes (opset 18); fused nodes are exported inline, scan
nodes become ONNX Scan with the body as a subgraph. Symbolic dims become ONNX dynamic dims
(`dim_param`), and shapes that depend on them (a Reshape to (N, -1)) are computed from the input
shapes at run time. Parameters and constants become initialisers. The model is written with an IR
version ONNX Runtime accepts (ir_version 10) and checked with onnx.checker before it is saved.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import sympy

from . import shapes as _sh
from .errors import GraphcError
from .ir import Graph, Node, Tensor

OPSET = 18
IR_VERSION = 10
INT64_MAX = np.iinfo(np.int64).max


class OnnxExportError(GraphcError):
    """The graph uses ops or values that have no ONNX export (the message lists them all)."""


EXPORTERS: dict[str, Callable] = {}


def exporter(*names):
    """Register an export rule `fn(ex, node, in_names) -> [out names]` for graphc op names."""
    def deco(fn):
        for n in names:
            EXPORTERS[n] = fn
        return fn
    return deco


def _onnx_type(dtype: str) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class Exporter:
    """Builds the node list of one ONNX graph (a subgraph for a scan body gets its own)."""

    def __init__(self, parent: "Exporter | None" = None):
        self.parent = parent
        self.nodes, self.inits = [], []
        self.names: dict[int, str] = {}
        self.used: set = parent.used if parent else set()
        self.sym_src: dict[str, tuple] = parent.sym_src if parent else {}  # symbol -> (input name, axis)
        self.sym: dict[str, str] = {}  # symbol -> int64 scalar tensor computed in this graph

    def fresh(self, hint: str) -> str:
        base = (hint or "t").replace(" ", "_")
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def emit(self, op_type: str, inputs: list[str], n_out: int = 1, hint: str | None = None, **attrs) -> list[str]:
        from onnx import helper
        outs = [self.fresh(f"{hint or op_type.lower()}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs

    def one(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.emit(op_type, list(inputs), **attrs)[0]

    def const(self, value, dtype=None, hint: str = "const") -> str:
        from onnx import numpy_helper
        a = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint="ints")

    def cast(self, name: str, src: str, dst: str) -> str:
        return name if src == dst else self.one("Cast", name, to=_onnx_type(dst))

    def dim(self, d) -> str:
        """An int64 scalar tensor holding dim `d` (symbolic dims from the inputs' shapes)."""
        if isinstance(d, int):
            return self.const(np.int64(d), hint="dim")
        d = sympy.sympify(d)
        if d.is_Integer:
            return self.const(np.int64(int(d)), hint="dim")
        if d.is_Symbol:
            if d.name not in self.sym:
                if d.name not in self.sym_src:
                    raise OnnxExportError(f"symbolic dim {d} is not the size of any input axis")
                src, ax = self.sym_src[d.name]
                shp = self.one("Shape", src, start=ax, end=ax + 1)
                self.sym[d.name] = self.one("Squeeze", shp, self.ints([0]))
            return self.sym[d.name]
        fn = {sympy.Add: "Add", sympy.Mul: "Mul"}.get(type(d))
        if fn is None:
            raise OnnxExportError(f"cannot export symbolic dim {d}")
        out = self.dim(d.args[0])
        for a in d.args[1:]:
            out = self.one(fn, out, self.dim(a))
        return out

    def shape(self, shape) -> str:
        """An int64 1-D shape tensor (a constant when static)."""
        if _sh.is_static(shape):
            return self.ints(shape)
        return self.one("Concat", *[self.one("Reshape", self.dim(d), self.ints([1])) for d in shape], axis=0)

    def bind_symbols(self, t: Tensor, name: str) -> None:
        """Record where each symbolic dim of input `t` can be read (the Shape node is made on use)."""
        for ax, d in enumerate(t.shape):
            if not isinstance(d, int) and d.is_Symbol and d.name not in self.sym_src:
                self.sym_src[d.name] = (name, ax)

    def run_graph(self, g: Graph, bound: dict[int, str]) -> list[str]:
        """Emit g's nodes; `bound` maps placeholder ids to ONNX names. Returns the output names."""
        from .ir import toposort
        self.names.update(bound)
        missing = sorted({n.op.name for n in toposort(g.outputs) if n.op.name not in EXPORTERS
                          and n.op.name not in ("placeholder", "parameter", "constant")})
        if missing:
            raise OnnxExportError(f"no ONNX export for op(s): {', '.join(missing)}")
        for node in toposort(g.outputs):
            if all(id(o) in self.names for o in node.outputs):
                continue
            self._node(node)
        return [self.names[id(t)] for t in g.outputs]

    def _node(self, node: Node) -> None:
        op = node.op.name
        if op == "placeholder":
            raise OnnxExportError(f"placeholder {node.outputs[0].name!r} is used but is not an input")
        if op in ("parameter", "constant"):
            t = node.outputs[0]
            v = t.value if op == "parameter" else node.attrs["value"]
            self.names[id(t)] = self.const(v, t.dtype, hint=t.name or op)
            return
        ins = [self.names[id(t)] for t in node.inputs]
        outs = EXPORTERS[op](self, node, ins)
        for t, n in zip(node.outputs, outs):
            self.names[id(t)] = n


def _value_info(name: str, t: Tensor):
    from onnx import helper
    dims = [d if isinstance(d, int) else str(d) for d in t.shape]
    return helper.make_tensor_value_info(name, _onnx_type(t.dtype), dims)


def _graph_of(inputs, outputs) -> Graph:
    from .function import Function
    if isinstance(inputs, Function):
        return inputs.user_graph
    if isinstance(inputs, Graph):
        return inputs
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    return Graph(list(inputs), outs)


def _used_initializers(nodes, outputs, inits) -> list:
    """The initialisers some node (or a Scan body, which may read outer names) or output reads: an
    export rule that makes a constant it ends up not using must not leave it in the model (ONNX
    Runtime warns about every unused initialiser on every load)."""
    used = set(outputs)

    def walk(ns):
        for n in ns:
            used.update(n.input)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g.node)
                    used.update(o.name for o in a.g.output)
                for sub in a.graphs:
                    walk(sub.node)
    walk(nodes)
    return [i for i in inits if i.name in used]


def to_onnx(inputs, outputs=None, name: str | None = None):
    """The onnx.ModelProto for a graph (see export_onnx)."""
    import onnx
    from onnx import helper
    from . import onnx_export_ops  # noqa: F401  (registers the export rules)
    g = _graph_of(inputs, outputs)
    ex = Exporter()
    bound = {}
    for t in g.inputs:
        bound[id(t)] = ex.fresh(t.name)
        ex.bind_symbols(t, bound[id(t)])
    outs = ex.run_graph(g, bound)
    out_names = [ex.emit("Identity", [n], hint=t.name or f"output_{i}")[0]  # stable, unique output names
                 for i, (t, n) in enumerate(zip(g.outputs, outs))]
    ex.inits = _used_initializers(ex.nodes, out_names, ex.inits)
    graph = helper.make_graph(ex.nodes, name or g.name or "graphc", [_value_info(bound[id(t)], t) for t in g.inputs],
                              [_value_info(n, t) for n, t in zip(out_names, g.outputs)], ex.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphc",
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def export_onnx(inputs, outputs=None, path=None, name: str | None = None):
    """Write an ONNX model for `outputs` as a function of placeholder `inputs` to `path`.

    Also `export_onnx(fn, path)` for a compiled function or a gc.Graph. Returns the ModelProto."""
    import onnx
    from .function import Function
    if isinstance(inputs, (Function, Graph)) and path is None:
        outputs, path = None, outputs
    model = to_onnx(inputs, outputs, name)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model
