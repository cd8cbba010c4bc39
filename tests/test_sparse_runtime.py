"""The runtime's plans: chains of sclref layers mixed with scipy and dense layers, reused scratch, threads,
residual blocks."""

import itertools
import re
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
import scipy.sparse as sp
import threadpoolctl

from sclref import kernels
from sclref.errors import InputError, LimitError
from sclref.sparse import (
    Activation,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    Residual,
    Runtime,
    SparseNetwork,
    SubsamplePad,
)
from sclref.sparse.runtime import to_chwn


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


def test_a_planned_batch_gives_the_kernels_bits_in_a_new_array_whatever_form_the_input_takes():
    network = _network()
    fcs = [layer for layer in network.layers if isinstance(layer, Linear)]
    packed = kernels.pack_chain([w.weight.astype(np.float32) for w in fcs], [w.bias for w in fcs],
                                ["relu", "leaky_relu", None], [None, 0.1, None], np.float32)
    run = Runtime(network, dtype=np.float32, backend="sclref")
    for n in (1, 2, 3, 40):
        x = np.random.default_rng(n).standard_normal((n, 2, 3, 5)).astype(np.float32)
        want = np.empty((n, 7), np.float32)
        kernels.csr_chain(*packed, x.reshape(n, 30), want, kernels.chain_scratch(packed[0], n, np.float32))
        first = run(x)  # plans the shape
        again = run(x)  # the planned call
        assert first.tobytes() == want.tobytes() and again.tobytes() == want.tobytes()
        assert not np.shares_memory(again, first)
        frozen = np.frombuffer(b"\0" + x.tobytes(), np.float32, offset=1).reshape(x.shape)  # read-only, unaligned
        for same in (x.reshape(n, 30), x.astype(np.float64), np.asfortranarray(x), x.tolist(), frozen):
            assert run(same).tobytes() == want.tobytes()
            assert run(same).tobytes() == want.tobytes()  # planned, if only reshaped


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


def _lenet_like(gen, conv_density=0.5, fc_density=0.1):
    """conv (stride 1, padding 1) - pool - relu - conv (stride 2) - relu - flatten - linear - relu - linear."""
    def conv(name, f, c, k, density, **geometry):
        nnz = max(1, round(density * c * k * k))
        return Conv2d(name, _csr_with_density(f, c * k * k, nnz, gen), gen.standard_normal(f), in_channels=c,
                      kernel_size=(k, k), **geometry)

    layers = [conv("conv1", 4, 2, 3, conv_density, padding=(1, 1)), MaxPool2d("pool1", (2, 2), (2, 2)),
              Activation("relu1", "relu"), conv("conv2", 6, 4, 3, conv_density, stride=(2, 2)),
              Activation("relu2", "relu"), Flatten("flatten"),
              Linear("fc1", _csr_with_density(12, 24, max(1, round(fc_density * 24)), gen), gen.standard_normal(12)),
              Activation("relu3", "relu"), Linear("fc2", _csr_with_density(5, 12, 6, gen), gen.standard_normal(5))]
    return SparseNetwork(layers, np.dtype(np.float64), input_shape=(2, 10, 10))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_backend_gives_the_same_output_for_a_convolutional_network(dtype):
    gen = np.random.default_rng(13)
    network = _lenet_like(gen)
    names = [layer.name for layer in network.weighted()]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for batch in (1, 7, 64):
        x = gen.standard_normal((batch, 2, 10, 10))
        want = Runtime(network, dtype, "dense")(x)
        mixes = ["auto", "sclref", "scipy"] + [dict(zip(names, gen.choice(["dense", "scipy", "sclref"], 4)))
                                               for _ in range(3)]
        for backend in mixes:
            got = Runtime(network, dtype, backend)(x)
            assert got.dtype == dtype and got.shape == (batch, 5)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


@pytest.mark.parametrize("backend", ["dense", "scipy", "sclref"])
def test_a_convolution_applies_the_activation_it_is_given(backend):
    network = _lenet_like(np.random.default_rng(12))
    run = Runtime(network, backend=backend)
    x = np.random.default_rng(13).standard_normal((3, 2, 10, 10))
    for act in (Activation("relu", "relu"), Activation("leaky", "leaky_relu", 0.1)):
        alone = run.conv2d("conv1", x, backend)
        np.testing.assert_array_equal(run.conv2d("conv1", x, backend, act), run.step(act, alone))


@pytest.mark.skipif(kernels.JIT_DISABLED or numba.config.NUMBA_NUM_THREADS < 2,
                    reason="needs the JIT and two numba threads")
@pytest.mark.parametrize("batch", [1, 5, 64, 300])
def test_the_thread_rule_does_not_change_a_bit(monkeypatch, batch):
    gen = np.random.default_rng(14)
    network = _lenet_like(gen)
    x = gen.standard_normal((batch, 2, 10, 10)).astype(np.float32)
    chwn, residual = _chwn_net(gen), _chwn_net(gen, "residual")
    x1 = gen.standard_normal((batch, 2, 10, 10)).astype(np.float32)
    outputs = []
    for min_work, threads in ((0, 2), (1 << 62, 2), (0, 1)):  # always split, never, split on one thread
        monkeypatch.setattr(kernels.sparse, "SPLIT_MIN_WORK", min_work)
        old = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            outputs.append(b"".join(Runtime(net, np.float32, "sclref")(inp).tobytes()
                                    for net, inp in ((network, x), (chwn, x1), (residual, x1))))
        finally:
            numba.set_num_threads(old)
    assert outputs[0] == outputs[1] == outputs[2]


def _chwn_net(gen, tail="chain", act="relu"):
    """LeNet-5's order (conv - pool - act, padded conv - act), then a chain ("chain"), a strided conv and a global
    pooling ("conv"), or two residual blocks, the first with a strided conv and an option-A shortcut, a global
    pooling and a linear layer ("residual")."""
    def conv(name, f, c, k, **geometry):
        nnz = max(1, round(0.4 * c * k * k))
        return Conv2d(name, _csr_with_density(f, c * k * k, nnz, gen), gen.standard_normal(f), in_channels=c,
                      kernel_size=(k, k), **geometry)

    alpha = 0.1 if act == "leaky_relu" else None
    layers = [conv("conv1", 4, 2, 3), MaxPool2d("pool1", (2, 2), (2, 2)), Activation("act1", act, alpha),
              conv("conv2", 5, 4, 3, padding=(1, 0)), Activation("act2", act, alpha)]
    if tail == "chain":
        layers += [Flatten("flatten"), Linear("fc1", _csr_with_density(12, 5 * 4 * 2, 9, gen), gen.standard_normal(12)),
                   Activation("relu3", "relu"), Linear("fc2", _csr_with_density(3, 12, 6, gen), gen.standard_normal(3))]
    elif tail == "conv":
        layers += [conv("conv3", 3, 5, 2, stride=(2, 2)), GlobalAvgPool2d("gap")]
    else:
        down = Residual("res1", [conv("res1.conv1", 6, 5, 3, stride=(2, 2), padding=(1, 1)),
                                 Activation("res1.act", act, alpha), conv("res1.conv2", 6, 6, 3, padding=(1, 1))],
                        [SubsamplePad("res1.pad", (2, 2), (0, 1))])
        same = Residual("res2", [conv("res2.conv1", 6, 6, 3, padding=(1, 1)), Activation("res2.act", act, alpha),
                                 conv("res2.conv2", 6, 6, 1)], [])
        layers += [down, Activation("act3", act, alpha), same, Activation("act4", "leaky_relu", 0.2),
                   GlobalAvgPool2d("gap"), Linear("fc", _csr_with_density(3, 6, 4, gen), gen.standard_normal(3))]
    return SparseNetwork(layers, np.dtype(np.float64), input_shape=(2, 10, 10))


def _masked(network, x):
    """The network's output computed layer by layer on dense weights (NCHW, float64)."""
    return Runtime(network, np.float64, "dense")(x.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tail, act", [("chain", "relu"), ("chain", "leaky_relu"), ("conv", "relu"),
                                       ("residual", "relu"), ("residual", "leaky_relu")])
def test_the_chwn_path_gives_the_nchw_path_and_the_masked_output(monkeypatch, dtype, tail, act):
    from sclref.sparse import runtime

    gen = np.random.default_rng(15)
    network = _chwn_net(gen, tail, act)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    for batch in (1, 3, 4, 9) if kernels.JIT_DISABLED else (1, 3, 4, 9, 64, 257, 300):
        x = gen.standard_normal((batch, 2, 10, 10))
        want = _masked(network, x)
        scale = tol * max(1.0, float(np.abs(want).max()))
        outputs = {}
        for chwn_from in (1, 1 << 30):
            monkeypatch.setattr(runtime, "CHWN_FROM", chwn_from)
            run = Runtime(network, dtype, "sclref")
            covered = run._chwn_steps(batch)[1]
            chwn = chwn_from <= batch and batch >= kernels.sparse.TILE_MIN
            assert covered == (0 if not chwn else {"chain": 6, "conv": 7, "residual": 10}[tail])
            outputs[chwn_from] = got = run(x)
            assert got.dtype == dtype and got.flags.c_contiguous and np.array_equal(run(x), got)
            np.testing.assert_allclose(got, want, rtol=0, atol=scale)
        np.testing.assert_allclose(outputs[1], outputs[1 << 30], rtol=0, atol=scale)


def test_the_chwn_path_stops_at_a_layer_it_does_not_cover(monkeypatch):
    from sclref.sparse import runtime

    monkeypatch.setattr(runtime, "CHWN_FROM", 1)
    gen = np.random.default_rng(16)
    network = _chwn_net(gen, "conv")
    assert Runtime(network, np.float64, "sclref")._chwn_steps(8)[1:] == (7, False)  # to the pooled (C, N) features
    third_dense = Runtime(network, np.float64, {**dict.fromkeys(Runtime(network).backend, "sclref"), "conv3": "dense"})
    assert third_dense._chwn_steps(8)[1:] == (5, False)  # conv1, pool1, act1, conv2, act2
    assert Runtime(network, np.float64, {"conv1": "dense"})._chwn_steps(8)[1] == 0  # a dense first conv
    chained = _chwn_net(gen)
    dense_fc = Runtime(chained, np.float64, {**dict.fromkeys(Runtime(chained).backend, "sclref"), "fc1": "dense"})
    assert dense_fc._chwn_steps(8)[1:] == (5, False)  # the flatten then runs on NCHW, into a dense layer
    x = gen.standard_normal((8, 2, 10, 10))
    np.testing.assert_allclose(dense_fc(x), _masked(dense_fc.network, x), rtol=0, atol=1e-10)
    np.testing.assert_allclose(third_dense(x), _masked(network, x), rtol=0, atol=1e-10)


def test_auto_runs_a_layer_dense_from_its_table_density_on():
    from sclref.sparse.runtime import CONV_DENSE_FROM, DENSE_FROM

    sparse = "scipy" if kernels.JIT_DISABLED else "sclref"
    for table, kind in ((DENSE_FROM, "linear"), (CONV_DENSE_FROM, "conv")):
        for batch in (1, 2, 16, 64, 256, 1000):
            threshold = table[max(b for b in table if b <= batch)]
            first = int(np.ceil(threshold * 100 - 1e-9)) if threshold <= 1 else 101  # fewest of 100 run dense
            for nnz, expect in ((first, "dense"), (first - 1, sparse)):
                if not 1 <= nnz <= 100:
                    continue
                gen = np.random.default_rng(nnz)
                if kind == "conv":
                    w = _csr_with_density(1, 100, nnz, gen)
                    layer = Conv2d("w", w, np.zeros(1), in_channels=4, kernel_size=(5, 5))
                    network = SparseNetwork([layer], np.dtype(np.float64), input_shape=(4, 5, 5))
                else:
                    network = SparseNetwork([Linear("w", _csr_with_density(1, 100, nnz, gen), np.zeros(1))],
                                            np.dtype(np.float64))
                assert Runtime(network).choose("w", batch) == expect, (kind, batch, nnz)


def _padded_conv_network(padding):
    gen = np.random.default_rng(5)
    conv = Conv2d("conv", _csr_with_density(2, 9, 3, gen), np.zeros(2), in_channels=1, kernel_size=(3, 3),
                  padding=(padding, padding))
    side = 8 + 2 * padding - 2
    fc = Linear("fc", _csr_with_density(3, 2 * side * side, 4, gen), np.zeros(3))
    return SparseNetwork([conv, Flatten("flatten"), fc], np.dtype(np.float64), input_shape=(1, 8, 8))


@pytest.mark.parametrize("backend, what", [("sclref", "the zero-padded input (padding [64, 64])"),
                                           ("scipy", "the zero-padded input (padding [64, 64])"),
                                           ("dense", "the zero-padded input (padding [64, 64])")])
def test_a_batch_whose_buffers_exceed_the_limit_is_refused_before_allocating(monkeypatch, backend, what):
    run = Runtime(_padded_conv_network(64), backend=backend)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    assert np.isfinite(run(x)).all()  # a small batch fits
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    with pytest.raises(LimitError, match=re.escape(f"layer 'conv', batch of 64: {what}")):
        run(np.zeros((64, 1, 8, 8)))


def test_im2col_columns_are_checked_for_the_backends_that_use_them(monkeypatch):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    network = _padded_conv_network(0)
    # Per sample: input 512 bytes, conv output 576, im2col columns 2,592.
    for backend in ("scipy", "dense"):
        with pytest.raises(LimitError, match=r"layer 'conv', batch of 1000: the im2col columns \(kernel \[3, 3\]\)"):
            Runtime(network, backend=backend).check_batch((1000, 1, 8, 8))
    Runtime(network, backend="sclref").check_batch((1000, 1, 8, 8))  # the direct convolution needs none
    with pytest.raises(LimitError, match=r"layer 'conv', batch of 1900: the output \[2, 6, 6\] per sample"):
        Runtime(network, backend="sclref").check_batch((1900, 1, 8, 8))


def test_a_dense_weight_beyond_the_limit_is_refused(monkeypatch):
    gen = np.random.default_rng(6)
    fc = Linear("wide", _csr_with_density(1000, 1000, 2, gen), np.zeros(1000))
    network = SparseNetwork([fc], np.dtype(np.float64))
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    x = gen.standard_normal((2, 1000))
    np.testing.assert_allclose(Runtime(network, backend="scipy")(x), x @ fc.weight.toarray().T, rtol=1e-12)
    with pytest.raises(LimitError, match=r"layer 'wide': its 1000x1000 weight made dense"):
        Runtime(network, backend="dense")(x)


def test_a_network_whose_outputs_overflow_float32_does_not_run_in_float32():
    network = _network()
    network.layers[1].weight.data[:] *= 1e30
    x = np.random.default_rng(7).standard_normal((2, 2, 3, 5))
    assert np.isfinite(Runtime(network)(x)).all()  # float64 holds them
    with pytest.raises(InputError, match=r"cannot run this network in float32: layer 'fc0'.*float32"):
        Runtime(network, dtype=np.float32)


def _residual_network():
    """Linear residual blocks (one with the identity, one with a linear shortcut) between linear layers."""
    gen = np.random.default_rng(8)

    def fc(name, k, f):
        return Linear(name, _csr_with_density(f, k, max(1, k // 3), gen), gen.standard_normal(f))

    layers = [Flatten("flatten"), fc("fc0", 30, 16), Activation("relu0", "relu"),
              Residual("res1", [fc("fc1", 16, 16), Activation("leaky", "leaky_relu", 0.1), fc("fc2", 16, 16)], []),
              Activation("relu1", "relu"),
              Residual("res2", [fc("fc3", 16, 8)], [fc("fc4", 16, 8)]), fc("fc5", 8, 3)]
    return SparseNetwork(layers, np.dtype(np.float64), input_shape=(2, 3, 5))


def _reference(layers, h):
    """Dense NumPy forward of flatten, linear, activation and residual layers."""
    for layer in layers:
        if isinstance(layer, Residual):
            h = _reference(layer.body, h) + _reference(layer.shortcut, h)
        elif isinstance(layer, Linear):
            h = h @ layer.weight.toarray().T + layer.bias
        elif isinstance(layer, Flatten):
            h = h.reshape(len(h), -1)
        elif layer.kind == "relu":
            h = np.maximum(h, 0)
        else:
            h = np.where(h > 0, h, layer.alpha * h)
    return h


@pytest.mark.parametrize("batch", [1, 7])
def test_residual_blocks_give_the_reference_output_on_every_mix_of_backends(batch):
    network = _residual_network()
    x = np.random.default_rng(9).standard_normal((batch, 2, 3, 5))
    expected = _reference(network.layers, x)
    names = [layer.name for layer in network.weighted()]
    assert names == ["fc0", "fc1", "fc2", "fc3", "fc4", "fc5"]
    gen = np.random.default_rng(10)
    mixes = [dict.fromkeys(names, b) for b in ("dense", "scipy", "sclref")]
    mixes += [dict(zip(names, gen.choice(["dense", "scipy", "sclref"], len(names)))) for _ in range(6)]
    for mix in mixes:
        run = Runtime(network, backend=mix)
        np.testing.assert_allclose(run(x), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(run(x), expected, rtol=1e-12, atol=1e-12)  # the planned steps, reused
        h = x
        for layer in network.layers:
            h = run.step(layer, h)
        np.testing.assert_allclose(h, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 7])
def test_an_activation_overwrites_only_arrays_the_run_made(batch):
    # A ReLU runs in place on a layer's fresh output, never on the caller's input, a flatten
    # of it, or a residual block's input, which its shortcut reads too.
    gen = np.random.default_rng(11)

    def fc(name, k, f):
        return Linear(name, _csr_with_density(f, k, max(1, k // 3), gen), gen.standard_normal(f))

    networks = [[Activation("relu0", "relu"), Flatten("flatten"), fc("fc0", 30, 4)],
                [Flatten("flatten"), Activation("relu0", "relu"), fc("fc0", 30, 4)],
                [Flatten("flatten"), Residual("res", [Activation("relu0", "relu"), fc("fc0", 30, 30)], []),
                 Activation("relu1", "relu"), fc("fc1", 30, 4)]]
    for layers in networks:
        network = SparseNetwork(layers, np.dtype(np.float64), input_shape=(2, 3, 5))
        for backend in ("dense", "scipy", "sclref"):
            run, x = Runtime(network, backend=backend), gen.standard_normal((batch, 2, 3, 5))
            given = x.copy()
            for _ in range(2):  # planning, then the planned call
                np.testing.assert_allclose(run(x), _reference(layers, given), rtol=1e-12, atol=1e-12)
                assert x.tobytes() == given.tobytes()


def test_buffers_inside_a_residual_block_are_checked(monkeypatch):
    gen = np.random.default_rng(11)
    conv = Conv2d("shortcut.conv", _csr_with_density(2, 2, 1, gen), np.zeros(2), in_channels=2, kernel_size=(1, 1),
                  padding=(64, 64))
    body = [Conv2d("body.conv", _csr_with_density(2, 2 * 9, 3, gen), np.zeros(2), in_channels=2,
                   kernel_size=(3, 3), padding=(65, 65))]
    block = Residual("block", body, [conv])
    network = SparseNetwork([block, GlobalAvgPool2d("pool")], np.dtype(np.float64), input_shape=(2, 4, 4))
    x = gen.standard_normal((2, 2, 4, 4))
    assert Runtime(network)(x).shape == (2, 2)
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    with pytest.raises(LimitError, match=r"layer 'body.conv', batch of 64: the zero-padded input"):
        Runtime(network)(np.zeros((64, 2, 4, 4)))


def test_an_option_a_shortcut_subsamples_and_pads_channels():
    x = np.arange(2 * 3 * 5 * 4, dtype=np.float64).reshape(2, 3, 5, 4)
    gen = np.random.default_rng(12)
    body = [Conv2d("conv", _csr_with_density(6, 27, 5, gen), gen.standard_normal(6), in_channels=3,
                   kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))]
    network = SparseNetwork([Residual("block", body, [SubsamplePad("pad", (2, 2), (1, 2))])], np.dtype(np.float64),
                            input_shape=(3, 5, 4))
    run = Runtime(network, backend="dense")
    shortcut = run.step(network.layers[0].shortcut[0], x)
    assert shortcut.shape == (2, 6, 3, 2)
    np.testing.assert_array_equal(shortcut[:, 1:4], x[:, :, ::2, ::2])
    assert not shortcut[:, [0, 4, 5]].any()
    np.testing.assert_allclose(run(x), run.step(body[0], x) + shortcut, rtol=1e-15)


def test_a_residual_block_whose_outputs_overflow_float32_does_not_run_in_float32():
    network = _residual_network()
    network.layers[5].shortcut[0].weight.data[:] *= 1e33
    assert np.isfinite(Runtime(network)(np.ones((1, 2, 3, 5)))).all()
    with pytest.raises(InputError, match=r"cannot run this network in float32: layer 'fc4'"):
        Runtime(network, dtype=np.float32)


def test_dense_layers_give_the_same_bits_whatever_blas_threads_the_process_has():
    # OpenBLAS splits (128, 784) @ (784, 300) into other blocks on 2 threads, whose float32 sums round differently.
    gen = np.random.default_rng(21)
    network = SparseNetwork([Linear("fc1", _csr_with_density(300, 784, 784, gen), gen.standard_normal(300)),
                             Activation("relu", "relu"),
                             Linear("fc2", _csr_with_density(10, 300, 300, gen), gen.standard_normal(10))],
                            np.dtype(np.float64))
    x = gen.standard_normal((128, 784)).astype(np.float32)
    outputs = []
    for limit in (1, 2):
        with threadpoolctl.threadpool_limits(limit, user_api="blas"):
            run = Runtime(network, np.float32, "dense")
            outputs.append((run(x).tobytes(), run.linear("fc1", x, "dense").tobytes()))
    assert outputs[0] == outputs[1]


def test_one_chwn_convolution_gives_the_nchw_bits_and_refuses_other_input():
    gen = np.random.default_rng(22)
    network = _chwn_net(gen, tail="residual")
    run = Runtime(network, np.float32, "sclref")
    x = gen.standard_normal((13, 5, 8, 8)).astype(np.float32)  # the input of res1.conv1 (stride 2, padding 1)
    chwn = to_chwn(x)
    assert np.array_equal(chwn, x.transpose(1, 2, 3, 0)) and chwn.flags.c_contiguous and chwn.ctypes.data % 64 == 0
    got = run.conv2d_chwn("res1.conv1", chwn)
    assert got.tobytes() == np.ascontiguousarray(run.conv2d("res1.conv1", x, "sclref").transpose(1, 2, 3, 0)).tobytes()
    with pytest.raises(ValueError, match="expected 5 input channels, got 4"):
        run.conv2d_chwn("res1.conv1", np.zeros((4, 8, 8, 13), np.float32))
    with pytest.raises(ValueError, match=r"expected C-contiguous \(C, H, W, N\) float32 input"):
        run.conv2d_chwn("res1.conv1", np.zeros((5, 8, 8, 13)))
