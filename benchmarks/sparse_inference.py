"""Sparse inference benchmark: pruned LeNet-300-100 (>= 98 % sparsity) and LeNet-5, float32.

Trains the networks on Fashion-MNIST unless run directories are given, exports them,
and times dense NumPy on the masked weights (the export without dead-unit removal, i.e.
the original layer shapes), scipy.sparse, torch.sparse and the sclref kernels, each in its
own process (`sclref.sparse.bench`). Prints Markdown tables and the target ratios, and
writes benchmarks/out/sparse_inference.json.

    python benchmarks/sparse_inference.py [--lenet300 RUN_DIR] [--lenet5 RUN_DIR] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, set_threads, write_json  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"


def _train(model, out, target, epochs, limit):
    from sclref.train import TrainConfig, train

    cfg = TrainConfig(model=model, data=FASHION, target_sparsity=target, epochs=epochs, finetune_epochs=2,
                      train_limit=limit)
    train(cfg, out, log=lambda line: print(line, file=sys.stderr))
    return out


def main() -> int:
    set_threads(2)
    parser = argparse.ArgumentParser()
    parser.add_argument("--lenet300", default=None, help="a finished LeNet-300-100 run directory")
    parser.add_argument("--lenet5", default=None, help="a finished LeNet-5 run directory")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "sparse_inference.json"))
    args = parser.parse_args()
    from sclref.sparse import export_run
    from sclref.sparse.bench import bench, format_report

    runs = {"lenet300": args.lenet300 or _train("lenet300", Path("runs/bench-sparse-lenet300"), 98.5, 8, None),
            "lenet5": args.lenet5 or _train("lenet5", Path("runs/bench-sparse-lenet5"), 98.0, 4, 20000)}
    report = {"machine": machine(), "load_average": os.getloadavg(), "models": {}}
    for name, run in runs.items():
        net, masked = export_run(run), export_run(run, prune_dead=False)
        # sclref and scipy on the pruned export; dense NumPy on the masked weights (the export
        # without dead-unit removal, the original shapes) takes turns with them in the same run.
        result = bench(net, (1, 64, 256), args.reps, break_even=True, masked=masked)
        result["sparsity"] = 1 - net.nnz / sum(layer.weight.shape[0] * layer.weight.shape[1]
                                               for layer in masked.weighted())
        report["models"][name] = result
        print(f"\n## {name} ({100 * result['sparsity']:.2f} % sparse, run {run})\n")
        print(format_report(result))
        for b, t in result["network"].items():
            print(f"batch {b}: sclref vs dense masked {t['masked'] / t['sclref']:.1f}x, "
                  f"vs scipy {t['scipy'] / t['sclref']:.1f}x; auto vs dense masked {t['masked'] / t['auto']:.1f}x")
    l300 = report["models"]["lenet300"]["network"]["256"]
    floor = report["models"]["lenet300"]["floor_batch1_s"]
    b1 = report["models"]["lenet300"]["network"]["1"]["sclref"]
    report["targets"] = {
        "lenet300_b256_vs_dense (>= 10)": l300["masked"] / l300["sclref"],
        "lenet300_b256_vs_scipy (>= 3)": l300["scipy"] / l300["sclref"],
        "lenet300_b1_over_floor (<= 3)": b1 / floor,
        # LeNet-5 as `sclref infer` runs it: the backend chosen per layer ("auto").
        "lenet5_b256_auto_vs_dense (> 1)": report["models"]["lenet5"]["network"]["256"]["masked"]
        / report["models"]["lenet5"]["network"]["256"]["auto"],
    }
    print("\n## targets\n")
    for k, v in report["targets"].items():
        print(f"- {k}: {v:.2f}")
    write_json(Path(args.out), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
