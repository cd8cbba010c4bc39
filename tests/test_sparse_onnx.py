"""`sclref.sparse.onnx_export`: ONNX Runtime runs the exported model and gives the sparse runtime's outputs."""

import json
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from sclref import __version__, models
from sclref.cli import main
from sclref.errors import InputError
from sclref.sparse import (
    Activation,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    Runtime,
    SparseNetwork,
    export,
    export_run,
)
from sclref.sparse.onnx_export import OPSET, save_onnx, to_onnx, to_onnx_bytes
from tests.test_sparse_export import train_briefly


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def _csr(rows, cols, density, gen):
    w = sp.random_array((rows, cols), density=density, format="csr", rng=gen, data_sampler=gen.standard_normal)
    w = sp.csr_array((w.data, w.indices.astype(np.int32), w.indptr.astype(np.int32)), shape=(rows, cols))
    w.sort_indices()
    return w


def _mlp(preprocessing=None):
    """A LeNet-300-100-like chain (scaled down) with a ReLU and a leaky ReLU, on 1x8x8 images."""
    gen = np.random.default_rng(0)
    layers = [Flatten("flatten"),
              Linear("fc1", _csr(30, 64, 0.2, gen), gen.standard_normal(30)), Activation("relu1", "relu"),
              Linear("fc2", _csr(12, 30, 0.3, gen), gen.standard_normal(12)), Activation("leaky", "leaky_relu", 0.1),
              Linear("fc3", _csr(10, 12, 0.5, gen), gen.standard_normal(10))]
    return SparseNetwork(layers, np.dtype(np.float64), input_shape=(1, 8, 8), preprocessing=preprocessing)


def _lenet5():
    """A LeNet-5-like net: a padded conv, max-pool, a strided conv, max-pool, two linear layers."""
    gen = np.random.default_rng(1)
    layers = [Conv2d("conv1", _csr(4, 2 * 9, 0.4, gen), gen.standard_normal(4), in_channels=2, kernel_size=(3, 3),
                     padding=(1, 1)),
              Activation("relu1", "relu"), MaxPool2d("pool1", (2, 2), (2, 2)),
              Conv2d("conv2", _csr(6, 4 * 6, 0.3, gen), gen.standard_normal(6), in_channels=4, kernel_size=(2, 3),
                     stride=(1, 2), padding=(0, 1)),
              Activation("relu2", "relu"), MaxPool2d("pool2", (2, 2), (1, 1)), Flatten("flatten"),
              Linear("fc1", _csr(16, 6 * 3 * 2, 0.3, gen), gen.standard_normal(16)), Activation("relu3", "relu"),
              Linear("fc2", _csr(5, 16, 0.5, gen), gen.standard_normal(5))]
    return SparseNetwork(layers, np.dtype(np.float64), input_shape=(2, 10, 11))


def _run(ort, model_bytes, x):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _assert_close(got, want):
    """Within 1e-5 of the output scale: float32 sums in a different order differ by a few ulps, not more."""
    assert got.shape == want.shape and got.dtype == np.float32
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= 1e-5 * scale


@pytest.mark.parametrize("build", [_mlp, _lenet5])
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_gives_the_sparse_runtimes_outputs(ort, build, batch):
    network = build()
    x = np.random.default_rng(batch).standard_normal((batch, *network.input_shape)).astype(np.float32)
    got = _run(ort, to_onnx_bytes(network), x)
    _assert_close(got, Runtime(network, "float32")(x))
    assert got.std() > 0  # the comparison is not between two constant outputs


def test_the_model_is_checked_and_says_what_it_is(onnx):
    model = to_onnx(_lenet5())
    onnx.checker.check_model(model, full_check=True)
    assert (model.producer_name, model.producer_version) == ("sclref", __version__)
    assert [(op.domain, op.version) for op in model.opset_import] == [("", OPSET)]
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, 10, 11]
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert weights["conv2.weight"].shape == (6, 4, 2, 3) and weights["fc1.weight"].shape == (16, 36)
    conv2 = _lenet5().layers[3].weight
    assert np.array_equal(weights["conv2.weight"].reshape(6, -1), conv2.toarray().astype(np.float32))
    assert np.count_nonzero(weights["conv2.weight"]) == conv2.nnz  # pruned connections are stored zeros
    assert json.loads({p.key: p.value for p in model.metadata_props}["preprocessing"]) is None


def test_raw_pixels_into_onnx_equal_standardized_pixels_into_the_runtime(onnx, ort):
    stats = {"pixel_max": 255.0, "mean": 0.1307, "std": 0.3081}
    network = _mlp(stats)
    model = to_onnx(network)
    assert [node.op_type for node in model.graph.node][:3] == ["Div", "Sub", "Div"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["input"] == "raw" and json.loads(props["preprocessing"]) == stats
    assert "raw pixels" in model.doc_string
    raw = np.random.default_rng(3).integers(0, 256, (9, 1, 8, 8)).astype(np.float32)
    standardized = (raw / np.float32(255.0) - np.float32(0.1307)) / np.float32(0.3081)
    _assert_close(_run(ort, model.SerializeToString(), raw), Runtime(network, "float32")(standardized))
    assert {p.key: p.value for p in to_onnx(_mlp()).metadata_props}["input"] == "standardized"


def test_the_same_network_gives_the_same_bytes(tmp_path, onnx):
    save_onnx(_lenet5(), tmp_path / "a.onnx")
    save_onnx(_lenet5(), tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == to_onnx_bytes(_lenet5())
    assert to_onnx_bytes(_mlp()) != to_onnx_bytes(_mlp({"pixel_max": 255.0, "mean": 0.5, "std": 0.25}))


def test_a_network_that_overflows_float32_is_refused_and_nothing_is_written(tmp_path, onnx):
    network = _mlp()
    network.layers[1].weight.data[:] = 1e36
    with pytest.raises(InputError, match="float32"):
        save_onnx(network, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_a_trained_resnet_runs_in_onnx_runtime(ort, shortcut):
    shape = (1, 9, 9)  # odd: the stride-2 stages see 5x5 and 3x3 maps
    model = models.resnet(8, in_shape=shape, num_classes=3, shortcut=shortcut, score_init=(-1.0, 2.0),
                          generator=np.random.default_rng(1))
    network = export(train_briefly(model, shape), shape)
    ops = [node.op_type for node in to_onnx(network).graph.node]
    assert ops.count("Add") == 3 and (("Pad" in ops) == (shortcut == "A"))
    x = np.random.default_rng(2).standard_normal((5, *shape)).astype(np.float32)
    got = _run(ort, to_onnx_bytes(network), x)
    _assert_close(got, Runtime(network, "float32")(x))
    assert got.std() > 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--finetune-epochs", "0", "--train-limit", "200", "--test-limit", "50",
                 "--no-progress", "--out", str(out)]) == 0
    return out


def test_the_cli_exports_a_run_as_onnx(run_dir, tmp_path, ort, capsys):
    from sclref import data

    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "onnx" and summary["bytes_file"] == (tmp_path / "m.onnx").stat().st_size
    network = export_run(run_dir)
    pre = network.preprocessing
    assert pre is not None  # a new run records how it standardized the digits
    standardized = data.load("digits", dtype=np.float32, preprocessing=pre).x_test[:20]
    raw = np.round((standardized * pre["std"] + pre["mean"]) * pre["pixel_max"]).astype(np.float32)
    restandardized = (raw / np.float32(pre["pixel_max"]) - np.float32(pre["mean"])) / np.float32(pre["std"])
    got = _run(ort, (tmp_path / "m.onnx").read_bytes(), raw.reshape(len(raw), *network.input_shape))
    _assert_close(got, Runtime(network, "float32")(restandardized))


def test_a_bad_format_is_a_usage_error(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "m.x")])
    assert exc.value.code == 2 and "tflite" in capsys.readouterr().err
    assert not (tmp_path / "m.x").exists()


def test_without_onnx_the_command_names_the_extra_to_install(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert 'pip install -e ".[onnx]"' in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
