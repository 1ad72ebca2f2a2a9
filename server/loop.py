"""The federated round loop, written against Flower's ``Strategy`` interface.

Each round: ``configure_train`` -> send and receive -> screen the replies (bad shapes,
dtypes, NaN/Inf, missing keys, outlying update norms, errors and timeouts are excluded
with a reason) -> ``aggregate_train`` (under FV, once per candidate weighting) ->
``configure_evaluate``: clients score the new backbone (and FV's candidates) on their
private validation splits -> optional server-side test evaluation -> checkpoint.

Every round is recorded in ``metrics.json`` (strategy, train loss, validation metrics,
wall seconds, bytes up and down, excluded replies with reasons, FV candidate scores and
the chosen weighting, momentum norm); the final backbone goes to ``model.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedface import momentum as pfm
from fedface.config import RunConfig
from fedface.data.prepare import prepare
from fedface.metrics import RunRecorder, finalize_run
from fedface.models import build_backbone
from fedface.progress import ProgressFn
from fedface.protocol import (
    CLIENT_ID,
    DP_BUDGET_SPENT,
    DP_EPSILON_SPENT,
    FV_PREFIX,
    METRICS,
    OUT_OF_SYNC,
    TRAIN_LOSS,
    TrainInstructions,
    load_backbone_record,
    numpy_record,
    payload_bytes,
    weighted_metric,
)
from fedface.training import cosine_lr, round_test_metrics
from server.checkpoint import check_resumable, load_checkpoint, save_checkpoint, set_rng_state
from server.fv import FederatedValidation
from server.strategies import (
    build_strategy,
    inner_strategy,
    load_strategy_state,
    sampled_clients,
    strategy_state,
)
from server.validation import screen_replies


def initial_backbone(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, embedding_size=cfg.embedding_size,
                          input_size=cfg.image_size)


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def _cast_like(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """Keep the global model's dtypes (Flower's adaptive strategies return float64)."""
    return numpy_record({k: np.asarray(a.numpy(), dtype=dtypes[k]) for k, a in arrays.items()})


def momentum_norm(strategy) -> float | None:
    """Norm of the strategy's server-side momentum, if it keeps one."""
    strategy = inner_strategy(strategy)
    if hasattr(strategy, "momentum") and isinstance(strategy.momentum, dict):
        return pfm.norm(strategy.momentum)
    vec = getattr(strategy, "momentum_vector", None)  # Flower's FedAvgM
    if vec is not None:
        values = vec.values() if isinstance(vec, dict) else vec
        return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in values)))
    return None


def check_privacy(cfg: RunConfig, summary: dict) -> dict:
    """Refuse impossible DP settings before round 1; the plans as run metadata."""
    if cfg.dp_epsilon <= 0:
        return {}
    from fedface.privacy import check_dp_compatible, check_run

    check_dp_compatible(initial_backbone(cfg), f"backbone {cfg.backbone!r}")
    sizes = {int(c["client"]): (int(c["train_images"]), int(c["train_identities"]))
             for c in summary.get("clients", [])}
    plans = check_run(cfg, sizes)
    return {str(cid): {"noise_multiplier": round(p.noise_multiplier, 4), "delta": p.delta,
                       "sample_rate": round(p.sample_rate, 5), "steps_per_round": p.steps_per_round,
                       "target_epsilon": p.target_epsilon, "planned_rounds": p.planned_rounds,
                       "unit": p.unit, "units": p.num_examples,
                       "images_per_unit": p.images_per_unit}
            for cid, p in plans.items()}


def privacy_record(cfg: RunConfig, strategy, good: list, excluded: list, rnd: int,
                   earlier: list[dict] | None = None) -> dict:
    """Per-round privacy figures: epsilon spent per client, declines, central DP.

    Central DP is accounted at each release's effective noise multiplier: the noise is
    calibrated to the ``m`` clients sampled, and a round that aggregates fewer replies
    (dropouts, screened-out updates) protects each of them with less
    (:func:`fedface.privacy.effective_noise_multiplier`); ``earlier`` are the run's
    previous round records, whose multipliers compose with this one.
    """
    out: dict = {}
    if cfg.dp_epsilon > 0:
        spent = {str(int(m.content[METRICS][CLIENT_ID])):
                 round(float(m.content[METRICS][DP_EPSILON_SPENT]), 4)
                 for m in good if DP_EPSILON_SPENT in m.content[METRICS]}
        out["dp"] = {"epsilon_spent": spent, "epsilon_max": max(spent.values(), default=0.0),
                     "declined": sum(DP_BUDGET_SPENT in e["reason"]
                                     for e in excluded)}
    if cfg.central_dp != "off":
        from fedface.privacy import central_delta, central_epsilon, effective_noise_multiplier

        m = sampled_clients(cfg)
        delta = central_delta(cfg.num_clients)
        z_eff = effective_noise_multiplier(cfg.central_dp, cfg.central_dp_noise, m, len(good))
        sigmas = [float(r["central_dp"]["noise_multiplier_effective"])
                  for r in (earlier or []) if "central_dp" in r] + [z_eff]
        q = m / cfg.num_clients
        out["central_dp"] = {
            "mode": cfg.central_dp, "noise_multiplier": cfg.central_dp_noise,
            "noise_multiplier_effective": z_eff, "sampled": m, "aggregated": len(good),
            "clip": float(getattr(strategy, "clipping_norm", cfg.central_dp_clip)),
            "delta": delta,
            "epsilon": central_epsilon(sigmas, q, None, delta),
            "epsilon_if_all_replied": central_epsilon(cfg.central_dp_noise, q, len(sigmas),
                                                      delta)}
    return out


def encryption_summary(cfg: RunConfig, strategy, model: dict[str, np.ndarray],
                       joined: dict) -> dict:
    """Run metadata of encrypted aggregation: scheme, packing, keys (no secrets)."""
    from crypto.packing import float_keys
    from crypto.update import Quantization

    params = strategy.keys.context.params
    layout = Quantization.from_config(cfg).layout(
        sum(model[k].size for k in float_keys(model)), strategy.keys)
    return {**joined, "params": params.to_dict(), "layout": layout.to_dict(),
            "ciphertexts_per_update": layout.ciphertexts, "step": layout.step}


def encryption_record(aggregate: ArrayRecord, good: list) -> dict:
    """Per-round figures of encrypted aggregation (plaintext metadata only)."""
    from server.encrypted import aggregate_meta

    meta = aggregate_meta(aggregate)
    clipped = [float(m.content[METRICS].get("he-clipped", 0.0)) for m in good]
    return {"clients": meta["count"], "multipliers": meta["multipliers"],
            "weight_sum": round(meta["weight_sum"], 6),
            "clipped_max": round(max(clipped, default=0.0), 6)}


def _budgets_spent(excluded: list[dict]) -> bool:
    return bool(excluded) and all(DP_BUDGET_SPENT in e["reason"] for e in excluded)


def run_federated(grid: Grid, cfg: RunConfig, progress: ProgressFn | None = None,
                  resume: bool = False) -> dict:
    """Run ``cfg.rounds`` federated rounds on ``grid``; returns the metrics document.

    With ``resume=True`` the run continues after the last round saved in
    ``cfg.out/checkpoint.pt`` (model, strategy and FV state, RNG states, metrics).
    """
    t_start = time.time()
    data = prepare(cfg, progress=progress)
    dp_plans = check_privacy(cfg, data.summary)
    pairsets = data.load_pairsets()
    backbone = initial_backbone(cfg)
    arrays = ArrayRecord({k: v.detach().clone() for k, v in backbone.state_dict().items()})
    dtypes = {k: v.dtype for k, v in _numpy(arrays).items()}
    strategy = build_strategy(cfg)
    fv = FederatedValidation(budget=cfg.fv_candidates) if cfg.fv else None
    recorder = RunRecorder(cfg.out, cfg.to_dict(), data.summary)
    if dp_plans:
        recorder.data["dp_plans"] = dp_plans
    state_dir = str((Path(cfg.out) / "clients").resolve())
    encrypted = cfg.encrypted
    if encrypted:
        # The public initial model goes to every institution, which checks its key.
        join = TrainInstructions(server_round=0, data_dir=str(data.root), state_dir=state_dir)
        recorder.data["encryption"] = encryption_summary(
            cfg, strategy, _numpy(arrays),
            strategy.join(grid, arrays, join.to_record(), cfg.round_timeout))
    first = 1
    if resume:
        ck = load_checkpoint(cfg.out)
        check_resumable(ck["config"], cfg.to_dict())
        arrays = numpy_record(ck["arrays"])
        load_strategy_state(strategy, ck["strategy"]["strategy"])
        if fv is not None:
            fv.load_state(ck["strategy"]["fv"])
        set_rng_state(ck["rng"])
        recorder.data["rounds"] = ck["metrics"]["rounds"]
        recorder.data["resumed_after_round"] = ck["round"]
        first = ck["round"] + 1
    for rnd in range(first, cfg.rounds + 1):
        t0 = time.time()
        caught_up = strategy.catch_up(grid, cfg.round_timeout) if encrypted else []
        ins = TrainInstructions(server_round=rnd, lr=cosine_lr(cfg.lr, rnd - 1, cfg.rounds),
                                local_epochs=cfg.local_epochs, data_dir=str(data.root),
                                state_dir=state_dir, sampled_clients=sampled_clients(cfg))
        msgs = list(strategy.configure_train(rnd, arrays, ins.to_record(), grid))
        down = sum(payload_bytes(m.content) for m in msgs)
        replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
        up = sum(payload_bytes(m.content) for m in replies if not m.has_error())
        screening = (strategy.screen(replies, rnd) if encrypted else
                     screen_replies(replies, _numpy(arrays), max_ratio=cfg.max_update_ratio))
        replied = {int(m.metadata.src_node_id) for m in replies}
        excluded = screening.excluded + [
            {"node": int(m.metadata.dst_node_id), "reason": "no reply before the round timeout"}
            for m in msgs if int(m.metadata.dst_node_id) not in replied]
        # A fixed order (by client id) makes aggregation reproducible run to run.
        good = sorted(screening.good, key=lambda m: int(m.content[METRICS].get(CLIENT_ID, 0)))
        needed = min(cfg.min_train_nodes, len(msgs))
        if len(good) < needed and _budgets_spent(excluded):
            # Every client that could train has spent its privacy budget: the run ends
            # with the model of the previous round.
            recorder.data["stopped"] = (f"round {rnd}: privacy budgets spent ({len(excluded)} "
                                        f"clients declined); the model of round {rnd - 1} "
                                        "is final")
            break
        if len(good) < needed:
            reasons = "; ".join(f"node {e['node']}: {e['reason'][:160]}" for e in excluded[:5])
            raise RuntimeError(f"Round {rnd}: only {len(good)} usable replies, "
                               f"min-train-nodes={needed} needed. Excluded: {reasons}")
        train_loss = weighted_metric(good, TRAIN_LOSS)

        fv_record = None
        if fv is None:
            new_arrays, _ = strategy.aggregate_train(rnd, good)
            candidates = []
        else:
            candidates = fv.aggregate_candidates(strategy, rnd, good)
            new_arrays = candidates[0]["arrays"]
        arrays = new_arrays if encrypted else _cast_like(new_arrays, dtypes)

        emsgs = list(strategy.configure_evaluate(rnd, arrays, ins.to_record(), grid))
        for i, cand in enumerate(candidates[1:], start=1):
            record = cand["arrays"] if encrypted else _cast_like(cand["arrays"], dtypes)
            for m in emsgs:
                m.content[f"{FV_PREFIX}{i}"] = record
        down += sum(payload_bytes(m.content) for m in emsgs)
        ereplies = list(grid.send_and_receive(emsgs, timeout=cfg.round_timeout))
        eok = [m for m in ereplies if not m.has_error()]
        val_acc, val_auc = weighted_metric(eok, "val-accuracy"), weighted_metric(eok, "val-auc")
        if fv is not None:
            scores = fv.scores(eok, len(candidates))
            best = fv.choose(scores)
            chosen = candidates[best]
            strategy = chosen["strategy"]
            arrays = chosen["arrays"] if encrypted else _cast_like(chosen["arrays"], dtypes)
            fv.tau = chosen["tau"]
            fv.history.append(chosen["tau"])
            prefix = "val" if best == 0 else f"{FV_PREFIX}{best}"
            val_acc = weighted_metric(eok, f"{prefix}-accuracy")
            val_auc = weighted_metric(eok, f"{prefix}-auc")
            fv_record = {"candidates": [
                {"name": c["name"], "tau": c["tau"], "score": s,
                 "weights": [round(float(w), 4) for w in c["weights"]]}
                for c, s in zip(candidates, scores)], "chosen": chosen["name"]}
        record = {
            "round": rnd, "strategy": cfg.strategy, "lr": ins.lr, "train_loss": train_loss,
            "clients_ok": len(good), "excluded": excluded, "num_excluded": len(excluded),
            "val_accuracy": val_acc, "val_auc": val_auc,
            "bytes_down": int(down), "bytes_up": int(up),
            "momentum_norm": momentum_norm(strategy),
            "update_norms": {str(k): round(v, 4) for k, v in screening.update_norms.items()},
        }
        if fv_record is not None:
            record["fv"] = fv_record
        record.update(privacy_record(cfg, strategy, good, excluded, rnd,
                                     recorder.data["rounds"]))
        if encrypted:
            # The server holds only the aggregate ciphertext: clients commit the chosen
            # candidate with the next message; no plaintext test or checkpoint here.
            # Nodes that missed the evaluate exchange or were out of sync catch up next round.
            strategy.committed(rnd, fv.choose(scores) if fv is not None else 0, arrays)
            strategy.missed(({int(m.metadata.dst_node_id) for m in emsgs}
                             - {int(m.metadata.src_node_id) for m in eok})
                            | {e["node"] for e in excluded if OUT_OF_SYNC in e["reason"]})
            record["encryption"] = encryption_record(arrays, good)
            if caught_up:
                record["encryption"]["caught_up"] = caught_up
        else:
            load_backbone_record(backbone, arrays)
            record.update(round_test_metrics(cfg, backbone, pairsets, rnd))
        record["seconds"] = round(time.time() - t0, 3)
        recorder.add_round(record)
        if not encrypted:
            save_checkpoint(cfg.out, rnd, _numpy(arrays),
                            {"strategy": strategy_state(strategy),
                             "fv": fv.state() if fv is not None else {}},
                            cfg.to_dict(), {"rounds": recorder.data["rounds"]})
        if progress is not None:
            progress("Federated rounds", rnd, cfg.rounds)
        if cfg.pause_after and rnd == cfg.pause_after and rnd < cfg.rounds:
            recorder.data["paused_after_round"] = rnd
            recorder.write()
            return recorder.data
    if encrypted:  # the release: the final model is the one plaintext the server receives
        arrays, node = strategy.release(grid, cfg.round_timeout)
        recorder.data["encryption"]["released_by_node"] = node
    load_backbone_record(backbone, arrays)
    return finalize_run(cfg, backbone, pairsets, recorder, time.time() - t_start)
