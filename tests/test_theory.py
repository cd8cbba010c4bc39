"""Tests of `sclref theory`: the surrogate checker, the mask dynamics, the verdicts and the command."""

import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref import cli, optim
from sclref import ste as ste_registry
from sclref.autograd import Tensor
from sclref.nn.masked import MaskedLinear
from sclref.nn.module import Parameter
from sclref.theory import CLASSES, SETTINGS, classify, dynamics, report, run, surrogates, teacher

from .strategies import SEEDS

POSITIVE = ["identity", "leaky_relu", "softplus"]
BUILT_IN = POSITIVE + ["relu", "clipped"]

# |s| <= 20: softplus's g'(s) = sigmoid(s) keeps a step lr·|dL/dm|·g'(s) >= 1e-12 above the float64
# resolution of s (further out, sigmoid(-40) ≈ 4e-18 gives steps that round to no change at all).
SCORES = st.floats(-20.0, 20.0, allow_nan=False)
SLOPES = st.floats(0.01, 100.0).flatmap(lambda v: st.sampled_from([-v, v]))  # dL/dm, away from 0
RATES = st.floats(1e-3, 1.0)


def one_step(name: str, s: float, dl_dm: float, lr: float) -> float:
    """s after one SGD step on the linear loss L = dl_dm · H(s), through the Step op and autograd."""
    score = Parameter(np.array([s]))
    loss = (ste_registry.step(score, name) * Tensor(np.array([dl_dm]))).sum()
    loss.backward()
    optim.SGD([score], lr=lr).step()
    return float(score.data[0])


@pytest.fixture(scope="module")
def quick():
    return run(quick=True, seed=0)


@pytest.fixture
def user_stes(monkeypatch):
    """Two user estimators registered for one test: a positive one, and one that vanishes for s < -3."""
    monkeypatch.setattr(ste_registry, "_REGISTRY", dict(ste_registry._REGISTRY))

    @ste_registry.register("user_positive")
    class UserPositive(ste_registry.STE):
        satisfies_principle = True

        def surrogate(self, s):
            return 1 / (1 + s * s)

    @ste_registry.register("user_floor")
    class UserFloor(ste_registry.STE):
        satisfies_principle = True  # a wrong claim: the checker must catch it

        def surrogate(self, s):
            return np.where(s < -3, 0.0, 1.0)

    return ["user_positive", "user_floor"]


# --- the update rule, on the real estimators and the real autograd path ---------------------------------------


@given(name=st.sampled_from(POSITIVE), s=SCORES, dl_dm=SLOPES, lr=RATES)
def test_a_positive_surrogate_moves_s_toward_the_side_that_lowers_the_loss(name, s, dl_dm, lr):
    new = one_step(name, s, dl_dm, lr)
    # L = dl_dm · m: the mask that lowers the loss is on when dl_dm < 0, off when dl_dm > 0.
    assert (new > s) if dl_dm < 0 else (new < s)


@given(s=st.floats(-1e6, 0.0), dl_dm=SLOPES, lr=RATES)
def test_a_relu_mask_variable_at_or_below_zero_never_moves(s, dl_dm, lr):
    assert one_step("relu", s, dl_dm, lr) == s


@given(s=st.floats(1.0, 1e6, exclude_min=True).flatmap(lambda v: st.sampled_from([-v, v])), dl_dm=SLOPES, lr=RATES)
def test_a_clipped_mask_variable_beyond_one_never_moves_on_or_off(s, dl_dm, lr):
    assert one_step("clipped", s, dl_dm, lr) == s


@settings(max_examples=15)
@given(name=st.sampled_from(BUILT_IN), seed=SEEDS)
def test_a_masked_layer_step_moves_each_score_toward_its_better_mask_or_freezes_it(name, seed):
    gen = np.random.default_rng(seed)
    layer = MaskedLinear(6, 4, ste=name, score_init=(-3.0, 3.0), generator=gen)
    x, r = gen.standard_normal((5, 6)), gen.standard_normal((5, 4))

    def loss_of(mask):  # linear in the mask, so flipping one entry changes the loss exactly by its gradient
        return float(np.sum((x @ (layer.weight.data * mask).T) * r))

    before = layer.score.data.copy()
    mask = layer.mask().astype(float)
    (layer(Tensor(x)) * Tensor(r)).sum().backward()
    optim.SGD([layer.score], lr=0.1).step()
    moved = layer.score.data - before
    live = ste_registry.get(name).surrogate(before) > 0
    for i, j in np.ndindex(mask.shape):
        flipped = mask.copy()
        flipped[i, j] = 1 - flipped[i, j]
        gain = loss_of(mask) - loss_of(flipped)  # > 0: the other mask value is better
        better_on = (flipped[i, j] == 1) == (gain > 0)
        if not live[i, j]:
            assert moved[i, j] == 0
        elif abs(gain) > 1e-9:
            assert (moved[i, j] > 0) == better_on


# --- the surrogate checker ------------------------------------------------------------------------------------------


def test_the_checker_finds_where_each_built_in_surrogate_vanishes():
    found = {name: surrogates.check(name, max_examples=50) for name in BUILT_IN}
    for name in POSITIVE:
        assert found[name].positive and found[name].zero_set == [] and found[name].agrees
    assert found["softplus"].underflow_at == pytest.approx(-745.13, abs=0.01)  # sigmoid underflows to 0.0 there
    assert found["identity"].underflow_at is None
    assert surrogates.describe_zero_set(found["relu"].zero_set) == "s <= 0"
    assert found["relu"].counterexample == 0.0
    assert surrogates.describe_zero_set(found["clipped"].zero_set) == "s < -1, s > 1"
    assert not found["relu"].positive and not found["clipped"].positive


def test_a_user_estimator_is_picked_up_and_its_zero_set_found(user_stes):
    pos, floor = (surrogates.check(name, max_examples=50) for name in user_stes)
    assert pos.positive and pos.agrees and pos.underflow_at is not None and abs(pos.underflow_at) > 1e150
    assert not floor.positive and not floor.agrees
    assert surrogates.describe_zero_set(floor.zero_set) == "s < -3"
    assert floor.zero_set[0][1] == np.nextafter(-3.0, -np.inf)  # the edge, to the last float
    assert [c.name for c in surrogates.check_all(grid_points=101, use_hypothesis=False)][-2:] == user_stes


def test_hypothesis_finds_a_zero_interval_the_grid_misses(monkeypatch):
    monkeypatch.setattr(ste_registry, "_REGISTRY", dict(ste_registry._REGISTRY))

    @ste_registry.register("user_notch")
    class Notch(ste_registry.STE):
        def surrogate(self, s):
            return np.where((s >= 2) & (s <= 3), 0.0, 1.0)

    coarse = surrogates.check("user_notch", grid_points=3, max_examples=200)  # the grid is -50, 0, 50 and ±1
    assert coarse.counterexample is not None and coarse.zero_set == [(2.0, 3.0)]
    assert surrogates.check("user_notch", grid_points=3, use_hypothesis=False).zero_set == []


def test_the_checker_works_without_hypothesis(monkeypatch):
    for module in [m for m in sys.modules if m == "hypothesis" or m.startswith("hypothesis.")]:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    result = surrogates.check("relu")
    assert result.hypothesis_examples is None and result.counterexample is None
    assert not result.positive and surrogates.describe_zero_set(result.zero_set) == "s <= 0"


def test_broken_surrogates_are_refused_with_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ste_registry, "_REGISTRY", dict(ste_registry._REGISTRY))

    @ste_registry.register("user_nan")
    class NaNs(ste_registry.STE):
        def surrogate(self, s):
            return np.where(s > 5, np.nan, 1.0)

    @ste_registry.register("user_scalar")
    class Scalar(ste_registry.STE):
        def surrogate(self, s):
            return 1.0

    with pytest.raises(ValueError, match="NaN at s = 5"):
        surrogates.check("user_nan")
    with pytest.raises(ValueError, match="shape"):
        surrogates.check("user_scalar")
    with pytest.raises(ValueError, match="bound"):
        surrogates.check("identity", bound=-1)
    assert cli.main(["theory", "--quick", "--no-plots", "--ste", "user_nan", "--out", str(tmp_path)]) == 2
    assert "error: STE 'user_nan': surrogate is NaN at s = 5" in capsys.readouterr().err
    assert not tmp_path.joinpath("theory.json").exists()


# --- the experiments --------------------------------------------------------------------------------------------


def test_the_quick_run_reproduces_the_expected_classification(quick):
    verdicts = {name: quick["summary"][name]["verdict"] for name in BUILT_IN}
    assert verdicts == {"identity": "converges", "leaky_relu": "chatters", "softplus": "converges",
                        "relu": "dead masks", "clipped": "dead masks"}
    assert all(quick["summary"][name]["agrees"] for name in BUILT_IN)


def test_positive_surrogates_leave_no_dead_mask_and_recover_the_teacher(quick):
    for name in POSITIVE:
        s = quick["summary"][name]
        assert s["single_crossed"] == s["single_wrong_starts"] == 12 and s["single_frozen"] == 0
        assert s["planted_dead"] == 0 and s["teacher_frozen"] == 0
        # Every run that settled is at the optimum: a settled mask with g' > 0 is a minimum of the convex relaxation.
        assert s["planted_optimal"] + s["planted_unsettled"] == pytest.approx(1.0)
        assert s["teacher_precision"] >= 0.95 and s["teacher_recall"] >= 0.75


def test_relu_and_clipped_leave_dead_masks(quick):
    relu, clipped = quick["summary"]["relu"], quick["summary"]["clipped"]
    for s in (relu, clipped):
        assert s["single_crossed"] == 6 and s["single_frozen"] == 6  # the other 6 wrong starts are frozen
        assert s["planted_dead"] > 0.1 and s["planted_optimal"] < 0.1 and s["teacher_frozen"] > 0.1
    assert relu["teacher_recall"] < 0.1  # pruned connections never revive
    assert clipped["teacher_kept"] > 2 and clipped["teacher_precision"] < 0.5  # s > 1 stays on for good


def test_leaky_relu_chatters_with_its_masks_held_mostly_off(quick):
    s = quick["summary"]["leaky_relu"]
    assert 0 < s["planted_unsettled"] < 0.5 and s["planted_flipping"] > 0
    # A flipping mask is on less than a fifth of the time while the loss still pulls it on:
    # the α-weighted average step cancels, the average gradient does not.
    assert s["planted_chatter_on"] < 0.2 and s["planted_chatter_grad"] > 0.1
    for name in ("identity", "softplus"):
        assert quick["summary"][name]["planted_unsettled"] == 0


def test_the_diagnostic_ties_the_chatter_to_slope_asymmetry(quick):
    cap = SETTINGS["quick"]["planted_max_steps"]
    rows = {(r["on"], r["off"], r["lr_decay"]): r for r in quick["diagnostic"] if r["max_steps"] == cap}
    for symmetric in ((1.0, 1.0, 0.0), (0.1, 0.1, 0.0)):
        assert rows[symmetric]["unsettled_fraction"] == 0 and rows[symmetric]["optimal_fraction"] == 1
    assert rows[(1.0, 0.1, 0.0)]["unsettled_fraction"] == quick["summary"]["leaky_relu"]["planted_unsettled"]
    assert rows[(1.0, 0.03, 0.0)]["unsettled_fraction"] > rows[(1.0, 0.1, 0.0)]["unsettled_fraction"]
    assert rows[(0.1, 1.0, 0.0)]["unsettled_fraction"] > 0 and rows[(0.1, 1.0, 0.0)]["chatter_on"] > 0.8
    assert rows[(1.0, 0.1, 0.01)]["unsettled_fraction"] > 0  # a decaying step does not settle it
    longer = quick["diagnostic"][-1]
    assert longer["max_steps"] == SETTINGS["quick"]["diagnostic_long_cap"] * cap
    assert longer["optimal_fraction"] + longer["unsettled_fraction"] == pytest.approx(1.0)  # settled => optimal


def test_the_planted_optimum_is_verified_by_brute_force():
    r = dynamics.planted_mask("identity", runs=20, n=8, seed=4, max_steps=2000)
    assert r["verified"] and r["optimal_fraction"] == 1.0
    P = np.array([[[2.0, 0.0], [0.0, 1.0]]])
    assert dynamics.brute_force_optimum(P, np.array([[1.0, 0.0]])).tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="too large"):
        dynamics.brute_force_optimum(np.zeros((1, 17, 17)), np.zeros((1, 17)))


def test_a_single_variable_crosses_to_the_side_its_loss_prefers():
    r = dynamics.single_variable("identity", starts=[-0.55, 0.55], lr=0.1)
    # Target on (row 0) from -0.55 and target off (row 1) from 0.55: 6 steps of 0.1 each.
    assert r["wrong_start"].tolist() == [[True, False], [False, True]]
    assert r["steps"].tolist() == [[6, 0], [0, 6]] and r["right"].all()
    frozen = dynamics.single_variable("relu", starts=[-0.55], lr=0.1)
    assert frozen["frozen"][0, 0] and frozen["final"][0, 0] == -0.55


@pytest.mark.parametrize("summary, verdict", [
    ({"single_frozen": 1}, "dead masks"),
    ({"planted_dead": 0.1}, "dead masks"),
    ({}, "converges"),
    ({"planted_optimal": 0.9, "planted_flipping": 0.01}, "chatters"),
    ({"planted_optimal": 0.9}, "slow"),
    ({"single_crossed": 11}, "slow"),
])
def test_classify_reads_the_measurements(summary, verdict):
    base = {"single_frozen": 0, "planted_dead": 0.0, "teacher_frozen": 0.0, "single_crossed": 12,
            "single_wrong_starts": 12, "planted_optimal": 1.0, "planted_flipping": 0.0}
    assert classify({**base, **summary}) == verdict and verdict in CLASSES


def test_user_estimators_are_run_and_judged(user_stes):
    result = run(quick=True, seed=1, stes=user_stes)
    assert result["stes"] == user_stes
    positive, floor = (result["summary"][name] for name in user_stes)
    assert positive["positive"] and positive["planted_dead"] == 0 and positive["agrees"]
    assert floor["zero_set"] == "s < -3" and floor["single_frozen"] == 1  # the start at -6, loss preferring on
    assert floor["verdict"] == "dead masks" and not floor["agrees"]
    assert "dead masks (!)" in report.table(result)


def test_the_teacher_is_a_run_of_the_training_loop(monkeypatch):
    from sclref.train import Trainer

    losses, real = [], Trainer.run_epoch

    def run_epoch(self, after_step=None):
        losses.append(self.config.loss)
        return real(self, after_step)

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    result = teacher.planted_teacher("identity", config=teacher.TeacherConfig(epochs=3))
    assert losses == ["mse"] * 3 and len(result["history"]) == 3


def test_the_teacher_takes_an_estimator_instance_that_a_run_can_name(monkeypatch):
    config = teacher.TeacherConfig(epochs=2)
    by_name = teacher.planted_teacher("leaky_relu", config=config)
    assert teacher.planted_teacher(ste_registry.get("leaky_relu"), config=config) == by_name
    assert teacher.planted_teacher(ste_registry.get("leaky_relu", alpha=0.3), config=config) != by_name
    monkeypatch.setattr(ste_registry, "_REGISTRY", dict(ste_registry._REGISTRY))

    @ste_registry.register("user_scaled")
    class UserScaled(ste_registry.STE):
        def __init__(self, scale=1.0):
            self.scale = scale

        def surrogate(self, s):
            return self.scale * np.ones_like(s)

    teacher.planted_teacher(UserScaled(), config=config)  # its options are the defaults a run's settings rebuild
    with pytest.raises(ValueError, match="registered name and alpha"):
        teacher.planted_teacher(UserScaled(scale=2.0), config=config)


# --- reproducibility, errors and the command ----------------------------------------------------------------------


def test_another_seed_gives_other_problems(quick):
    other = report.to_json(run(quick=True, seed=1, stes=["leaky_relu"]))
    assert other["planted_mask"]["leaky_relu"]["steps"] != report.to_json(quick)["planted_mask"]["leaky_relu"]["steps"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"stes": ["nope"]}, ValueError, "unknown STE 'nope'; registered: identity"),
    ({"stes": []}, ValueError, "empty"),
    ({"stes": "identity"}, TypeError, "list of names"),
    ({"seed": -1}, ValueError, "seed must be an integer >= 0"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"seed": True}, ValueError, "seed"),
    ({"quick": "yes"}, TypeError, "quick"),
])
def test_run_refuses_bad_input_before_any_work(kwargs, error, match):
    with pytest.raises(error, match=match):
        run(**kwargs)


def test_the_settings_keep_quick_small_and_full_larger():
    for key, quick_value in SETTINGS["quick"].items():
        assert SETTINGS["full"][key] >= quick_value


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "must be an integer >= 0"),
    (["--seed", "x"], "must be an integer >= 0"),
    (["--fast"], "unrecognized arguments: --fast"),
])
def test_the_command_rejects_bad_flags(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli.main(["theory", "--out", str(tmp_path), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_command_rejects_unknown_estimators_and_a_file_as_out(capsys, tmp_path):
    assert cli.main(["theory", "--quick", "--ste", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown STE 'nope'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["theory", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_command_writes_the_json_the_tables_and_the_plots(capsys, tmp_path, quick):
    out = tmp_path / "theory"
    assert cli.main(["theory", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| leaky_relu " in printed and "chatters" in printed and "Chatter diagnostic" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(["theory.json", "table.md", *report.PLOTS])
    # The same seed gives the same JSON, byte for byte, in another run of the whole thing.
    assert (out / "theory.json").read_bytes() == (json.dumps(report.to_json(quick), indent=2) + "\n").encode()
    record = json.loads((out / "theory.json").read_text())
    assert record["summary"]["relu"]["verdict"] == "dead masks" and record["mode"] == "quick"
    assert "| clipped " in (out / "table.md").read_text()
    for name in report.PLOTS:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_json_mode_prints_the_record_that_it_writes(capsys, tmp_path):
    assert cli.main(["theory", "--quick", "--json", "--no-plots", "--ste", "relu", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads((tmp_path / "theory.json").read_text())
    assert printed["stes"] == ["relu"] and "relu: dead masks" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md", "theory.json"]


def test_a_failing_plot_leaves_no_file_behind(monkeypatch, tmp_path, quick):
    def broken(result):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plots", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write(quick, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_command_runs_without_hypothesis(monkeypatch, capsys, tmp_path):
    for module in [m for m in sys.modules if m == "hypothesis" or m.startswith("hypothesis.")]:
        monkeypatch.setitem(sys.modules, module, None)
    assert cli.main(["theory", "--quick", "--no-plots", "--ste", "identity", "--out", str(tmp_path)]) == 0
    assert "hypothesis search skipped (not installed) for: identity" in capsys.readouterr().out
    record = json.loads((tmp_path / "theory.json").read_text())
    assert record["surrogates"]["identity"]["hypothesis_examples"] is None
