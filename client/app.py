"""fedface ClientApp (Flower Message API).

Each institution receives the global backbone, trains it with its own margin head on its
own faces for the configured local epochs, and replies with the backbone and metrics
(under encrypted aggregation: with an encrypted update, see :mod:`client.he`).
``evaluate`` scores the received backbone on the institution's private validation split
(verification pairs among its held-out identities); only scalar metrics leave.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import he
from client.privacy import (
    SEED_CENTRAL_NOISE,
    SEED_DP_NOISE,
    SEED_DP_SAMPLING,
    SEED_HE_ROUNDING,
    central_dp_share,
    check_node_budget,
    check_sampled_clients,
    federation_size,
    keep_ledger,
    load_ledger,
    private_seeds,
)
from client.task import (
    build_backbone_only,
    build_models,
    client_config,
    client_id,
    client_seed,
    head_momentum,
    load_client_data,
    save_head,
    set_threads,
    validation_pairs,
)
from fedface.momentum import momentum_of, seed_momentum
from fedface.privacy import make_private, plan_for_run
from fedface.protocol import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    DP_DELTA,
    DP_EPSILON_SPENT,
    DP_NOISE,
    DP_RELEASABLE,
    FV_PREFIX,
    HE_CATCH_UP,
    HE_COMMIT_ROUND,
    HE_JOIN,
    HE_RELEASE,
    HE_ROUND_PREFIX,
    METRICS,
    MOMENTUM,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    UNIT_WEIGHT,
    TrainInstructions,
    backbone_record,
    load_backbone_record,
    numpy_record,
)
from fedface.training import make_optimizer, train_epochs, verify_pairs


def build_client_app(overrides: dict | None = None) -> ClientApp:
    """A ClientApp whose settings are Flower's run_config updated by ``overrides``."""
    app = ClientApp()

    def setup(msg: Message, context: Context):
        """Settings, the round's instructions and this node's data."""
        cfg = client_config(context, overrides)
        set_threads(cfg)
        ins = TrainInstructions.from_record(msg.content[CONFIG])
        return cfg, ins, load_client_data(context, ins.data_dir)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, ins, data = setup(msg, context)
        cid = client_id(context)
        # Public seed: shuffling, augmentation (reproducible runs). Everything a privacy
        # guarantee rests on is drawn from this institution's secret instead.
        seed = client_seed(cfg, context, ins.server_round)
        torch.manual_seed(seed)
        private_run = cfg.dp_epsilon > 0 or cfg.central_dp != "off"
        seeds = private_seeds(context, ins, cid) if private_run or cfg.encrypted else None
        plan = (plan_for_run(cfg, len(data.y_train), data.num_classes, f"client {cid}")
                if cfg.dp_epsilon > 0 else None)
        check_node_budget(cfg, context.node_config, plan)
        backbone, head = build_models(cfg, data.num_classes, context, ins)
        keys = None
        if cfg.encrypted:
            # The global model and momentum are this institution's own copies.
            keys = he.client_keys(cfg, context)
            he.check_key(keys, msg.content[CONFIG])
            he.sync(context, msg.content[CONFIG], ins.server_round - 1)
            start, momentum = he.global_model(context)
            load_backbone_record(backbone, numpy_record(start))
        else:
            load_backbone_record(backbone, msg.content[ARRAYS])
            momentum = ({k: a.numpy() for k, a in msg.content[MOMENTUM].items()}
                        if MOMENTUM in msg.content.array_records else None)
        if cfg.central_dp == "client-fixed":
            check_sampled_clients(ins, federation_size(context.node_config,
                                                       getattr(keys, "clients", 0)))
        # PFM: the backbone's momentum buffer starts at the global momentum (round 1:
        # at zero, like FedAvg); the head keeps its own. Without PFM: plain local SGD.
        pfm = ins.pfm_beta > 0
        opt = make_optimizer(backbone, head, ins.lr, cfg.momentum, cfg.weight_decay,
                             ins.pfm_beta if pfm else None)
        if pfm and momentum:
            seed_momentum(opt, backbone, momentum)
        kept = head_momentum(context, ins) if pfm else None
        if kept:
            seed_momentum(opt, head, kept)
        metrics = {NUM_EXAMPLES: len(data.y_train), CLIENT_ID: cid, UNIT_WEIGHT: 1}
        private = ledger = None
        if plan is not None:
            # DP-SGD: refuse a round that would overspend the budget (the error reply
            # tells the server why), then wrap model and optimizer; the momentum buffer
            # only ever sees noised gradients (post-processing).
            ledger = load_ledger(context, ins, cid)
            ledger.check_next_round(plan)
            private = make_private(backbone, head, opt, plan, seed=seeds.of(SEED_DP_SAMPLING),
                                   noise_seed=seeds.of(SEED_DP_NOISE),
                                   grad_sample_mode=cfg.dp_grad_sample_mode,
                                   people=data.y_train)
        before = ({k: v.detach().clone().numpy() for k, v in backbone.state_dict().items()}
                  if cfg.central_dp == "client-fixed" or keys is not None else None)
        res = train_epochs(backbone, head, data.x_train, data.y_train,
                           epochs=ins.local_epochs, batch_size=cfg.batch_size, lr=ins.lr,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=seed,
                           proximal_mu=ins.proximal_mu,
                           optimizer=private.optimizer if private else opt,
                           batches=private.batches if private else None,
                           forward=private.forward if private else None,
                           on_empty=private.empty_step if private else None)
        save_head(head, context, ins, momentum_of(opt, head) if pfm else None)
        if private is not None:
            # The ledger records what ran (rate, steps and noise of the steps taken).
            spent = ledger.record(ins.server_round, private.plan, ran=private.accounted())
            keep_ledger(context, ledger)
            metrics.update({DP_EPSILON_SPENT: spent, DP_DELTA: private.plan.delta,
                            DP_NOISE: private.noise_multiplier})
        record = backbone_record(backbone)
        if cfg.central_dp == "client-fixed":
            record = numpy_record(central_dp_share(
                cfg, ins, before, {k: a.numpy() for k, a in record.items()},
                seeds.of(SEED_CENTRAL_NOISE)))
        if keys is not None:  # the update leaves encrypted
            record, extra = he.encrypt(cfg, keys, msg.content[CONFIG], before,
                                       {k: a.numpy() for k, a in record.items()},
                                       len(data.y_train), ins.server_round,
                                       seeds.of(SEED_HE_ROUNDING), train_steps=res.steps)
            metrics.update(extra)
        metrics.update({TRAIN_LOSS: res.loss, TRAIN_SECONDS: res.seconds,
                        TRAIN_STEPS: res.steps})
        if private_run:  # nothing outside the accounting leaves a private client
            metrics = {k: v for k, v in metrics.items() if k in DP_RELEASABLE}
        content = RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, ins, data = setup(msg, context)
        a, b, same = validation_pairs(data, cfg.seed)
        metrics = {NUM_EXAMPLES: int(len(same)), CLIENT_ID: client_id(context)}
        # The round's model, then any FV candidates (fv-0, fv-1, ...): one score each.
        keys = [ARRAYS] + sorted(k for k in msg.content.array_records if k.startswith(FV_PREFIX))
        records = [msg.content[k] for k in keys]
        if cfg.encrypted:  # aggregates: decrypt into pending models (always, to stay in step)
            hkeys = he.client_keys(cfg, context)
            he.check_key(hkeys, msg.content[CONFIG])
            he.sync(context, msg.content[CONFIG], ins.server_round - 1)
            records = [numpy_record(m) for m in he.open_candidates(
                context, hkeys, msg.content[CONFIG], records, ins.server_round)]
        # Under DP the validation people's scores are an unaccounted release (DP-SGD
        # does not even train on them): none leaves this institution.
        private_run = cfg.dp_epsilon > 0 or cfg.central_dp != "off"
        if len(same) and not private_run:
            backbone = build_backbone_only(cfg)
            for key, record in zip(keys, records):
                load_backbone_record(backbone, record)
                rep = verify_pairs(backbone, data.x_val, a, b, same, flip=cfg.flip_tta)
                prefix = "val" if key == ARRAYS else key
                metrics.update({f"{prefix}-accuracy": rep["accuracy"], f"{prefix}-auc": rep["auc"]})
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Encrypted runs: join (key and size check, initial model), catch up, release."""
        cfg = client_config(context, overrides)
        config = msg.content[CONFIG]
        if not cfg.encrypted:
            raise ValueError("query messages are part of encrypted aggregation, which this "
                             "run does not use")
        keys = he.client_keys(cfg, context)
        if config.get(HE_JOIN):
            data = load_client_data(context, str(config.get("data-dir", "")))
            he.join(context, keys, config, msg.content[ARRAYS])
            metrics = {NUM_EXAMPLES: len(data.y_train), CLIENT_ID: client_id(context)}
            # The proof binds this node to its ceremony index (and sample count) for the run.
            proof = he.join_proof(keys, config, context.node_id, len(data.y_train))
            return Message(content=RecordDict({METRICS: MetricRecord(metrics), **proof}),
                           reply_to=msg)
        if config.get(HE_CATCH_UP):
            he.check_key(keys, config)
            aggregates = {int(k[len(HE_ROUND_PREFIX):]): rec
                          for k, rec in msg.content.array_records.items()
                          if k.startswith(HE_ROUND_PREFIX)}
            held = he.catch_up(context, keys, config, aggregates)
            return Message(content=RecordDict({METRICS: MetricRecord({"he-round": held})}),
                           reply_to=msg)
        if config.get(HE_RELEASE):
            he.check_key(keys, config)
            committed = int(config[HE_COMMIT_ROUND])
            he.sync(context, config, committed)

            def can_train_again() -> bool:
                """Whether this institution's own DP ledger pays for another round."""
                from fedface.privacy import PrivacyBudgetExhausted

                ins = TrainInstructions.from_record(config)
                data = load_client_data(context, ins.data_dir)
                cid = client_id(context)
                plan = plan_for_run(cfg, len(data.y_train), data.num_classes, f"client {cid}")
                try:
                    load_ledger(context, ins, cid).check_next_round(plan)
                except PrivacyBudgetExhausted:
                    return False
                return True

            # Only the run's final model leaves in plaintext (the run config is our own).
            he.check_release(cfg, committed, can_train_again)
            model, _ = he.global_model(context)
            return Message(content=RecordDict({ARRAYS: numpy_record(model)}), reply_to=msg)
        raise ValueError(f"unknown query {sorted(config.keys())}")

    return app


app = build_client_app()
