"""DP pixelization (DP-Pix, Fan 2018): pixelize, then add Laplace noise to every block.

The face box is cut into ``b x b`` blocks; each block's mean (per colour channel) gets
Laplace noise of scale ``255 * m / (b^2 * epsilon)``. Two face regions that differ in at
most ``m`` pixels give block means within ``255 m / b^2`` of each other in L1, so the noisy
output satisfies ``epsilon``-differential privacy for that neighbourhood: whoever sees the
output cannot tell whether any ``m`` pixels of the face were different (Fan 2018, Thm 1).

Scope and limits (stated for the privacy officer):

- The guarantee covers the pixels inside the box. The box's position and size, and every
  pixel outside it, are released as they are.
- ``m`` decides what is protected: ``m = 1`` hides a single pixel; hiding a whole face needs
  ``m`` near the face's area, and then the noise drowns the image. Presets trade this off;
  the benchmark measures what a recognizer still gets.
- The noise comes from the operating system's CSPRNG (a fresh draw per image) unless a
  ``seed`` is given for tests; floating-point Laplace sampling has Mironov's (2012)
  precision weakness, which this implementation does not address.

Adversary: anyone holding the output image, with any side knowledge of the other pixels.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fedface.anonymize.boxes import Box
from fedface.anonymize.classic import paste

__all__ = ["DPPix", "laplace_scale"]


def laplace_scale(b: int, m: int, epsilon: float) -> float:
    """Noise scale ``255 m / (b^2 epsilon)`` of DP-Pix."""
    return 255.0 * m / (b * b * epsilon)


@dataclass
class DPPix:
    """DP-Pix on each face box.

    Parameters
    ----------
    b : int
        Block side in pixels (of the face as it is in the image).
    epsilon : float
        Privacy parameter of each face region's release.
    m : int
        Number of pixels two neighbouring faces may differ in.
    shape : str
        ``"ellipse"`` or ``"box"``: which part of the pixelized box is pasted back.
    seed : int or None
        Fixed noise for tests only; ``None`` draws from the OS CSPRNG.
    """

    b: int = 16
    epsilon: float = 0.5
    m: int = 16
    shape: str = "box"
    seed: int | None = None
    name = "dppix"
    needs_landmarks = False
    batch = False
    keeps_face = True

    def __post_init__(self) -> None:
        problems = []
        if self.b < 1:
            problems.append(f"b={self.b}: use a block of 1 pixel or more")
        if not self.epsilon > 0:
            problems.append(f"epsilon={self.epsilon}: use a positive epsilon")
        if self.m < 1:
            problems.append(f"m={self.m}: use 1 or more pixels")
        if problems:
            raise ValueError("Invalid dppix settings: " + "; ".join(problems))

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed if self.seed is not None else secrets.randbits(128))

    def apply(self, image: np.ndarray, faces: Sequence[Box]) -> np.ndarray:
        """A new image with each face box DP-pixelized (``image`` is not changed)."""
        out = image.copy()
        h, w = image.shape[:2]
        rng = self._rng()
        scale = laplace_scale(self.b, self.m, self.epsilon)
        for box in faces:
            x0, y0, x1, y1 = box.pixels(w, h)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            roi = out[y0:y1, x0:x1].astype(np.float64)
            ny, nx = -(-roi.shape[0] // self.b), -(-roi.shape[1] // self.b)
            # Block means (edge blocks average what they hold), noise, back to pixels.
            pad = np.pad(roi, ((0, ny * self.b - roi.shape[0]), (0, nx * self.b - roi.shape[1]),
                               (0, 0)), mode="edge")
            means = pad.reshape(ny, self.b, nx, self.b, -1).mean(axis=(1, 3))
            noisy = np.clip(means + rng.laplace(0.0, scale, means.shape), 0, 255)
            big = cv2.resize(noisy.astype(np.float32), (nx * self.b, ny * self.b),
                             interpolation=cv2.INTER_NEAREST)
            patch = np.rint(big[:roi.shape[0], :roi.shape[1]]).astype(np.uint8)
            paste(out, box, patch.reshape(roi.shape), self.shape)
        return out
