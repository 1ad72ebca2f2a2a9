"""The encrypted query protocol end to end, sites in this process (their real handler, real
keys, masks, BFV ciphertexts and envelopes): answers equal the plaintext answer on the
pooled tables; the server sees only ciphertexts; the server and the querier together
cannot read one site's vector; dropouts are recovered or refused, never answered wrong;
tampered, replayed and forged messages are rejected; budgets and policies are enforced
by the sites."""

import csv
import hashlib
import shutil
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, RecordDict

from client import analytics as site
from client.analytics import SiteSettings
from crypto.context import HEContext, MissingSecretKey
from crypto.envelope import from_record
from crypto.keys import init_keys, load_querier_key, load_server_keys
from crypto.masks import pack_doc, unpack_doc
from crypto.packing import pack_integers
from crypto.signing import new_signing_key
from fedface.analytics import wire
from fedface.analytics.demo import write_demo_tables
from fedface.analytics.local import answer, local_statistics, open_table
from fedface.analytics.query import QueryError, load_schema, parse
from fedface.runner import in_process_transport
from server.analytics import (
    ANALYTICS_PARAMS,
    EncryptedTotal,
    Querier,
    QueryFailed,
    run_query,
)

N = 4


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analytics")
    init_keys(root / "keys", N)
    paths, schema = write_demo_tables(root / "tables", N, rows=120, seed=3)
    return {"root": root, "paths": paths, "schema": load_schema(schema),
            "server": load_server_keys(root / "keys"), "querier": load_querier_key(root / "keys")}


def _sites(fed, tmp_path, n=N, **kw):
    kw.setdefault("exact", True)
    contexts = {k + 1: Context(run_id=1, node_id=k + 1, node_config={"partition-id": k},
                               state=RecordDict(), run_config={}) for k in range(n)}
    settings = {k + 1: SiteSettings(table=str(fed["paths"][k]), keys=str(fed["root"] / "keys"),
                                    state_dir=str(tmp_path / f"state-{k}"), **kw)
                for k in range(n)}
    return contexts, settings


def _plain(fed, spec, sites):
    """The answer on the pooled rows of ``sites`` (one table, no protocol)."""
    pooled = fed["root"] / f"pooled-{'-'.join(map(str, sites))}.csv"
    with open(pooled, "w", newline="") as out:
        w = csv.writer(out)
        for i, k in enumerate(sites):
            with open(fed["paths"][k], newline="") as fh:
                rows = list(csv.reader(fh))
            w.writerows(rows if i == 0 else rows[1:])
    table = open_table(pooled, fed["schema"].__class__(dict(fed["schema"].columns)))
    return {k: answer(spec, v) for k, v in local_statistics(table, spec).items()}


def _ask(fed, tmp_path, text, *, sites=None, drop=None, tamper=None, n=N, exclude=False,
         site_kw=None, **qkw):
    contexts, settings = sites or _sites(fed, tmp_path, n, **(site_kw or {}))
    q = Querier(parse(text), fed["schema"], fed["querier"], min_cell=0, **qkw)
    res = q.release(run_query(q.request, fed["server"].verify_keys,
                              in_process_transport(contexts, settings, drop, tamper),
                              sorted(contexts), exclude_refusing=exclude))
    return q, res


def _close(got, want, tol):
    assert set(got) == set(want)
    for key in want:
        for name, w in want[key].items():
            g = got[key][name]
            if isinstance(w, dict) and "counts" in w:
                assert g["counts"] == w["counts"], (key, name)
            elif isinstance(w, dict):
                for q, v in w.items():
                    assert g[q] == pytest.approx(v, abs=1e-3), (key, name, q)
            elif isinstance(w, int):
                assert g == w, (key, name)
            else:
                assert g == pytest.approx(w, rel=1e-6, abs=tol * max(1, abs(w))), (key, name)


QUERIES = [
    "count",
    "count, sum(images), mean(quality), variance(age)",
    "count, mean(quality) where age >= 60 group by site, sex",
    "histogram(age; 18, 30, 45, 60, 75, 96), quantiles(quality; 0.25, 0.5, 0.9; 0, 0.2, 0.4, "
    "0.6, 0.8, 1.0) group by sex",
    "count, sum(quality) where (sex = 'f' or age between 40 and 50) and not site in ('site-1')",
    "count, variance(quality) where quality > 0.5 and sex != 'm' group by site",
]


@pytest.mark.parametrize("text", QUERIES)
def test_answers_equal_the_plaintext_answer_on_the_pooled_rows(fed, tmp_path, text):
    _, res = _ask(fed, tmp_path, text)
    want = _plain(fed, parse(text), list(range(N)))
    assert res.sites == list(range(N)) and not res.excluded and not res.dropped
    _close(res.groups, want, tol=res.fixed_point_error * 10 + 1e-9)
    real_sum = any(f"{op}(quality" in text for op in ("sum", "mean", "variance"))
    assert res.fixed_point_error == (N * 0.5 / 2**16 if real_sum else 0.0)


def _recorder(log):
    def tamper(step, node, reply):
        log.append((step, node, reply))
        return reply
    return tamper


def test_the_server_sees_only_ciphertexts_it_cannot_decrypt(fed, tmp_path):
    log = []
    _, res = _ask(fed, tmp_path, "count, sum(images) group by site", tamper=_recorder(log))
    server = HEContext(ANALYTICS_PARAMS)  # what the server holds: parameters only
    replies = [r for step, _, r in log if step == "compute"]
    assert len(replies) == N
    for r in replies:
        env = from_record(r.array_records[wire.REPLY])
        assert env.header["kind"] == "analytics-reply" and len(env.chunks) == 1
        server.load(env.chunks[0])  # a valid BFV ciphertext
        with pytest.raises(MissingSecretKey):
            server.decrypt(env.chunks)
        assert not r.metric_records  # nothing else leaves in the clear
    # what a site's replies carry in clear: keys, sealed shares and mask meta, no figure
    fields = {"join": {"sender", "advert"}, "setup": {"sender", "epoch", "public", "sig",
                                                       "holders", "shares"},
              "compute": {"holders", "shares"}, "unmask": {"sender", "epoch", "shares"}}
    for step, _, r in log:
        assert set(unpack_doc(r.config_records[wire.SHARES], "doc")) == fields[step]
    meta = from_record(replies[0].array_records[wire.REPLY]).meta
    assert set(meta) == {"mask-epoch", "mask-participants", "mask-commit", "mask-needed",
                         "mask-key", "query", "noise-shares"}
    assert res.groups  # and the querier got its answer


def test_server_and_querier_together_see_one_site_as_uniform_noise(fed, tmp_path):
    """The collusion the masks close: the querier's secret key on one site's ciphertext."""
    log = []
    q, _ = _ask(fed, tmp_path, "count, histogram(age; 18, 30, 45, 60, 75, 96) group by site, sex",
                tamper=_recorder(log))
    env = from_record(next(r for step, node, r in log if step == "compute" and node == 1)
                      .array_records[wire.REPLY])
    seen = q._he.decrypt(env.chunks)[0]  # the adversary decrypts site 0's own reply
    stats = local_statistics(open_table(fed["paths"][0]), parse(
        "count, histogram(age; 18, 30, 45, 60, 75, 96) group by site, sex"))
    truth = pack_integers(q.layout.encode(stats), q.packing)[0]
    t = HEContext(ANALYTICS_PARAMS).plain_modulus
    assert int(np.sum(truth > 0)) >= 5  # the site has figures to hide
    assert int(np.sum(seen == truth)) <= 2  # none of them shows
    # uniform on [0, t): 16 equal bins, chi-square with 15 degrees of freedom
    counts = np.bincount((seen.astype(np.float64) / t * 16).astype(int), minlength=16)
    chi2 = float(np.sum((counts - len(seen) / 16) ** 2 / (len(seen) / 16)))
    assert chi2 < 45, chi2  # p < 1e-4 under uniformity


@pytest.mark.parametrize("step", ["compute", "unmask"])
def test_a_site_dropping_after_the_masks_are_set_is_recovered(fed, tmp_path, step):
    text = "count, mean(quality), histogram(age; 18, 45, 96) group by sex"
    _, res = _ask(fed, tmp_path, text, drop=lambda s, node: s == step and node == 3)
    # dropped before sending: its masks are removed, its figures are not in the sum;
    # dropped after sending: its ciphertext is in the sum, its self mask recovered
    sites = [0, 1, 3] if step == "compute" else list(range(N))
    assert res.dropped == ([2] if step == "compute" else [])
    assert res.sites == sites
    _close(res.groups, _plain(fed, parse(text), sites), tol=1e-3)


def test_too_many_dropouts_fail_the_query_never_a_wrong_answer(fed, tmp_path):
    with pytest.raises(QueryFailed, match="masks cannot be removed"):
        _ask(fed, tmp_path, "count", drop=lambda s, node: s == "unmask" and node in (2, 3, 4))


def test_a_tampered_reply_is_rejected_and_the_rest_answered(fed, tmp_path):
    def tamper(step, node, reply):
        if step == "compute" and node == 2:
            rec = reply.array_records[wire.REPLY]
            ct = rec["ct-00000"].numpy().copy()
            ct[100] ^= 1
            rec["ct-00000"] = Array(ct)
        return reply
    _, res = _ask(fed, tmp_path, "count, sum(images)", tamper=tamper)
    assert "reply rejected" in res.excluded[2] and "tampered" in res.excluded[2]
    assert res.dropped == [1]
    _close(res.groups, _plain(fed, parse("count, sum(images)"), [0, 2, 3]), tol=0)


def test_a_reply_replayed_from_another_query_is_rejected(fed, tmp_path):
    log = []
    _ask(fed, tmp_path, "count", tamper=_recorder(log))
    old = next(r for step, node, r in log if step == "compute" and node == 2)

    def replay(step, node, reply):
        if step == "compute" and node == 2:
            return RecordDict({wire.REPLY: old.array_records[wire.REPLY],
                               wire.SHARES: reply.config_records[wire.SHARES]})
        return reply
    _, res = _ask(fed, tmp_path / "b", "count", tamper=replay)
    assert "another key" in res.excluded[2] or "replayed" in res.excluded[2]
    assert res.dropped == [1]


def test_a_replayed_query_a_swapped_key_and_a_forged_query_are_refused(fed, tmp_path):
    contexts, settings = _sites(fed, tmp_path)
    q = Querier(parse("count"), fed["schema"], fed["querier"])
    join = RecordDict({wire.STEP: pack_doc({"step": "join"}), **q.request.join_records()})
    site.handle(contexts[1], settings[1], join)
    with pytest.raises(Exception, match="joined before"):  # the same session again
        site.handle(contexts[1], settings[1], join)
    other = HEContext.fresh(ANALYTICS_PARAMS).public_key_bytes()
    swapped = RecordDict({**join, wire.KEY: ArrayRecord(
        {"key": Array(np.frombuffer(other, np.uint8).copy())})})
    with pytest.raises(QueryError, match="not the one the querier signed"):
        site.handle(contexts[2], settings[2], swapped)
    forged = Querier(parse("count"), fed["schema"], new_signing_key())
    with pytest.raises(QueryError, match="signature does not verify"):
        site.handle(contexts[3], settings[3], RecordDict(
            {wire.STEP: pack_doc({"step": "join"}), **forged.request.join_records()}))
    with pytest.raises(QueryFailed, match="stale key"):
        q.release(EncryptedTotal(query=q.request.query_id, key="0" * 32, chunks=[], sites=[0, 1],
                                 participants=2))


def test_a_site_with_another_schema_or_no_table_is_named(fed, tmp_path):
    bad = tmp_path / "other.csv"
    with open(bad, "w", newline="") as fh:
        csv.writer(fh).writerows([["site", "sex", "years"], ["site-1", "f", "40"]])
    contexts, settings = _sites(fed, tmp_path)
    settings[2] = replace(settings[2], table=str(bad))
    settings[3] = replace(settings[3], table=str(tmp_path / "missing.csv"))
    with pytest.raises(QueryFailed) as err:
        _ask(fed, tmp_path, "count", sites=(contexts, settings))
    msg = str(err.value)
    assert "node 2" in msg and "lacks the column 'age'" in msg
    assert "node 3" in msg and "does not exist" in msg and "--exclude-refusing" in msg
    contexts, settings = _sites(fed, tmp_path / "x")
    settings[2] = replace(settings[2], table=str(bad))
    _, res = _ask(fed, tmp_path, "count", sites=(contexts, settings), exclude=True)
    assert list(res.excluded) == [2] and res.sites == [0, 2, 3]
    _close(res.groups, _plain(fed, parse("count"), [0, 2, 3]), tol=0)


def test_site_budget_is_spent_on_the_site_and_refuses_once_gone(fed, tmp_path):
    before = hashlib.sha256(fed["paths"][0].read_bytes()).hexdigest()
    contexts, settings = _sites(fed, tmp_path, budget=1.5)
    _ask(fed, tmp_path, "count, mean(quality)", sites=(contexts, settings), epsilon=1.0)
    contexts, settings = _sites(fed, tmp_path, budget=1.5)  # a later query, same sites
    with pytest.raises(QueryFailed, match="privacy budget spent.*0.5 of 1.5 left"):
        _ask(fed, tmp_path, "count", sites=(contexts, settings), epsilon=1.0)
    ledger = settings[1].budget_of(0)
    assert ledger.spent == pytest.approx(1.0)
    assert hashlib.sha256(fed["paths"][0].read_bytes()).hexdigest() == before


def test_a_site_answering_only_dp_queries_refuses_exact_ones(fed, tmp_path):
    contexts, settings = _sites(fed, tmp_path)
    settings[1] = replace(settings[1], exact=False)
    with pytest.raises(QueryFailed, match="answers only queries with differential privacy"):
        _ask(fed, tmp_path, "count", sites=(contexts, settings))


def test_dp_noise_reaches_the_target_variance_in_the_sum(fed, tmp_path):
    want = _plain(fed, parse("count"), list(range(N)))[()]["count"]
    errors = []
    for i in range(12):
        q, res = _ask(fed, tmp_path / str(i), "count", epsilon=1.0, site_kw={"budget": 1.0})
        errors.append(res.groups[()]["count"] - want)
    # each site adds Sk(mu / needed); all N sites answered: variance 2 mu N / needed
    needed = q.settings.needed(N)
    var = 2 * q.mu * N / needed
    assert res.count_noise_std == pytest.approx(np.sqrt(var))
    assert 0.25 * var < np.mean(np.square(errors)) < 3.0 * var
    assert any(e != 0 for e in errors)


def test_small_cells_are_blanked(fed, tmp_path):
    text = "count, histogram(age; 18, 25, 60, 96) group by site"
    contexts, settings = _sites(fed, tmp_path)
    q = Querier(parse(text), fed["schema"], fed["querier"], min_cell=30)
    res = q.release(run_query(q.request, fed["server"].verify_keys,
                              in_process_transport(contexts, settings), sorted(contexts)))
    want = _plain(fed, parse(text), list(range(N)))
    for key, stats in want.items():
        if stats["count"] < 30:
            assert key in res.suppressed and key not in res.groups
        else:
            counts = res.groups[key]["histogram(age)"]["counts"]
            assert counts == [c if c >= 30 else None for c in stats["histogram(age)"]["counts"]]


def test_an_exact_answer_is_released_in_one_sum_of_sites_only(fed, tmp_path):
    """Differencing: the same exact query over {0,1,2,3} and then {0,1,2} would give site
    3's figures; its neighbours refuse to unmask the second sum."""
    contexts, settings = _sites(fed, tmp_path)
    _ask(fed, tmp_path, "count, sum(images)", sites=(contexts, settings))
    contexts2, _ = _sites(fed, tmp_path)
    with pytest.raises(QueryFailed, match="already unmasked"):
        _ask(fed, tmp_path, "count, sum(images)", sites=(contexts2, settings),
             drop=lambda s, node: s == "compute" and node == 4)


def test_undeclared_group_and_bad_query_are_refused_before_any_site(fed, tmp_path):
    with pytest.raises(QueryError, match="group by age.*continuous"):
        Querier(parse("count group by age"), fed["schema"], fed["querier"])
    with pytest.raises(QueryError, match="declared range"):
        Querier(parse("sum(quality)"), fed["schema"].__class__(dict(fed["schema"].columns)),
                fed["querier"], epsilon=1.0)
    paths = list(fed["paths"])
    other = tmp_path / "site-x.csv"
    shutil.copy(paths[0], other)
    text = other.read_text().replace("site-0,f,", "site-9,f,")
    other.write_text(text)
    contexts, settings = _sites(fed, tmp_path)
    settings[1] = replace(settings[1], table=str(other))
    with pytest.raises(QueryFailed, match="site-9"):
        _ask(fed, tmp_path, "count group by site", sites=(contexts, settings))


def test_a_server_repeating_participants_cannot_thin_the_noise(fed, tmp_path):
    """The server names participant 0 many times so that each site would divide its noise
    by a larger threshold; the sites count each participant once."""
    seen = []

    def outgoing(step, node, content):
        if step == "compute":
            doc = unpack_doc(content.config_records[wire.STEP], "step")
            doc["mask"]["participants"] = [0] * 20 + doc["mask"]["participants"]
            content = RecordDict({**content, wire.STEP: pack_doc(doc)})
        return content

    def record(step, node, reply):
        if step == "compute":
            seen.append(from_record(reply.array_records[wire.REPLY]).meta["noise-shares"])
        return reply

    contexts, settings = _sites(fed, tmp_path)
    q = Querier(parse("count"), fed["schema"], fed["querier"], epsilon=1.0, min_cell=0)
    run_query(q.request, fed["server"].verify_keys,
              in_process_transport(contexts, settings, tamper=record, outgoing=outgoing),
              sorted(contexts))
    assert seen == [q.settings.needed(N)] * N


def test_the_server_cannot_ask_a_query_of_its_own(fed, tmp_path):
    contexts, settings = _sites(fed, tmp_path)
    q = Querier(parse("count"), fed["schema"], fed["server"].sign_key)  # not the querier's key
    with pytest.raises(QueryError, match="signature does not verify"):
        site.handle(contexts[1], settings[1], RecordDict(
            {wire.STEP: pack_doc({"step": "join"}), **q.request.join_records()}))


def test_a_stale_query_and_a_large_delta_are_refused(fed, tmp_path):
    from crypto.signing import sign

    contexts, settings = _sites(fed, tmp_path)
    q = Querier(parse("count"), fed["schema"], fed["querier"])
    q.request.doc["issued"] -= 7200  # signed two hours ago
    q.request.signature = sign(fed["querier"], wire.canonical(q.request.doc))
    with pytest.raises(QueryError, match=r"issued 720\d s ago; .* within 3600 s"):
        site.handle(contexts[1], settings[1], RecordDict(
            {wire.STEP: pack_doc({"step": "join"}), **q.request.join_records()}))
    with pytest.raises(QueryFailed, match="delta 0.01 is above this site's analytics-max-delta"):
        _ask(fed, tmp_path, "count", epsilon=1.0, delta=0.01)


def test_more_sites_than_the_packing_holds_and_overflowing_figures_are_refused(fed, tmp_path):
    with pytest.raises(QueryFailed, match="packing holds 3"):
        _ask(fed, tmp_path, "count", max_sites=3)
    big = tmp_path / "big.csv"
    text = fed["paths"][0].read_text().splitlines()
    head, first = text[0], text[1].split(",")
    first[-1] = str(2**60)  # images
    big.write_text("\n".join([head, ",".join(first), *text[2:]]) + "\n")
    contexts, settings = _sites(fed, tmp_path / "b")
    settings[1] = replace(settings[1], table=str(big))
    with pytest.raises(QueryFailed, match="overflow"):
        _ask(fed, tmp_path, "sum(images)", sites=(contexts, settings))
