"""The NumPy reference evaluator: walks the graph calling each op's `impl` (the living definition
of semantics that every backend and pass is tested against)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .ir import Tensor, toposort


def evaluate(outputs: Sequence[Tensor], feed: Mapping[Tensor, np.ndarray], dims: Mapping[str, int] | None = None,
             check=None):
    """Values of `outputs` for placeholder values `feed` ({tensor: array}); parameters read their value.
    `check(node, values)` is called after each computed node (mode="debug" uses it)."""
    env = {id(t): np.asarray(v) for t, v in feed.items()}
    for node in toposort(list(outputs) + list(feed)):
        if all(id(t) in env for t in node.outputs):
            continue
        name = node.op.name
        if name == "parameter":
            env[id(node.outputs[0])] = node.outputs[0].value
            continue
        if name == "constant":
            env[id(node.outputs[0])] = node.attrs["value"]
            continue
        if name == "placeholder":
            raise KeyError(f"no value fed for placeholder {node.outputs[0].name!r}")
        args = [env[id(t)] for t in node.inputs]
        attrs = dict(node.attrs)
        if getattr(node.op, "needs_dims", False):
            attrs["dims"] = dims
        res = node.op.impl(*args, **attrs)
        res = res if node.op.n_outputs != 1 else (res,)
        for t, v in zip(node.outputs, res):
            env[id(t)] = np.asarray(v)
        if check is not None:
            check(node, [env[id(t)] for t in node.outputs])
    return [env[id(t)] for t in outputs]
