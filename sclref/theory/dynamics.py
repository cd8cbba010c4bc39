"""Mask-variable dynamics on objectives whose best binary mask is known (experiments 1 and 2).

Pure NumPy: the mask is ``m = H(s) = [s > 0]`` and each step applies SCL's update rule
``s <- s - lr * (dL/dm) * g'(s)`` with the estimator's own `surrogate`. Both objectives
are quadratics in the binary mask, so ``dL/dm`` depends on the mask alone. That makes
it possible to run every case to *absorption*, the point after which the mask provably
never changes again, instead of stopping after an arbitrary budget:

- a variable with ``g'(s) = 0`` never moves again (frozen);
- a variable whose step pushes it away from 0, or that gets no step, keeps its mask as
  long as no other mask changes.

When every variable of a run is in one of these states the mask is fixed forever, and
the run's verdict holds for any number of further steps. ``max_steps`` is only a safety
cap; a case that hits it is reported as such, with what its masks did in the last steps
before the cap (which variables flipped, how long each was on, the mean gradient).

Experiment 1 (`single_variable`): one mask variable under ``L = ½ (m - m*)²``, started
on either side of 0. Experiment 2 (`planted_mask`): many mask variables under
``L = ½ (m - m*)ᵀ P (m - m*)``, the expected squared error of a linear unit with fixed
weights θ and inputs of covariance Σ (``P = diag(θ) Σ diag(θ)``) against a teacher using
the same weights under mask m*. P is positive definite, so m* is the unique optimum;
`brute_force_optimum` confirms it by enumerating every mask.

`chatter_diagnostic` reruns experiment 2 with two-slope surrogates (g' = `on` for s > 0,
`off` otherwise) and with decaying step sizes, to show which property of an estimator
makes runs keep flipping masks at the cap (docs/theory.md, "leaky_relu").
"""

from __future__ import annotations

import math

import numpy as np

from sclref import ste as ste_registry

__all__ = ["DEFAULT_STARTS", "LONG_CAP", "LR_DECAYS", "SLOPE_PAIRS", "TwoSlope", "brute_force_optimum",
           "chatter_diagnostic", "planted_mask", "single_variable"]

# Both sides of 0, inside and beyond the clipped estimator's live region |s| <= 1.
DEFAULT_STARTS = (-6.0, -3.0, -1.5, -0.9, -0.5, -0.1, 0.1, 0.5, 0.9, 1.5, 3.0, 6.0)


def _check_positive(name: str, value, integer: bool = False) -> None:
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if integer else \
        isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} > 0, got {value!r}")


def _surrogate(est, s: np.ndarray) -> np.ndarray:
    g = np.asarray(est.surrogate(s), dtype=np.float64)
    if g.shape != s.shape:
        raise ValueError(f"STE {est.name!r}: surrogate returned shape {g.shape} for input shape {s.shape}")
    return g


def _settled(s: np.ndarray, grad: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per variable: its mask cannot change while the other masks stay as they are.

    No step (g' = 0 or dL/dm = 0), or a step that moves s away from the step at 0:
    up for an on variable (dL/dm < 0), down for an off one (dL/dm > 0).
    """
    on = s > 0
    step = grad * g
    return (step == 0) | (on & (step < 0)) | (~on & (step > 0))


def single_variable(ste, starts=DEFAULT_STARTS, lr: float = 0.1, max_steps: int = 100_000) -> dict:
    """Experiment 1: one mask variable under ``L = ½ (m - m*)²``, for m* = 1 (on) and m* = 0 (off).

    Parameters
    ----------
    ste : str or STE
        The estimator whose surrogate drives the updates.
    starts : sequence of float
        Initial values of s; every start is run for both targets.
    lr : float
        Learning rate η of the update ``s <- s - η (dL/dm) g'(s)``.
    max_steps : int
        Safety cap on the number of steps.

    Returns
    -------
    dict
        ``starts`` (K,), ``targets`` (2,) = (1, 0); per case, arrays of shape (2, K):
        ``wrong_start`` (started on the wrong side), ``right`` (ends on the right side),
        ``steps`` (first step from which the mask is right for good; 0 if it started
        right, -1 if never), ``frozen`` (ends wrong with g'(s) = 0: dead), ``capped``
        (still moving at the cap), ``final`` (last s); ``trajectory`` (T+1, 2, K), s after
        every step until absorption.
    """
    _check_positive("lr", lr)
    _check_positive("max_steps", max_steps, integer=True)
    est = ste_registry.get(ste)
    starts = np.asarray(starts, dtype=np.float64)
    if starts.ndim != 1 or starts.size == 0 or not np.isfinite(starts).all():
        raise ValueError("starts must be a non-empty sequence of finite numbers")
    targets = np.array([1.0, 0.0])
    target = np.broadcast_to(targets[:, None], (2, starts.size))
    s = np.broadcast_to(starts, (2, starts.size)).copy()
    wrong_start = (s > 0) != (target > 0)
    steps = np.where(wrong_start, -1, 0)
    history = [s.copy()]
    for t in range(1, max_steps + 1):
        grad = (s > 0) - target  # dL/dm of ½ (m - m*)²: zero on the right side
        g = _surrogate(est, s)
        if _settled(s, grad, g).all():
            break
        s = s - lr * grad * g
        history.append(s.copy())
        right = (s > 0) == (target > 0)
        # The gradient is zero on the right side, so a mask that gets there stays.
        steps[right & (steps < 0)] = t
    right = (s > 0) == (target > 0)
    g = _surrogate(est, s)
    grad = (s > 0) - target
    settled = _settled(s, grad, g)
    return {
        "ste": est.name, "lr": lr, "starts": starts, "targets": targets, "wrong_start": wrong_start,
        "right": right, "steps": steps, "frozen": ~right & (g == 0), "capped": ~settled,
        "final": s, "trajectory": np.stack(history),
    }


def _planted_problems(runs: int, n: int, seed: int, rho_max: float):
    """`runs` random instances: weights θ, covariance Σ (equicorrelated), planted mask m*, P."""
    gen = np.random.default_rng([seed, 2])
    theta = gen.uniform(0.5, 1.5, size=(runs, n)) * gen.choice([-1.0, 1.0], size=(runs, n))
    rho = gen.uniform(0.0, rho_max, size=runs)
    sigma = (1 - rho)[:, None, None] * np.eye(n) + rho[:, None, None]
    P = theta[:, :, None] * sigma * theta[:, None, :]
    m_star = (gen.random((runs, n)) < 0.5).astype(np.float64)
    return theta, rho, P, m_star, gen


def brute_force_optimum(P: np.ndarray, m_star: np.ndarray) -> np.ndarray:
    """Every run's best mask by enumerating all 2^n of them.

    Parameters
    ----------
    P : ndarray (R, n, n)
        The quadratic form of each run.
    m_star : ndarray (R, n)
        Each run's planted mask.

    Returns
    -------
    ndarray (R, n) of float
        The mask of least ``½ (m - m*)ᵀ P (m - m*)`` in each run.
    """
    n = m_star.shape[1]
    if n > 16:
        raise ValueError(f"brute force over 2^{n} masks is too large (n <= 16)")
    masks = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(np.float64)  # (2^n, n)
    best = np.empty_like(m_star)
    for r in range(len(P)):
        e = masks - m_star[r]
        loss = 0.5 * np.einsum("ki,ij,kj->k", e, P[r], e)
        best[r] = masks[np.argmin(loss)]
    return best


def planted_mask(ste, runs: int = 200, n: int = 12, seed: int = 0, lr: float = 0.1, max_steps: int = 20_000,
                 init=(-2.0, 2.0), rho_max: float = 0.5, window: int = 1000, lr_decay: float = 0.0) -> dict:
    """Experiment 2: `runs` problems of `n` mask variables with a known best mask, from random starts.

    Each run draws weights ``|θ_i| ~ U(0.5, 1.5)`` with random signs, an equicorrelated
    input covariance (correlation ``ρ ~ U(0, rho_max)``), a planted mask m* (each entry on
    with probability ½), and initial scores ``s ~ U(init)``. The same seed gives the same
    problems and starts for every estimator. Step t uses the learning rate
    ``lr / (1 + lr_decay · t)``; the default ``lr_decay = 0`` is a fixed step.

    Returns
    -------
    dict
        Per run: ``rho``, ``optimal`` (settled, at the optimum), ``steps`` (to
        absorption, -1 if never), ``capped`` (not settled at the cap); per variable (R, n):
        ``wrong`` (final mask differs from the optimum), ``dead`` (wrong and g'(s) = 0:
        frozen for good), ``flipping`` (mask still changing in the last `window` steps
        before the cap), ``wrong_start``; for the steps of that window a run was still
        moving, per variable: ``window_on`` (fraction of them with the mask on),
        ``window_grad`` (mean dL/dm, i.e. the gradient of the relaxed loss at the
        time-averaged mask, as dL/dm is linear in m) and ``window_drift`` (mean
        ``(dL/dm) g'(s)``, the average step of s divided by -lr), NaN where the run did
        not move in the window; the summary fractions ``optimal_fraction``,
        ``unsettled_fraction`` (of runs), ``wrong_fraction``, ``dead_fraction``,
        ``flipping_fraction`` (of variables); over the flipping variables, the means
        ``chatter_on``, ``chatter_grad`` (of |window_grad|) and ``chatter_drift`` (of
        |window_drift|), None without flipping variables; and ``verified`` (brute force
        agrees that m* is the optimum of every run).
    """
    _check_positive("runs", runs, integer=True)
    _check_positive("n", n, integer=True)
    _check_positive("lr", lr)
    _check_positive("max_steps", max_steps, integer=True)
    _check_positive("window", window, integer=True)
    if isinstance(lr_decay, bool) or not isinstance(lr_decay, (int, float)) or not (
            math.isfinite(lr_decay) and lr_decay >= 0):
        raise ValueError(f"lr_decay must be a finite number >= 0, got {lr_decay!r}")
    low, high = init
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"init must be a pair (low, high) of finite numbers with low < high, got {init!r}")
    if not 0 <= rho_max < 1:
        raise ValueError(f"rho_max must be in [0, 1), got {rho_max}")
    est = ste_registry.get(ste)
    _, rho, P, m_star, gen = _planted_problems(runs, n, seed, rho_max)
    s = gen.uniform(low, high, size=(runs, n))
    optimum = brute_force_optimum(P, m_star) if n <= 16 else m_star
    wrong_start = (s > 0) != (optimum > 0)
    steps = np.full(runs, -1)
    active = np.ones(runs, dtype=bool)
    window = min(window, max_steps)
    # Sums over the last `window` steps, per variable, of the runs still moving then.
    flips = np.zeros((runs, n), dtype=np.int64)
    on_sum, grad_sum, drift_sum = np.zeros((runs, n)), np.zeros((runs, n)), np.zeros((runs, n))
    moved = np.zeros(runs, dtype=np.int64)
    for t in range(max_steps + 1):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        sa = s[idx]
        grad = np.einsum("rij,rj->ri", P[idx], (sa > 0) - m_star[idx])
        g = _surrogate(est, sa)
        done = _settled(sa, grad, g).all(axis=1)
        steps[idx[done]] = t
        active[idx[done]] = False
        if t == max_steps:
            break
        move = idx[~done]
        new = sa[~done] - lr / (1 + lr_decay * t) * grad[~done] * g[~done]
        if t >= max_steps - window:
            flips[move] += (new > 0) != (s[move] > 0)
            on_sum[move] += sa[~done] > 0
            grad_sum[move] += grad[~done]
            drift_sum[move] += grad[~done] * g[~done]
            moved[move] += 1
        s[move] = new
    final_mask = (s > 0).astype(np.float64)
    wrong = final_mask != optimum
    dead = wrong & (_surrogate(est, s) == 0)
    flipping = flips > 0
    optimal = ~wrong.any(axis=1) & ~active
    with np.errstate(invalid="ignore", divide="ignore"):  # runs that did not move in the window: NaN
        window_on, window_grad, window_drift = (x / moved[:, None] for x in (on_sum, grad_sum, drift_sum))

    def over_flipping(x):
        return float(np.mean(x[flipping])) if flipping.any() else None

    return {
        "ste": est.name, "runs": runs, "n": n, "lr": lr, "lr_decay": lr_decay, "init": [float(low), float(high)],
        "verified": bool(np.array_equal(optimum, m_star)),
        "rho": rho, "optimal": optimal, "steps": steps, "capped": active, "wrong": wrong, "dead": dead,
        "flipping": flipping, "wrong_start": wrong_start, "final": s,
        "window_on": window_on, "window_grad": window_grad, "window_drift": window_drift,
        "optimal_fraction": float(optimal.mean()), "unsettled_fraction": float(active.mean()),
        "wrong_fraction": float(wrong.mean()), "dead_fraction": float(dead.mean()),
        "flipping_fraction": float(flipping.mean()),
        "chatter_on": over_flipping(window_on), "chatter_grad": over_flipping(np.abs(window_grad)),
        "chatter_drift": over_flipping(np.abs(window_drift)),
    }


class TwoSlope(ste_registry.STE):
    """g'(s) = `on` for s > 0, `off` otherwise: leaky_relu is (1, 0.1). Used by the diagnostic, not registered."""

    satisfies_principle = True

    def __init__(self, on: float, off: float):
        _check_positive("on", on)
        _check_positive("off", off)
        self.on, self.off = float(on), float(off)
        self.name = f"slopes {self.on:g}/{self.off:g}"

    def surrogate(self, s):
        return np.where(s > 0, self.on, self.off)

    def __repr__(self):
        return f"TwoSlope(on={self.on:g}, off={self.off:g})"


# (on, off) slopes of the diagnostic: symmetric ones (identity and a uniformly smaller slope),
# leaky_relu's (1, 0.1) between milder and stronger asymmetry, and leaky_relu mirrored.
SLOPE_PAIRS = ((1.0, 1.0), (0.1, 0.1), (1.0, 0.5), (1.0, 0.1), (1.0, 0.03), (0.1, 1.0))
# Decays of leaky_relu's step size, lr / (1 + decay · t): does a shrinking step settle its runs?
LR_DECAYS = (0.001, 0.01)
# leaky_relu once more with this many times the step cap: do its unsettled runs ever settle, and where?
LONG_CAP = 10


def chatter_diagnostic(runs: int, seed: int = 0, max_steps: int = 20_000, pairs=SLOPE_PAIRS,
                       decays=LR_DECAYS, long_cap: int = LONG_CAP) -> list[dict]:
    """Experiment 2 on the same problems with two-slope surrogates, and leaky_relu with decaying steps.

    A diagnostic, not part of the verdicts: it separates the two candidate causes of
    runs that are still flipping masks at the cap, the slopes' asymmetry around s = 0
    (vary ``off/on`` at fixed step) and the fixed step size (decay it for leaky_relu),
    and runs leaky_relu with `long_cap` times the cap to see whether its runs settle later.

    Returns
    -------
    list of dict
        One row per setting: ``on``, ``off``, ``lr_decay``, ``max_steps`` and the summary
        fractions and chatter means of `planted_mask`, plus ``median_steps`` of the
        settled runs.
    """
    _check_positive("long_cap", long_cap, integer=True)
    leaky = ste_registry.get("leaky_relu")
    settings = ([(TwoSlope(on, off), 0.0, max_steps) for on, off in pairs]
                + [(leaky, d, max_steps) for d in decays] + [(leaky, 0.0, long_cap * max_steps)])
    rows = []
    for est, decay, cap in settings:
        r = planted_mask(est, runs=runs, seed=seed, max_steps=cap, lr_decay=decay)
        settled = r["steps"][~r["capped"]]
        rows.append({
            "on": getattr(est, "on", 1.0), "off": getattr(est, "off", getattr(est, "alpha", None)), "lr_decay": decay,
            "max_steps": cap, "median_steps": float(np.median(settled)) if settled.size else None,
            **{k: r[k] for k in ("optimal_fraction", "unsettled_fraction", "dead_fraction", "flipping_fraction",
                                 "chatter_on", "chatter_grad", "chatter_drift")},
        })
    return rows
