"""Video anonymization: decode, find faces, cover them, re-encode, keep everything else.

:func:`anonymize_video` streams a video through PyAV (FFmpeg): every frame is decoded,
converted to RGB, handed to ``apply`` together with the face boxes that cover it, and
re-encoded; the audio stream(s) are copied packet for packet (not re-encoded), and the
output keeps the input's frame count, timestamps (so frame rate and duration), resolution,
colour description and rotation metadata. Only the first video stream and the audio
streams are written (subtitle, data and further video streams are dropped). The output is
written to a temporary file next to ``dst`` and renamed over it only when complete; the
input is only ever read.

Pixel path
----------
Decoding runs with FFmpeg's frame/slice threading; YUV -> RGB conversion reuses one
swscale context (a fresh ``VideoFrame.to_ndarray`` per frame spends most of its time
building one). After ``apply``, only the rectangles whose pixels changed are converted
back to YUV (in the input's colorspace and range) and pasted into a copy of the decoded
planes, when the decoded format is the encoder's (yuv420p, the common case): untouched
pixels reach the encoder exactly as decoded, and the RGB -> YUV work shrinks to the faces.
The changed rectangles come from diffing ``apply``'s output against a copy of its input,
so a method that writes outside its boxes is still encoded correctly.

Tracking design
---------------
Running a face detector on every frame is the slow part, so the detector runs only every
``detect_every`` frames (plus always on the first and the last frame) and the frames in
between get boxes from a small tracker. The aim is coverage, not identity: no frame on
which a face is visible may be left without a box, so every rule errs on the side of
covering more. With ``g = detect_every`` and ``c = carry``:

* **Boxes as four edges.** A box is tracked as its edges ``(x0, y0, x1, y1)``, each with
  its own velocity: a face entering at the right border has a left edge moving at the
  face's speed and a right edge pinned to the border, which a centre-and-size model gets
  wrong. A face's size is its longer side (a border clips only one).
* **Lookahead.** Decoded frames wait in a buffer (``c + 1`` to ``c + g`` frames) until
  every detection that could still change their boxes has run, so a frame's boxes use the
  detections *after* it as well as before it.
* **Matching.** At each detection frame the detections are matched one to one to the
  live tracks by an optimal assignment (Hungarian algorithm) on the mean edge distance,
  in face sizes, between the detection and the track's predicted box (last box moved
  along its velocity), leaving out edges pinned to the same frame border in both; pairs
  further apart than half a face, or whose sizes differ by 2.5x or more, do not match.
  A track stays live ``c + g`` frames after its last detection, so a face the detector
  misses on a detection frame is re-linked later.
* **Interpolation.** Between two detections of the same track the box is interpolated
  linearly and padded by ``margin`` face sizes (more when the detections are further
  apart than ``g``): a face detected at ``t-1`` and ``t+1`` is covered at ``t``.
* **Carry.** A track is carried forward after its last detection and back before its
  first one for ``c + g - 1`` frames (the detection gap plus ``c``), so a face entering
  the picture between two detection frames is covered from its first visible frame even
  when the next detection misses it. The carried box is the hull of the end box and that
  box moved along the end velocity, padded by ``margin * (1 + distance / g)`` face sizes.
  A face seen on a single detection frame has no velocity: it is carried in place.
* **Smoothing.** A track's detections are smoothed with an exponential moving average of
  the edges (weight ``smooth`` on the past, the past moved along the velocity); the box
  used is the hull of the smoothed and the raw detection, so smoothing steadies shrinking
  boxes but never uncovers any part of a detected face.

Coverage is guaranteed for a face that moves at constant velocity and is detected on at
least one detection frame in every ``c + g`` frames (two, to know its speed before it is
missed); :func:`uncovered_frames` measures it against an every-frame reference.

A frame that still has no box is handled by ``on_miss``: ``"frame"`` (default) covers the
whole frame (fail closed), ``"pass"`` leaves it as it is, ``"refuse"`` stops with a
:class:`~fedface.errors.UserError` naming the frame.

Rotation
--------
Phone videos store landscape pixels plus a display matrix (rotation side data) that tells
the player to turn them. PyAV 18 exposes it per decoded frame (``VideoFrame.rotation``, the
counter-clockwise angle, and the raw ``DISPLAYMATRIX`` side data) and can write it
(``VideoStream.set_display_matrix``); the stream-level legacy ``rotate`` tag is read as a
fallback (it counts clockwise: ``rotate=90`` is a rotation of 270 here). The matrix is
copied to the output unchanged (``rotation`` is ``probe_video``'s and the report's
counter-clockwise angle, 0-359; the displayed picture is ``np.rot90(coded, rotation //
90)``). With ``VideoConfig.upright``
(default) frames whose rotation is a multiple of 90 degrees are turned upright before
``detect`` and ``apply`` see them and turned back before encoding, so detectors see faces
the right way up; boxes (and the report's ``boxes``) are then in upright (display)
coordinates. Flips in the matrix are kept in the file but not undone for the detector.
"""

from __future__ import annotations

import os
import tempfile
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from fedface.anonymize.boxes import Box
from fedface.errors import UserError
from fedface.progress import ProgressFn

__all__ = [
    "VideoConfig",
    "anonymize_video",
    "probe_video",
    "read_frames",
    "uncovered_frames",
    "ON_MISS",
]

DetectFn = Callable[[np.ndarray], list[Box]]
ApplyFn = Callable[[np.ndarray, list[Box]], np.ndarray]

ON_MISS = ("frame", "pass", "refuse")

# Containers for which H.264 (libx264, yuv420p) is the default output codec.
_H264_FORMATS = {"mp4", "mov", "matroska", "ipod", "3gp", "3g2", "psp"}
# Decoder name -> preferred encoder, for keeping the input codec in other containers.
_ENCODER_FOR = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "vp8": "libvpx",
                "av1": "libsvtav1", "mpeg4": "mpeg4", "mjpeg": "mjpeg", "ffv1": "ffv1"}
# Containers that store per-frame timestamps in any time base (the input's is kept).
_TIMESTAMP_FORMATS = {"mp4", "mov", "matroska", "webm", "ipod", "3gp", "3g2", "psp", "nut", "mpegts"}
_CRF_CODECS = {"libx264", "libx265", "libvpx-vp9", "libvpx", "libsvtav1", "libaom-av1"}


@dataclass
class VideoConfig:
    """How :func:`anonymize_video` tracks faces and encodes the output.

    Parameters
    ----------
    detect_every : int
        Run the detector on every N-th frame (and on the last); frames in between get
        interpolated / carried boxes. 1 = every frame (slowest, no tracking needed);
        the default 3 cuts detector time by two thirds and, with the lookahead tracker,
        still covers every frame on which a face was detected before and after.
    carry : int
        Frames, beyond the detection gap, that a box is carried forward after a face's
        last detection and backward before its first one; also how long a track survives
        missed detections (``carry + detect_every`` frames). Costs up to ``carry +
        detect_every`` decoded frames of buffering (memory, latency).
    margin : float
        Padding of interpolated and carried boxes, in face sizes (0.15: 7.5% of the face
        on each side, growing with the distance from a detection); detected boxes are
        used as they are.
    smooth : float
        Weight of the past in the exponential smoothing of a track's boxes, in [0, 1);
        0 turns smoothing off. Smoothing only ever grows a box (hull with the detection).
    audio : bool
        Copy the audio stream(s) unchanged (packet for packet); False drops audio.
    crf : int
        Constant rate factor for libx264/libx265/vpx/av1 (lower = better, 18 is visually
        lossless for x264, 23 is x264's default).
    preset : str
        x264/x265 speed preset (``"veryfast"`` trades a little size for speed).
    codec : str or None
        Output video encoder. None: libx264 (yuv420p; yuv444p for odd sizes) for .mp4,
        .mov, .mkv; otherwise the input's codec when it can be encoded and the container
        takes it, else the container's default.
    threads : int
        Encoder and decoder threads; 0 = FFmpeg's automatic choice (all cores).
    upright : bool
        Turn frames with 90/180/270 degree rotation metadata upright for ``detect`` and
        ``apply`` (boxes are then in display coordinates); the file keeps its matrix.
    detect_workers : int
        Detections run in this many threads, overlapping each other and the decoding,
        anonymizing and encoding of other frames (dlib releases the GIL while it detects);
        0 = one per core. ``detect`` must then be safe to call from several threads
        (:class:`~fedface.anonymize.pipeline.Anonymizer` keeps one detector per thread).
        Results are consumed in frame order, so the output does not depend on it.
    """

    detect_every: int = 3
    carry: int = 8
    margin: float = 0.15
    smooth: float = 0.5
    audio: bool = True
    crf: int = 20
    preset: str = "veryfast"
    codec: str | None = None
    threads: int = 0
    upright: bool = True
    detect_workers: int = 0

    def __post_init__(self) -> None:
        if int(self.detect_every) < 1:
            raise UserError(f"detect_every must be >= 1 (got {self.detect_every}): use 1 to "
                            "detect on every frame")
        if int(self.carry) < 0:
            raise UserError(f"carry must be >= 0 frames (got {self.carry})")
        if not 0 <= float(self.margin) <= 2:
            raise UserError(f"margin must be in [0, 2] (got {self.margin})")
        if not 0 <= float(self.smooth) < 1:
            raise UserError(f"smooth must be in [0, 1) (got {self.smooth}): 0 turns it off")
        if not 0 <= int(self.crf) <= 63:
            raise UserError(f"crf must be in [0, 63] (got {self.crf})")
        if int(self.threads) < 0:
            raise UserError(f"threads must be >= 0 (got {self.threads}): 0 = automatic")


# --------------------------------------------------------------------------- tracking


def _edges(b: Box) -> np.ndarray:
    return np.array([b.x0, b.y0, b.x1, b.y1], dtype=float)


def _box(e: np.ndarray, score: float = 1.0, landmarks: np.ndarray | None = None) -> Box:
    return Box(float(e[0]), float(e[1]), float(e[2]), float(e[3]), float(score), landmarks)


def _hull(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([np.minimum(a[:2], b[:2]), np.maximum(a[2:], b[2:])])


def _pad(e: np.ndarray, fraction: float, size: float) -> np.ndarray:
    """``e`` grown by ``fraction * size / 2`` on every side."""
    p = fraction * size / 2
    return np.array([e[0] - p, e[1] - p, e[2] + p, e[3] + p])


def _size(e: np.ndarray) -> float:
    """A face's size: the longer side (a face clipped at a border keeps the other one)."""
    return float(max(e[2] - e[0], e[3] - e[1]))


class _Track:
    """One face over time: its detection frames, raw and smoothed boxes (as edge vectors).

    Boxes are handled as four edges ``(x0, y0, x1, y1)`` that each move on their own: a
    face entering at the right border has a left edge moving at the face's speed and a
    right edge pinned to the border, which centre-and-size models get wrong.
    """

    __slots__ = ("times", "raw", "boxes", "scores", "marks", "_ema")

    def __init__(self, t: int, box: Box):
        e = _edges(box)
        self.times = [t]
        self.raw = [e]
        self.boxes = [e]
        self.scores = [float(box.score)]
        self.marks = [box.landmarks]
        self._ema = e

    def velocity(self, end: int) -> np.ndarray:
        """Per-edge velocity (pixels per frame) from the two raw detections at one end."""
        if len(self.times) < 2:
            return np.zeros(4)
        i, j = (0, 1) if end == 0 else (-2, -1)
        return (self.raw[j] - self.raw[i]) / (self.times[j] - self.times[i])

    def predict(self, t: int) -> np.ndarray:
        return self.raw[-1] + self.velocity(-1) * (t - self.times[-1])

    def add(self, t: int, box: Box, smooth: float) -> None:
        e = _edges(box)
        past = self._ema + self.velocity(-1) * (t - self.times[-1])
        self._ema = smooth * past + (1 - smooth) * e
        self.times.append(t)
        self.raw.append(e)
        self.boxes.append(_hull(e, self._ema) if smooth > 0 else e)
        self.scores.append(float(box.score))
        self.marks.append(box.landmarks)

    def landmarks(self, t: int, i: int, j: int | None = None) -> np.ndarray | None:
        """Landmarks at ``t``: observation ``i``'s, interpolated towards ``j``'s, or moved
        along the centre velocity when ``t`` is outside the track."""
        a = self.marks[i]
        if a is None:
            return None
        if j is not None:
            b = self.marks[j]
            if b is None or b.shape != a.shape:
                return None
            f = (t - self.times[i]) / (self.times[j] - self.times[i])
            return a + (b - a) * f
        v = self.velocity(i)
        return a + np.array([(v[0] + v[2]) / 2, (v[1] + v[3]) / 2]) * (t - self.times[i])

    def trim(self, t: int) -> None:
        """Forget observations no frame >= ``t`` can need (keep two for the velocity)."""
        while len(self.times) > 2 and self.times[1] <= t:
            del self.times[0], self.raw[0], self.boxes[0], self.scores[0], self.marks[0]


def _assign(cost: np.ndarray, unmatched: float) -> list[tuple[int, int]]:
    """Minimum-cost matching of rows to columns where leaving one out costs ``unmatched``.

    ``cost`` is ``(rows, cols)`` with ``inf`` for pairs that may not match. Solved exactly
    with the Hungarian algorithm on the matrix padded with "unmatched" rows and columns
    (a pair is kept only when its cost is below ``2 * unmatched``).
    """
    nr, nc = cost.shape
    if nr == 0 or nc == 0:
        return []
    n = nr + nc
    big = 1e9
    c = np.full((n, n), big)
    c[:nr, :nc] = np.where(np.isfinite(cost), cost, big)
    c[:nr, nc:][np.eye(nr, dtype=bool)] = unmatched
    c[nr:, :nc][np.eye(nc, dtype=bool)] = unmatched
    c[nr:, nc:] = 0.0
    # Hungarian algorithm with potentials (rows 1..n, columns 1..n; 0 is a sentinel).
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    way = np.zeros(n + 1, dtype=int)
    match = np.zeros(n + 1, dtype=int)  # match[col] = row
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            cur = c[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    pairs = []
    for j in range(1, nc + 1):
        i = match[j]
        if 1 <= i <= nr and c[i - 1, j - 1] < big:
            pairs.append((i - 1, j - 1))
    return pairs


class _Tracker:
    """Links detections over time and answers "which boxes cover frame t"."""

    def __init__(self, cfg: VideoConfig):
        self.every = int(cfg.detect_every)
        self.carry = int(cfg.carry)
        self.margin = float(cfg.margin)
        self.smooth = float(cfg.smooth)
        self.link = self.carry + self.every  # a track survives this many frames undetected
        self.reach = self.carry + self.every - 1  # forward / backward carry: gap + carry
        self.tracks: list[_Track] = []
        self.made = 0

    def latency(self) -> int:
        """Frame ``t`` is final once a detection ran at ``t + latency`` or later."""
        return self.carry + 1

    @staticmethod
    def _distance(last: np.ndarray, pred: np.ndarray, det: np.ndarray, width: int,
                  height: int) -> float | None:
        """Mean edge distance in face sizes, over the edges not on the frame border.

        None when the two cannot be the same face (sizes differ more than 2.5x).
        """
        sp = max(last[2] - last[0], last[3] - last[1])
        sd = max(det[2] - det[0], det[3] - det[1])
        if min(sp, sd) <= 0 or max(sp, sd) / min(sp, sd) >= 2.5:
            return None
        # An edge pinned to the same frame border in both boxes says nothing about motion.
        lo = np.array([0.5, 0.5, width - 0.5, height - 0.5])
        border = np.array([last[0] <= lo[0] and det[0] <= lo[0], last[1] <= lo[1] and det[1] <= lo[1],
                           last[2] >= lo[2] and det[2] >= lo[2], last[3] >= lo[3] and det[3] >= lo[3]])
        diff = np.abs(pred - det)
        if border.all():
            return float(np.abs((pred[:2] + pred[2:]) / 2 - (det[:2] + det[2:]) / 2).max()) / max(sp, sd)
        return float(diff[~border].mean()) / max(sp, sd)

    def observe(self, t: int, dets: Sequence[Box], width: int, height: int) -> None:
        live = [tr for tr in self.tracks if tr.times[-1] < t and t - tr.times[-1] <= self.link]
        edges = [_edges(d) for d in dets]
        cost = np.full((len(live), len(dets)), np.inf)
        for i, tr in enumerate(live):
            pred = tr.predict(t)
            for j, e in enumerate(edges):
                dist = self._distance(tr.raw[-1], pred, e, width, height)
                if dist is not None and dist <= 0.5:
                    cost[i, j] = dist
        used_d = set()
        for i, j in _assign(cost, unmatched=0.25):
            used_d.add(j)
            live[i].add(t, dets[j], self.smooth)
        for j, d in enumerate(dets):
            if j not in used_d and d.area > 0:
                self.tracks.append(_Track(t, d))
                self.made += 1

    def prune(self, next_frame: int, last_detect: int) -> None:
        """Drop tracks that can neither be linked again nor cover ``next_frame`` onwards."""
        keep = []
        for tr in self.tracks:
            dead = last_detect + self.every - tr.times[-1] > self.link
            if dead and tr.times[-1] + self.reach < next_frame:
                continue
            tr.trim(next_frame)
            keep.append(tr)
        self.tracks = keep

    def _carried(self, tr: _Track, end: int, d: int) -> np.ndarray:
        anchor = tr.boxes[end]
        moved = anchor + tr.velocity(end) * d
        return _pad(_hull(anchor, moved), self.margin * (1 + abs(d) / self.every), _size(anchor))

    def boxes_at(self, t: int) -> list[Box]:
        out = []
        for tr in self.tracks:
            ts = tr.times
            if t < ts[0]:
                if ts[0] - t <= self.reach:
                    out.append(_box(self._carried(tr, 0, t - ts[0]), tr.scores[0],
                                    tr.landmarks(t, 0)))
            elif t > ts[-1]:
                if t - ts[-1] <= self.reach:
                    out.append(_box(self._carried(tr, -1, t - ts[-1]), tr.scores[-1],
                                    tr.landmarks(t, len(ts) - 1)))
            else:
                i = bisect_right(ts, t) - 1
                if ts[i] == t:
                    out.append(_box(tr.boxes[i], tr.scores[i], tr.marks[i]))
                else:
                    a, b = ts[i], ts[i + 1]
                    f = (t - a) / (b - a)
                    e = tr.boxes[i] + (tr.boxes[i + 1] - tr.boxes[i]) * f
                    grow = self.margin * max(1.0, (b - a) / self.every)
                    out.append(_box(_pad(e, grow, _size(e)), min(tr.scores[i], tr.scores[i + 1]),
                                    tr.landmarks(t, i, i + 1)))
        return out


# --------------------------------------------------------------------------- coverage check


def _as_box(b) -> Box:
    if isinstance(b, Box):
        return b
    x0, y0, x1, y1 = (float(v) for v in list(b)[:4])
    return Box(x0, y0, x1, y1)


def _covered_fraction(face: Box, cover: list[Box]) -> float:
    """Exact fraction of ``face``'s area inside the union of ``cover`` (coordinate grid)."""
    if face.area <= 0:
        return 1.0
    cs = [c for c in cover if c.x1 > face.x0 and c.x0 < face.x1 and c.y1 > face.y0 and c.y0 < face.y1]
    if not cs:
        return 0.0
    xs = sorted({face.x0, face.x1, *(min(max(v, face.x0), face.x1) for c in cs for v in (c.x0, c.x1))})
    ys = sorted({face.y0, face.y1, *(min(max(v, face.y0), face.y1) for c in cs for v in (c.y0, c.y1))})
    inside = 0.0
    for xa, xb in zip(xs, xs[1:]):
        mx = (xa + xb) / 2
        for ya, yb in zip(ys, ys[1:]):
            my = (ya + yb) / 2
            if any(c.x0 <= mx < c.x1 and c.y0 <= my < c.y1 for c in cs):
                inside += (xb - xa) * (yb - ya)
    return inside / face.area


def uncovered_frames(frames_boxes_detected: list[list[Box]], covered: list[list[Box]],
                     min_cover: float = 0.9) -> list[int]:
    """Frames on which some reference face is not covered by the output's boxes.

    Parameters
    ----------
    frames_boxes_detected : list of list of Box
        Per frame, the faces found in the *input* by a reference run (a detector on
        every frame, or ground truth), in the same coordinates as ``covered``.
    covered : list of list of Box or [x0, y0, x1, y1]
        Per frame, the boxes the anonymizer covered (``report["boxes"]`` of
        :func:`anonymize_video` can be passed as it is).
    min_cover : float
        A face counts as covered when at least this fraction of its area lies inside the
        union of that frame's covered boxes.

    Returns
    -------
    list of int
        Sorted indices of frames with at least one face covered less than ``min_cover``.
    """
    if len(frames_boxes_detected) != len(covered):
        raise ValueError(f"reference has {len(frames_boxes_detected)} frames but the cover has "
                         f"{len(covered)}")
    bad = []
    for t, (faces, cov) in enumerate(zip(frames_boxes_detected, covered)):
        cover = [_as_box(c) for c in cov]
        if any(_covered_fraction(_as_box(f), cover) < min_cover for f in faces):
            bad.append(t)
    return bad


# --------------------------------------------------------------------------- input / probing


def _reason(err: BaseException) -> str:
    text = (getattr(err, "strerror", None) or str(err)).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _open_input(src: Path) -> av.container.InputContainer:
    if not src.exists():
        raise UserError(f"{src} does not exist: check the path")
    if src.is_dir():
        raise UserError(f"{src} is a folder, not a video file: give a video file")
    if src.stat().st_size == 0:
        raise UserError(f"{src} is empty (0 bytes): the copy or download failed; get the "
                        "video again")
    try:
        return av.open(str(src), "r")
    except av.FFmpegError as err:
        raise UserError(f"{src} is not a readable video ({_reason(err)}): it may be truncated, "
                        "damaged or not a video; check that it plays, or re-encode it (e.g. "
                        "ffmpeg -i in -c:v libx264 out.mp4)") from None
    except OSError as err:
        raise UserError(f"{src} cannot be read ({_reason(err)}): check the path and its "
                        "permissions") from None


def _video_stream(src: Path, inp) -> av.video.stream.VideoStream:
    if not inp.streams.video:
        kinds = sorted({s.type for s in inp.streams}) or ["no"]
        raise UserError(f"{src} has no video stream (it has {', '.join(kinds)} streams): "
                        "give a video file; an audio-only file has no faces to anonymize")
    v = inp.streams.video[0]
    if v.codec_context is None:
        raise UserError(f"{src}: its video codec has no decoder in this FFmpeg build (PyAV "
                        f"{av.__version__}): re-encode it to H.264 elsewhere (ffmpeg -i in "
                        "-c:v libx264 out.mp4)")
    return v


def _display_matrix(frame: av.VideoFrame) -> list[int] | None:
    for sd in frame.side_data:
        if sd.type.name == "DISPLAYMATRIX":
            return [int(v) for v in np.frombuffer(bytes(sd), dtype=np.int32)[:9]]
    return None


def _rotation(frame: av.VideoFrame, stream) -> tuple[int, list[int] | None]:
    """Counter-clockwise display rotation in degrees, and the raw matrix if any."""
    matrix = _display_matrix(frame)
    if matrix is not None:
        return int(round(frame.rotation)) % 360, matrix
    # Legacy tag (clockwise degrees; Matroska tags come back upper-cased).
    tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), None)
    if tag:
        try:
            return int(round(-float(tag))) % 360, None
        except ValueError:
            pass
    return 0, None


def _quarter_turns(rotation: int) -> int:
    k = round(rotation / 90)
    return k % 4 if abs(rotation - 90 * k) < 1 else 0


def _rate(v) -> Fraction:
    for r in (v.average_rate, v.guessed_rate, v.base_rate):
        if r:
            return Fraction(r)
    return Fraction(25)


def probe_video(path: str | Path) -> dict:
    """Facts about a video file, read without decoding more than one frame.

    Parameters
    ----------
    path : str or Path
        The video.

    Returns
    -------
    dict
        ``frames`` (video packets counted), ``header_frames`` (the count the container
        header claims, 0 when it has none), ``fps`` (average rate), ``width``, ``height``
        (coded), ``duration`` (seconds of the video stream: first to last timestamp plus
        one frame), ``rotation`` (counter-clockwise degrees of the display matrix, 0 if
        none), ``video_codec``, ``pix_fmt``, ``has_audio``, ``audio_codec`` (None without
        audio), ``audio_streams``, ``audio_packets``, ``time_base``.

    Raises
    ------
    UserError
        When the file is missing, not a video, or has no video stream.
    """
    src = Path(path)
    with _open_input(src) as inp:
        v = _video_stream(src, inp)
        audio = list(inp.streams.audio)
        rate = _rate(v)
        tb = v.time_base
        first = last = None
        last_dur = 0
        frames = 0
        apackets = 0
        try:
            for pkt in inp.demux(v, *audio):
                if pkt.size == 0:
                    continue
                if pkt.stream.type == "audio":
                    apackets += 1
                    continue
                frames += 1
                if pkt.pts is not None:
                    first = pkt.pts if first is None else min(first, pkt.pts)
                    if last is None or pkt.pts >= last:
                        last, last_dur = pkt.pts, pkt.duration or 0
            inp.seek(0)
            rotation = 0
            for frame in inp.decode(v):
                rotation, _ = _rotation(frame, v)
                break
        except av.FFmpegError as err:
            raise UserError(f"{src} is damaged or truncated ({_reason(err)}): re-encode or "
                            "re-download it") from None
        if first is not None and tb:
            step = last_dur or (1 / rate / tb if rate else 0)
            duration = float((last - first + step) * tb)
        elif v.duration and tb:
            duration = float(v.duration * tb)
        else:
            duration = float(inp.duration or 0) / av.time_base
        return {
            "frames": frames, "header_frames": int(v.frames or 0), "fps": float(rate),
            "width": v.codec_context.width, "height": v.codec_context.height,
            "duration": duration, "rotation": rotation,
            "video_codec": v.codec_context.name, "pix_fmt": v.codec_context.pix_fmt,
            "has_audio": bool(audio), "audio_codec": audio[0].codec_context.name if audio else None,
            "audio_streams": len(audio), "audio_packets": apackets,
            "time_base": str(tb),
        }


def read_frames(path: str | Path, upright: bool = True) -> Iterator[np.ndarray]:
    """Decode a video to RGB uint8 frames (HxWx3), as :func:`anonymize_video` sees them.

    Parameters
    ----------
    path : str or Path
        The video.
    upright : bool
        Turn frames with 90/180/270 degree rotation metadata upright (as
        ``VideoConfig.upright`` does), so boxes match the report's coordinates.

    Yields
    ------
    numpy.ndarray
        One RGB frame per decoded video frame, in order.
    """
    src = Path(path)
    with _open_input(src) as inp:
        v = _video_stream(src, inp)
        v.thread_type = "AUTO"
        k = None
        to_rgb = VideoReformatter()  # one swscale context for the whole video
        try:
            for frame in inp.decode(v):
                if k is None:
                    k = _quarter_turns(_rotation(frame, v)[0]) if upright else 0
                rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                yield np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb
        except av.FFmpegError as err:
            raise UserError(f"{src} is damaged or truncated ({_reason(err)}): re-encode or "
                            "re-download it") from None


# --------------------------------------------------------------------------- output


def _pick_codec(out, v, cfg: VideoConfig, dst: Path) -> list[str]:
    if cfg.codec:
        try:
            av.codec.Codec(cfg.codec, "w")
        except Exception:  # noqa: BLE001 - any lookup failure means "not available"
            raise UserError(f"cannot write {dst}: the video encoder {cfg.codec!r} is not available "
                            "in this FFmpeg build; choose another codec (e.g. libx264) or leave "
                            "codec unset") from None
        return [cfg.codec]
    names = []
    if out.format.name.split(",")[0] in _H264_FORMATS:
        names.append("libx264")
    name = v.codec_context.name
    names += [_ENCODER_FOR.get(name, name), out.default_video_codec]
    ok = []
    for n in names:
        try:
            n = av.codec.Codec(n, "w").name  # a codec name ("vp9") -> its encoder ("libvpx-vp9")
        except Exception:  # noqa: BLE001
            continue
        if n not in ok:
            ok.append(n)
    if not ok:
        raise UserError(f"cannot write {dst}: no video encoder in this FFmpeg build fits the "
                        f"{out.format.name} container; write .mp4 or .mkv instead")
    return ok


def _pix_fmt(codec: str, width: int, height: int) -> str:
    formats = [f.name for f in (av.codec.Codec(codec, "w").video_formats or [])]
    if not formats:
        return "yuv420p"
    odd = width % 2 or height % 2
    prefer = ["yuv444p", "yuv420p"] if odd else ["yuv420p", "yuv444p"]
    for f in prefer:
        if f in formats:
            return f
    return formats[0]


def _color(frame: av.VideoFrame) -> dict:
    """The input's colour description, for converting RGB back the way it was decoded."""
    space = int(frame.colorspace)
    rng = int(frame.color_range)
    # AVColorSpace values 1, 4-7 and 9 equal swscale's SWS_CS_* numbers; others: default.
    sws = space if space in (1, 4, 5, 6, 7, 9) else None
    return {"space": space, "range": rng or None, "sws": sws}


@dataclass
class _Output:
    container: object
    video: object
    audio: dict  # input stream index -> output stream
    codec: str


def _open_output(tmp: Path, dst: Path, v, audio, first: av.VideoFrame, cfg: VideoConfig,
                 matrix, rotation: int) -> _Output:
    try:
        out = av.open(str(tmp), "w")
    except ValueError:
        raise UserError(f"cannot write {dst}: FFmpeg does not know the container for the "
                        f"extension {dst.suffix!r}; use .mp4, .mkv or .mov") from None
    except OSError as err:
        raise UserError(f"cannot write {dst} ({_reason(err)}): check the folder exists and is "
                        "writable") from None
    try:
        rate = _rate(v)
        width, height = first.width, first.height
        stream = None
        errors = []
        for codec in _pick_codec(out, v, cfg, dst):
            opts = {}
            if codec in _CRF_CODECS:
                opts["crf"] = str(int(cfg.crf))
                if codec in ("libx264", "libx265"):
                    opts["preset"] = cfg.preset
                if codec in ("libvpx-vp9", "libvpx"):
                    opts["b"] = "0"
            try:
                stream = out.add_stream(codec, rate=rate, options=opts)
            except (ValueError, av.FFmpegError) as err:
                errors.append(f"{codec}: {_reason(err)}")
                continue
            break
        if stream is None:
            raise UserError(f"cannot write {dst}: the {out.format.name} container takes none of "
                            f"the encoders tried ({'; '.join(errors)}); write .mp4 or .mkv, or "
                            "choose another codec")
        stream.width, stream.height = width, height
        stream.pix_fmt = _pix_fmt(stream.codec_context.name, width, height)
        if out.format.name.split(",")[0] in _TIMESTAMP_FORMATS and v.time_base:
            # Keep the input's clock: every frame keeps its exact timestamp (VFR too).
            stream.codec_context.time_base = v.time_base
            stream.time_base = v.time_base
        else:  # containers without per-frame timestamps (AVI ...): one tick per frame
            stream.codec_context.time_base = 1 / rate
        stream.thread_count = int(cfg.threads)
        cc = stream.codec_context  # tag the output with the input's colour description
        cc.colorspace, cc.color_range = first.colorspace, first.color_range
        cc.color_primaries, cc.color_trc = first.color_primaries, first.color_trc
        if codec not in _CRF_CODECS and v.codec_context.bit_rate:
            stream.bit_rate = v.codec_context.bit_rate
        if matrix is not None:
            stream.set_display_matrix(matrix)
        elif rotation:
            stream.set_display_rotation(rotation)
        for key in ("language", "title"):
            if key in v.metadata:
                stream.metadata[key] = v.metadata[key]
        amap = {}
        for a in audio:
            try:
                amap[a.index] = out.add_stream_from_template(a)
            except (ValueError, av.FFmpegError) as err:
                raise UserError(f"cannot copy the {a.codec_context.name} audio of the input into "
                                f"{dst} ({_reason(err)}): write .mkv (takes any audio) or drop "
                                "the audio (audio=False)") from None
        return _Output(out, stream, amap, codec)
    except BaseException:
        out.close()
        raise


# --------------------------------------------------------------------------- frames out

# Decoded formats whose pixels are patched in place (only changed regions go through RGB).
_PATCHABLE = {"yuv420p", "yuvj420p"}


def _changed_rects(before: np.ndarray, after: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Rectangles ``(x0, y0, x1, y1)`` that together contain every changed pixel.

    Rows with a change are grouped into runs; within a run, columns with a change are.
    """
    h, w = before.shape[:2]
    # Reduce over long rows of bytes: numpy's reduction over a length-3 axis is slow.
    diff = before.reshape(h, w * 3) != after.reshape(h, w * 3)
    rows = np.flatnonzero(diff.any(axis=1))
    if rows.size == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) > 1)
    rects = []
    for r0, r1 in zip(np.r_[rows[0], rows[cut + 1]], np.r_[rows[cut], rows[-1]] + 1):
        cols = np.flatnonzero(diff[r0:r1].any(axis=0).reshape(w, 3).any(axis=1))
        ccut = np.flatnonzero(np.diff(cols) > 1)
        for c0, c1 in zip(np.r_[cols[0], cols[ccut + 1]], np.r_[cols[ccut], cols[-1]] + 1):
            rects.append((int(c0), int(r0), int(c1), int(r1)))
    return rects


def _planes420(buf: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y, U, V planes in PyAV's packed ``(h * 3 / 2, w)`` yuv420p array."""
    flat = buf.reshape(-1)
    n, q = h * w, (h // 2) * (w // 2)
    return (flat[:n].reshape(h, w), flat[n:n + q].reshape(h // 2, w // 2),
            flat[n + q:n + 2 * q].reshape(h // 2, w // 2))


class _Converter:
    """Pixel format conversions with reused swscale contexts.

    A fresh ``VideoFrame.reformat`` builds a new swscale context per frame, which costs
    more than the conversion itself (about 0.9 ms of setup against 0.1 ms of YUV -> RGB
    work for 640x360); one reformatter per size keeps its context.
    """

    def __init__(self, fmt: str, color: dict):
        self.fmt = fmt
        self.color = color
        self._to_rgb = VideoReformatter()
        self._from_rgb: dict[tuple[int, int], VideoReformatter] = {}
        self.conv = {"format": fmt, "dst_colorspace": color["sws"], "dst_color_range": color["range"]}

    def rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return self._to_rgb.reformat(frame, format="rgb24").to_ndarray()

    def _yuv(self, rgb: np.ndarray) -> av.VideoFrame:
        h, w = rgb.shape[:2]
        r = self._from_rgb.pop((w, h), None) or VideoReformatter()
        self._from_rgb[(w, h)] = r  # most recently used last
        if len(self._from_rgb) > 32:
            del self._from_rgb[next(iter(self._from_rgb))]
        return r.reformat(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"),
                          **self.conv)

    def frame(self, decoded: av.VideoFrame, before: np.ndarray | None, after: np.ndarray,
              k: int) -> av.VideoFrame:
        """The frame to encode for ``decoded`` whose RGB ``before`` became ``after``.

        When the decoded frame is already in the encoder's format, only the rectangles
        that changed are converted from RGB (in the input's colorspace and range) and
        pasted into a copy of the decoded planes: untouched pixels stay exactly as decoded
        and most of the RGB -> YUV work is skipped. ``before`` None means nothing
        changed; ``k`` undoes the upright rotation.
        """
        fmt = self.fmt
        if k:
            after = np.rot90(after, -k)
            before = None if before is None else np.rot90(before, -k)
        h, w = decoded.height, decoded.width
        rects: list[tuple[int, int, int, int]] = []
        patch = decoded.format.name == fmt and fmt in _PATCHABLE and h % 2 == 0 and w % 2 == 0
        if patch and before is not None:
            rects = _changed_rects(np.ascontiguousarray(before), np.ascontiguousarray(after))
            patch = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects) < 0.5 * h * w
        if not patch:
            out = self._yuv(after)
        else:
            buf = decoded.to_ndarray()
            ys, us, vs = _planes420(buf, h, w)
            for x0, y0, x1, y1 in rects:
                # Even corners (chroma is 2x2) and sizes rounded up to 32 pixels, so that
                # few distinct sizes (swscale contexts) are needed.
                rw = min(w, -(-(x1 - x0 + x0 % 2) // 32) * 32)
                rh = min(h, -(-(y1 - y0 + y0 % 2) // 32) * 32)
                x0, y0 = min(x0 - x0 % 2, w - rw), min(y0 - y0 % 2, h - rh)
                x1, y1 = x0 + rw, y0 + rh
                py, pu, pv = _planes420(self._yuv(after[y0:y1, x0:x1]).to_ndarray(), rh, rw)
                ys[y0:y1, x0:x1] = py
                us[y0 // 2:y1 // 2, x0 // 2:x1 // 2] = pu
                vs[y0 // 2:y1 // 2, x0 // 2:x1 // 2] = pv
            out = av.VideoFrame.from_ndarray(buf, format=fmt)
        out.colorspace, out.color_range = self.color["space"], self.color["range"] or 0
        return out


# --------------------------------------------------------------------------- the pipeline


class _Pending:
    __slots__ = ("index", "frame", "rgb")

    def __init__(self, index: int, frame: av.VideoFrame):
        self.index = index
        self.frame = frame
        self.rgb: np.ndarray | None = None


def _temp_path(dst: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.stem}.", suffix=dst.suffix)
    os.close(fd)
    return Path(name)


def anonymize_video(src: str | Path, dst: str | Path, detect: DetectFn, apply: ApplyFn,
                    cfg: VideoConfig | None = None, on_miss: str = "frame",
                    progress: ProgressFn | None = None) -> dict:
    """Anonymize every face in a video; write the result atomically to ``dst``.

    Parameters
    ----------
    src : str or Path
        The input video (only read).
    dst : str or Path
        The output video; its extension chooses the container (.mp4, .mkv, .mov ...).
        Written to a temporary file in the same folder, then renamed over ``dst``.
    detect : callable
        ``detect(rgb) -> list[Box]``: faces in a full-resolution RGB uint8 frame, in its
        pixel coordinates. Called on every ``cfg.detect_every``-th frame and the last.
    apply : callable
        ``apply(rgb, boxes) -> rgb``: the anonymized frame (a new HxWx3 uint8 array).
    cfg : VideoConfig, optional
        Tracking and encoding settings (defaults: :class:`VideoConfig`).
    on_miss : {"frame", "pass", "refuse"}
        A frame with no box after tracking: cover the whole frame (fail closed), leave
        it unchanged, or stop with a :class:`UserError` (no output is left).
    progress : callable, optional
        ``progress("anonymize video", done, total)`` per written frame (total is the
        container's frame count, 0 when unknown).

    Returns
    -------
    dict
        ``src``, ``dst``, ``frames``, ``width``, ``height`` (coded), ``rotation``, ``fps``
        (input frame rate), ``codec``, ``audio_streams`` (copied), ``detect_every``,
        ``detect_frames`` (indices where the detector ran), ``faces_detected`` (total
        detections), ``detections`` (count per detect frame), ``tracks``, ``boxes`` (per
        frame, covered boxes as [x0, y0, x1, y1] in the coordinates ``detect`` saw),
        ``miss_frames`` and ``on_miss`` (frames with no box, and what was done),
        ``fps_achieved`` and ``seconds`` (``decode``, ``detect``, ``track``, ``apply``,
        ``encode``, ``total``).

    Raises
    ------
    UserError
        Unreadable, empty, truncated or audio-only input; no decoder or encoder; a
        container that cannot hold the codec; ``dst`` equal to ``src``; a missing face
        with ``on_miss="refuse"``.
    """
    cfg = cfg or VideoConfig()
    if on_miss not in ON_MISS:
        raise UserError(f"on_miss must be one of {', '.join(ON_MISS)} (got {on_miss!r})")
    src, dst = Path(src), Path(dst)
    same = src.resolve() == dst.resolve() or (src.exists() and dst.exists() and os.path.samefile(src, dst))
    if same:
        raise UserError(f"{dst} is the input video: write the anonymized video to another file")
    if not dst.parent.is_dir():
        raise UserError(f"cannot write {dst}: the folder {dst.parent} does not exist; create it")

    t_start = time.perf_counter()
    secs = dict.fromkeys(("decode", "detect", "track", "apply", "encode"), 0.0)
    inp = _open_input(src)
    tmp: Path | None = None
    out: _Output | None = None
    pool: ThreadPoolExecutor | None = None
    try:
        v = _video_stream(src, inp)
        v.thread_type = "AUTO"
        v.thread_count = int(cfg.threads)
        audio = list(inp.streams.audio) if cfg.audio else []
        total = int(v.frames or 0)
        rate = _rate(v)  # read now: a stream must not be touched after its container closes
        tmp = _temp_path(dst)

        tracker = _Tracker(cfg)
        every = tracker.every
        pending: deque[_Pending] = deque()
        backlog: list = []  # audio packets seen before the output exists
        boxes_out: list[list[list[float]]] = []
        detect_frames: list[int] = []
        detections: list[int] = []
        misses: list[int] = []
        state = {"k": 0, "w": 0, "h": 0, "last_pts": None, "step": 1, "packets": 0,
                 "scale": Fraction(1)}

        def mux_audio(pkt) -> None:
            t = time.perf_counter()
            pkt.stream = out.audio[pkt.stream.index]
            out.container.mux(pkt)
            secs["encode"] += time.perf_counter() - t

        def frames() -> Iterator[av.VideoFrame]:
            for pkt in inp.demux(v, *audio):
                if pkt.stream.type == "audio":
                    if pkt.size == 0 or pkt.dts is None:
                        continue
                    if out is None:
                        backlog.append(pkt)
                    else:
                        mux_audio(pkt)
                    continue
                if pkt.size:
                    state["packets"] += 1
                yield from pkt.decode()

        def to_rgb(item: _Pending) -> np.ndarray:
            if item.rgb is None:
                t = time.perf_counter()
                rgb = conv.rgb(item.frame)
                if state["k"]:
                    rgb = np.ascontiguousarray(np.rot90(rgb, state["k"]))
                item.rgb = rgb
                secs["decode"] += time.perf_counter() - t
            return item.rgb

        workers = int(cfg.detect_workers) or (os.cpu_count() or 1)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="detect") if workers > 1 else None
        inflight: deque = deque()  # (item, future) in frame order

        def timed_detect(rgb: np.ndarray) -> tuple[list[Box], float]:
            t = time.perf_counter()
            return list(detect(rgb)), time.perf_counter() - t

        def run_detect(item: _Pending) -> None:
            """Start a detection (in the pool when there is one)."""
            rgb = to_rgb(item)
            if pool is None:
                observe(item, timed_detect(rgb))
            else:
                inflight.append((item, pool.submit(timed_detect, rgb)))

        def drain(limit: int) -> None:
            """Feed finished detections to the tracker in frame order, waiting while more
            than ``limit`` are in flight; then write what is ready."""
            while inflight and (len(inflight) > limit or inflight[0][1].done()):
                item, fut = inflight.popleft()
                observe(item, fut.result())
                flush(item.index - latency)

        def observe(item: _Pending, result: tuple[list[Box], float]) -> None:
            found, took = result
            rgb = item.rgb
            secs["detect"] += took
            t = time.perf_counter()
            h, w = rgb.shape[:2]
            found = [b.clip(w, h) for b in found]
            found = [b for b in found if b.area > 0]
            tracker.observe(item.index, found, w, h)
            secs["track"] += time.perf_counter() - t
            detect_frames.append(item.index)
            detections.append(len(found))

        def emit(item: _Pending) -> None:
            rgb = to_rgb(item)
            h, w = rgb.shape[:2]
            t = time.perf_counter()
            boxes = [b.clip(w, h) for b in tracker.boxes_at(item.index)]
            boxes = [b for b in boxes if b.area > 0]
            secs["track"] += time.perf_counter() - t
            if not boxes:
                misses.append(item.index)
                if on_miss == "refuse":
                    raise UserError(f"{src}: no face box on frame {item.index} (on_miss='refuse'); "
                                    "nothing was written. Use on_miss='frame' to cover such frames "
                                    "whole, or 'pass' to leave them unchanged")
                if on_miss == "frame":
                    boxes = [Box(0.0, 0.0, float(w), float(h))]
            boxes_out.append([[round(b.x0, 2), round(b.y0, 2), round(b.x1, 2), round(b.y1, 2)]
                              for b in boxes])
            t = time.perf_counter()
            before = None
            res = rgb
            if boxes:
                # A copy to diff against: ``apply`` might (against its contract) write into
                # ``rgb``, and a missed change would leave a face uncovered.
                before = rgb.copy()
                res = apply(rgb, boxes)
                if not isinstance(res, np.ndarray) or res.shape != rgb.shape or res.dtype != np.uint8:
                    raise TypeError(f"apply must return a {rgb.shape} uint8 array, got "
                                    f"{getattr(res, 'shape', type(res))} "
                                    f"{getattr(res, 'dtype', '')}")
            secs["apply"] += time.perf_counter() - t
            t = time.perf_counter()
            frame = conv.frame(item.frame, before, res, state["k"])
            pts = item.frame.pts
            if pts is not None and state["scale"] != 1:
                pts = int(round(pts * state["scale"]))
            last = state["last_pts"]
            if pts is None:
                pts = 0 if last is None else last + state["step"]
            elif last is not None and pts <= last:
                pts = last + 1
            state["last_pts"] = pts
            frame.pts = pts
            frame.time_base = out.video.codec_context.time_base
            for p in out.video.encode(frame):
                out.container.mux(p)
            secs["encode"] += time.perf_counter() - t
            item.frame = item.rgb = None
            if progress is not None:
                progress("anonymize video", item.index + 1, total)

        def flush(upto: int) -> None:
            while pending and pending[0].index <= upto:
                emit(pending.popleft())
            if pending:
                tracker.prune(pending[0].index, detect_frames[-1])

        it = frames()
        n = 0
        latency = tracker.latency()
        while True:
            t, muxed = time.perf_counter(), secs["encode"]
            try:
                frame = next(it, None)
            except av.FFmpegError as err:
                raise UserError(f"{src} is damaged or truncated: decoding failed after {n} frames "
                                f"({_reason(err)}); re-encode or re-download it") from None
            # Audio packets copied while demuxing were counted as encoding already.
            secs["decode"] += time.perf_counter() - t - (secs["encode"] - muxed)
            if frame is None:
                break
            if out is None:
                rotation, matrix = _rotation(frame, v)
                state["k"] = _quarter_turns(rotation) if cfg.upright else 0
                out = _open_output(tmp, dst, v, audio, frame, cfg, matrix, rotation)
                tb = out.video.codec_context.time_base
                state["step"] = max(1, int(round(1 / (rate * tb))))
                state["scale"] = Fraction(v.time_base) / tb if v.time_base else Fraction(1)
                state["rotation"] = rotation
                state["w"], state["h"] = frame.width, frame.height
                conv = _Converter(out.video.pix_fmt, _color(frame))
                for pkt in backlog:
                    mux_audio(pkt)
                backlog.clear()
            item = _Pending(n, frame)
            pending.append(item)
            if n % every == 0:
                run_detect(item)
                if pool is None:
                    flush(n - latency)
                else:
                    drain(workers)
            n += 1
        if out is None:
            raise UserError(f"{src} has a video stream but no decodable frame: it may be "
                            "truncated or damaged; re-encode or re-download it")
        if total and state["packets"] < total:
            raise UserError(f"{src} is truncated: its header lists {total} video frames but only "
                            f"{state['packets']} could be read; re-download or re-copy it, or "
                            "re-encode the part that plays")
        drain(0)
        if pending and detect_frames[-1] != pending[-1].index:
            run_detect(pending[-1])
            drain(0)
        flush(n)
        if pool is not None:
            pool.shutdown()
        t = time.perf_counter()
        for p in out.video.encode(None):
            out.container.mux(p)
        out.container.close()
        secs["encode"] += time.perf_counter() - t
        inp.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
        tmp = None
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if out is not None:
            try:
                out.container.close()
            except Exception:  # noqa: BLE001 - already failing; the temp file goes anyway
                pass
        inp.close()
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise

    total_s = time.perf_counter() - t_start
    return {
        "src": str(src), "dst": str(dst), "frames": n, "width": state["w"],
        "height": state["h"], "rotation": state.get("rotation", 0),
        "fps": float(rate), "codec": out.codec, "audio_streams": len(out.audio),
        "detect_every": every, "detect_frames": detect_frames,
        "faces_detected": int(sum(detections)), "detections": detections,
        "tracks": tracker.made, "boxes": boxes_out, "miss_frames": misses, "on_miss": on_miss,
        "fps_achieved": n / total_s if total_s > 0 else 0.0,
        "seconds": {**{k: round(s, 4) for k, s in secs.items()}, "total": round(total_s, 4)},
    }
