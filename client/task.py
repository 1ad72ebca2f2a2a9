"""What a client does with a message: build its model, load its data, train, validate."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedface.config import RunConfig
from fedface.data.partition import verification_pairs
from fedface.data.prepare import ClientData
from fedface.models import build_backbone, build_head

HEAD_STATE = "head"


def client_config(context: Context, overrides: dict | None) -> RunConfig:
    """The run's settings: Flower's run_config, then the simulation's overrides."""
    return RunConfig.from_run_config(dict(context.run_config), **(overrides or {}))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> ClientData:
    return ClientData.load(path)


def load_client_data(context: Context, data_dir: str) -> ClientData:
    """This node's data.

    Deployment: ``--node-config "data-path=..."`` names the institution's own prepared
    file (``client.npz``). Simulation: the server's prepared folder and this node's
    ``partition-id``.
    """
    node = context.node_config
    if "data-path" in node:
        path = Path(str(node["data-path"]))
    else:
        if not data_dir:
            raise ValueError("No data for this client: set node-config data-path (deployment)"
                             " or run through `fedface train` / `flwr run .` (simulation)")
        path = Path(data_dir) / f"client_{int(node['partition-id']):03d}.npz"
    if not path.exists():
        raise FileNotFoundError(f"Client data {path} is missing: prepare it with `fedface "
                                "prepare --clients 1` on this node")
    return _load_cached(str(path), os.path.getmtime(path))


def set_threads(cfg: RunConfig) -> None:
    torch.set_num_threads(max(1, int(cfg.num_cpus_per_client)))


def build_models(cfg: RunConfig, num_classes: int, context: Context):
    """Fresh backbone (weights come from the server) and this client's head.

    The head is created once per node and then kept in ``context.state`` between rounds:
    it is the client's template of its own people and never leaves it.
    """
    backbone = build_backbone(cfg.backbone, embedding_size=cfg.embedding_size,
                              input_size=cfg.image_size)
    head = build_head(cfg.head, cfg.embedding_size, num_classes)
    if HEAD_STATE in context.state:
        head.load_state_dict(context.state[HEAD_STATE].to_torch_state_dict())
    return backbone, head


def save_head(head: torch.nn.Module, context: Context) -> None:
    context.state[HEAD_STATE] = ArrayRecord(
        {k: v.detach().cpu() for k, v in head.state_dict().items()})


def validation_pairs(data: ClientData, seed: int):
    """Deterministic verification pairs among this client's validation identities."""
    return verification_pairs(data.y_val, max_pairs=400, seed=seed)


def client_seed(cfg: RunConfig, context: Context, server_round: int) -> int:
    pid = int(context.node_config.get("partition-id", context.node_id % 100_000))
    return int(np.random.SeedSequence([cfg.seed, pid, server_round]).generate_state(1)[0])
