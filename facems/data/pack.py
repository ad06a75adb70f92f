"""Build an insightface rec pack (``train.rec``, ``train.idx``, ``property``) from an image folder.

Layout written (the one arcface_torch reads, see :mod:`facems.data.datasets`), with ``N`` images and
``K`` identities:

* key 0: header record, ``flag = 2``, float32 label ``[N + 1, N + 1 + K]``, id 0, empty payload. It is
  the first record of the file (byte offset 0), as in insightface's own packs;
* keys ``1 .. N``: one JPEG per image, identities in order, scalar float label = class id (``flag``
  0; insightface packs hold either this or an array whose first value is the class: both read the
  same), id = key;
* keys ``N + 1 .. N + K``: one record per identity ``c``, ``flag = 2``, label ``[a, b)`` = the keys of
  its images, id = key, empty payload;
* ``property``: ``K,image_size,image_size`` and a newline.

Identities are the sub-folder names of the source in sorted order and images the files with an image
extension in each, sorted by name: exactly :class:`~facems.data.datasets.ImageFolderFaceDataset`'s
listing. Images that cannot be read or decoded are skipped (logged and returned in
:attr:`PackStats.skipped`); an identity left without images (an empty folder, or all its images
skipped) is dropped and the remaining identities are numbered ``0 .. K - 1`` in sorted-name order, so
a pack label equals the folder dataset's label only while no identity before it was dropped.
:attr:`PackStats.identities` maps each pack label to its folder name.

Every image is decoded (OpenCV, BGR), aligned with :func:`facems.data.align.norm_crop` when a
landmarks file lists it, otherwise resized to ``image_size x image_size`` with bilinear
interpolation when its size differs (non-square images are stretched), and re-encoded with
``cv2.imencode`` as JPEG at the given quality (always re-encoded, even when the source is already
a JPEG of the right size: the pack is then independent of the source's encoder settings).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import posixpath
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

from facems.data.align import estimate_norm, norm_crop
from facems.data.datasets import DatasetError, ImageFolderFaceDataset
from facems.data.recordio import MAGIC, IndexedRecordWriter, IRHeader, pack

__all__ = ["PACK_FILES", "PackStats", "pack_image_folder", "read_landmarks_file"]

log = logging.getLogger(__name__)

PACK_FILES = ("train.rec", "property", "train.idx")
"""The files of a pack, in the order they are moved into place (the `.idx` last: see pack_image_folder)."""

_NUM_LANDMARK_VALUES = 10  # 5 points x (x, y)

# (path, landmarks [5, 2] float64 or None, image_size, JPEG quality)
_Task = tuple[str, "np.ndarray | None", int, int]


@dataclass
class PackStats:
    """What :func:`pack_image_folder` wrote.

    Attributes:
        num_images: image records written (``N``).
        num_identities: identity records written (``K``); pack labels are ``0 .. K - 1``.
        skipped: source image paths that could not be read or decoded, in listing order.
        seconds: wall-clock time of the whole call, in seconds.
        identities: folder name of each pack label (``identities[c]`` is class ``c``).
        dropped_identities: folder names left without any image, not in the pack.
    """

    num_images: int
    num_identities: int
    skipped: list[str]
    seconds: float
    identities: list[str] = field(default_factory=list)
    dropped_identities: list[str] = field(default_factory=list)


def read_landmarks_file(path: str | os.PathLike[str], image_size: int = 112) -> dict[str, np.ndarray]:
    """Parse a 5-point landmarks file: one ``relative/path x1 y1 x2 y2 ... x5 y5`` line per image.

    Paths are relative to the image folder, with ``/`` separators (they may contain spaces: the last
    ten fields are the coordinates). Coordinates are pixels in the source image, in
    :func:`facems.data.align.estimate_norm`'s point order. Blank lines and lines starting with ``#``
    are ignored.

    Args:
        path: the landmarks text file.
        image_size: crop size the landmarks will be used with (checked with ``estimate_norm``).

    Returns:
        Normalised relative path (``posixpath.normpath``) -> float64 ``[5, 2]`` landmarks.

    Raises:
        ValueError: a line with too few fields, a non-numeric or non-finite coordinate, coincident
            points, or a repeated path; the message names the file and the line number.
    """
    path = os.fspath(path)
    out: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(None, _NUM_LANDMARK_VALUES)
            if len(fields) != _NUM_LANDMARK_VALUES + 1:
                raise ValueError(
                    f"{path}: line {lineno}: expected 'relative/path x1 y1 ... x5 y5' (a path and "
                    f"{_NUM_LANDMARK_VALUES} numbers), got {len(fields)} field(s)"
                )
            rel = posixpath.normpath(fields[0])
            try:
                values = np.array([float(v) for v in fields[1:]], dtype=np.float64).reshape(5, 2)
            except ValueError:
                raise ValueError(
                    f"{path}: line {lineno}: expected {_NUM_LANDMARK_VALUES} numeric coordinates after "
                    f"the path, got {fields[1:]}"
                ) from None
            try:
                estimate_norm(values, image_size)
            except ValueError as e:
                raise ValueError(f"{path}: line {lineno}: {e}") from None
            if rel in out:
                raise ValueError(f"{path}: line {lineno}: {rel!r} repeated (first on line {first_line[rel]})")
            out[rel] = values
            first_line[rel] = lineno
    return out


def _prepare(task: _Task) -> tuple[bytes | None, str]:
    """Read, decode, align or resize and encode one image: ``(jpeg, "")`` or ``(None, reason)``.

    Runs in the worker processes. Failures of the source image (unreadable, not an image) are
    returned; anything else (an encoder failure) raises and aborts the pack.
    """
    path, landmarks, size, quality = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as e:  # most bad data gives None, a few malformed headers raise
        return None, f"does not decode as an image ({str(e).strip().splitlines()[-1]})"
    if img is None:
        return None, "does not decode as an image" if data else "is empty"
    if landmarks is not None:
        img = norm_crop(img, landmarks, size)
    elif img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return _encode_jpeg(img, quality), ""


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed on a {img.shape} {img.dtype} image (JPEG quality {quality})")
    return buf.tobytes()


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _results(stack: ExitStack, tasks: list[_Task], workers: int) -> Iterator[tuple[bytes | None, str]]:
    """:func:`_prepare` of every task, in task order; a worker pool lives as long as ``stack``."""
    if workers == 0:
        return map(_prepare, tasks)
    chunksize = max(1, min(64, len(tasks) // (8 * workers)))
    # spawn: the parent may hold threads (torch, OpenCV) that fork would copy in a locked state.
    pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker))
    return pool.imap(_prepare, tasks, chunksize=chunksize)


def _header_record(num_images: int, num_identities: int) -> bytes:
    label = np.array([num_images + 1, num_images + 1 + num_identities], dtype=np.float32)
    return pack(IRHeader(2, label, 0, 0), b"")


def _stored_whole(record: bytes) -> bytes:
    """The on-disk form of a record with no magic at an aligned offset and a length multiple of 4."""
    magic = struct.pack("<I", MAGIC)
    if len(record) % 4 or any(record[i : i + 4] == magic for i in range(0, len(record), 4)):
        raise AssertionError("header record would be split or padded; cannot patch it in place")
    return struct.pack("<II", MAGIC, len(record)) + record


def _patch_header(rec_path: str, num_images: int, num_identities: int) -> None:
    """Overwrite the placeholder key-0 record (same size: 40 bytes) with the final counts."""
    old = _stored_whole(_header_record(0, 0))
    new = _stored_whole(_header_record(num_images, num_identities))
    with open(rec_path, "r+b") as f:
        found = f.read(len(old))
        if found != old:
            raise AssertionError(f"{rec_path}: byte offset 0: placeholder header record not found")
        f.seek(0)
        f.write(new)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pack(
    src: str,
    tmp: str,
    tasks: list[_Task],
    folder_labels: np.ndarray,
    classes: list[str],
    results: Iterable[tuple[bytes | None, str]],
    image_size: int,
    progress: bool,
) -> tuple[list[str], list[str]]:
    """Write the pack into ``tmp``; returns (skipped paths, folder name of each pack label)."""
    rec_path, idx_path, prop_path = (os.path.join(tmp, n) for n in ("train.rec", "train.idx", "property"))
    skipped: list[str] = []
    identities: list[str] = []
    starts: list[int] = []  # first image key of each pack label
    key = 1
    with IndexedRecordWriter(rec_path, idx_path) as writer:
        writer.write(0, _header_record(0, 0))  # the counts are known at the end: patched below
        bar = tqdm(zip(tasks, results), total=len(tasks), unit="img", desc="pack", disable=not progress)
        for i, (task, (jpeg, reason)) in enumerate(bar):
            if jpeg is None:
                log.warning("%s: %s; skipped", task[0], reason)
                skipped.append(task[0])
                continue
            name = classes[int(folder_labels[i])]
            if not identities or identities[-1] != name:
                identities.append(name)
                starts.append(key)
            writer.write(key, pack(IRHeader(0, float(len(identities) - 1), key, 0), jpeg))
            key += 1
        num_images = key - 1
        if num_images == 0:
            raise DatasetError(f"{src}: none of its {len(tasks)} images could be read and decoded")
        ends = [*starts[1:], key]
        for c, (a, b) in enumerate(zip(starts, ends)):
            first_id = num_images + 1 + c
            writer.write(first_id, pack(IRHeader(2, np.array([a, b], np.float32), first_id, 0), b""))
    _patch_header(rec_path, num_images, len(identities))
    with open(prop_path, "w", encoding="ascii") as f:
        f.write(f"{len(identities)},{image_size},{image_size}\n")
    for path in (rec_path, idx_path, prop_path):
        _fsync(path)
    return skipped, identities


def pack_image_folder(
    src_root: str | os.PathLike[str],
    dst_root: str | os.PathLike[str],
    *,
    landmarks_file: str | os.PathLike[str] | None = None,
    image_size: int = 112,
    quality: int = 95,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> PackStats:
    """Pack ``src_root/<identity>/<image>`` into an insightface rec pack in ``dst_root``.

    See the module docstring for the layout, the order and the image processing. Worker processes
    decode, align and encode; the calling process writes the records in order, so the files do not
    depend on ``workers``. The files are written in ``dst_root/.tmp-pack-*/`` and moved into
    ``dst_root`` only after everything succeeded (any failure leaves ``dst_root`` as it was and
    removes the temporary folder). When overwriting, the old ``train.idx`` is removed first and the
    new one moved in last, so an interrupted move never leaves a ``train.idx`` that belongs to
    another ``train.rec``.

    Args:
        src_root: image folder, one sub-folder per identity.
        dst_root: folder to write ``train.rec``, ``train.idx`` and ``property`` into (created when
            missing, and left empty if packing fails).
        landmarks_file: optional 5-point landmarks file (see :func:`read_landmarks_file`); when
            given, every image must have an entry and is aligned with ``norm_crop``.
        image_size: side of the stored square images in pixels (with landmarks: a multiple of 112
            or 128).
        quality: JPEG quality, 0..100.
        workers: worker processes for decode/align/encode; 0 does everything in this process.
            Workers are started with ``spawn``, so a calling script needs the usual
            ``if __name__ == "__main__":`` guard.
        progress: show a tqdm progress bar.
        overwrite: replace an existing pack in ``dst_root``.

    Returns:
        :class:`PackStats`.

    Raises:
        FileExistsError: ``dst_root`` already holds a pack file and ``overwrite`` is false.
        FileNotFoundError: ``src_root`` is not a folder.
        DatasetError: the folder holds no image, or no image decodes.
        ValueError: bad arguments, a bad landmarks file, or (with a landmarks file) an image without
            an entry; the message names the file.
    """
    t0 = time.perf_counter()
    src, dst = os.fspath(src_root), os.fspath(dst_root)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ValueError(f"quality: expected an int in [0, 100], got {quality!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: expected an int >= 0, got {workers!r}")
    existing = [os.path.join(dst, n) for n in PACK_FILES if os.path.lexists(os.path.join(dst, n))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]}: a pack already exists in {dst} (pass overwrite=True to replace it)"
        )
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([src_real, dst_real]) == src_real and dst_real != src_real:
        raise ValueError(
            f"{dst}: the pack folder lies inside the image folder {src} (it would become an identity)"
        )

    folder = ImageFolderFaceDataset(src, image_size=(image_size, image_size))
    folder_labels = folder.labels
    landmarks = None if landmarks_file is None else read_landmarks_file(landmarks_file, image_size)
    tasks: list[_Task] = []
    for path in folder.paths:
        lmk = None
        if landmarks is not None:
            rel = posixpath.normpath(os.path.relpath(path, src).replace(os.sep, "/"))
            lmk = landmarks.pop(rel, None)
            if lmk is None:
                raise ValueError(
                    f"{os.fspath(landmarks_file or '')}: no landmarks for {path} (expected a line '{rel} x1 y1 ... x5 y5')"
                )
        tasks.append((path, lmk, image_size, quality))
    if landmarks:
        unused = sorted(landmarks)
        log.warning(
            "%s: %d entries match no image in %s, e.g. %s", landmarks_file, len(unused), src, unused[:3]
        )

    os.makedirs(dst, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-pack-", dir=dst)
    try:
        with ExitStack() as stack:  # the worker pool (if any) ends before the files are moved
            results = _results(stack, tasks, workers)
            skipped, identities = _write_pack(
                src, tmp, tasks, folder_labels, folder.classes, results, image_size, progress
            )
        if overwrite and os.path.lexists(os.path.join(dst, "train.idx")):
            os.remove(os.path.join(dst, "train.idx"))
        for name in PACK_FILES:  # train.idx last
            os.replace(os.path.join(tmp, name), os.path.join(dst, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = set(identities)
    dropped = [name for name in folder.classes if name not in kept]
    if dropped:
        log.info(
            "%s: %d identities have no usable image and are not packed: %s", src, len(dropped), dropped[:10]
        )
    return PackStats(
        num_images=len(tasks) - len(skipped),
        num_identities=len(identities),
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        identities=identities,
        dropped_identities=dropped,
    )
