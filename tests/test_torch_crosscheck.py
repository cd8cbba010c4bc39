"""Optional cross-check against PyTorch (float64), run only where torch is installed.

PyTorch is one oracle among several: every op is first checked against NumPy references
and finite differences in test_ops.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sclref
from sclref import Tensor, nn, ops
from tests.strategies import arrays, batch_norm_shapes, conv_geometry, distinct_arrays, pool_geometry

torch = pytest.importorskip("torch")
F = torch.nn.functional


def grads_of(loss_fn_sclref, loss_fn_torch, *inputs):
    ts = [Tensor(a, requires_grad=True) for a in inputs]
    loss_fn_sclref(*ts).backward()
    tt = [torch.tensor(a, requires_grad=True) for a in inputs]
    loss_fn_torch(*tt).backward()
    return [t.grad for t in ts], [t.grad.numpy() for t in tt]


@given(geom=conv_geometry(), data=st.data())
def test_conv2d_matches_torch(geom, data):
    n, c, f, h, w, kh, kw, stride, padding = geom
    x, wt, b = data.draw(arrays((n, c, h, w))), data.draw(arrays((f, c, kh, kw))), data.draw(arrays((f,)))
    u = None

    def ours(x_, w_, b_):
        y = ops.conv2d(x_, w_, b_, stride, padding)
        nonlocal u
        u = np.random.default_rng(0).standard_normal(y.shape)
        return (y * u).sum()

    def theirs(x_, w_, b_):
        return (F.conv2d(x_, w_, b_, stride, padding) * torch.from_numpy(u)).sum()

    got, want = grads_of(ours, theirs, x, wt, b)
    for g, t in zip(got, want):
        np.testing.assert_allclose(g, t, rtol=1e-10, atol=1e-12)


@given(geom=pool_geometry(), data=st.data())
def test_max_pool2d_matches_torch(geom, data):
    n, c, h, w, k, s = geom
    x = data.draw(distinct_arrays((n, c, h, w)))
    got = ops.max_pool2d(Tensor(x), k, s).data
    np.testing.assert_array_equal(got, F.max_pool2d(torch.from_numpy(x), k, s).numpy())
    u = np.random.default_rng(1).standard_normal(got.shape)
    (g,), (t,) = grads_of(lambda a: (ops.max_pool2d(a, k, s) * u).sum(),
                          lambda a: (F.max_pool2d(a, k, s) * torch.from_numpy(u)).sum(), x)
    np.testing.assert_allclose(g, t, rtol=1e-12)


def test_lenet5_forward_and_gradients_match_torch():
    sclref.manual_seed(0)
    net = sclref.models.lenet5(masked=False)
    layers = []
    for layer in net:
        name = type(layer).__name__
        if name == "Conv2d":
            f, c, kh, kw = layer.weight.shape
            layers.append(torch.nn.Conv2d(c, f, (kh, kw)).double())
        elif name == "Linear":
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features).double())
        else:
            layers.append({"MaxPool2d": torch.nn.MaxPool2d(2), "ReLU": torch.nn.ReLU(),
                           "Flatten": torch.nn.Flatten()}[name])
    twin = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for pt, ps in zip(twin.parameters(), net.parameters()):
            pt.copy_(torch.from_numpy(ps.data))
    gen = np.random.default_rng(0)
    x, y = gen.standard_normal((4, 1, 28, 28)), gen.integers(0, 10, 4)
    loss = ops.cross_entropy(net(Tensor(x)), y)
    loss.backward()
    tloss = F.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-12)
    for (name, ps), pt in zip(net.named_parameters(), twin.parameters()):
        np.testing.assert_allclose(ps.grad, pt.grad.numpy(), rtol=1e-9, atol=1e-13, err_msg=name)


def twin_batch_norm(bn):
    """A torch.nn.BatchNorm of the same kind and settings as `bn`, in float64, with bn's state."""
    cls = {"BatchNorm1d": torch.nn.BatchNorm1d, "BatchNorm2d": torch.nn.BatchNorm2d}[type(bn).__name__]
    twin = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
               track_running_stats=bn.track_running_stats).double()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    return twin


@settings(max_examples=15)
@given(shape=batch_norm_shapes(spatial=True), momentum=st.sampled_from([0.1, 0.5, None]),
       eps=st.sampled_from([1e-5, 1e-2]), steps=st.integers(1, 3), data=st.data())
def test_batch_norm2d_matches_torch_in_training_and_eval(shape, momentum, eps, steps, data):
    c = shape[1]
    ours = nn.BatchNorm2d(c, eps=eps, momentum=momentum)
    ours.weight.data[:] = data.draw(arrays((c,), low=0.5, high=2.0))
    ours.bias.data[:] = data.draw(arrays((c,)))
    theirs = twin_batch_norm(ours)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    for mode in ["train"] * steps + ["eval"]:
        ours.train(mode == "train"), theirs.train(mode == "train")
        ours.zero_grad(), theirs.zero_grad()
        x = data.draw(arrays(shape, low=-1.0, high=3.0))
        u = data.draw(arrays(shape))
        xs, xt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        ys, yt = ours(xs), theirs(xt)
        np.testing.assert_allclose(ys.data, yt.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=mode)
        (ys * u).sum().backward()
        (yt * torch.from_numpy(u)).sum().backward()
        np.testing.assert_allclose(xs.grad, xt.grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=mode)
        np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), rtol=1e-12, atol=1e-12)
        for name, value in theirs.state_dict().items():
            np.testing.assert_allclose(ours.state_dict()[name], value.numpy(), rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name} after {mode}")


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
def test_batch_norm1d_matches_torch(shape):
    gen = np.random.default_rng(7)
    ours = nn.BatchNorm1d(3)
    theirs = twin_batch_norm(ours)
    for _ in range(2):
        x = gen.standard_normal(shape) + 2.0
        np.testing.assert_allclose(ours(Tensor(x)).data, theirs(torch.from_numpy(x)).detach().numpy(), rtol=1e-10,
                                   atol=1e-12)
    for name, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[name], value.numpy(), rtol=1e-12, err_msg=name)


def test_option_a_shortcut_matches_torch():
    x = np.random.default_rng(8).standard_normal((2, 4, 5, 6))
    got = ops.pad(ops.getitem(Tensor(x), np.s_[:, :, ::2, ::2]), ((0, 0), (2, 2), (0, 0), (0, 0))).data
    want = F.pad(torch.from_numpy(x)[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)).numpy()
    np.testing.assert_array_equal(got, want)
