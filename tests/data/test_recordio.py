"""facems.data.recordio against golden files written by real mxnet 1.9.1 (tests/fixtures/recordio)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from facems.data import recordio
from facems.data.recordio import (
    IR_HEADER_SIZE,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    RecordIOError,
    class_label,
    iter_records,
    pack,
    unpack,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recordio"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FILES = sorted(EXPECTED["files"])
MAGIC = struct.pack("<I", 0xCED7230A)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _paths(name: str) -> tuple[Path, Path]:
    spec = EXPECTED["files"][name]
    return FIXTURES / spec["rec"], FIXTURES / spec["idx"]


def _reference_encode(record: bytes) -> bytes:
    """dmlc-core RecordIOWriter::WriteRecord, transcribed as a plain loop over aligned positions."""
    n = len(record)
    lower_align = (n >> 2) << 2
    upper_align = ((n + 3) >> 2) << 2
    out = b""
    dptr = 0
    for i in range(0, lower_align, 4):
        if record[i : i + 4] == MAGIC:
            out += MAGIC + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr))
            out += record[dptr:i]
            dptr = i + 4
    out += MAGIC + struct.pack("<I", ((3 if dptr != 0 else 0) << 29) | (n - dptr))
    out += record[dptr:]
    out += b"\0" * (upper_align - n)
    return out


def _reference_parts(rec: bytes) -> list[tuple[int, int, int]]:
    """(offset, cflag, length) of every part in a well-formed .rec, by a plain walk."""
    parts = []
    pos = 0
    while pos < len(rec):
        magic, lrec = struct.unpack_from("<II", rec, pos)
        assert magic == 0xCED7230A
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append((pos, cflag, length))
        pos += 8 + length + (-length % 4 if cflag in (0, 3) else 0)
    return parts


def _build(name: str, rec_path: Path, idx_path: Path) -> None:
    with IndexedRecordWriter(rec_path, idx_path) as writer:
        for item in EXPECTED["files"][name]["inputs"]:
            if item["kind"] == "raw":
                record = bytes.fromhex(item["record_hex"])
            else:
                record = pack(IRHeader(*item["header"]), bytes.fromhex(item["payload_hex"]))
            writer.write(item["key"], record)


# --------------------------------------------------------------------------------------------------
# golden files: reading


@pytest.mark.parametrize("name", FILES)
def test_reads_golden_files_like_mxnet(name: str) -> None:
    spec = EXPECTED["files"][name]
    rec_path, idx_path = _paths(name)
    with IndexedRecordReader(rec_path, idx_path) as reader:
        assert reader.keys == [r["key"] for r in spec["records"]]
        assert len(reader) == len(spec["records"])
        for exp in spec["records"]:
            key = exp["key"]
            assert reader.offset(key) == exp["offset"]
            record = reader.read(key)
            assert _sha(record) == exp["record_sha256"], (name, key)
            if "header" not in exp:
                continue
            header, payload = unpack(record)
            want = exp["header"]
            assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"])
            if want["flag"] > 0:
                assert isinstance(header.label, np.ndarray)
                assert header.label.dtype == np.float32
                np.testing.assert_array_equal(header.label, np.asarray(want["label"], dtype=np.float32))
            else:
                assert isinstance(header.label, float)
                assert header.label == want["label"]
            assert _sha(payload) == exp["payload_sha256"], (name, key)


def test_golden_files_cover_the_edge_cases() -> None:
    """The fixtures really contain split records (all cflags), padding of every size and empty records."""
    cflags = set()
    pads = set()
    for name in FILES:
        rec = _paths(name)[0].read_bytes()
        for _, cflag, length in _reference_parts(rec):
            cflags.add(cflag)
            if cflag in (0, 3):
                pads.add(-length % 4)
    assert cflags == {0, 1, 2, 3}
    assert pads == {0, 1, 2, 3}
    split = EXPECTED["files"]["split"]
    assert split["inputs"][0]["record_hex"] == ""
    # insightface layout: key 0 says where the identity records are.
    first = EXPECTED["files"]["insightface"]["records"][0]
    assert first["key"] == 0 and first["header"]["flag"] == 2 and first["header"]["label"] == [7.0, 10.0]


def test_raw_golden_records_match_their_inputs() -> None:
    spec = EXPECTED["files"]["split"]
    rec_path, idx_path = _paths("split")
    with IndexedRecordReader(rec_path, idx_path) as reader:
        for item in spec["inputs"]:
            if item["kind"] == "raw":
                assert reader.read(item["key"]) == bytes.fromhex(item["record_hex"])


@pytest.mark.parametrize("name", FILES)
def test_iter_records_matches_mxnet_sequential_read(name: str) -> None:
    spec = EXPECTED["files"][name]
    rec_path, idx_path = _paths(name)
    got = list(iter_records(rec_path))
    assert [_sha(r) for _, r in got] == spec["sequential_sha256"]
    assert [off for off, _ in got] == [r["offset"] for r in spec["records"]]
    with IndexedRecordReader(rec_path, idx_path) as reader:
        assert [r for _, r in got] == [reader.read(k) for k in reader.keys]


# --------------------------------------------------------------------------------------------------
# golden files: writing


@pytest.mark.parametrize("name", FILES)
def test_writes_golden_files_byte_for_byte(name: str, tmp_path: Path) -> None:
    rec_path, idx_path = tmp_path / "out.rec", tmp_path / "out.idx"
    _build(name, rec_path, idx_path)
    golden_rec, golden_idx = _paths(name)
    assert rec_path.read_bytes() == golden_rec.read_bytes()
    assert idx_path.read_bytes() == golden_idx.read_bytes()
    assert _sha(rec_path.read_bytes()) == EXPECTED["files"][name]["rec_sha256"]


def test_pack_matches_golden_record_bytes() -> None:
    """pack() alone (no writer) gives the record bytes mxnet's pack gave, for every packed input."""
    for name in FILES:
        spec = EXPECTED["files"][name]
        sha_by_key = {r["key"]: r["record_sha256"] for r in spec["records"]}
        for item in spec["inputs"]:
            if item["kind"] == "pack":
                record = pack(tuple(item["header"]), bytes.fromhex(item["payload_hex"]))
                assert _sha(record) == sha_by_key[item["key"]], (name, item["key"])


def test_pack_semantics() -> None:
    # A scalar label resets the flag; np.float32 is a number too.
    h, p = unpack(pack(IRHeader(9, np.float32(2.5), 1, 2), b"xy"))  # type: ignore[arg-type]
    assert h == IRHeader(0, 2.5, 1, 2) and p == b"xy"
    # An array label: flag = size, header label 0, labels flattened in C order.
    rec = pack((0, np.array([[1, 2], [3, 4]]), 5, 0), b"img")
    assert struct.unpack_from("<IfQQ", rec) == (4, 0.0, 5, 0)
    assert rec[24:40] == np.array([1, 2, 3, 4], dtype="<f4").tobytes() and rec[40:] == b"img"
    h, p = unpack(rec)
    assert h.flag == 4 and h.label.tolist() == [1.0, 2.0, 3.0, 4.0] and p == b"img"  # type: ignore[union-attr]


def test_unpack_rejects_short_records() -> None:
    with pytest.raises(RecordIOError, match="shorter than the 24-byte header"):
        unpack(b"\0" * 23)
    with pytest.raises(RecordIOError, match="flag=3"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)


# --------------------------------------------------------------------------------------------------
# property tests

_uint64 = st.integers(min_value=0, max_value=2**64 - 1)
_f32 = st.floats(width=32, allow_nan=False)


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.binary(max_size=64)))
    for pos in draw(st.lists(st.integers(min_value=0, max_value=80), max_size=4)):
        pos = pos if draw(st.booleans()) else pos - pos % 4  # aligned (split) or anywhere
        data[pos : pos + 4] = MAGIC
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flag=st.integers(min_value=0, max_value=2**32 - 1),
    label=st.one_of(_f32, st.lists(_f32, min_size=1, max_size=6)),
    id_=_uint64,
    id2=_uint64,
    payload=_payloads(),
)
def test_pack_unpack_round_trip(flag: int, label: Any, id_: int, id2: int, payload: bytes) -> None:
    header, out = unpack(pack(IRHeader(flag, label, id_, id2), payload))
    assert out == payload
    assert (header.id, header.id2) == (id_, id2)
    if isinstance(label, list):
        assert header.flag == len(label)
        assert isinstance(header.label, np.ndarray)
        assert header.label.tolist() == label  # float32 values survive exactly
    else:
        assert header.flag == 0
        assert header.label == label


@settings(max_examples=60, deadline=None)
@given(records=st.lists(_payloads(), max_size=8), keys_seed=st.integers(0, 1000))
def test_write_read_round_trip(records: list[bytes], keys_seed: int) -> None:
    keys = random.Random(keys_seed).sample(range(-50, 1000), len(records))
    with tempfile.TemporaryDirectory() as tmp:
        rec_path, idx_path = os.path.join(tmp, "a.rec"), os.path.join(tmp, "a.idx")
        with IndexedRecordWriter(rec_path, idx_path) as writer:
            for key, record in zip(keys, records):
                writer.write(key, record)
        # Independent reference: the concatenation of dmlc's encoding, offsets at the record starts.
        expected_rec = b""
        expected_idx = ""
        for key, record in zip(keys, records):
            expected_idx += f"{key}\t{len(expected_rec)}\n"
            expected_rec += _reference_encode(record)
        assert Path(rec_path).read_bytes() == expected_rec
        assert Path(idx_path).read_text() == expected_idx
        with IndexedRecordReader(rec_path, idx_path) as reader:
            assert reader.keys == keys
            assert [reader.read(k) for k in keys] == records
        assert [r for _, r in iter_records(rec_path)] == records


# --------------------------------------------------------------------------------------------------
# strictness


def _copy(name: str, tmp_path: Path) -> tuple[Path, Path]:
    rec_path, idx_path = _paths(name)
    shutil.copy(rec_path, tmp_path / "x.rec")
    shutil.copy(idx_path, tmp_path / "x.idx")
    return tmp_path / "x.rec", tmp_path / "x.idx"


def _idx_lines(idx_path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split("\t"))) for line in idx_path.read_text().splitlines()]  # type: ignore[misc]


@pytest.mark.parametrize("where", ["part_header", "payload", "padding", "between_parts", "last_part"])
def test_truncated_file(where: str, tmp_path: Path) -> None:
    rec_path, idx_path = _copy("split", tmp_path)
    data = rec_path.read_bytes()
    offsets = dict(_idx_lines(idx_path))
    parts = _reference_parts(data)
    # key 3: 21 bytes with the magic at 8 -> first part (8 bytes), last part (9 bytes + 3 padding)
    start = offsets[3]
    last9 = max(p for p in parts if offsets[9] <= p[0] < offsets[10])  # key 9: the multi-part record
    assert last9[1] == 3 and last9[2] > 100
    cut = {
        "part_header": start + 8 + 8 + 5,  # inside the last part's header
        "payload": start + 8 + 3,
        "padding": start + 8 + 8 + 8 + 9 + 1,
        "between_parts": start + 8 + 8,
        "last_part": last9[0] + 8 + 50,
    }[where]
    key = 9 if where == "last_part" else 3
    rec_path.write_bytes(data[:cut])
    # An idx that stops at the damaged record: the reader must fail on read, not on open.
    idx_path.write_text("".join(f"{k}\t{o}\n" for k, o in _idx_lines(idx_path) if k <= key))
    reader = IndexedRecordReader(rec_path, idx_path)
    for k in reader.keys[:-1]:
        reader.read(k)
    with pytest.raises(RecordIOError) as info:
        reader.read(key)
    msg = str(info.value)
    assert str(rec_path) in msg and f"key {key}" in msg and f"record starts at {offsets[key]}" in msg
    assert "truncated" in msg and f"file has {cut} bytes" in msg
    with pytest.raises(RecordIOError) as info:
        list(iter_records(rec_path))
    assert str(rec_path) in str(info.value) and f"record starts at {offsets[key]}" in str(info.value)
    reader.close()


def test_truncated_file_with_full_idx_fails_on_open(tmp_path: Path) -> None:
    rec_path, idx_path = _copy("insightface", tmp_path)
    offsets = _idx_lines(idx_path)
    rec_path.write_bytes(rec_path.read_bytes()[: offsets[3][1] + 100])
    with pytest.raises(RecordIOError) as info:
        IndexedRecordReader(rec_path, idx_path)
    msg = str(info.value)
    key, off = offsets[4]
    assert (
        str(rec_path) in msg and f"key {key}" in msg and f"idx offset {off}" in msg and "past the end" in msg
    )


def test_length_past_end_of_file(tmp_path: Path) -> None:
    rec_path, idx_path = _copy("scalar", tmp_path)
    data = bytearray(rec_path.read_bytes())
    key, off = _idx_lines(idx_path)[2]
    struct.pack_into("<I", data, off + 4, 100_000)
    rec_path.write_bytes(bytes(data))
    with IndexedRecordReader(rec_path, idx_path) as reader:
        with pytest.raises(RecordIOError) as info:
            reader.read(key)
    msg = str(info.value)
    assert str(rec_path) in msg and f"key {key}" in msg and f"byte offset {off}" in msg
    assert "declares 100000 bytes" in msg


def test_bad_magic(tmp_path: Path) -> None:
    rec_path, idx_path = _copy("array", tmp_path)
    data = bytearray(rec_path.read_bytes())
    key, off = _idx_lines(idx_path)[3]
    data[off + 1] ^= 0xFF
    rec_path.write_bytes(bytes(data))
    with IndexedRecordReader(rec_path, idx_path) as reader:
        reader.read(reader.keys[2])  # neighbours unaffected
        with pytest.raises(RecordIOError) as info:
            reader.read(key)
    msg = str(info.value)
    assert (
        str(rec_path) in msg and f"key {key}" in msg and f"bad magic 0xced7dc0a at byte offset {off}" in msg
    )
    with pytest.raises(RecordIOError, match=f"bad magic .* at byte offset {off}"):
        list(iter_records(rec_path))


def test_idx_offset_past_end(tmp_path: Path) -> None:
    rec_path, idx_path = _copy("scalar", tmp_path)
    size = rec_path.stat().st_size
    idx_path.write_text(f"0\t0\n5\t{size}\n")
    with pytest.raises(RecordIOError) as info:
        IndexedRecordReader(rec_path, idx_path)
    msg = str(info.value)
    assert str(rec_path) in msg and "key 5" in msg and f"idx offset {size}" in msg and str(idx_path) in msg


@pytest.mark.parametrize("delta", [8, 12, 16, 2])
def test_idx_offset_into_the_middle_of_a_record(delta: int, tmp_path: Path) -> None:
    rec_path, idx_path = _copy("insightface", tmp_path)
    off = dict(_idx_lines(idx_path))[2] + delta
    idx_path.write_text(f"1\t{off}\n")
    if delta % 4:
        with pytest.raises(RecordIOError, match=rf"key 1: idx offset {off} .* not a multiple of 4"):
            IndexedRecordReader(rec_path, idx_path)
        return
    with IndexedRecordReader(rec_path, idx_path) as reader:
        with pytest.raises(RecordIOError) as info:
            reader.read(1)
    msg = str(info.value)
    assert str(rec_path) in msg and "key 1" in msg and "bad magic" in msg and f"byte offset {off}" in msg


def test_idx_offset_at_a_continuation_part(tmp_path: Path) -> None:
    rec_path, idx_path = _copy("split", tmp_path)
    parts = _reference_parts(rec_path.read_bytes())
    start = dict(_idx_lines(idx_path))[4]  # magic twice: first, middle, last part
    at = [p for p in parts if p[0] >= start][:3]
    assert [c for _, c, _ in at] == [1, 2, 3]
    for off, cflag, _ in at[1:]:
        idx_path.write_text(f"4\t{off}\n")
        with IndexedRecordReader(rec_path, idx_path) as reader:
            with pytest.raises(RecordIOError) as info:
                reader.read(4)
        msg = str(info.value)
        assert str(rec_path) in msg and "key 4" in msg and f"(cflag {cflag}) at byte offset {off}" in msg


@pytest.mark.parametrize("bad_cflag", [0, 1])
def test_continuation_out_of_order(bad_cflag: int, tmp_path: Path) -> None:
    rec_path, idx_path = _copy("split", tmp_path)
    data = bytearray(rec_path.read_bytes())
    start = dict(_idx_lines(idx_path))[4]
    middle = next(p for p in _reference_parts(bytes(data)) if p[0] > start)
    assert middle[1] == 2
    struct.pack_into("<I", data, middle[0] + 4, (bad_cflag << 29) | middle[2])
    rec_path.write_bytes(bytes(data))
    with IndexedRecordReader(rec_path, idx_path) as reader:
        with pytest.raises(RecordIOError) as info:
            reader.read(4)
    msg = str(info.value)
    assert "key 4: " in msg and f"(cflag {bad_cflag}) at byte offset {middle[0]}" in msg
    assert f"middle or last part was expected (record starts at {start})" in msg


@pytest.mark.parametrize(
    ("line", "lineno"),
    [("1 8", 2), ("a\t8", 2), ("1\t8\t9", 2), ("", 2), ("1\t-8", 2), ("1\t", 2), ("0\t8", 2)],
)
def test_bad_idx_line(line: str, lineno: int, tmp_path: Path) -> None:
    rec_path, idx_path = _copy("scalar", tmp_path)
    idx_path.write_text(f"0\t0\n{line}\n7\t32\n")
    with pytest.raises(RecordIOError) as info:
        IndexedRecordReader(rec_path, idx_path)
    msg = str(info.value)
    assert msg.startswith(f"{idx_path}: line {lineno}: ")
    if line == "0\t8":
        assert "key 0 repeated" in msg


def test_missing_key(tmp_path: Path) -> None:
    rec_path, idx_path = _paths("scalar")
    with IndexedRecordReader(rec_path, idx_path) as reader:
        with pytest.raises(KeyError, match="no key 12345"):
            reader.read(12345)


# --------------------------------------------------------------------------------------------------
# writer behaviour


def test_unclosed_writer_leaves_idx_only_for_complete_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recordio, "_WRITE_BUFFER_BYTES", 100)
    rec_path, idx_path = tmp_path / "w.rec", tmp_path / "w.idx"
    writer = IndexedRecordWriter(rec_path, idx_path)
    records = [bytes([i]) * (10 + 7 * i) + MAGIC for i in range(12)]
    flushed_seen = False
    for i, record in enumerate(records):
        writer.write(i, record)
        # Simulate a crash at this point: whatever the idx lists must be readable in full.
        lines = _idx_lines(idx_path)
        if lines:
            flushed_seen = True
            assert rec_path.stat().st_size >= lines[-1][1]
            with IndexedRecordReader(rec_path, idx_path) as reader:
                assert [reader.read(k) for k in reader.keys] == records[: len(lines)]
        assert len(lines) <= i + 1
    assert flushed_seen
    writer.close()
    writer.close()  # idempotent
    with IndexedRecordReader(rec_path, idx_path) as reader:
        assert [reader.read(k) for k in reader.keys] == records
    with pytest.raises(ValueError, match="closed"):
        writer.write(99, b"x")


def test_writer_rejects_bad_keys(tmp_path: Path) -> None:
    with IndexedRecordWriter(tmp_path / "k.rec", tmp_path / "k.idx") as writer:
        writer.write(np.int64(3), b"a")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key 3 already written"):
            writer.write(3, b"b")
        with pytest.raises(TypeError, match="keys must be int"):
            writer.write("4", b"b")  # type: ignore[arg-type]
    assert (tmp_path / "k.idx").read_text() == "3\t0\n"


# --------------------------------------------------------------------------------------------------
# processes and threads


class _RecordDataset(Dataset):
    def __init__(self, reader: IndexedRecordReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[int, bytes, int, int]:
        key = self.reader.keys[i]
        record = self.reader.read(key)
        handle = self.reader._handle
        assert handle is not None
        return key, record, os.getpid(), handle[1]


def test_pickled_reader_does_not_carry_the_descriptor() -> None:
    rec_path, idx_path = _paths("insightface")
    reader = IndexedRecordReader(rec_path, idx_path)
    want = [reader.read(k) for k in reader.keys]  # opens the file
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handle is None
    assert [clone.read(k) for k in clone.keys] == want
    clone.close()
    assert [reader.read(k) for k in reader.keys] == want  # the original's descriptor is untouched
    reader.close()


@pytest.mark.timeout(60)
def test_dataloader_fork_workers_read_the_same_bytes() -> None:
    rec_path, idx_path = _paths("split")
    reader = IndexedRecordReader(rec_path, idx_path)
    want = {k: reader.read(k) for k in reader.keys}  # the parent opens before forking
    loader = DataLoader(
        _RecordDataset(reader), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    seen: dict[int, bytes] = {}
    pids = set()
    for key, record, pid, handle_pid in loader:
        assert handle_pid == pid != os.getpid()  # each worker opened its own descriptor
        seen[int(key)] = record
        pids.add(pid)
    assert seen == want
    assert len(pids) == 2
    assert {k: reader.read(k) for k in reader.keys} == want  # parent still reads after the workers exit
    reader.close()


def test_concurrent_threads_share_one_reader() -> None:
    rec_path, idx_path = _paths("split")
    reader = IndexedRecordReader(rec_path, idx_path)
    sha = {r["key"]: r["record_sha256"] for r in EXPECTED["files"]["split"]["records"]}
    keys = [k for k in reader.keys for _ in range(40)]
    barrier = threading.Barrier(4)

    def work(seed: int) -> int:
        order = keys[:]
        random.Random(seed).shuffle(order)
        barrier.wait()
        return sum(_sha(reader.read(k)) != sha[k] for k in order)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, range(4))) == [0, 0, 0, 0]
    reader.close()


@settings(max_examples=60, deadline=None)
@given(
    label=st.one_of(
        st.floats(allow_nan=False, width=32),
        st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=5),
    ),
    payload=st.binary(max_size=64),
)
def test_class_label_equals_unpack(label: float | list[float], payload: bytes) -> None:
    record = pack(
        IRHeader(0, label if isinstance(label, float) else np.array(label, np.float32), 7, 0), payload
    )
    header, body = unpack(record)
    value, start = class_label(record)
    assert value == float(np.asarray(header.label).reshape(-1)[0])
    assert record[start:] == body
    with pytest.raises(RecordIOError):
        class_label(record[: IR_HEADER_SIZE - 1])
