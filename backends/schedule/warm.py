"""The warm-start cache: a compiled program found from the graph the user built, before any pass runs.

The object-code cache (cache.py, keyed by each kernel's LLVM IR) only answers after the passes, the plan
and the IR text are made again, which cost a new process most of its start-up (W8: 0.15 s of 0.2 s).
This cache answers first. Its key (`graph_key`) hashes everything that decides the generated code:

  - the user's graph, structurally (`graph_digest`: every node's op, attributes, input wiring, output
    shapes and dtypes, not tensor names; constants by value; parameters by shape and dtype -- their
    values are read at run time, never compiled in);
  - the compile options (backend, optimize level, disabled passes, sanitizer, backend keywords);
  - the code that compiles it (`code_fingerprint`: the graphc version and every source file's path,
    size and modification time: an edited pass or lowering is a new key) and the in-process state of
    that code (`module_state`: the simple constants and function objects of graphc's loaded modules,
    so a test or a user that sets e.g. `tune.TILES_PARALLEL_FLOPS` or replaces a function gets a miss);
  - the environment (`environment`: GRAPHC_* settings but the cache directory, BLAS/OpenMP thread
    settings, Python, NumPy, sympy) and the host (the backend's own part: llvm adds its target id (CPU
    name and features, llvmlite), its pipeline, the ISA the code generator targets and the thread
    counts).

What depends on measurements is checked at lookup instead: a specialisation's entry lists the tuner's
decisions its plan used, and is a hit only while the tuner answers each of them the same way without
timing anything (backends/llvm/tune.decided).

Entries are blobs in the shared cache (cache.py: checked, atomic, a damaged one is a miss), sub "warm".
A graph whose attributes cannot be hashed (an unknown value type) simply has no key (no warm entry).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

import numpy as np

from graphc._aligned import aligned_bytes

from . import cache

CACHE_SUB = "warm"
#: lookups of warm entries (graph and specialisation entries; the object code they name counts in cache.stats)
stats = {"hits": 0, "misses": 0}
_FORMAT = "graphc warm v1"
_code: list = []


class Uncacheable(Exception):
    """A value the structural hash does not know how to hash (the graph gets no warm-cache key)."""


# ---- the code, the process, the environment ---------------------------------------------------------------

def _package_dirs() -> list[str]:
    import graphc
    dirs = [os.path.dirname(graphc.__file__)]
    for sub in ("backends", "frontends"):
        mod = sys.modules.get(f"graphc.{sub}")
        for p in getattr(mod, "__path__", ()) if mod is not None else ():
            dirs.append(p)
    return sorted(set(map(os.path.realpath, dirs)))


def code_fingerprint() -> str:
    """graphc's version and (path, size, mtime) of every .py file of its packages (once per process)."""
    if not _code:
        import graphc
        h = hashlib.sha256(str(getattr(graphc, "__version__", "0")).encode())
        for top in _package_dirs():
            for root, dirs, files in os.walk(top):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
                for f in sorted(files):
                    if f.endswith(".py"):
                        p = os.path.join(root, f)
                        try:
                            st = os.stat(p)
                        except OSError:
                            continue
                        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        _code.append(h.hexdigest())
    return _code[0]


_SIMPLE = (int, float, str, bool, bytes, type(None))


def _token(v):
    if isinstance(v, _SIMPLE):
        return repr(v)
    if isinstance(v, (tuple, frozenset)) and all(isinstance(e, _SIMPLE) for e in v):
        return repr(sorted(v, key=repr) if isinstance(v, frozenset) else v)
    return None


def module_state() -> str:
    """What this process changed in graphc's modules since they were imported (graphc/_modstate.py: their
    ALL_CAPS constants and the functions and classes they bind): a monkeypatched setting is a new key."""
    from graphc import _modstate
    return "\n".join(_modstate.deviations())


_ENV_PREFIXES = ("GRAPHC_", "OPENBLAS_", "OMP_", "MKL_", "GOTO", "BLIS_")
_ENV_IGNORED = ("GRAPHC_CACHE_DIR",)


def environment() -> str:
    """Settings of this process that may change generated code or the host's answers."""
    import sympy
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) and k not in _ENV_IGNORED)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return json.dumps({"env": env, "python": sys.version, "numpy": np.__version__, "sympy": sympy.__version__,
                       "cores": cores, "byteorder": sys.byteorder})


# ---- the graph ---------------------------------------------------------------------------------------------

_DTYPES: dict = {}


def _array_digest(a: np.ndarray) -> str:
    dt = a.dtype
    name = _DTYPES.get(dt)
    if name is None:
        if dt.hasobject:
            raise Uncacheable("an array of Python objects")
        name = _DTYPES[dt] = f"{dt.str}{dt.name}"
    if a.size <= 64:   # small constants (most of them): their bytes as they are
        return f"{name}{a.shape}:{a.tobytes().hex()}"
    a = np.require(a, requirements="C")
    return f"{name}{a.shape}:{hashlib.sha1(a.reshape(-1).view(np.uint8)).hexdigest()}"


_PLAIN = (int, str, float, bool, type(None))


class _Hasher:
    """The structural hash: one line of text per node (op, inputs by position, output types and names,
    attributes), hashed once; linear in the graph (a 30,000-node chain: ~0.1 s)."""

    def __init__(self):
        self.graphs: dict[int, str] = {}
        self.ops: dict = {}   # op -> (its text, whether its attributes are skipped: a parameter's value)
        self.shapes: dict = {}   # shape -> its text

    def attr(self, v) -> str:
        tv = type(v)
        if tv in _PLAIN:
            return f"{tv.__name__}:{v!r}"
        if tv is tuple and all(type(e) is int for e in v):
            return f"ints{v!r}"
        t = _token(v)
        if t is not None:
            return f"{tv.__name__}:{t}"
        if isinstance(v, (np.integer, np.floating, np.bool_)):
            return f"{tv.__name__}:{v.item()!r}"
        if isinstance(v, (tuple, list)):
            return f"{tv.__name__}[" + ",".join(self.attr(e) for e in v) + "]"
        if isinstance(v, dict):
            return "dict{" + ",".join(f"{self.attr(k)}:{self.attr(e)}" for k, e in sorted(v.items(), key=repr)) + "}"
        if isinstance(v, slice):
            return f"slice({self.attr(v.start)},{self.attr(v.stop)},{self.attr(v.step)})"
        if isinstance(v, np.ndarray):
            return f"array:{_array_digest(v)}"
        if isinstance(v, np.dtype):
            return f"dtype:{v.str}{v.name}"
        from graphc.ir import Graph, Op
        if isinstance(v, Graph):
            return f"graph:{self.graph(v)}"
        if isinstance(v, Op):
            return f"op:{self.op(v)[0]}"
        import sympy
        if isinstance(v, sympy.Basic):
            return f"sym:{sympy.srepr(v)}"
        raise Uncacheable(f"attribute value of type {tv.__name__}")

    def op(self, op) -> tuple[str, bool]:
        got = self.ops.get(op)
        if got is None:
            from graphc.ir import Trait
            got = self.ops[op] = (f"{type(op).__module__}.{type(op).__qualname__}:{op.name}", op.has(Trait.STATE))
        return got

    def graph(self, g) -> str:
        if id(g) in self.graphs:
            return self.graphs[id(g)]
        nodes = list(g.nodes)
        index = {id(n): i for i, n in enumerate(nodes)}
        for p, _ in g.updates:   # an updated parameter the outputs do not read
            if id(p.node) not in index:
                index[id(p.node)] = len(nodes)
                nodes.append(p.node)
        parts = [f"graph {g.name!r}"]
        app, attr, op_of, shapes = parts.append, self.attr, self.op, self.shapes
        for n in nodes:
            text, state = op_of(n.op)
            app(text)
            app(",".join([f"{index[id(t.node)]}.{t.index}" for t in n.inputs]))
            for t in n.outputs:
                sh = shapes.get(t.shape)
                if sh is None:   # sympy prints slowly: each distinct shape once
                    sh = shapes[t.shape] = str(t.shape)
                app(f"{sh}|{t.dtype}")   # not t.name: see graph_digest
            if n.attrs and not state:   # a parameter's value is read at run time, never compiled in
                app(";".join([f"{k}={attr(v)}" for k, v in sorted(n.attrs.items())]))

        def ref(t):
            return f"{index[id(t.node)]}.{t.index}"
        app("inputs:" + ",".join(map(ref, g.inputs)) + "\noutputs:" + ",".join(map(ref, g.outputs)) +
            "\nupdates:" + ",".join(f"{ref(p)}={ref(u)}" for p, u in g.updates))
        self.graphs[id(g)] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return self.graphs[id(g)]


def graph_digest(graph) -> str | None:
    """The structural hash of `graph` (module docstring), or None when it holds a value of an unknown type.
    Tensor names are left out: nothing compiled depends on them (the messages and listings that show them
    come from the plan made again from the graph at hand), while layers number themselves per process
    (`lstm0.weight_ih_l0`, then `lstm1...` for the same model built again), so a script that builds a
    model twice, or a notebook cell run again, would never hit."""
    try:
        return _Hasher().graph(graph)
    except Uncacheable:
        return None


def graph_key(graph, options, backend_id: str) -> str | None:
    """The warm-cache key of compiling `graph` with `options` on a backend identified by `backend_id`
    (its target, pipeline, ISA, threads), or None (no warm entry for this graph)."""
    if os.environ.get("GRAPHC_WARM_CACHE", "1") == "0":
        return None
    digest = graph_digest(graph)
    if digest is None:
        return None
    opts = repr((options.backend, options.optimize, options.mode, options.disable, options.debug_passes,
                 options.sanitize, options.allow_input_downcast, options.backend_options))
    return cache.key(_FORMAT, digest, opts, backend_id, code_fingerprint(), module_state(), environment())


def sub_key(key: str, *parts) -> str:
    return cache.key(_FORMAT, key, *map(str, parts))


# ---- entries: a JSON head and arrays -------------------------------------------------------------------------

def store(name: str, head: dict, arrays=()) -> None:
    """Write entry `name`: `head` (JSON) and `arrays` (their dtype, shape and bytes), atomically; a cache
    that cannot be written anywhere loses only the entry."""
    from graphc.errors import GraphcError
    metas, blobs = [], []
    for a in arrays:
        a = np.require(a, requirements="C")
        metas.append([a.dtype.str, list(a.shape)])
        blobs.append(a.tobytes())
    text = json.dumps({"head": head, "arrays": metas}).encode()
    payload = struct.pack("<Q", len(text)) + text + b"".join(struct.pack("<Q", len(b)) + b for b in blobs)
    try:
        cache.store_blob(CACHE_SUB, name, payload)
    except GraphcError:
        pass


def _aligned(raw: np.ndarray, dtype: np.dtype, shape) -> np.ndarray:
    """A read-only copy of bytes `raw` as an array at a 64-byte aligned address (as a fresh allocation
    would be: the generated code reads constants through their pointers)."""
    out = aligned_bytes(raw.size)
    out[:] = raw
    a = out.view(dtype).reshape(shape)
    a.setflags(write=False)
    return a


def load(name: str) -> tuple[dict, list[np.ndarray]] | None:
    """(head, arrays) of entry `name`, or None (missing, damaged, another format)."""
    payload = cache.load_blob(CACHE_SUB, name, stats)
    if payload is None:
        return None
    try:
        (n,) = struct.unpack_from("<Q", payload, 0)
        doc = json.loads(payload[8:8 + n])
        p, arrays = 8 + n, []
        for dt, shape in doc["arrays"]:
            (k,) = struct.unpack_from("<Q", payload, p)
            count = int(np.prod(shape, dtype=np.int64))
            if count * np.dtype(dt).itemsize != k:
                return None
            a = _aligned(np.frombuffer(payload, np.uint8, count=k, offset=p + 8), np.dtype(dt), shape)
            arrays.append(a)
            p += 8 + k
        if p != len(payload):
            return None
        return doc["head"], arrays
    except (ValueError, KeyError, TypeError, struct.error):
        return None
