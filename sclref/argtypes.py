"""Value types for the argparse options of the `sclref` subcommands, shared so all word their errors alike."""

from __future__ import annotations

import argparse


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed, a count); anything else is a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value
