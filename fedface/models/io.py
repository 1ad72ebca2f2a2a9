"""Save and load a trained backbone with what is needed to rebuild it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedface.io import atomic_write, load_torch

FORMAT = "fedface-backbone/1"


def save_backbone(path: str | Path, backbone: nn.Module, name: str, embedding_size: int,
                  image_size: int, extra: dict | None = None) -> Path:
    """Write ``model.pt`` atomically: weights plus registry name and sizes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "backbone": name, "embedding_size": int(embedding_size),
            "image_size": int(image_size), "state_dict": backbone.state_dict(),
            "extra": extra or {}}
    return atomic_write(path, lambda fh: torch.save(blob, fh))


def load_backbone(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a backbone saved by :func:`save_backbone`; returns (model, metadata)."""
    from fedface.models import build_backbone

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model file {path} does not exist: train one with "
                                "`fedface train --out DIR` (it writes DIR/model.pt)")
    blob = load_torch(path, "fedface model file", "train it again, or restore the file")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fedface model file (expected format {FORMAT})")
    model = build_backbone(blob["backbone"], embedding_size=blob["embedding_size"],
                           input_size=blob["image_size"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta
