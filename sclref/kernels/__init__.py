"""Numba kernels for the hot loops of sclref: flat functions over raw NCHW arrays.

This package is the only place in sclref that imports numba. Every kernel takes
C-contiguous inputs of one float dtype, writes into output arrays the caller
allocated, validates nothing (``sclref.ops`` does) and returns None. Each has a
plain-NumPy twin of the same signature in `sclref.kernels.reference`, used as its
test oracle.
"""

from sclref.kernels._jit import CACHE, JIT_DISABLED, PARALLEL, num_threads, numba_threads
from sclref.kernels.conv import conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd
from sclref.kernels.elementwise import (
    leaky_relu_bwd,
    leaky_relu_fwd,
    masked_weight_bwd,
    masked_weight_fwd,
    relu_bwd,
    relu_fwd,
)
from sclref.kernels.optim import sgd_update
from sclref.kernels.pool import maxpool2d_bwd, maxpool2d_fwd

__all__ = ["CACHE", "JIT_DISABLED", "PARALLEL", "conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_fwd",
           "leaky_relu_bwd", "leaky_relu_fwd", "masked_weight_bwd", "masked_weight_fwd", "maxpool2d_bwd",
           "maxpool2d_fwd", "num_threads", "numba_threads", "relu_bwd", "relu_fwd", "sgd_update"]

# Sparse inference (exported networks): chains of CSR layers and direct sparse convolution.
from sclref.kernels.sparse import chain_kernel, chain_scratch, csr_chain, csr_conv2d, pack_chain  # noqa: E402

__all__ += ["chain_kernel", "chain_scratch", "csr_chain", "csr_conv2d", "pack_chain"]
