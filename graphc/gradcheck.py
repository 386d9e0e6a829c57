"""verify_grad: symbolic gradients against central finite differences in float64."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import GraphcError


class GradientCheckError(GraphcError, AssertionError):
    """Symbolic and numerical gradients disagree (the message shows the worst element)."""


def verify_grad(fn: Callable, inputs: Sequence[np.ndarray], eps: float = 1e-6, rtol: float = 1e-6,
                atol: float = 1e-9, rng=None, backend: str = "numpy", optimize: int = 2) -> None:
    """Check gc.grad of `fn` (symbolic tensors -> tensor) at `inputs` (float arrays) against central
    differences in float64. A non-scalar output is reduced by a random projection sum(out * r).
    Raises GradientCheckError naming the input and the worst element on mismatch."""
    import graphc as gc
    rng = np.random.default_rng(rng if rng is not None else 42)
    xs = [np.array(x, dtype=np.float64) for x in inputs]
    phs = [gc.placeholder(f"x{i}", x.shape, "float64") for i, x in enumerate(xs)]
    out = fn(*phs)
    out = gc.cast(gc.as_tensor(out), "float64")
    proj = gc.constant(rng.standard_normal(tuple(int(d) for d in out.shape)), "float64") if out.ndim else None
    cost = gc.sum(out * proj) if proj is not None else out
    grads = gc.grad(cost, phs)
    f_cost = gc.function(phs, cost, backend=backend, optimize=optimize)
    f_grad = gc.function(phs, grads, backend=backend, optimize=optimize)
    sym = f_grad(*xs)
    for i, x in enumerate(xs):
        num = np.zeros_like(x)
        flat = x.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + eps
            hi = float(f_cost(*xs))
            flat[j] = old - eps
            lo = float(f_cost(*xs))
            flat[j] = old
            num.reshape(-1)[j] = (hi - lo) / (2 * eps)
        err = np.abs(sym[i] - num) - (atol + rtol * np.abs(num))
        if err.size and (np.max(err) > 0 or not np.all(np.isfinite(sym[i]))):
            k = int(np.nanargmax(np.where(np.isfinite(err), err, np.inf)))
            idx = np.unravel_index(k, x.shape)
            raise GradientCheckError(
                f"verify_grad: gradient mismatch for input {i} (shape {x.shape}) at index {idx}: "
                f"symbolic {sym[i][idx]!r}, numeric {num[idx]!r}, abs err {abs(sym[i][idx] - num[idx]):.3g} "
                f"(rtol={rtol}, atol={atol}, eps={eps})")
