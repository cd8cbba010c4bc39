"""Read CIFAR-10 and CIFAR-100 from their binary version (fixed-size records, no pickles) into a `Dataset`.

The binary distributions are flat files of records, each one or two label bytes then
3,072 pixel bytes (32x32 red, then green, then blue, rows in order):

- CIFAR-10 (``cifar-10-batches-bin``): ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
  ``test_batch.bin``, records of 1 label byte (0..9) + 3,072 pixels;
- CIFAR-100 (``cifar-100-binary``): ``train.bin`` and ``test.bin``, records of a coarse
  label byte (0..19), a fine label byte (0..99), then 3,072 pixels.

A file is accepted only when its size is a whole number of records and every label is
in range; the total size is checked by `sclref.errors.check_allocation` before it is
read. The Python versions of these datasets are pickles and are never read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sclref.data.datasets import Dataset, DatasetError, _as_labels, _with_source, preprocess
from sclref.errors import InputError, check_allocation

__all__ = ["CIFAR10_FILES", "CIFAR100_FILES", "IMAGE_SHAPE", "is_cifar_dir", "load_cifar_dir", "read_records"]

IMAGE_SHAPE = (3, 32, 32)
"""The (C, H, W) shape of a CIFAR image."""

CIFAR10_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
"""The files of binary CIFAR-10, by split."""

CIFAR100_FILES = {"train": ("train.bin",), "test": ("test.bin",)}
"""The files of binary CIFAR-100, by split."""

_PIXELS = int(np.prod(IMAGE_SHAPE))
_CHUNK = 1 << 20


def read_records(paths, label_bytes: int) -> np.ndarray:
    """The records of `paths`, one after another, as a uint8 array of shape (N, label_bytes + 3072).

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Files of whole records.
    label_bytes : int
        Label bytes before the pixels of a record: 1 for CIFAR-10, 2 for CIFAR-100.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    DatasetError
        When a file's size is not a whole number of records, or a file shrinks while read.
    sclref.errors.LimitError
        When the files together are larger than sclref allocates at once.
    FileNotFoundError
        When a file does not exist.
    """
    record = label_bytes + _PIXELS
    counts = []
    for path in paths:
        size = os.stat(path).st_size
        if size % record:
            raise DatasetError(f"{os.fspath(path)}: {size:,} bytes is not a whole number of {record:,}-byte records "
                               f"({label_bytes} label byte{'s' if label_bytes > 1 else ''} + {_PIXELS:,} pixels); "
                               f"{size % record:,} bytes are left over")
        counts.append(size // record)
    check_allocation((sum(counts), record), 1, f"the CIFAR records of {', '.join(map(os.fspath, paths))}")
    records = np.empty((sum(counts), record), dtype=np.uint8)
    flat = memoryview(records.reshape(-1))
    start = 0
    for path, count in zip(paths, counts, strict=True):
        with open(path, "rb") as f:
            stop = start + count * record
            while start < stop:
                n = f.readinto(flat[start:min(stop, start + _CHUNK)])
                if not n:
                    raise DatasetError(f"{os.fspath(path)}: the file shrank while it was read")
                start += n
            if f.read(1):
                raise DatasetError(f"{os.fspath(path)}: the file grew while it was read")
    return records


def _find(directory: Path, names) -> list[Path]:
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        present = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"{directory}: missing CIFAR files: {', '.join(missing)}; "
                                f"the directory holds: {', '.join(present) or 'nothing'}")
    return [directory / name for name in names]


def is_cifar_dir(directory) -> str | None:
    """``"cifar10"`` or ``"cifar100"`` when `directory` holds a file of that dataset's binary version, else None."""
    directory = Path(directory)
    for kind, files in (("cifar10", CIFAR10_FILES), ("cifar100", CIFAR100_FILES)):
        if any((directory / name).is_file() for names in files.values() for name in names):
            return kind
    return None


def load_cifar_dir(directory, dtype=np.float64, label: str = "fine", preprocessing=None) -> Dataset:
    """Load binary CIFAR-10 or CIFAR-100 from a directory, as images of shape (N, 3, 32, 32).

    Which dataset is decided by the file names (`CIFAR10_FILES`, `CIFAR100_FILES`).
    Images are preprocessed with a pixel maximum of 255 (see `sclref.data.preprocess`).

    Parameters
    ----------
    directory : str or os.PathLike
        The directory holding the files; its name becomes the dataset's name.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.
    label : {"fine", "coarse"}
        For CIFAR-100, the 100 fine classes or the 20 coarse ones; unused for CIFAR-10.
    preprocessing : dict, optional
        A preprocessing record to apply instead of the train statistics; its
        ``pixel_max`` must be 255.

    Returns
    -------
    Dataset
        With `Dataset.preprocessing` set to the record applied.

    Raises
    ------
    FileNotFoundError
        When the directory, or one of the files of the dataset it holds, is missing.
    DatasetError
        When a file is not a whole number of records, a label is out of range (the message
        names the file, the record and the label), or the train split is empty.
    sclref.errors.LimitError
        When the files are larger than sclref allocates at once.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    kind = is_cifar_dir(directory)
    if kind is None:
        raise FileNotFoundError(f"{directory}: holds none of the files of binary CIFAR-10 "
                                f"({', '.join(CIFAR10_FILES['train'] + CIFAR10_FILES['test'])}) or CIFAR-100 "
                                f"({', '.join(CIFAR100_FILES['train'] + CIFAR100_FILES['test'])})")
    files = CIFAR10_FILES if kind == "cifar10" else CIFAR100_FILES
    label_bytes = 1 if kind == "cifar10" else 2
    # CIFAR-100 records hold the coarse label first, then the fine one.
    at, classes = (0, 10) if kind == "cifar10" else ((1, 100) if label == "fine" else (0, 20))
    splits = {}
    for split, names in files.items():
        paths = _find(directory, names)
        records = read_records(paths, label_bytes)
        labels = records[:, at]
        bad = np.flatnonzero(labels >= classes)
        if bad.size:
            path, index = _locate(paths, label_bytes, int(bad[0]))
            raise DatasetError(f"{path}: record {index}: label {labels[bad[0]]} is outside 0..{classes - 1} "
                               f"({kind}{' ' + label if kind == 'cifar100' else ''} labels); "
                               f"{bad.size} labels out of range")
        splits[split] = (records[:, label_bytes:].reshape(-1, *IMAGE_SHAPE), labels)
    if not len(splits["train"][1]):
        raise DatasetError(f"{directory}: the train set is empty")
    try:
        x_train, x_test, applied = preprocess(splits["train"][0], splits["test"][0], 255, dtype,
                                              statistics=preprocessing, return_statistics=True)
        return Dataset(x_train, _as_labels(splits["train"][1], directory), x_test,
                       _as_labels(splits["test"][1], directory), name=directory.resolve().name, preprocessing=applied)
    except InputError as err:
        raise _with_source(err, directory) from None


def _locate(paths, label_bytes: int, index: int) -> tuple[str, int]:
    """The file and the record number within it of record `index` of the files `paths` read in order."""
    record = label_bytes + _PIXELS
    for path in paths:
        count = os.stat(path).st_size // record
        if index < count:
            return os.fspath(path), index
        index -= count
    return os.fspath(paths[-1]), index
