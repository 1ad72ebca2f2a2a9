"""The one message schema shared by the ServerApp, the ClientApp and (later) crypto.

Every train/evaluate message is a Flower ``RecordDict`` with these keys:

- ``ARRAYS`` (``"arrays"``): ``ArrayRecord`` of the federated backbone, keyed like its
  ``state_dict``. The head never travels.
- ``CONFIG`` (``"config"``): ``ConfigRecord`` with the round's settings (:class:`TrainInstructions`).
- ``METRICS`` (``"metrics"``): ``MetricRecord`` in replies, always with ``num-examples``
  ``client-id`` (the partition or node id; replies are aggregated in its order so
  that runs are reproducible) and ``unit-weight`` (1: uniform weights under central DP);
  with DP-SGD also ``dp-epsilon`` (spent so far), ``dp-delta`` and ``dp-noise``.
- ``MOMENTUM`` (``"momentum"``): PFM's global momentum, same keys as the backbone.
- FV candidates travel as ``fv-0``, ``fv-1``, ... ``ArrayRecord``s in evaluate messages.

Under encrypted aggregation (``he-keys``, see :mod:`server.encrypted`) ``arrays`` and the
``fv-*`` records hold envelopes (:mod:`crypto.envelope`) instead of plaintext arrays:
clients reply an update envelope, evaluate messages carry aggregate envelopes, train
messages carry none; the ``he-*`` config keys below keep clients in step, and replies
add ``he-scale`` (the client's weight pre-scaling) and ``he-clipped`` to their metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedface.config import RunConfig

_RUN_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
MOMENTUM = "momentum"
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
UNIT_WEIGHT = "unit-weight"  # 1 in every reply: uniform aggregation (central DP)
FV_PREFIX = "fv-"
HE_RUN = "he-run"  # id of the encrypted run (envelopes of other runs are replays)
HE_JOIN = "he-join"  # query: start of a run (public initial model, key and size check)
HE_REJOIN = "he-rejoin"  # with he-join: a resumed run (each restores its own saved state)
HE_RELEASE = "he-release"  # query: return the final model in plaintext
HE_CATCH_UP = "he-catch-up"  # query: the committed aggregates of rounds a client missed
HE_ROUND_PREFIX = "he-r"  # their records: he-r00003, ...
HE_MASK = "he-mask"  # ConfigRecord of a mask message, both ways (client/masking.py)
HE_MASK_ADVERT = "he-mask-advert"  # ConfigRecord of a reply: an epoch key and its shares
HE_MASK_SETUP = "he-mask-setup"  # query: the members and the neighbours' run keys
HE_UNMASK = "he-unmask"  # query: the survivors; reply the shares asked
HE_MASK_EPOCH = "he-mask-epoch"  # config of a catch-up: advertise a key for this epoch
HE_MASK_SESSION = "he-mask-session"  # config: the masks' session (one per join or rejoin)
OUT_OF_SYNC = "out of sync"  # starts the error of a client that missed an exchange
HE_FINGERPRINT = "he-fingerprint"  # the server's key fingerprint
HE_WEIGHT_REF = "he-weight-ref"  # clients pre-scale updates by n_k / ref (0: uniform)
HE_COMMIT_ROUND = "he-commit-round"  # the round and FV candidate every client must hold
HE_COMMIT_INDEX = "he-commit-index"
HE_COMMIT_TAG = "he-commit-tag"  # the signature (hex) of the committed round's aggregate
HE_SCALE = "he-scale"
# Starts the error of a client that declines a round because its privacy budget is spent.
DP_BUDGET_SPENT = "privacy budget exhausted"

# Reply metrics.
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_STEPS = "train-steps"
DP_EPSILON_SPENT = "dp-epsilon"  # epsilon this client has spent so far (its ledger)
DP_DELTA = "dp-delta"
DP_NOISE = "dp-noise"
HE_CLIPPED = "he-clipped"
# What a client under DP (DP-SGD or central DP) may send besides its (private) model
# update: counts the accounting treats as public, ids, and its own accounting. The train
# loss, the update's norm, the share of values clipped by the packing, timings and
# validation scores of its private people are functions of private data outside any
# accounting, so they never leave such a client (see README, threat model).
DP_RELEASABLE = frozenset({NUM_EXAMPLES, CLIENT_ID, UNIT_WEIGHT, TRAIN_STEPS, DP_EPSILON_SPENT,
                           DP_DELTA, DP_NOISE, HE_SCALE})

# More reply metrics: validation scores (``val-accuracy``; FV candidate i: ``fv-i-accuracy``,
# see :func:`score_key`) and the encrypted protocol's bookkeeping.
VAL_PREFIX = "val"
ACCURACY = "accuracy"
AUC = "auc"
HE_ROUND = "he-round"  # the round a client holds after a catch-up
HE_CLIENTS = "he-clients"  # updates in an aggregate (strategy metrics)
HE_BYTES = "he-bytes"

# Config keys the server sets besides TrainInstructions' own fields.
PFM_BETA = "pfm-beta"
PROXIMAL_MU = "proximal-mu"
DATA_DIR = "data-dir"
STATE_DIR = "state-dir"


def score_key(candidate: int, metric: str = ACCURACY) -> str:
    """Metric key of a validation score: ``val-<metric>`` for the round's model
    (candidate 0), ``fv-<i>-<metric>`` for FV candidate ``i``."""
    return f"{VAL_PREFIX}-{metric}" if candidate == 0 else f"{FV_PREFIX}{candidate}-{metric}"


# Typed error replies: a client that declines or cannot serve a message replies
# ``Message(Error(code=..., reason=...), reply_to=msg)`` with one of these codes (Flower's
# own codes are below 100), so the server acts on the code, never on the reason's text.
ERR_CLIENT = 4100  # any other failure of the client (its reason says what)
ERR_DP_BUDGET_SPENT = 4101  # declines: the next round would overspend its privacy budget
ERR_OUT_OF_SYNC = 4102  # missed an exchange of an encrypted run: catch it up
ERR_PRIVACY_REFUSED = 4103  # the run asks what the institution does not allow
ERR_KEY_MISMATCH = 4104  # the server holds another key ceremony's keys
ERR_RELEASE_REFUSED = 4105  # a release it will not make (before the end, one update)
ERR_MASK_REFUSED = 4106  # a mask message it will not use (crypto.masks: the reason says)
ERR_MASK_RELEASED = 4107  # its update was unmasked in another sum already: never twice
ERR_QUERY_REFUSED = 4108  # an analytics query the site cannot or will not answer (schema, key, ...)
ERR_QUERY_BUDGET = 4109  # an analytics query that would overspend the site's privacy budget

# Node config keys (``flower-supernode --node-config "k=v ..."``; the simulation sets the
# partition ones).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_PATH = "data-path"
NODE_STATE_DIR = "state-dir"
NODE_DP_EPSILON = "dp-epsilon"  # the most epsilon this institution allows a run to spend
NODE_DP_DELTA = "dp-delta"  # the largest delta it allows
NODE_DP_UNIT = "dp-unit"  # "person": it allows only person-level DP-SGD
NODE_FEDERATION_SIZE = "federation-size"  # institutions in the federation, as it knows it
NODE_HE_KEYS = "he-keys"  # the institution's key folder (encrypted runs)
NODE_HE_SENDER = "he-sender"  # its index in the key ceremony
NODE_ANONYMIZE = "anonymize"  # the site's own anonymizer: applied whatever the run says
NODE_ANONYMIZE_PRESET = "anonymize-preset"  # and its strength
NODE_ANALYTICS_TABLE = "analytics-table"  # the site's table for analytics queries (CSV, SQLite)
NODE_ANALYTICS_BUDGET = "analytics-budget"  # epsilon the site spends on queries, all together
NODE_ANALYTICS_EXACT = "analytics-exact"  # whether it answers queries without DP noise
NODE_ANALYTICS_MAX_DELTA = "analytics-max-delta"  # the largest delta of a DP query it answers
NODE_CONFIG_KEYS = (NODE_PARTITION_ID, NODE_NUM_PARTITIONS, NODE_DATA_PATH, NODE_STATE_DIR,
                    NODE_DP_EPSILON, NODE_DP_DELTA, NODE_DP_UNIT, NODE_FEDERATION_SIZE,
                    NODE_HE_KEYS, NODE_HE_SENDER, NODE_ANONYMIZE, NODE_ANONYMIZE_PRESET,
                    NODE_ANALYTICS_TABLE, NODE_ANALYTICS_BUDGET, NODE_ANALYTICS_EXACT,
                    NODE_ANALYTICS_MAX_DELTA)


@dataclass
class TrainInstructions:
    """What the server tells clients each round (carried in the ``config`` record).

    ``lr`` and ``local_epochs`` default to :class:`fedface.config.RunConfig`'s own
    defaults (one source). ``pfm_beta`` and ``proximal_mu`` are not the run's settings
    but what the *strategy* asks of this round: 0 means "no PFM momentum" and "no
    proximal term"; :class:`server.strategies.PFM` and FedProx set them.
    """

    server_round: int = 1
    lr: float = _RUN_DEFAULTS["lr"]
    local_epochs: int = _RUN_DEFAULTS["local_epochs"]
    data_dir: str = ""
    state_dir: str = ""
    pfm_beta: float = 0.0
    proximal_mu: float = 0.0
    sampled_clients: int = 1

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k.replace("_", "-"): v for k, v in asdict(self).items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        known = {f.replace("_", "-") for f in cls.__dataclass_fields__}
        return cls(**{k.replace("-", "_"): v for k, v in record.items() if k in known})


def record_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of an ``ArrayRecord`` as ``{name: numpy array}`` (order kept)."""
    return {k: a.numpy() for k, a in record.items()}


def backbone_record(module: nn.Module) -> ArrayRecord:
    """The federated part of a model as an ``ArrayRecord`` (detached copies)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in module.state_dict().items()})


def numpy_record(arrays) -> ArrayRecord:
    """``ArrayRecord`` from a mapping of name to numpy array (order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def load_backbone_record(module: nn.Module, record: ArrayRecord) -> None:
    """Load an ``ArrayRecord`` into ``module``; a mismatch names the keys and shapes."""
    state = record.to_torch_state_dict()
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            "Received backbone does not match this client's model: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} "
            f"wrong_shape={[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}. "
            "Check that server and clients use the same --backbone, --embedding-size "
            "and --image-size"
        )
    module.load_state_dict(state)


def weighted_metric(replies, key: str, weight_key: str = NUM_EXAMPLES) -> float | None:
    """Weighted mean of metric ``key`` over replies (``num-examples`` weights, or the
    aggregation's own ``weight_key``, e.g. ``unit-weight`` under central DP).

    Error replies, replies without ``key`` and replies with no weight are left out;
    None when nothing remains.
    """
    num = den = 0.0
    for m in replies:
        if m.has_error():
            continue
        rec = m.content[METRICS]
        n = float(rec.get(weight_key, 0) or 0)
        if key in rec and n > 0:
            num += float(rec[key]) * n
            den += n
    return num / den if den else None


def error_reason(msg) -> str:
    """What went wrong in a client's error reply, without the transport's wrapping.

    The simulation engine wraps a client's exception in Ray's and Flower's own
    ("<class 'ray...'>:<'... Message: the client's text'>"); the client's text is kept.
    """
    reason = str(msg.error.reason)
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    return reason.strip().rstrip(">").rstrip("'").strip()


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (model payload, without protocol framing)."""
    total = 0
    for rec in content.array_records.values():
        total += rec.count_bytes()
    return total
