"""python -m benchmarks.distributed [--steps 20] [--procs 1,2] [--backend llvm] [--json out.json]

graphc.distributed measured on this machine, one line per mode:
  - data-parallel training steps, global batch 64, on 1 and 2 MPI processes (started with `graphc launch`):
    W5 (MLP 784-512-256-10, SGD) and W8 (LeNet-5 on 28x28, SGD), plain (bucketed, overlapped allreduce) and
    deterministic (8 micro-shards, fixed-tree sum): samples/s, the time per step from each bucket's start
    to its observed completion, the part of it a wait was blocked, and the share hidden behind compute;
  - batch inference of W1 (the W5 MLP, inference) in chunks of 256 rows with gd.map_batches on a Dask
    LocalCluster of 1 and 2 worker processes: samples/s.
Then, on paper, the same W5 step at 8 and 64 processes: communication volume per step and whether the
allreduce can hide behind the backward pass. On a 2-core machine two processes share the two cores that
one process already uses (BLAS and graphc's kernel threads), so scaling is bounded by the cores: the point
of the 1- and 2-process lines is the overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64


def _mlp_step(backend, deterministic):
    import graphc as gc
    import graphc.distributed as gd
    from .workloads import mlp_params
    rng = np.random.default_rng(5)
    d = mlp_params(rng)
    x, y = gc.placeholder("x", (None, 784)), gc.placeholder("y", (None,), "int64")
    ps = {k: gc.parameter(k, v) for k, v in d.items()}
    h = gc.relu(x @ ps["w0"] + ps["b0"])
    h = gc.relu(h @ ps["w1"] + ps["b1"])
    loss = gc.losses.cross_entropy(h @ ps["w2"] + ps["b2"], y)
    params = [ps[k] for k in ("w0", "b0", "w1", "b1", "w2", "b2")]
    X = rng.standard_normal((BATCH, 784)).astype(np.float32)
    Y = rng.integers(0, 10, BATCH)
    return gd.TrainStep([x, y], loss, params, gc.optim.SGD(0.1), backend=backend), X, Y, params


def _lenet_step(backend, deterministic):
    import graphc as gc
    import graphc.distributed as gd
    from .workloads import lenet_params
    rng = np.random.default_rng(8)
    d = lenet_params(rng)
    p = {k: gc.parameter(k, v) for k, v in d.items()}
    x, y = gc.placeholder("x", (None, 1, 28, 28)), gc.placeholder("y", (None,), "int64")
    h = gc.max_pool2d(gc.relu(gc.conv2d(x, p["c1w"], p["c1b"], padding=2)), 2)
    h = gc.max_pool2d(gc.relu(gc.conv2d(h, p["c2w"], p["c2b"])), 2)
    h = gc.reshape(h, (-1, 400))
    h = gc.relu(h @ p["f1w"] + p["f1b"])
    h = gc.relu(h @ p["f2w"] + p["f2b"])
    loss = gc.losses.cross_entropy(h @ p["f3w"] + p["f3b"], y)
    params = list(p.values())
    X = rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32)
    Y = rng.integers(0, 10, BATCH)
    return gd.TrainStep([x, y], loss, params, gc.optim.SGD(0.05), backend=backend), X, Y, params


WORKLOADS = {"W5": _mlp_step, "W8": _lenet_step}


def worker(args) -> None:
    """Runs inside each MPI process (started by `graphc launch`); rank 0 writes the figures."""
    import graphc.distributed as gd
    gd.init(deterministic=args.deterministic, timeout=120)
    step, X, Y, params = WORKLOADS[args.workload](args.backend, args.deterministic)
    xs, ys = gd.shard(X), gd.shard(Y)
    for _ in range(3):
        step(xs, ys)
    gd.barrier()
    gd.collective_stats(reset=True)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(xs, ys)
        times.append(time.perf_counter() - t0)
    st = gd.collective_stats()
    med = float(np.median(times))
    tot = gd.gather_sum(np.array([med, st["seconds"] / args.steps, st["blocked_seconds"] / args.steps]))
    if gd.rank() == 0:
        n = gd.size()
        grad_bytes = sum(p.value.nbytes for p in params)
        out = {"workload": args.workload, "procs": n, "deterministic": args.deterministic,
               "step_ms": 1e3 * tot[0] / n, "samples_per_s": BATCH / (tot[0] / n),
               "collective_ms": 1e3 * tot[1] / n, "blocked_ms": 1e3 * tot[2] / n,
               "overlap": 0.0 if tot[1] <= 0 else max(0.0, 1 - tot[2] / tot[1]), "grad_bytes": grad_bytes,
               "collectives_per_step": st["collectives"] / args.steps}
        with open(args.out, "w") as f:
            json.dump(out, f)


def _threads(n: int) -> dict:
    """One thread per process (BLAS and graphc's kernels): n processes use n cores, and the figures do not
    swing with thread oversubscription on a shared machine."""
    k = "1"
    return {"OPENBLAS_NUM_THREADS": k, "OMP_NUM_THREADS": k, "MKL_NUM_THREADS": k, "GRAPHC_NUM_THREADS": k}


def _launch(n, argv, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(_threads(n))
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        r = subprocess.run([sys.executable, "-m", "graphc.cli", "launch", "-n", str(n), "--timeout", str(timeout),
                            sys.executable, "-m", "benchmarks.distributed", "--worker", "--out", out, *argv],
                           env=env, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"{n} processes failed:\n{r.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def dask_inference(workers: int, chunks: int = 48, chunk_rows: int = 256, backend: str = "llvm") -> float:
    """W1 (MLP inference) over chunks of 256 rows on a LocalCluster of `workers` processes: samples/s."""
    import dask.array as da
    from distributed import Client, LocalCluster
    import graphc as gc
    import graphc.distributed as gd
    from .workloads import mlp_params
    rng = np.random.default_rng(1)
    d = mlp_params(rng)
    x = gc.placeholder("x", (None, 784))
    p = {k: gc.parameter(k, v) for k, v in d.items()}
    h = gc.relu(x @ p["w0"] + p["b0"])
    h = gc.relu(h @ p["w1"] + p["b1"])
    f = gc.function([x], gc.softmax(h @ p["w2"] + p["b2"]), backend=backend)
    saved = {k: os.environ.get(k) for k in _threads(workers)}
    os.environ.update(_threads(workers))   # the worker processes inherit it
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with cluster as cl, Client(cl) as client:
        a = da.random.default_rng(1).standard_normal((chunks * chunk_rows, 784), chunks=(chunk_rows, 784),
                                                     dtype=np.float32)
        a = client.persist(a)
        gd.map_batches(f, a[:workers * chunk_rows]).compute()   # ship and compile on every worker
        t0 = time.perf_counter()
        out = gd.map_batches(f, a).compute()
        secs = time.perf_counter() - t0
    assert out.shape == (chunks * chunk_rows, 10)
    return chunks * chunk_rows / secs


def paper(step_ms_1: float, grad_bytes: int, bw_gbs: float = 12.5, lat_us: float = 5.0) -> list[str]:
    """Ring allreduce at P processes: 2(P-1)/P x gradient bytes sent and received per rank, 2(P-1)
    latency terms; the backward pass (about 2/3 of a step) can hide it when it is shorter."""
    lines = []
    for P in (8, 64):
        vol = 2 * (P - 1) / P * grad_bytes
        t_comm = vol / (bw_gbs * 1e9) * 1e3 + 2 * (P - 1) * lat_us * 1e-3
        compute = step_ms_1 / P            # the same global batch of 64, 64/P rows each (optimistic)
        backward = compute * 2 / 3
        hidden = min(t_comm, backward)
        det_vol = P * grad_bytes           # deterministic mode: an all-gather of P partial sums
        t_det = det_vol / (bw_gbs * 1e9) * 1e3 + (P - 1) * lat_us * 1e-3
        lines.append(f"  P={P:>2}: allreduce {vol / 1e6:.2f} MB/rank/step, {t_comm:.2f} ms at {bw_gbs:g} GB/s + "
                     f"{lat_us:g} us/hop; compute {compute:.2f} ms/step ({backward:.2f} backward) -> "
                     f"{hidden / t_comm:.0%} of the reduction hidden, step >= {max(compute, t_comm + compute - hidden):.2f}"
                     f" ms; deterministic all-gather {det_vol / 1e6:.1f} MB, {t_det:.2f} ms (not overlapped)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--backend", default="llvm")
    ap.add_argument("--only", default="W5,W8,W1")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="W5", help=argparse.SUPPRESS)
    ap.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    only = args.only.split(",")
    procs = [int(p) for p in args.procs.split(",")]
    rows = []
    print(f"graphc.distributed on {os.cpu_count()} cores, backend {args.backend}, global batch {BATCH}, "
          f"{args.steps} timed steps (median)")
    for wl in [w for w in ("W5", "W8") if w in only]:
        for det in (False, True):
            for n in procs:
                r = _launch(n, ["--workload", wl, "--steps", str(args.steps), "--backend", args.backend]
                            + ["--deterministic"] * det)
                rows.append(r)
                mode = "deterministic" if det else "allreduce    "
                print(f"{wl} {mode} {n} proc: {r['samples_per_s']:8.0f} samples/s  step {r['step_ms']:7.2f} ms  "
                      f"collectives {r['collectives_per_step']:.1f}/step {r['collective_ms']:6.2f} ms start->done, "
                      f"{r['blocked_ms']:6.2f} ms blocked ({r['overlap']:.0%} overlapped)", flush=True)
    if "W1" in only:
        for n in procs:
            sps = dask_inference(n, backend=args.backend)
            rows.append({"workload": "W1 b256 dask", "workers": n, "samples_per_s": sps})
            print(f"W1 b256 map_batches {n} Dask worker(s): {sps:8.0f} samples/s", flush=True)
    w5 = [r for r in rows if r.get("workload") == "W5" and r.get("procs") == 1 and not r["deterministic"]]
    if w5:
        print("W5 on paper (ring allreduce; measured 1-process step, 100 Gb/s links):")
        for line in paper(w5[0]["step_ms"], w5[0]["grad_bytes"]):
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
