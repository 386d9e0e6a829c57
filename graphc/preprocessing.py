"""gc.preprocessing: data preprocessing and augmentation as graph ops, so they compile with the model on
every backend (compositions of existing ops: no backend code).

Fitted transforms, in scikit-learn's style: `.fit(array)` computes the statistics with NumPy (float64);
`.transform(x)` (or calling the object, so it sits in `gc.nn.Sequential`) builds graph ops from them
(subtract, scale, matmul by the fitted matrix); `.inverse_transform(y)` undoes it. Fit before building
the graph: the statistics are constants of the graphs built from them. Given a NumPy array instead of a
tensor, `transform` / `inverse_transform` return the array the same ops compute.

    Standardize(axis=0)            (x - mean) / std                      (StandardScaler)
    MinMax(feature_range=(0, 1))   x * scale + min                       (MinMaxScaler)
    PCAWhiten(n_components, eps)   (x - mean) @ U_k / sqrt(var_k + eps)  (PCA(whiten=True))
    ZCAWhiten(eps)                 (x - mean) @ U diag(1/sqrt(var + eps)) U.T (symmetric)

`local_contrast_normalize(x, kernel_size, sigma, eps)` (Jarrett et al. 2009, pylearn2's LCN): subtractive
then divisive normalisation with a Gaussian window, as conv2d ops.

Augmentation driven by `gc.random` (counter-based: reproducible by seed, a fresh draw on every
training-mode call of a compiled function, the same numbers on every backend), one draw per sample
(axis 0): `random_crop(x, size, padding)`, `random_flip(x, axis, p)`, `gaussian_noise(x, std)`. Each
takes `training` (identity when False; `random_crop` then takes the centre crop) and `generator=`,
`key=` or `seed=` as `gc.random.uniform` does. Module versions (`RandomCrop`, `RandomFlip`,
`GaussianNoise`, `LocalContrastNormalize`) follow `.train()` / `.eval()` in `gc.nn.Sequential`.
"""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from . import dtypes as _dt
from . import shapes as _sh
from .errors import DTypeError, GraphcError, ShapeError
from .ir import Tensor
from .nn.module import Module
from .ops import random as _random
from .ops.core import as_tensor, constant

__all__ = ["Standardize", "MinMax", "PCAWhiten", "ZCAWhiten", "local_contrast_normalize", "gaussian_window",
           "random_crop", "random_flip", "gaussian_noise", "RandomCrop", "RandomFlip", "GaussianNoise",
           "LocalContrastNormalize"]


def _float_tensor(x, owner: str) -> Tensor:
    x = as_tensor(x)
    if not _dt.is_float(x.dtype):
        raise DTypeError(f"{owner}: expected a float tensor, got {x.label} of dtype {x.dtype}")
    return x


def _const(a: np.ndarray, dtype: str) -> Tensor:
    return constant(np.asarray(a, dtype=dtype))


def _data(X, owner: str, min_ndim: int = 2) -> np.ndarray:
    """`X` as a float64 array of at least `min_ndim` dims (samples on axis 0)."""
    if isinstance(X, Tensor):
        raise GraphcError(f"{owner}.fit: expected data (a NumPy array), got the symbolic tensor {X.label}; "
                          "fit on arrays, then transform tensors")
    try:
        a = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GraphcError(f"{owner}.fit: cannot use {type(X).__name__} as numeric data: {e}") from None
    if a.ndim < min_ndim or a.shape[0] < 1:
        raise ShapeError(f"{owner}.fit: expected an array of shape (samples, features...), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise GraphcError(f"{owner}.fit: the data contain NaN or Inf")
    return a


class _Fitted(Module):
    """A transform with statistics fitted on data; a Module without parameters (its statistics are graph
    constants), so it sits in gc.nn.Sequential."""

    feature_shape: tuple | None = None

    def fit(self, X) -> "_Fitted":
        raise NotImplementedError

    def fit_transform(self, X):
        """fit(X), then transform(X) (an array, computed by the same graph ops)."""
        return self.fit(X).transform(X)

    def _check(self, x: Tensor, what: str = "transform") -> None:
        name = type(self).__name__
        if self.feature_shape is None:
            raise GraphcError(f"{name}.{what}: not fitted yet; call .fit(data) first")
        want = self.feature_shape
        if x.ndim != len(want) + 1 or not all(_sh.dims_equal(a, b) for a, b in zip(x.shape[1:], want)):
            raise ShapeError(f"{name}.{what}: expected (samples,) + {tuple(want)} like the data it was fitted on, "
                             f"got {x.label} of shape {_sh.fmt_shape(x.shape)}")

    def _apply(self, fn, x, what: str):
        if isinstance(x, Tensor):
            x = _float_tensor(x, f"{type(self).__name__}.{what}")
            self._check(x, what)
            return fn(x)
        a = np.asarray(x)
        a = a.astype(np.float64) if a.dtype.kind not in "f" else a
        t = constant(a)
        self._check(t, what)
        from .reference import evaluate
        return evaluate([fn(t)], {})[0]

    def transform(self, x):
        return self._apply(self._forward, x, "transform")

    def inverse_transform(self, y):
        return self._apply(self._inverse, y, "inverse_transform")

    def forward(self, x, training):
        return self.transform(x)

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError


def _stat_axes(axis, ndim: int, owner: str) -> tuple:
    axes = _sh.normalize_axes(axis, ndim, owner)
    if 0 not in axes:
        raise GraphcError(f"{owner}: axis={axis!r} must include 0 (the samples)")
    return axes


class Standardize(_Fitted):
    """(x - mean) / std, the statistics over `axis` of the data (default 0: per feature, as scikit-learn's
    StandardScaler; `axis=(0, 2, 3)` for per-channel statistics of NCHW images). A constant feature
    (std 0) is only centred. `with_mean=False` / `with_std=False` skip either step."""

    def __init__(self, axis=0, with_mean: bool = True, with_std: bool = True):
        super().__init__()
        self.axis, self.with_mean, self.with_std = axis, bool(with_mean), bool(with_std)
        self.mean_ = self.scale_ = None

    def fit(self, X) -> "Standardize":
        a = _data(X, "Standardize")
        axes = _stat_axes(self.axis, a.ndim, "Standardize")
        mean = a.mean(axis=axes, keepdims=True)[0]
        std = a.std(axis=axes, keepdims=True)[0]
        self.mean_ = mean if self.with_mean else np.zeros_like(mean)
        self.scale_ = np.where(std > 0, std, 1.0) if self.with_std else np.ones_like(std)
        self.feature_shape = a.shape[1:]
        return self

    def _forward(self, x):
        return (x - _const(self.mean_, x.dtype)) / _const(self.scale_, x.dtype)

    def _inverse(self, y):
        return y * _const(self.scale_, y.dtype) + _const(self.mean_, y.dtype)

    def extra_repr(self):
        return f"axis={self.axis!r}"


class MinMax(_Fitted):
    """Scale each feature to `feature_range` by the data's minimum and maximum over `axis` (scikit-learn's
    MinMaxScaler: x * scale + min); a constant feature maps to the range's low end."""

    def __init__(self, feature_range=(0.0, 1.0), axis=0):
        super().__init__()
        lo, hi = feature_range
        if not lo < hi:
            raise GraphcError(f"MinMax: feature_range must be (low, high) with low < high, got {feature_range!r}")
        self.feature_range, self.axis = (float(lo), float(hi)), axis
        self.scale_ = self.min_ = None

    def fit(self, X) -> "MinMax":
        a = _data(X, "MinMax")
        axes = _stat_axes(self.axis, a.ndim, "MinMax")
        dmin, dmax = a.min(axis=axes, keepdims=True)[0], a.max(axis=axes, keepdims=True)[0]
        rng = dmax - dmin
        lo, hi = self.feature_range
        self.scale_ = (hi - lo) / np.where(rng > 0, rng, 1.0)
        self.min_ = lo - dmin * self.scale_
        self.data_min_, self.data_max_ = dmin, dmax
        self.feature_shape = a.shape[1:]
        return self

    def _forward(self, x):
        return x * _const(self.scale_, x.dtype) + _const(self.min_, x.dtype)

    def _inverse(self, y):
        return (y - _const(self.min_, y.dtype)) / _const(self.scale_, y.dtype)

    def extra_repr(self):
        return f"feature_range={self.feature_range}"


def _eig_cov(a: np.ndarray):
    """mean (D,), eigenvalues (descending) and eigenvectors (columns) of the covariance (n - 1 in the
    denominator, as scikit-learn's PCA) of samples `a` (n, D); each eigenvector's largest-magnitude entry is
    made positive (a deterministic sign)."""
    n = a.shape[0]
    if n < 2:
        raise ShapeError(f"whitening needs at least 2 samples to estimate a covariance, got {n}")
    mean = a.mean(axis=0)
    c = a - mean
    cov = c.T @ c / (n - 1)
    lam, u = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    lam, u = np.clip(lam[order], 0.0, None), u[:, order]
    big = np.argmax(np.abs(u), axis=0)
    u = u * np.sign(u[big, np.arange(u.shape[1])])
    return mean, lam, u


def _flatten(x: Tensor) -> Tensor:
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""
    return x if x.ndim == 2 else F.reshape(x, (x.shape[0], _sh.size(x.shape[1:])))


class _Whiten(_Fitted):
    def __init__(self, eps: float):
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise GraphcError(f"{type(self).__name__}: eps must be a number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.mean_ = self.matrix_ = self.inverse_matrix_ = None

    def _fit_flat(self, X) -> np.ndarray:
        a = _data(X, type(self).__name__)
        self.feature_shape = a.shape[1:]
        return a.reshape(a.shape[0], -1)

    def _forward(self, x):
        flat = _flatten(x)
        return (flat - _const(self.mean_, x.dtype)) @ _const(self.matrix_, x.dtype)

    def _inverse_flat(self, y):
        return y @ _const(self.inverse_matrix_, y.dtype) + _const(self.mean_, y.dtype)


class PCAWhiten(_Whiten):
    """Project centred samples on the first `n_components` principal axes and scale each to unit variance:
    (x - mean) @ U_k / sqrt(var_k + eps), (samples, features...) -> (samples, n_components); scikit-learn's
    PCA(n_components, whiten=True) when eps=0 (same signs: each axis's largest entry is positive). The
    covariance of the output on the fitted data is ~ the identity."""

    def __init__(self, n_components: int | None = None, eps: float = 1e-5):
        super().__init__(eps)
        if n_components is not None and (isinstance(n_components, bool) or not isinstance(n_components, int)
                                         or n_components < 1):
            raise GraphcError(f"PCAWhiten: n_components must be None or an int >= 1, got {n_components!r}")
        self.n_components = n_components
        self.components_ = self.explained_variance_ = None

    def fit(self, X) -> "PCAWhiten":
        a = self._fit_flat(X)
        k = self.n_components or min(a.shape)
        if k > a.shape[1]:
            raise ShapeError(f"PCAWhiten: n_components={k} but the data have {a.shape[1]} features")
        mean, lam, u = _eig_cov(a)
        if self.eps == 0 and np.any(lam[:k] <= 0):
            raise GraphcError(f"PCAWhiten: component(s) of zero variance among the first {k}; give eps > 0 or "
                              f"fewer n_components")
        scale = np.sqrt(lam[:k] + self.eps)
        self.mean_, self.components_, self.explained_variance_ = mean, u[:, :k].T, lam[:k]
        self.matrix_ = u[:, :k] / scale
        self.inverse_matrix_ = scale[:, None] * u[:, :k].T
        return self

    def _check(self, x, what="transform"):
        if what == "inverse_transform" and self.feature_shape is not None:
            k = self.matrix_.shape[1]
            if x.ndim != 2 or not _sh.dims_equal(x.shape[1], k):
                raise ShapeError(f"PCAWhiten.inverse_transform: expected (samples, {k}), got {x.label} of "
                                 f"shape {_sh.fmt_shape(x.shape)}")
            return
        super()._check(x, what)

    def _inverse(self, y):
        flat = self._inverse_flat(y)
        return F.reshape(flat, (y.shape[0],) + tuple(self.feature_shape)) if len(self.feature_shape) != 1 else flat

    def extra_repr(self):
        return f"n_components={self.n_components}, eps={self.eps}"


class ZCAWhiten(_Whiten):
    """Zero-phase whitening: (x - mean) @ W with the symmetric W = U diag(1/sqrt(var + eps)) U.T, the
    whitening closest to the data (images stay images); the output has the input's shape and, on the
    fitted data, a covariance ~ the identity (eps > 0 damps the small-variance directions)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__(eps)

    def fit(self, X) -> "ZCAWhiten":
        a = self._fit_flat(X)
        mean, lam, u = _eig_cov(a)
        if self.eps == 0 and np.any(lam <= 0):
            raise GraphcError("ZCAWhiten: the covariance is singular (fewer samples than features, or "
                              "dependent features); give eps > 0")
        scale = np.sqrt(lam + self.eps)
        self.mean_ = mean
        self.matrix_ = (u / scale) @ u.T
        self.matrix_ = (self.matrix_ + self.matrix_.T) / 2          # exactly symmetric
        self.inverse_matrix_ = (u * scale) @ u.T
        return self

    def _forward(self, x):
        y = super()._forward(x)
        return F.reshape(y, x.shape) if x.ndim != 2 else y

    def _inverse(self, y):
        flat = self._inverse_flat(_flatten(y))
        return F.reshape(flat, y.shape) if y.ndim != 2 else flat

    def extra_repr(self):
        return f"eps={self.eps}"


# ---- local contrast normalisation -----------------------------------------------------------------

def gaussian_window(kernel_size: int, sigma: float = 2.0) -> np.ndarray:
    """A (k, k) Gaussian window (std `sigma`, centred) normalised to sum 1 (pylearn2's gaussian_filter)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise GraphcError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if not sigma > 0:
        raise GraphcError(f"sigma must be > 0, got {sigma!r}")
    r = np.arange(kernel_size) - kernel_size // 2
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma ** 2))
    return w / w.sum()


def local_contrast_normalize(x, kernel_size: int = 9, sigma: float = 2.0, eps: float = 1e-4,
                             across_channels: bool = True) -> Tensor:
    """Local contrast normalisation (Jarrett et al. 2009; pylearn2's LCN) of images (N, C, H, W) or
    (N, H, W): with w a Gaussian window summing to 1 over the k x k neighbourhood (and the channels,
    `across_channels`; else each channel alone)::

        v = x - sum_{c,p,q} w_pq x_{c, i+p, j+q}            (subtractive)
        s = sqrt(sum_{c,p,q} w_pq v^2_{c, i+p, j+q})
        y = v / max(mean_image(s), s, eps)                 (divisive; mean over each image's map)

    as conv2d ops with zero padding (the output has the input's shape)."""
    x = _float_tensor(x, "local_contrast_normalize")
    if x.ndim not in (3, 4):
        raise ShapeError(f"local_contrast_normalize: expected images (N, C, H, W) or (N, H, W), got "
                         f"{x.label} of shape {_sh.fmt_shape(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise GraphcError(f"local_contrast_normalize: eps must be a number > 0, got {eps!r}")
    squeeze = x.ndim == 3
    if squeeze:
        x = F.expand_dims(x, 1)
    c = x.shape[1]
    if not isinstance(c, int):
        raise ShapeError(f"local_contrast_normalize: the channel dim must be concrete, got {c}")
    w = gaussian_window(kernel_size, sigma)
    if across_channels:
        kern, groups = np.broadcast_to(w / c, (1, c) + w.shape), 1
    else:
        kern, groups = np.broadcast_to(w, (c, 1) + w.shape), c
    kern = _const(np.ascontiguousarray(kern), x.dtype)
    pad = kernel_size // 2
    v = x - F.conv2d(x, kern, padding=pad, groups=groups)
    s = F.sqrt(F.conv2d(v * v, kern, padding=pad, groups=groups))
    per_image = F.mean(s, axis=(1, 2, 3), keepdims=True)
    y = v / F.maximum(F.maximum(s, per_image), eps)
    return F.squeeze(y, 1) if squeeze else y


# ---- augmentation ----------------------------------------------------------------------------------

def _pair(v, what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) \
        else None
    if t is None or len(t) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t):
        raise GraphcError(f"{what} must be an int or a pair of ints >= 0, got {v!r}")
    return t


def _per_sample(t: Tensor, ndim: int) -> Tensor:
    """(N,) -> (N, 1, ..., 1) of rank `ndim`."""
    return F.reshape(t, (t.shape[0],) + (1,) * (ndim - 1))


def _draw_kw(generator, key, seed) -> dict:
    return dict(generator=generator, key=key, seed=seed)


def _selection(offset: Tensor, out_len: int, in_len: int, pad: int, dtype: str) -> Tensor:
    """S[n, i, j] = 1 where j == i + offset[n] - pad (a crop of a zero-padded axis as a 0/1 matrix; rows
    that fall in the padding are zero): (N, out_len, in_len) from offsets (N, 1, 1)."""
    d = np.arange(in_len)[None, :] - np.arange(out_len)[:, None] + pad
    return F.cast(F.equal(_const(d, dtype), offset), dtype)


def random_crop(x, size, padding=0, training: bool = True, generator=None, key=None, seed=None) -> Tensor:
    """A random (h, w) window of each sample's last two axes (images (N, C, H, W) or (N, H, W)), after
    zero-padding them by `padding` (an int or (ph, pw)) on both sides (torchvision's RandomCrop); each
    sample draws its own offsets, uniform over the (H + 2 ph - h + 1) x (W + 2 pw - w + 1) positions. Not
    training: the centre window (the identity when (h, w) = (H, W)). The crop is two batched matmuls with
    0/1 selection matrices, so gradients flow to x."""
    x = _float_tensor(x, "random_crop")
    if x.ndim < 3:
        raise ShapeError(f"random_crop: expected samples of images (N, ..., H, W), got {x.label} of shape "
                         f"{_sh.fmt_shape(x.shape)}")
    h, w = _pair(size, "random_crop: size")
    ph, pw = _pair(padding, "random_crop: padding")
    H, W = x.shape[-2:]
    if not (isinstance(H, int) and isinstance(W, int)):
        raise ShapeError(f"random_crop: the image dims must be concrete, got {_sh.fmt_shape(x.shape)}")
    if not (1 <= h <= H + 2 * ph and 1 <= w <= W + 2 * pw):
        raise ShapeError(f"random_crop: size {(h, w)} does not fit images {(H, W)} padded by {(ph, pw)}")
    ry, rx = H + 2 * ph - h, W + 2 * pw - w          # largest offsets into the padded image
    if not training:
        oy, ox = ry // 2 - ph, rx // 2 - pw              # the centre window, in unpadded coordinates
        if 0 <= oy and oy + h <= H and 0 <= ox and ox + w <= W:
            if (h, w) == (H, W):
                return x
            return x[(Ellipsis, slice(oy, oy + h), slice(ox, ox + w))]
        offy, offx = _const(np.full((1, 1, 1), ry // 2), x.dtype), _const(np.full((1, 1, 1), rx // 2), x.dtype)
    else:
        u = _random.uniform((x.shape[0], 2), dtype="float32", **_draw_kw(generator, key, seed))
        off = F.minimum(F.floor(u * _const(np.array([ry + 1, rx + 1]), "float32")),
                        _const(np.array([ry, rx]), "float32"))      # u < 1, but rounding may reach ry + 1
        off = F.cast(off, x.dtype)
        offy, offx = (F.reshape(off[:, k], (x.shape[0], 1, 1)) for k in (0, 1))
    sy = _selection(offy, h, H, ph, x.dtype)                        # (N, h, H)
    sxt = F.swapaxes(_selection(offx, w, W, pw, x.dtype), -1, -2)  # (N, W, w)
    for _ in range(x.ndim - 3):                                     # broadcast over channels
        sy, sxt = F.expand_dims(sy, 1), F.expand_dims(sxt, 1)
    return sy @ x @ sxt


def random_flip(x, axis: int = -1, p: float = 0.5, training: bool = True, generator=None, key=None,
                seed=None) -> Tensor:
    """Reverse each sample along `axis` with probability p (one draw per sample; axis -1 of NCHW images
    is torchvision's RandomHorizontalFlip, -2 the vertical one); the identity when not training."""
    x = as_tensor(x)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise GraphcError(f"random_flip: p must be a probability in [0, 1], got {p!r}")
    ax = _sh.normalize_axis(axis, x.ndim, "random_flip")
    if ax == 0:
        raise GraphcError("random_flip: axis 0 holds the samples; flip an axis of each sample")
    if not isinstance(x.shape[ax], int):
        raise ShapeError(f"random_flip: axis {axis} must have a concrete size, got {x.shape[ax]}")
    if not training or p == 0:
        return x
    flipped = x[(slice(None),) * ax + (slice(None, None, -1),)]
    if p == 1:
        return flipped
    u = _random.uniform((x.shape[0],), dtype="float32", **_draw_kw(generator, key, seed))
    return F.where(_per_sample(F.less(u, float(p)), x.ndim), flipped, x)


def gaussian_noise(x, std: float, training: bool = True, generator=None, key=None, seed=None) -> Tensor:
    """x + N(0, std^2) noise, a fresh draw per element and call; the identity when not training."""
    x = _float_tensor(x, "gaussian_noise")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
        raise GraphcError(f"gaussian_noise: std must be a number >= 0, got {std!r}")
    if not training or std == 0:
        return x
    return x + _random.normal(x.shape, std=float(std), dtype=x.dtype, **_draw_kw(generator, key, seed))


class _Augment(Module):
    """A random augmentation layer: its own generator (seeded by `seed`, or the one given, else
    gc.random's default); active in training mode, the identity (centre crop) in eval mode."""

    def __init__(self, seed: int | None = None, generator: _random.Generator | None = None):
        super().__init__()
        self.generator = generator or (_random.Generator(seed, f"{self.prefix}.rng") if seed is not None else None)


class RandomCrop(_Augment):
    """random_crop as a layer: RandomCrop(32, padding=4) for CIFAR-style training."""

    def __init__(self, size, padding=0, seed: int | None = None, generator=None):
        super().__init__(seed, generator)
        self.size, self.padding = _pair(size, "RandomCrop: size"), _pair(padding, "RandomCrop: padding")

    def forward(self, x, training):
        return random_crop(x, self.size, self.padding, training, generator=self.generator)

    def extra_repr(self):
        return f"size={self.size}, padding={self.padding}"


class RandomFlip(_Augment):
    """random_flip as a layer (axis=-1: horizontal flips of NCHW images)."""

    def __init__(self, axis: int = -1, p: float = 0.5, seed: int | None = None, generator=None):
        super().__init__(seed, generator)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise GraphcError(f"RandomFlip: p must be a probability in [0, 1], got {p!r}")
        self.axis, self.p = axis, p

    def forward(self, x, training):
        return random_flip(x, self.axis, self.p, training, generator=self.generator)

    def extra_repr(self):
        return f"axis={self.axis}, p={self.p}"


class GaussianNoise(_Augment):
    """gaussian_noise as a layer (additive noise in training, the identity in eval mode)."""

    def __init__(self, std: float, seed: int | None = None, generator=None):
        super().__init__(seed, generator)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
            raise GraphcError(f"GaussianNoise: std must be a number >= 0, got {std!r}")
        self.std = std

    def forward(self, x, training):
        return gaussian_noise(x, self.std, training, generator=self.generator)

    def extra_repr(self):
        return f"std={self.std}"


class LocalContrastNormalize(Module):
    """local_contrast_normalize as a layer (no parameters; the same in training and eval mode)."""

    def __init__(self, kernel_size: int = 9, sigma: float = 2.0, eps: float = 1e-4, across_channels: bool = True):
        super().__init__()
        gaussian_window(kernel_size, sigma)   # checks the arguments now
        self.kernel_size, self.sigma, self.eps, self.across_channels = kernel_size, sigma, eps, across_channels

    def forward(self, x, training):
        return local_contrast_normalize(x, self.kernel_size, self.sigma, self.eps, self.across_channels)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}"
