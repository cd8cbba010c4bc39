"""Turn a masked (or plain) sclref model into a `SparseNetwork`: batch norms folded into
the layers before them, CSR weights from the masks, residual blocks, then removal of dead
units.

A batch norm in eval mode is an affine map per channel, folded exactly (in float64) into
the conv or linear layer before it: w' = w * g / sqrt(var + eps) row by row and
b' = (b - mean) * g / sqrt(var + eps) + beta. Scaling a row keeps its zeros, so the mask
stays the mask. A ResNet block (``conv1, bn1, conv2, bn2, downsample`` as in
`sclref.models.BasicBlock`) becomes a residual block whose body is conv1, ReLU, conv2 and
whose shortcut is empty (identity), a subsample-and-pad step (option A) or the 1x1 conv
(option B), followed by a ReLU.

Connectivity is the mask, never the weight values: a kept weight that is exactly 0.0 is
still a connection and is stored. A unit (output feature of a linear layer, output
channel of a conv) is dead when no connection of the next weight layer reads it (no
outputs), or when it has no inputs: then it outputs its bias, a constant that the steps
up to the next weight layer (activations, max-pooling of a constant plane, flatten) keep
constant, so its contribution is folded into the next layer's bias. The fold is exact
for a linear next layer and for an unpadded conv (every output pixel sees the whole
window); for a padded conv it is exact only when the constant is 0 (the border sees
padding zeros), so such units stay otherwise. Removal repeats until nothing changes; the
network's input and output sizes never change. A unit whose output reaches a residual
add (the last weight layer of a block's body or shortcut, a weight layer whose output
enters a block) is never removed: the add needs every channel in its place.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

from sclref.data import check_preprocessing
from sclref.nn.layers import Conv2d, Dropout, Flatten, GlobalAvgPool2d, LeakyReLU, Linear, MaxPool2d, ReLU, Sequential
from sclref.nn.masked import MaskedLayer
from sclref.nn.norm import BatchNorm1d, BatchNorm2d
from sclref.sparse import network as net

__all__ = ["export", "export_run"]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


# Steps without parameters that map a constant unit output to a constant (see `_constant`).
_PLAIN = (ReLU, LeakyReLU, MaxPool2d, Flatten, GlobalAvgPool2d)


def _fold(norm, name: str, features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, running mean, shift) in float64 of batch norm `norm` in eval mode, after layer `name`."""
    if norm.running_mean is None:
        raise ValueError(f"export: the batch norm after {name!r} keeps no running statistics "
                         f"(track_running_stats=False), so eval mode uses each batch's own: it cannot be folded")
    if norm.num_features != features:
        raise ValueError(f"export: the batch norm after {name!r} has {norm.num_features} channels, "
                         f"the layer {features} outputs")
    gamma = np.ones(features) if norm.weight is None else np.asarray(norm.weight.data, np.float64)
    beta = np.zeros(features) if norm.bias is None else np.asarray(norm.bias.data, np.float64)
    scale = gamma / np.sqrt(np.asarray(norm.running_var, np.float64) + norm.eps)
    return scale, np.asarray(norm.running_mean, np.float64), beta


class _Weighted:
    """A weight layer while units are being removed: dense weight, mask, bias, unit ids.

    `norm`, a batch norm that follows the layer, is folded into the weight and bias.
    """

    def __init__(self, name, layer, dtype, norm=None):
        w = np.asarray(layer.weight.data, np.float64)
        f = w.shape[0]
        self.mask = (layer.mask() if isinstance(layer, MaskedLayer) else np.ones(w.shape, bool)).reshape(f, -1)
        w = np.where(self.mask, w.reshape(f, -1), 0.0)
        b = np.zeros(f) if layer.bias is None else np.asarray(layer.bias.data, np.float64)
        if norm is not None:
            scale, mean, beta = _fold(norm, name, f)
            w, b = w * scale[:, None], (b - mean) * scale + beta
        self.weight, self.bias = w.astype(dtype), b.astype(dtype)
        self.name, self.layer = name, layer
        self.units = np.arange(f)

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


def _is_block(module) -> bool:
    """A residual block of the CIFAR ResNets (`sclref.models.BasicBlock`), known by its parts."""
    return all(hasattr(module, part) for part in ("conv1", "bn1", "conv2", "bn2", "downsample"))


def _is_zero_pad(module) -> bool:
    """An option-A shortcut (`sclref.models.ZeroPadShortcut`): no parameters, channels in and out, a stride."""
    return (not isinstance(module, (Linear, Conv2d)) and not module._modules
            and next(iter(module.parameters()), None) is None
            and all(isinstance(getattr(module, a, None), numbers.Integral) for a in ("in_channels", "out_channels",
                                                                                      "stride")))


def _open(name: str, module) -> list:
    """(dotted name, module) of the steps of `module`, nested Sequentials opened."""
    if not isinstance(module, Sequential):
        return [(name, module)]
    return [step for key, child in module._modules.items() for step in _open(f"{name}.{key}" if name else key, child)]


def _steps(model):
    """(name, module) of the model's layers in order; a Sequential (nested ones opened), a block, or a layer."""
    if isinstance(model, Sequential):
        return _open("", model)
    children = list(model._modules.items())
    return children if children and not _is_block(model) else [("0", model)]


class _Block:
    """A residual block while units are being removed: the plans of its body and its shortcut."""

    def __init__(self, body: list, shortcut: list):
        self.body, self.shortcut = body, shortcut


def _plan(steps: list, dtype) -> list:
    """(name, entry) per exported layer: a `_Weighted` (batch norm folded), a `_Block`, a parameter-free
    module, or a `net.SubsamplePad`."""
    plan, i = [], 0
    while i < len(steps):
        name, module = steps[i]
        if isinstance(module, (Linear, Conv2d)):
            norm = None
            if i + 1 < len(steps) and isinstance(steps[i + 1][1], (BatchNorm1d, BatchNorm2d)):
                i += 1
                norm = steps[i][1]
            plan.append((name, _Weighted(name, module, dtype, norm)))
        elif isinstance(module, (BatchNorm1d, BatchNorm2d)):
            raise ValueError(f"export: batch norm {name!r} does not follow a Linear or Conv2d layer, "
                             f"so it cannot be folded into one")
        elif _is_block(module):
            plan.append((name, _block(name, module, dtype)))
            plan.append((f"{name}.relu", ReLU()))
        elif _is_zero_pad(module):
            extra = module.out_channels - module.in_channels  # split as ZeroPadShortcut does: the odd one after
            stride = (module.stride, module.stride)
            plan.append((name, net.SubsamplePad(name, stride, (extra // 2, extra - extra // 2))))
        elif isinstance(module, _PLAIN):
            if isinstance(module, Flatten) and module.start_dim != 1:
                raise ValueError(f"export: {name}: only Flatten(start_dim=1) is supported")
            plan.append((name, module))
        elif not isinstance(module, Dropout):
            raise ValueError(f"export: cannot export layer {name!r} of type {type(module).__name__}")
        i += 1
    return plan


def _block(name: str, block, dtype) -> _Block:
    body = _plan([(f"{name}.conv1", block.conv1), (f"{name}.bn1", block.bn1), (f"{name}.relu1", ReLU()),
                  (f"{name}.conv2", block.conv2), (f"{name}.bn2", block.bn2)], dtype)
    shortcut = [] if block.downsample is None else _plan(_open(f"{name}.downsample", block.downsample), dtype)
    return _Block(body, shortcut)


def _pairs(plan: list, items: list) -> None:
    """Append (weight layer, steps after it, next weight layer or None) for every weight layer in `plan`.

    The next layer is None when the output does not reach a weight layer through
    parameter-free steps alone: at the end, before a residual block, at a subsampling
    step. Blocks' bodies and shortcuts are paired on their own.
    """
    cur, between = None, []
    for _, entry in plan:
        if isinstance(entry, _Weighted):
            if cur is not None:
                items.append((cur, between, entry))
            cur, between = entry, []
        elif isinstance(entry, _PLAIN):
            between.append(entry)
        else:
            if cur is not None:
                items.append((cur, between, None))
            cur, between = None, []
            if isinstance(entry, _Block):
                _pairs(entry.body, items)
                _pairs(entry.shortcut, items)
    if cur is not None:
        items.append((cur, between, None))


def _constant(value: np.ndarray, between: list) -> np.ndarray:
    """What the parameter-free steps `between` make of a unit's constant output `value`."""
    for step in between:
        if isinstance(step, ReLU):
            value = np.where(value > 0, value, value.dtype.type(0))
        elif isinstance(step, LeakyReLU):
            value = np.where(value > 0, value, value.dtype.type(step.alpha) * value)
        # pooling a constant plane and flattening leave the value unchanged
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

    The model may also hold nested Sequentials (their layers are named ``outer.inner``),
    BatchNorm1d/2d right after a Linear or Conv2d (folded into it, with the running
    statistics), GlobalAvgPool2d, and the residual blocks of `sclref.models.resnet`.

    Returns
    -------
    SparseNetwork
    """
    if preprocessing is not None:
        preprocessing = check_preprocessing(preprocessing)
    weights = [m for m in model.modules() if isinstance(m, (Linear, Conv2d))]
    if not weights:
        raise ValueError("export: the model has no Linear or Conv2d layer")
    dtype = np.dtype(dtype or weights[0].weight.data.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"export: dtype must be float32 or float64, got {dtype}")
    plan = _plan(_steps(model), dtype)
    items = []
    _pairs(plan, items)
    if prune_dead:
        while _remove_dead(items):
            pass
    layers = _to_layers(plan)
    removed = {}
    for cur, _, _ in items:
        gone = np.setdiff1d(np.arange(cur.layer.weight.shape[0]), cur.units)
        if gone.size:
            removed[cur.name] = [int(u) for u in gone]
    return net.SparseNetwork(layers, dtype, None if input_shape is None else tuple(int(s) for s in input_shape),
                             removed, dict(source or {}), preprocessing)


def _to_layers(plan: list) -> list:
    return [_to_layer(name, entry) for name, entry in plan]


def _to_layer(name, entry):
    if isinstance(entry, _Block):
        return net.Residual(name, _to_layers(entry.body), _to_layers(entry.shortcut))
    if isinstance(entry, net.SubsamplePad):
        return entry
    if isinstance(entry, GlobalAvgPool2d):
        return net.GlobalAvgPool2d(name)
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
