"""gc.save / gc.load: bit-exact round trips and clear errors for malformed files."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

import graphc as gc
from graphc.serialize import SerializationError


def _model(rng):
    x = gc.placeholder("x", (None, 4))
    W = gc.parameter("W", rng.standard_normal((4, 6)).astype(np.float32))
    b = gc.parameter("b", rng.standard_normal(6).astype(np.float32))
    h = gc.tanh(x @ W + b)
    y = gc.softmax(gc.reshape(h, (-1, 2, 3)), axis=-1)
    return x, W, b, y


def _training_fn(rng):
    x, W, b, y = _model(rng)
    loss = gc.mean(y[:, 0, :] * gc.log(y[:, 1, :] + 1e-3))
    vel = gc.parameter("velocity", np.zeros((4, 6), np.float32))  # optimiser state
    gW = gc.grad(loss, W)
    v_new = vel * 0.9 + gW
    return x, W, vel, gc.function([x], [y, loss], updates=[(vel, v_new), (W, W - 0.1 * v_new)])


def test_round_trip_bit_exact(tmp_path, rng):
    x, W, vel, f = _training_fn(rng)
    xv = rng.standard_normal((5, 4)).astype(np.float32)
    f(xv)  # non-trivial optimiser state
    path = tmp_path / "m.graphc"
    gc.save(f, path)
    g = gc.load(path)
    assert [t.name for t in g.inputs] == ["x"]
    assert str(g) == str(f.user_graph)
    saved = {p.name: p.value for p in f.user_graph.parameters}
    for p in g.parameters:
        assert p.value.dtype == saved[p.name].dtype
        assert np.array_equal(p.value, saved[p.name]) and p.value.tobytes() == saved[p.name].tobytes()
    f2 = gc.function(g)
    for _ in range(2):  # same outputs and same parameter trajectory (updates included)
        a, b2 = f(xv), f2(xv)
        for u, v in zip(a, b2):
            assert u.tobytes() == v.tobytes()
    assert {p.name: p.value.tobytes() for p in g.parameters} == \
        {p.name: p.value.tobytes() for p in f.user_graph.parameters}


def test_round_trip_optimised_graph_with_fused_nodes(tmp_path, rng):
    x, W, b, y = _model(rng)
    f = gc.function([x], y)
    path = tmp_path / "opt.graphc"
    gc.save(f.graph, path)
    g = gc.load(path)
    assert g.op_names() == f.graph.op_names()
    assert any(n.startswith("fused[") for n in g.op_names()), g.op_names()
    xv = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(gc.function(g, optimize=0)(xv)[0], f(xv))


def test_special_values_and_dtypes(tmp_path):
    x = gc.placeholder("x", (3,), "int32")
    c = gc.constant(np.array([np.nan, -0.0, np.inf], np.float64))
    p = gc.parameter("flags", np.array([True, False, True]))
    y = gc.where(p, gc.cast(x, "float64") * 0.1, c)
    gc.save([y], tmp_path / "s.graphc")
    g = gc.load(tmp_path / "s.graphc")
    assert g.inputs == [] and g.outputs[0].dtype == "float64"
    assert g.parameters[0].value.dtype == np.bool_


def _rewrite(src, dst, edits=None, drop=(), manifest=None, fix_digests=False):
    edits = dict(edits or {})
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist() if n not in drop}
    members.update(edits)
    man = json.loads(members["MANIFEST.json"])
    if fix_digests:
        man["sha256"] = {k: hashlib.sha256(v).hexdigest() for k, v in members.items() if k != "MANIFEST.json"}
    if manifest:
        man.update(manifest)
    members["MANIFEST.json"] = json.dumps(man).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)


@pytest.fixture
def saved(tmp_path, rng):
    x, W, b, y = _model(rng)
    path = tmp_path / "m.graphc"
    gc.save(gc.function([x], y), path)
    return path


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.graphc"
        bad.write_bytes(data[:cut])
        with pytest.raises(SerializationError, match="cut"):
            gc.load(bad)


def test_tampered_array_fails_checksum(saved, tmp_path):
    with zipfile.ZipFile(saved) as z:
        arr = bytearray(z.read("arrays/0.npy"))
    arr[-1] ^= 0x01
    bad = tmp_path / "t.graphc"
    _rewrite(saved, bad, {"arrays/0.npy": bytes(arr)})
    with pytest.raises(SerializationError, match="SHA-256"):
        gc.load(bad)


def test_tampered_graph_fails_type_check(saved, tmp_path):
    with zipfile.ZipFile(saved) as z:
        doc = json.loads(z.read("graph.json"))
    for n in doc["graph"]["nodes"]:
        if n["op"] == "tanh":
            n["outputs"][0]["dtype"] = "float64"
    bad = tmp_path / "t.graphc"
    _rewrite(saved, bad, {"graph.json": json.dumps(doc).encode()}, fix_digests=True)
    with pytest.raises(SerializationError, match="differs from the rebuilt"):
        gc.load(bad)


def test_newer_version_rejected(saved, tmp_path):
    bad = tmp_path / "v.graphc"
    _rewrite(saved, bad, manifest={"version": 99})
    with pytest.raises(SerializationError, match="newer graphc"):
        gc.load(bad)


def test_pickled_array_rejected(saved, tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = tmp_path / "p.graphc"
    _rewrite(saved, bad, {"arrays/0.npy": buf.getvalue()}, fix_digests=True)
    with pytest.raises(SerializationError, match="dtype"):
        gc.load(bad)


def test_hostile_declared_shape_refused_without_allocating(saved, tmp_path):
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 7, 10 ** 7)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    bad = tmp_path / "h.graphc"
    _rewrite(saved, bad, {"arrays/0.npy": buf.getvalue() + b"\0" * 16}, fix_digests=True)
    with pytest.raises(SerializationError, match="declares shape"):
        gc.load(bad)


def test_not_a_graphc_file(tmp_path):
    p = tmp_path / "junk.graphc"
    p.write_bytes(b"hello world")
    with pytest.raises(SerializationError, match="not a graphc file"):
        gc.load(p)
    with pytest.raises(SerializationError, match="no such file"):
        gc.load(tmp_path / "missing.graphc")


def test_unknown_op_and_bad_reference(saved, tmp_path):
    with zipfile.ZipFile(saved) as z:
        doc = json.loads(z.read("graph.json"))
    doc2 = json.loads(json.dumps(doc))
    next(n for n in doc2["graph"]["nodes"] if n["op"] == "tanh")["op"] = "os_system"
    bad = tmp_path / "u.graphc"
    _rewrite(saved, bad, {"graph.json": json.dumps(doc2).encode()}, fix_digests=True)
    with pytest.raises(SerializationError, match="unknown op 'os_system'"):
        gc.load(bad)
    doc["graph"]["outputs"] = [[10 ** 6, 0]]
    _rewrite(saved, bad, {"graph.json": json.dumps(doc).encode()}, fix_digests=True)
    with pytest.raises(SerializationError, match="bad tensor reference"):
        gc.load(bad)


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(gc.GraphcError, match="gc.save takes"):
        gc.save(42, tmp_path / "x.graphc")


def test_training_state_round_trip_adam_batchnorm_dropout(tmp_path, rng):
    """Optimiser slots, step counter, batch-norm running statistics and the dropout generator are
    parameters updated by the function: a loaded file resumes training bit for bit."""
    nn = gc.nn
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1D(8), nn.ReLU(), nn.Dropout(0.3, seed=1), nn.Linear(8, 2))
    x = gc.placeholder("x", (None, 4))
    loss = gc.mean(net(x, training=True) ** 2)
    opt = gc.optim.Adam(lr=0.01)
    f = gc.function([x], loss, updates=opt.updates(loss, net.params))
    xs = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(5)]
    for xv in xs[:3]:
        f(xv)
    gc.save(f, tmp_path / "train.graphc")
    g = gc.load(tmp_path / "train.graphc")
    names = {p.name for p in g.parameters}
    state = {p.name for p in opt.state} | {p.name for p in net.buffers}  # step, moments, running stats
    assert len(state) >= 1 + 2 * len(net.params) + 2 and state <= names
    f2 = gc.function(g)
    for xv in xs[3:]:
        assert f(xv).tobytes() == f2(xv).tobytes()   # one output, as saved
    assert {p.name: p.value.tobytes() for p in g.parameters} == \
        {p.name: p.value.tobytes() for p in f.user_graph.parameters}


def test_scan_bodies_and_optimised_gradient_graph(tmp_path, rng):
    x = gc.placeholder("x", (None, 6, 3))
    y, (h, c) = gc.nn.LSTM(3, 4, bidirectional=True)(x)
    loss = gc.mean(y ** 2)
    f = gc.function([x], [y, loss])
    gc.save(f, tmp_path / "lstm.graphc")
    xv = rng.standard_normal((2, 6, 3)).astype(np.float32)
    g = gc.load(tmp_path / "lstm.graphc")
    assert any(n.startswith("scan[") for n in g.op_names())
    assert all(u.tobytes() == v.tobytes() for u, v in zip(f(xv), gc.function(g)(xv)))
    gw = gc.function([x], gc.grad(loss, f.user_graph.parameters[0]))  # backward scan, fused, optimised
    gc.save(gw.graph, tmp_path / "grad.graphc")
    g2 = gc.load(tmp_path / "grad.graphc")
    assert g2.op_names() == gw.graph.op_names()
    np.testing.assert_array_equal(gc.function(g2, optimize=0)(xv)[0], gw(xv))
