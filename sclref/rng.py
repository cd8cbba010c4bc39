"""sclref's seeded default random generator, so that the same seed gives the same bits.

Every random draw in sclref that is not handed an explicit `numpy.random.Generator`
(weight initialization, dropout masks, data shuffling) comes from this one generator.
"""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reset the default generator to `seed` and return it."""
    global _generator
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _generator = np.random.default_rng(int(seed))
    return _generator


def default_generator() -> np.random.Generator:
    """The generator used when none is passed explicitly."""
    return _generator
