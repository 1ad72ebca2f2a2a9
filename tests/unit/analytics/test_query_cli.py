"""``fedface query`` on the generated demo federation: through Flower's simulation engine
(the real ServerApp and ClientApp, ``query.analytics`` messages) and in process, as a
table, as JSON and as a plot; bad input refused with the reason and exit code 2."""

import json

import pytest
from typer.testing import CliRunner

from fedface.analytics.demo import prepare_workdir
from fedface.analytics.local import answer, local_statistics, open_table
from fedface.analytics.query import parse
from fedface.cli import app

runner = CliRunner()


def _pooled_answer(workdir, sites, text):
    import csv

    rows = []
    for k in range(sites):
        with open(workdir / "tables" / f"site-{k}.csv", newline="") as fh:
            r = list(csv.reader(fh))
        rows += r if k == 0 else r[1:]
    pooled = workdir / "pooled.csv"
    with open(pooled, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    spec = parse(text)
    return {k: answer(spec, v) for k, v in local_statistics(open_table(pooled), spec).items()}


def test_query_through_the_flower_simulation_engine(tmp_path):
    text = "count, mean(quality), histogram(age; 18, 40, 60, 96) group by sex"
    res = runner.invoke(app, ["query", text, "--sites", "3", "--workdir", str(tmp_path),
                              "--json", "--min-cell", "0"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    want = _pooled_answer(tmp_path, 3, text)
    assert doc["sites"] == [0, 1, 2] and doc["epsilon"] == 0.0
    for row in doc["rows"]:
        w = want[(row["sex"],)]
        assert row["count"] == w["count"]
        assert row["histogram(age)"]["counts"] == w["histogram(age)"]["counts"]
        assert row["mean(quality)"] == pytest.approx(w["mean(quality)"], abs=1e-4)


def test_query_in_process_table_plot_and_dp(tmp_path):
    plot = tmp_path / "h.png"
    res = runner.invoke(app, ["query", "count, histogram(age; 18, 40, 60, 96) group by site",
                              "--sites", "3", "--workdir", str(tmp_path), "--in-process",
                              "--plot", str(plot), "--epsilon", "2"])
    assert res.exit_code == 0, res.output
    assert "epsilon 2" in res.output and "site-2" in res.output
    assert plot.stat().st_size > 5000
    ledger = json.loads((tmp_path / "state" / "site-1" / "analytics-budget-1.json").read_text())
    assert [e["epsilon"] for e in ledger["entries"]] == [2.0]


def test_json_spec_gives_the_same_answer_as_the_text(tmp_path):
    text = "count, sum(images) where age between 30 and 50 group by sex"
    spec = tmp_path / "q.json"
    spec.write_text(json.dumps(parse(text).to_dict()))
    out = []
    for q in (text, str(spec)):
        res = runner.invoke(app, ["query", q, "--sites", "3", "--workdir", str(tmp_path),
                                  "--in-process", "--json", "--min-cell", "0"])
        assert res.exit_code == 0, res.output
        out.append(json.loads(res.output[res.output.index("{"):])["rows"])
    assert out[0] == out[1]


@pytest.mark.parametrize("query,expected", [
    ("count where age >", "position 18"),
    ("mean(height)", "unknown column 'height'"),
    ("count group by quality", "continuous"),
    ("mean(sex)", "categorical"),
])
def test_bad_queries_are_refused_with_the_reason(tmp_path, query, expected):
    res = runner.invoke(app, ["query", query, "--sites", "3", "--workdir", str(tmp_path),
                              "--in-process"])
    assert res.exit_code == 2, res.output
    assert expected in res.output


def test_plot_without_histogram_and_tables_without_schema_are_refused(tmp_path):
    res = runner.invoke(app, ["query", "count", "--sites", "2", "--workdir", str(tmp_path),
                              "--in-process", "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "asks none" in res.output
    res = runner.invoke(app, ["query", "count", "--tables", str(tmp_path)])
    assert res.exit_code == 2 and "--schema" in res.output


def test_demo_workdir_is_made_once_and_remade_for_another_size(tmp_path):
    a = prepare_workdir(tmp_path, 3)
    stamp = (tmp_path / "keys" / "key.json").read_text()
    assert prepare_workdir(tmp_path, 3) == a
    assert (tmp_path / "keys" / "key.json").read_text() == stamp
    prepare_workdir(tmp_path, 4)
    assert json.loads((tmp_path / "keys" / "key.json").read_text())["clients"] == 4
    assert (tmp_path / "tables" / "site-3.csv").exists()
    with pytest.raises(ValueError, match="at least two"):
        prepare_workdir(tmp_path, 1)
