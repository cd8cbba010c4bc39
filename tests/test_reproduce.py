"""The results driver in quick mode: every method and seed in one JSON, resumption, determinism, tables, errors."""

import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from sclref.cli import main
from sclref.experiments import reproduce as rp
from sclref.experiments.reproduce import METHODS, RESULTS, Settings, markdown, plot, reproduce, summarize
from sclref.train import Trainer

QUICK = Settings.quick(seeds=(0, 1))
VOLATILE = ("train_seconds", "seconds")


def quiet(line):
    pass


def stable(run):
    """A run record without its timings, which differ between identical runs."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(run)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, reproduce(QUICK, out, log=quiet)


def copy_of(out, tmp_path):
    """A copy of a reproduction's store, to resume without touching the original."""
    return Path(shutil.copytree(out, tmp_path / "copy"))


def runs_by_key(store):
    return {(r["model"], r["method"], r["seed"]): r for r in store["runs"]}


def test_the_json_holds_every_method_and_seed(quick_run):
    out, store = quick_run
    on_disk = json.loads((out / RESULTS).read_text())
    assert on_disk == json.loads(json.dumps(store))
    assert set(runs_by_key(on_disk)) == {("lenet300", m, s) for m in QUICK.methods for s in QUICK.seeds}
    assert on_disk["machine"]["numpy"] == np.__version__
    for run in on_disk["runs"]:
        total = QUICK.epochs + QUICK.finetune_epochs
        assert len(run["history"]) == len(run["flips"]) == total
        assert run["test_error"] == run["history"][-1]["test_error"]  # the final epoch, never the best
        assert run["config"]["seed"] == run["seed"]
        assert run["lam"] == (None if run["method"] == "dense" else QUICK.lam_value)
        assert run["effective_flops"] == sum(r["effective_flops"] for r in run["layers"])


def test_every_method_runs_its_own_settings(quick_run):
    runs = runs_by_key(quick_run[1])
    configs = {m: runs[("lenet300", m, 0)]["config"] for m in QUICK.methods}
    assert not configs["dense"]["masked"]
    assert {m: configs[m]["ste"] for m in ("scl_identity", "scl_leaky_relu", "scl_softplus")} == {
        "scl_identity": "identity", "scl_leaky_relu": "leaky_relu", "scl_softplus": "softplus"}
    assert configs["scl_identity_no_norm"]["normalization"] == "none"
    assert configs["scl_identity"]["normalization"] == "l2"
    assert len({c["lam"] for c in configs.values()}) == 1
    # Same budget: every method runs the same number of epochs.
    assert len({len(runs[("lenet300", m, 0)]["history"]) for m in QUICK.methods}) == 1


def test_the_global_scale_ablation_rescales_lam_and_the_mask_learning_rate():
    base = QUICK.config("lenet300", "scl_identity", 0)
    scaled = QUICK.config("lenet300", "scl_identity_global_scale", 0)
    c = QUICK.no_norm_scale
    assert scaled.normalization == "none" and base.normalization == "l2"
    assert scaled.lam == pytest.approx(base.lam * c) and scaled.mask_lr == pytest.approx(base.mask_lr / c)
    assert {k: v for k, v in scaled.to_dict().items() if k not in ("lam", "mask_lr", "normalization")} == {
        k: v for k, v in base.to_dict().items() if k not in ("lam", "mask_lr", "normalization")}


def test_dense_keeps_everything_and_frozen_epochs_flip_nothing(quick_run):
    for (_, method, _), run in runs_by_key(quick_run[1]).items():
        if method == "dense":
            assert run["sparsity"] == 0 and run["effective_flops"] == run["dense_flops"]
            assert run["flips"] == [0] * len(run["flips"])
            assert {rec["phase"] for rec in run["history"]} == {"train"}  # no fine-tuning of what has no masks
            continue
        finetune = [f for f, rec in zip(run["flips"], run["history"]) if rec["phase"] == "finetune"]
        assert finetune and all(f == 0 for f in finetune)


def test_magnitude_prunes_each_layer_to_scl_identity_of_the_same_seed(quick_run):
    runs = runs_by_key(quick_run[1])
    for seed in QUICK.seeds:
        scl = {r["layer"]: r["kept"] for r in runs[("lenet300", "scl_identity", seed)]["layers"]}
        mag = runs[("lenet300", "magnitude", seed)]
        assert {r["layer"]: r["kept"] for r in mag["layers"]} == scl
        assert mag["config"]["prune_scope"] == "layer" and set(mag["config"]["prune_sparsity"]) == set(scl)
    assert runs[("lenet300", "scl_identity", 0)]["sparsity"] > 0  # the quick run does prune something


def test_summary_is_mean_and_sample_std_over_seeds(quick_run):
    store = quick_run[1]
    runs = runs_by_key(store)
    rows = {r["method"]: r for r in summarize(store, QUICK)}
    assert set(rows) == set(QUICK.methods)
    errors = [runs[("lenet300", "scl_identity", s)]["test_error"] for s in QUICK.seeds]
    assert rows["scl_identity"]["test_error"]["mean"] == pytest.approx(statistics.fmean(errors))
    assert rows["scl_identity"]["test_error"]["std"] == pytest.approx(statistics.stdev(errors))
    assert len(rows["scl_identity"]["flips_per_epoch"]) == QUICK.epochs
    one_seed = summarize(store, dataclasses.replace(QUICK, seeds=(1,)))
    assert all(r["test_error"]["std"] is None and r["seeds"] == [1] for r in one_seed)


def test_tables_show_every_method_and_the_published_rows_labelled_as_other_data(quick_run):
    text = markdown(summarize(quick_run[1], QUICK), QUICK)
    for method in QUICK.methods:
        assert f"| {METHODS[method].label} |" in text
    assert "published, MNIST — other data" in text
    assert "| SNIP (Lee 2019) | 98.0 | 2.4 |" in text
    assert "λ = 0.03" in text


def test_plots_are_written(quick_run, tmp_path):
    store = quick_run[1]
    written = plot(summarize(store, QUICK), QUICK, tmp_path)
    assert sorted(p.name for p in written) == ["lenet300-digits-error_vs_sparsity.png",
                                               "lenet300-digits-layer_sparsity.png", "lenet300-digits-mask_flips.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_same_seed_gives_the_same_numbers(quick_run, tmp_path):
    again = reproduce(dataclasses.replace(QUICK, seeds=(1,)), tmp_path, log=quiet)
    first = runs_by_key(quick_run[1])
    for key, run in runs_by_key(again).items():
        assert stable(run) == stable(first[key])


@pytest.fixture
def counted(monkeypatch):
    """Count the epochs trained and the baselines run, through the real code."""
    from sclref import pruning

    calls = {"epochs": 0, "magnitude": 0}
    real_epoch, real_magnitude = Trainer.run_epoch, pruning.magnitude_prune

    def run_epoch(self, *args, **kwargs):
        calls["epochs"] += 1
        return real_epoch(self, *args, **kwargs)

    def magnitude_prune(*args, **kwargs):
        calls["magnitude"] += 1
        return real_magnitude(*args, **kwargs)

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    monkeypatch.setattr(pruning, "magnitude_prune", magnitude_prune)
    return calls


def test_resuming_skips_finished_runs_and_runs_only_new_ones(quick_run, tmp_path, counted):
    out = copy_of(quick_run[0], tmp_path)
    lines = []
    store = reproduce(QUICK, out, log=lines.append)
    assert counted == {"epochs": 0, "magnitude": 0}
    assert sum("skipped" in line for line in lines) == len(QUICK.methods) * len(QUICK.seeds)
    assert store == json.loads((quick_run[0] / RESULTS).read_text())
    store = reproduce(dataclasses.replace(QUICK, seeds=(0, 1, 2)), out, log=quiet)
    assert counted["magnitude"] == 1  # only seed 2 ran
    assert len(store["runs"]) == len(QUICK.methods) * 3
    old = runs_by_key(quick_run[1])
    assert all(runs_by_key(store)[key] == run for key, run in old.items())  # timings too: not run again


def test_other_settings_train_a_run_of_their_own(quick_run, tmp_path, counted):
    out = copy_of(quick_run[0], tmp_path)
    changed = dataclasses.replace(QUICK, seeds=(0,), methods=("dense",), finetune_epochs=2)
    store = reproduce(changed, out, log=quiet)
    assert counted["epochs"] == 4
    (dense0,) = store["runs"]
    assert len(dense0["history"]) == 4 and dense0["config"]["finetune_epochs"] == 2
    assert len(list((out / "runs").iterdir())) == len(QUICK.methods) * len(QUICK.seeds) + 1


def test_an_interrupted_reproduction_continues_where_it_stopped(tmp_path, monkeypatch, counted):
    from sclref import pruning

    settings = dataclasses.replace(QUICK, seeds=(0,), methods=("dense", "scl_identity", "magnitude"))
    uninterrupted = reproduce(settings, tmp_path / "whole", log=quiet)
    real = pruning.magnitude_prune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruning, "magnitude_prune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reproduce(settings, tmp_path / "out", log=quiet)
    # The finished runs and the magnitude run's dense epochs are in their run directories.
    assert len(list((tmp_path / "out" / "runs").glob("*/model.npz"))) == 2
    assert not (tmp_path / "out" / RESULTS).exists()
    monkeypatch.setattr(pruning, "magnitude_prune", real)
    counted["epochs"] = 0
    after = reproduce(settings, tmp_path / "out", log=quiet)
    assert counted["epochs"] == settings.finetune_epochs  # only the magnitude run's retraining was left
    assert [stable(r) for r in after["runs"]] == [stable(r) for r in uninterrupted["runs"]]


@pytest.mark.parametrize("change, message", [
    (dict(methods=("dense", "sgd")), "unknown methods 'sgd'"),
    (dict(methods=()), "choose at least one"),
    (dict(models=("resnet",)), "unknown models 'resnet'"),
    (dict(methods=("dense", "magnitude")), "add scl_identity"),
    (dict(seeds=()), "at least one seed"),
    (dict(seeds=(0, 0)), "each may be given once"),
    (dict(seeds=(-1,)), "integers >= 0"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(finetune_epochs=0), "finetune_epochs must be >= 1"),
    (dict(lam=-1.0), "λ must be"),
    (dict(no_norm_scale=0.0), "no_norm_scale must be"),
    (dict(data="/no/such/dir"), "no such directory"),
    (dict(models=("lenet5",)), "lenet5 cannot take the data 'digits'"),
])
def test_bad_settings_are_clear_errors_before_anything_runs(tmp_path, change, message, counted):
    with pytest.raises(ValueError, match=message):
        reproduce(dataclasses.replace(QUICK, **change), tmp_path, log=quiet)
    assert counted["epochs"] == 0 and not any(tmp_path.iterdir())


def test_cli_quick_run_prints_the_tables_and_writes_the_files(quick_run, tmp_path, capsys):
    out = copy_of(quick_run[0], tmp_path)  # resumed: nothing to train
    assert main(["reproduce", "--quick", "--seeds", "0", "1", "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "published, MNIST — other data" in printed and "already finished" in printed
    assert main(["reproduce", "--quick", "--seeds", "0", "1", "--out", str(out), "--json", "--no-plots"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {row["method"] for row in summary} == set(QUICK.methods)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "foo"], "unknown methods 'foo'"),
    (["--models", "lenet5"], "cannot take the data 'digits'"),
    (["--epochs", "0"], "epochs must be >= 1"),
])
def test_cli_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, message):
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_seeds_must_be_nonnegative_integers(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--quick", "--seeds", "x"])
    assert "must be an integer >= 0" in capsys.readouterr().err


SWEEP = dataclasses.replace(QUICK, seeds=(0,), methods=("dense", "scl_identity", "magnitude"))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    reproduce(SWEEP, out, log=quiet)
    return out, reproduce(SWEEP, out, log=quiet, sweep=[0.3, 0.003])


def test_sweep_runs_the_masked_methods_at_each_lambda(swept):
    out, store = swept
    assert json.loads((out / RESULTS).read_text()) == json.loads(json.dumps(store))
    by_lam = {}
    for run in store["runs"]:
        by_lam.setdefault(run["lam"], {})[run["method"]] = run
    assert sorted(by_lam, key=lambda lam: lam or 0) == [None, 0.003, SWEEP.lam_value, 0.3]
    assert set(by_lam[None]) == {"dense"}  # dense needs no λ: it runs once
    for lam in (0.003, SWEEP.lam_value, 0.3):
        scl, magnitude = by_lam[lam]["scl_identity"], by_lam[lam]["magnitude"]
        assert scl["config"]["lam"] == lam
        assert [r["kept"] for r in magnitude["layers"]] == [r["kept"] for r in scl["layers"]]
    sparsity = [by_lam[lam]["scl_identity"]["sparsity"] for lam in (0.003, SWEEP.lam_value, 0.3)]
    assert sparsity[0] < sparsity[1] < sparsity[2]  # a larger λ prunes more


def test_sweep_summary_has_every_lambda_and_dense_once(swept, tmp_path):
    rows = rp.sweep_summary(swept[1], SWEEP)
    assert sorted((r["method"], r["lam"] or 0) for r in rows) == [
        ("dense", 0), *[(m, lam) for m in ("magnitude", "scl_identity") for lam in (0.003, SWEEP.lam_value, 0.3)]]
    table = rp.sweep_markdown(rows, SWEEP)
    assert table.count("| SCL, identity STE") == 3 and "| 0.3 |" in table
    (png,) = rp.plot_sweep(rows, SWEEP, tmp_path)
    assert png.name == "lenet300-digits-lam_sweep.png" and png.read_bytes().startswith(b"\x89PNG")


def test_sweep_again_trains_nothing(swept, counted):
    out, store = swept
    assert reproduce(SWEEP, out, log=quiet, sweep=[0.3, 0.003]) == store
    assert counted == {"epochs": 0, "magnitude": 0}


def test_a_sweep_submits_every_lambda_at_once(tmp_path, monkeypatch):
    from sclref.experiments import executor

    submitted = []

    def execute(runs, **kwargs):
        submitted.append(sorted(run.name for run in runs))
        return real(runs, **kwargs)

    real = executor.execute
    monkeypatch.setattr(executor, "execute", execute)
    settings = dataclasses.replace(SWEEP, methods=("dense", "scl_identity"), epochs=1, finetune_epochs=0)
    store = reproduce(settings, tmp_path, log=quiet, sweep=[0.3, settings.lam_value])
    assert sorted({run["lam"] or 0 for run in store["runs"]}) == [0, settings.lam_value, 0.3]
    assert submitted == [sorted(f"LeNet-300-100 seed 0 {method} λ {lam:g}" for method, lam in [
        ("dense", settings.lam_value), ("scl_identity", settings.lam_value), ("scl_identity", 0.3)])]


@pytest.mark.parametrize("lams, message", [([0.0], "λ > 0"), ([float("nan")], "λ > 0"), ([0.1, 0.1], "once")])
def test_bad_sweeps_are_clear_errors_before_anything_runs(tmp_path, lams, message, counted):
    with pytest.raises(ValueError, match=message):
        reproduce(SWEEP, tmp_path, log=quiet, sweep=lams)
    assert counted["epochs"] == 0 and not list(tmp_path.iterdir())


def test_cli_sweep_prints_every_lambda(swept, tmp_path, capsys):
    out = copy_of(swept[0], tmp_path)  # resumed: nothing to train
    argv = ["reproduce", "--quick", "--seeds", "0", "--methods", *SWEEP.methods, "--out", str(out), "--no-plots"]
    assert main([*argv, "--sweep", "0.3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["method"], r["lam"]) for r in rows} == {("dense", None), ("scl_identity", 0.3),
                                                       ("scl_identity", SWEEP.lam_value), ("magnitude", 0.3),
                                                       ("magnitude", SWEEP.lam_value)}
    with pytest.raises(SystemExit):
        main([*argv, "--sweep", "-1"])
    assert "must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("kept, shown", [(0.0, "nothing left"), (1.4e-6, "almost nothing left"), (0.0746, "13.4×"),
                                         (1.0, "1.0×")])
def test_flops_reduction_is_not_a_ratio_when_almost_nothing_is_left(kept, shown):
    assert rp._reduction(kept) == shown


def test_a_dense_convolutional_run_reports_the_multiply_adds_of_its_input_size(tmp_path):
    settings = Settings.quick(models=("resnet20",), methods=("dense",), epochs=1, finetune_epochs=0, train_limit=64,
                              test_limit=32)
    (record,) = reproduce(settings, tmp_path, log=quiet)["runs"]
    conv1 = next(row for row in record["layers"] if row["layer"] == "conv1")
    assert conv1["dense_flops"] == 2 * conv1["weights"] * 8 * 8  # a 3x3 'same' conv on 8x8 digits: 64 outputs
    assert record["sparsity"] == 0 and record["effective_flops"] == record["dense_flops"]
