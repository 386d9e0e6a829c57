"""The optimiser: `optimize(graph, level, disable=(), debug_passes=False) -> Graph`.

Passes are small graph-to-graph functions, one per module, run in the order listed in
pipeline.PIPELINE; the pipeline also optimises nested graphs (scan bodies) at the same level.
Passes ask op traits (`op.has(Trait.X)`) or compare op objects, never op names. Rewrites are data:
`pattern >> replacement` rules in the language of pattern.py (algebraic.py, stability.py, dce.py);
memory.plan_buffers plans workspace buffers and their lifetimes (placed by the NumPy backend in one arena:
backends/numpy/workspace.py, which also makes the `f.memory_plan()` report).
"""
from .pipeline import PIPELINE, Pass, optimize, pass_times  # noqa: F401
