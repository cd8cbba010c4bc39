"""The reference architectures of the SCL paper, masked (for SCL) or plain.

LeNet-300-100 is dense 784-300-100-10 with ReLU. LeNet-5 is the Caffe variant: conv
5x5x20, max-pool 2, conv 5x5x50, max-pool 2, dense 800-500, dense 500-10. ReLU follows
each pooling (pooling commutes with ReLU, so this equals ReLU-then-pool on a tensor four
times smaller). ResNet-20/56 are the CIFAR ResNets of He et al. (2016); the VGG nets are
the CIFAR variants of Simonyan & Zisserman (2015) with batch norm and a width multiplier.
Input sizes are parameters, so the same builders serve other data.

Every builder in `MODELS` takes the same keywords: ``in_shape, num_classes, masked, ste,
score_init, dtype, generator, mask_first, mask_last``. With `masked`, every conv and
linear weight is a masked layer (the paper masks every weight layer) except the first
conv or dense layer when ``mask_first=False`` and the classifier when ``mask_last=False``;
batch-norm parameters are never masked. State-dict names follow torchvision's (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``; ``features.N``,
``classifier.N``), so PyTorch weights map onto them by name.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from sclref import nn, ops
from sclref.errors import InputError
from sclref.nn.masked import MaskedConv2d, MaskedLinear


def _layer_kinds(masked: bool, ste, score_init, dtype, generator):
    common = {"dtype": dtype, "generator": generator}
    if not masked:
        return functools.partial(nn.Linear, **common), functools.partial(nn.Conv2d, **common)
    extra = {"ste": ste, "score_init": score_init, **common}
    return functools.partial(MaskedLinear, **extra), functools.partial(MaskedConv2d, **extra)


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value > 0


def _image_shape(model: str, in_shape) -> tuple[int, int, int]:
    """`in_shape` as a (C, H, W) triple of positive integers, or an InputError naming the model."""
    try:
        shape = tuple(in_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(_positive_int(d) for d in shape):
        raise InputError(f"{model}: in_shape must be (channels, height, width) of positive integers, "
                         f"got {in_shape!r}")
    return tuple(int(d) for d in shape)


def _flat_features(model: str, in_features: int | None, in_shape) -> int:
    """The inputs per sample of a network that flattens its input: `in_features`, the product of `in_shape`, or 784."""
    if in_shape is not None:
        try:
            dims = tuple(in_shape)
        except TypeError:
            dims = ()
        if not dims or not all(_positive_int(d) for d in dims):
            raise InputError(f"{model}: in_shape must be a tuple of positive integers, got {in_shape!r}")
        flat = math.prod(int(d) for d in dims)
        if in_features is not None and in_features != flat:
            raise InputError(f"{model}: in_features={in_features} disagrees with in_shape {dims} ({flat} inputs)")
        in_features = flat
    return 784 if in_features is None else in_features


def linear(in_shape=(1, 28, 28), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
           dtype=np.float64, generator=None, mask_first: bool = True, mask_last: bool = True) -> nn.Sequential:
    """One linear layer ``fc`` on the flattened input: logistic regression, or with the mse loss a
    linear regression (the student of `sclref.theory.teacher`).

    The layer is both the first and the last, so it is masked only when `masked`,
    `mask_first` and `mask_last` all are.
    """
    layer, _ = _layer_kinds(masked and mask_first and mask_last, ste, score_init, dtype, generator)
    return nn.Sequential({"flatten": nn.Flatten(), "fc": layer(_flat_features("linear", None, in_shape), num_classes)})


def lenet_300_100(in_features: int | None = None, num_classes: int = 10, masked: bool = True, ste="identity",
                  score_init=1.0, dtype=np.float64, generator=None, *, in_shape=None, mask_first: bool = True,
                  mask_last: bool = True) -> nn.Sequential:
    """in_features-300-100-num_classes with ReLU; flattens image input.

    With `masked`, every weight layer is masked with estimator `ste` and initial mask
    variables `score_init` (see `sclref.nn.masked`), except fc1 when `mask_first` is
    False and fc3 when `mask_last` is False.

    Parameters
    ----------
    in_features : int, optional
        Inputs per sample (default 784, or the product of `in_shape`).
    in_shape : tuple of int, optional
        Per-sample shape of the input, the keyword every builder of `MODELS` takes; its
        product must equal `in_features` when both are given.
    """
    in_features = _flat_features("lenet300", in_features, in_shape)
    linear, _ = _layer_kinds(masked, ste, score_init, dtype, generator)
    first, _ = _layer_kinds(masked and mask_first, ste, score_init, dtype, generator)
    last, _ = _layer_kinds(masked and mask_last, ste, score_init, dtype, generator)
    return nn.Sequential({
        "flatten": nn.Flatten(),
        "fc1": first(in_features, 300), "relu1": nn.ReLU(),
        "fc2": linear(300, 100), "relu2": nn.ReLU(),
        "fc3": last(100, num_classes),
    })


def lenet5(in_shape=(1, 28, 28), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
           dtype=np.float64, generator=None, mask_first: bool = True, mask_last: bool = True) -> nn.Sequential:
    """Caffe LeNet-5 for (N, C, H, W) input with per-sample shape `in_shape`.

    `mask_first` and `mask_last` as in `lenet_300_100` (conv1 and fc2).
    """
    c, h, w = _image_shape("lenet5", in_shape)
    h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if h2 < 1 or w2 < 1:
        raise InputError(f"lenet5: input {in_shape} is too small for two 5x5 convolutions and 2x2 poolings")
    linear, conv = _layer_kinds(masked, ste, score_init, dtype, generator)
    _, first = _layer_kinds(masked and mask_first, ste, score_init, dtype, generator)
    last, _ = _layer_kinds(masked and mask_last, ste, score_init, dtype, generator)
    return nn.Sequential({
        "conv1": first(c, 20, 5), "pool1": nn.MaxPool2d(2), "relu1": nn.ReLU(),
        "conv2": conv(20, 50, 5), "pool2": nn.MaxPool2d(2), "relu2": nn.ReLU(),
        "flatten": nn.Flatten(),
        "fc1": linear(50 * h2 * w2, 500), "relu3": nn.ReLU(),
        "fc2": last(500, num_classes),
    })


# -- CIFAR ResNets -------------------------------------------------------------------------


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels added on both sides.

    It has no parameters; the new channels are split evenly before and after the old
    ones (the extra one after), as the CIFAR ResNets' reference code does.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise InputError(f"ZeroPadShortcut: cannot pad {in_channels} channels down to {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        if self.stride != 1:
            x = ops.getitem(x, np.s_[:, :, ::self.stride, ::self.stride])
        extra = self.out_channels - self.in_channels
        if extra:
            x = ops.pad(x, ((0, 0), (extra // 2, extra - extra // 2), (0, 0), (0, 0)))
        return x

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the block of the CIFAR ResNets.

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int
        Stride of conv1 (2 at the start of a stage halves the image).
    shortcut : {"A", "B"}
        When the shape changes, "A" subsamples and zero-pads channels (`ZeroPadShortcut`),
        "B" is a 1x1 conv and a batch norm (``downsample.0``, ``downsample.1``); when it
        does not, the shortcut is the identity and ``downsample`` is None.
    conv : callable
        Builds the convolutions: ``conv(in, out, kernel, stride=, padding=, bias=)``; a
        masked conv class for SCL. Default `nn.Conv2d` of `dtype`.
    dtype : float32 or float64
        Dtype of the batch norms (and of the default convs).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A", conv=None,
                 dtype=np.float64):
        super().__init__()
        conv = functools.partial(nn.Conv2d, dtype=dtype) if conv is None else conv
        self.conv1 = conv(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, dtype=dtype)
        if stride == 1 and in_planes == planes:
            self.downsample = None
        elif shortcut == "A":
            self.downsample = ZeroPadShortcut(in_planes, planes, stride)
        elif shortcut == "B":
            self.downsample = nn.Sequential(conv(in_planes, planes, 1, stride=stride, padding=0, bias=False),
                                            nn.BatchNorm2d(planes, dtype=dtype))
        else:
            raise InputError(f"BasicBlock: shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x):
        out = ops.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return ops.add_relu(out, x if self.downsample is None else self.downsample(x))


RESNET_WIDTHS = (16, 32, 64)
"""Channels of the three stages of the CIFAR ResNets."""


def resnet(depth: int = 20, in_shape=(3, 32, 32), num_classes: int = 10, masked: bool = True, ste="identity",
           score_init=1.0, dtype=np.float64, generator=None, shortcut: str = "A", mask_first: bool = True,
           mask_last: bool = True) -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016) with ``depth = 6 n + 2`` layers.

    3x3 conv to 16 channels, batch norm, ReLU; three stages (``layer1`` to ``layer3``) of
    n `BasicBlock`s at 16, 32 and 64 channels, the first block of stages 2 and 3 with
    stride 2; global average pooling; a dense layer to the classes (``fc``). Every conv
    is followed by a batch norm and has no bias. Any input size works: a stride-2 conv
    and the option-A subsampling both give ceil(H / 2) rows.

    Parameters
    ----------
    depth : int
        6 n + 2 with n >= 1: 20 for n = 3, 56 for n = 9 (8 is the smallest).
    in_shape : (C, H, W)
        Per-sample input shape.
    num_classes : int
        Outputs of ``fc``.
    masked : bool
        Use masked convs and dense layers (SCL) instead of plain ones.
    ste, score_init
        Estimator and initial mask variables of the masked layers (see `sclref.nn.masked`).
    dtype : float32 or float64
        Dtype of every parameter and buffer.
    generator : numpy.random.Generator, optional
        Source of the initial weights (sclref's seeded default when None).
    shortcut : {"A", "B"}
        Shortcut where the shape changes: "A" subsample and zero-pad (no parameters, the
        paper's CIFAR choice), "B" 1x1 conv and batch norm (masked when `masked`).
    mask_first, mask_last : bool
        With `masked`, whether ``conv1`` and ``fc`` are masked too (True) or kept dense.

    Returns
    -------
    nn.Sequential
        ``conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc``, named as in
        torchvision's ResNet (blocks ``layerS.I``; the pooling already flattens).
    """
    if not _positive_int(depth) or depth < 8 or (depth - 2) % 6:
        raise InputError(f"resnet: depth must be 6 n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
    shortcut = shortcut.upper() if isinstance(shortcut, str) else shortcut
    if shortcut not in ("A", "B"):
        raise InputError(f"resnet: shortcut must be 'A' (zero-padding) or 'B' (1x1 conv), got {shortcut!r}")
    c, _, _ = _image_shape(f"resnet{depth}", in_shape)
    blocks_per_stage = (depth - 2) // 6
    linear, conv = _layer_kinds(masked, ste, score_init, dtype, generator)
    _, first = _layer_kinds(masked and mask_first, ste, score_init, dtype, generator)
    last, _ = _layer_kinds(masked and mask_last, ste, score_init, dtype, generator)
    layers = {"conv1": first(c, RESNET_WIDTHS[0], 3, stride=1, padding=1, bias=False),
              "bn1": nn.BatchNorm2d(RESNET_WIDTHS[0], dtype=dtype), "relu": nn.ReLU()}
    in_planes = RESNET_WIDTHS[0]
    for stage, planes in enumerate(RESNET_WIDTHS):
        blocks = []
        for i in range(blocks_per_stage):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(in_planes, planes, stride, shortcut, conv, dtype))
            in_planes = planes
        layers[f"layer{stage + 1}"] = nn.Sequential(*blocks)
    layers["avgpool"] = nn.GlobalAvgPool2d()
    layers["fc"] = last(in_planes, num_classes)
    return nn.Sequential(layers)


def resnet20(in_shape=(3, 32, 32), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
             dtype=np.float64, generator=None, shortcut: str = "A", mask_first: bool = True,
             mask_last: bool = True) -> nn.Sequential:
    """ResNet-20 (3 blocks per stage, 0.27 M parameters with shortcut A); see `resnet`."""
    return resnet(20, in_shape, num_classes, masked, ste, score_init, dtype, generator, shortcut, mask_first,
                  mask_last)


def resnet56(in_shape=(3, 32, 32), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
             dtype=np.float64, generator=None, shortcut: str = "A", mask_first: bool = True,
             mask_last: bool = True) -> nn.Sequential:
    """ResNet-56 (9 blocks per stage, 0.85 M parameters with shortcut A); see `resnet`."""
    return resnet(56, in_shape, num_classes, masked, ste, score_init, dtype, generator, shortcut, mask_first,
                  mask_last)


# -- VGG -------------------------------------------------------------------------------------


VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
"""Output channels of each 3x3 conv at width 1, "M" for a 2x2 max-pool (Simonyan & Zisserman's A and D)."""


def vgg(config="vgg16", width: float = 1.0, in_shape=(3, 32, 32), num_classes: int = 10, masked: bool = True,
        ste="identity", score_init=1.0, dtype=np.float64, generator=None, batch_norm: bool = True,
        hidden: int | None = None, mask_first: bool = True, mask_last: bool = True) -> nn.Sequential:
    """A CIFAR-style VGG: 3x3 conv (padding 1) + batch norm + ReLU blocks between 2x2 max-pools, then dense.

    The classifier is the common CIFAR variant: a single dense layer from the flattened
    last feature map to the classes (with 32x32 input the map is 1x1, so 512 inputs at
    width 1); ``hidden=512`` gives two dense layers instead, in-512-classes with ReLU.
    A max-pool that would shrink the map below 1x1 (the fifth of 1x28x28 Fashion-MNIST,
    where 28 -> 14 -> 7 -> 3 -> 1) is left out, so any input of at least 1x1 works; the
    index names of the layers after it then shift by one.

    Parameters
    ----------
    config : {"vgg11", "vgg16"} or sequence
        A name in `VGG_CONFIGS`, or its own sequence of channel counts and "M".
    width : float
        Multiplier of every conv's channels (rounded, at least 1): 0.25 gives 16-32-64-128-128.
    in_shape, num_classes, masked, ste, score_init, dtype, generator, mask_first, mask_last
        As in `resnet`; `mask_first` is the first conv, `mask_last` the last dense layer.
    batch_norm : bool
        Batch norm after every conv, whose bias is then left out (the norm's shift
        replaces it); without it the convs have a bias.
    hidden : int, optional
        Width of a hidden dense layer before the classifier (None: no hidden layer).

    Returns
    -------
    nn.Sequential
        ``features`` (a `Sequential` indexed like torchvision's VGG: conv, bn, relu, ...,
        pool), ``flatten`` and ``classifier`` (``classifier.0``, and with `hidden`
        ``classifier.2``).
    """
    name = config if isinstance(config, str) else "vgg"
    if isinstance(config, str):
        if config not in VGG_CONFIGS:
            raise InputError(f"vgg: unknown config {config!r}; choose from {', '.join(VGG_CONFIGS)} "
                             f"or give a sequence of channel counts and 'M'")
        config = VGG_CONFIGS[config]
    items = list(config)
    if not any(_positive_int(v) for v in items) or not all(v == "M" or _positive_int(v) for v in items):
        raise InputError(f"{name}: config must hold positive channel counts and 'M', at least one count, "
                         f"got {config!r}")
    if not (isinstance(width, numbers.Real) and math.isfinite(width) and width > 0):
        raise InputError(f"{name}: width must be a positive finite number, got {width!r}")
    if hidden is not None and not _positive_int(hidden):
        raise InputError(f"{name}: hidden must be a positive integer or None, got {hidden!r}")
    c, h, w = _image_shape(name, in_shape)
    linear, conv = _layer_kinds(masked, ste, score_init, dtype, generator)
    _, first = _layer_kinds(masked and mask_first, ste, score_init, dtype, generator)
    last, _ = _layer_kinds(masked and mask_last, ste, score_init, dtype, generator)
    features, first_conv = [], True
    for v in items:
        if v == "M":
            if h >= 2 and w >= 2:
                features.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        out = max(1, round(v * width))
        features.append((first if first_conv else conv)(c, out, 3, stride=1, padding=1, bias=not batch_norm))
        first_conv = False
        if batch_norm:
            features.append(nn.BatchNorm2d(out, dtype=dtype))
        features.append(nn.ReLU())
        c = out
    flat = c * h * w
    if hidden is None:
        classifier = nn.Sequential(last(flat, num_classes))
    else:
        classifier = nn.Sequential(linear(flat, hidden), nn.ReLU(), last(hidden, num_classes))
    return nn.Sequential({"features": nn.Sequential(*features), "flatten": nn.Flatten(), "classifier": classifier})


def vgg11(in_shape=(3, 32, 32), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
          dtype=np.float64, generator=None, width: float = 1.0, batch_norm: bool = True, hidden: int | None = None,
          mask_first: bool = True, mask_last: bool = True) -> nn.Sequential:
    """VGG-11 with batch norm (8 convs, 64-128-256-256-512-512-512-512 at width 1); see `vgg`."""
    return vgg("vgg11", width, in_shape, num_classes, masked, ste, score_init, dtype, generator, batch_norm, hidden,
               mask_first, mask_last)


def vgg16(in_shape=(3, 32, 32), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
          dtype=np.float64, generator=None, width: float = 1.0, batch_norm: bool = True, hidden: int | None = None,
          mask_first: bool = True, mask_last: bool = True) -> nn.Sequential:
    """VGG-16 with batch norm (13 convs); see `vgg`."""
    return vgg("vgg16", width, in_shape, num_classes, masked, ste, score_init, dtype, generator, batch_norm, hidden,
               mask_first, mask_last)


MODELS = {"linear": linear, "lenet300": lenet_300_100, "lenet5": lenet5, "resnet20": resnet20, "resnet56": resnet56,
          "vgg11": vgg11, "vgg16": vgg16}
"""Builders by name, each callable as ``MODELS[name](in_shape=, num_classes=, masked=, ste=, score_init=,
dtype=, generator=, mask_first=, mask_last=)``."""
