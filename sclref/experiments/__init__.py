"""Experiments: sweeps of training runs, each in its own directory of a store, run serially or on Dask."""

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
