"""The sparse network file: round trip, reproducible bytes, a loader with only numpy + scipy + json,
versions 1 to 3, residual blocks, and a reader that refuses every damaged or out-of-bounds file with an
InputError."""

import functools
import io
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sclref import kernels, models, nn
from sclref.errors import InputError, LimitError
from sclref.nn.masked import MaskedConv2d, MaskedLinear
from sclref.sparse import FORMAT_VERSION, FormatError, Runtime, export, load, save
from tests import mutations

DOC = Path(__file__).parent.parent / "docs" / "sparse-format.md"
STATS = {"pixel_max": 255.0, "mean": 0.13, "std": 0.31}


def _prune(model, density, seed):
    gen = np.random.default_rng(seed)
    for layer in model:
        if hasattr(layer, "score"):
            layer.score.data[...] = np.where(gen.random(layer.score.shape) < density, 1.0, -1.0)
    return model.eval()


def chain_network(preprocessing=STATS):
    """A small LeNet-300-100-like chain (with a leaky ReLU), exported."""
    gen = np.random.default_rng(0)
    model = nn.Sequential({"flatten": nn.Flatten(), "fc1": MaskedLinear(16, 12, generator=gen),
                           "act1": nn.LeakyReLU(0.1), "fc2": MaskedLinear(12, 8, generator=gen),
                           "act2": nn.ReLU(), "fc3": MaskedLinear(8, 3, generator=gen)})
    return export(_prune(model, 0.5, 1), (1, 4, 4), preprocessing=preprocessing)


def conv_network(preprocessing=STATS):
    """A small LeNet-5-like network (padded conv, pooling, conv, flatten, linear), exported."""
    gen = np.random.default_rng(2)
    model = nn.Sequential({"conv1": MaskedConv2d(1, 3, 3, padding=1, generator=gen), "pool1": nn.MaxPool2d(2),
                           "relu1": nn.ReLU(), "conv2": MaskedConv2d(3, 4, 2, generator=gen), "relu2": nn.ReLU(),
                           "flatten": nn.Flatten(), "fc": MaskedLinear(36, 3, generator=gen)})
    return export(_prune(model, 0.6, 3), (1, 8, 8), preprocessing=preprocessing)


def residual_network(preprocessing=STATS):
    """A small ResNet: stem conv + batch norm, blocks with shortcut B, A and the identity, pooling, linear."""
    gen = np.random.default_rng(4)
    conv = functools.partial(MaskedConv2d, generator=gen)
    model = nn.Sequential({"conv1": conv(1, 4, 3, padding=1), "bn1": nn.BatchNorm2d(4), "relu": nn.ReLU(),
                           "block1": models.BasicBlock(4, 6, 2, "B", conv),
                           "block2": models.BasicBlock(6, 8, 2, "A", conv),
                           "block3": models.BasicBlock(8, 8, 1, "A", conv), "pool": nn.GlobalAvgPool2d(),
                           "fc": MaskedLinear(8, 3, generator=gen)})
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean[...] = gen.normal(0, 0.1, module.num_features)
            module.running_var[...] = gen.uniform(0.5, 1.5, module.num_features)
            module.weight.data[...] = gen.uniform(0.5, 1.5, module.num_features)
    for module in model.modules():
        if hasattr(module, "score"):
            module.score.data[...] = np.where(gen.random(module.score.shape) < 0.5, 1.0, -1.0)
    return export(model.eval(), (1, 7, 7), preprocessing=preprocessing)


def _kinds(layers):
    """The layers' kinds, a residual block's as (kind, body kinds, shortcut kinds)."""
    return [(layer.kind, _kinds(layer.body), _kinds(layer.shortcut)) if layer.kind == "residual" else layer.kind
            for layer in layers]


@pytest.fixture(scope="module")
def network():
    model = models.lenet_300_100(in_features=64, generator=np.random.default_rng(0))
    gen = np.random.default_rng(1)
    for layer in (model.fc1, model.fc2, model.fc3):
        layer.score.data[...] = np.where(gen.random(layer.score.shape) < 0.1, 1.0, -1.0)
    return export(model.eval(), (1, 8, 8))


def _members(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _rewrite(src, dst, edit):
    """Copy the archive `src` to `dst` with each member's bytes passed through edit(name, data) (valid CRCs)."""
    members = {name: edit(name, data) for name, data in _members(src).items()}
    Path(dst).write_bytes(mutations.make_zip({k: v for k, v in members.items() if v is not None}))


def _edit_manifest(src, dst, change):
    def edit(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        change(manifest)
        return json.dumps(manifest).encode()

    _rewrite(src, dst, edit)


def _layer(manifest, name):
    return next(entry for entry in manifest["layers"] if entry["name"] == name)


def _run(network, n=3, seed=4):
    x = np.random.default_rng(seed).standard_normal((n, *network.shapes()[0]))
    return Runtime(network)(x)


def test_round_trip_is_exact(tmp_path, network):
    save(network, tmp_path / "n.npz")
    back = load(tmp_path / "n.npz")
    x = np.random.default_rng(2).standard_normal((5, 1, 8, 8))
    assert np.array_equal(Runtime(back)(x), Runtime(network)(x))
    assert back.removed_units == network.removed_units and back.input_shape == (1, 8, 8)
    assert [layer.kind for layer in back.layers] == [layer.kind for layer in network.layers]
    assert back.preprocessing is None


@pytest.mark.parametrize("build", [chain_network, conv_network])
def test_preprocessing_round_trips(tmp_path, build):
    network = build()
    save(network, tmp_path / "n.npz")
    back = load(tmp_path / "n.npz")
    assert back.preprocessing == STATS
    assert json.loads(_members(tmp_path / "n.npz")["manifest.json"])["version"] == 2  # what version-2 readers read
    np.testing.assert_array_equal(_run(back), _run(network))


def test_a_residual_network_round_trips(tmp_path):
    network = residual_network()
    save(network, tmp_path / "n.npz")
    back = load(tmp_path / "n.npz")
    assert json.loads(_members(tmp_path / "n.npz")["manifest.json"])["version"] == FORMAT_VERSION == 3
    assert _kinds(back.layers) == _kinds(network.layers)
    assert ("residual", ["conv2d", "relu", "conv2d"], ["subsample_pad"]) in _kinds(back.layers)
    assert ("residual", ["conv2d", "relu", "conv2d"], []) in _kinds(back.layers)
    assert [layer.name for layer in back.weighted()] == [layer.name for layer in network.weighted()]
    assert back.nnz == network.nnz and back.removed_units == network.removed_units
    for backend in ("dense", "sclref"):
        x = np.random.default_rng(6).standard_normal((3, 1, 7, 7))
        np.testing.assert_array_equal(Runtime(back, backend=backend)(x), Runtime(network, backend=backend)(x))
    save(back, tmp_path / "again.npz")
    assert (tmp_path / "again.npz").read_bytes() == (tmp_path / "n.npz").read_bytes()


@pytest.mark.parametrize("build", [chain_network, conv_network])
def test_a_plain_chain_is_written_as_version_2_and_reads_as_version_2_or_3(tmp_path, build):
    network = build()
    save(network, tmp_path / "v2.npz")
    assert json.loads(_members(tmp_path / "v2.npz")["manifest.json"])["version"] == 2
    _edit_manifest(tmp_path / "v2.npz", tmp_path / "v3.npz", lambda m: m.update(version=3))
    for name in ("v2.npz", "v3.npz"):
        back = load(tmp_path / name)
        assert back.preprocessing == STATS
        np.testing.assert_array_equal(_run(back), _run(network))


def test_a_version_2_file_cannot_hold_a_residual_block(tmp_path):
    save(residual_network(), tmp_path / "n.npz")
    _edit_manifest(tmp_path / "n.npz", tmp_path / "v2.npz", lambda m: m.update(version=2))
    with pytest.raises(FormatError, match="layer 'block1': kind 'residual' needs format version 3, the file says 2"):
        load(tmp_path / "v2.npz")


def test_the_same_network_gives_the_same_bytes(tmp_path, monkeypatch):
    network = conv_network()
    save(network, tmp_path / "a.npz")
    later = time.time() + 3 * 86400  # zip stamps members with the time of writing, to 2 s
    monkeypatch.setattr(time, "time", lambda: later)
    save(conv_network(), tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        infos = zf.infolist()
    assert infos[0].filename == "manifest.json"
    assert {(i.date_time, i.compress_type, i.external_attr) for i in infos} == {
        ((1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED, 0o100644 << 16)}


def test_version_1_files_still_read_without_preprocessing(tmp_path):
    network = chain_network()
    save(network, tmp_path / "n.npz")

    def to_version_1(manifest):
        manifest["version"] = 1
        del manifest["preprocessing"]

    _edit_manifest(tmp_path / "n.npz", tmp_path / "v1.npz", to_version_1)
    back = load(tmp_path / "v1.npz")
    assert back.preprocessing is None
    np.testing.assert_array_equal(_run(back), _run(network))


@pytest.mark.parametrize("build", [conv_network, residual_network])
def test_the_docs_forward_runs_convolutions_and_residual_blocks(tmp_path, build):
    network = build()
    save(network, tmp_path / "n.npz")
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1), namespace)
    manifest, layers = namespace["load_sparse_network"](tmp_path / "n.npz")
    x = np.random.default_rng(8).standard_normal((3, *manifest["input_shape"]))
    np.testing.assert_allclose(namespace["forward"](layers, x), Runtime(network)(x), rtol=1e-12, atol=1e-12)


def test_plain_numpy_scipy_loader_from_the_docs(tmp_path, network):
    save(network, tmp_path / "n.npz")
    snippet = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8))
    np.save(tmp_path / "x.npy", x)
    code = snippet + (f"\nmanifest, layers = load_sparse_network({str(tmp_path / 'n.npz')!r})\n"
                      f"y = forward(layers, np.load({str(tmp_path / 'x.npy')!r}))\n"
                      f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
                      "import sys\nassert not any(m.startswith('sclref') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), Runtime(network)(x), rtol=1e-12, atol=1e-12)


def test_docs_standardize_raw_pixels_with_the_manifest_values(tmp_path):
    save(chain_network(), tmp_path / "n.npz")
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1), namespace)
    manifest, layers = namespace["load_sparse_network"](tmp_path / "n.npz")
    raw = np.random.default_rng(5).integers(0, 256, (4, 1, 4, 4)).astype(np.float64)
    x = (raw / STATS["pixel_max"] - STATS["mean"]) / STATS["std"]
    np.testing.assert_allclose(namespace["standardize"](manifest, raw), x, rtol=1e-15)
    np.testing.assert_allclose(namespace["forward"](layers, namespace["standardize"](manifest, raw)),
                               Runtime(chain_network())(x), rtol=1e-12, atol=1e-12)


def test_unknown_version_is_rejected(tmp_path, network):
    save(network, tmp_path / "n.npz")
    _edit_manifest(tmp_path / "n.npz", tmp_path / "v.npz", lambda m: m.update(version=99))
    with pytest.raises(FormatError, match="version 99 is not supported.*newer"):
        load(tmp_path / "v.npz")
    _edit_manifest(tmp_path / "n.npz", tmp_path / "b.npz", lambda m: m.update(version=True))
    with pytest.raises(FormatError, match="version True is not supported"):
        load(tmp_path / "b.npz")


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
        arr = np.load(io.BytesIO(data))
        arr[[start, start + 1]] = arr[[start + 1, start]]
        return mutations.npy_bytes(arr)

    _rewrite(tmp_path / "n.npz", tmp_path / "u.npz", swap)
    with pytest.raises(FormatError, match="not sorted and unique"):
        load(tmp_path / "u.npz")


# Manifest edits a reader must refuse, with what the message must say. Each was read
# without complaint (or with a RecursionError) before the reader bounded and checked it.
MANIFEST_PROBES = {
    "padding 100000": (lambda m: _layer(m, "conv1").update(padding=[100000, 100000]),
                       FormatError, r"layer 'conv1': padding must be .*\[0, 4,096\], got 100000"),
    "huge kernel": (lambda m: _layer(m, "conv2").update(kernel_size=[70000, 2]), FormatError,
                    r"layer 'conv2': kernel_size .* got 70000"),
    "huge stride": (lambda m: _layer(m, "pool1").update(stride=[2, 2**40]), FormatError,
                    r"layer 'pool1': stride .* got 1099511627776"),
    "huge in_channels": (lambda m: _layer(m, "conv2").update(in_channels=10**9), FormatError,
                         r"layer 'conv2': in_channels must be an integer in \[0, 16,777,216\], got 1000000000"),
    "huge out_features": (lambda m: _layer(m, "fc").update(out_features=2**31), FormatError,
                          r"layer 'fc': out_features .* got 2147483648"),
    "input_shape with a huge image": (lambda m: m.update(input_shape=[1, 2**24, 2**24]), LimitError,
                                      r"input_shape \[1, 16777216, 16777216\]: one input sample"),
    "input_shape of 2 dimensions": (lambda m: m.update(input_shape=[8, 8]), FormatError,
                                    r"input_shape must be null or a list of 1 or 3 integers"),
    "input_shape that does not fit": (lambda m: m.update(input_shape=[2, 8, 8]), FormatError,
                                      r"layer 'conv1' takes 1 channels, gets 2"),
    "no layers": (lambda m: m.update(layers=[]), FormatError, r"layers must be a non-empty list"),
    "only an activation": (lambda m: m.update(layers=[{"name": "r", "kind": "relu"}]), FormatError,
                           r"no linear or conv2d layer"),
    "two layers of one name": (lambda m: _layer(m, "relu2").update(name="relu1"), FormatError,
                               r"two layers are named 'relu1'"),
    "nesting 100,000 deep": (lambda m: m.update(source="__DEEP__"), FormatError,
                             r"nests 100,00\d levels deep, more than the format allows \(32\)"),
    "a manifest of 17 MiB": (lambda m: m.update(source={"padding": "x" * (17 << 20)}), FormatError,
                             r"manifest.json declares 17,8\d\d,\d\d\d bytes, more than the format allows"),
    "NaN preprocessing": (lambda m: m["preprocessing"].update(std=float("nan")), FormatError,
                          r"std must be finite, got nan"),
    "no preprocessing field in version 2": (lambda m: m.pop("preprocessing"), FormatError,
                                            r"no preprocessing field"),
    "nnz that lies": (lambda m: m.update(nnz=m["nnz"] + 1), FormatError, r"the manifest says nnz="),
}


def _nest(manifest, depth):
    """Wrap block3 in `depth` - 1 more residual blocks (identity shortcuts), nesting it `depth` deep."""
    i = next(i for i, entry in enumerate(manifest["layers"]) if entry["name"] == "block3")
    entry = manifest["layers"][i]
    for level in range(depth - 1):
        entry = {"name": f"wrap{level}", "kind": "residual", "body": [entry], "shortcut": []}
    manifest["layers"][i] = entry


def _block(m, name):
    return _layer(m, name)


# Residual blocks a reader must refuse (edits of `residual_network`'s manifest).
RESIDUAL_PROBES = {
    "channels that do not match": (lambda m: _block(m, "block2")["shortcut"][0].update(channels=[2, 1]),
                                   FormatError, r"residual block 'block2': its body gives \[8, 2, 2\] per sample, its "
                                                r"shortcut \[9, 2, 2\]; the two must match"),
    "a stride that does not match": (lambda m: _block(m, "block2")["shortcut"][0].update(stride=[1, 1]),
                                     FormatError, r"residual block 'block2': .* its shortcut \[8, 4, 4\]"),
    "an unknown shortcut": (lambda m: _block(m, "block1").update(shortcut="B"), FormatError,
                            r"layer 'block1': shortcut must be a list of layers, got 'B'"),
    "an unknown shortcut layer": (lambda m: _block(m, "block1").update(shortcut=[{"name": "s", "kind": "project"}]),
                                  FormatError, r"layer 's': unknown kind 'project'"),
    "no body": (lambda m: _block(m, "block3").update(body=[]), FormatError,
                r"layer 'block3': a residual block's body must be a non-empty list"),
    "a body that is not a list": (lambda m: _block(m, "block3").update(body={"a": 1}), FormatError,
                                  r"layer 'block3': body must be a list of layers, got \{'a': 1\}"),
    "blocks nested 5 deep": (lambda m: _nest(m, 5), FormatError,
                             r"layer 'block3': residual blocks nest 5 deep, more than the format allows \(4\)"),
    "a name used inside and outside a block": (lambda m: _block(m, "block3")["body"][0].update(name="fc"),
                                               FormatError, r"two layers are named 'fc'"),
    "negative padding channels": (lambda m: _block(m, "block2")["shortcut"][0].update(channels=[-1, 3]),
                                  FormatError, r"layer 'block2.downsample': channels must be .* got -1"),
    "2,000 layers in blocks": (lambda m: _block(m, "block3").update(body=[{"name": f"r{i}", "kind": "relu"}
                                                                          for i in range(2000)]),
                               FormatError, r"more than the 1,024 layers the format allows"),
}


@pytest.mark.parametrize("probe", list(RESIDUAL_PROBES))
def test_bad_residual_blocks_are_refused(tmp_path, probe):
    change, error, message = RESIDUAL_PROBES[probe]
    save(residual_network(), tmp_path / "n.npz")
    _edit_manifest(tmp_path / "n.npz", tmp_path / "bad.npz", change)
    with pytest.raises(error, match=message):
        load(tmp_path / "bad.npz")


def test_blocks_nested_4_deep_are_allowed(tmp_path):
    network = residual_network()
    save(network, tmp_path / "n.npz")
    _edit_manifest(tmp_path / "n.npz", tmp_path / "deep.npz", lambda m: _nest(m, 4))
    back = load(tmp_path / "deep.npz")
    x = np.random.default_rng(7).standard_normal((2, 1, 7, 7))
    # wrapping adds the block's input three more times: a different network, but one that runs
    assert np.isfinite(Runtime(back)(x)).all() and not np.allclose(Runtime(back)(x), Runtime(network)(x))


@pytest.mark.parametrize("probe", list(MANIFEST_PROBES))
def test_out_of_bounds_manifests_are_refused_naming_the_value(tmp_path, probe):
    change, error, message = MANIFEST_PROBES[probe]
    save(conv_network(), tmp_path / "n.npz")

    def edit(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        change(manifest)
        text = json.dumps(manifest)
        return text.replace('"__DEEP__"', "[" * mutations.DEEP + "]" * mutations.DEEP).encode()

    _rewrite(tmp_path / "n.npz", tmp_path / "bad.npz", edit)
    with pytest.raises(error, match=message) as info:
        load(tmp_path / "bad.npz")
    assert str(tmp_path / "bad.npz") in str(info.value)


@pytest.mark.parametrize("alpha, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"),
                                          ("0.1", "'0.1'"), (10**400, "1000000000")])
def test_a_leaky_relu_slope_that_is_not_a_finite_number_is_refused(tmp_path, alpha, shown):
    save(chain_network(), tmp_path / "n.npz")
    _edit_manifest(tmp_path / "n.npz", tmp_path / "bad.npz", lambda m: _layer(m, "act1").update(alpha=alpha))
    with pytest.raises(FormatError, match=rf"layer 'act1': the leaky_relu slope alpha must be a finite number, "
                                          rf"got {re.escape(shown)}"):
        load(tmp_path / "bad.npz")


def _replace_array(src, dst, member, change):
    def edit(name, data):
        if name != member:
            return data
        return mutations.npy_bytes(change(np.load(io.BytesIO(data))))

    _rewrite(src, dst, edit)


@pytest.mark.parametrize("field, value", [("data", np.nan), ("data", -np.inf), ("bias", np.inf), ("bias", np.nan)])
def test_non_finite_weights_and_biases_are_refused_naming_the_layer(tmp_path, field, value):
    network = chain_network()
    save(network, tmp_path / "n.npz")
    i = next(i for i, layer in enumerate(network.layers) if layer.name == "fc2")

    def poison(a):
        a[1] = value
        return a

    _replace_array(tmp_path / "n.npz", tmp_path / "bad.npz", f"layer{i}.{field}.npy", poison)
    label = "weight data" if field == "data" else "bias"
    with pytest.raises(FormatError, match=rf"layer 'fc2': {label} holds {value} at index 1"):
        load(tmp_path / "bad.npz")


def test_weights_whose_outputs_could_overflow_are_refused(tmp_path):
    network = chain_network()
    save(network, tmp_path / "n.npz")
    i = next(i for i, layer in enumerate(network.layers) if layer.name == "fc1")
    _replace_array(tmp_path / "n.npz", tmp_path / "big.npz", f"layer{i}.data.npy", lambda a: a * 1e300)
    with pytest.raises(FormatError, match=r"layer 'fc1': its weights and bias let its outputs reach .* float64"):
        load(tmp_path / "big.npz")


def test_an_array_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    network = chain_network()
    save(network, tmp_path / "n.npz")
    i = next(i for i, layer in enumerate(network.layers) if layer.name == "fc1")
    _rewrite(tmp_path / "n.npz", tmp_path / "claim.npz",
             lambda name, data: mutations.npy_claiming((2**62,)) if name == f"layer{i}.data.npy" else data)
    with pytest.raises(FormatError, match=r"claims 4,611,686,018,427,387,904 values of float64 but holds 16 bytes"):
        load(tmp_path / "claim.npz")


def test_a_pickled_array_is_refused_without_unpickling(tmp_path):
    save(chain_network(), tmp_path / "n.npz")
    pickled = io.BytesIO()
    np.lib.format.write_array(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _rewrite(tmp_path / "n.npz", tmp_path / "p.npz",
             lambda name, data: pickled.getvalue() if name == "layer1.bias.npy" else data)
    with pytest.raises(FormatError, match="holds object"):
        load(tmp_path / "p.npz")


def test_padding_within_the_bounds_is_checked_against_memory(tmp_path, monkeypatch):
    save(conv_network(), tmp_path / "n.npz")
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    _edit_manifest(tmp_path / "n.npz", tmp_path / "wide.npz",
                   lambda m: _layer(m, "conv1").update(padding=[4096, 4096]))
    with pytest.raises(LimitError, match=r"layer 'conv1' \(padding \[4096, 4096\]\): one zero-padded input sample"):
        load(tmp_path / "wide.npz")


def test_a_network_the_reader_would_refuse_is_not_written(tmp_path):
    network = chain_network()
    network.layers[1].bias[0] = np.nan
    with pytest.raises(FormatError, match=r"cannot write .*layer 'fc1': bias holds nan at index 0"):
        save(network, tmp_path / "n.npz")
    assert not list(tmp_path.iterdir())
    network = chain_network()
    network.layers = []
    with pytest.raises(FormatError, match="the network has no layers"):
        save(network, tmp_path / "n.npz")
    assert not list(tmp_path.iterdir())


# ---- fuzzing: damaged files either load to a network that runs to finite outputs, or are refused.


def _int_paths(node, prefix=()):
    """The paths (keys and indices) of every integer in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _int_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _int_paths(v, prefix + (i,))
    elif isinstance(node, int) and not isinstance(node, bool):
        yield prefix


@st.composite
def inflated_within_bounds(draw, doc):
    """The manifest `doc` as text with one integer (a size, a window, a dimension) set to a large value the
    format's bounds allow, so the damage reaches the checks of fit and memory behind them."""
    path = draw(st.sampled_from(list(_int_paths(doc))))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = draw(st.sampled_from([0, 2**12, 2**16, 2**20, 2**24]))
    return json.dumps(doc)


@st.composite
def manifest_mutations(draw, data: bytes):
    """The archive `data` with its manifest's JSON retyped, inflated, cut, deleted from or deepened."""
    members = mutations.zip_members(data)
    doc = json.loads(members["manifest.json"])
    text = st.one_of(mutations.json_text_mutations(doc), inflated_within_bounds(doc))
    members["manifest.json"] = draw(text).encode()
    return mutations.make_zip(members)


@st.composite
def array_member_mutations(draw, data: bytes):
    """The archive `data` with one ``.npy`` member replaced by another array (`mutations.array_mutations`)."""
    members = mutations.zip_members(data)
    name = draw(st.sampled_from(sorted(n for n in members if n.endswith(".npy"))))
    members[name] = draw(mutations.array_mutations(np.load(io.BytesIO(members[name]))))
    return mutations.make_zip(members)


def sparse_file_mutations(data: bytes):
    """Damage anywhere in the file, with the manifest and the arrays each getting a share of their own."""
    return st.one_of(mutations.file_mutations(data), manifest_mutations(data), array_member_mutations(data))


class _Fuzz:
    """The directory of the mutated file and the valid files' bytes (a short repr for failure reports)."""

    def __init__(self, out):
        self.out, self.valid = out, {}

    def __repr__(self):
        return f"_Fuzz({self.out})"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """The valid files to mutate, under a small allocation limit."""
    fuzz = _Fuzz(tmp_path_factory.mktemp("fuzz"))
    for build in (chain_network, conv_network, residual_network):
        save(build(), fuzz.out / "valid.npz")
        fuzz.valid[build.__name__] = (fuzz.out / "valid.npz").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        # Small: an inflated size reaches LimitError at once; the valid networks need a few KiB.
        mp.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
        yield fuzz


FUZZ_EXAMPLES = 60 if kernels.JIT_DISABLED else 400


def _load_or_refuse(path) -> None:
    try:
        network = load(path)
    except InputError as err:
        assert str(err)
        event(f"refused: {type(err).__name__}")
        return
    out = _run(network, n=2)
    assert np.isfinite(out).all()
    event("loaded and ran")


@pytest.mark.parametrize("base", ["chain_network", "conv_network", "residual_network"])
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_load_and_run_or_are_refused(fuzz, base, data):
    path = fuzz.out / "damaged.npz"
    path.write_bytes(data.draw(sparse_file_mutations(fuzz.valid[base]), label="damaged file"))
    _load_or_refuse(path)
