"""The institution's side of encrypted aggregation (see :mod:`server.encrypted`).

Each institution keeps the global model (and, under PFM, the global momentum) in its
node state, since the server only ever holds ciphertexts. Round by round it encrypts
its update, decrypts the aggregate (one per round) into a pending model, and commits it
when the server names it in the next message. Every institution computes
the same model from the same aggregate, so they stay identical without the server
seeing it; one that missed an exchange says so (``out of sync``) and is excluded.

An institution protects the others too: it proves its own ceremony index at join
(:func:`join_proof`), refuses to decrypt an aggregate of fewer than two institutions'
updates (:data:`MIN_SENDERS`), and releases the plaintext model only at the run's end
(:func:`check_release`).
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from crypto.envelope import Envelope, EnvelopeError, from_record, open_envelope, to_record
from crypto.keys import ClientKeys, load_client_keys
from crypto.packing import float_keys
from crypto.update import (
    AGGREGATE,
    JOIN_PROOF,
    SERVER,
    Quantization,
    decrypt_aggregate,
    encrypt_update,
    prove_join,
)
from fedface.config import RunConfig
from fedface.io import atomic_write
from fedface.momentum import momentum_update
from fedface.protocol import (
    HE_CLIPPED,
    HE_COMMIT_INDEX,
    HE_COMMIT_ROUND,
    HE_COMMIT_TAG,
    HE_FINGERPRINT,
    HE_RUN,
    HE_SCALE,
    HE_WEIGHT_REF,
    NODE_DATA_PATH,
    NODE_HE_KEYS,
    NODE_HE_SENDER,
    NODE_PARTITION_ID,
    NODE_STATE_DIR,
    STATE_DIR,
    numpy_record,
    record_numpy,
)

STATE = "he-state"
GLOBAL = "he-global"
MOMENTUM = "he-momentum"
PENDING = "he-pending-"
PENDING_MOMENTUM = "he-pending-momentum-"
# Fields of the STATE record.
RUN, ROUND, PENDING_ROUND, PENDING_COUNT = "run", "round", "pending-round", "pending-count"
OPENED_ROUND, OPENED_TAG = "opened-round", "opened-tag"
FILE, FINGERPRINT = "file", "fingerprint"  # where the state is saved; the ceremony's key
SAVED_FORMAT = "fedface-he-institution/1"
MIN_SENDERS = 2  # an aggregate of one update is that update: never decrypted


class OutOfSync(RuntimeError):
    """This institution's copy of the global model is not the one the round builds on."""


class KeyMismatch(ValueError):
    """The server holds another key ceremony's keys."""


class ReleaseRefused(PermissionError):
    """The server asked for the plaintext model at a point where it must not have it."""


class AggregateRefused(EnvelopeError):
    """An aggregate this institution will not decrypt: one of fewer than
    :data:`MIN_SENDERS` updates, or another combination of a round's updates."""


@functools.lru_cache(maxsize=8)
def _keys(path: str, sender: int, mtime: float) -> ClientKeys:
    return load_client_keys(path, sender)


def client_keys(cfg: RunConfig, context: Context) -> ClientKeys:
    """This node's keys: node config ``he-keys`` / ``he-sender`` (deployment), else the
    run's ``he-keys`` folder and the partition id (simulation)."""
    return node_keys(context, cfg.he_keys)


def node_keys(context: Context, default_folder: str) -> ClientKeys:
    """This node's ceremony keys: node config ``he-keys`` / ``he-sender``, else
    ``default_folder`` and the partition id (what encrypted training and analytics read)."""
    node = context.node_config
    path = Path(str(node.get(NODE_HE_KEYS, default_folder)))
    if NODE_HE_SENDER in node:
        sender = int(node[NODE_HE_SENDER])
    elif NODE_PARTITION_ID in node:
        sender = int(node[NODE_PARTITION_ID])
    else:
        raise ValueError("Encrypted aggregation: set node config he-sender=K, this "
                         "institution's index in the key ceremony (its folder "
                         "institutions/client_K)")
    stamp = os.path.getmtime(path) if path.exists() else 0.0
    return _keys(str(path), sender, stamp)


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state:
        context.state[STATE] = ConfigRecord({RUN: "", ROUND: -1, PENDING_ROUND: -1,
                                             PENDING_COUNT: 0})
    return context.state[STATE]


def check_key(keys: ClientKeys, config: ConfigRecord) -> None:
    """Refuse a server that holds another ceremony's keys."""
    theirs = str(config.get(HE_FINGERPRINT, ""))
    if theirs != keys.fingerprint:
        raise KeyMismatch(f"key mismatch: the server holds key fingerprint {theirs}, this "
                          f"institution {keys.fingerprint} (generation {keys.generation}); "
                          "both must come from the same `fedface keys init` / rotation")


def join(context: Context, keys: ClientKeys, config: ConfigRecord, initial: ArrayRecord) -> None:
    """Start a run: keep the public initial model as round 0's global model."""
    check_key(keys, config)
    for name in _saved_records(context):  # another run's models
        context.state.pop(name, None)
    context.state[GLOBAL] = initial
    path = state_path(context, str(config.get(STATE_DIR, "")), keys.sender)
    context.state[STATE] = ConfigRecord({RUN: str(config[HE_RUN]), ROUND: 0,
                                         PENDING_ROUND: -1, PENDING_COUNT: 0,
                                         FINGERPRINT: keys.fingerprint,
                                         FILE: str(path) if path is not None else ""})
    save_state(context)


def state_path(context: Context, state_dir: str, sender: int) -> Path | None:
    """Where this institution saves its state of an encrypted run (its global model,
    momentum, round, pending candidate; nothing of it goes to the server), so that a
    resumed run finds it after a restart: node config ``state-dir`` -> ``DIR/he_state.npz``,
    else next to its data, ``<data-path>.he-state.npz``; in simulation the run's state
    folder, ``<state-dir>/he-institution-K/state.npz``; None: kept in memory only."""
    node = context.node_config
    if NODE_STATE_DIR in node:
        return Path(str(node[NODE_STATE_DIR])) / "he_state.npz"
    if NODE_DATA_PATH in node:
        return Path(str(node[NODE_DATA_PATH]) + ".he-state.npz")
    if state_dir and NODE_PARTITION_ID in node:
        # Simulation only (like the DP ledger): a deployed node never saves where the
        # server's instructions say.
        return Path(state_dir) / f"he-institution-{int(sender)}" / "state.npz"
    return None


def _saved_records(context: Context) -> list[str]:
    return [n for n in context.state.array_records
            if n in (GLOBAL, MOMENTUM) or n.startswith(PENDING)]


def save_state(context: Context) -> None:
    """Write this institution's state of the run to its file (atomically: a restart finds
    the previous state or the new one), after every change of its models."""
    state = _state(context)
    path = str(state.get(FILE, ""))
    if not path:
        return
    arrays, order = {}, {}
    for name in _saved_records(context):
        rec = record_numpy(context.state[name])
        order[name] = list(rec)
        arrays.update({f"{name}/{k}": np.asarray(v) for k, v in rec.items()})
    meta = {"format": SAVED_FORMAT, "records": order,
            **{k: v for k, v in state.items() if k != FILE}}
    arrays["state"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _read_saved(path: Path) -> tuple[dict, dict[str, ArrayRecord]]:
    """The saved state record and models of :func:`save_state`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["state"]).decode())
            if meta.pop("format", None) != SAVED_FORMAT:
                raise ValueError(f"not a {SAVED_FORMAT} file")
            records = {name: numpy_record({k: z[f"{name}/{k}"] for k in keys})
                       for name, keys in meta.pop("records").items()}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise OutOfSync(f"out of sync: this institution's saved state {path} is unreadable "
                        f"({err}); it is left out of this run and can join the next") from None
    return meta, records


def rejoin(context: Context, keys: ClientKeys, config: ConfigRecord) -> int:
    """Rejoin a resumed run: restore this institution's own saved state (never anything
    the server sends), commit the candidate the server names if it is pending, and return
    the round now held. One behind the checkpoint's committed round is caught up by the
    server before the next round (:func:`catch_up`); a state of another run or key
    ceremony is refused."""
    check_key(keys, config)
    run = str(config[HE_RUN])
    path = state_path(context, str(config.get(STATE_DIR, "")), keys.sender)
    if path is None or not path.exists():
        where = path or "no state-dir or data-path in its node config"
        raise OutOfSync(f"out of sync: the server resumes encrypted run {run}, but this "
                        f"institution has no saved state of it ({where}): it did not join "
                        "the run or lost its state; it can join the next run")
    saved, records = _read_saved(path)
    if str(saved.get(RUN, "")) != run:
        raise OutOfSync(f"out of sync: this institution's saved state ({path}) belongs to "
                        f"encrypted run {saved.get(RUN)!r}, and the server resumes run {run!r} "
                        "(a checkpoint of another run): refused; it can join the next run")
    if str(saved.get(FINGERPRINT, "")) != keys.fingerprint:
        raise KeyMismatch(f"key mismatch: this institution's saved state of run {run} was "
                          f"made under key fingerprint {saved.get(FINGERPRINT)}, its keys now "
                          f"have {keys.fingerprint} (generation {keys.generation}): a run "
                          "resumes only under the key ceremony it started with")
    for name in [STATE, *_saved_records(context)]:
        context.state.pop(name, None)
    context.state.update(records)
    context.state[STATE] = ConfigRecord({**saved, FILE: str(path)})
    try:
        sync(context, config, int(config[HE_COMMIT_ROUND]))
    except OutOfSync:
        pass  # behind the federation: the server sends the kept aggregates (catch-up)
    return int(_state(context)[ROUND])


def join_proof(keys: ClientKeys, config: ConfigRecord, node_id: int, num_examples: int
               ) -> dict[str, ConfigRecord]:
    """The join reply's proof of this institution's ceremony index and sample count (see
    :func:`crypto.update.prove_join`), as the reply's records: it binds node ``node_id``
    to ``keys.sender`` for the run."""
    return {JOIN_PROOF: ConfigRecord(prove_join(keys, run=str(config[HE_RUN]), node=int(node_id),
                                                num_examples=int(num_examples)))}


def check_release(cfg: RunConfig, committed: int, can_train_again: Callable[[], bool]) -> None:
    """Allow the release of the model of round ``committed`` only at the run's end.

    The end is round ``cfg.rounds`` (this institution's own run config), or, for a run
    stopped because the DP budgets are spent, any earlier round once this institution's
    own ledger cannot pay for another round (``can_train_again()`` is False). Anything
    else would hand the server an intermediate global model.
    """
    if committed == cfg.rounds:
        return
    if 0 < committed < cfg.rounds and cfg.dp_epsilon > 0 and not can_train_again():
        return
    budget = (" and this institution's DP budget still pays for another round"
              if cfg.dp_epsilon > 0 and 0 < committed < cfg.rounds else "")
    raise ReleaseRefused(
        f"release refused: the server asked for the plaintext model of round {committed}, but "
        f"this run has {cfg.rounds} rounds{budget}; institutions release only the final model "
        "(an intermediate one would show the server a global model mid-run)")


def _commit(context: Context, state: ConfigRecord, rnd: int, idx: int) -> None:
    """Make pending candidate ``idx`` of round ``rnd`` this institution's global model."""
    if idx >= int(state[PENDING_COUNT]):
        raise OutOfSync(f"out of sync: candidate {idx} of round {rnd} was never received")
    context.state[GLOBAL] = context.state[f"{PENDING}{idx}"]
    if f"{PENDING_MOMENTUM}{idx}" in context.state:
        context.state[MOMENTUM] = context.state[f"{PENDING_MOMENTUM}{idx}"]
    for i in range(int(state[PENDING_COUNT])):
        context.state.pop(f"{PENDING}{i}", None)
        context.state.pop(f"{PENDING_MOMENTUM}{i}", None)
    state[ROUND], state[PENDING_ROUND], state[PENDING_COUNT] = rnd, -1, 0
    save_state(context)


def sync(context: Context, config: ConfigRecord, needed_round: int) -> None:
    """Commit the candidate the server chose and check we hold round ``needed_round``."""
    state = _state(context)
    if state[RUN] != str(config.get(HE_RUN, "")):
        raise OutOfSync("out of sync: this institution did not join this encrypted run "
                        "(it was unreachable at the start); it can join the next run")
    rnd, idx = int(config[HE_COMMIT_ROUND]), int(config[HE_COMMIT_INDEX])
    if int(state[ROUND]) != rnd and int(state[PENDING_ROUND]) == rnd:
        tag = str(config.get(HE_COMMIT_TAG, ""))
        if tag and int(state.get(OPENED_ROUND, -1)) == rnd and state.get(OPENED_TAG) != tag:
            raise OutOfSync(f"out of sync: the aggregate this institution decrypted for round "
                            f"{rnd} is not the one the server committed (the coordinator "
                            "restarted between the evaluation and its checkpoint); it will not "
                            "decrypt a second aggregate of the round, so it is left out of "
                            "this run and can join the next")
        _commit(context, state, rnd, idx)
    if int(state[ROUND]) != needed_round:
        raise OutOfSync(f"out of sync: this institution holds the global model of round "
                        f"{state[ROUND]}, this step needs round {needed_round} (it missed "
                        "an exchange); the server sends it the missed aggregates")


def catch_up(context: Context, keys: ClientKeys, config: ConfigRecord,
             aggregates: dict[int, ArrayRecord]) -> int:
    """Apply the committed aggregates of the rounds this institution missed, in order.

    Decoding is deterministic, so the result is bit for bit the model (and momentum)
    of the institutions that never missed a round. Returns the round now held.
    """
    state = _state(context)
    target = int(config[HE_COMMIT_ROUND])
    try:
        sync(context, config, target)
        return target
    except OutOfSync:
        if state[RUN] != str(config.get(HE_RUN, "")):
            raise
    have = int(state[ROUND])
    for rnd in sorted(r for r in aggregates if r > have):
        if rnd != have + 1:
            raise OutOfSync(f"out of sync: this institution holds round {have} and the server "
                            f"keeps aggregates from round {min(aggregates)} on; it is left out "
                            "until the next run")
        open_candidates(context, keys, config, [aggregates[rnd]], rnd)
        _commit(context, state, rnd, 0)
        have = rnd
    if have != target:
        raise OutOfSync(f"out of sync: caught up to round {have}, the federation is at {target}")
    return have


def global_model(context: Context) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The global backbone this institution holds, and the global momentum (PFM)."""
    momentum = record_numpy(context.state[MOMENTUM]) if MOMENTUM in context.state else None
    return record_numpy(context.state[GLOBAL]), momentum


def weight_scale(config: ConfigRecord, num_examples: int) -> float:
    """The client's pre-scaling weight ``n_k / he-weight-ref`` (1: uniform weights)."""
    ref = int(config.get(HE_WEIGHT_REF, 0))
    return 1.0 if ref <= 0 else min(1.0, num_examples / ref)


def encrypt(cfg: RunConfig, keys: ClientKeys, config: ConfigRecord, before: dict,
            after: dict, num_examples: int, server_round: int, seed: int, *,
            train_steps: int, masker=None) -> tuple[ArrayRecord, dict]:
    """The update envelope of ``after - before`` and the plaintext metrics it allows.

    The weight scale, ``num_examples`` and ``train_steps`` travel in the envelope's
    authenticated header, where the server reads them; ``he-scale`` and ``he-clipped``
    in the returned metrics are reports only. ``masker``: the masks added before
    encryption (:func:`client.masking.mask_update`, via :func:`crypto.update.encrypt_update`).
    """
    fk = float_keys(before)
    delta = {k: np.asarray(after[k], np.float32) - np.asarray(before[k], np.float32) for k in fk}
    scale = weight_scale(config, num_examples)
    env, info = encrypt_update(keys, delta, fk, Quantization.from_config(cfg), scale=scale,
                               num_examples=int(num_examples), train_steps=int(train_steps),
                               run=str(config[HE_RUN]), server_round=server_round,
                               rng=np.random.default_rng(seed), masker=masker)
    return to_record(env), {HE_SCALE: scale, HE_CLIPPED: info["clipped"]}


def open_candidates(context: Context, keys: ClientKeys, config: ConfigRecord,
                    records: list[ArrayRecord], server_round: int) -> list[dict[str, np.ndarray]]:
    """Decrypt the round's aggregate into the pending global model (a list of one).

    Refused (:class:`AggregateRefused`) before anything is decrypted: more than one
    aggregate for the round, or an aggregate other than the one this institution already
    opened for the round (each would be another combination of the same updates: FV
    under encryption is refused, since ``k + 1`` combinations solve for individual
    updates); an authentic aggregate of fewer than :data:`MIN_SENDERS` institutions
    (:func:`crypto.update.decrypt_aggregate`).
    """
    if len(records) != 1:
        raise AggregateRefused(f"the server sent {len(records)} aggregates for round {server_round}: "
                               "each further one is another combination of the same updates, and "
                               "enough of them reveal individual updates (FV is refused under "
                               "encryption); this institution decrypts one aggregate per round")
    state = _state(context)
    aggregate = records[0] if isinstance(records[0], Envelope) else from_record(records[0])
    if (int(state.get(OPENED_ROUND, -1)) == int(server_round)
            and state.get(OPENED_TAG) != aggregate.tag.hex()):
        raise AggregateRefused(f"a second, different aggregate for round {server_round}: two "
                               "combinations of the same updates reveal more than their sum; "
                               "this institution decrypts one aggregate per round")
    before, held = global_model(context)  # held: the momentum this round started from
    fk = float_keys(before)
    try:
        mean, env = decrypt_aggregate(keys, aggregate, before, fk, run=str(config[HE_RUN]),
                                      server_round=server_round, min_senders=MIN_SENDERS)
    except EnvelopeError as err:
        if _too_few_senders(keys, aggregate, str(config[HE_RUN]), server_round):
            raise AggregateRefused(str(err)) from None
        raise
    state[OPENED_ROUND], state[OPENED_TAG] = int(server_round), env.tag.hex()
    model = dict(before)
    for k in fk:
        model[k] = (np.asarray(before[k], np.float32) + mean[k]).astype(before[k].dtype)
    context.state[f"{PENDING}0"] = numpy_record(model)
    beta = float(env.meta.get("pfm_beta", 0.0))
    if beta > 0:
        m = momentum_update(held, before, model, float(env.meta["lr"]),
                            max(float(env.meta["steps"]), 1.0), beta)
        context.state[f"{PENDING_MOMENTUM}0"] = numpy_record(m)
    state[PENDING_ROUND], state[PENDING_COUNT] = server_round, 1
    save_state(context)
    return [model]


def _too_few_senders(keys: ClientKeys, aggregate: Envelope, run: str, server_round: int) -> bool:
    """Whether a refused aggregate is an authentic one of fewer than :data:`MIN_SENDERS`
    institutions (a release refused), not a tampered or misaddressed envelope."""
    try:
        env = open_envelope(aggregate, kind=AGGREGATE, fingerprint=keys.fingerprint,
                            verify_keys={SERVER: keys.server_verify_key}, run=run,
                            server_round=server_round)
        return len(set(env.meta["senders"])) < MIN_SENDERS
    except (EnvelopeError, KeyError, TypeError):
        return False
