"""The argparse pieces the `sclref` subcommands share: value types that word their errors alike, and flags
that several commands declare (`add_shared`), so each is declared once with one help text."""

from __future__ import annotations

import argparse
import math


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed, a count); anything else is a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a λ, a scale); anything else is a usage error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


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


def add_shared(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """Declare the `SHARED` flags named in `defaults` on `parser`, each with its default there."""
    for name, default in defaults.items():
        flag, keywords = SHARED[name]
        parser.add_argument(flag, default=default, **keywords)
