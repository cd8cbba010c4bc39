"""Decide, in one place, how every sclref kernel is compiled by numba.

* nopython mode, ``fastmath`` off: floating-point operations run in source order,
  so results are exact to the stated algorithm and reproducible.
* ``cache=True`` only with ``SCLREF_NUMBA_CACHE=1``: numba's on-disk cache fails on
  read-only installs, so it is opt-in.
* `pjit` loops (`prange`) run in parallel only with ``SCLREF_NUMBA_PARALLEL=1``.
  Each parallel iteration owns a disjoint slice of the output, so both modes give
  bit-identical results. Serial is the default because the kernels alternate with
  NumPy's multithreaded BLAS: its idle worker threads keep spinning for a while
  after every matrix product, and numba's OpenMP workers after every parallel loop,
  so the two pools steal each other's cores. Measured on two cores, a parallel
  im2col right after a GEMM was no faster than the serial one (3x slower with
  numba's default OpenMP layer) and GEMMs right after parallel loops took twice as
  long. Parallel mode is for machines where that contention does not arise (many
  cores, or BLAS threads that sleep promptly); measure before enabling it.
* ``NUMBA_DISABLE_JIT=1`` is honoured by numba itself: the decorators return the
  Python functions unchanged and `prange` behaves as `range`, so every kernel still
  runs, slowly, and gives the same bits as jitted. For that, a kernel's accumulators
  and constants take the arrays' dtype (``zero = out.dtype.type(0)``, scalars rounded
  by the caller), never a Python float: ``0.0`` is float64 to numba but adopts float32
  under NumPy 2's rules when interpreted.
"""

import os

import numba

__all__ = ["CACHE", "JIT_DISABLED", "PARALLEL", "compiled", "jit", "num_threads", "numba_threads", "pjit", "prange",
           "set_numba_threads"]

JIT_DISABLED = bool(numba.config.DISABLE_JIT)
CACHE = os.environ.get("SCLREF_NUMBA_CACHE") == "1"
PARALLEL = os.environ.get("SCLREF_NUMBA_PARALLEL") == "1"

# error_model="numpy": integer division by a stride needs no Python exception check
# (the caller validates strides), and that check would block vectorization.
_FLAGS = {"nopython": True, "nogil": True, "fastmath": False, "cache": CACHE, "error_model": "numpy"}

prange = numba.prange


def _decorate(fn, **extra):
    compile_ = numba.jit(**_FLAGS, **extra)
    return compile_ if fn is None else compile_(fn)


def jit(fn=None):
    """Compile `fn` as a serial nopython kernel; use as ``@jit`` or ``@jit()``."""
    return _decorate(fn)


def pjit(fn=None):
    """Compile `fn` as a kernel whose `prange` loops may run in parallel (see module doc)."""
    return _decorate(fn, parallel=PARALLEL)


def compiled(kernel, *args):
    """`kernel` compiled for arguments of exactly the types of `args`, called without numba's dispatch.

    The dispatch types every argument on every call (70-120 ns per array: a tenth of a
    sparse chain's call at batch 1). The compiled code trusts what it is given: an array
    of another dtype, dimension count or layout is misread, not refused, so a caller
    passes only arguments of the types of `args`. With the JIT off, `kernel` itself.
    """
    if JIT_DISABLED:
        return kernel
    return kernel.compile(tuple(numba.typeof(a) for a in args))


def numba_threads():
    """Threads in numba's pool: what a kernel compiled with parallel loops may use."""
    return numba.get_num_threads()


def set_numba_threads(threads: int) -> None:
    """Let numba's pool and sclref's task runner use `threads` threads (at most the pool's size)."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def num_threads():
    """Threads available to parallel kernels (1 when parallel mode is off)."""
    return numba_threads() if PARALLEL and not JIT_DISABLED else 1
