"""dlib face-chip geometry: the 5-point template, 68 -> 5 landmarks, and the chip transform.

The one place for the alignment :mod:`fedface.anonymize.ksame`, :mod:`fedface.anonymize.cloak` and
:mod:`fedface.anonymize.evaluate` share. :func:`chip_transform` is the map
``dlib.get_face_chip(image, shape, size, padding)`` samples with (the chips
:mod:`fedface.data.align` trains on), so that
``cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)``
reproduces dlib's chip to within its integer truncation (while the face spans at most about twice
the chip; dlib samples a Gaussian pyramid level first for larger faces).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["DLIB_TEMPLATE_5", "FIVE_FROM_68", "chip_transform", "five_points", "similarity"]

#: dlib's 5-point face template on the unit face square (``get_face_chip_details`` in
#: dlib/image_transforms/interpolation.h), in the 5-point shape predictor's part order: outer and
#: inner corner of the image-right eye, outer and inner corner of the image-left eye, bottom of
#: the nose.
DLIB_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
DLIB_TEMPLATE_5.flags.writeable = False

#: The 68-point (iBUG, 0-based) indices of dlib's 5 points, in the 5-point predictor's order:
#: 45/42 outer/inner corner of the image-right eye, 36/39 outer/inner corner of the image-left
#: eye, 33 bottom of the nose. (On 40 LFW faces each of dlib's 5-point predictions lies within
#: about 1 px on average of exactly these 68-point predictions.)
FIVE_FROM_68 = (45, 42, 36, 39, 33)


def five_points(landmarks: Any) -> np.ndarray | None:
    """dlib's 5 landmarks from 5 (dlib order) or 68 (iBUG order) points, as a new float64
    ``(5, 2)`` array; ``None`` when ``landmarks`` is ``None`` or has another shape."""
    if landmarks is None:
        return None
    lm = np.array(landmarks, dtype=np.float64)
    if lm.shape == (5, 2):
        return lm
    if lm.shape == (68, 2):
        return lm[list(FIVE_FROM_68)]
    return None


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991) as a 2x3 matrix.

    Follows dlib's ``find_similarity_transform``: the reflection fix applies when the
    cross-covariance has a negative determinant (or a zero one with ``det(U) det(V) < 0``), and
    the scale is 1 when ``src`` has no spread.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sv, vt = np.linalg.svd(cov)  # singular values descending: the last is the smallest
    e = np.eye(2)
    det = np.linalg.det(cov)
    if det < 0 or (det == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        e[1, 1] = -1.0
    rot = u @ e @ vt
    var = float((s**2).sum() / len(src))
    scale = float(np.trace(np.diag(sv) @ e) / var) if var != 0 else 1.0
    m = scale * rot
    return np.hstack([m, (mu_d - m @ mu_s)[:, None]])


def chip_transform(landmarks: Any, size: int, padding: float = 0.25) -> np.ndarray:
    """The 2x3 affine map from chip pixel ``(col, row, 1)`` to image coordinates that
    ``dlib.get_face_chip(image, shape, size, padding)`` samples with.

    dlib builds ``chip_details`` from the similarity that maps its template (padded, scaled to
    the chip) to the landmarks: a rectangle ``size * scale - 1`` wide (inclusive corners),
    rotated about the mapped chip centre; chip pixels 0 and ``size - 1`` fall on its corners.

    Parameters
    ----------
    landmarks : array_like, shape (5, 2) or (68, 2)
        dlib landmarks (5-point predictor order, or iBUG 68-point order) in image pixels.
    size : int
        Chip side, >= 2.
    padding : float, default 0.25
        dlib chip padding (the default is :class:`fedface.data.align.AlignConfig`'s).

    Returns
    -------
    ndarray, shape (2, 3)

    Raises
    ------
    ValueError
        For landmarks that are not 5 or 68 finite (x, y) points, degenerate landmarks (all at
        one point), a chip side below 2 or a negative or non-finite padding.
    """
    lm = five_points(landmarks)
    if lm is None:
        raise ValueError(
            "face alignment needs 5 (dlib) or 68 (iBUG) (x, y) landmarks per face, got "
            + ("none" if landmarks is None else f"shape {np.shape(landmarks)}")
        )
    if not np.isfinite(lm).all():
        raise ValueError("face alignment got non-finite (NaN or inf) landmarks; cannot align the face")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"chip size must be an int >= 2, got {size!r}")
    if not (math.isfinite(padding) and padding >= 0):
        raise ValueError(f"chip padding must be a finite number >= 0, got {padding!r}")
    template = (padding + DLIB_TEMPLATE_5) / (1.0 + 2.0 * padding) * size
    tform = similarity(template, lm)  # chip (template) -> image
    p = tform[:, :2] @ np.array([1.0, 0.0])
    scale = math.hypot(p[0], p[1])
    if not scale > 1e-6:
        raise ValueError(
            "face alignment got degenerate landmarks (all at one point); cannot align the face"
        )
    angle = math.atan2(p[1], p[0])
    centre = tform @ np.array([size / 2.0, size / 2.0, 1.0])
    # dlib: rect = centered_drect(centre, size*scale, size*scale) (inclusive: width - 1), and
    # chip pixel (0, 0) -> rotated top-left corner, (size-1, size-1) -> rotated bottom-right.
    step = (size * scale - 1.0) / (size - 1.0)
    c, s = math.cos(angle), math.sin(angle)
    lin = step * np.array([[c, -s], [s, c]])
    half = (size - 1) / 2.0
    offset = centre - lin @ np.array([half, half])
    return np.hstack([lin, offset[:, None]])
