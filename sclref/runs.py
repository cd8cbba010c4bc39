"""A run's settings and the files others read from its directory: `TrainConfig`, the model it builds, the model file.

`sclref.train` writes a run; whoever only reads one (export, inference, the experiments'
summaries) needs this module, not the training loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sclref import data as datasets
from sclref import models, pruning, storage
from sclref import ste as ste_registry
from sclref.errors import InputError
from sclref.scl import SCLObjective

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.json"
MODEL = "model.npz"
MODEL_FORMAT, MODEL_VERSION = "sclref-model", 1  # the final model file of a run
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "sclref-checkpoint", 2  # 2: data by content, provenance, no wall times
MAX_INPUT_SIDE = 4096  # bound on each of (C, H, W) read from a model file
MAX_CLASSES = datasets.MAX_CLASSES
LOSSES = ("cross_entropy", "mse")  # the task losses `sclref.train` knows


@dataclass
class TrainConfig:
    """Everything that defines a training run (and must match when resuming it)."""

    model: str = "lenet300"
    data: str = "digits"
    ste: str = "identity"
    ste_alpha: float = 0.1  # slope of the leaky_relu estimator
    lam: float = 0.36  # λ; with target_sparsity, the starting λ
    # "epoch": λ is the push of one epoch, spread over its steps (λ / steps per epoch each step), so the
    # same λ prunes alike whatever the data size and batch size; "step": each step's push is λ.
    lam_per: str = "epoch"
    target_sparsity: float | None = None  # percent, e.g. 98.0; None: fixed λ
    normalization: str = "l2"
    weighting: str = "count"
    normalize: str = "task"
    epochs: int = 30  # mask-learning epochs
    finetune_epochs: int = 10  # θ only, masks frozen
    batch_size: int = 128
    lr: float = 0.05  # θ: SGD with momentum
    mask_lr: float = 0.5  # s: plain SGD on the normalized gradient
    momentum: float = 0.9  # θ only: momentum on s keeps pruning after λ drops, which defeats target mode
    lam_gain: float = 20.0  # target mode: how fast log λ follows the sparsity error
    weight_decay: float = 0.0
    score_init: float = 1.0
    masked: bool = True  # False trains the plain dense network (a baseline)
    mask_first: bool = True  # False keeps the first weight layer dense (as RigL and others do)
    mask_last: bool = True  # False keeps the classifier dense
    # Magnitude pruning + retraining (the classic baseline) instead of SCL: the masks stay on while θ trains
    # for `epochs`, then keep the largest |θ| ("layer": `prune_sparsity` per layer, a fraction or a dict by
    # layer name; "global": one fraction over all layers) and stay frozen for `finetune_epochs`.
    prune_scope: str | None = None
    prune_sparsity: float | dict | None = None
    # Random crops (padding of H // 8 pixels, 4 on 32x32 images) and horizontal flips of every training batch,
    # drawn from the data-order generator: `sclref.data.augment`.
    augment: bool = False
    dtype: str = "float32"
    seed: int = 0
    train_limit: int | None = None  # use only the first N training samples
    test_limit: int | None = None
    # The task: "cross_entropy" against class labels (errors: the misclassified fraction), or "mse" against
    # real-valued targets, one per output (errors: the mean squared error), as the planted teacher of
    # `sclref theory` trains.
    loss: str = "cross_entropy"

    def validate(self) -> None:
        """Raise `InputError` naming the first bad setting; numbers are checked in the dtype they live in."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _FIELD_TYPES[f.type]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise InputError(f"{f.name} must be of type {f.type}, got {value!r}")
            if float in kinds and isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
                raise InputError(f"{f.name} = {value} is too large for a float setting")
        if self.dtype not in ("float32", "float64"):
            raise InputError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.model not in models.MODELS:
            raise InputError(f"unknown model {self.model!r}; choose from {sorted(models.MODELS)}")
        if self.ste not in ste_registry.available():
            raise InputError(f"unknown STE {self.ste!r}; registered: {', '.join(ste_registry.available())}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise InputError(f"λ must be a finite number >= 0, got {self.lam}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.lam_per not in ("epoch", "step"):
            raise InputError(f"lam_per must be 'epoch' or 'step', got {self.lam_per!r}")
        if self.target_sparsity is not None and not 0 < self.target_sparsity < 100:
            raise InputError(f"target sparsity must be in (0, 100) percent, got {self.target_sparsity}")
        if self.target_sparsity is not None and not self.masked:
            raise InputError("target sparsity needs a masked run: a dense run has no connections to prune")
        if self.prune_scope is not None:
            if not self.masked or self.target_sparsity is not None:
                raise InputError("magnitude pruning (prune_scope) needs a masked run without a target sparsity")
            if self.finetune_epochs < 1:
                raise InputError("magnitude pruning + retraining needs finetune_epochs >= 1 (the retraining epochs)")
            pruning.check_sparsity(self.prune_sparsity, self.prune_scope)
        elif self.prune_sparsity is not None:
            raise InputError("prune_sparsity is given without prune_scope ('layer' or 'global')")
        if not (math.isfinite(self.ste_alpha) and 0 < self.ste_alpha < 1):
            raise InputError(f"ste_alpha (the leaky_relu STE's slope) must be in (0, 1), got {self.ste_alpha}")
        try:
            SCLObjective(self.lam, self.normalization, self.weighting, self.normalize)  # validates those three
        except ValueError as err:
            raise InputError(str(err)) from None
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_epochs < 0:
            raise InputError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        for name in ("lr", "mask_lr", "lam_gain"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a finite number > 0, got {value}")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not math.isfinite(self.score_init):
            raise InputError(f"score_init must be finite, got {self.score_init}")
        # A value finite as a Python float can overflow in float32 (1e300 -> inf) and freeze every mask.
        real = np.dtype(self.dtype).type
        with np.errstate(over="ignore"):
            for name in ("lam", "lr", "mask_lr", "score_init", "weight_decay", "ste_alpha"):
                if not np.isfinite(real(getattr(self, name))):
                    raise InputError(f"{name} = {getattr(self, name)} overflows {self.dtype}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        for name in ("train_limit", "test_limit"):  # 0 would otherwise read as "no limit"
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1 (or None for all samples), got {value}")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of `values` (as `to_dict` wrote it), validated."""
        if not isinstance(values, dict):
            raise InputError(f"training settings must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise InputError(f"unknown training settings: {unknown}")
        config = cls(**values)
        config.validate()
        return config


# The Python types each setting may hold (an int is accepted where a float is expected).
_FIELD_TYPES = {"str": (str,), "float": (float, int), "int": (int,), "bool": (bool,), "str | None": (str, type(None)),
                "float | None": (float, int, type(None)), "int | None": (int, type(None)),
                "float | dict | None": (float, int, dict, type(None))}


def build_model(config: TrainConfig, in_shape, num_classes: int):
    """The configured architecture for data of per-sample shape `in_shape`."""
    ste = ste_registry.from_spec(config.ste, alpha=config.ste_alpha)
    return models.MODELS[config.model](
        in_shape=tuple(in_shape), num_classes=num_classes, masked=config.masked, ste=ste,
        score_init=config.score_init, dtype=np.dtype(config.dtype), generator=np.random.default_rng([config.seed, 1]),
        mask_first=config.mask_first, mask_last=config.mask_last)


def load_model(run_dir):
    """The trained model of a finished run directory, in eval mode, and the file's record.

    The record holds ``config`` (a `TrainConfig` dict), ``in_shape``, ``num_classes`` and
    ``preprocessing`` (``{"pixel_max", "mean", "std"}``: inputs are ``(x / pixel_max -
    mean) / std``; None in files of older runs) as `train` wrote them. A missing
    directory or model file is a FileNotFoundError, a file that is not a model of this
    format, or whose sizes are out of bounds, an `InputError` naming the file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    path = run_dir / MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no final model (is it finished?)")
    saved = storage.load_state(path)
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT or saved.get("version") != MODEL_VERSION:
        raise InputError(f"{path}: not an sclref model file of a version this sclref can read")
    try:
        config = TrainConfig.from_dict(saved.get("config"))
        in_shape, num_classes = _model_geometry(saved)
        saved.setdefault("preprocessing", None)
        model = build_model(config, in_shape, num_classes)
        model.load_state_dict(saved["state"])
    except (InputError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{path}: {type(err).__name__ + ': ' if not isinstance(err, InputError) else ''}{err}") \
            from None
    model.eval()
    return model, saved


def _model_geometry(saved: dict) -> tuple[tuple[int, int, int], int]:
    """The (C, H, W) input shape and class count of a model record, bounded before anything is built."""
    in_shape, num_classes = saved.get("in_shape"), saved.get("num_classes")
    if not (isinstance(in_shape, list) and len(in_shape) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_INPUT_SIDE for d in in_shape)):
        raise InputError(f"in_shape must be a list of three integers in [1, {MAX_INPUT_SIDE}], got {in_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise InputError(f"num_classes must be an integer in [1, {MAX_CLASSES}], got {num_classes!r}")
    return tuple(in_shape), num_classes


