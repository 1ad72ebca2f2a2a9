"""``fedface bench anonymize``: what each method hides, keeps and costs, measured.

- **Re-identification** on an LFW pair file by dlib's 128-d matcher (not trained by us), at
  FAR 0.1%, naive (clean gallery) and adaptive (gallery anonymized the same way), for every
  method at every preset; with the share of faces still detected, SSIM/PSNR to the original
  and images per second (detection + method) (:mod:`fedface.anonymize.evaluate`).
- **Detection**: recall and precision of the detectors on ``faces-multi``'s labelled boxes.
- **Video**: frames per second at 640x360 and 1920x1080 (detection + method + encoding, with
  the decode/encode share), frames left uncovered (a face found in the input frame by an
  every-frame detector that the output does not cover: should be 0), on videos built from
  LFW stills with a sine-tone audio track; and deface 1.5 on the same frames, in its own
  side environment, when it can be installed.
- An image grid (the same faces, original and each method) and a markdown table.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedface.anonymize.boxes import Box
from fedface.anonymize.detect import DetectConfig, FaceDetector
from fedface.anonymize.registry import METHODS, PRESETS, apply_batch, build_method

__all__ = ["bench_anonymize"]

Log = Callable[[str], None]
MASK_SCALE = 1.3


def _anonymizer(method, det: FaceDetector, mask_scale: float = MASK_SCALE):
    """``anonymize(images, faces)`` for the evaluation: the clean dlib boxes grown the way
    ``fedface anonymize`` grows its detections, landmarks where the method needs them."""
    def run(images: list[np.ndarray], faces: list[list[Box]]) -> list[np.ndarray]:
        grown = []
        for im, boxes in zip(images, faces, strict=True):
            bs = [b.expand(det.config.box_scale) for b in boxes]
            if getattr(method, "needs_landmarks", False):
                bs = det.landmarks(im, bs)
            grown.append([b.expand(mask_scale) for b in bs])
        return apply_batch(method, images, grown)
    return run


def _method(name: str, preset: str, surrogate: str | None, key: bytes | None):
    opts = {"surrogate": surrogate} if name == "cloak" else None
    return build_method(name, preset, opts, key=key)


def bench_reid(lfw: Path, pairs_file: str, methods: list[str], presets: list[str],
               surrogate: str | None, cache_dir: Path, limit: int | None, log: Log) -> dict:
    from fedface.anonymize import evaluate as ev

    paths, pairs = ev.lfw_pair_images(lfw, pairs_file)
    if limit:
        paths, pairs = _subset(paths, pairs, limit)
    matcher = ev.DlibMatcher()
    t0 = time.perf_counter()
    clean = matcher.describe_clean(paths, cache_dir=cache_dir)
    log(f"clean descriptors of {len(paths)} images: {time.perf_counter() - t0:.0f} s")
    det = FaceDetector(DetectConfig())
    detect = det.detect
    rows = []
    key = _bench_key(cache_dir)
    for name in methods:
        for preset in (presets if len(METHODS[name].presets) > 1 and name not in ("mask", "scramble")
                       else ["medium"]):
            if name == "cloak" and not surrogate:
                log("cloak skipped: no --surrogate model")
                continue
            method = _method(name, preset, surrogate, key)
            batch = len(paths) if getattr(method, "batch", False) else 32
            t0 = time.perf_counter()
            res = ev.evaluate_anonymizer(_anonymizer(method, det), paths, pairs, matcher, clean,
                                         detect=detect, batch_size=batch)
            row = {"method": name, "preset": preset, **_pick(res),
                   "seconds": round(time.perf_counter() - t0, 1)}
            if name == "scramble":
                row.update(_scramble_checks(paths, clean, matcher, pairs, det, key))
            rows.append(row)
            log(f"{name}/{preset}: naive {100 * row['naive_rate']:.1f}% adaptive "
                f"{100 * row['adaptive_rate']:.1f}% detected {100 * row['detection_rate']:.0f}% "
                f"SSIM {row['ssim_mean']:.2f}")
    base = {k: v for k, v in _pick(ev.reid_rates(pairs, clean.descriptors, clean.descriptors)).items()
            if k.startswith("clean")}
    return {"pairs_file": pairs_file, "images": len(paths), "genuine_pairs": int(pairs.same.sum()),
            "clean": base, "methods": rows}


def _subset(paths, pairs, limit: int):
    """The first ``limit / 2`` genuine and ``limit / 2`` impostor pairs, with their images."""
    from fedface.anonymize.evaluate import PairSet

    idx = np.concatenate([np.flatnonzero(pairs.same)[: limit // 2],
                          np.flatnonzero(~pairs.same)[: limit // 2]])
    used = np.unique(np.concatenate([pairs.a[idx], pairs.b[idx]]))
    remap = {int(old): new for new, old in enumerate(used)}
    a = np.array([remap[int(i)] for i in pairs.a[idx]])
    b = np.array([remap[int(i)] for i in pairs.b[idx]])
    return ([paths[i] for i in used],
            PairSet(a, b, pairs.same[idx], pairs.labels[used], pairs.fold[idx]))


def _bench_key(work: Path) -> bytes:
    """The benchmark's own scramble key (made once under ``work``)."""
    from crypto.scramble import load_key, new_key

    path = work / "bench-keys" / "scramble.key"
    return load_key(path) if path.exists() else new_key(path)


def _pick(res: dict) -> dict:
    keys = ("naive_rate", "adaptive_rate", "clean_rate", "threshold_clean", "threshold_adaptive",
            "ssim_mean", "psnr_mean", "detection_rate", "seconds_anonymize_per_image")
    out = {k: res[k] for k in keys if k in res}
    for k, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return out


def _scramble_checks(paths, clean, matcher, pairs, det, key) -> dict:
    """Restoring with the right key is exact; with a wrong key, what the matcher gets."""
    from fedface.anonymize import evaluate as ev
    from fedface.anonymize.scramble import restore, scramble
    from fedface.data.images import load_image

    wrong = bytes(b ^ 0xA5 for b in key)
    exact = 0
    sample = list(range(0, len(paths), max(1, len(paths) // 50)))
    for i in sample:
        im = load_image(paths[i])
        box = clean.boxes[i].expand(det.config.box_scale * MASK_SCALE)
        s, meta = scramble(im, [box], key)
        exact += int(np.array_equal(restore(s, meta, key), im))

    def wrong_key(images, faces):
        outs = []
        for im, boxes in zip(images, faces, strict=True):
            bs = [b.expand(det.config.box_scale * MASK_SCALE) for b in boxes]
            s, meta = scramble(im, bs, key)
            outs.append(restore(s, meta, wrong, check=False))
        return outs

    res = ev.evaluate_anonymizer(wrong_key, paths, pairs, matcher, clean)
    return {"restored_exactly": f"{exact}/{len(sample)}",
            "wrong_key_naive_rate": res["naive_rate"], "wrong_key_adaptive_rate": res["adaptive_rate"]}


def bench_speed(lfw: Path, methods: list[str], surrogate: str | None, work: Path, log: Log,
                n: int = 60) -> list[dict]:
    """Images per second of ``fedface anonymize``'s pipeline (decoded LFW images in memory:
    detection, landmarks where needed, the method) at the medium preset."""
    from fedface.anonymize.pipeline import Anonymizer

    images = _stills(lfw, n)
    rows = []
    for name in methods:
        if name == "cloak" and not surrogate:
            continue
        an = Anonymizer(_method(name, "medium", surrogate, _bench_key(work)), DetectConfig())
        t0 = time.perf_counter()
        if getattr(an.method, "batch", False):
            an.run_batch(images, [str(i) for i in range(len(images))])
        else:
            for im in images:
                an.anonymize(im)
        dt = time.perf_counter() - t0
        rows.append({"method": name, "images": len(images), "images_per_second": round(len(images) / dt, 1)})
        log(f"{name}: {rows[-1]['images_per_second']} images/s (detection included)")
    return rows


def bench_detection(faces_multi: Path, log: Log) -> list[dict]:
    from fedface.anonymize.evaluate import detector_pr

    xmls = [faces_multi / "training.xml", faces_multi / "testing.xml"]
    rows = []
    # The detectors' own boxes (box_scale 1): the labels follow dlib's box convention; the
    # growth that makes a box cover forehead and chin is the anonymizer's, not the detector's.
    for cfg in (DetectConfig(detector="hog", upsample=1, box_scale=1.0),
                DetectConfig(detector="hog", upsample=2, box_scale=1.0),
                DetectConfig(detector="cnn", upsample=1, box_scale=1.0)):
        det = FaceDetector(cfg)
        t0 = time.perf_counter()
        pr = detector_pr(det.detect, xmls, iou=0.5)
        row = {"detector": cfg.detector, "upsample": cfg.upsample, "box_scale": cfg.box_scale,
               **{k: pr[k] for k in ("recall", "precision", "tp", "fp", "fn") if k in pr},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        log(f"detector {cfg.detector} upsample {cfg.upsample}: recall {row['recall']:.3f} "
            f"precision {row['precision']:.3f}")
    return rows


def _stills(lfw: Path, n: int = 6) -> list[np.ndarray]:
    """One photo each of ``n`` LFW people spread over the alphabet."""
    from fedface.data.images import load_image
    folder = lfw / "lfw-deepfunneled" if (lfw / "lfw-deepfunneled").is_dir() else lfw
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    people = people[:: max(1, len(people) // n)][:n]
    return [load_image(sorted(p.glob("*.jpg"))[0]) for p in people]


def bench_video(lfw: Path, work: Path, frames: int, deface_python: str | None, log: Log) -> list[dict]:
    from fedface.anonymize.pipeline import Anonymizer
    from fedface.anonymize.testvideo import make_test_video
    from fedface.anonymize.video import (
        VideoConfig,
        anonymize_video,
        probe_video,
        read_frames,
        uncovered_frames,
    )

    stills = _stills(lfw)
    rows = []
    for (w, h), scale in (((640, 360), None), ((1920, 1080), "640x360")):
        src = work / f"faces_{w}x{h}.mp4"
        if not src.exists():
            make_test_video(src, stills, size=(w, h), frames=frames, fps=25, audio=True, faces=2)
        detect_cfg = DetectConfig(scale=scale)
        an = Anonymizer(build_method("blur"), detect_cfg)
        dst = work / f"faces_{w}x{h}.blur.mp4"
        t0 = time.perf_counter()
        rep = anonymize_video(src, dst, an.faces, an.apply_frame, VideoConfig())
        total = time.perf_counter() - t0
        # Every input frame through the same detector (not timed): each face it finds (its
        # box, the part inside the frame) must be at least 90% inside the covered region.
        every = FaceDetector(detect_cfg)
        found = [[b.clip(w, h) for b in every.detect(f)] for f in read_frames(src)]
        covered = [[Box(*c) for c in fb] for fb in rep["boxes"]]
        missed = uncovered_frames(found, covered)
        pin, pout = probe_video(src), probe_video(dst)
        t = rep.get("seconds", {})
        n = rep["frames"]
        codec = t.get("decode", 0) + t.get("encode", 0)
        # Detections run in threads beside decoding and encoding: the wall time that is not
        # decoding or encoding is what detection, tracking and blurring cost (deface's figure).
        row = {"size": f"{w}x{h}", "frames": n, "detector_scale": scale,
               "fps_end_to_end": round(n / total, 1),
               "fps_without_decode_encode": round(n / max(1e-9, total - codec), 1),
               "decode_encode_share": round(codec / total, 3),
               "seconds": t, "frames_with_input_face": sum(1 for f in found if f),
               "uncovered_frames": len(missed),
               "kept": {k: (pin.get(k), pout.get(k)) for k in
                        ("frames", "fps", "width", "height", "duration", "has_audio")}}
        if deface_python:
            row["deface"] = _deface_on_frames(deface_python, src, work)
            row["deface_end_to_end"] = _deface_end_to_end(deface_python, src, work, scale, n)
            if row["deface_end_to_end"].get("fps"):
                row["speedup_end_to_end"] = round(row["fps_end_to_end"]
                                                  / row["deface_end_to_end"]["fps"], 2)
            if row["deface"].get("fps"):
                row["speedup_vs_deface"] = round(row["fps_without_decode_encode"] / row["deface"]["fps"], 2)
        rows.append(row)
        log(f"video {w}x{h}: {row['fps_end_to_end']} fps end to end, "
            f"{row['fps_without_decode_encode']} fps without decode/encode, uncovered "
            f"{row['uncovered_frames']}"
            + (f", deface {row['deface'].get('fps')} fps (detect+blur), "
               f"{row['deface_end_to_end'].get('fps')} fps end to end" if deface_python else ""))
    return rows


_DEFACE_RUNNER = r'''
import json, sys, time
import numpy as np
from deface.centerface import CenterFace
from deface.deface import anonymize_frame
frames = np.load(sys.argv[1])["frames"]
scale = None if sys.argv[2] == "none" else tuple(int(v) for v in sys.argv[2].split("x"))
h, w = frames.shape[1:3]
cf = CenterFace(in_shape=scale or (w, h), backend="auto")
for f in frames[:3]:
    cf(f, threshold=0.2)
t0 = time.perf_counter()
faces = 0
for f in frames:
    f = f.copy()
    dets, _ = cf(f, threshold=0.2)
    faces += len(dets)
    anonymize_frame(dets, f, mask_scale=1.3, replacewith="blur", ellipse=True, draw_scores=False,
                    replaceimg=None, mosaicsize=20)
dt = time.perf_counter() - t0
print(json.dumps({"fps": round(len(frames) / dt, 1), "frames": len(frames), "faces": faces,
                  "scale": sys.argv[2]}))
'''


def _deface_on_frames(python: str, src: Path, work: Path) -> dict:
    """deface's CenterFace detection + blur (its defaults: threshold 0.2, mask scale 1.3,
    ellipse) on the decoded frames of ``src``, timed inside deface's own environment."""
    from fedface.anonymize.video import read_frames

    frames = np.stack(list(read_frames(src))).astype(np.uint8)
    h, w = frames.shape[1:3]
    npz = work / (src.stem + ".frames.npz")
    np.savez(npz, frames=frames[..., ::-1].copy())  # deface works on BGR frames (OpenCV)
    runner = work / "deface_runner.py"
    runner.write_text(_DEFACE_RUNNER)
    scale = "none" if w <= 640 else "640x360"
    try:
        out = subprocess.run([python, str(runner), str(npz), scale], capture_output=True,
                             text=True, timeout=1800)
    finally:
        npz.unlink(missing_ok=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _deface_end_to_end(python: str, src: Path, work: Path, scale: str | None, frames: int) -> dict:
    """deface's own command on the same file (decode, detect, blur, encode, audio kept),
    timed from outside, like ``fedface anonymize``'s end-to-end figure."""
    cli = Path(python).parent / "deface"
    out = work / (src.stem + ".deface.mp4")
    cmd = [str(cli), str(src), "-o", str(out), "--keep-audio"] + (["--scale", scale] if scale else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    dt = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return {"fps": round(frames / dt, 1), "seconds": round(dt, 2), "scale": scale}


def deface_environment(folder: Path, log: Log) -> str | None:
    """A side environment with deface 1.5 from PyPI (made once); its python, or ``None``."""
    python = folder / "bin" / "python"
    if python.exists():
        return str(python)
    log(f"installing deface into {folder} (once) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "deface==1.5.0"], check=True,
                       capture_output=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as err:
        log(f"deface could not be installed ({err}); the issue's deface figures apply")
        return None
    return str(python)


def grid(lfw: Path, out_png: Path, surrogate: str | None, key: bytes, n: int = 4) -> None:
    """Original and each method (medium) on the same ``n`` LFW faces, one row per face."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    det = FaceDetector(DetectConfig())
    images = _stills(lfw, 12)
    faces = [det.detect(im)[:1] for im in images]
    keep = [i for i, f in enumerate(faces) if f]
    images, faces = [images[i] for i in keep], [faces[i] for i in keep]
    cols = [("original", None)] + [(m, m) for m in METHODS if m != "cloak" or surrogate]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.7 * n))
    outs = {}
    for title, m in cols[1:]:
        method = _method(m, "medium", surrogate, key)
        if m == "ksame":
            method = build_method("ksame", "medium", {"k": 4})
        outs[title] = _anonymizer(method, det)(images, faces)
    for r in range(n):
        for c, (title, _) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(images[r] if title == "original" else outs[title][r])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title + (" (k=4)" if title == "ksame" else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def bench_anonymize(lfw: Path, faces_multi: Path, out_dir: Path, pairs_file: str = "pairsDevTest.txt",
                    methods: list[str] | None = None, presets: list[str] | None = None,
                    surrogate: str | None = None, video_frames: int = 150, deface: bool = True,
                    limit: int | None = None,
                    parts: tuple[str, ...] = ("reid", "speed", "detect", "video", "grid"),
                    previous: dict | None = None, log: Log = print) -> dict:
    """Every measurement of the module docstring; figures written under ``out_dir``.

    ``previous`` (an earlier result) is updated instead of replaced: the parts run now
    replace its parts, and re-identification rows of the methods run now replace its rows
    of those methods (so one method can be re-measured without redoing the others)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "anonymize_work"
    work.mkdir(exist_ok=True)
    methods = methods or list(METHODS)
    presets = presets or list(PRESETS)
    result: dict = {"settings": {"pairs_file": pairs_file, "methods": methods, "presets": presets,
                                 "mask_scale": MASK_SCALE, "detector": DetectConfig().__dict__,
                                 "surrogate": surrogate}}
    if "detect" in parts:
        result["detection"] = bench_detection(faces_multi, log)
    if "reid" in parts:
        result["reid"] = bench_reid(lfw, pairs_file, methods, presets, surrogate,
                                    work, limit, log)
    if "video" in parts:
        from fedface.config import default_cache_dir
        python = deface_environment(default_cache_dir() / "deface-env", log) if deface else None
        result["video"] = bench_video(lfw, work, video_frames, python, log)
    if "speed" in parts:
        result["speed"] = bench_speed(lfw, methods, surrogate, work, log)
    if "grid" in parts:
        grid(lfw, out_dir / "anonymize_grid.png", surrogate, _bench_key(work))
        result["grid"] = str(out_dir / "anonymize_grid.png")
    return merge(previous, result) if previous else result


def merge(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s parts; row lists (re-identification, speed) merged by method."""
    out = {**old, **{k: v for k, v in new.items() if k not in ("reid", "speed", "settings")}}
    out["settings"] = {**old.get("settings", {}), "updated_with": new["settings"]}
    if "speed" in new:
        done = {r["method"] for r in new["speed"]}
        out["speed"] = [r for r in old.get("speed", []) if r["method"] not in done] + new["speed"]
    if "reid" in new:
        reid = dict(new["reid"])
        done = {r["method"] for r in reid["methods"]}
        if old.get("reid", {}).get("pairs_file") == reid["pairs_file"] and \
                old["reid"].get("images") == reid["images"]:
            kept = [r for r in old["reid"]["methods"] if r["method"] not in done]
            order = {m: i for i, m in enumerate(METHODS)}
            reid["methods"] = sorted(kept + reid["methods"], key=lambda r: order[r["method"]])
        out["reid"] = reid
    return out


def markdown(result: dict) -> str:
    """The README's tables from a ``bench_anonymize`` result."""
    lines = ["# fedface anonymizers, measured", ""]
    if "reid" in result:
        r = result["reid"]
        c = r["clean"]
        lines += [f"Re-identification by dlib's 128-d matcher (not trained by us) on LFW "
                  f"`{r['pairs_file']}` ({r['genuine_pairs']} genuine pairs, {r['images']} images) "
                  f"at FAR 0.1%. Clean images: {100 * c.get('clean_rate', float('nan')):.1f}% "
                  "re-identified. Naive: clean gallery, anonymized probe; adaptive: both "
                  "anonymized, threshold recalibrated on anonymized impostors. The attacker "
                  "knows where the face is (the clean detection box).", "",
                  "| method | preset | naive re-id % | adaptive re-id % | faces detected % | "
                  "SSIM | PSNR dB | ms/image |", "|---|---|---|---|---|---|---|---|"]
        for m in r["methods"]:
            def pct(v):
                return "-" if v is None else f"{100 * v:.1f}"
            lines.append(f"| {m['method']} | {m['preset']} | {pct(m['naive_rate'])} | "
                         f"{pct(m['adaptive_rate'])} | {pct(m.get('detection_rate'))} | "
                         f"{(m.get('ssim_mean') or float('nan')):.3f} | "
                         f"{(m.get('psnr_mean') or float('nan')):.1f} | "
                         f"{1000 * (m.get('seconds_anonymize_per_image') or 0):.1f} |")
            if m["method"] == "scramble":
                lines.append(f"| scramble, wrong key | - | {pct(m['wrong_key_naive_rate'])} | "
                             f"{pct(m['wrong_key_adaptive_rate'])} | | | | restored exactly with "
                             f"the right key: {m['restored_exactly']} |")
    if "detection" in result:
        lines += ["", "Detectors on faces-multi's labelled boxes (IoU 0.5):", "",
                  "| detector | upsample | recall | precision | TP | FP | FN | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in result["detection"]:
            lines.append(f"| {d['detector']} | {d['upsample']} | {d['recall']:.3f} | "
                         f"{d['precision']:.3f} | {d.get('tp')} | {d.get('fp')} | {d.get('fn')} | "
                         f"{d['seconds']} |")
    if "speed" in result:
        lines += ["", "Speed of `fedface anonymize` on 250x250 LFW photos (detection included, "
                  "medium preset, 2 cores):", "", "| method | images/s |", "|---|---|"]
        for r in result["speed"]:
            lines.append(f"| {r['method']} | {r['images_per_second']} |")
    if "video" in result:
        lines += ["", "Video (blur, HOG, tracking; 2 cores):", "",
                  "| size | fps end to end | deface end to end | speed-up | fps without decode/encode "
                  "(upper bound) | deface detect+blur | speed-up | decode+encode share | "
                  "uncovered frames |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in result["video"]:
            d = v.get("deface", {})
            e = v.get("deface_end_to_end", {})
            lines.append(f"| {v['size']} | {v['fps_end_to_end']} | {e.get('fps', e.get('error', '-'))} | "
                         f"{v.get('speedup_end_to_end', '-')} | {v['fps_without_decode_encode']} | "
                         f"{d.get('fps', d.get('error', '-'))} | {v.get('speedup_vs_deface', '-')} | "
                         f"{100 * v['decode_encode_share']:.0f}% | "
                         f"{v['uncovered_frames']} / {v['frames_with_input_face']} |")
    return "\n".join(lines) + "\n"
