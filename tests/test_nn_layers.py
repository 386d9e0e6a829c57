"""gc.nn layers: signatures, shapes, .params, train/eval, Sequential with plain callables,
residual blocks, state dicts (PyTorch's names and shapes, so torch weights load), initialisers."""
from __future__ import annotations

import math

import numpy as np
import pytest

import graphc as gc

nn = gc.nn
from conftest import needs_torch, torch


def test_layer_signatures_and_shapes():
    x = gc.placeholder("x", (None, 3, 12, 12))
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, 1, 1), nn.BatchNorm(8), gc.relu, nn.MaxPool2D(2),            # 8x6x6
        nn.Conv2D(8, 8, 3, stride=2, padding=1, dilation=1, groups=2), nn.AvgPool2D(3, 1, 1),  # 8x3x3
        nn.Flatten(), nn.Dropout(0.3), nn.Dense(72, 5), lambda t: gc.log_softmax(t))
    y = model(x)
    assert y.shape == (gc.shapes.dim_symbol("N"), 5)
    assert [p.shape for p in model.params] == [(8, 3, 3, 3), (8,), (8,), (8,), (8, 4, 3, 3), (8,), (5, 72), (5,)]
    assert len(model.buffers) == 2
    out = gc.function([x], y)(np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32))
    np.testing.assert_allclose(np.exp(out).sum(1), 1, rtol=1e-5)


def test_training_flag_and_train_eval_modes():
    x = gc.placeholder("x", (None, 4))
    model = nn.Sequential(nn.Dense(4, 4, seed=0), nn.Dropout(0.5, seed=1))
    a = np.ones((2, 4), np.float32)
    det = gc.function([x], model(x, training=False))
    np.testing.assert_array_equal(det(a), det(a))
    train = gc.function([x], model(x))               # modules train by default
    assert not np.array_equal(train(a), train(a))
    model.eval()
    np.testing.assert_array_equal(gc.function([x], model(x))(a), det(a))
    assert model.train() is model and model[1].training


def test_dense_and_conv_load_torch_weights():
    sd = {"0.weight": np.arange(6.0).reshape(2, 3), "0.bias": np.array([1.0, -1.0])}
    m = nn.Sequential(nn.Dense(3, 2))
    m.load_state_dict(sd)
    x = gc.placeholder("x", (None, 3))
    np.testing.assert_allclose(gc.function([x], m(x))(np.ones((1, 3), np.float32)), [[4.0, 11.0]])
    with pytest.raises(gc.GraphcError, match="missing"):
        m.load_state_dict({"0.weight": sd["0.weight"]})


@needs_torch
def test_same_weights_as_torch_same_outputs():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                             torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    gm = nn.Sequential(nn.Conv2D(2, 4, 3, padding=1, dtype="float64"), nn.BatchNorm(4, dtype="float64"), gc.relu,
                       nn.MaxPool2D(2), nn.Flatten(), nn.Dense(16, 3, dtype="float64"))
    sd = {k: v.numpy() for k, v in tm.state_dict().items() if "num_batches" not in k}
    gm.load_state_dict(sd)
    a = np.random.default_rng(1).standard_normal((3, 2, 4, 4))
    x = gc.placeholder("x", (None, 2, 4, 4), "float64")
    tm.train()
    want = tm(torch.tensor(a)).detach().numpy()
    np.testing.assert_allclose(gc.function([x], gm(x, training=True))(a), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gm[1].running_mean.value, tm[1].running_mean.numpy(), rtol=1e-12)
    tm.eval()
    np.testing.assert_allclose(gc.function([x], gm(x, training=False))(a), tm(torch.tensor(a)).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


def test_residual_and_basic_block():
    x = gc.placeholder("x", (None, 4))
    d = nn.Dense(4, 4, seed=0)
    r = nn.Residual(d, activation=gc.relu)
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = np.maximum(a @ d.weight.value.T + d.bias.value + a, 0)
    np.testing.assert_allclose(gc.function([x], r(x))(a), want, rtol=1e-5, atol=1e-6)
    assert r.params == d.params
    img = gc.placeholder("img", (None, 3, 8, 8))
    blk = nn.BasicBlock(3, 6, stride=2, seed=0)
    y = blk(img)
    assert y.shape[1:] == (6, 4, 4) and len(blk.params) == 9 and len(blk.buffers) == 6
    loss = gc.mean(y ** 2)
    f = gc.function([img], loss, updates=gc.optim.SGD(0.1).updates(loss, blk.params))
    b = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    l0 = f(b)
    for _ in range(5):
        f(b)
    assert f(b) < l0


def test_other_layers():
    e = nn.Embedding(10, 3, seed=0)
    i = gc.placeholder("i", (None, 5), "int64")
    out = gc.function([i], e(i))(np.array([[1, 2, 3, 4, 9]]))
    np.testing.assert_array_equal(out[0], e.weight.value[[1, 2, 3, 4, 9]])
    ln = nn.LayerNorm(6)
    x = gc.placeholder("x", (None, 6))
    y = gc.function([x], ln(x))(np.arange(12, dtype=np.float32).reshape(2, 6))
    np.testing.assert_allclose(y.mean(1), 0, atol=1e-6)
    c1 = nn.Conv1D(2, 3, 3, padding="same")
    s = gc.placeholder("s", (None, 2, 7))
    assert c1(s).shape[1:] == (3, 7)
    for act in (nn.ReLU(), nn.Tanh(), nn.GELU(), nn.ELU(0.5), nn.SELU(), nn.LeakyReLU(0.2), nn.Softplus(),
                nn.Sigmoid(), nn.Maxout(2), nn.Softmax()):
        assert act(x).shape[0] == gc.shapes.dim_symbol("N")
    with pytest.raises(gc.ShapeError, match="last dim should be 6"):
        nn.Dense(6, 2)(gc.placeholder("z", (None, 5)))
    with pytest.raises(gc.ShapeError, match="axis 1 should be 4"):
        nn.BatchNorm(4)(gc.placeholder("z", (None, 5)))
    with pytest.raises(gc.GraphcError, match="not callable"):
        nn.Sequential(3)


def test_sequential_with_recurrent_layer():
    x = gc.placeholder("seq", (None, 5, 3))
    m = nn.Sequential(nn.LSTM(3, 4), lambda t: t[:, -1], nn.Dense(4, 2))
    assert len(m.params) == 6
    assert gc.function([x], m(x))(np.ones((2, 5, 3), np.float32)).shape == (2, 2)


def test_initialisers_statistics_and_seeding():
    shape = (200, 300)
    fi, fo = 300, 200
    x = gc.init.xavier_uniform(shape, seed=0)
    assert np.abs(x).max() <= math.sqrt(6 / (fi + fo)) and x.std() == pytest.approx(math.sqrt(2 / (fi + fo)), rel=0.03)
    assert gc.init.xavier_normal(shape, seed=0).std() == pytest.approx(math.sqrt(2 / (fi + fo)), rel=0.03)
    assert gc.init.kaiming_normal(shape, seed=0).std() == pytest.approx(math.sqrt(2 / fi), rel=0.03)
    assert np.abs(gc.init.kaiming_uniform(shape, seed=0)).max() <= math.sqrt(6 / fi)
    assert gc.init.fans((8, 4, 3, 3)) == (36, 72)
    q = gc.init.orthogonal((5, 8), seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-6)
    q = gc.init.orthogonal((8, 5), seed=1)
    np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-6)
    np.testing.assert_array_equal(gc.init.normal((3,), seed=4), gc.init.normal((3,), seed=4))
    gc.init.seed(7)
    a = nn.Dense(3, 3).weight.value
    gc.init.seed(7)
    np.testing.assert_array_equal(nn.Dense(3, 3).weight.value, a)
    np.testing.assert_array_equal(nn.Dense(3, 3, seed=2).weight.value, nn.Dense(3, 3, seed=2).weight.value)
    assert gc.init.zeros((2,)).sum() == 0 and gc.init.ones((2,)).sum() == 2


def test_cnn_training_step_on_every_backend(backend):
    """Loss and gradients of a CNN (conv, batch norm, max/avg pool, dropout) on each backend
    equal the NumPy backend's; the dropout generator is reseeded so both draw the same mask."""
    gen = gc.random.Generator(0)
    model = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1, seed=0, dtype="float64"), nn.BatchNorm(4, dtype="float64"),
                          gc.relu, nn.MaxPool2D(2), nn.AvgPool2D(2, 1), nn.Flatten(),
                          nn.Dropout(0.3, generator=gen), nn.Dense(36, 3, seed=1, dtype="float64"))
    x = gc.placeholder("x", (None, 1, 8, 8), "float64")
    y = gc.placeholder("y", (None,), "int64")
    loss = gc.losses.cross_entropy(model(x, training=True), y)
    outs = [loss] + gc.grad(loss, model.params)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 1, 8, 8)), rng.integers(0, 3, 5)
    results = []
    for be in ("numpy", backend):
        f = gc.function([x, y], outs, backend=be)
        gen.seed(0)
        results.append(f(a, b))
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_layer_errors_name_the_users_line():
    with pytest.raises(gc.ShapeError, match=r"called at .*test_nn_layers.py:\d+"):
        nn.Dense(6, 2)(gc.placeholder("z", (None, 5)))
