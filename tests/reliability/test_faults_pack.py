"""A broken training pack under the trainer: corrupt JPEGs and one-image identities are trained
through and logged; an idx pointing past the end of the .rec and labels beyond the property file's
class count stop the run at start, naming the file.

The dataset-level behaviour is tested in tests/data (test_datasets.py, test_recordio.py); here the
same faults go through ``Trainer`` so that what a user sees (the run's log, the error) is checked.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facems.config import load_config
from facems.data.datasets import DatasetError
from facems.data.recordio import IndexedRecordWriter, IRHeader, RecordIOError, pack
from facems.testing import tiny_run_overrides
from facems.train.distributed import init_distributed
from facems.train.loop import Trainer


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (5, 5), 1.5)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def write_pack(
    root: Path, counts: list[int], corrupt: tuple[int, ...] = (), classes: int | None = None
) -> None:
    """insightface layout: record 0 header, image records 1..N, one identity record per class."""
    root.mkdir(parents=True, exist_ok=True)
    n, k = sum(counts), len(counts)
    with IndexedRecordWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + k], np.float32), 0, 0), b""))
        key = 1
        for c, count in enumerate(counts):
            for _ in range(count):
                data = b"\xff\xd8 not really a jpeg" if key in corrupt else jpeg(key)
                w.write(key, pack(IRHeader(0, float(c), key, 0), data))
                key += 1
        start = 1
        for c, count in enumerate(counts):
            w.write(n + 1 + c, pack(IRHeader(2, np.array([start, start + count], np.float32), 0, 0), b""))
            start += count
    (root / "property").write_text(f"{k if classes is None else classes},112,112\n")


def make_trainer(root: Path, out: Path, *extra: str) -> Trainer:
    cfg = load_config(None, tiny_run_overrides("pack_faults", root, out, *extra))
    return Trainer(cfg, init_distributed("cpu"))


def test_corrupt_jpeg_and_one_image_identity_are_trained_through_and_logged(tmp_path: Path) -> None:
    root = tmp_path / "pack"
    # Identity 0 has 2 images, of which key 2 does not decode; identity 6 has a single image (key 23).
    write_pack(root, [2, 4, 4, 4, 4, 4, 1], corrupt=(2,))
    out = tmp_path / "run"
    # P x K = 7 x 2: every step draws every identity, both images of identity 0 included; 23 images
    # make one step per epoch.
    trainer = make_trainer(root, out, "data.max_bad_fraction=0.1", "schedule.epochs=2", "data.p=7")
    trainer.fit()
    assert trainer.step == trainer.total_steps == 2 and trainer.bad_total == 0
    assert all(
        bool(torch.isfinite(v).all()) for v in trainer.net.state_dict().values() if v.is_floating_point()
    )
    log = (out / "train.log").read_text()
    assert "train.rec: key 2 does not decode; using another image of its identity" in log
    assert "1 of 7 identities have fewer than k=2 images" in log  # the single-image identity, counted
    assert trainer.dataset.bad_items == {1}  # dataset index 1 is record key 2


def test_too_many_corrupt_jpegs_stop_with_the_count_and_the_records(tmp_path: Path) -> None:
    root = tmp_path / "pack"
    write_pack(root, [4, 4, 4, 4], corrupt=(1, 5, 9))
    trainer = make_trainer(
        root, tmp_path / "run", "data.max_bad_fraction=0.1", "train.max_steps=3", "data.p=4"
    )
    with pytest.raises(DatasetError, match=r"2 of 16 images do not decode, more than max_bad_fraction=0\.1"):
        trainer.fit()


def test_idx_offset_past_the_end_is_named_at_start(tmp_path: Path) -> None:
    root = tmp_path / "pack"
    write_pack(root, [4, 4, 4])
    lines = (root / "train.idx").read_text().splitlines()
    key, _ = lines[5].split("\t")
    lines[5] = f"{key}\t{(root / 'train.rec').stat().st_size + 64}"
    (root / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises((DatasetError, RecordIOError), match=r"train\.(idx|rec)"):
        make_trainer(root, tmp_path / "run", "train.max_steps=1")


def test_labels_beyond_the_property_class_count_are_named_at_start(tmp_path: Path) -> None:
    root = tmp_path / "pack"
    write_pack(root, [4, 4, 4], classes=2)  # the records hold 3 identities, property says 2
    with pytest.raises(DatasetError, match="property"):
        make_trainer(root, tmp_path / "run", "train.max_steps=1")
