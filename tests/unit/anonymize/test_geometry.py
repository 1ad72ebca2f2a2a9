"""fedface.anonymize.geometry: dlib's chip transform, 68 -> 5 landmarks, the similarity fit."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from fedface.anonymize.geometry import (
    DLIB_TEMPLATE_5,
    FIVE_FROM_68,
    chip_transform,
    five_points,
    similarity,
)
from tests.conftest import SHARED_DATA

LFW_IMAGE = SHARED_DATA / "lfw" / "lfw-deepfunneled" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"
# dlib's 5-point predictor on that image, inside its HOG box (67, 80)-(175, 187).
LFW_LANDMARKS = np.array([[154, 109], [138, 110], [99, 109], [114, 110], [126, 146]])
# A synthetic face in dlib's 5-point order (image-right eye outer/inner, left eye outer/inner,
# nose), tilted by a few degrees.
SYNTH_LANDMARKS = np.array([[170, 108], [147, 107], [92, 99], [116, 103], [128, 148]])


def _dlib_chip(image: np.ndarray, landmarks: np.ndarray, size: int, padding: float) -> np.ndarray:
    dlib = pytest.importorskip("dlib")
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    shape = dlib.full_object_detection(
        dlib.rectangle(int(x0), int(y0), int(x1), int(y1)),
        [dlib.point(int(x), int(y)) for x, y in landmarks])
    return np.asarray(dlib.get_face_chip(image, shape, size, padding), dtype=np.float64)


def _our_chip(image: np.ndarray, landmarks: np.ndarray, size: int, padding: float) -> np.ndarray:
    m = chip_transform(landmarks.astype(np.float64), size, padding)
    return cv2.warpAffine(image, m, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP).astype(np.float64)


# Faces spanning at most about twice the chip: dlib samples bilinearly, without its pyramid.
CASES = [(150, 0.25), (112, 0.25), (120, 0.4)]


@pytest.mark.parametrize("size,padding", CASES)
def test_chip_transform_reproduces_dlib_on_a_synthetic_image(size, padding):
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8), (0, 0), 2.0)
    ref = _dlib_chip(image, SYNTH_LANDMARKS, size, padding)
    ours = _our_chip(image, SYNTH_LANDMARKS, size, padding)
    # dlib truncates where OpenCV rounds: about half a grey level apart on average.
    assert np.abs(ours - ref)[2:-2, 2:-2].mean() < 1.0


@pytest.mark.skipif(not LFW_IMAGE.is_file(),
                    reason=f"LFW not available ({LFW_IMAGE} missing); synthetic case still runs")
@pytest.mark.parametrize("size,padding", CASES)
def test_chip_transform_reproduces_dlib_on_lfw(size, padding):
    from fedface.data.images import load_image

    image = load_image(LFW_IMAGE)
    ref = _dlib_chip(image, LFW_LANDMARKS, size, padding)
    ours = _our_chip(image, LFW_LANDMARKS, size, padding)
    assert np.abs(ours - ref)[2:-2, 2:-2].mean() < 1.0


def test_template_lands_on_the_chip_where_dlib_puts_it():
    # Landmarks that ARE the padded template in chip pixels: unit scale, no rotation, and the
    # half-pixel shift of dlib's chip rectangle (centred on size / 2, ``size - 1`` wide).
    size, padding = 100, 0.25
    lm = (padding + DLIB_TEMPLATE_5) / (1 + 2 * padding) * size
    m = chip_transform(lm, size, padding)
    assert np.allclose(m, [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]], atol=1e-9)


def test_five_points_from_68():
    pts68 = np.random.default_rng(1).uniform(0, 200, (68, 2))
    five = five_points(pts68)
    assert five.shape == (5, 2) and five.dtype == np.float64
    assert np.array_equal(five, pts68[[45, 42, 36, 39, 33]])
    assert FIVE_FROM_68 == (45, 42, 36, 39, 33)
    pts68[list(FIVE_FROM_68)] = SYNTH_LANDMARKS
    assert np.array_equal(chip_transform(pts68, 64), chip_transform(SYNTH_LANDMARKS, 64))
    assert np.array_equal(five_points(SYNTH_LANDMARKS.tolist()), SYNTH_LANDMARKS)
    assert five_points(None) is None
    assert five_points(np.zeros((4, 2))) is None
    assert five_points(np.zeros((68, 3))) is None


def test_similarity_recovers_a_known_transform():
    src = np.random.default_rng(2).normal(size=(7, 2))
    a = math.radians(23.0)
    rot = 1.7 * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    dst = src @ rot.T + [4.0, -3.0]
    assert np.allclose(similarity(src, dst), np.hstack([rot, [[4.0], [-3.0]]]))


@pytest.mark.parametrize(
    "landmarks,match",
    [
        (np.tile([[50.0, 60.0]], (5, 1)), "degenerate"),
        (np.zeros((4, 2)), r"5 \(dlib\) or 68 \(iBUG\).*shape \(4, 2\)"),
        (None, "got none"),
        (np.where(np.eye(5, 2) > 0, np.nan, SYNTH_LANDMARKS), "non-finite"),
    ],
)
def test_bad_landmarks_raise(landmarks, match):
    with pytest.raises(ValueError, match=match):
        chip_transform(landmarks, 64)


def test_bad_size_or_padding_raise():
    with pytest.raises(ValueError, match="chip size"):
        chip_transform(SYNTH_LANDMARKS, 1)
    with pytest.raises(ValueError, match="padding"):
        chip_transform(SYNTH_LANDMARKS, 64, -0.1)
