"""Property tests: hostile and broken IJB-B/C meta files against facems.protocols.ijb's readers.

Each reader either returns exactly what an independent plain-Python reading of the documented format
gives, or raises IJBMetaError naming the file and the line (or saying the file holds no data). The
format as read here: UTF-8 text, lines ending in \\n, \\r\\n or \\r, fields separated by any Unicode
whitespace, blank lines skipped; integers are ASCII digits with an optional sign that fit int64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fuzz import Draw, fuzz_settings
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from facems.protocols.ijb import (
    IJBMetaError,
    meta_paths,
    read_face_tid_mid,
    read_ijb_meta,
    read_name_5pts_score,
    read_template_pair_list,
    read_template_subject_list,
)

pytestmark = pytest.mark.timeout(120)

FUZZ = fuzz_settings(60)


# ---------------------------------------------------------------------------------------------------
# Reference readers
# ---------------------------------------------------------------------------------------------------


def _text_lines(data: bytes) -> list[str] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def _int(token: str, low: int = 0) -> int | None:
    """An integer token: optional sign, ASCII digits, at most 20 characters, in [low, 2**63)."""
    if len(token) > 20:
        return None
    sign, digits = (token[0], token[1:]) if token[:1] in ("+", "-") else ("+", token)
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = -int(digits) if sign == "-" else int(digits)
    return value if low <= value < 2**63 else None


def _float(token: str) -> float | None:
    if not token or any(c not in "0123456789+-.eE" for c in token):
        return None
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _rows(data: bytes, ncols: int) -> list[list[str]] | None:
    if not data.strip():
        return None
    lines = _text_lines(data)
    if lines is None:
        return None
    rows = [line.split() for line in lines]
    rows = [r for r in rows if r]
    if not rows or any(len(r) != ncols for r in rows):
        return None
    return rows


def _ref_face_tid_mid(data: bytes) -> tuple[list[str], list[int], list[int]] | None:
    rows = _rows(data, 3)
    if rows is None:
        return None
    values = [[_int(t) for t in r[1:]] for r in rows]
    if any(v is None for vs in values for v in vs):
        return None
    return [r[0] for r in rows], [int(v[0]) for v in values], [int(v[1]) for v in values]  # type: ignore[arg-type]


def _ref_5pts(data: bytes) -> tuple[list[str], list[list[float]]] | None:
    rows = _rows(data, 12)
    if rows is None:
        return None
    values = [[_float(t) for t in r[1:]] for r in rows]
    if any(v is None for vs in values for v in vs):
        return None
    return [r[0] for r in rows], values  # type: ignore[return-value]


def _ref_pairs(data: bytes) -> list[tuple[int, int, bool]] | None:
    rows = _rows(data, 3)
    if rows is None:
        return None
    out = []
    for r in rows:
        t1, t2, label = _int(r[0]), _int(r[1]), _int(r[2])
        if t1 is None or t2 is None or label not in (0, 1):
            return None
        out.append((t1, t2, label == 1))
    return out


def _ref_subjects(data: bytes) -> list[tuple[int, int]] | None:
    if not data.strip():
        return None
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    header = lines[0]
    if header.startswith(b"\xef\xbb\xbf"):
        header = header[3:]
    names = [h.strip().upper() for h in header.decode("utf-8", "replace").split(",")]
    if names[:2] != ["TEMPLATE_ID", "SUBJECT_ID"]:
        return None
    out: list[tuple[int, int]] = []
    subject_of: dict[int, int] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        cells = [c.strip().decode("latin-1") for c in line.split(b",")]
        if len(cells) < 2:
            return None
        t, s = _int(cells[0]), _int(cells[1], low=-(2**63))
        if t is None or s is None or subject_of.setdefault(t, s) != s:
            return None
        out.append((t, s))
    return out or None


# ---------------------------------------------------------------------------------------------------
# Seeds and mutations
# ---------------------------------------------------------------------------------------------------

_NAMES = ["1.jpg", "img/12.jpg", "frames/3_0.png", "voilà.jpg", "名前.jpg", "a b.jpg"]


def _seed_files(draw: Draw) -> dict[str, bytes]:
    """Consistent meta files of a tiny release (every template has a face)."""
    n = draw(st.integers(2, 6))
    names = [f"{i}_{draw(st.sampled_from(_NAMES)).replace(' ', '_')}" for i in range(n)]
    templates = [draw(st.integers(0, 3)) for _ in range(n)]
    medias = [draw(st.integers(0, 5)) for _ in range(n)]
    face = "".join(f"{a} {t} {m}\n" for a, t, m in zip(names, templates, medias))
    pts = "".join(
        f"{a} "
        + " ".join(f"{draw(st.floats(0, 200)):.3f}" for _ in range(10))
        + f" {draw(st.floats(0, 1)):.4f}\n"
        for a in names
    )
    known = sorted(set(templates))
    pair_rows = [
        (draw(st.sampled_from(known)), draw(st.sampled_from(known)), draw(st.integers(0, 1)))
        for _ in range(draw(st.integers(1, 5)))
    ]
    pairs = "".join(f"{a} {b} {c}\n" for a, b, c in pair_rows)
    subject = {t: 100 + t for t in known}

    def one_n(rows: list[int]) -> str:
        return "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{t},{subject[t]},x.jpg\n" for t in rows)

    return {
        "face_tid_mid": face.encode(),
        "name_5pts_score": pts.encode(),
        "template_pair_label": pairs.encode(),
        "G1": one_n(known[: max(1, len(known) // 2)]).encode(),
        "G2": one_n(known[len(known) // 2 :] or known).encode(),
        "probe_mixed": one_n(known).encode(),
    }


_FIELD_VALUES = [
    "",
    "-1",
    "-0",
    "+7",
    "007",
    "1_0",
    "0x10",
    "1.5",
    "1e3",
    ".5",
    "5.",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "infinity",
    str(2**63 - 1),
    str(2**63),
    str(2**64),
    "9" * 30,
    "9" * 5000,
    "-" + "9" * 25,
    "\u0663",  # Arabic-Indic three: a digit to Python, not to the format
    "\uff11",  # fullwidth one
    "a\u00a05",  # no-break space inside a field
    "a\x1c5",  # information separator: whitespace to str.split
    "a\u20285",  # line separator: whitespace, not a line break, to numpy
    "a\x855",  # next line (NEL)
    "\x00",
    "\ufeff1",
    "x,y",
]

_RAW_VALUES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\xa05", b"\x80\x80"]


def _mutate_lines(draw: Draw, data: bytes, sep: str) -> bytes:
    """Line and field edits: replaced fields, wrong counts, odd separators and line ends, junk."""
    lines = data.decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    raw_parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            lines.append("")
        i = draw(st.integers(0, len(lines) - 1))
        fields = lines[i].split(sep)
        kind = draw(
            st.sampled_from(["field", "raw", "extra", "drop", "dup", "delete", "junk", "eol", "blank"])
        )
        if kind == "field":
            j = draw(st.integers(0, len(fields) - 1))
            fields[j] = draw(st.sampled_from(_FIELD_VALUES) | st.text(max_size=5))
            lines[i] = sep.join(fields)
        elif kind == "raw":  # a byte sequence that is not UTF-8, placed later
            raw_parts.append(draw(st.sampled_from(_RAW_VALUES)))
            lines[i] = lines[i] + "\x00RAW\x00"
        elif kind == "extra":
            lines[i] += sep + draw(st.sampled_from(["0", "", "1.0", "x"]))
        elif kind == "drop":
            lines[i] = sep.join(fields[:-1])
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "delete":
            del lines[i]
        elif kind == "junk":
            lines.insert(i, draw(st.text(max_size=12)))
        elif kind == "eol":
            lines[i] += draw(st.sampled_from(["\r", "\r\r", "\x0b", "\x0c", "\u2028", "\x85", "\t", " "]))
        elif kind == "blank":
            lines.insert(i, draw(st.sampled_from(["", " ", "\t", "\x1c", "\u3000"])))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = eol.join(lines) + (eol if draw(st.booleans()) else "")
    out = text.encode("utf-8", "surrogatepass")
    for raw in raw_parts:
        out = out.replace(b"\x00RAW\x00", raw, 1)
    if draw(st.integers(0, 4)) == 0:  # and sometimes a byte-level edit
        buf = bytearray(out)
        if buf:
            pos = draw(st.integers(0, len(buf) - 1))
            if draw(st.booleans()):
                buf[pos] = draw(st.integers(0, 255))
            else:
                del buf[pos:]
        out = bytes(buf)
    return out


_PLACE = re.compile(r":\d+: |: the file is empty|: no data lines|: no rows after the header")


def _assert_names_file_and_place(e: IJBMetaError, path: Path) -> None:
    message = str(e)
    assert message.startswith(str(path)), message
    assert _PLACE.search(message), message


def _run(path: Path, data: bytes, reader: Callable[[Path], Any], expected: Any) -> Any:
    path.write_bytes(data)
    try:
        got = reader(path)
    except IJBMetaError as e:
        if currently_in_test_context():
            event("refused")
        _assert_names_file_and_place(e, path)
        assert expected is None, f"refused a valid file: {e}"
        return None
    if currently_in_test_context():
        event("read")
    assert expected is not None, "read a file the reference refuses"
    return got


# ---------------------------------------------------------------------------------------------------
# Properties, one per reader
# ---------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_face_tid_mid(tmp_path: Path, data: st.DataObject) -> None:
    raw = _mutate_lines(data.draw, _seed_files(data.draw)["face_tid_mid"], " ")
    expected = _ref_face_tid_mid(raw)
    got = _run(tmp_path / "ijbc_face_tid_mid.txt", raw, read_face_tid_mid, expected)
    if got is not None:
        names, templates, medias = got
        assert names == expected[0]
        assert templates.dtype == medias.dtype == np.int64
        assert templates.tolist() == expected[1] and medias.tolist() == expected[2]


@FUZZ
@given(data=st.data())
def test_name_5pts_score(tmp_path: Path, data: st.DataObject) -> None:
    raw = _mutate_lines(data.draw, _seed_files(data.draw)["name_5pts_score"], " ")
    expected = _ref_5pts(raw)
    got = _run(tmp_path / "ijbc_name_5pts_score.txt", raw, read_name_5pts_score, expected)
    if got is not None:
        names, landmarks, scores = got
        assert names == expected[0]
        want = np.array(expected[1], dtype=np.float32)
        np.testing.assert_array_equal(landmarks, want[:, :10].reshape(-1, 5, 2))
        np.testing.assert_array_equal(scores, want[:, 10])


@FUZZ
@given(data=st.data())
def test_template_pair_label(tmp_path: Path, data: st.DataObject) -> None:
    raw = _mutate_lines(data.draw, _seed_files(data.draw)["template_pair_label"], " ")
    expected = _ref_pairs(raw)
    got = _run(tmp_path / "ijbc_template_pair_label.txt", raw, read_template_pair_list, expected)
    if got is not None:
        t1, t2, labels = got
        assert list(zip(t1.tolist(), t2.tolist(), labels.tolist())) == expected


@FUZZ
@given(data=st.data())
def test_1n_gallery_and_probe_csv(tmp_path: Path, data: st.DataObject) -> None:
    raw = _mutate_lines(data.draw, _seed_files(data.draw)["probe_mixed"], ",")
    expected = _ref_subjects(raw)
    got = _run(tmp_path / "ijbc_1N_probe_mixed.csv", raw, read_template_subject_list, expected)
    if got is not None:
        templates, subjects = got
        assert list(zip(templates.tolist(), subjects.tolist())) == expected


@settings(FUZZ, max_examples=100)
@given(data=st.binary(max_size=200), reader=st.sampled_from(["face", "pts", "pairs", "csv"]))
def test_random_bytes_in_every_meta_file(tmp_path: Path, data: bytes, reader: str) -> None:
    fn, ref = {
        "face": (read_face_tid_mid, _ref_face_tid_mid),
        "pts": (read_name_5pts_score, _ref_5pts),
        "pairs": (read_template_pair_list, _ref_pairs),
        "csv": (read_template_subject_list, _ref_subjects),
    }[reader]
    got = _run(tmp_path / f"random_{reader}.txt", data, fn, ref(data))
    if got is not None:  # random bytes that happen to be valid: compare like the tests above
        assert ref(data) is not None


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_release_folder_with_one_broken_file(tmp_path: Path, data: st.DataObject) -> None:
    """read_ijb_meta reads all files and cross-checks them; any broken one is named."""
    files = _seed_files(data.draw)
    broken = data.draw(st.sampled_from(sorted(files)))
    files[broken] = _mutate_lines(
        data.draw, files[broken], "," if broken in ("G1", "G2", "probe_mixed") else " "
    )
    paths = meta_paths(tmp_path, "IJBC")
    Path(paths["face_tid_mid"]).parent.mkdir(exist_ok=True)
    for key, raw in files.items():
        Path(paths[key]).write_bytes(raw)

    face = _ref_face_tid_mid(files["face_tid_mid"])
    pts = _ref_5pts(files["name_5pts_score"])
    pairs = _ref_pairs(files["template_pair_label"])
    one_n = [_ref_subjects(files[k]) for k in ("G1", "G2", "probe_mixed")]
    valid = face is not None and pts is not None and pairs is not None and all(x is not None for x in one_n)
    if valid:
        known = set(face[1])  # type: ignore[index]
        valid = (
            pts[0] == face[0]  # type: ignore[index]
            and all(a in known and b in known for a, b, _ in pairs)  # type: ignore[union-attr]
            and all(t in known for rows in one_n for t, _ in rows)  # type: ignore[union-attr]
        )
    try:
        meta = read_ijb_meta(tmp_path, "IJBC")
    except IJBMetaError as e:
        event("refused")
        message = str(e)
        assert any(message.startswith(p) for p in paths.values()), message
        place = r":\d+: |empty|no data lines|no rows after the header|has no face in|: face \d+ \("
        assert re.search(place, message), message
        assert not valid, f"refused a valid release: {message}"
    else:
        event("read")
        assert valid, f"read a release the reference refuses (broken: {broken})"
        assert meta.names == face[0]  # type: ignore[index]
        assert meta.templates.tolist() == face[1]  # type: ignore[index]
        assert meta.labels.size == len(pairs)  # type: ignore[arg-type]


def test_names_with_separator_characters_do_not_shift_the_numbers(tmp_path: Path) -> None:
    """A regression found by the fuzzer: names were split as bytes, the numbers by numpy's reader,
    which also splits on Unicode whitespace, so 'a\\x1c5 1 2' read as template 5, media 1."""
    path = tmp_path / "face_tid_mid.txt"
    path.write_bytes("a\x1c5 1 2\nb\u00a07 3 4\n".encode())
    with pytest.raises(IJBMetaError, match=r":1: expected 3 fields"):
        read_face_tid_mid(path)
    path.write_bytes("voilà.jpg 1 2\n名前.jpg 3 4\r\n".encode())
    names, templates, medias = read_face_tid_mid(path)
    assert names == ["voilà.jpg", "名前.jpg"]
    assert templates.tolist() == [1, 3] and medias.tolist() == [2, 4]


_SWEEP_READERS: dict[str, tuple[Callable[[str], str], Callable[[Path], Any], Callable[[bytes], Any]]] = {
    "face_tid_mid": (lambda v: f"a.jpg {v} 2\nb.jpg 3 4\n", read_face_tid_mid, _ref_face_tid_mid),
    "name_5pts_score": (lambda v: "a.jpg " + "1.5 " * 10 + f"{v}\n", read_name_5pts_score, _ref_5pts),
    "template_pair_label": (lambda v: f"1 {v} 0\n2 3 1\n", read_template_pair_list, _ref_pairs),
    "1N_probe_mixed": (
        lambda v: f"TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,{v},x.jpg\n",
        read_template_subject_list,
        _ref_subjects,
    ),
}


@pytest.mark.parametrize("value", _FIELD_VALUES, ids=ascii)
@pytest.mark.parametrize("reader", sorted(_SWEEP_READERS))
def test_every_listed_value_in_a_number_column(tmp_path: Path, reader: str, value: str) -> None:
    """Each hostile value of the list above, in a numeric column of each file: read as the reference
    reads it, or refused naming the line (the random properties only sample these values)."""
    make, read, ref = _SWEEP_READERS[reader]
    raw = make(value).encode("utf-8", "surrogatepass")
    expected = ref(raw)
    got = _run(tmp_path / f"{reader}.txt", raw, read, expected)
    if got is not None:
        if reader == "face_tid_mid":
            assert got[1].tolist() == expected[1]
        elif reader == "name_5pts_score":
            np.testing.assert_array_equal(got[2], np.float32([row[10] for row in expected[1]]))
        elif reader == "template_pair_label":
            assert got[1].tolist() == [t2 for _, t2, _ in expected]
        else:
            assert got[1].tolist() == [s for _, s in expected]


def test_face_files_of_different_lengths_name_the_first_unmatched_face(tmp_path: Path) -> None:
    """Found by the release-folder property: the count mismatch named no face."""
    files = {
        k: v.encode()
        for k, v in {"face_tid_mid": "a.jpg 1 1\nb.jpg 1 1\n", "template_pair_label": "1 1 1\n"}.items()
    }
    files["name_5pts_score"] = ("a.jpg " + "1 " * 11 + "\n").encode()
    paths = meta_paths(tmp_path, "IJBC")
    Path(paths["face_tid_mid"]).parent.mkdir()
    for key, raw in files.items():
        Path(paths[key]).write_bytes(raw)
    with pytest.raises(
        IJBMetaError, match=r"1 faces, but .* lists 2: face 2 \('b\.jpg'\) is only in .*face_tid_mid"
    ):
        read_ijb_meta(tmp_path, "IJBC")
