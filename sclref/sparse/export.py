"""Turn a masked (or plain) sclref model into a `SparseNetwork`: CSR weights from the
masks, then removal of dead units.

Connectivity is the mask, never the weight values: a kept weight that is exactly 0.0 is
still a connection and is stored. A unit (output feature of a linear layer, output
channel of a conv) is dead when no connection of the next weight layer reads it (no
outputs), or when it has no inputs: then it outputs its bias, a constant that the steps
up to the next weight layer (activations, max-pooling of a constant plane, flatten) keep
constant, so its contribution is folded into the next layer's bias. The fold is exact
for a linear next layer and for an unpadded conv (every output pixel sees the whole
window); for a padded conv it is exact only when the constant is 0 (the border sees
padding zeros), so such units stay otherwise. Removal repeats until nothing changes; the
network's input and output sizes never change.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sclref.data import check_preprocessing
from sclref.nn.layers import Conv2d, Dropout, Flatten, LeakyReLU, Linear, MaxPool2d, ReLU
from sclref.nn.masked import MaskedLayer
from sclref.sparse import network as net

__all__ = ["export", "export_run"]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


class _Weighted:
    """A weight layer while units are being removed: dense weight, mask, bias, unit ids."""

    def __init__(self, name, layer, dtype):
        w = np.asarray(layer.weight.data)
        self.mask = (layer.mask() if isinstance(layer, MaskedLayer) else np.ones(w.shape, bool)).reshape(w.shape[0], -1)
        self.weight = np.where(self.mask, w.reshape(w.shape[0], -1), 0).astype(dtype)
        self.bias = (np.zeros(w.shape[0], dtype) if layer.bias is None else np.asarray(layer.bias.data, dtype).copy())
        self.name, self.layer = name, layer
        self.units = np.arange(w.shape[0])

    def block(self, prev_units: int) -> int:
        """Columns of this layer per unit of the previous weight layer."""
        k = self.mask.shape[1]
        if isinstance(self.layer, Conv2d):
            taps = self.layer.kernel_size[0] * self.layer.kernel_size[1]
            if k != taps * prev_units:
                raise ValueError(f"export: {self.name} expects {k // taps} channels, "
                                 f"the layer before gives {prev_units}")
            return taps
        if prev_units == 0 and k == 0:  # every unit before was removed
            return 1
        if prev_units == 0 or k % prev_units:
            raise ValueError(f"export: {self.name} has {k} inputs, not a multiple of the {prev_units} units before it")
        return k // prev_units


def _steps(model):
    """(name, module) of the model's layers in order; a Sequential, or a single layer."""
    children = list(model._modules.items())
    return children if children else [("0", model)]


def _constant(value: np.ndarray, between: list) -> np.ndarray:
    """What the parameter-free steps `between` make of a unit's constant output `value`."""
    for step in between:
        if isinstance(step, ReLU):
            value = np.where(value > 0, value, value.dtype.type(0))
        elif isinstance(step, LeakyReLU):
            value = np.where(value > 0, value, value.dtype.type(step.alpha) * value)
        # max-pooling a constant plane and flattening leave the value unchanged
    return value


def _remove_dead(items: list) -> bool:
    """One pass of dead-unit removal over consecutive weight layers; True if anything went."""
    changed = False
    for cur, between, nxt in items:
        if nxt is None:
            continue
        f = cur.mask.shape[0]
        b = nxt.block(f)
        cols = nxt.mask.reshape(nxt.mask.shape[0], f, b)
        no_out = ~cols.any(axis=(0, 2))
        no_in = ~cur.mask.any(axis=1)
        const = _constant(cur.bias, between)
        padded = isinstance(nxt.layer, Conv2d) and any(_pair(nxt.layer.padding))
        foldable = (const == 0) | (not padded)
        remove = no_out | (no_in & foldable)
        fold = no_in & ~no_out & foldable & (const != 0)
        if not remove.any():
            continue
        if fold.any():
            w = nxt.weight.reshape(nxt.weight.shape[0], f, b)
            extra = (w[:, fold, :].astype(np.float64).sum(axis=2) @ const[fold].astype(np.float64))
            nxt.bias = (nxt.bias.astype(np.float64) + extra).astype(nxt.bias.dtype)
        keep = ~remove
        cur.weight, cur.mask, cur.bias, cur.units = cur.weight[keep], cur.mask[keep], cur.bias[keep], cur.units[keep]
        keep_cols = np.repeat(keep, b)
        nxt.weight, nxt.mask = nxt.weight[:, keep_cols], nxt.mask[:, keep_cols]
        changed = True
    return changed


def _csr(weight: np.ndarray, mask: np.ndarray) -> sp.csr_array:
    """Canonical CSR of the kept entries (row-major order: indices sorted within rows)."""
    f, k = mask.shape
    rows, cols = np.nonzero(mask)
    itype = np.int32 if max(k, rows.size) < 2**31 else np.int64
    indptr = np.zeros(f + 1, itype)
    np.cumsum(np.bincount(rows, minlength=f), out=indptr[1:])
    return sp.csr_array((weight[rows, cols], cols.astype(itype), indptr), shape=(f, k))


def export(model, input_shape=None, prune_dead: bool = True, dtype=None, source: dict | None = None,
           preprocessing: dict | None = None):
    """The sparse network equal to `model` in eval mode.

    Parameters
    ----------
    model : sclref.nn.Sequential (or a single layer)
        Masked or plain Linear / Conv2d layers, ReLU, LeakyReLU, MaxPool2d, Flatten and
        Dropout (dropped: identity in eval mode).
    input_shape : tuple of int, optional
        The per-sample input shape, recorded in the network.
    prune_dead : bool
        Remove units with no inputs or no outputs (default True).
    dtype : float32 or float64, optional
        The dtype of every array (default: the model's weight dtype).
    source : dict, optional
        Provenance stored with the network (JSON values).
    preprocessing : dict, optional
        How the model's inputs were standardized, ``{"pixel_max", "mean", "std"}``
        (``x = (x_raw / pixel_max - mean) / std``); None when unknown.

    Returns
    -------
    SparseNetwork
    """
    if preprocessing is not None:
        preprocessing = check_preprocessing(preprocessing)
    steps = _steps(model)
    weights = [m for _, m in steps if isinstance(m, (Linear, Conv2d))]
    if not weights:
        raise ValueError("export: the model has no Linear or Conv2d layer")
    dtype = np.dtype(dtype or weights[0].weight.data.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"export: dtype must be float32 or float64, got {dtype}")
    plan = []  # entries: a _Weighted or a parameter-free module, with its name
    for name, module in steps:
        if isinstance(module, (Linear, Conv2d)):
            plan.append((name, _Weighted(name, module, dtype)))
        elif isinstance(module, (ReLU, LeakyReLU, MaxPool2d, Flatten)):
            if isinstance(module, Flatten) and module.start_dim != 1:
                raise ValueError(f"export: {name}: only Flatten(start_dim=1) is supported")
            plan.append((name, module))
        elif not isinstance(module, Dropout):
            raise ValueError(f"export: cannot export layer {name!r} of type {type(module).__name__}")
    chain = [(i, entry) for i, (_, entry) in enumerate(plan) if isinstance(entry, _Weighted)]
    items = []
    for n, (i, cur) in enumerate(chain):
        nxt_i, nxt = chain[n + 1] if n + 1 < len(chain) else (len(plan), None)
        items.append((cur, [entry for _, entry in plan[i + 1:nxt_i]], nxt))
    if prune_dead:
        while _remove_dead(items):
            pass
    layers = [_to_layer(name, entry) for name, entry in plan]
    removed = {}
    for cur, _, _ in items:
        gone = np.setdiff1d(np.arange(cur.layer.weight.shape[0]), cur.units)
        if gone.size:
            removed[cur.name] = [int(u) for u in gone]
    return net.SparseNetwork(layers, dtype, None if input_shape is None else tuple(int(s) for s in input_shape),
                             removed, dict(source or {}), preprocessing)


def _to_layer(name, entry):
    if isinstance(entry, _Weighted):
        weight = _csr(entry.weight, entry.mask)
        if isinstance(entry.layer, Conv2d):
            kh, kw = entry.layer.kernel_size
            in_channels = entry.mask.shape[1] // (kh * kw)
            return net.Conv2d(name, weight, entry.bias, in_channels, (kh, kw), _pair(entry.layer.stride),
                              _pair(entry.layer.padding))
        return net.Linear(name, weight, entry.bias)
    if isinstance(entry, ReLU):
        return net.Activation(name, "relu")
    if isinstance(entry, LeakyReLU):
        return net.Activation(name, "leaky_relu", float(entry.alpha))
    if isinstance(entry, MaxPool2d):
        kernel = _pair(entry.kernel_size)
        return net.MaxPool2d(name, kernel, kernel if entry.stride is None else _pair(entry.stride))
    return net.Flatten(name)


def export_run(run_dir, prune_dead: bool = True):
    """Export the final model of a training run directory (its ``model.npz``), with its input preprocessing.

    A model file of an older run records no preprocessing: the network's is then None.
    """
    from sclref._version import __version__
    from sclref.runs import load_model

    model, saved = load_model(run_dir)
    source = {"run_dir": str(run_dir), "sclref": __version__, "config": saved["config"],
              "num_classes": int(saved["num_classes"])}
    preprocessing = saved.get("preprocessing")
    if preprocessing is not None:
        preprocessing = check_preprocessing(preprocessing, f"{run_dir}: the model file's preprocessing")
    return export(model, saved["in_shape"], prune_dead, source=source, preprocessing=preprocessing)
