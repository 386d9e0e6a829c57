"""Arrays whose data start on a cache-line boundary: the native backends' arenas, constants and parameters.
NumPy guarantees only 16 bytes; a buffer 16 or 48 bytes into a 64-byte line makes every other 32-byte vector
load of a native kernel straddle two lines."""
from __future__ import annotations

import numpy as np

#: bytes (a cache line; also every vector width graphc emits)
ALIGN = 64


def aligned_bytes(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` starting on an `align`-byte boundary."""
    raw = np.empty(int(nbytes) + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + int(nbytes)]


def aligned_copy(a, dtype=None, align: int = ALIGN) -> np.ndarray:
    """A C-contiguous copy of `a` (in `dtype`, default a's own) starting on an `align`-byte boundary."""
    a = np.asarray(a)
    dt = np.dtype(dtype or a.dtype)
    v = aligned_bytes(a.size * dt.itemsize, align).view(dt).reshape(a.shape)
    v[...] = a
    return v
