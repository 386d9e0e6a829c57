"""Trace NumPy code into graphc graphs: symbolic tensors answer NumPy's ufunc and function protocols,
so `np.tanh(x) @ W` or `np.sum(h, axis=1)` on a placeholder builds graph nodes."""
from __future__ import annotations

import numpy as np

from graphc import ops as F
from graphc.errors import GraphcError
from graphc.ir import Tensor

UFUNCS = {
    np.add: F.add, np.subtract: F.sub, np.multiply: F.mul, np.true_divide: F.div, np.power: F.pow,
    np.negative: F.neg, np.absolute: F.abs, np.exp: F.exp, np.log: F.log, np.log1p: F.log1p,
    np.expm1: F.expm1, np.sqrt: F.sqrt, np.sin: F.sin, np.cos: F.cos, np.tanh: F.tanh, np.sign: F.sign,
    np.floor: F.floor, np.maximum: F.maximum, np.minimum: F.minimum, np.matmul: F.matmul,
    np.less: F.less, np.less_equal: F.less_equal, np.greater: F.greater, np.greater_equal: F.greater_equal,
    np.equal: F.equal, np.not_equal: F.not_equal, np.logical_and: F.logical_and, np.logical_or: F.logical_or,
    np.square: F.square, np.reciprocal: F.reciprocal,
}

FUNCTIONS = {
    np.sum: F.sum, np.mean: F.mean, np.max: F.max, np.amax: F.max, np.min: F.min, np.amin: F.min,
    np.prod: F.prod, np.argmax: F.argmax, np.argmin: F.argmin, np.var: F.var, np.std: F.std,
    np.dot: F.dot, np.matmul: F.matmul, np.reshape: F.reshape, np.transpose: F.transpose,
    np.expand_dims: F.expand_dims, np.squeeze: F.squeeze, np.broadcast_to: F.broadcast_to,
    np.concatenate: F.concatenate, np.stack: F.stack, np.where: F.where, np.clip: F.clip,
    np.zeros_like: F.zeros_like, np.ones_like: F.ones_like, np.swapaxes: F.swapaxes, np.take: F.take,
}


def _array_ufunc(self, ufunc, method, *inputs, **kwargs):
    if method != "__call__" or kwargs.get("out") is not None:
        raise GraphcError(f"tracing: np.{ufunc.__name__}.{method} with out= is not supported on symbolic tensors")
    fn = UFUNCS.get(ufunc)
    if fn is None:
        raise GraphcError(f"tracing: np.{ufunc.__name__} has no graphc op")
    kwargs.pop("out", None)
    if kwargs:
        raise GraphcError(f"tracing: np.{ufunc.__name__} keyword arguments {sorted(kwargs)} are not supported")
    return fn(*inputs)


def _array_function(self, func, types, args, kwargs):
    fn = FUNCTIONS.get(func)
    if fn is None:
        raise GraphcError(f"tracing: np.{func.__name__} has no graphc op")
    if func is np.reshape and len(args) >= 2:
        return F.reshape(args[0], args[1])
    return fn(*args, **kwargs)


Tensor.__array_ufunc__ = _array_ufunc
Tensor.__array_function__ = _array_function


def trace(fn, *placeholders, **kwargs):
    """Run `fn` on symbolic tensors (NumPy calls inside build graph nodes); returns its outputs."""
    return fn(*placeholders, **kwargs)
