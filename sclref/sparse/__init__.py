"""Sparse execution of a pruned network: export to CSR, a portable file, fast CPU inference.

`export` turns a masked model into a `SparseNetwork` (one CSR matrix per weight layer,
batch norms folded, residual blocks kept, dead units removed), `save`/`load` write and
read the documented ``.npz`` format, and `Runtime` runs the network with scipy.sparse,
sclref's numba kernels or dense NumPy.
"""

from sclref.sparse.export import export, export_run
from sclref.sparse.format import FORMAT_VERSION, FormatError, load, save
from sclref.sparse.network import (
    Activation,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    Residual,
    SparseNetwork,
    SubsamplePad,
)
from sclref.sparse.runtime import BACKENDS, Runtime

__all__ = ["BACKENDS", "FORMAT_VERSION", "Activation", "Conv2d", "Flatten", "FormatError", "GlobalAvgPool2d", "Linear",
           "MaxPool2d", "Residual", "Runtime", "SparseNetwork", "SubsamplePad", "export", "export_run", "load", "save"]
