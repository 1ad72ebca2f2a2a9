"""What a client does with a message: build its model, load its data, train, validate."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedface.config import RunConfig, own_part
from fedface.data.partition import verification_pairs
from fedface.data.prepare import ClientData
from fedface.io import atomic_write, load_torch
from fedface.models import build_backbone, build_head
from fedface.privacy.audit import head_file, head_prefix, saved_heads
from fedface.protocol import (
    NODE_ANONYMIZE,
    NODE_ANONYMIZE_PRESET,
    NODE_CONFIG_KEYS,
    NODE_DATA_PATH,
    NODE_PARTITION_ID,
    NODE_STATE_DIR,
    TrainInstructions,
)

HEAD_STATE = "head"
HEAD_MOMENTUM = "head-momentum"


def client_config(context: Context, overrides: dict | None) -> RunConfig:
    """The run's settings: Flower's run_config, then the simulation's overrides, then the
    site's own anonymizer (node config ``anonymize``, ``anonymize-preset``), which applies
    whatever the run says.

    A node config key fedface does not know is refused: a typo (``dp-epsilom=8``) would
    otherwise drop the site's privacy cap without a word.
    """
    node = context.node_config
    unknown = sorted(set(node) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"node config key(s) {', '.join(unknown)} are not ones fedface knows "
                         f"(known: {', '.join(NODE_CONFIG_KEYS)}): fix the SuperNode's "
                         "--node-config")
    cfg = RunConfig.from_run_config(own_part(RunConfig, dict(context.run_config)),
                                    **(overrides or {}))
    if NODE_ANONYMIZE in node:
        cfg = cfg.replace(anonymize=str(node[NODE_ANONYMIZE]),
                          anonymize_preset=str(node.get(NODE_ANONYMIZE_PRESET, "medium")))
    return cfg


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float, anonymize: tuple) -> ClientData:
    if anonymize[0] == "none":
        return ClientData.load(path)
    from fedface.anonymize.chips import anonymized_client_data

    method, preset, options = anonymize
    return anonymized_client_data(path, RunConfig(anonymize=method, anonymize_preset=preset,
                                                  anonymize_options=options))


def load_client_data(context: Context, data_dir: str, cfg: RunConfig | None = None) -> ClientData:
    """This node's data, anonymized once (and cached) when ``cfg.anonymize`` says so; with
    ``cfg.share_unlearnable`` a protected copy is written beside it once (training unchanged).

    Deployment: ``--node-config "data-path=..."`` names the institution's own prepared
    file (``client.npz``). Simulation: the server's prepared folder and this node's
    ``partition-id``.
    """
    node = context.node_config
    if NODE_DATA_PATH in node:
        path = Path(str(node[NODE_DATA_PATH]))
    else:
        if not data_dir:
            raise ValueError("No data for this client: set node-config data-path (deployment)"
                             " or run through `fedface train` / `flwr run .` (simulation)")
        path = Path(data_dir) / f"client_{int(node[NODE_PARTITION_ID]):03d}.npz"
    if not path.exists():
        raise FileNotFoundError(f"Client data {path} is missing: prepare it with `fedface "
                                "prepare --clients 1` on this node")
    cfg = cfg if cfg is not None else client_config(context, None)
    if cfg.share_unlearnable != "off":  # a protected copy to hand over; training is unchanged
        from fedface.unlearnable.share import share_protected_copy

        share_protected_copy(path, cfg)
    anonymize = (cfg.anonymize, cfg.anonymize_preset, cfg.anonymize_options)
    return _load_cached(str(path), os.path.getmtime(path), anonymize)


def set_threads(cfg: RunConfig) -> None:
    torch.set_num_threads(max(1, int(cfg.num_cpus_per_client)))


def build_backbone_only(cfg: RunConfig) -> torch.nn.Module:
    """A backbone of the run's architecture (weights come from the server)."""
    return build_backbone(cfg.backbone, embedding_size=cfg.embedding_size,
                          input_size=cfg.image_size)


def client_id(context: Context) -> int:
    """Stable id of this client: its partition (simulation) or node id (deployment)."""
    node = context.node_config
    return int(node[NODE_PARTITION_ID]) if NODE_PARTITION_ID in node else int(context.node_id)


def _head_dir(context: Context, ins: TrainInstructions) -> tuple[Path, str] | None:
    """Folder and file prefix of this client's saved heads, if it has a state folder."""
    if NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[NODE_STATE_DIR])), head_prefix()
    if ins.state_dir:
        return Path(ins.state_dir), head_prefix(client_id(context))
    return None


def build_models(cfg: RunConfig, num_classes: int, context: Context,
                 ins: TrainInstructions | None = None):
    """Fresh backbone (weights come from the server) and this client's head.

    The head is created once and then kept between rounds: it is the client's template
    of its own people and never leaves it. With a state folder (the run's
    ``OUT/clients`` in simulation, ``--node-config state-dir=...`` in deployment) it is
    saved after every round as ``<prefix>_r<round>.pt`` and the newest head saved
    *before* the current round is loaded, so a restarted client or a resumed run replays
    a round from the same head as the first time. Without one it lives in the node's
    ``context.state``.
    """
    backbone = build_backbone_only(cfg)
    head = build_head(cfg.head, cfg.embedding_size, num_classes)
    state = _load_kept(context, ins, HEAD_STATE, "")
    if state is not None:
        head.load_state_dict(state)
    return backbone, head


def head_momentum(context: Context, ins: TrainInstructions) -> dict | None:
    """The head's momentum buffers kept after this client's last round (PFM), or None."""
    state = _load_kept(context, ins, HEAD_MOMENTUM, "m")
    return None if state is None else {k: v.numpy() for k, v in state.items()}


def _load_kept(context: Context, ins: TrainInstructions | None, key: str, tag: str):
    """What :func:`_keep` saved before the current round: from the state folder if there
    is one (newest file before this round; None in the run's first round), else from
    the node's state."""
    where = _head_dir(context, ins) if ins is not None else None
    if where is not None:
        folder, prefix = where
        earlier = {r: f for r, f in saved_heads(folder, prefix + tag).items()
                   if r < ins.server_round}
        if not earlier:
            return None  # first round of this run: a fresh head
        path = earlier[max(earlier)]
        try:
            return load_torch(path, "head or head-momentum file",
                              "restore it, or remove it to start that head afresh")
        except ValueError as err:  # truncated or foreign file: say which, keep it
            raise ValueError(f"Client state file {path.name} is unreadable: {err}") from None
    if key in context.state:
        return context.state[key].to_torch_state_dict()
    return None


def _keep(state: dict, context: Context, ins: TrainInstructions | None, key: str,
          tag: str) -> None:
    context.state[key] = ArrayRecord(state)
    where = _head_dir(context, ins) if ins is not None else None
    if where is not None:
        folder, prefix = where
        prefix += tag
        atomic_write(head_file(folder, prefix, ins.server_round), lambda fh: torch.save(state, fh))
        for r, f in saved_heads(folder, prefix).items():
            if r < ins.server_round - 1:
                f.unlink(missing_ok=True)


def save_head(head: torch.nn.Module, context: Context,
              ins: TrainInstructions | None = None, momentum: dict | None = None) -> None:
    """Keep the head (and, under PFM, its momentum buffers) in the node's state and,
    when a state folder is known, on disk (``<prefix>_r<round>.pt``, ``<prefix>m_r...``)."""
    _keep({k: v.detach().cpu().clone() for k, v in head.state_dict().items()}, context, ins,
          HEAD_STATE, "")
    if momentum:
        _keep({k: torch.as_tensor(v).clone() for k, v in momentum.items()}, context, ins,
              HEAD_MOMENTUM, "m")


def validation_pairs(data: ClientData, seed: int):
    """Deterministic verification pairs among this client's validation identities."""
    return verification_pairs(data.y_val, max_pairs=400, seed=seed)


def client_seed(cfg: RunConfig, context: Context, server_round: int) -> int:
    """The *public* seed of this client's round (shuffling, augmentation): anyone with the
    run config can compute it, so no privacy guarantee may rest on it; DP draws come from
    :func:`client.privacy.private_seeds`."""
    pid = int(context.node_config.get(NODE_PARTITION_ID, context.node_id % 100_000))
    return int(np.random.SeedSequence([cfg.seed, pid, server_round]).generate_state(1)[0])
