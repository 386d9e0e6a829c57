"""The one arena memory planner: buffers with lifetimes [first, last] (inclusive step indices) and
sizes -> byte offsets into one arena, and the arena's size.

Two buffers may share memory only when their lifetimes are disjoint: a buffer last read at step s and
one first written at step s overlap (a step's inputs and outputs never alias here; computing in place
is the caller's decision, made by giving the output the input's buffer).

Offsets are aligned, and every buffer takes at least one aligned slot (a zero-byte buffer too), so two
buffers live at once never share an address. The plan is the better of two greedy placements, each a
lowest-gap fit among the already placed buffers whose lifetimes overlap the new one:
  - by first use (first-fit in step order: the classic linear-scan allocation), and
  - by size, largest first (the "greedy by size" offset assignment of Pisarchyk & Lee, "Efficient
    Memory Management for Deep Neural Net Inference", 2020), which usually packs tighter.
Both cost O(n log n) plus the number of pairs of buffers live at once; the result is never larger than first-fit by first use.
A caller may add placement orders of its own (`orders=`): e.g. an order that stacks buffers as a
simpler plan would (groups of equal-size buffers, one slot each), so the result is never larger than
that plan either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from graphc.errors import GraphcError

DEFAULT_ALIGN = 64


@dataclass(frozen=True)
class ArenaPlan:
    offsets: list[int]   # byte offset of each buffer, in the order given
    total: int           # bytes the arena needs (a multiple of the alignment)
    slots: list[int]     # bytes each buffer occupies (its size rounded up to the alignment, at least one)


def plan_arena(buffers: Sequence[tuple[int, int, int]], align: int = DEFAULT_ALIGN,
               orders: Sequence[Sequence[int]] = (), locality: float = 0.0) -> ArenaPlan:
    """Offsets for `buffers`, each (first step, last step, bytes), in an arena of `total` bytes such
    that buffers whose lifetimes intersect never overlap in memory. `orders`: more placement orders to
    try (each a permutation of the buffer indices), besides by first use and by size. `locality`: keep
    the first-use placement (a freed slot is reused by the next buffers, still in cache) unless another
    order is smaller by more than this fraction of its size (0: the smallest plan wins)."""
    if align < 1 or align & (align - 1):
        raise GraphcError(f"arena alignment must be a power of two, got {align}")
    blocks = []
    for i, b in enumerate(buffers):
        first, last, nbytes = (int(v) for v in b)
        if first > last or nbytes < 0:
            raise GraphcError(f"arena buffer {i}: lifetime [{first}, {last}] and size {nbytes} are not valid "
                              f"(first <= last, size >= 0)")
        blocks.append((first, last, -(-max(nbytes, 1) // align) * align))
    by_first = sorted(range(len(blocks)), key=lambda i: (blocks[i][0], i))
    by_size = sorted(range(len(blocks)), key=lambda i: (-blocks[i][2], blocks[i][0], i))
    for k, order in enumerate(orders):
        if sorted(order) != list(range(len(blocks))):
            raise GraphcError(f"arena placement order {k} is not a permutation of the {len(blocks)} buffer indices")
    overlapping = _overlaps(blocks, by_first)
    best = best_k = None
    for k, order in enumerate((by_first, by_size, *orders)):
        offsets, total = _place(blocks, order, overlapping)
        margin = locality if best_k == 0 else 0.0   # another order must beat first-use by the margin
        if best is None or total < best[1] * (1.0 - margin):
            best, best_k = (offsets, total), k
    return ArenaPlan(best[0], best[1], [b[2] for b in blocks])


def _overlaps(blocks: list[tuple[int, int, int]], by_first: list[int]) -> list[list[int]]:
    """For each block, the blocks whose lifetimes intersect its own (a sweep in first-use order:
    O(n log n + pairs), lifetimes being short in practice)."""
    out: list[list[int]] = [[] for _ in blocks]
    active: list[int] = []
    for i in by_first:
        first = blocks[i][0]
        active = [j for j in active if blocks[j][1] >= first]
        for j in active:
            out[i].append(j)
            out[j].append(i)
        active.append(i)
    return out


#: a block overlapping more placed blocks than this finds its gap with NumPy (below: a Python loop is faster)
VECTOR_NEIGHBOURS = 48


def _place(blocks, order: list[int], overlapping: list[list[int]]) -> tuple[list[int], int]:
    """Place blocks in `order`, each at the lowest offset where it fits among the placed blocks whose
    lifetimes intersect its own. Walking those blocks by offset, the candidate offset before the k-th is
    the highest end among the first k (0 before the first): the block goes at the first candidate that
    ends at or below the k-th's start, else after them all. A training step's activations overlap
    hundreds of buffers each: there the walk is vectorised (MLP-80's 640 buffers, 115k overlapping pairs:
    92 -> ~20 ms an order)."""
    offsets = [-1] * len(blocks)
    total = 0
    big = [i for i, nb in enumerate(overlapping) if len(nb) > VECTOR_NEIGHBOURS]
    if big:
        import numpy as np
        offs = np.full(len(blocks), -1, np.int64)
        sizes = np.array([b[2] for b in blocks], np.int64)
        near = {i: np.array(overlapping[i], np.int64) for i in big}
    for i in order:
        size = blocks[i][2]
        nb = near.get(i) if big else None
        if nb is None:
            busy = sorted((offsets[j], offsets[j] + blocks[j][2]) for j in overlapping[i] if offsets[j] >= 0)
            off = 0
            for lo, hi in busy:
                if off + size <= lo:
                    break
                off = max(off, hi)
        else:
            o = offs[nb]
            placed = o >= 0
            lo = o[placed]
            if lo.size:
                by = np.argsort(lo, kind="stable")
                lo, hi = lo[by], (lo + sizes[nb[placed]])[by]
                starts = np.zeros(lo.size + 1, np.int64)
                np.maximum.accumulate(hi, out=starts[1:])
                fits = starts[:-1] + size <= lo
                off = int(starts[int(np.argmax(fits)) if fits.any() else lo.size])
            else:
                off = 0
        offsets[i] = off
        if big:
            offs[i] = off
        total = max(total, off + size)
    return offsets, total


def lifetimes(uses: Sequence) -> dict[int, tuple[int, int]]:
    """(first, last) step of each buffer from `uses`, one iterable of buffer ids per step (the buffers
    the step reads or writes; a loop step lists every buffer its body touches, so they stay live for
    the whole loop). Buffers no step uses are absent."""
    out: dict[int, tuple[int, int]] = {}
    for step, ids in enumerate(uses):
        for b in ids:
            first = out.get(b, (step, step))[0]
            out[b] = (first, step)
    return out


def lower_bound(buffers: Sequence[tuple[int, int, int]], align: int = DEFAULT_ALIGN) -> int:
    """The most bytes (in aligned slots) live at any one step: no plan can use less."""
    events: dict[int, int] = {}
    for first, last, nbytes in buffers:
        size = -(-max(int(nbytes), 1) // align) * align
        events[first] = events.get(first, 0) + size
        events[last + 1] = events.get(last + 1, 0) - size
    live = peak = 0
    for step in sorted(events):
        live += events[step]
        peak = max(peak, live)
    return peak
