"""What a graphc module held when it was imported, to tell later changes in this process (a monkeypatched
constant or function) from the code as written: `deviations()` (the warm-start cache's key,
backends/schedule/warm.py, includes them, so a patched setting never reuses code compiled without it).

Imported first by graphc/__init__.py: it wraps the loader of every graphc.* module imported after it
and records, right after the module's code ran, each of its ALL_CAPS constants (numbers, strings,
tuples of them) and each function or class it binds.
Standard library only: nothing here may import graphc.
"""
from __future__ import annotations

import sys
import threading
import types
from importlib.abc import MetaPathFinder

_SIMPLE = (int, float, str, bool, bytes, type(None))
_FUNCS = (types.FunctionType, type, types.BuiltinFunctionType)
#: module name -> {global name: value} of the globals recorded right after the module was imported
baseline: dict[str, dict[str, object]] = {}
_lock = threading.Lock()


def tracked(name: str, v) -> bool:
    """Whether a global is recorded: a function or class, or an ALL_CAPS constant (a number, a string, a
    tuple of them). Lower-case values are the module's own run-time state (caches, lazily made objects)."""
    if isinstance(v, _FUNCS):
        return True
    if not name.isupper():
        return False
    return isinstance(v, _SIMPLE) or (isinstance(v, (tuple, frozenset)) and all(isinstance(e, _SIMPLE) for e in v))


def token(v) -> str:
    if isinstance(v, _FUNCS):
        return f"<{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', '?')}>"
    return f"{type(v).__name__}:{sorted(v, key=repr) if isinstance(v, frozenset) else v!r}"


def _record(mod) -> None:
    base = {k: v for k, v in list(vars(mod).items()) if not k.startswith("__") and tracked(k, v)}
    with _lock:
        baseline[mod.__name__] = base


_MISSING = object()


def deviations() -> list[str]:
    """'module.name=token' for every recorded global whose value is not the one it had at import (sorted):
    an identity check per recorded global (~2,500 of them: well under a millisecond)."""
    out = []
    for name, base in list(baseline.items()):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        d = vars(mod)
        for k, v in base.items():
            now = d.get(k, _MISSING)
            if now is v or (type(now) is type(v) and isinstance(v, _SIMPLE + (tuple, frozenset)) and now == v):
                continue
            out.append(f"{name}.{k}={'<deleted>' if now is _MISSING else token(now)}")
    return sorted(out)


class _Loader:
    """A module's own loader, recording the module's tokens once its code has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _record(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("graphc."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module") \
                        and not isinstance(spec.loader, _Loader):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
