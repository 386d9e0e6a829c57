"""Module: the base of every layer (named parameters and buffers, train/eval, state dicts),
Sequential (plain callables such as gc.relu allowed) and Residual."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from ..errors import GraphcError
from ..ops.core import Parameter, parameter

_counts: Counter = Counter()


class Module:
    """A layer: `layer(x, training=None)` returns a tensor; `.params` lists the trainable parameters.

    training=None uses the module's mode (`.train()` / `.eval()`, training by default); it selects
    dropout and batch-norm behaviour. Buffers (running statistics) are state, not trainable."""

    training = True

    def __init__(self):
        cls = type(self).__name__.lower()
        self.prefix = f"{cls}{_counts[cls]}"
        _counts[cls] += 1
        self.named_params: dict[str, Parameter] = {}
        self.named_buffers: dict[str, Parameter] = {}

    def add_param(self, name: str, value, dtype="float32") -> Parameter:
        p = parameter(f"{self.prefix}.{name}", value, dtype)
        self.named_params[name] = p
        return p

    def add_buffer(self, name: str, value, dtype="float32") -> Parameter:
        p = parameter(f"{self.prefix}.{name}", value, dtype)
        self.named_buffers[name] = p
        return p

    def children(self) -> list:
        return []

    def _walk(self, attr: str, prefix: str = "") -> dict:
        out = {prefix + k: v for k, v in getattr(self, attr).items()}
        for i, c in enumerate(self.children()):
            if isinstance(c, Module):
                out.update(c._walk(attr, f"{prefix}{i}."))
            elif attr == "named_params" and hasattr(c, "named_params"):  # e.g. nn.LSTM
                out.update({f"{prefix}{i}.{k}": v for k, v in c.named_params.items()})
        return out

    @property
    def params(self) -> list[Parameter]:
        """Trainable parameters (each once, in definition order)."""
        seen, out = set(), []
        for p in self._walk("named_params").values():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    @property
    def buffers(self) -> list[Parameter]:
        return list(self._walk("named_buffers").values())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by dotted name (copies)."""
        return {k: p.get_value() for k, p in {**self._walk("named_params"), **self._walk("named_buffers")}.items()}

    def load_state_dict(self, state: dict) -> None:
        mine = {**self._walk("named_params"), **self._walk("named_buffers")}
        missing, extra = set(mine) - set(state), set(state) - set(mine)
        if missing or extra:
            raise GraphcError(f"{type(self).__name__}.load_state_dict: missing {sorted(missing)}, "
                              f"unexpected {sorted(extra)}")
        for k, v in state.items():
            mine[k].set_value(np.asarray(v))

    def train(self, mode: bool = True) -> "Module":
        self.training = mode
        for c in self.children():
            if isinstance(c, Module):
                c.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def __call__(self, x, training: bool | None = None):
        return self.forward(x, self.training if training is None else bool(training))

    def forward(self, x, training: bool):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


def call_layer(layer, x, training: bool):
    """Apply a Module (with the flag), a recurrent layer (outputs only) or a plain callable."""
    if isinstance(layer, Module):
        return layer(x, training=training)
    if hasattr(layer, "named_params"):  # gc.nn.RNN/LSTM/GRU return (outputs, state)
        out = layer(x, training=training)
        return out[0] if isinstance(out, tuple) else out
    return layer(x)


class Sequential(Module):
    """Layers applied in order; plain callables (gc.relu, lambda x: ...) are allowed."""

    def __init__(self, *layers: Callable):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for lay in layers:
            if not callable(lay):
                raise GraphcError(f"Sequential: {lay!r} is not callable")
        self.layers = list(layers)

    def children(self):
        return self.layers

    def forward(self, x, training):
        for lay in self.layers:
            x = call_layer(lay, x, training)
        return x

    def __getitem__(self, i):
        return Sequential(*self.layers[i]) if isinstance(i, slice) else self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        names = [getattr(lay, "__name__", None) or repr(lay) for lay in self.layers]
        inner = "\n".join(f"  ({i}): {n}" for i, n in enumerate(names))
        return f"Sequential(\n{inner}\n)"


class Residual(Module):
    """y = activation(block(x) + shortcut(x)); the shortcut defaults to the identity."""

    def __init__(self, block: Callable, shortcut: Callable | None = None, activation: Callable | None = None):
        super().__init__()
        self.block, self.shortcut, self.activation = block, shortcut, activation

    def children(self):
        return [c for c in (self.block, self.shortcut) if c is not None]

    def forward(self, x, training):
        y = call_layer(self.block, x, training)
        y = y + (x if self.shortcut is None else call_layer(self.shortcut, x, training))
        return y if self.activation is None else self.activation(y)


