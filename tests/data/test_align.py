"""facems.data.align against insightface's own face_align (which uses scikit-image's Umeyama)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facems.data.align import ARCFACE_TEMPLATE, estimate_norm, landmarks68_to_5, norm_crop

face_align = pytest.importorskip("insightface.utils.face_align")

# scikit-image >= 0.26 deprecates SimilarityTransform.estimate, which insightface calls.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


def _plausible_landmarks(rng: np.random.Generator, img_h: int, img_w: int) -> np.ndarray:
    """The 112x112 template rotated, scaled, shifted and jittered so that the face lies in the image."""
    scale = rng.uniform(0.6, 2.5)
    angle = math.radians(rng.uniform(-45.0, 45.0))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = (ARCFACE_TEMPLATE.astype(np.float64) - 56.0) @ rot.T * scale
    pts += rng.normal(0.0, 2.0 * scale, size=pts.shape)  # per-point jitter (pose, detector noise)
    centre = rng.uniform([0.3 * img_w, 0.3 * img_h], [0.7 * img_w, 0.7 * img_h])
    pts = pts + centre
    if rng.random() < 0.1:  # now and then landmarks in mirrored order
        pts = pts[[1, 0, 2, 4, 3]]
    return pts


CASES = list(range(60))


@pytest.mark.parametrize("case", CASES)
def test_norm_crop_matches_insightface(case: int) -> None:
    rng = np.random.default_rng(1000 + case)
    img_h, img_w = int(rng.integers(150, 400)), int(rng.integers(150, 400))
    img = rng.integers(0, 256, size=(img_h, img_w, 3), dtype=np.uint8)
    lmk = _plausible_landmarks(rng, img_h, img_w)
    image_size = [112, 224, 128, 256][case % 4]

    m_ref = face_align.estimate_norm(lmk, image_size)
    m = estimate_norm(lmk, image_size)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, m_ref, rtol=0, atol=1e-6)

    crop_ref = face_align.norm_crop(img, lmk, image_size)
    crop = norm_crop(img, lmk, image_size)
    assert crop.shape == (image_size, image_size, 3) and crop.dtype == np.uint8
    diff = np.abs(crop.astype(np.int16) - crop_ref.astype(np.int16))
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.001 * diff.size


@pytest.mark.parametrize("case", range(12))
def test_float32_landmarks_and_grey_images_match_insightface(case: int) -> None:
    # insightface runs scikit-image in the landmarks' dtype (float32 here); we compute in float64.
    rng = np.random.default_rng(2000 + case)
    img = rng.integers(0, 256, size=(240, 260), dtype=np.uint8)
    lmk = _plausible_landmarks(rng, 240, 260).astype(np.float32)
    image_size = [112, 224, 128][case % 3]
    np.testing.assert_allclose(
        estimate_norm(lmk, image_size), face_align.estimate_norm(lmk, image_size), rtol=0, atol=1e-4
    )
    crop = norm_crop(img, lmk, image_size)
    crop_ref = face_align.norm_crop(img, lmk, image_size)
    assert crop.shape == (image_size, image_size)
    diff = np.abs(crop.astype(np.int16) - crop_ref.astype(np.int16))
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.01 * diff.size


def test_transform_maps_similarity_images_of_the_template_exactly() -> None:
    # Landmarks that are an exact similarity image of the template must land back on it.
    rng = np.random.default_rng(7)
    for image_size, ratio, shift in [(112, 1.0, 0.0), (224, 2.0, 0.0), (128, 1.0, 8.0), (256, 2.0, 16.0)]:
        angle = rng.uniform(-1.0, 1.0)
        scale = rng.uniform(0.5, 3.0)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        lmk = ARCFACE_TEMPLATE.astype(np.float64) @ rot.T * scale + rng.uniform(-50, 50, size=2)
        m = estimate_norm(lmk, image_size)
        mapped = lmk @ m[:, :2].T + m[:, 2]
        expected = ARCFACE_TEMPLATE.astype(np.float64) * ratio + [shift, 0.0]
        np.testing.assert_allclose(mapped, expected, rtol=0, atol=1e-4)  # template is float32
        # The linear part is scale * rotation with det > 0 (never a reflection).
        assert m[0, 0] == pytest.approx(m[1, 1]) and m[0, 1] == pytest.approx(-m[1, 0])
        assert m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0] == pytest.approx((ratio / scale) ** 2, rel=1e-5)


def test_identity_landmarks_give_the_template_crop() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    m = estimate_norm(ARCFACE_TEMPLATE, 112)
    # The template's own mean is taken in float32 (as insightface does): 1.5e-6 px of slack.
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-5)
    np.testing.assert_array_equal(norm_crop(img, ARCFACE_TEMPLATE.astype(np.float64), 112), img)


def test_landmarks68_to_5_hand_made_example() -> None:
    pts = np.full((68, 2), 1000.0)  # every unused point far away, so a wrong index shows
    pts[36:42] = [[28, 40], [30, 38], [32, 38], [34, 40], [32, 42], [30, 42]]  # mean (31, 40)
    pts[42:48] = [[66, 41], [68, 39], [70, 39], [72, 41], [70, 43], [68, 43]]  # mean (69, 41)
    pts[30] = [50, 60]
    pts[48] = [36, 80]
    pts[54] = [64, 81]
    pts[31:36] = [[45, 65], [47, 66], [50, 66], [53, 66], [55, 65]]  # nostrils: not the nose tip
    expected = np.array([[31, 40], [69, 41], [50, 60], [36, 80], [64, 81]], dtype=np.float64)
    out = landmarks68_to_5(pts)
    assert out.shape == (5, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, atol=1e-12)
    np.testing.assert_allclose(landmarks68_to_5(pts.astype(np.int32)), expected, atol=1e-12)


@pytest.mark.parametrize(
    ("lmk", "match"),
    [
        (np.zeros((4, 2)), r"landmarks5: expected shape \(5, 2\)"),
        (np.zeros((5, 3)), r"landmarks5: expected shape \(5, 2\)"),
        (np.array([[np.nan, 0]] + [[1.0, 2.0]] * 4), "landmarks5: expected finite"),
        (np.array([[np.inf, 0]] + [[1.0, 2.0]] * 4), "landmarks5: expected finite"),
        (np.full((5, 2), 3.0), "all points coincide"),
        (np.array([["a", "b"]] * 5), "real-valued"),
    ],
)
def test_estimate_norm_rejects_bad_landmarks(lmk: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        estimate_norm(lmk)


@pytest.mark.parametrize("image_size", [0, -112, 100, 113, 112.0, True])
def test_estimate_norm_rejects_bad_image_size(image_size: object) -> None:
    with pytest.raises(ValueError, match="image_size"):
        estimate_norm(ARCFACE_TEMPLATE, image_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("img", "match"),
    [
        (np.zeros((50, 50, 3), np.float32), "dtype uint8"),
        (np.zeros((50, 50, 4), np.uint8), r"shape \[H, W, 3\]"),
        (np.zeros((50, 50, 3, 1), np.uint8), r"shape \[H, W, 3\]"),
        (np.zeros((0, 50, 3), np.uint8), "non-empty"),
    ],
)
def test_norm_crop_rejects_bad_images(img: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        norm_crop(img, ARCFACE_TEMPLATE)


def test_landmarks68_to_5_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"pts68: expected shape \(68, 2\)"):
        landmarks68_to_5(np.zeros((5, 2)))
    bad = np.zeros((68, 2))
    bad[40, 1] = np.nan
    with pytest.raises(ValueError, match=r"pts68: expected finite.*\[40, 1\]"):
        landmarks68_to_5(bad)


def test_template_is_read_only_and_unchanged_by_calls() -> None:
    before = ARCFACE_TEMPLATE.copy()
    estimate_norm(ARCFACE_TEMPLATE, 256)
    np.testing.assert_array_equal(ARCFACE_TEMPLATE, before)
    with pytest.raises(ValueError):
        ARCFACE_TEMPLATE[0, 0] = 0.0
