"""The exported network as plain data: an ordered list of sparse weight layers and the
parameter-free steps between them (activations, max-pooling, flatten).

A weight layer holds its weight as a canonical scipy CSR matrix of shape (F, K) and a
dense bias (F,). For a convolution, K = C*KH*KW and column ``c*KH*KW + i*KW + k`` holds
the filter taps w[:, c, i, k] (the im2col order). Nothing here computes; `runtime` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class WeightLayer:
    """What Linear and Conv2d share: a name, the CSR weight (F, K) and the dense bias (F,)."""

    name: str
    weight: sp.csr_array
    bias: np.ndarray


@dataclass
class Linear(WeightLayer):
    """y = x @ W.T + b, W a CSR matrix (out_features, in_features)."""

    kind = "linear"

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class Conv2d(WeightLayer):
    """Cross-correlation of NCHW input with CSR filters (out_channels, in_channels*KH*KW), plus bias."""

    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    kind = "conv2d"

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


@dataclass
class MaxPool2d:
    """Max over (KH, KW) windows of NCHW input with the given stride, no padding."""

    name: str
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    kind = "maxpool2d"


@dataclass
class Activation:
    """An elementwise activation: "relu" (max(x, 0)) or "leaky_relu" (x if x > 0 else alpha*x)."""

    name: str
    kind: str
    alpha: float | None = None


@dataclass
class Flatten:
    """(N, C, H, W) -> (N, C*H*W), keeping the batch axis."""

    name: str
    kind = "flatten"


@dataclass
class SparseNetwork:
    """An exported network: layers in order, the float dtype of every array, provenance.

    `input_shape` is the per-sample input shape, or None when the source did not say.
    `removed_units` maps a weight layer's name to the original indices of the units that
    dead-unit removal took out of it. `source` is free-form provenance (JSON values).
    """

    layers: list
    dtype: np.dtype
    input_shape: tuple[int, ...] | None = None
    removed_units: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def weighted(self) -> list:
        """The weight layers (Linear and Conv2d), in order."""
        return [layer for layer in self.layers if isinstance(layer, WeightLayer)]

    @property
    def nnz(self) -> int:
        """Connections kept over all weight layers."""
        return sum(layer.weight.nnz for layer in self.weighted())

    def csr_bytes(self) -> int:
        """Bytes of every CSR array (values, indices, indptr) and bias."""
        return sum(layer.weight.data.nbytes + layer.weight.indices.nbytes + layer.weight.indptr.nbytes
                   + layer.bias.nbytes for layer in self.weighted())

    def dense_bytes(self) -> int:
        """Bytes of the same weights and biases stored dense."""
        size = np.dtype(self.dtype).itemsize
        return sum(size * (int(np.prod(layer.weight.shape)) + layer.bias.size) for layer in self.weighted())
