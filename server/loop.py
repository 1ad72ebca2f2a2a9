"""The federated round loop, written against Flower's ``Strategy`` interface.

Each round: ``configure_train`` -> send and receive -> ``aggregate_train`` ->
``configure_evaluate`` -> clients score the new backbone on their private validation
splits -> optional server-side test evaluation. Every round is recorded in
``metrics.json`` (train loss, validation metrics, wall seconds, bytes up and down,
failed replies with reasons); the final backbone goes to ``model.pt``.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedface.config import RunConfig
from fedface.data.prepare import prepare
from fedface.metrics import RunRecorder, finalize_run
from fedface.models import build_backbone
from fedface.progress import ProgressFn
from fedface.protocol import (
    METRICS,
    NUM_EXAMPLES,
    TrainInstructions,
    load_backbone_record,
    payload_bytes,
)
from fedface.training import cosine_lr, round_test_metrics
from server.strategies import build_strategy


def _weighted(replies: list[Message], key: str) -> float | None:
    num, den = 0.0, 0.0
    for m in replies:
        rec = m.content[METRICS]
        if key in rec and rec[NUM_EXAMPLES] > 0:
            num += float(rec[key]) * rec[NUM_EXAMPLES]
            den += rec[NUM_EXAMPLES]
    return num / den if den else None


def _errors(replies: list[Message]) -> list[dict]:
    return [{"node": int(m.metadata.src_node_id), "reason": str(m.error.reason)}
            for m in replies if m.has_error()]


def initial_backbone(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, embedding_size=cfg.embedding_size,
                          input_size=cfg.image_size)


def run_federated(grid: Grid, cfg: RunConfig, progress: ProgressFn | None = None) -> dict:
    """Run ``cfg.rounds`` federated rounds on ``grid``; returns the metrics document."""
    t_start = time.time()
    data = prepare(cfg, progress=progress)
    pairsets = data.load_pairsets()
    backbone = initial_backbone(cfg)
    arrays = ArrayRecord({k: v.detach().clone() for k, v in backbone.state_dict().items()})
    strategy = build_strategy(cfg)
    recorder = RunRecorder(cfg.out, cfg.to_dict(), data.summary)
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.time()
        ins = TrainInstructions(server_round=rnd, lr=cosine_lr(cfg.lr, rnd - 1, cfg.rounds),
                                local_epochs=cfg.local_epochs, data_dir=str(data.root))
        msgs = list(strategy.configure_train(rnd, arrays, ins.to_record(), grid))
        down = sum(payload_bytes(m.content) for m in msgs)
        replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
        ok = [m for m in replies if not m.has_error()]
        up = sum(payload_bytes(m.content) for m in ok)
        failed = _errors(replies)
        failed += [{"node": int(m.metadata.dst_node_id), "reason": "no reply before timeout"}
                   for m in msgs[len(replies):]]
        new_arrays, _ = strategy.aggregate_train(rnd, ok)
        if new_arrays is None:
            raise RuntimeError(f"Round {rnd}: no usable client reply ({len(failed)} failed: "
                               f"{[f['reason'][:200] for f in failed[:3]]})")
        arrays = new_arrays
        train_loss = _weighted(ok, "train-loss")

        emsgs = list(strategy.configure_evaluate(rnd, arrays, ins.to_record(), grid))
        down += sum(payload_bytes(m.content) for m in emsgs)
        ereplies = list(grid.send_and_receive(emsgs, timeout=cfg.round_timeout))
        eok = [m for m in ereplies if not m.has_error()]
        record = {
            "round": rnd, "lr": ins.lr, "train_loss": train_loss,
            "clients_ok": len(ok), "clients_failed": failed,
            "val_accuracy": _weighted(eok, "val-accuracy"), "val_auc": _weighted(eok, "val-auc"),
            "bytes_down": int(down), "bytes_up": int(up),
        }
        load_backbone_record(backbone, arrays)
        record.update(round_test_metrics(cfg, backbone, pairsets, rnd))
        record["seconds"] = round(time.time() - t0, 3)
        recorder.add_round(record)
        if progress is not None:
            progress("Federated rounds", rnd, cfg.rounds)
    load_backbone_record(backbone, arrays)
    return finalize_run(cfg, backbone, pairsets, recorder, time.time() - t_start)

