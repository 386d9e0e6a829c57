"""Quantised inference rows: W1 b256 (MLP) and W3 b64 (LeNet), float32 against int8.

    python -m benchmarks.quantized [--quick] [--only W1]

Systems per workload (medians of the harness's timing, min in parentheses):
- graphc llvm float32: benchmarks.systems' function (what `python -m benchmarks` times);
- graphc llvm int8 (gc.quantize): gc.quantize of that function, calibrated on 4 batches of the workload's
  input distribution (llvm: int8 weights, uint8 activations, requantising epilogues);
- ONNX Runtime float32: benchmarks.peers' model;
- ONNX Runtime int8: that model through onnxruntime.quantization.quantize_static (QDQ, uint8 activations,
  int8 weights with reduce_range: ONNX Runtime's own advice on hosts without VNNI), same calibration;
- graphc llvm int8 (ORT's model): the same quantised ONNX file through gc.load_onnx on llvm.
`err` is the largest absolute difference from the float64 reference (W1: softmax probabilities; W3:
logits); `agree` the fraction of rows whose argmax matches it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from . import harness, peers, systems, workloads

BUILDS = {"W1": lambda: workloads.w1(256), "W3": lambda: workloads.w3(64)}


def _calibration(wl, rng, n=4):
    x = wl.data["x"]
    return [rng.standard_normal(x.shape).astype(np.float32) for _ in range(n)]


def _onnx_models(wl, calib):
    """(float32 model bytes, QDQ int8 model bytes, input feeds) built with ONNX Runtime's quantiser."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    k = systems.wid(wl)
    nodes, inits, feeds, out = peers._onnx_graph(k, wl.data, helper, numpy_helper, wl)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"] + list(v.shape[1:])) for n, v in feeds.items()]
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    m = helper.make_model(helper.make_graph(nodes, k, ins, outs, inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    fbytes = m.SerializeToString()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c} for c in calib])

        def get_next(self):
            return next(self.it, None)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        with open(src, "wb") as fh:
            fh.write(fbytes)
        import logging
        logging.getLogger().setLevel(logging.ERROR)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, reduce_range=True)
        with open(dst, "rb") as fh:
            qbytes = fh.read()
    return fbytes, qbytes, feeds


def _ort(model: bytes, feeds):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if peers._threads():
        opts.intra_op_num_threads = peers._threads()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)[0]


def rows(quick: bool = False, only=None) -> dict:
    import graphc as gc
    rng = np.random.default_rng(14)
    results = {}
    for key, build in BUILDS.items():
        if only and key not in only:
            continue
        wl = build()
        calib = _calibration(wl, rng)
        x = wl.data["x"]
        runs = {}
        t0 = time.perf_counter()
        fl = systems.graphc_builder("llvm", 2)(wl)
        runs["graphc llvm float32"] = (fl, time.perf_counter() - t0)
        t0 = time.perf_counter()
        qf = gc.quantize(fl.function, calib)
        q = lambda qf=qf: qf(x)   # noqa: E731
        q()
        runs["graphc llvm int8 (gc.quantize)"] = (q, time.perf_counter() - t0)
        try:
            fbytes, qbytes, feeds = _onnx_models(wl, calib)
            runs["ONNX Runtime float32"] = (_ort(fbytes, feeds), 0.0)
            runs["ONNX Runtime int8 (QDQ)"] = (_ort(qbytes, feeds), 0.0)
            t0 = time.perf_counter()
            g = gc.function(_load(qbytes), backend="llvm")
            gq = lambda g=g: g(x)[0]   # noqa: E731
            gq()
            runs["graphc llvm int8 (ORT's model)"] = (gq, time.perf_counter() - t0)
        except ImportError as e:
            print(f"{key}: ONNX Runtime rows skipped ({e})")
        table = {}
        ref = wl.reference
        for name, (fn, build_s) in runs.items():
            out = np.asarray(fn())
            if out.ndim == 1 or out.shape != ref.shape:
                out = out.reshape(ref.shape)
            t = harness.time_calls(fn, quick)
            table[name] = {**t, "build_s": build_s, "err": float(np.abs(out - ref).max()),
                           "agree": float((out.argmax(1) == ref.argmax(1)).mean())}
        results[wl.id] = table
    return results


def _load(qbytes: bytes):
    import onnx
    import graphc as gc
    return gc.load_onnx(onnx.load_from_string(qbytes))


def format_table(results: dict) -> str:
    lines = []
    for wid, table in results.items():
        base = table.get("graphc llvm float32", {}).get("median")
        lines.append(f"{wid}")
        lines.append(f"  {'system':34s} {'median (min)':>22s} {'vs graphc f32':>14s} {'err':>9s} {'agree':>6s}")
        for name, r in table.items():
            rel = f"{base / r['median']:.2f}x" if base else "-"
            lines.append(f"  {name:34s} {harness.fmt_time(r['median']):>10s} ({harness.fmt_time(r['min']):>9s}) "
                         f"{rel:>14s} {r['err']:9.2e} {r['agree']:6.3f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing samples")
    ap.add_argument("--only", nargs="*", help="W1 and/or W3")
    a = ap.parse_args(argv)
    env = harness.environment()
    print(f"CPU: {env.get('processor', '?')}, {env.get('cores')} cores, load {env.get('loadavg')}; int8 GEMM flavour: "
          f"{_flavour()} (a shared, loaded machine: compare ratios within one run)")
    print(format_table(rows(a.quick, a.only)))


def _flavour() -> str:
    from graphc.backends.llvm import qgemm
    return qgemm.isa()


if __name__ == "__main__":
    main()
