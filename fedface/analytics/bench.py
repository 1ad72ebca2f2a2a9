"""``fedface bench query``: an encrypted query against the same query in plaintext, side by
side in one run, at several federation sizes.

Both run the sites one after another in this process on the generated demo tables, so the
ratio compares like with like on one machine:

- **encrypted**: :func:`fedface.runner.ask_query` (``in-process``): every site opens its
  table, checks the signed query, computes its figures in SQLite, joins the masks, masks,
  encrypts under the query's fresh key and signs; the server checks, adds and unmasks;
  the querier decrypts. ``bytes``: every record sent both ways.
- **plaintext**: every site opens its table and computes the same figures in SQLite; the
  server adds the vectors and reads the answer (``plain_bytes``: the int64 vectors).

Every encrypted answer is checked against the plaintext one (``exact``). One more row
asks the same query through Flower's simulation engine (the real ServerApp, ClientApp and
messages), whose time is mostly the engine's own messaging.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedface.analytics.demo import prepare_workdir
from fedface.analytics.local import answer, local_statistics, open_table
from fedface.analytics.query import load_schema, parse
from fedface.analytics.vector import Layout

QUERY = ("count, mean(quality), histogram(age; 18, 30, 45, 60, 75, 96) group by sex")


def _plain(spec, schema, tables: list[str]) -> tuple[dict, int]:
    layout = Layout.build(spec, schema, {g: list(schema.categories[g]) for g in spec.group_by})
    total = np.zeros(layout.size, dtype=np.int64)
    nbytes = 0
    for path in tables:
        v = layout.encode(local_statistics(open_table(path), spec))
        total += v
        nbytes += v.nbytes
    return {k: answer(spec, x) for k, x in layout.decode(total).items()}, nbytes


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        for name, v in a[key].items():
            w = b[key][name]
            if isinstance(v, float) and not abs(v - w) <= 1e-4 * max(1.0, abs(w)):
                return False
            if not isinstance(v, float) and v != w:
                return False
    return True


def bench_query(sizes: tuple[int, ...] = (3, 10, 50), repeats: int = 5, query: str = QUERY,
                rows: int = 200, flower_sites: int = 3, dp_epsilon: float = 1.0,
                log: Callable[[str], None] = print) -> dict:
    from fedface.runner import ask_query

    spec = parse(query)
    out_rows = []
    with tempfile.TemporaryDirectory(prefix="fedface-bench-query-") as tmp:
        for n in sizes:
            paths = prepare_workdir(Path(tmp) / f"fed{n}", n, rows=rows)
            schema = load_schema(paths["schema"])
            tables = [paths["table"].replace("{partition}", str(k)) for k in range(n)]
            for eps in ((0.0, dp_epsilon) if n == 10 and dp_epsilon else (0.0,)):
                enc, plain, answers, nbytes = [], [], None, 0
                for r in range(repeats + 1):  # the first of each: warm-up, not counted
                    t0 = time.perf_counter()
                    want, plain_bytes = _plain(spec, schema, tables)
                    t1 = time.perf_counter()
                    site = {**paths, "state_dir": str(Path(tmp) / f"state{n}-{eps}-{r}" /
                                                      "site-{partition}"), "budget": 1e9,
                            "exact": True}
                    res = ask_query(spec, schema, paths["keys"], n, site, engine="in-process",
                                    text=query, epsilon=eps, min_cell=0)
                    t2 = time.perf_counter()
                    if r:
                        plain.append(t1 - t0)
                        enc.append(t2 - t1)
                    answers, nbytes = (res.groups, want), res.bytes
                row = {"sites": n, "engine": "in-process", "epsilon": eps,
                       "seconds": round(statistics.median(enc), 4),
                       "plain_seconds": round(statistics.median(plain), 4),
                       "ratio": round(statistics.median(enc) / statistics.median(plain), 2),
                       "bytes": int(nbytes), "plain_bytes": int(plain_bytes),
                       "exact": _same(*answers) if eps == 0 else None,
                       "rows_total": int(sum(v["count"] for v in answers[1].values()))}
                out_rows.append(row)
                log(f"{n} sites, epsilon {eps}: {row['seconds']} s vs {row['plain_seconds']} s "
                    f"plaintext ({row['ratio']}x), {row['bytes'] / 1e6:.2f} MB")
        flower = None
        if flower_sites:
            paths = prepare_workdir(Path(tmp) / f"fed{flower_sites}", flower_sites, rows=rows)
            schema = load_schema(paths["schema"])
            site = {**paths, "state_dir": str(Path(tmp) / "flower" / "site-{partition}"),
                    "exact": True}
            t0 = time.perf_counter()
            res = ask_query(spec, schema, paths["keys"], flower_sites, site, engine="simulation",
                            text=query, min_cell=0)
            total = time.perf_counter() - t0
            flower = {"sites": flower_sites, "engine": "flower-simulation",
                      "seconds": round(res.seconds, 3),
                      "seconds_with_engine_start": round(total, 3), "bytes": int(res.bytes)}
            log(f"Flower simulation, {flower_sites} sites: {flower['seconds']} s in the query "
                f"({flower['seconds_with_engine_start']} s with the engine's start)")
    ten = next((r for r in out_rows if r["sites"] == 10 and r["epsilon"] == 0), None)
    return {"query": query, "repeats": repeats, "rows_per_site_mean": rows,
            "rows": out_rows, "flower": flower,
            "target": {"sites": 10, "max_seconds": 5.0, "max_ratio": 20.0,
                       "met": bool(ten and ten["seconds"] < 5 and ten["ratio"] < 20)}}


def markdown(res: dict) -> str:
    lines = [f"# fedface bench query\n\nQuery: `{res['query']}` (median of {res['repeats']} "
             "runs; sites run one after another in one process)\n",
             "| sites | epsilon | seconds | plaintext seconds | ratio | MB | answer = plaintext |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        exact = "yes" if r["exact"] else ("(noisy)" if r["exact"] is None else "NO")
        lines.append(f"| {r['sites']} | {r['epsilon']:g} | {r['seconds']} | {r['plain_seconds']} "
                     f"| {r['ratio']} | {r['bytes'] / 1e6:.2f} | {exact} |")
    if res.get("flower"):
        f = res["flower"]
        lines.append(f"\nThrough Flower's simulation engine ({f['sites']} sites): {f['seconds']} s "
                     f"in the query, {f['seconds_with_engine_start']} s with the engine's start.")
    t = res["target"]
    lines.append(f"\nTarget (10 sites, < {t['max_seconds']} s and < {t['max_ratio']}x "
                 f"plaintext): {'met' if t['met'] else 'MISSED'}.")
    return "\n".join(lines) + "\n"
