"""The copy of an institution's data that leaves the federation, made unlearnable.

With ``share-unlearnable=sample`` (or ``class``) in the run config, each client writes, once,
a protected copy of its training chips beside its data: ``<data>.unlearnable-<mode>/``, one
folder per local identity of PNG chips plus the manifest ``unlearnable.json`` (the format
:func:`fedface.unlearnable.files.protect_tree` writes). That is the copy to hand to a
partner or publish; the client itself goes on training on its own clean data, unchanged
(the copy is made from the chips as loaded and nothing is written back). The copy is made
in a staging folder and moved into place whole, so a half-written copy is never there to
hand over; it runs inside the client's first call (minutes for a few thousand chips on two
cores: raise ``round-timeout`` for the first round when an institution holds many).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from fedface.errors import UserError
from fedface.io import atomic_write_text, hash_file
from fedface.unlearnable.files import MANIFEST, MANIFEST_VERSION, protect_chips, read_manifest
from fedface.unlearnable.noise import NoiseConfig

__all__ = ["share_dir", "share_protected_copy"]


def share_dir(path: str | Path, mode: str) -> Path:
    """Where the protected copy of the data file ``path`` goes."""
    path = Path(path)
    return path.with_name(f"{path.stem}.unlearnable-{mode}")


def share_protected_copy(path: str | Path, cfg) -> Path | None:
    """Write (once) the protected copy of the client data file ``path``; returns its folder,
    or ``None`` when ``cfg.share_unlearnable`` is ``"off"``."""
    if cfg.share_unlearnable == "off":
        return None
    path = Path(path)
    return _share(str(path), os.path.getmtime(path), cfg.share_unlearnable, int(cfg.image_size),
                  cfg.backbone, int(cfg.seed))


@functools.lru_cache(maxsize=8)
def _share(path: str, _mtime: float, mode: str, image_size: int, backbone: str, seed: int
           ) -> Path:
    from fedface.anonymize.files import save_image
    from fedface.data.prepare import ClientData

    t0 = time.time()
    src = Path(path)
    config = NoiseConfig(mode=mode, image_size=image_size, surrogate=backbone, seed=seed)
    out = share_dir(src, mode)
    digest = hash_file(src).hexdigest()
    settings = {"noise": config.to_dict(), "source_sha256": digest}
    old = read_manifest(out) if out.exists() else None
    if old is not None and old.get("complete") and old.get("settings") == settings:
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: move it away, the protected copy "
                        "of this client's data is written there")
    if out.exists() and old is None and any(out.iterdir()):
        raise UserError(f"{out} exists and holds no unlearnable manifest: move it away, the "
                        "protected copy of this client's data is written there")
    data = ClientData.load(src)
    # The state holds a surrogate trained on the clean chips: beside the data, never in the
    # copy; named by the data's digest and the settings, so changed data or settings never
    # resume a stale state.
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    state = src.with_name(f".{out.name}.{key}.state.pt")
    result = protect_chips(data.x_train, data.y_train, config, state_path=state)
    staging = out.with_name(f".{out.name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    images = {}
    for i, (chip, label) in enumerate(zip(result.protected, data.y_train, strict=True)):
        rel = f"{int(label):04d}/{i:05d}.png"
        save_image(staging / rel, chip)
        moved = int(np.abs(chip.astype(np.int16) - data.x_train[i]).max())
        images[rel] = {"source": f"x_train[{i}]", "max_perturbation": moved / 255}
    moved = [e["max_perturbation"] for e in images.values()]
    doc = {"version": MANIFEST_VERSION, "settings": settings, "complete": True,
           "input_layout": "client chips", "stop": result.stop.to_dict(),
           "images_protected": len(images), "identities": int(len(np.unique(data.y_train))),
           "skipped": [], "max_perturbation": max(moved),
           "mean_max_perturbation": float(np.mean(moved)),
           "noise_seconds": round(result.stop.seconds, 3),
           "seconds_per_image": round(result.stop.seconds / len(images), 4),
           "seconds": round(time.time() - t0, 3), "images": images}
    atomic_write_text(staging / MANIFEST, json.dumps(doc, indent=2) + "\n")
    if out.exists():  # an older copy (other settings or data): replaced whole
        shutil.rmtree(out)
    os.replace(staging, out)
    state.unlink(missing_ok=True)
    return out
