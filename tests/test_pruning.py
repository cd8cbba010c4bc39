"""Magnitude pruning, and the run that prunes once and retrains: exact counts, frozen masks, a resumable hook."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import data as datasets
from sclref import models
from sclref.pruning import magnitude_prune
from sclref.scl import masked_layers
from sclref.train import TrainConfig, Trainer, train

CONFIG = TrainConfig(train_limit=300, test_limit=100, epochs=2, finetune_epochs=2, prune_scope="layer",
                     prune_sparsity={"fc1": 0.9, "fc2": 0.8, "fc3": 0.5})
SIZES = {"fc1": 64 * 300, "fc2": 300 * 100, "fc3": 100 * 10}


@pytest.fixture(scope="module")
def digits():
    return datasets.subset(datasets.load("digits", dtype=np.float32), 300, 100)


def net(seed=0):
    return models.lenet_300_100(in_features=64, generator=np.random.default_rng(seed))


def magnitudes(model):
    return {name: np.abs(layer.weight.data) for name, layer in masked_layers(model)}


fraction = st.floats(0, 0.999, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(fc1=fraction, fc2=fraction, fc3=fraction, seed=st.integers(0, 3))
def test_per_layer_pruning_keeps_exactly_the_largest_weights(fc1, fc2, fc3, seed):
    model = net(seed)
    weights_before = {k: v.copy() for k, v in model.state_dict().items() if not k.endswith("score")}
    requested = {"fc1": fc1, "fc2": fc2, "fc3": fc3}
    kept = magnitude_prune(model, requested)
    for name, layer in masked_layers(model):
        n = SIZES[name]
        assert kept[name] == layer.num_kept() == n - round(requested[name] * n)
        mag, mask = np.abs(layer.weight.data), layer.mask()
        if 0 < kept[name] < n:
            assert mag[mask].min() >= mag[~mask].max()
    # Only the masks change: θ and the biases are untouched.
    after = model.state_dict()
    assert all(np.array_equal(after[k], v) for k, v in weights_before.items())


@settings(max_examples=15, deadline=None)
@given(sparsity=fraction, seed=st.integers(0, 3))
def test_global_pruning_keeps_the_largest_weights_over_all_layers(sparsity, seed):
    model = net(seed)
    kept = magnitude_prune(model, sparsity, scope="global")
    total = sum(SIZES.values())
    assert sum(kept.values()) == total - round(sparsity * total)
    mags = magnitudes(model)
    masks = {name: layer.mask() for name, layer in masked_layers(model)}
    kept_mags = np.concatenate([mags[n][masks[n]] for n in mags])
    pruned_mags = np.concatenate([mags[n][~masks[n]] for n in mags])
    if kept_mags.size and pruned_mags.size:
        assert kept_mags.min() >= pruned_mags.max()


def test_global_threshold_differs_from_per_layer_counts():
    # fc1 has the smallest fan-in, hence the largest initial |θ|: one global threshold spares it.
    per_layer, global_ = net(), net()
    magnitude_prune(per_layer, 0.9)
    magnitude_prune(global_, 0.9, scope="global")
    assert masked_layers(per_layer)[0][1].sparsity() == pytest.approx(0.9, abs=1e-4)
    assert masked_layers(global_)[0][1].sparsity() < 0.85


def test_ties_are_broken_to_an_exact_count():
    model = net()
    for _, layer in masked_layers(model):
        layer.weight.data[...] = 1.0  # every |θ| ties
    kept = magnitude_prune(model, 0.5)
    assert kept == {name: n - round(0.5 * n) for name, n in SIZES.items()}


@pytest.mark.parametrize("sparsity, scope, message", [
    (1.0, "layer", r"in \[0, 1\)"),
    (-0.1, "layer", r"in \[0, 1\)"),
    (float("nan"), "layer", r"in \[0, 1\)"),
    (0.5, "per-unit", "unknown pruning scope"),
    ({"fc1": 0.5}, "layer", "exactly the masked layers"),
    ({"fc1": 0.5, "fc2": 0.5, "fc3": 1.5}, "layer", "sparsity of fc3"),
    ({"fc1": 0.5, "fc2": 0.5, "fc3": 0.5}, "global", "one overall sparsity"),
])
def test_bad_pruning_requests_are_clear_errors(sparsity, scope, message):
    with pytest.raises(ValueError, match=message):
        magnitude_prune(net(), sparsity, scope)


def test_a_network_without_masks_cannot_be_pruned():
    with pytest.raises(ValueError, match="no masked layers"):
        magnitude_prune(models.lenet_300_100(in_features=64, masked=False), 0.5)


def quiet(line):
    pass


@pytest.fixture(scope="module")
def retrained():
    return train(CONFIG, log=quiet)


def test_dense_phase_is_the_dense_baseline_and_retraining_keeps_the_pruned_masks(digits, retrained):
    dense = Trainer(dataclasses.replace(CONFIG, masked=False, prune_scope=None, prune_sparsity=None), digits)
    for _ in range(CONFIG.epochs):
        dense.run_epoch()
    # Masks that are all on and frozen change nothing: the dense phase is the dense run, bit for bit.
    for rec, want in zip(retrained.history[:CONFIG.epochs], dense.history):
        assert {k: v for k, v in rec.items() if k not in ("phase", "layers")} == \
            {k: v for k, v in want.items() if k not in ("phase", "layers")}
    # The final masks are exactly the magnitude masks of the weights after the dense phase.
    expected = models.lenet_300_100(in_features=64)
    expected.load_state_dict(dense.model.state_dict(), strict=False)
    magnitude_prune(expected, CONFIG.prune_sparsity)
    for (name, got), (_, want) in zip(masked_layers(retrained.model), masked_layers(expected)):
        assert np.array_equal(got.mask(), want.mask()), name
        # Retraining moved the kept weights away from the dense phase's values.
        assert not np.array_equal(got.weight.data[got.mask()], want.weight.data[want.mask()]), name


def test_retraining_epochs_have_frozen_masks_and_the_requested_counts(retrained):
    dense, finetune = retrained.history[:CONFIG.epochs], retrained.history[CONFIG.epochs:]
    assert [rec["phase"] for rec in retrained.history] == ["dense"] * CONFIG.epochs + ["finetune"] * 2
    assert all(rec["sparsity"] == 0 and rec["lam"] is None for rec in dense)
    for rec in finetune:
        for name, layer in rec["layers"].items():
            assert layer["flips"] == layer["pruned"] == layer["revived"] == 0, name
    assert {r["layer"]: r["kept"] for r in retrained.layers} == {"fc1": 1920, "fc2": 6000, "fc3": 500}
    assert all(layer.frozen for _, layer in masked_layers(retrained.model))
    assert finetune[-1]["test_error"] < 0.9  # it learned something after pruning


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_a_resumed_pruning_run_prunes_once_and_equals_the_uninterrupted_one(tmp_path, retrained, stop):
    lines = []
    train(CONFIG, tmp_path, log=quiet, stop_after=stop)
    resumed = train(CONFIG, tmp_path, resume=True, log=lines.append)
    assert sum("magnitude pruning" in line for line in lines) == (1 if stop <= CONFIG.epochs else 0)
    assert {k: v.tobytes() for k, v in resumed.model.state_dict().items()} == \
        {k: v.tobytes() for k, v in retrained.model.state_dict().items()}


@pytest.mark.parametrize("change, message", [
    (dict(finetune_epochs=0), "finetune_epochs >= 1"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(prune_scope="unit"), "unknown pruning scope 'unit'"),
    (dict(prune_scope="global"), "a global threshold takes one overall sparsity"),
    (dict(prune_sparsity=1.0), r"sparsity must be a fraction in \[0, 1\), got 1.0"),
    (dict(prune_sparsity={"fc1": 0.5}), "must name exactly the masked layers"),
    (dict(prune_scope=None), "prune_sparsity is given without prune_scope"),
    (dict(masked=False), "needs a masked run"),
    (dict(target_sparsity=90.0), "needs a masked run without a target sparsity"),
])
def test_bad_pruning_configs_fail_before_training(monkeypatch, change, message):
    monkeypatch.setattr(Trainer, "run_epoch", lambda self, progress=None: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match=message):
        train(dataclasses.replace(CONFIG, **change), log=quiet)
