"""Magnitude pruning, the classic baseline SCL is measured against (Han et al. 2015).

`magnitude_prune` sets the masks of a masked network to keep its largest-|θ| weights:
per layer, at given per-layer sparsities (the default comparison: the sparsity each layer
reached under SCL), or under one global threshold over all layers. The whole baseline,
magnitude pruning + retraining, is a run of `sclref.train` whose config names a
`prune_scope`: θ trains with every mask on for ``epochs`` (where SCL learns its masks),
the network is pruned once, then θ retrains with the masks frozen for
``finetune_epochs`` (where SCL fine-tunes), continuing the same optimizer state and data
order. Han et al. prune iteratively; this is the one-shot variant, which the same budget
allows.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from sclref.errors import InputError
from sclref.scl import masked_layers

SCOPES = ("layer", "global")


def _largest(magnitudes: np.ndarray, keep: int) -> np.ndarray:
    """Bool mask of the `keep` largest entries; ties go to the earlier index, so the count is exact."""
    mask = np.zeros(magnitudes.size, dtype=bool)
    mask[np.argsort(-magnitudes.ravel(), kind="stable")[:keep]] = True
    return mask.reshape(magnitudes.shape)


def _fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and 0 <= value < 1):
        raise InputError(f"{what} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def check_sparsity(sparsity, scope: str, names=None) -> dict[str, float] | float:
    """Validate a pruning request before any training: a fraction, or (per layer) a dict of them.

    With `names` (the masked layers' names) a dict must name exactly those layers.
    Returns the fractions (a dict by name where the request was a dict).
    """
    if scope not in SCOPES:
        raise InputError(f"unknown pruning scope {scope!r}; choose from {SCOPES}")
    if isinstance(sparsity, dict):
        if scope == "global":
            raise InputError("a global threshold takes one overall sparsity, not a per-layer dict")
        if names is not None and set(sparsity) != set(names):
            raise InputError(f"per-layer sparsity must name exactly the masked layers {list(names)}, "
                             f"got {sorted(sparsity)}")
        return {name: _fraction(value, f"sparsity of {name}") for name, value in sparsity.items()}
    return _fraction(sparsity, "sparsity")


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
    layers = masked_layers(model)
    if not layers:
        raise InputError("magnitude_prune: the model has no masked layers (build it with masked=True)")
    names = [name for name, _ in layers]
    checked = check_sparsity(sparsity, scope, names)
    fractions = checked if isinstance(checked, dict) else dict.fromkeys(names, checked)
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
