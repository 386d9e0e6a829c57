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
from graphc.backends.schedule.names import Names
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
