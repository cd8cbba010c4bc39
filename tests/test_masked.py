"""Masked layers: effective weight θ ⊙ H(s), gradients of θ and s, mask bookkeeping, freezing; models.

Oracles: plain layers (and NumPy) given the effective weight, and the gradient formulas
dL/dθ = G ⊙ H(s), dL/ds = G ⊙ θ ⊙ g'(s), with G the gradient of the effective weight
taken from a plain computation where that weight is a leaf.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import Tensor, nn, ops
from sclref.models import lenet5, lenet_300_100
from sclref.nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from sclref.optim import SGD
from sclref.ste import get as get_ste
from sclref.testing import check_grads
from tests.strategies import SEEDS, arrays, conv_geometry, mask_scores, scores
from tests.test_ste import ESTIMATORS, IDS, reference

T = Tensor


def set_params(layer, theta, s, b):
    layer.weight.data, layer.score.data = theta, s
    if b is not None:
        layer.bias.data = b


def with_params(layer, w, b):
    """Swap the layer's θ and bias for `w` and `b` so `check_grads` can perturb them."""
    layer.weight, layer.bias = w, b
    return layer


# -- forward: a plain layer with weight θ · mask ---------------------------------------


@settings(deadline=None)
@given(n=st.integers(1, 4), fin=st.integers(1, 6), fout=st.integers(1, 6), bias=st.booleans(), data=st.data())
def test_linear_forward_equals_plain_layer_with_effective_weight(n, fin, fout, bias, data):
    x, theta = data.draw(arrays((n, fin))), data.draw(arrays((fout, fin)))
    s = data.draw(mask_scores((fout, fin)))
    b = data.draw(arrays((fout,))) if bias else None
    layer = MaskedLinear(fin, fout, bias=bias)
    set_params(layer, theta, s, b)
    plain = nn.Linear(fin, fout, bias=bias)
    plain.weight.data = theta * (s > 0)
    if bias:
        plain.bias.data = b
    y = layer(T(x)).data
    np.testing.assert_allclose(y, plain(T(x)).data, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(y, x @ (theta * (s > 0)).T + (0 if b is None else b), rtol=1e-13, atol=1e-14)


@settings(deadline=None)
@given(geom=conv_geometry(), bias=st.booleans(), data=st.data())
def test_conv_forward_equals_plain_layer_with_effective_weight(geom, bias, data):
    n, c, f, h, w, kh, kw, stride, padding = geom
    x, theta = data.draw(arrays((n, c, h, w))), data.draw(arrays((f, c, kh, kw)))
    s = data.draw(mask_scores((f, c, kh, kw)))
    b = data.draw(arrays((f,))) if bias else None
    layer = MaskedConv2d(c, f, (kh, kw), stride=stride, padding=padding, bias=bias)
    set_params(layer, theta, s, b)
    plain = nn.Conv2d(c, f, (kh, kw), stride=stride, padding=padding, bias=bias)
    plain.weight.data = theta * (s > 0)
    if bias:
        plain.bias.data = b
    np.testing.assert_allclose(layer(T(x)).data, plain(T(x)).data, rtol=1e-14, atol=1e-15)


def test_all_zero_mask_leaves_only_the_bias():
    layer = MaskedLinear(4, 3, score_init=-1.0)
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_array_equal(layer(T(x)).data, np.broadcast_to(layer.bias.data, (5, 3)))


def test_dense_weight_is_kept_while_effective_weight_is_sparse():
    layer = MaskedLinear(3, 2)
    theta = layer.weight.data.copy()
    layer.score.data = np.array([[1.0, -1.0, 0.0], [-2.0, 0.5, 3.0]])
    np.testing.assert_array_equal(layer.effective_weight().data, theta * [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(layer.weight.data, theta)


def test_linear_rejects_input_of_the_wrong_width():
    with pytest.raises(ValueError, match="last dimension 4"):
        MaskedLinear(4, 2)(T(np.ones((3, 5))))


# -- gradients: the formulas, for every estimator --------------------------------------


def effective_weight_grad(forward, theta, s, u):
    """G = dL/dW at W = θ · H(s), from a plain computation with W as a leaf (L = <u, y>)."""
    w_eff = T(theta * (s > 0), requires_grad=True)
    forward(w_eff).backward(u)
    return w_eff.grad


def check_formulas(layer, name, opts, theta, s, G):
    np.testing.assert_array_equal(layer.weight.grad, G * (s > 0))
    np.testing.assert_allclose(layer.score.grad, G * theta * reference(name, opts, s), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@settings(deadline=None)
@given(n=st.integers(1, 4), fin=st.integers(1, 6), fout=st.integers(1, 6), data=st.data())
def test_linear_gradients_match_the_formulas(name, opts, n, fin, fout, data):
    x, theta, b = data.draw(arrays((n, fin))), data.draw(arrays((fout, fin))), data.draw(arrays((fout,)))
    s = data.draw(scores((fout, fin)))  # includes s = 0 and |s| = 1, where the estimators change
    u = data.draw(arrays((n, fout)))
    layer = MaskedLinear(fin, fout, ste=get_ste(name, **opts))
    set_params(layer, theta, s, b)
    layer(T(x)).backward(u)
    G = effective_weight_grad(lambda w: ops.matmul(T(x), w.T) + T(b), theta, s, u)
    check_formulas(layer, name, opts, theta, s, G)
    np.testing.assert_allclose(layer.bias.grad, u.sum(axis=0), rtol=1e-14)


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@settings(deadline=None, max_examples=15)
@given(geom=conv_geometry(), data=st.data())
def test_conv_gradients_match_the_formulas(name, opts, geom, data):
    n, c, f, h, w, kh, kw, stride, padding = geom
    x, theta, b = data.draw(arrays((n, c, h, w))), data.draw(arrays((f, c, kh, kw))), data.draw(arrays((f,)))
    s = data.draw(scores((f, c, kh, kw)))
    layer = MaskedConv2d(c, f, (kh, kw), stride=stride, padding=padding, ste=get_ste(name, **opts))
    set_params(layer, theta, s, b)
    y = layer(T(x))
    u = data.draw(arrays(y.shape))
    y.backward(u)
    G = effective_weight_grad(lambda wt: ops.conv2d(T(x), wt, T(b), stride, padding), theta, s, u)
    check_formulas(layer, name, opts, theta, s, G)
    np.testing.assert_allclose(layer.bias.grad, u.sum(axis=(0, 2, 3)), rtol=1e-13)


@pytest.mark.parametrize("name", ["identity", "relu"])
@settings(deadline=None)
@given(n=st.integers(1, 4), fin=st.integers(1, 6), fout=st.integers(1, 6), data=st.data())
def test_linear_gradients_of_x_theta_bias_by_finite_differences(name, n, fin, fout, data):
    x, theta, b = data.draw(arrays((n, fin))), data.draw(arrays((fout, fin))), data.draw(arrays((fout,)))
    layer = MaskedLinear(fin, fout, ste=name)
    layer.score.data = data.draw(mask_scores((fout, fin)))  # held fixed, away from the step
    check_grads(lambda xt, wt, bt: with_params(layer, wt, bt)(xt), x, theta, b)


@settings(deadline=None, max_examples=15)
@given(geom=conv_geometry(), data=st.data())
def test_conv_gradients_of_x_theta_bias_by_finite_differences(geom, data):
    n, c, f, h, w, kh, kw, stride, padding = geom
    x, theta, b = data.draw(arrays((n, c, h, w))), data.draw(arrays((f, c, kh, kw))), data.draw(arrays((f,)))
    layer = MaskedConv2d(c, f, (kh, kw), stride=stride, padding=padding)
    layer.score.data = data.draw(mask_scores((f, c, kh, kw)))
    check_grads(lambda xt, wt, bt: with_params(layer, wt, bt)(xt), x, theta, b)


def test_finite_differences_catch_a_mask_left_out_of_the_weight_gradient():
    """Test the tests: with the mask fixed, a θ gradient that ignored H(s) would fail check_grads."""
    layer = MaskedLinear(3, 2)
    layer.score.data = np.array([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])
    x = np.random.default_rng(1).standard_normal((4, 3))
    dense = nn.Linear(3, 2)  # the same weight, no mask: the wrong derivative for the masked layer

    def wrong(xt, wt, bt):
        y_masked = with_params(layer, wt, bt)(xt)
        dense.weight, dense.bias = wt, bt
        return y_masked.detach() + (dense(xt) - dense(xt).detach())

    with pytest.raises(AssertionError, match="gradient check failed"):
        check_grads(wrong, x, layer.weight.data, layer.bias.data, localize=False)


# -- mask bookkeeping and initialization -------------------------------------------------


@settings(deadline=None)
@given(fin=st.integers(1, 6), fout=st.integers(1, 6), data=st.data())
def test_mask_sparsity_and_num_kept(fin, fout, data):
    s = data.draw(scores((fout, fin)))
    layer = MaskedLinear(fin, fout)
    layer.score.data = s
    kept = int(np.sum(s > 0))
    assert layer.mask().dtype == bool
    np.testing.assert_array_equal(layer.mask(), s > 0)
    assert layer.num_kept() == kept
    assert layer.num_weights == fin * fout
    assert layer.sparsity() == pytest.approx(1 - kept / (fin * fout), abs=1e-15)


def test_dense_and_empty_extremes():
    assert MaskedLinear(5, 4).sparsity() == 0.0
    empty = MaskedConv2d(2, 3, 3, score_init=-0.5)
    assert empty.num_kept() == 0 and empty.sparsity() == 1.0
    assert MaskedConv2d(2, 3, 3, score_init=0.0).num_kept() == 0  # H(0) = 0


@pytest.mark.parametrize("value", [2.0, 0.25, 1])
def test_constant_score_init(value):
    layer = MaskedConv2d(2, 3, (3, 2), score_init=value)
    assert layer.score.shape == layer.weight.shape == (3, 2, 3, 2)
    np.testing.assert_array_equal(layer.score.data, np.full((3, 2, 3, 2), float(value)))
    assert layer.score.dtype == np.float64


@settings(deadline=None, max_examples=20)
@given(seed=SEEDS, low=st.floats(-3, 2), width=st.floats(0.1, 3))
def test_uniform_score_init_is_within_bounds_and_seeded(seed, low, width):
    high = low + width
    a = MaskedLinear(8, 7, score_init=(low, high), generator=np.random.default_rng(seed))
    b = MaskedLinear(8, 7, score_init=(low, high), generator=np.random.default_rng(seed))
    assert np.all(a.score.data >= low) and np.all(a.score.data <= high)
    assert len(np.unique(a.score.data)) > 1
    np.testing.assert_array_equal(a.score.data, b.score.data)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)


@pytest.mark.parametrize(
    "bad", [(1.0, 0.0), (0.5, 0.5), (0.0, float("inf")), (float("nan"), 1.0), float("nan"), float("inf"),
            (0.0, 1.0, 2.0), "ab", None],
    ids=repr,
)
def test_invalid_score_init_is_a_value_error(bad):
    with pytest.raises(ValueError, match="score_init"):
        MaskedLinear(3, 2, score_init=bad)


# -- frozen masks ----------------------------------------------------------------------


def small_masked_net(gen, ste="identity"):
    return nn.Sequential(
        MaskedConv2d(2, 3, 3, ste=ste, score_init=(-1.0, 1.0), generator=gen), nn.ReLU(), nn.Flatten(),
        MaskedLinear(3 * 4 * 4, 5, ste=ste, score_init=(-1.0, 1.0), generator=gen),
    )


def masked_of(model):
    return [m for m in model.modules() if isinstance(m, MaskedLayer)]


def test_frozen_mask_gives_scores_no_gradient_and_unfreezing_restores_it():
    gen = np.random.default_rng(3)
    layer = MaskedLinear(4, 3, score_init=(-1.0, 1.0), generator=gen)
    x, u = gen.standard_normal((2, 4)), gen.standard_normal((2, 3))
    layer(T(x)).backward(u)
    assert layer.score.grad is not None
    layer.freeze_mask()
    assert layer.score.grad is None and not layer.score.requires_grad
    layer.weight.grad = None
    layer(T(x)).backward(u)
    assert layer.score.grad is None
    G = effective_weight_grad(lambda w: ops.matmul(T(x), w.T), layer.weight.data, layer.score.data, u)
    np.testing.assert_array_equal(layer.weight.grad, G * layer.mask())
    layer.freeze_mask(False)
    layer(T(x)).backward(u)
    assert layer.score.grad is not None and layer.score.requires_grad


@pytest.mark.parametrize("ste", ["identity", "softplus"])
def test_frozen_mask_fine_tune_changes_theta_but_no_mask(ste):
    gen = np.random.default_rng(0)
    model = small_masked_net(gen, ste)
    layers = masked_of(model)
    for layer in layers:
        layer.freeze_mask()
    masks = [layer.mask().copy() for layer in layers]
    score_values = [layer.score.data.copy() for layer in layers]
    thetas = [layer.weight.data.copy() for layer in layers]
    x, labels = gen.standard_normal((6, 2, 6, 6)), gen.integers(0, 5, size=6)
    opt = SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ops.cross_entropy(model(T(x)), labels)
        loss.backward()
        assert all(layer.score.grad is None for layer in layers)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for layer, mask, s0, theta0 in zip(layers, masks, score_values, thetas):
        np.testing.assert_array_equal(layer.mask(), mask)
        np.testing.assert_array_equal(layer.score.data, s0)
        assert not np.array_equal(layer.weight.data[mask], theta0[mask])


# -- dtypes, FLOPs bookkeeping ---------------------------------------------------------


@pytest.mark.parametrize("name,opts", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("frozen", [False, True])
def test_float32_layers_stay_float32(name, opts, frozen):
    gen = np.random.default_rng(0)
    est = get_ste(name, **opts)
    layers = [MaskedLinear(4, 3, ste=est, score_init=(-2, 2), dtype=np.float32, generator=gen),
              MaskedConv2d(2, 3, 2, ste=est, score_init=(-2, 2), dtype=np.float32, generator=gen)]
    inputs = [gen.standard_normal((2, 4)), gen.standard_normal((2, 2, 4, 4))]
    for layer, x in zip(layers, inputs):
        assert {p.dtype for p in layer.parameters()} == {np.dtype(np.float32)}
        layer.freeze_mask(frozen)
        y = layer(T(x, dtype=np.float32))
        assert y.dtype == np.float32
        y.backward(np.ones(y.shape, dtype=np.float32))
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        assert len(grads) == (2 if frozen else 3)
        assert {g.dtype for g in grads} == {np.dtype(np.float32)}


@pytest.mark.parametrize("conv, linear", [(MaskedConv2d, MaskedLinear), (nn.Conv2d, nn.Linear)],
                         ids=["masked", "plain"])
@settings(deadline=None)
@given(geom=conv_geometry())
def test_conv_uses_per_sample_is_the_output_size_of_the_last_forward(conv, linear, geom):
    n, c, f, h, w, kh, kw, stride, padding = geom
    layer = conv(c, f, (kh, kw), stride=stride, padding=padding)
    with pytest.raises(RuntimeError, match="forward"):
        layer.uses_per_sample()
    layer(T(np.zeros((n, c, h, w))))
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w + 2 * padding[1] - kw) // stride[1] + 1
    assert layer.uses_per_sample() == oh * ow
    assert linear(3, 2).uses_per_sample() == 1


# -- models ----------------------------------------------------------------------------


def weight_layers(model):
    return [m for m in model.modules() if hasattr(m, "weight")]


@pytest.mark.parametrize("build,kinds", [
    (lenet_300_100, [MaskedLinear] * 3),
    (lenet5, [MaskedConv2d, MaskedConv2d, MaskedLinear, MaskedLinear]),
])
def test_masked_models_contain_only_masked_weight_layers(build, kinds):
    model = build(masked=True, ste="relu", score_init=0.5)
    layers = weight_layers(model)
    assert [type(m) for m in layers] == kinds
    for layer in layers:
        assert layer.ste.name == "relu"
        np.testing.assert_array_equal(layer.score.data, 0.5)


@pytest.mark.parametrize("build,kinds", [
    (lenet_300_100, [nn.Linear] * 3),
    (lenet5, [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]),
])
def test_plain_models_contain_only_plain_layers(build, kinds):
    model = build(masked=False)
    assert [type(m) for m in weight_layers(model)] == kinds
    assert not any(isinstance(m, MaskedLayer) for m in model.modules())
    assert not any(name.endswith("score") for name, _ in model.named_parameters())


def test_lenet_300_100_shapes():
    model = lenet_300_100()
    assert [m.weight.shape for m in weight_layers(model)] == [(300, 784), (100, 300), (10, 100)]
    assert model(T(np.zeros((2, 1, 28, 28)))).shape == (2, 10)


@pytest.mark.parametrize("in_shape,flat", [((1, 28, 28), 800), ((3, 32, 32), 1250), ((2, 16, 20), 50 * 1 * 2)])
@pytest.mark.parametrize("masked", [True, False])
def test_lenet5_adapts_to_the_input_shape(in_shape, flat, masked):
    model = lenet5(in_shape, num_classes=7, masked=masked)
    layers = weight_layers(model)
    assert layers[0].weight.shape == (20, in_shape[0], 5, 5)
    assert layers[2].weight.shape == (500, flat)
    assert model(T(np.zeros((2,) + in_shape))).shape == (2, 7)


@pytest.mark.parametrize("in_shape", [(1, 12, 12), (1, 28, 13), (1, 4, 28), (3, 15, 15)])
def test_lenet5_rejects_too_small_input(in_shape):
    with pytest.raises(ValueError, match="too small"):
        lenet5(in_shape)
