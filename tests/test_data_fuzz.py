"""Fuzzing the data readers: a damaged IDX file, MNIST directory or .npz archive loads or is an InputError.

Each test starts from valid small files it writes itself, damages them with the
strategies of tests/mutations.py (plus the IDX-specific ones below: a dimension, type
code or label rewritten), and calls the reader. The reader must either return a valid
array or `Dataset` or raise an `sclref.errors.InputError` with a message; any other
exception fails the test. The allocation limit is lowered to 64 MiB so a size inflated
by a mutation meets `LimitError` at once. Each test counts the files it tried and how
they ended, asserts that both endings happened, and prints the counts (``pytest -s``).
"""

import gzip
import io
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sclref.data import MAX_CLASSES, MNIST_FILES, Dataset, load, load_mnist_dir, load_npz, read_idx
from sclref.errors import InputError
from tests.mutations import (
    INFLATE,
    byte_mutations,
    file_mutations,
    make_zip,
    npy_bytes,
    npy_claiming,
    zip_member_mutations,
    zip_members,
)

LIMIT = 64 << 20
# Sizes a mutation writes into a dimension or a label: beyond 32 bits they wrap, as in a file.
HUGE = (*INFLATE, 2**32 - 1, 2**24, MAX_CLASSES, MAX_CLASSES - 1)
FUZZ = settings(deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def small_allocation_limit(monkeypatch):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(LIMIT))


def idx_file(array) -> bytes:
    array = np.asarray(array)
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


GEN = np.random.default_rng(0)
VALID_IDX = {
    "images": idx_file(GEN.integers(0, 256, (6, 5, 4)).astype(np.uint8)),
    "labels-u1": idx_file((np.arange(6) % 3).astype(np.uint8)),
    "labels-i4": idx_file((np.arange(6) % 3).astype(np.int32)),
    "floats": idx_file(GEN.standard_normal((3, 2)).astype(np.float32)),
    "doubles": idx_file(GEN.standard_normal((2, 2, 2))),
    "shorts": idx_file(GEN.integers(-300, 300, 7).astype(np.int16)),
}


@st.composite
def idx_field_mutations(draw, data: bytes):
    """An IDX file with its type code, number of dimensions, one dimension or one value rewritten."""
    data = bytearray(data)
    ndim = data[3]
    kind = draw(st.sampled_from(["dimension", "dimension", "code", "ndim", "value"]))
    if kind == "dimension":
        at = 4 + 4 * draw(st.integers(0, ndim - 1))
        data[at:at + 4] = (draw(st.sampled_from(HUGE)) % 2**32).to_bytes(4, "big")
    elif kind == "code":
        data[2] = draw(st.sampled_from([0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0xFF]))
    elif kind == "ndim":
        data[3] = draw(st.sampled_from([0, 1, 2, 3, 4, 64, 65, 255]))
    else:
        # A value of the data part, as a big-endian int32 where there is room (a label of an i4 file).
        start = 4 + 4 * ndim
        if len(data) >= start + 4:
            at = start + 4 * draw(st.integers(0, (len(data) - start) // 4 - 1))
            data[at:at + 4] = (draw(st.sampled_from(HUGE)) % 2**32).to_bytes(4, "big")
    return bytes(data)


@st.composite
def idx_mutations(draw, data: bytes):
    """A damaged IDX file, raw or gzip-compressed: damage before compression reaches the IDX checks."""
    damaged = draw(st.one_of(byte_mutations(data), idx_field_mutations(data)))
    layer = draw(st.sampled_from(["raw", "gzip of damaged", "damaged gzip"]))
    if layer == "raw":
        return damaged
    if layer == "gzip of damaged":
        return gzip.compress(damaged, mtime=0)
    return draw(byte_mutations(gzip.compress(data, mtime=0)))


def outcome(call, seen: Counter, check=None):
    """Run `call`; count whether it loaded (then `check` the result) or refused with a message."""
    try:
        result = call()
    except InputError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        seen["refused"] += 1
        seen[type(err).__name__] += 1
        return
    if check is not None:
        check(result)
    seen["loaded"] += 1


def report(reader: str, seen: Counter):
    print(f"\n{reader}: {seen['loaded'] + seen['refused']} mutated files, {dict(sorted(seen.items()))}")
    assert seen["loaded"] and seen["refused"], f"{reader}: the mutations reached only one ending: {seen}"


def check_array(a):
    assert isinstance(a, np.ndarray) and a.dtype.isnative and a.flags.writeable
    assert a.dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64)


def check_dataset(ds):
    assert isinstance(ds, Dataset)
    assert ds.x_train.ndim == 4 and ds.y_train.dtype == np.int64 and len(ds.x_train) == len(ds.y_train)
    assert 1 <= ds.num_classes <= MAX_CLASSES


# --- read_idx -----------------------------------------------------------------------------

def test_read_idx_loads_or_refuses_every_mutated_file(tmp_path):
    seen = Counter()
    path = tmp_path / "fuzzed-idx"

    @FUZZ
    @given(data=st.sampled_from(sorted(VALID_IDX)).flatmap(lambda key: idx_mutations(VALID_IDX[key])))
    def run(data):
        path.write_bytes(data)
        seen["gzip" if data[:2] == b"\x1f\x8b" else "raw"] += 1
        outcome(lambda: read_idx(path), seen, check_array)

    run()
    report("read_idx", seen)
    assert seen["gzip"] and seen["raw"]


# --- MNIST-format directories -------------------------------------------------------------

def mnist_files() -> dict[str, bytes]:
    """The four files of a small valid MNIST-format directory: int32 train labels, the rest uint8."""
    gen = np.random.default_rng(1)
    arrays = {
        "train images": gen.integers(0, 256, (8, 5, 4)).astype(np.uint8),
        "train labels": (np.arange(8) % 3).astype(np.int32),
        "test images": gen.integers(0, 256, (4, 5, 4)).astype(np.uint8),
        "test labels": (np.arange(4) % 3).astype(np.uint8),
    }
    return {role: idx_file(a) for role, a in arrays.items()}


MNIST = mnist_files()


def test_the_mnist_loader_loads_or_refuses_every_mutated_directory(tmp_path):
    seen = Counter()

    @FUZZ
    @given(role=st.sampled_from(sorted(MNIST)), compressed=st.booleans(), data=st.data())
    def run(role, compressed, data):
        directory = tmp_path / "mnist"
        directory.mkdir(exist_ok=True)
        for path in directory.iterdir():
            path.unlink()
        for other, content in MNIST.items():
            if other != role:
                (directory / MNIST_FILES[other]).write_bytes(content)
        damaged = data.draw(idx_mutations(MNIST[role]) if not compressed else
                            idx_mutations(MNIST[role]).map(lambda d: d if d[:2] == b"\x1f\x8b" else gzip.compress(d)))
        (directory / (MNIST_FILES[role] + (".gz" if compressed else ""))).write_bytes(damaged)
        seen[role] += 1
        outcome(lambda: load_mnist_dir(directory), seen, check_dataset)

    run()
    report("load_mnist_dir", seen)


def test_an_unbroken_mnist_directory_loads(tmp_path):
    # The fuzz test's starting point must itself load, or every refusal would be trivial.
    for role, content in MNIST.items():
        (tmp_path / MNIST_FILES[role]).write_bytes(content)
    assert load_mnist_dir(tmp_path).num_classes == 3


# --- .npz archives ------------------------------------------------------------------------

def npz_archives() -> dict[str, bytes]:
    """Valid dataset archives: preprocessed floats (stored, deflated, named) and raw pixels with pixel_max."""
    gen = np.random.default_rng(2)
    floats = {"x_train": gen.standard_normal((6, 1, 3, 3)), "y_train": np.arange(6) % 3,
              "x_test": gen.standard_normal((2, 1, 3, 3)), "y_test": np.array([0, 2]),
              "preprocessing": np.array([255.0, 0.5, 0.25])}
    raw = {"x_train": gen.integers(0, 256, (6, 3, 3)).astype(np.uint8), "y_train": (np.arange(6) % 3).astype(np.uint8),
           "x_test": gen.integers(0, 256, (2, 3, 3)).astype(np.uint8), "y_test": np.array([1, 0], dtype=np.int32),
           "pixel_max": np.array(255)}
    archives = {}
    for name, arrays, save in (("stored", floats, np.savez), ("deflated", floats, np.savez_compressed),
                               ("raw", raw, np.savez), ("named", {**floats, "name": np.str_("fuzz")}, np.savez)):
        buf = io.BytesIO()
        save(buf, **arrays)
        archives[name] = buf.getvalue()
    return archives


NPZ = npz_archives()
# tests/mutations.py's array_mutations cannot retype a string array (astype("<f4") of "fuzz"
# raises), so the archive with a name entry gets its own mutations below.
UNNAMED = sorted(set(NPZ) - {"named"})


@st.composite
def label_inflations(draw, data: bytes):
    """The archive with one label of y_train or y_test set to a huge or negative value (as int64)."""
    members = zip_members(data)
    key = draw(st.sampled_from(["y_train.npy", "y_test.npy"]))
    labels = np.lib.format.read_array(io.BytesIO(members[key])).astype(np.int64)
    labels[draw(st.integers(0, len(labels) - 1))] = draw(st.sampled_from([10**9, 2**31, 2**62, MAX_CLASSES, -1]))
    members[key] = npy_bytes(labels)
    return make_zip(members)


@st.composite
def name_mutations(draw, data: bytes):
    """The archive with its name entry damaged, retyped, reshaped or claiming a huge string."""
    members = zip_members(data)
    kind = draw(st.sampled_from(["bytes", "retype", "claim"]))
    if kind == "bytes":
        members["name.npy"] = draw(byte_mutations(members["name.npy"]))
    elif kind == "retype":
        members["name.npy"] = npy_bytes(draw(st.sampled_from([np.array(3), np.array(["a", "b"]), np.array(b"x"),
                                                                np.array("")])))
    else:
        members["name.npy"] = npy_claiming(draw(st.sampled_from([(), (2**40,)])), draw(st.sampled_from(
            ["<U100000000", "<U4"])))
    return make_zip(members)


def test_the_npz_reader_loads_or_refuses_every_mutated_archive(tmp_path):
    seen = Counter()
    path = tmp_path / "fuzzed.npz"

    @FUZZ
    @given(data=st.data())
    def run(data):
        mutation = data.draw(st.sampled_from(["file", "member", "label", "name"]))
        content = NPZ[data.draw(st.sampled_from(UNNAMED))]
        if mutation == "file":
            damaged = data.draw(file_mutations(content))
        elif mutation == "member":
            damaged = data.draw(zip_member_mutations(content))
        elif mutation == "label":
            damaged = data.draw(label_inflations(content))
        else:
            damaged = data.draw(name_mutations(NPZ["named"]))
        path.write_bytes(damaged)
        seen[mutation] += 1
        outcome(lambda: load_npz(path), seen, check_dataset)

    run()
    report("load_npz", seen)


def test_unbroken_archives_load(tmp_path):
    for name, content in NPZ.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
        ds = load(tmp_path / f"{name}.npz")
        assert ds.num_classes == 3 and ds.in_shape == (1, 3, 3)


def test_a_gzip_file_cut_anywhere_is_an_idx_error(tmp_path):
    # Every prefix, not a sample: the gzip layer has many places to end early.
    content = gzip.compress(VALID_IDX["images"], mtime=0)
    path = tmp_path / "cut.gz"
    for n in range(len(content)):
        path.write_bytes(content[:n])
        with pytest.raises(InputError, match="cut.gz"):
            read_idx(path)
