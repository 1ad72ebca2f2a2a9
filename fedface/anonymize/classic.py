"""The classic obfuscations: blur, mosaic (pixelation) and mask (solid colour or image).

Each covers every given face box (already grown by the run's ``mask_scale``) as an ellipse
inscribed in the box (``shape="ellipse"``, deface's default look) or the whole box
(``shape="box"``). Strengths are relative to the face's size so a preset means the same on a
40 px face and a 400 px one. They are fast and hide identity from people, but Newton et al.
(2005) and McPherson et al. (2016) re-identify lightly blurred or pixelated faces with
recognizers: ``fedface bench anonymize`` measures each preset against dlib's matcher.

Adversary: anyone who obtains the output image (a person, or a recognizer run on it). The
face's position and size are not hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fedface.anonymize.boxes import Box

__all__ = ["Blur", "Mask", "Mosaic", "SHAPES", "paste", "region_mask"]

SHAPES = ("ellipse", "box")


def region_mask(box: Box, x0: int, y0: int, x1: int, y1: int, shape: str) -> np.ndarray | None:
    """Boolean mask over the pixels ``[y0:y1, x0:x1]`` (the box clipped to the image) of the
    ellipse inscribed in ``box`` (``None``: the whole region). The ellipse is that of the
    unclipped box, so a face cut by the image border keeps its shape."""
    if shape == "box":
        return None
    cx, cy = box.center
    rx, ry = max(box.width / 2, 1e-6), max(box.height / 2, 1e-6)
    y = (np.arange(y0, y1) + 0.5 - cy) / ry
    x = (np.arange(x0, x1) + 0.5 - cx) / rx
    return (y[:, None] ** 2 + x[None, :] ** 2) <= 1.0


def paste(out: np.ndarray, box: Box, patch: np.ndarray, shape: str) -> None:
    """Write ``patch`` (the box's pixels, already transformed) into ``out`` in place,
    inside the ellipse or the whole box."""
    x0, y0, x1, y1 = box.pixels(out.shape[1], out.shape[0])
    mask = region_mask(box, x0, y0, x1, y1, shape)
    roi = out[y0:y1, x0:x1]
    if mask is None:
        roi[...] = patch
    else:
        # OpenCV's masked copy writes in place into the view (10x faster than indexing).
        cv2.copyTo(np.ascontiguousarray(patch), mask.view(np.uint8), roi)


class _BoxMethod:
    """A method that transforms each face box on its own."""

    name = ""
    needs_landmarks = False
    batch = False
    keeps_face = False
    shape = "ellipse"

    def transform(self, roi: np.ndarray, box: Box) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def apply(self, image: np.ndarray, faces: Sequence[Box]) -> np.ndarray:
        """A new image with every face in ``faces`` covered (``image`` is not changed)."""
        out = image.copy()
        h, w = image.shape[:2]
        for box in faces:
            x0, y0, x1, y1 = box.pixels(w, h)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            # Read from the output so overlapping faces are both covered.
            paste(out, box, self.transform(out[y0:y1, x0:x1].copy(), box), self.shape)
        return out


@dataclass
class Blur(_BoxMethod):
    """Gaussian blur with ``sigma = strength * max(face width, height)``.

    Parameters
    ----------
    strength : float
        Blur sigma as a fraction of the face size (0.1: a 200 px face gets sigma 20 px).
    shape : str
        ``"ellipse"`` or ``"box"``.
    """

    strength: float = 0.1
    shape: str = "ellipse"
    name = "blur"

    def transform(self, roi: np.ndarray, box: Box) -> np.ndarray:
        sigma = self.strength * max(roi.shape[0], roi.shape[1])
        if sigma <= 0:
            return roi
        # A large sigma on a large face: blur a shrunk copy (same look, a fraction of the cost).
        f = min(1.0, 6.0 / sigma)
        if f < 1.0:
            small = cv2.resize(roi, (max(1, round(roi.shape[1] * f)), max(1, round(roi.shape[0] * f))),
                               interpolation=cv2.INTER_AREA)
            small = cv2.GaussianBlur(small, (0, 0), sigma * f, borderType=cv2.BORDER_REPLICATE)
            return cv2.resize(small, (roi.shape[1], roi.shape[0]), interpolation=cv2.INTER_LINEAR)
        return cv2.GaussianBlur(roi, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


@dataclass
class Mosaic(_BoxMethod):
    """Pixelation: the face becomes ``blocks`` squares across its width.

    Parameters
    ----------
    blocks : int
        Blocks across the face (fewer: coarser).
    shape : str
        ``"ellipse"`` or ``"box"``.
    """

    blocks: int = 8
    shape: str = "ellipse"
    name = "mosaic"

    def transform(self, roi: np.ndarray, box: Box) -> np.ndarray:
        h, w = roi.shape[:2]
        bw = max(1, min(w, int(self.blocks)))
        bh = max(1, min(h, round(bw * h / w)))
        small = cv2.resize(roi, (bw, bh), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


@dataclass
class Mask(_BoxMethod):
    """A solid colour, or an image stretched over the face (deface's ``--replacewith``).

    Parameters
    ----------
    color : tuple of int
        RGB fill colour.
    image : numpy.ndarray or None
        RGB image to paste instead of the colour.
    shape : str
        ``"ellipse"`` or ``"box"``.
    """

    color: tuple[int, int, int] = (0, 0, 0)
    image: np.ndarray | None = None
    shape: str = "ellipse"
    name = "mask"

    def transform(self, roi: np.ndarray, box: Box) -> np.ndarray:
        if self.image is not None:
            return cv2.resize(self.image, (roi.shape[1], roi.shape[0]), interpolation=cv2.INTER_AREA)
        out = np.empty_like(roi)
        out[...] = np.asarray(self.color, dtype=np.uint8)
        return out


def parse_color(text: str) -> tuple[int, int, int]:
    """``"0,0,0"``, ``"#1f2a3b"`` or a name (black, white, grey/gray) -> RGB."""
    named = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128),
             "gray": (128, 128, 128)}
    t = str(text).strip().lower()
    if t in named:
        return named[t]
    try:
        if t.startswith("#") and len(t) == 7:
            return tuple(int(t[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        parts = tuple(int(v) for v in t.split(","))
        if len(parts) == 3 and all(0 <= v <= 255 for v in parts):
            return parts  # type: ignore[return-value]
    except ValueError:
        pass
    raise ValueError(f"colour {text!r}: use R,G,B (0-255 each), #rrggbb, black, white or grey")
