"""The video pipeline: tracking covers every face, the file keeps what it should, bad input is refused.

Videos are tiny (320x180, 36 frames) synthetic clips from :func:`make_test_video` with known
face boxes; the "detector" looks the decoded frame up and returns the true boxes (or none,
on frames a test chooses), and ``apply`` blacks the boxes out, so coverage is checked on the
written pixels as well as on the report.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import av
import numpy as np
import pytest

from fedface.anonymize.boxes import Box
from fedface.anonymize.testvideo import make_test_video, synthetic_face
from fedface.anonymize.video import (
    VideoConfig,
    _changed_rects,
    _color,
    _Converter,
    anonymize_video,
    probe_video,
    read_frames,
    uncovered_frames,
)
from fedface.errors import UserError

SIZE = (320, 180)
FRAMES = 36
FPS = 25


def _stills():
    return [synthetic_face(96, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    gt = make_test_video(path, _stills(), size=SIZE, frames=FRAMES, fps=FPS, seed=1)
    return path, gt


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    path = tmp_path_factory.mktemp("rot") / "phone.mp4"
    gt = make_test_video(path, _stills(), size=SIZE, frames=24, fps=FPS, rotation=90, seed=2)
    return path, gt


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TruthDetector:
    """Returns the true boxes of the frame it is given; none on frames in ``drop``."""

    def __init__(self, src: Path, gt: list[list[Box]], drop=()):
        self.index = {hashlib.md5(f.tobytes()).hexdigest(): i for i, f in enumerate(read_frames(src))}
        assert len(self.index) == len(gt), "test video frames must be distinct"
        self.gt, self.drop, self.calls = gt, set(drop), []

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        i = self.index[hashlib.md5(rgb.tobytes()).hexdigest()]
        self.calls.append(i)
        return [] if i in self.drop else list(self.gt[i])


def black_out(rgb: np.ndarray, boxes: list[Box]) -> np.ndarray:
    out = rgb.copy()
    h, w = out.shape[:2]
    for b in boxes:
        x0, y0, x1, y1 = b.pixels(w, h)
        out[y0:y1, x0:x1] = 0
    return out


def _audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return []
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in keep)


def _assert_boxes_black(src_frames_upright: list[np.ndarray], gt, dst: Path, every=range(10**6)):
    out = list(read_frames(dst))
    assert len(out) == len(gt)
    for i in [i for i in every if i < len(gt)]:
        for b in gt[i]:
            x0, y0, x1, y1 = b.pixels(out[i].shape[1], out[i].shape[0])
            assert out[i][y0:y1, x0:x1].mean() < 8, f"face {b} not covered on frame {i}"
            assert src_frames_upright[i][y0:y1, x0:x1].mean() > 40


# --------------------------------------------------------------------------- the file


def test_output_keeps_frames_rate_size_duration_and_audio_bytes(clip, tmp_path):
    src, gt = clip
    before = _sha(src)
    det = TruthDetector(src, gt)
    seen = []
    dst = tmp_path / "out.mp4"
    rep = anonymize_video(src, dst, det, black_out, VideoConfig(detect_every=3),
                          progress=lambda what, done, total: seen.append((done, total)))
    pin, pout = probe_video(src), probe_video(dst)
    assert pout["frames"] == pin["frames"] == rep["frames"] == FRAMES
    assert pout["fps"] == pin["fps"] == rep["fps"] == FPS
    assert (pout["width"], pout["height"]) == (pin["width"], pin["height"]) == SIZE
    assert abs(pout["duration"] - pin["duration"]) <= 1 / FPS
    assert abs(pout["duration"] - FRAMES / FPS) <= 1 / FPS
    assert pout["has_audio"] and pout["audio_codec"] == "aac"
    a_in, a_out = _audio_packets(src), _audio_packets(dst)
    assert len(a_in) > 20 and a_out == a_in  # copied packet for packet, not re-encoded
    # The input is only read; no temporary file is left next to the output.
    assert _sha(src) == before
    assert _leftovers(tmp_path, {"out.mp4"}) == []
    assert seen[-1] == (FRAMES, FRAMES)
    # The report.
    assert rep["detect_frames"] == list(range(0, FRAMES, 3)) + ([FRAMES - 1] if (FRAMES - 1) % 3 else [])
    assert sorted(set(det.calls)) == rep["detect_frames"]
    assert rep["faces_detected"] == sum(len(gt[i]) for i in rep["detect_frames"])
    assert rep["tracks"] == 2 and rep["miss_frames"] == [] and rep["audio_streams"] == 1
    assert len(rep["boxes"]) == FRAMES
    assert set(rep["seconds"]) == {"decode", "detect", "track", "apply", "encode", "total"}
    assert rep["fps_achieved"] > 0
    # detect_every=3 still covers every true face on every frame, in the report and the pixels.
    assert uncovered_frames(gt, rep["boxes"]) == []
    frames_in = list(read_frames(src))
    _assert_boxes_black(frames_in, gt, dst)
    # Outside the covered boxes the picture is the input's, up to re-encoding loss.
    for i, (a, b) in enumerate(zip(frames_in, read_frames(dst))):
        keep = np.ones(a.shape[:2], bool)
        for x0, y0, x1, y1 in rep["boxes"][i]:
            keep[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = False
        assert np.abs(a[keep].astype(int) - b[keep].astype(int)).mean() < 2.5


def test_audio_false_drops_the_audio(clip, tmp_path):
    src, gt = clip
    dst = tmp_path / "mute.mp4"
    rep = anonymize_video(src, dst, TruthDetector(src, gt), black_out, VideoConfig(audio=False))
    p = probe_video(dst)
    assert rep["audio_streams"] == 0 and not p["has_audio"] and p["audio_codec"] is None
    assert p["frames"] == FRAMES


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_rotation_metadata_survives_and_boxes_are_upright(rotated, tmp_path, ext):
    src, gt = rotated
    pin = probe_video(src)
    assert pin["rotation"] == 90 and (pin["width"], pin["height"]) == SIZE
    upright = list(read_frames(src))
    assert upright[0].shape == (SIZE[0], SIZE[1], 3)  # displayed portrait
    det = TruthDetector(src, gt)
    dst = tmp_path / f"out{ext}"
    rep = anonymize_video(src, dst, det, black_out, VideoConfig(detect_every=2))
    pout = probe_video(dst)
    assert pout["rotation"] == 90 and (pout["width"], pout["height"]) == SIZE
    assert pout["frames"] == pin["frames"] == 24 and abs(pout["duration"] - pin["duration"]) <= 1 / FPS
    assert _audio_packets(dst) == _audio_packets(src)
    assert rep["rotation"] == 90
    assert uncovered_frames(gt, rep["boxes"]) == []
    _assert_boxes_black(upright, gt, dst)


def test_a_legacy_rotate_tag_becomes_a_display_matrix(tmp_path):
    src = tmp_path / "tagged.mkv"  # Matroska keeps a 'rotate' tag as a plain tag, no matrix
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.metadata["rotate"] = "90"  # old convention: turn 90 degrees clockwise to display
        for i in range(5):
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8),
                                                        format="rgb24")))
        out.mux(s.encode(None))
    assert probe_video(src)["rotation"] == 270  # = 90 clockwise, as a counter-clockwise angle
    dst = tmp_path / "out.mp4"
    rep = anonymize_video(src, dst, _no_faces, black_out, VideoConfig(), on_miss="pass")
    assert rep["rotation"] == 270 and probe_video(dst)["rotation"] == 270
    assert next(read_frames(dst)).shape == (64, 48, 3)


def test_make_test_video_is_deterministic_and_has_an_entering_face(tmp_path):
    a = make_test_video(tmp_path / "a.mkv", _stills(), size=SIZE, frames=12, seed=5, audio=False)
    b = make_test_video(tmp_path / "b.mkv", _stills(), size=SIZE, frames=12, seed=5, audio=False)
    assert [[x.as_tuple() for x in f] for f in a] == [[x.as_tuple() for x in f] for f in b]
    fa, fb = list(read_frames(tmp_path / "a.mkv")), list(read_frames(tmp_path / "b.mkv"))
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb))
    assert len(a[0]) == 1 and max(len(f) for f in a) >= 2  # face 1 comes in from outside
    p = probe_video(tmp_path / "a.mkv")
    assert p["frames"] == 12 and not p["has_audio"]


# --------------------------------------------------------------------------- tracking


def test_a_face_missed_on_one_frame_is_covered_by_its_neighbours(clip, tmp_path):
    src, gt = clip
    det = TruthDetector(src, gt, drop={10, 11})
    rep = anonymize_video(src, tmp_path / "o.mp4", det, black_out, VideoConfig(detect_every=1))
    assert rep["detect_frames"] == list(range(FRAMES))
    assert rep["boxes"][10] and rep["miss_frames"] == []
    assert uncovered_frames(gt, rep["boxes"]) == []
    assert rep["tracks"] == 2  # the faces are re-linked, not restarted


def test_a_missed_detection_frame_is_bridged_with_detect_every_3(clip, tmp_path):
    src, gt = clip
    det = TruthDetector(src, gt, drop={12, 15})
    rep = anonymize_video(src, tmp_path / "o.mp4", det, black_out, VideoConfig(detect_every=3))
    assert uncovered_frames(gt, rep["boxes"]) == []
    assert rep["miss_frames"] == []


def test_an_entering_face_is_carried_back_over_the_detection_gap(clip, tmp_path):
    src, gt = clip
    first = next(i for i, f in enumerate(gt) if len(f) == 2)  # face 1 comes into view
    every = 6
    assert first % every, "the entry frame must fall between detections for this test"
    det = TruthDetector(src, gt)
    rep = anonymize_video(src, tmp_path / "o.mp4", det, black_out,
                          VideoConfig(detect_every=every, carry=0, smooth=0.0))
    assert first not in rep["detect_frames"]
    assert uncovered_frames(gt, rep["boxes"]) == []
    _assert_boxes_black(list(read_frames(src)), gt, tmp_path / "o.mp4", every=range(first, first + every))


def test_landmarks_follow_the_face_between_detections(clip, tmp_path):
    src, gt = clip
    truth = TruthDetector(src, gt)

    def detect(rgb):  # one landmark per face: its centre
        return [Box(b.x0, b.y0, b.x1, b.y1, 0.9, np.array([b.center])) for b in truth(rgb)]

    got = []

    def apply(rgb, boxes):
        got.append(boxes)
        return black_out(rgb, boxes)

    anonymize_video(src, tmp_path / "o.mp4", detect, apply, VideoConfig(detect_every=3))
    assert len(got) == FRAMES
    for i, boxes in enumerate(got):
        face0 = np.array(gt[i][0].center)  # face 0 moves inside the picture all along
        marks = [b.landmarks[0] for b in boxes if b.landmarks is not None]
        assert marks, f"no landmarks on frame {i}"
        assert min(np.abs(m - face0).max() for m in marks) <= 2.0


def test_without_carry_or_interpolation_coverage_would_fail(clip):
    # Guards the tests above: boxes only on detection frames leave faces uncovered.
    _, gt = clip
    only_detect = [f if i % 3 == 0 else [] for i, f in enumerate(gt)]
    assert uncovered_frames(gt, only_detect) == [i for i in range(FRAMES) if i % 3]


# --------------------------------------------------------------------------- on_miss


def _no_faces(rgb):
    return []


def test_on_miss_frame_covers_the_whole_frame(clip, tmp_path):
    src, _ = clip
    dst = tmp_path / "o.mp4"
    rep = anonymize_video(src, dst, _no_faces, black_out, VideoConfig(), on_miss="frame")
    assert rep["miss_frames"] == list(range(FRAMES))
    assert all(b == [[0, 0, SIZE[0], SIZE[1]]] for b in rep["boxes"])
    assert max(f.mean() for f in read_frames(dst)) < 3


def test_on_miss_pass_leaves_frames_unchanged(clip, tmp_path):
    src, _ = clip
    dst = tmp_path / "o.mp4"
    rep = anonymize_video(src, dst, _no_faces, black_out, VideoConfig(crf=12), on_miss="pass")
    assert rep["miss_frames"] == list(range(FRAMES)) and all(b == [] for b in rep["boxes"])
    for a, b in zip(read_frames(src), read_frames(dst)):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 4  # re-encoding noise only


def test_on_miss_refuse_raises_and_leaves_nothing(clip, tmp_path):
    src, _ = clip
    dst = tmp_path / "o.mp4"
    with pytest.raises(UserError, match=r"frame 0") as err:
        anonymize_video(src, dst, _no_faces, black_out, VideoConfig(), on_miss="refuse")
    assert str(src) in str(err.value)
    assert _leftovers(tmp_path, set()) == []


# --------------------------------------------------------------------------- refusals


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as out:
        a = out.add_stream("aac", rate=44100)
        a.layout = "mono"
        t = np.arange(44100 // 2) / 44100
        f = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                       format="fltp", layout="mono")
        f.sample_rate, f.pts = 44100, 0
        out.mux(a.encode(f))
        out.mux(a.encode(None))


def _bad_input(kind: str, folder: Path, clip_path: Path) -> Path:
    if kind == "zero-byte":
        p = folder / "empty.mp4"
        p.write_bytes(b"")
    elif kind == "text":
        p = folder / "notes.mp4"
        p.write_text("this is not a video\n" * 20)
    elif kind == "truncated":
        p = folder / "cut.mp4"
        data = clip_path.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-faststart":
        full = folder / "fast.mp4"
        with av.open(str(clip_path)) as i, av.open(str(full), "w", options={"movflags": "faststart"}) as o:
            m = {s.index: o.add_stream_from_template(s) for s in i.streams}
            for pkt in i.demux():
                if pkt.dts is not None:
                    pkt.stream = m[pkt.stream.index]
                    o.mux(pkt)
        data = full.read_bytes()
        full.unlink()
        p = folder / "fastcut.mp4"
        p.write_bytes(data[: len(data) // 2])
    elif kind == "audio-only":
        p = folder / "song.m4a"
        _audio_only(p)
    elif kind == "no-decoder":
        # AVS2 video has a codec id FFmpeg can mux but (without libdavs2) not decode.
        if "avs2" in av.codecs_available:
            pytest.skip("this FFmpeg build decodes AVS2; no undecodable codec to test with")
        p = folder / "exotic.nut"
        with av.open(str(p), "w") as out:
            s = out.add_mux_stream("avs2", rate=25, width=64, height=64)
            for i in range(3):
                pkt = av.Packet(bytes(range(200)))
                pkt.pts = pkt.dts = i
                pkt.stream = s
                out.mux(pkt)
    else:
        p = folder / "missing.mp4"
    return p


@pytest.mark.parametrize("kind,match", [
    ("zero-byte", "empty"), ("text", "not a readable video"), ("truncated", "not a readable video"),
    ("truncated-faststart", "truncated"), ("audio-only", "no video stream"), ("missing", "does not exist"),
    ("no-decoder", "has no decoder"),
])
def test_bad_inputs_raise_a_user_error_naming_the_file(clip, tmp_path, kind, match):
    src = _bad_input(kind, tmp_path, clip[0])
    keep = set(os.listdir(tmp_path))
    before = _sha(src) if src.exists() else None
    with pytest.raises(UserError, match=match) as err:
        anonymize_video(src, tmp_path / "out.mp4", _no_faces, black_out, VideoConfig())
    assert str(src) in str(err.value)
    assert _leftovers(tmp_path, keep) == []  # no output, no temporary file
    assert (_sha(src) if src.exists() else None) == before


def test_unavailable_encoder_and_same_file_are_refused(clip, tmp_path):
    src, _ = clip
    dst = tmp_path / "o.mp4"
    with pytest.raises(UserError, match="encoder 'no-such-codec' is not available") as err:
        anonymize_video(src, dst, _no_faces, black_out, VideoConfig(codec="no-such-codec"))
    assert str(dst) in str(err.value)
    assert _leftovers(tmp_path, set()) == []
    with pytest.raises(UserError, match="is the input video"):
        anonymize_video(src, src, _no_faces, black_out, VideoConfig())
    with pytest.raises(UserError, match="on_miss"):
        anonymize_video(src, dst, _no_faces, black_out, VideoConfig(), on_miss="skip")
    with pytest.raises(UserError, match="detect_every"):
        VideoConfig(detect_every=0)


def test_an_interrupt_mid_video_removes_the_temp_file_and_keeps_the_old_output(clip, tmp_path):
    src, gt = clip
    dst = tmp_path / "o.mp4"
    dst.write_bytes(b"previous result")
    calls = []

    def apply(rgb, boxes):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return black_out(rgb, boxes)

    with pytest.raises(KeyboardInterrupt):
        anonymize_video(src, dst, TruthDetector(src, gt), apply, VideoConfig())
    assert dst.read_bytes() == b"previous result"
    assert _leftovers(tmp_path, {"o.mp4"}) == []


# --------------------------------------------------------------------------- frames out


def test_changed_rects_contain_every_changed_pixel():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        b = a.copy()
        for _ in range(rng.integers(0, 4)):
            x, y = rng.integers(0, 70), rng.integers(0, 50)
            b[y:y + rng.integers(1, 10), x:x + rng.integers(1, 10), rng.integers(0, 3)] ^= 1
        b[rng.integers(0, 60), rng.integers(0, 80), 2] ^= 4  # a single pixel, one channel
        covered = np.zeros((60, 80), bool)
        for x0, y0, x1, y1 in _changed_rects(a, b):
            covered[y0:y1, x0:x1] = True
        assert covered[(a != b).any(axis=2)].all()
    assert _changed_rects(a, a.copy()) == []


def test_only_changed_regions_are_converted_back(clip):
    src, _ = clip
    with av.open(str(src)) as c:
        decoded = next(c.decode(video=0))
    conv = _Converter("yuv420p", _color(decoded))
    rgb = conv.rgb(decoded)
    after = rgb.copy()
    after[33:97, 41:150] = (255, 0, 0)
    out = conv.frame(decoded, rgb, after, 0).to_ndarray()
    same = conv.frame(decoded, None, after, 0)  # "nothing changed" keeps the decoded planes
    assert np.array_equal(same.to_ndarray(), decoded.to_ndarray())
    ref = av.VideoFrame.from_ndarray(after, format="rgb24").reformat(format="yuv420p").to_ndarray()
    h = decoded.height
    y, y_dec, y_ref = out[:h].astype(int), decoded.to_ndarray()[:h].astype(int), ref[:h].astype(int)
    inside = np.zeros_like(y, bool)
    inside[33:97, 41:150] = True
    assert np.abs(y[inside] - y_ref[inside]).max() <= 2  # converted like a whole frame
    far = np.ones_like(y, bool)
    far[0:128, 32:192] = False  # the 32-pixel-rounded patch
    assert np.array_equal(y[far], y_dec[far])  # untouched pixels are exactly as decoded


# --------------------------------------------------------------------------- coverage metric


def test_uncovered_frames_measures_the_union_of_boxes():
    face = Box(0, 0, 10, 10)
    halves = [[0, 0, 5, 10], [5, 0, 10, 10]]  # together they cover the face exactly
    assert uncovered_frames([[face]], [halves]) == []
    assert uncovered_frames([[face]], [[Box(0, 0, 10, 8.9)]]) == [0]  # 89% < 90%
    assert uncovered_frames([[face]], [[Box(0, 0, 10, 9.1)]]) == []
    overlap = [[0, 0, 6, 10], [4, 0, 10, 5]]  # union 60 + 20 = 80%
    assert uncovered_frames([[face]], [overlap]) == [0]
    assert uncovered_frames([[face]], [overlap], min_cover=0.8) == []
    assert uncovered_frames([[], [face]], [[], []]) == [1]
    with pytest.raises(ValueError):
        uncovered_frames([[face]], [])
