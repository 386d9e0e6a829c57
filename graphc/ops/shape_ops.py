"""Shape ops: reshape, transpose, expand_dims, squeeze, broadcast_to, concatenate, stack,
indexing (basic slicing and integer-array take), and size_of (element counts of symbolic dims)."""
from __future__ import annotations

import builtins

import numpy as np
import sympy

from graphc import ops as F
from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import DTypeError, GradientError, GraphcError, ShapeError
from ..ir import Op, Tensor, Trait, apply, fmt_loc, register
from .core import as_tensor


def eval_shape(shape, dims) -> tuple[int, ...]:
    return _sh.evaluate(shape, {_sh.dim_symbol(k): v for k, v in (dims or {}).items()})


class _ShapeOp(Op):
    traits = Trait.MOVEMENT
    def jvp(self, node, tangents):
        """Shape ops are linear: the tangent goes through the same op."""
        if tangents[0] is None:
            return [None]
        return [apply(self, tangents[0], *node.inputs[1:], **node.attrs)]


@register
class Reshape(_ShapeOp):
    name = "reshape"
    needs_dims = True

    def infer(self, inputs, shape):
        x = inputs[0]
        if not _sh.dims_equal(_sh.size(x.shape), _sh.size(shape)):
            raise ShapeError(f"reshape: cannot reshape {_sh.fmt_shape(x.shape)} ({_sh.size(x.shape)} elements) "
                             f"into {_sh.fmt_shape(shape)} ({_sh.size(shape)} elements)")
        return [(shape, x.dtype)]

    def impl(self, x, shape, dims=None):
        return np.reshape(x, eval_shape(shape, dims))

    def vjp(self, node, gouts):
        return [F.reshape(gouts[0], node.inputs[0].shape)]


def reshape(x, *shape):
    """NumPy reshape; one dim may be -1; dims may be symbolic (e.g. `x.reshape(N, -1)`)."""
    x = as_tensor(x)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    shape = list(shape)
    negs = [i for i, d in enumerate(shape) if isinstance(d, int) and d == -1]
    if len(negs) > 1:
        raise ShapeError(f"reshape: only one dim may be -1, got {tuple(shape)}")
    if negs:
        rest = _sh.size([d for i, d in enumerate(shape) if i != negs[0]])
        total = _sh.size(x.shape)
        if isinstance(rest, int) and isinstance(total, int):
            if rest == 0 or total % rest:
                raise ShapeError(f"reshape: cannot reshape {_sh.fmt_shape(x.shape)} into {tuple(shape)}")
            shape[negs[0]] = total // rest
        else:
            q = sympy.cancel(sympy.sympify(total) / sympy.sympify(rest))
            if not q.is_integer and not (q.is_polynomial() and all(c.is_integer for c in sympy.Poly(q).coeffs())):
                raise ShapeError(f"reshape: cannot infer -1 in {tuple(shape)} from {_sh.fmt_shape(x.shape)}")
            shape[negs[0]] = q
    shape = _sh.canon_shape(shape)
    if shape == x.shape:
        return x
    return apply(Reshape, x, shape=shape)


@register
class Transpose(_ShapeOp):
    name = "transpose"

    def infer(self, inputs, axes):
        x = inputs[0]
        return [(tuple(x.shape[a] for a in axes), x.dtype)]

    def impl(self, x, axes):
        return np.transpose(x, axes)

    def vjp(self, node, gouts):
        inv = tuple(int(i) for i in np.argsort(node.attrs["axes"]))
        return [transpose(gouts[0], inv)]


def transpose(x, axes=None):
    """Permute axes (default: reverse them)."""
    x = as_tensor(x)
    if axes is None:
        axes = tuple(reversed(range(x.ndim)))
    axes = tuple(_sh.normalize_axis(a, x.ndim, "transpose") for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ShapeError(f"transpose: axes {axes} are not a permutation of {x.ndim} axes")
    if axes == tuple(range(x.ndim)):
        return x
    return apply(Transpose, x, axes=axes)


def swapaxes(x, a, b):
    x = as_tensor(x)
    axes = list(range(x.ndim))
    a, b = _sh.normalize_axis(a, x.ndim), _sh.normalize_axis(b, x.ndim)
    axes[a], axes[b] = axes[b], axes[a]
    return transpose(x, axes)


def expand_dims(x, axis):
    """Insert a size-1 axis at `axis` (negative counts from the end of the result)."""
    x = as_tensor(x)
    axis = _sh.normalize_axis(axis, x.ndim + 1, "expand_dims")
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def squeeze(x, axis=None):
    """Remove size-1 axes (all of them, or those in `axis`, which must have size 1)."""
    x = as_tensor(x)
    if axis is None:
        axes = [i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1]
    else:
        axes = _sh.normalize_axes(axis, x.ndim, "squeeze")
        for a in axes:
            if x.shape[a] != 1:
                raise ShapeError(f"squeeze: axis {a} has size {x.shape[a]}, not 1")
    return reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def flatten(x, start_axis=1):
    """Collapse the axes from `start_axis` on into one (PyTorch's Flatten)."""
    x = as_tensor(x)
    start_axis = _sh.normalize_axis(start_axis, x.ndim, "flatten")
    return reshape(x, x.shape[:start_axis] + (_sh.size(x.shape[start_axis:]),))


@register
class BroadcastTo(_ShapeOp):
    name = "broadcast_to"
    needs_dims = True

    def infer(self, inputs, shape):
        x = inputs[0]
        return [(_sh.broadcast_to_shape(x.shape, shape), x.dtype)]

    def impl(self, x, shape, dims=None):
        return np.broadcast_to(x, eval_shape(shape, dims))

    def vjp(self, node, gouts):
        return [sum_to(gouts[0], node.inputs[0].shape)]


def broadcast_to(x, shape):
    x = as_tensor(x)
    shape = _sh.canon_shape(shape)
    if len(shape) == x.ndim and all(_sh.dims_equal(a, b) for a, b in zip(shape, x.shape)):
        return x
    return apply(BroadcastTo, x, shape=shape)


def sum_to(x, shape):
    """Sum `x` over the axes that broadcasting added or stretched, giving `shape` (undoes broadcast_to)."""
    x = as_tensor(x)
    shape = _sh.canon_shape(shape)
    lead = x.ndim - len(shape)
    axes = list(range(lead))
    for i, d in enumerate(shape):
        if isinstance(d, int) and d == 1 and not (isinstance(x.shape[lead + i], int) and x.shape[lead + i] == 1):
            axes.append(lead + i)
    if axes:
        x = F.sum(x, axes, keepdims=True)
    if _sh.dims_equal(_sh.size(x.shape), _sh.size(shape)):
        return reshape(x, shape)
    # a concrete dim of `x` where `shape` has the symbolic dim it was unified with (N == 8): same size
    return broadcast_to(reshape(x, x.shape[lead:]), shape)


def _concat_part(g, axis: int, dims: list, k: int, node):
    """The part of `g` (concatenated along `axis` from parts of sizes `dims`) that is part k. Slice bounds
    must be ints, so with symbolic sizes the part is cut from whichever end has static sizes up to it, or,
    when every part has the same size, found by splitting the axis (reshape) and indexing."""
    head = _sh.canon_dim(builtins.sum(dims[:k], 0))
    tail = _sh.canon_dim(builtins.sum(dims[k + 1:], 0))
    upto, onward = _sh.canon_dim(head + dims[k]), _sh.canon_dim(dims[k] + tail)
    start, stop = _static_bound(head, head, onward), _static_bound(tail, upto, tail)
    pre = (slice(None),) * axis
    if start is not False and stop is not False:
        return g[pre + (slice(start, stop),)]
    if all(_sh.dims_equal(d, dims[0]) for d in dims):
        return reshape(g, g.shape[:axis] + (len(dims), dims[0]) + g.shape[axis + 1:])[pre + (k,)]
    raise GradientError(f"concatenate: no gradient for parts of unequal symbolic sizes {', '.join(map(str, dims))} "
                        f"along axis {axis} (node built at {fmt_loc(node.loc)})")


def _static_bound(rest, from_start, to_end):
    """A slice bound as an int: None when `rest` (the sizes beyond it) is 0, else `from_start` when
    static, else -`to_end` when static, else False (no static bound)."""
    if rest == 0:
        return None
    if isinstance(from_start, int):
        return from_start
    return -to_end if isinstance(to_end, int) else False


@register
class Concatenate(Op):
    traits = Trait.INDEXING | Trait.FRESH
    name = "concatenate"

    def infer(self, inputs, axis):
        first = inputs[0]
        for t in inputs[1:]:
            if t.ndim != first.ndim or any(
                    i != axis and not _sh.dims_equal(a, b) for i, (a, b) in enumerate(zip(t.shape, first.shape))):
                raise ShapeError(f"concatenate: shapes {', '.join(_sh.fmt_shape(u.shape) for u in inputs)} "
                                 f"differ off axis {axis}")
        total = _sh.canon_dim(builtins.sum((t.shape[axis] for t in inputs), 0))
        shape = first.shape[:axis] + (total,) + first.shape[axis + 1:]
        return [(shape, _dt.promote(*[t.dtype for t in inputs]))]

    def impl(self, *xs, axis):
        return np.concatenate(xs, axis=axis)

    def vjp(self, node, gouts):
        g, axis = gouts[0], node.attrs["axis"]
        dims = [t.shape[axis] for t in node.inputs]
        return [F.cast(_concat_part(g, axis, dims, k, node), t.dtype) if _dt.is_float(t.dtype) else None
                for k, t in enumerate(node.inputs)]

    def jvp(self, node, tangents):
        if all(t is None for t in tangents):
            return [None]
        ts = [t if t is not None else F.zeros_like(x) for t, x in zip(tangents, node.inputs)]
        return [F.cast(concatenate(ts, node.attrs["axis"]), node.outputs[0].dtype)]


def concatenate(tensors, axis=0):
    ts = [as_tensor(t) for t in tensors]
    if not ts:
        raise ShapeError("concatenate: need at least one tensor")
    if any(t.ndim == 0 for t in ts):
        raise ShapeError("concatenate: zero-dimensional tensors cannot be concatenated")
    axis = _sh.normalize_axis(axis, ts[0].ndim, "concatenate")
    if len(ts) == 1:
        return ts[0]
    return apply(Concatenate, *ts, axis=axis)


def stack(tensors, axis=0):
    ts = [as_tensor(t) for t in tensors]
    if not ts:
        raise ShapeError("stack: need at least one tensor")
    for t in ts[1:]:
        if t.ndim != ts[0].ndim or not all(_sh.dims_equal(a, b) for a, b in zip(t.shape, ts[0].shape)):
            raise ShapeError(f"stack: all shapes must be equal, got {', '.join(_sh.fmt_shape(u.shape) for u in ts)}")
    axis = _sh.normalize_axis(axis, ts[0].ndim + 1, "stack")
    return concatenate([expand_dims(t, axis) for t in ts], axis) if len(ts) > 1 else expand_dims(ts[0], axis)


# ---- indexing ----------------------------------------------------------------------------------

def _slice_len(d, s: slice):
    if isinstance(d, int):
        return len(range(*s.indices(d)))
    if s.start is None and s.stop is None and s.step in (None, 1):
        return d   # the whole axis: no sympy arithmetic (its first symbolic add imports sympy.tensor)
    start, stop, step = s.start, s.stop, s.step or 1
    if step < 0:
        raise ShapeError(f"negative-step slice on symbolic dim {d} is not supported")
    lo = 0 if start is None else (start if start >= 0 else sympy.Max(0, d + start))
    hi = d if stop is None else (sympy.Min(stop, d) if stop >= 0 else sympy.Max(0, d + stop))
    lo = sympy.Min(lo, d) if start is not None and start > 0 else lo
    return _sh.canon_dim(sympy.Max(0, sympy.ceiling((hi - lo) / step)))


@register
class GetItem(_ShapeOp):
    name = "getitem"

    def infer(self, inputs, index):
        x = inputs[0]
        shape, ax = [], 0
        for it in index:
            if it is None:
                shape.append(1)
                continue
            d = x.shape[ax]
            if isinstance(it, slice):
                shape.append(_slice_len(d, it))
            elif isinstance(d, int) and not -d <= it < d:
                raise ShapeError(f"index {it} is out of bounds for axis {ax} with size {d}")
            ax += 1
        return [(tuple(shape) + x.shape[ax:], x.dtype)]

    def impl(self, x, index):
        return np.asarray(x[index])

    def vjp(self, node, gouts):
        return [apply(IndexGrad, gouts[0], node.inputs[0], index=node.attrs["index"])]

    def jvp(self, node, tangents):
        return [None if tangents[0] is None else apply(self, tangents[0], **node.attrs)]


@register
class IndexGrad(Op):
    """zeros_like(x) with `g` written at x[index] (the gradient of basic indexing)."""
    traits = Trait.INDEXING | Trait.FRESH
    name = "index_grad"

    def infer(self, inputs, index):
        return [(inputs[1].shape, inputs[0].dtype)]

    def impl(self, g, x, index):
        out = np.zeros(x.shape, g.dtype)
        out[index] = g
        return out

    def vjp(self, node, gouts):
        return [apply(GetItem, gouts[0], index=node.attrs["index"]), None]

    def jvp(self, node, tangents):
        if tangents[0] is None:
            return [None]
        return [apply(self, tangents[0], node.inputs[1], **node.attrs)]


@register
class Take(Op):
    """x indexed by an integer array along one axis (np.take; negative indices count from the end)."""
    traits = Trait.INDEXING | Trait.FRESH
    name = "take"

    def infer(self, inputs, axis):
        x, idx = inputs
        if not _dt.is_int(idx.dtype):
            raise DTypeError(f"take: indices must be int32/int64, got {idx.dtype}")
        return [(x.shape[:axis] + idx.shape + x.shape[axis + 1:], x.dtype)]

    def impl(self, x, idx, axis):
        return np.take(x, idx, axis=axis)

    def vjp(self, node, gouts):
        x, idx = node.inputs
        if not _dt.is_float(x.dtype):
            return [None, None]
        return [apply(TakeGrad, gouts[0], x, idx, axis=node.attrs["axis"]), None]

    def jvp(self, node, tangents):
        if tangents[0] is None:
            return [None]
        return [take(tangents[0], node.inputs[1], node.attrs["axis"])]


@register
class TakeGrad(Op):
    """zeros_like(x) with `g` scatter-added at the indices (repeated indices accumulate)."""
    traits = Trait.INDEXING | Trait.FRESH
    name = "take_grad"

    def infer(self, inputs, axis):
        return [(inputs[1].shape, inputs[0].dtype)]

    def impl(self, g, x, idx, axis):
        out = np.zeros(x.shape, g.dtype)
        moved = np.moveaxis(out, axis, 0)
        # idx.size, not -1: NumPy cannot infer -1 when another axis is 0 (a size-0 batch)
        gm = np.moveaxis(g.reshape(g.shape[:axis] + (idx.size,) + g.shape[axis + idx.ndim:]), axis, 0)
        np.add.at(moved, idx.reshape(-1) % builtins.max(x.shape[axis], 1), gm)
        return out

    def vjp(self, node, gouts):
        return [take(gouts[0], node.inputs[2], node.attrs["axis"]), None, None]

    def jvp(self, node, tangents):
        if tangents[0] is None:
            return [None]
        return [apply(self, tangents[0], *node.inputs[1:], **node.attrs)]


def take(x, idx, axis=0):
    """Elements of x at integer indices `idx` along `axis` (gradient: scatter-add)."""
    x, idx = as_tensor(x), as_tensor(idx)
    axis = _sh.normalize_axis(axis, x.ndim, "take")
    return apply(Take, x, idx, axis=axis)


def _norm_basic(index, ndim):
    """Expand Ellipsis, check ints; returns a tuple of int | slice | None items."""
    if not isinstance(index, tuple):
        index = (index,)
    n_real = builtins.sum(1 for it in index if it is not None and it is not Ellipsis)
    if n_real > ndim:
        raise ShapeError(f"too many indices ({n_real}) for a tensor of rank {ndim}")
    out = []
    for it in index:
        if it is Ellipsis:
            out.extend([slice(None)] * (ndim - n_real))
            n_real = ndim
        elif isinstance(it, (bool, np.bool_)):
            raise GraphcError("boolean indexing gives data-dependent shapes; use gc.where")
        elif isinstance(it, (int, np.integer)):
            out.append(int(it))
        elif isinstance(it, slice) or it is None:
            for v in (it.start, it.stop, it.step) if it is not None else ():
                if v is not None and not isinstance(v, (int, np.integer)):
                    raise GraphcError(f"slice bounds must be Python ints, got {v!r}")
            out.append(it if it is None else slice(*(None if v is None else int(v)
                                                     for v in (it.start, it.stop, it.step))))
        else:
            raise GraphcError(f"unsupported index item {it!r}")
    return tuple(out)


def getitem(x, index):
    """x[index]: ints, slices, None, Ellipsis; or one integer array (tensor/ndarray/list) at one position."""
    x = as_tensor(x)
    items = index if isinstance(index, tuple) else (index,)
    arrays = [i for i, it in enumerate(items)
              if isinstance(it, (Tensor, np.ndarray, list))]
    if not arrays:
        return apply(GetItem, x, index=_norm_basic(index, x.ndim))
    if len(arrays) > 1 or any(it is None or it is Ellipsis for it in items) or not all(
            isinstance(it, slice) and it == slice(None) for i, it in enumerate(items) if i != arrays[0]):
        raise GraphcError("integer-array indexing supports one index array with full slices elsewhere, "
                          "e.g. x[idx] or x[:, idx]")
    idx = items[arrays[0]]
    if not isinstance(idx, Tensor):
        idx = np.asarray(idx)
        if idx.dtype == bool:
            raise GraphcError("boolean-mask indexing gives data-dependent shapes; use gc.where")
        ax = arrays[0]
        if idx.size and isinstance(x.shape[ax], int) and (idx.max() >= x.shape[ax] or idx.min() < -x.shape[ax]):
            raise ShapeError(f"index array has values outside [-{x.shape[ax]}, {x.shape[ax]}) for axis {ax}")
        idx = F.constant(idx.astype(np.int64))
    return take(x, idx, arrays[0])


@register
class SizeOf(Op):
    """The number of elements of x over `axes`, as a scalar of `dtype` (symbolic dims at run time)."""
    traits = Trait.SHAPE | Trait.FRESH
    name = "size_of"
    differentiable = False

    def infer(self, inputs, axes, dtype):
        return [((), dtype)]

    def impl(self, x, axes, dtype):
        n = 1
        for a in axes:
            n *= x.shape[a]
        return np.asarray(n, dtype=dtype)

    def vjp(self, node, gouts):
        return [None]


def size_of(x, axes, dtype="int64"):
    return apply(SizeOf, as_tensor(x), axes=tuple(axes), dtype=_dt.as_dtype(dtype))
