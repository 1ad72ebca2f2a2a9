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

import base64
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from crypto.context import HEContext, HEParams, MissingSecretKey
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


@dataclass
class QueryRequest:
    """What the querier hands the server: the signed query and the public key, no secret.
    In a deployment it travels as a file (:meth:`save`, ``flwr run . -c
    analytics-request=PATH``); everything the server and the sites need is derived from
    the signed document."""

    doc: dict
    signature: bytes
    public_key: bytes
    text: str = ""

    @property
    def key_id(self) -> str:
        return self.doc["key"]

    @property
    def session(self) -> str:
        return self.doc["session"]

    @property
    def query_id(self) -> str:
        return self.doc["query"]

    @property
    def params(self) -> HEParams:
        return HEParams(**self.doc["params"])

    @property
    def settings(self) -> MaskSettings:
        return MaskSettings(**self.doc["settings"])

    @property
    def max_sites(self) -> int:
        return int(self.doc["max_sites"])

    @property
    def spec(self) -> QuerySpec:
        return QuerySpec.from_dict(self.doc["spec"])

    @property
    def schema(self) -> Schema:
        return Schema.from_dict(self.doc["schema"])

    @property
    def layout(self) -> Layout:
        spec, schema = self.spec, self.schema
        return Layout.build(spec, schema, {g: list(schema.categories.get(g, ()))
                                           for g in spec.group_by}, int(self.doc["frac_bits"]))

    @property
    def packing(self) -> Packing:
        p = self.params
        return integer_layout(self.layout.size, self.max_sites, p.slots, p.plain_bits)

    def join_records(self) -> dict:
        """The signed query and the public key (the join step's records)."""
        return {wire.QUERY: pack_doc({**self.doc, "signature": self.signature.hex()}),
                wire.KEY: ArrayRecord({"key": Array(np.frombuffer(self.public_key,
                                                                  np.uint8).copy())})}

    def to_json(self) -> str:
        return json.dumps({"doc": self.doc, "signature": self.signature.hex(),
                           "public_key": base64.b64encode(self.public_key).decode(),
                           "text": self.text}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "query request") -> QueryRequest:
        try:
            d = json.loads(text)
            req = cls(doc=dict(d["doc"]), signature=bytes.fromhex(d["signature"]),
                      public_key=base64.b64decode(d["public_key"]), text=str(d.get("text", "")))
            # every field the server, the sites and the querier read, read once here
            _ = (req.key_id, req.session, req.query_id, req.params, req.settings,
                 req.packing, float(req.doc["epsilon"]), float(req.doc["delta"]),
                 int(req.doc["min_cell"]))
            if not 2 <= req.max_sites:
                raise ValueError(f"max_sites {req.max_sites}")
        except (ValueError, KeyError, TypeError, AttributeError, QueryError) as err:
            raise QueryFailed(f"{where} is not a query request ({type(err).__name__}: {err}): "
                              "make one with `fedface query-request`") from None
        if wire.key_id(req.public_key) != req.key_id:
            raise QueryFailed(f"{where}: the public key is not the one the query names")
        return req


@dataclass
class EncryptedTotal:
    """What the server hands back: the sum of the sites' ciphertexts, its masks removed,
    still under the querier's key; and who is in it. It holds nothing the server could
    read, and travels as a file in a deployment (:meth:`to_json`)."""

    query: str
    key: str
    chunks: list[bytes]
    sites: list[int]
    participants: int
    excluded: dict[int, str] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0

    def to_json(self) -> str:
        return json.dumps({"query": self.query, "key": self.key,
                           "chunks": [base64.b64encode(c).decode() for c in self.chunks],
                           "sites": self.sites, "participants": self.participants,
                           "excluded": {str(k): v for k, v in self.excluded.items()},
                           "dropped": self.dropped, "seconds": self.seconds,
                           "bytes": self.bytes}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "encrypted total") -> EncryptedTotal:
        try:
            d = json.loads(text)
            return cls(query=str(d["query"]), key=str(d["key"]),
                       chunks=[base64.b64decode(c) for c in d["chunks"]],
                       sites=[int(s) for s in d["sites"]], participants=int(d["participants"]),
                       excluded={int(k): str(v) for k, v in d.get("excluded", {}).items()},
                       dropped=[int(x) for x in d.get("dropped", [])],
                       seconds=float(d.get("seconds", 0)), bytes=int(d.get("bytes", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise QueryFailed(f"{where} is not an encrypted query total ({type(err).__name__}: "
                              f"{err}): it is the analytics-total.json a query run writes"
                              ) from None


REQUEST_FILE = "request.json"
SECRET_FILE = "querier-secret.key"


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
        if epsilon < 0:
            raise QueryError(f"epsilon={epsilon}: use a positive number, or 0 for no noise")
        layout = Layout.build(spec, schema, {g: list(schema.categories.get(g, ()))
                                             for g in spec.group_by}, frac_bits)
        if epsilon > 0:
            sensitivities(layout, schema.ranges)  # a summed column without a range: refused
        integer_layout(layout.size, max_sites, params.slots, params.plain_bits)
        query_id = secrets.token_hex(8)
        self._he = HEContext.fresh(params)  # the secret key never leaves this object
        public = self._he.public_key_bytes()
        doc = {"purpose": wire.PURPOSE, "version": wire.VERSION, "session": f"{run}/{query_id}",
               "query": query_id, "spec": spec.to_dict(), "schema": schema.to_dict(),
               "params": params.to_dict(), "key": wire.key_id(public),
               "frac_bits": int(frac_bits), "max_sites": int(max_sites),
               "epsilon": float(epsilon), "delta": float(delta),
               "settings": (settings or MaskSettings()).to_dict(), "min_cell": int(min_cell),
               "issued": int(time.time())}
        self.request = QueryRequest(doc, sign(sign_key, wire.canonical(doc)), public, text)
        self._derive()

    def _derive(self) -> None:
        r = self.request
        self.spec, self.schema, self.text = r.spec, r.schema, r.text
        self.layout, self.packing, self.settings = r.layout, r.packing, r.settings
        self.epsilon, self.delta = float(r.doc["epsilon"]), float(r.doc["delta"])
        self.min_cell, self.key_id = int(r.doc["min_cell"]), r.key_id
        self.mu = 0.0
        if self.epsilon > 0:
            _, moved = sensitivities(self.layout, self.schema.ranges)
            self.mu = calibrate(self.epsilon, self.delta, moved)

    # ------------------------------------------------------------------ a deployment
    def save(self, folder: str | Path) -> Path:
        """``folder/request.json`` (public: hand it to the server) and
        ``folder/querier-secret.key`` (owner-only: it decrypts this query's answer)."""
        from crypto.keyfile import write_private
        from fedface.io import atomic_write_text

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise QueryFailed(f"{folder} is a file: give a folder for the request")
        if (folder / SECRET_FILE).exists() or (folder / REQUEST_FILE).exists():
            raise QueryFailed(f"{folder} already holds a query request and its secret key (a "
                              "pending query's answer needs them): choose another --out, or "
                              "delete it once that answer is read")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(folder / SECRET_FILE, self._he.secret_key_bytes())
        atomic_write_text(folder / REQUEST_FILE, self.request.to_json())
        return folder / REQUEST_FILE

    @classmethod
    def load(cls, folder: str | Path) -> Querier:
        """The querier of a saved request (its secret key read back, checked against the
        request's public key)."""
        from crypto.keyfile import KeyFileError, read_private

        folder = Path(folder)
        path = folder / REQUEST_FILE
        if not path.is_file():
            raise QueryFailed(f"{folder} holds no {REQUEST_FILE}: make it with "
                              "`fedface query-request`")
        request = QueryRequest.from_json(path.read_text(), str(path))
        try:
            secret = read_private(folder / SECRET_FILE, "querier secret key", KeyFileError,
                                  missing="it is made with the request; without it the "
                                  "answer cannot be read")
        except KeyFileError as err:
            raise QueryFailed(str(err)) from None
        self = cls.__new__(cls)
        try:
            self._he = HEContext(request.params, secret_key=secret)
            probe = np.arange(request.params.slots, dtype=np.uint64)[None] % 97
            ok = HEContext(request.params, public_key=request.public_key).encrypt(probe)
            matches = bool(np.array_equal(self._he.decrypt(ok), probe))
        except (ValueError, MissingSecretKey):
            matches = False
        if not matches:
            raise QueryFailed(f"{folder / SECRET_FILE} is not the secret key of this request "
                              "(damaged, or of another query): the answer cannot be read with "
                              "it")
        self.request = request
        self._derive()
        return self

    # ------------------------------------------------------------------ the answer
    def release(self, total: EncryptedTotal) -> QueryResult:
        """Decrypt the total (which must be under this query's key) into the released
        statistics."""
        if total.key != self.key_id or total.query != self.request.query_id:
            raise QueryFailed(f"the total is of query {total.query} under key {total.key}; this "
                              f"is query {self.request.query_id} with key {self.key_id}: a "
                              "stale key or another query's total; refused")
        if not 2 <= len(set(total.sites)) == len(total.sites) <= total.participants or \
                len(total.chunks) != self.packing.ciphertexts:
            raise QueryFailed(f"the total names sites {total.sites} of {total.participants} "
                              f"participants with {len(total.chunks)} ciphertexts (expected "
                              f"{self.packing.ciphertexts}): malformed; refused")
        slots = self._he.decrypt(total.chunks)
        totals = np.asarray(unpack_integers(slots, self.packing), dtype=object)
        values = self.layout.decode(totals)
        groups = {k: answer(self.spec, v) for k, v in values.items()}
        kept, dropped = suppress(groups, {k: v["count"] for k, v in values.items()},
                                 self.min_cell)
        real = sum(1 for s in self.layout.scales if s > 1)
        err = len(total.sites) * 0.5 / max(self.layout.scales) if real else 0.0
        noise = 0.0
        if self.epsilon > 0:  # each site in the sum added Sk(mu / shares) to every count
            shares = self.settings.needed(total.participants)
            noise = math.sqrt(2 * self.mu * len(total.sites) / shares)
        return QueryResult(spec=self.spec, groups=kept, suppressed=dropped,
                           sites=list(total.sites), excluded=dict(total.excluded),
                           dropped=list(total.dropped), epsilon=self.epsilon,
                           delta=self.delta if self.epsilon else 0.0, min_cell=self.min_cell,
                           fixed_point_error=err, count_noise_std=noise,
                           seconds=total.seconds, bytes=total.bytes, query=self.text)


def run_query(request: QueryRequest, verify_keys: dict, transport: Transport, nodes: list[int],
              *, exclude_refusing: bool = False) -> EncryptedTotal:
    """The server's side: join, mask setup, compute, unmask; the encrypted total, for the
    querier to decrypt (the server holds the public request only).

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

    session, packing, params = request.session, request.packing, request.params
    replies = send({n: step_content("join", records=request.join_records()) for n in nodes})
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
                          + " (fix those sites, or exclude them: --exclude-refusing, or "
                          "analytics-exclude-refusing=true in a deployment, with a new "
                          "request)")
    coord = MaskCoordinator(request.settings, session, verify_keys)
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
    if len(participants) > request.max_sites:
        raise QueryFailed(f"{len(participants)} sites take part, the query's packing holds "
                          f"{request.max_sites}: ask again with a larger max-sites")
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
                                fingerprint=request.key_id, verify_keys=verify_keys,
                                run=session, server_round=coord.epoch)
            if env.header["sender"] != s:
                raise EnvelopeError(f"an envelope of site {env.header['sender']} in the reply of "
                                    f"site {s}")
            if Packing.from_dict(env.header["layout"]) != packing or \
                    env.meta.get("query") != request.query_id:
                raise EnvelopeError("the envelope answers another query or layout")
            coord.take_update(s, env.meta, unpack_doc(r.config_records.get(wire.SHARES),
                                                      "shares"), participants)
        except (EnvelopeError, MaskError) as err:
            excluded[node_of[s]] = f"reply rejected: {err}"
            dropped.append(s)
            continue
        cts[s] = env.chunks
        shape = (len(env.chunks), params.slots)
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
    he = HEContext(params)  # the public parameters only
    try:
        corr = coord.correction(shares, shape[0] * shape[1], he.plain_modulus)
    except RoundAborted as err:
        refusals = {s: replies[node_of[s]] for s in survivors
                    if isinstance(replies.get(node_of[s]), str)}
        raise QueryFailed(f"the masks cannot be removed, so there is no answer: {err}"
                          + (f"; sites refused: {refusals}" if refusals else "")
                          + " (ask again, with a new request in a deployment, when more "
                          "sites answer)") from None
    total = he.weighted_sum([cts[s] for s in survivors], [1] * len(survivors))
    total = he.subtract_plain(total, corr.reshape(shape))
    return EncryptedTotal(query=request.query_id, key=request.key_id, chunks=total,
                          sites=survivors, participants=len(participants), excluded=excluded,
                          dropped=sorted(dropped), seconds=time.perf_counter() - t0,
                          bytes=nbytes)


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

