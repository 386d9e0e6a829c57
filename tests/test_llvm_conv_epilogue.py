"""A convolution's elementwise epilogue (the `fused[conv2d, ...]` body: per-output-channel bias, ReLU, a
same-shape residual add and ReLU) planned after the conv (backends/llvm/plan.py, walk_body/_region): the
in-place pass splits over the pool from plan.CONV_EPILOGUE_PARALLEL_MIN elements (set to 0 here so these
small cases split). Against an independent NumPy float64 reference on odd sizes (channels 17, 65; spatial
3, 17), the Winograd 3x3, 1x1, 3x3 stride-2 and 7x7 stem-like paths, batch 1 and 3, one and two threads,
with and without sanitize="bounds"."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc

from conftest import backend_or_skip
from test_llvm_conv_speedpaths import _conv_reference

#: (N, C, H, W, O, K, stride, pad, winograd env)
CASES = [
    (1, 17, 17, 17, 17, 3, 1, 1, "4"),     # 3x3 stride 1 through Winograd (>= 16 channels)
    (3, 65, 17, 3, 17, 3, 1, 1, "4"),      # Winograd, spatial 3 wide, batch 3
    (3, 65, 3, 3, 17, 1, 1, 0, "0"),       # 1x1
    (1, 17, 17, 17, 65, 1, 1, 0, "0"),     # 1x1, 65 output channels
    (1, 17, 17, 17, 65, 3, 2, 1, "0"),     # 3x3 stride 2
    (3, 3, 17, 17, 65, 7, 2, 3, "0"),      # a ResNet stem, small
]


@pytest.fixture(autouse=True)
def llvm():
    backend_or_skip("llvm")


def _build(n, c, h, w, o, k, stride, pad, residual):
    x = gc.placeholder("x", (n, c, h, w), "float64")
    wt = gc.placeholder("w", (o, c, k, k), "float64")
    b = gc.placeholder("b", (o,), "float64")
    y = gc.relu(gc.conv2d(x, wt, stride=stride, padding=pad) + gc.reshape(b, (1, o, 1, 1)))
    ins = [x, wt, b]
    if residual:
        oh = (h + 2 * pad - k) // stride + 1
        ow = (w + 2 * pad - k) // stride + 1
        r = gc.placeholder("r", (n, o, oh, ow), "float64")
        y = gc.relu(y + r)
        ins.append(r)
    return ins, y


def _epilogue_steps(f):
    (spec,) = f.program._specs.values()
    return [s for s in spec.plan.steps if getattr(s, "name", "") == "elementwise"]


@pytest.mark.parametrize("sanitize", [None, "bounds"], ids=["plain", "bounds"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1t", "2t"])
@pytest.mark.parametrize("residual", [False, True], ids=["bias_relu", "residual"])
def test_conv_bias_relu_residual_epilogue_matches_numpy(residual, threads, sanitize, monkeypatch, rng):
    import graphc.backends.llvm.conv as conv
    import graphc.backends.llvm.plan as plan
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(threads))
    monkeypatch.setattr(conv, "SPLIT_FLOPS", 0)
    monkeypatch.setattr(plan, "CONV_EPILOGUE_PARALLEL_MIN", 0)
    for cfg in CASES:
        n, c, h, w, o, k, stride, pad, wino = cfg
        monkeypatch.setenv("GRAPHC_LLVM_WINOGRAD", wino)
        ins, y = _build(n, c, h, w, o, k, stride, pad, residual)
        f = gc.function(ins, y, backend="llvm", sanitize=sanitize)
        assert any(name.startswith("fused[conv2d") for name in f.graph.op_names()), f.graph.op_names()
        vals = [rng.standard_normal(t.shape) for t in ins]
        got = f(*vals)
        ref = _conv_reference(vals[0], vals[1], (stride, stride), ((pad, pad), (pad, pad)), (1, 1), 1)
        ref = np.maximum(ref + vals[2].reshape(1, o, 1, 1), 0.0)
        if residual:
            ref = np.maximum(ref + vals[3], 0.0)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=str((cfg, residual, threads)))
        # the epilogue is one elementwise pass after the conv, marked for the pool
        eps = _epilogue_steps(f)
        assert eps and all(s.split is not None for s in eps), [(s.desc, s.split) for s in eps]


def test_epilogue_stays_on_one_thread_below_the_threshold(monkeypatch):
    """Small epilogues (under CONV_EPILOGUE_PARALLEL_MIN elements) keep the elementwise kernels' rule."""
    import graphc.backends.llvm.plan as plan
    monkeypatch.setattr(plan, "CONV_EPILOGUE_PARALLEL_MIN", 1 << 30)
    ins, y = _build(1, 17, 17, 17, 17, 3, 1, 1, True)
    f = gc.function(ins, y, backend="llvm")
    eps = _epilogue_steps(f)
    assert eps and all(s.split is None for s in eps)
    # a plain elementwise group (no conv before it) of the same size is not split by this rule
    monkeypatch.setattr(plan, "CONV_EPILOGUE_PARALLEL_MIN", 0)
    a = gc.placeholder("a", (1, 17, 17, 17), "float64")
    g = gc.function([a], gc.relu(a * 2.0 + 1.0), backend="llvm")
    assert all(s.split is None for s in _epilogue_steps(g))
