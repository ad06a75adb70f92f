"""pack_image_folder: an image folder written by the test -> insightface rec pack, read back and checked."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import cv2
import numpy as np
import pytest

import facems.data.pack as pack_mod
from facems.data.align import ARCFACE_TEMPLATE, norm_crop
from facems.data.datasets import DatasetError, ImageFolderFaceDataset, RecordFaceDataset, decode_image
from facems.data.pack import PACK_FILES, pack_image_folder, read_landmarks_file
from facems.data.recordio import IndexedRecordReader, iter_records, unpack

REPO = Path(__file__).resolve().parents[2]

# identity folder -> image file names; "bob" is empty, "carol/c_bad.jpg" is corrupt, "dave" holds a
# 112x112 PNG (no resize needed) and a name with a space.
LAYOUT = {
    "alice": ["a0.jpg", "a1.jpg", "a2.jpg"],
    "bob": [],
    "carol": ["c0.jpg", "c_bad.jpg", "c1.jpg"],
    "dave": ["d 0.jpg", "d1.png"],
}
CORRUPT = "carol/c_bad.jpg"


def smooth_image(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)


def make_folder(root: Path) -> list[str]:
    """Write LAYOUT under root; returns the relative paths of the good images in listing order."""
    good = []
    seed = 0
    for ident, names in LAYOUT.items():
        (root / ident).mkdir(parents=True)
        for name in names:
            rel = f"{ident}/{name}"
            seed += 1
            if rel == CORRUPT:
                (root / rel).write_bytes(b"\xff\xd8 this is not a jpeg")
                continue
            size = 112 if name.endswith(".png") else 120
            params = [] if name.endswith(".png") else [cv2.IMWRITE_JPEG_QUALITY, 90]
            ok, buf = cv2.imencode(Path(name).suffix, smooth_image(seed, size), params)
            assert ok
            (root / rel).write_bytes(buf.tobytes())
            good.append(rel)
    return good


def reference_jpeg(img_bgr: np.ndarray, size: int = 112, quality: int = 95) -> bytes:
    if img_bgr.shape[:2] != (size, size):
        img_bgr = cv2.resize(img_bgr, (size, size), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def landmarks_for(rel: str) -> np.ndarray:
    """Plausible, image-specific 5 points in a 120x120 source (rotated, scaled, shifted template)."""
    seed = sum(rel.encode())
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-0.3, 0.3)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (ARCFACE_TEMPLATE.astype(np.float64) - 56.0) @ rot.T * rng.uniform(0.8, 1.1) + 60.0
    return pts + rng.normal(0.0, 1.0, pts.shape)


def write_landmarks(path: Path, rels: list[str]) -> None:
    lines = ["# path x1 y1 ... x5 y5", ""]
    for rel in rels:
        coords = " ".join(f"{v:.4f}" for v in landmarks_for(rel).reshape(-1))
        lines.append(f"./{rel}  {coords}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    make_folder(root)
    return root


def test_pack_reads_back_as_the_folder_minus_skipped(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pack"
    stats = pack_image_folder(src, dst, progress=False)
    assert stats.skipped == [str(src / CORRUPT)]
    assert (stats.num_images, stats.num_identities) == (7, 3)
    assert stats.identities == ["alice", "carol", "dave"] and stats.dropped_identities == ["bob"]
    assert stats.seconds > 0
    assert sorted(os.listdir(dst)) == sorted(PACK_FILES)  # no temporary folder left

    folder = ImageFolderFaceDataset(src)
    keep = [i for i, p in enumerate(folder.paths) if p not in stats.skipped]
    ds = RecordFaceDataset(dst)
    # Same order as the folder dataset; "bob" (label 1 there) is dropped, so later labels shift down.
    np.testing.assert_array_equal(ds.labels, np.unique(folder.labels[keep], return_inverse=True)[1])
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    for i, j in enumerate(keep):
        want_jpeg = reference_jpeg(cv2.imread(folder.paths[j], cv2.IMREAD_COLOR))
        assert unpack(ds.reader.read(i + 1))[1] == want_jpeg, folder.paths[j]
        img, label = ds[i]
        np.testing.assert_array_equal(img.numpy(), decode_image(want_jpeg))
        assert label == ds.labels[i]


def test_unreadable_and_empty_files_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    (src / "x" / "dir.jpg").mkdir(parents=True)  # listed like an image, cannot be read
    (src / "x" / "empty.jpg").write_bytes(b"")
    ok, buf = cv2.imencode(".jpg", smooth_image(7, 112))
    assert ok
    (src / "x" / "good.jpg").write_bytes(buf.tobytes())
    with caplog.at_level("WARNING", logger="facems.data.pack"):
        stats = pack_image_folder(src, tmp_path / "pack", progress=False)
    assert stats.skipped == [str(src / "x" / "dir.jpg"), str(src / "x" / "empty.jpg")]
    assert (stats.num_images, stats.num_identities) == (1, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{src / 'x' / 'dir.jpg'}: cannot be read") for m in messages), messages
    assert any(m.startswith(f"{src / 'x' / 'empty.jpg'}: is empty") for m in messages), messages
    assert unpack(RecordFaceDataset(tmp_path / "pack").reader.read(1))[1] == reference_jpeg(
        cv2.imdecode(buf, cv2.IMREAD_COLOR)
    )


def test_record_layout_is_insightface(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pack"
    pack_image_folder(src, dst, progress=False)
    n, k = 7, 3
    reader = IndexedRecordReader(dst / "train.rec", dst / "train.idx")
    assert reader.keys == list(range(n + k + 1))
    assert reader.offset(0) == 0  # header first in the file, as in insightface's packs
    head, payload = unpack(reader.read(0))
    assert head.flag == 2 and payload == b"" and (head.id, head.id2) == (0, 0)
    np.testing.assert_array_equal(head.label, np.array([n + 1, n + 1 + k], np.float32))
    want_labels = [0, 0, 0, 1, 1, 2, 2]
    for key in range(1, n + 1):
        head, payload = unpack(reader.read(key))
        assert (head.flag, head.label, head.id, head.id2) == (0, float(want_labels[key - 1]), key, 0)
        assert payload[:2] == b"\xff\xd8"  # JPEG
        assert cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)
    for c, (a, b) in enumerate([(1, 4), (4, 6), (6, 8)]):
        head, payload = unpack(reader.read(n + 1 + c))
        assert head.flag == 2 and payload == b"" and head.id == n + 1 + c
        np.testing.assert_array_equal(head.label, np.array([a, b], np.float32))
    assert (dst / "property").read_text() == "3,112,112\n"
    # The file holds exactly these records, in key order, and nothing else.
    offsets = [off for off, _ in iter_records(dst / "train.rec")]
    assert offsets == [reader.offset(key) for key in range(n + k + 1)]


def test_landmarks_align_every_image(src: Path, tmp_path: Path) -> None:
    listed = [f"{ident}/{name}" for ident, names in LAYOUT.items() for name in names]
    lm_path = tmp_path / "landmarks.txt"
    write_landmarks(lm_path, listed)
    dst = tmp_path / "pack"
    stats = pack_image_folder(src, dst, landmarks_file=lm_path, progress=False)
    assert stats.skipped == [str(src / CORRUPT)]
    ds = RecordFaceDataset(dst)
    good = [rel for rel in listed if rel != CORRUPT]
    assert len(ds) == len(good)
    parsed = read_landmarks_file(lm_path)
    for i, rel in enumerate(good):
        # Round-trip through the text file (4 decimals), as the packer sees it.
        lm = parsed[rel]
        np.testing.assert_allclose(lm, landmarks_for(rel), atol=1e-4)
        crop = norm_crop(cv2.imread(str(src / rel), cv2.IMREAD_COLOR), lm, 112)
        want = reference_jpeg(crop)
        assert unpack(ds.reader.read(i + 1))[1] == want, rel
        np.testing.assert_array_equal(ds[i][0].numpy(), decode_image(want))
    # Alignment really changed the pixels compared with a plain resize.
    plain = reference_jpeg(cv2.imread(str(src / good[0]), cv2.IMREAD_COLOR))
    assert unpack(ds.reader.read(1))[1] != plain


def test_landmarks_missing_entry_or_bad_line_is_named(src: Path, tmp_path: Path) -> None:
    lm_path = tmp_path / "lm.txt"
    write_landmarks(lm_path, ["alice/a0.jpg", "alice/a1.jpg"])
    with pytest.raises(ValueError, match=r"lm\.txt: no landmarks for .*alice/a2\.jpg"):
        pack_image_folder(src, tmp_path / "p1", landmarks_file=lm_path, progress=False)
    assert not (tmp_path / "p1").exists() or not any((tmp_path / "p1").iterdir())

    lm_path.write_text("alice/a0.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"lm\.txt: line 1: expected 'relative/path"):
        read_landmarks_file(lm_path)
    lm_path.write_text("# header\nalice/a0.jpg 1 2 3 4 5 6 7 8 9 x\n")
    with pytest.raises(ValueError, match=r"lm\.txt: line 2: expected 10 numeric"):
        read_landmarks_file(lm_path)
    lm_path.write_text("alice/a0.jpg 5 5 5 5 5 5 5 5 5 5\n")
    with pytest.raises(ValueError, match=r"lm\.txt: line 1: .*coincide"):
        read_landmarks_file(lm_path)
    coords = " ".join(f"{v}" for v in landmarks_for("x").reshape(-1))
    lm_path.write_text(f"alice/a0.jpg {coords}\n./alice/a0.jpg {coords}\n")
    with pytest.raises(ValueError, match=r"lm\.txt: line 2: 'alice/a0\.jpg' repeated \(first on line 1\)"):
        read_landmarks_file(lm_path)


def test_workers_give_byte_identical_files(src: Path, tmp_path: Path) -> None:
    # A large first image keeps one worker busy while the other finishes later tasks: results
    # arriving out of order would then show up as a different file.
    (src / "aaa").mkdir()
    ok, buf = cv2.imencode(".png", smooth_image(99, 2400))
    assert ok
    (src / "aaa" / "big.png").write_bytes(buf.tobytes())
    pack_image_folder(src, tmp_path / "serial", workers=0, progress=False)
    stats = pack_image_folder(src, tmp_path / "parallel", workers=2, progress=False)
    assert stats.skipped == [str(src / CORRUPT)]
    for name in PACK_FILES:
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name


def test_refuses_to_overwrite_unless_asked(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pack"
    pack_image_folder(src, dst, quality=95, progress=False)
    before = {name: (dst / name).read_bytes() for name in PACK_FILES}
    with pytest.raises(FileExistsError, match=r"train\.rec"):
        pack_image_folder(src, dst, quality=50, progress=False)
    assert {name: (dst / name).read_bytes() for name in PACK_FILES} == before

    pack_image_folder(src, dst, quality=50, progress=False, overwrite=True)
    pack_image_folder(src, tmp_path / "fresh", quality=50, progress=False)
    for name in PACK_FILES:
        assert (dst / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert (dst / "train.rec").read_bytes() != before["train.rec"]
    # A single leftover pack file is enough to refuse.
    (dst / "train.rec").unlink()
    (dst / "train.idx").unlink()
    with pytest.raises(FileExistsError, match=r"property"):
        pack_image_folder(src, dst, progress=False)


def test_failure_midway_leaves_no_partial_files(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pack_mod._encode_jpeg
    calls = []

    def failing(img: np.ndarray, quality: int) -> bytes:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected encoder failure")
        return real(img, quality)

    monkeypatch.setattr(pack_mod, "_encode_jpeg", failing)
    dst = tmp_path / "pack"
    with pytest.raises(RuntimeError, match="injected"):
        pack_image_folder(src, dst, progress=False)
    assert len(calls) == 4
    assert os.listdir(dst) == []  # neither pack files nor the temporary folder

    # An existing pack survives a failed overwrite untouched.
    monkeypatch.setattr(pack_mod, "_encode_jpeg", real)
    pack_image_folder(src, dst, progress=False)
    before = {name: (dst / name).read_bytes() for name in PACK_FILES}
    calls.clear()
    monkeypatch.setattr(pack_mod, "_encode_jpeg", failing)
    with pytest.raises(RuntimeError, match="injected"):
        pack_image_folder(src, dst, quality=50, progress=False, overwrite=True)
    assert sorted(os.listdir(dst)) == sorted(PACK_FILES)
    assert {name: (dst / name).read_bytes() for name in PACK_FILES} == before


def test_other_sizes_and_bad_inputs(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "p64"
    pack_image_folder(src, dst, image_size=64, progress=False)
    assert (dst / "property").read_text() == "3,64,64\n"
    ds = RecordFaceDataset(dst, image_size=(64, 64))
    path = str(src / "dave" / "d1.png")  # 112x112 source, resized down
    want = reference_jpeg(cv2.imread(path, cv2.IMREAD_COLOR), size=64)
    np.testing.assert_array_equal(ds[6][0].numpy(), decode_image(want))

    with pytest.raises(ValueError, match="quality"):
        pack_image_folder(src, tmp_path / "q", quality=101, progress=False)
    with pytest.raises(ValueError, match="workers"):
        pack_image_folder(src, tmp_path / "w", workers=-1, progress=False)
    with pytest.raises(ValueError, match="inside the image folder"):
        pack_image_folder(src, src / "alice" / "pack", progress=False)
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "1.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"bad: none of its 1 images"):
        pack_image_folder(bad, tmp_path / "b", progress=False)
    assert not any((tmp_path / "b").iterdir())


def test_cli_packs_and_prints_stats(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    cli = runpy.run_path(str(REPO / "scripts" / "pack_rec.py"), run_name="pack_rec")
    dst = tmp_path / "cli"
    argv = ["--src", str(src), "--dst", str(dst), "--workers", "0", "--no-progress"]
    assert cli["main"](argv) == 0
    out = capsys.readouterr().out
    assert "packed 7 images of 3 identities" in out
    assert "skipped 1 unreadable image(s)" in out and str(src / CORRUPT) in out
    assert "dropped 1 identities without images: ['bob']" in out
    assert any(str(src / CORRUPT) in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert RecordFaceDataset(dst).labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(FileExistsError):
        cli["main"](argv)
    assert cli["main"]([*argv, "--overwrite", "--quality", "80", "--size", "224"]) == 0
    assert (dst / "property").read_text() == "3,224,224\n"
