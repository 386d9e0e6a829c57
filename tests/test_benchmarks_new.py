"""W7-W10 (benchmarks/WORKLOADS.md): each workload's float64 reference against torch (an independent
implementation), graphc's output on numpy and llvm against the reference, tiny sizes; the suite's
--save report and --quick selection."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import harness, systems, workloads as W  # noqa: E402


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float32)
    return torch


def test_w7_reference_is_torchs_encoder_layer():
    torch = _torch()
    wl = W.w7(2, "tiny")
    d = wl.data
    layer = torch.nn.TransformerEncoderLayer(d["x"].shape[2], W.heads_of(wl), d["linear1.weight"].shape[0],
                                             dropout=0.0, batch_first=True).double()
    layer.load_state_dict({k: torch.from_numpy(v).double() for k, v in d.items() if k != "x"})
    layer.eval()
    with torch.no_grad():
        want = layer(torch.from_numpy(d["x"]).double()).numpy()
    np.testing.assert_allclose(wl.reference, want, rtol=1e-10, atol=1e-10)


def _torch_sgd_step(torch, d, lr, forward):
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in d.items() if k not in ("x", "y")}
    loss = torch.nn.functional.cross_entropy(forward(P, torch.from_numpy(d["x"]).double()), torch.from_numpy(d["y"]))
    loss.backward()
    return np.concatenate([(P[k] - lr * P[k].grad).detach().numpy().ravel() for k in sorted(P)])


def test_w8_reference_is_torchs_lenet_sgd_step():
    torch = _torch()
    F = torch.nn.functional
    wl = W.w8("tiny")

    def lenet(P, x):
        h = F.max_pool2d(F.relu(F.conv2d(x, P["c1w"], P["c1b"], padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, P["c2w"], P["c2b"])), 2).flatten(1)
        h = F.relu(h @ P["f1w"] + P["f1b"])
        return F.relu(h @ P["f2w"] + P["f2b"]) @ P["f3w"] + P["f3b"]
    want = _torch_sgd_step(torch, wl.data, W.W8_LR, lenet)
    np.testing.assert_allclose(wl.reference, want, rtol=1e-9, atol=1e-12)
    assert not np.allclose(want, np.concatenate([wl.data[k].ravel() for k in sorted(wl.data) if k not in "xy"]),
                           atol=1e-6), "the step changed nothing: the check would pass vacuously"


def test_w9_reference_is_torchs_lstm_sgd_step():
    torch = _torch()
    wl = W.w9("tiny")
    d = wl.data
    lstm = torch.nn.LSTM(d["x"].shape[2], d["whh"].shape[1], batch_first=True).double()
    keys = {"wih": "weight_ih_l0", "whh": "weight_hh_l0", "bih": "bias_ih_l0", "bhh": "bias_hh_l0"}

    def forward(P, x):
        h = torch.func.functional_call(lstm, {keys[k]: P[k] for k in keys}, (x,))[1][0][0]
        return h @ P["hw"] + P["hb"]
    np.testing.assert_allclose(wl.reference, _torch_sgd_step(torch, d, W.W9_LR, forward), rtol=1e-9, atol=1e-12)


def test_w10_resnet18_has_torchvisions_layout():
    torch = _torch()
    from benchmarks.resnet import resnet18
    m = resnet18(torch)
    sd = m.state_dict()
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                  "num_batches_tracked"))) == 11_689_512
    for k, shape in (("conv1.weight", (64, 3, 7, 7)), ("layer1.0.conv1.weight", (64, 64, 3, 3)),
                     ("layer2.0.downsample.0.weight", (128, 64, 1, 1)), ("layer4.1.bn2.running_var", (512,)),
                     ("fc.weight", (1000, 512))):
        assert tuple(sd[k].shape) == shape, k
    assert len([k for k in sd if k.endswith(".weight")]) == 41   # 20 convs, 20 batch norms, fc


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("make", [lambda: W.w7(2, "tiny"), lambda: W.w8("tiny"), lambda: W.w9("tiny"),
                                  lambda: W.w10(2, "tiny")], ids=["W7", "W8", "W9", "W10"])
def test_graphc_matches_each_new_workloads_reference(backend, make):
    wl = make()
    if any(n.startswith("missing") for n in wl.notes):
        pytest.skip(wl.notes[0])
    if backend == "llvm":
        from conftest import backend_or_skip
        backend_or_skip("llvm")
    out = systems.graphc_builder(backend, 2)(wl)()
    assert harness.check(out, wl.reference, wl.id) is None
    # the check itself fails on a wrong answer
    assert harness.check(np.asarray(out) * 1.01, wl.reference, wl.id) is not None


def test_numpy_peer_matches_reference():
    for wl in (W.w7(1, "tiny"), W.w8("tiny"), W.w9("tiny")):
        assert harness.check(systems.numpy_build(wl)(), wl.reference, wl.id) is None, wl.id


def _bench(*args, env=None, cwd=ROOT):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def test_suite_runs_new_workloads_and_saves_per_cpu_results(tmp_path):
    pytest.importorskip("torch")
    r = _bench("--tiny", "--only", "W7,W8,W9,W10", "--systems", "numpy,graphc-llvm,onnxruntime", "--save",
               env={"GRAPHC_BENCH_RESULTS_DIR": str(tmp_path / "results")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = list((tmp_path / "results").glob("*.json"))
    assert len(saved) == 1 and saved[0].stem == harness.cpu_slug(harness._cpu_name())
    res = json.loads(saved[0].read_text())["results"]
    assert sorted(res) == ["W10 b1", "W10 b2", "W7 b1", "W7 b2", "W8", "W9"]
    for wl, row in res.items():
        assert row["graphc-llvm"]["status"] == "ok", (wl, row["graphc-llvm"])
        for system, cell in row.items():
            assert not cell["status"].startswith("WRONG"), (wl, system, cell)
    assert res["W8"]["onnxruntime"]["status"] == "-"   # inference only
    assert sorted(os.listdir(tmp_path)) == ["results"], "files written unasked"


def test_quick_leaves_w10_out_unless_named():
    from benchmarks import __main__ as bench
    args = bench._args(["--quick", "--tiny", "--only", "W9"])
    assert [w.id for w in bench._selected(args)[0]] == ["W9"]
    args = bench._args(["--quick", "--tiny", "--only", "W10 b1"])
    assert [w.id for w in bench._selected(args)[0]] == ["W10 b1"]
    assert "W10" in bench.SLOW and "W10" in bench.WORKLOAD_IDS


def test_cpu_slug():
    assert harness.cpu_slug("AMD EPYC (family 23 model 49)") == "amd-epyc-family-23-model-49"


def test_save_keeps_the_workloads_a_partial_run_left_out(tmp_path):
    """--save of a `--only W10` run keeps the other workloads' figures of the file saved before for the CPU,
    marked as kept from that earlier run; a workload measured again replaces its old row."""
    from benchmarks import __main__ as bench
    ok = {"status": "ok", "min": 1.0, "median": 1.0}
    path = tmp_path / "cpu.json"
    old = {"environment": {"loadavg": [0.5]}, "copy_bandwidth_Bps": 1.8e10, "call_overhead_s": 2e-6,
           "results": {"W1 b1": {"numpy": ok, "graphc-llvm": ok}, "W10 b1": {"graphc-llvm": {**ok, "median": 9.0}}}}
    path.write_text(json.dumps(old))
    new = {"environment": {"loadavg": [0.1]}, "results": {"W10 b1": {"graphc-llvm": ok, "torch": ok}}}
    merged, names = bench._merge_saved(str(path), new, ["graphc-llvm", "torch"])
    assert list(merged["results"]) == ["W1 b1", "W10 b1"]
    assert merged["results"]["W10 b1"]["graphc-llvm"]["median"] == 1.0
    assert merged["kept_from_earlier_run"] == {"W1 b1": {"loadavg": [0.5], "copy_bandwidth_Bps": 1.8e10,
                                                         "call_overhead_s": 2e-6}}
    assert names == ["graphc-llvm", "torch", "numpy"]
    # nothing saved before (or an unreadable file): this run's payload as it is
    assert bench._merge_saved(str(tmp_path / "none.json"), new, ["torch"]) == (new, ["torch"])
