"""Dtypes are NumPy dtype names; promotion follows NumPy 2 (NEP 50: Python scalars are weak).

bfloat16 is `ml_dtypes.bfloat16` (the type JAX uses; importing ml_dtypes registers it with NumPy, so
`np.dtype("bfloat16")` and `np.result_type` know it). float16 and bfloat16 are storage types: every op
computes them in float32 and rounds each result to the tensor's dtype (as NumPy's float16 loops,
ml_dtypes and torch on CPU do); reductions and contractions accumulate in float32 (`via_float32`).
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import DTypeError

FLOATS = ("float16", "bfloat16", "float32", "float64")
SIGNED = ("int8", "int16", "int32", "int64")
UNSIGNED = ("uint8", "uint16", "uint32", "uint64")
INTS = SIGNED + UNSIGNED
SUPPORTED = FLOATS + INTS + ("bool",)
#: storage-only floats: computed in float32, rounded on store
HALF = ("float16", "bfloat16")
default_float = "float32"

_BFLOAT16: list = []


def _bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported on first use (`dtypes.bfloat16`, a "bfloat16" dtype name): the
    import registers its types with NumPy, which took 0.9 s of `import graphc`'s 1.3 s with NumPy 2.4
    and ml_dtypes 0.7. Every bfloat16 tensor's dtype passes through as_dtype or np_dtype first."""
    if not _BFLOAT16:
        import ml_dtypes  # registers bfloat16 with NumPy: np.dtype("bfloat16") works from here on
        _BFLOAT16.append(np.dtype(ml_dtypes.bfloat16))
    return _BFLOAT16[0]


def __getattr__(name):
    if name == "bfloat16":
        return _bfloat16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def np_dtype(d: str) -> np.dtype:
    """The NumPy dtype of a graphc dtype name (bfloat16 included)."""
    return _bfloat16() if d == "bfloat16" else np.dtype(d)


#: names as_dtype returns unchanged without asking NumPy (bfloat16 first registers its NumPy type)
_CANONICAL = frozenset(SUPPORTED) - {"bfloat16"}


def as_dtype(d) -> str:
    """Canonical dtype name for a NumPy dtype, type or string; rejects unsupported dtypes."""
    if type(d) is str and d in _CANONICAL:   # already canonical (most calls: every Tensor built checks its dtype)
        return d
    if isinstance(d, str) and d == "bfloat16":
        _bfloat16()
    try:
        name = np.dtype(d).name
    except TypeError as e:
        raise DTypeError(f"not a dtype: {d!r}") from e
    if name not in SUPPORTED:
        raise DTypeError(f"unsupported dtype {name!r}; graphc supports {', '.join(SUPPORTED)}")
    return name


def is_float(d: str) -> bool:
    return d in FLOATS


def is_int(d: str) -> bool:
    return d in INTS


def is_unsigned(d: str) -> bool:
    return d in UNSIGNED


def is_half(d: str) -> bool:
    return d in HALF


def compute_dtype(d: str) -> str:
    """The dtype arithmetic on `d` runs in: float32 for float16/bfloat16, else `d` itself."""
    return "float32" if d in HALF else d


def itemsize(d: str) -> int:
    return np_dtype(d).itemsize


@functools.lru_cache(maxsize=None)
def _promote2(a: str, b: str) -> str:
    return np.result_type(np_dtype(a), np_dtype(b)).name


def promote(*dtypes: str) -> str:
    """NumPy's result_type over graphc dtypes (bfloat16 with ml_dtypes' rules: bfloat16 with float16 is
    float32, with bool/int8/uint8 stays bfloat16, with wider integers widens as float16 does)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = _promote2(out, d)
    return out


def promote_with_scalar(dtype: str, value) -> str:
    """Result dtype of `tensor(dtype) op python_scalar` under NEP 50 weak-scalar rules."""
    if isinstance(value, (bool, np.bool_)):
        return dtype
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.generic):
        return dtype if dtype != "bool" else "int64"
    if isinstance(value, float) and not isinstance(value, np.generic):
        return dtype if is_float(dtype) else "float64"
    return promote(dtype, as_dtype(np.asarray(value).dtype))


def float_of(dtype: str) -> str:
    """The float dtype true division and mean produce from `dtype` (NumPy: integers give float64)."""
    return dtype if is_float(dtype) else "float64"


def ufunc_float_of(dtype: str) -> str:
    """The float dtype a float ufunc (exp, sqrt, ...) produces from `dtype` under NumPy's rules: the
    smallest float holding it exactly (bool/int8/uint8 -> float16, int16/uint16 -> float32, else float64)."""
    return dtype if is_float(dtype) else promote(dtype, "float16")


def sum_dtype(dtype: str) -> str:
    """NumPy's accumulator for sum/prod: bool and narrow signed ints give int64, narrow unsigned uint64."""
    if dtype == "bool" or dtype in SIGNED:
        return "int64"
    if dtype in UNSIGNED:
        return "uint64"
    return dtype


def upcast(a):
    """An array's float16/bfloat16 values as float32 (other arrays unchanged)."""
    if isinstance(a, np.ndarray | np.generic) and a.dtype.name in HALF:
        return np.asarray(a, np.float32)
    return a


def via_float32(impl):
    """Decorate a NumPy reference `impl(self, *arrays, **attrs)` whose NumPy code would accumulate in
    (or lacks loops for) float16/bfloat16: such arguments are computed in float32 and each float result
    is rounded to the promoted dtype of the array arguments (the op's dtype rule must be that promotion:
    reductions, contractions, convolutions; not for index arguments)."""
    @functools.wraps(impl)
    def wrapper(self, *args, **attrs):
        dts = [a.dtype.name for a in args if isinstance(a, np.ndarray | np.generic)]
        if not any(d in HALF for d in dts):
            return impl(self, *args, **attrs)
        target = np_dtype(promote(*dts))
        res = impl(self, *[upcast(a) for a in args], **attrs)

        def back(r):
            r = np.asarray(r)
            return r.astype(target) if r.dtype.kind == "f" and r.dtype != target else r
        return tuple(back(r) for r in res) if isinstance(res, tuple | list) else back(res)
    return wrapper
