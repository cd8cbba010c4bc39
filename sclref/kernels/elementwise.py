"""Compute ReLU, leaky ReLU, a residual block's relu(a + b) and the masked weight θ ⊙ H(s),
forward and backward, in one pass without temporaries.

All arrays are C-contiguous with one shape and one float dtype; kernels see them as
flat views. Each element is computed independently, so any parallel split is exact.
"""

from sclref.kernels._jit import pjit, prange

__all__ = ["add_relu_fwd", "leaky_relu_bwd", "leaky_relu_fwd", "masked_weight_bwd", "masked_weight_fwd", "relu_bwd",
           "relu_fwd"]


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
def _add_relu_fwd(a, b, out):
    for t in prange(a.size):
        v = a[t] + b[t]
        # The test of `_relu_fwd`, so the bits are those of add then relu.
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


def add_relu_fwd(a, b, out):
    """out = relu(a + b), the sum rounded to the dtype first: the bits of add then `relu_fwd`. O(size).

    Its gradient is `relu_bwd` of `out` (out > 0 exactly where a + b > 0) for both inputs.
    """
    _add_relu_fwd(a.reshape(-1), b.reshape(-1), out.reshape(-1))


def relu_bwd(x, gy, gx):
    """gx = gy where x > 0 else 0, for the forward input `x` (or output: both are > 0 at the same places).
    Any shape; O(size)."""
    _relu_bwd(x.reshape(-1), gy.reshape(-1), gx.reshape(-1))


def leaky_relu_fwd(x, alpha, out):
    """out = x where x > 0 else alpha * x, with `alpha` rounded to x's dtype. O(size)."""
    _leaky_relu_fwd(x.reshape(-1), x.dtype.type(alpha), out.reshape(-1))


def leaky_relu_bwd(x, gy, alpha, gx):
    """gx = gy where x > 0 else alpha * gy, with `alpha` rounded to x's dtype. O(size)."""
    _leaky_relu_bwd(x.reshape(-1), gy.reshape(-1), x.dtype.type(alpha), gx.reshape(-1))


@pjit
def _masked_weight_fwd(theta, s, out):
    for t in prange(theta.size):
        out[t] = theta[t] if s[t] > 0 else 0


@pjit
def _masked_weight_bwd(g, theta, s, g_theta, g_s):
    for t in prange(theta.size):
        v = g[t]
        g_theta[t] = v if s[t] > 0 else 0
        g_s[t] = v * theta[t]


def masked_weight_fwd(theta, s, out):
    """out = theta where s > 0 else 0: the weight θ ⊙ H(s) with the exact step. O(size)."""
    _masked_weight_fwd(theta.reshape(-1), s.reshape(-1), out.reshape(-1))


def masked_weight_bwd(g, theta, s, g_theta, g_s):
    """g_theta = g where s > 0 else 0, and g_s = g * theta (the step's surrogate is applied
    by the caller), for upstream `g` of θ ⊙ H(s); one pass over the five arrays. O(size)."""
    _masked_weight_bwd(g.reshape(-1), theta.reshape(-1), s.reshape(-1), g_theta.reshape(-1), g_s.reshape(-1))
