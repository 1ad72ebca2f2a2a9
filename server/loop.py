"""The federated round loop, written against Flower's ``Strategy`` interface.

Each round: ``configure_train`` -> send and receive -> the strategy screens the replies
(bad shapes, dtypes, NaN/Inf, missing keys, outlying update norms, errors and timeouts
are excluded with a reason) -> ``aggregate_train`` (under FV, once per candidate
weighting) -> ``configure_evaluate``: clients score the new backbone (and FV's
candidates) on their private validation splits -> the strategy commits the round,
records it (the server's own test figures, or the encrypted aggregate's) and
checkpoints it. Everything a strategy does differently (encrypted aggregation above
all) is a hook of its round lifecycle (:mod:`server.lifecycle`), not a branch here.

Every round is recorded in ``metrics.json`` (strategy, train loss, validation metrics,
wall seconds, bytes up and down, excluded replies with reasons and codes, FV candidate
scores and the chosen weighting, momentum norm, privacy); the final backbone goes to
``model.pt``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedface.config import RunConfig
from fedface.data.prepare import prepare
from fedface.metrics import RunRecorder, finalize_run
from fedface.models import initial_backbone
from fedface.privacy import check_privacy, privacy_record, sampled_clients
from fedface.progress import ProgressFn
from fedface.protocol import (
    AUC,
    CLIENT_ID,
    FV_PREFIX,
    METRICS,
    TRAIN_LOSS,
    TrainInstructions,
    load_backbone_record,
    numpy_record,
    payload_bytes,
    record_numpy,
    score_key,
    weighted_metric,
)
from fedface.training import cosine_lr, round_test_metrics
from server.checkpoint import check_resumable, load_checkpoint, save_checkpoint, set_rng_state
from server.fv import FederatedValidation, SingleCandidate
from server.masking import RoundAborted
from server.screening import Screening, budgets_spent, exchange, missed, timeouts
from server.strategies import build_strategy

# initial_backbone (fedface.models) and check_privacy / privacy_record (fedface.privacy)
# are still importable from here for the tests that import them from this module.
__all__ = ["check_resume", "run_federated"]

EXCHANGE_ATTEMPTS = 3  # a round's train exchange, run again when it cannot be settled


@dataclass
class TrainExchange:
    """A round's train exchange, screened."""

    ins: TrainInstructions
    sent: list[Message]
    screening: Screening
    excluded: list[dict]  # screened out, and the nodes that did not reply
    good: list[Message]  # in client-id order
    bytes_down: int
    bytes_up: int


class FederatedRun:
    """One federated run's server side: data, model, strategy, FV, the record; the
    :class:`server.lifecycle.RoundHost` of the strategy's hooks."""

    def __init__(self, cfg: RunConfig, progress: ProgressFn | None) -> None:
        self.cfg = cfg
        self.data = prepare(cfg, progress=progress)
        dp_plans = check_privacy(cfg, self.data.summary)
        self.pairsets = self.data.load_pairsets()
        self.backbone = initial_backbone(cfg)
        self.strategy = build_strategy(cfg)
        self.fv = FederatedValidation(budget=cfg.fv_candidates) if cfg.fv else SingleCandidate()
        self.recorder = RunRecorder(cfg.out, cfg.to_dict(), self.data.summary)
        if dp_plans:
            self.recorder.data["dp_plans"] = dp_plans
        self.state_dir = str((Path(cfg.out) / "clients").resolve())

    def instructions(self, rnd: int, **fields) -> TrainInstructions:
        """What the strategy tells clients in round ``rnd`` (0: the join)."""
        return self.strategy.instruct(TrainInstructions(
            server_round=rnd, data_dir=str(self.data.root), state_dir=self.state_dir, **fields))

    def resume(self, grid: Grid) -> tuple[ArrayRecord, int]:
        """The global model and the first round to run, from the checkpoint: the
        strategy's state is restored (and checked) before the nodes are asked to rejoin
        (:meth:`server.lifecycle.Lifecycle.rejoin`; encrypted runs: each institution
        restores its own state), the RNG states after it."""
        ck = load_checkpoint(self.cfg.out)
        check_resumable(ck["config"], self.cfg.to_dict())
        self.strategy.load_state_dict(ck["strategy"]["strategy"])
        self.fv.load_state(ck["strategy"]["fv"])
        arrays = numpy_record(ck["arrays"])
        self.recorder.data.update(self.strategy.rejoin(
            grid, arrays, self.instructions(ck["round"]).to_record(), self.cfg.round_timeout))
        set_rng_state(ck["rng"])
        self.recorder.data.update(rounds=ck["metrics"]["rounds"], resumed_after_round=ck["round"])
        return arrays, ck["round"] + 1

    def test(self, rnd: int, arrays: ArrayRecord) -> dict:
        load_backbone_record(self.backbone, arrays)
        return round_test_metrics(self.cfg, self.backbone, self.pairsets, rnd)

    def checkpoint(self, rnd: int, arrays: ArrayRecord, strategy_state: dict) -> None:
        save_checkpoint(self.cfg.out, rnd, record_numpy(arrays),
                        {"strategy": strategy_state, "fv": self.fv.state()},
                        self.cfg.to_dict(), {"rounds": self.recorder.data["rounds"]})

    def train(self, grid: Grid, rnd: int, arrays: ArrayRecord) -> TrainExchange:
        """Catch lagging nodes up, then the round's train exchange, screened and settled.

        An exchange the strategy cannot settle (masked updates whose remaining masks
        cannot be rebuilt: too many institutions left) is run again with those still
        there, up to :data:`EXCHANGE_ATTEMPTS` times; it is never aggregated wrong."""
        cfg = self.cfg
        down = up = 0
        aborted: list[str] = []
        for _ in range(EXCHANGE_ATTEMPTS):
            self.strategy.catch_up(grid, cfg.round_timeout)
            ins = self.instructions(rnd, lr=cosine_lr(cfg.lr, rnd - 1, cfg.rounds),
                                    local_epochs=cfg.local_epochs,
                                    sampled_clients=sampled_clients(cfg))
            msgs = list(self.strategy.configure_train(rnd, arrays, ins.to_record(), grid))
            down += sum(payload_bytes(m.content) for m in msgs)
            replies = list(exchange(grid, msgs, cfg.round_timeout))
            up += sum(payload_bytes(m.content) for m in replies if not m.has_error())
            screening = self.strategy.screen(replies, rnd, arrays)
            # A fixed order (by client id) makes aggregation reproducible run to run.
            good = sorted(screening.good, key=lambda m: int(m.content[METRICS].get(CLIENT_ID, 0)))
            excluded = screening.excluded + timeouts(msgs, replies)
            if len(good) < min(cfg.min_train_nodes, len(msgs)):
                break  # enough() says why
            try:
                good = self.strategy.settle(grid, rnd, good, cfg.round_timeout)
            except RoundAborted as err:
                aborted.append(str(err))
                if err.final:
                    raise RuntimeError(f"Round {rnd}: {err}") from None
                continue
            break
        else:
            raise RuntimeError(f"Round {rnd}: the exchange could not be settled in "
                               f"{EXCHANGE_ATTEMPTS} attempts: " + " | ".join(aborted))
        return TrainExchange(ins, msgs, screening, excluded, good, down, up)

    def enough(self, rnd: int, good: list[Message], excluded: list[dict], sent: int) -> bool:
        """Whether the round has the replies it needs; False when every client that could
        train has spent its privacy budget (the run ends with the last model)."""
        needed = min(self.cfg.min_train_nodes, sent)
        if len(good) >= needed:
            return True
        if budgets_spent(excluded):
            self.recorder.data["stopped"] = (f"round {rnd}: privacy budgets spent ({len(excluded)} "
                                             f"clients declined); the model of round {rnd - 1} "
                                             "is final")
            return False
        reasons = "; ".join(f"node {e['node']}: {e['reason'][:160]}" for e in excluded[:5])
        raise RuntimeError(f"Round {rnd}: only {len(good)} usable replies, "
                           f"min-train-nodes={needed} needed. Excluded: {reasons}")


def check_resume(cfg: RunConfig) -> None:
    """Refuse, before anything starts, a resume the checkpoint in ``cfg.out`` cannot
    serve: other settings, another strategy's state, another key ceremony (encrypted
    runs). :meth:`FederatedRun.resume` checks the same again on the server."""
    ck = load_checkpoint(cfg.out)
    check_resumable(ck["config"], cfg.to_dict())
    build_strategy(cfg).load_state_dict(ck["strategy"]["strategy"])


def _later_rounds(strategy, cfg: RunConfig) -> None:
    """A plaintext run starts once every institution (num-clients) is connected; later
    rounds (and a resumed run) go on with those still connected, when at least
    min-train-nodes: a deployed site that crashed is not waited for, and takes part again
    when it is back. (Encrypted runs fix their members at the join.)"""
    if hasattr(strategy, "min_available_nodes"):
        strategy.min_available_nodes = min(cfg.min_train_nodes, cfg.num_clients)


def run_federated(grid: Grid, cfg: RunConfig, progress: ProgressFn | None = None,
                  resume: bool = False) -> dict:
    """Run ``cfg.rounds`` federated rounds on ``grid``; returns the metrics document.

    With ``resume=True`` the run continues after the last round saved in
    ``cfg.out/checkpoint.pt`` (model, strategy and FV state, RNG states, metrics; an
    encrypted run: no model, the strategy's ciphertexts and metadata).
    """
    t_start = time.time()
    run = FederatedRun(cfg, progress)
    recorder, fv = run.recorder, run.fv
    arrays = ArrayRecord({k: v.detach().clone() for k, v in run.backbone.state_dict().items()})
    # Encrypted runs: the public initial model goes to every institution, which checks its
    # key; a resumed one restores its state first, then its institutions rejoin.
    if resume:
        arrays, first = run.resume(grid)
    else:
        recorder.data.update(run.strategy.join(grid, arrays, run.instructions(0).to_record(),
                                               cfg.round_timeout))
        first = 1
    if first > 1:  # a resumed run does not wait for a site that is still down
        _later_rounds(run.strategy, cfg)
    for rnd in range(first, cfg.rounds + 1):
        t0 = time.time()
        t = run.train(grid, rnd, arrays)
        if not run.enough(rnd, t.good, t.excluded, len(t.sent)):
            break
        train_loss = weighted_metric(t.good, TRAIN_LOSS)
        candidates = fv.aggregate_candidates(run.strategy, rnd, t.good)
        for cand in candidates:
            cand["arrays"] = cand["strategy"].global_arrays(cand["arrays"], arrays)
        arrays = candidates[0]["arrays"]
        emsgs = list(run.strategy.configure_evaluate(rnd, arrays, t.ins.to_record(), grid))
        for i, cand in enumerate(candidates[1:], start=1):
            for m in emsgs:
                m.content[f"{FV_PREFIX}{i}"] = cand["arrays"]
        down = t.bytes_down + sum(payload_bytes(m.content) for m in emsgs)
        ereplies = list(exchange(grid, emsgs, cfg.round_timeout))
        eok = [m for m in ereplies if not m.has_error()]
        scores = fv.scores(eok, len(candidates))
        best = fv.choose(scores)
        fv.chosen(candidates[best])
        run.strategy = strategy = candidates[best]["strategy"]
        arrays = candidates[best]["arrays"]
        record = {
            "round": rnd, "strategy": cfg.strategy, "lr": t.ins.lr, "train_loss": train_loss,
            "clients_ok": len(t.good), "excluded": t.excluded, "num_excluded": len(t.excluded),
            "val_accuracy": weighted_metric(eok, score_key(best)),
            "val_auc": weighted_metric(eok, score_key(best, AUC)),
            "bytes_down": int(down), "bytes_up": int(t.bytes_up),
            "momentum_norm": strategy.momentum_norm(),
            "update_norms": {str(k): round(v, 4) for k, v in t.screening.update_norms.items()},
            **fv.round_record(candidates, scores, best),
            **privacy_record(cfg, strategy, t.good, t.excluded, rnd, recorder.data["rounds"]),
        }
        # Nodes that missed the evaluate exchange or were out of sync catch up next round.
        strategy.commit(rnd, best, arrays, missed(emsgs, ereplies, t.excluded))
        _later_rounds(strategy, cfg)
        record.update(strategy.round_record(run, rnd, arrays, t.good))
        record["seconds"] = round(time.time() - t0, 3)
        recorder.add_round(record)
        strategy.checkpoint(run, rnd, arrays)
        if progress is not None:
            progress("Federated rounds", rnd, cfg.rounds)
        if cfg.pause_after and rnd == cfg.pause_after and rnd < cfg.rounds:
            recorder.data["paused_after_round"] = rnd
            recorder.write()
            return recorder.data
    # The final model (encrypted runs: the one plaintext the server receives).
    arrays, meta = run.strategy.release(grid, arrays, cfg.round_timeout)
    recorder.data.update(meta)
    load_backbone_record(run.backbone, arrays)
    return finalize_run(cfg, run.backbone, run.pairsets, recorder, time.time() - t_start)
