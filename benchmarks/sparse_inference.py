"""Sparse inference benchmark: sclref against the peers a user would pick, quiet and under load, float32.

Four parts, each timed on the machine as it is ("quiet") and beside two busy processes
that the script starts and kills itself ("load", `common.competing_load`), reporting
median and 90th percentile:

1. **threads**: the sparse kernels serial and split into tasks over numba's threads
   (`sclref.kernels.run_tasks`) on the same work, over a range of work sizes
   (multiply-adds per call), in one process, alternating: the measurement behind
   `sclref.kernels.sparse.SPLIT_MIN_WORK`.
2. **break-even**: every LeNet-300-100 and LeNet-5 layer with random weights, the sclref
   kernels against dense BLAS over densities, at batch 1, 64 and 256: the measurement
   behind `sclref.sparse.runtime.DENSE_FROM` and `CONV_DENSE_FROM`.
3. **auto**: `--backend auto` against all-sclref and all-dense, whole networks, on
   LeNet-300-100 and LeNet-5 pruned by magnitude (random weights, global and per-layer
   scope) to 88-99 % sparsity, at batch 1, 64 and 256.
4. **peers**: a >= 98 %-sparse LeNet-300-100 and LeNet-5 trained on Fashion-MNIST (or
   the run directories given), and a ResNet-20 run directory when one is given (batch
   1 and 64 only), each peer in its own process taking turns: sclref auto,
   sclref with serial kernels on every layer, dense NumPy and PyTorch dense on the
   masked network (the original shapes), scipy.sparse CSR, torch.sparse CSR and ONNX
   Runtime on the export (`sclref export --format onnx`). The floors: at batch 1 the
   bytes every layer must read (CSR values, indices, row pointers, input) over the copy
   bandwidth, measured by a copy of 256 MiB that takes its turn with the batch-1 peers in
   each phase (this machine's bandwidth drifts by 1.5-2x over minutes, with the speed of
   everything else, so a probe taken once at the start can meet another state than the
   calls it is set against); at every batch the dense FLOPs over the measured GEMM rate.

Prints Markdown tables (times and peer/sclref(auto) ratios: above 1, sclref is faster)
and writes benchmarks/out/sparse_inference.json.

    python benchmarks/sparse_inference.py [--lenet300 RUN_DIR] [--lenet5 RUN_DIR] [--resnet20 RUN_DIR]
        [--reps N] [--parts threads break-even auto peers] [--models lenet300 lenet5 resnet20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

THREADS = common.threads_from_argv()
common.set_threads(THREADS)

import numpy as np  # noqa: E402

FASHION = "fashion-mnist"
BATCHES = (1, 64, 256)
# A ResNet-20 call at batch 256 takes seconds dense: its peers are timed at 1 and 64 only.
MODEL_BATCHES = {"resnet20": (1, 64)}
PEERS = ("sclref auto", "sclref serial", "dense NumPy", "scipy CSR", "torch dense", "torch CSR", "onnxruntime")
PHASES = {"quiet": contextlib.nullcontext, "load": common.competing_load}
COPY_PROBE, COPY_MIB = "copy probe", 256  # `sclref.sparse.bench.copy_probe`, as `bandwidth` times it


def _train(model, out: Path, target: float, epochs: int, limit: int | None) -> Path:
    from sclref.train import TrainConfig, train

    if (out / "model.npz").exists():
        return out
    cfg = TrainConfig(model=model, data=FASHION, target_sparsity=target, epochs=epochs, finetune_epochs=1,
                      train_limit=limit, test_limit=2000)
    train(cfg, out, log=lambda line: print(line, file=sys.stderr))
    return out


def _inputs(network, batch: int, seed: int = 0) -> np.ndarray:
    shape = network.input_shape or (network.weighted()[0].weight.shape[1],)
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


# -- peers: each builder runs in its own process and returns the call to time -------------------


def _torch_forward(network, sparse: bool):
    """The network as PyTorch calls: dense weights, or CSR weights (convolutions as unfold + CSR product)."""
    import torch
    import torch.nn.functional as F

    from sclref.sparse import network as net

    def weight(layer):
        w = layer.weight
        if not sparse:
            return torch.from_numpy(w.toarray().astype(np.float32))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(torch.from_numpy(w.indptr.astype(np.int64)),
                                           torch.from_numpy(w.indices.astype(np.int64)),
                                           torch.from_numpy(w.data.astype(np.float32)), size=w.shape)

    def run(steps, h):
        for step in steps:
            h = step(h)
        return h

    def build(layers):
        return [step_of(layer) for layer in layers]

    def step_of(layer):
        if isinstance(layer, net.Residual):
            body, shortcut = build(layer.body), build(layer.shortcut)
            return lambda h: run(body, h) + run(shortcut, h)
        if isinstance(layer, net.GlobalAvgPool2d):
            return lambda h: h.mean(dim=(2, 3))
        if isinstance(layer, net.SubsamplePad):
            (sh, sw), (before, after) = layer.stride, layer.channels
            return lambda h: F.pad(h[:, :, ::sh, ::sw], (0, 0, 0, 0, before, after))
        if isinstance(layer, net.Linear):
            w, b = weight(layer), torch.from_numpy(layer.bias.astype(np.float32))
            return (lambda h: (w @ h.T).T + b) if sparse else (lambda h: F.linear(h, w, b))
        if isinstance(layer, net.Conv2d):
            w, b = weight(layer), torch.from_numpy(layer.bias.astype(np.float32))
            k, s, p, f = layer.kernel_size, layer.stride, layer.padding, layer.out_channels
            if sparse:
                def conv(h):
                    n, _, hh, ww = h.shape
                    oh, ow = (hh + 2 * p[0] - k[0]) // s[0] + 1, (ww + 2 * p[1] - k[1]) // s[1] + 1
                    cols = F.unfold(h, k, padding=p, stride=s)  # (N, C*KH*KW, OH*OW), the CSR column order
                    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
                    return ((w @ cols).reshape(f, n, oh, ow) + b[:, None, None, None]).transpose(0, 1)
                return conv
            w4 = w.reshape(f, layer.in_channels, *k)
            return lambda h: F.conv2d(h, w4, b, s, p)
        if isinstance(layer, net.MaxPool2d):
            return lambda h: F.max_pool2d(h, layer.kernel_size, layer.stride)
        if isinstance(layer, net.Activation):
            return F.relu if layer.kind == "relu" else (lambda h: F.leaky_relu(h, layer.alpha))
        if isinstance(layer, net.Flatten):
            return lambda h: h.reshape(h.shape[0], -1)
        raise ValueError(f"the torch peer does not run {layer.kind} layers")

    steps = build(network.layers)

    def forward(x):
        with torch.inference_mode():
            return run(steps, x).contiguous().numpy()

    return torch, forward


def build_peer(peer: str, network, masked, batch: int, onnx_model: bytes | None):
    """The zero-argument call that runs `peer` on a batch of `batch` (standardized) inputs."""
    from sclref.sparse.runtime import Runtime

    x = _inputs(network, batch)
    if peer in ("sclref auto", "sclref serial", "dense NumPy", "scipy CSR"):
        if peer == "sclref serial":
            import numba

            numba.set_num_threads(1)  # the kernels' thread rule then never splits a call
        if peer == "dense NumPy":
            from sclref import threads

            # NumPy as a user calls it, BLAS on its own (--threads) threads: the runtime's
            # dense backend runs on one, inside sclref.threads.pinned, which this process does without.
            threads.pinned = contextlib.nullcontext
        run = Runtime(masked if peer == "dense NumPy" else network, np.float32,
                      {"sclref auto": "auto", "sclref serial": "sclref", "dense NumPy": "dense",
                       "scipy CSR": "scipy"}[peer])
        return lambda: run(x)
    if peer in ("torch dense", "torch CSR"):
        torch, forward = _torch_forward(masked if peer == "torch dense" else network, peer == "torch CSR")
        torch.set_num_threads(THREADS)
        xt = torch.from_numpy(x)
        return lambda: forward(xt)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    pre = network.preprocessing
    raw = x if pre is None else ((x * pre["std"] + pre["mean"]) * pre["pixel_max"]).astype(np.float32)
    return lambda: session.run(None, {"input": raw})[0]


def copy_probe():
    """The copy `sclref.sparse.bench.bandwidth` times, here in turns with the peers: the bandwidth of the moment."""
    from sclref.sparse import bench

    return bench.copy_probe(COPY_MIB)[0]


def _peers_available() -> tuple:
    peers = list(PEERS)
    for module, names in (("torch", ("torch dense", "torch CSR")), ("onnxruntime", ("onnxruntime",)),
                          ("onnx", ("onnxruntime",))):
        try:
            __import__(module)
        except ImportError:
            peers = [p for p in peers if p not in names]
    return tuple(peers)


def floors(network, masked, bandwidth: float, gflops: float, batches=BATCHES) -> dict:
    """Seconds below which no implementation can go: bytes at batch 1 (at the `bandwidth` probed at the start; the
    tables and goals use the probe taken in turns with the batch-1 calls), dense FLOPs per batch."""
    read, macs = 0, 0
    for layer, (before, _) in _weight_shapes(network.layers, network.shapes()[0]).values():
        w = layer.weight
        read += 4 * w.nnz + w.indices.itemsize * w.nnz + w.indptr.nbytes + 4 * int(np.prod(before))
    for layer, (_, after) in _weight_shapes(masked.layers, masked.shapes()[0]).values():
        f, k = layer.weight.shape
        macs += f * k * (int(np.prod(after[1:])) if len(after) == 3 else 1)
    return {"bytes_batch1": read, "dense_macs_per_sample": macs,
            "batch1_bytes_s": read / bandwidth,
            "dense_flops_s": {str(b): 2 * macs * b / (gflops * 1e9) for b in batches}}


def _weight_shapes(layers: list, shape: tuple, found: dict | None = None) -> dict:
    """{name: (weight layer, (its per-sample input shape, its output shape))}, inside residual blocks too."""
    from sclref.sparse import network as net

    found = {} if found is None else found
    for layer in layers:
        if isinstance(layer, net.Residual):
            _weight_shapes(layer.body, shape, found)
            _weight_shapes(layer.shortcut, shape, found)
        after = net.output_shape(layer, shape)
        if isinstance(layer, net.WeightLayer):
            found[layer.name] = (layer, (shape, after))
        shape = after
    return found


def time_peers(name: str, network, masked, reps: int, batches=BATCHES) -> dict:
    """Per batch and phase, the median and p90 seconds of every peer; outputs checked against sclref auto."""
    from sclref.sparse.onnx_export import to_onnx_bytes

    peers = _peers_available()
    model = to_onnx_bytes(network) if "onnxruntime" in peers else None
    result = {}
    for batch in batches:
        builders = {p: (build_peer, (p, network, masked, batch, model)) for p in peers}
        if batch == 1:
            builders[COPY_PROBE] = (copy_probe, ())
        samples, first = common.samples_in_workers(builders, reps, block=10, pause=0.2, phases=PHASES, warm=0.01)
        copies = {phase: by.pop(COPY_PROBE, None) for phase, by in samples.items()}
        first.pop(COPY_PROBE, None)
        want = first["sclref auto"]
        scale = float(np.abs(want).max()) or 1.0
        mismatch = {p: float(np.abs(out - want).max() / scale) for p, out in first.items()}
        result[str(batch)] = {phase: {p: common.quantiles(s) for p, s in by.items()} for phase, by in samples.items()}
        result[str(batch)]["mismatch"] = mismatch
        if batch == 1:
            result[str(batch)]["bandwidth_bytes_per_s"] = {
                phase: 2 * (COPY_MIB << 20) / float(np.median(times)) for phase, times in copies.items()}
        print(f"  {name} batch {batch}: timed {', '.join(peers)}; largest output difference "
              f"{max(mismatch.values()):.1e} of the output scale", file=sys.stderr)
    return result


# -- threads: serial against split kernels over work sizes ---------------------------------------


def _alternate(fns: dict, reps: int, block: int = 5, pause: float = 0.05, warm: float = 0.01) -> dict:
    """Every timed call of each function, in blocks taking turns, after one warm-up block each.

    The `pause` before each block lets the thread pool of the previous one (BLAS's spins
    after a product) go to sleep, so no function is timed against another's threads; then
    `warm` seconds of untimed calls, as `common.samples_in_workers` does (this machine runs
    slowly for milliseconds after a pause, and a split call's pool thread is asleep).
    """
    from sclref.sparse.bench import call_times

    samples = {name: [] for name in fns}
    for turn in range(1 + -(-reps // block)):
        for name, fn in fns.items():
            time.sleep(pause)
            common.warm_up(fn, warm)
            times = call_times(fn, block)
            if turn:
                samples[name] += times
    return samples


def _random_csr(rng, shape, density, dtype=np.float32):
    import scipy.sparse as sp

    w = sp.random_array(shape, density=density, format="csr", dtype=dtype, rng=rng)
    w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=shape)
    w.sort_indices()
    return w


def time_threads(reps: int) -> list:
    """Serial and split (`run_tasks` on numba's threads) kernels on the same inputs: LeNet-300-100-shaped chains
    (split into batch tiles here, to show what a split would gain) and CHWN convolutions of LeNet-5's and
    ResNet-20's shapes (split by the kernel itself from `SPLIT_MIN_WORK`)."""
    import numba

    from sclref import kernels

    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    cases = []
    for density, batch in ((0.02, 256), (0.02, 1024), (0.1, 256), (0.1, 1024)):
        ws = [_random_csr(rng, s, density) for s in ((300, 784), (100, 300), (10, 100))]
        packed = kernels.pack_chain(ws, [np.zeros(w.shape[0], np.float32) for w in ws], ["relu", "relu", None],
                                    [None] * 3, np.float32)
        x = rng.standard_normal((batch, 784)).astype(np.float32)
        out = np.empty((batch, 10), np.float32)
        parts = 2 * threads
        rows = batch // parts
        scratch = kernels.chain_scratch(packed[0], batch, np.float32)
        scratches = [kernels.chain_scratch(packed[0], rows, np.float32) for _ in range(threads)]

        def split(a=(*packed,), x=x, out=out, rows=rows, parts=parts, scratches=scratches):
            kernels.run_tasks(parts, lambda i, slot: kernels.csr_chain(
                *a, x[i * rows:(i + 1) * rows], out[i * rows:(i + 1) * rows], scratches[slot]), threads)

        fns = {1: (lambda a=(*packed, x, out, scratch): kernels.csr_chain(*a)), threads: split}
        cases.append(("chain 784-300-100-10", density, batch, batch * sum(w.nnz for w in ws), fns))
    for (c, f, side, k, pad, density), batch in (((1, 20, 28, 5, 0, 0.5), 64), ((20, 50, 12, 5, 0, 0.05), 64),
                                                 ((1, 20, 28, 5, 0, 0.5), 256), ((20, 50, 12, 5, 0, 0.05), 256),
                                                 ((16, 16, 28, 3, 1, 0.1), 64), ((64, 64, 7, 3, 1, 0.08), 64)):
        w = _random_csr(rng, (f, c * k * k), density)
        b = np.zeros(f, np.float32)
        x = rng.standard_normal((c, side, side, batch)).astype(np.float32)
        o = side + 2 * pad - k + 1
        out = np.empty((f, o, o, batch), np.float32)
        a = (k, k, 1, 1, pad, pad, w.indptr, w.indices, w.data, b, 1, np.float32(0), x, out)
        fns = {t: (lambda t=t, a=a: kernels.csr_conv2d_chwn(*a, threads=t)) for t in (1, threads)}
        cases.append((f"CHWN conv {c}->{f} {k}x{k} on {side}x{side}", density, batch,
                      batch * o * o * max(w.nnz, f), fns))
    rows = []
    for kind, density, batch, work, fns in cases:
        row = {"kernel": kind, "density": density, "batch": batch, "work": work}
        for phase, during in PHASES.items():
            with during():
                samples = _alternate({"serial" if t == 1 else "split": fn for t, fn in fns.items()}, reps)
            row[phase] = {name: common.quantiles(s) for name, s in samples.items()}
        rows.append(row)
        print(f"  threads: {kind}, density {density}, batch {batch} done", file=sys.stderr)
    return rows


# -- auto: the backend choice against all-sclref and all-dense ----------------------------------


LAYERS = {  # name: (kind, weight shape, per-sample input shape, conv geometry)
    "lenet300.fc1": ("linear", (300, 784), (784,), None), "lenet300.fc2": ("linear", (100, 300), (300,), None),
    "lenet300.fc3": ("linear", (10, 100), (100,), None), "lenet5.conv1": ("conv", (20, 25), (1, 28, 28), 1),
    "lenet5.conv2": ("conv", (50, 500), (20, 12, 12), 20), "lenet5.fc1": ("linear", (500, 800), (800,), None),
    "lenet5.fc2": ("linear", (10, 500), (500,), None)}
DENSITIES = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _layer_run(name: str, density: float):
    """A one-layer Runtime holding layer `name` of LAYERS with random weights of `density`."""
    from sclref.sparse import network as net
    from sclref.sparse.runtime import Runtime

    kind, shape, sample, channels = LAYERS[name]
    w = _random_csr(np.random.default_rng(1), shape, density)
    bias = np.zeros(shape[0], np.float32)
    layer = (net.Linear("w", w, bias) if kind == "linear" else
             net.Conv2d("w", w, bias, in_channels=channels, kernel_size=(5, 5)))
    return Runtime(net.SparseNetwork([layer], np.dtype(np.float32), input_shape=sample), np.float32), layer


def _crossing(points: list, dense: float) -> float | None:
    """The density, interpolated, where the sparse time of (density, seconds) points reaches `dense`."""
    prev = None
    for density, secs in points:
        if secs >= dense:
            if prev is None:
                return density
            return prev[0] + (density - prev[0]) * (dense - prev[1]) / max(secs - prev[1], 1e-12)
        prev = (density, secs)
    return None


def time_break_even(reps: int) -> list:
    """Per LeNet layer and batch: the densities from which dense beats the sparse kernels (default thread rule),
    at the median and the p90, quiet and under load."""
    rows = []
    for name in LAYERS:
        for batch in BATCHES:
            row = {"layer": name, "batch": batch}
            for phase, during in PHASES.items():
                with during():
                    points = {"median": [], "p90": []}
                    dense = None
                    for density in DENSITIES:
                        run, layer = _layer_run(name, density)
                        x = _inputs(run.network, batch)
                        fns = {b: (lambda b=b, r=run, lx=(layer, x): r.step(*lx, b)) for b in ("sclref", "dense")}
                        if dense is not None:
                            del fns["dense"]
                        got = {b: common.quantiles(t) for b, t in _alternate(fns, reps).items()}
                        dense = dense or got["dense"]
                        for stat in points:
                            points[stat].append((density, got["sclref"][stat]))
                        if got["sclref"]["median"] >= dense["median"] and got["sclref"]["p90"] >= dense["p90"]:
                            break
                row[phase] = {"dense": dense, "points": points,
                              "break_even": {stat: _crossing(p, dense[stat]) for stat, p in points.items()}}
            rows.append(row)
        print(f"  break-even: {name} done", file=sys.stderr)
    return rows


def break_even_table(rows: list) -> str:
    def fmt(v):
        return "never" if v is None else f"{100 * v:.0f}%"

    table = [[r["layer"], r["batch"]] + [f"{fmt(r[p]['break_even']['median'])} / {fmt(r[p]['break_even']['p90'])}"
                                         for p in PHASES] for r in rows]
    return common.markdown_table(["layer", "batch"] + [f"{p}: dense from (median / p90)" for p in PHASES], table)


def pruned_random(model: str, sparsity: float, scope: str = "global"):
    """A LeNet with random weights pruned by magnitude to `sparsity` (over all layers, or each layer), exported."""
    from sclref import models
    from sclref.pruning import magnitude_prune
    from sclref.sparse.export import export

    shape = (1, 28, 28)
    m = models.MODELS[model](in_shape=shape, masked=True, dtype=np.float32, generator=np.random.default_rng(0))
    magnitude_prune(m, sparsity, scope=scope)
    return export(m, shape)


def time_auto(reps: int, cases=tuple((s, "global") for s in (0.88, 0.92, 0.95, 0.98, 0.99))
              + ((0.88, "layer"), (0.95, "layer"))) -> list:
    """Whole-network median and p90 of auto, all-sclref and all-dense on magnitude-pruned LeNets."""
    from sclref.sparse.runtime import Runtime

    rows = []
    for model in ("lenet300", "lenet5"):
        for sparsity, scope in cases:
            network = pruned_random(model, sparsity, scope)
            density = {layer.name: round(layer.weight.nnz / max(1, np.prod(layer.weight.shape)), 4)
                       for layer in network.weighted()}
            for batch in BATCHES:
                x = _inputs(network, batch)
                runs = {b: Runtime(network, np.float32, b) for b in ("auto", "sclref", "dense")}
                row = {"model": model, "sparsity": sparsity, "scope": scope, "density": density, "batch": batch,
                       "plan": runs["auto"].plan(batch)}
                for phase, during in PHASES.items():
                    with during():
                        samples = _alternate({b: (lambda r=r, x=x: r(x)) for b, r in runs.items()}, reps)
                    row[phase] = {b: common.quantiles(s) for b, s in samples.items()}
                rows.append(row)
            print(f"  auto: {model} at {sparsity:.0%} ({scope}) done", file=sys.stderr)
    return rows


# -- report -------------------------------------------------------------------------------------


def _us(q: dict) -> str:
    return " / ".join(f"{v:.1f}" if v < 10 else f"{v:.0f}" for v in (1e6 * q["median"], 1e6 * q["p90"]))


def threads_table(rows: list) -> str:
    table = []
    for r in rows:
        cells = [r["kernel"], f"{100 * r['density']:g}%", r["batch"], f"{r['work'] / 1e6:.2f}"]
        for phase in PHASES:
            s, p = r[phase]["serial"], r[phase]["split"]
            cells += [_us(s), _us(p), f"{s['median'] / p['median']:.2f} / {s['p90'] / p['p90']:.2f}"]
        table.append(cells)
    return common.markdown_table(["kernel", "density", "batch", "M mult-adds", "quiet serial µs (med/p90)",
                                  "quiet split µs", "quiet serial/split", "load serial µs", "load split µs",
                                  "load serial/split"], table)


def auto_table(rows: list) -> str:
    table = []
    for r in rows:
        cells = [r["model"], f"{100 * r['sparsity']:g}% {r['scope']}", r["batch"],
                 " ".join(f"{k}:{v[0]}" for k, v in r["plan"].items())]
        for phase in PHASES:
            t = r[phase]
            cells += [_us(t["auto"]), _us(t["sclref"]), _us(t["dense"]),
                      f"{min(t['sclref']['median'], t['dense']['median']) / t['auto']['median']:.2f} / "
                      f"{min(t['sclref']['p90'], t['dense']['p90']) / t['auto']['p90']:.2f}"]
        table.append(cells)
    return common.markdown_table(["model", "sparsity", "batch", "auto plan", "quiet auto µs (med/p90)",
                                  "quiet sclref µs", "quiet dense µs", "quiet best/auto", "load auto µs",
                                  "load sclref µs", "load dense µs", "load best/auto"], table)


def peers_table(result: dict, floor: dict) -> str:
    batches = [int(b) for b in result]
    peers = [p for p in PEERS if p in result[str(batches[0])]["quiet"]]
    table = []
    for phase in PHASES:
        for b in batches:
            t = result[str(b)][phase]
            auto = t["sclref auto"]
            cells = [phase, b] + [_us(t[p]) for p in peers]
            cells += [f"{t[p]['median'] / auto['median']:.1f}x / {t[p]['p90'] / auto['p90']:.1f}x" for p in peers[1:]]
            f = floor["bytes_batch1"] / result["1"]["bandwidth_bytes_per_s"][phase] if b == 1 else None
            cells += [f"{1e6 * f:.2f}" if f else "-", f"{1e6 * floor['dense_flops_s'][str(b)]:.0f}"]
            table.append(cells)
    return common.markdown_table(["phase", "batch"] + [f"{p} µs (med/p90)" for p in peers]
                                 + [f"{p}/auto" for p in peers[1:]] + ["bytes floor µs", "dense FLOP floor µs"],
                                 table)


def goals(report: dict) -> dict:
    """The issue's goals as measured (quiet, medians) for the networks timed: the ratio and whether it is met."""
    peers = report["peers"]

    def ratio(model, batch, peer):
        t = peers[model]["times"][str(batch)]["quiet"]
        return t[peer]["median"] / t["sclref auto"]["median"]

    found = {}
    if "lenet5" in peers:
        found["lenet5 b64 dense/auto >= 4"] = (ratio("lenet5", 64, "dense NumPy"), 4, True)
        found["lenet5 b1 dense/auto >= 2"] = (ratio("lenet5", 1, "dense NumPy"), 2, True)
    if "lenet300" in peers:
        one = peers["lenet300"]["times"]["1"]
        floor = peers["lenet300"]["floor"]["bytes_batch1"] / one["bandwidth_bytes_per_s"]["quiet"]
        found["lenet300 b256 dense/auto >= 10"] = (ratio("lenet300", 256, "dense NumPy"), 10, True)
        found["lenet300 b256 scipy/auto >= 3"] = (ratio("lenet300", 256, "scipy CSR"), 3, True)
        found["lenet300 b1 auto/floor <= 3"] = (one["quiet"]["sclref auto"]["median"] / floor, 3, False)
    return {k: {"value": v, "met": bool(v >= goal if high else v <= goal)} for k, (v, goal, high) in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lenet300", default=None, help="a finished LeNet-300-100 run directory")
    parser.add_argument("--lenet5", default=None, help="a finished LeNet-5 run directory")
    parser.add_argument("--resnet20", default=None,
                        help="a finished ResNet-20 run directory (timed only when given; never trained here)")
    parser.add_argument("--runs", default=str(Path(__file__).resolve().parent.parent / "runs"),
                        help="where to train (and find again) the networks when no run directory is given")
    parser.add_argument("--reps", type=int, default=60, help="timed calls per peer, case and phase")
    parser.add_argument("--parts", nargs="+", default=["threads", "break-even", "auto", "peers"],
                        choices=["threads", "break-even", "auto", "peers"])
    parser.add_argument("--models", nargs="+", default=None, choices=["lenet300", "lenet5", "resnet20"],
                        help="the networks the peers part times")
    parser.add_argument("--threads", type=int, default=THREADS, help="BLAS, numba, torch and ORT threads")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "sparse_inference.json"))
    args = parser.parse_args()
    from sclref.sparse import bench

    started = time.time()
    report = {"machine": common.machine(), "threads": THREADS, "reps": args.reps,
              "load_average_start": os.getloadavg()}
    if "threads" in args.parts:
        report["threads_sweep"] = time_threads(args.reps)
        print("\n## serial against split kernels (µs, median / p90)\n")
        print(threads_table(report["threads_sweep"]))
    if "break-even" in args.parts:
        report["break_even"] = time_break_even(max(10, args.reps // 4))
        print("\n## per layer: the density from which dense (BLAS) beats the sclref kernels\n")
        print(break_even_table(report["break_even"]))
    if "auto" in args.parts:
        report["auto"] = time_auto(max(10, args.reps // 3))
        print("\n## auto against all-sclref and all-dense (µs, median / p90; best/auto >= 1: auto never loses)\n")
        print(auto_table(report["auto"]))
    if "peers" in args.parts:
        from sclref.sparse import export_run

        given = {"lenet300": args.lenet300, "lenet5": args.lenet5, "resnet20": args.resnet20}
        models = args.models or ["lenet300", "lenet5"] + (["resnet20"] if args.resnet20 else [])
        if "resnet20" in models and not args.resnet20:
            parser.error("--models resnet20 needs --resnet20 RUN_DIR (a ResNet-20 run takes hours to train)")
        trained = {"lenet300": (98.5, 6, 20000), "lenet5": (98.0, 3, 10000)}
        runs = {m: Path(given[m]) if given[m] else _train(m, Path(args.runs) / f"bench-sparse-{m}", *trained[m])
                for m in models}
        bw, gflops = bench.bandwidth(), common.gemm_gflops()
        report["bandwidth_bytes_per_s"], report["gemm_gflops"] = bw, gflops
        report["peers"] = {}
        print(f"\ncopy bandwidth {bw / 1e9:.1f} GB/s, GEMM {gflops:.0f} GFLOP/s (float32, {THREADS} threads)")
        for name, run in runs.items():
            network, masked = export_run(run), export_run(run, prune_dead=False)
            total = sum(int(np.prod(layer.weight.shape)) for layer in masked.weighted())
            batches = MODEL_BATCHES.get(name, BATCHES)
            floor = floors(network, masked, bw, gflops, batches)
            entry = {"run": str(run), "sparsity": 1 - network.nnz / total, "floor": floor,
                     "density": {layer.name: layer.weight.nnz / np.prod(layer.weight.shape)
                                 for layer in masked.weighted()},
                     "times": time_peers(name, network, masked, args.reps, batches)}
            report["peers"][name] = entry
            plan = {b: "".join(v[0] for v in entry_plan.values()) for b, entry_plan in
                    ((b, _plan(network, b)) for b in batches)}
            print(f"\n## {name}: {100 * entry['sparsity']:.2f} % sparse (run {run}); auto's plan per layer "
                  f"(s = sclref, d = dense) {plan}\n")
            probed = entry["times"]["1"]["bandwidth_bytes_per_s"]
            print(f"copy bandwidth in turns with the batch-1 calls: "
                  f"{', '.join(f'{p} {v / 1e9:.1f} GB/s' for p, v in probed.items())}\n")
            print(peers_table(entry["times"], floor))
        report["goals"] = goals(report)
        print("\n## goals (quiet, medians)\n")
        for k, v in report["goals"].items():
            print(f"- {k}: {v['value']:.2f} ({'met' if v['met'] else 'not met'})")
    report["load_average_end"] = os.getloadavg()
    report["seconds"] = time.time() - started
    common.write_json(Path(args.out), report)
    print(f"\nload average {report['load_average_start']} at start, {report['load_average_end']} at the end; "
          f"{report['seconds']:.0f} s; {args.out}")
    return 0


def _plan(network, batch: int) -> dict:
    from sclref.sparse.runtime import Runtime

    return Runtime(network, np.float32).plan(batch)


if __name__ == "__main__":
    sys.exit(main())
