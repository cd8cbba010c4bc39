"""Training with SCL: one loop over a run's phases (mask learning, fine-tuning θ with frozen masks, ...).

`TrainConfig` holds every choice of a run; `train(config)` validates it before writing
anything, then trains with separate optimizers for the weights θ and the mask variables
s, writes an atomic checkpoint after every epoch, a metrics JSON, and the final model.
A run resumed from its checkpoint reproduces the uninterrupted run bit for bit: the
checkpoint holds the model, both optimizers, the λ controller and the data-order RNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sclref import data as datasets
from sclref import ops, optim, provenance, pruning, rundir, storage, threads
from sclref._version import __version__
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.runs import (  # noqa: F401 - part of train's interface: a run's settings and files
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    METRICS,
    MODEL,
    MODEL_FORMAT,
    MODEL_VERSION,
    TrainConfig,
    build_model,
    load_model,
)
from sclref.scl import LambdaController, SCLObjective, layer_report, masked_layers, sparsity


class DivergedError(ArithmeticError):
    """The loss became NaN or infinite: the run stops, its last checkpoint holds the epoch before."""


@dataclass(frozen=True)
class Phase:
    """A stretch of a run's epochs trained one way.

    `learn_masks`: the mask variables learn (SCL's mask phase); otherwise the masks are
    frozen and only θ trains. `start`, when given, changes the model once as the phase
    begins (magnitude pruning between the dense phase and retraining); it runs at the
    phase's first epoch, so a run resumed from any checkpoint runs it exactly once.
    """

    name: str
    epochs: int
    learn_masks: bool
    start: Callable[["Trainer"], str] | None = None


def phases(config: TrainConfig) -> list[Phase]:
    """The phases of the run `config` describes, in order; empty phases left out."""
    if not config.masked:
        found = [Phase("train", config.total_epochs, False)]
    elif config.prune_scope is not None:
        found = [Phase("dense", config.epochs, False), Phase("finetune", config.finetune_epochs, False, _prune)]
    else:
        found = [Phase("mask", config.epochs, True), Phase("finetune", config.finetune_epochs, False)]
    return [phase for phase in found if phase.epochs]


def _prune(trainer: "Trainer") -> str:
    """The hook between the dense phase and retraining: keep the largest |θ| of each masked layer."""
    kept = pruning.magnitude_prune(trainer.model, trainer.config.prune_sparsity, trainer.config.prune_scope)
    return f"magnitude pruning ({trainer.config.prune_scope}): {sum(kept.values()):,} connections kept"


@dataclass
class RunResult:
    """What a finished (or stopped) run hands back."""

    config: TrainConfig
    model: object
    history: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    out_dir: Path | None = None
    epoch_seconds: list = field(default_factory=list)  # wall time of each epoch (None where unknown)


def _param_groups(model):
    scores = {id(layer.score) for _, layer in masked_layers(model)}
    weights = [p for p in model.parameters() if id(p) not in scores]
    return weights, [layer.score for _, layer in masked_layers(model)]


def _mse(out: Tensor, targets: np.ndarray) -> Tensor:
    err = out - Tensor(targets)
    return (err * err).mean()


# `TrainConfig.loss` by name: the loss of a batch, and the sum of its samples' errors (a
# sample misclassified counts 1; a regression sample counts its mean squared error).
LOSSES = {
    "cross_entropy": (ops.cross_entropy, lambda out, y: int(np.count_nonzero(out.argmax(axis=1) != y))),
    "mse": (_mse, lambda out, y: float(np.square(out - y).mean(axis=1).sum())),
}


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000, loss: str = "cross_entropy") -> float:
    """The error of `model` on (x, y) in eval mode: the misclassified fraction, or the MSE for `loss` "mse"."""
    errors = LOSSES[loss][1]
    model.eval()
    total = 0
    with no_grad():
        for start in range(0, len(x), batch_size):
            total += errors(model(Tensor(x[start:start + batch_size])).data, y[start:start + batch_size])
    model.train()
    return total / max(len(x), 1)


class Trainer:
    """One run: the model, its two optimizers, the objective and the data-order RNG.

    `dataset` is a `sclref.data.Dataset`, or for the mse loss any object with its fields
    (``x_train``, ``y_train``, ``x_test``, ``y_test``, ``in_shape``, ``num_classes`` as
    the number of outputs, ``name``, ``fingerprint()``).
    """

    def __init__(self, config: TrainConfig, dataset, log=print):
        self.config, self.data = config, dataset
        if config.loss == "mse" and np.ndim(dataset.y_train) != 2:
            raise InputError(f"loss mse needs real-valued targets of shape (samples, outputs); {dataset.name} has "
                             "class labels (train those with loss cross_entropy)")
        self.model = build_model(config, dataset.in_shape, dataset.num_classes)
        weights, scores = _param_groups(self.model)
        self.opt_w = optim.SGD(weights, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.opt_s = optim.SGD(scores, lr=config.mask_lr) if scores else None
        self.steps_per_epoch = -(-len(dataset.x_train) // config.batch_size)
        lam = config.lam / self.steps_per_epoch if config.lam_per == "epoch" else config.lam  # one step's λ
        self.objective = SCLObjective(lam, config.normalization, config.weighting, config.normalize)
        # Target mode starts from a weak λ and lets the controller raise it, so that the
        # least useful connections go first instead of all crossing zero together.
        self.controller = (LambdaController(config.target_sparsity / 100, max(lam / 10, 1e-6),
                                            gain=config.lam_gain, ramp=0.7)
                           if config.target_sparsity is not None and config.masked else None)
        if self.controller is not None:
            self.objective.lam = self.controller.lam
        self.order_rng = np.random.default_rng([config.seed, 2])
        self.epoch = 0
        self.history: list[dict] = []
        self.epoch_seconds: list[float | None] = []  # wall times: kept apart, they differ between identical runs
        self.phases = phases(config)
        self.log = log
        if config.prune_scope is not None:  # a per-layer request must name these layers: now, not after the dense phase
            pruning.check_sparsity(config.prune_sparsity, config.prune_scope,
                                   [name for name, _ in masked_layers(self.model)])
        self.data_fingerprint = dataset.fingerprint()
        # Augmentation pads with black, a raw pixel 0, wherever the data says how it was standardized.
        prep = getattr(dataset, "preprocessing", None)
        self._black = 0.0 if prep is None else -prep["mean"] / prep["std"]
        if config.augment and np.ndim(dataset.x_train) != 4:
            raise InputError(f"augment crops and flips images; {dataset.name} holds no (N, C, H, W) images")

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs, and nothing that varies between identical runs (no wall times)."""
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "sclref": __version__,
            "config": self.config.to_dict(), "data": self.data_fingerprint, "provenance": provenance.reproducibility(),
            "epoch": self.epoch, "history": self.history,
            "model": dict(self.model.state_dict()), "opt_w": self.opt_w.state_dict(),
            "opt_s": None if self.opt_s is None else self.opt_s.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "lam": self.objective.lam, "order_rng": self.order_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint of this very run; anything foreign, inconsistent or tampered is an InputError."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InputError("not an sclref checkpoint")
        if state.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"checkpoint version {state.get('version')!r}: this sclref reads version "
                             f"{CHECKPOINT_VERSION} (a run is resumed by the sclref that started it)")
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise InputError(f"the checkpoint is incomplete: no {missing}")
        saved = state["config"]
        if not isinstance(saved, dict):
            raise InputError("the checkpoint's settings are not a mapping")
        # The data is compared by content below, not by the path it was given by.
        differ = sorted(k for k, v in self.config.to_dict().items() if k != "data" and saved.get(k) != v)
        if differ:
            raise InputError(f"the checkpoint was made with other settings: {differ}; resume with the same ones")
        if state["data"] != self.data_fingerprint:
            raise InputError(f"the checkpoint was trained on other data than {self.config.data!r} gives now "
                             "(their contents differ); resume with the data the run started with")
        differences = provenance.resume_differences(state["provenance"])
        if differences:
            raise InputError("resuming here would not give the result of the uninterrupted run: "
                             + "; ".join(differences))
        epoch, history, lam = state["epoch"], state["history"], state["lam"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= self.config.total_epochs:
            raise InputError(f"the checkpoint's epoch must be an integer in [0, {self.config.total_epochs}], "
                             f"got {epoch!r}")
        if not (isinstance(history, list) and len(history) == epoch and all(isinstance(r, dict) for r in history)):
            raise InputError(f"the checkpoint's history must be a list of {epoch} epoch records")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
            raise InputError(f"the checkpoint's λ must be a finite number >= 0, got {lam!r}")
        part = "model"
        try:
            self.model.load_state_dict(state["model"])
            part = "weight optimizer"
            self.opt_w.load_state_dict(state["opt_w"])
            part = "mask optimizer"
            if self.opt_s is not None:
                self.opt_s.load_state_dict(state["opt_s"])
            part = "λ controller"
            if self.controller is not None:
                self.controller.load_state_dict(state["controller"])
            part = "data-order generator"
            self.order_rng.bit_generator.state = state["order_rng"]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
            raise InputError(f"the checkpoint's {part} does not fit this run ({type(err).__name__}: {err})") from None
        for name, value in self.model.state_dict().items():
            if not np.isfinite(value).all():
                raise InputError(f"the checkpoint's {name} holds NaN or infinite values")
        self.objective.lam = float(lam)
        self.epoch, self.history = epoch, history
        self.epoch_seconds = [None] * epoch

    # -- one step and one epoch ---------------------------------------------------------
    def step(self, xb: np.ndarray, yb: np.ndarray, learn_masks: bool = True) -> tuple[float, np.ndarray]:
        """One SGD step on a batch: θ always, the mask variables when `learn_masks`; returns (loss, logits)."""
        self.opt_w.zero_grad()
        if self.opt_s is not None:
            self.opt_s.zero_grad()
        logits = self.model(Tensor(xb))
        loss = LOSSES[self.config.loss][0](logits, yb) if np.isfinite(logits.data).all() else None
        if loss is None or not math.isfinite(loss.item()):
            raise DivergedError(f"the logits or the loss became NaN or infinite in epoch {self.epoch + 1}: training "
                                "diverged (lower --lr or --mask-lr); the last checkpoint holds the epoch before")
        loss.backward()
        if learn_masks:
            self.objective.apply(self.model)
            self.opt_s.step()
        self.opt_w.step()
        return loss.item(), logits.data

    def run_epoch(self, after_step: Callable[[], None] | None = None) -> dict:
        """Train one epoch and evaluate; BLAS is pinned to one thread meanwhile, so the bits do not depend on it.

        `after_step` is called after every optimizer step (a progress bar, or an
        experiment that watches the masks step by step).
        """
        with threads.pinned():
            return self._run_epoch(after_step)

    def phase(self) -> tuple[Phase, int]:
        """The phase the next epoch belongs to, and how many of its epochs are done."""
        done = self.epoch
        for phase in self.phases:
            if done < phase.epochs:
                return phase, done
            done -= phase.epochs
        raise ValueError(f"the run is finished: all {self.config.total_epochs} epochs are done")

    def _run_epoch(self, after_step) -> dict:
        cfg, model = self.config, self.model
        phase, done = self.phase()
        if done == 0 and phase.start is not None:
            self.log(phase.start(self))
        learn = phase.learn_masks
        layers = masked_layers(model)
        for _, layer in layers:
            layer.freeze_mask(not learn)
        start_masks = [layer.mask() for _, layer in layers]
        prev_masks = list(start_masks)
        flips = [0] * len(layers)
        t0 = time.perf_counter()
        total_loss = wrong = seen = 0
        errors = LOSSES[cfg.loss][1]
        mask_steps = cfg.epochs * self.steps_per_epoch
        step = self.epoch * self.steps_per_epoch
        for xb, yb in datasets.batches(self.data.x_train, self.data.y_train, cfg.batch_size, True, self.order_rng):
            if cfg.augment:
                xb = datasets.augment(xb, self.order_rng, self.data.in_shape[1] // 8, self._black)
            loss, logits = self.step(xb, yb, learn_masks=learn)
            if learn:
                for i, (_, layer) in enumerate(layers):
                    mask = layer.mask()
                    flips[i] += int(np.count_nonzero(mask != prev_masks[i]))
                    prev_masks[i] = mask
                step += 1
                if self.controller is not None:
                    self.objective.lam = self.controller.update(sparsity(model), step / mask_steps)
            total_loss += loss * len(yb)
            wrong += errors(logits, yb)
            seen += len(yb)
            if after_step is not None:
                after_step()
        seconds = time.perf_counter() - t0
        self.epoch += 1
        record = {
            "epoch": self.epoch, "phase": phase.name, "loss": total_loss / seen,
            "penalty": self.objective.penalty(model) if cfg.prune_scope is None and layers else 0.0,
            "lam": self.objective.lam if cfg.prune_scope is None and layers else None,
            "train_error": wrong / seen,
            "test_error": evaluate(model, self.data.x_test, self.data.y_test, loss=cfg.loss),
            "sparsity": sparsity(model) if layers else 0.0,
            "layers": {
                name: {"sparsity": layer.sparsity(), "flips": flips[i],
                       "pruned": int(np.count_nonzero(start_masks[i] & ~layer.mask())),
                       "revived": int(np.count_nonzero(~start_masks[i] & layer.mask()))}
                for i, (name, layer) in enumerate(layers)
            },
        }
        self.history.append(record)
        self.epoch_seconds.append(seconds)
        return {**record, "seconds": seconds}


def format_epoch(record: dict, total: int) -> str:
    return (f"epoch {record['epoch']:>3}/{total} {record['phase']:<8} loss {record['loss']:.4f}  "
            f"train err {100 * record['train_error']:5.2f}%  test err {100 * record['test_error']:5.2f}%  "
            f"sparsity {100 * record['sparsity']:6.2f}%  "
            + (f"λ {record['lam']:.2e}  " if record["lam"] is not None else "")
            + f"{record['seconds']:.2f}s")


def format_layers(rows: list[dict]) -> str:
    """The per-layer table printed at the end of a run."""
    header = f"{'layer':<10} {'weights':>9} {'kept':>9} {'sparsity':>9} {'dense FLOPs':>13} {'eff. FLOPs':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['layer']:<10} {r['weights']:>9,} {r['kept']:>9,} {100 * r['sparsity']:>8.2f}% "
                     f"{r['dense_flops']:>13,} {r['effective_flops']:>13,}")
    w, k = sum(r["weights"] for r in rows), sum(r["kept"] for r in rows)
    d, e = sum(r["dense_flops"] for r in rows), sum(r["effective_flops"] for r in rows)
    lines.append(f"{'total':<10} {w:>9,} {k:>9,} {100 * (1 - k / w if w else 0):>8.2f}% {d:>13,} {e:>13,}")
    return "\n".join(lines)


def load_data(config: TrainConfig):
    """The dataset `config` names, in its dtype, cut to its train/test limits."""
    dataset = datasets.load(config.data, dtype=np.dtype(config.dtype))
    if config.train_limit is not None or config.test_limit is not None:
        dataset = datasets.subset(dataset, config.train_limit or len(dataset.x_train),
                                  config.test_limit or len(dataset.x_test))
    if len(dataset.x_test) == 0:
        raise InputError(f"{config.data}: the test set is empty, so no test error can be measured")
    return dataset


def train(config: TrainConfig, out_dir=None, resume: bool = False, log=print, progress: bool = False,
          stop_after: int | None = None, replace: bool = False) -> RunResult:
    """Train as `config` says; write checkpoint, metrics and model to `out_dir` if given.

    `resume` continues from ``out_dir/checkpoint.npz``; `replace` lets a fresh run start
    in a directory that holds another run, whose files are deleted first (without it that
    is an error). While the run writes, it holds the directory's lock: a second writer
    fails at once. `stop_after` ends the run after that many epochs in total (as an
    interruption would), leaving the checkpoint behind. Every epoch runs with BLAS pinned
    to one thread (`sclref.threads`), so the result does not depend on the machine's
    thread settings.
    """
    config.validate()
    out = None if out_dir is None else Path(out_dir)
    if resume and (out is None or not (out / CHECKPOINT).is_file()):
        raise FileNotFoundError(f"--resume: no checkpoint at {None if out is None else out / CHECKPOINT}")
    if out is not None:
        rundir.check_writable(out)
    dataset = load_data(config)
    trainer = Trainer(config, dataset, log)
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(rundir.claim(out, "keep" if resume else "replace" if replace else "refuse"))
        if resume:
            try:
                trainer.load_state_dict(storage.load_state(out / CHECKPOINT))
            except InputError as err:
                raise InputError(f"{out / CHECKPOINT}: {err}") from None
            trainer.epoch_seconds = _previous_timing(out / METRICS, trainer.epoch)
            log(f"resumed from {out / CHECKPOINT} after epoch {trainer.epoch}")
        return _run(trainer, out, log, progress, stop_after)


def _run(trainer: Trainer, out: Path | None, log, progress: bool, stop_after: int | None) -> RunResult:
    config, dataset = trainer.config, trainer.data
    total = config.total_epochs
    last = total if stop_after is None else min(total, stop_after)
    bar = _progress_bar(trainer, last) if progress else None
    say = bar.write if bar is not None and not bar.disable else log  # a line printed past the bar leaves it whole
    try:
        while trainer.epoch < last:
            record = trainer.run_epoch(None if bar is None else lambda: bar.update(1))
            say(format_epoch(record, total))
            if out is not None:
                storage.save_state(out / CHECKPOINT, trainer.state_dict())
                storage.atomic_write_json(out / METRICS, _metrics(trainer, finished=False))
    finally:
        if bar is not None:
            bar.close()
    result = RunResult(config, trainer.model, trainer.history, [], out, trainer.epoch_seconds)
    if trainer.epoch == total:
        result.layers = layer_report(trainer.model) if masked_layers(trainer.model) else []
        if out is not None:
            storage.save_state(out / MODEL, {
                "format": MODEL_FORMAT, "version": MODEL_VERSION, "config": config.to_dict(),
                "in_shape": list(dataset.in_shape), "num_classes": dataset.num_classes,
                "preprocessing": dataset.preprocessing, "data": trainer.data_fingerprint,
                "state": dict(trainer.model.state_dict())})
            storage.atomic_write_json(out / METRICS, _metrics(trainer, finished=True))
    return result


def _metrics(trainer: Trainer, finished: bool) -> dict:
    layers = masked_layers(trainer.model)
    return {
        "sclref": __version__, "provenance": provenance.reproducibility(),
        "config": trainer.config.to_dict(), "dataset": trainer.data.name, "data": trainer.data_fingerprint,
        "finished": finished, "epochs_done": trainer.epoch, "history": trainer.history,
        "final": None if not finished else {
            "test_error": trainer.history[-1]["test_error"], "sparsity": sparsity(trainer.model) if layers else 0.0,
            "layers": layer_report(trainer.model) if layers else [],
        },
        # The one field that differs between identical runs: how long they took, on which threads.
        "timing": {"epoch_seconds": trainer.epoch_seconds, "machine": provenance.machine()},
    }


def _previous_timing(metrics_path: Path, epochs: int) -> list:
    """The wall times of the epochs before a resume, from the metrics the interrupted run wrote (None if unknown)."""
    try:
        seconds = json.loads(metrics_path.read_text())["timing"]["epoch_seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        seconds = []
    seconds = seconds[:epochs] if isinstance(seconds, list) else []
    return [v if isinstance(v, (int, float)) else None for v in seconds] + [None] * (epochs - len(seconds))


def _progress_bar(trainer: Trainer, last: int):
    from tqdm import tqdm

    return tqdm(total=trainer.steps_per_epoch * (last - trainer.epoch), unit="step", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty() or os.environ.get("SCLREF_NO_PROGRESS") == "1")
