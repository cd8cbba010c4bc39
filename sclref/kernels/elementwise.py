"""Compute ReLU and leaky ReLU, forward and backward, in one pass without temporaries.

All arrays are C-contiguous with one shape and one float dtype; kernels see them as
flat views. Each element is computed independently, so any parallel split is exact.
"""

from sclref.kernels._jit import pjit, prange

__all__ = ["leaky_relu_bwd", "leaky_relu_fwd", "relu_bwd", "relu_fwd"]


@pjit
def _relu_fwd(x, out):
    for t in prange(x.size):
        v = x[t]
        # Tested as "<= 0" so a NaN passes through unchanged.
        if v <= 0:
            out[t] = 0
        else:
            out[t] = v


@pjit
def _relu_bwd(x, gy, gx):
    for t in prange(x.size):
        if x[t] > 0:
            gx[t] = gy[t]
        else:
            gx[t] = 0


@pjit
def _leaky_relu_fwd(x, alpha, out):
    for t in prange(x.size):
        v = x[t]
        out[t] = v if v > 0 else alpha * v


@pjit
def _leaky_relu_bwd(x, gy, alpha, gx):
    for t in prange(x.size):
        g = gy[t]
        gx[t] = g if x[t] > 0 else alpha * g


def relu_fwd(x, out):
    """out = x where x > 0 else 0 (NaN stays NaN). Any shape; O(size)."""
    _relu_fwd(x.reshape(-1), out.reshape(-1))


def relu_bwd(x, gy, gx):
    """gx = gy where x > 0 else 0, for the forward input `x`. Any shape; O(size)."""
    _relu_bwd(x.reshape(-1), gy.reshape(-1), gx.reshape(-1))


def leaky_relu_fwd(x, alpha, out):
    """out = x where x > 0 else alpha * x, with `alpha` rounded to x's dtype. O(size)."""
    _leaky_relu_fwd(x.reshape(-1), x.dtype.type(alpha), out.reshape(-1))


def leaky_relu_bwd(x, gy, alpha, gx):
    """gx = gy where x > 0 else alpha * gy, with `alpha` rounded to x's dtype. O(size)."""
    _leaky_relu_bwd(x.reshape(-1), gy.reshape(-1), x.dtype.type(alpha), gx.reshape(-1))
