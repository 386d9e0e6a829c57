"""CI slice of the differential fuzzer (tests/fuzz.py): fixed seeds on every backend at optimize
0/1/2 against the reference evaluator, sampled gradients against finite differences, and the
regression tests for what the fuzzer found."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
import fuzz
from conftest import TEST_BACKENDS, backend_or_skip

# quick slice (each compiled chunk is one compile per optimize level; cold g++ is ~1-2 s each)
SLICE = {"numpy": range(0, 200), "llvm": range(0, 40), "cuda-emulated": range(0, 20)}
SLOW_SLICE = {"numpy": range(200, 1000), "llvm": range(40, 200), "cuda-emulated": range(20, 100)}


def _fuzz_ok(name, seeds, grad_every=10):
    t = fuzz.fuzz(seeds, [name], grad_every=grad_every, log=None)[name]
    assert t.graphs >= 0.9 * len(seeds) and t.grads >= 1, t  # the slice really ran
    assert not t.failures, "\n".join(f"seed {s}: {m}" for s, m in t.failures)


@pytest.mark.parametrize("name", TEST_BACKENDS)
def test_fuzz_slice_agrees_with_reference(name):
    backend_or_skip(name)
    _fuzz_ok(name, SLICE[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_BACKENDS)
def test_fuzz_longer_slice_agrees_with_reference(name):
    backend_or_skip(name)
    _fuzz_ok(name, SLOW_SLICE[name], grad_every=3)


def test_fuzz_slice_covers_every_kind():
    """The slice includes int32/int64, float32 and size-0 graphs, and symbolic batch dims."""
    cases = [c for c in map(fuzz.make_case, range(200)) if c is not None]
    assert {c.kind for c in cases} == set(fuzz.KINDS)
    assert sum(bool(c.dims) for c in cases) > 20
    assert any(v.size == 0 for c in cases for v in c.vals)


def test_fuzzer_reports_a_wrong_backend_with_its_seed(monkeypatch):
    """A backend whose results are off by one ulp-scale amount is caught, and the seed is named."""
    real = gc.function

    def off(*a, **k):
        f = real(*a, **k)
        return lambda *xs: [np.asarray(y) + np.asarray(1e-6, np.asarray(y).dtype) for y in f(*xs)]
    monkeypatch.setattr(gc, "function", off)
    bad = fuzz.check_cases([fuzz.make_case(s) for s in (0, 1, 2)], "numpy", 2)
    assert [s for s, _ in bad] == [0, 1, 2]


def test_fuzzer_reports_a_crash_with_its_seed(monkeypatch):
    real = gc.function

    def crash_on_seed_1(inputs, *a, **k):
        if any(p.name.startswith("s1_") for p in inputs):
            raise RuntimeError("boom")
        return real(inputs, *a, **k)
    monkeypatch.setattr(gc, "function", crash_on_seed_1)
    bad = fuzz.check_cases([fuzz.make_case(s) for s in (0, 1, 2, 3)], "numpy", 0)
    assert bad == [(1, "RuntimeError: boom")]


@pytest.mark.parametrize("name", TEST_BACKENDS)
def test_regression_seed_169_logsumexp_over_a_size0_batch(name):
    """Fuzz seed 169: log(sum(exp(x))) over a symbolic batch dim that is 0 at run time becomes
    logsumexp at optimize>=1, whose NumPy impl raised 'zero-size array to reduction operation';
    it must give log(0) = -inf like the unoptimised graph."""
    backend_or_skip(name)
    assert not fuzz.check_cases([fuzz.make_case(169)], name, 2)
    x = gc.placeholder("x", ("n", 3), "float64")
    f = gc.function([x], gc.logsumexp(x, axis=0), backend=name)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(f(np.zeros((0, 3))), np.full(3, -np.inf))


def test_gradient_check_sample_catches_a_wrong_gradient(monkeypatch):
    """check_grad really compares against finite differences: with tanh's vjp doubled it fails."""
    from graphc.ir import OPS
    uses_tanh = [s for s in range(0, 400, 10) if fuzz.check_grad(s, "numpy") is None
                 and "tanh" in {n.op.name for n in fuzz.toposort([fuzz.random_graph(s)[1]])}]
    assert uses_tanh
    real = OPS["tanh"].vjp
    monkeypatch.setattr(OPS["tanh"], "vjp", lambda node, g: [2.0 * v for v in real(node, g)])
    assert all(fuzz.check_grad(s, "numpy") not in (None, "skip") for s in uses_tanh[:3])
