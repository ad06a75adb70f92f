"""Write the synthetic face set in every on-disk format facems reads.

``write_synthetic_root(root, scale)`` lays out, under one root:

* ``train.rec`` / ``train.idx`` / ``property``: an insightface-layout training pack;
* ``calfw.bin`` and ``cplfw.bin``: pair files of 10 folds x (genuine then impostor pairs), the first
  stressing the age-like nuisance, the second pose;
* ``IJBC/``: an IJB-C-like release (meta files + ``loose_crop/*.jpg``, not aligned, with five landmarks
  and a detector score per face); subjects have several templates, templates several media, media
  several frames;
* ``CUB_200_2011/``: a retrieval set in the CUB-200-2011 layout (first half of the classes train).

Identities are drawn from disjoint ranges for the training pack and each evaluation set.
``write_ijbc_meta_at_scale`` writes only the IJB-C meta files at any size (the real one: 469,375
faces, 23,124 templates, 15,658,489 pairs of which 19,557 genuine), for evaluation benchmarks.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from facems.data.binfile import save_bin
from facems.data.recordio import IndexedRecordWriter, IRHeader, pack
from facems.data.synthetic import SyntheticFaces
from facems.fileio import atomic_write

__all__ = [
    "SCALES",
    "Scale",
    "write_cub_like",
    "write_ijbc_like",
    "write_ijbc_meta_at_scale",
    "write_pair_bin",
    "write_synthetic_root",
    "write_train_pack",
]

# Bumped whenever what write_synthetic_root writes changes, so that cached sets (make demo) are rebuilt.
RELEASE_VERSION = 3  # 3: demo-scale bins of 3,000 pairs (150 + 150 per fold) instead of 600

# Nuisance of the training pack, one value per image index (see SyntheticFaces): the evaluation sets
# use pose_scale 3 (cplfw) and age_scale 4 (calfw).
TRAIN_POSE_SCALES, TRAIN_AGE_SCALES = (1.0, 3.0), (1.0, 1.0, 4.0)

# Identity ranges: each set draws identities from its own block, so no evaluation identity is trained on.
TRAIN_IDS, CALFW_IDS, CPLFW_IDS, IJBC_IDS, CUB_IDS = 0, 1_000_000, 2_000_000, 3_000_000, 4_000_000


@dataclass(frozen=True)
class Scale:
    """Sizes of one ``--scale``."""

    train_identities: int
    train_images_per_identity: int
    pairs_per_fold: int  # genuine pairs per fold (the same number of impostor pairs follows)
    ijbc_subjects: int
    cub_classes: int
    cub_images_per_class: int


SCALES = {
    "tiny": Scale(40, 8, 30, 12, 20, 8),
    "demo": Scale(2000, 20, 150, 200, 100, 30),
    "full": Scale(10000, 40, 300, 1000, 200, 60),
}


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


# Worker state of write_train_pack's pool: the face set, set once per worker by the initializer.
_POOL_FACES: SyntheticFaces | None = None
_CHUNK = 256  # images per task: large enough that task overhead is negligible


def _init_pool(faces: SyntheticFaces) -> None:
    global _POOL_FACES
    _POOL_FACES = faces


def _encode_range(task: tuple[int, int, int | None]) -> list[tuple[int, bytes]]:
    """``(label, JPEG)`` of images ``start..stop-1`` of the pool's face set."""
    start, stop, quality = task
    faces = _POOL_FACES
    assert faces is not None, "_encode_range runs only in write_train_pack's pool"
    return _encode(faces, start, stop, quality)


def _encode(faces: SyntheticFaces, start: int, stop: int, quality: int | None) -> list[tuple[int, bytes]]:
    out = []
    for i in range(start, stop):
        img, label, _ = faces[i]
        out.append((label, _jpeg(img, faces.nuisance(i).jpeg_quality if quality is None else quality)))
    return out


def _encoded_faces(faces: SyntheticFaces, quality: int | None, workers: int) -> Iterator[tuple[int, bytes]]:
    """``(label, JPEG)`` of every face in index order, rendered by ``workers`` processes."""
    n = len(faces)
    tasks = [(a, min(a + _CHUNK, n), quality) for a in range(0, n, _CHUNK)]
    if workers <= 1 or len(tasks) <= 1:
        for a, b, q in tasks:
            yield from _encode(faces, a, b, q)
        return
    # Every image is a pure function of (seed, identity, index): the bytes do not depend on workers.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_pool, initargs=(faces,)) as pool:
        for chunk in pool.imap(_encode_range, tasks):
            yield from chunk


def write_train_pack(root: str, faces: SyntheticFaces, quality: int | None = None, workers: int = 1) -> None:
    """insightface-layout ``train.rec/.idx/property`` holding every face of ``faces`` (labels = its labels).

    Each image is JPEG-encoded at ``quality``, or at the quality its nuisance carries when None.
    ``workers`` processes render and encode (the files are the same for any number).
    """
    if workers < 1:
        raise ValueError(f"write_train_pack: workers must be >= 1, got {workers}")
    per, k = faces.images_per_identity, faces.num_identities
    n = len(faces)
    tmp_rec, tmp_idx = os.path.join(root, "train.rec.tmp"), os.path.join(root, "train.idx.tmp")
    with IndexedRecordWriter(tmp_rec, tmp_idx) as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + k], np.float32), 0, 0), b""))
        for i, (label, data) in enumerate(_encoded_faces(faces, quality, workers)):
            w.write(i + 1, pack(IRHeader(0, float(label), i + 1, 0), data))
        for c in range(k):
            a = 1 + c * per
            w.write(n + 1 + c, pack(IRHeader(2, np.array([a, a + per], np.float32), 0, 0), b""))
    os.replace(tmp_rec, os.path.join(root, "train.rec"))
    os.replace(tmp_idx, os.path.join(root, "train.idx"))
    with open(os.path.join(root, "property"), "w") as f:
        f.write(f"{k},112,112\n")


def _attributes(faces: SyntheticFaces, identity: int) -> np.ndarray:
    """Coarse look of an identity (skin and hair colour, facial hair, glasses), for impostor matching."""
    p = faces.identity(identity)
    return np.concatenate(
        [
            np.asarray(p.skin_rgb) / 255.0 * 2.0,
            np.asarray(p.hair_rgb) / 255.0,
            [float(p.facial_hair > 0), float(p.glasses > 0)],
        ]
    )


def write_pair_bin(
    path: str,
    faces: SyntheticFaces,
    pairs_per_fold: int,
    folds: int = 10,
    seed: int = 0,
    impostors: str = "matched",
) -> None:
    """A ``.bin`` of ``folds`` x (``pairs_per_fold`` genuine, then as many impostor pairs).

    Folds use disjoint identities. Genuine pair ``i`` of a fold shows one identity twice (images 0
    and 1); impostor pairs join two identities of the same fold (their images 2 and 3).

    ``impostors="matched"`` pairs look-alikes, as CALFW and CPLFW chose their negative pairs among
    people of the same gender and race: in random order, each identity still free takes the free
    identity of its fold closest in skin colour, hair colour, facial hair and glasses. Colour then
    tells little, and an untrained network is near chance. ``"random"`` pairs identities at random.
    """
    if impostors not in ("matched", "random"):
        raise ValueError(f"impostors must be 'matched' or 'random', got {impostors!r}")
    per_fold_ids = pairs_per_fold * 2
    if faces.num_identities < folds * per_fold_ids or faces.images_per_identity < 4:
        raise ValueError(
            f"write_pair_bin needs {folds * per_fold_ids} identities of 4 images, got {faces.num_identities} of {faces.images_per_identity}"
        )
    rng = np.random.default_rng(seed)
    per = faces.images_per_identity

    def image(identity: int, j: int) -> np.ndarray:
        return faces[identity * per + j][0]

    images: list[np.ndarray] = []
    issame: list[bool] = []
    for fold in range(folds):
        base = fold * per_fold_ids
        for i in range(pairs_per_fold):
            images += [image(base + i, 0), image(base + i, 1)]
            issame.append(True)
        order = rng.permutation(per_fold_ids)
        if impostors == "matched":
            look = np.stack([_attributes(faces, base + int(i)) for i in order])
            free = np.ones(per_fold_ids, dtype=bool)
            partners = []
            for a in range(per_fold_ids):
                if not free[a]:
                    continue
                free[a] = False
                cost = np.where(free, np.abs(look - look[a]).sum(axis=1), np.inf)
                b = int(np.argmin(cost))
                free[b] = False
                partners += [int(order[a]), int(order[b])]
        else:
            partners = order.tolist()
        for i in range(pairs_per_fold):
            a, b = partners[2 * i], partners[2 * i + 1]
            images += [image(base + a, 2), image(base + b, 3)]
            issame.append(False)
    save_bin(path, np.stack(images).transpose(0, 3, 1, 2), np.asarray(issame))


def _write_lines(path: str, lines: list[str]) -> None:
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_ijbc_like(root: str, faces: SyntheticFaces, seed: int = 0) -> dict[str, int]:
    """An IJB-C-like release under ``root/IJBC`` (see the module docstring); returns its counts.

    Each subject has 2-3 templates; a template holds 1-2 media; a medium holds 1-3 frames (faces).
    Template ids are sparse (as in IJB-C). One gallery template per subject, subjects split between
    G1 and G2; every other template is a probe. 1:1 pairs: every pair of templates of one subject
    (genuine) and 10 impostor pairs per genuine pair, drawn at random.
    """
    subjects, per = faces.num_identities, faces.images_per_identity
    if per < 18:
        raise ValueError(
            f"write_ijbc_like needs 18 images per identity (3 templates x 2 media x 3 frames), got {per}"
        )
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "IJBC")
    crops, meta = os.path.join(base, "loose_crop"), os.path.join(base, "meta")
    os.makedirs(crops, exist_ok=True)
    os.makedirs(meta, exist_ok=True)
    template_ids = rng.choice(np.arange(1, 8 * 3 * subjects + 1), size=3 * subjects, replace=False)
    face_lines, lmk_lines, templates = [], [], []  # templates: (template id, subject, [face names])
    face_no, media_no, tpl_no = 0, 0, 0
    for s in range(subjects):
        image_index = 0
        for _ in range(int(rng.integers(2, 4))):
            tid, names = int(template_ids[tpl_no]), []
            tpl_no += 1
            for _ in range(int(rng.integers(1, 3))):
                media_no += 1
                for _ in range(int(rng.integers(1, 4))):
                    face_no += 1
                    name = f"{face_no}.jpg"
                    img, _, lm = faces.loose_item(s * per + image_index)
                    quality = faces.nuisance(s * per + image_index).jpeg_quality
                    image_index += 1
                    with open(os.path.join(crops, name), "wb") as f:
                        f.write(_jpeg(img, quality))
                    score = float(rng.uniform(0.5, 1.0))
                    face_lines.append(f"{name} {tid} {media_no}")
                    lmk_lines.append(
                        name + " " + " ".join(f"{v:.3f}" for v in lm.reshape(-1)) + f" {score:.4f}"
                    )
                    names.append(name)
            templates.append((tid, s, names))
    _write_lines(os.path.join(meta, "ijbc_face_tid_mid.txt"), face_lines)
    _write_lines(os.path.join(meta, "ijbc_name_5pts_score.txt"), lmk_lines)

    by_subject: dict[int, list[int]] = {}
    for tid, s, _ in templates:
        by_subject.setdefault(s, []).append(tid)
    genuine = [(a, b) for tids in by_subject.values() for i, a in enumerate(tids) for b in tids[i + 1 :]]
    subject_of = {tid: s for tid, s, _ in templates}
    all_tids = np.array([t for t, _, _ in templates])
    impostor: list[tuple[int, int]] = []
    while len(impostor) < 10 * len(genuine):
        a, b = (int(v) for v in rng.choice(all_tids, 2, replace=False))
        if subject_of[a] != subject_of[b]:
            impostor.append((a, b))
    pairs = [f"{a} {b} 1" for a, b in genuine] + [f"{a} {b} 0" for a, b in impostor]
    _write_lines(os.path.join(meta, "ijbc_template_pair_label.txt"), pairs)

    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"
    rows: dict[str, list[str]] = {"G1": [header], "G2": [header], "probe": [header]}
    gallery_subjects = rng.permutation(subjects)
    g1 = set(gallery_subjects[: subjects // 2].tolist())
    for tid, s, names in templates:
        if tid == by_subject[s][0]:
            target = "G1" if s in g1 else "G2"
        else:
            target = "probe"
        rows[target] += [f"{tid},{s + 1},loose_crop/{n},{n.split('.')[0]}" for n in names]
    _write_lines(os.path.join(meta, "ijbc_1N_gallery_G1.csv"), rows["G1"])
    _write_lines(os.path.join(meta, "ijbc_1N_gallery_G2.csv"), rows["G2"])
    _write_lines(os.path.join(meta, "ijbc_1N_probe_mixed.csv"), rows["probe"])
    return {
        "faces": face_no,
        "media": media_no,
        "templates": tpl_no,
        "genuine": len(genuine),
        "pairs": len(pairs),
    }


def write_ijbc_meta_at_scale(
    root: str,
    faces: int = 469_375,
    templates: int = 23_124,
    pairs: int = 15_658_489,
    genuine: int = 19_557,
    subjects: int = 3_531,
    max_template_id: int = 188_000,
    seed: int = 0,
) -> None:
    """IJB-C meta files (``ijbc_face_tid_mid.txt``, ``ijbc_template_pair_label.txt``,
    ``ijbc_name_5pts_score.txt``) at the given size, without images; defaults are the real IJB-C's."""
    rng = np.random.default_rng(seed)
    meta = os.path.join(root, "IJBC", "meta")
    os.makedirs(meta, exist_ok=True)
    tids = np.sort(rng.choice(np.arange(1, max_template_id + 1), size=templates, replace=False))
    # Every subject gets at least two templates, every template at least one face.
    tpl_subject = np.concatenate(
        [np.arange(subjects), np.arange(subjects), rng.integers(0, subjects, templates - 2 * subjects)]
    )
    face_tpl = np.concatenate([np.arange(templates), rng.integers(0, templates, faces - templates)])
    face_tpl.sort()
    media = np.cumsum(np.r_[1, (np.diff(face_tpl) != 0) | (rng.random(faces - 1) < 0.3)])
    names = np.char.add(np.arange(1, faces + 1).astype(str), ".jpg")
    rows = np.column_stack([names, tids[face_tpl].astype(str), media.astype(str)])
    np.savetxt(os.path.join(meta, "ijbc_face_tid_mid.txt"), rows, fmt="%s")
    template = np.asarray(ARCFACE_LOOSE, dtype=np.float64).reshape(1, 10)
    lm = template + rng.normal(0, 2.0, (faces, 10))
    score = rng.uniform(0.5, 1.0, (faces, 1))
    np.savetxt(
        os.path.join(meta, "ijbc_name_5pts_score.txt"),
        np.column_stack([names, np.round(lm, 3).astype(str), np.round(score, 4).astype(str)]),
        fmt="%s",
    )

    order = np.argsort(tpl_subject, kind="stable")
    bounds = np.flatnonzero(np.diff(tpl_subject[order])) + 1
    same = np.concatenate(
        [
            np.array([(a, b) for i, a in enumerate(g) for b in g[i + 1 :]], dtype=np.int64).reshape(-1, 2)
            for g in np.split(order, bounds)
        ]
    )
    if len(same) < genuine:
        raise ValueError(f"only {len(same)} same-subject template pairs exist, {genuine} genuine pairs asked")
    gen = same[rng.choice(len(same), genuine, replace=False)]
    imp = rng.integers(0, templates, (pairs - genuine, 2))
    clash = tpl_subject[imp[:, 0]] == tpl_subject[imp[:, 1]]
    while clash.any():
        imp[clash, 1] = rng.integers(0, templates, int(clash.sum()))
        clash = tpl_subject[imp[:, 0]] == tpl_subject[imp[:, 1]]
    out = np.concatenate(
        [
            np.column_stack([tids[gen], np.ones(genuine, np.int64)]),
            np.column_stack([tids[imp], np.zeros(len(imp), np.int64)]),
        ]
    )
    np.savetxt(os.path.join(meta, "ijbc_template_pair_label.txt"), out, fmt="%d")


# Five landmarks of a face inside a 160x160 loose crop (the ArcFace template scaled about the centre).
ARCFACE_LOOSE = [[62.3, 67.7], [97.5, 67.5], [80.0, 87.7], [65.5, 108.4], [94.7, 108.2]]


def write_cub_like(root: str, faces: SyntheticFaces) -> None:
    """A retrieval set in the CUB-200-2011 layout under ``root/CUB_200_2011`` (classes 1..C/2 train)."""
    classes, per = faces.num_identities, faces.images_per_identity
    base = os.path.join(root, "CUB_200_2011")
    images, labels, split, names = [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Synthetic_{c}"
        names.append(f"{c} {folder}")
        os.makedirs(os.path.join(base, "images", folder), exist_ok=True)
        for j in range(per):
            image_id += 1
            rel = f"{folder}/Synthetic_{c}_{j:04d}.jpg"
            with open(os.path.join(base, "images", rel), "wb") as f:
                i = (c - 1) * per + j
                f.write(_jpeg(faces[i][0], faces.nuisance(i).jpeg_quality))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(c <= classes // 2)}")
    _write_lines(os.path.join(base, "images.txt"), images)
    _write_lines(os.path.join(base, "image_class_labels.txt"), labels)
    _write_lines(os.path.join(base, "train_test_split.txt"), split)
    _write_lines(os.path.join(base, "classes.txt"), names)


def write_synthetic_root(
    root: str, scale: str | Scale = "tiny", seed: int = 0, workers: int = 1
) -> dict[str, int]:
    """Write every synthetic set of ``scale`` (``SCALES``) under ``root``; returns the counts written.

    ``workers`` processes render the training pack, most of the images (the files do not depend on it).

    ``scale`` is a name in ``SCALES`` or a :class:`Scale`. ``scale="full"`` also writes the IJB-C meta files at the real IJB-C size (no images) under
    ``root/IJBC_full``.
    """
    if isinstance(scale, Scale):
        sc = scale
    elif scale in SCALES:
        sc = SCALES[scale]
    else:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    os.makedirs(root, exist_ok=True)
    # Like a real training set, the pack covers the pose and age ranges of the evaluation sets below:
    # every 2nd image of a person has CPLFW-like pose, every 3rd a CALFW-like age change.
    train = SyntheticFaces(
        sc.train_identities,
        sc.train_images_per_identity,
        seed,
        pose_scale=TRAIN_POSE_SCALES,
        age_scale=TRAIN_AGE_SCALES,
        identity_offset=TRAIN_IDS,
    )
    write_train_pack(root, train, workers=workers)
    pair_ids = 10 * 2 * sc.pairs_per_fold
    calfw = SyntheticFaces(pair_ids, 4, seed, age_scale=4.0, identity_offset=CALFW_IDS)
    write_pair_bin(os.path.join(root, "calfw.bin"), calfw, sc.pairs_per_fold, seed=seed)
    cplfw = SyntheticFaces(pair_ids, 4, seed, pose_scale=3.0, identity_offset=CPLFW_IDS)
    write_pair_bin(os.path.join(root, "cplfw.bin"), cplfw, sc.pairs_per_fold, seed=seed + 1)
    counts = write_ijbc_like(
        root, SyntheticFaces(sc.ijbc_subjects, 18, seed, identity_offset=IJBC_IDS), seed=seed
    )
    write_cub_like(
        root, SyntheticFaces(sc.cub_classes, sc.cub_images_per_class, seed, identity_offset=CUB_IDS)
    )
    if scale == "full":
        write_ijbc_meta_at_scale(os.path.join(root, "IJBC_full"), seed=seed)
    return {
        "version": RELEASE_VERSION,
        "train_images": len(train),
        "train_identities": train.num_identities,
        "pairs_per_bin": 20 * sc.pairs_per_fold,
        **{f"ijbc_{k}": v for k, v in counts.items()},
        "cub_images": sc.cub_classes * sc.cub_images_per_class,
    }
