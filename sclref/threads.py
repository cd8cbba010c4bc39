"""Decide how many threads native libraries may use while sclref computes, so that results do
not depend on the machine's thread settings.

OpenBLAS cuts a matrix product into blocks by its thread count, and blocks of other
shapes are computed by other micro-kernels whose sums round differently: with OpenBLAS
0.3.31 on Haswell, ``(128, 784) @ (784, 300)`` in float32 gives other bits on 2 threads
than on 1, and so do many other products of LeNet training, in float32 and float64.
So while sclref computes, BLAS and OpenMP run on one thread (`pinned`), whatever
``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` the process was started with.

numba's threads are left alone: sclref's parallel kernels split their outputs, never a
sum, so their bits do not depend on numba's thread count, nor on whether the JIT is on
(``NUMBA_DISABLE_JIT=1``); ``tests/test_kernels.py`` holds them to that.

What does change bits from one machine to another is recorded by `sclref.provenance`.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import threadpoolctl

__all__ = ["PINNED_THREADS", "pinned"]

# The thread count of BLAS and OpenMP inside `pinned`.
PINNED_THREADS = 1

# One pin for the whole process (BLAS thread counts are process-wide): the outermost
# `pinned` sets it, nested ones only count, and the last one out restores it.
_lock = threading.Lock()
_depth = 0
_limiter = None

# Finding the native libraries walks every loaded shared object (1.6 ms in a process that
# has imported sclref), too slow for every training step, so the controller is kept.
# Native libraries arrive with imports (numpy's BLAS, scipy's, torch's OpenMP), so it is
# built again whenever a module was imported since.
_controller = None
_modules_seen = -1


def _current_controller() -> threadpoolctl.ThreadpoolController:
    global _controller, _modules_seen
    if _controller is None or len(sys.modules) != _modules_seen:
        _controller = threadpoolctl.ThreadpoolController()
        _modules_seen = len(sys.modules)
    return _controller


def _enter() -> None:
    global _depth, _limiter
    with _lock:
        if _depth == 0:
            _limiter = _current_controller().limit(limits=PINNED_THREADS)
        _depth += 1


def _exit() -> None:
    global _depth, _limiter
    with _lock:
        _depth -= 1
        if _depth == 0:
            limiter, _limiter = _limiter, None
            limiter.restore_original_limits()


@contextlib.contextmanager
def pinned():
    """Run the body with BLAS and OpenMP limited to one thread; restore their limits after.

    Re-entrant: nested (or concurrent) uses share the outermost one's limit, which is
    restored when the last of them exits, also on an exception. A nested entry costs a
    counter increment; the outermost costs about 20 µs.

    Examples
    --------
    >>> import numpy as np
    >>> from sclref import threads
    >>> a = np.ones((4, 3), np.float32)
    >>> with threads.pinned():
    ...     y = a @ a.T        # same bits whatever OPENBLAS_NUM_THREADS is
    """
    _enter()
    try:
        yield
    finally:
        _exit()
