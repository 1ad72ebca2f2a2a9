"""Site vectors: every site fills one layout, the vectors add to the union's figures (exact
for counts and integer sums, within the fixed-point error for real sums)."""

import numpy as np
import pytest

from fedface.analytics.local import answer, local_statistics, open_table
from fedface.analytics.query import QueryError, parse
from fedface.analytics.vector import Layout

CATEGORIES = {"sex": ["f", "m", "x"]}


def _site(path, seed, n):
    rng = np.random.default_rng(seed)
    lines = ["sex,age,quality"] + [f"{rng.choice(['f', 'm'] if seed else ['f', 'm', 'x'])},"
                                   f"{int(rng.integers(18, 95))},{rng.random():.6f}"
                                   for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return open_table(path)


def test_the_sum_of_site_vectors_is_the_union(tmp_path):
    spec = parse("count, sum(age), mean(quality), variance(quality), histogram(age; 18, 50, 95)"
                 " where age > 20 group by sex")
    sites = [_site(tmp_path / f"s{i}.csv", i, n) for i, n in enumerate((120, 40, 75))]
    layout = Layout.build(spec, sites[0].schema, CATEGORIES, frac_bits=20)
    total = sum(layout.encode(local_statistics(s, spec)) for s in sites)
    union = tmp_path / "all.csv"
    union.write_text("sex,age,quality\n" + "".join(
        "".join((tmp_path / f"s{i}.csv").read_text().splitlines(True)[1:]) for i in range(3)))
    expected = local_statistics(open_table(union), spec)
    got = layout.decode(total)
    assert got.keys() == expected.keys() == {("f",), ("m",), ("x",)}
    for key in got:
        a, b = answer(spec, got[key]), answer(spec, expected[key])
        assert a["count"] == b["count"] and a["sum(age)"] == b["sum(age)"]
        assert a["histogram(age)"] == b["histogram(age)"]
        rows = b["count"]
        assert a["mean(quality)"] == pytest.approx(b["mean(quality)"], abs=2**-21)
        assert a["variance(quality)"] == pytest.approx(b["variance(quality)"],
                                                       abs=rows * 2**-20)


def test_undeclared_groups_are_refused_never_dropped(tmp_path):
    spec = parse("count group by sex")
    site = _site(tmp_path / "s.csv", 0, 50)  # holds f, m and x
    with pytest.raises(QueryError, match="declare the categories"):
        Layout.build(spec, site.schema)
    layout = Layout.build(spec, site.schema, {"sex": ["f", "m"]})
    with pytest.raises(QueryError, match=r"holds the group \('x',\)"):
        layout.encode(local_statistics(site, spec))
