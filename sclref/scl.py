"""The SCL objective around the task loss: mask-gradient normalization, the
connection-count regularizer, FLOPs accounting, and the λ controller for a target sparsity.

After ``task_loss.backward()`` each masked layer's ``score.grad`` holds the task gradient
of its mask variables. `SCLObjective.apply` then (1) normalizes it per feature (output
unit / filter), so features with large and small gradients learn their masks at the same
pace, and (2) adds the regularizer's gradient ``λ · w · g'(s)``, the steady pressure
toward pruning of ``λ · Σ w · H(s)`` seen through the estimator. By default the task
gradient is normalized before the regularizer is added, so λ means the same pressure on
every feature; ``normalize="total"`` normalizes the sum instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sclref.nn.masked import MaskedLayer
from sclref.nn.module import Module

NORMALIZATIONS = ("l2", "max", "none")
WEIGHTINGS = ("count", "flops")


def masked_layers(model: Module) -> list[tuple[str, MaskedLayer]]:
    """Every masked layer of `model` with its dotted name, in model order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MaskedLayer)]


def normalize_per_feature(grad: np.ndarray, mode: str = "l2", eps: float = 1e-12) -> np.ndarray:
    """`grad` (features along axis 0) with each feature's slice divided by its L2 norm or max |.|."""
    if mode == "none":
        return grad
    flat = grad.reshape(grad.shape[0], -1)
    if mode == "l2":
        scale = np.sqrt(np.einsum("ij,ij->i", flat, flat))
    elif mode == "max":
        scale = np.abs(flat).max(axis=1)
    else:
        raise ValueError(f"unknown normalization {mode!r}; choose from {NORMALIZATIONS}")
    return (flat / (scale[:, None] + grad.dtype.type(eps))).reshape(grad.shape)


def connection_weights(layers: list[MaskedLayer], weighting: str) -> list[float]:
    """Per-layer weight of one connection in the regularizer.

    "count": 1 for every connection (the paper's regularizer). "flops": the connection's
    multiply-adds per sample, divided by the mean over all connections of the network so
    that λ keeps the scale it has under "count".
    """
    if weighting == "count":
        return [1.0] * len(layers)
    if weighting != "flops":
        raise ValueError(f"unknown regularizer weighting {weighting!r}; choose from {WEIGHTINGS}")
    uses = [layer.uses_per_sample() for layer in layers]
    total = sum(layer.num_weights for layer in layers)
    if total == 0:  # no (unfrozen) masked connection: nothing to weight
        return [1.0] * len(layers)
    mean = sum(u * layer.num_weights for u, layer in zip(uses, layers)) / total
    return [u / mean for u in uses]


@dataclass
class SCLObjective:
    """Normalization and regularization of the mask-variable gradients.

    Parameters
    ----------
    lam : float
        Strength λ >= 0 of the connection-count regularizer.
    normalization : {"l2", "max", "none"}
        Per-feature normalization of the task gradient of the mask variables.
    weighting : {"count", "flops"}
        Regularize the number of connections, or their FLOPs (see `connection_weights`).
    normalize : {"task", "total"}
        Normalize the task gradient before adding the regularizer's, or their sum.
    eps : float
        Added to each feature's norm so an all-zero feature stays zero.
    """

    lam: float = 0.0
    normalization: str = "l2"
    weighting: str = "count"
    normalize: str = "task"
    eps: float = 1e-12

    def __post_init__(self):
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"λ (lam) must be a finite number >= 0, got {self.lam!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose from {NORMALIZATIONS}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown regularizer weighting {self.weighting!r}; choose from {WEIGHTINGS}")
        if self.normalize not in ("task", "total"):
            raise ValueError(f"normalize must be 'task' or 'total', got {self.normalize!r}")

    def apply(self, model: Module) -> None:
        """Rewrite every unfrozen masked layer's ``score.grad`` in place of the task gradient."""
        layers = [layer for _, layer in masked_layers(model) if not layer.frozen]
        for layer, w in zip(layers, connection_weights(layers, self.weighting)):
            s = layer.score
            task = np.zeros_like(s.data) if s.grad is None else s.grad
            if not self.lam:
                reg = 0
            elif layer.ste.unit_surrogate:  # λ·w·g'(s) is one number: no array for it
                reg = s.dtype.type(self.lam * w)
            else:
                reg = layer.ste.surrogate(s.data) * s.dtype.type(self.lam * w)
            if self.normalize == "task":
                g = normalize_per_feature(task, self.normalization, self.eps)
                # normalize_per_feature returns a new array unless it had nothing to do.
                s.grad = g + reg if g is task else np.add(g, reg, out=g)
            else:
                s.grad = normalize_per_feature(task + reg, self.normalization, self.eps)

    def penalty(self, model: Module) -> float:
        """The regularizer's value λ · Σ w · H(s) (reported beside the task loss)."""
        layers = [layer for _, layer in masked_layers(model)]
        weights = connection_weights(layers, self.weighting)
        return self.lam * sum(w * layer.num_kept() for layer, w in zip(layers, weights))


def sparsity(model: Module) -> float:
    """Fraction of all masked connections that are removed."""
    layers = [layer for _, layer in masked_layers(model)]
    total = sum(layer.num_weights for layer in layers)
    return 1.0 - sum(layer.num_kept() for layer in layers) / total if total else 0.0


def layer_report(model: Module) -> list[dict]:
    """Per masked layer: weights, kept, sparsity, dense and effective multiply-adds per sample."""
    rows = []
    for name, layer in masked_layers(model):
        uses = layer.uses_per_sample()
        kept = layer.num_kept()
        rows.append({
            "layer": name, "weights": layer.num_weights, "kept": kept, "sparsity": layer.sparsity(),
            "dense_flops": 2 * uses * layer.num_weights, "effective_flops": 2 * uses * kept,
        })
    return rows


class LambdaController:
    """Adjusts λ during training so the overall sparsity settles at a target.

    The set-point rises from 0 to the target along the cubic schedule of gradual pruning,
    ``target · (1 − (1 − p / ramp)^3)`` for training progress p in [0, 1], and stays at
    the target after ``p = ramp``. An integral controller in log λ tracks it: after each
    step ``log λ += gain · (set-point − sparsity)`` (sparsities as fractions), rising by at
    most `max_rate` a step: masks answer a rise of λ only tens of steps later, and an
    unbounded rise in that time prunes everything at once. A rising
    set-point avoids the overshoot of aiming at the final target at once: masks respond
    to λ only after tens of steps, and a network pruned to nothing has no gradient left
    to revive any connection. Layers still find their own sparsity; only the overall
    pressure is steered. λ is kept within [lam_min, lam_max].
    """

    def __init__(self, target: float, lam: float, gain: float = 20.0, ramp: float = 0.7, max_rate: float = 0.05,
                 lam_min: float = 1e-6, lam_max: float = 10.0):
        if not 0 < target < 1:
            raise ValueError(f"target sparsity must be in (0, 100) %, got {100 * target:g} %")
        if not lam > 0:
            raise ValueError(f"the controller needs a starting λ > 0, got {lam}")
        if not 0 < ramp <= 1:
            raise ValueError(f"ramp must be in (0, 1], got {ramp}")
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be a finite number > 0, got {gain}")
        if not (math.isfinite(max_rate) and max_rate > 0):
            raise ValueError(f"max_rate must be a finite number > 0, got {max_rate}")
        if not 0 < lam_min <= lam_max < math.inf:
            raise ValueError(f"need 0 < lam_min <= lam_max < inf, got lam_min={lam_min}, lam_max={lam_max}")
        self.target, self.gain, self.ramp, self.max_rate = float(target), float(gain), float(ramp), float(max_rate)
        self.lam_min, self.lam_max = float(lam_min), float(lam_max)
        self.lam = min(max(float(lam), self.lam_min), self.lam_max)

    def setpoint(self, progress: float) -> float:
        """The sparsity aimed at when a fraction `progress` of mask learning is done."""
        p = min(max(progress / self.ramp, 0.0), 1.0)
        return self.target * (1.0 - (1.0 - p) ** 3)

    def update(self, current_sparsity: float, progress: float = 1.0) -> float:
        """Move λ after observing `current_sparsity` at `progress`; returns the new λ."""
        if not 0 <= current_sparsity <= 1:
            raise ValueError(f"observed sparsity must be a fraction in [0, 1], got {current_sparsity}")
        step = self.gain * (self.setpoint(progress) - current_sparsity)
        self.lam *= math.exp(min(step, self.max_rate))
        self.lam = min(max(self.lam, self.lam_min), self.lam_max)
        return self.lam

    def state_dict(self) -> dict:
        return {"target": self.target, "gain": self.gain, "ramp": self.ramp, "max_rate": self.max_rate, "lam": self.lam,
                "lam_min": self.lam_min, "lam_max": self.lam_max}

    def load_state_dict(self, state: dict) -> None:
        self.target, self.gain, self.ramp, self.lam = state["target"], state["gain"], state["ramp"], state["lam"]
        self.max_rate = state["max_rate"]
        self.lam_min, self.lam_max = state["lam_min"], state["lam_max"]
