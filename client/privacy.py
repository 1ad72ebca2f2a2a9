"""A client's differential privacy: where its ledger lives, and its central-DP share.

Where the ledger lives (it must outlive the process, so a restarted client still knows
what it has spent):

- deployment: ``--node-config state-dir=DIR`` -> ``DIR/privacy_ledger.json``, else next to
  the institution's data, ``<data-path>.privacy.json``;
- simulation: the run's state folder, ``OUT/clients/client_XXX_privacy.json``;
- otherwise the node's ``context.state`` (lost with the process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from fedface.config import RunConfig
from fedface.privacy import PrivacyLedger, clip_and_noise_update
from fedface.protocol import TrainInstructions

LEDGER_STATE = "privacy-ledger"


def ledger_path(context: Context, ins: TrainInstructions, cid: int) -> Path | None:
    node = context.node_config
    if "state-dir" in node:
        return Path(str(node["state-dir"])) / "privacy_ledger.json"
    if "data-path" in node:
        return Path(str(node["data-path"]) + ".privacy.json")
    if ins.state_dir:
        return Path(ins.state_dir) / f"client_{cid:03d}_privacy.json"
    return None


def load_ledger(context: Context, ins: TrainInstructions, cid: int) -> PrivacyLedger:
    kept = context.state.config_records.get(LEDGER_STATE)
    fallback = str(kept["json"]) if kept is not None else ""
    return PrivacyLedger.load(ledger_path(context, ins, cid) or "", fallback_json=fallback)


def keep_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Keep the ledger in the node's state too (the file is written by ``record``)."""
    context.state[LEDGER_STATE] = ConfigRecord({"json": ledger.to_json()})


def central_dp_share(cfg: RunConfig, ins: TrainInstructions, before: dict, after: dict,
                     seed: int) -> tuple[dict, float]:
    """``client-fixed`` central DP: clip this client's update, add its noise share."""
    return clip_and_noise_update(before, after, clip=cfg.central_dp_clip,
                                 noise_multiplier=cfg.central_dp_noise,
                                 num_sampled_clients=max(ins.sampled_clients, 1),
                                 rng=np.random.default_rng(seed))
