"""Procedural synthetic faces: aligned 112x112 RGB "faces" with five landmarks, for demos, tests, benchmarks.

No real face data is downloaded by facems, so the demo, the tests and the benchmarks train and
evaluate on faces drawn here from a few dozen parameters with OpenCV primitives (anti-aliased
polygons and lines at 1/16-pixel precision) and a little numpy. A face is the product of two
independent random draws:

* :class:`IdentityParams` (what stays with a person): head shape (ellipse half-axes, jaw width,
  position), skin tone, hair (colour, hairline height and shape, style, volume, parting, how fast
  it greys), facial hair, eye/brow/nose/mouth geometry (landmark offsets from the ArcFace template,
  sizes, angles), iris colour, brow thickness, lip colour, ears, glasses, moles and freckles, and a
  baseline age. :func:`sample_identity` draws one from a ``numpy.random.Generator``.
* :class:`Nuisance` (what changes between two photos of that person): head pose (yaw, pitch, roll),
  a small alignment jitter (shift, scale), illumination (a directional linear gradient, a global
  gain and a per-channel colour cast), background colours, clothing colour, expression (mouth
  open, smile, eye closure, gaze), an age-like change (wrinkles, greying hair, a skin-tone shift),
  Gaussian blur, Gaussian noise, a partial occlusion (sunglasses, a band such as a scarf or mask, or
  a hand) and a JPEG quality (carried for the writers, which encode; rendering does not).
  :func:`sample_nuisance` draws one.

:func:`render_face` draws an aligned 112x112 image; :func:`render_loose_crop` draws the same face,
not aligned, scaled/rotated/translated inside a larger canvas with background clutter (for
IJB-C-like releases that facems aligns with the five points). :class:`SyntheticFaces` is a
deterministic, indexable set built on them.

Conventions. Images are uint8 RGB, ``H x W x 3``. Coordinates are pixels, ``x`` to the right, ``y``
down, origin at the centre of the top-left pixel (OpenCV's). Landmarks are float32 ``[5, 2]`` rows of
(x, y): left eye, right eye, nose tip, left mouth corner, right mouth corner ("left" = on the left
of the image), at zero pose within a few pixels of the ArcFace template
``[[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]``. The head is an
ellipsoid that rotates about its centre: positive ``yaw`` turns the face towards the right of the
image (features move to +x), positive ``pitch`` lifts the chin (features move up), positive ``roll``
rotates the image of the head clockwise on screen (the eye line's angle ``atan2(dy, dx)`` grows by
``roll``). The projection is orthographic.

Knobs of the set (:class:`SyntheticFaces` and :func:`sample_nuisance`):

* ``difficulty`` (``strength`` in :func:`sample_nuisance`, >= 0, default 1): one multiplier on every
  nuisance's spread (pose, jitter, light, background, expression, age, blur, noise, occlusion
  probability, JPEG quality loss). 0 gives the frontal, neutral, clean image of each identity (only
  the clothing colour and the noise seed still vary, so every aligned image of a person is the
  same); 1 is the calibrated default; 2 is hard. Measured on 300 genuine + 300 impostor pairs of
  unseen identities (best-threshold accuracy): 28x28 grey pixels (cosine) reach 0.80-0.86 at
  difficulty 0.5, 0.65-0.68 at 1 and 0.57-0.61 at 2; at difficulty 1, PCA + LDA fitted on 120 other
  identities reaches 0.81-0.83, and a 4-block CNN (16-128 channels, 56x56 input) at 0.60 untrained
  reaches 0.87 after 100 steps of batch 128 (3 minutes on two busy CPU cores).
* ``pose_scale`` (>= 0, default 1): a further multiplier on yaw/pitch/roll only. Around 2.5-3 gives a
  CPLFW-like set (yaw sd 21 degrees at 3, clipped at 45; over 3,000 such images the landmarks stayed
  within x, y in [13, 108]). Only at extreme settings (difficulty 2 with pose_scale 3) does a
  landmark occasionally (~0.5 %) leave the 112x112 image.
* ``age_scale`` (>= 0, default 1): a further multiplier on the age-like change only. Around 3-4 gives
  a CALFW-like set (the same person seen from young to old).
* ``identity_offset``: identity ``k`` of the set is global identity ``identity_offset + k``; its
  parameters come from ``(seed, identity_offset + k)`` only, so disjoint ranges give disjoint people
  and the same global identity is the same person in every set built with the same ``seed``.

Determinism. :func:`sample_identity` and :func:`sample_nuisance` consume a fixed number of draws in a
fixed order, so they depend on the generator's state only; rendering is a pure function of its
arguments (the noise comes from a fixed noise bank at an offset chosen by ``Nuisance.noise_seed``).
In :class:`SyntheticFaces`, image ``(k, j)`` (the ``j``-th image of identity ``k``) is made from
``SeedSequence([seed, 1, identity_offset + k, j])`` and the identity from
``SeedSequence([seed, 0, identity_offset + k])``, so any item can be regenerated alone, in any
process, in any order.

Speed: rendering is vectorised (one projection of the 600-900 points of a face, about 25 OpenCV
drawing calls) with no per-pixel Python; ``scripts/bench_synthetic.py`` measures it. On one core of the
shared 2-core development machine, with other jobs running, ``render_face`` made 800-900 images/s at
difficulty 1 (1,150/s at difficulty 0) and a full ``SyntheticFaces`` item ~700/s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "IdentityParams",
    "Nuisance",
    "SyntheticFaces",
    "render_face",
    "render_loose_crop",
    "sample_identity",
    "sample_nuisance",
]

Colour = tuple[float, float, float]

_SIZE = 112
_SHIFT = 4  # OpenCV fixed-point bits: coordinates are drawn at 1/16 pixel
_ONE = float(1 << _SHIFT)
_AA = cv2.LINE_AA

# The ArcFace 5-point template (112x112) and the symmetric layout derived from it.
_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_MID_X = 56.0  # the face's vertical axis (mean of the eye, nose and mouth midpoints)
_EYE_Y = float(_TEMPLATE[:2, 1].mean())
_EYE_HALF = float(_TEMPLATE[1, 0] - _TEMPLATE[0, 0]) / 2.0  # half the inter-ocular distance
_NOSE_Y = float(_TEMPLATE[2, 1])
_MOUTH_Y = float(_TEMPLATE[3:, 1].mean())
_MOUTH_HALF = float(_TEMPLATE[4, 0] - _TEMPLATE[3, 0]) / 2.0


# --------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class IdentityParams:
    """What stays with one synthetic person. Lengths are pixels of the 112x112 aligned frame.

    Eye/nose/mouth offsets move the landmarks away from the ArcFace template, so at zero pose a
    person's landmarks lie within a few pixels of it. Colours are RGB in [0, 255].
    """

    head_center: tuple[float, float]  # (x, y) of the head ellipse's centre (also the pose pivot)
    head_axes: tuple[float, float]  # (half-width, half-height)
    jaw_width: float  # lower-face width factor in (0, 1]: 1 = elliptical, small = narrow chin
    skin_rgb: Colour
    hair_rgb: Colour
    hair_style: int  # 0 buzz cut, 1 short, 2 long, 3 fringe, 4 side-swept, 5 voluminous/curly
    hair_volume: float  # how far the hair stands out of the head outline
    hairline_y: float  # y of the hairline on the face axis
    hairline_shape: float  # exponent of the hairline curve: 1 pointed (widow's peak) .. 6 flat
    hair_part: float  # hairline asymmetry in [-1, 1]
    greying_rate: float  # how fast the hair greys with age
    facial_hair: int  # 0 none, 1 moustache, 2 beard, 3 goatee
    eye_offset: tuple[float, float]  # (outward, down) shift of each eye centre from the template
    eye_size: tuple[float, float]  # (half-width, half-height) of the open eye
    eye_tilt: float  # degrees, outer corners up
    iris_rgb: Colour
    iris_radius: float
    brow_gap: float  # eye centre to brow centre line
    brow_thickness: float
    brow_angle: float  # degrees, outer ends up
    brow_arch: float  # height of the arch
    brow_length: float
    nose_offset: float  # downward shift of the nose tip from the template
    nose_width: float  # half-width of the nostril wings
    nose_bridge: float  # in [0, 1]: how high the drawn bridge starts
    nose_depth: float  # protrusion of the tip out of the head ellipsoid (affects pose)
    mouth_offset: float  # downward shift of the mouth corners from the template
    mouth_half_width: float
    lip_thickness: tuple[float, float]  # (upper, lower)
    lip_rgb: Colour
    ear_size: float  # half-height of an ear
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_rgb: Colour
    base_age: float  # in [0, 1]: added to the nuisance's age
    marks: tuple[tuple[float, float, float], ...]  # moles and freckles: (x, y, radius) on the frontal face
    mark_rgb: Colour


@dataclass(frozen=True)
class Nuisance:
    """What changes between two images of the same person. Angles in degrees, lengths in 112-frame pixels."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)  # alignment jitter: translation in pixels
    scale: float = 1.0  # alignment jitter: zoom about the image centre
    light_angle: float = 0.0  # radians: direction the image gets brighter towards
    light_strength: float = 0.0  # relative brightness change from the centre to 56 px away
    gain: float = 1.0  # global exposure multiplier
    color_cast: Colour = (1.0, 1.0, 1.0)  # per-channel multipliers
    background: tuple[Colour, Colour, Colour, Colour] = (
        (128.0, 128.0, 128.0),
        (128.0, 128.0, 128.0),
        (128.0, 128.0, 128.0),
        (128.0, 128.0, 128.0),
    )  # corner colours: top-left, top-right, bottom-left, bottom-right (bilinear in between)
    clothing_rgb: Colour = (60.0, 70.0, 90.0)
    mouth_open: float = 0.0  # in [0, 1]
    smile: float = 0.0  # in [-1, 1]: corners up (> 0) or down
    eye_closure: float = 0.0  # in [0, 1]: 1 = closed
    gaze: tuple[float, float] = (0.0, 0.0)  # iris offset in [-1, 1] of its free travel
    age: float = 0.0  # in [0, 1]: wrinkles, greying, skin shift (added to the identity's base age)
    blur_sigma: float = 0.0  # Gaussian blur, pixels
    noise_sigma: float = 0.0  # Gaussian noise, in 0..255 grey levels
    noise_seed: int = 0
    occlusion: int = 0  # 0 none, 1 sunglasses, 2 band (scarf, mask, object), 3 hand
    # Band or hand: centre x, y, half-width, half-height (aligned-frame px; they follow roll and jitter)
    # and rotation (degrees, clockwise on screen). Sunglasses sit on the eyes instead.
    occluder: tuple[float, float, float, float, float] = (56.0, 90.0, 20.0, 10.0, 0.0)
    occluder_rgb: Colour = (30.0, 30.0, 30.0)
    jpeg_quality: int = 95  # applied by the writers that encode, not by the renderer


# Uniform identity parameters (low, high), drawn with one call; the comments give their use.
_ID_RANGES = np.array(
    [
        [-1.2, 1.2],  # 0 head centre x offset
        [-2.5, 2.5],  # 1 head centre y offset
        [36.0, 44.0],  # 2 head half-width
        [49.0, 57.0],  # 3 head half-height
        [0.66, 0.98],  # 4 jaw
        [0.0, 1.0],  # 5 skin lightness
        [-1.0, 1.0],  # 6 skin hue (red vs yellow)
        [0.0, 1.0],  # 7 hair colour pick
        [0.0, 1.0],  # 8 hair style pick
        [0.0, 1.0],  # 9 hair volume (fraction of the style's range)
        [0.0, 1.0],  # 10 hairline (fraction of the style's range)
        [1.0, 6.0],  # 11 hairline shape
        [-1.0, 1.0],  # 12 hair part
        [0.3, 1.3],  # 13 greying rate
        [0.0, 1.0],  # 14 facial hair pick
        [-2.0, 2.0],  # 15 eye outward offset
        [-2.0, 2.0],  # 16 eye down offset
        [5.2, 7.6],  # 17 eye half-width
        [2.2, 3.8],  # 18 eye half-height
        [-9.0, 9.0],  # 19 eye tilt
        [0.0, 1.0],  # 20 iris colour pick
        [2.3, 3.4],  # 21 iris radius
        [6.0, 10.0],  # 22 brow gap
        [1.2, 3.4],  # 23 brow thickness
        [-10.0, 14.0],  # 24 brow angle
        [0.3, 3.0],  # 25 brow arch
        [12.0, 17.5],  # 26 brow length
        [-2.0, 2.0],  # 27 nose offset
        [3.8, 7.6],  # 28 nose half-width
        [0.2, 1.0],  # 29 nose bridge
        [5.0, 14.0],  # 30 nose depth
        [-2.0, 2.0],  # 31 mouth offset
        [-2.5, 2.5],  # 32 mouth half-width offset
        [1.1, 3.0],  # 33 upper lip
        [1.6, 4.0],  # 34 lower lip
        [0.0, 1.0],  # 35 lip redness
        [7.0, 11.5],  # 36 ear size
        [0.0, 1.0],  # 37 glasses pick
        [0.0, 1.0],  # 38 glasses colour pick
        [0.0, 0.45],  # 39 base age
        [0.0, 1.0],  # 40 moles/freckles pick
        [-12.0, 12.0],  # 41 hair colour jitter
        [-12.0, 12.0],  # 42 iris colour jitter
    ]
)
_HAIR_PALETTE = [
    (25.0, 20.0, 18.0),  # black
    (60.0, 40.0, 28.0),  # dark brown
    (105.0, 72.0, 45.0),  # brown
    (165.0, 125.0, 75.0),  # dark blond
    (215.0, 180.0, 120.0),  # blond
    (150.0, 65.0, 35.0),  # red
    (140.0, 135.0, 130.0),  # grey
    (70.0, 55.0, 95.0),  # dyed
]
_HAIR_WEIGHTS = [0.30, 0.20, 0.15, 0.08, 0.07, 0.07, 0.06, 0.07]
_STYLE_WEIGHTS = [0.12, 0.30, 0.22, 0.12, 0.14, 0.10]
_FACIAL_HAIR_WEIGHTS = [0.64, 0.12, 0.14, 0.10]
_IRIS_PALETTE = [(60.0, 35.0, 20.0), (100.0, 60.0, 30.0), (40.0, 30.0, 25.0), (70.0, 110.0, 150.0),
                 (80.0, 120.0, 80.0), (120.0, 100.0, 60.0)]  # fmt: skip
_GLASSES_PALETTE = [(20.0, 20.0, 20.0), (90.0, 60.0, 30.0), (170.0, 170.0, 175.0), (120.0, 20.0, 30.0)]
# Per hair style: (volume low, high, hairline y low, high).
_STYLE_RANGES = [(0.3, 1.0, 18.0, 30.0), (1.5, 4.5, 20.0, 32.0), (2.0, 5.0, 20.0, 32.0), (2.0, 5.0, 35.0, 41.0),
                 (2.5, 6.0, 22.0, 32.0), (8.0, 14.0, 20.0, 30.0)]  # fmt: skip


def _pick(u: float, weights: list[float]) -> int:
    """Index ``i`` with probability ``weights[i] / sum(weights)`` for ``u`` uniform in [0, 1)."""
    acc, target = 0.0, u * sum(weights)
    for i, w in enumerate(weights):
        acc += w
        if target < acc:
            return i
    return len(weights) - 1


def _clip_rgb(r: float, g: float, b: float) -> Colour:
    return (min(255.0, max(0.0, r)), min(255.0, max(0.0, g)), min(255.0, max(0.0, b)))


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """Draw one synthetic person.

    Args:
        rng: the generator; the same draws are made on every call, so the result depends only on
            the generator's state.

    Returns:
        The identity's parameters (see :class:`IdentityParams`).
    """
    u = rng.uniform(_ID_RANGES[:, 0], _ID_RANGES[:, 1]).tolist()
    mark_u = rng.random((24, 3)).tolist()

    light, hue = u[5], u[6]
    skin = _clip_rgb(
        92.0 + 154.0 * light + 8.0 * hue, 58.0 + 150.0 * light - 2.0 * hue, 42.0 + 140.0 * light - 8.0 * hue
    )
    hr, hg, hb = _HAIR_PALETTE[_pick(u[7], _HAIR_WEIGHTS)]
    style = _pick(u[8], _STYLE_WEIGHTS)
    vlo, vhi, hlo, hhi = _STYLE_RANGES[style]
    ir, ig, ib = _IRIS_PALETTE[min(int(u[20] * len(_IRIS_PALETTE)), len(_IRIS_PALETTE) - 1)]
    glasses = 0 if u[37] < 0.86 else (1 if u[37] < 0.93 else 2)

    cx, cy, a = _MID_X + u[0], 60.0 + u[1], u[2]
    # Moles (0-3, larger) or, for some people, freckles (many, tiny) on the cheeks and nose.
    n_moles = int(u[40] * 4.0) if u[40] < 0.85 else 0
    n_freckles = 0 if u[40] < 0.85 else 12 + int((u[40] - 0.85) / 0.15 * 12.0)
    marks = [
        (cx + (m[0] * 2.0 - 1.0) * 0.7 * a, _EYE_Y - 12.0 + m[1] * 55.0, 0.6 + 0.8 * m[2])
        for m in mark_u[:n_moles]
    ]
    marks += [(_MID_X + (m[0] * 2.0 - 1.0) * 24.0, _NOSE_Y - 10.0 + m[1] * 14.0, 0.45 + 0.25 * m[2])
              for m in mark_u[:n_freckles]]  # fmt: skip

    return IdentityParams(
        head_center=(cx, cy),
        head_axes=(a, u[3]),
        jaw_width=u[4],
        skin_rgb=skin,
        hair_rgb=_clip_rgb(hr + u[41], hg + u[41], hb + u[41]),
        hair_style=style,
        hair_volume=vlo + u[9] * (vhi - vlo),
        hairline_y=hlo + u[10] * (hhi - hlo),
        hairline_shape=u[11],
        hair_part=u[12],
        greying_rate=u[13],
        facial_hair=_pick(u[14], _FACIAL_HAIR_WEIGHTS),
        eye_offset=(u[15], u[16]),
        eye_size=(u[17], u[18]),
        eye_tilt=u[19],
        iris_rgb=_clip_rgb(ir + u[42], ig + u[42], ib + u[42]),
        iris_radius=u[21],
        brow_gap=u[22],
        brow_thickness=u[23],
        brow_angle=u[24],
        brow_arch=u[25],
        brow_length=u[26],
        nose_offset=u[27],
        nose_width=u[28],
        nose_bridge=u[29],
        nose_depth=u[30],
        mouth_offset=u[31],
        mouth_half_width=_MOUTH_HALF + u[32],
        lip_thickness=(u[33], u[34]),
        lip_rgb=_clip_rgb(skin[0] * 0.92 + 40.0 * u[35], skin[1] * 0.62, skin[2] * 0.62 + 5.0 * u[35]),
        ear_size=u[36],
        glasses=glasses,
        glasses_rgb=_GLASSES_PALETTE[min(int(u[38] * len(_GLASSES_PALETTE)), len(_GLASSES_PALETTE) - 1)],
        base_age=u[39],
        marks=tuple(marks),
        mark_rgb=(skin[0] * 0.62, skin[1] * 0.5, skin[2] * 0.45),
    )


def _check_knob(where: str, name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return v


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else (hi if x > hi else x)


def sample_nuisance(
    rng: np.random.Generator, strength: float = 1.0, pose_scale: float = 1.0, age_scale: float = 1.0
) -> Nuisance:
    """Draw the nuisance of one image.

    At ``strength = 1`` (per unit of ``pose_scale``): yaw ~ N(0, 7 deg), pitch and roll ~ N(0, 4 deg),
    all clipped to +-45; alignment shift ~ N(0, 1 px) per axis and zoom ~ exp(N(0, 0.04)); a light
    gradient of up to 30 % per 56 px in a uniform direction, gain ~ exp(N(0, 0.15)), colour cast
    ~ exp(N(0, 0.06)) per channel; a background of random brightness (60-200) and tint (+-40 per
    channel) with corners 0.8-1.2 times as bright; mouth opening ~ |N(0, 0.25)|, smile ~ N(0, 0.4),
    gaze ~ N(0, 0.35) x N(0, 0.25), eye closure ~ |N(0, 0.12)| or a blink (8 %); age-like change
    uniform in [0, 0.3 * age_scale]; blur sigma uniform in [0, 1.2] px on half the images; noise sigma
    ~ |N(0, 4)| grey levels; an occlusion with probability 0.14 (sunglasses, a band, a hand); JPEG
    quality uniform in [55, 95]. Spreads scale linearly with ``strength`` (probabilities too, capped;
    the background saturates at 1).

    Args:
        rng: the generator; a fixed number of draws is made whatever the knobs.
        strength: multiplier on every nuisance's spread (0 = frontal, neutral, clean; 1 = default).
        pose_scale: further multiplier on yaw/pitch/roll (2.5-3 for a CPLFW-like set).
        age_scale: further multiplier on the age-like change (3-4 for a CALFW-like set).

    Returns:
        The nuisance (see :class:`Nuisance`); angles are clipped to +-45 degrees.

    Raises:
        ValueError: a knob is negative or not finite.
    """
    s = _check_knob("sample_nuisance", "strength", strength)
    ps = s * _check_knob("sample_nuisance", "pose_scale", pose_scale)
    ags = s * _check_knob("sample_nuisance", "age_scale", age_scale)
    n = rng.standard_normal(16).tolist()
    u = rng.random(24).tolist()
    bg = rng.random(12).tolist()
    noise_seed = int(rng.integers(0, 2**31 - 1))

    # Background: grey at strength 0; from 1 on a random brightness (60-200) and tint (+-40 per channel),
    # each corner 0.8-1.2 times as bright (a smooth gradient in between).
    mix = min(1.0, s)
    level, t1, t2 = 60.0 + 140.0 * bg[0], 80.0 * (bg[1] - 0.5), 80.0 * (bg[2] - 0.5)
    base = (level + t1, level - 0.5 * (t1 + t2), level + t2)
    corners = []
    for k in (1.0, 0.8 + 0.4 * bg[3], 0.8 + 0.4 * bg[4], 0.8 + 0.4 * bg[5]):
        corners.append(_clip_rgb(*(128.0 + mix * (k * v - 128.0) for v in base)))
    occlusion = 1 + min(2, int(u[7] * 3.0)) if u[6] < min(0.9, 0.14 * s) else 0
    if occlusion == 1:
        occ_rgb = (10.0 + 40.0 * bg[9], 10.0 + 40.0 * bg[10], 10.0 + 40.0 * bg[11])
    else:
        occ_rgb = (20.0 + 200.0 * bg[9], 20.0 + 200.0 * bg[10], 20.0 + 200.0 * bg[11])
    if occlusion == 3:  # a hand on a cheek or the chin
        occluder = (
            30.0 + 52.0 * u[8],
            75.0 + 25.0 * u[9],
            12.0 + 6.0 * u[10],
            22.0 + 8.0 * u[11],
            60.0 * (u[12] - 0.5),
        )
    else:  # a band over the lower face (scarf, mask) or the forehead/eyes (hat brim, object)
        band_y = 88.0 + 8.0 * u[9] if u[8] < 0.6 else 30.0 + 30.0 * u[9]
        occluder = (
            56.0 + 12.0 * (u[10] - 0.5),
            band_y,
            40.0 + 20.0 * u[11],
            7.0 + 9.0 * u[12],
            16.0 * (u[13] - 0.5),
        )
    blink = u[3] < 0.08 * s
    return Nuisance(
        yaw=_clamp(7.0 * ps * n[0], -45.0, 45.0),
        pitch=_clamp(4.0 * ps * n[1], -45.0, 45.0),
        roll=_clamp(4.0 * ps * n[2], -45.0, 45.0),
        shift=(1.0 * s * n[3], 1.0 * s * n[4]),
        scale=math.exp(0.04 * s * n[5]),
        light_angle=2.0 * math.pi * u[0],
        light_strength=min(0.9, 0.3 * s * u[1]),
        gain=math.exp(0.15 * s * _clamp(n[6], -2.5, 2.5)),
        color_cast=(
            math.exp(0.06 * s * _clamp(n[7], -2.5, 2.5)),
            math.exp(0.06 * s * _clamp(n[8], -2.5, 2.5)),
            math.exp(0.06 * s * _clamp(n[9], -2.5, 2.5)),
        ),
        background=(corners[0], corners[1], corners[2], corners[3]),
        clothing_rgb=(15.0 + 220.0 * bg[6], 15.0 + 220.0 * bg[7], 15.0 + 220.0 * bg[8]),
        mouth_open=min(1.0, 0.25 * s * abs(n[10])),
        smile=_clamp(0.4 * s * n[11], -1.0, 1.0),
        eye_closure=0.5 + 0.5 * u[4] if blink else min(1.0, 0.12 * s * abs(n[12])),
        gaze=(_clamp(0.35 * s * n[13], -1.0, 1.0), _clamp(0.25 * s * n[14], -1.0, 1.0)),
        age=min(1.0, 0.3 * ags * u[5]),
        blur_sigma=1.2 * s * u[2] if u[14] < 0.5 else 0.0,
        noise_sigma=4.0 * s * abs(n[15]),
        noise_seed=noise_seed,
        occlusion=occlusion,
        occluder=occluder,
        occluder_rgb=occ_rgb,
        jpeg_quality=int(_clamp(round(95.0 - 40.0 * min(s, 2.0) * u[15]), 20.0, 100.0)),
    )


# --------------------------------------------------------------------------------------------------
# Geometry. Every shape is a few points of the frontal face in the 112 frame; the points of a face
# (600-900) are generated by a handful of vectorised formulas and projected at once.

_NC = 9  # points per curve
_T = np.linspace(0.0, 1.0, _NC)
_SIN = np.sin(np.pi * _T)
# Curve profiles: a curve's y is linear between its end points plus a1 * profile[i1] + a2 * profile[i2].
_PROFILES = np.stack(
    [
        np.zeros(_NC),  # straight
        _SIN,  # arc
        _SIN**0.8,  # fuller arc (upper eyelid)
        _SIN**0.6 * (1.0 - 0.35 * np.exp(-(((_T - 0.5) / 0.1) ** 2))),  # cupid's bow
        _SIN**0.7,  # lower lip
        np.sin(0.9 * np.pi * _T),  # brow arch, inner to outer end
        np.sin(0.9 * np.pi * (1.0 - _T)),  # brow arch, outer to inner end
    ]
)
_P_LINE, _P_ARC, _P_LID, _P_BOW, _P_LIP, _P_BROW, _P_BROW_REV = range(7)
_NE = 12  # points per ellipse
_UNIT = np.stack([np.cos(np.linspace(0.0, 2.0 * np.pi, _NE, endpoint=False)),
                  np.sin(np.linspace(0.0, 2.0 * np.pi, _NE, endpoint=False))])  # fmt: skip
_HEAD_T = np.linspace(0.0, 2.0 * np.pi, 44, endpoint=False)
_HEAD_COS, _HEAD_SIN = np.cos(_HEAD_T), np.sin(_HEAD_T)
_HEAD_LOWER2 = np.maximum(_HEAD_SIN, 0.0) ** 2
_HAIR_T = np.linspace(np.pi - 0.25, 2.0 * np.pi + 0.25, 25)
_HAIR_COS, _HAIR_SIN, _HAIR_BUMP = np.cos(_HAIR_T), np.sin(_HAIR_T), 1.8 * np.sin(11.0 * _HAIR_T)
_BACK_T = np.linspace(np.pi, 2.0 * np.pi, 17)
_BACK_COS, _BACK_SIN = np.cos(_BACK_T), np.sin(_BACK_T)
_JAW_T = np.linspace(0.3, np.pi - 0.3, 13)
_JAW_COS, _JAW_SIN = np.cos(_JAW_T), np.sin(_JAW_T)
_HAIRLINE_U = np.linspace(1.0, -1.0, 13)
_HAIRLINE_ABS = np.abs(_HAIRLINE_U)
_FRINGE = 1.2 * np.abs(np.sin(7.0 * _HAIRLINE_U))
_HAND_Y = np.sign(_UNIT[1]) * np.abs(_UNIT[1]) ** 0.6  # a rounded-rectangle palm


class _Shapes:
    """Collects a face's shapes; ``project`` turns them into pixel coordinates.

    Layout of the point array: all curves (9 points each), all ellipses (12 points each), explicit
    points, then blocks (free point arrays) in the order added. Two curves added one after the other
    form a closed polygon (the second runs backwards). Surface points lie on the head ellipsoid, raised
    by ``dz``, and turn with yaw and pitch; flat blocks (silhouettes, occluders) do not.
    """

    def __init__(self) -> None:
        # Flat lists of floats (12 per curve, 6 per ellipse, 3 per point): fast to turn into arrays.
        self.curves: list[float] = []
        self.ellipses: list[float] = []
        self.points: list[float] = []
        self.blocks: list[tuple[np.ndarray, float, bool]] = []
        self.n_curves = self.n_ellipses = self.n_points = 0

    def curve(
        self, x0: float, y0: float, x1: float, y1: float, a1: float = 0.0, i1: int = _P_LINE, a2: float = 0.0,
        i2: int = _P_LINE, pivot: tuple[float, float] = (0.0, 0.0), angle: float = 0.0, dz: float = 0.0,
    ) -> int:  # fmt: skip
        self.curves.extend((x0, y0, x1, y1, a1, i1, a2, i2, pivot[0], pivot[1], angle, dz))
        self.n_curves += 1
        return self.n_curves - 1

    def segment(self, x0: float, y0: float, x1: float, y1: float, bulge: float = 0.0, dz: float = 0.0) -> int:
        """A curve from (x0, y0) to (x1, y1) bowing by ``bulge`` px to the right of its direction on screen."""
        angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
        return self.curve(
            x0, y0, x0 + math.hypot(x1 - x0, y1 - y0), y0, bulge, _P_ARC, pivot=(x0, y0), angle=angle, dz=dz
        )

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, dz: float = 0.0) -> int:
        self.ellipses.extend((cx, cy, ax, ay, angle, dz))
        self.n_ellipses += 1
        return self.n_ellipses - 1

    def pts(self, xy: list[tuple[float, float]], dz: float = 0.0) -> int:
        for x, y in xy:
            self.points.extend((x, y, dz))
        self.n_points += len(xy)
        return self.n_points - len(xy)

    def pts_dz(self, xyz: list[tuple[float, float, float]]) -> int:
        for p in xyz:
            self.points.extend(p)
        self.n_points += len(xyz)
        return self.n_points - len(xyz)

    def block(self, xy: np.ndarray, dz: float = 0.0, flat: bool = False) -> int:
        self.blocks.append((xy, dz, flat))
        return len(self.blocks) - 1

    def project(self, ident: IdentityParams, nz: Nuisance, affine: np.ndarray) -> np.ndarray:
        """All points posed (yaw, pitch about the head centre) and mapped by ``affine``: float64 [N, 2]."""
        nc, ne, npt = _NC * self.n_curves, _NE * self.n_ellipses, self.n_points
        self.ellipse0, self.point0 = nc, nc + ne
        self.block0 = []
        n = nc + ne + npt
        for xy, _, _ in self.blocks:
            self.block0.append(n)
            n += len(xy)
        xy_all = np.empty((n, 2))
        dz_all = np.empty(n)
        if nc:
            c = np.array(self.curves, dtype=np.float64).reshape(-1, 12)
            x0, y0, px, py = c[:, 0:1], c[:, 1:2], c[:, 8:9], c[:, 9:10]
            xs = x0 + (c[:, 2:3] - x0) * _T - px
            ys = (y0 + (c[:, 3:4] - y0) * _T + c[:, 4:5] * _PROFILES[c[:, 5].astype(np.intp)]
                  + c[:, 6:7] * _PROFILES[c[:, 7].astype(np.intp)] - py)  # fmt: skip
            th = np.radians(c[:, 10:11])
            cos, sin = np.cos(th), np.sin(th)
            xy_all[:nc, 0] = (px + cos * xs - sin * ys).ravel()
            xy_all[:nc, 1] = (py + sin * xs + cos * ys).ravel()
            dz_all[:nc] = np.repeat(c[:, 11], _NC)
        if ne:
            e = np.array(self.ellipses, dtype=np.float64).reshape(-1, 6)
            th = np.radians(e[:, 4:5])
            cos, sin = np.cos(th), np.sin(th)
            ux, uy = e[:, 2:3] * _UNIT[0], e[:, 3:4] * _UNIT[1]
            xy_all[nc : nc + ne, 0] = (e[:, 0:1] + cos * ux - sin * uy).ravel()
            xy_all[nc : nc + ne, 1] = (e[:, 1:2] + sin * ux + cos * uy).ravel()
            dz_all[nc : nc + ne] = np.repeat(e[:, 5], _NE)
        if npt:
            p = np.array(self.points, dtype=np.float64).reshape(-1, 3)
            xy_all[nc + ne : nc + ne + npt] = p[:, :2]
            dz_all[nc + ne : nc + ne + npt] = p[:, 2]
        for (xy, dz, _), start in zip(self.blocks, self.block0):
            xy_all[start : start + len(xy)] = xy
            dz_all[start : start + len(xy)] = dz

        posed = xy_all
        if nz.yaw != 0.0 or nz.pitch != 0.0:
            cx, cy = ident.head_center
            a, b = ident.head_axes
            dx, dy = xy_all[:, 0] - cx, xy_all[:, 1] - cy
            q = 1.0 - dx * dx * (1.0 / (a * a)) - dy * dy * (1.0 / (b * b))
            np.maximum(q, 0.02, out=q)  # points off the ellipse sit on its rim
            np.sqrt(q, out=q)
            z = q * (0.9 * a) + dz_all
            cyaw, syaw = math.cos(math.radians(nz.yaw)), math.sin(math.radians(nz.yaw))
            cpitch, spitch = math.cos(math.radians(nz.pitch)), math.sin(math.radians(nz.pitch))
            posed = np.empty_like(xy_all)
            posed[:, 0] = cx + dx * cyaw + z * syaw
            posed[:, 1] = cy + dy * cpitch - (z * cyaw - dx * syaw) * spitch
            for (xy, _, flat), start in zip(self.blocks, self.block0):
                if flat:
                    posed[start : start + len(xy)] = xy
        return posed @ affine[:, :2].T + affine[:, 2]


def _eye_curve(
    sh: _Shapes, ex: float, ey: float, tilt: float, u0: float, u1: float, a1: float, i1: int,
    a2: float = 0.0, i2: int = 0, dy: float = 0.0,
) -> int:  # fmt: skip
    """A curve of the eye centred at (ex, ey), from x offset u0 to u1, rotated by ``tilt`` degrees."""
    return sh.curve(ex + u0, ey + dy, ex + u1, ey + dy, a1, i1, a2, i2, pivot=(ex, ey), angle=tilt, dz=-1.0)


def _face_affine(ident: IdentityParams, nz: Nuisance, view: np.ndarray) -> np.ndarray:
    """``view`` after the jitter (zoom about the image centre, shift) after the roll about the head centre."""
    r = math.radians(nz.roll)
    cos, sin = math.cos(r), math.sin(r)
    cx, cy = ident.head_center
    k, (sx, sy) = nz.scale, nz.shift
    # Roll: p -> R (p - c) + c; jitter: q -> k q + (1 - k) * 56 + shift.
    jitter_roll = np.array(
        [
            [k * cos, -k * sin, k * (cx - cos * cx + sin * cy) + (1.0 - k) * 56.0 + sx],
            [k * sin, k * cos, k * (cy - sin * cx - cos * cy) + (1.0 - k) * 56.0 + sy],
        ]
    )
    return jitter_roll if view is _IDENTITY_VIEW else _compose(view, jitter_roll)


def _linear_gain(m: np.ndarray) -> float:
    """The length scale of a 2x3 affine map: sqrt |det| of its linear part."""
    return math.sqrt(abs(float(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])))


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine map ``outer o inner``."""
    out = np.empty((2, 3))
    out[:, :2] = outer[:, :2] @ inner[:, :2]
    out[:, 2] = outer[:, :2] @ inner[:, 2] + outer[:, 2]
    return out


# --------------------------------------------------------------------------------------------------
# Drawing


class _Palette:
    """Colours as drawn: scaled by a shade factor and by the camera's gain and colour cast, clipped."""

    def __init__(self, nz: Nuisance) -> None:
        g = nz.gain
        self.cam = (g * nz.color_cast[0], g * nz.color_cast[1], g * nz.color_cast[2])

    def __call__(self, rgb: Colour, k: float = 1.0) -> Colour:
        c = self.cam
        return (min(255.0, rgb[0] * k * c[0]), min(255.0, rgb[1] * k * c[1]), min(255.0, rgb[2] * k * c[2]))


def _mix(x: Colour, y: Colour, t: float) -> Colour:
    return (x[0] + (y[0] - x[0]) * t, x[1] + (y[1] - x[1]) * t, x[2] + (y[2] - x[2]) * t)


def _draw_person(img: np.ndarray, ident: IdentityParams, nz: Nuisance, affine: np.ndarray) -> np.ndarray:
    """Draw the person onto ``img`` in place; returns the landmarks float32 [5, 2] in ``img`` pixels."""
    sh = _Shapes()
    cx, cy = ident.head_center
    a, b = ident.head_axes
    age = min(1.0, ident.base_age + nz.age)

    # Silhouettes: head (narrower towards the chin), neck, shirt, hair.
    outline = np.empty((len(_HEAD_T), 2))
    outline[:, 0] = cx + a * _HEAD_COS * (1.0 - (1.0 - ident.jaw_width) * _HEAD_LOWER2)
    outline[:, 1] = cy + b * _HEAD_SIN
    head = sh.block(outline, flat=True)
    chest = cy + b + 14.0
    neck = sh.block(np.array([[cx - 0.5 * a, cy + 0.4 * b], [cx + 0.5 * a, cy + 0.4 * b],
                              [cx + 0.6 * a, cy + b + 40.0], [cx - 0.6 * a, cy + b + 40.0]]), flat=True)  # fmt: skip
    shirt = sh.block(np.array([[cx - 0.55 * a, chest], [cx, chest + 16.0], [cx + 0.55 * a, chest], [cx + 2.3 * a, chest + 22.0],
                               [cx + 2.6 * a, chest + 160.0], [cx - 2.6 * a, chest + 160.0], [cx - 2.3 * a, chest + 22.0]]),
                     flat=True)  # fmt: skip
    style, vol = ident.hair_style, ident.hair_volume
    ra = a + vol + (_HAIR_BUMP if style == 5 else 0.0)
    rb = b + vol + (_HAIR_BUMP if style == 5 else 0.0)
    outer = np.empty((len(_HAIR_T), 2))
    outer[:, 0], outer[:, 1] = cx + ra * _HAIR_COS, cy + rb * _HAIR_SIN
    hair_outer = sh.block(outer, flat=True)
    temple_y = _EYE_Y - 7.0
    tilt = ident.hair_part * (9.0 if style == 4 else 3.0)
    if style == 3:  # a fringe: a nearly straight, slightly jagged edge
        line_y = ident.hairline_y + _FRINGE + tilt * _HAIRLINE_U
    else:
        line_y = (ident.hairline_y + (temple_y - ident.hairline_y) * _HAIRLINE_ABS**ident.hairline_shape
                  + tilt * _HAIRLINE_U)  # fmt: skip
    inner = np.empty((15, 2))
    inner[0] = (cx + 0.86 * a, cy + 0.16 * b)  # sideburns
    inner[14] = (cx - 0.86 * a, cy + 0.16 * b)
    inner[1:14, 0] = cx + 0.9 * a * _HAIRLINE_U
    inner[1:14, 1] = np.minimum(line_y, temple_y + 2.0)
    sh.block(inner)  # right after hair_outer: together they close the hair polygon
    back = -1
    if style == 2:  # long hair hanging behind the head
        xy = np.empty((19, 2))
        xy[:17, 0], xy[:17, 1] = cx + (a + vol) * _BACK_COS, cy + (b + vol) * _BACK_SIN
        xy[17:] = ((cx + a + vol + 2.0, cy + b + 20.0), (cx - a - vol - 2.0, cy + b + 20.0))
        back = sh.block(xy, flat=True)

    ear_y, es = _EYE_Y + 8.0, ident.ear_size
    ears = [sh.ellipse(cx + s * 0.97 * a, ear_y, 0.42 * es, es, dz=-4.0) for s in (-1.0, 1.0)]
    ear_in = [sh.segment(cx + s * (0.97 * a + 0.1 * es), ear_y - 0.6 * es, cx + s * (0.97 * a + 0.1 * es),
                         ear_y + 0.6 * es, -s * 0.2 * es, dz=-4.0) for s in (-1.0, 1.0)]  # fmt: skip

    # Eyes and brows. Each eye: almond (two arcs), iris, pupil, glint, lids drawn over in skin colour.
    w, h = ident.eye_size
    up = -h * (1.0 - 1.15 * nz.eye_closure)
    lo = 0.75 * h
    r = ident.iris_radius
    ex_off, ey = ident.eye_offset[0], _EYE_Y + ident.eye_offset[1]
    sclera, lid_up, lid_lo, crease, iris, pupil, glint, brows, centres = [], [], [], [], [], [], [], [], []
    frames_closed, frames_open, shades = [], [], []
    for s in (-1.0, 1.0):
        ex = _MID_X + s * (_EYE_HALF + ex_off)
        tilt = -s * ident.eye_tilt
        sclera.append(_eye_curve(sh, ex, ey, tilt, -w, w, up, _P_LID))
        _eye_curve(sh, ex, ey, tilt, w, -w, lo, _P_ARC)
        lid_up.append(_eye_curve(sh, ex, ey, tilt, -w, w, up, _P_LID))
        _eye_curve(sh, ex, ey, tilt, w, -w, up, _P_LID, -(1.4 * h + 1.5), _P_ARC)
        lid_lo.append(_eye_curve(sh, ex, ey, tilt, -w, w, lo, _P_ARC))
        _eye_curve(sh, ex, ey, tilt, w, -w, lo + 0.9 * h + 1.0, _P_ARC)
        crease.append(_eye_curve(sh, ex, ey, tilt, -0.85 * w, 0.85 * w, -(1.6 * h + 1.0), _P_ARC, dy=-0.3))
        gx, gy = ex + nz.gaze[0] * 0.4 * w, ey + nz.gaze[1] * 0.3 * h
        iris.append(sh.ellipse(gx, gy, r, r, dz=-1.0))
        pupil.append(sh.ellipse(gx, gy, 0.45 * r, 0.45 * r, dz=-1.0))
        glint.append(sh.ellipse(gx - 0.5 * r, gy - 0.45 * r, 0.22 * r, 0.22 * r, dz=-1.0))
        centres.append(sh.pts([(ex, ey)], -1.0))
        # Brow: from above the inner eye corner outwards, arched, tapered, tilted by brow_angle.
        bl, half = ident.brow_length, 0.5 * ident.brow_thickness
        xi, xo = ex - s * 0.45 * bl, ex + s * 0.55 * bl
        rise = math.tan(math.radians(ident.brow_angle)) * bl
        yi, yo = ey - ident.brow_gap + 0.3 * rise, ey - ident.brow_gap - 0.7 * rise
        brows.append(sh.curve(xi, yi - half, xo, yo - 0.55 * half, -ident.brow_arch, _P_BROW))
        sh.curve(xo, yo + 0.55 * half, xi, yi + half, -ident.brow_arch, _P_BROW_REV)
        if ident.glasses == 1:
            frames_closed.append(("e", sh.ellipse(ex, ey + 0.5, w + 4.0, h + 4.0, dz=4.0), _NE))
        elif ident.glasses == 2:
            gw, gh = w + 4.0, h + 4.0
            frames_closed.append(
                (
                    "p",
                    sh.pts(
                        [(ex - gw, ey - gh), (ex + gw, ey - gh), (ex + gw, ey + gh), (ex - gw, ey + gh)], 4.0
                    ),
                    4,
                )
            )
        if ident.glasses:
            frames_open.append(
                (sh.pts([(ex + s * (w + 4.0), ey - 1.0), (cx + s * 0.97 * a, ey + 1.0)], 2.0), 2)
            )
        if nz.occlusion == 1:
            shades.append(sh.ellipse(ex, ey + 0.5, w + 4.5, h + 4.0, dz=5.0))
    if ident.glasses:
        inner_x = _EYE_HALF + ex_off - w - 4.0
        frames_open.append(
            (sh.pts([(_MID_X - inner_x, ey - 1.5), (_MID_X, ey - 2.5), (_MID_X + inner_x, ey - 1.5)], 4.0), 3)
        )
    if nz.occlusion == 1:
        shades_bridge = sh.pts([(_MID_X - 8.0, ey - 1.5), (_MID_X, ey - 2.5), (_MID_X + 8.0, ey - 1.5)], 5.0)

    # Nose: tip (landmark), nostrils, wings, sides of the bridge, shadow under the tip.
    nx, ny = _MID_X, _NOSE_Y + ident.nose_offset
    nw, depth = ident.nose_width, ident.nose_depth
    nose_tip = sh.pts([(nx, ny)], depth)
    nostrils = [sh.ellipse(nx + s * 0.5 * nw, ny + 1.8, 1.5, 0.85, dz=0.45 * depth) for s in (-1.0, 1.0)]
    nose_lines = [sh.segment(nx + s * 0.55 * nw, ny - 1.8, nx + s * 0.55 * nw, ny + 2.9, -s * 0.45 * nw, 0.35 * depth)
                  for s in (-1.0, 1.0)]  # fmt: skip
    top = _EYE_Y + 5.0 + (1.0 - ident.nose_bridge) * 9.0
    bridge = [
        sh.pts_dz([(nx + s * 2.3, top, 0.15 * depth), (nx + s * 2.6, 0.5 * (top + ny), 0.45 * depth),
                   (nx + s * 0.75 * nw, ny - 2.2, 0.7 * depth)])
        for s in (-1.0, 1.0)
    ]  # fmt: skip
    under_tip = sh.pts([(nx - 0.35 * nw, ny + 2.9), (nx, ny + 3.3), (nx + 0.35 * nw, ny + 2.9)], 0.6 * depth)

    # Mouth: a centre line through the corners, lips around it, the opening below it.
    mw, my, smile = ident.mouth_half_width, _MOUTH_Y + ident.mouth_offset, nz.smile
    xl, xr = _MID_X - mw - 0.8 * smile, _MID_X + mw + 0.8 * smile
    yc, dip, gap = my - 2.2 * smile, 2.2 * smile, 7.0 * nz.mouth_open
    lip_up, lip_lo = ident.lip_thickness
    mouth_line = sh.curve(xl, yc, xr, yc, dip, _P_ARC, dz=1.0)
    upper = sh.curve(xl, yc, xr, yc, dip, _P_ARC, -lip_up, _P_BOW, dz=1.0)
    sh.curve(xr, yc, xl, yc, dip, _P_ARC, dz=1.0)
    lower = sh.curve(xl, yc, xr, yc, dip + gap, _P_ARC, dz=1.0)
    sh.curve(xr, yc, xl, yc, dip + gap, _P_ARC, lip_lo, _P_LIP, dz=1.0)
    opening = teeth = -1
    if nz.mouth_open > 0.06:
        opening = sh.curve(xl, yc, xr, yc, dip, _P_ARC, dz=1.0)
        sh.curve(xr, yc, xl, yc, dip + gap, _P_ARC, dz=1.0)
        teeth = sh.curve(xl, yc, xr, yc, dip, _P_ARC, dz=1.0)
        sh.curve(xr, yc, xl, yc, dip + min(gap, 2.4), _P_ARC, dz=1.0)
    moustache = beard = goatee = -1
    if ident.facial_hair in (1, 2, 3):
        moustache = sh.curve(xl + 1.0, yc + 0.2, xr - 1.0, yc + 0.2, dip, _P_ARC, -lip_up, _P_BOW, dz=1.5)
        sh.curve(xr - 1.0, yc - 2.5, xl + 1.0, yc - 2.5, dip - 1.5, _P_ARC, -lip_up, _P_BOW, dz=1.5)
    if ident.facial_hair == 2:
        narrow = 1.0 - (1.0 - ident.jaw_width) * _JAW_SIN**2
        beard = sh.block(
            np.stack([cx + (a + 0.8) * _JAW_COS * narrow, cy + (b + 0.8) * _JAW_SIN], 1), flat=True
        )
        sh.block(np.array([[cx - 0.8 * a, cy + 0.2 * b], [_MID_X - mw - 3.0, my - 3.0],
                           [_MID_X + mw + 3.0, my - 3.0], [cx + 0.8 * a, cy + 0.2 * b]]))  # fmt: skip
    if ident.facial_hair == 3:
        goatee = sh.ellipse(_MID_X, my + lip_lo + 5.5, 0.5 * mw, 6.0, dz=0.5)

    # Age: wrinkles on the forehead, at the outer eye corners, under the eyes and from nose to mouth.
    wrinkles: list[int] = []
    if age > 0.25:
        brow_y = ey - ident.brow_gap - 3.0
        for j in range(3):
            y = brow_y - 5.0 - 4.0 * j
            if y > ident.hairline_y + 3.0:
                wrinkles.append(
                    sh.curve(_MID_X - 13.0 + 2.0 * j, y, _MID_X + 13.0 - 2.0 * j, y, -1.0, _P_ARC)
                )
        for s in (-1.0, 1.0):
            ex = _MID_X + s * (_EYE_HALF + ex_off)
            ox = ex + s * (w + 1.5)
            for dy in (-2.0, 0.0, 2.0):
                wrinkles.append(sh.segment(ox, ey + 0.4 * dy, ox + s * 3.2, ey + dy))
            wrinkles.append(
                sh.segment(nx + s * (nw + 1.5), ny - 1.0, _MID_X + s * (mw + 3.0), my + 3.0, -s * 1.5)
            )
            wrinkles.append(sh.curve(ex - 0.7 * w, ey + lo + 2.4, ex + 0.7 * w, ey + lo + 2.4, 1.2, _P_ARC))
    marks = [sh.ellipse(x, y, rad, rad) for x, y, rad in ident.marks]

    occluder = -1
    if nz.occlusion in (2, 3):
        ocx, ocy, hw, hh, ang = nz.occluder
        if nz.occlusion == 2:
            box = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        else:  # a hand: a rounded palm
            box = np.stack([hw * _UNIT[0], hh * _HAND_Y], 1)
        t = math.radians(ang)
        rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
        occluder = sh.block(box @ rot + (ocx, ocy), flat=True)

    # Project everything, then draw back to front.
    pts = sh.project(ident, nz, affine)
    fx = np.rint(pts * _ONE).astype(np.int32)
    e0, p0, b0 = sh.ellipse0, sh.point0, sh.block0
    blocks = sh.blocks

    def crv(i: int, n: int = 1) -> np.ndarray:
        return fx[_NC * i : _NC * (i + n)]

    def ell(i: int) -> np.ndarray:
        return fx[e0 + _NE * i : e0 + _NE * (i + 1)]

    def blk(i: int, n: int = 1) -> np.ndarray:
        return fx[b0[i] : b0[i + n - 1] + len(blocks[i + n - 1][0])]

    def pt(i: int, n: int) -> np.ndarray:
        return fx[p0 + i : p0 + i + n]

    col = _Palette(nz)
    thick = max(1, round(_linear_gain(affine)))
    skin = _mix(
        ident.skin_rgb, (ident.skin_rgb[0] * 0.9, ident.skin_rgb[1] * 0.86, ident.skin_rgb[2] * 0.8), age
    )
    hair = _mix(ident.hair_rgb, (195.0, 195.0, 195.0), min(1.0, age * ident.greying_rate))
    if style == 0:  # a buzz cut shows the scalp
        hair = _mix(skin, hair, 0.55)
    brow = _mix(ident.hair_rgb, (170.0, 170.0, 170.0), min(1.0, 0.6 * age * ident.greying_rate))
    brow = (0.8 * brow[0], 0.8 * brow[1], 0.8 * brow[2])
    skin_c = col(skin)
    fill, lines = cv2.fillPoly, cv2.polylines

    if img.shape[0] > pts[b0[shirt], 1]:  # the shirt is below a 112 crop
        fill(img, [blk(shirt)], col(nz.clothing_rgb), _AA, _SHIFT)
    if back >= 0:
        fill(img, [blk(back)], col(hair, 0.85), _AA, _SHIFT)
    fill(img, [blk(neck)], col(skin, 0.78), _AA, _SHIFT)
    fill(img, [ell(ears[0]), ell(ears[1])], col(skin, 0.92), _AA, _SHIFT)
    lines(img, [crv(ear_in[0]), crv(ear_in[1])], False, col(skin, 0.7), thick, _AA, _SHIFT)
    fill(img, [blk(head)], skin_c, _AA, _SHIFT)
    if beard >= 0:
        fill(img, [blk(beard, 2)], col(hair, 0.95), _AA, _SHIFT)
    if goatee >= 0:
        fill(img, [ell(goatee)], col(hair, 0.95), _AA, _SHIFT)
    if wrinkles:
        lines(
            img,
            [crv(i) for i in wrinkles],
            False,
            col(skin, 1.0 - 0.3 * (age - 0.25) / 0.75),
            thick,
            _AA,
            _SHIFT,
        )
    if marks:
        fill(img, [ell(i) for i in marks], col(ident.mark_rgb), _AA, _SHIFT)
    fill(img, [blk(hair_outer, 2)], col(hair), _AA, _SHIFT)
    fill(img, [crv(brows[0], 2), crv(brows[1], 2)], col(brow), _AA, _SHIFT)

    fill(img, [crv(sclera[0], 2), crv(sclera[1], 2)], col((238.0, 236.0, 230.0)), _AA, _SHIFT)
    if nz.eye_closure < 0.9:
        fill(img, [ell(iris[0]), ell(iris[1])], col(ident.iris_rgb), _AA, _SHIFT)
        fill(img, [ell(pupil[0]), ell(pupil[1])], col((15.0, 12.0, 12.0)), _AA, _SHIFT)
        fill(img, [ell(glint[0]), ell(glint[1])], col((250.0, 250.0, 250.0)), _AA, _SHIFT)
    fill(
        img, [crv(lid_up[0], 2), crv(lid_up[1], 2), crv(lid_lo[0], 2), crv(lid_lo[1], 2)], skin_c, _AA, _SHIFT
    )
    lines(img, [crv(lid_up[0]), crv(lid_up[1])], False, col(brow, 0.55), thick, _AA, _SHIFT)
    lines(img, [crv(crease[0]), crv(crease[1])], False, col(skin, 0.8), 1, _AA, _SHIFT)

    fill(img, [ell(nostrils[0]), ell(nostrils[1])], col(skin, 0.42), _AA, _SHIFT)
    lines(img, [crv(nose_lines[0]), crv(nose_lines[1]), pt(bridge[0], 3), pt(bridge[1], 3), pt(under_tip, 3)],
          False, col(skin, 0.74), thick, _AA, _SHIFT)  # fmt: skip

    if opening >= 0:
        fill(img, [crv(opening, 2)], col((70.0, 22.0, 28.0)), _AA, _SHIFT)
        fill(img, [crv(teeth, 2)], col((235.0, 230.0, 215.0)), _AA, _SHIFT)
    fill(img, [crv(upper, 2), crv(lower, 2)], col(ident.lip_rgb), _AA, _SHIFT)
    lines(img, [crv(mouth_line)], False, col(ident.lip_rgb, 0.5), thick, _AA, _SHIFT)
    if moustache >= 0:
        fill(img, [crv(moustache, 2)], col(hair), _AA, _SHIFT)

    if frames_closed:
        rims = [ell(i) if kind == "e" else pt(i, n) for kind, i, n in frames_closed]
        lines(img, rims, True, col(ident.glasses_rgb), thick, _AA, _SHIFT)
        lines(img, [pt(i, n) for i, n in frames_open], False, col(ident.glasses_rgb), thick, _AA, _SHIFT)
    if shades:
        fill(img, [ell(shades[0]), ell(shades[1])], col(nz.occluder_rgb), _AA, _SHIFT)
        lines(img, [pt(shades_bridge, 3)], False, col(nz.occluder_rgb), 2 * thick, _AA, _SHIFT)
    if occluder >= 0:
        fill(
            img, [blk(occluder)], col(nz.occluder_rgb) if nz.occlusion == 2 else col(skin, 0.97), _AA, _SHIFT
        )

    land = np.empty((5, 2), dtype=np.float32)
    land[0] = pts[p0 + centres[0]]
    land[1] = pts[p0 + centres[1]]
    land[2] = pts[p0 + nose_tip]
    land[3] = pts[_NC * mouth_line]
    land[4] = pts[_NC * mouth_line + _NC - 1]
    return land


_NOISE_BANK_LEN = 1 << 20  # unit Gaussian floats: 4 MiB, made on first use
_noise_bank: np.ndarray | None = None
_RAMP = np.arange(4096, dtype=np.float32)


def _noise_patch(seed: int, h: int, w: int) -> np.ndarray:
    """Unit Gaussian noise float32 [h, w, 3] for ``seed``: a contiguous run of a fixed bank, or fresh if large."""
    global _noise_bank
    n = h * w * 3
    if n > _NOISE_BANK_LEN // 4:
        return np.random.default_rng(seed).standard_normal((h, w, 3), dtype=np.float32)
    if _noise_bank is None:
        _noise_bank = np.random.default_rng(20240611).standard_normal(_NOISE_BANK_LEN, dtype=np.float32)
    start = ((seed * 2654435761) & 0xFFFFFFFF) % (_NOISE_BANK_LEN - n + 1)  # Knuth's multiplicative hash
    return _noise_bank[start : start + n].reshape(h, w, 3)


def _finish(img: np.ndarray, nz: Nuisance, view: np.ndarray) -> np.ndarray:
    """Blur, the light gradient and noise on the drawn image (gain and cast are in the colours)."""
    h, w = img.shape[:2]
    sigma = nz.blur_sigma * _linear_gain(view)
    if sigma >= 0.3:
        k = 2 * math.ceil(2.5 * sigma) + 1
        img = cv2.GaussianBlur(img, (k, k), sigma)
    light = None
    if nz.light_strength > 0.0:
        # Gain 1 + strength * (d . (q - (56, 56))) / 56 at q = view^-1(pixel): defined in the aligned frame.
        inv = cv2.invertAffineTransform(view)
        dx, dy = math.cos(nz.light_angle), math.sin(nz.light_angle)
        ls = nz.light_strength / 56.0
        kx = ls * (dx * inv[0, 0] + dy * inv[1, 0])
        ky = ls * (dx * inv[0, 1] + dy * inv[1, 1])
        k0 = 1.0 + ls * (dx * (inv[0, 2] - 56.0) + dy * (inv[1, 2] - 56.0))
        grad = np.add.outer(np.float32(ky) * _RAMP[:h], np.float32(k0) + np.float32(kx) * _RAMP[:w])
        np.maximum(grad, 0.05, out=grad)
        light = cv2.cvtColor(grad, cv2.COLOR_GRAY2RGB)
    if nz.noise_sigma <= 0.0:
        return img if light is None else cv2.multiply(img, light, dtype=cv2.CV_8U)
    out = img.astype(np.float32) if light is None else cv2.multiply(img, light, dtype=cv2.CV_32F)
    out = cv2.scaleAdd(_noise_patch(nz.noise_seed, h, w), float(nz.noise_sigma), out)
    return cv2.add(out, (0.0, 0.0, 0.0, 0.0), dtype=cv2.CV_8U)  # type: ignore[call-overload]  # rounds, saturates


def _background(nz: Nuisance, h: int, w: int) -> np.ndarray:
    col = _Palette(nz)
    corners = np.array([col(c) for c in nz.background], dtype=np.float64).reshape(2, 2, 3)
    return cv2.resize(np.rint(corners).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)


_IDENTITY_VIEW = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def render_face(identity: IdentityParams, nuisance: Nuisance) -> tuple[np.ndarray, np.ndarray]:
    """Draw the aligned 112x112 image of ``identity`` under ``nuisance``.

    Args:
        identity: the person (see :func:`sample_identity`).
        nuisance: the imaging conditions (see :func:`sample_nuisance`); its JPEG quality is not applied.

    Returns:
        ``(image, landmarks)``: uint8 RGB ``[112, 112, 3]``, and float32 ``[5, 2]`` (x, y) pixels of the
        left eye, right eye, nose tip, left and right mouth corners; at zero pose near the ArcFace
        template, moved by pose and jitter. A pure function of its arguments.
    """
    img = _background(nuisance, _SIZE, _SIZE)
    land = _draw_person(img, identity, nuisance, _face_affine(identity, nuisance, _IDENTITY_VIEW))
    return _finish(img, nuisance, _IDENTITY_VIEW), land


def _clutter(img: np.ndarray, rng: np.random.Generator, n: int, col: _Palette) -> None:
    """Draw ``n`` random rectangles, ellipses and thick lines (background objects) onto ``img``."""
    h, w = img.shape[:2]
    kinds = rng.integers(0, 3, size=n).tolist()
    geo = rng.random((n, 5)).tolist()
    cols = (rng.random((n, 3)) * 230.0 + 10.0).tolist()
    for kind, g, c in zip(kinds, geo, cols):
        colour = col((c[0], c[1], c[2]))
        x0, y0 = int(g[0] * w), int(g[1] * h)
        sx, sy = int(4 + g[2] * w * 0.4), int(4 + g[3] * h * 0.4)
        if kind == 0:
            cv2.rectangle(img, (x0 - sx, y0 - sy), (x0 + sx, y0 + sy), colour, -1, _AA)
        elif kind == 1:
            cv2.ellipse(img, (x0, y0), (sx, sy), g[4] * 180.0, 0.0, 360.0, colour, -1, _AA)
        else:
            cv2.line(img, (x0 - sx, y0 + sy), (x0 + sx, y0 - sy), colour, 1 + int(g[4] * 6), _AA)


def render_loose_crop(
    identity: IdentityParams,
    nuisance: Nuisance,
    rng: np.random.Generator,
    size: tuple[int, int] = (160, 160),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``identity`` not aligned: scaled, rotated and shifted inside a larger cluttered canvas.

    The face is the one :func:`render_face` draws under the same nuisance (pose, expression, light,
    blur and occlusion included), mapped by a random similarity transform, with shoulders and
    background objects around it; aligning this image with its landmarks gives back (up to
    resampling, background and noise) the aligned render.

    Args:
        identity: the person.
        nuisance: the imaging conditions.
        rng: draws the placement (scale 0.8-1.3 x ``min(size) / 160`` of the aligned face, rotation
            within +-20 degrees, the head centre within +-12 % of the canvas centre) and the clutter.
        size: ``(width, height)`` of the canvas in pixels, each >= 64.

    Returns:
        ``(image, landmarks)``: uint8 RGB ``[height, width, 3]`` and float32 ``[5, 2]`` (x, y) pixels of
        the five landmarks in this image (same order as :func:`render_face`).

    Raises:
        ValueError: ``size`` is not two ints >= 64.
    """
    if len(size) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 64 for v in size
    ):
        raise ValueError(f"render_loose_crop: size must be (width, height), two ints >= 64, got {size!r}")
    w, h = int(size[0]), int(size[1])
    u = rng.random(5).tolist()
    scale = (0.8 + 0.5 * u[0]) * min(w, h) / 160.0
    view = cv2.getRotationMatrix2D((56.0, 60.0), 40.0 * (u[1] - 0.5), scale)
    view[0, 2] += w / 2.0 + (u[2] - 0.5) * 0.24 * w - 56.0
    view[1, 2] += h / 2.0 + (u[3] - 0.5) * 0.24 * h - 60.0
    img = _background(nuisance, h, w)
    _clutter(img, rng, 4 + int(u[4] * 8), _Palette(nuisance))
    land = _draw_person(img, identity, nuisance, _face_affine(identity, nuisance, view))
    return _finish(img, nuisance, view), land


# --------------------------------------------------------------------------------------------------
# The indexable set

_IDENTITY_STREAM, _IMAGE_STREAM, _LOOSE_STREAM = 0, 1, 2


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"SyntheticFaces: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_knobs(name: str, value: float | Sequence[float]) -> float | tuple[float, ...]:
    """A knob that is one number or a non-empty sequence of them (one per image index modulo its length)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(
                f"SyntheticFaces: {name} must be a number or a non-empty sequence, got {value!r}"
            )
        return tuple(_check_knob("SyntheticFaces", name, v) for v in value)
    return _check_knob("SyntheticFaces", name, value)  # type: ignore[arg-type]


class SyntheticFaces:
    """A deterministic, indexable set of synthetic aligned faces.

    Item ``i`` is image ``j = i % images_per_identity`` of identity ``k = i // images_per_identity``;
    its label is ``k`` (0-based within the set). See the module docstring for the knobs and seeds.

    Args:
        num_identities: identities in the set (>= 1).
        images_per_identity: images of each (>= 1).
        seed: the set's seed (>= 0); the same seed gives the same bytes on every machine.
        difficulty: nuisance strength (>= 0): 0 clean, 1 default, 2 hard.
        pose_scale: extra multiplier on pose (CPLFW-like: ~3), or a sequence of them: image ``j`` of
            every identity then uses ``pose_scale[j % len(pose_scale)]`` (a training set whose pose
            range covers that of the evaluation sets, as real training sets do).
        age_scale: extra multiplier on the age-like change (CALFW-like: ~4), or a sequence as above.
        identity_offset: the first global identity id (>= 0); disjoint ranges give disjoint people.

    Attributes:
        labels: int64 ``[len(self)]``, the label of every item.
    """

    def __init__(
        self,
        num_identities: int,
        images_per_identity: int,
        seed: int,
        difficulty: float = 1.0,
        pose_scale: float | Sequence[float] = 1.0,
        age_scale: float | Sequence[float] = 1.0,
        identity_offset: int = 0,
    ) -> None:
        self.num_identities = _check_int("num_identities", num_identities, 1)
        self.images_per_identity = _check_int("images_per_identity", images_per_identity, 1)
        self.seed = _check_int("seed", seed, 0)
        self.identity_offset = _check_int("identity_offset", identity_offset, 0)
        self.difficulty = _check_knob("SyntheticFaces", "difficulty", difficulty)
        self.pose_scale = _check_knobs("pose_scale", pose_scale)
        self.age_scale = _check_knobs("age_scale", age_scale)
        self.labels: np.ndarray = np.repeat(
            np.arange(self.num_identities, dtype=np.int64), self.images_per_identity
        )
        self._identities: dict[int, IdentityParams] = {}

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def _split(self, index: int) -> tuple[int, int]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"SyntheticFaces: index must be an int, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"SyntheticFaces: index {index} out of range for {n} images")
        k, j = divmod(i, self.images_per_identity)
        return k, j

    def identity(self, k: int) -> IdentityParams:
        """The parameters of the set's identity ``k`` (0-based), i.e. of global identity ``identity_offset + k``."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_identities:
            raise IndexError(
                f"SyntheticFaces: identity {k!r} out of range for {self.num_identities} identities"
            )
        got = self._identities.get(int(k))
        if got is None:
            seq = np.random.SeedSequence([self.seed, _IDENTITY_STREAM, self.identity_offset + int(k)])
            got = sample_identity(np.random.default_rng(seq))
            if len(self._identities) >= 4096:  # bounded memory; identities are cheap to redraw
                self._identities.clear()
            self._identities[int(k)] = got
        return got

    def nuisance(self, index: int) -> Nuisance:
        """The nuisance of item ``index``."""
        k, j = self._split(index)
        seq = np.random.SeedSequence([self.seed, _IMAGE_STREAM, self.identity_offset + k, j])
        pose = (
            self.pose_scale[j % len(self.pose_scale)]
            if isinstance(self.pose_scale, tuple)
            else self.pose_scale
        )
        age = self.age_scale[j % len(self.age_scale)] if isinstance(self.age_scale, tuple) else self.age_scale
        return sample_nuisance(np.random.default_rng(seq), self.difficulty, pose, age)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """``(image uint8 [112, 112, 3] RGB, label, landmarks float32 [5, 2])`` of item ``index``."""
        k, _ = self._split(index)
        image, land = render_face(self.identity(k), self.nuisance(index))
        return image, k, land

    def loose_item(
        self, index: int, size: tuple[int, int] = (160, 160)
    ) -> tuple[np.ndarray, int, np.ndarray]:
        """Item ``index`` as a loose crop (see :func:`render_loose_crop`): ``(image, label, landmarks)``."""
        k, j = self._split(index)
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, _LOOSE_STREAM, self.identity_offset + k, j])
        )
        image, land = render_loose_crop(self.identity(k), self.nuisance(index), rng, size)
        return image, k, land
