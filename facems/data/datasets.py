"""Face-recognition training sets: insightface rec packs and image folders.

Both return ``(image, label)`` with ``image`` a uint8 RGB tensor ``(3, H, W)`` (112x112 by default;
normalisation and flipping happen later, on the device) and ``label`` an int class index, and both
expose ``labels`` (one int per sample) and ``indices_of(identity)`` without decoding any image, for
:class:`facems.data.samplers.DistributedPKSampler`.

insightface pack layout (``train.rec``, ``train.idx``, ``property``):

* record 0: header with ``flag = 2`` and label ``[N + 1, N + 1 + K]``;
* records ``1 .. N``: images, label = class id (a scalar, or an array whose first value is the class);
* records ``N + 1 .. N + K``: one per identity ``c``, label ``[a, b)`` = the keys of its images;
* ``property``: ``num_classes,height,width``.

The header's float32 values are exact only up to 2^24; they are checked against the `.idx` (and, for
larger packs, resolved with it). A pack without that header (mxnet's im2rec) is read as "every key
is an image", its labels read from each record's header.

JPEG decoding uses OpenCV: measured on 112x112 q95 JPEGs on one core here, ``cv2.imdecode`` plus the
RGB/CHW conversion runs at about 6,100 images/s against 4,750 for ``torchvision.io.decode_jpeg``.
OpenCV >= 4.11 decodes straight to RGB (``IMREAD_COLOR_RGB``, the same pixels as BGR followed by
``cvtColor``), which saves the conversion.

Batches: ``read_into`` (both datasets) decodes a whole batch into a caller's ``(N, H, W, 3)`` buffer
(what :func:`facems.data.loader.build_face_loader` uses with its reused shared-memory buffers), and
``__getitems__`` (called by ``DataLoader`` with a batch's indices) decodes a batch into one buffer
that :func:`collate_faces` returns without another copy. Use :func:`collate_faces` as the
DataLoader's ``collate_fn`` (channels_last uint8 batches), or ``build_face_loader``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from facems.data.recordio import IndexedRecordReader, RecordIOError, class_label, unpack

__all__ = ["DatasetError", "ImageFolderFaceDataset", "RecordFaceDataset", "collate_faces", "decode_image"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_FLOAT32_EXACT = 1 << 24


class DatasetError(ValueError):
    """A dataset's files disagree with the expected layout (names the file, key and values)."""


# OpenCV >= 4.11 decodes to RGB directly (the same pixels as BGR + cvtColor, one pass fewer).
_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_IMREAD_FLAG: int = cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR


def _decode_rgb(data: bytes | memoryview | np.ndarray, size: tuple[int, int] | None) -> np.ndarray | None:
    """Decode to a contiguous uint8 RGB ``(H, W, 3)`` array, or ``None`` if it does not decode."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if not buf.size:
        return None
    img = cv2.imdecode(buf, _IMREAD_FLAG)
    if img is None:
        return None
    if size is not None and (img.shape[0] != size[0] or img.shape[1] != size[1]):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return img if _DECODES_RGB else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(
    data: bytes | memoryview | np.ndarray, size: tuple[int, int] | None = None
) -> np.ndarray | None:
    """Decode an encoded image to uint8 RGB ``(3, H, W)``, or ``None`` if it does not decode.

    The result is a channel-first *view* of a height-width-channel buffer (strides of channels_last):
    a planar copy costs about as much again as the colour conversion, and :func:`collate_faces`
    stacks such views into a channels_last batch with plain contiguous copies.

    Args:
        data: encoded bytes (JPEG, PNG, ...).
        size: ``(height, width)`` to resize to (bilinear) when the image has another size.
    """
    img = _decode_rgb(data, size)
    return None if img is None else img.transpose(2, 0, 1)


def _new_batch_buffer(shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised uint8 tensor: in shared memory inside a DataLoader worker (as ``default_collate``
    does, so that the batch crosses to the main process without a copy), private memory otherwise."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(tuple(shape))


class _DecodedBatch(list[tuple[torch.Tensor, int]]):
    """What ``__getitems__`` returns: the samples ``(image, label)`` of a batch, as any collate_fn expects,
    whose images are views of one ``(N, H, W, 3)`` buffer; :func:`collate_faces` returns that buffer as is."""

    def __init__(self, hwc: torch.Tensor, labels: np.ndarray) -> None:
        super().__init__(zip(hwc.permute(0, 3, 1, 2).unbind(0), labels.tolist()))
        self.hwc = hwc
        self.labels = labels


def collate_faces(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for the face datasets: ``(uint8 images (N, 3, H, W), int64 labels (N,))``.

    The images are stacked into one height-width-channel buffer (shared memory inside a worker, as
    the default collate does) and returned as an NCHW view with channels_last strides, which the
    training step uses as is. Values equal ``default_collate``'s; only the strides differ. A batch
    made by the datasets' ``__getitems__`` is already in such a buffer and is returned without a copy.
    """
    if isinstance(batch, _DecodedBatch) and len(batch) == len(batch.labels):
        return batch.hwc.permute(0, 3, 1, 2), torch.from_numpy(batch.labels)
    images = [img.permute(1, 2, 0) for img, _ in batch]
    out = _new_batch_buffer([len(images), *(int(d) for d in images[0].shape)])
    torch.stack(images, out=out)
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return out.permute(0, 3, 1, 2), labels


class _FaceDataset(Dataset):
    """Shared decoding, bad-image accounting and identity lookup."""

    def __init__(self, labels: np.ndarray, image_size: tuple[int, int], max_bad_fraction: float) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self._labels = labels
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad_items: set[int] = set()  # per process: DataLoader workers each count their own
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        groups = [g for g in np.split(order, bounds) if len(g)]
        self._groups = {int(labels[g[0]]): g for g in groups}

    @property
    def labels(self) -> np.ndarray:
        """int64 class index of every sample (read-only view)."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def num_classes(self) -> int:
        return len(self._groups)

    def indices_of(self, identity: int) -> np.ndarray:
        """Sample indices of ``identity`` (empty when unknown)."""
        return self._groups.get(int(identity), np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._labels)

    def _encoded(self, index: int) -> bytes | memoryview:
        raise NotImplementedError

    def _where(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self._labels[index])
        return torch.from_numpy(self._read_rgb(index).transpose(2, 0, 1)), label

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """The samples ``[self[i] for i in indices]``, decoded into one ``(N, H, W, 3)`` buffer.

        ``DataLoader`` calls this with a whole batch. Any ``collate_fn`` accepts the result (a list of
        ``(image, label)``); :func:`collate_faces` returns the buffer itself, without stacking.
        """
        hwc = _new_batch_buffer((len(indices), *self.image_size, 3))
        labels = self.read_into(indices, hwc.numpy())
        return _DecodedBatch(hwc, labels)

    def read_into(self, indices: Sequence[int], out: np.ndarray) -> np.ndarray:
        """Decode the images of ``indices`` into ``out[:len(indices)]``; return their labels.

        Bad images are handled as by ``__getitem__`` (replaced by another image of the identity and
        counted in ``bad_items``), so ``out[j]`` equals ``self[indices[j]][0].permute(1, 2, 0)``.

        Args:
            indices: sample indices.
            out: a writable uint8 array of shape ``(M, H, W, 3)``, ``M >= len(indices)`` and
                ``(H, W) = image_size``; rows past ``len(indices)`` are left as they are.

        Returns:
            int64 labels of ``indices``, shape ``(len(indices),)`` (a new array).

        Raises:
            ValueError: ``out`` has another dtype or shape, or is read-only.
            DatasetError: as ``__getitem__``.
        """
        n = len(indices)
        h, w = self.image_size
        if out.dtype != np.uint8 or out.ndim != 4 or out.shape[1:] != (h, w, 3) or out.shape[0] < n:
            raise ValueError(
                f"read_into: out must be a uint8 array of shape (>= {n}, {h}, {w}, 3), "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        if not out.flags.writeable:
            raise ValueError("read_into: out is read-only")
        labels = self._labels[np.asarray(indices, dtype=np.int64)]  # fancy indexing: a copy
        read_rgb = self._read_rgb
        for j, index in enumerate(indices):
            out[j] = read_rgb(int(index))
        return labels

    def _read_rgb(self, index: int) -> np.ndarray:
        """Image ``index`` as RGB ``(H, W, 3)``; a bad one is replaced (see :meth:`_substitute`)."""
        img = _decode_rgb(self._encoded(index), self.image_size)
        return self._substitute(index) if img is None else img

    def _substitute(self, index: int) -> np.ndarray:
        """Count ``index`` as bad and return another image of the same identity (RGB ``(H, W, 3)``)."""
        self.bad_items.add(index)
        log.warning("%s does not decode; using another image of its identity", self._where(index))
        if len(self.bad_items) > self.max_bad_fraction * len(self):
            shown = ", ".join(self._where(i) for i in sorted(self.bad_items)[:10])
            raise DatasetError(
                f"{len(self.bad_items)} of {len(self)} images do not decode, more than max_bad_fraction="
                f"{self.max_bad_fraction}: {shown}"
            )
        for other in self.indices_of(int(self._labels[index])):
            if int(other) in self.bad_items:
                continue
            img = _decode_rgb(self._encoded(int(other)), self.image_size)
            if img is not None:
                return img
            self.bad_items.add(int(other))
        raise DatasetError(f"no image of identity {int(self._labels[index])} decodes ({self._where(index)})")


class RecordFaceDataset(_FaceDataset):
    """An insightface rec pack (``train.rec``, ``train.idx``, ``property``) or a headerless pack.

    Args:
        root: folder holding ``train.rec`` and ``train.idx`` (and ``property`` for insightface packs).
        image_size: ``(height, width)`` of the returned images (resized when the stored size differs).
        max_bad_fraction: largest fraction of undecodable images tolerated before raising; a bad
            image is replaced by another image of the same identity and counted.
        rec_name: base name of the pack files (``train``).

    Raises:
        FileNotFoundError: a pack file is missing.
        DatasetError: header, identity records, idx and property disagree (named in the message).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: tuple[int, int] = (112, 112),
        max_bad_fraction: float = 0.001,
        rec_name: str = "train",
    ) -> None:
        self.root = os.fspath(root)
        rec = os.path.join(self.root, f"{rec_name}.rec")
        idx = os.path.join(self.root, f"{rec_name}.idx")
        for path in (rec, idx):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path}: missing (a rec pack needs {rec_name}.rec and {rec_name}.idx)"
                )
        self.reader = IndexedRecordReader(rec, idx)
        keys = self.reader.keys
        if not keys:
            raise DatasetError(f"{idx}: no records")
        head = unpack(self.reader.read(0))[0] if 0 in self.reader else None
        if head is not None and head.flag > 0:
            self.keys, labels = self._insightface_layout(head.label)
            self._check_property(int(labels.max()) + 1 if len(labels) else 0)
        else:
            self.keys = np.asarray(keys, dtype=np.int64)
            labels = np.array([self._class_of(k) for k in keys], dtype=np.int64)
        super().__init__(labels, image_size, max_bad_fraction)

    def _class_of(self, key: int) -> int:
        value = class_label(self.reader.read(key))[0]
        if not value.is_integer() or value < 0:
            raise DatasetError(f"{self.reader.rec_path}: key {key}: label {value} is not a class index")
        return int(value)

    def _range_of(self, key: int) -> tuple[int, int]:
        head = unpack(self.reader.read(key))[0]
        label = np.asarray(head.label).reshape(-1)
        if head.flag < 2:
            raise DatasetError(
                f"{self.reader.rec_path}: key {key}: expected an identity record (flag >= 2, label [a, b)), "
                f"got flag {head.flag}"
            )
        return int(label[0]), int(label[1])

    def _insightface_layout(self, label: object) -> tuple[np.ndarray, np.ndarray]:
        rec = self.reader.rec_path
        values = np.asarray(label, dtype=np.float64).reshape(-1)
        total = max(self.reader.keys) + 1  # records 0 .. N+K
        first_id, end = int(values[0]), int(values[1])
        if end != total:
            if end < _FLOAT32_EXACT or abs(end - total) > end / _FLOAT32_EXACT:
                raise DatasetError(
                    f"{rec}: key 0: header says records end at {end} but {self.reader.idx_path} has keys up "
                    f"to {total - 1}"
                )
            end = total  # float32 rounding above 2^24: the idx is exact
        if first_id >= _FLOAT32_EXACT:
            # The first identity record is the one whose range starts at key 1.
            spacing = int(np.spacing(np.float32(first_id)))
            candidates = [c for c in range(first_id - spacing, first_id + spacing + 1) if c in self.reader]
            matches = [c for c in candidates if self._is_first_identity(c)]
            if len(matches) != 1:
                raise DatasetError(f"{rec}: cannot locate the first identity record near key {first_id}")
            first_id = matches[0]
        keys = np.asarray(self.reader.keys, dtype=np.int64)
        present = np.zeros(end, dtype=bool)
        present[keys[(keys >= 0) & (keys < end)]] = True
        missing = np.flatnonzero(~present).tolist()
        if missing:
            raise DatasetError(f"{self.reader.idx_path}: keys {missing[:10]} of 0..{end - 1} are missing")
        num_images, num_classes = first_id - 1, end - first_id
        if num_images < 1 or num_classes < 1:
            raise DatasetError(f"{rec}: key 0: header [{first_id}, {end}) leaves no images or no identities")
        labels = np.full(num_images, -1, dtype=np.int64)
        for c in range(num_classes):
            a, b = self._range_of(first_id + c)
            if not 1 <= a < b <= first_id:
                raise DatasetError(
                    f"{rec}: key {first_id + c}: identity {c} range [{a}, {b}) lies outside the images 1..{num_images}"
                )
            if (labels[a - 1 : b - 1] != -1).any():
                raise DatasetError(
                    f"{rec}: key {first_id + c}: identity {c} range [{a}, {b}) overlaps another"
                )
            labels[a - 1 : b - 1] = c
        unassigned = np.flatnonzero(labels < 0)
        if len(unassigned):
            raise DatasetError(
                f"{rec}: image keys {(unassigned[:10] + 1).tolist()} belong to no identity record"
            )
        return np.arange(1, first_id, dtype=np.int64), labels

    def _is_first_identity(self, key: int) -> bool:
        try:
            return self._range_of(key)[0] == 1
        except (DatasetError, RecordIOError):
            return False

    def _check_property(self, num_classes: int) -> None:
        path = os.path.join(self.root, "property")
        if not os.path.isfile(path):
            log.warning("%s: missing; using %d classes from the identity records", path, num_classes)
            return
        with open(path) as f:
            fields = f.read().strip().split(",")
        try:
            declared = int(fields[0])
        except (ValueError, IndexError):
            raise DatasetError(
                f"{path}: expected 'num_classes,height,width', got {','.join(fields)!r}"
            ) from None
        if declared != num_classes:
            raise DatasetError(
                f"{path}: declares {declared} classes but the identity records hold {num_classes}"
            )

    def _encoded(self, index: int) -> bytes | memoryview:
        key: int = self.keys.item(index)  # .item: a Python int, cheaper than a numpy scalar here
        record = self.reader.read(key)
        # insightface's loader trains on the record's own label: it must agree with the identity
        # record that lists this key (checked here, for free, instead of reading every header at open).
        try:
            stored, start = class_label(record)
        except RecordIOError as e:
            raise DatasetError(f"{self.reader.rec_path}: key {key}: {e}") from None
        payload = memoryview(record)[start:]
        if stored != self._labels.item(index):
            raise DatasetError(
                f"{self.reader.rec_path}: key {key}: record label {stored:g} differs from identity "
                f"{int(self._labels[index])} whose identity record lists this key"
            )
        return payload

    def _where(self, index: int) -> str:
        return f"{self.reader.rec_path}: key {int(self.keys[index])}"


class ImageFolderFaceDataset(_FaceDataset):
    """Aligned face crops in ``root/<identity>/<image>``: one sub-folder per identity.

    Identities are the sub-folder names in sorted order (class ``c`` is the ``c``-th name); images
    are the files with an image extension, sorted by name. Images of another size are resized.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: tuple[int, int] = (112, 112),
        max_bad_fraction: float = 0.001,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root}: not a folder")
        exts = tuple(e.lower() for e in extensions)
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        self.paths: list[str] = []
        labels: list[int] = []
        for c, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(exts))
            self.paths.extend(os.path.join(folder, f) for f in files)
            labels.extend([c] * len(files))
        if not self.paths:
            raise DatasetError(f"{self.root}: no images with extensions {', '.join(exts)} in its sub-folders")
        super().__init__(np.asarray(labels, dtype=np.int64), image_size, max_bad_fraction)

    def _encoded(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def _where(self, index: int) -> str:
        return self.paths[index]
