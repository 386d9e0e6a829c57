"""The op table: one row per op case (graphc builder, independent NumPy reference, input shapes,
dtypes, input domain, gradient check). Adding an op adds a row here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import graphc as gc


@dataclass
class Case:
    name: str
    fn: Callable                     # symbolic tensors -> tensor
    ref: Callable                    # numpy arrays -> array (independent reference)
    shapes: list                     # list of tuples of input shapes
    dtypes: tuple = ("float32", "float64")
    domain: str = "any"              # any | pos | unit (in (-1, 1)) | gt1 (above 1) | int index
    grad: bool = True                # verify_grad on float64
    int_inputs: dict = field(default_factory=dict)  # position -> (low, high) for integer inputs
    grad_wrt: tuple | None = None    # positions to differentiate (default: all float inputs)


def _erf(x):
    return np.vectorize(math.erf, otypes=[x.dtype])(x) if x.size else x.copy()


def _sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64))).astype(x.dtype)


U = [[(3, 4)], [(0, 5)], [(1,)], [()], [(2, 1, 3)]]            # unary shapes incl. size-0/size-1/scalar
B = [[(3, 4), (3, 4)], [(3, 4), (4,)], [(3, 1), (1, 4)], [(2, 3, 4), ()], [(0, 3), (1, 3)], [(1,), (5, 1)]]

CASES = [
    Case("neg", lambda x: -x, lambda x: -x, U),
    Case("abs", gc.abs, np.abs, U),
    Case("exp", gc.exp, np.exp, U),
    Case("log", gc.log, np.log, U, domain="pos"),
    Case("log1p", gc.log1p, np.log1p, U, domain="pos"),
    Case("expm1", gc.expm1, np.expm1, U),
    Case("sqrt", gc.sqrt, np.sqrt, U, domain="pos"),
    Case("rsqrt", gc.rsqrt, lambda x: 1 / np.sqrt(x), U, domain="pos"),
    Case("sin", gc.sin, np.sin, U),
    Case("cos", gc.cos, np.cos, U),
    Case("atan", gc.atan, np.arctan, U),
    Case("tan", gc.tan, np.tan, U, domain="unit"),
    Case("asin", gc.asin, np.arcsin, U, domain="unit"),
    Case("acos", gc.acos, np.arccos, U, domain="unit"),
    Case("sinh", gc.sinh, np.sinh, U),
    Case("cosh", gc.cosh, np.cosh, U),
    Case("asinh", gc.asinh, np.arcsinh, U),
    Case("acosh", gc.acosh, np.arccosh, U, domain="gt1"),
    Case("atanh", gc.atanh, np.arctanh, U, domain="unit"),
    Case("tanh", gc.tanh, np.tanh, U),
    Case("sigmoid", gc.sigmoid, lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype), U),
    Case("relu", gc.relu, lambda x: np.maximum(x, 0), U),
    Case("leaky_relu", lambda x: gc.leaky_relu(x, 0.2), lambda x: np.where(x >= 0, x, 0.2 * x).astype(x.dtype), U),
    Case("softplus", gc.softplus, lambda x: np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0), U),
    Case("erf", gc.erf, _erf, U),
    Case("sign", gc.sign, np.sign, U),
    Case("floor", gc.floor, np.floor, U),
    Case("ceil", gc.ceil, np.ceil, U),
    Case("trunc", gc.trunc, np.trunc, U),
    Case("round", lambda x: gc.round(x * 2), lambda x: np.round(x * 2), U),
    Case("square", gc.square, np.square, U),
    Case("add", lambda a, b: a + b, np.add, B),
    Case("sub", lambda a, b: a - b, np.subtract, B),
    Case("mul", lambda a, b: a * b, np.multiply, B),
    Case("div", lambda a, b: a / b, np.divide, B, domain="pos"),
    Case("pow", lambda a, b: a ** b, np.power, B, domain="pos"),
    Case("pow_scalar", lambda a: a ** 3, lambda a: a ** 3, U),
    Case("rsub_scalar", lambda a: 2.0 - a, lambda a: 2.0 - a, U),
    Case("rdiv_scalar", lambda a: 1.0 / a, lambda a: 1.0 / a, U, domain="pos"),
    Case("mod", gc.mod, np.mod, B),
    Case("fmod", gc.fmod, np.fmod, B),
    Case("floor_divide", gc.floor_divide, np.floor_divide, B),
    Case("int_mod_div", lambda a, b: gc.mod(a, b) * 10000 + gc.fmod(a, -b) * 100 + gc.floor_divide(a, -b) + a // b,
         lambda a, b: np.mod(a, b) * 10000 + np.fmod(a, -b) * 100 + np.floor_divide(a, -b) + a // b,
         [[(3, 4), (3, 4)], [(2, 3), (3,)]], dtypes=("int64",), grad=False, int_inputs={0: (-50, 50), 1: (1, 8)}),
    Case("bitwise", lambda a, b: (a & b) ^ (a | ~b) ^ gc.left_shift(a, b) ^ gc.right_shift(a, b) ^ (a >> 3) ^ (a << 2),
         lambda a, b: (a & b) ^ (a | ~b) ^ np.left_shift(a, b) ^ np.right_shift(a, b) ^ (a >> 3) ^ (a << 2),
         [[(3, 4), (3, 4)], [(2, 3), (3,)]], dtypes=("int64",), grad=False,
         int_inputs={0: (-2 ** 40, 2 ** 40), 1: (0, 70)}),
    Case("isnan_isinf", lambda x: gc.cast(gc.isnan(gc.log(x)) | gc.isinf(1 / (x * 0)) & gc.isfinite(x), x.dtype),
         lambda x: (np.isnan(np.log(x)) | np.isinf(1 / (x * 0)) & np.isfinite(x)).astype(x.dtype), U, grad=False),
    Case("maximum", gc.maximum, np.maximum, B),
    Case("minimum", gc.minimum, np.minimum, B),
    Case("where", lambda a, b: gc.where(a > b, a, b * 2), lambda a, b: np.where(a > b, a, b * 2), B),
    Case("clip", lambda x: gc.clip(x, -0.5, 0.5), lambda x: np.clip(x, -0.5, 0.5), U),
    Case("compare", lambda a, b: gc.cast((a < b) | (a >= b * 2) & (a != b), a.dtype),
         lambda a, b: ((a < b) | (a >= b * 2) & (a != b)).astype(a.dtype), B, grad=False),
    Case("eq_le_gt", lambda a, b: gc.cast((a == b) | (a <= b) & (a > 0), a.dtype),
         lambda a, b: ((a == b) | (a <= b) & (a > 0)).astype(a.dtype), B, grad=False),
    Case("sum_all", lambda x: x.sum(), lambda x: np.sum(x), U),
    Case("sum_axis", lambda x: x.sum(axis=-1, keepdims=True), lambda x: np.sum(x, -1, keepdims=True),
         [[(3, 4)], [(2, 0, 3)], [(1, 5)]]),
    Case("sum_axes", lambda x: gc.sum(x, axis=(0, 2)), lambda x: np.sum(x, (0, 2)), [[(2, 3, 4)]]),
    Case("mean", lambda x: x.mean(axis=0), lambda x: np.mean(x, 0), [[(3, 4)], [(1, 2)]]),
    Case("mean_all", lambda x: gc.mean(x), lambda x: np.mean(x), [[(3, 4)], [(2, 2, 2)]]),
    Case("max", lambda x: x.max(axis=1), lambda x: np.max(x, 1), [[(3, 4)], [(2, 5, 1)]]),
    Case("min", lambda x: gc.min(x, axis=-1, keepdims=True), lambda x: np.min(x, -1, keepdims=True), [[(3, 4)]]),
    Case("max_all", lambda x: gc.max(x), lambda x: np.max(x), [[(3, 4)], [()]]),
    Case("prod", lambda x: gc.prod(x, axis=1), lambda x: np.prod(x, 1), [[(3, 4)], [(2, 1)]]),
    Case("var", lambda x: gc.var(x, axis=0), lambda x: np.var(x, 0), [[(5, 3)]]),
    Case("var_ddof", lambda x: gc.var(x, ddof=1), lambda x: np.var(x, ddof=1), [[(4, 3)]]),
    Case("std", lambda x: gc.std(x, axis=1), lambda x: np.std(x, 1), [[(3, 5)]]),
    Case("cumsum", lambda x: gc.cumsum(x, axis=-1), lambda x: np.cumsum(x, -1), [[(3, 4)], [(2, 0)], [(5,)], [(2, 3, 4)]]),
    Case("cumsum_excl_rev", lambda x: gc.cumsum(x, axis=0, exclusive=True, reverse=True),
         lambda x: np.flip(np.cumsum(np.flip(x, 0), 0), 0) - x, [[(4, 3)], [(2, 3, 4)]]),
    Case("cumsum_flat", lambda x: gc.cumsum(x.T), lambda x: np.cumsum(x.T), [[(3, 4)]]),
    Case("cumsum_int", lambda a: gc.cumsum(a, axis=1, exclusive=True), lambda a: np.cumsum(a, 1) - a, [[(3, 4)]],
         dtypes=("int64",), grad=False, int_inputs={0: (-100, 100)}),
    Case("argmax", lambda x: gc.cast(gc.argmax(x, axis=1), x.dtype), lambda x: np.argmax(x, 1).astype(x.dtype),
         [[(3, 4)], [(1, 5)]], grad=False),
    Case("argmin_all", lambda x: gc.cast(gc.argmin(x), x.dtype), lambda x: np.asarray(np.argmin(x)).astype(x.dtype),
         [[(3, 4)]], grad=False),
    Case("softmax", lambda x: gc.softmax(x, axis=-1), lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True),
         [[(3, 4)], [(2, 3, 5)], [(1, 1)]]),
    Case("softmax_axis0", lambda x: gc.softmax(x, axis=0), lambda x: np.exp(x) / np.exp(x).sum(0, keepdims=True),
         [[(3, 4)]]),
    Case("log_softmax", lambda x: gc.log_softmax(x, axis=1),
         lambda x: x - np.log(np.exp(x).sum(1, keepdims=True)), [[(3, 4)], [(2, 1)]]),
    Case("logsumexp", lambda x: gc.logsumexp(x, axis=1), lambda x: np.log(np.exp(x).sum(1)), [[(3, 4)]]),
    Case("logsumexp_all", lambda x: gc.logsumexp(x, keepdims=True), lambda x: np.log(np.exp(x).sum(keepdims=True)),
         [[(3, 4)]]),
    Case("matmul", lambda a, b: a @ b, np.matmul,
         [[(3, 4), (4, 5)], [(4,), (4, 2)], [(3, 4), (4,)], [(2, 3, 4), (4, 2)], [(2, 1, 3, 4), (3, 4, 2)],
          [(0, 3), (3, 2)], [(4,), (4,)]]),
    Case("dot", gc.dot, np.dot, [[(3, 4), (4, 2)], [(), (3,)]]),
    Case("einsum", lambda a, b: gc.einsum("bij,bkj->bik", a, b), lambda a, b: np.einsum("bij,bkj->bik", a, b),
         [[(2, 3, 4), (2, 5, 4)], [(1, 3, 4), (3, 2, 4)]]),
    Case("einsum_diag", lambda a, b: gc.einsum("...ii,i->...i", a, b), lambda a, b: np.einsum("...ii,i->...i", a, b),
         [[(2, 3, 3), (3,)]]),
    Case("diagonal", lambda x: gc.diagonal(x, 1, 0, 2), lambda x: np.diagonal(x, 1, 0, 2), [[(3, 2, 4)]]),
    Case("reshape", lambda x: x.reshape(2, -1), lambda x: x.reshape(2, -1), [[(2, 6)], [(4, 3)]]),
    Case("transpose", lambda x: x.T, lambda x: x.T, [[(3, 4)], [(2, 3, 4)]]),
    Case("transpose_axes", lambda x: x.transpose(1, 2, 0), lambda x: x.transpose(1, 2, 0), [[(2, 3, 4)]]),
    Case("expand_dims", lambda x: gc.expand_dims(x, -1), lambda x: np.expand_dims(x, -1), [[(3, 4)], [()]]),
    Case("squeeze", lambda x: gc.squeeze(x), np.squeeze, [[(3, 1, 4, 1)]]),
    Case("broadcast_to", lambda x: gc.broadcast_to(x, (2, 3, 4)), lambda x: np.broadcast_to(x, (2, 3, 4)),
         [[(3, 1)], [(4,)], [()]]),
    Case("concatenate", lambda a, b: gc.concatenate([a, b], axis=0), lambda a, b: np.concatenate([a, b], 0),
         [[(2, 3), (4, 3)], [(0, 3), (1, 3)]]),
    Case("concatenate_ax1", lambda a, b: gc.concatenate([a, b, a], axis=-1),
         lambda a, b: np.concatenate([a, b, a], -1), [[(2, 3), (2, 1)]]),
    Case("stack", lambda a, b: gc.stack([a, b], axis=1), lambda a, b: np.stack([a, b], 1), [[(2, 3), (2, 3)]]),
    Case("slice", lambda x: x[1:3, ::2], lambda x: x[1:3, ::2], [[(4, 5)], [(5, 3)]]),
    Case("index_int", lambda x: x[-1, :, None], lambda x: x[-1, :, None], [[(3, 4)]]),
    Case("index_ellipsis", lambda x: x[..., 1], lambda x: x[..., 1], [[(2, 3, 4)]]),
    Case("negative_step", lambda x: x[::-1, 1:], lambda x: x[::-1, 1:], [[(4, 3)]]),
    Case("take_rows", lambda x: x[np.array([0, 2, 2, -1])], lambda x: x[np.array([0, 2, 2, -1])], [[(4, 3)]]),
    Case("take_cols", lambda x: x[:, [1, 1, 0]], lambda x: x[:, [1, 1, 0]], [[(2, 3)]]),
    Case("take_tensor", lambda x, i: gc.take(x, i, axis=1), lambda x, i: np.take(x, i, axis=1),
         [[(2, 5), (3, 2)]], int_inputs={1: (0, 5)}),
    Case("cast", lambda x: gc.cast(x * 3, "int32").astype(x.dtype) + x,
         lambda x: (x * 3).astype(np.int32).astype(x.dtype) + x, [[(3, 4)]], grad=False),
    Case("promote_int_float", lambda x: gc.cast(x * 3, "int32") + x, lambda x: (x * 3).astype(np.int32) + x,
         [[(3, 4)]], grad=False),
    Case("int_arith", lambda x: gc.cast(gc.cast(x * 4, "int32") * 3 + 1, x.dtype),
         lambda x: ((x * 4).astype(np.int32) * 3 + 1).astype(x.dtype), [[(3, 4)]], grad=False),
    Case("cast_float", lambda x: gc.cast(x, "float64") * 2, lambda x: x.astype(np.float64) * 2, [[(3,)]]),
    Case("zeros_ones_like", lambda x: gc.zeros_like(x) + gc.ones_like(x) * x, lambda x: x.copy(), U),
    Case("stop_gradient", lambda x: gc.stop_gradient(x) * x, lambda x: x * x, [[(3,)]], grad=False),
    Case("mlp_chain", lambda x, w: gc.tanh(x @ w).sum(axis=1) * gc.sigmoid(x[:, 0]),
         lambda x, w: np.tanh(x @ w).sum(1) * (1 / (1 + np.exp(-x[:, 0]))), [[(4, 3), (3, 5)]]),
]


def _collect_more_cases():
    """Other modules add rows as tests/cases_<topic>.py, each defining CASES (kept apart to avoid conflicts)."""
    import importlib
    import pathlib
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        CASES.extend(importlib.import_module(path.stem).CASES)


_collect_more_cases()


def make_inputs(case: Case, shapes, dtype, rng):
    out = []
    for i, s in enumerate(shapes):
        if i in case.int_inputs:
            lo, hi = case.int_inputs[i]
            out.append(rng.integers(lo, hi, size=s).astype(np.int64))
            continue
        if case.domain == "pos":
            a = rng.uniform(0.5, 2.0, size=s)
        elif case.domain == "unit":
            a = rng.uniform(-0.9, 0.9, size=s)
        elif case.domain == "gt1":
            a = rng.uniform(1.2, 3.0, size=s)
        else:
            a = rng.uniform(-2.0, 2.0, size=s)
            # keep away from kinks (relu, abs, max ties, floor) so finite differences are valid
            a = np.where(np.abs(a - np.round(a)) < 0.05, a + 0.1, a)
            a = np.where(np.abs(a) < 0.05, a + 0.1, a)
        out.append(np.asarray(a, dtype=dtype))
    return out


def input_dtype(case: Case, i: int, dtype: str) -> str:
    return "int64" if i in case.int_inputs else dtype
