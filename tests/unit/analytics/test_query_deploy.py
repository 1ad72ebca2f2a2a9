"""A query as a deployment runs it: the querier prepares a signed request and keeps the
secret key on its own machine (``fedface query-request``); the coordinator runs the
project's own ServerApp with ``analytics-request=PATH`` (what ``flwr run . -c`` does),
here in Flower's simulation engine, and writes only the encrypted total; the querier opens
it (``fedface query-open``). The server's side never holds the secret key."""

import json

import pytest
from typer.testing import CliRunner

from client.app import build_client_app
from fedface.analytics.demo import prepare_workdir
from fedface.analytics.local import answer, local_statistics, open_table
from fedface.analytics.query import parse
from fedface.cli import app
from fedface.runner import _simulate
from server.app import TOTAL_FILE, build_server_app

runner = CliRunner()
TEXT = "count, sum(images), histogram(age; 18, 40, 60, 96) group by sex"


def _pooled(paths, n):
    import csv

    rows = []
    for k in range(n):
        with open(paths["table"].replace("{partition}", str(k)), newline="") as fh:
            r = list(csv.reader(fh))
        rows += r if k == 0 else r[1:]
    return rows


def test_a_deployed_query_keeps_the_secret_with_the_querier(tmp_path):
    paths = prepare_workdir(tmp_path / "fed", 3)
    req = tmp_path / "querier"
    res = runner.invoke(app, ["query-request", TEXT, "--schema", paths["schema"], "--keys",
                              paths["keys"], "--out", str(req), "--min-cell", "0"])
    assert res.exit_code == 0, res.output
    assert "flwr run . fedface" in res.output and "analytics-request" in res.output
    secret = (req / "querier-secret.key").read_bytes()
    assert (req / "querier-secret.key").stat().st_mode & 0o077 == 0

    out = tmp_path / "coordinator-out"
    result: dict = {}
    server_app = build_server_app({"analytics-request": str(req / "request.json"),
                                   "he-keys": paths["keys"], "out": str(out),
                                   "analytics-sites": 3}, result=result)
    _simulate(server_app, build_client_app(analytics={**paths, "exact": True}), 3, 1.0, True)
    assert "error" not in result, result.get("error")
    total_path = out / TOTAL_FILE
    assert result["total_path"] == str(total_path)
    # what the coordinator holds: the request and the total, no secret
    import base64
    for f in (req / "request.json", total_path):
        text = f.read_bytes()
        assert secret[64:96] not in text and secret[64:96].hex().encode() not in text
        assert base64.b64encode(secret)[100:140] not in text
    total = json.loads(total_path.read_text())
    assert total["sites"] == [0, 1, 2] and len(total["chunks"]) == 1

    res = runner.invoke(app, ["query-open", str(req), str(total_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    pooled = tmp_path / "pooled.csv"
    import csv
    with open(pooled, "w", newline="") as fh:
        csv.writer(fh).writerows(_pooled(paths, 3))
    spec = parse(TEXT)
    want = {k: answer(spec, v) for k, v in local_statistics(open_table(pooled), spec).items()}
    assert {(r["sex"],): {k: v for k, v in r.items() if k != "sex"} for r in doc["rows"]} == want

    # another query's folder cannot open this total
    other = tmp_path / "other"
    assert runner.invoke(app, ["query-request", "count", "--schema", paths["schema"], "--keys",
                               paths["keys"], "--out", str(other)]).exit_code == 0
    res = runner.invoke(app, ["query-open", str(other), str(total_path)])
    assert res.exit_code == 2 and "another query's total" in res.output
    # a second request into the same folder would destroy a pending query's key: refused
    res = runner.invoke(app, ["query-request", "count", "--schema", paths["schema"], "--keys",
                              paths["keys"], "--out", str(req)])
    assert res.exit_code == 2 and "already holds a query request" in res.output
    assert (req / "querier-secret.key").read_bytes() == secret
    # a damaged secret key, a tampered total: named, no traceback
    (other / "querier-secret.key").write_bytes(secret)
    res = runner.invoke(app, ["query-open", str(other), str(total_path)])
    assert res.exit_code == 2 and "is not the secret key of this request" in res.output
    bad = json.loads(total_path.read_text())
    bad["sites"] = [0]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = runner.invoke(app, ["query-open", str(req), str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "malformed" in res.output
    bad["excluded"] = [1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = runner.invoke(app, ["query-open", str(req), str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "not an encrypted query total" in res.output


@pytest.mark.parametrize("args,expected", [
    (["query-open", "nowhere", "x.json"], "holds no request.json"),
    (["query-open", "req", "x.json"], "not a query request"),
    (["query-request", "count", "--schema", "missing.json", "--keys", "k"], "does not exist"),
])
def test_deployed_query_bad_input(tmp_path, args, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "req").mkdir()
    (tmp_path / "req" / "request.json").write_text(json.dumps({"doc": {"spec": 1},
                                                                "signature": "00",
                                                                "public_key": ""}))
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert expected in res.output


def test_a_query_job_without_its_request_file_or_keys_says_so(tmp_path):
    from fedface.config import QueryJobConfig, RunConfig
    from server.analytics import QueryFailed
    from server.app import run_query_job

    job = QueryJobConfig(analytics_request=str(tmp_path / "nope.json"))
    with pytest.raises(QueryFailed, match="no such file on the coordinator"):
        run_query_job(None, RunConfig(he_keys=str(tmp_path)), job)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(QueryFailed, match="needs he-keys"):
        run_query_job(None, RunConfig(), QueryJobConfig(analytics_request=str(tmp_path / "r.json")))
