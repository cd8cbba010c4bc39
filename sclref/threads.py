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

What does change bits from one machine to another is recorded by `provenance`, and
`resume_differences` tells whether a run recorded elsewhere can be continued here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import threadpoolctl

from sclref import kernels

__all__ = ["PINNED_THREADS", "pinned", "provenance", "resume_differences"]

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


def _numpy_blas(info: list[dict]) -> list[dict]:
    """The BLAS entries of threadpoolctl's `info` that NumPy computes with.

    A NumPy wheel carries its own BLAS inside its install (``numpy.libs/`` or
    ``numpy/.dylibs/``); other loaded BLAS libraries (scipy's own copy) are then not
    NumPy's. Without such a library (a conda or distribution NumPy linked to a system
    BLAS) every loaded BLAS is taken.
    """
    blas = [lib for lib in info if lib.get("user_api") == "blas"]
    package = os.path.dirname(os.path.abspath(np.__file__))
    own = (os.path.join(os.path.dirname(package), "numpy.libs") + os.sep, package + os.sep)
    inside = [lib for lib in blas if os.path.abspath(lib.get("filepath") or "").startswith(own)]
    return inside or blas


def _numpy_simd() -> list[str] | None:
    """The SIMD extensions NumPy dispatches to on this CPU (None when NumPy does not say).

    Some of NumPy's loops (exp, log, tanh, sums) have one implementation per extension,
    and they do not all round alike.
    """
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return None
    return sorted(f for f in __cpu_dispatch__ if __cpu_features__.get(f))


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def provenance() -> dict:
    """What a run must record to be reproduced bit for bit, as JSON-ready plain values.

    Returns
    -------
    dict
        ``blas``: NumPy's BLAS libraries, each ``{"internal_api", "version",
        "architecture"}`` (threadpoolctl's names; the architecture is the core type
        whose kernels the library picked, None where it does not say);
        ``blas_threads``: the thread count BLAS and OpenMP compute with inside `pinned`;
        ``numpy``, ``numba``: the versions; ``numpy_simd``: the SIMD extensions NumPy
        dispatches to; ``numba_threads``, ``jit_disabled``: numba's settings, recorded
        for the reader (they do not change results).
    """
    blas = [{"internal_api": lib.get("internal_api"), "version": lib.get("version"),
             "architecture": lib.get("architecture")}
            for lib in _numpy_blas(threadpoolctl.threadpool_info())]
    return {
        "blas": sorted(blas, key=lambda lib: tuple(str(v) for v in lib.values())),
        "blas_threads": PINNED_THREADS,
        "numpy": np.__version__,
        "numpy_simd": _numpy_simd(),
        "numba": _version("numba"),
        "numba_threads": int(kernels.numba_threads()),
        "jit_disabled": bool(kernels.JIT_DISABLED),
    }


def _describe_blas(libs) -> str:
    if not isinstance(libs, list) or not libs:
        return "none"
    return ", ".join(f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')} kernels)"
                     if isinstance(lib, dict) else repr(lib) for lib in libs)


def resume_differences(recorded: dict) -> list[str]:
    """The differences between a recorded `provenance` and this process's that change results.

    Compared: NumPy's BLAS libraries (library, version, kernel architecture), the NumPy
    and numba versions and NumPy's SIMD extensions (when both sides recorded them). Not
    compared, since results do not depend on them: BLAS, OpenMP and numba thread counts,
    and whether numba's JIT is on. A field the record lacks is a difference (nothing
    says it matches).

    Parameters
    ----------
    recorded : dict
        A `provenance` as a run stored it (after a JSON round trip).

    Returns
    -------
    list of str
        One readable line per difference; empty when the run can be continued here
        with the same bits.
    """
    if not isinstance(recorded, dict):
        return [f"the recorded provenance is a {type(recorded).__name__}, not a mapping"]
    now = provenance()
    found = []
    if "blas" not in recorded:
        found.append("BLAS: not recorded")
    elif recorded["blas"] != now["blas"]:
        found.append(f"BLAS: recorded {_describe_blas(recorded['blas'])}, now {_describe_blas(now['blas'])}")
    for key, name in (("numpy", "NumPy version"), ("numba", "numba version")):
        if key not in recorded:
            found.append(f"{name}: not recorded")
        elif recorded[key] != now[key]:
            found.append(f"{name}: recorded {recorded[key]}, now {now[key]}")
    simd = recorded.get("numpy_simd")
    if simd is not None and now["numpy_simd"] is not None and simd != now["numpy_simd"]:
        found.append(f"NumPy SIMD extensions: recorded {simd}, now {now['numpy_simd']}")
    return found
