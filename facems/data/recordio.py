"""mxnet-compatible RecordIO: read and write `.rec`/`.idx` packs (insightface's `train.rec`) without mxnet.

File format (dmlc-core RecordIO, as written by ``mx.recordio.MXIndexedRecordIO``):

- A record is stored as one or more *parts*. Each part is a uint32 little-endian magic ``0xced7230a``,
  a uint32 ``lrec = (cflag << 29) | length`` and ``length`` bytes. After the record's last part come
  zero bytes up to the next multiple of 4, so every record starts at a 4-byte-aligned offset.
- ``cflag`` 0 is a whole record. When the record's bytes contain the magic at a 4-byte-aligned
  position the writer splits there and drops those 4 bytes: cflag 1 / 2 / 3 mark the first / middle /
  last part and the reader puts the magic back between the parts. This way the magic never appears
  at an aligned position inside stored data, which is what lets a reader detect a bad offset.
- The `.idx` file is text, one ``"{key}\\t{offset}\\n"`` line per record, ``offset`` in bytes of the
  record's first part.
- A record written with :func:`pack` is a 24-byte header ``<IfQQ`` (flag, label, id, id2), then
  ``flag`` float32 labels when ``flag > 0`` (the header label is then 0), then the payload (JPEG).

Reading uses ``os.pread`` on a descriptor opened lazily in each process, so one reader can be shared
by DataLoader workers (fork or spawn) and threads without any shared file position.
"""

from __future__ import annotations

import numbers
import os
import re
import struct
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "IRHeader",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "RecordIOError",
    "class_label",
    "iter_records",
    "pack",
    "unpack",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEAD = struct.Struct("<II")  # magic, lrec
_IR_HEAD = struct.Struct("<IfQQ")  # flag, label, id, id2: mxnet's native "IfQQ" on little-endian hosts
IR_HEADER_SIZE = _IR_HEAD.size  # 24 bytes
_FLAG_LABEL = struct.Struct("<If")  # the first two header fields
_FIRST_LABEL = struct.Struct("<f")
MAX_RECORD_BYTES = (1 << 29) - 1  # the length field has 29 bits
_LENGTH_MASK = (1 << 29) - 1
# At most 20 digits (a 64-bit integer): also keeps int() away from its limit on huge digit strings.
_IDX_LINE = re.compile(r"(-?[0-9]{1,20})\t([0-9]{1,20})")
_WRITE_BUFFER_BYTES = 4 << 20

_CFLAG_NAMES = {0: "whole", 1: "first", 2: "middle", 3: "last"}


class RecordIOError(Exception):
    """A `.rec` or `.idx` file (or a packed record) is corrupt, truncated or inconsistent."""


class IRHeader(NamedTuple):
    """Header of a record made by :func:`pack` (mxnet's ``IRHeader``).

    Attributes:
        flag: number of float32 labels stored after the header (0: the scalar ``label`` is used).
        label: the class label (float) or, when ``flag > 0``, a float32 array of ``flag`` labels.
        id: uint64 record id (insightface: the record key).
        id2: uint64, higher-order id bits (usually 0).
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader | tuple[Any, ...], payload: bytes) -> bytes:
    """Build a record from a header and a payload, exactly as ``mx.recordio.pack`` does.

    A numeric ``header.label`` is stored in the header and ``flag`` is written as 0 whatever was given.
    Anything else is converted to a float32 array (flattened in C order) which is stored after the
    header; ``flag`` becomes its size and the header label 0.

    Args:
        header: an :class:`IRHeader` or a 4-tuple ``(flag, label, id, id2)``.
        payload: the bytes that follow the header and labels (usually an encoded image).

    Returns:
        The record bytes: 24-byte header, ``4 * flag`` label bytes, payload.
    """
    _flag, label, id_, id2 = header  # mxnet ignores the given flag: it follows from the label
    if isinstance(label, numbers.Number):
        return _IR_HEAD.pack(0, label, id_, id2) + payload
    labels = np.ascontiguousarray(label, dtype=np.float32)
    return _IR_HEAD.pack(labels.size, 0.0, id_, id2) + labels.astype("<f4").tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record made by :func:`pack` into its header and payload (``mx.recordio.unpack``).

    Args:
        record: the record bytes.

    Returns:
        ``(header, payload)``. When ``header.flag > 0`` the label is a float32 array of ``flag``
        values (a fresh, writable copy); otherwise it is the float stored in the header.

    Raises:
        RecordIOError: the record is shorter than its header and labels.
    """
    if len(record) < IR_HEADER_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {IR_HEADER_SIZE}-byte header")
    flag, label, id_, id2 = _IR_HEAD.unpack_from(record)
    if flag == 0:
        return IRHeader(flag, label, id_, id2), record[IR_HEADER_SIZE:]
    end = IR_HEADER_SIZE + 4 * flag
    if len(record) < end:
        raise RecordIOError(
            f"record of {len(record)} bytes has flag={flag}: expected at least {end} bytes "
            f"({IR_HEADER_SIZE}-byte header + {flag} float32 labels)"
        )
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_HEADER_SIZE).astype(np.float32)
    return IRHeader(flag, labels, id_, id2), record[end:]


def class_label(record: bytes) -> tuple[float, int]:
    """The first label of a record made by :func:`pack` and the offset of its payload, cheaply.

    The class of an insightface image record is its scalar label, or the first of its array labels;
    this reads just that (no payload copy, no label array), for hot paths that only need the class.

    Raises:
        RecordIOError: the record is shorter than its header and labels.
    """
    if len(record) < IR_HEADER_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {IR_HEADER_SIZE}-byte header")
    flag, label = _FLAG_LABEL.unpack_from(record)
    start = IR_HEADER_SIZE + 4 * flag
    if flag:
        if len(record) < start:
            raise RecordIOError(
                f"record of {len(record)} bytes has flag={flag}: expected at least {start} bytes "
                f"({IR_HEADER_SIZE}-byte header + {flag} float32 labels)"
            )
        (label,) = _FIRST_LABEL.unpack_from(record, IR_HEADER_SIZE)
    return float(label), start


def _encode(record: bytes) -> bytearray:
    """The stored form of one record: its parts (split at aligned magics) and the final padding."""
    n = len(record)
    if n > MAX_RECORD_BYTES:
        raise ValueError(f"RecordIO records must be shorter than 2**29 bytes, got {n}")
    out = bytearray()
    start = 0  # first byte of the current part
    pos = record.find(_MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:
            out += _PART_HEAD.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start))
            out += record[start:pos]
            start = pos + 4
            pos = record.find(_MAGIC_BYTES, start)
        else:
            pos = record.find(_MAGIC_BYTES, pos + 1)
    out += _PART_HEAD.pack(MAGIC, ((3 if start else 0) << 29) | (n - start))
    out += record[start:]
    out += bytes(-n % 4)
    return out


def _parse_idx(idx_path: str) -> tuple[list[int], dict[int, int]]:
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(idx_path, encoding="ascii", errors="replace", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            match = _IDX_LINE.fullmatch(line.strip())
            if match is None:
                raise RecordIOError(
                    f"{idx_path}: line {lineno}: expected '<int key>\\t<int offset>' (at most 20 digits each), "
                    f"got {line[:80]!r}"
                )
            key, offset = int(match.group(1)), int(match.group(2))
            if key in offsets:
                raise RecordIOError(
                    f"{idx_path}: line {lineno}: key {key} repeated (first at offset {offsets[key]})"
                )
            keys.append(key)
            offsets[key] = offset
    return keys, offsets


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """``os.pread`` that retries short reads; returns fewer than ``n`` bytes only at end of file."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _where(path: str, key: int | None) -> str:
    return f"{path}: key {key}" if key is not None else path


def _read_record(fd: int, path: str, offset: int, key: int | None) -> tuple[bytes, int]:
    """Read the record starting at ``offset``; returns it and the offset just past its padding."""
    parts: list[bytes] = []
    pos = offset
    while True:
        head = _pread_exact(fd, 8, pos)
        if len(head) < 8:
            size = os.fstat(fd).st_size
            raise RecordIOError(
                f"{_where(path, key)}: truncated part header at byte offset {pos} "
                f"(record starts at {offset}; file has {size} bytes, a part header needs 8)"
            )
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{_where(path, key)}: bad magic 0x{magic:08x} at byte offset {pos} "
                f"(record starts at {offset}; expected 0x{MAGIC:08x})"
            )
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        expected = (0, 1) if not parts else (2, 3)
        if cflag not in expected:
            raise RecordIOError(
                f"{_where(path, key)}: {_CFLAG_NAMES.get(cflag, 'invalid')} part (cflag {cflag}) at byte offset {pos} "
                f"where a {' or '.join(_CFLAG_NAMES[c] for c in expected)} part was expected "
                f"(record starts at {offset})"
            )
        stored = (length + 3) & ~3
        data = _pread_exact(fd, stored, pos + 8)
        if len(data) < stored:
            size = os.fstat(fd).st_size
            raise RecordIOError(
                f"{_where(path, key)}: truncated record: part at byte offset {pos} declares {length} bytes "
                f"(ending at {pos + 8 + stored} with padding) but the file has {size} bytes "
                f"(record starts at {offset})"
            )
        parts.append(data if stored == length else data[:length])
        pos += 8 + stored
        if cflag in (0, 3):
            break
    record = parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)
    return record, pos


# Guards the lazy open; recreated in a forked child in case another thread held it at fork time.
_open_lock = threading.Lock()


def _reset_open_lock() -> None:
    global _open_lock
    _open_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_open_lock)


class IndexedRecordReader:
    """Random access to a `.rec` file through its `.idx` (mxnet's ``MXIndexedRecordIO(..., 'r')``).

    The `.idx` is parsed when the reader is made; the `.rec` is opened on first use in each process
    (the reader remembers the pid and reopens after a fork) and read with ``os.pread`` only, so the
    reader can be used from several threads and pickled into DataLoader workers (the descriptor is
    not pickled).

    Args:
        rec_path: the `.rec` file.
        idx_path: its `.idx` file (``key\\toffset`` lines; keys must be unique).

    Raises:
        RecordIOError: a bad `.idx` line (naming the line number), a repeated key, or an offset that
            is past the end of the `.rec` file or not 4-byte aligned.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path)
        self._keys, self._offsets = _parse_idx(self.idx_path)
        size = os.stat(self.rec_path).st_size
        for key in self._keys:
            offset = self._offsets[key]
            if offset + 8 > size:
                raise RecordIOError(
                    f"{self.rec_path}: key {key}: idx offset {offset} (from {self.idx_path}) is past the "
                    f"end of the file ({size} bytes, a record needs at least 8)"
                )
            if offset % 4:
                raise RecordIOError(
                    f"{self.rec_path}: key {key}: idx offset {offset} (from {self.idx_path}) is not a "
                    f"multiple of 4, so it cannot be the start of a record"
                )
        self._handle: tuple[int, int] | None = None  # (fd, pid that opened it)

    @property
    def keys(self) -> list[int]:
        """The record keys in `.idx` order (the reader's own list: do not modify it)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._offsets

    def offset(self, key: int) -> int:
        """Byte offset of the record ``key`` in the `.rec` file."""
        try:
            return self._offsets[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no key {key!r}") from None

    def _fd(self) -> int:
        pid = os.getpid()
        handle = self._handle
        if handle is not None and handle[1] == pid:
            return handle[0]
        with _open_lock:
            handle = self._handle
            if handle is not None and handle[1] == pid:
                return handle[0]
            # A handle from another pid was inherited through fork: leave that descriptor alone
            # (the parent still owns it) and open our own.
            fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._handle = (fd, pid)
            return fd

    def read(self, key: int) -> bytes:
        """The record stored under ``key`` (its parts joined), e.g. to pass to :func:`unpack`.

        Raises:
            KeyError: ``key`` is not in the `.idx`.
            RecordIOError: bad magic, truncated data or misordered parts, naming the file, the key
                and the byte offset.
        """
        offset = self.offset(key)
        fd = self._fd()
        # Common case (cflag 0): one pread for the part header, one for the data and its padding.
        return _read_record(fd, self.rec_path, offset, key)[0]

    def close(self) -> None:
        """Close this process's descriptor (the reader reopens it if used again)."""
        handle, self._handle = self._handle, None
        if handle is not None and handle[1] == os.getpid():
            os.close(handle[0])

    def __enter__(self) -> IndexedRecordReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown or a half-built object: nothing useful to do
            pass


def iter_records(rec_path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Read a `.rec` file front to back without its `.idx`.

    Args:
        rec_path: the `.rec` file.

    Yields:
        ``(offset, record)``: the byte offset of each record's first part and its joined bytes.

    Raises:
        RecordIOError: bad magic, truncated data or misordered parts, naming the file and offset.
    """
    path = os.fspath(rec_path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            record, end = _read_record(fd, path, offset, None)
            yield offset, record
            offset = end
    finally:
        os.close(fd)


class IndexedRecordWriter:
    """Write a `.rec`/`.idx` pair byte-for-byte as ``mx.recordio.MXIndexedRecordIO(..., 'w')`` does.

    Both files are created (truncated) at their final paths; nothing is written to a temporary file.
    Records are buffered and each `.idx` line is written only after its record's bytes have been
    handed to the operating system, so a writer that is not closed (a crash) leaves an `.idx` whose
    every entry points to a complete record; unfinished records have no entry. Call :meth:`close` (or
    use the writer as a context manager) to flush everything.

    Args:
        rec_path: the `.rec` file to create.
        idx_path: the `.idx` file to create.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path)
        self._rec = open(self.rec_path, "wb", buffering=0)
        try:
            self._idx = open(self.idx_path, "wb")
        except BaseException:
            self._rec.close()
            raise
        self._buffer = bytearray()
        self._pending_idx: list[bytes] = []
        self._pos = 0  # bytes in the .rec so far, buffered ones included
        self._seen: set[int] = set()
        self._closed = False

    def tell(self) -> int:
        """Byte offset at which the next record will start."""
        return self._pos

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` under ``key`` (e.g. the output of :func:`pack`).

        Raises:
            ValueError: the writer is closed, the key is already written, or the record is 2**29
                bytes or longer.
            TypeError: ``key`` is not an int.
        """
        if self._closed:
            raise ValueError(f"{self.rec_path}: write to a closed IndexedRecordWriter")
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool):
            raise TypeError(f"{self.idx_path}: keys must be int, got {type(key).__name__}")
        key = int(key)
        if key in self._seen:
            raise ValueError(f"{self.idx_path}: key {key} already written")
        encoded = _encode(bytes(record))
        self._seen.add(key)
        self._pending_idx.append(b"%d\t%d\n" % (key, self._pos))
        self._buffer += encoded
        self._pos += len(encoded)
        if len(self._buffer) >= _WRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered records to the OS, then write their `.idx` lines."""
        with memoryview(self._buffer) as view:
            done = 0
            while done < len(view):
                written = self._rec.write(view[done:])
                if not written:
                    raise OSError(f"{self.rec_path}: write made no progress at byte offset {done}")
                done += written
        self._buffer.clear()
        if self._pending_idx:
            self._idx.write(b"".join(self._pending_idx))
            self._pending_idx.clear()
            self._idx.flush()

    def close(self) -> None:
        """Flush and close both files; calling it again does nothing."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._rec.close()
            self._idx.close()

    def __enter__(self) -> IndexedRecordWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
