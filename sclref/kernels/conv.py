"""Compute 2-D convolution (cross-correlation) and its two gradients on NCHW arrays.

Every kernel lowers the convolution to BLAS matrix products over an im2col buffer
built by a jitted loop. Shapes, with K = C*KH*KW and P = OH*OW::

    x  (N, C, H, W)    w  (F, C, KH, KW)    y, gy  (N, F, OH, OW)
    OH = (H + 2*ph - KH) // sh + 1,  OW = (W + 2*pw - KW) // sw + 1

The batch is processed in chunks of b images, b fixed by the shapes alone (never by a
thread count), so that the chunk's im2col buffer ``cols`` (K, b*P) stays about
`CHUNK_BYTES`: it is written by the jitted loop and read back by the matrix product
while still in cache, and scratch memory stays bounded whatever the batch size. Each
chunk costs one matrix product per kernel:

* forward        ``(F, K) @ cols``            -> (F, b*P), reordered to NCHW;
* input grad     ``(F, K).T @ gy_chunk``      -> cols, summed back onto the images;
* weight grad    ``gy_chunk @ cols.T``        -> (F, K), summed over the chunks (see below);

where ``gy_chunk`` is gy's chunk reordered to (F, b*P). With b = 1 (large feature
maps) the reorderings are plain views and the forward product writes NCHW output
directly. Zero padding never materializes: im2col writes zeros for taps outside the
image and col2im skips them. With unit strides and OW == W (the padded 3x3
convolutions of ResNets) each tap of an image is one contiguous run of its plane,
copied or added at once instead of row by row.

Chunks are independent tasks, run on up to numba's thread count of threads by `sclref.kernels.tasks`
while BLAS computes on one thread (as inside `sclref.threads.pinned`): each thread copies
its chunk and runs its own single-threaded matrix product, so the products, which hold
most of the work, use every core without BLAS's threads. A forward or input-gradient
chunk owns its slice of the output. The weight gradient is a sum over the batch: it is
cut into `_groups` runs of consecutive chunks, a number fixed by the shapes alone, each
run summed in batch order into its own partial, and the partials added in order after.
Every sum thus runs in an order fixed by the shapes and `CHUNK_BYTES`, so results are
bit-identical from run to run, on any thread count, jitted or interpreted. BLAS itself
rounds differently on 1 and 2 threads (it picks other block kernels), which is why
`sclref.threads.pinned` runs it on one thread while sclref computes; when BLAS has more
threads, the chunks run serially and BLAS's threads share the product.
"""

import numpy as np

from sclref.kernels._jit import jit
from sclref.kernels.tasks import run_tasks, threads_for

__all__ = ["conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_fwd"]

# Target size of one chunk's im2col buffer, small enough to be still cached when the
# matrix product reads it back. Measured on LeNet-5 and ResNet-20 shapes (float32, one
# BLAS thread, 512 KiB L2 per core): 1-2 MiB chunks were as fast as any and up to 1.5x
# faster than 16-72 MiB ones; past ~1000 columns the product's width gains little.
CHUNK_BYTES = 1 << 20

# The weight gradient's batch is cut into at most this many runs of chunks, each with its
# own (F, K) partial sum, and fewer when the partials would pass `PARTIAL_BYTES`: enough
# runs to keep two threads busy when one of them is late, a count that depends on the
# shapes only so that the order of the sum never changes.
GROUPS = 8
PARTIAL_BYTES = 4 << 20

# The loops below index flat views with unsigned integers: numba's negative-index
# wraparound check on signed indices stops LLVM from vectorizing the short row copies
# (measured 3x slower). Every value cast with `_uint` is non-negative.
_uint = np.uint64


@jit
def _valid_columns(j, pw, sw, ow, w):
    """(t0, t1): output columns t in [t0, t1) read input column t*sw + j - pw inside [0, w)."""
    t0 = 0 if j >= pw else (pw - j + sw - 1) // sw
    t1 = 0 if w + pw - j <= 0 else (w + pw - j - 1) // sw + 1
    t0 = min(t0, ow)
    return t0, max(t0, min(t1, ow))


@jit
def _zero_margins(cf, base, r0, r1, ow, t0, t1, zero):
    """cf[base + r*ow + t] = 0 for rows r in [r0, r1) and columns t outside [t0, t1): the entries a
    contiguous tap run of a "same" convolution wraps onto from neighbouring rows. O((r1 - r0) * ow)."""
    for r in range(r0, r1):
        d = base + _uint(r * ow)
        for t in range(_uint(t0)):
            cf[d + t] = zero
        for t in range(_uint(t1), _uint(ow)):
            cf[d + t] = zero


@jit
def _im2col(x, kh, kw, sh, sw, ph, pw, oh, ow, cols):
    """cols[(c*kh + i)*kw + j, n*P + r*OW + t] = xpad[n, c, r*sh + i, t*sw + j].

    x (b, C, H, W) unpadded, cols (K, b*P). Iteration (n, c) owns the rows of channel c
    for image n. O(b*K*P).
    """
    nimg, nch, h, w = x.shape
    p = oh * ow
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    zero = cols.dtype.type(0)
    usw = _uint(sw)
    # Unit strides and OW == W (a "same" convolution): a tap's valid outputs read one
    # contiguous run of the plane, copied at once; the columns that run wraps onto from
    # neighbouring rows are zeroed after.
    runs = sh == 1 and sw == 1 and ow == w
    for nc in range(nimg * nch):
        n = nc // nch
        c = nc - n * nch
        for i in range(kh):
            for j in range(kw):
                t0, t1 = _valid_columns(j, pw, sw, ow, w)
                row = (c * kh + i) * kw + j
                base = _uint((row * nimg + n) * p)
                if runs:
                    r0, r1 = max(0, ph - i), min(oh, h + ph - i)
                    if r1 <= r0 or t1 <= t0:
                        for t in range(_uint(p)):
                            cf[base + t] = zero
                        continue
                    d0 = base + _uint(r0 * ow + t0)
                    d1 = base + _uint((r1 - 1) * ow + t1)
                    s0 = _uint((nc * h + r0 + i - ph) * w + t0 + j - pw)
                    for t in range(base, d0):
                        cf[t] = zero
                    for t in range(d1 - d0):
                        cf[d0 + t] = xf[s0 + t]
                    for t in range(d1, base + _uint(p)):
                        cf[t] = zero
                    _zero_margins(cf, base, r0, r1, ow, t0, t1, zero)
                    continue
                for r in range(oh):
                    d0 = base + _uint(r * ow)
                    hr = r * sh + i - ph
                    if hr < 0 or hr >= h:
                        for t in range(_uint(ow)):
                            cf[d0 + t] = zero
                        continue
                    for t in range(_uint(t0)):
                        cf[d0 + t] = zero
                    if t1 > t0:
                        d1 = d0 + _uint(t0)
                        s0 = _uint((nc * h + hr) * w + t0 * sw + j - pw)
                        if sw == 1:
                            for t in range(_uint(t1 - t0)):
                                cf[d1 + t] = xf[s0 + t]
                        else:
                            for t in range(_uint(t1 - t0)):
                                cf[d1 + t] = xf[s0 + t * usw]
                    for t in range(_uint(t1), _uint(ow)):
                        cf[d0 + t] = zero


@jit
def _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, gx):
    """gx[n, c] = sum over taps of cols entries landing inside the image; the inverse scatter of `_im2col`.

    cols (K, b*P), also scratch (entries of taps outside the image may be set to 0); gx
    (b, C, H, W), overwritten. Iteration (n, c) owns plane gx[n, c] and the rows of
    channel c for image n; each element sums its taps in (i, j) order. O(b*K*P).
    """
    nimg, nch, h, w = gx.shape
    p = oh * ow
    gf = gx.reshape(-1)
    cf = cols.reshape(-1)
    zero = gx.dtype.type(0)
    usw = _uint(sw)
    # As in `_im2col`, unit strides and OW == W add each tap as one contiguous run. The
    # entries that run wraps onto neighbouring rows are first set to +0 in `cols`: adding
    # +0 changes no bit of a sum that starts from +0 (it can never become -0).
    runs = sh == 1 and sw == 1 and ow == w
    for nc in range(nimg * nch):
        n = nc // nch
        c = nc - n * nch
        plane = _uint(nc * h * w)
        for t in range(_uint(h * w)):
            gf[plane + t] = zero
        for i in range(kh):
            for j in range(kw):
                t0, t1 = _valid_columns(j, pw, sw, ow, w)
                if t1 == t0:
                    continue
                row = (c * kh + i) * kw + j
                if runs:
                    r0, r1 = max(0, ph - i), min(oh, h + ph - i)
                    if r1 <= r0:
                        continue
                    base = _uint((row * nimg + n) * p)
                    _zero_margins(cf, base, r0, r1, ow, t0, t1, zero)
                    s0 = base + _uint(r0 * ow + t0)
                    g0 = _uint((nc * h + r0 + i - ph) * w + t0 + j - pw)
                    for t in range(_uint((r1 - 1 - r0) * ow + t1 - t0)):
                        gf[g0 + t] += cf[s0 + t]
                    continue
                base = _uint((row * nimg + n) * p + t0)
                for r in range(oh):
                    hr = r * sh + i - ph
                    if hr < 0 or hr >= h:
                        continue
                    s0 = base + _uint(r * ow)
                    d0 = _uint((nc * h + hr) * w + t0 * sw + j - pw)
                    if sw == 1:
                        for t in range(_uint(t1 - t0)):
                            gf[d0 + t] += cf[s0 + t]
                    else:
                        for t in range(_uint(t1 - t0)):
                            gf[d0 + t * usw] += cf[s0 + t]


@jit
def _swap01(src, dst):
    """dst[b, a, :] = src[a, b, :] for src (A, B, P), dst (B, A, P); iteration b owns dst[b]."""
    na, nb, p = src.shape
    for b in range(nb):
        for a in range(na):
            s = src[a, b]
            d = dst[b, a]
            for t in range(p):
                d[t] = s[t]


# -- the convolution kernels ----------------------------------------------------------------


def _rows(buf, rows, cols):
    """A C-contiguous (rows, cols) view of the start of the flat buffer `buf`."""
    return buf[:rows * cols].reshape(rows, cols)


def _chunk(n, k, p, dtype):
    """Images per chunk: as many as fit `CHUNK_BYTES` of im2col buffer, at least one."""
    image_bytes = max(k * p * np.dtype(dtype).itemsize, 1)
    return max(1, min(n, CHUNK_BYTES // image_bytes))


def _groups(chunks, partial_bytes):
    """Runs of chunks the weight gradient sums separately (see `GROUPS`); a function of the shapes only."""
    return min(chunks, GROUPS, max(1, PARTIAL_BYTES // max(partial_bytes, 1)))


def _buffers(threads, size, dtype):
    """One flat scratch buffer of `size` entries per thread."""
    return [np.empty(size, dtype=dtype) for _ in range(threads)]


def _channels_first(gy3, buf):
    """gy (b, F, P) as (F, b*P): a view for one image, else reordered into `buf`."""
    b, f, p = gy3.shape
    if b == 1:
        return gy3.reshape(f, p)
    dst = _rows(buf, f, b * p)
    _swap01(gy3, dst.reshape(f, b, p))
    return dst


def conv2d_fwd(x, w, sh, sw, ph, pw, out):
    """Cross-correlate `x` with filters `w` into `out`; no bias.

    x (N, C, H, W), w (F, C, KH, KW), out (N, F, OH, OW), all one float dtype and
    C-contiguous; stride (sh, sw), zero padding (ph, pw).
    out[n, f, a, b] = sum_{c,i,j} w[f, c, i, j] * xpad[n, c, a*sh + i, b*sw + j].
    O(N*F*K*P) flops with K = C*KH*KW, P = OH*OW; about `CHUNK_BYTES` of scratch per thread.
    """
    n = x.shape[0]
    f, c, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    k, p = c * kh * kw, oh * ow
    chunk = _chunk(n, k, p, x.dtype)
    tasks = -(-n // chunk)
    threads = threads_for(tasks, blas=True)
    wm = w.reshape(f, k)
    out3 = out.reshape(n, f, p)
    cols = _buffers(threads, k * chunk * p, x.dtype)
    prod = _buffers(threads, f * chunk * p, x.dtype) if chunk > 1 else None

    def task(i, slot):
        n0 = i * chunk
        b = min(chunk, n - n0)
        cb = _rows(cols[slot], k, b * p)
        _im2col(x[n0:n0 + b], kh, kw, sh, sw, ph, pw, oh, ow, cb)
        if b == 1:
            np.matmul(wm, cb, out=out3[n0])
        else:
            pb = _rows(prod[slot], f, b * p)
            np.matmul(wm, cb, out=pb)
            _swap01(pb.reshape(f, b, p), out3[n0:n0 + b])

    run_tasks(tasks, task, threads)


def conv2d_bwd_input(gy, w, sh, sw, ph, pw, gx):
    """Overwrite `gx` with dL/dx of `conv2d_fwd` given gy = dL/dy.

    gy (N, F, OH, OW), w (F, C, KH, KW), gx (N, C, H, W); every element of `gx` is
    written (positions no window covers get 0). O(N*F*K*P) flops; about `CHUNK_BYTES`
    of scratch per thread.
    """
    n, f, oh, ow = gy.shape
    _, c, kh, kw = w.shape
    k, p = c * kh * kw, oh * ow
    chunk = _chunk(n, k, p, gy.dtype)
    tasks = -(-n // chunk)
    threads = threads_for(tasks, blas=True)
    wt = w.reshape(f, k).T
    gy3 = gy.reshape(n, f, p)
    cols = _buffers(threads, k * chunk * p, gy.dtype)
    gbuf = _buffers(threads, f * chunk * p, gy.dtype) if chunk > 1 else [None] * threads

    def task(i, slot):
        n0 = i * chunk
        b = min(chunk, n - n0)
        cb = _rows(cols[slot], k, b * p)
        np.matmul(wt, _channels_first(gy3[n0:n0 + b], gbuf[slot]), out=cb)
        _col2im(cb, kh, kw, sh, sw, ph, pw, oh, ow, gx[n0:n0 + b])

    run_tasks(tasks, task, threads)


def conv2d_bwd_weight(x, gy, sh, sw, ph, pw, gw):
    """Overwrite `gw` with dL/dw of `conv2d_fwd` given gy = dL/dy.

    x (N, C, H, W), gy (N, F, OH, OW), gw (F, C, KH, KW).
    gw[f, c, i, j] = sum_{n,a,b} gy[n, f, a, b] * xpad[n, c, a*sh + i, b*sw + j].
    O(N*F*K*P) flops; about `CHUNK_BYTES` of scratch per thread and one (F, K) partial
    sum per run of chunks (`_groups`). Each run sums its chunks in batch order, and the
    runs' partial sums are added in batch order.
    """
    n = x.shape[0]
    f, c, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    k, p = c * kh * kw, oh * ow
    chunk = _chunk(n, k, p, x.dtype)
    chunks = -(-n // chunk)
    groups = _groups(chunks, f * k * x.dtype.itemsize)
    total = gw.reshape(f, k)
    if not groups:
        total[...] = 0
        return
    threads = threads_for(groups, blas=True)
    gy3 = gy.reshape(n, f, p)
    partials = [total] + [np.empty((f, k), dtype=x.dtype) for _ in range(1, groups)]
    cols = _buffers(threads, k * chunk * p, x.dtype)
    gbuf = _buffers(threads, f * chunk * p, x.dtype) if chunk > 1 else [None] * threads
    part = [np.empty((f, k), dtype=x.dtype) for _ in range(threads)] if chunks > groups else None

    def task(g, slot):
        first, stop = g * chunks // groups, (g + 1) * chunks // groups
        for i in range(first, stop):
            n0 = i * chunk
            b = min(chunk, n - n0)
            cb = _rows(cols[slot], k, b * p)
            _im2col(x[n0:n0 + b], kh, kw, sh, sw, ph, pw, oh, ow, cb)
            gyc = _channels_first(gy3[n0:n0 + b], gbuf[slot])
            if i == first:
                np.matmul(gyc, cb.T, out=partials[g])
            else:
                np.matmul(gyc, cb.T, out=part[slot])
                partials[g] += part[slot]

    run_tasks(groups, task, threads)
    for g in range(1, groups):
        total += partials[g]
