"""Measure an exported network layer by layer: dense NumPy, scipy.sparse, the sclref kernels
and torch.sparse (when installed), at several batch sizes, with the memory-bound floor.

Each backend runs in its own process (so thread pools of BLAS, numba and torch never
fight over the cores) and the processes take turns in short blocks after a warm-up call;
figures are medians, so the backends of one row are comparable. A convolution's sclref
row times the layout the network runs it in: NCHW below
`sclref.sparse.runtime.CHWN_FROM` samples, CHWN from there on (the transposes, done
once per network, are not in the row). The floor of a layer at batch 1 is the bytes it
must read (CSR values, indices, row pointer, input) over the copy bandwidth measured in
the same run. The break-even density is where the sclref kernel, run on random CSR
weights of the layer's shape, becomes as slow as dense BLAS (interpolated in density).
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np
import scipy.sparse as sp

from sclref.errors import InputError
from sclref.sparse import network as net
from sclref.sparse.runtime import CHWN_FROM, Runtime, to_chwn

__all__ = ["BREAK_EVEN_GRID", "MAX_BATCH", "MAX_BATCH_SIZES", "MAX_REPS", "bandwidth", "bench", "break_even_density",
           "call_times", "check_counts", "copy_probe", "format_report", "median_times"]

BREAK_EVEN_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)

# Bounds of the counts a caller (or a command-line flag) gives: a latency benchmark has
# no use for more, and a mistyped count should be an error, not hours of timing.
MAX_BATCH = 1 << 20
MAX_BATCH_SIZES = 16
MAX_REPS = 10_000


def call_times(fn, count: int) -> list[float]:
    """Seconds of each of `count` calls of `fn`, one after the other."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_times(fns: dict, reps: int, warmup: int = 3) -> dict:
    """Median seconds per call of each function, called in turn `reps` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name] += call_times(fn, 1)
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_probe(megabytes: int = 256):
    """(call, bytes): a zero-argument copy of `megabytes` MiB between two arrays, and the bytes it reads plus writes.

    At 256 MiB the copy is far beyond any cache; copies of 32-128 MiB ran at 0.5-0.6x its
    bandwidth on the 2-core machine the benchmarks were measured on.
    """
    src = np.ones(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    return (lambda: np.copyto(dst, src)), 2 * src.nbytes


def bandwidth(megabytes: int = 256, reps: int = 7) -> float:
    """Memory bandwidth in bytes/s: bytes read plus written by a large array copy (`copy_probe`)."""
    call, moved = copy_probe(megabytes)
    return moved / median_times({"copy": call}, reps, warmup=1)["copy"]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _layer_inputs(network, dtype, batch, seed=0):
    """The input each weight layer sees in a forward pass of a random batch (rows or NCHW)."""
    run = Runtime(network, dtype, "dense")
    shape = network.input_shape or (network.weighted()[0].weight.shape[1],)
    x = run._check_input(np.random.default_rng(seed).standard_normal((batch, *shape)))
    seen = {}
    _record(run, network.layers, x, seen)
    return seen


def _record(run: Runtime, layers: list, x: np.ndarray, seen: dict) -> np.ndarray:
    """Run `layers` on `x`, keeping each weight layer's input in `seen` (inside residual blocks too)."""
    for layer in layers:
        if isinstance(layer, net.WeightLayer):
            seen[layer.name] = np.ascontiguousarray(x)
        if isinstance(layer, net.Residual):
            x = _record(run, layer.body, x, seen) + _record(run, layer.shortcut, x, seen)
        else:
            x = run.step(layer, x)
    return x


def _fns(run: Runtime, layer, x, torch):
    name = layer.name
    if isinstance(layer, net.Conv2d):
        fns = {b: (lambda b=b: run.conv2d(name, x, b)) for b in ("dense", "scipy")}
        fns["sclref"] = _sclref_conv(run, name, x)
    else:
        fns = {b: (lambda b=b: run.linear(name, x, b)) for b in ("dense", "scipy", "sclref")}
        if torch is not None:
            w = run.weights[name]
            with warnings.catch_warnings():  # "CSR support is in beta": noise in a report
                warnings.simplefilter("ignore")
                a = torch.sparse_csr_tensor(torch.from_numpy(w.indptr.astype(np.int64)),
                                            torch.from_numpy(w.indices.astype(np.int64)), torch.from_numpy(w.data),
                                            size=w.csr.shape)
            xt, bias = torch.from_numpy(x), torch.from_numpy(w.bias)[:, None]
            fns["torch"] = lambda: a @ xt.T + bias
    return fns


def _sclref_conv(run: Runtime, name: str, x: np.ndarray):
    """The sclref convolution `name` on NCHW input `x` in the layout a network runs it in at this batch.

    From `CHWN_FROM` samples, a network's leading sclref convolutions run on CHWN
    activations, transposed once on the network's entry: the call timed is the CHWN
    kernel on an input already in that layout. Smaller batches run on NCHW.
    """
    if x.shape[0] < CHWN_FROM:
        return lambda: run.conv2d(name, x, "sclref")
    chwn = to_chwn(x)
    return lambda: run.conv2d_chwn(name, chwn)


def _random_like(layer, dtype, density: float, seed: int = 1):
    """`layer` with random canonical CSR weights of the same shape and the given density."""
    f, k = layer.weight.shape
    w = sp.random_array((f, k), density=density, format="csr", dtype=dtype, rng=np.random.default_rng(seed))
    w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(f, k))
    w.sort_indices()
    return type(layer)(**{**vars(layer), "weight": w})


def _worker(conn, network, dtype, backend, batches):
    # One backend in its own process: its thread pool (BLAS, numba or torch) never spins
    # on the cores while another backend is being timed.
    torch = _torch() if backend == "torch" else None
    run = Runtime(network, dtype, "auto" if backend == "torch" else backend)
    inputs = {b: _layer_inputs(network, dtype, b) for b in batches}
    layers = {layer.name: layer for layer in network.weighted()}
    shape = network.input_shape or (network.weighted()[0].weight.shape[1],)
    nets = {b: np.random.default_rng(0).standard_normal((b, *shape)).astype(dtype) for b in batches}
    while True:
        job = conn.recv()
        if job is None:
            break
        what, name, batch, count, density = job
        if what == "net":
            fn = (lambda x=nets[batch]: run(x)) if backend != "torch" else None
        elif what == "density":
            trial = _random_like(layers[name], dtype, density)
            trun = Runtime(net.SparseNetwork([trial], dtype), dtype, "sclref")
            fn = _fns(trun, trial, inputs[batch][name], None)["sclref"]
        else:
            fn = _fns(run, layers[name], inputs[batch][name], torch).get(backend)
        if fn is None:
            conn.send(None)
            continue
        fn()
        conn.send(call_times(fn, count))
    conn.close()


class _Workers:
    """One process per backend; `time` runs a job on each in turn, in blocks, and keeps medians."""

    def __init__(self, network, dtype, backends, batches, pause, masked=None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.pause, self.procs = pause, {}
        for b in backends + (("masked",) if masked is not None else ()):
            parent, child = ctx.Pipe()
            args = (child, masked, dtype, "dense", batches) if b == "masked" else (child, network, dtype, b, batches)
            proc = ctx.Process(target=_worker, args=args, daemon=True)
            proc.start()
            self.procs[b] = (proc, parent)

    def time(self, what, name, batch, reps, block=10, density=None, only=None) -> dict:
        samples = {}
        for _ in range(-(-reps // block)):
            for b, (_, conn) in self.procs.items():
                if only is not None and b not in only:
                    continue
                time.sleep(self.pause)
                conn.send((what, name, batch, block, density))
                got = conn.recv()
                if got is not None:
                    samples.setdefault(b, []).extend(got)
        return {b: statistics.median(t) for b, t in samples.items()}

    def close(self):
        for proc, conn in self.procs.values():
            conn.send(None)
            proc.join(timeout=10)


def _is_count(value, high: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 1 <= value <= high


def check_counts(network: net.SparseNetwork, batches, reps: int, dtype=np.float32) -> tuple[int, ...]:
    """The batch sizes as a tuple, after checking them and `reps` against the bounds and the memory they need.

    Raises `InputError` for a count outside [1, MAX_BATCH] (batch sizes; at most
    MAX_BATCH_SIZES of them) or [1, MAX_REPS] (reps), and `sclref.errors.LimitError` when
    a batch of that size needs an array larger than sclref allocates on some backend.
    """
    batches = tuple(batches)
    if not 1 <= len(batches) <= MAX_BATCH_SIZES:
        raise InputError(f"give 1 to {MAX_BATCH_SIZES} batch sizes, got {len(batches)}")
    for b in batches:
        if not _is_count(b, MAX_BATCH):
            raise InputError(f"a batch size must be an integer in [1, {MAX_BATCH:,}], got {b!r}")
    if not _is_count(reps, MAX_REPS):
        raise InputError(f"reps must be an integer in [1, {MAX_REPS:,}], got {reps!r}")
    shape = network.input_shape or (network.weighted()[0].weight.shape[1],)
    for backend in ("dense", "scipy", "sclref"):
        run = Runtime(network, dtype, backend)
        for b in batches:
            run.check_batch((b, *shape))
    return batches


def bench(network: net.SparseNetwork, batches=(1, 64, 256), reps: int = 50, dtype=np.float32,
          break_even: bool = True, pause: float = 0.05, masked: net.SparseNetwork | None = None) -> dict:
    """Per-layer and whole-network latencies (seconds) of every backend; see the module doc.

    Each backend runs in its own process (spawned), the processes taking turns in blocks
    of 10 calls with a `pause` between turns. `masked`, when given, is the same network
    before dead-unit removal: its dense form joins the whole-network turns as "masked".
    The whole-network floor at batch 1 is the sum of the layers' floors. The counts are
    checked first (`check_counts`).
    """
    dtype = np.dtype(dtype)
    batches = check_counts(network, batches, reps, dtype)
    torch = _torch()
    bw = bandwidth()
    backends = ("dense", "scipy", "sclref") + (("torch",) if torch is not None else ())
    size = dtype.itemsize
    layers, whole = [], {}
    workers = _Workers(network, dtype, backends + ("auto",), batches, pause, masked)
    try:
        for layer in network.weighted():
            w = layer.weight
            csr_bytes = size * w.nnz + w.indices.itemsize * w.nnz + w.indptr.nbytes
            in_elems = int(np.prod(_layer_inputs(network, dtype, 1)[layer.name].shape))
            row = {"layer": layer.name, "kind": layer.kind, "shape": list(w.shape), "nnz": int(w.nnz),
                   "density": w.nnz / max(1, w.shape[0] * w.shape[1]),
                   "bytes_dense": int(np.prod(w.shape)) * size, "bytes_csr": int(csr_bytes),
                   "floor_batch1_s": (csr_bytes + in_elems * size) / bw, "batches": {}, "break_even_density": {}}
            for b in batches:
                times = workers.time("layer", layer.name, b, reps, only=backends)
                row["batches"][str(b)] = times
                if break_even:
                    def sparse_secs(density, name=layer.name, batch=b):  # the kernel on random weights
                        return workers.time("density", name, batch, max(10, reps // 5), density=density,
                                            only=("sclref",))["sclref"]

                    row["break_even_density"][str(b)] = break_even_density(times["dense"], sparse_secs)
            layers.append(row)
        for b in batches:
            whole[str(b)] = workers.time("net", None, b, reps)
    finally:
        workers.close()
    return {"bandwidth_bytes_per_s": bw, "dtype": dtype.name, "torch": None if torch is None else torch.__version__,
            "layers": layers, "network": whole, "floor_batch1_s": sum(row["floor_batch1_s"] for row in layers)}


def break_even_density(dense_secs: float, time_at, grid=BREAK_EVEN_GRID) -> float | None:
    """The density at which `time_at(density)` (seconds of the sparse kernel) reaches `dense_secs`.

    Densities of `grid` are timed in increasing order until one is at least as slow as
    dense; the answer is interpolated linearly between it and the previous one (the
    first grid density when even that is slower, None when sparse stays faster).
    """
    prev = None
    for density in grid:
        secs = time_at(density)
        if secs >= dense_secs:
            if prev is None:
                return density
            d0, t0 = prev
            return d0 + (density - d0) * (dense_secs - t0) / max(secs - t0, 1e-12)
        prev = (density, secs)
    return None


def format_report(result: dict) -> str:
    """A Markdown table of a `bench` result: microseconds per call, and ratios."""
    lines = [f"copy bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, {result['dtype']}", "",
             "| layer | shape | density | batch | dense µs | scipy µs | sclref µs | torch µs | dense/sclref "
             "| scipy/sclref | break-even density |", "|" + "---|" * 11]
    for row in result["layers"]:
        for b, t in row["batches"].items():
            be = row["break_even_density"].get(b)
            torch = f"{1e6 * t['torch']:.1f}" if "torch" in t else "n/a"
            lines.append(f"| {row['layer']} | {row['shape'][0]}x{row['shape'][1]} | {100 * row['density']:.2f}% | {b} "
                         f"| {1e6 * t['dense']:.1f} | {1e6 * t['scipy']:.1f} | {1e6 * t['sclref']:.1f} | {torch} "
                         f"| {t['dense'] / t['sclref']:.1f}x | {t['scipy'] / t['sclref']:.1f}x "
                         f"| {'-' if be is None else f'{100 * be:.1f}%'} |")
    lines += ["", "| layer | bytes dense | bytes CSR | floor batch 1 µs | sclref batch 1 µs | sclref/floor |",
              "|" + "---|" * 6]
    for row in result["layers"]:
        b1 = row["batches"].get("1")
        s = "n/a" if b1 is None else f"{1e6 * b1['sclref']:.1f} | {b1['sclref'] / row['floor_batch1_s']:.1f}x"
        lines.append(f"| {row['layer']} | {row['bytes_dense']:,} | {row['bytes_csr']:,} "
                     f"| {1e6 * row['floor_batch1_s']:.2f} | {s} |")
    masked = all("masked" in t for t in result["network"].values())
    lines += ["", "| network batch | dense µs |" + (" dense masked µs |" if masked else "")
              + " scipy µs | sclref µs | auto µs | dense/sclref |" + (" masked/sclref |" if masked else "")
              + " scipy/sclref | floor µs | sclref/floor |", "|" + "---|" * (9 + 2 * masked)]
    floor = result.get("floor_batch1_s")
    for b, t in result["network"].items():
        m = (f" {1e6 * t['masked']:.1f} |", f" {t['masked'] / t['sclref']:.1f}x |") if masked else ("", "")
        f = (f"{1e6 * floor:.2f} | {t['sclref'] / floor:.1f}x" if b == "1" and floor else "- | -")
        lines.append(f"| {b} | {1e6 * t['dense']:.1f} |{m[0]} {1e6 * t['scipy']:.1f} | {1e6 * t['sclref']:.1f} "
                     f"| {1e6 * t['auto']:.1f} | {t['dense'] / t['sclref']:.1f}x |{m[1]} "
                     f"{t['scipy'] / t['sclref']:.1f}x | {f} |")
    return "\n".join(lines)
