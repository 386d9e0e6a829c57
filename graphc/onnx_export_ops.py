"""Export rules graphc op -> ONNX nodes (registered into onnx_export.EXPORTERS on import).

ONNX wants both operands of a binary op in one dtype, where graphc promotes (NumPy rules): each
rule casts its inputs to the dtype the graphc op computes in, so results match bit for bit in kind.
"""
from __future__ import annotations

import numpy as np

from . import dtypes as _dt
from .onnx_export import INT64_MAX, Exporter, OnnxExportError, _onnx_type, exporter


def _in(ex: Exporter, node, ins, k: int, dtype: str) -> str:
    return ex.cast(ins[k], node.inputs[k].dtype, dtype)


def _out_dtype(node) -> str:
    return node.outputs[0].dtype


# ---- elementwise ---------------------------------------------------------------------------------

_UNARY = {"neg": "Neg", "abs": "Abs", "sign": "Sign", "floor": "Floor", "exp": "Exp", "log": "Log",
          "sqrt": "Sqrt", "sin": "Sin", "cos": "Cos", "tanh": "Tanh", "sigmoid": "Sigmoid",
          "softplus": "Softplus", "erf": "Erf", "relu": "Relu", "stop_gradient": "Identity"}
_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
          "minimum": "Min", "logical_and": "And", "logical_or": "Or"}
_COMPARE = {"less": "Less", "less_equal": "LessOrEqual", "greater": "Greater",
            "greater_equal": "GreaterOrEqual", "equal": "Equal"}


def _unary_rule(onnx_op):
    def rule(ex, node, ins):
        return [ex.one(onnx_op, _in(ex, node, ins, 0, _out_dtype(node)))]
    return rule


def _arith_rule(onnx_op):
    def rule(ex, node, ins):
        dt = _out_dtype(node)
        return [ex.one(onnx_op, _in(ex, node, ins, 0, dt), _in(ex, node, ins, 1, dt))]
    return rule


def _compare_rule(onnx_op):
    def rule(ex, node, ins):
        dt = _dt.promote(*[t.dtype for t in node.inputs])
        return [ex.one(onnx_op, _in(ex, node, ins, 0, dt), _in(ex, node, ins, 1, dt))]
    return rule


for _g, _o in _UNARY.items():
    exporter(_g)(_unary_rule(_o))
for _g, _o in _ARITH.items():
    exporter(_g)(_arith_rule(_o))
for _g, _o in _COMPARE.items():
    exporter(_g)(_compare_rule(_o))


@exporter("not_equal")
def _not_equal(ex, node, ins):
    return [ex.one("Not", _compare_rule("Equal")(ex, node, ins)[0])]


@exporter("log1p", "expm1", "rsqrt")
def _composite_unary(ex, node, ins):
    dt = _out_dtype(node)
    x = _in(ex, node, ins, 0, dt)
    op = node.op.name
    if op == "rsqrt":
        return [ex.one("Reciprocal", ex.one("Sqrt", x))]
    one = ex.const(np.ones((), dt))   # made only where used: ONNX Runtime warns about unused initialisers
    if op == "log1p":
        return [ex.one("Log", ex.one("Add", x, one))]
    return [ex.one("Sub", ex.one("Exp", x), one)]


@exporter("leaky_relu")
def _leaky(ex, node, ins):
    return [ex.one("LeakyRelu", ins[0], alpha=float(node.attrs["alpha"]))]


@exporter("zeros_like", "ones_like")
def _fill_like(ex, node, ins):
    dt = _out_dtype(node)
    value = np.zeros(1, dt) if node.op.name == "zeros_like" else np.ones(1, dt)
    from onnx import numpy_helper
    return [ex.one("ConstantOfShape", ex.one("Shape", ins[0]), value=numpy_helper.from_array(value))]


@exporter("where")
def _where(ex, node, ins):
    dt = _out_dtype(node)
    return [ex.one("Where", ins[0], _in(ex, node, ins, 1, dt), _in(ex, node, ins, 2, dt))]


@exporter("cast")
def _cast(ex, node, ins):
    return [ex.one("Cast", ins[0], to=_onnx_type(node.attrs["dtype"]))]


# ---- reductions and softmax ----------------------------------------------------------------------

_REDUCE = {"sum": "ReduceSum", "prod": "ReduceProd", "max": "ReduceMax", "min": "ReduceMin",
           "logsumexp": "ReduceLogSumExp"}


@exporter(*_REDUCE)
def _reduce(ex, node, ins):
    axes, keep = node.attrs["axis"], int(node.attrs["keepdims"])
    x = _in(ex, node, ins, 0, _out_dtype(node))
    if not axes:
        return [ex.one("Identity", x)]
    return [ex.one(_REDUCE[node.op.name], x, ex.ints(axes), keepdims=keep)]


@exporter("argmax", "argmin")
def _argreduce(ex, node, ins):
    x, axis, keep = ins[0], node.attrs["axis"], int(node.attrs["keepdims"])
    onnx_op = "ArgMax" if node.op.name == "argmax" else "ArgMin"
    if axis is not None:
        return [ex.one(onnx_op, x, axis=axis, keepdims=keep)]
    flat = ex.one("Reshape", x, ex.ints([-1]))
    r = ex.one(onnx_op, flat, axis=0, keepdims=0)
    return [ex.one("Reshape", r, ex.ints([1] * node.inputs[0].ndim)) if keep else r]


@exporter("softmax", "log_softmax")
def _softmax(ex, node, ins):
    return [ex.one("Softmax" if node.op.name == "softmax" else "LogSoftmax", ins[0], axis=node.attrs["axis"])]


@exporter("size_of")
def _size_of(ex, node, ins):
    x, axes = node.inputs[0], node.attrs["axes"]
    n = ex.shape([x.shape[a] for a in axes]) if axes else ex.ints([1])
    total = ex.one("ReduceProd", n, ex.ints([0]), keepdims=0)
    return [ex.one("Cast", total, to=_onnx_type(node.attrs["dtype"]))]


# ---- matrix products and shape ops -----------------------------------------------------------------

@exporter("matmul")
def _matmul(ex, node, ins):
    dt = _out_dtype(node)
    return [ex.one("MatMul", _in(ex, node, ins, 0, dt), _in(ex, node, ins, 1, dt))]


@exporter("reshape")
def _reshape(ex, node, ins):
    return [ex.one("Reshape", ins[0], ex.shape(node.attrs["shape"]))]


@exporter("broadcast_to")
def _broadcast_to(ex, node, ins):
    return [ex.one("Expand", ins[0], ex.shape(node.attrs["shape"]))]


@exporter("transpose")
def _transpose(ex, node, ins):
    return [ex.one("Transpose", ins[0], perm=list(node.attrs["axes"]))]


@exporter("concatenate")
def _concat(ex, node, ins):
    dt = _out_dtype(node)
    return [ex.one("Concat", *[_in(ex, node, ins, k, dt) for k in range(len(ins))], axis=node.attrs["axis"])]


@exporter("take")
def _take(ex, node, ins):
    return [ex.one("Gather", ins[0], ins[1], axis=node.attrs["axis"])]


@exporter("getitem")
def _getitem(ex, node, ins):
    """Basic indexing: one Slice for the slices, Gather per int (last axis first), Unsqueeze for None."""
    x, index = ins[0], node.attrs["index"]
    starts, ends, axes, steps, ints, nones = [], [], [], [], [], []
    ax = out_pos = 0
    for it in index:
        if it is None:
            nones.append(out_pos)
            out_pos += 1
            continue
        if isinstance(it, slice):
            if it != slice(None):
                step = 1 if it.step is None else it.step
                lo = it.start if it.start is not None else (0 if step > 0 else INT64_MAX)
                hi = it.stop if it.stop is not None else (INT64_MAX if step > 0 else -INT64_MAX - 1)
                starts.append(lo), ends.append(hi), axes.append(ax), steps.append(step)
            out_pos += 1
        else:
            ints.append((ax, it))
        ax += 1
    if axes:
        x = ex.one("Slice", x, ex.ints(starts), ex.ints(ends), ex.ints(axes), ex.ints(steps))
    for a, i in reversed(ints):
        x = ex.one("Gather", x, ex.const(np.int64(i)), axis=a)
    if nones:
        x = ex.one("Unsqueeze", x, ex.ints(nones))
    return [x if x != ins[0] else ex.one("Identity", x)]


# ---- fused and scan ---------------------------------------------------------------------------------

@exporter("fused")
def _fused(ex, node, ins):
    body = node.attrs["body"]
    return ex.run_graph(body, {id(p): n for p, n in zip(body.inputs, ins)})


@exporter("scan")
def _scan(ex, node, ins):
    """ONNX Scan: state variables = carries, scan inputs = sequences; loop invariants are read from
    the enclosing graph by name; the carry history is an extra scan output of the body."""
    from onnx import helper
    from .onnx_export import _value_info
    a = node.attrs
    body, nc, ns = a["body"], a["n_carry"], a["n_seq"]
    if ns == 0:
        raise OnnxExportError("scan without sequences (length only) has no ONNX Scan export")
    sub = Exporter(parent=ex)
    phs = body.inputs
    bound = {id(p): sub.fresh(f"{p.name or 'arg'}_in") for p in phs[:nc + ns]}
    bound.update({id(p): n for p, n in zip(phs[nc + ns:], ins[nc + ns:])})  # outer-scope names
    outs = sub.run_graph(body, bound)
    outs = [sub.one("Identity", o) for o in outs] + [sub.one("Identity", bound[id(p)]) for p in phs[:nc]]
    vis_in = [_value_info(bound[id(p)], p) for p in phs[:nc + ns]]
    vis_out = [_value_info(n, t) for n, t in zip(outs, list(body.outputs) + list(phs[:nc]))]
    g = helper.make_graph(sub.nodes, ex.fresh("scan_body"), vis_in, vis_out, sub.inits)
    n_scan_out = len(body.outputs) - nc + nc
    rev = int(bool(a["reverse"]))
    return ex.emit("Scan", ins[:nc + ns], n_out=nc + n_scan_out, body=g, num_scan_inputs=ns,
                   scan_input_directions=[rev] * ns, scan_output_directions=[rev] * n_scan_out)


# ---- neural-net ops (graphc/ops/nn_ops.py) -------------------------------------------------------

def _pads(pads) -> list[int]:
    """graphc ((top, bottom), (left, right)) -> ONNX [top, left, bottom, right]."""
    return [p[0] for p in pads] + [p[1] for p in pads]


@exporter("conv2d")
def _conv2d(ex, node, ins):
    a = node.attrs
    return [ex.one("Conv", ins[0], ins[1], kernel_shape=list(node.inputs[1].shape[2:]), strides=list(a["stride"]),
                   pads=_pads(a["pads"]), dilations=list(a["dilation"]), group=int(a["groups"]))]


@exporter("max_pool2d")
def _max_pool2d(ex, node, ins):
    a = node.attrs
    return [ex.one("MaxPool", ins[0], kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                   pads=_pads(a["pads"]))]


@exporter("conv2d_grad_input")
def _conv2d_grad_input(ex, node, ins):
    """The input gradient of a convolution is a transposed convolution of the output gradient."""
    a = node.attrs
    gy, w = node.inputs
    h, wd = a["x_hw"]
    if not all(isinstance(d, int) for d in (h, wd)):
        raise OnnxExportError("conv2d_grad_input with symbolic spatial dims")
    return [ex.one("ConvTranspose", ins[0], ins[1], kernel_shape=list(w.shape[2:]), strides=list(a["stride"]),
                   pads=_pads(a["pads"]), dilations=list(a["dilation"]), group=int(a["groups"]),
                   output_shape=[h, wd])]


@exporter("layer_norm")
def _layer_norm(ex, node, ins):
    """LayerNormalization (opset 17) over the trailing naxes axes; no weight: a Scale of ones (ONNX needs one)."""
    a, x = node.attrs, node.inputs[0]
    norm = x.shape[x.ndim - len(a["axis"]):]
    if a["weight"]:
        scale = ins[1]
    elif all(isinstance(d, int) for d in norm):
        scale = ex.const(np.ones(norm, x.dtype), hint="layer_norm_scale")
    else:
        raise OnnxExportError("layer_norm without weight over symbolic normalised dims")
    args = [ins[0], scale] + ([ins[-1]] if a["bias"] else [])
    return [ex.one("LayerNormalization", *args, axis=-len(a["axis"]), epsilon=float(a["eps"]))]


@exporter("scaled_dot_product_attention")
def _scaled_dot_product_attention(ex, node, ins):
    """Its composition (MatMul, Mul, Add, Softmax, MatMul): what ONNX Runtime fuses back itself."""
    from .ops.attention import composition_body
    body = composition_body(node)
    return ex.run_graph(body, {id(p): n for p, n in zip(body.inputs, ins)})
