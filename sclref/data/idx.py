"""Read and write IDX files, the format of MNIST and its look-alikes, raw or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order, big-endian.
`read_idx` checks every part of that layout and reports a broken file as an `IDXError`
that names the file and the problem, rather than returning a misshapen array. The
header is read first: the array it announces must pass `sclref.errors.check_allocation`
before anything is allocated, and a gzip stream is never decompressed beyond the bytes
the header announces plus one (a decompression bomb is refused, not expanded).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from sclref import storage
from sclref.errors import InputError, check_allocation

__all__ = ["IDXError", "read_idx", "write_idx"]

# type code -> big-endian dtype, as listed in the IDX specification.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
# NumPy's limit; a larger count in the magic number cannot come from a real array.
_MAX_NDIM = 64
# What a corrupt gzip stream raises: BadGzipFile (an OSError) for a bad header or CRC, EOFError
# for a cut-off stream, zlib.error for bad deflate data, struct.error for a cut-off header field.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, struct.error)


class IDXError(InputError):
    """A file that is not a well-formed IDX file; the message names the file and the problem.

    An `sclref.errors.InputError`, hence also a `ValueError`.

    Attributes
    ----------
    path : str
        The file that failed to read.
    """

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


def _read_exactly(f, n: int) -> bytes:
    """Up to `n` bytes of `f`, fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_header(path, f) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, file dtype and header length of the IDX stream `f`, every field checked."""
    magic = _read_exactly(f, 4)
    if len(magic) < 4:
        raise IDXError(path, f"truncated header: {len(magic)} bytes, an IDX file starts with a 4-byte magic number")
    zero0, zero1, code, ndim = magic
    if zero0 or zero1:
        raise IDXError(path, f"bad magic number {magic.hex()}: the first two bytes must be zero")
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise IDXError(path, f"unknown type code 0x{code:02X} (expected one of {known})")
    if not 1 <= ndim <= _MAX_NDIM:
        raise IDXError(path, f"bad number of dimensions {ndim} (expected 1 to {_MAX_NDIM})")
    offset = 4 + 4 * ndim
    dims = _read_exactly(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise IDXError(path, f"truncated header: {ndim} dimensions need {offset} bytes, found {4 + len(dims)}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    dtype = _DTYPES[code]
    # NumPy indexes with int64 even when a zero side makes the array empty.
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**63:
        raise IDXError(path, f"dimensions {shape} overflow NumPy's index range")
    check_allocation(shape, dtype.itemsize, f"{os.fspath(path)}: the IDX header's dimensions {shape} of {dtype.name}")
    return shape, dtype, offset


def _read_data(path, f, n: int) -> bytearray:
    """Exactly `n` bytes of `f` in one buffer, read piece by piece; an `IDXError` if fewer remain."""
    try:
        return storage.read_exactly(f, n)
    except storage.ShortRead as short:
        raise IDXError(path, f"truncated: expected {n} bytes of data, found {short.got}") from None


def _read_raw(path, f) -> np.ndarray:
    shape, dtype, offset = _read_header(path, f)
    expected = dtype.itemsize * math.prod(shape)
    found = os.fstat(f.fileno()).st_size - offset
    if found < expected:
        raise IDXError(path, f"truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise IDXError(path, f"{found - expected} trailing bytes after the {expected} bytes of data")
    return _as_array(_read_data(path, f, expected), shape, dtype)


def _read_gzip(path, f) -> np.ndarray:
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as gz:
            shape, dtype, _ = _read_header(path, gz)
            expected = dtype.itemsize * math.prod(shape)
            buffer = _read_data(path, gz, expected)
            # One byte more: the end of the stream (where gzip checks its CRC) or proof of trailing data.
            if gz.read(1):
                raise IDXError(path, f"trailing bytes after the {expected} bytes of data")
    except _GZIP_ERRORS as err:
        raise IDXError(path, f"corrupt gzip data: {err}") from None
    return _as_array(buffer, shape, dtype)


def _as_array(buffer: bytearray, shape, dtype: np.dtype) -> np.ndarray:
    """The big-endian values in `buffer` as an array of native byte order, in the buffer's own memory."""
    data = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if not dtype.isnative:
        data.byteswap(inplace=True)
    return data.view(dtype.newbyteorder("="))


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a NumPy array of native byte order.

    Compression is detected from the first two bytes (1f 8b), not from the file name.
    The header is checked before any data is read: the array it announces must fit in
    `sclref.errors.max_allocation_bytes`, and a gzip stream is decompressed only up to
    the announced size plus one byte.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.

    Returns
    -------
    numpy.ndarray
        A fresh, writable array with the file's shape and one of the dtypes uint8, int8,
        int16, int32, float32, float64.

    Raises
    ------
    IDXError
        When the magic number, the dimensions or the data length are wrong, or the gzip
        stream is corrupt, cut short or longer than the header announces.
    sclref.errors.LimitError
        When the array the header announces is larger than sclref allocates at once.
    FileNotFoundError
        When `path` does not exist.
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        return _read_gzip(path, f) if compressed else _read_raw(path, f)


def write_idx(path, array) -> None:
    """Write `array` as an IDX file, gzip-compressed when `path` ends with ``.gz``.

    The file appears at `path` only once complete: it is written to a temporary file in
    the same directory and moved into place.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; an existing file is replaced.
    array : array_like
        At least one dimension, each below 2**32, of dtype uint8, int8, int16, int32,
        float32 or float64 (any byte order).

    Raises
    ------
    TypeError
        When the dtype has no IDX type code.
    ValueError
        When the array is 0-dimensional or has too many dimensions or a dimension too large.
    """
    array = np.asarray(array)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(f"IDX has no type for dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64")
    if not 1 <= array.ndim <= _MAX_NDIM:
        raise ValueError(f"IDX needs 1 to {_MAX_NDIM} dimensions, got an array of shape {array.shape}")
    if any(d >= 2**32 for d in array.shape):
        raise ValueError(f"IDX dimensions are uint32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    with storage.atomic_open(path) as f:
        if os.fspath(path).endswith(".gz"):
            # mtime=0 and no stored file name: the same array always gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=6, mtime=0) as gz:
                gz.write(header)
                gz.write(data)
        else:
            f.write(header)
            f.write(data)
