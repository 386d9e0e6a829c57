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

from . import gather, gemm, tune
from . import kernels as K
from .irtext import Emitter
from .lower import CODE_FOR_OP, NotLowerable
from .table import PLAN, load_row_modules, lowers
from ..schedule.views import View, collapse, contig_strides, view_getitem

#: a conv2d's elementwise epilogue (the region after a conv in a fused body: bias + ReLU, residual add +
#: ReLU) splits over the pool from this many elements, below kernels.PARALLEL_MIN: its operands are the
#: conv's fresh output (in cache-sized pieces on every core) and the pool is already awake from the conv's
#: own split. ResNet-18 batch 1 (its stem: 802,816 elements; 200,704 / 100,352 in the 56x56 / 28x28 stages)
#: on a 2-core Zen 2: W10 b1 21.7 -> 20.8 ms (medians, interleaved A/B; 2^14..2^18 alike within the noise)
CONV_EPILOGUE_PARALLEL_MIN = 1 << 16
#: ... and so does the region of a product split over the pool that was not fused into it (epilogue.py's
#: rule keeps most split products' regions apart), from this many elements: the pool is awake from the
#: product, the product's fresh output in pieces in each core's cache. On the Intel Xeon (AVX-512, 2
#: cores; in-process A/B, 20-25 interleaved rounds): W7 b16 (its projections' bias and residual regions,
#: 262k-786k elements) 6.47 -> 6.13 ms, W1 b256 0.83 -> 0.80 ms; W5, W8, W9 unchanged
PRODUCT_REGION_PARALLEL_MIN = 1 << 16


def _after_split_product(plan, ins) -> bool:
    """Whether the step planned last is a product split over the pool whose output the region reads."""
    prev = plan.steps[-1] if plan.steps else None
    product = getattr(prev, "product", None)
    return (product is not None and getattr(prev, "split", None) is not None
            and any(v.buf == product[0].buf for v in ins))


class Plan(Schedule):
    """A Schedule whose kernel steps are llvm kernels (kernels.Kernel), planned by table.PLAN."""

    table = PLAN
    backend = "llvm"
    #: parameter-only steps (a transposed or converted weight) run as a prologue, once per parameter
    #: change (program.Specialised)
    hoist_invariants = True
    #: a scan's new carries computed in the carries' own buffers when safe (schedule.plan._scan; the
    #: elementwise regions and recurrent.py's fused kernel mark themselves `per_element`)
    carry_in_place = True

    @property
    def row_parts(self) -> int:
        """A row-separable scan is split over the pool's threads by batch rows (schedule/rows.py);
        GRAPHC_LLVM_ROW_SPLIT=0 keeps every scan whole (its steps' kernels split per step instead)."""
        import os
        from . import tune
        return 1 if os.environ.get("GRAPHC_LLVM_ROW_SPLIT", "1") == "0" else tune.threads()

    def __init__(self, *args, **kw):
        #: (weight view, panel width) -> the view of its packed copy, for the weights packed so far
        self._packs: dict = {}
        super().__init__(*args, **kw)

    def copy(self, dst: View, src: View):
        return K.copy(dst, src)

    # kernels
    def _check(self, compute, ins) -> None:
        """Lower once into a scratch emitter so NotLowerable surfaces at plan time (once per distinct
        body and input dtypes: a chain of repeated layers checks one)."""
        key = K.compute_key(compute, [v.dtype for v in ins])
        checked = self.__dict__.setdefault("_checked", set())
        if key is not None and key in checked:
            return
        compute(Emitter(), [("%x", v.dtype) for v in ins])
        if key is not None:
            checked.add(key)

    def _elementwise(self, node, ins):
        """Every op with a row in the scalar table (lower.CODE_FOR_OP): one loop."""
        t = node.outputs[0]
        compute = K.op_compute(node.op, node.attrs, t.dtype)
        self._check(compute, ins)
        out = self.fresh(t)
        kern = K.elementwise([out], ins, compute)
        tune.width_for(self, kern, [out], ins, compute)
        self.add(kern, ins, [out])
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
        last = [None]   # the op of the last node planned on its own (a conv2d: the region is its epilogue)

        def flush(k):
            if cur:
                self._region(list(cur), nodes[k:], outs, as_root, after_conv=last[0] is NN.Conv2d)
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
            last[0] = n.op
        flush(len(nodes))

    def _region(self, members, later, body_outs, as_root, after_conv: bool = False):
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
        kern = K.elementwise(outs, ins, compute, hot=self._loop_pos is not None)
        kern.per_element = 0   # element i of every output from element i of every input (scan's in-place carries)
        if after_conv and kern.split is None and kern.outer >= 2 and outs[0].size >= CONV_EPILOGUE_PARALLEL_MIN:
            kern.split = kern.outer   # a conv's epilogue pass (bias, activation, residual): see the constant
        from . import conv, epilogue, recurrent   # the product planned just before, read by column windows
        live = {self.view[id(t)].buf for t in inputs if id(t) in needed}   # inputs read after the region too
        if after_conv and conv.fuse_conv_epilogue(self, outs, ins, compute, outs[0].shape, live):
            pass   # run on each image inside the convolution (conv.fuse_conv_epilogue)
        elif recurrent.fuse_epilogue(self, outs, ins, compute, kern.split is not None):
            pass   # a recurrent step's product and the gates reading it by column windows
        elif epilogue.fold(self, members, inputs, outputs, ins, outs, live):
            pass   # bias / residual adds and a ReLU in the micro-kernel's tiles
        elif not epilogue.fuse(self, outs, ins, compute, kern):
            if (kern.split is None and kern.outer >= 2 and outs[0].size >= PRODUCT_REGION_PARALLEL_MIN
                    and self._loop_pos is None and _after_split_product(self, ins)):
                kern.split = kern.outer   # the region of a split product, kept apart: see the constant
            tune.width_for(self, kern, outs, ins, compute, hot=self._loop_pos is not None)
            self.add(kern, ins, outs)   # (else run on each block of the product just before: epilogue.py)
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
        flat = _rows_collapsed(a, b)
        order = None if flat is not None or id(t) in self.root_slot or id(t) in self.into else _row_order(a, b)
        if order is not None:
            # (batch..., n, k) @ one (k, m) whose rows walk memory in another order of the leading dims (a
            # transposed activation: an ONNX export's (seq, batch, d) view of a (batch, seq, d) input): the
            # product is written in that order (its view strided to match) and is one GEMM over all rows.
            # te12 (a 12-layer TransformerEncoder from ONNX) on the 2-core Zen 2: each QKV projection
            # 600 -> ~300 us (64 two-row products before)
            shape = self.shape(t)
            lead = [shape[i] for i in order]
            buf = self.fresh(None, tuple(lead) + (shape[-1],), ct)
            strides = [0] * len(shape)
            strides[-1] = 1
            for pos, ax in enumerate(order):
                strides[ax] = buf.strides[pos]
            out = View(buf.buf, buf.offset, tuple(shape), tuple(strides), ct)
            rows = int(np.prod(shape[:-1], dtype=np.int64))
            self._matmul_views(View(buf.buf, buf.offset, (rows, shape[-1]), (shape[-1], 1), ct),
                               View(a.buf, a.offset, (rows, a.shape[-1]), (a.strides[order[-1]], a.strides[-1]),
                                    a.dtype),
                               View(b.buf, b.offset, b.shape[-2:], b.strides[-2:], b.dtype))
            self._store_rounded(t, out)
            return
        out = self.fresh(t) if ct == t.dtype else self.fresh(None, self.shape(t), ct)
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
            if not self._packed_gemv(out, a, b):
                self.add(gemm.matmul(out, a, b, blas="gemv"), [a, b], [out])
            return
        if self._packed_tiles(out, a, b):   # b a weight: packed once, the micro-kernel (gemm.PACKED_MACS)
            return
        if gemm.small(a, b) and not self._blas_instead(out, a, b):
            # small products: the micro-kernel beats BLAS's per-call overhead (LSTM steps)
            b = b if b.strides[-1] == 1 or b.shape[-1] == 1 else self.materialise(b)
            kern = gemm.matmul(out, a, b, blas="tiles")
            if self._loop_pos is not None and kern.split and (kern.threads or 0) > 1:
                # inside a loop (a recurrent cell's h @ W_hh, the same W every step): one run of column
                # blocks per thread, so each core reads the same columns of W every step (W4's 16x128x512
                # step product, 2 threads, quiet samples: ~16 us a step against ~19 with dynamic chunks)
                kern.chunks = kern.threads
            self.add(kern, [a, b], [out])
            return
        if self._packed_per_call(out, a, b):
            return
        threads = None
        if gemm.use_blas(a, b, out):
            from . import tune
            a = a if gemm.blas_layout(a) and min(a.strides[-2:]) >= 0 else self.materialise(a)
            b = b if gemm.blas_layout(b) and min(b.strides[-2:]) >= 0 else self.materialise(b)
            threads, _ = tune.blas_threads_for(self, a.shape[-2], a.shape[-1], b.shape[-1], a.dtype)
        self.add(gemm.matmul(out, a, b, threads=threads), [a, b], [out])

    def _packed_tiles(self, out: View, a: View, b: View) -> bool:
        """Plan out = a @ b on the micro-kernel with b packed in panels (gemm.pack_panels) when b is a
        weight: a parameter or constant or a value of them alone (Schedule.invariant), not one this graph's
        updates replace (a training step's: packed anew every call), one product, within gemm.packs' size
        rule; or, inside a top-level scan's body, b an input of the scan (read unchanged by every step: a
        recurrent cell's W_hh, a trained one too), packed by a step just before the loop
        (Schedule.before_loop). The packing is a step of its own that hoist_prologue moves to the prologue: run
        once, and again whenever the parameter has a new array (set_value, updates=), so the panels are never
        stale; it reads any layout (a transposed weight needs no contiguous copy first), and a weight read by
        several products is packed once. GRAPHC_LLVM_PACK=0: off. True when planned (the caller adds nothing)."""
        import os
        loop = self._loop_pos is not None
        if (os.environ.get("GRAPHC_LLVM_PACK", "1") == "0" or len(out.shape) != 2 or len(b.shape) != 2
                or b.literal is not None or not gemm.packs(a, b)):
            return False
        if loop:   # any input of the scan that the body reads unchanged (packed before the loop: in the
            # prologue when it is a weight, else once per call, for every step of the loop)
            if not (gemm.small(a, b) and b.buf in self._loop_invs):
                return False
        elif not self.invariant(b.buf, settled=True):
            return False
        n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
        nr = gemm.panel_width(n, b.dtype)
        bp = self._panels(b, nr, loop)
        if bp is None:
            return False
        kern = gemm.matmul(out, a, bp, blas="tiles", packed=True)
        if loop and kern.split and (kern.threads or 0) > 1:
            kern.chunks = kern.threads   # each core the same column blocks every step (_matmul_views)
        self.add(kern, [a, bp], [out])
        tune._note(self, f"{n}x{k}x{m} {b.dtype}: micro-kernel over the weight packed in {nr}-column panels"
                   + (", packed before the loop" if loop else "") + " (rule)")
        return True

    def _packed_gemv(self, out: View, a: View, b: View) -> bool:
        """Plan x @ W (one row; W a weight, as _packed_tiles takes it, outside loops) as a GEMV over W
        packed in panels as wide as the GEMV's blocks of output columns (pack_panels with nr = the block
        width): each thread's block of W is one contiguous run of k * width elements instead of a width-wide
        piece of every row. Only where the GEMV splits into several blocks (over the pool). On the Intel
        Xeon (AVX-512, 2 MB L2 a core; in-process A/B, 30-40 interleaved rounds) the (1 x 784) @ (784 x 512)
        layer + bias + ReLU took 10.1 us against 11.7 read in place, W1 b1 14.6 us against 23.1 (its
        512 x 256 layer packs too). GRAPHC_LLVM_PACK=0 or GRAPHC_LLVM_GEMV_PACK=0: off."""
        import os
        if (os.environ.get("GRAPHC_LLVM_PACK", "1") == "0" or os.environ.get("GRAPHC_LLVM_GEMV_PACK", "1") == "0"
                or self._loop_pos is not None or len(out.shape) != 2 or len(b.shape) != 2 or len(a.shape) != 2
                or b.literal is not None or a.shape[0] != 1):
            return False
        form = gemm.gemv_form(a, b)
        n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
        if form is None or form["kind"] != "axpy" or form["vec"] != "a" or not gemm.gemv_split(n, k, m):
            return False
        width = gemm.gemv_block(form, True)
        if width >= m or not self.invariant(b.buf, settled=True):
            return False
        bp = self._panels(b, width)
        self.add(gemm.matmul(out, a, bp, blas="gemv", packed=True), [a, bp], [out])
        return True

    def _panels(self, b: View, nr: int, loop: bool = False) -> View | None:
        """The (k, m) view of b packed in nr-column panels (gemm.pack_panels' layout): one packing step per
        weight and panel width, shared by every product reading it (self._packs); in a loop (a recurrent
        step's h @ W_hh, W_hh an input of the scan) packed once before it (Schedule.before_loop; None when
        that cannot be planned), for this loop only when b is computed each call."""
        k, m = b.shape[-2], b.shape[-1]
        key = (b.buf, b.offset, b.shape, b.strides, nr)
        if loop and not self.invariant(b.buf, settled=True):
            key += (self._loop_serial,)
        pk = self._packs.get(key)
        if pk is None:
            pk = self.fresh(None, (gemm.packed_size(k, m, nr),), b.dtype)
            step = gemm.pack_panels(pk, b, nr)
            if loop:
                if not self.before_loop(step, [b], [pk]):
                    return None
            else:
                self.add(step, [b], [pk])
            self._packs[key] = pk
        return View(pk.buf, pk.offset, (k, m), (nr, 1), b.dtype)

    def _packed_per_call(self, out: View, a: View, b: View) -> bool:
        """Plan out = a @ b, a product the size rules give to BLAS (neither a packed weight's nor a small
        one), as a packing of b into the micro-kernel's panels every call (gemm.pack_panels, split over the
        pool) and the micro-kernel over them, when the tuner found that faster than BLAS for this shape on
        this CPU model (tune.packed_for; with the tuner off: BLAS). One product (2-D), outside loops, b's
        rows contiguous (a transposed b is read down its columns by the packing: BLAS reads it in place),
        at least tune.PACKED_CALL_FLOPS and PACKED_CALL_ROWS. GRAPHC_LLVM_PACK=0 or a forced
        GRAPHC_LLVM_SMALL_GEMM: never; GRAPHC_LLVM_PACK=always: every such product from two rows and eight
        columns, untimed (the tests' way to the kernels on every host). True when planned."""
        import os
        from . import tune
        switch = os.environ.get("GRAPHC_LLVM_PACK", "1").strip().lower()
        if (switch == "0" or self._loop_pos is not None
                or os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto") != "auto"
                or len(out.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2 or b.literal is not None
                or a.literal is not None or not gemm.use_blas(a, b, out)):
            return False
        # b's rows contiguous, or its columns (W^T, packed lanes x lanes blocks at a time: gemm.TRANSPOSED_PACK);
        # any other transposed b is read by BLAS in place
        transposed = b.strides[-1] != 1
        if transposed and not (b.strides[-2] == 1 and gemm.TRANSPOSED_PACK):
            return False
        n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
        if n < 2 or m < 8 or (switch != "always" and (n < tune.PACKED_CALL_ROWS
                                                       or 2 * n * k * m < tune.PACKED_CALL_FLOPS)):
            return False
        take, source = (True, "forced") if switch == "always" else tune.packed_for(self, n, k, m, a.dtype,
                                                                                   transposed)
        if not take:
            return False
        nr = gemm.panel_width(n, b.dtype)
        pk = self.fresh(None, (gemm.packed_size(k, m, nr),), b.dtype)
        packing = gemm.pack_panels(pk, b, nr, split=True)
        bp = View(pk.buf, pk.offset, (k, m), (nr, 1), b.dtype)
        if gemm.packs_inside(n, k, m, a.dtype, tune.threads()):   # each run of column blocks packs its own
            # panels (gemm.matmul's `pack`)
            self.add(gemm.matmul(out, a, bp, blas="tiles", packed=True, pack=packing), [a, b], [out, bp])
        else:
            self.add(packing, [b], [pk])
            self.add(gemm.matmul(out, a, bp, blas="tiles", packed=True), [a, bp], [out])
        tune._note(self, f"{n}x{k}x{m} {b.dtype}: micro-kernel over b packed in {nr}-column panels every call "
                   f"({source})")
        return True

    def _drop_since(self, mark) -> set:
        gone = super()._drop_since(mark)
        # a dropped packing step's buffer holds nothing: the products planned next pack again (the packs made
        # before the mark stay, and within a loop body those made before the loop)
        self._packs = {key: v for key, v in self._packs.items() if v.buf not in gone}
        return gone

    def _blas_instead(self, out: View, a: View, b: View) -> bool:
        """A single product the size rule gives the micro-kernel, outside loops, with BLAS at hand: the tuner
        times both on this CPU model (tune.kernel_for) and may take BLAS (narrow outputs on Zen 1)."""
        import os
        if (self._loop_pos is not None or len(out.shape) != 2 or not gemm.use_blas(a, b, out)
                or os.environ.get("GRAPHC_LLVM_SMALL_GEMM", "auto") != "auto"):
            return False
        from . import tune
        return tune.kernel_for(self, a.shape[-2], a.shape[-1], b.shape[-1], a.dtype)[0] == "blas"

    def _conv_tiles(self, n: int, k: int, m: int, dtype: str, min_rows: int = 2) -> bool:
        """Whether the per-image (per-group) (n x k) @ (k x m) products of a convolution use the micro-kernel."""
        return gemm.small(View(None, 0, (n, k), (k, 1), dtype), View(None, 0, (k, m), (m, 1), dtype), min_rows)

    @lowers(NN.Conv2d)
    def _conv2d(self, node, ins):
        """conv2d (conv.plan_conv2d: micro-kernel per image, one-thread BLAS over blocks, split by slot)."""
        from . import conv
        conv.plan_conv2d(self, node, ins)

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
        """conv2d_grad_input (conv.plan_conv2d_grad_input: per image product + col2im by slot)."""
        from . import conv
        conv.plan_conv2d_grad_input(self, node, ins)

    @lowers(NN.Conv2dGradWeight)
    def _conv2d_grad_weight(self, node, ins):
        """conv2d_grad_weight (conv.plan_conv2d_grad_weight: per image im2col + dot micro-kernel by slot)."""
        from . import conv
        conv.plan_conv2d_grad_weight(self, node, ins)

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


def _row_order(a: View, b: View) -> list | None:
    """The order of a's leading dims (batch..., n) by decreasing stride when, in that order, they walk
    memory as one stride (a's rows are then one matrix) and b has no batch of its own; else None."""
    if len(a.shape) < 3 or a.literal is not None or any(s for s in b.strides[:-2]) or a.size == 0:
        return None
    if np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) != tuple(a.shape[:-2]):
        return None
    lead = len(a.shape) - 1
    if any(a.shape[i] == 1 for i in range(lead)) or any(s < 0 for s in a.strides):
        return None
    order = sorted(range(lead), key=lambda i: -a.strides[i])
    dims, (st,) = collapse([a.shape[i] for i in order], [[a.strides[i] for i in order]])
    if len(dims) != 1 or order == list(range(lead)):
        return None
    return order


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
