"""Op-table rows for the neural-network ops (graphc/ops/nn_ops.py), with independent references
written as direct loops over output positions (tiny sizes), so the vectorised im2col/strided
implementations are checked against the definition."""
from __future__ import annotations

import itertools
import math

import numpy as np

import graphc as gc
from graphc.ir import apply
from graphc.ops import nn_ops as N
from op_table import Case


def loop_conv2d(x, w, stride=(1, 1), pads=((0, 0), (0, 0)), dil=(1, 1), groups=1):
    """y[n, o, i, j] = sum_{c, a, b} xpad[n, g*Cg + c, i*s + a*d, j*s + b*d] * w[o, c, a, b]."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.zeros((n, c, h + sum(pads[0]), wd + sum(pads[1])), x.dtype)
    xp[:, :, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd] = x
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, o, oh, ow), x.dtype)
    og = o // groups
    for b_, oc, i, j in itertools.product(range(n), range(o), range(oh), range(ow)):
        g = oc // og
        acc = 0.0
        for ci, a, b in itertools.product(range(cg), range(kh), range(kw)):
            acc += xp[b_, g * cg + ci, i * stride[0] + a * dil[0], j * stride[1] + b * dil[1]] * w[oc, ci, a, b]
        y[b_, oc, i, j] = acc
    return y


def loop_conv2d_grad_input(gy, w, hw, stride=(1, 1), pads=((0, 0), (0, 0)), dil=(1, 1), groups=1):
    """The adjoint, by its definition: scatter gy[n, o, i, j] * w[o, c, a, b] to the input pixel it read."""
    n, o, oh, ow = gy.shape
    _, cg, kh, kw = w.shape
    h, wd = hw
    xp = np.zeros((n, cg * groups, h + sum(pads[0]), wd + sum(pads[1])), gy.dtype)
    og = o // groups
    for b_, oc, i, j, ci, a, b in itertools.product(range(n), range(o), range(oh), range(ow), range(cg),
                                                    range(kh), range(kw)):
        xp[b_, (oc // og) * cg + ci, i * stride[0] + a * dil[0], j * stride[1] + b * dil[1]] += gy[b_, oc, i, j] * w[oc, ci, a, b]
    return xp[:, :, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd]


def loop_conv2d_grad_weight(x, gy, kernel, stride=(1, 1), pads=((0, 0), (0, 0)), dil=(1, 1), groups=1):
    n, c, h, wd = x.shape
    o = gy.shape[1]
    cg, og = c // groups, o // groups
    xp = np.zeros((n, c, h + sum(pads[0]), wd + sum(pads[1])), x.dtype)
    xp[:, :, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd] = x
    gw = np.zeros((o, cg) + tuple(kernel), x.dtype)
    for b_, oc, i, j, ci, a, b in itertools.product(range(n), range(o), range(gy.shape[2]), range(gy.shape[3]),
                                                    range(cg), range(kernel[0]), range(kernel[1])):
        gw[oc, ci, a, b] += gy[b_, oc, i, j] * xp[b_, (oc // og) * cg + ci, i * stride[0] + a * dil[0], j * stride[1] + b * dil[1]]
    return gw


def loop_pool(x, k, s, p, reduce, fill):
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * p[0], w + 2 * p[1]), fill, x.dtype)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    oh, ow = (xp.shape[2] - k[0]) // s[0] + 1, (xp.shape[3] - k[1]) // s[1] + 1
    y = np.zeros((n, c, oh, ow), x.dtype)
    for b_, ci, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        y[b_, ci, i, j] = reduce(xp[b_, ci, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]])
    return y


def loop_max_pool_grad(x, gy, k, s, p):
    """Each output's gradient goes to the first maximum of its window (row-major order)."""
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * p[0], w + 2 * p[1]), -np.inf, x.dtype)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    gp = np.zeros_like(xp)
    for b_, ci, i, j in itertools.product(range(n), range(c), range(gy.shape[2]), range(gy.shape[3])):
        win = xp[b_, ci, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
        a, b = np.unravel_index(np.argmax(win), win.shape)
        gp[b_, ci, i * s[0] + a, j * s[1] + b] += gy[b_, ci, i, j]
    return gp[:, :, p[0]:p[0] + h, p[1]:p[1] + w]


def loop_max_pool_select(x, g, k, s, p):
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * p[0], w + 2 * p[1]), -np.inf, x.dtype)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    gp = np.zeros_like(xp)
    gp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = g
    oh, ow = (xp.shape[2] - k[0]) // s[0] + 1, (xp.shape[3] - k[1]) // s[1] + 1
    y = np.zeros((n, c, oh, ow), x.dtype)
    for b_, ci, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        win = xp[b_, ci, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
        a, b = np.unravel_index(np.argmax(win), win.shape)
        y[b_, ci, i, j] = gp[b_, ci, i * s[0] + a, j * s[1] + b]
    return y


def _erf(x):
    return np.vectorize(math.erf, otypes=[x.dtype])(x)


def _gelu(x):
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(x.dtype)


def _elu(x, a=1.0):
    return np.where(x > 0, x, a * (np.exp(x) - 1)).astype(x.dtype)


def _bn_train(x, g, b):
    axes = (0,) + tuple(range(2, x.ndim))
    shp = (1, -1) + (1,) * (x.ndim - 2)
    m, v = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    return ((x - m) / np.sqrt(v + 1e-5) * g.reshape(shp) + b.reshape(shp)).astype(x.dtype)


def _ln(x, g, b):
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return ((x - m) / np.sqrt(v + 1e-5) * g + b).astype(x.dtype)


_P1 = ((1, 1), (1, 1))
_PS = ((1, 0), (2, 1))  # asymmetric ('same'-style) padding
# conv2d: stride, padding, dilation, groups; (x shape, w shape, stride, pads, dilation, groups)
_CONV = [((2, 3, 5, 5), (4, 3, 3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
         ((1, 2, 6, 5), (3, 2, 3, 2), (2, 1), _P1, (1, 1), 1),
         ((2, 4, 6, 6), (4, 2, 2, 3), (1, 2), _PS, (2, 1), 2),
         ((1, 3, 4, 4), (3, 1, 3, 3), (2, 2), _P1, (1, 1), 3)]


def _conv_case(i, xs, ws, st, pads, dil, g):
    return [
        Case(f"conv2d_{i}", lambda x, w: apply(N.Conv2d, x, w, stride=st, pads=pads, dilation=dil, groups=g),
             lambda x, w: loop_conv2d(x, w, st, pads, dil, g), [[xs, ws]]),
        Case(f"conv2d_grad_input_{i}",
             lambda gy, w: apply(N.Conv2dGradInput, gy, w, x_hw=xs[2:], stride=st, pads=pads, dilation=dil, groups=g),
             lambda gy, w: loop_conv2d_grad_input(gy, w, xs[2:], st, pads, dil, g),
             [[(xs[0], ws[0]) +
               tuple(N.out_dim(xs[2 + a], ws[2 + a], st[a], dil[a], *pads[a]) for a in range(2)), ws]]),
        Case(f"conv2d_grad_weight_{i}",
             lambda x, gy: apply(N.Conv2dGradWeight, x, gy, kernel=ws[2:], stride=st, pads=pads, dilation=dil, groups=g),
             lambda x, gy: loop_conv2d_grad_weight(x, gy, ws[2:], st, pads, dil, g),
             [[xs, (xs[0], ws[0]) + tuple(N.out_dim(xs[2 + a], ws[2 + a], st[a], dil[a], *pads[a]) for a in range(2))]]),
    ]


_POOL = [((2, 2, 5, 5), (2, 2), (2, 2), (0, 0)), ((1, 2, 6, 5), (3, 3), (2, 1), (1, 1)),
         ((1, 1, 4, 4), (2, 3), (1, 2), (1, 1))]


def _pool_out(xs, k, s, p):
    return xs[:2] + tuple((xs[2 + a] + 2 * p[a] - k[a]) // s[a] + 1 for a in range(2))


def _pool_cases(i, xs, k, s, p):
    pads = tuple((q, q) for q in p)
    return [
        Case(f"max_pool2d_{i}", lambda x: gc.max_pool2d(x, k, s, p), lambda x: loop_pool(x, k, s, p, np.max, -np.inf),
             [[xs]]),
        Case(f"max_pool2d_grad_{i}", lambda x, g: apply(N.MaxPool2dGrad, x, g, kernel=k, stride=s, pads=pads),
             lambda x, g: loop_max_pool_grad(x, g, k, s, p), [[xs, _pool_out(xs, k, s, p)]]),
        Case(f"max_pool2d_select_{i}", lambda x, g: apply(N.MaxPool2dSelect, x, g, kernel=k, stride=s, pads=pads),
             lambda x, g: loop_max_pool_select(x, g, k, s, p), [[xs, xs]]),
        Case(f"avg_pool2d_{i}", lambda x: gc.avg_pool2d(x, k, s, p),
             lambda x: loop_pool(x, k, s, p, lambda v: v.sum() / (k[0] * k[1]), 0), [[xs]]),
        Case(f"lp_pool2d_{i}", lambda x: gc.lp_pool2d(x, 3, k, s, p),
             lambda x: loop_pool(x, k, s, p, lambda v: (np.abs(v) ** 3).sum() ** (1 / 3), 0), [[xs]],
             domain="pos"),
    ]


def _no_pad_avg(x):
    return loop_pool(x, (3, 3), (1, 1), (1, 1), lambda v: v.sum(), 0) / loop_pool(
        np.ones_like(x), (3, 3), (1, 1), (1, 1), lambda v: v.sum(), 0)


def loop_mha(q, k, v, w_in, b_in, w_out, b_out, heads=2):
    """Multi-head attention by its definition, one (batch, head, query position) at a time."""
    n, L, E = q.shape
    S, d = k.shape[1], E // heads
    wq, wk, wv = w_in[:E], w_in[E:2 * E], w_in[2 * E:]
    bq, bk, bv = b_in[:E], b_in[E:2 * E], b_in[2 * E:]
    ctx = np.zeros((n, L, E), q.dtype)
    for b_, h, i in itertools.product(range(n), range(heads), range(L)):
        sl = slice(h * d, (h + 1) * d)
        qi = q[b_, i] @ wq[sl].T + bq[sl]
        scores = np.array([qi @ (k[b_, j] @ wk[sl].T + bk[sl]) / math.sqrt(d) for j in range(S)])
        p = np.exp(scores - scores.max())
        p /= p.sum()
        ctx[b_, i, sl] = sum(p[j] * (v[b_, j] @ wv[sl].T + bv[sl]) for j in range(S))
    return (ctx @ w_out.T + b_out).astype(q.dtype)


CASES = [c for i, spec in enumerate(_CONV) for c in _conv_case(i, *spec)]
CASES += [c for i, spec in enumerate(_POOL) for c in _pool_cases(i, *spec)]
CASES += [
    Case("conv2d_same_bias", lambda x, w, b: gc.conv2d(x, w, b, padding="same"),
         lambda x, w, b: loop_conv2d(x, w, pads=((1, 1), (0, 1))) + b[:, None, None], [[(2, 2, 4, 4), (3, 2, 3, 2), (3,)]]),
    Case("conv2d_valid_stride_same", lambda x, w: gc.conv2d(x, w, stride=2, padding="same"),
         lambda x, w: loop_conv2d(x, w, (2, 2), ((1, 1), (1, 1))), [[(1, 1, 5, 5), (2, 1, 3, 3)]]),
    Case("conv1d", lambda x, w, b: gc.conv1d(x, w, b, stride=2, padding=1, dilation=2),
         lambda x, w, b: loop_conv2d(x[:, :, None], w[:, :, None], (1, 2), ((0, 0), (1, 1)), (1, 2))[:, :, 0] + b[:, None],
         [[(2, 3, 9), (2, 3, 3), (2,)]]),
    Case("avg_pool2d_no_pad_count", lambda x: gc.avg_pool2d(x, 3, 1, 1, count_include_pad=False), _no_pad_avg,
         [[(1, 2, 4, 5)]]),
    Case("heaviside", lambda x: gc.heaviside(x, 0.5), lambda x: np.heaviside(x, 0.5).astype(x.dtype), [[(3, 4)], [(5,)]]),
    Case("elu", lambda x: gc.elu(x, 0.7), lambda x: _elu(x, 0.7), [[(3, 4)]]),
    Case("selu", gc.selu, lambda x: (N.SELU_SCALE * _elu(x, N.SELU_ALPHA)).astype(x.dtype), [[(3, 4)]]),
    Case("gelu", gc.gelu, _gelu, [[(3, 4)]]),
    Case("multi_head_attention",
         lambda q, k, v, wi, bi, wo, bo: gc.nn.attention.multi_head_attention(q, k, v, 2, wi, bi, wo, bo)[0],
         loop_mha, [[(2, 3, 4), (2, 5, 4), (2, 5, 4), (12, 4), (12,), (4, 4), (4,)]]),
    Case("softsign", gc.softsign, lambda x: x / (1 + np.abs(x)), [[(3, 4)], [(0, 2)], [()]]),
    Case("gelu_tanh", lambda x: gc.gelu(x, "tanh"),
         lambda x: (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))).astype(x.dtype), [[(3, 4)]]),
    Case("maxout", lambda x: gc.maxout(x, 3), lambda x: x.reshape(2, 2, 3, 4).max(2), [[(2, 6, 4)]]),
    Case("soft_maxout", lambda x: gc.soft_maxout(x, 2, axis=-1),
         lambda x: np.log(np.exp(x.reshape(3, 2, 2)).sum(-1)), [[(3, 4)]]),
    Case("noisy_relu_eval", lambda x: gc.noisy_relu(x, training=False), lambda x: np.maximum(x, 0), [[(3, 4)]]),
    Case("batch_norm_train", lambda x, g, b: gc.batch_norm(x, None, None, g, b, training=True), _bn_train,
         [[(4, 3, 2, 2), (3,), (3,)], [(5, 3), (3,), (3,)]]),
    Case("batch_norm_eval", lambda x, m, v: gc.batch_norm(x, m, v, training=False),
         lambda x, m, v: ((x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5)).astype(x.dtype),
         [[(2, 3, 2, 2), (3,), (3,)]], domain="pos"),
    Case("layer_norm", lambda x, g, b: gc.layer_norm(x, 4, g, b), _ln, [[(3, 4), (4,), (4,)], [(2, 3, 4), (4,), (4,)]]),
    Case("dropout_fixed_key", lambda x: gc.dropout(x, 0.3, key=gc.random.key(7)),
         lambda x: x * (gc.evaluate([gc.random.uniform(x.shape, dtype=x.dtype.name, key=gc.random.key(7))], {})[0]
                        >= 0.3) / np.asarray(0.7, x.dtype), [[(4, 5)]]),
    Case("embedding", lambda i, w: gc.embedding(i, w), lambda i, w: w[i], [[(2, 3), (5, 4)]], int_inputs={0: (0, 5)}),
    Case("one_hot", lambda i, x: gc.one_hot(i, 4, x.dtype) * x, lambda i, x: np.eye(4, dtype=x.dtype)[i] * x,
         [[(3,), (3, 4)]], int_inputs={0: (0, 4)}),
]

CASES += [
    Case("solve_vec", lambda a, b: gc.solve(a + gc.constant(4 * np.eye(3), a.dtype), b),
         lambda a, b: np.linalg.solve(a + 4 * np.eye(3, dtype=a.dtype), b), [[(3, 3), (3,)]]),
    Case("solve_mat", lambda a, b: gc.solve(a + gc.constant(4 * np.eye(3), a.dtype), b),
         lambda a, b: np.linalg.solve(a + 4 * np.eye(3, dtype=a.dtype), b), [[(3, 3), (3, 2)]]),
]

# ---- activations, pools, losses and metrics of the course notes (issue 17) ----------------------


def _prelu(x, w):
    shp = (-1,) + (1,) * (x.ndim - 2) if w.size > 1 else ()
    return (np.maximum(x, 0) + w.reshape(shp) * np.minimum(x, 0)).astype(x.dtype)


def _pool1d(x, k, s, p, reduce, fill):
    return loop_pool(x[:, :, None], (1, k), (1, s), (0, p), reduce, fill)[:, :, 0]


def _log_softmax(a):
    m = a.max(-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))


def _pm1(t, dtype):
    return (2 * t - 1).astype(dtype)


def _kl(lq, p):
    safe = np.where(p > 0, p, 1)
    return np.where(p > 0, p * (np.log(safe) - lq), 0).astype(lq.dtype)


def _multi_margin(s, y, p=1, margin=1.0):
    n, k = s.shape
    out = np.zeros(n, s.dtype)
    for i in range(n):
        for j in range(k):
            if j != y[i]:
                out[i] += max(0.0, margin - s[i, y[i]] + s[i, j]) ** p
    return (out / k).astype(s.dtype)


def _confusion_macro(s, y, which):
    pred, k = s.argmax(-1), s.shape[-1]
    vals = []
    for c in range(k):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        num, den = {"p": (tp, tp + fp), "r": (tp, tp + fn), "f": (2 * tp, 2 * tp + fp + fn)}[which]
        vals.append(num / den if den else 0.0)
    return np.float32(np.mean(vals))


def _confusion_binary(s, t, which):
    pos, true = s >= 0, t != 0
    tp, fp, fn = np.sum(pos & true), np.sum(pos & ~true), np.sum(~pos & true)
    num, den = {"p": (tp, tp + fp), "r": (tp, tp + fn), "f": (2 * tp, 2 * tp + fp + fn)}[which]
    return np.float32(num / den if den else 0.0)


_METRIC = {"p": gc.losses.precision, "r": gc.losses.recall, "f": gc.losses.f1_score}

CASES += [
    Case("hardtanh", gc.hardtanh, lambda x: np.clip(x, -1, 1), [[(3, 4)], [(5,)], [()]]),
    Case("hardtanh_range", lambda x: gc.hardtanh(x, -1.0, 2.0), lambda x: np.clip(x, -1, 2), [[(2, 3, 4)]]),
    Case("prelu", gc.prelu, _prelu, [[(3, 4), (1,)], [(2, 3, 4), (3,)], [(2, 3, 2, 2), (3,)], [(), (1,)]]),
    Case("max_pool1d", lambda x: gc.max_pool1d(x, 3, 2, 1), lambda x: _pool1d(x, 3, 2, 1, np.max, -np.inf),
         [[(2, 3, 7)]]),
    Case("max_pool1d_default_stride", lambda x: gc.max_pool1d(x, 2), lambda x: _pool1d(x, 2, 2, 0, np.max, -np.inf),
         [[(1, 2, 5)]]),
    Case("avg_pool1d", lambda x: gc.avg_pool1d(x, 3, 1, 1), lambda x: _pool1d(x, 3, 1, 1, lambda v: v.sum() / 3, 0),
         [[(2, 3, 6)]]),
    Case("avg_pool1d_no_pad_count", lambda x: gc.avg_pool1d(x, 3, 2, 1, count_include_pad=False),
         lambda x: _pool1d(x, 3, 2, 1, np.sum, 0) / _pool1d(np.ones_like(x), 3, 2, 1, np.sum, 0), [[(1, 2, 7)]]),
    Case("global_avg_pool2d", gc.global_avg_pool2d, lambda x: x.mean((2, 3)), [[(2, 3, 4, 5)], [(1, 2, 1, 1)]]),
    Case("global_avg_pool2d_keepdims", lambda x: gc.global_avg_pool2d(x, keepdims=True),
         lambda x: x.mean((2, 3), keepdims=True), [[(2, 3, 2, 3)]]),
    Case("huber", lambda p, t: gc.losses.huber(p, t, 0.7, reduction="none"),
         lambda p, t: np.where(np.abs(p - t) <= 0.7, 0.5 * (p - t) ** 2, 0.7 * (np.abs(p - t) - 0.35)).astype(p.dtype),
         [[(3, 4), (3, 4)], [(5,), (5,)]]),
    Case("huber_mean", lambda p, t: gc.losses.huber(p, t),
         lambda p, t: np.mean(np.where(np.abs(p - t) <= 1, 0.5 * (p - t) ** 2, np.abs(p - t) - 0.5)).astype(p.dtype),
         [[(4, 3), (4, 3)]]),
    Case("kl_div_batchmean", lambda a, b: gc.losses.kl_div(gc.log_softmax(a), gc.softmax(b)),
         lambda a, b: (_kl(_log_softmax(a), np.exp(_log_softmax(b))).sum() / a.shape[0]).astype(a.dtype),
         [[(3, 4), (3, 4)]]),
    Case("kl_div_zero_targets", lambda a, b: gc.losses.kl_div(a, gc.relu(b), reduction="none"),
         lambda a, b: _kl(a, np.maximum(b, 0)), [[(3, 4), (3, 4)]]),
    Case("kl_div_log_target", lambda a, b: gc.losses.kl_div(a, b, reduction="sum", log_target=True),
         lambda a, b: (np.exp(b) * (b - a)).sum().astype(a.dtype), [[(2, 5), (2, 5)]]),
    Case("binary_cross_entropy", lambda a, b: gc.losses.binary_cross_entropy(gc.sigmoid(a), gc.sigmoid(b),
                                                                               reduction="none"),
         lambda a, b: (-(1 / (1 + np.exp(-b))) * np.log(1 / (1 + np.exp(-a)))
                       - (1 - 1 / (1 + np.exp(-b))) * np.log(1 - 1 / (1 + np.exp(-a)))).astype(a.dtype),
         [[(3, 4), (3, 4)]]),
    Case("hinge", lambda s, t: gc.losses.hinge(s, gc.cast(t, s.dtype) * 2.0 - 1.0, reduction="none"),
         lambda s, t: np.maximum(0, 1 - _pm1(t, s.dtype) * s), [[(3, 4), (3, 4)], [(6,), (6,)]],
         int_inputs={1: (0, 2)}),
    Case("hinge_squared", lambda s, t: gc.losses.hinge(s, gc.cast(t, s.dtype) * 2.0 - 1.0, squared=True),
         lambda s, t: np.mean(np.maximum(0, 1 - _pm1(t, s.dtype) * s) ** 2).astype(s.dtype), [[(8,), (8,)]],
         int_inputs={1: (0, 2)}),
    Case("multi_margin", lambda s, y: gc.losses.multi_margin(s, y, reduction="none"), _multi_margin,
         [[(4, 5), (4,)]], int_inputs={1: (0, 5)}),
    Case("multi_margin_p2", lambda s, y: gc.losses.multi_margin(s, y, p=2, margin=0.5, reduction="sum"),
         lambda s, y: _multi_margin(s, y, 2, 0.5).sum().astype(s.dtype), [[(3, 4), (3,)]], int_inputs={1: (0, 4)}),
]
CASES += [
    Case(f"{name}_macro", lambda s, y, m=m: m(s, y), lambda s, y, w=w: _confusion_macro(s, y, w),
         [[(12, 3), (12,)]], int_inputs={1: (0, 3)}, grad=False,
         dtypes=("float32",))
    for w, m, name in ((w, _METRIC[w], {"p": "precision", "r": "recall", "f": "f1"}[w]) for w in "prf")
] + [
    Case(f"{name}_binary", lambda s, t, m=m: m(s, t, threshold=0.0), lambda s, t, w=w: _confusion_binary(s, t, w),
         [[(10,), (10,)], [(2, 5), (2, 5)]], int_inputs={1: (0, 2)}, grad=False,
         dtypes=("float32",))
    for w, m, name in ((w, _METRIC[w], {"p": "precision", "r": "recall", "f": "f1"}[w]) for w in "prf")
]


# ---- rms_norm, rotary_embedding, grid_sample, affine_grid (loop references of the definitions) ----

def _rms_ref(x, w, eps=1e-5):
    y = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps)
    return (y * w).astype(x.dtype)


def _rope_ref(x, cos, sin, pos=None, interleaved=False, rd=None):
    """x (B, H, S, D); cos/sin (B, S, R/2) or (P, R/2) at pos (B, S): rotate each pair by its angle."""
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    out = x.copy()
    d = x.shape[3]
    rd = rd or d
    for b, h, s in itertools.product(*map(range, x.shape[:3])):
        for i in range(rd // 2):
            j, k = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
            c, sn = cos[b, s, i], sin[b, s, i]
            out[b, h, s, j] = c * x[b, h, s, j] - sn * x[b, h, s, k]
            out[b, h, s, k] = sn * x[b, h, s, j] + c * x[b, h, s, k]
    return out


def _keys(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def _fold(u, size, pad, align):
    """A source coordinate under border/reflection padding (the definition, step by step)."""
    if pad == "border":
        return min(max(u, 0.0), size - 1.0)
    if pad == "reflection":
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        span = hi - lo
        if span <= 0:
            return 0.0
        while u < lo or u > hi:
            u = 2 * lo - u if u < lo else 2 * hi - u
        return min(max(u, 0.0), size - 1.0)
    return u


def loop_grid_sample(x, grid, mode="bilinear", pad="zeros", align=False):
    n, c, h, w = x.shape
    oh, ow = grid.shape[1:3]
    y = np.zeros((n, c, oh, ow), np.float64)

    def px(b, ch, i, j):
        if pad != "zeros":
            i, j = int(_fold(i, h, pad, align)), int(_fold(j, w, pad, align))
        return x[b, ch, i, j] if 0 <= i < h and 0 <= j < w else 0.0
    for b, i, j in itertools.product(range(n), range(oh), range(ow)):
        gx, gy = grid[b, i, j]
        ux = (gx + 1) / 2 * (w - 1) if align else ((gx + 1) * w - 1) / 2
        uy = (gy + 1) / 2 * (h - 1) if align else ((gy + 1) * h - 1) / 2
        for ch in range(c):
            if mode == "bicubic":
                x0, y0 = math.floor(ux), math.floor(uy)
                y[b, ch, i, j] = sum(_keys(ux - (x0 + dx)) * _keys(uy - (y0 + dy)) * px(b, ch, y0 + dy, x0 + dx)
                                     for dx in range(-1, 3) for dy in range(-1, 3))
                continue
            fx, fy = _fold(ux, w, pad, align), _fold(uy, h, pad, align)
            if mode == "nearest":
                y[b, ch, i, j] = px(b, ch, int(np.rint(fy)), int(np.rint(fx)))
                continue
            x0, y0 = math.floor(fx), math.floor(fy)
            tx, ty = fx - x0, fy - y0
            y[b, ch, i, j] = ((1 - tx) * (1 - ty) * px(b, ch, y0, x0) + tx * (1 - ty) * px(b, ch, y0, x0 + 1)
                              + (1 - tx) * ty * px(b, ch, y0 + 1, x0) + tx * ty * px(b, ch, y0 + 1, x0 + 1))
    return y.astype(x.dtype)


def loop_affine_grid(theta, size, align=False):
    n, _, h, w = size

    def lin(s):
        v = np.linspace(-1, 1, s) if s > 1 else np.zeros(s)
        return v if align else v * (s - 1) / s
    out = np.zeros((n, h, w, 2), theta.dtype)
    for b, i, j in itertools.product(range(n), range(h), range(w)):
        out[b, i, j] = theta[b] @ np.array([lin(w)[j], lin(h)[i], 1.0])
    return out


CASES += [
    Case("rms_norm", lambda x, w: gc.rms_norm(x, (4,), w, 1e-5), _rms_ref, [[(3, 4), (4,)], [(2, 3, 4), (4,)]]),
    Case("rotary_embedding", lambda x, c, s: gc.rotary_embedding(x, c, s),
         lambda x, c, s: _rope_ref(x, c, s), [[(1, 2, 3, 4), (1, 3, 2), (1, 3, 2)]]),
    Case("rotary_embedding_interleaved_partial", lambda x, c, s, p: gc.rotary_embedding(
        x, c, s, p, interleaved=True, rotary_dim=4),
        lambda x, c, s, p: _rope_ref(x, c, s, p, True, 4), [[(2, 1, 3, 6), (5, 2), (5, 2), (2, 3)]],
        int_inputs={3: (0, 5)}),
] + [
    Case(f"grid_sample_{mode}_{pad}{'_align' if align else ''}",
         lambda x, g, mode=mode, pad=pad, align=align: gc.grid_sample(x, g, mode, pad, align),
         lambda x, g, mode=mode, pad=pad, align=align: loop_grid_sample(x, g, mode, pad, align),
         [[(2, 2, 3, 4), (2, 2, 3, 2)]], grad=mode != "nearest")
    for mode, pad, align in (("bilinear", "zeros", False), ("bilinear", "border", True),
                             ("bilinear", "reflection", False), ("nearest", "reflection", True),
                             ("bicubic", "zeros", False), ("bicubic", "reflection", True))
] + [
    Case("affine_grid", lambda t: gc.affine_grid(t, (2, 1, 3, 4)), lambda t: loop_affine_grid(t, (2, 1, 3, 4)),
         [[(2, 2, 3)]]),
]
