"""A small pattern language for graph rewrites: each rule is one line `pattern >> replacement`.

Modelled on tinygrad's UPat/PatternMatcher and PyTensor's PatternNodeRewriter (own code)::

    x, y = V("x"), V("y")
    neg, sub = lazy(F.neg), lazy(F.sub)
    RULES = Rules([
        P(F.neg, P(F.neg, x)) >> x,                       # --x -> x
        P(F.mul, x, Const(-1)) >> neg(x),                 # also (-1) * x: mul is COMMUTATIVE
        P(F.add, x, P(F.neg, y)) >> x - y,                # arithmetic on variables builds a template
        P(F.log, P(Softmax, x, name="s")) >> lazy(F.log_softmax)(x, V("s").attr("axis")),
        P(Trait.MONOID, x, attrs={"axis": ()}) >> x,      # an op, a set of ops or a trait
        P(Trait.ELEMENTWISE) >> drop_broadcasts,          # a rule that needs code: a function
    ])

Patterns::

    P(op, *src, name=, dtype=, attrs=, where=, commute=)  a node: `op` is an Op, a public function with
        `.op`, a collection of those, a Trait (any op having it) or None (any op). `src` are patterns for
        the inputs, matched in order (no src: any inputs; a trailing `...`: any further inputs). Inputs
        of an op with Trait.COMMUTATIVE are also tried in the other order (commute=False turns it off).
        `attrs` maps an attr name to a value or a predicate; `where` is a predicate on the tensor.
    V(name, dtype=, where=)   any tensor, bound to `name`; a name used twice must be the same tensor.
    Const(value, name=)       a constant whose elements all equal `value` (any such constant: no value).

A `dtype` constraint is a dtype name, a collection of names or a predicate on the name.

Replacements:
    a variable (`x`): the bound tensor; a template: `lazy(fn)(args...)` or arithmetic (+ - * / unary -)
    on variables, with `v.shape`, `v.dtype` and `v.attr("axis")` reading a binding; or a function whose
    parameters are binding names (and optionally `node`, the matched node, and `ins`, its inputs); it
    returns a tensor, a list of tensors, or None (does not apply).

A rule applies only when its result has exactly the matched node's output types (shape and dtype):
"same type" is a constraint every rule carries, so `x * 1 -> x` is left alone where `1` broadcasts x.
`Rules` is a rule table keyed by op object (rules are found by the matched node's op, never its name);
calling it as a rewrite.Rule tries the op's rules in order and records the rule that fired
(`.fired`), which rewrite.rebuild counts under the rule's name in the pass log (`debug_passes`).
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Iterable, Iterator

from graphc import ops as F
from .. import ir
from ..errors import GraphcError
from ..ir import Node, Op, Tensor, Trait
from .rewrite import const_scalar, same_type

__all__ = ["P", "V", "Const", "Rule", "Rules", "T", "lazy", "match"]


# ---- templates (the replacement side) -----------------------------------------------------------

class _Expr:
    """Something evaluated against the bindings of a match: arithmetic on it builds a template."""

    def build(self, b: dict) -> Any:
        raise NotImplementedError

    def __add__(self, o): return T(F.add, self, o)
    def __radd__(self, o): return T(F.add, o, self)
    def __sub__(self, o): return T(F.sub, self, o)
    def __rsub__(self, o): return T(F.sub, o, self)
    def __mul__(self, o): return T(F.mul, self, o)
    def __rmul__(self, o): return T(F.mul, o, self)
    def __truediv__(self, o): return T(F.div, self, o)
    def __rtruediv__(self, o): return T(F.div, o, self)
    def __neg__(self): return T(F.neg, self)

    @property
    def shape(self) -> "Ref":
        return Ref(self, lambda t: t.shape, "shape")

    @property
    def dtype(self) -> "Ref":
        return Ref(self, lambda t: t.dtype, "dtype")

    def attr(self, key: str) -> "Ref":
        """The attr `key` of the bound tensor's node (e.g. a reduction's axis)."""
        return Ref(self, lambda t: t.node.attrs[key], key)


def _build(v, b: dict):
    if isinstance(v, _Expr):
        return v.build(b)
    if isinstance(v, (tuple, list)):
        return type(v)(_build(e, b) for e in v)
    return v


def _show(v) -> str:
    if isinstance(v, (_Expr, Pattern)):
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(e) for e in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


class T(_Expr):
    """A template: `fn(*args, **kw)` with variables, references and templates among the arguments."""

    _INFIX = {F.add: "+", F.sub: "-", F.mul: "*", F.div: "/"}  # shown infix (keyed by function)

    def __init__(self, fn: Callable, *args, **kw):
        self.fn, self.args, self.kw = fn, args, kw

    def build(self, b):
        return self.fn(*[_build(a, b) for a in self.args], **{k: _build(v, b) for k, v in self.kw.items()})

    def __repr__(self):
        name = getattr(self.fn, "__name__", "fn")
        if self.fn in self._INFIX and len(self.args) == 2 and not self.kw:
            return f"({_show(self.args[0])} {self._INFIX[self.fn]} {_show(self.args[1])})"
        parts = [_show(a) for a in self.args] + [f"{k}={_show(v)}" for k, v in self.kw.items()]
        return f"{name}({', '.join(parts)})"


def lazy(fn: Callable) -> Callable[..., T]:
    """`fn` as a template builder: `lazy(F.log_softmax)(x, axis)` builds log_softmax when a rule fires."""
    def make(*args, **kw):
        return T(fn, *args, **kw)
    make.__name__ = getattr(fn, "__name__", "fn")
    return make


class Ref(_Expr):
    """A property of a bound tensor (its shape, dtype or one of its node's attrs)."""

    def __init__(self, of: _Expr, get: Callable, label: str):
        self.of, self.get, self.label = of, get, label

    def build(self, b):
        return self.get(_build(self.of, b))

    def __repr__(self):
        return f"{self.of!r}.{self.label}"


# ---- patterns (the matching side) ---------------------------------------------------------------

def _dtype_ok(spec, dtype: str) -> bool:
    if spec is None:
        return True
    if isinstance(spec, str):
        return dtype == spec
    if callable(spec):
        return bool(spec(dtype))
    return dtype in spec


class Pattern:
    """Base of P, V and Const: `pattern >> replacement` is a Rule."""

    def match(self, t: Tensor, b: dict) -> Iterator[dict]:
        """Every extension of the bindings `b` under which this pattern matches tensor `t`."""
        raise NotImplementedError

    def __rshift__(self, replacement) -> "Rule":
        return Rule(self, replacement)


def _bind(name: str | None, t: Tensor, b: dict) -> dict | None:
    if name is None:
        return b
    if name in b:
        return b if b[name] is t else None
    return {**b, name: t}


class V(Pattern, _Expr):
    """A variable: matches any tensor (of `dtype`, satisfying `where`) and binds it to `name`."""

    def __init__(self, name: str, dtype=None, where: Callable[[Tensor], bool] | None = None):
        self.name, self._dtype, self._where = name, dtype, where

    def match(self, t, b):
        if _dtype_ok(self._dtype, t.dtype) and (self._where is None or self._where(t)):
            nb = _bind(self.name, t, b)
            if nb is not None:
                yield nb

    def build(self, b):
        return b[self.name]

    def __repr__(self):
        return self.name


class Const(Pattern):
    """A constant whose elements are all equal to `value` (any such constant when `value` is None)."""

    def __init__(self, value=None, name: str | None = None, dtype=None):
        self.value, self.name, self._dtype = value, name, dtype

    def match(self, t, b):
        if not _is_const(t.node.op) or not _dtype_ok(self._dtype, t.dtype):
            return
        c = const_scalar(t)
        if c is None or (self.value is not None and c != self.value):
            return
        nb = _bind(self.name, t, b)
        if nb is not None:
            yield nb

    def __repr__(self):
        return self.name if self.value is None and self.name else repr(self.value)


_CONST: dict[Op, bool] = {}
_COMMUTES: dict[Op, bool] = {}


def _is_const(op: Op) -> bool:
    got = _CONST.get(op)
    if got is None:
        got = _CONST[op] = op.has(Trait.CONST)
    return got


def _commutes(op: Op) -> bool:
    got = _COMMUTES.get(op)
    if got is None:
        got = _COMMUTES[op] = op.has(Trait.COMMUTATIVE)
    return got


def _as_op(o) -> Op:
    op = o if isinstance(o, Op) else getattr(o, "op", None)
    if not isinstance(op, Op):
        raise GraphcError(f"pattern: {o!r} is not an op (an Op, a public function with .op, or a Trait)")
    return op


class P(Pattern):
    """A node pattern; see the module docstring."""

    def __init__(self, op=None, *src, name: str | None = None, dtype=None, attrs: dict | None = None,
                 where: Callable[[Tensor], bool] | None = None, commute: bool = True):
        if op is None or isinstance(op, Trait):
            self.ops = op
        elif isinstance(op, (set, frozenset, tuple, list)):
            self.ops = frozenset(_as_op(o) for o in op)
        else:
            self.ops = frozenset({_as_op(op)})
        self.more = bool(src) and src[-1] is Ellipsis
        self.src = tuple(src[:-1]) if self.more else (tuple(src) if src else None)
        for s in self.src or ():
            if not isinstance(s, Pattern):
                raise GraphcError(f"pattern: input pattern {s!r} is not a P, V or Const")
        self.name, self._dtype, self.attrs, self._where, self.commute = name, dtype, dict(attrs or {}), where, commute

    def op_ok(self, op: Op) -> bool:
        if self.ops is None:
            return True
        if isinstance(self.ops, Trait):
            return op.has(self.ops)
        return op in self.ops

    def match(self, t, b):
        yield from self.match_node(t.node, t.node.inputs, t, b)

    def match_node(self, node: Node, ins, t: Tensor, b: dict, op_known: bool = False) -> Iterator[dict]:
        """Match `node` (whose inputs are `ins`: at the root, the already rewritten ones) as tensor `t`
        (`op_known`: the caller already checked the op, e.g. a rule table indexed by op)."""
        if not (op_known or self.op_ok(node.op)) or (self._dtype is not None and not _dtype_ok(self._dtype, t.dtype)):
            return
        for k, want in self.attrs.items():
            if k not in node.attrs:
                return
            have = node.attrs[k]
            if not (want(have) if callable(want) else _attr_equal(have, want)):
                return
        if self._where is not None and not self._where(t):
            return
        if self.name is not None:
            b = _bind(self.name, t, b)
            if b is None:
                return
        src = self.src
        if src is None:
            yield b
            return
        n = len(src)
        if len(ins) != n and (len(ins) < n or not self.more):
            return
        if n == 1:
            yield from src[0].match(ins[0], b)
            return
        if not (self.commute and _commutes(node.op)):
            yield from _match_all(src, ins, b)
            return
        seen = []
        for order in itertools.permutations(range(n)):
            for nb in _match_all([src[i] for i in order], ins, b):
                if not any(nb.keys() == o.keys() and all(nb[k] is o[k] for k in nb) for o in seen):
                    seen.append(nb)  # the same bindings through a symmetric match count once
                    yield nb

    def __repr__(self):
        if self.ops is None:
            head = "_"
        elif isinstance(self.ops, Trait):
            head = "{" + "|".join(m.name.lower() for m in self.ops) + "}"
        else:
            names = sorted(o.name for o in self.ops)
            head = names[0] if len(names) == 1 else "{" + "|".join(names) + "}"
        parts = [repr(s) for s in self.src or ()] + (["..."] if self.more or self.src is None else [])
        parts += [f"{k}={_show(v) if not callable(v) else getattr(v, '__name__', 'fn')}" for k, v in self.attrs.items()]
        return f"{head}({', '.join(parts)})"


def _attr_equal(have, want) -> bool:
    try:
        return bool(have == want)
    except Exception:  # e.g. arrays of different shapes
        return False


def _match_all(pats, ins, b, i: int = 0) -> Iterator[dict]:
    """Patterns pats[i:] against ins[i:] in order (backtracking through every way each one matches)."""
    if i == len(pats):
        yield b
        return
    for nb in pats[i].match(ins[i], b):
        yield from _match_all(pats, ins, nb, i + 1)


def match(pattern: Pattern, t: Tensor) -> dict | None:
    """The first bindings under which `pattern` matches tensor `t`, or None (for tests and tools)."""
    return next(iter(pattern.match(t, {})), None)


# ---- rules and rule tables ----------------------------------------------------------------------

def _input_op_check(p):
    """What an input pattern needs of the op of the tensor's node: a predicate, or None (anything)."""
    if isinstance(p, P) and p.ops is not None:
        return p.op_ok
    if isinstance(p, Const):
        return _is_const
    return None


def _names(p) -> set:
    """The binding names a pattern binds, or a template reads."""
    if isinstance(p, V):
        return {p.name}
    if isinstance(p, Const):
        return {p.name} if p.name else set()
    if isinstance(p, P):
        return ({p.name} if p.name else set()).union(*[_names(s) for s in p.src or ()])
    if isinstance(p, T):
        return set().union(*[_names(a) for a in (*p.args, *p.kw.values())])
    if isinstance(p, Ref):
        return _names(p.of)
    if isinstance(p, (tuple, list)):
        return set().union(*[_names(a) for a in p])
    return set()


class Rule:
    """`pattern >> replacement`: see the module docstring. `name` is what the pass log counts."""

    def __init__(self, pattern: Pattern, replacement, name: str | None = None):
        if not isinstance(pattern, P):
            raise GraphcError(f"a rule's pattern must be a node pattern P(...), got {pattern!r}")
        self.pattern, self.replacement = pattern, replacement
        self._params = None
        if not isinstance(replacement, _Expr):
            if not callable(replacement):
                raise GraphcError(f"rule {pattern!r}: the replacement {replacement!r} is neither a variable, "
                                  "a template nor a function")
            self._params = list(inspect.signature(replacement).parameters)
            unknown = set(self._params) - _names(pattern) - {"node", "ins"}
            if unknown:
                raise GraphcError(f"rule {pattern!r}: {getattr(replacement, '__name__', 'the replacement')} takes "
                                  f"{sorted(unknown)}, which the pattern does not bind")
        else:
            unknown = _names(replacement) - _names(pattern)
            if unknown:
                raise GraphcError(f"rule {pattern!r}: the replacement {replacement!r} uses {sorted(unknown)}, "
                                  "which the pattern does not bind")
        self.name = name or f"{pattern!r} -> {self._show_replacement()}"
        # a cheap necessary condition on the inputs' ops (which input patterns need a node of some op or
        # a constant), tried before the full match: most nodes fail it, and a pass offers every node to
        # every rule of its op
        src = pattern.src or ()
        self._needs = tuple(_input_op_check(q) for q in src) if any(_input_op_check(q) for q in src) else None

    def quick(self, node: Node, ins) -> bool:
        """False when the pattern cannot match `node` with inputs `ins` (a check of the inputs' ops only)."""
        needs = self._needs
        if needs is None:
            return True
        n = len(needs)
        if len(ins) < n:
            return False
        if self.pattern.commute and _commutes(node.op):
            if n != 2:
                return True
            a, b = ins[0].node.op, ins[1].node.op
            return ((needs[0] is None or needs[0](a)) and (needs[1] is None or needs[1](b))) or (
                (needs[0] is None or needs[0](b)) and (needs[1] is None or needs[1](a)))
        return all(c is None or c(t.node.op) for c, t in zip(needs, ins))

    def _show_replacement(self) -> str:
        if isinstance(self.replacement, _Expr):
            return repr(self.replacement)
        return getattr(self.replacement, "__name__", "fn")

    def named(self, name: str) -> "Rule":
        self.name = name
        return self

    def apply(self, node: Node, ins, op_known: bool = False) -> list[Tensor] | None:
        """Replacement tensors for `node`'s outputs (its inputs rewritten to `ins`), or None."""
        for b in self.pattern.match_node(node, ins, node.outputs[0], {}, op_known):
            outs = self._build(b, node, ins)
            if outs is not None and len(outs) == len(node.outputs) and all(
                    isinstance(n, Tensor) and same_type(n, o) for n, o in zip(outs, node.outputs)):
                return outs
        return None

    def _build(self, b: dict, node: Node, ins):
        if self._params is None:
            out = self.replacement.build(b)
        else:
            out = self.replacement(**{p: b[p] if p in b else (node if p == "node" else list(ins))
                                      for p in self._params})
        if out is None:
            return None
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def __repr__(self):
        return f"<rule {self.name}>"


class Rules:
    """A rule table keyed by op object; an instance is a rewrite.Rule (`table(node, ins)`)."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise GraphcError(f"Rules takes rules (`pattern >> replacement`), got {r!r}")
        self._index: dict[Op, list[Rule]] | None = None
        self._n_ops = -1
        self.fired: Rule | None = None

    def for_op(self, op: Op) -> list[Rule]:
        """The rules whose root pattern can match `op`, in table order (the index follows the registry)."""
        if self._index is None or self._n_ops != len(ir.OPS):
            index: dict[Op, list[Rule]] = {}
            for op_ in ir.OPS.values():
                index[op_] = [r for r in self.rules if r.pattern.op_ok(op_)]
            self._index, self._n_ops = index, len(ir.OPS)
        got = self._index.get(op)
        return got if got is not None else [r for r in self.rules if r.pattern.op_ok(op)]

    def __call__(self, node: Node, ins) -> list[Tensor] | None:
        for r in self.for_op(node.op):
            if not r.quick(node, ins):
                continue
            out = r.apply(node, ins, op_known=True)
            if out is not None:
                self.fired = r
                return out
        return None

    def __add__(self, other: "Rules") -> "Rules":
        return Rules(self.rules + other.rules)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)
