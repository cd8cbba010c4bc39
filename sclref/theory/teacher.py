"""Experiment 3: recover a planted sparse teacher's connectivity with SCL, per estimator.

A random sparse linear layer (the teacher) labels random Gaussian inputs with real-valued
targets. A dense student of the same shape, the masked `linear` model, learns from those
targets through `sclref.train.Trainer`, the loop every sclref run goes through, with the
mse loss: the task loss's backward, `SCLObjective.apply` (per-feature normalization of
the mask gradient plus the connection-count regularizer) and SGD for the weights and
for the mask variables. One layer keeps the answer identifiable: a hidden layer's units
could come out permuted, a single layer's connections cannot. The recovered
connectivity is scored against the teacher's by precision and recall, and every wrongly
set connection whose surrogate is 0 is counted as frozen there. Masks can keep flipping
under mini-batch noise, so the final mask is a snapshot: the last epoch's fraction of
steps each teacher connection was on is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np

from sclref import ste as ste_registry
from sclref.scl import masked_layers
from sclref.train import TrainConfig, Trainer

__all__ = ["TeacherConfig", "planted_teacher"]


@dataclass(frozen=True)
class TeacherConfig:
    """The planted-teacher problem and the SCL settings that learn it.

    The optimizer settings are those of ``sclref train`` (θ: SGD with momentum, lr 0.05;
    s: plain SGD, lr 0.5; l2 per-feature normalization), and the student starts dense
    (``score_init = 1``) as SCL does.
    """

    in_features: int = 32
    out_features: int = 8
    density: float = 0.25  # fraction of the teacher's connections that exist
    samples: int = 1024  # size of the fixed training set
    noise: float = 0.05  # std of Gaussian label noise
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    mask_lr: float = 0.5
    lam: float = 0.03
    normalization: str = "l2"
    score_init: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting of the problem (`TrainConfig` checks the training's)."""
        for name in ("in_features", "out_features", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise}")

    def to_dict(self) -> dict:
        return asdict(self)


def _teacher(config: TeacherConfig, gen: np.random.Generator):
    """Sparse weights (every output keeps at least one input) and the labelled data set."""
    shape = (config.out_features, config.in_features)
    support = gen.random(shape) < config.density
    for row in np.flatnonzero(~support.any(axis=1)):  # an output with no input teaches nothing
        support[row, gen.integers(config.in_features)] = True
    values = gen.uniform(0.5, 1.5, size=shape) * gen.choice([-1.0, 1.0], size=shape)
    weight = np.where(support, values, 0.0)
    x = gen.standard_normal((config.samples, config.in_features))
    y = x @ weight.T + config.noise * gen.standard_normal((config.samples, config.out_features))
    return support, weight, x, y


def _scores(support: np.ndarray, kept: np.ndarray) -> dict:
    hits = int(np.count_nonzero(support & kept))
    return {"kept": int(kept.sum()), "true": int(support.sum()), "connections": int(support.size), "hits": hits,
            "precision": hits / int(kept.sum()) if kept.any() else None,  # undefined: nothing kept
            "recall": hits / int(support.sum())}


def planted_teacher(ste, seed: int = 0, config: TeacherConfig | None = None, replicate: int = 0) -> dict:
    """Train a dense masked student against a sparse teacher with SCL; score its connectivity.

    Parameters
    ----------
    ste : str or STE
        Estimator of the student's mask.
    seed : int
        Seeds the teacher, the data, the student's initial weights and the batch order;
        every estimator sees the same ones for the same seed.
    replicate : int
        Index of an independent problem under the same seed (a run's k-th teacher).
    config : TeacherConfig, optional
        The problem and the training settings (defaults: `TeacherConfig()`).

    Returns
    -------
    dict
        ``precision`` (None if nothing is kept), ``recall`` (of the final mask against
        the teacher's support), ``kept``, ``true`` (the teacher's count), ``connections``
        (of the layer), ``hits``; ``dead`` (teacher connections the student has off
        with g'(s) = 0), ``stuck_on`` (non-connections it has on with g'(s) = 0);
        ``on_time`` (mean over teacher connections of the fraction of the last epoch's
        steps they were on), ``flipping`` (teacher connections whose mask changed during
        the last epoch); ``final_loss`` (mean squared error on the training set); ``history``: per epoch
        the precision, recall, kept count and loss.
    """
    config = TeacherConfig() if config is None else config
    config.validate()
    est = ste_registry.get(ste)
    for name, value in (("seed", seed), ("replicate", replicate)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    alpha = getattr(est, "alpha", TrainConfig.ste_alpha)
    named = ste_registry.from_spec(est.name, alpha=alpha)
    if type(named) is not type(est) or vars(named) != vars(est):
        raise ValueError(f"planted_teacher trains through sclref.train, whose settings name an estimator by its "
                         f"registered name and alpha; {est!r} is not one of those")
    run = TrainConfig(
        model="linear", data="planted teacher", loss="mse", dtype="float64", ste=est.name, ste_alpha=alpha,
        lam=config.lam, lam_per="step", normalization=config.normalization, score_init=config.score_init,
        epochs=config.epochs, finetune_epochs=0, batch_size=config.batch_size, lr=config.lr,
        momentum=config.momentum, mask_lr=config.mask_lr,
        # One seed per (seed, replicate) pair: the student's initial weights and its batch order.
        seed=int(np.random.SeedSequence([seed, replicate]).generate_state(1)[0]))
    run.validate()
    support, _, x, y = _teacher(config, np.random.default_rng([seed, replicate, 3]))
    # The fields of a dataset that `Trainer` reads. The test split is the training set; the data is
    # regenerated from these settings, not loaded, so they are its fingerprint.
    identity = f"planted teacher {seed}/{replicate} {config}"
    planted = SimpleNamespace(name="planted teacher", x_train=x, y_train=y, x_test=x, y_test=y, in_shape=x.shape[1:],
                              num_classes=y.shape[1], fingerprint=lambda: identity)
    trainer = Trainer(run, planted, log=lambda line: None)
    (_, student), = masked_layers(trainer.model)
    on_steps = np.zeros(support.shape)  # last epoch: steps each connection was on, and its mask changes
    changes = np.zeros(support.shape, dtype=np.int64)
    previous = [student.mask()]

    def watch():
        mask = student.mask()
        on_steps[...] += mask
        changes[...] += mask != previous[0]
        previous[0] = mask

    history = []
    for epoch in range(config.epochs):
        record = trainer.run_epoch(watch if epoch == config.epochs - 1 else None)
        previous[0] = student.mask()
        history.append({**_scores(support, student.mask()), "loss": record["test_error"]})
    kept = student.mask()
    frozen = np.asarray(est.surrogate(student.score.data)) == 0
    return {
        "ste": est.name, "seed": seed, "replicate": replicate, **_scores(support, kept),
        "dead": int(np.count_nonzero(support & ~kept & frozen)),
        "stuck_on": int(np.count_nonzero(~support & kept & frozen)),
        "on_time": float(on_steps[support].mean() / trainer.steps_per_epoch),
        "flipping": int(np.count_nonzero(changes[support])),
        "final_loss": history[-1]["loss"], "history": history,
    }
