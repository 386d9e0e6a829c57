"""graphc: a symbolic computational-graph compiler for deep learning.

    import graphc as gc
    x = gc.placeholder("x", (None, 784))
    W = gc.parameter("W", np.zeros((784, 10), np.float32))
    f = gc.function([x], gc.softmax(x @ W), backend="numpy")
"""
from . import _modstate  # noqa: F401  (first: records each module's settings as imported, for the warm cache)
from .errors import (BackendUnavailable, DTypeError, GradientError, GraphcError, InputError,  # noqa: F401
                     NumericalError, ShapeError, UnknownBackend)
from .ir import OPS, Graph, Node, Op, Tensor  # noqa: F401
from .ops import *  # noqa: F401,F403
from .ops import Parameter, as_tensor, cast, constant, parameter, placeholder, stop_gradient  # noqa: F401
from .autodiff import grad, hessian, hvp, jacobian, jvp  # noqa: F401
from .gradcheck import GradientCheckError, verify_grad  # noqa: F401
from .function import Function, available_backends, function  # noqa: F401
from .printing import dprint, to_networkx  # noqa: F401
from .reference import evaluate  # noqa: F401
from . import shapes, dtypes  # noqa: F401
from . import autodiff as _autodiff, ir as _ir, printing as _printing

# the core (graphc.ir) imports nothing above it: the layers above fill in its hooks
_ir.provide("grad", _autodiff.grad)
_ir.provide("jvp", _autodiff.jvp)
_ir.provide("graph_text", _printing.graph_text)
_ir.provide("to_networkx", _printing.to_networkx)
_ir.provide("repr_svg", lambda obj: __import__("graphc.viz", fromlist=["repr_svg"]).repr_svg(obj))  # viz on first use
_ir.provide("repr_html", lambda obj: __import__("graphc.viz", fromlist=["repr_html"]).repr_html(obj))
_ir.provide("explain", lambda f, *a, **k: __import__("graphc.explain", fromlist=["explain"]).explain(f, *a, **k))

__version__ = "0.1.0"
float32, float64, int32, int64 = "float32", "float64", "int32", "int64"
bool_ = "bool"

# Sub-libraries and tools loaded on first use (gc.nn, gc.optim, gc.to_dot, ...), so `import graphc`
# stays light and each lives in its own module.
_LAZY = {
    "nn": ("graphc.nn", None), "losses": ("graphc.losses", None), "optim": ("graphc.optim", None),
    "init": ("graphc.init", None), "random": ("graphc.ops.random", None), "passes": ("graphc.passes", None),
    "viz": ("graphc.viz", None), "distributed": ("graphc.distributed", None),
    "preprocessing": ("graphc.preprocessing", None),
    "quantize": ("graphc.quantization", "quantize"),
    "fit": ("graphc.train", "fit"), "trace": ("graphc.frontends.numpy_trace", "trace"),
    "to_dot": ("graphc.viz", "to_dot"), "draw": ("graphc.viz", "draw"),
    "save": ("graphc.serialize", "save"), "load": ("graphc.serialize", "load"),
    "export_onnx": ("graphc.onnx_export", "export_onnx"), "load_onnx": ("graphc.frontends.onnx_import", "load_onnx"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'graphc' has no attribute {name!r}")


def __dir__():
    """dir(gc) lists the sub-libraries and tools loaded on first use (nn, optim, losses, random, viz, ...)."""
    return sorted(set(globals()) | set(_LAZY))
