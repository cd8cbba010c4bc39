"""Straight-through estimators: the exact unit step forward, a declared surrogate backward.

The mask of SCL is ``m = H(s)`` with ``H(s) = 1 if s > 0 else 0``. Its true derivative is
zero almost everywhere, so backward replaces ``dH/ds`` with a surrogate ``g'(s)``. Each
estimator declares that surrogate and whether it obeys SCL's convergence principle
(``g'(s) > 0`` for every s). Estimators live in a name -> class registry that users can
extend with `register`.
"""

from __future__ import annotations

import inspect

import numpy as np

from sclref.autograd import Function, Tensor

_REGISTRY: dict[str, type["STE"]] = {}


def register(name: str):
    """Class decorator adding an `STE` subclass to the registry under `name`."""

    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, STE)):
            raise TypeError(f"register({name!r}): {cls!r} is not an STE subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"an STE named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> list[str]:
    """Names of every registered estimator, in registration order."""
    return list(_REGISTRY)


def get(name, **options) -> "STE":
    """An estimator instance from its registered name (an `STE` instance passes through)."""
    if isinstance(name, STE):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown STE {name!r}; registered: {', '.join(available())}")
    return _REGISTRY[name](**options)


def from_spec(name: str, **options) -> "STE":
    """The estimator `name`, given every option a configuration holds; each reaches it only if it takes it.

    ``from_spec("leaky_relu", alpha=0.2)`` is ``LeakyReLU(alpha=0.2)``; ``from_spec("identity",
    alpha=0.2)`` is ``Identity()``: a run's settings can carry the options of every
    estimator without naming the one that uses them.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown STE {name!r}; registered: {', '.join(available())}")
    cls = _REGISTRY[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


class STE:
    """Base class: subclasses define `surrogate` and declare `satisfies_principle`."""

    name = "ste"
    satisfies_principle: bool = False
    # True when g'(s) = 1 everywhere: callers may then skip multiplying by it.
    unit_surrogate: bool = False

    def surrogate(self, s: np.ndarray) -> np.ndarray:
        """The proxy derivative g'(s) used in place of dH/ds, elementwise."""
        raise NotImplementedError

    def __call__(self, s: Tensor) -> Tensor:
        """The binary mask H(s) as a tensor whose backward uses this surrogate."""
        return Step.apply(s, ste=self)

    def __repr__(self):
        return f"{type(self).__name__}()"


@register("identity")
class Identity(STE):
    """g'(s) = 1: the estimator SCL adopts."""

    satisfies_principle = True
    unit_surrogate = True

    def surrogate(self, s):
        return np.ones_like(s)


@register("leaky_relu")
class LeakyReLU(STE):
    """g'(s) = 1 for s > 0, alpha otherwise (0 < alpha < 1)."""

    satisfies_principle = True

    def __init__(self, alpha: float = 0.1):
        if not 0 < alpha < 1:
            raise ValueError(f"leaky_relu STE: alpha must be in (0, 1), got {alpha}")
        self.alpha = float(alpha)

    def surrogate(self, s):
        return np.where(s > 0, s.dtype.type(1), s.dtype.type(self.alpha))

    def __repr__(self):
        return f"LeakyReLU(alpha={self.alpha})"


@register("softplus")
class Softplus(STE):
    """g'(s) = sigmoid(s), the derivative of softplus(s) = log(1 + e^s)."""

    satisfies_principle = True

    def surrogate(self, s):
        e = np.exp(-np.abs(s))
        return np.where(s >= 0, 1 / (1 + e), e / (1 + e))


@register("relu")
class ReLU(STE):
    """g'(s) = 1 for s > 0, 0 otherwise: a negative control (a mask that goes off stays off)."""

    satisfies_principle = False

    def surrogate(self, s):
        return (s > 0).astype(s.dtype)


@register("clipped")
class Clipped(STE):
    """g'(s) = 1 for |s| <= 1, 0 otherwise (hardtanh): a negative control, frozen for |s| > 1."""

    satisfies_principle = False

    def surrogate(self, s):
        return (np.abs(s) <= 1).astype(s.dtype)


class Step(Function):
    """H(s) = [s > 0] forward; upstream * ste.surrogate(s) backward"""

    def forward(self, s, ste):
        self.s, self.ste = s, ste
        return (s > 0).astype(s.dtype)

    def backward(self, g):
        return (g * self.ste.surrogate(self.s),)


def step(s: Tensor, ste="identity") -> Tensor:
    """The binary mask H(s) = [s > 0], differentiated through estimator `ste` (name or instance)."""
    if not isinstance(s, Tensor):
        raise TypeError(f"step: expected a Tensor, got {type(s).__name__}")
    return Step.apply(s, ste=get(ste))
