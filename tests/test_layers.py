"""One-way layers (core <- ops <- transforms <- compile <- tools), the NumPy backend's spelling table
keyed by op, and typed compile options (graphc.function.CompileOptions)."""
import ast
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.function import CompileOptions
from graphc.ir import OPS, Trait

ROOT = pathlib.Path(__file__).resolve().parents[1]

# graphc/__init__ imports every layer, so the layering is checked with a bare `graphc` package object:
# only what graphc.ir / graphc.ops themselves import gets loaded
_BARE = r'''
import importlib.util, sys, types
spec = importlib.util.find_spec("graphc")
pkg = types.ModuleType("graphc")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["graphc"] = pkg
'''

_ABOVE_OPS = ("graphc.autodiff", "graphc.passes", "graphc.function", "graphc.printing", "graphc.viz",
              "graphc.serialize", "graphc.cli", "graphc.onnx_export", "graphc.backends", "graphc.frontends",
              "graphc.nn", "graphc.optim", "graphc.train")


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", _BARE + code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_core_and_ops_import_nothing_above_them():
    out = _run("import graphc.ir, graphc.ops\nprint(' '.join(sorted(sys.modules)))")
    loaded = out.split()
    assert "graphc.ops.scan" in loaded and "graphc.ir" in loaded  # the check itself saw the imports
    bad = [m for m in loaded if m.startswith(_ABOVE_OPS)]
    assert bad == [], f"graphc.ir/graphc.ops imported layers above them: {bad}"
    out = _run("import graphc.ir\nprint(' '.join(sorted(sys.modules)))")
    assert not [m for m in out.split() if m.startswith(("graphc.ops",) + _ABOVE_OPS)]


def test_scan_reference_impl_runs_without_any_backend():
    """Scan.impl interprets its body with the reference evaluator: no backend, no gc.function."""
    out = _run(r'''
import numpy as np
from graphc.ops import placeholder, scan, tanh
from graphc.reference import evaluate
xs = placeholder("xs", (4, 3), "float64"); h = placeholder("h", (3,), "float64")
hT, ys = scan(lambda c, x: (tanh(c + x), c * 2.0), h, xs)
a = np.arange(12.0).reshape(4, 3) / 10
got = evaluate([hT, ys], {xs: a, h: np.zeros(3)})
c, want = np.zeros(3), []
for x in a:
    want.append(c * 2.0)
    c = np.tanh(c + x)
assert np.allclose(got[0], c) and np.allclose(got[1], np.stack(want))
print(' '.join(sorted(sys.modules)))
''')
    assert not [m for m in out.split() if m.startswith(_ABOVE_OPS)]


def test_a_missing_hook_is_a_clear_error():
    out = _run(r'''
import graphc.ir, graphc.ops
from graphc.errors import GraphcError
g = graphc.ir.Graph([graphc.ops.placeholder("x", (2,))], [graphc.ops.exp(graphc.ops.placeholder("x", (2,)))])
try:
    str(g)
except GraphcError as e:
    print(e)
''')
    assert "graph_text" in out and "graphc.printing" in out
    with pytest.raises(gc.GraphcError, match="unknown core hook"):
        gc.ir.provide("nosuch", print)


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (function-level imports too)."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_no_lazy_imports_up_the_layers_either():
    core = {"graphc.dtypes", "graphc.shapes", "graphc.errors"}
    ir_imports = {m for m in _imports(ROOT / "graphc" / "ir.py") if m.startswith("graphc")}
    assert ir_imports <= core | {f"{m}.{n}" for m in core for n in ("DTypeError", "GradientError", "GraphcError",
                                                                   "ShapeError")} | {"graphc"}, ir_imports
    for path in sorted((ROOT / "graphc" / "ops").glob("*.py")) + [ROOT / "graphc" / "reference.py"]:
        bad = sorted(m for m in _imports(path) if m.startswith(_ABOVE_OPS))
        assert not bad, f"{path.name} imports {bad}"


def test_core_ops_transforms_and_compile_never_import_a_backend_or_frontend():
    """frontends and backends depend on the core, never the reverse: the compile layer reaches a backend
    only through the registry (graphc.function.BACKENDS, imported by module path on first use)."""
    g = ROOT / "graphc"
    paths = [g / f"{m}.py" for m in ("ir", "dtypes", "shapes", "errors", "names", "reference", "autodiff",
                                     "gradcheck", "function")]
    paths += sorted((g / "ops").glob("*.py")) + sorted((g / "passes").glob("*.py"))
    for path in paths:
        bad = sorted(m for m in _imports(path) if m.startswith(("graphc.backends", "graphc.frontends")))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


# ---- the NumPy backend's spelling table --------------------------------------------------------------

def test_spellings_are_keyed_by_registered_ops_and_not_on_the_core_op():
    from graphc.backends.numpy import emit, spellings
    for table in (spellings.SPELLINGS, spellings.OUT_SPELLINGS, emit.SPECIAL, emit.READS_AFTER_WRITE):
        assert table and all(OPS.get(op.name) is op for op in table)
    for op in OPS.values():
        assert not hasattr(op, "np_code") and not hasattr(op, "npname"), op


def test_numpy_backend_compares_no_op_names():
    # op.name compared, or used as a key to look something up (dispatch by name)
    pat = re.compile(r"""op\.name\s*(==|!=|in\b|not in\b)|=\s*\w+\.op\.name\s*$|\.get\([^)]*op\.name|\[[^]]*op\.name\]""")
    for path in sorted((ROOT / "backends" / "numpy").glob("*.py")) + [
            ROOT / "graphc" / p for p in ("ir.py", "function.py", "reference.py")]:
        hits = [ln for ln in path.read_text().splitlines() if pat.search(ln)]
        assert not hits, f"{path.name}: {hits}"


def test_generated_source_uses_the_spellings_and_calls_impl_without_one():
    x = gc.placeholder("x", (None, 4))
    W = gc.parameter("W", np.ones((4, 3), np.float32))
    y = gc.softmax(x @ W) + gc.exp(x).sum(axis=1, keepdims=True)
    f = gc.function([x], y, optimize=0)
    src = f.source
    assert "x @ W" in src and "np.exp(x)" in src and "np.sum(" in src
    assert "_softmax(" in src  # no row: its impl is called
    a = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(f(a), gc.evaluate([y], {x: a})[0], rtol=1e-6)


def test_every_spelling_agrees_with_impl():
    """Each row of the table, generated and run, gives its op's reference impl."""
    from graphc.backends.numpy import spellings
    rng = np.random.default_rng(1)
    x, y = gc.placeholder("x", (3, 4), "float64"), gc.placeholder("y", (3, 4), "float64")
    a, b = rng.uniform(0.5, 2.0, (3, 4)), rng.uniform(0.5, 2.0, (3, 4))
    outs = [f(x, y) for f in (gc.add, gc.sub, gc.mul, gc.div, gc.pow, gc.maximum, gc.minimum)]
    outs += [f(x) for f in (gc.neg, gc.abs, gc.sign, gc.floor, gc.exp, gc.log, gc.log1p, gc.expm1, gc.sqrt, gc.rsqrt,
                            gc.sin, gc.cos, gc.tanh, gc.zeros_like, gc.ones_like, lambda v: gc.round(v * 2.0))]
    outs += [gc.cast(f(x, y), "float64") for f in (gc.less, gc.less_equal, gc.greater, gc.greater_equal, gc.equal,
                                                    gc.not_equal)]
    outs += [gc.cast(gc.logical_and(x > 1, y > 1), "float64"), gc.cast(gc.logical_or(x > 1, y > 1), "float64"),
             gc.where(x > y, x, y), gc.cast(x, "float32"), gc.sum(x, 1), gc.prod(x, 0, True), gc.max(x), gc.min(x, 1),
             gc.stop_gradient(x), gc.reshape(x, (4, 3)), gc.transpose(x), gc.broadcast_to(x[None], (2, 3, 4)),
             x[1:, None, ::2], gc.concatenate([x, y], 1), gc.take(x, gc.constant(np.array([2, 0])), 1),
             gc.size_of(x, (0, 1), "float64"), x @ gc.transpose(y)]
    covered = {o.node.op for o in outs} | {o.node.inputs[0].node.op for o in outs if o.node.inputs}
    assert set(spellings.SPELLINGS) <= covered
    got = gc.function([x, y], outs, optimize=0)(a, b)
    want = gc.evaluate(outs, {x: a, y: b})
    for o, g, w in zip(outs, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, o
        np.testing.assert_allclose(g, w, rtol=1e-12, err_msg=str(o))


# ---- typed compile options ---------------------------------------------------------------------------

def test_compile_options_are_one_frozen_object():
    x = gc.placeholder("x", (3,))
    f = gc.function([x], gc.exp(x) + 1.0, disable="cse", mode=None)
    o = f.options
    assert isinstance(o, CompileOptions) and o.backend == "numpy" and o.optimize == 2
    assert o.disable == ("cse",) and not o.debug and o.plan_memory
    with pytest.raises(Exception):
        o.optimize = 0
    assert o.sanitize is None and o.option("arch", "default") == "default"
    assert not hasattr(o, "get"), "backends read typed fields, not a dict"


@pytest.mark.parametrize("kw,msg", [
    (dict(optimize=3), "optimize must be 0, 1 or 2"),
    (dict(disable=["nosuchpass"]), r"unknown pass name\(s\) \['nosuchpass'\]"),
    (dict(mode="fast"), "mode='fast'; expected None or 'debug'"),
    (dict(sanitise="bounds"), "unknown option sanitise= for backend 'numpy'"),
    (dict(sanitize="bounds"), "sanitize='bounds' is not supported by backend 'numpy'"),
    (dict(backend="nosuch"), "unknown backend 'nosuch'"),
])
def test_compile_options_are_validated_in_one_place(kw, msg):
    with pytest.raises(gc.GraphcError, match=msg):
        CompileOptions.make(**kw)
    x = gc.placeholder("x", (3,))
    with pytest.raises(gc.GraphcError, match=msg):
        gc.function([x], x + 1.0, **kw)


def test_the_level_decides_memory_planning_and_nested_bodies():
    """optimize is read by the compile layer only: the numpy backend follows plan_memory, and a scan
    body is optimised at the function's level."""
    from graphc.backends.numpy.scan import _COMPILED
    xs = gc.placeholder("xs", (5, 3), "float64")
    W = gc.parameter("W", np.eye(3) * 0.5)
    hT, _ = gc.scan(lambda h, x: (gc.tanh(h @ W + x) * 2.0 + 1.0, None), gc.constant(np.zeros(3)), xs)
    a = np.random.default_rng(2).standard_normal((5, 3))
    want = gc.evaluate([hT], {xs: a})[0]
    for level in (0, 2):
        f = gc.function([xs], hT, optimize=level)
        np.testing.assert_allclose(f(a), want, rtol=1e-12)
        assert (f.program.info["plan"] is not None) == (level == 2)
        [node] = [n for n in f.graph.nodes if n.op is hT.node.op]
        prog = _COMPILED[node.attrs["body"]][level == 2]  # the body as the pipeline left it, compiled once
        assert ("# fused[" in prog.source) == (level == 2)
