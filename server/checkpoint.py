"""Checkpoints of a federated run: written every round, atomically, and resumable.

``OUT/checkpoint.pt`` holds the round number, the global backbone, the strategy's state
(its ``state_dict()``: momentum, optimizer moments, clip; and FV's weights), the RNG
states of this process, the run config and the metrics recorded so far. It is written
to a temporary file and renamed, so a run stopped at any moment leaves either the
previous or the new checkpoint, never a torn one. ``fedface train --resume OUT``
continues from it.

An encrypted run's checkpoint has the same layout with no model (``arrays`` is empty):
its strategy state (:meth:`server.encrypted.EncryptedFedAvg.state_dict`) holds the kept
aggregate envelopes as uint8 ciphertext blobs and metadata, nothing the server could
decrypt; the institutions keep their own state.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedface.config.run import OPERATIONAL_FIELDS
from fedface.io import atomic_write, load_torch

CHECKPOINT = "checkpoint.pt"
FORMAT = "fedface-checkpoint/2"
# Format 1 saved the strategy's state as a walk over its attributes, each value wrapped
# as {"kind": ..., "value": ...}; it holds the same values as a format-2 state_dict.
FORMAT_1 = "fedface-checkpoint/1"
# Settings that may differ between the stopped run and its resumption.
RESUMABLE_CHANGES = {"rounds", *OPERATIONAL_FIELDS}


def rng_state() -> dict:
    """Global RNGs this process draws from (Flower samples nodes with ``random``).

    fedface's own randomness uses explicitly seeded generators and needs no saving.
    """
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])


def _tensors(tree: Any) -> Any:
    """numpy arrays -> tensors, so the file loads with ``weights_only=True`` (no pickle)."""
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tensors(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    return tree


def _arrays(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _arrays(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_arrays(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    return tree


def save_checkpoint(out_dir: str | Path, server_round: int, arrays: dict[str, np.ndarray],
                    strategy_state: dict, config: dict, metrics: dict) -> Path:
    """Write ``out_dir/checkpoint.pt`` atomically (temp file, fsync, rename)."""
    path = Path(out_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "round": int(server_round), "arrays": _tensors(arrays),
            "strategy": _tensors(strategy_state), "rng": rng_state(), "config": config,
            "metrics": metrics}
    return atomic_write(path, lambda fh: torch.save(blob, fh))


def _unwrap(state: dict) -> dict:
    """A format-1 strategy state as the ``state_dict`` it holds."""
    return {name: _unwrap(item["value"]) if item["kind"] == "strategy" else item["value"]
            for name, item in state.items()}


def load_checkpoint(out_dir: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a missing or foreign file gets a message saying what to do."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint in {out_dir}: --resume needs the --out folder "
                                "of a run that completed at least one round")
    blob = load_torch(path, "checkpoint", "start the run again (the checkpoint is torn)")
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT, FORMAT_1):
        raise ValueError(f"{path} is not a fedface checkpoint (expected {FORMAT})")
    blob["arrays"] = _arrays(blob["arrays"])
    blob["strategy"] = _arrays(blob["strategy"])
    if blob["format"] == FORMAT_1:
        blob["strategy"]["strategy"] = _unwrap(blob["strategy"]["strategy"])
    return blob


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume with settings that would make a different run."""
    diffs = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
             if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)}
    if diffs:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ValueError(f"Cannot resume: settings differ from the checkpoint ({shown}). "
                         "Resume with the original settings (only rounds may grow)")
