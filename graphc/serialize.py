"""Saving and loading graphs with their parameter values: `gc.save(fn_or_graph, path)` / `gc.load(path)`.

The file (suffix `.graphc` by convention) is a zip archive holding:
  MANIFEST.json   {"format": "graphc", "version": 1, "sha256": {member: hex digest, ...}}
  graph.json      the graph: nodes in topological order (op name, inputs as [node, output] pairs,
                  typed attrs, output shapes/dtypes, source line), inputs, outputs, updates
  arrays/<k>.npy  parameter values and constant arrays (NumPy .npy, never pickled objects)

Loading never executes code from the file: JSON is decoded into a fixed set of value types,
symbolic dims are rebuilt from a whitelist of sympy node kinds (no eval), arrays are read with
allow_pickle=False after their declared shape has been checked against the bytes present, every
member's SHA-256 is verified, and each node is rebuilt through its op's shape rule, which must
reproduce the saved output types. Any problem raises SerializationError naming the file and why.
Optimiser state saved with a training function is parameters (and updates), so it round-trips too.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np
import sympy

from . import dtypes as _dt
from . import shapes as _sh
from .errors import GraphcError
from .ir import OPS, Graph, Node, Tensor, toposort

FORMAT = "graphc"
VERSION = 1
MAX_JSON_BYTES = 256 << 20
MAX_ARRAY_BYTES = 1 << 36  # 64 GiB: larger declared arrays are refused before any allocation


class SerializationError(GraphcError, ValueError):
    """A .graphc file is truncated, tampered with, from a newer format version, or not a graphc file."""


# ---- saving ------------------------------------------------------------------------------------

def _as_graph(obj) -> Graph:
    from .function import Function
    if isinstance(obj, Graph):
        return obj
    if isinstance(obj, Function):
        return obj.user_graph
    if isinstance(obj, Tensor):
        return Graph([], [obj])
    if isinstance(obj, (list, tuple)) and all(isinstance(t, Tensor) for t in obj):
        return Graph([], list(obj))
    raise GraphcError(f"gc.save takes a compiled function, a gc.Graph or tensors, got {type(obj).__name__}")


class _Writer:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, a: np.ndarray) -> str:
        if a.dtype.name == "bfloat16":   # .npy has no bfloat16: its bits as uint16, the name says so
            key = f"arrays/{len(self.arrays)}.bfloat16.npy"
            self.arrays[key] = np.require(a, requirements="C").view(np.uint16)
            return key
        key = f"arrays/{len(self.arrays)}.npy"
        self.arrays[key] = np.require(a, requirements="C")
        return key

    def graph(self, g: Graph) -> dict:
        nodes = toposort(g.roots + g.inputs + [p for p, _ in g.updates])
        index = {id(n): i for i, n in enumerate(nodes)}

        def ref(t: Tensor):
            return [index[id(t.node)], t.index]
        out = []
        for n in nodes:
            rec = {"op": n.op.name, "inputs": [ref(t) for t in n.inputs],
                   "outputs": [{"shape": [_dim(d) for d in t.shape], "dtype": t.dtype, "name": t.name}
                               for t in n.outputs],
                   "loc": [str(n.loc[0]), int(n.loc[1])]}
            if n.op.name == "parameter":
                rec["value"] = self.array(n.outputs[0].value)
            else:
                rec["attrs"] = {k: self.attr(v) for k, v in n.attrs.items()}
            out.append(rec)
        return {"name": g.name, "nodes": out, "inputs": [ref(t) for t in g.inputs],
                "outputs": [ref(t) for t in g.outputs], "updates": [[ref(p), ref(u)] for p, u in g.updates]}

    def attr(self, v):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return {"float": float(v).hex()}
        if isinstance(v, tuple):
            return {"tuple": [self.attr(e) for e in v]}
        if isinstance(v, list):
            return {"list": [self.attr(e) for e in v]}
        if isinstance(v, slice):
            return {"slice": [self.attr(e) for e in (v.start, v.stop, v.step)]}
        if isinstance(v, np.ndarray):
            return {"array": self.array(v)}
        if isinstance(v, Graph):
            return {"graph": self.graph(v)}
        if isinstance(v, sympy.Basic):
            return {"dim": _dim(v)}
        raise SerializationError(f"cannot save attribute value {v!r} of type {type(v).__name__}")


def _dim(d):
    """A dim as JSON: an int, or a sympy expression as a tree of whitelisted node kinds."""
    if isinstance(d, int):
        return d
    d = sympy.sympify(d)
    if d.is_Integer:
        return int(d)
    if d.is_Symbol:
        return {"sym": d.name}
    if d.is_Rational:
        return {"rat": [int(d.p), int(d.q)]}
    kind = type(d).__name__
    if kind not in _SYMPY_KINDS:
        raise SerializationError(f"cannot save symbolic dim {d} (uses {kind})")
    return {kind: [_dim(a) for a in d.args]}


def _single(obj) -> bool:
    """Whether `obj` returns one array rather than a list (a function of one tensor, or one tensor)."""
    from .function import Function
    if isinstance(obj, Function):
        return bool(obj.single)
    return isinstance(obj, Tensor) or bool(getattr(obj, "single", False))


def save(obj, path) -> None:
    """Write a compiled function's graph (or a gc.Graph / tensors) with its parameter values to `path`.
    A function of one output tensor (not a list) reloads as one: `gc.function(gc.load(path))(x)` returns
    an array, as the saved function did."""
    g = _as_graph(obj)
    w = _Writer()
    gd = w.graph(g)
    gd["single"] = _single(obj) and len(g.outputs) == 1
    body = json.dumps({"format": FORMAT, "version": VERSION, "graph": gd}, sort_keys=True).encode()
    members = {"graph.json": body}
    for key, a in w.arrays.items():
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        members[key] = buf.getvalue()
    manifest = {"format": FORMAT, "version": VERSION,
                "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}}
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("MANIFEST.json", json.dumps(manifest, sort_keys=True))
            for k, v in members.items():
                z.writestr(k, v)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under `path`
    except BaseException:
        os.unlink(tmp)
        raise


# ---- loading -----------------------------------------------------------------------------------

_SYMPY_KINDS = {"Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow, "Max": sympy.Max, "Min": sympy.Min,
                "floor": sympy.floor, "ceiling": sympy.ceiling, "Mod": sympy.Mod}


class _Reader:
    def __init__(self, path: str, z: zipfile.ZipFile, digests: dict):
        self.path, self.z, self.digests = path, z, digests

    def fail(self, why: str) -> SerializationError:
        return SerializationError(f"{self.path}: {why}")

    def member(self, name: str, limit: int) -> bytes:
        if name not in self.digests:
            raise self.fail(f"member {name!r} is not listed in the manifest")
        try:
            info = self.z.getinfo(name)
        except KeyError:
            raise self.fail(f"member {name!r} is missing (truncated file?)") from None
        if info.file_size > limit:
            raise self.fail(f"member {name!r} declares {info.file_size} bytes (limit {limit})")
        try:
            data = self.z.read(name)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise self.fail(f"member {name!r} is corrupt ({e})") from None
        if hashlib.sha256(data).hexdigest() != self.digests[name]:
            raise self.fail(f"member {name!r} fails its SHA-256 check (the file was modified)")
        return data

    def array(self, key) -> np.ndarray:
        if not isinstance(key, str):
            raise self.fail(f"bad array reference {key!r}")
        data = self.member(key, MAX_ARRAY_BYTES)
        buf = io.BytesIO(data)
        try:
            major, _ = np.lib.format.read_magic(buf)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(buf) if major == 1
                                     else np.lib.format.read_array_header_2_0(buf))
        except (ValueError, OSError, EOFError) as e:
            raise self.fail(f"{key}: not a valid .npy array ({e})") from None
        if dtype.hasobject or dtype.name not in _dt.SUPPORTED or (key.endswith(".bfloat16.npy") and dtype != np.uint16):
            raise self.fail(f"{key}: unsupported array dtype {dtype}")
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if need != len(data) - buf.tell():  # checked before NumPy allocates anything
            raise self.fail(f"{key}: header declares shape {shape} ({need} bytes) but holds {len(data) - buf.tell()}")
        a = np.load(io.BytesIO(data), allow_pickle=False)
        if key.endswith(".bfloat16.npy"):
            a = a.view(_dt.bfloat16)
        return np.require(a, requirements="C")


def register_all_ops() -> None:
    """Import every op module of graphc.ops, so every op graphc defines is in graphc.ir.OPS whatever the
    user imported (gc.random's ops, for one, are otherwise registered on first use of gc.random)."""
    import importlib
    import pkgutil
    from . import ops
    for m in pkgutil.iter_modules(ops.__path__):
        importlib.import_module(f"{ops.__name__}.{m.name}")


def load_model(path) -> Graph:
    """A Graph from a saved `.graphc` file or an ONNX model (the suffix, else the file's first bytes,
    decide; anything not a .graphc zip is read as ONNX). The one loader behind `graphc show/run/...` and
    the viewer."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SerializationError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.endswith(".graphc") or head == b"PK\x03\x04":
        return load(path)
    from graphc.frontends.onnx_import import load_onnx
    return load_onnx(path)


def load(path) -> Graph:
    """Read a file written by gc.save: a gc.Graph (inputs, outputs, updates, parameter values). The
    graph's `single` attribute says the saved function returned one array (gc.function honours it)."""
    register_all_ops()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SerializationError(f"{path}: no such file")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SerializationError(f"{path}: not a graphc file (not a zip archive: {e}); truncated?") from None
    with z:
        manifest = _json(path, _raw(path, z, "MANIFEST.json", 1 << 20))
        _check_header(path, manifest)
        digests = manifest.get("sha256")
        if not isinstance(digests, dict):
            raise SerializationError(f"{path}: manifest has no checksums")
        r = _Reader(path, z, digests)
        doc = _json(path, r.member("graph.json", MAX_JSON_BYTES))
        _check_header(path, doc)
        try:
            g = _build_graph(r, doc["graph"])
            g.single = doc["graph"].get("single") is True and len(g.outputs) == 1
            return g
        except SerializationError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise SerializationError(f"{path}: malformed graph ({type(e).__name__}: {e})") from None


def _raw(path, z, name, limit) -> bytes:
    try:
        info = z.getinfo(name)
        if info.file_size > limit:
            raise SerializationError(f"{path}: {name} is implausibly large")
        return z.read(name)
    except KeyError:
        raise SerializationError(f"{path}: not a graphc file ({name} missing)") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise SerializationError(f"{path}: corrupt {name} ({e})") from None


def _json(path, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SerializationError(f"{path}: invalid JSON ({e})") from None


def _check_header(path, doc) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{path}: not a graphc file")
    v = doc.get("version")
    if not isinstance(v, int) or v < 1:
        raise SerializationError(f"{path}: bad format version {v!r}")
    if v > VERSION:
        raise SerializationError(f"{path}: written by a newer graphc (format version {v}; this graphc reads "
                                 f"versions up to {VERSION}); upgrade graphc to load it")


def _load_dim(r: _Reader, d):
    if isinstance(d, bool):
        raise r.fail(f"bad dim {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, dict) and len(d) == 1:
        (kind, args), = d.items()
        if kind == "sym" and isinstance(args, str) and args.isidentifier():
            return _sh.dim_symbol(args)
        if kind == "rat":
            return sympy.Rational(int(args[0]), int(args[1]))
        if kind in _SYMPY_KINDS and isinstance(args, list):
            return _SYMPY_KINDS[kind](*[_load_dim(r, a) for a in args])
    raise r.fail(f"bad dim {d!r}")


def _load_attr(r: _Reader, v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, dict) and len(v) == 1:
        (kind, x), = v.items()
        if kind == "float":
            return float.fromhex(x)
        if kind == "tuple":
            return tuple(_load_attr(r, e) for e in x)
        if kind == "list":
            return [_load_attr(r, e) for e in x]
        if kind == "slice":
            return slice(*[_load_attr(r, e) for e in x])
        if kind == "array":
            a = r.array(x)
            a.setflags(write=False)
            return a
        if kind == "graph":
            return _build_graph(r, x)
        if kind == "dim":
            return _sh.canon_dim(_load_dim(r, x))
    raise r.fail(f"bad attribute value {v!r}")


def _build_graph(r: _Reader, gd: dict) -> Graph:
    from .ops.core import _leaf, constant, parameter
    from .ir import make_node
    built: list[Node] = []

    def get(ref) -> Tensor:
        k, i = ref
        if not (isinstance(k, int) and 0 <= k < len(built) and isinstance(i, int)):
            raise r.fail(f"bad tensor reference {ref!r} (nodes must come after their inputs)")
        return built[k].outputs[i]
    for nd in gd["nodes"]:
        name, outs = nd["op"], nd["outputs"]
        if name not in OPS:
            raise r.fail(f"unknown op {name!r} (saved by a graphc with more ops?)")
        o = outs[0]
        shape = tuple(_sh.canon_dim(_load_dim(r, d)) for d in o["shape"])
        if name == "placeholder":
            t = _leaf(OPS[name], shape, o["dtype"], o["name"])
        elif name == "parameter":
            t = parameter(o["name"], r.array(nd["value"]), dtype=o["dtype"])
        elif name == "constant":
            t = constant(_load_attr(r, nd["attrs"]["value"]), dtype=o["dtype"], name=o["name"])
        else:
            attrs = {k: _load_attr(r, v) for k, v in nd["attrs"].items()}
            try:
                node = make_node(OPS[name], [get(x) for x in nd["inputs"]], attrs, names=[x["name"] for x in outs])
            except GraphcError as e:
                raise r.fail(f"node {len(built)} ({name}) does not type-check: {e}") from None
            _check_types(r, node, outs, len(built))
            t = node.outputs[0]
        if name in ("placeholder", "parameter", "constant"):
            _check_types(r, t.node, outs, len(built))
        t.node.loc = (str(nd["loc"][0]), int(nd["loc"][1]))
        built.append(t.node)
    return Graph([get(x) for x in gd["inputs"]], [get(x) for x in gd["outputs"]],
                 [(get(p), get(u)) for p, u in gd["updates"]], name=str(gd["name"]))


def _check_types(r: _Reader, node: Node, outs: list, k: int) -> None:
    if len(outs) != len(node.outputs):
        raise r.fail(f"node {k} ({node.op.name}): {len(outs)} saved outputs, the op makes {len(node.outputs)}")
    for t, o in zip(node.outputs, outs):
        shape = tuple(_sh.canon_dim(_load_dim(r, d)) for d in o["shape"])
        same = len(shape) == t.ndim and all(_sh.dims_equal(a, b) for a, b in zip(shape, t.shape))
        if not same or t.dtype != o["dtype"]:
            raise r.fail(f"node {k} ({node.op.name}): saved type {o['dtype']}{_sh.fmt_shape(shape)} differs from "
                         f"the rebuilt {t.type_str}")
