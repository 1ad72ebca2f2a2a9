"""``metrics.json``: the record of a run (config, one entry per round, final figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedface.io import atomic_write_text


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file, then rename)."""
    return atomic_write_text(path, json.dumps(_jsonable(data), indent=2))


class RunRecorder:
    """Collects a run's records and rewrites ``<out>/metrics.json`` after each round."""

    def __init__(self, out_dir: str | Path, config: dict, data_summary: dict | None = None):
        self.path = Path(out_dir) / "metrics.json"
        self.data: dict[str, Any] = {"config": config, "data": data_summary or {},
                                     "rounds": [], "final": {}}

    def add_round(self, record: dict) -> None:
        self.data["rounds"].append(record)
        self.write()

    def set_final(self, final: dict) -> None:
        self.data["final"] = final
        self.write()

    def write(self) -> Path:
        return write_json(self.path, self.data)


def finalize_run(cfg, backbone, pairsets, recorder: RunRecorder, wall_seconds: float) -> dict:
    """Final evaluation on every pair set, ``model.pt``, and the ``final`` section.

    ``final[<pair set>]`` holds ``accuracy``, ``auc``, ``eer``, ``tar_at_far_1e-3`` (and
    the protocol details) for the learned model, and ``raw_pixels`` for the non-learned
    reference on the same pairs.
    """
    from fedface.models.io import save_backbone
    from fedface.training import evaluate_pairsets

    final = evaluate_pairsets(backbone, pairsets, flip=cfg.flip_tta)
    rounds = recorder.data["rounds"]
    final["wall_seconds"] = round(wall_seconds, 2)
    final["bytes_up"] = int(sum(r.get("bytes_up", 0) for r in rounds))
    final["bytes_down"] = int(sum(r.get("bytes_down", 0) for r in rounds))
    model_path = save_backbone(Path(cfg.out) / "model.pt", backbone, cfg.backbone,
                               cfg.embedding_size, cfg.image_size,
                               extra={"mode": cfg.mode, "rounds": cfg.rounds})
    final["model"] = str(model_path)
    recorder.set_final(final)
    return recorder.data
