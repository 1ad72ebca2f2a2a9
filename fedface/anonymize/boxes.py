"""Face boxes: one small value type shared by detection, the methods, video and evaluation.

A :class:`Box` is in pixel coordinates of the image it was found in, ``x0, y0`` inclusive
and ``x1, y1`` exclusive (floats: detection on a downscaled frame maps back exactly), with
the detector's score. Optional ``landmarks`` (``(n, 2)`` float array, 5 or 68 points, same
coordinates) come with it where a method needs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "iou"]


@dataclass(frozen=True, eq=False)
class Box:
    """One face: corners in pixels, detector score, optional landmarks."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0
    landmarks: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def expand(self, scale: float) -> Box:
        """The box scaled by ``scale`` about its centre (``--mask-scale``)."""
        cx, cy = self.center
        hw, hh = self.width * scale / 2, self.height * scale / 2
        return dataclasses.replace(self, x0=cx - hw, y0=cy - hh, x1=cx + hw, y1=cy + hh)

    def scaled(self, sx: float, sy: float) -> Box:
        """The box in an image resized by ``(sx, sy)`` (landmarks too)."""
        lm = None if self.landmarks is None else self.landmarks * np.array([sx, sy])
        return Box(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy, self.score, lm)

    def clip(self, width: int, height: int) -> Box:
        """The part of the box inside a ``width x height`` image."""
        return dataclasses.replace(
            self, x0=min(max(self.x0, 0.0), width), y0=min(max(self.y0, 0.0), height),
            x1=min(max(self.x1, 0.0), width), y1=min(max(self.y1, 0.0), height))

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Integer ``(x0, y0, x1, y1)`` covering every pixel the box touches, clipped."""
        x0 = int(np.floor(max(self.x0, 0)))
        y0 = int(np.floor(max(self.y0, 0)))
        x1 = int(np.ceil(min(self.x1, width)))
        y1 = int(np.ceil(min(self.y1, height)))
        return x0, y0, max(x0, x1), max(y0, y1)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def to_dict(self) -> dict:
        return {"box": [round(v, 2) for v in self.as_tuple()], "score": round(float(self.score), 4)}


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0
