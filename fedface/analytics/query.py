"""The analytics query language: text or JSON in, one typed :class:`QuerySpec` out.

Text form (``fedface query "..."``)::

    count, mean(quality), histogram(age; 0, 40, 60, 80, 120) where age >= 60 and sex in ('f', 'x')
        group by site, sex

* aggregates, comma-separated: ``count``, ``sum(col)``, ``mean(col)``, ``variance(col)``,
  ``histogram(col; e0, e1, ..., ek)`` (k bins ``[e(i), e(i+1))``, the last one closed) and
  ``quantiles(col; q1, q2, ...; e0, ..., ek)`` (read from that histogram);
* ``where``: ``col op value`` (``= != < <= > >=``), ``col in (v, ...)``,
  ``col between a and b`` (inclusive), combined with ``and`` / ``or`` / ``not`` and
  parentheses; strings in single or double quotes;
* ``group by`` categorical columns.

The JSON form is :meth:`QuerySpec.to_dict`'s. A malformed text is refused with the
position and what was expected (:class:`QueryError`); :func:`validate` then checks a spec
against a site's declared :class:`Schema` before anything is computed (unknown columns, a
numeric aggregate of a categorical column, a group-by on a continuous one, a comparison of
a number with a string).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AGGREGATES", "Aggregate", "And", "Between", "Compare", "In", "Not", "Or",
           "QueryError", "QuerySpec", "Schema", "load_schema", "parse", "validate"]

AGGREGATES = ("count", "sum", "mean", "variance", "histogram", "quantiles")
NUMERIC = ("integer", "real")
TYPES = (*NUMERIC, "categorical")
OPERATORS = ("=", "!=", "<", "<=", ">", ">=")


class QueryError(ValueError):
    """A query that cannot be run, with where and why."""


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Aggregate:
    op: str
    column: str | None = None
    edges: tuple[float, ...] = ()
    q: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"op": self.op}
        if self.column is not None:
            d["column"] = self.column
        if self.edges:
            d["edges"] = list(self.edges)
        if self.q:
            d["q"] = list(self.q)
        return d


@dataclass(frozen=True)
class Compare:
    column: str
    op: str
    value: float | str


@dataclass(frozen=True)
class In:
    column: str
    values: tuple[float | str, ...]


@dataclass(frozen=True)
class Between:
    column: str
    low: float
    high: float


@dataclass(frozen=True)
class And:
    parts: tuple


@dataclass(frozen=True)
class Or:
    parts: tuple


@dataclass(frozen=True)
class Not:
    part: Any


def _cond_to_dict(c) -> dict:
    if isinstance(c, Compare):
        return {"column": c.column, "op": c.op, "value": c.value}
    if isinstance(c, In):
        return {"column": c.column, "in": list(c.values)}
    if isinstance(c, Between):
        return {"column": c.column, "between": [c.low, c.high]}
    if isinstance(c, (And, Or)):
        return {type(c).__name__.lower(): [_cond_to_dict(p) for p in c.parts]}
    return {"not": _cond_to_dict(c.part)}


def _cond_from_dict(d: Any, where: str = "where"):
    if not isinstance(d, dict):
        raise QueryError(f"{where}: expected an object, got {d!r}")
    for key, cls in (("and", And), ("or", Or)):
        if key in d:
            parts = d[key]
            if not isinstance(parts, list) or len(parts) < 2:
                raise QueryError(f"{where}.{key}: expected a list of two or more conditions")
            return cls(tuple(_cond_from_dict(p, f"{where}.{key}[{i}]")
                             for i, p in enumerate(parts)))
    if "not" in d:
        return Not(_cond_from_dict(d["not"], f"{where}.not"))
    col = d.get("column")
    if not isinstance(col, str) or not col:
        raise QueryError(f"{where}: expected a 'column' name")
    if "in" in d:
        if not isinstance(d["in"], list) or not d["in"]:
            raise QueryError(f"{where}.in: expected a non-empty list of values")
        return In(col, tuple(d["in"]))
    if "between" in d:
        b = d["between"]
        if not (isinstance(b, list) and len(b) == 2 and all(_is_number(v) for v in b)):
            raise QueryError(f"{where}.between: expected [low, high] numbers")
        return Between(col, float(b[0]), float(b[1]))
    if d.get("op") not in OPERATORS or "value" not in d:
        raise QueryError(f"{where}: expected 'op' (one of {' '.join(OPERATORS)}) and 'value'")
    return Compare(col, d["op"], d["value"])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class QuerySpec:
    """What a query asks: aggregates, an optional condition, group-by columns."""

    aggregates: tuple[Aggregate, ...]
    where: Any = None
    group_by: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"aggregates": [a.to_dict() for a in self.aggregates]}
        if self.where is not None:
            d["where"] = _cond_to_dict(self.where)
        if self.group_by:
            d["group_by"] = list(self.group_by)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> QuerySpec:
        if not isinstance(d, dict) or not isinstance(d.get("aggregates"), list):
            raise QueryError("a JSON query is an object with an 'aggregates' list")
        aggs = []
        for i, a in enumerate(d["aggregates"]):
            if not isinstance(a, dict):
                raise QueryError(f"aggregates[{i}]: expected an object")
            aggs.append(_aggregate(a.get("op"), a.get("column"), a.get("edges", ()),
                                   a.get("q", ()), f"aggregates[{i}]"))
        where = _cond_from_dict(d["where"]) if d.get("where") is not None else None
        group = d.get("group_by", [])
        if not isinstance(group, list) or not all(isinstance(g, str) for g in group):
            raise QueryError("group_by: expected a list of column names")
        return _finish(aggs, where, group)


def _aggregate(op, column, edges, q, where: str) -> Aggregate:
    if op not in AGGREGATES:
        raise QueryError(f"{where}: unknown aggregate {op!r}; expected one of "
                         f"{', '.join(AGGREGATES)}")
    if op == "count":
        if column is not None:
            raise QueryError(f"{where}: count takes no column (filter with where)")
        return Aggregate("count")
    if not isinstance(column, str) or not column:
        raise QueryError(f"{where}: {op} needs a column")
    edges = tuple(edges or ())
    q = tuple(q or ())
    if op in ("histogram", "quantiles"):
        if len(edges) < 2 or not all(_is_number(e) for e in edges) or any(
                b <= a for a, b in zip(edges, edges[1:])):
            raise QueryError(f"{where}: {op}({column}) needs two or more increasing bin edges")
    elif edges:
        raise QueryError(f"{where}: {op} takes no bin edges")
    if op == "quantiles":
        if not q or not all(_is_number(v) and 0 < v < 1 for v in q):
            raise QueryError(f"{where}: quantiles({column}) needs quantiles in (0, 1)")
    elif q:
        raise QueryError(f"{where}: only quantiles takes q")
    return Aggregate(op, column, tuple(float(e) for e in edges), tuple(float(v) for v in q))


def _finish(aggs, where, group) -> QuerySpec:
    if not aggs:
        raise QueryError("a query needs at least one aggregate (e.g. count)")
    if len(set(group)) != len(group):
        raise QueryError(f"group by names a column twice: {', '.join(group)}")
    return QuerySpec(tuple(aggs), where, tuple(group))


# --------------------------------------------------------------------------- the text form

_TOKEN = re.compile(r"""\s*(?:
    (?P<number>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<op><=|>=|!=|=|<|>)
  | (?P<punct>[(),;])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  )""", re.VERBOSE)
_KEYWORDS = {"where", "group", "by", "and", "or", "not", "in", "between"}


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


@dataclass
class _Parser:
    text: str
    toks: list[_Tok] = field(default_factory=list)
    i: int = 0

    def __post_init__(self) -> None:
        pos = 0
        while self.text[pos:].strip():
            m = _TOKEN.match(self.text, pos)
            if m is None:
                at = len(self.text) - len(self.text[pos:].lstrip())
                raise QueryError(self._where(at, f"unexpected character {self.text[at]!r}"))
            kind = m.lastgroup
            self.toks.append(_Tok(kind, m.group(kind), m.start(kind)))
            pos = m.end()

    def _where(self, pos: int, what: str) -> str:
        return f"query position {pos + 1}: {what}\n  {self.text}\n  {' ' * pos}^"

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def fail(self, expected: str):
        tok = self.peek()
        pos = tok.pos if tok else len(self.text)
        got = f"{tok.text!r}" if tok else "the end"
        raise QueryError(self._where(pos, f"expected {expected}, got {got}"))

    def word(self, *words: str) -> bool:
        tok = self.peek()
        if tok and tok.kind == "word" and tok.text.lower() in words:
            self.i += 1
            return True
        return False

    def punct(self, p: str) -> bool:
        tok = self.peek()
        if tok and tok.kind == "punct" and tok.text == p:
            self.i += 1
            return True
        return False

    def expect_punct(self, p: str) -> None:
        if not self.punct(p):
            self.fail(f"'{p}'")

    def name(self) -> str:
        tok = self.peek()
        if not tok or tok.kind != "word" or tok.text.lower() in _KEYWORDS:
            self.fail("a column name")
        self.i += 1
        return tok.text

    def value(self) -> float | str:
        tok = self.peek()
        if tok and tok.kind == "number":
            self.i += 1
            v = float(tok.text)
            return int(v) if v.is_integer() and "." not in tok.text and "e" not in \
                tok.text.lower() else v
        if tok and tok.kind == "string":
            self.i += 1
            return tok.text[1:-1]
        self.fail("a number or a quoted string")

    def number(self) -> float:
        v = self.value()
        if isinstance(v, str):
            self.i -= 1
            self.fail("a number")
        return float(v)

    def numbers(self) -> list[float]:
        out = [self.number()]
        while self.punct(","):
            out.append(self.number())
        return out

    # query := aggregates [where cond] [group by names]
    def query(self) -> QuerySpec:
        aggs = [self.aggregate()]
        while self.punct(","):
            aggs.append(self.aggregate())
        where = self.condition() if self.word("where") else None
        group: list[str] = []
        if self.word("group"):
            if not self.word("by"):
                self.fail("'by' after 'group'")
            group.append(self.name())
            while self.punct(","):
                group.append(self.name())
        if self.peek() is not None:
            self.fail("',' and another aggregate, 'where', 'group by' or the end")
        return _finish(aggs, where, group)

    def aggregate(self) -> Aggregate:
        tok = self.peek()
        if not tok or tok.kind != "word" or tok.text.lower() not in AGGREGATES:
            self.fail(f"an aggregate ({', '.join(AGGREGATES)})")
        self.i += 1
        op = tok.text.lower()
        if op == "count":
            if self.punct("("):
                self.expect_punct(")")
            return Aggregate("count")
        self.expect_punct("(")
        column = self.name()
        edges: list[float] = []
        q: list[float] = []
        if op == "quantiles":
            self.expect_punct(";")
            q = self.numbers()
        if op in ("histogram", "quantiles"):
            self.expect_punct(";")
            edges = self.numbers()
        self.expect_punct(")")
        try:
            return _aggregate(op, column, edges, q, f"{op}({column})")
        except QueryError as err:
            raise QueryError(self._where(tok.pos, str(err))) from None

    def condition(self):
        parts = [self.conjunction()]
        while self.word("or"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def conjunction(self):
        parts = [self.unary()]
        while self.word("and"):
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def unary(self):
        if self.word("not"):
            return Not(self.unary())
        if self.punct("("):
            c = self.condition()
            self.expect_punct(")")
            return c
        column = self.name()
        if self.word("in"):
            self.expect_punct("(")
            values = [self.value()]
            while self.punct(","):
                values.append(self.value())
            self.expect_punct(")")
            return In(column, tuple(values))
        if self.word("between"):
            low = self.number()
            if not self.word("and"):
                self.fail("'and' in 'between LOW and HIGH'")
            return Between(column, low, self.number())
        tok = self.peek()
        if not tok or tok.kind != "op":
            self.fail(f"a comparison ({' '.join(OPERATORS)}), 'in' or 'between'")
        self.i += 1
        return Compare(column, tok.text, self.value())


def parse(text: str) -> QuerySpec:
    """The :class:`QuerySpec` of a query text (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the query is empty: ask for at least one aggregate, e.g. 'count'")
    return _Parser(text).query()


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Schema:
    """Declared columns: ``{name: "integer" | "real" | "categorical"}``.

    The federation's schema (what the querier declares and every site must match) also
    lists the values of categorical columns (``categories``: the groups a group-by fills,
    fixed before any site computes) and the range of numeric ones (``ranges``: values are
    clipped to it under differential privacy, so that one row moves a sum by a bounded
    amount). A site's own schema, read from its table, has neither.
    """

    columns: dict[str, str]
    categories: dict[str, tuple] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.columns.items() if v not in TYPES}
        if bad:
            raise QueryError(f"schema: column types must be one of {', '.join(TYPES)}; got "
                             + ", ".join(f"{k}: {v!r}" for k, v in bad.items()))
        problems = [f"values of {c!r}: it is not a categorical column of the schema"
                    for c in self.categories if self.columns.get(c) != "categorical"]
        problems += [f"range of {c!r}: it is not a numeric column of the schema"
                     for c in self.ranges if self.columns.get(c) not in NUMERIC]
        problems += [f"range of {c!r}: [{lo}, {hi}] must be two numbers, low <= high"
                     for c, (lo, hi) in self.ranges.items()
                     if not (_is_number(lo) and _is_number(hi) and lo <= hi)]
        if problems:
            raise QueryError("schema: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, doc: Any, where: str = "schema") -> Schema:
        """``{"columns": {name: type, or {"type": t, "values": [...], "range": [lo, hi]}}}``."""
        cols = doc.get("columns") if isinstance(doc, dict) else None
        if not isinstance(cols, dict) or not cols:
            raise QueryError(f"{where}: expected an object {{\"columns\": {{name: type, ...}}}}")
        columns, categories, ranges = {}, {}, {}
        for name, d in cols.items():
            d = {"type": d} if isinstance(d, str) else d
            if not isinstance(d, dict) or not isinstance(d.get("type"), str):
                raise QueryError(f"{where}: column {name!r} must be a type name or an object "
                                 "with a 'type'")
            columns[name] = d["type"]
            if "values" in d:
                if not isinstance(d["values"], list) or not d["values"]:
                    raise QueryError(f"{where}: the values of {name!r} must be a non-empty list")
                categories[name] = tuple(d["values"])
            if "range" in d:
                r = d["range"]
                if not (isinstance(r, list) and len(r) == 2):
                    raise QueryError(f"{where}: the range of {name!r} must be [low, high]")
                ranges[name] = (r[0], r[1])
        return cls(columns, categories, ranges)

    def to_dict(self) -> dict:
        out = {}
        for name, kind in self.columns.items():
            d: dict[str, Any] = {"type": kind}
            if name in self.categories:
                d["values"] = list(self.categories[name])
            if name in self.ranges:
                d["range"] = list(self.ranges[name])
            out[name] = d
        return {"columns": out}

    def mismatches(self, site: Schema) -> list[str]:
        """How a site's table differs from this declared schema (empty: it fits)."""
        out = [f"it lacks the column {c!r}" for c in self.columns if c not in site.columns]
        out += [f"its column {c!r} is {site.columns[c]}, declared {k}"
                for c, k in self.columns.items()
                if c in site.columns and site.columns[c] != k
                and not (k == "real" and site.columns[c] == "integer")]
        return out


def load_schema(path) -> Schema:
    """A schema from a JSON file (:meth:`Schema.from_dict`)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise QueryError(f"schema file {path} does not exist") from None
    except ValueError as err:
        raise QueryError(f"schema file {path} is not valid JSON ({err})") from None
    return Schema.from_dict(doc, where=str(path))


def _columns_of(c) -> list:
    if isinstance(c, (And, Or)):
        return [x for p in c.parts for x in _columns_of(p)]
    if isinstance(c, Not):
        return _columns_of(c.part)
    return [c]


def validate(spec: QuerySpec, schema: Schema) -> None:
    """Refuse, with every reason at once, what ``schema`` cannot answer."""
    problems: list[str] = []
    cols = schema.columns

    def known(name: str, where: str) -> str | None:
        if name not in cols:
            problems.append(f"{where}: unknown column {name!r} (the site has "
                            f"{', '.join(sorted(cols))})")
            return None
        return cols[name]

    for a in spec.aggregates:
        if a.column is None:
            continue
        kind = known(a.column, f"{a.op}({a.column})")
        if kind == "categorical":
            problems.append(f"{a.op}({a.column}): {a.column!r} is categorical; {a.op} needs a "
                            "numeric column (count it with group by instead)")
    for c in (_columns_of(spec.where) if spec.where is not None else []):
        kind = known(c.column, f"where {c.column}")
        if kind is None:
            continue
        values = (c.values if isinstance(c, In) else (c.low, c.high)
                  if isinstance(c, Between) else (c.value,))
        if kind in NUMERIC and not all(_is_number(v) for v in values):
            problems.append(f"where {c.column}: {c.column!r} is {kind}; compare it with "
                            "numbers")
        if kind == "categorical":
            if isinstance(c, Between) or (isinstance(c, Compare) and c.op not in ("=", "!=")):
                problems.append(f"where {c.column}: {c.column!r} is categorical; use =, != "
                                "or in")
    for g in spec.group_by:
        kind = known(g, f"group by {g}")
        if kind in NUMERIC:
            problems.append(f"group by {g}: {g!r} is {kind} (continuous); group by categorical "
                            "columns, or use histogram({g}; edges)".replace("{g}", g))
    if problems:
        raise QueryError("the query does not fit the site's schema: " + "; ".join(problems))
