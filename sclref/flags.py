"""The argparse pieces the `sclref` subcommands share: value types that word their errors alike, and flags
that several commands declare (`add_shared`), so each is declared once with one help text."""

from __future__ import annotations

import argparse
import math


def _value_type(parse, ok, rule: str):
    """An argparse type: `parse` the text, then require `ok`; anything else is a usage error naming the value."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text[:40]!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return convert


# An integer >= 0 (a seed, a count); a finite number > 0 (a λ, a scale).
nonnegative_int = _value_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _value_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def count(high: int | None = None):
    """An argparse type: an integer >= 1 (and <= `high`: a batch, a repetition count)."""
    rule = "an integer >= 1" if high is None else f"an integer in [1, {high:,}]"
    return _value_type(int, lambda v: v >= 1 and (high is None or v <= high), rule)


# Flags of training runs that `sclref train` and `sclref reproduce` both take: name -> (flag, argparse keywords).
# Their values are checked where they are used (TrainConfig, reproduce's Settings), so errors read alike.
SHARED = {
    "data": ("--data", dict(help="'digits' (bundled), 'fashion-mnist' (Debian's dataset-fashion-mnist), a directory "
                                 "of MNIST-format IDX or CIFAR binary files, or a .npz")),
    "epochs": ("--epochs", dict(type=int,
                                help="mask-learning epochs (the dense phase of magnitude pruning)")),
    "finetune_epochs": ("--finetune-epochs", dict(type=int,
                                                  help="epochs training θ with frozen masks (retraining after "
                                                       "magnitude pruning; a dense run trains epochs + these)")),
    "lam": ("--lam", dict(type=float, help="λ of the connection-count regularizer")),
    "train_limit": ("--train-limit", dict(type=int, metavar="N", help="use the first N training samples")),
    "test_limit": ("--test-limit", dict(type=int, metavar="N", help="use the first N test samples")),
}


def add_shared(parser: argparse.ArgumentParser, **defaults) -> None:
    """Declare every `SHARED` flag on `parser`, each with its default in `defaults` (None where left out)."""
    for name, (flag, keywords) in SHARED.items():
        parser.add_argument(flag, default=defaults.get(name), **keywords)
