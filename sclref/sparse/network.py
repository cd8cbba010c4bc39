"""The exported network as plain data: an ordered list of sparse weight layers, the
parameter-free steps between them (activations, pooling, flatten, the subsampling and
zero-padding of an option-A shortcut) and residual blocks (a body and a shortcut, each
itself such a list, whose outputs are added).

A weight layer holds its weight as a canonical scipy CSR matrix of shape (F, K) and a
dense bias (F,). For a convolution, K = C*KH*KW and column ``c*KH*KW + i*KW + k`` holds
the filter taps w[:, c, i, k] (the im2col order). Nothing here runs the network
(`runtime` does); what is here is the arithmetic of its shapes and of how large its
values can grow, which the file reader and the runtime check before they allocate.
"""

from __future__ import annotations

import math
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
class GlobalAvgPool2d:
    """Mean over the spatial axes, (N, C, H, W) -> (N, C)."""

    name: str
    kind = "global_avg_pool2d"


@dataclass
class SubsamplePad:
    """``x[:, :, ::SH, ::SW]`` with `channels` = (before, after) zero channels added: an option-A shortcut."""

    name: str
    stride: tuple[int, int]
    channels: tuple[int, int]
    kind = "subsample_pad"


@dataclass
class Residual:
    """``body(x) + shortcut(x)``: each a list of layers run in order; an empty shortcut is the identity.

    The activation after the add of a ResNet block is the next layer, not part of the block.
    """

    name: str
    body: list
    shortcut: list = field(default_factory=list)
    kind = "residual"


def walk(layers: list, depth: int = 0):
    """(layer, residual depth) of every layer in `layers`, nested ones included, in execution order.

    A residual block comes before its body, its body before its shortcut. Iterative, so
    that no nesting can exhaust the stack.
    """
    stack = [(iter(layers), depth)]
    while stack:
        items, level = stack[-1]
        layer = next(items, None)
        if layer is None:
            stack.pop()
            continue
        yield layer, level
        if isinstance(layer, Residual):
            stack.append((iter([*layer.body, *layer.shortcut]), level + 1))


@dataclass
class SparseNetwork:
    """An exported network: layers in order, the float dtype of every array, provenance.

    `input_shape` is the per-sample input shape, or None when the source did not say.
    `removed_units` maps a weight layer's name to the original indices of the units that
    dead-unit removal took out of it. `source` is free-form provenance (JSON values).
    `preprocessing` is how the training inputs were standardized,
    ``{"pixel_max": p, "mean": m, "std": s}`` meaning ``x = (x_raw / p - m) / s``, or None
    when the source did not record it (files of format version 1, older runs).
    """

    layers: list
    dtype: np.dtype
    input_shape: tuple[int, ...] | None = None
    removed_units: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    preprocessing: dict | None = None

    def weighted(self) -> list:
        """The weight layers (Linear and Conv2d), in execution order, those inside residual blocks included."""
        return [layer for layer, _ in walk(self.layers) if isinstance(layer, WeightLayer)]

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

    def shapes(self, sample_shape=None) -> list[tuple[int, ...]]:
        """Per-sample shapes: the input's (`sample_shape`, default `input_shape`), then each layer's output.

        Without either shape the network must start (after flatten or activations) with a
        linear layer, whose input size is then the input shape. Raises ValueError naming
        the first layer whose input does not fit it.
        """
        shape = self.input_shape if sample_shape is None else tuple(int(s) for s in sample_shape)
        if shape is None:
            first = next((layer for layer in self.layers if not isinstance(layer, (Activation, Flatten))), None)
            if not isinstance(first, Linear):
                raise ValueError("a network that does not start with a linear layer needs an input_shape")
            shape = (first.in_features,)
        shapes = [shape]
        for layer in self.layers:
            shape = output_shape(layer, shape)
            shapes.append(shape)
        return shapes

    def magnitude_bounds(self, input_bound: float) -> list[tuple[str, float]]:
        """(layer name, largest |value| the layer can output) for inputs of magnitude at most `input_bound`.

        A weight layer's output is at most the largest row sum of |W| times the bound of
        its input, plus the largest |bias| (padding adds zeros); every partial sum of a
        kernel obeys the same bound. ReLU, pooling, flatten and subsampling keep the
        bound, a leaky ReLU multiplies it by max(1, |alpha|), a residual block's is the sum
        of its body's and its shortcut's. Every layer inside a block is listed, then the
        block. Computed in float64 (inf on overflow).
        """
        out = []
        _bounds(self.layers, float(input_bound), out)
        return out


def _bounds(layers: list, bound: float, out: list) -> float:
    """Append (name, bound) of each of `layers` (nested ones first) to `out`; the bound of the last output."""
    for layer in layers:
        if isinstance(layer, Residual):
            bound = _bounds(layer.body, bound, out) + _bounds(layer.shortcut, bound, out)
        else:
            bound = _layer_bound(layer, bound)
        out.append((layer.name, bound))
    return bound


def _layer_bound(layer, bound: float) -> float:
    """The bound of the output of one layer that is not a residual block, given its input's."""
    if isinstance(layer, WeightLayer):
        w = layer.weight
        rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
        with np.errstate(over="ignore", invalid="ignore"):
            row_sums = np.bincount(rows, weights=np.abs(w.data.astype(np.float64)), minlength=w.shape[0])
            gain = float(row_sums.max(initial=0.0))
            bias = float(np.abs(layer.bias.astype(np.float64)).max(initial=0.0))
        return gain * bound + bias if gain else bias
    if isinstance(layer, Activation) and layer.kind == "leaky_relu":
        return bound * max(1.0, abs(float(layer.alpha)))
    return bound


def output_shape(layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape `layer` makes of a per-sample input of `shape`; ValueError if it does not fit."""
    if isinstance(layer, Linear):
        if tuple(shape) != (layer.in_features,):
            raise ValueError(f"layer {layer.name!r} takes {layer.in_features} features per sample, "
                             f"gets shape {tuple(shape)}")
        return (layer.out_features,)
    if isinstance(layer, (Conv2d, MaxPool2d)):
        if len(shape) != 3:
            raise ValueError(f"layer {layer.name!r} ({layer.kind}) takes (C, H, W) samples, gets shape {tuple(shape)}")
        c, h, w = shape
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        ph, pw = layer.padding if isinstance(layer, Conv2d) else (0, 0)
        if isinstance(layer, Conv2d) and c != layer.in_channels:
            raise ValueError(f"layer {layer.name!r} takes {layer.in_channels} channels, gets {c}")
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise ValueError(f"layer {layer.name!r}: its {kh}x{kw} window is larger than its "
                             f"{'padded ' if ph or pw else ''}input {h + 2 * ph}x{w + 2 * pw}")
        channels = layer.out_channels if isinstance(layer, Conv2d) else c
        return (channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    if isinstance(layer, Flatten):
        return (math.prod(shape),)
    if isinstance(layer, GlobalAvgPool2d):
        if len(shape) != 3:
            raise ValueError(f"layer {layer.name!r} ({layer.kind}) takes (C, H, W) samples, gets shape {tuple(shape)}")
        return (shape[0],)
    if isinstance(layer, SubsamplePad):
        if len(shape) != 3:
            raise ValueError(f"layer {layer.name!r} ({layer.kind}) takes (C, H, W) samples, gets shape {tuple(shape)}")
        (c, h, w), (sh, sw), (before, after) = shape, layer.stride, layer.channels
        return (c + before + after, -(-h // sh), -(-w // sw))
    if isinstance(layer, Residual):
        body, short = chain_shape(layer.body, shape), chain_shape(layer.shortcut, shape)
        if body != short:
            raise ValueError(f"residual block {layer.name!r}: its body gives {list(body)} per sample, its shortcut "
                             f"{list(short)}; the two must match to be added")
        return body
    return tuple(shape)


def chain_shape(layers: list, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape `layers`, run in order, make of an input of `shape`; ValueError if one does not fit."""
    for layer in layers:
        shape = output_shape(layer, shape)
    return tuple(shape)


def _show(value, limit: int = 80) -> str:
    """repr of `value`, cut to `limit` characters (values from files can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
