"""gc.scan: a loop over the leading axis of sequences with a carried state (JAX's `lax.scan`).

    final_carry, ys = gc.scan(step, init, xs)        # step(carry, x) -> (new_carry, y)

means, in NumPy terms,

    carry, ys = init, []
    for x in xs:                                     # xs[::-1] when reverse=True
        carry, y = step(carry, x)
        ys.append(y)
    return carry, stack(ys)                          # ys[t] always pairs with xs[t]

`init`, `xs` and the step's outputs may be a tensor, None, or nested tuples/lists/dicts of tensors.
The step function is traced ONCE into a body Graph, so an RNN over 1000 steps is one `scan` node.
Tensors the step reads from outside (weights, other inputs) are captured automatically, and
loop-invariant work the step does on them (a transpose, a bias broadcast) is hoisted out of the loop.
The optimiser's scan_hoist pass (graphc/passes/scan_hoist.py) goes further on the traced body: products
of a sequence slice by invariants (x_t @ W) run once on the whole sequence before the loop, and
accumulators acc + a_t @ b_t (the weight gradients of BPTT) become one product after it.

Node contract (backends may rely on it):
  node.inputs   [*init carries, *sequences (length, ...), *captured loop invariants]
  node.attrs    body (Graph: placeholders for one carry each, one slice of each sequence, each
                invariant; outputs: the new carries then the per-step ys), n_carry, n_seq,
                reverse, length (int or sympy dim: the trip count)
  node.outputs  [*final carries, *stacked ys (length, ...), *carry history (length, ...)]
                where history[t] is the carry that entered the step reading xs[t] (what
                back-propagation through time needs; users get it through gc.scan's `history=`).
Zero-length loops are defined: the final carry is `init`, ys and history have leading dim 0.
Gradients: reverse mode is back-propagation through time as a second `scan` running the other
way over the stored history (its body is the gradient of the step body), so it can itself be
differentiated again. Forward mode is a scan in the same direction over the history carrying the
carry's tangent (its body is gc.jvp of the step body).
Random draws inside the step do not depend on the step, so they are hoisted like any invariant:
one draw per call shared by every step (dropout's "same mask at every step"); for a fresh draw per
step, draw (length, ...) outside and pass it in xs.
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable

import numpy as np

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import GraphcError, ShapeError
from ..ir import Graph, Node, Op, Tensor, Trait, hook, make_node, register, toposort
from ..reference import Interpreter
from .core import as_tensor, placeholder


# ---- tiny pytrees: tensors in nested tuples/lists/dicts ------------------------------------------

def _flatten(tree) -> tuple[list, Any]:
    """(leaves, structure); a leaf is anything that is not a tuple, list, dict or None."""
    if tree is None:
        return [], None
    if isinstance(tree, (tuple, list)):
        leaves, defs = [], []
        for e in tree:
            lv, d = _flatten(e)
            leaves += lv
            defs.append(d)
        return leaves, (type(tree), tuple(defs))
    if isinstance(tree, dict):
        keys = sorted(tree)
        leaves, d = _flatten([tree[k] for k in keys])
        return leaves, (dict, tuple(keys), d)
    return [tree], "*"


def _unflatten(tdef, leaves: list):
    return _build(tdef, iter(leaves))


def _build(tdef, it):
    if tdef is None:
        return None
    if tdef == "*":
        return next(it)
    if tdef[0] is dict:
        vals = _build(tdef[2], it)
        return dict(zip(tdef[1], vals))
    kind, defs = tdef
    vals = [_build(d, it) for d in defs]
    return tuple(vals) if kind is tuple else vals


# ---- tracing the step into a body graph --------------------------------------------------------

def _rebuild(node: Node, inputs: list[Tensor]) -> tuple[Tensor, ...]:
    """`node` applied to `inputs` of the same types, keeping attrs, names and the user's line."""
    new = Node(node.op, inputs, node.attrs, node.loc)
    new.outputs = tuple(Tensor(new, i, o.shape, o.dtype, o.name) for i, o in enumerate(node.outputs))
    return new.outputs


def _variant(nodes: list[Node], phs: list[Tensor]) -> set[int]:
    """ids of tensors that depend on the loop placeholders `phs`."""
    var = {id(p) for p in phs}
    for node in nodes:
        if any(id(t) in var for t in node.inputs):
            var.update(id(o) for o in node.outputs)
    return var


def _close(phs: list[Tensor], outs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    """Body graph over `phs` + placeholders for the loop invariants the step read; returns it and
    those invariants (outer tensors, in order). Invariant subexpressions stay outside the loop."""
    nodes = toposort(outs)
    var = _variant(nodes, phs)
    env = {id(p): p for p in phs}
    consts: list[Tensor] = []

    def lift(t: Tensor) -> Tensor:
        if id(t) not in env:
            if t.node.op.has(Trait.CONST):
                env[id(t)] = t  # constants live in the body (scalars become immediates)
            else:
                env[id(t)] = placeholder(f"inv{len(consts)}", t.shape, t.dtype)
                consts.append(t)
        return env[id(t)]

    for node in nodes:
        if not any(id(o) in var for o in node.outputs) or node.op.has(Trait.LEAF):
            continue
        for o, n in zip(node.outputs, _rebuild(node, [env[id(t)] if id(t) in var else lift(t)
                                                     for t in node.inputs])):
            env[id(o)] = n
    body_outs = [env[id(t)] if id(t) in var else lift(t) for t in outs]
    inv_phs = [env[id(t)] for t in consts]
    return Graph(list(phs) + inv_phs, body_outs, name="scan_body"), consts


def _check_carry(new: list[Tensor], init: list[Tensor]) -> None:
    if len(new) != len(init):
        raise GraphcError(f"scan: the step returned {len(new)} carry tensors, init has {len(init)}")
    for i, (n, c) in enumerate(zip(new, init)):
        if n.dtype != c.dtype or len(n.shape) != len(c.shape) or not all(
                _sh.dims_equal(a, b) for a, b in zip(n.shape, c.shape)):
            raise ShapeError(f"scan: the step returned carry {i} as {n.type_str}, but init {i} is "
                             f"{c.type_str}; the carry must keep its shape and dtype (cast init or the new carry)")


def _trace(step_flat: Callable, init: list[Tensor], xs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    """Trace `step_flat(carry_phs, x_phs) -> (new_carries, ys)` once into (body, invariants)."""
    c_phs = [placeholder(f"carry{i}", c.shape, c.dtype) for i, c in enumerate(init)]
    x_phs = [placeholder(f"x{i}", x.shape[1:], x.dtype) for i, x in enumerate(xs)]
    new, ys = step_flat(c_phs, x_phs)
    new = [as_tensor(t) for t in new]
    ys = [as_tensor(t) for t in ys]
    _check_carry(new, init)
    if not new and not ys:
        raise GraphcError("scan: the step returns neither a carry nor an output")
    return _close(c_phs + x_phs, new + ys)


def inline(body: Graph, args: list[Tensor]) -> list[Tensor]:
    """The body's outputs computed from `args` (tensors standing for body.inputs) as ordinary nodes."""
    env = {id(p): a for p, a in zip(body.inputs, args)}
    for node in body.nodes:
        if node.op.has(Trait.LEAF):
            for o in node.outputs:
                env.setdefault(id(o), o)
            continue
        for o, n in zip(node.outputs, _rebuild(node, [env[id(t)] for t in node.inputs])):
            env[id(o)] = n
    return [env[id(t)] for t in body.outputs]


# ---- the op -----------------------------------------------------------------------------------

_INTERPRETERS: "weakref.WeakKeyDictionary[Graph, Any]" = weakref.WeakKeyDictionary()


def _interpreter(body: Graph):
    """The body ordered once for the reference interpreter; reused by every call and step."""
    it = _INTERPRETERS.get(body)
    if it is None:
        it = _INTERPRETERS[body] = Interpreter(body)
    return it


def _bind(phs: list[Tensor], shapes: list[tuple], dims: dict | None) -> dict:
    """Symbolic dim values for the body: the caller's, plus any read off the body's input shapes."""
    out = dict(dims or {})
    for p, shape in zip(phs, shapes):
        for d, n in zip(p.shape, shape):
            if not isinstance(d, int) and d.is_Symbol:
                out.setdefault(d.name, n)
    return out


class _Recycler(threading.local):
    """Stacked outputs (T, ...) recycled across calls once nothing else references them: a fresh
    multi-megabyte array per call costs a page fault per 4 KiB on first touch, often more than the loop."""

    KEEP = 4  # arrays kept per (shape, dtype) and thread

    def __init__(self):
        self.free: dict = {}

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        pool = self.free.setdefault((shape, np.dtype(dtype).str), [])
        for i in range(len(pool)):
            if sys.getrefcount(pool[i]) == 2:  # only this pool (and the call's argument) holds it
                return pool[i]
        a = np.empty(shape, dtype)
        if len(pool) < self.KEEP:
            pool.append(a)
        return a


_stacks = _Recycler()


def _eval(shape, dims: dict) -> tuple[int, ...]:
    try:
        return _sh.evaluate(shape, {_sh.dim_symbol(k): v for k, v in dims.items()})
    except ShapeError as e:
        raise ShapeError(f"scan: {e}; bind it through an input of the function") from None


@register
class Scan(Op):
    traits = Trait.CONTROL
    name = "scan"
    n_outputs = -1
    needs_dims = True

    def infer(self, inputs, body: Graph, n_carry: int, n_seq: int, reverse: bool, length):
        if len(inputs) != len(body.inputs):
            raise ShapeError(f"scan: {len(inputs)} inputs for a body of {len(body.inputs)}")
        for i, (t, p) in enumerate(zip(inputs, body.inputs)):
            shape = t.shape[1:] if n_carry <= i < n_carry + n_seq else t.shape
            if t.dtype != p.dtype or len(shape) != len(p.shape) or not all(
                    _sh.dims_equal(a, b) for a, b in zip(shape, p.shape)):
                raise ShapeError(f"scan: input {i} is {t.type_str}, the body expects {p.type_str} per step")
            if n_carry <= i < n_carry + n_seq and not _sh.dims_equal(t.shape[0], length):
                raise ShapeError(f"scan: sequence {i - n_carry} has length {t.shape[0]}, expected {length}")
        outs = body.outputs
        return ([(o.shape, o.dtype) for o in outs[:n_carry]] +
                [((length,) + o.shape, o.dtype) for o in outs[n_carry:]] +
                [((length,) + o.shape, o.dtype) for o in outs[:n_carry]])

    def impl(self, *args, body: Graph, n_carry: int, n_seq: int, reverse: bool, length, dims=None):
        return self.loop(_interpreter(body).run, args, body, n_carry, n_seq, reverse, length, dims)

    def loop(self, step: Callable, args, body: Graph, n_carry: int, n_seq: int, reverse: bool, length, dims=None):
        """The loop of a scan node with inputs `args`; `step(body input values, dims) -> body output values`
        runs the body once (the reference interpreter here; a backend may pass its compiled body)."""
        carries = list(args[:n_carry])
        seqs = args[n_carry:n_carry + n_seq]
        invs = list(args[n_carry + n_seq:])
        dims = _bind(body.inputs, [c.shape for c in carries] + [s.shape[1:] for s in seqs]
                     + [v.shape for v in invs], dims)
        T = seqs[0].shape[0] if seqs else _eval((length,), dims)[0]
        outs = body.outputs
        ys = [_stacks.empty((T,) + _eval(o.shape, dims), o.dtype) for o in outs[n_carry:]]
        hist = [_stacks.empty((T,) + c.shape, c.dtype) for c in carries]
        for i in range(T):
            t = T - 1 - i if reverse else i
            for h, c in zip(hist, carries):
                h[t] = c
            res = step(carries + [s[t] for s in seqs] + invs, dims)
            carries = res[:n_carry]
            for y, r in zip(ys, res[n_carry:]):
                y[t] = r
        # a carry the loop never replaced (zero steps, or a pass-through) must not alias an input
        carries = [np.array(c) if any(c is x for x in args) else c for c in carries]
        return tuple(carries + ys + hist)

    @staticmethod
    def display_name(node: Node) -> str:
        members = [n.op.name for n in node.attrs["body"].compute_nodes()]
        shown = members[:8] + (["..."] if len(members) > 8 else [])
        return f"scan[{','.join(shown)}]"

    def vjp(self, node, gouts):
        return _bptt(node, gouts)

    def jvp(self, node, tangents):
        return _forward_tangents(node, tangents)


# ---- back-propagation through time ------------------------------------------------------------

def _bptt(node: Node, gouts: list) -> list:
    """Gradients of a scan node: a scan running the other way over the history; its body is the
    gradient of the step body (recomputed from the stored carry), accumulating the invariants'."""
    a = node.attrs
    body, nc, ns = a["body"], a["n_carry"], a["n_seq"]
    ny = len(body.outputs) - nc
    init, seqs, invs = node.inputs[:nc], node.inputs[nc:nc + ns], node.inputs[nc + ns:]
    g_fin, g_ys, g_hist = gouts[:nc], gouts[nc:nc + ny], gouts[nc + ny:]
    fc = [k for k in range(nc) if _dt.is_float(init[k].dtype)]
    fs = [i for i in range(ns) if _dt.is_float(seqs[i].dtype)]
    fk = [i for i in range(len(invs)) if _dt.is_float(invs[i].dtype)]
    gy = [j for j in range(ny) if g_ys[j] is not None]
    gh = [k for k in fc if g_hist[k] is not None]
    hist = list(node.outputs[nc + ny:])
    ct0 = [g_fin[k] if g_fin[k] is not None else F.zeros_like(init[k]) for k in fc]
    acc0 = [F.zeros_like(invs[i]) for i in fk]
    bxs = hist + list(seqs) + [g_ys[j] for j in gy] + [g_hist[k] for k in gh]

    def step(carry, xs):
        ct, acc = carry[:len(fc)], carry[len(fc):]
        h_t, x_t = xs[:nc], xs[nc:nc + ns]
        gy_t, gh_t = xs[nc + ns:nc + ns + len(gy)], xs[nc + ns + len(gy):]
        outs = inline(body, list(h_t) + list(x_t) + list(invs))
        known: dict = {}
        for t, g in [(outs[k], c) for k, c in zip(fc, ct)] + [(outs[nc + j], g) for j, g in zip(gy, gy_t)]:
            known[t] = known[t] + g if t in known else g
        wrt = [h_t[k] for k in fc] + [x_t[i] for i in fs] + [invs[i] for i in fk]
        # invariants are independent leaves here: one invariant computed from another must not
        # pass its gradient on (the outer backprop does that)
        grads = _grad(None, wrt, consider_constant=list(invs), known_grads=known, disconnected="zero")
        g_h = grads[:len(fc)]
        for k, g in zip(gh, gh_t):
            g_h[fc.index(k)] = g_h[fc.index(k)] + g
        g_inv = grads[len(fc) + len(fs):]
        return list(g_h) + [s + g for s, g in zip(acc, g_inv)], grads[len(fc):len(fc) + len(fs)]

    if not fc and not fs and not fk:
        return [None] * len(node.inputs)
    fin, g_xs, _ = scan_flat(step, ct0 + acc0, bxs, a["length"], not a["reverse"])
    res: list = [None] * len(node.inputs)
    for k, g in zip(fc, fin[:len(fc)]):
        res[k] = g
    for i, g in zip(fs, g_xs):
        res[nc + i] = g
    for i, g in zip(fk, fin[len(fc):]):
        res[nc + ns + i] = g
    return res


def _forward_tangents(node: Node, tangents: list) -> list:
    """Tangents of a scan node's outputs: a scan over the history whose carry is the carry's tangent."""
    a = node.attrs
    body, nc, ns = a["body"], a["n_carry"], a["n_seq"]
    ny = len(body.outputs) - nc
    init, seqs, invs = node.inputs[:nc], node.inputs[nc:nc + ns], node.inputs[nc + ns:]
    t_init, t_seq, t_inv = tangents[:nc], tangents[nc:nc + ns], tangents[nc + ns:]
    fc = [k for k in range(nc) if _dt.is_float(init[k].dtype)]
    ts = [i for i in range(ns) if t_seq[i] is not None]
    tk = [i for i in range(len(invs)) if t_inv[i] is not None]
    fy = [j for j in range(ny) if _dt.is_float(body.outputs[nc + j].dtype)]
    hist = list(node.outputs[nc + ny:])

    def step(dc, xs):
        h_t, x_t, dx_t = xs[:nc], xs[nc:nc + ns], xs[nc + ns:]
        outs = inline(body, list(h_t) + list(x_t) + list(invs))
        wrt = [h_t[k] for k in fc] + [x_t[i] for i in ts] + [invs[i] for i in tk]
        tans = list(dc) + list(dx_t) + [t_inv[i] for i in tk]
        touts = _jvp([outs[k] for k in fc] + [outs[nc + j] for j in fy], wrt, tans) if wrt else []
        return touts[:len(fc)], touts[len(fc):]

    dc0 = [t_init[k] if t_init[k] is not None else F.zeros_like(init[k]) for k in fc]
    fin, dys, dhist = scan_flat(step, dc0, hist + list(seqs) + [t_seq[i] for i in ts], a["length"], a["reverse"])
    res: list = [None] * len(node.outputs)
    for k, d, dh in zip(fc, fin, dhist):
        res[k], res[nc + ny + k] = d, dh
    for j, d in zip(fy, dys):
        res[nc + j] = d
    return res


def _jvp(*args):
    return hook("jvp")(*args)  # graphc.autodiff (ops never import the transforms above them)


def _grad(*args, **kw):
    return hook("grad")(*args, **kw)


# ---- public constructors ----------------------------------------------------------------------

def scan_flat(step_flat: Callable, init: list[Tensor], xs: list[Tensor], length=None, reverse: bool = False):
    """scan over flat lists: `step_flat(carries, x_slices) -> (new_carries, ys)`; returns
    (final carries, stacked ys, carry history) as lists of tensors."""
    init = [as_tensor(t) for t in init]
    xs = [as_tensor(t) for t in xs]
    length = _length(xs, length)
    body, invs = _trace(step_flat, init, xs)
    attrs = dict(body=body, n_carry=len(init), n_seq=len(xs), reverse=bool(reverse), length=length)
    outs = make_node(Scan, init + xs + invs, attrs).outputs
    nc, ny = len(init), len(body.outputs) - len(init)
    return list(outs[:nc]), list(outs[nc:nc + ny]), list(outs[nc + ny:])


def _length(xs: list[Tensor], length):
    """The trip count: the sequences' common leading dim, or `length` (which they must match)."""
    for i, x in enumerate(xs):
        if x.ndim == 0:
            raise ShapeError(f"scan: sequence {i} ({x.label}) is 0-d; sequences are scanned along axis 0")
    if length is None and not xs:
        raise GraphcError("scan: give xs (sequences) or length= (the number of steps)")
    n, what = (_sh.canon_dim(length), "length=") if length is not None else (xs[0].shape[0], "sequence 0 has ")
    for i, x in enumerate(xs):
        if not _sh.dims_equal(x.shape[0], n):
            raise ShapeError(f"scan: sequence {i} ({x.label}) has length {x.shape[0]}, but {what}{n}")
    return n


def scan(step: Callable, init=None, xs=None, length=None, reverse: bool = False, history: bool = False):
    """Loop `step(carry, x) -> (new_carry, y)` over the leading axis of `xs`; returns
    (final_carry, ys) with ys stacked along a new axis 0 (JAX's lax.scan, see the module docstring).

    `init`/`xs`/outputs: a tensor, None, or nested tuples/lists/dicts of tensors. `length` gives the
    trip count when there are no xs (an int or a dim name). `reverse=True` runs from the end;
    ys[t] still pairs with xs[t]. `history=True` also returns the carry entering each step.
    """
    c_leaves, c_def = _flatten(init)
    x_leaves, x_def = _flatten(xs)
    y_def = []

    def step_flat(c_phs, x_phs):
        out = step(_unflatten(c_def, c_phs), _unflatten(x_def, x_phs))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise GraphcError(f"scan: the step must return (new_carry, y), got {type(out).__name__}")
        new, nd = _flatten(out[0])
        if nd != c_def:
            raise GraphcError(f"scan: the step's new carry has structure {nd}, init has {c_def}")
        ys, yd = _flatten(out[1])
        y_def.append(yd)
        return new, ys

    fin, ys, hist = scan_flat(step_flat, c_leaves, x_leaves, length, reverse)
    res = (_unflatten(c_def, fin), _unflatten(y_def[0], ys))
    return res + (_unflatten(c_def, hist),) if history else res
