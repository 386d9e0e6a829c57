"""The cuda backends' memory plan: the shared schedule's arena buffers placed per set of dim values by
the shared planner (Schedule.layout -> graphc.backends.schedule.arena), reused between calls, grown for
a bigger batch, one per thread on the emulation; checked against lifetimes recomputed here from the
schedule's steps. Also the shared name generator and status codes as cuda uses them. The device
runtime's arena policy runs here against a fake driver (no GPU needed)."""
from __future__ import annotations

import ctypes
import re
import threading

import numpy as np
import pytest

import graphc as gc
from graphc.backends.cuda.executor import Memory
from graphc.backends.schedule.status import StatusCodes
from graphc.backends.schedule.steps import HostStep, LoopStep
from conftest import backend_or_skip


def _uses(plan, step) -> set:
    """The buffers a step touches, read off the step itself (a loop: everything its body touches, and
    the parents of its slices), independent of the schedule's own lifetimes."""
    if isinstance(step, HostStep):
        out = {v.buf for v in step.ins + step.outs if v.buf is not None}
    elif isinstance(step, LoopStep):
        out = set().union(*[_uses(plan, st) for st in step.body]) if step.body else set()
    else:
        out = set(step.args)
    for b in list(out):   # a slice keeps its parent live
        while plan.buffers[b].kind == "slice":
            b = plan.buffers[b].index
            out.add(b)
    return out


def check_layout(plan, lay) -> int:
    """No two arena buffers in use at a common top-level step share a byte; every arena buffer a step
    touches is placed (inputs, parameters, constants and outputs are not in the arena). Returns the
    number of pairs that share memory (the arena being used)."""
    steps = {}
    for k, st in enumerate(plan.steps):
        for b in _uses(plan, st):
            steps.setdefault(b, []).append(k)
    regions = {}
    for b, ks in steps.items():
        buf = plan.buffers[b]
        assert (b in lay.offsets) == (buf.kind == "arena"), (b, buf)
        if b in lay.offsets:
            first, last = min(ks), max(ks)
            if plan.status is not None and b == plan.status.buf:
                first, last = 0, len(plan.steps)
            regions[b] = (first, last, lay.offsets[b], max(lay.nbytes[b], 1))
    shared = 0
    items = list(regions.items())
    for i, (a, (f1, l1, o1, n1)) in enumerate(items):
        assert o1 % 64 == 0 and o1 + n1 <= max(lay.total, 1)
        for b, (f2, l2, o2, n2) in items[:i]:
            if f1 <= l2 and f2 <= l1:
                assert o1 + n1 <= o2 or o2 + n2 <= o1, f"{a} and {b} are live at once and overlap"
            elif o1 < o2 + n2 and o2 < o1 + n1:
                shared += 1
    return shared


def _mlp_step(batch_dim=None):
    gc.init.seed(0)
    model = gc.nn.Sequential(gc.nn.Dense(6, 32, seed=0), gc.relu, gc.nn.Dense(32, 16, seed=1), gc.tanh,
                             gc.nn.Dense(16, 3, seed=2))
    x = gc.placeholder("x", (batch_dim, 6))
    y = gc.placeholder("y", (batch_dim,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    return [x, y], loss, model.params


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


@pytest.fixture(autouse=True)
def _emulated():
    backend_or_skip("cuda-emulated")


def test_training_step_arena_is_smaller_than_its_temporaries_and_never_overlaps_live_buffers():
    inputs, loss, params = _mlp_step()
    f = gc.function(inputs, loss, updates=gc.optim.Adam(1e-2).updates(loss, params), backend="cuda-emulated")
    ref_in, ref_loss, ref_params = _mlp_step()
    ref = gc.function(ref_in, ref_loss, updates=gc.optim.Adam(1e-2).updates(ref_loss, ref_params))
    for step in range(3):
        np.testing.assert_allclose(f(*_data(10, step)), ref(*_data(10, step)), rtol=1e-5)
    for p, q in zip(params, ref_params):
        np.testing.assert_allclose(p.get_value(), q.get_value(), rtol=1e-4, atol=1e-6)
    plan = f.program.info["plan"]
    (lay,) = plan.layouts
    assert 0 < lay.total < lay.temps_bytes
    assert check_layout(plan, lay) > 0   # some temporaries do share memory


def test_a_bigger_batch_grows_the_arena_and_a_smaller_one_reuses_it():
    x = gc.placeholder("x", (None, 8))
    W = gc.parameter("W", np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32))
    h = gc.tanh(x @ W)
    out = gc.sum(gc.softmax(h @ W + h, axis=-1) * h, axis=1)
    f = gc.function([x], out, backend="cuda-emulated")
    ref = gc.function([x], out)
    mem, plan = f.program.info["memory"], f.program.info["plan"]
    sizes = []
    for n in (3, 50, 3, 50, 7):
        a = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
        np.testing.assert_allclose(f(a), ref(a), rtol=1e-5, atol=1e-6)
        sizes.append(mem._arenas.arena[0])
    small, big = (min(ly.total for ly in plan.layouts), max(ly.total for ly in plan.layouts))
    assert small < big and sizes == [small, big, big, big, big]
    for lay in plan.layouts:
        check_layout(plan, lay)


def test_concurrent_calls_with_different_batches_each_get_their_own_arena():
    x = gc.placeholder("x", (None, 16), "float64")
    W = gc.parameter("W", np.random.default_rng(0).standard_normal((16, 16)))
    h = gc.tanh(x @ W)
    f = gc.function([x], gc.exp(-(h @ W) ** 2) + gc.sigmoid(h) * h, backend="cuda-emulated")
    bases, errors = set(), []

    def work(i):
        try:
            rng = np.random.default_rng(i)
            for _ in range(25):
                a = rng.standard_normal((int(rng.integers(1, 40)), 16))
                hh = np.tanh(a @ W.value)
                np.testing.assert_allclose(f(a), np.exp(-(hh @ W.value) ** 2) + hh / (1 + np.exp(-hh)),
                                           rtol=1e-10, atol=1e-12)
            bases.add(f.program.info["memory"]._arenas.arena[1].ctypes.data)
        except Exception as e:  # an assertion in a thread must fail the test
            errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert len(bases) == 2


def test_scan_body_temporaries_have_their_own_arena_inside_the_loop_step():
    """An LSTM-like recurrence whose body writes its new carries while the old ones are still read:
    the body reads its carries from the history, so its outputs may share the body's arena."""
    x = gc.placeholder("x", (None, 5, 3))
    Wx = gc.parameter("Wx", np.random.default_rng(0).normal(0, 0.5, (3, 4)).astype(np.float32))
    Wh = gc.parameter("Wh", np.random.default_rng(1).normal(0, 0.5, (4, 4)).astype(np.float32))

    def step(carry, xt):
        h, c = carry
        a = gc.tanh(xt @ Wx)            # temporaries written before the carries are read: in the arena,
        b = gc.sigmoid(a @ Wh)          # they may take the place of the last step's outputs
        h2 = gc.tanh(b @ Wh + h)
        c2 = c * b + h2
        return (h2, c2), h2 * 2.0
    h0 = gc.zeros_like(x[:, 0, :]) @ gc.zeros_like(Wx)
    (h, c), ys = gc.scan(step, (h0, h0 + 1.0), gc.transpose(x, (1, 0, 2)))
    outs = [h, c, ys]
    f = gc.function([x], outs, backend="cuda-emulated")
    ref = gc.function([x], outs)
    for n in (2, 6):
        a = np.random.default_rng(n).standard_normal((n, 5, 3)).astype(np.float32)
        for g, w in zip(f(a), ref(a)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    plan = f.program.info["plan"]
    loops = [s for s in plan.steps if isinstance(s, LoopStep)]
    assert loops and f.program.info["fallback_ops"] == []
    for lay in plan.layouts:
        check_layout(plan, lay)
        body = _uses(plan, loops[0])   # the body's temporaries are in the arena, live for the loop step
        assert any(b in lay.offsets for b in body)


def test_temporaries_written_by_a_host_step_land_in_the_arena():
    """solve is host-only: its result is written into its place in the arena, then read by kernels."""
    A = gc.placeholder("A", (4, 4), "float64")
    b = gc.placeholder("b", (4, 2), "float64")
    from graphc.ops.linalg_solve import solve
    out = gc.exp(solve(A * 2.0, b) * 0.5) + 1.0
    f = gc.function([A, b], out, backend="cuda-emulated")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    bb = rng.standard_normal((4, 2))
    np.testing.assert_allclose(f(a, bb), np.exp(np.linalg.solve(a * 2, bb) * 0.5) + 1, rtol=1e-12)
    plan = f.program.info["plan"]
    host = [s for s in plan.steps if isinstance(s, HostStep)]
    assert host and any(o.buf in plan.layouts[0].offsets for s in host for o in s.outs)
    check_layout(plan, plan.layouts[0])


def test_buffer_names_never_take_a_kernel_local_or_a_c_function():
    names = ["a0", "a1", "v0", "r_c0", "i", "exp", "x", "x", "a", "a", "k0_add", "gc_status"]
    xs = [gc.placeholder(n, (3,)) for n in names]
    out = xs[0]
    for k, t in enumerate(xs[1:]):
        out = out * 0.5 + gc.exp(t) * (k + 1)
    idx = gc.placeholder("a", (2,), "int64")
    f = gc.function(xs + [idx], [out, gc.take(xs[0], idx)], backend="cuda-emulated")
    arrays = [np.full(3, k / 10, np.float32) for k in range(len(xs))]
    want = arrays[0]
    for k, a in enumerate(arrays[1:]):
        want = want * 0.5 + np.exp(a) * (k + 1)
    got, taken = f(*arrays, np.array([2, -1]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(taken, arrays[0][[2, -1]])
    plan = f.program.info["plan"]
    buf_names = [plan.cname(b) for b in range(len(plan.buffers))]
    assert len(set(buf_names)) == len(buf_names)
    assert not {"a0", "a1", "v0", "r_c0", "i", "exp"} & set(buf_names)


def test_status_codes_name_the_node_and_its_line():
    x = gc.placeholder("x", (5,))
    i = gc.placeholder("i", (2,), "int64")
    y = gc.take(x, i) * 2.0
    f = gc.function([x, i], y, backend="cuda-emulated")
    codes = f.program.info["plan"].status_codes
    assert isinstance(codes, StatusCodes) and len(codes) == 1 and codes[1][0].op.name == "take"
    with pytest.raises(gc.GraphcError, match=r"IndexError in take at run time(.|\n)*test_cuda_arena.py"):
        f(np.arange(5, dtype=np.float32), np.array([0, 5]))
    np.testing.assert_allclose(f(np.arange(5, dtype=np.float32), np.array([4, -5])), [8, 0])
    assert "unknown status code 7" in str(codes.error(7))


# ---- the device runtime's arena, against a fake driver ---------------------------------------------

class _FakeDriver:
    """The few libcuda entry points DeviceMemory's arena uses, on host memory."""

    def __init__(self):
        self.live, self.log = {}, []

    def cuMemAlloc_v2(self, ptr, size):
        buf = ctypes.create_string_buffer(size.value)
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint64))[0] = ctypes.addressof(buf)
        self.live[ctypes.addressof(buf)] = buf
        self.log.append(("alloc", size.value))
        return 0

    def cuMemFree_v2(self, p):
        del self.live[p.value]
        self.log.append(("free", p.value))
        return 0


def test_device_arena_is_allocated_once_and_grown_for_a_bigger_batch():
    from graphc.backends.cuda.runtime import DeviceMemory
    lib = _FakeDriver()
    mod = type("Module", (), {"lib": lib})()
    mem = DeviceMemory(mod)
    a = mem.arena(1000)
    assert mem.arena(10) == a and mem.arena(1000) == a and lib.log == [("alloc", 1000)]
    b = mem.arena(5000)
    assert lib.log == [("alloc", 1000), ("free", a), ("alloc", 5000)] and list(lib.live) == [b]
    assert mem.temp(b, 128, 64) == b + 128 and mem.sub(b + 128, 8, 4) == b + 136


def test_memory_arena_policy_per_function_or_per_thread():
    class Fake(Memory):
        def __init__(self, per_thread):
            self.per_thread_arena = per_thread
            super().__init__()
            self.made = []

        def new_arena(self, nbytes):
            self.made.append(nbytes)
            return len(self.made)
    shared, own = Fake(False), Fake(True)
    got = {}

    def work(k):
        got[k] = (shared.arena(100), own.arena(100))
    for k in range(2):
        t = threading.Thread(target=work, args=(k,))
        t.start()
        t.join()
    assert got[0][0] == got[1][0] and shared.made == [100]
    assert got[0][1] != got[1][1] and own.made == [100, 100]


def test_names_with_a_pattern_of_reserved_words_never_loop_or_collide():
    from graphc.backends.cuda.lower import CudaSchedule
    from graphc.names import Names
    reserved = re.compile(r"^([abcevr]\d+|r_.*|exp|i)$")
    names = Names(lambda n: bool(reserved.match(n)))
    got = [names(h) for h in ["a", "a", "a", "r_x", "r_x", "exp", "exp", "i", "a1", "v0"]]
    assert len(set(got)) == len(got) and not any(reserved.match(n) for n in got)
    assert got[:3] == ["a", "t_a", "t_a1"] and got[3] == "t_r_x" and got[5] == "exp_"
    # the cuda lowering's own predicate: kernel locals and the C functions of its spellings
    lw = CudaSchedule(gc.Graph([], []))
    picked = [lw.names(h) for h in ["a0", "a0", "tanh", "r_c0", "n"]]
    assert len(set(picked)) == 5 and not {"a0", "tanh", "r_c0", "n"} & set(picked)
