"""The optimiser: `optimize(graph, level, disable=(), debug_passes=False) -> Graph`.

Passes are small graph-to-graph functions, one per module, run in the order listed in
pipeline.PIPELINE; the pipeline also optimises nested graphs (scan bodies) at the same level.
Passes ask op traits (`op.has(Trait.X)`) or compare op objects, never op names. Rewrites are data:
`pattern >> replacement` rules in the language of pattern.py (algebraic.py, stability.py, dce.py);
memory.memory_plan reports buffers and peak memory for a compiled graph.
"""
from .pipeline import PIPELINE, Pass, optimize  # noqa: F401
