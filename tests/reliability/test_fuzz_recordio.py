"""Property tests: hostile and broken `.rec`/`.idx` files against facems.data.recordio.

Every input is either read exactly as an independent, plain-loop reference parser reads it, or refused
with a RecordIOError that names the file and the place (byte offset or line). Seeds are the golden
files written by real mxnet (tests/fixtures/recordio) and packs written by IndexedRecordWriter.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fuzz import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from facems.data.recordio import (
    IR_HEADER_SIZE,
    IndexedRecordReader,
    IndexedRecordWriter,
    RecordIOError,
    class_label,
    iter_records,
    unpack,
)

pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of stalling the suite

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recordio"
MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)

FUZZ = fuzz_settings(120)

# ---------------------------------------------------------------------------------------------------
# Reference readers: the format written out as plain loops over the whole file's bytes
# ---------------------------------------------------------------------------------------------------


def _ref_record_at(data: bytes, start: int) -> tuple[bytes, int] | None:
    """The record whose first part starts at ``start`` and the offset after it, or None if invalid."""
    pieces: list[bytes] = []
    pos = start
    while True:
        if pos + 8 > len(data):
            return None
        magic = int.from_bytes(data[pos : pos + 4], "little")
        word = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if magic != MAGIC:
            return None
        kind, size = word // 2**29, word % 2**29
        allowed = (0, 1) if not pieces else (2, 3)
        if kind not in allowed:
            return None
        stored = size + (-size % 4)
        if pos + 8 + stored > len(data):
            return None
        pieces.append(data[pos + 8 : pos + 8 + size])
        pos += 8 + stored
        if kind in (0, 3):
            return MAGIC_BYTES.join(pieces), pos


def _ref_records(data: bytes) -> list[tuple[int, bytes]] | None:
    """Every ``(offset, record)`` of a whole `.rec` file, or None if any part of it is invalid."""
    out = []
    pos = 0
    while pos < len(data):
        found = _ref_record_at(data, pos)
        if found is None:
            return None
        out.append((pos, found[0]))
        pos = found[1]
    return out


def _is_digits(text: str) -> bool:
    return 0 < len(text) <= 20 and all(c in "0123456789" for c in text)


def _ref_idx(data: bytes, rec_size: int) -> list[tuple[int, int]] | None:
    """``(key, offset)`` per line of an `.idx` file, or None when a line, key or offset is invalid.

    Spec: lines end in \\n, \\r or \\r\\n; surrounding whitespace is ignored; a line is a key (optional
    minus, at most 20 digits), one tab, an offset (at most 20 digits); keys are unique; each offset is
    a multiple of 4 with at least 8 bytes of the `.rec` after it.
    """
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for raw in data.splitlines():
        line = raw.decode("ascii", errors="replace").strip()
        fields = line.split("\t")
        if len(fields) != 2:
            return None
        key_text, off_text = fields
        negative = key_text.startswith("-")
        if not _is_digits(key_text[1:] if negative else key_text) or not _is_digits(off_text):
            return None
        key, offset = int(key_text), int(off_text)
        if key in seen or offset % 4 or offset + 8 > rec_size:
            return None
        seen.add(key)
        out.append((key, offset))
    return out


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------

_GOLDEN = sorted(FIXTURES.glob("*.rec"))
_INTERESTING_WORDS = [0, 1, 3, 0xFFFFFFFF, MAGIC, (1 << 29) - 1, 1 << 29, 2 << 29, 3 << 29, 5 << 29, 7 << 29]


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    """Record bytes, sometimes holding the magic at aligned positions (stored as several parts)."""
    chunks = draw(st.lists(st.binary(max_size=24), min_size=1, max_size=4))
    body = b""
    for chunk in chunks:
        body += chunk
        if draw(st.booleans()):
            body += bytes(-len(body) % 4) + MAGIC_BYTES
    return body


@st.composite
def _written_pack(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(rec bytes, idx bytes)`` of a small pack, from the golden mxnet files or from the writer."""
    if draw(st.booleans()):
        rec = draw(st.sampled_from(_GOLDEN))
        return rec.read_bytes(), rec.with_suffix(".idx").read_bytes()
    records = draw(st.lists(_payloads(), min_size=1, max_size=5))
    rec_bytes = b""
    idx_lines = []
    for key, record in enumerate(records):
        idx_lines.append(f"{key}\t{len(rec_bytes)}\n")
        rec_bytes += _encode_like_dmlc(record)
    return rec_bytes, "".join(idx_lines).encode()


def _encode_like_dmlc(record: bytes) -> bytes:
    """dmlc-core's writer: split at aligned magics (dropping them), pad the record to 4 bytes."""
    starts = [0]
    cuts = [i for i in range(0, len(record) - 3, 4) if record[i : i + 4] == MAGIC_BYTES]
    pieces = []
    for cut in cuts:
        pieces.append(record[starts[-1] : cut])
        starts.append(cut + 4)
    pieces.append(record[starts[-1] :])
    out = b""
    for i, piece in enumerate(pieces):
        kind = 0 if len(pieces) == 1 else (1 if i == 0 else (3 if i == len(pieces) - 1 else 2))
        out += MAGIC_BYTES + struct.pack("<I", (kind << 29) | len(piece)) + piece
    return out + bytes(-len(out) % 4)


def _mutate_bytes(draw: Callable[[st.SearchStrategy[Any]], Any], data: bytes) -> bytes:
    """1-4 random edits: bit flips, byte sets, 32-bit words set to edge values, junk, cuts, copies."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "word", "insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif kind == "word":
            pos -= pos % 4
            buf[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from(_INTERESTING_WORDS)))
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 12))]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "duplicate":
            buf[pos:pos] = buf[pos : pos + draw(st.integers(1, 16))]
    return bytes(buf)


@st.composite
def _mutated_rec(draw: st.DrawFn) -> bytes:
    return _mutate_bytes(draw, draw(_written_pack())[0])


_IDX_FIELD_VALUES = [
    "",
    "-1",
    "-0",
    "+4",
    "4.0",
    "0x10",
    " 8",
    "1_000",
    "9" * 20,
    "9" * 21,
    "1" * 5000,
    str(2**63),
    str(2**64),
    "-" + "9" * 30,
    "\u0663",  # an Arabic-Indic digit: a digit to Python's int(), not to the format
    "\xff",
    "é",
]


@st.composite
def _mutated_idx(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A pack whose `.idx` lines were edited: fields replaced, split, joined, dropped, doubled."""
    rec, idx = draw(_written_pack())
    lines = idx.decode().splitlines()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["field", "separator", "extra", "drop_field", "dup", "delete", "junk", "eol"])
        )
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if not lines:
            lines.append(draw(st.text(max_size=12)))
            continue
        fields = lines[i].split("\t")
        if kind == "field":
            j = draw(st.integers(0, len(fields) - 1))
            fields[j] = draw(st.sampled_from(_IDX_FIELD_VALUES) | st.text(max_size=6))
            lines[i] = "\t".join(fields)
        elif kind == "separator":
            lines[i] = lines[i].replace("\t", draw(st.sampled_from([" ", "\t\t", ",", "\t \t"])))
        elif kind == "extra":
            lines[i] += "\t" + draw(st.sampled_from(["0", "", "x"]))
        elif kind == "drop_field":
            lines[i] = fields[0]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "delete":
            del lines[i]
        elif kind == "junk":
            lines.insert(i, draw(st.text(max_size=12)))
        elif kind == "eol":
            lines[i] += draw(st.sampled_from(["\r", "\x0b", "\x1c", " ", "\r\r"]))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(lines) + (eol if draw(st.booleans()) else "")
    raw = text.encode("utf-8", errors="surrogatepass")
    if draw(st.booleans()):
        raw = _mutate_bytes(draw, raw)
    return rec, raw


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------

_PLACE = re.compile(r"byte offset \d+|line \d+|idx offset \d+")


def _assert_names_file_and_place(error: Exception, path: Path) -> None:
    message = str(error)
    assert str(path) in message, message
    assert _PLACE.search(message), message


def _check_rec(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    expected = _ref_records(data)
    try:
        got = list(iter_records(path))
    except RecordIOError as e:
        event("refused")
        assert expected is None, f"refused a file the reference reads: {e}"
        _assert_names_file_and_place(e, path)
    else:
        event("read")
        assert expected is not None, "read a file the reference refuses"
        assert got == expected


@FUZZ
@given(data=st.binary(max_size=256) | st.binary(max_size=64).map(lambda b: MAGIC_BYTES + b))
def test_random_bytes_as_rec(tmp_path: Path, data: bytes) -> None:
    _check_rec(tmp_path / "random.rec", data)


@FUZZ
@given(data=_mutated_rec())
def test_mutated_rec_read_front_to_back(tmp_path: Path, data: bytes) -> None:
    _check_rec(tmp_path / "mutated.rec", data)


@FUZZ
@given(pack=_written_pack(), data=st.data())
def test_mutated_rec_read_through_its_idx(
    tmp_path: Path, pack: tuple[bytes, bytes], data: st.DataObject
) -> None:
    rec_bytes, idx_bytes = pack
    mutated = _mutate_bytes(data.draw, rec_bytes)
    rec, idx = tmp_path / "m.rec", tmp_path / "m.idx"
    rec.write_bytes(mutated)
    idx.write_bytes(idx_bytes)
    entries = _ref_idx(idx_bytes, len(mutated))
    try:
        reader = IndexedRecordReader(rec, idx)
    except RecordIOError as e:
        assert entries is None, f"refused an idx the reference accepts: {e}"
        _assert_names_file_and_place(e, rec)
        return
    assert entries is not None
    with reader:
        assert reader.keys == [k for k, _ in entries]
        for key, offset in entries:
            expected = _ref_record_at(mutated, offset)
            try:
                got = reader.read(key)
            except RecordIOError as e:
                event("record refused")
                assert expected is None, f"key {key}: refused a record the reference reads: {e}"
                _assert_names_file_and_place(e, rec)
                assert f"key {key}" in str(e)
            else:
                event("record read")
                assert expected is not None, f"key {key}: read a record the reference refuses"
                assert got == expected[0]


def _check_idx(tmp_path: Path, rec_bytes: bytes, idx_bytes: bytes) -> None:
    rec, idx = tmp_path / "i.rec", tmp_path / "i.idx"
    rec.write_bytes(rec_bytes)
    idx.write_bytes(idx_bytes)
    expected = _ref_idx(idx_bytes, len(rec_bytes))
    try:
        reader = IndexedRecordReader(rec, idx)
    except RecordIOError as e:
        event("refused")
        assert expected is None, f"refused an idx the reference accepts: {e}"
        assert str(idx) in str(e) or str(rec) in str(e), str(e)
        _assert_names_file_and_place(e, idx if str(idx) in str(e) else rec)
    else:
        event("read")
        assert expected is not None, "accepted an idx the reference refuses"
        with reader:
            assert reader.keys == [k for k, _ in expected]
            assert [reader.offset(k) for k in reader.keys] == [o for _, o in expected]


@FUZZ
@given(pack=_mutated_idx())
def test_mutated_idx(tmp_path: Path, pack: tuple[bytes, bytes]) -> None:
    _check_idx(tmp_path, *pack)


@FUZZ
@given(idx=st.binary(max_size=128) | st.text(alphabet="0123456789\t\n\r -", max_size=40).map(str.encode))
def test_random_bytes_as_idx(tmp_path: Path, idx: bytes) -> None:
    _check_idx(tmp_path, (FIXTURES / "split.rec").read_bytes(), idx)


def _ref_unpack(record: bytes) -> tuple[int, float | list[float], int, int, bytes] | None:
    if len(record) < 24:
        return None
    flag = int.from_bytes(record[0:4], "little")
    label = struct.unpack("<f", record[4:8])[0]
    id_ = int.from_bytes(record[8:16], "little")
    id2 = int.from_bytes(record[16:24], "little")
    if flag == 0:
        return flag, label, id_, id2, record[24:]
    if len(record) < 24 + 4 * flag:
        return None
    labels = [struct.unpack("<f", record[24 + 4 * i : 28 + 4 * i])[0] for i in range(flag)]
    return flag, labels, id_, id2, record[24 + 4 * flag :]


@FUZZ
@given(
    record=st.binary(max_size=80)
    | st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=20, max_size=60)).map(
        lambda t: struct.pack("<I", t[0]) + t[1]
    )
    | st.tuples(st.integers(0, 6), st.binary(min_size=20, max_size=60)).map(
        lambda t: struct.pack("<I", t[0]) + t[1]
    )
)
def test_unpack_and_class_label_of_random_records(record: bytes) -> None:
    expected = _ref_unpack(record)
    try:
        header, payload = unpack(record)
    except RecordIOError as e:
        assert expected is None, str(e)
        assert f"record of {len(record)} bytes" in str(e)
    else:
        assert expected is not None
        flag, label, id_, id2, rest = expected
        assert (header.flag, header.id, header.id2, payload) == (flag, id_, id2, rest)
        np.testing.assert_array_equal(np.asarray(header.label, dtype=np.float32), np.float32(label))
    try:
        first, start = class_label(record)
    except RecordIOError:
        assert expected is None
    else:
        assert expected is not None
        flag, label, *_ = expected
        want = label[0] if isinstance(label, list) else label
        np.testing.assert_array_equal(np.float32(first), np.float32(want))
        assert start == IR_HEADER_SIZE + 4 * flag


def test_writer_output_is_what_the_reference_reads(tmp_path: Path) -> None:
    """The seeds are right: the reference reads IndexedRecordWriter's packs record for record."""
    rng = np.random.default_rng(3)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 40, size=6)]
    records.append(b"ab" + bytes(2) + MAGIC_BYTES + b"xyz" + MAGIC_BYTES)  # a three-part record
    rec, idx = tmp_path / "w.rec", tmp_path / "w.idx"
    with IndexedRecordWriter(rec, idx) as writer:
        for key, record in enumerate(records):
            writer.write(key, record)
    data = rec.read_bytes()
    assert data == b"".join(_encode_like_dmlc(r) for r in records)
    found = _ref_records(data)
    assert found is not None and [r for _, r in found] == records
    assert _ref_idx(idx.read_bytes(), len(data)) == [(k, o) for k, (o, _) in enumerate(found)]
