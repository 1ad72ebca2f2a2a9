"""The querier's and the server's side of an encrypted analytics query (the sites':
:mod:`client.analytics`).

Two roles, two objects, so that neither holds what the other must not:

- :class:`Querier` (the analyst): makes a fresh BFV key pair for each query, signs the
  query with the ceremony's querier key (which the server does not hold: it cannot ask a
  query of its own and read the answer), and decrypts *one* thing: the total that
  :func:`run_query` hands back, after checking it is under this query's key. Its secret
  key never leaves the object.
- the server (:func:`run_query`, with :class:`server.masking.MaskCoordinator`): routes the
  steps, checks every site's signed envelope (sender, run, query, key; a replayed or
  altered reply is rejected), adds the ciphertexts and removes the masks that do not
  cancel. It holds the public parameters only: it cannot decrypt anything, and since
  every site's vector is masked, neither can the server and the querier together learn
  more than the sum.

The steps travel through a ``transport``: :func:`flower_transport` (the ServerApp's
grid, ``query.analytics`` messages) or :func:`fedface.runner.in_process_transport` (the
sites' handler called directly, for the benchmark and the tests). Either way the sites
run :func:`client.analytics.handle`.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from crypto.context import HEContext, HEParams
from crypto.envelope import EnvelopeError, open_envelope
from crypto.masks import MaskError, MaskSettings, pack_doc, unpack_doc
from crypto.packing import Layout as Packing
from crypto.packing import integer_layout, unpack_integers
from crypto.signing import sign
from fedface.analytics import wire
from fedface.analytics.local import answer
from fedface.analytics.privacy import calibrate, sensitivities, suppress
from fedface.analytics.query import QueryError, QuerySpec, Schema, validate
from fedface.analytics.vector import Layout
from server.masking import MaskCoordinator, RoundAborted

#: Parameters of a query key: 4096 slots, a 60-bit ciphertext prime, a 32-bit plaintext
#: prime (a fresh public-key ciphertext keeps 17 bits of noise budget; 64 sites use 3).
ANALYTICS_PARAMS = HEParams(poly_modulus_degree=4096, coeff_bits=60, plain_bits=32)

Transport = Callable[[dict[int, RecordDict]], dict[int, "RecordDict | str"]]


class QueryFailed(RuntimeError):
    """A query that gives no answer (never a wrong one), and why."""


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (arrays and mask documents)."""
    n = sum(a.numpy().nbytes for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        n += sum(len(v) for v in rec.values() if isinstance(v, (bytes, str)))
    return n


def step_content(step: str, **parts) -> RecordDict:
    """A step's message: ``{"step": ...}`` and the parts the site reads."""
    extra = parts.pop("records", {})
    return RecordDict({wire.STEP: pack_doc({"step": step, **parts}), **extra})


@dataclass
class QueryResult:
    """What the querier reads: statistics per group and how they were obtained."""

    spec: QuerySpec
    groups: dict[tuple, dict[str, Any]]
    suppressed: list[tuple]
    sites: list[int]
    excluded: dict[int, str] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    epsilon: float = 0.0
    delta: float = 0.0
    min_cell: int = 0
    fixed_point_error: float = 0.0
    count_noise_std: float = 0.0
    seconds: float = 0.0
    bytes: int = 0
    query: str = ""

    def rows(self) -> list[dict]:
        out = []
        for key, stats in self.groups.items():
            out.append({**dict(zip(self.spec.group_by, key, strict=True)), **stats})
        return out

    def to_dict(self) -> dict:
        return {"query": self.query, "spec": self.spec.to_dict(), "rows": self.rows(),
                "suppressed": [dict(zip(self.spec.group_by, k, strict=True))
                               for k in self.suppressed],
                "sites": self.sites, "excluded": {str(k): v for k, v in self.excluded.items()},
                "dropped": self.dropped, "epsilon": self.epsilon, "delta": self.delta,
                "min_cell": self.min_cell, "fixed_point_error": self.fixed_point_error,
                "count_noise_std": round(self.count_noise_std, 3),
                "seconds": round(self.seconds, 4), "bytes": self.bytes}


class Querier:
    """The analyst's side of one query.

    Parameters
    ----------
    spec : QuerySpec
        The query (validated against ``schema`` here, before any site is asked).
    schema : Schema
        The federation's declared schema: types, the categories a group-by fills, the
        ranges that bound a row's weight under differential privacy.
    sign_key : Ed25519PrivateKey
        The ceremony's querier key (``DIR/querier/sign.key``, not the server's): sites
        answer only queries it signed.
    epsilon, delta : float
        Differential privacy of the released statistics (``epsilon=0``: exact answers).
    min_cell : int
        Groups and histogram bins counting fewer rows are blanked in the answer.
    frac_bits : int
        Fixed-point bits of sums of real columns.
    settings : MaskSettings
        Mask graph degree and threshold.
    max_sites : int
        Largest number of sites the integer packing leaves room for.
    run : str
        The run id (the session is the run id and a fresh query id).
    """

    def __init__(self, spec: QuerySpec, schema: Schema, sign_key, *, epsilon: float = 0.0,
                 delta: float = 1e-6, min_cell: int = 5, frac_bits: int = 16,
                 settings: MaskSettings | None = None, params: HEParams = ANALYTICS_PARAMS,
                 max_sites: int = 1024, run: str = "analytics", text: str = "") -> None:
        validate(spec, schema)
        if min_cell < 0:
            raise QueryError(f"min-cell={min_cell}: use 0 (no suppression) or more")
        self.spec, self.schema, self.text = spec, schema, text
        self.epsilon, self.delta, self.min_cell = float(epsilon), float(delta), int(min_cell)
        self.layout = Layout.build(spec, schema, {g: list(schema.categories.get(g, ()))
                                                  for g in spec.group_by}, frac_bits)
        self.mu = 0.0
        if self.epsilon > 0:
            _, moved = sensitivities(self.layout, schema.ranges)
            self.mu = calibrate(self.epsilon, self.delta, moved)
        elif self.epsilon < 0:
            raise QueryError(f"epsilon={epsilon}: use a positive number, or 0 for no noise")
        self.settings = settings or MaskSettings()
        self.max_sites = int(max_sites)
        self.params = params
        self.packing = integer_layout(self.layout.size, max_sites, params.slots, params.plain_bits)
        self.query_id = secrets.token_hex(8)
        self.session = f"{run}/{self.query_id}"
        self._he = HEContext.fresh(params)  # the secret key never leaves this object
        self.public_key = self._he.public_key_bytes()
        self.key_id = wire.key_id(self.public_key)
        self.doc = {"purpose": wire.PURPOSE, "version": wire.VERSION, "session": self.session,
                    "query": self.query_id, "spec": spec.to_dict(), "schema": schema.to_dict(),
                    "params": params.to_dict(), "key": self.key_id, "frac_bits": int(frac_bits),
                    "max_sites": int(max_sites), "epsilon": self.epsilon, "delta": self.delta,
                    "settings": self.settings.to_dict(), "min_cell": self.min_cell,
                    "issued": int(time.time())}
        self.signature = sign(sign_key, wire.canonical(self.doc))

    def join_records(self) -> dict:
        """The signed query and the public key (the join step's records)."""
        return {wire.QUERY: pack_doc({**self.doc, "signature": self.signature.hex()}),
                wire.KEY: ArrayRecord({"key": Array(np.frombuffer(self.public_key,
                                                                  np.uint8).copy())})}

    def release(self, chunks: list[bytes], key: str, sites: list[int]) -> QueryResult:
        """Decrypt the total of ``sites`` (under ``key``, which must be this query's) into
        the released statistics."""
        if key != self.key_id:
            raise QueryFailed(f"the total is under key {key}, this query's key is {self.key_id}: "
                              "a stale key of another query; refused")
        slots = self._he.decrypt(chunks)
        totals = np.asarray(unpack_integers(slots, self.packing), dtype=object)
        values = self.layout.decode(totals)
        groups = {k: answer(self.spec, v) for k, v in values.items()}
        kept, dropped = suppress(groups, {k: v["count"] for k, v in values.items()},
                                 self.min_cell)
        real = sum(1 for s in self.layout.scales if s > 1)
        err = len(sites) * 0.5 / max(self.layout.scales) if real else 0.0
        return QueryResult(spec=self.spec, groups=kept, suppressed=dropped, sites=list(sites),
                           epsilon=self.epsilon, delta=self.delta if self.epsilon else 0.0,
                           min_cell=self.min_cell, fixed_point_error=err, query=self.text)


def run_query(querier: Querier, verify_keys: dict, transport: Transport, nodes: list[int], *,
              exclude_refusing: bool = False) -> QueryResult:
    """The server's side: join, mask setup, compute, unmask; the total to the querier.

    Sites that refuse the query (another schema, no table, no budget, ...) make it fail,
    naming each, unless ``exclude_refusing``. A site that drops once masks are set is
    recovered from its holders' shares; when that is impossible the query fails
    (:class:`QueryFailed`), never answering wrong.
    """
    t0 = time.perf_counter()
    nbytes = 0

    def send(docs: dict[int, RecordDict]) -> dict[int, RecordDict | str]:
        nonlocal nbytes
        nbytes += sum(content_bytes(c) for c in docs.values())
        replies = transport(docs)
        nbytes += sum(content_bytes(r) for r in replies.values() if not isinstance(r, str))
        return replies

    session = querier.session
    replies = send({n: step_content("join", records=querier.join_records()) for n in nodes})
    excluded, adverts, node_of = {}, {}, {}
    for node, r in sorted(replies.items()):
        if isinstance(r, str):
            excluded[node] = r
            continue
        try:
            d = unpack_doc(r.config_records.get(wire.SHARES), "join reply")
            sender = int(d["sender"])
            adverts[sender], node_of[sender] = d["advert"], node
        except (MaskError, KeyError, TypeError, ValueError):
            excluded[node] = "a malformed join reply"
    if excluded and not exclude_refusing:
        raise QueryFailed("the query is refused by "
                          + "; ".join(f"node {n}: {why}" for n, why in excluded.items())
                          + " (fix those sites, or exclude them with --exclude-refusing)")
    coord = MaskCoordinator(querier.settings, session, verify_keys)
    for sender, why in coord.start(adverts):
        excluded[node_of.pop(sender)] = why
    if len(coord.members) < 2:
        raise QueryFailed(f"{len(coord.members)} site(s) can answer: a sum needs at least two "
                          "(one site's total is its own figures)")
    replies = send({node_of[s]: step_content("setup", mask=coord.setup_doc(s))
                    for s in coord.members})
    for s in coord.members:
        r = replies.get(node_of[s])
        if r is None or isinstance(r, str):  # it drops before masking: not a participant
            excluded[node_of[s]] = r if isinstance(r, str) else "no answer to the mask setup"
            continue
        try:
            coord.take_epoch_advert(s, unpack_doc(r.config_records.get(wire.SHARES), "key"),
                                    coord.epoch)
        except MaskError as err:
            excluded[node_of[s]] = str(err)
    participants = coord.participants()
    if len(participants) > querier.max_sites:
        raise QueryFailed(f"{len(participants)} sites take part, the query's packing holds "
                          f"{querier.max_sites}: ask again with a larger max-sites")
    replies = send({node_of[s]: step_content("compute", mask=coord.train_doc(s, participants))
                    for s in participants})
    cts, dropped, shape = {}, [], None
    for s in participants:
        r = replies.get(node_of[s])
        if r is None or isinstance(r, str):
            if isinstance(r, str):
                excluded[node_of[s]] = r
            dropped.append(s)
            continue
        try:
            if wire.REPLY not in r.array_records:
                raise EnvelopeError("the reply holds no envelope")
            env = open_envelope(r.array_records[wire.REPLY], kind=wire.KIND,
                                fingerprint=querier.key_id, verify_keys=verify_keys,
                                run=session, server_round=coord.epoch)
            if env.header["sender"] != s:
                raise EnvelopeError(f"an envelope of site {env.header['sender']} in the reply of "
                                    f"site {s}")
            if Packing.from_dict(env.header["layout"]) != querier.packing or \
                    env.meta.get("query") != querier.query_id:
                raise EnvelopeError("the envelope answers another query or layout")
            coord.take_update(s, env.meta, unpack_doc(r.config_records.get(wire.SHARES),
                                                      "shares"), participants)
        except (EnvelopeError, MaskError) as err:
            excluded[node_of[s]] = f"reply rejected: {err}"
            dropped.append(s)
            continue
        cts[s] = env.chunks
        shape = (len(env.chunks), querier.params.slots)
    survivors = sorted(cts)
    if len(survivors) < 2:
        raise QueryFailed(f"{len(survivors)} site(s) sent a usable reply: no sum to release")
    docs = coord.unmask_docs(survivors, participants)
    replies = send({node_of[s]: step_content("unmask", mask=docs[s]) for s in survivors})
    shares = {}
    for s in survivors:
        r = replies.get(node_of[s])
        if isinstance(r, RecordDict):
            try:
                shares[s] = unpack_doc(r.config_records.get(wire.SHARES), "shares")
            except MaskError as err:
                excluded[node_of[s]] = f"unmask reply rejected: {err}"
    he = HEContext(querier.params)  # the public parameters only
    try:
        corr = coord.correction(shares, shape[0] * shape[1], he.plain_modulus)
    except RoundAborted as err:
        refusals = {s: replies[node_of[s]] for s in survivors
                    if isinstance(replies.get(node_of[s]), str)}
        raise QueryFailed(f"the masks cannot be removed, so there is no answer: {err}"
                          + (f"; sites refused: {refusals}" if refusals else "")
                          + " (run the query again when more sites answer)") from None
    total = he.weighted_sum([cts[s] for s in survivors], [1] * len(survivors))
    total = he.subtract_plain(total, corr.reshape(shape))
    result = querier.release(total, querier.key_id, survivors)
    result.excluded = excluded
    result.dropped = sorted(dropped)
    if querier.epsilon > 0:  # each survivor added Sk(mu / shares) to every count
        shares = querier.settings.needed(len(participants))
        result.count_noise_std = math.sqrt(2 * querier.mu * len(survivors) / shares)
    result.seconds = time.perf_counter() - t0
    result.bytes = nbytes
    return result


def flower_transport(grid, timeout: float = 120.0) -> Transport:
    """The steps as ``query.analytics`` messages through the ServerApp's grid; an error
    reply becomes its reason, a node that does not answer is left out."""
    from flwr.app import MessageType

    def transport(docs: dict[int, RecordDict]) -> dict[int, RecordDict | str]:
        msgs = [grid.create_message(content=c, message_type=f"{MessageType.QUERY}.{wire.ACTION}",
                                    dst_node_id=n, group_id="analytics")
                for n, c in docs.items()]
        out = {}
        for m in grid.send_and_receive(msgs, timeout=timeout):
            node = m.metadata.src_node_id
            out[node] = m.error.reason if m.has_error() else m.content
        return out

    return transport

