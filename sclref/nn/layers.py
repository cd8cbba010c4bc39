"""Plain (unmasked) layers: Linear, Conv2d, pooling (max, global average), activations, dropout, Sequential."""

from __future__ import annotations

import numpy as np

from sclref import ops
from sclref.nn import init
from sclref.nn.module import Module, Parameter


class Sequential(Module):
    """Modules applied one after another; pass them positionally or as one dict of named layers."""

    def __init__(self, *layers):
        super().__init__()
        named = layers[0].items() if len(layers) == 1 and isinstance(layers[0], dict) else enumerate(layers)
        for name, layer in named:
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {name} is a {type(layer).__name__}, not a Module")
            setattr(self, str(name), layer)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x


class Linear(Module):
    """y = x @ W.T + b with W of shape (out_features, in_features), as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=np.float64, generator=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        self.weight = Parameter(init.uniform_fan_in(shape, in_features, dtype, generator))
        self.bias = Parameter(init.uniform_fan_in((out_features,), in_features, dtype, generator)) if bias else None

    def effective_weight(self):
        """The weight the forward pass uses (masked subclasses return θ ⊙ H(s))."""
        return self.weight

    def forward(self, x):
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with last dimension {self.in_features}, got shape {x.shape}"
            )
        return ops.linear(x, self.effective_weight(), self.bias)

    def uses_per_sample(self) -> int:
        """How many multiply-adds each connection costs per input sample."""
        return 1

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution layer over NCHW input; weight (out_channels, in_channels, kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 dtype=np.float64, generator=None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        fan_in = in_channels * kh * kw
        self.weight = Parameter(init.uniform_fan_in((out_channels, in_channels, kh, kw), fan_in, dtype, generator))
        self.bias = Parameter(init.uniform_fan_in((out_channels,), fan_in, dtype, generator)) if bias else None

        self.output_size = None  # (OH, OW) of the last forward, for FLOPs accounting

    def effective_weight(self):
        """The weight the forward pass uses (masked subclasses return θ ⊙ H(s))."""
        return self.weight

    def forward(self, x):
        y = ops.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding)
        self.output_size = y.shape[2:]
        return y

    def uses_per_sample(self) -> int:
        """Multiply-adds per connection per sample: one per output pixel of the last forward."""
        if self.output_size is None:
            raise RuntimeError(f"{type(self).__name__}: run a forward pass first, FLOPs depend on the input size")
        return int(self.output_size[0] * self.output_size[1])

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MaxPool2d(Module):
    """Max pooling; stride defaults to the kernel size."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        return ops.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class GlobalAvgPool2d(Module):
    """Mean over the spatial axes, (N, C, H, W) -> (N, C): the pooling before a ResNet's classifier."""

    def forward(self, x):
        return ops.global_avg_pool2d(x)


class ReLU(Module):
    """max(x, 0)."""

    def forward(self, x):
        return ops.relu(x)


class LeakyReLU(Module):
    """x if x > 0 else alpha * x."""

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return ops.leaky_relu(x, self.alpha)


class Flatten(Module):
    """Collapse all dimensions from `start_dim` (default 1, keeping the batch)."""

    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):
        return ops.flatten(x, self.start_dim)


class Dropout(Module):
    """Inverted dropout, active only in training mode."""

    def __init__(self, p: float = 0.5, generator=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.generator = p, generator

    def forward(self, x):
        return ops.dropout(x, self.p, self.training, self.generator)
