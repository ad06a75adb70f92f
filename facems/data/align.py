"""5-point face alignment to the ArcFace template (112x112 and its multiples), insightface-compatible.

The crops equal insightface's ``insightface.utils.face_align.norm_crop`` pixel for pixel: the same
template, the same ``image_size`` rule (multiples of 112 scale the template; multiples of 128 scale it
and shift it 8 * ratio pixels to the right), the same least-squares similarity transform (Umeyama,
which insightface gets from ``skimage.transform.SimilarityTransform``) and the same
``cv2.warpAffine(..., borderValue=0)`` with bilinear interpolation.

The transform is computed here in closed form in float64, without scikit-image. Umeyama's
solution always has a proper rotation (never a reflection: the ``d`` sign flip when ``det(A) < 0``
guarantees ``det(R) = +1``), and its scale ``sum(S * d) / var(src)`` equals the rotation's trace gain,
so in 2-D it reduces to ``scale * R = [[p, -q], [q, p]]`` with
``p = sum(x_s x_d + y_s y_d) / sum(x_s^2 + y_s^2)`` and ``q = sum(x_s y_d - y_s x_d) / sum(x_s^2 + y_s^2)``
over the centred source (s) and destination (d) points: the complex least-squares fit
``d ~ (p + i q) s``.

Coordinates are in pixels, ``x`` to the right and ``y`` down, origin at the centre of the top-left
pixel (OpenCV's convention, which is also insightface's).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "estimate_norm", "landmarks68_to_5", "norm_crop"]

ARCFACE_TEMPLATE: np.ndarray = np.array(
    [
        [38.2946, 51.6963],  # left eye (the subject's right eye, on the left of the image)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
"""The ArcFace 5-point template for a 112x112 crop: float32 [5, 2] of (x, y) in pixels."""
ARCFACE_TEMPLATE.setflags(write=False)

# 0-based indices into the 68-point iBUG 300-W scheme (as used by dlib and face_alignment).
_LEFT_EYE_68 = slice(36, 42)
_RIGHT_EYE_68 = slice(42, 48)
_NOSE_TIP_68 = 30
_LEFT_MOUTH_68 = 48
_RIGHT_MOUTH_68 = 54


def _check_points(points: np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(points)
    if arr.shape != (n, 2):
        raise ValueError(f"{name}: expected shape ({n}, 2) of (x, y) pixels, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name}: expected finite coordinates, got {arr[bad[0], bad[1]]} at [{bad[0]}, {bad[1]}]"
        )
    return arr


def _template_for(image_size: int) -> np.ndarray:
    """The template scaled for ``image_size``, computed in float32 exactly as insightface does."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if image_size % 112 == 0:
        ratio = float(image_size) / 112.0
        diff_x = 0.0
    elif image_size % 128 == 0:
        ratio = float(image_size) / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"image_size: expected a multiple of 112 or of 128, got {image_size}")
    dst = ARCFACE_TEMPLATE * np.float32(ratio)  # float32, like insightface's arcface_dst * ratio
    dst[:, 0] += np.float32(diff_x)
    return dst


def _similarity_umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping ``src`` onto ``dst``.

    Args:
        src: float64 [n, 2] source points.
        dst: [n, 2] destination points; their mean and centring are computed in their own dtype (float32
            for the template, as scikit-image does when insightface hands it the float32 template), the
            rest in float64.

    Returns:
        float64 [2, 3] matrix ``M`` with ``dst ~ src @ M[:, :2].T + M[:, 2]``.

    Raises:
        ValueError: if all source points coincide (no transform is defined).
    """
    src_mean = src.mean(axis=0)
    dst_mean_own = dst.mean(axis=0)
    dst_c = (dst - dst_mean_own).astype(np.float64)
    dst_mean = dst_mean_own.astype(np.float64)
    src_c = src - src_mean
    src_var = float((src_c**2).sum()) / src.shape[0]
    if src_var <= 0.0:
        raise ValueError("landmarks: all points coincide; no similarity transform is defined")
    # Umeyama in 2-D: scale * R = [[p, -q], [q, p]] with p = sum(x'x + y'y), q = sum(x y' - y x') over
    # centred points, divided by sum(|src_c|^2). This is the SVD solution U diag(d) V scaled by
    # sum(S * d) / var (d flips the last axis when det(A) < 0), which scikit-image computes.
    p = float((src_c * dst_c).sum()) / src.shape[0] / src_var
    q = float((src_c[:, 0] * dst_c[:, 1] - src_c[:, 1] * dst_c[:, 0]).sum()) / src.shape[0] / src_var
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = [[p, -q], [q, p]]
    m[:, 2] = dst_mean - m[:, :2] @ src_mean
    return m


def estimate_norm(landmarks5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The similarity transform that maps five facial landmarks onto the ArcFace template.

    Equals ``insightface.utils.face_align.estimate_norm(landmarks5, image_size)`` (computed in float64
    here; insightface computes in the landmarks' dtype, so float32 input agrees to about 1e-5 px).

    Args:
        landmarks5: [5, 2] (x, y) pixel coordinates in the source image, in the order left eye, right
            eye, nose tip, left mouth corner, right mouth corner ("left" = left side of the image).
        image_size: side of the square crop in pixels; a multiple of 112 (template scaled by
            image_size / 112) or of 128 (scaled by image_size / 128 and shifted right by 8 * that ratio).

    Returns:
        float64 [2, 3] affine matrix from source pixels to crop pixels, as ``cv2.warpAffine`` takes it.

    Raises:
        ValueError: if the landmarks are not a finite [5, 2] array, all coincide, or ``image_size``
            is not a positive multiple of 112 or 128.
    """
    src = _check_points(landmarks5, 5, "landmarks5")
    dst = _template_for(image_size)
    return _similarity_umeyama(src, dst)


def norm_crop(img: np.ndarray, landmarks5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Crop and align a face to the ArcFace template, like insightface's ``face_align.norm_crop``.

    Pixels outside the source image are 0 (black); interpolation is bilinear (OpenCV's fixed-point
    ``INTER_LINEAR``). The channel order is kept as given (BGR in, BGR out; RGB in, RGB out).

    Args:
        img: uint8 [H, W, 3] colour image, or uint8 [H, W] grey image.
        landmarks5: [5, 2] (x, y) pixel coordinates in ``img``; see :func:`estimate_norm`.
        image_size: side of the square crop in pixels; see :func:`estimate_norm`.

    Returns:
        uint8 [image_size, image_size, 3] (or [image_size, image_size] for a grey input).

    Raises:
        ValueError: on an image that is not uint8 [H, W, 3] / [H, W] with H, W > 0, or on landmarks
            or ``image_size`` that :func:`estimate_norm` rejects.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"img: expected dtype uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"img: expected shape [H, W, 3] or [H, W], got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"img: expected a non-empty image, got shape {arr.shape}")
    m = estimate_norm(landmarks5, image_size)
    return cv2.warpAffine(arr, m, (image_size, image_size), borderValue=0.0)


def landmarks68_to_5(pts68: np.ndarray) -> np.ndarray:
    """Reduce 68 iBUG 300-W landmarks to the 5 points the ArcFace template uses.

    With 0-based indices into the 68-point scheme:

    * left eye centre (left side of the image) = mean of points 36..41,
    * right eye centre = mean of points 42..47,
    * nose tip = point 30,
    * left mouth corner = point 48, right mouth corner = point 54.

    Args:
        pts68: [68, 2] (x, y) pixel coordinates (e.g. dlib's or face_alignment's output).

    Returns:
        float64 [5, 2] in :func:`estimate_norm`'s order.

    Raises:
        ValueError: if ``pts68`` is not a finite [68, 2] array.
    """
    pts = _check_points(pts68, 68, "pts68")
    return np.stack(
        [
            pts[_LEFT_EYE_68].mean(axis=0),
            pts[_RIGHT_EYE_68].mean(axis=0),
            pts[_NOSE_TIP_68],
            pts[_LEFT_MOUTH_68],
            pts[_RIGHT_MOUTH_68],
        ]
    )
