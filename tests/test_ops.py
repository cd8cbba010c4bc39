"""Every op: forward against a NumPy reference, gradient against finite differences, bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sclref import Tensor, ops
from sclref.testing import check_grads
from tests.strategies import (
    arrays,
    basic_indices,
    batch_norm_shapes,
    broadcastable_pair,
    conv_geometry,
    distinct_arrays,
    pad_widths,
    pool_geometry,
    shapes,
)

T = Tensor

# -- references written independently of sclref's rules -----------------------------------


def conv2d_ref(x, w, b, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, _, h, wd = xp.shape
    f, _, kh, kw = w.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = np.einsum("nckl,fckl->nf", patch, w)
    return out if b is None else out + b[None, :, None, None]


def max_pool_ref(x, k, s):
    n, c, h, w = x.shape
    oh, ow = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    out = np.empty((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]].max(axis=(2, 3))
    return out


def log_softmax_ref(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def batch_norm_ref(x, w, b, mean, var, eps):
    """(x - mean) / sqrt(var + eps) * w + b with (C,) statistics broadcast over axis 1; w, b may be None."""
    c = (slice(None),) + (None,) * (x.ndim - 2)  # index that turns a (C,) vector into (C, 1, ...)
    y = (x - mean[c]) / np.sqrt(var[c] + eps)
    if w is not None:
        y = y * w[c]
    return y if b is None else y + b[c]


def channel_stats(x):
    """Per-channel mean, biased and unbiased variance of an (N, C, ...) array, from the definitions."""
    values = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    mean = values.sum(axis=1) / values.shape[1]
    squares = ((values - mean[:, None]) ** 2).sum(axis=1)
    return mean, squares / values.shape[1], squares / (values.shape[1] - 1)


# -- elementwise binary ops with broadcasting ---------------------------------------------

BINARY = [
    (ops.add, np.add),
    (ops.sub, np.subtract),
    (ops.mul, np.multiply),
    (ops.div, np.divide),
]


@pytest.mark.parametrize("op,ref", BINARY, ids=lambda f: getattr(f, "__name__", ""))
@given(data=st.data(), pair=broadcastable_pair())
def test_binary_forward_and_grad(op, ref, data, pair):
    sa, sb = pair
    a = data.draw(arrays(sa))
    b = data.draw(arrays(sb, low=0.5, high=2.0)) * data.draw(st.sampled_from([-1.0, 1.0]))  # keep div away from 0
    np.testing.assert_allclose(op(T(a), T(b)).data, ref(a, b), rtol=1e-15)
    check_grads(op, a, b)


@given(shape=shapes(), data=st.data())
def test_neg_exp_forward_and_grad(shape, data):
    a = data.draw(arrays(shape))
    np.testing.assert_array_equal(ops.neg(T(a)).data, -a)
    np.testing.assert_allclose(ops.exp(T(a)).data, np.exp(a), rtol=1e-15)
    check_grads(ops.neg, a)
    check_grads(ops.exp, a)


@given(shape=shapes(), data=st.data())
def test_log_forward_and_grad(shape, data):
    a = data.draw(arrays(shape, low=0.2, high=3.0))
    np.testing.assert_allclose(ops.log(T(a)).data, np.log(a), rtol=1e-15)
    check_grads(ops.log, a)


@given(shape=shapes(), p=st.sampled_from([2, 3, -1, 0.5, 1.5, -2.5]), data=st.data())
def test_pow_forward_and_grad(shape, p, data):
    a = data.draw(arrays(shape, low=0.3, high=2.0))
    np.testing.assert_allclose(ops.pow(T(a), p).data, a**p, rtol=1e-14)
    check_grads(lambda t: t**p, a)


@given(shape=shapes(), p=st.sampled_from([2, 3]), data=st.data())
def test_integer_pow_of_negative_base(shape, p, data):
    a = data.draw(arrays(shape, low=-2.0, high=-0.3))
    check_grads(lambda t: t**p, a)


# -- linear algebra and reductions --------------------------------------------------------


@given(m=st.integers(1, 5), k=st.integers(1, 5), n=st.integers(1, 5), batch=shapes(0, 2, 1, 3), data=st.data())
def test_matmul_forward_and_grad(m, k, n, batch, data):
    a = data.draw(arrays(batch + (m, k)))
    b = data.draw(arrays((k, n)))
    np.testing.assert_allclose(ops.matmul(T(a), T(b)).data, a @ b, rtol=1e-13)
    check_grads(ops.matmul, a, b)


@given(k=st.integers(1, 5), f=st.integers(1, 5), batch=shapes(0, 2, 1, 4), bias=st.booleans(), data=st.data())
def test_linear_forward_and_grad(k, f, batch, bias, data):
    x, w, b = data.draw(arrays(batch + (k,))), data.draw(arrays((f, k))), data.draw(arrays((f,)))
    inputs = (x, w, b) if bias else (x, w)
    want = x @ w.T + (b if bias else 0)
    np.testing.assert_allclose(ops.linear(*map(T, inputs)).data, want, rtol=1e-13, atol=1e-15)
    check_grads(ops.linear, *inputs)


def test_linear_bad_inputs():
    with pytest.raises(ValueError, match=r"linear: input \(2, 3\) and weight \(4, 5\) do not align"):
        ops.linear(T(np.ones((2, 3))), T(np.ones((4, 5))))
    with pytest.raises(ValueError, match=r"linear: bias shape \(3,\) != \(4,\)"):
        ops.linear(T(np.ones((2, 5))), T(np.ones((4, 5))), T(np.ones(3)))
    with pytest.raises(TypeError, match="linear: mixed dtypes float32 and float64"):
        ops.linear(T(np.ones((2, 5))), T(np.ones((4, 5), dtype=np.float32)))


@pytest.mark.parametrize("ste", ["identity", "leaky_relu", "softplus", "relu", "clipped"])
@given(shape=shapes(1, 4), data=st.data())
def test_masked_weight_equals_weight_times_step(ste, shape, data):
    # θ's gradient is a true derivative (checked by finite differences); s's is the
    # estimator's by definition: the same as through θ * step(s).
    from sclref import ste as ste_registry

    est = ste_registry.get(ste)
    theta, s = data.draw(arrays(shape)), data.draw(arrays(shape, kink=0.0))
    surrogate = None if est.unit_surrogate else est.surrogate
    fused_t, fused_s = T(theta, requires_grad=True), T(s, requires_grad=True)
    plain_t, plain_s = T(theta, requires_grad=True), T(s, requires_grad=True)
    fused = ops.masked_weight(fused_t, fused_s, surrogate)
    plain = plain_t * ste_registry.step(plain_s, est)
    np.testing.assert_array_equal(fused.data, plain.data)
    g = np.random.default_rng(0).standard_normal(shape)
    fused.backward(g)
    plain.backward(g)
    np.testing.assert_allclose(fused_t.grad, plain_t.grad, rtol=1e-15)
    np.testing.assert_allclose(fused_s.grad, plain_s.grad, rtol=1e-15)
    check_grads(lambda t: ops.masked_weight(t, T(s), surrogate), theta)


def test_masked_weight_bad_inputs():
    with pytest.raises(ValueError, match=r"masked_weight: weight shape \(2, 3\) != mask-variable shape \(3, 2\)"):
        ops.masked_weight(T(np.ones((2, 3))), T(np.ones((3, 2))))
    with pytest.raises(TypeError, match="masked_weight: surrogate must be callable"):
        ops.masked_weight(T(np.ones(2)), T(np.ones(2)), surrogate=1.0)


@given(k=st.integers(1, 5), n=st.integers(1, 4), data=st.data())
def test_matmul_with_vectors(k, n, data):
    v, m, u = data.draw(arrays((k,))), data.draw(arrays((k, n))), data.draw(arrays((k,)))
    check_grads(ops.matmul, v, m)
    check_grads(ops.matmul, m.T.copy(), v)
    check_grads(ops.matmul, v, u)


@pytest.mark.parametrize("op,ref", [(ops.sum, np.sum), (ops.mean, np.mean)], ids=["sum", "mean"])
@given(shape=shapes(1, 4), keepdims=st.booleans(), data=st.data())
def test_reductions_forward_and_grad(op, ref, shape, keepdims, data):
    a = data.draw(arrays(shape))
    axis = data.draw(
        st.none() | st.integers(-len(shape), len(shape) - 1)
        | st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True).map(tuple)
    )
    np.testing.assert_allclose(op(T(a), axis, keepdims).data, ref(a, axis=axis, keepdims=keepdims), rtol=1e-13)
    check_grads(lambda t: op(t, axis, keepdims), a)


@given(shape=shapes(1, 4), data=st.data())
def test_reshape_flatten_transpose(shape, data):
    a = data.draw(arrays(shape))
    np.testing.assert_array_equal(ops.reshape(T(a), (-1,)).data, a.reshape(-1))
    check_grads(lambda t: ops.reshape(t, (a.size,)), a)
    start = data.draw(st.integers(0, len(shape) - 1))
    np.testing.assert_array_equal(ops.flatten(T(a), start).data, a.reshape(shape[:start] + (-1,)))
    check_grads(lambda t: ops.flatten(t, start), a)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    np.testing.assert_array_equal(ops.transpose(T(a), perm).data, a.transpose(perm))
    check_grads(lambda t: ops.transpose(t, perm), a)
    check_grads(lambda t: t.T, a)


@given(shape=shapes(1, 4), data=st.data())
def test_getitem_forward_and_grad(shape, data):
    a = data.draw(arrays(shape))
    key = data.draw(basic_indices(shape))
    np.testing.assert_array_equal(ops.getitem(T(a), key).data, a[key])
    check_grads(lambda t: ops.getitem(t, key), a)


def test_getitem_gradient_lands_on_the_selected_entries_only():
    a = T(np.arange(24.0).reshape(2, 3, 4), requires_grad=True)
    ops.getitem(a, (1, slice(None, None, 2), -1)).backward(np.array([5.0, 7.0]))
    expected = np.zeros((2, 3, 4))
    expected[1, 0, 3], expected[1, 2, 3] = 5.0, 7.0
    np.testing.assert_array_equal(a.grad, expected)


def test_getitem_refuses_what_is_not_basic_indexing():
    a = T(np.ones((2, 3)))
    with pytest.raises(TypeError, match="only integers, slices and ... can index"):
        ops.getitem(a, [0, 1])
    with pytest.raises(TypeError, match="only integers, slices and ... can index"):
        ops.getitem(a, (np.array([0, 1]),))
    with pytest.raises(TypeError, match="boolean indices"):
        ops.getitem(a, True)
    with pytest.raises(TypeError, match="slice fields must be integers"):
        ops.getitem(a, slice(0.5, None))
    with pytest.raises(ValueError, match="index 3 is out of range for axis 1 of size 3"):
        ops.getitem(a, (0, 3))
    with pytest.raises(ValueError, match="index -3 is out of range for axis 0 of size 2"):
        ops.getitem(a, -3)
    with pytest.raises(ValueError, match="3 indices for a tensor with 2 dimensions"):
        ops.getitem(a, (0, 0, 0))
    with pytest.raises(ValueError, match="single ellipsis"):
        ops.getitem(a, (..., 0, ...))
    with pytest.raises(ValueError, match="step cannot be zero"):
        ops.getitem(a, slice(None, None, 0))


@given(shape=shapes(1, 4), data=st.data())
def test_pad_forward_and_grad(shape, data):
    a = data.draw(arrays(shape))
    widths = data.draw(pad_widths(len(shape)))
    np.testing.assert_array_equal(ops.pad(T(a), widths).data, np.pad(a, widths))
    check_grads(lambda t: ops.pad(t, widths), a)


def test_pad_bad_inputs():
    a = T(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"one \(before, after\) pair for each of the 2 axes"):
        ops.pad(a, ((1, 1),))
    with pytest.raises(ValueError, match=r"one \(before, after\) pair for each of the 2 axes"):
        ops.pad(a, ((1, 1), (1, 1, 1)))
    with pytest.raises(ValueError, match="widths must be integers >= 0"):
        ops.pad(a, ((0, 0), (-1, 0)))
    with pytest.raises(ValueError, match="widths must be integers >= 0"):
        ops.pad(a, ((0, 0), (0.5, 0)))
    with pytest.raises(TypeError, match="pad_width must be a sequence"):
        ops.pad(a, 2)


# -- activations and losses --------------------------------------------------------------


@given(shape=shapes(), data=st.data())
def test_relu_forward_and_grad(shape, data):
    a = data.draw(arrays(shape, kink=0.0))
    np.testing.assert_array_equal(ops.relu(T(a)).data, np.maximum(a, 0))
    check_grads(ops.relu, a)


@given(shape=shapes(), data=st.data())
def test_add_relu_equals_relu_of_add_and_its_grad_is_exact(shape, data):
    a = data.draw(arrays(shape))
    b = data.draw(arrays(shape, kink=0.0)) - a  # a + b stays at least 0.05 from relu's kink
    fused_a, fused_b = T(a, requires_grad=True), T(b, requires_grad=True)
    plain_a, plain_b = T(a, requires_grad=True), T(b, requires_grad=True)
    fused = ops.add_relu(fused_a, fused_b)
    plain = ops.relu(ops.add(plain_a, plain_b))
    assert fused.data.tobytes() == plain.data.tobytes()
    g = np.random.default_rng(0).standard_normal(shape)
    fused.backward(g)
    plain.backward(g)
    for got, want in ((fused_a.grad, plain_a.grad), (fused_b.grad, plain_b.grad)):
        assert got.tobytes() == want.tobytes()
    assert fused_a.grad is not fused_b.grad  # two leaves never share a gradient array
    check_grads(ops.add_relu, a, b)


def test_add_relu_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match=r"add_relu: shapes \(2, 3\) and \(3,\) differ"):
        ops.add_relu(T(np.ones((2, 3))), T(np.ones(3)))
    with pytest.raises(TypeError, match="add_relu: mixed dtypes float32 and float64"):
        ops.add_relu(T(np.ones(2)), T(np.ones(2), dtype=np.float32))
    with pytest.raises(TypeError, match="add_relu: expected a Tensor"):
        ops.add_relu(np.ones(2), T(np.ones(2)))


@given(shape=shapes(), alpha=st.floats(0.0, 0.5), data=st.data())
def test_leaky_relu_forward_and_grad(shape, alpha, data):
    a = data.draw(arrays(shape, kink=0.0))
    np.testing.assert_allclose(ops.leaky_relu(T(a), alpha).data, np.where(a > 0, a, alpha * a), rtol=1e-15)
    check_grads(lambda t: ops.leaky_relu(t, alpha), a)


@given(shape=shapes(), data=st.data())
def test_sigmoid_forward_and_grad(shape, data):
    a = data.draw(arrays(shape, low=-8, high=8))
    np.testing.assert_allclose(ops.sigmoid(T(a)).data, 1 / (1 + np.exp(-a)), rtol=1e-14)
    check_grads(ops.sigmoid, a)


def test_sigmoid_does_not_overflow():
    y = ops.sigmoid(T([-1000.0, 0.0, 1000.0])).data
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


@given(shape=shapes(1, 3), data=st.data())
def test_log_softmax_forward_and_grad(shape, data):
    a = data.draw(arrays(shape, low=-5, high=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    np.testing.assert_allclose(ops.log_softmax(T(a), axis).data, log_softmax_ref(a, axis), rtol=1e-12, atol=1e-14)
    check_grads(lambda t: ops.log_softmax(t, axis), a)


@given(n=st.integers(1, 6), c=st.integers(1, 6), reduction=st.sampled_from(["mean", "sum", "none"]), data=st.data())
def test_cross_entropy_forward_and_grad(n, c, reduction, data):
    logits = data.draw(arrays((n, c), low=-4, high=4))
    labels = np.asarray(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    losses = -log_softmax_ref(logits, 1)[np.arange(n), labels]
    expected = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    np.testing.assert_allclose(ops.cross_entropy(T(logits), labels, reduction).data, expected, rtol=1e-12)
    check_grads(lambda t: ops.cross_entropy(t, labels, reduction), logits)


def test_cross_entropy_of_huge_logits_is_finite():
    loss = ops.cross_entropy(T([[1000.0, 0.0], [0.0, -1000.0]]), np.array([1, 1]))
    assert np.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), 1000.0)


# -- convolution, pooling, dropout -------------------------------------------------------


@given(geom=conv_geometry(), bias=st.booleans(), data=st.data())
def test_conv2d_forward_and_grad(geom, bias, data):
    n, c, f, h, w, kh, kw, stride, padding = geom
    x = data.draw(arrays((n, c, h, w)))
    wt = data.draw(arrays((f, c, kh, kw)))
    b = data.draw(arrays((f,))) if bias else None
    out = ops.conv2d(T(x), T(wt), None if b is None else T(b), stride, padding)
    np.testing.assert_allclose(out.data, conv2d_ref(x, wt, b, stride, padding), rtol=1e-12, atol=1e-12)
    if bias:
        check_grads(lambda a, k, c_: ops.conv2d(a, k, c_, stride, padding), x, wt, b)
    else:
        check_grads(lambda a, k: ops.conv2d(a, k, None, stride, padding), x, wt)


@given(geom=pool_geometry(), data=st.data())
def test_max_pool2d_forward_and_grad(geom, data):
    n, c, h, w, k, s = geom
    x = data.draw(distinct_arrays((n, c, h, w)))
    np.testing.assert_array_equal(ops.max_pool2d(T(x), k, s).data, max_pool_ref(x, k, s))
    check_grads(lambda t: ops.max_pool2d(t, k, s), x)


@given(shape=shapes(1, 3), p=st.floats(0.05, 0.9), seed=st.integers(0, 2**31), data=st.data())
def test_dropout_forward_and_grad(shape, p, seed, data):
    a = data.draw(arrays(shape))
    y = ops.dropout(T(a), p, generator=np.random.default_rng(seed)).data
    kept = y != 0
    np.testing.assert_allclose(y[kept], a[kept] / (1 - p), rtol=1e-14)
    same = ops.dropout(T(a), p, generator=np.random.default_rng(seed)).data
    np.testing.assert_array_equal(y, same)
    check_grads(lambda t: ops.dropout(t, p, generator=np.random.default_rng(seed)), a)


def test_dropout_keeps_the_expected_fraction_and_is_off_in_eval():
    a = T(np.ones(200_000))
    y = ops.dropout(a, 0.3, generator=np.random.default_rng(1)).data
    assert abs((y == 0).mean() - 0.3) < 0.005
    assert ops.dropout(a, 0.3, training=False) is a


# -- normalization and global pooling --------------------------------------------------

AFFINE = st.sampled_from(["weight and bias", "weight", "bias", "none"])


def affine_inputs(data, affine, c):
    """The (C,) weight and bias of one affine choice: an array, or None where the choice leaves it out."""
    w = data.draw(arrays((c,), low=0.5, high=2.0)) * data.draw(st.sampled_from([-1.0, 1.0]))
    b = data.draw(arrays((c,)))
    return (w if "weight" in affine else None), (b if "bias" in affine else None)


def batch_norm_of(w, b, **kwargs):
    """A function of x and of those of w, b that are not None, for check_grads."""
    def f(x, *ts):
        ts = list(ts)
        weight = ts.pop(0) if w is not None else None
        bias = ts.pop(0) if b is not None else None
        return ops.batch_norm(x, weight, bias, **kwargs)
    return f


@given(shape=batch_norm_shapes(), affine=AFFINE, momentum=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       eps=st.sampled_from([1e-5, 1e-3, 0.5]), data=st.data())
def test_batch_norm_training_forward_running_stats_and_grad(shape, affine, momentum, eps, data):
    c = shape[1]
    x = data.draw(arrays(shape, low=-2.0, high=3.0))
    w, b = affine_inputs(data, affine, c)
    old_mean, old_var = data.draw(arrays((c,))), data.draw(arrays((c,), low=0.1, high=2.0))
    running_mean, running_var = old_mean.copy(), old_var.copy()
    y = ops.batch_norm(T(x), None if w is None else T(w), None if b is None else T(b), running_mean, running_var,
                       training=True, momentum=momentum, eps=eps)
    mean, biased, unbiased = channel_stats(x)
    np.testing.assert_allclose(y.data, batch_norm_ref(x, w, b, mean, biased, eps), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(running_mean, (1 - momentum) * old_mean + momentum * mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(running_var, (1 - momentum) * old_var + momentum * unbiased, rtol=1e-13, atol=1e-15)
    inputs = [v for v in (x, w, b) if v is not None]
    check_grads(batch_norm_of(w, b, training=True, eps=eps), *inputs)


@given(shape=batch_norm_shapes(), affine=AFFINE, eps=st.sampled_from([1e-5, 0.5]), data=st.data())
def test_batch_norm_eval_forward_and_grad_use_the_running_statistics(shape, affine, eps, data):
    c = shape[1]
    x = data.draw(arrays(shape, low=-2.0, high=3.0))
    w, b = affine_inputs(data, affine, c)
    running_mean, running_var = data.draw(arrays((c,))), data.draw(arrays((c,), low=0.0, high=2.0))
    before = running_mean.copy(), running_var.copy()
    y = ops.batch_norm(T(x), None if w is None else T(w), None if b is None else T(b), running_mean, running_var,
                       training=False, eps=eps)
    np.testing.assert_allclose(y.data, batch_norm_ref(x, w, b, running_mean, running_var, eps), rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])
    inputs = [v for v in (x, w, b) if v is not None]
    check_grads(batch_norm_of(w, b, running_mean=running_mean, running_var=running_var, eps=eps), *inputs)


def test_batch_norm_op_stays_pure_and_the_running_statistics_change_once_per_call():
    gen = np.random.default_rng(4)
    x, w, b = T(gen.standard_normal((3, 2, 2, 2)), requires_grad=True), T(np.ones(2)), T(np.zeros(2))
    running_mean, running_var = np.zeros(2), np.ones(2)
    y = ops.batch_norm(x, w, b, running_mean, running_var, training=True)
    after_call = running_mean.copy(), running_var.copy()
    assert not np.array_equal(after_call[0], np.zeros(2))
    ctx = y._ctx  # re-run the recorded op as check_grads does when it looks for a wrong rule
    again = type(ctx)(ctx.parents, ctx.params).forward(x.data, w.data, b.data, **ctx.params)
    np.testing.assert_array_equal(again, y.data)
    y.backward(gen.standard_normal(y.shape))
    np.testing.assert_array_equal(running_mean, after_call[0])
    np.testing.assert_array_equal(running_var, after_call[1])

    # In eval mode the op keeps its own copy of the statistics: a later update does not change it.
    z = ops.batch_norm(x, w, b, running_mean, running_var, training=False)
    ctx = z._ctx
    running_mean += 1.0
    again = type(ctx)(ctx.parents, ctx.params).forward(x.data, w.data, b.data, **ctx.params)
    np.testing.assert_array_equal(again, z.data)


def test_batch_norm_in_float32_stays_float32_and_matches_float64():
    gen = np.random.default_rng(5)
    x, w, b = gen.standard_normal((8, 3, 4, 4)), gen.standard_normal(3), gen.standard_normal(3)
    want = ops.batch_norm(T(x), T(w), T(b), training=True).data
    rm32, rv32 = np.zeros(3, np.float32), np.ones(3, np.float32)
    x32 = T(x, requires_grad=True, dtype=np.float32)
    got = ops.batch_norm(x32, T(w, dtype=np.float32), T(b, dtype=np.float32), rm32, rv32, training=True)
    assert got.dtype == np.float32 and rm32.dtype == np.float32
    np.testing.assert_allclose(got.data, want, rtol=1e-4, atol=1e-5)
    got.sum().backward()
    assert x32.grad.dtype == np.float32
    with pytest.raises(TypeError, match=r"mixed dtypes float32 \(input\) and float64 \(running_mean\)"):
        ops.batch_norm(x32, running_mean=np.zeros(3), running_var=np.ones(3), training=True)


def test_batch_norm_bad_inputs():
    x = T(np.ones((4, 3)))
    stats = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    with pytest.raises(ValueError, match=r"input must be \(N, C, ...\), got shape \(4,\)"):
        ops.batch_norm(T(np.ones(4)), training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\) for 3 channels, got \(2,\)"):
        ops.batch_norm(x, T(np.ones(2)), training=True)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        ops.batch_norm(x, None, T(np.ones(4)), training=True)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\), got \(4,\)"):
        ops.batch_norm(x, running_mean=np.zeros(3), running_var=np.ones(4))
    with pytest.raises(TypeError, match="running_mean must be an ndarray"):
        ops.batch_norm(x, running_mean=[0.0, 0.0, 0.0], running_var=np.ones(3))
    with pytest.raises(ValueError, match="both running_mean and running_var, or neither"):
        ops.batch_norm(x, running_mean=np.zeros(3), training=True)
    with pytest.raises(ValueError, match="eval mode needs running_mean and running_var"):
        ops.batch_norm(x)
    with pytest.raises(ValueError, match="more than one value per channel"):
        ops.batch_norm(T(np.ones((1, 3, 1, 1))), training=True)
    with pytest.raises(ValueError, match="momentum must be a number in"):
        ops.batch_norm(x, training=True, momentum=1.5, **stats)
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        ops.batch_norm(x, training=True, eps=0.0)
    with pytest.raises(ValueError, match="running_var finite and >= 0"):
        ops.batch_norm(x, running_mean=np.zeros(3), running_var=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="running_mean must be finite"):
        ops.batch_norm(x, running_mean=np.array([0.0, np.nan, 0.0]), running_var=np.ones(3))
    with pytest.raises(TypeError, match="batch_norm: mixed dtypes float32 and float64"):
        ops.batch_norm(x, T(np.ones(3, dtype=np.float32)), training=True)


@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), data=st.data())
def test_global_avg_pool2d_forward_and_grad(n, c, h, w, data):
    x = data.draw(arrays((n, c, h, w)))
    want = np.array([[x[i, j].sum() / (h * w) for j in range(c)] for i in range(n)])
    np.testing.assert_allclose(ops.global_avg_pool2d(T(x)).data, want, rtol=1e-14, atol=1e-15)
    check_grads(ops.global_avg_pool2d, x)


def test_global_avg_pool2d_bad_inputs():
    with pytest.raises(ValueError, match=r"global_avg_pool2d: input must be 4-D \(N, C, H, W\), got shape \(2, 3\)"):
        ops.global_avg_pool2d(T(np.ones((2, 3))))
    with pytest.raises(ValueError, match="no pixels to average"):
        ops.global_avg_pool2d(T(np.ones((2, 3, 0, 4))))


# -- bad input: clear errors naming the problem --------------------------------------------


def test_matmul_shape_mismatch():
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not align"):
        ops.matmul(T(np.ones((2, 3))), T(np.ones((4, 5))))


def test_broadcast_mismatch_names_the_op():
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        T(np.ones((2, 3))) + T(np.ones(4))


def test_conv2d_bad_inputs():
    x, w = T(np.ones((1, 3, 5, 5))), T(np.ones((2, 1, 3, 3)))
    with pytest.raises(ValueError, match="input has 3 channels but weight"):
        ops.conv2d(x, w)
    with pytest.raises(ValueError, match="4-D"):
        ops.conv2d(T(np.ones((3, 5, 5))), w)
    with pytest.raises(ValueError, match="larger than the padded input"):
        ops.conv2d(T(np.ones((1, 1, 2, 2))), w)
    with pytest.raises(ValueError, match="stride"):
        ops.conv2d(T(np.ones((1, 1, 5, 5))), w, stride=0)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.conv2d(T(np.ones((1, 1, 5, 5))), w, T(np.ones(3)))


def test_max_pool_bad_inputs():
    with pytest.raises(ValueError, match="larger than the input"):
        ops.max_pool2d(T(np.ones((1, 1, 2, 2))), 3)
    with pytest.raises(ValueError, match="NaN"):
        ops.max_pool2d(T(np.full((1, 1, 2, 2), np.nan)), 2)


def test_cross_entropy_bad_labels():
    logits = T(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"label 4 is outside the class range \[0, 4\)"):
        ops.cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="label -1"):
        ops.cross_entropy(logits, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="expected 3 labels"):
        ops.cross_entropy(logits, np.array([0, 1]))
    with pytest.raises(TypeError, match="labels must be integers"):
        ops.cross_entropy(logits, np.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="logits must be"):
        ops.cross_entropy(T(np.zeros(4)), np.array([0]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused(bad):
    logits = np.zeros((2, 3))
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.cross_entropy(T(logits), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.log_softmax(T(logits))


def test_log_and_pow_domain_errors():
    with pytest.raises(ValueError, match="log: input must be positive"):
        ops.log(T([1.0, -1.0]))
    with pytest.raises(ValueError, match="log: input must be positive"):
        ops.log(T([1.0, np.nan]))
    with pytest.raises(ValueError, match="negative base"):
        T([-1.0]) ** 0.5
    with pytest.raises(ValueError, match="zero base"):
        T([0.0]) ** -1
    with pytest.raises(TypeError, match="exponent must be a constant"):
        T([1.0]) ** T([2.0])


def test_reduction_and_shape_errors():
    a = T(np.ones((2, 3)))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ops.sum(a, 2)
    with pytest.raises(ValueError, match="cannot reshape"):
        ops.reshape(a, (4,))
    with pytest.raises(ValueError, match="not a permutation"):
        ops.transpose(a, (0, 0))
    with pytest.raises(ValueError, match="dropout: p must be"):
        ops.dropout(a, 1.0)
