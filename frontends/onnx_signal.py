"""ONNX signal-processing converters: DFT (forward, inverse, one-sided, irfft), STFT, the
Hann/Hamming/Blackman windows and MelWeightMatrix.

A DFT along an axis is a matmul with constant cosine and sine matrices (O(n^2) per transform: the
sizes in models are small, and it differentiates and runs natively everywhere). Windows and the mel
matrix depend only on constant inputs, so they are built as constants at import time.
"""
from __future__ import annotations

import numpy as np

import graphc as gc
from graphc import dtypes as _dt
from .onnx_ops import op


def _scalar(cx, t, what):
    return cx.const(t, what).reshape(-1)[0]


def _fit(x, n: int):
    """x truncated or zero-padded to length n along its last axis."""
    m = x.shape[-1]
    if m > n:
        return x[..., :n]
    if m < n:
        return gc.concatenate([x, gc.constant(np.zeros(tuple(x.shape[:-1]) + (n - m,), x.dtype))], -1)
    return x


def dft_last(re, im, n: int, inverse: bool = False, onesided: bool = False):
    """(re, im) of the DFT of length n along the last axis (im may be None: a real signal).
    Forward one-sided: the first n//2 + 1 bins. Inverse one-sided (irfft): n real samples from
    n//2 + 1 bins (im of the result is None). Inverse transforms are divided by n."""
    dt = re.dtype
    if inverse and onesided:
        bins = n // 2 + 1
        k = np.arange(bins).reshape(bins, 1)
        t = np.arange(n).reshape(1, n)
        w = np.where((k == 0) | (2 * k == n), 1.0, 2.0) / n
        ang = 2 * np.pi * k * t / n
        out = gc.matmul(_fit(re, bins), gc.constant((w * np.cos(ang)).astype(dt)))
        if im is not None:
            out = out - gc.matmul(_fit(im, bins), gc.constant((w * np.sin(ang)).astype(dt)))
        return out, None
    bins = n // 2 + 1 if onesided and not inverse else n
    t = np.arange(n).reshape(n, 1)
    k = np.arange(bins).reshape(1, bins)
    ang = 2 * np.pi * ((t * k) % n) / n
    c, s = np.cos(ang), np.sin(ang)
    if inverse:
        c, s = c / n, -s / n
    C, S = gc.constant(c.astype(dt)), gc.constant(s.astype(dt))
    re = _fit(re, n)
    out_re, out_im = gc.matmul(re, C), -gc.matmul(re, S)
    if im is not None:
        im = _fit(im, n)
        out_re = out_re + gc.matmul(im, S)
        out_im = out_im + gc.matmul(im, C)
    return out_re, out_im


def _dft_axis(x, axis: int, n: int | None, inverse: bool, onesided: bool):
    """ONNX's layout: x (..., 1 or 2) with the signal along `axis`; result (..., 1 or 2)."""
    dt = _dt.compute_dtype(x.dtype)
    xf = gc.cast(x, dt)
    re = xf[..., 0]
    im = xf[..., 1] if x.shape[-1] == 2 else None
    perm = [i for i in range(re.ndim) if i != axis] + [axis]
    back = list(np.argsort(perm))
    re = gc.transpose(re, perm)
    im = gc.transpose(im, perm) if im is not None else None
    if n is None:
        n = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    out_re, out_im = dft_last(re, im, n, inverse, onesided)
    parts = [gc.transpose(out_re, back)] + ([gc.transpose(out_im, back)] if out_im is not None else [])
    return gc.cast(gc.stack(parts, -1), x.dtype)


@op("DFT")
def _dft(cx, ins, a):
    x = ins[0]
    n = int(_scalar(cx, ins[1], "dft_length")) if len(ins) > 1 and ins[1] is not None else None
    if cx.opset >= 20:
        axis = int(_scalar(cx, ins[2], "axis")) if len(ins) > 2 and ins[2] is not None else -2
    else:
        axis = a.get("axis", 1)
    axis %= x.ndim
    if axis == x.ndim - 1:
        raise cx.unsupported("the DFT axis cannot be the last (real/imaginary) axis")
    return _dft_axis(x, axis, n, bool(a.get("inverse", 0)), bool(a.get("onesided", 0)))


@op("STFT")
def _stft(cx, ins, a):
    """Frames of the signal (batch, length, 1 or 2), each windowed and transformed: (batch, frames, bins, 2)."""
    ins = list(ins) + [None] * (4 - len(ins))
    x, step_t, window, length_t = ins[:4]
    step = int(_scalar(cx, step_t, "frame_step"))
    if length_t is not None:
        flen = int(_scalar(cx, length_t, "frame_length"))
    elif window is not None:
        flen = window.shape[0]
    else:
        flen = x.shape[-2]
    frames = 1 + (x.shape[-2] - flen) // step
    seq = gc.stack([x[:, f * step:f * step + flen, :] for f in range(frames)], 1)   # (B, F, L, c)
    if window is not None:
        seq = seq * gc.reshape(gc.cast(window, x.dtype), (1, 1, flen, 1))
    return _dft_axis(seq, 2, flen, False, bool(a.get("onesided", 1)))


def _window(kind):
    def conv(cx, ins, a):
        from .onnx_import import onnx_dtype
        size = int(_scalar(cx, ins[0], "size"))
        n = np.arange(size, dtype=np.float64)
        span = size if a.get("periodic", 1) else size - 1
        ang = 2 * np.pi * n / span if span else np.zeros(size)
        if kind == "hann":
            w = np.sin(ang / 2) ** 2
        elif kind == "hamming":
            w = 25 / 46 - 21 / 46 * np.cos(ang)
        else:
            w = 0.42 - 0.5 * np.cos(ang) + 0.08 * np.cos(2 * ang)
        dt = onnx_dtype(a.get("output_datatype", 1))
        return gc.constant(w.astype(_dt.np_dtype(dt)), dt)
    return conv


for _n, _k in (("HannWindow", "hann"), ("HammingWindow", "hamming"), ("BlackmanWindow", "blackman")):
    op(_n)(_window(_k))


@op("MelWeightMatrix")
def _mel_weight_matrix(cx, ins, a):
    """Triangular filters on the mel scale, (dft_length // 2 + 1, num_mel_bins), as the ONNX spec
    defines them (bin edges on the integer spectrogram grid)."""
    from .onnx_import import onnx_dtype
    mels, n_fft, rate = (int(_scalar(cx, t, w)) for t, w in zip(ins[:3], ("num_mel_bins", "dft_length", "sample_rate")))
    lo, hi = (float(_scalar(cx, t, w)) for t, w in zip(ins[3:5], ("lower_edge_hertz", "upper_edge_hertz")))
    to_mel = lambda f: 2595 * np.log10(1 + f / 700)     # noqa: E731
    edges_mel = to_mel(lo) + np.arange(mels + 2) * (to_mel(hi) - to_mel(lo)) / (mels + 2)
    edges = ((n_fft + 1) * 700 * (10 ** (edges_mel / 2595) - 1) // rate).astype(int)
    out = np.zeros((n_fft // 2 + 1, mels))
    for i in range(mels):
        left, centre, right = edges[i:i + 3]
        if centre == left:
            out[centre, i] = 1
        else:
            j = np.arange(left, centre + 1)
            out[j, i] = (j - left) / (centre - left)
        if right > centre:
            j = np.arange(centre, right)
            out[j, i] = (right - j) / (right - centre)
    dt = onnx_dtype(a.get("output_datatype", 1))
    return gc.constant(out.astype(_dt.np_dtype(dt)), dt)
