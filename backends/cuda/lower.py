"""cuda's renderer of the shared native schedule: an (optimised) graph -> one CUDA C translation unit plus
a symbolic `Schedule` (graphc.backends.schedule.plan) whose kernel steps are `Launch`es.

The schedule is symbolic (`dims=None`): compiled once for every binding of the graph's dims, every
size, stride and offset an expression over them; a kernel reads them from the `GcDims gd` struct the
host fills per call (cexpr.DimTable). The shared walk plans every node by its row in one op-keyed
table (`CudaSchedule.rows()`); views (reshape, transpose, broadcast_to, getitem, stop_gradient),
constants, concatenate, scan loops and unfusable fused bodies are the shared rows; cuda's rows:
- `C_CODE`: op -> scalar C spelling (tinygrad's `code_for_op`), a template over the operands
  `{0}, {1}, ...` and the node's attrs (`{alpha}`), or a function (schedule, node, values) -> C
  expression. Every op spelled here lowers as a pointwise kernel, alone or inside a fused group;
  `C_INT_CODE` overrides spellings for integers.
- `REDUCERS`: reduction op -> how the reduction kernel combines (kernels.Monoid / ArgReduce / ...).
- `ROWS`: every other op -> `fn(schedule, node, ins)` (this file, lower_nn.py, lower_random.py),
  registered with `@lowers(op)` like llvm's.
A backend that lowers differently subclasses `CudaSchedule` and overrides entries (cuda_emulated).
An op outside the table runs its NumPy impl on the host, listed in Program.info["fallback_ops"].
Kernels read their inputs through the schedule's strided views (offset + coordinate . strides) and
write fresh contiguous buffers (a copy kernel writes any view)."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import sympy

from graphc import dtypes as _dt
from graphc.backends.schedule.plan import ROWS as SHARED, NotLowerable, Schedule, registrar
from graphc.backends.schedule.steps import HostStep, LoopStep
from graphc.backends.schedule.views import View, broadcast_strides, contig_strides, is_int, product
from graphc.ir import Graph, Node, Tensor, Trait
from graphc.names import Names
from graphc.ops import elementwise as E
from graphc.ops.core import Cast, StopGradient
from graphc.ops.fused import Fused
from graphc.ops.linalg import MatMul
from graphc.ops.reduce import ArgMax, ArgMin, LogSoftmax, LogSumExp, Max, Min, Prod, Softmax, Sum
from graphc.ops.shape_ops import BroadcastTo, IndexGrad, SizeOf, Take, TakeGrad
from . import kernels as K
from .cexpr import DimTable, broadcast_view, c_literal, cadd, cmul, contiguous_strides, cprod
from .cexpr import View as CView
from .prelude import C_TYPES, HALF_PRELUDE, PRELUDE, VALUE_TYPES, convert, rounded, store, uses_half
from .prelude import load as c_load

__all__ = ["CudaSchedule", "Launch", "lower", "lowers", "ROWS", "C_CODE", "C_INT_CODE", "REDUCERS"]


def _same_value(s, nd, vals) -> str:
    """cast, stop_gradient, broadcast_to: the operand converted to the output dtype (the kernel's
    broadcast view already reads the right element)."""
    return s._value(nd.inputs[0], vals, nd.outputs[0].dtype)


def _size_of(s, nd, vals) -> str:
    n = product(s.dim_values([nd.inputs[0].shape[a] for a in nd.attrs["axes"]]))
    return f"(({VALUE_TYPES[nd.outputs[0].dtype]}){s.c(n)})"


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
#: spellings used when the operands are integers (the C math functions take floating point; products
#: wrap at the type's width: unsigned short * unsigned short would overflow C's int)
C_INT_CODE = {E.floor.op: "{0}", E.pow.op: "gc_ipow({0}, {1})", E.mul.op: "gc_imul({0}, {1})"}


def _mod_spellings() -> tuple[dict, dict]:
    """np.remainder / np.fmod / np.floor_divide (float and integer spellings, NumPy's definitions: the
    float ones as npy_remainder / npy_floor_divide compute them; an integer x % 0, x // 0, x % -1 is 0,
    x // -1 is -x wrapping) and the shifts (0, or -1 for a negative signed value, past the bit width)."""
    m, b = "fmod({0}, {1})", "({1})"
    wrong = f"(({b} < 0) != ({m} < 0))"
    fmod_floored = f"({b} == 0 ? {m} : ({m} != 0 ? ({wrong} ? {m} + {b} : {m}) : ({b} < 0 ? -0.0 : 0.0)))"
    div = f"(({{0}} - {m}) / {b} - (({m} != 0 && {wrong}) ? 1 : 0))"
    snapped = f"(floor({div}) + (({div} - floor({div})) > 0.5 ? 1 : 0))"
    ffloordiv = f"({b} == 0 ? {{0}} / {b} : ({div} != 0 ? {snapped} : (signbit({{0}} / {b}) ? -0.0 : 0.0)))"
    bad = f"({b} == 0 || ({b} < 0 && {b} == -1))"      # never evaluate x % 0 or MIN % -1 (x86 traps)
    rem = f"(({{0}}) % {b})"
    ifix = f"({rem} != 0 && (({rem} < 0) != ({b} < 0)))"
    imod = f"({bad} ? 0 : ({ifix} ? {rem} + {b} : {rem}))"
    ifloordiv = (f"({b} == 0 ? 0ULL : ({b} < 0 && {b} == -1) ? 0ULL - (unsigned long long)({{0}}) : "
                 f"(unsigned long long)(({{0}}) / {b} - ({ifix} ? 1 : 0)))")
    width = "(8 * sizeof({0}))"
    floats = {E.mod.op: fmod_floored, E.fmod.op: m, E.floor_divide.op: ffloordiv}
    ints = {E.mod.op: imod, E.fmod.op: f"({bad} ? 0 : {rem})", E.floor_divide.op: ifloordiv,
            E.left_shift.op: f"((unsigned long long)({{1}}) < {width} ? (unsigned long long)({{0}}) << ({{1}}) : 0ULL)",
            E.right_shift.op: f"((unsigned long long)({{1}}) < {width} ? ({{0}}) >> ({{1}}) : (({{0}}) < 0 ? -1 : 0))"}
    return floats, ints


def _bitwise_not(s, nd, vals) -> str:
    t = nd.outputs[0].dtype
    x = s._value(nd.inputs[0], vals, t)
    return f"(!{x})" if t == "bool" else f"(({C_TYPES[t]})~{x})"


C_CODE.update({
    **{f.op: f"{f.__name__}({{0}})" for f in (E.tan, E.asin, E.acos, E.sinh, E.cosh, E.asinh, E.acosh, E.atanh,
                                              E.ceil, E.trunc)},
    E.round.op: "rint({0})", **_mod_spellings()[0], **{op: s for op, s in _mod_spellings()[1].items()
                                                       if op in (E.left_shift.op, E.right_shift.op)},
    E.bitwise_and.op: "({0} & {1})", E.bitwise_or.op: "({0} | {1})", E.bitwise_xor.op: "({0} ^ {1})",
    E.bitwise_not.op: _bitwise_not})
C_INT_CODE.update({E.ceil.op: "{0}", E.trunc.op: "{0}", E.round.op: "{0}", **_mod_spellings()[1]})
#: reduction op -> the reduction kernel's combine (kernels.py)
REDUCERS = {
    Sum: K.Monoid("GcSum()", "0", "0"), Prod: K.Monoid("GcProd()", "1", "1"),
    Max: K.Monoid("GcMax()", "-GC_INF", "gc_lowest<{t}>()"), Min: K.Monoid("GcMin()", "GC_INF", "gc_highest<{t}>()"),
    LogSumExp: K.LOG_SUM_EXP, ArgMax: K.ArgReduce(True), ArgMin: K.ArgReduce(False),
}
#: comparisons spelled `({0} op {1})`: a signed integer against uint64 (NumPy promotes the pair to float64)
#: is compared exactly instead, the spelling applied to (three-way comparison, 0)
EXACT_COMPARE = frozenset({E.less.op, E.less_equal.op, E.greater.op, E.greater_equal.op, E.equal.op,
                           E.not_equal.op})
#: dtypes a scatter can accumulate with atomicAdd (float16/bfloat16 go through a float32 buffer)
ATOMIC_DTYPES = frozenset({"float32", "float64", "int32", "uint32", "int64", "uint64"})
# names the kernel templates use for locals, and C/C++ keywords: a buffer never takes one
_RESERVED = re.compile(r"^(i|j|k|n|m|o|s|q|g|c|p|pp|cc|th|tw|kh|kw|oh|ow|ih|iw|bh|bw|xv|inside|n_|M|N|K|"
                       r"t0|tx|ty|bz|row|col|acc|best|bi|x_|gd|A|B|As|Bs|n_out|n_red|nbatch|n4|i4|"
                       r"part|pv|pi|v|[abcevr]\d+|r_.*|int|float|double|bool|long|char|short|unsigned|signed|"
                       r"void|const|return|if|else|for|while|do|break|continue|switch|case|default|goto|"
                       r"struct|class|union|enum|auto|static|extern|register|volatile|inline|new|delete|this|"
                       r"true|false|template|typename|namespace|using|operator|sizeof|exp|log|max|min|abs)$")

#: cuda's own rows: op -> fn(schedule, node, ins) (the shared rows and the C_CODE / REDUCERS rows are
#: added by CudaSchedule.rows())
ROWS: dict = {}
lowers = registrar(ROWS)


@dataclass
class Launch:
    """cuda's kernel step: `kernel<<<grid(ev), block>>>(buffers args..., GcDims)`. `args` are buffer ids
    in parameter order, `dtypes` their element types, `writes` the ones it writes; `grid(ev)` gives the
    grid for a binding (`ev` evaluates a size expression); a 0 in it skips the launch (empty tensors)."""
    kernel: str
    kind: str      # elementwise | fused | reduce | softmax | matmul | copy | fill | take | scatter | conv | pool | random
    args: list
    dtypes: list
    writes: set
    grid: Callable
    block: tuple
    sync: bool     # uses __syncthreads / warp shuffles (the emulation needs fibers)
    node: object = None

    @property
    def bufs(self) -> list:
        return sorted(set(self.args))

    def describe(self) -> str:
        return f"launch {self.kernel}<<<grid, {self.block}>>>({', '.join(map(str, self.args))})  [{self.kind}]"


class Params:
    """The buffer parameters of one kernel being written: one per buffer (several views of a buffer
    share it), in order of first use; the status word and outputs are writable."""

    def __init__(self, s: "CudaSchedule"):
        self.s, self.order, self.written = s, {}, set()

    def __call__(self, v: View, write: bool = False) -> str:
        if v.buf not in self.order:
            self.order[v.buf] = v.dtype
        if write:
            self.written.add(v.buf)
        return self.s.cname(v.buf)

    def ins(self) -> list:
        return [(self.s.cname(b), d) for b, d in self.order.items() if b not in self.written]

    def outs(self) -> list:
        return [(self.s.cname(b), d) for b, d in self.order.items() if b in self.written]

    def ids(self) -> tuple[list, list]:
        """Buffer ids and dtypes in parameter order (inputs, then outputs: the signature's order)."""
        ins = [(b, d) for b, d in self.order.items() if b not in self.written]
        outs = [(b, d) for b, d in self.order.items() if b in self.written]
        return [b for b, _ in ins + outs], [d for _, d in ins + outs]


class CudaSchedule(Schedule):
    """A symbolic Schedule whose kernel steps are CUDA launches; the tables are class attributes (a
    subclass copies and overrides them)."""
    C_CODE: dict = C_CODE
    C_INT_CODE: dict = C_INT_CODE
    REDUCERS: dict = REDUCERS
    ROWS: dict = ROWS
    backend = "cuda"

    @classmethod
    def rows(cls) -> dict:
        """The one registry: op -> fn(schedule, node, ins). The shared rows (views, constants,
        concatenate, fused bodies, scan), every op with a C spelling as a pointwise kernel (an op with
        a shared view row keeps it: a view needs no kernel), reductions, then cuda's own rows."""
        table = dict(SHARED)
        table.update({op: CudaSchedule._pointwise for op in cls.C_CODE if op not in SHARED})
        table.update({op: CudaSchedule._reduce for op in cls.REDUCERS})
        table.update(cls.ROWS)
        return table

    def __init__(self, graph: Graph):
        self.dt = DimTable()
        self.sources: list[str] = []
        self.kernels: dict[str, str] = {}   # kernel name -> kind
        c_functions = _c_functions(type(self))
        # buffer and kernel-parameter names: one scope for the translation unit
        self.names = Names(lambda n: bool(_RESERVED.match(n)) or n in c_functions, default="t", sep="")
        self._cname: dict[int, str] = {}
        self._hint: dict[int, str] = {}
        self.table = type(self).rows()
        super().__init__(graph, None)

    @property
    def dimtab(self) -> DimTable:
        return self.dt

    @property
    def fallback_ops(self) -> list[str]:
        return sorted(self.fallback)

    # ---- sizes and names ---------------------------------------------------------------------------
    def c(self, x):
        """A size (an int or an expression over the dims) as a folded C integer expression."""
        if is_int(x):
            return int(x)
        if x.is_Symbol:
            return self.dt.dim(x)
        if x.is_Mul and all(a.is_Integer or a.is_Symbol for a in x.args):
            return cprod([self.c(a) for a in x.args])
        if x.is_Add and all(a.is_Integer or a.is_Symbol or a.is_Mul for a in x.args):
            out = 0
            for a in x.args:
                out = cadd(out, self.c(a))
            return out
        return self.dt.computed(("expr", x), lambda dims, x=x: int(x.subs(_binding(dims))), str(x))

    def shape_c(self, shape) -> list:
        return [self.c(d) for d in shape]

    def fresh(self, t, shape=None, dtype=None) -> View:
        v = super().fresh(t, shape, dtype)
        node = self._node
        hint = (t.name if t is not None else None) or f"t_{node.op.name if node is not None else 'tmp'}"
        self._hint[v.buf] = hint
        return v

    def cname(self, b: int) -> str:
        """The C name of buffer b (a kernel parameter): the tensor's name where it has one."""
        name = self._cname.get(b)
        if name is None:
            buf = self.buffers[b]
            g = self.graph
            if buf.kind == "input":
                hint = g.inputs[buf.index].name
            elif buf.kind == "param":
                hint = g.parameters[buf.index].name
            elif buf.kind == "const":
                hint = "t_const"
            elif buf.kind == "slice":
                hint = self.cname(buf.index) + "_t"
            elif self.status is not None and b == self.status.buf:
                hint = "gc_status"
            else:
                hint = self._hint.get(b) or (g.roots[buf.index].name if buf.kind == "out" else None) or "t_tmp"
            name = self._cname[b] = self.names(hint or "t")
        return name

    def literal(self, value, dtype: str) -> str:
        if isinstance(value, sympy.Basic) and not value.is_Number:
            return f"(({VALUE_TYPES[dtype]}){self.c(value)})"
        return c_literal(value, dtype)

    def cview(self, v: View) -> CView:
        return CView(self.c(v.offset), [self.c(s) for s in v.strides])

    def dense(self, v: View, dtype: str | None = None) -> View:
        """v itself when it is a whole buffer in row-major order (what the GEMM, convolution, softmax,
        take and scatter templates index), else a contiguous copy."""
        if v.literal is None and v.contiguous and v.offset == 0 and (dtype is None or dtype == v.dtype):
            return v
        return self.materialise(v, dtype)

    # ---- kernels -----------------------------------------------------------------------------------
    def launch(self, kind: str, src_fn, params: Params, grid, block, sync: bool) -> None:
        """Add kernel `src_fn(name)` launched over `params`' buffers (a step of the schedule)."""
        step = self.kernel(kind, src_fn, params, grid, block, sync)
        views = [View(b, 0, (), (), d) for b, d in zip(step.args, step.dtypes)]
        self.add(step, [v for v in views if v.buf not in step.writes], [v for v in views if v.buf in step.writes])

    def kernel(self, kind: str, src_fn, params: Params, grid, block, sync: bool) -> Launch:
        """Write kernel `src_fn(name)` into the translation unit; its launch (not yet a step)."""
        node = self._node
        label = getattr(node.op, "display_name", lambda n: n.op.name)(node) if node is not None else kind
        kname = re.sub(r"\W+", "_", f"k{len(self.sources)}_{label}").strip("_")[:60]
        self.sources.append(src_fn(kname))
        self.kernels[kname] = kind
        args, dtypes = params.ids()
        return Launch(kname, kind, args, dtypes, set(params.written), grid, block, sync)

    def copy(self, dst: View, src: View) -> Launch:
        """dst = src (same shape; converted to dst's dtype): a pointwise kernel through both views (the
        schedule adds the launch)."""
        P = Params(self)
        loop = dst.shape
        load = self._loader(P, {0: src}, loop)
        out = P(dst, write=True)
        dv = self.cview(dst)

        def element(coords, lin, indent, lane=None):
            lines, vals = load(coords, lin, indent)
            return lines, [self._value(0, vals, dst.dtype)]
        loop_c = self.shape_c(loop)
        comment = f"copy {src.dtype}{_fmt(src.shape)} -> {dst.dtype}{_fmt(dst.shape)}"
        linear = dst.offset == 0 and tuple(dst.strides) == contig_strides(loop)
        return self.kernel("copy", lambda k: K.pointwise(k, comment, loop_c, P.ins(), [(out, dst.dtype)], element,
                                                         out_index=None if linear else [dv.index]),
                           P, K.grid_1d(lambda ev: ev(product(loop))), (K.THREADS, 1, 1), False)

    def fill(self, out: View) -> None:
        """out = 0 (before a scatter)."""
        P = Params(self)
        name = P(out, write=True)
        loop_c = self.shape_c(out.shape)

        def element(coords, lin, indent, lane=None):
            return [], ["0"]
        self.launch("fill", lambda k: K.pointwise(k, f"zero-fill {out.dtype}{_fmt(out.shape)}", loop_c, [],
                                                  [(name, out.dtype)], element),
                    P, K.grid_1d(lambda ev: ev(product(out.shape))), (K.THREADS, 1, 1), False)

    def _loader(self, P: Params, srcs: dict, loop_shape):
        """load(coords, lin, indent, lane) -> (lines, vals): each source (key -> View, broadcast into the
        loop shape) read at the loop coordinates; scalar literals are inlined."""
        loop_c = self.shape_c(loop_shape)
        reads, consts = [], {}
        for key, v in srcs.items():
            if v.literal is not None:
                consts[key] = (self.literal(v.literal, v.dtype), v.dtype)
                continue
            name = P(v)
            strides = broadcast_strides(v, loop_shape)
            linear = v.offset == 0 and tuple(strides) == contig_strides(loop_shape)
            cv = self.cview(View(v.buf, v.offset, tuple(loop_shape), strides, v.dtype))
            reads.append((key, name, v.dtype, cv, linear))

        def load(coords, lin, indent, lane=None):
            lines, vals = [], dict(consts)
            for k, (key, name, dt, cv, linear) in enumerate(reads):
                idx = lin if lin and linear else cv.index(coords)
                src = f"{name}[{idx}]"
                if lane:  # vector loop: a lane of the float4 load, or a broadcast scalar
                    src = f"{name}_4.{lane}" if linear else f"{name}[{cv.offset}]"
                lines.append(f"{indent}const {VALUE_TYPES[dt]} a{k} = {c_load(src, dt) if not lane else src};")
                vals[key] = (f"a{k}", dt)
            return lines, vals
        load.reads = reads
        return load

    def _element(self, P: Params, srcs: dict, nodes: list, results: list, loop_shape, preset=None):
        """element(coords, lin, indent, lane=None) -> (lines, [value of each result]): the sources
        loaded, the pointwise nodes computed in order (`preset`: values already in C variables)."""
        load = self._loader(P, srcs, loop_shape)

        def element(coords, lin, indent, lane=None):
            lines, vals = load(coords, lin, indent, lane)
            vals.update(preset or {})
            for k, nd in enumerate(nodes):
                expr = self.node_expr(nd, vals)
                out = nd.outputs[0]
                if expr in [v for v, _ in vals.values()]:
                    vals[id(out)] = (expr, out.dtype)
                    continue
                lines.append(f"{indent}const {VALUE_TYPES[out.dtype]} v{k} = {expr};  // {nd.op.name}")
                vals[id(out)] = (f"v{k}", out.dtype)
            return lines, [self._value(t, vals, t.dtype) for t in results]
        element.reads = load.reads
        return element

    def _value(self, t, vals, want: str | None) -> str:
        key = t if isinstance(t, int) else id(t)
        if key in vals:
            v, dt = vals[key]
        else:
            c = _scalar_const(t)
            if c is None:
                raise KeyError(f"value of {t!r} not available in the kernel")
            v, dt = c_literal(c, t.dtype), t.dtype
        if want is None or want == dt:
            return v
        return convert(v, dt, want)

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
            if op in EXACT_COMPARE and _dt.is_float(want[0]) and all(_dt.is_int(t.dtype) for t in ins):
                return spell.format(self._exact_compare(ins, vals), "0")
        else:
            want = [out.dtype] * len(ins)
        args = [self._value(t, vals, w) for t, w in zip(ins, want)]
        if not _dt.is_float(want[-1]):
            spell = self.C_INT_CODE.get(op, spell)
        attrs = {k: (repr(float(v)) if isinstance(v, float) else v) for k, v in nd.attrs.items()}
        # a float16/bfloat16 result: computed in float, rounded to its dtype (as every later op reads it)
        return rounded(f"({VALUE_TYPES[out.dtype]})({spell.format(*args, **attrs)})", out.dtype)

    def _exact_compare(self, ins, vals) -> str:
        """An integer pair NumPy promotes to float64 (a signed integer and uint64) compared exactly: the
        three-way comparison (-1, 0, 1) of the two values, to be compared with 0 by the op's spelling."""
        a, b = ins
        if a.dtype in _dt.SIGNED:
            return f"gc_cmp_su({self._value(a, vals, 'int64')}, {self._value(b, vals, 'uint64')})"
        return f"(-gc_cmp_su({self._value(b, vals, 'int64')}, {self._value(a, vals, 'uint64')}))"

    def is_pointwise(self, node: Node) -> bool:
        """True when the node is one scalar C expression per element (it may join a pointwise kernel)."""
        return node.op in self.C_CODE

    def pointwise(self, kind: str, comment: str, srcs: dict, nodes: list, results: list, outs: list,
                  loop_shape) -> None:
        """One grid-stride kernel: results[k] (computed from `srcs` through `nodes`) into outs[k] (fresh
        contiguous views of the loop shape); a float4 loop when everything is float32 and linear."""
        P = Params(self)
        element = self._element(P, srcs, nodes, results, loop_shape)
        onames = [(P(o, write=True), o.dtype) for o in outs]
        loop_c = self.shape_c(loop_shape)
        vec = _vectorisable(element.reads, onames)
        self.launch(kind, lambda k: K.pointwise(k, comment, loop_c, P.ins(), onames, element, vec), P,
                    K.grid_1d(lambda ev: ev(product(loop_shape))), (K.THREADS, 1, 1), False)

    # ---- rows --------------------------------------------------------------------------------------
    def _pointwise(self, node: Node, ins: list) -> None:
        """An op with a C spelling, alone: one pointwise kernel."""
        t = node.outputs[0]
        out = self.fresh(t)
        comment = f"{node.op.name} -> {t.dtype}{_fmt(out.shape)}"
        self.pointwise("elementwise", comment, {id(x): v for x, v in zip(node.inputs, ins)}, [node], [t], [out],
                       out.shape)
        self.view[id(t)] = out

    def _reduce(self, node: Node, ins: list) -> None:
        self.reduce(node.op, node.outputs[0], {id(node.inputs[0]): ins[0]}, [], node.inputs[0], ins[0].shape,
                    node.attrs["axis"])

    def reduce(self, op, out_t: Tensor, srcs: dict, pre: list, x: Tensor, xshape, axes) -> None:
        """Reduction `op` over `axes` of x (computed from `srcs` through the pointwise prologue `pre`)."""
        reducer = self.REDUCERS[op]
        # argmax/argmin: one axis (or all), the index into the flattened axes
        axes = tuple(range(len(xshape))) if axes is None else ((axes,) if isinstance(axes, int) else tuple(axes))
        acc = x.dtype if isinstance(reducer, K.ArgReduce) else out_t.dtype
        acc = "int32" if acc == "bool" else acc
        out = self.fresh(out_t)
        P = Params(self)
        element = self._element(P, srcs, pre, [x], xshape)
        oname = (P(out, write=True), out_t.dtype)
        shape_c = self.shape_c(xshape)
        threads = K.reduce_threads(cprod([shape_c[a] for a in axes]))
        kept = [xshape[a] for a in range(len(xshape)) if a not in axes]
        comment = f"{op.name} over axes {tuple(axes)} of {x.dtype}{_fmt(xshape)} -> {out_t.dtype}{_fmt(out.shape)}"
        self.launch("reduce", lambda k: K.reduce_kernel(k, comment, reducer, shape_c, tuple(axes), acc, P.ins(), oname,
                                                        lambda c, ind: _first(element(c, None, ind)), threads),
                    P, lambda ev: (min(65535, ev(product(kept))), 1, 1), (threads, 1, 1), True)
        self.view[id(out_t)] = out

    def matmul(self, a: View, b: View, y: Tensor, epilogue=None) -> None:
        """A GEMM; `epilogue` = (srcs, nodes, results, tensors) fuses an elementwise tail (bias,
        activation) into the store: `results[k]` into a fresh buffer for `tensors[k]`."""
        P = Params(self)
        a, b = self.dense(a), self.dense(b)
        yshape = self.shape(y)
        batch = yshape[:-2]
        batch_c = self.shape_c(batch)
        sa = broadcast_view(self.shape_c(a.shape[:-2]), batch_c).strides
        sb = broadcast_view(self.shape_c(b.shape[:-2]), batch_c).strides
        n, k, m = self.c(a.shape[-2]), self.c(a.shape[-1]), self.c(b.shape[-1])
        aa, ba = (P(a), a.dtype), (P(b), b.dtype)
        t = K.TILE
        ep = None
        tensors = [y] if epilogue is None else epilogue[3]
        outs_v = [self.fresh(o) for o in tensors]
        if epilogue is not None:
            srcs, nodes, results, _ = epilogue
            element = self._element(P, srcs, nodes, results, yshape, preset={id(y): (rounded("acc", y.dtype), y.dtype)})

            def ep(bcoords, ind):
                lines, vals = element(bcoords + ["row", "col"], "i", ind)
                return [f"{ind}const long long i = bz * M * N + row * N + col;", *lines,
                        *[f"{ind}{o[0]}[i] = {store(v, o[1])};" for o, v in zip(outs, vals)]]
        outs = [(P(o, write=True), o.dtype) for o in outs_v]
        comment = f"matmul {a.dtype}{_fmt(a.shape)} @ {b.dtype}{_fmt(b.shape)} -> {y.dtype}{_fmt(yshape)} " \
                  f"(16x16 shared-memory tiles)"
        if epilogue is not None:
            comment += f", epilogue {self._node.op.display_name(self._node)}"
        extra = [x for x in P.ins() if x[0] not in (aa[0], ba[0])]

        def grid(ev):
            nn, mm = ev(yshape[-2]), ev(yshape[-1])
            return ((mm + t - 1) // t, (nn + t - 1) // t, min(65535, ev(product(batch))))
        self.launch("matmul", lambda kn: K.matmul_kernel(kn, comment, aa, ba, outs, n, k, m, batch_c, sa, sb, extra, ep),
                    P, grid, (t, t, 1), True)
        for o, v in zip(tensors, outs_v):
            self.view[id(o)] = v

    def scatter(self, out: View, src: View, target, extra: list, kind: str = "scatter", comment: str = "") -> None:
        """out = 0, then out[target(c)] += src[c] over src's elements; `target(P, names)` returns the
        kernel's `(coords, indent) -> (lines, index)` given the names of the `extra` views it reads.
        A float16/bfloat16 `out` accumulates in a float32 buffer, rounded once into out (as the NumPy
        reference computes it); a dtype without an atomic add (bool, 8/16-bit integers) runs on the host."""
        if _dt.is_half(out.dtype):
            acc = self.fresh(None, out.shape, "float32")
            self.scatter(acc, src, target, extra, kind, comment)
            self.add(self.copy(out, acc), [acc], [out])
            return
        if out.dtype not in ATOMIC_DTYPES:
            raise NotLowerable(f"{self._node.op.name} accumulating {out.dtype}")
        self.fill(out)
        src = self.dense(src)
        P = Params(self)
        P(src)
        names = [P(v) for v in extra]
        oname = (P(out, write=True), out.dtype)
        tgt = target(P, names)
        loop_c = self.shape_c(src.shape)
        comment = comment or f"{self._node.op.name}: scatter {src.dtype}{_fmt(src.shape)} into zeros " \
                             f"{out.dtype}{_fmt(out.shape)}"
        self.launch(kind, lambda k: K.scatter_kernel(k, comment, loop_c, P.ins(), oname, tgt, True,
                                                          [o for o in P.outs() if o[0] != oname[0]]),
                    P, K.grid_1d(lambda ev: ev(product(src.shape))), (K.THREADS, 1, 1), False)

    def status_param(self, node, P: Params):
        """The status word's kernel parameter and this node's error code for an integer index out of
        range (the host raises after the call)."""
        st, code = self.status_view(node)
        return P(st, write=True), code


def _binding(dims: dict) -> dict:
    from graphc import shapes as _sh
    return {_sh.dim_symbol(k): v for k, v in dims.items()}


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@functools.lru_cache(maxsize=None)
def _c_functions(cls) -> frozenset:
    """Identifiers called in the C spellings of `cls` (exp, tanh, ...): never used as buffer names."""
    spells = [v for tab in (cls.C_CODE, cls.C_INT_CODE) for v in tab.values() if isinstance(v, str)]
    return frozenset(re.findall(r"([A-Za-z_]\w*)\s*\(", " ".join(spells)))


def _vectorisable(reads, outs) -> list:
    """Names of the inputs a float4 loop loads: all buffers float32, each read at the loop's own
    linear index or a broadcast scalar (all strides 0); [] when that does not hold."""
    lin = [n for _, n, _, _, linear in reads if linear]
    ok = lin and all(d == "float32" and (linear or not any(v.strides)) for _, _, d, v, linear in reads) \
        and all(d == "float32" for _, d in outs)
    return lin if ok else []


def _scalar_const(t):
    if isinstance(t, Tensor) and t.node.op.has(Trait.CONST) and t.node.attrs["value"].ndim == 0:
        return t.node.attrs["value"]
    return None


def _first(res):
    lines, vals = res
    return lines, vals[0]


# ---- cuda's rows --------------------------------------------------------------------------------------

@lowers(Fused)
def _fused(s: CudaSchedule, node, ins):
    """A fused body as one kernel: all pointwise (one loop), a GEMM with a pointwise tail (its store),
    or a pointwise prologue into a reduction; any other body is planned node by node (shared row)."""
    body: Graph = node.attrs["body"]
    for ph, v in zip(body.inputs, ins):
        s.view[id(ph)] = v
    for n in body.nodes:
        if n.op.has(Trait.CONST):
            s.node(n)
    comp = body.compute_nodes()
    outs = body.outputs
    srcs = {id(t): s.view[id(t)] for n in comp for t in n.inputs
            if t.node.op.has(Trait.LEAF) and _scalar_const(t) is None}
    yshape = s.shape(outs[0])
    if comp and all(s.is_pointwise(n) for n in comp) and all(s.shape(o) == yshape for o in outs) \
            and not any(o.node.op.has(Trait.LEAF) for o in outs):
        vs = [s.fresh(t) for t in node.outputs]
        comment = f"{node.op.display_name(node)} -> {node.outputs[0].dtype}{_fmt(yshape)}"
        s.pointwise("fused", comment, srcs, comp, outs, vs, yshape)
        for t, v in zip(node.outputs, vs):
            s.view[id(t)] = v
        return
    if comp and comp[0].op is MatMul and len(comp) > 1 and all(s.is_pointwise(n) for n in comp[1:]) \
            and all(s.shape(o) == s.shape(comp[0].outputs[0]) for o in outs) \
            and not any(o.node.op.has(Trait.LEAF) for o in outs):
        mm = comp[0]
        a, b = (s.view[id(t)] for t in mm.inputs)
        rest_srcs = {id(t): s.view[id(t)] for n in comp[1:] for t in n.inputs
                     if t.node.op.has(Trait.LEAF) and _scalar_const(t) is None}
        s.matmul(a, b, mm.outputs[0], (rest_srcs, comp[1:], outs, list(node.outputs)))
        return
    last = comp[-1] if comp else None
    if last is not None and last.op in s.REDUCERS and len(outs) == 1 and outs[0] is last.outputs[0] \
            and all(s.is_pointwise(n) for n in comp[:-1]):
        x = last.inputs[0]
        s.reduce(last.op, node.outputs[0], srcs, comp[:-1], x, s.shape(x), last.attrs["axis"])
        return
    SHARED[Fused](s, node, ins)


@lowers(Softmax, LogSoftmax)
def _softmax(s: CudaSchedule, node, ins):
    """softmax / log_softmax along attrs["axis"]: one block per row."""
    y = node.outputs[0]
    x = s.dense(ins[0])
    axis = node.attrs["axis"]
    P = Params(s)
    xa = (P(x), x.dtype)
    out = s.fresh(y)
    oa = (P(out, write=True), y.dtype)
    shape_c = s.shape_c(x.shape)
    threads = K.reduce_threads(shape_c[axis])
    kept = [d for a, d in enumerate(x.shape) if a != axis]
    log = node.op is LogSoftmax
    s.launch("softmax", lambda k: K.softmax_kernel(k, f"{node.op.name} along axis {axis} of {x.dtype}{_fmt(x.shape)}",
                                                   log, shape_c, axis, xa, oa, threads),
             P, lambda ev: (min(65535, ev(product(kept))), 1, 1), (threads, 1, 1), True)
    s.view[id(y)] = out


@lowers(MatMul)
def _matmul(s: CudaSchedule, node, ins):
    s.matmul(ins[0], ins[1], node.outputs[0])


def _take_target(s: CudaSchedule, x: View, idx: View, axis: int, iname: str, status):
    """(lines, x offset) for take-shaped coordinates: x[pre, idx[mid], post]; an index outside
    [-d, d) sets the status word (the host raises) instead of reading anything."""
    xs = contiguous_strides(s.shape_c(x.shape))
    isc = s.shape_c(idx.shape)
    d = s.c(x.shape[axis])

    def target(coords, indent):
        pre, mid, post = coords[:axis], coords[axis:axis + len(isc)], coords[axis + len(isc):]
        iidx = CView(0, contiguous_strides(isc)).index(mid)
        sname, code = status
        lines = [f"{indent}long long q = (long long){iname}[{iidx}];",
                 f"{indent}if (q < -{d} || q >= {d}) {{ {sname}[0] = {code}; continue; }}  // out of range",
                 f"{indent}if (q < 0) q += {d};  // negative indices count from the end"]
        off = CView(0, xs[:axis]).index(pre)
        off = cadd(off, cmul("q", xs[axis]))
        off = cadd(off, CView(0, xs[axis + 1:]).index(post))
        return lines, str(off)
    return target


@lowers(Take)
def _take(s: CudaSchedule, node, ins):
    y = node.outputs[0]
    x, idx = s.dense(ins[0]), s.dense(ins[1])
    P = Params(s)
    xa, ia = (P(x), x.dtype), (P(idx), idx.dtype)
    out = s.fresh(y)
    oa = (P(out, write=True), y.dtype)
    status = s.status_param(node, P)
    target = _take_target(s, x, idx, node.attrs["axis"], ia[0], status)

    def element(coords, lin, indent, lane=None):
        lines, off = target(coords, indent)
        return lines, [c_load(f"{xa[0]}[{off}]", x.dtype)]
    comment = f"take along axis {node.attrs['axis']} -> {y.dtype}{_fmt(out.shape)}"
    loop_c = s.shape_c(out.shape)
    s.launch("take", lambda k: K.pointwise(k, comment, loop_c, P.ins(), P.outs(), element),
             P, K.grid_1d(lambda ev: ev(product(out.shape))), (K.THREADS, 1, 1), False)
    s.view[id(y)] = out


@lowers(TakeGrad)
def _take_grad(s: CudaSchedule, node, ins):
    """Scatter-add of the gradient into zeros at the taken positions (checked like take)."""
    t = node.outputs[0]
    g, idx = ins[0], s.dense(ins[2])
    out = s.fresh(t)

    def target(P, names):
        status = s.status_param(node, P)
        return _take_target(s, View(out.buf, 0, out.shape, contig_strides(out.shape), out.dtype), idx,
                            node.attrs["axis"], names[0], status)
    s.scatter(out, g, target, [idx])
    s.view[id(t)] = out


@lowers(IndexGrad)
def _index_grad(s: CudaSchedule, node, ins):
    """The gradient written into zeros through getitem's view (positions are distinct)."""
    from graphc.backends.schedule.views import view_getitem
    t = node.outputs[0]
    out = s.fresh(t)
    s.fill(out)
    dst = view_getitem(out, node.attrs["index"])
    s.add(s.copy(dst, ins[0]), [ins[0]], [out])
    s.view[id(t)] = out


def _load_row_modules() -> None:
    from . import lower_cumulative, lower_nn, lower_quant, lower_random   # noqa: F401  (their @lowers rows)


_load_row_modules()


def graph_dtypes(graph: Graph, out: set | None = None) -> set:
    """Every dtype of a tensor of `graph` (nested bodies included)."""
    out = set() if out is None else out
    for node in graph.nodes:
        out.update(t.dtype for t in node.inputs + node.outputs)
        for v in node.attrs.values():
            if isinstance(v, Graph):
                graph_dtypes(v, out)
    return out


def refuse_dtypes(graph: Graph) -> None:
    """A dtype without a C type (C_TYPES; today every graphc dtype has one) is a DTypeError at compile
    time naming the tensor, never a wrong kernel."""
    from graphc.errors import DTypeError
    from graphc.ir import fmt_loc
    for node in graph.nodes:
        for t in node.inputs + node.outputs:
            if t.dtype not in C_TYPES:
                raise DTypeError(f"backend 'cuda' does not support dtype {t.dtype} yet (tensor {t.label} of "
                                 f"{node.op.name}, built at {fmt_loc(node.loc)}); it supports "
                                 f"{', '.join(C_TYPES)}: use backend='llvm' or 'numpy', or cast first")
        for v in node.attrs.values():
            if isinstance(v, Graph):
                refuse_dtypes(v)


def lower(graph: Graph, schedule: type = CudaSchedule) -> tuple[str, CudaSchedule]:
    """The CUDA translation unit and the symbolic schedule for `graph` (`schedule`: the backend's table)."""
    refuse_dtypes(graph)
    s = schedule(graph)
    head = (f"// graphc: CUDA C for graph '{graph.name}' ({len(s.sources)} kernels)\n"
            "// one self-contained translation unit: nvcc -ptx / NVRTC compile it as it is\n")
    half = HALF_PRELUDE if uses_half(graph_dtypes(graph)) else ""
    return head + half + PRELUDE + "\n" + s.dt.struct_source() + "\n" + "\n".join(s.sources), s


def text(s: CudaSchedule) -> str:
    """The schedule as text: buffers, then steps (launches, host steps, loops)."""
    from graphc.ir import fmt_loc
    lines = [f"buffer {b} {s.cname(b)}: {buf.nbytes} bytes ({buf.kind})" for b, buf in enumerate(s.buffers)]

    def steps(sts, ind):
        for st in sts:
            if isinstance(st, HostStep):
                lines.append(f"{ind}HOST FALLBACK {st.node.op.name} (NumPy impl; node built at {fmt_loc(st.node.loc)})")
            elif isinstance(st, LoopStep):
                lines.append(f"{ind}loop scan over {st.length} steps ({'reversed' if st.reverse else 'forward'}):")
                steps(st.body, ind + "    ")
            else:
                lines.append(ind + st.describe())
    steps(s.steps, "")
    return "\n".join(lines)


CudaSchedule.text = text
