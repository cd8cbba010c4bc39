"""Run the full results reproduction: benchmarks/out/results.json, the plots in docs/img/results/, a Markdown table.

A thin runner over `sclref.experiments.reproduce` (the same engine as ``sclref reproduce``). It is
resumable: runs already in the JSON with the same settings are skipped, so an interrupted
reproduction continues where it stopped when started again with the same arguments.

    python benchmarks/results.py                                   # LeNet-300-100, Fashion-MNIST, 3 seeds
    python benchmarks/results.py --models lenet5 --seeds 0 --epochs 4 --finetune-epochs 1
    python benchmarks/results.py --methods scl_identity magnitude --sweep 0.001 0.01 0.03   # error vs sparsity

With ``--sweep``, the masked methods run again at each λ given, each λ into its own
``results-lam{λ}.json`` beside the main file, and one more plot draws error against
sparsity over every λ measured (the main file's λ included).

The tables and plots cover every method recorded in the JSON for the models and seeds
asked for, so running one more method redraws the figures with all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JSON = ROOT / "benchmarks" / "out" / "results.json"
PLOTS = ROOT / "docs" / "img" / "results"


def main(argv=None) -> int:
    from sclref.experiments import reproduce as rp
    from sclref.experiments.reproduce import Settings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lenet300"])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(rp.DEFAULT_METHODS))
    p.add_argument("--epochs", type=int, default=20, help="mask-learning epochs (default 20)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tune / retraining epochs (default 5)")
    p.add_argument("--lam", type=float, default=None, help="λ of every SCL variant (default 0.003 on 28x28 data)")
    p.add_argument("--no-norm-scale", type=float, default=Settings.no_norm_scale,
                   help="c of the scl_identity_global_scale ablation (λ·c, mask lr / c)")
    p.add_argument("--sweep", nargs="+", type=float, default=None, metavar="LAM",
                   help="also run the masked methods at each of these λ (error vs sparsity)")
    args = p.parse_args(argv)
    settings = Settings(models=tuple(args.models), data=args.data, seeds=tuple(args.seeds),
                        methods=tuple(args.methods), epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                        lam=args.lam, no_norm_scale=args.no_norm_scale)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    store = rp.reproduce(settings, JSON, log=log)
    # The tables and plots show every method recorded for these models and seeds, not only
    # the ones this call ran, so that the figures in docs/ never lose a method.
    shown = dataclasses.replace(settings, methods=tuple(
        m for m in rp.METHODS if any(r["method"] == m and r["model"] in settings.models and r["seed"] in settings.seeds
                                     and r["data"] == settings.data_label for r in store["runs"])))
    summary = rp.summarize(store, shown)
    rp.plot(summary, store, shown, PLOTS)
    print(rp.markdown(summary, shown))
    if args.sweep:
        rows = rp.sweep_summary(rp.sweep(settings, args.sweep, JSON, log=log), settings)
        rp.plot_sweep(rows, settings, PLOTS)
        print(rp.sweep_markdown(rows, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
