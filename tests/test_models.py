"""The model registry: CIFAR ResNets and VGGs (masked or plain), the LeNets' uniform call.

Oracles: parameter counts derived from the layer sizes of the architecture, the block's
formula written with ops, finite differences (`check_grads`) and, where installed, a
PyTorch ResNet built here with the same weights.
"""

import contextlib

import numpy as np
import pytest

from sclref import Tensor, nn, ops, scl
from sclref.errors import InputError
from sclref.models import MODELS, BasicBlock, ZeroPadShortcut, lenet5, lenet_300_100, resnet, vgg
from sclref.nn.masked import MaskedConv2d, MaskedLayer
from sclref.optim import SGD
from sclref.scl import SCLObjective, masked_layers
from sclref.testing import check_grads

T = Tensor
IMAGE_SHAPES = [(3, 32, 32), (1, 28, 28)]


def tiny_vgg(**kw):
    return vgg("vgg11", width=0.125, **kw)


def uniform_kwargs(in_shape, dtype=np.float64, seed=0, **extra):
    """The keywords every builder of MODELS takes."""
    return dict(in_shape=in_shape, num_classes=7, masked=True, ste="identity", score_init=1.0, dtype=dtype,
                generator=np.random.default_rng(seed), **extra)


def weight_count(model) -> int:
    """Trained values of the network: θ, biases and batch-norm scales and shifts, not mask variables."""
    return sum(p.size for name, p in model.named_parameters() if not name.endswith(".score"))


def conv_linear_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@contextlib.contextmanager
def bound(model, names, tensors):
    """Run `model` with the named parameters replaced by `tensors`, so `check_grads` can perturb them."""
    slots = []
    for name, t in zip(names, tensors):
        *path, attr = name.split(".")
        owner = model
        for part in path:
            owner = getattr(owner, part)
        slots.append((owner, attr, getattr(owner, attr)))
        object.__setattr__(owner, attr, t)  # bypass registration: the module keeps its own Parameters
    try:
        yield model
    finally:
        for owner, attr, original in slots:
            object.__setattr__(owner, attr, original)


def randomize_batch_norms(model, gen):
    """Scales, shifts and running statistics away from their defaults, so each of them matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data[:] = gen.uniform(0.5, 1.5, c)
            m.bias.data[:] = gen.uniform(-0.5, 0.5, c)
            m.running_mean[:] = gen.uniform(-0.3, 0.3, c)
            m.running_var[:] = gen.uniform(0.5, 2.0, c)


# -- shapes and the uniform call ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_takes_the_uniform_call(name):
    model = MODELS[name](**uniform_kwargs((1, 28, 28), np.float32, mask_first=True, mask_last=True))
    y = model(T(np.zeros((2, 1, 28, 28), dtype=np.float32)))
    assert y.shape == (2, 7) and y.dtype == np.float32
    assert masked_layers(model)
    assert all(p.dtype == np.float32 for p in model.parameters())


@pytest.mark.parametrize("in_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("build", [resnet, tiny_vgg], ids=["resnet8", "vgg11-w0.125"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "plain"])
def test_output_shapes_for_cifar_and_fashion_mnist_inputs(build, in_shape, masked):
    kw = {"depth": 8} if build is resnet else {}
    model = build(in_shape=in_shape, num_classes=5, masked=masked, **kw)
    assert model(T(np.random.default_rng(0).standard_normal((3,) + in_shape))).shape == (3, 5)


def test_resnet20_output_shape_on_both_inputs():
    for in_shape in IMAGE_SHAPES:
        model = resnet(20, in_shape=in_shape, dtype=np.float32)
        assert model(T(np.zeros((2,) + in_shape, dtype=np.float32))).shape == (2, 10)


def test_lenet300_takes_in_shape_as_well_as_in_features():
    by_shape = lenet_300_100(in_shape=(1, 8, 8), num_classes=4)
    assert by_shape.fc1.weight.shape == (300, 64)
    assert by_shape(T(np.zeros((2, 1, 8, 8)))).shape == (2, 4)
    assert lenet_300_100(in_features=64).fc1.weight.shape == (300, 64)
    assert lenet_300_100(64, in_shape=(64,)).fc1.weight.shape == (300, 64)
    assert lenet_300_100().fc1.weight.shape == (300, 784)
    with pytest.raises(InputError, match="disagrees"):
        lenet_300_100(in_features=50, in_shape=(1, 8, 8))
    with pytest.raises(InputError, match="in_shape"):
        lenet_300_100(in_shape=(1, 0, 8))


# -- parameter counts --------------------------------------------------------------------------


def expected_resnet_count(n: int, in_channels: int, classes: int, shortcut: str) -> int:
    """Trained values of a CIFAR ResNet with n blocks per stage, from its layer sizes."""
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c  # scale and shift

    total = conv(in_channels, 16, 3) + bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if shortcut == "B" and cin != width:
                total += conv(cin, width, 1) + bn(width)
            cin = width
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth,published", [(20, 0.27), (56, 0.85)])
def test_resnet_parameter_counts_match_the_architecture_and_the_published_numbers(depth, published):
    n = (depth - 2) // 6
    model = resnet(depth, dtype=np.float32)
    count = weight_count(model)
    assert count == expected_resnet_count(n, 3, 10, "A")
    assert round(count / 1e6, 2) == published  # He et al. (2016), Table 6
    assert weight_count(resnet(depth, masked=False, dtype=np.float32)) == count
    scores = sum(layer.score.size for _, layer in masked_layers(model))
    assert scores == sum(m.weight.size for _, m in conv_linear_layers(model))


def test_option_b_adds_exactly_the_two_projection_shortcuts():
    model = resnet(20, shortcut="B", masked=False)
    assert weight_count(model) == expected_resnet_count(3, 3, 10, "B")
    names = [name for name, _ in model.named_modules() if name.endswith("downsample")]
    assert names == ["layer2.0.downsample", "layer3.0.downsample"]


def test_vgg_widths_pools_and_classifier():
    model = vgg("vgg16", width=0.25, masked=False)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert all(m.bias is None for m in convs)  # batch norm's shift replaces the bias
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert [m.in_features for m in model.classifier if isinstance(m, nn.Linear)] == [128]
    two = vgg("vgg11", width=0.25, hidden=32, batch_norm=False, masked=False)
    assert [(m.in_features, m.out_features) for m in two.classifier if isinstance(m, nn.Linear)] == [(128, 32),
                                                                                                   (32, 10)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in two.modules())
    assert all(m.bias is not None for m in two.features if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("in_shape,pools,flat", [((3, 32, 32), 5, 1), ((1, 28, 28), 4, 1), ((1, 8, 8), 3, 1),
                                                 ((3, 64, 48), 5, 2 * 1)])
def test_vgg_leaves_out_pools_that_would_go_below_one_pixel(in_shape, pools, flat):
    model = tiny_vgg(in_shape=in_shape, masked=False)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == pools
    assert model.classifier[0].in_features == 64 * flat
    assert model(T(np.zeros((2,) + in_shape))).shape == (2, 10)


def test_bad_settings_are_refused_with_their_names():
    with pytest.raises(InputError, match="depth"):
        resnet(21)
    with pytest.raises(InputError, match="depth"):
        resnet(2)
    with pytest.raises(InputError, match="shortcut"):
        resnet(8, shortcut="C")
    with pytest.raises(InputError, match="in_shape"):
        resnet(8, in_shape=(32, 32))
    with pytest.raises(InputError, match="unknown config"):
        vgg("vgg13")
    with pytest.raises(InputError, match="width"):
        vgg("vgg11", width=0)
    with pytest.raises(InputError, match="config"):
        vgg([64, "X"])
    with pytest.raises(InputError, match="too small"):
        lenet5((1, 12, 12))


# -- which layers are masked ----------------------------------------------------------------------


BUILDERS = {
    "resnet8-A": lambda **kw: resnet(8, in_shape=(3, 8, 8), **kw),
    "resnet8-B": lambda **kw: resnet(8, in_shape=(3, 8, 8), shortcut="B", **kw),
    "vgg": lambda **kw: tiny_vgg(in_shape=(3, 8, 8), hidden=16, **kw),
    "lenet5": lambda **kw: lenet5(**kw),
    "lenet300": lambda **kw: lenet_300_100(in_shape=(1, 8, 8), **kw),
}


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("mask_first", [True, False])
@pytest.mark.parametrize("mask_last", [True, False])
def test_masked_layers_are_every_weight_layer_but_the_ones_left_dense(name, mask_first, mask_last):
    model = BUILDERS[name](mask_first=mask_first, mask_last=mask_last, generator=np.random.default_rng(0))
    plain = BUILDERS[name](masked=False, generator=np.random.default_rng(0))
    layers = conv_linear_layers(model)
    dense = ({layers[0][0]} if not mask_first else set()) | ({layers[-1][0]} if not mask_last else set())
    assert [n for n, _ in masked_layers(model)] == [n for n, _ in layers if n not in dense]
    for n, m in layers:
        assert isinstance(m, MaskedLayer) == (n not in dense)
    assert not any(isinstance(m, MaskedLayer) for m in plain.modules())
    # the same θ, mask variables aside: constant scores draw nothing, so the values agree too
    theta = {k: v for k, v in model.state_dict().items() if not k.endswith(".score")}
    plain_state = plain.state_dict()
    assert list(theta) == list(plain_state)
    for k, v in theta.items():
        np.testing.assert_array_equal(v, plain_state[k], err_msg=k)


def test_masked_resnet_masks_convs_shortcut_convs_and_fc_but_never_batch_norm():
    model = resnet(8, shortcut="B", ste="softplus", score_init=0.5)
    names = [n for n, _ in masked_layers(model)]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert "layer2.0.downsample.0" in names and "layer3.0.downsample.0" in names
    assert len(names) == 1 + 2 * 3 + 2 + 1
    for _, layer in masked_layers(model):
        assert layer.ste.name == "softplus"
        np.testing.assert_array_equal(layer.score.data, 0.5)
    bn_params = [n for n, _ in model.named_parameters() if ".bn" in n or n.startswith("bn")]
    assert bn_params and not any(n.endswith("score") for n in bn_params)


def test_state_dict_names_follow_torchvision():
    keys = set(resnet(20, shortcut="B").state_dict())
    for key in ["conv1.weight", "conv1.score", "bn1.weight", "bn1.running_var", "bn1.num_batches_tracked",
                "layer1.0.conv1.weight", "layer1.2.bn2.bias", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_mean", "layer3.2.conv2.score", "fc.weight", "fc.bias"]:
        assert key in keys
    assert not any("downsample" in k for k in resnet(20, shortcut="A").state_dict())
    assert {"features.0.weight", "features.1.running_mean", "classifier.0.weight"} <= set(tiny_vgg().state_dict())


# -- the residual block ---------------------------------------------------------------------------


def test_option_a_shortcut_subsamples_and_pads_channels_evenly():
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5))
    y = ZeroPadShortcut(3, 8, 2)(T(x)).data
    assert y.shape == (2, 8, 3, 3)
    np.testing.assert_array_equal(y[:, 2:5], x[:, :, ::2, ::2])
    assert not y[:, :2].any() and not y[:, 5:].any()


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("in_planes,planes,stride", [(3, 3, 1), (2, 4, 2)], ids=["identity", "downsample"])
def test_block_computes_its_formula(in_planes, planes, stride, shortcut):
    gen = np.random.default_rng(2)
    block = BasicBlock(in_planes, planes, stride, shortcut)
    randomize_batch_norms(block, gen)
    block.eval()
    x = T(gen.standard_normal((2, in_planes, 5, 5)))

    def bn(m, h):
        return ops.batch_norm(h, m.weight, m.bias, m.running_mean, m.running_var)

    h = ops.relu(bn(block.bn1, ops.conv2d(x, block.conv1.weight, None, stride, 1)))
    h = bn(block.bn2, ops.conv2d(h, block.conv2.weight, None, 1, 1))
    if block.downsample is None:
        sc = x.data
    elif shortcut == "A":
        sc = np.zeros((2, planes) + h.shape[2:])
        sc[:, 1:3] = x.data[:, :, ::2, ::2]
    else:
        sc = bn(block.downsample[1], ops.conv2d(x, block.downsample[0].weight, None, stride, 0)).data
    np.testing.assert_allclose(block(x).data, np.maximum(h.data + sc, 0), rtol=1e-14, atol=1e-14)


def check_parameter_grads(model, loss, x):
    """`check_grads` of ``loss(model(x))`` in x and every parameter but the mask variables.

    Mask variables are held fixed: their gradient is an estimator's, not a derivative.
    """
    names = [n for n, _ in model.named_parameters() if not n.endswith(".score")]
    params = dict(model.named_parameters())

    def f(x_, *ps):
        with bound(model, names, ps):
            return loss(model(x_))

    check_grads(f, x, *[params[n].data for n in names])
    # the check compares derivatives, so it would pass if the binding were ignored: see that it is not
    leaves = [T(params[n].data, requires_grad=True) for n in names]
    f(T(x), *leaves).sum().backward()
    assert all(leaf.grad is not None and np.any(leaf.grad) for leaf in leaves)
    assert all(params[n].grad is None for n in names)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_masked_block_gradients_match_finite_differences(shortcut, training):
    gen = np.random.default_rng(3)
    conv = lambda *a, **k: MaskedConv2d(*a, score_init=(-1.0, 3.0), generator=gen, **k)  # noqa: E731
    block = BasicBlock(2, 4, 2, shortcut, conv)
    randomize_batch_norms(block, gen)
    block.train(training)
    check_parameter_grads(block, lambda y: y, gen.standard_normal((3, 2, 6, 6)))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet8_gradients_match_finite_differences_end_to_end(shortcut):
    gen = np.random.default_rng(4)
    model = resnet(8, in_shape=(2, 8, 8), num_classes=3, shortcut=shortcut, score_init=(-1.0, 3.0), generator=gen)
    randomize_batch_norms(model, gen)
    labels = np.array([0, 2])
    check_parameter_grads(model, lambda y: ops.cross_entropy(y, labels), gen.standard_normal((2, 2, 8, 8)))


# -- modes, FLOPs, training, state ------------------------------------------------------------


def test_train_and_eval_reach_every_batch_norm():
    model = resnet(8, in_shape=(3, 8, 8), shortcut="B")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 3 + 2
    x = T(np.random.default_rng(5).standard_normal((4, 3, 8, 8)))
    model.eval()
    assert not any(m.training for m in model.modules())
    before = model.state_dict()
    first, second = model(x).data, model(x).data
    np.testing.assert_array_equal(first, second)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    model.train()
    assert all(m.training for m in model.modules())
    model(x)
    assert all(int(m.num_batches_tracked) == 1 for m in bns)
    assert all(not np.array_equal(m.running_mean, before[n + ".running_mean"])
               for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_uses_per_sample_is_each_convs_output_size_and_the_report_works(shortcut):
    model = resnet(8, in_shape=(1, 28, 28), shortcut=shortcut, score_init=(-1.0, 3.0),
                   generator=np.random.default_rng(6))
    model(T(np.zeros((2, 1, 28, 28))))
    side = {"conv1": 28, "layer1": 28, "layer2": 14, "layer3": 7}
    rows = scl.layer_report(model)
    assert [r["layer"] for r in rows] == [n for n, _ in masked_layers(model)]
    for row, (name, layer) in zip(rows, masked_layers(model)):
        uses = 1 if name == "fc" else side[name.split(".")[0]] ** 2
        assert layer.uses_per_sample() == uses
        assert row["dense_flops"] == 2 * uses * layer.num_weights
        assert row["effective_flops"] == 2 * uses * layer.num_kept()
    weights = scl.connection_weights([layer for _, layer in masked_layers(model)], "flops")
    assert weights[0] / weights[-1] == pytest.approx(28 * 28, rel=1e-12)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_a_few_sgd_steps_of_a_masked_resnet_reduce_the_loss(shortcut):
    gen = np.random.default_rng(7)
    model = resnet(8, in_shape=(3, 8, 8), num_classes=4, shortcut=shortcut, dtype=np.float32, generator=gen)
    x = T(gen.standard_normal((16, 3, 8, 8)).astype(np.float32))
    y = gen.integers(0, 4, 16)
    scores = [layer.score for _, layer in masked_layers(model)]
    weights = [p for p in model.parameters() if all(p is not s for s in scores)]
    opt = SGD([{"params": weights, "lr": 0.05, "momentum": 0.9}, {"params": scores, "lr": 0.01}], lr=0.05)
    objective = SCLObjective(lam=0.0)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ops.cross_entropy(model(x), y)
        loss.backward()
        objective.apply(model)
        opt.step()
        losses.append(float(loss.data))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("build", [lambda **kw: resnet(8, in_shape=(3, 8, 8), shortcut="B", **kw),
                                   lambda **kw: tiny_vgg(in_shape=(3, 8, 8), **kw)], ids=["resnet8-B", "vgg"])
def test_state_dict_round_trip_restores_outputs_in_both_modes(build):
    gen = np.random.default_rng(8)
    source = build(score_init=(-1.0, 2.0), generator=np.random.default_rng(1))
    x = T(gen.standard_normal((4, 3, 8, 8)))
    source(x)  # moves the running statistics off their initial values
    target = build(score_init=(-1.0, 2.0), generator=np.random.default_rng(2))
    target.load_state_dict(source.state_dict())
    for k, v in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[k], v)
    source.eval(), target.eval()
    np.testing.assert_array_equal(target(x).data, source(x).data)
    source.train(), target.train()
    np.testing.assert_array_equal(target(x).data, source(x).data)


def test_a_state_dict_of_the_other_shortcut_is_refused():
    with pytest.raises(ValueError, match=r"unexpected keys \['layer2\.0\.downsample\.0\.weight'"):
        resnet(8, shortcut="A").load_state_dict(resnet(8, shortcut="B").state_dict())
    with pytest.raises(ValueError, match=r"missing keys \['layer2\.0\.downsample\.0\.weight'"):
        resnet(8, shortcut="B").load_state_dict(resnet(8, shortcut="A").state_dict())


# -- PyTorch cross-check --------------------------------------------------------------------------


def torch_resnet(torch, depth, in_channels, num_classes, shortcut):
    """The CIFAR ResNet written directly in PyTorch, with torchvision's module names."""
    F = torch.nn.functional

    class Block(torch.nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(cout)
            self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(cout)
            self.pad = None
            if (stride != 1 or cin != cout) and shortcut == "B":
                self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                      torch.nn.BatchNorm2d(cout))
            else:
                self.downsample = None
                if stride != 1 or cin != cout:
                    self.pad, self.stride = cout - cin, stride

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            if self.downsample is not None:
                sc = self.downsample(x)
            elif self.pad is not None:
                sc = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            else:
                sc = x
            return F.relu(out + sc)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = torch.nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(16)
            cin = 16
            for stage, width in enumerate((16, 32, 64)):
                blocks = []
                for i in range(n):
                    blocks.append(Block(cin, width, 2 if stage and not i else 1))
                    cin = width
                setattr(self, f"layer{stage + 1}", torch.nn.Sequential(*blocks))
            self.fc = torch.nn.Linear(64, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return Net().double()


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_matches_pytorch_in_both_modes(shortcut):
    torch = pytest.importorskip("torch")
    gen = np.random.default_rng(9)
    model = resnet(20, in_shape=(3, 12, 12), shortcut=shortcut, score_init=(-0.5, 2.0), generator=gen)
    randomize_batch_norms(model, gen)
    theirs = torch_resnet(torch, 20, 3, 10, shortcut)
    masked = dict(masked_layers(model))
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(".score"):
            continue
        layer = masked.get(k.rsplit(".", 1)[0])
        if layer is not None and k.endswith(".weight"):
            v = v * layer.mask()  # PyTorch gets the effective weight θ ⊙ H(s)
        state[k] = torch.from_numpy(np.array(v))
    theirs.load_state_dict(state, strict=True)  # every name and shape agrees
    x = gen.standard_normal((4, 3, 12, 12))
    u = gen.standard_normal((4, 10))
    for training in (False, True):
        model.train(training), theirs.train(training)
        model.zero_grad()
        theirs.zero_grad()
        ours = model(T(x))
        (ours * T(u)).sum().backward()
        want = theirs(torch.from_numpy(x))
        (want * torch.from_numpy(u)).sum().backward()
        np.testing.assert_allclose(ours.data, want.detach().numpy(), rtol=1e-10, atol=1e-10)
        torch_params = dict(theirs.named_parameters())
        for name, p in model.named_parameters():
            if name.endswith(".score"):
                continue
            g = torch_params[name].grad.numpy()
            layer = masked.get(name.rsplit(".", 1)[0])
            if layer is not None and name.endswith(".weight"):
                g = g * layer.mask()  # dL/dθ = dL/dw ⊙ H(s)
            np.testing.assert_allclose(p.grad, g, rtol=1e-9, atol=1e-10, err_msg=name)
    buffers = dict(theirs.named_buffers())
    for name, b in model.named_buffers():
        np.testing.assert_allclose(b, buffers[name].numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
