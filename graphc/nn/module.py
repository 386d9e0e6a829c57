"""Module: the base of every layer (named parameters, buffers and submodules, train/eval, state dicts),
Sequential (plain callables such as gc.relu allowed), Residual, ModuleList and ModuleDict.

As in PyTorch, assigning a Module (or a gc.Parameter) to an attribute of a Module registers it:
`self.fc = gc.nn.Dense(4, 3)` makes fc's parameters part of `self.params` and of `state_dict()`
under dotted names (`fc.weight`); lists and dicts of layers go in `ModuleList` / `ModuleDict`
(`blocks.0.weight`, `heads.cls.weight`)."""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from ..errors import GraphcError
from ..ops.core import Parameter, parameter

_counts: Counter = Counter()


def _is_layer(v) -> bool:
    """A child whose parameters belong to its parent: a Module, or a duck-typed layer with named_params."""
    return isinstance(v, Module) or (hasattr(v, "named_params") and hasattr(v, "__call__")
                                     and not isinstance(v, type))


class Module:
    """A layer: `layer(x, training=None)` returns a tensor; `.params` lists the trainable parameters.

    training=None uses the module's mode (`.train()` / `.eval()`, training by default); it selects
    dropout and batch-norm behaviour. Buffers (running statistics) are state, not trainable.

    Write your own by subclassing: build the layers in `__init__` (after `super().__init__()`) as
    attributes, and compute in `forward(self, x, training)`; `self.add_param(name, value)` makes a
    parameter whose graph name carries the module's unique prefix."""

    training = True
    #: the layer returns (outputs, state) (recurrent layers); Sequential passes only the outputs on
    returns_state = False

    def __init__(self):
        cls = type(self).__name__.lower()
        d = self.__dict__
        if "prefix" not in d:
            d["prefix"] = f"{cls}{_counts[cls]}"
            _counts[cls] += 1
        d.setdefault("named_params", {})
        d.setdefault("named_buffers", {})
        d.setdefault("_modules", {})

    # ---- registration (PyTorch's __setattr__ rules) -------------------------------------------
    def _registry(self, name: str) -> dict:
        return self.__dict__.setdefault(name, {})

    def __setattr__(self, name: str, value) -> None:
        params, buffers, mods = self._registry("named_params"), self._registry("named_buffers"), \
            self._registry("_modules")
        if _is_layer(value):
            params.pop(name, None)
            mods[name] = value
        elif isinstance(value, Parameter):
            mods.pop(name, None)
            if buffers.get(name) is not value:   # add_buffer registered it already
                params[name] = value
        else:
            mods.pop(name, None)
            if name in params and value is None:   # `self.bias = None`: no such parameter any more
                del params[name]
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for reg in ("named_params", "named_buffers", "_modules"):
            self._registry(reg).pop(name, None)
        object.__delattr__(self, name)

    def add_param(self, name: str, value, dtype="float32") -> Parameter:
        p = parameter(f"{self.prefix}.{name}", value, dtype)
        self.named_params[name] = p
        return p

    def add_buffer(self, name: str, value, dtype="float32") -> Parameter:
        p = parameter(f"{self.prefix}.{name}", value, dtype)
        self.named_buffers[name] = p
        return p

    def add_module(self, name: str, module) -> None:
        """Register `module` under `name` (what attribute assignment does)."""
        if not _is_layer(module):
            raise GraphcError(f"{type(self).__name__}.add_module: {module!r} is not a gc.nn.Module")
        setattr(self, name, module)

    def named_children(self) -> Iterator[tuple[str, object]]:
        """(name, child) pairs of the registered submodules, in assignment order."""
        return iter(list(self._registry("_modules").items()))

    def children(self) -> list:
        return [c for _, c in self.named_children()]

    def modules(self) -> Iterator["Module"]:
        """This module and every submodule below it (each once)."""
        seen = set()

        def walk(m):
            if id(m) in seen:
                return
            seen.add(id(m))
            yield m
            for _, c in m.named_children() if isinstance(m, Module) else ():
                if _is_layer(c):
                    yield from walk(c)
        return walk(self)

    def _walk(self, attr: str, prefix: str = "") -> dict:
        out = {prefix + k: v for k, v in getattr(self, attr).items()}
        for name, c in self.named_children():
            if isinstance(c, Module):
                out.update(c._walk(attr, f"{prefix}{name}."))
            elif attr == "named_params" and hasattr(c, "named_params"):  # a duck-typed layer
                out.update({f"{prefix}{name}.{k}": v for k, v in c.named_params.items()})
        return out

    def named_parameters(self) -> dict[str, Parameter]:
        """Trainable parameters by dotted name (PyTorch's state_dict keys)."""
        return self._walk("named_params")

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
        """Parameters and buffers by dotted name (copies), PyTorch's keys: `0.weight`, `fc.bias`,
        `blocks.1.weight`, `heads.cls.weight`."""
        return {k: p.get_value() for k, p in {**self._walk("named_params"), **self._walk("named_buffers")}.items()}

    def load_state_dict(self, state: Mapping) -> None:
        """Copy values by dotted name (arrays or anything np.asarray accepts, e.g. torch tensors)."""
        mine = {**self._walk("named_params"), **self._walk("named_buffers")}
        missing, extra = set(mine) - set(state), set(state) - set(mine)
        if missing or extra:
            raise GraphcError(f"{type(self).__name__}.load_state_dict: missing {sorted(missing)}, "
                              f"unexpected {sorted(extra)}")
        for k, v in state.items():
            mine[k].set_value(np.asarray(v))

    def train(self, mode: bool = True) -> "Module":
        self.training = bool(mode)
        for c in self.children():
            if isinstance(c, Module):
                c.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def __call__(self, x, training: bool | None = None):
        return self.forward(x, self.training if training is None else bool(training))

    def forward(self, x, training: bool):
        raise NotImplementedError(f"{type(self).__name__} must define forward(self, x, training)")

    def __repr__(self):
        inner = [f"  ({name}): " + repr(c).replace("\n", "\n  ") for name, c in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(inner) + "\n)" if inner else ")")

    def extra_repr(self) -> str:
        return ""


def _wants_training(fn) -> bool:
    """Whether a plain callable takes a `training` keyword (gc.dropout, gc.noisy_relu, your own)."""
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):   # builtins without a signature
        return False


def call_layer(layer, x, training: bool):
    """Apply a Module (with the flag; a recurrent layer gives its outputs only), or a plain callable:
    one that takes a `training` keyword (gc.dropout, gc.noisy_relu) gets the mode too."""
    if isinstance(layer, Module):
        out = layer(x, training=training)
        return out[0] if layer.returns_state and isinstance(out, tuple) else out
    if hasattr(layer, "named_params"):  # a duck-typed layer returning (outputs, state)
        out = layer(x, training=training)
        return out[0] if isinstance(out, tuple) else out
    if _wants_training(layer):
        return layer(x, training=training)
    return layer(x)


def _check_callable(owner: str, lay) -> None:
    if not callable(lay):
        raise GraphcError(f"{owner}: {lay!r} is not callable (expected a gc.nn layer or a function of a tensor)")


class Sequential(Module):
    """Layers applied in order; plain callables (gc.relu, lambda x: ...) are allowed, and one that
    takes a `training` keyword (gc.dropout, gc.noisy_relu) follows the Sequential's mode."""

    def __init__(self, *layers: Callable):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for lay in layers:
            _check_callable("Sequential", lay)
        self.layers = list(layers)

    def named_children(self):
        return iter([(str(i), lay) for i, lay in enumerate(self.layers)])

    def forward(self, x, training):
        for lay in self.layers:
            x = call_layer(lay, x, training)
        return x

    def append(self, layer: Callable) -> "Sequential":
        _check_callable("Sequential.append", layer)
        self.layers.append(layer)
        return self

    def __getitem__(self, i):
        return Sequential(*self.layers[i]) if isinstance(i, slice) else self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        names = [getattr(lay, "__name__", None) or repr(lay).replace("\n", "\n  ") for lay in self.layers]
        inner = "\n".join(f"  ({i}): {n}" for i, n in enumerate(names))
        return f"Sequential(\n{inner}\n)"


class ModuleList(Module):
    """A list of layers whose parameters belong to the owner (torch.nn.ModuleList): keys `0.weight`,
    `1.weight`, ...; index, iterate, append, extend. It is not callable: loop over it in forward."""

    def __init__(self, modules: Iterable = ()):
        super().__init__()
        self._items: list = []
        self.extend(modules)

    def _check(self, m):
        if not _is_layer(m):
            raise GraphcError(f"ModuleList: {m!r} is not a gc.nn.Module (wrap functions in gc.nn.Lambda)")
        return m

    def named_children(self):
        return iter([(str(i), m) for i, m in enumerate(self._items)])

    def append(self, module) -> "ModuleList":
        self._items.append(self._check(module))
        return self

    def extend(self, modules: Iterable) -> "ModuleList":
        if isinstance(modules, (Module, Mapping)) or not isinstance(modules, Iterable):
            raise GraphcError(f"ModuleList: expected an iterable of modules, got {type(modules).__name__}")
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module) -> None:
        self._items.insert(index, self._check(module))

    def __getitem__(self, i):
        return ModuleList(self._items[i]) if isinstance(i, slice) else self._items[i]

    def __setitem__(self, i: int, module) -> None:
        self._items[i] = self._check(module)

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def forward(self, x, training):
        raise GraphcError("ModuleList is not callable: iterate over it in your module's forward "
                          "(or use gc.nn.Sequential)")


class ModuleDict(Module):
    """Layers by name whose parameters belong to the owner (torch.nn.ModuleDict): keys `cls.weight`."""

    def __init__(self, modules: Mapping | Iterable | None = None):
        super().__init__()
        self._items: dict = {}
        if modules is not None:
            self.update(modules)

    def update(self, modules) -> None:
        items = modules.items() if isinstance(modules, Mapping) else modules
        for k, m in items:
            self[k] = m

    def named_children(self):
        return iter(list(self._items.items()))

    def __setitem__(self, key: str, module) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise GraphcError(f"ModuleDict: keys must be non-empty strings without '.', got {key!r}")
        if not _is_layer(module):
            raise GraphcError(f"ModuleDict[{key!r}]: {module!r} is not a gc.nn.Module")
        self._items[key] = module

    def __getitem__(self, key: str):
        try:
            return self._items[key]
        except KeyError:
            raise GraphcError(f"ModuleDict: no module {key!r}; keys are {list(self._items)}") from None

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def keys(self):
        return self._items.keys()

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()

    def forward(self, x, training):
        raise GraphcError("ModuleDict is not callable: pick a module by key in your module's forward")


class Residual(Module):
    """y = activation(block(x) + shortcut(x)); the shortcut defaults to the identity. State-dict keys:
    `block.*`, `shortcut.*`."""

    def __init__(self, block: Callable, shortcut: Callable | None = None, activation: Callable | None = None):
        super().__init__()
        _check_callable("Residual", block)
        self.block, self.shortcut, self.activation = block, shortcut, activation

    def forward(self, x, training):
        y = call_layer(self.block, x, training)
        y = y + (x if self.shortcut is None else call_layer(self.shortcut, x, training))
        return y if self.activation is None else call_layer(self.activation, y, training)
