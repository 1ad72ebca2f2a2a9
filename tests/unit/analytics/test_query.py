"""The analytics query language: text and JSON give one typed spec; malformed text is refused
with the position and what was expected; a spec is checked against a site's schema."""

import json

import pytest

from fedface.analytics.query import (
    Aggregate,
    And,
    Between,
    Compare,
    In,
    Not,
    Or,
    QueryError,
    QuerySpec,
    Schema,
    parse,
    validate,
)

SCHEMA = Schema({"age": "integer", "quality": "real", "sex": "categorical",
                 "site": "categorical"})


def test_the_issue_example_parses_into_its_spec():
    q = parse("count, mean(quality) where age >= 60 group by site, sex")
    assert q == QuerySpec((Aggregate("count"), Aggregate("mean", "quality")),
                          Compare("age", ">=", 60), ("site", "sex"))
    validate(q, SCHEMA)


def test_every_operation_and_filter_round_trips_through_json():
    q = parse("count(), sum(age), variance(quality), histogram(age; 0, 40, 60.5, 120), "
              "quantiles(age; 0.25, 0.5, 0.75; 0, 50, 100) "
              "where (age between 18 and 65 or not sex = 'x') and site in ('a', \"b\") "
              "and quality != -0.5")
    assert q.aggregates[3] == Aggregate("histogram", "age", (0.0, 40.0, 60.5, 120.0))
    assert q.aggregates[4].q == (0.25, 0.5, 0.75)
    assert q.where == And((Or((Between("age", 18, 65), Not(Compare("sex", "=", "x")))),
                           In("site", ("a", "b")), Compare("quality", "!=", -0.5)))
    assert QuerySpec.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    validate(q, SCHEMA)


def test_keywords_are_case_blind_and_and_binds_tighter_than_or():
    q = parse("COUNT WHERE age < 1 OR age > 2 AND sex = 'f' GROUP BY site")
    assert q.where == Or((Compare("age", "<", 1),
                          And((Compare("age", ">", 2), Compare("sex", "=", "f")))))


@pytest.mark.parametrize("text, position, expected", [
    ("count where", 12, "a column name"),
    ("mean(quality", 13, "')'"),
    ("count, median(age)", 8, "an aggregate"),
    ("count group site", 13, "'by' after 'group'"),
    ("count where age ~ 3", 17, "unexpected character '~'"),
    ("count where age between 1 or 3", 27, "'and' in 'between"),
    ("count where sex in ()", 21, "a number or a quoted string"),
    ("count count", 7, "',' and another aggregate"),
    ("histogram(age; 3, 1)", 1, "increasing bin edges"),
    ("quantiles(age; 1.5; 0, 10)", 1, "quantiles in (0, 1)"),
])
def test_malformed_text_is_refused_with_the_position_and_what_was_expected(
        text, position, expected):
    with pytest.raises(QueryError) as err:
        parse(text)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"query position {position}:") and expected in first
    assert str(err.value).splitlines()[-1].index("^") == position + 1  # the caret under it


@pytest.mark.parametrize("doc, why", [
    ({}, "'aggregates' list"),
    ({"aggregates": [{"op": "median", "column": "age"}]}, "unknown aggregate 'median'"),
    ({"aggregates": [{"op": "count", "column": "age"}]}, "count takes no column"),
    ({"aggregates": [{"op": "count"}], "where": {"column": "age", "op": "~", "value": 1}},
     "expected 'op'"),
    ({"aggregates": [{"op": "count"}], "where": {"and": [{"column": "age", "op": "=",
                                                          "value": 1}]}}, "two or more"),
    ({"aggregates": [{"op": "count"}], "group_by": ["site", "site"]}, "twice"),
])
def test_malformed_json_is_refused_with_the_reason(doc, why):
    with pytest.raises(QueryError, match=why):
        QuerySpec.from_dict(doc)


def test_the_schema_refuses_what_a_site_cannot_answer_with_every_reason():
    q = parse("sum(sex), count where age = 'old' and site < 'b' group by age, weight")
    with pytest.raises(QueryError) as err:
        validate(q, SCHEMA)
    msg = str(err.value)
    for part in ("sum(sex): 'sex' is categorical", "where age: 'age' is integer",
                 "where site: 'site' is categorical; use =, != or in",
                 "group by age: 'age' is integer (continuous)",
                 "group by weight: unknown column 'weight'"):
        assert part in msg


def test_a_schema_with_an_unknown_type_is_refused():
    with pytest.raises(QueryError, match="column types must be one of"):
        Schema({"age": "float64"})
