"""Output privacy of a query: the Skellam calibration meets its epsilon and no more noise
than needed, the sites' shares add up to the target noise, sensitivities follow the declared
ranges, the ledger refuses overspending, small cells are blanked; the declared schema."""

import json

import numpy as np
import pytest

from fedface.analytics.privacy import (
    BudgetExhausted,
    SiteBudget,
    calibrate,
    sensitivities,
    skellam_epsilon,
    skellam_noise,
    suppress,
)
from fedface.analytics.query import QueryError, Schema, parse
from fedface.analytics.vector import Layout

SCHEMA = Schema.from_dict({"columns": {
    "sex": {"type": "categorical", "values": ["f", "m"]},
    "age": {"type": "integer", "range": [18, 95]},
    "quality": {"type": "real", "range": [0, 1]}}})


@pytest.mark.parametrize("eps,moved", [(0.5, 1), (1.0, 3), (4.0, 5)])
def test_calibration_meets_epsilon_with_the_least_noise(eps, moved):
    mu = calibrate(eps, 1e-6, moved)
    assert skellam_epsilon(mu, moved, 1e-6) <= eps * 1.0001
    assert skellam_epsilon(mu * 0.99, moved, 1e-6) > eps
    assert calibrate(eps, 1e-6, moved + 1) > mu  # more coordinates moved: more noise


def test_epsilon_refused_when_not_positive():
    with pytest.raises(QueryError, match="positive"):
        calibrate(0.0, 1e-6, 1)
    with pytest.raises(QueryError, match="delta"):
        calibrate(1.0, 2.0, 1)


def test_site_shares_add_up_to_the_target_skellam_noise():
    rng = np.random.default_rng(0)
    units = np.array([1.0, 7.0])
    mu, k = 3.0, 5
    total = sum(skellam_noise(rng, np.tile(units, 20000), mu, k) for _ in range(k))
    total = total.reshape(-1, 2)
    assert total.dtype == np.int64
    assert np.var(total[:, 0]) == pytest.approx(2 * mu, rel=0.05)
    assert np.var(total[:, 1]) == pytest.approx(2 * mu * 49, rel=0.05)
    assert abs(np.mean(total[:, 1])) < 0.6  # 5 standard errors: unbiased


def test_sensitivities_follow_the_declared_ranges():
    spec = parse("count, mean(quality), variance(age), histogram(age; 18, 50, 96) group by sex")
    layout = Layout.build(spec, SCHEMA, {"sex": ["f", "m"]})
    units, moved = sensitivities(layout, SCHEMA.ranges)
    per = dict(zip((f.name for f in layout.figures), units[:len(layout.figures)], strict=True))
    assert per["count"] == 1 and per["n:quality"] == 1 and per["n:age"] == 1
    assert per["sum:quality"] == 2**16 and per["sum:age"] == 95 and per["sumsq:age"] == 95**2
    assert per["bin:age:18,50,96:0"] == 1
    assert moved == 7  # count, n+sum quality, n+sum+sumsq age, one bin of the histogram
    assert units.size == 2 * len(layout.figures)
    with pytest.raises(QueryError, match="declared range.*quality"):
        sensitivities(layout, {"age": (18, 95)})


def test_budget_is_charged_once_per_query_and_refuses_overspending(tmp_path):
    b = SiteBudget(tmp_path / "ledger.json", total=2.0)
    assert b.charge("q1", "d1", 1.5, 1e-6) == pytest.approx(0.5)
    assert b.charge("q1", "d1", 1.5, 1e-6) == pytest.approx(0.5)  # the same query: not twice
    with pytest.raises(BudgetExhausted, match="another query document"):  # id reused
        b.charge("q1", "d2", 0.1, 1e-6)
    with pytest.raises(BudgetExhausted, match="used epsilon 1.5 of 2.*asks 1 more"):
        b.charge("q2", "d3", 1.0, 1e-6)
    assert SiteBudget(tmp_path / "ledger.json", 2.0).spent == pytest.approx(1.5)
    entry = json.loads((tmp_path / "ledger.json").read_text())["entries"][0]
    assert entry["delta"] == 1e-6 and entry["digest"] == "d1"
    (tmp_path / "ledger.json").write_text("{broken")
    with pytest.raises(BudgetExhausted, match="unreadable"):
        b.charge("q3", "d4", 0.1, 1e-6)


def test_small_cells_are_blanked_whatever_the_query_asks():
    groups = {("a",): {"mean(x)": 0.3, "h": {"edges": [0, 1, 2], "counts": [1, 2]}},
              ("b",): {"mean(x)": 0.5, "h": {"edges": [0, 1, 2], "counts": [38, 2]}}}
    counts = {("a",): 3, ("b",): 40}  # the decoded row counts, asked for or not
    kept, dropped = suppress(groups, counts, 5)
    assert dropped == [("a",)] and kept[("b",)]["h"]["counts"] == [38, None]
    assert suppress(groups, counts, 0) == (groups, [])


def test_the_calibration_is_close_to_the_gaussian_limit():
    """An independent check of the formula: for large mu, Skellam's Renyi DP tends to the
    Gaussian mechanism's with variance 2 mu (alpha * moved / (4 mu)); the classic
    Gaussian bound sigma = sqrt(2 ln(1.25/delta)) * sqrt(moved) / epsilon (Dwork and Roth)
    is looser, so the calibrated noise must lie below it and above a tenth of it."""
    import math
    eps, delta, moved = 0.8, 1e-6, 3
    sigma = math.sqrt(2 * calibrate(eps, delta, moved))
    classic = math.sqrt(2 * math.log(1.25 / delta)) * math.sqrt(moved) / eps
    assert 0.3 * classic < sigma < classic


def test_schema_round_trips_and_names_what_is_wrong(tmp_path):
    assert Schema.from_dict(SCHEMA.to_dict()) == SCHEMA
    with pytest.raises(QueryError, match="'sex': it is not a numeric column"):
        Schema.from_dict({"columns": {"sex": {"type": "categorical", "range": [0, 1]}}})
    with pytest.raises(QueryError, match="low <= high"):
        Schema.from_dict({"columns": {"age": {"type": "integer", "range": [9, 1]}}})
    with pytest.raises(QueryError, match="columns"):
        Schema.from_dict({"cols": {}})
    site = Schema({"sex": "categorical", "age": "real"})
    assert SCHEMA.mismatches(site) == ["it lacks the column 'quality'",
                                       "its column 'age' is real, declared integer"]
    assert SCHEMA.mismatches(Schema({"sex": "categorical", "age": "integer",
                                     "quality": "integer"})) == []
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA.to_dict()))
    from fedface.analytics.query import load_schema
    assert load_schema(path) == SCHEMA
    path.write_text("{")
    with pytest.raises(QueryError, match="not valid JSON"):
        load_schema(path)
