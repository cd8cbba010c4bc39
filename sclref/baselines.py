"""The classic baseline SCL is measured against: magnitude pruning with retraining (Han et al. 2015).

`magnitude_prune` sets the masks of a masked network to keep its largest-|θ| weights:
per layer, at given per-layer sparsities (the default comparison: the sparsity each layer
reached under SCL), or under one global threshold over all layers. `prune_and_retrain`
is the whole baseline on the same epoch budget as an SCL run of the same `TrainConfig`:
train the plain dense network for ``config.epochs`` epochs (where SCL learns its masks),
prune once, then retrain θ with the masks frozen for ``config.finetune_epochs`` epochs
(where SCL fine-tunes). Han et al. prune iteratively; this is the one-shot variant, which
the same budget allows. The retraining continues the dense phase's optimizer state and
data order, just as SCL's fine-tuning continues its mask phase.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time

import numpy as np

from sclref.scl import layer_report, masked_layers
from sclref.train import RunResult, TrainConfig, Trainer

SCOPES = ("layer", "global")


def _largest(magnitudes: np.ndarray, keep: int) -> np.ndarray:
    """Bool mask of the `keep` largest entries; ties go to the earlier index, so the count is exact."""
    mask = np.zeros(magnitudes.size, dtype=bool)
    mask[np.argsort(-magnitudes.ravel(), kind="stable")[:keep]] = True
    return mask.reshape(magnitudes.shape)


def _fraction(value, what: str) -> float:
    if not isinstance(value, numbers.Real) or not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"{what} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def magnitude_prune(model, sparsity, scope: str = "layer") -> dict[str, int]:
    """Mask every masked layer of `model` down to its largest-|θ| weights; return the kept count per layer.

    Parameters
    ----------
    model : Module
        A network with masked layers (`sclref.nn.masked`); their scores are overwritten
        (+1 kept, -1 pruned) and every other parameter is left as it is.
    sparsity : float or dict
        Fraction of connections to remove, in [0, 1). With ``scope="layer"`` a float
        applies to every layer and a dict maps each masked layer's name to its own
        fraction; layer *i* then keeps exactly ``n_i - round(sparsity_i * n_i)`` weights.
        With ``scope="global"`` it is one float: the network keeps exactly
        ``N - round(sparsity * N)`` weights, the largest |θ| over all layers together.
    scope : {"layer", "global"}
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose from {SCOPES}")
    layers = masked_layers(model)
    if not layers:
        raise ValueError("magnitude_prune: the model has no masked layers (build it with masked=True)")
    names = [name for name, _ in layers]
    if isinstance(sparsity, dict):
        if scope == "global":
            raise ValueError("a global threshold takes one overall sparsity, not a per-layer dict")
        if set(sparsity) != set(names):
            raise ValueError(f"per-layer sparsity must name exactly the masked layers {names}, got {sorted(sparsity)}")
        fractions = {name: _fraction(sparsity[name], f"sparsity of {name}") for name in names}
    else:
        fractions = dict.fromkeys(names, _fraction(sparsity, "sparsity"))
    if scope == "layer":
        masks = {name: _largest(np.abs(layer.weight.data), layer.num_weights - round(fractions[name] *
                                                                                      layer.num_weights))
                 for name, layer in layers}
    else:
        magnitudes = np.concatenate([np.abs(layer.weight.data).ravel() for _, layer in layers])
        flat = _largest(magnitudes, magnitudes.size - round(fractions[names[0]] * magnitudes.size))
        bounds = np.cumsum([0] + [layer.num_weights for _, layer in layers])
        masks = {name: flat[bounds[i]:bounds[i + 1]].reshape(layer.weight.shape)
                 for i, (name, layer) in enumerate(layers)}
    for name, layer in layers:
        one = layer.score.dtype.type(1)
        layer.score.data[...] = np.where(masks[name], one, -one)
    return {name: int(np.count_nonzero(mask)) for name, mask in masks.items()}


def prune_and_retrain(config: TrainConfig, dataset, sparsity, scope: str = "layer", log=None) -> RunResult:
    """Magnitude pruning + retraining on the epoch budget of `config` (see the module docstring).

    ``config.epochs`` dense epochs, one pruning step to `sparsity` (as in `magnitude_prune`),
    then ``config.finetune_epochs`` epochs of θ with frozen masks. The settings of the
    mask variables (λ, STE, normalization) play no part. The history holds one record per
    epoch in the format of `Trainer.run_epoch` (phase "train", then "finetune"); the
    returned result's `layers` is the final per-layer table.
    """
    config.validate()
    # Checked before the dense phase, not after it.
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose from {SCOPES}")
    if config.finetune_epochs < 1:
        raise ValueError("magnitude pruning + retraining needs finetune_epochs >= 1 (the retraining epochs)")
    dense = Trainer(dataclasses.replace(config, masked=False, target_sparsity=None), dataset)
    for _ in range(config.epochs):
        record = dense.run_epoch()
        if log is not None:
            log(f"magnitude: dense epoch {record['epoch']}/{config.total_epochs} "
                f"test err {100 * record['test_error']:.2f}%")
    sparse = Trainer(dataclasses.replace(config, masked=True, target_sparsity=None), dataset)
    # The masked twin has the same θ parameters in the same order, plus one score per layer.
    sparse.model.load_state_dict(dense.model.state_dict(), strict=False)
    t0 = time.perf_counter()
    kept = magnitude_prune(sparse.model, sparsity, scope)
    prune_seconds = time.perf_counter() - t0
    sparse.opt_w.load_state_dict(dense.opt_w.state_dict())
    sparse.order_rng.bit_generator.state = dense.order_rng.bit_generator.state
    sparse.epoch, sparse.history = dense.epoch, list(dense.history)  # epoch >= config.epochs: fine-tune only
    sparse.epoch_seconds = list(dense.epoch_seconds)
    for _, layer in masked_layers(sparse.model):
        layer.freeze_mask()
    if log is not None:
        log(f"magnitude: pruned to {sum(kept.values()):,} connections ({prune_seconds:.2f}s)")
    while sparse.epoch < config.total_epochs:
        record = sparse.run_epoch()
        if log is not None:
            log(f"magnitude: retrain epoch {record['epoch']}/{config.total_epochs} "
                f"test err {100 * record['test_error']:.2f}%  sparsity {100 * record['sparsity']:.2f}%")
    return RunResult(config, sparse.model, sparse.history, layer_report(sparse.model),
                     epoch_seconds=sparse.epoch_seconds)
