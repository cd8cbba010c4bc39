"""Datasets from local files and mini-batches over them: the data that `sclref train` learns from.

`load` turns a spec into a `Dataset`: ``"digits"`` (scikit-learn's bundled 8x8 digits,
the default), a directory of MNIST-format IDX files, or a ``.npz`` archive. Nothing is
downloaded. `batches` iterates over one epoch with a seeded shuffle. `read_idx` and
`write_idx` read and write the IDX format itself.
"""

from sclref.data.datasets import (
    MNIST_FILES,
    Dataset,
    DatasetError,
    load,
    load_digits,
    load_mnist_dir,
    load_npz,
    preprocess,
    save_npz,
    subset,
)
from sclref.data.idx import IDXError, read_idx, write_idx
from sclref.data.loader import batches

__all__ = ["Dataset", "DatasetError", "IDXError", "MNIST_FILES", "batches", "load", "load_digits", "load_mnist_dir",
           "load_npz", "preprocess", "read_idx", "save_npz", "subset", "write_idx"]
