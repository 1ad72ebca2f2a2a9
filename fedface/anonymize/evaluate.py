"""Measure what a face anonymizer hides, what it keeps, and how well faces are found at all.

These are the method-agnostic building blocks of ``fedface bench anonymize``. An anonymizer is any
callable ``anonymize(images, faces) -> images``: ``images`` a list of ``HxWx3`` ``uint8`` RGB arrays,
``faces`` one list of :class:`~fedface.anonymize.boxes.Box` per image (where the faces are), and it
returns one anonymized image of the same shape per input. A detector is any callable
``detect(image) -> list[Box]``.

The adversary
-------------
An independent matcher that fedface did not train: dlib's ResNet (``dlib_face_recognition_resnet_
model_v1``, 128-d descriptors, Euclidean distance, dlib's own operating threshold 0.6) with dlib's
5-point shape predictor for alignment (:class:`DlibMatcher`). It is given the face's LOCATION: an
anonymized probe is described inside the box that dlib's HOG detector found on the CLEAN image (the
anonymized region stays visible in the picture, so an attacker can always point at it). This is the
stronger attacker: on heavily anonymized images dlib would often not detect a face at all, and a
matcher that gives up there would report an optimistic, meaningless re-identification rate of ~0. The
5-point shape is fitted on the anonymized pixels inside that box (``align="anonymized"``, what a real
attacker can do); ``align="clean"`` reuses the clean image's landmarks (an oracle alignment, for an
upper bound).

The protocol (LFW pairs, :func:`reid_rates`)
--------------------------------------------
Every image of an LFW pair file (e.g. ``pairsDevTest.txt``: 500 same + 500 different pairs, 1,549
distinct images) is described clean and anonymized. The false-accept rate is fixed at 0.1%; since the
500 different pairs of the file resolve only FAR 0.2%, impostor distances are ALL cross-identity
combinations among the distinct images of the file (about 1.2 million for ``pairsDevTest.txt``).

- **clean baseline**: threshold ``t_clean`` at FAR 0.1% on clean-vs-clean impostors; rate = share of
  genuine pairs (clean a vs clean b) with distance below it.
- **naive** attacker (clean gallery, anonymized probe): the same ``t_clean``; rate = share of genuine
  trials below it, each genuine pair counted in both directions (clean a vs anonymized b AND
  anonymized a vs clean b).
- **adaptive** attacker (gallery anonymized the same way): threshold recalibrated at FAR 0.1% on
  anonymized-vs-anonymized impostors; rate = share of genuine anonymized pairs below it.

A trial is accepted when ``distance < threshold`` (strictly); see :func:`threshold_at_far`.

Measured on ``pairsDevTest.txt`` (2 shared CPU cores): the clean baseline is 91.8% at FAR 0.1%
(threshold 0.549; HOG located 1,545 of 1,549 faces, the rest used the fallback box), about 0.17 s
per image to locate and describe. A whole-image Gaussian blur of sigma 8 gives naive 2.7% and
adaptive 8.4% (the issue's reference: 2.6% / 8.4%).

Also here: image quality (:func:`ssim`, :func:`psnr`), the share of anonymized faces a detector still
finds (:func:`detection_rate`), and detector recall/precision on dlib imglab XML boxes
(:func:`read_imglab`, :func:`detector_pr`, :func:`box_calibration`).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.dlib_models import load_detector, load_face_recognition_model, load_shape_predictor
from ..data.images import load_image
from ..data.pairs import read_pairs
from ..data.report import DataReport
from .boxes import Box, iou
from .geometry import five_points

__all__ = [
    "DLIB_MATCH_THRESHOLD",
    "AnonymizedSet",
    "Anonymizer",
    "CleanSet",
    "Detector",
    "DlibMatcher",
    "PairSet",
    "box_calibration",
    "collect_detections",
    "detection_rate",
    "detector_pr",
    "evaluate_anonymizer",
    "lfw_pair_images",
    "pr_from_detections",
    "psnr",
    "read_imglab",
    "reid_rates",
    "ssim",
    "threshold_at_far",
]

#: ``anonymize(images, faces) -> images`` (one list of boxes per image).
Anonymizer = Callable[[list[np.ndarray], list[list[Box]]], list[np.ndarray]]
#: ``detect(image) -> boxes``.
Detector = Callable[[np.ndarray], list[Box]]

#: dlib's documented same-person threshold for its ResNet descriptors (Euclidean distance).
DLIB_MATCH_THRESHOLD = 0.6

# Where the face of a 250x250 LFW (deep-funneled) image lies when HOG finds none: the median HOG box
# (upsample 1) on pairsDevTest is (67, 80, 175, 187), as fractions of width/height.
_LFW_FALLBACK = (0.268, 0.32, 0.70, 0.748)
_CACHE_VERSION = 1


# --------------------------------------------------------------------------- #
# data sets
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PairSet:
    """Verification pairs as indices into a list of distinct images.

    Attributes
    ----------
    a, b : ndarray of int64, shape (m,)
        Index of each pair's two images.
    same : ndarray of bool, shape (m,)
        True for genuine (same-identity) pairs.
    labels : ndarray of str, shape (n_images,)
        Identity of every image (for LFW the name folder); images with different labels are
        impostors for one another.
    fold : ndarray of int64, shape (m,)
        Protocol fold of each pair (0-based).
    """

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    labels: np.ndarray
    fold: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        a = np.asarray(self.a, dtype=np.int64)
        b = np.asarray(self.b, dtype=np.int64)
        same = np.asarray(self.same, dtype=bool)
        labels = np.asarray(self.labels).astype(str)
        fold = np.asarray(self.fold, dtype=np.int64)
        if fold.size == 0:
            fold = np.zeros(a.shape, np.int64)
        if not (a.shape == b.shape == same.shape == fold.shape) or a.ndim != 1:
            raise ValueError(
                f"a, b, same and fold must be 1-D arrays of one length, got shapes {a.shape}, "
                f"{b.shape}, {same.shape}, {fold.shape}"
            )
        n = labels.shape[0]
        if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
            raise ValueError(f"pair indices must lie in [0, {n}) (one label per image)")
        for name, value in (("a", a), ("b", b), ("same", same), ("labels", labels), ("fold", fold)):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return int(self.a.shape[0])


def lfw_pair_images(
    lfw_root: str | Path, pairs_file: str | Path, report: DataReport | None = None
) -> tuple[list[Path], PairSet]:
    """The distinct images of an LFW pair file and its pairs as indices into them.

    Parameters
    ----------
    lfw_root : str or Path
        The LFW folder (holding ``lfw-deepfunneled/`` or the ``<Name>/`` folders directly).
    pairs_file : str or Path
        ``pairsDevTest.txt``, ``pairs.txt``, ...; a relative name is looked up in ``lfw_root``
        first.
    report : DataReport, optional
        Receives skipped lines and missing images (see :func:`fedface.data.pairs.read_pairs`).

    Returns
    -------
    paths : list of Path
        Distinct images in first-seen order.
    pairs : PairSet
        Indices into ``paths``, same flags, folds, and the identity (name folder) of every image.
    """
    pairs_file = Path(pairs_file)
    if not pairs_file.is_absolute() and (Path(lfw_root) / pairs_file).is_file():
        pairs_file = Path(lfw_root) / pairs_file
    raw = read_pairs(pairs_file, lfw_root, report=report)
    index: dict[Path, int] = {}
    for p in raw:
        for path in (p.a, p.b):
            index.setdefault(path, len(index))
    paths = list(index)
    pairs = PairSet(
        a=np.array([index[p.a] for p in raw], np.int64),
        b=np.array([index[p.b] for p in raw], np.int64),
        same=np.array([p.same for p in raw], bool),
        labels=np.array([path.parent.name for path in paths]),
        fold=np.array([p.fold for p in raw], np.int64),
    )
    return paths, pairs


# --------------------------------------------------------------------------- #
# the attacker
# --------------------------------------------------------------------------- #
@dataclass
class CleanSet:
    """Clean descriptors of a list of images, with the face box the attacker will reuse.

    ``located[i]`` is False when HOG found no face and the fallback box was used
    (:meth:`DlibMatcher.locate`). ``landmarks[i]`` is the fitted 5-point shape, ``(5, 2)``.
    """

    paths: list[Path]
    descriptors: np.ndarray
    boxes: list[Box]
    located: np.ndarray
    seconds: float = 0.0
    from_cache: bool = False

    @property
    def landmarks(self) -> list[np.ndarray | None]:
        return [b.landmarks for b in self.boxes]


@dataclass
class AnonymizedSet:
    """Anonymized descriptors (described in the clean boxes) and per-image side measurements.

    ``ssim``/``psnr`` are per image (NaN when not measured); ``redetected`` is per image (True when
    ``detect`` still finds a face at IoU >= ``iou_min`` with the clean box; all False when no
    detector was given, see ``detect_measured``).
    """

    descriptors: np.ndarray
    ssim: np.ndarray
    psnr: np.ndarray
    redetected: np.ndarray
    detect_measured: bool
    seconds_anonymize: float
    seconds_describe: float


class DlibMatcher:
    """The independent re-identification attacker: dlib's ResNet (128-d) with 5-point alignment.

    The attacker is told where the face is: :meth:`describe` takes a box (or landmarks) instead of
    running a detector on the probe, so an anonymized probe is described inside the box found on
    the clean image. dlib would often not even detect an anonymized face; pointing it at the face
    is the stronger attacker and the one whose success rate means something.

    Parameters
    ----------
    upsample : int, default 1
        HOG upsampling used by :meth:`locate` on clean images (1 finds faces down to ~40 px).
    num_jitters : int, default 0
        dlib's test-time jittering (0 = one pass; higher is slower and slightly more accurate).
    padding : float, default 0.25
        dlib's chip padding (its default).
    fallback : bool, default True
        When HOG finds no face in a clean image, use the box where LFW (deep-funneled 250x250) puts
        its face instead of giving up (``located`` records it).
    """

    def __init__(
        self, upsample: int = 1, num_jitters: int = 0, padding: float = 0.25, fallback: bool = True
    ):
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        self.upsample = int(upsample)
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        self.fallback = bool(fallback)
        self._detector: Any = None
        self._predictor: Any = None
        self._model: Any = None

    # lazy dlib objects (loading the ResNet takes ~0.5 s)
    @property
    def detector(self) -> Any:
        if self._detector is None:
            self._detector = load_detector()
        return self._detector

    @property
    def predictor(self) -> Any:
        if self._predictor is None:
            self._predictor = load_shape_predictor(5)
        return self._predictor

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_face_recognition_model()
        return self._model

    def config(self) -> dict:
        """The settings that change descriptors (part of the cache key)."""
        return {"upsample": self.upsample, "num_jitters": self.num_jitters,
                "padding": self.padding, "fallback": self.fallback}

    def locate(self, image: np.ndarray) -> tuple[Box | None, bool]:
        """The face an LFW-style image is about: HOG's detection nearest the image centre.

        Returns ``(box, located)``: ``located`` is False when HOG found nothing and the fallback box
        (LFW's usual face position, scaled to the image) was returned, or ``(None, False)`` when
        ``fallback`` is off.
        """
        image = _rgb(image)
        h, w = image.shape[:2]
        rects, scores, _ = self.detector.run(image, self.upsample, 0.0)
        if len(rects):
            cx, cy = w / 2, h / 2

            def off(r: Any) -> float:
                return ((r.left() + r.right()) / 2 - cx) ** 2 + ((r.top() + r.bottom()) / 2 - cy) ** 2

            k = min(range(len(rects)), key=lambda i: off(rects[i]))
            r = rects[k]
            return Box(r.left(), r.top(), r.right() + 1, r.bottom() + 1, float(scores[k])), True
        if not self.fallback:
            return None, False
        fx0, fy0, fx1, fy1 = _LFW_FALLBACK
        return Box(fx0 * w, fy0 * h, fx1 * w, fy1 * h, 0.0), False

    def shape(self, image: np.ndarray, where: Box | np.ndarray) -> Any:
        """The dlib ``full_object_detection`` used for alignment.

        ``where`` is a :class:`Box` (the 5-point shape is fitted on ``image`` inside it; a box
        carrying 5 or 68 ``landmarks`` is NOT used for them - pass the landmarks array to reuse
        landmarks) or an ``(n, 2)`` landmark array with n = 5 (dlib's order) or 68 (iBUG order,
        converted to dlib's 5 points).
        """
        import dlib

        image = _rgb(image)
        if isinstance(where, Box):
            rect = dlib.rectangle(int(round(where.x0)), int(round(where.y0)),
                                  int(round(where.x1)) - 1, int(round(where.y1)) - 1)
            return self.predictor(image, rect)
        pts = five_points(where)
        if pts is None:
            raise ValueError(
                f"landmarks must be a (5, 2) or (68, 2) array, got shape {np.shape(where)}")
        x0, y0 = np.floor(pts.min(axis=0)).astype(int)
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
        parts = dlib.points()
        for x, y in pts:
            parts.append(dlib.point(int(round(x)), int(round(y))))
        return dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), parts)

    def describe(self, image: np.ndarray, where: Box | np.ndarray) -> np.ndarray:
        """The 128-d descriptor (float64) of the face at ``where`` in ``image``.

        Parameters
        ----------
        image : ndarray, shape (H, W, 3) uint8 RGB (grey ``(H, W)`` is expanded)
        where : Box or ndarray
            The face box (5-point shape fitted on ``image`` inside it) or landmarks; see
            :meth:`shape`. For an anonymized probe pass the box found on the CLEAN image.
        """
        image = _rgb(image)
        d = self.model.compute_face_descriptor(image, self.shape(image, where), self.num_jitters,
                                               self.padding)
        return np.asarray(d, dtype=np.float64)

    def _landmarks(self, shape: Any) -> np.ndarray:
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def describe_clean(
        self, paths: Sequence[str | Path], cache_dir: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> CleanSet:
        """Locate and describe every clean image (HOG box nearest the centre, 5-point shape).

        Parameters
        ----------
        paths : sequence of path
            Image files.
        cache_dir : path, optional
            Where to keep the result (``dlib_clean_<key>.npz``); the key covers this matcher's
            settings and every file's path, size and modification time, so a changed image or
            setting recomputes.
        progress : callable, optional
            Called as ``progress(done, total)`` every 100 images.
        """
        paths = [Path(p) for p in paths]
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) / f"dlib_clean_{self._cache_key(paths)}.npz"
            if cache.is_file():
                try:
                    return self._read_cache(cache, paths)
                except (OSError, ValueError, KeyError):
                    pass  # unreadable cache: recompute and overwrite
        start = time.perf_counter()
        desc = np.full((len(paths), 128), np.nan)
        boxes: list[Box] = []
        located = np.zeros(len(paths), bool)
        for i, path in enumerate(paths):
            if progress is not None and i and i % 100 == 0:
                progress(i, len(paths))
            image = load_image(path)
            box, found = self.locate(image)
            located[i] = found
            if box is None:
                boxes.append(Box(0, 0, 0, 0, 0.0))
                continue
            shape = self.shape(image, box)
            desc[i] = self.model.compute_face_descriptor(image, shape, self.num_jitters,
                                                         self.padding)
            boxes.append(Box(box.x0, box.y0, box.x1, box.y1, box.score, self._landmarks(shape)))
        if progress is not None:
            progress(len(paths), len(paths))
        result = CleanSet(paths, desc, boxes, located, time.perf_counter() - start)
        if cache is not None:
            self._write_cache(cache, result)
        return result

    def describe_anonymized(
        self,
        paths: Sequence[str | Path],
        clean: CleanSet,
        anonymize: Anonymizer,
        batch_size: int = 32,
        align: str = "anonymized",
        quality: bool = True,
        detect: Detector | None = None,
        iou_min: float = 0.3,
    ) -> AnonymizedSet:
        """Anonymize every image (in batches) and describe it in its CLEAN box.

        Parameters
        ----------
        paths : sequence of path
            The images of ``clean``, in the same order.
        clean : CleanSet
            From :meth:`describe_clean`; its boxes are given to the anonymizer (one face per image)
            and to the attacker.
        anonymize : callable
            ``anonymize(images, faces) -> images``.
        batch_size : int, default 32
        align : {"anonymized", "clean"}
            ``"anonymized"``: fit the 5-point shape on the anonymized image inside the clean box
            (a real attacker); ``"clean"``: reuse the clean landmarks (oracle alignment).
        quality : bool, default True
            Also measure :func:`ssim` and :func:`psnr` of each anonymized image against its clean
            one (whole image).
        detect : callable, optional
            Also measure whether ``detect`` still finds the face (:func:`detection_rate` per image).
        iou_min : float, default 0.3
            Overlap with the clean box that counts as "still found".
        """
        if align not in ("anonymized", "clean"):
            raise ValueError(f"align must be 'anonymized' or 'clean', got {align!r}")
        paths = [Path(p) for p in paths]
        if len(paths) != len(clean.boxes):
            raise ValueError(f"{len(paths)} paths but the clean set has {len(clean.boxes)} images")
        n = len(paths)
        desc = np.full((n, 128), np.nan)
        q_ssim = np.full(n, np.nan)
        q_psnr = np.full(n, np.nan)
        redetected = np.zeros(n, bool)
        t_anon = t_desc = 0.0
        for lo in range(0, n, max(1, int(batch_size))):
            idx = range(lo, min(n, lo + max(1, int(batch_size))))
            images = [load_image(paths[i]) for i in idx]
            faces = [[clean.boxes[i]] for i in idx]
            t0 = time.perf_counter()
            out = list(anonymize(images, faces))
            t_anon += time.perf_counter() - t0
            if len(out) != len(images):
                raise ValueError(f"the anonymizer returned {len(out)} images for {len(images)}")
            t0 = time.perf_counter()
            for k, i in enumerate(idx):
                img = _rgb(out[k])
                if img.shape != images[k].shape:
                    raise ValueError(
                        f"the anonymizer changed the shape of {paths[i]}: {images[k].shape} -> "
                        f"{img.shape}"
                    )
                box = clean.boxes[i]
                if not np.isfinite(clean.descriptors[i]).all():
                    continue
                where: Box | np.ndarray = box
                if align == "clean" and box.landmarks is not None:
                    where = box.landmarks
                desc[i] = self.describe(img, where)
                if quality:
                    q_ssim[i] = ssim(images[k], img)
                    q_psnr[i] = psnr(images[k], img)
                if detect is not None:
                    redetected[i] = detection_rate([img], [[box]], detect, iou_min) == 1.0
            t_desc += time.perf_counter() - t0
        return AnonymizedSet(desc, q_ssim, q_psnr, redetected, detect is not None, t_anon, t_desc)

    # cache --------------------------------------------------------------------------------- #
    def _cache_key(self, paths: list[Path]) -> str:
        h = hashlib.sha1(repr((_CACHE_VERSION, sorted(self.config().items()))).encode())
        for p in paths:
            try:
                st = p.stat()
                h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
        return h.hexdigest()[:20]

    def _write_cache(self, cache: Path, s: CleanSet) -> None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lm = np.full((len(s.boxes), 5, 2), np.nan)
        for i, b in enumerate(s.boxes):
            if b.landmarks is not None:
                lm[i] = b.landmarks
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, descriptors=s.descriptors, located=s.located, landmarks=lm,
                 boxes=np.array([[*b.as_tuple(), b.score] for b in s.boxes], np.float64).reshape(-1, 5),
                 seconds=np.float64(s.seconds))
        os.replace(tmp, cache)

    def _read_cache(self, cache: Path, paths: list[Path]) -> CleanSet:
        with np.load(cache) as z:
            desc, located, lm, bx = z["descriptors"], z["located"], z["landmarks"], z["boxes"]
            seconds = float(z["seconds"])
        if desc.shape != (len(paths), 128):
            raise ValueError("cache does not match the paths")
        boxes = [Box(*map(float, bx[i]), landmarks=None if np.isnan(lm[i]).any() else lm[i])
                 for i in range(len(paths))]
        return CleanSet(paths, desc, boxes, located.astype(bool), seconds, from_cache=True)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be HxWx3 RGB (or HxW grey), got shape {image.shape}")
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------- #
# thresholds and re-identification rates
# --------------------------------------------------------------------------- #
def threshold_at_far(impostor_distances: np.ndarray, far: float = 0.001) -> float:
    """The largest distance threshold whose false-accept rate does not exceed ``far``.

    A trial is accepted when ``distance < threshold``. With the ``N`` impostor distances sorted
    ascending ``d[0] <= ... <= d[N-1]`` and ``k = floor(far * N)``, the threshold is ``d[k]``:
    exactly ``k`` impostors lie strictly below it when there are no ties (fewer with ties at
    ``d[k]``), so the realized FAR is ``<= k / N <= far``, and any larger threshold would accept
    ``d[k]`` too. ``k = 0`` (fewer than ``1 / far`` impostors) gives ``d[0]``: FAR 0, nothing
    accepted below the closest impostor. ``far = 1`` (``k = N``) gives ``+inf``.

    Parameters
    ----------
    impostor_distances : array_like, shape (N,)
        Distances of different-identity trials (NaN not allowed).
    far : float, default 0.001
        Target false-accept rate in ``(0, 1]``.

    Returns
    -------
    float
    """
    d = np.asarray(impostor_distances, dtype=np.float64).ravel()
    return _threshold_from_smallest(d, d.size, far)


def _check_far(far: float) -> None:
    if not 0.0 < float(far) <= 1.0:
        raise ValueError(f"far must be in (0, 1], got {far}")


def _k_at_far(n_total: int, far: float) -> int:
    return int(math.floor(float(far) * n_total + 1e-9))


def _threshold_from_smallest(smallest: np.ndarray, n_total: int, far: float) -> float:
    """Threshold from (at least) the ``k + 1`` smallest of ``n_total`` impostor distances."""
    _check_far(far)
    if n_total == 0:
        raise ValueError("no impostor distances: a FAR threshold needs different-identity trials")
    if np.isnan(smallest).any():
        raise ValueError("impostor distances contain NaN")
    k = _k_at_far(n_total, far)
    if k >= n_total:
        return math.inf
    return float(np.partition(smallest, k)[k])


def _blocks(x: np.ndarray, y: np.ndarray, labels: np.ndarray, symmetric: bool,
            block: int = 1024) -> Iterator[np.ndarray]:
    """Euclidean distances ``|x_i - y_j|`` over all cross-identity (i, j), block by block.

    ``symmetric`` (x and y are the same set): only ``i < j``; otherwise every ordered ``(i, j)``.
    """
    codes = np.unique(labels, return_inverse=True)[1]
    y2 = (y * y).sum(1)
    for lo in range(0, x.shape[0], block):
        xb = x[lo:lo + block]
        d2 = (xb * xb).sum(1)[:, None] + y2[None, :] - 2.0 * xb @ y.T
        d = _resolve(np.sqrt(np.maximum(d2, 0.0)))
        mask = codes[lo:lo + block, None] != codes[None, :]
        if symmetric:
            rows = np.arange(lo, lo + xb.shape[0])[:, None]
            mask &= np.arange(y.shape[0])[None, :] > rows
        yield d[mask]


def _n_cross(labels: np.ndarray, symmetric: bool) -> int:
    _, counts = np.unique(labels, return_counts=True)
    n = int(labels.shape[0])
    ordered = n * n - int((counts.astype(np.int64) ** 2).sum())
    return ordered // 2 if symmetric else ordered


def _cross_threshold(x: np.ndarray, y: np.ndarray, labels: np.ndarray, symmetric: bool,
                     far: float) -> tuple[float, int]:
    """FAR threshold over all cross-identity trials, keeping only the smallest distances."""
    n_total = _n_cross(labels, symmetric)
    if n_total == 0:
        raise ValueError("all images have one identity: no impostor trials")
    keep = min(n_total, _k_at_far(n_total, far) + 1)
    best = np.empty(0)
    for d in _blocks(x, y, labels, symmetric):
        best = np.concatenate([best, d])
        if best.size > 4 * keep + 100_000:
            best = np.partition(best, keep - 1)[:keep]
    return _threshold_from_smallest(best, n_total, far), n_total


def _cross_below(x: np.ndarray, y: np.ndarray, labels: np.ndarray, symmetric: bool,
                 t: float) -> int:
    return int(sum(int((d < t).sum()) for d in _blocks(x, y, labels, symmetric)))


#: Distances are compared at this resolution: dlib's descriptors come from float32, and an
#: anonymizer that makes every face the same (a solid mask) leaves distances that differ only
#: by rounding noise; without it, exact-zero genuine distances would sit "below" impostors
#: at 1e-8 and count as re-identified.
DISTANCE_RESOLUTION = 1e-6


def _resolve(d: np.ndarray) -> np.ndarray:
    return np.round(d / DISTANCE_RESOLUTION) * DISTANCE_RESOLUTION


def _dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _resolve(np.sqrt(((x - y) ** 2).sum(axis=1)))


def reid_rates(
    pairs: PairSet, clean_desc: np.ndarray, anon_desc: np.ndarray, far: float = 0.001
) -> dict:
    """Naive and adaptive re-identification rates at a fixed FAR (LFW pairs protocol).

    Parameters
    ----------
    pairs : PairSet
        Pairs as indices into the descriptor rows, with an identity label per row.
    clean_desc, anon_desc : ndarray, shape (n_images, d)
        Descriptors of the clean and the anonymized images (same rows). Rows with NaN (no face
        described) are dropped, with every pair and impostor trial that uses them.
    far : float, default 0.001
        False-accept rate at which thresholds are set.

    Returns
    -------
    dict
        ``naive_rate``: share of the ``2 * n_genuine`` trials (clean a vs anonymized b, anonymized a
        vs clean b) with distance below ``threshold_clean``; ``adaptive_rate``: share of genuine
        anonymized-vs-anonymized pairs below ``threshold_adaptive``; ``clean_rate``: the clean
        baseline (clean-vs-clean genuine pairs below ``threshold_clean``, i.e. TAR at FAR);
        ``threshold_clean``, ``threshold_adaptive``; ``naive_far_observed``: share of clean-vs-
        anonymized cross-identity trials (ordered) accepted at ``threshold_clean`` (how the naive
        attacker's FAR really behaves on anonymized probes); ``clean_far_on_different_pairs``: FAR
        of ``threshold_clean`` on the file's own different pairs (a check); counts ``n_images``,
        ``n_genuine``, ``n_naive_trials``, ``n_impostor_clean``, ``n_impostor_adaptive``,
        ``n_dropped_images``; ``far``. Also mean genuine distances (``*_genuine_mean``) and dlib's
        fixed-threshold (0.6) rates ``naive_rate_at_0.6``, ``adaptive_rate_at_0.6``.

    Notes
    -----
    Impostor trials are ALL pairs of distinct images with different identities (i < j), not only
    the file's different pairs: ``pairsDevTest.txt`` has 500 different pairs (FAR resolution 0.2%)
    but ~1.2 million cross-identity combinations among its 1,549 images, which estimate the FAR 0.1%
    threshold well. Both sides of a trial come from distinct images, so the matcher is never asked
    to match an image with itself.
    """
    clean_desc = np.asarray(clean_desc, dtype=np.float64)
    anon_desc = np.asarray(anon_desc, dtype=np.float64)
    n = pairs.labels.shape[0]
    if clean_desc.shape[0] != n or anon_desc.shape != clean_desc.shape:
        raise ValueError(
            f"descriptors must have one row per image ({n}): got clean {clean_desc.shape}, "
            f"anonymized {anon_desc.shape}"
        )
    ok = np.isfinite(clean_desc).all(1) & np.isfinite(anon_desc).all(1)
    keep_pair = ok[pairs.a] & ok[pairs.b]
    rows = np.flatnonzero(ok)
    labels = pairs.labels[rows]
    c, a = clean_desc[rows], anon_desc[rows]
    remap = np.full(n, -1, np.int64)
    remap[rows] = np.arange(rows.size)
    pa, pb = remap[pairs.a[keep_pair]], remap[pairs.b[keep_pair]]
    same = pairs.same[keep_pair]
    if not same.any():
        raise ValueError("no genuine pairs left: re-identification rates need same-identity pairs")

    t_clean, n_imp_clean = _cross_threshold(c, c, labels, True, far)
    t_adapt, n_imp_adapt = _cross_threshold(a, a, labels, True, far)
    ga, gb = pa[same], pb[same]
    d_clean = _dist(c[ga], c[gb])
    d_naive = np.concatenate([_dist(c[ga], a[gb]), _dist(a[ga], c[gb])])
    d_adapt = _dist(a[ga], a[gb])
    diff_a, diff_b = pa[~same], pb[~same]
    d_diff = _dist(c[diff_a], c[diff_b])
    n_naive_imp = _n_cross(labels, False)
    return {
        "far": float(far),
        "naive_rate": float(np.mean(d_naive < t_clean)),
        "adaptive_rate": float(np.mean(d_adapt < t_adapt)),
        "clean_rate": float(np.mean(d_clean < t_clean)),
        "threshold_clean": t_clean,
        "threshold_adaptive": t_adapt,
        "naive_far_observed": _cross_below(c, a, labels, False, t_clean) / max(1, n_naive_imp),
        "clean_far_on_different_pairs": float(np.mean(d_diff < t_clean)) if d_diff.size else math.nan,
        "naive_rate_at_0.6": float(np.mean(d_naive < DLIB_MATCH_THRESHOLD)),
        "adaptive_rate_at_0.6": float(np.mean(d_adapt < DLIB_MATCH_THRESHOLD)),
        "clean_rate_at_0.6": float(np.mean(d_clean < DLIB_MATCH_THRESHOLD)),
        "clean_genuine_mean": float(d_clean.mean()),
        "naive_genuine_mean": float(d_naive.mean()),
        "adaptive_genuine_mean": float(d_adapt.mean()),
        "n_images": int(rows.size),
        "n_dropped_images": int(n - rows.size),
        "n_genuine": int(same.sum()),
        "n_naive_trials": int(d_naive.size),
        "n_impostor_clean": int(n_imp_clean),
        "n_impostor_adaptive": int(n_imp_adapt),
    }


# --------------------------------------------------------------------------- #
# image quality
# --------------------------------------------------------------------------- #
def _pair_check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype} and {b.dtype}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
        raise ValueError(f"images must be HxW or HxWx3, got shape {a.shape}")
    return a, b


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 images (1.0 when identical).

    scikit-image's ``structural_similarity`` with ``data_range=255``, its default 7x7 uniform
    window, averaged over the RGB channels (``channel_axis=2``). DSSIM (Fawkes' budget) is
    ``(1 - ssim) / 2``. Images smaller than 7 px on a side use the largest odd window that fits.
    """
    from skimage.metrics import structural_similarity

    a, b = _pair_check(a, b)
    if a.ndim == 3 and a.shape[2] == 1:
        a, b = a[:, :, 0], b[:, :, 0]
    win = min(7, min(a.shape[:2]) - (1 - min(a.shape[:2]) % 2))
    if win < 3:
        raise ValueError(f"images of shape {a.shape} are too small for SSIM (need >= 3 px)")
    kw = {"channel_axis": 2} if a.ndim == 3 else {}
    return float(structural_similarity(a, b, data_range=255, win_size=win, **kw))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images; ``inf`` when identical.

    ``10 log10(255^2 / MSE)`` over all pixels and channels (scikit-image's
    ``peak_signal_noise_ratio`` with ``data_range=255``).
    """
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair_check(a, b)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(a, b, data_range=255))


# --------------------------------------------------------------------------- #
# detection
# --------------------------------------------------------------------------- #
def detection_rate(
    images: Sequence[np.ndarray],
    clean_boxes: Sequence[Box | Sequence[Box]],
    detect: Detector,
    iou_min: float = 0.3,
) -> float:
    """Share of original faces that ``detect`` still finds in the anonymized images.

    Parameters
    ----------
    images : sequence of ndarray
        Anonymized images.
    clean_boxes : sequence of Box or of lists of Box
        The face box(es) of each image, found on the clean image.
    detect : callable
        ``detect(image) -> list[Box]``.
    iou_min : float, default 0.3
        A face counts as found when some detection overlaps its clean box with IoU >= ``iou_min``
        (lenient: a detector's box may be scaled differently from the clean one).

    Returns
    -------
    float
        Found faces / all faces (with one face per image, the share of images); NaN when there are
        no faces.
    """
    if len(images) != len(clean_boxes):
        raise ValueError(f"{len(images)} images but {len(clean_boxes)} box lists")
    found = total = 0
    for image, boxes in zip(images, clean_boxes):
        boxes = [boxes] if isinstance(boxes, Box) else list(boxes)
        if not boxes:
            continue
        dets = list(detect(image))
        for box in boxes:
            total += 1
            found += any(iou(box, d) >= iou_min for d in dets)
    return found / total if total else math.nan


def read_imglab(xml_path: str | Path, keep_ignored: bool = False) -> dict[str, list[Box]]:
    """Read a dlib imglab XML file (``<image file=...><box top left width height/>``).

    Parameters
    ----------
    xml_path : str or Path
    keep_ignored : bool, default False
        Boxes marked ``ignore='1'`` (faces imglab's author chose not to require: too small,
        occluded) are dropped by default, so a detector is neither required to find them nor
        excused for them (a detection there counts as a false positive in :func:`detector_pr`;
        the shared faces-multi files have none).

    Returns
    -------
    dict
        ``{image path: boxes}`` in file order, the path resolved against the XML file's folder.
        A box ``left, top, width, height`` becomes ``Box(left, top, left + width, top + height)``
        (imglab's rectangle is inclusive of ``left + width - 1``); ``<part name x y/>`` children
        (68 landmarks in ``*_with_face_landmarks.xml``), sorted by name, become ``landmarks``.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"imglab file {xml_path} does not exist")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{xml_path}: not a readable imglab XML file ({exc})") from exc
    out: dict[str, list[Box]] = {}
    for image in root.iter("image"):
        name = image.get("file")
        if not name:
            raise ValueError(f"{xml_path}: an <image> element has no file attribute")
        boxes: list[Box] = []
        for el in image.findall("box"):
            if el.get("ignore", "0").strip() == "1" and not keep_ignored:
                continue
            try:
                top, left = float(el.get("top")), float(el.get("left"))
                width, height = float(el.get("width")), float(el.get("height"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{xml_path}: box in {name!r} lacks top/left/width/height") from exc
            parts = sorted(el.findall("part"), key=lambda p: p.get("name", ""))
            lm = (np.array([[float(p.get("x")), float(p.get("y"))] for p in parts])
                  if parts else None)
            boxes.append(Box(left, top, left + width, top + height, 1.0, lm))
        out.setdefault(str((xml_path.parent / name).resolve()), []).extend(boxes)
    return out


def collect_detections(
    detect: Detector, xml_paths: str | Path | Sequence[str | Path]
) -> tuple[dict[str, list[Box]], dict[str, list[Box]]]:
    """Run ``detect`` once on every labelled image: ``(truth, detections)`` keyed by image path.

    Lets :func:`pr_from_detections` sweep score thresholds and box scales without re-detecting.
    """
    if isinstance(xml_paths, (str, Path)):
        xml_paths = [xml_paths]
    truth: dict[str, list[Box]] = {}
    for x in xml_paths:
        for k, v in read_imglab(x).items():
            truth.setdefault(k, []).extend(v)
    dets = {k: list(detect(load_image(k))) for k in truth}
    return truth, dets


def _adjust(d: Box, scale: float, shift: tuple[float, float]) -> Box:
    """``d`` moved by ``shift`` (fractions of its width/height), then scaled about its centre."""
    if shift != (0.0, 0.0):
        dx, dy = shift[0] * d.width, shift[1] * d.height
        d = Box(d.x0 + dx, d.y0 + dy, d.x1 + dx, d.y1 + dy, d.score, d.landmarks)
    return d.expand(scale) if scale != 1.0 else d


def _greedy_match(truth: list[Box], dets: list[Box], thr: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by decreasing IoU; only pairs with IoU >= ``thr``."""
    cand = [(iou(t, d), i, j) for i, t in enumerate(truth) for j, d in enumerate(dets)]
    cand = sorted((c for c in cand if c[0] >= thr and c[0] > 0), key=lambda c: (-c[0], c[1], c[2]))
    used_t: set[int] = set()
    used_d: set[int] = set()
    out = []
    for v, i, j in cand:
        if i not in used_t and j not in used_d:
            used_t.add(i)
            used_d.add(j)
            out.append((i, j, v))
    return out


def pr_from_detections(
    truth: dict[str, list[Box]],
    detections: dict[str, list[Box]],
    iou_thr: float = 0.5,
    min_score: float | None = None,
    box_scale: float = 1.0,
    box_shift: tuple[float, float] = (0.0, 0.0),
) -> dict:
    """Recall and precision of given detections against labelled boxes (see :func:`detector_pr`)."""
    shift = (float(box_shift[0]), float(box_shift[1]))
    tp = fp = fn = 0
    per_image = []
    ious: list[float] = []
    for key, gt in truth.items():
        dets = [d for d in detections.get(key, []) if min_score is None or d.score >= min_score]
        dets = [_adjust(d, box_scale, shift) for d in dets]
        m = _greedy_match(gt, dets, iou_thr)
        ious += [v for _, _, v in m]
        t, f, n = len(m), len(dets) - len(m), len(gt) - len(m)
        tp, fp, fn = tp + t, fp + f, fn + n
        per_image.append({"image": key, "n_truth": len(gt), "n_detections": len(dets),
                          "tp": t, "fp": f, "fn": n})
    return {
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "tp": tp, "fp": fp, "fn": fn,
        "mean_iou_matched": float(np.mean(ious)) if ious else math.nan,
        "iou": float(iou_thr), "min_score": min_score, "box_scale": float(box_scale),
        "box_shift": list(shift),
        "per_image": per_image,
    }


def detector_pr(
    detect: Detector,
    xml_paths: str | Path | Sequence[str | Path],
    iou: float = 0.5,
    min_score: float | None = None,
    box_scale: float = 1.0,
    box_shift: tuple[float, float] = (0.0, 0.0),
) -> dict:
    """Detector recall and precision on dlib imglab labelled boxes (e.g. faces-multi).

    Parameters
    ----------
    detect : callable
        ``detect(image) -> list[Box]``.
    xml_paths : path or sequence of paths
        imglab XML files (``training.xml``, ``testing.xml``); images are pooled.
    iou : float, default 0.5
        A detection is a true positive when matched to a labelled box with IoU >= ``iou``.
        Matching is greedy and one-to-one: all (label, detection) pairs by decreasing IoU.
    min_score : float, optional
        Ignore detections scoring below it.
    box_scale : float, default 1.0
        Scale every detection about its centre before matching (dlib's HOG/CNN boxes are tighter
        than some labelling conventions; see :func:`box_calibration`).
    box_shift : (float, float), default (0, 0)
        Move every detection by these fractions of its width and height first (e.g. the MMOD CNN's
        boxes sit higher on the face than imglab's labels).

    Returns
    -------
    dict
        ``recall`` (TP / labelled), ``precision`` (TP / detections), ``tp``, ``fp``, ``fn``,
        ``mean_iou_matched``, the settings, and ``per_image`` (image, n_truth, n_detections, tp,
        fp, fn).
    """
    truth, dets = collect_detections(detect, xml_paths)
    return pr_from_detections(truth, dets, iou, min_score, box_scale, box_shift)


def box_calibration(
    truth: dict[str, list[Box]],
    detections: dict[str, list[Box]],
    scales: Sequence[float] | None = None,
    match_iou: float = 0.3,
) -> dict:
    """The scale (and shift) of detections that best fits the labelled boxes.

    Detections are matched to labels once, at ``box_scale=1`` and a lenient ``match_iou``; each
    candidate scale is then scored by the mean IoU of those matched pairs. The same search is
    repeated after moving each detection by the median centre offset (``shift``).

    Returns
    -------
    dict
        ``best_scale``, ``best_mean_iou`` (scale only), ``mean_iou_at_1``, ``n_matched``,
        ``by_scale`` (``{scale: mean IoU}``), ``shift`` (median of (label centre - detection
        centre) / detection width and / height: pass it as ``box_shift``), ``best_scale_shifted``
        and ``best_mean_iou_shifted`` (the scale search after that shift), ``size_ratio`` (median
        label width / detection width).
    """
    scales = np.round(np.arange(0.8, 1.61, 0.02), 4) if scales is None else np.asarray(scales)
    matched: list[tuple[Box, Box]] = []
    for key, gt in truth.items():
        dets = detections.get(key, [])
        matched += [(gt[i], dets[j]) for i, j, _ in _greedy_match(gt, dets, match_iou)]
    if not matched:
        raise ValueError("no detection overlaps a labelled box: nothing to calibrate")
    off = np.array([[(t.center[0] - d.center[0]) / d.width, (t.center[1] - d.center[1]) / d.height]
                    for t, d in matched])
    shift = (float(np.median(off[:, 0])), float(np.median(off[:, 1])))

    def mean_iou(s: float, sh: tuple[float, float]) -> float:
        return float(np.mean([iou(t, _adjust(d, s, sh)) for t, d in matched]))

    by_scale = {float(s): mean_iou(float(s), (0.0, 0.0)) for s in scales}
    shifted = {float(s): mean_iou(float(s), shift) for s in scales}
    best = max(by_scale, key=lambda s: by_scale[s])
    best_sh = max(shifted, key=lambda s: shifted[s])
    return {
        "best_scale": best, "best_mean_iou": by_scale[best],
        "mean_iou_at_1": mean_iou(1.0, (0.0, 0.0)),
        "n_matched": len(matched), "by_scale": by_scale,
        "shift": list(shift), "best_scale_shifted": best_sh,
        "best_mean_iou_shifted": shifted[best_sh],
        "size_ratio": float(np.median([t.width / d.width for t, d in matched])),
    }


# --------------------------------------------------------------------------- #
# one call for the benchmark
# --------------------------------------------------------------------------- #
def evaluate_anonymizer(
    anonymize: Anonymizer,
    paths: Sequence[str | Path],
    pairs: PairSet,
    matcher: DlibMatcher | None = None,
    clean: CleanSet | None = None,
    far: float = 0.001,
    cache_dir: str | Path | None = None,
    detect: Detector | None = None,
    align: str = "anonymized",
    batch_size: int = 32,
) -> dict:
    """Re-identification, image quality and re-detection of one anonymizer on a pair file.

    Parameters
    ----------
    anonymize : callable
        ``anonymize(images, faces) -> images``; gets each image with its clean face box.
    paths, pairs : from :func:`lfw_pair_images`
    matcher : DlibMatcher, optional
        The attacker (a default one is made).
    clean : CleanSet, optional
        Precomputed clean descriptors (else computed, cached in ``cache_dir`` when given); pass
        the same one to evaluate several anonymizers.
    far, detect, align, batch_size
        See :func:`reid_rates` and :meth:`DlibMatcher.describe_anonymized`.

    Returns
    -------
    dict
        :func:`reid_rates`' keys plus ``ssim_mean``, ``psnr_mean`` (finite values; identical
        images give ``inf`` and are counted in ``psnr_identical``), ``detection_rate`` (NaN without
        ``detect``), ``clean_located`` (share of clean images where HOG found the face),
        ``align``, ``seconds_anonymize_per_image``, ``seconds_describe_per_image``.
    """
    matcher = matcher or DlibMatcher()
    clean = clean or matcher.describe_clean(paths, cache_dir=cache_dir)
    anon = matcher.describe_anonymized(paths, clean, anonymize, batch_size=batch_size, align=align,
                                       detect=detect)
    out = reid_rates(pairs, clean.descriptors, anon.descriptors, far)
    fin = anon.psnr[np.isfinite(anon.psnr)]
    n = max(1, len(clean.boxes))
    out.update({
        "ssim_mean": float(np.nanmean(anon.ssim)) if np.isfinite(anon.ssim).any() else math.nan,
        "psnr_mean": float(fin.mean()) if fin.size else math.inf,
        "psnr_identical": int(np.isinf(anon.psnr).sum()),
        "detection_rate": float(anon.redetected.mean()) if anon.detect_measured else math.nan,
        "clean_located": float(clean.located.mean()) if clean.located.size else math.nan,
        "align": align,
        "seconds_anonymize_per_image": anon.seconds_anonymize / n,
        "seconds_describe_per_image": anon.seconds_describe / n,
    })
    return out
