"""The data layer: IDX files, dataset loaders and their checks, standardization, mini-batches."""

import gzip
import io
import os
import shutil
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sclref import data, rng
from sclref.data import (
    MAX_CLASSES,
    MNIST_FILES,
    Dataset,
    DatasetError,
    IDXError,
    batches,
    check_preprocessing,
    load,
    load_digits,
    load_mnist_dir,
    load_npz,
    preprocess,
    read_idx,
    save_npz,
    subset,
    write_idx,
)
from sclref.data import datasets as datasets_module
from sclref.errors import InputError, LimitError
from tests.mutations import make_zip, npy_bytes, npy_claiming, zip_members

FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_DTYPES = ["u1", "i1", "i2", "i4", "f4", "f8"]


@st.composite
def idx_arrays(draw):
    """Arrays of every IDX dtype, in either byte order, with 1 to 5 dimensions (sides may be 0)."""
    kind = draw(st.sampled_from(IDX_DTYPES))
    order = draw(st.sampled_from("<>")) if kind[1] != "1" else "|"
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=4))
    return draw(hnp.arrays(np.dtype(order + kind), shape))


def idx_bytes(code: int, shape, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes() + payload


def assert_idx_error(path, *phrases):
    with pytest.raises(IDXError) as info:
        read_idx(path)
    message = str(info.value)
    assert Path(path).name in message
    for phrase in phrases:
        assert phrase in message
    return message


# --- IDX ----------------------------------------------------------------------------------

@settings(deadline=None)
@given(array=idx_arrays(), compressed=st.booleans())
def test_write_then_read_gives_the_same_values_in_native_order(array, compressed):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("a.idx.gz" if compressed else "a.idx")
        write_idx(path, array)
        with open(path, "rb") as f:
            assert (f.read(2) == b"\x1f\x8b") == compressed
        back = read_idx(path)
        assert os.listdir(tmp) == [path.name]
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.dtype.isnative
    assert back.flags.writeable and back.flags.c_contiguous
    # Compare bytes in one byte order: NaN payloads and -0.0 must survive too.
    assert back.tobytes() == array.astype(back.dtype).tobytes()


def test_the_file_layout_is_the_idx_specification(tmp_path):
    path = tmp_path / "a"
    write_idx(path, np.array([[1, -2, 3]], dtype=np.int16))
    assert path.read_bytes() == idx_bytes(0x0B, (1, 3), b"\x00\x01\xff\xfe\x00\x03")


def test_compression_is_detected_from_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array)
    (tmp_path / "a.gz").rename(tmp_path / "compressed-without-suffix")
    (tmp_path / "b").rename(tmp_path / "raw-with-suffix.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "compressed-without-suffix"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), array)


def test_gzip_output_is_the_same_bytes_every_time(tmp_path):
    array = np.arange(100, dtype=np.float32)
    write_idx(tmp_path / "a.gz", array)
    first = (tmp_path / "a.gz").read_bytes()
    write_idx(tmp_path / "a.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == first


@pytest.mark.parametrize("name, content, phrases", [
    ("bad-magic", b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x07", ["bad magic number", "first two bytes"]),
    ("bad-type", idx_bytes(0x0A, (1,), b"\x07"), ["unknown type code 0x0A"]),
    ("zero-dims", b"\x00\x00\x08\x00", ["bad number of dimensions 0"]),
    ("short-magic", b"\x00\x00\x08", ["truncated header"]),
    ("short-dims", b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", ["truncated header", "3 dimensions need 16 bytes"]),
    ("truncated", idx_bytes(0x0C, (10,), bytes(36)), ["truncated: expected 40 bytes of data, found 36"]),
    # A gzip stream is read one byte past the data only, so its message cannot count them.
    ("trailing", idx_bytes(0x08, (2, 2), bytes(7)), ["trailing bytes after the 4 bytes of data"]),
    ("empty", b"", ["truncated header"]),
])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_malformed_file_is_an_idx_error_naming_file_and_problem(tmp_path, name, content, phrases, compressed):
    path = tmp_path / f"{name}-idx1-ubyte"
    path.write_bytes(gzip.compress(content) if compressed else content)
    assert_idx_error(path, *phrases)


def test_idx_error_is_a_value_error(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00\x00\x42\x01")
    with pytest.raises(ValueError, match="unknown type code 0x42"):
        read_idx(path)


def test_truncated_gzip_is_an_idx_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 10, 10000).astype(np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    assert_idx_error(path, "corrupt gzip data")


@pytest.mark.parametrize("where", ["deflate stream", "crc"])
def test_corrupt_gzip_is_an_idx_error(tmp_path, where):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, (50, 8, 8)).astype(np.uint8))
    content = bytearray(path.read_bytes())
    at = len(content) // 2 if where == "deflate stream" else len(content) - 8
    content[at:at + 4] = bytes(b ^ 0xFF for b in content[at:at + 4])
    path.write_bytes(bytes(content))
    assert_idx_error(path, "corrupt gzip data")


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing-here")


@pytest.mark.parametrize("array, error, phrase", [
    (np.zeros(3, dtype=np.int64), TypeError, "int64"),
    (np.zeros(3, dtype=bool), TypeError, "bool"),
    (np.zeros(3, dtype=np.complex128), TypeError, "complex128"),
    (np.float64(1.0), ValueError, "1 to 64 dimensions"),
])
def test_write_refuses_arrays_idx_cannot_hold(tmp_path, array, error, phrase):
    with pytest.raises(error, match=phrase):
        write_idx(tmp_path / "a", array)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.gz"
    write_idx(path, np.arange(3, dtype=np.uint8))
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_idx(path, np.arange(5, dtype=np.uint8))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.gz"]


# --- MNIST-format directories -------------------------------------------------------------

def make_mnist_dir(directory, n_train=30, n_test=12, size=(5, 4), classes=4, compress=(True, False, True, False),
                   seed=0):
    """Four MNIST-format files of random pixels and labels, some gzip-compressed; returns the raw arrays."""
    gen = np.random.default_rng(seed)
    raw = {
        "train images": gen.integers(0, 256, (n_train, *size)).astype(np.uint8),
        "train labels": (np.arange(n_train) % classes).astype(np.uint8),
        # Brighter than the train images, so train and test statistics differ clearly.
        "test images": gen.integers(100, 256, (n_test, *size)).astype(np.uint8),
        "test labels": (np.arange(n_test) % classes).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for (role, stem), gz in zip(MNIST_FILES.items(), compress, strict=True):
        write_idx(directory / (stem + (".gz" if gz else "")), raw[role])
    return raw


def standardized(raw_train, raw, pixel_max):
    mean, std = np.mean(raw_train / pixel_max), np.std(raw_train / pixel_max)
    return (raw / pixel_max - mean) / std


def test_an_mnist_directory_loads_as_standardized_nchw(tmp_path):
    raw = make_mnist_dir(tmp_path / "fake-mnist")
    ds = load_mnist_dir(tmp_path / "fake-mnist")
    assert ds.name == "fake-mnist"
    assert ds.shapes == {"x_train": (30, 1, 5, 4), "y_train": (30,), "x_test": (12, 1, 5, 4), "y_test": (12,)}
    assert ds.in_shape == (1, 5, 4) and ds.num_classes == 4
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, raw["train labels"])
    np.testing.assert_array_equal(ds.y_test, raw["test labels"])
    np.testing.assert_allclose(ds.x_train[:, 0], standardized(raw["train images"], raw["train images"], 255),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.x_test[:, 0], standardized(raw["train images"], raw["test images"], 255),
                               rtol=1e-12, atol=1e-12)


def test_standardization_uses_the_train_statistics_for_both_splits(tmp_path):
    make_mnist_dir(tmp_path)
    ds = load_mnist_dir(tmp_path)
    assert abs(ds.x_train.mean()) < 1e-12 and abs(ds.x_train.std() - 1) < 1e-12
    # The test images are brighter: standardized by the train statistics they stay brighter.
    assert ds.x_test.mean() > 0.5


def test_float32_is_float32_all_the_way(tmp_path):
    make_mnist_dir(tmp_path)
    ds64, ds32 = load_mnist_dir(tmp_path), load_mnist_dir(tmp_path, dtype=np.float32)
    assert ds32.x_train.dtype == ds32.x_test.dtype == np.float32 and ds32.dtype == np.float32
    np.testing.assert_array_equal(ds32.x_train, ds64.x_train.astype(np.float32))
    assert load(tmp_path, dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float16, np.int32, "complex128"])
def test_other_dtypes_are_refused(tmp_path, dtype):
    make_mnist_dir(tmp_path)
    with pytest.raises(TypeError, match="float32 or float64"):
        load_mnist_dir(tmp_path, dtype=dtype)


def test_raw_file_is_preferred_over_its_gz_twin(tmp_path):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    write_idx(tmp_path / (MNIST_FILES["train labels"] + ".gz"), np.full(30, 9, dtype=np.uint8))
    assert load_mnist_dir(tmp_path).num_classes == 4


def test_missing_files_are_listed(tmp_path):
    make_mnist_dir(tmp_path)
    (tmp_path / (MNIST_FILES["train images"] + ".gz")).unlink()
    (tmp_path / MNIST_FILES["test labels"]).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist_dir(tmp_path)
    missing, present = str(info.value).split(";")
    assert "train-images-idx3-ubyte" in missing and "t10k-labels-idx1-ubyte" in missing
    assert "train-labels" not in missing and "t10k-images" not in missing
    assert "train-labels-idx1-ubyte" in present and "t10k-images-idx3-ubyte.gz" in present


def test_a_directory_that_does_not_exist_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_mnist_dir(tmp_path / "nope")


def test_counts_must_match(tmp_path):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    write_idx(tmp_path / MNIST_FILES["train labels"], np.zeros(29, dtype=np.uint8))
    with pytest.raises(DatasetError, match="train: 30 images but 29 labels"):
        load_mnist_dir(tmp_path)


def test_a_test_label_beyond_the_train_labels_is_refused(tmp_path):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    labels = np.zeros(12, dtype=np.uint8)
    labels[5] = 7
    write_idx(tmp_path / MNIST_FILES["test labels"], labels)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: label 7 is outside 0\.\.3"):
        load_mnist_dir(tmp_path)


def test_labels_must_be_below_num_classes_when_given(tmp_path):
    make_mnist_dir(tmp_path, classes=4)
    assert load_mnist_dir(tmp_path, num_classes=10).num_classes == 4
    with pytest.raises(DatasetError, match=r"label 3 is outside 0\.\.2 \(num_classes=3\)"):
        load_mnist_dir(tmp_path, num_classes=3)


def test_a_negative_label_is_refused(tmp_path):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    labels = np.zeros(30, dtype=np.int8)
    labels[3] = -1
    write_idx(tmp_path / MNIST_FILES["train labels"], labels)
    with pytest.raises(DatasetError, match="label -1 is outside"):
        load_mnist_dir(tmp_path)


@pytest.mark.parametrize("images, phrase", [
    (np.zeros((30, 5, 4), dtype=np.float32), "images must be uint8 of shape"),
    (np.zeros((30, 20), dtype=np.uint8), "images must be uint8 of shape"),
])
def test_images_must_be_3d_uint8(tmp_path, images, phrase):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    write_idx(tmp_path / MNIST_FILES["train images"], images)
    with pytest.raises(DatasetError, match=phrase):
        load_mnist_dir(tmp_path)


def test_train_and_test_images_must_have_one_size(tmp_path):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    write_idx(tmp_path / MNIST_FILES["test images"], np.zeros((12, 4, 5), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"train images are \(5, 4\) but test images are \(4, 5\)"):
        load_mnist_dir(tmp_path)


def test_constant_train_images_are_refused_naming_the_directory(tmp_path):
    make_mnist_dir(tmp_path / "flat", compress=(False,) * 4)
    write_idx(tmp_path / "flat" / MNIST_FILES["train images"], np.zeros((30, 5, 4), dtype=np.uint8))
    with pytest.raises(DatasetError, match="flat: cannot standardize: every train pixel has the same value"):
        load_mnist_dir(tmp_path / "flat")


def test_a_broken_file_in_the_directory_is_named(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / (MNIST_FILES["test images"] + ".gz")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(IDXError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist_dir(tmp_path)


@pytest.fixture(scope="module")
def fashion():
    if not FASHION.is_dir():
        pytest.skip(f"{FASHION} is not installed")
    return load(FASHION, dtype=np.float32)


def test_the_real_fashion_mnist_loads(fashion):
    assert fashion.shapes == {"x_train": (60000, 1, 28, 28), "y_train": (60000,),
                              "x_test": (10000, 1, 28, 28), "y_test": (10000,)}
    assert fashion.num_classes == 10 and fashion.dtype == np.float32
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(fashion.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(fashion.y_test), np.full(10, 1000))
    assert abs(float(fashion.x_train.mean(dtype=np.float64))) < 1e-5
    assert abs(float(fashion.x_train.std(dtype=np.float64)) - 1) < 1e-5


# --- digits -------------------------------------------------------------------------------

def sklearn_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    return bunch.images, bunch.target


def test_digits_are_1797_standardized_8x8_images():
    _, target = sklearn_digits()
    ds = load_digits()
    assert ds.name == "digits" and ds.in_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert abs(ds.x_train.mean()) < 1e-12 and abs(ds.x_train.std() - 1) < 1e-12
    np.testing.assert_array_equal(np.sort(np.concatenate([ds.y_train, ds.y_test])), np.sort(target))


def test_digits_split_is_stratified_and_seeded():
    _, target = sklearn_digits()
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_test, c.x_test)
    expected = np.floor(0.2 * np.bincount(target) + 0.5).astype(int)
    np.testing.assert_array_equal(np.bincount(a.y_test, minlength=10), expected)
    np.testing.assert_array_equal(np.bincount(c.y_test, minlength=10), expected)


def test_digits_are_the_sklearn_pixels_over_16_standardized_by_the_train_split():
    images, _ = sklearn_digits()
    ds = load_digits(test_fraction=0.3, seed=3)
    # The map from raw pixels is affine and the train split holds both 0 and 16, so the
    # raw pixels can be recovered from the train minimum and maximum.
    low, high = ds.x_train.min(), ds.x_train.max()
    raw_train = (ds.x_train - low) / (high - low) * 16
    raw_test = (ds.x_test - low) / (high - low) * 16
    for raw in (raw_train, raw_test):
        np.testing.assert_allclose(raw, np.round(raw), atol=1e-9)
    raw_train, raw_test = np.round(raw_train), np.round(raw_test)
    # Together the two splits are exactly the sklearn images, each used once.
    rows = np.concatenate([raw_train, raw_test]).reshape(-1, 64)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, images.reshape(-1, 64)))
    np.testing.assert_allclose(ds.x_train, standardized(raw_train, raw_train, 16), atol=1e-12)
    np.testing.assert_allclose(ds.x_test, standardized(raw_train, raw_test, 16), atol=1e-12)


def test_digits_in_float32():
    ds = load_digits(dtype=np.float32)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32


@pytest.mark.parametrize("kwargs, phrase", [
    ({"test_fraction": 0.0}, "strictly between 0 and 1"),
    ({"test_fraction": 1.0}, "strictly between 0 and 1"),
    ({"test_fraction": 0.001}, "leaves one of the splits empty"),
    ({"seed": -1}, "non-negative integer"),
    ({"seed": 1.5}, "non-negative integer"),
])
def test_digits_arguments_are_checked(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        load_digits(**kwargs)


# --- preprocess and Dataset ---------------------------------------------------------------

@settings(deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_train=st.integers(2, 40), n_test=st.integers(0, 10),
       block=st.integers(1, 100), dtype=st.sampled_from([np.float32, np.float64]))
def test_preprocess_is_the_formula_whatever_the_block_size(seed, n_train, n_test, block, dtype):
    gen = np.random.default_rng(seed)
    raw_train, raw_test = gen.integers(0, 256, (n_train, 3, 2)), gen.integers(0, 256, (n_test, 3, 2))
    raw_train[0, 0, 0], raw_train[1, 0, 0] = 0, 255  # never constant
    saved = datasets_module._BLOCK
    datasets_module._BLOCK = block
    try:
        x_train, x_test = preprocess(raw_train, raw_test, 255, dtype)
    finally:
        datasets_module._BLOCK = saved
    assert x_train.dtype == x_test.dtype == dtype
    assert x_train.shape == raw_train.shape and x_test.shape == raw_test.shape
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(x_train, standardized(raw_train, raw_train, 255), rtol=tol, atol=tol)
    np.testing.assert_allclose(x_test, standardized(raw_train, raw_test, 255), rtol=tol, atol=tol)


@pytest.mark.parametrize("x_train, error, phrase", [
    (np.full((3, 2), 7), DatasetError, "same value"),
    (np.zeros((0, 2)), DatasetError, "empty"),
    (np.array([[0.0, np.nan]]), DatasetError, "train images hold NaN or infinite"),
])
def test_preprocess_refuses_what_it_cannot_standardize(x_train, error, phrase):
    with pytest.raises(error, match=phrase):
        preprocess(x_train, np.zeros((1, 2)), 255)


@pytest.mark.parametrize("pixel_max", [0, -1, float("inf"), "255"])
def test_preprocess_needs_a_positive_pixel_max(pixel_max):
    with pytest.raises(ValueError, match="pixel_max"):
        preprocess(np.arange(4.0), np.arange(2.0), pixel_max)


def small_dataset(n_train=6, n_test=4, dtype=np.float64, name="small"):
    gen = np.random.default_rng(0)
    return Dataset(gen.standard_normal((n_train, 2, 3, 3)).astype(dtype), np.arange(n_train) % 3,
                   gen.standard_normal((n_test, 2, 3, 3)).astype(dtype), np.arange(n_test) % 5, name=name)


def test_dataset_properties():
    ds = small_dataset()
    assert ds.shapes == {"x_train": (6, 2, 3, 3), "y_train": (6,), "x_test": (4, 2, 3, 3), "y_test": (4,)}
    assert ds.in_shape == (2, 3, 3)
    assert ds.num_classes == 4  # the test split holds label 3
    assert ds.dtype == np.float64
    assert "small" in repr(ds) and "(6, 2, 3, 3)" in repr(ds)


@pytest.mark.parametrize("change, phrase", [
    ({"x_train": np.zeros((6, 18))}, "x_train must be a float32 or float64 array of shape"),
    ({"x_test": np.zeros((4, 2, 3, 3), dtype=np.uint8)}, "x_test must be a float32 or float64"),
    ({"y_train": np.zeros(6, dtype=np.int32)}, "y_train must be an int64 array"),
    ({"y_test": np.zeros((4, 1), dtype=np.int64)}, "y_test must be an int64 array"),
    ({"y_train": np.zeros(5, dtype=np.int64)}, "train: 6 images but 5 labels"),
    ({"y_test": np.array([0, 1, -2, 0])}, "negative label -2"),
    ({"x_test": np.zeros((4, 2, 3, 3), dtype=np.float32)}, "x_train is float64 but x_test is float32"),
    ({"x_test": np.zeros((4, 2, 3, 4))}, r"train images are \(2, 3, 3\) but test images are \(2, 3, 4\)"),
    ({"x_train": np.zeros((0, 2, 3, 3)), "y_train": np.zeros(0, dtype=np.int64)}, "train set is empty"),
])
def test_dataset_checks_its_arrays(change, phrase):
    ds = small_dataset()
    fields = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test, **change}
    with pytest.raises(DatasetError, match=phrase):
        Dataset(**fields, name="small")


def test_subset_takes_the_first_samples_as_copies():
    ds = small_dataset(n_train=6, n_test=4)
    sub = subset(ds, 3, 2)
    np.testing.assert_array_equal(sub.x_train, ds.x_train[:3])
    np.testing.assert_array_equal(sub.y_test, ds.y_test[:2])
    assert not np.shares_memory(sub.x_train, ds.x_train)
    assert subset(ds, 2).shapes["x_test"] == (4, 2, 3, 3)
    assert subset(ds, 2, 0).shapes["y_test"] == (0,)


@pytest.mark.parametrize("n_train, n_test", [(0, 1), (7, 1), (2, 5), (2, -1), (2.0, 1), (True, 1)])
def test_subset_sizes_are_checked(n_train, n_test):
    with pytest.raises(ValueError, match="must be an integer from"):
        subset(small_dataset(n_train=6, n_test=4), n_train, n_test)


# --- npz and load -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npz_round_trip(tmp_path, dtype):
    ds = small_dataset(dtype=dtype, name="round-trip")
    save_npz(ds, tmp_path / "ds.npz")
    assert os.listdir(tmp_path) == ["ds.npz"]
    back = load_npz(tmp_path / "ds.npz", dtype=dtype)
    assert back.name == "round-trip" and back.dtype == dtype
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(back, key).dtype == getattr(ds, key).dtype
        np.testing.assert_array_equal(getattr(back, key), getattr(ds, key))


def test_npz_is_cast_to_the_requested_dtype(tmp_path):
    save_npz(small_dataset(dtype=np.float64), tmp_path / "ds.npz")
    assert load_npz(tmp_path / "ds.npz", dtype=np.float32).x_test.dtype == np.float32


def test_npz_raw_pixels_with_pixel_max_are_preprocessed(tmp_path):
    gen = np.random.default_rng(1)
    raw_train, raw_test = gen.integers(0, 256, (8, 4, 4)).astype(np.uint8), gen.integers(0, 256, (3, 4, 4))
    np.savez(tmp_path / "raw.npz", x_train=raw_train, y_train=np.arange(8) % 2, x_test=raw_test,
             y_test=np.array([0, 1, 1], dtype=np.uint8), pixel_max=255)
    ds = load(tmp_path / "raw.npz", dtype=np.float32)
    assert ds.name == "raw" and ds.in_shape == (1, 4, 4) and ds.y_test.dtype == np.int64
    np.testing.assert_allclose(ds.x_test[:, 0], standardized(raw_train, raw_test, 255), rtol=1e-6, atol=1e-6)


def write_npz(path, **overrides):
    arrays = {"x_train": np.zeros((2, 1, 2, 2)), "y_train": np.zeros(2, dtype=np.int64),
              "x_test": np.zeros((1, 1, 2, 2)), "y_test": np.zeros(1, dtype=np.int64), **overrides}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize("overrides, phrase", [
    ({"y_train": None, "x_test": None}, "missing arrays y_train, x_test"),
    ({"x_train": np.zeros((2, 4))}, r"x_train must be numbers of shape \(N, C, H, W\) or \(N, H, W\)"),
    ({"y_test": np.zeros((1, 1), dtype=np.int64)}, r"y_test must be integers of shape \(N,\)"),
    ({"y_train": np.zeros(2)}, r"y_train must be integers"),
    ({"y_train": np.zeros(3, dtype=np.int64)}, "train: 2 images but 3 labels"),
    ({"x_train": np.zeros((2, 1, 2, 2), dtype=np.uint8)}, "raw integer pixels need a pixel_max"),
    ({"pixel_max": np.array([255])}, "pixel_max must be a number"),
    ({"name": np.array(3)}, "name must be a string"),
    ({"x_test": np.array(["a"])}, "x_test must be numbers"),
    ({"x_test": np.full((1, 1, 2, 2), np.inf)}, "x_test holds NaN or infinite values"),
    ({"pixel_max": 0}, "pixel_max must be a positive finite number"),
    ({"x_train": np.ones((2, 1, 2, 2), dtype=np.uint8), "pixel_max": 255}, "every train pixel has the same value"),
    ({"x_test": np.full((1, 1, 2, 2), np.nan), "pixel_max": 255}, "test images hold NaN or infinite values"),
])
def test_bad_npz_contents_are_named(tmp_path, overrides, phrase):
    write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DatasetError, match=phrase) as info:
        load_npz(tmp_path / "bad.npz")
    assert "bad.npz" in str(info.value)


def test_npz_object_arrays_are_not_unpickled(tmp_path):
    write_npz(tmp_path / "pickled.npz", y_test=np.array([0], dtype=object))
    with pytest.raises(DatasetError, match="pickled.npz.*y_test.npy.*objects.*never unpickles"):
        load_npz(tmp_path / "pickled.npz")


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 cut short"])
def test_a_file_that_is_not_an_npz_is_a_dataset_error(tmp_path, content):
    (tmp_path / "junk.npz").write_bytes(content)
    with pytest.raises(DatasetError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")


def test_a_single_npy_array_is_not_an_npz(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DatasetError, match="not an .npz archive"):
        load_npz(tmp_path / "one.npz")


def test_a_missing_npz_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.npz")


def test_save_npz_needs_a_dataset(tmp_path):
    with pytest.raises(TypeError, match="Dataset"):
        save_npz({"x_train": np.zeros(1)}, tmp_path / "a.npz")


def test_load_dispatches_on_the_spec(tmp_path):
    make_mnist_dir(tmp_path / "mnist-like")
    save_npz(small_dataset(name="saved"), tmp_path / "saved.npz")
    assert load().name == "digits"
    assert load("digits", dtype=np.float32).dtype == np.float32
    assert load(tmp_path / "mnist-like").name == "mnist-like"
    assert load(str(tmp_path / "saved.npz")).name == "saved"


@pytest.mark.parametrize("spec", ["mnist", "no/such/dir", "data.csv"])
def test_an_unknown_spec_is_a_clear_error(spec):
    with pytest.raises(DatasetError, match=f"unknown dataset '{spec}'"):
        load(spec)


def test_a_spec_must_be_a_name_or_path():
    with pytest.raises(TypeError, match="name or a path"):
        load(3)


# --- sizes taken from files ---------------------------------------------------------------

def test_reader_errors_are_input_errors_and_value_errors():
    for error in (IDXError, DatasetError):
        assert issubclass(error, InputError) and issubclass(error, ValueError)


def test_a_label_of_a_billion_in_an_npz_is_refused_naming_label_split_and_file(tmp_path):
    write_npz(tmp_path / "labels.npz", y_test=np.array([10**9]))
    with pytest.raises(LimitError) as info:
        load_npz(tmp_path / "labels.npz")
    message = str(info.value)
    assert "labels.npz" in message and "label 1000000000" in message and "test split" in message
    assert f"{MAX_CLASSES:,}" in message


def test_a_label_of_a_billion_in_an_int32_idx_file_is_refused_naming_label_split_and_file(tmp_path):
    make_mnist_dir(tmp_path, compress=(False,) * 4)
    labels = (np.arange(30) % 4).astype(np.int32)
    labels[7] = 10**9
    write_idx(tmp_path / MNIST_FILES["train labels"], labels)
    with pytest.raises(LimitError, match=r"train-labels-idx1-ubyte: label 1000000000 of the train split"):
        load_mnist_dir(tmp_path)


def test_the_largest_label_allowed_is_max_classes_minus_one(tmp_path):
    write_npz(tmp_path / "edge.npz", y_train=np.array([0, MAX_CLASSES - 1]))
    assert load_npz(tmp_path / "edge.npz").num_classes == MAX_CLASSES
    write_npz(tmp_path / "over.npz", y_train=np.array([0, MAX_CLASSES]))
    with pytest.raises(LimitError, match=f"label {MAX_CLASSES} of the train split"):
        load_npz(tmp_path / "over.npz")


def peak_bytes(call):
    """The peak of memory traced while `call` runs, and the exception it raised."""
    tracemalloc.start()
    try:
        call()
    except Exception as err:  # noqa: BLE001 - returned for the caller to check
        raised = err
    else:
        raised = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, raised


def gzip_stream(header: bytes, zeros: int) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(header)
        chunk = bytes(1 << 20)
        for start in range(0, zeros, len(chunk)):
            gz.write(chunk[:zeros - start])
    return buf.getvalue()


def test_a_gzip_bomb_is_refused_without_being_decompressed(tmp_path):
    # The header announces 16 bytes; the stream inflates to 64 MiB more.
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip_stream(bytes([0, 0, 0x08, 1]) + (16).to_bytes(4, "big"), 16 + (64 << 20)))
    assert path.stat().st_size < 1 << 20
    peak, raised = peak_bytes(lambda: read_idx(path))
    assert isinstance(raised, IDXError) and "trailing bytes after the 16 bytes of data" in str(raised)
    assert peak < 4 << 20


def test_an_inflated_idx_dimension_is_a_limit_error_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 20))
    # A well-formed file whose 4 MiB of data all follows: only the limit can stop it.
    path = tmp_path / "big-idx3-ubyte.gz"
    path.write_bytes(gzip_stream(bytes([0, 0, 0x08, 3]) + np.array([4, 1024, 1024], dtype=">u4").tobytes(), 4 << 20))
    peak, raised = peak_bytes(lambda: read_idx(path))
    assert isinstance(raised, LimitError), raised
    assert "big-idx3-ubyte.gz" in str(raised) and "(4, 1024, 1024)" in str(raised)
    assert peak < 1 << 20
    raw = tmp_path / "raw-idx1-ubyte"
    raw.write_bytes(idx_bytes(0x08, (2**31,), bytes(10)))
    with pytest.raises(LimitError, match=r"raw-idx1-ubyte: the IDX header's dimensions \(2147483648,\)"):
        read_idx(raw)


def test_a_raw_idx_file_counts_its_trailing_bytes(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(0x08, (2, 2), bytes(7)))
    assert_idx_error(path, "3 trailing bytes after the 4 bytes of data")


def test_an_empty_array_with_huge_sides_is_refused(tmp_path):
    # Zero bytes to allocate, but NumPy cannot index sides whose product passes 2**63.
    path = tmp_path / "empty-idx3-ubyte"
    path.write_bytes(idx_bytes(0x08, (0, 2**32 - 1, 2**32 - 1, 2**32 - 1), b""))
    assert_idx_error(path, "overflow NumPy's index range")


def test_an_npz_header_claiming_a_huge_array_is_a_limit_error(tmp_path):
    write_npz(tmp_path / "claim.npz")
    members = zip_members((tmp_path / "claim.npz").read_bytes())
    members["x_train.npy"] = npy_claiming((2**40,))
    (tmp_path / "claim.npz").write_bytes(make_zip(members))
    peak, raised = peak_bytes(lambda: load_npz(tmp_path / "claim.npz"))
    assert isinstance(raised, LimitError)
    assert "claim.npz: member 'x_train.npy'" in str(raised) and "(1099511627776,)" in str(raised)
    assert peak < 1 << 20


def test_the_standardized_copy_is_checked_before_it_is_allocated(tmp_path, monkeypatch):
    # 64 KiB of raw pixels pass a 256 KiB limit; their float64 copy (512 KiB) does not.
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(256 << 10))
    gen = np.random.default_rng(0)
    np.savez(tmp_path / "raw.npz", x_train=gen.integers(0, 256, (64, 32, 32)).astype(np.uint8),
             y_train=np.zeros(64, dtype=np.uint8), x_test=np.zeros((1, 32, 32), dtype=np.uint8),
             y_test=np.zeros(1, dtype=np.uint8), pixel_max=255)
    with pytest.raises(LimitError, match=r"raw.npz: the standardized train images \(float64\)"):
        load_npz(tmp_path / "raw.npz")
    assert load_npz(tmp_path / "raw.npz", dtype=np.float32).dtype == np.float32
    with pytest.raises(LimitError, match="standardized train images"):
        preprocess(np.zeros((64, 32, 32), dtype=np.uint8), np.zeros((1, 32, 32)), 255)


def rewrite_member(path, name, content):
    members = zip_members(path.read_bytes())
    members[name] = content
    path.write_bytes(make_zip(members))


def npy_with_header(header: bytes, version=(1, 0)) -> bytes:
    size = len(header).to_bytes(2 if version == (1, 0) else 4, "little")
    return b"\x93NUMPY" + bytes(version) + size + header


@pytest.mark.parametrize("content, phrase", [
    (b"not an npy file", "not a .npy array"),
    (npy_with_header(b"{}", version=(3, 0)), "format version 3.0"),
    (b"\x93NUMPY\x02\x00" + (10**6).to_bytes(4, "little"), "a .npy header of 1,000,000 bytes"),
    (npy_with_header(b"(" * 5000 + b")" * 5000), "bad .npy header"),
    (npy_with_header(b"{'descr': '<f8', 'fortran_order': False, 'shape': (-3,), }"), "negative size"),
    (npy_with_header(b"{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (2,), }"), "must be numbers"),
    (npy_bytes(np.zeros(4))[:-8], "truncated"),
    (npy_bytes(np.zeros(4)) + b"\x00", "trailing bytes"),
])
def test_a_bad_npy_member_is_named(tmp_path, content, phrase):
    path = tmp_path / "member.npz"
    write_npz(path)
    rewrite_member(path, "x_train.npy", content)
    with pytest.raises(InputError, match="member.npz: member 'x_train.npy'") as info:
        load_npz(path)
    assert phrase in str(info.value)


def test_members_compressed_otherwise_or_encrypted_are_refused(tmp_path):
    path = tmp_path / "bz.npz"
    write_npz(path)
    members = zip_members(path.read_bytes())
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    with pytest.raises(DatasetError, match="compression method 12"):
        load_npz(path)
    content = bytearray(make_zip(members))
    content[6] |= 0x1  # the first local header's "encrypted" flag
    at = content.rfind(b"PK\x01\x02", 0, content.rfind(b"x_train.npy"))
    content[at + 8] |= 0x1  # and the same flag in its central-directory entry
    path.write_bytes(bytes(content))
    with pytest.raises(DatasetError, match="encrypted"):
        load_npz(path)


def test_a_deflated_npz_loads(tmp_path):
    ds = small_dataset()
    np.savez_compressed(tmp_path / "small.npz", x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
                        y_test=ds.y_test)
    np.testing.assert_array_equal(load_npz(tmp_path / "small.npz").x_test, ds.x_test)


def test_a_fortran_ordered_npz_array_keeps_its_values(tmp_path):
    ds = small_dataset()
    write_npz(tmp_path / "f.npz", x_train=np.asfortranarray(ds.x_train), y_train=ds.y_train, x_test=ds.x_test,
              y_test=ds.y_test)
    back = load_npz(tmp_path / "f.npz")
    np.testing.assert_array_equal(back.x_train, ds.x_train)
    assert back.x_train.flags.c_contiguous


# --- the preprocessing record -------------------------------------------------------------

def test_a_loader_records_its_preprocessing(tmp_path):
    raw = make_mnist_dir(tmp_path)
    ds = load_mnist_dir(tmp_path)
    train = raw["train images"] / 255
    assert ds.preprocessing == pytest.approx({"pixel_max": 255.0, "mean": train.mean(), "std": train.std()},
                                             rel=1e-12)
    p = ds.preprocessing
    np.testing.assert_allclose(ds.x_test[:, 0], (raw["test images"] / p["pixel_max"] - p["mean"]) / p["std"],
                               rtol=1e-12, atol=1e-12)
    digits = load_digits()
    assert digits.preprocessing["pixel_max"] == 16.0 and digits.preprocessing["std"] > 0


def test_given_statistics_standardize_the_test_split_as_the_full_load_did(tmp_path):
    raw = make_mnist_dir(tmp_path / "full", compress=(False,) * 4)
    full = load(tmp_path / "full")
    # Another directory: the same test images, other train images (other statistics).
    shutil.copytree(tmp_path / "full", tmp_path / "other")
    brighter = np.minimum(raw["train images"].astype(np.int64) + 60, 255).astype(np.uint8)
    write_idx(tmp_path / "other" / MNIST_FILES["train images"], brighter)
    own = load(tmp_path / "other")
    assert not np.array_equal(own.x_test, full.x_test)
    given = load(tmp_path / "other", preprocessing=full.preprocessing)
    np.testing.assert_array_equal(given.x_test, full.x_test)
    assert given.preprocessing == full.preprocessing
    np.testing.assert_array_equal(load(tmp_path / "other", dtype=np.float32, preprocessing=full.preprocessing).x_test,
                                  load(tmp_path / "full", dtype=np.float32).x_test)


def test_preprocess_returns_and_accepts_the_statistics():
    gen = np.random.default_rng(3)
    raw_train, raw_test = gen.integers(0, 256, (20, 4)), gen.integers(0, 256, (5, 4))
    x_train, x_test, stats = preprocess(raw_train, raw_test, 255, return_statistics=True)
    assert set(stats) == {"pixel_max", "mean", "std"}
    again_train, again_test = preprocess(raw_train[:3], raw_test, 255, statistics=stats)
    np.testing.assert_array_equal(again_test, x_test)
    np.testing.assert_array_equal(again_train, x_train[:3])
    # A constant train split is fine when the statistics are given.
    preprocess(np.zeros((2, 4)), raw_test, 255, statistics=stats)


@pytest.mark.parametrize("record, phrase", [
    ({"pixel_max": 255, "mean": float("nan"), "std": 1}, "mean must be finite"),
    ({"pixel_max": 255, "mean": 0, "std": float("inf")}, "std must be finite"),
    ({"pixel_max": 255, "mean": 0, "std": 0}, "std must be positive"),
    ({"pixel_max": -1, "mean": 0, "std": 1}, "pixel_max must be positive"),
    ({"pixel_max": 255, "mean": 0}, "exactly the keys"),
    ({"pixel_max": 255, "mean": 0, "std": 1, "extra": 2}, "exactly the keys"),
    ({"pixel_max": 255, "mean": True, "std": 1}, "mean must be a number"),
    ({"pixel_max": "255", "mean": 0, "std": 1}, "pixel_max must be a number"),
    ({"pixel_max": 255, "mean": 10**400, "std": 1}, "too large for a float"),
    ([255, 0, 1], "must be a mapping"),
])
def test_a_bad_preprocessing_record_is_a_dataset_error(tmp_path, record, phrase):
    make_mnist_dir(tmp_path)
    with pytest.raises(DatasetError, match=phrase):
        load(tmp_path, preprocessing=record)
    with pytest.raises(DatasetError, match=phrase):
        check_preprocessing(record)


def test_a_record_for_another_pixel_range_is_refused(tmp_path):
    make_mnist_dir(tmp_path)
    with pytest.raises(DatasetError, match="scales by pixel_max = 16 but these images range up to 255"):
        load(tmp_path, preprocessing=load_digits().preprocessing)


def test_subset_and_npz_keep_the_record(tmp_path):
    make_mnist_dir(tmp_path / "d")
    ds = load(tmp_path / "d")
    assert subset(ds, 5, 2).preprocessing == ds.preprocessing
    save_npz(ds, tmp_path / "ds.npz")
    back = load_npz(tmp_path / "ds.npz")
    assert back.preprocessing == ds.preprocessing
    assert load_npz(tmp_path / "ds.npz", preprocessing=ds.preprocessing).fingerprint() == ds.fingerprint()


def test_a_saved_dataset_is_standardized_again_by_another_record(tmp_path):
    raw = make_mnist_dir(tmp_path / "d")
    ds = load(tmp_path / "d")
    save_npz(ds, tmp_path / "ds.npz")
    other = {"pixel_max": 255.0, "mean": 0.25, "std": 0.5}
    again = load_npz(tmp_path / "ds.npz", preprocessing=other)
    np.testing.assert_allclose(again.x_test[:, 0], (raw["test images"] / 255 - 0.25) / 0.5, rtol=1e-12, atol=1e-12)
    assert again.preprocessing == other
    save_npz(Dataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test), tmp_path / "bare.npz")
    assert load_npz(tmp_path / "bare.npz").preprocessing is None
    with pytest.raises(DatasetError, match="does not record how"):
        load_npz(tmp_path / "bare.npz", preprocessing=other)


def test_a_raw_npz_applies_a_given_record(tmp_path):
    gen = np.random.default_rng(4)
    raw_test = gen.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    np.savez(tmp_path / "raw.npz", x_train=gen.integers(0, 256, (8, 4, 4)).astype(np.uint8), y_train=np.arange(8) % 2,
             x_test=raw_test, y_test=np.array([0, 1, 1]), pixel_max=255)
    record = {"pixel_max": 255, "mean": 0.5, "std": 0.2}
    ds = load(tmp_path / "raw.npz", preprocessing=record)
    np.testing.assert_allclose(ds.x_test[:, 0], (raw_test / 255 - 0.5) / 0.2, rtol=1e-12)


def test_a_dataset_checks_its_record():
    ds = small_dataset()
    with pytest.raises(DatasetError, match="small: preprocessing: std must be positive"):
        Dataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test, name="small",
                preprocessing={"pixel_max": 1, "mean": 0, "std": -1})


# --- fingerprints -------------------------------------------------------------------------

def test_the_same_data_by_another_path_has_the_same_fingerprint(tmp_path):
    make_mnist_dir(tmp_path / "a", compress=(True, True, False, False))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.name != b.name
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0
    save_npz(a, tmp_path / "a.npz")
    save_npz(a, tmp_path / "elsewhere.npz")
    assert load(tmp_path / "a.npz").fingerprint() == load(tmp_path / "elsewhere.npz").fingerprint() == a.fingerprint()


def test_one_changed_pixel_or_label_changes_the_fingerprint(tmp_path):
    raw = make_mnist_dir(tmp_path / "a", compress=(False,) * 4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    test_images = raw["test images"].copy()
    test_images[3, 2, 1] ^= 1
    write_idx(tmp_path / "b" / MNIST_FILES["test images"], test_images)
    a = load(tmp_path / "a")
    assert load(tmp_path / "b").fingerprint() != a.fingerprint()
    y_test = a.y_test.copy()
    y_test[0] = 3 - y_test[0]
    assert Dataset(a.x_train, a.y_train, a.x_test, y_test).fingerprint() != a.fingerprint()
    assert load(tmp_path / "a", dtype=np.float32).fingerprint() != a.fingerprint()


def test_the_fingerprint_sees_values_not_layout():
    ds = small_dataset()
    swapped = Dataset(ds.x_train[::-1].copy()[::-1], ds.y_train, np.asfortranarray(ds.x_test), ds.y_test, name="other")
    assert swapped.fingerprint() == ds.fingerprint()
    moved = Dataset(ds.x_test.copy(), ds.y_test.copy(), ds.x_train.copy(), ds.y_train.copy())
    assert moved.fingerprint() != ds.fingerprint()


# --- batches ------------------------------------------------------------------------------

def numbered(n):
    """Inputs whose every entry is the sample's index, so a batch shows which samples it holds."""
    return np.repeat(np.arange(n, dtype=np.float64)[:, None], 3, axis=1), np.arange(n)


@settings(deadline=None)
@given(n=st.integers(0, 60), batch_size=st.integers(1, 20), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_an_epoch_visits_every_sample_once(n, batch_size, shuffle, drop_last, seed):
    x, y = numbered(n)
    seen = []
    for xb, yb in batches(x, y, batch_size, shuffle=shuffle, generator=np.random.default_rng(seed),
                          drop_last=drop_last):
        assert len(xb) == len(yb) and 1 <= len(yb) <= batch_size
        assert not drop_last or len(yb) == batch_size
        np.testing.assert_array_equal(xb, y[yb][:, None].repeat(3, axis=1))  # inputs travel with their labels
        seen.extend(yb.tolist())
    if drop_last:
        assert len(seen) == n - n % batch_size and len(set(seen)) == len(seen)
    else:
        assert sorted(seen) == list(range(n))
    if not shuffle:
        assert seen == list(range(len(seen)))


def epoch_order(generator=None, n=100, seed=None):
    x, y = numbered(n)
    gen = np.random.default_rng(seed) if seed is not None else generator
    return np.concatenate([yb for _, yb in batches(x, y, 7, generator=gen)])


def test_same_seed_same_order_different_seed_different_order():
    np.testing.assert_array_equal(epoch_order(seed=5), epoch_order(seed=5))
    assert not np.array_equal(epoch_order(seed=5), epoch_order(seed=6))
    assert not np.array_equal(epoch_order(seed=5), np.arange(100))


def test_successive_epochs_differ_and_repeat_from_the_same_state():
    gen = np.random.default_rng(0)
    first, second = epoch_order(gen), epoch_order(gen)
    assert not np.array_equal(first, second)
    gen = np.random.default_rng(0)
    np.testing.assert_array_equal(epoch_order(gen), first)
    np.testing.assert_array_equal(epoch_order(gen), second)


def test_the_default_generator_is_sclrefs():
    rng.manual_seed(11)
    first = epoch_order()
    rng.manual_seed(11)
    np.testing.assert_array_equal(epoch_order(), first)
    rng.manual_seed(12)
    assert not np.array_equal(epoch_order(), first)


def test_the_permutation_is_drawn_when_batches_is_called():
    gen = np.random.default_rng(0)
    x, y = numbered(10)
    epoch = batches(x, y, 3, generator=gen)
    reference = np.random.default_rng(0)
    reference.permutation(10)
    assert gen.random() == reference.random()
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in epoch]), np.random.default_rng(0).permutation(10))


def test_without_shuffle_the_generator_is_untouched_and_batches_are_read_only_views():
    gen = np.random.default_rng(0)
    x, y = numbered(10)
    xb, yb = next(batches(x, y, 4, shuffle=False, generator=gen))
    assert gen.random() == np.random.default_rng(0).random()
    assert np.shares_memory(xb, x) and not xb.flags.writeable and not yb.flags.writeable
    assert x.flags.writeable


def test_shuffled_batches_are_copies():
    x, y = numbered(10)
    xb, yb = next(batches(x, y, 4, generator=np.random.default_rng(0)))
    xb[:] = -1
    np.testing.assert_array_equal(x, numbered(10)[0])


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "4"])
def test_batch_size_is_checked(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        batches(*numbered(5), batch_size)


def test_lengths_and_generator_are_checked():
    x, y = numbered(5)
    with pytest.raises(ValueError, match="x has 5 samples but y has 4"):
        batches(x, y[:4], 2)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        batches(x, y, 2, generator=np.random.RandomState(0))


# --- augmentation -------------------------------------------------------------------------------------------------


def _augmented_by_hand(x, pad, fill, offsets, flips):
    """`augment`'s result pixel by pixel: the source pixel of each output pixel, or `fill` in the padding."""
    n, c, h, w = x.shape
    out = np.empty_like(x)
    for i in range(n):
        for yy in range(h):
            for xx in range(w):
                sy = yy + offsets[i, 0] - pad
                sx = (w - 1 - xx if flips[i] else xx) + offsets[i, 1] - pad
                inside = 0 <= sy < h and 0 <= sx < w
                out[i, :, yy, xx] = x[i, :, sy, sx] if inside else fill
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(0, 4),
       fill=st.floats(-3, 3), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_augment_crops_the_padded_image_and_flips_it(n, c, h, w, pad, fill, seed, dtype):
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(dtype)
    out = data.augment(x, np.random.default_rng(seed), pad, fill)
    gen = np.random.default_rng(seed)  # the same draws, in augment's order: offsets, then flips
    offsets, flips = gen.integers(0, 2 * pad + 1, size=(n, 2)), gen.random(n) < 0.5
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, _augmented_by_hand(x, pad, dtype(fill), offsets, flips))


def test_augment_draws_from_the_generator_it_is_given():
    x = np.arange(2 * 1 * 6 * 6, dtype=np.float64).reshape(2, 1, 6, 6)
    a, b = (data.augment(x, np.random.default_rng(7), 2) for _ in range(2))
    assert a.tobytes() == b.tobytes() and not np.shares_memory(a, x)
    gen = np.random.default_rng(7)
    assert {data.augment(x, gen, 2).tobytes() for _ in range(8)} != {a.tobytes()}  # later draws, other crops
    np.testing.assert_array_equal(data.augment(x[:, :, :, :1], gen, 0), x[:, :, :, :1])  # pad 0, width 1: unchanged


@pytest.mark.parametrize("x, pad, message", [(np.zeros((2, 3, 4)), 1, "must be .N, C, H, W."),
                                             (np.zeros((1, 1, 4, 4)), -1, "pad must be an integer >= 0"),
                                             (np.zeros((1, 1, 4, 4)), 1.5, "pad must be an integer >= 0")])
def test_augment_refuses_what_is_not_a_batch_of_images(x, pad, message):
    with pytest.raises(ValueError, match=message):
        data.augment(x, np.random.default_rng(0), pad)
