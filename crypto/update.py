"""Encrypt a model update, add encrypted updates, decrypt an aggregate: the one path.

Clients call :func:`encrypt_update` (flatten, pre-scale by their weight, clip, quantize,
pack, encrypt, seal) and :func:`decrypt_aggregate` (open, decrypt, unpack, dequantize
to the weighted mean update). The server calls :func:`add_updates`, which opens every
update envelope, checks that they share one layout and spec, and returns the
``sum_k m_k * update_k`` envelope signed with the server's MAC key. It never decrypts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crypto.envelope import Envelope, EnvelopeError, open_envelope, seal_envelope
from crypto.keys import ClientKeys, ServerKeys
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

UPDATE = "update"
AGGREGATE = "aggregate"
SERVER = "server"


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
        Largest plaintext integer the server multiplies an update by (FV candidates).
    """

    bits: int = 15
    clip: float = 0.5
    max_clients: int = 16
    max_multiplier: int = 1

    @classmethod
    def from_config(cls, cfg) -> Quantization:
        """The packing of a run (a ``RunConfig``): FV reserves ``he_fv_bits`` of headroom."""
        return cls(bits=cfg.he_bits, clip=cfg.he_clip, max_clients=cfg.he_max_clients,
                   max_multiplier=2 ** cfg.he_fv_bits if cfg.fv else 1)

    def layout(self, length: int, keys) -> Layout:
        p = keys.context.params
        return make_layout(length, self.bits, self.clip, self.max_clients, self.max_multiplier,
                           p.slots, p.plain_bits)


def encrypt_update(keys: ClientKeys, delta: dict[str, np.ndarray], float_keys: list[str],
                   quant: Quantization, *, scale: float, run: str, server_round: int,
                   rng: np.random.Generator, meta: dict | None = None) -> tuple[Envelope, dict]:
    """Envelope of ``scale * delta`` and what the client may report in plaintext."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"update scale {scale} must be in (0, 1]")
    vector = flatten(delta, float_keys) * np.float32(scale)
    layout = quant.layout(vector.size, keys)
    codes, clipped = quantize(vector, layout, rng)
    chunks = keys.context.encrypt(pack(codes, layout))
    env = seal_envelope(UPDATE, chunks, mac_key=keys.mac_key, fingerprint=keys.fingerprint,
                        generation=keys.generation, params=keys.context.params.to_dict(),
                        run=run, server_round=server_round, sender=keys.sender,
                        layout=layout.to_dict(), spec=spec_digest(delta, float_keys),
                        meta={"scale": float(scale), **(meta or {})})
    return env, {"clipped": clipped, "scale": float(scale)}


def open_update(keys: ServerKeys, record, *, run: str, server_round: int) -> Envelope:
    """Verify one client's update envelope on the server."""
    return open_envelope(record, kind=UPDATE, fingerprint=keys.fingerprint,
                         mac_keys=keys.mac_keys, run=run, server_round=server_round)


def add_updates(keys: ServerKeys, updates: list[Envelope], multipliers: list[int], *,
                run: str, server_round: int, max_units: int, meta: dict | None = None) -> Envelope:
    """``sum_k m_k * update_k`` as an aggregate envelope (ciphertext additions only).

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
    chunks = keys.context.weighted_sum([u.chunks for u in updates], [int(m) for m in multipliers])
    scales = [float(u.meta["scale"]) for u in updates]
    meta = {"count": len(updates), "senders": [u.header["sender"] for u in updates],
            "multipliers": [int(m) for m in multipliers],
            "multiplier_sum": int(sum(multipliers)),
            "weight_sum": float(sum(m * s for m, s in zip(multipliers, scales))),
            **(meta or {})}
    first = updates[0].header
    return seal_envelope(AGGREGATE, chunks, mac_key=keys.server_mac_key,
                         fingerprint=keys.fingerprint, generation=keys.generation,
                         params=first["params"], run=run, server_round=server_round,
                         sender=SERVER, layout=first["layout"], spec=first["spec"], meta=meta)


def decrypt_aggregate(keys: ClientKeys, record, like: dict[str, np.ndarray],
                      float_keys: list[str], *, run: str, server_round: int
                      ) -> tuple[dict[str, np.ndarray], Envelope]:
    """The weighted mean update of an aggregate envelope, as arrays shaped like ``like``."""
    env = open_envelope(record, kind=AGGREGATE, fingerprint=keys.fingerprint,
                        mac_keys={SERVER: keys.server_mac_key}, run=run,
                        server_round=server_round)
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
