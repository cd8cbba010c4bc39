"""Sparse execution of a pruned network: export to CSR, a portable file, fast CPU inference.

`export` turns a masked model into a `SparseNetwork` (one CSR matrix per weight layer,
dead units removed), `save`/`load` write and read the documented ``.npz`` format, and
`Runtime` runs the network with scipy.sparse, sclref's numba kernels or dense NumPy.
"""

from sclref.sparse.export import export, export_run
from sclref.sparse.format import FORMAT_VERSION, FormatError, load, save
from sclref.sparse.network import Activation, Conv2d, Flatten, Linear, MaxPool2d, SparseNetwork
from sclref.sparse.runtime import BACKENDS, Runtime

__all__ = ["BACKENDS", "FORMAT_VERSION", "Activation", "Conv2d", "Flatten", "FormatError", "Linear", "MaxPool2d",
           "Runtime", "SparseNetwork", "export", "export_run", "load", "save"]
