"""facems.protocols.ijb against a plain-loop re-statement of insightface's IJB evaluation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from facems.data.align import norm_crop
from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_ijbc_like
from facems.embed import embed_views
from facems.metrics import tar_at_far
from facems.models import create_model
from facems.protocols import ijb

# ----------------------------------------------------------------------------------------------------
# A re-statement of insightface's recognition/arcface_torch/eval_ijbc.py and _evaluation_/ijb
# (image features, image2template_feature, verification, the TAR table, evaluation_1N), with explicit
# loops over templates, media and pairs, in float64.
# ----------------------------------------------------------------------------------------------------


def ref_image_features(
    emb: np.ndarray, flip: np.ndarray, scores: np.ndarray, flip_test: bool, norm_score: bool, det_score: bool
) -> np.ndarray:
    out = np.zeros(emb.shape)
    for i in range(emb.shape[0]):
        f = emb[i].astype(np.float64) + (flip[i] if flip_test else 0.0)
        if not norm_score:
            f = f / np.sqrt(sum(v * v for v in f))
        if det_score:
            f = f * float(scores[i])
        out[i] = f
    return out


def ref_template_features(
    feats: np.ndarray, templates: np.ndarray, medias: np.ndarray, choose: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    wanted = sorted(set((templates if choose is None else choose).tolist()))
    out = np.zeros((len(wanted), feats.shape[1]))
    for row, t in enumerate(wanted):
        media: dict[int, list[int]] = {}
        for i in range(len(templates)):
            if templates[i] == t:
                media.setdefault(int(medias[i]), []).append(i)
        total = np.zeros(feats.shape[1])
        for faces in media.values():
            total += sum(feats[i].astype(np.float64) for i in faces) / len(faces)
        out[row] = total / np.sqrt(float(total @ total))
    return out, np.array(wanted)


def ref_verification(feats: np.ndarray, unique: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    row = {int(t): k for k, t in enumerate(unique)}
    return np.array([float(feats[row[int(a)]] @ feats[row[int(b)]]) for a, b in zip(p1, p2)])


def ref_nearest_table(labels: np.ndarray, scores: np.ndarray, fars: list[float]) -> list[float]:
    """insightface's TAR table: sklearn roc_curve, flipped, the first minimum of |fpr - far|."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [float(tpr[min(zip(abs(fpr - x), range(len(fpr))))[1]]) for x in fars]


def ref_conservative_table(labels: np.ndarray, scores: np.ndarray, fars: list[float]) -> list[float]:
    """The highest TPR over every threshold whose FPR does not exceed the target (0 if none)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    best = dict.fromkeys(fars, 0.0)
    for t in np.unique(scores):
        fpr, tpr = np.mean(neg >= t), np.mean(pos >= t)
        for f in fars:
            if fpr <= f:
                best[f] = max(best[f], float(tpr))
    return [best[f] for f in fars]


def ref_identification(
    sim: np.ndarray, probe_ids: np.ndarray, gallery_ids: np.ndarray, fpirs: list[float]
) -> tuple[dict[int, float], dict[float, float]]:
    """insightface ijb_evals' evaluation_1N restated (distinct scores): top-k counts and TPIR."""
    hits = dict.fromkeys((1, 5, 10), 0)
    pos, neg_max, non_mated = [], [], []
    for i, q in enumerate(probe_ids):
        if q in gallery_ids:
            g = int(np.argwhere(gallery_ids == q)[0, 0])
            ranked = list(np.argsort(sim[i])[::-1])
            for k in hits:
                hits[k] += g in ranked[:k]
            pos.append(sim[i, g])
            neg_max.append(max(sim[i, j] for j in range(sim.shape[1]) if gallery_ids[j] != q))
        else:
            non_mated.append(max(sim[i]))
    tops = sorted(non_mated, reverse=True)
    tpir = {}
    for f in fpirs:
        thresh = tops[max(int(len(tops) * f) - 1, 0)]
        tpir[f] = sum(1 for p, n in zip(pos, neg_max) if p > n and p > thresh) / len(pos)
    return {k: v / len(pos) for k, v in hits.items()}, tpir


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ijb")
    write_ijbc_like(str(root), SyntheticFaces(6, 18, 0, identity_offset=3_000_000), seed=0)
    return root / "IJBC"


def _random_release(
    rng: np.random.Generator, faces: int, templates: int, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse template ids, media ids reused across templates, faces in random order."""
    tids = np.sort(rng.choice(np.arange(1, 50 * templates), templates, replace=False))
    face_t = np.r_[tids, tids[rng.integers(0, templates, faces - templates)]]
    media = rng.integers(0, faces // 3, faces)  # the same media id occurs in several templates
    order = rng.permutation(faces)
    return rng.standard_normal((faces, dim)).astype(np.float32), face_t[order], media[order]


# ----------------------------------------------------------------------------------------------------
# Features, pooling, scores
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip_test", [True, False])
@pytest.mark.parametrize("norm_score", [True, False])
@pytest.mark.parametrize("det_score", [True, False])
def test_image_features_match_the_reference(flip_test: bool, norm_score: bool, det_score: bool) -> None:
    rng = np.random.default_rng(0)
    emb, flip = rng.standard_normal((2, 40, 16)).astype(np.float32)
    scores = rng.uniform(0.5, 1.0, 40).astype(np.float32)
    got = ijb.image_features(emb, flip, scores, flip_test, norm_score, det_score)
    want = ref_image_features(emb, flip, scores, flip_test, norm_score, det_score)
    assert got.dtype == np.float32 and got.shape == emb.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_image_features_check_their_inputs() -> None:
    emb = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"flip_emb"):
        ijb.image_features(emb, None, np.ones(3))
    with pytest.raises(ValueError, match=r"detector_scores"):
        ijb.image_features(emb, emb, np.ones(2))
    zero = ijb.image_features(np.zeros((2, 4), np.float32), None, None, False, False, False)
    assert np.all(zero == 0)  # a zero feature stays zero instead of becoming NaN


def test_pooling_matches_insightface_loops() -> None:
    rng = np.random.default_rng(1)
    feats, templates, medias = _random_release(rng, 3000, 400, 24)
    got, unique = ijb.image_to_template_features(feats, templates, medias, num_threads=3)
    want, want_unique = ref_template_features(feats, templates, medias)
    np.testing.assert_array_equal(unique, want_unique)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    # One thread and several give the same numbers.
    one, _ = ijb.image_to_template_features(feats, templates, medias, num_threads=1)
    np.testing.assert_array_equal(one, got)
    # The 1:N variant: only the chosen templates, still pooled from all of their faces.
    choose = rng.choice(unique, 50, replace=False)
    sub, sub_unique = ijb.image_to_template_features(feats, templates, medias, select=np.r_[choose, choose])
    want_sub, want_sub_unique = ref_template_features(feats, templates, medias, choose)
    np.testing.assert_array_equal(sub_unique, want_sub_unique)
    np.testing.assert_allclose(sub, want_sub, atol=1e-6)


def test_pooling_mean_within_each_medium() -> None:
    # Template 7: medium 1 holds two faces, medium 2 one: sum = mean(a, b) + c, then normalised.
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0], [5.0, 5.0]], np.float32)
    got, unique = ijb.image_to_template_features(feats, np.array([7, 7, 7, 9]), np.array([1, 1, 2, 1]))
    np.testing.assert_array_equal(unique, [7, 9])
    np.testing.assert_allclose(got[0], np.array([2.0, 4.0]) / np.sqrt(20.0), rtol=1e-6)
    np.testing.assert_allclose(got[1], np.array([1.0, 1.0]) / np.sqrt(2.0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"select: template 8 has no image"):
        ijb.image_to_template_features(feats, np.array([7, 7, 7, 9]), np.array([1, 1, 2, 1]), select=[8])


def test_verify_pairs_matches_the_loop_over_several_tiles() -> None:
    rng = np.random.default_rng(2)
    n_templates, dim = 5000, 16  # more than one 2048-row block a side
    unique = np.sort(rng.choice(np.arange(100, 400_000), n_templates, replace=False))
    feats = rng.standard_normal((n_templates, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    t1 = unique[rng.integers(0, n_templates, 150_000)]
    t2 = unique[rng.integers(0, n_templates, 150_000)]
    t2[:10] = t1[:10]  # self pairs
    t1[20:30], t2[20:30] = t1[30:40], t2[30:40]  # duplicated pairs
    got = ijb.verify_pairs(feats, unique, t1, t2, num_threads=3)
    assert got.dtype == np.float32 and got.shape == t1.shape
    sample = rng.choice(t1.size, 4000, replace=False)
    want = ref_verification(feats.astype(np.float64), unique, t1[sample], t2[sample])
    np.testing.assert_allclose(got[sample], want, atol=1e-6)
    np.testing.assert_allclose(got[:10], 1.0, atol=1e-6)
    np.testing.assert_array_equal(got[20:30], got[30:40])
    np.testing.assert_array_equal(ijb.verify_pairs(feats, unique, t1, t2, num_threads=1), got)


def test_verify_pairs_gallery_like_pairs_and_float64() -> None:
    # t1 from a few templates only (compacted to contiguous rows), float64 features stay float64.
    rng = np.random.default_rng(3)
    unique = np.arange(0, 3000, 3)
    feats = rng.standard_normal((unique.size, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    t1 = unique[rng.integers(0, 20, 5000)]
    t2 = unique[rng.integers(500, 1000, 5000)]
    got = ijb.verify_pairs(feats, unique, t1, t2)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref_verification(feats, unique, t1, t2), atol=1e-12)
    assert ijb.verify_pairs(feats, unique, t1[:0], t2[:0]).shape == (0,)


def test_verify_pairs_names_a_template_without_features() -> None:
    feats = np.eye(3, dtype=np.float32)
    unique = np.array([2, 5, 9])
    with pytest.raises(ValueError, match=r"t2\[1\]: template 6 is not among unique_templates"):
        ijb.verify_pairs(feats, unique, np.array([2, 5]), np.array([9, 6]))
    with pytest.raises(ValueError, match=r"t1\[0\]: template -1"):
        ijb.verify_pairs(feats, unique, np.array([-1]), np.array([9]))
    with pytest.raises(ValueError, match=r"strictly increasing"):
        ijb.verify_pairs(feats, np.array([5, 2, 9]), np.array([2]), np.array([9]))


# ----------------------------------------------------------------------------------------------------
# Read-out
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 3, 2])
def test_readout_equals_insightface_table_and_the_metrics(decimals: int | None) -> None:
    rng = np.random.default_rng(4)
    neg = rng.normal(0.0, 0.15, 200_000)
    pos = rng.normal(0.55, 0.2, 400)
    scores = np.r_[pos, neg].astype(np.float32)
    if decimals is not None:  # many ties
        scores = np.round(scores, decimals)
    labels = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    perm = rng.permutation(scores.size)
    scores, labels = scores[perm], labels[perm]
    fars = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    got = ijb.tar_at_far_readout(labels, scores, fars)
    assert list(got.nearest.values()) == ref_nearest_table(labels, scores, fars)
    for mode in ("nearest", "conservative"):
        assert getattr(got, mode) == tar_at_far(labels, scores, fars, mode=mode)
    # The ROC points returned are the start of scikit-learn's curve.
    fpr, tpr, thr = roc_curve(labels, scores)
    k = got.fpr.size
    np.testing.assert_array_equal(got.fpr, fpr[:k])
    np.testing.assert_array_equal(got.tpr, tpr[:k])
    np.testing.assert_array_equal(got.thresholds[1:], thr[1:k])
    if decimals is None:
        assert k < fpr.size and got.fpr[-1] >= 0.1 * 0.9  # only the top of the curve was sorted


def test_readout_widens_its_region_until_the_answer_is_decided(monkeypatch: pytest.MonkeyPatch) -> None:
    # Genuine pairs far above and below the impostors, plus one inside them at FPR ~0.3: the curve is
    # a long straight run whose inner points scikit-learn drops, so the first regions cannot decide.
    rng = np.random.default_rng(8)
    impostor = rng.permutation(20_000) / 20_000  # distinct scores: a straight run of single steps
    genuine = np.r_[np.full(50, 2.0), np.quantile(impostor, 0.7), np.full(10, -1.0)]
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(genuine.size, bool), np.zeros(impostor.size, bool)]
    decided = []
    top = ijb._readout_top

    def spy(*args: object) -> ijb.TarReadout | None:
        out = top(*args)  # type: ignore[arg-type]
        decided.append(out is not None)
        return out

    monkeypatch.setattr(ijb, "_readout_top", spy)
    fars = [1e-4, 1e-2, 1e-1]
    got = ijb.tar_at_far_readout(labels, scores, fars)
    assert decided[0] is False and decided[-1] is True  # widened, then decided without a full sort
    assert list(got.nearest.values()) == ref_nearest_table(labels, scores, fars)
    assert list(got.conservative.values()) == ref_conservative_table(labels, scores, fars)
    # A single straight run: every point past (0, 50/60) is farther from each target, so decided.
    lone = np.r_[np.full(50, 2.0), np.full(10, -1.0)]
    lone_labels = np.r_[np.ones(60, bool), np.zeros(impostor.size, bool)]
    got = ijb.tar_at_far_readout(lone_labels, np.r_[lone, impostor], fars)
    assert got.nearest == tar_at_far(lone_labels, np.r_[lone, impostor], fars) == dict.fromkeys(fars, 50 / 60)


def test_readout_conservative_matches_the_threshold_loop() -> None:
    rng = np.random.default_rng(5)
    scores = np.round(np.r_[rng.normal(0.5, 0.2, 60), rng.normal(0, 0.2, 3000)], 2)
    labels = np.r_[np.ones(60, int), np.zeros(3000, int)]
    fars = [1e-3, 1e-2, 1e-1, 0.5]
    got = ijb.tar_at_far_readout(labels, scores, fars)
    assert list(got.conservative.values()) == ref_conservative_table(labels, scores, fars)
    assert list(got.nearest.values()) == ref_nearest_table(labels, scores, fars)
    with pytest.raises(ValueError, match=r"genuine and impostor"):
        ijb.tar_at_far_readout(np.zeros(5, bool), np.arange(5.0))


# ----------------------------------------------------------------------------------------------------
# 1:N
# ----------------------------------------------------------------------------------------------------


def test_identification_matches_insightface_evaluation_1n() -> None:
    rng = np.random.default_rng(6)
    subjects = 30
    centers = rng.standard_normal((subjects, 16))
    rows_t, rows_s, rows_m, feats = [], [], [], []
    tid = 0
    for s in range(subjects):
        for _ in range(3):
            tid += 1
            for m in range(rng.integers(1, 3)):
                for _ in range(rng.integers(1, 3)):
                    rows_t.append(tid * 10)
                    rows_s.append(s)
                    rows_m.append(tid * 100 + m)
                    feats.append(centers[s] + 0.8 * rng.standard_normal(16))
    templates, subj, medias = np.array(rows_t), np.array(rows_s), np.array(rows_m)
    x = np.array(feats, np.float32)
    first = {}
    for t, s in zip(templates, subj):
        first.setdefault(int(t), int(s))
    gallery_t = {s: min(t for t, ss in first.items() if ss == s) for s in range(subjects)}
    g1 = np.isin(templates, [gallery_t[s] for s in range(0, subjects, 2)])
    g2 = np.isin(templates, [gallery_t[s] for s in range(1, subjects, 2)])
    probe = ~(g1 | g2)
    galleries = {"G1": (templates[g1], subj[g1]), "G2": (templates[g2], subj[g2])}
    got = ijb.identify_1n(x, templates, medias, galleries, (templates[probe], subj[probe]))
    probe_f, probe_u = ref_template_features(x, templates, medias, templates[probe])
    probe_ids = np.array([first[int(t)] for t in probe_u])
    mated = {}
    for name, (gt, _) in galleries.items():
        gal_f, gal_u = ref_template_features(x, templates, medias, gt)
        gal_ids = np.array([first[int(t)] for t in gal_u])
        want_cmc, want_tpir = ref_identification(probe_f @ gal_f.T, probe_ids, gal_ids, [1e-2, 1e-1])
        assert got.cmc[name] == pytest.approx(want_cmc, abs=1e-12)
        assert got.tpir[name] == pytest.approx(want_tpir, abs=1e-12)
        mated[name] = int(np.isin(probe_ids, gal_ids).sum())
        assert got.gallery_templates[name] == gal_u.size
    assert got.mated == mated and got.probe_templates == probe_u.size
    total = sum(mated.values())
    for r in (1, 5, 10):  # the mean pools the mated probes of both galleries (ijb_evals' "[Mean]")
        assert got.cmc["mean"][r] == pytest.approx(sum(got.cmc[g][r] * mated[g] for g in mated) / total)
    for f in (1e-2, 1e-1):
        assert got.tpir["mean"][f] == pytest.approx((got.tpir["G1"][f] + got.tpir["G2"][f]) / 2)


# ----------------------------------------------------------------------------------------------------
# Meta files
# ----------------------------------------------------------------------------------------------------


def test_read_ijb_meta_on_the_synthetic_release(release: Path) -> None:
    meta = ijb.read_ijb_meta(release, "IJBC")
    lines = (release / "meta" / "ijbc_face_tid_mid.txt").read_text().split()
    assert meta.names == lines[0::3]
    np.testing.assert_array_equal(meta.templates, np.array(lines[1::3], int))
    np.testing.assert_array_equal(meta.medias, np.array(lines[2::3], int))
    lmk = np.loadtxt(release / "meta" / "ijbc_name_5pts_score.txt", dtype=str)
    np.testing.assert_array_equal(meta.landmarks.reshape(-1, 10), lmk[:, 1:11].astype(np.float32))
    np.testing.assert_array_equal(meta.detector_scores, lmk[:, 11].astype(np.float32))
    pairs = np.loadtxt(release / "meta" / "ijbc_template_pair_label.txt", dtype=np.int64)
    np.testing.assert_array_equal(np.c_[meta.t1, meta.t2, meta.labels], pairs)
    counts = meta.counts()
    assert counts["images"] == len(lines) // 3 and counts["pairs"] == len(pairs)
    assert counts["genuine"] == int(pairs[:, 2].sum()) and set(meta.galleries) == {"G1", "G2"}
    assert meta.probe is not None and counts["probe_templates"] == np.unique(meta.probe[0]).size
    assert ijb.check_counts(counts, "IJBC") and not ijb.check_counts(ijb.OFFICIAL_COUNTS["IJBB"], "IJBB")
    with pytest.raises(ijb.IJBMetaError, match=r"ijbb_face_tid_mid.txt: no such file"):
        ijb.read_ijb_meta(release, "IJBB")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("1 2 1\n3 4 0\n5 6 1 7\n", 3, "expected 3 fields"),
        ("1 2 1\n3 4\n5 6 1\n", 2, "expected 3 fields"),
        ("1 2 1\n3 x 0\n", 2, "integer template ids"),
        ("1 2 1\n3 4 2\n", 2, "label of 0 or 1"),
        ("1 2 1\n3 4 0.5\n", 2, "label of 0 or 1"),
        ("1 -2 1\n", 1, "non-negative"),
        ("1 2 1\n\n3 4 0 0\n", 3, "found 4"),  # the blank line is skipped, not blamed
    ],
)
def test_pair_file_errors_name_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = _write(tmp_path / "ijbc_template_pair_label.txt", text)
    with pytest.raises(ijb.IJBMetaError, match=rf"ijbc_template_pair_label.txt:{line}: .*{what}"):
        ijb.read_template_pair_list(path)


def test_blank_lines_and_crlf_are_read_like_pandas(tmp_path: Path) -> None:
    t1, t2, labels = ijb.read_template_pair_list(_write(tmp_path / "p.txt", "1 2 1\r\n\n3 4 0\r\n"))
    np.testing.assert_array_equal(np.c_[t1, t2, labels], [[1, 2, 1], [3, 4, 0]])
    names, tpl, med = ijb.read_face_tid_mid(_write(tmp_path / "f.txt", "a.jpg 3 1\n\nb.jpg\t4 2\n"))
    assert names == ["a.jpg", "b.jpg"] and tpl.tolist() == [3, 4] and med.tolist() == [1, 2]


def test_non_ascii_pair_files_are_read_without_numpy(tmp_path: Path) -> None:
    # numpy 2.4's np.loadtxt on this file (17 bytes the IJB fuzz test drew) kills the interpreter
    # with SIGSEGV; the reader must refuse it with its own error instead.
    crash = tmp_path / "ijbc_template_pair_label.txt"
    crash.write_bytes(b"\xe3\x80\x80\n\xf3\xaf\x97\x95\xc3\x86\n3 3 0\n")
    with pytest.raises(ijb.IJBMetaError, match=r"ijbc_template_pair_label.txt:2: expected 3 fields"):
        ijb.read_template_pair_list(crash)
    # Unicode whitespace still separates fields and blank lines are still skipped, as in the ASCII path.
    t1, t2, labels = ijb.read_template_pair_list(_write(tmp_path / "u.txt", "1\u30002 1\n\u3000\n3\xa04 0\n"))
    np.testing.assert_array_equal(np.c_[t1, t2, labels], [[1, 2, 1], [3, 4, 0]])
    assert t1.dtype == t2.dtype == np.int64 and labels.dtype == np.bool_
    with pytest.raises(ijb.IJBMetaError, match=r"u2.txt:2: .*label of 0 or 1"):
        ijb.read_template_pair_list(_write(tmp_path / "u2.txt", "1 2 1\n3\u30004 2\n"))
    with pytest.raises(ijb.IJBMetaError, match=r"u3.txt: no data lines"):
        ijb.read_template_pair_list(_write(tmp_path / "u3.txt", "\u3000\n \n"))


def test_per_face_file_errors_name_file_and_line(tmp_path: Path) -> None:
    face = _write(tmp_path / "face.txt", "1.jpg 3 1\n2.jpg 3\n")
    with pytest.raises(ijb.IJBMetaError, match=r"face.txt:2: expected 3 fields"):
        ijb.read_face_tid_mid(face)
    face = _write(tmp_path / "face.txt", "1.jpg 3 1\n2.jpg 3 -1\n")
    with pytest.raises(ijb.IJBMetaError, match=r"face.txt:2: .*'-1' is not valid"):
        ijb.read_face_tid_mid(face)
    good = "1.jpg " + " ".join(["10.5"] * 10) + " 0.9\n"
    pts = _write(tmp_path / "pts.txt", good + "2.jpg " + " ".join(["10.5"] * 9) + " 0.9\n")
    with pytest.raises(ijb.IJBMetaError, match=r"pts.txt:2: expected 12 fields"):
        ijb.read_name_5pts_score(pts)
    pts = _write(tmp_path / "pts.txt", good + good + "3.jpg " + " ".join(["nan"] * 10) + " 0.9\n")
    with pytest.raises(ijb.IJBMetaError, match=r"pts.txt:3: .*'nan' is not valid"):
        ijb.read_name_5pts_score(pts)
    with pytest.raises(ijb.IJBMetaError, match=r"empty"):
        ijb.read_name_5pts_score(_write(tmp_path / "empty.txt", "\n"))


def test_subject_file_errors_name_file_and_line(tmp_path: Path) -> None:
    head = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    ok = ijb.read_template_subject_list(
        _write(tmp_path / "g.csv", head + "5,1,a.jpg\n5,1,b.jpg\n7,2,c.jpg\n")
    )
    np.testing.assert_array_equal(ok[0], [5, 5, 7])
    np.testing.assert_array_equal(ok[1], [1, 1, 2])
    with pytest.raises(ijb.IJBMetaError, match=r"g.csv:1: expected a header"):
        ijb.read_template_subject_list(_write(tmp_path / "g.csv", "5,1,a.jpg\n"))
    with pytest.raises(ijb.IJBMetaError, match=r"g.csv:3: expected TEMPLATE_ID,SUBJECT_ID integers"):
        ijb.read_template_subject_list(_write(tmp_path / "g.csv", head + "5,1,a\nx,1,b\n"))
    with pytest.raises(
        ijb.IJBMetaError, match=r"g.csv:4: template 5 has subject 3 here but subject 1 on line 2"
    ):
        ijb.read_template_subject_list(_write(tmp_path / "g.csv", head + "5,1,a\n6,2,b\n5,3,c\n"))


def test_release_cross_checks_name_the_files(release: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "IJBC"
    shutil.copytree(release / "meta", copy / "meta")
    meta = copy / "meta"
    pairs = meta / "ijbc_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "999999 3 0\n")
    n_pairs = len(pairs.read_text().splitlines())
    with pytest.raises(
        ijb.IJBMetaError, match=rf"ijbc_template_pair_label.txt:{n_pairs}: first template 999999"
    ):
        ijb.read_ijb_meta(copy)
    shutil.copy(release / "meta" / "ijbc_template_pair_label.txt", pairs)
    pts = meta / "ijbc_name_5pts_score.txt"
    lines = pts.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    pts.write_text("\n".join(lines) + "\n")
    with pytest.raises(ijb.IJBMetaError, match=r"ijbc_name_5pts_score.txt:2: .*same order"):
        ijb.read_ijb_meta(copy)
    shutil.copy(release / "meta" / "ijbc_name_5pts_score.txt", pts)
    (meta / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(ijb.IJBMetaError, match=r"1:N files incomplete: missing .*ijbc_1N_gallery_G2.csv"):
        ijb.read_ijb_meta(copy)
    (meta / "ijbc_1N_gallery_G1.csv").unlink()
    (meta / "ijbc_1N_probe_mixed.csv").unlink()
    assert ijb.read_ijb_meta(copy).probe is None  # 1:1 only


# ----------------------------------------------------------------------------------------------------
# Images -> embeddings -> the whole evaluation, and the cache
# ----------------------------------------------------------------------------------------------------


def test_extract_features_aligns_and_embeds_like_insightface(release: Path) -> None:
    meta = ijb.read_ijb_meta(release)
    torch.manual_seed(0)
    model = create_model("iresnet_tiny").eval()
    names, lmk = meta.names[:12], meta.landmarks[:12]
    emb, flip = ijb.extract_features(model, release / "loose_crop", names, lmk, batch_size=5, num_workers=2)
    faces = []
    for name, points in zip(names, lmk):
        bgr = cv2.imread(str(release / "loose_crop" / name))
        faces.append(
            norm_crop(bgr, points)[:, :, ::-1].transpose(2, 0, 1)
        )  # insightface: align BGR, then RGB
    views = embed_views(model, np.stack(faces), batch_size=12)
    assert emb.shape == (12, 512) and emb.dtype == np.float32
    tol = 1e-5 * float(np.abs(views).max())  # other batch sizes: other float summation orders
    np.testing.assert_allclose(emb, views[0], atol=tol)
    np.testing.assert_allclose(flip, views[1], atol=tol)
    single, _ = ijb.extract_features(model, release / "loose_crop", names[:3], lmk[:3], num_workers=0)
    np.testing.assert_allclose(single, emb[:3], atol=tol)
    with pytest.raises(FileNotFoundError, match=r"nope.jpg"):
        ijb.extract_features(model, release / "loose_crop", ["nope.jpg"], lmk[:1], num_workers=0)


def test_evaluate_ijb_equals_the_reference_pipeline(release: Path) -> None:
    meta = ijb.read_ijb_meta(release)
    rng = np.random.default_rng(7)
    n = len(meta.names)
    subject = {int(t): i for i, t in enumerate(np.unique(meta.templates))}
    base = rng.standard_normal((len(subject), 32))
    emb = np.array([base[subject[int(t)]] + rng.standard_normal(32) for t in meta.templates], np.float32)
    flip = (emb + 0.3 * rng.standard_normal(emb.shape)).astype(np.float32)
    result = ijb.evaluate_ijb(meta, emb, flip, use_norm_score=False)
    feats = ref_image_features(emb, flip, meta.detector_scores, True, False, True)
    tf, tu = ref_template_features(feats, meta.templates, meta.medias)
    want = ref_verification(tf, tu, meta.t1, meta.t2)
    np.testing.assert_allclose(result.scores, want, atol=1e-5)
    fars = list(ijb.DEFAULT_FARS)
    assert list(result.tar.nearest.values()) == ref_nearest_table(meta.labels, result.scores, fars)
    assert result.switches == {"use_flip_test": True, "use_norm_score": False, "use_detector_score": True}
    assert result.test_mode == "N0D1F1" and result.identification is not None
    summary = result.to_dict()
    assert summary["counts"]["images"] == n and set(summary["identification"]["cmc"]) == {"G1", "G2", "mean"}
    with pytest.raises(ValueError, match=r"one per face"):
        ijb.evaluate_ijb(meta, emb[:-1], flip[:-1])


def test_feature_cache_round_trip_and_fingerprint(release: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights one")
    lst = release / "meta" / "ijbc_name_5pts_score.txt"
    fp = ijb.feature_fingerprint(model, lst, "iresnet_tiny")
    assert fp == ijb.feature_fingerprint(model, lst, "iresnet_tiny")
    assert fp != ijb.feature_fingerprint(model, lst, "iresnet50")
    assert fp != ijb.feature_fingerprint(model, release / "meta" / "ijbc_face_tid_mid.txt", "iresnet_tiny")
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "cache.npz"
    assert ijb.load_feature_cache(path, fp) is None
    ijb.save_feature_cache(path, fp, emb, -emb, np.ones(3))
    got = ijb.load_feature_cache(path, fp)
    assert got is not None
    np.testing.assert_array_equal(got[0], emb)
    np.testing.assert_array_equal(got[1], -emb)
    model.write_bytes(b"weights two")
    assert ijb.load_feature_cache(path, ijb.feature_fingerprint(model, lst, "iresnet_tiny")) is None
    path.write_bytes(b"not a zip")
    with pytest.raises(ijb.IJBMetaError, match=r"not a readable feature cache"):
        ijb.load_feature_cache(path, fp)


def test_write_roc_csv_and_tables(tmp_path: Path) -> None:
    labels = np.r_[np.ones(20, bool), np.zeros(200, bool)]
    scores = np.r_[np.linspace(0.3, 0.9, 20), np.linspace(-0.5, 0.5, 200)]
    readout = ijb.tar_at_far_readout(labels, scores)
    files = ijb.write_roc(tmp_path / "ijbc_roc", readout, "test")
    assert [Path(f).name for f in files] == ["ijbc_roc.csv", "ijbc_roc.png", "ijbc_roc.pdf"]
    assert Path(files[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(files[2]).read_bytes()[:5] == b"%PDF-"
    rows = np.loadtxt(files[0], delimiter=",", skiprows=1)
    np.testing.assert_allclose(rows[:, 0], readout.fpr, rtol=1e-9)
    np.testing.assert_allclose(rows[:, 1], readout.tpr, rtol=1e-9)
    table = ijb.format_tar_table(readout, "job-IJBC")
    assert "| job-IJBC | 1e-06 |" in table
    assert f"| nearest (insightface) | {readout.nearest[1e-6] * 100:.2f} |" in table
