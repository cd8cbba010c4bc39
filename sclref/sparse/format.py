"""Read and write the portable file of a sparse network: ``.npy`` arrays plus a JSON manifest in a zip.

The file is a zip archive (what `numpy.savez` writes): a ``manifest.json`` member that
describes the layers and names their arrays, and one ``.npy`` member per array. The
format is documented in docs/sparse-format.md so that plain numpy + scipy can read it.

Writes are atomic (`sclref.storage.atomic_write_bytes`) and reproducible: every member has a
fixed date, mode and order and is stored uncompressed, so one network always gives the
same bytes. The reader trusts nothing in the file: it bounds the manifest's size and
nesting before parsing it, checks each member's CRC, reads only the arrays the manifest
names and parses their headers itself (a header cannot make it allocate more than the
member holds), checks every dtype and shape, the CSR invariants, the geometry against the
format's bounds, the layer chain (through residual blocks, whose body and shortcut must
end in one shape), the memory one sample needs (`check_allocation`), that every value is
finite and that no output can overflow the dtype. A file it refuses is a
`FormatError` (or a `sclref.errors.LimitError` for a size beyond what sclref allocates)
whose message names the file, the layer and the value.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sclref.data import check_preprocessing
from sclref.errors import InputError, LimitError, check_allocation
from sclref.sparse import network as net
from sclref.sparse.network import _show
from sclref.storage import atomic_write_bytes

__all__ = ["FORMAT", "FORMAT_VERSION", "INPUT_BOUND", "MANIFEST", "MAX_BLOCK_DEPTH", "MAX_DEPTH", "MAX_LAYERS",
           "MAX_MANIFEST_BYTES", "MAX_UNITS", "MAX_WINDOW", "READABLE_VERSIONS", "FormatError", "check", "load",
           "save"]

FORMAT = "sclref-sparse"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"

# Bounds of the format (docs/sparse-format.md): far beyond any network sclref trains, and
# small enough that no product of them overflows an int64 or asks for an absurd array.
MAX_MANIFEST_BYTES = 1 << 24
MAX_DEPTH = 32  # JSON nesting; the manifest itself needs 4, plus 2 per level of residual blocks
MAX_BLOCK_DEPTH = 4  # residual blocks inside residual blocks; ResNets need 1
MAX_LAYERS = 1024  # over the whole network, the layers inside residual blocks included
MAX_UNITS = 1 << 24  # features, channels, every dimension of input_shape
MAX_WINDOW = 1 << 12  # kernel size, stride and padding of a convolution or pooling
MAX_NAME = 256  # characters of a layer name
# The largest input magnitude for which the reader guarantees finite outputs: standardized
# inputs are a few units, raw 8-bit pixels 255.
INPUT_BOUND = 1e6

_FLOATS = ("float32", "float64")
_ARRAY_DTYPES = tuple(np.dtype(t) for t in (np.int32, np.int64, np.float32, np.float64))
_CSR_FIELDS = ("indptr", "indices", "data", "bias")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date zip can hold
_ZIP_MODE = 0o100644 << 16  # a regular file, rw-r--r--
_ZIP_UNIX = 3
# What the zip layer and NumPy's header parser raise on damaged bytes.
_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error, struct.error,
           NotImplementedError, RuntimeError, OverflowError, SyntaxError)
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
# Layer kinds a reader of an older version would not know: refused in files of that version.
_SINCE = {"residual": 3, "global_avg_pool2d": 3, "subsample_pad": 3}


class FormatError(InputError):
    """A sparse-network file that cannot be read (corrupt, truncated, foreign, of an unknown version,
    or describing a network the format does not allow), or a network that cannot be written."""


def _layer_entry(key: str, layer, arrays: dict) -> dict:
    """The manifest entry of `layer`; its arrays go to `arrays` under member names starting with `key`."""
    entry = {"name": layer.name, "kind": layer.kind}
    if isinstance(layer, net.WeightLayer):
        w = layer.weight
        names = {}
        for field, value in zip(_CSR_FIELDS, (w.indptr, w.indices, w.data, layer.bias)):
            names[field] = f"{key}.{field}"
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
    elif isinstance(layer, net.SubsamplePad):
        entry.update(stride=list(layer.stride), channels=list(layer.channels))
    elif isinstance(layer, net.Residual):
        entry.update(body=[_layer_entry(f"{key}.body{j}", sub, arrays) for j, sub in enumerate(layer.body)],
                     shortcut=[_layer_entry(f"{key}.shortcut{j}", sub, arrays)
                               for j, sub in enumerate(layer.shortcut)])
    return entry


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    # writestr(name, ...) would stamp the current time and the platform into the member.
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = _ZIP_MODE
    info.create_system = _ZIP_UNIX
    zf.writestr(info, data)


def save(network: net.SparseNetwork, path) -> None:
    """Write `network` to `path` (conventionally ``*.npz``) atomically.

    The file has the lowest format version that holds the network: `FORMAT_VERSION` (3)
    when it uses a kind new in version 3 (residual blocks, global average pooling,
    subsample-and-pad), 2 otherwise, so that readers of version 2 still read plain
    chains. The same network always gives the same bytes. A network the reader would refuse
    (see `check`) is not written: `FormatError` (or `LimitError`) says why.
    """
    try:
        check(network)
        arrays: dict = {}
        version = max(_SINCE.get(layer.kind, 2) for layer, _ in net.walk(network.layers))
        manifest = {
            "format": FORMAT, "version": version, "dtype": np.dtype(network.dtype).name,
            "input_shape": None if network.input_shape is None else list(network.input_shape),
            "nnz": network.nnz,
            "layers": [_layer_entry(f"layer{i}", layer, arrays) for i, layer in enumerate(network.layers)],
            "removed_units": network.removed_units, "source": network.source,
            "preprocessing": network.preprocessing,
        }
        text = json.dumps(manifest, indent=1, allow_nan=False)
    except (FormatError, LimitError) as err:
        raise type(err)(f"cannot write {path}: {err}") from None
    except (TypeError, ValueError) as err:  # provenance that JSON cannot hold
        raise FormatError(f"cannot write {path}: the manifest is not plain JSON ({err})") from None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        _write_member(zf, MANIFEST, text.encode())
        for name, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, value, allow_pickle=False)
            _write_member(zf, f"{name}.npy", member.getvalue())
    atomic_write_bytes(path, buf.getvalue())


def _int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise FormatError(f"{what} must be an integer in [{low}, {high:,}], got {_show(value)}")
    return int(value)


def _pair(value, what: str, low: int, high: int) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise FormatError(f"{what} must be a list of two integers in [{low}, {high:,}], got {_show(value)}")
    return _int(value[0], what, low, high), _int(value[1], what, low, high)


def _first_nonfinite(a: np.ndarray) -> str | None:
    bad = np.flatnonzero(~np.isfinite(a))
    return None if bad.size == 0 else f"{a[bad[0]]} at index {bad[0]}"


def _check_layer(layer, dtype: np.dtype) -> None:
    where = f"layer {layer.name!r}"
    if isinstance(layer, net.WeightLayer):
        w = layer.weight
        if not isinstance(w, (sp.csr_array, sp.csr_matrix)) or w.ndim != 2:
            raise FormatError(f"{where}: the weight must be a CSR matrix")
        f, k = w.shape
        if isinstance(layer, net.Conv2d):
            _int(layer.in_channels, f"{where}: in_channels", 0, MAX_UNITS)
            _int(f, f"{where}: out_channels", 0, MAX_UNITS)
            kh, kw = _pair(layer.kernel_size, f"{where}: kernel_size", 1, MAX_WINDOW)
            _pair(layer.stride, f"{where}: stride", 1, MAX_WINDOW)
            _pair(layer.padding, f"{where}: padding", 0, MAX_WINDOW)
            if k != layer.in_channels * kh * kw:
                raise FormatError(f"{where}: the weight has {k} columns, not in_channels*KH*KW = "
                                  f"{layer.in_channels * kh * kw}")
        else:
            _int(k, f"{where}: in_features", 0, MAX_UNITS)
            _int(f, f"{where}: out_features", 0, MAX_UNITS)
        for label, a, length in (("weight data", w.data, w.nnz), ("bias", layer.bias, f)):
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (length,):
                raise FormatError(f"{where}: {label} must be {dtype.name} of shape ({length},), "
                                  f"got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
            bad = _first_nonfinite(a)
            if bad is not None:
                raise FormatError(f"{where}: {label} holds {bad}; weights and biases must be finite")
    elif isinstance(layer, net.MaxPool2d):
        _pair(layer.kernel_size, f"{where}: kernel_size", 1, MAX_WINDOW)
        _pair(layer.stride, f"{where}: stride", 1, MAX_WINDOW)
    elif isinstance(layer, net.Activation):
        if layer.kind == "leaky_relu":
            a = layer.alpha
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise FormatError(f"{where}: the leaky_relu slope alpha must be a finite number, got {_show(a)}")
        elif layer.kind != "relu":
            raise FormatError(f"{where}: unknown activation {layer.kind!r}")
    elif isinstance(layer, net.SubsamplePad):
        _pair(layer.stride, f"{where}: stride", 1, MAX_WINDOW)
        _pair(layer.channels, f"{where}: channels", 0, MAX_UNITS)
    elif isinstance(layer, net.Residual):
        if not isinstance(layer.body, list) or not layer.body:
            raise FormatError(f"{where}: a residual block's body must be a non-empty list of layers, "
                              f"got {_show(layer.body)}")
        if not isinstance(layer.shortcut, list):
            raise FormatError(f"{where}: a residual block's shortcut must be a list of layers (empty for the "
                              f"identity), got {_show(layer.shortcut)}")
    elif not isinstance(layer, (net.Flatten, net.GlobalAvgPool2d)):
        raise FormatError(f"{where}: unknown layer type {type(layer).__name__}")


def _preprocessing(record) -> dict:
    try:
        return check_preprocessing(record, "preprocessing")
    except InputError as err:
        raise FormatError(str(err)) from None


def check_range(network: net.SparseNetwork, dtype) -> None:
    """Raise `FormatError` when some layer's output could overflow `dtype` for inputs up to `INPUT_BOUND`.

    The margin (a factor 1024 below the dtype's largest value) covers the rounding of sums.
    """
    dtype = np.dtype(dtype)
    largest = float(np.finfo(dtype).max) / 1024
    for layer in network.layers:
        if isinstance(layer, net.Activation) and layer.kind == "leaky_relu" and abs(layer.alpha) > largest:
            raise FormatError(f"layer {layer.name!r}: the leaky_relu slope {layer.alpha:g} does not fit {dtype.name}")
    for name, bound in network.magnitude_bounds(INPUT_BOUND):
        if not bound <= largest:
            raise FormatError(f"layer {name!r}: its weights and bias let its outputs reach {bound:.3g} for inputs "
                              f"of magnitude {INPUT_BOUND:g}, beyond what {dtype.name} holds "
                              f"({np.finfo(dtype).max:.3g}); no trained network has such values")


def _check_chain(layers: list, shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The per-sample shape after `layers`, each layer's fit and the memory one sample needs checked on the way."""
    for layer in layers:
        where = f"layer {layer.name!r}"
        if isinstance(layer, net.Residual):
            body, short = _check_chain(layer.body, shape, size), _check_chain(layer.shortcut, shape, size)
            if body != short:
                raise FormatError(f"residual block {layer.name!r}: its body gives {list(body)} per sample, its "
                                  f"shortcut {list(short)}; the two must match to be added")
            after = body
        else:
            after = net.output_shape(layer, shape)
        if isinstance(layer, net.Conv2d):
            (c, h, w), (kh, kw), (ph, pw) = shape, layer.kernel_size, layer.padding
            check_allocation((1, c, h + 2 * ph, w + 2 * pw), size,
                             f"{where} (padding {list(layer.padding)}): one zero-padded input sample")
            check_allocation((c * kh * kw, after[1] * after[2]), size,
                             f"{where} (kernel {list(layer.kernel_size)}): the im2col columns of one sample")
        check_allocation((1, *after), size, f"{where}: the output {list(after)} of one sample")
        shape = after
    return shape


def _check_shapes(network: net.SparseNetwork) -> None:
    """Walk the per-sample shapes from the input, checking each layer's fit and the memory one sample needs."""
    size = np.dtype(network.dtype).itemsize
    try:
        shape = network.shapes()[0] if network.input_shape is None else network.input_shape
        check_allocation((1, *shape), size, f"input_shape {list(shape)}: one input sample")
        _check_chain(network.layers, shape, size)
    except LimitError:
        raise
    except ValueError as err:
        raise FormatError(str(err)) from None


def check(network: net.SparseNetwork) -> None:
    """Raise `FormatError` (or `LimitError`) unless `network` is one the format allows.

    Checked: at least one weight layer and at most `MAX_LAYERS` layers (counting those
    inside residual blocks); blocks nested at most `MAX_BLOCK_DEPTH` deep; unique names;
    geometry within the format's bounds; float arrays of the network's dtype, finite;
    the chain of per-sample shapes from the input, through every block (body and shortcut
    give the same shape); the memory of one sample; outputs that cannot overflow
    (`check_range`); the metadata fields.
    """
    if np.dtype(network.dtype).name not in _FLOATS:
        raise FormatError(f"dtype must be one of {_FLOATS}, got {_show(network.dtype)}")
    dtype = np.dtype(network.dtype)
    layers = network.layers
    if not isinstance(layers, list) or not layers:
        raise FormatError("the network has no layers")
    names = set()
    for count, (layer, depth) in enumerate(net.walk(layers), 1):
        if count > MAX_LAYERS:
            raise FormatError(f"the network has more than the {MAX_LAYERS:,} layers the format allows "
                              f"(residual blocks' layers included)")
        if depth > MAX_BLOCK_DEPTH:
            raise FormatError(f"layer {_show(getattr(layer, 'name', None))} sits in residual blocks nested {depth} "
                              f"deep, more than the format allows ({MAX_BLOCK_DEPTH})")
        if not isinstance(getattr(layer, "name", None), str) or not 0 < len(layer.name) <= MAX_NAME:
            raise FormatError(f"a layer name must be a string of 1 to {MAX_NAME} characters, "
                              f"got {_show(getattr(layer, 'name', None))}")
        if layer.name in names:
            raise FormatError(f"two layers are named {layer.name!r}")
        names.add(layer.name)
        _check_layer(layer, dtype)
    if not network.weighted():
        raise FormatError("the network has no linear or conv2d layer")
    if network.input_shape is not None:
        shape = network.input_shape
        if not isinstance(shape, tuple) or len(shape) not in (1, 3):
            raise FormatError(f"input_shape must be null or a list of 1 or 3 integers, got {_show(shape)}")
        for d in shape:
            _int(d, "every dimension of input_shape", 1, MAX_UNITS)
    _check_shapes(network)
    check_range(network, dtype)
    weighted = {layer.name for layer in network.weighted()}
    if not isinstance(network.removed_units, dict):
        raise FormatError(f"removed_units must be an object, got {_show(network.removed_units)}")
    for name, units in network.removed_units.items():
        if name not in weighted:
            raise FormatError(f"removed_units names {_show(name)}, which is not a weight layer")
        if not isinstance(units, list):
            raise FormatError(f"removed_units of layer {name!r} must be a list, got {_show(units)}")
        for u in units:
            _int(u, f"removed_units of layer {name!r}: a unit index", 0, MAX_UNITS)
    if not isinstance(network.source, dict):
        raise FormatError(f"source must be an object, got {_show(network.source)}")
    try:
        json.dumps(network.source, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise FormatError(f"source must hold plain JSON values, finite numbers only ({err})") from None
    if network.preprocessing is not None:
        _preprocessing(network.preprocessing)


def _member(zf: zipfile.ZipFile, name: str, limit: int | None = None) -> bytes:
    """The bytes of member `name`, after bounding the size its header declares (zipfile reads at most that)."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FormatError(f"member {name} is missing") from None
    if limit is not None and info.file_size > limit:
        raise FormatError(f"member {name} declares {info.file_size:,} bytes, more than the format allows "
                          f"({limit:,})")
    check_allocation((info.file_size,), 1, f"member {name} (its zip header declares {info.file_size:,} bytes)")
    try:
        return zf.read(info)
    except _DAMAGE as err:
        raise FormatError(f"corrupt or truncated sparse network file: member {name}: {err}") from None


def _nesting(text: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (strings skipped)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', text), np.uint8)
    step = np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64) - np.isin(skeleton, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _manifest(zf: zipfile.ZipFile) -> dict:
    try:
        names = zf.namelist()
    except _DAMAGE as err:
        raise FormatError(f"corrupt or truncated sparse network file ({err})") from None
    if MANIFEST not in names:
        raise FormatError(f"not an sclref sparse network (no {MANIFEST})")
    text = _member(zf, MANIFEST, MAX_MANIFEST_BYTES)
    depth = _nesting(text)
    if depth > MAX_DEPTH:
        raise FormatError(f"the manifest nests {depth:,} levels deep, more than the format allows ({MAX_DEPTH})")
    try:
        manifest = json.loads(text)
    except RecursionError:  # nesting hidden from the count above (e.g. in an odd encoding)
        raise FormatError("the manifest nests too deep to parse") from None
    except ValueError as err:  # JSONDecodeError, bad UTF-8, an integer of thousands of digits
        raise FormatError(f"corrupt or truncated sparse network file: {MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"not an sclref sparse network (format is not {FORMAT!r})")
    version = manifest.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        is_newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        hint = " (the file is newer: upgrade sclref)" if is_newer else ""
        raise FormatError(f"format version {_show(version)} is not supported; this sclref reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}{hint}")
    return manifest


def _array(zf: zipfile.ZipFile, name: str, what: str) -> np.ndarray:
    """The 1-D array of member ``name.npy``, its header checked before anything is allocated."""
    raw = _member(zf, f"{name}.npy")
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        with warnings.catch_warnings():  # a header in Python 2's dialect parses, with a warning to no one
            warnings.simplefilter("ignore")
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy version {version} is not 1.0 or 2.0")
    except Exception as err:  # NumPy's header parser raises many types, its tokenizer's own among them
        raise FormatError(f"{what}: member {name}.npy is not a valid .npy array ({err})") from None
    if dtype not in _ARRAY_DTYPES:
        raise FormatError(f"{what}: member {name}.npy holds {dtype}, not one of int32, int64, float32, float64 "
                          f"in this machine's byte order")
    if len(shape) != 1:
        raise FormatError(f"{what}: member {name}.npy must be 1-D, has shape {_show(shape)}")
    count, start = shape[0], f.tell()
    if count * dtype.itemsize != len(raw) - start:
        raise FormatError(f"{what}: member {name}.npy claims {count:,} values of {dtype} but holds "
                          f"{len(raw) - start:,} bytes of data")
    return np.frombuffer(raw, dtype, count, start).copy()


def _csr(entry: dict, zf, dtype: np.dtype, shape: tuple[int, int], where: str):
    arrays = entry.get("arrays")
    if not (isinstance(arrays, dict) and all(isinstance(arrays.get(f), str) for f in _CSR_FIELDS)):
        raise FormatError(f"{where}: arrays must map {', '.join(_CSR_FIELDS)} to member names, got {_show(arrays)}")
    indptr, indices, data, bias = (_array(zf, arrays[f], f"{where}: {f}") for f in _CSR_FIELDS)
    f, k = shape
    for label, arr in (("indptr", indptr), ("indices", indices)):
        if arr.dtype.kind != "i":
            raise FormatError(f"{where}: {label} must be int32 or int64, got {arr.dtype}")
    for label, arr, length in (("data", data, indices.size), ("bias", bias, f)):
        if arr.dtype != dtype or arr.shape != (length,):
            raise FormatError(f"{where}: {label} must be {dtype.name} of shape ({length},), "
                              f"got {arr.dtype} {arr.shape}")
    if indptr.size != f + 1 or indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
        raise FormatError(f"{where}: indptr is not a valid CSR row pointer for {f} rows and {indices.size} entries")
    if indices.size and (indices.min() < 0 or indices.max() >= k):
        raise FormatError(f"{where}: a column index lies outside [0, {k})")
    rows = np.repeat(np.arange(f), np.diff(indptr))
    if np.any((np.diff(indices) <= 0) & (rows[1:] == rows[:-1])):
        raise FormatError(f"{where}: column indices are not sorted and unique within each row")
    nnz = entry.get("nnz")
    if isinstance(nnz, bool) or nnz != indices.size:
        raise FormatError(f"{where}: the manifest says nnz={_show(nnz)}, the arrays hold {indices.size}")
    # One index type, int32 unless the layer needs more: what the exporter writes and the kernels take.
    itype = np.int32 if max(k, indices.size) < 2**31 else np.int64
    weight = sp.csr_array((data, indices.astype(itype), indptr.astype(itype)), shape=(f, k))
    return weight, bias


class _Reading:
    """What reading the layers keeps across nesting: the archive, dtype, version and the layers counted so far."""

    def __init__(self, zf: zipfile.ZipFile, dtype: np.dtype, version: int):
        self.zf, self.dtype, self.version, self.count = zf, dtype, version, 0


def _layers(entries, what: str, reading: _Reading, depth: int) -> list:
    """The layers of the manifest list `entries` (the network's, or a residual block's body or shortcut)."""
    if not isinstance(entries, list):
        raise FormatError(f"{what} must be a list of layers, got {_show(entries)}")
    reading.count += len(entries)
    if reading.count > MAX_LAYERS:
        raise FormatError(f"the manifest lists more than the {MAX_LAYERS:,} layers the format allows "
                          f"(residual blocks' layers included)")
    return [_layer(i, entry, reading, depth) for i, entry in enumerate(entries)]


def _layer(i: int, entry, reading: _Reading, depth: int):
    zf, dtype = reading.zf, reading.dtype
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise FormatError(f"layer {i} must be an object with a name, got {_show(entry)}")
    kind, name = entry.get("kind"), entry["name"]
    where = f"layer {name!r}"
    if isinstance(kind, str) and reading.version < _SINCE.get(kind, 0):
        raise FormatError(f"{where}: kind {kind!r} needs format version {_SINCE[kind]}, the file says "
                          f"{reading.version}")
    if kind == "linear":
        k = _int(entry.get("in_features"), f"{where}: in_features", 0, MAX_UNITS)
        f = _int(entry.get("out_features"), f"{where}: out_features", 0, MAX_UNITS)
        return net.Linear(name, *_csr(entry, zf, dtype, (f, k), where))
    if kind == "conv2d":
        c = _int(entry.get("in_channels"), f"{where}: in_channels", 0, MAX_UNITS)
        f = _int(entry.get("out_channels"), f"{where}: out_channels", 0, MAX_UNITS)
        kh, kw = _pair(entry.get("kernel_size"), f"{where}: kernel_size", 1, MAX_WINDOW)
        stride = _pair(entry.get("stride"), f"{where}: stride", 1, MAX_WINDOW)
        padding = _pair(entry.get("padding"), f"{where}: padding", 0, MAX_WINDOW)
        weight, bias = _csr(entry, zf, dtype, (f, c * kh * kw), where)
        return net.Conv2d(name, weight, bias, c, (kh, kw), stride, padding)
    if kind == "maxpool2d":
        kernel = _pair(entry.get("kernel_size"), f"{where}: kernel_size", 1, MAX_WINDOW)
        return net.MaxPool2d(name, kernel, _pair(entry.get("stride"), f"{where}: stride", 1, MAX_WINDOW))
    if kind == "relu":
        return net.Activation(name, "relu")
    if kind == "leaky_relu":
        alpha = entry.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or abs(alpha) > 2.0**1023:
            raise FormatError(f"{where}: the leaky_relu slope alpha must be a finite number, got {_show(alpha)}")
        return net.Activation(name, "leaky_relu", float(alpha))
    if kind == "flatten":
        return net.Flatten(name)
    if kind == "global_avg_pool2d":
        return net.GlobalAvgPool2d(name)
    if kind == "subsample_pad":
        return net.SubsamplePad(name, _pair(entry.get("stride"), f"{where}: stride", 1, MAX_WINDOW),
                                _pair(entry.get("channels"), f"{where}: channels", 0, MAX_UNITS))
    if kind == "residual":
        if depth >= MAX_BLOCK_DEPTH:
            raise FormatError(f"{where}: residual blocks nest {depth + 1} deep, more than the format allows "
                              f"({MAX_BLOCK_DEPTH})")
        body = _layers(entry.get("body"), f"{where}: body", reading, depth + 1)
        if not body:
            raise FormatError(f"{where}: a residual block's body must be a non-empty list of layers")
        return net.Residual(name, body, _layers(entry.get("shortcut"), f"{where}: shortcut", reading, depth + 1))
    raise FormatError(f"{where}: unknown kind {_show(kind)}")


def _network(manifest: dict, zf: zipfile.ZipFile) -> net.SparseNetwork:
    dtype = manifest.get("dtype")
    if not isinstance(dtype, str) or dtype not in _FLOATS:
        raise FormatError(f"dtype must be one of {_FLOATS}, got {_show(dtype)}")
    dtype = np.dtype(dtype)
    entries = manifest.get("layers")
    if not isinstance(entries, list) or not entries:
        raise FormatError(f"the manifest's layers must be a non-empty list, got {_show(entries)}")
    shape = manifest.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) not in (1, 3):
            raise FormatError(f"input_shape must be null or a list of 1 or 3 integers, got {_show(shape)}")
        shape = tuple(_int(d, "every dimension of input_shape", 1, MAX_UNITS) for d in shape)
    layers = _layers(entries, "the manifest's layers", _Reading(zf, dtype, manifest["version"]), 0)
    if manifest.get("version") == 1:
        preprocessing = None  # version 1 did not record it
    elif "preprocessing" not in manifest:
        raise FormatError("the manifest has no preprocessing field (null when unknown)")
    else:
        preprocessing = None if manifest["preprocessing"] is None else _preprocessing(manifest["preprocessing"])
    network = net.SparseNetwork(layers, dtype, shape, manifest.get("removed_units", {}), manifest.get("source", {}),
                                preprocessing)
    check(network)
    nnz = manifest.get("nnz")
    if isinstance(nnz, bool) or nnz != network.nnz:
        raise FormatError(f"the manifest says nnz={_show(nnz)}, the layers hold {network.nnz}")
    return network


def load(path) -> net.SparseNetwork:
    """Read a sparse network written by `save` (format version 1, 2 or 3).

    Raises
    ------
    FileNotFoundError
        When `path` is not a file.
    FormatError
        When the file is not a valid sparse network; the message names the file and why.
    sclref.errors.LimitError
        When a size in the file asks for more memory than sclref allocates at once.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        try:
            zf = zipfile.ZipFile(path)
        except _DAMAGE as err:
            raise FormatError(f"corrupt or truncated sparse network file ({err})") from None
        with zf:
            return _network(_manifest(zf), zf)
    except (FormatError, LimitError) as err:
        raise type(err)(f"{path}: {err}") from None
