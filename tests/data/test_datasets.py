"""RecordFaceDataset and ImageFolderFaceDataset on packs and folders written by the test."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facems.data.datasets import (
    DatasetError,
    ImageFolderFaceDataset,
    RecordFaceDataset,
    collate_faces,
    decode_image,
)
from facems.data.recordio import IndexedRecordWriter, IRHeader, pack
from facems.data.samplers import DistributedPKSampler


def jpeg(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 1.5)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def write_insightface_pack(
    root: Path, counts: list[int], *, corrupt: tuple[int, ...] = (), num_classes_property: int | None = None
) -> list[bytes]:
    """An insightface-layout pack: record 0 header, images 1..N (array labels), identity records."""
    root.mkdir(parents=True, exist_ok=True)
    n, k = sum(counts), len(counts)
    images = []
    with IndexedRecordWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + k], np.float32), 0, 0), b""))
        key = 1
        for c, count in enumerate(counts):
            for _ in range(count):
                data = b"not a jpeg" if key in corrupt else jpeg(key)
                images.append(data)
                w.write(key, pack(IRHeader(0, np.array([c, 0.5], np.float32), key, 0), data))
                key += 1
        start = 1
        for c, count in enumerate(counts):
            w.write(n + 1 + c, pack(IRHeader(2, np.array([start, start + count], np.float32), 0, 0), b""))
            start += count
    (root / "property").write_text(f"{k if num_classes_property is None else num_classes_property},112,112")
    return images


def test_insightface_pack_labels_images_and_identities(tmp_path: Path) -> None:
    counts = [3, 1, 5, 2]
    images = write_insightface_pack(tmp_path, counts)
    ds = RecordFaceDataset(tmp_path)
    assert len(ds) == 11 and ds.num_classes == 4
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]
    assert ds.indices_of(2).tolist() == [4, 5, 6, 7, 8]
    assert ds.indices_of(99).tolist() == []
    for i in (0, 3, 10):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 112, 112)
        want = cv2.imdecode(np.frombuffer(images[i], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), want)
        assert label == ds.labels[i]
    with pytest.raises(ValueError):
        ds.labels[0] = 5  # read-only view


def test_headerless_pack_reads_labels_from_records(tmp_path: Path) -> None:
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, label in enumerate([4, 4, 1, 7]):
            w.write(key, pack(IRHeader(0, float(label), key, 0), jpeg(key)))
    ds = RecordFaceDataset(tmp_path)
    assert ds.labels.tolist() == [4, 4, 1, 7]
    assert ds.indices_of(4).tolist() == [0, 1]
    assert ds[2][1] == 1


def test_missing_files_and_bad_headers_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.rec"):
        RecordFaceDataset(tmp_path)
    write_insightface_pack(tmp_path / "p", [2, 2], num_classes_property=3)
    with pytest.raises(DatasetError, match="property: declares 3 classes but the identity records hold 2"):
        RecordFaceDataset(tmp_path / "p")
    # Header that claims more records than the idx holds.
    bad = tmp_path / "h"
    bad.mkdir()
    with IndexedRecordWriter(bad / "train.rec", bad / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([3, 9], np.float32), 0, 0), b""))
        w.write(1, pack(IRHeader(0, 0.0, 1, 0), jpeg(1)))
        w.write(2, pack(IRHeader(0, 0.0, 2, 0), jpeg(2)))
        w.write(3, pack(IRHeader(2, np.array([1, 3], np.float32), 0, 0), b""))
    with pytest.raises(DatasetError, match=r"records end at 9 but .*train\.idx has keys up to 3"):
        RecordFaceDataset(bad)


def test_identity_ranges_must_cover_images(tmp_path: Path) -> None:
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([4, 5], np.float32), 0, 0), b""))
        for key in (1, 2, 3):
            w.write(key, pack(IRHeader(0, 0.0, key, 0), jpeg(key)))
        w.write(4, pack(IRHeader(2, np.array([1, 3], np.float32), 0, 0), b""))  # key 3 left out
    (tmp_path / "property").write_text("1,112,112")
    with pytest.raises(DatasetError, match=r"image keys \[3\] belong to no identity record"):
        RecordFaceDataset(tmp_path)


def test_record_label_must_match_identity_record(tmp_path: Path) -> None:
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([3, 5], np.float32), 0, 0), b""))
        w.write(1, pack(IRHeader(0, 0.0, 1, 0), jpeg(1)))
        w.write(2, pack(IRHeader(0, 0.0, 2, 0), jpeg(2)))  # says class 0, listed under identity 1
        w.write(3, pack(IRHeader(2, np.array([1, 2], np.float32), 0, 0), b""))
        w.write(4, pack(IRHeader(2, np.array([2, 3], np.float32), 0, 0), b""))
    (tmp_path / "property").write_text("2,112,112")
    ds = RecordFaceDataset(tmp_path)
    assert ds[0][1] == 0
    with pytest.raises(DatasetError, match="key 2: record label 0 differs from identity 1"):
        ds[1]


def test_undecodable_image_is_replaced_and_counted(tmp_path: Path) -> None:
    write_insightface_pack(tmp_path, [3, 3], corrupt=(2,))
    ds = RecordFaceDataset(tmp_path, max_bad_fraction=0.2)
    img, label = ds[1]  # key 2 is corrupt: another image of identity 0 comes back
    assert label == 0 and ds.bad_items == {1}
    np.testing.assert_array_equal(img.numpy(), ds[0][0].numpy())
    strict = RecordFaceDataset(tmp_path, max_bad_fraction=0.0)
    with pytest.raises(DatasetError, match=r"1 of 6 images do not decode.*train\.rec: key 2"):
        strict[1]


def test_image_folder_dataset(tmp_path: Path) -> None:
    for name, n in (("bob", 2), ("alice", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i}.jpg").write_bytes(jpeg(10 * len(name) + i, size=120))
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    ds = ImageFolderFaceDataset(tmp_path)
    assert ds.classes == ["alice", "bob"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    img, label = ds[4]
    assert img.shape == (3, 112, 112) and label == 1  # 120x120 resized
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderFaceDataset(tmp_path / "alice")


def test_decode_image_rejects_garbage() -> None:
    assert decode_image(b"") is None
    assert decode_image(b"\xff\xd8garbage") is None
    assert decode_image(jpeg(0)).shape == (3, 112, 112)


def test_dataloader_with_pk_sampler_gives_uint8_batches(tmp_path: Path) -> None:
    write_insightface_pack(tmp_path, [4, 4, 4, 4, 4, 4])
    ds = RecordFaceDataset(tmp_path)
    sampler = DistributedPKSampler(ds.labels, p=2, k=2, num_replicas=1, rank=0, seed=0)
    kw = {"batch_size": sampler.batch_size, "sampler": sampler, "num_workers": 2, "drop_last": True}
    plain = list(DataLoader(ds, **kw))
    faces = list(DataLoader(ds, collate_fn=collate_faces, **kw))
    assert len(faces) == len(plain) == len(sampler) // sampler.batch_size
    for (images, labels), (want_images, want_labels) in zip(faces, plain):
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 112, 112)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
        assert len(set(labels.tolist())) == 2
    images, labels = collate_faces([ds[0], ds[5]])  # in the main process too
    assert torch.equal(images[1], ds[5][0]) and labels.tolist() == [0, 1]
