"""fedface ClientApp (Flower Message API).

Each institution receives the global backbone, trains it with its own margin head on its
own faces for the configured local epochs, and replies with the backbone and metrics.
``evaluate`` scores the backbone it receives (and any FV candidates) on the
institution's private validation split (verification pairs among its held-out
identities); only scalar metrics leave.

``train`` and ``evaluate`` are the plain local steps (DP-SGD is part of local
training). Encrypted aggregation, ``client-fixed`` central DP, what a private client
may release and the typed error replies wrap them as Flower mods (:mod:`client.mods`,
where their order is laid out).
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import analytics as analytics_site
from client.mods import ClientMods, typed_errors
from client.privacy import DPSGDRound, released_count
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
from fedface.analytics.wire import ACTION as ANALYTICS_ACTION
from fedface.momentum import momentum_of, seed_momentum
from fedface.protocol import (
    ARRAYS,
    AUC,
    CLIENT_ID,
    CONFIG,
    FV_PREFIX,
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
    record_numpy,
    score_key,
)
from fedface.training import make_optimizer, train_epochs, verify_pairs


def build_client_app(overrides: dict | None = None, analytics: dict | None = None) -> ClientApp:
    """A ClientApp whose settings are Flower's run_config updated by ``overrides``;
    ``analytics`` holds a site's analytics defaults (:class:`client.analytics.SiteSettings`;
    its node config wins)."""
    mods = ClientMods(overrides)
    app = ClientApp(mods=[typed_errors])

    def setup(msg: Message, context: Context):
        """Settings, the round's instructions and this node's data."""
        cfg = client_config(context, overrides)
        set_threads(cfg)
        ins = TrainInstructions.from_record(msg.content[CONFIG])
        return cfg, ins, load_client_data(context, ins.data_dir, cfg)

    @app.train(mods=[mods.dp_release, mods.encryption, mods.central_dp])
    def train(msg: Message, context: Context) -> Message:
        """Local training from the backbone (and PFM momentum) the message carries."""
        cfg, ins, data = setup(msg, context)
        cid = client_id(context)
        # Public seed: shuffling, augmentation (reproducible runs). Everything a privacy
        # guarantee rests on is drawn from this institution's secret instead.
        seed = client_seed(cfg, context, ins.server_round)
        torch.manual_seed(seed)
        dp = DPSGDRound(cfg, context, ins, cid, data)
        backbone, head = build_models(cfg, data.num_classes, context, ins)
        load_backbone_record(backbone, msg.content[ARRAYS])
        # PFM: the backbone's momentum buffer starts at the global momentum (round 1:
        # at zero, like FedAvg); the head keeps its own. Without PFM: plain local SGD.
        pfm = ins.pfm_beta > 0
        opt = make_optimizer(backbone, head, ins.lr, cfg.momentum, cfg.weight_decay,
                             ins.pfm_beta if pfm else None)
        momentum = (record_numpy(msg.content[MOMENTUM])
                    if MOMENTUM in msg.content.array_records else None)
        if pfm and momentum:
            seed_momentum(opt, backbone, momentum)
        kept = head_momentum(context, ins) if pfm else None
        if kept:
            seed_momentum(opt, head, kept)
        private = dp.wrap(backbone, head, opt, data)
        res = train_epochs(backbone, head, data.x_train, data.y_train,
                           epochs=ins.local_epochs, batch_size=cfg.batch_size, lr=ins.lr,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=seed,
                           proximal_mu=ins.proximal_mu, **private)
        save_head(head, context, ins, momentum_of(opt, head) if pfm else None)
        metrics = {NUM_EXAMPLES: released_count(cfg, data), CLIENT_ID: cid, UNIT_WEIGHT: 1,
                   **dp.account(), TRAIN_LOSS: res.loss, TRAIN_SECONDS: res.seconds,
                   TRAIN_STEPS: res.steps}
        content = RecordDict({ARRAYS: backbone_record(backbone), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate(mods=[mods.encryption, mods.dp_release])
    def evaluate(msg: Message, context: Context) -> Message:
        """Scores of the round's model and of any FV candidates (``fv-1``, ...) the
        message carries, on this institution's validation pairs."""
        cfg, ins, data = setup(msg, context)
        a, b, same = validation_pairs(data, cfg.seed)
        metrics = {NUM_EXAMPLES: int(len(same)), CLIENT_ID: client_id(context)}
        candidates = {0: ARRAYS} if ARRAYS in msg.content.array_records else {}
        candidates.update({int(k[len(FV_PREFIX):]): k for k in sorted(msg.content.array_records)
                           if k.startswith(FV_PREFIX)})
        if len(same) and candidates:
            backbone = build_backbone_only(cfg)
            for i, key in candidates.items():
                load_backbone_record(backbone, msg.content[key])
                rep = verify_pairs(backbone, data.x_val, a, b, same, flip=cfg.flip_tta)
                metrics.update({score_key(i): rep["accuracy"], score_key(i, AUC): rep["auc"]})
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query(mods=[mods.encryption])
    def query(msg: Message, context: Context) -> Message:
        """Queries (join, catch-up, release) belong to encrypted aggregation, which
        answers them (:meth:`client.mods.ClientMods.encryption`); none reach this."""
        raise ValueError("query messages are part of encrypted aggregation, which this "
                         "run does not use")

    @app.query(ANALYTICS_ACTION)
    def analytics_query(msg: Message, context: Context) -> Message:
        """One step of an encrypted analytics query (:mod:`client.analytics`)."""
        site = analytics_site.SiteSettings.of(context, analytics)
        return Message(content=analytics_site.handle(context, site, msg.content), reply_to=msg)

    return app


app = build_client_app()
