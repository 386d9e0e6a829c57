"""Error classes: every user-facing failure is a GraphcError subclass."""
from __future__ import annotations


class GraphcError(Exception):
    """Base class of all graphc errors."""


class ShapeError(GraphcError, ValueError):
    """Shapes do not fit an op's rule (raised when the node is built or at call time)."""


class DTypeError(GraphcError, TypeError):
    """Dtypes do not fit an op's rule."""


class InputError(GraphcError, ValueError):
    """A compiled function was called with bad arguments."""


class GradientError(GraphcError):
    """A gradient was asked through a path that has none."""


class BackendUnavailable(GraphcError):
    """The requested backend cannot run on this machine (the message says why)."""


class UnknownBackend(GraphcError, ValueError):
    """No backend of that name exists."""


class NumericalError(GraphcError, FloatingPointError):
    """mode='debug' found a NaN or Inf produced by a node."""
