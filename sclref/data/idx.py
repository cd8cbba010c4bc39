"""Read and write IDX files, the format of MNIST and its look-alikes, raw or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order, big-endian.
`read_idx` checks every part of that layout and reports a broken file as an `IDXError`
that names the file and the problem, rather than returning a misshapen array.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import zlib

import numpy as np

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


class IDXError(ValueError):
    """A file that is not a well-formed IDX file; the message names the file and the problem.

    Attributes
    ----------
    path : str
        The file that failed to read.
    """

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


def _read_bytes(path) -> bytes:
    """The file's content, decompressed when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        content = f.read()
    if not content.startswith(_GZIP_MAGIC):
        return content
    try:
        return gzip.decompress(content)
    # BadGzipFile is an OSError; a cut-off stream is an EOFError; bad deflate data is a zlib.error.
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(path, f"corrupt gzip data: {err}") from None


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a NumPy array of native byte order.

    Compression is detected from the first two bytes (1f 8b), not from the file name.

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
        stream is corrupt or cut short.
    FileNotFoundError
        When `path` does not exist.
    """
    content = _read_bytes(path)
    if len(content) < 4:
        raise IDXError(path, f"truncated header: {len(content)} bytes, an IDX file starts with a 4-byte magic number")
    zero0, zero1, code, ndim = content[:4]
    if zero0 or zero1:
        raise IDXError(path, f"bad magic number {content[:4].hex()}: the first two bytes must be zero")
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise IDXError(path, f"unknown type code 0x{code:02X} (expected one of {known})")
    if not 1 <= ndim <= _MAX_NDIM:
        raise IDXError(path, f"bad number of dimensions {ndim} (expected 1 to {_MAX_NDIM})")
    offset = 4 + 4 * ndim
    if len(content) < offset:
        raise IDXError(path, f"truncated header: {ndim} dimensions need {offset} bytes, found {len(content)}")
    shape = tuple(int(d) for d in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = dtype.itemsize * int(np.prod(shape, dtype=object))
    found = len(content) - offset
    if found < expected:
        raise IDXError(path, f"truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise IDXError(path, f"{found - expected} trailing bytes after the {expected} bytes of data")
    data = np.frombuffer(content, dtype=dtype, offset=offset)
    # astype copies: the result owns writable memory in native byte order.
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


@contextlib.contextmanager
def _atomic_open(path):
    """A binary file that replaces `path` only once it has been written in full.

    The temporary file sits in the same directory (so `os.replace` is atomic) and is
    created with mode 0o666 filtered by the umask, like an ordinary new file.
    """
    path = os.fspath(path)
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    with _atomic_open(path) as f:
        if os.fspath(path).endswith(".gz"):
            # mtime=0 and no stored file name: the same array always gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=6, mtime=0) as gz:
                gz.write(header)
                gz.write(data)
        else:
            f.write(header)
            f.write(data)
