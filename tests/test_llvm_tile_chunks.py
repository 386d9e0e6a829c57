"""How a micro-kernel product split by column blocks is cut into pool chunks (gemm.tile_chunks): chunks of at
least TILE_BLOCKS_PER_CHUNK blocks, at most program.CHUNKS_PER_THREAD a thread, at least one a thread (each
chunk reads all of a again); a product inside a loop keeps one run of blocks a thread. Every cut computes
the same product: checked against NumPy in float64 on odd sizes, both ISAs, one and two threads."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip, plan_steps


@pytest.fixture(autouse=True)
def llvm(monkeypatch):
    backend_or_skip("llvm")
    monkeypatch.setenv("GRAPHC_WARM_CACHE", "0")


def test_the_rule():
    from graphc.backends.llvm import gemm, program
    assert gemm.TILE_BLOCKS_PER_CHUNK == 4 and program.CHUNKS_PER_THREAD == 4
    # W6's 16 blocks: 4 chunks of 4; 12 blocks (1024 x 256 x 768): one chunk a thread; 4 blocks: as many
    # as threads; 64 blocks: capped at CHUNKS_PER_THREAD a thread; one thread: at least one chunk
    assert [gemm.tile_chunks(b, 2) for b in (16, 12, 4, 1, 64, 200)] == [4, 2, 2, 2, 8, 8]
    assert [gemm.tile_chunks(b, 1) for b in (3, 8, 13, 100)] == [1, 2, 3, 4]


def _product_steps(f):
    return [st for st in plan_steps(f) if getattr(st, "name", "") == "matmul"]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_chunk", [0, 1, 4, 1000])
def test_every_cut_computes_the_product(isa, threads, per_chunk, monkeypatch):
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)   # split even the small products
    monkeypatch.setattr(gemm, "TILE_BLOCKS_PER_CHUNK", per_chunk)
    rng = np.random.default_rng(per_chunk + threads)
    for n, k, m in ((65, 17, 257), (63, 3, 1000), (257, 65, 130)):
        x = gc.placeholder("x", (n, k))
        w = rng.standard_normal((k, m)).astype(np.float32)
        f = gc.function([x], x @ gc.parameter("w", w), backend="llvm")
        xv = rng.standard_normal((n, k)).astype(np.float32)
        np.testing.assert_allclose(f(xv), xv.astype(np.float64) @ w, rtol=2e-5, atol=2e-5 * k ** 0.5 * 4)
        steps = _product_steps(f)
        assert len(steps) == 1
        if threads == 2:
            blocks = steps[0].split
            assert blocks >= 2 and steps[0].chunks == gemm.tile_chunks(blocks, 2)
