"""Planning one specialisation (concrete dims) of a graph: views for every tensor, kernels in schedule
order, host fallback steps for ops without a native lowering, and the arena memory plan."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphc import shapes as _sh
from graphc.errors import GraphcError
from graphc.ir import Graph, Node, Trait, ops_with
from graphc.ops import nn_ops as NN
from graphc.ops import reduce as R
from graphc.ops import shape_ops as S
from graphc.ops.core import ConstantOp, StopGradient
from graphc.ops.fused import Fused
from graphc.ops.linalg import MatMul
from graphc.ops.scan import Scan

from . import gather, gemm
from . import kernels as K
from . import table
from .irtext import Emitter
from .lower import CODE_FOR_OP, NotLowerable
from .table import lowers
from .views import View, broadcast_strides, collapse, contig_strides, literal_view, view_getitem

ALIGN = 64


@dataclass
class Buffer:
    kind: str          # input | param | const | out | arena
    index: int         # position among buffers of its kind
    nbytes: int
    first: int = 1 << 60
    last: int = -1
    offset: int = 0    # arena byte offset (slice: byte offset into the parent)
    stride: int = 0    # slice buffers: bytes between loop iterations (index = parent buffer id)


@dataclass
class LoopStep:
    """A native loop (gc.scan): `body` steps run `length` times; slice buffers move per iteration."""
    length: int
    reverse: bool
    body: list
    slices: list      # buffer ids of kind "slice"
    name: str = "scan"

    def buffers(self) -> set:
        out = set()
        for st in self.body:
            out |= st.buffers() if isinstance(st, LoopStep) else set(st.bufs)
        return out - set(self.slices)


@dataclass
class HostStep:
    """A node run by its NumPy impl (no native lowering yet)."""
    node: Node
    ins: list
    outs: list


class Plan:
    def __init__(self, graph: Graph, dims: dict, bounds: bool = False):
        self.graph = graph
        self.bounds = bounds   # sanitize="bounds": every kernel access checked (program.generate)
        self.dims = dict(dims)
        self.bind = {_sh.dim_symbol(k): v for k, v in dims.items()}
        self.buffers: list[Buffer] = []
        self.steps: list = []
        self.view: dict[int, View] = {}
        self.consts: list[np.ndarray] = []
        self.fallback: set[str] = set()
        self.kinds = {"input": 0, "param": 0, "const": 0, "out": 0, "arena": 0}
        roots = graph.roots
        self.root_slot = {}
        for j, t in enumerate(roots):
            self.root_slot.setdefault(id(t), j)
        self.out_bufs = [None] * len(roots)
        self.status: View | None = None  # int64 word: 1 + index in status_errors of the kernel that found
        self.status_errors: list = []      # a bad index or access: (node, what); the program raises after
        self._loop_pos = None   # inside a loop body: every buffer is live for the whole loop step
        self._node: Node | None = None   # the node being planned (kernels remember it for error messages)
        if bounds:
            self._status_buffer()
        self._build()

    # ---- buffers and views -------------------------------------------------------------------------
    def shape(self, t) -> tuple:
        return _sh.evaluate(t.shape, self.bind)

    def new_buffer(self, kind: str, nbytes: int, index=None) -> int:
        idx = self.kinds[kind] if index is None else index
        self.kinds[kind] = max(self.kinds[kind], idx + 1)
        self.buffers.append(Buffer(kind, idx, nbytes))
        return len(self.buffers) - 1

    def fresh(self, t, shape=None, dtype=None) -> View:
        """A new contiguous buffer for tensor t: the output slot if t is a root, else the arena."""
        shape = self.shape(t) if shape is None else shape
        dtype = dtype or t.dtype
        nbytes = _nbytes(shape, dtype)
        j = self.root_slot.get(id(t)) if t is not None else None
        if j is not None and self.out_bufs[j] is None and dtype == t.dtype:
            b = self.new_buffer("out", nbytes, j)
            self.out_bufs[j] = b
        else:
            b = self.new_buffer("arena", nbytes)
        return View(b, 0, tuple(shape), contig_strides(shape), dtype)

    def touch(self, views, step: int) -> None:
        for v in views:
            if v is not None and v.buf is not None:
                b = self.buffers[v.buf]
                while True:
                    b.first, b.last = min(b.first, step), max(b.last, step)
                    if b.kind != "slice":
                        break
                    b = self.buffers[b.index]

    def add(self, kernel_or_host, reads, writes) -> None:
        pos = self._loop_pos if self._loop_pos is not None else len(self.steps)
        self.touch(list(reads) + list(writes), pos)
        if isinstance(kernel_or_host, K.Kernel):
            kernel_or_host.node = self._node
        self.steps.append(kernel_or_host)

    def _status_buffer(self) -> View:
        """The arena word a checking kernel sets (live for the whole program, never shared)."""
        if self.status is None:
            b = self.new_buffer("arena", 8)
            self.buffers[b].first, self.buffers[b].last = 0, 1 << 59
            self.status = View(b, 0, (1,), (1,), "int64")
        return self.status

    def status_code(self, node: Node | None, what: str) -> int:
        """The code a kernel stores in the status word to report `what` about `node`."""
        self.status_errors.append((node, what))
        return len(self.status_errors)

    def status_view(self, node: Node) -> tuple[View, int]:
        """Status word and code for a kernel that checks integer indices (take, take_grad)."""
        return self._status_buffer(), self.status_code(
            node, f"IndexError in {node.op.name} at run time: an integer index is out of range for axis "
                  f"{node.attrs['axis']}")

    def materialise(self, v: View, dtype=None) -> View:
        """A contiguous copy of v (converted to dtype)."""
        out = self.fresh(None, v.shape, dtype or v.dtype)
        self.add(K.copy(out, v), [v], [out])
        return out

    # ---- the walk ----------------------------------------------------------------------------------
    def _build(self) -> None:
        g = self.graph
        for i, t in enumerate(g.inputs):
            shape = self.shape(t)
            b = self.new_buffer("input", _nbytes(shape, t.dtype), i)
            self.view[id(t)] = View(b, 0, shape, contig_strides(shape), t.dtype)
        for i, p in enumerate(g.parameters):
            b = self.new_buffer("param", _nbytes(p.shape, p.dtype), i)
            self.view[id(p)] = View(b, 0, p.shape, contig_strides(p.shape), p.dtype)
        for node in g.nodes:
            if not node.op.has(Trait.INPUT | Trait.STATE):
                self.node(node)
        for j, t in enumerate(g.roots):   # roots not computed straight into their output slot
            if self.out_bufs[j] is None or self.view[id(t)].buf != self.out_bufs[j]:
                shape = self.shape(t)
                b = self.new_buffer("out", _nbytes(shape, t.dtype), j)
                self.out_bufs[j] = b
                out = View(b, 0, shape, contig_strides(shape), t.dtype)
                self.add(K.copy(out, self.view[id(t)]), [self.view[id(t)]], [out])
        self._assign_arena()

    def node(self, node: Node) -> None:
        """Plan one node by its row in the lowering table (table.PLAN); no row, or NotLowerable: host."""
        handler = table.PLAN.get(node.op)
        ins = [self.view[id(t)] for t in node.inputs]
        outer, self._node = self._node, (self._node or node)   # a fused body's nodes report the fused node
        try:
            if handler is None:
                raise NotLowerable(node.op.name)
            handler(self, node, ins)
        except NotLowerable:
            self.host(node, ins)
        finally:
            self._node = outer

    def host(self, node: Node, ins) -> None:
        self.fallback.add(node.op.name)
        outs = [self.fresh(t) for t in node.outputs]
        for t, v in zip(node.outputs, outs):
            self.view[id(t)] = v
        self.add(HostStep(node, ins, outs), ins, outs)

    @lowers(ConstantOp)
    def _constant(self, node, ins):
        t, a = node.outputs[0], node.attrs["value"]
        if a.size == 1:
            self.view[id(t)] = literal_view(a.reshape(-1)[0].item(), a.shape, t.dtype)
            return
        b = self.new_buffer("const", a.nbytes, len(self.consts))
        self.consts.append(np.ascontiguousarray(a))
        self.view[id(t)] = View(b, 0, a.shape, contig_strides(a.shape), t.dtype)

    # views: no data movement
    @lowers(S.Reshape)
    def _reshape(self, node, ins):
        v, shape = ins[0], self.shape(node.outputs[0])
        if v.literal is not None:
            self.view[id(node.outputs[0])] = literal_view(v.literal, shape, v.dtype)
            return
        if not v.contiguous:
            v = self.materialise(v)
        self.view[id(node.outputs[0])] = View(v.buf, v.offset, shape, contig_strides(shape), v.dtype)

    @lowers(S.Transpose)
    def _transpose(self, node, ins):
        v, axes = ins[0], node.attrs["axes"]
        self.view[id(node.outputs[0])] = View(v.buf, v.offset, tuple(v.shape[a] for a in axes),
                                              tuple(v.strides[a] for a in axes), v.dtype, v.literal)

    @lowers(S.BroadcastTo)
    def _broadcast_to(self, node, ins):
        v, shape = ins[0], self.shape(node.outputs[0])
        self.view[id(node.outputs[0])] = View(v.buf, v.offset, shape, broadcast_strides(v, shape), v.dtype,
                                              v.literal)

    @lowers(S.GetItem)
    def _getitem(self, node, ins):
        self.view[id(node.outputs[0])] = view_getitem(ins[0], node.attrs["index"])

    @lowers(StopGradient)
    def _stop_gradient(self, node, ins):
        self.view[id(node.outputs[0])] = ins[0]

    @lowers(S.SizeOf)
    def _size_of(self, node, ins):
        n = int(np.prod([ins[0].shape[a] for a in node.attrs["axes"]], dtype=np.int64))
        self.view[id(node.outputs[0])] = literal_view(n, (), node.attrs["dtype"])

    # kernels
    def _check(self, compute, ins) -> None:
        """Lower once into a scratch emitter so NotLowerable surfaces at plan time."""
        compute(Emitter(), [("%x", v.dtype) for v in ins])

    def _elementwise(self, node, ins):
        """Every op with a row in the scalar table (lower.CODE_FOR_OP): one loop."""
        t = node.outputs[0]
        compute = K.op_compute(node.op, node.attrs, t.dtype)
        self._check(compute, ins)
        out = self.fresh(t)
        self.add(K.elementwise([out], ins, compute), ins, [out])
        self.view[id(t)] = out

    @lowers(Fused)
    def _fused(self, node, ins):
        """Regions of per-element ops as single loops; heads (matmul) and reductions as kernels."""
        body = node.attrs["body"]
        for ph, v in zip(body.inputs, ins):
            self.view[id(ph)] = v
        self._walk_body(body, {id(bo): o for bo, o in zip(body.outputs, node.outputs)})
        for o, bo in zip(node.outputs, body.outputs):
            self.view[id(o)] = self.view[id(bo)]

    def _walk_body(self, body, as_root: dict) -> None:
        """Plan a body graph (placeholder views already set): per-element runs as one loop each."""
        from .fusion import VIEW_OPS, per_element
        nodes = [n for n in body.nodes if not n.op.has(Trait.INPUT)]
        for n in nodes:
            if n.op.has(Trait.CONST):
                self.node(n)
        nodes = [n for n in nodes if not n.op.has(Trait.CONST)]
        outs = {id(o) for o in body.outputs}
        cur: list = []

        def flush(k):
            if cur:
                self._region(list(cur), nodes[k:], outs, as_root)
                cur.clear()
        for k, n in enumerate(nodes):
            if per_element(n):
                cur.append(n)
                continue
            # a view of something computed before the open region is free: plan it and keep the region
            inside = {id(t) for m in cur for t in m.outputs}
            if n.op in VIEW_OPS and not any(id(t) in inside for t in n.inputs):
                self.node(n)
                continue
            flush(k)
            self.node(n)
        flush(len(nodes))

    def _region(self, members, later, body_outs, as_root):
        from .fusion import region_compute
        produced = {id(t) for n in members for t in n.outputs}
        needed = {id(t) for n in later for t in n.inputs} | body_outs
        inputs, seen = [], set()
        for n in members:
            for t in n.inputs:
                if id(t) not in produced and id(t) not in seen:
                    seen.add(id(t))
                    inputs.append(t)
        outputs = [n.outputs[0] for n in members if id(n.outputs[0]) in needed]
        compute = region_compute(members, inputs, outputs, self.shape)
        ins = [self.view[id(t)] for t in inputs]
        if compute is not None:
            try:
                self._check(compute, ins)
            except NotLowerable:
                compute = None
        if compute is None:
            for n in members:
                self.node(n)
            return
        outs = [self.fresh(as_root.get(id(t), t), self.shape(t), t.dtype) for t in outputs]
        self.add(K.elementwise(outs, ins, compute), ins, outs)
        for t, v in zip(outputs, outs):
            self.view[id(t)] = v

    def _reduce(self, node, ins):
        """Monoid reductions (Trait.MONOID) with a combine row in kernels.COMBINE."""
        t = node.outputs[0]
        out = self.fresh(t)
        self.add(K.reduce(node.op, out, ins[0], node.attrs["axis"]), ins, [out])
        self.view[id(t)] = out

    @lowers(*K.ARG_BETTER)
    def _argmax(self, node, ins):
        t = node.outputs[0]
        out = self.fresh(t)
        self.add(K.arg_reduce(node.op, out, ins[0], node.attrs["axis"]), ins, [out])
        self.view[id(t)] = out

    @lowers(R.Softmax, R.LogSoftmax, R.LogSumExp)
    def _softmax(self, node, ins):
        t = node.outputs[0]
        axes = node.attrs["axis"]
        axes = (axes,) if isinstance(axes, int) else tuple(axes)
        out = self.fresh(t)
        self.add(K.softmax_like(node.op, out, ins[0], axes), ins, [out])
        self.view[id(t)] = out

    @lowers(MatMul)
    def _matmul(self, node, ins):
        t = node.outputs[0]
        a, b = (v if v.dtype == t.dtype and v.literal is None else self.materialise(v, t.dtype) for v in ins)
        flat = _rows_collapsed(a, b)
        if flat is not None:   # (batch..., n, k) @ one (k, m): a single GEMM over batch*n rows
            out = self.fresh(t)
            shape = (flat.shape[0], b.shape[-1])
            self._matmul_views(View(out.buf, out.offset, shape, contig_strides(shape), out.dtype), flat,
                               View(b.buf, b.offset, b.shape[-2:], b.strides[-2:], b.dtype))
            self.view[id(t)] = out
            return
        out = self.fresh(t)
        self._matmul_views(out, a, b)
        self.view[id(t)] = out

    def _matmul_views(self, out: View, a: View, b: View) -> None:
        """Plan out = a @ b: the vector micro-kernel for small products, else BLAS (or the loop)."""
        if gemm.small(a, b):   # small products: the micro-kernel beats BLAS's per-call overhead (LSTM steps)
            b = b if b.strides[-1] == 1 or b.shape[-1] == 1 else self.materialise(b)
            self.add(gemm.matmul(out, a, b, blas="tiles"), [a, b], [out])
            return
        if gemm.use_blas(a, b, out):
            a = a if gemm.blas_layout(a) and min(a.strides[-2:]) >= 0 else self.materialise(a)
            b = b if gemm.blas_layout(b) and min(b.strides[-2:]) >= 0 else self.materialise(b)
        self.add(gemm.matmul(out, a, b), [a, b], [out])

    def _conv_tiles(self, n: int, k: int, m: int, dtype: str, min_rows: int = 2) -> bool:
        """Whether the per-image (per-group) (n x k) @ (k x m) products of a convolution use the micro-kernel."""
        return gemm.small(View(None, 0, (n, k), (k, 1), dtype), View(None, 0, (k, m), (m, 1), dtype), min_rows)

    @lowers(NN.Conv2d)
    def _conv2d(self, node, ins):
        """im2col into the arena, then out[n] = W (O, C*KH*KW) @ cols[n] as one batched GEMM (groups: per
        group, its O/g filters times its C/g channels' columns)."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        x, w = (v if v.literal is None else self.materialise(v) for v in ins)
        if x.dtype != w.dtype or x.dtype != t.dtype:
            raise NotLowerable("conv2d")
        g = a["groups"]
        n, c = x.shape[:2]
        o, cg, kh, kw = w.shape
        oshape = self.shape(t)
        og, ckk, hw = o // g, cg * kh * kw, oshape[2] * oshape[3]
        wm = w if w.contiguous else self.materialise(w)
        if self._conv_tiles(og, ckk, hw, x.dtype, 2 if g == 1 else 1):
            # image by image: im2col of one image, then its product while the columns are in cache
            cols = self.fresh(None, (c, kh, kw) + oshape[2:], x.dtype)
            out = self.fresh(t)
            om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
            w2 = View(wm.buf, wm.offset, (o, ckk), (ckk, 1), wm.dtype)
            self.add(conv.conv_tiles(om, x, w2, cols, (kh, kw), a["stride"], a["pads"], a["dilation"], g),
                     [x, w2], [om, cols])
            self.view[id(t)] = out
            return
        cols = self.fresh(None, (n, c, kh, kw) + oshape[2:], x.dtype)
        self.add(conv.im2col(cols, x, (kh, kw), a["stride"], a["pads"], a["dilation"]), [x], [cols])
        out = self.fresh(t)
        if g == 1:
            wm = View(wm.buf, wm.offset, (1, o, ckk), (0, ckk, 1), wm.dtype)
            cm = View(cols.buf, cols.offset, (n, ckk, hw), (ckk * hw, hw, 1), cols.dtype)
            om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
        else:
            wm = View(wm.buf, wm.offset, (1, g, og, ckk), (0, og * ckk, ckk, 1), wm.dtype)
            cm = View(cols.buf, cols.offset, (n, g, ckk, hw), contig_strides((n, g, ckk, hw)), cols.dtype)
            om = View(out.buf, out.offset, (n, g, og, hw), contig_strides((n, g, og, hw)), out.dtype)
        self.add(gemm.matmul(om, wm, cm), [wm, cm], [om])
        self.view[id(t)] = out

    @lowers(NN.Conv2dGradInput)
    def _conv2d_grad_input(self, node, ins):
        """gx = col2im(W_g^T @ gy_g per image and group): one batched GEMM (the micro-kernel for small
        products, else BLAS) into the arena, then a col2im kernel (split by image across threads when large)."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        gy, w = (v if v.contiguous else self.materialise(v) for v in ins)
        if gy.dtype != w.dtype or gy.dtype != t.dtype:
            raise NotLowerable("conv2d_grad_input")
        g = a["groups"]
        n, o, oh, ow = gy.shape
        _, cg, kh, kw = w.shape
        og, ckk, hw = o // g, cg * kh * kw, oh * ow
        args = ((kh, kw), a["stride"], a["pads"], a["dilation"])
        # (measured on LeNet's second layer: a per-image kernel fusing the micro-kernel product and col2im
        # ran 1.7x slower than the batched product (micro-kernel or BLAS) followed by col2im)
        cols = self.fresh(None, (n, g, ckk, hw), t.dtype)
        wt = View(w.buf, w.offset, (1, g, ckk, og), (0, og * ckk, 1, ckk), w.dtype)
        gm = View(gy.buf, gy.offset, (n, g, og, hw), (o * hw, og * hw, hw, 1), gy.dtype)
        self._matmul_views(cols, wt, gm)
        gx = self.fresh(t)
        self.add(conv.col2im(gx, cols, *args, (oh, ow)), [cols], [gx])
        self.view[id(t)] = gx

    @lowers(NN.Conv2dGradWeight)
    def _conv2d_grad_weight(self, node, ins):
        """gw_g (O/g, C/g*KH*KW) = gy_g (O/g, N*OH*OW) @ rows_g: one GEMM per group over the whole batch,
        rows = im2col(x) in patch-rows layout (N*OH*OW, C*KH*KW), gy reordered to (O, N*OH*OW)."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        x = ins[0] if ins[0].literal is None else self.materialise(ins[0])
        gy = ins[1] if ins[1].contiguous else self.materialise(ins[1])
        if x.dtype != gy.dtype or x.dtype != t.dtype:
            raise NotLowerable("conv2d_grad_weight")
        g = a["groups"]
        n, c = x.shape[:2]
        kh, kw = a["kernel"]
        o, oh, ow = gy.shape[1:]
        og, kk, hw = o // g, kh * kw, oh * ow
        ckk = c // g * kk
        rows = self.fresh(None, (n * hw, c * kk), t.dtype)
        self.add(conv.im2col(rows, x, (kh, kw), a["stride"], a["pads"], a["dilation"], (oh, ow), (kk, 1, c * kk)),
                 [x], [rows])
        if n == 1:
            gt = gy
        else:
            gt = self.fresh(None, (o, n, hw), t.dtype)
            self.add(K.copy(gt, View(gy.buf, gy.offset, (o, n, hw), (hw, o * hw, 1), gy.dtype)), [gy], [gt])
        gw = self.fresh(t)
        self._matmul_views(View(gw.buf, gw.offset, (g, og, ckk), contig_strides((g, og, ckk)), gw.dtype),
                           View(gt.buf, gt.offset, (g, og, n * hw), (og * n * hw, n * hw, 1), gt.dtype),
                           View(rows.buf, rows.offset, (g, n * hw, ckk), (ckk, c * kk, 1), rows.dtype))
        self.view[id(t)] = gw

    @lowers(NN.MaxPool2d)
    def _max_pool2d(self, node, ins):
        from . import conv
        t, a = node.outputs[0], node.attrs
        out = self.fresh(t)
        self.add(conv.max_pool(out, ins[0], a["kernel"], a["stride"], a["pads"]), ins, [out])
        self.view[id(t)] = out

    @lowers(NN.MaxPool2dGrad, NN.MaxPool2dSelect)
    def _max_pool2d_grad(self, node, ins):
        """max_pool2d_grad (gy routed to each window's first maximum) and its adjoint max_pool2d_select."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        x, g = (v if v.literal is None else self.materialise(v) for v in ins)
        out = self.fresh(t)
        kern = conv.max_pool_select if node.op is NN.MaxPool2dSelect else conv.max_pool_grad
        self.add(kern(out, x, g, a["kernel"], a["stride"], a["pads"]), [x, g], [out])
        self.view[id(t)] = out

    def _slice(self, v: View, axis0_stride_bytes: int) -> tuple[int, View]:
        """A per-iteration slice v[t] of a (length, ...) view: a buffer that moves by the stride. Its
        size is one slice's extent; every iteration's window is checked against the parent here."""
        item = np.dtype(v.dtype).itemsize
        inner = View(None, 0, v.shape[1:], v.strides[1:], v.dtype)
        lo, hi = _extent(inner)
        if lo < 0:
            raise NotLowerable("scan")   # negative inner strides: not a forward window
        nbytes = (hi + 1) * item if inner.size else 0
        parent = self.buffers[v.buf]
        for t in {0, max(v.shape[0] - 1, 0)}:
            start = v.offset * item + t * axis0_stride_bytes
            if inner.size and v.shape[0] and not (0 <= start and start + nbytes <= parent.nbytes):
                raise GraphcError(f"internal error (a graphc bug, please report it): llvm plan of scan step {t} "
                                  f"reads bytes [{start}, {start + nbytes}) of a {parent.nbytes}-byte buffer")
        self.buffers.append(Buffer("slice", v.buf, nbytes, offset=v.offset * item, stride=axis0_stride_bytes))
        b = len(self.buffers) - 1
        return b, View(b, 0, v.shape[1:], v.strides[1:], v.dtype)

    @lowers(Scan)
    def _scan(self, node, ins):
        """gc.scan as a native loop: carries in arena buffers, sequences/ys/history by moving slices."""
        a = node.attrs
        nc, ns, body = a["n_carry"], a["n_seq"], a["body"]
        seqs = ins[nc:nc + ns]
        # invariants read every iteration: make strided views (a hoisted transpose) contiguous once
        invs = [v if v.literal is not None or v.contiguous else self.materialise(v) for v in ins[nc + ns:]]
        T = seqs[0].shape[0] if seqs else int(_sh.evaluate((a["length"],), self.bind)[0])
        concrete = [c.shape for c in ins[:nc]] + [q.shape[1:] for q in seqs] + [v.shape for v in invs]
        for ph, shp in zip(body.inputs, concrete):
            for d, val in zip(ph.shape, shp):
                if not isinstance(d, int) and d.is_Symbol:
                    self.bind.setdefault(d, val)
        if any(n.op.has(Trait.STATE) for n in body.nodes):
            raise NotLowerable("scan")
        carry = [self.fresh(None, c.shape, t.dtype) for c, t in zip(ins[:nc], node.outputs[:nc])]
        for cb, c in zip(carry, ins[:nc]):
            self.add(K.copy(cb, c), [c], [cb])
        n_y = len(body.outputs) - nc
        used = self._consumed()
        # stacked ys / history nothing reads (inference needs no history): no buffer, no per-step copy
        live = [id(t) in used for t in node.outputs[nc:]]
        stacked = [self.fresh(t) if keep else None for t, keep in zip(node.outputs[nc:], live)]
        saved, saved_pos, saved_fb = self.steps, self._loop_pos, set(self.fallback)
        self._loop_pos, self.steps = len(saved), []
        try:
            slices = []
            for ph, v in zip(body.inputs, carry + [None] * ns + list(invs)):
                if v is not None:
                    self.view[id(ph)] = v
            for ph, q in zip(body.inputs[nc:nc + ns], seqs):
                b, self.view[id(ph)] = self._slice(q, q.strides[0] * np.dtype(q.dtype).itemsize)
                slices.append(b)
            outs = []
            for v in stacked:
                if v is None:
                    outs.append(None)
                    continue
                b, sv = self._slice(v, v.strides[0] * np.dtype(v.dtype).itemsize if v.shape[0] else 0)
                slices.append(b)
                outs.append(sv)
            for hs, cb in zip(outs[n_y:], carry):       # history[t]: the carry entering step t
                if hs is not None:
                    self.add(K.copy(hs, cb), [cb], [hs])
            self._walk_body(body, {})
            if any(isinstance(st, HostStep) for st in self.steps):
                raise NotLowerable("scan")
            for y, ys in zip(body.outputs[nc:], outs[:n_y]):
                if ys is not None:
                    self.add(K.copy(ys, self.view[id(y)]), [self.view[id(y)]], [ys])
            carry_bufs = {cb.buf for cb in carry}
            new = [self.view[id(o)] for o in body.outputs[:nc]]
            new = [self.materialise(v) if v.buf in carry_bufs else v for v in new]   # no read-after-write
            for cb, v in zip(carry, new):
                self.add(K.copy(cb, v), [v], [cb])
            loop = LoopStep(T, bool(a["reverse"]), self.steps, slices)
        except NotLowerable:
            self.steps, self._loop_pos, self.fallback = saved, saved_pos, saved_fb
            raise
        self.steps, self._loop_pos = saved, saved_pos
        self.add(loop, [], [])
        kept = [v for v in stacked if v is not None]
        self.touch(carry + kept, len(self.steps) - 1)
        for t, v in zip(node.outputs, carry + stacked):
            if v is not None:
                self.view[id(t)] = v

    def _consumed(self) -> set:
        """ids of every tensor some node (at any nesting depth) or the graph's roots read."""
        if getattr(self, "_used", None) is None:
            used, todo, seen = {id(t) for t in self.graph.roots}, [self.graph], set()
            while todo:
                g = todo.pop()
                if id(g) in seen:
                    continue
                seen.add(id(g))
                used.update(id(t) for t in g.outputs)
                for n in g.nodes:
                    used.update(id(t) for t in n.inputs)
                    todo.extend(v for v in n.attrs.values() if isinstance(v, Graph))
            self._used = used
        return self._used

    @lowers(S.Concatenate)
    def _concatenate(self, node, ins):
        t, axis = node.outputs[0], node.attrs["axis"]
        out, start = self.fresh(t), 0
        for v in ins:
            n = v.shape[axis]
            dst = view_getitem(out, (slice(None),) * axis + (slice(start, start + n),))
            self.add(K.copy(dst, v), [v], [out])
            start += n
        self.view[id(t)] = out

    @lowers(S.IndexGrad)
    def _index_grad(self, node, ins):
        t = node.outputs[0]
        out = self.fresh(t)
        self.add(K.Kernel("fill", [out], lambda em, P, lo, hi: K.fill(em, P, out, 0)), [], [out])
        self.add(K.copy(view_getitem(out, node.attrs["index"]), ins[0]), [ins[0]], [out])
        self.view[id(t)] = out

    @lowers(S.Take)
    def _take(self, node, ins):
        t = node.outputs[0]
        x, idx = (v if v.literal is None else self.materialise(v) for v in ins)
        out = self.fresh(t)
        st, code = self.status_view(node)
        self.add(gather.take(out, x, idx, node.attrs["axis"], st, code), [x, idx, st], [out])
        self.view[id(t)] = out

    @lowers(S.TakeGrad)
    def _take_grad(self, node, ins):
        t = node.outputs[0]
        g, idx = (v if v.literal is None else self.materialise(v) for v in (ins[0], ins[2]))
        out = self.fresh(t)
        st, code = self.status_view(node)
        self.add(gather.take_grad(out, g, idx, node.attrs["axis"], st, code), [g, idx, st], [out])
        self.view[id(t)] = out

    # ---- memory plan -------------------------------------------------------------------------------
    def _assign_arena(self) -> None:
        """Arena offsets from the shared planner: buffers whose step ranges do not overlap share memory."""
        from graphc.backends.schedule.arena import plan_arena
        arena = [b for b in self.buffers if b.kind == "arena" and b.last >= 0]
        plan = plan_arena([(b.first, b.last, b.nbytes) for b in arena], ALIGN)
        for b, off in zip(arena, plan.offsets):
            b.offset = off
        self.arena_bytes = plan.total


# the rows derived from other tables: every op with a scalar row is an elementwise loop; the monoid
# reductions (by trait) that kernels.COMBINE can combine are reduction kernels
table.PLAN.update({op: Plan._elementwise for op in CODE_FOR_OP})
table.PLAN.update({op: Plan._reduce for op in ops_with(Trait.MONOID) if op in K.COMBINE})
# rows from the other modules of this package (random draws: random.py)
table.load_row_modules()


def _rows_collapsed(a: View, b: View) -> View | None:
    """a (batch..., n, k) as one (batch*n, k) matrix when b has no batch of its own (all batch strides 0)
    and a's batch and row dims walk memory as a single stride; else None."""
    if len(a.shape) < 3 or any(s for s in b.strides[:-2]) or a.size == 0:
        return None
    if np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) != tuple(a.shape[:-2]):
        return None
    dims, (st,) = collapse(a.shape[:-1], [a.strides[:-1]])
    if len(dims) > 1:
        return None
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))
    return View(a.buf, a.offset, (rows, a.shape[-1]), (st[0] if dims else 0, a.strides[-1]), a.dtype)


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _extent(v: View) -> tuple[int, int]:
    """Lowest and highest element offsets (relative to v.offset) that a non-empty view reaches."""
    lo = sum((n - 1) * s for n, s in zip(v.shape, v.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(v.shape, v.strides) if s > 0)
    return lo, hi
