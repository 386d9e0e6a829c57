"""The llvm lowering table is keyed by op objects: lowered_ops() is exactly its keys, elementwise ops
count only through their scalar row, and whatever has no row (or a case its row does not cover) runs
on the host and is reported in info["fallback_ops"]."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.ir import Trait, ops_with

from conftest import backend_or_skip


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _tables():
    from graphc.backends.llvm import kernels, lower, table
    return table.rows(), lower.CODE_FOR_OP, kernels.COMBINE


def test_lowered_ops_are_the_table_keys_and_elementwise_ops_need_a_scalar_row():
    from graphc.function import get_backend
    plan_rows, scalar, combine = _tables()
    lowered = get_backend("llvm").lowered_ops()
    assert lowered == frozenset(plan_rows)
    assert all(isinstance(op, gc.Op) for op in lowered)
    for op in lowered:
        if op.has(Trait.ELEMENTWISE):
            assert op in scalar, f"{op.name} is lowered without a scalar row"
    assert set(scalar) <= lowered
    assert ops_with(Trait.MONOID) <= set(combine) and set(combine) <= lowered
    assert not any(op.host_only for op in lowered)


def test_an_elementwise_op_without_its_scalar_row_runs_on_the_host_and_is_reported(monkeypatch):
    from graphc.backends.llvm import lower, table
    tanh = gc.tanh.op
    monkeypatch.delitem(lower.CODE_FOR_OP, tanh)
    monkeypatch.delitem(table.PLAN, tanh)
    x = gc.placeholder("x", (5,), "float64")
    f = gc.function([x], gc.tanh(x) * 2.0 + 1.0, backend="llvm")   # tanh inside a fused region too
    v = np.linspace(-2, 2, 5)
    np.testing.assert_allclose(f(v), np.tanh(v) * 2 + 1, rtol=1e-12)
    assert f.program.info["fallback_ops"] == ["tanh"]


def test_host_only_ops_are_reported_and_native_ones_are_not(rng):
    a, b = gc.placeholder("a", (3, 3), "float64"), gc.placeholder("b", (3,), "float64")
    f = gc.function([a, b], gc.exp(gc.solve(a, b)), backend="llvm")
    av, bv = rng.standard_normal((3, 3)) + 3 * np.eye(3), rng.standard_normal(3)
    np.testing.assert_allclose(f(av, bv), np.exp(np.linalg.solve(av, bv)), rtol=1e-10)
    assert f.program.info["fallback_ops"] == ["solve"]


def test_cast_to_bool_is_native(rng):
    x = gc.placeholder("x", (7,), "float32")
    f = gc.function([x], gc.cast(x, "bool"), backend="llvm")
    v = np.array([0, -0.0, 1.5, np.nan, -2, 0, np.inf], np.float32)
    np.testing.assert_array_equal(f(v), v.astype(bool))
    assert f.program.info["fallback_ops"] == []
