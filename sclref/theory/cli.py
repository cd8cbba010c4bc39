"""The `sclref theory` subcommand: run the convergence-principle checks and report them.

`add_parser(subparsers)` registers the subcommand on the `sclref` parser; the handler
prints one table (STE x experiment) and the chatter diagnostic, and writes
``theory.json``, ``table.md`` and the PNG plots to ``--out``. ``python -m sclref.theory.cli`` runs it on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

from sclref.flags import nonnegative_int

__all__ = ["add_parser", "run_theory"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``theory`` on `subparsers` (from ``ArgumentParser.add_subparsers``); return its parser."""
    p = subparsers.add_parser("theory", help="check the STE convergence principle on problems with known answers",
                              description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the seconds-long version (fewer runs, seeds and epochs)")
    p.add_argument("--json", action="store_true", help="print the JSON record on stdout instead of the table")
    p.add_argument("--out", default="runs/theory", metavar="DIR",
                   help="where theory.json, table.md and the PNG plots go (default runs/theory)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--ste", action="append", default=None, metavar="NAME",
                   help="measure only this registered estimator (repeatable; default: all)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.set_defaults(func=run_theory)
    return p


@contextlib.contextmanager
def _hypothesis_scratch():
    """Keep hypothesis's cache out of the working directory during a command-line run.

    hypothesis caches constants it reads from local source files in ``./.hypothesis``.
    When nothing has imported hypothesis yet (a fresh `sclref theory` process), point its
    storage at a temporary directory removed afterwards; otherwise its owner (a test
    suite, say) has configured it, and it is left alone.
    """
    if "hypothesis" in sys.modules or "HYPOTHESIS_STORAGE_DIRECTORY" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="sclref-theory-") as scratch:
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = scratch
        try:
            yield
        finally:
            del os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]


def run_theory(args: argparse.Namespace) -> int:
    """Handler of ``sclref theory``: 0 on success, 2 on a bad setting, a broken estimator or an unwritable --out."""
    import json
    from pathlib import Path

    from sclref import rundir
    from sclref.theory import report, run

    out = Path(args.out)
    try:  # before minutes of work, not after
        rundir.check_writable(out)
    except rundir.RunDirectoryError as err:
        raise ValueError(f"--out {err}") from None
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("the plots need matplotlib (pip install matplotlib), or pass --no-plots") from None
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    with _hypothesis_scratch():  # a ValueError: an unknown estimator, or a user's with a NaN or misshapen surrogate
        result = run(quick=args.quick, seed=args.seed, stes=args.ste, log=log)
    try:
        written = report.write(result, out, with_plots=not args.no_plots)
    except OSError as err:
        raise OSError(f"cannot write to {out}: {err}") from None
    if args.json:
        print(json.dumps(report.to_json(result), indent=2))
        return 0
    print()
    print(report.table(result))
    print("\nChatter diagnostic (experiment 2 with two-slope surrogates, decaying steps and a longer cap; "
          "see docs/theory.md):\n")
    print(report.diagnostic_table(result))
    print(f"\n{result['mode']} run, seed {result['seed']}, {result['seconds']:.1f}s; "
          f"wrote {', '.join(p.name for p in written)} to {out}/")
    disagree = [name for name in result["stes"] if not result["summary"][name]["agrees"]]
    if disagree:
        print(f"(!) measured against declared principle disagree for: {', '.join(disagree)}")
    return 0
