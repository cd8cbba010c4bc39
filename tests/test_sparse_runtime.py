"""The runtime's plans: chains of sclref layers mixed with scipy and dense layers, reused scratch, threads."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp

from sclref import kernels
from sclref.sparse import Activation, Flatten, Linear, Runtime, SparseNetwork


def _network():
    gen = np.random.default_rng(0)
    sizes = [(2, 3, 5), 40, 24, 7]
    layers = [Flatten("flatten")]
    for i, (k, f) in enumerate(zip([30] + sizes[1:-1], sizes[1:])):
        w = sp.random_array((f, k), density=0.3, format="csr", rng=gen)
        w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(f, k))
        w.sort_indices()
        layers.append(Linear(f"fc{i}", w, gen.standard_normal(f)))
        if i == 0:
            layers.append(Activation("relu1", "relu"))
        elif i == 1:
            layers.append(Activation("leaky", "leaky_relu", 0.1))
    return SparseNetwork(layers, np.dtype(np.float64), input_shape=sizes[0])


def _expected(network, x):
    h = x.reshape(len(x), -1)
    for layer in network.layers:
        if isinstance(layer, Linear):
            h = h @ layer.weight.toarray().T + layer.bias
        elif layer.kind == "relu":
            h = np.maximum(h, 0)
        elif layer.kind == "leaky_relu":
            h = np.where(h > 0, h, layer.alpha * h)
    return h


@pytest.mark.parametrize("batch", [1, 5, 300] if not kernels.JIT_DISABLED else [1, 5])
def test_every_mix_of_backends_gives_the_masked_output(batch):
    network = _network()
    x = np.random.default_rng(1).standard_normal((batch, 2, 3, 5))
    want = _expected(network, x)
    for combo in itertools.product(["sclref", "scipy", "dense"], repeat=3):
        run = Runtime(network, backend=dict(zip(["fc0", "fc1", "fc2"], combo)))
        got = run(x)
        assert got.flags.c_contiguous
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert np.array_equal(run(x), got)  # the second call reuses the plan and scratch


def test_sclref_layers_form_one_chain_and_threads_get_their_own_scratch():
    network = _network()
    run = Runtime(network, backend="sclref")
    xs = [np.random.default_rng(s).standard_normal((n, 2, 3, 5)) for s, n in enumerate([1, 6, 33] * 4)]
    want = [run(x) for x in xs]
    assert len(run._chains) == 1
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, xs))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_float32_runtime_takes_any_numeric_input():
    network = _network()
    x = np.random.default_rng(2).standard_normal((9, 30))
    got = Runtime(network, dtype=np.float32)(x.tolist())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(network, x), rtol=1e-4, atol=1e-4)


def _csr_with_density(rows, cols, nnz_per_row, gen):
    idx = np.sort(np.stack([gen.choice(cols, nnz_per_row, replace=False) for _ in range(rows)]), axis=1)
    indptr = np.arange(0, rows * nnz_per_row + 1, nnz_per_row, dtype=np.int32)
    return sp.csr_array((gen.standard_normal(rows * nnz_per_row), idx.ravel().astype(np.int32), indptr),
                        shape=(rows, cols))


def test_auto_takes_dense_for_convolutions_sooner_than_for_linear_layers():
    # 8 % density: dense for a convolution at batch 1 (break-even 7 %), sparse for a
    # linear layer (30 %); big batches follow the table of the parallel or serial kernel.
    from sclref.sparse import Conv2d
    from sclref.sparse.runtime import CONV_DENSE_FROM, DENSE_FROM

    gen = np.random.default_rng(0)
    conv = Conv2d("conv", _csr_with_density(4, 100, 8, gen), np.zeros(4), in_channels=4, kernel_size=(5, 5))
    fc = Linear("fc", _csr_with_density(3, 64, 5, gen), np.zeros(3))
    network = SparseNetwork([conv, Flatten("flatten"), fc], np.dtype(np.float64), input_shape=(4, 8, 8))
    run = Runtime(network)
    sparse = "scipy" if kernels.JIT_DISABLED else "sclref"
    assert CONV_DENSE_FROM[1] <= 0.08 < DENSE_FROM[1]
    assert run.choose("conv", 1) == "dense" and run.choose("fc", 1) == sparse
    big = "dense" if 0.08 >= CONV_DENSE_FROM[16] else sparse
    assert [run.choose("conv", b) for b in (64, 256)] == [big, big]
    assert [run.choose("fc", b) for b in (64, 256)] == [sparse, sparse]
    x = gen.standard_normal((2, 4, 8, 8))
    np.testing.assert_allclose(run(x), Runtime(network, backend="scipy")(x), rtol=1e-12, atol=1e-12)
