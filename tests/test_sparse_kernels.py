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


@st.composite
def csr_cases(draw):
    gen = np.random.default_rng(draw(SEEDS))
    f, k = draw(st.integers(0, MAX)), draw(st.integers(1, MAX))
    n = draw(st.integers(1, 9 if kernels.JIT_DISABLED else 2 * MAX))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    w = sp.random_array((f, k), density=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])), format="csr", rng=gen)
    w = sp.csr_array((w.data.astype(dtype), w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(f, k))
    w.sort_indices()
    return w, gen.standard_normal(f).astype(dtype), gen.standard_normal((n, k)).astype(dtype), dtype


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernel", "twin"])
@given(case=csr_cases())
def test_csr_spmm_and_matvecs_match_scipy(impl, case):
    w, b, x, dtype = case
    expect = (w @ x.T).T.astype(np.float64) + b
    out = np.full((x.shape[0], w.shape[0]), np.nan, dtype)
    impl.csr_spmm(w.indptr, w.indices, w.data, b, x, out)
    np.testing.assert_allclose(out, expect, rtol=TOL[dtype], atol=TOL[dtype])
    outt = np.full((w.shape[0], x.shape[0]), np.nan, dtype)
    impl.csr_matvecs(w.indptr, w.indices, w.data, b, np.ascontiguousarray(x.T), outt)
    np.testing.assert_allclose(outt.T, expect, rtol=TOL[dtype], atol=TOL[dtype])


@given(case=csr_cases())
def test_kernel_results_do_not_depend_on_the_batch(case):
    w, b, x, dtype = case
    whole = np.empty((x.shape[0], w.shape[0]), dtype)
    kernels.csr_spmm(w.indptr, w.indices, w.data, b, x, whole)
    for r in range(min(3, x.shape[0])):
        one = np.empty((1, w.shape[0]), dtype)
        kernels.csr_spmm(w.indptr, w.indices, w.data, b, x[r:r + 1], one)
        assert np.array_equal(one[0], whole[r])


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernel", "twin"])
@given(case=csr_cases())
def test_gather_transpose(impl, case):
    _, _, x, dtype = case
    cols = np.unique(np.random.default_rng(0).integers(0, x.shape[1], size=x.shape[1])).astype(np.int32)
    out = np.empty((cols.size, x.shape[0]), dtype)
    impl.gather_transpose(x, cols, out)
    assert np.array_equal(out, x[:, cols].T)


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
