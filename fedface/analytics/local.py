"""A site's own table and the statistics a query asks of it, computed by SQLite.

:func:`open_table` opens a CSV file (loaded into an in-memory SQLite database) or a SQLite
file (read-only) through SQLAlchemy, with its :class:`~fedface.analytics.query.Schema`
declared or read from the data. :func:`local_statistics` turns a validated
:class:`~fedface.analytics.query.QuerySpec` into one SQL query (filters as ``WHERE``,
group-by as ``GROUP BY``, every aggregate as sums: a count, a sum and a sum of squares, one
``CASE`` count per histogram bin) and returns the exact local figures per group;
:func:`answer` turns figures (one site's, or the sum over sites) into the released
statistics. No row is ever looped over in Python.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fedface.analytics.query import (
    And,
    Between,
    In,
    Not,
    Or,
    QueryError,
    QuerySpec,
    Schema,
    validate,
)

__all__ = ["Figure", "SiteTable", "answer", "figures", "local_statistics", "open_table"]

_SQL_TYPES = {"integer": sa.Integer, "real": sa.Float, "categorical": sa.String}


@dataclass
class SiteTable:
    """A site's table: a SQLAlchemy engine, the table and its schema."""

    engine: sa.Engine
    table: sa.Table
    schema: Schema


def _infer(values: list[str]) -> str:
    """A column's type from its cells: integer, real, else categorical (empty cells: NULL)."""
    present = [v for v in values if v != ""]
    for kind, conv in (("integer", int), ("real", float)):
        try:
            for v in present:
                conv(v)
        except ValueError:
            continue
        return kind
    return "categorical"


def _convert(value: str, kind: str, where: str) -> Any:
    if value == "":
        return None
    try:
        return int(value) if kind == "integer" else float(value) if kind == "real" else value
    except ValueError:
        raise QueryError(f"{where}: {value!r} is not {'an' if kind == 'integer' else 'a'} "
                         f"{kind} value as the schema declares; fix the cell or the "
                         "schema") from None


def open_table(path: str | Path, schema: Schema | None = None, table: str | None = None
               ) -> SiteTable:
    """Open a site's ``.csv`` or SQLite (``.sqlite``, ``.db``) table; ``schema`` declares
    the columns (default: read from the data: whole numbers integer, other numbers real,
    anything else categorical); ``table`` names the SQLite table when the file has several."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"analytics table {path} does not exist: set the node's "
                         "analytics-table to a CSV or SQLite file")
    if path.suffix.lower() == ".csv":
        return _open_csv(path, schema)
    if path.suffix.lower() in (".sqlite", ".db", ".sqlite3"):
        return _open_sqlite(path, schema, table)
    raise QueryError(f"analytics table {path}: use a .csv or a SQLite (.sqlite, .db) file")


def _open_csv(path: Path, schema: Schema | None) -> SiteTable:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or not any(h.strip() for h in rows[0]):
        raise QueryError(f"{path} is empty: the first line must name the columns")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise QueryError(f"{path}: a column is named twice in the header ({', '.join(header)})")
    body = rows[1:]
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise QueryError(f"{path} line {i}: {len(r)} cells for {len(header)} columns")
    if schema is None:
        schema = Schema({h: _infer([r[j].strip() for r in body]) for j, h in enumerate(header)})
    missing = sorted(set(schema.columns) - set(header))
    if missing:
        raise QueryError(f"{path}: the schema declares {', '.join(missing)}, which the file "
                         f"does not have (it has {', '.join(header)})")
    engine = sa.create_engine("sqlite://")
    meta = sa.MetaData()
    table = sa.Table("site", meta, *(sa.Column(c, _SQL_TYPES[k]())
                                     for c, k in schema.columns.items()))
    meta.create_all(engine)
    index = {h: j for j, h in enumerate(header)}
    records = [{c: _convert(r[index[c]].strip(), k, f"{path} line {i} column {c}")
                for c, k in schema.columns.items()} for i, r in enumerate(body, start=2)]
    with engine.begin() as conn:
        if records:
            conn.execute(table.insert(), records)
    return SiteTable(engine, table, schema)


def _kind_of(column: sa.Column) -> str:
    t = column.type
    if isinstance(t, sa.Integer):
        return "integer"
    if isinstance(t, (sa.Float, sa.Numeric)):
        return "real"
    return "categorical"


def _open_sqlite(path: Path, schema: Schema | None, name: str | None) -> SiteTable:
    engine = sa.create_engine(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true")
    meta = sa.MetaData()
    try:
        meta.reflect(engine)
    except sa.exc.DatabaseError as err:
        raise QueryError(f"{path} is not a readable SQLite database ({err.orig})") from None
    tables = sorted(meta.tables)
    if name is None:
        if len(tables) != 1:
            raise QueryError(f"{path} holds {len(tables)} tables ({', '.join(tables) or 'none'})"
                             ": name the one to query")
        name = tables[0]
    if name not in meta.tables:
        raise QueryError(f"{path} has no table {name!r} (it has {', '.join(tables)})")
    table = meta.tables[name]
    found = {c.name: _kind_of(c) for c in table.columns}
    if schema is None:
        schema = Schema(found)
    missing = sorted(set(schema.columns) - set(found))
    if missing:
        raise QueryError(f"{path} table {name}: the schema declares {', '.join(missing)}, "
                         f"which the table does not have (it has {', '.join(found)})")
    return SiteTable(engine, table, schema)


# --------------------------------------------------------------------------- statistics


def _condition(c, t: sa.Table):
    if isinstance(c, And):
        return sa.and_(*(_condition(p, t) for p in c.parts))
    if isinstance(c, Or):
        return sa.or_(*(_condition(p, t) for p in c.parts))
    if isinstance(c, Not):
        return sa.not_(_condition(c.part, t))
    col = t.c[c.column]
    if isinstance(c, In):
        return col.in_(list(c.values))
    if isinstance(c, Between):
        return col.between(c.low, c.high)
    return {"=": col.__eq__, "!=": col.__ne__, "<": col.__lt__, "<=": col.__le__,
            ">": col.__gt__, ">=": col.__ge__}[c.op](c.value)


@dataclass(frozen=True)
class Figure:
    """One sum over a group's rows that a query needs: ``kind`` is ``count`` (rows),
    ``n`` (non-empty cells of ``column``), ``sum``, ``sumsq`` or ``bin`` (rows in bin
    ``index`` of ``edges``)."""

    kind: str
    column: str | None = None
    edges: tuple[float, ...] = ()
    index: int = 0

    @property
    def name(self) -> str:
        if self.kind == "count":
            return "count"
        if self.kind == "bin":
            return f"bin:{self.column}:{','.join(f'{e:g}' for e in self.edges)}:{self.index}"
        return f"{self.kind}:{self.column}"


def figures(spec: QuerySpec) -> list[Figure]:
    """Every figure ``spec`` needs, once each, in a fixed order (rows counted first)."""
    out = [Figure("count")]
    for a in spec.aggregates:
        if a.column is None:
            continue
        if a.op in ("sum", "mean", "variance"):
            out += [Figure("n", a.column), Figure("sum", a.column)]
            if a.op == "variance":
                out.append(Figure("sumsq", a.column))
        else:
            out += [Figure("bin", a.column, a.edges, i) for i in range(len(a.edges) - 1)]
    return list(dict.fromkeys(out))


def _expression(f: Figure, t: sa.Table, clip: dict | None = None):
    if f.kind == "count":
        return sa.func.count()
    col = t.c[f.column]
    if clip and f.column in clip and f.kind in ("sum", "sumsq"):
        lo, hi = clip[f.column]  # SQLite's scalar min/max: the value clipped to [lo, hi]
        col = sa.func.max(lo, sa.func.min(hi, col))
    if f.kind == "n":
        return sa.func.count(col)
    if f.kind == "sum":
        return sa.func.coalesce(sa.func.sum(col), 0)
    if f.kind == "sumsq":
        return sa.func.coalesce(sa.func.sum(col * col), 0)
    e, i = f.edges, f.index
    inside = col < e[i + 1] if i < len(e) - 2 else col <= e[i + 1]  # the last bin is closed
    return sa.func.coalesce(sa.func.sum(sa.case((sa.and_(col >= e[i], inside), 1), else_=0)),
                            0)


def local_statistics(site: SiteTable, spec: QuerySpec, clip: dict | None = None
                     ) -> dict[tuple, dict[str, float]]:
    """``{group key: {figure: value}}`` of ``spec`` on ``site`` (exact sums; the group key
    is the tuple of group-by values, ``()`` without group-by). Validated first. ``clip``
    (column -> (low, high)) clips summed values first (what bounds a row's weight under
    differential privacy)."""
    validate(spec, site.schema)
    t = site.table
    terms = [(f.name, _expression(f, t, clip)) for f in figures(spec)]
    groups = [t.c[g] for g in spec.group_by]
    stmt = sa.select(*groups, *(expr.label(f"f{i}") for i, (_, expr) in enumerate(terms))
                     ).select_from(t)
    if spec.where is not None:
        stmt = stmt.where(_condition(spec.where, t))
    if groups:
        stmt = stmt.group_by(*groups)
    out: dict[tuple, dict[str, float]] = {}
    with site.engine.connect() as conn:
        for row in conn.execute(stmt):
            key = tuple(row[: len(groups)])
            got = {name: row[len(groups) + i] or 0 for i, (name, _) in enumerate(terms)}
            if got["count"]:
                out[key] = got
    return out


def answer(spec: QuerySpec, values: dict[str, float]) -> dict[str, Any]:
    """The statistics of one group from its (summed) figures: counts and sums as they are,
    means and (sample) variances from sums and sums of squares, histograms, and quantiles
    read from the histogram by linear interpolation within a bin."""
    out: dict[str, Any] = {}
    for a in spec.aggregates:
        if a.op == "count":
            out["count"] = int(values["count"])
            continue
        c = a.column
        if a.op in ("sum", "mean", "variance"):
            n, s = values[f"n:{c}"], values[f"sum:{c}"]
            if a.op == "sum":
                out[f"sum({c})"] = s
            elif a.op == "mean":
                out[f"mean({c})"] = s / n if n else None
            else:
                ss = values[f"sumsq:{c}"]
                out[f"variance({c})"] = (ss - s * s / n) / (n - 1) if n > 1 else None
            continue
        e = a.edges
        bins = [int(values[Figure("bin", c, e, i).name]) for i in range(len(e) - 1)]
        if a.op == "histogram":
            out[f"histogram({c})"] = {"edges": list(e), "counts": bins}
        else:
            out[f"quantiles({c})"] = {str(q): _quantile(bins, e, q) for q in a.q}
    return out


def _quantile(bins: list[int], edges: tuple[float, ...], q: float) -> float | None:
    total = sum(bins)
    if total == 0:
        return None
    target, seen = q * total, 0
    for i, n in enumerate(bins):
        if n and seen + n >= target:
            return edges[i] + (edges[i + 1] - edges[i]) * (target - seen) / n
        seen += n
    return edges[-1]
