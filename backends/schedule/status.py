"""Run-time status codes: a kernel that finds something wrong it cannot raise about (an integer index
out of range, an out-of-bounds access under sanitize="bounds") stores its code in one status word;
the host reads the word after the call and raises the error the code stands for.

`StatusCodes` is the registry: code k (1, 2, ...; 0 means "no error") -> (node, message), filled
while lowering (one code per checking kernel) and read by the runtime (`check(word)`)."""
from __future__ import annotations

from graphc.errors import GraphcError
from graphc.ir import fmt_loc


class StatusCodes:
    """Code k (1-based) -> (node or None, message); `error(k)` is the GraphcError raised for it."""

    def __init__(self):
        self.entries: list[tuple[object, str]] = []

    def add(self, node, message: str) -> int:
        """A new code that reports `message` about `node` (None: not about a node)."""
        self.entries.append((node, message))
        return len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, code: int) -> tuple[object, str]:
        return self.entries[code - 1]

    def error(self, code: int) -> GraphcError:
        if not 1 <= code <= len(self.entries):
            return GraphcError(f"a kernel stored the unknown status code {code} (the generated code is wrong)")
        node, message = self.entries[code - 1]
        where = f"node built at {fmt_loc(node.loc)}" if node is not None else "(not raised by a node)"
        return GraphcError(f"{message}\n  {where}")

    def check(self, word: int) -> None:
        """Raise the error of status word `word` unless it is 0."""
        if word:
            raise self.error(int(word))
