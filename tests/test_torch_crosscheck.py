"""Optional cross-check against PyTorch (float64), run only where torch is installed.

PyTorch is one oracle among several: every op is first checked against NumPy references
and finite differences in test_ops.py.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sclref
from sclref import Tensor, ops
from tests.strategies import arrays, conv_geometry, distinct_arrays, pool_geometry

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
