"""Training with SCL: learning, fine-tuning, telemetry, files written, bit-exact resume, bad input.

Runs use the bundled digits (1438 train / 359 test 8x8 images). The default run
(LeNet-300-100, 30 mask + 10 fine-tune epochs, λ = 0.03) and the target-sparsity runs
are made once per module; everything else uses small subsets and a few epochs.
"""

import json
import math
import os
import time

import numpy as np
import pytest

from sclref import storage
from sclref import train as train_module
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.scl import masked_layers
from sclref.train import CHECKPOINT, METRICS, MODEL, TrainConfig, Trainer, build_model, evaluate, load_model, train

# A few epochs on a subset: both phases, about 0.1 s. (λ per step: these subsets were tuned that way.)
SMALL = dict(train_limit=300, test_limit=100, epochs=3, finetune_epochs=2, lam=0.03, lam_per="step")
# Enough mask learning on a subset to prune a visible share (about 16 %) in 4 epochs.
PRUNING = dict(train_limit=400, test_limit=100, epochs=4, finetune_epochs=2, lam=0.1, lam_per="step")
LAYER_SIZES = {"fc1": 64 * 300, "fc2": 300 * 100, "fc3": 100 * 10}

# Measured on digits, seeds 0-5, LeNet-300-100, 30 + 10 epochs, λ = 0.03: masked test error
# 3.06-4.18 %, dense 2.79-3.62 %, masked minus dense 0.00-1.39 points (seed 0: 1.39).
MAX_ERROR_GAP = 0.03
# Measured with the target controller, seeds 0-3, 30 mask epochs: 80 % -> 79.88-80.17 %,
# 95 % -> 95.00-95.11 %.
TARGET_TOLERANCE = 0.005


def quiet(line):
    pass


def run(out_dir=None, **settings):
    return train(TrainConfig(**settings), out_dir, log=quiet)


def param_bytes(model) -> dict:
    return {name: value.tobytes() for name, value in model.state_dict().items()}


def comparable(history) -> list:
    """History records without their wall-clock time."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def files(directory) -> list:
    """The files in `directory` but the run directory's lock."""
    return sorted(p.name for p in directory.iterdir() if p.name != ".sclref.lock") if directory.exists() else []


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    return {"masked": run(out / "masked"), "dense": run(out / "dense", masked=False)}


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory):
    """A small run with its files (read-only for the tests that share it)."""
    return run(tmp_path_factory.mktemp("pruning"), **PRUNING)


@pytest.fixture(scope="module")
def target_runs():
    return {target: run(target_sparsity=target, finetune_epochs=2) for target in (80.0, 95.0)}


# -- learning -----------------------------------------------------------------------------

def test_loss_falls_and_sparsity_rises_during_mask_learning(default_runs):
    history = default_runs["masked"].history
    assert [r["phase"] for r in history] == ["mask"] * 30 + ["finetune"] * 10
    mask = history[:30]
    assert mask[-1]["loss"] < 0.1 * mask[0]["loss"]
    assert history[-1]["loss"] < mask[-1]["loss"]  # fine-tuning goes on lowering it
    sparsities = [r["sparsity"] for r in mask]
    assert 0 < sparsities[0] < sparsities[9] < sparsities[19] < sparsities[29]
    assert sparsities[29] > 0.85  # measured 92.4 %
    assert all(r["lam"] == 0.03 for r in history)  # fixed λ without a target
    for name in LAYER_SIZES:
        assert history[-1]["layers"][name]["sparsity"] > 0.5, name


def test_masked_error_is_close_to_the_dense_baseline(default_runs):
    masked, dense = default_runs["masked"].history[-1], default_runs["dense"].history[-1]
    assert len(default_runs["dense"].history) == 40
    assert masked["test_error"] < 0.08 and dense["test_error"] < 0.06
    assert masked["test_error"] - dense["test_error"] <= MAX_ERROR_GAP, (masked["test_error"], dense["test_error"])


def test_dense_run_has_no_masks(default_runs):
    result = default_runs["dense"]
    assert masked_layers(result.model) == [] and result.layers == []
    assert not any("score" in name for name in result.model.state_dict())
    assert all(r["sparsity"] == 0.0 and r["layers"] == {} and r["penalty"] == 0.0 for r in result.history)
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]


def test_finetune_freezes_every_mask_and_trains_the_weights():
    config = TrainConfig(**PRUNING)
    trainer = Trainer(config, train_module.load_data(config))
    for _ in range(config.epochs):
        trainer.run_epoch()
    layers = masked_layers(trainer.model)
    masks = [layer.mask().copy() for _, layer in layers]
    scores = [layer.score.data.tobytes() for _, layer in layers]
    sparsity = trainer.history[-1]["sparsity"]
    assert sparsity > 0.05  # there is something to keep pruned
    for _ in range(config.finetune_epochs):
        weights = [layer.weight.data.copy() for _, layer in layers]
        record = trainer.run_epoch()
        assert record["phase"] == "finetune" and record["sparsity"] == sparsity
        for (name, layer), mask, score, before in zip(layers, masks, scores, weights):
            assert np.array_equal(layer.mask(), mask), name
            assert layer.score.data.tobytes() == score, name  # s itself is untouched, not just its sign
            kept = layer.weight.data[mask]
            assert not np.array_equal(kept, before[mask]), name  # the kept weights keep learning
            assert record["layers"][name] == {"sparsity": layer.sparsity(), "flips": 0, "pruned": 0, "revived": 0}


def test_finetune_phase_of_the_default_run_keeps_sparsity_constant(default_runs):
    history = default_runs["masked"].history
    at_switch = history[29]
    for record in history[30:]:
        assert record["sparsity"] == at_switch["sparsity"]
        for name in LAYER_SIZES:
            assert record["layers"][name]["sparsity"] == at_switch["layers"][name]["sparsity"]


def test_no_finetune_epochs(tmp_path):
    result = run(tmp_path, train_limit=200, test_limit=50, epochs=2, finetune_epochs=0)
    assert [r["phase"] for r in result.history] == ["mask", "mask"] and (tmp_path / MODEL).is_file()


def test_float64_runs_in_float64():
    result = run(dtype="float64", **SMALL)
    assert {v.dtype for v in result.model.state_dict().values()} == {np.dtype(np.float64)}
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# -- telemetry -----------------------------------------------------------------------------

def test_flip_counts_are_consistent_with_the_masks(default_runs):
    """pruned, revived <= flips; flips - pruned - revived is even; kept changes by revived - pruned."""
    history = default_runs["masked"].history
    kept = dict(LAYER_SIZES)  # score_init = 1: every connection starts kept
    for record in history:
        for name, n in LAYER_SIZES.items():
            row = record["layers"][name]
            flips, pruned, revived = row["flips"], row["pruned"], row["revived"]
            assert 0 <= pruned <= flips and 0 <= revived <= flips, (record["epoch"], name)
            # A connection that ends the epoch changed flipped an odd number of times, one
            # that ends unchanged an even number.
            assert (flips - pruned - revived) % 2 == 0 and flips >= pruned + revived, (record["epoch"], name)
            now = round((1 - row["sparsity"]) * n)
            assert now - kept[name] == revived - pruned, (record["epoch"], name)
            kept[name] = now
            if record["phase"] == "finetune":
                assert flips == pruned == revived == 0
    totals = {k: sum(r["layers"][name][k] for r in history for name in LAYER_SIZES) for k in ("pruned", "revived")}
    # The identity estimator obeys the convergence principle: pruned connections come back.
    assert totals["revived"] > 100 and totals["pruned"] > totals["revived"]
    assert any(row["flips"] > row["pruned"] + row["revived"] for r in history for row in r["layers"].values())


def test_pruned_and_revived_match_mask_snapshots():
    config = TrainConfig(**PRUNING)
    trainer = Trainer(config, train_module.load_data(config))
    layers = masked_layers(trainer.model)
    for _ in range(config.epochs):
        before = [layer.mask().copy() for _, layer in layers]
        record = trainer.run_epoch()
        for (name, layer), start in zip(layers, before):
            end = layer.mask()
            row = record["layers"][name]
            assert row["pruned"] == np.count_nonzero(start & ~end) and row["revived"] == np.count_nonzero(~start & end)
            assert row["sparsity"] == layer.sparsity()
    assert sum(row["pruned"] for r in trainer.history for row in r["layers"].values()) > 0


def test_record_fields(default_runs):
    record = default_runs["masked"].history[0]
    assert set(record) == {"epoch", "phase", "loss", "penalty", "lam", "train_error", "test_error", "sparsity",
                           "layers"}  # no wall time: it would make identical runs' files differ
    assert len(default_runs["masked"].epoch_seconds) == 40
    assert list(record["layers"]) == ["fc1", "fc2", "fc3"]
    kept = sum((1 - row["sparsity"]) * LAYER_SIZES[name] for name, row in record["layers"].items())
    assert record["penalty"] == pytest.approx(0.03 * kept)
    assert record["sparsity"] == pytest.approx(1 - kept / sum(LAYER_SIZES.values()))


# -- target sparsity ---------------------------------------------------------------------

@pytest.mark.parametrize("target", [80.0, 95.0])
def test_target_sparsity_lands_on_the_target(target_runs, target):
    history = target_runs[target].history
    final = history[-1]["sparsity"]
    assert abs(final - target / 100) <= TARGET_TOLERANCE, final
    assert history[29]["sparsity"] == final  # reached in mask learning, kept in fine-tuning
    assert len({r["lam"] for r in history[:30]}) > 10  # λ was steered


def test_target_mode_on_a_short_run_does_not_collapse():
    # With 72 mask steps the controller cannot settle exactly (docs/scl.md), but its
    # bounded rise of λ must never prune the whole network, which could not recover.
    history = run(target_sparsity=50.0, epochs=6, finetune_epochs=0, test_limit=50).history
    final = history[-1]
    assert 0.4 <= final["sparsity"] <= 0.7, [round(r["sparsity"], 4) for r in history]
    assert final["test_error"] < 0.2


# -- reproducibility and resume -------------------------------------------------------------

def test_same_seed_is_bit_identical_and_another_seed_differs():
    a, b, c = run(**SMALL), run(**SMALL), run(seed=1, **SMALL)
    assert param_bytes(a.model) == param_bytes(b.model)
    assert comparable(a.history) == comparable(b.history)
    pa, pc = param_bytes(a.model), param_bytes(c.model)
    assert pa.keys() == pc.keys() and all(pa[k] != pc[k] for k in pa)


def _assert_resumed_equals(uninterrupted, resumed):
    assert param_bytes(resumed.model) == param_bytes(uninterrupted.model)
    assert comparable(resumed.history) == comparable(uninterrupted.history)


@pytest.mark.parametrize("stop", [1, 2, 3, 4], ids=["mask-1", "mask-2", "at-switch", "finetune"])
def test_resume_is_bit_identical(tmp_path, pruning_run, stop):
    whole = pruning_run
    first = train(TrainConfig(**PRUNING), tmp_path / "cut", log=quiet, stop_after=stop)
    assert len(first.history) == stop and first.layers == []
    assert not (tmp_path / "cut" / MODEL).exists()
    lines = []
    resumed = train(TrainConfig(**PRUNING), tmp_path / "cut", resume=True, log=lines.append)
    assert lines[0] == f"resumed from {tmp_path / 'cut' / CHECKPOINT} after epoch {stop}"
    assert len(lines) == 1 + PRUNING["epochs"] + PRUNING["finetune_epochs"] - stop
    _assert_resumed_equals(whole, resumed)
    assert resumed.layers == whole.layers
    a, b = storage.load_state(whole.out_dir / MODEL)["state"], storage.load_state(tmp_path / "cut" / MODEL)["state"]
    assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}


def test_resume_after_several_interruptions(tmp_path):
    whole = run(**SMALL)
    for stop in (1, 3, 4):
        train(TrainConfig(**SMALL), tmp_path, resume=stop > 1, log=quiet, stop_after=stop)
    _assert_resumed_equals(whole, train(TrainConfig(**SMALL), tmp_path, resume=True, log=quiet))


def test_resume_with_the_lambda_controller_is_bit_identical(tmp_path, target_runs):
    """Stopped while λ is being steered (epoch 12), again in fine-tuning (epoch 31), then finished."""
    whole = target_runs[80.0]
    config = TrainConfig(target_sparsity=80.0, finetune_epochs=2)
    for stop in (12, 31):
        train(config, tmp_path, resume=stop > 12, log=quiet, stop_after=stop)
        saved = storage.load_state(tmp_path / CHECKPOINT)
        assert saved["controller"]["lam"] == saved["lam"] == whole.history[stop - 1]["lam"]
    assert whole.history[11]["lam"] != whole.history[12]["lam"]  # λ still moving at the first stop
    _assert_resumed_equals(whole, train(config, tmp_path, resume=True, log=quiet))


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    whole = run(tmp_path, **SMALL)
    before = storage.load_state(tmp_path / MODEL)["state"]
    again = train(TrainConfig(**SMALL), tmp_path, resume=True, log=quiet)
    _assert_resumed_equals(whole, again)
    after = storage.load_state(tmp_path / MODEL)["state"]
    assert {k: v.tobytes() for k, v in before.items()} == {k: v.tobytes() for k, v in after.items()}


@pytest.mark.parametrize("change, named", [
    (dict(lam=0.05), "lam"), (dict(seed=3), "seed"), (dict(epochs=5), "epochs"),
    (dict(target_sparsity=90.0), "target_sparsity"), (dict(dtype="float64"), "dtype"),
    (dict(lr=0.01, ste="leaky_relu"), "lr', 'ste"),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, named):
    train(TrainConfig(**SMALL), tmp_path, log=quiet, stop_after=1)
    snapshot = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    with pytest.raises(ValueError, match=f"other settings: \\['{named}'\\]"):
        train(TrainConfig(**{**SMALL, **change}), tmp_path, resume=True, log=quiet)
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == snapshot


def test_resume_without_a_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**SMALL), tmp_path / "never", resume=True, log=quiet)
    assert not (tmp_path / "never").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CHECKPOINT):
        train(TrainConfig(**SMALL), tmp_path / "empty", resume=True, log=quiet)
    assert files(tmp_path / "empty") == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**SMALL), None, resume=True, log=quiet)


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(b"not a checkpoint at all" * 100)


def _model_file(path):
    path.write_bytes((path.parent / "model-copy.npz").read_bytes())


def _incomplete(path):
    state = storage.load_state(path)
    del state["opt_w"], state["order_rng"]
    storage.save_state(path, state)


@pytest.mark.parametrize("damage, message", [
    (_cut, "corrupt or truncated"), (_garbage, "corrupt or truncated"),
    (_model_file, "not an sclref checkpoint"), (_incomplete, r"incomplete: no \['opt_w', 'order_rng'\]"),
])
def test_a_damaged_checkpoint_is_a_clear_error_and_stays_as_it_is(tmp_path, damage, message):
    run(tmp_path / "other", **SMALL)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model-copy.npz").write_bytes((tmp_path / "other" / MODEL).read_bytes())
    train(TrainConfig(**SMALL), tmp_path / "run", log=quiet, stop_after=2)
    damage(tmp_path / "run" / CHECKPOINT)
    snapshot = {name: (tmp_path / "run" / name).read_bytes() for name in files(tmp_path / "run")}
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**SMALL), tmp_path / "run", resume=True, log=quiet)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files(tmp_path / "run")} == snapshot


# -- files written --------------------------------------------------------------------------

def test_metrics_and_checkpoint_are_written_after_every_epoch(tmp_path, monkeypatch):
    seen = []
    real_json, real_state = storage.atomic_write_json, storage.save_state

    def write_json(path, payload):
        real_json(path, payload)
        on_disk = json.loads(open(path).read())
        seen.append(("metrics", on_disk["epochs_done"], on_disk["finished"], len(on_disk["history"])))

    def save_state(path, tree):
        real_state(path, tree)
        seen.append((os.path.basename(path), storage.load_state(path).get("epoch")))

    monkeypatch.setattr(storage, "atomic_write_json", write_json)
    monkeypatch.setattr(storage, "save_state", save_state)
    result = run(tmp_path, **SMALL)
    total = SMALL["epochs"] + SMALL["finetune_epochs"]
    expected = []
    for epoch in range(1, total + 1):
        expected += [(CHECKPOINT, epoch), ("metrics", epoch, False, epoch)]
    expected += [(MODEL, None), ("metrics", total, True, total)]
    assert seen == expected
    assert files(tmp_path) == [CHECKPOINT, METRICS, MODEL]
    assert len(result.history) == total


def test_final_metrics_hold_the_per_layer_table(pruning_run):
    result = pruning_run
    metrics = json.loads((result.out_dir / METRICS).read_text())
    assert metrics["finished"] is True and metrics["epochs_done"] == 6 and metrics["dataset"] == "digits"
    assert metrics["config"] == TrainConfig(**PRUNING).to_dict()
    assert comparable(metrics["history"]) == comparable(result.history)
    final = metrics["final"]
    assert final["test_error"] == result.history[-1]["test_error"]
    assert final["sparsity"] == result.history[-1]["sparsity"]
    assert final["layers"] == result.layers
    assert [row["layer"] for row in final["layers"]] == ["fc1", "fc2", "fc3"]
    for row in final["layers"]:
        assert row["weights"] == LAYER_SIZES[row["layer"]]
        assert row["kept"] == round((1 - row["sparsity"]) * row["weights"])
        assert row["dense_flops"] == 2 * row["weights"] and row["effective_flops"] == 2 * row["kept"]
    assert sum(r["kept"] for r in final["layers"]) == round((1 - final["sparsity"]) * sum(LAYER_SIZES.values()))
    assert isinstance(metrics["sclref"], str) and metrics["sclref"]
    assert metrics["provenance"]["numpy"] == np.__version__ and metrics["provenance"]["blas"]
    assert metrics["timing"]["machine"]["cpus"] >= 1  # where it ran, apart from what must be the same bytes


def test_a_stopped_run_leaves_unfinished_metrics_and_no_model(tmp_path):
    result = train(TrainConfig(**SMALL), tmp_path, log=quiet, stop_after=2)
    metrics = json.loads((tmp_path / METRICS).read_text())
    assert metrics["finished"] is False and metrics["final"] is None and metrics["epochs_done"] == 2
    assert files(tmp_path) == [CHECKPOINT, METRICS] and result.layers == []


def test_model_file_rebuilds_the_trained_network(pruning_run):
    result = pruning_run
    saved = storage.load_state(result.out_dir / MODEL)
    assert saved["format"] == "sclref-model" and saved["version"] == 1
    config = TrainConfig.from_dict(saved["config"])
    assert config == TrainConfig(**PRUNING)
    assert saved["in_shape"] == [1, 8, 8] and saved["num_classes"] == 10
    assert {k: v.tobytes() for k, v in saved["state"].items()} == param_bytes(result.model)
    model = build_model(config, tuple(saved["in_shape"]), saved["num_classes"])
    model.load_state_dict(saved["state"])
    data = train_module.load_data(config)
    assert evaluate(model, data.x_test, data.y_test) == result.history[-1]["test_error"]
    assert [layer.num_kept() for _, layer in masked_layers(model)] == [r["kept"] for r in result.layers]


def test_checkpoint_restores_a_trainer(tmp_path):
    train(TrainConfig(**SMALL), tmp_path, log=quiet, stop_after=2)
    state = storage.load_state(tmp_path / CHECKPOINT)
    assert state["format"] == "sclref-checkpoint" and state["epoch"] == 2 and len(state["history"]) == 2
    config = TrainConfig.from_dict(state["config"])
    trainer = Trainer(config, train_module.load_data(config))
    trainer.load_state_dict(state)
    assert trainer.epoch == 2 and param_bytes(trainer.model) == {k: v.tobytes() for k, v in state["model"].items()}


def test_no_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(**SMALL)
    assert files(tmp_path) == [] and result.out_dir is None and len(result.history) == 5


def test_one_log_line_per_epoch():
    lines = []
    train(TrainConfig(**SMALL), log=lines.append)
    assert len(lines) == 5
    assert lines[0].startswith("epoch   1/5 mask ") and lines[3].startswith("epoch   4/5 finetune ")
    assert all("test err" in line and "sparsity" in line for line in lines)


# -- bad input ------------------------------------------------------------------------------

BAD_SETTINGS = [
    (dict(lam=-1.0), "λ must be a finite number >= 0, got -1.0"),
    (dict(lam=math.nan), "λ must be a finite number >= 0, got nan"),
    (dict(lam=math.inf), "λ must be a finite number"),
    (dict(target_sparsity=0.0), r"target sparsity must be in \(0, 100\) percent, got 0.0"),
    (dict(target_sparsity=100.0), r"target sparsity must be in \(0, 100\) percent, got 100.0"),
    (dict(target_sparsity=150.0), r"target sparsity must be in \(0, 100\) percent, got 150.0"),
    (dict(target_sparsity=math.nan), "target sparsity must be in"),
    (dict(ste="nope"), "unknown STE 'nope'; registered: identity"),
    (dict(model="resnet"), "unknown model 'resnet'"),
    (dict(epochs=0), "epochs must be >= 1, got 0"),
    (dict(finetune_epochs=-1), "finetune_epochs must be >= 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
    (dict(lr=-0.1), "lr must be a finite number > 0"),
    (dict(lr=math.nan), "lr must be a finite number > 0"),
    (dict(mask_lr=0.0), "mask_lr must be a finite number > 0"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(normalization="l3"), "unknown normalization 'l3'"),
    (dict(weighting="bytes"), "unknown regularizer weighting 'bytes'"),
    (dict(normalize="both"), "normalize must be 'task' or 'total'"),
    (dict(dtype="float16"), "dtype must be float32 or float64, got 'float16'"),
    (dict(dtype="int32"), "dtype must be float32 or float64"),
    (dict(lam_gain=0.0), "lam_gain must be"),
    (dict(score_init=math.inf), "score_init must be finite"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(train_limit=0), "train_limit must be >= 1"),
    (dict(test_limit=0), "test_limit must be >= 1"),
    (dict(loss="hinge"), "loss must be one of cross_entropy, mse, got 'hinge'"),
]
# Found only once the data is at hand, still before anything is written.
BAD_FOR_THE_DATA = [
    (dict(train_limit=10**6), "n_train must be an integer from 1 to 1438"),
    (dict(data="/nonexistent"), "unknown dataset '/nonexistent'"),
    (dict(model="lenet5"), "too small"),  # 8x8 digits cannot feed two 5x5 convolutions
    (dict(loss="mse"), "loss mse needs real-valued targets"),  # digits has class labels
]


def _ids(cases):
    return [f"{key}={value}" for bad, _ in cases for key, value in list(bad.items())[:1]]


@pytest.mark.parametrize("bad, message", BAD_SETTINGS + BAD_FOR_THE_DATA, ids=_ids(BAD_SETTINGS + BAD_FOR_THE_DATA))
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**SMALL, **bad}), tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=message):  # an existing directory stays empty
        train(TrainConfig(**{**SMALL, **bad}), tmp_path, log=quiet)
    assert files(tmp_path) == []


@pytest.mark.parametrize("bad, message", BAD_SETTINGS, ids=_ids(BAD_SETTINGS))
def test_bad_settings_are_refused_before_a_resume_reads_or_writes(tmp_path, bad, message):
    train(TrainConfig(**SMALL), tmp_path, log=quiet, stop_after=1)
    snapshot = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**SMALL, **bad}), tmp_path, resume=True, log=quiet)
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == snapshot


def test_unknown_settings_in_from_dict():
    with pytest.raises(ValueError, match=r"unknown training settings: \['lambda'\]"):
        TrainConfig.from_dict({"lambda": 0.1})
    assert TrainConfig.from_dict(TrainConfig(lam=0.2).to_dict()) == TrainConfig(lam=0.2)


@pytest.mark.parametrize("field, message", [
    ("normalization", "unknown normalization ''"), ("weighting", "unknown regularizer weighting ''"),
    ("normalize", "normalize must be 'task' or 'total'"),
])
def test_a_recorded_objective_setting_out_of_its_choices_is_refused_input(field, message):
    with pytest.raises(InputError, match=message):  # not a bare ValueError: readers catch InputError
        TrainConfig.from_dict({**TrainConfig().to_dict(), field: ""})


def test_load_model_gives_back_the_trained_network(pruning_run):
    model, saved = load_model(pruning_run.out_dir)
    assert not model.training and saved["config"] == pruning_run.config.to_dict()
    assert param_bytes(model) == param_bytes(pruning_run.model)
    x = np.random.default_rng(0).standard_normal((5, *saved["in_shape"])).astype(np.float32)
    pruning_run.model.eval()
    with no_grad():
        assert np.array_equal(model(Tensor(x)).data, pruning_run.model(Tensor(x)).data)


def test_load_model_names_what_is_missing_or_wrong(tmp_path, pruning_run):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_model(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no final model"):
        load_model(tmp_path)
    (tmp_path / MODEL).write_bytes((pruning_run.out_dir / CHECKPOINT).read_bytes())
    with pytest.raises(ValueError, match="not an sclref model file"):
        load_model(tmp_path)


# -- a run directory belongs to one run -------------------------------------------------------

def test_a_fresh_run_refuses_a_finished_runs_directory_and_replace_starts_over(tmp_path):
    run(tmp_path, **SMALL)
    before = (tmp_path / MODEL).read_bytes()
    with pytest.raises(ValueError, match=r"holds another run \(checkpoint.npz, metrics.json, model.npz\)"):
        run(tmp_path, **{**SMALL, "seed": 1})
    assert (tmp_path / MODEL).read_bytes() == before
    # Replaced and stopped after 2 epochs, as a kill would: the old model must not survive beside it.
    train(TrainConfig(**{**SMALL, "seed": 1}), tmp_path, log=quiet, stop_after=2, replace=True)
    assert not (tmp_path / MODEL).exists()
    assert storage.load_state(tmp_path / CHECKPOINT)["config"]["seed"] == 1


def test_a_second_writer_of_a_run_directory_fails_at_once(tmp_path):
    from sclref import rundir

    with rundir.claim(tmp_path / "run"):
        with pytest.raises(ValueError, match="another sclref process is writing"):
            run(tmp_path / "run", **SMALL)
    assert files(tmp_path / "run") == []


def test_an_unwritable_out_is_reported_before_any_data_is_read(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(train_module, "load_data", lambda config: pytest.fail("data read before --out was checked"))
    with pytest.raises(ValueError, match="is a file"):
        run(tmp_path / "file" / "run", **SMALL)


# -- values that pass one check and break the run later ---------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(ste_alpha=math.nan), r"ste_alpha .* must be in \(0, 1\), got nan"),
    (dict(ste_alpha=1.5, ste="leaky_relu"), r"must be in \(0, 1\)"),
    (dict(score_init=1e300), "score_init = 1e\\+300 overflows float32"),
    (dict(lr=1e39), "lr = 1e\\+39 overflows float32"),
    (dict(masked=False, target_sparsity=90.0), "target sparsity needs a masked run"),
    (dict(epochs=2.5), "epochs must be of type int, got 2.5"),
    (dict(lam="0.1"), "lam must be of type float"),
    (dict(masked=1), "masked must be of type bool"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (dict(lam=10**400), "lam = 1000.* is too large for a float setting"),
], ids=lambda v: str(v)[:30])
def test_values_that_would_break_the_run_later_are_refused_first(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "run", **{**SMALL, **bad})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("limit, steps", [(300, 3), (1438, 12)])
def test_lam_per_epoch_is_spread_over_the_epochs_steps(limit, steps):
    from sclref import data

    dataset = data.subset(data.load("digits", dtype=np.float32), limit, 100)
    per_epoch = Trainer(TrainConfig(lam=0.36, train_limit=limit), dataset)
    per_step = Trainer(TrainConfig(lam=0.36, lam_per="step", train_limit=limit), dataset)
    assert per_epoch.steps_per_epoch == steps
    assert per_epoch.objective.lam == pytest.approx(0.36 / steps) and per_step.objective.lam == 0.36
    with pytest.raises(ValueError, match="lam_per must be 'epoch' or 'step'"):
        TrainConfig(lam_per="batch").validate()


def test_score_init_that_fits_float64_but_not_float32_is_fine_in_float64():
    TrainConfig(score_init=1e300, dtype="float64").validate()


def test_an_empty_test_set_is_an_error_not_zero_error(tmp_path):
    from sclref import data

    digits = data.load("digits")
    empty = data.Dataset(digits.x_train[:50], digits.y_train[:50], digits.x_test[:0], digits.y_test[:0], "empty")
    data.save_npz(empty, tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="test set is empty"):
        run(tmp_path / "run", data=str(tmp_path / "empty.npz"), epochs=1, finetune_epochs=0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_nan(tmp_path):
    with pytest.raises(train_module.DivergedError, match=r"became NaN or infinite in epoch 1: training diverged"):
        run(tmp_path, **{**SMALL, "lr": 1e30})
    assert files(tmp_path) == []


def _tamper(path, **changes):
    state = storage.load_state(path)
    state.update(changes)
    storage.save_state(path, state)


@pytest.mark.parametrize("changes, message", [
    (dict(history=5), "history must be a list of 2 epoch records"),
    (dict(epoch=-5), r"epoch must be an integer in \[0, 5\], got -5"),
    (dict(epoch=99), r"epoch must be an integer in \[0, 5\], got 99"),
    (dict(lam=math.nan), "λ must be a finite number >= 0, got nan"),
    (dict(lam="x"), "λ must be a finite number"),
    (dict(order_rng={"bit_generator": "PCG64", "state": 5}), "data-order generator does not fit"),
    (dict(model={"fc1.weight": np.zeros(3)}), "model does not fit"),
    (dict(opt_w=7), "weight optimizer does not fit"),
    (dict(config=[1]), "settings are not a mapping"),
    (dict(provenance={"blas": [], "numpy": "0.0", "numba": "0.0"}), "would not give the result of the uninterrupted"),
    (dict(version=1), "checkpoint version 1"),
], ids=lambda v: str(v)[:25])
def test_a_tampered_checkpoint_is_refused_naming_the_field(tmp_path, changes, message):
    train(TrainConfig(**SMALL), tmp_path, log=quiet, stop_after=2)
    _tamper(tmp_path / CHECKPOINT, **changes)
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**SMALL), tmp_path, resume=True, log=quiet)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    train(TrainConfig(**SMALL), tmp_path, log=quiet, stop_after=1)
    state = storage.load_state(tmp_path / CHECKPOINT)
    state["model"]["fc1.weight"][0, 0] = np.nan
    storage.save_state(tmp_path / CHECKPOINT, state)
    with pytest.raises(ValueError, match="fc1.weight holds NaN"):
        train(TrainConfig(**SMALL), tmp_path, resume=True, log=quiet)


# -- data is identified by content ------------------------------------------------------------

def _npz_digits(path, flip_one_pixel=False):
    from sclref import data

    d = data.load_digits()
    x_train = d.x_train.copy()
    if flip_one_pixel:
        x_train[0, 0, 0, 0] += 1.0
    data.save_npz(data.Dataset(x_train, d.y_train, d.x_test, d.y_test, "digits"), path)


def test_resume_accepts_the_same_data_by_another_path_and_refuses_other_data_at_the_same_path(tmp_path):
    _npz_digits(tmp_path / "a.npz")
    (tmp_path / "b.npz").write_bytes((tmp_path / "a.npz").read_bytes())
    base = dict(SMALL, data=str(tmp_path / "a.npz"))
    uninterrupted = run(tmp_path / "full", **base)
    train(TrainConfig(**base), tmp_path / "run", log=quiet, stop_after=2)
    resumed = train(TrainConfig(**{**base, "data": str(tmp_path / "b.npz")}), tmp_path / "run", resume=True, log=quiet)
    assert param_bytes(resumed.model) == param_bytes(uninterrupted.model)

    train(TrainConfig(**base), tmp_path / "other", log=quiet, stop_after=2)
    _npz_digits(tmp_path / "a.npz", flip_one_pixel=True)
    with pytest.raises(ValueError, match="trained on other data"):
        train(TrainConfig(**base), tmp_path / "other", resume=True, log=quiet)


# -- the same seed gives the same bytes ---------------------------------------------------------

def test_two_identical_runs_write_the_same_bytes_but_for_timing(tmp_path):
    run(tmp_path / "a", **SMALL)
    time.sleep(2.1)  # zip member times have a 2-second resolution
    run(tmp_path / "b", **SMALL)
    for name in (CHECKPOINT, MODEL):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    metrics = [json.loads((tmp_path / d / METRICS).read_text()) for d in ("a", "b")]
    assert all(len(m.pop("timing")["epoch_seconds"]) == 5 for m in metrics)
    assert metrics[0] == metrics[1]
    assert "seconds" not in json.dumps(metrics[0]["history"])


def test_the_model_file_carries_the_input_scaling(pruning_run):
    _, record = load_model(pruning_run.out_dir)
    prep = record["preprocessing"]
    assert prep["pixel_max"] == 16.0 and prep["std"] > 0 and math.isfinite(prep["mean"])


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 10**9, r"num_classes must be an integer in \[1, "),
    ("in_shape", [1, 10**6, 10**6], "in_shape must be a list of three integers"),
    ("in_shape", "x", "in_shape must be"),
    ("config", {"model": 5}, "model must be of type str"),
])
def test_a_tampered_model_file_is_refused_before_allocation(tmp_path, pruning_run, field, value, message):
    (tmp_path / MODEL).write_bytes((pruning_run.out_dir / MODEL).read_bytes())
    _tamper(tmp_path / MODEL, **{field: value})
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


def test_fuzz_the_checkpoint_and_model_readers(tmp_path_factory, pruning_run):
    """Mutated checkpoints and model files load, or fail with sclref's InputError: nothing else."""
    from hypothesis import HealthCheck, given, settings

    from tests.mutations import file_mutations

    tmp = tmp_path_factory.mktemp("fuzz")
    seen = {"checkpoint": 0, "model": 0}
    config = TrainConfig(**PRUNING)
    dataset = train_module.load_data(config)
    valid = {name: (pruning_run.out_dir / name).read_bytes() for name in (CHECKPOINT, MODEL)}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(file_mutations(valid[CHECKPOINT]))
    def checkpoint(data):
        seen["checkpoint"] += 1
        (tmp / CHECKPOINT).write_bytes(data)
        try:
            Trainer(config, dataset).load_state_dict(storage.load_state(tmp / CHECKPOINT))
        except InputError as err:
            assert str(err)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(file_mutations(valid[MODEL]))
    def model(data):
        seen["model"] += 1
        (tmp / MODEL).write_bytes(data)
        try:
            load_model(tmp)
        except InputError as err:
            assert str(err)

    os.environ["SCLREF_MAX_ALLOC_BYTES"] = str(64 << 20)
    try:
        checkpoint()
        model()
    finally:
        del os.environ["SCLREF_MAX_ALLOC_BYTES"]
    assert seen["checkpoint"] >= 150 and seen["model"] >= 150


def test_a_resnet20_scl_run_learns_and_resumes_bit_for_bit(tmp_path):
    config = TrainConfig(model="resnet20", train_limit=256, test_limit=64, epochs=3, finetune_epochs=1, batch_size=64,
                         lr=0.05, mask_first=False, mask_last=False)
    whole = train(config, tmp_path / "whole", log=quiet)
    assert whole.history[-1]["loss"] < whole.history[0]["loss"]
    assert [name for name, _ in masked_layers(whole.model)][:1] == ["layer1.0.conv1"]  # first conv kept dense
    train(config, tmp_path / "cut", log=quiet, stop_after=2)
    resumed = train(config, tmp_path / "cut", resume=True, log=quiet)
    assert param_bytes(resumed.model) == param_bytes(whole.model)
    assert (tmp_path / "cut" / MODEL).read_bytes() == (tmp_path / "whole" / MODEL).read_bytes()


def test_augmented_runs_differ_from_plain_ones_and_resume_bit_for_bit(tmp_path):
    settings = {**SMALL, "epochs": 2, "finetune_epochs": 1, "augment": True}
    whole = run(**settings)
    assert param_bytes(whole.model) != param_bytes(run(**{**settings, "augment": False}).model)
    train(TrainConfig(**settings), tmp_path, log=quiet, stop_after=1)
    _assert_resumed_equals(whole, train(TrainConfig(**settings), tmp_path, resume=True, log=quiet))


def test_augmentation_pads_with_black_in_the_datas_own_scale(monkeypatch):
    dataset = train_module.load_data(TrainConfig(**SMALL))
    fills = []
    real = train_module.datasets.augment

    def augment(x, generator, pad, fill=0.0):
        fills.append((pad, fill))
        return real(x, generator, pad, fill)

    monkeypatch.setattr(train_module.datasets, "augment", augment)
    Trainer(TrainConfig(**{**SMALL, "augment": True}), dataset).run_epoch()
    prep = dataset.preprocessing
    assert set(fills) == {(1, -prep["mean"] / prep["std"])}  # 8x8 digits: pad 8 // 8 = 1
