"""Anonymize a file or a folder tree: what ``fedface anonymize IN OUT`` does.

- A folder is mirrored: ``IN/a/b.jpg`` -> ``OUT/a/b.jpg``, formats kept unless ``fmt`` says
  otherwise. Files that are neither images nor videos are listed as skipped.
- A bad file (not an image, truncated, zero bytes, an unreadable video, an unsupported codec)
  is listed in the report with the reason and the run goes on; a single-file run raises it.
- No input is ever modified. Every output is written atomically (a temporary file in the
  same folder, renamed at the end), so an interrupted run leaves no half-written file under
  a final name. An existing output is kept unless ``overwrite``.
- Outputs carry no metadata of the input (EXIF, GPS, comments are dropped; the EXIF
  orientation is applied to the pixels first).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedface.anonymize.detect import DetectConfig
from fedface.anonymize.pipeline import Anonymizer, Frame, MissedFace
from fedface.anonymize.registry import build_method, resolve_options
from fedface.data.images import IMAGE_EXTENSIONS, ImageError, load_image
from fedface.errors import UserError
from fedface.io import atomic_write, atomic_write_text
from fedface.progress import ProgressFn

__all__ = ["VIDEO_EXTENSIONS", "AnonymizeOptions", "RunReport", "anonymize_path", "plan_outputs",
           "restore_path", "save_image"]

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm"})
_PIL_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF",
                ".tiff": "TIFF", ".webp": "WEBP", ".pgm": "PPM", ".ppm": "PPM"}


@dataclass
class AnonymizeOptions:
    """Everything ``fedface anonymize`` decides (the CLI's options, with the same defaults).

    Parameters
    ----------
    method, preset, options
        The method (:data:`fedface.anonymize.registry.METHODS`), its preset and overrides.
    detect : DetectConfig
        Detector, scale, threshold, upsampling, minimum face size.
    mask_scale : float
        Growth of each face box before it is covered.
    shape : str
        ``"ellipse"`` or ``"box"``.
    on_miss : str
        ``"frame"`` (default: fail closed), ``"refuse"`` or ``"pass"``.
    key : pathlib.Path or None
        Scramble key file.
    fmt : str or None
        Output image format (``"png"``, ``"jpg"``, ...); ``None`` keeps each input's.
    overwrite : bool
        Replace existing outputs.
    audio : bool
        Copy videos' audio streams (``False``: drop them).
    video : Any
        :class:`fedface.anonymize.video.VideoConfig` (``None``: its defaults).
    jpeg_quality : int
        Quality of JPEG outputs.
    """

    method: str = "blur"
    preset: str = "medium"
    options: dict | str | None = None
    detect: DetectConfig = field(default_factory=DetectConfig)
    mask_scale: float = 1.3
    shape: str = "ellipse"
    on_miss: str = "frame"
    key: Path | None = None
    fmt: str | None = None
    overwrite: bool = False
    audio: bool = True
    video: Any = None
    jpeg_quality: int = 95


@dataclass
class RunReport:
    """What happened to every file: written with ``--report PATH``."""

    method: str
    settings: dict = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, src: Path, dst: Path | None, status: str, **extra: Any) -> None:
        self.files.append({"input": str(src), "output": str(dst) if dst else None,
                           "status": status, **extra})

    @property
    def totals(self) -> dict:
        t: dict[str, int] = {"files": len(self.files)}
        for f in self.files:
            t[f["status"]] = t.get(f["status"], 0) + 1
        t["faces"] = sum(int(f.get("faces", 0)) for f in self.files)
        t["whole_frame"] = sum(1 for f in self.files if f.get("policy") == "frame")
        t["passed_unprotected"] = sum(1 for f in self.files if f.get("policy") == "pass")
        t["video_frames"] = sum(int(f.get("frames", 0)) for f in self.files)
        t["video_frames_without_face"] = sum(int(f.get("frames_without_face", 0)) for f in self.files)
        return t

    @property
    def failed(self) -> list[dict]:
        return [f for f in self.files if f["status"] in ("error", "refused", "exists")]

    def to_dict(self) -> dict:
        return {"method": self.method, "settings": self.settings, "totals": self.totals,
                "seconds": round(self.seconds, 3), "files": self.files}

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    if path.name.startswith("."):
        return None
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def _out_name(path: Path, fmt: str | None) -> Path:
    if fmt and _kind(path) == "image":
        return path.with_suffix("." + fmt.lower().lstrip("."))
    return path


def plan_outputs(src: Path, dst: Path, fmt: str | None = None) -> list[tuple[Path, Path | None]]:
    """``(input, output)`` for every file of the run (output ``None``: not an image or video).

    Refuses an output equal to the input or inside the input tree, and a missing input.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder; check the path")
    rs, rd = src.resolve(), dst.resolve()
    if rs == rd:
        raise UserError(f"output {dst} is the input itself: name another output (inputs are "
                        "never modified)")
    if src.is_dir():
        if rd.is_relative_to(rs):
            raise UserError(f"output {dst} is inside the input folder {src}: a second run would "
                            "read its own outputs; choose an output folder outside it")
        if dst.exists() and not dst.is_dir():
            raise UserError(f"output {dst} is a file but the input {src} is a folder: name a folder")
        pairs = []
        for p in sorted(q for q in src.rglob("*") if q.is_file()):
            rel = p.relative_to(src)
            if any(part.startswith(".") for part in rel.parts):
                continue
            pairs.append((p, _out_name(dst / rel, fmt) if _kind(p) else None))
        return pairs
    if dst.is_dir():
        dst = dst / src.name
    out = _out_name(dst, fmt)
    if out.resolve() == rs:
        raise UserError(f"output {out} is the input itself: name another output")
    return [(src, out if _kind(src) else None)]


def save_image(path: Path, image: np.ndarray, quality: int = 95,
               pnginfo: Any = None) -> None:
    """Write an RGB image atomically in the format its suffix names (no input metadata)."""
    ext = path.suffix.lower()
    if ext not in _PIL_FORMATS:
        raise UserError(f"{path}: cannot write {ext!r} images; use --format png or jpg")
    pil = Image.fromarray(image)
    if ext == ".pgm":
        pil = pil.convert("L")
    kwargs: dict[str, Any] = {}
    if _PIL_FORMATS[ext] == "JPEG":
        kwargs["quality"] = quality
    if _PIL_FORMATS[ext] == "WEBP":
        kwargs["lossless"] = True
    if pnginfo is not None:
        kwargs["pnginfo"] = pnginfo
    atomic_write(path, lambda fh: pil.save(fh, format=_PIL_FORMATS[ext], **kwargs))


def _scramble_format(path: Path) -> bool:
    from fedface.anonymize.scramble import requires_lossless
    try:
        requires_lossless(path.suffix)
    except UserError:
        return False
    return True


def _load_key(options: AnonymizeOptions) -> bytes | None:
    if options.method != "scramble":
        return None
    if options.key is None:
        raise UserError("scramble needs a key: pass --key FILE (make one with "
                        "`fedface keys scramble FILE`, and keep it secret)")
    from crypto.scramble import load_key
    try:
        return load_key(options.key)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from err


def build_anonymizer(options: AnonymizeOptions) -> Anonymizer:
    """The anonymizer ``options`` describe (settings refused with a message naming them)."""
    try:
        method = build_method(options.method, options.preset, options.options,
                              shape=options.shape, key=_load_key(options))
        return Anonymizer(method, options.detect, options.mask_scale, options.on_miss)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from err


def anonymize_path(src: str | Path, dst: str | Path, options: AnonymizeOptions,
                   progress: ProgressFn | None = None) -> RunReport:
    """Anonymize ``src`` (a file or a folder tree) into ``dst``; see the module docstring.

    A single bad file raises :class:`UserError`; in a folder run it is listed in the
    report (status ``error``, ``refused`` or ``exists``) and the run goes on.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    plan = plan_outputs(src, dst, options.fmt)
    single = src.is_file()
    if single and plan[0][1] is None:
        raise UserError(f"{src}: not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) or a video "
                        f"({', '.join(sorted(VIDEO_EXTENSIONS))}); convert it or pick another file")
    anonymizer = build_anonymizer(options)
    report = RunReport(options.method, _settings(options))
    todo = []
    for s, d in plan:
        if d is None:
            report.add(s, None, "skipped", reason="not an image or video")
        elif d.exists() and not options.overwrite:
            report.add(s, d, "exists", error=f"{d} exists: pass --overwrite to replace it")
        elif _kind(s) == "image" and options.method == "scramble" and not _scramble_format(d):
            report.add(s, d, "error", error=f"{s}: scramble restores exactly only from a PNG or "
                       f"TIFF file (they carry the restore metadata), not {d.suffix}: pass "
                       "--format png")
        else:
            todo.append((s, d))
    images = [(s, d) for s, d in todo if _kind(s) == "image"]
    videos = [(s, d) for s, d in todo if _kind(s) == "video"]
    if getattr(anonymizer.method, "batch", False):
        _run_batch(anonymizer, images, options, report, progress)
    else:
        for i, (s, d) in enumerate(images):
            _run_image(anonymizer, s, d, options, report)
            if progress:
                progress("images", i + 1, len(images))
    for s, d in videos:
        _run_video(anonymizer, s, d, options, report, progress)
    report.seconds = time.perf_counter() - start
    if single and report.failed:
        raise UserError(report.failed[0]["error"])
    return report


def _settings(options: AnonymizeOptions) -> dict:
    """The run's settings as the report records them (the method's options resolved)."""
    out = {k: v for k, v in asdict(options).items() if k not in ("video", "key")}
    out["options"] = resolve_options(options.method, options.preset, options.options)
    out["key"] = str(options.key) if options.key else None
    out["video"] = asdict(options.video) if options.video is not None else None
    return out


def _write_result(s: Path, d: Path, out: np.ndarray, frame: Frame, options: AnonymizeOptions,
                  report: RunReport) -> None:
    if frame.meta is not None:
        from fedface.anonymize.scramble import save_scrambled
        save_scrambled(d, out, frame.meta)
    else:
        save_image(d, out, options.jpeg_quality)
    report.add(s, d, "ok", faces=0 if frame.policy else len(frame.faces), policy=frame.policy or None)


def _run_image(anonymizer: Anonymizer, s: Path, d: Path, options: AnonymizeOptions,
               report: RunReport) -> None:
    try:
        image = load_image(s)
        out, frame = anonymizer.anonymize(image, str(s))
        _write_result(s, d, out, frame, options, report)
    except MissedFace as err:
        report.add(s, d, "refused", error=str(err), faces=0)
    except (ImageError, UserError, OSError, ValueError) as err:
        report.add(s, d, "error", error=str(err))


def _run_batch(anonymizer: Anonymizer, images, options, report, progress) -> None:
    loaded, names, faces = [], [], []
    for i, (s, d) in enumerate(images):
        try:
            im = load_image(s)
            faces.append(anonymizer.faces(im))
            loaded.append((s, d, im))
        except (ImageError, OSError, ValueError) as err:
            report.add(s, d, "error", error=str(err))
        if progress:
            progress("detecting", i + 1, len(images))
    names = [str(s) for s, _, _ in loaded]
    try:
        results = anonymizer.run_batch([im for _, _, im in loaded], names, faces)
    except ValueError as err:
        raise UserError(str(err)) from err
    for (s, d, _), res in zip(loaded, results, strict=True):
        if isinstance(res, MissedFace):
            report.add(s, d, "refused", error=str(res), faces=0)
            continue
        try:
            _write_result(s, d, res[0], res[1], options, report)
        except (UserError, OSError) as err:
            report.add(s, d, "error", error=str(err))


def _run_video(anonymizer: Anonymizer, s: Path, d: Path, options: AnonymizeOptions,
               report: RunReport, progress) -> None:
    if getattr(anonymizer.method, "batch", False) or options.method == "scramble":
        report.add(s, d, "error", error=f"{s}: {options.method} works on still images only "
                   "(K-Same needs a folder of faces; scramble needs lossless files): use blur, "
                   "mosaic, mask, dppix or cloak for video")
        return
    from fedface.anonymize.video import VideoConfig, anonymize_video
    cfg = options.video or VideoConfig()
    if not options.audio:
        import dataclasses
        cfg = dataclasses.replace(cfg, audio=False)
    try:
        out = anonymize_video(s, d, anonymizer.faces, anonymizer.apply_frame, cfg,
                              on_miss=options.on_miss, progress=progress)
    except UserError as err:
        status = "refused" if "on-miss" in str(err) or "on_miss" in str(err) else "error"
        report.add(s, d, status, error=str(err))
        return
    keep = {k: out[k] for k in ("frames", "fps", "width", "height", "rotation", "audio_streams",
                                "detect_every", "tracks", "fps_achieved",
                                "seconds") if k in out}
    report.add(s, d, "ok", faces=int(out.get("faces_detected", 0)),
               frames_without_face=len(out.get("miss_frames", [])),
               policy=out.get("on_miss") if out.get("miss_frames") else None, **keep)


def restore_path(src: str | Path, dst: str | Path, key: str | Path, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> RunReport:
    """Undo ``scramble`` for a file or a tree with the key file it was made with."""
    from crypto.scramble import load_key
    from fedface.anonymize.scramble import read_meta, restore

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    plan = plan_outputs(src, dst)
    try:
        key_bytes = load_key(Path(key))
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from err
    report = RunReport("restore", {"key": str(key)})
    images = [(s, d) for s, d in plan if d is not None and _kind(s) == "image"]
    for s, d in plan:
        if d is None or _kind(s) != "image":
            report.add(s, d, "skipped", reason="not a scrambled image")
    for i, (s, d) in enumerate(images):
        if d.exists() and not overwrite:
            report.add(s, d, "exists", error=f"{d} exists: pass --overwrite to replace it")
            continue
        try:
            meta = read_meta(s)
            if meta is None:
                raise UserError(f"{s} was not scrambled by fedface or its metadata was stripped: "
                                "only the PNG/TIFF files `fedface anonymize --method scramble` "
                                "wrote can be restored")
            out = restore(load_image(s), meta, key_bytes, what=str(s))
            save_image(d, out)
            report.add(s, d, "ok", faces=len(meta.get("boxes", [])))
        except (ImageError, UserError, OSError, ValueError) as err:
            report.add(s, d, "error", error=str(err))
        if progress:
            progress("restoring", i + 1, len(images))
    report.seconds = time.perf_counter() - start
    if src.is_file() and report.failed:
        raise UserError(report.failed[0]["error"])
    return report

