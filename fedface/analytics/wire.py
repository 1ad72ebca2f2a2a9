"""The wire schema of an analytics query, shared by the sites (:mod:`client.analytics`) and
the querier and server (:mod:`server.analytics`): message and record names, the signed
query's purpose and version, and the hashes both sides compute.

A query step is a ``query.analytics`` message (:data:`ACTION`) whose config record
:data:`STEP` names the step (``join``, ``setup``, ``compute``, ``unmask``); the join
carries the signed query (:data:`QUERY`) and the querier's public key (:data:`KEY`); a
site's compute reply carries its envelope (:data:`REPLY`, kind :data:`KIND`); mask
documents travel in :data:`SHARES`.
"""

from __future__ import annotations

import hashlib
import json

ACTION = "analytics"  # message type "query.analytics"
STEP = "analytics-step"  # config record: {"doc": {"step": ..., ...}}
QUERY = "analytics-query"  # config record: the signed query (join)
KEY = "analytics-key"  # array record: the querier's public key (join)
REPLY = "analytics-reply"  # array record: the site's envelope (compute)
SHARES = "analytics-shares"  # config record: keys and shares (every reply)
KIND = "analytics-reply"  # envelope kind
PURPOSE = "fedface-analytics-query"
VERSION = 1
STEPS = ("join", "setup", "compute", "unmask")


def canonical(doc: dict) -> bytes:
    """The bytes a query's signature covers."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def key_id(public_key: bytes) -> str:
    """The querier key's name in every header: a hash of the public key."""
    return hashlib.sha256(b"fedface/analytics/key|" + bytes(public_key)).hexdigest()[:32]


def query_digest(doc: dict) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()
