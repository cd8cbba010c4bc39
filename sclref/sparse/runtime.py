"""Run an exported `SparseNetwork` on a CPU with one of three backends per weight layer.

* ``sclref``: the numba kernels of `sclref.kernels.sparse`, on the caller's thread
  except large CHWN convolutions, whose output rows are split into tasks that the
  caller's thread takes its share of (that module's doc gives the measurements).
* ``scipy``: scipy.sparse products (the reference sparse implementation).
* ``dense``: NumPy/BLAS on the dense form of the same weights (a reference, and the
  fastest choice for dense-enough layers), on one BLAS thread (`sclref.threads.pinned`,
  once per call): OpenBLAS rounds a product differently on 2 threads than on 1, and a
  2-thread product waits for its second thread whenever another process holds a core.

``auto`` picks per layer and batch size: dense when the layer's density is at least the
measured break-even density (`DENSE_FROM`, `CONV_DENSE_FROM`), otherwise the sclref kernels (scipy when JIT is
disabled, where the interpreted kernels are slow). The choice depends only on the
network and the batch size, never on timings, so results are reproducible; a string or a
{layer name: backend} dict overrides it.

Consecutive linear layers on the sclref backend, each with the activation after it,
form a chain that runs as one `csr_chain` call: the chain is packed once, and only the
chain's input and output are row-major (inside, batch tiles run feature-major). The
plan of an input shape (the chains and the other steps) is built on its first call and
reused: its chains have their kernel, scratch buffer and output shape decided, and a
later array of that shape, dtype and C order goes straight to the plan, past the
checks of the input (at batch 1 these cost as much as the sparse layers). Before a plan
is built, `check_batch` checks every array the batch will need (padded inputs, im2col
columns, dense weights, layer outputs) against `sclref.errors.check_allocation`, so a
geometry from a file cannot ask for more memory than sclref allocates.

Convolutions run on NCHW arrays, except the leading run of sclref convolutions, max
pooling, activations, residual blocks, option-A shortcuts and a global average pooling
of a network, which from a batch of `CHWN_FROM` samples runs on CHWN arrays (batch
innermost): the input is transposed once, each convolution applies its activation as it
finishes an output row, and a following sclref chain reads the last CHWN array (after a
flatten) or the pooled (C, N) features as its feature-major input, so the batch is
transposed back only in the chain's exit (`Runtime._chwn_steps`). A residual block runs
its body and its shortcut (each planned like the network's own layers) on the same
input, adds their outputs and applies the activation that follows the block in place.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sclref import kernels, threads
from sclref.errors import InputError, check_allocation
from sclref.sparse import network as net
from sclref.sparse.format import FormatError, check_range

__all__ = ["BACKENDS", "CHWN_FROM", "CONV_DENSE_FROM", "DENSE_FROM", "Runtime", "to_chwn"]

BACKENDS = ("auto", "sclref", "scipy", "dense")

# Density (kept / all weights) from which a layer runs on dense BLAS instead of the
# sclref kernels, by batch size (the largest key <= batch applies; inf: never). Measured
# by `benchmarks/sparse_inference.py --parts break-even` on every LeNet-300-100 and
# LeNet-5 layer with random weights (float32, 2 cores, BLAS on 2 threads, serial sparse
# kernels, load 5-7 from other users, and beside two more busy processes): dense runs
# only from the density where it was faster at the median and the 90th percentile in
# both conditions. Linear layers at batch 1 broke even at 14-44 % (300x784), 12-75 %
# (100x300) and 28-72 % (500x800); at batch 64 and 256 the 300x784 and 500x800 layers
# stayed faster sparse at every density up to 100 % at the 90th percentile or under load,
# since BLAS's threads stall on a busy machine as numba's do (a 2-thread product waits
# for its second thread up to 8-30 ms).
DENSE_FROM = {1: 0.75, 32: math.inf}
# The same for convolutions against im2col + BLAS: never. LeNet-5's conv1 (1 input
# channel, 25 weights per filter, 24x24 outputs) stayed faster on the direct sparse
# convolution at every density up to 100 % and every batch; conv2 (20 channels, 8x8
# outputs) never broke even at batch 1, and at batch 64 and 256 went faster dense from
# 62-73 % and 27-42 % density. One threshold per batch cannot send conv2 dense without
# sending conv1 too, and a LeNet-5 pruned by global magnitude keeps conv1 (nearly) dense:
# with conv1 dense, auto took 1.4-2.7x the all-sclref time at batch 64 and 256.
CONV_DENSE_FROM = {1: math.inf}
# Batches from this size run the leading sclref convolutions, pooling, activations and
# residual blocks of a network on CHWN activations (`Runtime._chwn_steps`): the input is
# transposed once, and every kernel then runs over contiguous vectors of OW x N lanes
# (N lanes per output column at stride 2, and for pooling). Smaller batches keep NCHW,
# whose flat planes give the direct convolution longer vectors than OW x N. Measured
# whole-network, NCHW / CHWN time (float32, serial kernels, the machine shared with a
# training run): the 98.6 %-sparse LeNet-5 of `benchmarks/sparse_inference.py` 0.68 at
# batch 4, 0.98 at 8, 1.31 at 12, 1.63 at 16; a 92 %-sparse ResNet-20 (Fashion-MNIST)
# 0.47 at 4, 0.80 at 8, 1.05 at 12, 1.36 at 16, 2.2 at 32.
CHWN_FROM = 12


class _Weights:
    """One weight layer's arrays in the run's dtype, in every form a backend needs."""

    def __init__(self, layer, dtype):
        w = layer.weight
        self.layer = layer
        self.indptr, self.indices = w.indptr, w.indices
        self.data, self.bias = w.data.astype(dtype, copy=False), layer.bias.astype(dtype, copy=False)
        self.csr = type(w)((self.data, self.indices, self.indptr), shape=w.shape)
        self.density = w.nnz / max(1, w.shape[0] * w.shape[1])
        self._dense = None

    @property
    def dense(self) -> np.ndarray:
        if self._dense is None:
            f, k = self.csr.shape
            check_allocation((f, k), self.data.itemsize, f"layer {self.layer.name!r}: its {f}x{k} weight made dense")
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
        names = [layer.name for layer in network.weighted()]  # in order: plans list the layers as they run
        chosen = backend if isinstance(backend, dict) else {name: backend for name in names}
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ValueError(f"backend given for unknown layers {unknown}; weight layers: {sorted(names)}")
        bad = sorted({b for b in chosen.values() if b not in BACKENDS})
        if bad:
            raise ValueError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
        self.backend = {name: chosen.get(name, "auto") for name in names}
        if self.dtype.itemsize < np.dtype(network.dtype).itemsize:
            self._check_range()
        self.weights = {layer.name: _Weights(layer, self.dtype) for layer in network.weighted()}
        self._chains, self._plans = {}, {}
        # Every call allocates its activations anew, megabytes each for a CNN: glibc
        # returns such blocks to the system when they are freed and faults them in again
        # on the next call (5-8 ms of system time per call of a pruned ResNet-20 at batch
        # 64, about a tenth of the call), unless told to keep them, as training does.
        threads.keep_freed_memory()

    def choose(self, name: str, batch: int) -> str:
        """The backend layer `name` runs with for a batch of `batch` samples."""
        backend = self.backend[name]
        if backend != "auto":
            return backend
        table = CONV_DENSE_FROM if isinstance(self.weights[name].layer, net.Conv2d) else DENSE_FROM
        threshold = table[max(b for b in table if b <= max(batch, 1))]
        if self.weights[name].density >= threshold:
            return "dense"
        return "scipy" if kernels.JIT_DISABLED else "sclref"

    def plan(self, batch: int) -> dict:
        """{weight layer name: backend} for a batch of `batch` samples."""
        return {name: self.choose(name, batch) for name in self.backend}

    def _check_range(self) -> None:
        try:
            check_range(self.network, self.dtype)
        except FormatError as err:
            raise InputError(f"cannot run this network in {self.dtype.name}: {err}") from None

    def check_batch(self, shape) -> None:
        """Raise before a batch of input shape `shape` (N, ...) needs an array larger than sclref allocates.

        Every array a forward pass allocates is checked with
        `sclref.errors.check_allocation` (a `LimitError` names the layer and the array):
        each layer's output, a convolution's zero-padded input and im2col columns, and
        the dense weights of layers that run dense. A shape the network does not take
        is a ValueError naming the layer.
        """
        n = int(shape[0])
        shapes = self.network.shapes(tuple(shape[1:]))
        check_allocation((n, *shapes[0]), self.dtype.itemsize, f"a batch of {n} inputs of shape {list(shapes[0])}")
        self._check_layers(self.network.layers, shapes[0], n)

    def _check_layers(self, layers: list, before: tuple, n: int) -> tuple:
        """`check_batch` for `layers` on a per-sample input of shape `before`; the shape after them."""
        size = self.dtype.itemsize
        for layer in layers:
            if isinstance(layer, net.Residual):
                after = self._check_layers(layer.body, before, n)
                self._check_layers(layer.shortcut, before, n)
            else:
                after = net.output_shape(layer, before)
            where = f"layer {layer.name!r}, batch of {n}"
            if isinstance(layer, net.WeightLayer):
                backend = self.choose(layer.name, n)
                if backend == "dense":
                    f, k = layer.weight.shape
                    check_allocation((f, k), size, f"layer {layer.name!r}: its {f}x{k} weight made dense")
            if isinstance(layer, net.Conv2d):
                (c, h, w), (kh, kw), (ph, pw) = before, layer.kernel_size, layer.padding
                if ph or pw:
                    check_allocation((n, c, h + 2 * ph, w + 2 * pw), size,
                                     f"{where}: the zero-padded input (padding {list(layer.padding)})")
                if backend != "sclref":
                    check_allocation((c * kh * kw, n * after[1] * after[2]), size,
                                     f"{where}: the im2col columns (kernel {list(layer.kernel_size)})")
            check_allocation((n, *after), size, f"{where}: the output {list(after)} per sample")
            before = after
        return before

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The network's output for the batch `x` (N, ...): (N, F) or (N, F, OH, OW)."""
        run = self._plans.get(x.shape) if type(x) is np.ndarray else None
        if run is not None and x.dtype is self.dtype and x.flags.c_contiguous:
            return run(x)
        given, x = x, self._check_input(x)
        run = self._plans.get(x.shape)
        if run is None:
            if len(self._plans) >= 16:  # bounded: a stream of new batch sizes does not keep every plan and buffer
                self._plans.clear()
            self.check_batch(x.shape)
            dense = "dense" in self.plan(x.shape[0]).values()
            run = self._plans[x.shape] = _plan(self._steps(x.shape[0], entry=x.shape), pin=dense)
        if (type(given) is np.ndarray and given.dtype is self.dtype and given.flags.c_contiguous
                and given.shape != x.shape):
            # Only reshaped (flattened images, say): plan that shape too, as a view of the planned one,
            # rather than checking it again (sevenfold the time of LeNet-300-100's call at batch 1).
            self._plans[given.shape] = functools.partial(_reshaped, run, x.shape)
        return run(x)

    def _steps(self, batch: int, layers: list | None = None, entry: tuple | None = None) -> list:
        """The calls a batch of `batch` samples takes through `layers` (default: the network's): chains of
        sclref linear layers, residual blocks as one call, other layers one by one. `entry`: the shape of
        the checked C-ordered input of `__call__`, which the first step gets."""
        steps, i, feature_major = [], 0, False
        if entry is not None:
            steps, i, feature_major = self._chwn_steps(batch)
        layers = self.network.layers if layers is None else layers
        fresh = bool(steps)  # the next step's input is an array of the run's own (not the caller's)
        while i < len(layers):
            chain = []
            while (i < len(layers) and isinstance(layers[i], net.Linear)
                   and self.choose(layers[i].name, batch) == "sclref"):
                act = _activation_after(layers, i)
                chain.append((self.weights[layers[i].name], act))
                i += 1 + (act is not None)
            if chain:
                if steps and steps[-1] is _flatten:
                    steps.pop()  # the chain's kernel reads any C-ordered (N, ...) input as (N, K)
                key = tuple((w.layer.name, act and act.name) for w, act in chain)
                if key not in self._chains:
                    self._chains[key] = _Chain(chain, self.dtype)
                steps.append(_chain_run(self._chains[key], batch, entry=None if steps else entry,
                                        feature_major=feature_major))
                feature_major, fresh = False, True
            else:
                layer = layers[i]
                if isinstance(layer, net.Flatten):
                    steps.append(_flatten)  # a view: as fresh as its input
                elif isinstance(layer, net.Conv2d) and self.choose(layer.name, batch) == "sclref":
                    act, pool = _conv_tail(layers, i)  # the kernel applies the activation
                    steps.append(functools.partial(self.conv2d, layer.name, backend="sclref", act=act))
                    if pool is not None:
                        steps.append(functools.partial(_maxpool, pool))
                    i += (act is not None) + (pool is not None)
                elif isinstance(layer, net.Residual):
                    act = _activation_after(layers, i)
                    steps.append(_Block(self._steps(batch, layer.body), self._steps(batch, layer.shortcut), act))
                    i += act is not None
                else:
                    steps.append(self._layer_run(layer, batch, fresh))
                fresh = fresh or not isinstance(layer, net.Flatten)
                i += 1
        return steps

    def _layer_run(self, layer, batch: int, fresh: bool):
        """One layer's call on batches of `batch` samples, its backend decided once; a ReLU overwrites a
        `fresh` input. Dispatching through `step` on every call made LeNet-5's at batch 1 1.1x slower."""
        if isinstance(layer, (net.Conv2d, net.Linear)):
            run = self.conv2d if isinstance(layer, net.Conv2d) else self.linear
            return functools.partial(run, layer.name, backend=self.choose(layer.name, batch))
        if isinstance(layer, net.Activation):
            return functools.partial(_activate, layer, in_place=fresh)
        if isinstance(layer, net.MaxPool2d):
            return functools.partial(_maxpool, layer)
        return functools.partial(self.step, layer)

    def _chwn_steps(self, batch: int) -> tuple[list, int, bool]:
        """The CHWN path through the network's first layers: (steps, layers covered, whether it ends feature-major).

        From a batch of CHWN_FROM on, it covers the leading run of layers that have a
        CHWN form (`_chwn_run`) when that run holds a convolution; otherwise ([], 0,
        False). When the run ends in a global average pooling, or in a flatten, and a
        linear layer on the sclref backend follows, the last activation, read as
        (features, N), is the feature-major input of that chain: the batch is
        transposed only on entry and in the chain's exit. Otherwise the run ends with a
        transpose back to NCHW, or to rows after a global average pooling.
        """
        layers, shape = self.network.layers, self.network.input_shape
        if batch < max(CHWN_FROM, kernels.sparse.TILE_MIN) or shape is None or len(shape) != 3:
            return [], 0, False
        steps, i, convs = self._chwn_run(layers, batch)
        if not convs:
            return [], 0, False
        steps.insert(0, to_chwn)
        pooled = isinstance(layers[i - 1], net.GlobalAvgPool2d)
        chain_at = i if pooled else i + 1 if i < len(layers) and isinstance(layers[i], net.Flatten) else None
        if (chain_at is not None and chain_at < len(layers) and isinstance(layers[chain_at], net.Linear)
                and self.choose(layers[chain_at].name, batch) == "sclref"):
            return steps, chain_at, True
        steps.append(_to_rows if pooled else _to_nchw)
        return steps, i, False

    def _chwn_run(self, layers: list, batch: int) -> tuple[list, int, int]:
        """The CHWN steps of the leading layers that have a CHWN form: (steps, layers covered, convolutions).

        Covered: convolutions on the sclref backend, max pooling, activations, option-A
        shortcuts, residual blocks whose body and shortcut are covered whole, and a
        global average pooling, which ends the run. An activation right after a
        convolution, after a convolution and its pooling (ReLU and a leaky ReLU of
        slope >= 0 commute with the max) or after a residual block runs inside it.
        """
        steps, i, convs = [], 0, 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, net.Conv2d) and self.choose(layer.name, batch) == "sclref":
                act, pool = _conv_tail(layers, i)
                i += (act is not None) + (pool is not None)
                steps.append(_ConvCHWN(self.weights[layer.name], act, self.dtype))
                if pool is not None:
                    steps.append(_PoolCHWN(pool))
                convs += 1
            elif isinstance(layer, net.Residual):
                body, covered, body_convs = self._chwn_run(layer.body, batch)
                shortcut, short_covered, short_convs = self._chwn_run(layer.shortcut, batch)
                if covered < len(layer.body) or short_covered < len(layer.shortcut):
                    break
                act = _activation_after(layers, i)
                steps.append(_Block(body, shortcut, act))
                convs, i = convs + body_convs + short_convs, i + (act is not None)
            elif isinstance(layer, net.MaxPool2d):
                steps.append(_PoolCHWN(layer))
            elif isinstance(layer, net.Activation):
                steps.append(lambda x, layer=layer: _activate(layer, x))  # elementwise: any layout
            elif isinstance(layer, net.SubsamplePad):
                steps.append(lambda x, layer=layer: _subsample_pad(x, layer.stride, layer.channels, chwn=True))
            elif isinstance(layer, net.GlobalAvgPool2d):
                steps.append(_mean_chwn)
                i += 1
                break
            else:
                break
            i += 1
        return steps, i, convs

    def _check_input(self, x) -> np.ndarray:
        shape = self.network.input_shape
        if (type(x) is np.ndarray and x.dtype == self.dtype and x.flags.c_contiguous and x.ndim in (2, 4)
                and (shape is None or x.shape[1:] == shape)):
            return x  # already what the kernels take: skip the copies and checks below
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"input must be numeric, got {x.dtype}")
        if shape is not None and x.shape[1:] != shape:
            if x.ndim < 1 or x[:0].size != 0 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
                raise ValueError(f"input must have per-sample shape {shape}, got {x.shape[1:]}")
            x = x.reshape((x.shape[0], *shape))
        if x.ndim not in (2, 4):
            raise ValueError(f"input must be (N, features) or (N, C, H, W), got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def step(self, layer, x: np.ndarray, backend: str | None = None) -> np.ndarray:
        """Apply one layer to `x`, (N, features) or (N, C, H, W); `backend` for weight layers (default: `choose`)."""
        if isinstance(layer, net.Linear):
            return self.linear(layer.name, x, backend or self.choose(layer.name, x.shape[0]))
        if isinstance(layer, net.Conv2d):
            return self.conv2d(layer.name, _nchw(layer, x), backend or self.choose(layer.name, x.shape[0]))
        if isinstance(layer, net.Residual):
            body, shortcut = x, x
            for sub in layer.body:
                body = self.step(sub, body, backend)
            for sub in layer.shortcut:
                shortcut = self.step(sub, shortcut, backend)
            return body + shortcut
        if isinstance(layer, net.GlobalAvgPool2d):
            return _nchw(layer, x).mean(axis=(2, 3))
        if isinstance(layer, net.SubsamplePad):
            return _subsample_pad(_nchw(layer, x), layer.stride, layer.channels)
        if isinstance(layer, net.Activation):
            return _activate(layer, x)
        if isinstance(layer, net.MaxPool2d):
            return _maxpool(layer, x)
        return _flatten(x)

    def linear(self, name: str, x: np.ndarray, backend: str) -> np.ndarray:
        """One linear layer on rows (N, K), without its activation; returns (N, F)."""
        w = self.weights[name]
        k = w.csr.shape[1]
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"{name}: expected (N, {k}) input, got shape {x.shape}")
        if backend == "dense":
            with threads.pinned():
                return x @ w.dense.T + w.bias
        if backend == "scipy":
            # (N, F) as a transposed view: a following scipy layer reads it without a copy.
            return (w.csr @ x.T).T + w.bias
        key = ((name, None),)
        if key not in self._chains:
            self._chains[key] = _Chain([(w, None)], self.dtype)
        return _chain_run(self._chains[key], x.shape[0])(x)

    def conv2d(self, name: str, x: np.ndarray, backend: str, act: net.Activation | None = None) -> np.ndarray:
        """One convolution on NCHW input, then the activation `act`, if any."""
        w = self.weights[name]
        layer = w.layer
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        n, c, h, wd = x.shape
        _check_conv(layer, c, h, wd)
        if ph or pw:
            xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), self.dtype)
            xp[:, :, ph:ph + h, pw:pw + wd] = x
        else:
            xp = x
        oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        f = layer.out_channels
        if backend == "sclref":
            out = np.empty((n, f, oh, ow), self.dtype)
            code, alpha = _kernel_act(act)
            kernels.csr_conv2d(kh, kw, sh, sw, w.indptr, w.indices, w.data, w.bias, xp, out, code, alpha)
            return out
        # im2col: rows c*KH*KW + i*KW + k (the CSR column order), columns (image, pixel).
        windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * oh * ow)
        if backend == "dense":
            with threads.pinned():
                y = w.dense @ cols
        else:
            y = w.csr @ cols
        y += w.bias[:, None]
        y = np.ascontiguousarray(y.reshape(f, n, oh, ow).transpose(1, 0, 2, 3))
        return y if act is None else _activate(act, y, in_place=True)

    def conv2d_chwn(self, name: str, x: np.ndarray) -> np.ndarray:
        """One sclref convolution, without its activation, on C-contiguous CHWN input (C, H, W, N) of the run's
        dtype, as a batch of `CHWN_FROM` or more runs it; returns (F, OH, OW, N)."""
        if x.ndim != 4 or x.dtype != self.dtype or not x.flags.c_contiguous:
            raise ValueError(f"{name}: expected C-contiguous (C, H, W, N) {self.dtype} input, got {x.dtype} "
                             f"{x.shape}")
        _check_conv(self.weights[name].layer, *x.shape[:3])
        return _ConvCHWN(self.weights[name], None, self.dtype)(x)


def _check_conv(layer: net.Conv2d, c: int, h: int, wd: int) -> None:
    """Raise ValueError unless a per-sample input of c channels, h x wd pixels, fits the convolution `layer`."""
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    if c != layer.in_channels:
        raise ValueError(f"{layer.name}: expected {layer.in_channels} input channels, got {c}")
    if h + 2 * ph < kh or wd + 2 * pw < kw:
        raise ValueError(f"{layer.name}: kernel {layer.kernel_size} is larger than the padded input")


class _Block:
    """A residual block's planned steps: body and shortcut on the same input, outputs added, then `act` (or None)."""

    def __init__(self, body: list, shortcut: list, act: net.Activation | None = None):
        self.body, self.shortcut, self.act = body, shortcut, act

    def __call__(self, x: np.ndarray) -> np.ndarray:
        body, shortcut = x, x
        for step in self.body:
            body = step(body)
        for step in self.shortcut:
            shortcut = step(shortcut)
        if np.may_share_memory(body, x):  # a body of views (a flatten, say): its output is not ours to overwrite
            body = body + shortcut
        else:
            body += shortcut
        return body if self.act is None else _activate(self.act, body, in_place=True)


def _conv_tail(layers: list, i: int) -> tuple[net.Activation | None, net.MaxPool2d | None]:
    """What the convolution layers[i] can take into its own loop: the activation right after it, or after its max
    pooling when they commute with the max (ReLU, leaky ReLU of slope >= 0); (that activation, that pooling)."""
    act, after = _activation_after(layers, i), layers[i + 1:i + 3]
    if act is None and (len(after) == 2 and isinstance(after[0], net.MaxPool2d) and isinstance(after[1], net.Activation)
                        and (after[1].kind == "relu" or after[1].alpha >= 0)):
        return after[1], after[0]
    return act, None


def _kernel_act(act: net.Activation | None) -> tuple[int, float]:
    """An activation (or None) as the sparse kernels take it: its `ACTIVATIONS` code and its slope (0 for none)."""
    return (kernels.sparse.ACTIVATIONS[act.kind], act.alpha or 0) if act is not None else (0, 0)


def _activation_after(layers: list, i: int) -> net.Activation | None:
    """The activation right after layers[i], or None."""
    return layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], net.Activation) else None


def _activate(layer: net.Activation, x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """ReLU or leaky ReLU of `x`; a ReLU overwrites `x` when `in_place`."""
    if layer.kind == "relu":
        return np.maximum(x, x.dtype.type(0), out=x if in_place else None)
    return np.where(x > 0, x, x.dtype.type(layer.alpha) * x)


def _subsample_pad(x: np.ndarray, stride, channels, chwn: bool = False) -> np.ndarray:
    """An option-A shortcut: every stride-th pixel, with zero channels before and after, on NCHW or CHWN."""
    (sh, sw), (before, after) = stride, channels
    if chwn:
        kept = x[:, ::sh, ::sw]
        out = np.zeros((x.shape[0] + before + after, *kept.shape[1:]), x.dtype)
        out[before:before + x.shape[0]] = kept
        return out
    kept = x[:, :, ::sh, ::sw]
    out = np.zeros((x.shape[0], x.shape[1] + before + after, *kept.shape[2:]), x.dtype)
    out[:, before:before + x.shape[1]] = kept
    return out


def _mean_chwn(x: np.ndarray) -> np.ndarray:
    """Global average pooling of CHWN activations: (C, N), the features of each sample as a column."""
    return np.ascontiguousarray(x.mean(axis=(1, 2)))


def _to_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _maxpool(layer: net.MaxPool2d, x: np.ndarray) -> np.ndarray:
    """Max pooling of NCHW `x` by `layer`."""
    x = _nchw(layer, x)
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    if x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"{layer.name}: pooling window {layer.kernel_size} is larger than the input {x.shape[2:]}")
    out = np.empty((*x.shape[:2], (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1), x.dtype)
    # Values only, compiled: inference needs no argmax, and NumPy's whole-array maxima of
    # strided views took 1.8x the time at LeNet-5's pool1 at batch 1, 1.2-1.3x at 4-32.
    kernels.maxpool_nchw(kh, kw, sh, sw, np.ascontiguousarray(x), out)
    return out


def _reshaped(run, shape: tuple, x: np.ndarray) -> np.ndarray:
    return run(x.reshape(shape))


def _flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _nchw(layer, x) -> np.ndarray:
    if x.ndim != 4:
        raise ValueError(f"{layer.name}: {layer.kind} needs (N, C, H, W) input, got a flattened batch")
    return x


def to_chwn(x: np.ndarray) -> np.ndarray:
    """A batch (N, ...) as a new C-ordered (..., N) array starting on a cache line: the CHWN layout of its
    convolutions (`kernels.sparse.aligned_empty`)."""
    n = x.shape[0]
    out = kernels.sparse.aligned_empty((*x.shape[1:], n), x.dtype)
    np.copyto(out.reshape(-1, n), x.reshape(n, -1).T)
    return out


def _to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


class _ConvCHWN:
    """A sclref convolution on CHWN activations, with the activation after it (or None)."""

    def __init__(self, w: _Weights, act, dtype):
        layer = w.layer
        self.w, self.kernel, self.stride, self.padding = w, layer.kernel_size, layer.stride, layer.padding
        self.act, alpha = _kernel_act(act)
        self.alpha = np.dtype(dtype).type(alpha)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        (kh, kw), (sh, sw), (ph, pw), w = self.kernel, self.stride, self.padding, self.w
        c, h, wd, n = x.shape
        out = kernels.sparse.aligned_empty((w.bias.shape[0], (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1,
                                            n), x.dtype)
        kernels.csr_conv2d_chwn(kh, kw, sh, sw, ph, pw, w.indptr, w.indices, w.data, w.bias, self.act, self.alpha, x,
                                out)
        return out


class _PoolCHWN:
    """Max pooling on CHWN activations."""

    def __init__(self, layer: net.MaxPool2d):
        self.kernel, self.stride = layer.kernel_size, layer.stride

    def __call__(self, x: np.ndarray) -> np.ndarray:
        (kh, kw), (sh, sw) = self.kernel, self.stride
        c, h, wd, n = x.shape
        out = kernels.sparse.aligned_empty((c, (h - kh) // sh + 1, (wd - kw) // sw + 1, n), x.dtype)
        kernels.maxpool_chwn(kh, kw, sh, sw, x, out)
        return out


class _Chain:
    """Linear layers, each with the activation after it, packed once for `csr_chain` calls."""

    def __init__(self, chain, dtype):
        self.layers, self.ints, self.vals = kernels.pack_chain(
            [w.csr for w, _ in chain], [w.bias for w, _ in chain], [act and act.kind for _, act in chain],
            [act and act.alpha for _, act in chain], dtype)
        self.features, self.dtype = chain[-1][0].csr.shape[0], dtype


def _chain_run(chain: _Chain, n: int, entry: tuple | None = None, feature_major: bool = False):
    """A chain's `csr_chain` call on batches of `n` samples, kernel, scratch and output shape decided once: x -> out.

    `entry`: every input is a C-ordered array of this shape in the chain's dtype (the
    network's checked input), else any array. `feature_major`: its input is a CHWN
    activation, read as (K, N) (at least TILE_MIN samples). A closure over locals, not
    an object: at batch 1 the call's Python overhead is most of its time, and with
    `entry` it skips numba's dispatch too. Below TILE_MIN samples the kernel allocates
    its own scratch; otherwise the scratch is the run's, and a call from a second
    thread while the first is inside the kernel (which releases the GIL) takes a
    scratch of its own for that call. Its output is a new C-ordered array (`fresh`).
    """
    layers, ints, vals, dtype = chain.layers, chain.ints, chain.vals, chain.dtype
    scratch = kernels.chain_scratch(layers, n, dtype)
    kernel = kernels.chain_kernel(scratch, feature_major)
    shape, empty, ordered, contiguous = (n, chain.features), np.empty, np.ascontiguousarray, entry is not None

    if scratch is None:
        if contiguous:
            kernel = kernels.compiled(kernel, layers, ints, vals, empty(entry, dtype), empty(shape, dtype))

        def run(x: np.ndarray) -> np.ndarray:
            out = empty(shape, dtype)
            kernel(layers, ints, vals, x if contiguous else ordered(x), out)
            return out
    else:
        lock = threading.Lock()

        def run(x: np.ndarray) -> np.ndarray:
            if not contiguous:
                x = ordered(x)
            out = empty(shape, dtype)
            if lock.acquire(False):
                try:
                    kernel(layers, ints, vals, x, out, scratch)
                finally:
                    lock.release()
            else:
                kernel(layers, ints, vals, x, out, kernels.chain_scratch(layers, n, dtype))
            return out

    run.fresh = True
    return run


def _plan(steps: list, pin: bool = False):
    """One call running `steps` in order and returning a C-ordered array; with `pin`, inside `threads.pinned`."""
    if len(steps) == 1 and getattr(steps[0], "fresh", False):
        return steps[0]  # its output is a new C-ordered array

    def run(x: np.ndarray) -> np.ndarray:
        for step in steps:
            x = step(x)
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    if not pin:
        return run

    def pinned_run(x: np.ndarray) -> np.ndarray:
        with threads.pinned():  # one pin for the call, not one per dense layer (the outermost costs ~20 µs)
            return run(x)

    return pinned_run
