"""Numba kernels for the hot loops of sclref: flat functions over raw NCHW arrays.

This package is the only place in sclref that imports numba. Every kernel takes
C-contiguous inputs of one float dtype, writes into output arrays the caller
allocated, validates nothing (``sclref.ops`` does) and returns None. Each has a
plain-NumPy twin of the same signature in `sclref.kernels.reference` (batch norm's
beside its kernels in `sclref.kernels.norm`), used as its test oracle. `run_tasks`
runs independent tasks on numba's thread count of threads, and `run_ranges` cuts a
kernel's outputs along a leading axis into such tasks (what `sclref.ops` does with the
pooling and elementwise kernels).
"""

from sclref.kernels._jit import CACHE, JIT_DISABLED, PARALLEL, compiled, num_threads, numba_threads, set_numba_threads
from sclref.kernels.conv import conv2d_bwd_input, conv2d_bwd_weight, conv2d_fwd
from sclref.kernels.elementwise import (
    add_relu_fwd,
    leaky_relu_bwd,
    leaky_relu_fwd,
    masked_weight_bwd,
    masked_weight_fwd,
    relu_bwd,
    relu_fwd,
)
from sclref.kernels.norm import batchnorm_bwd, batchnorm_fwd
from sclref.kernels.optim import adam_update, sgd_update
from sclref.kernels.pool import maxpool2d_bwd, maxpool2d_fwd
from sclref.kernels.tasks import run_ranges, run_tasks, threads_for

__all__ = ["CACHE", "JIT_DISABLED", "PARALLEL", "adam_update", "add_relu_fwd", "batchnorm_bwd", "batchnorm_fwd",
           "compiled", "conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_fwd", "leaky_relu_bwd", "leaky_relu_fwd",
           "masked_weight_bwd", "masked_weight_fwd", "maxpool2d_bwd", "maxpool2d_fwd", "num_threads", "numba_threads",
           "relu_bwd", "relu_fwd", "run_ranges", "run_tasks", "set_numba_threads", "sgd_update", "threads_for"]

# Sparse inference (exported networks): chains of CSR layers and direct sparse convolution.
from sclref.kernels.sparse import (  # noqa: E402
    chain_kernel,
    chain_scratch,
    csr_chain,
    csr_conv2d,
    csr_conv2d_chwn,
    maxpool_chwn,
    maxpool_nchw,
    pack_chain,
)

__all__ += ["chain_kernel", "chain_scratch", "csr_chain", "csr_conv2d", "csr_conv2d_chwn", "maxpool_chwn",
            "maxpool_nchw", "pack_chain"]
