"""Hypothesis strategies for property tests of an SCL implementation against `sclref.oracle`.

Layer geometries that fit, weights, mask variables kept off the step's kink at 0,
registered straight-through estimators with options, batches for a model's input shape,
SCL step settings, whole model states in a framework's layout, and (state, batch,
settings) cases for `sclref.oracle.reference_step`. This module needs hypothesis, which
sclref itself does not depend on: install it where the tests run (``pip install
hypothesis``). Large arrays are drawn from a NumPy generator seeded by hypothesis, so
they are cheap and a failing example still replays exactly.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy
except ImportError as err:  # the one module of sclref that needs hypothesis says so
    raise ImportError("sclref.testing.strategies needs hypothesis (pip install hypothesis)") from err

from sclref import nn
from sclref import ste as ste_registry
from sclref.oracle.settings import AdamSettings, SGDSettings, StepSettings
from sclref.oracle.state import StateLayout
from sclref.oracle.step import build_model
from sclref.scl import NORMALIZATIONS, WEIGHTINGS

__all__ = ["ConvGeometry", "DenseGeometry", "OracleCase", "batches", "conv_geometries", "dense_geometries",
           "model_states", "optimizer_settings", "oracle_cases", "scores", "seeds", "ste_names", "step_settings",
           "weights"]


def seeds() -> SearchStrategy:
    """Seeds of the NumPy generators that draw large arrays."""
    return st.integers(0, 2**32 - 1)


def _strategy(value) -> SearchStrategy:
    """A strategy as is; any other value as the strategy that always gives it."""
    return value if isinstance(value, SearchStrategy) else st.just(value)


# -- layer geometries ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseGeometry:
    """A dense layer: weight [out_features, in_features] (sclref and PyTorch)."""

    in_features: int
    out_features: int

    @property
    def weight_shape(self) -> tuple:
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class ConvGeometry:
    """A conv layer and an input it fits: weight [out, in, kh, kw], input (in, h, w), at least one output pixel."""

    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    padding: tuple
    in_size: tuple

    @property
    def weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def out_size(self) -> tuple:
        """(OH, OW) of the convolution."""
        return tuple((n + 2 * p - k) // s + 1
                     for n, p, k, s in zip(self.in_size, self.padding, self.kernel_size, self.stride))


def dense_geometries(max_in: int = 64, max_out: int = 32) -> SearchStrategy:
    """`DenseGeometry` with 1 <= in_features <= max_in and 1 <= out_features <= max_out."""
    return st.builds(DenseGeometry, st.integers(1, max_in), st.integers(1, max_out))


@st.composite
def conv_geometries(draw, max_channels: int = 4, max_kernel: int = 5, max_stride: int = 3, max_padding: int = 2,
                    max_size: int = 16) -> ConvGeometry:
    """`ConvGeometry` whose kernel fits the padded input (at least one output pixel on each axis)."""
    c, f = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    padding = tuple(draw(st.integers(0, min(max_padding, k - 1))) for k in kernel)  # PyTorch: padding < kernel
    size = tuple(draw(st.integers(max(1, k - 2 * p), max(max_size, k))) for k, p in zip(kernel, padding))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    return ConvGeometry(c, f, kernel, stride, padding, size)


# -- arrays -------------------------------------------------------------------------------------
@st.composite
def weights(draw, shape, bound: float | None = None, dtype=np.float64) -> np.ndarray:
    """Uniform in [-bound, bound); by default bound = 1/sqrt(fan_in) (PyTorch's Linear and Conv2d init)."""
    shape = tuple(shape)
    if bound is None:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else max(shape[0] if shape else 1, 1)
        bound = 1.0 / math.sqrt(max(fan_in, 1))
    gen = np.random.default_rng(draw(seeds()))
    return gen.uniform(-bound, bound, size=shape).astype(dtype)


@st.composite
def scores(draw, shape, margin: float = 0.05, high: float = 2.0, negative=(0.2, 0.5), dtype=np.float64) -> np.ndarray:
    """Mask variables s with margin <= |s| <= high: none at the kink of H(s) = [s > 0].

    Parameters
    ----------
    shape : tuple of int
        Their shape.
    margin : float
        Smallest |s|. Keeps every s away from 0, where a float32 and a float64 step
        could disagree on the mask, and where no estimator is defined.
    high : float
        Largest |s|.
    negative : float or (float, float)
        Fraction of negative entries (pruned connections), or a range it is drawn from.
        Some must be negative for a step to tell estimators apart: for s > 0 ReLU's
        surrogate equals the identity's.
    dtype : numpy dtype
        Their dtype.
    """
    if not 0 < margin < high:
        raise ValueError(f"scores: need 0 < margin < high, got margin={margin}, high={high}")
    frac = draw(st.floats(*negative)) if isinstance(negative, tuple) else float(negative)
    gen = np.random.default_rng(draw(seeds()))
    magnitude = gen.uniform(margin, high, size=shape)
    sign = np.where(gen.random(shape) < frac, -1.0, 1.0)
    s = (sign * magnitude).astype(dtype)
    # Rounding to float32 can only move |s| by a relative 6e-8: the margin still holds.
    return s


@st.composite
def batches(draw, in_shape, num_classes: int = 10, batch_size=(1, 8), dtype=np.float64, layout: str = "torch"):
    """(x, y): x of shape (N, *in_shape) standard normal (NHWC for ``layout="flax"``), y in [0, num_classes)."""
    n = draw(st.integers(*batch_size)) if isinstance(batch_size, tuple) else int(batch_size)
    gen = np.random.default_rng(draw(seeds()))
    x = gen.standard_normal((n, *in_shape)).astype(dtype)
    if layout == "flax" and x.ndim == 4:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x, gen.integers(0, num_classes, size=n).astype(np.int64)


# -- estimators and settings --------------------------------------------------------------------
def _option_strategies(cls) -> dict:
    """Strategies of an estimator's keyword options: a float in (0, 1) for each float option."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: st.floats(0.01, 0.99) for name, p in params.items()
            if name != "self" and isinstance(p.default, float)}


def ste_names(principle: bool | None = True) -> SearchStrategy:
    """(name, options) of registered estimators.

    Parameters
    ----------
    principle : bool or None
        True (default): only estimators satisfying SCL's convergence principle (g' > 0
        everywhere); False: only those violating it; None: all. Estimators that cannot
        be built without options are left out.
    """
    classes = {}
    for name in ste_registry.available():
        try:
            classes[name] = type(ste_registry.get(name))
        except (TypeError, ValueError):
            continue
    names = [n for n, cls in classes.items() if principle is None or bool(cls.satisfies_principle) == principle]
    if not names:
        raise ValueError(f"no registered estimator with satisfies_principle={principle}")

    @st.composite
    def draw_one(draw):
        name = draw(st.sampled_from(names))
        options = {k: draw(v) for k, v in _option_strategies(classes[name]).items()}
        try:
            ste_registry.get(name, **options)
        except (TypeError, ValueError):  # options outside the estimator's domain: its defaults
            options = {}
        return name, options

    return draw_one()


def optimizer_settings(kinds=("sgd", "adam"), lr=(1e-3, 0.2), momentum=(0.0, 0.95), weight_decay=(0.0, 1e-2)):
    """`SGDSettings` or `AdamSettings` with hyperparameters drawn from the given ranges (a number fixes one)."""

    def num(v):
        return st.floats(*v) if isinstance(v, tuple) else st.just(float(v))

    options = []
    if "sgd" in kinds:
        options.append(st.builds(SGDSettings, num(lr), num(momentum), num(weight_decay)))
    if "adam" in kinds:
        options.append(st.builds(AdamSettings, num(lr), st.tuples(st.floats(0.5, 0.95), st.floats(0.9, 0.9999)),
                                 st.sampled_from([1e-8, 1e-6]), num(weight_decay)))
    if not options:
        raise ValueError(f"optimizer_settings: kinds must name sgd and/or adam, got {kinds!r}")
    return st.one_of(options)


@st.composite
def step_settings(draw, ste=None, lam=(0.0, 0.1), normalization=None, normalize=None, weighting=None,
                  theta_optimizer=None, score_optimizer=None, eps=1e-12) -> StepSettings:
    """`StepSettings` with every choice drawn, or fixed where a value is given.

    Each argument takes a value (fixed), a strategy (drawn from), or None (every valid
    choice). `ste` is a name, a (name, options) pair, or a strategy of pairs such as
    `ste_names`; `lam` a number or a (low, high) range.
    """
    if ste is None:
        ste = ste_names()
    name, options = draw(ste) if isinstance(ste, SearchStrategy) else (ste if isinstance(ste, tuple) else (ste, {}))
    lam_value = draw(st.floats(*lam)) if isinstance(lam, tuple) else draw(_strategy(lam))
    pick = {"normalization": (normalization, NORMALIZATIONS), "normalize": (normalize, ("task", "total")),
            "weighting": (weighting, WEIGHTINGS)}
    chosen = {k: draw(st.sampled_from(choices) if v is None else _strategy(v)) for k, (v, choices) in pick.items()}
    theta = draw(optimizer_settings() if theta_optimizer is None else _strategy(theta_optimizer))
    score = draw(optimizer_settings(lr=(0.01, 1.0)) if score_optimizer is None else _strategy(score_optimizer))
    return StepSettings(ste=name, ste_options=options, lam=float(lam_value), eps=eps, theta_optimizer=theta,
                        score_optimizer=score, **chosen)


# -- whole models -------------------------------------------------------------------------------
@st.composite
def model_states(draw, model, in_shape=None, num_classes: int = 10, layout: str = "torch", names=None,
                 margin: float = 0.05, negative=(0.2, 0.5), dtype=np.float64) -> dict:
    """A full state of `model` (a `MODELS` name or a masked Module) in `layout`'s names and array layouts.

    Weights follow `weights`, biases are uniform in ±0.1, scores follow `scores` (|s| >=
    `margin`), batch-norm scales are in [0.5, 1.5), shifts in ±0.1, running means in ±0.1
    and variances in [0.5, 2). `in_shape` (C, H, W) is needed for a model given by name.
    """
    module = build_model(model, in_shape, num_classes)
    layout_ = StateLayout(module, layout, names, in_shape=in_shape)
    modules = dict(module.named_modules())
    state = {}
    for name, slot in layout_.slots.items():
        owner, _, attr = name.rpartition(".")
        mod = modules[owner]
        if slot.kind == "counter":
            state[name] = np.zeros(slot.shape, dtype=np.int64)
        elif attr == "score":
            state[name] = draw(scores(slot.shape, margin=margin, negative=negative, dtype=dtype))
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            gen = np.random.default_rng(draw(seeds()))
            low, high = {"weight": (0.5, 1.5), "running_var": (0.5, 2.0)}.get(attr, (-0.1, 0.1))
            state[name] = gen.uniform(low, high, size=slot.shape).astype(dtype)
        elif attr == "bias" or slot.kind == "vector":
            state[name] = draw(weights(slot.shape, bound=0.1, dtype=dtype))
        else:
            state[name] = draw(weights(slot.shape, dtype=dtype))
    return dict(layout_.from_sclref(state))


class OracleCase(NamedTuple):
    """(state, batch, settings) of one `reference_step` call; its repr names shapes, not values."""

    state: dict
    batch: tuple
    settings: StepSettings

    def __repr__(self):
        x, y = self.batch
        return (f"OracleCase(state={{{len(self.state)} arrays}}, batch=(x {np.shape(x)}, y {np.shape(y)}), "
                f"settings={self.settings!r})")


@st.composite
def oracle_cases(draw, model="lenet300", in_shape=(1, 8, 8), num_classes: int = 10, batch_size=(1, 8),
                 settings=None, layout: str = "torch", names=None, margin: float = 0.05, negative=(0.2, 0.5),
                 dtype=np.float64):
    """`OracleCase` (state, batch, settings) for ``reference_step(model, state, batch, settings, layout=layout)``.

    `settings` is a `StepSettings`, a strategy of them (default `step_settings()`), or None.
    """
    state = draw(model_states(model, in_shape, num_classes, layout, names, margin, negative, dtype))
    batch = draw(batches(in_shape, num_classes, batch_size, dtype, layout))
    chosen = draw(step_settings() if settings is None else _strategy(settings))
    return OracleCase(state, batch, chosen)
