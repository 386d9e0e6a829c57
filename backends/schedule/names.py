"""The one generator of unique identifiers within a scope (a generated C/CUDA translation unit, a
Python function, an LLVM function, a fused body's placeholders).

`Names(reserved)` hands out readable names from hints: the hint itself, made a valid identifier
(ASCII letters, digits and '_', not starting with a digit), then hint1, hint2, ... while that is
taken; a reserved word (a keyword, a builtin, a runtime function) gets a '_' appended first, so a
tensor named `max` becomes `max_`, never a shadowing `max`. Names are unique within one Names.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

_NOT_IDENT = re.compile(r"[^0-9A-Za-z_]")


class Names:
    """Unique identifiers from hints (see the module docstring)."""

    def __init__(self, reserved: Iterable[str] | Callable[[str], bool] = (), default: str = "t",
                 sep: str = ""):
        """reserved: names never handed out (a set, or a predicate such as a regex's match);
        default: the base for an empty hint; sep: between a base and its number (x, x1 or x_1)."""
        if callable(reserved):
            self._reserved = reserved
        else:
            words = frozenset(reserved)
            self._reserved = words.__contains__
        self.default = default
        self.sep = sep
        self.used: set[str] = set()
        self._next: dict[str, int] = {}   # base -> next number to try (keeps fresh() O(1) amortised)

    def base(self, hint: str | None) -> str:
        """`hint` as a valid identifier that is not reserved (not yet checked for uniqueness)."""
        base = _NOT_IDENT.sub("_", hint or "") or self.default
        if base[0].isdigit():
            base = f"{self.default}_{base}"
        while self._reserved(base):
            base += "_"
        return base

    def fresh(self, hint: str | None = None) -> str:
        """A new name from `hint`, unique within this scope, and remember it."""
        base = self.base(hint)
        name = base
        if name in self.used:
            k = self._next.get(base, 1)
            while True:
                name = f"{base}{self.sep}{k}"
                k += 1
                if name not in self.used and not self._reserved(name):
                    break
            self._next[base] = k
        self.used.add(name)
        return name

    __call__ = fresh

    def reserve(self, *names: str) -> None:
        """Mark `names` as taken (e.g. the parameters of a function being generated)."""
        self.used.update(names)

    def __contains__(self, name: str) -> bool:
        return name in self.used
