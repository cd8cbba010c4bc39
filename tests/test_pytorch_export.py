"""The PyTorch loader of docs/pytorch.md gives the outputs of sclref's runtime and of the masked model."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from sclref import Tensor, models
from sclref.autograd import no_grad
from sclref.sparse import Runtime, export, save

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
    with no_grad():
        masked = model(Tensor(x if name == "lenet5" else x.reshape(len(x), -1))).data
    path = tmp_path / "net.npz"
    network = export(model, in_shape)
    save(network, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "sparse CSR support is in beta"
        net = load_into_torch(path)
        with torch.no_grad():
            theirs = net(torch.from_numpy(x)).numpy()
    ours = Runtime(network)(x)
    assert theirs.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(theirs, ours, rtol=tol, atol=tol)
    np.testing.assert_allclose(theirs, masked, rtol=tol, atol=tol)


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = load_into_torch(tmp_path / "net.npz")
        with torch.no_grad():
            theirs = net(torch.from_numpy(raw)).numpy()
    assert theirs.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(theirs, Runtime(network)(x), rtol=tol, atol=tol)


def test_torch_loader_refuses_other_versions(tmp_path, load_into_torch):
    import json
    import zipfile

    path = tmp_path / "net.npz"
    model = _pruned(models.lenet_300_100(in_features=16, generator=np.random.default_rng(0)), 0.2, seed=1)
    save(export(model, (1, 4, 4)), path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(members["manifest.json"])
    manifest["version"] = 3
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(ValueError, match="not an sclref sparse network of format version 1 or 2"):
        load_into_torch(path)
