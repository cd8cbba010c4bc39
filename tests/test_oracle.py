"""The step oracle: state in and out of other layouts, the reference step equal to Trainer.step bit for bit,
the comparison naming the earliest stage that disagrees and why, the `verify` command, and docs/verify.md run."""

import contextlib
import io as stdio
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import nn, optim, threads
from sclref.autograd import Tensor, no_grad
from sclref.cli import main
from sclref.data.datasets import Dataset
from sclref.errors import InputError
from sclref.nn.masked import MaskedConv2d, MaskedLinear
from sclref.oracle import (
    AdamSettings,
    SGDSettings,
    StateLayout,
    StepSettings,
    assert_step_matches,
    compare,
    export_state,
    load_state,
    reference_step,
)
from sclref.oracle.step import build_model
from sclref.scl import masked_layers, normalize_per_feature
from sclref.testing import strategies as sst
from sclref.train import TrainConfig, Trainer
from tests import mutations

DOC = Path(__file__).resolve().parents[1] / "docs" / "verify.md"
SHAPES = {"lenet300": (1, 8, 8), "lenet5": (1, 16, 16)}
FEW = settings(max_examples=5, deadline=None)


def small_bn_model():
    """A masked conv, batch norm, a masked dense: every kind of slot a state can hold."""
    return nn.Sequential({
        "conv": MaskedConv2d(2, 3, 3), "bn": nn.BatchNorm2d(3), "relu": nn.ReLU(), "flatten": nn.Flatten(),
        "fc": MaskedLinear(3 * 4 * 4, 5),
    })


def same_arrays(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- state in and out ------------------------------------------------------------------------------
@FEW
@given(data=st.data(), name=st.sampled_from(sorted(SHAPES)), layout=st.sampled_from(["torch", "flax", "sclref"]))
def test_state_round_trips_through_every_layout(data, name, layout):
    in_shape = SHAPES[name]
    state = data.draw(sst.model_states(name, in_shape, layout=layout))
    model = build_model(name, in_shape)
    load_state(model, state, layout, in_shape=in_shape)
    same_arrays(export_state(model, layout, in_shape=in_shape), state)


def test_flax_state_round_trips_nested_and_with_batch_norm():
    model = small_bn_model()
    gen = np.random.default_rng(0)
    for p in model.parameters():
        p.data[...] = gen.standard_normal(p.shape)
    model.bn.running_var[...] = gen.uniform(0.5, 2, 3)
    tree = export_state(model, "flax", in_shape=(2, 6, 6), nested=True)
    assert sorted(tree) == ["batch_stats", "params"]
    assert sorted(tree["params"]["BatchNorm_0"]) == ["bias", "scale"]
    assert sorted(tree["batch_stats"]["BatchNorm_0"]) == ["mean", "var"]
    assert tree["params"]["Conv_0"]["kernel"].shape == (3, 3, 2, 3)
    assert tree["params"]["Dense_0"]["score"].shape == (48, 5)
    other = small_bn_model()
    load_state(other, tree, "flax", in_shape=(2, 6, 6))
    same_arrays({k: v for k, v in other.state_dict().items() if k != "bn.num_batches_tracked"},
                {k: v for k, v in model.state_dict().items() if k != "bn.num_batches_tracked"})


def test_flax_dense_after_a_conv_stack_reads_the_map_flattened_in_hwc_order():
    model = small_bn_model().eval()
    gen = np.random.default_rng(1)
    for p in model.parameters():
        p.data[...] = gen.standard_normal(p.shape)
    x = gen.standard_normal((2, 2, 6, 6))
    with no_grad():
        fmap = model.relu(model.bn(model.conv(Tensor(x)))).data  # (N, C, H, W) before the flatten
        want = model.fc(Tensor(fmap.reshape(2, -1))).data
    flax = export_state(model, "flax", in_shape=(2, 6, 6))
    kernel, score = flax["params/Dense_0/kernel"], flax["params/Dense_0/score"]
    nhwc = fmap.transpose(0, 2, 3, 1).reshape(2, -1)  # how Flax flattens the same map
    got = nhwc @ (kernel * (score > 0)) + flax["params/Dense_0/bias"]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_name_map_dict_or_callable_loads_and_a_dict_exports_back():
    model = build_model("lenet300", (64,))
    state = export_state(model)
    theirs = {f"net.{k}": v for k, v in state.items()}
    mapping = {f"net.{k}": k for k in state}
    other = build_model("lenet300", (64,))
    load_state(other, theirs, names=lambda n: n.removeprefix("net."))
    same_arrays(other.state_dict(), model.state_dict())
    load_state(other, theirs, names=mapping)
    same_arrays(export_state(other, names=mapping), theirs)
    with pytest.raises(InputError, match="a callable cannot be inverted"):
        export_state(other, names=lambda n: n)


def test_torch_tensors_load_as_they_are():
    torch = pytest.importorskip("torch")
    model = build_model("lenet300", (64,))
    state = {k: torch.from_numpy(v).requires_grad_(v.ndim > 0) for k, v in export_state(model).items()}
    other = build_model("lenet300", (64,))
    load_state(other, state)
    same_arrays(other.state_dict(), model.state_dict())


def bad_state_cases():
    model = build_model("lenet300", (64,))
    good = export_state(model)
    cases = {
        "shape": ({**good, "fc2.bias": np.zeros(99)}, r"'fc2.bias': shape \(99,\) given, \(100,\) expected"),
        "dtype": ({**good, "fc1.weight": good["fc1.weight"].astype(np.int64)},
                  r"'fc1.weight': dtype int64 given, floating point expected"),
        "missing": ({k: v for k, v in good.items() if k != "fc3.score"},
                    r"missing: fc3.score \(10, 100\).*expected \(name, shape\): fc1.weight \(300, 64\)"),
        "extra": ({**good, "fc4.weight": np.zeros((2, 2))}, r"extra \(not in the model\): fc4.weight \(2, 2\)"),
        "transposed": ({**good, "fc1.weight": good["fc1.weight"].T},
                       r"shape \(64, 300\) given, \(300, 64\) expected: looks like a Flax Dense kernel \[in, out\], "
                       r"the 'flax' layout; pass layout='flax'"),
        "flax names": (export_state(model, "flax", in_shape=(64,)), r"the names are those of the 'flax' layout"),
        "not finite": ({**good, "fc1.bias": np.full(300, np.nan)}, r"'fc1.bias': holds NaN or infinite values"),
        "not numbers": ({**good, "fc1.bias": np.array(["a"] * 300)}, r"'fc1.bias': dtype <U1 given"),
        "not a mapping": ([1, 2], r"expected a mapping of names to arrays"),
        "non-string key": ({**good, 3: np.zeros(1)}, r"names must be strings"),
        "two names for one": ({**good, "x": good["fc1.bias"]}, r"both give fc1.bias"),
    }
    return model, cases


@pytest.mark.parametrize("case", list(bad_state_cases()[1]))
def test_every_bad_state_is_a_clear_input_error_and_changes_nothing(case):
    model, cases = bad_state_cases()
    state, message = cases[case]
    before = model.state_dict()
    names = {"x": "fc1.bias"} if case == "two names for one" else None
    with pytest.raises(InputError, match=message):
        load_state(model, state, "torch", names=names)
    same_arrays(model.state_dict(), before)


def test_a_flax_conv_kernel_given_as_torch_and_bad_layouts_are_named():
    model = build_model("lenet5", (1, 16, 16))
    torch_state = export_state(model)
    flax_state = export_state(model, "flax", in_shape=(1, 16, 16))
    bad = {**torch_state, "conv2.weight": flax_state["params/Conv_1/kernel"]}
    with pytest.raises(InputError, match=r"looks like a Flax Conv kernel \[kh, kw, in, out\]"):
        load_state(model, bad)
    bad = {**flax_state, "params/Conv_1/kernel": torch_state["conv2.weight"]}
    with pytest.raises(InputError, match=r"looks like a PyTorch Conv2d weight \[out, in, kh, kw\]"):
        load_state(model, bad, "flax", in_shape=(1, 16, 16))
    with pytest.raises(InputError, match="unknown layout 'jax'"):
        load_state(model, torch_state, "jax")
    with pytest.raises(InputError, match="needs in_shape"):
        load_state(model, flax_state, "flax")
    with pytest.raises(InputError, match="names must be a mapping"):
        load_state(model, torch_state, names=3)


# -- the reference step is sclref's training step --------------------------------------------------
def trainer_for(model, settings_kw, seed):
    gen = np.random.default_rng(seed)
    shape = SHAPES[model]
    data = Dataset(gen.standard_normal((16, *shape)), gen.integers(0, 10, 16), gen.standard_normal((4, *shape)),
                   gen.integers(0, 10, 4))
    trainer = Trainer(TrainConfig(model=model, dtype="float64", **settings_kw), data, log=lambda *a: None)
    for _, layer in masked_layers(trainer.model):
        layer.score.data[...] = gen.uniform(-1, 1, layer.score.shape)
    return trainer, data


@pytest.mark.parametrize("model,settings_kw,adam", [
    ("lenet300", dict(lam=0.05, lam_per="step"), False),
    ("lenet300", dict(lam=0.05, normalize="total", ste="leaky_relu", ste_alpha=0.3, weight_decay=1e-3), False),
    ("lenet300", dict(lam=0.02, normalization="max", ste="softplus", lam_per="step"), True),
    ("lenet5", dict(lam=0.05, weighting="flops", ste="relu", lam_per="step"), False),
    ("lenet5", dict(lam=0.01, normalization="none", normalize="total", lam_per="step"), True),
])
def test_the_oracle_equals_trainer_step_bit_for_bit(model, settings_kw, adam):
    trainer, data = trainer_for(model, settings_kw, seed=len(settings_kw))
    if adam:  # Trainer builds SGD; its step takes any optimizer of sclref.optim
        scores = [layer.score for _, layer in masked_layers(trainer.model)]
        weights = [p for p in trainer.model.parameters() if all(p is not s for s in scores)]
        trainer.opt_w = optim.Adam(weights, lr=1e-3, betas=(0.8, 0.99), weight_decay=1e-4)
        trainer.opt_s = optim.Adam(scores, lr=0.01)
    settings_ = StepSettings.from_trainer(trainer)
    assert isinstance(settings_.theta_optimizer, AdamSettings if adam else SGDSettings)
    start = trainer.model.state_dict()
    batches = [(data.x_train[:8], data.y_train[:8]), (data.x_train[8:], data.y_train[8:])]
    result = reference_step(model, start, batches, settings_, steps=2, layout="sclref")
    with threads.pinned():
        losses = [trainer.step(x, y)[0] for x, y in batches]
    assert [r.loss for r in result.steps] == losses
    after = trainer.model.state_dict()
    final = result.final_state()
    assert list(final) == list(after)
    for name in after:
        assert final[name].tobytes() == after[name].tobytes(), name


def test_stages_are_consistent_with_each_other():
    gen = np.random.default_rng(3)
    model = build_model("lenet300", (64,))
    state = {k: (gen.uniform(-1, 1, v.shape) if k.endswith("score") else v) for k, v in export_state(model).items()}
    x, y = gen.standard_normal((6, 64)), gen.integers(0, 10, 6)
    s = StepSettings(lam=0.04, score_optimizer=SGDSettings(0.5))
    r = reference_step("lenet300", state, (x, y), s)[0]
    for name in r.grad_s:
        np.testing.assert_array_equal(r.s_normalized[name], normalize_per_feature(r.grad_s[name], "l2", 1e-12))
        np.testing.assert_array_equal(r.s_total[name], r.s_normalized[name] + r.reg_grad[name])
        np.testing.assert_allclose(r.s[name], state[name] - 0.5 * r.s_total[name], rtol=1e-15, atol=1e-15)
        np.testing.assert_array_equal(r.mask_before[name], state[name] > 0)
        np.testing.assert_array_equal(r.flipped[name], r.mask_before[name] != r.mask_after[name])
    assert r.penalty == pytest.approx(0.04 * sum(int((v > 0).sum()) for k, v in state.items() if "score" in k))
    assert r.logits.shape == (6, 10)


def test_bad_batches_and_settings_are_input_errors():
    model = build_model("lenet300", (64,))
    state = export_state(model)
    x, y = np.zeros((4, 64)), np.array([0, 1, 2, 3])
    for batch, message in [((x, np.array([0, 1, 2, 10])), r"labels must be in \[0, 10\)"),
                           ((x, y[:3]), r"labels must have shape \(4,\)"),
                           ((np.full((4, 64), np.nan), y), "NaN or infinite"),
                           ((x, y.astype(float) + 0.5), "whole numbers"),
                           ([(x, y)] * 3, "3 batches given for 1 steps"),
                           ((np.zeros((4, 0)), y), "N >= 1")]:
        with pytest.raises(InputError, match=message):
            reference_step("lenet300", state, batch)
    for values, message in [({"ste": "nope"}, "unknown STE 'nope'"), ({"lam": -1}, "lam must be in"),
                            ({"normalize": "both"}, "normalize must be one of"),
                            ({"ste": "leaky_relu", "ste_options": {"alpha": 2}}, "alpha must be in"),
                            ({"theta_optimizer": {"name": "rmsprop"}}, "unknown optimizer 'rmsprop'"),
                            ({"score_optimizer": {"name": "adam", "betas": [0.9]}}, "betas must be a pair"),
                            ({"colour": 1}, r"unknown step settings \['colour'\]")]:
        with pytest.raises(InputError, match=message):
            StepSettings.from_dict(values)
    with pytest.raises(InputError, match="unknown model"):
        reference_step("alexnet", state, (x, y))
    with pytest.raises(InputError, match="steps must be"):
        reference_step("lenet300", state, (x, y), steps=0)


def test_settings_survive_json():
    s = StepSettings(ste="leaky_relu", ste_options={"alpha": 0.2}, lam=0.01, normalization="max",
                     normalize="total", weighting="flops", theta_optimizer=AdamSettings(1e-3, (0.8, 0.9)),
                     score_optimizer=SGDSettings(0.3, 0.5, 1e-4))
    assert StepSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# -- compare -----------------------------------------------------------------------------------------
def stages_of(result, step=0, skip=("buffers",)):
    """sclref's own stages in the user's names: what a perfect implementation would hand in."""
    from sclref.oracle.compare import COMPARED_STAGES

    return {stage: result.stage(stage, step) for stage in COMPARED_STAGES
            if stage not in skip + ("mask_before", "flipped")}


def broken(result, kind: str) -> dict:
    """sclref's stages with one mistake made in NumPy (identity STE, l2, normalize='task')."""
    r, eps = result[0], result.settings.eps
    theirs = stages_of(result)
    for name in r.grad_s:
        task, reg, s = r.grad_s[name], r.reg_grad[name], result.initial[name]
        if kind == "axis":  # per input unit
            normalized = np.moveaxis(normalize_per_feature(np.moveaxis(task, 1, 0).copy(), "l2", eps), 0, 1)
            total = normalized + reg
        elif kind == "order":
            normalized = total = normalize_per_feature(task + reg, "l2", eps)
        else:  # a ReLU estimator
            theirs["grad_s"][name] = task = np.where(s > 0, task, 0.0)
            reg = np.where(s > 0, reg, 0.0)
            theirs["reg_grad"][name] = reg
            normalized = normalize_per_feature(task, "l2", eps)
            total = normalized + reg
        theirs["s_normalized"][name], theirs["s_total"][name] = normalized, total
    for stage in ("theta", "s", "mask"):
        del theirs[stage]
    return theirs


MESSAGES = {
    "axis": ("s_normalized", "s gradient after normalization: feature axis looks transposed (normalized over inputs "
                             "instead of outputs)"),
    "order": ("s_normalized", "λ added before normalization (normalize='total'), settings say after "
                              "(normalize='task')"),
    "relu": ("grad_s", "the STE's surrogate is zero for s < 0 (ReLU-like), settings say identity"),
}
CASE_SETTINGS = sst.step_settings(ste="identity", normalization="l2", normalize="task", weighting="count",
                                  lam=(0.01, 0.1))


@FEW
@given(case=sst.oracle_cases("lenet300", (1, 8, 8), settings=CASE_SETTINGS), kind=st.sampled_from(sorted(MESSAGES)))
def test_the_three_mistakes_are_named_and_the_correct_step_passes(case, kind):
    state, batch, step_settings = case
    result = reference_step("lenet300", state, batch, step_settings)
    assert compare(result, stages_of(result)).ok
    comparison = compare(result, broken(result, kind))
    stage, message = MESSAGES[kind]
    assert comparison.earliest == (0, stage)
    assert comparison.diagnosis == [message]
    with pytest.raises(AssertionError, match=re.escape(message)):
        assert_step_matches(result, broken(result, kind))


@pytest.fixture(scope="module")
def two_steps():
    gen = np.random.default_rng(5)
    model = build_model("lenet300", (64,))
    state = {k: (gen.uniform(-1, 1, v.shape) if k.endswith("score") else v) for k, v in export_state(model).items()}
    batches = [(gen.standard_normal((5, 64)), gen.integers(0, 10, 5)) for _ in range(2)]
    return reference_step("lenet300", state, batches, StepSettings(lam=0.02), steps=2)


def test_the_earliest_disagreeing_stage_is_named_across_stages_and_steps(two_steps):
    theirs = [stages_of(two_steps, 0), stages_of(two_steps, 1)]
    theirs[1]["s"]["fc2.score"] = theirs[1]["s"]["fc2.score"] + 1e-3
    theirs[1]["grad_theta"]["fc3.bias"] = theirs[1]["grad_theta"]["fc3.bias"] * 1.5
    c = compare(two_steps, theirs, diagnose=False)
    assert c.earliest == (1, "grad_theta")
    assert [(i.step, i.stage, i.name) for i in c.items if not i.ok] == [(1, "grad_theta", "fc3.bias"),
                                                                          (1, "s", "fc2.score")]
    theirs[0]["logits"] = theirs[0]["logits"] + 1e-6
    assert compare(two_steps, theirs, diagnose=False).earliest == (0, "logits")
    flat = {}
    for i, stages in enumerate(theirs):
        for stage, value in stages.items():
            if isinstance(value, dict):
                flat.update({f"{i}/{stage}/{name}": v for name, v in value.items()})
            else:
                flat[f"{i}/{stage}"] = value
    assert compare(two_steps, flat, diagnose=False).earliest == (0, "logits")


def test_reported_errors_and_first_index(two_steps):
    theirs = {"s_total": dict(two_steps.stage("s_total", 0))}
    arr = theirs["s_total"]["fc2.score"].copy()
    arr[3, 7] += 0.5
    arr[5, 1] -= 0.25
    theirs["s_total"]["fc2.score"] = arr
    c = compare(two_steps, theirs, step=0, diagnose=False)
    item = next(i for i in c.items if i.name == "fc2.score")
    assert (item.mismatched, item.first_index, item.max_abs) == (2, (3, 7), pytest.approx(0.5))
    assert not c.ok and c.earliest == (0, "s_total")
    assert "(3, 7)" in c.report() and "DIFFERS" in c.report()


def test_a_mask_that_differs_at_the_kink_is_not_a_disagreement():
    gen = np.random.default_rng(6)
    model = build_model("lenet300", (64,))
    state = {k: (gen.uniform(-1, 1, v.shape) if k.endswith("score") else v) for k, v in export_state(model).items()}
    batch = (gen.standard_normal((5, 64)), gen.integers(0, 10, 5))
    step = StepSettings(lam=0.02, score_optimizer=SGDSettings(0.5))
    g = reference_step("lenet300", state, batch, step)[0].s_total["fc2.score"]
    # An entry whose s keeps its sign when set to lr·g: same masks, same gradient, so the step lands it on 0.
    i = np.unravel_index(np.argmax((np.sign(state["fc2.score"]) == np.sign(g)) * np.abs(g)), g.shape)
    state["fc2.score"][i] = 0.5 * g[i]
    result = reference_step("lenet300", state, batch, step)
    assert abs(result[0].s["fc2.score"][i]) < 1e-15
    mask = result[0].mask_after["fc2.score"].copy()
    mask[i] = not mask[i]
    c = compare(result, {"mask": {"fc2.score": mask}})
    assert c.ok and (c.items[0].borderline, c.items[0].mismatched) == (1, 0)
    far = np.unravel_index(np.argmax(np.abs(result[0].s["fc2.score"])), g.shape)
    mask[far] = not mask[far]
    c = compare(result, {"mask": {"fc2.score": mask}})
    assert not c.ok and (c.items[0].borderline, c.items[0].mismatched, c.items[0].first_index) == (1, 1, far)


def test_float32_tensors_get_float32_tolerances_and_a_summed_loss_is_recognised(two_steps):
    r = two_steps[0]
    theirs = {"logits": r.logits.astype(np.float32), "loss": r.loss}
    c = compare(two_steps, theirs, step=0)
    assert c.ok and c.dtype == "float32" and c.tolerance.rtol == 1e-4
    assert not compare(two_steps, {"logits": r.logits + 1e-6 * np.abs(r.logits).max()}, step=0).ok
    summed = {"loss": r.loss * 5, "grad_theta": {k: v * 5 for k, v in two_steps.stage("grad_theta", 0).items()}}
    c = compare(two_steps, summed, step=0)
    assert c.earliest == (0, "loss")
    assert c.diagnosis == ["the loss is 5 (the batch size) times sclref's: the loss looks summed over the batch "
                           "instead of averaged"]


def test_a_float32_gradient_disagreement_points_at_max_pool_near_ties():
    model = build_model("lenet5", (1, 16, 16))
    gen = np.random.default_rng(8)
    state = {k: (gen.uniform(-1, 1, v.shape) if k.endswith("score") else v) for k, v in export_state(model).items()}
    x = np.zeros((2, 1, 16, 16))  # constant maps: every pool window is a tie
    result = reference_step("lenet5", state, (x, np.array([1, 2])), StepSettings(lam=0.01))
    grads = result.stage("grad_theta")
    theirs = {"grad_theta": {k: (v * 1.01).astype(np.float32) for k, v in grads.items()}}
    c = compare(result, theirs)
    assert c.earliest == (0, "grad_theta") and c.dtype == "float32" and not c.diagnosis
    windows = 2 * (20 * 6 * 6 + 50 * 1 * 1)  # pool1 and pool2 of both samples
    assert any(h.startswith(f"float32: in this batch {windows} max-pool window(s)") for h in c.hints), c.hints
    theirs = {"grad_theta": {k: v.astype(np.float32) for k, v in grads.items()}}
    assert compare(result, theirs).ok


def test_bad_input_to_compare_is_an_input_error(two_steps):
    r = two_steps[0]
    for theirs, kw, message in [
        ({"loss": r.loss}, {}, "say which with step="),
        ({"gradient/fc1.score": r.grad_s["fc1.score"]}, {"step": 0}, "unknown stage 'gradient'"),
        ({"grad_s/fc1.weight": r.grad_s["fc1.score"]}, {"step": 0}, "not one of its names"),
        ({"grad_s/fc1.score": r.grad_s["fc1.score"].T}, {"step": 0}, r"shape \(64, 300\) given"),
        ({"loss/x": 1.0}, {"step": 0}, "is one value"),
        ({"mask/fc1.score": np.full((300, 64), 2)}, {"step": 0}, "booleans or 0/1"),
        ({"loss": np.float16(1.0)}, {"step": 0}, "compare float32 or float64"),
        ({"loss": r.loss}, {"step": 0, "rtol": -1.0}, "rtol must be a finite number >= 0"),
        ({"7/loss": r.loss}, {}, "is for step 7"),
    ]:
        with pytest.raises(InputError, match=message):
            compare(two_steps, theirs, **kw)


def test_a_float32_pytorch_step_passes_with_the_default_float32_tolerance():
    torch = pytest.importorskip("torch")
    namespace = doc_namespace("torch", upto="from hypothesis import")
    gen = np.random.default_rng(11)
    model64 = build_model("lenet300", (784,))
    state = {k: (np.where(gen.random(v.shape) < 0.3, -1, 1) * gen.uniform(0.05, 2, v.shape) if k.endswith("score")
                 else v).astype(np.float32) for k, v in export_state(model64).items()}
    x = gen.standard_normal((32, 1, 28, 28)).astype(np.float32)
    y = gen.integers(0, 10, 32)
    st32 = StepSettings(lam=0.05, theta_optimizer=SGDSettings(0.05, 0.9), score_optimizer=SGDSettings(0.5))
    model = namespace["lenet300"]((1, 28, 28)).float()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    theirs = namespace["scl_step"](model, x, y, st32)
    c = compare(reference_step("lenet300", state, (x, y), st32), theirs)
    assert c.ok and c.dtype == "float32", c.report()


# -- the command ------------------------------------------------------------------------------------
@pytest.fixture()
def files(tmp_path):
    gen = np.random.default_rng(2)
    model = build_model("lenet300", (1, 8, 8))
    state = {k: (gen.uniform(-1, 1, v.shape) if k.endswith("score") else v) for k, v in export_state(model).items()}
    np.savez(tmp_path / "state.npz", **state)
    x, y = gen.standard_normal((6, 1, 8, 8)), gen.integers(0, 10, 6)
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    (tmp_path / "settings.json").write_text(json.dumps(StepSettings(lam=0.02).to_dict()))
    args = ["--model", "lenet300", "--state", str(tmp_path / "state.npz"), "--batch", str(tmp_path / "batch.npz"),
            "--settings", str(tmp_path / "settings.json")]
    return tmp_path, args, state, (x, y)


def run_cli(argv):
    out, err = stdio.StringIO(), stdio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["verify", *argv])
    return code, out.getvalue(), err.getvalue()


def test_verify_writes_the_reference_and_compares_theirs(files):
    tmp, args, state, batch = files
    code, out, err = run_cli(args + ["--out", str(tmp / "result.npz")])
    assert (code, err) == (0, "")
    result = reference_step("lenet300", state, batch, StepSettings(lam=0.02))
    with np.load(tmp / "result.npz") as saved:
        same_arrays({k: saved[k] for k in saved.files}, result.to_flat())
        theirs = {k[2:]: saved[k] for k in saved.files if not re.match(r"0/(mask_before|flipped)/", k)}
    np.savez(tmp / "theirs.npz", **theirs)
    code, out, _ = run_cli(args + ["--theirs", str(tmp / "theirs.npz")])
    assert code == 0 and "agree" in out
    theirs["s/fc2.score"] = theirs["s/fc2.score"] * -1
    np.savez(tmp / "theirs.npz", **theirs)
    code, out, _ = run_cli(args + ["--theirs", str(tmp / "theirs.npz"), "--json"])
    record = json.loads(out)
    assert code == 1 and record["comparison"]["earliest"] == {"step": 0, "stage": "s"}


def test_verify_runs_several_steps_in_the_flax_layout(tmp_path):
    gen = np.random.default_rng(9)
    state = export_state(build_model("lenet5", (1, 16, 16)), "flax", in_shape=(1, 16, 16))
    np.savez(tmp_path / "state.npz", **state)
    batches = [(gen.standard_normal((3, 16, 16, 1)), gen.integers(0, 10, 3)) for _ in range(2)]
    np.savez(tmp_path / "batch.npz", x_0=batches[0][0], y_0=batches[0][1], x_1=batches[1][0], y_1=batches[1][1])
    (tmp_path / "settings.json").write_text(json.dumps(StepSettings(lam=0.01).to_dict()))
    code, out, err = run_cli(["--model", "lenet5", "--state", str(tmp_path / "state.npz"), "--batch",
                              str(tmp_path / "batch.npz"), "--settings", str(tmp_path / "settings.json"),
                              "--steps", "2", "--layout", "flax", "--out", str(tmp_path / "r.npz")])
    assert (code, err) == (0, "") and out.startswith("step 0: loss") and "\nstep 1: loss" in out
    want = reference_step("lenet5", state, batches, StepSettings(lam=0.01), steps=2, layout="flax").to_flat()
    with np.load(tmp_path / "r.npz") as saved:
        assert "1/s/params/Dense_0/score" in saved.files
        same_arrays({k: saved[k] for k in saved.files}, want)


@pytest.mark.parametrize("change,message", [
    (lambda t: (t / "settings.json").write_text("{"), "not valid JSON"),
    (lambda t: (t / "settings.json").write_text('{"lam": "x"}'), "lam must be a finite number"),
    (lambda t: (t / "batch.npz").write_bytes(b"not a zip"), "not a readable .npz"),
    (lambda t: np.savez(t / "batch.npz", x=np.zeros((2, 64))), "expected arrays x and y"),
    (lambda t: np.savez(t / "state.npz", a=np.zeros(3)), "missing: fc1.weight"),
    (lambda t: (t / "state.npz").unlink(), "no such file"),
])
def test_verify_refuses_bad_files_with_one_line_and_status_2(files, change, message):
    tmp, args, _, _ = files
    change(tmp)
    code, out, err = run_cli(args)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and err.startswith("sclref verify: ")


@settings(max_examples=25, deadline=None)
@given(data=st.data(), target=st.sampled_from(["state.npz", "batch.npz", "settings.json", "theirs.npz"]))
def test_verify_under_damaged_files_exits_0_1_or_2(tmp_path_factory, data, target):
    tmp = tmp_path_factory.mktemp("fuzz")
    gen = np.random.default_rng(4)
    model = build_model("lenet300", (16,))
    state = {k: (gen.uniform(-1, 1, v.shape) if k.endswith("score") else v) for k, v in export_state(model).items()}
    np.savez(tmp / "state.npz", **state)
    x, y = gen.standard_normal((3, 16)), gen.integers(0, 10, 3)
    np.savez(tmp / "batch.npz", x=x, y=y)
    settings_doc = StepSettings(lam=0.02).to_dict()
    (tmp / "settings.json").write_text(json.dumps(settings_doc))
    r = reference_step("lenet300", state, (x, y), StepSettings(lam=0.02))
    np.savez(tmp / "theirs.npz", loss=np.float64(r[0].loss), **{f"s/{k}": v for k, v in r[0].s.items()})
    path = tmp / target
    if target.endswith(".json"):
        path.write_text(data.draw(mutations.json_text_mutations(settings_doc)))
    else:
        path.write_bytes(data.draw(mutations.file_mutations(path.read_bytes())))
    args = ["--model", "lenet300", "--state", str(tmp / "state.npz"), "--batch", str(tmp / "batch.npz"),
            "--settings", str(tmp / "settings.json"), "--theirs", str(tmp / "theirs.npz")]
    code, _, err = run_cli(args)
    assert code in (0, 1, 2)
    assert (code == 2) == bool(err) and err.count("\n") <= 1


# -- docs/verify.md runs ---------------------------------------------------------------------------------
def doc_blocks(tag: str):
    """The code blocks of docs/verify.md marked `<!-- verify: TAG -->`, and its marked output blocks joined."""
    text = DOC.read_text()
    blocks = re.findall(r"<!-- verify: (\w+)( output)? -->\n```\w+\n(.*?)```", text, re.S)
    code = [body for t, output, body in blocks if t == tag and not output]
    expected = "".join(body for t, output, body in blocks if t == tag and output)
    return code, expected


def doc_namespace(tag: str, upto: str | None = None) -> dict:
    """Run the page's `tag` code up to the block holding `upto`; return its namespace."""
    code, _ = doc_blocks(tag)
    namespace = {"__name__": f"verify_md_{tag}"}
    for block in code:
        if upto is not None and upto in block:
            break
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("tag", ["torch", "jax"])
def test_the_examples_of_docs_verify_md_run_and_print_what_the_page_shows(tag):
    pytest.importorskip(tag)
    code, expected = doc_blocks(tag)
    assert code and expected
    out = stdio.StringIO()
    namespace = {"__name__": f"verify_md_{tag}"}
    with contextlib.redirect_stdout(out):
        for block in code:
            exec(compile(block, str(DOC), "exec"), namespace)
    assert out.getvalue() == expected


def test_the_state_error_quoted_in_docs_verify_md_is_the_real_one():
    model = build_model("lenet300", (64,))
    state = export_state(model)
    state["fc1.weight"] = state["fc1.weight"].T
    with pytest.raises(InputError) as info:
        load_state(model, state)
    quoted = re.search(r"```\n(state \(layout 'torch'\).*?)\n```", DOC.read_text(), re.S).group(1)
    assert " ".join(quoted.split()) == str(info.value)


def test_state_layout_lists_the_expected_names_in_each_layout():
    model = small_bn_model()
    torch_names = [n for n, _ in StateLayout(model, "torch").expected()]
    assert torch_names[:3] == ["conv.weight", "conv.bias", "conv.score"] and "bn.num_batches_tracked" in torch_names
    flax = dict(StateLayout(model, "flax", in_shape=(2, 6, 6)).expected())
    assert flax["params/Dense_0/kernel"] == (48, 5) and "batch_stats/BatchNorm_0/var" in flax
    assert not any("num_batches" in n for n in flax)
