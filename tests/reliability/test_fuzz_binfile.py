"""Property tests: hostile and broken `.bin` pair files against facems.data.binfile.load_bin.

Complements tests/data/test_binfile.py (byte mutations of valid files, fixed hostile pickles): here the
inputs are random bytes, random Python structures pickled with every protocol (checked against a
plain reference of what a valid file is), mutated encoded images, opcode-level oddities, and
``__reduce__`` payloads that would create a file, in every protocol and at every place of the pickle.
"""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import re
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from _fuzz import fuzz_settings
from hypothesis import event, given, settings
from hypothesis import strategies as st

from facems.data.binfile import BinFileError, load_bin

pytestmark = pytest.mark.timeout(120)

FUZZ = fuzz_settings(120)
SIZE = (16, 16)


def _image(seed: int, ext: str = ".jpg", h: int = 16, w: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    ok, enc = cv2.imencode(ext, cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    assert ok
    return enc.tobytes()


_JPEGS = [_image(i) for i in range(3)] + [_image(9, h=20, w=12)]
_PNG = _image(5, ".png")


# ---------------------------------------------------------------------------------------------------
# Reference: what a valid file is, written independently of facems
# ---------------------------------------------------------------------------------------------------


def _declared_pixels(buf: bytes) -> int | None:
    """Pixels declared by a PNG IHDR or the first JPEG start-of-frame segment; None if neither is found."""
    if buf[:8] == b"\x89PNG\r\n\x1a\n" and len(buf) >= 24:
        return int.from_bytes(buf[16:20], "big") * int.from_bytes(buf[20:24], "big")
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    head = buf[:65536]
    while i + 4 <= len(head) and head[i] == 0xFF:
        marker = head[i + 1]
        if marker == 0xFF:
            i += 1
        elif marker in (0x01, *range(0xD0, 0xD9)):
            i += 2
        elif marker == 0xDA:
            return None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(head):
                return None
            return int.from_bytes(head[i + 5 : i + 7], "big") * int.from_bytes(head[i + 7 : i + 9], "big")
        else:
            i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    return None


def _ref_decode(buf: bytes) -> np.ndarray | None:
    if not buf:
        return None
    px = _declared_pixels(buf)
    if px is not None and px > 4096 * 4096:
        return None
    bgr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    if bgr.shape[:2] != SIZE:
        bgr = cv2.resize(bgr, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))


def _ref_load(obj: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The (images, issame) a valid ``(bins, issame_list)`` object holds, or None if it is not valid."""
    if type(obj) not in (tuple, list) or len(obj) != 2:
        return None
    bins, flags = obj
    if type(bins) not in (list, tuple):
        return None
    if isinstance(flags, np.ndarray):
        if flags.ndim != 1 or flags.dtype.kind not in "biu" or not np.isin(flags, [0, 1]).all():
            return None
        same = [bool(v) for v in flags]
    elif type(flags) in (list, tuple):
        same = []
        for v in flags:
            if type(v) in (bool, np.bool_) or (type(v) is int and v in (0, 1)):
                same.append(bool(v))
            else:
                return None
    else:
        return None
    if not same or len(bins) != 2 * len(same):
        return None
    raw = []
    for b in bins:
        if type(b) in (bytes, bytearray):
            raw.append(bytes(b))
        elif isinstance(b, np.ndarray) and b.dtype == np.uint8:
            raw.append(b.tobytes())
        else:
            return None
    images = []
    for b in raw:
        img = _ref_decode(b)
        if img is None:
            return None
        images.append(img)
    return np.stack(images), np.array(same, dtype=bool)


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


@st.composite
def _mutated_image(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.sampled_from([*_JPEGS, _PNG])))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(buf) - 1))
        kind = draw(st.sampled_from(["set", "truncate", "insert", "size"]))
        if kind == "set":
            buf[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del buf[pos:]
            if not buf:
                break
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "size" and b"\xff\xc0" in buf:  # rewrite the JPEG frame's height and width
            sof = buf.index(b"\xff\xc0")
            buf[sof + 5 : sof + 9] = draw(st.sampled_from([0, 1, 4097, 65535])).to_bytes(2, "big") * 2
    return bytes(buf)


_bin_items = st.one_of(
    st.sampled_from(_JPEGS),
    st.just(_PNG),
    _mutated_image(),
    st.binary(max_size=16),
    st.sampled_from(_JPEGS).map(bytearray),
    st.sampled_from(_JPEGS).map(lambda b: np.frombuffer(b, np.uint8).copy()),
    st.sampled_from(_JPEGS).map(lambda b: np.frombuffer(b, np.int8).copy()),
    st.sampled_from(_JPEGS).map(lambda b: np.frombuffer(b, np.uint8).reshape(1, -1).copy()),
    st.sampled_from(_JPEGS).map(lambda b: b.decode("latin-1")),
    st.integers(-(2**70), 2**70),
    st.none(),
    st.floats(allow_nan=True),
    st.lists(st.sampled_from(_JPEGS), max_size=2),
)

_flag_items = st.one_of(
    st.booleans(),
    st.booleans().map(np.bool_),
    st.integers(-2, 3),
    st.sampled_from([2**64, -(2**100), 1.0, 0.0, "1", b"\x01", None]),
    st.lists(st.booleans(), max_size=2),
)

_flag_arrays = st.one_of(
    st.lists(st.booleans(), max_size=4).map(lambda v: np.array(v, dtype=bool)),
    st.lists(st.integers(-1, 2), max_size=4).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.integers(0, 1), max_size=4).map(lambda v: np.array(v, dtype=np.uint8)),
    st.lists(st.integers(0, 1), max_size=4).map(lambda v: np.array(v, dtype=np.float64)),
    st.just(np.zeros((2, 1), dtype=bool)),
)


@st.composite
def _structures(draw: st.DrawFn) -> Any:
    """Mostly near-valid ``(bins, issame_list)`` objects; sometimes something else entirely."""
    pairs = draw(st.integers(0, 3))
    if draw(st.integers(0, 9)) == 0:
        return draw(
            st.one_of(
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                st.text(max_size=8),
                st.integers(),
                st.lists(st.integers(), max_size=3),
                st.tuples(st.sampled_from(_JPEGS), st.booleans(), st.booleans()),
            )
        )
    bins = draw(st.lists(_bin_items, min_size=2 * pairs, max_size=2 * pairs))
    if draw(st.integers(0, 5)) == 0:  # wrong count
        bins = bins + draw(st.lists(st.sampled_from(_JPEGS), min_size=1, max_size=2))
    if draw(st.booleans()):
        bins = [draw(st.sampled_from(_JPEGS)) if draw(st.booleans()) else b for b in bins]
    if draw(st.booleans()):
        flags: Any = draw(st.lists(_flag_items, min_size=pairs, max_size=pairs))
        if draw(st.booleans()):
            flags = [bool(draw(st.booleans())) for _ in flags]
    else:
        flags = draw(_flag_arrays)
    outer = draw(st.sampled_from([tuple, list]))
    return outer([draw(st.sampled_from([list, tuple]))(bins), flags])


_PLACE = re.compile(r"byte offset \d+|bins\b|issame_list|2-tuple|refused|holds no pairs")


def _check(path: Path, expected: tuple[np.ndarray, np.ndarray] | None) -> None:
    try:
        images, issame = load_bin(path, SIZE)
    except BinFileError as e:
        event("refused")
        message = str(e)
        assert message.startswith(str(path)), message
        assert _PLACE.search(message), message
        assert expected is None, f"refused a valid file: {message}"
    else:
        event("loaded")
        assert expected is not None, "loaded a file the reference says is invalid"
        np.testing.assert_array_equal(images, expected[0])
        np.testing.assert_array_equal(issame, expected[1])


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(min_size=1, max_size=300) | st.binary(max_size=60).map(lambda b: b"\x80\x04" + b))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(data)
    _check(path, None)  # a valid file needs decodable images: random bytes never hold them


@FUZZ
@given(obj=_structures(), protocol=st.integers(0, 5))
def test_random_structures_in_every_protocol(tmp_path: Path, obj: Any, protocol: int) -> None:
    path = tmp_path / "structure.bin"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    _check(path, _ref_load(obj))


@FUZZ
@given(images=st.integers(1, 2).flatmap(lambda n: st.lists(_mutated_image(), min_size=2 * n, max_size=2 * n)))
def test_mutated_images_in_a_valid_pickle(tmp_path: Path, images: list[bytes]) -> None:
    obj = (images, [True] * (len(images) // 2))
    path = tmp_path / "images.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    expected = _ref_load(obj)
    _check(path, expected)
    if expected is None:
        bad = next(i for i, b in enumerate(images) if _ref_decode(b) is None)
        with pytest.raises(BinFileError, match=rf"bins\[{bad}\]"):
            load_bin(path, SIZE)


def _framed(inner: bytes) -> bytes:
    """A protocol-2 pickle of ``([jpeg, jpeg], [<inner>])`` where ``inner`` is raw opcodes."""
    return (
        b"\x80\x02(]("
        + b"".join(b"B" + len(j).to_bytes(4, "little") + j for j in _JPEGS[:2])
        + b"e]("
        + inner
        + b"et."
    )


_OPCODE_ODDITIES = [
    b"]" * 3000 + b"a" * 2999,  # a list nested 3000 deep
    b"(" * 2000 + b"t" * 2000,  # tuples nested 2000 deep
    b"L" + b"9" * 5000 + b"L\n",  # a 5000-digit integer
    b"\x8a\x08" + b"\xff" * 8,  # LONG1: -1 as 8 bytes
    b"\x8b\xff\xff\xff\x7f" + b"\x01" * 8,  # LONG4 claiming 2 GB of digits
    b"\x8e" + b"\xff" * 8,  # BINBYTES8 claiming 2**64 - 1 bytes
    b"B\xff\xff\xff\x7fabc",  # BINBYTES claiming 2 GB
    b"h\x07",  # BINGET of a memo slot never written
    b"}" + b"(" + b"K\x01\x88" * 100 + b"u",  # a dict
    b"\x95" + (10**9).to_bytes(8, "little") + b"\x88",  # a FRAME longer than the file
    b"G" + b"\x7f\xf8" + bytes(6),  # a NaN float
    b"N" * 5,  # several values where one is expected
]


@FUZZ
@given(inner=st.sampled_from(_OPCODE_ODDITIES), cut=st.integers(0, 3))
def test_opcode_level_oddities(tmp_path: Path, inner: bytes, cut: int) -> None:
    path = tmp_path / "odd.bin"
    data = _framed(inner)
    path.write_bytes(data[: len(data) - cut])
    _check(path, None)


def test_the_frame_holds_a_valid_file(tmp_path: Path) -> None:
    """The oddity tests are meaningful: with a plain flag in the frame the file loads."""
    path = tmp_path / "framed.bin"
    path.write_bytes(_framed(b"\x88"))
    images, issame = load_bin(path, SIZE)
    assert issame.tolist() == [True]
    np.testing.assert_array_equal(images[1], _ref_decode(_JPEGS[1]))


# ---------------------------------------------------------------------------------------------------
# Refuse to execute: payloads that would create a file
# ---------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object calls ``func(*args)``, each call creating ``marker``."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind = kind
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        m = self.marker
        return {
            "path_touch": (pathlib.Path.touch, (pathlib.Path(m),)),
            "os_system": (os.system, (f"touch '{m}'",)),
            "exec": (builtins.exec, (f"open({m!r}, 'w').close()",)),
            "eval": (builtins.eval, (f"open({m!r}, 'w').close()",)),
            "open": (builtins.open, (m, "w")),
            "subprocess": (subprocess.call, (["touch", m],)),
            "mkdir": (os.mkdir, (m,)),
        }[self.kind]


PAYLOAD_KINDS = ["path_touch", "os_system", "exec", "eval", "open", "subprocess", "mkdir"]


def test_every_payload_really_creates_its_file(tmp_path: Path) -> None:
    """A plain pickle.loads runs each payload: the refusals below are not vacuous."""
    for kind in PAYLOAD_KINDS:
        marker = tmp_path / f"made_by_{kind}"
        result = pickle.loads(pickle.dumps(_Payload(kind, marker)))
        if hasattr(result, "close"):
            result.close()
        assert marker.exists(), kind


def _place(payload: _Payload, where: str) -> Any:
    j = _JPEGS[0]
    return {
        "top": payload,
        "bins_item": ([j, payload], [True]),
        "flag": ([j, j], [payload]),
        "bins": (payload, [True]),
        "issame": ([j, j], payload),
        "nested": ([j, [[{"k": payload}]]], [True]),
        "after_valid": ([j, j], [True], payload),
    }[where]


@settings(FUZZ, max_examples=80)
@given(
    kind=st.sampled_from(PAYLOAD_KINDS),
    where=st.sampled_from(["top", "bins_item", "flag", "bins", "issame", "nested", "after_valid"]),
    protocol=st.integers(0, 5),
)
def test_reduce_payloads_are_refused_and_create_nothing(
    tmp_path: Path, kind: str, where: str, protocol: int
) -> None:
    marker = tmp_path / f"pwned_{kind}_{where}_{protocol}"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_place(_Payload(kind, marker), where), protocol=protocol))
    with pytest.raises(BinFileError, match=r"refused global") as info:
        load_bin(path, SIZE)
    assert str(info.value).startswith(str(path))
    assert not marker.exists()
