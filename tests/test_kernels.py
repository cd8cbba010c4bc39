"""Tests for sclref.kernels: each kernel against its NumPy twin, each twin against an
independent definition, plus tie-breaking, accumulation, full overwrite of outputs,
run-to-run determinism and an optional PyTorch cross-check."""

import contextlib
import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numba
import numpy as np
import pytest
import scipy.sparse
import threadpoolctl
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba.core.dispatcher import Dispatcher

from sclref import kernels
from sclref import threads as sclref_threads
from sclref.kernels import (
    adam_update,
    add_relu_fwd,
    conv2d_bwd_input,
    conv2d_bwd_weight,
    conv2d_fwd,
    leaky_relu_bwd,
    leaky_relu_fwd,
    masked_weight_bwd,
    masked_weight_fwd,
    maxpool2d_bwd,
    maxpool2d_fwd,
    relu_bwd,
    relu_fwd,
    sgd_update,
)
from sclref.kernels import conv as conv_module
from sclref.kernels import elementwise as elementwise_module
from sclref.kernels import norm as norm_module
from sclref.kernels import optim as optim_module
from sclref.kernels import pool as pool_module
from sclref.kernels import reference as ref
from sclref.kernels import sparse as sparse_module
from sclref.kernels import tasks as tasks_module
from tests.strategies import numba_threads

# Interpreted kernels (NUMBA_DISABLE_JIT=1) are slow: fewer examples keep the run short.
EXAMPLES = 8 if kernels.JIT_DISABLED else 30
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
# Images per conv chunk to force: the kernels' own choice (None), one image (no reordering
# between layouts), two (reordering, and an uneven last chunk when the batch is 3).
CHUNKINGS = {"default-chunks": None, "one-image-chunks": 1, "two-image-chunks": 2}


@pytest.fixture(autouse=True)
def threads_even_on_a_busy_machine(monkeypatch):
    """Calls asked to run on threads do, however late a loaded machine starts them (see `run_tasks`)."""
    monkeypatch.setattr(tasks_module, "SERIAL_SECONDS", 0.0)
    monkeypatch.setattr(tasks_module, "_serial_until", 0.0)


# -- strategies --------------------------------------------------------------------------


@dataclass
class ConvCase:
    n: int
    c: int
    f: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dtype: type
    seed: int

    @property
    def out_hw(self):
        return (self.h + 2 * self.ph - self.kh) // self.sh + 1, (self.w + 2 * self.pw - self.kw) // self.sw + 1

    @property
    def geometry(self):
        return self.sh, self.sw, self.ph, self.pw

    def arrays(self):
        """x, w and an upstream gradient gy, drawn from the case's seed."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.n, self.c, self.h, self.w)).astype(self.dtype)
        w = rng.standard_normal((self.f, self.c, self.kh, self.kw)).astype(self.dtype)
        gy = rng.standard_normal((self.n, self.f, *self.out_hw)).astype(self.dtype)
        return x, w, gy


@st.composite
def conv_cases(draw, max_extra=4):
    """Small conv geometries: strides 1-3, padding up to kernel-1, kernel up to the padded input."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    h = draw(st.integers(max(1, kh - 2 * ph), kh + max_extra))
    w = draw(st.integers(max(1, kw - 2 * pw), kw + max_extra))
    return ConvCase(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)), f=draw(st.integers(1, 3)), h=h, w=w,
                    kh=kh, kw=kw, sh=draw(st.integers(1, 3)), sw=draw(st.integers(1, 3)), ph=ph, pw=pw,
                    dtype=draw(st.sampled_from([np.float32, np.float64])), seed=draw(st.integers(0, 2**32 - 1)))


@st.composite
def same_width_conv_cases(draw):
    """Unit strides and OW == W (odd kw, pw = (kw - 1) // 2): the contiguous-run path of the conv loops."""
    case = draw(conv_cases())
    kw = draw(st.sampled_from([1, 3, 5]))
    return dataclasses.replace(case, sh=1, sw=1, kw=kw, pw=(kw - 1) // 2)


@dataclass
class PoolCase:
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    dtype: type
    seed: int

    @property
    def out_shape(self):
        return self.n, self.c, (self.h - self.kh) // self.sh + 1, (self.w - self.kw) // self.sw + 1

    def x(self, with_nan=False):
        """Input from few distinct values, so windows often tie; optionally with NaNs."""
        rng = np.random.default_rng(self.seed)
        x = rng.integers(-2, 3, size=(self.n, self.c, self.h, self.w)).astype(self.dtype)
        if with_nan:
            x[rng.random(x.shape) < 0.1] = np.nan
        return x


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return PoolCase(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=draw(st.integers(kh, kh + 5)),
                    w=draw(st.integers(kw, kw + 5)), kh=kh, kw=kw, sh=draw(st.integers(1, 3)),
                    sw=draw(st.integers(1, 3)), dtype=draw(st.sampled_from([np.float32, np.float64])),
                    seed=draw(st.integers(0, 2**32 - 1)))


def assert_within(got, want, bound, dtype):
    """|got - want| <= rtol * bound elementwise, bound being the sum of |terms| of each entry."""
    err = np.abs(got.astype(np.float64) - want)
    limit = RTOL[np.dtype(dtype)] * (bound + np.finfo(dtype).tiny)
    worst = np.unravel_index(np.argmax(err - limit), err.shape)
    assert np.all(err <= limit), f"error {err[worst]:.3g} > {limit[worst]:.3g} at {worst}"


@contextlib.contextmanager
def conv_chunks(case, images):
    """Make the conv kernels process `case` in chunks of `images` images (None: their own choice)."""
    old = conv_module.CHUNK_BYTES
    if images is not None:
        oh, ow = case.out_hw
        conv_module.CHUNK_BYTES = images * case.c * case.kh * case.kw * oh * ow * np.dtype(case.dtype).itemsize
    try:
        yield
    finally:
        conv_module.CHUNK_BYTES = old


# -- conv: kernels vs twins ----------------------------------------------------------------

# Corner cases named in the contract: kernel == padded input, 1x1, strided and padded.
_CORNERS = [
    ConvCase(2, 3, 2, 4, 5, 4, 5, 1, 1, 0, 0, np.float64, 1),
    ConvCase(2, 3, 4, 5, 5, 1, 1, 1, 1, 0, 0, np.float32, 2),
    ConvCase(1, 2, 3, 7, 6, 3, 2, 2, 3, 2, 1, np.float64, 3),
    ConvCase(1, 1, 1, 1, 1, 3, 3, 1, 1, 1, 1, np.float32, 4),
]


def _with_corners(test):
    for case in _CORNERS:
        test = example(case=case, chunking="two-image-chunks" if case.n > 1 else "one-image-chunks")(test)
    return test


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=conv_cases(), chunking=st.sampled_from(list(CHUNKINGS)))
@_with_corners
def test_conv2d_fwd_matches_reference(case, chunking):
    x, w, _ = case.arrays()
    out = np.full((case.n, case.f, *case.out_hw), np.nan, dtype=case.dtype)
    with conv_chunks(case, CHUNKINGS[chunking]):
        conv2d_fwd(x, w, *case.geometry, out)
    want = np.empty(out.shape)
    ref.conv2d_fwd(x.astype(np.float64), w.astype(np.float64), *case.geometry, want)
    bound = np.empty(out.shape)
    ref.conv2d_fwd(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), *case.geometry, bound)
    assert out.dtype == case.dtype
    assert_within(out, want, bound, case.dtype)


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=conv_cases(), chunking=st.sampled_from(list(CHUNKINGS)))
@_with_corners
def test_conv2d_bwd_input_matches_reference_and_overwrites_gx(case, chunking):
    x, w, gy = case.arrays()
    gx = np.full(x.shape, np.nan, dtype=case.dtype)
    with conv_chunks(case, CHUNKINGS[chunking]):
        conv2d_bwd_input(gy, w, *case.geometry, gx)
    want = np.empty(x.shape)
    ref.conv2d_bwd_input(gy.astype(np.float64), w.astype(np.float64), *case.geometry, want)
    bound = np.empty(x.shape)
    ref.conv2d_bwd_input(np.abs(gy).astype(np.float64), np.abs(w).astype(np.float64), *case.geometry, bound)
    assert_within(gx, want, bound, case.dtype)


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=conv_cases(), chunking=st.sampled_from(list(CHUNKINGS)))
@_with_corners
def test_conv2d_bwd_weight_matches_reference_and_overwrites_gw(case, chunking):
    x, w, gy = case.arrays()
    gw = np.full(w.shape, np.nan, dtype=case.dtype)
    with conv_chunks(case, CHUNKINGS[chunking]):
        conv2d_bwd_weight(x, gy, *case.geometry, gw)
    want = np.empty(w.shape)
    ref.conv2d_bwd_weight(x.astype(np.float64), gy.astype(np.float64), *case.geometry, want)
    bound = np.empty(w.shape)
    ref.conv2d_bwd_weight(np.abs(x).astype(np.float64), np.abs(gy).astype(np.float64), *case.geometry, bound)
    assert_within(gw, want, bound, case.dtype)


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_conv2d_in_float32_agrees_with_the_float32_twin(chunking):
    case = ConvCase(3, 2, 4, 9, 8, 3, 3, 2, 1, 1, 2, np.float32, 5)
    x, w, gy = case.arrays()
    shape = (case.n, case.f, *case.out_hw)
    got, want = np.empty(shape, np.float32), np.empty(shape, np.float32)
    with conv_chunks(case, CHUNKINGS[chunking]):
        conv2d_fwd(x, w, *case.geometry, got)
    ref.conv2d_fwd(x, w, *case.geometry, want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=same_width_conv_cases(), chunking=st.sampled_from(list(CHUNKINGS)))
def test_same_width_conv_kernels_match_reference(case, chunking):
    x, w, gy = case.arrays()
    assert case.out_hw[1] == case.w
    got = [np.full(gy.shape, np.nan, case.dtype), np.full(x.shape, np.nan, case.dtype),
           np.full(w.shape, np.nan, case.dtype)]
    with conv_chunks(case, CHUNKINGS[chunking]):
        conv2d_fwd(x, w, *case.geometry, got[0])
        conv2d_bwd_input(gy, w, *case.geometry, got[1])
        conv2d_bwd_weight(x, gy, *case.geometry, got[2])
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    for kernel, args, abs_args, out in ((ref.conv2d_fwd, (x64, w64), (np.abs(x64), np.abs(w64)), got[0]),
                                        (ref.conv2d_bwd_input, (gy64, w64), (np.abs(gy64), np.abs(w64)), got[1]),
                                        (ref.conv2d_bwd_weight, (x64, gy64), (np.abs(x64), np.abs(gy64)), got[2])):
        want, bound = np.empty(out.shape), np.empty(out.shape)
        kernel(*args, *case.geometry, want)
        kernel(*abs_args, *case.geometry, bound)
        assert_within(out, want, bound, case.dtype)


# -- conv: twins vs independent definitions ------------------------------------------------


def _conv_direct(x, w, sh, sw, ph, pw):
    """The convolution sum written out, with padding handled by skipping outside taps."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, f, oh, ow))
    for b in range(n):
        for o in range(f):
            for a in range(oh):
                for e in range(ow):
                    for ch in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                r, q = a * sh + i - ph, e * sw + j - pw
                                if 0 <= r < h and 0 <= q < wd:
                                    out[b, o, a, e] += w[o, ch, i, j] * x[b, ch, r, q]
    return out


@pytest.mark.parametrize("geometry", [(1, 1, 0, 0), (2, 1, 1, 0), (2, 3, 1, 2), (3, 2, 2, 2)])
def test_reference_conv2d_fwd_matches_the_direct_sum(geometry):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 2, 6, 7)), rng.standard_normal((3, 2, 3, 3))
    want = _conv_direct(x, w, *geometry)
    got = np.empty(want.shape)
    ref.conv2d_fwd(x, w, *geometry, got)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [(1, 1, 0, 0), (2, 1, 1, 0), (2, 3, 1, 2), (3, 2, 2, 2)])
def test_reference_conv2d_gradients_match_finite_differences(geometry):
    """Random projection: d/dt <u, conv(x + t v, w + t s)> equals <gx, v> + <gw, s>."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 2, 6, 7)), rng.standard_normal((3, 2, 3, 3))
    v, s = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    y = _conv_direct(x, w, *geometry)
    u = rng.standard_normal(y.shape)

    def loss(t):
        return np.sum(u * _conv_direct(x + t * v, w + t * s, *geometry))

    eps = 1e-4
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    gx, gw = np.empty(x.shape), np.empty(w.shape)
    ref.conv2d_bwd_input(u, w, *geometry, gx)
    ref.conv2d_bwd_weight(x, u, *geometry, gw)
    analytic = np.sum(gx * v) + np.sum(gw * s)
    # The loss is quadratic in t, so the central difference is exact up to rounding.
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


def test_a_wrong_conv_gradient_fails_the_finite_difference_check():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((2, 2, 3, 3))
    v = rng.standard_normal(x.shape)
    u = rng.standard_normal(_conv_direct(x, w, 1, 1, 1, 1).shape)
    eps = 1e-4
    numeric = (np.sum(u * _conv_direct(x + eps * v, w, 1, 1, 1, 1))
               - np.sum(u * _conv_direct(x - eps * v, w, 1, 1, 1, 1))) / (2 * eps)
    gx = np.empty(x.shape)
    ref.conv2d_bwd_input(u, w[:, :, ::-1, ::-1].copy(), 1, 1, 1, 1, gx)  # flipped filters: a classic bug
    assert abs(numeric - np.sum(gx * v)) > 1e-3


# -- pooling ------------------------------------------------------------------------------


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=pool_cases(), with_nan=st.booleans())
def test_maxpool2d_fwd_matches_reference_exactly(case, with_nan):
    x = case.x(with_nan)
    out, argmax = np.full(case.out_shape, -7, dtype=case.dtype), np.full(case.out_shape, -1, dtype=np.int64)
    maxpool2d_fwd(x, case.kh, case.kw, case.sh, case.sw, out, argmax)
    want, want_arg = np.empty_like(out), np.empty_like(argmax)
    ref.maxpool2d_fwd(x, case.kh, case.kw, case.sh, case.sw, want, want_arg)
    np.testing.assert_array_equal(argmax, want_arg)
    np.testing.assert_array_equal(out, want)


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=pool_cases())
def test_maxpool2d_bwd_matches_reference_and_overwrites_gx(case):
    x = case.x()
    out, argmax = np.empty(case.out_shape, dtype=case.dtype), np.empty(case.out_shape, dtype=np.int64)
    maxpool2d_fwd(x, case.kh, case.kw, case.sh, case.sw, out, argmax)
    gy = np.random.default_rng(case.seed).standard_normal(case.out_shape).astype(case.dtype)
    gx = np.full(x.shape, np.nan, dtype=case.dtype)
    maxpool2d_bwd(gy, argmax, gx)
    want = np.empty(x.shape, dtype=case.dtype)
    ref.maxpool2d_bwd(gy, argmax, want)
    np.testing.assert_allclose(gx, want, rtol=RTOL[np.dtype(case.dtype)], atol=0)


def _maxpool_loops(x, kh, kw, sh, sw):
    """Window maxima by explicit scan: first strict maximum wins, a NaN beats everything."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out, arg = np.empty((n, c, oh, ow)), np.empty((n, c, oh, ow), dtype=np.int64)
    for b in range(n):
        for ch in range(c):
            for a in range(oh):
                for e in range(ow):
                    best, at = None, None
                    for i in range(kh):
                        for j in range(kw):
                            v = x[b, ch, a * sh + i, e * sw + j]
                            if best is None or (not np.isnan(best) and (np.isnan(v) or v > best)):
                                best, at = v, (a * sh + i) * w + e * sw + j
                    out[b, ch, a, e], arg[b, ch, a, e] = best, at
    return out, arg


@pytest.mark.parametrize("geometry", [(2, 2, 2, 2), (3, 2, 1, 2), (2, 3, 3, 1)])
def test_reference_maxpool2d_fwd_matches_explicit_loops(geometry):
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(2, 2, 7, 8)).astype(np.float64)
    x[0, 0, 1, 1] = x[1, 1, 4, 5] = np.nan
    want, want_arg = _maxpool_loops(x, *geometry)
    got, got_arg = np.empty(want.shape), np.empty(want.shape, dtype=np.int64)
    ref.maxpool2d_fwd(x, *geometry, got, got_arg)
    np.testing.assert_array_equal(got_arg, want_arg)
    np.testing.assert_array_equal(got, want)


def test_reference_maxpool2d_bwd_matches_explicit_loop():
    rng = np.random.default_rng(4)
    argmax = rng.integers(0, 12, size=(2, 3, 4, 4))
    gy = rng.standard_normal(argmax.shape)
    want = np.zeros((2, 3, 3, 4))
    for b, ch, a, e in np.ndindex(argmax.shape):
        want[b, ch].reshape(-1)[argmax[b, ch, a, e]] += gy[b, ch, a, e]
    got = np.empty(want.shape)
    ref.maxpool2d_bwd(gy, argmax, got)
    np.testing.assert_allclose(got, want, rtol=1e-14)


@pytest.mark.parametrize("impl", [maxpool2d_fwd, ref.maxpool2d_fwd], ids=["kernel", "reference"])
def test_maxpool2d_ties_go_to_the_first_maximum_in_row_major_order(impl):
    x = np.array([[[[1.0, 5.0, 5.0],
                    [5.0, 5.0, 0.0],
                    [2.0, 2.0, 2.0]]]])
    out, argmax = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2), dtype=np.int64)
    impl(x, 2, 2, 1, 1, out, argmax)
    np.testing.assert_array_equal(out[0, 0], [[5.0, 5.0], [5.0, 5.0]])
    np.testing.assert_array_equal(argmax[0, 0], [[1, 1], [3, 4]])


@pytest.mark.parametrize("impl", [maxpool2d_fwd, ref.maxpool2d_fwd], ids=["kernel", "reference"])
def test_maxpool2d_propagates_the_first_nan(impl):
    x = np.array([[[[1.0, np.nan], [np.nan, 9.0]]]])
    out, argmax = np.empty((1, 1, 1, 1)), np.empty((1, 1, 1, 1), dtype=np.int64)
    impl(x, 2, 2, 2, 2, out, argmax)
    assert np.isnan(out[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 1


@pytest.mark.parametrize("impl", [maxpool2d_bwd, ref.maxpool2d_bwd], ids=["kernel", "reference"])
def test_maxpool2d_bwd_accumulates_over_overlapping_windows(impl):
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0  # the centre wins all four 2x2 windows at stride 1
    out, argmax = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2), dtype=np.int64)
    maxpool2d_fwd(x, 2, 2, 1, 1, out, argmax)
    assert np.all(argmax == 4)
    gy = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    gx = np.full(x.shape, np.nan)
    impl(gy, argmax, gx)
    want = np.zeros(x.shape)
    want[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(gx, want)


# -- elementwise ---------------------------------------------------------------------------

_special = st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30])


@st.composite
def float_arrays(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))
    elements = st.one_of(st.floats(-10, 10, width=np.dtype(dtype).itemsize * 8), _special)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(deadline=None, max_examples=EXAMPLES)
@given(x=float_arrays(), seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([0.01, 0.2, 1 / 3]))
def test_activations_match_reference_bit_for_bit(x, seed, alpha):
    gy = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    cases = [(relu_fwd, ref.relu_fwd, (x,)), (relu_bwd, ref.relu_bwd, (x, gy)),
             (leaky_relu_fwd, ref.leaky_relu_fwd, (x, alpha)), (leaky_relu_bwd, ref.leaky_relu_bwd, (x, gy, alpha))]
    for kernel, twin, args in cases:
        got, want = np.full_like(x, 7.0), np.full_like(x, -7.0)
        kernel(*args, got)
        twin(*args, want)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, want, err_msg=kernel.__name__)


@settings(deadline=None, max_examples=EXAMPLES)
@given(a=float_arrays(), seed=st.integers(0, 2**32 - 1))
def test_add_relu_matches_its_twin_and_add_then_relu_bit_for_bit(a, seed):
    gen = np.random.default_rng(seed)
    # b = -a in places: sums of exactly +0 and -0, which relu maps to +0
    b = np.where(gen.random(a.shape) < 0.3, -a, gen.standard_normal(a.shape)).astype(a.dtype)
    got, twin, two_passes = np.full_like(a, 7.0), np.full_like(a, -7.0), np.full_like(a, 5.0)
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as it should be
        add_relu_fwd(a, b, got)
        ref.add_relu_fwd(a, b, twin)
        relu_fwd(a + b, two_passes)
    assert got.dtype == a.dtype
    # Bits, but one NaN for all: the sign of NaN + -NaN depends on the order the machine adds them in.
    got, twin, two_passes = (np.where(np.isnan(v), np.nan, v).astype(a.dtype) for v in (got, twin, two_passes))
    assert got.tobytes() == twin.tobytes() == two_passes.tobytes()


def test_add_relu_on_special_values():
    a = np.array([1.0, -1.0, 0.0, -0.0, np.inf, np.inf, np.nan, 2.0])
    b = np.array([-1.0, -0.0, -0.0, -0.0, 1.0, -np.inf, 1.0, 3.0])
    out = np.empty_like(a)
    with np.errstate(invalid="ignore"):  # inf + -inf
        add_relu_fwd(a, b, out)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, np.inf, np.nan, np.nan, 5])
    assert not np.signbit(out[:4]).any()


@settings(deadline=None, max_examples=EXAMPLES)
@given(theta=float_arrays(), seed=st.integers(0, 2**32 - 1))
def test_masked_weight_matches_reference_bit_for_bit(theta, seed):
    gen = np.random.default_rng(seed)
    # s with exact zeros and negative zeros: H(0) = H(-0) = 0
    s = (gen.integers(-2, 3, theta.shape) * gen.random(theta.shape)).astype(theta.dtype)
    g = gen.standard_normal(theta.shape).astype(theta.dtype)
    got, want = np.full_like(theta, 7.0), np.full_like(theta, -7.0)
    masked_weight_fwd(theta, s, got)
    ref.masked_weight_fwd(theta, s, want)
    np.testing.assert_array_equal(got, want)
    got = np.full_like(theta, 7.0), np.full_like(theta, 7.0)
    want = np.full_like(theta, -7.0), np.full_like(theta, -7.0)
    masked_weight_bwd(g, theta, s, *got)
    ref.masked_weight_bwd(g, theta, s, *want)
    for a, b in zip(got, want):
        assert a.dtype == theta.dtype
        np.testing.assert_array_equal(a, b)


def test_masked_weight_on_special_values():
    theta = np.array([2.0, 2.0, 2.0, np.nan, np.inf, 3.0])
    s = np.array([-1.0, 0.0, -0.0, 1.0, 1.0, np.nan])
    out = np.empty_like(theta)
    masked_weight_fwd(theta, s, out)
    np.testing.assert_array_equal(out, [0, 0, 0, np.nan, np.inf, 0])  # NaN score: off
    g = np.full(theta.shape, 0.5)
    g_theta, g_s = np.empty_like(theta), np.empty_like(theta)
    masked_weight_bwd(g, theta, s, g_theta, g_s)
    np.testing.assert_array_equal(g_theta, [0, 0, 0, 0.5, 0.5, 0])
    np.testing.assert_array_equal(g_s, [1, 1, 1, np.nan, np.inf, 1.5])


def test_activations_on_special_values():
    x = np.array([-np.inf, -1.0, -0.0, 0.0, 2.0, np.inf, np.nan])
    gy = np.full(x.shape, 3.0)
    out = np.empty_like(x)
    relu_fwd(x, out)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 2, np.inf, np.nan])
    relu_bwd(x, gy, out)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 3, 3, 0])
    leaky_relu_fwd(x, 0.5, out)
    np.testing.assert_array_equal(out, [-np.inf, -0.5, 0, 0, 2, np.inf, np.nan])
    leaky_relu_bwd(x, gy, 0.5, out)
    np.testing.assert_array_equal(out, [1.5, 1.5, 1.5, 1.5, 3, 3, 1.5])


def test_leaky_relu_rounds_alpha_to_the_array_dtype():
    x = np.array([-3.0], dtype=np.float32)
    out = np.empty_like(x)
    leaky_relu_fwd(x, 0.1, out)
    assert out[0] == np.float32(0.1) * np.float32(-3.0)


# -- batch norm ------------------------------------------------------------------------------


@dataclass
class BatchNormCase:
    n: int
    c: int
    plane: int
    training: bool
    want_gx: bool
    dtype: type
    seed: int

    def arrays(self):
        """x, g (N, C, L), weight, bias, eps and, for eval mode, given mean and variance (C,)."""
        rng = np.random.default_rng(self.seed)
        shape = (self.n, self.c, self.plane)
        # An offset per channel far from 0, so a one-pass variance would lose digits.
        x = (rng.standard_normal(shape) * 2 + rng.uniform(-50, 50, (1, self.c, 1))).astype(self.dtype)
        g = rng.standard_normal(shape).astype(self.dtype)
        weight, bias = (rng.standard_normal(self.c).astype(self.dtype) for _ in range(2))
        mean = rng.standard_normal(self.c).astype(self.dtype)
        var = rng.uniform(0, 2, self.c).astype(self.dtype)
        return x, g, weight, bias, self.dtype(1e-5), mean, var


@st.composite
def batch_norm_cases(draw):
    training = draw(st.booleans())
    n = draw(st.integers(1, 6))
    plane = draw(st.integers(2 if training and n == 1 else 1, 40))
    return BatchNormCase(n=n, c=draw(st.integers(1, 5)), plane=plane, training=training,
                         want_gx=draw(st.booleans()), dtype=draw(st.sampled_from([np.float32, np.float64])),
                         seed=draw(st.integers(0, 2**32 - 1)))


def _batch_norm_both(case, fwd, bwd):
    """Every output of one forward and one backward call of the pair (fwd, bwd) on `case`."""
    x, g, weight, bias, eps, mean, var = case.arrays()
    inv_std, y = np.full(case.c, np.nan, case.dtype), np.full_like(x, np.nan)
    fwd(x, weight, bias, eps, case.training, mean, var, inv_std, y)
    g_sum, gxhat_sum = np.full(case.c, np.nan, case.dtype), np.full(case.c, np.nan, case.dtype)
    gx = np.full_like(x, np.nan)
    bwd(x, g, mean, inv_std, weight, case.training, case.want_gx, g_sum, gxhat_sum, gx)
    return [mean, var, inv_std, y, g_sum, gxhat_sum] + ([gx] if case.want_gx else [])


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=batch_norm_cases())
def test_batch_norm_kernels_match_their_twins_bit_for_bit(case):
    got = _batch_norm_both(case, kernels.batchnorm_fwd, kernels.batchnorm_bwd)
    want = _batch_norm_both(case, norm_module.batchnorm_fwd_reference, norm_module.batchnorm_bwd_reference)
    _assert_same_bits(got, want)
    assert not any(np.isnan(a).any() for a in got)  # every output entry written


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=batch_norm_cases())
def test_batch_norm_twins_match_the_textbook_formulas(case):
    """The twins against float64 NumPy: the normalization and its gradient as usually written."""
    x, g, weight, bias, eps, mean, var = case.arrays()
    mean, var, inv_std, y, g_sum, gxhat_sum, *gx = _batch_norm_both(
        case, norm_module.batchnorm_fwd_reference, norm_module.batchnorm_bwd_reference)
    x64, g64, w64 = x.astype(np.float64), g.astype(np.float64), weight.astype(np.float64)
    if case.training:
        np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=RTOL[np.dtype(case.dtype)], atol=1e-6)
        np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=10 * RTOL[np.dtype(case.dtype)], atol=1e-6)
    m64, inv64 = mean.astype(np.float64), 1 / np.sqrt(var.astype(np.float64) + float(eps))
    xhat = (x64 - m64[:, None]) * inv64[:, None]
    rtol = 10 * RTOL[np.dtype(case.dtype)]
    np.testing.assert_allclose(inv_std, inv64, rtol=rtol)
    np.testing.assert_allclose(y, xhat * w64[:, None] + bias[:, None], rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(g_sum, g64.sum(axis=(0, 2)), rtol=rtol, atol=rtol * x.size)
    np.testing.assert_allclose(gxhat_sum, (g64 * xhat).sum(axis=(0, 2)), rtol=rtol, atol=rtol * x.size)
    if case.want_gx:
        count = x.shape[0] * x.shape[2]
        through = g64 - g64.mean(axis=(0, 2))[:, None] - xhat * (g64 * xhat).mean(axis=(0, 2))[:, None]
        want = (through if case.training else g64) * (inv64 * w64)[:, None]
        bound = (np.abs(g64) + np.abs(g64).sum(axis=(0, 2))[:, None] / count) * np.abs(inv64 * w64)[:, None]
        assert_within(gx[0], want, 10 * bound, case.dtype)


# -- determinism ---------------------------------------------------------------------------

_DETERMINISM_CASES = [
    ConvCase(8, 1, 4, 28, 28, 5, 5, 1, 1, 0, 0, np.float32, 6),   # conv1-like
    ConvCase(8, 4, 6, 12, 12, 5, 5, 1, 1, 0, 0, np.float32, 7),   # conv2-like
    ConvCase(4, 3, 5, 17, 15, 3, 3, 2, 2, 1, 1, np.float64, 8),   # padded and strided
]


def _run_all(case):
    x, w, gy = case.arrays()
    out = np.empty((case.n, case.f, *case.out_hw), dtype=case.dtype)
    gx, gw = np.empty_like(x), np.empty_like(w)
    conv2d_fwd(x, w, *case.geometry, out)
    conv2d_bwd_input(gy, w, *case.geometry, gx)
    conv2d_bwd_weight(x, gy, *case.geometry, gw)
    pooled = np.empty((case.n, case.f, case.out_hw[0] // 2, case.out_hw[1] // 2), dtype=case.dtype)
    argmax = np.empty(pooled.shape, dtype=np.int64)
    maxpool2d_fwd(out, 2, 2, 2, 2, pooled, argmax)
    gpool = np.empty_like(out)
    maxpool2d_bwd(pooled, argmax, gpool)
    act = np.empty_like(out)
    relu_fwd(out, act)
    return [out, gx, gw, pooled, argmax, gpool, act]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("case", _DETERMINISM_CASES, ids=["conv1", "conv2", "strided"])
def test_same_inputs_give_bit_identical_outputs(case, chunking):
    with conv_chunks(case, CHUNKINGS[chunking]):
        first, second = _run_all(case), _run_all(case)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


def test_an_empty_batch_gives_a_zero_weight_gradient():
    x, gy = np.empty((0, 2, 5, 5)), np.empty((0, 3, 3, 3))
    gw = np.full((3, 2, 3, 3), np.nan)
    conv2d_bwd_weight(x, gy, 1, 1, 0, 0, gw)
    np.testing.assert_array_equal(gw, 0.0)


@pytest.mark.skipif(kernels.JIT_DISABLED, reason="the chunking is the same interpreted; the loops would take minutes")
@pytest.mark.parametrize(("n", "hw"), [(256, 6), (32, 16)], ids=["small-maps", "large-maps"])
def test_conv_scratch_memory_is_bounded_for_large_batches(n, hw, monkeypatch):
    """Scratch stays near CHUNK_BYTES (or one image), a fraction of a whole-batch im2col buffer."""
    import tracemalloc

    monkeypatch.setattr(conv_module, "CHUNK_BYTES", 32 << 10)
    case = ConvCase(n, 4, 6, hw, hw, 3, 3, 1, 1, 0, 0, np.float32, 9)
    x, w, gy = case.arrays()
    out, gx, gw = np.empty(gy.shape, np.float32), np.empty_like(x), np.empty_like(w)
    one_image = case.c * case.kh * case.kw * case.out_hw[0] * case.out_hw[1] * 4
    bound = 2 * max(conv_module.CHUNK_BYTES, one_image) + (64 << 10)  # slack for small Python objects
    assert case.n * one_image > 4 * bound
    for run in (lambda: conv2d_fwd(x, w, *case.geometry, out), lambda: conv2d_bwd_input(gy, w, *case.geometry, gx),
                lambda: conv2d_bwd_weight(x, gy, *case.geometry, gw)):
        run()  # compiles the jitted loops first: compilation allocates too
        tracemalloc.start()
        try:
            run()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= bound


_REPO = pathlib.Path(__file__).resolve().parents[1]
_PARALLEL_SCRIPT = """
import numpy as np
from sclref import kernels
from sclref import threads as sclref_threads
from tests.test_kernels import _DETERMINISM_CASES, _run_all
assert kernels.PARALLEL
np.savez({path!r}, *[a for case in _DETERMINISM_CASES for a in _run_all(case)])
"""


@pytest.mark.skipif(kernels.JIT_DISABLED, reason="parallel mode needs the JIT")
def test_parallel_mode_gives_the_same_bits_as_serial_mode(tmp_path):
    path = tmp_path / "parallel.npz"
    env = {**os.environ, "SCLREF_NUMBA_PARALLEL": "1"}
    script = _PARALLEL_SCRIPT.format(path=str(path))
    subprocess.run([sys.executable, "-c", script], env=env, cwd=_REPO, check=True, timeout=600)
    got = np.load(path)
    want = [a for case in _DETERMINISM_CASES for a in _run_all(case)]
    assert len(got.files) == len(want)
    for i, b in enumerate(want):
        assert got[f"arr_{i}"].tobytes() == b.tobytes(), f"array {i} differs"


# -- cross-check against PyTorch -----------------------------------------------------------


@settings(deadline=None, max_examples=EXAMPLES)
@given(case=conv_cases())
def test_conv2d_and_maxpool2d_agree_with_torch(case):
    torch = pytest.importorskip("torch")
    # torch caps padding at half the kernel
    case = dataclasses.replace(case, ph=min(case.ph, case.kh // 2), pw=min(case.pw, case.kw // 2))
    x, w, gy = (a.astype(np.float64) for a in case.arrays())
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, stride=(case.sh, case.sw), padding=(case.ph, case.pw))
    ty.backward(torch.tensor(gy))
    out, gx, gw = np.empty(gy.shape), np.empty(x.shape), np.empty(w.shape)
    conv2d_fwd(x, w, *case.geometry, out)
    conv2d_bwd_input(gy, w, *case.geometry, gx)
    conv2d_bwd_weight(x, gy, *case.geometry, gw)
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-10)

    kh, kw = min(2, case.h), min(2, case.w)
    tp, ti = torch.nn.functional.max_pool2d(torch.tensor(x), (kh, kw), stride=(case.sh, case.sw),
                                            return_indices=True)
    pooled, argmax = np.empty(tp.shape), np.empty(tp.shape, dtype=np.int64)
    maxpool2d_fwd(x, kh, kw, case.sh, case.sw, pooled, argmax)
    np.testing.assert_array_equal(pooled, tp.numpy())
    np.testing.assert_array_equal(argmax, ti.numpy())


# -- compilation flags -----------------------------------------------------------------------


def test_jit_decorator_works_bare_and_called():
    from sclref.kernels._jit import jit, pjit, prange

    @jit
    def add(a, b):
        return a + b

    @pjit()
    def total(x):
        s = 0.0
        for i in prange(x.shape[0]):
            s += x[i]
        return s

    assert add(2, 3) == 5
    assert total(np.arange(5.0)) == 10.0


def test_cache_and_parallel_are_opt_in_through_the_environment():
    code = "import sclref.kernels._jit as j; print(j.CACHE, j.PARALLEL)"
    env = {k: v for k, v in os.environ.items() if k not in ("SCLREF_NUMBA_CACHE", "SCLREF_NUMBA_PARALLEL")}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        env={**env, "SCLREF_NUMBA_CACHE": "1", "SCLREF_NUMBA_PARALLEL": "1"})
    assert off.stdout.split() == ["False", "False"]
    assert on.stdout.split() == ["True", "True"]



@settings(deadline=None, max_examples=EXAMPLES)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-4, 1.0), momentum=st.sampled_from([0.0, 0.5, 0.9]),
       dampening=st.sampled_from([0.0, 0.3]), weight_decay=st.sampled_from([0.0, 1e-3]), nesterov=st.booleans(),
       first=st.booleans())
def test_sgd_update_matches_reference_bit_for_bit(shape, dtype, seed, lr, momentum, dampening, weight_decay,
                                                  nesterov, first):
    nesterov = nesterov and momentum != 0 and dampening == 0
    gen = np.random.default_rng(seed)
    p, g, buf = (gen.standard_normal(shape).astype(dtype) for _ in range(3))
    args = (lr, momentum, dampening, weight_decay, nesterov, first)
    p_k, buf_k, p_r, buf_r = p.copy(), buf.copy(), p.copy(), buf.copy()
    g_before = g.copy()
    sgd_update(p_k, g, buf_k, *args)
    ref.sgd_update(p_r, g, buf_r, *args)
    assert p_k.dtype == dtype
    np.testing.assert_array_equal(p_k, p_r)
    np.testing.assert_array_equal(buf_k, buf_r)
    np.testing.assert_array_equal(g, g_before)  # the gradient is only read
    if momentum == 0:
        np.testing.assert_array_equal(buf_k, buf)


@settings(deadline=None, max_examples=EXAMPLES)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-5, 1.0), beta1=st.sampled_from([0.0, 0.5, 0.9]),
       beta2=st.sampled_from([0.0, 0.99, 0.999]), eps=st.sampled_from([1e-8, 1e-3]), step=st.integers(1, 10_000))
def test_adam_update_matches_reference_bit_for_bit(shape, dtype, seed, lr, beta1, beta2, eps, step):
    gen = np.random.default_rng(seed)
    p, g, m = (gen.standard_normal(shape).astype(dtype) for _ in range(3))
    v = np.abs(gen.standard_normal(shape)).astype(dtype)
    kernel, twin = [a.copy() for a in (p, m, v)], [a.copy() for a in (p, m, v)]
    g_before = g.copy()
    adam_update(kernel[0], g, kernel[1], kernel[2], lr, beta1, beta2, eps, step)
    ref.adam_update(twin[0], g, twin[1], twin[2], lr, beta1, beta2, eps, step)
    for got, want in zip(kernel, twin):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(g, g_before)  # the gradient is only read


# -- jitted vs interpreted -----------------------------------------------------------------
#
# NUMBA_DISABLE_JIT=1 runs the Python functions behind numba's dispatchers. Both must give
# the same bits: a literal such as ``acc = 0.0`` is float64 to numba but adopts float32
# under NumPy 2's rules when interpreted, and fastmath would reorder sums. `interpreted()`
# swaps every dispatcher of the kernel modules for its `.py_func`, so the public kernels
# run exactly as they do with the JIT off, and the two runs are compared bit for bit.

_KERNEL_MODULES = (conv_module, elementwise_module, norm_module, optim_module, pool_module, sparse_module)


def _is_dispatcher(value):
    return isinstance(value, Dispatcher)


@contextlib.contextmanager
def interpreted():
    """Run the public kernels on the plain Python functions their jitted loops are compiled from."""
    factory, planes = pool_module._maxpool_fwd_kernel, sparse_module._maxpool_planes
    swaps = {(pool_module, "_maxpool_fwd_kernel"): lambda kh, kw: factory(kh, kw).py_func,
             (sparse_module, "_maxpool_planes"): lambda kh, kw: planes(kh, kw).py_func}
    # An LLVM intrinsic `_name_ir` has a plain twin `_name_py`; the loops call it as `_name`.
    swaps.update({(sparse_module, name[:-3]): f for name, f in vars(sparse_module).items() if name.endswith("_py")})
    for module in _KERNEL_MODULES:
        for name, value in vars(module).items():
            if _is_dispatcher(value):
                swaps[module, name] = value.py_func
            elif isinstance(value, dict) and value and all(_is_dispatcher(v) for v in value.values()):
                swaps[module, name] = {k: v.py_func for k, v in value.items()}
    old = {key: getattr(*key) for key in swaps}
    for (module, name), value in swaps.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in old.items():
            setattr(module, name, value)


def _jit_and_interpreted(run):
    """run() jitted, then interpreted; each is the list of output arrays."""
    jitted = run()
    with interpreted():
        plain = run()
    return jitted, plain


def _assert_same_bits(jitted, plain):
    assert len(jitted) == len(plain)
    for i, (a, b) in enumerate(zip(jitted, plain)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"output {i} differs between jitted and interpreted"


needs_jit = pytest.mark.skipif(kernels.JIT_DISABLED, reason="with the JIT off both runs are interpreted")
JIT_EXAMPLES = 10


@needs_jit
def test_interpreted_swaps_every_dispatcher_and_restores_them():
    jitted = {(m.__name__, n): v for m in _KERNEL_MODULES for n, v in vars(m).items()}
    with interpreted():
        for module in _KERNEL_MODULES:
            for name, value in vars(module).items():
                assert not _is_dispatcher(value), f"{module.__name__}.{name} is still jitted"
                if isinstance(value, dict):
                    assert not any(_is_dispatcher(v) for v in value.values()), f"{module.__name__}.{name}"
        assert not _is_dispatcher(pool_module._maxpool_fwd_kernel(2, 2))
        assert not _is_dispatcher(sparse_module._maxpool_planes(2, 2))
    assert {(m.__name__, n): v for m in _KERNEL_MODULES for n, v in vars(m).items()} == jitted


@needs_jit
def test_interpreted_catches_a_python_float_accumulator():
    from sclref.kernels._jit import jit

    @jit
    def total(x, out):
        acc = 0.0  # float64 when jitted, float32 arithmetic when interpreted with float32 input
        for i in range(x.shape[0]):
            acc += x[i]
        out[0] = acc

    x = np.float32([1.0, 2.0**-24, 2.0**-24])
    jitted, plain = np.empty(1, np.float32), np.empty(1, np.float32)
    total(x, jitted)
    total.py_func(x, plain)
    assert jitted.tobytes() != plain.tobytes()


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(case=batch_norm_cases())
def test_batch_norm_kernels_give_the_same_bits_interpreted(case):
    _assert_same_bits(*_jit_and_interpreted(lambda: _batch_norm_both(case, norm_module.batchnorm_fwd,
                                                                     norm_module.batchnorm_bwd)))


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(case=st.one_of(conv_cases(), same_width_conv_cases()), chunking=st.sampled_from(list(CHUNKINGS)))
def test_conv_kernels_give_the_same_bits_interpreted(case, chunking):
    x, w, gy = case.arrays()

    def run():
        out, gx, gw = np.empty(gy.shape, case.dtype), np.empty_like(x), np.empty_like(w)
        with conv_chunks(case, CHUNKINGS[chunking]):
            conv2d_fwd(x, w, *case.geometry, out)
            conv2d_bwd_input(gy, w, *case.geometry, gx)
            conv2d_bwd_weight(x, gy, *case.geometry, gw)
        return [out, gx, gw]

    _assert_same_bits(*_jit_and_interpreted(run))


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(case=pool_cases(), with_nan=st.booleans())
def test_maxpool_kernels_give_the_same_bits_interpreted(case, with_nan):
    x = case.x(with_nan)
    gy = np.random.default_rng(case.seed).standard_normal(case.out_shape).astype(case.dtype)

    def run():
        out, argmax = np.empty(case.out_shape, case.dtype), np.empty(case.out_shape, np.int64)
        maxpool2d_fwd(x, case.kh, case.kw, case.sh, case.sw, out, argmax)
        gx = np.empty_like(x)
        maxpool2d_bwd(gy, argmax, gx)
        values = np.empty(case.out_shape, case.dtype)  # the runtime's pooling, without argmax
        sparse_module.maxpool_nchw(case.kh, case.kw, case.sh, case.sw, x, values)
        return [out, argmax, gx, values]

    _assert_same_bits(*_jit_and_interpreted(run))


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(x=float_arrays(), seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([0.01, 0.2, 1 / 3]))
def test_elementwise_kernels_give_the_same_bits_interpreted(x, seed, alpha):
    gen = np.random.default_rng(seed)
    gy = gen.standard_normal(x.shape).astype(x.dtype)
    s = (gen.integers(-2, 3, x.shape) * gen.random(x.shape)).astype(x.dtype)

    def run():
        outs = [np.empty_like(x) for _ in range(8)]
        add_relu_fwd(x, gy, outs[7])
        relu_fwd(x, outs[0])
        relu_bwd(x, gy, outs[1])
        leaky_relu_fwd(x, alpha, outs[2])
        leaky_relu_bwd(x, gy, alpha, outs[3])
        masked_weight_fwd(x, s, outs[4])
        masked_weight_bwd(gy, x, s, outs[5], outs[6])
        return outs

    _assert_same_bits(*_jit_and_interpreted(run))


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=6), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-4, 1.0), momentum=st.sampled_from([0.0, 0.9]),
       dampening=st.sampled_from([0.0, 0.3]), weight_decay=st.sampled_from([0.0, 1e-3]), nesterov=st.booleans())
def test_sgd_update_gives_the_same_bits_interpreted(shape, dtype, seed, lr, momentum, dampening, weight_decay,
                                                     nesterov):
    gen = np.random.default_rng(seed)
    p, g, buf = (gen.standard_normal(shape).astype(dtype) for _ in range(3))

    def run():
        p_k, buf_k = p.copy(), buf.copy()
        for first in (True, False):
            sgd_update(p_k, g, buf_k, lr, momentum, dampening, weight_decay,
                       nesterov and momentum != 0 and dampening == 0, first)
        return [p_k, buf_k]

    _assert_same_bits(*_jit_and_interpreted(run))


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=6), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-5, 1.0))
def test_adam_update_gives_the_same_bits_interpreted(shape, dtype, seed, lr):
    gen = np.random.default_rng(seed)
    p, g, m, v = (gen.standard_normal(shape).astype(dtype) for _ in range(4))

    def run():
        state = [p.copy(), m.copy(), np.abs(v)]
        for step in (1, 2):
            adam_update(state[0], g, state[1], state[2], lr, 0.9, 0.999, 1e-8, step)
        return state

    _assert_same_bits(*_jit_and_interpreted(run))


def _sparse_layers(gen, sizes, density, dtype):
    weights = []
    for k, f in zip(sizes[:-1], sizes[1:]):
        w = scipy.sparse.random_array((f, k), density=density, format="csr", rng=gen, dtype=np.float64)
        w = scipy.sparse.csr_array((w.data.astype(dtype), w.indices.astype(np.int32), w.indptr.astype(np.int32)),
                                   shape=(f, k))
        w.sort_indices()
        weights.append(w)
    return weights


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       n=st.sampled_from([1, 2, 3, 5, 17]), density=st.sampled_from([0.1, 0.5, 1.0]),
       sizes=st.lists(st.integers(1, 20), min_size=2, max_size=4))
def test_sparse_chain_gives_the_same_bits_interpreted(seed, dtype, n, density, sizes):
    gen = np.random.default_rng(seed)
    weights = _sparse_layers(gen, sizes, density, dtype)
    acts = [["relu", "leaky_relu", None][i % 3] for i in range(len(weights))]
    packed = kernels.pack_chain(weights, [gen.standard_normal(w.shape[0]).astype(dtype) for w in weights], acts,
                                [0.1 if a == "leaky_relu" else None for a in acts], dtype)
    x = gen.standard_normal((n, sizes[0])).astype(dtype)

    def run():
        out = np.empty((n, sizes[-1]), dtype)
        scratch = kernels.chain_scratch(packed[0], n, dtype)
        if scratch is not None:  # batch tiles of 8 rows: several tiles from 9 rows
            scratch = np.empty((*scratch.shape[:2], 8), dtype)
        kernels.csr_chain(*packed, x, out, scratch)
        return [out]

    _assert_same_bits(*_jit_and_interpreted(run))


@needs_jit
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]), stride=st.integers(1, 2),
       density=st.sampled_from([0.2, 1.0]))
def test_sparse_conv_gives_the_same_bits_interpreted(seed, dtype, stride, density):
    gen = np.random.default_rng(seed)
    (w,) = _sparse_layers(gen, [2 * 3 * 2, 3], density, dtype)
    b = gen.standard_normal(3).astype(dtype)
    xp = gen.standard_normal((2, 2, 7, 6)).astype(dtype)
    shape = (2, 3, (7 - 3) // stride + 1, (6 - 2) // stride + 1)

    def run():
        out = np.empty(shape, dtype)
        sparse_module.csr_conv2d(3, 2, stride, stride, w.indptr, w.indices, w.data, b, xp, out)
        return [out]

    _assert_same_bits(*_jit_and_interpreted(run))


_JIT_OFF_SCRIPT = """
import numpy as np
from sclref import kernels
from sclref import threads as sclref_threads
from tests.test_kernels import _DETERMINISM_CASES, _run_all
assert kernels.JIT_DISABLED
np.savez({path!r}, *[a for case in _DETERMINISM_CASES for a in _run_all(case)])
"""


def test_a_process_with_the_jit_off_gives_the_same_bits(tmp_path):
    """The real switch, in a fresh process: NUMBA_DISABLE_JIT=1 against this process's kernels."""
    path = tmp_path / "other.npz"
    script = _JIT_OFF_SCRIPT.format(path=str(path))
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=_REPO, check=True, timeout=600)
    got = np.load(path)
    want = [a for case in _DETERMINISM_CASES for a in _run_all(case)]
    assert len(got.files) == len(want)
    for i, b in enumerate(want):
        assert got[f"arr_{i}"].tobytes() == b.tobytes(), f"array {i} differs"


# -- numba's thread count --------------------------------------------------------------------


@needs_jit
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")
@settings(deadline=None, max_examples=JIT_EXAMPLES)
@given(case=st.one_of(conv_cases(), same_width_conv_cases()), chunking=st.sampled_from(list(CHUNKINGS)),
       bn=batch_norm_cases())
def test_conv_and_batch_norm_kernels_give_the_same_bits_on_one_and_two_threads(case, chunking, bn):
    """With BLAS pinned to one thread, as in training, the conv chunks run on numba's thread count."""
    x, w, gy = case.arrays()
    x, gy = np.concatenate([x] * 3), np.concatenate([gy] * 3)  # more chunks than threads
    results = []
    for threads in (1, 2):
        with numba_threads(threads), sclref_threads.pinned(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(tasks_module, "SPLIT_BYTES", 0)  # split batch norm's channels however small
            assert tasks_module.threads_for(2, blas=True) == threads
            out, gx, gw = np.empty(gy.shape, case.dtype), np.empty_like(x), np.empty_like(w)
            with conv_chunks(case, CHUNKINGS[chunking]):
                conv2d_fwd(x, w, *case.geometry, out)
                conv2d_bwd_input(gy, w, *case.geometry, gx)
                conv2d_bwd_weight(x, gy, *case.geometry, gw)
            results.append([out, gx, gw] + _batch_norm_both(bn, kernels.batchnorm_fwd, kernels.batchnorm_bwd))
    _assert_same_bits(*results)
    want = np.empty_like(gw)
    ref.conv2d_bwd_weight(x, gy, *case.geometry, want)
    win = np.abs(ref._windows(x, case.kh, case.kw, *case.geometry, *case.out_hw).astype(np.float64))
    assert_within(results[1][2], want, np.einsum("ncabij,nfab->fcij", win, np.abs(gy)), case.dtype)


@needs_jit
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")
def test_conv_chunks_run_serially_while_blas_has_threads_of_its_own():
    with numba_threads(2):
        with sclref_threads.pinned():
            assert tasks_module.threads_for(4, blas=True) == 2
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            assert tasks_module.threads_for(4, blas=True) == 1
            assert tasks_module.threads_for(4) == 2  # tasks without BLAS still split


@needs_jit
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")
def test_a_blas_outside_numpy_with_threads_of_its_own_leaves_conv_chunks_on_threads(monkeypatch):
    import scipy.linalg  # noqa: F401  (scipy's wheel loads a BLAS of its own, which np.matmul never calls)

    found = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    ours = [lib for lib in found if tasks_module.numpy_owns(lib.filepath)]
    others = [lib for lib in found if not tasks_module.numpy_owns(lib.filepath)]
    assert ours, "NumPy's own BLAS is not recognized"
    assert tasks_module.numpy_owns(np.__file__) and not tasks_module.numpy_owns(scipy.__file__)
    if not others:
        pytest.skip("no BLAS outside NumPy's install is loaded")
    monkeypatch.setattr(tasks_module, "_blas", None)  # found again, with the other BLAS loaded
    with numba_threads(2), sclref_threads.pinned():
        before = [lib.get_num_threads() for lib in others]
        try:
            for lib in others:
                lib.set_num_threads(2)
            assert tasks_module.threads_for(4, blas=True) == 2
        finally:
            for lib, n in zip(others, before):
                lib.set_num_threads(n)


def test_set_numba_threads_stays_within_the_pool():
    with numba_threads(numba.get_num_threads()):
        kernels.set_numba_threads(10**6)
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        kernels.set_numba_threads(0)
        assert numba.get_num_threads() == 1


# -- running tasks on threads ------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 40])
def test_run_tasks_runs_every_task_once_with_slots_below_the_thread_count(count, threads):
    runs = np.zeros(count, np.int64)
    slots = np.full(count, -1)

    def task(i, slot):
        runs[i] += 1
        slots[i] = slot

    kernels.run_tasks(count, task, threads)
    np.testing.assert_array_equal(runs, 1)
    assert np.all((0 <= slots) & (slots < max(threads, 1)))


@pytest.mark.parametrize("n", [0, 1, 5, 64])
@pytest.mark.parametrize("nbytes", [0, 1 << 30], ids=["small", "large"])
def test_run_ranges_covers_the_axis_once_in_consecutive_ranges(n, nbytes):
    seen = np.zeros(n, np.int64)
    ranges = []

    def run(i, j):
        assert 0 <= i <= j <= n
        seen[i:j] += 1
        ranges.append((i, j))

    with numba_threads(min(2, numba.config.NUMBA_NUM_THREADS)):
        kernels.run_ranges(n, nbytes, run)
    np.testing.assert_array_equal(seen, 1)
    if nbytes == 0 or n < 2 or kernels.PARALLEL or kernels.JIT_DISABLED or numba.config.NUMBA_NUM_THREADS < 2:
        assert ranges == [(0, n)]  # too little work to split, or no second thread
    else:
        assert len(ranges) > 1


def test_run_tasks_runs_serially_for_a_while_after_waiting_for_late_pool_threads(monkeypatch):
    monkeypatch.setattr(tasks_module, "SERIAL_SECONDS", 60.0)
    monkeypatch.setattr(tasks_module, "_losses", 0)
    on_pool = threading.Event()

    def held_up(i, slot):
        if slot == 0:  # the caller's task ends only once the pool thread has taken the other
            assert on_pool.wait(30)
        else:
            on_pool.set()
            time.sleep(0.2)  # descheduled by a busy core: the caller waits 0.2 s for a task as short as its own

    for _ in range(tasks_module.LOSSES_TO_PAUSE):  # one late thread is a blip; several in a row, a load
        assert tasks_module._serial_until < time.monotonic()
        on_pool.clear()
        kernels.run_tasks(2, held_up, 2)
    slots = []
    kernels.run_tasks(20, lambda i, slot: slots.append(slot), 2)
    assert slots == [0] * 20
    monkeypatch.setattr(tasks_module, "_serial_until", 0.0)  # the pause is over
    on_pool.clear()
    kernels.run_tasks(2, lambda i, slot: on_pool.set() if slot else on_pool.wait(30), 2)
    assert on_pool.is_set()  # the pool thread ran a task again


def test_run_tasks_raises_what_a_task_raised():
    def task(i, slot):
        if i == 3:
            raise InterruptedError("task 3")

    for threads in (1, 2):
        with pytest.raises(InterruptedError, match="task 3"):
            kernels.run_tasks(10, task, threads)


def test_run_tasks_nested_in_a_task_runs_serially_in_that_thread():
    inner = {}

    def outer(i, slot):
        threads = tasks_module.threads_for(4)
        inner[i] = threads if threading.current_thread() is not threading.main_thread() else None
        kernels.run_tasks(4, lambda j, s: None, threads)

    kernels.run_tasks(8, outer, 2)
    assert all(v in (None, 1) for v in inner.values())
    assert len(inner) == 8
