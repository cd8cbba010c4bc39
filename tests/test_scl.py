"""The SCL objective: per-feature normalization, the connection-count regularizer, FLOPs, the λ controller."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import Tensor, nn, scl
from sclref.models import lenet5
from sclref.nn.masked import MaskedConv2d, MaskedLinear
from sclref.scl import LambdaController, SCLObjective, connection_weights, masked_layers, normalize_per_feature
from sclref.ste import get as get_ste
from tests.strategies import SEEDS, arrays, shapes
from tests.test_ste import ESTIMATORS, IDS, reference

T = Tensor


def conv_linear_net(gen, ste="identity", score_init=(-2.0, 2.0)):
    """Masked conv (3x3 output per filter) then masked linear, no activation: every feature gets a gradient."""
    return nn.Sequential(
        MaskedConv2d(2, 4, 3, ste=ste, score_init=score_init, generator=gen), nn.Flatten(),
        MaskedLinear(4 * 3 * 3, 5, ste=ste, score_init=score_init, generator=gen),
    )


def task_backward(model, gen, n=3):
    """Forward a batch and backpropagate L = <u, y> with random u; returns copies of the scores' grads."""
    y = model(T(gen.standard_normal((n, 2, 5, 5))))
    y.backward(gen.standard_normal(y.shape))
    return [None if layer.score.grad is None else layer.score.grad.copy() for _, layer in masked_layers(model)]


def feature_norms(grad, mode):
    flat = grad.reshape(grad.shape[0], -1)
    return np.linalg.norm(flat, axis=1) if mode == "l2" else np.abs(flat).max(axis=1)


# -- per-feature normalization ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["l2", "max"])
def test_apply_gives_each_feature_a_unit_norm_and_keeps_a_zero_feature_zero(mode):
    gen = np.random.default_rng(0)
    model = conv_linear_net(gen)
    layers = [layer for _, layer in masked_layers(model)]
    layers[0].weight.data[1] = 0.0  # filter 1 and row 3 get no mask gradient: dL/ds = G θ g'(s)
    layers[1].weight.data[3] = 0.0
    task = task_backward(model, gen)
    SCLObjective(lam=0.0, normalization=mode).apply(model)
    for layer, t, zero in zip(layers, task, (1, 3)):
        norms = feature_norms(layer.score.grad, mode)
        live = np.arange(len(norms)) != zero
        np.testing.assert_allclose(norms[live], 1.0, rtol=1e-10)
        assert np.all(np.isfinite(layer.score.grad))
        np.testing.assert_array_equal(layer.score.grad[zero], 0.0)
        # only the scale of a feature changes, not its direction
        np.testing.assert_allclose(layer.score.grad * feature_norms(t, mode).reshape((-1,) + (1,) * (t.ndim - 1)),
                                   t, rtol=1e-10, atol=1e-300)


def test_apply_without_normalization_leaves_the_task_gradient_unchanged():
    gen = np.random.default_rng(1)
    model = conv_linear_net(gen)
    task = task_backward(model, gen)
    SCLObjective(lam=0.0, normalization="none").apply(model)
    for (_, layer), t in zip(masked_layers(model), task):
        np.testing.assert_array_equal(layer.score.grad, t)


@settings(deadline=None)
@given(shape=shapes(1, 4), mode=st.sampled_from(["l2", "max"]), scale=st.sampled_from([1e-9, 1e-3, 1.0, 1e6]),
       dtype=st.sampled_from([np.float64, np.float32]), data=st.data())
def test_normalize_per_feature_on_drawn_arrays(shape, mode, scale, dtype, data):
    g = data.draw(arrays(shape)) * scale
    gen = np.random.default_rng(data.draw(SEEDS))
    g[gen.random(shape[0]) < 0.3] = 0.0  # some all-zero features
    g = g.astype(dtype)
    out = normalize_per_feature(g, mode)
    assert out.shape == g.shape and out.dtype == dtype
    g64 = g.astype(np.float64)
    scale_of = feature_norms(g64, mode).reshape((-1,) + (1,) * (g.ndim - 1))
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    # the documented formula: each feature divided by its norm plus eps
    np.testing.assert_allclose(out, g64 / (scale_of + 1e-12), rtol=rtol, atol=0)
    live = scale_of.ravel() > 0
    np.testing.assert_array_equal(out[~live], 0.0)
    # unit norms, up to the eps's share of each feature's norm
    norms_in, norms_out = scale_of.ravel()[live], feature_norms(out.astype(np.float64), mode)[live]
    assert np.all(np.abs(norms_out - 1.0) <= 2 * rtol + 1e-12 / norms_in)


def test_normalize_per_feature_without_normalization_is_the_identity():
    g = np.random.default_rng(2).standard_normal((3, 4))
    np.testing.assert_array_equal(normalize_per_feature(g, "none"), g)


def test_unknown_normalization_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'l1'"):
        normalize_per_feature(np.ones((2, 2)), "l1")
    with pytest.raises(ValueError, match="'l1'"):
        SCLObjective(normalization="l1")


# -- the regularizer ---------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
def test_regularizer_adds_lambda_times_the_surrogate(name, opts):
    gen = np.random.default_rng(3)
    model = conv_linear_net(gen, ste=get_ste(name, **opts))  # scores in (-2, 2): both sides of 0 and of |s| = 1
    task = task_backward(model, gen)
    SCLObjective(lam=0.3, normalization="none").apply(model)
    for (_, layer), t in zip(masked_layers(model), task):
        s = layer.score.data
        np.testing.assert_allclose(layer.score.grad, t + 0.3 * reference(name, opts, s), rtol=1e-15, atol=1e-17)


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("normalization", ["none", "l2", "max"])
@pytest.mark.parametrize("how", ["never_backpropagated", "zero_upstream"])
def test_regularizer_alone_without_a_task_gradient(name, opts, normalization, how):
    gen = np.random.default_rng(4)
    model = conv_linear_net(gen, ste=get_ste(name, **opts))
    if how == "zero_upstream":
        y = model(T(gen.standard_normal((2, 2, 5, 5))))
        y.backward(np.zeros(y.shape))
    SCLObjective(lam=0.05, normalization=normalization).apply(model)
    for _, layer in masked_layers(model):
        np.testing.assert_allclose(layer.score.grad, 0.05 * reference(name, opts, layer.score.data),
                                   rtol=1e-15, atol=0)


@pytest.mark.parametrize("mode", ["l2", "max"])
def test_task_normalization_leaves_the_regularizer_unnormalized(mode):
    gen = np.random.default_rng(5)
    model = conv_linear_net(gen, ste="softplus")
    task = task_backward(model, gen)
    lam = 0.7
    SCLObjective(lam=lam, normalization=mode, normalize="task").apply(model)
    for (_, layer), t in zip(masked_layers(model), task):
        reg = lam * reference("softplus", {}, layer.score.data)
        np.testing.assert_allclose(feature_norms(layer.score.grad - reg, mode), 1.0, rtol=1e-10)
        np.testing.assert_allclose(layer.score.grad, normalize_per_feature(t, mode) + reg, rtol=1e-14)
        assert not np.allclose(feature_norms(layer.score.grad, mode), 1.0)


@pytest.mark.parametrize("mode", ["l2", "max"])
def test_total_normalization_normalizes_the_sum(mode):
    gen = np.random.default_rng(6)
    model = conv_linear_net(gen, ste="softplus")
    task = task_backward(model, gen)
    lam = 0.7
    SCLObjective(lam=lam, normalization=mode, normalize="total").apply(model)
    for (_, layer), t in zip(masked_layers(model), task):
        reg = lam * reference("softplus", {}, layer.score.data)
        np.testing.assert_allclose(feature_norms(layer.score.grad, mode), 1.0, rtol=1e-10)
        np.testing.assert_allclose(layer.score.grad, normalize_per_feature(t + reg, mode), rtol=1e-14)


def test_frozen_layers_are_left_alone():
    gen = np.random.default_rng(7)
    model = conv_linear_net(gen)
    conv, linear = (layer for _, layer in masked_layers(model))
    conv.freeze_mask()
    task_backward(model, gen)
    SCLObjective(lam=0.5, weighting="flops").apply(model)
    assert conv.score.grad is None
    assert linear.score.grad is not None


@pytest.mark.parametrize("weighting", ["count", "flops"])
def test_models_without_trainable_masks_are_not_an_error(weighting):
    plain = nn.Sequential(nn.Linear(3, 2))
    objective = SCLObjective(lam=0.5, weighting=weighting)
    objective.apply(plain)
    assert objective.penalty(plain) == 0.0
    frozen = MaskedLinear(3, 2)
    frozen.freeze_mask()
    objective.apply(frozen)
    assert frozen.score.grad is None


def test_flops_weights_follow_uses_with_connection_weighted_mean_one():
    gen = np.random.default_rng(8)
    model = conv_linear_net(gen)
    layers = [layer for _, layer in masked_layers(model)]
    with pytest.raises(RuntimeError, match="forward"):
        connection_weights(layers, "flops")
    model(T(gen.standard_normal((1, 2, 5, 5))))
    weights = connection_weights(layers, "flops")
    assert [layer.uses_per_sample() for layer in layers] == [9, 1]
    assert weights[0] / weights[1] == pytest.approx(9.0, rel=1e-15)
    sizes = [layer.num_weights for layer in layers]
    assert np.dot(weights, sizes) / sum(sizes) == pytest.approx(1.0, rel=1e-14)
    assert connection_weights(layers, "count") == [1.0, 1.0]


def test_flops_weighting_scales_the_regularizer_per_layer():
    gen = np.random.default_rng(9)
    model = conv_linear_net(gen, ste="leaky_relu")
    model(T(gen.standard_normal((1, 2, 5, 5))))  # sets the conv's output size; no backward
    layers = [layer for _, layer in masked_layers(model)]
    weights = connection_weights(layers, "flops")
    objective = SCLObjective(lam=0.2, normalization="l2", weighting="flops")
    objective.apply(model)
    for layer, w in zip(layers, weights):
        np.testing.assert_allclose(layer.score.grad, 0.2 * w * reference("leaky_relu", {}, layer.score.data),
                                   rtol=1e-14)
    kept = [layer.num_kept() for layer in layers]
    assert objective.penalty(model) == pytest.approx(0.2 * np.dot(weights, kept), rel=1e-14)


@settings(deadline=None, max_examples=20)
@given(seed=SEEDS, lam=st.floats(0.0, 10.0))
def test_count_penalty_is_lambda_times_the_number_of_connections(seed, lam):
    model = conv_linear_net(np.random.default_rng(seed))
    kept = sum(int(np.sum(layer.score.data > 0)) for _, layer in masked_layers(model))
    assert SCLObjective(lam=lam).penalty(model) == pytest.approx(lam * kept, rel=1e-14, abs=0)


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), "0.1"], ids=repr)
def test_invalid_lambda_is_a_value_error_naming_it(lam):
    with pytest.raises(ValueError, match="lam"):
        SCLObjective(lam=lam)


def test_unknown_weighting_or_normalize_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'bits'"):
        SCLObjective(weighting="bits")
    with pytest.raises(ValueError, match="'bits'"):
        connection_weights([], "bits")
    with pytest.raises(ValueError, match="'both'"):
        SCLObjective(normalize="both")


# -- reports -----------------------------------------------------------------------------


def test_layer_report_and_sparsity_on_lenet5():
    gen = np.random.default_rng(10)
    model = lenet5(score_init=(-1.0, 3.0), generator=gen)
    with pytest.raises(RuntimeError, match="forward"):
        scl.layer_report(model)
    model(T(gen.standard_normal((1, 1, 28, 28))))
    rows = scl.layer_report(model)
    layers = [layer for _, layer in masked_layers(model)]
    assert [row["layer"] for row in rows] == [name for name, _ in masked_layers(model)]
    assert [row["weights"] for row in rows] == [20 * 25, 50 * 20 * 25, 500 * 800, 10 * 500]
    uses = [24 * 24, 8 * 8, 1, 1]
    for row, layer, u in zip(rows, layers, uses):
        kept = int(np.sum(layer.score.data > 0))
        assert row["kept"] == kept
        assert row["sparsity"] == pytest.approx(1 - kept / row["weights"], abs=1e-15)
        assert row["dense_flops"] == 2 * u * row["weights"]
        assert row["effective_flops"] == 2 * u * kept
    total_kept = sum(row["kept"] for row in rows)
    total = sum(row["weights"] for row in rows)
    assert 0.2 < scl.sparsity(model) < 0.3  # a quarter of the uniform (-1, 3) scores are negative
    assert scl.sparsity(model) == pytest.approx(1 - total_kept / total, abs=1e-15)


def test_sparsity_of_a_model_without_masks_is_zero():
    assert scl.sparsity(nn.Sequential(nn.Linear(2, 2))) == 0.0


# -- the λ controller ----------------------------------------------------------------------


def test_lambda_rises_below_the_target_and_falls_above():
    c = LambdaController(target=0.9, lam=0.01)
    up = c.update(0.5)
    assert up > 0.01 and c.lam == up
    assert c.update(0.9) == up
    assert c.update(0.95) < up


@settings(deadline=None)
@given(lam=st.floats(1e-9, 1e3), target=st.floats(0.01, 0.99), gain=st.floats(0.1, 50.0),
       observed=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_lambda_stays_within_its_bounds(lam, target, gain, observed):
    c = LambdaController(target, lam, gain=gain, lam_min=1e-4, lam_max=2.0)
    assert 1e-4 <= c.lam <= 2.0
    for sparsity in observed:
        before = c.lam
        after = c.update(sparsity)
        assert 1e-4 <= after <= 2.0
        if sparsity < target:
            assert after >= before
        elif sparsity > target:
            assert after <= before


@pytest.mark.parametrize("target,shown", [(0.0, "0 %"), (1.0, "100 %"), (1.2, "120 %"), (-0.05, "-5 %")])
def test_target_outside_the_open_unit_interval_is_an_error_in_percent(target, shown):
    with pytest.raises(ValueError, match=shown):
        LambdaController(target, lam=0.1)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan")])
def test_controller_needs_a_positive_starting_lambda(lam):
    with pytest.raises(ValueError, match="λ"):
        LambdaController(0.5, lam)


def test_setpoint_ramps_up_to_the_target_and_stays():
    c = LambdaController(0.8, lam=0.1, ramp=0.4)
    assert c.setpoint(0.0) == 0.0
    progress = np.linspace(0.0, 0.4, 41)
    points = [c.setpoint(p) for p in progress]
    assert all(a < b for a, b in zip(points, points[1:]))
    assert c.setpoint(0.2) == pytest.approx(0.8 * (1 - 0.5**3), rel=1e-15)
    assert c.setpoint(0.4) == c.setpoint(0.7) == c.setpoint(1.0) == pytest.approx(0.8, rel=1e-15)
    # progress steers the set-point: the same observation raises λ late and lowers it early
    early, late = LambdaController(0.8, lam=0.1, ramp=0.4), LambdaController(0.8, lam=0.1, ramp=0.4)
    assert early.update(0.3, progress=0.05) < 0.1 < late.update(0.3, progress=0.9)


@pytest.mark.parametrize("ramp", [0.0, -0.5, 1.5, float("nan")])
def test_ramp_outside_zero_one_is_an_error(ramp):
    with pytest.raises(ValueError, match="ramp"):
        LambdaController(0.5, lam=0.1, ramp=ramp)


def test_controller_state_dict_round_trip():
    a = LambdaController(0.8, lam=0.05, gain=3.0, ramp=0.3, lam_min=1e-3, lam_max=4.0)
    for s, p in ((0.1, 0.1), (0.3, 0.2), (0.95, 0.5)):
        a.update(s, p)
    b = LambdaController(0.5, lam=1.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for s, p in ((0.2, 0.1), (0.85, 0.25), (0.6, 0.9)):
        assert b.update(s, p) == a.update(s, p)


@pytest.mark.parametrize("target", [0.3, 0.9, 0.99])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gain,ramp", [(0.5, 0.5), (2.0, 1e-9)])
def test_closed_loop_converges_to_the_target(target, seed, gain, ramp):
    """A toy plant: each of 2,000 connections is pruned once log λ passes its own threshold."""
    thresholds = np.random.default_rng(seed).uniform(math.log(1e-4), math.log(5.0), 2000)

    def plant(lam):
        return float(np.mean(thresholds < math.log(lam)))

    c = LambdaController(target, lam=1e-3, gain=gain, ramp=ramp)
    steps, history = 400, []
    for i in range(steps):
        sparsity = plant(c.lam)
        history.append(sparsity)
        c.update(sparsity, progress=i / steps)
    assert max(abs(s - target) for s in history[-50:]) < 0.005
