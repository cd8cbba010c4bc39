"""Hypothesis strategies that damage valid files, for the fuzz tests of every reader of outside bytes.

Each strategy starts from a valid file (bytes) or a valid JSON document and returns a
mutated one: bytes flipped, cut or inserted; a zip member rewritten with a valid CRC (so
the damage gets past the zip layer to the parser behind it) or dropped; a JSON field
retyped, a size inflated, the nesting deepened; a ``.npy`` member given another dtype,
shape, non-finite values or a header that claims a huge array. A reader under test must
either load the mutated file to a valid object or raise `sclref.errors.InputError`.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
from hypothesis import strategies as st

# Values a field may be retyped to: wrong types, negative, huge, non-finite (as JSON allows it).
ODD_VALUES = (None, True, "", "x", -1, 0, 1.5, -(2**63), 2**31, 2**63, 10**12, 10**100, [], [1, 2], {}, {"a": 1},
              float("nan"), float("inf"))
INFLATE = (2**31, 2**32 + 1, 10**9, 10**12, -(2**31))
DEEP = 100_000


@st.composite
def byte_mutations(draw, data: bytes):
    """`data` with bytes flipped, cut short, inserted, deleted, or a 4-byte size field overwritten."""
    data = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "int32", "zero"]))
    n = len(data)
    if n == 0 or kind == "insert":
        at = draw(st.integers(0, n))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[draw(st.integers(0, n - 1)):]
    elif kind == "delete":
        start = draw(st.integers(0, n - 1))
        del data[start:start + draw(st.integers(1, 64))]
    elif kind == "int32":
        i = draw(st.integers(0, max(0, n - 4)))
        value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**24, 0x7F7F7F7F]))
        data[i:i + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))[:max(0, n - i)]
    else:
        start = draw(st.integers(0, n - 1))
        data[start:start + draw(st.integers(1, 64))] = bytes(min(64, n - start))
    return bytes(data)


def zip_members(data: bytes) -> dict[str, bytes]:
    """The members of a zip archive, by name, in stored order."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def make_zip(members: dict[str, bytes]) -> bytes:
    """A zip archive (stored, valid CRCs) of `members`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_claiming(shape: tuple[int, ...], dtype="<f8") -> bytes:
    """A ``.npy`` header that claims an array of `shape` followed by a few bytes only."""
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(16)


@st.composite
def array_mutations(draw, array: np.ndarray):
    """Another array in `array`'s place: retyped, reshaped, emptied, non-finite, out-of-range or huge-claiming."""
    kind = draw(st.sampled_from(["dtype", "shape", "empty", "nonfinite", "extreme", "claim", "object"]))
    a = np.array(array, copy=True)
    if kind == "dtype" and a.dtype.kind in "biufc":
        return npy_bytes(a.astype(draw(st.sampled_from(["<f4", "<f8", "<i4", "<i8", "<u1", "<i2", "?", "<c16"]))))
    if kind == "dtype":  # text or other arrays: numbers in their place
        return npy_bytes(np.arange(max(1, a.size), dtype=draw(st.sampled_from(["<f8", "<i8"]))).reshape(-1))
    if kind == "shape":
        return npy_bytes(a.reshape(-1)[: draw(st.integers(0, max(0, a.size)))].reshape(-1, 1)
                         if draw(st.booleans()) else np.concatenate([a.reshape(-1), a.reshape(-1)]))
    if kind == "empty":
        return npy_bytes(a.reshape(-1)[:0])
    if kind == "nonfinite" and a.size and a.dtype.kind == "f":
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return npy_bytes(a)
    if kind == "extreme" and a.size:
        big = np.iinfo(a.dtype).max if a.dtype.kind in "iu" else np.finfo(a.dtype).max if a.dtype.kind == "f" else 1
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([big, -1 if a.dtype.kind != "u" else 0]))
        return npy_bytes(a)
    if kind == "object":
        # A pickled-object array: a reader must refuse it, never unpickle it.
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return buf.getvalue()
    return npy_claiming(draw(st.sampled_from([(2**40,), (2**20, 2**20), (10**9, 784), (2**62,)])), a.dtype.str
                        if a.dtype.kind != "O" else "<f8")


@st.composite
def zip_member_mutations(draw, data: bytes):
    """A zip archive with one member damaged but a valid CRC, a member dropped, or one added.

    ``.npy`` members are replaced by `array_mutations` of their array half of the time, so
    the damage reaches the reader's checks of dtypes, shapes and values.
    """
    members = zip_members(data)
    names = list(members)
    kind = draw(st.sampled_from(["member", "member", "member", "drop", "add", "duplicate"]))
    if kind == "drop" and names:
        del members[draw(st.sampled_from(names))]
        return make_zip(members)
    if kind == "add":
        name = draw(st.sampled_from(["extra.npy", "x.json", names[0] if names else "a"]))
        members[name] = draw(st.binary(max_size=64))
        return make_zip(members)
    if kind == "duplicate" and names:
        # Two members of one name: zipfile reads the last one.
        name = draw(st.sampled_from(names))
        raw = make_zip(members)
        buf = io.BytesIO(raw)
        with zipfile.ZipFile(buf, "a") as zf:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zf.writestr(name, draw(byte_mutations(members[name])))
        return buf.getvalue()
    if not names:
        return data
    name = draw(st.sampled_from(names))
    content = members[name]
    if name.endswith(".npy") and draw(st.booleans()):
        try:
            array = np.lib.format.read_array(io.BytesIO(content), allow_pickle=False)
        except ValueError:
            array = None
        if array is not None:
            members[name] = draw(array_mutations(array))
            return make_zip(members)
    if name.endswith(".json") and draw(st.booleans()):
        try:
            doc = json.loads(content)
        except ValueError:
            doc = None
        if doc is not None:
            members[name] = draw(json_text_mutations(doc)).encode()
            return make_zip(members)
    members[name] = draw(byte_mutations(content))
    return make_zip(members)


def _paths(node, prefix=()):
    """Every path into a JSON tree, as tuples of keys and indices."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _replace(node, path, value):
    if not path:
        return value
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[path[0]] = _replace(node[path[0]], path[1:], value)
    return copy


def _delete(node, path):
    copy = dict(node) if isinstance(node, dict) else list(node)
    if len(path) == 1:
        del copy[path[0]]
    else:
        copy[path[0]] = _delete(node[path[0]], path[1:])
    return copy


@st.composite
def json_text_mutations(draw, doc):
    """The JSON text of `doc` with a field retyped, inflated, deleted, or nested 100,000 deep, or the text cut."""
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["retype", "inflate", "delete", "deepen", "cut"]))
    if kind == "deepen":
        # Built as text: json.dumps itself would hit the recursion limit.
        marker = "__DEEP__"
        text = json.dumps(_replace(doc, path, marker))
        return text.replace(json.dumps(marker), "[" * DEEP + "]" * DEEP, 1)
    if kind == "cut":
        text = json.dumps(doc)
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "delete" and path:
        return json.dumps(_delete(doc, path))
    if kind == "inflate":
        return json.dumps(_replace(doc, path, draw(st.sampled_from(INFLATE))))
    return json.dumps(_replace(doc, path, draw(st.sampled_from(ODD_VALUES))))


@st.composite
def file_mutations(draw, data: bytes):
    """Any damage to `data`: zip-level when it is a zip archive, byte-level always possible."""
    if data[:2] == b"PK" and draw(st.integers(0, 3)):
        return draw(zip_member_mutations(data))
    return draw(byte_mutations(data))
