"""ONNX RNN, GRU and LSTM (and Scan) as graphc scan loops: one loop node per direction.

Gate layouts follow the ONNX spec: LSTM W rows are [i, o, f, c], GRU [z, r, h]; B is [Wb, Rb].
The input projection X @ W^T is one matmul over the whole sequence; each step adds H @ R^T, so the
sequence length may be symbolic.
"""
from __future__ import annotations

import numpy as np

import graphc as gc
from graphc import shapes as _sh
from .onnx_ops import hard_sigmoid, op


def _activation(name: str, alpha, beta):
    table = {
        "sigmoid": gc.sigmoid, "tanh": gc.tanh, "relu": gc.relu, "softsign": lambda x: x / (gc.abs(x) + 1.0),
        "softplus": gc.softplus,
        "leakyrelu": lambda x: gc.where(gc.greater_equal(x, 0.0), x, x * (0.01 if alpha is None else alpha)),
        "thresholdedrelu": lambda x: gc.where(gc.greater(x, 1.0 if alpha is None else alpha), x, 0.0),
        "scaledtanh": lambda x: gc.tanh(x * (1.0 if beta is None else beta)) * (1.0 if alpha is None else alpha),
        "hardsigmoid": lambda x: hard_sigmoid(x, 0.2 if alpha is None else alpha, 0.5 if beta is None else beta),
        "elu": lambda x: gc.where(gc.greater(x, 0.0), x, (gc.exp(x) - 1.0) * (1.0 if alpha is None else alpha)),
        "affine": lambda x: x * (1.0 if alpha is None else alpha) + (0.0 if beta is None else beta),
    }
    if name.lower() not in table:
        raise KeyError(name)
    return table[name.lower()]


def _activations(cx, a, defaults, n_dir):
    names = a.get("activations") or defaults * n_dir
    alphas, betas = a.get("activation_alpha", []), a.get("activation_beta", [])
    out = []
    for i, nm in enumerate(names):
        try:
            out.append(_activation(nm, alphas[i] if i < len(alphas) else None, betas[i] if i < len(betas) else None))
        except KeyError:
            raise cx.unsupported(f"activation {nm!r}") from None
    k = len(defaults)
    return [out[d * k:(d + 1) * k] for d in range(n_dir)]


def _common(cx, ins, a, gates):
    """Sequence-major X, per-direction weights and initial states, and options."""
    x, w, r = ins[0], ins[1], ins[2]
    if a.get("layout", 0):
        x = gc.transpose(x, (1, 0, 2))
    seq_lens = ins[4] if len(ins) > 4 else None
    if seq_lens is not None:
        lens = cx.const(seq_lens, "sequence_lens")
        if not (isinstance(x.shape[0], int) and np.all(lens == x.shape[0])):
            raise cx.unsupported("sequence_lens shorter than the sequence (variable-length batches)")
    n_dir = w.shape[0]
    hidden = a.get("hidden_size") or r.shape[-1]
    b = ins[3] if len(ins) > 3 else None
    return x, w, r, b, n_dir, hidden


def _init_state(ins, idx, d, batch, hidden, dtype, layout):
    t = ins[idx] if len(ins) > idx else None
    if t is None:
        return None
    if layout:
        t = gc.transpose(t, (1, 0, 2))
    return t[d]


def _run(cx, ins, a, gates, defaults, step):
    x, w, r, b, n_dir, hidden = _common(cx, ins, a, gates)
    acts = _activations(cx, a, defaults, n_dir)
    batch = x.shape[1]
    layout = a.get("layout", 0)
    ys, hs, cs = [], [], []
    for d in range(n_dir):
        reverse = a.get("direction", "forward") == "reverse" or d == 1
        xw = gc.matmul(x, gc.transpose(w[d]))                 # (S, B, G*H)
        if b is not None:
            xw = xw + b[d][:gates * hidden]
        rb = b[d][gates * hidden:] if b is not None else None
        state = {"h": _init_state(ins, 5, d, batch, hidden, x.dtype, layout),
                 "c": _init_state(ins, 6, d, batch, hidden, x.dtype, layout)}
        if state["h"] is None:
            state["h"] = gc.constant(np.zeros((batch, hidden), x.dtype)) if isinstance(batch, int) else \
                gc.zeros_like(xw[0][:, :hidden])
        if state["c"] is None:
            state["c"] = gc.zeros_like(state["h"])
        fin, seq_h = _loop(cx, a, xw, state, r[d], rb, hidden, acts[d], ins, d, step, reverse)
        ys.append(seq_h)                                      # (S, B, H)
        hs.append(fin[0])
        cs.append(fin[1])
    y = gc.stack(ys, 1)                                       # (S, D, B, H)
    yh, yc = gc.stack(hs, 0), gc.stack(cs, 0)
    if layout:
        y, yh, yc = gc.transpose(y, (2, 0, 1, 3)), gc.transpose(yh, (1, 0, 2)), gc.transpose(yc, (1, 0, 2))
    return [y, yh, yc][:cx.n_out]


def _loop(cx, a, xw, state, r, rb, hidden, acts, ins, d, step, reverse):
    """One direction as one gc.scan over the time axis (ys[t] pairs with xs[t] in both directions)."""
    from graphc.ops.scan import scan_flat
    node = cx.node

    def body(carries, xs):
        st = {"h": carries[0], "c": carries[1]}
        step(cx, a, xs[0], st, r, rb, hidden, acts, ins, d)
        return [st["h"], st["c"]], [st["h"]]
    fin, ys, _ = scan_flat(body, [state["h"], state["c"]], [xw], reverse=reverse)
    cx.node = node
    return fin, ys[0]


def _gate(z, k, hidden):
    return z[:, k * hidden:(k + 1) * hidden]


def _clip(a, z):
    c = a.get("clip")
    return gc.clip(z, -c, c) if c is not None else z


def _rnn_step(cx, a, xw, st, r, rb, hidden, acts, ins, d):
    z = xw + gc.matmul(st["h"], gc.transpose(r))
    if rb is not None:
        z = z + rb
    st["h"] = acts[0](_clip(a, z))


def _gru_step(cx, a, xw, st, r, rb, hidden, acts, ins, d):
    f, g = acts
    h = st["h"]
    rz_r = gc.matmul(h, gc.transpose(r[:2 * hidden]))
    if rb is not None:
        rz_r = rz_r + rb[:2 * hidden]
    zt = f(_clip(a, _gate(xw, 0, hidden) + _gate(rz_r, 0, hidden)))
    rt = f(_clip(a, _gate(xw, 1, hidden) + _gate(rz_r, 1, hidden)))
    rh, rbh = gc.transpose(r[2 * hidden:]), (rb[2 * hidden:] if rb is not None else None)
    if a.get("linear_before_reset", 0):
        hr = gc.matmul(h, rh) + (rbh if rbh is not None else 0.0)
        ht = g(_clip(a, _gate(xw, 2, hidden) + rt * hr))
    else:
        hr = gc.matmul(rt * h, rh) + (rbh if rbh is not None else 0.0)
        ht = g(_clip(a, _gate(xw, 2, hidden) + hr))
    st["h"] = (1.0 - zt) * ht + zt * h


def _lstm_step(cx, a, xw, st, r, rb, hidden, acts, ins, d):
    f, g, hact = acts
    h, c = st["h"], st["c"]
    z = xw + gc.matmul(h, gc.transpose(r))
    if rb is not None:
        z = z + rb
    p = ins[7] if len(ins) > 7 else None
    pi, po, pf = (p[d][k * hidden:(k + 1) * hidden] for k in range(3)) if p is not None else (None,) * 3
    zi, zo, zf, zc = (_gate(z, k, hidden) for k in range(4))
    it = f(_clip(a, zi + pi * c if pi is not None else zi))
    ft = f(_clip(a, zf + pf * c if pf is not None else zf))
    if a.get("input_forget", 0):
        ft = 1.0 - it
    c = ft * c + it * g(_clip(a, zc))
    ot = f(_clip(a, zo + po * c if po is not None else zo))
    st["h"], st["c"] = ot * hact(c), c


@op("RNN")
def _rnn(cx, ins, a):
    return _run(cx, ins, a, 1, ["Tanh"], _rnn_step)


@op("GRU")
def _gru(cx, ins, a):
    return _run(cx, ins, a, 3, ["Sigmoid", "Tanh"], _gru_step)


@op("LSTM")
def _lstm(cx, ins, a):
    return _run(cx, ins, a, 4, ["Sigmoid", "Tanh", "Tanh"], _lstm_step)


@op("Scan")
def _scan(cx, ins, a):
    """ONNX Scan (opset 9+) as one gc.scan: scan axes moved to the front, reversed directions
    handled by reversing those sequences (and outputs) around a forward scan."""
    from .onnx_import import import_subgraph
    if cx.opset < 9:
        raise cx.unsupported("opset-8 Scan (batched with sequence_lens)")
    m = a["num_scan_inputs"]
    n = len(ins) - m
    body = a["body"]
    k = len(body.output) - n
    in_axes, in_dirs = a.get("scan_input_axes") or [0] * m, a.get("scan_input_directions") or [0] * m
    out_axes, out_dirs = a.get("scan_output_axes") or [0] * k, a.get("scan_output_directions") or [0] * k
    xs = []
    for x, ax, rev in zip(ins[n:], in_axes, in_dirs):
        x = _front(x, ax % x.ndim)
        xs.append(x[::-1] if rev else x)
    node = cx.node

    def step(carries, slices):
        outs = import_subgraph(cx, body, list(carries) + list(slices))
        cx.node = node
        return outs[:n], outs[n:]
    from graphc.ops.scan import scan_flat
    fin, ys, _ = scan_flat(step, list(ins[:n]), xs)
    res = []
    for y, ax, rev in zip(ys, out_axes, out_dirs):
        y = y[::-1] if rev else y
        res.append(_to_axis(y, ax % y.ndim))
    return list(fin) + res


def _front(x, ax):
    return x if ax == 0 else gc.transpose(x, (ax,) + tuple(i for i in range(x.ndim) if i != ax))


def _to_axis(y, ax):
    if ax == 0:
        return y
    perm = list(range(1, y.ndim))
    perm.insert(ax, 0)
    return gc.transpose(y, tuple(perm))


@op("If")
def _if(cx, ins, a):
    """A constant condition imports one branch; otherwise both run and gc.where picks (branches
    are pure, so that is the same result)."""
    from graphc.ir import constant_value
    from .onnx_import import import_subgraph
    node = cx.node
    c = constant_value(ins[0])
    try:
        if c is not None:
            return import_subgraph(cx, a["then_branch"] if bool(np.asarray(c).reshape(-1)[0]) else a["else_branch"], [])
        then, other = import_subgraph(cx, a["then_branch"], []), import_subgraph(cx, a["else_branch"], [])
    finally:
        cx.node = node
    cond = gc.reshape(ins[0], ())
    out = []
    for t, e in zip(then, other):
        if t.ndim != e.ndim or not all(_sh.dims_equal(p, q) for p, q in zip(t.shape, e.shape)):
            raise cx.unsupported(f"If branches of different shapes {_sh.fmt_shape(t.shape)} / {_sh.fmt_shape(e.shape)}")
        out.append(gc.where(cond, t, e))
    return out


@op("Loop")
def _loop_op(cx, ins, a):
    """A Loop with a constant trip count whose condition stays true: one gc.scan of that length."""
    from graphc.ir import constant_value
    from graphc.ops.scan import scan_flat
    from .onnx_import import import_subgraph
    if ins[0] is None:
        raise cx.unsupported("Loop without a trip count (a while loop)")
    trips = int(cx.const(ins[0], "trip count M").reshape(-1)[0])
    cond0 = constant_value(ins[1]) if len(ins) > 1 and ins[1] is not None else np.array(True)
    if cond0 is None or not bool(np.asarray(cond0).reshape(-1)[0]):
        raise cx.unsupported("Loop with a computed or false initial condition")
    body, node, carried = a["body"], cx.node, list(ins[2:])
    true = gc.constant(np.array(True))

    def step(carries, xs):
        outs = import_subgraph(cx, body, [carries[0], true] + list(carries[1:]))
        cx.node = node
        c = constant_value(outs[0])
        if c is None or not bool(np.asarray(c).reshape(-1)[0]):
            raise cx.unsupported("Loop whose condition can become false (data-dependent trip count)")
        return [carries[0] + 1] + list(outs[1:1 + len(carried)]), list(outs[1 + len(carried):])
    fin, ys, _ = scan_flat(step, [gc.constant(np.int64(0))] + carried, [], length=trips)
    cx.node = node
    return list(fin[1:]) + list(ys)


# these read names of the enclosing graph (not only their inputs): never folded at import time
_scan.reads_env = _if.reads_env = _loop_op.reads_env = True
