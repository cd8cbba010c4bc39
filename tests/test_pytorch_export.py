"""The PyTorch loader of docs/pytorch.md gives the outputs of sclref's runtime and of the masked model."""

import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sclref import Tensor, models
from sclref.autograd import no_grad
from sclref.pruning import magnitude_prune
from sclref.sparse import (
    Activation,
    Conv2d,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    Residual,
    Runtime,
    SparseNetwork,
    SubsamplePad,
    export,
    save,
)
from tests.test_sparse_export import train_briefly

torch = pytest.importorskip("torch")

DOC = Path(__file__).parent.parent / "docs" / "pytorch.md"


@pytest.fixture(scope="module")
def load_into_torch():
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1), namespace)
    return namespace["load_into_torch"]


def _pruned(model, density: float, seed: int):
    gen = np.random.default_rng(seed)
    for layer in model:
        if hasattr(layer, "score"):
            layer.score.data[...] = np.where(gen.random(layer.score.shape) < density, 1.0, -1.0)
    return model.eval()


def _masked_output(model, x):
    with no_grad():
        return model.eval()(Tensor(x)).data


def _torch_output(load_into_torch, path, x):
    """The loaded network's output for the NumPy batch `x`, as a NumPy array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "sparse CSR support is in beta"
        net = load_into_torch(path)
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()


def _assert_close(theirs, ref, dtype):
    """Equal up to the dtype's rounding: 1e-10 in float64, 1e-5 of the outputs' scale in float32."""
    assert theirs.dtype == dtype
    if dtype == np.float64:
        np.testing.assert_allclose(theirs, ref, rtol=1e-10, atol=1e-10)
    else:
        np.testing.assert_allclose(theirs, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name,in_shape", [("lenet300", (1, 8, 8)), ("lenet5", (1, 16, 16))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_loader_reproduces_the_export(tmp_path, load_into_torch, name, in_shape, dtype):
    gen = np.random.default_rng(0)
    if name == "lenet300":
        model = models.lenet_300_100(in_features=int(np.prod(in_shape)), dtype=dtype, generator=gen)
    else:
        model = models.lenet5(in_shape=in_shape, dtype=dtype, generator=gen)
    model = _pruned(model, 0.1, seed=1)
    x = np.random.default_rng(2).standard_normal((6,) + in_shape).astype(dtype)
    masked = _masked_output(model, x if name == "lenet5" else x.reshape(len(x), -1))
    path = tmp_path / "net.npz"
    network = export(model, in_shape)
    save(network, path)
    theirs = _torch_output(load_into_torch, path, x)
    _assert_close(theirs, Runtime(network)(x), dtype)
    _assert_close(theirs, masked, dtype)


@pytest.mark.parametrize("name,in_shape", [("lenet300", (1, 8, 8)), ("lenet5", (1, 16, 16))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_loader_standardizes_raw_pixels_with_the_manifest_values(tmp_path, load_into_torch, name, in_shape,
                                                                       dtype):
    gen = np.random.default_rng(3)
    if name == "lenet300":
        model = models.lenet_300_100(in_features=int(np.prod(in_shape)), dtype=dtype, generator=gen)
    else:
        model = models.lenet5(in_shape=in_shape, dtype=dtype, generator=gen)
    stats = {"pixel_max": 255.0, "mean": 0.1307, "std": 0.3081}
    network = export(_pruned(model, 0.1, seed=4), in_shape, preprocessing=stats)
    save(network, tmp_path / "net.npz")
    raw = np.random.default_rng(5).integers(0, 256, (6,) + in_shape).astype(dtype)
    x = ((raw.astype(np.float64) / 255 - stats["mean"]) / stats["std"]).astype(dtype)
    theirs = _torch_output(load_into_torch, tmp_path / "net.npz", raw)
    _assert_close(theirs, Runtime(network)(x), dtype)


RESNET_SHAPE = (1, 9, 9)  # odd: the stride-2 stages see 5x5 and 3x3 maps
VGG_SHAPE = (1, 12, 12)


@pytest.fixture(scope="module")
def resnets():
    """Masked ResNet-20s with either shortcut after a few training steps, batch norms moved, 90 % pruned."""
    nets = {}
    for shortcut in ("A", "B"):
        model = models.resnet20(in_shape=RESNET_SHAPE, num_classes=3, shortcut=shortcut, score_init=(-1.0, 2.0),
                                generator=np.random.default_rng(1))
        train_briefly(model, RESNET_SHAPE)
        magnitude_prune(model, 0.9)
        nets[shortcut] = model.eval()
    return nets


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_loader_runs_a_pruned_resnet20(tmp_path, load_into_torch, resnets, shortcut, dtype):
    model = resnets[shortcut]
    x = np.random.default_rng(2).standard_normal((4, *RESNET_SHAPE))
    network = export(model, RESNET_SHAPE, dtype=dtype)
    save(network, tmp_path / "net.npz")
    assert json.loads(zipfile.ZipFile(tmp_path / "net.npz").read("manifest.json"))["version"] == 3
    theirs = _torch_output(load_into_torch, tmp_path / "net.npz", x.astype(dtype))
    _assert_close(theirs, Runtime(network)(x.astype(dtype)), dtype)
    _assert_close(theirs, _masked_output(model, x), dtype)


@pytest.fixture(scope="module")
def vgg11():
    """A masked VGG-11 at width 0.25 with a hidden dense layer, after a few training steps, 90 % pruned."""
    model = models.vgg11(in_shape=VGG_SHAPE, num_classes=3, width=0.25, hidden=8, score_init=(-1.0, 2.0),
                         generator=np.random.default_rng(3))
    train_briefly(model, VGG_SHAPE, seed=4)
    magnitude_prune(model, 0.9)
    return model.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_loader_runs_a_pruned_vgg11(tmp_path, load_into_torch, vgg11, dtype):
    x = np.random.default_rng(5).standard_normal((3, *VGG_SHAPE))
    network = export(vgg11, VGG_SHAPE, dtype=dtype)
    assert network.removed_units  # the loader sees layers narrower than the model's
    save(network, tmp_path / "net.npz")
    theirs = _torch_output(load_into_torch, tmp_path / "net.npz", x.astype(dtype))
    _assert_close(theirs, Runtime(network)(x.astype(dtype)), dtype)
    _assert_close(theirs, _masked_output(vgg11, x), dtype)


def _sparse(gen, rows, cols, dtype):
    return sp.csr_array(np.where(gen.random((rows, cols)) < 0.5, gen.standard_normal((rows, cols)), 0.0).astype(dtype))


def _conv(gen, name, c_in, c_out, dtype, stride=1):
    return Conv2d(name, _sparse(gen, c_out, c_in * 9, dtype), gen.standard_normal(c_out).astype(dtype), c_in, (3, 3),
                  (stride, stride), (1, 1))


def _every_kind(gen, dtype) -> list:
    """Layers of the kinds the models do not all use (leaky ReLU, residual blocks nested two deep, one on flat
    features) with the others (conv2d, linear, relu, maxpool2d, subsample_pad, global_avg_pool2d)."""
    inner = Residual("outer.inner", [_conv(gen, "outer.inner.conv", 3, 3, dtype)], [])
    outer = Residual("outer", [_conv(gen, "outer.conv", 2, 3, dtype, stride=2),
                               Activation("outer.act", "leaky_relu", 0.1), inner],
                     [SubsamplePad("outer.pad", (2, 2), (1, 0))])  # 2x7x7 -> 3x4x4 both ways
    split = Residual("split", [MaxPool2d("split.pool", (1, 1), (1, 1))], [_conv(gen, "split.conv", 3, 3, dtype)])
    head = Residual("head", [Linear("head.fc", _sparse(gen, 3, 3, dtype), gen.standard_normal(3).astype(dtype))], [])
    return [outer, Activation("relu", "relu"), split, GlobalAvgPool2d("gap"), head,
            Linear("fc", _sparse(gen, 2, 3, dtype), gen.standard_normal(2).astype(dtype))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_loader_runs_nested_blocks_and_every_layer_kind(tmp_path, load_into_torch, dtype):
    gen = np.random.default_rng(6)
    network = SparseNetwork(_every_kind(gen, dtype), np.dtype(dtype), (2, 7, 7))
    save(network, tmp_path / "net.npz")
    x = gen.standard_normal((5, 2, 7, 7)).astype(dtype)
    _assert_close(_torch_output(load_into_torch, tmp_path / "net.npz", x), Runtime(network)(x), dtype)


def _edit_manifest(path, edit):
    """Rewrite the file at `path` with `edit` applied to its manifest (a dict, changed in place)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


def test_torch_loader_reads_a_version_1_file(tmp_path, load_into_torch):
    path = tmp_path / "net.npz"
    model = _pruned(models.lenet5(in_shape=(1, 16, 16), generator=np.random.default_rng(0)), 0.2, seed=1)
    network = export(model, (1, 16, 16), preprocessing={"pixel_max": 255.0, "mean": 0.5, "std": 0.25})
    save(network, path)
    _edit_manifest(path, lambda m: (m.update(version=1), m.pop("preprocessing")))
    x = np.random.default_rng(2).standard_normal((3, 1, 16, 16))
    _assert_close(_torch_output(load_into_torch, path, x), Runtime(network)(x), np.float64)


@pytest.mark.parametrize("version", [0, 4, "3", None])
def test_torch_loader_refuses_other_versions(tmp_path, load_into_torch, version):
    path = tmp_path / "net.npz"
    model = _pruned(models.lenet_300_100(in_features=16, generator=np.random.default_rng(0)), 0.2, seed=1)
    save(export(model, (1, 4, 4)), path)
    _edit_manifest(path, lambda m: m.update(version=version))
    with pytest.raises(ValueError, match="not an sclref sparse network of format version 1, 2 or 3"):
        load_into_torch(path)


def test_torch_loader_refuses_an_unknown_layer_kind_inside_a_block(tmp_path, load_into_torch, resnets):
    path = tmp_path / "net.npz"
    save(export(resnets["A"], RESNET_SHAPE), path)

    def rename(manifest):
        block = next(layer for layer in manifest["layers"] if layer["kind"] == "residual")
        block["body"][1]["kind"] = "gelu"

    _edit_manifest(path, rename)
    with pytest.raises(ValueError, match="layer 'layer1.0.relu1': kind 'gelu' is not known to this loader"):
        load_into_torch(path)
