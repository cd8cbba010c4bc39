"""The reference SCL step: sclref's training step on a given state and batch, every intermediate kept in float64.

`reference_step` builds the model in float64, loads the user's state (any layout of
`sclref.oracle.state`) and runs the step exactly as `sclref.train.Trainer.step` does:
forward, mean cross-entropy, backward, `SCLObjective.apply` on the mask gradients, the
mask optimizer's step, then the weight optimizer's step, with BLAS pinned to one thread
(`sclref.threads.pinned`). Along the way it keeps what a researcher checks a step
against: logits, loss, the task gradients of θ and s, the normalized s gradient, the
regularizer's value and gradient, the total s gradient, the updated θ and s, the masks
before and after and which flipped.

The same code runs *variants* of the step (another estimator, normalization axis,
order, regularizer sign, ...) for `sclref.oracle.compare` to explain a disagreement.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sclref import models, nn, ops, threads
from sclref import ste as ste_registry
from sclref.autograd import Tensor
from sclref.data.datasets import MAX_CLASSES
from sclref.errors import InputError, check_allocation
from sclref.oracle.settings import StepSettings
from sclref.oracle.state import StateLayout, as_array, flatten_names
from sclref.scl import SCLObjective, connection_weights, masked_layers, normalize_per_feature

__all__ = ["STAGES", "StepRecord", "StepResult", "VariantRule", "build_model", "reference_step", "simulate"]


# -- one step -----------------------------------------------------------------------------------
STAGES = ("logits", "loss", "penalty", "grad_theta", "grad_s", "s_normalized", "reg_grad", "s_total", "theta",
          "buffers", "s", "mask")
STAGE_TITLES = {
    "logits": "logits", "loss": "loss (mean cross-entropy)", "penalty": "regularizer value λ·Σ w·H(s)",
    "grad_theta": "task gradient of θ", "grad_s": "task gradient of s",
    "s_normalized": "s gradient after normalization", "reg_grad": "regularizer gradient λ·w·g'(s)",
    "s_total": "total s gradient", "theta": "updated θ", "buffers": "updated buffers (batch-norm statistics)",
    "s": "updated s", "mask": "masks after the step",
}


@dataclass
class StepRecord:
    """Everything one step computed, in float64, keyed by sclref's dotted names.

    Score-shaped stages (``grad_s``, ``s_normalized``, ``reg_grad``, ``s_total``, ``s``,
    ``mask_before``, ``mask_after``, ``flipped``) are keyed by the score's name
    (``fc1.score``). Under ``normalize="total"``, ``s_normalized`` is the normalized sum,
    the same as ``s_total``.
    """

    loss: float
    logits: np.ndarray
    penalty: float
    grad_theta: dict
    grad_s: dict
    s_normalized: dict
    reg_grad: dict
    s_total: dict
    theta: dict
    buffers: dict
    s: dict
    mask_before: dict
    mask_after: dict
    flipped: dict

    def stage(self, name: str):
        """The value of stage `name` (one of `STAGES`): a float, an array, or a dict name -> array."""
        if name not in STAGES:
            raise InputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        return self.mask_after if name == "mask" else getattr(self, name)


class _ReferenceRule:
    """The s-gradient rule of `SCLObjective.apply`, run as is (so the bits are sclref's)."""

    def __init__(self, objective: SCLObjective):
        self.objective = objective

    def regularizer(self, layer, weight: float) -> np.ndarray:
        s = layer.score.data
        if not self.objective.lam:
            return np.zeros_like(s)
        if layer.ste.unit_surrogate:
            return np.full_like(s, s.dtype.type(self.objective.lam * weight))
        return layer.ste.surrogate(s) * s.dtype.type(self.objective.lam * weight)

    def normalized(self, task: np.ndarray, reg: np.ndarray) -> np.ndarray:
        obj = self.objective
        source = task if obj.normalize == "task" else task + reg
        return normalize_per_feature(source, obj.normalization, obj.eps).copy()

    def apply(self, model) -> None:
        self.objective.apply(model)


class VariantRule(_ReferenceRule):
    """The s-gradient rule with one deliberate deviation, to recognise a mistake in someone's step.

    Parameters
    ----------
    objective : SCLObjective
        The rule deviated from.
    axis : {"output", "input", "layer"}
        Normalize per output unit (sclref), per input unit (the feature axis
        transposed), or over the whole layer.
    reg_sign : {1, -1}
        -1 subtracts the regularizer's gradient.
    reg_surrogate : bool
        False adds λ·w without the estimator's g'(s).
    """

    def __init__(self, objective: SCLObjective, axis: str = "output", reg_sign: int = 1, reg_surrogate: bool = True):
        super().__init__(objective)
        self.axis, self.reg_sign, self.reg_surrogate = axis, reg_sign, reg_surrogate

    def regularizer(self, layer, weight):
        s = layer.score.data
        if self.reg_surrogate:
            reg = super().regularizer(layer, weight)
        else:
            reg = np.full_like(s, self.objective.lam * weight)
        return self.reg_sign * reg

    def _normalize(self, g: np.ndarray) -> np.ndarray:
        mode, eps = self.objective.normalization, self.objective.eps
        if self.axis == "input" and g.ndim >= 2:
            return np.moveaxis(normalize_per_feature(np.moveaxis(g, 1, 0).copy(), mode, eps), 0, 1).copy()
        if self.axis == "layer":
            return normalize_per_feature(g.reshape(1, -1), mode, eps).reshape(g.shape)
        return normalize_per_feature(g, mode, eps).copy()

    def normalized(self, task, reg):
        return self._normalize(task if self.objective.normalize == "task" else task + reg)

    def apply(self, model):
        layers = [layer for _, layer in masked_layers(model) if not layer.frozen]
        for layer, w in zip(layers, connection_weights(layers, self.objective.weighting)):
            s = layer.score
            task = np.zeros_like(s.data) if s.grad is None else s.grad
            reg = self.regularizer(layer, w)
            g = self.normalized(task, reg)
            s.grad = g + reg if self.objective.normalize == "task" else g


def _param_groups(model):
    """θ (every parameter but the scores) and s, in the order `sclref.train.Trainer` makes them."""
    scores = [layer.score for _, layer in masked_layers(model)]
    ids = {id(s) for s in scores}
    return [p for p in model.parameters() if id(p) not in ids], scores


def simulate(model, batches, settings: StepSettings, rule=None) -> list[StepRecord]:
    """Run one SCL step per batch on `model` (changed in place) and record every stage of each.

    Parameters
    ----------
    model : sclref.nn.Module
        A masked model holding the starting state.
    batches : list of (x, y)
        One batch per step, in sclref's layout.
    settings : StepSettings
        The step's settings.
    rule : optional
        A `VariantRule` in place of `SCLObjective.apply` (None: sclref's own step).
    """
    weights, scores = _param_groups(model)
    if not scores:
        raise InputError("the model has no masked layer: an SCL step needs mask variables")
    opt_w = settings.theta_optimizer.build(weights)
    opt_s = settings.score_optimizer.build(scores)
    objective = settings.objective()
    rule = _ReferenceRule(objective) if rule is None else rule
    named_layers = masked_layers(model)
    score_names = [f"{name}.score" if name else "score" for name, _ in named_layers]
    theta_names = [n for n, p in model.named_parameters() if id(p) not in {id(s) for s in scores}]
    records = []
    with threads.pinned():
        for i, (x, y) in enumerate(batches):
            s_before = {n: layer.score.data.copy() for n, (_, layer) in zip(score_names, named_layers)}
            # Trainer.step's order: zero both, forward, loss, backward, rewrite the s
            # gradients, the mask optimizer's step, the weight optimizer's step.
            opt_w.zero_grad()
            opt_s.zero_grad()
            logits = model(Tensor(x))
            if not np.all(np.isfinite(logits.data)):
                raise InputError(f"step {i}: the logits are NaN or infinite for this state and batch")
            loss = ops.cross_entropy(logits, y)
            loss.backward()
            params = dict(model.named_parameters())
            grad_theta = {n: np.zeros_like(params[n].data) if params[n].grad is None else params[n].grad.copy()
                          for n in theta_names}
            grad_s = {n: np.zeros_like(layer.score.data) if layer.score.grad is None else layer.score.grad.copy()
                      for n, (_, layer) in zip(score_names, named_layers)}
            penalty = objective.penalty(model)
            layers = [layer for _, layer in named_layers]
            reg_grad, s_normalized = {}, {}
            for n, layer, w in zip(score_names, layers, connection_weights(layers, objective.weighting)):
                reg_grad[n] = rule.regularizer(layer, w)
                s_normalized[n] = rule.normalized(grad_s[n], reg_grad[n])
            rule.apply(model)
            s_total = {n: layer.score.grad.copy() for n, layer in zip(score_names, layers)}
            opt_s.step()
            opt_w.step()
            s_after = {n: layer.score.data.copy() for n, layer in zip(score_names, layers)}
            records.append(StepRecord(
                loss=float(loss.item()), logits=logits.data.copy(), penalty=float(penalty),
                grad_theta=grad_theta, grad_s=grad_s, s_normalized=s_normalized, reg_grad=reg_grad,
                s_total=s_total, theta={n: params[n].data.copy() for n in theta_names},
                buffers={n: b.copy() for n, b in model.named_buffers()}, s=s_after,
                mask_before={n: v > 0 for n, v in s_before.items()},
                mask_after={n: v > 0 for n, v in s_after.items()},
                flipped={n: (s_before[n] > 0) != (s_after[n] > 0) for n in s_after}))
    return records


# -- inputs -------------------------------------------------------------------------------------
def _labels(y, what: str, n: int, num_classes: int) -> np.ndarray:
    y = as_array(y, what)
    if y.ndim != 1 or len(y) != n:
        raise InputError(f"{what}: labels must have shape ({n},) for {n} samples, got {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InputError(f"{what}: labels must be whole numbers")
    elif y.dtype.kind not in "iu":
        raise InputError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"{what}: labels must be in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _images(x, what: str, layout: str) -> np.ndarray:
    x = as_array(x, what)
    if x.dtype.kind not in "iuf" or x.ndim < 2 or x.shape[0] < 1 or math.prod(x.shape[1:]) < 1:
        raise InputError(f"{what}: inputs must be a numeric array (N, ...) with N >= 1, got {x.dtype} {x.shape}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise InputError(f"{what}: inputs hold NaN or infinite values")
    x = x.astype(np.float64)
    if layout == "flax" and x.ndim == 4:  # Flax images are NHWC
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _batches(batch, steps: int, layout: str) -> list[tuple[np.ndarray, object]]:
    """`batch` as `steps` (x, y) pairs: one pair reused every step, or one pair per step."""
    def is_pair(b):
        return isinstance(b, (tuple, list)) and len(b) == 2 and not isinstance(b[0], (tuple, list))

    if is_pair(batch):
        pairs = [tuple(batch)] * steps
    elif isinstance(batch, (tuple, list)) and all(is_pair(b) for b in batch):
        if len(batch) != steps:
            raise InputError(f"batch: {len(batch)} batches given for {steps} steps")
        pairs = [tuple(b) for b in batch]
    else:
        raise InputError("batch must be a pair (x, y) or a list of one (x, y) pair per step")
    out = []
    for i, (x, y) in enumerate(pairs):
        out.append((_images(x, f"batch {i} x", layout), y))
    shapes = {x.shape[1:] for x, _ in out}
    if len(shapes) > 1:
        raise InputError(f"batch: inputs of different sample shapes {sorted(shapes)}")
    return out


def build_model(model, in_shape, num_classes: int = 10, ste="identity") -> nn.Module:
    """A fresh float64 masked model: from the `MODELS` registry by name, or a copy of a given module.

    Parameters
    ----------
    model : str or sclref.nn.Module
        A name of `sclref.models.MODELS`, or a module (deep-copied and made float64).
    in_shape : tuple of int
        Per-sample input shape in sclref's layout: (C, H, W), or (features,).
    num_classes : int
        Outputs of a model built by name.
    ste : str or STE
        The estimator every masked layer gets (masks are left unfrozen).

    Raises
    ------
    InputError
        For an unknown model, or an input shape the model does not take.
    sclref.errors.LimitError
        When a model built by name for `in_shape` would be too large to hold.
    """
    estimator = ste_registry.get(ste)
    if isinstance(model, nn.Module):
        built = copy.deepcopy(model).double()
    elif isinstance(model, str) and model in models.MODELS:
        # A rough bound before building: each input feature feeds up to ~512 units, and the
        # oracle keeps about eight float64 copies of every weight (θ, s, gradients, updates).
        check_allocation((max(1, math.prod(in_shape)), 512), 8 * 8, f"model {model!r} for inputs of shape {in_shape}")
        builder = models.MODELS[model]
        accepted = inspect.signature(builder).parameters
        kwargs = {"masked": True, "ste": estimator, "dtype": np.float64, "num_classes": num_classes,
                  "generator": np.random.default_rng(0), "in_shape": tuple(in_shape),
                  "in_features": int(np.prod(in_shape))}
        try:
            built = builder(**{k: v for k, v in kwargs.items() if k in accepted})
        except (ValueError, TypeError) as err:
            raise InputError(f"model {model!r} for inputs of shape {tuple(in_shape)}: {err}") from None
    else:
        raise InputError(f"unknown model {model!r}; choose from {', '.join(sorted(models.MODELS))} "
                         "or pass an sclref Module")
    for _, layer in masked_layers(built):
        layer.ste = estimator
        layer.freeze_mask(False)
    built.train()
    return built


def _num_classes(model, in_shape, estimator, state, layout, names) -> int:
    """The class count the state's last dense layer gives (10 when the state does not tell)."""
    template = build_model(model, in_shape, 10, estimator)
    lay = StateLayout(template, layout, names, in_shape=in_shape)
    dense = [s for s in lay.slots.values() if s.kind == "dense" and s.name.endswith(".weight")]
    if not dense or not isinstance(state, Mapping):
        return 10
    last = dense[-1]
    fan_in = last.shape[1]
    for their, value in flatten_names(state).items():
        if lay.resolve(their) == last.name:
            shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
            # Only a shape that fits the layer's inputs tells the outputs; any other is
            # left for load_state to report against the default.
            if len(shape) == 2 and shape[1 if layout != "flax" else 0] == fan_in:
                outputs = int(shape[0 if layout != "flax" else 1])
                if not 1 <= outputs <= MAX_CLASSES:
                    raise InputError(f"the state's last dense layer {their!r} has {outputs} outputs; "
                                     f"sclref takes 1 to {MAX_CLASSES} classes")
                return outputs
    return 10


@dataclass
class StepResult:
    """What `reference_step` computed: one `StepRecord` per step, and how to reach the user's conventions.

    Attributes
    ----------
    steps : list of StepRecord
        Step by step, sclref names and layouts, float64.
    settings : StepSettings
        The settings used.
    layout : str
        The layout the state and batch were given in (used by `stage` and `to_flat`).
    state_layout : StateLayout
        The naming of the user's state (their names <-> sclref's).
    initial : dict
        The starting state, sclref names and layouts.
    batches : list of (x, y)
        The batches of the steps, in sclref's layout.
    model_spec : str or Module
        What the model was built from (a `MODELS` name or a module), for re-running variants.
    """

    steps: list
    settings: StepSettings
    layout: str
    state_layout: StateLayout
    initial: dict
    batches: list
    model_spec: object
    in_shape: tuple
    num_classes: int

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> StepRecord:
        return self.steps[i]

    def rerun(self, settings: StepSettings | None = None, rule=None) -> list[StepRecord]:
        """The same steps from the same state and batches under other settings or a `VariantRule`."""
        settings = self.settings if settings is None else settings
        model = build_model(self.model_spec, self.in_shape, self.num_classes, settings.estimator())
        model.load_state_dict(self.initial)
        if rule is not None:
            rule = type(rule)(settings.objective(), rule.axis, rule.reg_sign, rule.reg_surrogate)
        return simulate(model, self.batches, settings, rule)

    def in_layout(self, values: dict) -> dict:
        """sclref name -> array as the user's name -> array in the user's layout (minus entries it does not store)."""
        lay = self.state_layout
        return dict(lay.from_sclref({n: v for n, v in values.items() if lay.stores(n)}))

    def stage(self, name: str, step: int = -1):
        """Stage `name` of step `step` in the user's names and layout (scalars as floats)."""
        value = self.steps[step].stage(name)
        if isinstance(value, dict):
            return self.in_layout(value)
        if name == "logits":
            return value.copy()
        return value

    def final_state(self) -> dict:
        """The state after the last step, in the user's names and layout (feed it to the next step)."""
        last = self.steps[-1]
        values = {**last.theta, **last.s, **last.buffers}
        return self.in_layout(OrderedDict((n, values[n]) for n in self.initial if n in values))

    def to_flat(self) -> dict:
        """Every stage of every step as ``"{step}/{stage}/{name}"`` -> array (``"{step}/loss"`` for scalars).

        Names and layouts are the user's; masks are bool. Also ``"{step}/mask_before/..."``
        and ``"{step}/flipped/..."``. What ``sclref verify --out`` writes.
        """
        out = {}
        for i, record in enumerate(self.steps):
            for stage in STAGES + ("mask_before", "flipped"):
                value = getattr(record, "mask_after" if stage == "mask" else stage)
                if isinstance(value, dict):
                    for name, arr in self.in_layout(value).items():
                        out[f"{i}/{stage}/{name}"] = arr
                else:
                    out[f"{i}/{stage}"] = np.asarray(value, dtype=np.float64)
        return out


def reference_step(model, state, batch, settings: StepSettings | None = None, steps: int = 1, *,
                   layout: str = "torch", names=None, num_classes: int | None = None) -> StepResult:
    """Run sclref's SCL training step(s) from the user's state on the user's batch, in float64.

    Parameters
    ----------
    model : str or sclref.nn.Module
        A name of `sclref.models.MODELS` ("lenet300", "lenet5", ...), built for the
        batch's sample shape, or a masked module (copied and made float64; every masked
        layer gets the settings' estimator).
    state : mapping
        Names to arrays of θ, biases, scores (and batch-norm parameters and statistics),
        in `layout` (see `sclref.oracle.load_state`).
    batch : (x, y) or list of (x, y)
        The batch of every step, or one batch per step. x is NCHW (NHWC with
        ``layout="flax"``) or (N, features); y holds integer labels.
    settings : StepSettings, optional
        The step's settings (default: those of ``sclref train``).
    steps : int
        How many steps to run; optimizer state (momentum, Adam moments) starts empty and
        carries over from step to step.
    layout : {"torch", "flax", "sclref"}
        Conventions of `state`, `batch` and of everything the result hands back in the
        user's names.
    names : mapping or callable, optional
        The user's names -> sclref's (see `sclref.oracle.load_state`).
    num_classes : int, optional
        Outputs of a model built by name; by default read from the state's last dense layer.

    Returns
    -------
    StepResult
        Every stage of every step; identical, bit for bit, to what
        `sclref.train.Trainer.step` computes from the same state, batch and settings.

    Raises
    ------
    InputError
        For a state, batch or setting that does not fit (the message lists what was expected).
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise InputError(f"num_classes must be an integer in [1, {MAX_CLASSES}], got {num_classes!r}")
    settings = StepSettings() if settings is None else settings
    if not isinstance(settings, StepSettings):
        settings = StepSettings.from_dict(settings)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 10_000:
        raise InputError(f"steps must be an integer in [1, 10000], got {steps!r}")
    batches = _batches(batch, int(steps), layout)
    in_shape = batches[0][0].shape[1:]
    estimator = settings.estimator()
    if num_classes is None:
        num_classes = _num_classes(model, in_shape, estimator, state, layout, names)
    built = build_model(model, in_shape, num_classes, estimator)
    count = sum(p.size for p in built.parameters())
    check_allocation((int(steps), count, 12), 8, f"the stages of {steps} step(s) of a model of {count:,} parameters")
    state_layout = StateLayout(built, layout, names, in_shape=in_shape)
    initial = state_layout.to_sclref(state)
    built.load_state_dict(initial, strict=False)
    initial = OrderedDict((n, a.copy()) for n, a in built.state_dict().items())
    batches = [(x, _labels(y, f"batch {i} y", len(x), num_classes)) for i, (x, y) in enumerate(batches)]
    records = simulate(built, batches, settings)
    return StepResult(steps=records, settings=settings, layout=layout, state_layout=state_layout, initial=initial,
                      batches=batches, model_spec=model if isinstance(model, str) else copy.deepcopy(model),
                      in_shape=tuple(in_shape), num_classes=int(num_classes))
