"""How a micro-kernel product split by column blocks is cut into pool chunks (gemm.tile_chunks): chunks of at
least TILE_BLOCKS_PER_CHUNK blocks, at most program.CHUNKS_PER_THREAD a thread, at least one a thread (each
chunk reads all of a again); a product with fewer column blocks than threads x gemm.ROW_SPLIT_BLOCKS is cut
into parts of its rows instead (gemm.row_parts). Every cut computes the same product: checked against NumPy
in float64 on odd sizes, both ISAs, one and two threads.""" 
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


def test_the_row_rule(monkeypatch):
    """Parts of rows: two a thread, whole tile heights, only for few column blocks, and only where every
    part's tiles are as wide as the panels (packed for all n rows: AVX2's tiles of few rows are wider)."""
    from graphc.backends.llvm import gemm
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "avx512")
    assert gemm.row_parts(1024, 256, "float32", 2) == (258, 4)      # W7's 1024 x 1024 @ 1024 x 256
    assert gemm.row_parts(1024, 768, "float32", 2) is None          # 12 column blocks: by columns
    assert gemm.row_parts(1024, 256, "float32", 1) is None          # one thread: not split
    assert gemm.row_parts(64, 256, "float32", 2) is None            # W7 b1: a smaller than b, by columns
    assert gemm.row_parts(769, 256, "float32", 2) and not gemm.row_parts(768, 256, "float32", 2)
    monkeypatch.setenv("GRAPHC_LLVM_ISA", "avx2")
    assert gemm.tile_vectors(3, "float32")[0] != gemm.tile_vectors(15, "float32")[0]
    assert gemm.row_parts(15, 63, "float32", 2) is None             # parts 6, 6, 3: the last tiles 3 vectors wide


def _product_steps(f):
    return [st for st in plan_steps(f) if getattr(st, "name", "") == "matmul"]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_chunk, row_split", [(0, 0), (1, 0), (4, 4), (1000, 0), (4, 1000)])
def test_every_cut_computes_the_product(isa, threads, per_chunk, row_split, monkeypatch):
    from graphc.backends.llvm import gemm, tune
    monkeypatch.setenv("GRAPHC_LLVM_ISA", isa)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    monkeypatch.setenv("GRAPHC_LLVM_PACK", "always")
    monkeypatch.setattr(tune, "TILES_PARALLEL_FLOPS", 0)   # split even the small products
    monkeypatch.setattr(gemm, "TILE_BLOCKS_PER_CHUNK", per_chunk)
    monkeypatch.setattr(gemm, "ROW_SPLIT_BLOCKS", row_split)   # 0: never by rows; 1000: always
    rng = np.random.default_rng(per_chunk + threads)
    by_rows = 0
    for n, k, m in ((65, 17, 257), (63, 3, 1000), (257, 65, 130), (257, 63, 65), (130, 257, 17), (15, 17, 63),
                    (21, 9, 40), (601, 9, 197)):
        x = gc.placeholder("x", (n, k))
        w = rng.standard_normal((k, m)).astype(np.float32)
        f = gc.function([x], x @ gc.parameter("w", w), backend="llvm")
        xv = rng.standard_normal((n, k)).astype(np.float32)
        np.testing.assert_allclose(f(xv), xv.astype(np.float64) @ w, rtol=2e-5, atol=2e-5 * k ** 0.5 * 4)
        steps = _product_steps(f)
        assert len(steps) == 1
        if threads == 2 and steps[0].split:   # (one column block and too few rows: not split)
            # (cut by rows only over panels packed before the product: a weight's, not packed inside it)
            rows_ok = steps[0].packed and not steps[0].pack_source
            parts = gemm.row_parts(n, m, "float32", 2) if rows_ok else None
            if gemm.tile_blocks(m, "float32", n) >= 2 * row_split:
                assert parts is None
            if parts:   # two parts of rows a thread, each a chunk
                assert steps[0].split == steps[0].chunks == parts[1] == -(-n // parts[0]) >= 2
                by_rows += 1
            else:
                blocks = steps[0].split
                assert blocks >= 2 and steps[0].chunks == gemm.tile_chunks(blocks, 2)
    # some products here are cut by rows at the default rule on either ISA (601 x 9 x 197 on AVX-512's 4 column
    # blocks, 257 x 63 x 65 on AVX2's 5), none with the rule off or one thread
    assert (by_rows > 0) == (threads == 2 and row_split > 0)
