"""Ways into graphc: tracing NumPy code (frontends.numpy_trace); ONNX import later."""
