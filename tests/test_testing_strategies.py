"""The public strategies of sclref.testing.strategies generate what they promise: fitting geometries,
scores off the kink, principled estimators, batches, settings, states and cases the oracle accepts."""

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import ops
from sclref import ste as ste_registry
from sclref.autograd import Tensor
from sclref.oracle import SGDSettings, StepSettings, load_state, reference_step
from sclref.oracle.step import build_model
from sclref.testing import strategies as sst

FEW = settings(max_examples=10, deadline=None)


@given(sst.dense_geometries(max_in=20, max_out=7))
def test_dense_geometries_are_in_range(g):
    assert 1 <= g.in_features <= 20 and 1 <= g.out_features <= 7
    assert g.weight_shape == (g.out_features, g.in_features)


@given(sst.conv_geometries())
def test_conv_geometries_fit_and_give_the_output_size_the_conv_computes(g):
    assert all(p < k for p, k in zip(g.padding, g.kernel_size))
    assert all(o >= 1 for o in g.out_size)
    x = Tensor(np.zeros((1, g.in_channels, *g.in_size)))
    w = Tensor(np.zeros(g.weight_shape))
    y = ops.conv2d(x, w, None, g.stride, g.padding)
    assert y.shape == (1, g.out_channels, *g.out_size)


@given(data=st.data(), margin=st.floats(0.001, 0.5), dtype=st.sampled_from([np.float32, np.float64]))
def test_scores_keep_the_margin_from_the_kink(data, margin, dtype):
    s = data.draw(sst.scores((40, 30), margin=margin, high=margin + 1.0, dtype=dtype))
    assert s.dtype == dtype and s.shape == (40, 30)
    assert np.all(np.abs(s) >= dtype(margin) * (1 - 1e-6)) and np.all(np.abs(s) <= margin + 1.0 + 1e-6)


@given(data=st.data())
def test_scores_have_the_asked_share_of_negatives(data):
    s = data.draw(sst.scores((100, 100), negative=0.3))
    assert 0.27 < np.mean(s < 0) < 0.33
    assert np.all(data.draw(sst.scores((10, 10), negative=0.0)) > 0)


@given(data=st.data())
def test_weights_stay_within_the_fan_in_bound(data):
    w = data.draw(sst.weights((6, 4, 3, 3)))
    assert np.all(np.abs(w) <= 1 / np.sqrt(36)) and w.std() > 0


@given(pair=sst.ste_names())
def test_ste_names_give_principled_estimators_with_valid_options(pair):
    name, options = pair
    estimator = ste_registry.get(name, **options)
    assert estimator.satisfies_principle
    assert np.all(estimator.surrogate(np.linspace(-3, 3, 61)) > 0)


@given(pair=sst.ste_names(principle=False))
def test_ste_names_can_ask_for_the_violators(pair):
    assert not ste_registry.get(*pair[:1], **pair[1]).satisfies_principle


def test_ste_names_cover_the_registry():
    seen = set()

    @settings(max_examples=60, deadline=None)
    @given(sst.ste_names(principle=None))
    def collect(pair):
        seen.add(pair[0])

    collect()
    assert seen == set(ste_registry.available())


@given(batch=sst.batches((3, 5, 4), num_classes=7, batch_size=(2, 6)))
def test_batches_fit_the_input_shape_and_the_classes(batch):
    x, y = batch
    assert x.shape[1:] == (3, 5, 4) and 2 <= len(x) <= 6 and x.dtype == np.float64
    assert y.shape == (len(x),) and y.dtype == np.int64 and np.all((0 <= y) & (y < 7))


@given(batch=sst.batches((3, 5, 4), batch_size=3, layout="flax"))
def test_flax_batches_are_nhwc(batch):
    assert batch[0].shape == (3, 5, 4, 3)


@given(sst.step_settings())
def test_step_settings_are_valid_and_survive_json(s):
    assert isinstance(s, StepSettings)
    assert StepSettings.from_dict(s.to_dict()) == s


@given(sst.step_settings(ste="relu", lam=0.5, normalize="total", theta_optimizer=SGDSettings(0.1)))
def test_step_settings_keep_what_is_fixed(s):
    assert (s.ste, s.lam, s.normalize, s.theta_optimizer) == ("relu", 0.5, "total", SGDSettings(0.1))


@FEW
@given(data=st.data(), layout=st.sampled_from(["torch", "flax"]), name=st.sampled_from(["lenet300", "lenet5"]))
def test_model_states_load_and_keep_the_margin(data, layout, name):
    in_shape = (1, 8, 8) if name == "lenet300" else (1, 16, 16)
    state = data.draw(sst.model_states(name, in_shape, layout=layout, margin=0.1))
    model = build_model(name, in_shape)
    load_state(model, state, layout, in_shape=in_shape)
    scores = [v for k, v in model.state_dict().items() if k.endswith("score")]
    assert scores and all(np.all(np.abs(s) >= 0.1) for s in scores)


@FEW
@given(case=sst.oracle_cases("lenet300", (1, 8, 8), batch_size=3))
def test_oracle_cases_run_through_the_oracle(case):
    state, batch, step_settings = case
    result = reference_step("lenet300", state, batch, step_settings)
    assert np.isfinite(result[0].loss)
    assert repr(case).startswith("OracleCase(state={9 arrays}, batch=(x (3, 1, 8, 8), y (3,)), settings=StepSettings(")


def test_sclref_and_its_oracle_import_without_hypothesis():
    code = ("import sys, sclref, sclref.testing, sclref.oracle, sclref.oracle.cli; "
            "assert 'hypothesis' not in sys.modules, 'hypothesis was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
