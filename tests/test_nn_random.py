"""In-graph random numbers (seeded, fresh per call, reproducible) and graph state that compiled
functions advance by themselves (generator counters, batch-norm running statistics)."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc


def test_same_seed_same_draws_fresh_every_call():
    x = gc.placeholder("x", (None, 4))
    f1 = gc.function([x], gc.random.uniform(x.shape, seed=5) + x)
    f2 = gc.function([x], gc.random.uniform(x.shape, seed=5) + x)
    z = np.zeros((3, 4), np.float32)
    a1, b1 = f1(z), f1(z)
    a2, b2 = f2(z), f2(z)
    assert not np.array_equal(a1, b1)                 # a fresh draw every call
    np.testing.assert_array_equal(a1, a2)             # same seed, same sequence
    np.testing.assert_array_equal(b1, b2)
    assert a1.dtype == np.float32 and 0 <= a1.min() and a1.max() < 1


def test_generator_reseed_repeats_and_constant_key_is_fixed():
    g = gc.random.Generator(11)
    f = gc.function([], gc.random.normal((5,), generator=g))
    first = [f(), f()]
    g.seed(11)
    np.testing.assert_array_equal(f(), first[0])
    np.testing.assert_array_equal(f(), first[1])
    k = gc.function([], gc.random.normal((5,), key=gc.random.key(3)))
    np.testing.assert_array_equal(k(), k())
    assert k.graph.updates == []                      # a constant key is stateless


def test_two_draws_in_one_graph_differ_and_share_one_state_update():
    g = gc.random.Generator(0)
    a, b = gc.random.uniform((100,), generator=g), gc.random.uniform((100,), generator=g)
    f = gc.function([], [a, b])
    va, vb = f()
    assert not np.array_equal(va, vb)
    assert [p.name for p, _ in f.graph.updates] == [g.state.name]
    np.testing.assert_array_equal(g.state.value, [0, 1])


def test_distributions_statistics():
    n = 200_000
    f = gc.function([], [gc.random.uniform((n,), -2.0, 3.0, dtype="float64", seed=1),
                         gc.random.normal((n,), 1.5, 0.5, dtype="float64", seed=2),
                         gc.random.bernoulli(0.3, (n,), seed=3)])
    u, z, b = f()
    assert -2 <= u.min() and u.max() < 3 and abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 25 / 12) < 0.03
    assert abs(z.mean() - 1.5) < 0.01 and abs(z.std() - 0.5) < 0.01
    assert set(np.unique(b)) == {0.0, 1.0} and abs(b.mean() - 0.3) < 0.01


def test_normal_reparameterisation_gradient():
    """d/dmu, d/dsigma of sum(mu + sigma * eps) are 1 and eps (eps the same draw in the graph)."""
    mu = gc.placeholder("mu", (6,), "float64")
    sigma = gc.placeholder("sigma", (6,), "float64")
    k = gc.random.key(9)
    y = gc.random.normal((6,), mu, sigma, dtype="float64", key=k)
    eps = gc.random.normal((6,), dtype="float64", key=k)
    gm, gs, e = gc.function([mu, sigma], gc.grad(gc.sum(y), [mu, sigma]) + [eps])(np.zeros(6), np.ones(6))
    np.testing.assert_allclose(gm, 1.0)
    np.testing.assert_allclose(gs, e)
    gc.verify_grad(lambda m, s: gc.random.normal((6,), m, s, dtype="float64", key=k) ** 2,
                   [np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)])


def test_dropout_mask_scaling_and_inference():
    x = gc.placeholder("x", (None, 1000), "float64")
    g = gc.random.Generator(4)
    f = gc.function([x], gc.dropout(x, 0.25, generator=g))
    ones = np.ones((20, 1000))
    y1, y2 = f(ones), f(ones)
    assert set(np.unique(y1)) == {0.0, 1 / 0.75}       # inverted scaling
    assert abs((y1 == 0).mean() - 0.25) < 0.01
    assert abs(y1.mean() - 1.0) < 0.02                 # expectation preserved
    assert not np.array_equal(y1, y2)                  # fresh mask each call
    g.seed(4)
    np.testing.assert_array_equal(f(ones), y1)         # reproducible
    ev = gc.function([x], gc.dropout(x, 0.25, training=False))
    np.testing.assert_array_equal(ev(ones), ones)
    assert ev.graph.updates == []


def test_dropout_gradient_uses_the_same_mask():
    x = gc.placeholder("x", (50,), "float64")
    y = gc.dropout(x, 0.5, generator=gc.random.Generator(1))
    out, gx = gc.function([x], [y, gc.grad(gc.sum(y), x)])(np.ones(50))
    np.testing.assert_array_equal(gx, out)             # d(x*m/(1-p))/dx = m/(1-p) = out for x = 1


def test_implicit_updates_in_training_functions_only():
    bn = gc.nn.BatchNorm(3, momentum=0.5, dtype="float64")
    x = gc.placeholder("x", (None, 3), "float64")
    a = np.random.default_rng(0).standard_normal((8, 3)) * 2 + 5
    train = gc.function([x], bn(x, training=True))
    infer = gc.function([x], bn(x, training=False))
    infer(a)
    np.testing.assert_array_equal(bn.running_mean.value, 0)   # inference leaves state alone
    train(a)
    np.testing.assert_allclose(bn.running_mean.value, 0.5 * a.mean(0))
    np.testing.assert_allclose(bn.running_var.value, 0.5 + 0.5 * a.var(0, ddof=1))
    train(a)
    np.testing.assert_allclose(bn.running_mean.value, 0.75 * a.mean(0))


def test_implicit_updates_next_to_user_updates_and_through_gradients():
    """A training step built from the gradient alone still advances the batch-norm statistics,
    together with the optimiser's updates; an explicit user update of the same parameter wins."""
    model = gc.nn.Sequential(gc.nn.Dense(3, 4, seed=0), gc.nn.BatchNorm(4), gc.relu, gc.nn.Dense(4, 1, seed=1))
    x = gc.placeholder("x", (None, 3))
    loss = gc.mean(model(x) ** 2)
    ups = gc.optim.SGD(0.1).updates(loss, model.params)
    f = gc.function([x], gc.grad(loss, model.params[0]), updates=ups)
    names = {p.name for p, _ in f.graph.updates}
    bn = model[1]
    assert {bn.running_mean.name, bn.running_var.name} <= names and model.params[0].name in names
    f(np.ones((4, 3), np.float32))
    assert np.any(bn.running_mean.value != 0)
    pinned = gc.function([x], loss, updates=[(bn.running_mean, bn.running_mean * 0)])
    bn.running_mean.set_value(np.ones(4))
    pinned(np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(bn.running_mean.value, 0)


def test_noisy_relu_fixed_key_matches_numpy():
    x = np.linspace(-2, 2, 12)
    k = gc.random.key(2)
    eps = gc.function([], gc.random.normal((12,), dtype="float64", key=k))()
    xs = gc.placeholder("x", (12,), "float64")
    got = gc.function([xs], gc.noisy_relu(xs, key=k))(x)
    np.testing.assert_allclose(got, np.maximum(x + np.sqrt(1 / (1 + np.exp(-x))) * eps, 0), rtol=1e-12)


def test_batch_shaped_draws():
    x = gc.placeholder("x", (None, 3))
    f = gc.function([x], x + gc.random.normal((None, 3), seed=0))
    assert f(np.zeros((4, 3), np.float32)).shape == (4, 3) and f(np.zeros((2, 3), np.float32)).shape == (2, 3)
    with pytest.raises(gc.ShapeError, match="only axis 0"):
        gc.random.uniform((2, None))


def test_random_errors():
    with pytest.raises(gc.GraphcError, match="at most one"):
        gc.random.uniform((2,), seed=1, key=gc.random.key(1))
    with pytest.raises(gc.DTypeError, match="dtype must be float"):
        gc.random.normal((2,), dtype="int32")
    with pytest.raises(gc.GraphcError, match="p must be in"):
        gc.dropout(gc.placeholder("x", (3,)), 1.0)


# ---- the counter-based generator: one definition, the same draws on every backend ----------------

import math  # noqa: E402

from graphc.function import get_backend  # noqa: E402
from graphc.ops import random as R  # noqa: E402

NATIVE = ("llvm", "cuda-emulated")


def _spec_bits(seed, counter, word, j):
    """The generator as documented in graphc/ops/random.py, on Python ints (an independent reference
    for the vectorised uint64 NumPy code and, through it, the native kernels)."""
    m = (1 << 64) - 1

    def mix(z):
        z &= m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)
    h = mix((seed & m) ^ 0x243F6A8885A308D3)
    h = mix(h ^ (counter & m) ^ 0x13198A2E03707344)
    h = mix(h ^ word ^ 0xA4093822299F31D0)
    return mix(h + (j + 1) * 0x9E3779B97F4A7C15)


def test_reference_follows_the_documented_generator():
    seed, counter, stream = -7, 3, 2
    k = np.array([seed, counter], np.int64)
    u64 = R.RandomUniform.impl(k, (40,), "float64", stream)
    u32 = R.RandomUniform.impl(k, (40,), "float32", stream)
    z64 = R.RandomNormal.impl(k, (40,), "float64", stream)
    for j in range(40):
        x = _spec_bits(seed, counter, 2 * stream, j)
        assert u64[j] == (x >> 11) * 2.0 ** -53 and u32[j] == np.float32((x >> 40) * 2.0 ** -24)
        u1 = ((_spec_bits(seed, counter, 2 * stream + 1, 2 * j) >> 11) + 1) * 2.0 ** -53
        u2 = (_spec_bits(seed, counter, 2 * stream + 1, 2 * j + 1) >> 11) * 2.0 ** -53
        want = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
        assert abs(z64[j] - want) <= 4 * np.spacing(abs(want)) + 1e-300
    # float32 uniforms are the float64 ones cut to 24 bits; all in [0, 1)
    np.testing.assert_array_equal(u32, np.floor(u64 * 2.0 ** 24) * 2.0 ** -24)


def _native(name):
    try:
        get_backend(name)
    except gc.GraphcError as e:
        pytest.skip(str(e))
    return name


@pytest.mark.parametrize("be", NATIVE)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_draws_equal_the_reference(be, dtype):
    """Uniform draws bit-exact, normal within a few ulp, for symbolic batch sizes (0 included) and a
    3-d shape; element j of the draw is element j of the flat row-major draw (so a smaller batch is a
    prefix of a larger one)."""
    _native(be)
    x = gc.placeholder("x", (None, 3, 5), "float32")
    k = gc.random.key(-12345)
    outs = [gc.random.uniform(x.shape, dtype=dtype, key=k), gc.random.normal(x.shape, dtype=dtype, key=k),
            gc.random.uniform((7,), dtype=dtype, key=gc.random.key(2 ** 40 + 1))]
    ref, nat = gc.function([x], outs), gc.function([x], outs, backend=be)
    big = None
    for n in (0, 1, 4, 700):
        a = np.zeros((n, 3, 5), np.float32)
        want, got = ref(a), nat(a)
        for w, g in zip(want, got):
            assert g.dtype == np.dtype(dtype) and g.shape == w.shape
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_array_max_ulp(got[1], want[1], maxulp=4)
        if big is not None:
            np.testing.assert_array_equal(got[0], big[0][:n])
        big = got if n == 700 else big
    big = nat(np.zeros((9, 3, 5), np.float32))
    np.testing.assert_array_equal(big[0][:4], nat(np.zeros((4, 3, 5), np.float32))[0])
    assert 0 <= big[0].min() and big[0].max() < 1 and np.isfinite(big[1]).all()
    assert nat.program.info["fallback_ops"] == []


@pytest.mark.parametrize("be", NATIVE)
def test_native_generator_advances_like_the_reference(be):
    """A Generator's draws (two streams, state advanced by the compiled function) repeat on every
    backend after a reseed, call after call."""
    _native(be)
    g = gc.random.Generator(21)
    x = gc.placeholder("x", (None, 6))
    outs = [gc.random.uniform(x.shape, generator=g), gc.random.normal(x.shape, dtype="float64", generator=g),
            gc.dropout(x, 0.4, generator=g)]
    a = np.ones((5, 6), np.float32)
    runs = []
    for b in ("numpy", be):
        f = gc.function([x], outs, backend=b)
        g.seed(21)
        runs.append([f(a) for _ in range(3)])
        np.testing.assert_array_equal(g.state.value, [21, 3])
        assert f.program.info.get("fallback_ops", []) == []
    for want, got in zip(*runs):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_max_ulp(got[1], want[1], maxulp=4)
        np.testing.assert_array_equal(got[2], want[2])
    assert not np.array_equal(runs[1][0][0], runs[1][1][0])   # a fresh draw every call


def test_llvm_draws_under_bounds_checking():
    _native("llvm")
    x = gc.placeholder("x", (None, 4))
    outs = [gc.random.uniform(x.shape, key=gc.random.key(5)), gc.random.normal(x.shape, seed=1)]
    f = gc.function([x], outs, backend="llvm", sanitize="bounds")
    r = gc.function([x], [gc.random.uniform(x.shape, key=gc.random.key(5))])
    got = f(np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(got[0], r(np.zeros((3, 4), np.float32))[0])
    assert np.isfinite(got[1]).all()


@pytest.mark.parametrize("name", NATIVE + ("cuda",))
def test_random_ops_are_in_the_native_lowering_tables(name):
    try:
        backend = get_backend(name, for_compile=True)
    except gc.GraphcError as e:
        pytest.skip(str(e))
    lowered = backend.lowered_ops()
    assert R.RandomUniform in lowered and R.RandomNormal in lowered


def test_cuda_source_spells_the_generator():
    """The CUDA kernels compile (nvcc or NVRTC, GPU or not) and carry the generator's helpers once."""
    try:
        be = get_backend("cuda", for_compile=True)
    except gc.GraphcError as e:
        pytest.skip(str(e))
    if not be.can_compile():
        pytest.skip("no CUDA compiler")
    k = gc.random.key(1)
    f = gc.function([], [gc.random.uniform((5,), key=k), gc.random.normal((5,), dtype="float64", key=k)],
                    backend="cuda")
    assert f.source.count("#define GC_RANDOM_HELPERS") == 1 and f.program.info["fallback_ops"] == []


# ---- statistics (fixed seeds: deterministic) -------------------------------------------------------

def _ks(sample, cdf) -> float:
    """Kolmogorov-Smirnov statistic of a sample against a CDF."""
    s = np.sort(sample)
    f = cdf(s)
    n = len(s)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_uniform_and_normal_statistics(dtype):
    n = 100_000
    u, z = gc.function([], [gc.random.uniform((n,), dtype=dtype, seed=12),
                            gc.random.normal((n,), dtype=dtype, seed=13)])()
    crit = 1.95 / math.sqrt(n)    # KS at the 0.1% level
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n) and abs(u.var() - 1 / 12) < 0.002
    assert _ks(u.astype(np.float64), lambda s: s) < crit
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 0.015
    assert _ks(z.astype(np.float64), _normal_cdf) < crit
    assert abs(((z.astype(np.float64)) ** 3).mean()) < 0.05 and abs((z.astype(np.float64) ** 4).mean() - 3) < 0.1
    # lag-1 correlation inside one draw
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 4 / math.sqrt(n)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 4 / math.sqrt(n)


def test_independence_across_streams_counters_and_keys():
    n = 50_000
    lim = 4.5 / math.sqrt(n)
    g = gc.random.Generator(3)
    f = gc.function([], [gc.random.uniform((n,), dtype="float64", generator=g),
                         gc.random.uniform((n,), dtype="float64", generator=g),
                         gc.random.normal((n,), dtype="float64", generator=g)])
    a0, b0, z0 = f()     # streams 0, 1, 2 at counter 0
    a1, _, z1 = f()      # counter 1
    pairs = [(a0, b0), (a0, a1), (z0, z1), (a0, z0)]
    keyed = [gc.function([], gc.random.uniform((n,), dtype="float64", key=gc.random.key(s)))() for s in (0, 1, -1)]
    pairs += [(keyed[0], keyed[1]), (keyed[0], keyed[2])]
    for p, q in pairs:
        assert not np.array_equal(p, q)
        assert abs(np.corrcoef(p, q)[0, 1]) < lim
    # uniform and normal with the same key and stream are not the same numbers transformed
    k = gc.random.key(8)
    u, z = gc.function([], [gc.random.uniform((n,), dtype="float64", key=k),
                            gc.random.normal((n,), dtype="float64", key=k)])()
    assert abs(np.corrcoef(u, _normal_cdf(z))[0, 1]) < lim
    # keys differing in one bit of the seed or counter give unrelated draws (bit balance of the xor)
    base = R.RandomUniform.impl(np.array([5, 9], np.int64), (n,), "float64", 0)
    for k2 in ([4, 9], [5, 8], [5 + 2 ** 62, 9]):
        other = R.RandomUniform.impl(np.array(k2, np.int64), (n,), "float64", 0)
        ints = [(v * 2.0 ** 53).astype(np.uint64) for v in (base, other)]   # the 53 drawn bits, exactly
        frac = np.unpackbits((ints[0] ^ ints[1]).view(np.uint8)).mean() * 64 / 53
        assert abs(frac - 0.5) < 0.01, k2
