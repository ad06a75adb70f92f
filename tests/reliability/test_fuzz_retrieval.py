"""Property tests: hostile and broken list files of the retrieval benchmarks (facems.protocols.retrieval).

CUB-200-2011, SOP and In-Shop list files are mutated line by line and byte by byte; each reader either
returns what an independent plain-Python reading gives, or raises RetrievalFormatError naming the file
and the line. Cars196's ``cars_annos.mat`` is fuzzed as bytes and as random annotation structs.
Format as read: UTF-8, lines ending in \\n, \\r\\n or \\r, fields split on any whitespace, blank lines
skipped, integers of ASCII digits (optional sign) that fit int64.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
from _fuzz import Draw, fuzz_settings
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from facems.protocols.retrieval import (
    RetrievalDataset,
    RetrievalFormatError,
    read_cars,
    read_cub,
    read_inshop,
    read_sop,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::scipy.io.matlab.MatReadWarning"),
]

FUZZ = fuzz_settings(100)

Split = tuple[list[str], list[int]]

# ---------------------------------------------------------------------------------------------------
# Reference readers
# ---------------------------------------------------------------------------------------------------


def _lines(data: bytes) -> list[str] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def _int(token: str) -> int | None:
    """An integer token: optional sign, ASCII digits, at most 20 characters, in int64."""
    if len(token) > 20:
        return None
    digits = token[1:] if token[:1] in ("+", "-") else token
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(token)
    return value if -(2**63) <= value < 2**63 else None


def _rows(data: bytes, nf: int, skip: int = 0) -> list[list[str]] | None:
    lines = _lines(data)
    if lines is None:
        return None
    rows = [line.split() for line in lines[skip:] if line.strip()]
    if not rows or any(len(r) != nf for r in rows):
        return None
    return rows


def _half(paths: list[str], labels: list[int]) -> tuple[Split, Split] | None:
    classes = sorted(set(labels))
    if classes != list(range(1, len(classes) + 1)):
        return None
    cut = len(classes) // 2
    train = [(p, c) for p, c in zip(paths, labels) if c <= cut]
    test = [(p, c) for p, c in zip(paths, labels) if c > cut]
    return ([p for p, _ in train], [c for _, c in train]), ([p for p, _ in test], [c for _, c in test])


def _ref_cub(base: Path, images: bytes, labels: bytes) -> tuple[Split, Split] | None:
    image_rows, label_rows = _rows(images, 2), _rows(labels, 2)
    if image_rows is None or label_rows is None:
        return None
    rel: dict[int, str] = {}
    for image_id, path in image_rows:
        key = _int(image_id)
        if key is None or key in rel:
            return None
        rel[key] = path
    cls: dict[int, int] = {}
    for image_id, class_id in label_rows:
        key, value = _int(image_id), _int(class_id)
        if key is None or key not in rel or key in cls or value is None:
            return None
        cls[key] = value
    if set(cls) != set(rel):
        return None
    ids = sorted(rel)
    return _half([os.path.abspath(base / "images" / rel[i]) for i in ids], [cls[i] for i in ids])


_EBAY_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _ref_ebay(base: Path, data: bytes) -> Split | None:
    lines = _lines(data)
    if lines is None or not lines or lines[0].split() != _EBAY_HEADER:
        return None
    rows = _rows(data, 4, skip=1)
    if rows is None:
        return None
    labels = [_int(r[1]) for r in rows]
    if any(v is None for v in labels):
        return None
    return [os.path.abspath(base / r[3]) for r in rows], labels  # type: ignore[return-value]


def _ref_inshop(base: Path, data: bytes) -> dict[str, Split] | None:
    lines = _lines(data)
    if lines is None or len(lines) < 2:
        return None
    count = _int(lines[0].strip())
    if count is None or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        return None
    rows = _rows(data, 3, skip=2)
    if rows is None or len(rows) != count:
        return None
    parts: dict[str, Split] = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
    for name, item, status in rows:
        digits = item[3:]
        if not item.startswith("id_") or not (
            0 < len(digits) <= 19 and digits.isascii() and digits.isdigit()
        ):
            return None
        if status not in parts or int(digits) >= 2**63:
            return None
        parts[status][0].append(os.path.abspath(base / name))
        parts[status][1].append(int(digits))
    if not parts["query"][0] or not parts["gallery"][0]:
        return None
    return parts


# ---------------------------------------------------------------------------------------------------
# Seeds and mutations
# ---------------------------------------------------------------------------------------------------

_FIELD_VALUES = [
    "",
    "0",
    "-1",
    "+3",
    "007",
    "1_0",
    "0x1",
    "1.0",
    "nan",
    str(2**63 - 1),
    str(2**63),
    "9" * 30,
    "9" * 5000,
    "-" + "9" * 25,
    "\u0663",
    "\uff11",
    "a\u00a0b",
    "a\x1cb",
    "a\u2028b",
    "\x00",
    "\ufeff1",
    "id_",
    "id_12",
    "id_" + "9" * 19,
    "id_" + "9" * 5000,
    "id_\u0663",
    "train",
    "query",
    "gallery",
    "Query",
    "images/x y.jpg",
]
_RAW_VALUES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]


def _mutate(draw: Draw, data: bytes) -> bytes:
    lines = data.decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    raw_parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            lines.append("")
        i = draw(st.integers(0, len(lines) - 1))
        fields = lines[i].split(" ")
        kind = draw(
            st.sampled_from(
                ["field", "field", "field", "raw", "extra", "drop", "dup", "delete", "junk", "eol"]
            )
        )
        if kind == "field":
            j = draw(st.integers(0, len(fields) - 1))
            fields[j] = draw(st.sampled_from(_FIELD_VALUES) | st.text(max_size=5))
            lines[i] = " ".join(fields)
        elif kind == "raw":
            raw_parts.append(draw(st.sampled_from(_RAW_VALUES)))
            lines[i] += "\x00RAW\x00"
        elif kind == "extra":
            lines[i] += " " + draw(st.sampled_from(["1", "x", "\t"]))
        elif kind == "drop":
            lines[i] = " ".join(fields[:-1])
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "delete":
            del lines[i]
        elif kind == "junk":
            lines.insert(i, draw(st.text(max_size=10)))
        elif kind == "eol":
            lines[i] += draw(st.sampled_from(["\r", "\x0b", "\x1c", "\u2028", "\x85", " "]))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    out = (eol.join(lines) + (eol if draw(st.booleans()) else "")).encode("utf-8", "surrogatepass")
    for raw in raw_parts:
        out = out.replace(b"\x00RAW\x00", raw, 1)
    if draw(st.integers(0, 4)) == 0:
        buf = bytearray(out)
        if buf:
            pos = draw(st.integers(0, len(buf) - 1))
            if draw(st.booleans()):
                buf[pos] = draw(st.integers(0, 255))
            else:
                del buf[pos:]
        out = bytes(buf)
    return out


def _seed_cub(draw: Draw) -> tuple[bytes, bytes]:
    n = draw(st.integers(2, 8))
    classes = draw(st.integers(1, min(n, 4)))
    labels = [1 + i % classes for i in range(n)]
    images = "".join(f"{i + 1} {labels[i]:03d}.Bird/img_{i}.jpg\n" for i in range(n))
    label_text = "".join(f"{i + 1} {labels[i]}\n" for i in range(n))
    return images.encode(), label_text.encode()


def _seed_ebay(draw: Draw) -> bytes:
    n = draw(st.integers(1, 6))
    rows = "".join(
        f"{i + 1} {draw(st.integers(1, 20))} {draw(st.integers(1, 12))} bike_final/{i}.JPG\n"
        for i in range(n)
    )
    return ("image_id class_id super_class_id path\n" + rows).encode()


def _seed_inshop(draw: Draw) -> bytes:
    statuses = [
        "query",
        "gallery",
        *draw(st.lists(st.sampled_from(["train", "query", "gallery"]), max_size=5)),
    ]
    rows = "".join(
        f"img/WOMEN/Dresses/id_{draw(st.integers(0, 99999)):08d}/0{i}_1_front.jpg id_{draw(st.integers(0, 99999)):08d} {s}\n"
        for i, s in enumerate(statuses)
    )
    return (f"{len(statuses)}\nimage_name item_id evaluation_status\n" + rows).encode()


_PLACE = re.compile(
    r":\d+: |: no entries|: no (query|gallery) images|class ids 1\.\.|: no class for image_id"
)


def _run(paths: list[Path], read: Callable[[], RetrievalDataset], expected: Any) -> RetrievalDataset | None:
    try:
        ds = read()
    except RetrievalFormatError as e:
        if currently_in_test_context():
            event("refused")
        message = str(e)
        assert any(message.startswith(str(p)) for p in paths), message
        assert _PLACE.search(message), message
        assert expected is None, f"refused valid files: {message}"
        return None
    if currently_in_test_context():
        event("read")
    assert expected is not None, "read files the reference refuses"
    return ds


def _assert_split(got: Any, want: Split) -> None:
    assert list(got.paths) == want[0]
    assert got.labels.dtype == np.int64 and got.labels.tolist() == want[1]


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), which=st.sampled_from(["images", "images", "labels", "both", "none"]))
def test_cub_lists(tmp_path: Path, data: st.DataObject, which: str) -> None:
    images, labels = _seed_cub(data.draw)
    if which in ("images", "both"):
        images = _mutate(data.draw, images)
    if which in ("labels", "both"):
        labels = _mutate(data.draw, labels)
    (tmp_path / "images.txt").write_bytes(images)
    (tmp_path / "image_class_labels.txt").write_bytes(labels)
    expected = _ref_cub(tmp_path, images, labels)
    ds = _run(
        [tmp_path / "images.txt", tmp_path / "image_class_labels.txt"],
        lambda: read_cub(str(tmp_path)),
        expected,
    )
    if ds is not None:
        _assert_split(ds.train, expected[0])  # type: ignore[index]
        _assert_split(ds.query, expected[1])  # type: ignore[index]


@FUZZ
@given(data=st.data(), which=st.sampled_from(["Ebay_train.txt", "Ebay_test.txt"]))
def test_sop_lists(tmp_path: Path, data: st.DataObject, which: str) -> None:
    files = {"Ebay_train.txt": _seed_ebay(data.draw), "Ebay_test.txt": _seed_ebay(data.draw)}
    files[which] = _mutate(data.draw, files[which])
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    train, test = _ref_ebay(tmp_path, files["Ebay_train.txt"]), _ref_ebay(tmp_path, files["Ebay_test.txt"])
    expected = None if train is None or test is None else (train, test)
    ds = _run([tmp_path / n for n in files], lambda: read_sop(str(tmp_path)), expected)
    if ds is not None:
        _assert_split(ds.train, expected[0])  # type: ignore[index]
        _assert_split(ds.query, expected[1])  # type: ignore[index]


@FUZZ
@given(data=st.data())
def test_inshop_partition_list(tmp_path: Path, data: st.DataObject) -> None:
    raw = _mutate(data.draw, _seed_inshop(data.draw))
    path = tmp_path / "list_eval_partition.txt"
    path.write_bytes(raw)
    expected = _ref_inshop(tmp_path, raw)
    ds = _run([path], lambda: read_inshop(str(tmp_path)), expected)
    if ds is not None:
        _assert_split(ds.train, expected["train"])  # type: ignore[index]
        _assert_split(ds.query, expected["query"])  # type: ignore[index]
        _assert_split(ds.gallery, expected["gallery"])  # type: ignore[index]


@FUZZ
@given(data=st.binary(max_size=120), reader=st.sampled_from(["cub", "sop", "inshop"]))
def test_random_bytes_as_list_files(tmp_path: Path, data: bytes, reader: str) -> None:
    if reader == "cub":
        names = ["images.txt", "image_class_labels.txt"]
        expected: Any = _ref_cub(tmp_path, data, data)
        read: Callable[[], RetrievalDataset] = lambda: read_cub(str(tmp_path))  # noqa: E731
    elif reader == "sop":
        names = ["Ebay_train.txt", "Ebay_test.txt"]
        expected = _ref_ebay(tmp_path, data)
        read = lambda: read_sop(str(tmp_path))  # noqa: E731
    else:
        names = ["list_eval_partition.txt"]
        expected = _ref_inshop(tmp_path, data)
        read = lambda: read_inshop(str(tmp_path))  # noqa: E731
    for name in names:
        (tmp_path / name).write_bytes(data)
    _run([tmp_path / n for n in names], read, expected)


# --- Cars196: cars_annos.mat ------------------------------------------------------------------------


def _mat_bytes(records: list[tuple[Any, Any]]) -> bytes:
    ann = np.zeros(len(records), dtype=[("relative_im_path", object), ("class", object), ("test", object)])
    for i, (path, cls) in enumerate(records):
        ann[i] = (path, cls, 0)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"annotations": ann})
    return buf.getvalue()


def _ref_cars(root: Path, data: bytes) -> tuple[Split, Split] | None:
    """The test's own reading of what scipy gives for the file."""
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
    except Exception:
        return None
    ann = mat.get("annotations")
    if not isinstance(ann, np.ndarray) or ann.dtype.names is None:
        return None
    if "relative_im_path" not in ann.dtype.names or "class" not in ann.dtype.names:
        return None
    paths, labels = [], []
    for rec in np.atleast_1d(ann):
        path, cls = rec["relative_im_path"], rec["class"]
        if not isinstance(path, str) or not path:
            return None
        try:
            value = float(cls)
        except (TypeError, ValueError):
            return None
        if value != value or value in (float("inf"), float("-inf")) or abs(value) >= 2**63 or value % 1:
            return None
        paths.append(os.path.abspath(root / path))
        labels.append(int(value))
    return _half(paths, labels)


_class_values = st.one_of(
    st.integers(1, 4),
    st.sampled_from([0, -1, 1.5, float("nan"), float("inf"), -float("inf"), 1e300, 2.0**63, "3", "x"]),
    st.just(np.array([1, 2])),
)
_path_values = st.one_of(
    st.sampled_from(["car_ims/000001.jpg", "car_ims/x.jpg"]),
    st.sampled_from(["", 5, np.array([1.0])]),
)


@st.composite
def _cars_records(draw: Draw) -> list[tuple[Any, Any]]:
    """Valid records (classes 1..C), then a few of their paths or classes replaced."""
    n = draw(st.integers(1, 5))
    records: list[tuple[Any, Any]] = [
        (f"car_ims/{i:06d}.jpg", 1 + i % draw(st.integers(1, n))) for i in range(n)
    ]
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, n - 1))
        path, cls = records[i]
        records[i] = (draw(_path_values), cls) if draw(st.booleans()) else (path, draw(_class_values))
    return records


@settings(FUZZ, max_examples=80)
@given(records=_cars_records(), mutate=st.booleans(), data=st.data())
def test_cars_annotations(
    tmp_path: Path, records: list[tuple[Any, Any]], mutate: bool, data: st.DataObject
) -> None:
    raw = _mat_bytes(records)
    if mutate:  # byte edits of the MATLAB file itself
        buf = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(buf) - 1))
            kind = data.draw(st.sampled_from(["set", "truncate", "word"]))
            if kind == "set":
                buf[pos] = data.draw(st.integers(0, 255))
            elif kind == "truncate":
                del buf[max(pos, 1) :]
            else:
                buf[pos : pos + 4] = data.draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1])).to_bytes(
                    4, "little"
                )
        raw = bytes(buf)
    path = tmp_path / "cars_annos.mat"
    path.write_bytes(raw)
    expected = _ref_cars(tmp_path, raw)
    try:
        ds = read_cars(str(tmp_path))
    except RetrievalFormatError as e:
        event("refused")
        message = str(e)
        assert message.startswith(str(path)), message
        assert re.search(r"annotations|MATLAB|class ids", message), message
        assert expected is None, f"refused a valid file: {message}"
    else:
        event("read")
        assert expected is not None, "read a file the reference refuses"
        _assert_split(ds.train, expected[0])
        _assert_split(ds.query, expected[1])


def _edit_mat(raw: bytes, find: bytes, offset: int, new: bytes) -> bytes:
    pos = raw.index(find) + offset
    return raw[:pos] + new + raw[pos + len(new) :]


@pytest.mark.parametrize(
    ("name", "find", "offset", "new"),
    [
        # The type field of a path's character data (miUTF8 = 16) made 0x9510: scipy looks the type
        # up in a C table without a bounds check and crashes (found by the property above).
        ("type_out_of_table", b"\x10\x00\x00\x00\x12\x00\x00\x00car_ims", 1, b"\x95"),
        # An int64 class value flagged complex: scipy reads the imaginary part from the next sibling
        # element (a matrix), again through the unchecked table.
        (
            "complex_flag_without_imaginary_part",
            b"\x06\x00\x00\x00\x08\x00\x00\x00\x0e\x00\x00\x00",
            9,
            b"\x08",
        ),
        # A path's array flags say "sparse": scipy reads its character data as sparse indices (crash).
        ("char_flagged_as_sparse", b"\x06\x00\x00\x00\x08\x00\x00\x00\x04\x00\x00\x00", 8, b"\x05"),
        # Dimensions claiming 2**31 - 1 records: scipy allocates object arrays of that size (48 GiB).
        (
            "huge_dimensions",
            b"\x05\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00",
            12,
            b"\xff\xff\xff\x7f",
        ),
    ],
)
def test_mat_files_that_crash_or_exhaust_scipy_are_refused_first(
    tmp_path: Path, name: str, find: bytes, offset: int, new: bytes
) -> None:
    raw = _mat_bytes([("car_ims/000001.jpg", 1), ("car_ims/000002.jpg", 2)])
    assert read_cars(str(_write(tmp_path / "ok", raw))).query.labels.tolist() == [2]
    broken = _edit_mat(raw, find, offset, new)
    assert broken != raw and len(broken) == len(raw)
    path = _write(tmp_path / name, broken) / "cars_annos.mat"
    with pytest.raises(RetrievalFormatError, match=r"at byte offset \d+") as info:
        read_cars(str(path.parent))
    assert str(info.value).startswith(str(path))


def _write(folder: Path, raw: bytes) -> Path:
    folder.mkdir()
    (folder / "cars_annos.mat").write_bytes(raw)
    return folder


@pytest.mark.parametrize("value", _FIELD_VALUES, ids=ascii)
@pytest.mark.parametrize(
    "field", ["cub_image_id", "cub_class_id", "sop_class_id", "inshop_item_id", "inshop_count"]
)
def test_every_listed_value_in_every_number_field(tmp_path: Path, field: str, value: str) -> None:
    """Each hostile value of the list above in each integer field: read as the reference reads it, or
    refused naming the line (the random properties only sample these values)."""
    v = value
    if field.startswith("cub"):
        images = f"{v if field == 'cub_image_id' else 1} a/1.jpg\n2 b/2.jpg\n".encode(
            "utf-8", "surrogatepass"
        )
        labels = f"1 {v if field == 'cub_class_id' else 1}\n2 2\n".encode("utf-8", "surrogatepass")
        (tmp_path / "images.txt").write_bytes(images)
        (tmp_path / "image_class_labels.txt").write_bytes(labels)
        expected: Any = _ref_cub(tmp_path, images, labels)
        ds = _run(
            [tmp_path / "images.txt", tmp_path / "image_class_labels.txt"],
            lambda: read_cub(str(tmp_path)),
            expected,
        )
        if ds is not None:
            _assert_split(ds.query, expected[1])
    elif field.startswith("sop"):
        raw = f"image_id class_id super_class_id path\n1 {v} 1 a/1.JPG\n".encode("utf-8", "surrogatepass")
        for name in ("Ebay_train.txt", "Ebay_test.txt"):
            (tmp_path / name).write_bytes(raw)
        split = _ref_ebay(tmp_path, raw)
        ds = _run([tmp_path / "Ebay_train.txt"], lambda: read_sop(str(tmp_path)), split)
        if ds is not None:
            _assert_split(ds.query, split)  # type: ignore[arg-type]
    else:
        item = v if field == "inshop_item_id" else "id_00000001"
        count = v if field == "inshop_count" else "2"
        raw = (
            f"{count}\nimage_name item_id evaluation_status\nimg/1.jpg {item} query\nimg/2.jpg id_2 gallery\n"
        )
        data = raw.encode("utf-8", "surrogatepass")
        (tmp_path / "list_eval_partition.txt").write_bytes(data)
        parts = _ref_inshop(tmp_path, data)
        ds = _run([tmp_path / "list_eval_partition.txt"], lambda: read_inshop(str(tmp_path)), parts)
        if ds is not None:
            _assert_split(ds.query, parts["query"])  # type: ignore[index]
