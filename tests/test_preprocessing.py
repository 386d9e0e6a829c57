"""gc.preprocessing (issue 17): fitted transforms against scikit-learn / NumPy, local contrast normalisation
against a direct NumPy implementation, and gc.random-driven augmentation (determinism by seed, rates,
shapes, identity in eval mode), compiled on every backend."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import assert_close

P = gc.preprocessing
RNG = np.random.default_rng(1717)
# correlated features with different scales and offsets
X = (RNG.standard_normal((300, 6)) @ RNG.standard_normal((6, 6)) * np.array([1, 2, 5, .5, 1, 3])
     + np.arange(6)).astype(np.float64)


def _run(backend, x, outs, *arrays):
    return gc.function(x if isinstance(x, list) else [x], outs, backend=backend)(*arrays)


# ---- fitted transforms ----------------------------------------------------------------------------

def test_standardize_and_minmax_match_scikit_learn(backend):
    sk = pytest.importorskip("sklearn.preprocessing")
    st, mm = P.Standardize().fit(X), P.MinMax(feature_range=(-1, 2)).fit(X)
    x = gc.placeholder("x", (None, 6), "float64")
    ys, back_s, ym, back_m = _run(backend, x, [st(x), st.inverse_transform(st(x)), mm(x),
                                               mm.inverse_transform(mm.transform(x))], X)
    assert_close(ys, sk.StandardScaler().fit_transform(X), backend=backend, rtol=1e-12, atol=1e-12)
    assert_close(ym, sk.MinMaxScaler(feature_range=(-1, 2)).fit_transform(X), backend=backend, rtol=1e-12,
                 atol=1e-12)
    assert_close(back_s, X, backend=backend, rtol=1e-12, atol=1e-12)
    assert_close(back_m, X, backend=backend, rtol=1e-12, atol=1e-12)


def test_standardize_per_channel_and_constant_features():
    imgs = RNG.standard_normal((20, 3, 4, 4)) * np.array([1, 2, 3])[:, None, None] + 5
    st = P.Standardize(axis=(0, 2, 3)).fit(imgs)
    got = st.transform(imgs)                                 # an array in, the graph's result out
    want = (imgs - imgs.mean(axis=(0, 2, 3), keepdims=True)) / imgs.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    const = np.c_[X[:, :2], np.full(len(X), 7.0)]
    np.testing.assert_allclose(P.Standardize().fit_transform(const)[:, 2], 0.0)   # std 0: only centred
    np.testing.assert_allclose(P.MinMax().fit_transform(const)[:, 2], 0.0)        # range 0: the low end
    x = gc.placeholder("x", (None, 3, 4, 4))
    assert st(x).dtype == "float32" and st(x).shape == x.shape


def test_pca_whitening_matches_scikit_learn_and_whitens(backend):
    skd = pytest.importorskip("sklearn.decomposition")
    full, three = P.PCAWhiten(eps=0).fit(X), P.PCAWhiten(n_components=3, eps=0).fit(X)
    x = gc.placeholder("x", (None, 6), "float64")
    y, back, y3 = _run(backend, x, [full(x), full.inverse_transform(full(x)), three(x)], X)
    assert_close(y, skd.PCA(whiten=True).fit_transform(X), backend=backend, rtol=1e-9, atol=1e-9)
    assert_close(y3, skd.PCA(n_components=3, whiten=True).fit_transform(X), backend=backend, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.cov(y.T), np.eye(6), atol=1e-9)      # whitened covariance = identity
    assert_close(back, X, backend=backend, rtol=1e-9, atol=1e-9)
    assert three(x).shape[1] == 3 and three.inverse_transform(three(x)).shape[1] == 6


def test_zca_whitening_is_symmetric_and_whitens(backend):
    zca = P.ZCAWhiten(eps=0).fit(X)
    W = zca.matrix_
    np.testing.assert_array_equal(W, W.T)
    # cov^(-1/2) by an independent route: the SVD of the centred data
    c = X - X.mean(axis=0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    np.testing.assert_allclose(W, vt.T @ np.diag(np.sqrt(len(X) - 1) / s) @ vt, rtol=1e-8, atol=1e-10)
    x = gc.placeholder("x", (None, 6), "float64")
    y, back = _run(backend, x, [zca(x), zca.inverse_transform(zca(x))], X)
    np.testing.assert_allclose(np.cov(y.T), np.eye(6), atol=1e-9)
    assert_close(back, X, backend=backend, rtol=1e-9, atol=1e-9)
    # eps damps: the whitened variances are var / (var + eps) < 1
    damped = P.ZCAWhiten(eps=1.0).fit(X).transform(X)
    lam = np.linalg.eigvalsh(np.cov(X.T))
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(np.cov(damped.T))), np.sort(lam / (lam + 1)), rtol=1e-8)


def test_zca_on_images_keeps_their_shape():
    imgs = RNG.standard_normal((50, 2, 3, 3))
    zca = P.ZCAWhiten(eps=1e-3).fit(imgs)
    x = gc.placeholder("x", (None, 2, 3, 3), "float64")
    y = zca(x)
    assert y.shape == x.shape
    got = gc.function([x], y)(imgs)
    flat = imgs.reshape(50, -1)
    np.testing.assert_allclose(got.reshape(50, -1), (flat - flat.mean(0)) @ zca.matrix_, rtol=1e-10, atol=1e-12)


def test_fitted_transform_errors():
    x = gc.placeholder("x", (None, 6))
    with pytest.raises(gc.GraphcError, match="not fitted yet"):
        P.Standardize()(x)
    with pytest.raises(gc.ShapeError, match=r"expected \(samples,\) \+ \(6,\)"):
        P.Standardize().fit(X)(gc.placeholder("z", (None, 5)))
    with pytest.raises(gc.GraphcError, match="fit on arrays"):
        P.MinMax().fit(x)
    with pytest.raises(gc.GraphcError, match="must include 0"):
        P.Standardize(axis=1).fit(X)
    with pytest.raises(gc.GraphcError, match="singular"):
        P.ZCAWhiten(eps=0).fit(X[:4])                      # 4 samples, 6 features
    with pytest.raises(gc.GraphcError, match="feature_range"):
        P.MinMax(feature_range=(1, 0))


def test_fitted_transforms_sit_in_sequential():
    st = P.Standardize().fit(X)
    model = gc.nn.Sequential(st, gc.nn.Dense(6, 2, dtype="float64"))
    x = gc.placeholder("x", (None, 6), "float64")
    assert model.params == model.layers[1].params         # the statistics are constants, never trained
    got = gc.function([x], model(x))(X[:5])
    lin = model.layers[1]
    want = st.transform(X[:5]) @ lin.weight.value.T + lin.bias.value
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---- local contrast normalisation ---------------------------------------------------------------

def _lcn_reference(x, k, sigma, eps, across=True):
    """Direct NumPy LCN: explicit windows over the zero-padded image."""
    n, c, h, w = x.shape
    r = np.arange(k) - k // 2
    win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    win /= win.sum()
    p = k // 2

    def local_mean(a):                                     # (n, c, h, w) -> weighted window sums
        ap = np.pad(a, ((0, 0), (0, 0), (p, p), (p, p)))
        out = np.zeros_like(a)
        for i in range(h):
            for j in range(w):
                out[:, :, i, j] = (ap[:, :, i:i + k, j:j + k] * win).sum(axis=(2, 3))
        return out.mean(axis=1, keepdims=True) if across else out
    v = x - local_mean(x)
    s = np.sqrt(local_mean(v * v))
    mean_s = s.mean(axis=(1, 2, 3), keepdims=True)
    return v / np.maximum(np.maximum(s, mean_s), eps)


@pytest.mark.parametrize("across", [True, False])
def test_local_contrast_normalize_matches_numpy(backend, across):
    a = RNG.standard_normal((3, 2, 7, 8)).astype(np.float32) * 2 + 1
    a[1] *= 0.01                                           # a low-contrast image: divided by its mean s
    x = gc.placeholder("x", (None, 2, 7, 8))
    got = _run(backend, x, P.LocalContrastNormalize(5, sigma=1.5, across_channels=across)(x), a)
    assert_close(got, _lcn_reference(a.astype(np.float64), 5, 1.5, 1e-4, across), backend=backend,
                 rtol=2e-4, atol=2e-5)


def test_local_contrast_normalize_grayscale_and_gradient():
    a = RNG.standard_normal((2, 6, 6))
    x = gc.placeholder("x", (None, 6, 6), "float64")
    got = gc.function([x], P.local_contrast_normalize(x, 3))(a)
    np.testing.assert_allclose(got, _lcn_reference(a[:, None], 3, 2.0, 1e-4)[:, 0], rtol=1e-10, atol=1e-12)
    gc.verify_grad(lambda t: P.local_contrast_normalize(t, 3), [a[:1, :4, :4]])
    with pytest.raises(gc.GraphcError, match="odd"):
        P.local_contrast_normalize(x, 4)


# ---- augmentation -------------------------------------------------------------------------------

def _find_window(out, img, pad):
    """The (dy, dx) offsets into the zero-padded `img` whose window equals `out` (all that do)."""
    ip = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(pad[0], pad[0]), (pad[1], pad[1])])
    h, w = out.shape[-2:]
    return [(dy, dx) for dy in range(ip.shape[-2] - h + 1) for dx in range(ip.shape[-1] - w + 1)
            if np.array_equal(ip[..., dy:dy + h, dx:dx + w], out)]


def test_random_crop_takes_windows_of_the_padded_images_and_covers_them(backend):
    a = RNG.standard_normal((64, 2, 5, 6)).astype(np.float32) + 3   # no zeros: padding is recognisable
    x = gc.placeholder("x", (None, 2, 5, 6))
    g = gc.random.Generator(seed=11)
    crop = P.random_crop(x, (4, 4), padding=(1, 2), generator=g)
    cost = gc.sum(crop * gc.constant(np.arange(32, dtype=np.float32).reshape(2, 4, 4)))
    f = gc.function([x], [crop, gc.grad(cost, x)], backend=backend)
    out, gx = f(a)
    assert out.shape == (64, 2, 4, 4)
    seen = set()
    for n in range(64):
        where = _find_window(out[n], a[n], (1, 2))
        assert len(where) == 1, (n, where)
        dy, dx = where[0]
        seen.add(where[0])
        # gradient: the cotangent scattered back into the window (the padding part dropped)
        want = np.zeros((2, 7, 10), np.float32)
        want[:, dy:dy + 4, dx:dx + 4] = np.arange(32).reshape(2, 4, 4)
        np.testing.assert_array_equal(gx[n], want[:, 1:6, 2:8])
    assert len(seen) >= 12                                  # 3 x 7 = 21 positions, 64 draws
    again, _ = f(a)
    assert not np.array_equal(again, out)                   # a fresh draw every call
    g.seed(11)
    np.testing.assert_array_equal(f(a)[0], out)             # reseeding repeats it


def test_random_crop_offsets_are_uniform_and_eval_is_the_centre():
    x = gc.placeholder("x", (None, 1, 3, 3))
    a = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3) + 1
    crop = P.random_crop(x, 1, key=gc.random.key(5))         # a 1x1 crop picks one pixel
    f = gc.function([x], crop)
    picks = f(np.repeat(a, 4500, axis=0)).ravel()
    counts = np.bincount(picks.astype(int), minlength=10)[1:]
    assert counts.min() > 400 and counts.max() < 600, counts  # 500 each expected (sd ~ 21)
    np.testing.assert_array_equal(f(a), f(a))                # a constant key: the same every call
    ev = gc.function([x], [P.random_crop(x, 3, padding=2, training=False),
                           P.random_crop(x, 1, training=False), P.random_crop(x, 5, padding=1, training=False)])(a)
    np.testing.assert_array_equal(ev[0], a)                 # centre of the padded image: the image
    np.testing.assert_array_equal(ev[1], a[..., 1:2, 1:2])
    np.testing.assert_array_equal(ev[2], np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1))))
    assert P.random_crop(x, 3, training=False) is x


def test_random_flip_rate_determinism_and_modes(backend):
    a = RNG.standard_normal((2000, 1, 2, 3)).astype(np.float32)
    x = gc.placeholder("x", (None, 1, 2, 3))
    outs = [P.random_flip(x, p=0.3, seed=4), P.random_flip(x, p=0.3, seed=4), P.random_flip(x, axis=-2, seed=9)]
    f = gc.function([x], outs, backend=backend)
    h1, h2, v = f(a)
    flipped = np.array([np.array_equal(h1[n], a[n, :, :, ::-1]) for n in range(2000)])
    kept = np.array([np.array_equal(h1[n], a[n]) for n in range(2000)])
    assert np.all(flipped ^ kept)                           # each sample either flipped or untouched
    assert abs(flipped.mean() - 0.3) < 0.04, flipped.mean()  # binomial sd ~ 0.01
    np.testing.assert_array_equal(h1, h2)                   # same seed, same draws
    vflip = np.array([np.array_equal(v[n], a[n, :, ::-1]) for n in range(2000)])
    assert abs(vflip.mean() - 0.5) < 0.04
    if backend == "numpy":
        assert P.random_flip(x, p=0.5, training=False) is x
        np.testing.assert_array_equal(gc.function([x], P.random_flip(x, p=1.0))(a[:3]), a[:3, ..., ::-1])


def test_gaussian_noise_statistics_and_eval(backend):
    x = gc.placeholder("x", (None, 50))
    f = gc.function([x], [P.gaussian_noise(x, 0.5, seed=2), P.gaussian_noise(x, 0.5, seed=2)], backend=backend)
    a = np.ones((40, 50), np.float32)
    n1, n2 = f(a)
    np.testing.assert_array_equal(n1, n2)
    e = n1 - 1
    assert abs(e.mean()) < 0.03 and abs(e.std() - 0.5) < 0.02, (e.mean(), e.std())
    assert not np.array_equal(f(a)[0], n1)
    assert P.gaussian_noise(x, 0.5, training=False) is x


def test_augmentation_is_the_same_on_every_backend():
    """Counter-based draws: one seed gives the same crops and flips on numpy, llvm and cuda-emulated."""
    from conftest import TEST_BACKENDS
    from graphc.function import available_backends
    a = RNG.standard_normal((16, 3, 4, 4)).astype(np.float32)
    results = []
    for be in [b for b in TEST_BACKENDS if b in available_backends()]:
        x = gc.placeholder("x", (None, 3, 4, 4))
        model = gc.nn.Sequential(P.RandomFlip(p=0.5, seed=1), P.RandomCrop(4, padding=1, seed=2))
        results.append(gc.function([x], model(x), backend=be)(a))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_augmentation_modules_follow_train_and_eval(backend):
    a = RNG.standard_normal((8, 3, 4, 4)).astype(np.float32)
    x = gc.placeholder("x", (None, 3, 4, 4))
    model = gc.nn.Sequential(P.RandomFlip(p=1.0), P.RandomCrop(2, seed=3), P.GaussianNoise(0.1, seed=4),
                             P.LocalContrastNormalize(3))
    train = model(x)
    model.eval()
    ev = model(x)
    got_train, got_eval = gc.function([x], [train, ev], backend=backend)(a)
    assert got_train.shape == got_eval.shape == (8, 3, 2, 2)
    want_eval = _lcn_reference(a[..., 1:3, 1:3].astype(np.float64), 3, 2.0, 1e-4)  # no flip/noise, centre crop
    assert_close(got_eval, want_eval, backend=backend, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got_train, got_eval)
    assert "RandomCrop(size=(2, 2), padding=(0, 0))" in repr(model.layers[1])
    with pytest.raises(gc.GraphcError, match="probability"):
        P.RandomFlip(p=1.5)
    with pytest.raises(gc.GraphcError, match="samples"):
        P.random_flip(x, axis=0)
    with pytest.raises(gc.ShapeError, match="does not fit"):
        P.random_crop(x, 9)
