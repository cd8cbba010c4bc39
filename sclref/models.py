"""The reference architectures of the SCL paper, built from sclref layers.

LeNet-300-100 is dense 784-300-100-10 with ReLU. LeNet-5 is the Caffe variant: conv
5x5x20, max-pool 2, conv 5x5x50, max-pool 2, dense 800-500, dense 500-10. ReLU follows
each pooling (pooling commutes with ReLU, so this equals ReLU-then-pool on a tensor four
times smaller). Input sizes are parameters so the same builders serve other data.
"""

from __future__ import annotations

import numpy as np

from sclref import nn


def lenet_300_100(in_features: int = 784, num_classes: int = 10, dtype=np.float64, generator=None) -> nn.Sequential:
    """Dense in_features-300-100-num_classes network with ReLU; takes (N, in_features) or images."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300, dtype=dtype, generator=generator), nn.ReLU(),
        nn.Linear(300, 100, dtype=dtype, generator=generator), nn.ReLU(),
        nn.Linear(100, num_classes, dtype=dtype, generator=generator),
    )


def lenet5(in_shape=(1, 28, 28), num_classes: int = 10, dtype=np.float64, generator=None) -> nn.Sequential:
    """Caffe LeNet-5 for (N, C, H, W) input of shape `in_shape` per sample."""
    c, h, w = in_shape
    h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if h2 < 1 or w2 < 1:
        raise ValueError(f"lenet5: input {in_shape} is too small for two 5x5 convolutions and 2x2 poolings")
    return nn.Sequential(
        nn.Conv2d(c, 20, 5, dtype=dtype, generator=generator), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(20, 50, 5, dtype=dtype, generator=generator), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(50 * h2 * w2, 500, dtype=dtype, generator=generator), nn.ReLU(),
        nn.Linear(500, num_classes, dtype=dtype, generator=generator),
    )
