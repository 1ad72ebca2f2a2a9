"""Encrypt a model update, add encrypted updates, decrypt an aggregate: the one path.

Clients call :func:`encrypt_update` (flatten, pre-scale by their weight, clip, quantize,
pack, encrypt, seal) and :func:`decrypt_aggregate` (open, decrypt, unpack, dequantize
to the weighted mean update). The server calls :func:`open_update` on every reply and
:func:`add_updates`, which checks that the updates share one layout and spec, and
returns the ``sum_k m_k * update_k`` envelope signed with the server's own private key
(Ed25519, :mod:`crypto.signing`). It never decrypts.

Every envelope is signed by its sender alone: institution K signs its updates with its
own private key, which nobody else holds, and everyone checks them with K's public key.
The server therefore cannot forge an institution's update (it holds public keys only),
and an institution cannot forge an aggregate or another institution's update.

What drives the aggregation travels inside the authenticated header, never in
plaintext metrics: an update's ``meta`` holds its ``scale`` (the client's weight
pre-scaling), ``num-examples`` and ``train-steps`` (:data:`UPDATE_META`), which the
server uses for the multipliers, the weight sum and PFM's step count.

At the start of a run each institution proves its ceremony index with
:func:`prove_join` (its Ed25519 signature over the run, its Flower node id, its index,
its sample count and the key fingerprint); the server checks it with :func:`verify_join`
under that index's public key and then accepts from that node only envelopes of that
sender.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from crypto.envelope import Envelope, EnvelopeError, open_envelope, seal_envelope
from crypto.keys import ClientKeys, ServerKeys
from crypto.masks import add_mod
from crypto.packing import (
    Layout,
    dequantize_sum,
    error_bound,
    flatten,
    make_layout,
    pack,
    quantize,
    spec_digest,
    unflatten,
    unpack,
)
from crypto.signing import SignatureError, sign, verify

UPDATE = "update"
AGGREGATE = "aggregate"
SERVER = "server"
SCALE = "scale"
NUM_EXAMPLES = "num-examples"
TRAIN_STEPS = "train-steps"
MASK_EPOCH = "mask-epoch"  # in a masked update's meta (crypto.masks)
UPDATE_META = (SCALE, NUM_EXAMPLES, TRAIN_STEPS)  # authenticated, required in every update
JOIN_PROOF = "he-join-proof"  # the ConfigRecord of a join reply: sender, num-examples, tag
# (the tag: the institution's Ed25519 signature over the join message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _check_update_meta(env: Envelope) -> None:
    meta, sender = env.meta, env.header["sender"]
    if not _is_int(sender) or sender < 0:
        raise EnvelopeError(f"update envelope sender {sender!r}: must be the institution's index")
    checks = {SCALE: ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
              NUM_EXAMPLES: ("a positive integer", lambda v: _is_int(v) and v > 0),
              TRAIN_STEPS: ("a non-negative integer", lambda v: _is_int(v) and v >= 0)}
    for name, (what, ok) in checks.items():
        if name not in meta:
            raise EnvelopeError(f"update of sender {sender} lacks the authenticated meta field "
                                f"{name!r}: the client runs an older fedface; upgrade it")
        if not ok(meta[name]):
            raise EnvelopeError(f"update of sender {sender}: meta field {name!r} must be {what}, "
                                f"got {meta[name]!r}")


def _check_aggregate_meta(env: Envelope) -> None:
    meta = env.meta
    checks = {"senders": ("a list of sender indices",
                          lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
              "multiplier_sum": ("a positive integer", lambda v: _is_int(v) and v > 0),
              "weight_sum": ("a positive number", lambda v: _is_number(v) and v > 0)}
    for name, (what, ok) in checks.items():
        if name not in meta or not ok(meta[name]):
            raise EnvelopeError(f"aggregate meta field {name!r} must be {what}, got "
                                f"{meta.get(name)!r}")
    for name in ("lr", "steps", "pfm_beta"):
        if name in meta and not _is_number(meta[name]):
            raise EnvelopeError(f"aggregate meta field {name!r} must be a number, got "
                                f"{meta[name]!r}")


@dataclass(frozen=True)
class Quantization:
    """Run settings of the packing (``he-bits``, ``he-clip``, ``he-max-clients``).

    Parameters
    ----------
    bits : int (default: 15)
        Quantization bits per value.
    clip : float (default: 0.5)
        Values of the (pre-scaled) update are clipped to ``[-clip, clip]``.
    max_clients : int (default: 16)
        Largest number of updates summed in one aggregate (sets the headroom).
    max_multiplier : int (default: 1)
        Largest plaintext integer the server multiplies an update by. Runs use 1: FV's
        candidate weightings, which needed more, are refused under encryption.
    """

    bits: int = 15
    clip: float = 0.5
    max_clients: int = 16
    max_multiplier: int = 1

    @classmethod
    def from_config(cls, cfg) -> Quantization:
        """The packing of a run (a ``RunConfig``). No multiplier headroom: FV (the one user
        of ``he_fv_bits``) is refused with ``he_keys``."""
        if cfg.fv:
            raise ValueError("fv with he_keys is refused (see RunConfig._encryption_problems)")
        return cls(bits=cfg.he_bits, clip=cfg.he_clip, max_clients=cfg.he_max_clients,
                   max_multiplier=1)

    def layout(self, length: int, keys) -> Layout:
        p = keys.context.params
        return make_layout(length, self.bits, self.clip, self.max_clients, self.max_multiplier,
                           p.slots, p.plain_bits)


def encrypt_update(keys: ClientKeys, delta: dict[str, np.ndarray], float_keys: list[str],
                   quant: Quantization, *, scale: float, num_examples: int, train_steps: int,
                   run: str, server_round: int, rng: np.random.Generator,
                   meta: dict | None = None,
                   masker: Callable[[tuple[int, int], int], tuple[np.ndarray, dict]] | None = None
                   ) -> tuple[Envelope, dict]:
    """Envelope of ``scale * delta`` and what the client may report in plaintext.

    ``scale``, ``num_examples`` and ``train_steps`` go into the authenticated ``meta``
    of the header: the server aggregates with them (multipliers, weights, PFM's steps).
    ``masker(shape, t)`` returns the mask to add to the packed slots (modulo the
    plaintext modulus ``t``, :mod:`crypto.masks`) and the meta that goes with it.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"update scale {scale} must be in (0, 1]")
    if int(num_examples) < 1 or int(train_steps) < 0:
        raise ValueError(f"num_examples={num_examples} must be >= 1 and train_steps="
                         f"{train_steps} >= 0")
    vector = flatten(delta, float_keys) * np.float32(scale)
    layout = quant.layout(vector.size, keys)
    codes, clipped = quantize(vector, layout, rng)
    slots = pack(codes, layout)
    if masker is not None:
        t = keys.context.plain_modulus
        mask, mask_meta = masker(slots.shape, t)
        slots = add_mod(slots, mask, t)
        meta = {**(meta or {}), **mask_meta}
    chunks = keys.context.encrypt(slots)
    env = seal_envelope(UPDATE, chunks, sign_key=keys.sign_key, fingerprint=keys.fingerprint,
                        generation=keys.generation, params=keys.context.params.to_dict(),
                        run=run, server_round=server_round, sender=keys.sender,
                        layout=layout.to_dict(), spec=spec_digest(delta, float_keys),
                        meta={**(meta or {}), SCALE: float(scale),
                              NUM_EXAMPLES: int(num_examples), TRAIN_STEPS: int(train_steps)})
    return env, {"clipped": clipped, "scale": float(scale)}


def open_update(keys: ServerKeys, record, *, run: str, server_round: int) -> Envelope:
    """Verify one client's update envelope on the server (its sender's signature, key,
    run, round, and the authenticated ``meta`` the aggregation reads: :data:`UPDATE_META`)."""
    env = open_envelope(record, kind=UPDATE, fingerprint=keys.fingerprint,
                        verify_keys=keys.verify_keys, run=run, server_round=server_round)
    _check_update_meta(env)
    return env


def _join_message(run: str, node: int, sender: int, num_examples: int, fingerprint: str) -> bytes:
    return json.dumps({"purpose": "fedface-join", "run": run, "node": int(node),
                       "sender": int(sender), NUM_EXAMPLES: int(num_examples),
                       "fingerprint": fingerprint}, sort_keys=True).encode()


def prove_join(keys: ClientKeys, *, run: str, node: int, num_examples: int) -> dict:
    """An institution's join proof: its index and sample count, with its Ed25519 signature
    (``tag``, 64 bytes, under its own private key) over the run id, its Flower node id, its
    index, its sample count and the key fingerprint."""
    tag = sign(keys.sign_key, _join_message(run, node, keys.sender, num_examples,
                                            keys.fingerprint))
    return {"sender": int(keys.sender), NUM_EXAMPLES: int(num_examples), "tag": tag}


def verify_join(keys: ServerKeys, proof, *, run: str, node: int) -> tuple[int, int]:
    """Check a join proof of node ``node`` under the claimed index's public key; returns
    ``(sender, num_examples)``."""
    if proof is None:
        raise EnvelopeError("join reply carries no proof of the institution's ceremony index: "
                            "the client runs an older fedface; upgrade it")
    sender, count, tag = proof.get("sender"), proof.get(NUM_EXAMPLES), proof.get("tag")
    if not _is_int(sender) or not _is_int(count) or count < 1 or not isinstance(tag, bytes):
        raise EnvelopeError(f"malformed join proof (sender {sender!r}, num-examples {count!r})")
    key = keys.verify_keys.get(sender)
    if key is None:
        raise EnvelopeError(f"join proof of unknown index {sender}: no public signing key for it "
                            "in the server bundle (a node outside the ceremony, or a wrong "
                            "he-sender)")
    try:
        verify(key, tag, _join_message(run, node, sender, count, keys.fingerprint),
               f"the join proof of node {node}")
    except SignatureError:
        raise EnvelopeError(f"node {node} claims ceremony index {sender} but its proof does not "
                            f"verify under institution {sender}'s public key (another node's "
                            "proof, another run, or another institution's keys)") from None
    return sender, count


def add_updates(keys: ServerKeys, updates: list[Envelope], multipliers: list[int], *,
                run: str, server_round: int, max_units: int, meta: dict | None = None,
                unmask: np.ndarray | None = None) -> Envelope:
    """``sum_k m_k * update_k`` as an aggregate envelope (ciphertext additions only).

    Masked updates (:mod:`crypto.masks`) add up only together, all of one epoch, with
    multipliers 1 and ``unmask``, the masks that remain in their sum (slots), subtracted.

    ``max_units`` is the headroom of the layout: ``sum_k m_k`` may not exceed it.
    """
    if not updates:
        raise ValueError("no updates to add")
    layouts = {tuple(sorted(u.header["layout"].items())) for u in updates}
    specs = {u.header["spec"] for u in updates}
    if len(layouts) != 1 or len(specs) != 1:
        raise EnvelopeError("updates were packed with different layouts or models: every "
                            "client must run the same backbone and he-* settings")
    senders = [u.header["sender"] for u in updates]
    if len(set(senders)) != len(senders):
        raise EnvelopeError(f"the same sender appears twice in one aggregate ({senders}): an "
                            "envelope was replayed within the round")
    if any(int(m) < 1 for m in multipliers):
        raise ValueError(f"multipliers must be positive integers, got {multipliers}")
    layout = Layout.from_dict(updates[0].header["layout"])
    # The digits must hold the largest possible sum: the layout's own headroom decides,
    # whatever the server was configured with.
    units = min(max_units, 2 ** (layout.digit_bits - layout.bits))
    if sum(multipliers) > units:
        raise EnvelopeError(f"sum of multipliers {sum(multipliers)} exceeds the headroom of the "
                            f"packing ({units}): raise he-max-clients on every node")
    masked = [u.meta.get(MASK_EPOCH) for u in updates]
    if any(e is not None for e in masked):
        if len(set(masked)) != 1 or unmask is None or set(multipliers) != {1}:
            raise EnvelopeError("masked updates add up only all of one epoch, each once, with the "
                                "masks that remain removed (crypto.masks): another combination "
                                "decrypts to noise")
    elif unmask is not None:
        raise ValueError("unmask given for updates that carry no masks")
    chunks = keys.context.weighted_sum([u.chunks for u in updates], [int(m) for m in multipliers])
    if unmask is not None:
        chunks = keys.context.subtract_plain(chunks, unmask)
    scales = [float(u.meta[SCALE]) for u in updates]
    meta = {**(meta or {}), "count": len(updates),
            "senders": [u.header["sender"] for u in updates],
            "multipliers": [int(m) for m in multipliers],
            "multiplier_sum": int(sum(multipliers)),
            "weight_sum": float(sum(m * s for m, s in zip(multipliers, scales)))}
    if unmask is not None:
        meta["masked"] = True
    first = updates[0].header
    return seal_envelope(AGGREGATE, chunks, sign_key=keys.sign_key,
                         fingerprint=keys.fingerprint, generation=keys.generation,
                         params=first["params"], run=run, server_round=server_round,
                         sender=SERVER, layout=first["layout"], spec=first["spec"], meta=meta)


def decrypt_aggregate(keys: ClientKeys, record, like: dict[str, np.ndarray],
                      float_keys: list[str], *, run: str, server_round: int,
                      min_senders: int = 1) -> tuple[dict[str, np.ndarray], Envelope]:
    """The weighted mean update of an aggregate envelope, as arrays shaped like ``like``.

    ``min_senders``: refuse (before decrypting) an aggregate whose authenticated header
    lists fewer distinct senders; institutions ask for 2, since an aggregate of one
    update is that update.
    """
    env = open_envelope(record, kind=AGGREGATE, fingerprint=keys.fingerprint,
                        verify_keys={SERVER: keys.server_verify_key}, run=run,
                        server_round=server_round)
    _check_aggregate_meta(env)
    senders = sorted(set(env.meta["senders"]))
    if len(senders) < min_senders:
        raise EnvelopeError(f"aggregate of round {server_round} holds the update of "
                            f"{len(senders)} institution(s) {senders}: an aggregate of fewer than "
                            f"{min_senders} updates would reveal an individual update, and this "
                            "institution refuses to decrypt it")
    if env.header["spec"] != spec_digest(like, float_keys):
        raise EnvelopeError("aggregate was packed for another model (spec differs): server "
                            "and clients must run the same backbone")
    layout = Layout.from_dict(env.header["layout"])
    meta = env.meta
    sums = unpack(keys.context.decrypt(env.chunks), layout)
    mean = dequantize_sum(sums, layout, float(meta["multiplier_sum"]), float(meta["weight_sum"]))
    return unflatten(mean, like, float_keys), env


def aggregate_error_bound(env: Envelope) -> float:
    """The quantization error bound of an aggregate (see :mod:`crypto.packing`)."""
    layout = Layout.from_dict(env.header["layout"])
    return error_bound(layout, float(env.meta["multiplier_sum"]), float(env.meta["weight_sum"]))
