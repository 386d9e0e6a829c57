"""Operators and methods of symbolic tensors (x + y, x @ W, x.sum(axis=1), x[1:3], ...)."""
from __future__ import annotations

from graphc import ops as F
from ..ir import Tensor


def _r(fn):
    return lambda self, other: fn(other, self)


def _method(fn):
    def m(self, *args, **kwargs):
        return fn(self, *args, **kwargs)
    m.__name__ = fn.__name__
    m.__doc__ = fn.__doc__
    return m


_BINARY = {"add": F.add, "sub": F.sub, "mul": F.mul, "truediv": F.div, "pow": F.pow, "matmul": F.matmul,
           "floordiv": F.floor_divide, "mod": F.mod, "and": F.bitwise_and, "or": F.bitwise_or, "xor": F.bitwise_xor,
           "lshift": F.left_shift, "rshift": F.right_shift}
for _n, _f in _BINARY.items():
    setattr(Tensor, f"__{_n}__", (lambda f: lambda self, other: f(self, other))(_f))
    setattr(Tensor, f"__r{_n}__", _r(_f))

Tensor.__neg__ = lambda self: F.neg(self)
Tensor.__pos__ = lambda self: self
Tensor.__abs__ = lambda self: F.abs(self)
Tensor.__lt__ = lambda self, o: F.less(self, o)
Tensor.__le__ = lambda self, o: F.less_equal(self, o)
Tensor.__gt__ = lambda self, o: F.greater(self, o)
Tensor.__ge__ = lambda self, o: F.greater_equal(self, o)
Tensor.__eq__ = lambda self, o: F.equal(self, o)
Tensor.__ne__ = lambda self, o: F.not_equal(self, o)
Tensor.__invert__ = lambda self: F.bitwise_not(self)
Tensor.__getitem__ = lambda self, index: F.getitem(self, index)

for _f in (F.sum, F.mean, F.max, F.min, F.prod, F.argmax, F.argmin, F.var, F.std, F.dot, F.squeeze,
           F.flatten, F.swapaxes, F.exp, F.log, F.sqrt, F.tanh, F.sigmoid, F.relu, F.clip):
    setattr(Tensor, _f.__name__, _method(_f))


def _reshape(self, *shape):
    return F.reshape(self, *shape)


def _transpose(self, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return F.transpose(self, axes or None)


Tensor.reshape = _reshape
Tensor.transpose = _transpose
Tensor.T = property(lambda self: F.transpose(self))
Tensor.astype = lambda self, dtype: F.cast(self, dtype)
Tensor.cast = Tensor.astype
