"""insightface's ``.bin`` verification-pair files (lfw.bin, calfw.bin, cplfw.bin, ...), read safely.

Format (insightface's data prep, read by ``arcface_torch/eval/verification.py::load_bin``): one pickle of
``(bins, issame_list)``.

* ``bins``: list of ``2 * n`` encoded images (JPEG in every published file), each ``bytes`` or, rarely,
  a numpy uint8 array holding the encoded bytes (mxnet's ``imdecode`` reads an array's raw buffer);
  images ``2k`` and ``2k + 1`` form pair ``k``.
* ``issame_list``: ``n`` booleans, True where the pair shows the same identity.

Files written by Python 2 store the images as ``str``; they are read with ``encoding='bytes'``
(insightface does the same after its first, ASCII, attempt fails).

Safety: a pickle can run arbitrary code, so :func:`load_bin` never calls ``pickle.load`` on the file.
It first walks the opcodes with :mod:`pickletools` (which executes nothing) to find truncation and
length fields pointing past the end of the file, then unpickles with :class:`_RestrictedUnpickler`,
whose ``find_class`` resolves only the handful of globals that such files reference, each to a small
validating stand-in defined here, never to the real callable:

* ``_codecs.encode`` (protocol 0-2 pickles of ``bytes``): only ``(str, 'latin1')``;
* ``__builtin__.bytes`` / ``builtins.bytes`` and ``bytearray``: only from bytes or a latin-1 str;
* numpy array reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype``, ``numpy[._]core.numeric._frombuffer`` for protocol 5,
  ``numpy[._]core.multiarray.scalar`` for ``np.bool_`` flags): only bool and integer dtypes, plain byte
  order, no fields or sub-arrays, raw data whose length matches the shape.

Anything else raises :class:`BinFileError` naming the file and the refused global before it is called.

Before decoding, a JPEG or PNG header that declares more than 2**24 pixels (4096 x 4096) is refused,
so a corrupt or hostile header cannot make the decoder allocate gigabytes.

Decoding follows insightface, with OpenCV instead of mxnet: decode as colour, BGR -> RGB, and, where
the decoded size differs from ``image_size``, ``cv2.resize`` to exactly that size with
``cv2.INTER_LINEAR``. (insightface calls ``mx.image.resize_short``, which keeps the aspect ratio and
interpolates by pixel area; the published files are all 112x112, so no resize happens on them.)
"""

from __future__ import annotations

import os
import pickle
import pickletools
import reprlib
import warnings
from collections.abc import Sequence
from typing import Any, BinaryIO, Union

import cv2
import numpy as np

from facems.fileio import atomic_write

__all__ = ["BinFileError", "load_bin", "save_bin"]

PathLike = Union[str, "os.PathLike[str]"]

_SAVE_PROTOCOL = 4


class BinFileError(ValueError):
    """A ``.bin`` pair file is truncated, malformed, or asks the unpickler for something not allowed."""


# ---------------------------------------------------------------------------------------------------
# Stand-ins for the globals that .bin pickles reference. They are the only callables an unpickled
# file can reach; each accepts exactly the arguments a genuine file passes and raises otherwise.
# ---------------------------------------------------------------------------------------------------

_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})
_ALLOWED_DTYPES = frozenset({"u1", "b1", "?", "i1", "i2", "i4", "i8", "u2", "u4", "u8"})


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _show(value: Any, limit: int = 50) -> str:
    """A short repr of an unpickled value for messages: bounded in depth, so a deeply nested hostile
    value cannot raise RecursionError (or take long) where the builtin ``repr`` would."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Refused(Exception):
    """Raised inside a stand-in; turned into a BinFileError naming the file by :func:`_unpickle`."""


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    if isinstance(value, str):
        return value
    raise _Refused(f"{what}: expected str, got {type(value).__name__}")


def _safe_codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or _as_text(encoding, "_codecs.encode encoding").lower() not in _LATIN1_NAMES:
        raise _Refused(
            f"_codecs.encode: only (str, 'latin1') is allowed, got ({type(obj).__name__}, {_show(encoding)})"
        )
    return obj.encode("latin-1")


def _byte_args(name: str, args: tuple[Any, ...]) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and _as_text(args[1], name).lower() in _LATIN1_NAMES:
        return args[0].encode("latin-1")
    raise _Refused(
        f"{name}: only bytes or (str, 'latin1') arguments are allowed, got {[type(a).__name__ for a in args]}"
    )


def _safe_bytes(*args: Any) -> bytes:
    return _byte_args("bytes", args)


def _safe_bytearray(*args: Any) -> bytearray:
    return bytearray(_byte_args("bytearray", args))


class _Stub:
    """A named stand-in returned by ``find_class``: callable, but without attributes a pickle could set.

    Pickle's BUILD opcode writes into ``__dict__`` or calls ``setattr`` on any object it holds; a plain
    function or class handed out by ``find_class`` could thus be altered for every later load.
    """

    __slots__ = ("_fn", "_name")
    _fn: Any
    _name: str

    def __init__(self, name: str, fn: Any) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            raise _Refused(f"{self._name} may not be called")
        return self._fn(*args)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _Refused(f"{self._name}: attribute {key!r:.50} may not be set")

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled
        raise TypeError("not picklable")


_NDARRAY = _Stub("numpy.ndarray", None)  # only a marker: the first argument of _reconstruct


class _PickledDtype:
    """A numpy dtype as pickled: ``dtype(spec, align, copy)`` then ``__setstate__(state)``."""

    __slots__ = ("dtype",)

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        text = _as_text(spec, "numpy.dtype spec")
        if text not in _ALLOWED_DTYPES:
            raise _Refused(f"numpy.dtype: only bool and integer dtypes are allowed, got {_show(text)}")
        self.dtype = np.dtype(text)

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subdescr, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) not in (8, 9) or any(x is not None for x in state[2:5]):
            raise _Refused(f"numpy.dtype state: expected a plain dtype's 8-tuple, got {_show(state, 200)}")
        order = _as_text(state[1], "numpy.dtype byte order")
        if order not in ("|", "<", ">", "="):
            raise _Refused(f"numpy.dtype state: byte order must be one of | < > =, got {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder("<" if order == "<" else ">")


def _dtype_of(value: Any, what: str) -> np.dtype:
    if not isinstance(value, _PickledDtype):
        raise _Refused(f"{what}: expected a numpy dtype, got {type(value).__name__}")
    return value.dtype


def _shape_of(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _Refused(f"{what}: expected a tuple of non-negative ints, got {_show(value, 200)}")
    return value


def _array_from_raw(raw: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"numpy array data: expected bytes, got {type(raw).__name__}")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(raw):
        raise _Refused(
            f"numpy array data: shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


class _PickledArray:
    """A numpy array as pickled (protocols 0-4): ``_reconstruct(ndarray, ...)`` then ``__setstate__``."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, rawdata), or the old form without the version.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _Refused(
                f"numpy array state: expected (version, shape, dtype, fortran, data), got {type(state).__name__}"
            )
        shape = _shape_of(state[0], "numpy array shape")
        dtype = _dtype_of(state[1], "numpy array dtype")
        self.array = _array_from_raw(state[3], dtype, shape, bool(state[2]))


def _safe_reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PickledArray:
    if subtype is not _NDARRAY:
        raise _Refused(f"numpy _reconstruct: only numpy.ndarray may be rebuilt, got {type(subtype).__name__}")
    return _PickledArray()


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> _PickledArray:
    text = _as_text(order, "numpy _frombuffer order")
    if axis_order is not None or text not in ("C", "F"):
        raise _Refused(f"numpy _frombuffer: only C or F order is allowed, got {_show(order)}")
    dt = _dtype_of(dtype, "numpy _frombuffer dtype")
    return _PickledArray(_array_from_raw(buf, dt, _shape_of(shape, "numpy _frombuffer shape"), text == "F"))


def _safe_scalar(dtype: Any, data: Any = None) -> bool | int:
    """A numpy bool/integer scalar, returned as a Python bool/int (nothing numpy reaches the pickle)."""
    dt = _dtype_of(dtype, "numpy scalar dtype")
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _Refused(f"numpy scalar: expected {dt.itemsize} bytes of data, got {type(data).__name__}")
    value = np.frombuffer(data, dtype=dt)[0]
    return bool(value) if dt.kind == "b" else int(value)


_ALLOWED_GLOBALS: dict[tuple[str, str], _Stub] = {
    ("_codecs", "encode"): _Stub("_codecs.encode", _safe_codecs_encode),
    ("__builtin__", "bytes"): _Stub("bytes", _safe_bytes),
    ("builtins", "bytes"): _Stub("bytes", _safe_bytes),
    ("__builtin__", "bytearray"): _Stub("bytearray", _safe_bytearray),
    ("builtins", "bytearray"): _Stub("bytearray", _safe_bytearray),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Stub("numpy.dtype", _PickledDtype),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _Stub("numpy _reconstruct", _safe_reconstruct)
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _Stub("numpy scalar", _safe_scalar)
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _Stub("numpy _frombuffer", _safe_frombuffer)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; everything else is refused before it is called."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise BinFileError(
                f"{self._path}: refused global {module}.{name}: a .bin pair file may only reference "
                "bytes and numpy array reconstruction"
            )
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise BinFileError(f"{self._path}: refused persistent id {_show(pid, 100)}: not used by .bin files")


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


class _ClampedReader:
    """File reader whose ``read(n)`` never asks for more than what is left (no huge preallocation)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._f.tell()
        return self._f.read(left if n < 0 else min(n, max(left, 0)))

    def readline(self) -> bytes:
        return self._f.readline()

    def tell(self) -> int:
        return self._f.tell()


def _check_opcodes(f: BinaryIO, size: int, path: str) -> None:
    """Walk the pickle's opcodes (executing nothing); raise on truncation, bad opcodes or trailing data."""
    reader = _ClampedReader(f, size)
    ops = pickletools.genops(reader)  # type: ignore[arg-type]
    while True:
        start = f.tell()
        try:
            op, _, _ = next(ops)
        except StopIteration:
            break
        except Exception as e:  # pickletools reports malformed input as ValueError, sometimes others
            raise BinFileError(
                f"{path}: truncated or corrupt pickle at byte offset {start} of {size}: {e}"
            ) from None
        if op.name == "STOP":
            break
    end = f.tell()
    if end != size:
        raise BinFileError(
            f"{path}: {size - end} unexpected bytes after the pickle's end at byte offset {end}"
        )


def _unpickle(path: str) -> Any:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BinFileError(f"{path}: cannot open: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise BinFileError(f"{path}: empty file; expected a pickle of (bins, issame_list)")
        with warnings.catch_warnings():
            # Python 2 STRING opcodes with odd escapes make pickle warn about invalid escape sequences.
            warnings.simplefilter("ignore", DeprecationWarning)
            _check_opcodes(f, size, path)
            f.seek(0)
            unpickler = _RestrictedUnpickler(f, path)
            try:
                obj = unpickler.load()
            except BinFileError:
                raise
            except _Refused as e:
                raise BinFileError(f"{path}: refused pickle content: {e}") from None
            except Exception as e:
                raise BinFileError(
                    f"{path}: corrupt pickle (stopped near byte offset {f.tell()} of {size}): "
                    f"{type(e).__name__}: {e}"
                ) from None
            finally:
                del unpickler  # its memo holds a reference to every unpickled object
    return obj


def _as_encoded(item: Any, index: int, path: str) -> np.ndarray:
    if isinstance(item, _PickledArray):
        item = item.array
    if isinstance(item, (bytes, bytearray)):
        return np.frombuffer(item, dtype=np.uint8)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return np.ascontiguousarray(item).reshape(-1)
    raise BinFileError(
        f"{path}: bins[{index}]: expected encoded image bytes or a uint8 numpy array, got "
        f"{type(item).__name__}{'' if not isinstance(item, np.ndarray) else f' of dtype {item.dtype}'}"
    )


def _as_flags(issame: Any, path: str) -> np.ndarray:
    if isinstance(issame, _PickledArray):
        issame = issame.array
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1 or issame.dtype.kind not in "biu":
            raise BinFileError(
                f"{path}: issame_list: expected a 1-D bool or 0/1 integer array, got {issame.dtype} {issame.shape}"
            )
        bad = np.flatnonzero((issame != 0) & (issame != 1))
        if bad.size:
            raise BinFileError(f"{path}: issame_list[{bad[0]}]: expected a bool or 0/1, got {issame[bad[0]]}")
        return issame.astype(bool)
    if not isinstance(issame, (list, tuple)):
        raise BinFileError(f"{path}: issame_list: expected a list of bools, got {type(issame).__name__}")
    flags = np.empty(len(issame), dtype=bool)
    for k, v in enumerate(issame):
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
            flags[k] = bool(v)
        else:
            raise BinFileError(
                f"{path}: issame_list[{k}]: expected a bool (or 0/1), got {type(v).__name__} {_show(v)}"
            )
    return flags


_MAX_PIXELS = 1 << 24  # 16.8 M pixels (4096 x 4096): far above any face crop, far below a memory bomb
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def _declared_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(height, width) a JPEG or PNG header declares, read without decoding; None if not found."""
    data = buf[:65536].tobytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(
                data[pos + 7 : pos + 9], "big"
            )
        if marker == 0xDA:  # start of scan before any frame header
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if (
        len(image_size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in image_size)
        or min(image_size) <= 0
    ):
        raise ValueError(f"image_size: expected (height, width) positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def load_bin(path: PathLike, image_size: Sequence[int] = (112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Read an insightface ``.bin`` verification-pair file without executing anything it contains.

    Images are decoded one at a time straight into one preallocated uint8 array (no float copies);
    peak memory is about that array plus the file's size.

    Args:
        path: the ``.bin`` file.
        image_size: (height, width) in pixels of the returned images; images of another size are
            resized to it with ``cv2.INTER_LINEAR``.

    Returns:
        ``(images, issame)``: images uint8 [2n, 3, H, W], RGB, channels first, pair k being images
        2k and 2k + 1; issame bool [n], True where the pair shows one identity.

    Raises:
        BinFileError: the file cannot be opened, is truncated or corrupt (the message names the byte
            offset), references a global other than bytes / numpy array reconstruction, is not
            ``(bins, issame_list)`` with ``len(bins) == 2 * len(issame_list) > 0``, holds a bin that is
            not bytes / uint8 array or a flag that is not a bool or 0/1 (the message names the index),
            or holds an image that does not decode or whose header declares more than 2**24 pixels.
        ValueError: ``image_size`` is not two positive ints.
    """
    height, width = _check_image_size(image_size)
    path_s = os.fspath(path)
    obj = _unpickle(path_s)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        got = type(obj).__name__ + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        raise BinFileError(f"{path_s}: expected a pickled 2-tuple (bins, issame_list), got {got}")
    bins, issame_raw = obj
    del obj
    if not isinstance(bins, (list, tuple)):
        raise BinFileError(f"{path_s}: bins: expected a list of encoded images, got {type(bins).__name__}")
    issame = _as_flags(issame_raw, path_s)
    del issame_raw
    if len(bins) != 2 * len(issame):
        raise BinFileError(
            f"{path_s}: expected len(bins) == 2 * len(issame_list), got {len(bins)} bins for {len(issame)} pairs"
        )
    if len(issame) == 0:
        raise BinFileError(f"{path_s}: holds no pairs")
    # Check every entry's type before allocating the (possibly large) output.
    for i, item in enumerate(bins):
        _as_encoded(item, i, path_s)
    if isinstance(bins, tuple):
        bins = list(bins)

    images = np.empty((len(bins), 3, height, width), dtype=np.uint8)
    for i in range(len(bins)):
        buf = _as_encoded(bins[i], i, path_s)
        declared = _declared_size(buf)
        if declared is not None and declared[0] * declared[1] > _MAX_PIXELS:
            raise BinFileError(
                f"{path_s}: bins[{i}]: header declares a {declared[0]}x{declared[1]} image, more than "
                f"{_MAX_PIXELS} pixels; refusing to decode it"
            )
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise BinFileError(f"{path_s}: bins[{i}]: {buf.size} bytes do not decode as an image")
        if bgr.shape[:2] != (height, width):
            bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_LINEAR)
        images[i] = bgr.transpose(2, 0, 1)[::-1]  # HWC BGR -> CHW RGB, written in place
        bins[i] = None  # free each encoded image as soon as it is decoded
        del buf, bgr
    return images, issame


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def save_bin(
    path: PathLike, images: np.ndarray, issame: Sequence[bool] | np.ndarray, quality: int = 95
) -> None:
    """Write a ``.bin`` pair file that insightface's ``load_bin`` and :func:`load_bin` read.

    Each image is JPEG-encoded (OpenCV, baseline, 4:2:0) at ``quality``; the pickle is protocol 4
    (readable by Python >= 3.4; insightface's loader reads any protocol). The file is written to a
    temporary file in the same directory, flushed to disk, then renamed over ``path`` (atomic on POSIX),
    so a reader never sees a partial file.

    Args:
        path: the ``.bin`` file to write (replaced if it exists).
        images: uint8 [2n, 3, H, W], RGB, channels first (as :func:`load_bin` returns them).
        issame: n bools (or 0/1), True where images 2k and 2k + 1 show one identity.
        quality: JPEG quality, 1..100.

    Raises:
        ValueError: on images that are not uint8 [2n, 3, H, W] with n >= 1, flags that are not n bools
            or 0/1, or a quality outside 1..100.
        OSError: if the file cannot be written (the temporary file is removed).
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3 or min(arr.shape[2:]) == 0:
        raise ValueError(f"images: expected uint8 [2n, 3, H, W] RGB, got {arr.dtype} {arr.shape}")
    flags = np.asarray(issame)
    if flags.ndim != 1 or flags.dtype.kind not in "biu" or np.any((flags != 0) & (flags != 1)):
        raise ValueError(f"issame: expected n bools or 0/1 values, got {flags.dtype} {flags.shape}")
    if flags.size == 0 or arr.shape[0] != 2 * flags.size:
        raise ValueError(
            f"images: expected 2 * len(issame) = {2 * flags.size} > 0 images, got {arr.shape[0]}"
        )
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality: expected an int in 1..100, got {quality!r}")

    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    bins: list[bytes] = []
    for i in range(arr.shape[0]):
        ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(arr[i][::-1].transpose(1, 2, 0)), params)
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 3-channel image
            raise ValueError(f"images[{i}]: JPEG encoding failed")
        bins.append(enc.tobytes())
    payload = (bins, [bool(v) for v in flags])

    with atomic_write(path) as f:
        pickle.dump(payload, f, protocol=_SAVE_PROTOCOL)
