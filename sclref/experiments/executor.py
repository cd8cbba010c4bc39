"""Execute a sweep of training runs, serially or on Dask, each run in its own directory.

A sweep is a list of `Run` specs: a name, the run's `TrainConfig` as a dict, its
directory, and optionally the runs it waits for. `execute` trains every run that is not
finished yet and returns one `RunSummary` per run, read from the run's own files, so
the summaries of a sweep can be rebuilt from its store at any time (`summarize_store`).

Nothing here computes: each run is one call of `sclref.train.train`, which writes a
checkpoint after every epoch and resumes from it bit for bit. That is what makes a
sweep restartable and a cluster safe to use:

- a run whose directory holds its final model, trained with the same settings, is
  skipped; other settings there are an error naming the run, never a mix of two runs;
- a run with a checkpoint continues from it, so a killed sweep, restarted, trains no
  finished epoch twice;
- a run lost with its worker is submitted again by Dask and resumes from the last
  checkpoint in its directory. The lost worker's process held the directory's lock;
  the kernel drops it when the process dies, and a retry that finds it still held (a
  worker cut off from the scheduler but still training) waits for it, for a bounded time;
- where a run trained does not change its bytes: BLAS is pinned to one thread inside
  every epoch, so serial, LocalCluster and multi-machine sweeps give the same files
  (on machines with the same set-up; see ``docs/cluster.md``).

Dask is an optional dependency (``pip install -e ".[cluster]"``), imported only when a
cluster is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sclref import provenance, rundir
from sclref._version import __version__
from sclref.errors import InputError
from sclref.rundir import RunDirectoryError
from sclref.runs import CHECKPOINT, METRICS, MODEL, TrainConfig
from sclref.train import train

__all__ = ["CONNECT_TIMEOUT", "LOCK_WAIT", "RETRIES", "Run", "RunFailedError", "RunSummary", "SchedulerError",
           "execute", "local_cluster", "read_summary", "summarize_store"]

CONNECT_TIMEOUT = 5  # seconds to reach a scheduler given by its address
WORKER_WAIT = 60  # seconds for a first worker to join a scheduler that has none
LOCK_WAIT = 60.0  # seconds a run waits for another writer of its directory to let go
LOCK_POLL = 0.5
WATCH_EVERY = 1.0  # seconds between two looks at the running runs' metrics, for the progress bar
RETRIES = 2  # resubmissions of a run whose task raised something unexpected (an I/O error, say)
INSTALL_HINT = 'pip install -e ".[cluster]"'
SCHEDULERS = ("serial", "local")



class SchedulerError(InputError):
    """A cluster that cannot be used: Dask not installed, no scheduler at the address, no workers, mixed set-ups."""


class RunFailedError(RuntimeError):
    """A run of the sweep failed while training; the message names it and its exception is the cause."""


@dataclass(frozen=True)
class Run:
    """One training run of a sweep.

    Parameters
    ----------
    name : str
        The run's name, unique in the sweep: it keys the result and names the run in
        log lines and errors.
    config : dict or TrainConfig
        The run's settings as `TrainConfig.to_dict` gives them; fields left out take
        their defaults. Stored as a plain dict.
    directory : str or os.PathLike
        The run's own directory (checkpoint, metrics and model go there); no two runs
        of a sweep may share one. A relative path is taken from the caller's working
        directory.
    depends_on : tuple of str, optional
        Runs that must be finished before this one starts.
    prepare : callable, optional
        ``prepare(config, summaries) -> config``: called in the calling process once
        every run of `depends_on` is finished, with a copy of this run's full settings
        and ``{name: RunSummary}`` of those runs; returns the settings to train with.
        E.g. magnitude pruning to the per-layer sparsity SCL reached with the same seed:
        ``lambda config, done: {**config, "prune_sparsity": {row["layer"]: row["sparsity"]
        for row in done["scl"].layers}}``.
    """

    name: str
    config: dict
    directory: Path
    depends_on: tuple[str, ...] = ()
    prepare: Callable[[dict, dict], dict] | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a run's name must be a non-empty string, got {self.name!r}")
        if isinstance(self.config, TrainConfig):
            config = self.config.to_dict()
        elif isinstance(self.config, Mapping):
            config = dict(self.config)
        else:
            raise InputError(f"run {self.name!r}: config must be a dict or a TrainConfig, "
                             f"got {type(self.config).__name__}")
        depends_on = (self.depends_on,) if isinstance(self.depends_on, str) else tuple(self.depends_on)
        if not all(isinstance(name, str) for name in depends_on):
            raise InputError(f"run {self.name!r}: depends_on must name runs, got {self.depends_on!r}")
        if self.prepare is not None and not callable(self.prepare):
            raise InputError(f"run {self.name!r}: prepare must be callable, got {type(self.prepare).__name__}")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "directory", Path(self.directory))
        object.__setattr__(self, "depends_on", depends_on)


@dataclass
class RunSummary:
    """What a run's ``metrics.json`` says about it.

    Attributes
    ----------
    config : dict
        The run's full settings (`TrainConfig.to_dict`).
    epochs_done : int
        Epochs trained so far, fine-tuning included.
    finished : bool
        Whether the run trained all its epochs and wrote its final model.
    test_error : float or None
        Test error (a fraction) after the last epoch; None until finished.
    sparsity : float or None
        Fraction of connections pruned over all masked layers; None until finished.
    layers : list of dict
        Per masked layer: ``layer``, ``weights``, ``kept``, ``sparsity``,
        ``dense_flops``, ``effective_flops`` (`sclref.scl.layer_report`); empty until
        finished and for a dense run.
    history : list of dict
        One record per epoch done, as `sclref.train.Trainer.run_epoch` wrote it (phase,
        loss, errors, sparsity, λ, and per masked layer its sparsity and mask flips).
    epoch_seconds : list
        Wall time of each epoch done (None where unknown); left out of comparisons,
        since identical runs take different times.
    """

    config: dict
    epochs_done: int
    finished: bool
    test_error: float | None = None
    sparsity: float | None = None
    layers: list = field(default_factory=list)
    history: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list, compare=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- reading a run directory --------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What a metrics file's records hold: field -> (test, what it must be).
_TEXT = (lambda v: isinstance(v, str), "a string")
_COUNT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_NUMBER = (_is_number, "a finite number")
_FRACTION = (lambda v: _is_number(v) and 0 <= v <= 1, "a fraction in [0, 1]")
_LAYER_FIELDS = {"layer": _TEXT, "weights": _COUNT, "kept": _COUNT, "sparsity": _FRACTION, "dense_flops": _COUNT,
                 "effective_flops": _COUNT}
_EPOCH_FIELDS = {"epoch": _COUNT, "phase": _TEXT, "loss": _NUMBER, "train_error": _FRACTION,
                 "test_error": _FRACTION, "sparsity": _FRACTION}


def _check(record, fields: dict, what: str) -> None:
    """Raise an InputError naming the first field of `record` that is missing, mistyped or out of range."""
    if not isinstance(record, dict):
        raise InputError(f"{what} must be a mapping, got {type(record).__name__}")
    for key, (ok, kind) in fields.items():
        if not ok(record.get(key)):
            raise InputError(f"{what}'s {key} must be {kind}, got {record.get(key)!r}"[:300])


def _check_epoch(record, i: int) -> None:
    _check(record, _EPOCH_FIELDS, f"epoch record {i}")
    layers = record["layers"] if isinstance(record.get("layers"), dict) else None
    if layers is None or not all(isinstance(row, dict) and _COUNT[0](row.get("flips")) for row in layers.values()):
        raise InputError(f"epoch record {i}'s layers must map each masked layer to its mask flips")
    if record.get("lam") is not None and not _is_number(record["lam"]):
        raise InputError(f"epoch record {i}'s lam must be a finite number or null, got {record['lam']!r}")


def _summary_of(record) -> RunSummary:
    """The summary of a parsed metrics record; anything missing, mistyped or out of range is an InputError."""
    if not isinstance(record, dict):
        raise InputError(f"the metrics must be a mapping, got {type(record).__name__}")
    try:
        config = TrainConfig.from_dict(record.get("config"))
    except (OverflowError, TypeError) as err:  # a number too large for a float, say
        raise InputError(f"the recorded settings are not valid: {err}") from None
    epochs, finished, history = record.get("epochs_done"), record.get("finished"), record.get("history")
    if not isinstance(finished, bool):
        raise InputError(f"finished must be true or false, got {finished!r}")
    if not (_is_int(epochs) and 0 <= epochs <= config.total_epochs):
        raise InputError(f"epochs_done must be an integer in [0, {config.total_epochs}], got {epochs!r}")
    if not (isinstance(history, list) and len(history) == epochs):
        raise InputError(f"history must be a list of {epochs} epoch records")
    for i, epoch in enumerate(history):
        _check_epoch(epoch, i)
    timing = record.get("timing")
    seconds = timing.get("epoch_seconds") if isinstance(timing, dict) else None
    seconds = seconds if isinstance(seconds, list) and len(seconds) == epochs else [None] * epochs
    seconds = [float(t) if _is_number(t) else None for t in seconds]  # the one volatile field: unknown if odd
    if not finished:
        return RunSummary(config.to_dict(), epochs, False, history=history, epoch_seconds=seconds)
    if epochs != config.total_epochs:
        raise InputError(f"a finished run must have done its {config.total_epochs} epochs, not {epochs}")
    final = record.get("final")
    _check(final, {"test_error": _FRACTION, "sparsity": _FRACTION}, "the final results")
    layers = final.get("layers")
    if not isinstance(layers, list):
        raise InputError(f"final layers must be a list, got {type(layers).__name__}")
    for row in layers:
        _check(row, _LAYER_FIELDS, "a final layer row")
    return RunSummary(config.to_dict(), epochs, True, float(final["test_error"]), float(final["sparsity"]),
                      [{key: row[key] for key in _LAYER_FIELDS} for row in layers], history, seconds)


def read_summary(directory) -> RunSummary:
    """The summary of the run in `directory`, read from its ``metrics.json``.

    Parameters
    ----------
    directory : str or os.PathLike
        A run directory written by `sclref.train.train`.

    Returns
    -------
    RunSummary

    Raises
    ------
    FileNotFoundError
        When the directory holds no metrics (the run has not finished an epoch).
    InputError
        When the metrics are not valid JSON or not a run's metrics; the message names the file.
    """
    path = Path(directory) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics there (has the run finished an epoch?)")
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, an integer of too many digits
        raise InputError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    try:
        return _summary_of(record)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def summarize_store(store) -> dict[str, RunSummary]:
    """The summary of every run under `store`, keyed by its directory's path relative to `store`.

    A sweep whose runs live in ``store/<name>`` gets back the summaries `execute` returned,
    under the same names; runs still training are included with ``finished=False``.

    Raises
    ------
    FileNotFoundError
        When `store` is not a directory.
    InputError
        When a run's metrics cannot be read (naming the file).
    """
    store = Path(store)
    if not store.is_dir():
        raise FileNotFoundError(f"{store}: no such store directory")
    found = sorted(path.parent for path in store.rglob(METRICS))
    return {directory.relative_to(store).as_posix(): read_summary(directory) for directory in found}


def _state(name: str, directory: Path, config: dict) -> str:
    """What a run has to do in `directory`: "done", "resume" or "fresh"; another run there is an error.

    Only the checkpoint decides a resume: `train` compares its settings with the run's,
    and rewrites metrics that a crash left unreadable.
    """
    has_checkpoint = (directory / CHECKPOINT).is_file()
    try:
        summary = read_summary(directory)
    except FileNotFoundError:
        summary = None
    except InputError as err:
        if has_checkpoint:
            return "resume"
        raise RunDirectoryError(f"run {name!r}: {err}") from None
    if summary is not None:
        if summary.config != config:
            differ = ", ".join(f"{key} {summary.config.get(key)!r} there, {value!r} here"
                               for key, value in config.items() if summary.config.get(key) != value)
            raise RunDirectoryError(f"run {name!r}: {directory} holds a run with other settings ({differ}); "
                                    "give this run another directory, or delete that one")
        if summary.finished and (directory / MODEL).is_file():
            return "done"
    if has_checkpoint:
        return "resume"
    present = [file for file in rundir.RUN_FILES if (directory / file).exists()]
    if present:
        raise RunDirectoryError(f"run {name!r}: {directory} holds {', '.join(present)} but no checkpoint to "
                                "continue from; give this run another directory, or delete those files")
    return "fresh"


# -- one run, wherever it executes ---------------------------------------------------------

@dataclass
class _Task:
    """What a worker needs to train one run: plain values, cheap to send."""

    name: str
    config: dict
    directory: str
    lock_wait: float


@dataclass
class _Outcome:
    """A worker's answer: the run's summary and log lines, or the error that no retry would cure."""

    summary: RunSummary | None
    lines: list
    error: BaseException | None = None


def _train_run(task: _Task, log) -> RunSummary:
    """Train `task`'s run to its end (fresh, resumed, or not at all when finished) and summarize it."""
    directory = Path(task.directory)
    config = TrainConfig.from_dict(task.config)
    deadline = time.monotonic() + task.lock_wait
    waiting = False
    while True:
        state = _state(task.name, directory, task.config)
        if state == "done":
            return read_summary(directory)
        try:
            train(config, directory, resume=state == "resume", log=log)
            return read_summary(directory)
        except RunDirectoryError:
            # Held by another writer: a worker the scheduler lost but that is still
            # training this run. Once it lets go, the state is read again.
            if not rundir.is_held(directory) or time.monotonic() >= deadline:
                raise
        if not waiting:
            log(f"another process is writing {directory}; waiting up to {task.lock_wait:g} s for it")
            waiting = True
        time.sleep(LOCK_POLL)


def _train_remote(task: _Task) -> _Outcome:
    """The task a Dask worker runs. Refused input and divergence come back as values: retrying cannot cure them.

    Anything else raises, and Dask submits the task again (``retries``); the retry
    resumes from the run's last checkpoint.
    """
    lines: list[str] = []
    try:
        summary = _train_run(task, lines.append)
    except (InputError, ArithmeticError, FileNotFoundError) as err:
        return _Outcome(None, lines, err)
    return _Outcome(summary, lines)


def _worker_setup() -> dict:
    """What of a worker's set-up decides a run's bits (compared across the workers of a cluster)."""
    recorded = provenance.reproducibility()
    return {"sclref": __version__, **{key: recorded[key] for key in ("blas", "numpy", "numpy_simd", "numba")}}


# -- the sweep ------------------------------------------------------------------------------

def _ordered(runs) -> list[Run]:
    """The runs with every dependency before its dependents (otherwise in the given order), checked."""
    runs = list(runs)
    by_name: dict[str, Run] = {}
    directories: dict[str, str] = {}
    for run in runs:
        if not isinstance(run, Run):
            raise InputError(f"a sweep is a list of Run, got a {type(run).__name__}")
        if run.name in by_name:
            raise InputError(f"two runs are named {run.name!r}")
        key = os.path.normcase(os.path.abspath(run.directory))
        if key in directories:
            raise InputError(f"runs {directories[key]!r} and {run.name!r} share the directory {run.directory}")
        by_name[run.name], directories[key] = run, run.name
    for run in runs:
        unknown = [name for name in run.depends_on if name not in by_name]
        if unknown:
            raise InputError(f"run {run.name!r} depends on {unknown}, which are not in the sweep")
    ordered, placed = [], set()
    while len(ordered) < len(runs):
        ready = [run for run in runs if run.name not in placed and all(d in placed for d in run.depends_on)]
        if not ready:
            stuck = sorted(run.name for run in runs if run.name not in placed)
            raise InputError(f"the dependencies of runs {stuck} form a cycle")
        ordered += ready
        placed.update(run.name for run in ready)
    return ordered


def _settings(run: Run, config) -> dict:
    """`config` as a full, validated settings dict; what is wrong with it is an InputError naming the run."""
    try:
        return TrainConfig.from_dict(config).to_dict()
    except (InputError, OverflowError, TypeError) as err:
        raise InputError(f"run {run.name!r}: {err}") from None


def _plan(run: Run, done: dict[str, RunSummary], lock_wait: float) -> _Task | RunSummary:
    """The task of a run whose dependencies are done, or its summary when its directory holds it finished."""
    config = _settings(run, run.config)
    if run.prepare is not None:
        try:
            prepared = run.prepare(dict(config), {name: done[name] for name in run.depends_on})
        except InputError as err:
            _fail(run.name, err)
        except Exception as err:
            raise RunFailedError(f"run {run.name!r}: its prepare raised {type(err).__name__}: {err}") from err
        config = _settings(run, prepared)
    directory = run.directory.absolute()
    if _state(run.name, directory, config) == "done":
        return read_summary(directory)
    return _Task(run.name, config, str(directory), lock_wait)


def _fail(name: str, err: BaseException):
    """Raise `err` of run `name` as an error that names the run: an InputError of the same kind, else RunFailedError."""
    if isinstance(err, InputError):
        if str(err).startswith(f"run {name!r}"):
            raise err
        try:  # keep the kind (RunDirectoryError, LimitError, ...): callers may tell them apart
            named = type(err)(f"run {name!r}: {err}")
        except TypeError:
            named = InputError(f"run {name!r}: {err}")
        raise named from err
    if type(err).__name__ == "KilledWorker":  # distributed's: the run's worker died as often as Dask allows
        raise RunFailedError(f"run {name!r}: every worker that trained it died ({err}); is it out of memory?") \
            from err
    raise RunFailedError(f"run {name!r} failed: {type(err).__name__}: {err}") from err


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _count(value, what: str) -> int | None:
    if value is not None and not (_is_int(value) and value >= 1):
        raise InputError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _distributed(purpose: str):
    try:
        import distributed
    except ImportError:
        raise SchedulerError(f"{purpose} needs Dask, which is not installed: {INSTALL_HINT}") from None
    return distributed


def local_cluster(workers: int | None = None, threads_per_worker: int | None = None):
    """A Dask LocalCluster sized to this machine, listening on 127.0.0.1 only, without a dashboard.

    Each worker is a process that trains one run at a time; its numba threads (set by
    `sclref.experiments.workers.NumbaThreads`) are `threads_per_worker`, and BLAS and
    OpenMP run on one thread. Close it when done (``with local_cluster() as cluster:``).

    Parameters
    ----------
    workers : int, optional
        Worker processes; by default as many as the cores this process may use,
        divided by `threads_per_worker`, so that no core is oversubscribed.
    threads_per_worker : int, optional
        Threads each worker computes with (default 1). sclref's kernels use more than
        one only with ``SCLREF_NUMBA_PARALLEL=1``.

    Returns
    -------
    distributed.LocalCluster

    Raises
    ------
    SchedulerError
        When Dask is not installed.
    """
    distributed = _distributed("a local cluster")
    threads_per_worker = _count(threads_per_worker, "threads_per_worker") or 1
    workers = _count(workers, "workers") or max(1, _cores() // threads_per_worker)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # One Dask thread per worker: runs in one process would share its BLAS pin and numba's pool.
    # Without a dashboard the scheduler still serves health checks over HTTP; on a free
    # port, so that it never collides with another cluster's 8787.
    from sclref.experiments.workers import NumbaThreads

    return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                    env=env, plugins={NumbaThreads(threads_per_worker)})


def _connect(address: str, distributed, log):
    """A client of the scheduler at `address`, once a worker has joined and all workers have one set-up."""
    try:
        client = distributed.Client(address, timeout=f"{CONNECT_TIMEOUT}s")
    except (OSError, ValueError) as err:
        raise SchedulerError(f"no Dask scheduler answers at {address} within {CONNECT_TIMEOUT} s ({err}); is "
                             "`dask scheduler` running there, and is the address right?") from None
    try:
        if not client.scheduler_info().get("workers"):
            log(f"waiting up to {WORKER_WAIT} s for a worker to join {address}")
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT)
            except (TimeoutError, OSError):
                raise SchedulerError(f"no worker joined the scheduler at {address} within {WORKER_WAIT} s; "
                                     f"start some with `dask worker {address}`") from None
        try:
            found = client.run(_worker_setup)
        except (ImportError, AttributeError) as err:
            raise SchedulerError(f"the workers of {address} cannot run sclref's sweeps ({type(err).__name__}: "
                                 f"{err}); install this sclref ({__version__}) there") from None
        setups: dict[str, list] = {}
        for worker, setup in found.items():
            setups.setdefault(json.dumps(setup, sort_keys=True), []).append(worker)
        if len(setups) > 1:
            groups = "; ".join(f"{', '.join(sorted(workers))}: {key}" for key, workers in setups.items())
            raise SchedulerError(f"the workers of {address} differ in what decides a run's bits (sclref, NumPy, "
                                 f"numba, BLAS), so a run resumed on another worker would not continue it: {groups}")
    except BaseException:
        client.close()
        raise
    return client


def _check_scheduler(scheduler, workers, threads_per_worker) -> None:
    """Refuse a scheduler or sizes that cannot be honoured, before anything is read or started."""
    _count(workers, "workers")
    _count(threads_per_worker, "threads_per_worker")
    address = isinstance(scheduler, str) and "://" in scheduler
    if scheduler is not None and scheduler not in SCHEDULERS and not address:
        raise InputError(f"scheduler must be None, 'serial', 'local' or a scheduler address such as "
                         f"'tcp://host:8786', got {scheduler!r}")
    if (scheduler == "serial" or address) and (workers is not None or threads_per_worker is not None):
        raise InputError(f"workers and threads_per_worker size a local cluster; with scheduler={scheduler!r} "
                         "they do not apply (a remote cluster's workers are sized by `dask worker`)")
    if scheduler == "local" or address:
        _distributed("a local cluster" if scheduler == "local" else f"the Dask cluster at {scheduler}")


def _mode(scheduler, workers, threads_per_worker, to_train: int) -> str:
    """"serial", "local" or the scheduler's address: what `scheduler` asks for, or the choice for None."""
    if scheduler is not None:
        return scheduler
    try:
        import distributed  # noqa: F401
    except ImportError:
        return "serial"
    wanted = workers or _cores() // (threads_per_worker or 1)
    return "local" if wanted >= 2 and to_train >= 2 else "serial"


def _epochs(config: dict) -> int:
    """A run's epochs for the progress bar; 0 for settings too broken to say (`_plan` refuses them by name)."""
    try:
        return max(0, int(config.get("epochs", TrainConfig.epochs)) + int(config.get("finetune_epochs",
                                                                                    TrainConfig.finetune_epochs)))
    except (TypeError, ValueError, OverflowError):
        return 0


class _Sweep:
    """The bookkeeping of one `execute` call: results so far, runs still to start, the log and the progress bar.

    The bar counts epochs over all runs, read from the metrics file each running run
    rewrites after every epoch: the store is the one place that knows, wherever a run
    trains (a cluster's workers send their news only when a run ends).
    """

    def __init__(self, runs: list[Run], lock_wait: float, log, progress: bool):
        from tqdm import tqdm

        self.runs = runs
        self.waiting = {run.name: run for run in runs}  # not started, not skipped
        self.tasks: dict[str, _Task] = {}  # planned ahead, for runs whose settings do not wait for others
        self.results: dict[str, RunSummary] = {}
        self.lock_wait = lock_wait
        self.running: dict[str, Path] = {}  # started and not finished: their directories
        self.epochs: dict[str, int] = {}  # epochs the bar has counted, per run
        self._lock = threading.Lock()  # the bar is moved by the watcher thread too
        quiet = not progress or not sys.stderr.isatty() or os.environ.get("SCLREF_NO_PROGRESS") == "1"
        total = sum(_epochs(run.config) for run in runs)
        self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True, disable=quiet)
        self._log = log
        self._show_runs()

    def _show_runs(self) -> None:
        self.bar.set_postfix_str(f"runs {len(self.results)}/{len(self.runs)}")

    def count(self, name: str, epochs: int) -> None:
        """Move the bar to `epochs` done by run `name` (never back)."""
        with self._lock:
            new = epochs - self.epochs.get(name, 0)
            if new > 0:
                self.epochs[name] = epochs
                self.bar.update(new)

    def poll(self) -> None:
        """Count the epochs the running runs' metrics files show."""
        for name, directory in list(self.running.items()):
            try:
                done = json.loads((directory / METRICS).read_text())["epochs_done"]
            except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being replaced
                continue
            if isinstance(done, int) and not isinstance(done, bool):
                self.count(name, done)

    def start(self, task: _Task) -> None:
        self.running[task.name] = Path(task.directory)

    def log(self, line: str) -> None:
        if self.bar.disable:
            self._log(line)
        else:
            with self.bar.external_write_mode():  # the bar steps aside while the line is written
                self._log(line)

    def check(self) -> None:
        """Plan every run whose settings are known now: skip those finished, refuse directories of other runs."""
        for run in self.runs:
            if run.prepare is None:
                planned = _plan(run, self.results, self.lock_wait)
                if isinstance(planned, RunSummary):
                    self.skip(run, planned)
                else:
                    self.tasks[run.name] = planned

    def skip(self, run: Run, summary: RunSummary) -> None:
        del self.waiting[run.name]
        self.log(f"{run.name}: already finished in {run.directory}, skipped")
        self.finish(run.name, summary, trained=False)

    def to_train(self) -> int:
        return len(self.waiting)

    def ready(self) -> list[_Task]:
        """The tasks of the waiting runs whose dependencies are finished; runs with `prepare` are planned now."""
        tasks = []
        while True:
            runnable = [run for run in self.waiting.values() if all(d in self.results for d in run.depends_on)]
            skipped = False
            for run in runnable:
                planned = self.tasks.pop(run.name, None) or _plan(run, self.results, self.lock_wait)
                if isinstance(planned, RunSummary):
                    self.skip(run, planned)
                    skipped = True  # its dependents may be runnable now
                else:
                    del self.waiting[run.name]
                    tasks.append(planned)
            if not skipped:
                return tasks

    def finish(self, name: str, summary: RunSummary, trained: bool = True) -> None:
        self.running.pop(name, None)
        self.results[name] = summary
        if trained:
            self.log(f"{name}: finished, test error {100 * summary.test_error:.2f} %, "
                     f"sparsity {100 * summary.sparsity:.2f} % ({summary.epochs_done} epochs)")
        self.count(name, summary.epochs_done)
        self._show_runs()


def _run_serially(sweep: _Sweep) -> None:
    tasks = sweep.ready()
    while tasks:
        for task in tasks:
            sweep.start(task)

            def log(line, name=task.name):
                sweep.log(f"{name}: {line}")
                sweep.poll()  # a line per epoch: the metrics file has just been written

            try:
                summary = _train_run(task, log)
            except Exception as err:
                _fail(task.name, err)
            sweep.finish(task.name, summary)
        tasks = sweep.ready()


def _run_on(client, sweep: _Sweep) -> None:
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    names, outstanding = {}, set()
    finished = as_completed()

    def submit(tasks):
        for task in tasks:
            sweep.start(task)
            future = client.submit(_train_remote, task, key=f"sclref-run-{task.name}-{token}", pure=False,
                                   retries=RETRIES)
            names[future.key] = task.name
            outstanding.add(future)
            finished.add(future)

    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(sweep, stop), daemon=True)
    watcher.start()
    try:
        submit(sweep.ready())
        for future in finished:
            outstanding.discard(future)
            name = names[future.key]
            try:
                outcome = future.result()
            except Exception as err:
                _fail(name, err)
            for line in outcome.lines:
                sweep.log(f"{name}: {line}")
            if outcome.error is not None:
                _fail(name, outcome.error)
            sweep.finish(name, outcome.summary)
            submit(sweep.ready())
    except BaseException:
        client.cancel(list(outstanding))
        raise
    finally:
        stop.set()
        watcher.join()


def _watch(sweep: _Sweep, stop: threading.Event) -> None:
    """Move the bar every `WATCH_EVERY` seconds while a cluster trains."""
    while not stop.wait(WATCH_EVERY):
        sweep.poll()


def execute(runs, scheduler: str | None = None, workers: int | None = None, threads_per_worker: int | None = None,
            progress: bool = True, log=print, lock_wait: float = LOCK_WAIT) -> dict[str, RunSummary]:
    """Train every run of a sweep that is not finished yet; return the summary of every run.

    Runs are independent unless one names others in `depends_on`: it starts when they
    are finished. A run whose directory holds its final model with the same settings is
    skipped, a run with a checkpoint continues from it, and every other run starts
    fresh. Which scheduler trains a run does not change a byte of its files.

    Parameters
    ----------
    runs : iterable of Run
    scheduler : {None, "serial", "local"} or str
        ``"serial"``: one run after another in this process. ``"local"``: a
        `local_cluster` started for the sweep and closed at its end, also on an error
        or an interrupt. An address such as ``"tcp://host:8786"``: the Dask cluster
        whose scheduler listens there (its workers must see the run directories and the
        data at the same paths). None: a local cluster when Dask is installed and it
        would have two workers or more and there are two runs or more to train,
        otherwise serial.
    workers, threads_per_worker : int, optional
        The size of the local cluster (see `local_cluster`); only with "local" or None.
        By default as many workers as there are cores (and no more than runs to train).
    progress : bool
        Show a progress bar over the epochs of all runs, with the count of finished
        runs, on standard error (never when it is not a terminal or
        ``SCLREF_NO_PROGRESS=1``).
    log : callable
        Receives each line of news, prefixed with the run's name: the runs' epoch lines
        (from a cluster, when the run has finished), skips, waits and results.
    lock_wait : float
        Seconds a run waits for another process writing its directory to let go.

    Returns
    -------
    dict of str to RunSummary
        The summary of every run, in the order of `runs`.

    Raises
    ------
    InputError
        A bad sweep (duplicate names or directories, unknown or cyclic dependencies,
        invalid settings) or a directory holding another run
        (`sclref.rundir.RunDirectoryError`); these are found before anything trains,
        except for runs whose settings `prepare` decides. Errors of a run name it.
    SchedulerError
        Dask not installed for a cluster; no scheduler answering at the address within
        `CONNECT_TIMEOUT` seconds; workers of different set-ups.
    RunFailedError
        A run failed while training (it diverged, or its worker died every time); the
        runs still queued are cancelled, and a restarted sweep continues them all.
    """
    runs = list(runs)
    ordered = _ordered(runs)
    _check_scheduler(scheduler, workers, threads_per_worker)
    if not (isinstance(lock_wait, (int, float)) and not isinstance(lock_wait, bool) and lock_wait >= 0):
        raise InputError(f"lock_wait must be a number of seconds >= 0, got {lock_wait!r}")
    sweep = _Sweep(ordered, float(lock_wait), log, progress)
    try:
        sweep.check()
        mode = _mode(scheduler, workers, threads_per_worker, sweep.to_train())
        if not sweep.to_train():
            pass
        elif mode == "serial":
            _run_serially(sweep)
        elif mode == "local":
            distributed = _distributed("a local cluster")
            if workers is None:
                workers = max(1, min(sweep.to_train(), _cores() // (threads_per_worker or 1)))
            with local_cluster(workers, threads_per_worker) as cluster, distributed.Client(cluster) as client:
                sweep.log(f"local cluster: {workers} worker(s) of {threads_per_worker or 1} thread(s)")
                _run_on(client, sweep)
        else:
            client = _connect(mode, _distributed(f"the Dask cluster at {mode}"), sweep.log)
            try:
                _run_on(client, sweep)
            finally:
                client.close()
    finally:
        sweep.bar.close()
    return {run.name: sweep.results[run.name] for run in runs}
