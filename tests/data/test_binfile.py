"""facems.data.binfile: insightface .bin pair files, read without executing anything they contain."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facems.data.binfile import BinFileError, load_bin, save_bin

# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

_DANGEROUS_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")
_AUDIT: dict[str, Any] = {"active": False, "events": []}


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT["active"] and (event.startswith(_DANGEROUS_EVENTS) or event in ("exec", "compile", "import")):
        _AUDIT["events"].append((event, repr(args)[:200]))


sys.addaudithook(_audit_hook)  # cannot be removed; it only records while _watch() is active


@contextmanager
def _watch() -> Iterator[list[tuple[str, str]]]:
    """Record process launches, exec/compile calls and fresh imports made inside the block."""
    _AUDIT["events"] = []
    _AUDIT["active"] = True
    try:
        yield _AUDIT["events"]
    finally:
        _AUDIT["active"] = False


def _faces(rng: np.random.Generator, n: int, h: int = 32, w: int = 32) -> np.ndarray:
    """Smooth random uint8 RGB images [n, 3, h, w] (upsampled noise: small JPEGs, like real crops)."""
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    for i in range(n):
        small = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        out[i] = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
    return out


def _jpeg(img_chw_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, enc = cv2.imencode(
        ".jpg",
        np.ascontiguousarray(img_chw_rgb[::-1].transpose(1, 2, 0)),
        [cv2.IMWRITE_JPEG_QUALITY, quality],
    )
    assert ok
    return enc.tobytes()


def _reference_decode(buf: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """What insightface's load_bin does (mx.image.imdecode -> RGB, resize if needed), with OpenCV."""
    bgr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    if size is not None and bgr.shape[:2] != size:
        bgr = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """The bytes Python 2's cPickle.dump((bins, issame), f, protocol=2) writes when bins are ``str``.

    A py2 ``str`` is written as SHORT_BINSTRING ('U', 1-byte length) below 256 bytes, else BINSTRING
    ('T', 4-byte little-endian length); lists as EMPTY_LIST + MARK ... APPENDS, with BINPUT memo ids.
    """
    out = bytearray(b"\x80\x02")
    memo = 0

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]))
        memo += 1

    out += b"]"
    put()
    out += b"("
    for b in bins:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b
        put()
    out += b"e]"
    put()
    out += b"("
    for s in issame:
        out += b"\x88" if s else b"\x89"
    out += b"e\x86"
    put()
    out += b"."
    return bytes(out)


@pytest.fixture
def small_bin(tmp_path: Path) -> tuple[Path, np.ndarray, list[bool]]:
    rng = np.random.default_rng(0)
    imgs = _faces(rng, 6, 24, 24)
    issame = [True, False, True]
    path = tmp_path / "small.bin"
    save_bin(path, imgs, issame)
    return path, imgs, issame


# ---------------------------------------------------------------------------------------------------
# Reading what insightface and save_bin write
# ---------------------------------------------------------------------------------------------------


def test_round_trip_matches_decoding_the_stored_jpegs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    imgs = _faces(rng, 10, 112, 112)
    issame = np.array([True, False, False, True, True])
    path = tmp_path / "rt.bin"
    save_bin(path, imgs, issame, quality=95)

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:2] == b"\x80\x04"  # protocol 4
    bins, flags = pickle.loads(raw)  # our own file: trusted
    assert flags == [True, False, False, True, True] and all(type(b) is bytes for b in bins)

    got, got_issame = load_bin(path)
    assert got.dtype == np.uint8 and got.shape == (10, 3, 112, 112) and got.flags.c_contiguous
    assert got_issame.dtype == np.bool_ and got_issame.tolist() == issame.tolist()
    for i, b in enumerate(bins):
        np.testing.assert_array_equal(got[i], _reference_decode(b))
    # JPEG q95 is lossy but close, and the channel order survives the trip (RGB in, RGB out).
    assert np.abs(got.astype(int) - imgs.astype(int)).mean() < 3.0
    no_atomic_leftovers = [p.name for p in tmp_path.iterdir()]
    assert no_atomic_leftovers == ["rt.bin"]


def test_save_bin_replaces_an_existing_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "x.bin"
    save_bin(path, _faces(rng, 2), [True])
    save_bin(path, _faces(rng, 4), [False, True])
    assert load_bin(path, (32, 32))[1].tolist() == [False, True]


def test_insightface_style_pickle_loads_like_insightface(tmp_path: Path) -> None:
    # As insightface's data prep writes it: pickle.dump((bins, issame_list), f, protocol=HIGHEST).
    rng = np.random.default_rng(3)
    imgs = _faces(rng, 8, 112, 112)
    bins = [_jpeg(im, q) for im, q in zip(imgs, [95, 90, 75, 100, 50, 95, 95, 80])]
    issame_list = [True, False, True, False]
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)
    got, issame = load_bin(path, image_size=(112, 112))
    assert issame.tolist() == issame_list
    for i, b in enumerate(bins):
        np.testing.assert_array_equal(got[i], _reference_decode(b))


def test_images_of_another_size_are_resized_bilinearly(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    bins = [_jpeg(im) for im in _faces(rng, 2, 120, 100)] + [_jpeg(im) for im in _faces(rng, 2, 112, 112)]
    path = tmp_path / "sized.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, [True, False]), f)
    got, _ = load_bin(path, image_size=(112, 96))
    assert got.shape == (4, 3, 112, 96)
    for i, b in enumerate(bins):
        np.testing.assert_array_equal(got[i], _reference_decode(b, (112, 96)))


def test_grey_and_png_images_decode_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    ok1, g = cv2.imencode(".jpg", grey)
    ok2, p = cv2.imencode(".png", rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    assert ok1 and ok2
    bins = [g.tobytes(), p.tobytes()]
    path = tmp_path / "mixed.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, [False]), f, protocol=2)
    got, _ = load_bin(path, image_size=(16, 16))
    for i, b in enumerate(bins):
        np.testing.assert_array_equal(got[i], _reference_decode(b))
    assert (got[0, 0] == got[0, 1]).all() and (got[0, 1] == got[0, 2]).all()


@pytest.mark.parametrize(("h", "opcode"), [(4, "SHORT_BINSTRING"), (24, "BINSTRING")])
def test_python2_pickle_with_str_images(tmp_path: Path, h: int, opcode: str) -> None:
    rng = np.random.default_rng(6)
    imgs = _faces(rng, 4, h, h)
    # Tiny PNGs fit SHORT_BINSTRING (< 256 bytes); JPEGs need BINSTRING.
    bins = [
        cv2.imencode(".png", np.ascontiguousarray(im[::-1].transpose(1, 2, 0)))[1].tobytes()
        if h == 4
        else _jpeg(im)
        for im in imgs
    ]
    data = _py2_pickle(bins, [True, False])
    assert {op.name for op, _, _ in pickletools.genops(data)} >= {opcode, "PROTO", "APPENDS", "TUPLE2"}
    with pytest.raises(UnicodeDecodeError):  # why insightface falls back to encoding='bytes'
        pickle.loads(data)
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    got, issame = load_bin(path, image_size=(h, h))
    assert issame.tolist() == [True, False]
    for i, b in enumerate(bins):
        np.testing.assert_array_equal(got[i], _reference_decode(b))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize(
    "variant", ["uint8_arrays", "np_bool_flags", "np_bool_array", "int_flags", "tuple_bins"]
)
def test_numpy_and_variant_payloads(tmp_path: Path, protocol: int, variant: str) -> None:
    rng = np.random.default_rng(7)
    raw_bins = [_jpeg(im) for im in _faces(rng, 4, 16, 16)]
    flags_ref = [False, True]
    bins: Any = raw_bins
    flags: Any = flags_ref
    if variant == "uint8_arrays":
        bins = [np.frombuffer(b, np.uint8).copy() for b in raw_bins]
    elif variant == "np_bool_flags":
        flags = [np.bool_(v) for v in flags_ref]
    elif variant == "np_bool_array":
        flags = np.array(flags_ref)
    elif variant == "int_flags":
        flags = [int(v) for v in flags_ref]
    elif variant == "tuple_bins":
        bins = tuple(raw_bins)
    path = tmp_path / "v.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, flags), f, protocol=protocol)
    got, issame = load_bin(path, image_size=(16, 16))
    assert issame.tolist() == flags_ref
    for i, b in enumerate(raw_bins):
        np.testing.assert_array_equal(got[i], _reference_decode(b))


# ---------------------------------------------------------------------------------------------------
# Hostile files
# ---------------------------------------------------------------------------------------------------


class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> Any:
        return (os.system, (self.cmd,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> Any:
        return (builtins.exec, (self.code,))


def _assert_refused(path: Path, *, match: str) -> None:
    with _watch() as events, pytest.raises(BinFileError, match=match) as info:
        load_bin(path)
    assert str(path) in str(info.value)
    assert events == []


def test_reduce_payload_calling_os_system_is_refused(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(([_System(f"touch {pwned}")] * 2, [True]), f)
    _assert_refused(path, match=r"refused global (posix|os)\.system")
    assert not pwned.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_reduce_payload_calling_exec_is_refused(tmp_path: Path, protocol: int) -> None:
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    code = f"open({str(pwned)!r}, 'w').close()"
    with open(path, "wb") as f:
        pickle.dump(([b"x", b"y"], [_Exec(code)]), f, protocol=protocol)
    _assert_refused(path, match=r"refused global (__builtin__|builtins)\.exec")
    assert not pwned.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        # Allowed globals called with arguments no genuine file passes.
        (b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", "only \\(str, 'latin1'\\)"),
        (b"c__builtin__\nbytes\n(I1000000000000\ntR.", "bytes: only bytes"),
        (b"cnumpy\ndtype\n(VO8\nI0\nI1\ntR.", "only bool and integer dtypes"),
        (b"cnumpy._core.multiarray\n_reconstruct\n(c__builtin__\nbytes\nI0\nVb\ntR.", "only numpy.ndarray"),
        (b"cnumpy\nndarray\n(I5\ntR.", "numpy.ndarray may not be called"),
        # BUILD on a handed-out global: would alter it for later loads.
        (b"cnumpy\ndtype\n}V__call__\nI1\nsb.", "corrupt pickle .*AttributeError"),
        (b"cnumpy\ndtype\n(N}V_fn\nI1\nstb.", "attribute '_fn' may not be set"),
        # Other ways to reach code.
        (b"(cos\nsystem\nVtrue\no.", r"refused global os\.system"),
        (b"(Vtrue\nios\nsystem\n.", r"refused global os\.system"),
        (b"\x80\x02\x82\x01.", "corrupt pickle"),  # EXT1: extension registry
        (b"Pfoo\n.", "refused persistent id"),
    ],
)
def test_misuse_of_allowed_globals_and_other_routes_are_refused(
    tmp_path: Path, payload: bytes, match: str
) -> None:
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    _assert_refused(path, match=match)


def test_refused_build_leaves_the_allowed_stand_ins_intact(tmp_path: Path, small_bin: Any) -> None:
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"cnumpy\ndtype\n(N}V_fn\nI1\nstb.")
    with pytest.raises(BinFileError):
        load_bin(evil)
    # A protocol-0 numpy payload still loads afterwards.
    rng = np.random.default_rng(8)
    raw = [_jpeg(im) for im in _faces(rng, 2, 16, 16)]
    good = tmp_path / "good.bin"
    with open(good, "wb") as f:
        pickle.dump(([np.frombuffer(b, np.uint8).copy() for b in raw], [np.bool_(True)]), f, protocol=0)
    np.testing.assert_array_equal(load_bin(good, (16, 16))[0][1], _reference_decode(raw[1]))


# ---------------------------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------------------------

_J = _jpeg(_faces(np.random.default_rng(9), 1, 16, 16)[0])


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"bins": [_J, _J]}, r"expected a pickled 2-tuple \(bins, issame_list\), got dict"),
        (([_J, _J], [True], None), r"2-tuple .* got tuple of length 3"),
        ((_J, [True]), r"bins: expected a list of encoded images, got bytes"),
        (([_J, _J, _J], [True]), r"len\(bins\) == 2 \* len\(issame_list\), got 3 bins for 1 pairs"),
        (
            ([_J, "not bytes"], [True]),
            r"bins\[1\]: expected encoded image bytes or a uint8 numpy array, got str",
        ),
        (([_J, np.zeros(4, np.int64)], [True]), r"bins\[1\]: .* got ndarray of dtype int64"),
        (
            ([_J, np.zeros(4, np.float32)], [True]),
            r"numpy.dtype: only bool and integer dtypes are allowed, got 'f4'",
        ),
        (([_J, _J, _J, 7], [True, False]), r"bins\[3\]: .* got int"),
        (([_J, _J, _J, _J], [True, 2]), r"issame_list\[1\]: expected a bool \(or 0/1\), got int 2"),
        (([_J, _J], ["yes"]), r"issame_list\[0\]: expected a bool \(or 0/1\), got str"),
        (([_J, _J], [None]), r"issame_list\[0\]: expected a bool \(or 0/1\), got NoneType"),
        (([_J, _J], np.array([2])), r"issame_list\[0\]: expected a bool or 0/1, got 2"),
        (([_J, _J], np.array([[True]])), r"issame_list: expected a 1-D bool or 0/1 integer array"),
        (([_J, _J], "1"), r"issame_list: expected a list of bools, got str"),
        (([], []), r"holds no pairs"),
        (([_J, b"definitely not a jpeg"], [True]), r"bins\[1\]: 21 bytes do not decode as an image"),
        (([_J, b""], [True]), r"bins\[1\]: 0 bytes do not decode"),
        (([_J, _J[: len(_J) // 3]], [True]), r"bins\[1\]: .* do not decode"),
    ],
)
def test_wrong_structure_names_the_file_and_the_entry(tmp_path: Path, obj: Any, match: str) -> None:
    path = tmp_path / "bad.bin"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    with pytest.raises(BinFileError, match=match) as info:
        load_bin(path, image_size=(16, 16))
    assert str(info.value).startswith(str(path))


def test_header_declaring_a_huge_image_is_refused_before_decoding(tmp_path: Path) -> None:
    j = bytearray(_J)
    sof = j.index(b"\xff\xc0")
    j[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)  # 900 M pixels declared, 16x16 of data
    path = tmp_path / "bomb.bin"
    with open(path, "wb") as f:
        pickle.dump(([_J, bytes(j)], [True]), f)
    with pytest.raises(BinFileError, match=r"bins\[1\]: header declares a 30000x30000 image"):
        load_bin(path, (16, 16))


def test_trailing_bytes_and_empty_or_missing_files(tmp_path: Path, small_bin: Any) -> None:
    path, _, _ = small_bin
    data = path.read_bytes()
    trailing = tmp_path / "trailing.bin"
    trailing.write_bytes(data + b"junk")
    with pytest.raises(
        BinFileError, match=f"4 unexpected bytes after the pickle's end at byte offset {len(data)}"
    ):
        load_bin(trailing, (24, 24))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(BinFileError, match="empty file"):
        load_bin(empty)
    with pytest.raises(BinFileError, match="cannot open"):
        load_bin(tmp_path / "missing.bin")


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("protocol", [2, 4])
def test_truncated_files_raise_bin_file_error_with_an_offset(
    tmp_path: Path, fraction: float, protocol: int
) -> None:
    rng = np.random.default_rng(10)
    bins = [_jpeg(im) for im in _faces(rng, 4, 24, 24)]
    data = pickle.dumps((bins, [True, False]), protocol=protocol)
    cut = max(1, int(len(data) * fraction))
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:cut])
    with pytest.raises(BinFileError, match=rf"truncated or corrupt pickle at byte offset \d+ of {cut}"):
        load_bin(path, (24, 24))


def test_bad_arguments(tmp_path: Path, small_bin: Any) -> None:
    path, imgs, issame = small_bin
    with pytest.raises(ValueError, match="image_size"):
        load_bin(path, (0, 112))
    with pytest.raises(ValueError, match="image_size"):
        load_bin(path, (112,))
    out = tmp_path / "o.bin"
    with pytest.raises(ValueError, match=r"images: expected uint8 \[2n, 3, H, W\]"):
        save_bin(out, imgs.astype(np.float32), issame)
    with pytest.raises(ValueError, match=r"images: expected uint8 \[2n, 3, H, W\]"):
        save_bin(out, imgs.transpose(0, 2, 3, 1), issame)
    with pytest.raises(ValueError, match="2 \\* len\\(issame\\) = 4"):
        save_bin(out, imgs, issame[:2])
    with pytest.raises(ValueError, match="issame"):
        save_bin(out, imgs, [0, 1, 2])
    with pytest.raises(ValueError, match="quality"):
        save_bin(out, imgs, issame, quality=0)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["small.bin"]


# ---------------------------------------------------------------------------------------------------
# Memory: uint8 all the way
# ---------------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import cv2, numpy as np
    from facems.data.binfile import load_bin
    # Warm up the decoder and allocator on a tiny image.
    cv2.imdecode(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1], cv2.IMREAD_COLOR)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    images, issame = load_bin(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "nbytes": images.nbytes,
                      "dtype": str(images.dtype), "n": int(issame.size)}))
    """
)


def test_peak_memory_of_a_2000_image_load_is_uint8_sized(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    tile = [_jpeg(im, 90) for im in _faces(rng, 50, 112, 112)]
    bins = [tile[i % len(tile)] for i in range(2000)]  # distinct bytes objects are not needed
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(i % 2) for i in range(1000)]), f, protocol=4)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["dtype"] == "uint8" and res["n"] == 1000
    assert res["nbytes"] == 2000 * 3 * 112 * 112  # 75.3 MB
    growth = (res["after_kb"] - res["before_kb"]) * 1024
    # uint8 output + the file's bytes + slack; one float32 copy alone would add 301 MB.
    assert growth < res["nbytes"] + path.stat().st_size + 40 * 2**20, growth


# ---------------------------------------------------------------------------------------------------
# Fuzzing: mutated files either load or raise BinFileError, and never run anything
# ---------------------------------------------------------------------------------------------------


def _fuzz_seeds() -> list[bytes]:
    rng = np.random.default_rng(12)
    raw = [_jpeg(im, 80) for im in _faces(rng, 4, 16, 16)]
    arrays = [np.frombuffer(b, np.uint8).copy() for b in raw]
    return [
        pickle.dumps((raw, [True, False]), protocol=4),
        pickle.dumps((raw, [True, False]), protocol=2),
        pickle.dumps((arrays, np.array([True, False])), protocol=2),
        pickle.dumps((arrays, [np.bool_(True), np.bool_(False)]), protocol=5),
        _py2_pickle(raw, [True, False]),
    ]


_SEEDS = _fuzz_seeds()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


@settings(max_examples=100, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_mutated())
def test_mutated_files_load_or_raise_bin_file_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data)
    with _watch() as events:
        try:
            images, issame = load_bin(path, image_size=(16, 16))
        except BinFileError as e:
            assert str(path) in str(e)
        else:
            assert images.dtype == np.uint8 and images.shape == (2 * issame.size, 3, 16, 16)
    assert events == []
