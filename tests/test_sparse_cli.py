"""`sclref export`, `sclref infer` and `sclref bench` on a small trained run."""

import json

import pytest

from sclref.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--finetune-epochs", "0", "--train-limit", "200", "--test-limit", "50",
                 "--no-progress", "--lam", "0.3", "--out", str(out)]) == 0
    return out


def test_export_then_infer(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.npz"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in summary["layers"]] == ["fc1", "fc2", "fc3"]
    assert main(["infer", str(tmp_path / "m.npz"), "--data", "digits", "--batch", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result["samples"] == 359  # the digits test split
    assert result["accuracy"] > 0 and set(result["backends"]) == {"fc1", "fc2", "fc3"}
    assert metrics["finished"]


def test_bench_json(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.npz")]) == 0
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "m.npz"), "--batches", "1,8", "--reps", "2", "--no-break-even",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in result["layers"]] == ["fc1", "fc2", "fc3"]
    assert set(result["network"]["8"]) >= {"dense", "scipy", "sclref", "auto"}


@pytest.mark.parametrize("argv, message", [
    (["export", "/no/such/run"], "no such run directory"),
    (["infer", "/no/such.npz", "--data", "digits"], "no such file"),
    (["infer", "/no/such.npz", "--data", "digits", "--batch", "0"], "--batch must be >= 1"),
    (["bench", "/no/such.npz", "--batches", "1,x"], "bad --batches"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_corrupt_model_file(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert main(["infer", str(tmp_path / "bad.npz"), "--data", "digits"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
