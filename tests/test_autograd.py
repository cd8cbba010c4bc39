"""The graph core: fan-out, diamonds, deep chains, no_grad, leaves, dtypes, determinism."""

import numpy as np
import pytest

import sclref
from sclref import Tensor, no_grad, ops
from sclref.autograd import Function


def leaf(values, dtype=None):
    return Tensor(np.asarray(values, dtype=np.float64 if dtype is None else dtype), requires_grad=True)


def test_fan_out_add_same_tensor_twice():
    a = leaf([1.0, -2.0, 3.0])
    (a + a).sum().backward()
    np.testing.assert_array_equal(a.grad, [2.0, 2.0, 2.0])


def test_fan_out_mul_same_tensor_twice():
    a = leaf([1.0, -2.0, 3.0])
    (a * a).sum().backward()
    np.testing.assert_array_equal(a.grad, 2 * a.data)


def test_diamond_graph_sums_both_paths():
    # y = (x*2) * (x+1) = 2x^2 + 2x, dy/dx = 4x + 2
    x = leaf([0.5, -1.5])
    top = x * 2.0
    y = top * (x + 1.0)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 4 * x.data + 2, rtol=1e-15)


def test_shared_intermediate_used_three_times():
    x = leaf([2.0])
    h = x * 3.0
    y = h * h + h  # 9x^2 + 3x -> 18x + 3
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 18 * x.data + 3)


def test_5000_deep_chain_has_no_recursion_limit():
    x = leaf([1.0])
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001**5000], rtol=1e-10)


def test_grads_accumulate_across_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])


def test_non_leaf_grads_are_not_kept():
    x = leaf([1.0, 2.0])
    h = x * 2.0
    (h * h).sum().backward()
    assert h.grad is None
    assert not h.is_leaf and x.is_leaf
    assert x.grad is not None


@pytest.mark.parametrize("head", [lambda y: y.sum(), lambda y: ops.relu(y).sum()], ids=["view", "fresh"])
def test_leaves_never_share_a_grad_buffer(head):
    # "fresh": relu's backward makes a new array that add hands to both leaves as is.
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    head(a + b).backward()
    assert not np.shares_memory(a.grad, b.grad)
    a.grad[0] = 100.0
    assert b.grad[0] == 1.0


def test_a_leaf_grad_never_aliases_the_callers_gradient():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    seed = np.array([1.0, 1.0])
    (a + b).backward(grad=seed)
    assert not np.shares_memory(a.grad, seed) and not np.shares_memory(b.grad, seed)
    a.backward(grad=seed)  # a leaf's own backward accumulates a copy too
    seed[0] = 7.0
    np.testing.assert_array_equal(a.grad, [2.0, 2.0])


def test_backward_does_not_mutate_forward_arrays():
    x = leaf([-1.0, 2.0, -3.0])
    before = x.data.copy()
    y = ops.relu(x * 2.0)
    y_before = y.data.copy()
    (y * y).sum().backward()
    np.testing.assert_array_equal(x.data, before)
    np.testing.assert_array_equal(y.data, y_before)


def test_no_grad_records_nothing():
    x = leaf([1.0])
    with no_grad():
        y = x * 2.0
        assert not sclref.is_grad_enabled()
    assert sclref.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_no_grad_as_decorator_restores_state_on_error():
    @no_grad()
    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        boom()
    assert sclref.is_grad_enabled()


def test_constant_inputs_get_no_grad():
    x = leaf([1.0, 2.0])
    c = Tensor([3.0, 4.0])
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_second_backward_through_freed_graph_is_an_error():
    x = leaf([1.0])
    y = (x * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = leaf([1.0])
    y = (x * 2.0).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad, [4.0])


def test_backward_needs_scalar_or_explicit_grad():
    x = leaf([1.0, 2.0])
    y = x * 2.0
    with pytest.raises(RuntimeError, match="single-element"):
        y.backward()
    with pytest.raises(ValueError, match="gradient shape"):
        y.backward(np.ones(3))
    y.backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 20.0])


def test_backward_on_a_leaf_sets_its_grad():
    x = leaf([5.0])
    x.backward()
    np.testing.assert_array_equal(x.grad, [1.0])


def test_wrong_shape_from_a_rule_is_caught_where_it_happens():
    class Broken(Function):
        def forward(self, a):
            return a * 2

        def backward(self, g):
            return (g[:1],)

    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="Broken.backward returned a gradient of shape"):
        Broken.apply(x).sum().backward()


# -- dtypes ------------------------------------------------------------------------------


def test_default_dtype_is_float64():
    assert Tensor([1, 2]).dtype == np.float64
    assert Tensor(3).dtype == np.float64
    assert Tensor(np.arange(3, dtype=np.int32)).dtype == np.float64


def test_float32_stays_float32_end_to_end():
    gen = np.random.default_rng(0)
    x = Tensor(gen.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    w = Tensor(gen.standard_normal((3, 2)).astype(np.float32), requires_grad=True)
    y = ops.log_softmax(ops.sigmoid((x @ w) * 2.0 + 1.0) ** 2 / 3.0 - 0.5)
    assert y.dtype == np.float32
    ops.cross_entropy(y, np.array([0, 1, 1, 0])).backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div, ops.matmul])
def test_mixed_dtypes_are_an_error(op):
    a = Tensor(np.ones((2, 2), dtype=np.float32))
    b = Tensor(np.ones((2, 2), dtype=np.float64))
    with pytest.raises(TypeError, match="mixed dtypes float32 and float64"):
        op(a, b)


def test_mixing_with_a_float64_ndarray_is_an_error_but_python_scalars_adapt():
    a = Tensor(np.ones(2, dtype=np.float32))
    with pytest.raises(TypeError, match="mixed dtypes"):
        a + np.ones(2)
    assert (a + 1.5).dtype == np.float32
    assert (2 * a).dtype == np.float32


def test_non_float_dtypes_are_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        Tensor([1, 2], dtype=np.int64)
    with pytest.raises(TypeError, match="dtype"):
        Tensor(np.array(["a"]))


def test_cast_is_differentiable_and_restores_dtype():
    x = leaf([1.0, 2.0])
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    (y * 3.0).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


# -- reproducibility --------------------------------------------------------------------


def _train_a_few_steps(seed):
    sclref.manual_seed(seed)
    net = sclref.nn.Sequential(
        sclref.nn.Conv2d(1, 3, 3), sclref.nn.ReLU(), sclref.nn.MaxPool2d(2), sclref.nn.Flatten(),
        sclref.nn.Dropout(0.3), sclref.nn.Linear(3 * 3 * 3, 4),
    )
    x = Tensor(sclref.rng.default_generator().standard_normal((5, 1, 8, 8)))
    labels = np.array([0, 1, 2, 3, 0])
    for _ in range(3):
        net.zero_grad()
        loss = ops.cross_entropy(net(x), labels)
        loss.backward()
        for p in net.parameters():
            p.data = p.data - 0.1 * p.grad
    return [p.data.copy() for p in net.parameters()], loss.item()


def test_same_seed_gives_bit_identical_results():
    params_a, loss_a = _train_a_few_steps(7)
    params_b, loss_b = _train_a_few_steps(7)
    assert loss_a == loss_b
    for a, b in zip(params_a, params_b):
        assert a.tobytes() == b.tobytes()
    params_c, _ = _train_a_few_steps(8)
    assert any(a.tobytes() != c.tobytes() for a, c in zip(params_a, params_c))


def test_manual_seed_rejects_bad_seeds():
    with pytest.raises(ValueError, match="seed"):
        sclref.manual_seed(-1)
