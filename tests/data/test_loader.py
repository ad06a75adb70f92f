"""build_face_loader: the same batches as a plain decode loop and as DataLoader + collate_faces,
buffers never overwritten while referenced, bad images substituted, workers and memory released."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
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
from facems.data.loader import FaceLoader, build_face_loader
from facems.data.recordio import IndexedRecordWriter, IRHeader, pack
from facems.data.samplers import DistributedPKSampler

COUNTS = [5, 4, 6, 5, 3, 5, 4, 6, 5, 5]  # 48 images of 10 identities
P, K = 3, 2  # batches of 6: 8 per epoch


def jpeg(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 1.5)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def write_pack(root: Path, corrupt: tuple[int, ...] = ()) -> list[bytes]:
    """insightface layout; every 7th image is 120x120 (resized on reading); keys in ``corrupt`` do not decode."""
    root.mkdir(parents=True, exist_ok=True)
    n, k = sum(COUNTS), len(COUNTS)
    payloads = []
    with IndexedRecordWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + k], np.float32), 0, 0), b""))
        key = 1
        for c, count in enumerate(COUNTS):
            for _ in range(count):
                data = b"\xff\xd8 not a jpeg" if key in corrupt else jpeg(key, 120 if key % 7 == 0 else 112)
                payloads.append(data)
                w.write(key, pack(IRHeader(0, float(c), key, 0), data))
                key += 1
        start = 1
        for c, count in enumerate(COUNTS):
            w.write(n + 1 + c, pack(IRHeader(2, np.array([start, start + count], np.float32), 0, 0), b""))
            start += count
    (root / "property").write_text(f"{k},112,112")
    return payloads


def reference_epoch(
    payloads: list[bytes], labels: np.ndarray, plan: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each batch decoded with a plain loop: BGR decode, resize, channel flip (no facems decoding code)."""
    batches = []
    for row in plan:
        images = []
        for i in row.tolist():
            bgr = cv2.imdecode(np.frombuffer(payloads[i], np.uint8), cv2.IMREAD_COLOR)
            if bgr.shape[:2] != (112, 112):
                bgr = cv2.resize(bgr, (112, 112), interpolation=cv2.INTER_LINEAR)
            images.append(bgr[:, :, ::-1].transpose(2, 0, 1))
        batches.append((np.stack(images), labels[row]))
    return batches


def assert_batch(images: torch.Tensor, labels: torch.Tensor, want: tuple[np.ndarray, np.ndarray]) -> None:
    assert images.dtype == torch.uint8 and images.shape == want[0].shape
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), want[0])
    np.testing.assert_array_equal(labels.numpy(), want[1])


def free_slots(loader: FaceLoader) -> int:
    """Count the free slots of the loader's ring (call only while its workers are idle)."""
    ring = loader.ring
    assert ring is not None
    taken = []
    while (slot := ring.acquire()) is not None:
        taken.append(slot)
    for slot in taken:
        ring.release(slot)
    assert len(set(taken)) == len(taken), f"a slot is free twice: {sorted(taken)}"
    return len(taken)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    root = tmp_path_factory.mktemp("pack")
    return root, write_pack(root)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_equal_plain_loop_and_collate_faces_across_epochs(
    pack_dir: tuple[Path, list[bytes]], workers: int
) -> None:
    root, payloads = pack_dir
    ds = RecordFaceDataset(root)
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0, seed=3)
    plain = DataLoader(ds, sampler.batch_size, sampler=sampler, collate_fn=collate_faces)
    with build_face_loader(ds, sampler, num_workers=workers) as loader:
        assert len(loader) == sampler.steps_per_epoch == 8
        for epoch in (0, 1, 2):
            sampler.set_epoch(epoch)
            want = reference_epoch(payloads, ds.labels, sampler.plan())
            for (images, labels), (plain_images, plain_labels), ref in zip(loader, plain, want, strict=True):
                assert_batch(images, labels, ref)
                assert torch.equal(images, plain_images) and torch.equal(labels, plain_labels)
                assert images.stride() == plain_images.stride()
            del images, labels
            gc.collect()
            assert free_slots(loader) == loader.num_slots  # every slot came back
        # A loop that holds one batch at a time never runs out of buffers.
        assert loader.ring is not None and loader.ring.fallback_batches == 0


def test_break_mid_epoch_then_next_epochs_are_complete(pack_dir: tuple[Path, list[bytes]]) -> None:
    root, payloads = pack_dir
    ds = RecordFaceDataset(root)
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0, seed=5)
    with build_face_loader(ds, sampler, num_workers=2, prefetch_factor=2) as loader:
        sampler.set_epoch(0)
        for step, _ in enumerate(loader):
            if step == 1:
                break  # the workers had batches 2.. prefetched: they are dropped at the next epoch
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            want = reference_epoch(payloads, ds.labels, sampler.plan())
            got = 0
            for (images, labels), ref in zip(loader, want, strict=True):
                assert_batch(images, labels, ref)
                got += 1
            assert got == 8
        del images, labels, _
        gc.collect()
        assert free_slots(loader) == loader.num_slots


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_and_views_are_never_overwritten(
    pack_dir: tuple[Path, list[bytes]], workers: int
) -> None:
    root, payloads = pack_dir
    ds = RecordFaceDataset(root)
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0, seed=7)
    # 3 buffers for 8 batches: holding them all forces reuse and the fresh-memory fallback.
    with build_face_loader(ds, sampler, num_workers=workers, prefetch_factor=1, num_slots=3) as loader:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            want = reference_epoch(payloads, ds.labels, sampler.plan())
            held = []
            for step, (images, labels) in enumerate(loader):
                # Keep every batch, but of the odd ones only a view (the batch tensor itself is dropped).
                held.append((images if step % 2 == 0 else images[:, 1:], labels))
            for step, ((images, labels), (ref_images, ref_labels)) in enumerate(zip(held, want)):
                np.testing.assert_array_equal(
                    images.numpy(), ref_images if step % 2 == 0 else ref_images[:, 1:]
                )
                np.testing.assert_array_equal(labels.numpy(), ref_labels)
        assert loader.ring is not None and loader.ring.fallback_batches > 0
        del held, images, labels
        gc.collect()
        assert free_slots(loader) == 3


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_is_substituted_through_the_fast_path(tmp_path: Path, workers: int) -> None:
    payloads = write_pack(tmp_path, corrupt=(2, 12))  # key 2: identity 0; key 12: identity 2
    ds = RecordFaceDataset(tmp_path, max_bad_fraction=0.1)
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0, seed=1)
    # What __getitem__ substitutes: the first good image of the same identity.
    first_good = {0: 0, 2: 9}
    with build_face_loader(ds, sampler, num_workers=workers) as loader:
        seen_bad = set()
        for epoch in range(4):
            sampler.set_epoch(epoch)
            plan = sampler.plan()
            for row, (images, labels) in zip(plan, loader, strict=True):
                for j, i in enumerate(row.tolist()):
                    source = first_good[int(ds.labels[i])] if i in (1, 11) else i
                    seen_bad.update({i} & {1, 11})
                    want = reference_epoch(payloads, ds.labels, np.array([[source]]))[0][0][0]
                    np.testing.assert_array_equal(images[j].numpy(), want)
                    assert labels[j] == ds.labels[i]
        assert seen_bad == {1, 11}  # both bad images were drawn
    # The plain DataLoader path (__getitems__ + collate_faces) substitutes the same way.
    fresh = RecordFaceDataset(tmp_path, max_bad_fraction=0.1)
    images, labels = collate_faces(fresh.__getitems__([1, 11, 3]))
    want = reference_epoch(payloads, fresh.labels, np.array([[0, 9, 3]]))[0][0]
    np.testing.assert_array_equal(images.numpy(), want)
    assert labels.tolist() == fresh.labels[[1, 11, 3]].tolist() and fresh.bad_items == {1, 11}
    strict = RecordFaceDataset(tmp_path, max_bad_fraction=0.0)
    with build_face_loader(strict, sampler, num_workers=workers) as loader:
        with pytest.raises(DatasetError, match=r"do not decode, more than max_bad_fraction=0\.0"):
            for epoch in range(4):
                sampler.set_epoch(epoch)
                for batch in loader:
                    del batch
        if workers == 0:
            gc.collect()
            assert free_slots(loader) == loader.num_slots  # the slot of the failed batch came back


def test_image_folder_dataset_through_the_loader(tmp_path: Path) -> None:
    for c in range(4):
        (tmp_path / f"id{c}").mkdir()
        for i in range(3):
            (tmp_path / f"id{c}" / f"{i}.jpg").write_bytes(jpeg(10 * c + i, 112 if i else 100))
    ds = ImageFolderFaceDataset(tmp_path)
    sampler = DistributedPKSampler(ds.labels, p=2, k=2, num_replicas=1, rank=0, seed=0)
    with build_face_loader(ds, sampler, num_workers=1) as loader:
        for row, (images, labels) in zip(sampler.plan(), loader, strict=True):
            want = torch.stack([ds[i][0] for i in row.tolist()])  # __getitem__, one by one
            assert torch.equal(images, want) and labels.tolist() == ds.labels[row].tolist()


@pytest.mark.parametrize(
    ("ext", "channels", "dtype"),
    [
        (".jpg", 3, np.uint8),
        (".jpg", 1, np.uint8),
        (".png", 4, np.uint8),
        (".png", 1, np.uint16),
        (".bmp", 3, np.uint8),
    ],
)
def test_decode_equals_bgr_decode_then_cvtcolor(ext: str, channels: int, dtype: type) -> None:
    rng = np.random.default_rng(channels)
    img = rng.integers(0, np.iinfo(dtype).max, (90, 100, channels), dtype=dtype)
    ok, buf = cv2.imencode(ext, img.squeeze())
    assert ok
    want = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)  # the former decoding
    got = decode_image(buf.tobytes())
    assert got is not None and got.dtype == np.uint8
    np.testing.assert_array_equal(got.transpose(1, 2, 0), want)
    resized = decode_image(buf.tobytes(), (112, 112))
    assert resized is not None
    np.testing.assert_array_equal(resized.transpose(1, 2, 0), cv2.resize(want, (112, 112)))


def test_getitems_and_collate_faces_share_one_buffer(pack_dir: tuple[Path, list[bytes]]) -> None:
    root, _ = pack_dir
    ds = RecordFaceDataset(root)
    indices = [3, 0, 17, 17, 40]
    samples = ds.__getitems__(indices)
    assert len(samples) == len(indices)
    for (image, label), i in zip(samples, indices):
        want_image, want_label = ds[i]
        assert torch.equal(image, want_image) and image.stride() == want_image.stride()
        assert label == want_label and isinstance(label, int)
    images, labels = collate_faces(samples)
    stacked, stacked_labels = collate_faces(list(samples))  # a plain list: stacked by copying
    assert images.data_ptr() == samples[0][0].data_ptr()  # the __getitems__ buffer, not a copy
    assert torch.equal(images, stacked) and torch.equal(labels, stacked_labels)
    assert images.stride() == stacked.stride() and labels.dtype == torch.int64
    with pytest.raises(ValueError, match=r"out must be a uint8 array of shape \(>= 5, 112, 112, 3\)"):
        ds.read_into(indices, np.empty((4, 112, 112, 3), np.uint8))


def test_arguments_are_checked(pack_dir: tuple[Path, list[bytes]]) -> None:
    ds = RecordFaceDataset(pack_dir[0])
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="must be a face dataset with read_into"):
        build_face_loader(list(range(48)), sampler, num_workers=0)
    with pytest.raises(ValueError, match="has no batch_size"):
        build_face_loader(ds, torch.utils.data.SequentialSampler(ds), num_workers=0)
    with pytest.raises(ValueError, match=r"num_slots must lie in \[0, 4096\], got -1"):
        build_face_loader(ds, sampler, num_workers=0, num_slots=-1)
    loader = build_face_loader(ds, torch.utils.data.SequentialSampler(ds), num_workers=0, batch_size=5)
    sizes = [len(images) for images, _ in loader]
    assert sizes == [5] * 9 + [3] and len(loader) == 10  # a short last batch uses part of a slot


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _shared_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("torch_" in line or "/dev/shm" in line for line in f)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
@pytest.mark.parametrize("close", [True, False])
def test_workers_fds_and_shared_memory_are_released(pack_dir: tuple[Path, list[bytes]], close: bool) -> None:
    ds = RecordFaceDataset(pack_dir[0])
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0)
    gc.collect()
    fds, maps, children = _open_fds(), _shared_maps(), multiprocessing.active_children()
    loader = build_face_loader(ds, sampler, num_workers=2)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for step, _ in enumerate(loader):
            if epoch == 1 and step == 2:
                break  # stop with batches in flight
    assert len(multiprocessing.active_children()) == len(children) + 2
    assert _shared_maps() > maps  # the ring
    if close:
        loader.close()
        assert multiprocessing.active_children() == children
    del loader, _
    gc.collect()
    assert multiprocessing.active_children() == children
    # The DataLoader's queue feeder threads close their pipe ends a moment after shutdown.
    deadline = time.monotonic() + 30
    while not _open_fds() <= fds and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    left = {f: os.readlink(f"/proc/self/fd/{f}") for f in _open_fds() - fds}
    assert not left, f"descriptors left open: {left}"
    assert _shared_maps() == maps


@pytest.mark.slow  # a spawned worker imports torch: about 5-10 s
def test_spawned_workers_receive_the_ring(pack_dir: tuple[Path, list[bytes]]) -> None:
    root, payloads = pack_dir
    ds = RecordFaceDataset(root)
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0, seed=2)
    with build_face_loader(ds, sampler, num_workers=1, multiprocessing_context="spawn") as loader:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            want = reference_epoch(payloads, ds.labels, sampler.plan())
            for (images, labels), ref in zip(loader, want, strict=True):
                assert_batch(images, labels, ref)
        assert loader.ring is not None and loader.ring.fallback_batches == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_pinned_batches(pack_dir: tuple[Path, list[bytes]]) -> None:
    root, payloads = pack_dir
    ds = RecordFaceDataset(root)
    sampler = DistributedPKSampler(ds.labels, p=P, k=K, num_replicas=1, rank=0, seed=4)
    with build_face_loader(ds, sampler, num_workers=2, pin_memory=True) as loader:
        want = reference_epoch(payloads, ds.labels, sampler.plan())
        for (images, labels), ref in zip(loader, want, strict=True):
            assert images.is_pinned() and labels.is_pinned()
            assert_batch(images, labels, ref)
        del images, labels
        gc.collect()
        assert free_slots(loader) == loader.num_slots
