"""A run directory belongs to one run: one writer at a time, no files of another run left beside it.

`claim` is what a writer calls before any work: it creates the directory (so an
unwritable place fails at once, not after the first epoch), takes an exclusive lock that
a second writer finds held (a clear error, immediately), removes temporary files that a
killed writer left, and refuses a fresh run in a directory that holds another run's
files unless told to replace them, in which case they all go before the new run writes
its first one. The lock is an advisory `flock` on the empty file ``.sclref.lock``: the
kernel drops it when the process dies, however it dies, so a crash never leaves a
directory locked; the file itself stays, since deleting a lock file races with a writer
that has just opened it. (`flock` is reliable on local filesystems; on NFS it depends on
the server.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from sclref.errors import InputError

__all__ = ["LOCK", "RUN_FILES", "RunDirectoryError", "check_writable", "claim", "is_held"]

LOCK = ".sclref.lock"
# Every file a run or its export writes in the run directory; a replaced run loses all of them.
RUN_FILES = ("checkpoint.npz", "metrics.json", "model.npz", "sparse.npz", "sparse.onnx")


class RunDirectoryError(InputError):
    """A run directory that cannot be used: locked by another writer, holding another run, or unwritable."""


def is_held(directory) -> bool:
    """Whether a writer holds `directory` now."""
    try:
        fd = os.open(Path(directory) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def check_writable(directory) -> None:
    """Raise `RunDirectoryError` now if `directory` could not be created or written, without creating it.

    A cheap look before the work (loading data, computing) so that a bad ``--out`` is
    reported at once; `claim` still has the last word.
    """
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if existing == directory and not directory.is_dir():
        raise RunDirectoryError(f"{directory} exists and is not a directory")
    if not existing.is_dir():
        raise RunDirectoryError(f"{directory}: cannot be a directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"{directory}: cannot write there ({existing} is not writable)")


@contextlib.contextmanager
def claim(directory, existing: str = "refuse"):
    """Hold `directory` for one run's writes for the duration of the ``with`` block.

    Parameters
    ----------
    directory : str or os.PathLike
        The run directory; created with its parents when missing.
    existing : {"refuse", "keep", "replace"}
        What to do with another run's files (`RUN_FILES`) found there: refuse to start
        (a fresh run), keep them (a resumed run, or a command that updates its own
        files), or delete them all before the new run writes anything.

    Raises
    ------
    RunDirectoryError
        When the directory cannot be created or written, another process holds it, or
        `existing` is "refuse" and another run's files are there.
    """
    if existing not in ("refuse", "keep", "replace"):
        raise ValueError(f"existing must be 'refuse', 'keep' or 'replace', got {existing!r}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirectoryError(f"{directory}: cannot write the run directory ({err.strerror or err})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(f"{directory}: another sclref process is writing this run directory; "
                                    "wait for it or choose another --out") from None
        for temporary in directory.glob(".*.tmp"):  # what an atomic write leaves when its process is killed
            temporary.unlink(missing_ok=True)
        present = [name for name in RUN_FILES if (directory / name).exists()]
        if present and existing != "keep":
            if existing == "refuse":
                raise RunDirectoryError(f"{directory}: holds another run ({', '.join(present)}); --resume continues "
                                        "it, --replace deletes it and starts over, or choose another --out")
            for name in present:
                (directory / name).unlink()
        yield directory
    finally:
        os.close(fd)  # closing the descriptor releases the lock
