"""Read the arrays of a ``.npz`` archive with every size bounded and nothing ever unpickled.

`numpy.load` trusts an archive: a ``.npy`` header claiming a huge shape is allocated
before its data is read, an object array is one ``allow_pickle`` away from running code,
and a corrupt zip surfaces as any of a dozen exception types. `read_npz` reads the zip
directory, then each wanted member's ``.npy`` header, checks the dtype it may hold and
the allocation its shape implies (`sclref.errors.check_allocation`), and only then reads
the data, piece by piece, up to the end of the member (so zip checks its CRC). Every
failure is an `NpzError` naming the file, the member and the problem.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable

import numpy as np

from sclref import storage
from sclref.errors import InputError, check_allocation

__all__ = ["NpzError", "read_npz"]

_NPY_MAGIC = b"\x93NUMPY"
# numpy.load's own bound on a header (max_header_size); np.save writes about 128 bytes.
_MAX_HEADER = 10_000
# np.savez stores, np.savez_compressed deflates; other methods would reach bz2/lzma decoders.
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# What zipfile, zlib and NumPy's header parser raise on corrupt bytes. RuntimeError covers an
# encrypted member, NotImplementedError and RecursionError (both RuntimeErrors) odd headers.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, struct.error, EOFError, OSError, ValueError, TypeError, KeyError,
                IndexError, OverflowError, MemoryError, RuntimeError)


class NpzError(InputError):
    """An ``.npz`` archive, or one of its members, that sclref refuses to read."""


def read_npz(path, required: Iterable[str], optional: Iterable[str],
             accepts: Callable[[str, np.dtype], str | None]) -> dict[str, np.ndarray]:
    """The arrays named in `required` and `optional` that the archive at `path` holds, read with bounded memory.

    Parameters
    ----------
    path : str or os.PathLike
        The archive.
    required, optional : iterable of str
        Array names (member names without ``.npy``): those the archive must hold and those
        it may hold. Other members are not read.
    accepts : callable
        ``accepts(name, dtype)`` returns None when array `name` may have `dtype`, else a
        short description of what it must be; called before the array is allocated.

    Returns
    -------
    dict of str to numpy.ndarray
        The wanted arrays present in the archive, in the archive's byte order and memory
        order.

    Raises
    ------
    NpzError
        When the file is not a readable zip archive, a required array is missing, a member is
        compressed by a method other than stored or deflate, is encrypted, is not a
        ``.npy`` array, holds objects (never unpickled), has a refused dtype, or is cut
        short or longer than its header says.
    sclref.errors.LimitError
        When a member's header claims an array larger than sclref allocates at once.
    FileNotFoundError
        When `path` does not exist.
    """
    path = os.fspath(path)
    required = list(required)
    wanted = set(required) | set(optional)
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise NpzError(f"{path}: not an .npz archive but a single .npy array")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                members, names = {}, []
                for info in archive.infolist():
                    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    names.append(key)
                    # zipfile resolves a name stored twice to its last entry; so does this.
                    if key in wanted:
                        members[key] = info
                missing = [key for key in required if key not in members]
                if missing:
                    raise NpzError(f"{path}: missing arrays {', '.join(missing)}; "
                                   f"the archive holds: {', '.join(names) or 'nothing'}")
                return {key: _read_member(path, archive, info, key, accepts) for key, info in members.items()}
        except InputError:
            raise
        except _READ_ERRORS as err:
            raise NpzError(f"{path}: not a readable .npz archive: {type(err).__name__}: {err}") from None


def _read_member(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, accepts) -> np.ndarray:
    where = f"{path}: member {info.filename!r}"
    if info.compress_type not in _METHODS:
        raise NpzError(f"{where}: compression method {info.compress_type} is not one NumPy writes "
                       f"({', '.join(_METHODS.values())})")
    if info.flag_bits & 0x1:
        raise NpzError(f"{where}: the member is encrypted")
    try:
        with archive.open(info) as member:
            shape, fortran_order, dtype = _read_npy_header(where, member)
            if dtype.hasobject:
                raise NpzError(f"{where}: an array of Python objects ({dtype}); sclref never unpickles")
            problem = accepts(key, dtype)
            if problem is not None:
                raise NpzError(f"{where}: {key} must be {problem}, got {dtype}")
            # NumPy indexes with int64 even when a zero side makes the array empty.
            if math.prod(abs(d) for d in shape if d) * dtype.itemsize >= 2**63:
                raise NpzError(f"{where}: shape {shape} overflows NumPy's index range")
            nbytes = check_allocation(shape, dtype.itemsize, f"{where}: the .npy header's shape {shape} of {dtype}")
            try:
                buffer = storage.read_exactly(member, nbytes)
            except storage.ShortRead as short:
                raise NpzError(f"{where}: truncated: the header announces {nbytes} bytes of data, "
                               f"found {short.got}") from None
            # Reading to the end lets zipfile check the member's CRC; a longer member is not NumPy's.
            if member.read(1):
                raise NpzError(f"{where}: trailing bytes after the {nbytes} bytes of data")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    except InputError:
        raise
    except _READ_ERRORS as err:
        raise NpzError(f"{where}: unreadable: {type(err).__name__}: {err}") from None


def _read_npy_header(where: str, member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, memory order and dtype from a ``.npy`` header, its length bounded before it is read."""
    magic = member.read(len(_NPY_MAGIC) + 2)
    if len(magic) < len(_NPY_MAGIC) + 2 or magic[:len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise NpzError(f"{where}: not a .npy array (no \\x93NUMPY magic string)")
    version = (magic[-2], magic[-1])
    if version not in ((1, 0), (2, 0)):
        raise NpzError(f"{where}: .npy format version {version[0]}.{version[1]} is not read (1.0 and 2.0 are)")
    size_field = member.read(2 if version == (1, 0) else 4)
    if len(size_field) < (2 if version == (1, 0) else 4):
        raise NpzError(f"{where}: truncated .npy header")
    length = int.from_bytes(size_field, "little")
    if length > _MAX_HEADER:
        raise NpzError(f"{where}: a .npy header of {length:,} bytes (at most {_MAX_HEADER:,} are read)")
    header = member.read(length)
    if len(header) < length:
        raise NpzError(f"{where}: truncated .npy header: {len(header)} of {length} bytes")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        with warnings.catch_warnings():
            # NumPy warns when a header needs its Python 2 filter (a tokenizer pass); the header is still good.
            warnings.simplefilter("ignore", UserWarning)
            return reader(io.BytesIO(size_field + header), max_header_size=_MAX_HEADER)
    # The Python 2 filter tokenizes the header, so a broken one can also raise tokenize.TokenError.
    except (ValueError, SyntaxError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError,
            tokenize.TokenError) as err:
        raise NpzError(f"{where}: bad .npy header: {type(err).__name__}: {err}") from None
