"""The sparse kernels (and their NumPy twins) against scipy.sparse on random CSR matrices."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from sclref import kernels
from sclref.kernels import reference as ref
from tests.strategies import SEEDS

MAX = 12 if kernels.JIT_DISABLED else 40
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _csr(gen, f, k, density, dtype):
    w = sp.random_array((f, k), density=density, format="csr", rng=gen)
    w = sp.csr_array((w.data.astype(dtype), w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(f, k))
    w.sort_indices()
    return w


@st.composite
def chain_cases(draw):
    """A chain of 1-3 random CSR layers (empty rows, empty and fully dense layers), activations, a batch."""
    gen = np.random.default_rng(draw(SEEDS))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    sizes = [draw(st.integers(1, MAX))] + draw(st.lists(st.integers(0, MAX), min_size=1, max_size=3))
    weights, biases = [], []
    for k, f in zip(sizes[:-1], sizes[1:]):
        w = _csr(gen, f, k, draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])), dtype)
        if f and draw(st.booleans()):  # empty rows inside a non-empty layer
            dense = w.toarray()
            dense[gen.random(f) < 0.3] = 0
            w = _csr(gen, f, k, 0.0, dtype) if not dense.any() else sp.csr_array(dense)
            w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(f, k))
        weights.append(w)
        biases.append(gen.standard_normal(f).astype(dtype))
    acts = [draw(st.sampled_from([None, "relu", "leaky_relu"])) for _ in weights]
    alphas = [0.1 if a == "leaky_relu" else None for a in acts]
    n = draw(st.integers(1, 9 if kernels.JIT_DISABLED else 2 * MAX))
    return weights, biases, acts, alphas, gen.standard_normal((n, sizes[0])).astype(dtype), dtype


def _scipy_chain(weights, biases, acts, alphas, x):
    h = x.astype(np.float64)
    for w, b, act, alpha in zip(weights, biases, acts, alphas):
        h = (w @ h.T).T + b
        if act == "relu":
            h = np.maximum(h, 0)
        elif act == "leaky_relu":
            h = np.where(h > 0, h, alpha * h)
    return h


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernel", "twin"])
@given(case=chain_cases())
def test_csr_chain_matches_scipy(impl, case):
    weights, biases, acts, alphas, x, dtype = case
    packed = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    out = np.full((x.shape[0], weights[-1].shape[0]), np.nan, dtype)
    impl.csr_chain(*packed, x, out, kernels.chain_scratch(packed[0], x.shape[0], dtype))
    expect = _scipy_chain(weights, biases, acts, alphas, x)
    np.testing.assert_allclose(out, expect, rtol=TOL[dtype], atol=TOL[dtype])


@given(case=chain_cases(), tile=st.sampled_from([8, 16, 24]), threads=st.integers(1, 3))
def test_chain_results_do_not_depend_on_batch_tiles_or_threads(case, tile, threads):
    weights, biases, acts, alphas, x, dtype = case
    layers, ints, vals = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    width = max(kernels.chain_scratch(layers, 1, dtype).shape[1], 1)
    tiled = np.empty((x.shape[0], weights[-1].shape[0]), dtype)
    kernels.csr_chain(layers, ints, vals, x, tiled, np.empty((threads, 2, width, tile), dtype))
    for r in range(min(3, x.shape[0])):  # a sample alone takes the dot-product path
        one = np.empty((1, tiled.shape[1]), dtype)
        kernels.csr_chain(layers, ints, vals, x[r:r + 1], one, kernels.chain_scratch(layers, 1, dtype))
        assert np.array_equal(one[0], tiled[r])


def test_pack_chain_rejects_mismatched_layers_and_unknown_activations():
    gen = np.random.default_rng(0)
    w1, w2 = _csr(gen, 3, 4, 0.5, np.float64), _csr(gen, 2, 5, 0.5, np.float64)
    with pytest.raises(ValueError, match="layer 1 has 5 inputs"):
        kernels.pack_chain([w1, w2], [np.zeros(3), np.zeros(2)], [None, None], [None, None], np.float64)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        kernels.pack_chain([w1], [np.zeros(3)], ["tanh"], [None], np.float64)


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernel", "twin"])
@given(seed=SEEDS, dtype=st.sampled_from([np.float32, np.float64]), stride=st.integers(1, 2),
       density=st.sampled_from([0.0, 0.2, 1.0]))
def test_csr_conv2d_matches_scipy_im2col(impl, seed, dtype, stride, density):
    gen = np.random.default_rng(seed)
    n, c, f, kh, kw, h, wd = 2, 2, 3, 3, 2, 7, 6
    w = sp.random_array((f, c * kh * kw), density=density, format="csr", rng=gen)
    w = sp.csr_array((w.data.astype(dtype), w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=w.shape)
    w.sort_indices()
    b = gen.standard_normal(f).astype(dtype)
    xp = gen.standard_normal((n, c, h, wd)).astype(dtype)
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    cols = win.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, -1)
    expect = (w @ cols + b[:, None]).reshape(f, n, oh, ow).transpose(1, 0, 2, 3)
    out = np.empty((n, f, oh, ow), dtype)
    impl.csr_conv2d(kh, kw, stride, stride, w.indptr, w.indices, w.data, b, xp, out)
    np.testing.assert_allclose(out, expect, rtol=TOL[dtype], atol=TOL[dtype])
