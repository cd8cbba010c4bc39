"""`sclref export`, `sclref infer` and `sclref bench` on a small trained run."""

import json
import time

import numpy as np
import pytest

from sclref import data
from sclref.autograd import Tensor, no_grad
from sclref.cli import main
from sclref.sparse import Runtime, load, save
from sclref.train import load_model
from tests import mutations


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--finetune-epochs", "0", "--train-limit", "200", "--test-limit", "50",
                 "--no-progress", "--lam", "0.3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "m.npz"
    assert main(["export", str(run_dir), "--out", str(path)]) == 0
    return path


def _accuracy(network, preprocessing=None):
    """Accuracy on the digits test split standardized by `preprocessing` (default: its own train statistics)."""
    dataset = data.load("digits", dtype=network.dtype, preprocessing=preprocessing)
    return float(np.mean(Runtime(network)(dataset.x_test).argmax(axis=1) == dataset.y_test))


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


def test_infer_and_bench_take_a_run_directory(run_dir, exported, capsys):
    capsys.readouterr()
    assert main(["infer", str(run_dir), "--data", "digits", "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["infer", str(exported), "--data", "digits", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_run["accuracy"] == from_file["accuracy"] and from_run["samples"] == 359
    assert main(["bench", str(run_dir), "--batches", "1", "--reps", "2", "--json", "--no-break-even"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["infer", str(run_dir.parent), "--data", "digits"]) == 2  # a directory that is no run
    assert "no final model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet")
    assert main(["train", "--model", "resnet20", "--epochs", "1", "--finetune-epochs", "0", "--train-limit", "64",
                 "--test-limit", "16", "--no-progress", "--lam", "0.3", "--out", str(out)]) == 0
    return out


def test_export_then_infer_a_resnet(resnet_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(resnet_run), "--out", str(tmp_path / "r.npz"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    names = [row["layer"] for row in summary["layers"]]
    assert len(names) == 20 and names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"] and names[-1] == "fc"
    network = load(tmp_path / "r.npz")
    model, _ = load_model(resnet_run)  # eval mode: batch norms use their running statistics
    x = data.load("digits", dtype=np.float32, preprocessing=network.preprocessing).x_test[:32]
    with no_grad():
        expected = model(Tensor(x)).data
    np.testing.assert_allclose(Runtime(network)(x), expected, rtol=1e-4, atol=1e-4)
    assert main(["infer", str(tmp_path / "r.npz"), "--data", "digits", "--batch", "64", "--limit", "100",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 100 and list(result["backends"]) == names
    expected_accuracy = np.mean(Runtime(network)(data.load("digits", dtype=np.float32, preprocessing=network
                                                           .preprocessing).x_test[:100]).argmax(axis=1)
                                == data.load("digits").y_test[:100])
    assert result["accuracy"] == pytest.approx(expected_accuracy)


def test_export_carries_the_run_preprocessing(run_dir, exported):
    record = load_model(run_dir)[1]["preprocessing"]
    assert set(record) == {"pixel_max", "mean", "std"} and record["pixel_max"] == 16
    assert load(exported).preprocessing == record


def test_exporting_a_run_twice_gives_the_same_bytes(run_dir, exported, tmp_path, monkeypatch):
    later = time.time() + 86400  # zip would stamp the members with the time of writing
    monkeypatch.setattr(time, "time", lambda: later)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "again.npz")]) == 0
    assert (tmp_path / "again.npz").read_bytes() == exported.read_bytes()


def test_infer_standardizes_the_data_with_the_model_preprocessing(exported, tmp_path, capsys):
    network = load(exported)
    own = dict(network.preprocessing)
    network.preprocessing = dict(own, mean=own["mean"] + 0.3, std=3 * own["std"])
    save(network, tmp_path / "shifted.npz")
    want = _accuracy(network, network.preprocessing)
    assert want != _accuracy(network)  # the shift changes predictions, so the test can tell the two apart
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "shifted.npz"), "--data", "digits", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["accuracy"] == want and result["preprocessing"] == network.preprocessing
    assert "warning" not in captured.err


def test_infer_warns_on_a_network_without_preprocessing(exported, tmp_path, capsys):
    members = mutations.zip_members(exported.read_bytes())
    manifest = json.loads(members["manifest.json"])
    manifest["version"] = 1
    del manifest["preprocessing"]
    members["manifest.json"] = json.dumps(manifest).encode()
    (tmp_path / "v1.npz").write_bytes(mutations.make_zip(members))
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "v1.npz"), "--data", "digits", "--json"]) == 0
    captured = capsys.readouterr()
    assert "records no input preprocessing" in captured.err
    assert json.loads(captured.out)["accuracy"] == _accuracy(load(exported))  # today's behaviour: DIR's statistics


def test_an_empty_test_set_is_an_error(exported, tmp_path, capsys):
    digits = data.load("digits")
    raw = np.zeros((len(digits.x_train), 1, 8, 8), np.uint8)
    raw[:, 0, 4, 4] = np.arange(len(raw)) % 17
    np.savez(tmp_path / "empty.npz", x_train=raw, y_train=digits.y_train, x_test=raw[:0], y_test=digits.y_test[:0],
             pixel_max=np.float64(16))
    capsys.readouterr()
    assert main(["infer", str(exported), "--data", str(tmp_path / "empty.npz")]) == 2
    assert "the test set is empty" in capsys.readouterr().err


def test_bench_json(exported, capsys):
    capsys.readouterr()
    assert main(["bench", str(exported), "--batches", "1,8", "--reps", "2", "--no-break-even", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in result["layers"]] == ["fc1", "fc2", "fc3"]
    assert set(result["network"]["8"]) >= {"dense", "scipy", "sclref", "auto"}


def test_bench_refuses_a_batch_beyond_the_memory_limit_before_starting(exported, monkeypatch, capsys):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    capsys.readouterr()
    assert main(["bench", str(exported), "--batches", "1,100000", "--reps", "2", "--no-break-even"]) == 2
    assert "a batch of 100000 inputs of shape [1, 8, 8]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["export", "/no/such/run"], "no such run directory"),
    (["infer", "/no/such.npz", "--data", "digits"], "no such file"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["infer", "M", "--data", "digits", "--limit", "-5"], "argument --limit: must be an integer >= 1, got -5"),
    (["infer", "M", "--data", "digits", "--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
    (["infer", "M", "--data", "digits", "--batch", "0"], "argument --batch: must be an integer in [1, 1,048,576], "
                                                         "got 0"),
    (["infer", "M", "--data", "digits", "--batch", "10000000000"], "argument --batch: must be an integer in "
                                                                   "[1, 1,048,576], got 10000000000"),
    (["bench", "M", "--batches", "1000000000000"], "argument --batches: must be an integer in [1, 1,048,576], "
                                                   "got 1000000000000"),
    (["bench", "M", "--batches", "1,x"], "argument --batches: must be an integer in [1, 1,048,576], got 'x'"),
    (["bench", "M", "--batches", ",".join(["1"] * 17)], "argument --batches: at most 16 batch sizes, got 17"),
    (["bench", "M", "--reps", "0"], "argument --reps: must be an integer in [1, 10,000], got 0"),
    (["bench", "M", "--reps", "1000000000"], "argument --reps: must be an integer in [1, 10,000], got 1000000000"),
])
def test_counts_out_of_range_are_usage_errors_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_corrupt_model_file(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert main(["infer", str(tmp_path / "bad.npz"), "--data", "digits"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
