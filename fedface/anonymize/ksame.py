"""K-Same (Newton, Sweeney & Malin 2005): replace each face by the average of k faces.

Every face of a batch (all the images of one folder run) is aligned to an upright chip with a
similarity transform from its 5 dlib landmarks (the same geometry as
:mod:`fedface.data.align`: dlib's 5-point template, ``dlib.get_face_chip_details``). The chips
are clustered greedily: take the next remaining face (a fixed, seeded order), it and its
``k - 1`` nearest remaining faces form a cluster, and when fewer than ``2k`` faces remain they all
form the last cluster. Every face of a cluster is replaced by the cluster's average chip, which
is warped back into its image with the inverse transform and blended in with a feathered
ellipse (optionally colour-matched to the original face so the seam does not show).

Unlike blur or pixelation the output is still a face (dlib's HOG detector finds it), so the
images stay useful for detection, counting and expression-level analytics.

Adversary and guarantee
-----------------------
The adversary is anyone holding the output images, including one who runs a face recognizer on
them and holds a gallery of the original faces. Each output face is, inside the blended
ellipse, the same average shared by at least ``k`` input faces (``report["cluster_sizes"]``),
so from the replaced pixels alone no recognizer can match an output face to its original with
probability above ``1/k`` (the K-Same bound). The feathered rim of the ellipse (its outer
``blend`` fraction) mixes the average with the original, so the bound covers its inner part.

Limits of the guarantee:

- The ``1/k`` bound holds only when the ``k`` faces of a cluster belong to ``k`` *different*
  people. Several photos of one person in a folder can land in one cluster (they are each
  other's nearest neighbours), and then the average still looks like that person. Run it on
  folders with one image per person, or deduplicate first.
- The folder run must hold at least ``k`` faces; fewer is refused
  (:class:`NotEnoughFacesError`), it never silently lowers ``k``.
- Only the face ellipse is replaced. Hair, ears, clothing, the background and the face's
  position and size are released as they are and may identify the person. Measured on 80 LFW
  images (one per person) with dlib's 128-d matcher and the originals as gallery
  (``python tests/unit/anonymize/test_ksame.py 80``), rank-1 re-identification was 0.31 at
  k=4 (bound 0.25) and 0.14 at k=10 (bound 0.10): the untouched context leaks beyond the bound.
- ``match_color=True`` (the default, for a seamless look) carries six numbers per face from the
  original into the output: the per-channel mean and standard deviation of the face region
  (skin tone and lighting). Outputs of one cluster then differ by that colour shift. Set
  ``match_color=False`` for outputs that are identical inside the ellipse (up to resampling).
- Faces whose landmarks are wrong (profile views, occlusion) are averaged misaligned: the
  output is still an average of k chips, but may look less like a face.
- The clustering order is seeded (``seed``) for reproducibility; the guarantee does not depend
  on keeping it secret.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fedface.anonymize.boxes import Box
from fedface.anonymize.geometry import DLIB_TEMPLATE_5, chip_transform, five_points
from fedface.errors import UserError

__all__ = [
    "DLIB_TEMPLATE_5",
    "SPACES",
    "KSame",
    "KSameConfig",
    "NotEnoughFacesError",
    "chip_transform",
    "face_ellipse_mask",
    "ksame_chips",
]

#: Distance spaces for the nearest-neighbour search of :func:`ksame_chips`.
SPACES = ("pixels", "pca")

# The replaced ellipse in unit face coordinates (the square dlib's template lives in: eyebrows
# near y=0, chin near y=1): centre and semi-axes. Its outer edge, where the blend reaches 0,
# covers forehead to below the chin and cheek to cheek.
_ELLIPSE_CENTRE = (0.5, 0.46)
_ELLIPSE_AXES = (0.72, 0.88)
# Side of the grey image the distances are computed on.
_FEATURE_SIDE = 40
# PCA keeps components up to this fraction of the variance (at most _PCA_MAX of them).
_PCA_VARIANCE = 0.95
_PCA_MAX = 64


class NotEnoughFacesError(UserError, ValueError):
    """A K-Same batch holds fewer than ``k`` faces (a :class:`UserError` and a ``ValueError``)."""


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"ksame k must be an int >= 1, got {k!r}")
    return int(k)


def _not_enough(k: int, n: int) -> NotEnoughFacesError:
    return NotEnoughFacesError(
        f"ksame needs at least k={k} faces, found {n}: lower k or anonymize a larger folder"
    )


@dataclass
class KSameConfig:
    """Settings of the K-Same anonymizer.

    Parameters
    ----------
    k : int
        Faces per cluster (at least ``k``; the last cluster holds up to ``2k - 1``). An output
        face is shared by at least ``k`` input faces, so a recognizer matches it to the right
        original with probability at most ``1/k`` (when those faces are of different people).
        Must be >= 2; the batch must hold at least ``k`` faces.
    chip_size : int
        Side in pixels of the aligned chips the averages are computed on.
    padding : float
        dlib chip padding around the unit face square (0.25 is dlib's tight default; the
        replaced ellipse reaches 0.42 of the face size above the eyebrows, so at least 0.45).
    space : str
        Where nearest neighbours are searched: ``"pixels"`` (grey chip inside the ellipse,
        downscaled, each face normalised to zero mean and unit norm) or ``"pca"`` (the same,
        projected on the principal components holding 95% of the batch's variance).
    blend : float
        Width of the feathered edge of the ellipse, as a fraction of its radius (0 = hard edge,
        1 = feather all the way to the centre).
    match_color : bool
        Match each channel's mean and standard deviation of the average to those of the
        original face region so no seam shows (see the module docstring for what this leaks).
    seed : int
        Seeds the order in which clusters are formed (determinism, not secrecy).
    """

    k: int = 10
    chip_size: int = 160
    padding: float = 0.6
    space: str = "pixels"
    blend: float = 0.3
    match_color: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 2:
            problems.append(f"k={self.k!r}: use an int of 2 or more (k=1 changes nothing)")
        if not isinstance(self.chip_size, (int, np.integer)) or not 32 <= self.chip_size <= 1024:
            problems.append(f"chip_size={self.chip_size!r}: use an int in [32, 1024]")
        if not 0.45 <= float(self.padding) <= 2.0:
            problems.append(
                f"padding={self.padding!r}: use [0.45, 2] (the ellipse must fit in the chip)"
            )
        if self.space not in SPACES:
            problems.append(f"space={self.space!r}: use one of {', '.join(SPACES)}")
        if not 0.0 <= float(self.blend) <= 1.0:
            problems.append(f"blend={self.blend!r}: use a fraction in [0, 1]")
        if problems:
            raise ValueError("Invalid ksame settings: " + "; ".join(problems))


# -- clustering on chips ---------------------------------------------------------------------------


def face_ellipse_mask(size: int, padding: float, blend: float) -> np.ndarray:
    """The blend weight over a ``size x size`` chip: 1 inside the face ellipse, falling
    smoothly to 0 at its edge over the outer ``blend`` fraction of its radius.

    Returns a float32 ``(size, size)`` array in ``[0, 1]``; 0 outside the ellipse.
    """
    unit = size / (1.0 + 2.0 * padding)  # chip pixels per unit face length
    cx = (padding + _ELLIPSE_CENTRE[0]) * unit - 0.5
    cy = (padding + _ELLIPSE_CENTRE[1]) * unit - 0.5
    ax, ay = _ELLIPSE_AXES[0] * unit, _ELLIPSE_AXES[1] * unit
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    if blend <= 0:
        return (r <= 1.0).astype(np.float32)
    t = np.clip((1.0 - r) / blend, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep


def _features(chips: np.ndarray, space: str, padding: float) -> np.ndarray:
    """One row per chip: grey, downscaled, inside the ellipse, zero mean, unit norm (``pixels``),
    optionally projected on the batch's principal components (``pca``)."""
    n, h, w = chips.shape[:3]
    side = min(_FEATURE_SIDE, h, w)
    weight = face_ellipse_mask(side, padding, 0.0) if h == w else np.ones((side, side), np.float32)
    keep = weight.ravel() > 0
    if keep.sum() < 4:  # a chip too small for the ellipse: use every pixel
        keep[:] = True
    feats = np.empty((n, int(keep.sum())), dtype=np.float64)
    for i, chip in enumerate(chips):
        grey = chip if chip.ndim == 2 else cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
        small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA)
        v = small.astype(np.float64).ravel()[keep]
        v -= v.mean()
        feats[i] = v / max(float(np.linalg.norm(v)), 1e-9)
    if space == "pca" and n > 2:
        centred = feats - feats.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        var = s * s
        total = float(var.sum())
        if total > 0:
            m = int(np.searchsorted(np.cumsum(var) / total, _PCA_VARIANCE) + 1)
            m = max(1, min(m, _PCA_MAX, len(s)))
            feats = centred @ vt[:m].T
    return feats


def ksame_chips(
    chips: np.ndarray, k: int, seed: int = 0, *, space: str = "pixels", padding: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """K-Same on aligned face chips.

    Repeatedly take the first remaining face in a seeded random order; it and its ``k - 1``
    nearest remaining faces (in ``space``, see :class:`KSameConfig`) form a cluster. When fewer
    than ``2k`` faces remain they form the last cluster together, so every cluster holds between
    ``k`` and ``2k - 1`` faces. Every chip is replaced by its cluster's average.

    Parameters
    ----------
    chips : np.ndarray
        ``(N, H, W, 3)`` (or ``(N, H, W)``) uint8 aligned faces. Not modified.
    k : int
        Minimum cluster size (>= 1).
    seed : int
        Seeds the order in which faces start clusters; same input and seed, same output.
    space : str
        ``"pixels"`` or ``"pca"``: where the nearest neighbours are searched.
    padding : float
        The chips' dlib padding: it places the face ellipse the distances are computed in.

    Returns
    -------
    tuple of np.ndarray
        ``(averaged, cluster_ids)``: ``averaged`` has the shape and dtype of ``chips``, each row
        the rounded mean of the rows of its cluster; ``cluster_ids`` is ``(N,)`` int, clusters
        numbered ``0, 1, ...`` in the order they were formed.

    Raises
    ------
    NotEnoughFacesError
        (a ``ValueError``) when ``N < k``.
    """
    k = _check_k(k)
    if space not in SPACES:
        raise ValueError(f"ksame space must be one of {', '.join(SPACES)}, got {space!r}")
    chips = np.asarray(chips)
    if chips.dtype != np.uint8 or chips.ndim not in (3, 4):
        raise ValueError(
            f"ksame_chips expects (N, H, W, 3) uint8 chips, got {chips.dtype} {chips.shape}"
        )
    n = chips.shape[0]
    if n < k:
        raise _not_enough(k, n)
    feats = _features(chips, space, padding)
    sqnorm = np.einsum("ij,ij->i", feats, feats)
    order = np.random.default_rng(seed).permutation(n)
    remaining = np.ones(n, dtype=bool)
    ids = np.full(n, -1, dtype=np.int64)
    cluster = 0
    for pivot in order:
        if not remaining[pivot]:
            continue
        left = np.flatnonzero(remaining)
        if len(left) < 2 * k:
            members = left
        else:
            # Squared distances to the pivot (up to its own norm) without copying the rows.
            d = (sqnorm - 2.0 * (feats @ feats[pivot]))[left]
            d[left == pivot] = -np.inf  # the pivot itself first, whatever the ties
            members = left[np.argsort(d, kind="stable")[:k]]
        ids[members] = cluster
        remaining[members] = False
        cluster += 1
        if not remaining.any():
            break
    out = np.empty_like(chips)
    for c in range(cluster):
        members = ids == c
        mean = chips[members].astype(np.float64).mean(axis=0)
        out[members] = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return out, ids


# -- geometry ------------------------------------------------------------------------------------------


def _extract(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """The chip of ``image`` under chip->image map ``m``: bilinear, with a Gaussian pyramid first
    when the face is more than twice the chip (as dlib does), edges replicated."""
    h, w = image.shape[:2]
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]])
    pts = corners @ m.T
    x0 = max(int(math.floor(pts[:, 0].min())) - 4, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - 4, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 5, w)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 5, h)
    if x1 - x0 < 2 or y1 - y0 < 2:  # face entirely outside the image: use the nearest edge
        x0, y0, x1, y1 = 0, 0, w, h
    roi = image[y0:y1, x0:x1]
    m = m.copy()
    m[:, 2] -= (x0, y0)
    step = math.hypot(m[0, 0], m[1, 0])
    while step > 2.0 and min(roi.shape[:2]) >= 4:
        roi = cv2.pyrDown(roi)
        m /= 2.0
        step /= 2.0
    return cv2.warpAffine(
        np.ascontiguousarray(roi), m, (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE,
    )


def _color_match(avg: np.ndarray, orig: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``avg`` (float) with each channel's weighted mean and std set to those of ``orig``."""
    wsum = float(weight.sum())
    if wsum <= 0:
        return avg
    w = weight[..., None] / wsum
    mu_a, mu_o = (avg * w).sum(axis=(0, 1)), (orig * w).sum(axis=(0, 1))
    sd_a = np.sqrt(((avg - mu_a) ** 2 * w).sum(axis=(0, 1)))
    sd_o = np.sqrt(((orig - mu_o) ** 2 * w).sum(axis=(0, 1)))
    gain = np.where(sd_a > 1e-3, sd_o / np.maximum(sd_a, 1e-3), 1.0)
    gain = np.clip(gain, 0.25, 4.0)
    return (avg - mu_a) * gain + mu_o


def _paste(out: np.ndarray, chip: np.ndarray, mask: np.ndarray, m: np.ndarray) -> None:
    """Blend ``chip`` (float, HxWxC) into ``out`` in place through chip->image map ``m``,
    weighted by ``mask``; pixels the mask does not reach are left bit-for-bit unchanged."""
    h, w = out.shape[:2]
    size = chip.shape[0]
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]])
    pts = corners @ m.T
    x0 = max(int(math.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 2, w)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return
    mm = m.copy()
    mm[:, 2] -= (x0, y0)
    dsize = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(chip.astype(np.float32), mm, dsize, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask.astype(np.float32), mm, dsize, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if face.ndim == 2:
        face = face[..., None]
    roi = out[y0:y1, x0:x1]
    a = alpha[..., None]
    blended = roi.astype(np.float32) * (1.0 - a) + face * a
    touched = alpha > 0
    roi[touched] = np.clip(np.rint(blended[touched]), 0, 255).astype(np.uint8)


# -- the anonymizer ------------------------------------------------------------------------------------


class KSame:
    """The K-Same anonymizer over a batch of images (see the module docstring).

    Parameters
    ----------
    config : KSameConfig, optional
        Settings; the defaults when omitted.
    """

    name = "ksame"
    needs_landmarks = True
    batch = True
    keeps_face = True

    def __init__(self, config: KSameConfig | None = None):
        self.config = config if config is not None else KSameConfig()
        self._predictor: Any = None

    def _landmarks(self, image: np.ndarray, box: Box) -> tuple[np.ndarray, bool]:
        """The face's 5 landmarks: the box's own when it has 5 (or 68, reduced to dlib's 5),
        else dlib's 5-point predictor run on the box (which should be a detector-like box).
        Returns ``(points, computed)``."""
        lm = five_points(box.landmarks)
        if lm is not None:
            return lm, False
        import dlib

        if self._predictor is None:
            from fedface.data.dlib_models import load_shape_predictor

            self._predictor = load_shape_predictor(5)
        rect = dlib.rectangle(int(round(box.x0)), int(round(box.y0)),
                              int(round(box.x1)) - 1, int(round(box.y1)) - 1)
        shape = self._predictor(np.ascontiguousarray(image), rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64), True

    def apply_batch(
        self, images: Sequence[np.ndarray], faces: Sequence[Sequence[Box]]
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Anonymize every face of every image with K-Same over the whole batch.

        Parameters
        ----------
        images : sequence of np.ndarray
            ``HxWx3`` uint8 RGB images (``HxW`` grey accepted). Not modified.
        faces : sequence of sequence of Box
            The faces of each image (same length as ``images``). Boxes with ``(5, 2)``
            landmarks (dlib's 5-point order) are aligned on them; the others get landmarks
            from dlib's 5-point shape predictor run on the box.

        Returns
        -------
        tuple
            ``(outputs, report)``: one new image per input (a copy when it has no face: the
            caller decides what to do with those), and a dict with ``method``, ``k``,
            ``faces`` (how many), ``clusters``, ``cluster_sizes``, ``min_cluster_size``,
            ``cluster_ids`` (one list per image, one id per face, in the order given),
            ``landmarks_computed`` and ``space``.

        Raises
        ------
        NotEnoughFacesError
            When the batch holds between 1 and ``k - 1`` faces.
        ValueError
            For images that are not uint8 RGB/grey, a length mismatch, or unusable landmarks.
        """
        cfg = self.config
        if len(images) != len(faces):
            raise ValueError(
                f"apply_batch got {len(images)} images but {len(faces)} face lists"
            )
        outputs: list[np.ndarray] = []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
                image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
            ):
                raise ValueError(
                    f"ksame expects HxWx3 (or HxW) uint8 images; image {i} is "
                    f"{getattr(image, 'dtype', type(image).__name__)} "
                    f"{getattr(image, 'shape', '')}"
                )
            outputs.append(image.copy())
        size, padding = int(cfg.chip_size), float(cfg.padding)
        where: list[tuple[int, int]] = []
        transforms: list[np.ndarray] = []
        chips: list[np.ndarray] = []
        computed = 0
        for i, (image, boxes) in enumerate(zip(images, faces, strict=True)):
            rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
            for j, box in enumerate(boxes):
                landmarks, was_computed = self._landmarks(rgb, box)
                computed += int(was_computed)
                m = chip_transform(landmarks, size, padding)
                chips.append(_extract(rgb, m, size))
                transforms.append(m)
                where.append((i, j))
        n = len(chips)
        report: dict[str, Any] = {
            "method": "ksame", "k": int(cfg.k), "faces": n, "clusters": 0, "cluster_sizes": [],
            "min_cluster_size": None, "cluster_ids": [[-1] * len(b) for b in faces],
            "landmarks_computed": computed, "space": cfg.space,
        }
        if n == 0:
            return outputs, report
        if n < cfg.k:
            raise _not_enough(int(cfg.k), n)
        stack = np.stack(chips)
        averaged, ids = ksame_chips(stack, int(cfg.k), cfg.seed, space=cfg.space, padding=padding)
        mask = face_ellipse_mask(size, padding, float(cfg.blend))
        for f, (i, j) in enumerate(where):
            avg = averaged[f].astype(np.float64)
            if cfg.match_color:
                avg = _color_match(avg, stack[f].astype(np.float64), mask)
            out = outputs[i]
            if out.ndim == 2:
                grey = out[:, :, None]
                _paste(grey, cv2.cvtColor(np.clip(avg, 0, 255).astype(np.float32),
                                          cv2.COLOR_RGB2GRAY)[..., None], mask, transforms[f])
            else:
                _paste(out, avg, mask, transforms[f])
            report["cluster_ids"][i][j] = int(ids[f])
        sizes = np.bincount(ids).tolist()
        report.update(clusters=len(sizes), cluster_sizes=sizes, min_cluster_size=int(min(sizes)))
        return outputs, report
