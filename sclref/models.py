"""The reference architectures of the SCL paper, masked (for SCL) or plain.

LeNet-300-100 is dense 784-300-100-10 with ReLU. LeNet-5 is the Caffe variant: conv
5x5x20, max-pool 2, conv 5x5x50, max-pool 2, dense 800-500, dense 500-10. ReLU follows
each pooling (pooling commutes with ReLU, so this equals ReLU-then-pool on a tensor four
times smaller). Input sizes are parameters, so the same builders serve other data.
"""

from __future__ import annotations

import functools

import numpy as np

from sclref import nn
from sclref.nn.masked import MaskedConv2d, MaskedLinear


def _layer_kinds(masked: bool, ste, score_init, dtype, generator):
    common = {"dtype": dtype, "generator": generator}
    if not masked:
        return functools.partial(nn.Linear, **common), functools.partial(nn.Conv2d, **common)
    extra = {"ste": ste, "score_init": score_init, **common}
    return functools.partial(MaskedLinear, **extra), functools.partial(MaskedConv2d, **extra)


def lenet_300_100(in_features: int = 784, num_classes: int = 10, masked: bool = True, ste="identity",
                  score_init=1.0, dtype=np.float64, generator=None) -> nn.Sequential:
    """in_features-300-100-num_classes with ReLU; flattens image input.

    With `masked`, every weight layer is masked with estimator `ste` and initial mask
    variables `score_init` (see `sclref.nn.masked`).
    """
    linear, _ = _layer_kinds(masked, ste, score_init, dtype, generator)
    return nn.Sequential({
        "flatten": nn.Flatten(),
        "fc1": linear(in_features, 300), "relu1": nn.ReLU(),
        "fc2": linear(300, 100), "relu2": nn.ReLU(),
        "fc3": linear(100, num_classes),
    })


def lenet5(in_shape=(1, 28, 28), num_classes: int = 10, masked: bool = True, ste="identity", score_init=1.0,
           dtype=np.float64, generator=None) -> nn.Sequential:
    """Caffe LeNet-5 for (N, C, H, W) input with per-sample shape `in_shape`."""
    c, h, w = in_shape
    h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if h2 < 1 or w2 < 1:
        raise ValueError(f"lenet5: input {in_shape} is too small for two 5x5 convolutions and 2x2 poolings")
    linear, conv = _layer_kinds(masked, ste, score_init, dtype, generator)
    return nn.Sequential({
        "conv1": conv(c, 20, 5), "pool1": nn.MaxPool2d(2), "relu1": nn.ReLU(),
        "conv2": conv(20, 50, 5), "pool2": nn.MaxPool2d(2), "relu2": nn.ReLU(),
        "flatten": nn.Flatten(),
        "fc1": linear(50 * h2 * w2, 500), "relu3": nn.ReLU(),
        "fc2": linear(500, num_classes),
    })


MODELS = {"lenet300": lenet_300_100, "lenet5": lenet5}
