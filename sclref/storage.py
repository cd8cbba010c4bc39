"""Files that are never half-written and always the same bytes: atomic writes, and nested state as one `.npz`.

Every file sclref writes goes to a temporary file in the target directory and is renamed
over the target only when complete, so an interrupted run leaves either the old file or
the new one. Nested state (dicts and lists of arrays, numbers, strings; optimizer and
model state, RNG states) is stored as one `.npz`: the arrays as members and the structure
as a JSON member that refers to them. Zip members carry a fixed date and mode, so the
same state always gives the same bytes. Reading trusts no size in the file: an array
larger than its member or than `sclref.errors.check_allocation` allows, a structure
nested too deeply, are `StateFileError`s.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from sclref.errors import InputError, check_allocation

_STRUCTURE = "__structure__.json"
_MARKERS = frozenset({"__array__", "__list__", "__intdict__"})
# mkstemp creates files readable by their owner only; written files get the usual mode.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
# The zip format cannot store a date before 1980; every member gets this one.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_MAX_STRUCTURE_BYTES = 64 << 20


class StateFileError(InputError):
    """A state file (checkpoint, model) that is corrupt, truncated, foreign or claims more than it holds."""


@contextlib.contextmanager
def atomic_open(path):
    """A binary file object whose content replaces `path` only once the ``with`` block completes.

    The temporary file ``.NAME.XXXX.tmp`` sits in the target's directory (so the final
    `os.replace` is atomic), gets the usual file mode, and is removed if the block fails;
    one left by a killed process is what `sclref.rundir` cleans up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path, payload) -> None:
    """Write `payload` as JSON; NaN or infinity is a ValueError, since JSON has no such numbers."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A stored (uncompressed) zip archive of `members` in their order, the same bytes for the same members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, content in members.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, content)
    return buf.getvalue()


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as an ``.npz`` (stored zip of ``NAME.npy`` members) atomically, streaming each array.

    Members carry a fixed date, so the same arrays always give the same bytes; object
    arrays are refused (a reader would have to unpickle them).
    """
    with atomic_open(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


_CHUNK = 1 << 20


class ShortRead(EOFError):
    """A stream that ended before the bytes a header announced; `got` says how many came."""

    def __init__(self, got: int):
        self.got = got
        super().__init__(f"the stream ended after {got} bytes")


def read_exactly(f, n: int) -> bytearray:
    """Exactly `n` bytes of stream `f` in one buffer, read a megabyte at a time; `ShortRead` if fewer remain.

    The buffer is allocated once at its final size, so a caller checks `n` (with
    `sclref.errors.check_allocation`) before calling.
    """
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        part = f.read(min(_CHUNK, n - got))
        if not part:
            raise ShortRead(got)
        view[got:got + len(part)] = part
        got += len(part)
    return buffer


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` in the ``.npy`` format (0-d arrays stay 0-d; object arrays are refused)."""
    member = io.BytesIO()
    np.lib.format.write_array(member, array, allow_pickle=False)
    return member.getvalue()


def read_npy_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """Read one ``.npy`` member, refusing a header that claims more data than the member holds.

    Raises ValueError (of the header) or `LimitError` before anything of the claimed size is allocated.
    """
    size = zf.getinfo(name).file_size
    with zf.open(name) as member:
        version = np.lib.format.read_magic(member)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"member {name}: .npy format version {version} is not one sclref writes")
        try:
            shape, _, dtype = readers[version](member)
        # NumPy parses the header, a Python dict literal, with tokenize and ast: a damaged
        # one can fail with TokenError, SyntaxError, ValueError, RecursionError, among others.
        except Exception as err:  # noqa: BLE001 - any failure here means a damaged header
            raise ValueError(f"member {name}: unreadable .npy header ({type(err).__name__}: {err})") from None
        if dtype.hasobject:
            raise ValueError(f"member {name} holds Python objects ({dtype}), which sclref never unpickles")
        needed = check_allocation(shape, dtype.itemsize, f"member {name} (shape {shape}, {dtype})")
        if needed > size - member.tell():
            raise ValueError(f"member {name} claims shape {shape} of {dtype}: {needed:,} bytes, but holds "
                             f"{max(0, size - member.tell()):,}")
    with zf.open(name) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _flatten(tree, arrays: dict):
    if isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise TypeError(f"cannot store an array of dtype {tree.dtype} (Python objects) in a state file")
        key = f"a{len(arrays)}"
        arrays[key] = tree
        return {"__array__": key}
    if isinstance(tree, dict):
        for k in tree:
            if not (k is None or isinstance(k, (str, int, float))):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} in a state file")
        # Non-string keys, and keys that are themselves markers, go in a list of pairs.
        if not all(isinstance(k, str) for k in tree) or not _MARKERS.isdisjoint(tree):
            return {"__intdict__": [[k, _flatten(v, arrays)] for k, v in tree.items()]}
        return {k: _flatten(v, arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_flatten(v, arrays) for v in tree]}
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a value of type {type(tree).__name__} in a state file")


def _unflatten(node, arrays):
    if isinstance(node, dict):
        if "__array__" in node:
            return arrays[node["__array__"]]
        if "__list__" in node:
            return [_unflatten(v, arrays) for v in node["__list__"]]
        if "__intdict__" in node:
            return {k: _unflatten(v, arrays) for k, v in node["__intdict__"]}
        return {k: _unflatten(v, arrays) for k, v in node.items()}
    return node


def save_state(path, tree) -> None:
    """Store a nested dict/list of arrays and plain values atomically as one `.npz`."""
    arrays: dict = {}
    structure = _flatten(tree, arrays)
    members = {f"{key}.npy": npy_bytes(arr) for key, arr in arrays.items()}
    members[_STRUCTURE] = json.dumps(structure).encode()  # Python floats round-trip, NaN included
    atomic_write_bytes(path, zip_bytes(members))


def load_state(path):
    """Read what `save_state` wrote; a missing path is FileNotFoundError, anything wrong inside a `StateFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such state file")
    missing = structure = object()
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if _STRUCTURE in names:
                if zf.getinfo(_STRUCTURE).file_size > _MAX_STRUCTURE_BYTES:
                    raise ValueError(f"{_STRUCTURE} is larger than {_MAX_STRUCTURE_BYTES:,} bytes")
                structure = json.loads(zf.read(_STRUCTURE))
                for name in names:
                    if name != _STRUCTURE and name.endswith(".npy"):
                        arrays[name[:-4]] = read_npy_member(zf, name)
    except StateFileError:
        raise
    except InputError as err:  # a LimitError: already names the member and the size
        raise StateFileError(f"{path}: {err}") from None
    # A cut-off or damaged file fails in the zip layer (BadZipFile, EOFError, NotImplementedError
    # for a foreign compression method), in an array header (ValueError, SyntaxError of its dict
    # literal) or in the structure (JSONDecodeError, UnicodeDecodeError, RecursionError).
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, SyntaxError, NotImplementedError, RecursionError,
            KeyError, TypeError, OverflowError) as err:
        raise StateFileError(f"{path}: corrupt or truncated state file ({type(err).__name__}: {err})") from None
    if structure is missing:
        raise StateFileError(f"{path}: not an sclref state file (no {_STRUCTURE})")
    try:
        return _unflatten(structure, arrays)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
        raise StateFileError(f"{path}: corrupt state file: its structure does not match its arrays "
                             f"({type(err).__name__})") from None
