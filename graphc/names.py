"""The one generator of unique identifiers within a scope (a generated C/CUDA translation unit, a
Python function, an LLVM function, a fused body's placeholders).

`Names(reserved)` hands out readable names from hints: the hint itself, made a valid identifier
(ASCII letters, digits and '_', not starting with a digit), then hint1, hint2, ... while that is
taken; a reserved word (a keyword, a builtin, a runtime function) gets a '_' appended first, so a
tensor named `max` becomes `max_`, never a shadowing `max`. Reserved numbered forms are skipped; where
a predicate reserves them all (a template's locals a0, a1, ... or r_*), the base gets the default as
a prefix (a -> t_a). Names are unique within one Names.
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
        orig = base
        for attempt in range(64):
            if not self._reserved(base):
                return base
            # '_' appended; if a pattern reserves those too (r_.*), the default as a prefix
            base = base + "_" if attempt < 3 else f"{self.default}_{orig}" + "_" * (attempt - 3)
        raise ValueError(f"no unreserved name for the hint {hint!r}")

    def fresh(self, hint: str | None = None) -> str:
        """A new name from `hint`, unique within this scope, and remember it."""
        base = self.base(hint)
        name = base
        if name in self.used:
            k = self._next.get(base, 1)
            skipped = 0
            while True:
                name = f"{base}{self.sep}{k}"
                k += 1
                if name in self.used:
                    continue
                if not self._reserved(name):
                    break
                skipped += 1
                if skipped == 16:  # the numbered forms of this base are reserved (a pattern like a\d+)
                    self._next[base] = k
                    return self.fresh(f"{self.default}_{base}")
            self._next[base] = k
        self.used.add(name)
        return name

    __call__ = fresh

    _serial = 0   # the last serial number handed out (see serial)

    def serial(self, head: str = "", tail: str = "") -> str:
        """head + n + tail, n this scope's next serial number (1, 2, ...): names that need no lookup
        of a hint, for generators that make very many, e.g. an LLVM function's values (v12, v13p) and
        block labels (cond14). Not made identifiers or checked against `reserved` (the caller's heads
        and tails are valid); unique within this Names (a name already taken is skipped)."""
        self._serial = n = self._serial + 1
        name = f"{head}{n}{tail}"
        if name in self.used:
            return self.serial(head, tail)
        self.used.add(name)
        return name

    def reserve(self, *names: str) -> None:
        """Mark `names` as taken (e.g. the parameters of a function being generated)."""
        self.used.update(names)

    def __contains__(self, name: str) -> bool:
        return name in self.used
