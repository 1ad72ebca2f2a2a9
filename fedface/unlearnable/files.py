"""Protect an identity folder: aligned chips -> min-min noise -> full images, with a manifest.

:func:`protect_tree` reads ``root/<identity>/<image>`` (also an LFW or ORL root), aligns every
face the way training does (:class:`fedface.data.align.FaceAligner`), makes the noise on the
chips (:class:`fedface.unlearnable.noise.MinMin`) and carries each chip's noise back into its
full image through the inverse of the chip's own alignment (``cv2.warpAffine`` with the
chip -> image map, bilinear; zero outside the chip). So the output keeps the input's
resolution and everything outside the face untouched; no pixel moves by more than the budget
(the interpolated noise stays inside it and rounding a whole pixel value plus it moves by at
most the rounded budget); the images are written losslessly (PNG) at the same relative paths.
A recognizer that detects and aligns the protected face again sees the chip noise resampled
twice (a slight low-pass) and a re-detected alignment: ``fedface bench unlearnable`` trains on
exactly these re-aligned images.

The manifest ``unlearnable.json`` in the output holds the settings, the stop condition reached,
each image's maximum perturbation and alignment status, and the images skipped with the reason.
The run's working state (aligned chips, the surrogate, the noise so far: the surrogate learnt
from the clean faces, so it never goes into the output) lives in the cache
(``<cache>/unlearnable/<key>``), saved after every iteration: running the same command again
resumes where it stopped, and the state is deleted once the images are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedface.data.align import AlignConfig, FaceAligner
from fedface.data.datasets import find_images_root, is_prealigned, load_dataset
from fedface.data.images import ImageError, load_image
from fedface.data.report import DataReport
from fedface.errors import UserError
from fedface.io import atomic_write, atomic_write_text, load_torch
from fedface.progress import ProgressFn
from fedface.unlearnable.noise import (
    MinMin,
    NoiseConfig,
    StopReport,
    budget_levels,
    check_inputs,
    quantize,
)

__all__ = ["MANIFEST", "MANIFEST_VERSION", "ProtectedChips", "chip_noise_to_image",
           "protect_chips", "protect_tree", "read_manifest", "write_images"]

MANIFEST = "unlearnable.json"
MANIFEST_VERSION = "fedface-unlearnable-1"


@dataclass
class ProtectedChips:
    """The noise of a set of chips and how its making ended."""

    noise: np.ndarray  # float32 (N, S, S, 3), grey levels
    protected: np.ndarray  # uint8 chips plus noise
    stop: StopReport
    seconds: float = 0.0


def chip_noise_to_image(noise: np.ndarray, affine: np.ndarray, shape: tuple[int, int]
                        ) -> np.ndarray:
    """A chip's noise ``(S, S, 3)`` carried into an ``(h, w)`` image through the chip -> image
    map ``affine`` (2x3; bilinear, zero outside the chip)."""
    import cv2

    h, w = shape
    return cv2.warpAffine(np.ascontiguousarray(noise, dtype=np.float32), affine.astype(np.float64),
                          (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def protect_chips(chips: np.ndarray, labels: np.ndarray, config: NoiseConfig,
                  state_path: Path | None = None, progress: ProgressFn | None = None
                  ) -> ProtectedChips:
    """Min-min noise for aligned ``chips``; with ``state_path``, saved after every iteration
    and resumed from there when the file exists (same settings and images)."""
    import torch

    t0 = time.time()
    mm = MinMin(chips, labels, config)
    if state_path is not None and state_path.exists():
        try:
            mm.load_state_dict(load_torch(state_path, "unlearnable run state",
                                          "delete it to start afresh"))
        except ValueError as err:
            raise UserError(f"{state_path}: {err}") from None

    def save(m: MinMin) -> None:
        if state_path is not None:
            atomic_write(state_path, lambda fh: torch.save(m.state_dict(), fh))

    stop = mm.run(on_iteration=save, progress=progress)
    return ProtectedChips(mm.noise_pixels(), mm.protected(), stop, time.time() - t0)


# --------------------------------------------------------------------------- the manifest


def read_manifest(dst: Path) -> dict | None:
    path = Path(dst) / MANIFEST
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable unlearnable manifest ({err}): choose another "
                        "output folder, or delete it to start afresh") from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise UserError(f"{path} is not a fedface unlearnable manifest of this version: choose "
                        "another output folder")
    return doc


def _settings(config: NoiseConfig, align: AlignConfig) -> dict:
    return {"noise": config.to_dict(), "align": align.to_dict()}


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise UserError(f"input folder {src} does not exist (or is not a folder): give a folder "
                        "of identity folders, root/<person>/<image>")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise UserError(f"output {dst} lies inside the input {src}: choose a folder outside it "
                        "(the input is never modified)")
    if d in s.parents:
        raise UserError(f"output {dst} contains the input {src}: choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"output {dst} exists and is not a folder")


def _check_cache(cache: Path, src: Path, dst: Path) -> None:
    """The working state holds the clean chips and a surrogate trained on them: never in the
    folder to be published, never in the input."""
    c = cache.resolve()
    for folder, what in ((dst, "output (it would be published with it)"), (src, "input")):
        f = folder.resolve()
        if c == f or f in c.parents:
            raise UserError(f"cache folder {cache} lies inside the {what}: the run's state "
                            "holds the clean faces and a model trained on them; choose a cache "
                            "outside both")


def _fingerprint(ds, root: Path) -> str:
    """The input as listed: every image's path, size and modification time (a resumed run
    must see the same images)."""
    h = hashlib.sha256()
    for path in ds.paths:
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _output_names(ds, root: Path) -> list[str]:
    """Each image's output path (its own, as PNG); two inputs that would write one output
    (``a.jpg`` and ``a.png``) are refused before any work."""
    names = [str(p.relative_to(root).with_suffix(".png")) for p in ds.paths]
    seen: dict[str, Path] = {}
    for name, path in zip(names, ds.paths, strict=True):
        if name in seen:
            raise UserError(f"{seen[name].relative_to(root)} and {path.relative_to(root)} would "
                            f"both be written as {name}: rename one of them")
        seen[name] = path
    return names


def _state_dir(cache: Path, dst: Path, settings: dict, fingerprint: str) -> Path:
    key = hashlib.sha256(json.dumps([str(dst.resolve()), settings, fingerprint],
                                    sort_keys=True).encode()).hexdigest()[:20]
    return cache / "unlearnable" / key


# --------------------------------------------------------------------------- reading, aligning


def _read_inputs(ds, root: Path, prealigned: bool, align: AlignConfig, state: Path,
                 progress: ProgressFn | None, report: DataReport) -> dict:
    """Chips, affines and labels of every readable image (saved in ``state``, whose name
    holds the input's fingerprint: a resumed run does not detect again)."""
    cached = state / "inputs.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    aligner = FaceAligner(align)
    s = align.size
    chips, affines, labels, rel, shapes, status = [], [], [], [], [], []
    for i, (path, label) in enumerate(zip(ds.paths, ds.labels, strict=True)):
        try:
            image = load_image(path)
        except ImageError as err:
            report.add("unreadable_image", path, err.reason)
            continue
        h, w = image.shape[:2]
        if prealigned:  # generated chips: the whole image is the face
            import cv2

            chip = cv2.resize(image, (s, s), interpolation=cv2.INTER_AREA) if (h, w) != (s, s) \
                else image
            # cv2.resize's map: chip pixel centre x <- image (x + 0.5) w / s - 0.5
            affine, how = np.array([[w / s, 0, 0.5 * w / s - 0.5],
                                    [0, h / s, 0.5 * h / s - 0.5]]), "prealigned"
        else:
            chip, affine, how = aligner.align_with_geometry(image)
            if chip is None:
                report.add("no_face", path, "no face found; left out")
                continue
        chips.append(chip)
        affines.append(affine)
        labels.append(label)
        rel.append(str(path.relative_to(root)))
        shapes.append((h, w))
        status.append(how)
        if progress is not None:
            progress("aligning", i + 1, len(ds))
    if not chips:
        raise UserError(f"no readable face image in {root}: "
                        + "; ".join(report.summary_lines(5)[1:]))
    out = {"chips": np.stack(chips), "affines": np.stack(affines).astype(np.float64),
           "labels": np.asarray(labels, np.int64), "rel": np.asarray(rel),
           "shapes": np.asarray(shapes, np.int64), "status": np.asarray(status),
           "identities": np.asarray(ds.identities),
           "skipped": np.asarray(json.dumps(_relative(report.problems, root)))}
    state.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda fh: np.savez(fh, **out))
    return out


def _relative(problems: list[dict], root: Path) -> list[dict]:
    """The problems with paths relative to the input (a manifest names no absolute path)."""
    out = []
    base = Path(os.path.abspath(root))  # links are not followed: the input's own names
    for p in problems:
        path = Path(p.get("path", ""))
        try:
            path = Path(os.path.abspath(path)).relative_to(base)
        except ValueError:
            path = Path(path.name)
        out.append({**p, "path": str(path)})
    return out


# --------------------------------------------------------------------------- writing


def write_images(src_root: Path, dst: Path, rel: list[str], noise: np.ndarray,
                 affines: np.ndarray | None, eps: float, progress: ProgressFn | None = None,
                 names: list[str] | None = None) -> dict:
    """Each ``src_root / rel[i]`` plus its chip noise (carried into the image), written as PNG
    under ``dst``; ``affines`` ``None``: the sources are the chips themselves. Returns
    ``{output path: {source, max_perturbation}}``."""
    from fedface.anonymize.files import save_image

    limit = budget_levels(eps)
    images: dict[str, dict] = {}
    for i, r in enumerate(rel):
        image = load_image(src_root / r)
        if affines is None:
            d = noise[i]
        else:
            d = chip_noise_to_image(noise[i], affines[i], image.shape[:2])
        out = np.clip(image.astype(np.float32) + quantize(d, eps), 0, 255).astype(np.uint8)
        moved = int(np.abs(out.astype(np.int16) - image).max())
        if moved > limit:  # never expected: the noise is inside the budget by construction
            raise RuntimeError(f"{r}: a pixel moved by {moved} > {limit} grey levels")
        target = Path(names[i]) if names is not None else Path(r).with_suffix(".png")
        save_image(dst / target, out)
        images[str(target)] = {"source": r, "max_perturbation": moved / 255}
        if progress is not None:
            progress("writing", i + 1, len(rel))
    return images


def protect_tree(src: str | Path, dst: str | Path, config: NoiseConfig | None = None,
                 align: AlignConfig | None = None, cache_dir: str | Path | None = None,
                 progress: ProgressFn | None = None) -> dict:
    """Protect every face image under ``src`` into ``dst``; returns the manifest.

    Parameters
    ----------
    src : path
        Identity folders (``root/<person>/<image>``, or an LFW/ORL root).
    dst : path
        Output folder, outside ``src``; a folder holding a manifest of other settings is
        refused, one of the same settings is resumed (or left as it is when complete).
    config : NoiseConfig
        The noise; its ``image_size`` is the chip side faces are aligned to.
    align : AlignConfig
        How faces are aligned (default: the layout's, at ``config.image_size``).
    cache_dir : path
        Where the resumable state lives (default: fedface's cache).
    """
    from fedface.config.run import default_cache_dir

    t0 = time.time()
    src, dst = Path(src), Path(dst)
    config = config or NoiseConfig()
    _check_paths(src, dst)
    try:
        from fedface.data.datasets import detect_layout
        layout = detect_layout(src)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    align = align or AlignConfig.for_layout(layout, size=int(config.image_size))
    if align.size != config.image_size:
        raise UserError(f"align size {align.size} differs from the noise's image size "
                        f"{config.image_size}")
    settings = _settings(config, align)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    _check_cache(cache, src, dst)
    report = DataReport()
    try:
        ds = load_dataset(src, report=report)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    root = find_images_root(src)
    names = _output_names(ds, root)
    fingerprint = _fingerprint(ds, root)
    old = read_manifest(dst)
    if old is not None:
        same = old.get("settings") == settings and old.get("input") == fingerprint
        produced = any(p.name != MANIFEST for p in dst.iterdir())
        if not same and (old.get("complete") or produced):
            why = (f"other settings ({_differences(old.get('settings', {}), settings)})"
                   if old.get("settings") != settings else
                   "other input images (added, removed or changed since)")
            raise UserError(f"{dst / MANIFEST} was written from {why}: choose another output "
                            "folder, or run with the same settings and images to resume")
        if same and old.get("complete"):
            return old
    elif dst.exists() and any(dst.iterdir()):
        raise UserError(f"output {dst} is not empty and holds no unlearnable manifest: choose "
                        "an empty or new folder (nothing is overwritten)")
    state = _state_dir(cache, dst, settings, fingerprint)
    data = _read_inputs(ds, root, is_prealigned(src), align, state, progress, report)
    try:
        check_inputs(data["chips"], data["labels"], config)
    except ValueError as err:  # nothing to resume: the clean chips leave the cache
        shutil.rmtree(state, ignore_errors=True)
        raise UserError(str(err)) from None
    doc = {"version": MANIFEST_VERSION, "settings": settings, "input": fingerprint,
           "complete": False, "input_layout": layout}
    atomic_write_text(dst / MANIFEST, json.dumps(doc, indent=2) + "\n")
    chips = protect_chips(data["chips"], data["labels"], config,
                          state_path=state / "state.pt", progress=progress)
    out_of = dict(zip((str(p.relative_to(root)) for p in ds.paths), names, strict=True))
    rel = [str(r) for r in data["rel"]]
    images = write_images(root, dst, rel, chips.noise, data["affines"], config.eps, progress,
                          names=[out_of[r] for r in rel])
    for entry, how in zip(images.values(), data["status"], strict=True):
        entry["alignment"] = str(how)
    moved = [e["max_perturbation"] for e in images.values()]
    doc.update({
        "complete": True,
        "stop": chips.stop.to_dict(),
        "images_protected": len(images),
        "identities": int(len(np.unique(data["labels"]))),
        "skipped": json.loads(str(data["skipped"])),
        "max_perturbation": max(moved),
        "mean_max_perturbation": float(np.mean(moved)),
        "noise_seconds": round(chips.stop.seconds, 3),
        "seconds_per_image": round(chips.stop.seconds / len(images), 4),
        "seconds": round(time.time() - t0, 3),
        "images": images,
    })
    atomic_write_text(dst / MANIFEST, json.dumps(doc, indent=2) + "\n")
    shutil.rmtree(state, ignore_errors=True)
    return doc


def _differences(old: dict, new: dict) -> str:
    diffs = []
    for part in ("noise", "align"):
        a, b = old.get(part, {}), new.get(part, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{k} {a.get(k)!r} there, {b.get(k)!r} now")
    return ", ".join(diffs) or "another manifest layout"

