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

The first `pinned` of a process, and the first sparse `Runtime`, also ask glibc's malloc
to keep the memory a training step or an inference call frees (`keep_freed_memory`): by
default it hands arrays of a few MiB back to the system at every free and takes them
again, page by page, at the next step (a ResNet-20 step at batch 128 returned about
300 MiB each time, 40,000 page faults that took a fifth of its CPU time).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

import threadpoolctl

__all__ = ["KEEP_FREED_BYTES", "PINNED_THREADS", "keep_freed_memory", "pinned"]

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


# Free memory glibc's malloc keeps at the top of its heap instead of returning it to the
# system: more than a training step frees (ResNet-20 at batch 128, float32: about 300 MiB),
# so that the next step reuses it, and a bound a user can live with: once the free top of
# the heap passes it, glibc returns it all, as it does by default past a few MiB.
KEEP_FREED_BYTES = 512 << 20

# Arrays up to this size come from the heap instead of a mapping of their own that each free
# unmaps. 32 MiB is the largest value glibc accepts on 64-bit systems; larger arrays are still
# mapped and unmapped one by one.
_HEAP_ARRAY_BYTES = 32 << 20

# glibc's <malloc.h>: mallopt(M_TRIM_THRESHOLD, bytes) and mallopt(M_MMAP_THRESHOLD, bytes).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_malloc_kept = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep up to `KEEP_FREED_BYTES` of freed memory for reuse; True if it did.

    Done once per process (later calls return the first answer). A no-op returning False
    off glibc (musl, macOS, Windows), where ``mallopt`` is absent or means something else.
    Setting the thresholds also turns off glibc's own adjustment of them, which otherwise
    lets them float with the sizes last freed.
    """
    global _malloc_kept
    with _lock:
        if _malloc_kept is None:
            _malloc_kept = _set_malloc_thresholds()
        return _malloc_kept


def _set_malloc_thresholds() -> bool:
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no process-wide C library to open
        return False
    # gnu_get_libc_version exists only in glibc: another libc's mallopt may take other codes.
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_ARRAY_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                     KEEP_FREED_BYTES))


def _enter() -> None:
    global _depth, _limiter
    if _malloc_kept is None:
        keep_freed_memory()
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

    The first use in a process also calls `keep_freed_memory`.

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
