"""fusion emits the condensed DAG (a fused group is one vertex) in topological order, ties broken by
schedule position: its own heap order against networkx's lexicographical_topological_sort, which it
replaced (networkx cost ~0.1 s of a process's first compile to import)."""
from __future__ import annotations

import random

import pytest

from graphc.passes import fusion as FU

nx = pytest.importorskip("networkx")


def _dag(seed, n=60):
    rng = random.Random(seed)
    edges = {(rng.randrange(j), j) for j in range(1, n) for _ in range(rng.randrange(4))}
    keys = list(range(n))
    rng.shuffle(keys)   # positions that do not follow the vertex numbers
    return n, edges, {v: (keys[v], None) for v in range(n)}


@pytest.mark.parametrize("seed", range(20))
def test_heap_topological_order_is_networkx_lexicographic(seed):
    n, edges, key = _dag(seed)
    succ = {v: set() for v in range(n)}
    indeg = {v: 0 for v in range(n)}
    for u, v in edges:
        succ[u].add(v)
        indeg[v] += 1
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    want = list(nx.lexicographical_topological_sort(g, key=lambda v: key[v][0]))
    assert list(FU._topological(succ, indeg, key)) == want
