"""The sparse kernels against their NumPy twins and scipy.sparse on hypothesis geometries, and the same bits
at any thread count and whichever thread rule applies."""

import numba
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sclref import kernels
from sclref.kernels import reference as ref
from sclref.kernels import sparse as sparse_module
from tests.strategies import SEEDS, conv_geometry, numba_threads, pool_geometry

MAX = 12 if kernels.JIT_DISABLED else 40
MAX_BATCH = 24 if kernels.JIT_DISABLED else 300
DENSITIES = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
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
        w = _csr(gen, f, k, draw(DENSITIES), dtype)
        if f and draw(st.booleans()):  # empty rows inside a non-empty layer
            dense = w.toarray()
            dense[gen.random(f) < 0.3] = 0
            w = _csr(gen, f, k, 0.0, dtype) if not dense.any() else sp.csr_array(dense)
            w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(f, k))
        weights.append(w)
        biases.append(gen.standard_normal(f).astype(dtype))
    acts = [draw(st.sampled_from([None, "relu", "leaky_relu"])) for _ in weights]
    alphas = [0.1 if a == "leaky_relu" else None for a in acts]
    n = draw(st.integers(1, MAX_BATCH))
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


@given(case=chain_cases(), tile=st.sampled_from([8, 16, 24, 96]),  # 96: several register groups per tile
       poison=st.sampled_from([None, np.inf, -np.inf, np.nan]), at=st.integers(0, MAX))
def test_chain_results_do_not_depend_on_batch_tiles_or_a_feature_major_input(case, tile, poison, at):
    weights, biases, acts, alphas, x, dtype = case
    if poison is not None:  # a padded slot of the sample-by-sample path must not read it into a sum
        x[:, at % x.shape[1]] = poison
    layers, ints, vals = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    width = max(x.shape[1], *(w.shape[0] for w in weights), 1)
    tiled = np.empty((x.shape[0], weights[-1].shape[0]), dtype)
    kernels.csr_chain(layers, ints, vals, x, tiled, np.empty((2, width, tile), dtype))
    columns = np.ascontiguousarray(x.T)
    if x.shape[0] >= kernels.sparse.TILE_MIN:  # scratch with tiles for a batch wider, narrower or as wide
        fm = np.empty_like(tiled)
        kernels.chain_kernel(np.empty((2, width, tile), dtype), True)(
            layers, ints, vals, columns, fm, np.empty((2, width, tile), dtype))
        assert fm.tobytes() == tiled.tobytes()
    fm = np.empty_like(tiled)  # the scratch `chain_scratch` gives, dot products below TILE_MIN rows
    kernels.csr_chain(layers, ints, vals, columns, fm, kernels.chain_scratch(layers, x.shape[0], dtype),
                      feature_major=True)
    assert fm.tobytes() == tiled.tobytes()
    for r in range(min(3, x.shape[0])):  # a sample alone takes the dot-product path
        one = np.empty((1, tiled.shape[1]), dtype)
        kernels.csr_chain(layers, ints, vals, x[r:r + 1], one, kernels.chain_scratch(layers, 1, dtype))
        assert one[0].tobytes() == tiled[r].tobytes()


@given(case=chain_cases())
def test_a_chain_packed_with_64_bit_indices_gives_the_same_bits(case):
    weights, biases, acts, alphas, x, dtype = case
    wide = [sp.csr_array((w.data, w.indices.astype(np.int64), w.indptr.astype(np.int64)), shape=w.shape)
            for w in weights]
    narrow, packed = (kernels.pack_chain(ws, biases, acts, alphas, dtype) for ws in (weights, wide))
    assert narrow[1].dtype == np.uint32 and packed[1].dtype == np.uint64
    for rows in (x.shape[0], 1):  # the tiled and the sample-by-sample paths
        want, got = (np.empty((rows, weights[-1].shape[0]), dtype) for _ in range(2))
        kernels.csr_chain(*narrow, x[:rows], want, kernels.chain_scratch(narrow[0], rows, dtype))
        kernels.csr_chain(*packed, x[:rows], got, kernels.chain_scratch(packed[0], rows, dtype))
        assert got.tobytes() == want.tobytes()


@given(case=chain_cases())
def test_below_tile_min_a_chain_needs_no_scratch_and_its_kernel_takes_none(case):
    weights, biases, acts, alphas, x, dtype = case
    packed = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    rows = min(x.shape[0], kernels.sparse.TILE_MIN - 1)
    assert kernels.chain_scratch(packed[0], rows, dtype) is None
    scratch = kernels.chain_scratch(packed[0], kernels.sparse.TILE_MIN, dtype)
    assert scratch.ndim == 3 and scratch.ctypes.data % 64 == 0 and not scratch.any()
    want, got = (np.full((rows, weights[-1].shape[0]), np.nan, dtype) for _ in range(2))
    kernels.csr_chain(*packed, x[:rows], want)
    kernels.chain_kernel(None)(*packed, np.ascontiguousarray(x[:rows]), got)  # the hot-path call: no scratch
    assert got.tobytes() == want.tobytes()
    entry = kernels.compiled(kernels.chain_kernel(None), *packed, np.ascontiguousarray(x[:rows]), got)
    assert entry is kernels.chain_kernel(None) if kernels.JIT_DISABLED else not hasattr(entry, "py_func")
    got[...] = np.nan
    entry(*packed, np.ascontiguousarray(x[:rows]), got)  # the runtime's call at batch 1: no dispatch
    assert got.tobytes() == want.tobytes()
    np.testing.assert_allclose(got, _scipy_chain(weights, biases, acts, alphas, x[:rows]), rtol=TOL[dtype],
                               atol=TOL[dtype])
    with pytest.raises(ValueError, match="feature-major chain input needs at least"):
        kernels.chain_kernel(None, feature_major=True)


@given(case=chain_cases())
def test_a_chain_reads_an_unflattened_batch_as_its_flat_rows(case):
    weights, biases, acts, alphas, x, dtype = case
    packed = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    n, k = x.shape
    for rows in (n, 1):  # the tiled and the dot-product paths
        flat, nchw = (np.full((rows, weights[-1].shape[0]), np.nan, dtype) for _ in range(2))
        kernels.csr_chain(*packed, x[:rows], flat, kernels.chain_scratch(packed[0], rows, dtype))
        kernels.csr_chain(*packed, x[:rows].reshape(rows, 1, k, 1), nchw, kernels.chain_scratch(packed[0], rows, dtype))
        assert flat.tobytes() == nchw.tobytes()


def test_pack_chain_rejects_mismatched_layers_and_unknown_activations():
    gen = np.random.default_rng(0)
    w1, w2 = _csr(gen, 3, 4, 0.5, np.float64), _csr(gen, 2, 5, 0.5, np.float64)
    with pytest.raises(ValueError, match="layer 1 has 5 inputs"):
        kernels.pack_chain([w1, w2], [np.zeros(3), np.zeros(2)], [None, None], [None, None], np.float64)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        kernels.pack_chain([w1], [np.zeros(3)], ["tanh"], [None], np.float64)


@st.composite
def conv_cases(draw):
    """CSR filters of any density, a batch of 1 to MAX_BATCH images, strides and padding; the flat stride-1
    path drawn as often as the strided one."""
    n, c, f, h, wd, kh, kw, stride, padding = draw(conv_geometry(max_n=MAX_BATCH, max_hw=9, max_k=5))
    if draw(st.booleans()):
        stride = (1, 1)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    gen = np.random.default_rng(draw(SEEDS))
    w = _csr(gen, f, c * kh * kw, draw(DENSITIES), dtype)
    x = gen.standard_normal((n, c, h, wd)).astype(dtype)
    return w, gen.standard_normal(f).astype(dtype), x, (kh, kw), stride, padding


def _padded(x, padding):
    (ph, pw) = padding
    return np.ascontiguousarray(np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))))


def _conv_shape(x, filters, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return x.shape[0], filters, (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1


def _act(y, act, alpha):
    """An ACTIVATIONS code applied by NumPy."""
    return np.maximum(y, 0) if act == 1 else np.where(y > 0, y, y.dtype.type(alpha) * y) if act == 2 else y


@settings(deadline=None, max_examples=30)
@given(case=conv_cases(), act=st.sampled_from([0, 1, 2]), alpha=st.sampled_from([0.1, 0.0, -0.5]))
@example(case=(sp.csr_array(np.ones((2, 9))), np.zeros(2), np.ones((1, 1, 3, 3)), (3, 3), (1, 1), (0, 0)), act=0,
         alpha=0.1)
def test_csr_conv2d_matches_its_twin_and_the_dense_convolution(case, act, alpha):
    w, bias, x, kernel, stride, padding = case
    (kh, kw), (sh, sw) = kernel, stride
    w = sp.csr_array((w.data.astype(x.dtype), w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=w.shape)
    shape = _conv_shape(x, w.shape[0], kernel, stride, padding)
    xp = _padded(x, padding)
    got, twin, plain = (np.full(shape, np.nan, x.dtype) for _ in range(3))
    kernels.csr_conv2d(kh, kw, sh, sw, w.indptr, w.indices, w.data, bias.astype(x.dtype), xp, got, act, alpha)
    ref.csr_conv2d(kh, kw, sh, sw, w.indptr, w.indices, w.data, bias.astype(x.dtype), xp, twin, act, alpha)
    kernels.csr_conv2d(kh, kw, sh, sw, w.indptr, w.indices, w.data, bias.astype(x.dtype), xp, plain)
    dense = np.empty(shape, x.dtype)
    ref.conv2d_fwd(x, w.toarray().reshape(w.shape[0], x.shape[1], kh, kw), sh, sw, *padding, dense)
    tol = TOL[x.dtype.type] * max(1.0, float(np.abs(twin).max(initial=0.0)))
    np.testing.assert_allclose(got, twin, rtol=0, atol=tol)
    np.testing.assert_allclose(got, _act(dense + bias.astype(x.dtype)[:, None, None], act, alpha), rtol=0, atol=tol)
    assert got.tobytes() == _act(plain, act, alpha).tobytes()  # the activation adds no rounding of its own


@st.composite
def chwn_cases(draw):
    """CSR filters of any density and stride with an activation, and a CHWN batch of 1 to MAX_BATCH samples."""
    n, c, f, h, wd, kh, kw, stride, padding = draw(conv_geometry(max_n=MAX_BATCH, max_hw=9, max_k=5))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    gen = np.random.default_rng(draw(SEEDS))
    w = _csr(gen, f, c * kh * kw, draw(DENSITIES), dtype)
    act, alpha = draw(st.sampled_from([0, 1, 2])), dtype(draw(st.sampled_from([0.1, 0.0, -0.5])))
    x = gen.standard_normal((c, h, wd, n)).astype(dtype)
    return w, gen.standard_normal(f).astype(dtype), act, alpha, x, (kh, kw), stride, padding


def _chwn_conv(case, threads=None):
    w, bias, act, alpha, x, (kh, kw), (sh, sw), (ph, pw) = case
    n, f, oh, ow = _conv_shape(x.transpose(3, 0, 1, 2), w.shape[0], (kh, kw), (sh, sw), (ph, pw))
    out = np.full((f, oh, ow, n), np.nan, x.dtype)
    sparse_module.csr_conv2d_chwn(kh, kw, sh, sw, ph, pw, w.indptr, w.indices, w.data, bias, act, alpha, x, out,
                                  threads=threads)
    return out


@settings(deadline=None, max_examples=10 if kernels.JIT_DISABLED else 60)
@given(case=chwn_cases())
@example(case=(sp.csr_array(np.ones((2, 9))), np.zeros(2), 1, 0.0, np.ones((1, 3, 3, 1)), (3, 3), (1, 1), (0, 0)))
@example(case=(sp.csr_array(np.ones((2, 9))), np.zeros(2), 0, 0.0, np.ones((1, 5, 5, 3)), (3, 3), (2, 2), (1, 1)))
def test_csr_conv2d_chwn_matches_its_twin_and_gives_the_nchw_kernels_values(case):
    w, bias, act, alpha, x, (kh, kw), (sh, sw), (ph, pw) = case
    got = _chwn_conv(case)
    twin = np.full_like(got, np.nan)
    ref.csr_conv2d_chwn(kh, kw, sh, sw, ph, pw, w.indptr, w.indices, w.data, bias, act, alpha, x, twin)
    tol = TOL[x.dtype.type] * max(1.0, float(np.abs(twin).max(initial=0.0)))
    np.testing.assert_allclose(got, twin, rtol=0, atol=tol)
    nchw = np.empty((x.shape[3], *got.shape[:3]), x.dtype)
    kernels.csr_conv2d(kh, kw, sh, sw, w.indptr, w.indices, w.data, bias, _padded(x.transpose(3, 0, 1, 2), (ph, pw)),
                       nchw, act, alpha)
    # The same sums in the same order: only the layout differs (the padding's zeros are skipped, not added).
    assert got.tobytes() == np.ascontiguousarray(nchw.transpose(1, 2, 3, 0)).tobytes()


@settings(deadline=None, max_examples=10 if kernels.JIT_DISABLED else 40)
@given(geometry=pool_geometry(max_n=MAX_BATCH), dtype=st.sampled_from([np.float32, np.float64]), seed=SEEDS)
def test_maxpool_chwn_and_nchw_match_their_twins_and_the_training_pooling(geometry, dtype, seed):
    n, c, h, wd, (kh, kw), (sh, sw) = geometry
    x = np.random.default_rng(seed).standard_normal((c, h, wd, n)).astype(dtype)
    x[x > 2] = np.nan  # NaN wins, as in np.maximum
    out = np.full((c, (h - kh) // sh + 1, (wd - kw) // sw + 1, n), -np.inf, dtype)
    twin = out.copy()
    sparse_module.maxpool_chwn(kh, kw, sh, sw, x, out)
    ref.maxpool_chwn(kh, kw, sh, sw, x, twin)
    np.testing.assert_array_equal(out, twin)
    nchw = np.empty((n, *out.shape[:3]), dtype)
    ref.maxpool2d_fwd(x.transpose(3, 0, 1, 2), kh, kw, sh, sw, nchw, np.empty(nchw.shape, np.int64))
    np.testing.assert_array_equal(out, nchw.transpose(1, 2, 3, 0))
    for pool in (sparse_module.maxpool_nchw, ref.maxpool_nchw):
        values = np.full_like(nchw, -np.inf)
        pool(kh, kw, sh, sw, np.ascontiguousarray(x.transpose(3, 0, 1, 2)), values)
        assert values.tobytes() == nchw.tobytes()


@given(geometry=pool_geometry(max_n=MAX_BATCH), dtype=st.sampled_from([np.float32, np.float64]))
def test_maxpool_nchw_refuses_an_output_it_would_not_fill(geometry, dtype):
    n, c, h, wd, (kh, kw), (sh, sw) = geometry
    x = np.zeros((n, c, h, wd), dtype)
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    for bad in (np.empty((n, c, oh + 1, ow), dtype), np.empty((n, c + 1, oh, ow), dtype),
                np.empty((n, c, oh, 2 * ow), dtype)[..., ::2], np.empty((c, n, oh, ow), dtype).transpose(1, 0, 2, 3)):
        if bad.shape == (n, c, oh, ow) and bad.flags.c_contiguous:
            continue  # one column, or one of n and c: the "strided" view is C-ordered after all
        with pytest.raises(ValueError, match="max pooling"):
            sparse_module.maxpool_nchw(kh, kw, sh, sw, x, bad)
    with pytest.raises(ValueError, match="max pooling"):
        sparse_module.maxpool_nchw(h + 1, kw, sh, sw, x, np.empty((n, c, 0, ow), dtype))


needs_two_threads = pytest.mark.skipif(kernels.JIT_DISABLED or numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="needs the JIT and two numba threads")


@needs_two_threads
@settings(deadline=None, max_examples=15)
@given(chwn=chwn_cases())
def test_a_convolution_split_over_threads_gives_the_serial_bits(chwn):
    serial = _chwn_conv(chwn, threads=1)
    with numba_threads(2):
        for threads in (2, 3):
            assert _chwn_conv(chwn, threads=threads).tobytes() == serial.tobytes()


@needs_two_threads
def test_only_convolutions_from_the_work_threshold_split(monkeypatch):
    monkeypatch.setattr(sparse_module, "SPLIT_MIN_WORK", 10_000)
    with numba_threads(2):
        assert sparse_module.split_threads(9_999, 8) == 1 and sparse_module.split_threads(10_000, 8) == 2
        assert sparse_module.split_threads(10_000, 1) == 1  # one output row: nothing to split
    with numba_threads(1):
        assert sparse_module.split_threads(10**9, 8) == 1
    calls = []
    monkeypatch.setattr(sparse_module.tasks, "run_tasks", lambda count, run, threads: calls.append((count, threads)))
    gen = np.random.default_rng(0)
    w = _csr(gen, 4, 9, 1.0, np.float64)
    x = gen.standard_normal((1, 12, 12, 8))
    for n in (1, 8):  # 10 x 10 x n outputs x 36 weights: 3,600 multiply-adds (serial), 28,800 (split)
        with numba_threads(2):
            sparse_module.csr_conv2d_chwn(3, 3, 1, 1, 0, 0, w.indptr, w.indices, w.data, np.zeros(4), 0, 0.0,
                                          np.ascontiguousarray(x[..., :n]), np.empty((4, 10, 10, n)))
    assert calls == [(8, 2)]  # four tasks of output rows per thread


@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4), dtype=st.sampled_from([np.float32, np.float64]))
def test_aligned_empty_starts_on_a_cache_line_and_holds_the_shape(shape, dtype):
    a = kernels.sparse.aligned_empty(tuple(shape), dtype)
    assert a.shape == tuple(shape) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % 64 == 0 or not a.size
    a[...] = 1  # the whole extent is its own
    assert a.sum() == a.size


@given(case=chain_cases())
def test_a_chain_refuses_a_scratch_its_registers_would_overrun(case):
    weights, biases, acts, alphas, x, dtype = case
    packed = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    width = max(x.shape[1], *(w.shape[0] for w in weights), 1)
    simd = 32 // np.dtype(dtype).itemsize
    out = np.empty((x.shape[0], weights[-1].shape[0]), dtype)
    for bad in (np.empty((2, width, simd + simd // 2), dtype), np.empty((2, width - 1, simd), dtype),
                np.empty((2, width, simd), np.float16), np.empty((2, width, 2 * simd), dtype)[:, :, ::2]):
        with pytest.raises(ValueError, match="a chain's scratch must be"):
            kernels.csr_chain(*packed, x, out, bad)


@given(case=chain_cases())
def test_a_chain_refuses_an_input_or_output_it_would_misread(case):
    weights, biases, acts, alphas, x, dtype = case
    packed = kernels.pack_chain(weights, biases, acts, alphas, dtype)
    (n, k), f = x.shape, weights[-1].shape[0]
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    out = np.empty((n, f), dtype)
    bad = [(np.zeros((n, k + 1), dtype), out), (x, np.empty((n, f + 1), dtype)), (x, np.empty((n + 1, f), dtype)),
           (x, np.empty(n * f, dtype)), (x.astype(other), out), (x, np.empty((n, f), other)),
           (np.zeros((n, 2 * k), dtype)[:, ::2], out), (x, np.empty((f, n), dtype).T)]
    for bad_x, bad_out in bad:
        if bad_x.flags.c_contiguous and bad_out.flags.c_contiguous and bad_x.dtype == bad_out.dtype == dtype and (
                bad_x.size, bad_out.shape) == (x.size, out.shape):
            continue  # a one-column or empty "strided" array is C-ordered after all
        for scratch in (None, kernels.chain_scratch(packed[0], kernels.sparse.TILE_MIN, dtype)):
            with pytest.raises(ValueError, match="a chain"):
                kernels.csr_chain(*packed, bad_x, bad_out, scratch)
