"""A client's differential privacy: its ledger, its private randomness, the budget the
institution allows, DP-SGD's set-up for a round of local training (:class:`DPSGDRound`),
and its central-DP share.

Where the ledger and the private-randomness secret live (they must outlive the process,
so a restarted client still knows what it has spent and replays a round bit for bit):

- deployment: ``--node-config state-dir=DIR`` -> ``DIR/privacy_ledger.json`` and
  ``DIR/private_randomness.key``, else next to the institution's data,
  ``<data-path>.privacy.json`` and ``<data-path>.randomness.key``;
- simulation: the run's state folder, ``OUT/clients/client_XXX_privacy.json`` and
  ``client_XXX_randomness.key``;
- otherwise the node's ``context.state`` (lost with the process).

The institution, not the server, sets its budget: node config ``dp-epsilon`` and
``dp-delta`` (``flower-supernode --node-config "dp-epsilon=8 dp-delta=1e-5"``) cap what a
run may ask of it (:func:`check_node_budget`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from client.task import client_id
from crypto.seeds import derive_seed, input_digest, load_or_create_secret
from fedface.config import RunConfig
from fedface.data.prepare import ClientData
from fedface.privacy import (
    DPPlan,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    PrivateTraining,
    clip_and_noise_update,
    make_private,
    plan_for_run,
)
from fedface.protocol import (
    DATA_DIR,
    DP_DELTA,
    DP_EPSILON_SPENT,
    DP_NOISE,
    NODE_DATA_PATH,
    NODE_DP_DELTA,
    NODE_DP_EPSILON,
    NODE_DP_UNIT,
    NODE_FEDERATION_SIZE,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_STATE_DIR,
    STATE_DIR,
    TrainInstructions,
)

LEDGER_STATE = "privacy-ledger"
SECRET_STATE = "private-randomness"
# Purposes of the seeds derived from the secret (one independent stream each).
SEED_DP_SAMPLING, SEED_DP_NOISE, SEED_CENTRAL_NOISE, SEED_HE_ROUNDING = (
    "dp-sampling", "dp-noise", "central-dp-noise", "he-rounding")
CLIENT_FIXED = "client-fixed"  # the central-dp mode in which each client noises its update


def private_run(cfg: RunConfig, node_config=None) -> bool:
    """Whether this client is under DP: the run asks for DP-SGD or central DP, or the
    institution's node config sets a DP budget (then even a run without DP, which it
    refuses to train in, gets no validation score of its people). Nothing outside the
    accounting then leaves it (:data:`fedface.protocol.DP_RELEASABLE`)."""
    node = node_config or {}
    return (cfg.dp_epsilon > 0 or cfg.central_dp != "off" or NODE_DP_EPSILON in node
            or NODE_DP_DELTA in node or NODE_DP_UNIT in node)


def released_count(cfg: RunConfig, data: ClientData) -> int:
    """The ``num-examples`` this client reports (weights, the encrypted join): its
    training images, or under person-level DP-SGD its person slots, the count the
    accounting treats as public (the image count would change with one person's
    images)."""
    if cfg.dp_epsilon > 0 and cfg.dp_unit == "person":
        return int(data.num_classes)
    return int(len(data.y_train))


def _state_file(context: Context, ins: TrainInstructions, cid: int, name: str,
                suffix: str, sim: str) -> Path | None:
    node = context.node_config
    if NODE_STATE_DIR in node:
        return Path(str(node[NODE_STATE_DIR])) / name
    if NODE_DATA_PATH in node:
        return Path(str(node[NODE_DATA_PATH]) + suffix)
    if ins.state_dir and NODE_PARTITION_ID in node:
        # Simulation only: the run's folder of the simulated institutions. A deployed
        # node never keeps its budget or secret where the server's instructions say (a
        # server could point it at a fresh folder and reset the budget).
        return Path(ins.state_dir) / f"client_{cid:03d}_{sim}"
    return None


def ledger_path(context: Context, ins: TrainInstructions, cid: int) -> Path | None:
    return _state_file(context, ins, cid, "privacy_ledger.json", ".privacy.json", "privacy.json")


def secret_path(context: Context, ins: TrainInstructions, cid: int) -> Path | None:
    return _state_file(context, ins, cid, "private_randomness.key", ".randomness.key",
                       "randomness.key")


def mask_releases_path(context: Context, ins: TrainInstructions, cid: int) -> Path | None:
    """Where the institution records what its masks released (:mod:`client.masking`)."""
    return _state_file(context, ins, cid, "mask_releases.json", ".mask-releases.json",
                       "mask_releases.json")


class PrivateSeeds:
    """Seeds of this institution's private randomness for one round (see
    :mod:`crypto.seeds`): ``seeds.of(SEED_DP_NOISE)`` etc. Nothing public determines them,
    and each is bound to the digest of the inputs it protects, so noise is never reused
    on different inputs (another run, another data snapshot)."""

    def __init__(self, secret: bytes, server_round: int, inputs: bytes = b"") -> None:
        self._secret = secret
        self.server_round = int(server_round)
        self.inputs = inputs

    def of(self, purpose: str) -> int:
        return derive_seed(self._secret, purpose, self.server_round, self.inputs)


def private_seeds(context: Context, ins: TrainInstructions, cid: int,
                  *inputs) -> PrivateSeeds:
    """This institution's seeds for the round, bound to ``inputs`` (everything the draws
    protect: the start model, the data, the settings, or the update to be noised): its
    secret from the state folder (drawn from the OS CSPRNG on first use, owner-only),
    else from the node's memory."""
    kept = context.state.config_records.get(SECRET_STATE)
    secret = load_or_create_secret(secret_path(context, ins, cid),
                                   bytes.fromhex(str(kept["hex"])) if kept is not None else None)
    context.state[SECRET_STATE] = ConfigRecord({"hex": secret.hex()})
    # The round's instructions without where things are stored: a resumed run keeps its
    # state in another folder and must still replay its rounds bit for bit.
    where = {DATA_DIR, STATE_DIR}
    settings = {k: v for k, v in ins.to_record().items() if k not in where}
    digest = input_digest(settings, *inputs) if inputs else b""
    return PrivateSeeds(secret, ins.server_round, digest)


def load_ledger(context: Context, ins: TrainInstructions, cid: int) -> PrivacyLedger:
    kept = context.state.config_records.get(LEDGER_STATE)
    fallback = str(kept["json"]) if kept is not None else ""
    return PrivacyLedger.load(ledger_path(context, ins, cid) or "", fallback_json=fallback)


def keep_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Keep the ledger in the node's state too (the file is written by ``record``)."""
    context.state[LEDGER_STATE] = ConfigRecord({"json": ledger.to_json()})


def check_node_budget(cfg: RunConfig, node_config, plan: DPPlan | None) -> None:
    """Refuse a run that asks more of this institution than its node config allows.

    ``dp-epsilon`` in the node config: the run must train with DP-SGD at an epsilon no
    larger; ``dp-delta``: the plan's delta no larger. The server sets the run config;
    the institution's own node config is what it has signed off.
    """
    cap_eps = float(node_config.get(NODE_DP_EPSILON, 0) or 0)
    cap_delta = float(node_config.get(NODE_DP_DELTA, 0) or 0)
    if cap_eps > 0 and (plan is None or plan.target_epsilon > cap_eps * (1 + 1e-9)):
        asked = "no DP-SGD (dp-epsilon=0)" if plan is None else f"dp-epsilon={plan.target_epsilon}"
        raise PrivacyConfigError(
            f"this institution allows at most dp-epsilon={cap_eps:g} (its node config) and the "
            f"run asks for {asked}: run with --epsilon {cap_eps:g} or less")
    if cap_delta > 0 and plan is not None and plan.delta > cap_delta * (1 + 1e-9):
        raise PrivacyConfigError(
            f"this institution allows at most dp-delta={cap_delta:g} (its node config) and the "
            f"run's plan uses delta={plan.delta:g}: set dp-delta={cap_delta:g} or less")
    unit = str(node_config.get(NODE_DP_UNIT, "") or "")
    if unit == "person" and (plan is None or plan.unit != "person"):
        raise PrivacyConfigError(
            "this institution allows only person-level DP-SGD (node config dp-unit=person) "
            f"and the run asks for {'no DP-SGD' if plan is None else 'dp-unit=' + plan.unit}: "
            "run with --set dp-unit=person")


def check_sampled_clients(ins: TrainInstructions, federation_size: int) -> None:
    """Refuse a ``sampled-clients`` larger than the federation: each client-fixed noise
    share is ``1/sqrt(m)`` of the noise, so an inflated ``m`` would shrink every share."""
    if federation_size > 0 and ins.sampled_clients > federation_size:
        raise PrivacyConfigError(
            f"the server says {ins.sampled_clients} clients were sampled, but the federation "
            f"has {federation_size} institutions: a larger count would shrink this client's "
            "central-DP noise share; refused")
    if ins.sampled_clients < 1:
        raise PrivacyConfigError(f"sampled-clients={ins.sampled_clients}: must be at least 1")


def federation_size(node_config, ceremony_size: int = 0) -> int:
    """The federation's size as this institution knows it, not as the server says:
    node config ``federation-size``, else the key ceremony's institution count
    (encrypted runs), else the simulation's partition count; 0 when unknown."""
    if NODE_FEDERATION_SIZE in node_config:
        return int(node_config[NODE_FEDERATION_SIZE])
    if ceremony_size > 0:
        return int(ceremony_size)
    return int(node_config.get(NODE_NUM_PARTITIONS, 0))


def central_dp_share(cfg: RunConfig, ins: TrainInstructions, before: dict, after: dict,
                     seed: int) -> dict:
    """``client-fixed`` central DP: clip this client's update, add its noise share (the
    pre-clip norm stays here: it is an unaccounted function of the private data)."""
    shared, _ = clip_and_noise_update(before, after, clip=cfg.central_dp_clip,
                                      noise_multiplier=cfg.central_dp_noise,
                                      num_sampled_clients=max(ins.sampled_clients, 1),
                                      rng=np.random.default_rng(seed))
    return shared


class DPSGDRound:
    """DP-SGD in one round of local training.

    Built before training: the plan for the run's budget (None without DP-SGD), refused
    when it asks more than the node config allows (:func:`check_node_budget`, also for
    a run without DP-SGD). :meth:`wrap` refuses a round the ledger cannot pay for
    (``PrivacyBudgetExhausted``) and wraps model and optimizer, seeded from the
    institution's secret; :meth:`account` records what ran in the ledger.
    """

    def __init__(self, cfg: RunConfig, context: Context, ins: TrainInstructions, cid: int,
                 data: ClientData) -> None:
        self.cfg, self.context, self.ins, self.cid = cfg, context, ins, cid
        self.plan = (plan_for_run(cfg, len(data.y_train), data.num_classes, f"client {cid}")
                     if cfg.dp_epsilon > 0 else None)
        check_node_budget(cfg, context.node_config, self.plan)
        self.private: PrivateTraining | None = None
        self.ledger: PrivacyLedger | None = None

    def wrap(self, backbone, head, optimizer, data: ClientData) -> dict:
        """``train_epochs``' optimizer and private sampling, forward and empty step (the
        plain optimizer without DP-SGD). The momentum buffer only ever sees noised
        gradients (post-processing). The draws are bound to everything the step starts
        from: settings, start model and head, momentum buffers and the data."""
        if self.plan is None:
            return {"optimizer": optimizer}
        self.ledger = load_ledger(self.context, self.ins, self.cid)
        self.ledger.check_next_round(self.plan)
        buffers = [optimizer.state[p].get("momentum_buffer") for g in optimizer.param_groups
                   for p in g["params"]]
        seeds = private_seeds(self.context, self.ins, self.cid, self.cfg.computation(),
                              backbone.state_dict(), head.state_dict(),
                              [b for b in buffers if b is not None], data.x_train, data.y_train)
        people = data.y_train
        self.private = make_private(backbone, head, optimizer, self.plan,
                                    seed=seeds.of(SEED_DP_SAMPLING),
                                    noise_seed=seeds.of(SEED_DP_NOISE),
                                    grad_sample_mode=self.cfg.dp_grad_sample_mode, people=people)
        p = self.private
        return {"optimizer": p.optimizer, "batches": p.batches, "forward": p.forward,
                "on_empty": p.empty_step}

    def account(self) -> dict:
        """Record the round in the ledger (the rate, steps and noise of the steps taken)
        and return the reply's accounting metrics ({} without DP-SGD)."""
        if self.private is None:
            return {}
        spent = self.ledger.record(self.ins.server_round, self.private.plan,
                                   ran=self.private.accounted())
        keep_ledger(self.context, self.ledger)
        return {DP_EPSILON_SPENT: spent, DP_DELTA: self.private.plan.delta,
                DP_NOISE: self.private.noise_multiplier}


def can_train_again(cfg: RunConfig, context: Context, ins: TrainInstructions,
                    data: ClientData) -> bool:
    """Whether this institution's own DP ledger pays for another round."""
    cid = client_id(context)
    plan = plan_for_run(cfg, len(data.y_train), data.num_classes, f"client {cid}")
    try:
        load_ledger(context, ins, cid).check_next_round(plan)
    except PrivacyBudgetExhausted:
        return False
    return True
