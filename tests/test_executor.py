"""Sweeps of training runs: serial and Dask give the same files, restarts resume, finished runs are skipped.

Runs are tiny (200 digits, 3 + 1 epochs) except `LONG`, which trains long enough for a
worker to be killed in the middle of it. Every cluster is started by the test that uses
it, on 127.0.0.1, and stopped by it; the Dask tests are skipped without Dask.
"""

import _thread
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings

from sclref import rundir
from sclref.errors import InputError
from sclref.experiments import (
    Run,
    RunFailedError,
    RunSummary,
    SchedulerError,
    execute,
    local_cluster,
    read_summary,
    summarize_store,
)
from sclref.experiments.executor import INSTALL_HINT
from sclref.rundir import RunDirectoryError
from sclref.runs import CHECKPOINT, METRICS, MODEL, TrainConfig
from sclref.train import DivergedError, train
from tests.mutations import json_text_mutations

TINY = dict(data="digits", train_limit=200, test_limit=50, epochs=3, finetune_epochs=1)
SWEEP = {f"lam{lam}-seed{seed}": dict(TINY, lam=lam, seed=seed) for lam in (0.03, 0.3) for seed in (0, 1)}
# The whole digits training set for 30 + 5 epochs: seconds of training after the first
# checkpoint, a wide window to kill its worker in.
LONG = dict(data="digits", test_limit=50, epochs=30, finetune_epochs=5, lam=0.1, seed=3)
FIRST = "lam0.03-seed0"


def same_layer_sparsity(config: dict, done: dict) -> dict:
    """Magnitude pruning to the sparsity each layer reached under SCL in FIRST."""
    return {**config, "prune_sparsity": {row["layer"]: row["sparsity"] for row in done[FIRST].layers}}


def with_follower(store: Path, configs: dict) -> list[Run]:
    """The runs of `configs` in `store`, and a magnitude run that waits for FIRST; listed dependents first."""
    magnitude = dict(SWEEP[FIRST], prune_scope="layer", prune_sparsity=0.5)
    follower = Run("follower", magnitude, store / "follower", depends_on=(FIRST,), prepare=same_layer_sparsity)
    return [follower] + runs_in(store, configs)


def runs_in(store: Path, configs: dict) -> list[Run]:
    return [Run(name, config, store / name) for name, config in configs.items()]


def quiet(line):
    pass


def run_files(directory: Path) -> dict:
    """The bytes of a run's checkpoint and model, and its metrics without their wall times."""
    metrics = json.loads((directory / METRICS).read_text())
    del metrics["timing"]
    return {"checkpoint": (directory / CHECKPOINT).read_bytes(), "model": (directory / MODEL).read_bytes(),
            "metrics": metrics}


def assert_same_runs(results: dict, reference: tuple[Path, dict], store: Path) -> None:
    reference_store, reference_results = reference
    assert results == {name: reference_results[name] for name in results}
    for name in results:
        assert run_files(store / name) == run_files(reference_store / name), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_hosts() -> set[str]:
    """The addresses that this process and its children listen on."""
    psutil = pytest.importorskip("psutil")
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return {conn.laddr.ip for process in processes for conn in process.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """Every run the tests compare with, trained one after another: (store, summaries)."""
    store = tmp_path_factory.mktemp("serial")
    runs = with_follower(store, {**SWEEP, "long": LONG})
    return store, execute(runs, scheduler="serial", progress=False, log=quiet)


# -- results and the store ------------------------------------------------------------------

def test_summaries_come_from_the_run_directories_and_can_be_rebuilt_from_the_store(serial):
    store, results = serial
    assert list(results) == ["follower", *SWEEP, "long"]
    assert summarize_store(store) == dict(sorted(results.items()))
    for name, summary in results.items():
        metrics = json.loads((store / name / METRICS).read_text())
        assert summary.finished and summary.epochs_done == TrainConfig.from_dict(summary.config).total_epochs
        assert (summary.test_error, summary.sparsity, summary.layers) == (
            metrics["final"]["test_error"], metrics["final"]["sparsity"], metrics["final"]["layers"])
    assert results["lam0.3-seed0"].sparsity > results["lam0.03-seed0"].sparsity > 0


def test_a_dependent_run_starts_after_its_dependency_with_the_settings_prepare_gives(serial):
    store, results = serial
    layers = {row["layer"]: row for row in results[FIRST].layers}
    assert results["follower"].config["prune_sparsity"] == {name: row["sparsity"] for name, row in layers.items()}
    assert [(row["layer"], row["kept"]) for row in results["follower"].layers] == [
        (name, row["kept"]) for name, row in layers.items()]
    assert results["follower"].config == json.loads((store / "follower" / METRICS).read_text())["config"]
    assert (store / FIRST / MODEL).stat().st_mtime_ns <= (store / "follower" / CHECKPOINT).stat().st_mtime_ns


def test_a_finished_run_with_the_same_settings_is_skipped(tmp_path):
    runs = runs_in(tmp_path, {FIRST: SWEEP[FIRST]})
    lines = []
    first = execute(runs, progress=False, log=lines.append)
    assert not any("local cluster" in line for line in lines)  # one run to train: no cluster for it
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (tmp_path / FIRST).iterdir()}
    lines = []
    again = execute(runs, scheduler="serial", progress=False, log=lines.append)
    assert again == first
    assert lines == [f"{FIRST}: already finished in {tmp_path / FIRST}, skipped"]
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes())
            for path in (tmp_path / FIRST).iterdir()} == before


@pytest.mark.parametrize("stop_after", [2, None])
def test_a_directory_holding_a_run_with_other_settings_is_refused_naming_the_run(tmp_path, stop_after):
    train(TrainConfig(**SWEEP[FIRST]), tmp_path / FIRST, log=quiet, stop_after=stop_after)
    before = {path.name: path.read_bytes() for path in (tmp_path / FIRST).iterdir()}
    other = runs_in(tmp_path, {FIRST: dict(SWEEP[FIRST], lam=0.05)})
    with pytest.raises(RunDirectoryError, match=rf"run '{FIRST}'.*other settings.*lam 0\.03 there, 0\.05 here"):
        execute(other, scheduler="serial", progress=False, log=quiet)
    assert {path.name: path.read_bytes() for path in (tmp_path / FIRST).iterdir()} == before


def test_a_restarted_sweep_trains_no_finished_epoch_twice(tmp_path, serial):
    train(TrainConfig(**SWEEP[FIRST]), tmp_path / FIRST, log=quiet, stop_after=2)
    progress = summarize_store(tmp_path)
    assert list(progress) == [FIRST] and (progress[FIRST].epochs_done, progress[FIRST].finished) == (2, False)
    lines = []
    results = execute(runs_in(tmp_path, SWEEP), scheduler="serial", progress=False, log=lines.append)
    resumed = [line for line in lines if line.startswith(f"{FIRST}: ")]
    assert resumed[0] == f"{FIRST}: resumed from {tmp_path / FIRST / CHECKPOINT} after epoch 2"
    assert [line.split()[2] for line in resumed[1:-1]] == ["3/4", "4/4"]
    assert sum(bool(re.match(r"\S+: epoch +\d+/4 ", line)) for line in lines) == 2 + 4 * (len(SWEEP) - 1)
    assert_same_runs(results, serial, tmp_path)


def test_a_run_waits_for_another_writer_of_its_directory_then_continues_its_run(tmp_path, serial):
    train(TrainConfig(**SWEEP[FIRST]), tmp_path / FIRST, log=quiet, stop_after=1)
    runs = runs_in(tmp_path, {FIRST: SWEEP[FIRST]})
    with contextlib.ExitStack() as held:
        held.enter_context(rundir.claim(tmp_path / FIRST, "keep"))
        with pytest.raises(RunDirectoryError, match=rf"run '{FIRST}'.*another sclref process is writing"):
            execute(runs, scheduler="serial", progress=False, log=quiet, lock_wait=0)
        release = threading.Timer(1.0, held.close)
        release.start()
        lines = []
        results = execute(runs, scheduler="serial", progress=False, log=lines.append, lock_wait=30)
        release.join()
    assert lines[0].startswith(f"{FIRST}: another process is writing {tmp_path / FIRST}; waiting")
    assert lines[1] == f"{FIRST}: resumed from {tmp_path / FIRST / CHECKPOINT} after epoch 1"
    assert_same_runs(results, serial, tmp_path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow on the way to the divergence
def test_a_run_that_fails_is_named_and_the_runs_after_it_do_not_start(tmp_path):
    runs = runs_in(tmp_path, {"diverges": dict(TINY, lr=1e4), FIRST: SWEEP[FIRST]})
    with pytest.raises(RunFailedError, match="run 'diverges' failed: DivergedError") as caught:
        execute(runs, scheduler="serial", progress=False, log=quiet)
    assert isinstance(caught.value.__cause__, DivergedError)
    assert (tmp_path / "diverges" / CHECKPOINT).is_file() and not (tmp_path / FIRST).exists()


def test_a_prepare_that_raises_is_named_with_the_run(tmp_path):
    runs = [Run("a", TINY, tmp_path / "a"),
            Run("b", TINY, tmp_path / "b", depends_on=("a",), prepare=lambda config, done: done["z"])]
    with pytest.raises(RunFailedError, match="run 'b': its prepare raised KeyError: 'z'"):
        execute(runs, scheduler="serial", progress=False, log=quiet)
    assert not (tmp_path / "b").exists()


# -- refused sweeps -------------------------------------------------------------------------

def _cycle(store):
    return [Run("a", TINY, store / "a", depends_on=("b",)), Run("b", TINY, store / "b", depends_on=("a",))]


BAD_SWEEPS = {
    "two runs named alike": (lambda s: [Run("a", TINY, s / "a"), Run("a", TINY, s / "b")], "two runs are named 'a'"),
    "one directory for two runs": (lambda s: [Run("a", TINY, s / "x"), Run("b", TINY, s / "x")],
                                   "runs 'a' and 'b' share the directory"),
    "an unknown dependency": (lambda s: [Run("a", TINY, s / "a", depends_on=("z",))], r"'a' depends on \['z'\]"),
    "a cycle": (_cycle, r"runs \['a', 'b'\] form a cycle"),
    "bad settings": (lambda s: [Run("a", dict(TINY, lam=-1.0), s / "a")], "run 'a': λ must be"),
    "an unknown setting": (lambda s: [Run("a", dict(TINY, lr_decay=0.5), s / "a")], "run 'a': unknown training"),
    "bad settings from prepare": (lambda s: [Run("a", TINY, s / "a"), Run("b", TINY, s / "b", depends_on=("a",),
                                             prepare=lambda config, done: {**config, "epochs": 0})],
                                  "run 'b': epochs must be >= 1"),
}


@pytest.mark.parametrize("case", BAD_SWEEPS)
def test_a_bad_sweep_is_an_input_error_saying_what_is_wrong(tmp_path, case):
    make, message = BAD_SWEEPS[case]
    runs = make(tmp_path / "store")
    with pytest.raises(InputError, match=message):
        execute(runs, scheduler="serial", progress=False, log=quiet)
    trained = sorted(path.parent.name for path in (tmp_path / "store").rglob(MODEL))
    assert trained == (["a"] if case == "bad settings from prepare" else [])


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="cluster"), "scheduler must be None, 'serial', 'local' or a scheduler address"),
    (dict(scheduler="serial", workers=2), "workers and threads_per_worker size a local cluster"),
    (dict(scheduler="tcp://127.0.0.1:1", threads_per_worker=2), "workers and threads_per_worker size"),
    (dict(workers=0), "workers must be an integer >= 1"),
    (dict(threads_per_worker=True), "threads_per_worker must be an integer >= 1"),
    (dict(lock_wait=-1), "lock_wait must be a number of seconds >= 0"),
])
def test_bad_scheduler_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        execute(runs_in(tmp_path, {FIRST: SWEEP[FIRST]}), progress=False, log=quiet, **kwargs)
    assert not tmp_path.joinpath(FIRST).exists()


def test_without_dask_a_sweep_runs_serially_and_a_cluster_asks_for_the_extra(tmp_path, monkeypatch, serial):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    runs = runs_in(tmp_path, {FIRST: SWEEP[FIRST], "lam0.3-seed1": SWEEP["lam0.3-seed1"]})
    for scheduler in ("local", "tcp://127.0.0.1:8786"):
        with pytest.raises(SchedulerError, match=INSTALL_HINT.replace("[", r"\[").replace(".", r"\.")):
            execute(runs, scheduler=scheduler, progress=False, log=quiet)
    with pytest.raises(SchedulerError, match="needs Dask"):
        local_cluster()
    assert not any(tmp_path.iterdir())
    assert_same_runs(execute(runs, progress=False, log=quiet), serial, tmp_path)


# -- reading metrics ------------------------------------------------------------------------

def test_damaged_metrics_give_a_summary_or_an_input_error_naming_the_file(serial):
    store, _ = serial
    doc = json.loads((store / FIRST / METRICS).read_text())

    @settings(max_examples=300, deadline=None)
    @given(json_text_mutations(doc))
    def check(text):
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, METRICS).write_text(text)
            try:
                summary = read_summary(directory)
            except InputError as err:
                assert str(Path(directory, METRICS)) in str(err)
            else:
                assert isinstance(summary, RunSummary)

    check()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_counts_the_epochs_of_every_run_and_the_runs_finished(tmp_path, monkeypatch):
    runs = runs_in(tmp_path, {FIRST: SWEEP[FIRST], "long": LONG})
    total = sum(TrainConfig.from_dict(run.config).total_epochs for run in runs)
    execute(runs[:1], scheduler="serial", progress=False, log=quiet)  # one run done already: skipped, still counted
    monkeypatch.delenv("SCLREF_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    execute(runs, scheduler="serial", log=quiet)
    shown = sys.stderr.getvalue()
    assert f"{total}/{total}" in shown and "epoch" in shown and "runs 2/2" in shown


def test_a_directory_without_metrics_has_no_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics"):
        read_summary(tmp_path)


# -- Dask -----------------------------------------------------------------------------------

def test_a_local_cluster_writes_the_bytes_of_the_serial_sweep(tmp_path, serial):
    pytest.importorskip("distributed")
    lines = []
    results = execute(with_follower(tmp_path, SWEEP), scheduler="local", workers=2, progress=False,
                      log=lines.append)
    assert lines[0] == "local cluster: 2 worker(s) of 1 thread(s)"
    assert list(results) == ["follower", *SWEEP]
    assert_same_runs(results, serial, tmp_path)


def test_an_interrupted_local_cluster_is_closed_and_the_sweep_continues_where_it_stopped(tmp_path, serial):
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("distributed")
    runs = runs_in(tmp_path, {FIRST: SWEEP[FIRST], "long": LONG})

    def press_ctrl_c_after_a_checkpoint():
        deadline = time.monotonic() + 50
        while not (tmp_path / "long" / CHECKPOINT).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main()

    # interrupt_main does nothing while SIGINT is ignored, as it is in a shell's background job.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=press_ctrl_c_after_a_checkpoint)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(runs, scheduler="local", workers=1, progress=False, log=quiet)
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    workers = [child for child in psutil.Process().children(recursive=True)
               if "spawn_main" in " ".join(child.cmdline())]
    assert workers == []
    lines = []
    results = execute(runs, scheduler="serial", progress=False, log=lines.append)
    trained = sum(bool(re.match(r"\S+: epoch +\d+/\d+ ", line)) for line in lines)
    assert trained < sum(TrainConfig(**config).total_epochs for config in (SWEEP[FIRST], LONG))
    assert_same_runs(results, serial, tmp_path)


def test_a_killed_worker_is_replaced_and_its_run_resumes_from_its_checkpoint(tmp_path, serial):
    distributed = pytest.importorskip("distributed")
    runs = runs_in(tmp_path, {"long": LONG, FIRST: SWEEP[FIRST]})
    long_run = tmp_path / "long"
    killed, lines = [], []
    with local_cluster(workers=2) as cluster, distributed.Client(cluster) as client:
        assert set(client.run(lambda: __import__("numba").get_num_threads()).values()) == {1}
        assert listening_hosts() == {"127.0.0.1"}

        def kill_the_long_runs_worker():
            deadline = time.monotonic() + 50
            while not (long_run / CHECKPOINT).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            for worker, keys in client.processing().items():
                if any("long" in str(key) for key in keys):
                    pid = client.run(os.getpid, workers=[worker])[worker]
                    killed.append((long_run / MODEL).exists())
                    os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_the_long_runs_worker)
        killer.start()
        try:
            results = execute(runs, scheduler=cluster.scheduler_address, progress=False, log=lines.append)
        finally:
            killer.join()
    assert killed == [False]  # killed once, before the run had finished
    assert any(line.startswith(f"long: resumed from {long_run / CHECKPOINT} after epoch") for line in lines)
    assert_same_runs(results, serial, tmp_path)


def test_a_scheduler_that_does_not_answer_is_a_clear_error_within_seconds(tmp_path):
    pytest.importorskip("distributed")
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SchedulerError, match=f"no Dask scheduler answers at {address}"):
        execute(runs_in(tmp_path, SWEEP), scheduler=address, progress=False, log=quiet)
    assert time.monotonic() - start < 15
    assert not any(tmp_path.iterdir())


@pytest.fixture
def hand_started_cluster(tmp_path):
    """A `dask scheduler` and two `dask worker` processes on 127.0.0.1; yields the scheduler's address."""
    distributed = pytest.importorskip("distributed")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    commands = [["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"]] + [
        ["worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
         "--local-directory", str(tmp_path / f"worker{i}")] for i in range(2)]
    processes = []
    try:
        for i, command in enumerate(commands):
            with open(tmp_path / f"dask{i}.log", "wb") as output:
                processes.append(subprocess.Popen([sys.executable, "-m", "dask", *command], stdout=output,
                                                  stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                                  start_new_session=True))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group of this one process and its worker
                process.wait()


def test_a_hand_started_cluster_writes_the_bytes_of_the_serial_sweep(tmp_path, hand_started_cluster, serial):
    store = tmp_path / "store"
    results = execute(runs_in(store, SWEEP), scheduler=hand_started_cluster, progress=False, log=quiet)
    assert_same_runs(results, serial, store)
