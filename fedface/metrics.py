"""``metrics.json``: the record of a run (config, one entry per round, final figures).

Written by :class:`RunRecorder` (and :func:`finalize_run`); read through
:class:`RunDocument`, which knows the document's shape so that readers do not:

- ``config``: the run's settings (``RunConfig.to_dict()``); ``data``: what was prepared;
- ``rounds``: one record per round (``round``, ``train_loss``, ``seconds``, ``bytes_up``,
  ``bytes_down``, ``test_accuracy`` ..., ``dp`` with ``epsilon_spent`` per institution,
  ``central_dp``, ``encryption``, ``fv``);
- ``final``: one verification report per pair set (``{name: {accuracy, auc, eer, ...,
  raw_pixels}}``) beside the run totals ``wall_seconds``, ``bytes_up``, ``bytes_down``,
  ``model``;
- optional: ``dp_plans`` (per institution), ``encryption`` (the ceremony and joins),
  ``stopped`` (why the run ended early), ``paused_after_round``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedface.io import atomic_write_text

METRICS_FILE = "metrics.json"


def _jsonable(x: Any) -> Any:
    import numpy as np  # not at import: the CLI loads this module before any numeric library

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
        self.path = Path(out_dir) / METRICS_FILE
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


def pair_reports(final: Mapping[str, Any]) -> dict[str, dict]:
    """The verification reports of a ``final`` section, ``{pair set: report}``, in order.

    ``final`` holds one report per pair set (a dict with ``accuracy``) beside the run
    totals (``wall_seconds``, ``bytes_up``, ``bytes_down``, ``model``).
    """
    return {k: v for k, v in final.items() if isinstance(v, dict) and "accuracy" in v}


@dataclass(frozen=True)
class RunDocument:
    """Typed read access to a metrics document: ``metrics.json``, or what
    :func:`fedface.runner.run` returns (the same document)."""

    doc: Mapping[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> RunDocument:
        """Read ``metrics.json``, given the file or the run's output folder."""
        path = Path(path)
        if path.is_dir():
            path = path / METRICS_FILE
        return cls(json.loads(path.read_text()))

    @property
    def config(self) -> dict:
        return self.doc["config"]

    @property
    def data(self) -> dict:
        """What was prepared (``source``, ``clients``, ``train_images`` ...); ``{}`` if none."""
        return self.doc.get("data", {})

    @property
    def rounds(self) -> list[dict]:
        return self.doc.get("rounds", [])

    @property
    def last_round(self) -> dict | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def final(self) -> dict:
        """The whole ``final`` section (reports and run totals); ``{}`` before the end."""
        return self.doc.get("final", {})

    def final_reports(self) -> dict[str, dict]:
        """``{pair set: verification report}`` of the final model (see :func:`pair_reports`)."""
        return pair_reports(self.final)

    def final_report(self, pair_set: str | None = None) -> dict:
        """The final report on ``pair_set``, or on the first pair set."""
        reports = self.final_reports()
        if pair_set is not None:
            return reports[pair_set]
        if not reports:
            raise KeyError("the run has no final verification report")
        return next(iter(reports.values()))

    def test_curve(self) -> list[float | None]:
        """Per-round accuracy on the first pair set (``None`` on rounds not evaluated)."""
        return [r.get("test_accuracy") for r in self.rounds]

    @property
    def dp_plans(self) -> dict[str, dict]:
        """DP-SGD plan per institution (``noise_multiplier``, ``delta`` ...); ``{}`` without DP."""
        return self.doc.get("dp_plans", {})

    def dp_spent(self) -> dict[str, float]:
        """Epsilon spent per institution: each one's latest figure over the rounds (an
        institution that sat out the last round keeps what it had spent)."""
        spent: dict[str, float] = {}
        for r in self.rounds:
            spent.update(r.get("dp", {}).get("epsilon_spent", {}))
        return spent

    def central_dp(self) -> list[dict]:
        """The ``central_dp`` record of every round that has one (the last is the run's)."""
        return [r["central_dp"] for r in self.rounds if "central_dp" in r]

    @property
    def encryption(self) -> dict | None:
        """The encrypted run's ceremony and joins; ``None`` for a plaintext run."""
        return self.doc.get("encryption")

    @property
    def stopped(self) -> str | None:
        """Why the run ended before its last round, if it did."""
        return self.doc.get("stopped")

    @property
    def paused_after_round(self) -> int | None:
        """The round a ``pause_after`` run stopped after (to be resumed), if it paused."""
        return self.doc.get("paused_after_round")

    @property
    def wall_seconds(self) -> float:
        return self.final.get("wall_seconds", 0)

    @property
    def model(self) -> str | None:
        """``model.pt`` of the finished run."""
        return self.final.get("model")
