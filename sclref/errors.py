"""sclref's own exception types, and the one check of a size read from outside before it is allocated.

Every reader of outside bytes (IDX, `.npz` data, checkpoints, model files, sparse files,
results JSON) reports a file it refuses as an `InputError` whose message names the file
and the problem; a size too large to allocate is a `LimitError`, which names the value
and where it came from. A caller (or a fuzz test) can therefore tell refused input from
a bug by one ``except InputError``.
"""

from __future__ import annotations

import math
import os

__all__ = ["InputError", "LimitError", "check_allocation", "max_allocation_bytes"]


class InputError(ValueError):
    """Input that sclref refuses: a corrupt, truncated, foreign or inconsistent file or value."""


class LimitError(InputError):
    """A size taken from a file or a flag that is beyond what sclref will allocate."""


def max_allocation_bytes() -> int:
    """The largest single array sclref allocates from a size it was given: half the machine's memory.

    ``SCLREF_MAX_ALLOC_BYTES`` overrides it (a smaller value is how tests reach the limit).
    """
    override = os.environ.get("SCLREF_MAX_ALLOC_BYTES")
    if override:
        try:
            return int(override)
        except ValueError:
            raise InputError(f"SCLREF_MAX_ALLOC_BYTES must be an integer, got {override!r}") from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf: a fixed 4 GiB
        return 4 << 30


def check_allocation(shape, itemsize: int, what: str) -> int:
    """Raise `LimitError` unless an array of `shape` and `itemsize` fits in `max_allocation_bytes`.

    `what` says which value asks for it and where it came from ("labels of train.npz: 10
    classes"); the message quotes it. Returns the number of bytes.
    """
    count = math.prod(int(d) for d in shape)
    nbytes = count * int(itemsize)
    limit = max_allocation_bytes()
    if any(int(d) < 0 for d in shape):
        raise LimitError(f"{what}: negative size in shape {tuple(int(d) for d in shape)}")
    if nbytes > limit:
        raise LimitError(f"{what}: an array of shape {tuple(int(d) for d in shape)} needs {nbytes:,} bytes, "
                         f"more than the {limit:,} sclref allocates at once (half the machine's memory; "
                         f"SCLREF_MAX_ALLOC_BYTES changes it)")
    return nbytes
