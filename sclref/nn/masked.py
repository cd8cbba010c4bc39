"""Masked layers of SCL: effective weight ``θ ⊙ H(s)`` recomputed on every forward.

Each masked layer keeps the dense weight θ (`weight`), a bias, and one mask variable per
weight (`score`, the paper's s). The binary mask ``H(s) = [s > 0]`` is exact in the
forward pass; its backward goes through the layer's straight-through estimator. A
*feature* is one output unit: a row of a dense weight, an output filter of a conv.
"""

from __future__ import annotations

import numbers

import numpy as np

from sclref import ops, rng
from sclref import ste as ste_registry
from sclref.autograd import Tensor
from sclref.nn.layers import Conv2d, Linear
from sclref.nn.module import Module, Parameter


def _initial_scores(shape, score_init, dtype, generator) -> np.ndarray:
    """A constant (float) or uniform draw from a (low, high) pair."""
    if isinstance(score_init, numbers.Real):
        if not np.isfinite(score_init):
            raise ValueError(f"score_init must be finite, got {score_init}")
        return np.full(shape, score_init, dtype=dtype)
    try:
        low, high = score_init
        valid = bool(np.isfinite(low) and np.isfinite(high) and low < high)
    except (TypeError, ValueError):  # not a pair of numbers
        valid = False
    if not valid:
        raise ValueError(f"score_init must be a finite number or a pair (low, high) with low < high, "
                         f"got {score_init!r}")
    gen = rng.default_generator() if generator is None else generator
    return gen.uniform(low, high, size=shape).astype(dtype)


class MaskedLayer(Module):
    """What every masked layer shares: the mask, its estimator, sparsity and freezing."""

    weight: Parameter
    score: Parameter

    def _init_mask(self, ste, score_init, dtype, generator):
        self.ste = ste_registry.get(ste)
        self.score = Parameter(_initial_scores(self.weight.shape, score_init, dtype, generator))
        self.frozen = False

    def mask(self) -> np.ndarray:
        """The binary connectivity H(s) as a bool array shaped like the weight."""
        return self.score.data > 0

    def effective_weight(self) -> Tensor:
        """θ ⊙ H(s); with a frozen mask, H(s) is a constant and s gets no gradient."""
        if self.frozen:
            return ops.mul(self.weight, self.mask().astype(self.weight.dtype))
        return ops.masked_weight(self.weight, self.score, None if self.ste.unit_surrogate else self.ste.surrogate)

    def freeze_mask(self, frozen: bool = True) -> None:
        """Fix the mask (for fine-tuning θ): the scores stop receiving gradients."""
        self.frozen = bool(frozen)
        self.score.requires_grad = not self.frozen
        if self.frozen:
            self.score.grad = None

    @property
    def num_weights(self) -> int:
        return self.weight.size

    def num_kept(self) -> int:
        return int(np.count_nonzero(self.mask()))

    def sparsity(self) -> float:
        """Fraction of connections removed (0 = dense)."""
        return 1.0 - self.num_kept() / self.num_weights


class MaskedLinear(MaskedLayer, Linear):
    """Dense layer y = x @ (θ ⊙ H(s)).T + b, θ and s of shape (out_features, in_features).

    Parameters
    ----------
    ste : str or STE
        Straight-through estimator of the mask (default "identity", SCL's choice).
    score_init : float or (low, high)
        Initial mask variables: a constant, or uniform draws. Positive means dense.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ste="identity",
                 score_init=1.0, dtype=np.float64, generator=None):
        Linear.__init__(self, in_features, out_features, bias, dtype, generator)
        self._init_mask(ste, score_init, dtype, generator)

    def extra_repr(self):
        return f"{Linear.extra_repr(self)}, ste={self.ste!r}"


class MaskedConv2d(MaskedLayer, Conv2d):
    """Conv layer with weight θ ⊙ H(s), θ and s of shape (out_channels, in_channels, kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 ste="identity", score_init=1.0, dtype=np.float64, generator=None):
        Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, bias, dtype, generator)
        self._init_mask(ste, score_init, dtype, generator)

    def extra_repr(self):
        return f"{Conv2d.extra_repr(self)}, ste={self.ste!r}"
