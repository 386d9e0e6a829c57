"""backend="cuda-emulated": the emulation header's execution model (barriers, warp shuffles,
shared memory, deadlock detection) on hand-written kernels, and the models (MLP, LeNet, LSTM)
forward and training steps against the NumPy backend. The op table runs on it through the
`backend` fixture (tests/test_ops.py)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphc as gc
from graphc.backends.cuda.cexpr import DimTable
from graphc.backends.cuda.executor import pack_params
from graphc.backends.cuda.lower import Launch
from graphc.backends.cuda.prelude import PRELUDE
from conftest import assert_close, backend_or_skip


@pytest.fixture(autouse=True)
def _emulated():
    backend_or_skip("cuda-emulated")


def run_kernel(body: str, arrays: list, out_shape, block: int, grid: int = 1, sync: bool = True, dtype="float32"):
    """Compile one hand-written kernel `k(const T* in..., T* out, GcDims gd)` and launch it once."""
    from graphc.backends.cuda_emulated.build import HostMemory, build
    n = len(arrays)
    step = Launch("k", "test", list(range(n + 1)), [a.dtype.name for a in arrays] + [dtype], {n},
                  lambda ev: (grid, 1, 1), (block, 1, 1), sync)
    src = PRELUDE + DimTable().struct_source() + body
    mem = HostMemory(build(src, [step]))
    nbytes = int(np.prod(out_shape)) * np.dtype(dtype).itemsize
    handles = [mem.bind(a, "input", i) for i, a in enumerate(arrays)] + [mem.alloc(nbytes)]
    params, keep = pack_params([mem.pointer(h) for h in handles], DimTable().values({}))
    mem.launch("k", (grid, 1, 1), (block, 1, 1), params, sync)
    return mem.read(handles[-1], nbytes, True).view(dtype).reshape(out_shape)


def test_block_reduce_uses_real_barriers_and_shuffles(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    out = run_kernel("""
extern "C" __global__ void k(const float* x, float* y, GcDims gd) {
  float s = 0;
  for (int i = threadIdx.x; i < 1000; i += blockDim.x) s += x[i];
  s = gc_block_reduce(s, GcSum(), 0.0f);
  float m = gc_block_reduce(x[threadIdx.x], GcMax(), -GC_INF);
  if (threadIdx.x == 0) { y[0] = s; y[1] = m; }
}""", [x], (2,), block=256)
    np.testing.assert_allclose(out, [x.sum(), x[:256].max()], rtol=1e-5)


def test_shared_memory_is_per_block_and_syncthreads_orders_it():
    x = np.arange(256, dtype=np.float32)
    out = run_kernel("""
extern "C" __global__ void k(const float* x, float* y, GcDims gd) {
  __shared__ float s[128];
  const int t = threadIdx.x, base = blockIdx.x * 128;
  s[t] = x[base + t];
  __syncthreads();                       // without a real barrier, thread t would read s[127 - t] unset
  y[base + t] = s[127 - t] + __shfl_down_sync(0xffffffffu, (float)t, 1);
}""", [x], (256,), block=128, grid=2)
    t = np.arange(128)
    down = np.where(t % 32 < 31, t + 1, t)
    want = np.concatenate([x[:128][::-1], x[128:][::-1]]) + np.tile(down, 2)
    np.testing.assert_array_equal(out, want)


def test_divergent_barriers_are_reported_not_hung():
    with pytest.raises(gc.GraphcError, match="deadlock"):
        run_kernel("""
extern "C" __global__ void k(const float* x, float* y, GcDims gd) {
  float v = x[threadIdx.x];
  if (threadIdx.x % 32 < 16) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  y[threadIdx.x] = v;
}""", [np.ones(64, np.float32)], (64,), block=64)


def test_kernels_without_barriers_run_without_fibers(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    out = run_kernel("""
extern "C" __global__ void k(const float* x, float* y, GcDims gd) {
  for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < 1000; i += gridDim.x * blockDim.x) y[i] = 2 * x[i];
}""", [x], (1000,), block=128, grid=3, sync=False)
    np.testing.assert_array_equal(out, 2 * x)


def test_fiber_tables_grow_across_launches_of_different_sizes(rng):
    """The scheduler's arrays (emulation.h's Vec: fibers, shuffle slots, the per-thread stack pool) start
    empty and grow: blocks of 32, 1024 then 96 threads in one process, each with barriers and shuffles."""
    for block in (32, 1024, 96):
        x = rng.standard_normal(2 * block).astype(np.float32)
        out = run_kernel("""
extern "C" __global__ void k(const float* x, float* y, GcDims gd) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  float v = __shfl_xor_sync(0xffffffffu, x[t], 1);
  __syncthreads();
  y[t] = v + (float)threadIdx.x;
}""", [x], (2 * block,), block=block, grid=2)
        t = np.arange(2 * block)
        np.testing.assert_array_equal(out, x[t ^ 1] + (t % block).astype(np.float32))


def test_libraries_link_with_gold_where_the_compiler_can(monkeypatch):
    import importlib
    import shutil
    B = importlib.import_module("graphc.backends.cuda_emulated.build")   # (the package's `build` is the function)
    cxx = B.compiler()
    monkeypatch.setattr(B, "_linker", {})
    assert B.link_flags(cxx) == (["-fuse-ld=gold"] if shutil.which("ld.gold") else [])
    monkeypatch.setattr(B, "_linker", {})
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    assert B.link_flags(cxx) == []


def test_reductions_from_several_threads_at_once(rng):
    """Fibers belong to the OS thread that launched them: concurrent calls do not mix."""
    x = gc.placeholder("x", (None, 300))
    f = gc.function([x], gc.softmax(x, axis=1).max(axis=1) + x.sum(axis=1), backend="cuda-emulated")
    xs = [rng.standard_normal((8, 300)).astype(np.float32) for _ in range(4)]
    want = [gc.function([x], gc.softmax(x, axis=1).max(axis=1) + x.sum(axis=1))(a) for a in xs]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = f(xs[i])
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for g, w in zip(got, want):
        assert_close(g, w, backend="cuda-emulated")


def test_host_fallback_is_listed_and_correct(rng):
    a = gc.placeholder("a", (3, 3), "float64")
    b = gc.placeholder("b", (3,), "float64")
    f = gc.function([a, b], gc.solve(a, b) * 2, backend="cuda-emulated")
    assert f.program.info["fallback_ops"] == ["solve"]
    am = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    bv = rng.standard_normal(3)
    assert_close(f(am, bv), np.linalg.solve(am, bv) * 2, backend="cuda-emulated")


GRAD_GRAPHS = {  # gradient graphs whose kernels the op table's forward cases do not reach
    "index_grad": lambda x: gc.grad((x[1:, ::2] ** 2).sum() + x[-1, 0], x),
    "take_grad_repeats": lambda x: gc.grad((gc.take(x, gc.constant(np.array([0, 2, 2, -1])), 1) ** 2).sum(), x),
    "softmax_grad": lambda x: gc.grad((gc.softmax(x, axis=0) * x).sum(), x),
    "max_grad_ties": lambda x: gc.grad(gc.max(gc.floor(x), axis=1).sum(), x) + gc.grad(gc.prod(x, axis=0).sum(), x),
    "pool_grads": lambda x: gc.grad((gc.max_pool2d(gc.reshape(x, (1, 1, 6, 4)), 2, 1) ** 2).sum(), x),
}


@pytest.mark.parametrize("name", GRAD_GRAPHS)
def test_gradient_graph_kernels(name, rng):
    x = gc.placeholder("x", (6, 4), "float32")
    out = GRAD_GRAPHS[name](x)
    xs = rng.uniform(-2, 2, (6, 4)).astype(np.float32)
    f = gc.function([x], out, backend="cuda-emulated")
    assert f.program.info["fallback_ops"] == []
    assert_close(f(xs), gc.function([x], out)(xs), backend="cuda-emulated")


# ---- models: forward and training steps (gradient graphs + updates) vs the NumPy backend ---------------

def _train_compare(model, x, y, steps=2, loss_fn=None, rtol=2e-4, atol=2e-5):
    """Same initial parameters, a few Adam steps on each backend: losses and parameters agree."""
    xp = gc.placeholder("x", (None,) + x.shape[1:], x.dtype.name)
    yp = gc.placeholder("y", (None,) + y.shape[1:], y.dtype.name)
    out = model(xp)
    out = out[0] if isinstance(out, tuple) else out
    loss = (loss_fn or gc.losses.cross_entropy)(out, yp)
    opt = gc.optim.Adam(1e-2)
    upd = opt.updates(loss, model.params)
    fs = {b: gc.function([xp, yp], [loss, out], updates=upd, backend=b) for b in ("numpy", "cuda-emulated")}
    params = fs["numpy"].graph.parameters
    start = [p.get_value() for p in params]
    res = {}
    for b, f in fs.items():
        for p, v in zip(params, start):
            p.set_value(v)
        res[b] = ([f(x, y) for _ in range(steps)], [p.get_value() for p in params])
    (steps_np, p_np), (steps_em, p_em) = res["numpy"], res["cuda-emulated"]
    for a, e in zip(steps_em, steps_np):
        for u, v in zip(a, e):
            np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)
    for u, v in zip(p_em, p_np):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)
    return fs["cuda-emulated"]


def test_mlp_forward_and_training_step(rng):
    model = gc.nn.Sequential(gc.nn.Dense(20, 32, seed=0), gc.relu, gc.nn.Dense(32, 16, seed=1), gc.tanh,
                             gc.nn.Dense(16, 5, seed=2))
    x = rng.standard_normal((24, 20)).astype(np.float32)
    y = rng.integers(0, 5, 24)
    f = _train_compare(model, x, y)
    assert f.program.info["fallback_ops"] == []
    assert {"matmul", "reduce", "fused"} <= set(f.program.info["kernels"].values())


def test_lenet_forward_and_training_step(rng):
    nn = gc.nn
    model = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), gc.relu, nn.MaxPool2D(2),
                          nn.Conv2D(4, 8, 3), gc.relu, nn.MaxPool2D(2), nn.Flatten(), nn.Dense(8 * 2 * 2, 10))
    x = rng.standard_normal((6, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    f = _train_compare(model, x, y)
    assert f.program.info["fallback_ops"] == []
    assert {"conv", "pool"} <= set(f.program.info["kernels"].values())


def test_lstm_forward_and_training_step(rng):
    """The LSTM's scan (and its back-propagation-through-time scan) run their step bodies as kernels."""
    lstm = gc.nn.LSTM(3, 8)
    head = gc.nn.Dense(8, 4, seed=0)

    class Model:
        params = lstm.params + head.params

        def __call__(self, x):
            seq, _ = lstm(x)
            return head(seq[:, -1])
    x = rng.standard_normal((5, 6, 3)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    f = _train_compare(Model(), x, y)
    assert f.program.info["fallback_ops"] == []
    assert f.program.info["plan_text"].count("loop scan over") == 2


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_the_emulation(capsys):
    """benchmarks/cuda_check.py's checks (W1-W5 vs NumPy) pass when pointed at the emulation."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "cuda_check.py"
    spec = importlib.util.spec_from_file_location("cuda_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--backend", "cuda-emulated", "--quick", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("ok  ") == 7
    assert mod.main(["--backend", "cuda"]) == (0 if "cuda" in gc.available_backends() else 2)


def test_out_of_range_index_inside_a_scan_body_raises():
    """The status word is shared with scan bodies: a bad index in any step names the node's line."""
    x = gc.placeholder("x", (4, 3))
    i = gc.placeholder("i", (2,), "int64")
    c, _ = gc.scan(lambda c, xt: (c + gc.take(xt, i), c), gc.zeros_like(x[0, :2]), x)
    f = gc.function([x, i], c, backend="cuda-emulated")
    np.testing.assert_array_equal(f(np.ones((4, 3), np.float32), np.array([0, -1])), [4, 4])
    with pytest.raises(gc.GraphcError, match="IndexError in take at run time") as e:
        f(np.ones((4, 3), np.float32), np.array([0, 3]))
    assert "test_cuda_emulated.py" in str(e.value)


def test_lenet_with_batchnorm_groups_avgpool_and_dropout_trains_without_host_fallback(rng):
    """The issue's LeNet step: grouped conv, both conv gradients, BatchNorm, both poolings and their
    gradients, Dropout's random draw and Adam all run as kernels, and agree with the NumPy backend.
    (No bias before BatchNorm: its gradient is rounding noise, which Adam would normalise to +-lr.)"""
    nn = gc.nn
    model = nn.Sequential(nn.Conv2D(2, 4, 3, padding=1, bias=False, seed=0), nn.BatchNorm2D(4), gc.relu,
                          nn.Conv2D(4, 4, 3, groups=2, seed=1), nn.MaxPool2D(2), nn.AvgPool2D(2), nn.Flatten(),
                          nn.Dropout(0.3, seed=2), nn.Dense(4 * 2 * 2, 3, seed=3))
    x = rng.standard_normal((4, 2, 12, 12)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    f = _train_compare(model, x, y)
    assert f.program.info["fallback_ops"] == []
    assert "HOST FALLBACK" not in f.program.info["plan_text"]
    assert {"conv", "pool", "random"} <= set(f.program.info["kernels"].values())


# ---- the lowering table (backends/cuda/lower.py) and scan bodies as the pipeline leaves them ---------

def _compile_with(lowering, inputs, outputs):
    """Compile through cuda-emulated with another lowering table (a subclass of its own)."""
    from graphc.backends.cuda_emulated import CudaEmulatedBackend
    backend = CudaEmulatedBackend()
    backend.lowering = lowering
    graph = gc.function(inputs, outputs).graph  # the optimised graph (numpy's compile is not used)
    return backend.compile(graph, None)


def test_the_table_is_keyed_by_op_and_emulation_inherits_it():
    from graphc.backends.cuda import BACKEND as CUDA
    from graphc.backends.cuda.lower import CudaSchedule
    from graphc.backends.cuda_emulated import BACKEND as EMU, EmulatedSchedule
    from graphc.backends.schedule.plan import Schedule
    from graphc.ir import OPS, Trait
    assert issubclass(EmulatedSchedule, CudaSchedule) and issubclass(CudaSchedule, Schedule)
    assert EMU.lowered_ops() == CUDA.lowered_ops() == frozenset(CudaSchedule.rows())
    for op in CUDA.lowered_ops():
        assert isinstance(op, gc.Op)
        # an elementwise op is lowered exactly when it has a C spelling
        assert not op.has(Trait.ELEMENTWISE) or op in CudaSchedule.C_CODE, op.name
    assert OPS["solve"] not in CUDA.lowered_ops()  # host_only: stays on the host, reported as a fallback


def test_a_subclass_overrides_a_spelling(rng):
    from graphc.backends.cuda_emulated import EmulatedSchedule
    tanh = gc.ops.elementwise.tanh.op

    class Spelled(EmulatedSchedule):
        C_CODE = {**EmulatedSchedule.C_CODE, tanh: "(2 / (1 + exp(-2 * {0})) - 1)"}
    x = gc.placeholder("x", (5, 7))
    prog = _compile_with(Spelled, [x], [gc.tanh(x) * 3 + 1])
    assert "(2 / (1 + exp(-2 *" in prog.source and prog.info["fallback_ops"] == []
    xs = rng.uniform(-3, 3, (5, 7)).astype(np.float32)
    assert_close(prog.run([xs], [], {})[0][0], np.tanh(xs) * 3 + 1, backend="cuda-emulated")
    assert EmulatedSchedule.C_CODE[tanh] == "tanh({0})"  # the inherited table is untouched


def test_an_op_missing_from_the_table_runs_on_the_host_and_is_reported(rng):
    """Without its row an elementwise op (even inside a fused group) falls back, and says so."""
    from graphc.backends.cuda_emulated import EmulatedSchedule
    tanh = gc.ops.elementwise.tanh.op

    class Missing(EmulatedSchedule):
        C_CODE = {op: s for op, s in EmulatedSchedule.C_CODE.items() if op is not tanh}
    assert tanh not in Missing.rows()
    x = gc.placeholder("x", (5, 7))
    prog = _compile_with(Missing, [x], [gc.tanh(x * 2) + x])
    assert prog.info["fallback_ops"] == ["tanh"]
    xs = rng.uniform(-3, 3, (5, 7)).astype(np.float32)
    assert_close(prog.run([xs], [], {})[0][0], np.tanh(xs * 2) + xs, backend="cuda-emulated")


def _scan_with_body(fn, init, xs, level):
    """gc.scan(fn, init, xs) whose body is optimised at `level` (as the pipeline hands it over)."""
    from graphc.ir import make_node
    from graphc.passes import optimize
    carry, ys = gc.scan(fn, init, xs)
    node = ys.node
    body = optimize(node.attrs["body"], level=level) if level else node.attrs["body"]
    new = make_node(node.op, node.inputs, {**node.attrs, "body": body})
    return new.outputs[0], new.outputs[1], body


@pytest.mark.parametrize("level", [0, 2])
def test_scan_body_lowered_at_the_level_it_arrives(level, rng):
    """cuda no longer re-optimises scan bodies: an unoptimised body (unfused ops, a stop_gradient,
    scalar constants) and a fused one both lower natively and agree with the reference."""
    x = gc.placeholder("x", (6, 4, 3))
    w = gc.placeholder("w", (3, 3))
    h0 = gc.placeholder("h0", (4, 3))

    def step(h, xt):
        z = gc.tanh(xt @ w + gc.stop_gradient(h) * 0.5) + 1.0
        return z * 0.25 - h * 0.1, gc.sum(gc.exp(-z * z), axis=1)
    hN, ys, body = _scan_with_body(step, h0, x, level)
    names = " ".join(body.op_names())
    assert ("fused[" in names) == (level == 2), names
    xs = rng.standard_normal((6, 4, 3)).astype(np.float32)
    ws = rng.standard_normal((3, 3)).astype(np.float32)
    hs = rng.standard_normal((4, 3)).astype(np.float32)
    want = gc.evaluate([hN, ys], {x: xs, w: ws, h0: hs})
    f = gc.function([x, w, h0], [hN, ys], backend="cuda-emulated", optimize=0)
    assert f.program.info["fallback_ops"] == []
    kinds = [k for k in f.program.info["kernels"].values() if k != "copy"]   # copies: the loop's carries, ys
    if level == 0:  # one kernel per op
        assert "elementwise" in kinds and "fused" not in kinds, kinds
    else:  # the GEMM with its elementwise epilogue, the reduction with its prologue
        assert sorted(kinds) == ["matmul", "reduce"], kinds
    for got, ref in zip(f(xs, ws, hs), want):
        assert_close(got, ref, backend="cuda-emulated")
