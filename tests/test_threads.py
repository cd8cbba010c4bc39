"""Tests for sclref.threads: the BLAS pin, its nesting and restoring, products that do not
depend on the thread settings a process starts with, what a resume must refuse, and the
freed memory malloc keeps once training starts."""

import os
import pathlib
import subprocess
import sys

import pytest
import threadpoolctl

from sclref import threads

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _counts():
    """(library file, thread count) of every BLAS and OpenMP library loaded."""
    return sorted((lib["filepath"], lib["num_threads"]) for lib in threadpoolctl.threadpool_info())


@pytest.fixture
def two_threads():
    """Every thread pool at two threads during the test (so a pin to one can be seen)."""
    with threadpoolctl.threadpool_limits(limits=2):
        before = _counts()
        if not before or all(n < 2 for _, n in before):
            pytest.skip("no BLAS or OpenMP library here runs on two threads")
        yield before


def test_pinned_limits_every_pool_to_one_thread_and_restores_it(two_threads):
    with threads.pinned():
        inside = _counts()
    assert [path for path, _ in inside] == [path for path, _ in two_threads]
    assert all(n == threads.PINNED_THREADS == 1 for _, n in inside)
    assert _counts() == two_threads


def test_nested_pins_keep_the_limit_until_the_outermost_exits(two_threads):
    with threads.pinned():
        with threads.pinned():
            assert all(n == 1 for _, n in _counts())
        assert all(n == 1 for _, n in _counts())
    assert _counts() == two_threads


def test_pinned_restores_the_limits_on_an_exception(two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with threads.pinned():
            with threads.pinned():
                raise RuntimeError("inside the pin")
    assert _counts() == two_threads
    with threads.pinned():  # the nesting count was unwound too: a new pin limits again
        assert all(n == 1 for _, n in _counts())
    assert _counts() == two_threads


def test_pinned_works_as_a_decorator(two_threads):
    @threads.pinned()
    def counts():
        return _counts()

    assert all(n == 1 for _, n in counts())
    assert _counts() == two_threads


# The shapes of LeNet training whose products differ between one and two OpenBLAS threads
# (measured with OpenBLAS 0.3.31 on Haswell), and a convolution, whose kernels call BLAS.
_PRODUCTS_SCRIPT = """
import sys
import numpy as np
from sclref import threads
from sclref.kernels import conv2d_fwd

gen = np.random.default_rng(0)
cases = [((128, 784), (784, 300), np.float32), ((128, 300), (300, 100), np.float32),
         ((300, 128), (128, 784), np.float32), ((128, 784), (784, 300), np.float64),
         ((784, 128), (128, 300), np.float64)]
pairs = [(gen.standard_normal(a).astype(t), gen.standard_normal(b).astype(t)) for a, b, t in cases]
x = gen.standard_normal((64, 6, 12, 12)).astype(np.float32)
w = gen.standard_normal((16, 6, 5, 5)).astype(np.float32)
with threads.pinned():
    results = [a @ b for a, b in pairs]
    conv = np.empty((64, 16, 8, 8), np.float32)
    conv2d_fwd(x, w, 1, 1, 0, 0, conv)
with open(sys.argv[1], "wb") as f:
    for r in results + [conv]:
        f.write(r.tobytes())
"""


def _products(tmp_path, name, blas_threads):
    path = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if blas_threads is not None:
        env.update(OPENBLAS_NUM_THREADS=str(blas_threads), OMP_NUM_THREADS=str(blas_threads))
    subprocess.run([sys.executable, "-c", _PRODUCTS_SCRIPT, str(path)], env=env, cwd=_REPO, check=True, timeout=300)
    return path.read_bytes()


def test_products_under_pinned_do_not_depend_on_the_threads_a_process_starts_with(tmp_path):
    one = _products(tmp_path, "one", 1)
    assert len(one) > 0
    assert _products(tmp_path, "two", 2) == one
    assert _products(tmp_path, "default", None) == one


# Eight 8 MiB arrays made and freed, in a fresh process, after its first pin (as a training
# epoch starts) or without one: the resident size they leave behind, in MiB.
_FREED_SCRIPT = """
import sys
import numpy as np
from sclref import threads

def resident_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

if sys.argv[1] == "pinned":
    with threads.pinned():
        pass
arrays = [np.ones(8 << 20, np.uint8) for _ in range(8)]
held = resident_mib()
del arrays
print(threads.keep_freed_memory() if sys.argv[1] == "pinned" else None, held - resident_mib())
"""


def _freed(mode):
    done = subprocess.run([sys.executable, "-c", _FREED_SCRIPT, mode], cwd=_REPO, check=True, timeout=300,
                          capture_output=True, text=True)
    kept, returned = done.stdout.split()
    return kept, float(returned)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_memory_a_training_step_frees_is_kept_for_the_next_one_on_glibc():
    kept, returned = _freed("pinned")
    if kept != "True":
        pytest.skip("not glibc: malloc's thresholds are left alone")
    assert returned < 8  # at most one of the 64 MiB freed went back to the system
    _, returned_by_default = _freed("default")
    assert returned_by_default > 48  # glibc's defaults hand most of it back at once
