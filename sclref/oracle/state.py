"""A model's state in and out of other frameworks' conventions: the names and array layouts of PyTorch and Flax.

sclref's own layouts are PyTorch's: a dense weight is ``[out, in]``, a conv weight
``[out, in, kh, kw]``, and a parameter's name is its dotted module path
(``fc1.weight``, ``conv2.score``), so ``layout="torch"`` and ``layout="sclref"`` read
and write the same arrays under the same names. Flax stores a Dense kernel ``[in, out]``
and a Conv kernel ``[kh, kw, in, out]``, names parameters ``params/Dense_0/kernel``
(batch norm: ``params/BatchNorm_0/scale``, ``batch_stats/BatchNorm_0/mean``) and feeds
a dense layer after a conv stack the NHWC feature map flattened in (h, w, c) order, so
that layer's kernel rows are permuted as well. A mask variable (score) is laid out like
its layer's weight and named ``score`` beside it.

A name map adapts any other naming: a mapping from the user's names to sclref's dotted
names (or to the layout's default names), or a callable doing the same (returning None
leaves a name as it is). Every problem of a given state (missing or extra names,
shapes, dtypes, a kernel given in the other layout, non-finite values) is reported at
once in one `sclref.errors.InputError` that lists what was expected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sclref import nn
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError

__all__ = ["LAYOUTS", "Slot", "StateLayout", "as_array", "default_names", "export_state", "flatten_names",
           "load_state"]

LAYOUTS = ("torch", "flax", "sclref")
# Flax's automatic module names: the class name and a counter per class.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_FLAX_MODULE = {"dense": "Dense", "conv": "Conv", "norm": "BatchNorm"}
_FLAX_PARAM = {"weight": ("params", "kernel"), "bias": ("params", "bias"), "score": ("params", "score"),
               "norm.weight": ("params", "scale"), "norm.bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_DESCRIBE = {("torch", "dense"): "a PyTorch Linear weight [out, in]",
             ("torch", "conv"): "a PyTorch Conv2d weight [out, in, kh, kw]",
             ("flax", "dense"): "a Flax Dense kernel [in, out]",
             ("flax", "conv"): "a Flax Conv kernel [kh, kw, in, out]"}


def _shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


@dataclass(frozen=True)
class Slot:
    """One parameter or buffer of a model as one layout stores it.

    Attributes
    ----------
    name : str
        sclref's dotted name (``fc1.weight``).
    kind : {"dense", "conv", "vector", "counter", "other"}
        What decides its layout: a dense or conv weight (or score), a per-feature vector
        (bias, batch-norm parameter or statistic), an integer counter, anything else.
    shape : tuple of int
        Its shape in sclref.
    layout : str
        The layout this slot describes.
    layout_shape : tuple of int
        Its shape in `layout`.
    default_name : str or None
        Its name in `layout` when no name map says otherwise; None when the layout does
        not store it (Flax keeps no batch counter).
    optional : bool
        Whether a state may leave it out (the model keeps its current value).
    chw : tuple of int or None
        For a dense layer fed a flattened (C, H, W) map: that shape (Flax flattens HWC).
    dtype : numpy.dtype
        The dtype the model holds it in.
    """

    name: str
    kind: str
    shape: tuple
    layout: str
    layout_shape: tuple
    default_name: str | None
    optional: bool
    chw: tuple | None
    dtype: np.dtype

    def to_sclref(self, a: np.ndarray) -> np.ndarray:
        """`a` (in this slot's layout) in sclref's layout, as a new contiguous array."""
        if self.layout == "flax" and self.kind == "dense":
            if self.chw is not None:
                c, h, w = self.chw
                a = a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(self.shape)
            else:
                a = a.T
        elif self.layout == "flax" and self.kind == "conv":
            a = a.transpose(3, 2, 0, 1)
        return np.array(a, order="C")  # a new array; 0-d stays 0-d

    def to_layout(self, a: np.ndarray) -> np.ndarray:
        """`a` (in sclref's layout) in this slot's layout, as a new contiguous array."""
        if self.layout == "flax" and self.kind == "dense":
            if self.chw is not None:
                c, h, w = self.chw
                a = a.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(self.layout_shape)
            else:
                a = a.T
        elif self.layout == "flax" and self.kind == "conv":
            a = a.transpose(2, 3, 1, 0)
        return np.array(a, copy=True, order="C")


def _layout_shape(layout: str, kind: str, shape: tuple) -> tuple:
    if layout == "flax" and kind == "dense":
        return shape[::-1]
    if layout == "flax" and kind == "conv":
        return (shape[2], shape[3], shape[1], shape[0])
    return shape


def flatten_names(mapping, sep: str = "/", what: str = "state") -> "OrderedDict[str, object]":
    """A nested mapping (Flax's ``{"params": {"Dense_0": {...}}}``) as one level with `sep`-joined names.

    Values that are mappings are descended into; anything else is a leaf. Keys must be
    strings. Raises `InputError` naming the first key that is not.
    """
    if not isinstance(mapping, Mapping):
        raise InputError(f"{what}: expected a mapping of names to arrays, got a {type(mapping).__name__}")
    out: OrderedDict = OrderedDict()
    stack = [("", mapping, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        if depth > 64:
            raise InputError(f"{what}: names nested more than 64 levels deep under {prefix!r}")
        items = list(node.items())
        for key, value in reversed(items):
            if not isinstance(key, str):
                raise InputError(f"{what}: names must be strings, got {key!r} under {prefix or 'the top level'!r}")
            name = f"{prefix}{sep}{key}" if prefix else key
            if isinstance(value, Mapping):
                stack.append((name, value, depth + 1))
            else:
                out[name] = value
    # The stack walks the tree backwards; give the names back in the mapping's own order.
    return OrderedDict(reversed(list(out.items())))


def as_array(value, what: str) -> np.ndarray:
    """`value` (NumPy, a torch tensor, a JAX array, nested lists, a number) as an ndarray; InputError otherwise."""
    if isinstance(value, Tensor):
        value = value.data
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, possibly requiring grad
        try:
            value = value.detach().cpu().numpy()
        except Exception as err:  # noqa: BLE001 - whatever torch says, the value is refused
            raise InputError(f"{what}: cannot read the tensor ({type(err).__name__}: {err})") from None
    try:
        arr = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - ragged lists, foreign objects: all refused alike
        raise InputError(f"{what}: not an array ({type(err).__name__}: {err})") from None
    if arr.dtype.hasobject:
        raise InputError(f"{what}: not an array of numbers (dtype {arr.dtype})")
    return arr


def _entries(model) -> list[tuple[str, np.ndarray]]:
    """(dotted name, array) of every parameter and buffer, parameters first, in model order."""
    return [(n, p.data) for n, p in model.named_parameters()] + list(model.named_buffers())


def sequential_leaves(model: nn.Sequential, prefix: str = ""):
    """(dotted name, module) in the order a Sequential applies them, nested Sequentials opened up."""
    for name, child in model.named_modules():
        if not name or "." in name:  # direct children only, in order
            continue
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from sequential_leaves(child, f"{full}.")
        else:
            yield full, child


def default_names(model: nn.Module, layout: str) -> dict[str, str | None]:
    """sclref name -> the name `layout` gives it by default (None: the layout does not store it).

    torch and sclref: the dotted name itself. flax: ``collection/Module_i/leaf`` with
    modules numbered per class in model order, as Flax names the submodules of a compact
    module.
    """
    entries = _entries(model)
    if layout != "flax":
        return {name: name for name, _ in entries}
    modules = dict(model.named_modules())
    owners = {name.rpartition(".")[0] for name, _ in entries}
    counters: dict[str, int] = {}
    labels: dict[str, str] = {}
    for mod_name, mod in modules.items():
        if mod_name in owners:
            kind = ("dense" if isinstance(mod, nn.Linear) else "conv" if isinstance(mod, nn.Conv2d)
                    else "norm" if isinstance(mod, _BATCH_NORMS) else None)
            label = _FLAX_MODULE.get(kind, type(mod).__name__)
            labels[mod_name] = f"{label}_{counters.get(label, 0)}"
            counters[label] = counters.get(label, 0) + 1
    out = {}
    for name, _ in entries:
        mod_name, _, attr = name.rpartition(".")
        mod = modules[mod_name]
        key = f"norm.{attr}" if isinstance(mod, _BATCH_NORMS) and attr in ("weight", "bias") else attr
        if key == "num_batches_tracked":
            out[name] = None
            continue
        collection, leaf = _FLAX_PARAM.get(key, ("params", attr))
        out[name] = f"{collection}/{labels[mod_name]}/{leaf}"
    return out


class StateLayout:
    """How one model's parameters and buffers are named and laid out in one convention.

    Parameters
    ----------
    model : sclref.nn.Module
        The model whose state is described.
    layout : {"torch", "flax", "sclref"}
        The convention of the arrays handed in or out.
    names : mapping or callable, optional
        The user's name -> a sclref dotted name or the layout's default name. A callable
        may return None to leave a name as it is.
    in_shape : tuple of int, optional
        Per-sample input shape (C, H, W) in sclref's layout. Needed with ``layout="flax"``
        for a model with a `Flatten`, to find the (C, H, W) map a dense layer is fed.

    Raises
    ------
    InputError
        For an unknown layout, a name map of another type, or a missing `in_shape`.
    """

    def __init__(self, model: nn.Module, layout: str = "torch", names=None, in_shape=None):
        if layout not in LAYOUTS:
            raise InputError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        if names is not None and not (isinstance(names, Mapping) or callable(names)):
            raise InputError(f"names must be a mapping (their name -> sclref name) or a callable, "
                             f"got a {type(names).__name__}")
        if isinstance(names, Mapping):
            bad = [k for k, v in names.items() if not (isinstance(k, str) and isinstance(v, str))]
            if bad:
                raise InputError(f"names: a name map holds strings only; not {bad[0]!r} -> {names[bad[0]]!r}")
        self.model, self.layout, self.names = model, layout, names
        chw = self._flattened_inputs(model, in_shape) if layout == "flax" else {}
        self.slots: OrderedDict[str, Slot] = OrderedDict()
        modules = dict(model.named_modules())
        defaults = default_names(model, layout)
        for name, value in _entries(model):
            mod_name, _, attr = name.rpartition(".")
            mod = modules[mod_name]
            kind = self._param_kind(mod, attr, value)
            default = defaults[name]
            self.slots[name] = Slot(
                name=name, kind=kind, shape=tuple(value.shape), layout=layout,
                layout_shape=_layout_shape(layout, kind, tuple(value.shape)), default_name=default,
                # A batch counter only matters for a cumulative running average; Flax has none.
                optional=kind == "counter", chw=chw.get(mod_name) if kind == "dense" else None,
                dtype=value.dtype)
        self._by_default = {s.default_name: s.name for s in self.slots.values() if s.default_name is not None}

    # -- what the model holds --------------------------------------------------------------
    @staticmethod
    def _param_kind(mod, attr: str, value: np.ndarray) -> str:
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and attr in ("weight", "score"):
            return "dense" if isinstance(mod, nn.Linear) else "conv"
        if np.issubdtype(value.dtype, np.integer):
            return "counter"
        if value.ndim == 1:
            return "vector"
        return "other"

    @staticmethod
    def _flattened_inputs(model, in_shape) -> dict[str, tuple]:
        """Dense layers of a Sequential fed a flattened (C, H, W) map: layer name -> (C, H, W)."""
        has_flatten = any(isinstance(m, nn.Flatten) for m in model.modules())
        if not has_flatten or not isinstance(model, nn.Sequential):
            return {}
        if in_shape is None:
            raise InputError("layout 'flax' needs in_shape (the per-sample input shape, e.g. (1, 28, 28)) for a "
                             "model with a Flatten: Flax flattens feature maps in (h, w, c) order")
        try:
            in_shape = tuple(int(d) for d in in_shape)
        except (TypeError, ValueError):
            raise InputError(f"in_shape must be a tuple of integers, got {in_shape!r}") from None
        if any(d < 1 for d in in_shape) or math.prod(in_shape) > 1 << 26:
            raise InputError(f"in_shape {in_shape} is not a plausible per-sample input shape")
        dtype = next(iter(model.parameters())).dtype
        x = Tensor(np.zeros((1, *in_shape), dtype=dtype))
        found, pending = {}, None
        was_training = model.training
        model.eval()  # no running statistics are updated by this probe
        try:
            with no_grad():
                for child_name, child in sequential_leaves(model):
                    if isinstance(child, nn.Flatten) and x.ndim == 4:
                        pending = tuple(x.shape[1:])
                    elif isinstance(child, nn.Linear) and pending is not None:
                        found[child_name], pending = pending, None
                    x = child(x)
        except (ValueError, TypeError) as err:
            raise InputError(f"in_shape {in_shape} does not fit the model: {err}") from None
        finally:
            model.train(was_training)
        return found

    # -- names -------------------------------------------------------------------------------
    def resolve(self, their: str) -> str | None:
        """sclref's dotted name for the user's name `their`, or None when the model has no such entry."""
        target = their
        if isinstance(self.names, Mapping):
            target = self.names.get(their, their)
        elif self.names is not None:
            try:
                mapped = self.names(their)
            except Exception as err:  # noqa: BLE001 - the user's function failed on this name
                raise InputError(f"the name map failed on {their!r}: {type(err).__name__}: {err}") from None
            if mapped is not None and not isinstance(mapped, str):
                raise InputError(f"the name map returned {mapped!r} for {their!r}; expected a string or None")
            target = their if mapped is None else mapped
        if target in self.slots:
            return target
        return self._by_default.get(target)

    def their_name(self, name: str) -> str:
        """The user's name for sclref's entry `name` (from a mapping name map, else the layout's default)."""
        slot = self.slots[name]
        if isinstance(self.names, Mapping):
            for theirs, target in self.names.items():
                if target == name or (slot.default_name is not None and target == slot.default_name):
                    return theirs
        return slot.default_name if slot.default_name is not None else name

    def expected(self) -> list[tuple[str, tuple]]:
        """(name, shape) of every entry a state in this layout holds, in model order."""
        return [(self.their_name(s.name), s.layout_shape) for s in self.slots.values() if self.stores(s.name)]

    def stores(self, name: str) -> bool:
        """Whether this layout (with its name map) holds sclref's entry `name` (Flax keeps no batch counter)."""
        return self.slots[name].default_name is not None or self._mapped(name)

    def _mapped(self, name: str) -> bool:
        """Whether a mapping name map names sclref's entry `name` (directly or by its default name)."""
        if not isinstance(self.names, Mapping):
            return False
        default = self.slots[name].default_name
        return any(t == name or (default is not None and t == default) for t in self.names.values())

    def _expected_text(self) -> str:
        return "expected (name, shape): " + ", ".join(f"{n} {_shape(s)}" for n, s in self.expected())

    def shape_hint(self, slot: Slot, shape: tuple) -> str:
        """Why `shape` may be wrong for `slot`: the shape another layout gives it, if it is that one."""
        for other in ("torch", "flax"):
            if other == slot.layout or (other == "torch" and slot.layout == "sclref"):
                continue
            if _layout_shape(other, slot.kind, slot.shape) == shape and (other, slot.kind) in _DESCRIBE:
                return (f": looks like {_DESCRIBE[(other, slot.kind)]}, the {other!r} layout; "
                        f"pass layout={other!r}")
        if len(shape) == len(slot.layout_shape) and sorted(shape) == sorted(slot.layout_shape):
            return ": the same sizes in another order (a transposed layout?)"
        return ""

    # -- arrays in ---------------------------------------------------------------------------
    def check_value(self, slot: Slot, value, their: str) -> tuple[np.ndarray | None, str | None]:
        """`value` checked against `slot` (shape in this layout, dtype, finiteness): (array, None) or (None, why)."""
        try:
            arr = as_array(value, repr(their))
        except InputError as err:
            return None, str(err)
        if slot.kind == "counter":
            if arr.dtype.kind not in "iuf" or arr.shape != slot.layout_shape:
                return None, (f"{their!r}: {arr.dtype} {_shape(arr.shape)} given, an integer "
                              f"{_shape(slot.layout_shape)} expected")
            if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) and arr.min() >= 0
                                 and arr.max() < 2**62):
                return None, f"{their!r}: a counter must hold whole numbers >= 0"
            return arr, None
        if arr.dtype.kind != "f":
            return None, (f"{their!r}: dtype {arr.dtype} given, floating point expected "
                          f"(float16, float32 or float64)")
        if arr.shape != slot.layout_shape:
            return None, (f"{their!r}: shape {_shape(arr.shape)} given, {_shape(slot.layout_shape)} expected"
                          + self.shape_hint(slot, arr.shape))
        if not np.all(np.isfinite(arr)):
            return None, f"{their!r}: holds NaN or infinite values"
        return arr, None

    def to_sclref(self, mapping, what: str = "state") -> "OrderedDict[str, np.ndarray]":
        """The entries of `mapping` (user names and layout) as sclref name -> array in sclref's layout and dtype.

        Raises `InputError` listing every missing, extra, duplicated, misshapen,
        mistyped or non-finite entry, and what was expected.
        """
        flat = flatten_names(mapping, what=what)
        problems, seen, arrays = [], {}, OrderedDict()
        extra = []
        for their, value in flat.items():
            name = self.resolve(their)
            if name is None:
                try:
                    extra.append(f"{their} {_shape(as_array(value, repr(their)).shape)}")
                except InputError:
                    extra.append(their)
                continue
            if name in seen:
                problems.append(f"{their!r} and {seen[name]!r} both give {name}")
                continue
            seen[name] = their
            slot = self.slots[name]
            arr, problem = self.check_value(slot, value, their)
            if problem is not None:
                problems.append(problem)
                continue
            arrays[name] = slot.to_sclref(arr).astype(slot.dtype, copy=False)
        missing = [f"{self.their_name(s.name)} {_shape(s.layout_shape)}" for s in self.slots.values()
                   if s.name not in seen and not s.optional]
        if missing:
            problems.insert(0, "missing: " + ", ".join(missing))
        if extra:
            problems.insert(1 if missing else 0, "extra (not in the model): " + ", ".join(extra))
        if missing and extra:
            hint = self._naming_hint([n for n in flat if self.resolve(n) is None])
            if hint:
                problems.insert(0, hint)
        if problems:
            listing = f"; {self._expected_text()}" if missing or extra else ""
            raise InputError(f"{what} (layout {self.layout!r}) does not fit the model: "
                             + "; ".join(problems) + listing)
        return arrays

    def _naming_hint(self, unknown: list[str]) -> str | None:
        """A layout whose default names the unknown names are, if there is one."""
        for other in LAYOUTS:
            if other == self.layout or {other, self.layout} == {"torch", "sclref"}:
                continue
            known = set(default_names(self.model, other).values())
            if unknown and all(n in known for n in unknown):
                return f"the names are those of the {other!r} layout: pass layout={other!r}"
        return None

    # -- arrays out --------------------------------------------------------------------------
    def from_sclref(self, arrays: Mapping) -> "OrderedDict[str, np.ndarray]":
        """sclref name -> array (sclref's layout) as the user's name -> array in this layout."""
        return OrderedDict((self.their_name(name), self.slots[name].to_layout(np.asarray(a)))
                           for name, a in arrays.items())


def load_state(model: nn.Module, mapping, layout: str = "torch", names=None, *, in_shape=None) -> nn.Module:
    """Load θ, biases, scores and batch-norm parameters and statistics from a plain mapping of names to arrays.

    Parameters
    ----------
    model : sclref.nn.Module
        The model to load into; its values change only if the whole state fits.
    mapping : mapping
        Names to arrays (anything `numpy.asarray` converts: NumPy, JAX arrays, torch
        tensors, the members of an ``.npz``); nested mappings are flattened with "/".
    layout : {"torch", "flax", "sclref"}
        The naming and array layout of `mapping` (see the module docstring).
    names : mapping or callable, optional
        Their name -> sclref's dotted name (or the layout's default name).
    in_shape : tuple of int, optional
        Per-sample input shape (C, H, W); needed with ``layout="flax"`` for a model with
        a `Flatten`.

    Returns
    -------
    sclref.nn.Module
        `model`, loaded.

    Raises
    ------
    InputError
        Listing every missing, extra, misshapen (with a hint when the shape is that of
        another layout), non-float or non-finite entry, and the expected (name, shape).
    """
    arrays = StateLayout(model, layout, names, in_shape).to_sclref(mapping)
    model.load_state_dict(arrays, strict=False)
    return model


def export_state(model: nn.Module, layout: str = "torch", names=None, *, in_shape=None, nested: bool = False) -> dict:
    """The model's parameters and buffers as a mapping in `layout`'s names and array layouts.

    Parameters
    ----------
    model : sclref.nn.Module
        The model to read.
    layout : {"torch", "flax", "sclref"}
        The convention to write.
    names : mapping, optional
        Their name -> sclref name (the map `load_state` takes); written under their names.
    in_shape : tuple of int, optional
        As for `load_state`.
    nested : bool
        Split names at "/" into nested dicts (Flax's tree of collections and modules).

    Returns
    -------
    dict
        Name -> a new array. Entries the layout does not store (Flax has no batch-norm
        counter) are left out unless `names` names them.
    """
    if names is not None and not isinstance(names, Mapping):
        raise InputError("export_state: names must be a mapping (their name -> sclref name); a callable "
                         "cannot be inverted")
    lay = StateLayout(model, layout, names, in_shape=in_shape)
    state = model.state_dict()
    keep = OrderedDict((n, a) for n, a in state.items() if lay.stores(n))
    flat = lay.from_sclref(keep)
    if not nested:
        return dict(flat)
    tree: dict = {}
    for name, arr in flat.items():
        node = tree
        *path, leaf = name.split("/")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = arr
    return tree
