"""A site's side of an encrypted analytics query (the querier's and the server's:
:mod:`server.analytics`).

A query is four ``query.analytics`` exchanges, named by the ``step`` of its config record:

1. **join**: the querier's signed query and its fresh public key. The site checks the
   signature (the ceremony's server key: nobody else can make a site spend work or budget),
   that the key is the one signed, that the session is new (a replayed query is refused),
   its own table against the declared schema, the query against the table and its privacy
   policy (exact answers allowed? budget left?); it computes its figures once
   (:func:`fedface.analytics.local.local_statistics` in SQLite) and advertises a signed run
   key for the masks (:mod:`client.masking`).
2. **setup**: the neighbours' run keys; the site advertises its mask key, its private half
   Shamir-shared to its holders.
3. **compute**: the participants and their signed mask keys. The site charges its budget
   (DP queries), adds its share of the Skellam noise, masks its integer vector with
   pairwise masks that cancel in the sum, encrypts it under the querier's key and signs
   the envelope (run, query, sender; :mod:`crypto.envelope`).
4. **unmask**: the survivors; the site returns the shares the server needs to remove the
   masks that do not cancel (the self masks of survivors, the pairwise masks of the
   dropped), under the checks of :func:`client.masking.unmask`, and only if enough
   survivors remain to carry the noise it counted on.

Nothing the site sends can be read by the server; the querier can decrypt only the sum.
The site's table is opened read-only and never written.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict

from client import masking
from client.he import node_keys
from crypto import masks
from crypto.context import HEContext, HEParams
from crypto.envelope import seal_envelope, to_record
from crypto.keys import ClientKeys
from crypto.masks import MaskError, MaskSettings, pack_doc, unpack_doc
from crypto.packing import integer_layout, pack_integers
from crypto.signing import SignatureError, verify
from fedface.analytics.local import SiteTable, local_statistics, open_table
from fedface.analytics.privacy import (
    BudgetExhausted,
    SiteBudget,
    calibrate,
    sensitivities,
    skellam_noise,
)
from fedface.analytics.query import QueryError, QuerySpec, Schema, validate
from fedface.analytics.vector import Layout
from fedface.analytics.wire import (
    KEY,
    KIND,
    PURPOSE,
    QUERY,
    REPLY,
    SHARES,
    STEP,
    VERSION,
    canonical,
    key_id,
    query_digest,
)
from fedface.io import hash_file
from fedface.protocol import (
    NODE_ANALYTICS_BUDGET,
    NODE_ANALYTICS_EXACT,
    NODE_ANALYTICS_MAX_DELTA,
    NODE_ANALYTICS_TABLE,
    NODE_PARTITION_ID,
    NODE_STATE_DIR,
)

STATE = "analytics-state"


class QueryRefused(QueryError):
    """A query this site will not answer, and why (the reply's error reason)."""


@dataclass(frozen=True)
class SiteSettings:
    """Where a site keeps what a query needs (node config wins over these defaults).

    Parameters
    ----------
    table : str
        Its table (``analytics-table``); ``{partition}`` is replaced by the node's
        partition id (simulation: one table per institution in one folder).
    keys : str
        The key-ceremony folder (``he-keys``, with ``he-sender``).
    state_dir : str
        Its state folder (``state-dir``): the privacy ledger and release record live there.
    budget : float
        Epsilon it spends on DP queries, all together (``analytics-budget``).
    exact : bool
        Whether it answers queries without noise (``analytics-exact``; off unless the site
        says so: an exact total of two sites, or grouped by site, is their own figures).
        An exact answer from a table is released in one sum of sites only.
    max_delta : float
        The largest delta of a DP query it answers (``analytics-max-delta``).
    max_age : float
        Seconds a signed query stays valid after it was issued (a replay after that is
        refused even where the site's state was lost).
    """

    table: str = ""
    keys: str = ""
    state_dir: str = ""
    budget: float = 10.0
    exact: bool = False
    max_delta: float = 1e-5
    max_age: float = 3600.0

    @classmethod
    def of(cls, context: Context, defaults: dict | None = None) -> SiteSettings:
        d = dict(defaults or {})
        node = context.node_config
        part = str(node.get(NODE_PARTITION_ID, context.node_id))
        table = str(node.get(NODE_ANALYTICS_TABLE, d.get("table", ""))).replace("{partition}", part)
        state = str(node.get(NODE_STATE_DIR, d.get("state_dir", ""))).replace("{partition}", part)
        exact = node.get(NODE_ANALYTICS_EXACT, d.get("exact", False))
        if isinstance(exact, str):
            exact = exact.strip().lower() in ("1", "true", "yes")
        return cls(table=table, keys=str(d.get("keys", "")), state_dir=state,
                   budget=float(node.get(NODE_ANALYTICS_BUDGET, d.get("budget", 10.0))),
                   exact=bool(exact),
                   max_delta=float(node.get(NODE_ANALYTICS_MAX_DELTA, d.get("max_delta", 1e-5))))

    def releases_path(self, sender: int) -> Path | None:
        return Path(self.state_dir) / f"analytics-releases-{sender}.json" if self.state_dir else None

    def budget_of(self, sender: int) -> SiteBudget | None:
        if not self.state_dir:
            return None
        return SiteBudget(Path(self.state_dir) / f"analytics-budget-{sender}.json", self.budget)


def read_query(doc: dict, signature: bytes, public_key: bytes, querier_key,
               max_age: float = 3600.0) -> dict:
    """The query, once its signature (the ceremony's querier key), its key and its age are
    checked."""
    if querier_key is None:
        raise QueryRefused("this site's key ceremony names no analytics querier (made before "
                           "queries existed): rotate the ceremony (`fedface keys rotate`) and "
                           "install the new folders")
    try:
        verify(querier_key, bytes(signature), canonical(doc), "the querier's query")
    except SignatureError:
        raise QueryRefused("the query's signature does not verify against the key ceremony's "
                           "server key: not made by the federation's querier, or altered on "
                           "the way; refused") from None
    if doc.get("purpose") != PURPOSE or doc.get("version") != VERSION:
        raise QueryRefused(f"not an analytics query of version {VERSION} (purpose "
                           f"{doc.get('purpose')!r}, version {doc.get('version')!r})")
    if doc.get("key") != key_id(public_key):
        raise QueryRefused("the public key that came with the query is not the one the querier "
                           "signed (swapped on the way, or a stale key of another query); "
                           "refused")
    session, query = str(doc.get("session", "")), str(doc.get("query", ""))
    if not query or not session.endswith("/" + query):
        raise QueryRefused(f"session {session!r} does not belong to query {query!r}: refused")
    age = time.time() - float(doc.get("issued", 0))
    if not -300 <= age <= max_age:
        raise QueryRefused(f"the query was issued {age:.0f} s ago; this site answers queries "
                           f"issued within {max_age:.0f} s (a replay, or the clocks differ): "
                           "ask again")
    return doc


def _state(context: Context) -> dict:
    if STATE not in context.state:
        raise QueryRefused("no query joined on this node (the join step did not reach it)")
    return unpack_doc(context.state[STATE], "analytics state")


def _layouts(doc: dict) -> tuple[QuerySpec, Schema, Layout, HEParams]:
    spec = QuerySpec.from_dict(doc["spec"])
    schema = Schema.from_dict(doc["schema"])
    layout = Layout.build(spec, schema, {g: list(schema.categories.get(g, ()))
                                         for g in spec.group_by}, int(doc["frac_bits"]))
    return spec, schema, layout, HEParams(**doc["params"])


def join(context: Context, keys: ClientKeys, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Check the query and this site's table against it; compute the figures; advertise a
    run key for the masks."""
    doc = unpack_doc(content.config_records.get(QUERY), "analytics query")
    try:
        signature = bytes.fromhex(str(doc.pop("signature")))
    except (KeyError, ValueError):
        raise QueryRefused("the query carries no signature: refused") from None
    if KEY not in content.array_records:
        raise QueryRefused("the query came without the querier's public key")
    public = content.array_records[KEY]["key"].numpy().tobytes()
    doc = read_query(doc, signature, public, keys.querier_verify_key, site.max_age)
    spec, schema, layout, params = _layouts(doc)
    if not site.state_dir:
        raise QueryRefused(f"site {keys.sender} keeps no state folder (set its state-dir): its "
                           "privacy ledger and the record of what it released live there")
    if not site.table:
        raise QueryRefused("this site has no analytics table: set its node config "
                           "analytics-table=PATH (a CSV or SQLite file)")
    try:
        table = open_table(site.table)
    except QueryError as err:
        raise QueryRefused(f"site {keys.sender}: {err}") from None
    wrong = schema.mismatches(table.schema)
    if wrong:
        raise QueryRefused(f"site {keys.sender}'s table {Path(site.table).name} does not have the "
                           f"declared schema: {'; '.join(wrong)}")
    # the declared types (SQLite compares an integer column with real bounds as numbers)
    table = SiteTable(table.engine, table.table, Schema(dict(schema.columns)))
    validate(spec, table.schema)
    epsilon, delta = float(doc["epsilon"]), float(doc["delta"])
    if epsilon <= 0 and not site.exact:
        raise QueryRefused(f"site {keys.sender} answers only queries with differential privacy "
                           "(its analytics-exact is false): ask again with an epsilon")
    if epsilon > 0:
        if delta > site.max_delta:
            raise QueryRefused(f"delta {delta:g} is above this site's analytics-max-delta "
                               f"{site.max_delta:g}: ask with a smaller delta")
        budget = site.budget_of(keys.sender)
        left = site.budget - budget.spent
        if epsilon > left + 1e-12:
            raise BudgetExhausted(f"privacy budget spent: site {keys.sender} has epsilon {left:.3g} "
                                  f"of {site.budget:.3g} left, this query asks {epsilon:.3g}; "
                                  "refused here")
        _noise_plan(doc, layout, schema)  # refuses ranges the noise cannot cover
    clip = dict(schema.ranges) if epsilon > 0 else None
    vector = layout.encode(local_statistics(table, spec, clip))
    _check_room(vector, doc, "its figures")
    releases = masking.Releases(context, site.releases_path(keys.sender))
    advert = masking.run_advert(context, keys, doc["session"], releases)
    context.state[STATE] = pack_doc({"query": doc, "public": public.hex(),
                                     "vector": [int(v) for v in vector],
                                     "table": hash_file(site.table).hexdigest()})
    return RecordDict({SHARES: pack_doc({"sender": keys.sender, "advert": unpack_doc(advert, "")})})


def setup(context: Context, keys: ClientKeys, content: RecordDict) -> RecordDict:
    doc = _state(context)["query"]
    step = unpack_doc(content.config_records.get(STEP), "analytics step")
    rec = masking.setup(context, keys, doc["session"], step.get("mask", {}),
                        MaskSettings(**doc["settings"]))
    return RecordDict({SHARES: rec})


LAM_MAX = 1e18  # numpy's Poisson draws stop near 9.2e18


def _noise_plan(doc: dict, layout: Layout, schema: Schema) -> tuple[np.ndarray, float]:
    """Per-coordinate sensitivities and the Skellam ``mu`` of a DP query, computed by the
    site itself (never taken from the querier); a range too wide to draw noise for is
    refused before anything is charged."""
    units, moved = sensitivities(layout, schema.ranges)
    mu = calibrate(float(doc["epsilon"]), float(doc["delta"]), moved)
    if mu * float(np.max(units)) ** 2 > LAM_MAX:
        raise QueryRefused("a declared range is too wide for DP noise on its sum of squares "
                           f"at {doc['frac_bits']} fixed-point bits: narrow the range, lower "
                           "frac-bits, or ask the mean instead of the variance")
    return units, mu


def _check_room(vector: np.ndarray, doc: dict, what: str) -> None:
    """Refuse values whose sum over ``max_sites`` sites could leave int64."""
    room = (2**63 - 1) // int(doc["max_sites"])
    if vector.size and int(np.max(np.abs(vector.astype(object)))) > room:
        raise QueryRefused(f"{what} exceed what {doc['max_sites']} sites can sum without "
                           "overflow: narrow the declared ranges or lower frac-bits")


def noise_shares(doc: dict, participants: list[int]) -> int:
    """How many sites' noise the released total is sure to hold: the masks' threshold of
    the participants (fewer survivors cannot unmask the sum)."""
    return MaskSettings(**doc["settings"]).needed(len(participants))


def compute(context: Context, keys: ClientKeys, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Noise, mask, encrypt and sign this site's vector."""
    state = _state(context)
    doc = state["query"]
    _, schema, layout, params = _layouts(doc)
    step = unpack_doc(content.config_records.get(STEP), "analytics step")
    mask_doc = step.get("mask", {})
    vector = np.asarray(state["vector"], dtype=np.int64)
    epsilon, delta = float(doc["epsilon"]), float(doc["delta"])
    ctx = HEContext(params, public_key=bytes.fromhex(state["public"]))
    packing = integer_layout(layout.size, int(doc["max_sites"]), params.slots, params.plain_bits)
    t = ctx.plain_modulus
    if epsilon > 0:  # fresh noise: each release charged on its own
        update = f"{query_digest(doc)}|dp"
    else:  # exact: what this table gives is released in one sum of sites, whatever asked
        update = f"exact|{state['table']}"
    shape = (packing.ciphertexts, params.slots)
    # the masks first: mask_update checks the participants (and removes repeated ones)
    mask, meta, shares = masking.mask_update(context, keys, doc["session"], mask_doc, shape, t,
                                             int(mask_doc.get("epoch", 0)), update)
    participants = list(meta["mask-participants"])
    if len(participants) > int(doc["max_sites"]):
        raise QueryRefused(f"{len(participants)} participants, the query's packing holds "
                           f"{doc['max_sites']}: refused (the sum could overflow)")
    shares_count = noise_shares(doc, participants) if epsilon > 0 else 0
    if epsilon > 0:
        units, mu = _noise_plan(doc, layout, schema)
        site.budget_of(keys.sender).charge(doc["query"], query_digest(doc), epsilon, delta)
        rng = np.random.default_rng(secrets.randbits(128))
        vector = vector + skellam_noise(rng, units, mu, shares_count)
        _check_room(vector, doc, "its noisy figures")
    slots = pack_integers(vector, packing)
    chunks = ctx.encrypt(masks.add_mod(slots, mask, t))
    env = seal_envelope(KIND, chunks, sign_key=keys.sign_key, fingerprint=doc["key"],
                        generation=0, params=params.to_dict(), run=doc["session"],
                        server_round=int(mask_doc.get("epoch", 0)), sender=keys.sender,
                        layout=packing.to_dict(), spec=query_digest(doc),
                        meta={**meta, "query": doc["query"], "noise-shares": shares_count})
    return RecordDict({REPLY: to_record(env), SHARES: shares})


def unmask(context: Context, keys: ClientKeys, site: SiteSettings, content: RecordDict) -> RecordDict:
    state = _state(context)
    doc = state["query"]
    step = unpack_doc(content.config_records.get(STEP), "analytics step")
    mask_doc = step.get("mask", {})
    survivors = set(mask_doc.get("survivors", []))
    rounds = unpack_doc(context.state.get(masking.STATE), "mask state").get("rounds", {})
    mine = rounds.get(str(mask_doc.get("epoch")), {}).get("participants", [])
    if float(doc["epsilon"]) > 0 and len(survivors) < noise_shares(doc, mine):
        raise MaskError(f"{len(survivors)} survivors, but this site's noise counted on at least "
                        f"{noise_shares(doc, mine)} sites in the sum: refused (the total would "
                        "carry less noise than the query's epsilon promises)")
    releases = masking.Releases(context, site.releases_path(keys.sender))
    return RecordDict({SHARES: masking.unmask(context, keys, doc["session"], mask_doc, releases)})


HANDLERS = {"join": join, "setup": lambda c, k, s, m: setup(c, k, m), "compute": compute,
         "unmask": unmask}


def handle(context: Context, site: SiteSettings, content: RecordDict) -> RecordDict:
    """Answer one step of a query (what the ClientApp's ``query.analytics`` runs)."""
    step = unpack_doc(content.config_records.get(STEP), "analytics step").get("step")
    if step not in HANDLERS:
        raise QueryRefused(f"unknown analytics step {step!r}: expected one of "
                           f"{', '.join(HANDLERS)}")
    keys = node_keys(context, site.keys)
    return HANDLERS[step](context, keys, site, content)
