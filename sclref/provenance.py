"""Provenance, gathered in one place: what decides a run's bits, and where and with what it ran.

`reproducibility` is what a checkpoint records: NumPy's BLAS (library, version, kernel
architecture), the thread count it computes with, the NumPy and numba versions and
NumPy's SIMD extensions; `resume_differences` says what of it differs here, so a resume
that would not reproduce the run is refused. `machine` is the rest, for the reader of a
report: host, CPU count, Python and package versions, thread settings, the JIT switch
and the git commit of the sclref checkout when there is one. Thread counts are never
differences: sclref's results do not depend on them (`sclref.threads`).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import threadpoolctl

from sclref import kernels, threads
from sclref._version import __version__

__all__ = ["machine", "numpy_blas", "reproducibility", "resume_differences"]


def numpy_blas() -> list[dict]:
    """threadpoolctl's entries (``internal_api``, ``version``, ``num_threads``, ...) of the BLAS NumPy computes with.

    A NumPy wheel carries its own BLAS inside its install (``numpy.libs/`` or
    ``numpy/.dylibs/``); other loaded BLAS libraries (scipy's own copy) are then not
    NumPy's. Without such a library (a conda or distribution NumPy linked to a system
    BLAS) every loaded BLAS is taken.
    """
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib.get("user_api") == "blas"]
    return [lib for lib in blas if kernels.tasks.numpy_owns(lib.get("filepath"))] or blas


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


def reproducibility() -> dict:
    """What a run must record to be reproduced bit for bit, as JSON-ready plain values.

    Returns
    -------
    dict
        ``blas``: NumPy's BLAS libraries, each ``{"internal_api", "version",
        "architecture"}`` (threadpoolctl's names; the architecture is the core type
        whose kernels the library picked, None where it does not say);
        ``blas_threads``: the thread count BLAS and OpenMP compute with inside
        `sclref.threads.pinned`; ``numpy``, ``numba``: the versions; ``numpy_simd``: the
        SIMD extensions NumPy dispatches to. Thread counts of numba and whether its JIT is
        on change no bit and are left out: they are in `machine`.
    """
    blas = [{"internal_api": lib.get("internal_api"), "version": lib.get("version"),
             "architecture": lib.get("architecture")}
            for lib in numpy_blas()]
    return {
        "blas": sorted(blas, key=lambda lib: tuple(str(v) for v in lib.values())),
        "blas_threads": threads.PINNED_THREADS,
        "numpy": np.__version__,
        "numpy_simd": _numpy_simd(),
        "numba": _version("numba"),
    }


def _describe_blas(libs) -> str:
    if not isinstance(libs, list) or not libs:
        return "none"
    return ", ".join(f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')} kernels)"
                     if isinstance(lib, dict) else repr(lib) for lib in libs)


def resume_differences(recorded: dict) -> list[str]:
    """The differences between a recorded `reproducibility` and this process's that change results.

    Compared: NumPy's BLAS libraries (library, version, kernel architecture), the NumPy
    and numba versions and NumPy's SIMD extensions (when both sides recorded them). Not
    compared, since results do not depend on them: BLAS, OpenMP and numba thread counts,
    and whether numba's JIT is on. A field the record lacks is a difference (nothing
    says it matches).

    Parameters
    ----------
    recorded : dict
        A `reproducibility` record as a run stored it (after a JSON round trip).

    Returns
    -------
    list of str
        One readable line per difference; empty when the run can be continued here
        with the same bits.
    """
    if not isinstance(recorded, dict):
        return [f"the recorded provenance is a {type(recorded).__name__}, not a mapping"]
    now = reproducibility()
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


def _git_commit() -> str | None:
    """The commit of the git checkout sclref runs from, None when it is installed from a package."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine() -> dict:
    """Where and with what sclref runs: host, CPUs, versions, thread settings, git commit (JSON-ready)."""
    return {
        "node": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "sclref": __version__,
        "git_commit": _git_commit(),
        **{pkg: _version(pkg) for pkg in ("numpy", "scipy", "numba", "threadpoolctl")},
        "threads": {var: os.environ.get(var) for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                         "OMP_NUM_THREADS")},
        "numba_threads": int(kernels.numba_threads()), "jit_disabled": bool(kernels.JIT_DISABLED),
        "reproducibility": reproducibility(),
    }
