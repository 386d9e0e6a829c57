"""The optimiser: `optimize(graph, level, disable=(), debug_passes=False) -> Graph`.

Passes are small graph-to-graph functions, one per module, run in the order listed in
pipeline.PIPELINE; memory.memory_plan reports buffers and peak memory for a compiled graph.
"""
from .pipeline import PIPELINE, Pass, optimize  # noqa: F401
