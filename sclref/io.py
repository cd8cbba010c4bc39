"""Files that are never half-written: atomic writes, and nested state as one `.npz`.

Every file sclref writes goes to a temporary file in the target directory and is renamed
over the target only when complete, so an interrupted run leaves either the old file or
the new one. Nested state (dicts and lists of arrays, numbers, strings; optimizer and
model state, RNG states) is stored as one `.npz`: the arrays as members and the structure
as a JSON member that refers to them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

_STRUCTURE = "__structure__.json"
_MARKERS = frozenset({"__array__", "__list__", "__intdict__"})
# mkstemp creates files readable by their owner only; written files get the usual mode.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, payload) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


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
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)  # keeps 0-d arrays 0-d
            zf.writestr(f"{key}.npy", member.getvalue())
        zf.writestr(_STRUCTURE, json.dumps(structure))
    atomic_write_bytes(path, buf.getvalue())


def load_state(path):
    """Read what `save_state` wrote; a missing, truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such state file")
    missing = structure = object()
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if _STRUCTURE in names:
                structure = json.loads(zf.read(_STRUCTURE))
                for name in names:
                    if name != _STRUCTURE and name.endswith(".npy"):
                        with zf.open(name) as member:
                            arrays[name[:-4]] = np.lib.format.read_array(member, allow_pickle=False)
    # A cut-off or damaged file fails in the zip layer (BadZipFile, EOFError), in an array
    # header (ValueError) or in the structure (JSONDecodeError, UnicodeDecodeError: ValueErrors).
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: corrupt or truncated state file ({err})") from None
    if structure is missing:
        raise ValueError(f"{path}: not an sclref state file (no {_STRUCTURE})")
    try:
        return _unflatten(structure, arrays)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: corrupt state file: its structure does not match its arrays ({err!r})") from None
