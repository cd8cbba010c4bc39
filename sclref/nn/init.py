"""Weight initializers, drawing from sclref's seeded generator unless given another.

Every weight of a layer is first allocated here, so this is where a layer size that came
from outside (a model file, a flag) is checked against `sclref.errors.check_allocation`.
"""

from __future__ import annotations

import numpy as np

from sclref import rng
from sclref.errors import check_allocation


def uniform_fan_in(shape, fan_in: int, dtype=np.float64, generator: np.random.Generator | None = None) -> np.ndarray:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear and Conv2d layers."""
    gen = rng.default_generator() if generator is None else generator
    check_allocation(np.atleast_1d(shape), 8, f"a weight of shape {tuple(np.atleast_1d(shape))}")
    bound = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0
    return gen.uniform(-bound, bound, size=shape).astype(dtype)
