"""The `sclref export`, `sclref infer` and `sclref bench` subcommands (registered by `add_parsers`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sclref.flags import count
from sclref.sparse.bench import MAX_BATCH, MAX_BATCH_SIZES, MAX_REPS

__all__ = ["add_parsers"]


def _batch_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated batch sizes, each in [1, MAX_BATCH], at most MAX_BATCH_SIZES of them."""
    parts = text.split(",")
    if len(parts) > MAX_BATCH_SIZES:
        raise argparse.ArgumentTypeError(f"at most {MAX_BATCH_SIZES} batch sizes, got {len(parts)}")
    one = count(MAX_BATCH)
    return tuple(dict.fromkeys(one(part.strip()) for part in parts))


def _fail(command: str, err) -> int:
    print(f"sclref {command}: error: {err}", file=sys.stderr)
    return 2


def _export(args) -> int:
    from sclref.sparse import export_run, save

    out = Path(args.out) if args.out else Path(args.run_dir) / f"sparse.{args.format}"
    try:
        network = export_run(args.run_dir, prune_dead=not args.no_prune_dead)
        if args.format == "onnx":
            from sclref.sparse.onnx_export import save_onnx

            save_onnx(network, out)
        else:
            save(network, out)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as err:
        return _fail("export", err)
    summary = {"out": str(out), "format": args.format, "bytes_file": out.stat().st_size, "nnz": network.nnz,
               "bytes_csr": network.csr_bytes(),
               "bytes_dense": network.dense_bytes(), "dtype": np.dtype(network.dtype).name,
               "layers": [{"layer": layer.name, "shape": list(layer.weight.shape), "nnz": int(layer.weight.nnz),
                           "removed_units": len(network.removed_units.get(layer.name, []))}
                          for layer in network.weighted()]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for row in summary["layers"]:
        print(f"{row['layer']:<10} {row['shape'][0]:>5} x {row['shape'][1]:<6} nnz {row['nnz']:>8,}  "
              f"units removed {row['removed_units']}")
    print(f"{network.nnz:,} connections, {summary['bytes_csr']:,} bytes CSR vs {summary['bytes_dense']:,} dense; "
          f"written to {out}")
    return 0


def _test_set(args, network, dtype):
    """The dataset of --data, standardized as the network's training inputs were."""
    from sclref import data

    if network.preprocessing is None:
        print(f"sclref infer: warning: {args.model} records no input preprocessing (exported by an older sclref or "
              f"from an older run); standardizing {args.data} by the statistics of its own train split, which "
              f"matches training only if it is the training data", file=sys.stderr)
        return data.load(args.data, dtype=dtype)
    return data.load(args.data, dtype=dtype, preprocessing=network.preprocessing)


def _network(model):
    """The sparse network `model` names: a file written by `sclref export`, or a finished run's directory.

    A run directory is exported in memory (dead units removed), unless it holds the file
    `sclref export` writes there by default.
    """
    from sclref.sparse import export_run, load

    path = Path(model)
    if path.is_dir():
        return load(path / "sparse.npz") if (path / "sparse.npz").is_file() else export_run(path)
    return load(path)


def _infer(args) -> int:
    from sclref.sparse import Runtime

    try:
        network = _network(args.model)
        runtime = Runtime(network, args.dtype, args.backend)
        dataset = _test_set(args, network, runtime.dtype)
        x, y = dataset.x_test, dataset.y_test
        if args.limit is not None:
            x, y = x[:args.limit], y[:args.limit]
        if len(x) == 0:
            return _fail("infer", f"{args.data}: the test set is empty")
        runtime(x[:args.batch])  # compile and warm up outside the timing
        correct, times = 0, []
        for start in range(0, len(x), args.batch):
            t0 = time.perf_counter()
            logits = runtime(x[start:start + args.batch])
            times.append(time.perf_counter() - t0)
            pred = logits.reshape(len(logits), -1).argmax(axis=1)
            correct += int(np.count_nonzero(pred == y[start:start + args.batch]))
    except (ValueError, OSError, TypeError) as err:
        return _fail("infer", err)
    result = {"model": str(args.model), "data": dataset.name, "samples": len(x), "batch": args.batch,
              "dtype": runtime.dtype.name, "backends": runtime.plan(args.batch), "accuracy": correct / len(x),
              "latency_s": float(np.median(times)), "throughput_per_s": len(x) / sum(times),
              "preprocessing": network.preprocessing}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"accuracy {100 * result['accuracy']:.2f}% on {len(x)} samples of {dataset.name}; "
          f"batch {args.batch}: median latency {1e3 * result['latency_s']:.3f} ms, "
          f"throughput {result['throughput_per_s']:,.0f} samples/s ({runtime.dtype.name}, "
          f"backends {', '.join(f'{k}={v}' for k, v in result['backends'].items())})")
    return 0


def _bench(args) -> int:
    from sclref.sparse.bench import bench, check_counts, format_report

    try:
        network = _network(args.model)
        check_counts(network, args.batches, args.reps, np.dtype(args.dtype))
        result = bench(network, args.batches, args.reps, np.dtype(args.dtype), not args.no_break_even)
    except (ValueError, OSError, TypeError) as err:
        return _fail("bench", err)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def add_parsers(subparsers) -> None:
    """Register `export`, `infer` and `bench` on the `sclref` command's subparsers."""
    p = subparsers.add_parser("export", help="write a run's pruned network as a sparse .npz file or an ONNX model")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished training run (holds model.npz)")
    p.add_argument("--format", default="npz", choices=("npz", "onnx"),
                   help="npz: sclref's CSR file (default); onnx: a standard ONNX model with dense weights "
                        "(needs the onnx extra)")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default RUN_DIR/sparse.npz or .onnx)")
    p.add_argument("--no-prune-dead", action="store_true", help="keep units with no inputs or no outputs")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("infer", help="accuracy, latency and throughput of a sparse network on a test set")
    p.add_argument("model", metavar="MODEL",
                   help="a sparse network file written by `sclref export`, or a finished run's directory")
    p.add_argument("--data", required=True, help="'digits', a directory of MNIST-format IDX files, or a .npz")
    p.add_argument("--backend", default="auto", choices=("auto", "sclref", "scipy", "dense"),
                   help="auto picks, per layer, what measures fastest for its sparsity")
    p.add_argument("--batch", type=count(MAX_BATCH), default=256, help="samples per call (default 256)")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="default: the file's dtype")
    p.add_argument("--limit", type=count(), default=None, metavar="N", help="use the first N test samples")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_infer)

    p = subparsers.add_parser("bench", help="per-layer latency of dense, scipy, sclref and torch backends")
    p.add_argument("model", metavar="MODEL",
                   help="a sparse network file written by `sclref export`, or a finished run's directory")
    p.add_argument("--batches", type=_batch_sizes, default=(1, 64, 256),
                   help=f"comma-separated batch sizes, each up to {MAX_BATCH:,} (default 1,64,256)")
    p.add_argument("--reps", type=count(MAX_REPS), default=50,
                   help=f"timed calls per backend and case, up to {MAX_REPS:,} (default 50)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="dtype the backends compute in")
    p.add_argument("--no-break-even", action="store_true", help="skip the break-even density search")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_bench)
