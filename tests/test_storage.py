"""sclref.storage: atomic writes that never leave a half-written file, and nested state in one `.npz`."""

import io
import json
import os
import zipfile

import numpy as np
import pytest

from sclref import storage


def _leftovers(directory):
    """Temporary files that an atomic write left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _zip(path, members: dict) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


# -- save_state / load_state round trip --------------------------------------------------

ARRAYS = {
    "f64": np.linspace(-1, 1, 7),
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 3,
    "f16": np.array([0.5, -2.0], dtype=np.float16),
    "i8": np.array([-128, 0, 127], dtype=np.int8),
    "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "big_endian": np.arange(4, dtype=">i4"),
    "bool": np.array([[True, False], [False, True]]),
    "complex": np.array([1 + 2j, -3j]),
    "scalar": np.array(3.25),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "strided": np.arange(20.0).reshape(4, 5)[:, ::2],
    "fortran": np.asfortranarray(np.arange(12).reshape(3, 4)),
    "unicode": np.array(["θ", "mask"]),
}


def test_round_trip_of_nested_state(tmp_path):
    tree = {
        "arrays": ARRAYS,
        "list": [1, 2.5, "three", None, True, False, [np.arange(3), {"deep": [[]]}]],
        "by_index": {0: {"momentum": np.ones(3)}, 7: {"step": 4}},
        "mixed_keys": {1: "int", "1": "str", None: "none", 2.5: "float"},
        "bool_keys": {True: "yes", False: "no"},
        "empty": {"dict": {}, "list": []},
        "numbers": {"big": 2**100, "neg": -1, "tiny": 5e-324, "third": 1 / 3, "nan": float("nan"),
                    "inf": float("-inf")},
        "numpy_scalars": {"f": np.float32(0.1), "i": np.int64(-5), "b": np.bool_(True)},
        "text": "λ = 0.03 ✓",
        "none": None,
    }
    storage.save_state(tmp_path / "s.npz", tree)
    back = storage.load_state(tmp_path / "s.npz")

    assert set(back["arrays"]) == set(ARRAYS)
    for name, a in ARRAYS.items():
        b = back["arrays"][name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.tobytes() == np.ascontiguousarray(a).tobytes(), name
    assert back["list"][:6] == [1, 2.5, "three", None, True, False]
    assert type(back["list"][4]) is bool and type(back["list"][0]) is int
    assert back["list"][6][0].tobytes() == np.arange(3).tobytes() and back["list"][6][1] == {"deep": [[]]}
    assert list(back["by_index"]) == [0, 7] and back["by_index"][7] == {"step": 4}
    assert back["by_index"][0]["momentum"].tobytes() == np.ones(3).tobytes()
    assert back["mixed_keys"] == {1: "int", "1": "str", None: "none", 2.5: "float"}
    assert [type(k) for k in back["mixed_keys"]] == [int, str, type(None), float]
    assert back["bool_keys"] == {True: "yes", False: "no"} and all(type(k) is bool for k in back["bool_keys"])
    assert back["empty"] == {"dict": {}, "list": []}
    n = back["numbers"]
    assert n["big"] == 2**100 and n["neg"] == -1 and n["tiny"] == 5e-324 and n["third"] == 1 / 3
    assert np.isnan(n["nan"]) and n["inf"] == float("-inf")
    # NumPy scalars come back as the Python values they equal.
    assert back["numpy_scalars"] == {"f": float(np.float32(0.1)), "i": -5, "b": True}
    assert back["text"] == "λ = 0.03 ✓" and back["none"] is None


def test_tuples_come_back_as_lists(tmp_path):
    storage.save_state(tmp_path / "s.npz", {"t": (1, (2, 3))})
    assert storage.load_state(tmp_path / "s.npz") == {"t": [1, [2, 3]]}


def test_top_level_values_other_than_a_dict(tmp_path):
    for tree in ([np.arange(3), 1], np.eye(2), "text", None, 4):
        storage.save_state(tmp_path / "s.npz", tree)
        back = storage.load_state(tmp_path / "s.npz")
        if isinstance(tree, list):
            assert back[0].tobytes() == tree[0].tobytes() and back[1] == 1
        elif isinstance(tree, np.ndarray):
            assert back.tobytes() == tree.tobytes()
        else:
            assert back == tree


@pytest.mark.parametrize("key", ["__array__", "__list__", "__intdict__"])
def test_keys_that_look_like_the_format_markers_round_trip(tmp_path, key):
    tree = {key: "a0", "x": {key: [1, 2]}, "y": {key: 5, "other": np.arange(2)}}
    storage.save_state(tmp_path / "s.npz", tree)
    back = storage.load_state(tmp_path / "s.npz")
    assert back[key] == "a0" and back["x"] == {key: [1, 2]}
    assert back["y"][key] == 5 and back["y"]["other"].tobytes() == np.arange(2).tobytes()


def test_loaded_arrays_are_independent_writable_copies(tmp_path):
    a = np.arange(4.0)
    storage.save_state(tmp_path / "s.npz", {"a": a, "b": a})
    back = storage.load_state(tmp_path / "s.npz")
    back["a"][0] = 99.0
    assert back["b"][0] == 0.0 and a[0] == 0.0


@pytest.mark.parametrize("value, what", [
    ({1, 2}, "set"),
    (object(), "object"),
    (b"bytes", "bytes"),
    (np.array([1, None], dtype=object), "dtype object"),
    ({(1, 2): "tuple key"}, "key of type tuple"),
    ({np.int64(1): "numpy key"}, "key of type int64"),
])
def test_unsupported_values_are_a_type_error_and_write_nothing(tmp_path, value, what):
    target = tmp_path / "s.npz"
    with pytest.raises(TypeError, match=what):
        storage.save_state(target, {"ok": np.arange(3), "bad": [value]})
    assert list(tmp_path.iterdir()) == []


def test_save_state_creates_missing_directories(tmp_path):
    storage.save_state(tmp_path / "a" / "b" / "s.npz", {"x": 1})
    assert storage.load_state(tmp_path / "a" / "b" / "s.npz") == {"x": 1}


# -- load_state on bad files --------------------------------------------------------------

def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        storage.load_state(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="no such state file"):
        storage.load_state(tmp_path)  # a directory is not a state file


@pytest.mark.parametrize("content", [b"", b"hello, not a zip" * 20, b"\x93NUMPY\x01\x00"],
                         ids=["empty", "text", "npy-magic"])
def test_a_file_that_is_not_a_zip_is_a_clear_error(tmp_path, content):
    path = tmp_path / "s.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"s\.npz: corrupt or truncated state file"):
        storage.load_state(path)


def test_a_plain_npy_file_is_a_clear_error(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(ValueError, match=r"a\.npy: corrupt or truncated"):
        storage.load_state(tmp_path / "a.npy")


def test_every_truncation_of_a_state_file_is_a_clear_error(tmp_path):
    storage.save_state(tmp_path / "full.npz", {"w": np.arange(50.0), "meta": {"epoch": 3}})
    raw = (tmp_path / "full.npz").read_bytes()
    path = tmp_path / "cut.npz"
    for n in sorted({0, 1, 10, 64, len(raw) // 3, len(raw) // 2, len(raw) - 22, len(raw) - 1}):
        path.write_bytes(raw[:n])
        with pytest.raises(ValueError, match=r"cut\.npz: corrupt or truncated"):
            storage.load_state(path)


def test_a_flipped_byte_inside_an_array_is_a_clear_error(tmp_path):
    storage.save_state(tmp_path / "s.npz", {"w": np.arange(50.0)})
    raw = bytearray((tmp_path / "s.npz").read_bytes())
    raw[raw.find(b"\x93NUMPY") + 300] ^= 0xFF  # inside the array's data: the zip CRC no longer matches
    (tmp_path / "s.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        storage.load_state(tmp_path / "s.npz")


def test_a_zip_without_the_structure_member_is_not_a_state_file(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.arange(3))
    with pytest.raises(ValueError, match=r"plain\.npz: not an sclref state file \(no __structure__\.json\)"):
        storage.load_state(tmp_path / "plain.npz")


@pytest.mark.parametrize("members", [
    {"__structure__.json": b"{not json"},
    {"__structure__.json": b"\xff\xfe\x00"},
    {"__structure__.json": json.dumps({"w": {"__array__": "a0"}}), "a0.npy": b"\x93NUMPY garbage header"},
    {"__structure__.json": json.dumps({"w": {"__array__": "a0"}}),
     "a0.npy": _npy(np.arange(3))[:20]},
    {"__structure__.json": json.dumps({"w": {"__array__": "a0"}}), "a0.npy": b"\x93NUMPY\x01\x00"},
], ids=["bad-json", "bad-utf8", "bad-npy-magic", "cut-npy", "empty-npy-header"])
def test_damaged_members_are_a_clear_error(tmp_path, members):
    _zip(tmp_path / "s.npz", members)
    with pytest.raises(ValueError, match=r"s\.npz: corrupt"):
        storage.load_state(tmp_path / "s.npz")


@pytest.mark.parametrize("structure", [
    {"w": {"__array__": "a0"}},  # refers to an array that is not there
    {"w": {"__list__": 5}},
    {"w": {"__intdict__": [[1]]}},
], ids=["missing-array", "list-of-int", "bad-pairs"])
def test_a_structure_that_does_not_match_its_arrays_is_a_clear_error(tmp_path, structure):
    _zip(tmp_path / "s.npz", {"__structure__.json": json.dumps(structure)})
    with pytest.raises(ValueError, match=r"s\.npz: corrupt state file"):
        storage.load_state(tmp_path / "s.npz")


def test_an_object_array_member_is_refused_not_unpickled(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([1, None], dtype=object), allow_pickle=True)
    _zip(tmp_path / "s.npz", {"__structure__.json": json.dumps({"w": {"__array__": "a0"}}), "a0.npy": buf.getvalue()})
    with pytest.raises(ValueError, match="corrupt or truncated"):
        storage.load_state(tmp_path / "s.npz")


# -- atomic writes ----------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f.bin"
    storage.atomic_write_bytes(path, b"old")
    storage.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    storage.atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch, failing):
    path = tmp_path / "f.bin"
    storage.atomic_write_bytes(path, b"old contents")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        # The data is written in one call; a full disk makes that call fail midway.
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                boom()

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        storage.atomic_write_bytes(path, b"new contents that never land")
    assert path.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_an_interrupt_during_the_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    storage.atomic_write_bytes(path, b"old")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_a_failed_save_state_keeps_the_old_state_file(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    storage.save_state(path, {"epoch": 1, "w": np.arange(3.0)})
    before = path.read_bytes()

    def boom(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        storage.save_state(path, {"epoch": 2, "w": np.arange(1000.0)})
    assert path.read_bytes() == before and storage.load_state(path)["epoch"] == 1
    assert _leftovers(tmp_path) == []


def test_atomic_write_json(tmp_path):
    storage.atomic_write_json(tmp_path / "m.json", {"finished": False, "history": [{"loss": 0.5}]})
    text = (tmp_path / "m.json").read_text()
    assert text.endswith("\n") and json.loads(text) == {"finished": False, "history": [{"loss": 0.5}]}


# -- the same bytes, and sizes trusted only after a check -----------------------------------

def test_the_same_state_gives_the_same_bytes_at_any_time(tmp_path, monkeypatch):
    import time as time_module

    state = {"w": np.arange(6.0).reshape(2, 3), "step": 3, "rng": {"state": 2**70}}
    storage.save_state(tmp_path / "a.npz", state)
    real_time = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real_time() + 86400 * 400)  # a year later
    monkeypatch.setattr(time_module, "localtime", lambda *a: time_module.struct_time((2031, 6, 1, 12, 0, 0, 0, 1, 0)))
    storage.save_state(tmp_path / "b.npz", state)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_metrics_json_refuses_nan_instead_of_writing_invalid_json(tmp_path):
    with pytest.raises(ValueError, match="JSON compliant"):
        storage.atomic_write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert _leftovers(tmp_path) == []


def test_an_array_header_claiming_more_than_its_member_holds_is_refused_before_allocation(tmp_path, monkeypatch):
    from tests.mutations import npy_claiming

    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", str(1 << 40))
    _zip(tmp_path / "s.npz", {"a0.npy": npy_claiming((2**30, 64)), "__structure__.json": b'{"__array__": "a0"}'})
    with pytest.raises(storage.StateFileError, match=r"claims shape \(1073741824, 64\)"):
        storage.load_state(tmp_path / "s.npz")


def test_an_array_beyond_the_allocation_limit_is_a_limit_error_naming_the_member(tmp_path, monkeypatch):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", "1000")
    storage.save_state(tmp_path / "s.npz", {"w": np.zeros(200)})
    with pytest.raises(storage.StateFileError, match=r"member a0.npy \(shape \(200,\), float64\).*1,600 bytes"):
        storage.load_state(tmp_path / "s.npz")


def test_a_structure_nested_100000_deep_is_a_clear_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    _zip(tmp_path / "s.npz", {"__structure__.json": deep.encode()})
    with pytest.raises(storage.StateFileError, match="corrupt"):
        storage.load_state(tmp_path / "s.npz")
    marker = '{"__list__": ' * 5000 + "1" + "}" * 5000
    _zip(tmp_path / "t.npz", {"__structure__.json": marker.encode()})
    try:
        storage.load_state(tmp_path / "t.npz")
    except storage.StateFileError:
        pass  # refused with sclref's error, or read: never a RecursionError


FUZZ_COUNTS: dict = {}


def _state_reader_sees(data: bytes, tmp_path, name: str) -> None:
    """Load a (mutated) state file: it must load, or fail with an InputError that says something."""
    from sclref.errors import InputError

    FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + 1
    path = tmp_path / f"{name}.npz"
    path.write_bytes(data)
    try:
        storage.load_state(path)
    except InputError as err:
        assert str(err)


def _valid_state_file(tmp_path) -> bytes:
    state = {"format": "x", "version": 1, "model": {"fc1.weight": np.ones((3, 4), np.float32), "fc1.bias": np.zeros(3)},
             "history": [{"epoch": 1, "loss": 0.5}], "rng": {"state": {"state": 2**100, "inc": 7}}, "none": None,
             3: "int key", "t": (1, 2.5, "s"), "scalar": np.float64(2.0), "zero_d": np.array(7)}
    storage.save_state(tmp_path / "valid.npz", state)
    return (tmp_path / "valid.npz").read_bytes()


def test_fuzz_the_state_file_reader(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings

    from tests.mutations import file_mutations

    tmp_path = tmp_path_factory.mktemp("fuzz")
    valid = _valid_state_file(tmp_path)

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(file_mutations(valid))
    def check(data):
        _state_reader_sees(data, tmp_path, "state")

    os.environ["SCLREF_MAX_ALLOC_BYTES"] = str(64 << 20)
    try:
        check()
    finally:
        del os.environ["SCLREF_MAX_ALLOC_BYTES"]
    assert FUZZ_COUNTS["state"] >= 400


def test_write_npz_streams_arrays_that_numpy_reads_and_gives_the_same_bytes_twice(tmp_path, monkeypatch):
    import time as time_module

    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "name": np.array("digits"), "y": np.arange(3)}
    storage.write_npz(tmp_path / "a.npz", arrays)
    real_time = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real_time() + 86400)
    storage.write_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        assert {k: loaded[k].tolist() for k in loaded.files} == {k: v.tolist() for k, v in arrays.items()}
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="pickle"):
        storage.write_npz(tmp_path / "c.npz", {"o": np.array([{}], dtype=object)})
    assert not (tmp_path / "c.npz").exists() and _leftovers(tmp_path) == []


def test_read_exactly_reads_in_pieces_and_says_how_many_bytes_came_when_short():
    data = bytes(range(256)) * 9000  # more than one piece
    assert storage.read_exactly(io.BytesIO(data), len(data)) == data
    assert storage.read_exactly(io.BytesIO(data), 10) == data[:10]
    with pytest.raises(storage.ShortRead) as info:
        storage.read_exactly(io.BytesIO(data[:100]), 101)
    assert info.value.got == 100 and isinstance(info.value, EOFError)
