"""Hypothesis strategies shared by the test modules (shapes, arrays, conv geometries), and numba_threads."""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import strategies as st

SEEDS = st.integers(0, 2**32 - 1)


def shapes(min_dims: int = 0, max_dims: int = 4, min_side: int = 1, max_side: int = 5):
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def arrays(draw, shape, low: float = -2.0, high: float = 2.0, kink=None, gap: float = 0.05, dtype=np.float64):
    """Uniform values in [low, high); with `kink`, none closer than `gap` to that point.

    Values come from a NumPy generator seeded by hypothesis: cheap for large arrays and
    still reproducible from the failing example.
    """
    gen = np.random.default_rng(draw(SEEDS))
    x = gen.uniform(low, high, size=shape)
    if kink is not None:
        d = x - kink
        x = kink + np.sign(d + (d == 0)) * (gap + np.abs(d))
    return x.astype(dtype)


@st.composite
def distinct_arrays(draw, shape, spacing: float = 0.01, dtype=np.float64):
    """Values with no ties (a shuffled ramp), so max-pool windows have a unique maximum."""
    gen = np.random.default_rng(draw(SEEDS))
    n = int(np.prod(shape))
    ramp = (np.arange(n) - n / 2) * spacing
    return gen.permutation(ramp).reshape(shape).astype(dtype)


@st.composite
def broadcastable_pair(draw, max_dims: int = 3):
    """Two shapes that broadcast together, with dimensions dropped or set to 1 on either side."""
    full = draw(shapes(0, max_dims, 1, 4))
    def variant():
        cut = draw(st.integers(0, len(full)))
        return tuple(1 if draw(st.booleans()) else s for s in full[cut:])
    return variant(), variant()


@st.composite
def conv_geometry(draw, max_n: int = 3, max_c: int = 3, max_f: int = 3, max_hw: int = 8, max_k: int = 4):
    """(N, C, F, H, W, KH, KW, stride, padding) with at least one output pixel."""
    n, c, f = draw(st.integers(1, max_n)), draw(st.integers(1, max_c)), draw(st.integers(1, max_f))
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), max_hw))
    w = draw(st.integers(max(1, kw - 2 * pw), max_hw))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return n, c, f, h, w, kh, kw, (sh, sw), (ph, pw)


@st.composite
def pool_geometry(draw, max_n: int = 2, max_c: int = 3, max_hw: int = 9, max_k: int = 3):
    """(N, C, H, W, kernel, stride) with the kernel inside the input."""
    n, c = draw(st.integers(1, max_n)), draw(st.integers(1, max_c))
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    h, w = draw(st.integers(kh, max_hw)), draw(st.integers(kw, max_hw))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return n, c, h, w, (kh, kw), (sh, sw)


@st.composite
def scores(draw, shape, low: float = -3.0, high: float = 3.0, specials=(0.0, 1.0, -1.0), dtype=np.float64):
    """Mask variables in [low, high), some set exactly to `specials` (where the estimators change)."""
    gen = np.random.default_rng(draw(SEEDS))
    s = gen.uniform(low, high, size=shape)
    hit = gen.random(shape) < draw(st.sampled_from([0.0, 0.2, 0.5]))
    s[hit] = gen.choice(np.asarray(specials, dtype=np.float64), size=int(np.count_nonzero(hit)))
    return s.astype(dtype)


@st.composite
def mask_scores(draw, shape, gap: float = 0.05, high: float = 2.0, dtype=np.float64):
    """Mask variables whose mask H(s) is random, with empty features (axis 0) and all-zero masks.

    Every |s| lies in [gap, high): no score sits on the step, and some pass |s| = 1.
    """
    gen = np.random.default_rng(draw(SEEDS))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    keep = gen.random(shape) < density
    keep[gen.random(shape[0]) < 0.3] = False  # features left with no connection
    magnitude = gen.uniform(gap, high, size=shape)
    return np.where(keep, magnitude, -magnitude).astype(dtype)


@st.composite
def batch_norm_shapes(draw, max_n: int = 4, max_c: int = 3, max_hw: int = 4, spatial=None):
    """(N, C) or (N, C, H, W) with at least two values per channel, as training-mode batch norm needs.

    `spatial` True or False forces the 4-D or the 2-D layout; None draws either.
    """
    four_d = draw(st.booleans()) if spatial is None else spatial
    c = draw(st.integers(1, max_c))
    if not four_d:
        return draw(st.integers(2, max_n)), c
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    return draw(st.integers(1 if h * w > 1 else 2, max_n)), c, h, w


@st.composite
def basic_indices(draw, shape):
    """A basic index into `shape`: per leading axis an integer, a slice of any step sign or the whole
    axis, sometimes with one Ellipsis standing for the axes in between."""
    ndim = len(shape)
    count = draw(st.integers(0, ndim))
    ellipsis_at = draw(st.none() | st.integers(0, count))
    # Without an ellipsis the entries index the first axes; with one, those after it index the last.
    axes = list(range(count)) if ellipsis_at is None else \
        list(range(ellipsis_at)) + list(range(ndim - (count - ellipsis_at), ndim))
    bound = st.none() | st.integers(-7, 7)
    items = []
    for axis in axes:
        n = shape[axis]
        items.append(draw(st.integers(-n, n - 1) | st.builds(slice, bound, bound, st.none() | st.sampled_from(
            [-3, -2, -1, 1, 2, 3])) | st.just(slice(None)) | st.just(slice(None, None, 2))))
    if ellipsis_at is not None:
        items.insert(ellipsis_at, Ellipsis)
    return tuple(items)


@st.composite
def pad_widths(draw, ndim: int, max_width: int = 2):
    """One (before, after) pair of zero-padding counts per axis."""
    width = st.integers(0, max_width)
    return tuple((draw(width), draw(width)) for _ in range(ndim))


@contextlib.contextmanager
def numba_threads(n):
    """Run the block with numba's thread count at `n`, then restore it."""
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)
