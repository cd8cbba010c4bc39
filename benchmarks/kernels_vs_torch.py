"""Time sclref's conv, pooling and ReLU kernels against torch.nn.functional at LeNet-5 shapes.

Both libraries get the same thread count; each sclref call allocates its outputs as
``sclref.ops`` does. The two sides alternate in short blocks, so background load hits
both alike. Calls are not interleaved one by one: each library's idle worker threads
spin for a while after a call (OpenBLAS's behind sclref's GEMMs, OpenMP's behind
torch) and would slow the other side down, so every block starts after a pause and
untimed warm-up calls. The pause is a busy wait: sleeping lets this VM's cores slow
down, and the first calls after a sleep run up to 5x slower. The table reports
medians in milliseconds and the ratio sclref / torch (below 1: sclref is faster);
the ratio of the fastest calls is shown too, as it is less sensitive to other
processes competing for the cores.

    python benchmarks/kernels_vs_torch.py [--reps 30] [--threads 2] [--dtype float32]
"""

import argparse
import statistics
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from sclref import kernels as K

BATCH = 128
# name, input (N, C, H, W), filters (F, C, KH, KW), stride, padding
CONVS = [
    ("conv1", (BATCH, 1, 28, 28), (20, 1, 5, 5), 1, 0),
    ("conv2", (BATCH, 20, 12, 12), (50, 20, 5, 5), 1, 0),
    ("conv 3x3 s2 p1", (BATCH, 20, 24, 24), (32, 20, 3, 3), 2, 1),
]
# name, input, window = stride
POOLS = [("pool1", (BATCH, 20, 24, 24), 2), ("pool2", (BATCH, 50, 8, 8), 2)]


def out_side(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def conv_pairs(shape_x, shape_w, s, p, dtype, rng):
    """(kernel, sclref callable, torch callable) for forward and both gradients of one conv."""
    x = rng.standard_normal(shape_x).astype(dtype)
    w = rng.standard_normal(shape_w).astype(dtype)
    n, f = shape_x[0], shape_w[0]
    oshape = (n, f, out_side(shape_x[2], shape_w[2], s, p), out_side(shape_x[3], shape_w[3], s, p))
    gy = rng.standard_normal(oshape).astype(dtype)
    tx, tw, tgy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(gy)

    def ours_fwd():
        K.conv2d_fwd(x, w, s, s, p, p, np.empty(oshape, dtype))

    def ours_bwd_input():
        K.conv2d_bwd_input(gy, w, s, s, p, p, np.empty_like(x))

    def ours_bwd_weight():
        K.conv2d_bwd_weight(x, gy, s, s, p, p, np.empty_like(w))

    def theirs_bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(tgy, tx, tw, None, [s, s], [p, p], [1, 1], False,
                                                           [0, 0], 1, mask)

    def ours_bwd_both():
        ours_bwd_input()
        ours_bwd_weight()

    return [
        ("fwd", ours_fwd, lambda: F.conv2d(tx, tw, stride=s, padding=p)),
        ("bwd input", ours_bwd_input, theirs_bwd([True, False, False])),
        ("bwd weight", ours_bwd_weight, theirs_bwd([False, True, False])),
        ("bwd input+weight", ours_bwd_both, theirs_bwd([True, True, False])),
    ]


def pool_relu_pairs(shape, k, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    n, c, h, w = shape
    oshape = (n, c, out_side(h, k, k, 0), out_side(w, k, k, 0))
    gy = rng.standard_normal(oshape).astype(dtype)
    argmax = np.empty(oshape, np.int64)
    K.maxpool2d_fwd(x, k, k, k, k, np.empty(oshape, dtype), argmax)
    gx = rng.standard_normal(shape).astype(dtype)
    tx, tgy, tgx = torch.from_numpy(x), torch.from_numpy(gy), torch.from_numpy(gx)
    _, tidx = F.max_pool2d(tx, k, k, return_indices=True)

    def ours_pool_fwd():
        K.maxpool2d_fwd(x, k, k, k, k, np.empty(oshape, dtype), np.empty(oshape, np.int64))

    def ours_pool_bwd():
        K.maxpool2d_bwd(gy, argmax, np.empty(shape, dtype))

    def ours_relu_fwd():
        K.relu_fwd(x, np.empty_like(x))

    def ours_relu_bwd():
        K.relu_bwd(x, gx, np.empty_like(x))

    return [
        ("maxpool fwd", ours_pool_fwd, lambda: F.max_pool2d(tx, k, k, return_indices=True)),
        ("maxpool bwd", ours_pool_bwd,
         lambda: torch.ops.aten.max_pool2d_with_indices_backward(tgy, tx, [k, k], [k, k], [0, 0], [1, 1], False,
                                                                 tidx)),
        ("relu fwd (pool input)", ours_relu_fwd, lambda: torch.relu(tx)),
        ("relu bwd (pool input)", ours_relu_bwd, lambda: torch.ops.aten.threshold_backward(tgx, tx, 0.0)),
    ]


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def busy_wait(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def compare(ours, theirs, reps, block=10, pause=0.2, warmup=3):
    """Median seconds of each over `reps` calls, in alternating blocks of `block` calls."""
    times = ([], [])
    while len(times[1]) < reps:
        for fn, out in zip((ours, theirs), times):
            busy_wait(pause)  # the other library's idle threads stop spinning meanwhile
            for _ in range(warmup):
                fn()
            out.extend(timed(fn) for _ in range(min(block, reps - len(out))))
    return statistics.median(times[0]), statistics.median(times[1]), min(times[0]) / min(times[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per side (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="threads for numba and torch (default 2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)

    rows = []
    with torch.no_grad():
        for name, shape_x, shape_w, s, p in CONVS:
            layer = f"{name}: x{shape_x} w{shape_w} s{s} p{p}"
            for kernel, ours, theirs in conv_pairs(shape_x, shape_w, s, p, dtype, rng):
                rows.append((layer, kernel, *compare(ours, theirs, args.reps)))
        for name, shape, k in POOLS:
            layer = f"{name}: x{shape} {k}x{k} s{k}"
            for kernel, ours, theirs in pool_relu_pairs(shape, k, dtype, rng):
                rows.append((layer, kernel, *compare(ours, theirs, args.reps)))

    print(f"{args.dtype}, batch {BATCH}, {args.threads} threads (torch {torch.__version__}, numba "
          f"{numba.__version__}, sclref kernels {'parallel' if K.PARALLEL else 'serial'}), "
          f"median of {args.reps} runs in alternating blocks\n")
    print("| layer | kernel | sclref ms | torch ms | sclref / torch | ratio of fastest calls |")
    print("|---|---|---:|---:|---:|---:|")
    for layer, kernel, ours, theirs, fastest in rows:
        print(f"| {layer} | {kernel} | {ours * 1e3:.3f} | {theirs * 1e3:.3f} | {ours / theirs:.2f} | {fastest:.2f} |")
    print("\n| layer | what a training step runs | sclref ms | torch ms | sclref / torch |")
    print("|---|---|---:|---:|---:|")
    for layer, parts in summaries(rows):
        median = {kernel: (ours, theirs) for lay, kernel, ours, theirs, _ in rows if lay == layer}
        o, t = (sum(median[kernel][side] for kernel in parts) for side in (0, 1))
        print(f"| {layer} | {' + '.join(parts)} | {o * 1e3:.3f} | {t * 1e3:.3f} | {o / t:.2f} |")


def summaries(rows):
    """(layer, kernels summed) pairs: a conv's forward and backward, a pooling block's four kernels."""
    layers = dict.fromkeys(layer for layer, *_ in rows)
    for layer in layers:
        if layer.startswith("conv"):
            yield layer, ["fwd", "bwd input+weight"]
            if layer.startswith("conv1"):
                yield layer, ["fwd", "bwd weight"]  # the first layer needs no input gradient
        else:
            yield layer, ["maxpool fwd", "maxpool bwd", "relu fwd (pool input)", "relu bwd (pool input)"]

if __name__ == "__main__":
    main()
