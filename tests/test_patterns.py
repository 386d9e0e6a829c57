"""The rewrite pattern language (graphc/passes/pattern.py): matching, binding, constraints, commutative
inputs, templates, rule tables keyed by op; every algebraic and stability rule fires on an example and
keeps the value (against NumPy); rules that must not fire do not; no op-name comparisons in the passes."""
from __future__ import annotations

import pathlib
import re
from collections import Counter

import numpy as np
import pytest

import graphc as gc
from graphc import ops as F
from graphc.ir import Trait
from graphc.ops.reduce import Softmax, Sum
from graphc.ops.shape_ops import Reshape, Transpose
from graphc.passes import algebraic, stability
from graphc.passes.pattern import Const, P, Rule, Rules, V, lazy, match
from graphc.passes.rewrite import rebuild

x, y = V("x"), V("y")


def _ph(name="a", shape=(3,), dtype="float64"):
    return gc.placeholder(name, shape, dtype)


# ---- matching and binding ---------------------------------------------------------------------------

def test_nested_pattern_binds_the_inner_tensor():
    a = _ph()
    assert match(P(F.neg, P(F.neg, x)), -(-a)) == {"x": a}
    assert match(P(F.neg, P(F.neg, x)), -gc.exp(a)) is None
    assert match(P(F.neg, P(F.exp, x)), -gc.exp(a)) == {"x": a}
    e = gc.exp(a)
    assert match(P(F.neg, P(F.exp, x, name="e")), -e) == {"x": a, "e": e}  # a named node pattern binds too


def test_a_variable_used_twice_must_be_the_same_tensor():
    a, b = _ph("a"), _ph("b")
    assert match(P(F.sub, x, x), a - a) == {"x": a}
    assert match(P(F.sub, x, x), a - b) is None
    assert match(P(F.sub, x, y), a - b) == {"x": a, "y": b}


def test_input_count_and_ellipsis():
    a = _ph()
    assert match(P(F.add, x), a + a) is None  # two inputs, one pattern
    assert match(P(F.add, x, ...), a + 1.0) == {"x": a}  # `...`: any further inputs
    assert match(P(F.add), a + 1.0) == {}  # no src: any inputs


def test_const_matches_constants_whose_elements_are_all_equal():
    a = _ph()
    assert match(P(F.mul, x, Const(1)), a * 1.0) == {"x": a}
    assert match(P(F.mul, x, Const(1)), a * gc.constant(np.ones(3))) == {"x": a}
    assert match(P(F.mul, x, Const(1)), a * 2.0) is None
    assert match(P(F.mul, x, Const(1)), a * gc.constant(np.array([1.0, 2.0, 1.0]))) is None
    assert match(P(F.mul, x, Const(1)), a * _ph("one", (), "float64")) is None  # not a constant
    c = gc.constant(2.5)
    assert match(P(F.mul, x, Const(name="c")), a * c) == {"x": a, "c": c}


def test_commutative_ops_match_their_inputs_in_either_order():
    a = _ph()
    assert Trait.COMMUTATIVE & F.mul.op.traits and not Trait.COMMUTATIVE & F.sub.op.traits
    assert match(P(F.mul, x, Const(2)), a * 2.0) == {"x": a}
    assert match(P(F.mul, x, Const(2)), 2.0 * a) == {"x": a}
    assert match(P(F.mul, x, Const(2), commute=False), 2.0 * a) is None
    assert match(P(F.sub, x, Const(2)), 2.0 - a) is None  # sub is not commutative
    # both orders are searched with backtracking: the inner pattern decides which input is which
    b = _ph("b")
    assert match(P(F.add, x, P(F.neg, y)), -b + a) == {"x": a, "y": b}


def test_constraints_dtype_where_attrs_and_op_sets():
    a, i = _ph(), _ph("i", (3,), "int64")
    assert match(P(F.exp, V("x", dtype="float64")), gc.exp(a)) == {"x": a}
    assert match(P(F.neg, V("x", dtype=("float32",))), -a) is None
    assert match(P(F.neg, V("x", dtype=lambda d: d.startswith("int"))), -i) == {"x": i}
    assert match(P(F.neg, V("x", where=lambda t: t.ndim == 3)), -a) is None
    s = gc.sum(a, axis=0)
    assert match(P(Sum, x, attrs={"axis": (0,)}), s) == {"x": a}
    assert match(P(Sum, x, attrs={"axis": ()}), s) is None
    assert match(P(Sum, x, attrs={"keepdims": lambda k: k is False}), s) == {"x": a}
    assert match(P({F.exp, F.log}, x), gc.log(a)) == {"x": a}  # a set of ops
    assert match(P(Trait.MONOID, x), gc.max(a)) == {"x": a}  # any op with a trait
    assert match(P(Trait.MONOID, x), gc.argmax(a)) is None
    assert match(P(None, x), gc.sin(a)) == {"x": a}  # any op


def test_bad_patterns_and_rules_are_refused():
    with pytest.raises(gc.GraphcError, match="not an op"):
        P("exp", x)
    with pytest.raises(gc.GraphcError, match="not a P, V or Const"):
        P(F.exp, 3)
    with pytest.raises(gc.GraphcError, match="does not bind"):
        P(F.neg, P(F.neg, x)) >> y
    with pytest.raises(gc.GraphcError, match="does not bind"):
        P(F.neg, x) >> (lambda z: z)
    with pytest.raises(gc.GraphcError, match="must be a node pattern"):
        x >> x


# ---- rules: templates, firing, not firing, the log ---------------------------------------------------

def _rewrite(rules, out, ins):
    log = Counter()
    g = rebuild(gc.Graph(ins, [out]), rules, log, "test")
    return g, log


def test_templates_arithmetic_and_references_build_the_replacement(rng):
    a, b = _ph("a"), _ph("b")
    r = P(F.add, x, P(F.neg, y)) >> x - y * 2.0
    assert r.name == "add(x, neg(y)) -> (x - (y * 2.0))"
    g, log = _rewrite(Rules([r]), a + (-b), [a, b])
    assert g.op_names() == ["mul", "sub"] and log == Counter({"test": 1, r.name: 1})
    va, vb = rng.standard_normal(3), rng.standard_normal(3)
    np.testing.assert_allclose(gc.evaluate(g.outputs, {a: va, b: vb})[0], va - 2 * vb)
    m = _ph("m", (2, 6))
    r2 = P(Reshape, P(Reshape, x), name="r") >> lazy(F.reshape)(x, V("r").shape)
    g2, _ = _rewrite(Rules([r2]), F.reshape(F.reshape(m, (3, 4)), (4, 3)), [m])
    assert g2.op_names() == ["reshape"] and g2.outputs[0].node.inputs[0] is m
    s = _ph("s", (2, 5))
    r3 = P(F.log, P(Softmax, x, name="sm")) >> lazy(F.log_softmax)(x, V("sm").attr("axis"))
    g3, _ = _rewrite(Rules([r3]), gc.log(gc.softmax(s, axis=0)), [s])
    assert g3.op_names() == ["log_softmax"] and g3.outputs[0].node.attrs["axis"] == 0


def test_a_rule_that_must_not_fire_because_the_type_would_change():
    a = _ph("a", (3,))
    ones = gc.constant(np.ones((2, 3)))  # broadcasts a: a * ones is (2, 3), a is (3,)
    g, log = _rewrite(algebraic.RULES, a * ones, [a])
    assert g.op_names() == ["mul"] and not log
    i = _ph("i", (3,), "int64")  # log(1 + i): log1p needs a float operand of the result's type
    g, log = _rewrite(stability.RULES, gc.log(1 + i), [i])
    assert g.op_names() == ["add", "log"] and not log


def test_function_replacements_get_bindings_node_and_inputs():
    a = _ph("a", (2, 3))
    seen = {}

    def swap(x, node, ins):
        seen.update(x=x, node=node, ins=ins)
        return None  # does not apply: the next rule is tried
    rules = Rules([P(Transpose, P(Transpose, x)) >> swap, P(Transpose, P(Transpose, x)) >> x])
    out = F.transpose(F.transpose(a))
    g, log = _rewrite(rules, out, [a])
    assert seen["x"] is a and seen["node"] is out.node and seen["ins"] == list(out.node.inputs)
    assert g.outputs[0] is a and log["transpose(transpose(x)) -> x"] == 1


def test_rule_tables_are_keyed_by_op_object():
    r_neg, r_exp = P(F.neg, P(F.neg, x)) >> x, P(F.exp, P(F.log, x)) >> x
    r_red = P(Trait.MONOID, x, attrs={"axis": ()}) >> x
    r_any = P(None, x) >> (lambda x: None)
    table = Rules([r_neg, r_exp, r_red, r_any])
    assert table.for_op(F.neg.op) == [r_neg, r_any]
    assert table.for_op(Sum) == [r_red, r_any]
    assert table.for_op(F.sin.op) == [r_any]


def test_debug_passes_names_the_rules_that_fired(capsys):
    a = _ph()
    gc.function([a], gc.log(gc.softmax(-(-a))) * 1.0, debug_passes=True)
    err = capsys.readouterr().err
    assert "simplified: 2, mul(x, 1) -> x: 1, neg(neg(x)) -> x: 1" in err
    assert "stabilised: 1, log(softmax(x)) -> log_softmax(x, sm.axis): 1" in err


# ---- every rule of the two tables fires on an example and keeps the value -------------------------------

def _sig(v):
    return 1 / (1 + np.exp(-v))


def _lse(v, axis):
    m = v.max(axis, keepdims=True)
    return (m + np.log(np.exp(v - m).sum(axis, keepdims=True))).squeeze(axis)


A, B = np.linspace(0.2, 1.4, 12).reshape(3, 4), np.linspace(-1.0, 1.0, 12).reshape(3, 4) + 0.05
EXAMPLES = {  # rule name -> (graph over a, b (3, 4) float64, NumPy value)
    "take(x, i) -> take_as_view": (lambda a, b: gc.take(a, np.array([1, 2, 3]), axis=1), A[:, 1:4]),
    "add(x, 0) -> x": (lambda a, b: 0.0 + a, A),
    "add(x, neg(y)) -> (x - y)": (lambda a, b: -b + a, A - B),
    "sub(x, 0) -> x": (lambda a, b: a - 0.0, A),
    "sub(x, x) -> zeros": (lambda a, b: (lambda e: e - e)(gc.exp(a)), np.zeros((3, 4))),
    "sub(0, y) -> neg(y)": (lambda a, b: 0.0 - a, -A),
    "sub(x, neg(y)) -> (x + y)": (lambda a, b: a - (-b), A + B),
    "mul(x, 1) -> x": (lambda a, b: 1.0 * a, A),
    "mul(x, -1) -> neg(x)": (lambda a, b: a * -1.0, -A),
    "div(x, 1) -> x": (lambda a, b: a / 1.0, A),
    "pow(x, 1) -> x": (lambda a, b: a ** 1.0, A),
    "pow(x, 2) -> (x * x)": (lambda a, b: a ** 2.0, A * A),
    "pow(x, 0.5) -> sqrt(x)": (lambda a, b: a ** 0.5, np.sqrt(A)),
    "neg(neg(x)) -> x": (lambda a, b: -(-a), A),
    "exp(log(x)) -> x": (lambda a, b: gc.exp(gc.log(a)), A),
    "log(exp(x)) -> x": (lambda a, b: gc.log(gc.exp(b)), B),
    "transpose(transpose(x)) -> transpose_of_transpose": (
        lambda a, b: F.transpose(F.transpose(gc.reshape(a, (3, 2, 2)), (1, 0, 2)), (0, 2, 1)),
        A.reshape(3, 2, 2).transpose(1, 0, 2).transpose(0, 2, 1)),
    "reshape(reshape(x)) -> reshape(x, r.shape)": (lambda a, b: a.reshape(2, 6).reshape(6, 2), A.reshape(6, 2)),
    # three reshapes/transposes whose pieces regroup into fewer ops (the head split of an exported attention)
    "reshape(...) -> layout_chain": (lambda a, b: gc.reshape(F.transpose(gc.reshape(a, (6, 2)), (1, 0)), (2, 3, 2)),
                                     A.reshape(6, 2).T.reshape(2, 3, 2)),
    "transpose(...) -> layout_chain": (
        lambda a, b: F.transpose(gc.reshape(F.transpose(a, (1, 0)), (2, 2, 3)), (2, 0, 1)),
        A.T.reshape(2, 2, 3).transpose(2, 0, 1)),
    "broadcast_to(broadcast_to(x)) -> broadcast_to(x, b.shape)": (
        lambda a, b: gc.broadcast_to(gc.broadcast_to(a[0], (2, 4)), (5, 2, 4)), np.broadcast_to(A[0], (5, 2, 4))),
    "{monoid}(x, axis=()) -> x": (lambda a, b: gc.sum(a, axis=()), A),
    "{elementwise}(...) -> drop_broadcasts": (lambda a, b: a * gc.broadcast_to(b[0], (3, 4)), A * B[0]),
    "log(softmax(x)) -> log_softmax(x, sm.axis)": (
        lambda a, b: gc.log(gc.softmax(b, axis=1)), B - _lse(B, 1)[:, None]),
    "log(g) -> log_softmax_through_gathers": (
        lambda a, b: gc.log(gc.softmax(b, axis=1)[1]), (B - _lse(B, 1)[:, None])[1]),
    "log(sigmoid(x)) -> neg(softplus(neg(x)))": (lambda a, b: gc.log(gc.sigmoid(b)), np.log(_sig(B))),
    "log(sub(1, sigmoid(x))) -> neg(softplus(x))": (lambda a, b: gc.log(1.0 - gc.sigmoid(b)), np.log(1 - _sig(B))),
    "log(add(1, x)) -> log1p(x)": (lambda a, b: gc.log(a + 1.0), np.log1p(A)),
    "log(sum(exp(x))) -> logsumexp(x, sm_sum.axis, sm_sum.keepdims)": (
        lambda a, b: gc.log(gc.sum(gc.exp(b), axis=0)), _lse(B, 0)),
    "log1p(exp(x)) -> softplus(x)": (lambda a, b: gc.log1p(gc.exp(b)), np.log1p(np.exp(B))),
    "sub(exp(x), 1) -> expm1(x)": (lambda a, b: gc.exp(b) - 1.0, np.expm1(B)),
    "mul(div(a, y), y) -> a": (lambda a, b: (b / a) * a, B),
    "mul(sub(div(a, y), s), y) -> (a - (y * s))": (lambda a, b: a * (b / a - 2.0), B - 2 * A),
}


@pytest.mark.parametrize("module", [algebraic, stability], ids=["algebraic", "stability"])
def test_rules_are_one_line_patterns_with_names(module):
    assert isinstance(module.RULES, Rules) and all(isinstance(r, Rule) for r in module.RULES)
    assert all(" -> " in r.name for r in module.RULES)
    assert len({r.name for r in module.RULES}) == len(module.RULES)
    assert {r.name for r in module.RULES} <= set(EXAMPLES)  # every rule has an example below


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_every_rule_fires_on_its_example_and_keeps_the_value(name):
    build, want = EXAMPLES[name]
    a, b = _ph("a", (3, 4)), _ph("b", (3, 4))
    out = build(a, b)
    rules = algebraic.RULES if name in {r.name for r in algebraic.RULES} else stability.RULES
    g, log = _rewrite(rules, out, [a, b])
    assert log[name] >= 1, (name, dict(log))
    assert not [k for k in log if "rejected" in k]
    got = gc.evaluate(g.outputs, {a: A, b: B})[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == tuple(out.shape) and got.dtype == np.dtype(out.dtype)


# ---- traits, not names -------------------------------------------------------------------------------

def test_no_op_name_comparisons_in_the_passes():
    """Passes ask traits (`op.has(Trait.X)`) or compare op objects; op names are for printing."""
    root = pathlib.Path(gc.__file__).parent / "passes"
    bad = re.compile(r"\.name (==|!=|in|not in)|name\.startswith|getattr\([^)]*\"(pure|stateful|elementwise)\"")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(root.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if bad.search(line) and not re.search(r"\b(p|t|graph|dtype)\.name\b", line)]
    assert hits == []
