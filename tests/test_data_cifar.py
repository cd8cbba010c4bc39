"""Binary CIFAR-10 and CIFAR-100: small files written here, read back, refused when broken, fuzzed."""

import pickle
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sclref.data import MNIST_FILES, DatasetError, load, load_cifar_dir
from sclref.data.cifar import CIFAR10_FILES, CIFAR100_FILES, is_cifar_dir
from sclref.errors import InputError, LimitError
from tests.mutations import byte_mutations


def records(labels, gen, pixels=None) -> tuple[bytes, np.ndarray]:
    """Records of `labels` (rows of 1 or 2 label bytes) and random pixels; returns the bytes and the images."""
    labels = np.asarray(labels, dtype=np.uint8).reshape(len(labels), -1)
    if pixels is None:
        pixels = gen.integers(0, 256, (len(labels), 3, 32, 32)).astype(np.uint8)
    return np.concatenate([labels, pixels.reshape(len(labels), -1)], axis=1).tobytes(), pixels


def write_cifar10(directory, per_batch=3, n_test=2, seed=0):
    """Five train batches and a test batch; returns the raw train and test images and labels."""
    gen = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {"train": ([], []), "test": ([], [])}
    for split, names in CIFAR10_FILES.items():
        for name in names:
            labels = gen.integers(0, 10, per_batch if split == "train" else n_test)
            content, pixels = records(labels, gen)
            (directory / name).write_bytes(content)
            raw[split][0].append(pixels)
            raw[split][1].append(labels)
    return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in raw.items()}


def write_cifar100(directory, n_train=6, n_test=3, seed=0):
    gen = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.stack([gen.integers(0, 20, n), gen.integers(0, 100, n)], axis=1)
        content, pixels = records(labels, gen)
        (directory / CIFAR100_FILES[split][0]).write_bytes(content)
        raw[split] = (pixels, labels)
    return raw


def test_cifar10_loads_as_standardized_images_in_record_order(tmp_path):
    raw = write_cifar10(tmp_path / "cifar-10-batches-bin")
    ds = load(tmp_path / "cifar-10-batches-bin")
    assert ds.name == "cifar-10-batches-bin"
    assert ds.shapes == {"x_train": (15, 3, 32, 32), "y_train": (15,), "x_test": (2, 3, 32, 32), "y_test": (2,)}
    np.testing.assert_array_equal(ds.y_train, raw["train"][1])
    np.testing.assert_array_equal(ds.y_test, raw["test"][1])
    train = raw["train"][0] / 255
    p = ds.preprocessing
    assert p == pytest.approx({"pixel_max": 255.0, "mean": train.mean(), "std": train.std()}, rel=1e-12)
    np.testing.assert_allclose(ds.x_test, (raw["test"][0] / 255 - p["mean"]) / p["std"], rtol=1e-12, atol=1e-12)


def test_the_channels_are_red_green_blue_planes(tmp_path):
    gen = np.random.default_rng(1)
    write_cifar10(tmp_path)
    pixels = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    pixels[0, 1, 4, 7] = 255  # one green pixel, row 4, column 7
    (tmp_path / "test_batch.bin").write_bytes(records([2], gen, pixels)[0])
    ds = load_cifar_dir(tmp_path)
    assert np.unravel_index(np.argmax(ds.x_test[0]), (3, 32, 32)) == (1, 4, 7)


def test_cifar100_has_fine_or_coarse_labels(tmp_path):
    raw = write_cifar100(tmp_path)
    np.testing.assert_array_equal(load(tmp_path).y_train, raw["train"][1][:, 1])
    coarse = load_cifar_dir(tmp_path, label="coarse", dtype=np.float32)
    np.testing.assert_array_equal(coarse.y_test, raw["test"][1][:, 0])
    assert coarse.dtype == np.float32 and coarse.in_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="'fine' or 'coarse'"):
        load_cifar_dir(tmp_path, label="medium")


def test_mnist_files_win_over_cifar_files(tmp_path):
    write_cifar10(tmp_path)
    assert is_cifar_dir(tmp_path) == "cifar10"
    (tmp_path / MNIST_FILES["train images"]).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing MNIST-format files"):
        load(tmp_path)


def test_a_file_of_partial_records_is_refused(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"data_batch_3.bin: 9,214 bytes is not a whole number of 3,073-byte"):
        load(tmp_path)


@pytest.mark.parametrize("kind, at, value, phrase", [
    ("cifar10", 0, 10, r"data_batch_2.bin: record 1: label 10 is outside 0..9"),
    ("cifar100", 1, 100, r"train.bin: record 1: label 100 is outside 0..99 \(cifar100 fine labels\)"),
])
def test_a_label_out_of_range_is_named_with_its_file_and_record(tmp_path, kind, at, value, phrase):
    if kind == "cifar10":
        write_cifar10(tmp_path)
        path = tmp_path / "data_batch_2.bin"
    else:
        write_cifar100(tmp_path)
        path = tmp_path / "train.bin"
    content = bytearray(path.read_bytes())
    record = 3072 + (1 if kind == "cifar10" else 2)
    content[record + at] = value
    path.write_bytes(bytes(content))
    with pytest.raises(DatasetError, match=phrase):
        load(tmp_path)


def test_a_coarse_label_of_twenty_is_refused(tmp_path):
    write_cifar100(tmp_path)
    content = bytearray((tmp_path / "test.bin").read_bytes())
    content[0] = 20
    (tmp_path / "test.bin").write_bytes(bytes(content))
    assert load_cifar_dir(tmp_path).num_classes <= 100  # the fine labels are still fine
    with pytest.raises(DatasetError, match=r"test.bin: record 0: label 20 is outside 0..19"):
        load_cifar_dir(tmp_path, label="coarse")


def test_a_missing_batch_is_listed(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing CIFAR files: data_batch_4.bin"):
        load(tmp_path)


def test_an_empty_train_split_is_refused(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match="the train set is empty"):
        load(tmp_path)


def test_the_size_is_checked_before_reading(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(40_000))
    with pytest.raises(LimitError, match=r"CIFAR records of .*data_batch_1.bin.*\(15, 3073\)"):
        load(tmp_path)


class _Marker:
    """Unpickling this writes a file: proof that a reader ran a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_python_pickle_version_is_never_unpickled(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "unpickled"
    content = pickle.dumps({"data": _Marker(str(marker))}, protocol=2)
    # Padded to whole records, so only the labels (the pickle's bytes) can give it away.
    (tmp_path / "data_batch_1.bin").write_bytes(content + bytes(-len(content) % 3073))
    with pytest.raises(DatasetError, match=r"data_batch_1.bin: record 0: label 128"):
        load(tmp_path)
    assert not marker.exists()


# --- fuzzing ------------------------------------------------------------------------------

@st.composite
def cifar_mutations(draw, content: bytes, label_bytes: int):
    """A CIFAR file damaged at the byte level, or with one label byte set to any value."""
    if draw(st.booleans()) and content:
        record = label_bytes + 3072
        data = bytearray(content)
        index = draw(st.integers(0, len(data) // record - 1))
        data[index * record + draw(st.integers(0, label_bytes - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return draw(byte_mutations(content))


def test_the_cifar_reader_loads_or_refuses_every_mutated_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(64 << 20))
    write_cifar10(tmp_path / "c10", per_batch=2, n_test=2)
    write_cifar100(tmp_path / "c100", n_train=3, n_test=2)
    originals = {(kind, p.name): p.read_bytes() for kind in ("c10", "c100") for p in (tmp_path / kind).iterdir()}
    seen = Counter()

    @settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(key=st.sampled_from(sorted(originals)), data=st.data())
    def run(key, data):
        kind, name = key
        for (k, n), content in originals.items():
            (tmp_path / k / n).write_bytes(content)
        damaged = data.draw(cifar_mutations(originals[key], 1 if kind == "c10" else 2))
        (tmp_path / kind / name).write_bytes(damaged)
        try:
            ds = load(tmp_path / kind)
        except InputError as err:
            assert str(err).strip()
            seen["refused"] += 1
            seen[type(err).__name__] += 1
        else:
            assert ds.in_shape == (3, 32, 32) and ds.num_classes <= 100
            seen["loaded"] += 1
        seen[kind] += 1

    run()
    print(f"\nload_cifar_dir: {seen['loaded'] + seen['refused']} mutated files, {dict(sorted(seen.items()))}")
    assert seen["loaded"] and seen["refused"]
