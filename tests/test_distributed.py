"""graphc.distributed in one process (a world of one): the collective ops on every backend, their schedule,
gradient, the deterministic step's arithmetic, checkpoints, the launcher's command line and the errors.
The multi-process runs (MPI ranks, a Dask cluster) are in test_distributed_mpi.py."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import graphc as gc
import graphc.distributed as gd
from graphc.distributed import launch as L


def _mlp(rng, dims=(20, 16, 12, 3)):
    x = gc.placeholder("x", (None, dims[0]))
    y = gc.placeholder("y", (None, dims[-1]))
    params, h = [], x
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        W = gc.parameter(f"W{i}", (rng.standard_normal((a, b)) * 0.3).astype(np.float32))
        c = gc.parameter(f"c{i}", (rng.standard_normal(b) * 0.1).astype(np.float32))
        params += [W, c]
        h = h @ W + c
        if i < len(dims) - 2:
            h = gc.tanh(h)
    return x, y, params, gc.mean((h - y) ** 2)


def test_world_of_one_without_a_launcher():
    assert not gd._world.launched()
    assert gd.size() == 1 and gd.rank() == 0
    a = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(gd.shard(a), a)
    assert gc.distributed is gd


def test_shard_errors_and_blocks(monkeypatch):
    w = gd._world.world()
    monkeypatch.setattr(w, "size", 4)
    monkeypatch.setattr(w, "rank", 2)
    a = np.arange(16).reshape(8, 2)
    np.testing.assert_array_equal(gd.shard(a), a[4:6])
    with pytest.raises(gc.GraphcError, match=r"10 rows does not split evenly over 4 processes"):
        gd.shard(np.zeros((10, 3)))
    with pytest.raises(gc.GraphcError, match="axis 0"):
        gd.shard(a, axis=1)
    with pytest.raises(gc.GraphcError, match="rows"):
        gd.shard(3.0)


@pytest.mark.parametrize("backend", ["numpy", "llvm", "cuda-emulated"])
def test_allreduce_in_a_world_of_one_is_the_identity_inside_the_compiled_call(backend):
    from conftest import backend_or_skip
    backend_or_skip(backend)
    rng = np.random.default_rng(0)
    x, y, params, loss = _mlp(rng)
    grads = gc.grad(loss, params)
    red = gd.allreduce(grads, op="mean", bucket_bytes=600)
    f = gc.function([x, y], grads + red, backend=backend)
    xs, ys = rng.standard_normal((8, 20)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    out = f(xs, ys)
    for g, r in zip(out[:len(params)], out[len(params):]):
        np.testing.assert_array_equal(g, r)
    names = [n.op.name for n in f.graph.compute_nodes()]
    assert names.count("allreduce_start") >= 2   # several buckets of ~600 bytes
    if backend != "numpy":   # host steps between the native segments
        assert set(f.program.info["fallback_ops"]) == {"allreduce_start", "allreduce_wait"}


def test_bucket_starts_before_the_rest_of_the_backward_pass_on_llvm():
    """The first bucket (the last layers' gradients) starts before the first layer's weight gradient
    kernel runs: the executed order of the llvm plan."""
    rng = np.random.default_rng(1)
    x, y, params, loss = _mlp(rng, (64, 64, 64, 8))
    grads = gd.allreduce(gc.grad(loss, params), bucket_bytes=4 * 64 * 64 + 1024)
    f = gc.function([x, y], loss, updates=[(p, p - 0.1 * g) for p, g in zip(params, grads)], backend="llvm")
    f(rng.standard_normal((16, 64)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32))
    spec = next(iter(f.program._specs.values()))
    steps = [s.node.op.name if getattr(s, "node", None) is not None else "?" for s in spec.plan.steps]
    starts = [i for i, s in enumerate(steps) if s == "allreduce_start"]
    waits = [i for i, s in enumerate(steps) if s == "allreduce_wait"]
    matmuls = [i for i, s in enumerate(steps) if s == "matmul"]
    assert len(starts) >= 2 and max(starts) < min(waits)
    assert starts[0] < matmuls[-1], steps     # overlaps gradient kernels still to run
    assert min(waits) > matmuls[-1]           # waited for only before the updates


def test_allreduce_gradient_and_errors():
    gc.verify_grad(lambda a, b: gc.sum(gd.allreduce([a * b, gc.sin(a)], op="sum")[1] * a
                                       + gd.allreduce(a * b, op="mean") ** 2),
                   [np.random.default_rng(2).uniform(-1, 1, (3, 4)), np.random.default_rng(3).uniform(-1, 1, (3, 4))])
    a = gc.placeholder("a", (3,))
    with pytest.raises(gc.GraphcError, match="'mean' or 'sum'"):
        gd.allreduce([a], op="max")
    with pytest.raises(gc.GraphcError, match="not floating point"):
        gd.allreduce([gc.placeholder("i", (3,), "int32")])
    assert gd.allreduce([]) == []


def test_tree_sum_blocks_are_subtrees():
    rng = np.random.default_rng(4)
    rows = [(rng.standard_normal(50) * 10.0 ** rng.integers(-3, 4)).astype(np.float32) for _ in range(8)]
    whole = gd.tree_sum(rows)
    for p in (1, 2, 4, 8):
        m = 8 // p
        blocks = [gd.tree_sum(rows[r * m:(r + 1) * m]) for r in range(p)]
        np.testing.assert_array_equal(gd.tree_sum(blocks), whole)
    np.testing.assert_allclose(whole, np.sum(np.array(rows, np.float64), axis=0), rtol=1e-5, atol=1e-4)


def test_deterministic_step_equals_a_plain_step_to_rounding(monkeypatch):
    w = gd._world.world()
    monkeypatch.setattr(w, "deterministic", True)
    monkeypatch.setattr(w, "micro_shards", 4)
    rng = np.random.default_rng(5)
    xs, ys = rng.standard_normal((16, 20)).astype(np.float32), rng.standard_normal((16, 3)).astype(np.float32)
    x, y, params, loss = _mlp(np.random.default_rng(6))
    step = gd.TrainStep([x, y], loss, params, gc.optim.SGD(0.1), backend="numpy")
    x2, y2, params2, loss2 = _mlp(np.random.default_rng(6))
    plain = gc.function([x2, y2], loss2, updates=gc.optim.SGD(0.1).updates(loss2, params2))
    for _ in range(3):
        (lo,) = step(xs, ys)
        lp = plain(xs, ys)
    np.testing.assert_allclose(lo, lp, rtol=1e-5)
    for p, q in zip(params, params2):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-5, atol=1e-6)
    with pytest.raises(gc.GraphcError, match="does not split into 4 micro-shards"):
        step(xs[:6], ys[:6])
    monkeypatch.setattr(w, "micro_shards", 3)
    monkeypatch.setattr(w, "size", 2)
    with pytest.raises(gc.GraphcError, match="multiple of the 2 processes"):
        step(xs, ys)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    rng = np.random.default_rng(7)
    x, y, params, loss = _mlp(rng)
    opt = gc.optim.Adam(0.01)
    step = gd.TrainStep([x, y], loss, params, opt)
    xs, ys = rng.standard_normal((8, 20)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    step(xs, ys)
    path = str(tmp_path / "ck.graphc")
    assert gd.load_checkpoint(path, step) is None
    gd.save_checkpoint(path, step, step=3, meta={"epoch": 1})
    saved = [p.get_value() for p in step.state]
    assert len(step.state) > len(params)   # optimiser state (moments, step counter) included
    step(xs, ys)
    assert not np.array_equal(saved[0], step.state[0].value)
    assert gd.load_checkpoint(path, step) == (3, {"epoch": 1})
    for v, p in zip(saved, step.state):
        np.testing.assert_array_equal(v, p.value)
    with pytest.raises(gc.GraphcError, match="does not hold this state"):
        gd.load_checkpoint(path, params[:2])


def test_fit_distributed_in_a_world_of_one_matches_fit(tmp_path):
    rng = np.random.default_rng(8)
    X = rng.standard_normal((70, 6)).astype(np.float32)
    Y = (X[:, 0] > 0).astype(np.int64)

    def model():
        gc.init.seed(0)
        return gc.nn.Sequential(gc.nn.Dense(6, 8), gc.relu, gc.nn.Dense(8, 2))
    m1, m2 = model(), model()
    h1 = gc.fit(m1, gc.losses.cross_entropy, gc.optim.SGD(0.1), X[:64], Y[:64], epochs=2, batch_size=16,
                progress=False)
    h2 = gc.fit(m2, gc.losses.cross_entropy, gc.optim.SGD(0.1), X, Y, epochs=2, batch_size=16, progress=False,
                distributed=True, checkpoint=str(tmp_path / "c.graphc"), checkpoint_every=3)
    # the last short batch (6 rows of 70) is skipped: the same batches as fit on the first 64 rows
    # only when the order is not shuffled, so compare shapes of the run and that it learned
    assert len(h2["loss"]) == 2 and h2["loss"][1] < h2["loss"][0] and (tmp_path / "c.graphc").exists()
    m3 = model()
    h3 = gc.fit(m3, gc.losses.cross_entropy, gc.optim.SGD(0.1), X[:64], Y[:64], epochs=2, batch_size=16,
                progress=False, shuffle=False)
    m4 = model()
    h4 = gc.fit(m4, gc.losses.cross_entropy, gc.optim.SGD(0.1), X[:64], Y[:64], epochs=2, batch_size=16,
                progress=False, shuffle=False, distributed=True)
    np.testing.assert_allclose(h3["loss"], h4["loss"], rtol=1e-6)
    for p, q in zip(m3.params, m4.params):
        np.testing.assert_array_equal(p.value, q.value)
    with pytest.raises(gc.GraphcError, match="need distributed=True"):
        gc.fit(m1, gc.losses.cross_entropy, gc.optim.SGD(0.1), X, Y, checkpoint="x.graphc", progress=False)
    assert h1["loss"]


def test_init_and_map_batches_errors():
    with pytest.raises(gc.GraphcError, match="timeout"):
        gd.init(timeout=-1)
    with pytest.raises(gc.GraphcError, match="micro_shards"):
        gd.init(micro_shards=0)
    pytest.importorskip("dask.array")
    import dask.array as da
    x = gc.placeholder("x", (None, 4))
    f = gc.function([x], gc.tanh(x))
    with pytest.raises(gc.GraphcError, match="compiled function"):
        gd.map_batches(lambda a: a, da.zeros((4, 4)))
    with pytest.raises(gc.GraphcError, match="dask array or a list"):
        gd.map_batches(f, np.zeros((4, 4)))
    with pytest.raises(gc.GraphcError, match="dim 1 = 4"):
        gd.map_batches(f, da.zeros((4, 5), chunks=2))
    with pytest.raises(gc.GraphcError, match="batch of rows"):
        gd.map_batches(gc.function([x], gc.sum(x, axis=0)), da.zeros((4, 4), chunks=2))
    with pytest.raises(gc.GraphcError, match="cannot read"):
        gd.map_batches(f, ["/nonexistent/x.npy"])


def test_launch_command_line(monkeypatch):
    mpiexec = L.find_mpiexec()
    argv, env = L.command_for(2, ["train.py", "--epochs", "3"], mpiexec)
    assert argv[:3] == [mpiexec, "-n", "2"] and argv[-4:] == [sys.executable, "train.py", "--epochs", "3"]
    assert env["GRAPHC_LAUNCHED"] == "1"
    if L.mpi_flavour(mpiexec)[0] == "openmpi":
        assert "--oversubscribe" in argv
        if os.geteuid() == 0:
            assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    argv, _ = L.command_for(3, ["python", "-c", "pass"], mpiexec)
    assert argv[argv.index("-c") - 1] == sys.executable
    with pytest.raises(gc.GraphcError, match="positive"):
        L.command_for(0, ["x.py"], mpiexec)
    with pytest.raises(gc.GraphcError, match="no command"):
        L.command_for(2, [], mpiexec)
    from graphc.cli import main
    assert main(["launch", "python"]) == 1   # no -n: one-line error


def test_distributed_mlp_example_runs_in_one_process(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import distributed_mlp
    hist, values = distributed_mlp.main(epochs=2, n_train=512, progress=False, out=str(tmp_path / "p.npz"))
    assert hist["loss"][-1] < hist["loss"][0] and hist["val_accuracy"][-1] > 0.5
    saved = np.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(saved["arr_0"], values[0])


def test_a_failing_rank_lingers_until_the_other_local_ranks_exit_and_no_longer():
    """World.linger (run by the rank where a failure began, before it exits): returns as soon as every
    other rank on this host has exited (a zombie counts), and after its bound while one still runs."""
    import socket
    import subprocess
    import time
    from graphc.distributed._world import World
    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    w = World()
    w.rank, w.size = 1, 2
    w.peers = [(host, child.pid), (host, os.getpid())]
    t0 = time.perf_counter()
    w.linger(bound=30)
    waited = time.perf_counter() - t0
    child.wait()
    assert 0.3 < waited < 10, waited
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        w.peers = [(host, alive.pid), (host, os.getpid())]
        t0 = time.perf_counter()
        w.linger(bound=0.5)
        assert 0.45 < time.perf_counter() - t0 < 5
        w.peers = [("another-host", alive.pid), (host, os.getpid())]   # ranks elsewhere: not waited for
        t0 = time.perf_counter()
        w.linger(bound=5)
        assert time.perf_counter() - t0 < 1
    finally:
        alive.kill()
        alive.wait()
