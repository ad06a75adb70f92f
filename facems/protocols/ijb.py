"""IJB-B / IJB-C: 1:1 template verification (TAR@FAR) and 1:N identification, at parity with insightface.

The protocol is insightface's (``recognition/arcface_torch/eval_ijbc.py`` for 1:1,
``recognition/_evaluation_/ijb/ijb_1n.py`` and ``ijb_evals.py`` for 1:N):

1. every face of ``loose_crop/`` is aligned from its five landmarks (:func:`facems.data.align.norm_crop`)
   and embedded twice, as is and mirrored: ``emb`` and ``flip_emb``;
2. :func:`image_features`: the image feature is ``emb + flip_emb`` (``use_flip_test``), its norm kept
   (``use_norm_score``; otherwise each feature is L2-normalised first), times the detector score of the
   face (``use_detector_score``). insightface names these test modes F1, N1 and D1; all three are on
   by default, as in ``eval_ijbc.py``. The same three names are used by the CLI
   (``--use-flip-test / --no-use-flip-test`` ...) and in the JSON results;
3. :func:`image_to_template_features`: per template, the faces of each medium (a photo, or the frames
   of one video) are averaged, the media means are summed, and the sum is L2-normalised;
4. :func:`verify_pairs`: the score of a template pair is the cosine of the two template features;
5. :func:`tar_at_far_readout`: TAR at each FAR with both read-outs of :func:`facems.metrics.tar_at_far`
   ("nearest" is insightface's table, "conservative" respects the FAR bound);
6. :func:`identify_1n`: probe templates against the gallery templates of G1 and of G2 (IJB-B: S1, S2),
   CMC at ranks 1/5/10 and open-set TPIR at FPIR 1e-2 / 1e-1, per gallery and averaged.

Release layout read here (``image_path`` is the ``IJBC`` or ``IJBB`` folder, ``t`` = ``ijbc``/``ijbb``)::

    loose_crop/<image>                 loosely cropped, not aligned faces
    meta/t_face_tid_mid.txt            "image template_id media_id", one line per face
    meta/t_name_5pts_score.txt         "image x1 y1 ... x5 y5 detector_score", same faces, same order
    meta/t_template_pair_label.txt     "template_id template_id label" (1 genuine, 0 impostor)
    meta/t_1N_gallery_G1.csv, _G2.csv  (IJB-B: _S1.csv, _S2.csv) and meta/t_1N_probe_mixed.csv:
                                       a header row, then TEMPLATE_ID,SUBJECT_ID,... per face (optional)

Speed (``scripts/bench_ijb.py``, IJB-C size on 2 CPU cores: image features to the TAR table in about
3.4 s against about 124 s for insightface's loops): pooling is one sparse (templates x images)
product; the pairs are bucketed by (t1 block, t2 block) with one sort of packed keys and each bucket
is scored by ``torch.sparse.sampled_addmm`` (only the wanted dot products, reading the two blocks of
template features in place), never by gathering all pairs' features; the read-out sorts only the top
of the impostor scores that the largest target FAR needs.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union

import cv2
import numpy as np
import scipy.sparse
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facems.data.align import norm_crop
from facems.embed import embed_views
from facems.fileio import atomic_write
from facems.metrics import DEFAULT_FARS, cmc, roc, tar_at_far, tpir_at_fpir

__all__ = [
    "DEFAULT_FPIRS",
    "DEFAULT_RANKS",
    "GALLERIES",
    "OFFICIAL_COUNTS",
    "TARGETS",
    "AlignedFaces",
    "IJBMeta",
    "IJBMetaError",
    "IJBResult",
    "IdentificationResult",
    "TarReadout",
    "check_counts",
    "evaluate_ijb",
    "extract_features",
    "feature_fingerprint",
    "format_counts",
    "format_identification_table",
    "format_tar_table",
    "identify_1n",
    "image_features",
    "image_to_template_features",
    "load_feature_cache",
    "meta_paths",
    "read_face_tid_mid",
    "read_ijb_meta",
    "read_name_5pts_score",
    "read_template_pair_list",
    "read_template_subject_list",
    "save_feature_cache",
    "tar_at_far_readout",
    "verify_pairs",
    "write_roc",
]

PathLike = Union[str, "os.PathLike[str]"]

TARGETS: tuple[str, ...] = ("IJBC", "IJBB")

OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    # insightface's IJB meta files (eval_ijbc.py, _evaluation_/ijb/ijb_evals.py): faces, unique
    # templates and template pairs of the 1:1 protocol.
    "IJBC": {"images": 469_375, "templates": 23_124, "pairs": 15_658_489},
    "IJBB": {"images": 227_630, "templates": 12_115, "pairs": 8_010_270},
}

GALLERIES: dict[str, tuple[str, str]] = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
"""The two 1:N gallery files of each target (``<t>_1N_gallery_<name>.csv``), as insightface names them."""

DEFAULT_RANKS: tuple[int, ...] = (1, 5, 10)
DEFAULT_FPIRS: tuple[float, ...] = (1e-2, 1e-1)

FEATURE_CACHE_VERSION = 1


class IJBMetaError(ValueError):
    """A missing or malformed IJB meta file; the message names the file and, where it applies, the line."""


# ----------------------------------------------------------------------------------------------------
# Meta files
# ----------------------------------------------------------------------------------------------------


def meta_paths(image_path: PathLike, target: str = "IJBC") -> dict[str, str]:
    """Paths of the meta files of a release folder, keyed ``face_tid_mid``, ``name_5pts_score``,
    ``template_pair_label``, the two gallery names of :data:`GALLERIES` and ``probe_mixed``."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    meta = os.path.join(os.fspath(image_path), "meta")
    t = target.lower()
    paths = {
        "face_tid_mid": os.path.join(meta, f"{t}_face_tid_mid.txt"),
        "name_5pts_score": os.path.join(meta, f"{t}_name_5pts_score.txt"),
        "template_pair_label": os.path.join(meta, f"{t}_template_pair_label.txt"),
    }
    for g in GALLERIES[target]:
        paths[g] = os.path.join(meta, f"{t}_1N_gallery_{g}.csv")
    paths["probe_mixed"] = os.path.join(meta, f"{t}_1N_probe_mixed.csv")
    return paths


def _check_not_empty(path: str) -> None:
    if not os.path.isfile(path):
        raise IJBMetaError(f"{path}: no such file")
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip() and not f.read(1):
            raise IJBMetaError(f"{path}: the file is empty")


def _read_bytes(path: PathLike) -> bytes:
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise IJBMetaError(f"{where}: no such file") from None
    if not data.strip():
        raise IJBMetaError(f"{where}: the file is empty")
    return data


# The meta files are read as numpy's text reader reads them: UTF-8, lines ending in \n, \r\n or \r,
# fields separated by any Unicode whitespace. The per-line checks below split the same way, so that
# the names and the numbers of a line always come from the same fields.
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")
_INT_TOKEN = re.compile(r"[+-]?[0-9]+")
_FLOAT_TOKEN = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INT64_MIN, _INT64_END = -(2**63), 2**63


def _decode(path: str, data: bytes) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is an error naming its line and offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(_LINE_BREAK_BYTES.findall(data, 0, e.start)) + 1
        raise IJBMetaError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start})"
        ) from None


def _is_ascii_file(path: str) -> bool:
    """Whether every byte of the file is ASCII (read in 16 MiB pieces)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            if not chunk.isascii():
                return False
    return True


def _lines(text: str) -> list[str]:
    """The lines of a text file (a final line break does not start another line)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _is_int(token: str | bytes, non_negative: bool = True) -> bool:
    """An ASCII decimal integer (optional sign) that fits int64, as numpy's reader accepts them."""
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    if len(token) > 20 or _INT_TOKEN.fullmatch(token) is None:  # int64 has 19 digits
        return False
    v = int(token)
    return (0 if non_negative else _INT64_MIN) <= v < _INT64_END


def _is_float(token: str) -> bool:
    """An ASCII decimal number with a finite value."""
    return _FLOAT_TOKEN.fullmatch(token) is not None and math.isfinite(float(token))


def _raise_at_bad_line(path: str, lines: Sequence[str], check: Callable[[list[str]], str | None]) -> NoReturn:
    """Find the first line that ``check`` rejects and raise naming the file and the line number."""
    blank = True
    for k, line in enumerate(lines):
        fields = line.split()
        blank = blank and not fields
        problem = check(fields) if fields else None  # blank lines are skipped by the readers
        if problem is not None:
            raise IJBMetaError(f"{path}:{k + 1}: {problem}, got {line[:120]!r}")
    if blank:
        raise IJBMetaError(f"{path}: no data lines (only blank lines)")
    raise IJBMetaError(f"{path}: the file does not parse (no single line is at fault)")


def _check_pair_line(fields: list[str]) -> str | None:
    if len(fields) != 3:
        return f"expected 3 fields 't1 t2 label', found {len(fields)}"
    if not (_is_int(fields[0]) and _is_int(fields[1])):
        return "expected non-negative integer template ids"
    if not (_is_int(fields[2]) and int(fields[2]) in (0, 1)):
        return "expected a label of 0 or 1"
    return None


def read_template_pair_list(path: PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<t>_template_pair_label.txt``: one ``t1 t2 label`` line per template pair.

    Parsed by numpy's C reader (``np.loadtxt`` of numpy 2: 15.6M lines in about 2.5 s here, strict
    about the number of fields on every line; blank lines are skipped, as pandas does for
    insightface); a malformed file is then re-read line by line to name the first bad line. A file
    with any non-ASCII byte is read line by line in Python instead (same rules: fields split on any
    Unicode whitespace): numpy 2.4's reader crashes the interpreter (SIGSEGV) on some such files, for
    example one line holding U+EF5D5, and the real files are ASCII.

    Returns:
        ``(t1, t2, labels)``: int64 ``[n]`` template ids and bool ``[n]`` (True = genuine pair).

    Raises:
        IJBMetaError: missing or empty file, or a line that is not three non-negative integers with
            a 0/1 label (the message names the file and the line).
    """
    where = os.fspath(path)
    _check_not_empty(where)
    if not _is_ascii_file(where):
        return _read_pairs_in_python(where)
    try:
        table: np.ndarray = np.loadtxt(where, dtype=np.int64, comments=None, ndmin=2, encoding="ascii")
    except ValueError:
        table = np.zeros((0, 0), np.int64)
    if table.shape[1:] == (3,) and table.shape[0]:
        labels = table[:, 2]
        if table.min() >= 0 and bool(np.all((labels == 0) | (labels == 1))):
            return np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1]), labels == 1
    _raise_at_bad_line(where, _lines(_decode(where, _read_bytes(where))), _check_pair_line)


def _read_pairs_in_python(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`read_template_pair_list` for a file that is not ASCII: one line at a time."""
    lines = _lines(_decode(path, _read_bytes(path)))
    rows: list[tuple[int, int, int]] = []
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if _check_pair_line(fields) is not None:
            _raise_at_bad_line(path, lines, _check_pair_line)
        rows.append((int(fields[0]), int(fields[1]), int(fields[2])))
    if not rows:
        _raise_at_bad_line(path, lines, _check_pair_line)
    table = np.array(rows, dtype=np.int64)
    return np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1]), table[:, 2] == 1


def _name_first_table(
    path: str, data: bytes, ncols: int, what: str, field_ok: Callable[[str], bool], dtype: type
) -> tuple[list[str], np.ndarray]:
    """Lines of ``name v1 .. v{ncols-1}``: the names and the (n, ncols - 1) values."""
    lines = _lines(_decode(path, data))

    def check(fields: list[str]) -> str | None:
        if len(fields) != ncols:
            return f"expected {ncols} fields '{what}', found {len(fields)}"
        bad = [f for f in fields[1:] if not field_ok(f)]
        return f"expected {what}; {bad[0][:40]!r} is not valid" if bad else None

    names: list[str] = []
    numbers: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) != ncols:
            if not fields:
                continue  # blank lines are skipped (np.loadtxt and pandas skip them too)
            _raise_at_bad_line(path, lines, check)
        names.append(fields[0])
        numbers.append(" ".join(fields[1:]))
    if not names:
        _raise_at_bad_line(path, lines, check)
    if not all(map(str.isascii, numbers)):  # no valid number is; and numpy's reader is kept to ASCII
        _raise_at_bad_line(path, lines, check)
    try:
        # numpy's C reader converts the numbers of the fields split above (never the names, which
        # may hold characters numpy would split on).
        table: np.ndarray = np.loadtxt(numbers, dtype=dtype, comments=None, ndmin=2)
    except ValueError:
        _raise_at_bad_line(path, lines, check)
    if table.shape != (len(names), ncols - 1):
        raise IJBMetaError(f"{path}: {len(names)} lines of {ncols} fields, but {table.shape[0]} rows parsed")
    if dtype is np.int64 and table.size and table.min() < 0:
        _raise_at_bad_line(path, lines, check)
    if dtype is np.float64 and not np.all(np.isfinite(table)):
        _raise_at_bad_line(path, lines, check)
    return names, table


def read_face_tid_mid(path: PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<t>_face_tid_mid.txt``: one ``image template_id media_id`` line per face.

    Returns:
        ``(names, templates, medias)``: image file names (relative to ``loose_crop/``) and int64 ``[n]``.

    Raises:
        IJBMetaError: missing or empty file, or a line that is not a name and two non-negative integers.
    """
    where = os.fspath(path)
    names, table = _name_first_table(
        where, _read_bytes(where), 3, "image template_id media_id", _is_int, np.int64
    )
    return names, np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1])


def read_name_5pts_score(path: PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<t>_name_5pts_score.txt``: one ``image x1 y1 x2 y2 ... x5 y5 score`` line per face.

    Returns:
        ``(names, landmarks, scores)``: file names, float32 ``[n, 5, 2]`` (x, y) pixels in the loose
        crop, float32 ``[n]`` detector scores (insightface's "faceness" scores).

    Raises:
        IJBMetaError: missing or empty file, or a line that is not a name and 11 finite numbers.
    """
    where = os.fspath(path)
    names, table = _name_first_table(
        where, _read_bytes(where), 12, "image x1 y1 ... x5 y5 score", _is_float, np.float64
    )
    landmarks = table[:, :10].astype(np.float32).reshape(-1, 5, 2)
    return names, landmarks, table[:, 10].astype(np.float32)


def read_template_subject_list(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 1:N gallery or probe file: a header row ``TEMPLATE_ID,SUBJECT_ID,...``, then one row per face.

    Returns:
        ``(templates, subjects)``: int64 ``[n]`` per row (a template appears once per face).

    Raises:
        IJBMetaError: missing/empty file, a header that does not start with TEMPLATE_ID,SUBJECT_ID, a
            row without two integers (int64), or a template listed with two different subjects.
    """
    where = os.fspath(path)
    lines = _read_bytes(where).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    first = lines[0].removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")  # a UTF-8 BOM is allowed
    if [h.strip().upper() for h in first.split(",")][:2] != ["TEMPLATE_ID", "SUBJECT_ID"]:
        raise IJBMetaError(
            f"{where}:1: expected a header starting TEMPLATE_ID,SUBJECT_ID, got {first[:80]!r}"
        )
    templates: list[int] = []
    subjects: list[int] = []
    first_subject: dict[int, tuple[int, int]] = {}
    for k, line in enumerate(lines[1:], start=2):
        cells = line.split(b",")
        if not line.strip():
            continue  # blank lines are skipped, as pandas does
        if len(cells) < 2 or not (
            _is_int(cells[0].strip()) and _is_int(cells[1].strip(), non_negative=False)
        ):
            shown = line[:80].decode("utf-8", "replace")
            raise IJBMetaError(
                f"{where}:{k}: expected TEMPLATE_ID,SUBJECT_ID integers (int64), got {shown!r}"
            )
        t, s = int(cells[0].strip()), int(cells[1].strip())
        seen = first_subject.setdefault(t, (s, k))
        if seen[0] != s:
            raise IJBMetaError(
                f"{where}:{k}: template {t} has subject {s} here but subject {seen[0]} on line {seen[1]}"
            )
        templates.append(t)
        subjects.append(s)
    if not templates:
        raise IJBMetaError(f"{where}: no rows after the header")
    return np.array(templates, np.int64), np.array(subjects, np.int64)


@dataclass
class IJBMeta:
    """The meta files of one release, read and cross-checked by :func:`read_ijb_meta`.

    Attributes:
        target: ``"IJBC"`` or ``"IJBB"``.
        image_path: the release folder (holding ``loose_crop/`` and ``meta/``).
        names: image file names, one per face, in the order of both per-face files.
        templates, medias: int64 ``[n_faces]`` template and media id of each face.
        landmarks: float32 ``[n_faces, 5, 2]``; detector_scores: float32 ``[n_faces]``.
        t1, t2: int64 ``[n_pairs]`` template ids; labels: bool ``[n_pairs]`` (True = genuine).
        galleries: gallery name -> (templates, subjects) per row; empty without the 1:N files.
        probe: (templates, subjects) per row of the probe file, or None.
        paths: the files read (see :func:`meta_paths`).
    """

    target: str
    image_path: str
    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    detector_scores: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probe: tuple[np.ndarray, np.ndarray] | None = None
    paths: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Images, unique templates, pairs, genuine pairs, impostor pairs, 1:N gallery/probe templates."""
        out = {
            "images": len(self.names),
            "templates": int(np.unique(self.templates).size),
            "pairs": int(self.labels.size),
            "genuine": int(np.count_nonzero(self.labels)),
            "impostor": int(self.labels.size - np.count_nonzero(self.labels)),
        }
        for g, (tpl, _) in self.galleries.items():
            out[f"gallery_{g}_templates"] = int(np.unique(tpl).size)
        if self.probe is not None:
            out["probe_templates"] = int(np.unique(self.probe[0]).size)
        return out


def _first_missing(ids: np.ndarray, known: np.ndarray) -> int | None:
    """Index of the first entry of ``ids`` not in the sorted unique ``known``; None if all are there."""
    if ids.size == 0:
        return None
    if not known.size:
        return 0
    lo, hi = int(ids.min()), int(ids.max())
    if 0 <= lo and hi <= int(known[-1]) and int(known[-1]) <= 64 * max(known.size, ids.size):
        # A presence table (IJB-C ids reach about 188,000): one gather per id, no binary search.
        present = np.zeros(int(known[-1]) + 1, dtype=bool)
        present[known] = True
        bad = np.flatnonzero(~present[ids])
    else:
        pos = np.searchsorted(known, ids).clip(0, known.size - 1)
        bad = np.flatnonzero(known[pos] != ids)
    return int(bad[0]) if bad.size else None


def read_ijb_meta(image_path: PathLike, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check the meta files of an IJB-B/IJB-C release folder.

    Checks: both per-face files list the same images in the same order; every template of the pair
    file and of the 1:N files has at least one face. The 1:N files are optional, but all three
    (two galleries and the probes) or none.

    Raises:
        IJBMetaError: a missing or malformed file, or files that disagree (named, with the line).
    """
    paths = meta_paths(image_path, target)
    names, templates, medias = read_face_tid_mid(paths["face_tid_mid"])
    lmk_names, landmarks, scores = read_name_5pts_score(paths["name_5pts_score"])
    if lmk_names != names and any(a != b for a, b in zip(names, lmk_names)):
        first = next(i for i, (a, b) in enumerate(zip(names, lmk_names)) if a != b)
        raise IJBMetaError(
            f"{paths['name_5pts_score']}:{first + 1}: image {lmk_names[first]!r}, but line {first + 1} of "
            f"{paths['face_tid_mid']} is {names[first]!r} (the two files must list the faces in the same order)"
        )
    if len(lmk_names) != len(names):
        common = min(len(names), len(lmk_names))
        longer = paths["face_tid_mid"] if len(names) > common else paths["name_5pts_score"]
        extra = (names if len(names) > common else lmk_names)[common]
        raise IJBMetaError(
            f"{paths['name_5pts_score']}: {len(lmk_names)} faces, but {paths['face_tid_mid']} lists "
            f"{len(names)}: face {common + 1} ({extra!r}) is only in {longer}"
        )
    t1, t2, labels = read_template_pair_list(paths["template_pair_label"])
    known = np.unique(templates)
    for col, ids in (("first", t1), ("second", t2)):
        line = _first_missing(ids, known)
        if line is not None:
            raise IJBMetaError(
                f"{paths['template_pair_label']}:{line + 1}: {col} template {int(ids[line])} has no face in "
                f"{paths['face_tid_mid']}"
            )
    meta = IJBMeta(
        target,
        os.fspath(image_path),
        names,
        templates,
        medias,
        landmarks,
        scores,
        t1,
        t2,
        labels,
        paths=paths,
    )
    one_n = [GALLERIES[target][0], GALLERIES[target][1], "probe_mixed"]
    present = [os.path.isfile(paths[k]) for k in one_n]
    if any(present) and not all(present):
        missing = [paths[k] for k, p in zip(one_n, present) if not p]
        raise IJBMetaError(f"1:N files incomplete: missing {', '.join(missing)}")
    if all(present):
        for name in one_n:
            tpl, subj = read_template_subject_list(paths[name])
            bad = _first_missing(tpl, known)
            if bad is not None:
                raise IJBMetaError(
                    f"{paths[name]}: template {int(tpl[bad])} (data row {bad + 1}) has no face in "
                    f"{paths['face_tid_mid']}"
                )
            if name == "probe_mixed":
                meta.probe = (tpl, subj)
            else:
                meta.galleries[name] = (tpl, subj)
    return meta


def check_counts(counts: Mapping[str, int], target: str) -> list[str]:
    """Warnings for each count that differs from the official release of ``target`` (empty when equal)."""
    official = OFFICIAL_COUNTS[target]
    return [
        f"{target}: {counts[k]:,} {k}, the official release has {v:,}"
        for k, v in official.items()
        if counts.get(k) != v
    ]


# ----------------------------------------------------------------------------------------------------
# Features, templates, pair scores
# ----------------------------------------------------------------------------------------------------


def _threads(num_threads: int | None) -> int:
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads: expected a positive int or None, got {num_threads!r}")
        return num_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def image_features(
    emb: np.ndarray,
    flip_emb: np.ndarray | None = None,
    detector_scores: np.ndarray | None = None,
    use_flip_test: bool = True,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
) -> np.ndarray:
    """insightface's per-image feature before pooling (``img_input_feats`` of ``eval_ijbc.py``).

    ``f = emb + flip_emb`` with ``use_flip_test`` (else ``emb``); then, without ``use_norm_score``,
    ``f / |f|`` (a zero feature stays zero); then, with ``use_detector_score``, ``f * score``.

    Args:
        emb: float ``[n, D]`` raw embeddings of the aligned faces.
        flip_emb: float ``[n, D]`` raw embeddings of the mirrored faces (needed with ``use_flip_test``).
        detector_scores: float ``[n]`` (needed with ``use_detector_score``).

    Returns:
        A new float ``[n, D]`` array in the dtype of ``emb`` (float32 for float32 inputs).
    """
    x = np.asarray(emb)
    if x.ndim != 2 or x.dtype.kind != "f":
        raise ValueError(f"emb: expected a float [n, D] array, got {x.dtype} {x.shape}")
    if use_flip_test:
        if flip_emb is None or np.shape(flip_emb) != x.shape:
            raise ValueError(
                f"flip_emb: expected shape {x.shape} with use_flip_test, got "
                f"{None if flip_emb is None else np.shape(flip_emb)}"
            )
        out = np.add(x, np.asarray(flip_emb), dtype=x.dtype)
    else:
        out = x.copy()
    if not use_norm_score:
        _normalize_rows(out)
    if use_detector_score:
        if detector_scores is None or np.shape(detector_scores) != (x.shape[0],):
            raise ValueError(
                f"detector_scores: expected shape ({x.shape[0]},) with use_detector_score, got "
                f"{None if detector_scores is None else np.shape(detector_scores)}"
            )
        out *= np.asarray(detector_scores, dtype=x.dtype)[:, None]
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm in place (zero rows stay zero), as sklearn's ``normalize``."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1
    x /= norms[:, None]
    return x


def image_to_template_features(
    img_feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    select: np.ndarray | Sequence[int] | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Template features: per template, the mean of each medium's image features, summed, L2-normalised.

    Equals insightface's ``image2template_feature`` (``eval_ijbc.py``; with ``select``, the 1:N variant
    of ``ijb_1n.py``) up to float rounding. Computed as one sparse ``(templates x images)`` product
    whose entries are ``1 / (faces in that medium of that template)``.

    Args:
        img_feats: float ``[n, D]`` image features (see :func:`image_features`).
        templates: int ``[n]`` template id of each image.
        medias: int ``[n]`` media id of each image (media are grouped within their template).
        select: template ids to build (e.g. the gallery's); default every template in ``templates``.
        num_threads: threads for the product; default the usable cores (at most 16).

    Returns:
        ``(template_feats, unique_templates)``: ``[T, D]`` in the dtype of ``img_feats`` (unit rows;
        a zero sum stays zero) and the sorted int64 ``[T]`` template ids of the rows.

    Raises:
        ValueError: on shapes that do not match, or a selected template without any image.
    """
    x = np.asarray(img_feats)
    tpl = np.asarray(templates)
    med = np.asarray(medias)
    if x.ndim != 2 or x.dtype.kind != "f":
        raise ValueError(f"img_feats: expected a float [n, D] array, got {x.dtype} {x.shape}")
    if tpl.shape != (x.shape[0],) or med.shape != (x.shape[0],):
        raise ValueError(
            f"templates and medias: expected shape ({x.shape[0]},) each, got {tpl.shape} and {med.shape}"
        )
    if tpl.dtype.kind not in "iu" or med.dtype.kind not in "iu":
        raise ValueError(f"templates and medias: expected integer ids, got {tpl.dtype} and {med.dtype}")
    rows = np.arange(x.shape[0])
    if select is not None:
        wanted = np.unique(np.asarray(select))
        keep = np.isin(tpl, wanted)
        rows = rows[keep]
        missing = wanted[~np.isin(wanted, tpl[rows])]
        if missing.size:
            raise ValueError(f"select: template {int(missing[0])} has no image in templates")
    unique_templates, t_idx = np.unique(tpl[rows], return_inverse=True)
    _, m_idx = np.unique(med[rows], return_inverse=True)
    key = t_idx.astype(np.int64) * (int(m_idx.max(initial=0)) + 1) + m_idx
    _, segment, seg_size = np.unique(key, return_inverse=True, return_counts=True)
    weights = (1.0 / seg_size)[segment].astype(x.dtype)
    pool = scipy.sparse.csr_array(
        (weights, (t_idx, rows)), shape=(unique_templates.size, x.shape[0]), dtype=x.dtype
    )
    out = np.empty((unique_templates.size, x.shape[1]), dtype=x.dtype)
    n_parts = min(_threads(num_threads), max(1, unique_templates.size // 256))
    bounds = np.linspace(0, unique_templates.size, n_parts + 1).astype(int)

    def part(k: int) -> None:
        a, b = bounds[k], bounds[k + 1]
        out[a:b] = pool[a:b] @ x

    if n_parts == 1:
        part(0)
    else:
        with ThreadPoolExecutor(n_parts) as ex:
            list(ex.map(part, range(n_parts)))
    return _normalize_rows(out), unique_templates.astype(np.int64)


def _template_rows(unique_templates: np.ndarray, ids: np.ndarray, name: str) -> np.ndarray:
    """Row of each template id in the sorted ``unique_templates`` (int32), or a ValueError naming a stranger."""
    u = unique_templates
    if ids.size == 0:
        return np.zeros(0, np.int32)
    lo, hi = int(ids.min()), int(ids.max())
    if u.size and int(u[0]) >= 0 and int(u[-1]) <= 64 * max(u.size, ids.size):
        # Dense lookup table: a gather per pair, no binary search (IJB-C ids reach about 188,000).
        lut = np.full(int(u[-1]) + 1, -1, np.int32)
        lut[u] = np.arange(u.size, dtype=np.int32)
        if lo >= 0 and hi <= int(u[-1]):
            rows = lut[ids]
            bad = np.flatnonzero(rows < 0)
            if not bad.size:
                return rows
    k = _first_missing(ids, u)
    if k is None:
        return np.searchsorted(u, ids).astype(np.int32)
    raise ValueError(f"{name}[{k}]: template {int(ids[k])} is not among unique_templates (it has no image)")


# Template blocks of the pair tiles: 2048 rows of 512 float32 features are 4 MB, so the two blocks
# of a tile stay in the last-level cache while its pairs are scored.
_TILE_BITS = 11


def _compact(rows: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows that occur (sorted) and each entry's position among them (``rows`` itself when all occur)."""
    used = np.bincount(rows, minlength=n_rows) > 0
    if used.all():
        return np.arange(n_rows), rows
    rank = np.cumsum(used, dtype=np.int32) - 1
    return np.flatnonzero(used), rank[rows]


def _sort_by_tile(
    i1: np.ndarray, i2: np.ndarray, per_side: int, pos_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ordered by (tile, row in block 1, row in block 2): one sort of packed uint64 keys.

    A key holds, from the top: the tile (block of i1, block of i2), the rows of i1 and i2 inside
    their blocks, and the pair's position (``pos_bits`` bits), so one ``np.sort`` (SIMD quicksort)
    replaces an argsort and the random-access gathers of applying it. The fields are built in int32
    (half the memory traffic of uint64) and packed once.

    Returns:
        ``(positions, local rows 1, local rows 2, pairs per tile)``.
    """
    u64 = np.uint64
    low = (1 << _TILE_BITS) - 1
    tile = (i1 >> _TILE_BITS) * per_side + (i2 >> _TILE_BITS)
    counts = np.bincount(tile)
    local = ((i1 & low) << _TILE_BITS) | (i2 & low)
    key = tile.astype(u64) << u64(2 * _TILE_BITS + pos_bits)
    del tile
    key |= local.astype(u64) << u64(pos_bits)
    key |= np.arange(i1.size, dtype=u64)
    key.sort()
    pos = (key & u64((1 << pos_bits) - 1)).astype(np.intp)
    key >>= u64(pos_bits)
    local = (key & u64((1 << (2 * _TILE_BITS)) - 1)).astype(np.int32)
    return pos, local >> _TILE_BITS, local & low, counts


def _score_tiles(
    f1: torch.Tensor, f2: torch.Tensor, l1: np.ndarray, l2: np.ndarray, counts: np.ndarray, per_side: int
) -> np.ndarray:
    """Scores of pairs sorted by :func:`_sort_by_tile`, one sampled dense product per tile.

    ``torch.sparse.sampled_addmm`` computes exactly the wanted dot products of a tile (a CSR pattern
    over its two blocks), vectorised, reading each feature row in place: about 3x less CPU than
    gathering the rows into buffers and reducing them with numpy.
    """
    block = 1 << _TILE_BITS
    vals = np.empty(l1.size, dtype=np.float32 if f1.dtype == torch.float32 else np.float64)
    ends = np.cumsum(counts)
    for tile in np.flatnonzero(counts).tolist():
        e = int(ends[tile])
        s = e - int(counts[tile])
        r0, c0 = (tile // per_side) * block, (tile % per_side) * block
        a, b = f1[r0 : r0 + block], f2[c0 : c0 + block]
        crow = np.zeros(a.shape[0] + 1, np.int32)
        np.cumsum(np.bincount(l1[s:e], minlength=a.shape[0]), out=crow[1:])
        pattern = torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(l2[s:e]),
            torch.zeros(e - s, dtype=f1.dtype),  # beta=0 still multiplies these: no garbage
            size=(a.shape[0], b.shape[0]),
            check_invariants=False,
        )
        vals[s:e] = torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values().numpy()
    return vals


def verify_pairs(
    template_feats: np.ndarray,
    unique_templates: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    num_threads: int | None = None,
) -> np.ndarray:
    """Cosine score of each template pair (insightface's ``verification`` in ``eval_ijbc.py``).

    Args:
        template_feats: float ``[T, D]`` L2-normalised template features (:func:`image_to_template_features`).
        unique_templates: sorted int ``[T]`` template id of each row.
        t1, t2: int ``[n]`` template ids of the pairs.
        num_threads: threads, each scoring a contiguous share of the pairs; default the usable
            cores (at most 16). torch runs one intra-op thread meanwhile (restored afterwards).

    Returns:
        ``[n]`` scores in the dtype of ``template_feats`` (cosine in [-1, 1]), in pair order.

    Raises:
        ValueError: on shapes that do not match, unsorted ``unique_templates``, or a pair template that
            is not in ``unique_templates`` (named, with its position).
    """
    feats = np.ascontiguousarray(template_feats)
    u = np.asarray(unique_templates)
    a, b = np.asarray(t1), np.asarray(t2)
    if feats.ndim != 2 or feats.dtype.kind != "f":
        raise ValueError(f"template_feats: expected a float [T, D] array, got {feats.dtype} {feats.shape}")
    if u.shape != (feats.shape[0],) or u.dtype.kind not in "iu":
        raise ValueError(f"unique_templates: expected int shape ({feats.shape[0]},), got {u.dtype} {u.shape}")
    if u.size > 1 and not bool(np.all(np.diff(u) > 0)):
        raise ValueError("unique_templates: expected strictly increasing template ids (np.unique's order)")
    if (
        a.ndim != 1
        or a.shape != b.shape
        or (a.size and (a.dtype.kind not in "iu" or b.dtype.kind not in "iu"))
    ):
        raise ValueError(
            f"t1 and t2: expected two integer arrays of equal length, got {a.shape} and {b.shape}"
        )
    if feats.dtype not in (np.float32, np.float64):
        feats = feats.astype(np.float32)
    i1 = _template_rows(u, a, "t1")
    i2 = _template_rows(u, b, "t2")
    # Templates that occur as t1 (t2) are made contiguous, so tiles hold as many pairs as possible.
    rows1, i1 = _compact(i1, u.size)
    rows2, i2 = _compact(i2, u.size)
    f1 = torch.from_numpy(feats if rows1.size == u.size else np.ascontiguousarray(feats[rows1]))
    f2 = torch.from_numpy(feats if rows2.size == u.size else np.ascontiguousarray(feats[rows2]))
    per_side = -(-f2.shape[0] >> _TILE_BITS)
    tile_bits = int(max(1, (-(-f1.shape[0] >> _TILE_BITS)) * per_side - 1)).bit_length()
    n_parts = min(_threads(num_threads), max(1, a.size // 65536))
    # Each part's keys must fit 64 bits: more parts (fewer pairs each) when there are very many pairs.
    while tile_bits + 2 * _TILE_BITS + int(max(1, -(-a.size // n_parts) - 1)).bit_length() > 64:
        n_parts *= 2
    bounds = np.linspace(0, a.size, n_parts + 1).astype(np.int64)
    pos_bits = int(max(1, int(np.diff(bounds).max(initial=1)) - 1)).bit_length()

    scores = np.empty(a.size, dtype=feats.dtype)

    def part(k: int) -> None:
        s, e = bounds[k], bounds[k + 1]
        pos, l1, l2, counts = _sort_by_tile(i1[s:e], i2[s:e], per_side, pos_bits)
        scores[s + pos] = _score_tiles(f1, f2, l1, l2, counts, per_side)

    # One torch thread per part: the parts are the parallelism (torch's own threads on top of them
    # would oversubscribe the cores, and spin-wait badly when the machine is shared).
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            with ThreadPoolExecutor(min(n_parts, _threads(num_threads))) as ex:
                list(ex.map(part, range(n_parts)))
    finally:
        torch.set_num_threads(torch_threads)
    return scores


# ----------------------------------------------------------------------------------------------------
# Read-outs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarReadout:
    """TAR at each target FAR, both read-outs, and the ROC curve they were read from.

    Attributes:
        nearest: ``{far: tar}``, insightface's read-out (:func:`facems.metrics.tar_at_far` "nearest").
        conservative: ``{far: tar}``, the FAR bound respected ("conservative").
        fpr, tpr, thresholds: float64 points of the ROC curve (scikit-learn's ``roc_curve`` with its
            defaults), from (0, 0) up to about the largest target FAR (the whole curve when that is
            what the read-out needed).
    """

    nearest: dict[float, float]
    conservative: dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _groups_desc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores in decreasing order, with the cumulative (genuine, impostor) counts down to each."""
    order = np.argsort(scores)[::-1]
    s, y = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y, dtype=np.int64)[ends]
    return s[ends].astype(np.float64), tps, ends.astype(np.int64) + 1 - tps


def _corners(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Interior points where the curve bends (scikit-learn's drop_intermediate keeps those)."""
    return (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)


def _readout_top(
    y: np.ndarray, s: np.ndarray, fars: list[float], neg: np.ndarray, n_neg: int, n_pos: int, k: int
) -> TarReadout | None:
    """The read-out from the pairs scoring at least the k-th highest impostor score; None if not enough."""
    cut = np.partition(neg, n_neg - k)[n_neg - k]
    top = s >= cut
    thr, tps, fps = _groups_desc(y[top], s[top])
    # Every distinct score >= cut is complete; only the last group's neighbour is unknown, so its
    # drop_intermediate status is; the read-outs must be decided before it.
    last = fps.size - 1
    fpr_all, tpr_all = fps / float(n_neg), tps / float(n_pos)
    if last < 2 or fpr_all[last] <= max(fars):
        return None
    keep = np.r_[True, _corners(fps, tps)[: last - 1]] if last > 1 else np.ones(1, bool)
    fpr = np.r_[0.0, fpr_all[:last][keep]]
    tpr = np.r_[0.0, tpr_all[:last][keep]]
    thresholds = np.r_[np.inf, thr[:last][keep]]
    nearest: dict[float, float] = {}
    conservative: dict[float, float] = {}
    cons_fpr, cons_tpr = np.r_[0.0, fpr_all], np.r_[0.0, tpr_all]
    for f in fars:
        gap = np.abs(fpr - f)
        best = fpr.size - 1 - int(np.argmin(gap[::-1]))
        if fpr_all[last] - f <= gap[best]:
            return None  # a point beyond the cut could be as close
        nearest[f] = float(tpr[best])
        conservative[f] = float(cons_tpr[int(np.searchsorted(cons_fpr, f, side="right")) - 1])
    return TarReadout(nearest, conservative, fpr, tpr, thresholds)


def tar_at_far_readout(
    labels: np.ndarray, scores: np.ndarray, fars: Sequence[float] = DEFAULT_FARS
) -> TarReadout:
    """TAR at each FAR, read out both ways, equal to :func:`facems.metrics.tar_at_far`.

    The ROC points that decide a read-out at FAR ``f`` all lie where at most about ``f`` of the
    impostors are accepted, so only the pairs scoring above the ``ceil(1.05 f N) + 1024``-th highest
    impostor score (``N`` impostors, ``f`` the largest target) are sorted, after an O(n) selection;
    the region doubles until every read-out is decided inside it, and small inputs are read out by
    :func:`facems.metrics.tar_at_far` directly. At IJB-C size (15.7M pairs, largest FAR 0.1) this
    sorts about a tenth of the scores.

    Args:
        labels: ``[n]`` bool or 0/1, True for genuine pairs.
        scores: ``[n]`` similarity scores, higher = more alike.
        fars: target FARs, fractions in (0, 1].

    Returns:
        A :class:`TarReadout`.
    """
    y = np.asarray(labels)
    s = np.asarray(scores)
    targets = [float(f) for f in fars]
    if y.shape == s.shape and y.ndim == 1 and s.dtype.kind == "f" and targets and np.all(np.isfinite(s)):
        y = y.astype(bool) if y.dtype != np.bool_ and np.all((y == 0) | (y == 1)) else y
        if y.dtype == np.bool_ and all(0.0 < f <= 1.0 for f in targets):
            n_pos = int(np.count_nonzero(y))
            neg = s[~y]
            n_neg = neg.size
            k = math.ceil(1.05 * max(targets) * n_neg) + 1024
            while n_pos and 2 * k < n_neg:
                got = _readout_top(y, s, targets, neg, n_neg, n_pos, k)
                if got is not None:
                    return got
                k *= 2
    # Small or unusual inputs: the metrics themselves (they also raise the input errors).
    nearest = tar_at_far(labels, scores, targets, mode="nearest")
    conservative = tar_at_far(labels, scores, targets, mode="conservative")
    fpr, tpr, thresholds = roc(labels, scores)
    return TarReadout(nearest, conservative, fpr, tpr, thresholds)


@dataclass(frozen=True)
class IdentificationResult:
    """1:N identification of the probe templates against each gallery.

    Attributes:
        cmc: gallery name (and ``"mean"``) -> ``{rank: identification rate}`` over that gallery's mated
            probes; the mean pools both galleries' mated probes (insightface ijb_evals' "[Mean]").
        tpir: gallery name (and ``"mean"``) -> ``{fpir: tpir}``; the mean is the average of the galleries.
        mated: gallery name -> number of probe templates whose subject is in that gallery.
        gallery_templates: gallery name -> number of gallery templates.
        probe_templates: number of probe templates.
    """

    cmc: dict[str, dict[int, float]]
    tpir: dict[str, dict[float, float]]
    mated: dict[str, int]
    gallery_templates: dict[str, int]
    probe_templates: int


def _template_subjects(rows: tuple[np.ndarray, np.ndarray], unique_templates: np.ndarray) -> np.ndarray:
    """The subject of each template (its first row), in the order of ``unique_templates``."""
    tpl, subj = rows
    first_t, first = np.unique(tpl, return_index=True)
    return subj[first][np.searchsorted(first_t, unique_templates)]


def identify_1n(
    img_feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    galleries: Mapping[str, tuple[np.ndarray, np.ndarray]],
    probe: tuple[np.ndarray, np.ndarray],
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    num_threads: int | None = None,
) -> IdentificationResult:
    """Open-set 1:N identification with insightface's template features (``ijb_1n.py`` / ``ijb_evals.py``).

    Gallery and probe template features are pooled from *all* faces of each listed template (the
    per-face rows of ``ijbc_face_tid_mid.txt``), like :func:`image_to_template_features`; a template's
    subject is that of its first row. Scores are cosine similarities probe x gallery; CMC and TPIR
    are :func:`facems.metrics.cmc` and :func:`facems.metrics.tpir_at_fpir`.

    Args:
        img_feats, templates, medias: as for :func:`image_to_template_features`.
        galleries: name -> (template ids, subject ids), one entry per row of its file.
        probe: (template ids, subject ids) of the probe file.
        ranks: CMC ranks; fpirs: target false positive identification rates.

    Returns:
        An :class:`IdentificationResult`.
    """
    if not galleries:
        raise ValueError("galleries: expected at least one gallery")
    probe_feats, probe_t = image_to_template_features(img_feats, templates, medias, probe[0], num_threads)
    probe_labels = _template_subjects(probe, probe_t)
    result_cmc: dict[str, dict[int, float]] = {}
    result_tpir: dict[str, dict[float, float]] = {}
    mated: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, rows in galleries.items():
        gal_feats, gal_t = image_to_template_features(img_feats, templates, medias, rows[0], num_threads)
        gal_labels = _template_subjects(rows, gal_t)
        sim = probe_feats @ gal_feats.T
        result_cmc[name] = cmc(sim, probe_labels, gal_labels, ranks)
        result_tpir[name] = tpir_at_fpir(sim, probe_labels, gal_labels, fpirs)
        mated[name] = int(np.count_nonzero(np.isin(probe_labels, gal_labels)))
        sizes[name] = int(gal_t.size)
    total = sum(mated.values())
    result_cmc["mean"] = {
        int(r): sum(result_cmc[g][r] * mated[g] for g in galleries) / total
        for r in result_cmc[next(iter(galleries))]
    }
    result_tpir["mean"] = {
        float(f): float(np.mean([result_tpir[g][f] for g in galleries]))
        for f in result_tpir[next(iter(galleries))]
    }
    return IdentificationResult(result_cmc, result_tpir, mated, sizes, int(probe_t.size))


# ----------------------------------------------------------------------------------------------------
# The whole evaluation from embeddings
# ----------------------------------------------------------------------------------------------------


@dataclass
class IJBResult:
    """Everything :func:`evaluate_ijb` measured.

    Attributes:
        target: ``"IJBC"`` or ``"IJBB"``; counts: see :meth:`IJBMeta.counts`.
        switches: ``{"use_flip_test", "use_norm_score", "use_detector_score"}`` -> bool.
        tar: the 1:1 :class:`TarReadout`; scores: the pair scores, in pair-file order.
        identification: the 1:N result, or None without the 1:N files.
        seconds: wall time of each stage (pooling, scoring, readout, identification).
    """

    target: str
    counts: dict[str, int]
    switches: dict[str, bool]
    tar: TarReadout
    scores: np.ndarray
    identification: IdentificationResult | None
    seconds: dict[str, float]

    @property
    def test_mode(self) -> str:
        """insightface's name of the switches, e.g. ``N1D1F1``."""
        sw = self.switches
        return f"N{int(sw['use_norm_score'])}D{int(sw['use_detector_score'])}F{int(sw['use_flip_test'])}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no arrays; dict keys become strings)."""
        ident = self.identification
        return {
            "target": self.target,
            "test_mode": self.test_mode,
            "switches": dict(self.switches),
            "counts": dict(self.counts),
            "tar_at_far": {
                "nearest": {str(k): v for k, v in self.tar.nearest.items()},
                "conservative": {str(k): v for k, v in self.tar.conservative.items()},
            },
            "identification": None
            if ident is None
            else {
                "cmc": {g: {str(r): v for r, v in d.items()} for g, d in ident.cmc.items()},
                "tpir_at_fpir": {g: {str(f): v for f, v in d.items()} for g, d in ident.tpir.items()},
                "mated_probes": ident.mated,
                "gallery_templates": ident.gallery_templates,
                "probe_templates": ident.probe_templates,
            },
            "seconds": dict(self.seconds),
        }


def evaluate_ijb(
    meta: IJBMeta,
    emb: np.ndarray,
    flip_emb: np.ndarray | None,
    use_flip_test: bool = True,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    num_threads: int | None = None,
) -> IJBResult:
    """1:1 verification (and 1:N identification when ``meta`` has its files) from the raw embeddings.

    Args:
        meta: the release's meta files (:func:`read_ijb_meta`).
        emb, flip_emb: float32 ``[n_faces, D]`` raw embeddings of the faces and of their mirrors, in
            the order of ``meta.names`` (see :func:`extract_features`).
        use_flip_test, use_norm_score, use_detector_score: see :func:`image_features`.
        fars: target FARs of the TAR table.
        num_threads: threads for pooling and scoring.

    Returns:
        An :class:`IJBResult`.
    """
    if np.shape(emb)[0] != len(meta.names):
        raise ValueError(f"emb: expected {len(meta.names)} rows (one per face), got {np.shape(emb)[0]}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    feats = image_features(
        emb, flip_emb, meta.detector_scores, use_flip_test, use_norm_score, use_detector_score
    )
    tfeats, unique_t = image_to_template_features(feats, meta.templates, meta.medias, num_threads=num_threads)
    t1 = time.perf_counter()
    scores = verify_pairs(tfeats, unique_t, meta.t1, meta.t2, num_threads=num_threads)
    t2 = time.perf_counter()
    readout = tar_at_far_readout(meta.labels, scores, fars)
    t3 = time.perf_counter()
    seconds.update(pooling=t1 - t0, scoring=t2 - t1, readout=t3 - t2)
    ident = None
    if meta.probe is not None and meta.galleries:
        ident = identify_1n(
            feats, meta.templates, meta.medias, meta.galleries, meta.probe, num_threads=num_threads
        )
        seconds["identification"] = time.perf_counter() - t3
    switches = {
        "use_flip_test": bool(use_flip_test),
        "use_norm_score": bool(use_norm_score),
        "use_detector_score": bool(use_detector_score),
    }
    return IJBResult(meta.target, meta.counts(), switches, readout, scores, ident, seconds)


# ----------------------------------------------------------------------------------------------------
# Images -> embeddings, and the feature cache
# ----------------------------------------------------------------------------------------------------


class AlignedFaces(Dataset):
    """The faces of a release, decoded and aligned to 112x112 in the DataLoader workers.

    Item ``i``: uint8 RGB tensor ``(3, 112, 112)``: ``image_dir/names[i]`` aligned with
    :func:`facems.data.align.norm_crop` from ``landmarks[i]`` (insightface's ``Embedding.get``).
    """

    def __init__(self, image_dir: PathLike, names: Sequence[str], landmarks: np.ndarray) -> None:
        if len(names) != len(landmarks):
            raise ValueError(f"names and landmarks: {len(names)} names but {len(landmarks)} landmark sets")
        self.image_dir = os.fspath(image_dir)
        self.names = list(names)
        self.landmarks = np.asarray(landmarks, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = os.path.join(self.image_dir, self.names[index])
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(
                f"{path}: missing or not a decodable image (face {index + 1} of the meta files)"
            )
        face = norm_crop(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.landmarks[index])
        return torch.from_numpy(np.ascontiguousarray(face.transpose(2, 0, 1)))


def extract_features(
    model: nn.Module,
    image_dir: PathLike,
    names: Sequence[str],
    landmarks: np.ndarray,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
    multiprocessing_context: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of every face and of its mirror (:func:`facems.embed.embed_views`, flip test).

    Args:
        model: backbone mapping [-1, 1] images to raw embeddings (its train/eval mode is kept).
        image_dir: the ``loose_crop`` folder; names, landmarks: from ``<t>_name_5pts_score.txt``.
        batch_size: faces per forward pass; num_workers: DataLoader workers decoding and aligning.
        device, precision: see :func:`facems.embed.embed_views`.
        progress: called with (faces done, total) after each batch.
        multiprocessing_context: the DataLoader's (default fork on Linux). The workers leave OpenCV's
            thread settings alone: ``cv2.setNumThreads`` in a forked child hangs when the parent had
            already used OpenCV's thread pool.

    Returns:
        ``(emb, flip_emb)``: float32 ``[n, D]`` each, in the order of ``names``.
    """
    faces = AlignedFaces(image_dir, names, landmarks)
    loader = DataLoader(
        faces,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
    emb = flip_emb = np.zeros((0, 0), np.float32)
    done = 0
    for batch in loader:
        views = embed_views(
            model, batch, batch_size, flip=True, device=device, precision=precision, distributed=False
        )
        if done == 0:  # filled in place: no list of batches to concatenate (2 x 0.9 GB at IJB-C size)
            emb = np.empty((len(faces), views.shape[2]), np.float32)
            flip_emb = np.empty_like(emb)
        emb[done : done + batch.shape[0]] = views[0]
        flip_emb[done : done + batch.shape[0]] = views[1]
        done += batch.shape[0]
        if progress is not None:
            progress(done, len(faces))
    return emb, flip_emb


def _sha256_file(path: PathLike, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def feature_fingerprint(
    model_path: PathLike, image_list_path: PathLike, model_name: str | None = None, precision: str = "fp32"
) -> str:
    """A SHA-256 of the model file, the image list (``<t>_name_5pts_score.txt``), the network name and
    the precision: embeddings cached under it are valid for any choice of the three switches."""
    h = hashlib.sha256(f"facems-ijb-features-v{FEATURE_CACHE_VERSION}\n".encode())
    _sha256_file(model_path, h)
    h.update(b"\n")
    _sha256_file(image_list_path, h)
    h.update(f"\n{model_name}\n{precision}\n".encode())
    return h.hexdigest()


def save_feature_cache(
    path: PathLike, fingerprint: str, emb: np.ndarray, flip_emb: np.ndarray, detector_scores: np.ndarray
) -> None:
    """Write the embeddings to an uncompressed ``.npz`` (atomically: a crash leaves no partial file)."""
    with atomic_write(path, "wb") as f:
        np.savez(
            f,
            fingerprint=np.array(fingerprint),
            emb=np.asarray(emb, np.float32),
            flip_emb=np.asarray(flip_emb, np.float32),
            detector_scores=np.asarray(detector_scores, np.float32),
        )


def load_feature_cache(path: PathLike, fingerprint: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(emb, flip_emb, detector_scores)`` from a cache written under ``fingerprint``; None when the file
    is missing or was written for another model or image list.

    Raises:
        IJBMetaError: the file exists but is not a readable feature cache (delete it to recompute).
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        return None
    try:
        with np.load(where, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            emb, flip, scores = z["emb"], z["flip_emb"], z["detector_scores"]
    except (OSError, ValueError, KeyError) as e:
        raise IJBMetaError(f"{where}: not a readable feature cache ({e}); delete it to recompute") from None
    if emb.ndim != 2 or flip.shape != emb.shape or scores.shape != (emb.shape[0],):
        raise IJBMetaError(
            f"{where}: inconsistent feature cache (emb {emb.shape}, flip_emb {flip.shape}, scores {scores.shape})"
        )
    return emb, flip, scores


def write_roc(prefix: PathLike, readout: TarReadout, label: str) -> list[str]:
    """Write the ROC points to ``prefix.csv`` and the curve to ``prefix.png`` and ``prefix.pdf``
    (insightface's axes: log FPR from 1e-6 to 1e-1, TPR from 0.3 to 1). Returns the files written."""
    from matplotlib.figure import Figure

    base = os.fspath(prefix)
    written = [base + ".csv"]
    with atomic_write(written[0], "w") as f:
        f.write("fpr,tpr,threshold\n")
        for a, b, c in zip(readout.fpr, readout.tpr, readout.thresholds):
            f.write(f"{a:.10g},{b:.10g},{c:.10g}\n")
    fig = Figure()  # no pyplot: leaves the caller's backend and figures alone
    ax = fig.add_subplot()
    ax.plot(readout.fpr, readout.tpr, lw=1, label=label)
    ax.set_xlim(1e-6, 0.1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xscale("log")
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title("ROC on IJB")
    ax.legend(loc="lower right")
    for ext in (".png", ".pdf"):
        fig.savefig(base + ext)
        written.append(base + ext)
    return written


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def format_counts(counts: Mapping[str, int], target: str) -> str:
    """A markdown table of the release's counts next to the official ones."""
    official = OFFICIAL_COUNTS[target]
    rows = [
        "| | images | templates | pairs | genuine | impostor |",
        "|---|---|---|---|---|---|",
        f"| meta files | {counts['images']:,} | {counts['templates']:,} | {counts['pairs']:,} "
        f"| {counts['genuine']:,} | {counts['impostor']:,} |",
        f"| official {target} | {official['images']:,} | {official['templates']:,} | {official['pairs']:,} | | |",
    ]
    return "\n".join(rows)


def format_tar_table(readout: TarReadout, label: str) -> str:
    """A markdown TAR@FAR table (TAR in %, two decimals as insightface prints it), one row per read-out."""
    fars = list(readout.nearest)
    head = "| " + label + " | " + " | ".join(f"{f:.0e}" for f in fars) + " |"
    rows = [head, "|---" * (len(fars) + 1) + "|"]
    for name, values in (("nearest (insightface)", readout.nearest), ("conservative", readout.conservative)):
        rows.append(f"| {name} | " + " | ".join(f"{values[f] * 100:.2f}" for f in fars) + " |")
    return "\n".join(rows)


def format_identification_table(ident: IdentificationResult) -> str:
    """A markdown 1:N table: per gallery and mean, CMC at each rank and TPIR at each FPIR, in %."""
    ranks = list(ident.cmc["mean"])
    fpirs = list(ident.tpir["mean"])
    head = (
        "| gallery | templates | mated probes | "
        + " | ".join(f"rank-{r}" for r in ranks)
        + " | "
        + " | ".join(f"TPIR@FPIR={f:.0e}" for f in fpirs)
        + " |"
    )
    rows = [head, "|---" * (3 + len(ranks) + len(fpirs)) + "|"]
    for g in [*ident.mated, "mean"]:
        size = str(ident.gallery_templates[g]) if g in ident.gallery_templates else ""
        mated = str(ident.mated[g]) if g in ident.mated else str(sum(ident.mated.values()))
        cells = [f"{ident.cmc[g][r] * 100:.2f}" for r in ranks] + [
            f"{ident.tpir[g][f] * 100:.2f}" for f in fpirs
        ]
        rows.append(f"| {g} | {size} | {mated} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
