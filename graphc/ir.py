"""The graph IR: Op (definition), Node (one application of an op), Tensor (a value in the graph)."""
from __future__ import annotations

import enum
import functools
import linecache
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import dtypes as _dt
from . import shapes as _sh
from .errors import DTypeError, GradientError, GraphcError, ShapeError

# graphc's own folders (graphc.frontends and graphc.backends live beside graphc/ in a source checkout,
# inside it when installed from a wheel): frames there are not the user's line
_PKG_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, *(os.path.join(os.path.dirname(__file__), "..", sub, "x") for sub in ("frontends", "backends")))
)


#: absolute code file name -> is it graphc's own (or NumPy's, or frozen) code (user_frame runs per node)
_NOT_USER: dict[str, bool] = {}


def user_frame() -> tuple[str, int]:
    """(file, line) of the first caller outside graphc: the user's line that built a node."""
    f = sys._getframe(1)
    while f is not None:
        co = f.f_code.co_filename
        skip = _NOT_USER.get(co)
        if skip is None:
            fn = os.path.abspath(co)
            skip = fn.startswith(_PKG_DIRS) or "<frozen" in fn or "numpy" + os.sep in fn
            if os.path.isabs(co):   # a relative name's absolute path depends on the working directory
                _NOT_USER[co] = skip
        if not skip:
            return os.path.abspath(co), f.f_lineno
        f = f.f_back
    return "<unknown>", 0


# ---- hooks: functions the layers above the core provide to it ------------------------------------
# The core (this module, shapes, dtypes, errors) imports nothing above it. Where it offers something an
# upper layer implements (turning Python values into constants, a graph's text or picture, gradients
# that a nested graph's vjp needs), that layer registers the function here when it is imported.

#: hook name -> the module that provides it (named in the error when it is missing)
HOOK_PROVIDERS = {"as_tensor": "graphc.ops", "graph_text": "graphc.printing", "to_networkx": "graphc.printing",
                  "repr_svg": "graphc.viz", "repr_html": "graphc.viz",
                  "grad": "graphc.autodiff", "jvp": "graphc.autodiff", "explain": "graphc.explain"}
_HOOKS: dict[str, Callable] = {}


def provide(name: str, fn: Callable) -> None:
    """Register `fn` as the core's hook `name` (one of HOOK_PROVIDERS); an upper layer calls this at import."""
    if name not in HOOK_PROVIDERS:
        raise GraphcError(f"unknown core hook {name!r}; hooks are {', '.join(HOOK_PROVIDERS)}")
    _HOOKS[name] = fn


def hook(name: str) -> Callable:
    """The function registered as hook `name`; a GraphcError naming its provider when none is."""
    fn = _HOOKS.get(name)
    if fn is None:
        raise GraphcError(f"graphc.ir needs {name!r} from {HOOK_PROVIDERS.get(name, 'an upper layer')}, "
                          f"which has not been imported (import graphc loads every layer)")
    return fn


def fmt_loc(loc: tuple[str, int]) -> str:
    fn, line = loc
    code = linecache.getline(fn, line).strip() if line else ""
    return f"{fn}:{line}" + (f": {code}" if code else "")


class Trait(enum.Flag):
    """What an op is, declared once on the op class (`traits = Trait.ELEMENTWISE | Trait.COMMUTATIVE`).

    Passes and backends ask these (`op.has(Trait.REDUCTION)`, `ops_with(Trait.MONOID)`) or match op
    objects; they never compare op names. Kinds (an op has at most one, LEAF ops one of INPUT/STATE/CONST):
    """
    NONE = 0
    LEAF = enum.auto()         # no computation: a graph input, parameter or constant
    INPUT = enum.auto()        # the placeholder leaf (a graph input)
    STATE = enum.auto()        # the parameter leaf (shared state, written by updates)
    CONST = enum.auto()        # the constant leaf (attrs["value"])
    ELEMENTWISE = enum.auto()  # one output element from the same element of each (broadcast) input; cast too
    REDUCTION = enum.auto()    # reduces attrs["axis"] (sum, max, argmax, logsumexp)
    NORMALIZATION = enum.auto()  # same shape out, a reduction along attrs["axis"] inside (softmax family)
    MONOID = enum.auto()       # a reduction by an associative combine with an identity (sum, prod, max, min)
    MOVEMENT = enum.auto()     # reshape, transpose, broadcast_to, getitem: no arithmetic, may be a view
    INDEXING = enum.auto()     # data-dependent or multi-source gathers/scatters (take, concatenate, ...)
    CONTRACTION = enum.auto()  # sums of products over an axis (matmul, convolution and its gradients)
    WINDOW = enum.auto()       # sliding windows (pooling and its gradients)
    CONTROL = enum.auto()      # nested graphs in attrs (scan loops, fused bodies)
    RANDOM = enum.auto()       # draws from a key input
    SHAPE = enum.auto()        # a query of static/symbolic dims (size_of)
    # flags
    COMMUTATIVE = enum.auto()  # f(a, b) == f(b, a) (CSE orders the inputs)
    FRESH = enum.auto()        # the result is new memory, never a view of an input
    WRITES_INTO = enum.auto()  # can compute into a buffer it is given (the memory planner may place it)
    IMPURE = enum.auto()       # not a function of its inputs alone: never merged (CSE) or folded
    NO_FOLD = enum.auto()      # pure, but never constant-folded (fused kernels)


KINDS = (Trait.LEAF | Trait.ELEMENTWISE | Trait.REDUCTION | Trait.NORMALIZATION | Trait.MOVEMENT | Trait.INDEXING
         | Trait.CONTRACTION | Trait.WINDOW | Trait.CONTROL | Trait.RANDOM | Trait.SHAPE)


class Op:
    """An op definition: shape/dtype rule, NumPy reference, gradient rules and its traits.

    Subclasses override `infer` and `impl`; `vjp`/`jvp` when differentiable; and declare `traits`.
    Backend spellings (C, NumPy source) live in the backends' lowering tables keyed by the op.
    One instance per op, registered by name (the name is for printing, serialisation and ONNX).
    """

    name: str = "op"
    n_outputs: int = 1  # -1: a variable number (the op returns a tuple)
    differentiable: bool = True
    traits: Trait = Trait.NONE
    #: None, or why no native backend lowers this op (it then runs its NumPy impl on the host, e.g. LAPACK)
    host_only: str | None = None

    def has(self, trait: Trait) -> bool:
        """True when the op has any of the traits in `trait`."""
        return (self.traits._value_ & trait._value_) != 0  # on the ints: Flag's `&` builds a member (slow)

    @property
    def elementwise(self) -> bool:
        return self.has(Trait.ELEMENTWISE)

    def infer(self, inputs: Sequence["Tensor"], **attrs) -> list[tuple[tuple, str]]:
        raise NotImplementedError

    def impl(self, *args, **attrs):
        raise NotImplementedError(f"{self.name}: no NumPy implementation")

    def vjp(self, node: "Node", gouts: list) -> list:
        """Gradients for node.inputs (Tensors or None for zero) given output cotangents."""
        raise GradientError(f"op {self.name!r} has no gradient (node built at {fmt_loc(node.loc)})")

    jvp = None  # optional: (node, tangents) -> list of output tangents; else derived from vjp

    def __repr__(self):
        return f"<op {self.name}>"


OPS: dict[str, Op] = {}


def register(cls):
    """Class decorator: instantiate the op and record it by name."""
    inst = cls()
    if inst.name in OPS:
        raise GraphcError(f"op {inst.name!r} registered twice")
    kinds = inst.traits & (KINDS & ~Trait.LEAF)
    if len(list(kinds)) > 1:
        raise GraphcError(f"op {inst.name!r} declares several kinds: {kinds}")
    OPS[inst.name] = inst
    ops_with.cache_clear()
    return inst


@functools.lru_cache(maxsize=None)
def ops_with(trait: Trait, without: Trait = Trait.NONE) -> frozenset:
    """The registered ops that have any of `trait` and none of `without` (sets like "the reductions"
    are derived here, never spelled out)."""
    return frozenset(op for op in OPS.values() if op.has(trait) and not op.has(without))


def is_leaf(node: "Node") -> bool:
    return node.op.has(Trait.LEAF)


class Node:
    """One application of an op to input tensors; immutable once built."""

    __slots__ = ("op", "inputs", "attrs", "outputs", "loc", "constraints", "__weakref__")

    def __init__(self, op: Op, inputs: Sequence["Tensor"], attrs: dict, loc=None, constraints=()):
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = dict(attrs)
        self.loc = loc or user_frame()
        self.outputs: tuple[Tensor, ...] = ()
        #: shapes.DimConstraint's its shape rule recorded (a symbolic dim unified with a concrete one)
        self.constraints = tuple(constraints)

    def __repr__(self):
        return f"Node({self.op.name}, {[t.label for t in self.inputs]})"


class Tensor:
    """A symbolic tensor: output `index` of `node`, with a static shape and dtype."""

    __array_priority__ = 1000

    def __init__(self, node: Node | None, index: int, shape: tuple, dtype: str, name: str | None = None):
        self.node = node
        self.index = index
        self.shape = _sh.canon_shape(shape)
        self.dtype = _dt.as_dtype(dtype)
        self.name = name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self):
        return _sh.size(self.shape)

    @property
    def op(self) -> Op:
        return self.node.op

    @property
    def label(self) -> str:
        return self.name or f"t{id(self) % 100000}"

    @property
    def type_str(self) -> str:
        return f"{self.dtype}{list(self.shape)}".replace(" ", "")

    def __repr__(self):
        return f"Tensor({self.label}: {self.dtype}{_sh.fmt_shape(self.shape)} = {self.node.op.name})"

    def __hash__(self):
        return id(self)

    def __bool__(self):
        raise GraphcError("a symbolic tensor has no truth value; use gc.where or compile it")

    def __array__(self, dtype=None, copy=None):
        raise GraphcError(f"{self!r} is symbolic and has no value; compile it with gc.function or use gc.evaluate")

    def __len__(self):
        if not self.shape:
            raise ShapeError("len() of a 0-d tensor")
        d = self.shape[0]
        if not isinstance(d, int):
            raise ShapeError(f"len() of a tensor whose first dim is symbolic ({d})")
        return d

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def make_node(op: Op, inputs: Sequence, attrs: dict | None = None, names=None) -> Node:
    """Check types with the op's rule and build the node; errors name the op and the user's line."""
    if not all(isinstance(x, Tensor) for x in inputs):
        as_tensor = hook("as_tensor")
        inputs = [as_tensor(x) for x in inputs]
    attrs = attrs or {}
    loc = user_frame()
    try:
        with _sh.recording_constraints() as constraints:
            types = op.infer(inputs, **attrs)
    except (ShapeError, DTypeError) as e:
        shown = ", ".join(f"{t.label}: {t.type_str}" for t in inputs)
        raise type(e)(f"{e}\n  op: {op.name}({shown})\n  built at {fmt_loc(loc)}") from None
    node = Node(op, inputs, attrs, loc, constraints)
    node.outputs = tuple(
        Tensor(node, i, s, d, (names[i] if names else None)) for i, (s, d) in enumerate(types)
    )
    return node


def apply(op: Op, *inputs, **attrs):
    """Build a node and return its output tensor (or tuple of tensors for multi-output ops)."""
    node = make_node(op, inputs, attrs)
    return node.outputs[0] if op.n_outputs == 1 else node.outputs


def toposort(outputs: Iterable[Tensor]) -> list[Node]:
    """Nodes reachable from `outputs`, inputs before users (iterative DFS, deterministic)."""
    order, seen = [], set()
    for out in outputs:
        stack = [(out.node, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            for t in reversed(node.inputs):
                if id(t.node) not in seen:
                    stack.append((t.node, False))
    return order



class Graph:
    """A computation from `inputs` (placeholders) to `outputs`: what gc.function compiles."""

    def __init__(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor], updates=(), name="graph"):
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.updates = list(updates)  # [(parameter, new_value_tensor)]
        self.name = name

    @property
    def roots(self) -> list[Tensor]:
        return self.outputs + [u for _, u in self.updates]

    @functools.cached_property
    def nodes(self) -> list[Node]:
        """Nodes in topological order (computed once: a Graph is not changed after it is built)."""
        return toposort(self.roots + self.inputs)

    @property
    def parameters(self) -> list[Tensor]:
        return [n.outputs[0] for n in self.nodes if n.op.has(Trait.STATE)]

    def compute_nodes(self) -> list[Node]:
        return [n for n in self.nodes if not n.op.has(Trait.LEAF)]

    def op_names(self) -> list[str]:
        """Compute ops in schedule order (fused groups as `fused[a,b,...]`)."""
        return [getattr(n.op, "display_name", lambda n: n.op.name)(n) for n in self.compute_nodes()]

    def to_networkx(self):
        return hook("to_networkx")(self)

    def _repr_svg_(self):
        """Jupyter shows a graph as a picture (None, i.e. the text repr, without Graphviz)."""
        return hook("repr_svg")(self)

    def _repr_html_(self):
        """Jupyter shows a graph in the interactive viewer (graphc.viewer; the SVG is the fallback)."""
        return hook("repr_html")(self)

    def __str__(self):
        return hook("graph_text")(self)

    def __repr__(self):
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.outputs)} outputs, {len(self.compute_nodes())} ops>"


def constant_value(t: Tensor):
    """The NumPy value of a constant tensor, else None."""
    if t.node.op.has(Trait.CONST):
        return t.node.attrs["value"]
    return None
