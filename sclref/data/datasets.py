"""Image-classification datasets read from local files, checked and standardized, as NumPy arrays.

Nothing is ever downloaded. Three sources are understood here: scikit-learn's bundled
8x8 digits (the default), a directory of the four MNIST-format IDX files (MNIST,
Fashion-MNIST, KMNIST), and a ``.npz`` archive; `load` also reaches binary CIFAR
(`sclref.data.cifar`). Each loader returns a `Dataset` whose images have shape
(N, C, H, W) and whose labels are int64.

Preprocessing is the same for every source: pixels are scaled to [0, 1] by the dataset's
largest possible value (255 for MNIST-format files, 16 for digits), then standardized by
the scalar mean and standard deviation of the *train* images; the test images reuse the
train statistics, so nothing about the test set leaks into training. The statistics are
kept on the dataset (`Dataset.preprocessing`) and can be handed to a loader
(``load(spec, preprocessing=...)``) to standardize other files exactly as a model's
training data was.

Every size read from a file is bounded before it is used: arrays by
`sclref.errors.check_allocation`, labels by `MAX_CLASSES`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sclref import storage
from sclref.data.idx import read_idx
from sclref.data.npz import NpzError, read_npz
from sclref.errors import InputError, LimitError, check_allocation

__all__ = ["MAX_CLASSES", "MNIST_FILES", "PREPROCESSING_KEYS", "Dataset", "DatasetError", "check_preprocessing",
           "load", "load_digits", "load_mnist_dir", "load_npz", "preprocess", "save_npz", "subset"]

MNIST_FILES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}
"""The standard MNIST-format file names; each may also be stored with a ``.gz`` suffix."""

MAX_CLASSES = 100_000
"""The most classes a dataset may have: a label of ``MAX_CLASSES`` or more is refused.

The number of classes is one more than the largest label, and it sizes a model's output
layer and every per-class array, so a label read from a file is a size like any other.
Image-classification benchmarks stay far below (ImageNet-21k has 21,841 classes).
"""

PREPROCESSING_KEYS = ("pixel_max", "mean", "std")
"""The fields of `Dataset.preprocessing`, in the order `save_npz` stores them."""

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_OPTIONAL = ("name", "pixel_max", "preprocessing")
# Standardization works on blocks of about this many values, so a float32 request never
# holds a float64 copy of the whole train set.
_BLOCK = 1 << 20


class DatasetError(InputError):
    """Dataset files or arrays that are present but unusable: bad shapes, counts, labels or keys.

    An `sclref.errors.InputError`, hence also a `ValueError`.
    """


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dataset dtype must be float32 or float64, got {dt}")
    return dt


def check_preprocessing(preprocessing, source: str = "preprocessing") -> dict[str, float]:
    """Validate a preprocessing record and return it as a new dict of three floats.

    A record ``{"pixel_max": p, "mean": m, "std": s}`` means that a raw image ``x``
    becomes ``(x / p - m) / s``: pixels scaled to [0, 1] by the largest value a pixel
    can take, then standardized by the mean and standard deviation of the scaled train
    pixels.

    Parameters
    ----------
    preprocessing : mapping
        Exactly the keys of `PREPROCESSING_KEYS`, each a finite real number (not a
        bool), with ``pixel_max > 0`` and ``std > 0``.
    source : str
        Where the record came from, for the error message.

    Returns
    -------
    dict of str to float

    Raises
    ------
    DatasetError
        When the record breaks the rules above.
    """
    if not isinstance(preprocessing, Mapping):
        raise DatasetError(f"{source}: must be a mapping with keys {', '.join(PREPROCESSING_KEYS)}, "
                           f"got {type(preprocessing).__name__}")
    if set(preprocessing) != set(PREPROCESSING_KEYS):
        raise DatasetError(f"{source}: must have exactly the keys {', '.join(PREPROCESSING_KEYS)}, "
                           f"got {', '.join(sorted(map(repr, preprocessing))) or 'none'}")
    record = {}
    for key in PREPROCESSING_KEYS:
        value = preprocessing[key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise DatasetError(f"{source}: {key} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise DatasetError(f"{source}: {key} = {preprocessing[key]!r} is too large for a float") from None
        if not math.isfinite(value):
            raise DatasetError(f"{source}: {key} must be finite, got {value!r}")
        record[key] = value
    for key in ("pixel_max", "std"):
        if record[key] <= 0:
            raise DatasetError(f"{source}: {key} must be positive, got {record[key]!r}")
    return record


def _check_labels(y: np.ndarray, split: str, source, negative: bool = True) -> None:
    """Refuse a label of `MAX_CLASSES` or more (with `negative`, one below 0), naming it, its split and `source`."""
    if not y.size:
        return
    high = y.max()
    if high >= MAX_CLASSES:
        raise LimitError(f"{os.fspath(source)}: label {high} of the {split} split is beyond MAX_CLASSES = "
                         f"{MAX_CLASSES:,}; the number of classes (largest label + 1) sizes the model's outputs")
    low = y.min()
    if negative and low < 0:
        raise DatasetError(f"{source}: the {split} split holds a negative label {low}")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Train and test splits of an image-classification dataset.

    Parameters
    ----------
    x_train, x_test : numpy.ndarray
        Images of shape (N, C, H, W), both float32 or both float64, with the same (C, H, W).
    y_train, y_test : numpy.ndarray
        Labels of shape (N,), int64, from 0 to ``MAX_CLASSES - 1``, one per image.
    name : str
        A short name for reports.
    preprocessing : dict, optional
        How the images were made from raw pixels: ``{"pixel_max": p, "mean": m, "std":
        s}`` means ``x = (x_raw / p - m) / s`` (see `check_preprocessing`). The loaders
        fill it in; None when unknown. Stored as a new dict of floats.

    Raises
    ------
    DatasetError
        When shapes, dtypes, labels or the preprocessing record break the rules above.
    sclref.errors.LimitError
        When a label is `MAX_CLASSES` or more.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "dataset"
    preprocessing: dict | None = None

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
            _check_labels(y, split, self.name)
        if len(self.x_train) == 0:
            raise DatasetError(f"{self.name}: the train set is empty")
        if self.x_train.dtype != self.x_test.dtype:
            raise DatasetError(f"{self.name}: x_train is {self.x_train.dtype} but x_test is {self.x_test.dtype}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(f"{self.name}: train images are {self.x_train.shape[1:]} "
                               f"but test images are {self.x_test.shape[1:]}")
        if self.preprocessing is not None:
            object.__setattr__(self, "preprocessing",
                               check_preprocessing(self.preprocessing, f"{self.name}: preprocessing"))

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

    def fingerprint(self) -> str:
        """A SHA-256 hex digest of the dataset's content, to recognise the same data under another path.

        The digest covers the dtype, shape and values (in C order, little-endian) of
        x_train, y_train, x_test and y_test; not the name, nor the preprocessing record
        (the values already show its effect). The same arrays give the same digest
        wherever they were loaded from; one changed pixel, a float32 load of a float64
        dataset or another train/test split gives another. Only arrays that are not
        C-contiguous little-endian are copied.

        Returns
        -------
        str
            64 hexadecimal digits.
        """
        digest = hashlib.sha256(b"sclref.data.Dataset 1\n")
        for key in _NPZ_KEYS:
            a = getattr(self, key)
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            digest.update(f"{key} {a.dtype.str} {a.shape}\n".encode())
            digest.update(a.reshape(-1).view(np.uint8))
        return digest.hexdigest()

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


def preprocess(x_train, x_test, pixel_max: float, dtype=np.float64, *, statistics=None,
               return_statistics: bool = False):
    """Scale images to [0, 1] by `pixel_max`, then standardize them by the train set's statistics.

    ``x -> (x / pixel_max - mean) / std``, where `mean` and `std` are the scalar mean and
    (population) standard deviation of ``x_train / pixel_max``, computed in float64, or
    the values of `statistics` when given.

    Parameters
    ----------
    x_train, x_test : array_like
        Raw images of any real dtype and any shape with the sample axis first.
    pixel_max : float
        The largest value a pixel can take (255 for 8-bit images).
    dtype : {numpy.float64, numpy.float32}
        The dtype of the returned arrays.
    statistics : dict, optional
        A preprocessing record ``{"pixel_max", "mean", "std"}`` (see
        `check_preprocessing`) to apply instead of computing the train statistics, e.g.
        a model's own. Its ``pixel_max`` must equal `pixel_max`: images whose pixels
        range differently would be standardized wrongly.
    return_statistics : bool
        Also return the record that was applied.

    Returns
    -------
    x_train, x_test : numpy.ndarray
        New arrays of the input shapes and the requested dtype.
    statistics : dict
        Only with `return_statistics`: ``{"pixel_max": float, "mean": float, "std": float}``.

    Raises
    ------
    DatasetError
        When the train set is empty or constant (its standard deviation is zero), either
        set holds NaN or infinite values, or `statistics` is not a valid record or is for
        another `pixel_max`.
    sclref.errors.LimitError
        When a standardized copy would be larger than sclref allocates at once.
    """
    dtype = _float_dtype(dtype)
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    if not (isinstance(pixel_max, numbers.Real) and math.isfinite(pixel_max) and pixel_max > 0):
        raise ValueError(f"pixel_max must be a positive finite number, got {pixel_max!r}")
    scale = float(pixel_max)
    if statistics is not None:
        statistics = check_preprocessing(statistics, "the given preprocessing")
        if statistics["pixel_max"] != scale:
            raise DatasetError(f"the given preprocessing scales by pixel_max = {statistics['pixel_max']:g} "
                               f"but these images range up to {scale:g}")
    elif x_train.size == 0:
        raise DatasetError("cannot standardize an empty train set")
    for what, x in (("train", x_train), ("test", x_test)):
        if x.dtype.kind == "f" and not all(np.isfinite(x[s]).all() for s in _blocks(x)):
            raise DatasetError(f"the {what} images hold NaN or infinite values")
        check_allocation(x.shape, dtype.itemsize, f"the standardized {what} images ({dtype.name})")
    if statistics is None:
        statistics = _statistics(x_train, scale)
    mean, std = statistics["mean"], statistics["std"]
    out = []
    for x in (x_train, x_test):
        y = np.empty(x.shape, dtype=dtype)
        for s in _blocks(x):
            y[s] = (x[s] / scale - mean) / std
        out.append(y)
    if return_statistics:
        return out[0], out[1], statistics
    return out[0], out[1]


def _statistics(x_train: np.ndarray, scale: float) -> dict[str, float]:
    """The preprocessing record of `x_train`: its scalar mean and std after scaling by `scale`."""
    # Rounding would turn a constant train set into a tiny nonzero std and huge outputs.
    if np.min(x_train) == np.max(x_train):
        raise DatasetError("cannot standardize: every train pixel has the same value")
    # Two passes over float64 blocks: the mean first, then the spread about it.
    mean = sum(float(np.sum(x_train[s] / scale, dtype=np.float64)) for s in _blocks(x_train)) / x_train.size
    sq = sum(float(np.sum(np.square(x_train[s] / scale - mean), dtype=np.float64)) for s in _blocks(x_train))
    std = math.sqrt(sq / x_train.size)
    if std == 0.0 or not math.isfinite(std):
        raise DatasetError("cannot standardize: the train pixels are too close together")
    return {"pixel_max": scale, "mean": mean, "std": std}


def _with_source(err: InputError, source) -> InputError:
    """`err` again, of the same type, with `source` (a file or directory) in front of its message."""
    return type(err)(f"{os.fspath(source)}: {err}")


def _as_labels(y: np.ndarray, source) -> np.ndarray:
    """Checked integer labels as a new int64 array."""
    check_allocation(y.shape, 8, f"{os.fspath(source)}: labels as int64")
    return y.astype(np.int64)


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


def load_mnist_dir(directory, dtype=np.float64, num_classes: int | None = None, preprocessing=None) -> Dataset:
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
    preprocessing : dict, optional
        A preprocessing record to apply instead of the train statistics (see
        `preprocess`); its ``pixel_max`` must be 255.

    Returns
    -------
    Dataset
        With `Dataset.preprocessing` set to the record applied.

    Raises
    ------
    FileNotFoundError
        When the directory or any of the four files is missing; the message lists them.
    IDXError
        When a file is not a well-formed IDX file.
    DatasetError
        When images are not 3-D uint8, labels not 1-D integers, counts or image sizes
        disagree, a label is out of range, or `preprocessing` is not a valid record.
    sclref.errors.LimitError
        When a file's header announces an array larger than sclref allocates at once, or a
        label is `MAX_CLASSES` or more.
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
    for split in ("train", "test"):
        _check_labels(arrays[f"{split} labels"], split, paths[f"{split} labels"], negative=False)
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
        x_train, x_test, applied = preprocess(arrays["train images"][:, None], arrays["test images"][:, None], 255,
                                              dtype, statistics=preprocessing, return_statistics=True)
    except InputError as err:
        raise _with_source(err, directory) from None
    return Dataset(x_train, _as_labels(arrays["train labels"], paths["train labels"]), x_test,
                   _as_labels(arrays["test labels"], paths["test labels"]), name=directory.resolve().name,
                   preprocessing=applied)


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype=np.float64, preprocessing=None) -> Dataset:
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
    preprocessing : dict, optional
        A preprocessing record to apply instead of the train statistics (see
        `preprocess`); its ``pixel_max`` must be 16.

    Returns
    -------
    Dataset
        With `Dataset.preprocessing` set to the record applied.

    Raises
    ------
    ImportError
        When scikit-learn is not installed.
    DatasetError
        When `preprocessing` is not a valid record for pixels of 0..16.
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
    x_train, x_test, applied = preprocess(images[~is_test, None], images[is_test, None], 16, dtype,
                                          statistics=preprocessing, return_statistics=True)
    return Dataset(x_train, labels[~is_test], x_test, labels[is_test], name="digits", preprocessing=applied)


# What each array of a dataset archive may hold: (dtype kinds, how the error says it).
_NPZ_KINDS = {"x_train": ("biuf", "numbers"), "x_test": ("biuf", "numbers"), "y_train": ("iu", "integers"),
              "y_test": ("iu", "integers"), "name": ("U", "a string"), "pixel_max": ("iuf", "a number"),
              "preprocessing": ("iuf", "numbers")}


def _npz_dtype_problem(key: str, dtype: np.dtype) -> str | None:
    """None when array `key` may have `dtype`, else what it must hold; checked before allocation."""
    kinds, what = _NPZ_KINDS[key]
    return None if dtype.kind in kinds and dtype.subdtype is None else what


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive that `load_npz` uses, with every reading failure as a DatasetError."""
    try:
        return read_npz(path, _NPZ_KEYS, _NPZ_OPTIONAL, _npz_dtype_problem)
    except NpzError as err:
        raise DatasetError(str(err)) from None


def _stored_preprocessing(path: Path, record: np.ndarray) -> dict[str, float]:
    if record.shape != (len(PREPROCESSING_KEYS),):
        raise DatasetError(f"{path}: preprocessing must hold {len(PREPROCESSING_KEYS)} numbers "
                           f"({', '.join(PREPROCESSING_KEYS)}), got {_describe(record)}")
    return check_preprocessing(dict(zip(PREPROCESSING_KEYS, record.tolist(), strict=True)), f"{path}: preprocessing")


def _restandardized(x: np.ndarray, stored: dict | None, given: dict | None, dtype: np.dtype, what: str) -> np.ndarray:
    """Images standardized by `stored`, as `dtype`; re-standardized by `given` when that is another record."""
    check_allocation(x.shape, dtype.itemsize, what)
    y = np.empty(x.shape, dtype=dtype, order="C")
    same = given is None or (given["mean"] == stored["mean"] and given["std"] == stored["std"])
    for s in _blocks(x):
        if same:
            y[s] = x[s]
        else:
            # Both records share pixel_max, so it cancels: back to scaled pixels, then forward again.
            y[s] = (x[s].astype(np.float64) * stored["std"] + stored["mean"] - given["mean"]) / given["std"]
    return y


def load_npz(path, dtype=np.float64, preprocessing=None) -> Dataset:
    """Load a dataset from a ``.npz`` archive holding x_train, y_train, x_test and y_test.

    Images may be (N, C, H, W) or (N, H, W), read as one channel. With a scalar
    ``pixel_max`` entry they are raw pixels and go through `preprocess`. Without one the
    images must be floats and are taken as already preprocessed, as `save_npz` writes
    them; an optional ``preprocessing`` entry (float64 ``[pixel_max, mean, std]``) then
    records how. An optional string ``name`` entry names the dataset (default: the
    file's stem). Nothing is unpickled: arrays of objects are refused, and every
    array's size is checked from its header before it is read.

    Parameters
    ----------
    path : str or os.PathLike
        The archive.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.
    preprocessing : dict, optional
        A preprocessing record to apply instead of the train statistics (see
        `preprocess`). Its ``pixel_max`` must equal the archive's; for preprocessed
        images the archive must record its own preprocessing, and the images are
        mapped back to scaled pixels and standardized again by the given record.

    Returns
    -------
    Dataset
        With `Dataset.preprocessing` set to the record applied (None for preprocessed
        images whose archive records none).

    Raises
    ------
    FileNotFoundError
        When `path` does not exist.
    DatasetError
        When the file is not a readable ``.npz`` archive, keys are missing, the arrays
        have the wrong shapes, dtypes or labels, or `preprocessing` does not fit.
    sclref.errors.LimitError
        When an array's header claims more than sclref allocates at once, or a label is
        `MAX_CLASSES` or more.
    """
    dtype = _float_dtype(dtype)
    path = Path(path)
    if preprocessing is not None:
        preprocessing = check_preprocessing(preprocessing, "the given preprocessing")
    arrays = _read_npz(path)
    name = path.stem
    if "name" in arrays:
        if arrays["name"].ndim != 0:
            raise DatasetError(f"{path}: name must be a string scalar, got {_describe(arrays['name'])}")
        name = str(arrays["name"])
    images = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise DatasetError(f"{path}: x_{split} must be numbers of shape (N, C, H, W) or (N, H, W), "
                               f"got {_describe(arrays[f'x_{split}'])}")
        if y.ndim != 1:
            raise DatasetError(f"{path}: y_{split} must be integers of shape (N,), got {_describe(y)}")
        if len(x) != len(y):
            raise DatasetError(f"{path}: {split}: {len(x)} images but {len(y)} labels")
        _check_labels(y, split, path)
        images[split] = x
    if "pixel_max" in arrays:
        pixel_max = arrays["pixel_max"]
        if pixel_max.ndim != 0:
            raise DatasetError(f"{path}: pixel_max must be a number, got {_describe(pixel_max)}")
        if "preprocessing" in arrays:
            raise DatasetError(f"{path}: holds both pixel_max (raw pixels) and preprocessing (preprocessed images)")
        try:
            x_train, x_test, applied = preprocess(images["train"], images["test"], pixel_max.item(), dtype,
                                                  statistics=preprocessing, return_statistics=True)
        except InputError as err:
            raise _with_source(err, path) from None
        except ValueError as err:
            raise DatasetError(f"{path}: {err}") from None
    else:
        for split, x in images.items():
            if x.dtype.kind != "f":
                raise DatasetError(f"{path}: x_{split} is {x.dtype}: raw integer pixels need a pixel_max entry "
                                   f"(e.g. 255) so they can be standardized")
            if not all(np.isfinite(x[s]).all() for s in _blocks(x)):
                raise DatasetError(f"{path}: x_{split} holds NaN or infinite values")
        stored = _stored_preprocessing(path, arrays["preprocessing"]) if "preprocessing" in arrays else None
        applied = stored
        if preprocessing is not None:
            if stored is None:
                raise DatasetError(f"{path}: the images are preprocessed and the archive does not record how, "
                                   f"so they cannot be standardized by the given preprocessing")
            if preprocessing["pixel_max"] != stored["pixel_max"]:
                raise DatasetError(f"{path}: the given preprocessing scales by pixel_max = "
                                   f"{preprocessing['pixel_max']:g} but these images were scaled by "
                                   f"{stored['pixel_max']:g}")
            applied = preprocessing
        x_train, x_test = (_restandardized(images[split], stored, preprocessing, dtype,
                                           f"{path}: x_{split} as {dtype.name}") for split in ("train", "test"))
    try:
        return Dataset(x_train, _as_labels(arrays["y_train"], path), x_test, _as_labels(arrays["y_test"], path),
                       name=name, preprocessing=applied)
    except InputError as err:
        raise _with_source(err, path) from None


def save_npz(dataset: Dataset, path) -> None:
    """Write `dataset` to an uncompressed ``.npz`` archive that `load_npz` reads back unchanged.

    The archive appears at `path` only once complete (temporary file, then a move). The
    dataset's preprocessing record, when known, is stored as a float64 ``preprocessing``
    entry ``[pixel_max, mean, std]``.

    Parameters
    ----------
    dataset : Dataset
        The dataset, already preprocessed.
    path : str or os.PathLike
        Destination; an existing file is replaced. No suffix is added.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"save_npz expects a Dataset, got {type(dataset).__name__}")
    extra = {}
    if dataset.preprocessing is not None:
        extra["preprocessing"] = np.array([dataset.preprocessing[key] for key in PREPROCESSING_KEYS], dtype=np.float64)
    storage.write_npz(path, {"x_train": dataset.x_train, "y_train": dataset.y_train, "x_test": dataset.x_test,
                        "y_test": dataset.y_test, "name": np.array(dataset.name), **extra})


ALIASES = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
"""Names `load` understands for data installed by a package: Debian's dataset-fashion-mnist puts it there."""


def load(spec="digits", dtype=np.float64, preprocessing=None) -> Dataset:
    """Load a dataset by name or path.

    Parameters
    ----------
    spec : str or os.PathLike
        ``"digits"`` for scikit-learn's digits (the default), a name of `ALIASES`
        (``"fashion-mnist"``), a directory of MNIST-format
        files (`load_mnist_dir`), a directory of binary CIFAR-10 or CIFAR-100 files and no
        MNIST-format file (`sclref.data.cifar.load_cifar_dir`, fine labels), or a ``.npz``
        file (`load_npz`). A directory that happens to be called ``digits`` is reached as
        ``./digits``.
    dtype : {numpy.float64, numpy.float32}
        The dtype of the images.
    preprocessing : dict, optional
        A preprocessing record ``{"pixel_max", "mean", "std"}`` to standardize the images
        by instead of the statistics of the train split, e.g. the record of the data a
        model was trained on (see `preprocess` and `Dataset.preprocessing`).

    Returns
    -------
    Dataset
        With `Dataset.preprocessing` set to the record applied.

    Raises
    ------
    DatasetError
        When `spec` is none of the above, or `preprocessing` is not a valid record (every
        value finite, ``pixel_max > 0``, ``std > 0``) or not one for the images' pixel range.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"dataset spec must be a name or a path, got {type(spec).__name__}")
    if preprocessing is not None:
        preprocessing = check_preprocessing(preprocessing, "the given preprocessing")
    if isinstance(spec, str) and spec == "digits":
        return load_digits(dtype=dtype, preprocessing=preprocessing)
    path = Path(ALIASES.get(spec, spec) if isinstance(spec, str) else spec)
    if path.is_dir():
        # cifar builds on this module, so it is imported here rather than at the top.
        from sclref.data import cifar

        has_mnist = any((path / f"{stem}{gz}").is_file() for stem in MNIST_FILES.values() for gz in ("", ".gz"))
        if not has_mnist and cifar.is_cifar_dir(path):
            return cifar.load_cifar_dir(path, dtype=dtype, preprocessing=preprocessing)
        return load_mnist_dir(path, dtype=dtype, preprocessing=preprocessing)
    if path.suffix == ".npz":
        return load_npz(path, dtype=dtype, preprocessing=preprocessing)
    raise DatasetError(f"unknown dataset {os.fspath(spec)!r}: expected 'digits', a directory of MNIST-format files "
                       f"or a .npz file")


def subset(dataset: Dataset, n_train: int, n_test: int | None = None) -> Dataset:
    """The first `n_train` train and first `n_test` test samples of `dataset`, for quick runs.

    The arrays are copies, so the full dataset can be freed. The standardization of the
    full dataset is kept as it is, and so is its preprocessing record.

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
                   dataset.x_test[:n_test].copy(), dataset.y_test[:n_test].copy(), name=dataset.name,
                   preprocessing=dataset.preprocessing)

