"""Deep-metric-learning retrieval benchmarks: CUB-200-2011, Cars196, Stanford Online Products, In-Shop.

Readers for each data set's official layout and the split the metric-learning literature uses (by
class, not the classification split), an image pipeline for non-face images, and
:func:`evaluate_retrieval`: model + data set -> Recall@K at the data set's customary K, MAP@R and
R-precision (:func:`facems.metrics.retrieval_metrics`, pytorch-metric-learning's definitions).

Layouts (``root`` is the data set folder; the official archive's top folder is also accepted):

* ``cub``: ``images.txt`` (``<image_id> <relative path>``), ``image_class_labels.txt``
  (``<image_id> <class_id>``), ``images/``. Classes ``1..C/2`` train, the rest test (1-100 / 101-200);
  ``train_test_split.txt`` is the classification split and is not used.
* ``cars``: ``cars_annos.mat`` (struct array ``annotations`` with ``relative_im_path`` and ``class``),
  ``car_ims/``. Classes ``1..C/2`` train (1-98 / 99-196); the file's ``test`` flag is not used.
* ``sop``: ``Ebay_train.txt`` and ``Ebay_test.txt`` (header ``image_id class_id super_class_id path``).
* ``inshop``: ``list_eval_partition.txt`` (image count, header ``image_name item_id evaluation_status``,
  then one line per image with status ``train``, ``query`` or ``gallery``) in ``root`` or
  ``root/Eval``; images under ``root/img`` or ``root/Img/img``. Queries are searched in the gallery.

For CUB, Cars and SOP the test images are searched among themselves (each query excluded from its
own neighbours).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from facems.embed import PRECISIONS, embed_images
from facems.metrics import retrieval_metrics

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_COUNTS",
    "RECALL_KS",
    "RetrievalDataset",
    "RetrievalFormatError",
    "RetrievalImages",
    "RetrievalResult",
    "RetrievalSplit",
    "embed_split",
    "evaluate_embeddings",
    "evaluate_retrieval",
    "read_cars",
    "read_cub",
    "read_inshop",
    "read_retrieval_dataset",
    "read_sop",
    "resize_center_crop",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The K of Recall@K that each data set's papers report.
RECALL_KS: dict[str, tuple[int, ...]] = {
    "cub": (1, 2, 4, 8),
    "cars": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}

# Images per split of the official releases; a different count is logged as a warning.
OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    "cub": {"train": 5864, "query": 5924},
    "cars": {"train": 8054, "query": 8131},
    "sop": {"train": 59551, "query": 60502},
    "inshop": {"train": 25882, "query": 14218, "gallery": 12612},
}


class RetrievalFormatError(ValueError):
    """A data set file that does not follow its official layout."""


@dataclass(frozen=True)
class RetrievalSplit:
    """One split of a retrieval data set.

    Attributes:
        paths: absolute image paths, in the order of the data set's file.
        labels: int64 ``[len(paths)]`` class labels (the data set's own class/item ids).
    """

    paths: tuple[str, ...]
    labels: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or self.labels.shape[0] != len(self.paths):
            raise ValueError(
                f"labels: expected shape ({len(self.paths)},), one per path, got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(np.unique(self.labels).shape[0])


@dataclass(frozen=True)
class RetrievalDataset:
    """A retrieval benchmark as its reader found it.

    Attributes:
        name: ``"cub"``, ``"cars"``, ``"sop"`` or ``"inshop"``.
        root: the folder holding the data set's files.
        train: the training split.
        query: the images searched with (CUB, Cars, SOP: the whole test split).
        gallery: the images searched in, or ``None`` when the queries are searched among themselves.
        ks: the customary K of Recall@K.
    """

    name: str
    root: str
    train: RetrievalSplit
    query: RetrievalSplit
    gallery: RetrievalSplit | None
    ks: tuple[int, ...]

    @property
    def same_set(self) -> bool:
        """True when the queries are searched among themselves (each excluded from its own results)."""
        return self.gallery is None


# ----------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------


def _first_existing(candidates: Sequence[str], what: str) -> str:
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"{what}: none of {', '.join(candidates)} exists")


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _int_field(path: str, line_no: int, name: str, text: str) -> int:
    """An ASCII decimal integer that fits int64 (ids and labels end up in int64 arrays)."""
    if len(text) > 20 or _INT_TEXT.fullmatch(text) is None or not -(2**63) <= int(text) < 2**63:
        raise RetrievalFormatError(
            f"{path}:{line_no}: {name} {text[:40]!r} is not an integer (ASCII digits, 64-bit)"
        )
    return int(text)


def _read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (ending in \\n, \\r\\n or \\r, as Python's text mode reads them)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        raise RetrievalFormatError(
            f"{path}:{line_no}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start})"
        ) from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _read_rows(path: str, num_fields: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Non-empty lines after the first ``skip``, split on whitespace, each with exactly ``num_fields`` fields."""
    rows = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if line_no <= skip or not line.strip():
            continue
        parts = line.split()
        if len(parts) != num_fields:
            raise RetrievalFormatError(
                f"{path}:{line_no}: expected {num_fields} whitespace-separated fields, got {len(parts)}: "
                f"{line.rstrip()[:120]!r}"
            )
        rows.append((line_no, parts))
    if not rows:
        raise RetrievalFormatError(f"{path}: no entries")
    return rows


def _class_half_split(
    source: str, paths: list[str], labels: np.ndarray
) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Classes ``1..C/2`` train, ``C/2+1..C`` test; the classes must be exactly ``1..C``."""
    classes = np.unique(labels)
    expected = np.arange(1, classes.shape[0] + 1)
    if not np.array_equal(classes, expected):
        raise RetrievalFormatError(
            f"{source}: expected class ids 1..{classes.shape[0]} without gaps, got "
            f"{classes[:5].tolist()}...{classes[-3:].tolist()}"
        )
    train = labels <= classes.shape[0] // 2
    idx_train, idx_test = np.flatnonzero(train), np.flatnonzero(~train)
    return (
        RetrievalSplit(tuple(paths[i] for i in idx_train), labels[idx_train]),
        RetrievalSplit(tuple(paths[i] for i in idx_test), labels[idx_test]),
    )


def read_cub(root: str) -> RetrievalDataset:
    """CUB-200-2011 (``root`` holds ``images.txt``, or ``root/CUB_200_2011`` does); split by class.

    Raises:
        FileNotFoundError: a list file is missing.
        RetrievalFormatError: a malformed line (file and line named), duplicate or unmatched image ids,
            class ids that are not ``1..C``.
    """
    base = root if os.path.isfile(os.path.join(root, "images.txt")) else os.path.join(root, "CUB_200_2011")
    images_txt = _first_existing([os.path.join(base, "images.txt")], "CUB-200-2011 image list")
    labels_txt = _first_existing([os.path.join(base, "image_class_labels.txt")], "CUB-200-2011 class labels")
    rel: dict[int, str] = {}
    for line_no, (image_id, path) in _read_rows(images_txt, 2):
        key = _int_field(images_txt, line_no, "image_id", image_id)
        if key in rel:
            raise RetrievalFormatError(f"{images_txt}:{line_no}: image_id {key} listed twice")
        rel[key] = path
    cls: dict[int, int] = {}
    for line_no, (image_id, class_id) in _read_rows(labels_txt, 2):
        key = _int_field(labels_txt, line_no, "image_id", image_id)
        if key not in rel:
            raise RetrievalFormatError(f"{labels_txt}:{line_no}: image_id {key} is not in {images_txt}")
        if key in cls:
            raise RetrievalFormatError(f"{labels_txt}:{line_no}: image_id {key} listed twice")
        cls[key] = _int_field(labels_txt, line_no, "class_id", class_id)
    missing = sorted(set(rel) - set(cls))
    if missing:
        raise RetrievalFormatError(
            f"{labels_txt}: no class for image_id {missing[0]} (and {len(missing) - 1} more)"
        )
    ids = sorted(rel)
    paths = [os.path.abspath(os.path.join(base, "images", rel[i])) for i in ids]
    labels = np.array([cls[i] for i in ids], dtype=np.int64)
    train, test = _class_half_split(labels_txt, paths, labels)
    return RetrievalDataset("cub", os.path.abspath(base), train, test, None, RECALL_KS["cub"])


# MAT-file v5 (the format of cars_annos.mat) as scipy reads it: a 128-byte header, then data elements,
# each a tag (type, byte count) and its data padded to 8 bytes, or a "small" element whose type and
# count share the first tag word and whose data fills the second. scipy's Cython reader looks element
# types up in a C table without a bounds check and reads on past the end of a matrix that holds fewer
# elements than its class and flags announce, so a damaged file can crash the interpreter. The walk
# below checks, before scipy runs, everything that reader trusts.
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MI_NUMERIC = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13})
_MI_TEXT = frozenset({16, 17, 18})  # UTF-8/16/32 character data
# Array classes: 1 cell, 2 struct, 3 object, 4 char, 5 sparse, 6-15 numeric; function handles (16) and
# opaque objects (17) do not occur in the annotation files and are refused.
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_SPARSE, _MX_LAST_NUMERIC = 1, 2, 3, 4, 5, 15
_MX_COMPLEX_FLAG = 0x800
_MAX_INFLATED_BYTES = 1 << 28

_MatElement = tuple[int, int, int, int]  # offset, type, data offset, byte count


def _mat_elements(path: str, order: str, buf: bytes, pos: int, end: int, where: str) -> list[_MatElement]:
    """The data elements in ``buf[pos:end]``; each must fit in that range."""
    out = []
    while pos < end:
        if pos + 8 > end:
            raise RetrievalFormatError(f"{path}: truncated MAT data element at byte offset {pos}{where}")
        word, size = struct.unpack_from(order + "II", buf, pos)
        small = word >> 16
        mdtype, body, size = (word & 0xFFFF, pos + 4, small) if small else (word, pos + 8, size)
        if small and (size > 4 or mdtype not in _MI_NUMERIC | _MI_TEXT):
            raise RetrievalFormatError(f"{path}: bad small MAT data element at byte offset {pos}{where}")
        if body + size > end:
            raise RetrievalFormatError(
                f"{path}: MAT data element of {size} bytes at byte offset {pos}{where} runs past its container"
            )
        out.append((pos, mdtype, body, size))
        if small:  # tag and data share 8 bytes
            pos += 8
        elif mdtype == _MI_COMPRESSED:  # not padded
            pos = body + size
        else:
            pos = body + size + (-size % 8)
    return out


def _mat_error(
    path: str, elements: list[_MatElement], k: int, start: int, where: str, problem: str
) -> RetrievalFormatError:
    at = elements[k][0] if k < len(elements) else start
    return RetrievalFormatError(f"{path}: {problem} at byte offset {at}{where}")


def _check_mat5_elements(path: str, data: bytes) -> None:
    """Check every data element of a MAT-file v5 before scipy parses it.

    Refuses unknown element types, elements running past their container, matrices whose flags,
    dimensions, name or contents do not have the types and the number of elements their class and
    flags call for, arrays with more elements than their bytes could hold (sparse excepted), and
    compressed data that does not inflate or inflates past 256 MiB in all. Files that are not v5
    (v4, v7.3) are left to scipy's own checks.

    Raises:
        RetrievalFormatError: naming the file and the byte offset of the bad element.
    """
    if (
        len(data) < 128
        or data[126:128] not in (b"IM", b"MI")
        or data[124:126] not in (b"\x00\x01", b"\x01\x00")
    ):
        return
    order = "<" if data[126:128] == b"IM" else ">"
    inflated = 0
    # (buffer, start, end, holds a matrix body, file offset of the compressed element it came from)
    todo: list[tuple[bytes, int, int, bool, int | None]] = [(data, 128, len(data), False, None)]
    while todo:
        buf, start, end, matrix, origin = todo.pop()
        where = "" if origin is None else f" of the data compressed at byte offset {origin}"
        elements = _mat_elements(path, order, buf, start, end, where)
        if not matrix:  # top level (or inflated data): variables
            for k, (pos, mdtype, body, size) in enumerate(elements):
                if mdtype == _MI_MATRIX:
                    todo.append((buf, body, body + size, True, origin))
                    continue
                if mdtype != _MI_COMPRESSED:
                    raise _mat_error(
                        path,
                        elements,
                        k,
                        start,
                        where,
                        f"MAT data element of type {mdtype} where a variable was expected",
                    )
                try:
                    out = zlib.decompressobj().decompress(
                        buf[body : body + size], _MAX_INFLATED_BYTES - inflated + 1
                    )
                except zlib.error as e:
                    raise _mat_error(
                        path, elements, k, start, where, f"compressed MAT element does not inflate ({e})"
                    ) from None
                inflated += len(out)
                if inflated > _MAX_INFLATED_BYTES:
                    raise _mat_error(
                        path,
                        elements,
                        k,
                        start,
                        where,
                        f"compressed MAT elements inflate past {_MAX_INFLATED_BYTES} bytes",
                    )
                todo.append((out, 0, len(out), False, pos if origin is None else origin))
            continue
        if not elements:  # an empty matrix
            continue
        types = [e[1] for e in elements]
        if len(elements) < 3 or types[:3] != [_MI_UINT32, _MI_INT32, _MI_INT8] or elements[0][3] != 8:
            raise _mat_error(
                path,
                elements,
                0,
                start,
                where,
                "MAT matrix does not start with array flags (8 bytes), dimensions and name",
            )
        flags = struct.unpack_from(order + "I", buf, elements[0][2])[0]
        mx_class, complex_ = flags & 0xFF, bool(flags & _MX_COMPLEX_FLAG)
        dims_at, dims_size = elements[1][2], elements[1][3]
        dims = struct.unpack_from(f"{order}{dims_size // 4}i", buf, dims_at)
        count = 1
        for d in dims:
            count *= d
        if dims_size % 4 or not dims or min(dims) < 0:
            raise _mat_error(
                path,
                elements,
                1,
                start,
                where,
                f"MAT array dimensions {list(dims)[:8]} are not non-negative int32 values",
            )
        if mx_class != _MX_SPARSE and count > end - start + (1 << 20):
            raise _mat_error(
                path,
                elements,
                1,
                start,
                where,
                f"MAT array dimensions {list(dims)[:8]} hold more elements than its {end - start} bytes could",
            )
        first = 3  # the first element after the name
        if mx_class == _MX_OBJECT:  # a class name, then as a struct
            if types[3:4] != [_MI_INT8]:
                raise _mat_error(path, elements, 3, start, where, "MAT object without a class name")
            first = 4
        if mx_class in (_MX_STRUCT, _MX_OBJECT):  # field name length, field names, then the fields
            if types[first : first + 2] != [_MI_INT32, _MI_INT8] or elements[first][3] != 4:
                raise _mat_error(
                    path,
                    elements,
                    first,
                    start,
                    where,
                    "MAT struct without field name length and field names",
                )
            name_len = struct.unpack_from(order + "i", buf, elements[first][2])[0]
            names_size = elements[first + 1][3]
            if name_len <= 0 or names_size % name_len:
                raise _mat_error(
                    path,
                    elements,
                    first,
                    start,
                    where,
                    f"MAT struct field name length {name_len} does not divide {names_size} bytes",
                )
            first += 2
            allowed, wanted = frozenset({_MI_MATRIX}), count * (names_size // name_len)
        elif mx_class == _MX_CELL:
            allowed, wanted = frozenset({_MI_MATRIX}), count
        elif mx_class == _MX_CHAR:
            allowed, wanted = _MI_NUMERIC | _MI_TEXT, 1
        elif (
            mx_class == _MX_SPARSE or 6 <= mx_class <= _MX_LAST_NUMERIC
        ):  # (row indices, column starts,) values
            allowed, wanted = _MI_NUMERIC, (3 if mx_class == _MX_SPARSE else 1) + complex_
        else:
            kind = (
                " (a function handle or opaque object, e.g. a MATLAB string)" if mx_class in (16, 17) else ""
            )
            raise _mat_error(path, elements, 0, start, where, f"unsupported MAT array class {mx_class}{kind}")
        if len(elements) - first != wanted:
            raise _mat_error(
                path,
                elements,
                first,
                start,
                where,
                f"MAT array of class {mx_class} holds {len(elements) - first} elements, its header calls for {wanted}",
            )
        for k in range(first, len(elements)):
            if types[k] not in allowed:
                raise _mat_error(
                    path,
                    elements,
                    k,
                    start,
                    where,
                    f"MAT data element of type {types[k]} in an array of class {mx_class}",
                )
            if types[k] == _MI_MATRIX:
                body, size = elements[k][2:]
                todo.append((buf, body, body + size, True, origin))


def read_cars(root: str) -> RetrievalDataset:
    """Cars196 from ``cars_annos.mat`` (in ``root``); split by class (1-98 / 99-196), not by its test flag.

    Raises:
        FileNotFoundError: the file is missing.
        RetrievalFormatError: a damaged MAT-file (checked element by element before scipy reads it, so
            that it cannot crash the interpreter; the byte offset is named), no ``annotations`` struct
            array, a missing field, or a record whose path or class is not readable (record index
            named), class ids that are not ``1..C``.
    """
    import scipy.io  # scikit-learn's dependency; imported here to keep the module import light

    mat_path = _first_existing([os.path.join(root, "cars_annos.mat")], "Cars196 annotations")
    with open(mat_path, "rb") as f:
        raw = f.read()
    _check_mat5_elements(mat_path, raw)
    try:
        mat = scipy.io.loadmat(io.BytesIO(raw), squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, IndexError, TypeError, ... on a damaged file
        raise RetrievalFormatError(f"{mat_path}: not a readable MATLAB file: {e}") from None
    ann = mat.get("annotations")
    if not isinstance(ann, np.ndarray) or ann.dtype.names is None:
        raise RetrievalFormatError(
            f"{mat_path}: expected a struct array 'annotations', got {type(ann).__name__}"
        )
    for name in ("relative_im_path", "class"):
        if name not in ann.dtype.names:
            raise RetrievalFormatError(
                f"{mat_path}: annotations lack the field {name!r} (fields: {', '.join(ann.dtype.names)})"
            )
    records = np.atleast_1d(ann)
    paths, labels = [], []
    for i, rec in enumerate(records):
        path, cls = rec["relative_im_path"], rec["class"]
        if not isinstance(path, str) or not path:
            raise RetrievalFormatError(
                f"{mat_path}: annotations[{i}].relative_im_path: expected a path, got {path!r}"
            )
        try:
            value = float(cls)
        except (TypeError, ValueError):
            raise RetrievalFormatError(
                f"{mat_path}: annotations[{i}].class: expected an integer, got {cls!r:.80}"
            ) from None
        if not (math.isfinite(value) and -(2**63) <= value < 2**63) or value != int(value):
            raise RetrievalFormatError(
                f"{mat_path}: annotations[{i}].class: expected an integer, got {value}"
            )
        paths.append(os.path.abspath(os.path.join(root, path)))
        labels.append(int(value))
    train, test = _class_half_split(mat_path, paths, np.array(labels, dtype=np.int64))
    return RetrievalDataset("cars", os.path.abspath(root), train, test, None, RECALL_KS["cars"])


def _read_ebay(path: str, base: str) -> RetrievalSplit:
    lines = _read_lines(path)
    header = lines[0].split() if lines else []
    if header != ["image_id", "class_id", "super_class_id", "path"]:
        raise RetrievalFormatError(
            f"{path}:1: expected the header 'image_id class_id super_class_id path', got {' '.join(header)[:120]!r}"
        )
    paths, labels = [], []
    for line_no, (_, class_id, _, rel) in _read_rows(path, 4, skip=1):
        labels.append(_int_field(path, line_no, "class_id", class_id))
        paths.append(os.path.abspath(os.path.join(base, rel)))
    return RetrievalSplit(tuple(paths), np.array(labels, dtype=np.int64))


def read_sop(root: str) -> RetrievalDataset:
    """Stanford Online Products (``Ebay_train.txt``, ``Ebay_test.txt`` in ``root`` or ``root/Stanford_Online_Products``).

    Raises:
        FileNotFoundError: a list file is missing.
        RetrievalFormatError: a wrong header or a malformed line (file and line named).
    """
    base = root
    if not os.path.isfile(os.path.join(root, "Ebay_test.txt")):
        base = os.path.join(root, "Stanford_Online_Products")
    train_txt = _first_existing([os.path.join(base, "Ebay_train.txt")], "SOP train list")
    test_txt = _first_existing([os.path.join(base, "Ebay_test.txt")], "SOP test list")
    return RetrievalDataset(
        "sop",
        os.path.abspath(base),
        _read_ebay(train_txt, base),
        _read_ebay(test_txt, base),
        None,
        RECALL_KS["sop"],
    )


_ITEM_ID = re.compile(r"id_([0-9]{1,19})")


def read_inshop(root: str) -> RetrievalDataset:
    """In-Shop Clothes Retrieval (``list_eval_partition.txt`` in ``root`` or ``root/Eval``).

    Labels are the numbers of the item ids (``id_00000002`` -> 2); query and gallery share them.

    Raises:
        FileNotFoundError: the partition file is missing.
        RetrievalFormatError: a wrong count line or header, a malformed line, an item id not of the form
            ``id_<digits>`` or a status other than train/query/gallery (file and line named).
    """
    list_txt = _first_existing(
        [
            os.path.join(root, "list_eval_partition.txt"),
            os.path.join(root, "Eval", "list_eval_partition.txt"),
        ],
        "In-Shop partition list",
    )
    lines = _read_lines(list_txt)
    count_line = lines[0].strip() if lines else ""
    header = lines[1].split() if len(lines) > 1 else []
    count = _int_field(list_txt, 1, "image count", count_line)
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise RetrievalFormatError(
            f"{list_txt}:2: expected the header 'image_name item_id evaluation_status', got {' '.join(header)[:120]!r}"
        )
    base = root
    if not os.path.isdir(os.path.join(root, "img")) and os.path.isdir(os.path.join(root, "Img", "img")):
        base = os.path.join(root, "Img")
    parts: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in ("train", "query", "gallery")}
    rows = _read_rows(list_txt, 3, skip=2)
    for line_no, (rel, item, status) in rows:
        m = _ITEM_ID.fullmatch(item)
        if m is None or int(m.group(1)) >= 2**63:
            raise RetrievalFormatError(
                f"{list_txt}:{line_no}: item_id {item[:40]!r} is not of the form id_<digits> (a 64-bit integer)"
            )
        if status not in parts:
            raise RetrievalFormatError(
                f"{list_txt}:{line_no}: evaluation_status {status!r}: expected train, query or gallery"
            )
        parts[status][0].append(os.path.abspath(os.path.join(base, rel)))
        parts[status][1].append(int(m.group(1)))
    if count != len(rows):
        raise RetrievalFormatError(f"{list_txt}:1: announces {count} images, the file lists {len(rows)}")
    splits = {s: RetrievalSplit(tuple(p), np.array(lab, dtype=np.int64)) for s, (p, lab) in parts.items()}
    for s in ("query", "gallery"):
        if len(splits[s]) == 0:
            raise RetrievalFormatError(f"{list_txt}: no {s} images")
    return RetrievalDataset(
        "inshop",
        os.path.abspath(base),
        splits["train"],
        splits["query"],
        splits["gallery"],
        RECALL_KS["inshop"],
    )


_READERS: dict[str, Callable[[str], RetrievalDataset]] = {
    "cub": read_cub,
    "cars": read_cars,
    "sop": read_sop,
    "inshop": read_inshop,
}
DATASETS: tuple[str, ...] = tuple(_READERS)


def read_retrieval_dataset(name: str, root: str) -> RetrievalDataset:
    """Read data set ``name`` (one of :data:`DATASETS`) from ``root``; warn when its counts are not the official ones."""
    if name not in _READERS:
        raise ValueError(f"name: expected one of {', '.join(DATASETS)}, got {name!r}")
    ds = _READERS[name](root)
    found = {"train": len(ds.train), "query": len(ds.query)}
    if ds.gallery is not None:
        found["gallery"] = len(ds.gallery)
    if found != OFFICIAL_COUNTS[name]:
        logger.warning(
            "%s at %s: image counts %s differ from the official %s", name, root, found, OFFICIAL_COUNTS[name]
        )
    return ds


# ----------------------------------------------------------------------------------------------------
# Images and embeddings
# ----------------------------------------------------------------------------------------------------


def resize_center_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Scale so that the shorter side is ``resize``, then cut the central ``crop x crop`` square.

    The geometry is torchvision's ``Resize(resize)`` + ``CenterCrop(crop)``: the longer side becomes
    ``int(resize * long / short)`` and the crop starts at ``round((size - crop) / 2)``. Pixels are
    OpenCV's: area averaging when shrinking (close to PIL's antialiased bilinear), bilinear when enlarging.

    Args:
        image: uint8 ``(H, W, 3)``.
        resize: target length of the shorter side (>= crop).
        crop: side of the square output.

    Returns:
        uint8 ``(crop, crop, 3)``, contiguous.
    """
    if crop < 1 or resize < crop:
        raise ValueError(f"resize, crop: expected resize >= crop >= 1, got resize {resize} and crop {crop}")
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = resize, int(resize * w / h)
    else:
        new_h, new_w = int(resize * h / w), resize
    if (new_h, new_w) != (h, w):
        shrink = new_h * new_w < h * w
        image = cv2.resize(
            image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
    top = round((new_h - crop) / 2.0)
    left = round((new_w - crop) / 2.0)
    return np.ascontiguousarray(image[top : top + crop, left : left + crop])


class RetrievalImages(Dataset):
    """Image files decoded with OpenCV to uint8 RGB ``(3, crop, crop)`` tensors (:func:`resize_center_crop`).

    Raises (on access):
        OSError: a file that is missing or cannot be decoded, named.
    """

    def __init__(self, paths: Sequence[str], resize: int = 256, crop: int = 224) -> None:
        if crop < 1 or resize < crop:
            raise ValueError(
                f"resize, crop: expected resize >= crop >= 1, got resize {resize} and crop {crop}"
            )
        self.paths = list(paths)
        self.resize, self.crop = resize, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        path = self.paths[index]
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)  # grey images become 3 equal channels
        if bgr is None:
            raise OSError(f"{path}: missing or not a decodable image")
        rgb = cv2.cvtColor(resize_center_crop(bgr, self.resize, self.crop), cv2.COLOR_BGR2RGB)
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class _Standardize(nn.Module):
    """Feeds ``model`` with ``(x / 255 - mean) / std`` given embed_images' ``(x / 255 - 0.5) / 0.5``."""

    mean: Tensor
    std: Tensor

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], device: torch.device
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x * 0.5 + 0.5 - self.mean) / self.std)


def embed_split(
    model: nn.Module,
    split: RetrievalSplit,
    *,
    batch_size: int = 64,
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip: bool = False,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    num_workers: int = 2,
) -> np.ndarray:
    """Raw embeddings of a split's images (one process), in the split's order.

    Images are decoded and cropped in DataLoader workers and cross to the device as uint8; the model
    sees ``(x / 255 - mean) / std`` per channel (ImageNet statistics by default; ``mean = std = 0.5``
    gives the face models' ``[-1, 1]`` input exactly). The batches go through
    :func:`facems.embed.embed_images`.

    Args:
        model: maps float ``(B, 3, crop, crop)`` to ``(B, D)``; already on its device.
        split: the images.
        batch_size: images per batch.
        resize, crop: :func:`resize_center_crop` (224 for ResNets, 227 for BN-Inception, 112 for the
            face backbones).
        mean, std: per-channel statistics on the [0, 1] scale, RGB order.
        flip: add the embedding of the mirrored image (off in the metric-learning protocol).
        device, precision: as :func:`facems.embed.embed_images`.
        num_workers: DataLoader workers (0 decodes in this process).

    Returns:
        float32 ``(len(split), D)``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean, std: expected 3 values each, std > 0, got mean {mean} and std {std}")
    if len(split) == 0:
        raise ValueError("split: no images to embed")
    if device is not None:
        dev = torch.device(device)
    else:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if tuple(mean) == (0.5, 0.5, 0.5) and tuple(std) == (0.5, 0.5, 0.5):
        net: nn.Module = model  # embed_images already feeds (x / 255 - 0.5) / 0.5
    else:
        net = _Standardize(model, mean, std, dev)
    loader = DataLoader(
        RetrievalImages(split.paths, resize, crop),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    parts = [
        embed_images(
            net, batch, batch_size=batch_size, flip=flip, device=dev, precision=precision, distributed=False
        )
        for batch in loader
    ]
    return np.concatenate(parts)


@dataclass(frozen=True)
class RetrievalResult:
    """Outcome of :func:`evaluate_retrieval` / :func:`evaluate_embeddings`.

    Attributes:
        dataset: the data set's name.
        metrics: ``{"recall@K": ..., "map@r": ..., "r_precision": ...}``, fractions in [0, 1].
        ks: the K reported.
        num_queries: images searched with.
        num_references: images searched in (the queries themselves for CUB, Cars and SOP).
        embedding_dim: size of the embeddings.
    """

    dataset: str
    metrics: dict[str, float]
    ks: tuple[int, ...]
    num_queries: int
    num_references: int
    embedding_dim: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "dataset": self.dataset,
            "metrics": dict(self.metrics),
            "ks": list(self.ks),
            "num_queries": self.num_queries,
            "num_references": self.num_references,
            "embedding_dim": self.embedding_dim,
        }


def evaluate_embeddings(
    dataset: RetrievalDataset,
    query_emb: np.ndarray,
    gallery_emb: np.ndarray | None = None,
    ks: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> RetrievalResult:
    """Metrics of given embeddings of ``dataset.query`` (and ``dataset.gallery`` for In-Shop).

    Args:
        dataset: what the embeddings are of.
        query_emb: ``(len(dataset.query), D)``.
        gallery_emb: ``(len(dataset.gallery), D)``; required exactly when the data set has a gallery.
        ks: K of Recall@K; default the data set's customary ones.
        chunk_size: queries per block of the exact neighbour search.
    """
    ks_ = tuple(int(k) for k in (dataset.ks if ks is None else ks))
    if (gallery_emb is None) != dataset.same_set:
        raise ValueError(
            f"gallery_emb: {dataset.name} {'has no' if dataset.same_set else 'has a'} gallery; pass "
            f"{'None' if dataset.same_set else 'its embeddings'}"
        )
    if dataset.gallery is None:
        metrics = retrieval_metrics(query_emb, None, dataset.query.labels, None, ks_, chunk_size=chunk_size)
        n_ref = len(dataset.query)
    else:
        metrics = retrieval_metrics(
            query_emb, gallery_emb, dataset.query.labels, dataset.gallery.labels, ks_, chunk_size=chunk_size
        )
        n_ref = len(dataset.gallery)
    return RetrievalResult(dataset.name, metrics, ks_, len(dataset.query), n_ref, int(np.shape(query_emb)[1]))


def evaluate_retrieval(
    model: nn.Module,
    dataset: RetrievalDataset,
    *,
    ks: Sequence[int] | None = None,
    batch_size: int = 64,
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip: bool = False,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    num_workers: int = 2,
    chunk_size: int | None = None,
) -> RetrievalResult:
    """Embed the data set's query (and gallery) images with ``model`` and compute the retrieval metrics.

    Arguments are those of :func:`embed_split` and :func:`evaluate_embeddings`; the embeddings are
    compared by cosine similarity (:func:`facems.metrics.retrieval_metrics`).
    """
    opts: dict[str, Any] = {
        "batch_size": batch_size,
        "resize": resize,
        "crop": crop,
        "mean": mean,
        "std": std,
        "flip": flip,
        "device": device,
        "precision": precision,
        "num_workers": num_workers,
    }
    query_emb = embed_split(model, dataset.query, **opts)
    gallery_emb = None if dataset.gallery is None else embed_split(model, dataset.gallery, **opts)
    return evaluate_embeddings(dataset, query_emb, gallery_emb, ks, chunk_size)
