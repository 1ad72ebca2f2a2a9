"""Deterministic synthetic face data set (the project's embedded default data).

Nothing here is a real face and nothing is downloaded.  Every *identity* is a
random vector of cartoon-face parameters (face outline, skin tone, eyes, brows,
nose, mouth, hair, ears, optional beard/moustache/glasses, moles and a smooth
identity-specific skin texture) drawn from ``np.random.default_rng`` seeded by
``(seed, i)``.  Every *image* renders that identity with per-image nuisance drawn
from an RNG seeded by ``(seed, i, j)``: in-plane rotation, shift, scale, a
yaw-like cylindrical horizontal warp, expression (smile, open mouth, eye
openness, brow raise), background and clothing colour, a lighting gradient,
brightness/contrast, white balance, optional blur and Gaussian noise.

Because image ``j`` of identity ``i`` depends only on ``(seed, i, j)`` (and the
config), generating a subset of identities, or generating in another order,
gives bit-identical pixels.

The nuisance is tuned so that raw-pixel cosine similarity is a weak face
verifier (roughly 60-70 % on identity-disjoint pairs) while a small CNN trained
on other identities verifies clearly better (>= 80 %).

On-disk layout (:func:`write_identity_folder`) follows LFW naming so that
LFW-style ``pairs.txt`` files (:func:`write_pairs_file`) work unchanged::

    root/id_00007/id_00007_0001.png
    root/SYNTHETIC.md
    root/manifest.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from fedface.io import atomic_write_text

__all__ = [
    "GENERATOR_VERSION",
    "IdentityParams",
    "SyntheticConfig",
    "generate",
    "identity_name",
    "identity_params",
    "image_filename",
    "make_montage",
    "make_pairs",
    "render_image",
    "write_identity_folder",
    "write_pairs_file",
]

#: Bump when the rendering changes so that cached folders are not silently reused.
GENERATOR_VERSION = 1

_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


@dataclass
class SyntheticConfig:
    """Configuration of the synthetic data set.

    Nuisance strengths are multipliers/amplitudes; setting one to 0 disables that
    nuisance (all zero gives a canonical, frontal, evenly lit rendering).
    """

    num_identities: int = 400
    images_per_identity: int = 10
    size: int = 112
    seed: int = 0
    rotation_deg: float = 12.0  # max |in-plane rotation| in degrees
    shift: float = 0.06  # max |translation| as a fraction of the image size
    scale: float = 0.10  # scale drawn from [1 - scale, 1 + scale]
    yaw: float = 0.35  # max |yaw| in radians of the cylindrical horizontal warp
    lighting: float = 0.45  # max strength of the directional lighting gradient
    brightness: float = 0.08  # max |additive brightness offset| (in [0, 1] units)
    contrast: float = 0.15  # contrast drawn from [1 - contrast, 1 + contrast]
    color_cast: float = 0.03  # max |per-channel white-balance gain change|
    expression: float = 1.0  # strength of smile/open mouth/eye openness/brow raise
    noise: float = 0.02  # Gaussian pixel noise std (in [0, 1] units)
    blur: float = 0.8  # max Gaussian blur sigma in pixels at 112 px (scaled with size)
    blur_prob: float = 0.15  # probability that an image is blurred
    background: float = 1.0  # amount of per-image background/clothing colour variation

    def __post_init__(self) -> None:
        if self.num_identities < 1:
            raise ValueError("num_identities must be >= 1")
        if self.images_per_identity < 1:
            raise ValueError("images_per_identity must be >= 1")
        if self.size < 16:
            raise ValueError("size must be >= 16")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class IdentityParams:
    """Identity parameters in normalised face-frame coordinates (image = unit square)."""

    index: int
    face_cy: float
    face_a: float  # half width
    face_b: float  # half height
    jaw: float  # chin narrowing (0 = ellipse)
    skin: tuple[float, float, float]
    ear_size: float
    ear_dy: float
    hair_color: tuple[float, float, float]
    hair_style: int  # 0 bald, 1 short, 2 medium, 3 long, 4 bangs
    hairline: float  # hairline height above face centre as a fraction of face_b
    hair_volume: float
    hair_part: float  # -1..1 asymmetry of the hairline
    eye_dx: float
    eye_dy: float
    eye_w: float
    eye_h: float  # height/width ratio when fully open
    eye_tilt: float  # degrees
    iris_color: tuple[float, float, float]
    iris_ratio: float
    brow_dy: float
    brow_thick: float
    brow_len: float
    brow_angle: float  # degrees, positive = outer end raised
    brow_arch: float
    brow_color: tuple[float, float, float]
    nose_len: float
    nose_w: float
    nose_shade: float
    mouth_dy: float
    mouth_w: float
    lip_thick: float
    lip_color: tuple[float, float, float]
    moustache: bool
    beard: bool
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_color: tuple[float, float, float]
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius) in face frame
    texture: np.ndarray = field(repr=False, compare=False)  # (5, 5, 3) smooth skin texture


_SKIN_STOPS = np.array(
    [[0.98, 0.85, 0.76], [0.90, 0.72, 0.58], [0.76, 0.55, 0.40], [0.55, 0.37, 0.26],
     [0.36, 0.24, 0.17]]
)
_HAIR = np.array(
    [[0.07, 0.06, 0.05], [0.22, 0.14, 0.08], [0.42, 0.28, 0.15], [0.80, 0.66, 0.40],
     [0.60, 0.25, 0.10], [0.62, 0.62, 0.62], [0.90, 0.90, 0.88]]
)
_HAIR_P = np.array([0.28, 0.24, 0.18, 0.12, 0.07, 0.07, 0.04])
_IRIS = np.array(
    [[0.30, 0.18, 0.08], [0.15, 0.09, 0.05], [0.30, 0.50, 0.75], [0.30, 0.55, 0.35],
     [0.50, 0.55, 0.58]]
)
_IRIS_P = np.array([0.35, 0.25, 0.18, 0.12, 0.10])


def _t3(x) -> tuple[float, float, float]:
    x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
    return (float(x[0]), float(x[1]), float(x[2]))


@lru_cache(maxsize=8192)
def _identity_params_cached(seed: int, i: int) -> IdentityParams:
    rng = np.random.default_rng([seed, 0x1D, i])
    u = rng.uniform

    t = u(0, len(_SKIN_STOPS) - 1)
    k = min(int(t), len(_SKIN_STOPS) - 2)
    skin = _SKIN_STOPS[k] * (1 - (t - k)) + _SKIN_STOPS[k + 1] * (t - k)
    skin = skin * (1 + rng.normal(0, 0.04, 3))

    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * (1 + rng.normal(0, 0.12, 3))
    hair = hair + rng.normal(0, 0.02, 3)
    if rng.uniform() < 0.3:  # dyed / fantasy hair: any hue
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(100, 230), rng.uniform(80, 220)]]])
        hair = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0] / 255.0
    brow = hair * 0.7 if hair.mean() < 0.5 else hair * 0.55
    iris = _IRIS[rng.choice(len(_IRIS), p=_IRIS_P)] * (1 + rng.normal(0, 0.1, 3))
    lip = 0.6 * skin + 0.4 * np.array([0.75, 0.25, 0.25]) + rng.normal(0, 0.03, 3)

    face_a = u(0.19, 0.30)
    face_b = u(0.26, 0.37)
    male = rng.uniform() < 0.5
    n_moles = int(rng.integers(0, 4))
    moles = tuple(
        (float(u(-0.7, 0.7) * face_a), float(u(-0.3, 0.8) * face_b), float(u(0.006, 0.014)))
        for _ in range(n_moles)
    )
    tex = np.empty((5, 5, 3), np.float32)
    lum = rng.normal(0, 0.12, (5, 5))
    tex[:] = lum[..., None]
    tex += rng.normal(0, 0.035, (5, 5, 3))
    tex.flags.writeable = False  # shared through the cache
    gl = int(rng.choice(3, p=[0.8, 0.1, 0.1]))
    return IdentityParams(
        index=i,
        face_cy=u(0.49, 0.54),
        face_a=face_a,
        face_b=face_b,
        jaw=u(0.0, 0.45),
        skin=_t3(skin),
        ear_size=u(0.035, 0.065),
        ear_dy=u(-0.05, 0.04),
        hair_color=_t3(hair),
        hair_style=int(rng.choice(5, p=[0.08, 0.32, 0.2, 0.25, 0.15])),
        hairline=u(0.45, 0.8),
        hair_volume=u(0.02, 0.09),
        hair_part=u(-1, 1),
        eye_dx=u(0.07, 0.14),
        eye_dy=u(-0.08, 0.01),
        eye_w=u(0.03, 0.058),
        eye_h=u(0.38, 0.72),
        eye_tilt=u(-12, 12),
        iris_color=_t3(iris),
        iris_ratio=u(0.45, 0.75),
        brow_dy=u(0.035, 0.07),
        brow_thick=u(0.006, 0.024),
        brow_len=u(1.0, 1.5),
        brow_angle=u(-15, 15),
        brow_arch=u(-0.008, 0.02),
        brow_color=_t3(brow),
        nose_len=u(0.05, 0.14),
        nose_w=u(0.02, 0.055),
        nose_shade=u(0.08, 0.22),
        mouth_dy=u(0.12, 0.21),
        mouth_w=u(0.045, 0.13),
        lip_thick=u(0.006, 0.018),
        lip_color=_t3(lip),
        moustache=bool(male and rng.uniform() < 0.3),
        beard=bool(male and rng.uniform() < 0.25),
        glasses=gl,
        glasses_color=_t3(rng.uniform(0.0, 0.5, 3)),
        moles=moles,
        texture=tex,
    )


def identity_params(config: SyntheticConfig, i: int) -> IdentityParams:
    """Identity parameters of identity ``i`` (depends only on ``config.seed`` and ``i``)."""
    if not 0 <= i:
        raise ValueError(f"identity index must be >= 0, got {i}")
    return _identity_params_cached(int(config.seed), int(i))


def identity_name(i: int) -> str:
    """Folder / LFW name of identity ``i``: ``id_00007``."""
    return f"id_{int(i):05d}"


def image_filename(i: int, j: int, ext: str = "png") -> str:
    """LFW-style relative path of image ``j`` (0-based) of identity ``i``."""
    name = identity_name(i)
    return f"{name}/{name}_{int(j) + 1:04d}.{ext}"


# --------------------------------------------------------------------------- drawing


class _Pen:
    """Draws in normalised coordinates on a uint8 RGB canvas with sub-pixel AA."""

    __slots__ = ("dx", "img", "s")

    def __init__(self, img: np.ndarray, dx: float = 0.0):
        self.img = img
        self.s = img.shape[0] * _ONE
        self.dx = dx  # horizontal offset (yaw parallax) for interior features

    def p(self, x: float, y: float) -> tuple[int, int]:
        return (int((x + self.dx) * self.s + 0.5), int(y * self.s + 0.5))

    def pts(self, xy: np.ndarray, dy: float = 0.0) -> np.ndarray:
        return np.rint((xy + (self.dx, dy)) * self.s).astype(np.int32)

    def ellipse(self, x, y, a, b, color, angle=0.0, thickness=-1):
        ax = (max(1, int(a * self.s + 0.5)), max(1, int(b * self.s + 0.5)))
        cv2.ellipse(self.img, self.p(x, y), ax, angle, 0, 360, color, thickness, _AA, _SHIFT)

    def poly(self, xy: np.ndarray, color, dy: float = 0.0):
        cv2.fillPoly(self.img, [self.pts(xy, dy)], color, _AA, _SHIFT)

    def lines(self, xy: np.ndarray, color, thickness: int, closed: bool = False):
        cv2.polylines(self.img, [self.pts(xy)], closed, color, thickness, _AA, _SHIFT)


def _c(rgb) -> tuple[int, int, int]:
    return (int(rgb[0] * 255 + 0.5), int(rgb[1] * 255 + 0.5), int(rgb[2] * 255 + 0.5))


def _rot(xy: np.ndarray, deg: float, cx: float, cy: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    x = xy[:, 0] - cx
    y = xy[:, 1] - cy
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _xy(x, y) -> np.ndarray:
    return np.stack([np.broadcast_to(x, np.shape(y)) if np.ndim(x) == 0 else x,
                     np.broadcast_to(y, np.shape(x)) if np.ndim(y) == 0 else y], axis=1)


_T40 = np.linspace(0, 2 * np.pi, 40, endpoint=False)
_T16 = np.linspace(-1, 1, 16)  # parameter along lips, brows, lids
_CX = 0.5  # horizontal face centre


class _Prep:
    """Per-identity geometry and colours, precomputed once (cached)."""


@lru_cache(maxsize=8192)
def _prepare(seed: int, i: int) -> _Prep:
    p = _identity_params_cached(seed, i)
    q = _Prep()
    cx, fa, fb, fcy = _CX, p.face_a, p.face_b, p.face_cy
    skin = np.array(p.skin)
    q.p = p
    q.skin, q.skin_dark, q.hair = _c(skin), _c(skin * 0.82), _c(p.hair_color)
    q.brow, q.iris, q.lip = _c(p.brow_color), _c(p.iris_color), _c(p.lip_color)
    q.lip_line = _c(np.array(p.lip_color) * 0.5)
    q.nshade = _c(skin * (1 - p.nose_shade))
    q.nostril = _c(skin * 0.45)
    q.mole = _c(skin * 0.4)
    q.glasses = _c(p.glasses_color)

    ct, st = np.cos(_T40), np.sin(_T40)
    w = 1.0 - p.jaw * np.clip(st, 0, None) ** 2
    q.outline = _xy(cx + fa * ct * w, fcy + fb * st)
    nw = fa * 0.55
    q.neck = np.array([[cx - nw, fcy + 0.1], [cx + nw, fcy + 0.1], [cx + nw, fcy + fb + 0.09],
                       [cx - nw, fcy + fb + 0.09]])
    q.long_hair = None
    if p.hair_style == 3:
        wl = fa + p.hair_volume + 0.02
        q.long_hair = np.array([[cx - wl, fcy], [cx + wl, fcy], [cx + wl * 1.05, fcy + fb + 0.12],
                                [cx - wl * 1.05, fcy + fb + 0.12]])
    q.hair_top = None
    if p.hair_style != 0:
        top = fcy - fb - p.hair_volume
        hl = fcy - fb * p.hairline
        xs = cx + (fa + 0.02) * _T16
        line = hl + 0.04 * ((xs - cx) / fa) ** 2 - 0.02 * p.hair_part * (xs - cx) / fa
        if p.hair_style == 4:  # bangs: straight fringe lower on the forehead
            line = np.full_like(xs, fcy - fb * 0.35) + 0.015 * np.sin(xs * 90)
        arc_t = np.linspace(np.pi, 2 * np.pi, 20)
        arc = _xy(cx + (fa + 0.015) * np.cos(arc_t), fcy - 0.01 + (fcy - 0.01 - top) * np.sin(arc_t))
        side_y = fcy - 0.01 if p.hair_style in (2, 3, 4) else hl + 0.03
        q.hair_top = np.concatenate([[[cx - fa - 0.015, side_y]], arc,
                                     [[cx + fa + 0.015, side_y]], _xy(xs[::-1], line[::-1])])

    # eyes: lid(open) = lid0 + open * lid1 ; brows are shifted by -brow_raise
    ey = fcy + p.eye_dy
    q.ey = ey
    q.eyes = []
    t = _T16
    for sgn in (-1, 1):
        ex = cx + sgn * p.eye_dx
        tilt = -sgn * p.eye_tilt
        arc_u = _rot(_xy(ex + p.eye_w * 1.05 * t, ey - p.eye_w * p.eye_h * np.sqrt(1 - t ** 2)),
                     tilt, ex, ey)
        flat = _rot(_xy(ex + p.eye_w * 1.05 * t, np.full_like(t, ey)), tilt, ex, ey)
        lid0 = np.concatenate([flat, flat[::-1] + (0, -0.006)])
        lid1 = np.concatenate([arc_u - flat, (arc_u - flat)[::-1]])
        by = ey - p.brow_dy
        bx = ex + p.eye_w * p.brow_len * t
        byy = by - p.brow_arch * (1 - t ** 2)
        upper = _xy(bx, byy - p.brow_thick * (1 - 0.5 * (t * sgn + 1) / 2))
        brow = _rot(np.concatenate([upper, _xy(bx, byy)[::-1]]), -sgn * p.brow_angle, ex, by)
        q.eyes.append((ex, float(tilt), lid0, lid1, brow))

    ntop, ntip = ey + 0.01, ey + p.nose_len
    q.ntip = ntip
    q.nose0 = np.array([[cx - 0.008, ntop], [cx + 0.006, ntop], [cx + p.nose_w * 0.6, ntip],
                        [cx, ntip + 0.012], [cx - p.nose_w * 0.5, ntip]])
    q.nose_move = np.array([0, 0, 1, 1, 1], float)[:, None] * (1.0, 0.0)  # tip moves with yaw

    my = fcy + p.mouth_dy
    q.my = my
    q.mouth_x = cx + p.mouth_w * t
    q.beard = q.moustache = None
    if p.beard:
        bt = np.linspace(0.12 * np.pi, 0.88 * np.pi, 24)
        outer = _xy(cx + fa * 0.93 * np.cos(bt) * (1 - p.jaw * np.sin(bt) ** 2),
                    fcy + fb * 1.02 * np.sin(bt))
        inner = _xy(cx + p.mouth_w * 1.2 * np.cos(bt[::-1]), my + 0.02 + 0.03 * np.sin(bt[::-1]))
        q.beard = np.concatenate([outer, inner])
    if p.moustache:
        mx = cx + p.mouth_w * 1.1 * t
        q.moustache = np.concatenate([_xy(mx, my - 0.03 + 0.008 * t ** 2),
                                      _xy(mx[::-1], my - 0.008 + 0.01 * t[::-1] ** 2)])
    return q


@lru_cache(maxsize=4096)
def _texture_patch(seed: int, i: int, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Identity texture (minus 1, times the AA face mask) over the face box (cached)."""
    p = _identity_params_cached(seed, i)
    q = _prepare(seed, i)
    x0 = max(math.floor((_CX - p.face_a) * size) - 1, 0)
    y0 = max(math.floor((p.face_cy - p.face_b) * size) - 1, 0)
    w = min(math.ceil(2 * p.face_a * size) + 3, size - x0)
    h = min(math.ceil(2 * p.face_b * size) + 3, size - y0)
    up = cv2.resize(p.texture, (w, h), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((h, w), np.uint8)
    pts = np.rint((q.outline * size - (x0, y0)) * _ONE).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, _AA, _SHIFT)
    gain = 1.0 + up * (mask.astype(np.float32) * (1.0 / 255.0))[..., None]
    return gain.astype(np.float32), x0, y0


@lru_cache(maxsize=8)
def _base_grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    gx, gy = np.meshgrid(c, c)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    return gx, gy, ramp


def render_image(config: SyntheticConfig, i: int, j: int) -> np.ndarray:
    """Render image ``j`` of identity ``i`` as a ``(size, size, 3)`` uint8 RGB array.

    Depends only on ``(config, i, j)``; ``i`` and ``j`` need not lie inside
    ``num_identities`` / ``images_per_identity``.
    """
    cfg = config
    S = int(cfg.size)
    seed, i, j = int(cfg.seed), int(i), int(j)
    if i < 0 or j < 0:
        raise ValueError(f"identity and image indices must be >= 0, got ({i}, {j})")
    q = _prepare(seed, i)
    p = q.p
    rng = np.random.default_rng([seed, 0x1A, i, j])
    u = rng.uniform

    # ---- per-image nuisance draws (fixed order: keeps determinism simple)
    rot = u(-1, 1) * cfg.rotation_deg
    tx, ty = u(-1, 1, 2) * cfg.shift
    sc = 1.0 + u(-1, 1) * cfg.scale
    yaw = u(-1, 1) * cfg.yaw
    smile = u(-1, 1) * cfg.expression
    mouth_open = max(0.0, u(-0.6, 1.0)) * cfg.expression
    eye_open = 1.0 - u(0.0, 0.55) * min(cfg.expression, 1.0)
    brow_raise = u(-0.006, 0.014) * cfg.expression
    bg_a = np.array([0.55, 0.6, 0.65]) + u(-0.3, 0.3, 3) * cfg.background
    bg_b = bg_a + u(-0.25, 0.25, 3) * cfg.background
    shirt = np.array([0.4, 0.4, 0.5]) + u(-0.35, 0.45, 3) * cfg.background
    light_dir = u(0, 2 * np.pi)
    light = u(0, 1) * cfg.lighting
    bright = u(-1, 1) * cfg.brightness
    contrast = 1.0 + u(-1, 1) * cfg.contrast
    cast = 1.0 + u(-1, 1, 3) * cfg.color_cast
    blur_sigma = u(0.3, 1.0) * cfg.blur * S / 112.0 if u() < cfg.blur_prob else 0.0

    # ---- background (vertical gradient), clothing, identity-static head
    gx, gy, ramp = _base_grid(S)
    a3 = np.clip(bg_a, 0, 1).astype(np.float32) * 255
    b3 = np.clip(bg_b, 0, 1).astype(np.float32) * 255
    col = (a3 + ramp * (b3 - a3) + 0.5).astype(np.uint8)  # (S, 3)
    img = np.empty((S, S, 3), np.uint8)
    img[:] = col[:, None, :]
    cx, fa, fb, fcy = _CX, p.face_a, p.face_b, p.face_cy
    pen = _Pen(img)
    pen.ellipse(cx, fcy + fb + 0.30, fa * 2.0, 0.24, _c(np.clip(shirt, 0, 1)))
    if q.long_hair is not None:
        pen.ellipse(cx, fcy - 0.02, fa + p.hair_volume + 0.03, fb + p.hair_volume + 0.01, q.hair)
        pen.poly(q.long_hair, q.hair)
    pen.poly(q.neck, q.skin_dark)
    ey = fcy + p.ear_dy
    for sgn in (-1, 1):
        pen.ellipse(cx + sgn * (fa - 0.005), ey, p.ear_size * 0.6, p.ear_size, q.skin_dark)
        pen.ellipse(cx + sgn * (fa - 0.002), ey, p.ear_size * 0.35, p.ear_size * 0.7, q.skin)
    if p.hair_style != 0:
        pen.ellipse(cx, fcy - 0.01, fa + 0.012 + p.hair_volume * 0.3,
                    fb + p.hair_volume * 0.5, q.hair)
    pen.poly(q.outline, q.skin)
    gain, x0, y0 = _texture_patch(seed, i, S)
    h, w = gain.shape[:2]
    sub = img[y0:y0 + h, x0:x0 + w]
    np.copyto(sub, np.minimum(sub * gain, 255.0), casting="unsafe")
    if q.hair_top is not None:
        pen.poly(q.hair_top, q.hair)
        if p.hair_style in (2, 3):  # hair covering the ears
            for sgn in (-1, 1):
                pen.ellipse(cx + sgn * (fa + 0.005), fcy - 0.02, 0.03, fb * 0.55, q.hair)

    # ---- interior features, with yaw parallax and expression
    pen.dx = -0.06 * yaw
    ey = q.ey
    ew, eh = p.eye_w, p.eye_w * p.eye_h * eye_open
    ir = p.eye_w * p.iris_ratio
    irh = min(ir, eh)
    for ex, tilt, lid0, lid1, brow in q.eyes:
        pen.ellipse(ex, ey, ew, max(eh, 0.004), (240, 240, 236), tilt)
        pen.ellipse(ex, ey, ir * 0.9, irh, q.iris, tilt)
        pen.ellipse(ex, ey, ir * 0.4, min(ir * 0.4, irh * 0.8), (20, 15, 15), tilt)
        pen.poly(lid0 + eye_open * lid1, (40, 30, 30))
        pen.poly(brow, q.brow, dy=-brow_raise)
    ndx = -0.03 * yaw
    pen.poly(q.nose0 + ndx * q.nose_move, q.nshade)
    for sgn in (-1, 1):
        pen.ellipse(cx + ndx + sgn * p.nose_w * 0.45, q.ntip + 0.004, p.nose_w * 0.22, 0.006,
                    q.nostril)
    if q.beard is not None:
        pen.poly(q.beard, q.hair)
    if q.moustache is not None:
        pen.poly(q.moustache, q.hair)
    # mouth: two lip curves, curvature = smile (> 0: corners up)
    t2 = 1 - _T16 ** 2
    centre = q.my - 0.022 * smile * t2
    gap = 0.0035 + 0.02 * mouth_open * t2
    st2 = np.sqrt(t2) * p.lip_thick
    mxs = q.mouth_x
    pen.poly(np.concatenate([_xy(mxs, centre - gap / 2 - st2),
                             _xy(mxs, centre + gap / 2 + 1.3 * st2)[::-1]]), q.lip)
    if mouth_open > 0.05:
        pen.poly(np.concatenate([_xy(mxs, centre - gap / 2), _xy(mxs, centre + gap / 2)[::-1]]),
                 (60, 20, 25))
    else:
        pen.lines(_xy(mxs, centre), q.lip_line, 1)
    for mx_, my_, mr in p.moles:
        pen.ellipse(cx + mx_, fcy + my_, mr * 0.5, mr * 0.5, q.mole)
    if p.glasses:
        th = max(1, round(S / 70))
        r = p.eye_w * 1.45
        for sgn in (-1, 1):
            ex = cx + sgn * p.eye_dx
            if p.glasses == 1:
                pen.ellipse(ex, ey, r, r * 0.85, q.glasses, thickness=th)
            else:
                pen.lines(np.array([[ex - r, ey - r * 0.7], [ex + r, ey - r * 0.7],
                                    [ex + r, ey + r * 0.7], [ex - r, ey + r * 0.7]]), q.glasses,
                          th, closed=True)
        pen.lines(np.array([[cx - p.eye_dx + r, ey - 0.005], [cx + p.eye_dx - r, ey - 0.005]]),
                  q.glasses, th)

    # ---- geometry: rotation, scale, shift and yaw in a single remap
    t = math.radians(rot)
    c, s_ = math.cos(t), math.sin(t)
    ox = gx - np.float32(tx)
    oy = gy - np.float32(ty)
    # inverse of (rotate by +rot then scale): rotate by -rot, divide by scale
    x1 = (c * ox + s_ * oy) / sc
    y1 = (-s_ * ox + c * oy) / sc
    if yaw != 0.0:
        R = 0.42
        cl = np.clip(x1 / R, -0.999, 0.999)
        x1 = R * np.sin(np.arcsin(cl) - yaw) + (x1 - R * cl)
    map_x = ((x1 + 0.5) * S - 0.5).astype(np.float32)
    map_y = ((y1 + 0.5) * S - 0.5).astype(np.float32)
    img = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)

    # ---- photometric nuisance
    f = img.astype(np.float32) * (1.0 / 255.0)
    if light > 0:
        lf = 1.0 + light * (math.cos(light_dir) * gx + math.sin(light_dir) * gy) * 2.0
        f *= np.clip(lf, 0.2, None)[..., None]
    f = (f - 0.5) * np.float32(contrast) + np.float32(0.5 + bright)
    f *= cast.astype(np.float32)
    if blur_sigma > 0.05:
        f = cv2.GaussianBlur(f, (0, 0), blur_sigma)
    if cfg.noise > 0:
        f += rng.standard_normal(f.shape, dtype=np.float32) * np.float32(cfg.noise)
    return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- data set


def _identity_list(config: SyntheticConfig, identities: Sequence[int] | None) -> list[int]:
    if identities is None:
        return list(range(config.num_identities))
    ids = [int(i) for i in identities]
    bad = [i for i in ids if i < 0]
    if bad:
        raise ValueError(f"identity indices must be >= 0, got {bad[:5]}")
    return ids


def generate(
    config: SyntheticConfig, identities: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render all images of the given identities (default: ``range(num_identities)``).

    Returns ``(images, labels)``: ``images`` is ``(N, size, size, 3)`` uint8 RGB with
    the ``images_per_identity`` images of each identity consecutive (in the order of
    ``identities``, image 0 first); ``labels`` is ``(N,)`` int64 holding the identity
    *index* ``i`` (not remapped to ``0..K-1``; use ``np.unique(labels,
    return_inverse=True)`` for training labels).
    """
    ids = _identity_list(config, identities)
    n = config.images_per_identity
    S = config.size
    images = np.empty((len(ids) * n, S, S, 3), np.uint8)
    labels = np.empty(len(ids) * n, np.int64)
    k = 0
    for i in ids:
        for j in range(n):
            images[k] = render_image(config, i, j)
            labels[k] = i
            k += 1
    return images, labels


def _manifest_key(config: SyntheticConfig, ids: list[int], ext: str) -> dict:
    return {
        "generator": "fedface.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "identities": ids,
        "ext": ext,
    }


_NOTE = """\
# SYNTHETIC DATA - NOT REAL FACES

Every image in this folder is a **synthetic, cartoon-like face** generated
procedurally by `fedface.data.synthetic` (generator version {version}).
No real person is depicted, no photograph was used and nothing was downloaded.

How it was generated:

* Each identity `id_XXXXX` is a random parameter vector (face outline and jaw,
  skin tone, eye spacing/size/height/shape and iris colour, eyebrow shape and
  angle, nose length/width, mouth width/position, hair colour/style/hairline,
  ears, optional beard/moustache/glasses, moles and a smooth skin texture)
  drawn from `numpy.random.default_rng([seed, 0x1D, i])`.
* Image `id_XXXXX_NNNN.{ext}` renders that identity with OpenCV anti-aliased
  drawing and per-image nuisance drawn from
  `numpy.random.default_rng([seed, 0x1A, i, NNNN - 1])`: in-plane rotation,
  shift, scale, a yaw-like horizontal warp, expression (smile, open mouth, eye
  openness, brow raise), background and clothing colour, a lighting gradient,
  brightness/contrast, white balance, optional blur and Gaussian noise.
* Re-running with the same configuration reproduces identical pixels.

Layout: LFW-style, `id_00007/id_00007_0001.{ext}` (image numbers are 1-based),
so LFW-format `pairs.txt` files work.  `manifest.json` holds the configuration
and a SHA-256 of the generated pixels.

Configuration:

```json
{config}
```

Identities: {nid} ({first} ... {last}), {nimg} images each, {total} images in total.
"""


def write_identity_folder(
    root: Path,
    config: SyntheticConfig,
    identities: Sequence[int] | None = None,
    ext: str = "png",
) -> Path:
    """Write the data set as an LFW-style identity folder tree under ``root``.

    Writes ``root/id_XXXXX/id_XXXXX_NNNN.<ext>`` (NNNN 1-based), ``root/SYNTHETIC.md``
    and ``root/manifest.json`` (written last; it marks a complete folder and holds the
    config plus a SHA-256 of the generated pixels).  If ``root`` already holds a
    manifest for the same config/identities/ext and all files exist, nothing is
    rendered and ``root`` is returned at once.  A manifest for a different config is
    refused with :class:`FileExistsError`, as is a non-empty ``root`` without one.
    """
    root = Path(root)
    ext = ext.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg", "bmp"):
        raise ValueError(f"unsupported image extension {ext!r} (use png, jpg or bmp)")
    ids = _identity_list(config, identities)
    if len(set(ids)) != len(ids):
        raise ValueError("identities must be unique")
    key = _manifest_key(config, ids, ext)
    manifest_path = root / "manifest.json"
    n = config.images_per_identity

    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FileExistsError(f"{manifest_path} exists but cannot be read: {e}") from e
        old_key = {k: old.get(k) for k in key}
        if old_key != key:
            diff = sorted(k for k in key if old_key[k] != key[k])
            detail = ""
            if "config" in diff and isinstance(old_key["config"], dict):
                cdiff = sorted(
                    k for k in set(key["config"]) | set(old_key["config"])
                    if key["config"].get(k) != old_key["config"].get(k)
                )
                detail = f" (config fields differ: {', '.join(cdiff)})"
            raise FileExistsError(
                f"{root} already holds a synthetic data set generated with a different "
                f"{'/'.join(diff)}{detail}; refusing to overwrite it. Use another root "
                f"or delete the folder."
            )
        complete = all(
            len([f for f in os.listdir(root / identity_name(i)) if f.endswith("." + ext)]) >= n
            if (root / identity_name(i)).is_dir() else False
            for i in ids
        )
        if complete:
            return root
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and has no synthetic manifest.json; refusing to write "
            f"the synthetic data set into it."
        )

    root.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    for i in ids:
        (root / identity_name(i)).mkdir(exist_ok=True)
        for j in range(n):
            img = render_image(config, i, j)
            h.update(img.tobytes())
            path = root / image_filename(i, j, ext)
            ok = cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"could not write {path}")
    cfg_json = json.dumps(config.to_dict(), indent=2)
    (root / "SYNTHETIC.md").write_text(
        _NOTE.format(version=GENERATOR_VERSION, ext=ext, config=cfg_json, nid=len(ids),
                     first=identity_name(ids[0]) if ids else "-",
                     last=identity_name(ids[-1]) if ids else "-", nimg=n,
                     total=len(ids) * n)
    )
    manifest = dict(key)
    manifest.update({
        "num_images": len(ids) * n,
        "layout": "<name>/<name>_<NNNN>.<ext>, NNNN 1-based",
        "pixel_sha256": h.hexdigest(),
        "pixel_hash_note": "SHA-256 over the uint8 RGB arrays (C order) in folder order, "
        "before image encoding",
    })
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return root


# --------------------------------------------------------------------------- pairs


def make_pairs(
    labels: np.ndarray, num_folds: int = 10, pairs_per_fold: int = 300, seed: int = 0
) -> list[tuple[int, int, bool, int]]:
    """LFW-style verification pairs ``(index_a, index_b, same, fold)``.

    Every fold holds ``pairs_per_fold`` same-identity pairs followed by
    ``pairs_per_fold`` different-identity pairs (LFW convention: 300 + 300), indices
    into ``labels``.  Identities are split into ``num_folds`` disjoint groups, one per
    fold, when there are at least two identities per fold; otherwise all folds share
    all identities.  Pairs inside a fold are unique while enough distinct pairs exist;
    if a fold's identities cannot supply enough, pairs are repeated.
    """
    labels = np.asarray(labels)
    if num_folds < 1 or pairs_per_fold < 1:
        raise ValueError("num_folds and pairs_per_fold must be >= 1")
    rng = np.random.default_rng([int(seed), 0x9A125])
    uniq, inv = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    if len(uniq) < 2:
        raise ValueError("need at least two identities to make different pairs")
    if not any(len(m) >= 2 for m in members):
        raise ValueError("need an identity with at least two images to make same pairs")

    order = rng.permutation(len(uniq))
    groups: list[np.ndarray]
    if len(uniq) >= 2 * num_folds:
        # balance identities with >= 2 images across folds
        multi = [k for k in order if len(members[k]) >= 2]
        single = [k for k in order if len(members[k]) < 2]
        groups = [np.array(multi[f::num_folds] + single[f::num_folds], dtype=np.int64)
                  for f in range(num_folds)]
        if any(not any(len(members[k]) >= 2 for k in g) for g in groups):
            groups = [order] * num_folds
    else:
        groups = [order] * num_folds

    out: list[tuple[int, int, bool, int]] = []
    for fold, g in enumerate(groups):
        same_ids = [k for k in g if len(members[k]) >= 2]
        cap_same = sum(len(members[k]) * (len(members[k]) - 1) // 2 for k in same_ids)
        seen: set[tuple[int, int]] = set()
        same: list[tuple[int, int]] = []
        cyc = list(rng.permutation(same_ids))
        tries = 0
        while len(same) < pairs_per_fold:
            k = cyc[tries % len(cyc)]
            tries += 1
            a, b = rng.choice(members[k], 2, replace=False)
            pr = (int(min(a, b)), int(max(a, b)))
            if pr in seen and len(seen) < cap_same and tries < 50 * pairs_per_fold:
                continue
            seen.add(pr)
            same.append(pr)
        sizes = np.array([len(members[k]) for k in g], dtype=np.float64)
        tot = sizes.sum()
        cap_diff = (tot * tot - (sizes * sizes).sum()) / 2
        seen = set()
        diff: list[tuple[int, int]] = []
        tries = 0
        while len(diff) < pairs_per_fold:
            tries += 1
            k1, k2 = rng.choice(g, 2, replace=False)
            a = int(rng.choice(members[k1]))
            b = int(rng.choice(members[k2]))
            pr = (min(a, b), max(a, b))
            if pr in seen and len(seen) < cap_diff and tries < 50 * pairs_per_fold:
                continue
            seen.add(pr)
            diff.append(pr)
        out += [(a, b, True, fold) for a, b in same]
        out += [(a, b, False, fold) for a, b in diff]
    return out


def write_pairs_file(
    path: Path, pairs: Sequence[tuple[int, int, bool, int]], names: list[str]
) -> Path:
    """Write ``pairs`` (from :func:`make_pairs`) in LFW ``pairs.txt`` format.

    ``names[k]`` is the identity name of image ``k`` (e.g. ``[identity_name(l) for l in
    labels]``).  An image's 1-based number is its order of appearance among the images
    of the same name, which matches :func:`write_identity_folder`'s ``<name>_NNNN``
    files when images come from :func:`generate`.  Header ``"<folds>\\t<n>"``, then per
    fold ``n`` lines ``name\\tn1\\tn2`` and ``n`` lines ``name1\\tn1\\tname2\\tn2``.
    """
    path = Path(path)
    counter: dict[str, int] = {}
    number = np.empty(len(names), np.int64)
    for k, nm in enumerate(names):
        counter[nm] = counter.get(nm, 0) + 1
        number[k] = counter[nm]
    folds = sorted({int(f) for *_, f in pairs})
    if not folds:
        raise ValueError("no pairs")
    by_fold = {f: ([], []) for f in folds}
    for a, b, same, f in pairs:
        by_fold[int(f)][0 if same else 1].append((int(a), int(b)))
    n = len(by_fold[folds[0]][0])
    for f in folds:
        s, d = by_fold[f]
        if len(s) != n or len(d) != n:
            raise ValueError(
                f"LFW pairs format needs {n} same and {n} different pairs in every fold; "
                f"fold {f} has {len(s)} same and {len(d)} different"
            )
    lines = [f"{len(folds)}\t{n}"]
    for f in folds:
        s, d = by_fold[f]
        for a, b in s:
            if names[a] != names[b]:
                raise ValueError(f"same pair ({a}, {b}) has names {names[a]} != {names[b]}")
            lines.append(f"{names[a]}\t{number[a]}\t{number[b]}")
        for a, b in d:
            lines.append(f"{names[a]}\t{number[a]}\t{names[b]}\t{number[b]}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def make_montage(images: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile ``(N, H, W, 3)`` uint8 images into one RGB image (white padding)."""
    images = np.asarray(images)
    n, H, W = images.shape[:3]
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[y:y + H, x:x + W] = images[k]
    return out
