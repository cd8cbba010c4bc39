"""Export of masked models to CSR: equal outputs, nnz == mask count, canonical CSR, dead-unit removal,
batch norms folded and residual blocks kept (ResNets with either shortcut, VGG)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sclref import models, nn, ops
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.nn.masked import MaskedConv2d, MaskedLinear
from sclref.optim import SGD
from sclref.pruning import magnitude_prune
from sclref.sparse import Residual, Runtime, SubsamplePad, export
from sclref.sparse.runtime import CHWN_FROM
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


class _Odd(nn.Module):
    def forward(self, x):
        return x


def test_unexportable_layer_is_a_clear_error():
    model = nn.Sequential({"fc": MaskedLinear(2, 2), "odd": nn.Sequential(nn.ReLU(), _Odd())})
    with pytest.raises(ValueError, match="cannot export layer 'odd.1' of type _Odd"):
        export(model)


def test_a_batch_norm_that_cannot_be_folded_is_a_clear_error():
    model = nn.Sequential({"fc": MaskedLinear(2, 2), "relu": nn.ReLU(), "bn": nn.BatchNorm1d(2)})
    with pytest.raises(ValueError, match="batch norm 'bn' does not follow a Linear or Conv2d"):
        export(model)
    model = nn.Sequential({"fc": MaskedLinear(2, 2), "bn": nn.BatchNorm1d(2, track_running_stats=False)})
    with pytest.raises(ValueError, match="after 'fc' keeps no running statistics"):
        export(model)


def train_briefly(model, shape, steps=3, seed=0):
    """`model` after a few SGD steps on random data (weights, scores and batch-norm statistics all move), in
    eval mode, with random batch-norm scales and shifts so that folding them matters."""
    gen = np.random.default_rng(seed)
    x, y = gen.standard_normal((8, *shape)), gen.integers(0, 3, 8)
    opt = SGD(list(model.parameters()), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        ops.cross_entropy(model(Tensor(x)), y).backward()
        opt.step()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data[...] = gen.uniform(0.5, 1.5, module.num_features)
            module.bias.data[...] = gen.normal(0, 0.2, module.num_features)
    return model.eval()


def _check_exact(model, x, min_removed=0):
    """Every backend, with and without dead-unit removal, gives the model's eval output to 1e-10."""
    ref = _masked_output(model, x)
    kept = sum(m.num_kept() for m in model.modules() if isinstance(m, (MaskedLinear, MaskedConv2d)))
    full, pruned = export(model, x.shape[1:], prune_dead=False), export(model, x.shape[1:])
    assert full.nnz == kept and pruned.nnz <= kept
    assert sum(map(len, pruned.removed_units.values())) >= min_removed
    for network in (full, pruned):
        for backend in ("dense", "scipy", "sclref", "auto"):
            np.testing.assert_allclose(Runtime(network, backend=backend)(x), ref, rtol=0, atol=1e-10)
    return pruned


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("sparsity", [None, 0.95])
def test_a_trained_resnet_exports_exactly(shortcut, sparsity):
    shape = (1, 9, 9)  # odd: the stride-2 stages see 5x5 and 3x3 maps
    model = models.resnet(8, in_shape=shape, num_classes=3, shortcut=shortcut, score_init=(-1.0, 2.0),
                          generator=np.random.default_rng(1))
    train_briefly(model, shape)
    if sparsity is not None:
        magnitude_prune(model, sparsity)
    network = _check_exact(model, np.random.default_rng(2).standard_normal((CHWN_FROM + 1, *shape)))
    assert [layer.kind for layer in network.layers] == ["conv2d", "relu"] + ["residual", "relu"] * 3 + [
        "global_avg_pool2d", "linear"]
    # At this batch the sparse kernels run the whole network on CHWN activations, into the classifier's chain.
    assert Runtime(network, backend="sclref")._chwn_steps(CHWN_FROM + 1)[1:] == (len(network.layers) - 1, True)
    block = network.layers[4]  # layer2.0: the first block whose shape changes
    assert isinstance(block, Residual) and block.name == "layer2.0"
    assert [layer.name for layer in block.body] == ["layer2.0.conv1", "layer2.0.relu1", "layer2.0.conv2"]
    if shortcut == "A":
        assert block.shortcut == [SubsamplePad("layer2.0.downsample", (2, 2), (8, 8))]
    else:
        assert [layer.name for layer in block.shortcut] == ["layer2.0.downsample.0"]
    assert network.layers[2].shortcut == []  # same shape: the identity


def test_a_trained_vgg_exports_exactly():
    shape = (1, 12, 12)
    model = models.vgg("vgg11", width=0.25, in_shape=shape, num_classes=3, hidden=8, score_init=(-1.0, 2.0),
                       generator=np.random.default_rng(3))
    train_briefly(model, shape, seed=4)
    magnitude_prune(model, 0.9)
    network = _check_exact(model, np.random.default_rng(5).standard_normal((3, *shape)), min_removed=1)
    assert [layer.name for layer in network.layers[:5]] == ["features.0", "features.2", "features.3", "features.4",
                                                            "features.6"]  # conv, relu, pool, conv, relu: no norms


def test_units_feeding_a_residual_add_are_kept():
    shape = (1, 6, 6)
    model = models.resnet(8, in_shape=shape, num_classes=3, generator=np.random.default_rng(6))
    train_briefly(model, shape, seed=7)
    block = model.layer1[0]
    block.conv2.score.data[0] = -1.0  # conv2's unit 0 has no inputs: it adds a constant to the shortcut
    block.conv2.score.data[:, 1] = -1.0  # conv1's unit 1 has no outputs
    model.layer2[0].conv1.score.data[:, 5] = -1.0  # layer1's output channel 5 is read by the shortcut only
    model.eval()
    network = _check_exact(model, np.random.default_rng(8).standard_normal((3, *shape)), min_removed=1)
    assert 1 in network.removed_units["layer1.0.conv1"]
    assert not {"conv1", "layer1.0.conv2", "layer1.2.conv2"} & set(network.removed_units)


def test_the_preprocessing_is_carried_and_checked():
    model = nn.Sequential({"fc": MaskedLinear(4, 2)})
    stats = {"pixel_max": 255, "mean": 0.1307, "std": 0.3081}
    assert export(model, preprocessing=stats).preprocessing == {"pixel_max": 255.0, "mean": 0.1307, "std": 0.3081}
    assert export(model).preprocessing is None
    for bad in ({"pixel_max": 255, "mean": 0.1}, {**stats, "std": 0.0}, {**stats, "mean": float("nan")}):
        with pytest.raises(InputError, match="preprocessing"):
            export(model, preprocessing=bad)
