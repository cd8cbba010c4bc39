"""The `sclref reproduce` subcommand: run the results experiment of `sclref.experiments.reproduce`, print its tables.

`add_parser(subparsers)` registers the subcommand. It writes the run directories under
``runs/`` (resumable per epoch; finished runs are not trained again), ``results.json`` and
the PNG plots to ``--out``, and prints the Markdown tables, or with ``--json`` the summary
as JSON on stdout. ``--scheduler`` says where the runs train.
"""

from __future__ import annotations

import argparse
import sys

from sclref.flags import add_shared, nonnegative_int, positive_float

__all__ = ["add_parser", "run_reproduce"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``reproduce`` on `subparsers` (from ``ArgumentParser.add_subparsers``); return its parser."""
    from sclref.experiments.reproduce import DEFAULT_METHODS, METHODS, RESULTS, Settings

    d = Settings()
    p = subparsers.add_parser(
        "reproduce", help="SCL vs dense vs magnitude pruning over several seeds: tables, plots, one JSON",
        description=__doc__.splitlines()[0] + " Flags left out take the mode's values: Fashion-MNIST, 20 + 5 "
        "epochs, λ 0.03 per step on digits and 0.003 otherwise; --quick: 300 digits, 2 + 1 epochs, seed 0.")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"lenet300 and/or lenet5 (default: {' '.join(d.models)}; --quick: lenet300)")
    p.add_argument("--seeds", nargs="+", type=nonnegative_int, default=None, metavar="SEED",
                   help=f"seeds (default: {' '.join(map(str, d.seeds))}; --quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"any of {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})")
    # Without a value these take the mode's: data fashion-mnist (quick: digits), epochs 20 + 5 (quick: 2 + 1),
    # λ 0.03 per step on digits and 0.003 otherwise, every sample (quick: 300 train, 100 test).
    add_shared(p)
    p.add_argument("--no-norm-scale", type=float, default=None, metavar="C",
                   help=f"c of the scl_identity_global_scale ablation: λ·c, mask lr / c (default {d.no_norm_scale:g})")
    p.add_argument("--sweep", nargs="+", type=positive_float, default=None, metavar="LAM",
                   help="run the masked methods again at each of these λ and draw error against sparsity "
                        "over every λ")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR",
                   help=f"where the runs, {RESULTS} and the plots go (default runs/reproduce)")
    p.add_argument("--quick", action="store_true",
                   help="the seconds-long version: LeNet-300-100, 300 digits, 2 + 1 epochs, seed 0")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout instead of the tables (with --sweep: every λ's rows)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--scheduler", default=None, metavar="WHERE",
                   help="'serial', 'local' (a Dask LocalCluster on this machine) or a Dask scheduler address "
                        "such as tcp://host:8786; default: local when Dask is installed and there are runs for "
                        "two workers, else serial (docs/cluster.md)")
    p.set_defaults(func=run_reproduce)
    return p


def run_reproduce(args: argparse.Namespace) -> int:
    """Handler of ``sclref reproduce``: 0 on success, 2 on a bad setting, bad data or an unwritable --out."""
    import dataclasses
    import json
    from pathlib import Path

    from sclref.experiments import reproduce as rp

    # A setting whose flag was left out (or that has none, like dtype) keeps the mode's value.
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(rp.Settings)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    out = Path(args.out)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    settings = rp.Settings.quick(**given) if args.quick else rp.Settings(**given)
    results = rp.reproduce(settings, out, log=log, scheduler=args.scheduler, sweep=args.sweep or ())
    summary = rp.summarize(results, settings)
    rows = rp.sweep_summary(results, settings) if args.sweep else None
    written = [] if args.no_plots else rp.plot(summary, settings, out)
    if rows is not None and not args.no_plots:
        written += rp.plot_sweep(rows, settings, out)
    if args.json:
        print(json.dumps(summary if rows is None else rows, indent=2))
        return 0
    print()
    print(rp.markdown(summary, settings))
    if rows is not None:
        print(rp.sweep_markdown(rows, settings))
    print(f"wrote {', '.join([rp.RESULTS, *(p.name for p in written)])} and the runs to {out}/")
    return 0
