"""f.explain() and `graphc explain FILE`: a row for every kernel (llvm plan steps, numpy nodes), FLOPs
and bytes from shapes, the roofline from the host's cached peaks, per-step times that add up to the
measured call, and the fusion pass's reasons for neighbours left unfused. Times are only compared with
each other, loosely (the machine is shared); no speed is asserted."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest

import graphc as gc
from graphc import explain as EX
from graphc.ir import Trait

from conftest import backend_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import systems, workloads as W  # noqa: E402

BACKENDS = ["numpy", "llvm"]


def _mlp(backend, n_in=64, hidden=48, n_out=10):
    rng = np.random.default_rng(0)
    w0 = gc.parameter("w0", (rng.standard_normal((n_in, hidden)) * 0.1).astype(np.float32))
    b0 = gc.parameter("b0", np.zeros(hidden, np.float32))
    w1 = gc.parameter("w1", (rng.standard_normal((hidden, n_out)) * 0.1).astype(np.float32))
    x = gc.placeholder("x", (None, n_in))
    return gc.function([x], gc.softmax(gc.relu(x @ w0 + b0) @ w1, axis=-1), backend=backend)


def _compute_nodes(f):
    return [n for n in f.graph.compute_nodes() if not n.op.has(Trait.CONST)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_cover_every_kernel_with_flops_bytes_and_roofline(backend):
    backend_or_skip(backend)
    f = _mlp(backend)
    e = f.explain(N=8, repeat=3)
    if backend == "llvm":
        spec = f.program._specs[(("N", 8),)]
        assert len(e.rows) == len(spec.plan.steps) and all(r.measured is not None for r in e.rows)
    else:
        assert {id(r.node) for r in e.rows if r.node is not None} == {id(n) for n in _compute_nodes(f)}
    by_node = {}
    for r in e.rows:   # (llvm's prologue steps, a weight packed once: no work per call)
        if r.ops.startswith("(once per new weight) "):
            assert r.flops == r.bytes == 0 and r.measured == 0.0
            continue
        by_node.setdefault(id(r.node), []).append(r)
    first = next(rs for rs in by_node.values() if rs[0].ops == "matmul+add+relu")
    assert sum(r.flops for r in first) == 2 * 8 * 64 * 48 + 2 * 8 * 48   # 2 M N K of x @ w0, + b0, relu
    p = e.peaks
    for r in e.rows:
        assert r.predicted == max(r.flops / p["gemm_flops"], r.bytes / p["copy_Bps"])
        assert r.bound in ("compute", "memory", "overhead")
    text = str(e)
    assert "roofline" in text and "measured" in text and "call" in text and p["cpu"] in text
    for i, r in enumerate(e.rows):
        assert f"\n{i} " in text or f"\n{i}  " in text
    # matmul -> softmax: the fusion pass's reason is shown
    assert "softmax is not elementwise" in text


def test_numpy_bytes_are_inputs_plus_outputs():
    f = _mlp("numpy")
    e = f.explain(N=4, repeat=3)
    sm = next(r for r in e.rows if r.ops == "softmax")
    assert sm.flops == 4 * 10 and sm.bytes == 2 * 4 * 10 * 4


def _steps_add_up(e) -> bool:
    return 0.3 * e.call_s - 50e-6 <= e.steps_s <= 1.5 * e.call_s + 50e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_times_add_up_to_the_call(backend):
    """A call dominated by its kernels (MLP, batch 256): the steps' medians sum to the measured call
    within a loose margin (noise on a shared machine; three tries)."""
    backend_or_skip(backend)
    f = _mlp(backend, n_in=256, hidden=256)
    for _ in range(3):
        e = f.explain(N=256, repeat=5)
        if _steps_add_up(e):
            break
    assert _steps_add_up(e), (e.steps_s, e.call_s)
    assert abs(e.steps_s + e.overhead_s - e.call_s) < 1e-12


def test_negative_call_overhead_is_reported_as_noise():
    """Steps timed one by one can add up to more than a whole call on a noisy machine: the table says so
    instead of printing a negative overhead."""
    backend_or_skip("numpy")
    f = _mlp("numpy", n_in=16, hidden=16)
    e = f.explain(N=4, repeat=2)
    e.overhead_s = -172e-6
    text = str(e)
    assert "not resolved: the steps timed one by one sum to 172.0 us more than a call (noise)" in text
    assert "-172" not in text
    e.overhead_s = 3e-6
    assert "argument checks, call into the program, outputs" in str(e)


def _tiny_runs():
    """(id, zero-argument call carrying .function and .args) for W1-W10 at tiny sizes, both backends."""
    out = []
    for wl in W.selected_workloads("tiny"):
        if any(n.startswith("missing") for n in wl.notes):
            continue
        out.append(wl)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_on_every_benchmark_workload(backend):
    """W1-W10 at tiny sizes: rows for every kernel, times that do not exceed the call by much, trained
    parameters left as they were."""
    backend_or_skip(backend)
    for wl in _tiny_runs():
        run = systems.graphc_builder(backend, 2)(wl)
        f, args = run.function, run.args
        before = [p.value.copy() for p, _ in f.graph.updates]
        for _ in range(3):   # a load spike on the shared machine can hit the steps and not the calls
            e = f.explain(*args, repeat=3)
            if e.steps_s <= 3 * e.call_s + 200e-6:
                break
        assert e.rows, wl.id
        if backend == "llvm":
            spec = f.program._last
            assert len(e.rows) == len(spec.plan.steps), wl.id
        else:
            have = {id(r.node) for r in e.rows}
            assert all(id(n) in have for n in _compute_nodes(f)), wl.id
        assert e.steps_s <= 3 * e.call_s + 200e-6, (wl.id, e.steps_s, e.call_s)
        for (p, _), v in zip(f.graph.updates, before):
            np.testing.assert_array_equal(p.value, v, err_msg=f"{wl.id}: explain left {p.name} changed")
        assert str(e)


def test_llvm_rows_name_loops_and_host_steps():
    backend_or_skip("llvm")
    run = systems.graphc_builder("llvm", 2)(W.w4("tiny"))
    e = run.function.explain(*run.args, repeat=3)
    loop = [r for r in e.rows if r.kernel == "loop"]
    assert loop and loop[0].ops.startswith("scan x5[")
    T, N, H = 5, 3, 6
    assert loop[0].flops >= T * 2 * N * H * 4 * H   # at least the recurrent GEMMs of every step
    # bytes: the weights once, each step's (N, 4H) slice of the transposed projection once per step (not
    # the span of a step's rows across the whole (N, T, 4H) buffer, which would count it T times over)
    C = 4
    assert loop[0].bytes <= 4 * (H * 4 * H + T * N * 4 * H + 16 * N * H) + 4 * (C * 4 * H + 4 * 4 * H), loop[0].bytes


@pytest.mark.parametrize("level, bits", [("", None), ("sse", 128)])
def test_llvm_header_names_the_code_level(monkeypatch, level, bits):
    """The table's head says which ISA level and vector width the code was generated for (the host's, or
    GRAPHC_LLVM_ISA's narrower one) and the thread count."""
    backend_or_skip("llvm")
    from graphc.backends.llvm import tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", level)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    x = gc.placeholder("x", (3, 4))
    f = gc.function([x], gc.exp(x) + 1, backend="llvm")
    text = str(f.explain(np.ones((3, 4), np.float32), repeat=2))
    want = f"code: {tune.isa()}, {bits or tune.vector_bits()}-bit vectors, 1 thread\n"
    assert want in text, text


def test_no_profile_backend_gives_predictions_and_a_measured_call():
    x = gc.placeholder("x", (3, 4))
    f = gc.function([x], gc.exp(x) * 2.0, mode="debug")
    e = f.explain(repeat=3)
    assert e.rows and all(r.measured is None for r in e.rows) and e.call_s > 0 and e.steps_s is None
    assert "no per-step profile" in str(e)


def test_peaks_are_measured_once_per_cpu_and_cached(tmp_path):
    code = ("import graphc.explain as E, json; p = E.host_peaks(); "
            "print(json.dumps({'cached': p['cached'], 'cpu': p['cpu'], 'g': p['gemm_flops'], 'b': p['copy_Bps']}))")
    env = dict(os.environ, GRAPHC_CACHE_DIR=str(tmp_path))
    outs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      cwd=ROOT, check=True).stdout) for _ in range(2)]
    assert outs[0]["cached"] is False and outs[1]["cached"] is True
    assert outs[0]["g"] == outs[1]["g"] and outs[0]["g"] > 1e8 and outs[0]["b"] > 1e8
    assert outs[0]["cpu"] == EX.cpu_model()


# ---- the fusion pass's reasons --------------------------------------------------------------------------

def _reason(f, producer_op, consumer_op):
    from graphc.passes.fusion import unfused_reason
    g = f.graph
    readers = {}
    for n in g.nodes:
        for t in n.inputs:
            readers.setdefault(id(t), []).append(n)
    roots = {id(t) for t in g.roots}
    for n in g.nodes:
        if producer_op(n):
            for o in n.outputs:
                for u in readers.get(id(o), ()):
                    if consumer_op(u):
                        return unfused_reason(n, u, readers, roots)
    raise AssertionError("pair not found")


def test_reason_loop_shapes_differ():
    x = gc.placeholder("x", (4, 3))
    y = gc.sum(gc.exp(x), axis=1)
    f = gc.function([x], gc.tanh(y) * 2.0)
    def fused_with(op):
        return lambda n: n.op.name == "fused" and op in str(n.attrs["body"].op_names())
    assert "loop shapes differ" in _reason(f, fused_with("sum"), fused_with("tanh"))


def test_reason_gemm_result_read_twice():
    rng = np.random.default_rng(0)
    x = gc.placeholder("x", (4, 3))
    w = gc.parameter("w", rng.standard_normal((3, 5)).astype(np.float32))
    h = x @ w
    f = gc.function([x], [gc.relu(h), gc.tanh(h) * 3.0])
    why = _reason(f, lambda n: n.op.name == "matmul", lambda n: n.op.name in ("relu", "fused"))
    assert "read by 2 ops" in why and "only reader" in why


def test_reasons_do_not_change_fusion():
    """unfused_reason only reads the graph: the optimised graph is the same with or without explain."""
    f = _mlp("numpy")
    before = f.graph.op_names()
    f.explain(N=2, repeat=3)
    assert f.graph.op_names() == before


# ---- graphc explain FILE --------------------------------------------------------------------------------

def test_cli_explain_saved_model(tmp_path):
    from graphc.cli import main
    rng = np.random.default_rng(0)
    x = gc.placeholder("x", (None, 6))
    w = gc.parameter("w", rng.standard_normal((6, 4)).astype(np.float32))
    path = str(tmp_path / "m.graphc")
    gc.save(gc.Graph([x], [gc.relu(x @ w + 1.0)]), path)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["explain", path, "--shape", "x=5,6", "-b", "numpy", "-r", "3"])
    out = buf.getvalue()
    assert rc in (0, None) and "graphc explain" in out and "dims {'N': 5}" in out and "matmul" in out
    err = io.StringIO()
    from contextlib import redirect_stderr
    with redirect_stderr(err):
        rc = main(["explain", path, "--shape", "y=5,6", "-b", "numpy"])
    assert rc == 1 and "not inputs" in err.getvalue()


def test_llvm_step_profiler_reads_the_functions_own_arena():
    """The per-step profiler runs the steps over the function's own (this thread's) arena, so a weight the
    prologue packed is read from the one copy the timed calls read (a second copy doubled its share of
    the caches); the steps' results are the function's."""
    backend_or_skip("llvm")
    from graphc.backends.llvm.program import step_times
    rng = np.random.default_rng(1)
    w = gc.parameter("w", rng.standard_normal((300, 700)).astype(np.float32))
    x = gc.placeholder("x", (None, 300))
    f = gc.function([x], gc.relu(x @ w), backend="llvm")
    xv = rng.standard_normal((1, 300)).astype(np.float32)
    want = f(xv)
    spec = next(iter(f.program._specs.values()))
    steps, run, _ = step_times(spec, [xv], [w.value])
    table, outs, arena, _, _ = run.keep
    assert arena is spec._arena()
    run()
    np.testing.assert_array_equal(outs[0], want)
    np.testing.assert_array_equal(f(xv), want)


def test_llvm_rows_count_the_pools_late_dispatches(monkeypatch):
    """Row.late: the share of the profiled runs in which a step's dispatch over the pool was late (the pool's
    counter read around each step, program.step_times); steps late in at least LATE_SHARE of the runs are
    listed under the table. The counter is replaced here by one that moves on every read, so every step of a
    call reads as late in every run; one thread of a function, whose steps never dispatch, reads 0."""
    backend_or_skip("llvm")
    from graphc.backends.llvm import pool
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")
    f = _mlp("llvm")
    e = f.explain(N=8, repeat=3)
    calls = [r for r in e.rows if not r.ops.startswith("(once per new weight)")]
    assert calls and all(r.late is not None and 0.0 <= r.late <= 1.0 for r in calls)
    assert all(r.late is None for r in e.rows if r.ops.startswith("(once per new weight)"))
    assert all("late" in r.as_dict() for r in e.rows)
    ticks = iter(range(10 ** 9))
    monkeypatch.setattr(pool, "late_count", lambda: next(ticks))
    e = _mlp("llvm").explain(N=8, repeat=3)
    calls = [r for r in e.rows if not r.ops.startswith("(once per new weight)")]
    assert all(r.late == 1.0 for r in calls)
    text = str(e)
    assert "threads waited on" in text and all(f"#{e.rows.index(r)} {r.kernel}" in text for r in calls[:EX.MAX_NOTES])
    monkeypatch.setattr(pool, "late_count", lambda: 0)
    e = _mlp("llvm").explain(N=8, repeat=3)
    assert "threads waited on" not in str(e) and all(r.late == 0.0 for r in e.rows if r.late is not None)
