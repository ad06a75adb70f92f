"""Benchmark the training input path: images/s of rec pack -> P x K batches of uint8 tensors.

    python scripts/bench_data.py                  # 20k synthetic 112x112 q95 JPEGs, 2000 identities
    python scripts/bench_data.py --root /data/faces_emore --workers 1 2 4 8

Methods, all on the same P x K identity plan (DistributedPKSampler, one rank; pin_memory=False):
  floor        one process, no DataLoader: IndexedRecordReader.read + unpack + cv2.imdecode (BGR HWC);
               with w > 1, w such processes at once (what w cores decode with nothing to transport)
  facems       build_face_loader(RecordFaceDataset, sampler, num_workers=w), the training input path
  collate      the same uint8 RGB channels_last batches from DataLoader(..., collate_fn=collate_faces)
  torchvision  ImageFolder + PIL + ToTensor (float batches) on the pack's JPEGs exported byte for byte
Without --root, a pack of synthetic faces (q95 JPEGs) is written to a temporary folder. Every file is
read once first: the page cache is warm, this measures decode and transport, not the disk. In each
epoch the first prefetch * w + 1 batches (those in flight; 1 for the floor) are not timed. All methods run in
--repeats rounds; each round measures the 1-process floor first. A shared machine's speed drifts by
+-20% within minutes, so the table shows the best round's rate and, as the figure to quote, the median
over rounds of (rate per worker) / (that round's floor).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from facems.data.datasets import RecordFaceDataset, collate_faces
from facems.data.loader import FaceLoader, build_face_loader
from facems.data.recordio import unpack
from facems.data.samplers import DistributedPKSampler
from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_train_pack

NAMES = ("facems build_face_loader", "DataLoader+collate_faces", "torchvision ImageFolder+PIL")


def export_folder(ds: RecordFaceDataset, root: Path) -> int:
    """Write every image of the pack, bytes unchanged, to ``root/<label>/<key>.jpg``; returns total bytes."""
    total = 0
    for i, key in enumerate(ds.keys.tolist()):
        folder = root / f"{int(ds.labels[i]):06d}"
        folder.mkdir(parents=True, exist_ok=True)
        total += (folder / f"{key:09d}.jpg").write_bytes(unpack(ds.reader.read(key))[1])
    return total


def measure(make_epoch: Callable[[int], Iterator[int]], seconds: float, warmup: int) -> float:
    """Images/s over at least ``seconds`` of timed batches; ``make_epoch(e)`` yields batch sizes."""
    images, spent, epoch = 0, 0.0, 0
    while spent < seconds:
        batches = make_epoch(epoch)
        epoch += 1
        for _ in range(warmup):
            next(batches)
        t0 = time.perf_counter()
        for n in batches:
            images += n
            if spent + time.perf_counter() - t0 >= seconds:
                break
        spent += time.perf_counter() - t0
    return images / spent


def floor_epoch(ds: RecordFaceDataset, sampler: DistributedPKSampler, epoch: int) -> Iterator[int]:
    sampler.set_epoch(epoch)
    for batch in sampler.plan():
        for key in ds.keys[batch].tolist():
            bgr = cv2.imdecode(np.frombuffer(unpack(ds.reader.read(key))[1], np.uint8), cv2.IMREAD_COLOR)
            assert bgr is not None, f"key {key} does not decode"
        yield len(batch)


def in_processes(make_epoch: Callable[[int], Iterator[int]], n: int, seconds: float) -> float:
    """Total images/s of ``n`` forked processes measuring ``make_epoch`` at once (distinct epochs)."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    run = lambda i: queue.put(measure(lambda e: make_epoch(1000 * i + e), seconds, 1))  # noqa: E731
    procs = [ctx.Process(target=run, args=(i,)) for i in range(1, n + 1)]
    for proc in procs:
        proc.start()
    total = sum(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total


def make_loader(
    method: str, data: Any, sampler: DistributedPKSampler, workers: int, prefetch: int
) -> DataLoader:
    """The loader of ``method`` (one of NAMES) with ``workers`` worker processes."""
    if method == NAMES[0]:
        return build_face_loader(data, sampler, num_workers=workers, prefetch_factor=prefetch)
    collate = collate_faces if method == NAMES[1] else None
    kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": True, "collate_fn": collate}
    kw["prefetch_factor"] = prefetch
    return DataLoader(data, sampler.batch_size, sampler=sampler, **kw)


def loader_epoch(loader: DataLoader, epoch: int) -> Iterator[int]:
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return (len(images) for images, _ in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--root", type=Path, help="an existing pack instead of a synthetic one")
    parser.add_argument("--images", type=int, default=20000, help="synthetic images (20000)")
    parser.add_argument("--identities", type=int, default=2000, help="synthetic identities (2000)")
    parser.add_argument("--p", type=int, default=64, help="identities per batch (64)")
    parser.add_argument("--k", type=int, default=4, help="images per identity (4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="workers, 1 first (1 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (3)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all methods (5)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches in flight per worker (2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.workers[0] != 1 or min(args.workers) < 1:
        parser.error(f"--workers must start with 1 and be positive, got {args.workers}")
    import torchvision  # only the comparison needs it

    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp_name:
        tmp, root, t0 = Path(tmp_name), args.root, time.perf_counter()
        if root is None:
            root = tmp / "pack"
            root.mkdir()
            faces = SyntheticFaces(args.identities, args.images // args.identities, args.seed)
            write_train_pack(str(root), faces, quality=95)
            print(f"built a pack of {args.images} synthetic images in {time.perf_counter() - t0:.1f} s")
        ds = RecordFaceDataset(root)
        jpeg_bytes = export_folder(ds, tmp / "export")
        for path in [root / "train.rec", *(tmp / "export").rglob("*.jpg")]:
            path.read_bytes()  # warm the page cache
        tv = torchvision.datasets.ImageFolder(str(tmp / "export"), torchvision.transforms.ToTensor())
        samplers = [DistributedPKSampler(y, args.p, args.k, 1, 0, args.seed) for y in (ds.labels, tv.targets)]
        print(
            f"{len(ds)} images, {ds.num_classes} identities, mean JPEG {jpeg_bytes / len(ds) / 1024:.1f} KiB, "
            f"batch {args.p}x{args.k}, prefetch {args.prefetch}, {samplers[0].steps_per_epoch} steps/epoch, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, OpenCV {cv2.__version__}; page cache warm (every file read once)"
        )
        floor_of = partial(floor_epoch, ds, samplers[0])
        runs: list[tuple[str, int, Any]] = [("floor: 1 process", 1, partial(measure, floor_of, warmup=1))]
        runs += [
            ("floor: w processes at once", w, partial(in_processes, floor_of, w)) for w in args.workers[1:]
        ]
        rings: list[tuple[str, int, FaceLoader]] = []
        for name, data, smp in zip(NAMES, (ds, ds, tv), samplers[:1] * 2 + samplers[1:]):
            for w in args.workers:
                if smp.steps_per_epoch <= args.prefetch * w + 2:
                    raise SystemExit(f"{smp.steps_per_epoch} steps per epoch: too few to warm up {w} workers")
                loader = make_loader(name, data, smp, w, args.prefetch)
                rings += [(name, w, loader)] if isinstance(loader, FaceLoader) else []
                runs.append(
                    (name, w, partial(measure, partial(loader_epoch, loader), warmup=args.prefetch * w + 1))
                )
        best, ratios = np.zeros(len(runs)), np.zeros((args.repeats, len(runs)))
        for r in range(args.repeats):  # runs[0] first: each round's rates are relative to its own floor
            rates = [rate(args.seconds) / w for _, w, rate in runs]
            best, ratios[r] = np.maximum(best, rates), np.divide(rates, rates[0])
        print(
            f"\n| {'method':<30} | workers | images/s (best) | per worker | % of floor per worker, median |"
        )
        print(f"|{'-' * 32}|---------|-----------------|------------|-------------------------------|")
        for (name, w, _), per, ratio in zip(runs, best, np.median(ratios, axis=0)):
            print(f"| {name:<30} | {w:>7} | {per * w:>15.0f} | {per:>10.0f} | {ratio:>29.1%} |")
        for name, w, loader in rings:  # build_face_loader's reused buffers (made at the first epoch)
            ring = loader.ring
            assert ring is not None  # every loader ran at least one epoch above
            print(f"{name}, {w} workers: {ring.num_slots} reused buffers, {ring.fallback_batches} fresh")


if __name__ == "__main__":
    main()
