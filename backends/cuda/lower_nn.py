"""Convolution and max pooling kernels (NCHW). conv2d and its weight gradient are implicit GEMMs
on the tiled GEMM skeleton (the im2col matrix is never stored: the A/B tile loaders compute the
input coordinates); the input gradient is a gather per input element; max pooling routes through
the first maximum of each window (PyTorch's tie rule, as in the NumPy reference)."""
from __future__ import annotations

from graphc.ops.nn_ops import Conv2d, Conv2dGradInput, Conv2dGradWeight, MaxPool2d, MaxPool2dGrad, MaxPool2dSelect
from . import kernels as K
from .cexpr import cmul
from .plan import Fill
from .prelude import C_TYPES


def _conv_dims(L, x_shape, w_shape, y_shape, attrs):
    """Named C expressions for the convolution's sizes (runtime ones come from GcDims)."""
    d = L.dt.dim
    g = attrs["groups"]
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    (ph, _), (pw, _) = attrs["pads"]
    o, cg, kh, kw = w_shape
    return dict(N=d(x_shape[0]), C=d(x_shape[1]), H=d(x_shape[2]), W=d(x_shape[3]), O=o, Cg=cg, Og=o // g,
                KH=kh, KW=kw, OH=d(y_shape[2]), OW=d(y_shape[3]), SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, G=g)


def _im2col_lines(z, x, row, col, ind):
    """`v` = padded input value at im2col position (row: n, oh, ow; col: c, kh, kw) of group g."""
    return [f"{ind}const long long n_ = {row} / ({z['OH']} * {z['OW']}), oh = ({row} / {z['OW']}) % {z['OH']}, "
            f"ow = {row} % {z['OW']};",
            f"{ind}const long long c = {col} / {z['KH'] * z['KW']}, kh = ({col} / {z['KW']}) % {z['KH']}, "
            f"kw = {col} % {z['KW']};",
            f"{ind}const long long ih = oh * {z['SH']} - {z['PH']} + kh * {z['DH']}, "
            f"iw = ow * {z['SW']} - {z['PW']} + kw * {z['DW']};",
            f"{ind}if (ih >= 0 && ih < {z['H']} && iw >= 0 && iw < {z['W']})",
            f"{ind}  v = {x}[((n_ * {z['C']} + g * {z['Cg']} + c) * {z['H']} + ih) * {z['W']} + iw];"]


def conv2d(L, node) -> None:
    x, w = node.inputs
    y = node.outputs[0]
    z = _conv_dims(L, x.shape, w.shape, y.shape, node.attrs)
    xa, wa = L.arg(x), L.arg(w)
    out = L.out_arg(y, "conv2d")
    kk = z["Cg"] * z["KH"] * z["KW"]
    m = cmul(z["N"], cmul(z["OH"], z["OW"]))
    ind = "          "
    store = [f"      const long long n_ = row / ({z['OH']} * {z['OW']}), p = row % ({z['OH']} * {z['OW']});",
             f"      {out[0]}[(n_ * {z['O']} + g * {z['Og']} + col) * ({z['OH']} * {z['OW']}) + p] = acc;"]
    comment = f"conv2d {x.type_str} * {w.type_str} -> {y.type_str}: implicit GEMM per group"
    L.add_kernel(node, "conv", lambda k: K.gemm_kernel(
        k, comment, [xa, wa], [out], y.dtype, m, z["Og"], kk, z["G"], ["    const long long g = bz;"],
        _im2col_lines(z, xa[0], "r", "q", ind), [f"{ind}v = {wa[0]}[(g * {z['Og']} + cc) * {kk} + q];"], store),
        [L.buf(x), L.buf(w), L.buf(y)], [L.buf(y)],
        _gemm_grid(lambda dims: _numel((y.shape[0], y.shape[2], y.shape[3]), dims), z["Og"], z["G"]),
        (K.TILE, K.TILE, 1), True)


def conv2d_grad_weight(L, node) -> None:
    x, gy = node.inputs
    gw = node.outputs[0]
    z = _conv_dims(L, x.shape, gw.shape, gy.shape, node.attrs)
    z["O"] = gy.shape[1]
    xa, ga = L.arg(x), L.arg(gy)
    out = L.out_arg(gw, "conv2d_grad_weight")
    kk = z["Cg"] * z["KH"] * z["KW"]
    p = cmul(z["N"], cmul(z["OH"], z["OW"]))
    ind = "          "
    a_lines = [f"{ind}const long long n_ = q / ({z['OH']} * {z['OW']}), pp = q % ({z['OH']} * {z['OW']});",
               f"{ind}v = {ga[0]}[(n_ * {z['O']} + g * {z['Og']} + r) * ({z['OH']} * {z['OW']}) + pp];"]
    comment = f"conv2d weight gradient {x.type_str}, {gy.type_str} -> {gw.type_str}: implicit GEMM per group"
    L.add_kernel(node, "conv", lambda k: K.gemm_kernel(
        k, comment, [xa, ga], [out], gw.dtype, z["Og"], kk, p, z["G"], ["    const long long g = bz;"],
        a_lines, _im2col_lines(z, xa[0], "q", "cc", ind),
        [f"      {out[0]}[(g * {z['Og']} + row) * {kk} + col] = acc;"]),
        [L.buf(x), L.buf(gy), L.buf(gw)], [L.buf(gw)], _gemm_grid(lambda dims: z["Og"], kk, z["G"]),
        (K.TILE, K.TILE, 1), True)


def conv2d_grad_input(L, node) -> None:
    gy, w = node.inputs
    gx = node.outputs[0]
    z = _conv_dims(L, gx.shape, w.shape, gy.shape, node.attrs)
    ga, wa = L.arg(gy), L.arg(w)
    out = L.out_arg(gx, "conv2d_grad_input")
    t = C_TYPES[gx.dtype]

    def element(cs, lin, ind):
        n_, ci, ih, iw = cs
        return [f"{ind}const long long g = {ci} / {z['Cg']}, c = {ci} % {z['Cg']};",
                f"{ind}{t} acc = 0;  // gather every (o, kh, kw) whose window reads this input element",
                f"{ind}for (long long o = 0; o < {z['Og']}; ++o)",
                f"{ind}  for (int kh = 0; kh < {z['KH']}; ++kh)",
                f"{ind}    for (int kw = 0; kw < {z['KW']}; ++kw) {{",
                f"{ind}      const long long th = {ih} + {z['PH']} - kh * {z['DH']}, tw = {iw} + {z['PW']} - kw * {z['DW']};",
                f"{ind}      if (th < 0 || tw < 0 || th % {z['SH']} || tw % {z['SW']}) continue;",
                f"{ind}      const long long oh = th / {z['SH']}, ow = tw / {z['SW']};",
                f"{ind}      if (oh >= {z['OH']} || ow >= {z['OW']}) continue;",
                f"{ind}      acc += {ga[0]}[(({n_} * {z['O']} + g * {z['Og']} + o) * {z['OH']} + oh) * {z['OW']} + ow]",
                f"{ind}           * {wa[0]}[((g * {z['Og']} + o) * {z['Cg']} + c) * {z['KH'] * z['KW']} + kh * {z['KW']} + kw];",
                f"{ind}    }}"], ["acc"]
    L._launch_pointwise(node, "conv", f"conv2d input gradient -> {gx.type_str}: gather per input element",
                        L.dt.shape(gx.shape), [ga, wa], [L.buf(gy), L.buf(w)], out, gx, element)


def _pool_dims(L, x, y, attrs):
    d = L.dt.dim
    (kh, kw), (sh, sw), ((ph, _), (pw, _)) = attrs["kernel"], attrs["stride"], attrs["pads"]
    return dict(C=d(x.shape[1]), H=d(x.shape[2]), W=d(x.shape[3]), OH=d(y.shape[2]), OW=d(y.shape[3]),
                KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw)


def _argmax_lines(z, x, t, nc, oh, ow, ind):
    """(bh, bw): position of the window's first maximum (padding reads as -inf)."""
    return [f"{ind}long long bh = -1, bw = -1; {t} best = 0;",
            f"{ind}for (int kh = 0; kh < {z['KH']}; ++kh)",
            f"{ind}  for (int kw = 0; kw < {z['KW']}; ++kw) {{",
            f"{ind}    const long long ih = {oh} * {z['SH']} - {z['PH']} + kh, iw = {ow} * {z['SW']} - {z['PW']} + kw;",
            f"{ind}    const {t} xv = (ih >= 0 && ih < {z['H']} && iw >= 0 && iw < {z['W']}) ? "
            f"{x}[({nc} * {z['H']} + ih) * {z['W']} + iw] : ({t})-GC_INF;",
            f"{ind}    if (bh < 0 || xv > best) {{ best = xv; bh = ih; bw = iw; }}",
            f"{ind}  }}",
            f"{ind}const bool inside = bh >= 0 && bh < {z['H']} && bw >= 0 && bw < {z['W']};"]


def max_pool2d(L, node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    z = _pool_dims(L, x, y, node.attrs)
    xa = L.arg(x)
    out = L.out_arg(y, "max_pool2d")
    t = C_TYPES[y.dtype]

    def element(cs, lin, ind):
        n_, c, oh, ow = cs
        return [f"{ind}{t} best = -GC_INF;",
                f"{ind}for (int kh = 0; kh < {z['KH']}; ++kh)",
                f"{ind}  for (int kw = 0; kw < {z['KW']}; ++kw) {{",
                f"{ind}    const long long ih = {oh} * {z['SH']} - {z['PH']} + kh, iw = {ow} * {z['SW']} - {z['PW']} + kw;",
                f"{ind}    if (ih >= 0 && ih < {z['H']} && iw >= 0 && iw < {z['W']})",
                f"{ind}      best = gc_max(best, {xa[0]}[(({n_} * {z['C']} + {c}) * {z['H']} + ih) * {z['W']} + iw]);",
                f"{ind}  }}"], ["best"]
    L._launch_pointwise(node, "pool", f"max_pool2d {x.type_str} -> {y.type_str}", L.dt.shape(y.shape), [xa],
                        [L.buf(x)], out, y, element)


def max_pool2d_select(L, node) -> None:
    x, g = node.inputs
    y = node.outputs[0]
    z = _pool_dims(L, x, y, node.attrs)
    xa, ga = L.arg(x), L.arg(g)
    out = L.out_arg(y, "max_pool2d_select")

    def element(cs, lin, ind):
        n_, c, oh, ow = cs
        nc = f"({n_} * {z['C']} + {c})"
        return _argmax_lines(z, xa[0], C_TYPES[x.dtype], nc, oh, ow, ind) + [
            f"{ind}const {C_TYPES[y.dtype]} v = inside ? {ga[0]}[({nc} * {z['H']} + bh) * {z['W']} + bw] : 0;"], ["v"]
    L._launch_pointwise(node, "pool", f"max_pool2d_select -> {y.type_str}", L.dt.shape(y.shape), [xa, ga],
                        [L.buf(x), L.buf(g)], out, y, element)


def max_pool2d_grad(L, node) -> None:
    x, gy = node.inputs
    gx = node.outputs[0]
    z = _pool_dims(L, x, gy, node.attrs)
    xa, ga = L.arg(x), L.arg(gy)
    out = L.out_arg(gx, "max_pool2d_grad")

    def target(cs, ind):
        n_, c, oh, ow = cs
        nc = f"({n_} * {z['C']} + {c})"
        return _argmax_lines(z, xa[0], C_TYPES[x.dtype], nc, oh, ow, ind) + [f"{ind}if (!inside) continue;"], \
            f"({nc} * {z['H']} + bh) * {z['W']} + bw"
    L.steps.append(Fill(L.buf(gx), [L.buf(gx)]))
    loop_c = L.dt.shape(gy.shape)
    comment = f"max_pool2d_grad: route {gy.type_str} to each window's maximum (overlaps accumulate)"
    L.add_kernel(node, "pool", lambda k: K.scatter_kernel(k, comment, loop_c, [ga, xa], out, target, True),
                 [L.buf(gy), L.buf(x), L.buf(gx)], [L.buf(gx)],
                 K.grid_1d(lambda dims: _numel(gy.shape, dims)), (K.THREADS, 1, 1), False)


def _numel(shape, dims):
    from .cexpr import eval_dim
    n = 1
    for d in shape:
        n *= eval_dim(d, dims)
    return n


def _gemm_grid(m_fn, n: int, batch: int):
    """Grid for gemm_kernel: (column tiles, row tiles, batch); `m_fn(dims)` gives the row count."""
    def grid(dims):
        m = m_fn(dims)
        return ((n + K.TILE - 1) // K.TILE, (m + K.TILE - 1) // K.TILE, min(65535, batch))
    return grid


#: rows of the cuda lowering table (backends/cuda/lower.py): op -> fn(lowering, node)
LOWERINGS = {Conv2d: conv2d, Conv2dGradWeight: conv2d_grad_weight, Conv2dGradInput: conv2d_grad_input,
             MaxPool2d: max_pool2d, MaxPool2dSelect: max_pool2d_select, MaxPool2dGrad: max_pool2d_grad}
