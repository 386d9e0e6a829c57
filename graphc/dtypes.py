"""Dtypes are NumPy dtype names; promotion follows NumPy 2 (NEP 50: Python scalars are weak)."""
from __future__ import annotations

import numpy as np

from .errors import DTypeError

SUPPORTED = ("float32", "float64", "int32", "int64", "bool")
FLOATS = ("float32", "float64")
INTS = ("int32", "int64")
default_float = "float32"


def as_dtype(d) -> str:
    """Canonical dtype name for a NumPy dtype, type or string; rejects unsupported dtypes."""
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


def promote(*dtypes: str) -> str:
    """NumPy's result_type over graphc dtypes."""
    return np.result_type(*[np.dtype(d) for d in dtypes]).name


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
    """The float dtype an op like exp or mean produces from `dtype` (NumPy's rule)."""
    return dtype if is_float(dtype) else "float64"
