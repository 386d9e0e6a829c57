"""The llvm lowering table: op object -> plan handler `handler(plan, node, ins)`.

A handler reads the input views `ins`, adds kernels (or only views) to the plan and sets the views of
the node's outputs; it raises lower.NotLowerable for a case it does not cover (that node then runs its
NumPy impl on the host and is listed in `program.info["fallback_ops"]`). An op with no row always runs
on the host. Rows are added with the `lowers` decorator:

    @lowers(MyOp)
    def _my_op(plan, node, ins): ...

plan.py holds the rows for the core ops (elementwise ones come from lower.CODE_FOR_OP, the scalar
table; monoid reductions from kernels.COMBINE); other modules of this package add their own rows
(`ROW_MODULES` below is imported once the plan's rows exist). `LLVMBackend.lowered_ops()` is exactly
this table's keys.
"""
from __future__ import annotations

import importlib

from ..schedule.plan import registrar

#: op -> handler(plan, node, ins)
PLAN: dict = {}

#: modules of this package that add rows with @lowers (imported by `rows()`; a missing one is an ImportError,
#: never a silent gap). random draws (random_uniform / random_normal) get their rows in random.py, cumsum in
#: cumulative.py, the int8 GEMM (matmul_integer, qlinear_*, conv_integer, quantize_linear) in qgemm.py,
#: scaled_dot_product_attention (one fused kernel) in attention.py, layer_norm (one kernel) in layernorm.py.
ROW_MODULES = ("random", "cumulative", "qgemm", "attention", "layernorm")

#: module-level IR declarations (intrinsics) that row modules' kernels call: added to every module's head
DECLARATIONS: list = []


#: decorator: `@lowers(op, ...)` makes `fn(plan, node, ins)` the row of each op
lowers = registrar(PLAN)


def rows() -> dict:
    """The complete table (plan.py's rows and every ROW_MODULES module's)."""
    importlib.import_module(__package__ + ".plan")
    return PLAN


def load_row_modules() -> None:
    for mod in ROW_MODULES:
        importlib.import_module(f"{__package__}.{mod}")
