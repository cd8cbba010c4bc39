"""Compute the layers of an exported sparse network: CSR products and direct sparse convolution.

A weight matrix W of shape (F, K) is held in canonical CSR: ``indptr`` (F+1,),
``indices`` (nnz,) sorted and unique within each row, ``data`` (nnz,). Indices are
int32 or int64; ``data``, ``bias``, inputs and outputs share one float dtype. Every
output element is a sum over the kept connections of its row taken in index order,
then the bias is added, whatever the batch size, tiling or thread count: results are
bit-identical from run to run and equal for a sample alone or inside a batch.

Parallel loops split the outputs (output rows of the batch, output features, or
(image, filter) planes), never a sum, so threads write disjoint slices. Unlike the
dense kernels, these loops run in parallel by default: sparse inference calls no
BLAS, so the thread-pool contention described in `sclref.kernels._jit` does not
arise. Small problems run on the serial twin of each loop, because waking threads
costs more than the work (``SCLREF_SPARSE_PARALLEL=0`` makes every call serial).
"""

import os

import numba
import numpy as np

from sclref.kernels._jit import JIT_DISABLED, _decorate, jit, prange

__all__ = ["PARALLEL_MIN_WORK", "SPARSE_PARALLEL", "TILE", "TILE_MIN", "csr_conv2d", "csr_matvecs", "csr_spmm",
           "gather_transpose"]

SPARSE_PARALLEL = os.environ.get("SCLREF_SPARSE_PARALLEL", "1") != "0" and not JIT_DISABLED

# Batch rows transposed together by `csr_spmm`: a (K, TILE) block of the input is
# read column-wise by every kept connection, so it should stay in L1 (K=784,
# float32: 25 KiB), and TILE lanes fill whole SIMD registers.
TILE = 64

# Batches narrower than this take the gathered dot-product loop: one dependent
# chain of additions per output, but no block transposes and no loads and stores of
# partial sums.
TILE_MIN = 4

# Below this many multiply-adds (batch rows x nnz, or output pixels x nnz) a call
# runs serially: waking the worker threads costs several microseconds.
PARALLEL_MIN_WORK = 1 << 16


def _parallel(fn):
    """`fn` compiled with its `prange` loops running on numba's thread pool."""
    return _decorate(fn, parallel=True)


def _spmm_rows(indptr, indices, data, bias, x, out):
    # out[r, j] = sum_p data[p] * x[r, indices[p]] + bias[j]: for a few batch rows,
    # a gathered dot product per output; parallel over the outputs j.
    n = x.shape[0]
    f = out.shape[1]
    for j in prange(f):
        p0, p1 = indptr[j], indptr[j + 1]
        for r in range(n):
            xr = x[r]
            acc = out.dtype.type(0)
            for p in range(p0, p1):
                acc += data[p] * xr[indices[p]]
            out[r, j] = acc + bias[j]


def _spmm_tiles(indptr, indices, data, bias, x, out):
    # Batch rows in tiles of TILE: the tile of x is transposed into a (K, TILE)
    # block, so each kept connection adds w * block[k, :] to TILE accumulators with
    # a few vector instructions; parallel over tiles, each owning its rows of `out`.
    n, k = x.shape
    f = out.shape[1]
    zero = out.dtype.type(0)
    for t in prange((n + TILE - 1) // TILE):
        n0 = t * TILE
        nb = min(TILE, n - n0)
        block = np.zeros((k, TILE), dtype=x.dtype)
        # Column-major walk: each block row is written whole, the x rows are read
        # from a few cache lines that stay in L1 (the row-major walk measured several times slower).
        for c in range(k):
            dst = block[c]
            for r in range(nb):
                dst[r] = x[n0 + r, c]
        acc = np.empty(TILE, dtype=out.dtype)
        for j in range(f):
            for r in range(TILE):
                acc[r] = zero
            for p in range(indptr[j], indptr[j + 1]):
                w = data[p]
                src = block[indices[p]]
                for r in range(TILE):
                    acc[r] += w * src[r]
            b = bias[j]
            for r in range(nb):
                out[n0 + r, j] = acc[r] + b


def _matvecs(indptr, indices, data, bias, x, out):
    # Feature-major: out[j, :] = sum_p data[p] * x[indices[p], :] + bias[j], each kept
    # connection one vector multiply-add over the batch; parallel over the outputs j.
    f, n = out.shape
    zero = out.dtype.type(0)
    for j in prange(f):
        dst = out[j]
        for r in range(n):
            dst[r] = zero
        for p in range(indptr[j], indptr[j + 1]):
            w = data[p]
            src = x[indices[p]]
            for r in range(n):
                dst[r] += w * src[r]
        b = bias[j]
        for r in range(n):
            dst[r] += b


_ROWS = {False: jit(_spmm_rows), True: _parallel(_spmm_rows)}
_TILES = {False: jit(_spmm_tiles), True: _parallel(_spmm_tiles)}
_MATVECS = {False: jit(_matvecs), True: _parallel(_matvecs)}


def _use_threads(work):
    return SPARSE_PARALLEL and work >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1


def csr_spmm(indptr, indices, data, bias, x, out):
    """out = x @ W.T + bias for a CSR weight W of shape (F, K).

    indptr (F+1,), indices (nnz,), data (nnz,), bias (F,), x (N, K), out (N, F);
    C-contiguous, canonical CSR, one float dtype for data/bias/x/out.
    O(N*nnz + N*K + N*F) time. Fewer than TILE rows: a gathered dot product per output
    (parallel over outputs); otherwise the batch in tiles of TILE rows, each tile
    transposed once so every connection updates TILE outputs with one vector
    multiply-add (parallel over tiles).
    """
    n = x.shape[0]
    par = _use_threads(n * data.shape[0])
    if n < TILE_MIN:
        _ROWS[par](indptr, indices, data, bias, x, out)
    else:
        _TILES[par](indptr, indices, data, bias, x, out)


def csr_matvecs(indptr, indices, data, bias, x, out):
    """out = W @ x + bias[:, None] in feature-major layout, for a CSR weight W (F, K).

    indptr (F+1,), indices (nnz,), data (nnz,), bias (F,), x (K, N), out (F, N): the
    batch runs along the last axis, as in scipy's ``csr_matvecs``. C-contiguous,
    canonical CSR, one float dtype. O(N*nnz + N*F) time: every kept connection is one
    vector multiply-add over the batch, with no transposes; parallel over outputs.
    Below TILE columns it takes the gathered dot-product loop of `csr_spmm` (the same
    sums in the same order).
    """
    n = x.shape[1]
    par = _use_threads(n * data.shape[0])
    if n < TILE_MIN:
        _ROWS[par](indptr, indices, data, bias, x.T, out.T)
    else:
        _MATVECS[par](indptr, indices, data, bias, x, out)


def _gather_t(x, cols, out):
    # out[q, r] = x[r, cols[q]] in blocks of 16 batch rows: the 16 rows being read stay
    # in L1 while every kept column is visited; parallel over row blocks, each owning
    # its columns of `out`.
    n = x.shape[0]
    u = cols.shape[0]
    for t in prange((n + 15) // 16):
        r0 = t * 16
        r1 = min(n, r0 + 16)
        for q in range(u):
            c = cols[q]
            dst = out[q]
            for r in range(r0, r1):
                dst[r] = x[r, c]


_GATHER = {False: jit(_gather_t), True: _parallel(_gather_t)}


def gather_transpose(x, cols, out):
    """out = x[:, cols].T: the columns a sparse layer reads, turned feature-major.

    x (N, K), cols (U,) int32/int64 in [0, K), out (U, N) of x's dtype, C-contiguous.
    O(N*U) time. This is how a row-major batch enters `csr_matvecs`: only the input
    columns that some connection reads are copied (the CSR indices are renumbered to
    positions in `cols`), and every later layer stays feature-major.
    """
    _GATHER[_use_threads(x.shape[0] * cols.shape[0])](x, cols, out)


def _conv(kh, kw, sh, sw, indptr, indices, data, bias, xp, out):
    # Direct sparse convolution: each kept weight w[j, c, i, k] adds w times a strided
    # window of input plane c to output plane j, a vectorizable row update; parallel
    # over (image, filter) planes.
    nimg, nch, hp, wp = xp.shape
    f, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    khw = kh * kw
    zero = out.dtype.type(0)
    for q in prange(nimg * f):
        n = q // f
        j = q - n * f
        o = out[n, j]
        for a in range(oh):
            for b in range(ow):
                o[a, b] = zero
        for p in range(indptr[j], indptr[j + 1]):
            col = indices[p]
            c = col // khw
            i = (col - c * khw) // kw
            k = col - c * khw - i * kw
            w = data[p]
            plane = xp[n, c]
            for a in range(oh):
                src = plane[a * sh + i]
                dst = o[a]
                if sw == 1:
                    for b in range(ow):
                        dst[b] += w * src[b + k]
                else:
                    for b in range(ow):
                        dst[b] += w * src[b * sw + k]
        bj = bias[j]
        for a in range(oh):
            for b in range(ow):
                o[a, b] += bj


_CONV = {False: jit(_conv), True: _parallel(_conv)}


def csr_conv2d(kh, kw, sh, sw, indptr, indices, data, bias, xp, out):
    """Cross-correlate a zero-padded input with CSR filters, then add the bias.

    The filters W (F, C, KH, KW) are a CSR matrix of shape (F, C*KH*KW) whose column
    ``c*KH*KW + i*KW + k`` is w[:, c, i, k] (the im2col order). xp (N, C, Hp, Wp) is
    the already padded input, out (N, F, OH, OW) with OH = (Hp - KH) // sh + 1.
    out[n, j, a, b] = sum_{c,i,k} w[j, c, i, k] * xp[n, c, a*sh + i, b*sw + k] + bias[j].
    O(N*nnz*OH*OW + N*F*OH*OW) time, no scratch memory.
    """
    n, f, oh, ow = out.shape
    par = _use_threads(n * oh * ow * max(data.shape[0], f))
    _CONV[par](kh, kw, sh, sw, indptr, indices, data, bias, xp, out)
