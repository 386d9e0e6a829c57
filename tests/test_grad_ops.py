"""verify_grad (float64 central differences) for every differentiable op case, and a check that no
differentiable op in the registry goes without a gradient test."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ir import OPS, Trait, toposort
from conftest import TEST_BACKENDS, backend_or_skip
from op_table import CASES, input_dtype, make_inputs

def _has_float_elements(case, shapes) -> bool:
    return any(int(np.prod(sh)) > 0 for i, sh in enumerate(shapes) if i not in case.int_inputs)


#: every differentiable case (size-0 ones included: their gradient graphs must still compile and run)
ALL_GRAD_PARAMS = [(c, s) for c in CASES if c.grad for s in c.shapes]
#: finite differences need at least one element
GRAD_PARAMS = [(c, s) for c, s in ALL_GRAD_PARAMS if _has_float_elements(c, s)]

# ops whose gradient is exercised by second-order cases below (gradient graphs of other ops)
SECOND_ORDER = [
    ("index_grad", lambda x: gc.grad((x[1:, ::2] ** 2).sum(), x) * x),
    ("take_grad", lambda x: gc.grad((x[np.array([0, 0, 2])] ** 2).sum(), x) * x),
    ("grad_of_softmax", lambda x: gc.grad((gc.softmax(x) ** 2).sum(), x)),
    ("grad_of_max", lambda x: gc.grad(gc.max(x * x, axis=1).sum(), x) * x),
    ("grad_of_broadcast", lambda x: gc.grad((gc.broadcast_to(x[:, :1], (3, 3)) ** 3).sum(), x)),
]


def _wrap(case, shapes, xs):
    """verify_grad differentiates all inputs; integer inputs are baked in as constants."""
    fixed = {i: xs[i] for i in case.int_inputs}
    free = [i for i in range(len(shapes)) if i not in fixed]

    def fn(*ts):
        args, it = [], iter(ts)
        for i in range(len(shapes)):
            args.append(gc.constant(fixed[i]) if i in fixed else next(it))
        return case.fn(*args)
    return fn, [xs[i] for i in free]


@pytest.mark.parametrize("case,shapes", GRAD_PARAMS,
                         ids=[f"{c.name}-{'x'.join(map(str, s))}".replace(" ", "") for c, s in GRAD_PARAMS])
def test_verify_grad(case, shapes, rng):
    xs = make_inputs(case, shapes, "float64", rng)
    fn, free = _wrap(case, shapes, xs)
    gc.verify_grad(fn, free, rng=1)


@pytest.mark.parametrize("case,shapes", ALL_GRAD_PARAMS,
                         ids=[f"{c.name}-{'x'.join(map(str, s))}".replace(" ", "") for c, s in ALL_GRAD_PARAMS])
@pytest.mark.parametrize("backend", [b for b in TEST_BACKENDS if b != "numpy"])
def test_gradient_graph_on_backend(case, shapes, backend, rng):
    """The gradient graph compiled by each other backend equals the NumPy backend's (whose rules
    test_verify_grad checks against finite differences)."""
    backend_or_skip(backend)
    xs = make_inputs(case, shapes, "float64", rng)
    fn, free = _wrap(case, shapes, xs)
    phs = [gc.placeholder(f"x{i}", x.shape, "float64") for i, x in enumerate(free)]
    out = gc.cast(fn(*phs), "float64")
    proj = gc.constant(rng.standard_normal(tuple(int(d) for d in out.shape)))
    grads = gc.grad(gc.sum(out * proj), phs)
    want = gc.function(phs, grads, backend="numpy")(*free)
    got = gc.function(phs, grads, backend=backend)(*free)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name,fn", SECOND_ORDER, ids=[n for n, _ in SECOND_ORDER])
def test_second_order_verify_grad(name, fn, rng):
    gc.verify_grad(fn, [rng.uniform(0.5, 2, (3, 3))], rng=2)


def _ops_in(fn, shapes, case=None):
    phs = [gc.placeholder(f"x{i}", s, input_dtype(case, i, "float64") if case else "float64")
           for i, s in enumerate(shapes)]
    return {n.op.name for n in toposort([fn(*phs)])}


def test_every_differentiable_op_has_a_gradient_test():
    covered = set()
    for c, s in GRAD_PARAMS:
        covered |= _ops_in(c.fn, s, c)
    for _, fn in SECOND_ORDER:
        covered |= _ops_in(fn, [(3, 3)])
    missing = sorted(name for name, op in OPS.items()
                     if op.differentiable and not op.has(Trait.LEAF) and name not in covered
                     and name not in EXTERNAL_GRAD_TESTS)
    assert not missing, f"differentiable ops without a verify_grad test: {missing}"


#: ops whose verify_grad tests live in other test modules (listed there with the op name)
EXTERNAL_GRAD_TESTS: set[str] = {"allreduce_wait",                 # tests/test_distributed.py
                                 "scaled_dot_product_attention"}   # tests/test_attention_fused.py


def test_grad_errors():
    x = gc.placeholder("x", (3,), "float64")
    i = gc.placeholder("i", (3,), "int64")
    with pytest.raises(gc.GradientError, match="scalar"):
        gc.grad(x * 2, x)
    with pytest.raises(gc.GradientError, match="int64"):
        gc.grad(gc.sum(gc.cast(i, "float64")), i)
    with pytest.raises(gc.GradientError, match="does not depend"):
        gc.grad(gc.sum(x), gc.placeholder("z", (2,), "float64"))
    z = gc.placeholder("z", (2,), "float64")
    g = gc.grad(gc.sum(x), z, disconnected="zero")
    np.testing.assert_array_equal(gc.function([z], g)(np.ones(2)), 0)


def test_stop_gradient_blocks_the_gradient(rng):
    x = gc.placeholder("x", (4,), "float64")
    g = gc.grad(gc.sum(gc.stop_gradient(x) * x), x)
    a = rng.standard_normal(4)
    np.testing.assert_allclose(gc.function([x], g)(a), a)
    assert gc.function([x], gc.stop_gradient(x) * 2)(a) == pytest.approx(2 * a)
