"""The settings of one SCL step: estimator, λ, normalization, order, weighting, and the optimizers of θ and s.

`StepSettings` is what `sclref.oracle.reference_step` runs under and what ``sclref
verify`` reads from a JSON file (`StepSettings.to_dict` / `from_dict`); every value is
checked when the settings are made, and a bad one is an `sclref.errors.InputError`
naming it. `StepSettings.from_trainer` reads them off a `sclref.train.Trainer`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sclref import optim
from sclref import ste as ste_registry
from sclref.errors import InputError
from sclref.scl import NORMALIZATIONS, WEIGHTINGS, SCLObjective, masked_layers

__all__ = ["AdamSettings", "SGDSettings", "StepSettings"]


def _number(owner: str, name: str, value, low: float = 0.0, high: float = math.inf, open_low=False,
            open_high=False) -> float:
    """`value` as a finite float in the given range; InputError naming `owner.name` otherwise."""
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond any float
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{owner}: {name} must be a finite number, got {value!r:.40}")
    value = number
    if value < low or value > high or (open_low and value == low) or (open_high and value == high):
        lo, hi = ("(" if open_low else "[") + f"{low:g}", f"{high:g}" + (")" if open_high else "]")
        raise InputError(f"{owner}: {name} must be in {lo}, {hi}, got {value!r}")
    return value


@dataclass(frozen=True)
class SGDSettings:
    """SGD as `sclref.optim.SGD` (and ``torch.optim.SGD``): lr, momentum, L2 weight decay."""

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    name = "sgd"

    def __post_init__(self):
        for f, kw in (("lr", {}), ("momentum", {"high": 1.0, "open_high": True}), ("weight_decay", {})):
            object.__setattr__(self, f, _number("sgd", f, getattr(self, f), **kw))

    def build(self, params) -> optim.Optimizer:
        return optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        return {"name": "sgd", "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class AdamSettings:
    """Adam as `sclref.optim.Adam` (and ``torch.optim.Adam``, no AMSGrad): lr, betas, eps, L2 weight decay."""

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name = "adam"

    def __post_init__(self):
        object.__setattr__(self, "lr", _number("adam", "lr", self.lr))
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise InputError(f"adam: betas must be a pair (beta1, beta2), got {betas!r}")
        object.__setattr__(self, "betas", tuple(_number("adam", f"betas[{i}]", b, high=1.0, open_high=True)
                                                for i, b in enumerate(betas)))
        object.__setattr__(self, "eps", _number("adam", "eps", self.eps, open_low=True))
        object.__setattr__(self, "weight_decay", _number("adam", "weight_decay", self.weight_decay))

    def build(self, params) -> optim.Optimizer:
        return optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        return {"name": "adam", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}


_OPTIMIZERS = {"sgd": SGDSettings, "adam": AdamSettings}


def _optimizer_from(value, what: str):
    if isinstance(value, (SGDSettings, AdamSettings)):
        return value
    if not isinstance(value, Mapping):
        raise InputError(f"{what}: expected {{'name': 'sgd' or 'adam', ...}}, got {value!r}")
    name = value.get("name", "sgd")
    if not isinstance(name, str) or name not in _OPTIMIZERS:
        raise InputError(f"{what}: unknown optimizer {name!r}; choose from sgd, adam")
    cls = _OPTIMIZERS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known - {"name"}, key=str)
    if unknown:
        raise InputError(f"{what}: unknown {name} settings {unknown}; known: {sorted(known)}")
    return cls(**{k: v for k, v in value.items() if k != "name"})


@dataclass(frozen=True)
class StepSettings:
    """Every choice of one SCL step (defaults: those of ``sclref train``).

    Parameters
    ----------
    ste : str
        Registered straight-through estimator (`sclref.ste.available`).
    ste_options : dict
        Keyword options of the estimator (``{"alpha": 0.1}`` for leaky_relu).
    lam : float
        λ >= 0 of the connection-count regularizer.
    normalization : {"l2", "max", "none"}
        Per-feature (per output unit) normalization of the s gradient.
    normalize : {"task", "total"}
        Normalize the task gradient and then add the regularizer's ("task"), or
        normalize their sum ("total").
    weighting : {"count", "flops"}
        Regularize connections, or their multiply-adds (`sclref.scl.connection_weights`).
    eps : float
        Added to each feature's norm.
    theta_optimizer, score_optimizer : SGDSettings or AdamSettings
        Optimizers of the weights θ (with biases and batch-norm parameters) and of the
        mask variables s; a dict ``{"name": "sgd" | "adam", ...}`` is accepted too.

    Raises
    ------
    InputError
        Naming the first setting that is not valid.
    """

    ste: str = "identity"
    ste_options: dict = field(default_factory=dict)
    lam: float = 0.03
    normalization: str = "l2"
    normalize: str = "task"
    weighting: str = "count"
    eps: float = 1e-12
    theta_optimizer: object = field(default_factory=lambda: SGDSettings(lr=0.05, momentum=0.9))
    score_optimizer: object = field(default_factory=lambda: SGDSettings(lr=0.5))

    def __post_init__(self):
        if not isinstance(self.ste, str) or self.ste not in ste_registry.available():
            raise InputError(f"unknown STE {self.ste!r}; registered: {', '.join(ste_registry.available())}")
        if not isinstance(self.ste_options, Mapping) or not all(isinstance(k, str) for k in self.ste_options):
            raise InputError(f"ste_options must be a mapping of option names to values, got {self.ste_options!r}")
        object.__setattr__(self, "ste_options", dict(self.ste_options))
        self.estimator()  # validates the options
        object.__setattr__(self, "lam", _number("settings", "lam", self.lam))
        object.__setattr__(self, "eps", _number("settings", "eps", self.eps))
        for name, allowed in (("normalization", NORMALIZATIONS), ("normalize", ("task", "total")),
                              ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("theta_optimizer", "score_optimizer"):
            object.__setattr__(self, name, _optimizer_from(getattr(self, name), name))

    def estimator(self) -> ste_registry.STE:
        """The configured estimator instance."""
        try:
            return ste_registry.get(self.ste, **self.ste_options)
        except (TypeError, ValueError) as err:
            raise InputError(f"STE {self.ste!r} with options {self.ste_options}: {err}") from None

    def objective(self) -> SCLObjective:
        return SCLObjective(self.lam, self.normalization, self.weighting, self.normalize, self.eps)

    def replace(self, **changes) -> "StepSettings":
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON values; `from_dict` reads them back."""
        return {"ste": self.ste, "ste_options": dict(self.ste_options), "lam": self.lam,
                "normalization": self.normalization, "normalize": self.normalize, "weighting": self.weighting,
                "eps": self.eps, "theta_optimizer": self.theta_optimizer.to_dict(),
                "score_optimizer": self.score_optimizer.to_dict()}

    @classmethod
    def from_dict(cls, values) -> "StepSettings":
        """Settings from a mapping such as a ``settings.json``; unknown keys are an InputError."""
        if not isinstance(values, Mapping):
            raise InputError(f"step settings must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise InputError(f"unknown step settings {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as err:  # a wrongly typed value deep inside, e.g. betas of strings
            raise InputError(f"step settings: {err}") from None

    @classmethod
    def from_trainer(cls, trainer) -> "StepSettings":
        """The settings of one mask-learning step of a `sclref.train.Trainer`, read from its objects.

        λ is the objective's (the λ of one step), the estimator that of the masked
        layers, the optimizers' hyperparameters those of their first parameter group.
        """
        layers = masked_layers(trainer.model)
        if not layers:
            raise InputError("the trainer's model has no masked layer")
        estimator = layers[0][1].ste
        obj = trainer.objective
        return cls(ste=estimator.name, ste_options=dict(vars(estimator)), lam=obj.lam,
                   normalization=obj.normalization, normalize=obj.normalize, weighting=obj.weighting, eps=obj.eps,
                   theta_optimizer=_optimizer_of(trainer.opt_w), score_optimizer=_optimizer_of(trainer.opt_s))


def _optimizer_of(opt) -> SGDSettings | AdamSettings:
    """The settings of a `sclref.optim` SGD (plain or with momentum) or Adam, from its first group."""
    group = opt.param_groups[0]
    if isinstance(opt, optim.SGD) and not group["nesterov"] and group["dampening"] == 0:
        return SGDSettings(group["lr"], group["momentum"], group["weight_decay"])
    if isinstance(opt, optim.Adam):
        return AdamSettings(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    raise InputError(f"the oracle steps with SGD (no dampening, no Nesterov) or Adam, not {opt!r}")
