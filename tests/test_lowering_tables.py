"""Every registered op is lowered by every native backend's table, or declares why it stays on the host.

A new primitive without its row in a native backend's table fails here (it would otherwise run
silently as NumPy on the host)."""
from __future__ import annotations

import pytest

import graphc as gc  # noqa: F401  (registers every op)
from graphc.function import get_backend
from graphc.ir import OPS, Trait

NATIVE = ("llvm", "cuda", "cuda-emulated")


def _backend(name):
    from graphc.function import BACKENDS
    import importlib
    return importlib.import_module(BACKENDS[name]).BACKEND


@pytest.mark.parametrize("name", NATIVE)
def test_every_op_is_lowered_or_declared_host_only(name):
    lowered = _backend(name).lowered_ops()
    missing = sorted(op.name for op in OPS.values()
                     if not op.has(Trait.LEAF) and op.host_only is None and op not in lowered)
    assert not missing, f"backend {name!r} has no lowering for {missing} and they do not declare host_only"


@pytest.mark.parametrize("name", NATIVE)
def test_host_only_ops_are_not_lowered_and_say_why(name):
    lowered = _backend(name).lowered_ops()
    for op in OPS.values():
        if op.host_only is not None:
            assert isinstance(op.host_only, str) and len(op.host_only) > 10, op.name
            assert op not in lowered, f"{op.name} declares host_only but {name} lowers it"


def test_table_keys_are_ops_not_names():
    for name in NATIVE:
        for key in _backend(name).lowered_ops():
            assert isinstance(key, gc.Op), f"{name}: lowering table key {key!r} is not an op"


def test_numpy_runs_every_op():
    assert get_backend("numpy").lowered_ops() >= frozenset(OPS.values())


def test_every_op_declares_one_kind_and_two_are_refused():
    from graphc.ir import KINDS, Op, register
    for op in OPS.values():
        kinds = op.traits & KINDS & ~(Trait.INPUT | Trait.STATE | Trait.CONST)
        assert len(list(kinds)) == 1, f"{op.name}: kinds {kinds}"
        assert not hasattr(op, "c") and not hasattr(op, "np_code"), f"{op.name} carries a backend spelling"

    class TwoKinds(Op):
        name = "test_two_kinds"
        traits = Trait.ELEMENTWISE | Trait.REDUCTION
    with pytest.raises(gc.GraphcError, match="several kinds"):
        register(TwoKinds)
    assert "test_two_kinds" not in OPS
