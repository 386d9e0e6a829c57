"""NumPy backend: the graph becomes generated Python source, one line per node, calling NumPy."""
from .codegen import NumpyBackend

BACKEND = NumpyBackend()
