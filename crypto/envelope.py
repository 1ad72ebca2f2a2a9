"""The versioned, authenticated envelope every ciphertext travels in.

An envelope is one Flower ``ArrayRecord`` (so Flower chunks it on the wire like any
model): ``header`` (UTF-8 JSON as uint8), ``tag`` (the sender's Ed25519 signature, 64
bytes, :mod:`crypto.signing`) and the ciphertexts ``ct-00000``, ``ct-00001``, ...
(uint8). The header names the scheme and parameters, the packing
:class:`~crypto.packing.Layout`, the model spec, the run and round, the sender, the key
fingerprint and generation, plaintext aggregation metadata (``meta``) and the length
and SHA-256 of every ciphertext; the signature covers the canonical header, so it
covers the ciphertexts too. Only the holder of the sender's private key can make it,
and anyone holding the sender's public key can check it.

:func:`open_envelope` checks, in this order, and raises :class:`EnvelopeError` naming
the first failure: structure and the type of every header field (a wrong-typed field is
named before anything uses it), version (version 1, HMAC-tagged, is an older fedface),
key fingerprint (wrong key), the signature (a sender without a public key, a tampered
envelope, or one signed with another key), chunk lengths and hashes (truncated), kind,
run and round (replayed). Which senders and ``meta`` fields an envelope must carry is
the caller's to check (:mod:`crypto.update`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord

from crypto.signing import SignatureError, sign, verify

VERSION = 2  # 1: HMAC-SHA256 tags under shared MAC keys (refused)
HEADER = "header"
TAG = "tag"
CHUNK = "ct-"


class EnvelopeError(ValueError):
    """An envelope that must not be aggregated or decrypted, and why."""


@dataclass
class Envelope:
    header: dict
    chunks: list[bytes]
    tag: bytes

    @property
    def meta(self) -> dict:
        return self.header.get("meta", {})

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks) + len(self.tag) + len(_canonical(self.header))


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def seal_envelope(kind: str, chunks: list[bytes], *, sign_key: Ed25519PrivateKey,
                  fingerprint: str, generation: int, params: dict, run: str, server_round: int,
                  sender: int | str, layout: dict, spec: str, meta: dict | None = None) -> Envelope:
    """Wrap ciphertexts with their header and the sender's signature (under ``sign_key``,
    the sender's own private key)."""
    header = {"version": VERSION, "kind": kind, "params": params, "fingerprint": fingerprint,
              "generation": int(generation), "run": run, "round": int(server_round),
              "sender": sender, "layout": layout, "spec": spec, "meta": meta or {},
              "chunks": [[len(c), hashlib.sha256(c).hexdigest()] for c in chunks]}
    return Envelope(header=header, chunks=list(chunks), tag=sign(sign_key, _canonical(header)))


def to_record(env: Envelope) -> ArrayRecord:
    arrays = {HEADER: Array(np.frombuffer(_canonical(env.header), dtype=np.uint8).copy()),
              TAG: Array(np.frombuffer(env.tag, dtype=np.uint8).copy())}
    for i, c in enumerate(env.chunks):
        arrays[f"{CHUNK}{i:05d}"] = Array(np.frombuffer(c, dtype=np.uint8).copy())
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord) -> Envelope:
    """Parse (not verify) an envelope record."""
    if HEADER not in record or TAG not in record:
        raise EnvelopeError("not an encrypted envelope (no header or tag): the sender is not "
                            "running encrypted aggregation, or the record was stripped")
    try:
        header = json.loads(record[HEADER].numpy().tobytes())
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError("envelope header is not valid JSON: the envelope was tampered with "
                            "or truncated") from None
    if not isinstance(header, dict):
        raise EnvelopeError("envelope header is not an object")
    names = sorted(k for k in record if k.startswith(CHUNK))
    chunks = [record[k].numpy().tobytes() for k in names]
    return Envelope(header=header, chunks=chunks, tag=record[TAG].numpy().tobytes())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v


_LAYOUT_FIELDS = {"length": _is_int, "bits": _is_int, "digit_bits": _is_int, "digits": _is_int,
                  "slots": _is_int, "clip": _is_number}


def _chunk_entry(v) -> bool:
    return (isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and v[0] >= 0
            and isinstance(v[1], str))


_HEADER_FIELDS = {
    "version": ("an integer", _is_int),
    "kind": ("a string", lambda v: isinstance(v, str)),
    "params": ("an object", lambda v: isinstance(v, dict)),
    "fingerprint": ("a string", lambda v: isinstance(v, str)),
    "generation": ("an integer", _is_int),
    "run": ("a string", lambda v: isinstance(v, str)),
    "round": ("an integer", _is_int),
    "sender": ("an integer or a string", lambda v: _is_int(v) or isinstance(v, str)),
    "layout": ("an object of integers (and the clip, a number)",
               lambda v: isinstance(v, dict) and set(v) == set(_LAYOUT_FIELDS)
               and all(ok(v[k]) for k, ok in _LAYOUT_FIELDS.items())),
    "spec": ("a string", lambda v: isinstance(v, str)),
    "meta": ("an object", lambda v: isinstance(v, dict)),
    "chunks": ("a list of [length, sha256] pairs",
               lambda v: isinstance(v, list) and all(_chunk_entry(c) for c in v)),
}


def check_header(header: dict) -> None:
    """Raise :class:`EnvelopeError` naming the first missing or wrong-typed header field."""
    if header.get("version") not in (None, VERSION) and _is_int(header.get("version")):
        return  # another version: open_envelope names it (its fields may differ)
    for name, (what, ok) in _HEADER_FIELDS.items():
        if name not in header:
            raise EnvelopeError(f"envelope header lacks the field {name!r}: not a fedface "
                                "envelope, or it was stripped")
        if not ok(header[name]):
            raise EnvelopeError(f"envelope header field {name!r} must be {what}, got "
                                f"{type(header[name]).__name__} {str(header[name])[:60]!r}: "
                                "malformed or forged envelope")


def open_envelope(record: ArrayRecord | Envelope, *, kind: str, fingerprint: str,
                  verify_keys: dict, run: str, server_round: int) -> Envelope:
    """Verify an envelope; ``verify_keys`` maps sender (an institution's index, or
    ``"server"`` for aggregates) -> its Ed25519 public key."""
    env = record if isinstance(record, Envelope) else from_record(record)
    h = env.header
    if not isinstance(h, dict):
        raise EnvelopeError("envelope header is not an object")
    check_header(h)
    if h.get("version") != VERSION:
        v = h.get("version")
        who = ("the peer runs an older fedface (HMAC-tagged envelopes); upgrade it"
               if isinstance(v, int) and v < VERSION else "upgrade fedface on both sides")
        raise EnvelopeError(f"envelope version {v!r}, this node reads version {VERSION}: {who}")
    if h.get("fingerprint") != fingerprint:
        raise EnvelopeError(
            f"encrypted under another key: fingerprint {h.get('fingerprint')} (generation "
            f"{h.get('generation')}), this node holds {fingerprint}. Distribute the current "
            "ceremony's bundles (`fedface keys show`) to every node")
    sender = h.get("sender")
    key = verify_keys.get(sender)
    if key is None:
        raise EnvelopeError(f"unknown sender {sender!r}: no public signing key for it in this "
                            "bundle, a signature by an unknown key (a node outside the ceremony, "
                            "or a wrong he-sender)")
    try:
        verify(key, env.tag, _canonical(h), f"sender {sender!r}")
    except SignatureError:
        raise EnvelopeError(f"signature of sender {sender!r} does not verify: the envelope was "
                            "tampered with, or signed with another key than the sender's") from None
    listed = h.get("chunks", [])
    if len(listed) != len(env.chunks):
        raise EnvelopeError(f"envelope holds {len(env.chunks)} ciphertexts, its header lists "
                            f"{len(listed)}: truncated in transit")
    for i, ((n, digest), c) in enumerate(zip(listed, env.chunks)):
        if len(c) != n or hashlib.sha256(c).hexdigest() != digest:
            raise EnvelopeError(f"ciphertext {i} is {len(c)} bytes and does not match its "
                                f"header ({n} bytes, sha256 {digest[:12]}): truncated or tampered")
    if h.get("kind") != kind:
        raise EnvelopeError(f"expected a {kind!r} envelope, got {h.get('kind')!r}")
    if h.get("run") != run:
        raise EnvelopeError(f"envelope from run {h.get('run')!r}, this is run {run!r}: replayed "
                            "from another run")
    if h["round"] != int(server_round):
        raise EnvelopeError(f"envelope of round {h.get('round')}, expected round {server_round}: "
                            "replayed (old round) or out of order")
    return env
