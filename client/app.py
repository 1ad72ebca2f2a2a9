"""fedface ClientApp (Flower Message API).

Each institution receives the global backbone, trains it with its own margin head on its
own faces for the configured local epochs, and replies with the backbone and metrics.
``evaluate`` scores the received backbone on the institution's private validation split
(verification pairs among its held-out identities); only scalar metrics leave.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import (
    build_backbone_only,
    build_models,
    client_config,
    client_id,
    client_seed,
    load_client_data,
    save_head,
    set_threads,
    validation_pairs,
)
from fedface.momentum import MomentumHook
from fedface.protocol import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    FV_PREFIX,
    METRICS,
    MOMENTUM,
    NUM_EXAMPLES,
    TrainInstructions,
    backbone_record,
    load_backbone_record,
)
from fedface.training import train_epochs, verify_pairs


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
        seed = client_seed(cfg, context, ins.server_round)
        torch.manual_seed(seed)
        backbone, head = build_models(cfg, data.num_classes, context, ins)
        load_backbone_record(backbone, msg.content[ARRAYS])
        hook = None
        if ins.pfm_beta > 0 and MOMENTUM in msg.content.array_records:
            # PFM from round 2: momentum-free backbone steps plus the global momentum.
            momentum = {k: a.numpy() for k, a in msg.content[MOMENTUM].items()}
            hook = MomentumHook(backbone, momentum, ins.pfm_beta)
        res = train_epochs(backbone, head, data.x_train, data.y_train,
                           epochs=ins.local_epochs, batch_size=cfg.batch_size, lr=ins.lr,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=seed,
                           global_momentum=hook, proximal_mu=ins.proximal_mu)
        save_head(head, context, ins)
        metrics = MetricRecord({NUM_EXAMPLES: len(data.y_train), "train-loss": res.loss,
                                "train-seconds": res.seconds, "train-steps": res.steps,
                                CLIENT_ID: client_id(context)})
        content = RecordDict({ARRAYS: backbone_record(backbone), METRICS: metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, _, data = setup(msg, context)
        a, b, same = validation_pairs(data, cfg.seed)
        metrics = {NUM_EXAMPLES: int(len(same)), CLIENT_ID: client_id(context)}
        if len(same):
            backbone = build_backbone_only(cfg)
            # The round's model, then any FV candidates (fv-0, fv-1, ...): one score each.
            keys = [ARRAYS] + sorted(k for k in msg.content.array_records if k.startswith(FV_PREFIX))
            for key in keys:
                load_backbone_record(backbone, msg.content[key])
                rep = verify_pairs(backbone, data.x_val, a, b, same, flip=cfg.flip_tta)
                prefix = "val" if key == ARRAYS else key
                metrics.update({f"{prefix}-accuracy": rep["accuracy"], f"{prefix}-auc": rep["auc"]})
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()
