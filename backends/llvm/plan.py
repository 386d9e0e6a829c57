"""llvm's plan of one specialisation: the shared schedule (graphc.backends.schedule.plan: buffers,
views, lifetimes, host and loop steps, status codes, the arena) with llvm's kernel rows: elementwise
loops and fused regions, reductions, GEMM choices, convolutions, pooling, gathers."""
from __future__ import annotations

import numpy as np

from graphc import dtypes as _dt
from graphc.backends.schedule.plan import ROWS, Schedule
from graphc.ir import Trait, ops_with
from graphc.ops import nn_ops as NN
from graphc.ops import reduce as R
from graphc.ops import shape_ops as S
from graphc.ops.linalg import MatMul

from . import gather, gemm
from . import kernels as K
from .irtext import Emitter
from .lower import CODE_FOR_OP, NotLowerable
from .table import PLAN, load_row_modules, lowers
from ..schedule.views import View, collapse, contig_strides, view_getitem


class Plan(Schedule):
    """A Schedule whose kernel steps are llvm kernels (kernels.Kernel), planned by table.PLAN."""

    table = PLAN
    backend = "llvm"

    def copy(self, dst: View, src: View):
        return K.copy(dst, src)

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

    def walk_body(self, body, as_root: dict) -> None:
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
        # float16/bfloat16: the operands converted to float32 once (O(nk + km) against the product's O(nkm)),
        # a float32 product, rounded once into the output
        ct = _dt.compute_dtype(t.dtype)
        a, b = (v if v.dtype == ct and v.literal is None else self.materialise(v, ct) for v in ins)
        out = self.fresh(t) if ct == t.dtype else self.fresh(None, self.shape(t), ct)
        flat = _rows_collapsed(a, b)
        if flat is not None:   # (batch..., n, k) @ one (k, m): a single GEMM over batch*n rows
            shape = (flat.shape[0], b.shape[-1])
            self._matmul_views(View(out.buf, out.offset, shape, contig_strides(shape), out.dtype), flat,
                               View(b.buf, b.offset, b.shape[-2:], b.strides[-2:], b.dtype))
        else:
            self._matmul_views(out, a, b)
        if ct != t.dtype:
            rounded = self.fresh(t)
            self.add(K.copy(rounded, out), [out], [rounded])
            out = rounded
        self.view[id(t)] = out

    def _matmul_views(self, out: View, a: View, b: View) -> None:
        """Plan out = a @ b: graphc's matrix-vector loop for batch-1 products (n or m == 1), the vector
        micro-kernel for small products, else BLAS (its thread count per call: tune.blas_threads_for) or
        the loop."""
        if gemm.gemv_ok(a, b, out):   # batch 1: no BLAS call, no thread hand-off
            if gemm.gemv_form(a, b) is None:
                a, b = (v if v.contiguous else self.materialise(v) for v in (a, b))
            self.add(gemm.matmul(out, a, b, blas="gemv"), [a, b], [out])
            return
        if gemm.small(a, b):   # small products: the micro-kernel beats BLAS's per-call overhead (LSTM steps)
            b = b if b.strides[-1] == 1 or b.shape[-1] == 1 else self.materialise(b)
            self.add(gemm.matmul(out, a, b, blas="tiles"), [a, b], [out])
            return
        threads = None
        if gemm.use_blas(a, b, out):
            from . import tune
            a = a if gemm.blas_layout(a) and min(a.strides[-2:]) >= 0 else self.materialise(a)
            b = b if gemm.blas_layout(b) and min(b.strides[-2:]) >= 0 else self.materialise(b)
            threads, _ = tune.blas_threads_for(self, a.shape[-2], a.shape[-1], b.shape[-1], a.dtype)
        self.add(gemm.matmul(out, a, b, threads=threads), [a, b], [out])

    def _conv_tiles(self, n: int, k: int, m: int, dtype: str, min_rows: int = 2) -> bool:
        """Whether the per-image (per-group) (n x k) @ (k x m) products of a convolution use the micro-kernel."""
        return gemm.small(View(None, 0, (n, k), (k, 1), dtype), View(None, 0, (k, m), (m, 1), dtype), min_rows)

    @lowers(NN.Conv2d)
    def _conv2d(self, node, ins):
        """im2col into the arena, then out[n] = W (O, C*KH*KW) @ cols[n] as one batched GEMM (groups: per
        group, its O/g filters times its C/g channels' columns)."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        if ins[0].dtype != ins[1].dtype or ins[0].dtype != t.dtype:
            raise NotLowerable("conv2d")
        ct, (x, w) = self._compute_operands(t, ins, lambda v: v.literal is None)
        g = a["groups"]
        n, c = x.shape[:2]
        o, cg, kh, kw = w.shape
        oshape = self.shape(t)
        og, ckk, hw = o // g, cg * kh * kw, oshape[2] * oshape[3]
        wm = w if w.contiguous else self.materialise(w)
        if self._conv_tiles(og, ckk, hw, x.dtype, 2 if g == 1 else 1):
            # image by image: im2col of one image, then its product while the columns are in cache
            cols = self.fresh(None, (c, kh, kw) + oshape[2:], x.dtype)
            out = self._compute_out(t, ct)
            om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
            w2 = View(wm.buf, wm.offset, (o, ckk), (ckk, 1), wm.dtype)
            self.add(conv.conv_tiles(om, x, w2, cols, (kh, kw), a["stride"], a["pads"], a["dilation"], g),
                     [x, w2], [om, cols])
            self._store_rounded(t, out)
            return
        cols = self.fresh(None, (n, c, kh, kw) + oshape[2:], x.dtype)
        self.add(conv.im2col(cols, x, (kh, kw), a["stride"], a["pads"], a["dilation"]), [x], [cols])
        out = self._compute_out(t, ct)
        if g == 1:
            wm = View(wm.buf, wm.offset, (1, o, ckk), (0, ckk, 1), wm.dtype)
            cm = View(cols.buf, cols.offset, (n, ckk, hw), (ckk * hw, hw, 1), cols.dtype)
            om = View(out.buf, out.offset, (n, o, hw), contig_strides((n, o, hw)), out.dtype)
        else:
            wm = View(wm.buf, wm.offset, (1, g, og, ckk), (0, og * ckk, ckk, 1), wm.dtype)
            cm = View(cols.buf, cols.offset, (n, g, ckk, hw), contig_strides((n, g, ckk, hw)), cols.dtype)
            om = View(out.buf, out.offset, (n, g, og, hw), contig_strides((n, g, og, hw)), out.dtype)
        self.add(gemm.matmul(om, wm, cm), [wm, cm], [om])
        self._store_rounded(t, out)

    # float16/bfloat16 convolutions: the operands converted to float32 once (O(input + weights) against
    # the product's O(input * kernel volume)), the float32 kernels, the result rounded once on store
    def _compute_operands(self, t, ins, keep) -> tuple:
        """(compute dtype of t, the operand views in it): a view is kept when it is already in the
        compute dtype and `keep(view)` holds, else materialised (converted) into the arena."""
        ct = _dt.compute_dtype(t.dtype)
        return ct, [v if v.dtype == ct and keep(v) else self.materialise(v, ct) for v in ins]

    def _compute_out(self, t, ct: str) -> View:
        """Where a kernel computing t in `ct` writes: t's own buffer, or a float32 arena buffer."""
        return self.fresh(t) if ct == t.dtype else self.fresh(None, self.shape(t), ct)

    def _store_rounded(self, t, out: View) -> None:
        """t is `out` (rounded into a fresh buffer of t's dtype when computed in float32)."""
        if out.dtype != t.dtype:
            rounded = self.fresh(t)
            self.add(K.copy(rounded, out), [out], [rounded])
            out = rounded
        self.view[id(t)] = out

    @lowers(NN.Conv2dGradInput)
    def _conv2d_grad_input(self, node, ins):
        """gx = col2im(W_g^T @ gy_g per image and group): one batched GEMM (the micro-kernel for small
        products, else BLAS) into the arena, then a col2im kernel (split by image across threads when large)."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        if ins[0].dtype != ins[1].dtype or ins[0].dtype != t.dtype:
            raise NotLowerable("conv2d_grad_input")
        ct, (gy, w) = self._compute_operands(t, ins, lambda v: v.contiguous)
        g = a["groups"]
        n, o, oh, ow = gy.shape
        _, cg, kh, kw = w.shape
        og, ckk, hw = o // g, cg * kh * kw, oh * ow
        args = ((kh, kw), a["stride"], a["pads"], a["dilation"])
        # (measured on LeNet's second layer: a per-image kernel fusing the micro-kernel product and col2im
        # ran 1.7x slower than the batched product (micro-kernel or BLAS) followed by col2im)
        cols = self.fresh(None, (n, g, ckk, hw), ct)
        wt = View(w.buf, w.offset, (1, g, ckk, og), (0, og * ckk, 1, ckk), w.dtype)
        gm = View(gy.buf, gy.offset, (n, g, og, hw), (o * hw, og * hw, hw, 1), gy.dtype)
        self._matmul_views(cols, wt, gm)
        gx = self._compute_out(t, ct)
        self.add(conv.col2im(gx, cols, *args, (oh, ow)), [cols], [gx])
        self._store_rounded(t, gx)

    @lowers(NN.Conv2dGradWeight)
    def _conv2d_grad_weight(self, node, ins):
        """gw_g (O/g, C/g*KH*KW) = gy_g (O/g, N*OH*OW) @ rows_g: one GEMM per group over the whole batch,
        rows = im2col(x) in patch-rows layout (N*OH*OW, C*KH*KW), gy reordered to (O, N*OH*OW)."""
        from . import conv
        t, a = node.outputs[0], node.attrs
        if ins[0].dtype != ins[1].dtype or ins[0].dtype != t.dtype:
            raise NotLowerable("conv2d_grad_weight")
        ct, (x,) = self._compute_operands(t, ins[:1], lambda v: v.literal is None)
        _, (gy,) = self._compute_operands(t, ins[1:], lambda v: v.contiguous)
        g = a["groups"]
        n, c = x.shape[:2]
        kh, kw = a["kernel"]
        o, oh, ow = gy.shape[1:]
        og, kk, hw = o // g, kh * kw, oh * ow
        ckk = c // g * kk
        rows = self.fresh(None, (n * hw, c * kk), ct)
        self.add(conv.im2col(rows, x, (kh, kw), a["stride"], a["pads"], a["dilation"], (oh, ow), (kk, 1, c * kk)),
                 [x], [rows])
        if n == 1:
            gt = gy
        else:
            gt = self.fresh(None, (o, n, hw), ct)
            self.add(K.copy(gt, View(gy.buf, gy.offset, (o, n, hw), (hw, o * hw, 1), gy.dtype)), [gy], [gt])
        gw = self._compute_out(t, ct)
        self._matmul_views(View(gw.buf, gw.offset, (g, og, ckk), contig_strides((g, og, ckk)), gw.dtype),
                           View(gt.buf, gt.offset, (g, og, n * hw), (og * n * hw, n * hw, 1), gt.dtype),
                           View(rows.buf, rows.offset, (g, n * hw, ckk), (ckk, c * kk, 1), rows.dtype))
        self._store_rounded(t, gw)

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


# the backend-neutral rows (constants, views, fused bodies, scan loops, concatenate), unless overridden
# above; every op with a scalar row is an elementwise loop; the monoid reductions (by trait) that
# kernels.COMBINE can combine are reduction kernels
for _op, _fn in ROWS.items():
    PLAN.setdefault(_op, _fn)
PLAN.update({op: Plan._elementwise for op in CODE_FOR_OP})
PLAN.update({op: Plan._reduce for op in ops_with(Trait.MONOID) if op in K.COMBINE})
# rows from the other modules of this package (random draws: random.py)
load_row_modules()


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
