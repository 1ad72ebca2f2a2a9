"""What wraps a client's plain train and evaluate: Flower mods.

A mod is ``mod(msg, context, call_next) -> Message`` (the pattern of Flower's
``fixedclipping_mod`` and ``secaggplus_mod``): it may change the message on its way in
and the reply on its way out. Each reads the run config and hands the message on
untouched when its capability is off. Per handler, outermost first:

- train: ``typed_errors`` -> ``dp_release`` -> ``encryption`` -> ``central_dp`` -> local training.
  The update is clipped and noised (``client-fixed``) before it is encrypted, and the
  reply's metrics are filtered last, after encryption added its own.
- evaluate: ``typed_errors`` -> ``encryption`` -> ``dp_release`` -> local scoring. The
  aggregate is decrypted first (always, to stay in step), then, under DP, no model
  reaches the scoring.
- query: ``typed_errors`` -> ``encryption`` (join, catch-up, release);
- query.analytics: ``typed_errors`` -> :func:`client.analytics.handle` (a site's side of
  an encrypted analytics query).

``typed_errors`` turns an exception into ``Message(Error(code, reason), reply_to=msg)``
with a code of :mod:`fedface.protocol` (:data:`ERROR_CODES`) and the exception's text.
"""

from __future__ import annotations

import copy
import traceback
from logging import ERROR, WARNING

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from client import he, masking
from client.privacy import (
    CLIENT_FIXED,
    SEED_CENTRAL_NOISE,
    SEED_HE_ROUNDING,
    can_train_again,
    central_dp_share,
    check_sampled_clients,
    federation_size,
    mask_releases_path,
    private_run,
    private_seeds,
    released_count,
)
from client.task import client_config, client_id, load_client_data
from crypto.masks import MaskError, MaskSettings
from fedface.analytics.privacy import BudgetExhausted
from fedface.analytics.query import QueryError
from fedface.anonymize.ksame import NotEnoughFacesError
from fedface.config import RunConfig
from fedface.privacy import PrivacyBudgetExhausted, PrivacyConfigError
from fedface.protocol import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    DATA_DIR,
    DP_RELEASABLE,
    ERR_CLIENT,
    ERR_DP_BUDGET_SPENT,
    ERR_KEY_MISMATCH,
    ERR_MASK_REFUSED,
    ERR_MASK_RELEASED,
    ERR_OUT_OF_SYNC,
    ERR_PRIVACY_REFUSED,
    ERR_QUERY_BUDGET,
    ERR_QUERY_REFUSED,
    ERR_RELEASE_REFUSED,
    FV_PREFIX,
    HE_CATCH_UP,
    HE_COMMIT_ROUND,
    HE_JOIN,
    HE_MASK,
    HE_MASK_ADVERT,
    HE_MASK_EPOCH,
    HE_MASK_SESSION,
    HE_MASK_SETUP,
    HE_REJOIN,
    HE_RELEASE,
    HE_ROUND,
    HE_ROUND_PREFIX,
    HE_UNMASK,
    METRICS,
    MOMENTUM,
    NODE_HE_KEYS,
    NUM_EXAMPLES,
    TRAIN_STEPS,
    TrainInstructions,
    numpy_record,
    record_numpy,
)

# Exception -> error code of the reply (the first match; anything else: ERR_CLIENT).
ERROR_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (PrivacyBudgetExhausted, ERR_DP_BUDGET_SPENT),
    (he.OutOfSync, ERR_OUT_OF_SYNC),
    ((PrivacyConfigError, NotEnoughFacesError), ERR_PRIVACY_REFUSED),
    (he.KeyMismatch, ERR_KEY_MISMATCH),
    ((he.ReleaseRefused, he.AggregateRefused), ERR_RELEASE_REFUSED),
    (masking.MaskReleased, ERR_MASK_RELEASED),
    (MaskError, ERR_MASK_REFUSED),
    (BudgetExhausted, ERR_QUERY_BUDGET),
    (QueryError, ERR_QUERY_REFUSED),
)


def _mask_settings(cfg: RunConfig) -> MaskSettings:
    return MaskSettings(degree=cfg.he_mask_degree, threshold=cfg.he_mask_threshold)


def _releases(context: Context, config) -> masking.Releases:
    """The institution's record of its masks' releases, in its state folder (the join's
    folders name it in simulation; a deployed node's own node config otherwise)."""
    path = context.state.config_records.get("he-mask-releases-path")
    if path is None:
        ins = TrainInstructions.from_record(config)
        where = mask_releases_path(context, ins, client_id(context))
        path = ConfigRecord({"path": str(where or "")})
        context.state["he-mask-releases-path"] = path
    return masking.Releases(context, str(path["path"]))


def _session(config) -> str:
    """The masks' session the server names (one per join or rejoin of the run)."""
    session = str(config.get(HE_MASK_SESSION, ""))
    if not session:
        raise MaskError("the server names no mask session: this institution masks its updates "
                        "(he-masks=true); the server runs an older fedface or without masks")
    return session


def error_code(err: BaseException) -> int:
    """The reply's error code for ``err`` (see :data:`ERROR_CODES`)."""
    return next((code for kind, code in ERROR_CODES if isinstance(err, kind)), ERR_CLIENT)


def typed_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Reply a typed error instead of raising: a client that declines or fails says why
    with a code the server acts on (the reason is the exception's own text)."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every failure becomes the reply's error
        code = error_code(err)
        if code == ERR_CLIENT:
            log(ERROR, "ClientApp failed: %s\n%s", err, traceback.format_exc())
        else:
            log(WARNING, "ClientApp declines (code %d): %s", code, err)
        return Message(Error(code=code, reason=str(err)), reply_to=msg)


def _with_content(msg: Message, content: RecordDict) -> Message:
    """The message to hand on: ``msg``'s metadata (a reply to it replies to ``msg``) with
    ``content``; ``msg`` itself is left as it came."""
    return Message(content=content, metadata=copy.copy(msg.metadata))


def _records(msg: Message, drop=(), **add) -> RecordDict:
    """The message's records without the names in ``drop``, plus ``add``."""
    kept = {k: v for k, v in msg.content.items() if k not in drop}
    return RecordDict({**kept, **add})


class ClientMods:
    """The mods of a ClientApp whose settings are the run config updated by ``overrides``
    (see :func:`client.app.build_client_app`)."""

    def __init__(self, overrides: dict | None = None) -> None:
        self.overrides = overrides

    def config(self, context: Context) -> RunConfig:
        return client_config(context, self.overrides)

    # ------------------------------------------------------------------ DP releases
    def dp_release(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Under DP (DP-SGD or central DP) nothing outside the accounting leaves: the
        reply's metrics are cut to :data:`fedface.protocol.DP_RELEASABLE`, and no model
        reaches the validation scoring (its people's scores are an unaccounted release;
        DP-SGD does not even train on them)."""
        if not private_run(self.config(context), context.node_config):
            return call_next(msg, context)
        if msg.metadata.message_type == MessageType.EVALUATE:
            models = [k for k in msg.content.array_records if k == ARRAYS or k.startswith(FV_PREFIX)]
            msg = _with_content(msg, _records(msg, drop=models))
        reply = call_next(msg, context)
        if not reply.has_error() and METRICS in reply.content.metric_records:
            metrics = reply.content[METRICS]
            kept = {k: v for k, v in metrics.items() if k in DP_RELEASABLE}
            if msg.metadata.message_type == MessageType.EVALUATE:
                kept[NUM_EXAMPLES] = 1  # the count of its private validation pairs stays
            reply.content[METRICS] = MetricRecord(kept)
        return reply

    # ------------------------------------------------------------------ central DP
    def central_dp(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """``client-fixed`` central DP: clip the trained update and add this client's
        noise share, drawn from the institution's secret. Refuses a ``sampled-clients``
        larger than the federation it knows (it would shrink the share)."""
        cfg = self.config(context)
        if msg.metadata.message_type != MessageType.TRAIN or cfg.central_dp != CLIENT_FIXED:
            return call_next(msg, context)
        ins = TrainInstructions.from_record(msg.content[CONFIG])
        ceremony = he.client_keys(cfg, context).clients if cfg.encrypted else 0
        check_sampled_clients(ins, federation_size(context.node_config, ceremony))
        before = record_numpy(msg.content[ARRAYS])
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        after = record_numpy(reply.content[ARRAYS])
        seed = private_seeds(context, ins, client_id(context), cfg.computation(), before,
                             after).of(SEED_CENTRAL_NOISE)
        reply.content[ARRAYS] = numpy_record(central_dp_share(cfg, ins, before, after, seed))
        return reply

    # ------------------------------------------------------------------ encryption
    def encryption(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Encrypted aggregation (:mod:`client.he`): train from this institution's own copy
        of the global model and send the update encrypted; decrypt the round's aggregate
        before scoring; answer the join, catch-up and release queries."""
        cfg = self.config(context)
        if not cfg.encrypted:
            if NODE_HE_KEYS in context.node_config:
                raise PrivacyConfigError(
                    "this institution sends its updates encrypted only (node config he-keys) "
                    "and the run does not use encrypted aggregation: refused; run with "
                    "--he-keys, or start the node without he-keys")
            return call_next(msg, context)
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return self._query(cfg, he.client_keys(cfg, context), msg, context)
        config = msg.content[CONFIG]
        ins = TrainInstructions.from_record(config)
        # A client without its data says so first: that is why it is not in step.
        load_client_data(context, ins.data_dir, cfg)
        keys = he.client_keys(cfg, context)
        he.check_key(keys, config)
        he.sync(context, config, ins.server_round - 1)
        if kind == MessageType.TRAIN:
            return self._train(cfg, keys, ins, msg, context, call_next)
        if kind == MessageType.EVALUATE:
            names = [ARRAYS] + sorted(k for k in msg.content.array_records if k.startswith(FV_PREFIX))
            (model,) = he.open_candidates(context, keys, config, [msg.content[k] for k in names],
                                          ins.server_round)
            msg = _with_content(msg, _records(msg, drop=names, **{ARRAYS: numpy_record(model)}))
        return call_next(msg, context)

    @staticmethod
    def _train(cfg: RunConfig, keys, ins: TrainInstructions, msg: Message, context: Context,
               call_next: ClientAppCallable) -> Message:
        start, momentum = he.global_model(context)  # this institution's own copies
        held = {ARRAYS: numpy_record(start)}
        if momentum is not None:
            held[MOMENTUM] = numpy_record(momentum)
        reply = call_next(_with_content(msg, _records(msg, drop=(ARRAYS, MOMENTUM), **held)),
                          context)
        if reply.has_error():
            return reply
        metrics = reply.content[METRICS]
        after = record_numpy(reply.content[ARRAYS])
        seeds = private_seeds(context, ins, client_id(context), cfg.computation(), start, after)
        seed = seeds.of(SEED_HE_ROUNDING)
        masker, shares = None, {}
        if cfg.he_masks:  # masks that cancel only in the round's sum (client/masking.py)
            doc = masking.unpack_doc(msg.content.config_records.get(HE_MASK),
                                     "mask instructions (this institution masks its updates, "
                                     "he-masks=true; the server sent none)")

            def masker(shape, t):
                # The update's identity: the digest of every input that determines it.
                mask, meta, shares[HE_MASK] = masking.mask_update(
                    context, keys, _session(msg.content[CONFIG]), doc, shape, t,
                    ins.server_round, seeds.inputs.hex())
                return mask, meta
        record, extra = he.encrypt(cfg, keys, msg.content[CONFIG], start, after,
                                   int(metrics[NUM_EXAMPLES]),
                                   ins.server_round, seed, train_steps=int(metrics[TRAIN_STEPS]),
                                   masker=masker)
        reply.content[ARRAYS] = record  # the update leaves encrypted (and masked)
        for name, rec in shares.items():
            reply.content[name] = rec
        reply.content[METRICS] = MetricRecord({**metrics, **extra})
        return reply

    @staticmethod
    def _query(cfg: RunConfig, keys, msg: Message, context: Context) -> Message:
        """Join (key and size check, initial model) or rejoin a resumed run (own saved
        state, the round held), catch up, release."""
        config = msg.content[CONFIG]
        if config.get(HE_JOIN):
            data = load_client_data(context, str(config.get(DATA_DIR, "")), cfg)
            metrics = {NUM_EXAMPLES: released_count(cfg, data), CLIENT_ID: client_id(context)}
            if config.get(HE_REJOIN):
                metrics[HE_ROUND] = he.rejoin(context, keys, config)
            else:
                he.join(context, keys, config, msg.content[ARRAYS])
            # The proof binds this node to its ceremony index (and sample count) for the run.
            proof = he.join_proof(keys, config, context.node_id, len(data.y_train))
            if cfg.he_masks:  # the run key that seals this institution's shares
                proof[HE_MASK] = masking.run_advert(context, keys, _session(config),
                                                    _releases(context, config))
            return Message(RecordDict({METRICS: MetricRecord(metrics), **proof}), reply_to=msg)
        if config.get(HE_MASK_SETUP) or config.get(HE_UNMASK):
            he.check_key(keys, config)
            run = _session(config)
            doc = masking.unpack_doc(msg.content.config_records.get(HE_MASK), "mask message")
            if config.get(HE_MASK_SETUP):
                advert = masking.setup(context, keys, run, doc, _mask_settings(cfg))
                return Message(RecordDict({HE_MASK_ADVERT: advert}), reply_to=msg)
            shares = masking.unmask(context, keys, run, doc, _releases(context, config))
            advert = masking.advertise(context, keys, run, int(config[HE_MASK_EPOCH]))
            return Message(RecordDict({HE_MASK: shares, HE_MASK_ADVERT: advert}), reply_to=msg)
        if config.get(HE_CATCH_UP):
            he.check_key(keys, config)
            aggregates = {int(k[len(HE_ROUND_PREFIX):]): rec
                          for k, rec in msg.content.array_records.items()
                          if k.startswith(HE_ROUND_PREFIX)}
            held = he.catch_up(context, keys, config, aggregates)
            out = RecordDict({METRICS: MetricRecord({HE_ROUND: held})})
            if HE_MASK_EPOCH in config:  # a key for the coming exchange, which it missed
                out[HE_MASK_ADVERT] = masking.advertise(context, keys, _session(config),
                                                        int(config[HE_MASK_EPOCH]))
            return Message(out, reply_to=msg)
        if config.get(HE_RELEASE):
            he.check_key(keys, config)
            committed = int(config[HE_COMMIT_ROUND])
            he.sync(context, config, committed)

            def budget_left() -> bool:
                ins = TrainInstructions.from_record(config)
                return can_train_again(cfg, context, ins, load_client_data(context, ins.data_dir, cfg))

            # Only the run's final model leaves in plaintext (the run config is our own).
            he.check_release(cfg, committed, budget_left)
            model, _ = he.global_model(context)
            return Message(RecordDict({ARRAYS: numpy_record(model)}), reply_to=msg)
        raise ValueError(f"unknown query {sorted(config.keys())}")
