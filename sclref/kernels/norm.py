"""Compute batch normalization, forward and backward, per channel in fused passes over the batch.

Shapes: x, y, g, gx (N, C, L), the input viewed with its spatial axes flattened (L = 1
for an (N, C) input); per-channel vectors (C,). With count = N*L and, per channel,

    xhat = (x - mean) * inv_std,    inv_std = 1 / sqrt(var + eps),
    y    = xhat * weight + bias,

the forward takes the batch's mean and biased variance (``training``) or is given them.
The backward gives ``g_sum = sum(g)`` and ``gxhat_sum = sum(g * xhat)`` (the gradients of
bias and weight) and, when asked, gx: ``(g - g_sum/count - xhat * gxhat_sum/count) *
(inv_std * weight)`` through batch statistics, ``g * (inv_std * weight)`` through given
ones. Every per-element formula is evaluated in that order in the arrays' dtype.

A channel's sums run in a fixed order: over the batch first, into one accumulator per
position of the plane (these run side by side in vector registers), then over the plane
in order. The mean is taken first and the variance from the centred values, two passes
that avoid the cancellation of a sum of squares. Every pass reads the batch image by
image, a task's channels of one image being one contiguous run (reading a channel's
planes across the batch instead strides by a whole image, which measured 1.5x slower).
Ranges of channels are independent tasks split over threads by `run_tasks` (each owns
its outputs), so results are bit-identical on any thread count, jitted or interpreted.
The NumPy twins at the end of this module state the same arithmetic with whole-array
operations; they are the kernels' test oracles.
"""

import numpy as np

from sclref.kernels import tasks
from sclref.kernels._jit import jit
from sclref.kernels.tasks import run_tasks, threads_for

__all__ = ["batchnorm_bwd", "batchnorm_fwd"]


# The loops index flat views with unsigned integers, as the conv loops do: numba's
# negative-index check on signed indices keeps LLVM from vectorizing them (measured 2x
# slower). Every value cast with `_uint` is non-negative.
_uint = np.uint64


@jit
def _batch_sums(xf, nimg, nch, c0, c1, shift, acc):
    """acc[c, t] = sum over n in order of xf[(n*C + c)*L + t] - shift[c] (squared when shift is given),
    for channels c in [c0, c1); acc (C, L), the rows c0..c1 overwritten. The batch is read image by
    image, each image's rows of those channels one contiguous run. O(N*(c1 - c0)*L)."""
    plane = acc.shape[1]
    af = acc.reshape(-1)
    zero = acc.dtype.type(0)
    lo, hi = _uint(c0 * plane), _uint(c1 * plane)
    for t in range(lo, hi):
        af[t] = zero
    for n in range(nimg):
        row = _uint(n * nch * plane)
        if shift.shape[0] == 0:
            for t in range(lo, hi):
                af[t] += xf[row + t]
        else:
            for c in range(c0, c1):
                m = shift[c]
                for t in range(_uint(c * plane), _uint((c + 1) * plane)):
                    d = xf[row + t] - m
                    af[t] += d * d


@jit
def _fwd(x, weight, bias, eps, training, mean, var, inv_std, y, c0, c1, acc):
    """Channels [c0, c1) of `batchnorm_fwd`; acc (C, L) scratch, rows c0..c1 used. O(N*(c1 - c0)*L)."""
    nimg, nch, plane = x.shape
    xf, yf = x.reshape(-1), y.reshape(-1)
    count = x.dtype.type(nimg * plane)
    one = x.dtype.type(1)
    if training:
        _batch_sums(xf, nimg, nch, c0, c1, mean[:0], acc)
        for c in range(c0, c1):
            mean[c] = _row_sum(acc, c) / count
        _batch_sums(xf, nimg, nch, c0, c1, mean, acc)
        for c in range(c0, c1):
            var[c] = _row_sum(acc, c) / count
    for c in range(c0, c1):
        inv_std[c] = one / np.sqrt(var[c] + eps)
    for n in range(nimg):
        for c in range(c0, c1):
            m, inv, w, b = mean[c], inv_std[c], weight[c], bias[c]
            row = _uint((n * nch + c) * plane)
            for t in range(row, row + _uint(plane)):
                yf[t] = (xf[t] - m) * inv * w + b


@jit
def _row_sum(acc, c):
    """sum of acc[c, :] in order."""
    total = acc.dtype.type(0)
    for t in range(acc.shape[1]):
        total += acc[c, t]
    return total


@jit
def _bwd(x, g, mean, inv_std, weight, training, want_gx, g_sum, gxhat_sum, gx, c0, c1, acc):
    """Channels [c0, c1) of `batchnorm_bwd`; acc (2, C, L) scratch, rows c0..c1 used. O(N*(c1 - c0)*L)."""
    nimg, nch, plane = x.shape
    xf, gf, gxf = x.reshape(-1), g.reshape(-1), gx.reshape(-1)
    a0, a1 = acc[0].reshape(-1), acc[1].reshape(-1)
    count = x.dtype.type(nimg * plane)
    zero = x.dtype.type(0)
    lo, hi = _uint(c0 * plane), _uint(c1 * plane)
    for t in range(lo, hi):
        a0[t] = zero
        a1[t] = zero
    for n in range(nimg):
        for c in range(c0, c1):
            m, inv = mean[c], inv_std[c]
            row = _uint(n * nch * plane)
            for t in range(_uint(c * plane), _uint((c + 1) * plane)):
                v = gf[row + t]
                a0[t] += v
                a1[t] += v * ((xf[row + t] - m) * inv)
    for c in range(c0, c1):
        g_sum[c] = _row_sum(acc[0], c)
        gxhat_sum[c] = _row_sum(acc[1], c)
    if not want_gx:
        return
    for n in range(nimg):
        for c in range(c0, c1):
            m, inv = mean[c], inv_std[c]
            scale = inv * weight[c]
            gm, gxm = g_sum[c] / count, gxhat_sum[c] / count
            row = _uint((n * nch + c) * plane)
            if training:
                for t in range(row, row + _uint(plane)):
                    gxf[t] = (gf[t] - gm - (xf[t] - m) * inv * gxm) * scale
            else:
                for t in range(row, row + _uint(plane)):
                    gxf[t] = gf[t] * scale


def _blocks(x, threads):
    """Channels per task: a few tasks per thread, so that a late thread leaves its share to the others."""
    nch = x.shape[1]
    return -(-nch // min(nch, 4 * threads)) if threads > 1 else max(nch, 1)


def batchnorm_fwd(x, weight, bias, eps, training, mean, var, inv_std, y):
    """Normalize x (N, C, L) per channel into y: ``y = (x - mean) * inv_std * weight + bias``.

    weight, bias (C,); `eps` in x's dtype. With ``training`` the batch's mean and biased
    variance are written into `mean` and `var` (C,), else they are read from them;
    ``inv_std = 1 / sqrt(var + eps)`` is written (C,). O(N*C*L), three passes over x
    when training (one otherwise); C*L entries of scratch (one image).
    """
    nch = x.shape[1]
    threads = threads_for(nch) if x.nbytes >= tasks.SPLIT_BYTES else 1
    per = _blocks(x, threads)
    acc = np.empty(x.shape[1:], dtype=x.dtype)

    def task(i, slot):
        _fwd(x, weight, bias, eps, training, mean, var, inv_std, y, i * per, min(nch, (i + 1) * per), acc)

    run_tasks(-(-nch // per), task, threads)


def batchnorm_bwd(x, g, mean, inv_std, weight, training, want_gx, g_sum, gxhat_sum, gx):
    """Gradients of `batchnorm_fwd` for upstream g (N, C, L).

    Writes ``g_sum = sum(g)`` and ``gxhat_sum = sum(g * xhat)`` per channel (C,) and, with
    `want_gx`, gx (N, C, L): through the batch statistics when ``training``, else through
    the fixed `mean` and `inv_std`. O(N*C*L), two passes over g and x; 2*C*L entries of
    scratch (two images).
    """
    nch = x.shape[1]
    threads = threads_for(nch) if x.nbytes >= tasks.SPLIT_BYTES else 1
    per = _blocks(x, threads)
    acc = np.empty((2, *x.shape[1:]), dtype=x.dtype)

    def task(i, slot):
        _bwd(x, g, mean, inv_std, weight, training, want_gx, g_sum, gxhat_sum, gx, i * per,
             min(nch, (i + 1) * per), acc)

    run_tasks(-(-nch // per), task, threads)


# -- NumPy twins ------------------------------------------------------------------------------


def _sum_batch_first(a):
    """Sum of a (N, C, L) per channel in the kernels' order: over N into (C, L), then along L in order."""
    acc = np.zeros(a.shape[1:], dtype=a.dtype)
    for n in range(a.shape[0]):
        acc += a[n]
    total = np.zeros(a.shape[1], dtype=a.dtype)
    for t in range(a.shape[2]):
        total += acc[:, t]
    return total


def batchnorm_fwd_reference(x, weight, bias, eps, training, mean, var, inv_std, y):
    """The NumPy twin of `batchnorm_fwd`."""
    count = x.dtype.type(x.shape[0] * x.shape[2])
    if training:
        mean[...] = _sum_batch_first(x) / count
        d = x - mean[:, None]
        var[...] = _sum_batch_first(d * d) / count
    inv_std[...] = x.dtype.type(1) / np.sqrt(var + eps)
    y[...] = (x - mean[:, None]) * inv_std[:, None] * weight[:, None] + bias[:, None]


def batchnorm_bwd_reference(x, g, mean, inv_std, weight, training, want_gx, g_sum, gxhat_sum, gx):
    """The NumPy twin of `batchnorm_bwd`."""
    count = x.dtype.type(x.shape[0] * x.shape[2])
    xhat = (x - mean[:, None]) * inv_std[:, None]
    g_sum[...] = _sum_batch_first(g)
    gxhat_sum[...] = _sum_batch_first(g * xhat)
    if want_gx:
        scale = (inv_std * weight)[:, None]
        if training:
            gx[...] = (g - (g_sum / count)[:, None] - xhat * (gxhat_sum / count)[:, None]) * scale
        else:
            gx[...] = g * scale
