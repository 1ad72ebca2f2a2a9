"""Synthetic test videos with known face positions, for tests and the video benchmark.

:func:`make_test_video` pastes face crops from still photos onto a textured background
and moves them across the picture (one enters from outside the frame), encodes the result
as H.264 (.mp4, .mov or .mkv) with an optional AAC sine-tone track and rotation metadata,
and returns where each face is on every frame. Everything is drawn from ``seed``, so the
same arguments give the same frames and boxes.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from fedface.anonymize.boxes import Box

__all__ = ["make_test_video", "synthetic_face"]

_CONTAINERS = {".mp4", ".mov", ".mkv", ".m4v"}


def synthetic_face(size: int = 96, seed: int = 0) -> np.ndarray:
    """A face-like RGB still (skin-toned oval, eyes, mouth on a random backdrop).

    Good enough for tests with a fake detector; real detectors want real faces (LFW).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(40, 200, 3)
    oval = ((xx - 0.5) / 0.33) ** 2 + ((yy - 0.5) / 0.42) ** 2 <= 1
    img[oval] = rng.uniform([170, 120, 90], [235, 190, 160])
    for ex in (0.36, 0.64):
        img[((xx - ex) / 0.07) ** 2 + ((yy - 0.42) / 0.04) ** 2 <= 1] = (30, 30, 40)
    img[((xx - 0.5) / 0.15) ** 2 + ((yy - 0.68) / 0.04) ** 2 <= 1] = (150, 50, 60)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _crop(still: np.ndarray, crop: float) -> np.ndarray:
    if still.ndim == 2:
        still = np.repeat(still[:, :, None], 3, axis=2)
    still = np.asarray(still[:, :, :3], dtype=np.uint8)
    h, w = still.shape[:2]
    side = max(1, int(round(min(h, w) * crop)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    return still[y0:y0 + side, x0:x0 + side]


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(30, 120, 3), rng.uniform(120, 220, 3)
    f = (xx / max(1, width) * 0.6 + yy / max(1, height) * 0.4)[..., None]
    bg = c0 * (1 - f) + c1 * f
    bg += 12 * np.sin(xx / 9.0 + rng.uniform(0, 6))[..., None] * np.cos(yy / 13.0)[..., None]
    bg += rng.normal(0, 6, bg.shape)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _paths(n: int, width: int, height: int, sides: list[int],
           rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Start and end top-left corners per face (linear motion)."""
    out = []
    bands = min(n, 2)
    band_h = height / bands
    for i, s in enumerate(sides):
        if i < 2:
            top = i * band_h
            y = rng.uniform(top, max(top, top + band_h - s))
            if i == 0:  # inside all the time, left to right
                xa = rng.uniform(0, width * 0.15)
                xb = rng.uniform(width * 0.5, max(width * 0.5, width - s))
                out.append((np.array([xa, y]), np.array([xb, y + rng.uniform(-4, 4)])))
            else:  # enters from the right edge, moves left
                xa = width + rng.uniform(0.1, 0.4) * s
                xb = rng.uniform(width * 0.2, width * 0.5)
                out.append((np.array([xa, y]), np.array([xb, y])))
        else:  # crosses the picture, entering and leaving
            y0, y1 = rng.uniform(0, height - s, 2)
            if rng.random() < 0.5:
                out.append((np.array([-s * 1.1, y0]), np.array([width + s * 0.1, y1])))
            else:
                out.append((np.array([width + s * 0.1, y0]), np.array([-s * 1.1, y1])))
    return out


def make_test_video(path: str | Path, stills: list[np.ndarray], size: tuple[int, int] = (640, 360),
                    frames: int = 60, fps: int = 25, audio: bool = True, rotation: int = 0,
                    seed: int = 0, faces: int = 2, crop: float = 0.6,
                    crf: int = 18) -> list[list[Box]]:
    """Write a video of moving faces and return the true face boxes per frame.

    Parameters
    ----------
    path : str or Path
        Output file; .mp4, .mov, .m4v or .mkv (H.264, yuv420p).
    stills : list of numpy.ndarray
        RGB (or grey) face photos; the central ``crop`` square of each is the face patch
        (for LFW's 250x250 deep-funneled images, 0.6 keeps the face and a little context).
        Face ``i`` uses ``stills[i % len(stills)]``.
    size : (int, int)
        Coded ``(width, height)``; with ``rotation`` 90 or 270 the picture as displayed is
        ``height x width``.
    frames, fps : int
        Length and constant frame rate.
    audio : bool
        Add a 440 Hz sine tone (AAC, mono, 44.1 kHz) lasting as long as the video.
    rotation : {0, 90, 180, 270}
        Display rotation written as the stream's display matrix (counter-clockwise, as
        PyAV's ``VideoFrame.rotation`` reads it back); the pixels are stored turned the
        other way, so the video *displays* upright faces.
    seed : int
        Everything random (background, sizes, paths) comes from it.
    faces : int
        Number of faces (at least 2): face 0 moves inside the picture, face 1 enters
        from the right edge, further faces cross the whole picture (entering and leaving).
    crop : float
        Fraction of a still's shorter side taken (centred) as the face patch.
    crf : int
        x264 quality of the file.

    Returns
    -------
    list of list of Box
        Per frame, the visible part of each face patch, in display (upright)
        coordinates, in face order; faces entirely outside the picture are left out.
    """
    path = Path(path)
    if path.suffix.lower() not in _CONTAINERS:
        raise ValueError(f"{path}: make_test_video writes {', '.join(sorted(_CONTAINERS))}")
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270 (got {rotation})")
    if not stills:
        raise ValueError("make_test_video needs at least one still")
    width, height = int(size[0]), int(size[1])
    if width % 2 or height % 2:
        raise ValueError(f"size must be even for yuv420p (got {width}x{height})")
    k = rotation // 90
    dw, dh = (height, width) if k % 2 else (width, height)  # display size
    n = max(2, int(faces))
    rng = np.random.default_rng(seed)
    bg = _background(dw, dh, rng)
    band = dh / min(n, 2)
    sides = [int(rng.uniform(0.7, 0.9) * min(band, dw * 0.45)) for _ in range(n)]
    patches = [_resize(_crop(stills[i % len(stills)], crop), s) for i, s in enumerate(sides)]
    paths = _paths(n, dw, dh, sides, rng)

    truth: list[list[Box]] = []
    sample_rate = 44100
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.thread_count = 1
        if rotation:
            vs.set_display_rotation(rotation)
        if audio:
            aus = out.add_stream("aac", rate=sample_rate)
            aus.layout = "mono"
        sent = 0
        for t in range(frames):
            img = bg.copy()
            boxes = []
            f = t / max(1, frames - 1)
            for patch, (a, b), s in zip(patches, paths, sides):
                x, y = (int(round(v)) for v in a + (b - a) * f)
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, dw), min(y + s, dh)
                if x1 <= x0 or y1 <= y0:
                    continue
                img[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]
                boxes.append(Box(float(x0), float(y0), float(x1), float(y1)))
            truth.append(boxes)
            coded = np.ascontiguousarray(np.rot90(img, -k)) if k else img
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts = t
            out.mux(vs.encode(frame))
            if audio:
                end = (t + 1) * sample_rate // fps
                ts = np.arange(sent, end) / sample_rate
                tone = (0.2 * np.sin(2 * np.pi * 440 * ts)).astype(np.float32)[None]
                af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                af.sample_rate, af.pts = sample_rate, sent
                out.mux(aus.encode(af))
                sent = end
        out.mux(vs.encode(None))
        if audio:
            out.mux(aus.encode(None))
    return truth
