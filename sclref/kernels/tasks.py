"""Run independent tasks of a fixed partition on numba's thread count of threads, the caller's included.

sclref's training kernels (conv chunks, batch norm's channels, pooling and elementwise
ranges) get their second core here rather than from BLAS's or numba's parallel loops:
every thread takes the next task not yet taken, so a thread a busy core starts late is
never waited for, and each task owns its outputs, so results do not depend on how many
threads ran them. A pool thread that a busy core stops in the middle of a task is waited
for, though: when that made several calls in a row slower than the caller alone would
have been, the calls of the next `SERIAL_SECONDS` run on the caller's thread only.
"""

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import threadpoolctl

from sclref.kernels._jit import JIT_DISABLED, PARALLEL

__all__ = ["LOSSES_TO_PAUSE", "SERIAL_SECONDS", "SPLIT_BYTES", "numpy_owns", "run_ranges", "run_tasks", "threads_for"]

# Data below which `run_ranges` runs a kernel in one piece. These kernels are bound by
# memory, which two cores share, and waking a thread costs tens of microseconds: at 256 KiB
# the LeNet-300-100 SCL step (its masked weights' passes split) took 8.0 ms on 2 threads
# against 5.6 ms on 1, and 6.0 / 5.3 ms at 4 / 32 MiB. At 8 MiB none of LeNet's arrays
# split, and a ResNet-20 step at batch 128 still splits every activation of its first two
# stages.
SPLIT_BYTES = 8 << 20

# How long `run_tasks` runs every call serially once pool threads made `LOSSES_TO_PAUSE`
# calls in a row slower than serial (a competing load holds the other cores); then it tries
# threads again. Measured on ResNet-20 steps at batch 128 under a load of 3 to 5 on two
# cores: 2 threads took 1.4-2.2x as long as 1 without a pause, 1.1-1.6x with a 1 s pause and
# 0.85-1.05x with 5 s. One losing call is not enough: on a quiet machine a pool thread is
# sometimes held up once (about one call in a thousand of a ResNet-20 step), and a pause
# on every such blip cost a third of the second core's gain; under a load nearly every
# call loses.
SERIAL_SECONDS = 5.0
LOSSES_TO_PAUSE = 3
_serial_until = 0.0
_losses = 0

# A wait this long is a pool thread held up by another process (the scheduler hands out
# cores for milliseconds), not a thread waking up (tens of microseconds on an idle core).
_LATE_SECONDS = 1e-3

# Pool threads for `run_tasks`, started on first use; a thread of the pool runs nested
# calls serially (it must never wait for tasks queued behind itself).
_executor = None
_executor_lock = threading.Lock()
_in_pool = threading.local()

# The BLAS libraries loaded with NumPy, whose thread counts `threads_for` reads (finding
# them walks every loaded library, so it is done once).
_blas = None


def _mark_pool_thread():
    _in_pool.active = True


def _forget_pool():
    # A forked child has the parent's pool object but none of its threads.
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_pool)


def _pool():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1), "sclref-kernels",
                                           initializer=_mark_pool_thread)
        return _executor


def numpy_owns(filepath) -> bool:
    """Whether the native library at `filepath` ships inside NumPy's install (``numpy.libs/`` or ``numpy/``).

    A NumPy wheel carries its own BLAS; other BLAS libraries a process loads (scipy's own
    copy, say) are not the one ``np.matmul`` calls.
    """
    package = os.path.dirname(os.path.abspath(np.__file__))
    own = (os.path.join(os.path.dirname(package), "numpy.libs") + os.sep, package + os.sep)
    return os.path.abspath(filepath or "").startswith(own)


def _blas_threads():
    # NumPy's BLAS only: scipy loads a BLAS of its own in the middle of a run, after the
    # epoch's pin was set, and np.matmul never calls it. Without a BLAS inside NumPy's
    # install (a NumPy linked to a system BLAS) every loaded BLAS is taken.
    global _blas
    if _blas is None:
        found = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        _blas = [lib for lib in found if numpy_owns(lib.filepath)] or found
    return max((lib.get_num_threads() for lib in _blas), default=1)


def threads_for(tasks, blas=False):
    """Threads to run `tasks` independent tasks on: numba's thread count, at most one per task.

    One thread with the JIT off (interpreted loops hold the GIL), inside a thread of the
    pool, and, for tasks that call BLAS (``blas=True``), while BLAS has threads of its
    own: they would compete for the cores.
    """
    if tasks < 2 or JIT_DISABLED or getattr(_in_pool, "active", False):
        return 1
    threads = min(numba.get_num_threads(), tasks)
    if threads > 1 and blas and _blas_threads() > 1:
        return 1
    return threads


class _Job:
    """Tasks 0 .. count-1, each taken by the first thread that asks for the next one."""

    def __init__(self, count, run):
        self.count, self.run = count, run
        self.take = itertools.count().__next__  # atomic under the GIL
        self.left = count
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.error = None

    def drain(self, slot):
        """Run tasks until none is left to take; returns how many this thread ran."""
        ran = 0
        while (i := self.take()) < self.count:
            ran += 1
            try:
                if self.error is None:
                    self.run(i, slot)
            except BaseException as exc:  # re-raised by the caller of run_tasks
                self.error = self.error or exc
            with self.lock:
                self.left -= 1
                if not self.left:
                    self.finished.set()
        return ran


def run_tasks(count, run, threads):
    """Call ``run(i, slot)`` for every i in range(count), on `threads` threads (the caller's included).

    Tasks must be independent: each writes outputs no other task touches. `slot` in
    [0, threads) names the thread running the task, to index its scratch. Every thread
    takes the next task not yet taken, and the call returns when every task is done: a
    pool thread that starts late (on a busy machine) finds the tasks taken by the others
    and is never waited for. The first exception raised by a task is re-raised here.
    Calls run serially for `SERIAL_SECONDS` after `LOSSES_TO_PAUSE` calls in a row that
    each waited over a millisecond for a pool thread and so took longer than the caller
    would have alone.
    """
    global _serial_until, _losses
    if threads <= 1 or count <= 1 or time.monotonic() < _serial_until:
        for i in range(count):
            run(i, 0)
        return
    job = _Job(count, run)
    pool = _pool()
    for slot in range(1, threads):
        pool.submit(job.drain, slot)
    start = time.perf_counter()
    ran = job.drain(0)
    busy = time.perf_counter() - start
    job.finished.wait()
    waited = time.perf_counter() - start - busy
    # The caller alone would have taken about busy * count / ran; threads lost once the wait
    # for the others passed that less the busy time. A caller that ran nothing learns nothing.
    if ran:
        lost = waited > max(busy * (count - ran) / ran, _LATE_SECONDS)
        _losses = _losses + 1 if lost else 0
        if _losses >= LOSSES_TO_PAUSE:
            _serial_until, _losses = time.monotonic() + SERIAL_SECONDS, 0
    if job.error is not None:
        raise job.error


def run_ranges(n, nbytes, run):
    """Call ``run(a, b)`` on consecutive ranges [a, b) that together cover range(n), several at once.

    For kernels whose outputs split along a leading axis of length `n` (images, planes,
    elements) and whose results do not depend on where it is cut. Below `SPLIT_BYTES` of
    data (`nbytes`) the call runs whole, as waking a thread would cost more than it saves;
    so does every call while ``SCLREF_NUMBA_PARALLEL=1`` has the kernels' own loops in
    parallel. Otherwise the axis is cut into a few ranges per thread, so that a late
    thread leaves its share to the others.
    """
    threads = 1 if PARALLEL or nbytes < SPLIT_BYTES else threads_for(n)
    if threads == 1:
        run(0, n)
        return
    parts = min(n, 4 * threads)
    run_tasks(parts, lambda i, slot: run(i * n // parts, (i + 1) * n // parts), threads)
