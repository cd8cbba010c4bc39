"""Check an estimator's surrogate against the convergence principle: is g'(s) > 0 everywhere?

Pure NumPy on the surrogate alone, no graph. Three looks at each surrogate:

- a dense grid over the working range ``[-bound, bound]`` (plus the points where the
  built-in estimators change: 0, ±1 and their floating-point neighbours). Where g'
  vanishes, the edges of each zero interval are found by bisection;
- points drawn by hypothesis (when it is installed) that search for a counterexample,
  some s in the range with ``g'(s) <= 0``, shrunk to the simplest one;
- the far tails beyond the range, where a surrogate that is positive in exact arithmetic
  can still underflow to 0.0 in float64 (softplus's sigmoid below s ≈ -745).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from sclref import ste as ste_registry

__all__ = ["SurrogateCheck", "check", "check_all", "describe_zero_set"]

DEFAULT_BOUND = 50.0
DEFAULT_GRID = 200_001  # odd, so s = 0 is a grid point


@dataclass
class SurrogateCheck:
    """What the checker found about one estimator's surrogate.

    Attributes
    ----------
    name : str
        Registered name of the estimator.
    declared : bool
        The estimator's own claim, ``satisfies_principle``.
    positive : bool
        True when no checked point in ``[-bound, bound]`` (grid and hypothesis) has g' <= 0.
    min_value, argmin : float
        The smallest g' on the grid and where it is.
    zero_set : list of (float, float)
        Closed intervals where g'(s) <= 0, found on the grid (and around a hypothesis
        counterexample), edges refined by bisection.
    counterexample : float or None
        The simplest s with g'(s) <= 0 that hypothesis found, None if it found none. A
        zero interval around it that the grid missed is added to ``zero_set``.
    hypothesis_examples : int or None
        How many examples hypothesis tried; None when hypothesis is not installed.
    underflow_at : float or None
        For a surrogate positive on the range: the s of smallest magnitude beyond it where
        float64 evaluation gives exactly 0 (None if it stays positive up to ±1e300).
    bound : float
        Half-width of the checked range.
    """

    name: str
    declared: bool
    positive: bool
    min_value: float
    argmin: float
    zero_set: list = field(default_factory=list)
    counterexample: float | None = None
    hypothesis_examples: int | None = None
    underflow_at: float | None = None
    bound: float = DEFAULT_BOUND

    @property
    def agrees(self) -> bool:
        """Whether the measurement matches the estimator's declaration."""
        return self.positive == self.declared

    def to_dict(self) -> dict:
        out = asdict(self)
        out["agrees"] = self.agrees
        out["zero_set_text"] = describe_zero_set(self.zero_set, self.bound)
        return out


def _values(est, s: np.ndarray) -> np.ndarray:
    """g'(s) as float64, refusing surrogates that return the wrong shape or NaN."""
    g = np.asarray(est.surrogate(s), dtype=np.float64)
    if g.shape != s.shape:
        raise ValueError(f"STE {est.name!r}: surrogate returned shape {g.shape} for input shape {s.shape}")
    if np.isnan(g).any():
        raise ValueError(f"STE {est.name!r}: surrogate is NaN at s = {s[np.isnan(g)][0]}")
    return g


def _grid(bound: float, n: int) -> np.ndarray:
    """A uniform grid with the estimators' switch points and their float neighbours added."""
    specials = []
    for x in (0.0, 1.0, -1.0):
        specials += [x, np.nextafter(x, -np.inf), np.nextafter(x, np.inf)]
    s = np.concatenate([np.linspace(-bound, bound, n), [x for x in specials if abs(x) <= bound]])
    return np.unique(s)


def _edge(est, inside: float, outside: float) -> float:
    """Bisect between a point where g' <= 0 (`inside`) and one where g' > 0; return the last zero point."""
    for _ in range(200):
        mid = inside + (outside - inside) / 2
        if mid in (inside, outside):  # adjacent floats: the edge is found
            break
        if _values(est, np.array([mid]))[0] <= 0:
            inside = mid
        else:
            outside = mid
    return float(inside)


def _zero_set(est, s: np.ndarray, g: np.ndarray) -> list[tuple[float, float]]:
    """Intervals [lo, hi] where g' <= 0, each edge refined between its grid neighbours."""
    bad = g <= 0
    if not bad.any():
        return []
    padded = np.concatenate([[False], bad, [False]]).astype(np.int8)
    starts = np.flatnonzero(np.diff(padded) == 1)
    stops = np.flatnonzero(np.diff(padded) == -1) - 1
    intervals = []
    for i, j in zip(starts, stops):
        lo = float(s[i]) if i == 0 else _edge(est, float(s[i]), float(s[i - 1]))
        hi = float(s[j]) if j == len(s) - 1 else _edge(est, float(s[j]), float(s[j + 1]))
        intervals.append((lo, hi))
    return intervals


def _add_point(est, s: np.ndarray, g: np.ndarray, intervals: list, point: float) -> list:
    """`intervals` with the zero interval around `point` (g'(point) <= 0) added if the grid missed it."""
    if any(lo <= point <= hi for lo, hi in intervals):
        return intervals
    k = int(np.searchsorted(s, point))  # s[k-1] < point < s[k]: a point off the grid
    lo = point if k == 0 or g[k - 1] <= 0 else _edge(est, point, float(s[k - 1]))
    hi = point if k == len(s) or g[k] <= 0 else _edge(est, point, float(s[k]))
    return sorted(intervals + [(lo, hi)])


def _hypothesis_counterexample(est, bound: float, max_examples: int):
    """(simplest s in range with g'(s) <= 0 or None, examples tried); (None, None) without hypothesis."""
    try:
        from hypothesis import find, settings
        from hypothesis import strategies as st
        from hypothesis.errors import NoSuchExample
    except ImportError:
        return None, None
    # derandomize: the same search every run; database=None: nothing written to disk.
    config = settings(max_examples=max_examples, database=None, derandomize=True, deadline=None)
    try:
        found = find(st.floats(-bound, bound, allow_nan=False),
                     lambda v: bool(_values(est, np.array([v]))[0] <= 0), settings=config)
    except NoSuchExample:
        return None, max_examples
    return float(found), max_examples


def _underflow(est, bound: float) -> float | None:
    """Smallest |s| beyond `bound` (either sign) where g'(s) evaluates to exactly 0 in float64."""
    if bound >= 1e300:  # nothing beyond the range to look at
        return None
    mags = np.logspace(math.log10(bound), 300, 2000)
    found = []
    with np.errstate(over="ignore", under="ignore"):  # huge |s| are probed on purpose
        for sign in (-1.0, 1.0):
            g = _values(est, sign * mags)
            zero = np.flatnonzero(g <= 0)
            if zero.size:
                k = zero[0]
                edge = sign * mags[k] if k == 0 else _edge(est, sign * mags[k], sign * mags[k - 1])
                found.append(edge)
    return min(found, key=abs) if found else None


def check(ste, bound: float = DEFAULT_BOUND, grid_points: int = DEFAULT_GRID, max_examples: int = 300,
          use_hypothesis: bool = True) -> SurrogateCheck:
    """Check one estimator's surrogate for positivity on ``[-bound, bound]``.

    Parameters
    ----------
    ste : str or STE
        A registered name or an estimator instance.
    bound : float
        Half-width of the range checked by the grid and by hypothesis.
    grid_points : int
        Points of the uniform grid (the switch points 0, ±1 are added).
    max_examples : int
        Examples hypothesis may try when searching for s with g'(s) <= 0.
    use_hypothesis : bool
        Search with hypothesis if it is installed.

    Returns
    -------
    SurrogateCheck
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number > 0, got {bound}")
    if grid_points < 3:
        raise ValueError(f"grid_points must be >= 3, got {grid_points}")
    est = ste_registry.get(ste)
    s = _grid(bound, grid_points)
    g = _values(est, s)
    k = int(np.argmin(g))
    counterexample, examples = (_hypothesis_counterexample(est, bound, max_examples)
                                if use_hypothesis and max_examples > 0 else (None, None))
    positive = bool(g[k] > 0) and counterexample is None
    zero_set = _zero_set(est, s, g)
    if counterexample is not None:
        zero_set = _add_point(est, s, g, zero_set, counterexample)
    return SurrogateCheck(
        name=est.name, declared=bool(est.satisfies_principle), positive=positive,
        min_value=float(g[k]), argmin=float(s[k]), zero_set=zero_set,
        counterexample=counterexample, hypothesis_examples=examples,
        underflow_at=_underflow(est, bound) if positive else None, bound=float(bound),
    )


def check_all(names=None, **options) -> list[SurrogateCheck]:
    """`check` every registered estimator (or those in `names`), in registration order."""
    return [check(name, **options) for name in (ste_registry.available() if names is None else names)]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def describe_zero_set(intervals, bound: float = DEFAULT_BOUND) -> str:
    """Human-readable zero set, e.g. ``"s <= 0"`` or ``"s < -1, s > 1"``; "none" if empty.

    An interval that reaches the edge of the checked range is written open-ended; the
    text is relative to that range (``bound``).
    """
    if not intervals:
        return "none"
    parts = []
    for lo, hi in intervals:
        left, right = lo <= -bound, hi >= bound
        if left and right:
            parts.append("everywhere")
        elif left:
            # hi is the last zero point: "s <= 0" if hi prints as itself, else "s < next".
            parts.append(f"s <= {_fmt(hi)}" if float(_fmt(hi)) == hi else f"s < {_fmt(hi)}")
        elif right:
            parts.append(f"s >= {_fmt(lo)}" if float(_fmt(lo)) == lo else f"s > {_fmt(lo)}")
        elif lo == hi:
            parts.append(f"s = {_fmt(lo)}")
        else:
            parts.append(f"{_fmt(lo)} <= s <= {_fmt(hi)}")
    return ", ".join(parts)
