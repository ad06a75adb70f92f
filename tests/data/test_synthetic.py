"""facems.data.synthetic: determinism, geometry of the landmarks, loose crops and the difficulty knobs."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import cv2
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from facems.data.synthetic import (
    Nuisance,
    SyntheticFaces,
    render_face,
    render_loose_crop,
    sample_identity,
    sample_nuisance,
)

# The ArcFace 112x112 template, written out here rather than imported, as an independent reference.
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
NEUTRAL = Nuisance()


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (2x3) taking ``src`` points onto ``dst``: d ~ (p + i q) s + t."""
    s = src - src.mean(0)
    d = dst - dst.mean(0)
    den = (s**2).sum()
    p = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum() / den
    q = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / den
    lin = np.array([[p, -q], [q, p]])
    return np.concatenate([lin, (dst.mean(0) - lin @ src.mean(0))[:, None]], axis=1)


def _to_template(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    m = _similarity(landmarks.astype(np.float64), TEMPLATE)
    return cv2.warpAffine(image, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def _grey28(images: list[np.ndarray]) -> np.ndarray:
    """The non-learned descriptor: 28x28 grey pixels, float64 [N, 784]."""
    out = [
        cv2.resize(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), (28, 28), interpolation=cv2.INTER_AREA)
        for im in images
    ]
    return np.stack(out).reshape(len(images), -1).astype(np.float64)


def _pairs(num_ids: int, per_id: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` genuine then ``n`` impostor pairs of item indices, and the labels (1 genuine)."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, num_ids, n)
    a = rng.integers(0, per_id, n)
    b = (a + rng.integers(1, per_id, n)) % per_id
    k1 = rng.integers(0, num_ids, n)
    k2 = (k1 + rng.integers(1, num_ids, n)) % num_ids
    first = np.concatenate([k * per_id + a, k1 * per_id + rng.integers(0, per_id, n)])
    second = np.concatenate([k * per_id + b, k2 * per_id + rng.integers(0, per_id, n)])
    return first, second, np.concatenate([np.ones(n), np.zeros(n)])


def _verification(
    features: np.ndarray, first: np.ndarray, second: np.ndarray, same: np.ndarray
) -> tuple[float, float]:
    """(best-threshold accuracy, genuine mean - impostor mean) of cosine similarity on the pairs."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    scores = (f[first] * f[second]).sum(1)
    # Every score as a threshold, every pair compared: a plain, quadratic but obviously right search.
    acc = ((scores[None, :] >= scores[:, None]) == (same[None, :] == 1)).mean(axis=1).max()
    return float(acc), float(scores[same == 1].mean() - scores[same == 0].mean())


def _on_pupils(image: np.ndarray, landmarks: np.ndarray) -> bool:
    """Whether a dark (pupil) pixel lies within one pixel of each eye landmark."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(int)
    near = [
        grey[round(y) - 1 : round(y) + 2, round(x) - 1 : round(x) + 2].min()
        for x, y in landmarks[:2].tolist()
    ]
    return max(near) < 60


def _set_images(ds: SyntheticFaces) -> list[np.ndarray]:
    return [ds[i][0] for i in range(len(ds))]


# --------------------------------------------------------------------------------------------------
# Items, determinism, independence


def test_items_have_documented_types_and_labels() -> None:
    ds = SyntheticFaces(3, 4, seed=0)
    assert len(ds) == 12
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(3), 4))
    assert ds.labels.dtype == np.int64
    for i in (0, 5, 11, -1):
        image, label, landmarks = ds[i]
        assert image.shape == (112, 112, 3) and image.dtype == np.uint8
        assert landmarks.shape == (5, 2) and landmarks.dtype == np.float32
        assert isinstance(label, int) and label == ds.labels[i]
    assert np.array_equal(ds[-1][0], ds[11][0])
    with pytest.raises(IndexError, match="12"):
        ds[12]


def test_same_seed_same_bytes_other_seed_other_images() -> None:
    a, b = SyntheticFaces(4, 3, seed=11), SyntheticFaces(4, 3, seed=11)
    c = SyntheticFaces(4, 3, seed=12)
    for i in range(len(a)):
        ia, ib, ic = a[i], b[i], c[i]
        assert ia[0].tobytes() == ib[0].tobytes()
        assert ia[2].tobytes() == ib[2].tobytes()
        assert np.abs(ia[0].astype(int) - ic[0].astype(int)).mean() > 5.0
    assert a.identity(0) == b.identity(0) != c.identity(0)


def test_items_do_not_depend_on_generation_order() -> None:
    fresh = SyntheticFaces(5, 4, seed=3)
    used = SyntheticFaces(5, 4, seed=3)
    for i in np.random.default_rng(0).permutation(len(used)):
        used[int(i)]
    for i in (0, 7, 19):
        assert fresh[i][0].tobytes() == SyntheticFaces(5, 4, seed=3)[i][0].tobytes() == used[i][0].tobytes()


def test_identity_offset_selects_global_identities() -> None:
    whole = SyntheticFaces(8, 2, seed=5)
    tail = SyntheticFaces(3, 2, seed=5, identity_offset=5)
    assert tail.identity(0) == whole.identity(5)
    assert tail[1][0].tobytes() == whole[11][0].tobytes()
    assert tail[1][1] == 0  # labels stay 0-based within a set
    # Disjoint ranges: distinct people.
    people = [whole.identity(k) for k in range(5)] + [tail.identity(k) for k in range(3)]
    assert len({p.skin_rgb + p.eye_size + p.head_axes for p in people}) == 8


def test_difficulty_zero_gives_one_clean_image_per_identity() -> None:
    ds = SyntheticFaces(2, 3, seed=1, difficulty=0.0)
    assert ds[0][0].tobytes() == ds[1][0].tobytes() == ds[2][0].tobytes()
    assert ds[0][0].tobytes() != ds[3][0].tobytes()
    nz = sample_nuisance(np.random.default_rng(0), strength=0.0)
    assert (nz.yaw, nz.pitch, nz.roll, nz.blur_sigma, nz.noise_sigma, nz.occlusion) == (0, 0, 0, 0, 0, 0)


def test_samplers_are_functions_of_the_generator_state() -> None:
    assert sample_identity(np.random.default_rng(7)) == sample_identity(np.random.default_rng(7))
    assert sample_identity(np.random.default_rng(7)) != sample_identity(np.random.default_rng(8))
    # A fixed number of draws whatever the knobs: the next draw is the same.
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    sample_nuisance(r1, strength=0.0)
    sample_nuisance(r2, strength=2.0, pose_scale=3.0, age_scale=4.0)
    assert r1.random() == r2.random()


def test_knobs_scale_the_nuisance_spread() -> None:
    def draws(**kw: float) -> list[Nuisance]:
        rng = np.random.default_rng(0)
        return [sample_nuisance(rng, **kw) for _ in range(3000)]

    base, posed, aged = draws(), draws(pose_scale=3.0), draws(age_scale=3.0)
    yaw_base = np.std([n.yaw for n in base])
    assert np.std([n.yaw for n in posed]) == pytest.approx(3.0 * yaw_base, rel=0.1)
    assert np.mean([n.age for n in aged]) > 2.5 * np.mean([n.age for n in base])
    assert max(abs(n.yaw) for n in posed) <= 45.0
    assert all(0 <= n.occlusion <= 3 and 20 <= n.jpeg_quality <= 100 for n in base)
    assert 0.05 < np.mean([n.occlusion > 0 for n in base]) < 0.25


@pytest.mark.parametrize(
    "call",
    [
        lambda: SyntheticFaces(0, 2, seed=0),
        lambda: SyntheticFaces(2, 2, seed=-1),
        lambda: SyntheticFaces(2, 2, seed=0, difficulty=-0.5),
        lambda: SyntheticFaces(2, 2, seed=0, pose_scale=float("nan")),
        lambda: sample_nuisance(np.random.default_rng(0), strength=-1.0),
        lambda: render_loose_crop(
            sample_identity(np.random.default_rng(0)), NEUTRAL, np.random.default_rng(0), (32, 160)
        ),
    ],
)
def test_bad_arguments_are_rejected(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        call()


# --------------------------------------------------------------------------------------------------
# Landmarks and geometry


def test_frontal_landmarks_lie_near_the_template_and_on_the_pupils() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        image, landmarks = render_face(sample_identity(rng), NEUTRAL)
        assert np.abs(landmarks - TEMPLATE).max() < 3.0
        assert _on_pupils(image, landmarks)


def test_landmarks_stay_inside_the_image_at_cplfw_like_pose() -> None:
    ds = SyntheticFaces(30, 4, seed=2, difficulty=1.0, pose_scale=3.0)
    for i in range(len(ds)):
        landmarks = ds[i][2]
        assert np.all(landmarks >= 0.0) and np.all(landmarks <= 111.0)


def test_roll_rotates_the_landmarks_about_the_head_centre() -> None:
    ident = sample_identity(np.random.default_rng(4))
    _, frontal = render_face(ident, NEUTRAL)
    cx, cy = ident.head_center
    for roll in (-12.0, 7.0):
        image, landmarks = render_face(ident, dataclasses.replace(NEUTRAL, roll=roll))
        t = math.radians(roll)  # clockwise on screen, with y pointing down
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        expected = (frontal - (cx, cy)) @ rot.T + (cx, cy)
        np.testing.assert_allclose(landmarks, expected, atol=1e-3)
        (x0, y0), (x1, y1) = frontal[0], frontal[1]
        (u0, v0), (u1, v1) = landmarks[0], landmarks[1]
        turn = math.degrees(math.atan2(v1 - v0, u1 - u0) - math.atan2(y1 - y0, x1 - x0))
        assert turn == pytest.approx(roll, abs=1e-3)
        assert _on_pupils(image, landmarks)


def test_yaw_pitch_and_jitter_move_the_landmarks_as_documented() -> None:
    ident = sample_identity(np.random.default_rng(9))
    _, frontal = render_face(ident, NEUTRAL)
    _, right = render_face(ident, dataclasses.replace(NEUTRAL, yaw=20.0))
    dx = right[:, 0] - frontal[:, 0]
    assert np.all(dx > 3.0)
    assert dx[2] > dx[[0, 1]].max()  # the nose tip sticks out furthest, so it moves most
    _, up = render_face(ident, dataclasses.replace(NEUTRAL, pitch=15.0))
    assert np.all(up[:, 1] < frontal[:, 1] - 2.0)
    _, jit = render_face(ident, dataclasses.replace(NEUTRAL, shift=(2.5, -1.5), scale=1.1))
    np.testing.assert_allclose(jit, (frontal - 56.0) * 1.1 + 56.0 + (2.5, -1.5), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Photometric nuisances and occlusion


def test_gain_noise_and_blur_act_as_described() -> None:
    ident = sample_identity(np.random.default_rng(21))
    clean, _ = render_face(ident, NEUTRAL)
    bright, _ = render_face(ident, dataclasses.replace(NEUTRAL, gain=1.2))
    ok = clean < 200
    ratio = bright[ok].astype(float) / np.maximum(clean[ok], 1)
    assert np.median(ratio[clean[ok] > 40]) == pytest.approx(1.2, abs=0.02)
    noisy, _ = render_face(ident, dataclasses.replace(NEUTRAL, noise_sigma=6.0, noise_seed=3))
    diff = noisy.astype(float) - clean
    mid = (clean > 30) & (clean < 225)  # away from clipping
    assert diff[mid].std() == pytest.approx(6.0, rel=0.1) and abs(diff[mid].mean()) < 0.5
    blurred, _ = render_face(ident, dataclasses.replace(NEUTRAL, blur_sigma=1.5))
    reference = cv2.GaussianBlur(clean, (0, 0), 1.5)
    assert np.abs(blurred.astype(int) - reference).mean() < 1.0
    assert np.abs(blurred.astype(int) - clean).mean() > 2.0


def test_light_gradient_brightens_towards_its_direction() -> None:
    ident = sample_identity(np.random.default_rng(22))
    clean, _ = render_face(ident, NEUTRAL)
    lit, _ = render_face(ident, dataclasses.replace(NEUTRAL, light_angle=0.0, light_strength=0.4))
    gain = lit.astype(float) / np.maximum(clean, 1)
    ok = (clean > 40) & (clean < 180)
    left = np.median(gain[:, :20][ok[:, :20]])
    right = np.median(gain[:, -20:][ok[:, -20:]])
    assert left == pytest.approx(1.0 - 0.4 * 46.5 / 56.0, abs=0.05)  # columns 0-19 average x = 9.5
    assert right == pytest.approx(1.0 + 0.4 * 45.5 / 56.0, abs=0.05)


def test_occluders_cover_what_they_should() -> None:
    ident = sample_identity(np.random.default_rng(31))
    clean, landmarks = render_face(ident, NEUTRAL)
    shades, _ = render_face(ident, dataclasses.replace(NEUTRAL, occlusion=1, occluder_rgb=(20.0, 30.0, 40.0)))
    for x, y in landmarks[:2].tolist():
        np.testing.assert_array_equal(shades[round(y), round(x)], (20, 30, 40))
    band = dataclasses.replace(
        NEUTRAL, occlusion=2, occluder=(56.0, 90.0, 30.0, 8.0, 0.0), occluder_rgb=(200.0, 10.0, 10.0)
    )
    covered, _ = render_face(ident, band)
    assert np.all(covered[84:97, 28:85] == (200, 10, 10))
    np.testing.assert_array_equal(covered[:70], clean[:70])  # nothing else changed


# --------------------------------------------------------------------------------------------------
# Loose crops


def test_loose_crop_aligns_back_to_the_aligned_render() -> None:
    ds = SyntheticFaces(6, 2, seed=8)
    ident = [ds.identity(k) for k in range(6)]
    for k in range(6):
        nz = dataclasses.replace(ds.nuisance(2 * k), noise_sigma=0.0)
        aligned, lm_aligned = render_face(ident[k], nz)
        loose, lm_loose = render_loose_crop(ident[k], nz, np.random.default_rng(k), size=(176, 144))
        assert loose.shape == (144, 176, 3) and loose.dtype == np.uint8
        assert np.all(lm_loose >= 0) and np.all(lm_loose[:, 0] < 176) and np.all(lm_loose[:, 1] < 144)
        # The loose landmarks are the aligned ones under one similarity transform.
        m = _similarity(lm_aligned.astype(np.float64), lm_loose.astype(np.float64))
        np.testing.assert_allclose(lm_aligned @ m[:, :2].T + m[:, 2], lm_loose, atol=1e-3)
        # Aligning both with their landmarks gives nearly the same face; another person is far off.
        face = np.s_[40:100, 30:82]  # inside the head: no background
        same = _to_template(loose, lm_loose)[face].astype(float)
        target = _to_template(aligned, lm_aligned)[face].astype(float)
        other, lm_other = render_face(ident[(k + 1) % 6], nz)
        other_t = _to_template(other, lm_other)[face].astype(float)
        d_same, d_other = np.abs(same - target).mean(), np.abs(other_t - target).mean()
        assert d_same < 6.0 and d_same < 0.4 * d_other, (k, d_same, d_other)


def test_loose_items_are_deterministic() -> None:
    a, b = SyntheticFaces(2, 2, seed=4), SyntheticFaces(2, 2, seed=4)
    img_a, label, lm_a = a.loose_item(3)
    img_b, _, lm_b = b.loose_item(3)
    assert label == 1 and img_a.shape == (160, 160, 3)
    assert img_a.tobytes() == img_b.tobytes() and lm_a.tobytes() == lm_b.tobytes()


# --------------------------------------------------------------------------------------------------
# Difficulty: identity is recoverable, but not from raw pixels alone


def test_difficulty_proxies_raw_pixels_and_lda() -> None:
    ids, per_id = 100, 6
    first, second, same = _pairs(ids, per_id, 300, seed=0)
    raw = {}
    for difficulty in (0.5, 1.0, 2.0):
        test = SyntheticFaces(ids, per_id, seed=1, difficulty=difficulty, identity_offset=10_000)
        raw[difficulty] = _verification(_grey28(_set_images(test)), first, second, same)
        if difficulty == 1.0:
            x_test = _grey28(_set_images(test))
    acc, gap = raw[1.0]
    # Measured 0.65-0.68 over four data seeds (0.80-0.86 at 0.5, 0.57-0.61 at 2); LDA 0.81-0.83.
    assert 0.58 < acc < 0.78
    assert gap > 0.0  # genuine pairs are closer than impostor pairs on average
    assert raw[0.5][0] > acc + 0.05 and acc > raw[2.0][0] + 0.04  # harder -> less accurate

    # A linear projection learned on other identities (PCA + LDA) recovers much more identity signal.
    train = SyntheticFaces(120, 8, seed=1, difficulty=1.0)
    x_train = _grey28(_set_images(train))
    pca = PCA(100, random_state=0).fit(x_train)
    lda = LinearDiscriminantAnalysis().fit(pca.transform(x_train), train.labels)
    lda_acc, lda_gap = _verification(lda.transform(pca.transform(x_test)), first, second, same)
    assert lda_acc > acc + 0.08 and lda_gap > 0.0


def test_knob_sequences_pick_per_image_index() -> None:
    mixed = SyntheticFaces(3, 6, seed=5, pose_scale=[1.0, 3.0], age_scale=(1.0, 1.0, 4.0))
    sets = {
        (p, a): SyntheticFaces(3, 6, seed=5, pose_scale=p, age_scale=a)
        for p in (1.0, 3.0)
        for a in (1.0, 4.0)
    }
    for i in range(len(mixed)):
        j = i % 6
        same = sets[(3.0 if j % 2 else 1.0, 4.0 if j % 3 == 2 else 1.0)]
        assert mixed.nuisance(i) == same.nuisance(i)
        assert np.array_equal(mixed[i][0], same[i][0])
    assert mixed.identity(1) == sets[(1.0, 1.0)].identity(1)  # the same people
    with pytest.raises(ValueError, match="non-empty sequence"):
        SyntheticFaces(3, 6, seed=5, pose_scale=[])
    with pytest.raises(ValueError, match="pose_scale must be a finite number"):
        SyntheticFaces(3, 6, seed=5, pose_scale=[1.0, -2.0])
