"""Ways into graphc, installed as `graphc.frontends` (the folder sits at the repository's top level): tracing
NumPy code (graphc.frontends.numpy_trace) and ONNX import (graphc.frontends.onnx_import)."""
if __name__ != "graphc.frontends":
    raise ImportError(f"the frontends package is graphc.frontends; import it under that name, not {__name__!r} "
                      "(pip install -e . maps the folder there)")
