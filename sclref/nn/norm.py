"""Batch normalization layers: per-channel normalization with running statistics kept as buffers."""

from __future__ import annotations

import numbers

import numpy as np

from sclref import ops
from sclref.autograd import FLOAT_DTYPES
from sclref.errors import check_allocation
from sclref.nn.module import Module, Parameter


class _BatchNorm(Module):
    """What BatchNorm1d and BatchNorm2d share; they differ only in the input ranks they accept.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance before its square root.
    momentum : float or None
        Weight of each batch in the running statistics; None keeps their cumulative average.
    affine : bool
        Learn a per-channel scale `weight` (initially 1) and shift `bias` (initially 0).
    track_running_stats : bool
        Keep `running_mean`, `running_var` and `num_batches_tracked` buffers, used in eval
        mode; without them the batch statistics are used in both modes.
    dtype : float32 or float64
        Dtype of the parameters and running statistics.
    """

    ranks: tuple[int, ...] = ()
    layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype=np.float64):
        super().__init__()
        name = type(self).__name__
        if not (isinstance(num_features, numbers.Integral) and num_features > 0):
            raise ValueError(f"{name}: num_features must be a positive integer, got {num_features!r}")
        if not (isinstance(eps, numbers.Real) and 0 < eps < np.inf):
            raise ValueError(f"{name}: eps must be a positive finite number, got {eps!r}")
        if momentum is not None and not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
            raise ValueError(f"{name}: momentum must be a number in [0, 1] or None, got {momentum!r}")
        if np.dtype(dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{name}: parameters are float32 or float64, not {np.dtype(dtype)}")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        c = self.num_features
        # The channel count may come from a model file: refuse a size too large before allocating.
        check_allocation((c,), np.dtype(dtype).itemsize, f"{name}({c}) per-channel state")
        self.weight = Parameter(np.ones(c, dtype=dtype)) if affine else None
        self.bias = Parameter(np.zeros(c, dtype=dtype)) if affine else None
        stats = track_running_stats
        self.register_buffer("running_mean", np.zeros(c, dtype=dtype) if stats else None)
        self.register_buffer("running_var", np.ones(c, dtype=dtype) if stats else None)
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64) if stats else None)

    def forward(self, x):
        if x.ndim not in self.ranks or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}): expected input {self.layout} with "
                             f"C = {self.num_features}, got shape {x.shape}")
        # Without running statistics the batch's own are used in eval mode too, as in PyTorch.
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if momentum is None:  # a cumulative average: every batch weighs the same
            momentum = 1.0 / (int(self.num_batches_tracked) + 1) if update else 0.0
        y = ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, training=use_batch,
                           momentum=momentum, eps=self.eps)
        if update:
            self.num_batches_tracked += 1
        return y

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) input over every axis but C, as torch.nn.BatchNorm1d."""

    ranks, layout = (2, 3), "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) input over N, H and W, as torch.nn.BatchNorm2d."""

    ranks, layout = (4,), "(N, C, H, W)"
