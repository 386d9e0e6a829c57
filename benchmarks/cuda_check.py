"""Real-GPU check for backend="cuda": runs the test models (W1 MLP, W2 elementwise chain, W3 LeNet,
W4 LSTM, W5 MLP training steps) on the GPU, compares every result with the NumPy backend, then
times W1/W2/W3 inference per call (host<->device copies at the function boundary included) against
PyTorch CUDA when torch with CUDA is installed.

    python benchmarks/cuda_check.py                        # on a machine with an NVIDIA GPU
    python benchmarks/cuda_check.py --backend cuda-emulated --quick   # dry run of the same checks on the CPU

Exit status: 0 all checks passed, 1 a result differed, 2 the backend cannot run here (reason printed).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import graphc as gc

RTOL, ATOL = 1e-4, 1e-5


def mlp():
    nn = gc.nn
    return nn.Sequential(nn.Dense(784, 512, seed=0), gc.relu, nn.Dense(512, 256, seed=1), gc.relu,
                         nn.Dense(256, 10, seed=2))


def lenet():
    nn = gc.nn
    gc.init.seed(0)
    return nn.Sequential(nn.Conv2D(1, 6, 5, padding=2), gc.relu, nn.MaxPool2D(2), nn.Conv2D(6, 16, 5), gc.relu,
                         nn.MaxPool2D(2), nn.Flatten(), nn.Dense(400, 120, seed=3), gc.relu,
                         nn.Dense(120, 84, seed=4), gc.relu, nn.Dense(84, 10, seed=5))


def w2_graph():
    x = gc.placeholder("x", (None,))
    return [x], gc.tanh(x * 0.5 + 0.25) * gc.sigmoid(x) + gc.exp(-x * x)


def cases(quick: bool):
    """(name, inputs builder -> (placeholders, outputs), input arrays, model or None)."""
    rng = np.random.default_rng(0)
    n2 = 1 << (12 if quick else 22)
    m, l = mlp(), lenet()
    lstm = gc.nn.LSTM(64, 128)
    out = []
    for b in ((1, 8) if quick else (1, 256)):
        x = gc.placeholder("x", (None, 784))
        out.append((f"W1 MLP b{b}", [x], gc.softmax(m(x), axis=1), [rng.standard_normal((b, 784)).astype(np.float32)], m))
    xs, y = w2_graph()
    out.append((f"W2 elementwise {n2}", xs, y, [rng.standard_normal(n2).astype(np.float32)], None))
    for b in ((1, 4) if quick else (1, 64)):
        x = gc.placeholder("x", (None, 1, 28, 28))
        out.append((f"W3 LeNet b{b}", [x], l(x), [rng.standard_normal((b, 1, 28, 28)).astype(np.float32)], l))
    x = gc.placeholder("x", (None, 50 if not quick else 5, 64))
    out.append(("W4 LSTM", [x], lstm(x)[0][:, -1], [rng.standard_normal((16, x.shape[1], 64)).astype(np.float32)],
                None))
    return out


def check(backend: str, quick: bool) -> list:
    """Compare each case with the NumPy backend; returns [(name, compiled function, inputs, model)]."""
    done, bad = [], 0
    for name, ins, outs, arrays, model in cases(quick):
        f = gc.function(ins, outs, backend=backend)
        want = gc.function(ins, outs)(*arrays)
        got = f(*arrays)
        err = float(np.max(np.abs(got - want) / (np.abs(want) + ATOL / RTOL))) if want.size else 0.0
        ok = np.allclose(got, want, rtol=RTOL, atol=ATOL)
        bad += not ok
        fb = f.program.info.get("fallback_ops", [])
        print(f"{'ok  ' if ok else 'FAIL'} {name:24s} max rel err {err:.2e}  kernels {len(f.program.info['kernels'])}"
              + (f"  host fallback: {fb}" if fb else ""))
        done.append((name, f, arrays, model))
    bad += not check_training(backend)
    return done if not bad else []


def check_training(backend: str) -> bool:
    """W5: three SGD steps of the MLP on the backend and on NumPy from the same weights."""
    rng = np.random.default_rng(1)
    m = mlp()
    x, y = gc.placeholder("x", (None, 784)), gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(m(x), y)
    upd = gc.optim.SGD(0.05).updates(loss, m.params)
    xs, ys = rng.standard_normal((64, 784)).astype(np.float32), rng.integers(0, 10, 64)
    start = [p.get_value() for p in m.params]
    res = {}
    for b in ("numpy", backend):
        for p, v in zip(m.params, start):
            p.set_value(v)
        f = gc.function([x, y], loss, updates=upd, backend=b)
        res[b] = ([float(f(xs, ys)) for _ in range(3)], [p.get_value() for p in m.params])
    ok = np.allclose(res["numpy"][0], res[backend][0], rtol=RTOL) and all(
        np.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(res["numpy"][1], res[backend][1]))
    print(f"{'ok  ' if ok else 'FAIL'} W5 MLP training (3 steps) losses {res[backend][0]}")
    return ok


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def torch_model(name: str, model):
    """The same network in PyTorch on CUDA with graphc's weights, or None without torch CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or model is None:
        return None
    tnn = torch.nn
    if name.startswith("W1"):
        net = tnn.Sequential(tnn.Linear(784, 512), tnn.ReLU(), tnn.Linear(512, 256), tnn.ReLU(), tnn.Linear(256, 10),
                             tnn.Softmax(dim=1))
    else:
        net = tnn.Sequential(tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5),
                             tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(),
                             tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))
    with torch.no_grad():
        for tp, gp in zip(net.parameters(), model.params):
            tp.copy_(torch.from_numpy(gp.get_value()))
    return net.cuda().eval()


def bench(done, reps: int, backend: str) -> None:
    print(f"\n{'workload':24s} {'graphc ' + backend:>20s} {'torch cuda':>14s}   (median per call, copies included)")
    for name, f, arrays, model in done:
        t = median_time(lambda: f(*arrays), reps)
        net, tt = torch_model(name, model), None
        if net is not None:
            import torch
            xt = torch.from_numpy(arrays[0])

            def run():
                with torch.no_grad():
                    r = net(xt.cuda()).cpu()
                torch.cuda.synchronize()
                return r
            tt = median_time(run, reps)
        print(f"{name:24s} {t * 1e3:17.3f} ms {'' if tt is None else f'{tt * 1e3:11.3f} ms':>14s}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cuda", help="cuda (default) or cuda-emulated for a CPU dry run")
    ap.add_argument("--quick", action="store_true", help="small sizes (for the emulated dry run)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    if a.backend not in gc.available_backends():
        from graphc.function import get_backend
        try:
            get_backend(a.backend)
        except gc.GraphcError as e:
            print(f"cannot run: {e}")
        return 2
    done = check(a.backend, a.quick)
    if not done:
        print("some results differ from the NumPy backend")
        return 1
    bench(done, a.reps, a.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
