"""ONNX import: `gc.load_onnx(path_or_ModelProto) -> gc.Graph`.

Each ONNX node becomes graphc ops through a converter in frontends/onnx_ops*.py (composites of
graphc ops where ONNX has no single counterpart). Placeholders follow the model's input order,
outputs its output order; float initialisers become parameters, integer/bool ones constants (they
are usually shapes and axes). Nodes whose inputs are all constants are folded at import time, so
shape arithmetic (Shape -> Gather -> Concat -> Reshape) costs nothing at run time.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

import graphc as gc
from graphc import dtypes as _dt
from graphc import shapes as _sh
from graphc.errors import GraphcError
from graphc.ir import Graph, Tensor, constant_value

SUPPORTED_DTYPES = set(_dt.SUPPORTED)   # float16/bfloat16, (u)int8..64, float32/64, bool


class OnnxImportError(GraphcError):
    """An ONNX model could not be imported (malformed, or a value graphc cannot represent)."""


class UnsupportedOnnx(OnnxImportError):
    """The model uses ONNX ops, attributes or dtypes that graphc does not support (all listed)."""


class NeedsConstant(UnsupportedOnnx):
    """An input that sets a shape or axes (e.g. ReduceSum's axes) is computed or fed at run time;
    `input_name` is the model input it comes straight from, if any (the ONNX backend then compiles
    per value of that input)."""

    def __init__(self, msg: str, input_name: str | None = None):
        super().__init__(msg)
        self.input_name = input_name


def onnx_dtype(elem_type: int) -> str:
    """graphc dtype name for an ONNX TensorProto elem_type; UnsupportedOnnx for others."""
    from onnx import helper
    try:
        name = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        name = f"onnx-type-{elem_type}"
    if name not in SUPPORTED_DTYPES:
        raise UnsupportedOnnx(f"dtype {name} is not supported (graphc has {', '.join(sorted(SUPPORTED_DTYPES))})")
    return name


def _attr_value(a) -> Any:
    from onnx import AttributeProto, numpy_helper
    t = a.type
    if t == AttributeProto.FLOAT:
        return float(a.f)
    if t == AttributeProto.INT:
        return int(a.i)
    if t == AttributeProto.STRING:
        return a.s.decode()
    if t == AttributeProto.TENSOR:
        return numpy_helper.to_array(a.t)
    if t == AttributeProto.FLOATS:
        return [float(v) for v in a.floats]
    if t == AttributeProto.INTS:
        return [int(v) for v in a.ints]
    if t == AttributeProto.STRINGS:
        return [s.decode() for s in a.strings]
    if t == AttributeProto.GRAPH:
        return a.g
    raise UnsupportedOnnx(f"attribute {a.name!r} of type {t} is not supported")


class SymVal:
    """A small integer tensor whose entries may be symbolic dims: what Shape gives for a tensor with a
    dynamic batch. Shape arithmetic on it (Gather, Concat, Mul, ...) is done at import time, so a
    Reshape to (N, -1) built by an exporter from Shape nodes becomes a graphc reshape with dim N."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=object)

    @property
    def shape(self):
        return self.values.shape


def _sym_or_const(values):
    v = np.asarray(values, dtype=object)
    if all(isinstance(e, (bool, np.bool_)) for e in v.reshape(-1)):
        return gc.constant(v.astype(bool))
    if all(isinstance(e, (int, np.integer)) for e in v.reshape(-1)):
        return gc.constant(v.astype(np.int64))
    return SymVal(v)


class Ctx:
    """What a converter sees: opset, number of outputs wanted, and helpers for constant inputs."""

    def __init__(self, opset: int):
        self.opset = opset
        self.node = None
        self.n_out = 1

    def const(self, t: Tensor | None, what: str = "input") -> np.ndarray | None:
        """The value of a constant (or initialiser) input; UnsupportedOnnx when it is computed."""
        if t is None:
            return None
        if isinstance(t, SymVal):
            return t.values
        v = constant_value(t)
        if v is None and t.node.op.name == "parameter":
            v = t.value
        if v is None:
            raise NeedsConstant(f"{self.node.op_type}: {what} must be a constant for graphc (it is computed)",
                                getattr(t, "onnx_name", None))
        return np.asarray(v)

    def ints(self, t: Tensor | None, what: str = "input") -> list[int] | None:
        v = self.const(t, what)
        return None if v is None else [_sh.canon_dim(e) if not isinstance(e, (int, np.integer)) else int(e)
                                       for e in v.reshape(-1)]

    def unsupported(self, why: str):
        return UnsupportedOnnx(f"{self.node.op_type}: {why}")


def _identifier(name: str, used: set) -> str:
    base = re.sub(r"\W", "_", name) or "input"
    if not base[0].isalpha() and base[0] != "_":
        base = "x_" + base
    out, k = base, 1
    while out in used:
        out, k = f"{base}_{k}", k + 1
    used.add(out)
    return out


def _value_shape(vi, fallback_name: str) -> tuple:
    dims = []
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise UnsupportedOnnx(f"input {vi.name!r} has no shape (rank unknown)")
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(_sh.dim_symbol(_identifier(d.dim_param, set())))
        else:
            dims.append(_sh.dim_symbol(f"{fallback_name}_{i}"))
    return tuple(dims)


def _load_model(model):
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, os.PathLike)):
        if not os.path.exists(model):
            raise OnnxImportError(f"no such ONNX file: {model}")
        try:
            return onnx.load(os.fspath(model))
        except Exception as e:
            raise OnnxImportError(f"{model}: not a readable ONNX model ({e})") from None
    raise OnnxImportError(f"load_onnx takes a path, bytes or onnx.ModelProto, got {type(model).__name__}")


def _opset(m) -> int:
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _op_key(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


_CONVERTERS: list = []   # [onnx_ops.CONVERTERS] once the converter modules are imported


def _converter(node):
    """The converter for a node (ops of other domains are registered as 'domain.OpType')."""
    if not _CONVERTERS:
        from .onnx_ops import CONVERTERS
        from . import onnx_quant  # noqa: F401  (registers QuantizeLinear, QLinearMatMul, ... on first use)
        _CONVERTERS.append(CONVERTERS)
    return _CONVERTERS[0].get(_op_key(node))


def check_supported(m) -> None:
    """Raise UnsupportedOnnx naming every op type in the model that graphc cannot import."""
    missing = sorted({_op_key(n) for n in m.graph.node if _converter(n) is None})
    if missing:
        raise UnsupportedOnnx(f"{len(missing)} unsupported ONNX op type(s) in model: {', '.join(missing)}")


def initializer_array(init) -> np.ndarray:
    """An initializer's values; a declared shape its data does not fill (hostile or truncated file)
    is an OnnxImportError, not a ValueError from NumPy."""
    from onnx import numpy_helper
    try:
        return numpy_helper.to_array(init)
    except (ValueError, MemoryError) as e:
        raise OnnxImportError(f"initializer {init.name!r} of declared shape {list(init.dims)}: "
                              f"its data does not match ({e})") from None


def load_onnx(model, name: str | None = None, constants: dict | None = None) -> Graph:
    """Import an ONNX model (path, bytes or ModelProto) as a gc.Graph (inputs, outputs, parameters).

    `constants={input_name: array}` fixes some model inputs to values (they become constants and
    leave `.inputs`): the way to import a model whose axes or shapes arrive as inputs."""
    from onnx import numpy_helper
    m = _load_model(model)
    check_supported(m)
    g = m.graph
    env: dict[str, Tensor | None] = {"": None}
    used: set = set()
    for init in g.initializer:
        a = initializer_array(init)
        dt = onnx_dtype(init.data_type)
        a = np.asarray(a, dtype=dt)
        env[init.name] = gc.parameter(init.name, a, dtype=dt) if dt.startswith("float") else gc.constant(a, dt)
    inputs = []
    for vi in g.input:
        if vi.name in env:  # an initialiser listed as an input (old exporters): a parameter, not an input
            continue
        if constants and vi.name in constants:
            v = np.asarray(constants[vi.name])
            env[vi.name] = gc.constant(v, onnx_dtype(vi.type.tensor_type.elem_type))
            continue
        pname = _identifier(vi.name, used)
        t = gc.placeholder(pname, _value_shape(vi, pname), onnx_dtype(vi.type.tensor_type.elem_type))
        t.onnx_name = vi.name
        env[vi.name] = t
        inputs.append(t)
    cx = Ctx(_opset(m))
    cx.source = os.path.basename(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else "onnx model"
    for k, node in enumerate(g.node):
        cx.index = k
        _convert_node(cx, node, env, _converter(node))
    outputs = [_output(env, vi) for vi in g.output]
    return Graph(inputs, outputs, name=name or g.name or "onnx")


def _convert_node(cx: Ctx, node, env: dict, fn) -> None:
    cx.node, cx.n_out, cx.env = node, len(node.output), env
    try:
        ins = [env[n] for n in node.input]
    except KeyError as e:
        where = node.name or node.op_type
        raise OnnxImportError(f"node {where}: input {e.args[0]!r} is not defined before it") from None
    attrs = {a.name: _attr_value(a) for a in node.attribute}
    if any(isinstance(t, SymVal) for t in ins):
        from .onnx_symbolic import SYM_FOLD
        if node.op_type in SYM_FOLD and all(t is None or isinstance(t, SymVal) or constant_value(t) is not None
                                            for t in ins):
            for name, v in zip(node.output, SYM_FOLD[node.op_type](cx, ins, attrs)):
                env[name] = _sym_or_const(v)
            return
        if node.op_type not in SYM_ARGS:
            raise UnsupportedOnnx(f"{node.op_type}: computes with symbolic shape values")
    try:
        outs = fn(cx, ins, attrs)
    except (UnsupportedOnnx, OnnxImportError):
        raise
    except GraphcError as e:
        raise OnnxImportError(f"{node.op_type} node {node.name!r}: {e}") from None
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    _stamp(outs, ins, (f"{getattr(cx, 'source', 'onnx model')} node {node.name or node.op_type}",
                       getattr(cx, "index", 0)))
    if not getattr(fn, "reads_env", False) and all(
            t is None or not isinstance(t, SymVal) and t.node.op.name == "constant" for t in ins):
        outs = _fold(outs)
    for name, t in zip(node.output, outs):
        if name:
            env[name] = t


def _stamp(outs: list, ins: list, loc: tuple) -> None:
    """Mark the nodes a converter built with the ONNX node they came from (errors and pictures show
    it instead of the importer's own line)."""
    known = {id(t) for t in ins if isinstance(t, Tensor)}
    stack = [t for t in outs if isinstance(t, Tensor)]
    seen = set()
    while stack:
        t = stack.pop()
        n = t.node
        if id(t) in known or id(n) in seen or n.op.name in ("placeholder", "parameter"):
            continue
        seen.add(id(n))
        n.loc = loc
        stack.extend(n.inputs)


def import_subgraph(cx: Ctx, graph, inputs: list) -> list:
    """Convert a subgraph (a Scan/Loop body) with its inputs bound to `inputs`; names of the
    enclosing graph stay visible (ONNX's outer-scope rule). Returns its outputs in order."""
    outer = (cx.node, cx.n_out, cx.env)
    missing = sorted({_op_key(n) for n in graph.node if _converter(n) is None})
    if missing:
        raise UnsupportedOnnx(f"{len(missing)} unsupported ONNX op type(s) in a subgraph: {', '.join(missing)}")
    env = dict(cx.env)
    for init in graph.initializer:
        from onnx import numpy_helper
        a = initializer_array(init)
        env[init.name] = gc.constant(np.asarray(a, dtype=onnx_dtype(init.data_type)))
    env.update({vi.name: t for vi, t in zip(graph.input, inputs)})
    try:
        for node in graph.node:
            _convert_node(cx, node, env, _converter(node))
    finally:
        cx.node, cx.n_out, cx.env = outer
    return [_output(env, vi) for vi in graph.output]


def _fold(outs: list) -> list:
    """Outputs of a node whose inputs are all constants, evaluated now (import-time folding)."""
    res = []
    for t in outs:
        if t is None or isinstance(t, SymVal) or t.node.op.name in ("constant", "placeholder", "parameter"):
            res.append(t)
            continue
        if _sh.is_static(t.shape) and _small(t):
            v = gc.evaluate([t], {})[0]
            res.append(gc.constant(np.asarray(v, dtype=t.dtype), t.dtype))
        else:
            res.append(t)
    return res


#: converters that read a symbolic-shape input through Ctx.const/ints (a shape or axes argument)
SYM_ARGS = {"Reshape", "Expand", "ConstantOfShape", "Tile", "Slice", "Pad", "Split", "Squeeze", "Unsqueeze"}


def _small(t: Tensor) -> bool:
    return _sh.size(t.shape) <= 1 << 22


def _output(env: dict, vi) -> Tensor:
    if vi.name not in env or env[vi.name] is None:
        raise OnnxImportError(f"graph output {vi.name!r} is not computed by any node")
    t = env[vi.name]
    if isinstance(t, SymVal):
        t = _sym_or_const(t.values)
        if isinstance(t, SymVal):
            raise UnsupportedOnnx(f"graph output {vi.name!r} is a symbolic shape value")
    tt = vi.type.tensor_type
    if tt.elem_type:
        dt = onnx_dtype(tt.elem_type)
        if t.dtype != dt:
            t = gc.cast(t, dt)
    if t.name is None:
        t.name = vi.name  # so tools (graphc show/run, export) keep the model's output names
    return t
