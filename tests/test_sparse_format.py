"""The sparse network file: round trip, a loader with only numpy + scipy + json, clear errors."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sclref import models
from sclref.sparse import FormatError, Runtime, export, load, save

DOC = Path(__file__).parent.parent / "docs" / "sparse-format.md"


@pytest.fixture(scope="module")
def network():
    model = models.lenet_300_100(in_features=64, generator=np.random.default_rng(0))
    gen = np.random.default_rng(1)
    for layer in (model.fc1, model.fc2, model.fc3):
        layer.score.data[...] = np.where(gen.random(layer.score.shape) < 0.1, 1.0, -1.0)
    return export(model.eval(), (1, 8, 8))


def test_round_trip_is_exact(tmp_path, network):
    save(network, tmp_path / "n.npz")
    back = load(tmp_path / "n.npz")
    x = np.random.default_rng(2).standard_normal((5, 1, 8, 8))
    assert np.array_equal(Runtime(back)(x), Runtime(network)(x))
    assert back.removed_units == network.removed_units and back.input_shape == (1, 8, 8)
    assert [layer.kind for layer in back.layers] == [layer.kind for layer in network.layers]


def test_plain_numpy_scipy_loader_from_the_docs(tmp_path, network):
    save(network, tmp_path / "n.npz")
    snippet = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8))
    np.save(tmp_path / "x.npy", x)
    code = snippet + (f"\nmanifest, layers = load_sparse_network({str(tmp_path / 'n.npz')!r})\n"
                      f"y = forward_linear_stack(layers, np.load({str(tmp_path / 'x.npy')!r}))\n"
                      f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
                      "import sys\nassert not any(m.startswith('sclref') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), Runtime(network)(x), rtol=1e-12, atol=1e-12)


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


def test_unknown_version_is_rejected(tmp_path, network):
    save(network, tmp_path / "n.npz")

    def bump(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["version"] = 99
        return json.dumps(manifest)

    _rewrite(tmp_path / "n.npz", tmp_path / "v.npz", bump)
    with pytest.raises(FormatError, match="version 99 is not supported.*newer"):
        load(tmp_path / "v.npz")


def test_truncated_and_corrupt_files_are_rejected(tmp_path, network):
    save(network, tmp_path / "n.npz")
    raw = (tmp_path / "n.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load(tmp_path / "t.npz")
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF  # inside an array member: the CRC catches it
    (tmp_path / "c.npz").write_bytes(bytes(flipped))
    with pytest.raises(FormatError):
        load(tmp_path / "c.npz")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.npz")


def test_unsorted_csr_indices_are_rejected(tmp_path, network):
    save(network, tmp_path / "n.npz")
    layer = next(i for i, lay in enumerate(network.layers)
                 if lay.kind == "linear" and np.diff(lay.weight.indptr).max() > 1)
    row = int(np.argmax(np.diff(network.layers[layer].weight.indptr) > 1))
    start = int(network.layers[layer].weight.indptr[row])

    def swap(name, data):
        if name != f"layer{layer}.indices.npy":
            return data
        import io
        arr = np.load(io.BytesIO(data))
        arr[[start, start + 1]] = arr[[start + 1, start]]
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    _rewrite(tmp_path / "n.npz", tmp_path / "u.npz", swap)
    with pytest.raises(FormatError, match="not sorted and unique"):
        load(tmp_path / "u.npz")
