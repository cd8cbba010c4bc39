"""Read and write the portable file of a sparse network: ``.npz`` arrays plus a JSON manifest.

The file is a zip archive (what `numpy.savez` writes): a ``manifest.json`` member that
describes the layers and names their arrays, and one ``.npy`` member per array. The
format is documented in docs/sparse-format.md so that plain numpy + scipy can read it.
Writes are atomic (`sclref.io.atomic_write_bytes`); the reader checks every member's
CRC, the manifest, every array's dtype and shape and the CSR invariants, and rejects a
file of an unknown version, corrupt or truncated, with a `FormatError` that says why.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sclref.io import atomic_write_bytes
from sclref.sparse import network as net

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "FormatError", "load", "save"]

FORMAT = "sclref-sparse"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FLOATS = ("float32", "float64")
_CSR_FIELDS = ("indptr", "indices", "data", "bias")


class FormatError(ValueError):
    """A sparse-network file that cannot be read: corrupt, truncated, foreign or of an unknown version."""


def _layer_entry(i: int, layer, arrays: dict) -> dict:
    entry = {"name": layer.name, "kind": layer.kind}
    if isinstance(layer, net.WeightLayer):
        w = layer.weight
        names = {}
        for field, value in zip(_CSR_FIELDS, (w.indptr, w.indices, w.data, layer.bias)):
            names[field] = f"layer{i}.{field}"
            arrays[names[field]] = np.ascontiguousarray(value)
        if isinstance(layer, net.Conv2d):
            entry.update(in_channels=layer.in_channels, out_channels=layer.out_channels,
                         kernel_size=list(layer.kernel_size), stride=list(layer.stride), padding=list(layer.padding))
        else:
            entry.update(in_features=layer.in_features, out_features=layer.out_features)
        entry.update(nnz=int(w.nnz), arrays=names)
    elif isinstance(layer, net.MaxPool2d):
        entry.update(kernel_size=list(layer.kernel_size), stride=list(layer.stride))
    elif isinstance(layer, net.Activation) and layer.kind == "leaky_relu":
        entry.update(alpha=layer.alpha)
    return entry


def save(network: net.SparseNetwork, path) -> None:
    """Write `network` to `path` (conventionally ``*.npz``) atomically."""
    arrays: dict = {}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "dtype": np.dtype(network.dtype).name,
        "input_shape": None if network.input_shape is None else list(network.input_shape),
        "nnz": network.nnz,
        "layers": [_layer_entry(i, layer, arrays) for i, layer in enumerate(network.layers)],
        "removed_units": network.removed_units, "source": network.source,
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for name, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, value, allow_pickle=False)
            zf.writestr(f"{name}.npy", member.getvalue())
    atomic_write_bytes(path, buf.getvalue())


def _pair(entry: dict, key: str) -> tuple[int, int]:
    value = entry[key]
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)):
        raise FormatError(f"layer {entry.get('name')!r}: {key} must be a list of two integers >= 0, got {value!r}")
    return int(value[0]), int(value[1])


def _csr(entry: dict, members: dict, dtype: np.dtype, shape: tuple[int, int]):
    name = entry["name"]
    try:
        indptr, indices, data, bias = (members[entry["arrays"][f]] for f in _CSR_FIELDS)
    except KeyError as err:
        raise FormatError(f"layer {name!r}: array {err} is missing") from None
    f, k = shape
    for label, arr in (("indptr", indptr), ("indices", indices)):
        if arr.ndim != 1 or arr.dtype not in (np.int32, np.int64):
            raise FormatError(f"layer {name!r}: {label} must be a 1-D int32/int64 array, got {arr.dtype} {arr.shape}")
    for label, arr, length in (("data", data, indices.size), ("bias", bias, f)):
        if arr.dtype != dtype or arr.shape != (length,):
            raise FormatError(f"layer {name!r}: {label} must be {dtype.name} of shape ({length},), "
                              f"got {arr.dtype} {arr.shape}")
    if indptr.size != f + 1 or indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
        raise FormatError(f"layer {name!r}: indptr is not a valid CSR row pointer for {f} rows and "
                          f"{indices.size} entries")
    if indices.size and (indices.min() < 0 or indices.max() >= k):
        raise FormatError(f"layer {name!r}: a column index lies outside [0, {k})")
    rows = np.repeat(np.arange(f), np.diff(indptr))
    if np.any((np.diff(indices) <= 0) & (rows[1:] == rows[:-1])):
        raise FormatError(f"layer {name!r}: column indices are not sorted and unique within each row")
    if entry.get("nnz") != indices.size:
        raise FormatError(f"layer {name!r}: the manifest says nnz={entry.get('nnz')}, the arrays hold {indices.size}")
    return sp.csr_array((data, indices, indptr), shape=(f, k)), bias


def _layer(entry: dict, members: dict, dtype: np.dtype):
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise FormatError(f"a layer entry must be an object with a name, got {entry!r}")
    kind, name = entry.get("kind"), entry["name"]
    if kind == "linear":
        weight, bias = _csr(entry, members, dtype, (int(entry["out_features"]), int(entry["in_features"])))
        return net.Linear(name, weight, bias)
    if kind == "conv2d":
        kh, kw = _pair(entry, "kernel_size")
        c = int(entry["in_channels"])
        weight, bias = _csr(entry, members, dtype, (int(entry["out_channels"]), c * kh * kw))
        stride = _pair(entry, "stride")
        if min(kh, kw, *stride) < 1:
            raise FormatError(f"layer {name!r}: kernel size and stride must be >= 1")
        return net.Conv2d(name, weight, bias, c, (kh, kw), stride, _pair(entry, "padding"))
    if kind == "maxpool2d":
        kernel, stride = _pair(entry, "kernel_size"), _pair(entry, "stride")
        if min(*kernel, *stride) < 1:
            raise FormatError(f"layer {name!r}: kernel size and stride must be >= 1")
        return net.MaxPool2d(name, kernel, stride)
    if kind == "relu":
        return net.Activation(name, "relu")
    if kind == "leaky_relu":
        return net.Activation(name, "leaky_relu", float(entry["alpha"]))
    if kind == "flatten":
        return net.Flatten(name)
    raise FormatError(f"layer {name!r}: unknown kind {kind!r}")


def _check_chain(layers: list) -> None:
    """Consecutive weight layers must agree on the number of units between them."""
    prev = None
    for layer in layers:
        if not isinstance(layer, net.WeightLayer):
            continue
        if prev is not None:
            units = prev.weight.shape[0]
            ins = layer.in_channels if isinstance(layer, net.Conv2d) else layer.in_features
            if isinstance(layer, net.Conv2d) or isinstance(prev, net.Linear):
                ok = ins == units
            else:  # conv, flatten, linear: a whole number of inputs per channel
                ok = ins % units == 0 if units else ins == 0
            if not ok:
                raise FormatError(f"layer {layer.name!r} takes {ins} inputs but {prev.name!r} has {units} units")
        prev = layer


def load(path) -> net.SparseNetwork:
    """Read a sparse network written by `save`; raise `FormatError` (or FileNotFoundError) with the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if MANIFEST not in names:
                raise FormatError(f"{path}: not an sclref sparse network (no {MANIFEST})")
            manifest = json.loads(zf.read(MANIFEST))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise FormatError(f"{path}: not an sclref sparse network (format is not {FORMAT!r})")
            version = manifest.get("version")
            if version != FORMAT_VERSION:
                is_newer = isinstance(version, int) and version > FORMAT_VERSION
                hint = " (the file is newer: upgrade sclref)" if is_newer else ""
                raise FormatError(f"{path}: format version {version!r} is not supported; this sclref reads "
                                  f"version {FORMAT_VERSION}{hint}")
            # zf.read checks each member's CRC-32, so a flipped bit is an error, not a wrong weight.
            members = {name[:-4]: np.lib.format.read_array(io.BytesIO(zf.read(name)), allow_pickle=False)
                       for name in names if name.endswith(".npy")}
    # A cut-off or damaged file fails in the zip layer (BadZipFile, EOFError), in an array
    # header or the manifest (ValueError, including JSONDecodeError).
    except FormatError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise FormatError(f"{path}: corrupt or truncated sparse network file ({err})") from None
    try:
        if manifest.get("dtype") not in _FLOATS:
            raise FormatError(f"dtype must be one of {_FLOATS}, got {manifest.get('dtype')!r}")
        dtype = np.dtype(manifest["dtype"])
        if not isinstance(manifest.get("layers"), list):
            raise FormatError("the manifest has no list of layers")
        layers = [_layer(entry, members, dtype) for entry in manifest["layers"]]
        _check_chain(layers)
        shape = manifest.get("input_shape")
        input_shape = None if shape is None else tuple(int(s) for s in shape)
        return net.SparseNetwork(layers, dtype, input_shape, dict(manifest.get("removed_units") or {}),
                                 dict(manifest.get("source") or {}))
    except FormatError as err:
        raise FormatError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{path}: corrupt manifest ({type(err).__name__}: {err})") from None
