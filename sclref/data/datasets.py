"""Image-classification datasets read from local files, checked and standardized, as NumPy arrays.

Nothing is ever downloaded. Three sources are understood: scikit-learn's bundled 8x8
digits (the default), a directory of the four MNIST-format IDX files (MNIST,
Fashion-MNIST, KMNIST), and a ``.npz`` archive. Each loader returns a `Dataset` whose
images have shape (N, C, H, W) and whose labels are int64.

Preprocessing is the same for every source: pixels are scaled to [0, 1] by the dataset's
largest possible value (255 for MNIST-format files, 16 for digits), then standardized by
the scalar mean and standard deviation of the *train* images; the test images reuse the
train statistics, so nothing about the test set leaks into training.
"""

from __future__ import annotations

import math
import numbers
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sclref.data.idx import _atomic_open, read_idx

__all__ = ["Dataset", "DatasetError", "MNIST_FILES", "load", "load_digits", "load_mnist_dir", "load_npz",
           "preprocess", "save_npz", "subset"]

MNIST_FILES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}
"""The standard MNIST-format file names; each may also be stored with a ``.gz`` suffix."""

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Standardization works on blocks of about this many values, so a float32 request never
# holds a float64 copy of the whole train set.
_BLOCK = 1 << 20


class DatasetError(ValueError):
    """Dataset files or arrays that are present but unusable: bad shapes, counts, labels or keys."""


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dataset dtype must be float32 or float64, got {dt}")
    return dt


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Train and test splits of an image-classification dataset.

    Parameters
    ----------
    x_train, x_test : numpy.ndarray
        Images of shape (N, C, H, W), both float32 or both float64, with the same (C, H, W).
    y_train, y_test : numpy.ndarray
        Labels of shape (N,), int64, non-negative, one per image.
    name : str
        A short name for reports.

    Raises
    ------
    DatasetError
        When shapes, dtypes or labels break the rules above.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "dataset"

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype not in (np.float32, np.float64):
                raise DatasetError(f"{self.name}: x_{split} must be a float32 or float64 array of shape (N, C, H, W), "
                                   f"got {_describe(x)}")
            if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype != np.int64:
                raise DatasetError(f"{self.name}: y_{split} must be an int64 array of shape (N,), got {_describe(y)}")
            if len(x) != len(y):
                raise DatasetError(f"{self.name}: {split}: {len(x)} images but {len(y)} labels")
            if y.size and y.min() < 0:
                raise DatasetError(f"{self.name}: y_{split} holds a negative label {y.min()}")
        if len(self.x_train) == 0:
            raise DatasetError(f"{self.name}: the train set is empty")
        if self.x_train.dtype != self.x_test.dtype:
            raise DatasetError(f"{self.name}: x_train is {self.x_train.dtype} but x_test is {self.x_test.dtype}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(f"{self.name}: train images are {self.x_train.shape[1:]} "
                               f"but test images are {self.x_test.shape[1:]}")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each of the four arrays, by field name."""
        return {key: getattr(self, key).shape for key in _NPZ_KEYS}

    @property
    def num_classes(self) -> int:
        """One more than the largest label of either split."""
        return int(max(self.y_train.max(), self.y_test.max(initial=0))) + 1

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        return self.x_train.shape[1:]

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of the images."""
        return self.x_train.dtype

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
                f"classes={self.num_classes}, dtype={self.dtype})")


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} of shape {a.shape}"
    return type(a).__name__


def _blocks(x: np.ndarray):
    rows = max(1, _BLOCK // max(1, math.prod(x.shape[1:])))
    for start in range(0, len(x), rows):
        yield slice(start, start + rows)


def preprocess(x_train, x_test, pixel_max: float, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Scale images to [0, 1] by `pixel_max`, then standardize them by the train set's statistics.

    ``x -> (x / pixel_max - mean) / std``, where `mean` and `std` are the scalar mean and
    (population) standard deviation of ``x_train / pixel_max``, computed in float64.

    Parameters
    ----------
    x_train, x_test : array_like
        Raw images of any real dtype and any shape with the sample axis first.
    pixel_max : float
        The largest value a pixel can take (255 for 8-bit images).
    dtype : {numpy.float64, numpy.float32}
        The dtype of the returned arrays.

    Returns
    -------
    x_train, x_test : numpy.ndarray
        New arrays of the input shapes and the requested dtype.

    Raises
    ------
    DatasetError
        When the train set is empty or constant (its standard deviation is zero), or
        either set holds NaN or infinite values.
    """
    dtype = _float_dtype(dtype)
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    if not (isinstance(pixel_max, numbers.Real) and math.isfinite(pixel_max) and pixel_max > 0):
        raise ValueError(f"pixel_max must be a positive finite number, got {pixel_max!r}")
    if x_train.size == 0:
        raise DatasetError("cannot standardize an empty train set")
    scale = float(pixel_max)
    for what, x in (("train", x_train), ("test", x_test)):
        if x.dtype.kind == "f" and not all(np.isfinite(x[s]).all() for s in _blocks(x)):
            raise DatasetError(f"the {what} images hold NaN or infinite values")
    # Rounding would turn a constant train set into a tiny nonzero std and huge outputs.
    if np.min(x_train) == np.max(x_train):
        raise DatasetError("cannot standardize: every train pixel has the same value")
    # Two passes over float64 blocks: the mean first, then the spread about it.
    mean = sum(float(np.sum(x_train[s] / scale, dtype=np.float64)) for s in _blocks(x_train)) / x_train.size
    sq = sum(float(np.sum(np.square(x_train[s] / scale - mean), dtype=np.float64)) for s in _blocks(x_train))
    std = math.sqrt(sq / x_train.size)
    if std == 0.0:
        raise DatasetError("cannot standardize: the train pixels are too close together")
    out = []
    for x in (x_train, x_test):
        y = np.empty(x.shape, dtype=dtype)
        for s in _blocks(x):
            y[s] = (x[s] / scale - mean) / std
        out.append(y)
    return out[0], out[1]


def _find_mnist_files(directory: Path) -> dict[str, Path]:
    found, missing = {}, []
    for role, stem in MNIST_FILES.items():
        # The raw file wins over its .gz twin: it is what `gunzip -k` leaves next to the archive.
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{stem}[.gz] ({role})")
        else:
            found[role] = path
    if missing:
        present = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"{directory}: missing MNIST-format files: {', '.join(missing)}; "
                                f"the directory holds: {', '.join(present) or 'nothing'}")
    return found


def load_mnist_dir(directory, dtype=np.float64, num_classes: int | None = None) -> Dataset:
    """Load a directory of the four MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST).

    The files are those of `MNIST_FILES`, each raw or gzip-compressed (with a ``.gz``
    suffix). Images become (N, 1, H, W) and are preprocessed with a pixel maximum of 255
    (see `preprocess`).

    Parameters
    ----------
    directory : str or os.PathLike
        The directory holding the files; its name becomes the dataset's name.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.
    num_classes : int, optional
        When given, every label must be below it. Otherwise test labels must lie within
        the range of the train labels.

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        When the directory or any of the four files is missing; the message lists them.
    IDXError
        When a file is not a well-formed IDX file.
    DatasetError
        When images are not 3-D uint8, labels not 1-D integers, counts or image sizes
        disagree, or a label is out of range.
    """
    dtype = _float_dtype(dtype)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    paths = _find_mnist_files(directory)
    arrays = {}
    for role, path in paths.items():
        a = read_idx(path)
        if role.endswith("images") and (a.ndim != 3 or a.dtype != np.uint8):
            raise DatasetError(f"{path}: images must be uint8 of shape (N, H, W), got {_describe(a)}")
        if role.endswith("labels") and (a.ndim != 1 or a.dtype.kind not in "iu"):
            raise DatasetError(f"{path}: labels must be integers of shape (N,), got {_describe(a)}")
        arrays[role] = a
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split} images"]), len(arrays[f"{split} labels"])
        if n_images != n_labels:
            raise DatasetError(f"{directory}: {split}: {n_images} images but {n_labels} labels")
    if arrays["train images"].shape[1:] != arrays["test images"].shape[1:]:
        raise DatasetError(f"{directory}: train images are {arrays['train images'].shape[1:]} "
                           f"but test images are {arrays['test images'].shape[1:]}")
    if len(arrays["train labels"]) == 0:
        raise DatasetError(f"{paths['train labels']}: the train set is empty")
    if num_classes is None:
        top = int(arrays["train labels"].max())
    else:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        top = int(num_classes) - 1
    for split in ("train", "test"):
        labels, path = arrays[f"{split} labels"], paths[f"{split} labels"]
        bad = labels[(labels < 0) | (labels > top)]
        if bad.size:
            limit = f"num_classes={num_classes}" if num_classes is not None else "the range of the train labels"
            raise DatasetError(f"{path}: label {bad[0]} is outside 0..{top} ({limit}); {bad.size} labels out of range")
    try:
        x_train, x_test = preprocess(arrays["train images"][:, None], arrays["test images"][:, None], 255, dtype)
    except DatasetError as err:
        raise DatasetError(f"{directory}: {err}") from None
    return Dataset(x_train, arrays["train labels"].astype(np.int64), x_test, arrays["test labels"].astype(np.int64),
                   name=directory.resolve().name)


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype=np.float64) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, pixels 0..16), split in two.

    The split is stratified: each class gives ``round(test_fraction * count)`` of its
    images, chosen by a generator seeded with `seed`, to the test set. Both splits keep
    the original order. Images are (N, 1, 8, 8), preprocessed with a pixel maximum of 16.

    Parameters
    ----------
    test_fraction : float
        The share of each class held out for testing, strictly between 0 and 1.
    seed : int
        Seed of the split; independent of sclref's default generator.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.

    Returns
    -------
    Dataset

    Raises
    ------
    ImportError
        When scikit-learn is not installed.
    """
    dtype = _float_dtype(dtype)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError("the digits dataset ships with scikit-learn: pip install scikit-learn") from err
    bunch = sklearn_load_digits()
    images, labels = np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    gen = np.random.default_rng(int(seed))
    held_out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = math.floor(test_fraction * len(members) + 0.5)
        held_out.append(gen.permutation(members)[:k])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(held_out)] = True
    if is_test.all() or not is_test.any():
        raise ValueError(f"test_fraction={test_fraction} leaves one of the splits empty")
    x_train, x_test = preprocess(images[~is_test, None], images[is_test, None], 16, dtype)
    return Dataset(x_train, labels[~is_test], x_test, labels[is_test], name="digits")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive that `load_npz` uses, with every reading failure as a DatasetError."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    # A zip that is not one, a cut-off file, a pickle: NumPy reports these in several ways.
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable .npz archive: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: not an .npz archive but a single {_describe(archive)}")
    with archive:
        missing = [key for key in _NPZ_KEYS if key not in archive.files]
        if missing:
            raise DatasetError(f"{path}: missing arrays {', '.join(missing)}; "
                               f"the archive holds: {', '.join(archive.files) or 'nothing'}")
        try:
            return {key: archive[key] for key in archive.files if key in _NPZ_KEYS + ("name", "pixel_max")}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable array in the archive: {err}") from None


def load_npz(path, dtype=np.float64) -> Dataset:
    """Load a dataset from a ``.npz`` archive holding x_train, y_train, x_test and y_test.

    Images may be (N, C, H, W) or (N, H, W), read as one channel. Without a ``pixel_max``
    entry the images must be floats and are taken as already preprocessed, as `save_npz`
    writes them; with a scalar ``pixel_max`` they are raw pixels and go through
    `preprocess`. An optional string ``name`` entry names the dataset (default: the
    file's stem). Nothing is unpickled.

    Parameters
    ----------
    path : str or os.PathLike
        The archive.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        When `path` does not exist.
    DatasetError
        When the file is not a readable ``.npz`` archive, keys are missing, or the arrays
        have the wrong shapes or dtypes.
    """
    dtype = _float_dtype(dtype)
    path = Path(path)
    arrays = _read_npz(path)
    name = path.stem
    if "name" in arrays:
        if arrays["name"].ndim != 0 or arrays["name"].dtype.kind != "U":
            raise DatasetError(f"{path}: name must be a string scalar, got {_describe(arrays['name'])}")
        name = str(arrays["name"])
    images = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.dtype.kind not in "biuf":
            raise DatasetError(f"{path}: x_{split} must be numbers of shape (N, C, H, W) or (N, H, W), "
                               f"got {_describe(arrays[f'x_{split}'])}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DatasetError(f"{path}: y_{split} must be integers of shape (N,), got {_describe(y)}")
        if len(x) != len(y):
            raise DatasetError(f"{path}: {split}: {len(x)} images but {len(y)} labels")
        images[split] = x
    if "pixel_max" in arrays:
        pixel_max = arrays["pixel_max"]
        if pixel_max.ndim != 0 or pixel_max.dtype.kind not in "iuf":
            raise DatasetError(f"{path}: pixel_max must be a number, got {_describe(pixel_max)}")
        try:
            x_train, x_test = preprocess(images["train"], images["test"], pixel_max.item(), dtype)
        except (DatasetError, ValueError) as err:
            raise DatasetError(f"{path}: {err}") from None
    else:
        for split, x in images.items():
            if x.dtype.kind != "f":
                raise DatasetError(f"{path}: x_{split} is {x.dtype}: raw integer pixels need a pixel_max entry "
                                   f"(e.g. 255) so they can be standardized")
        x_train, x_test = images["train"].astype(dtype), images["test"].astype(dtype)
        for split, x in (("train", x_train), ("test", x_test)):
            if not np.isfinite(x).all():
                raise DatasetError(f"{path}: x_{split} holds NaN or infinite values")
    return Dataset(x_train, arrays["y_train"].astype(np.int64), x_test, arrays["y_test"].astype(np.int64), name=name)


def save_npz(dataset: Dataset, path) -> None:
    """Write `dataset` to an uncompressed ``.npz`` archive that `load_npz` reads back unchanged.

    The archive appears at `path` only once complete (temporary file, then a move).

    Parameters
    ----------
    dataset : Dataset
        The dataset, already preprocessed.
    path : str or os.PathLike
        Destination; an existing file is replaced. No suffix is added.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"save_npz expects a Dataset, got {type(dataset).__name__}")
    with _atomic_open(path) as f:
        np.savez(f, x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test, y_test=dataset.y_test,
                 name=np.str_(dataset.name))


def load(spec="digits", dtype=np.float64) -> Dataset:
    """Load a dataset by name or path.

    Parameters
    ----------
    spec : str or os.PathLike
        ``"digits"`` for scikit-learn's digits (the default), a directory of MNIST-format
        files (`load_mnist_dir`), or a ``.npz`` file (`load_npz`). A directory that happens
        to be called ``digits`` is reached as ``./digits``.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        When `spec` is none of the above.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"dataset spec must be a name or a path, got {type(spec).__name__}")
    if isinstance(spec, str) and spec == "digits":
        return load_digits(dtype=dtype)
    path = Path(spec)
    if path.is_dir():
        return load_mnist_dir(path, dtype=dtype)
    if path.suffix == ".npz":
        return load_npz(path, dtype=dtype)
    raise DatasetError(f"unknown dataset {os.fspath(spec)!r}: expected 'digits', a directory of MNIST-format files "
                       f"or a .npz file")


def subset(dataset: Dataset, n_train: int, n_test: int | None = None) -> Dataset:
    """The first `n_train` train and first `n_test` test samples of `dataset`, for quick runs.

    The arrays are copies, so the full dataset can be freed. The standardization of the
    full dataset is kept as it is.

    Parameters
    ----------
    dataset : Dataset
    n_train : int
        Number of train samples, from 1 to ``len(dataset.x_train)``.
    n_test : int, optional
        Number of test samples, from 0 to ``len(dataset.x_test)``; all of them when omitted.

    Returns
    -------
    Dataset
    """
    if n_test is None:
        n_test = len(dataset.x_test)
    for what, n, low, high in (("n_train", n_train, 1, len(dataset.x_train)),
                               ("n_test", n_test, 0, len(dataset.x_test))):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not low <= n <= high:
            raise ValueError(f"{what} must be an integer from {low} to {high}, got {n!r}")
    return Dataset(dataset.x_train[:n_train].copy(), dataset.y_train[:n_train].copy(),
                   dataset.x_test[:n_test].copy(), dataset.y_test[:n_test].copy(), name=dataset.name)

