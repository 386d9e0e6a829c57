"""scan_hoist: move work whose result does not depend on the loop's carry out of gc.scan loops.

A scan body sees, per step, the carries, one slice of each sequence and the loop invariants. Two kinds
of per-step work are really work on whole sequences:

* **Hoist** (before the loop). A matrix product whose operands are a sequence slice (or values computed
  from slices and invariants by elementwise/movement ops) and invariants is the same product on the
  stacked sequence: an RNN's input projection x_t @ W_ih, run T times as a (N, C) @ (C, G) GEMM, is one
  (T*N, C) @ (C, G) GEMM before the loop, and the body reads its slice t as a new sequence. Elementwise
  work is hoisted only when a hoisted product needs it: in the loop it fuses into the step's kernel
  for free, outside it would cost a (T, ...) round trip through memory.
* **Sink** (after the loop). A carry that only accumulates, acc' = acc + g_t with g_t independent of
  acc (the weight gradients of back-propagation through time), is acc_T = acc_0 + sum_t g_t. When g_t is
  a product a_t @ b_t of per-step matrices, the sum is one GEMM over the stacked operands,
  (p, T*n) @ (T*n, q); when it is a sum over axes of a per-step value, one reduction of the stacked
  value. The operands that are not sequences already become per-step outputs (ys) of the loop, and the
  accumulator (a (p, q) carry copied every step) leaves the loop.

Stacked outputs nothing reads are dropped from the body too (BPTT's gradient with respect to a
sequence nobody asked for). The pass runs on optimised bodies: fused kernels are expanded back into
their ops, the body rewritten, and the new body optimised again the way the pipeline optimised the
old one (same level, same passes disabled). A carry whose history is read is never sunk."""
from __future__ import annotations

from collections import Counter

import numpy as np

from graphc import ops as F
from .. import shapes as _sh
from ..ir import Graph, Node, Tensor, Trait, constant_value, make_node
from ..ops.core import constant, placeholder
from ..ops.fused import Fused
from ..ops.linalg import MatMul
from ..ops.reduce import Sum
from ..ops.scan import Scan, inline
from ..ops.shape_ops import Concatenate, Reshape, Transpose
from .rewrite import clone, rebuild, unchanged
from .rewrite import users as rewrite_users

_ADD = F.add.op
#: movement ops with a stacked form (an axis prepended); others stop hoisting
_MOVES = (Transpose, Reshape)
_NEVER = Trait.IMPURE | Trait.RANDOM | Trait.STATE


def scan_hoist(graph: Graph, log: Counter) -> Graph:
    if not any(n.op is Scan for n in graph.nodes):   # nothing to hoist out of
        return unchanged(graph)
    used = _consumed(graph)
    mine = {id(n) for n in graph.nodes}   # a scan this pass built (offered again by rebuild) is done
    ctx = _Context(used, log, _reuse_requests(graph, used))
    ctx.transposed = _read_transposed(graph)
    return rebuild(graph, lambda node, ins: _rewrite(node, ins, ctx)
                   if node.op is Scan and id(node) in mine else None, log, "scan_hoist")


class _Context:
    def __init__(self, used: set, log: Counter, requests: dict):
        self.used, self.log, self.requests = used, log, requests
        self.transposed: set = set()   # _read_transposed
        self.memo: dict = {}      # a body shared by several scans, rewritten the same way, stays shared
        #: (id(stacked history k of a rewritten scan), id(w)) -> that scan's stacked per-step carry_k @ w;
        #: (id(sequence), id(w)) -> its hoisted product (a gradient's loop hoists the forward's x_t @ w again)
        self.exposed: dict = {}


def _read_transposed(graph: Graph) -> set:
    """ids of 2-D tensors read only through a transpose (a weight used as w.T gets its gradient so):
    a sum of products summed for one of them is computed transposed, the transpose then a free view."""
    roots = {id(t) for t in graph.roots}
    users = rewrite_users(graph)
    return {i for i, ns in users.items() if i not in roots and all(
        n.op is Transpose and tuple(n.attrs["axes"]) == (1, 0) for n in ns)}


def _reuse_requests(graph: Graph, used: set) -> dict:
    """Products a later loop would hoist that an earlier loop computes anyway: back-propagation through
    time recomputes h_t @ W_hh from the forward loop's history h_t, and the forward step computed exactly
    that product from the same carry. Returns id(forward scan) -> {(carry k, input position of W)}: the
    forward loop then also stacks its product (written straight into the stacked output, no extra work)
    and the later loop reads it instead of a GEMM over the history."""
    req: dict = {}
    for b in graph.nodes:
        if b.op is not Scan:
            continue
        lp = _Loop(b, list(b.inputs), used)
        for n in lp.hoist_plan():
            if n.op is not MatMul:
                continue
            x, w = n.inputs
            q, wo = lp.stacked.get(id(x)), lp.inv_outer.get(id(w))
            if q is None or wo is None or q.node.op is not Scan:
                continue
            s, a = q.node, q.node.attrs
            nc, ns = a["n_carry"], a["n_seq"]
            k = q.index - nc - (len(a["body"].outputs) - nc)
            pos = [i for i in range(nc + ns, len(s.inputs)) if s.inputs[i] is wo]
            if 0 <= k < nc and pos:
                req.setdefault(id(s), set()).add((k, pos[0]))
    return req


def _consumed(graph: Graph) -> set:
    used = {id(t) for t in graph.roots}
    for n in graph.nodes:
        used.update(id(t) for t in n.inputs)
    return used


def _defuse(body: Graph) -> Graph:
    """`body` with every fused node expanded into the ops of its kernel body."""
    if not any(n.op is Fused for n in body.nodes):
        return body
    env = {}
    for node in body.nodes:
        if node.op.has(Trait.LEAF):
            for o in node.outputs:
                env[id(o)] = o
            continue
        ins = [env[id(t)] for t in node.inputs]
        outs = inline(_defuse(node.attrs["body"]), ins) if node.op is Fused else clone(node, ins)
        for o, n in zip(node.outputs, outs):
            env[id(o)] = n
    return Graph(body.inputs, [env[id(t)] for t in body.outputs], name=body.name)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_sh.dims_equal(x, y) for x, y in zip(a, b))


class _Loop:
    """One scan node being rewritten: classes of the body's tensors and the new inputs/outputs."""

    def __init__(self, node: Node, ins: list, used: set, exposed: dict | None = None):
        a = node.attrs
        self.exposed = exposed if exposed is not None else {}
        self.node, self.ins, self.used = node, ins, used
        self.nc, self.ns, self.length, self.reverse = a["n_carry"], a["n_seq"], a["length"], a["reverse"]
        self.old_body = a["body"]
        self.body = body = _defuse(a["body"])
        self.ny = len(body.outputs) - self.nc
        phs = body.inputs
        self.carries, self.seqs, self.invs = phs[:self.nc], phs[self.nc:self.nc + self.ns], phs[self.nc + self.ns:]
        # class of each body tensor: "c" depends on a carry, "s" on sequences only, "i" on neither
        self.cls = {id(p): "c" for p in self.carries}
        self.cls.update({id(p): "s" for p in self.seqs})
        self.cls.update({id(p): "i" for p in self.invs})
        self.consumers: dict[int, list] = {}
        for n in body.nodes:
            if n.op.has(Trait.LEAF):
                for o in n.outputs:
                    self.cls.setdefault(id(o), "i")
                continue
            k = {self.cls[id(t)] for t in n.inputs}
            c = "c" if "c" in k else "s" if "s" in k else "i"
            for o in n.outputs:
                self.cls[id(o)] = c
            for t in n.inputs:
                self.consumers.setdefault(id(t), []).append(n)
        # outer stacked (length, ...) tensor of a body tensor that is a sequence slice
        self.stacked = {id(p): q for p, q in zip(self.seqs, ins[self.nc:self.nc + self.ns])}
        self.inv_outer = {id(p): v for p, v in zip(self.invs, ins[self.nc + self.ns:])}

    # ---- hoisting ------------------------------------------------------------------------------
    def _mappable(self, node: Node) -> bool:
        """node, applied to one step's slices, has a stacked form: seq operands gain a leading axis."""
        if node.op.has(_NEVER) or len(node.outputs) != 1:
            return False
        out = node.outputs[0]
        seq_in = [t for t in node.inputs if self.cls[id(t)] == "s"]
        if node.op is MatMul:
            return all(t.ndim >= 2 for t in node.inputs) and all(t.ndim == out.ndim for t in seq_in) \
                and all(t.ndim <= out.ndim for t in node.inputs)
        if node.op.has(Trait.ELEMENTWISE):
            return all(t.ndim == out.ndim for t in seq_in) and all(t.ndim <= out.ndim for t in node.inputs)
        return any(node.op is m for m in _MOVES) and len(node.inputs) == 1

    def hoist_plan(self) -> list[Node]:
        """Nodes to compute on the whole sequences (topological order): the sequence-only matrix
        products and the sequence-only cones that feed them."""
        ok: dict[int, bool] = {}

        def can(t: Tensor) -> bool:
            c = self.cls[id(t)]
            if c == "i" or id(t) in self.stacked:
                return True
            if c != "s":
                return False
            if id(t) not in ok:
                n = t.node
                ok[id(t)] = self._mappable(n) and all(can(u) for u in n.inputs)
            return ok[id(t)]

        chosen: set[int] = set()

        def take(t: Tensor) -> None:
            if self.cls[id(t)] != "s" or id(t) in self.stacked or id(t.node) in chosen:
                return
            chosen.add(id(t.node))
            for u in t.node.inputs:
                take(u)

        for n in self.body.nodes:
            if n.op is MatMul and self.cls[id(n.outputs[0])] == "s" and can(n.outputs[0]):
                take(n.outputs[0])
        return [n for n in self.body.nodes if id(n) in chosen]

    def outer_inv(self, t: Tensor) -> Tensor:
        """The outer tensor of an invariant body value (its computation cloned onto the invariants)."""
        if id(t) in self.inv_outer or t.node.op.has(Trait.LEAF):
            return self.outer(t)
        outs = clone(t.node, [self.outer_inv(u) for u in t.node.inputs])
        self.inv_outer[id(t)] = outs[t.index]
        return self.inv_outer[id(t)]

    def outer(self, t: Tensor) -> Tensor:
        """The outer tensor a body tensor stands for: stacked for a sequence value, as is otherwise."""
        if id(t) in self.stacked:
            return self.stacked[id(t)]
        if id(t) in self.inv_outer:
            return self.inv_outer[id(t)]
        return t   # a constant leaf

    def stack(self, node: Node) -> None:
        """Build node's stacked form outside the loop (its inputs' forms exist)."""
        out = node.outputs[0]
        ins = [self.outer(t) for t in node.inputs]
        L = self.length
        if node.op is MatMul:
            a, b = node.inputs
            if (id(ins[0]), id(ins[1])) in self.exposed:   # an earlier loop stacked this product
                res = self.exposed[(id(ins[0]), id(ins[1]))]
            elif self.cls[id(a)] == "s" and self.cls[id(b)] != "s" and b.ndim == 2:
                res = self.exposed[(id(ins[0]), id(ins[1]))] = _rows_matmul(ins[0], ins[1])
            else:
                res = make_node(MatMul, ins).outputs[0]
        elif node.op is Transpose:
            res = F.transpose(ins[0], (0,) + tuple(x + 1 for x in node.attrs["axes"]))
        elif node.op is Reshape:
            res = F.reshape(ins[0], (L,) + tuple(node.attrs["shape"]))
        else:
            res = make_node(node.op, ins, dict(node.attrs)).outputs[0]
        if not _same_shape(res.shape, (L,) + tuple(out.shape)) or res.dtype != out.dtype:
            raise _Skip("stacked form of a different type")
        self.stacked[id(out)] = res


class _Skip(Exception):
    pass


def _rows_matmul(a: Tensor, w: Tensor) -> Tensor:
    """a (L, ..., n, k) @ w (k, m) as one GEMM over every row: (L*...*n, k) @ (k, m). A leading
    transpose keeping the last axis (a time-major view of a batch-major input) is applied after the
    product instead, so the rows are read in place."""
    perm = None
    if a.node.op is Transpose and a.node.attrs["axes"][-1] == a.ndim - 1:
        perm, a = a.node.attrs["axes"], a.node.inputs[0]
    k, m = a.shape[-1], w.shape[-1]
    rows = F.reshape(F.reshape(a, (-1, k)) @ w, tuple(a.shape[:-1]) + (m,))
    return F.transpose(rows, perm) if perm is not None else rows


def _terms(t: Tensor, acc: Tensor, lp: _Loop, chain: list) -> list | None:
    """The addends of carry update `t` = acc + g1 + g2 + ... (acc exactly once; `chain` collects the
    adds that depend on acc), or None when `t` is not such a sum."""
    if t is acc:
        return []
    n = t.node
    if n.op is not _ADD or not _same_shape(n.inputs[0].shape, n.inputs[1].shape):
        return None
    dep = [_depends(u, acc) for u in n.inputs]
    if dep.count(True) != 1:
        return None
    i = dep.index(True)
    inner = _terms(n.inputs[i], acc, lp, chain)
    if inner is None:
        return None
    chain.append(n)
    return inner + _split(n.inputs[1 - i])


def _split(t: Tensor) -> list:
    """A sum of same-shaped addends as its list of addends."""
    n = t.node
    if n.op is _ADD and _same_shape(n.inputs[0].shape, n.inputs[1].shape) and _same_shape(n.inputs[0].shape, t.shape):
        return _split(n.inputs[0]) + _split(n.inputs[1])
    return [t]


def _depends(t: Tensor, on: Tensor) -> bool:
    stack, seen = [t], set()
    while stack:
        u = stack.pop()
        if u is on:
            return True
        if id(u.node) in seen:
            continue
        seen.add(id(u.node))
        stack.extend(u.node.inputs)
    return False


def _rewrite(node: Node, ins: list, ctx: _Context):
    try:
        return _Rewrite(node, ins, ctx).run(ctx.log, ctx.memo)
    except _Skip:
        return None


class _Rewrite:
    def __init__(self, node, ins, ctx: _Context):
        self.lp = _Loop(node, ins, ctx.used, ctx.exposed)
        self.node, self.ctx = node, ctx

    def run(self, log: Counter, memo: dict):
        lp, node = self.lp, self.node
        nc, ny = lp.nc, lp.ny
        body = lp.body
        outs = node.outputs
        # ---- hoist
        plan = lp.hoist_plan()
        for n in plan:
            lp.stack(n)
        hoisted = {id(n.outputs[0]) for n in plan}
        # ---- which stacked ys are read, which carries can be sunk
        live_y = [id(outs[nc + j]) in lp.used for j in range(ny)]
        ys_hoisted = [j for j in range(ny) if live_y[j] and id(body.outputs[nc + j]) in hoisted]
        # stacked ys y_t = v_t @ w (w invariant, v a loop value): v stacked by the loop, one product after it
        ysinks = {j: self._ys_product(body.outputs[nc + j]) for j in range(ny)
                  if live_y[j] and j not in ys_hoisted}
        ysinks = {j: v for j, v in ysinks.items() if v is not None}
        cand = {}    # carry k -> its addends, for the accumulators that may leave the loop
        for k in range(nc):
            if id(outs[nc + ny + k]) in lp.used:   # its history is read: keep the carry
                continue
            acc = lp.carries[k]
            chain: list = []
            terms = _terms(body.outputs[k], acc, lp, chain)
            if not terms:
                continue
            # acc is read by the chain's first add only; the chain's sums by the next add / the output only
            if len(lp.consumers.get(id(acc), [])) != 1 or any(
                    len(lp.consumers.get(id(c.outputs[0]), [])) != (1 if c is not chain[-1] else 0) for c in chain):
                continue
            if sum(o is body.outputs[k] for o in body.outputs) != 1:
                continue
            cand[k] = terms
        # products leave the loop (their operands are stacked); a sum over axes only when its operand is
        # stacked anyway (or is a piece of a stacked concatenation): in the loop it is a cheap reduction
        stacked_ids = set(lp.stacked) | {id(v) for v, _, _ in ysinks.values()}
        for terms in cand.values():
            for g in terms:
                prod = self._product_term(g)
                if prod is not None:
                    stacked_ids.update((id(prod[0]), id(prod[1])))
        sinks = {}   # carry k -> (kept addends, sunk addends)
        for k, terms in cand.items():
            sunk = [g for g in terms if self._product_term(g) is not None or self._sum_term(g, stacked_ids)]
            if sunk:
                sinks[k] = ([g for g in terms if not any(g is s for s in sunk)], sunk)
        pruned = [j for j in range(ny) if not live_y[j]]
        # products a later loop reads stacked (_reuse_requests): carry_k @ w, computed here anyway
        expose = []
        for k, pos in sorted(self.ctx.requests.get(id(node), ())):
            m = [n for n in body.nodes if n.op is MatMul and n.inputs[0] is lp.carries[k]
                 and n.inputs[1] is body.inputs[pos]]
            if m and id(outs[nc + ny + k]) in lp.used:
                expose.append((k, pos, m[0].outputs[0]))
        if not plan and not sinks and not pruned and not ysinks and not expose:
            return None
        # ---- the new body: hoisted values read as new sequences
        new_seq_phs, new_seq_outer, env = [], [], {}
        for p in body.inputs:
            env[id(p)] = p
        plan_ids = {id(n) for n in plan}
        need = {id(t) for n in body.nodes if id(n) not in plan_ids and not n.op.has(Trait.LEAF)
                for t in n.inputs} | {id(t) for t in body.outputs}
        for n in plan:
            o = n.outputs[0]
            if id(o) in need:
                ph = placeholder(f"hoisted{len(new_seq_phs)}", o.shape, o.dtype)
                env[id(o)] = ph
                new_seq_phs.append(ph)
                new_seq_outer.append(lp.stacked[id(o)])
        plan_ids = {id(n) for n in plan}

        def value(t: Tensor) -> Tensor:
            return env[id(t)] if id(t) in env else t

        # sunk accumulators: per-step operands become ys; their carry update keeps the other addends
        self.extra_ys: list[Tensor] = []      # body values stacked by the loop for the sums after it
        new_carry_out = {}
        for k, (kept, sunk) in sinks.items():
            if kept:
                total = kept[0]
                for g in kept[1:]:
                    total = F.add(total, g)
                new_carry_out[k] = F.add(lp.carries[k], total)
        for n in body.nodes:
            if n.op.has(Trait.LEAF) or id(n) in plan_ids:
                continue
            outs_new = clone(n, [value(t) for t in n.inputs])
            for o, v in zip(n.outputs, outs_new):
                env[id(o)] = v
        # carry updates of partially sunk accumulators, rebuilt over the new body's tensors
        for k, v in list(new_carry_out.items()):
            new_carry_out[k] = _remap(v, env)
        keep_c = [k for k in range(nc) if k not in sinks or sinks[k][0]]
        keep_y = [j for j in range(ny) if live_y[j] and j not in ys_hoisted and j not in ysinks]
        # per-step operands of the sunk sums and products, stacked by the loop as extra ys
        self.stack_of, extra_ys = {}, self.extra_ys
        for j, (v, w, left) in ysinks.items():
            self._register(v)
        for _k, _pos, m in expose:
            self._register(m)
        sink_specs = {k: [None] * len(sunk) for k, (_kept, sunk) in sinks.items()}
        for products in (True, False):   # products first: a sum may read a window of their operands
            for k, (_kept, sunk) in sinks.items():
                for i, g in enumerate(sunk):
                    if (self._product_term(g) is not None) == products:
                        sink_specs[k][i] = self._sink_spec(g)
        stack_of = self.stack_of
        b_outputs = ([new_carry_out.get(k, value(body.outputs[k])) for k in keep_c]
                     + [value(body.outputs[nc + j]) for j in keep_y]
                     + [value(t) for t in extra_ys])
        # sequences and invariants the new body no longer reads leave the loop (x once x @ W_ih is hoisted)
        read = {id(t) for n in Graph([], b_outputs).nodes for t in n.inputs} | {id(t) for t in b_outputs}
        ins = lp.ins
        seqs = [(p, q) for p, q in zip(list(lp.seqs) + new_seq_phs, list(ins[nc:nc + lp.ns]) + new_seq_outer)
                if id(p) in read]
        invs = [(p, v) for p, v in zip(lp.invs, ins[nc + lp.ns:]) if id(p) in read]
        b_inputs = [lp.carries[k] for k in keep_c] + [p for p, _ in seqs] + [p for p, _ in invs]
        key = (id(lp.old_body), tuple(live_y), tuple(sorted(ysinks)), tuple(e[:2] for e in expose),
               tuple((k, len(kept), len(sunk)) for k, (kept, sunk) in sinks.items()))
        if key not in memo:
            memo[key] = (lp.old_body, _reoptimise(lp.old_body, Graph(b_inputs, b_outputs, name=lp.old_body.name)))
        new_body = memo[key][1]
        s_ins = [ins[k] for k in keep_c] + [q for _, q in seqs] + [v for _, v in invs]
        attrs = dict(node.attrs, body=new_body, n_carry=len(keep_c), n_seq=len(seqs))
        nc2, ny2 = len(keep_c), len(keep_y) + len(extra_ys)
        new = make_node(Scan, s_ins, attrs).outputs if nc2 + ny2 else []
        fin = dict(zip(keep_c, new[:nc2]))
        ys = dict(zip(keep_y, new[nc2:nc2 + len(keep_y)]))
        ex = list(new[nc2 + len(keep_y):nc2 + ny2])
        hist = dict(zip(keep_c, new[nc2 + ny2:]))
        for k, pos, m in expose:
            self.ctx.exposed[(id(hist[k]), id(ins[pos]))] = self._outer_stacked(m, stack_of, ex)
        # outer stacked values of the sunk operands: a sequence (or hoisted value) or the loop's ys
        res: list = []
        for k in range(nc):
            if k in sinks:
                total = None
                for spec in sink_specs[k]:
                    get = lambda t: self._outer_stacked(t, stack_of, ex)  # noqa: E731
                    v = spec(get, True) if id(outs[k]) in self.ctx.transposed and len(sink_specs[k]) == 1 \
                        and k not in fin and spec.__name__ == "build" else spec(get)
                    total = v if total is None else F.add(total, v)
                base = fin[k] if k in fin else None if _is_zero(ins[k]) else ins[k]
                res.append(total if base is None else F.add(base, total))
            else:
                res.append(fin[k])
        for j in range(ny):
            if j in ys:
                res.append(ys[j])
            elif j in ysinks:
                v, w, left = ysinks[j]
                V, W = self._outer_stacked(v, stack_of, ex), lp.outer_inv(w)
                res.append(_rows_matmul(V, W) if left else make_node(MatMul, [W, V]).outputs[0])
            elif j in ys_hoisted:
                res.append(lp.stacked[id(body.outputs[nc + j])])
            else:
                res.append(_dead(outs[nc + j]))
        for k in range(nc):
            res.append(hist[k] if k in hist else _dead(outs[nc + ny + k]))
        log["scan_hoist: hoisted"] += len(plan)
        log["scan_hoist: sunk"] += sum(len(s[1]) for s in sinks.values())
        log["scan_hoist: dropped ys"] += len(pruned)
        log["scan_hoist: ys products"] += len(ysinks)
        return res

    # ---- sinking -----------------------------------------------------------------------------
    def _stackable(self, t: Tensor) -> bool:
        """t's per-step values can be had stacked: a sequence (or hoisted) value or any loop value
        (made a ys output); not an invariant."""
        return self.lp.cls[id(t)] in ("s", "c")

    def _product_term(self, g: Tensor):
        """(left operand's stacked source u, right operand b, a_t is u_t^T) for an addend g = a_t @ b_t
        of two 2-D loop values; else None."""
        if self.lp.cls[id(g)] == "i" or g.node.op is not MatMul:
            return None
        a, b = g.node.inputs
        if not (a.ndim == 2 and b.ndim == 2 and self._stackable(a) and self._stackable(b)):
            return None
        # a_t = u_t^T with u a 2-D per-step value: the stacked u's rows are the product's columns
        at = a.node.op is Transpose and a.node.inputs[0].ndim == 2 and self._stackable(a.node.inputs[0])
        return (a.node.inputs[0] if at else a), b, at

    def _sum_term(self, g: Tensor, stacked_ids: set) -> bool:
        """g = sum(v, axes) (maybe reshaped) with v stacked anyway, or a piece of a stacked concatenation."""
        if self.lp.cls[id(g)] == "i":
            return False
        n = g.node.inputs[0].node if g.node.op is Reshape else g.node
        if n.op is not Sum or not self._stackable(n.inputs[0]):
            return False
        v = n.inputs[0]
        return id(v) in stacked_ids or self._piece(v, stacked_ids) is not None

    def _piece(self, v: Tensor, stacked_ids: set):
        """(concatenation c, axis, start, stop) when v is c[..., start:stop, ...] of a stacked c."""
        for c in self.lp.consumers.get(id(v), []):
            if c.op is not Concatenate or id(c.outputs[0]) not in stacked_ids or sum(u is v for u in c.inputs) != 1:
                continue
            axis, start = c.attrs["axis"], 0
            for u in c.inputs:
                if u is v:
                    break
                start = start + u.shape[axis]
            if isinstance(start, int) and isinstance(v.shape[axis], int):
                return c.outputs[0], axis, start, start + v.shape[axis]
        return None

    def _sink_spec(self, g: Tensor):
        """A function building sum_t g_t outside the loop from the operands' stacked forms."""
        n = g.node
        reshape_to = None
        if n.op is Reshape:
            reshape_to, n = tuple(g.shape), n.inputs[0].node
        if n.op is MatMul:
            ua, b, at = self._product_term(g)
            self._register(ua)
            self._register(b)

            def build(get, transposed=False):
                A, B = get(ua), get(b)
                if at:          # U (L, n, p): (p, L*n)
                    left = F.transpose(F.reshape(A, (-1, A.shape[-1])))
                else:           # A (L, p, n) -> (p, L*n)
                    left = F.reshape(F.transpose(A, (1, 0, 2)), (A.shape[1], -1))
                right = F.reshape(B, (-1, B.shape[-1]))
                if transposed:  # (right^T @ left^T)^T: what reads it reads the product's own layout
                    return F.transpose(F.transpose(right) @ F.transpose(left))
                return left @ right
            return build
        v, axes = n.inputs[0], tuple(n.attrs["axis"])
        have = set(self.stack_of) | set(self.lp.stacked)
        piece = None if id(v) in have else self._piece(v, have)
        if piece is None:
            self._register(v)
        shape = reshape_to or tuple(n.outputs[0].shape)

        def build_sum(get, transposed=False):
            if piece is None:
                V = get(v)
            else:   # v_t = c_t[..., start:stop, ...]: that window of the stacked c
                c, axis, start, stop = piece
                V = get(c)[(slice(None),) * (axis + 1) + (slice(start, stop),)]
            return F.reshape(F.sum(V, (0,) + tuple(a + 1 for a in axes)), shape)
        return build_sum

    def _ys_product(self, y: Tensor):
        """(per-step operand v, invariant w, v is the left operand) when the stacked output y is a
        product of a loop value by an invariant that nothing else in the body reads; else None."""
        lp, n = self.lp, y.node
        if n.op is not MatMul or lp.consumers.get(id(y)) or sum(o is y for o in lp.body.outputs) != 1:
            return None
        a, b = n.inputs
        ca, cb = lp.cls[id(a)], lp.cls[id(b)]
        if cb == "i" and ca != "i" and b.ndim == 2 and a.ndim == y.ndim:
            return a, b, True
        if ca == "i" and cb != "i" and b.ndim == y.ndim and a.ndim <= y.ndim:
            return b, a, False
        return None

    def _register(self, t: Tensor) -> None:
        """t's per-step values are needed stacked after the loop: a sequence already, else an extra ys."""
        if id(t) not in self.lp.stacked and id(t) not in self.stack_of:
            self.stack_of[id(t)] = len(self.extra_ys)
            self.extra_ys.append(t)

    def _outer_stacked(self, t: Tensor, stack_of: dict, ex: list) -> Tensor:
        if id(t) in self.lp.stacked:
            return self.lp.stacked[id(t)]
        return ex[stack_of[id(t)]]


def _remap(t: Tensor, env: dict) -> Tensor:
    """t (built over the old body's tensors) rebuilt over their new versions in env."""
    if id(t) in env:
        return env[id(t)]
    if t.node.op.has(Trait.LEAF):
        return t
    outs = clone(t.node, [_remap(u, env) for u in t.node.inputs])
    env[id(t)] = outs[t.index]
    return env[id(t)]


def _is_zero(t: Tensor) -> bool:
    """t is all zeros by construction (BPTT starts its accumulators at zeros_like)."""
    n = t.node
    if n.op is F.zeros_like.op:
        return True
    if n.op.has(Trait.MOVEMENT) and len(n.inputs) == 1:
        return _is_zero(n.inputs[0])
    v = constant_value(t)
    return v is not None and not np.any(v)


def _dead(t: Tensor) -> Tensor:
    """A stand-in of t's type for a scan output nothing reads."""
    return F.broadcast_to(constant(0, t.dtype), t.shape)


def _reoptimise(old: Graph, new: Graph) -> Graph:
    """`new` optimised the way the pipeline optimised `old` (nothing when it did not)."""
    from .pipeline import _DONE, optimize
    key = _DONE.get(old)
    if key is None:
        return new
    level, disable = key
    return optimize(new, level, tuple(disable))
