"""A site's table answered by SQLite: CSV and SQLite files give the same figures, equal to a
direct computation on the rows; bad tables are refused with the reason."""

import csv
import sqlite3

import numpy as np
import pytest
import sqlalchemy as sa

from fedface.analytics.local import answer, local_statistics, open_table
from fedface.analytics.query import QueryError, Schema, parse

COLUMNS = ("site", "sex", "age", "quality")


def _rows(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [("a" if i % 3 else "b", rng.choice(["f", "m", "x"]), int(rng.integers(18, 95)),
             round(float(rng.random()), 4)) for i in range(n)]


def _csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return path


def _sqlite(path, rows):
    con = sqlite3.connect(path)
    con.execute("create table faces (site text, sex text, age integer, quality real)")
    con.executemany("insert into faces values (?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


def test_csv_and_sqlite_tables_answer_every_operation_exactly(tmp_path):
    rows = _rows()
    spec = parse("count, sum(age), mean(quality), variance(quality), "
                 "histogram(age; 18, 40, 65, 95), quantiles(age; 0.5; 18, 40, 65, 95) "
                 "where age >= 30 and (sex in ('f', 'x') or quality < 0.2) group by site")
    a = local_statistics(open_table(_csv(tmp_path / "t.csv", rows)), spec)
    b = local_statistics(open_table(_sqlite(tmp_path / "t.sqlite", rows)), spec)
    assert a.keys() == b.keys() == {("a",), ("b",)}
    for key in a:
        assert a[key] == pytest.approx(b[key])
        kept = [r for r in rows if r[0] == key[0] and r[2] >= 30
                and (r[1] in ("f", "x") or r[3] < 0.2)]
        q = np.array([r[3] for r in kept])
        ages = np.array([r[2] for r in kept])
        res = answer(spec, a[key])
        assert res["count"] == len(kept)
        assert res["sum(age)"] == ages.sum()
        assert res["mean(quality)"] == pytest.approx(q.mean())
        assert res["variance(quality)"] == pytest.approx(q.var(ddof=1))
        hist = np.histogram(ages, bins=[18, 40, 65, 95])[0]  # last bin closed, as ours
        assert res["histogram(age)"]["counts"] == list(hist)
        median = res["quantiles(age)"]["0.5"]
        assert abs(median - np.median(ages)) <= 25  # within the bin it falls in


def test_a_declared_schema_is_used_and_a_bad_cell_is_named(tmp_path):
    path = _csv(tmp_path / "t.csv", [("a", "f", "40", "0.5"), ("a", "m", "old", "0.1")])
    with pytest.raises(QueryError, match="line 3 column age: 'old' is not an integer"):
        open_table(path, Schema({"site": "categorical", "age": "integer"}))
    site = open_table(path)  # read from the data: 'old' makes age categorical
    assert site.schema.columns["age"] == "categorical"
    with pytest.raises(QueryError, match="'age' is categorical"):
        local_statistics(site, parse("mean(age)"))


@pytest.mark.parametrize("name, content, why", [
    ("none.csv", None, "does not exist"),
    ("t.txt", "x", "use a .csv or a SQLite"),
    ("e.csv", "", "is empty"),
    ("d.csv", "a,a\n1,2\n", "named twice"),
    ("r.csv", "a,b\n1\n", "line 2: 1 cells for 2"),
    ("n.sqlite", "not sqlite at all" * 10, "not a readable SQLite"),
])
def test_bad_tables_are_refused_with_the_reason(tmp_path, name, content, why):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(QueryError, match=why):
        open_table(tmp_path / name)


def test_a_sqlite_file_with_several_tables_needs_the_name_and_is_never_written(tmp_path):
    path = _sqlite(tmp_path / "t.db", _rows(10))
    con = sqlite3.connect(path)
    con.execute("create table other (x integer)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(QueryError, match="holds 2 tables"):
        open_table(path)
    site = open_table(path, table="faces")
    assert local_statistics(site, parse("count"))[()]["count"] == 10
    with pytest.raises(sa.exc.OperationalError, match="readonly"):  # the data cannot change
        with site.engine.begin() as conn:
            conn.execute(site.table.delete())
    assert path.read_bytes() == before


def test_a_group_with_no_row_is_absent_and_empty_cells_are_not_counted(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("site,quality\na,0.5\na,\nb,\n")
    stats = local_statistics(open_table(path), parse("count, mean(quality) group by site"))
    assert stats[("a",)]["count"] == 2 and stats[("a",)]["n:quality"] == 1
    assert answer(parse("count, mean(quality)"), stats[("b",)])["mean(quality)"] is None
    assert local_statistics(open_table(path), parse("count where site = 'c'")) == {}
