"""A small LLVM IR text emitter: fresh SSA names, loops over allocas (mem2reg promotes them), constants."""
from __future__ import annotations

import struct

import numpy as np

from graphc import dtypes as _dt
from graphc.names import Names

#: graphc dtype -> IR value type (the register type: float16/bfloat16 are computed as float, see
#: kernels.load/store and round_half) and IR storage type (bool is a byte, bfloat16 its 16 bits)
VTYPE = {"float16": "float", "bfloat16": "float", "float32": "float", "float64": "double",
         "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
         "uint8": "i8", "uint16": "i16", "uint32": "i32", "uint64": "i64", "bool": "i1"}
STYPE = {**VTYPE, "float16": "half", "bfloat16": "i16", "bool": "i8"}


def fconst(value: float, dtype: str) -> str:
    """An exact IR literal for a float (float literals are written as the hex of a double); the value is
    first rounded to `dtype` (float16/bfloat16 values are held in float registers)."""
    v = float(value) if dtype == "float64" else float(np.asarray(value, _dt.np_dtype(dtype)))
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v))[0]


def literal(value, dtype: str) -> str:
    """IR literal of a Python/NumPy scalar in graphc dtype `dtype` (a register value); integers wrap to
    the dtype's width and are written signed (the IR's integers have no sign)."""
    if _dt.is_float(dtype):
        return fconst(float(value), dtype)
    if dtype == "bool":
        return "true" if bool(value) else "false"
    bits = 8 * _dt.itemsize(dtype)
    v = int(value) % (1 << bits)
    return str(v - (1 << bits) if v >= 1 << (bits - 1) else v)


class Emitter:
    """Collects the body of one function; allocas go to the entry block."""

    def __init__(self, prefix: str = "v"):
        self.lines: list[str] = []
        self.allocas: list[str] = []
        self.names = Names()   # one serial number across values and labels: %v12p, cond13
        self.prefix = prefix
        # sanitize="bounds": {buffer id: size in bytes} of the buffers this function may touch, the
        # status-word pointer and the code that names this kernel (kernels.ptr_at checks every access)
        self.bounds: dict | None = None
        self.status: str | None = None
        self.code = 0
        self.scratch: str | None = None

    def fresh(self, hint: str = "") -> str:
        return "%" + self.names.serial(self.prefix, hint)

    def label(self, hint: str) -> str:
        return self.names.serial(hint)

    def __call__(self, text: str, hint: str = "") -> str:
        """Emit `%new = text` and return %new."""
        r = self.fresh(hint)
        self.lines.append(f"  {r} = {text}")
        return r

    def raw(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def place(self, name: str) -> None:
        self.lines.append(f"{name}:")

    def alloca(self, ty: str) -> str:
        r = self.fresh("p")
        self.allocas.append(f"  {r} = alloca {ty}, align 8")
        return r

    def loop(self, n, body, start="0") -> None:
        """for i in range(start, n): body(i)   (n, start: ints or i64 SSA names)."""
        if isinstance(n, int) and n == 0:
            return
        if isinstance(n, int) and n == 1 and start == "0":
            body("0")
            return
        var = self.alloca("i64")
        cond, top, end = self.label("cond"), self.label("body"), self.label("end")
        self.raw(f"store i64 {start}, ptr {var}")
        self.raw(f"br label %{cond}")
        self.place(cond)
        i = self(f"load i64, ptr {var}")
        c = self(f"icmp slt i64 {i}, {n}")
        self.raw(f"br i1 {c}, label %{top}, label %{end}")
        self.place(top)
        body(i)
        nxt = self(f"add nuw nsw i64 {i}, 1")
        self.raw(f"store i64 {nxt}, ptr {var}")
        self.raw(f"br label %{cond}")
        self.place(end)

    def if_(self, cond: str, then) -> None:
        top, end = self.label("then"), self.label("endif")
        self.raw(f"br i1 {cond}, label %{top}, label %{end}")
        self.place(top)
        then()
        self.raw(f"br label %{end}")
        self.place(end)

    def function(self, header: str, ret: str = "ret void") -> str:
        body = "\n".join(self.lines)
        allocas = "\n".join(self.allocas)
        return f"{header} {{\nentry:\n{allocas}\n  br label %start\nstart:\n{body}\n  {ret}\n}}\n"
