"""Export of masked models to CSR: equal outputs, nnz == mask count, canonical CSR, dead-unit removal."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sclref import nn
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.nn.masked import MaskedConv2d, MaskedLinear
from sclref.sparse import Runtime, export
from tests.strategies import SEEDS


def _masks(model, gen, density):
    for layer in model:
        if isinstance(layer, (MaskedLinear, MaskedConv2d)):
            s = layer.score.data
            keep = gen.random(s.shape) < density
            keep[gen.random(s.shape[0]) < 0.3] = False  # empty rows
            s[...] = np.where(keep, 1.0, -1.0)
            layer.weight.data[gen.random(s.shape) < 0.1] = 0.0  # kept zeros stay connections


@st.composite
def dense_models(draw):
    gen = np.random.default_rng(draw(SEEDS))
    sizes = draw(st.lists(st.integers(1, 7), min_size=2, max_size=4))
    layers = {}
    for i in range(len(sizes) - 1):
        layers[f"fc{i}"] = MaskedLinear(sizes[i], sizes[i + 1], bias=draw(st.booleans()), generator=gen)
        if i < len(sizes) - 2:
            layers[f"act{i}"] = draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1)]))
    model = nn.Sequential(layers)
    _masks(model, gen, draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])))
    return model, gen.standard_normal((draw(st.integers(1, 6)), sizes[0]))


@st.composite
def conv_models(draw):
    gen = np.random.default_rng(draw(SEEDS))
    c0, c1, c2 = (draw(st.integers(1, 3)) for _ in range(3))
    pad = draw(st.integers(0, 1))
    model = nn.Sequential({
        "conv1": MaskedConv2d(c0, c1, 3, stride=draw(st.integers(1, 2)), padding=pad, generator=gen),
        "act1": draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1)])),
        "pool": nn.MaxPool2d(2),
        "conv2": MaskedConv2d(c1, c2, 2, padding=draw(st.integers(0, 1)), generator=gen),
        "act2": nn.ReLU(), "flatten": nn.Flatten(),
    })
    x = gen.standard_normal((draw(st.integers(1, 3)), c0, 9, 9))
    with no_grad():
        feats = model(Tensor(x)).shape[1]
    model.fc = MaskedLinear(feats, draw(st.integers(1, 4)), generator=gen)
    _masks(model, gen, draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])))
    return model, x


def _masked_output(model, x):
    model.eval()
    with no_grad():
        return model(Tensor(x)).data


def _check(model, x):
    ref = _masked_output(model, x)
    full = export(model, x.shape[1:], prune_dead=False)
    for layer, (_, mod) in zip(full.weighted(), [(n, m) for n, m in model._modules.items()
                                                 if isinstance(m, (MaskedLinear, MaskedConv2d))]):
        assert layer.weight.nnz == mod.num_kept()
        assert layer.weight.has_canonical_format
        assert all(np.all(np.diff(layer.weight.indices[a:b]) > 0)
                   for a, b in zip(layer.weight.indptr[:-1], layer.weight.indptr[1:]))
    pruned = export(model, x.shape[1:])
    for net in (full, pruned):
        for backend in ("dense", "scipy", "sclref"):
            np.testing.assert_allclose(Runtime(net, backend=backend)(x), ref, rtol=1e-12, atol=1e-12)
    assert pruned.nnz <= full.nnz


@given(dense_models())
def test_exported_dense_model_equals_masked_model(case):
    _check(*case)


@given(conv_models())
def test_exported_conv_model_equals_masked_model(case):
    _check(*case)


def test_dead_units_are_removed_and_their_bias_folded():
    model = nn.Sequential({"fc1": MaskedLinear(4, 3), "relu": nn.ReLU(), "fc2": MaskedLinear(3, 2)})
    model.fc1.score.data[1] = -1.0  # unit 1: no inputs, outputs relu(b1)
    model.fc1.bias.data[1] = 0.5
    model.fc2.score.data[:, 2] = -1.0  # unit 2: no outputs
    x = np.random.default_rng(0).standard_normal((5, 4))
    net = export(model)
    assert net.removed_units == {"fc1": [1, 2]}
    assert [layer.weight.shape for layer in net.weighted()] == [(1, 4), (2, 1)]
    np.testing.assert_allclose(Runtime(net)(x), _masked_output(model, x), rtol=1e-12, atol=1e-12)


def test_unexportable_layer_is_a_clear_error():
    model = nn.Sequential({"fc": MaskedLinear(2, 2), "odd": nn.Sequential(nn.ReLU())})
    with pytest.raises(ValueError, match="cannot export layer 'odd'"):
        export(model)


def test_the_preprocessing_is_carried_and_checked():
    model = nn.Sequential({"fc": MaskedLinear(4, 2)})
    stats = {"pixel_max": 255, "mean": 0.1307, "std": 0.3081}
    assert export(model, preprocessing=stats).preprocessing == {"pixel_max": 255.0, "mean": 0.1307, "std": 0.3081}
    assert export(model).preprocessing is None
    for bad in ({"pixel_max": 255, "mean": 0.1}, {**stats, "std": 0.0}, {**stats, "mean": float("nan")}):
        with pytest.raises(InputError, match="preprocessing"):
            export(model, preprocessing=bad)
