"""What a new user trips on (issue 17, "Defects" 1-10): each test failed before its fix."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from conftest import needs_torch, torch

nn = gc.nn
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh(code: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (nothing imported but what it imports)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd or ROOT)


# ---- 1. saved models with random ops reload in a fresh process --------------------------------------

def test_models_with_random_ops_load_in_a_fresh_process(tmp_path):
    x = gc.placeholder("x", (None, 4))
    h = nn.Dropout(0.5, seed=3)(gc.noisy_relu(x, training=True), training=True)
    z = h + gc.random.normal((None, 4), generator=gc.random.Generator(7))   # a VAE-style draw
    path = tmp_path / "random.graphc"
    gc.save(gc.function([x], z), path)
    code = ("import sys, numpy as np, graphc as gc\n"
            "g = gc.load(sys.argv[1])\n"
            "print(gc.function(g)(np.ones((2, 4), np.float32)).shape)\n"
            "from graphc.cli import main\n"
            "sys.exit(main(['show', sys.argv[1]]))\n")
    r = _fresh(code, str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2, 4)" in r.stdout and "random_normal" in r.stdout


# ---- 2. submodules and parameters assigned as attributes are registered -----------------------------

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Dense(4, 3, seed=0)
        self.blocks = nn.ModuleList([nn.Dense(3, 3, seed=1), nn.Dense(3, 3, seed=2)])
        self.heads = nn.ModuleDict({"cls": nn.Dense(3, 2, seed=3), "reg": nn.Dense(3, 1, seed=4)})
        self.scale = gc.parameter("scale", np.ones(2, np.float32))

    def forward(self, x, training):
        h = gc.relu(self.body(x))
        for b in self.blocks:
            h = gc.relu(b(h))
        return self.heads["cls"](h) * self.scale + self.heads["reg"](h)


def test_attribute_submodules_params_and_dotted_state_dict_keys():
    m = TwoHeads()
    keys = set(m.state_dict())
    assert keys == {"body.weight", "body.bias", "blocks.0.weight", "blocks.0.bias", "blocks.1.weight",
                    "blocks.1.bias", "heads.cls.weight", "heads.cls.bias", "heads.reg.weight", "heads.reg.bias",
                    "scale"}
    assert len(m.params) == 11
    m.eval()
    assert not m.blocks[1].training and not m.heads["reg"].training
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    np.testing.assert_array_equal(m.heads["cls"].weight.value, sd["heads.cls.weight"])
    with pytest.raises(gc.GraphcError, match="not a gc.nn.Module"):
        nn.ModuleList([gc.relu])
    with pytest.raises(gc.GraphcError, match="no module 'nope'"):
        m.heads["nope"]


def test_fit_trains_a_module_built_from_attributes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = (x @ rng.standard_normal((4, 2))).astype(np.float32)
    m = TwoHeads()
    before = m.state_dict()
    h = gc.fit(m, gc.losses.mse, gc.optim.Adam(3e-2), x, y, epochs=20, batch_size=16, progress=False)
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    assert all(not np.array_equal(v, before[k]) for k, v in m.state_dict().items())   # every part trained


@needs_torch
def test_state_dict_keys_match_torch():
    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 3)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
            self.heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(3, 2), "reg": torch.nn.Linear(3, 1)})
            self.scale = torch.nn.Parameter(torch.ones(2))
    t, m = T(), TwoHeads()
    m.load_state_dict({k: v.detach().numpy() for k, v in t.state_dict().items()})
    x = gc.placeholder("x", (None, 4))
    a = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    ta = torch.tensor(a)
    h = torch.relu(t.body(ta))
    for b in t.blocks:
        h = torch.relu(b(h))
    want = (t.heads["cls"](h) * t.scale + t.heads["reg"](h)).detach().numpy()
    np.testing.assert_allclose(gc.function([x], m(x))(a), want, rtol=1e-5, atol=1e-6)


# ---- 3. recurrent layers are modules with fresh seeds -------------------------------------------------

@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_recurrent_layers_are_modules_with_fresh_weights(kind):
    cls = getattr(nn, kind)
    a, b = cls(3, 4), cls(3, 4)
    assert isinstance(a, nn.Module) and a.training
    assert not np.array_equal(a.params[0].value, b.params[0].value)
    np.testing.assert_array_equal(cls(3, 4, seed=5).params[0].value, cls(3, 4, seed=5).params[0].value)
    assert a.eval() is a and not a.training

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(3, 4)

        def forward(self, x, training):
            return self.rnn(x, training=training)[0]
    w = Wrap()
    assert set(w.state_dict()) == {f"rnn.{k}" for k in a.state_dict()}
    w.eval()
    assert not w.rnn.training


# ---- 4. randomness stops in evaluation ----------------------------------------------------------------

def test_noisy_relu_module_and_training_aware_callables_in_sequential():
    x = gc.placeholder("x", (None, 5))
    a = np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)
    for model in (nn.Sequential(nn.NoisyReLU(seed=1)), nn.Sequential(gc.noisy_relu),
                  nn.Sequential(gc.relu, gc.dropout)):
        train = gc.function([x], model(x))
        assert not np.array_equal(train(a), train(a)), model
        model.eval()
        f = gc.function([x], model(x))
        np.testing.assert_array_equal(f(a), np.maximum(a, 0))
    with pytest.raises(gc.GraphcError, match="std must be"):
        nn.NoisyReLU(std=-1.0)


# ---- 5. second-order optimisers honour clipping, schedules and given gradients -------------------------

def _newton_case():
    w0 = np.array([0.3, -0.2])
    w = gc.parameter("wn", w0, "float64")
    loss = gc.sum(gc.exp(w)) + gc.sum(w) ** 2
    g = np.exp(w0) + 2 * w0.sum()
    H = np.diag(np.exp(w0)) + 2
    return w, w0, loss, g, H


@pytest.mark.parametrize("kind", ["Newton", "HessianFree"])
def test_second_order_optimisers_honour_clip_schedule_and_grads(kind):
    make = (lambda **kw: gc.optim.Newton(damping=0.3, **kw)) if kind == "Newton" else \
        (lambda **kw: gc.optim.HessianFree(damping=0.3, cg_iters=2, **kw))   # n = 2: CG is exact
    # clip_value: the right-hand side is clipped, the Hessian is not
    w, w0, loss, g, H = _newton_case()
    gc.function([], loss, updates=make(lr=0.5, clip_value=0.5).updates(loss, [w]))()
    np.testing.assert_allclose(w.value, w0 - 0.5 * np.linalg.solve(H + 0.3 * np.eye(2), np.clip(g, -0.5, 0.5)),
                               rtol=1e-10)
    # clip_norm
    w, w0, loss, g, H = _newton_case()
    gc.function([], loss, updates=make(lr=1.0, clip_norm=0.1).updates(loss, [w]))()
    gn = g * min(1.0, 0.1 / (np.linalg.norm(g) + 1e-6))
    np.testing.assert_allclose(w.value, w0 - np.linalg.solve(H + 0.3 * np.eye(2), gn), rtol=1e-10)
    # schedule: the second step uses lr * gamma
    w, w0, loss, g, H = _newton_case()
    opt = make(lr=1.0, schedule=gc.optim.ExponentialLR(0.5))
    step = gc.function([], loss, updates=opt.updates(loss, [w]))
    step()
    w1 = w.value.copy()
    step()
    g1, H1 = np.exp(w1) + 2 * w1.sum(), np.diag(np.exp(w1)) + 2
    np.testing.assert_allclose(w.value, w1 - 0.5 * np.linalg.solve(H1 + 0.3 * np.eye(2), g1), rtol=1e-10)
    assert opt.step.value == 2 and opt.current_lr() == 0.25
    # grads=: a different (differentiable) gradient is used, Hessian included
    w, w0, loss, g, H = _newton_case()
    half = [0.5 * gc.grad(loss, w)]
    gc.function([], loss, updates=make(lr=1.0).updates(loss, [w], grads=half))()
    np.testing.assert_allclose(w.value, w0 - np.linalg.solve(0.5 * H + 0.3 * np.eye(2), 0.5 * g), rtol=1e-10)
    with pytest.raises(gc.GraphcError, match="2 gradients for 1 parameters"):
        make().updates(loss, [w], grads=half * 2)


# ---- 6. every bad call is a GraphcError that says what was expected -----------------------------------

def test_bad_calls_raise_graphc_errors():
    x = gc.placeholder("x", (None, 3))
    with pytest.raises(gc.GraphcError, match="outputs must be a tensor or a list of tensors, got float"):
        gc.function([x], 3.0)
    with pytest.raises(gc.GraphcError, match="inputs must be a list of placeholders.*write \\[x\\]"):
        gc.function(x, x * 2)
    with pytest.raises(gc.GraphcError, match="unknown init='bogus'.*xavier_uniform"):
        nn.Dense(4, 2, init="bogus")
    with pytest.raises(gc.GraphcError, match="did you mean 'orthogonal'"):
        nn.Dense(4, 2, init="orthogonl")
    with pytest.raises(gc.GraphcError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        gc.losses.cross_entropy(x, gc.placeholder("y", (None,), "int64"), reduction="avg")
    with pytest.raises(gc.GraphcError, match="p must be a probability in \\[0, 1\\), got 1.5"):
        nn.Dropout(1.5)
    with pytest.raises(gc.GraphcError, match="optimize="):
        gc.function([x], x * 2, optimise=1)
    with pytest.raises(gc.GraphcError, match="did you mean optimize=\\?"):
        gc.function([x], x * 2, optimise=1)
    with pytest.raises(gc.GradientError, match="wrt must be a tensor or a list of tensors"):
        gc.hessian(gc.sum(x), "x")
    with pytest.raises(gc.ShapeError, match="shape must be a tuple"):
        gc.placeholder("p", 3)


def test_hessian_of_a_list_gives_blocks():
    a, b = np.array([0.5, -1.0]), np.array([[2.0]])
    w1, w2 = gc.parameter("w1", a, "float64"), gc.parameter("w2", b, "float64")
    cost = gc.sum(w1 * w1 * w1) * gc.sum(w2) + gc.sum(w2 * w2)   # (sum w1^3) w2 + w2^2
    blocks = gc.hessian(cost, [w1, w2])
    got = gc.evaluate([blocks[0][0], blocks[0][1], blocks[1][0], blocks[1][1]], {})
    np.testing.assert_allclose(got[0], np.diag(6 * a * b[0, 0]))
    np.testing.assert_allclose(got[1], (3 * a * a).reshape(2, 1, 1))
    np.testing.assert_allclose(got[2], (3 * a * a).reshape(1, 1, 2))
    np.testing.assert_allclose(got[3], np.full((1, 1, 1, 1), 2.0))
    np.testing.assert_allclose(gc.evaluate([gc.hessian(cost, w1)], {})[0], got[0])


# ---- 7. mismatched prediction / target shapes ----------------------------------------------------------

@pytest.mark.parametrize("loss", [gc.losses.mse, gc.losses.mae, gc.losses.bce_with_logits])
def test_losses_refuse_shapes_that_would_broadcast(loss):
    pred, target = gc.placeholder("pred", (None, 1)), gc.placeholder("t", (None,))
    with pytest.raises(gc.ShapeError, match=r"prediction pred has shape \(N, 1\) but target t has shape \(N,\)"):
        loss(pred, target)
    with pytest.raises(gc.ShapeError, match="must match"):
        loss(gc.placeholder("a", (4, 3)), gc.placeholder("b", (1, 3)))
    assert loss(pred, gc.placeholder("t2", (None, 1))).ndim == 0
    assert loss(pred, 0.0).ndim == 0   # a scalar target is explicit


def test_cross_entropy_probability_labels_must_match_logits():
    with pytest.raises(gc.ShapeError, match="probability labels"):
        gc.losses.cross_entropy(gc.placeholder("z", (None, 3)), gc.placeholder("p", (None, 1)))


# ---- 8. None is the shared batch dim wherever it stands -------------------------------------------------

def test_none_is_the_shared_batch_dim_on_any_axis():
    s = gc.placeholder("s", ("T", None, 3))
    h = gc.placeholder("h", (None, 3))
    assert s.shape[1] is h.shape[0]
    f = gc.function([s, h], s[0] + h)
    np.testing.assert_array_equal(f(np.ones((5, 2, 3), np.float32), np.ones((2, 3), np.float32)), np.full((2, 3), 2))
    with pytest.raises(gc.InputError, match="dim N"):
        f(np.ones((5, 2, 3), np.float32), np.ones((4, 3), np.float32))
    two = gc.placeholder("two", (None, None))   # a second None is the input's own dim
    assert two.shape[0] is h.shape[0] and two.shape[1] != two.shape[0]


# ---- 9. input dtypes ----------------------------------------------------------------------------------

def test_float64_data_into_float32_placeholder():
    x = gc.placeholder("x", (None, 2))
    a = np.arange(4.0).reshape(2, 2)
    with pytest.raises(gc.InputError, match="allow_input_downcast=True"):
        gc.function([x], x * 2)(a)
    out = gc.function([x], x * 2, allow_input_downcast=True)(a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a * 2)
    with pytest.raises(gc.InputError, match="expected dtype float32, got complex64$"):   # not a kind it converts
        gc.function([x], x * 2, allow_input_downcast=True)(np.ones((2, 2), np.complex64))
    with pytest.raises(gc.GraphcError, match="allow_input_downcast must be True or False"):
        gc.function([x], x * 2, allow_input_downcast="yes")


# ---- 10. discoverability --------------------------------------------------------------------------------

def test_dir_and_viz_after_import_graphc():
    r = _fresh("import graphc as gc\n"
               "assert {'nn', 'optim', 'losses', 'random', 'viz'} <= set(dir(gc)), dir(gc)\n"
               "print(gc.viz.to_graphml.__name__)")
    assert r.returncode == 0 and "to_graphml" in r.stdout, r.stderr[-2000:]


def test_load_of_a_single_output_function_returns_one_array(tmp_path):
    x = gc.placeholder("x", (None, 2))
    one, many = gc.function([x], x * 2), gc.function([x], [x * 2])
    gc.save(one, tmp_path / "one.graphc")
    gc.save(many, tmp_path / "many.graphc")
    a = np.ones((3, 2), np.float32)
    got = gc.function(gc.load(tmp_path / "one.graphc"))(a)
    assert isinstance(got, np.ndarray) and got.shape == (3, 2)
    assert isinstance(gc.function(gc.load(tmp_path / "many.graphc"))(a), list)


def test_onnx_export_leaves_no_unused_initializer():
    pytest.importorskip("onnx")
    from graphc.onnx_export import to_onnx
    x = gc.placeholder("x", (None, 4))
    model = nn.Sequential(nn.Dense(4, 3), nn.BatchNorm(3), gc.relu, nn.Dense(3, 2))
    m = to_onnx(gc.Graph([x], [model(x, training=False) + gc.log1p(gc.abs(x[:, :2]))]))
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    unused = [i.name for i in m.graph.initializer if i.name not in used]
    assert not unused and len(m.graph.initializer) > 0


def _bench(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def test_bench_cli_names_systems_and_workloads(tmp_path):
    r = _bench("--help", cwd=tmp_path)
    assert r.returncode == 0 and "graphc-llvm" in r.stdout and "onnxruntime" in r.stdout and "W6" in r.stdout
    r = _bench("--tiny", "--systems", "graphc-lvm", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown system 'graphc-lvm' (did you mean 'graphc-llvm'?)" in r.stderr
    r = _bench("--tiny", "--only", "W99", cwd=tmp_path)
    assert r.returncode == 2 and "unknown workload W99" in r.stderr and "Traceback" not in r.stderr


def test_bench_group_name_and_no_json_unasked(tmp_path):
    r = _bench("--tiny", "--only", "W1", "--systems", "graphc", "--keep-env", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in ("graphc-numpy O0", "graphc-numpy O2", "graphc-llvm"):
        assert s in r.stderr
    assert os.listdir(tmp_path) == [], "files written unasked"


def test_bench_workload_ids_agree_with_the_workloads():
    sys.path.insert(0, ROOT)
    from benchmarks import __main__ as bench, workloads
    ids = [w.id.split()[0] for w in workloads.selected_workloads("tiny")]
    assert list(dict.fromkeys(ids)) == list(bench.WORKLOAD_IDS)
