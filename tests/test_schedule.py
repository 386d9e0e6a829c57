"""The native backends' shared layer (graphc.backends.schedule): the arena planner against brute-force
overlap checks on random instances, the unique-name generator, and the on-disk cache's one policy
(content-addressed keys, checked entries, damaged entries ignored and replaced with one warning, a
private directory when GRAPHC_CACHE_DIR is unusable). No compiler needed."""
from __future__ import annotations

import builtins
import hashlib
import keyword
import os
import random
import re
import warnings

import numpy as np
import pytest

import graphc as gc
from graphc.backends.schedule import cache
from graphc.backends.schedule.arena import ArenaPlan, lower_bound, plan_arena
from graphc.names import Names
from conftest import backend_or_skip


# ---- arena ------------------------------------------------------------------------------------------

def check_plan(buffers, plan: ArenaPlan, align: int) -> None:
    """Independent checks: aligned, inside the arena, and no two buffers live at the same step share
    a byte (every pair compared)."""
    assert len(plan.offsets) == len(buffers)
    for (first, last, nbytes), off, slot in zip(buffers, plan.offsets, plan.slots):
        assert off % align == 0 and slot % align == 0 and slot >= max(nbytes, 1)
        assert 0 <= off and off + slot <= plan.total
    for i, (f1, l1, _) in enumerate(buffers):
        for j in range(i):
            f2, l2, _ = buffers[j]
            if f1 <= l2 and f2 <= l1:   # lifetimes intersect (inclusive)
                a, b = plan.offsets[i], plan.offsets[j]
                assert a + plan.slots[i] <= b or b + plan.slots[j] <= a, (i, j, buffers[i], buffers[j])


def first_fit_by_first_use(buffers, align: int) -> int:
    """The llvm backend's former planner, written out again here: the total the shared one must not exceed."""
    live, top = [], 0
    for first, last, nbytes in sorted(buffers, key=lambda b: b[0]):
        live = [x for x in live if x[2] >= first]
        size = -(-max(nbytes, 1) // align) * align
        off = 0
        for lo, hi, _ in sorted(live):
            if off + size <= lo:
                break
            off = max(off, hi)
        live.append((off, off + size, last))
        top = max(top, off + size)
    return top


def random_buffers(r: random.Random, n: int, steps: int, max_len: int, max_bytes: int):
    out = []
    for _ in range(n):
        first = r.randrange(steps)
        out.append((first, first + r.randrange(max_len), r.choice([0, r.randrange(1, 16), r.randrange(max_bytes)])))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_arena_random_instances_never_overlap(seed):
    r = random.Random(seed)
    align = r.choice([1, 8, 64])
    buffers = random_buffers(r, r.randrange(1, 80), r.randrange(1, 60), r.randrange(1, 30), 5000)
    plan = plan_arena(buffers, align)
    check_plan(buffers, plan, align)
    assert lower_bound(buffers, align) <= plan.total <= first_fit_by_first_use(buffers, align)
    assert plan.total <= sum(plan.slots)


@pytest.mark.parametrize("seed", range(12))
def test_arena_vectorised_gap_search_places_as_the_loop_does(seed, monkeypatch):
    """A block overlapping many others finds its gap with NumPy (arena.VECTOR_NEIGHBOURS): the same offsets
    as the Python walk, on long-lived buffers (a training step's activations) where most blocks take it."""
    from graphc.backends.schedule import arena
    r = random.Random(seed)
    align = r.choice([1, 8, 64])
    buffers = random_buffers(r, r.randrange(60, 400), r.randrange(20, 200), r.randrange(20, 200), 5000)
    monkeypatch.setattr(arena, "VECTOR_NEIGHBOURS", 1 << 30)
    loop = plan_arena(buffers, align)
    monkeypatch.setattr(arena, "VECTOR_NEIGHBOURS", r.choice([0, 3, 20]))
    vec = plan_arena(buffers, align)
    check_plan(buffers, vec, align)
    assert (vec.offsets, vec.total) == (loop.offsets, loop.total)


def test_arena_bound_is_reached_on_a_chain_and_shares_memory():
    # a chain: each buffer read by the next step only; two live at a time
    buffers = [(i, i + 1, 1000) for i in range(10)]
    plan = plan_arena(buffers, 64)
    check_plan(buffers, plan, 64)
    assert plan.total == 2 * 1024 == lower_bound(buffers, 64)
    # disjoint lifetimes: one slot for all
    assert plan_arena([(i, i, 100) for i in range(5)], 64).total == 128


def test_arena_packs_better_than_first_fit_where_it_can():
    # in first-use order the 64-byte buffer lands above the 192-byte one and the last, big one must go
    # above it (576 bytes); placed by size, the big one goes first at 0 and the bound (384) is reached
    buffers = [(4, 6, 320), (1, 2, 192), (2, 4, 64)]
    plan = plan_arena(buffers, 64)
    check_plan(buffers, plan, 64)
    assert plan.total == lower_bound(buffers, 64) < first_fit_by_first_use(buffers, 64)


def test_arena_locality_keeps_first_use_placement_unless_another_saves_enough():
    buffers = [(4, 6, 320), (1, 2, 192), (2, 4, 64)]   # first use: 576 bytes, by size: 384 (-33%)
    first = first_fit_by_first_use(buffers, 64)
    for locality, want in ((0.0, 384), (0.25, 384), (0.4, first), (0.9, first)):
        plan = plan_arena(buffers, 64, locality=locality)
        check_plan(buffers, plan, 64)
        assert plan.total == want, (locality, plan.total)


def test_arena_zero_sized_and_lifelong_buffers():
    buffers = [(0, 1 << 59, 8), (0, 0, 0), (0, 0, 0), (1, 2, 0)]
    plan = plan_arena(buffers, 64)
    check_plan(buffers, plan, 64)
    assert len({plan.offsets[0], plan.offsets[1], plan.offsets[2]}) == 3   # live together: distinct addresses
    assert plan_arena([], 64) == ArenaPlan([], 0, [])


@pytest.mark.parametrize("bad", [[(3, 2, 8)], [(0, 1, -1)]])
def test_arena_rejects_bad_lifetimes(bad):
    with pytest.raises(gc.GraphcError, match="arena buffer 0"):
        plan_arena(bad)
    with pytest.raises(gc.GraphcError, match="power of two"):
        plan_arena([(0, 1, 8)], 48)


def test_llvm_arena_is_planned_by_the_shared_planner():
    """An MLP step's arena on llvm: buffers live at the same step never overlap, and the result is right."""
    backend_or_skip("llvm")
    rng = np.random.default_rng(0)
    x = gc.placeholder("x", (16, 12))
    w1, w2 = gc.parameter("w1", rng.normal(size=(12, 32)).astype("f4")), gc.parameter("w2", rng.normal(size=(32, 5)).astype("f4"))
    h = gc.tanh(x @ w1)
    y = gc.sum(gc.softmax(h @ w2, axis=1) * gc.exp(-h @ w2), axis=1)
    f = gc.function([x], y, backend="llvm")
    a = rng.normal(size=(16, 12)).astype("f4")
    np.testing.assert_allclose(f(a), gc.function([x], y)(a), rtol=1e-5, atol=1e-6)
    (spec,) = f.program.info["specialisations"].values()
    arena = [b for b in spec.plan.buffers if b.kind == "arena" and b.last >= 0]
    assert len(arena) >= 2
    for i, b in enumerate(arena):
        assert b.offset % 64 == 0 and b.offset + b.nbytes <= spec.plan.arena_bytes
        for c in arena[:i]:
            if b.first <= c.last and c.first <= b.last:
                assert b.offset + max(b.nbytes, 1) <= c.offset or c.offset + max(c.nbytes, 1) <= b.offset


# ---- names ------------------------------------------------------------------------------------------

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def test_names_are_unique_valid_and_readable():
    r = random.Random(1)
    names = Names(set(keyword.kwlist) | set(dir(builtins)))
    hints = ["x", "x", "x1", "x", "", None, "1abc", "a b", "max", "sum", "é", "t", "t_1abc", "class", "x2"]
    hints += ["".join(r.choice("ab1_ .-") for _ in range(r.randrange(4))) for _ in range(300)]
    got = [names.fresh(h) for h in hints]
    assert len(set(got)) == len(got)
    assert all(IDENT.match(n) and not keyword.iskeyword(n) and n not in dir(builtins) for n in got)
    assert got[:10] == ["x", "x1", "x11", "x2", "t", "t1", "t_1abc", "a_b", "max_", "sum_"]
    assert got[11:15] == ["t2", "t_1abc1", "class_", "x21"]
    assert all(n in names for n in got)


def test_names_reserved_predicate_separator_and_reserve():
    names = Names(lambda n: n in ("exp", "exp_"), default="v", sep="_")
    names.reserve("a")
    assert [names("a"), names("a"), names("exp"), names(""), names(""), names("9")] == \
        ["a_1", "a_2", "exp__", "v", "v_1", "v_9"]


# ---- cache ------------------------------------------------------------------------------------------

@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache under tmp_path, with this process's once-only state reset."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "stats", dict.fromkeys(cache.stats, 0))
    monkeypatch.setattr(cache, "_warned", [])
    monkeypatch.setattr(cache, "_unusable", {})
    return tmp_path / "cache"


def test_keys_address_every_part():
    assert cache.key("ab", "c") != cache.key("a", "bc") != cache.key("abc")
    assert cache.key("src", "flags") == cache.key("src", "flags") != cache.key("src", "flags2")
    assert cache.key(b"\0x") != cache.key("\0", "x") and len(cache.key("x")) == 40


def test_tool_identity_changes_with_the_file(tmp_path):
    tool = tmp_path / "cc"
    tool.write_bytes(b"v1")
    a = cache.tool_identity(str(tool))
    tool.write_bytes(b"version 2")
    assert cache.tool_identity(str(tool)) != a and cache.tool_identity(None) == "none"


def test_blob_round_trip_and_layout(fresh):
    assert cache.load_blob("llvm", "k.o") is None and cache.stats["misses"] == 1
    cache.store_blob("llvm", "k.o", b"object code")
    raw = (fresh / "llvm" / "k.o").read_bytes()
    assert raw == cache.MAGIC + hashlib.sha256(b"object code").digest() + b"object code" and len(cache.MAGIC) == 8
    assert cache.load_blob("llvm", "k.o") == b"object code" and cache.stats["hits"] == 1
    assert not [p for p in os.listdir(fresh / "llvm") if p.startswith(".tmp-")]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_blob_is_a_miss_kept_until_replaced_with_one_warning(fresh, how):
    for name in ("a.o", "b.o"):
        cache.store_blob("llvm", name, b"x" * 100)
        path = fresh / "llvm" / name
        data = path.read_bytes()
        path.write_bytes(data[:-10] + b"y" * 10 if how == "flip" else data[:50])
    with pytest.warns(RuntimeWarning, match="damaged cache entry .*a.o") as record:
        assert cache.load_blob("llvm", "a.o") is None
        assert cache.load_blob("llvm", "b.o") is None   # counted, not warned again
    assert len([w for w in record if "damaged" in str(w.message)]) == 1
    assert cache.stats["corrupt"] == 2 and cache.stats["misses"] == 2
    assert (fresh / "llvm" / "a.o").exists()              # ignored, not deleted ...
    cache.store_blob("llvm", "a.o", b"rebuilt")           # ... but replaced by the rebuild
    assert cache.load_blob("llvm", "a.o") == b"rebuilt"


def test_entry_of_another_format_is_a_silent_miss(fresh):
    (fresh / "cuda").mkdir(parents=True)
    (fresh / "cuda" / "k.ptx").write_bytes(b"GCCUDA1\n" + hashlib.sha256(b"ptx").digest() + b"ptx")
    (fresh / "cuda" / "h.ptx").write_bytes(b"headerless ptx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load_blob("cuda", "k.ptx") is None and cache.load_blob("cuda", "h.ptx") is None
    assert cache.stats["corrupt"] == 2


def test_file_set_checked_against_its_manifest(fresh):
    d = cache.store_files("cuda_emulated", "e/manifest", {"lib.so": b"\x7fELF...", "stray.gch": None})
    assert d == str(fresh / "cuda_emulated")
    assert cache.find_files("cuda_emulated", "e/manifest") == d
    stray = fresh / "cuda_emulated" / "e" / "stray.gch"
    stray.write_bytes(b"must not be here")
    with pytest.warns(RuntimeWarning, match="does not match its manifest"):
        assert cache.find_files("cuda_emulated", "e/manifest") is None
    cache.store_files("cuda_emulated", "e/manifest", {"lib.so": b"\x7fELF...", "stray.gch": None})
    assert not stray.exists() and cache.find_files("cuda_emulated", "e/manifest") == d
    (fresh / "cuda_emulated" / "e" / "lib.so").write_bytes(b"\x7fELF..!")   # same size, other bytes
    assert cache.find_files("cuda_emulated", "e/manifest") is None and cache.stats["corrupt"] == 2


def test_unusable_directory_falls_back_to_a_private_one(fresh, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        cache.store_blob("llvm", "k.o", b"code")
    assert cache.stats["disk_errors"] == 1
    assert cache.load_blob("llvm", "k.o") == b"code"
    assert os.path.exists(os.path.join(cache.private_dir("llvm"), "k.o"))


# ---- the schedule (backends/schedule/plan.py) under a tiny fake backend -------------------------------
# The fake backend's table is the backend-neutral rows plus two ops (exp, add on floats); its kernels
# are NumPy calls. `interpret` runs a schedule the way a native runtime does: every buffer in one
# garbage-filled arena at the planned offsets (slices moved per loop iteration), so a wrong view,
# lifetime or offset gives a wrong answer, checked against the reference evaluator.

from graphc.backends.schedule.plan import ROWS, NotLowerable, Schedule            # noqa: E402
from graphc.backends.schedule.steps import HostStep, LoopStep                     # noqa: E402
from graphc.ir import Graph                                                      # noqa: E402


class FakeKernel:
    def __init__(self, name, out, ins, fn):
        self.name, self.out, self.ins, self.fn = name, out, list(ins), fn
        self.bufs = sorted({v.buf for v in [out, *ins] if v.buf is not None})
        self.node = None

    def run(self, array_of):
        np.copyto(array_of(self.out), self.fn(*[array_of(v) for v in self.ins]), casting="unsafe")


def _unary(fn):
    def handler(s, node, ins):
        t = node.outputs[0]
        out = s.fresh(t)
        s.add(FakeKernel(node.op.name, out, ins, fn), ins, [out])
        s.view[id(t)] = out
    return handler


def _add_floats(s, node, ins):
    if not np.issubdtype(np.dtype(node.outputs[0].dtype), np.floating):
        raise NotLowerable("add on integers")   # a row that does not cover a case: that node goes to the host
    _unary(np.add)(s, node, ins)


class Fake(Schedule):
    table = {**ROWS, gc.exp.op: _unary(np.exp), gc.add.op: _add_floats}
    backend = "fake"

    def copy(self, dst, src):
        return FakeKernel("copy", dst, [src], lambda x: x)


def _array(s, v, bases, at):
    if v.literal is not None:
        return np.broadcast_to(np.asarray(v.literal, v.dtype), v.shape)
    item, b, off = np.dtype(v.dtype).itemsize, s.buffers[v.buf], 0
    while b.kind == "slice":   # iteration at[id] of a moving window of the parent
        off += b.offset + at[s.buffers.index(b)] * b.stride
        b = s.buffers[b.index]
    base = bases["arena"] if b.kind == "arena" else bases[b.kind][b.index]
    off += (b.offset if b.kind == "arena" else 0) + v.offset * item
    if 0 in v.shape:
        return np.empty(v.shape, v.dtype)
    return np.ndarray(v.shape, v.dtype, buffer=base, offset=off, strides=[st * item for st in v.strides])


def _execute(s, steps, bases, at):
    for st in steps:
        if isinstance(st, LoopStep):
            for i in range(st.length):
                _execute(s, st.body, bases, {**at, **{b: st.length - 1 - i if st.reverse else i for b in st.slices}})
        elif isinstance(st, HostStep):
            st.run(lambda v: _array(s, v, bases, at), s.dims)
        else:
            st.run(lambda v: _array(s, v, bases, at))


def interpret(s, inputs):
    flat = lambda a: a.reshape(-1).view(np.uint8)   # noqa: E731
    outs = [np.empty(s.shape(t), t.dtype) for t in s.graph.roots]
    arena = np.full(s.arena_bytes + 8, 0xFF, np.uint8)   # garbage: a read before a write shows up as NaN
    bases = {"input": [flat(np.ascontiguousarray(a)) for a in inputs],
             "param": [flat(np.ascontiguousarray(p.node.attrs["value"])) for p in s.graph.parameters],
             "const": [flat(c) for c in s.consts], "out": [flat(o) for o in outs], "arena": arena}
    _execute(s, s.steps, bases, {})
    return outs


def _check_against_reference(s, ins, outs, values):
    want = gc.evaluate(outs, dict(zip(ins, values)))
    for g, w in zip(interpret(s, values), want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-12)


def _kernels(steps):
    for st in steps:
        if isinstance(st, LoopStep):
            yield from _kernels(st.body)
        elif not isinstance(st, HostStep):
            yield st


def test_schedule_views_share_buffers_and_roots_go_to_output_slots(rng):
    x = gc.placeholder("x", (4, 6), "float64")
    e = gc.exp(x)
    t = gc.transpose(e)                 # a view of e's buffer
    s_ = t[1:5:2, ::-1]                 # a view of a view
    y = gc.add(s_, gc.reshape(e, (6, 4))[::3])
    outs = [y, t, x]
    s = Fake(Graph([x], outs), {})
    assert s.view[id(t)].buf == s.view[id(e)].buf == s.view[id(s_)].buf
    assert s.view[id(t)].strides == (1, 6) and s.view[id(s_)].strides == (2, -6)
    names = [st.name for st in s.steps]
    assert names.count("exp") == 1 and names.count("add") == 1
    assert s.buffers[s.view[id(y)].buf].kind == "out"      # computed straight into its output slot
    assert names.count("copy") == 2                         # t (a view) and x (an input) are copied out
    assert s.fallback == set() and all(st.node is not None for st in s.steps[:2])
    _check_against_reference(s, [x], outs, [rng.standard_normal((4, 6))])


def test_schedule_lifetimes_cover_every_use_and_live_buffers_never_share_memory(rng):
    x = gc.placeholder("x", (8, 16), "float64")
    h, outs = x, []
    for k in range(12):    # a chain with side branches of another size: memory can be reused
        side = gc.exp(h[k % 8:k % 8 + 1])                       # (1, 16), broadcast by add
        h = gc.exp(gc.add(h, side)) * 0.01 if k % 2 else gc.add(h, side) * 0.1
        if k == 5:
            outs.append(side)
    outs.append(gc.add(h, h))
    s = Fake(Graph([x], outs), {})
    assert s.fallback == {"mul"}
    for i, st in enumerate(s.steps):     # independent: every step lies inside its buffers' lifetimes
        for b in (st.bufs if not isinstance(st, HostStep) else {v.buf for v in st.ins + st.outs if v.buf is not None}):
            assert s.buffers[b].first <= i <= s.buffers[b].last, (i, b)
    arena = [b for b in s.buffers if b.kind == "arena" and b.last >= 0]
    assert len(arena) > 10
    for i, b in enumerate(arena):
        assert b.offset % s.align == 0 and b.offset + b.nbytes <= s.arena_bytes
        for c in arena[:i]:
            if b.first <= c.last and c.first <= b.last:
                assert b.offset + max(b.nbytes, 1) <= c.offset or c.offset + max(c.nbytes, 1) <= b.offset
    assert s.arena_bytes < sum(-(-b.nbytes // s.align) * s.align for b in arena)   # memory was reused
    _check_against_reference(s, [x], outs, [rng.standard_normal((8, 16)) * 0.1])


def test_schedule_op_without_a_row_or_an_uncovered_case_is_a_host_step(rng):
    x = gc.placeholder("x", (5,), "float64")
    i = gc.placeholder("i", (5,), "int64")
    outs = [gc.exp(gc.tanh(x)), gc.add(i, i)]      # tanh: no row; add on int64: the row raises NotLowerable
    s = Fake(Graph([x, i], outs), {})
    hosts = [st for st in s.steps if isinstance(st, HostStep)]
    assert s.fallback == {"tanh", "add"} and {h.node.op.name for h in hosts} == {"tanh", "add"}
    assert s.buffers[hosts[1].outs[0].buf].kind == "out"    # a host step also writes its output slot
    _check_against_reference(s, [x, i], outs, [rng.standard_normal(5), np.arange(5)])


@pytest.mark.parametrize("reverse", [False, True])
def test_schedule_scan_is_a_loop_step_with_moving_slices(rng, reverse):
    xs = gc.placeholder("xs", (6, 3), "float64")
    c0 = gc.placeholder("c0", (3,), "float64")
    (c, ys) = gc.scan(lambda c, x: (gc.add(c, gc.exp(x)), gc.exp(c)), c0, xs, reverse=reverse)
    s = Fake(Graph([xs, c0], [c, ys]), {})
    (loop,) = [st for st in s.steps if isinstance(st, LoopStep)]
    assert loop.length == 6 and loop.reverse == reverse and s.fallback == set()
    slices = [s.buffers[b] for b in loop.slices]
    assert [b.kind for b in slices] == ["slice", "slice"]            # xs[t] and ys[t]
    assert {s.buffers[b.index].kind for b in slices} == {"input", "out"}
    assert all(b.stride == 3 * 8 and b.nbytes == 3 * 8 for b in slices)
    assert not any(isinstance(st, HostStep) for st in loop.body)
    for b in loop.buffers():            # what the body touches is live for the whole loop step
        pos = s.steps.index(loop)
        assert s.buffers[b].first <= pos <= s.buffers[b].last
    _check_against_reference(s, [xs, c0], [c, ys], [rng.standard_normal((6, 3)), rng.standard_normal(3)])


def test_schedule_scan_whose_body_needs_the_host_runs_on_the_host(rng):
    xs = gc.placeholder("xs", (4, 2), "float64")
    c0 = gc.placeholder("c0", (2,), "float64")
    c, ys = gc.scan(lambda c, x: (gc.add(c, gc.tanh(x)), c), c0, xs)
    s = Fake(Graph([xs, c0], [c, ys]), {})
    assert s.fallback == {"scan"}                 # not tanh: the body's host step was dropped with the loop
    (host,) = s.steps                             # the carry copies planned before the body are gone too
    assert isinstance(host, HostStep) and host.node.op.name == "scan"
    assert [s.buffers[v.buf].kind for v in host.outs] == ["out", "out", "arena"]   # carry, ys, history
    assert not any(b.kind == "slice" and b.last >= 0 for b in s.buffers)
    assert sum(b.kind == "arena" and b.last >= 0 for b in s.buffers) == 1
    _check_against_reference(s, [xs, c0], [c, ys], [rng.standard_normal((4, 2)), rng.standard_normal(2)])


def test_schedule_status_codes_name_the_node_and_its_line():
    x = gc.placeholder("x", (3,), "float64")
    y = gc.exp(x)                                       # the line the error names
    s = Fake(Graph([x], [y]), {}, bounds=True)
    st = s.buffers[s.status.buf]
    assert st.kind == "arena" and st.first == 0 and st.last >= len(s.steps)    # live for the whole program
    others = [b for b in s.buffers if b.kind == "arena" and b is not st and b.last >= 0]
    assert all(b.offset + max(b.nbytes, 1) <= st.offset or st.offset + 8 <= b.offset for b in others)
    code = s.status_code(y.node, "something went wrong in exp")
    assert code == 1 and s.status_code(None, "in a copy") == 2
    err = s.status_error(code)
    assert isinstance(err, gc.GraphcError) and "something went wrong in exp" in str(err)
    assert re.search(r"node built at .*test_schedule.py:\d+", str(err))


def test_schedule_rows_are_shared_by_the_llvm_table():
    """llvm's table holds every backend-neutral row it does not override, and llvm's Plan is a Schedule."""
    backend_or_skip("llvm")
    from graphc.backends.llvm import plan, table
    assert issubclass(plan.Plan, Schedule) and plan.Plan.table is table.PLAN
    assert set(ROWS) <= set(table.PLAN)
    from graphc.ops.scan import Scan
    assert table.PLAN[Scan] is ROWS[Scan]     # one scan loop, llvm renders it


def test_names_serial_numbers_are_unique_and_skip_taken_names():
    n = Names()
    n.reserve("v2")
    got = [n.serial("v"), n.serial("v"), n.serial("cond"), n.serial("v", "p")]
    assert got == ["v1", "v3", "cond4", "v5p"]
    assert n.fresh("v5p") == "v5p1" and len(set(got)) == 4
