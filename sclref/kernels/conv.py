"""Compute 2-D convolution (cross-correlation) and its two gradients on NCHW arrays.

Every kernel lowers the convolution to BLAS matrix products over an im2col buffer
built by a jitted loop. Shapes, with K = C*KH*KW and P = OH*OW::

    x  (N, C, H, W)    w  (F, C, KH, KW)    y, gy  (N, F, OH, OW)
    OH = (H + 2*ph - KH) // sh + 1,  OW = (W + 2*pw - KW) // sw + 1

Two buffer layouts are used, chosen by P:

* per-sample ``(N, K, P)``: one ``(F, K) @ (K, P)`` product per image writes NCHW
  output directly, with no transposes. BLAS stays efficient while P is a few
  hundred columns or more (large feature maps).
* batch-wide ``(K, N*P)``: one ``(F, K) @ (K, N*P)`` product for many images, at the
  price of transposing between ``(F, N, P)`` and ``(N, F, P)``. It wins on small
  feature maps, where per-image products are too thin for BLAS.

The batch is processed in chunks so the im2col buffer stays a few MiB whatever the
batch size. Every jitted loop iteration owns a disjoint slice of its output and
every sum runs in a fixed order (the weight gradient adds chunk partials in batch
order), so results are bit-identical from run to run for a given BLAS thread count.
BLAS itself rounds differently on 1 and 2 threads (it picks other block kernels), which
is why `sclref.threads.pinned` runs it on one thread while sclref computes.
"""

import numpy as np

from sclref.kernels._jit import pjit, prange

__all__ = ["conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_fwd"]

# Smallest P = OH*OW at which per-sample GEMMs beat one batch-wide GEMM plus
# transposes (measured at LeNet-5 shapes: P=576 favours per-sample, P=64 batch-wide).
PER_SAMPLE_MIN_P = 256


# The loops below index flat views with unsigned integers: numba's negative-index
# wraparound check on signed indices stops LLVM from vectorizing the short row copies
# (measured 3x slower). Every value cast with `_uint` is non-negative.
_uint = np.uint64


def _make_im2col(batch_layout):
    @pjit
    def im2col(xp, kh, kw, sh, sw, oh, ow, cols):
        nimg, nch, hp, wp = xp.shape
        xf = xp.reshape(-1)
        usw = _uint(sw)
        uow = _uint(ow)
        for nc in prange(nimg * nch):
            n = nc // nch
            c = nc - n * nch
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    dst = cols[row, n] if batch_layout else cols[n, row]
                    for r in range(oh):
                        d0 = _uint(r * ow)
                        s0 = _uint((nc * hp + r * sh + i) * wp + j)
                        if sw == 1:
                            for t in range(uow):
                                dst[d0 + t] = xf[s0 + t]
                        else:
                            for t in range(uow):
                                dst[d0 + t] = xf[s0 + t * usw]

    return im2col


def _make_col2im(batch_layout):
    @pjit
    def col2im(cols, kh, kw, sh, sw, oh, ow, gxp):
        nimg, nch, hp, wp = gxp.shape
        gf = gxp.reshape(-1)
        usw = _uint(sw)
        uow = _uint(ow)
        for nc in prange(nimg * nch):
            n = nc // nch
            c = nc - n * nch
            base = _uint(nc * hp * wp)
            for t in range(_uint(hp * wp)):
                gf[base + t] = 0
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    src = cols[row, n] if batch_layout else cols[n, row]
                    for r in range(oh):
                        s0 = _uint(r * ow)
                        d0 = _uint((nc * hp + r * sh + i) * wp + j)
                        if sw == 1:
                            for t in range(uow):
                                gf[d0 + t] += src[s0 + t]
                        else:
                            for t in range(uow):
                                gf[d0 + t * usw] += src[s0 + t]

    return col2im


@pjit
def _pad(x, ph, pw, xp):
    """xp = x with `ph` zero rows and `pw` zero columns on each side; one pass over xp."""
    nimg, nch, h, w = x.shape
    hp, wp = xp.shape[2], xp.shape[3]
    for nc in prange(nimg * nch):
        n = nc // nch
        c = nc - n * nch
        for r in range(hp):
            dst = xp[n, c, r]
            if r < ph or r >= ph + h:
                for t in range(wp):
                    dst[t] = 0
                continue
            src = x[n, c, r - ph]
            left, mid, right = dst[:pw], dst[pw:pw + w], dst[pw + w:]
            for t in range(pw):
                left[t] = 0
                right[t] = 0
            for t in range(w):
                mid[t] = src[t]


def _padded(x, ph, pw):
    """`x` itself when no padding, else a zero-padded copy (small next to the im2col buffer)."""
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    xp = np.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    _pad(x, ph, pw, xp)
    return xp


def _prefix(buf, shape):
    """A C-contiguous view of the first prod(shape) elements of `buf`."""
    return buf.reshape(-1)[:int(np.prod(shape))].reshape(shape)


# Batch-wide buffers are passed to the jitted loops as (K, N, P) views, per-sample
# ones as (N, K, P).
_im2col_batch = _make_im2col(True)
_im2col_sample = _make_im2col(False)
_col2im_batch = _make_col2im(True)
_col2im_sample = _make_col2im(False)


@pjit
def _swap01(src, dst):
    """dst[b, a, :] = src[a, b, :] for src (A, B, P), dst (B, A, P); iteration b owns dst[b]."""
    na, nb, p = src.shape
    for b in prange(nb):
        for a in range(na):
            s = src[a, b]
            d = dst[b, a]
            for t in range(p):
                d[t] = s[t]


class _Plan:
    """Buffer layout and batch chunking shared by the three kernels of one geometry.

    The batch is processed `chunk` images at a time so the im2col buffer stays a few
    MiB however large the batch: it is then read back from cache by the GEMM, and
    scratch memory stays bounded. Per-sample chunks target L2 (GEMMs are per image
    anyway); batch-wide chunks are larger because BLAS gets faster with more columns.
    """

    SCRATCH_BYTES = {True: 1 << 20, False: 16 << 20}

    def __init__(self, n, c, kh, kw, oh, ow, dtype):
        self.k, self.p = c * kh * kw, oh * ow
        self.per_sample = self.p >= PER_SAMPLE_MIN_P
        image_bytes = self.k * self.p * np.dtype(dtype).itemsize
        self.chunk = max(1, min(n, self.SCRATCH_BYTES[self.per_sample] // max(image_bytes, 1)))
        self.cols = np.empty(self.chunk * self.k * self.p, dtype=dtype)

    def ranges(self, n):
        """[(n0, n1), ...]: the image ranges of consecutive chunks."""
        return [(n0, min(n, n0 + self.chunk)) for n0 in range(0, n, self.chunk)]

    def cols_view(self, b):
        """The im2col buffer for `b` images: (b, K, P) per sample, else (K, b*P)."""
        return _prefix(self.cols, (b, self.k, self.p) if self.per_sample else (self.k, b * self.p))


def _im2col(x, kh, kw, sh, sw, ph, pw, oh, ow, plan):
    """Fill and return the plan's im2col buffer for the images of `x`."""
    b = x.shape[0]
    cols = plan.cols_view(b)
    xp = _padded(x, ph, pw)
    if plan.per_sample:
        _im2col_sample(xp, kh, kw, sh, sw, oh, ow, cols)
    else:
        _im2col_batch(xp, kh, kw, sh, sw, oh, ow, cols.reshape(plan.k, b, plan.p))
    return cols


def _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, plan, gx):
    """Overwrite `gx` with the im2col buffer `cols` summed back onto its windows."""
    b, c, h, w = gx.shape
    gxp = gx if ph == 0 and pw == 0 else np.empty((b, c, h + 2 * ph, w + 2 * pw), dtype=gx.dtype)
    if plan.per_sample:
        _col2im_sample(cols, kh, kw, sh, sw, oh, ow, gxp)
    else:
        _col2im_batch(cols.reshape(plan.k, b, plan.p), kh, kw, sh, sw, oh, ow, gxp)
    if gxp is not gx:
        gx[...] = gxp[:, :, ph:ph + h, pw:pw + w]


def _channels_first(gy3):
    """gy (b, F, P) transposed to (F, b*P), the operand of batch-wide GEMMs."""
    b, f, p = gy3.shape
    gyt = np.empty((f, b, p), dtype=gy3.dtype)
    _swap01(gy3, gyt)
    return gyt.reshape(f, b * p)


def conv2d_fwd(x, w, sh, sw, ph, pw, out):
    """Cross-correlate `x` with filters `w` into `out`; no bias.

    x (N, C, H, W), w (F, C, KH, KW), out (N, F, OH, OW), all one float dtype and
    C-contiguous; stride (sh, sw), zero padding (ph, pw).
    out[n, f, a, b] = sum_{c,i,j} w[f, c, i, j] * xpad[n, c, a*sh + i, b*sw + j].
    O(N*F*K*P) flops with K = C*KH*KW, P = OH*OW; a few MiB of scratch.
    """
    n = x.shape[0]
    f, c, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    plan = _Plan(n, c, kh, kw, oh, ow, x.dtype)
    wm = w.reshape(f, plan.k)
    out3 = out.reshape(n, f, plan.p)
    for n0, n1 in plan.ranges(n):
        cols = _im2col(x[n0:n1], kh, kw, sh, sw, ph, pw, oh, ow, plan)
        if plan.per_sample:
            np.matmul(wm, cols, out=out3[n0:n1])
        else:
            _swap01(np.matmul(wm, cols).reshape(f, n1 - n0, plan.p), out3[n0:n1])


def conv2d_bwd_input(gy, w, sh, sw, ph, pw, gx):
    """Overwrite `gx` with dL/dx of `conv2d_fwd` given gy = dL/dy.

    gy (N, F, OH, OW), w (F, C, KH, KW), gx (N, C, H, W); every element of `gx` is
    written (positions no window covers get 0). O(N*F*K*P) flops; a few MiB of scratch.
    """
    n, f, oh, ow = gy.shape
    _, c, kh, kw = w.shape
    plan = _Plan(n, c, kh, kw, oh, ow, gy.dtype)
    wt = w.reshape(f, plan.k).T
    gy3 = gy.reshape(n, f, plan.p)
    for n0, n1 in plan.ranges(n):
        cols = plan.cols_view(n1 - n0)
        if plan.per_sample:
            np.matmul(wt, gy3[n0:n1], out=cols)
        else:
            np.matmul(wt, _channels_first(gy3[n0:n1]), out=cols)
        _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, plan, gx[n0:n1])


def conv2d_bwd_weight(x, gy, sh, sw, ph, pw, gw):
    """Overwrite `gw` with dL/dw of `conv2d_fwd` given gy = dL/dy.

    x (N, C, H, W), gy (N, F, OH, OW), gw (F, C, KH, KW).
    gw[f, c, i, j] = sum_{n,a,b} gy[n, f, a, b] * xpad[n, c, a*sh + i, b*sw + j].
    O(N*F*K*P) flops; a few MiB of scratch. Chunk partial sums are added in batch order.
    """
    n = x.shape[0]
    f, c, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    plan = _Plan(n, c, kh, kw, oh, ow, x.dtype)
    gy3 = gy.reshape(n, f, plan.p)
    total = gw.reshape(f, plan.k)
    total[...] = 0
    for n0, n1 in plan.ranges(n):
        cols = _im2col(x[n0:n1], kh, kw, sh, sw, ph, pw, oh, ow, plan)
        if plan.per_sample:
            part = np.matmul(gy3[n0:n1], cols.transpose(0, 2, 1)).sum(axis=0)
        else:
            # (K, b*P) @ (b*P, F) is the faster orientation for OpenBLAS at these shapes.
            part = np.matmul(cols, _channels_first(gy3[n0:n1]).T).T
        total += part
