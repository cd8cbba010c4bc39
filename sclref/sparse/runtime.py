"""Run an exported `SparseNetwork` on a CPU with one of three backends per weight layer.

* ``sclref``: the numba CSR kernels of `sclref.kernels.sparse`, parallel over outputs.
* ``scipy``: scipy.sparse products (the reference sparse implementation).
* ``dense``: NumPy/BLAS on the dense form of the same weights (a reference, and the
  fastest choice for dense-enough layers).

``auto`` picks per layer and batch size: dense when the layer's density is at least the
measured break-even density (`DENSE_FROM`), otherwise the sclref kernels (scipy when JIT is
disabled, where the interpreted kernels are slow). The choice depends only on the
network and the batch size, never on timings, so results are reproducible; a string or a
{layer name: backend} dict overrides it.

Linear layers run feature-major, (features, batch), for the sparse backends: every kept
connection is then one vector multiply-add over the batch. A row-major batch enters that
layout through `gather_transpose`, which copies only the input columns some connection
reads. Convolutions run on NCHW arrays.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sclref import kernels
from sclref.kernels.sparse import TILE_MIN
from sclref.sparse import network as net

__all__ = ["BACKENDS", "DENSE_FROM", "Runtime"]

BACKENDS = ("auto", "sclref", "scipy", "dense")

# Break-even densities (kept / all weights) above which dense BLAS beats the sclref
# kernels, by batch size (the largest key <= batch applies). Measured with
# `sclref bench` on LeNet layers (2 cores, float32): a batch of one is a matrix-vector
# product, memory-bound for both; larger batches let BLAS use its full FLOP rate.
DENSE_FROM = {1: 0.5, 16: 0.25}


class _Weights:
    """One weight layer's arrays in the run's dtype, in every form a backend needs."""

    def __init__(self, layer, dtype):
        w = layer.weight
        self.layer = layer
        self.indptr, self.indices = w.indptr, w.indices
        self.data, self.bias = w.data.astype(dtype, copy=False), layer.bias.astype(dtype, copy=False)
        self.csr = type(w)((self.data, self.indices, self.indptr), shape=w.shape)
        self.density = w.nnz / max(1, w.shape[0] * w.shape[1])
        # Input columns read by some connection, and the indices renumbered to them.
        self.cols = np.unique(self.indices).astype(self.indices.dtype)
        self.compact = np.searchsorted(self.cols, self.indices).astype(self.indices.dtype)
        self._dense = None

    @property
    def dense(self) -> np.ndarray:
        if self._dense is None:
            self._dense = self.csr.toarray()
        return self._dense


class Runtime:
    """Inference over a `SparseNetwork`.

    Parameters
    ----------
    network : SparseNetwork
    dtype : float32 or float64, optional
        The compute dtype (default: the network's).
    backend : str or dict
        "auto", "sclref", "scipy" or "dense" for every weight layer, or a dict from layer
        name to backend (layers not named use "auto").
    """

    def __init__(self, network: net.SparseNetwork, dtype=None, backend="auto"):
        self.network = network
        self.dtype = np.dtype(dtype or network.dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        names = {layer.name for layer in network.weighted()}
        chosen = backend if isinstance(backend, dict) else {name: backend for name in names}
        unknown = sorted(set(chosen) - names)
        if unknown:
            raise ValueError(f"backend given for unknown layers {unknown}; weight layers: {sorted(names)}")
        bad = sorted({b for b in chosen.values() if b not in BACKENDS})
        if bad:
            raise ValueError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
        self.backend = {name: chosen.get(name, "auto") for name in names}
        self.weights = {layer.name: _Weights(layer, self.dtype) for layer in network.weighted()}

    def choose(self, name: str, batch: int) -> str:
        """The backend layer `name` runs with for a batch of `batch` samples."""
        backend = self.backend[name]
        if backend != "auto":
            return backend
        threshold = DENSE_FROM[max(b for b in DENSE_FROM if b <= max(batch, 1))]
        if self.weights[name].density >= threshold:
            return "dense"
        return "scipy" if kernels.JIT_DISABLED else "sclref"

    def plan(self, batch: int) -> dict:
        """{weight layer name: backend} for a batch of `batch` samples."""
        return {name: self.choose(name, batch) for name in self.backend}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The network's output for the batch `x` (N, ...): (N, F) or (N, F, OH, OW)."""
        x = self._check_input(x)
        layout = "nchw" if x.ndim == 4 else "rows"
        owned = False
        for layer in self.network.layers:
            x, layout, owned = self.step(layer, x, layout, owned)
        return np.ascontiguousarray(x.T) if layout == "features" else x

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"input must be numeric, got {x.dtype}")
        shape = self.network.input_shape
        if shape is not None and x.shape[1:] != shape:
            if x.ndim < 1 or x[:0].size != 0 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
                raise ValueError(f"input must have per-sample shape {shape}, got {x.shape[1:]}")
            x = x.reshape((x.shape[0], *shape))
        if x.ndim not in (2, 4):
            raise ValueError(f"input must be (N, features) or (N, C, H, W), got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def step(self, layer, x, layout: str, owned: bool):
        """Apply one layer to `x` held in `layout` ("rows", "features" or "nchw"); `owned`: x may be overwritten."""
        if isinstance(layer, net.Linear):
            return (*self.linear(layer.name, x, layout, self.choose(layer.name, _batch(x, layout))), True)
        if isinstance(layer, net.Conv2d):
            return self.conv2d(layer.name, _nchw(layer, x, layout), self.choose(layer.name, x.shape[0])), "nchw", True
        if isinstance(layer, net.Activation):
            if layer.kind == "relu":
                return np.maximum(x, 0, out=x if owned else None), layout, True
            alpha = self.dtype.type(layer.alpha)
            return np.where(x > 0, x, alpha * x), layout, True
        if isinstance(layer, net.MaxPool2d):
            x = _nchw(layer, x, layout)
            (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
            if x.shape[2] < kh or x.shape[3] < kw:
                raise ValueError(f"{layer.name}: pooling window {layer.kernel_size} is larger than the input "
                                 f"{x.shape[2:]}")
            shape = (*x.shape[:2], (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1)
            out, argmax = np.empty(shape, x.dtype), np.empty(shape, np.int64)
            kernels.maxpool2d_fwd(x, kh, kw, sh, sw, out, argmax)
            return out, "nchw", True
        if layout == "nchw":  # Flatten
            return x.reshape(x.shape[0], -1), "rows", owned
        return x, layout, owned

    def linear(self, name: str, x: np.ndarray, layout: str, backend: str):
        """One linear layer; returns (output, layout)."""
        w = self.weights[name]
        f, k = w.csr.shape
        rows = layout == "rows"
        if x.shape[1 if rows else 0] != k:
            raise ValueError(f"{name}: expected {k} input features, got {x.shape[1 if rows else 0]}")
        n = x.shape[0] if rows else x.shape[1]
        if backend == "dense":
            return (x @ w.dense.T + w.bias, "rows") if rows else (w.dense @ x + w.bias[:, None], "features")
        if backend == "scipy":
            return w.csr @ (x.T if rows else x) + w.bias[:, None], "features"
        if rows and n < TILE_MIN:
            out = np.empty((n, f), self.dtype)
            kernels.csr_spmm(w.indptr, w.indices, w.data, w.bias, x, out)
            return out, "rows"
        indices = w.indices
        if rows:
            xt = np.empty((w.cols.size, n), self.dtype)
            kernels.gather_transpose(x, w.cols, xt)
            x, indices = xt, w.compact
        out = np.empty((f, n), self.dtype)
        kernels.csr_matvecs(w.indptr, indices, w.data, w.bias, x, out)
        return out, "features"

    def conv2d(self, name: str, x: np.ndarray, backend: str) -> np.ndarray:
        """One convolution on NCHW input."""
        w = self.weights[name]
        layer = w.layer
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        n, c, h, wd = x.shape
        if c != layer.in_channels:
            raise ValueError(f"{name}: expected {layer.in_channels} input channels, got {c}")
        if h + 2 * ph < kh or wd + 2 * pw < kw:
            raise ValueError(f"{name}: kernel {layer.kernel_size} is larger than the padded input")
        if ph or pw:
            xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), self.dtype)
            xp[:, :, ph:ph + h, pw:pw + wd] = x
        else:
            xp = x
        oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        f = layer.out_channels
        if backend == "sclref":
            out = np.empty((n, f, oh, ow), self.dtype)
            kernels.csr_conv2d(kh, kw, sh, sw, w.indptr, w.indices, w.data, w.bias, xp, out)
            return out
        # im2col: rows c*KH*KW + i*KW + k (the CSR column order), columns (image, pixel).
        windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * oh * ow)
        y = (w.dense if backend == "dense" else w.csr) @ cols + w.bias[:, None]
        return np.ascontiguousarray(y.reshape(f, n, oh, ow).transpose(1, 0, 2, 3))


def _batch(x, layout: str) -> int:
    return x.shape[1] if layout == "features" else x.shape[0]


def _nchw(layer, x, layout: str) -> np.ndarray:
    if layout != "nchw":
        raise ValueError(f"{layer.name}: {layer.kind} needs (N, C, H, W) input, got a flattened batch")
    return x
