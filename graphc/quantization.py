"""gc.quantize: post-training static quantisation of a compiled float32 function.

    qf = gc.quantize(f, calibration_batches)      # f: a gc.Function (inference: no updates)
    y = qf(x)                                     # matmuls and convolutions on int8

What it does to f's graph:
1. finds every matmul whose right operand, and every conv2d (groups 1) whose filter, is computed from
   parameters and constants only (a Dense/Conv2D weight), with a float32 activation;
2. follows each one's single-reader chain of elementwise ops whose other operands are weights (bias
   add, eval-mode batch norm) and keeps the longest prefix that is a per-channel affine map
   y = A[c] * h + B[c] (checked numerically on probes), then a ReLU if one follows;
3. runs the calibration batches through f's float graph (NumPy) and records each quantised layer's
   input and chain-output range (min/max, or a percentile of |values| per batch, averaged);
4. rebuilds the graph: activations quantised to uint8 (asymmetric, zero point) or int8 (symmetric)
   with the calibrated per-tensor scale (`quantize_linear`), weights to int8 symmetric per output
   channel (constants: the llvm backend packs them at compile time), and one `qlinear_matmul` /
   `qlinear_conv2d` per layer whose epilogue applies the zero-point correction, scale, bias, batch norm
   and ReLU, and requantises straight to the next layer's uint8 input when every reader of the chain's
   result is another quantised layer (through reshapes/transposes), else dequantises to float32.

Weights and folded batch norms are a snapshot of the parameters: when a parameter of f is given a new
array (an update, `set_value`), the next call re-quantises the weights and recompiles (the activation
ranges stay those of the calibration). Mutating a parameter's array in place is not seen.
"""
from __future__ import annotations

import numpy as np

from . import dtypes as _dt
from .errors import GraphcError
from .function import Function
from .ir import Graph, Tensor, Trait
from .ops import elementwise as E
from .ops import nn_ops as NN
from .ops import quant as Q
from .ops.core import constant, placeholder
from .ops.linalg import MatMul

#: ops a quantised tensor passes through unchanged (its scale and zero point stay): views
PASSTHROUGH = Trait.MOVEMENT


class _Layer:
    """One quantised matmul/conv2d: its head node, weight tensor, folded chain and the chain's end."""

    def __init__(self, head, weight, chain, relu_node, affine):
        self.head, self.weight, self.chain, self.relu_node = head, weight, chain, relu_node
        self.affine = affine   # (A, B) per output channel, or None
        last = relu_node or (chain[-1] if chain else head)
        self.end = last.outputs[0]
        self.is_conv = head.op is NN.Conv2d

    @property
    def act(self) -> Tensor:
        return self.head.inputs[0]

    @property
    def nodes(self) -> list:
        return [self.head] + self.chain + ([self.relu_node] if self.relu_node else [])


def _dynamic(graph: Graph) -> set:
    """ids of the tensors that depend on an input (or a random draw): not weights."""
    dyn: set = set()
    for node in graph.nodes:
        if node.op.has(Trait.INPUT | Trait.RANDOM | Trait.IMPURE) or any(id(t) in dyn for t in node.inputs):
            dyn.update(id(t) for t in node.outputs)
    return dyn


def _users(graph: Graph) -> dict:
    from .passes.rewrite import users
    return users(graph)


def _probe_shape(shape) -> tuple | None:
    """h's shape with symbolic dims (the batch) as 1; None when another dim is symbolic."""
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int):
            out.append(d)
        elif i == 0:
            out.append(1)
        else:
            return None
    return tuple(out)


def _affine(h: Tensor, chain: list, axis: int):
    """(A, B) per channel (axis `axis` of h) when the chain maps h to A * h + B, else None."""
    from .passes.rewrite import clone
    from .reference import evaluate
    shape = _probe_shape(h.shape)
    if shape is None:
        return None
    ph = placeholder("h", h.shape, h.dtype)
    env = {id(h): ph}
    for n in chain:
        env[id(n.outputs[0])] = clone(n, [env.get(id(t), t) for t in n.inputs])[0]
    y = env[id(chain[-1].outputs[0])]

    def run(v):
        return np.asarray(evaluate([y], {ph: np.asarray(v, np.float32)})[0], np.float64)
    try:
        y0, y1 = run(np.zeros(shape)), run(np.ones(shape))
    except GraphcError:
        return None
    if y0.shape != shape:
        return None
    a, b = y1 - y0, y0
    other = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    ac, bc = a.mean(axis=other), b.mean(axis=other)
    cshape = [1] * len(shape)
    cshape[axis] = -1
    tol = lambda v: 1e-5 * (np.abs(v).max() + 1e-12)   # noqa: E731
    if np.abs(a - ac.reshape(cshape)).max() > tol(ac) or np.abs(b - bc.reshape(cshape)).max() > tol(bc):
        return None
    r = np.random.default_rng(0).standard_normal(shape) * 4
    pred = ac.reshape(cshape) * r + bc.reshape(cshape)
    if np.abs(run(r) - pred).max() > 1e-4 * (np.abs(pred).max() + 1e-6):
        return None
    return ac, bc


def _find_layers(graph: Graph) -> list[_Layer]:
    dyn, users, roots = _dynamic(graph), _users(graph), {id(t) for t in graph.roots}
    layers = []
    for node in graph.nodes:
        if node.op is MatMul:
            a, w = node.inputs
            ok = w.ndim == 2 and a.ndim >= 2
        elif node.op is NN.Conv2d:
            (a, w), ok = node.inputs, node.attrs["groups"] == 1
        else:
            continue
        if not ok or id(w) in dyn or id(a) not in dyn or a.dtype != "float32" or w.dtype != "float32":
            continue
        h = node.outputs[0]
        chain, cur = [], h
        while id(cur) not in roots:
            us = users.get(id(cur), [])
            if len(us) != 1:
                break
            c = us[0]
            if not (c.op.has(Trait.ELEMENTWISE) and len(c.outputs) == 1) or c.op is E.relu.op:
                break
            if sum(t is cur for t in c.inputs) != 1 or any(id(t) in dyn for t in c.inputs if t is not cur):
                break
            o = c.outputs[0]
            if tuple(o.shape) != tuple(h.shape) or o.dtype != "float32":
                break
            chain.append(c)
            cur = o
        affine = None
        axis = 1 if node.op is NN.Conv2d else -1
        while chain:   # the longest affine prefix
            affine = _affine(h, chain, axis)
            if affine is not None:
                break
            chain.pop()
        cur = chain[-1].outputs[0] if chain else h
        relu = None
        us = users.get(id(cur), [])
        if id(cur) not in roots and len(us) == 1 and us[0].op is E.relu.op:
            relu = us[0]
        layers.append(_Layer(node, w, chain, relu, affine))
    return layers


def _qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """(scale, zero point) of a per-tensor range: uint8 asymmetric (the range widened to hold 0), int8
    symmetric."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "int8":
        m = max(-lo, hi)
        return (m / 127.0 if m > 0 else 1.0), 0
    scale = (hi - lo) / 255.0
    if not scale > 0 or not np.isfinite(scale):
        return 1.0, 0
    return scale, int(np.clip(np.rint(-lo / scale), 0, 255))


class _Ranges:
    """Per-tensor calibration statistics: min/max, or a percentile of the values per batch (averaged)."""

    def __init__(self, method: str, percentile: float):
        if method not in ("minmax", "percentile"):
            raise GraphcError(f"gc.quantize: method must be 'minmax' or 'percentile', got {method!r}")
        if not 50 < percentile <= 100:
            raise GraphcError(f"gc.quantize: percentile must be in (50, 100], got {percentile!r}")
        self.method, self.p = method, percentile
        self.stats: dict = {}

    def add(self, key, v: np.ndarray) -> None:
        v = np.asarray(v, np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if not v.size:
            return
        if self.method == "minmax":
            lo, hi = v.min(), v.max()
            old = self.stats.get(key)
            self.stats[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        else:
            self.stats.setdefault(key, []).append((np.percentile(v, 100 - self.p), np.percentile(v, self.p)))

    def range(self, key) -> tuple[float, float]:
        s = self.stats.get(key)
        if s is None:
            return 0.0, 1.0
        if self.method == "minmax":
            return s
        return float(np.mean([a for a, _ in s])), float(np.mean([b for _, b in s]))


def _batches(calibration_batches, n_inputs: int):
    for i, b in enumerate(calibration_batches):
        args = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if len(args) != n_inputs:
            raise GraphcError(f"gc.quantize: calibration batch {i} has {len(args)} arrays, the function takes "
                              f"{n_inputs} inputs")
        yield args


def _calibrate(graph: Graph, layers, batches, ranges: _Ranges, n_inputs) -> int:
    keys, seen = [], set()
    for ly in layers:
        for t in (ly.act, ly.end):
            if id(t) not in seen:
                seen.add(id(t))
                keys.append(t)
    f = Function(graph.inputs, keys, backend="numpy")
    count = 0
    for args in _batches(batches, n_inputs):
        for t, v in zip(keys, f(*args)):
            ranges.add(id(t), v)
        count += 1
    if not count:
        raise GraphcError("gc.quantize: no calibration batches (give an iterable of input batches)")
    return count


def _weights(layer: _Layer, bits: int):
    from .reference import evaluate
    w = np.asarray(evaluate([layer.weight], {})[0], np.float32)
    return Q.quantize_weights(w, axis=0 if layer.is_conv else 1, bits=bits)


class _Rebuild:
    def __init__(self, graph, layers, ranges: _Ranges, activations: str, weight_bits: int):
        self.graph, self.layers, self.ranges = graph, layers, ranges
        self.adt, self.bits = activations, weight_bits
        self.users, self.roots = _users(graph), {id(t) for t in graph.roots}
        self.head_of = {id(ly.head): ly for ly in layers}
        self.acts = {id(ly.act) for ly in layers}
        self.env: dict = {}
        self.q: dict = {}   # id(old float tensor) -> (quantised tensor, scale, zero point)
        self.report: list = []

    def _feeds_layers_only(self, t: Tensor) -> bool:
        """Every reader of t is a quantised layer reading it as its activation, or a view whose readers are."""
        if id(t) in self.roots:
            return False
        us = self.users.get(id(t), [])
        if not us:
            return False
        for u in us:
            if id(u) in self.head_of and u.inputs[0] is t and u.inputs[1] is not t:
                continue
            if u.op.has(PASSTHROUGH) and len(u.inputs) == 1 and len(u.outputs) == 1 and \
                    self._feeds_layers_only(u.outputs[0]):
                continue
            return False
        return True

    def run(self) -> Graph:
        from .ir import apply
        from .passes.rewrite import clone
        skip = {id(n) for ly in self.layers for n in ly.nodes[1:]}
        for node in self.graph.nodes:
            if node.op.has(Trait.LEAF) or id(node) in skip:
                continue
            if id(node) in self.head_of:
                self._layer(self.head_of[id(node)])
                continue
            src = node.inputs[0] if node.inputs else None
            if src is not None and id(src) in self.q and node.op.has(PASSTHROUGH) and len(node.inputs) == 1 \
                    and self._feeds_layers_only(node.outputs[0]):
                qt, s, z = self.q[id(src)]
                moved = apply(node.op, qt, **node.attrs)
                self.q[id(node.outputs[0])] = (moved, s, z)
                self.env[id(node.outputs[0])] = Q.dequantize_linear(moved, np.float32(s), np.asarray(z, self.adt))
                continue
            new = [self.env.get(id(t), t) for t in node.inputs]
            for o, n in zip(node.outputs, clone(node, new)):
                self.env[id(o)] = n
        g = self.graph
        return Graph(g.inputs, [self.env.get(id(t), t) for t in g.outputs], [], g.name + "_int8")

    def _layer(self, ly: _Layer):
        a = ly.act
        if id(a) in self.q:
            aq, sa, za = self.q[id(a)]
        else:
            sa, za = _qparams(*self.ranges.range(id(a)), self.adt)
            aq = Q.quantize_linear(self.env.get(id(a), a), np.float32(sa), np.asarray(za, self.adt))
        wq, sw = _weights(ly, self.bits)
        m = wq.shape[0] if ly.is_conv else wq.shape[1]
        A, B = ly.affine if ly.affine is not None else (np.ones(m), np.zeros(m))
        colsum = wq.astype(np.int64).sum(axis=(1, 2, 3) if ly.is_conv else 0)
        offset = (-za * colsum).astype(np.int32)
        mult = np.asarray(A, np.float64) * sa * sw.astype(np.float64)
        bias = np.asarray(B, np.float64)
        quantised_out = self._feeds_layers_only(ly.end)
        if quantised_out:
            sy, zy = _qparams(*self.ranges.range(id(ly.end)), self.adt)
            mult, bias, out_dtype = mult / sy, bias / sy, self.adt
        else:
            sy, zy, out_dtype = None, 0, "float32"
        args = (aq, constant(wq), offset, mult.astype(np.float32), bias.astype(np.float32))
        kw = dict(relu=ly.relu_node is not None, out_dtype=out_dtype, out_zero_point=zy)
        if ly.is_conv:
            at = ly.head.attrs
            y = Q.qlinear_conv2d(*args, stride=at["stride"], padding=at["pads"], dilation=at["dilation"],
                                 pad_value=za, **kw)
        else:
            y = Q.qlinear_matmul(*args, **kw)
        if quantised_out:
            self.q[id(ly.end)] = (y, sy, zy)
            self.env[id(ly.end)] = Q.dequantize_linear(y, np.float32(sy), np.asarray(zy, self.adt))
        else:
            self.env[id(ly.end)] = y
        self.report.append({"op": ly.head.op.name, "weight": tuple(wq.shape), "input_scale": sa,
                            "input_zero_point": za, "folded": [n.op.name for n in ly.chain],
                            "relu": ly.relu_node is not None, "output": out_dtype})


class QuantizedFunction:
    """What gc.quantize returns: call it like f. `.function` is the compiled int8 gc.Function (its
    `.graph`, `.source`, `.program`), `.layers` a row per quantised layer, `.ranges` the calibration."""

    def __init__(self, f: Function, graph, layers, ranges, options):
        self.source_function, self._graph, self._layers, self.ranges = f, graph, layers, ranges
        self._options = options
        self._build()

    def _build(self):
        adt, bits, backend, optimize = self._options
        rb = _Rebuild(self._graph, self._layers, self.ranges, adt, bits)
        g = rb.run()
        self.layers = rb.report
        self.function = Function(g.inputs, g.outputs[0] if self.source_function.single else g.outputs,
                                 backend=backend, optimize=optimize, name=g.name)
        self._snapshot = [(p, p._value) for p in self._graph.parameters]

    def __call__(self, *args, **kwargs):
        if any(p._value is not v for p, v in self._snapshot):   # a parameter has a new array: re-quantise
            self._build()
        return self.function(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.function, name)

    def __repr__(self):
        return (f"<graphc.QuantizedFunction {len(self.layers)} int8 layers backend="
                f"{self.function.backend_name}>")


def quantize(f: Function, calibration_batches, *, backend: str | None = None, method: str = "minmax",
             percentile: float = 99.99, activations: str = "uint8", weight_bits: int | None = None,
             optimize: int | None = None) -> QuantizedFunction:
    """A compiled int8 version of float32 function `f`: its matmuls and convolutions with weights run on
    int8 weights (symmetric, per output channel) and `activations` ('uint8' asymmetric or 'int8'
    symmetric, per-tensor scales from `calibration_batches`: an iterable of input batches, each an
    array or a tuple of arrays as f takes them), int32 accumulation, the requantisation (scale, bias,
    batch norm, ReLU, zero point, rounding, saturation) in the GEMM's epilogue. `method`: 'minmax' or
    'percentile' (`percentile` of each batch's values, averaged). `weight_bits`: 8, or 7 (no int16
    saturation in AVX2's vpmaddubsw: the fast path on hosts without VNNI; the default there on llvm).
    `backend`/`optimize` default to f's. See the module docstring for what is folded."""
    if not isinstance(f, Function):
        raise GraphcError(f"gc.quantize: f must be a compiled gc.function, got {type(f).__name__}")
    g = f.user_graph
    if g.updates:
        raise GraphcError("gc.quantize: f has updates (a training step, or batch norm in training mode); "
                          "compile the inference function (training=False) and quantise that")
    if activations not in Q.QTYPES:
        raise GraphcError(f"gc.quantize: activations must be 'uint8' or 'int8', got {activations!r}")
    backend = backend or f.backend_name
    if weight_bits is None:
        weight_bits = 8
        if backend == "llvm":
            from .backends.llvm import qgemm
            weight_bits = 7 if qgemm.isa() in ("avx2", "generic") else 8
    if weight_bits not in (7, 8):
        raise GraphcError(f"gc.quantize: weight_bits must be 7 or 8, got {weight_bits!r}")
    for t in g.inputs:
        if _dt.is_half(t.dtype):
            raise GraphcError(f"gc.quantize: input {t.name!r} is {t.dtype}; quantise a float32 function")
    layers = _find_layers(g)
    if not layers:
        raise GraphcError("gc.quantize: f has no matmul or conv2d with a weight (computed from parameters) "
                          "and a float32 activation: nothing to quantise")
    ranges = _Ranges(method, percentile)
    _calibrate(g, layers, calibration_batches, ranges, len(g.inputs))
    return QuantizedFunction(f, g, layers, ranges, (activations, weight_bits, backend,
                                                    f.options.optimize if optimize is None else optimize))


__all__ = ["quantize", "QuantizedFunction"]
