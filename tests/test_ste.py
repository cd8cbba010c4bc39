"""Straight-through estimators: exact step forward, backward = upstream * declared surrogate, registry.

Surrogates are checked against formulas written here from SCL.md, never by finite
differences of the step (whose true derivative is zero almost everywhere).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import Tensor
from sclref import ste as ste_mod
from sclref.nn.masked import MaskedLinear
from sclref.ste import STE, available, get, register, step
from tests.strategies import arrays, scores, shapes

T = Tensor

BUILTIN = ["identity", "leaky_relu", "softplus", "relu", "clipped"]

# g'(s) of each estimator, written from the method description (SCL.md, step 3).
REFERENCE = {
    "identity": lambda s, alpha=None: np.ones_like(s),
    "leaky_relu": lambda s, alpha=0.1: np.where(s > 0, 1.0, alpha).astype(s.dtype),
    "softplus": lambda s, alpha=None: 1.0 / (1.0 + np.exp(-s)),
    "relu": lambda s, alpha=None: np.where(s > 0, 1.0, 0.0).astype(s.dtype),
    "clipped": lambda s, alpha=None: np.where(np.abs(s) > 1, 0.0, 1.0).astype(s.dtype),
}

# (registered name, constructor options): every built-in, leaky_relu also with a non-default alpha.
ESTIMATORS = [(name, {}) for name in BUILTIN] + [("leaky_relu", {"alpha": 0.37})]
IDS = [name + ("" if not opts else f"-alpha{opts['alpha']}") for name, opts in ESTIMATORS]


def reference(name, opts, s):
    return REFERENCE[name](s, **opts)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry that the test may extend; the real one is restored afterwards."""
    monkeypatch.setattr(ste_mod, "_REGISTRY", dict(ste_mod._REGISTRY))


# -- the registry ---------------------------------------------------------------------------


def test_available_lists_the_five_builtin_estimators_in_order():
    assert available() == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_get_returns_a_fresh_instance_of_the_registered_class(name):
    est = get(name)
    assert isinstance(est, STE) and est.name == name
    assert get(name) is not est
    assert get(est) is est  # an instance passes through


def test_unknown_name_is_a_value_error_naming_the_registered_ones():
    with pytest.raises(ValueError, match="unknown STE 'sigmoid'") as info:
        get("sigmoid")
    for name in BUILTIN:
        assert name in str(info.value)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5, float("nan"), float("inf")])
def test_leaky_relu_rejects_alpha_outside_the_open_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        get("leaky_relu", alpha=alpha)


def test_user_registered_estimator_is_picked_up_everywhere(scratch_registry):
    @register("mine")
    class Mine(STE):
        satisfies_principle = True

        def surrogate(self, s):
            return 1.0 + s * s

    assert available() == BUILTIN + ["mine"]
    assert isinstance(get("mine"), Mine) and Mine.name == "mine"
    s, u = np.array([-2.0, 0.0, 0.5, 3.0]), np.array([1.0, -2.0, 3.0, 0.5])
    t = T(s, requires_grad=True)
    out = step(t, "mine")
    np.testing.assert_array_equal(out.data, [0.0, 0.0, 1.0, 1.0])
    out.backward(u)
    np.testing.assert_array_equal(t.grad, u * (1.0 + s * s))
    layer = MaskedLinear(3, 2, ste="mine")
    assert isinstance(layer.ste, Mine)


def test_registering_a_non_estimator_is_a_type_error(scratch_registry):
    with pytest.raises(TypeError, match="not an STE subclass"):
        register("plain")(object)
    with pytest.raises(TypeError, match="not an STE subclass"):
        register("function")(lambda s: s)
    assert "plain" not in available() and "function" not in available()


def test_registering_a_taken_name_is_a_value_error_and_keeps_the_original(scratch_registry):
    class Impostor(STE):
        def surrogate(self, s):
            return np.zeros_like(s)

    with pytest.raises(ValueError, match="'identity' is already registered"):
        register("identity")(Impostor)
    assert type(get("identity")) is ste_mod.Identity
    assert available() == BUILTIN


def test_reference_surrogates_tell_the_estimators_apart():
    """Test the tests: the backward checks below would catch any two estimators swapped."""
    grid = np.linspace(-3, 3, 61)
    for i, (a, oa) in enumerate(ESTIMATORS):
        for b, ob in ESTIMATORS[i + 1:]:
            assert not np.allclose(reference(a, oa, grid), reference(b, ob, grid)), (a, oa, b, ob)


def test_step_needs_a_tensor():
    with pytest.raises(TypeError, match="Tensor"):
        step(np.array([1.0]))


# -- forward: the exact unit step ------------------------------------------------------------


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
def test_step_is_zero_at_and_below_zero_and_one_above(name, opts):
    s = np.array([-np.inf, -1.0, -5e-324, -0.0, 0.0, 5e-324, 1e-300, 1.0, np.inf])
    expected = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    est = get(name, **opts)
    np.testing.assert_array_equal(step(T(s), est).data, expected)
    np.testing.assert_array_equal(est(T(s)).data, expected)


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@settings(deadline=None)
@given(shape=shapes(), data=st.data())
def test_forward_is_exactly_binary(name, opts, shape, data):
    s = data.draw(scores(shape))
    out = get(name, **opts)(T(s)).data
    assert out.dtype == s.dtype and out.shape == s.shape
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out, np.where(s > 0, 1.0, 0.0))


# -- backward: upstream times the declared surrogate --------------------------------------


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@settings(deadline=None)
@given(shape=shapes(), dtype=st.sampled_from([np.float64, np.float32]), data=st.data())
def test_backward_is_upstream_times_surrogate(name, opts, shape, dtype, data):
    s = data.draw(scores(shape, dtype=dtype))
    u = data.draw(arrays(shape, low=-3.0, high=3.0, dtype=dtype))
    est = get(name, **opts)
    t = T(s, requires_grad=True)
    est(t).backward(u)
    assert t.grad.dtype == dtype
    np.testing.assert_array_equal(t.grad, u * est.surrogate(s))
    if dtype == np.float64:
        np.testing.assert_allclose(t.grad, u * reference(name, opts, s), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@settings(deadline=None)
@given(shape=shapes(), data=st.data())
def test_surrogate_matches_its_formula(name, opts, shape, data):
    s = data.draw(scores(shape))
    np.testing.assert_allclose(get(name, **opts).surrogate(s), reference(name, opts, s), rtol=1e-15, atol=0)


def test_surrogates_at_the_points_where_they_change():
    s = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(get("identity").surrogate(s), np.ones(7))
    np.testing.assert_array_equal(get("leaky_relu", alpha=0.25).surrogate(s), [0.25] * 4 + [1.0] * 3)
    np.testing.assert_array_equal(get("relu").surrogate(s), [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(get("clipped").surrogate(s), [0, 1, 1, 1, 1, 1, 0])
    sig = get("softplus").surrogate(s)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-s)), rtol=1e-15)
    assert sig[3] == 0.5
    np.testing.assert_allclose(sig + sig[::-1], 1.0, rtol=1e-15)  # sigmoid(-s) = 1 - sigmoid(s)


def test_softplus_surrogate_does_not_overflow():
    out = get("softplus").surrogate(np.array([-1000.0, 1000.0]))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, [0.0, 1.0])


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(name, opts, dtype):
    s = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=dtype)
    est = get(name, **opts)
    assert est.surrogate(s).dtype == dtype
    assert est(T(s)).dtype == dtype


# -- the convergence principle --------------------------------------------------------------


def test_declared_principle():
    declared = {name: get(name).satisfies_principle for name in BUILTIN}
    assert declared == {"identity": True, "leaky_relu": True, "softplus": True, "relu": False, "clipped": False}


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
def test_declared_principle_agrees_with_a_dense_grid(name, opts):
    grid = np.concatenate([np.linspace(-20.0, 20.0, 400_001), [0.0, -1.0, 1.0, -1e-300, 1e-300]])
    est = get(name, **opts)
    assert bool(np.all(est.surrogate(grid) > 0)) == est.satisfies_principle


def test_from_spec_passes_each_option_only_to_the_estimators_that_take_it():
    from sclref.ste import LeakyReLU, from_spec

    leaky = from_spec("leaky_relu", alpha=0.25)
    assert isinstance(leaky, LeakyReLU) and leaky.alpha == 0.25
    assert type(from_spec("identity", alpha=0.25)).__name__ == "Identity"
    with pytest.raises(ValueError, match="unknown STE 'nope'"):
        from_spec("nope", alpha=0.1)
    with pytest.raises(ValueError, match="alpha must be in"):
        from_spec("leaky_relu", alpha=2.0)
