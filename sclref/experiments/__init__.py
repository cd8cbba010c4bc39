"""Experiments: sweeps of training runs, each in its own directory of a store, run serially or on Dask.

`executor` trains a list of runs (`execute`); `reproduce` is the results experiment built
on it (SCL against dense and magnitude pruning over seeds, λ sweeps, tables, plots); `cli`
is ``sclref reproduce``.
"""

from sclref.experiments.executor import (
    Run,
    RunFailedError,
    RunSummary,
    SchedulerError,
    execute,
    local_cluster,
    read_summary,
    summarize_store,
)

__all__ = ["Run", "RunFailedError", "RunSummary", "SchedulerError", "execute", "local_cluster", "read_summary",
           "summarize_store"]
