"""Small helpers for writing index arithmetic in CUDA C: folded integer expressions, runtime dims,
literals, and views (an offset plus one stride per loop axis) used by every kernel kind."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from graphc import shapes as _sh

CInt = "int | str"  # a folded integer constant or a C expression (always parenthesised when compound)


def cmul(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if a == 0 or b == 0:
        return 0
    if a == 1:
        return b
    if b == 1:
        return a
    return f"({a} * {b})"


def cadd(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return f"({a} + {b})"


def cprod(xs):
    out = 1
    for x in xs:
        out = cmul(out, x)
    return out


def contiguous_strides(shape_c: list) -> list:
    strides, acc = [], 1
    for d in reversed(shape_c):
        strides.append(acc)
        acc = cmul(acc, d)
    return strides[::-1]


class DimTable:
    """Integers known only at call time (symbolic dims, slice starts on them): each gets a field of
    the `GcDims gd` struct every kernel receives; the host fills the struct from the dim bindings."""

    def __init__(self):
        self.fields: list[tuple[str, Callable[[dict], int], str]] = []
        self._by_key: dict = {}

    def dim(self, d) -> "CInt":
        """A tensor dim as a C integer: literal when static, else `gd.<field>`."""
        if isinstance(d, int):
            return d
        key = ("dim", d)
        if key not in self._by_key:
            name = d.name if d.is_Symbol and re.fullmatch(r"[A-Za-z_]\w*", d.name) else f"e{len(self.fields)}"
            self._add(key, name, lambda dims, d=d: eval_dim(d, dims), str(d))
        return f"gd.{self._by_key[key]}"

    def computed(self, key, fn: Callable[[dict], int], note: str) -> str:
        """A runtime integer computed on the host by `fn(dims)` (e.g. a slice start on a symbolic dim)."""
        if key not in self._by_key:
            self._add(key, f"e{len(self.fields)}", fn, note)
        return f"gd.{self._by_key[key]}"

    def _add(self, key, name, fn, note):
        names = {f for f, _, _ in self.fields}
        while name in names:
            name += "_"
        self._by_key[key] = name
        self.fields.append((name, fn, note))

    def shape(self, shape) -> list:
        return [self.dim(d) for d in shape]

    def struct_source(self) -> str:
        if not self.fields:
            return "struct GcDims { long long unused_; };  // this graph has no runtime dims\n"
        body = "".join(f"  long long {n};  // {note}\n" for n, _, note in self.fields)
        return "// sizes known only at call time, filled by the host for every call\nstruct GcDims {\n" + body + "};\n"

    def values(self, dims: dict) -> np.ndarray:
        """The struct's values for one binding of the dims (every field is over the graph's own dims: a
        scan body's symbols are replaced by what they are in the schedule)."""
        return np.asarray([int(fn(dims)) for _, fn, _ in self.fields] or [0], dtype=np.int64)


def eval_dim(d, dims: dict) -> int:
    if isinstance(d, int):
        return d
    return _sh.evaluate((d,), {_sh.dim_symbol(k): v for k, v in (dims or {}).items()})[0]


_SMALL_INTS = {"int8": "signed char", "uint8": "unsigned char", "int16": "short", "uint16": "unsigned short"}


def c_literal(value, dtype: str) -> str:
    """A C literal of `dtype` for a NumPy scalar (exact for float32: shortest round-trip digits)."""
    v = np.asarray(value).item()
    if dtype == "bool":
        return "true" if v else "false"
    if dtype == "int32":
        return str(int(v)) if v >= 0 else f"({int(v)})"
    if dtype == "int64":
        v = int(v)
        return f"{v}LL" if v >= 0 else ("(-9223372036854775807LL - 1)" if v == -2**63 else f"({v}LL)")
    if dtype == "uint64":
        return f"{int(v)}ULL"
    if dtype == "uint32":
        return f"{int(v)}u"
    if dtype in _SMALL_INTS:   # int8 .. uint16: an int literal converted to the type
        return f"(({_SMALL_INTS[dtype]}){int(v)})"
    # float16/bfloat16 values are floats in registers (exact in float32)
    single = dtype in ("float32", "float16", "bfloat16")
    ctype = "float" if single else "double"
    if math.isnan(v):
        return f"(({ctype})GC_NAN)"
    if math.isinf(v):
        return f"(({ctype})GC_INF)" if v > 0 else f"(-({ctype})GC_INF)"
    s = str(np.float32(v)) + "f" if single else repr(float(v))
    return s if not s.startswith("-") else f"({s})"


@dataclass
class View:
    """Where loop coordinate c reads a tensor: offset + sum(c[k] * strides[k])."""
    offset: object
    strides: list

    def index(self, coords: list) -> str:
        off = self.offset
        for c, s in zip(coords, self.strides):
            off = cadd(off, cmul(c, s))
        return str(off)


def broadcast_view(in_shape_c: list, loop_shape_c: list) -> View:
    """A contiguous tensor broadcast (NumPy rules, right-aligned) into the loop shape."""
    st = contiguous_strides(in_shape_c)
    lead = len(loop_shape_c) - len(in_shape_c)
    strides = [0] * lead + [0 if d == 1 else s for d, s in zip(in_shape_c, st)]
    return View(0, strides)


def coords_code(var: str, shape_c: list, names: list, indent: str) -> list[str]:
    """Lines that split linear index `var` into coordinates `names` (row-major over shape_c)."""
    if not shape_c:
        return []
    lines = [f"{indent}long long r_{names[0]} = {var};"]
    rv = f"r_{names[0]}"
    for k in range(len(shape_c) - 1, 0, -1):
        d = shape_c[k]
        if d == 1:
            lines.append(f"{indent}const long long {names[k]} = 0;")
            continue
        lines.append(f"{indent}const long long {names[k]} = {rv} % {d}; {rv} /= {d};")
    lines.append(f"{indent}const long long {names[0]} = {rv};")
    return lines
