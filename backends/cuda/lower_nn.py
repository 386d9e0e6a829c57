"""Convolution and max pooling kernels (NCHW). conv2d and its weight gradient are implicit GEMMs
on the tiled GEMM skeleton (the im2col matrix is never stored: the A/B tile loaders compute the
input coordinates); the input gradient is a gather per input element; max pooling routes through
the first maximum of each window (PyTorch's tie rule, as in the NumPy reference). float16/bfloat16
operands are loaded as floats and accumulated in float, the result rounded once on store."""
from __future__ import annotations

from graphc.ops.attention import ScaledDotProductAttention, composition_body
from graphc.ops import layernorm as _layernorm
from graphc.ops.nn_ops import Conv2d, Conv2dGradInput, Conv2dGradWeight, MaxPool2d, MaxPool2dGrad, MaxPool2dSelect
from graphc.backends.schedule.views import product
from . import kernels as K
from .cexpr import cmul
from .lower import Params, lowers
from .prelude import VALUE_TYPES, load, store


def _inputs(s, node, ins):
    """(Params, dense input views): the templates index whole row-major buffers."""
    P = Params(s)
    vs = [s.dense(v) for v in ins]
    return P, vs, [(P(v), v.dtype) for v in vs]


def _output(s, P, t):
    out = s.fresh(t)
    s.view[id(t)] = out
    return out, (P(out, write=True), t.dtype)


def _pointwise(s, kind, comment, P, out, element):
    loop_c = s.shape_c(out.shape)
    s.launch(kind, lambda k: K.pointwise(k, comment, loop_c, P.ins(), P.outs(), element), P,
             K.grid_1d(lambda ev: ev(product(out.shape))), (K.THREADS, 1, 1), False)


def _conv_dims(s, x_shape, w_shape, y_shape, attrs):
    """Named C expressions for the convolution's sizes (runtime ones come from GcDims)."""
    d = s.c
    g = attrs["groups"]
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    (ph, _), (pw, _) = attrs["pads"]
    o, cg, kh, kw = w_shape
    return dict(N=d(x_shape[0]), C=d(x_shape[1]), H=d(x_shape[2]), W=d(x_shape[3]), O=o, Cg=cg, Og=o // g,
                KH=kh, KW=kw, OH=d(y_shape[2]), OW=d(y_shape[3]), SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, G=g)


def _im2col_lines(z, x, row, col, ind, dtype):
    """`v` = padded input value at im2col position (row: n, oh, ow; col: c, kh, kw) of group g (x of `dtype`)."""
    xv = load(f"{x}[((n_ * {z['C']} + g * {z['Cg']} + c) * {z['H']} + ih) * {z['W']} + iw]", dtype)
    return [f"{ind}const long long n_ = {row} / ({z['OH']} * {z['OW']}), oh = ({row} / {z['OW']}) % {z['OH']}, "
            f"ow = {row} % {z['OW']};",
            f"{ind}const long long c = {col} / {z['KH'] * z['KW']}, kh = ({col} / {z['KW']}) % {z['KH']}, "
            f"kw = {col} % {z['KW']};",
            f"{ind}const long long ih = oh * {z['SH']} - {z['PH']} + kh * {z['DH']}, "
            f"iw = ow * {z['SW']} - {z['PW']} + kw * {z['DW']};",
            f"{ind}if (ih >= 0 && ih < {z['H']} && iw >= 0 && iw < {z['W']})",
            f"{ind}  v = {xv};"]


@lowers(Conv2d)
def conv2d(s, node, ins) -> None:
    y = node.outputs[0]
    P, (x, w), (xa, wa) = _inputs(s, node, ins)
    yv, out = _output(s, P, y)
    z = _conv_dims(s, x.shape, w.shape, yv.shape, node.attrs)
    kk = z["Cg"] * z["KH"] * z["KW"]
    m = cmul(z["N"], cmul(z["OH"], z["OW"]))
    ind = "          "
    st = [f"      const long long n_ = row / ({z['OH']} * {z['OW']}), p = row % ({z['OH']} * {z['OW']});",
          f"      {out[0]}[(n_ * {z['O']} + g * {z['Og']} + col) * ({z['OH']} * {z['OW']}) + p] = {store('acc', y.dtype)};"]
    wv = load(f"{wa[0]}[(g * {z['Og']} + cc) * {kk} + q]", w.dtype)
    comment = f"conv2d {_ts(x)} * {_ts(w)} -> {_ts(yv)}: implicit GEMM per group"
    s.launch("conv", lambda k: K.gemm_kernel(
        k, comment, [xa, wa], [out], y.dtype, m, z["Og"], kk, z["G"], ["    const long long g = bz;"],
        _im2col_lines(z, xa[0], "r", "q", ind, x.dtype),
        [f"{ind}v = {wv};"], st),
        P, _gemm_grid(lambda ev: ev(product((yv.shape[0], yv.shape[2], yv.shape[3]))), z["Og"], z["G"]),
        (K.TILE, K.TILE, 1), True)


@lowers(Conv2dGradWeight)
def conv2d_grad_weight(s, node, ins) -> None:
    gw = node.outputs[0]
    P, (x, gy), (xa, ga) = _inputs(s, node, ins)
    gwv, out = _output(s, P, gw)
    z = _conv_dims(s, x.shape, gwv.shape, gy.shape, node.attrs)
    z["O"] = s.c(gy.shape[1])
    kk = z["Cg"] * z["KH"] * z["KW"]
    p = cmul(z["N"], cmul(z["OH"], z["OW"]))
    ind = "          "
    gv = load(f"{ga[0]}[(n_ * {z['O']} + g * {z['Og']} + r) * ({z['OH']} * {z['OW']}) + pp]", gy.dtype)
    a_lines = [f"{ind}const long long n_ = q / ({z['OH']} * {z['OW']}), pp = q % ({z['OH']} * {z['OW']});",
               f"{ind}v = {gv};"]
    comment = f"conv2d weight gradient {_ts(x)}, {_ts(gy)} -> {_ts(gwv)}: implicit GEMM per group"
    s.launch("conv", lambda k: K.gemm_kernel(
        k, comment, [xa, ga], [out], gw.dtype, z["Og"], kk, p, z["G"], ["    const long long g = bz;"],
        a_lines, _im2col_lines(z, xa[0], "q", "cc", ind, x.dtype),
        [f"      {out[0]}[(g * {z['Og']} + row) * {kk} + col] = {store('acc', gw.dtype)};"]),
        P, _gemm_grid(lambda ev: z["Og"], kk, z["G"]), (K.TILE, K.TILE, 1), True)


@lowers(Conv2dGradInput)
def conv2d_grad_input(s, node, ins) -> None:
    gx = node.outputs[0]
    P, (gy, w), (ga, wa) = _inputs(s, node, ins)
    gxv, out = _output(s, P, gx)
    z = _conv_dims(s, gxv.shape, w.shape, gy.shape, node.attrs)
    t = VALUE_TYPES[gx.dtype]

    def element(cs, lin, ind):
        n_, ci, ih, iw = cs
        gyv = load(f"{ga[0]}[(({n_} * {z['O']} + g * {z['Og']} + o) * {z['OH']} + oh) * {z['OW']} + ow]", gy.dtype)
        wv = load(f"{wa[0]}[((g * {z['Og']} + o) * {z['Cg']} + c) * {z['KH'] * z['KW']} + kh * {z['KW']} + kw]", w.dtype)
        return [f"{ind}const long long g = {ci} / {z['Cg']}, c = {ci} % {z['Cg']};",
                f"{ind}{t} acc = 0;  // gather every (o, kh, kw) whose window reads this input element",
                f"{ind}for (long long o = 0; o < {z['Og']}; ++o)",
                f"{ind}  for (int kh = 0; kh < {z['KH']}; ++kh)",
                f"{ind}    for (int kw = 0; kw < {z['KW']}; ++kw) {{",
                f"{ind}      const long long th = {ih} + {z['PH']} - kh * {z['DH']}, tw = {iw} + {z['PW']} - kw * {z['DW']};",
                f"{ind}      if (th < 0 || tw < 0 || th % {z['SH']} || tw % {z['SW']}) continue;",
                f"{ind}      const long long oh = th / {z['SH']}, ow = tw / {z['SW']};",
                f"{ind}      if (oh >= {z['OH']} || ow >= {z['OW']}) continue;",
                f"{ind}      acc += ({t}){gyv}",
                f"{ind}           * ({t}){wv};",
                f"{ind}    }}"], ["acc"]
    _pointwise(s, "conv", f"conv2d input gradient -> {_ts(gxv)}: gather per input element", P, gxv, element)


def _pool_dims(s, x, y, attrs):
    d = s.c
    (kh, kw), (sh, sw), ((ph, _), (pw, _)) = attrs["kernel"], attrs["stride"], attrs["pads"]
    return dict(C=d(x.shape[1]), H=d(x.shape[2]), W=d(x.shape[3]), OH=d(y.shape[2]), OW=d(y.shape[3]),
                KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw)


def _argmax_lines(z, x, dtype, nc, oh, ow, ind):
    """(bh, bw): position of the window's first maximum (padding reads as -inf) in `x` of `dtype`."""
    t = VALUE_TYPES[dtype]
    xv = load(f"{x}[({nc} * {z['H']} + ih) * {z['W']} + iw]", dtype)
    return [f"{ind}long long bh = -1, bw = -1; {t} best = 0;",
            f"{ind}for (int kh = 0; kh < {z['KH']}; ++kh)",
            f"{ind}  for (int kw = 0; kw < {z['KW']}; ++kw) {{",
            f"{ind}    const long long ih = {oh} * {z['SH']} - {z['PH']} + kh, iw = {ow} * {z['SW']} - {z['PW']} + kw;",
            f"{ind}    const {t} xv = (ih >= 0 && ih < {z['H']} && iw >= 0 && iw < {z['W']}) ? "
            f"{xv} : ({t})-GC_INF;",
            f"{ind}    if (bh < 0 || xv > best) {{ best = xv; bh = ih; bw = iw; }}",
            f"{ind}  }}",
            f"{ind}const bool inside = bh >= 0 && bh < {z['H']} && bw >= 0 && bw < {z['W']};"]


@lowers(MaxPool2d)
def max_pool2d(s, node, ins) -> None:
    y = node.outputs[0]
    P, (x,), (xa,) = _inputs(s, node, ins)
    yv, out = _output(s, P, y)
    z = _pool_dims(s, x, yv, node.attrs)
    t = VALUE_TYPES[y.dtype]

    def element(cs, lin, ind):
        n_, c, oh, ow = cs
        xv = load(f"{xa[0]}[(({n_} * {z['C']} + {c}) * {z['H']} + ih) * {z['W']} + iw]", x.dtype)
        return [f"{ind}{t} best = -GC_INF;",
                f"{ind}for (int kh = 0; kh < {z['KH']}; ++kh)",
                f"{ind}  for (int kw = 0; kw < {z['KW']}; ++kw) {{",
                f"{ind}    const long long ih = {oh} * {z['SH']} - {z['PH']} + kh, iw = {ow} * {z['SW']} - {z['PW']} + kw;",
                f"{ind}    if (ih >= 0 && ih < {z['H']} && iw >= 0 && iw < {z['W']})",
                f"{ind}      best = gc_max(best, ({t}){xv});",
                f"{ind}  }}"], ["best"]
    _pointwise(s, "pool", f"max_pool2d {_ts(x)} -> {_ts(yv)}", P, yv, element)


@lowers(MaxPool2dSelect)
def max_pool2d_select(s, node, ins) -> None:
    y = node.outputs[0]
    P, (x, g), (xa, ga) = _inputs(s, node, ins)
    yv, out = _output(s, P, y)
    z = _pool_dims(s, x, yv, node.attrs)

    def element(cs, lin, ind):
        n_, c, oh, ow = cs
        nc = f"({n_} * {z['C']} + {c})"
        gv = load(f"{ga[0]}[({nc} * {z['H']} + bh) * {z['W']} + bw]", g.dtype)
        return _argmax_lines(z, xa[0], x.dtype, nc, oh, ow, ind) + [
            f"{ind}const {VALUE_TYPES[y.dtype]} v = inside ? ({VALUE_TYPES[y.dtype]}){gv} : 0;"], ["v"]
    _pointwise(s, "pool", f"max_pool2d_select -> {_ts(yv)}", P, yv, element)


@lowers(MaxPool2dGrad)
def max_pool2d_grad(s, node, ins) -> None:
    gx = node.outputs[0]
    x = s.dense(ins[0])
    out = s.fresh(gx)
    s.view[id(gx)] = out
    z = _pool_dims(s, x, ins[1], node.attrs)

    xname = s.cname(x.buf)

    def target(cs, ind):
        n_, c, oh, ow = cs
        nc = f"({n_} * {z['C']} + {c})"
        return _argmax_lines(z, xname, x.dtype, nc, oh, ow, ind) + [f"{ind}if (!inside) continue;"], \
            f"({nc} * {z['H']} + bh) * {z['W']} + bw"
    s.scatter(out, ins[1], lambda P, names: target, [x], kind="pool",
              comment=f"max_pool2d_grad: route {_ts(ins[1])} to each window's maximum (overlaps accumulate)")


def _ts(v) -> str:
    return f"{v.dtype}[{', '.join(str(d) for d in v.shape)}]"


def _gemm_grid(m_fn, n: int, batch: int):
    """Grid for gemm_kernel: (column tiles, row tiles, batch); `m_fn(dims)` gives the row count."""
    def grid(ev):
        m = m_fn(ev)
        return ((n + K.TILE - 1) // K.TILE, (m + K.TILE - 1) // K.TILE, min(65535, batch))
    return grid


@lowers(ScaledDotProductAttention)
def _attention(s, node, ins):
    """scaled_dot_product_attention as its composition (graphc.ops.attention.composition_body): the GEMM,
    pointwise, softmax and GEMM launches the same graph written out of those ops gets."""
    _plan_composition(s, node, ins, composition_body(node))


def _plan_composition(s, node, ins, body):
    """Plan `node` as `body` (a Graph of existing ops whose placeholders stand for node.inputs)."""
    for ph, v in zip(body.inputs, ins):
        s.view[id(ph)] = v
    s.walk_body(body, {id(body.outputs[0]): node.outputs[0]})
    s.view[id(node.outputs[0])] = s.view[id(body.outputs[0])]


@lowers(_layernorm.LayerNorm)
def _layer_norm(s, node, ins):
    """layer_norm as its composition (graphc.ops.layernorm.composition_body): the reductions and pointwise
    launches the same graph written out of those ops gets."""
    _plan_composition(s, node, ins, _layernorm.composition_body(node))
