"""The synthetic root: every file reads back with facems' own readers and the protocols hold."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from facems.data.binfile import load_bin
from facems.data.datasets import RecordFaceDataset
from facems.data.synthetic_release import Scale, write_ijbc_meta_at_scale, write_synthetic_root

SMALL = Scale(
    train_identities=6,
    train_images_per_identity=4,
    pairs_per_fold=3,
    ijbc_subjects=5,
    cub_classes=4,
    cub_images_per_class=3,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic")
    counts = write_synthetic_root(str(path), SMALL, seed=3)
    assert counts["train_images"] == 24 and counts["pairs_per_bin"] == 60
    return path


def test_training_pack(root: Path) -> None:
    ds = RecordFaceDataset(root)
    assert len(ds) == 24 and ds.num_classes == 6
    assert ds.labels.tolist() == np.repeat(np.arange(6), 4).tolist()
    image, label = ds[5]
    assert image.shape == (3, 112, 112) and label == 1
    assert (root / "property").read_text().strip() == "6,112,112"


@pytest.mark.parametrize("name", ["calfw.bin", "cplfw.bin"])
def test_pair_bins_have_ten_folds(root: Path, name: str) -> None:
    images, issame = load_bin(root / name)
    assert images.shape == (120, 3, 112, 112) and images.dtype == np.uint8
    fold = [True] * 3 + [False] * 3
    assert issame.tolist() == fold * 10
    # Genuine pairs are closer in pixels than impostor pairs on average (identity signal exists).
    flat = images.reshape(60, 2, -1).astype(np.float32)
    dist = np.abs(flat[:, 0] - flat[:, 1]).mean(axis=1)
    assert dist[issame].mean() < dist[~issame].mean()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ijbc_like_release_is_consistent(root: Path) -> None:
    meta = root / "IJBC" / "meta"
    faces = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    marks = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    assert [f[0] for f in faces] == [m[0] for m in marks]
    assert all(len(m) == 12 for m in marks)
    for name, *_ in faces:
        assert os.path.isfile(root / "IJBC" / "loose_crop" / name)
    template_of_face = {f[0]: int(f[1]) for f in faces}
    rows = [r for part in ("G1", "G2") for r in read_csv(meta / f"ijbc_1N_gallery_{part}.csv")]
    rows += read_csv(meta / "ijbc_1N_probe_mixed.csv")
    subject_of = {int(r["TEMPLATE_ID"]): int(r["SUBJECT_ID"]) for r in rows}
    assert set(subject_of) == set(template_of_face.values())
    for r in rows:
        assert template_of_face[r["FILENAME"].split("/")[-1]] == int(r["TEMPLATE_ID"])
    g1 = {int(r["SUBJECT_ID"]) for r in read_csv(meta / "ijbc_1N_gallery_G1.csv")}
    g2 = {int(r["SUBJECT_ID"]) for r in read_csv(meta / "ijbc_1N_gallery_G2.csv")}
    assert not g1 & g2 and len(g1 | g2) == SMALL.ijbc_subjects
    pairs = [
        tuple(map(int, line.split()))
        for line in (meta / "ijbc_template_pair_label.txt").read_text().splitlines()
    ]
    assert any(label == 1 for *_, label in pairs) and any(label == 0 for *_, label in pairs)
    for a, b, label in pairs:
        assert label == int(subject_of[a] == subject_of[b])


def test_cub_layout(root: Path) -> None:
    base = root / "CUB_200_2011"
    images = [line.split() for line in (base / "images.txt").read_text().splitlines()]
    labels = dict(line.split() for line in (base / "image_class_labels.txt").read_text().splitlines())
    split = dict(line.split() for line in (base / "train_test_split.txt").read_text().splitlines())
    assert len(images) == 12 and len((base / "classes.txt").read_text().splitlines()) == 4
    for image_id, rel in images:
        assert (base / "images" / rel).is_file()
        assert split[image_id] == str(int(int(labels[image_id]) <= 2))


def test_ijbc_meta_at_scale_counts(tmp_path: Path) -> None:
    write_ijbc_meta_at_scale(
        str(tmp_path), faces=500, templates=120, pairs=3000, genuine=150, subjects=30, max_template_id=900
    )
    meta = tmp_path / "IJBC" / "meta"
    faces = np.loadtxt(meta / "ijbc_face_tid_mid.txt", dtype=str)
    pairs = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=np.int64)
    assert faces.shape == (500, 3) and pairs.shape == (3000, 3)
    tids = set(faces[:, 1].astype(int).tolist())
    assert len(tids) == 120 and max(tids) <= 900
    assert int(pairs[:, 2].sum()) == 150
    assert set(pairs[:, :2].reshape(-1).tolist()) <= tids
    assert len(np.loadtxt(meta / "ijbc_name_5pts_score.txt", dtype=str)) == 500


def test_unknown_scale_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scale must be one of"):
        write_synthetic_root(str(tmp_path), "huge")


def test_train_pack_fixed_quality(tmp_path: Path) -> None:
    from facems.data.recordio import IndexedRecordReader, unpack
    from facems.data.synthetic import SyntheticFaces
    from facems.data.synthetic_release import write_train_pack

    faces = SyntheticFaces(2, 2, seed=1)
    sizes = {}
    for q in (30, 95):
        (tmp_path / str(q)).mkdir()
        write_train_pack(str(tmp_path / str(q)), faces, quality=q)
        reader = IndexedRecordReader(tmp_path / str(q) / "train.rec", tmp_path / str(q) / "train.idx")
        payloads = [unpack(reader.read(k))[1] for k in range(1, 5)]
        sizes[q] = sum(map(len, payloads))
    assert sizes[30] < sizes[95]


def test_matched_impostors_are_look_alikes(tmp_path: Path) -> None:
    from facems.data.synthetic import SyntheticFaces
    from facems.data.synthetic_release import _attributes, write_pair_bin

    faces = SyntheticFaces(20, 4, seed=5)
    rendered = np.stack([faces[i][0].transpose(2, 0, 1) for i in range(len(faces))]).astype(np.float32)

    def source(img: np.ndarray) -> tuple[int, int]:  # (identity, j) of the rendering a JPEG image comes from
        return divmod(int(np.abs(rendered - img.astype(np.float32)).mean(axis=(1, 2, 3)).argmin()), 4)

    pairs = {}
    for mode in ("matched", "random"):
        write_pair_bin(str(tmp_path / f"{mode}.bin"), faces, 5, folds=2, seed=1, impostors=mode)
        images, issame = load_bin(tmp_path / f"{mode}.bin")
        assert issame.tolist() == ([True] * 5 + [False] * 5) * 2
        found = [source(img) for img in images]
        pairs[mode] = list(zip(found[0::2], found[1::2]))
    assert [p for p, s in zip(pairs["matched"], issame) if s] == [
        p for p, s in zip(pairs["random"], issame) if s
    ]
    cost = {}
    for mode, found in pairs.items():
        impostor = [p for p, s in zip(found, issame) if not s]
        for fold in range(2):  # every identity of the fold appears in exactly one impostor pair
            ids = sorted(i for (a, _), (b, _) in impostor[5 * fold : 5 * fold + 5] for i in (a, b))
            assert ids == list(range(10 * fold, 10 * fold + 10))
        assert all(ja == 2 and jb == 3 for (_, ja), (_, jb) in impostor)
        cost[mode] = np.mean(
            [np.abs(_attributes(faces, a) - _attributes(faces, b)).sum() for (a, _), (b, _) in impostor]
        )
    assert cost["matched"] < 0.7 * cost["random"]
    with pytest.raises(ValueError, match="impostors"):
        write_pair_bin(str(tmp_path / "x.bin"), faces, 5, folds=2, impostors="hard")


def test_train_pack_same_bytes_with_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import facems.data.synthetic_release as release
    from facems.data.synthetic import SyntheticFaces

    monkeypatch.setattr(release, "_CHUNK", 7)  # several chunks, the last one short: order must hold
    faces = SyntheticFaces(6, 5, seed=3, pose_scale=(1.0, 3.0))
    for workers in (1, 2):
        (tmp_path / str(workers)).mkdir()
        release.write_train_pack(str(tmp_path / str(workers)), faces, workers=workers)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        release.write_train_pack(str(tmp_path), faces, workers=0)
