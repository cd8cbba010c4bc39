"""The gradient checker: it passes correct rules and names the op whose rule is wrong."""

import numpy as np
import pytest

from sclref import Function, Tensor, ops
from sclref.autograd import _toposort
from sclref.ops import Mul, _binary
from sclref.testing import GradientCheckError, _op_cases, check_builtin_ops, check_grads


class SlightlyWrongMul(Mul):
    """a * b whose gradient for `a` is 0.1 % too large."""

    def backward(self, g):
        ga, gb = super().backward(g)
        return ga * 1.001, gb


def wrong_mul(a, b):
    return SlightlyWrongMul.apply(*_binary("mul", a, b))


def test_a_correct_composite_passes():
    gen = np.random.default_rng(0)
    x, w = gen.standard_normal((4, 3)), gen.standard_normal((3, 2))
    check_grads(lambda a, b: ops.log_softmax(ops.sigmoid(a @ b) * 3.0), x, w)


def test_a_backward_wrong_by_a_tenth_of_a_percent_fails_and_is_named():
    gen = np.random.default_rng(1)
    x, w = gen.standard_normal((4, 3)), gen.standard_normal((4, 3))

    def f(a, b):
        return ops.exp(wrong_mul(ops.sigmoid(a), b)).sum(axis=1)

    with pytest.raises(GradientCheckError, match="SlightlyWrongMul") as info:
        check_grads(f, x, w)
    message = str(info.value)
    assert "input 0" in message
    assert "Exp" not in message.split("disagrees")[-1]  # only the guilty op is listed


def test_the_same_op_with_a_correct_backward_passes():
    gen = np.random.default_rng(1)
    x, w = gen.standard_normal((4, 3)), gen.standard_normal((4, 3))
    check_grads(lambda a, b: ops.exp(ops.mul(ops.sigmoid(a), b)).sum(axis=1), x, w)


def test_an_error_outside_any_op_is_reported_as_such():
    # A function that is not differentiable the way its graph claims: the detached
    # factor changes with the input, but no op records it.
    def f(a):
        return a * Tensor(a.data.copy())

    with pytest.raises(GradientCheckError, match="every op passes on its own"):
        check_grads(f, np.array([1.0, 2.0]))


def test_inputs_must_be_finite_and_f_must_return_a_tensor():
    with pytest.raises(ValueError, match="input 0 has NaN"):
        check_grads(ops.exp, np.array([np.nan]))
    with pytest.raises(TypeError, match="must return a Tensor"):
        check_grads(lambda a: a.data, np.array([1.0]))


def test_inputs_are_not_modified():
    x = np.array([0.5, 1.5])
    check_grads(ops.exp, x)
    np.testing.assert_array_equal(x, [0.5, 1.5])


def test_every_builtin_op_passes_the_self_check():
    rows = check_builtin_ops(seed=3)
    assert len(rows) == len({name for name, _ in rows}) >= 28
    assert all(err < 1e-6 for _, err in rows)


def test_the_self_check_catches_a_broken_rule(monkeypatch):
    monkeypatch.setattr(ops.Sigmoid, "backward", lambda self, g: (g * self.out * (1 - self.out) * 1.001,))
    with pytest.raises(GradientCheckError, match="Sigmoid"):
        check_builtin_ops(seed=3)


# Ops the self-check cannot hold to finite differences in float64, and why.
UNCHECKABLE = {"Cast": "float32 rounding of its output swamps a float64 finite difference"}


def test_the_self_check_covers_every_op_rule():
    # Record which Function classes the op cases run, so that a new op missing from the
    # self-check (sclref gradcheck) fails here rather than going unchecked.
    covered = set()
    for _, f, inputs in _op_cases(np.random.default_rng(0)):
        out = f(*[Tensor(a, requires_grad=True) for a in inputs])
        covered |= {type(node._ctx).__name__ for node in _toposort(out)}
    rules = {name for name, obj in vars(ops).items()
             if isinstance(obj, type) and issubclass(obj, Function) and obj.__module__ == ops.__name__}
    assert {"BatchNorm", "GetItem", "Pad"} <= rules
    assert rules - covered - set(UNCHECKABLE) == set()


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_the_self_check_catches_a_batch_norm_rule_that_is_off(monkeypatch, training):
    real = ops.BatchNorm.backward

    def off(self, g):  # the x gradient 0.1 % too large, in one mode only
        grads = real(self, g)
        return (grads[0] * (1.001 if self.training == training else 1.0),) + grads[1:]

    monkeypatch.setattr(ops.BatchNorm, "backward", off)
    cases = {name: (f, inputs) for name, f, inputs in _op_cases(np.random.default_rng(3))}
    f, inputs = cases["batch_norm (training)" if training else "batch_norm (eval)"]
    with pytest.raises(GradientCheckError, match="BatchNorm"):
        check_grads(f, *inputs)
