"""The command line: version, help, info, and `sclref train` (in-process, small runs)."""

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from sclref import __version__
from sclref.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sclref {__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "sclref", "info"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"sclref {__version__}") and "numba" in out


@pytest.mark.parametrize("env, training, threads", [({}, "serial", 2), ({"SCLREF_NUMBA_PARALLEL": "1"}, "parallel", 2),
                                                    ({"NUMBA_NUM_THREADS": "1"}, "serial", 1)])
def test_info_states_which_kernels_run_in_parallel(env, training, threads):
    environ = {k: v for k, v in os.environ.items() if k not in ("SCLREF_NUMBA_PARALLEL", "NUMBA_DISABLE_JIT")}
    out = subprocess.run([sys.executable, "-m", "sclref", "info"], capture_output=True, text=True, check=True,
                         env={**environ, "NUMBA_NUM_THREADS": "2", **env}).stdout
    assert f"jit enabled, {threads} numba threads" in out
    assert f"training kernels: {training}" in out
    assert f"split over up to {threads} threads as tasks, other kernels on the caller's thread" in out


@pytest.mark.parametrize("threads", ["1", "2"])
def test_info_states_blas_threads_outside_and_inside_training(threads):
    environ = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    out = subprocess.run([sys.executable, "-m", "sclref", "info"], capture_output=True, text=True, check=True,
                         env=environ).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("BLAS ")]
    assert line.endswith(f", {threads} threads; 1 while sclref trains (sclref.threads)")


# -- sclref train -----------------------------------------------------------------------------

SMALL_RUN = ["--epochs", "2", "--finetune-epochs", "1", "--train-limit", "300", "--test-limit", "100", "--no-progress"]


def _train(out, *extra):
    return main(["train", *SMALL_RUN, "--out", str(out), *extra])


def _model_state(out):
    from sclref import storage

    return {k: v.tobytes() for k, v in storage.load_state(out / "model.npz")["state"].items()}


def test_train_prints_one_line_per_epoch_and_the_layer_table(tmp_path, capsys):
    import json

    from sclref.train import format_layers

    assert _train(tmp_path / "run") == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1:3] for line in epochs] == [["1/3", "mask"], ["2/3", "mask"], ["3/3", "finetune"]]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    table = format_layers(metrics["final"]["layers"])
    assert table in captured.out
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["fc1", "fc2", "fc3", "total"]
    final = metrics["final"]
    assert lines[-1] == (f"test error {100 * final['test_error']:.2f}%, sparsity {100 * final['sparsity']:.2f}%; "
                         f"run written to {tmp_path / 'run'}/")
    assert captured.err == ""
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".sclref.lock", "checkpoint.npz", "metrics.json",
                                                                   "model.npz"]


def test_train_json_prints_the_final_metrics(tmp_path, capsys):
    import json

    assert _train(tmp_path / "run", "--json", "--lam", "0.1") == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert captured.out == (tmp_path / "run" / "metrics.json").read_text()
    assert metrics["finished"] is True and metrics["epochs_done"] == 3 and metrics["config"]["lam"] == 0.1
    assert [row["layer"] for row in metrics["final"]["layers"]] == ["fc1", "fc2", "fc3"]
    assert 0 <= metrics["final"]["test_error"] <= 1 and 0 < metrics["final"]["sparsity"] < 1
    # The epoch lines go to stderr so that stdout is JSON alone.
    assert len([line for line in captured.err.splitlines() if line.startswith("epoch ")]) == 3


def test_train_dense_has_no_masks(tmp_path, capsys):
    import json

    assert _train(tmp_path / "run", "--dense") == 0
    out = capsys.readouterr().out
    assert "fc1" not in out and "sparsity 0.00%; run written to" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["masked"] is False and metrics["final"]["layers"] == []
    assert not any("score" in name for name in _model_state(tmp_path / "run"))


def test_train_default_out_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--finetune-epochs", "0", "--train-limit", "50", "--test-limit", "20",
                 "--no-progress", "--dense"]) == 0
    assert (tmp_path / "runs" / "lenet300-digits-dense-seed0" / "model.npz").is_file()
    assert "run written to runs/lenet300-digits-dense-seed0/" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--lam", "-1"], "λ must be a finite number >= 0, got -1.0"),
    (["--lam", "nan"], "λ must be a finite number >= 0, got nan"),
    (["--target-sparsity", "0"], r"target sparsity must be in (0, 100) percent, got 0.0"),
    (["--target-sparsity", "100"], "target sparsity must be in (0, 100) percent"),
    (["--ste", "nope"], "unknown STE 'nope'"),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--mask-grad-norm", "l1"], "unknown normalization 'l1'"),
    (["--dtype", "float16"], "dtype must be float32 or float64"),
    (["--train-limit", "0"], "train_limit must be >= 1"),
    (["--data", "/nonexistent"], "unknown dataset '/nonexistent'"),
    (["--data", "/nonexistent/mnist.npz"], "/nonexistent/mnist.npz"),
    (["--resume"], "no checkpoint"),
])
def test_train_bad_flags_fail_clearly_and_write_nothing(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    # Later flags win, so these override the small-run defaults.
    assert main(["train", *SMALL_RUN, "--out", "run", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("sclref train: error: ") and message in captured.err
    assert captured.err.count("\n") == 1  # one line, no traceback
    # Also without --out: the default runs/... directory is not created either.
    assert main(["train", *SMALL_RUN, *flags]) == 2
    assert list(tmp_path.iterdir()) == []


def test_train_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    assert _train(tmp_path / "taken") == 2
    err = capsys.readouterr().err
    assert err.startswith("sclref train: error: ") and "taken" in err
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_train_flag_of_the_wrong_type_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "two", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "argument --epochs: invalid int value: 'two'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_resume_continues_the_run(tmp_path, capsys):
    import json

    from sclref.train import TrainConfig, train

    assert _train(tmp_path / "whole") == 0
    config = TrainConfig(epochs=2, finetune_epochs=1, train_limit=300, test_limit=100)
    train(config, tmp_path / "cut", log=lambda line: None, stop_after=1)  # as if interrupted after epoch 1
    capsys.readouterr()
    assert _train(tmp_path / "cut", "--resume", "--json") == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == f"resumed from {tmp_path / 'cut' / 'checkpoint.npz'} after epoch 1"
    assert [line.split()[1] for line in err[1:]] == ["2/3", "3/3"]  # only the epochs that were left
    assert json.loads(captured.out)["epochs_done"] == 3
    assert _model_state(tmp_path / "cut") == _model_state(tmp_path / "whole")
    # Resuming with other settings names them.
    assert _train(tmp_path / "cut", "--resume", "--lam", "0.05") == 2
    assert "other settings: ['lam']" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "nan"], "ste_alpha (the leaky_relu STE's slope) must be in (0, 1), got nan"),
    (["--score-init", "1e300"], "score_init = 1e+300 overflows float32"),
    (["--dense", "--target-sparsity", "90"], "target sparsity needs a masked run"),
    (["--resume", "--replace"], "give one"),
])
def test_train_values_that_would_break_the_run_later_fail_first(tmp_path, capsys, flags, message):
    assert main(["train", *SMALL_RUN, "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sclref train: error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_gradcheck_negative_seed_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["gradcheck", "--seed", "-1"])
    assert info.value.code == 2
    assert "argument --seed: must be an integer >= 0, got -1" in capsys.readouterr().err


def test_train_into_a_finished_run_needs_replace(tmp_path, capsys):
    assert _train(tmp_path / "run") == 0
    capsys.readouterr()
    assert _train(tmp_path / "run") == 2
    assert "holds another run" in capsys.readouterr().err
    assert _train(tmp_path / "run", "--replace") == 0


def _sigint_as_usual():
    # A shell starts background jobs with SIGINT ignored, and children inherit that: the
    # child must take Ctrl-C as a terminal user's process does, however pytest was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_train(out, *extra):
    env = {**os.environ, "SCLREF_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sclref", "train", "--epochs", "400", "--train-limit", "600",
                             "--test-limit", "100", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_as_usual)


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path):
    proc = _start_train(tmp_path / "run")
    try:
        _wait_for(tmp_path / "run" / "checkpoint.npz", proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"The last checkpoint is {tmp_path / 'run' / 'checkpoint.npz'} (after epoch" in err
    assert "--resume" in err.splitlines()[-1]


def test_two_writers_of_one_out_the_second_fails_at_once_the_first_finishes(tmp_path, capsys):
    first = _start_train(tmp_path / "run", "--epochs", "100", "--train-limit", "1438")
    try:
        _wait_for(tmp_path / "run" / "checkpoint.npz", first)
        assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "100", "--train-limit", "1438",
                     "--test-limit", "100", "--resume", "--no-progress"]) == 2
        assert "another sclref process is writing" in capsys.readouterr().err
        assert first.wait(300) == 0
    finally:
        first.kill()
    assert (tmp_path / "run" / "model.npz").exists()


def test_an_unwritable_out_fails_before_the_first_epoch(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _train(tmp_path / "file" / "run") == 2
    captured = capsys.readouterr()
    assert "epoch" not in captured.out and "is a file" in captured.err


def test_theory_checks_out_before_computing(tmp_path, capsys, monkeypatch):
    import sclref.theory

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sclref.theory, "run", lambda **kw: pytest.fail("computed before --out was checked"))
    assert main(["theory", "--quick", "--no-plots", "--out", str(tmp_path / "file" / "t")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_help_of_every_command_states_every_default(capsys):
    from sclref.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
                # the option's entry: from its line in the options list to the next option's line
                entry = text[text.index("\n  " + ", ".join(action.option_strings)) + 1:]
                entry = entry[:entry.find("\n  -") if "\n  -" in entry else len(entry)]
                assert "default" in entry, f"sclref {name} {action.option_strings[-1]}: no default in its help"


def test_train_lam_before_norm_selects_normalizing_the_total(tmp_path):
    from sclref.cli import build_parser

    args = build_parser().parse_args(["train", "--lam-before-norm", "--mask-grad-norm", "max"])
    assert (args.normalize, args.normalization) == ("total", "max")
    assert build_parser().parse_args(["train"]).normalize == "task"
