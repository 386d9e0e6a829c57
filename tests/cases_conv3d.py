"""Op-table rows for 3-D convolution, transposed 2-D convolution, 3-D pooling and padding='full'
(graphc.ops.nn_ops: compositions of the 2-D ops), against references written as direct loops over
output (or input) positions by the definitions, at tiny sizes. The table runs each row on every
backend in float32 and float64 and checks its gradient by finite differences (test_grad_ops)."""
from __future__ import annotations

import itertools

import numpy as np

import graphc as gc
from op_table import Case


def _padded(x, pads, fill=0.0):
    return np.pad(x, ((0, 0), (0, 0)) + tuple(pads), constant_values=fill)


def loop_conv3d(x, w, stride=(1, 1, 1), pads=((0, 0),) * 3, dil=(1, 1, 1), groups=1):
    """y[n, o, i, j, k] = sum_{c, a, b, e} xpad[n, g*Cg + c, i*s0 + a*d0, j*s1 + b*d1, k*s2 + e*d2] w[o, c, a, b, e]."""
    xp = _padded(x, pads)
    o, cg = w.shape[:2]
    ks = w.shape[2:]
    out = [(xp.shape[2 + a] - dil[a] * (ks[a] - 1) - 1) // stride[a] + 1 for a in range(3)]
    y = np.zeros((x.shape[0], o) + tuple(out), x.dtype)
    og = o // groups
    for n, oc, i, j, k in itertools.product(range(x.shape[0]), range(o), *map(range, out)):
        g = oc // og
        acc = 0.0
        for c, a, b, e in itertools.product(range(cg), *map(range, ks)):
            acc += xp[n, g * cg + c, i * stride[0] + a * dil[0], j * stride[1] + b * dil[1],
                      k * stride[2] + e * dil[2]] * w[oc, c, a, b, e]
        y[n, oc, i, j, k] = acc
    return y


def loop_conv_transpose2d(x, w, stride=(1, 1), pad=(0, 0), opad=(0, 0), groups=1, dil=(1, 1)):
    """By the definition: each input pixel scatters x[n, ci, i, j] * w[ci, co, a, b] to the full output
    at (i*s + a*d, j*s + b*d); the result is the full output from `pad` on, output_padding rows/columns
    past its end being zeros (torch.nn.functional.conv_transpose2d)."""
    n, cin, h, wd = x.shape
    cog, kh, kw = w.shape[1:]
    cig = cin // groups
    full = np.zeros((n, cog * groups, (h - 1) * stride[0] + dil[0] * (kh - 1) + 1 + opad[0],
                     (wd - 1) * stride[1] + dil[1] * (kw - 1) + 1 + opad[1]), x.dtype)
    for b_, ci, i, j, co, a, b in itertools.product(range(n), range(cin), range(h), range(wd), range(cog),
                                                    range(kh), range(kw)):
        full[b_, (ci // cig) * cog + co, i * stride[0] + a * dil[0], j * stride[1] + b * dil[1]] += \
            x[b_, ci, i, j] * w[ci, co, a, b]
    oh = (h - 1) * stride[0] - 2 * pad[0] + dil[0] * (kh - 1) + opad[0] + 1
    ow = (wd - 1) * stride[1] - 2 * pad[1] + dil[1] * (kw - 1) + opad[1] + 1
    return full[:, :, pad[0]:pad[0] + oh, pad[1]:pad[1] + ow]


def loop_pool3d(x, k, s, p, reduce, fill):
    xp = _padded(x, [(q, q) for q in p], fill)
    out = [(xp.shape[2 + a] - k[a]) // s[a] + 1 for a in range(3)]
    y = np.zeros(x.shape[:2] + tuple(out), x.dtype)
    for n, c, i, j, m in itertools.product(range(x.shape[0]), range(x.shape[1]), *map(range, out)):
        y[n, c, i, j, m] = reduce(xp[n, c, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1],
                                     m * s[2]:m * s[2] + k[2]])
    return y


def _avg_no_pad(x, k, s, p):
    return loop_pool3d(x, k, s, p, np.sum, 0) / loop_pool3d(np.ones_like(x), k, s, p, np.sum, 0)


# (x shape, w shape, stride, pads, dilation, groups)
_CONV3D = [((2, 2, 3, 4, 3), (3, 2, 2, 2, 2), (1, 1, 1), ((0, 0),) * 3, (1, 1, 1), 1),
           ((1, 4, 5, 4, 5), (4, 2, 3, 2, 3), (2, 1, 2), ((1, 1), (0, 1), (1, 0)), (1, 2, 1), 2),
           ((1, 3, 4, 3, 3), (3, 1, 2, 3, 1), (1, 2, 1), ((1, 1), (1, 1), (0, 0)), (2, 1, 1), 3)]

# (x shape, w shape, stride, padding, output_padding, groups, dilation)
_CONVT = [((2, 3, 3, 2), (3, 2, 2, 3), (1, 1), (0, 0), (0, 0), 1, (1, 1)),
          ((1, 4, 3, 3), (4, 1, 3, 2), (2, 3), (1, 0), (1, 2), 2, (1, 2)),
          ((1, 2, 2, 3), (2, 2, 3, 3), (2, 1), (0, 1), (1, 1), 1, (1, 2)),   # output_padding > padding
          ((1, 2, 3, 2), (2, 3, 2, 2), (3, 2), (2, 1), (2, 0), 1, (1, 1))]

# (x shape, kernel, stride, padding)
_POOL3D = [((2, 2, 4, 4, 5), (2, 2, 2), (2, 2, 2), (0, 0, 0)),
           ((1, 2, 5, 4, 5), (3, 2, 3), (2, 1, 2), (1, 1, 1))]

CASES = []
for _i, (_xs, _ws, _st, _pads, _dil, _g) in enumerate(_CONV3D):
    CASES.append(Case(f"conv3d_{_i}",
                      lambda x, w, b, st=_st, pads=_pads, dil=_dil, g=_g: gc.conv3d(x, w, b, st, pads, dil, g),
                      lambda x, w, b, st=_st, pads=_pads, dil=_dil, g=_g:
                          loop_conv3d(x, w, st, pads, dil, g) + b[:, None, None, None],
                      [[_xs, _ws, (_ws[0],)]]))
for _i, (_xs, _ws, _st, _p, _op, _g, _dil) in enumerate(_CONVT):
    CASES.append(Case(f"conv_transpose2d_{_i}",
                      lambda x, w, b, st=_st, p=_p, op=_op, g=_g, dil=_dil:
                          gc.conv_transpose2d(x, w, b, st, p, op, g, dil),
                      lambda x, w, b, st=_st, p=_p, op=_op, g=_g, dil=_dil:
                          loop_conv_transpose2d(x, w, st, p, op, g, dil) + b[:, None, None],
                      [[_xs, _ws, (_ws[1] * _g,)]]))
for _i, (_xs, _k, _s, _p) in enumerate(_POOL3D):
    CASES += [
        Case(f"max_pool3d_{_i}", lambda x, k=_k, s=_s, p=_p: gc.max_pool3d(x, k, s, p),
             lambda x, k=_k, s=_s, p=_p: loop_pool3d(x, k, s, p, np.max, -np.inf), [[_xs]]),
        Case(f"avg_pool3d_{_i}", lambda x, k=_k, s=_s, p=_p: gc.avg_pool3d(x, k, s, p),
             lambda x, k=_k, s=_s, p=_p: loop_pool3d(x, k, s, p, lambda v: v.sum() / np.prod(k), 0), [[_xs]]),
    ]
CASES += [
    Case("avg_pool3d_no_pad_count", lambda x: gc.avg_pool3d(x, 3, (1, 2, 2), 1, count_include_pad=False),
         lambda x: _avg_no_pad(x, (3, 3, 3), (1, 2, 2), (1, 1, 1)), [[(1, 2, 3, 4, 5)]]),
    Case("max_pool3d_default_stride", lambda x: gc.max_pool3d(x, 2),
         lambda x: loop_pool3d(x, (2, 2, 2), (2, 2, 2), (0, 0, 0), np.max, -np.inf), [[(1, 1, 3, 5, 4)]]),
    # padding="full": kernel - 1 (dilated) on each side, Theano's border mode
    Case("conv3d_full", lambda x, w: gc.conv3d(x, w, padding="full"),
         lambda x, w: loop_conv3d(x, w, pads=((1, 1), (2, 2), (0, 0))), [[(1, 2, 2, 3, 2), (2, 2, 2, 3, 1)]]),
    Case("conv2d_full", lambda x, w: gc.conv2d(x, w, padding="full", dilation=(1, 2)),
         lambda x, w: loop_conv3d(x[:, :, None], w[:, :, None], pads=((0, 0), (2, 2), (2, 2)),
                                  dil=(1, 1, 2))[:, :, 0], [[(2, 2, 3, 4), (3, 2, 3, 2)]]),
    Case("conv1d_full", lambda x, w: gc.conv1d(x, w, padding="full", stride=2),
         lambda x, w: loop_conv3d(x[:, :, None, None], w[:, :, None, None], (1, 1, 2),
                                  ((0, 0), (0, 0), (2, 2)))[:, :, 0, 0], [[(2, 3, 5), (2, 3, 3)]]),
]
