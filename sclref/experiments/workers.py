"""The set-up a Dask worker of a sweep gets when it starts: numba's thread count (needs `distributed`)."""

from __future__ import annotations

import distributed

from sclref import kernels

__all__ = ["NumbaThreads"]


class NumbaThreads(distributed.WorkerPlugin):
    """Set numba's thread count in the worker's process.

    Not through ``NUMBA_NUM_THREADS``: a LocalCluster sets a worker's environment after
    numba has read it, numba reads it again whenever it compiles, and it refuses a value
    other than the one its threads were launched with once they run.
    """

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker) -> None:
        kernels.set_numba_threads(self.threads)
