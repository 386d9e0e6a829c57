"""Lower an (optimised) graph to one CUDA C translation unit plus a host-side launch plan.

Every tensor gets a buffer (reshape aliases its input's). Each node becomes one kernel, chosen by
the op through one registry keyed by op objects (`Lowering.table()`):
- `C_CODE`: op -> scalar C spelling (tinygrad's `code_for_op`), a template over the operands
  `{0}, {1}, ...` and the node's attrs (`{alpha}`), or a function (lowering, node, values) -> C
  expression. Every op spelled here (elementwise ops, cast, views read elementwise) lowers as a
  pointwise kernel, alone or inside a fused group; `C_INT_CODE` overrides spellings for integers.
- `REDUCERS`: reduction op -> how the reduction kernel combines (kernels.Monoid / ArgReduce / ...).
- `LOWERINGS`: every other op -> `fn(lowering, node)` emitting its kernels/steps (this file, plus
  the rows of lower_nn.py, lower_scan.py and lower_random.py).
A backend that lowers differently subclasses `Lowering` and overrides entries (cuda_emulated).
An op outside the table runs its NumPy impl on the host, listed in Program.info["fallback_ops"]."""
from __future__ import annotations

import functools
import re

from graphc import dtypes as _dt
from graphc.names import Names
from graphc.backends.schedule.status import StatusCodes
from graphc.ir import Graph, Node, Tensor, Trait
from graphc.ops import elementwise as E
from graphc.ops.core import Cast, StopGradient
from graphc.ops.fused import Fused
from graphc.ops.linalg import MatMul
from graphc.ops.reduce import ArgMax, ArgMin, LogSoftmax, LogSumExp, Max, Min, Prod, Softmax, Sum
from graphc.ops.shape_ops import (BroadcastTo, Concatenate, GetItem, IndexGrad, Reshape, SizeOf, Take, TakeGrad,
                                  Transpose)
from . import kernels as K
from . import lower_nn, lower_random, lower_scan
from .cexpr import DimTable, View, broadcast_view, c_literal, cadd, cmul, contiguous_strides, cprod, eval_dim
from .plan import Buffer, Fill, HostOp, Launch, Plan
from .prelude import C_TYPES, PRELUDE


def _same_value(L, nd, vals) -> str:
    """cast, stop_gradient, broadcast_to: the operand converted to the output dtype (the kernel's
    broadcast view already reads the right element)."""
    return L._value(nd.inputs[0], vals, nd.outputs[0].dtype)


def _size_of(L, nd, vals) -> str:
    n = cprod([L.dt.dim(nd.inputs[0].shape[a]) for a in nd.attrs["axes"]])
    return f"(({C_TYPES[nd.outputs[0].dtype]}){n})"


#: op -> C spelling of one element (helpers gc_* come from the prelude)
C_CODE = {
    E.neg.op: "(-{0})", E.abs.op: "gc_abs({0})", E.sign.op: "gc_sign({0})", E.floor.op: "floor({0})",
    E.exp.op: "exp({0})", E.log.op: "log({0})", E.log1p.op: "log1p({0})", E.expm1.op: "expm1({0})",
    E.sqrt.op: "sqrt({0})", E.rsqrt.op: "(1/sqrt({0}))", E.sin.op: "sin({0})", E.cos.op: "cos({0})", E.atan.op: "atan({0})",
    E.tanh.op: "tanh({0})", E.sigmoid.op: "(1/(1+exp(-{0})))",
    E.softplus.op: "({0} > 0 ? {0} + log1p(exp(-{0})) : log1p(exp({0})))", E.erf.op: "erf({0})",
    E.relu.op: "({0} > 0 ? {0} : 0)", E.zeros_like.op: "0", E.ones_like.op: "1",
    E.leaky_relu.op: "({0} >= 0 ? {0} : {0} * {alpha})",
    E.add.op: "({0} + {1})", E.sub.op: "({0} - {1})", E.mul.op: "({0} * {1})", E.div.op: "({0} / {1})",
    E.pow.op: "pow({0}, {1})", E.maximum.op: "gc_max({0}, {1})", E.minimum.op: "gc_min({0}, {1})",
    E.less.op: "({0} < {1})", E.less_equal.op: "({0} <= {1})", E.greater.op: "({0} > {1})",
    E.greater_equal.op: "({0} >= {1})", E.equal.op: "({0} == {1})", E.not_equal.op: "({0} != {1})",
    E.logical_and.op: "({0} && {1})", E.logical_or.op: "({0} || {1})", E.Where: "({0} ? {1} : {2})",
    Cast: _same_value, StopGradient: _same_value, BroadcastTo: _same_value, SizeOf: _size_of,
}
#: spellings used when the operands are integers (the C math functions take floating point)
C_INT_CODE = {E.floor.op: "{0}", E.pow.op: "gc_ipow({0}, {1})"}
#: reduction op -> the reduction kernel's combine (kernels.py)
REDUCERS = {
    Sum: K.Monoid("GcSum()", "0", "0"), Prod: K.Monoid("GcProd()", "1", "1"),
    Max: K.Monoid("GcMax()", "-GC_INF", "({t})(1ULL << (8 * sizeof({t}) - 1))"),
    Min: K.Monoid("GcMin()", "GC_INF", "({t})~(1ULL << (8 * sizeof({t}) - 1))"),
    LogSumExp: K.LOG_SUM_EXP, ArgMax: K.ArgReduce(True), ArgMin: K.ArgReduce(False),
}
# names the kernel templates use for locals, and C/C++ keywords: a buffer never takes one
_RESERVED = re.compile(r"^(i|j|k|n|m|o|s|q|g|c|p|pp|cc|th|tw|kh|kw|oh|ow|ih|iw|bh|bw|xv|inside|n_|M|N|K|"
                       r"t0|tx|ty|bz|row|col|acc|best|bi|x_|gd|A|B|As|Bs|n_out|n_red|nbatch|n4|i4|"
                       r"part|pv|pi|v|[abcevr]\d+|r_.*|int|float|double|bool|long|char|short|unsigned|signed|"
                       r"void|const|return|if|else|for|while|do|break|continue|switch|case|default|goto|"
                       r"struct|class|union|enum|auto|static|extern|register|volatile|inline|new|delete|this|"
                       r"true|false|template|typename|namespace|using|operator|sizeof|exp|log|max|min|abs)$")


class Lowering:
    """Graph -> (source, Plan). The tables are class attributes: a subclass copies and overrides them."""
    C_CODE: dict = C_CODE
    C_INT_CODE: dict = C_INT_CODE
    REDUCERS: dict = REDUCERS
    LOWERINGS: dict = {}  # op -> fn(lowering, node); filled at the end of this module

    @classmethod
    def table(cls) -> dict:
        """The one registry: op -> fn(lowering, node). Ops with a C spelling lower as pointwise kernels,
        ops with a reducer as reduction kernels, the rest by their LOWERINGS row."""
        table = {op: Lowering.lower_pointwise for op in cls.C_CODE}
        table.update({op: Lowering.lower_reduce for op in cls.REDUCERS})
        table.update(cls.LOWERINGS)
        return table

    def __init__(self, graph: Graph):
        self.g = graph
        self._table = self.table()
        self.dt = DimTable()
        self.buffers: list[Buffer] = []
        self.buf_of: dict[int, int] = {}
        self.steps: list = []
        self.kernels: list[str] = []
        self.kinds: dict[str, str] = {}
        c_functions = _c_functions(type(self))
        # buffer and kernel-parameter names: one scope for the translation unit (scan bodies share it)
        self.names = Names(lambda n: bool(_RESERVED.match(n)) or n in c_functions, default="t", sep="")
        self.status: int | None = None   # int32 buffer kernels set when an index is out of range
        self.status_codes = StatusCodes()  # code -> (node whose kernel set it, message)

    # ---- buffers -------------------------------------------------------------------------------
    def new_buffer(self, t: Tensor, kind="temp", hint=None, **kw) -> int:
        b = Buffer(len(self.buffers), self.names(t.name or f"t_{hint or 'tmp'}"), t.dtype, t.shape, kind, **kw)
        self.buffers.append(b)
        self.buf_of[id(t)] = b.id
        return b.id

    def buf(self, t: Tensor) -> int:
        if id(t) not in self.buf_of:
            if not t.node.op.has(Trait.CONST):
                raise KeyError(f"no buffer for {t!r}")
            self.new_buffer(t, "const", "const", value=t.node.attrs["value"])
        return self.buf_of[id(t)]

    def status_word(self) -> int:
        """The int32 status word's buffer (created at first use)."""
        if self.status is None:
            b = Buffer(len(self.buffers), self.names("gc_status"), "int32", (1,), "status")
            self.buffers.append(b)
            self.status = b.id
        return self.status

    def status_arg(self, node) -> tuple[tuple[str, str], int]:
        """The status word's kernel parameter and this node's error code for an integer index out of
        range (the host raises after the call)."""
        code = self.status_codes.add(node, f"{node.op.name}: index out of range at run time (indices must lie "
                                           f"in [-n, n))")
        return (self.buffers[self.status_word()].name, "int32"), code

    def arg(self, t: Tensor) -> tuple[str, str]:
        return self.buffers[self.buf(t)].name, t.dtype

    def out_arg(self, t: Tensor, hint: str) -> tuple[str, str]:
        b = self.new_buffer(t, hint=hint)
        return self.buffers[b].name, t.dtype

    # ---- driver --------------------------------------------------------------------------------
    def run(self) -> tuple[str, Plan]:
        for i, t in enumerate(self.g.inputs):
            self.new_buffer(t, "input", index=i)
        for i, p in enumerate(self.g.parameters):
            self.new_buffer(p, "param", index=i)
        for node in self.g.nodes:
            self.lower_node(node)
        outs = [(self.buf(t), t.shape) for t in self.g.outputs]
        upds = [(self.buf(u), u.shape) for _, u in self.g.updates]
        params = self.g.parameters
        upd_params = [next(i for i, q in enumerate(params) if q is p) for p, _ in self.g.updates]
        plan = Plan(self.buffers, self.steps, outs, upds, self.dt, self.kinds, upd_params, self.status,
                    self.status_codes)
        return self.source(), plan

    def source(self) -> str:
        head = (f"// graphc: CUDA C for graph '{self.g.name}' ({len(self.kernels)} kernels)\n"
                "// one self-contained translation unit: nvcc -ptx / NVRTC compile it as it is\n")
        return head + PRELUDE + "\n" + self.dt.struct_source() + "\n" + "\n".join(self.kernels)

    def is_pointwise(self, node: Node) -> bool:
        """True when the node is one scalar C expression per element (it may join a pointwise kernel)."""
        return node.op in self.C_CODE

    def lower_node(self, node: Node) -> None:
        if node.op.has(Trait.LEAF) or id(node.outputs[0]) in self.buf_of:
            return
        self._table.get(node.op, type(self).host)(self, node)

    def lower_pointwise(self, node: Node) -> None:
        out = node.outputs[0]
        self.pointwise(node, [node], out.shape, node.inputs, [out])

    def alias(self, node: Node) -> None:
        """reshape: a contiguous tensor's reshape is the same memory."""
        self.buf_of[id(node.outputs[0])] = self.buf(node.inputs[0])

    def host(self, node: Node) -> None:
        ins = [self.buf(t) for t in node.inputs]
        outs = [self.new_buffer(t, hint=node.op.name) for t in node.outputs]
        self.steps.append(HostOp(node, ins, outs))

    def add_kernel(self, node, kind: str, src_fn, args, outs, grid, block, sync, note="") -> None:
        kname = f"k{len(self.kernels)}_{getattr(node.op, 'display_name', lambda n: n.op.name)(node)}"
        kname = re.sub(r"\W+", "_", kname).strip("_")[:60]
        self.kernels.append(src_fn(kname))
        self.kinds[kname] = kind
        self.steps.append(Launch(kname, kind, args, outs, grid, block, sync, note))

    # ---- pointwise (single elementwise ops and fused groups) ---------------------------------
    def pointwise(self, node, nodes, loop_shape, ext_tensors, out_tensors) -> None:
        loop_c = self.dt.shape(loop_shape)
        ext, args = self._externals(ext_tensors, loop_c)
        outs = [self.out_arg(t, node.op.name) for t in out_tensors]
        element = self._element(nodes, ext, out_tensors, loop_c)
        comment = f"{getattr(node.op, 'display_name', lambda n: n.op.name)(node)} -> " + \
                  ", ".join(f"{t.dtype}{list(t.shape)}" for t in out_tensors)
        n = loop_shape
        self.add_kernel(node, "fused" if node.op is Fused else "elementwise",
                        lambda k: K.pointwise(k, comment, loop_c, [(a, d) for a, d, _, _ in ext], outs, element,
                                              _vectorisable(ext, outs, loop_c)),
                        args + [self.buf(t) for t in out_tensors],
                        [self.buf(t) for t in out_tensors],
                        K.grid_1d(lambda dims: _size(n, dims)), (K.THREADS, 1, 1), False)

    def _externals(self, tensors, loop_c):
        """Kernel inputs for the non-scalar-constant tensors, read through broadcast views."""
        ext, args, seen = [], [], {}
        for t in tensors:
            if _scalar_const(t) is not None or id(t) in seen:
                continue
            name, dt = self.arg(t)
            pname = name if name not in [e[0] for e in ext] else self.names(name)
            seen[id(t)] = pname
            ext.append((pname, dt, id(t), broadcast_view(self.dt.shape(t.shape), loop_c)))
            args.append(self.buf(t))
        return ext, args

    def _element(self, nodes, ext, out_tensors, loop_c, alias=None, preset=None):
        """element(coords, linear, indent): load the externals, compute the nodes, return outputs."""
        alias = alias or ()

        def element(coords, lin, indent, lane=None):
            lines, vals = [], dict(preset or {})
            for k, (pname, dt, tid, view) in enumerate(ext):
                idx = lin if lin and view.is_linear(loop_c) else view.index(coords)
                src = f"{pname}[{idx}]"
                if lane:  # vector loop: a lane of the float4 load, or a broadcast scalar
                    src = f"{pname}_4.{lane}" if view.is_linear(loop_c) else f"{pname}[0]"
                lines.append(f"{indent}const {C_TYPES[dt]} a{k} = {src};")
                vals[tid] = (f"a{k}", dt)
            for src, dst in alias:
                if src in vals:
                    vals[dst] = vals[src]
            for k, nd in enumerate(nodes):
                expr = self.node_expr(nd, vals)
                out = nd.outputs[0]
                if expr in [v for v, _ in vals.values()]:
                    vals[id(out)] = (expr, out.dtype)
                    continue
                lines.append(f"{indent}const {C_TYPES[out.dtype]} v{k} = {expr};  // {nd.op.name}")
                vals[id(out)] = (f"v{k}", out.dtype)
            return lines, [self._value(t, vals, t.dtype) for t in out_tensors]
        return element

    def _value(self, t, vals, want: str | None) -> str:
        if id(t) in vals:
            v, dt = vals[id(t)]
        else:
            c = _scalar_const(t)
            if c is None:
                raise KeyError(f"value of {t!r} not available in the kernel")
            v, dt = c_literal(c, t.dtype), t.dtype
        if want is None or want == dt:
            return v
        return f"({v} != 0)" if want == "bool" else f"(({C_TYPES[want]}){v})"

    def node_expr(self, nd: Node, vals) -> str:
        """The C expression of one pointwise node over already-computed values."""
        op, out = nd.op, nd.outputs[0]
        spell = self.C_CODE[op]
        if callable(spell):
            return spell(self, nd, vals)
        ins = nd.inputs
        if op is E.Where:
            want = [None, out.dtype, out.dtype]
        elif getattr(op, "dtype_rule", "same") == "bool":
            want = [_dt.promote(*[t.dtype for t in ins])] * len(ins)
        else:
            want = [out.dtype] * len(ins)
        args = [self._value(t, vals, w) for t, w in zip(ins, want)]
        if want[-1] not in ("float32", "float64"):
            spell = self.C_INT_CODE.get(op, spell)
        attrs = {k: (repr(float(v)) if isinstance(v, float) else v) for k, v in nd.attrs.items()}
        return f"({C_TYPES[out.dtype]})({spell.format(*args, **attrs)})"

    def lower_fused(self, node: Node) -> None:
        body: Graph = node.attrs["body"]
        comp = body.compute_nodes()
        outs = body.outputs
        alias = [(id(t), id(p)) for p, t in zip(body.inputs, node.inputs)]  # outer tensor -> placeholder
        if comp and all(self.is_pointwise(n) for n in comp) and all(o.shape == outs[0].shape for o in outs) \
                and not any(o.node.op.has(Trait.LEAF) for o in outs):
            self._fused_pointwise(node, body, comp, alias)
            return
        if comp and comp[0].op is MatMul and self._fused_matmul(node, body, comp, alias):
            return
        last = comp[-1] if comp else None
        if last is not None and last.op in self.REDUCERS and len(outs) == 1 \
                and outs[0] is last.outputs[0] and all(self.is_pointwise(n) for n in comp[:-1]):
            self._fused_reduce(node, body, comp, alias)
            return
        for p, t in zip(body.inputs, node.inputs):  # run the body op by op
            self.buf_of[id(p)] = self.buf(t)
        for bn in body.nodes:
            self.lower_node(bn)
        for o, t in zip(outs, node.outputs):
            self.buf_of[id(t)] = self.buf(o)

    def _body_externals(self, node, body, comp, alias, loop_c):
        tensors = list(node.inputs) + [t for n in comp for t in n.inputs
                                       if t.node.op.has(Trait.CONST) and _scalar_const(t) is None]
        ext, args = self._externals(tensors, loop_c)
        # body placeholders read the node's inputs with views over the body's own placeholder shapes
        return ext, args

    def _fused_pointwise(self, node, body, comp, alias) -> None:
        loop_shape = body.outputs[0].shape
        loop_c = self.dt.shape(loop_shape)
        ext, args = self._body_externals(node, body, comp, alias, loop_c)
        element = self._element(comp, ext, body.outputs, loop_c, alias)
        outs = [self.out_arg(t, "fused") for t in node.outputs]
        comment = f"{node.op.display_name(node)} -> {node.outputs[0].dtype}{list(loop_shape)}"
        self.add_kernel(node, "fused",
                        lambda k: K.pointwise(k, comment, loop_c, [(a, d) for a, d, _, _ in ext], outs, element,
                                              _vectorisable(ext, outs, loop_c)),
                        args + [self.buf(t) for t in node.outputs], [self.buf(t) for t in node.outputs],
                        K.grid_1d(lambda dims: _size(loop_shape, dims)), (K.THREADS, 1, 1), False)

    def _fused_reduce(self, node, body, comp, alias) -> None:
        red = comp[-1]
        self.reduce(node, red.op, red.inputs[0], (body, comp[:-1], alias), out_tensor=node.outputs[0],
                    axes=red.attrs["axis"])

    # ---- reductions, softmax, matmul ------------------------------------------------------------
    def lower_reduce(self, node) -> None:
        self.reduce(node, node.op, node.inputs[0], None)

    def reduce(self, node, op, x: Tensor, prologue, out_tensor=None, axes=None) -> None:
        """Reduction `op` of `x` (through a fused elementwise prologue when given) into out_tensor."""
        reducer = self.REDUCERS[op]
        out_t = out_tensor if out_tensor is not None else node.outputs[0]
        if axes is None:
            axes = node.attrs["axis"]
        if isinstance(reducer, K.ArgReduce):  # one axis (or all): the index into the flattened axes
            axes = tuple(range(x.ndim)) if axes is None else (axes,)
        shape_c = self.dt.shape(x.shape)
        if prologue is None:
            ext, args = self._externals([x], shape_c)
            element = self._element([], ext, [x], shape_c)
        else:
            body, pre, alias = prologue
            ext, args = self._body_externals(node, body, pre, alias, shape_c)
            element = self._element(pre, ext, [x], shape_c, alias)
        acc = x.dtype if isinstance(reducer, K.ArgReduce) else out_t.dtype
        acc = "int32" if acc == "bool" else acc
        out = self.out_arg(out_t, op.name)
        n_red = cprod([shape_c[a] for a in axes])
        threads = K.reduce_threads(n_red)
        kept = [x.shape[a] for a in range(x.ndim) if a not in axes]
        comment = f"{op.name} over axes {tuple(axes)} of {x.dtype}{list(x.shape)} -> {out_t.dtype}{list(out_t.shape)}"
        self.add_kernel(node, "reduce",
                        lambda k: K.reduce_kernel(k, comment, reducer, shape_c, tuple(axes), acc,
                                                  [(a, d) for a, d, _, _ in ext], out,
                                                  lambda c, ind: _first(element(c, None, ind)), threads),
                        args + [self.buf(out_t)], [self.buf(out_t)],
                        lambda dims: (min(65535, _size(kept, dims)), 1, 1), (threads, 1, 1), True)

    def softmax(self, node, log: bool = False) -> None:
        """softmax / log_softmax (log=True) along attrs["axis"]."""
        x, y = node.inputs[0], node.outputs[0]
        axis = node.attrs["axis"]
        shape_c = self.dt.shape(x.shape)
        xa = self.arg(x)
        out = self.out_arg(y, node.op.name)
        threads = K.reduce_threads(shape_c[axis])
        kept = [d for a, d in enumerate(x.shape) if a != axis]
        self.add_kernel(node, "softmax",
                        lambda k: K.softmax_kernel(k, f"{node.op.name} along axis {axis} of {x.dtype}{list(x.shape)}",
                                                   log, shape_c, axis, xa, out, threads),
                        [self.buf(x), self.buf(y)], [self.buf(y)],
                        lambda dims: (min(65535, _size(kept, dims)), 1, 1), (threads, 1, 1), True)

    def log_softmax(self, node) -> None:
        self.softmax(node, log=True)

    def matmul(self, node, a=None, b=None, tail=None) -> None:
        """A GEMM; `tail` = (body nodes, externals, matmul tensor, body outputs, node outputs) fuses an
        elementwise epilogue (bias, activation) into the store."""
        a, b = (a, b) if a is not None else node.inputs
        y = node.outputs[0] if tail is None else tail[2]
        batch = y.shape[:-2]
        batch_c = self.dt.shape(batch)
        sa = broadcast_view(self.dt.shape(a.shape[:-2]), batch_c).strides
        sb = broadcast_view(self.dt.shape(b.shape[:-2]), batch_c).strides
        n, k, m = self.dt.dim(a.shape[-2]), self.dt.dim(a.shape[-1]), self.dt.dim(b.shape[-1])
        aa, ba = self.arg(a), self.arg(b)
        if ba[0] == aa[0]:  # x @ x: one buffer, two kernel parameters
            ba = (self.names(ba[0]), ba[1])
        outs_t = node.outputs if tail is not None else [y]
        outs = [self.out_arg(t, node.op.name) for t in outs_t]
        t = K.TILE
        extra, extra_bufs, epilogue = [], [], None
        if tail is not None:
            nodes, ext, mm_out, body_outs = tail[0], tail[1], tail[2], tail[3]
            ext = [(self.names(p) if p in (aa[0], ba[0]) else p, d, tid, v) for p, d, tid, v in ext]
            extra = [(p, d) for p, d, _, _ in ext]
            extra_bufs = tail[4]
            element = self._element(nodes, ext, body_outs, self.dt.shape(y.shape), tail[5],
                                    preset={id(mm_out): ("acc", mm_out.dtype)})

            def epilogue(bcoords, ind):
                lines, vals = element(bcoords + ["row", "col"], "i", ind)
                return [f"{ind}const long long i = bz * M * N + row * N + col;", *lines,
                        *[f"{ind}{o[0]}[i] = {v};" for o, v in zip(outs, vals)]]

        def grid(dims):
            nn, mm = eval_dim(y.shape[-2], dims), eval_dim(y.shape[-1], dims)
            return ((mm + t - 1) // t, (nn + t - 1) // t, min(65535, _size(batch, dims)))
        comment = f"matmul {a.type_str} @ {b.type_str} -> {y.type_str} (16x16 shared-memory tiles)"
        if tail is not None:
            comment += f", epilogue {node.op.display_name(node)}"
        self.add_kernel(node, "matmul",
                        lambda kn: K.matmul_kernel(kn, comment, aa, ba, outs, n, k, m, batch_c, sa, sb, extra, epilogue),
                        [self.buf(a), self.buf(b), *extra_bufs, *[self.buf(o) for o in outs_t]],
                        [self.buf(o) for o in outs_t], grid, (t, t, 1), True)

    def _fused_matmul(self, node, body, comp, alias) -> bool:
        """fused[matmul, elementwise...]: one GEMM whose store applies the elementwise tail."""
        mm, rest = comp[0], comp[1:]
        y = mm.outputs[0]
        if not all(self.is_pointwise(n) for n in rest) or not all(o.shape == y.shape for o in body.outputs):
            return False
        outer = {id(p): t for p, t in zip(body.inputs, node.inputs)}

        def resolve(t):
            return outer.get(id(t), t)
        inside = {id(o) for n in comp for o in n.outputs}
        used = [t for n in rest for t in n.inputs if id(t) not in inside]
        ext_t = [resolve(t) for t in used if _scalar_const(t) is None]
        ext, args = self._externals(ext_t, self.dt.shape(y.shape))
        self.matmul(node, resolve(mm.inputs[0]), resolve(mm.inputs[1]), (rest, ext, y, body.outputs, args, alias))
        return True

    # ---- index mapping ----------------------------------------------------------------------------
    def transpose(self, node) -> None:
        xs = contiguous_strides(self.dt.shape(node.inputs[0].shape))
        self.copy_view(node, View(0, [xs[a] for a in node.attrs["axes"]]))

    def getitem(self, node) -> None:
        x = node.inputs[0]
        xs = contiguous_strides(self.dt.shape(x.shape))
        self.copy_view(node, self.getitem_view(x.shape, xs, node.attrs["index"]))

    def getitem_view(self, xshape, xs, index) -> View:
        offset, strides, ax = 0, [], 0
        for it in index:
            if it is None:
                strides.append(0)
                continue
            d = xshape[ax]
            if isinstance(it, slice):
                start = it.indices(d)[0] if isinstance(d, int) else self.dt.computed(
                    ("start", d, it.start, it.step), lambda dims, d=d, s=it: s.indices(eval_dim(d, dims))[0],
                    f"start of {it} on {d}")
                offset = cadd(offset, cmul(start, xs[ax]))
                strides.append(cmul(it.step or 1, xs[ax]))
            else:
                i = it if it >= 0 or not isinstance(d, int) else d + it
                if i < 0:
                    i = self.dt.computed(("idx", d, it), lambda dims, d=d, it=it: eval_dim(d, dims) + it, f"{d}{it}")
                offset = cadd(offset, cmul(i, xs[ax]))
            ax += 1
        return View(offset, strides + xs[ax:])

    def copy_view(self, node, view: View) -> None:
        """y[coords] = x[view(coords)] (a strided read of the input)."""
        x, y = node.inputs[0], node.outputs[0]
        loop_c = self.dt.shape(y.shape)
        xa = self.arg(x)
        out = self.out_arg(y, node.op.name)

        def element(coords, lin, indent):
            return [], [f"{xa[0]}[{view.index(coords)}]"]
        self._launch_pointwise(node, "copy", f"{node.op.name} {x.type_str} -> {y.type_str}", loop_c, [xa],
                               [self.buf(x)], out, y, element)

    def _launch_pointwise(self, node, kind, comment, loop_c, ins, in_bufs, out, y, element) -> None:
        self.add_kernel(node, kind, lambda k: K.pointwise(k, comment, loop_c, ins, [out], element),
                        in_bufs + [self.buf(y)], [self.buf(y)],
                        K.grid_1d(lambda dims: _size(y.shape, dims)), (K.THREADS, 1, 1), False)

    def concatenate(self, node) -> None:
        y, axis = node.outputs[0], node.attrs["axis"]
        loop_c = self.dt.shape(y.shape)
        ins = [self.arg(t) for t in node.inputs]
        pnames = [n if n not in [q for q, _ in ins[:k]] else self.names(n) for k, (n, _) in enumerate(ins)]
        ins = [(p, d) for p, (_, d) in zip(pnames, ins)]
        shapes = [self.dt.shape(t.shape) for t in node.inputs]
        out = self.out_arg(y, "concatenate")
        ct = C_TYPES[y.dtype]

        def element(coords, lin, indent):
            lines, start, ca = [f"{indent}{ct} v;"], 0, coords[axis]
            for k, ((name, _), sc) in enumerate(zip(ins, shapes)):
                end = cadd(start, sc[axis])
                local = list(coords)
                local[axis] = ca if start == 0 else f"({ca} - {start})"
                idx = View(0, contiguous_strides(sc)).index(local)
                cond = f"if ({ca} < {end}) " if k < len(ins) - 1 else ""
                lines.append(f"{indent}{'else ' if k else ''}{cond}v = ({ct}){name}[{idx}];")
                start = end
            return lines, ["v"]
        self._launch_pointwise(node, "copy", f"concatenate along axis {axis} -> {y.type_str}", loop_c, ins,
                               [self.buf(t) for t in node.inputs], out, y, element)

    def _take_target(self, xshape, idx_shape, axis, idx_name, status):
        """(lines, x offset) for take-shaped coordinates: x[pre, idx[mid], post]; an index outside
        [-d, d) sets the status word (the host raises) instead of reading anything."""
        xs = contiguous_strides(self.dt.shape(xshape))
        isc = self.dt.shape(idx_shape)
        d = self.dt.dim(xshape[axis])

        def target(coords, indent):
            pre, mid, post = coords[:axis], coords[axis:axis + len(isc)], coords[axis + len(isc):]
            ioff = View(0, contiguous_strides(isc)).index(mid)
            (sname, _), code = status
            lines = [f"{indent}long long q = (long long){idx_name}[{ioff}];",
                     f"{indent}if (q < -{d} || q >= {d}) {{ {sname}[0] = {code}; continue; }}  // out of range",
                     f"{indent}if (q < 0) q += {d};  // negative indices count from the end"]
            off = View(0, xs[:axis]).index(pre)
            off = cadd(off, cmul("q", xs[axis]))
            off = cadd(off, View(0, xs[axis + 1:]).index(post))
            return lines, str(off)
        return target

    def take(self, node) -> None:
        x, idx = node.inputs
        y = node.outputs[0]
        xa, ia = self.arg(x), self.arg(idx)
        if ia[0] == xa[0]:
            ia = (self.names(ia[0]), ia[1])
        out = self.out_arg(y, "take")
        status = self.status_arg(node)
        target = self._take_target(x.shape, idx.shape, node.attrs["axis"], ia[0], status)

        def element(coords, lin, indent):
            lines, off = target(coords, indent)
            return lines, [f"{xa[0]}[{off}]"]
        comment = f"take along axis {node.attrs['axis']} -> {y.type_str}"
        self.add_kernel(node, "take", lambda k: K.pointwise(k, comment, self.dt.shape(y.shape), [xa, ia],
                                                            [out, status[0]], element),
                        [self.buf(x), self.buf(idx), self.buf(y), self.status], [self.buf(y), self.status],
                        K.grid_1d(lambda dims: _size(y.shape, dims)), (K.THREADS, 1, 1), False)

    def take_grad(self, node) -> None:
        """Scatter-add of the gradient into zeros at the taken positions (checked like take)."""
        x, idx = node.inputs[1], node.inputs[2]
        ia = self.arg(idx)
        status = self.status_arg(node)
        target = self._take_target(x.shape, idx.shape, node.attrs["axis"], ia[0], status)
        self.scatter(node, target, [ia], [self.buf(idx)], True, [status[0]], [self.status])

    def index_grad(self, node) -> None:
        """The gradient written into zeros through getitem's view (positions are distinct)."""
        x = node.inputs[1]
        view = self.getitem_view(x.shape, contiguous_strides(self.dt.shape(x.shape)), node.attrs["index"])
        self.scatter(node, lambda c, ind: ([], view.index(c)), [], [], False, [], [])

    def scatter(self, node, target, ins, in_bufs, accumulate, extra, extra_bufs) -> None:
        g, y = node.inputs[0], node.outputs[0]
        ga = self.arg(g)
        out = self.out_arg(y, node.op.name)
        loop_c = self.dt.shape(g.shape)
        self.steps.append(Fill(self.buf(y), [self.buf(y)]))
        comment = f"{node.op.name}: scatter {g.type_str} into zeros {y.type_str}"
        self.add_kernel(node, "scatter",
                        lambda k: K.scatter_kernel(k, comment, loop_c, [ga, *ins], out, target, accumulate, extra),
                        [self.buf(g), *in_bufs, self.buf(y), *extra_bufs], [self.buf(y), *extra_bufs],
                        K.grid_1d(lambda dims: _size(g.shape, dims)), (K.THREADS, 1, 1), False)


@functools.lru_cache(maxsize=None)
def _c_functions(cls) -> frozenset:
    """Identifiers called in the C spellings of `cls` (exp, tanh, ...): never used as buffer names."""
    spells = [v for tab in (cls.C_CODE, cls.C_INT_CODE) for v in tab.values() if isinstance(v, str)]
    return frozenset(re.findall(r"([A-Za-z_]\w*)\s*\(", " ".join(spells)))


def _vectorisable(ext, outs, loop_c) -> list:
    """Names of the inputs a float4 loop loads: all buffers float32, each read at the loop's own
    linear index or a broadcast scalar (offset 0, all strides 0); [] when that does not hold."""
    lin = [p for p, _, _, v in ext if v.is_linear(loop_c)]
    ok = lin and all(d == "float32" and (v.is_linear(loop_c) or (v.offset == 0 and not any(v.strides)))
                     for _, d, _, v in ext) and all(d == "float32" for _, d in outs)
    return lin if ok else []


def _scalar_const(t: Tensor):
    if t.node.op.has(Trait.CONST) and t.node.attrs["value"].ndim == 0:
        return t.node.attrs["value"]
    return None


def _size(shape, dims) -> int:
    n = 1
    for d in shape:
        n *= eval_dim(d, dims)
    return n


def _first(res):
    lines, vals = res
    return lines, vals[0]


Lowering.LOWERINGS = {
    Reshape: Lowering.alias,
    Fused: Lowering.lower_fused,
    Transpose: Lowering.transpose, GetItem: Lowering.getitem,
    Softmax: Lowering.softmax, LogSoftmax: Lowering.log_softmax,
    MatMul: Lowering.matmul,
    Concatenate: Lowering.concatenate, Take: Lowering.take,
    TakeGrad: Lowering.take_grad, IndexGrad: Lowering.index_grad,
    **lower_nn.LOWERINGS,      # conv2d and its gradients, max pooling and its gradients
    **lower_scan.LOWERINGS,    # scan: a host loop over the body's launch plan
    **lower_random.LOWERINGS,  # random draws (random_uniform, random_normal)
}


def lower(graph: Graph, lowering: type = Lowering) -> tuple[str, Plan]:
    """The CUDA translation unit and launch plan for `graph` (`lowering`: the backend's table)."""
    return lowering(graph).run()
