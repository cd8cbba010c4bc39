"""Plain-NumPy twins of every kernel, written to be obviously correct; the test oracles.

Each function has the signature and output contract of the kernel it mirrors
(inputs first, outputs overwritten in place, returns None) and is built from
whole-window views, ``np.einsum`` and ``np.add.at`` rather than index arithmetic.
They are slow and allocate freely; nothing outside the tests should call them.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_fwd", "leaky_relu_bwd", "leaky_relu_fwd",
           "masked_weight_bwd", "masked_weight_fwd", "maxpool2d_bwd", "maxpool2d_fwd", "relu_bwd", "relu_fwd",
           "sgd_update"]


def _windows(x, kh, kw, sh, sw, ph, pw, oh, ow):
    """View (N, C, OH, OW, KH, KW): the zero-padded input window under each output."""
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]


def conv2d_fwd(x, w, sh, sw, ph, pw, out):
    """out[n, f, a, b] = sum_{c,i,j} w[f, c, i, j] * xpad[n, c, a*sh + i, b*sw + j]."""
    win = _windows(x, w.shape[2], w.shape[3], sh, sw, ph, pw, out.shape[2], out.shape[3])
    out[...] = np.einsum("ncabij,fcij->nfab", win, w)


def conv2d_bwd_input(gy, w, sh, sw, ph, pw, gx):
    """gx = dL/dx: each output's gradient spread over its window through the filters."""
    n, c, h, wd = gx.shape
    _, _, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    gxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=gx.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += np.einsum(
                "nfab,fc->ncab", gy, w[:, :, i, j])
    gx[...] = gxp[:, :, ph:ph + h, pw:pw + wd]


def conv2d_bwd_weight(x, gy, sh, sw, ph, pw, gw):
    """gw[f, c, i, j] = sum_{n,a,b} gy[n, f, a, b] * xpad[n, c, a*sh + i, b*sw + j]."""
    win = _windows(x, gw.shape[2], gw.shape[3], sh, sw, ph, pw, gy.shape[2], gy.shape[3])
    gw[...] = np.einsum("ncabij,nfab->fcij", win, gy)


def maxpool2d_fwd(x, kh, kw, sh, sw, out, argmax):
    """Window maxima and ``h*W + w`` of each one; np.argmax picks the first max or first NaN."""
    n, c, oh, ow = out.shape
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    flat = win.reshape(n, c, oh, ow, kh * kw)
    k = flat.argmax(axis=-1)
    out[...] = np.take_along_axis(flat, k[..., None], axis=-1)[..., 0]
    rows = np.arange(oh)[:, None] * sh + k // kw
    cols = np.arange(ow)[None, :] * sw + k % kw
    argmax[...] = rows * x.shape[3] + cols


def maxpool2d_bwd(gy, argmax, gx):
    """gx = zeros with gy added at argmax; np.add.at accumulates repeated indices."""
    n, c, h, w = gx.shape
    flat = np.zeros((n * c, h * w), dtype=gx.dtype)
    planes = np.arange(n * c)[:, None]
    np.add.at(flat, (planes, argmax.reshape(n * c, -1)), gy.reshape(n * c, -1))
    gx[...] = flat.reshape(gx.shape)


def relu_fwd(x, out):
    """out = x where x > 0 else 0; NaN stays NaN."""
    out[...] = np.where(x <= 0, 0, x)


def add_relu_fwd(a, b, out):
    """out = relu(a + b), the sum rounded to the dtype first."""
    v = a + b
    out[...] = np.where(v <= 0, 0, v)


def relu_bwd(x, gy, gx):
    """gx = gy where x > 0 else 0."""
    gx[...] = np.where(x > 0, gy, 0)


def leaky_relu_fwd(x, alpha, out):
    """out = x where x > 0 else alpha * x, alpha in x's dtype."""
    out[...] = np.where(x > 0, x, x.dtype.type(alpha) * x)


def leaky_relu_bwd(x, gy, alpha, gx):
    """gx = gy where x > 0 else alpha * gy, alpha in x's dtype."""
    gx[...] = np.where(x > 0, gy, x.dtype.type(alpha) * gy)


def masked_weight_fwd(theta, s, out):
    """out = theta where s > 0 else 0."""
    out[...] = np.where(s > 0, theta, theta.dtype.type(0))


def masked_weight_bwd(g, theta, s, g_theta, g_s):
    """g_theta = g where s > 0 else 0; g_s = g * theta."""
    g_theta[...] = np.where(s > 0, g, g.dtype.type(0))
    g_s[...] = g * theta


def adam_update(p, g, m, v, lr, beta1, beta2, eps, step):
    """One Adam step in place, in NumPy operations of the arrays' dtype (see kernels.optim)."""
    m *= beta1
    m += g * (1.0 - beta1)
    v *= beta2
    v += g * g * (1.0 - beta2)
    denominator = np.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps
    p -= m / denominator * (lr / (1.0 - beta1 ** step))


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """One SGD step in place, in NumPy operations of the arrays' dtype (see kernels.optim)."""
    d = g + p * p.dtype.type(weight_decay) if weight_decay else g
    if momentum:
        if first:
            buf[...] = d
        else:
            buf *= p.dtype.type(momentum)
            buf += d * p.dtype.type(1.0 - dampening) if dampening else d
        d = buf * p.dtype.type(momentum) + d if nesterov else buf
    p -= d * p.dtype.type(lr)


def _csr_dense(indptr, indices, data, n_cols):
    """The dense (F, n_cols) matrix of a CSR triple; np.add.at would sum duplicates."""
    f = indptr.shape[0] - 1
    dense = np.zeros((f, n_cols), dtype=data.dtype)
    rows = np.repeat(np.arange(f), np.diff(indptr))
    np.add.at(dense, (rows, indices), data)
    return dense


def csr_chain(layers, ints, vals, x, out, scratch):
    """out = the chain's output: h = act(h @ W.T + b) layer by layer from h = x (scratch unused)."""
    from sclref.kernels.sparse import CHAIN_COLUMNS

    h = x
    for row in layers:
        c = dict(zip(CHAIN_COLUMNS, row.tolist()))
        ip = ints[c["indptr"]:c["indptr"] + c["features"] + 1]
        w = _csr_dense(ip, ints[c["indices"]:c["indices"] + c["nnz"]], vals[c["data"]:c["data"] + c["nnz"]],
                       c["inputs"])
        h = h @ w.T + vals[c["bias"]:c["bias"] + c["features"]]
        if c["act"] == 1:
            h = np.maximum(h, 0)
        elif c["act"] == 2:
            h = np.where(h > 0, h, vals[c["alpha"]] * h)
    out[...] = h


def csr_conv2d(kh, kw, sh, sw, indptr, indices, data, bias, xp, out, act=0, alpha=0):
    """out = act(conv2d_fwd(xp, W) + bias), W the CSR filters reshaped to (F, C, KH, KW)."""
    nch = xp.shape[1]
    w = _csr_dense(indptr, indices, data, nch * kh * kw).reshape(-1, nch, kh, kw)
    conv2d_fwd(xp, w, sh, sw, 0, 0, out)
    out += bias[:, None, None]
    if act == 1:
        relu_fwd(out, out)
    elif act == 2:
        leaky_relu_fwd(out, alpha, out)


__all__ += ["csr_chain", "csr_conv2d"]


def csr_conv2d_chwn(kh, kw, sh, sw, ph, pw, indptr, indices, data, bias, act, alpha, x, out):
    """CHWN -> NCHW, zero padding, the CSR convolution twin, the activation, back to CHWN."""
    nchw = np.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.empty((x.shape[3], out.shape[0], out.shape[1], out.shape[2]), out.dtype)
    csr_conv2d(kh, kw, sh, sw, indptr, indices, data, bias, nchw, y, act, alpha)
    out[...] = y.transpose(1, 2, 3, 0)


def maxpool_chwn(kh, kw, sh, sw, x, out):
    """The max over the windows of NumPy's sliding-window view, on CHWN."""
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw][:, :out.shape[1], :out.shape[2]]
    out[...] = win.max(axis=(4, 5))


def maxpool_nchw(kh, kw, sh, sw, x, out):
    """`maxpool_chwn`'s twin on NCHW seen as CHWN."""
    maxpool_chwn(kh, kw, sh, sw, x.transpose(1, 2, 3, 0), out.transpose(1, 2, 3, 0))
