"""Shared benchmark plumbing: thread set-up, timing in worker processes, machine facts, JSON output.

Every speed figure is a ratio against a peer timed in the same run: the two are run
alternately after a warm-up and the medians are compared (see shared benchmark rules).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path


def set_threads(n: int) -> None:
    """Fix BLAS, numba and torch thread counts; call before numpy is first imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def torch_or_none(threads: int):
    """PyTorch with `threads` intra-op threads, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def _rss_kib(field: str) -> int | None:
    """A VmRSS/VmHWM line of /proc/self/status in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    # Linux resets the high-water mark VmHWM to the current RSS on "5" (proc(5), clear_refs).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def warm_up(fn, seconds: float) -> None:
    """Call `fn` untimed for `seconds` (see `samples_in_workers`' `warm`)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        fn()


def _worker(conn, build, args, warm: float = 0.0):
    # Runs in its own process: build the workload once, then time blocks of calls on request,
    # each block after `warm` seconds of untimed calls (see `samples_in_workers`).

    from sclref.sparse.bench import call_times

    step = build(*args)
    first = step()  # the first call's result, for a same-work check
    # Memory a call needs on top of what stays between calls (the model, optimizer
    # state, compiled code): the peak from here on less the resident size now. Taken
    # after the first call, so one-off costs (JIT compilation, lazy state) are not counted.
    base = _rss_kib("VmRSS")
    _reset_peak_rss()
    conn.send(first)
    while True:
        count = conn.recv()
        if not count:
            break
        warm_up(step, warm)
        conn.send(call_times(step, count))
    peak = _rss_kib("VmHWM")
    usage = None if base is None or peak is None else {"resident_mib": base / 1024,
                                                       "step_peak_mib": (peak - base) / 1024}
    conn.send(usage)
    conn.close()


def _recv(name: str, proc, conn):
    """The worker's next message; a clear error instead of a hang when the worker died."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"benchmark worker {name!r} died (exit code {proc.exitcode}); its traceback is above")
    return conn.recv()


def gemm_gflops(dtype="float32", n: int = 1024, reps: int = 10) -> float:
    """Measured GFLOP/s of an n x n matrix product through NumPy's BLAS."""
    import numpy as np

    from sclref.sparse.bench import median_times

    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = a.T.copy()
    secs = median_times({"gemm": lambda: a @ b}, reps)["gemm"]
    return 2 * n**3 / secs / 1e9


def machine() -> dict:
    """Where and with what a benchmark ran: sclref's record of the machine, plus thread pools and torch."""
    from sclref import provenance

    info = provenance.machine()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` atomically (temp file + rename), as sclref writes every file."""
    from sclref.storage import atomic_write_json

    atomic_write_json(path, payload)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def threads_from_argv(default: int = 2) -> int:
    """Read --threads N before numpy is imported (it fixes BLAS threads at import)."""
    argv = sys.argv
    if "--threads" in argv:
        return int(argv[argv.index("--threads") + 1])
    return default


@contextlib.contextmanager
def competing_load(n: int = 2):
    """Run the body beside `n` busy Python processes (each an endless loop), killed on exit.

    The load of a shared machine (CI, notebooks, servers), started by the benchmark
    itself so that "under load" means the same thing on every run.
    """
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # until they run
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def quantiles(samples) -> dict:
    """Median and 90th percentile (seconds) of a list of timings."""
    import numpy as np

    return {"median": float(np.median(samples)), "p90": float(np.quantile(samples, 0.9))}


def samples_in_workers(builders: dict, reps: int, block: int = 5, pause: float = 0.05, phases=None,
                       memory: bool = False, warm: float = 0.0):
    """Every timed call of each workload, each in its own process, taken in turn, in one or more phases.

    `builders` maps a name to ``(build, args)``: ``build(*args)`` runs in a fresh process
    and returns a zero-argument callable. Separate processes keep the thread pools of
    different engines (OpenBLAS, numba, PyTorch's OpenMP) from fighting over the cores;
    the workloads take turns in blocks of `block` calls, with a `pause` between turns so
    the threads of the one that just ran stop spinning before the other starts.
    `phases` maps a phase name to a zero-argument factory of the context manager the
    phase runs in (e.g. ``{"quiet": contextlib.nullcontext, "load": competing_load}``;
    default: one phase "quiet"); the workers are built once and timed in every phase,
    each phase starting with a warm-up block. With `warm` > 0 every block is preceded by
    that many seconds of untimed calls: after the pause this 2-vCPU machine runs slowly for
    a few milliseconds (a 0.25 ms sparse call took 0.87 ms first, then 0.47, 0.40, ...,
    0.21 ms ten calls later, against 0.18 ms in a steady loop), which a block of short
    calls would otherwise report as their speed. Returns ``({phase: {name: [seconds, ...]}},
    {name: first result})``, and with `memory` also each workload's memory: the resident
    size after its first call and the peak the later calls added on top (MiB, from the
    kernel's high-water mark; Linux only).
    """
    samples, first, mem = _run_in_workers(builders, reps, block, pause, phases or {"quiet": contextlib.nullcontext},
                                          warm)
    return (samples, first, mem) if memory else (samples, first)


def _run_in_workers(builders: dict, reps: int, block: int, pause: float, phases: dict, warm: float):
    """The timing loop of `samples_in_workers`: (samples by phase, first results, memory)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers, first, mem = {}, {}, {}
    samples = {phase: {name: [] for name in builders} for phase in phases}
    try:
        for name, (build, args) in builders.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, build, args, warm), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
        for name, (proc, conn) in workers.items():
            first[name] = _recv(name, proc, conn)
        for phase, during in phases.items():
            with during():
                for turn in range(1 + -(-reps // block)):
                    for name, (proc, conn) in workers.items():
                        time.sleep(pause)
                        conn.send(block)
                        times = _recv(name, proc, conn)
                        if turn:
                            samples[phase][name] += times
        for name, (proc, conn) in workers.items():
            conn.send(0)
            mem[name] = _recv(name, proc, conn)
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    conn.send(0)
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return samples, first, mem
