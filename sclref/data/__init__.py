"""Datasets from local files and mini-batches over them: the data that `sclref train` learns from.

`load` turns a spec into a `Dataset`: ``"digits"`` (scikit-learn's bundled 8x8 digits,
the default), a directory of MNIST-format IDX files or of binary CIFAR-10/100 files, or
a ``.npz`` archive. Nothing is downloaded. A dataset records how its images were
standardized (`Dataset.preprocessing`), which `load` can apply to other files, and names
its content by `Dataset.fingerprint`. `batches` iterates over one epoch with a seeded
shuffle; `augment` crops and flips a batch of images. `read_idx` and `write_idx` read and
write the IDX format itself. Every reader bounds the sizes it takes from a file and
reports bad bytes as an `sclref.errors.InputError`.
"""

from sclref.data.cifar import load_cifar_dir
from sclref.data.datasets import (
    ALIASES,
    MAX_CLASSES,
    MNIST_FILES,
    PREPROCESSING_KEYS,
    Dataset,
    DatasetError,
    check_preprocessing,
    load,
    load_digits,
    load_mnist_dir,
    load_npz,
    preprocess,
    save_npz,
    subset,
)
from sclref.data.idx import IDXError, read_idx, write_idx
from sclref.data.loader import augment, batches

__all__ = ["ALIASES", "MAX_CLASSES", "MNIST_FILES", "PREPROCESSING_KEYS", "Dataset", "DatasetError", "IDXError",
           "augment", "batches", "check_preprocessing", "load", "load_cifar_dir", "load_digits", "load_mnist_dir",
           "load_npz", "preprocess", "read_idx", "save_npz", "subset", "write_idx"]
