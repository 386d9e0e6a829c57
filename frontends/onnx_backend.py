"""graphc as an ONNX backend (onnx.backend.base.Backend: prepare / run), and a runner for the
ONNX backend node test suite that ships inside the onnx wheel.

    rep = GraphcBackend.prepare(model, device="CPU", backend="numpy")
    outputs = rep.run([x])

`is_compatible(model)` is False exactly when import raises UnsupportedOnnx (an op, attribute or
dtype graphc does not support); the conformance runner counts those cases as skipped, not passed.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import Counter

import numpy as np
from onnx.backend.base import Backend, BackendRep

import graphc as gc
from .onnx_import import NeedsConstant, UnsupportedOnnx, load_onnx


class GraphcRep(BackendRep):
    """A compiled ONNX model: `run(inputs)` returns the outputs in the model's order.

    When the model takes axes or shapes as inputs (ReduceSum's `axes`, Reshape's `shape`), graphc
    specialises: small integer/bool inputs become constants and one function is compiled per
    distinct value of them (cached)."""

    def __init__(self, model, options: dict, fn: gc.Function | None = None, fixed: set | None = None):
        self.model, self.options = model, options
        self.fixed = set(fixed or ())  # inputs that must be specialised (besides small int/bool ones)
        self.names = [vi.name for vi in model.graph.input
                      if vi.name not in {i.name for i in model.graph.initializer}]
        self.fn = fn
        self.cache: dict = {}

    def run(self, inputs, **kwargs):
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, dict):
            inputs = [inputs[n] for n in self.names]
        inputs = list(inputs)[:len(self.names)]
        if self.fn is not None:
            return tuple(self.fn(*inputs))
        while True:
            fixed = {n: np.asarray(v) for n, v in zip(self.names, inputs) if n in self.fixed or _specialisable(v)}
            key = tuple((n, v.dtype.str, v.shape, v.tobytes()) for n, v in fixed.items())
            if key in self.cache:
                break
            try:
                self.cache[key] = gc.function(load_onnx(self.model, constants=fixed), **self.options)
            except NeedsConstant as e:  # e.g. Resize's float `scales` fed as an input
                if e.input_name is None or e.input_name in self.fixed or np.asarray(
                        inputs[self.names.index(e.input_name)]).size > 4096:
                    raise
                self.fixed.add(e.input_name)
        return tuple(self.cache[key](*[v for n, v in zip(self.names, inputs) if n not in fixed]))


def _specialisable(v) -> bool:
    v = np.asarray(v)
    return v.dtype.kind in "biu" and v.size <= 4096


class GraphcBackend(Backend):
    """ONNX backend API over graphc (`backend=` picks the graphc backend; default numpy)."""

    @classmethod
    def is_compatible(cls, model, device: str = "CPU", **kwargs) -> bool:
        try:
            load_onnx(model)
        except NeedsConstant:
            return True  # decided at run time, when the axes/shape inputs have values
        except UnsupportedOnnx:
            return False
        return True

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"

    @classmethod
    def prepare(cls, model, device: str = "CPU", backend: str = "numpy", **kwargs) -> GraphcRep:
        super().prepare(model, device, **kwargs)
        from .onnx_import import _load_model
        model = _load_model(model)
        options = dict(kwargs, backend=backend)
        try:
            g = load_onnx(model)
        except NeedsConstant as e:  # axes/shapes fed as inputs: compile per value at run time
            return GraphcRep(model, options, fixed={e.input_name} if e.input_name else None)
        return GraphcRep(model, options, gc.function(g, **options))

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device: str = "CPU", outputs_info=None, **kwargs):
        raise NotImplementedError("graphc runs whole models; use prepare(model).run(inputs)")


prepare = GraphcBackend.prepare
run_model = GraphcBackend.run_model
supports_device = GraphcBackend.supports_device


@dataclasses.dataclass
class SuiteResult:
    passed: list
    skipped: dict           # case name -> reason (unsupported op/attribute/dtype)
    failed: dict            # case name -> error text
    seconds: float

    def summary(self) -> str:
        reasons = Counter(r.split(":")[0] for r in self.skipped.values())
        top = ", ".join(f"{k} ({v})" for k, v in reasons.most_common(8))
        return (f"{len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} unsupported "
                f"of {len(self.passed) + len(self.failed) + len(self.skipped)} cases in {self.seconds:.0f} s; "
                f"most common unsupported: {top}")


def node_cases(kind: str = "node"):
    """The onnx wheel's backend test cases of `kind` (node, simple, pytorch-converted, ...)."""
    from onnx.backend.test.loader import load_model_tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model_tests(kind=kind)


def _check_case(case, backend: str) -> None:
    import onnx
    model = case.model if case.model is not None else onnx.load(f"{case.model_dir}/model.onnx")
    rep = GraphcBackend.prepare(model, backend=backend)
    sets = case.data_sets or _load_data_sets(case.model_dir)
    for inputs, want in sets:
        inputs, want = [_array(t) for t in inputs], [_array(t) for t in want]
        with np.errstate(all="ignore"):
            got = rep.run(inputs)
        assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            g, w = np.asarray(g), np.asarray(w)
            assert g.shape == w.shape, f"output {i}: shape {g.shape}, expected {w.shape}"
            assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype}, expected {w.dtype}"
            rtol = case.rtol
            if w.dtype.name in ("bfloat16", "float16"):
                # as onnx.backend.test.runner does for bfloat16: two ulps of the half dtype (the expected
                # values round after every NumPy op; graphc computes each op in float32, rounding once)
                rtol = max(rtol, 2.0 ** -6 if w.dtype.name == "bfloat16" else 2.0 ** -9)
                g, w = g.astype(np.float32), w.astype(np.float32)
            np.testing.assert_allclose(g, w, rtol=rtol, atol=case.atol, err_msg=f"output {i}")


def _array(t):
    import onnx
    from onnx import numpy_helper
    return numpy_helper.to_array(t) if isinstance(t, onnx.TensorProto) else np.asarray(t)


def _load_data_sets(model_dir: str):
    import glob
    import onnx
    from onnx import numpy_helper
    sets = []
    for d in sorted(glob.glob(f"{model_dir}/test_data_set_*")):
        def read(prefix):
            out = []
            for p in sorted(glob.glob(f"{d}/{prefix}_*.pb")):
                t = onnx.TensorProto()
                with open(p, "rb") as f:
                    t.ParseFromString(f.read())
                out.append(numpy_helper.to_array(t))
            return out
        sets.append((read("input"), read("output")))
    return sets


def run_suite(kind: str = "node", backend: str = "numpy", select=None) -> SuiteResult:
    """Run every case of the suite; unsupported ones are skipped with the reason, others must match."""
    t0 = time.perf_counter()
    passed, skipped, failed = [], {}, {}
    for case in node_cases(kind):
        if select is not None and not select(case.name):
            continue
        if case.model is None and case.model_dir is None:
            skipped[case.name] = f"not downloaded: {case.name} needs {case.url} (no network)"
            continue
        try:
            _check_case(case, backend)
            passed.append(case.name)
        except UnsupportedOnnx as e:
            skipped[case.name] = str(e)
        except Exception as e:  # a failure of a supported case: reported, and the test fails on it
            failed[case.name] = f"{type(e).__name__}: {str(e)[:300]}"
    return SuiteResult(passed, skipped, failed, time.perf_counter() - t0)


if __name__ == "__main__":
    import sys
    res = run_suite(sys.argv[1] if len(sys.argv) > 1 else "node", sys.argv[2] if len(sys.argv) > 2 else "numpy")
    for k, v in sorted(res.failed.items()):
        print("FAIL", k, v.replace("\n", " ")[:240])
    print(res.summary())
