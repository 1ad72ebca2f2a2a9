"""Run a training job: federated (Flower simulation) or centralized, same data and model.

:func:`run` is what ``fedface train`` and ``fedface demo`` call. Federated runs start
Flower's simulation engine with fedface's ServerApp and ClientApp (one virtual
SuperNode per institution); centralized runs train the same backbone on the pooled
data of all institutions with one head, for ``rounds x local_epochs`` epochs.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch

from fedface.config import RunConfig
from fedface.data.partition import verification_pairs
from fedface.data.prepare import prepare
from fedface.metrics import RunRecorder, finalize_run
from fedface.models import build_head, initial_backbone
from fedface.progress import ProgressFn
from fedface.training import (
    cosine_lr,
    make_optimizer,
    round_test_metrics,
    train_epochs,
    verify_pairs,
)


def run(cfg: RunConfig, progress: ProgressFn | None = None, quiet: bool = True,
        resume: bool = False) -> dict:
    """Train as ``cfg.mode`` says; returns the metrics document (also in ``metrics.json``).

    ``resume=True`` continues a stopped federated run from ``cfg.out/checkpoint.pt``.
    """
    if cfg.mode == "centralized":
        if resume:
            raise ValueError("--resume applies to federated runs; centralized runs keep no "
                             "checkpoint (they are the quick baseline)")
        return run_centralized(cfg, progress)
    return run_simulation(cfg, progress, quiet=quiet, resume=resume)


def resume_config(out_dir: str, **changes) -> RunConfig:
    """The settings of the run checkpointed in ``out_dir`` (``rounds`` may be raised)."""
    from server.checkpoint import load_checkpoint

    saved = load_checkpoint(out_dir)["config"]
    return RunConfig.from_run_config(saved, out=str(out_dir), pause_after=0,
                                     **{k: v for k, v in changes.items() if v is not None})


def run_simulation(cfg: RunConfig, progress: ProgressFn | None = None, quiet: bool = True,
                   resume: bool = False) -> dict:
    """A federated run of ``cfg.num_clients`` simulated institutions on this machine."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.app import build_client_app
    from fedface.privacy import check_privacy
    from server.app import build_server_app

    # Prepare (align, partition) and check DP budgets before the engine starts, so
    # failures surface early and the progress bar is not interleaved with its start-up.
    prepared = prepare(cfg, progress=progress)
    check_privacy(cfg, prepared.summary)
    result: dict = {}
    overrides = cfg.to_run_config()
    server_app = build_server_app(overrides, progress=progress, result=result, resume=resume)
    client_app = build_client_app(overrides)
    backend = {"client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": 0.0},
               "init_args": {"logging_level": "ERROR", "log_to_driver": not quiet}}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        if quiet:
            flwr_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flwr_run_simulation(server_app=server_app, client_app=client_app,
                                num_supernodes=cfg.num_clients, backend_config=backend)
    finally:
        flwr_logger.setLevel(level)
    if isinstance(result.get("error"), Exception):
        raise result["error"]
    if not result:
        raise RuntimeError(
            "The federated run ended without results: see the Flower log above "
            "(re-run with --verbose for the clients' output)"
        )
    return result


def run_centralized(cfg: RunConfig, progress: ProgressFn | None = None) -> dict:
    """Pooled training of the same backbone on all institutions' data (the baseline)."""
    t_start = time.time()
    data = prepare(cfg, progress=progress)
    pooled = data.load_pooled(cfg)
    pairsets = data.load_pairsets()
    backbone = initial_backbone(cfg)
    torch.manual_seed(cfg.seed + 1)
    head = build_head(cfg.head, cfg.embedding_size, pooled.num_classes)
    opt = make_optimizer(backbone, head, cfg.lr, cfg.momentum, cfg.weight_decay)
    recorder = RunRecorder(cfg.out, cfg.to_dict(), data.summary)
    va, vb, vsame = verification_pairs(pooled.y_val, max_pairs=1000, seed=cfg.seed)
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.time()
        lr = cosine_lr(cfg.lr, rnd - 1, cfg.rounds)
        for group in opt.param_groups:
            group["lr"] = lr
        res = train_epochs(backbone, head, pooled.x_train, pooled.y_train,
                           epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                           seed=cfg.seed * 7919 + rnd, optimizer=opt)
        record = {"round": rnd, "lr": lr, "train_loss": res.loss, "bytes_down": 0,
                  "bytes_up": 0}
        if len(vsame):
            val = verify_pairs(backbone, pooled.x_val, va, vb, vsame)
            record.update({"val_accuracy": val["accuracy"], "val_auc": val["auc"]})
        record.update(round_test_metrics(cfg, backbone, pairsets, rnd))
        record["seconds"] = round(time.time() - t0, 3)
        recorder.add_round(record)
        if progress is not None:
            progress("Centralized epochs", rnd * cfg.local_epochs, cfg.rounds * cfg.local_epochs)
    return finalize_run(cfg, backbone, pairsets, recorder, time.time() - t_start)
