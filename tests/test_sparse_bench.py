"""The measuring parts of `sclref bench` that need no clock: break-even search, medians, the report."""

import pytest

from sclref.errors import InputError, LimitError
from sclref.sparse import bench


def test_break_even_is_interpolated_between_the_grid_points_around_the_crossing():
    timed = []

    def secs(density):  # a kernel whose time grows linearly with density
        timed.append(density)
        return 10 * density

    assert bench.break_even_density(2.5, secs, grid=(0.1, 0.2, 0.3, 0.5)) == pytest.approx(0.25)
    assert timed == [0.1, 0.2, 0.3]  # stops at the first density as slow as dense
    assert bench.break_even_density(0.5, secs, grid=(0.1, 0.2)) == 0.1  # slower already at the first
    assert bench.break_even_density(100.0, secs, grid=(0.1, 0.2)) is None  # sparse always faster


def test_median_times_calls_each_function_in_turn_and_takes_medians(monkeypatch):
    clock, calls = [0.0], []

    def costs(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds.pop(0) if seconds else 1.0
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    medians = bench.median_times({"a": costs("a", [9.0, 2.0, 2.0, 7.0]), "b": costs("b", [9.0, 3.0, 5.0, 4.0])},
                                 reps=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, alternating
    assert medians == {"a": 2.0, "b": 4.0}  # the warm-up call (9 s) is not counted


def test_the_copy_probe_moves_the_bytes_it_counts(monkeypatch):
    copied = []
    monkeypatch.setattr(bench.np, "copyto", lambda dst, src: copied.append((dst.nbytes, src.nbytes, dst is src)))
    call, moved = bench.copy_probe(megabytes=3)
    assert not copied  # nothing copied until called
    call()
    assert copied == [(3 << 20, 3 << 20, False)] and moved == 2 * (3 << 20)  # read once, written once


def test_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    monkeypatch.setattr(bench, "median_times", lambda fns, reps, warmup: {name: 0.5 for name in fns})
    assert bench.bandwidth(megabytes=2) == 2 * 2 * (1 << 20) / 0.5


def test_report_shows_every_layer_batch_and_ratio():
    us = 1e-6
    result = {
        "bandwidth_bytes_per_s": 25e9, "dtype": "float32", "torch": None, "floor_batch1_s": 1.5 * us,
        "layers": [{"layer": "fc1", "kind": "linear", "shape": [300, 784], "nnz": 4704, "density": 0.02,
                    "bytes_dense": 940800, "bytes_csr": 38836, "floor_batch1_s": 1.5 * us,
                    "batches": {"1": {"dense": 20 * us, "scipy": 12 * us, "sclref": 3 * us},
                                "256": {"dense": 400 * us, "scipy": 300 * us, "sclref": 50 * us}},
                    "break_even_density": {"1": 0.25, "256": None}}],
        "network": {"1": {"dense": 30 * us, "scipy": 20 * us, "sclref": 4.5 * us, "auto": 4.5 * us},
                    "256": {"dense": 600 * us, "scipy": 310 * us, "sclref": 50 * us, "auto": 50 * us}},
    }
    report = bench.format_report(result)
    assert "copy bandwidth 25.0 GB/s, float32" in report
    assert "| fc1 | 300x784 | 2.00% | 1 | 20.0 | 12.0 | 3.0 | n/a | 6.7x | 4.0x | 25.0% |" in report
    assert "| fc1 | 300x784 | 2.00% | 256 | 400.0 | 300.0 | 50.0 | n/a | 8.0x | 6.0x | - |" in report
    assert "| fc1 | 940,800 | 38,836 | 1.50 | 3.0 | 2.0x |" in report
    assert "| 1 | 30.0 | 20.0 | 4.5 | 4.5 | 6.7x | 4.4x | 1.50 | 3.0x |" in report
    assert "| 256 | 600.0 | 310.0 | 50.0 | 50.0 | 12.0x | 6.2x | - | - |" in report


def _tiny_network():
    import numpy as np
    import scipy.sparse as sp

    from sclref.sparse import Linear, SparseNetwork

    w = sp.csr_array(np.eye(4, 16))
    w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(4, 16))
    return SparseNetwork([Linear("fc", w, np.zeros(4))], np.dtype(np.float64))


@pytest.mark.parametrize("batches, reps, message", [
    ((1, 0), 5, r"a batch size must be an integer in \[1, 1,048,576\], got 0"),
    ((10**12,), 5, r"a batch size .* got 1000000000000"),
    ((True,), 5, r"a batch size .* got True"),
    (tuple(range(1, 18)), 5, r"give 1 to 16 batch sizes, got 17"),
    ((), 5, r"give 1 to 16 batch sizes, got 0"),
    ((1,), 0, r"reps must be an integer in \[1, 10,000\], got 0"),
    ((1,), 10**9, r"reps must be .* got 1000000000"),
])
def test_counts_outside_their_bounds_are_refused(batches, reps, message):
    with pytest.raises(InputError, match=message):
        bench.bench(_tiny_network(), batches, reps)


def test_a_batch_beyond_the_memory_limit_is_refused_before_any_timing(monkeypatch):
    network = _tiny_network()
    assert bench.check_counts(network, [1, 64], 5) == (1, 64)
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 16))
    with pytest.raises(LimitError, match=r"a batch of 5000 inputs of shape \[16\]"):
        bench.bench(network, (1, 5000), 5)  # 5000 x 16 float32 inputs: 320,000 bytes


@pytest.mark.parametrize("batch", [1, 13])
def test_a_convolution_row_times_the_layout_a_network_runs_it_in_at_that_batch(batch):
    import numpy as np
    import scipy.sparse as sp

    from sclref.sparse import Conv2d, Runtime, SparseNetwork
    from sclref.sparse.runtime import CHWN_FROM

    gen = np.random.default_rng(3)
    w = sp.random_array((4, 3 * 9), density=0.3, format="csr", rng=gen)
    w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=w.shape)
    w.sort_indices()
    layer = Conv2d("conv", w, gen.standard_normal(4), in_channels=3, kernel_size=(3, 3), stride=(2, 2),
                   padding=(1, 1))
    run = Runtime(SparseNetwork([layer], np.dtype(np.float64), input_shape=(3, 9, 9)), np.float32, "sclref")
    x = gen.standard_normal((batch, 3, 9, 9)).astype(np.float32)
    got, want = bench._fns(run, layer, x, None)["sclref"](), run.conv2d("conv", x, "sclref")
    if batch >= CHWN_FROM:
        assert got.shape == (4, 5, 5, batch)  # CHWN: the batch innermost
        got = got.transpose(3, 0, 1, 2)
    np.testing.assert_array_equal(got, want)
