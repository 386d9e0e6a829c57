"""The define-then-run API: placeholders, parameters, function, updates, errors, printing, tracing."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import assert_close


def _mlp():
    x = gc.placeholder("x", shape=(None, 784), dtype="float32")
    W = gc.parameter("W", np.random.default_rng(0).standard_normal((784, 10)).astype("float32"))
    b = gc.parameter("b", np.zeros(10, "float32"))
    return x, W, b, gc.softmax(x @ W + b, axis=-1)


def test_readme_example(backend):
    x, W, b, y = _mlp()
    f = gc.function([x], y, backend=backend)
    a = np.ones((3, 784), np.float32)
    z = a @ W.value + b.value
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert_close(f(a), want, "float32", backend)
    assert isinstance(f.graph, gc.Graph)
    assert "softmax" in " ".join(f.graph.op_names())


def test_parameters_are_shared_state(backend):
    x = gc.placeholder("x", (2,))
    w = gc.parameter("w", np.array([1.0, 2.0], np.float32))
    f = gc.function([x], x * w, backend=backend)
    np.testing.assert_allclose(f(np.ones(2, np.float32)), [1, 2])
    w.set_value(np.array([3.0, 4.0], np.float32))  # seen without recompiling
    np.testing.assert_allclose(f(np.ones(2, np.float32)), [3, 4])
    assert w.value.dtype == np.float32 and w.get_value() is not w.value
    with pytest.raises(gc.ShapeError, match="w"):
        w.set_value(np.zeros(3))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "bool"])
def test_parameter_arrays_start_on_a_cache_line(dtype):
    """A parameter's array (from gc.parameter or set_value) is a C-contiguous, read-only copy starting on a
    64-byte boundary (native kernels' vector loads of a weight then never straddle two lines), whatever the
    source array's own alignment or layout; its values are the source's."""
    rng = np.random.default_rng(0)
    for shape in [(1,), (3, 5), (17, 63), (2, 3, 4)]:
        raw = np.empty(int(np.prod(shape)) * 8 + 64, np.uint8)
        src = raw[8:8 + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
        src[...] = (rng.standard_normal(shape) * 10).astype(dtype)
        for value in (src, np.asfortranarray(src)):
            w = gc.parameter("w", value)
            assert w.value.ctypes.data % 64 == 0 and w.value.flags.c_contiguous and not w.value.flags.writeable
            np.testing.assert_array_equal(w.value, src)
            w.set_value(value)
            assert w.value.ctypes.data % 64 == 0 and w.value.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(w.value, src)


def test_updates_are_computed_from_old_values_and_applied_together(backend):
    a = gc.parameter("a", np.array(1.0, np.float32))
    b = gc.parameter("b", np.array(10.0, np.float32))
    x = gc.placeholder("x", ())
    f = gc.function([x], a + b, updates=[(a, b + x), (b, a)], backend=backend)
    out = f(np.float32(1))
    assert out == 11 and a.value == 11 and b.value == 1  # both read the old values
    f(np.float32(0))
    assert a.value == 1 and b.value == 11


def test_multiple_outputs_and_keyword_inputs(backend):
    x = gc.placeholder("x", (3,))
    y = gc.placeholder("y", (3,))
    f = gc.function([x, y], [x + y, x * y], backend=backend)
    s, p = f(y=np.ones(3, np.float32), x=np.full(3, 2, np.float32))
    np.testing.assert_allclose(s, 3)
    np.testing.assert_allclose(p, 2)


def test_bad_calls_raise_clear_errors_and_change_nothing():
    x = gc.placeholder("x", (None, 3))
    y = gc.placeholder("y", (None,))
    c = gc.parameter("c", np.zeros((), np.float32))
    f = gc.function([x, y], x.sum(axis=1) + y, updates=[(c, c + 1)])
    good_x, good_y = np.ones((2, 3), np.float32), np.ones(2, np.float32)
    cases = [
        ((np.ones((2, 4), np.float32), good_y), r"input 'x': expected shape \(N, 3\), got \(2, 4\)"),
        ((np.ones((2, 3, 1), np.float32), good_y), "input 'x': expected rank 2"),
        ((good_x.astype(np.float64), good_y), "input 'x': expected dtype float32, got float64"),
        ((good_x, np.ones(5, np.float32)), "dim N is 5 on axis 0, but 2"),
        ((good_x,), "expected 2 inputs"),
        ((good_x, good_y, good_y), "expected 2 inputs"),
        ((good_x, ["a", "b"]), "input 'y'"),
    ]
    for args, msg in cases:
        with pytest.raises(gc.InputError, match=msg):
            f(*args)
    assert c.value == 0  # nothing ran, nothing updated
    np.testing.assert_allclose(f(good_x, [1, 2]), [4, 5])  # lists are converted (same-kind casting)
    assert c.value == 1


def test_build_time_errors_name_op_shapes_and_line():
    a = gc.placeholder("a", (3, 4))
    b = gc.placeholder("b", (5,))
    with pytest.raises(gc.ShapeError) as e:
        a + b  # this line must appear in the message
    msg = str(e.value)
    assert "add" in msg and "(3, 4)" in msg and "(5,)" in msg and "test_api.py" in msg and "a + b" in msg
    with pytest.raises(gc.ShapeError, match="matmul"):
        a @ gc.placeholder("c", (3, 2))
    with pytest.raises(gc.ShapeError, match="axis 2 is out of range"):
        a.sum(axis=2)
    with pytest.raises(gc.ShapeError, match="reshape"):
        a.reshape(5, -1)
    with pytest.raises(gc.DTypeError, match="where"):
        gc.where(a, a, a)
    with pytest.raises(gc.DTypeError, match="unsupported dtype"):
        gc.placeholder("z", (2,), "complex64")
    with pytest.raises(gc.ShapeError, match="symbolic"):   # (None, 3) + (4, 3) unifies N with 4 (test_shapes_unify.py)
        gc.placeholder("u", (None, 3)) + gc.placeholder("v", ("M", 3))
    with pytest.raises(gc.ShapeError, match="out of bounds"):
        a[3]
    with pytest.raises(gc.GraphcError, match="truth value"):
        bool(a > 0)


def test_backend_errors():
    x = gc.placeholder("x", (2,))
    with pytest.raises(gc.UnknownBackend, match="nosuch"):
        gc.function([x], x, backend="nosuch")
    assert "numpy" in gc.available_backends()
    for name in ("llvm", "cuda", "cuda-emulated"):
        if name not in gc.available_backends():
            with pytest.raises(gc.GraphcError, match=name):
                gc.function([x], x + 1, backend=name)(np.ones(2, np.float32))


def test_missing_input_placeholder_is_reported():
    x = gc.placeholder("x", (2,))
    y = gc.placeholder("y", (2,))
    with pytest.raises(gc.GraphcError, match="'y'"):
        gc.function([x], x + y)


def test_runtime_error_names_the_node(backend):
    x = gc.placeholder("x", (3,))
    i = gc.placeholder("i", (2,), "int64")
    c = gc.parameter("c", np.zeros(3, np.float32))
    f = gc.function([x, i], gc.take(x, i) * 2, updates=[(c, c + x)], backend=backend)
    for bad in ([0, 7], [-4, 0]):  # out of range either way: an error, never a clamped or wrapped read
        with pytest.raises(gc.GraphcError, match="take") as e:
            f(np.ones(3, np.float32), np.array(bad))
        assert "test_api.py" in str(e.value)
    np.testing.assert_array_equal(c.value, 0)  # a failed call applies no update
    np.testing.assert_array_equal(f(np.arange(3, dtype=np.float32), np.array([2, -3])), [4, 0])
    w = gc.placeholder("w", (4, 2), "float64")
    g = gc.function([w, i], gc.grad(gc.sum(gc.take(w, i) ** 2), w), backend=backend)
    with pytest.raises(gc.GraphcError, match="take"):
        g(np.ones((4, 2)), np.array([0, 4]))


def test_source_is_readable_python():
    x, W, b, y = _mlp()
    f = gc.function([x], y, optimize=0)
    src = f.source
    assert "def graph_fn(x, W, b" in src and "x @ W" in src
    assert len([ln for ln in src.splitlines() if " = " in ln and not ln.strip().startswith("#")]) >= 3


def test_dprint_shows_ops_shapes_dtypes(capsys):
    x, W, b, y = _mlp()
    text = gc.dprint(y)
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    assert lines[0].startswith("softmax") and "float32(N, 10)" in lines[0]
    assert any("matmul" in ln and "float32(N, 10)" in ln for ln in lines)
    assert any("W [parameter] float32(784, 10)" in ln for ln in lines)
    shared = x * 2
    text = gc.dprint(shared + shared, file=open("/dev/null", "w"))
    assert "···" in text  # the shared node is printed once


def test_graph_networkx_and_text():
    x, W, b, y = _mlp()
    G = gc.Graph([x], [y]).to_networkx()
    ops = sorted(d["op"] for _, d in G.nodes(data=True))
    assert ops == ["add", "matmul", "parameter", "parameter", "placeholder", "softmax"]
    assert G.number_of_edges() == 5
    assert "softmax{axis=1}" in str(gc.Graph([x], [y]))


def test_constants_and_python_scalars_follow_numpy_promotion():
    x = gc.placeholder("x", (2,), "float32")
    assert (x * 2).dtype == "float32" and (x * 2.5).dtype == "float32"
    i = gc.placeholder("i", (2,), "int32")
    assert (i * 2).dtype == "int32" and (i * 2.5).dtype == "float64" and (i / 2).dtype == "float64"
    assert (x + np.float64(1)).dtype == "float64"  # NumPy scalars are not weak
    assert (x + np.ones(2)).dtype == "float64"
    assert gc.constant(1.5).dtype == "float32" and gc.constant(np.array([1.5])).dtype == "float64"


def test_tracing_numpy_code(backend, rng):
    def model(x, W):
        h = np.tanh(x @ W)
        return np.sum(h * h, axis=1) + np.exp(-np.abs(x)).mean(axis=1)
    x = gc.placeholder("x", (None, 4))
    W = gc.parameter("W", rng.standard_normal((4, 3)).astype(np.float32))
    out = gc.trace(model, x, W)
    assert isinstance(out, gc.Tensor)
    a = rng.standard_normal((5, 4)).astype(np.float32)
    assert_close(gc.function([x], out, backend=backend)(a), model(a, W.value), "float32", backend)
    with pytest.raises(gc.GraphcError, match="fft"):
        np.fft.fft(x)


def test_function_accepts_a_graph():
    x, W, b, y = _mlp()
    f = gc.function(gc.Graph([x], [y]))
    (out,) = f(np.zeros((1, 784), np.float32))  # a Graph has a list of outputs
    assert out.shape == (1, 10)


def test_debug_mode_names_the_first_node_that_made_a_nan():
    x = gc.placeholder("x", (3,))
    c = gc.parameter("c", np.zeros((), np.float32))
    y = gc.log(x - 1.0)  # NaN for x < 1
    f = gc.function([x], gc.sum(y * 0.0), updates=[(c, c + 1)], mode="debug")
    with pytest.raises(gc.NumericalError) as e:
        f(np.array([2, 0.5, 3], np.float32))
    assert "log" in str(e.value) and "NaN" in str(e.value) and "gc.log(x - 1.0)" in str(e.value)
    assert c.value == 0
    assert f(np.array([2, 3, 4], np.float32)) == 0 and c.value == 1
    with pytest.raises(gc.NumericalError, match="input 'x'"):
        f(np.array([np.inf, 2, 3], np.float32))


def test_non_contiguous_and_misaligned_inputs_are_copied(backend):
    x = gc.placeholder("x", (None, 3), "float64")
    f = gc.function([x], x * 2, backend=backend)
    a = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]  # strided view
    np.testing.assert_array_equal(f(a), a * 2)
    raw = np.zeros(8 * 6 + 1, np.uint8)[1:].view(np.float64).reshape(2, 3)  # misaligned buffer
    raw[...] = [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(f(raw), raw * 2)
    np.testing.assert_array_equal(f(np.asfortranarray(raw)), raw * 2)


def test_string_dims_are_shared_symbols():
    a = gc.placeholder("a", ("T", "B", 4))
    b = gc.placeholder("b", ("B", 4))
    f = gc.function([a, b], a + b)
    assert f(np.ones((2, 3, 4), np.float32), np.ones((3, 4), np.float32)).shape == (2, 3, 4)
    with pytest.raises(gc.InputError, match="dim B"):
        f(np.ones((2, 3, 4), np.float32), np.ones((5, 4), np.float32))
    with pytest.raises(gc.ShapeError, match="identifier"):
        gc.placeholder("c", ("2*N",))
