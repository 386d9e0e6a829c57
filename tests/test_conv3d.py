"""Conv3D, ConvTranspose2D, MaxPool3D, AvgPool3D and padding='full' against torch 2.13 (same weights
through load_state_dict, same inputs; outputs and gradients on every backend), their state-dict
layouts and default initialisation, a small model that compiles with no host fallback on llvm, and
their argument checks. The op table (tests/cases_conv3d.py) checks the functions against loop
references on every backend, with finite-difference gradients."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from conftest import backend_or_skip, needs_torch, torch

nn = gc.nn


def _torch_state(tm):
    return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


def _check_against_torch(gm, tm, shape, backend, grads=True, seed=0):
    """Outputs and (for layers with parameters) gradients of sum(y * r) in x and every parameter."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    ta = torch.tensor(a, requires_grad=True)
    ty = tm(ta)
    r = rng.standard_normal(tuple(ty.shape))
    x = gc.placeholder("x", (None,) + shape[1:], "float64")
    y = gm(x)
    outs = [y]
    wrt = [x] + list(gm.params)
    if grads:
        outs += gc.grad((y * gc.constant(r)).sum(), wrt)
    got = gc.function([x], outs, backend=backend)(a)
    np.testing.assert_allclose(got[0], ty.detach().numpy(), rtol=1e-10, atol=1e-11)
    if grads:
        (ty * torch.tensor(r)).sum().backward()
        want = [ta.grad] + [p.grad for p in tm.parameters()]
        assert len(want) == len(got) - 1
        for g, w in zip(got[1:], want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-9, atol=1e-10)


CONV3D = [
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (2, 2, 3, 4, 3)),
    (dict(in_channels=4, out_channels=6, kernel_size=(2, 3, 2), stride=(2, 1, 2), padding=(1, 0, 1),
          dilation=(1, 2, 1), groups=2), (1, 4, 5, 6, 4)),
    (dict(in_channels=3, out_channels=3, kernel_size=2, padding="same", groups=3, bias=False), (2, 3, 3, 3, 4)),
]

CONVT = [
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2),
     (2, 4, 3, 3)),
    (dict(in_channels=3, out_channels=4, kernel_size=(2, 3), stride=(1, 2), padding=(0, 1), output_padding=(0, 1),
          dilation=(2, 1)), (1, 3, 4, 3)),
    (dict(in_channels=2, out_channels=2, kernel_size=3, output_padding=1, dilation=2, bias=False), (1, 2, 2, 3)),
]


@needs_torch
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("kw,shape", CONV3D, ids=["pad1", "stride_dil_groups", "same_depthwise"])
def test_conv3d_matches_torch(kw, shape, backend):
    tm = torch.nn.Conv3d(**kw).double()
    gm = nn.Conv3D(**kw, dtype="float64")
    gm.load_state_dict(_torch_state(tm))
    _check_against_torch(gm, tm, shape, backend)


@needs_torch
@pytest.mark.parametrize("kw,shape", CONVT, ids=["stride_opad_groups", "dilation", "opad_past_padding"])
def test_conv_transpose2d_matches_torch(kw, shape, backend):
    tm = torch.nn.ConvTranspose2d(**kw).double()
    gm = nn.ConvTranspose2D(**kw, dtype="float64")
    gm.load_state_dict(_torch_state(tm))
    _check_against_torch(gm, tm, shape, backend)


@needs_torch
@pytest.mark.parametrize("make,make_torch,shape", [
    (lambda: nn.MaxPool3D(2), lambda: torch.nn.MaxPool3d(2), (2, 2, 4, 5, 4)),
    (lambda: nn.MaxPool3D((3, 2, 3), (2, 1, 2), (1, 1, 1)), lambda: torch.nn.MaxPool3d((3, 2, 3), (2, 1, 2), (1, 1, 1)),
     (1, 2, 5, 4, 6)),
    (lambda: nn.AvgPool3D(2, 1), lambda: torch.nn.AvgPool3d(2, 1), (2, 2, 3, 4, 3)),
    (lambda: nn.AvgPool3D(3, 2, 1, count_include_pad=False),
     lambda: torch.nn.AvgPool3d(3, 2, 1, count_include_pad=False), (1, 2, 5, 4, 5)),
], ids=["max", "max_pad", "avg", "avg_no_pad_count"])
def test_pool3d_matches_torch(make, make_torch, shape, backend):
    _check_against_torch(make(), make_torch(), shape, backend)


@needs_torch
def test_state_dict_layouts_and_default_init_match_torch():
    for gm, tm in [(nn.Conv3D(4, 6, (2, 3, 1), groups=2), torch.nn.Conv3d(4, 6, (2, 3, 1), groups=2)),
                   (nn.ConvTranspose2D(4, 6, 3, groups=2), torch.nn.ConvTranspose2d(4, 6, 3, groups=2)),
                   (nn.ConvTranspose2D(3, 5, (2, 3), bias=False), torch.nn.ConvTranspose2d(3, 5, (2, 3), bias=False))]:
        sd, tsd = gm.state_dict(), tm.state_dict()
        assert list(sd) == list(tsd)
        assert {k: v.shape for k, v in sd.items()} == {k: tuple(v.shape) for k, v in tsd.items()}
        fan_in = torch.nn.init._calculate_fan_in_and_fan_out(tm.weight)[0]
        bound = 1 / np.sqrt(fan_in)   # torch's kaiming_uniform(a=sqrt(5)) and bias bound
        for v in sd.values():
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound
    a, b = nn.ConvTranspose2D(2, 2, 3), nn.ConvTranspose2D(2, 2, 3)
    assert not np.array_equal(a.weight.value, b.weight.value)          # fresh draws unless seeded
    np.testing.assert_array_equal(nn.Conv3D(2, 2, 2, seed=3).weight.value, nn.Conv3D(2, 2, 2, seed=3).weight.value)


@needs_torch
@pytest.mark.parametrize("make,make_torch,shape", [
    (lambda: nn.Conv1D(2, 3, 3, padding="full", dilation=2, dtype="float64"),
     lambda: torch.nn.Conv1d(2, 3, 3, padding=4, dilation=2), (2, 2, 5)),
    (lambda: nn.Conv2D(2, 3, (3, 2), padding="full", dtype="float64"),
     lambda: torch.nn.Conv2d(2, 3, (3, 2), padding=(2, 1)), (1, 2, 4, 3)),
    (lambda: nn.Conv3D(2, 2, (2, 1, 3), padding="full", stride=(1, 1, 2), dtype="float64"),
     lambda: torch.nn.Conv3d(2, 2, (2, 1, 3), padding=(1, 0, 2), stride=(1, 1, 2)), (1, 2, 2, 3, 4)),
], ids=["conv1d", "conv2d", "conv3d"])
def test_padding_full_is_kernel_minus_one_each_side(make, make_torch, shape):
    gm, tm = make(), make_torch().double()
    gm.load_state_dict(_torch_state(tm))
    _check_against_torch(gm, tm, shape, "numpy")
    x = gc.placeholder("x", shape, "float64")
    if gm.cfg["stride"] == 1:  # the 'full' output is longer by dilation * (kernel - 1) on every axis
        d, k = gm.cfg["dilation"], gm.kernel_size
        d = (d,) * len(k) if isinstance(d, int) else d
        assert gm(x).shape[2:] == tuple(s + di * (ki - 1) for s, di, ki in zip(shape[2:], d, k))


def _small_model(seed=0):
    return nn.Sequential(
        nn.Conv3D(2, 4, 3, padding=1, seed=seed), gc.relu, nn.MaxPool3D(2),          # (N, 4, 2, 3, 3)
        nn.Conv3D(4, 4, (2, 1, 1), groups=2, padding="full", seed=seed + 1),         # (N, 4, 3, 3, 3)
        nn.AvgPool3D((3, 1, 1)),                                                     # (N, 4, 1, 3, 3)
        nn.Lambda(lambda t: gc.reshape(t, (-1, 4, 3, 3))),
        nn.ConvTranspose2D(4, 2, 3, stride=2, padding=1, output_padding=1, seed=seed + 2))  # (N, 2, 6, 6)


def test_small_model_compiles_natively_and_trains():
    """Every op of the forward pass and of an SGD training step is native on llvm (no host
    fallback) and both agree with the numpy backend; the loss goes down."""
    backend_or_skip("llvm")
    model = _small_model()
    x = gc.placeholder("x", (None, 2, 4, 6, 6))
    t = gc.placeholder("t", (None, 2, 6, 6))
    y = model(x)
    assert y.shape == (gc.shapes.dim_symbol("N"), 2, 6, 6)
    loss = gc.losses.mse(y, t)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 2, 4, 6, 6)).astype(np.float32)
    b = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    fwd = gc.function([x, t], [y] + gc.grad(loss, model.params + [x]), backend="llvm")
    assert fwd.program.info["fallback_ops"] == []
    ref = gc.function([x, t], [y] + gc.grad(loss, model.params + [x]))(a, b)
    for got, want in zip(fwd(a, b), ref):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    step = gc.function([x, t], loss, updates=gc.optim.SGD(0.05).updates(loss, model.params), backend="llvm")
    assert step.program.info["fallback_ops"] == []
    first = step(a, b)
    for _ in range(5):
        last = step(a, b)
    assert last < first


def test_argument_errors_are_graphc_errors():
    x5 = gc.placeholder("x5", (None, 2, 4, 4, 4))
    x4 = gc.placeholder("x4", (None, 4, 3, 3))
    w5 = gc.constant(np.zeros((3, 2, 2, 2, 2), np.float32))
    with pytest.raises(gc.ShapeError, match=r"\(N, C, D, H, W\)"):
        gc.conv3d(x4, w5)
    with pytest.raises(gc.ShapeError, match="channels"):
        gc.conv3d(x5, gc.constant(np.zeros((3, 1, 2, 2, 2), np.float32)))
    with pytest.raises(gc.ShapeError, match="divide by groups"):
        gc.conv3d(x5, gc.constant(np.zeros((3, 1, 2, 2, 2), np.float32)), groups=2)
    with pytest.raises(gc.ShapeError, match="'full'"):
        gc.conv3d(x5, w5, padding="bogus")
    with pytest.raises(gc.ShapeError, match="larger than the padded input"):
        gc.conv3d(x5, gc.constant(np.zeros((3, 2, 5, 1, 1), np.float32)))
    wt = gc.constant(np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(gc.ShapeError, match="output_padding"):
        gc.conv_transpose2d(x4, wt, stride=2, output_padding=2)
    with pytest.raises(gc.ShapeError, match="expects 4"):
        gc.conv_transpose2d(gc.placeholder("x3", (None, 3, 3, 3)), wt)
    with pytest.raises(gc.ShapeError, match="not positive"):
        gc.conv_transpose2d(gc.placeholder("one", (1, 4, 1, 1)), wt, padding=2)
    with pytest.raises(gc.DTypeError):
        gc.conv_transpose2d(gc.placeholder("i", (1, 4, 3, 3), "int32"), wt)
    with pytest.raises(gc.ShapeError, match="must divide by groups"):
        nn.ConvTranspose2D(3, 4, 3, groups=2)
    with pytest.raises(gc.ShapeError, match=r"\(N, C, D, H, W\)"):
        gc.max_pool3d(x4, 2)
    with pytest.raises(gc.ShapeError, match="at most half the kernel"):
        gc.avg_pool3d(x5, 2, padding=(0, 2, 0))
    with pytest.raises(gc.ShapeError, match="kernel_size"):
        nn.MaxPool3D((2, 2))(x5)


@needs_torch
def test_symbolic_batch_and_spatial_dims(backend):
    """Batch, height and width left symbolic: one compiled function serves every size, like torch."""
    TF = torch.nn.functional
    rng = np.random.default_rng(2)
    w, wt = rng.standard_normal((4, 2, 3, 2, 3)), rng.standard_normal((4, 3, 3, 3))
    x = gc.placeholder("x", (None, 2, 4, "H", "W"), "float64")
    xs = gc.placeholder("xs", (None, 4, "H", "W"), "float64")
    outs = [gc.conv3d(x, gc.constant(w), None, (1, 2, 1), (1, 0, 1)),
            gc.conv_transpose2d(xs, gc.constant(wt), None, 2, 0, 1),
            gc.conv_transpose2d(xs, gc.constant(wt), None, 1, 0, 1, 1, 2),
            gc.max_pool3d(x, 2, padding=(1, 0, 1)), gc.avg_pool3d(x, 3, 1, 1)]
    f = gc.function([x, xs], outs, backend=backend)
    for n, h, wd in [(2, 5, 4), (1, 3, 6)]:
        a, b = rng.standard_normal((n, 2, 4, h, wd)), rng.standard_normal((n, 4, h, wd))
        ta, tb = torch.tensor(a), torch.tensor(b)
        want = [TF.conv3d(ta, torch.tensor(w), None, (1, 2, 1), (1, 0, 1)),
                TF.conv_transpose2d(tb, torch.tensor(wt), None, 2, 0, 1),
                TF.conv_transpose2d(tb, torch.tensor(wt), None, 1, 0, 1, 1, 2),
                TF.max_pool3d(ta, 2, padding=(1, 0, 1)), TF.avg_pool3d(ta, 3, 1, 1)]
        for got, t in zip(f(a, b), want):
            np.testing.assert_allclose(got, t.numpy(), rtol=1e-10, atol=1e-11)


def test_onnx_export_of_the_compositions_matches(tmp_path):
    """The layers are compositions of exported ops, so a model using them exports and ONNX Runtime agrees."""
    ort = pytest.importorskip("onnxruntime")
    model = _small_model(seed=3)
    x = gc.placeholder("x", (2, 2, 4, 6, 6))
    f = gc.function([x], model(x))
    gc.export_onnx(f, str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    a = np.random.default_rng(4).standard_normal((2, 2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: a})[0], f(a), rtol=1e-5, atol=1e-6)
